//! The items of an ingest request, checked field by field before anything is written. Values
//! are checked with the CSV import's own functions ([`crate::import`]), so the command line,
//! CSV files and the API accept the same addresses, time zones and times.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::import::{check_email, check_header_text, check_timezone, parse_time};
use crate::store::Event;

/// One mistake: which item of the batch, which of its fields, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The item's index in the batch (0 for a single object); `None` for the request as a whole.
    pub item: Option<usize>,
    /// The field; `None` for the item (or request) as a whole.
    pub field: Option<String>,
    pub message: String,
}

impl Problem {
    pub fn request(message: impl Into<String>) -> Problem {
        Problem {
            item: None,
            field: None,
            message: message.into(),
        }
    }
}

pub const EVENT_FIELDS: [&str; 5] = ["id", "customer_id", "kind", "occurred_at", "data"];
pub const CUSTOMER_FIELDS: [&str; 5] = ["id", "email", "name", "timezone", "attributes"];

/// The patch types live with the store, which merges them into the stored rows.
pub use crate::store::{Change, CustomerPatch};

/// Reads the fields of one item, recording every mistake rather than stopping at the first.
struct Fields<'a> {
    item: usize,
    map: &'a Map<String, Value>,
    problems: &'a mut Vec<Problem>,
}

impl Fields<'_> {
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            item: Some(self.item),
            field: Some(field.to_string()),
            message: message.into(),
        });
    }

    fn unknown_fields(&mut self, known: &[&str]) {
        let unknown: Vec<&String> = self
            .map
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .collect();
        for key in unknown {
            let message = format!("unknown field; expected {}", known.join(", "));
            self.problem(key, message);
        }
    }

    /// A string that must be there and not blank, trimmed.
    fn required(&mut self, field: &str) -> Option<String> {
        match self.map.get(field) {
            None | Some(Value::Null) => self.problem(field, "missing"),
            Some(Value::String(text)) if text.trim().is_empty() => self.problem(field, "empty"),
            Some(Value::String(text)) if text.contains('\0') => self.problem(field, NUL),
            Some(Value::String(text)) => match crate::import::check_key(field, text) {
                Ok(()) => return Some(text.trim().to_string()),
                Err(message) => self.problem(field, message),
            },
            Some(other) => self.problem(field, format!("expected a string, not {}", kind(other))),
        }
        None
    }

    /// An optional string: absent keeps, `null` or blank clears.
    fn change(&mut self, field: &str) -> Change {
        match self.map.get(field) {
            None => Change::Keep,
            Some(Value::Null) => Change::Clear,
            Some(Value::String(text)) if text.trim().is_empty() => Change::Clear,
            Some(Value::String(text)) if text.contains('\0') => {
                self.problem(field, NUL);
                Change::Keep
            }
            Some(Value::String(text)) => Change::Set(text.trim().to_string()),
            Some(other) => {
                self.problem(field, format!("expected a string, not {}", kind(other)));
                Change::Keep
            }
        }
    }

    /// An optional JSON object; absent or `null` is empty.
    fn object(&mut self, field: &str) -> Map<String, Value> {
        match self.map.get(field) {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) if object_has_nul(map) => {
                self.problem(field, NUL);
                Map::new()
            }
            Some(Value::Object(map)) => map.clone(),
            Some(other) => {
                self.problem(field, format!("expected an object, not {}", kind(other)));
                Map::new()
            }
        }
    }
}

/// PostgreSQL keeps no NUL character in text or jsonb; refused on both backends alike, rather
/// than failing at the database.
const NUL: &str = "contains a NUL character (\\u0000)";

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(values) => values.iter().any(has_nul),
        Value::Object(map) => object_has_nul(map),
        _ => false,
    }
}

fn object_has_nul(map: &Map<String, Value>) -> bool {
    map.iter().any(|(k, v)| k.contains('\0') || has_nul(v))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The item's fields, or a problem for an item that is not a JSON object.
fn fields<'a>(
    item: usize,
    value: &'a Value,
    problems: &'a mut Vec<Problem>,
    known: &[&str],
) -> Option<Fields<'a>> {
    let Value::Object(map) = value else {
        problems.push(Problem {
            item: Some(item),
            field: None,
            message: format!(
                "expected an object with {}, not {}",
                known.join(", "),
                kind(value)
            ),
        });
        return None;
    };
    let mut fields = Fields {
        item,
        map,
        problems,
    };
    fields.unknown_fields(known);
    Some(fields)
}

