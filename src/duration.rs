//! Durations (`"90s"`, `"2h"`, `"1d12h"`) and times of day (`"09:00"`) as operators write them.
//!
//! A duration is one or more `<number><unit>` parts with the units `w`, `d`, `h`, `m` and `s`
//! (weeks are 7 days, days are 24 hours: durations are exact, calendar-free lengths), each unit at
//! most once and from largest to smallest, with no spaces: `"1w"`, `"1d12h"`, `"0s"`. Durations
//! are never negative and at most [`MAX_DURATION_DAYS`] days long, so that adding one to any date
//! an operator is likely to meet cannot overflow.

use std::fmt::Write as _;

use chrono::{NaiveTime, TimeDelta};

/// The longest duration accepted, in days (about 100 years).
pub const MAX_DURATION_DAYS: u64 = 36_500;

const EXPECTED_DURATION: &str =
    "expected a number followed by s, m, h, d or w (like 90s, 15m, 2h, 3d, 1w, or 1d12h)";

const EXPECTED_CLOCK: &str = "expected a time of day as HH:MM, 24-hour (like 09:00 or 17:30)";

/// Units from largest to smallest, with their length in seconds.
const UNITS: [(u8, u64); 5] = [
    (b'w', 604_800),
    (b'd', 86_400),
    (b'h', 3_600),
    (b'm', 60),
    (b's', 1),
];

/// Parses `"90s"`, `"15m"`, `"2h"`, `"3d"`, `"1w"` and compounds such as `"1d12h"` or `"0s"`.
///
/// The error says what is expected; callers put the text and the key in front of it.
pub fn parse_duration(text: &str) -> Result<TimeDelta, String> {
    let too_long = || format!("too long: at most {MAX_DURATION_DAYS}d (about 100 years)");
    if text.is_empty() {
        return Err(EXPECTED_DURATION.to_string());
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut total: u64 = 0;
    let mut last_rank: Option<usize> = None;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(EXPECTED_DURATION.to_string());
        }
        // `start..i` covers ASCII digits only, so both ends are character boundaries.
        let digits = &text[start..i];
        let Some(&unit) = bytes.get(i) else {
            return Err(format!("{digits} has no unit: {EXPECTED_DURATION}"));
        };
        let Some(rank) = UNITS.iter().position(|&(u, _)| u == unit) else {
            return Err(EXPECTED_DURATION.to_string());
        };
        i += 1;
        if last_rank.is_some_and(|last| rank <= last) {
            return Err(
                "each unit may appear once, from largest to smallest (like 1d12h, not 12h1d)"
                    .to_string(),
            );
        }
        last_rank = Some(rank);
        let number: u64 = digits.parse().map_err(|_| too_long())?;
        total = number
            .checked_mul(UNITS[rank].1)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(too_long)?;
    }
    if total > MAX_DURATION_DAYS * 86_400 {
        return Err(too_long());
    }
    i64::try_from(total)
        .ok()
        .and_then(TimeDelta::try_seconds)
        .ok_or_else(too_long)
}

/// The compact form of a duration, the inverse of [`parse_duration`]: `"1d12h"`, `"1m30s"`,
/// `"2w"`, `"0s"`. Negative durations get a leading `-`; fractions of a second are written as
/// decimals (`"1.5s"`), which [`parse_duration`] does not accept.
pub fn format_duration(d: TimeDelta) -> String {
    let mut out = String::new();
    if d < TimeDelta::zero() {
        out.push('-');
    }
    let mut rest = d.num_seconds().unsigned_abs();
    let nanos = d.subsec_nanos().unsigned_abs();
    let mut wrote = false;
    for &(unit, size) in &UNITS[..4] {
        let n = rest / size;
        rest %= size;
        if n > 0 {
            // Writing to a String cannot fail.
            let _ = write!(out, "{n}{}", char::from(unit));
            wrote = true;
        }
    }
    if nanos > 0 {
        let fraction = format!("{nanos:09}");
        let _ = write!(out, "{rest}.{}s", fraction.trim_end_matches('0'));
    } else if rest > 0 || !wrote {
        let _ = write!(out, "{rest}s");
    }
    out
}

