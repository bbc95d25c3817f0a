//! Customers and events from the command line and from CSV files. Every row is checked
//! before anything is written, and a file is written in one transaction: all of it or none.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use chrono::{DateTime, Datelike, NaiveDate, Utc};

use crate::store::{Customer, Event, SharedStore};

/// A mistake in one CSV row (or in the header, line 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub line: u64,
    pub message: String,
}

/// Why an import wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{}", render_rows(.path, .errors))]
    Rows { path: String, errors: Vec<RowError> },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn render_rows(path: &str, errors: &[RowError]) -> String {
    let mut lines: Vec<String> = errors
        .iter()
        .take(50)
        .map(|e| format!("{path}:{}: {}", e.line, e.message))
        .collect();
    if errors.len() > 50 {
        lines.push(format!("... and {} more", errors.len() - 50));
    }
    lines.push("nothing was imported; fix these rows and run the import again".into());
    lines.join("\n")
}

/// `"true"`, `"false"` and numbers that read back the same become JSON booleans and numbers;
/// everything else (including `"01234"`) stays a string.
pub fn typed_value(text: &str) -> serde_json::Value {
    match text {
        "true" => return serde_json::Value::Bool(true),
        "false" => return serde_json::Value::Bool(false),
        _ => {}
    }
    if let Ok(number) = text.parse::<i64>()
        && number.to_string() == text
    {
        return number.into();
    }
    if let Ok(number) = text.parse::<f64>()
        && number.is_finite()
        && number.to_string() == text
    {
        return number.into();
    }
    serde_json::Value::String(text.to_string())
}

/// `["plan=gold", "n=3"]` into a JSON object.
pub fn key_values(pairs: &[String], flag: &str) -> Result<serde_json::Value, String> {
    let mut object = serde_json::Map::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!("{flag} {pair:?}: expected KEY=VALUE"));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("{flag} {pair:?}: the key is empty"));
        }
        if pair.contains('\0') {
            return Err(format!(
                "{flag} {pair:?}: holds a NUL character, which cannot be stored"
            ));
        }
        object.insert(key.to_string(), typed_value(value));
    }
    Ok(serde_json::Value::Object(object))
}

/// RFC 3339 (`2026-11-23T09:00:00+01:00`), or a plain date (`2019-06-15`), kept as midnight
/// UTC, which anniversaries read as that calendar date. Times after 9000-12-31 are refused
/// ([`check_time`]).
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return check_time(t.with_timezone(&Utc));
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d")
        && let Some(midnight) = date.and_hms_opt(0, 0, 0)
    {
        return check_time(midnight.and_utc());
    }
    Err(format!(
        "{text:?} is not a time: expected RFC 3339 like 2026-11-23T09:00:00Z, or a date like 2019-06-15"
    ))
}

/// The last year an event may happen in. Planning adds up to about a century to an event's
/// time (`after`, anniversaries, `expire_after`), and a planned time must stay within year
/// 9999: SQLite keeps times as text, and `+10000-01-01` sorts before `2026-01-01`.
pub const LAST_EVENT_YEAR: i32 = 9000;

/// Refuses a time after [`LAST_EVENT_YEAR`].
pub fn check_time(time: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if time.year() > LAST_EVENT_YEAR {
        return Err(format!(
            "{} is after {LAST_EVENT_YEAR}-12-31: times that far ahead are refused",
            time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        ));
    }
    Ok(time)
}

/// The longest id, customer id or kind taken (bytes). Keys are indexed, and PostgreSQL refuses
/// an index entry of more than about 2.7 kB: a longer key would fail every write of its batch,
/// and every planning pass, for a reason no retry can fix.
pub const MAX_KEY_BYTES: usize = 255;

/// Checks an id, customer id or kind: at most `MAX_KEY_BYTES`.
pub fn check_key(what: &str, text: &str) -> Result<(), String> {
    if text.trim().len() > MAX_KEY_BYTES {
        return Err(format!(
            "the {what} is {} bytes long; at most {MAX_KEY_BYTES} are taken",
            text.trim().len()
        ));
    }
    Ok(())
}

/// What a control character is, in words for an operator: `a line break (CR)`.
fn describe_control(c: char) -> String {
    match c {
        '\r' => "a line break (CR)".into(),
        '\n' => "a line break (LF)".into(),
        '\u{2028}' | '\u{2029}' | '\u{85}' => format!("a line break (U+{:04X})", u32::from(c)),
        '\0' => "a NUL character".into(),
        c => format!("a control character (U+{:04X})", u32::from(c)),
    }
}