/// One event; `None` when it has a mistake (recorded in `problems`).
fn event(item: usize, value: &Value, problems: &mut Vec<Problem>) -> Option<Event> {
    let mut f = fields(item, value, problems, &EVENT_FIELDS)?;
    let id = f.required("id");
    let customer_id = f.required("customer_id");
    let kind = f.required("kind");
    let occurred_at = f
        .required("occurred_at")
        .and_then(|text| match parse_time(&text) {
            Ok(time) => Some(time),
            Err(message) => {
                f.problem("occurred_at", message);
                None
            }
        });
    let data = f.object("data");
    Some(Event {
        id: id?,
        customer_id: customer_id?,
        kind: kind?,
        occurred_at: occurred_at?,
        data: Value::Object(data),
    })
}

/// One customer; `None` when it has a mistake (recorded in `problems`).
fn customer(item: usize, value: &Value, problems: &mut Vec<Problem>) -> Option<CustomerPatch> {
    let mut f = fields(item, value, problems, &CUSTOMER_FIELDS)?;
    let id = f.required("id");
    let email = f
        .required("email")
        .and_then(|email| match check_email(&email) {
            Ok(()) => Some(email),
            Err(message) => {
                f.problem("email", message);
                None
            }
        });
    let name = f.change("name");
    if let Change::Set(text) = &name
        && let Err(message) = check_header_text("name", text)
    {
        f.problem("name", message);
    }
    let timezone = f.change("timezone");
    if let Change::Set(tz) = &timezone
        && let Err(message) = check_timezone(tz)
    {
        f.problem("timezone", message);
    }
    let attributes = f.object("attributes");
    Some(CustomerPatch {
        id: id?,
        email: email?,
        name,
        timezone,
        attributes,
    })
}

/// The good items and every problem of the batch. An item whose field has a mistake is left
/// out of the first list, so a caller writes only when the second is empty.
fn check_all<T>(
    values: &[Value],
    parse: impl Fn(usize, &Value, &mut Vec<Problem>) -> Option<T>,
    id_of: impl Fn(&T) -> &str,
) -> (Vec<(usize, T)>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut good = Vec::new();
    let mut first_seen: HashMap<String, usize> = HashMap::new();
    for (item, value) in values.iter().enumerate() {
        let known = problems.len();
        let parsed = parse(item, value, &mut problems);
        let Some(parsed) = parsed.filter(|_| problems.len() == known) else {
            continue;
        };
        let id = id_of(&parsed).to_string();
        if let Some(first) = first_seen.get(&id) {
            problems.push(Problem {
                item: Some(item),
                field: Some("id".into()),
                message: format!(
                    "{id:?} is the id of item {first} too; an id may appear once per batch"
                ),
            });
            continue;
        }
        first_seen.insert(id, item);
        good.push((item, parsed));
    }
    (good, problems)
}

/// Events of a batch, with the index of each; and every problem.
pub fn events(values: &[Value]) -> (Vec<(usize, Event)>, Vec<Problem>) {
    check_all(values, event, |e| &e.id)
}

