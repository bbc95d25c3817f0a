//! [`MessageDetail`]: what planning fixes about a message and the send path reads back, kept
//! in the `messages.detail` column as JSON.
//!
//! The JSON shape is the one touchpoint has always written (`{}`, `{"years": 5}`,
//! `{"source": ..., "query": ..., "occurred_at": ...}`), and reading is lenient: a field of the
//! wrong type, or one this version does not know, is ignored rather than making the row
//! unreadable, as the untyped reading before it did.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Facts fixed at planning that the guard, the renderer and `preview` read (the message page does
/// not show them yet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MessageDetail {
    /// Whole years since the original event, for anniversaries (`{{years}}` in templates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub years: Option<i32>,
    /// Where the triggering event lives, for a message planned from a source.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceEvent>,
}

/// A message planned from a source event: where to read the event again at send time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceEvent {
    /// The source's name (`[[source]]`).
    pub source: String,
    /// The name of the source's event query that returned the event.
    pub query: String,
    /// When the event occurred, to find it again cheaply.
    pub occurred_at: Option<DateTime<Utc>>,
}

impl MessageDetail {
    /// The detail of an anniversary occurrence.
    pub fn anniversary(years: i32) -> Self {
        MessageDetail {
            years: Some(years),
            source: None,
        }
    }

    /// The detail of a message planned from a source event.
    pub fn from_source(source: &str, query: &str, occurred_at: DateTime<Utc>) -> Self {
        MessageDetail {
            years: None,
            source: Some(SourceEvent {
                source: source.to_string(),
                query: query.to_string(),
                occurred_at: Some(occurred_at),
            }),
        }
    }

    /// Reads a stored detail; never fails (see the module comment).
    pub fn from_json(value: &Value) -> Self {
        let years = value
            .get("years")
            .and_then(Value::as_i64)
            .and_then(|y| i32::try_from(y).ok());
        let source = value
            .get("source")
            .and_then(Value::as_str)
            .map(|source| SourceEvent {
                source: source.to_string(),
                query: value
                    .get("query")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                occurred_at: value
                    .get("occurred_at")
                    .and_then(|v| serde_json::from_value(v.clone()).ok()),
            });
        MessageDetail { years, source }
    }

    /// The JSON kept in `messages.detail`.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|_| Value::Object(Default::default()))
    }
}

impl<'de> Deserialize<'de> for MessageDetail {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(|value| MessageDetail::from_json(&value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_json_shapes_written_before_read_back_and_are_written_the_same() {
        let at: DateTime<Utc> = "2026-03-01T10:00:00Z".parse().unwrap();
        let shapes = [
            (json!({}), MessageDetail::default()),
            (json!({ "years": 5 }), MessageDetail::anniversary(5)),
            (
                json!({ "source": "shop", "query": "orders", "occurred_at": at }),
                MessageDetail::from_source("shop", "orders", at),
            ),
        ];
        for (stored, typed) in shapes {
            assert_eq!(MessageDetail::from_json(&stored), typed);
            assert_eq!(typed.to_json(), stored);
            let parsed: MessageDetail = serde_json::from_value(stored.clone()).unwrap();
            assert_eq!(parsed, typed);
        }
    }

    #[test]
    fn odd_stored_values_are_ignored_not_fatal() {
        let odd = json!({ "years": "five", "source": "shop", "occurred_at": 12, "extra": true });
        let detail = MessageDetail::from_json(&odd);
        assert_eq!(detail.years, None);
        let source = detail.source.unwrap();
        assert_eq!(
            (source.source.as_str(), source.query.as_str()),
            ("shop", "")
        );
        assert_eq!(source.occurred_at, None);
        assert_eq!(
            MessageDetail::from_json(&Value::Null),
            MessageDetail::default()
        );
    }
}