/// The first character of `text` that cannot go into a mail header: line breaks (CR, LF and
/// Unicode's NEL, LS, PS) and every other control character (C0, DEL, C1). Tab is allowed:
/// RFC 5322 counts it as white space within a header line, so it cannot start a new header.
fn first_unsafe_char(text: &str) -> Option<char> {
    text.chars()
        .find(|&c| (c.is_control() && c != '\t') || matches!(c, '\u{2028}' | '\u{2029}'))
}

/// Checks a name, an address or a subject: text that ends up in a mail header. The one check
/// every writer (command line, CSV import, ingest API, source rows) and the message builder use.
pub fn check_header_text(what: &str, text: &str) -> Result<(), String> {
    match first_unsafe_char(text) {
        Some(c) => Err(format!("the {what} contains {}", describe_control(c))),
        None => Ok(()),
    }
}

/// Checks an address the way the sender will.
pub fn check_email(email: &str) -> Result<(), String> {
    check_header_text("email address", email.trim())?;
    email
        .trim()
        .parse::<lettre::Address>()
        .map(|_| ())
        .map_err(|e| format!("{email:?} is not a valid email address ({e})"))
}

pub fn check_timezone(tz: &str) -> Result<(), String> {
    crate::calendar::parse_timezone(tz).map(|_| ())
}

/// A customer from the command line or a row, checked.
pub fn customer(
    id: &str,
    email: &str,
    name: Option<&str>,
    timezone: Option<&str>,
    attributes: serde_json::Value,
) -> Result<Customer, String> {
    if id.trim().is_empty() {
        return Err("the customer id is empty".into());
    }
    check_key("customer id", id)?;
    check_email(email)?;
    let name = name.map(str::trim).filter(|n| !n.is_empty());
    if let Some(name) = name {
        check_header_text("name", name)?;
    }
    let timezone = timezone.map(str::trim).filter(|t| !t.is_empty());
    if let Some(tz) = timezone {
        check_timezone(tz)?;
    }
    Ok(Customer {
        id: id.trim().to_string(),
        email: email.trim().to_string(),
        name: name.map(str::to_string),
        timezone: timezone.map(str::to_string),
        attributes,
    })
}

struct Reader {
    path: String,
    headers: Vec<String>,
    records: csv::StringRecordsIntoIter<std::fs::File>,
}

fn open_csv(file: &Path) -> Result<Reader, ImportError> {
    let path = file.display().to_string();
    let read_error = |message: String| ImportError::Read {
        path: path.clone(),
        message,
    };
    let handle = std::fs::File::open(file).map_err(|e| read_error(e.to_string()))?;
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .trim(csv::Trim::Headers)
        .from_reader(handle);
    let headers = reader
        .headers()
        .map_err(|e| read_error(e.to_string()))?
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    Ok(Reader {
        path,
        headers,
        records: reader.into_records(),
    })
}

fn column(headers: &[String], names: &[&str]) -> Option<usize> {
    headers.iter().position(|h| names.contains(&h.as_str()))
}

fn progress(total_bytes: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total_bytes),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} {wide_bar} {bytes}/{total_bytes}")
    {
        bar.set_style(style);
    }
    bar
}

/// Reads every row; returns the good rows' values and every bad row's mistake (a header
/// without a required column is an error at once).
fn read_rows<T>(
    reader: Reader,
    total_bytes: u64,
    required: &[(&str, &[&str])],
    mut parse: impl FnMut(&[String], &csv::StringRecord, &[Option<usize>]) -> Result<T, String>,
) -> Result<(Vec<T>, Vec<RowError>), ImportError> {
    let mut errors = Vec::new();
    let mut positions = Vec::new();
    for (name, aliases) in required {
        match column(&reader.headers, aliases) {
            Some(i) => positions.push(Some(i)),
            None if name.ends_with('?') => positions.push(None),
            None => errors.push(RowError {
                line: 1,
                message: format!("the header has no `{name}` column"),
            }),
        }
    }
    if !errors.is_empty() {
        return Err(ImportError::Rows {
            path: reader.path,
            errors,
        });
    }
    let bar = progress(total_bytes);
    bar.set_message("checking");
    let mut values = Vec::new();
    for record in reader.records {
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                let line = error.position().map_or(0, |p| p.line());
                errors.push(RowError {
                    line,
                    message: error.to_string(),
                });
                continue;
            }
        };
        let line = record.position().map_or(0, |p| p.line());
        bar.set_position(record.position().map_or(0, |p| p.byte()));
        if let Some(column) = column_with_nul(&reader.headers, &record) {
            let message =
                format!("the column {column:?} holds a NUL character, which cannot be stored");
            errors.push(RowError { line, message });
            continue;
        }
        match parse(&reader.headers, &record, &positions) {
            Ok(value) => values.push(value),
            Err(message) => errors.push(RowError { line, message }),
        }
    }
    bar.finish_and_clear();
    Ok((values, errors))
}

