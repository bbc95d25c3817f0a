//! Fuzzing the parsers that read outside input (issue #12): DSN/ARF bounce reports, rules files,
//! durations and times of day, CSV import rows and ingest JSON items.
//!
//! Each parser gets arbitrary bytes or text, and structure-aware inputs: the real documents
//! (tests/fixtures/*.eml, config/rules/*.toml, the README's examples) with lines dropped,
//! duplicated, swapped or truncated and values replaced by hostile ones (CR/LF, NUL, huge
//! numbers, unicode, deep nesting). The property is always "no panic", and where it is cheap
//! something stronger: a valid duration reads back from its compact form, a rules mistake
//! points inside the file, an ingest problem names an item of the batch.
//!
//! `cargo test --test fuzz` runs 64 to 2,048 cases per property (a few seconds in all). For a
//! long run set `TOUCHPOINT_FUZZ_CASES`, which applies to every property, and pick the parser by
//! name prefix (`bounce_`, `rules_`, `duration_`, `csv_`, `ingest_`):
//! `TOUCHPOINT_FUZZ_CASES=1000000 cargo test --test fuzz bounce_ -- --test-threads=1`.
//! The coverage-guided libFuzzer targets in fuzz/ (fuzz/README.md) cover the bounce, rules,
//! duration and ingest parsers too.

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use chrono::{NaiveTime, TimeDelta, Timelike};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use support::{Backend, Sink, TestEnv};
use touchpoint::bounce::parse_report;
use touchpoint::diag::Diagnostic;
use touchpoint::import::{self, ImportError};
use touchpoint::ingest::items;
use touchpoint::rules::{
    MAX_DURATION_DAYS, format_duration, parse_clock, parse_duration, parse_file,
};
use touchpoint::store::DatabaseUrl;

// --- configuration -------------------------------------------------------------------------

/// `default` cases per property, or `TOUCHPOINT_FUZZ_CASES` when it is set.
fn cases(default: u32) -> u32 {
    match std::env::var("TOUCHPOINT_FUZZ_CASES") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("TOUCHPOINT_FUZZ_CASES={text:?} is not a number")),
        Err(_) => default,
    }
}

/// Failures are kept as named regression tests at the end of this file, not in a
/// proptest-regressions file.
fn config(default: u32) -> Config {
    Config {
        cases: cases(default),
        failure_persistence: None,
        ..Config::default()
    }
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The files of `dir` whose name ends with `suffix`, sorted, with their contents.
fn documents(dir: &str, suffix: &str) -> Vec<(String, Vec<u8>)> {
    let mut found: Vec<(String, Vec<u8>)> = std::fs::read_dir(repo_path(dir))
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.to_string_lossy().ends_with(suffix))
        .map(|path| {
            let bytes = std::fs::read(&path).expect("readable seed");
            (path.display().to_string(), bytes)
        })
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no {suffix} seeds in {dir}");
    found
}

// --- hostile values and line mutations -----------------------------------------------------

/// Values that have broken parsers before: line breaks, NUL, invalid UTF-8, numbers past every
/// integer type, unicode that changes length when case-folded or is written right to left,
/// encoded words that decode to nothing, and long runs.
fn hostile_bytes() -> BoxedStrategy<Vec<u8>> {
    let fixed: Vec<Vec<u8>> = [
        &b""[..],
        b" ",
        b"\r\n",
        b"\r",
        b"\n",
        b"\n\n",
        b"\r\n\r\n",
        b"\t",
        b"\0",
        b"\xff\xfe\xfd",
        b"\xc3",
        b"\xef\xbb\xbf",
        b"0",
        b"-1",
        b"99999999999999999999999999999999",
        b"-9223372036854775808",
        b"18446744073709551616",
        b"1e999",
        b"NaN",
        "İǅẞﬃ\u{202e}\u{200b}🎉".as_bytes(),
        "٠٩:٠٠".as_bytes(),
        b"=?utf-8?B?////?=",
        b"=?x-unknown?Q?=ZZ=?=",
        b"=?utf-8?q?a=0D=0Ab?=",
        b"<<<<>>>>",
        b"<>",
        b";;;",
        b"rfc822;",
        b"\"",
        b"\\",
        b"bounces+@x",
        b"bounces+99999999999999999999@x",
        b"bounces+-1@x",
        b"bounces+42",
        b"--B",
        b"--B--",
        b"Content-Type: message/rfc822",
        b"Content-Type: multipart/mixed; boundary=",
        b"Content-Transfer-Encoding: base64",
        b"Content-Transfer-Encoding: quoted-printable",
        b"5.1.1",
        b"4.2.2",
        b"failed",
        b"delayed",
    ]
    .iter()
    .map(|b| b.to_vec())
    .collect();
    prop_oneof![
        4 => prop::sample::select(fixed),
        2 => prop::collection::vec(any::<u8>(), 0..48),
        2 => any::<String>().prop_map(String::into_bytes),
        1 => (prop::sample::select(vec![b'a', b'[', b'{', b'(', b'<', b'=', b'\n', b' ']), 1..20_000usize)
            .prop_map(|(byte, n)| vec![byte; n]),
    ]
    .boxed()
}