/// Parses a 24-hour time of day, `"HH:MM"`: `"09:00"`, `"17:30"`. A one-digit hour (`"9:00"`)
/// is accepted; minutes need two digits. `"24:00"` is refused (it is not a time of day: use
/// `"00:00"` or `"23:59"`), and so are seconds (`"09:00:00"`).
pub fn parse_clock(text: &str) -> Result<NaiveTime, String> {
    let Some((hours, minutes)) = text.split_once(':') else {
        return Err(EXPECTED_CLOCK.to_string());
    };
    let digits = |s: &str, min: usize, max: usize| {
        (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(hours, 1, 2) || !digits(minutes, 2, 2) {
        return Err(EXPECTED_CLOCK.to_string());
    }
    let (Ok(h), Ok(m)) = (hours.parse::<u32>(), minutes.parse::<u32>()) else {
        return Err(EXPECTED_CLOCK.to_string());
    };
    if h == 24 && m == 0 {
        return Err(format!(
            "24:00 is not a time of day: use 00:00 (the start of a day) or 23:59; {EXPECTED_CLOCK}"
        ));
    }
    NaiveTime::from_hms_opt(h, m, 0).ok_or_else(|| {
        format!("hours go from 00 to 23 and minutes from 00 to 59; {EXPECTED_CLOCK}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: i64) -> TimeDelta {
        TimeDelta::seconds(n)
    }

    #[test]
    fn single_units() {
        assert_eq!(parse_duration("90s"), Ok(secs(90)));
        assert_eq!(parse_duration("15m"), Ok(secs(900)));
        assert_eq!(parse_duration("2h"), Ok(secs(7_200)));
        assert_eq!(parse_duration("3d"), Ok(secs(259_200)));
        assert_eq!(parse_duration("1w"), Ok(secs(604_800)));
        assert_eq!(parse_duration("0s"), Ok(TimeDelta::zero()));
        assert_eq!(parse_duration("007m"), Ok(secs(420)));
    }

    #[test]
    fn compounds() {
        assert_eq!(parse_duration("1d12h"), Ok(secs(129_600)));
        assert_eq!(
            parse_duration("1w2d3h4m5s"),
            Ok(secs(604_800 + 172_800 + 10_800 + 245))
        );
        assert_eq!(parse_duration("2h30m"), Ok(secs(9_000)));
    }

    #[test]
    fn invalid_durations_say_what_is_expected() {
        for bad in [
            "", "2x", "h", "2", "2 h", " 2h", "2h ", "-2h", "1.5h", "2H", "1d12", "two",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(
                err.contains("expected a number followed by s, m, h, d or w"),
                "{bad}: {err}"
            );
        }
        assert!(
            parse_duration("2")
                .unwrap_err()
                .starts_with("2 has no unit")
        );
        let order = parse_duration("12h1d").unwrap_err();
        assert!(order.contains("largest to smallest"), "{order}");
        assert!(parse_duration("1h1h").unwrap_err().contains("once"));
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        for huge in [
            "99999999999w",
            "99999999999999999999999999s",
            "18446744073709551615w",
            "36501d",
            "5215w",
            "36500d1s",
        ] {
            let err = parse_duration(huge).expect_err(huge);
            assert!(err.contains("too long"), "{huge}: {err}");
        }
        assert_eq!(parse_duration("36500d"), Ok(TimeDelta::days(36_500)));
    }

    #[test]
    fn format_is_compact_and_inverse() {
        assert_eq!(format_duration(secs(90)), "1m30s");
        assert_eq!(format_duration(secs(129_600)), "1d12h");
        assert_eq!(format_duration(TimeDelta::zero()), "0s");
        assert_eq!(format_duration(TimeDelta::days(14)), "2w");
        assert_eq!(format_duration(secs(3_601)), "1h1s");
        assert_eq!(format_duration(-secs(90)), "-1m30s");
        assert_eq!(format_duration(TimeDelta::milliseconds(1_500)), "1.5s");
        assert_eq!(format_duration(TimeDelta::milliseconds(-500)), "-0.5s");
        // Extremes do not panic.
        let _ = format_duration(TimeDelta::MAX);
        let _ = format_duration(TimeDelta::MIN);
        for text in ["1d12h", "1m30s", "2w", "0s", "1w2d3h4m5s", "59s", "5214w2d"] {
            let parsed = parse_duration(text).unwrap();
            assert_eq!(format_duration(parsed), text);
        }
        assert_eq!(format_duration(parse_duration("90s").unwrap()), "1m30s");
    }

    #[test]
    fn clock_times() {
        let t = |h, m| NaiveTime::from_hms_opt(h, m, 0).unwrap();
        assert_eq!(parse_clock("09:00"), Ok(t(9, 0)));
        assert_eq!(parse_clock("9:00"), Ok(t(9, 0)));
        assert_eq!(parse_clock("00:00"), Ok(t(0, 0)));
        assert_eq!(parse_clock("23:59"), Ok(t(23, 59)));
        assert_eq!(parse_clock("17:30"), Ok(t(17, 30)));
    }

    #[test]
    fn bad_clock_times_say_hh_mm() {
        for bad in [
            "",
            "9",
            "09",
            "0900",
            "09:0",
            "09:000",
            "009:00",
            "09:00:00",
            "9am",
            "-1:00",
            "+9:00",
            "09:6O",
            "٠٩:٠٠",
        ] {
            let err = parse_clock(bad).expect_err(bad);
            assert!(err.contains("HH:MM"), "{bad}: {err}");
        }
        assert!(
            parse_clock("24:00")
                .unwrap_err()
                .contains("not a time of day")
        );
        assert!(parse_clock("25:00").unwrap_err().contains("00 to 23"));
        assert!(parse_clock("12:60").unwrap_err().contains("00 to 59"));
    }
}
