//! A DSN or ARF report as `touchpoint bounce` reads it from the MTA: any bytes at all.
#![no_main]

use libfuzzer_sys::fuzz_target;
use touchpoint::bounce::parse_report;

fuzz_target!(|raw: &[u8]| {
    // The MTA's $RECIPIENT is outside input too: take it from the report's first line.
    let first_line = raw.split(|&b| b == b'\n').next().unwrap_or_default();
    let recipient = String::from_utf8_lossy(first_line).into_owned();
    let _ = parse_report(raw, &[]);
    let _ = parse_report(raw, &[recipient]);
});