/// A change to a document seen as lines. Indexes wrap around the number of lines.
#[derive(Debug, Clone)]
enum Mutation {
    Drop(Index),
    Duplicate(Index),
    Swap(Index, Index),
    /// Replaces what follows the line's first separator (`:` in mail, `=` in TOML).
    ReplaceValue(Index, Vec<u8>),
    Insert(Index, Vec<u8>),
    /// Cuts the line at that byte.
    Cut(Index, Index),
    /// Turns `\r\n` into `\n` or the other way round, everywhere.
    FlipLineEnds,
}

fn mutation(values: BoxedStrategy<Vec<u8>>) -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => any::<Index>().prop_map(Mutation::Drop),
        1 => any::<Index>().prop_map(Mutation::Duplicate),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        3 => (any::<Index>(), values.clone()).prop_map(|(i, v)| Mutation::ReplaceValue(i, v)),
        1 => (any::<Index>(), values).prop_map(|(i, v)| Mutation::Insert(i, v)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(i, at)| Mutation::Cut(i, at)),
        1 => Just(Mutation::FlipLineEnds),
    ]
}

fn mutate(document: &[u8], separator: u8, mutations: &[Mutation]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = document
        .split(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    for m in mutations {
        if lines.is_empty() {
            lines.push(Vec::new());
        }
        let len = lines.len();
        match m {
            Mutation::Drop(i) => {
                lines.remove(i.index(len));
            }
            Mutation::Duplicate(i) => {
                let line = lines[i.index(len)].clone();
                lines.insert(i.index(len), line);
            }
            Mutation::Swap(a, b) => lines.swap(a.index(len), b.index(len)),
            Mutation::ReplaceValue(i, value) => {
                let line = &mut lines[i.index(len)];
                let cut = line
                    .iter()
                    .position(|&b| b == separator)
                    .map_or(0, |p| p + 1);
                line.truncate(cut);
                line.push(b' ');
                line.extend_from_slice(value);
            }
            Mutation::Insert(i, value) => lines.insert(i.index(len + 1), value.clone()),
            Mutation::Cut(i, at) => {
                let line = &mut lines[i.index(len)];
                let cut = at.index(line.len() + 1);
                line.truncate(cut);
            }
            Mutation::FlipLineEnds => {
                let crlf = lines.iter().any(|l| l.ends_with(b"\r"));
                for line in &mut lines {
                    if crlf {
                        if line.ends_with(b"\r") {
                            line.pop();
                        }
                    } else {
                        line.push(b'\r');
                    }
                }
            }
        }
    }
    lines.join(&b'\n')
}

// --- DSN / ARF bounce reports --------------------------------------------------------------

/// The inline DSN of src/bounce.rs's tests, besides the real ones in tests/fixtures.
const INLINE_DSN: &str = "From: MAILER-DAEMON@mx.example\r\nTo: bounces+42@acme.example\r\nSubject: Undelivered Mail\r\nMessage-ID: <dsn-1@mx.example>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\nFinal-Recipient: rfc822; ada@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 No such user\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: hello@acme.example\r\nTo: ada@example.com\r\nMessage-ID: <42.thank-you@acme.example>\r\nSubject: Thank you\r\n--B--\r\n";

fn bounce_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = documents("tests/fixtures", ".eml")
        .into_iter()
        .map(|(_, bytes)| bytes)
        .collect();
    seeds.push(INLINE_DSN.as_bytes().to_vec());
    seeds
}

/// A report wrapped in `depth` levels of message/rfc822 or multipart/mixed.
fn nested_report(report: &[u8], depth: usize, multipart: bool) -> Vec<u8> {
    let mut message = report.to_vec();
    for level in 0..depth {
        let mut outer = if multipart {
            format!("Content-Type: multipart/mixed; boundary=\"L{level}\"\r\n\r\n--L{level}\r\n")
                .into_bytes()
        } else {
            b"Content-Type: message/rfc822\r\n\r\n".to_vec()
        };
        outer.extend_from_slice(&message);
        if multipart {
            outer.extend_from_slice(format!("\r\n--L{level}--\r\n").as_bytes());
        }
        message = outer;
    }
    message
}

fn recipients() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![
            Just("bounces+42@acme.example".to_string()),
            "bounces\\+[0-9-]{0,25}@[a-z.]{0,10}",
            any::<String>(),
        ],
        0..3,
    )
}

/// What every parsed report must satisfy besides not panicking. Any error is fine: the input
/// is refused, with a reason.
fn check_report(raw: &[u8], recipients: &[String]) -> Result<(), TestCaseError> {
    if let Ok(report) = parse_report(raw, recipients)
        && let Some(id) = &report.message_id
    {
        prop_assert!(!id.starts_with('<') && !id.ends_with('>'), "{id:?}");
    }
    Ok(())
}

#[test]
fn bounce_seeds_are_reports() {
    for seed in bounce_seeds() {
        let report = parse_report(&seed, &[]);
        assert!(
            report.is_ok(),
            "{report:?}: {}",
            String::from_utf8_lossy(&seed)
        );
    }
}

#[test]
fn bounce_any_bytes() {
    let mut runner = TestRunner::new(config(1024));
    let input = (prop::collection::vec(any::<u8>(), 0..2048), recipients());
    runner
        .run(&input, |(raw, recipients)| check_report(&raw, &recipients))
        .unwrap();
}

