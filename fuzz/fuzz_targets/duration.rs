//! Durations and times of day as rules files write them. An accepted duration is within the
//! documented bounds and reads back from its compact form; an accepted time reads back from
//! `HH:MM`.
#![no_main]

use chrono::TimeDelta;
use libfuzzer_sys::fuzz_target;
use touchpoint::rules::{MAX_DURATION_DAYS, format_duration, parse_clock, parse_duration};

fuzz_target!(|text: &str| {
    if let Ok(duration) = parse_duration(text) {
        assert!(duration >= TimeDelta::zero());
        assert!(duration <= TimeDelta::days(MAX_DURATION_DAYS as i64));
        assert_eq!(parse_duration(&format_duration(duration)), Ok(duration), "{text:?}");
    }
    if let Ok(time) = parse_clock(text) {
        assert_eq!(parse_clock(&time.format("%H:%M").to_string()), Ok(time), "{text:?}");
    }
});