/// Customers of a batch, with the index of each; and every problem.
pub fn customers(values: &[Value]) -> (Vec<(usize, CustomerPatch)>, Vec<Problem>) {
    check_all(values, customer, |c| &c.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Customer;
    use serde_json::json;

    fn fields_of(problems: &[Problem]) -> Vec<(Option<usize>, Option<&str>)> {
        problems
            .iter()
            .map(|p| (p.item, p.field.as_deref()))
            .collect()
    }

    #[test]
    fn a_good_event_reads_with_its_time_in_utc() {
        let (good, problems) = events(&[json!({
            "id": " o-1 ", "customer_id": "c1", "kind": "purchase",
            "occurred_at": "2026-11-23T10:00:00+01:00", "data": {"order": 1}
        })]);
        assert!(problems.is_empty(), "{problems:?}");
        let (index, event) = &good[0];
        assert_eq!(*index, 0);
        assert_eq!(event.id, "o-1");
        assert_eq!(event.occurred_at.to_rfc3339(), "2026-11-23T09:00:00+00:00");
        assert_eq!(event.data, json!({"order": 1}));
    }

    #[test]
    fn every_mistake_of_every_item_is_named() {
        let (good, problems) = events(&[
            json!({"id": "ok", "customer_id": "c1", "kind": "k", "occurred_at": "2026-01-01"}),
            json!({"id": 5, "kind": "", "occurred_at": "yesterday", "data": [1], "extra": 1}),
            json!("not an object"),
        ]);
        assert_eq!(good.len(), 1);
        assert_eq!(
            fields_of(&problems),
            vec![
                (Some(1), Some("extra")),
                (Some(1), Some("id")),
                (Some(1), Some("customer_id")),
                (Some(1), Some("kind")),
                (Some(1), Some("occurred_at")),
                (Some(1), Some("data")),
                (Some(2), None),
            ]
        );
        assert!(problems[4].message.contains("RFC 3339"), "{problems:?}");
    }

    #[test]
    fn nul_characters_are_refused_where_postgresql_would_fail() {
        let (good, problems) = events(&[json!({
            "id": "a\0", "customer_id": "c1", "kind": "k",
            "occurred_at": "2026-01-01", "data": {"note": ["x\0"]}
        })]);
        assert!(good.is_empty());
        assert_eq!(
            fields_of(&problems),
            vec![(Some(0), Some("id")), (Some(0), Some("data"))]
        );
    }

    #[test]
    fn keys_longer_than_the_indexes_take_are_refused() {
        let long = "x".repeat(crate::import::MAX_KEY_BYTES + 1);
        let (good, problems) = events(&[json!({
            "id": long, "customer_id": "c1", "kind": "k", "occurred_at": "2026-01-01"
        })]);
        assert!(good.is_empty());
        assert_eq!(fields_of(&problems), vec![(Some(0), Some("id"))]);
        assert_eq!(
            problems[0].message,
            "the id is 256 bytes long; at most 255 are taken"
        );
    }

    #[test]
    fn customers_are_checked_like_the_csv_import() {
        let (good, problems) = customers(&[
            json!({"id": "c1", "email": "not an address", "timezone": "Mars/Olympus"}),
            json!({"id": "c1", "email": "ada@example.com", "attributes": "gold"}),
            json!({"id": "c2", "email": "grace@example.com"}),
            json!({"id": "c2", "email": "grace@example.org"}),
        ]);
        assert_eq!(good.len(), 1);
        assert_eq!(
            fields_of(&problems),
            vec![
                (Some(0), Some("email")),
                (Some(0), Some("timezone")),
                (Some(1), Some("attributes")),
                (Some(3), Some("id")),
            ]
        );
    }

    #[test]
    fn names_and_addresses_with_line_breaks_are_refused() {
        let (good, problems) = customers(&[
            json!({"id": "c1", "email": "ada@example.com", "name": "Ada\r\nBcc: x@evil.example"}),
            json!({"id": "c2", "email": "bob@example.com\u{1b}"}),
            json!({"id": "c3", "email": "cy@example.com", "name": "Cy\tYoung"}),
        ]);
        assert_eq!(good.len(), 1);
        assert_eq!(
            fields_of(&problems),
            vec![(Some(0), Some("name")), (Some(1), Some("email"))]
        );
        assert_eq!(problems[0].message, "the name contains a line break (CR)");
        let (good, problems) = events(&[json!({
            "id": "e1", "customer_id": "c1", "kind": "k", "occurred_at": "9999-01-01"
        })]);
        assert!(good.is_empty());
        assert_eq!(fields_of(&problems), vec![(Some(0), Some("occurred_at"))]);
    }

    #[test]
    fn a_customer_update_keeps_what_it_does_not_name() {
        let stored = Customer {
            id: "c1".into(),
            email: "old@example.com".into(),
            name: Some("Ada".into()),
            timezone: Some("Europe/London".into()),
            attributes: json!({"plan": "gold", "vip": true, "city": "London"}),
        };
        let (good, problems) = customers(&[json!({
            "id": "c1", "email": "ada@example.com", "timezone": null,
            "attributes": {"plan": "silver", "vip": null}
        })]);
        assert!(problems.is_empty(), "{problems:?}");
        let (_, patch) = good.into_iter().next().expect("one customer");
        let updated = patch.apply(Some(stored));
        assert_eq!(updated.email, "ada@example.com");
        assert_eq!(updated.name.as_deref(), Some("Ada"));
        assert_eq!(updated.timezone, None);
        assert_eq!(
            updated.attributes,
            json!({"plan": "silver", "city": "London"})
        );
    }
}