#[test]
fn bounce_mutated_fixtures() {
    let seeds = bounce_seeds();
    let mut runner = TestRunner::new(config(1024));
    let input = (
        prop::sample::select(seeds),
        prop::collection::vec(mutation(hostile_bytes()), 1..8),
        recipients(),
    );
    runner
        .run(&input, |(seed, mutations, recipients)| {
            check_report(&mutate(&seed, b':', &mutations), &recipients)
        })
        .unwrap();
}

#[test]
fn bounce_nested_reports() {
    let seeds = bounce_seeds();
    let mut runner = TestRunner::new(config(64));
    let input = (prop::sample::select(seeds), 1..200usize, any::<bool>());
    runner
        .run(&input, |(seed, depth, multipart)| {
            check_report(&nested_report(&seed, depth, multipart), &[])
        })
        .unwrap();
}

// --- rules files ---------------------------------------------------------------------------

/// A rule with every option, as in src/rules/tests.rs.
const EVERY_OPTION: &str = r#"
[[rule]]
name = "win-back.v2"
description = "Customers who have gone quiet"
template = "news"
subject = "{{#if customer.first_name}}Hi {{customer.first_name}}{{else}}Hello{{/if}}"
enabled = false
when = { schedule = "0 9 * * mon" }
unless = [
  { event = "purchase", within = "30d" },
  { event = "unsubscribe", within = "1w" },
]
only_if = [
  { attribute = "plan", equals = "gold" },
  { attribute = "seats", equals = 3 },
  { attribute = "score", equals = 0.5 },
  { attribute = "vip", equals = true },
  { attribute = "country", in = ["FR", "BE", 7] },
  { attribute = "email_bounced", exists = false },
]
send_window = { from = "20:00", to = "08:00", days = ["Mon", "TUESDAY", "fri", "mon"] }
expire_after = "1d12h"
track_opens = true
track_clicks = true
"#;

/// The example rules in config/rules, the README's ```toml blocks that hold rules, and a rule
/// with every option.
fn rule_seeds() -> Vec<String> {
    let mut seeds: Vec<String> = documents("config/rules", ".toml")
        .into_iter()
        .map(|(name, bytes)| String::from_utf8(bytes).unwrap_or_else(|_| panic!("{name}")))
        .collect();
    let readme = std::fs::read_to_string(repo_path("README.md")).expect("README.md");
    for block in readme.split("```toml\n").skip(1) {
        let block = block.split("```").next().unwrap_or_default();
        if block.contains("[[rule]]") {
            seeds.push(block.to_string());
        }
    }
    seeds.push(EVERY_OPTION.to_string());
    seeds
}

/// `true` for every template name but `missing`.
fn templates(name: &str) -> bool {
    name != "missing"
}

/// Every mistake points inside the file (line and column in range), or at the whole file.
fn check_rules(source: &str) -> Result<(), TestCaseError> {
    let (rules, diagnostics) = parse_file(Path::new("rules/fuzz.toml"), source, &templates);
    let lines: Vec<&str> = source.split('\n').collect();
    let inside = |line: usize, column: usize| {
        line >= 1
            && lines
                .get(line - 1)
                .is_some_and(|text| (1..=text.chars().count() + 1).contains(&column))
    };
    for Diagnostic {
        line,
        column,
        message,
        ..
    } in &diagnostics
    {
        prop_assert!(!message.is_empty());
        prop_assert!(
            (*line == 0 && *column == 0) || inside(*line, *column),
            "{line}:{column}: {message} is not inside the file"
        );
    }
    for rule in &rules {
        for origin in [&rule.origin, &rule.subject_origin, &rule.template_origin] {
            prop_assert!(inside(origin.line, origin.column), "{origin:?}");
        }
    }
    Ok(())
}

/// Durations as an operator might mistype them.
fn duration_soup() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9wdhms]{0,16}",
        "[0-9]{0,30}[wdhmsWDHMS]{0,2}",
        "[0-9wdhms .+\\-٠-٩]{0,12}",
    ]
}

/// Times of day as an operator might mistype them.
fn clock_soup() -> impl Strategy<Value = String> {
    prop_oneof!["[0-9]{0,3}:[0-9]{0,3}", "[0-9: apm+\\-٠-٩]{0,8}"]
}

/// Cron expressions, valid and broken: steps of 0, ranges backwards, numbers past every field.
fn cron_soup() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        Just("*".to_string()),
        Just("?".to_string()),
        Just("L".to_string()),
        Just("*/0".to_string()),
        Just("0-0/0".to_string()),
        Just("4294967296".to_string()),
        Just("99999999999999999999".to_string()),
        Just("mon-sun".to_string()),
        Just("jan-dec/2".to_string()),
        Just("5L".to_string()),
        Just("LW".to_string()),
        Just("15W".to_string()),
        Just("mon#5".to_string()),
        Just("7#0".to_string()),
        "[0-9]{1,3}",
        "[0-9]{1,3}-[0-9]{1,3}(/[0-9]{1,3})?",
        "[0-9]{1,2}(,[0-9]{1,2}){0,3}",
        "\\*/[0-9]{1,5}",
        "[0-9A-Za-z*/,#?LW\\-]{0,6}",
    ];
    prop_oneof![
        prop::collection::vec(field, 0..8).prop_map(|fields| fields.join(" ")),
        "[0-9*/,#?LW \\-]{0,30}",
        "@[a-z]{0,10}",
    ]
}

