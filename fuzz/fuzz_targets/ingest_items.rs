//! The body of `POST /api/v1/events` and `/api/v1/customers`: any bytes, read as the API reads
//! them (JSON; an array is a batch, an object a batch of one), then checked item by item.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use touchpoint::ingest::items;

fuzz_target!(|body: &[u8]| {
    let values = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(values)) => values,
        Ok(object @ Value::Object(_)) => vec![object],
        _ => return,
    };
    let (events, problems) = items::events(&values);
    for (index, _) in &events {
        assert!(*index < values.len());
    }
    for problem in &problems {
        assert!(problem.item.is_none_or(|i| i < values.len()));
    }
    let (customers, problems) = items::customers(&values);
    for problem in &problems {
        assert!(problem.item.is_none_or(|i| i < values.len()));
    }
    for (_, patch) in customers {
        let _ = patch.apply(None);
    }
});