/// The first column whose cell holds NUL: PostgreSQL text and JSON cannot store it, and the
/// row must be refused here, naming its line, not fail the whole import in the database.
fn column_with_nul<'a>(headers: &'a [String], record: &csv::StringRecord) -> Option<&'a str> {
    let position = record.iter().position(|cell| cell.contains('\0'))?;
    Some(headers.get(position).map_or("(unnamed)", String::as_str))
}

/// The columns not named in `known`, as a JSON object of typed values (empty cells left out).
fn extra_columns(
    headers: &[String],
    record: &csv::StringRecord,
    known: &[Option<usize>],
) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    for (i, (header, cell)) in headers.iter().zip(record.iter()).enumerate() {
        if known.contains(&Some(i)) || cell.is_empty() || header.is_empty() {
            continue;
        }
        object.insert(header.clone(), typed_value(cell));
    }
    serde_json::Value::Object(object)
}

fn cell(record: &csv::StringRecord, position: Option<usize>) -> Option<&str> {
    position
        .and_then(|i| record.get(i))
        .map(str::trim)
        .filter(|c| !c.is_empty())
}

/// Imports customers: `id`, `email`, optional `name` and `timezone`; other columns are
/// attributes. Returns how many rows were written.
pub async fn import_customers(store: &SharedStore, file: &Path) -> Result<usize, ImportError> {
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let reader = open_csv(file)?;
    let path = reader.path.clone();
    let mut seen = HashSet::new();
    let (customers, errors) = read_rows(
        reader,
        size,
        &[
            ("id", &["id", "customer_id"]),
            ("email", &["email"]),
            ("name?", &["name"]),
            ("timezone?", &["timezone", "time_zone", "tz"]),
        ],
        |headers, record, at| {
            let id = cell(record, at[0]).ok_or("the id is empty")?;
            let email = cell(record, at[1]).ok_or("the email is empty")?;
            if !seen.insert(id.to_string()) {
                return Err(format!("the id {id:?} appears twice in this file"));
            }
            customer(
                id,
                email,
                cell(record, at[2]),
                cell(record, at[3]),
                extra_columns(headers, record, at),
            )
        },
    )?;
    if !errors.is_empty() {
        return Err(ImportError::Rows { path, errors });
    }
    store
        .upsert_customers(&customers)
        .await
        .map_err(ImportError::Store)?;
    tracing::debug!(path, rows = customers.len(), "imported customers");
    Ok(customers.len())
}