/// Values for a `key = value` line: TOML of every type, hostile strings, deep nesting, and the
/// domain strings (durations, times, cron) quoted.
fn toml_values() -> BoxedStrategy<Vec<u8>> {
    let fixed: Vec<&str> = vec![
        "\"\"",
        "\"a\\r\\nb\"",
        "\"a\\u0000b\"",
        "\"\\uD800\"",
        "\"\\U0010FFFF\"",
        "\"\u{202e}ǅ🎉\"",
        "'''\nmulti\nline'''",
        "\"\"\"\nmulti\r\nline\"\"\"",
        "\"unterminated",
        "99999999999999999999",
        "-9223372036854775808",
        "9223372036854775807",
        "0x7fffffffffffffff",
        "1e999",
        "-0.0",
        "inf",
        "-nan",
        "true",
        "1979-05-27T07:32:00Z",
        "07:32:00",
        "[]",
        "{}",
        "[1, \"a\", true, 1.5, {}]",
        "{ event = \"purchase\", after = \"2h\", at = \"09:00\", schedule = \"* * * * *\" }",
        "{ event = \"purchase\" }",
        "[{ event = \"purchase\", since = \"trigger\", within = \"1d\" }]",
        "[{ attribute = \"\", in = [[], {}] }]",
        "{ from = \"09:00\", to = \"09:00\", days = [] }",
        "{ from = \"23:59\", to = \"00:00\", days = [\"sun\", \"xyz\", 7] }",
    ];
    let nested = (
        prop::sample::select(vec![("[", "]"), ("{ a = ", " }"), ("[{ x = ", " }]")]),
        1..3000usize,
    )
        .prop_map(|((open, close), depth)| {
            format!("{}1{}", open.repeat(depth), close.repeat(depth))
        });
    prop_oneof![
        4 => prop::sample::select(fixed).prop_map(str::to_string),
        2 => duration_soup().prop_map(|d| format!("{d:?}")),
        1 => clock_soup().prop_map(|c| format!("{c:?}")),
        2 => cron_soup().prop_map(|c| format!("{c:?}")),
        1 => any::<String>().prop_map(|s| format!("{s:?}")),
        1 => nested,
    ]
    .prop_map(String::into_bytes)
    .boxed()
    .prop_union(hostile_bytes())
    .boxed()
}

/// Text from TOML's own alphabet, so the parser gets past its first byte more often.
fn toml_soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("[[rule]]\n"),
        Just("[rule]\n"),
        Just("[[rule.when]]\n"),
        Just("name"),
        Just("template"),
        Just("subject"),
        Just("when"),
        Just("unless"),
        Just("only_if"),
        Just("send_window"),
        Just("expire_after"),
        Just("event"),
        Just("after"),
        Just("at"),
        Just("schedule"),
        Just("anniversary_of"),
        Just(" = "),
        Just("\"x\""),
        Just("\"2h\""),
        Just("\"09:00\""),
        Just("\"0 9 * * *\""),
        Just("{"),
        Just("}"),
        Just("["),
        Just("]"),
        Just(","),
        Just("."),
        Just("\n"),
        Just("\r\n"),
        Just("#"),
        Just("'''"),
        Just("\"\"\""),
        Just("1"),
        Just("true"),
        Just("é"),
    ];
    prop::collection::vec(token, 0..60).prop_map(|tokens| tokens.concat())
}

#[test]
fn rules_seeds_are_valid() {
    for seed in rule_seeds() {
        let (rules, diagnostics) = parse_file(Path::new("seed.toml"), &seed, &templates);
        assert!(diagnostics.is_empty(), "{diagnostics:?}\n{seed}");
        assert!(!rules.is_empty(), "{seed}");
    }
}

#[test]
fn rules_any_text() {
    let mut runner = TestRunner::new(config(1024));
    runner.run(&any::<String>(), |s| check_rules(&s)).unwrap();
}

#[test]
fn rules_toml_soup() {
    let mut runner = TestRunner::new(config(1024));
    runner.run(&toml_soup(), |s| check_rules(&s)).unwrap();
}

#[test]
fn rules_mutated_examples() {
    let seeds = rule_seeds();
    let mut runner = TestRunner::new(config(1024));
    let input = (
        prop::sample::select(seeds),
        prop::collection::vec(mutation(toml_values()), 1..6),
    );
    runner
        .run(&input, |(seed, mutations)| {
            let bytes = mutate(seed.as_bytes(), b'=', &mutations);
            check_rules(&String::from_utf8_lossy(&bytes))
        })
        .unwrap();
}

// --- durations and times of day ------------------------------------------------------------

fn check_duration(text: &str) -> Result<(), TestCaseError> {
    if let Ok(duration) = parse_duration(text) {
        prop_assert!(duration >= TimeDelta::zero());
        prop_assert!(duration <= TimeDelta::days(MAX_DURATION_DAYS as i64));
        prop_assert_eq!(parse_duration(&format_duration(duration)), Ok(duration));
    }
    Ok(())
}

fn check_clock(text: &str) -> Result<(), TestCaseError> {
    if let Ok(time) = parse_clock(text) {
        prop_assert_eq!(time.second(), 0);
        prop_assert_eq!(parse_clock(&time.format("%H:%M").to_string()), Ok(time));
    }
    Ok(())
}

#[test]
fn duration_any_text() {
    let mut runner = TestRunner::new(config(2048));
    runner
        .run(&any::<String>(), |s| {
            check_duration(&s)?;
            check_clock(&s)
        })
        .unwrap();
}

