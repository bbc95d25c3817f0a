//! Ratings from the links in messages: one row per rated message (the last answer counts, a
//! comment once given is kept), written together with the customer's `rated` event so that
//! rules react to it like to any event.

use async_trait::async_trait;

use super::engine::SqlStore;
use super::sql::{Arg, Driver, Sql, Via};
use super::{Event, StoreResult};

/// A message's rating as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rating {
    pub message_id: i64,
    pub customer_id: String,
    pub rule: String,
    /// `"csat"` or `"nps"`.
    pub scale: String,
    pub score: i64,
    pub comment: Option<String>,
}

impl Rating {
    /// The id of the `rated` event a message's rating keeps up to date.
    pub fn event_id(message_id: i64) -> String {
        format!("touchpoint-rating-{message_id}")
    }

    /// The customer's `rated` event: `score`, `scale`, `rule`, `message_id` and, when there is
    /// one, `comment`. It occurred `at` (the first answer; a changed answer keeps the time).
    pub fn event(&self, at: chrono::DateTime<chrono::Utc>) -> Event {
        let mut data = serde_json::json!({
            "score": self.score,
            "scale": self.scale,
            "rule": self.rule,
            "message_id": self.message_id,
        });
        if let Some(comment) = &self.comment {
            data["comment"] = comment.clone().into();
        }
        Event {
            id: Rating::event_id(self.message_id),
            customer_id: self.customer_id.clone(),
            kind: "rated".into(),
            occurred_at: at,
            data,
        }
    }
}

#[async_trait]
pub trait RatingStore: Send + Sync {
    /// Records a message's rating (replacing an earlier answer's score and, if `comment` is
    /// `Some`, its comment) and its `rated` event, in one transaction; returns what is stored.
    async fn record_rating(&self, rating: &Rating) -> StoreResult<Rating>;
    async fn rating(&self, message_id: i64) -> StoreResult<Option<Rating>>;
    /// Rated messages per (rule, scale, score), each counted by its last answer.
    async fn rating_counts(&self) -> StoreResult<Vec<(String, String, i64, i64)>>;
}

const RATING_COLUMNS: &str = "message_id, customer_id, rule, scale, score, comment";

#[async_trait]
impl<D: Driver> RatingStore for SqlStore<D> {
    async fn record_rating(&self, rating: &Rating) -> StoreResult<Rating> {
        // The event carries the comment as stored: the new one, else the one kept (the
        // upsert below keeps it the same way).
        let kept = self.rating(rating.message_id).await?;
        let merged = Rating {
            comment: rating.comment.clone().or(kept.and_then(|k| k.comment)),
            ..rating.clone()
        };
        let upsert = Sql::new(format!(
            "INSERT INTO ratings ({RATING_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (message_id) DO UPDATE SET score = excluded.score, \
             comment = COALESCE(excluded.comment, ratings.comment), \
             answers = ratings.answers + 1, updated_at = {}",
            D::NOW
        ))
        .arg(rating.message_id)
        .arg(rating.customer_id.as_str())
        .arg(rating.rule.as_str())
        .arg(rating.scale.as_str())
        .arg(rating.score)
        .arg(&rating.comment);
        // A changed answer updates the event's data and keeps when it first occurred.
        let event = merged.event(chrono::Utc::now());
        let event_upsert = Sql::new(
            "INSERT INTO events (id, customer_id, kind, occurred_at, data) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET data = excluded.data",
        )
        .arg(event.id.as_str())
        .arg(event.customer_id.as_str())
        .arg(event.kind.as_str())
        .arg(event.occurred_at)
        .arg(Arg::json(&event.data));
        self.driver.execute_all(vec![upsert, event_upsert]).await?;
        Ok(merged)
    }

    async fn rating(&self, message_id: i64) -> StoreResult<Option<Rating>> {
        let sql = Sql::new(format!(
            "SELECT {RATING_COLUMNS} FROM ratings WHERE message_id = ?"
        ))
        .arg(message_id);
        let row: Option<(i64, String, String, String, i64, Option<String>)> =
            self.driver.fetch_optional(Via::Writer, sql).await?;
        Ok(row.map(
            |(message_id, customer_id, rule, scale, score, comment)| Rating {
                message_id,
                customer_id,
                rule,
                scale,
                score,
                comment,
            },
        ))
    }

    async fn rating_counts(&self) -> StoreResult<Vec<(String, String, i64, i64)>> {
        let sql = Sql::new(
            "SELECT rule, scale, score, COUNT(*) FROM ratings GROUP BY rule, scale, score \
             ORDER BY rule, scale, score",
        );
        self.driver.fetch_all(Via::Reader, sql).await
    }
}