/// Imports events: `customer_id`, `kind`, `occurred_at`, optional `id`; other columns are
/// event data. An event without an id gets `customer:kind:time`, so importing a file twice
/// adds nothing the second time. Returns (rows read, events new).
pub async fn import_events(store: &SharedStore, file: &Path) -> Result<(usize, u64), ImportError> {
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    let reader = open_csv(file)?;
    let path = reader.path.clone();
    let mut lines = Vec::new();
    let (events, mut errors) = read_rows(
        reader,
        size,
        &[
            ("customer_id", &["customer_id", "customer"]),
            ("kind", &["kind", "event"]),
            ("occurred_at", &["occurred_at", "at", "time"]),
            ("id?", &["id", "event_id"]),
        ],
        |headers, record, at| {
            let customer_id = cell(record, at[0]).ok_or("the customer_id is empty")?;
            let kind = cell(record, at[1]).ok_or("the kind is empty")?;
            let occurred_at = parse_time(cell(record, at[2]).ok_or("occurred_at is empty")?)?;
            let id = cell(record, at[3]).map_or_else(
                || format!("{customer_id}:{kind}:{}", occurred_at.timestamp_millis()),
                str::to_string,
            );
            check_key("customer_id", customer_id)?;
            check_key("kind", kind)?;
            check_key("id", &id)?;
            lines.push(record.position().map_or(0, |p| p.line()));
            Ok(Event {
                id,
                customer_id: customer_id.into(),
                kind: kind.into(),
                occurred_at,
                data: extra_columns(headers, record, at),
            })
        },
    )?;
    // An unknown customer is a row mistake too, reported with the others before anything is
    // written.
    let wanted: BTreeSet<&str> = events.iter().map(|e| e.customer_id.as_str()).collect();
    let mut missing = HashSet::new();
    for id in wanted {
        if store.customer(id).await?.is_none() {
            missing.insert(id.to_string());
        }
    }
    errors.extend(
        events
            .iter()
            .zip(&lines)
            .filter(|(e, _)| missing.contains(&e.customer_id))
            .map(|(e, line)| RowError {
                line: *line,
                message: format!(
                    "no customer with id {:?} (import customers first)",
                    e.customer_id
                ),
            }),
    );
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        return Err(ImportError::Rows { path, errors });
    }
    let new = store.insert_events(&events).await?;
    Ok((events.len(), new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_keep_their_type_only_when_it_reads_back_the_same() {
        assert_eq!(typed_value("true"), serde_json::json!(true));
        assert_eq!(typed_value("42"), serde_json::json!(42));
        assert_eq!(typed_value("99.5"), serde_json::json!(99.5));
        assert_eq!(typed_value("01234"), serde_json::json!("01234"));
        assert_eq!(typed_value("1e3"), serde_json::json!("1e3"));
        assert_eq!(typed_value("gold"), serde_json::json!("gold"));
    }

    #[test]
    fn times_and_dates() {
        assert_eq!(
            parse_time("2026-11-23T10:00:00+01:00")
                .unwrap()
                .to_rfc3339(),
            "2026-11-23T09:00:00+00:00"
        );
        assert_eq!(
            parse_time("2019-06-15").unwrap().to_rfc3339(),
            "2019-06-15T00:00:00+00:00"
        );
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn text_for_a_header_refuses_line_breaks_and_control_characters_but_not_tabs() {
        assert_eq!(
            check_header_text("name", "Ada\r\nBcc: x@evil.example").unwrap_err(),
            "the name contains a line break (CR)"
        );
        assert_eq!(
            check_header_text("name", "Ada\nLovelace").unwrap_err(),
            "the name contains a line break (LF)"
        );
        for (text, what) in [
            ("a\0b", "a NUL character"),
            ("a\u{7f}b", "a control character (U+007F)"),
            ("a\u{85}b", "a line break (U+0085)"),
            ("a\u{2029}b", "a line break (U+2029)"),
            ("a\u{9b}b", "a control character (U+009B)"),
        ] {
            assert_eq!(
                check_header_text("subject", text).unwrap_err(),
                format!("the subject contains {what}")
            );
        }
        assert!(check_header_text("name", "Ada\tLovelace").is_ok());
        assert!(check_header_text("name", "Zoë O'Brien-Łukasz 李").is_ok());
        assert_eq!(
            customer(
                "c1",
                "ada@example.com",
                Some("Ada\rX"),
                None,
                serde_json::json!({})
            )
            .unwrap_err(),
            "the name contains a line break (CR)"
        );
        assert_eq!(
            check_email("ada@example.com\r\nBcc: x@evil.example").unwrap_err(),
            "the email address contains a line break (CR)"
        );
    }

    #[test]
    fn times_after_the_year_9000_are_refused() {
        assert!(parse_time("9000-12-31T23:59:59Z").is_ok());
        assert_eq!(
            parse_time("9001-01-01").unwrap_err(),
            "9001-01-01T00:00:00Z is after 9000-12-31: times that far ahead are refused"
        );
        assert!(parse_time("9999-12-31T23:59:59+00:00").is_err());
    }

    #[test]
    fn key_value_pairs() {
        let value = key_values(
            &["plan=gold".into(), "n=3".into(), "note=a=b".into()],
            "--attr",
        )
        .unwrap();
        assert_eq!(
            value,
            serde_json::json!({ "plan": "gold", "n": 3, "note": "a=b" })
        );
        assert!(
            key_values(&["novalue".into()], "--attr")
                .unwrap_err()
                .contains("KEY=VALUE")
        );
    }
}