#[test]
fn duration_soups() {
    let mut runner = TestRunner::new(config(2048));
    let input = prop_oneof![duration_soup(), clock_soup()];
    runner
        .run(&input, |s| {
            check_duration(&s)?;
            check_clock(&s)
        })
        .unwrap();
}

/// Any `<n>w<n>d<n>h<n>m<n>s` with some parts left out is read as their sum, or refused as too
/// long past the limit; the compact form reads back to the same length.
#[test]
fn duration_valid_round_trips() {
    let part = prop_oneof![
        Just(None),
        (0u64..100_000).prop_map(Some),
        any::<u64>().prop_map(Some)
    ];
    let mut runner = TestRunner::new(config(2048));
    runner
        .run(&prop::collection::vec(part, 5), |parts| {
            let sizes = [604_800u128, 86_400, 3_600, 60, 1];
            let mut text = String::new();
            let mut total: u128 = 0;
            for ((part, unit), size) in parts.iter().zip("wdhms".chars()).zip(sizes) {
                if let Some(n) = part {
                    text.push_str(&format!("{n}{unit}"));
                    total += u128::from(*n) * size;
                }
            }
            prop_assume!(!text.is_empty());
            match parse_duration(&text) {
                Ok(d) => {
                    prop_assert_eq!(d.num_seconds() as u128, total);
                    prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
                }
                Err(e) => {
                    prop_assert!(
                        total > u128::from(MAX_DURATION_DAYS) * 86_400,
                        "{text}: {e}"
                    );
                    prop_assert!(e.contains("too long"), "{text}: {e}");
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn duration_format_any_length() {
    let mut runner = TestRunner::new(config(2048));
    let input = (any::<i64>(), 0u32..2_000_000_000, any::<bool>());
    runner
        .run(&input, |(seconds, nanos, whole)| {
            let Some(d) = TimeDelta::new(seconds, if whole { 0 } else { nanos }) else {
                return Ok(());
            };
            let text = format_duration(d);
            if whole && d >= TimeDelta::zero() && d <= TimeDelta::days(MAX_DURATION_DAYS as i64) {
                prop_assert_eq!(parse_duration(&text), Ok(d));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn clock_every_minute_round_trips() {
    for minute_of_day in 0..24 * 60 {
        let (h, m) = (minute_of_day / 60, minute_of_day % 60);
        let time = NaiveTime::from_hms_opt(h, m, 0).expect("a time");
        assert_eq!(parse_clock(&format!("{h:02}:{m:02}")), Ok(time));
        assert_eq!(parse_clock(&format!("{h}:{m:02}")), Ok(time));
    }
}

// --- CSV import rows -----------------------------------------------------------------------

/// Cells for a CSV row: ids, addresses, names, time zones, times and numbers, valid and not.
fn csv_cell() -> impl Strategy<Value = String> {
    let fixed: Vec<&str> = vec![
        "c1",
        "ada@example.com",
        "Ada Lovelace",
        "Europe/London",
        "Mars/Olympus",
        "2026-11-23T09:00:00Z",
        "2019-06-15",
        "9999-12-31T23:59:59Z",
        "+10000-01-01T00:00:00Z",
        "0000-01-01",
        "2026-02-30",
        "2026-11-23T09:00:00+99:99",
        "2026-11-23T25:61:61Z",
        "1e3",
        "01234",
        "-0",
        "NaN",
        "inf",
        "true",
        "99999999999999999999999",
        "\"ada@example.com\"@example.com",
        "a@b@c",
        "ada@[127.0.0.1]",
        "ada@example.com\r\nBcc: eve@example.com",
        "Ada\r\nBcc: eve@example.com",
        "Ada\0",
        "\u{202e}moc.elpmaxe@ada",
        "=HYPERLINK(\"http://x\")",
        "",
        " ",
    ];
    prop_oneof![
        4 => prop::sample::select(fixed).prop_map(str::to_string),
        2 => any::<String>(),
        1 => "[a-z]{1,8}@[a-z]{1,8}\\.[a-z]{2,3}",
        1 => "[0-9+\\-:TZ .]{0,30}",
        1 => (1..400usize).prop_map(|n| "x".repeat(n)),
    ]
}

/// A CSV cell as a careful or a careless writer quotes it: `0` as it is, `1` quoted with quotes doubled, else an opening quote only.
fn quote(cell: &str, style: u8) -> String {
    match style {
        0 => cell.to_string(),
        1 => format!("\"{}\"", cell.replace('"', "\"\"")),
        _ => format!("\"{cell}"),
    }
}

/// A cell for a column: mostly what the column should hold (ids that other rows can name,
/// addresses, zones, times), sometimes anything.
fn column_cell(column: &str) -> BoxedStrategy<String> {
    let name = column
        .trim()
        .trim_start_matches('\u{feff}')
        .to_ascii_lowercase();
    let typical: BoxedStrategy<String> = match name.as_str() {
        "id" | "customer_id" | "event_id" => "c[1-5]".boxed(),
        "email" => "[a-z]{1,6}@[a-z]{1,6}\\.(com|org)".boxed(),
        "timezone" | "tz" => prop::sample::select(vec!["UTC", "Europe/London", "Mars/Olympus", ""])
            .prop_map(str::to_string)
            .boxed(),
        "kind" | "event" => prop::sample::select(vec!["purchase", "wedding", "k"])
            .prop_map(str::to_string)
            .boxed(),
        "occurred_at" | "at" => prop::sample::select(vec![
            "2026-11-23T09:00:00Z",
            "2019-06-15",
            "9999-12-31T23:59:59Z",
            "2026-11-23T09:00:00+14:00",
            "yesterday",
        ])
        .prop_map(str::to_string)
        .boxed(),
        _ => csv_cell().boxed(),
    };
    prop_oneof![8 => typical, 1 => csv_cell()].boxed()
}

/// A header: the columns an import wants (with aliases), or any mix of known, aliased,
/// misspelt, blank and duplicated names.
fn csv_header() -> impl Strategy<Value = Vec<&'static str>> {
    let names = vec![
        "id",
        "customer_id",
        "email",
        "name",
        "timezone",
        "tz",
        "kind",
        "event",
        "occurred_at",
        "at",
        "event_id",
        " ID ",
        "Email",
        "plan",
        "",
        "\u{feff}id",
    ];
    prop_oneof![
        2 => Just(vec!["id", "email", "name", "timezone", "plan"]),
        2 => Just(vec!["customer_id", "kind", "occurred_at", "id", "total"]),
        3 => Just(vec!["id", "customer_id", "email", "kind", "at", "tz"]),
        2 => prop::collection::vec(prop::sample::select(names), 0..8),
    ]
}

/// A whole CSV file for `touchpoint import customers` or `import events`: a header, then rows
/// of cells for its columns (some rows short or long, some cells quoted badly), the lines ended
/// in any style, maybe with bytes that are not UTF-8 put in anywhere.
fn csv_file() -> impl Strategy<Value = Vec<u8>> {
    csv_header()
        .prop_flat_map(|header| {
            let cells: Vec<BoxedStrategy<String>> = header.iter().map(|h| column_cell(h)).collect();
            let styles = prop::collection::vec(
                prop_oneof![12 => Just(0u8), 6 => Just(1), 1 => Just(2)],
                header.len(),
            );
            let ragged =
                prop_oneof![18 => Just(None), 1 => Just(Some(true)), 1 => Just(Some(false))];
            let rows = prop::collection::vec((cells, styles, ragged), 0..6);
            let line_end = prop::sample::select(vec!["\n", "\r\n", "\r"]);
            let damage = prop_oneof![
                9 => Just(None),
                1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..4)).prop_map(Some),
            ];
            (Just(header), rows, line_end, damage)
        })
        .prop_map(|(header, rows, end, damage)| {
            let mut text = header.join(",");
            for (cells, styles, ragged) in rows {
                let mut cells: Vec<String> = cells
                    .iter()
                    .zip(&styles)
                    .map(|(cell, style)| quote(cell, *style))
                    .collect();
                match ragged {
                    Some(true) => cells.push("extra".into()),
                    Some(false) => {
                        cells.pop();
                    }
                    None => {}
                }
                text.push_str(end);
                text.push_str(&cells.join(","));
            }
            let mut bytes = text.into_bytes();
            if let Some((at, junk)) = damage {
                let at = at.index(bytes.len() + 1);
                bytes.splice(at..at, junk);
            }
            bytes
        })
}

/// A row mistake points at a line of the file; a success wrote no more rows than there were.
fn check_import(result: Result<usize, ImportError>, bytes: &[u8]) -> Result<(), TestCaseError> {
    let physical_lines = bytes.iter().filter(|&&b| b == b'\n' || b == b'\r').count() as u64 + 1;
    match result {
        Ok(rows) => prop_assert!(rows as u64 <= physical_lines),
        Err(ImportError::Rows { errors, .. }) => {
            prop_assert!(!errors.is_empty());
            for error in errors {
                prop_assert!(error.line <= physical_lines, "{error:?}");
                prop_assert!(!error.message.is_empty());
            }
        }
        Err(ImportError::Read { .. }) => {}
        // A value the checks let through that the database refuses is a bug to report, but no
        // panic; say what it was.
        Err(ImportError::Store(e)) => {
            prop_assert!(false, "the database refused a checked row: {e}")
        }
    }
    Ok(())
}

/// A cell becomes a number or a boolean only when that is what it says; an integer keeps its
/// digits. (A float may be written differently by JSON: `-0` becomes `-0.0`.)
#[test]
fn csv_typed_values_keep_their_value() {
    let mut runner = TestRunner::new(config(2048));
    let input = prop_oneof![any::<String>(), "[0-9.eE+\\-]{0,24}", csv_cell()];
    runner
        .run(&input, |text| {
            match import::typed_value(&text) {
                Value::Number(n) if n.is_i64() => prop_assert_eq!(n.to_string(), text),
                Value::Number(n) => prop_assert_eq!(n.as_f64(), text.parse::<f64>().ok()),
                Value::Bool(b) => prop_assert_eq!(b.to_string(), text),
                Value::String(s) => prop_assert_eq!(s, text),
                other => prop_assert!(false, "{other:?}"),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn csv_times_never_panic() {
    let rfc3339ish = (
        prop_oneof![0i64..10_000, any::<i64>()],
        0u32..15,
        0u32..34,
        0u32..26,
        0u32..62,
        0u32..62,
        prop::sample::select(vec![
            "Z",
            "+00:00",
            "-23:59",
            "+99:99",
            "",
            ".999999999Z",
            "z",
        ]),
    )
        .prop_map(|(y, mo, d, h, mi, s, zone)| {
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{zone}")
        });
    let mut runner = TestRunner::new(config(2048));
    let input = prop_oneof![any::<String>(), csv_cell(), rfc3339ish];
    runner
        .run(&input, |text| {
            if let Ok(time) = import::parse_time(&text) {
                let _ = time.to_rfc3339();
                let _ = time.timestamp_millis();
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn csv_customer_rows_are_checked() {
    let mut runner = TestRunner::new(config(1024));
    let input = (
        csv_cell(),
        csv_cell(),
        prop::option::of(csv_cell()),
        prop::option::of(csv_cell()),
        prop::collection::vec(csv_cell(), 0..3),
    );
    runner
        .run(&input, |(id, email, name, timezone, pairs)| {
            let attributes = import::key_values(&pairs, "--attr").unwrap_or(json!({}));
            let checked = import::customer(
                &id,
                &email,
                name.as_deref(),
                timezone.as_deref(),
                attributes,
            );
            if let Ok(customer) = checked {
                prop_assert!(!customer.id.is_empty());
                prop_assert_eq!(customer.id.trim(), customer.id.as_str());
                prop_assert!(customer.id.len() <= import::MAX_KEY_BYTES);
                prop_assert!(customer.email.parse::<lettre::Address>().is_ok());
            }
            Ok(())
        })
        .unwrap();
}

/// Whole files through `import_customers` and `import_events` into a real SQLite database.
#[test]
fn csv_import_files() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = DatabaseUrl::Sqlite(dir.path().join("fuzz.db"));
    let store = runtime
        .block_on(touchpoint::store::open(&url, 2))
        .expect("store");
    runtime.block_on(store.migrate()).expect("migrate");
    let file = dir.path().join("rows.csv");
    let written = std::cell::Cell::new(0u32);
    let config = config(96);
    let enough_to_tell = config.cases >= 50;
    let mut runner = TestRunner::new(config);
    runner
        .run(&csv_file(), |bytes| {
            std::fs::write(&file, &bytes).expect("write the CSV");
            let customers = runtime.block_on(import::import_customers(&store, &file));
            written.set(written.get() + u32::from(customers.is_ok()));
            check_import(customers, &bytes)?;
            let events = runtime.block_on(import::import_events(&store, &file));
            written.set(written.get() + u32::from(events.is_ok()));
            check_import(events.map(|(rows, _)| rows), &bytes)
        })
        .unwrap();
    // About a third of the files import; none would mean the generator never gets past the
    // header and the row checks.
    assert!(written.get() > 0 || !enough_to_tell, "no file was imported");
}

// --- ingest JSON items ---------------------------------------------------------------------

/// The items of a body, as the ingest API splits it: an array is a batch, an object a batch of
/// one, anything else is refused.
fn batch(body: &[u8]) -> Option<Vec<Value>> {
    match serde_json::from_slice(body).ok()? {
        Value::Array(values) => Some(values),
        object @ Value::Object(_) => Some(vec![object]),
        _ => None,
    }
}

/// Every problem names an item of the batch and a field it has or needs; the good items have
/// distinct ids; a good customer merges with a stored one.
fn check_items(values: &[Value]) -> Result<(), TestCaseError> {
    let known: Vec<&str> = items::EVENT_FIELDS
        .iter()
        .chain(&items::CUSTOMER_FIELDS)
        .copied()
        .collect();
    let check_problems = |problems: &[items::Problem]| -> Result<(), TestCaseError> {
        for p in problems {
            let item = p.item.expect("a problem of an item");
            prop_assert!(item < values.len());
            if let Some(field) = &p.field {
                let present = values[item].get(field).is_some();
                prop_assert!(known.contains(&field.as_str()) || present, "{p:?}");
            }
        }
        Ok(())
    };
    let (events, problems) = items::events(values);
    check_problems(&problems)?;
    let mut ids: Vec<&str> = events.iter().map(|(_, e)| e.id.as_str()).collect();
    ids.sort_unstable();
    prop_assert!(ids.windows(2).all(|w| w[0] != w[1]));
    for (index, event) in &events {
        prop_assert!(*index < values.len());
        prop_assert!(!event.id.is_empty() && !event.customer_id.is_empty());
    }
    let (customers, problems) = items::customers(values);
    check_problems(&problems)?;
    let stored = touchpoint::store::Customer {
        id: "stored".into(),
        email: "stored@example.com".into(),
        name: Some("Stored".into()),
        timezone: Some("Europe/London".into()),
        attributes: json!({"plan": "gold", "nested": {"a": [1, 2]}}),
    };
    for (index, patch) in customers {
        prop_assert!(index < values.len());
        let merged = patch.apply(Some(stored.clone()));
        prop_assert!(merged.attributes.is_object());
    }
    Ok(())
}

/// Strings for item fields: valid and broken ids, times, addresses and zones.
fn json_string() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => csv_cell(),
        1 => Just("a\0b".to_string()),
        1 => (250..260usize).prop_map(|n| "k".repeat(n)),
    ]
    .prop_map(Value::String)
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        json_string(),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![3 => "[a-z_]{0,8}", 1 => Just("k\0".to_string())],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An item with fields from the events' and customers' lists, and some others.
fn json_item() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        4 => prop::sample::select(vec![
            "id", "customer_id", "kind", "occurred_at", "data", "email", "name", "timezone",
            "attributes",
        ])
        .prop_map(str::to_string),
        1 => any::<String>(),
    ];
    let field_value = prop_oneof![3 => json_string(), 2 => json_value()];
    prop_oneof![
        8 => prop::collection::btree_map(key, field_value, 0..8)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        1 => json_value(),
    ]
}

/// Text that is valid JSON but for a byte here or there.
fn damaged_json(values: Vec<Value>, cut: Option<(Index, u8)>) -> Vec<u8> {
    let mut body = serde_json::to_vec(&values).expect("JSON");
    if let Some((at, byte)) = cut {
        let at = at.index(body.len());
        body[at] = byte;
    }
    body
}

#[test]
fn ingest_any_bytes() {
    let mut runner = TestRunner::new(config(1024));
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..512), |body| {
            if let Some(values) = batch(&body) {
                check_items(&values)?;
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn ingest_structured_items() {
    let mut runner = TestRunner::new(config(512));
    let input = (
        prop::collection::vec(json_item(), 0..6),
        prop_oneof![4 => Just(None), 1 => (any::<Index>(), any::<u8>()).prop_map(Some)],
    );
    runner
        .run(&input, |(values, damage)| {
            check_items(&values)?;
            if let Some(values) = batch(&damaged_json(values, damage)) {
                check_items(&values)?;
            }
            Ok(())
        })
        .unwrap();
}

/// Nesting past serde_json's limit is a parse error, not a stack overflow; nesting under it is
/// walked (NUL looked for at the bottom) without one.
#[test]
fn ingest_deep_nesting() {
    assert!(batch(&b"[".repeat(1_000_000)).is_none());
    assert!(
        batch(format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000)).as_bytes())
            .is_none()
    );
    let mut data = json!("x\0");
    // 2 levels each, 120 in all: under serde_json's 128 with the batch and the item.
    for _ in 0..60 {
        data = json!({ "d": [data] });
    }
    let item = json!({
        "id": "e1", "customer_id": "c1", "kind": "k", "occurred_at": "2026-01-01", "data": data
    });
    let body = serde_json::to_vec(&item).expect("JSON");
    let values = batch(&body).expect("under serde_json's limit");
    let (good, problems) = items::events(&values);
    assert!(good.is_empty());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].field.as_deref(), Some("data"));
}

// --- deep nesting and huge inputs, once each -----------------------------------------------

#[test]
fn bounce_deeply_nested_report_is_no_crash() {
    let seed = INLINE_DSN.as_bytes();
    for multipart in [false, true] {
        let raw = nested_report(seed, 5_000, multipart);
        let _ = parse_report(&raw, &[]);
    }
}

#[test]
fn rules_deeply_nested_values_are_mistakes_not_crashes() {
    for (open, close) in [("[", "]"), ("{ a = ", " }")] {
        let source = format!(
            "[[rule]]\nname = \"deep\"\nwhen = {}1{}\n",
            open.repeat(100_000),
            close.repeat(100_000)
        );
        let (rules, diagnostics) = parse_file(Path::new("deep.toml"), &source, &templates);
        assert!(rules.is_empty());
        assert!(!diagnostics.is_empty());
    }
    let dotted = format!("{} = 1\n", vec!["a"; 100_000].join("."));
    let _ = parse_file(Path::new("dotted.toml"), &dotted, &templates);
}

// --- regressions: inputs the fuzzers found ---------------------------------------------------

/// The smallest input found that reaches mail-parser's assertion (see below).
const MAIL_PARSER_ASSERTION: &str = "Content-Type: multipart/\n\tboundary=\"B\n\n--B\nContent-Type: message/rfc822\n\nContent-Type: message/rfc822\n\n\n--B--";

/// A multipart whose boundary parameter is never closed, holding a message/rfc822 part whose
/// body is only another Content-Type line: mail-parser 0.11.9 reaches its
/// `debug_assert!(false, "Invalid part ID, could not find multipart.")` (src/parsers/message.rs
/// line 485). Release builds have no debug assertions and recover; Cargo.toml compiles
/// mail-parser without them in test builds too. Found by bounce_mutated_fixtures from the Yahoo
/// ARF fixture (one line dropped, one `Content-Type: message/rfc822` line inserted).
#[test]
fn bounce_mail_parser_debug_assertion() {
    assert!(parse_report(MAIL_PARSER_ASSERTION.as_bytes(), &[]).is_err());
    let found = "Content-Type: multipart/\n\tboundary=\"----=_Part_1234567_890123456.1731412345678\n\n------=_Part_1234567_890123456.1731412345678\nContent-Type: message/rfc822\n\nContent-Type: message/rfc822\n\n\n------=_Part_1234567_890123456.1731412345678--";
    assert!(parse_report(found.as_bytes(), &[]).is_err());
}

/// The same input piped into `touchpoint bounce` (a test build, as the MTA's pipe would run it):
/// ignored as no report, exit 0; not a panic (exit 101) that the MTA would retry or bounce.
#[tokio::test]
async fn bounce_cli_ignores_the_mail_parser_assertion_input() {
    let env = TestEnv::new(Backend::Sqlite, Sink::Files, &[], "").await;
    let mut child = env
        .command()
        .arg("bounce")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn touchpoint bounce");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(MAIL_PARSER_ASSERTION.as_bytes())
        .expect("write the report");
    let output = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("ignored: not a bounce or complaint report"),
        "{stdout}"
    );
}
