//! How customers answered: CSAT and NPS per rule and by week, response rates (ratings and
//! replies per message sent) and the latest comments and replies. Read from the `rated` and
//! `replied` events and the sent messages; `touchpoint report` prints it (and the owner's page
//! can show the same figures).
//!
//! Only the last rating per message counts (a customer may change their score); auto-replies
//! are not replies; a rating whose score is outside its scale is ignored rather than counted.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Utc};
use serde::Serialize;

use crate::store::{Event, SharedStore, StoreError};

/// How many comments and replies the report lists.
pub const LATEST: usize = 10;

/// The figures for one rule (or all rules, or one week).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Messages sent in the period (0 for a week: rates are per rule).
    pub sent: i64,
    /// Messages rated (the last answer per message).
    pub rated: i64,
    /// Messages that got a reply (auto-replies not counted).
    pub replied: i64,
    pub csat_answers: i64,
    /// Share of CSAT answers that were 4 or 5, in percent.
    pub csat: Option<f64>,
    pub nps_answers: i64,
    /// Promoters (9–10) minus detractors (0–6), in percent of NPS answers.
    pub nps: Option<f64>,
    /// Ratings per message sent, in percent.
    pub rating_rate: Option<f64>,
    /// Replies per message sent, in percent.
    pub reply_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleFigures {
    pub rule: String,
    #[serde(flatten)]
    pub figures: Figures,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WeekFigures {
    /// The Monday the week starts on (UTC).
    pub week: NaiveDate,
    #[serde(flatten)]
    pub figures: Figures,
}

/// A comment left with a rating, or a reply.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Voice {
    /// `rated` or `replied`.
    pub kind: String,
    pub at: DateTime<Utc>,
    pub customer_id: String,
    pub rule: Option<String>,
    pub message_id: Option<i64>,
    /// The score, for a rating.
    pub score: Option<i64>,
    pub scale: Option<String>,
    /// The comment or the reply's snippet.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Experience {
    pub since: DateTime<Utc>,
    pub rule: Option<String>,
    pub rules: Vec<RuleFigures>,
    pub total: Figures,
    pub weeks: Vec<WeekFigures>,
    /// Newest first, at most [`LATEST`].
    pub latest: Vec<Voice>,
}

/// A rating as the `rated` event's data has it.
#[derive(Debug, Clone)]
struct Rating {
    at: DateTime<Utc>,
    customer_id: String,
    rule: String,
    message_id: Option<i64>,
    scale: Scale,
    score: i64,
    comment: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scale {
    Csat,
    Nps,
}

impl Scale {
    fn parse(text: &str) -> Option<Scale> {
        match text {
            "csat" => Some(Scale::Csat),
            "nps" => Some(Scale::Nps),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scale::Csat => "csat",
            Scale::Nps => "nps",
        }
    }

    fn range(self) -> std::ops::RangeInclusive<i64> {
        match self {
            Scale::Csat => 1..=5,
            Scale::Nps => 0..=10,
        }
    }
}

/// A reply as the `replied` event's data has it.
#[derive(Debug, Clone)]
struct Reply {
    event_id: String,
    at: DateTime<Utc>,
    customer_id: String,
    rule: Option<String>,
    message_id: Option<i64>,
    snippet: String,
}

/// Counts from which [`Figures`] are made.
#[derive(Debug, Clone, Default)]
struct Tally {
    sent: i64,
    replied: i64,
    csat_answers: i64,
    csat_happy: i64,
    nps_answers: i64,
    promoters: i64,
    detractors: i64,
}

impl Tally {
    fn add_rating(&mut self, rating: &Rating) {
        match rating.scale {
            Scale::Csat => {
                self.csat_answers += 1;
                self.csat_happy += i64::from(rating.score >= 4);
            }
            Scale::Nps => {
                self.nps_answers += 1;
                self.promoters += i64::from(rating.score >= 9);
                self.detractors += i64::from(rating.score <= 6);
            }
        }
    }

    fn figures(&self) -> Figures {
        let rated = self.csat_answers + self.nps_answers;
        Figures {
            sent: self.sent,
            rated,
            replied: self.replied,
            csat_answers: self.csat_answers,
            csat: percent(self.csat_happy, self.csat_answers),
            nps_answers: self.nps_answers,
            nps: percent(self.promoters - self.detractors, self.nps_answers),
            rating_rate: percent(rated, self.sent),
            reply_rate: percent(self.replied, self.sent),
        }
    }
}

fn percent(part: i64, whole: i64) -> Option<f64> {
    (whole > 0).then(|| (part as f64 * 1000.0 / whole as f64).round() / 10.0)
}

/// The experience since `since`, for one rule or all.
pub async fn experience(
    store: &SharedStore,
    since: DateTime<Utc>,
    rule: Option<&str>,
) -> Result<Experience, StoreError> {
    let wanted = |name: Option<&str>| rule.is_none() || name == rule;
    let sent: Vec<(String, i64)> = store
        .sent_per_rule(since)
        .await?
        .into_iter()
        // The owner's digest is no message to a customer: it asks for nothing.
        .filter(|(name, _)| wanted(Some(name)) && name != crate::rules::DIGEST_RULE)
        .collect();
    let ratings: Vec<Rating> = last_per_message(store.events_of_kind_since("rated", since).await?)
        .into_iter()
        .filter(|r| wanted(Some(&r.rule)))
        .collect();
    let replies: Vec<Reply> =
        first_per_message(store.events_of_kind_since("replied", since).await?)
            .into_iter()
            .filter(|r| wanted(r.rule.as_deref()))
            .collect();
    Ok(Experience {
        since,
        rule: rule.map(str::to_string),
        rules: per_rule(&sent, &ratings, &replies),
        total: total(&sent, &ratings, &replies),
        weeks: per_week(&ratings, &replies),
        latest: latest(&ratings, &replies),
    })
}

/// The ratings, the last answer per message winning (events come oldest first).
fn last_per_message(events: Vec<Event>) -> Vec<Rating> {
    let mut by_message: HashMap<String, Rating> = HashMap::new();
    for event in events {
        if let Some(rating) = rating_of(&event) {
            let key = match rating.message_id {
                Some(id) => format!("m{id}"),
                None => format!("e{}", event.id),
            };
            by_message.insert(key, rating);
        }
    }
    let mut ratings: Vec<Rating> = by_message.into_values().collect();
    ratings.sort_by_key(|r| r.at);
    ratings
}

fn rating_of(event: &Event) -> Option<Rating> {
    let data = &event.data;
    let scale = Scale::parse(data.get("scale")?.as_str()?)?;
    let score = data.get("score")?.as_i64()?;
    if !scale.range().contains(&score) {
        tracing::debug!(event = %event.id, score, "a rating outside its scale is not counted");
        return None;
    }
    Some(Rating {
        at: event.occurred_at,
        customer_id: event.customer_id.clone(),
        rule: data.get("rule")?.as_str()?.to_string(),
        message_id: data.get("message_id").and_then(serde_json::Value::as_i64),
        scale,
        score,
        comment: text_field(data, "comment"),
    })
}

/// The replies (auto-replies left out), one per message: a second reply to the same message
/// does not raise the reply rate.
fn first_per_message(events: Vec<Event>) -> Vec<Reply> {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .filter(|e| e.data.get("auto").and_then(serde_json::Value::as_bool) != Some(true))
        .map(|e| Reply {
            event_id: e.id.clone(),
            at: e.occurred_at,
            customer_id: e.customer_id.clone(),
            rule: text_field(&e.data, "rule"),
            message_id: e.data.get("message_id").and_then(serde_json::Value::as_i64),
            snippet: text_field(&e.data, "snippet").unwrap_or_default(),
        })
        .filter(|r| match r.message_id {
            Some(id) => seen.insert(format!("m{id}")),
            None => seen.insert(format!("e{}", r.event_id)),
        })
        .collect()
}

fn text_field(data: &serde_json::Value, key: &str) -> Option<String> {
    data.get(key)
        .and_then(serde_json::Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn per_rule(sent: &[(String, i64)], ratings: &[Rating], replies: &[Reply]) -> Vec<RuleFigures> {
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    for (rule, count) in sent {
        tallies.entry(rule.clone()).or_default().sent += count;
    }
    for rating in ratings {
        tallies
            .entry(rating.rule.clone())
            .or_default()
            .add_rating(rating);
    }
    for reply in replies {
        if let Some(rule) = &reply.rule {
            tallies.entry(rule.clone()).or_default().replied += 1;
        }
    }
    tallies
        .into_iter()
        .map(|(rule, tally)| RuleFigures {
            rule,
            figures: tally.figures(),
        })
        .collect()
}

fn total(sent: &[(String, i64)], ratings: &[Rating], replies: &[Reply]) -> Figures {
    let mut tally = Tally {
        sent: sent.iter().map(|(_, count)| count).sum(),
        replied: replies.len() as i64,
        ..Tally::default()
    };
    ratings.iter().for_each(|r| tally.add_rating(r));
    tally.figures()
}

/// The Monday (UTC) of the week `at` falls in.
fn week_of(at: DateTime<Utc>) -> NaiveDate {
    let day = at.date_naive();
    day - TimeDelta::days(i64::from(day.weekday().num_days_from_monday()))
}

fn per_week(ratings: &[Rating], replies: &[Reply]) -> Vec<WeekFigures> {
    let mut tallies: BTreeMap<NaiveDate, Tally> = BTreeMap::new();
    for rating in ratings {
        tallies
            .entry(week_of(rating.at))
            .or_default()
            .add_rating(rating);
    }
    for reply in replies {
        tallies.entry(week_of(reply.at)).or_default().replied += 1;
    }
    tallies
        .into_iter()
        .map(|(week, tally)| WeekFigures {
            week,
            figures: tally.figures(),
        })
        .collect()
}

fn latest(ratings: &[Rating], replies: &[Reply]) -> Vec<Voice> {
    let comments = ratings.iter().filter_map(|r| {
        Some(Voice {
            kind: "rated".into(),
            at: r.at,
            customer_id: r.customer_id.clone(),
            rule: Some(r.rule.clone()),
            message_id: r.message_id,
            score: Some(r.score),
            scale: Some(r.scale.name().into()),
            text: r.comment.clone()?,
        })
    });
    let answers = replies.iter().map(|r| Voice {
        kind: "replied".into(),
        at: r.at,
        customer_id: r.customer_id.clone(),
        rule: r.rule.clone(),
        message_id: r.message_id,
        score: None,
        scale: None,
        text: r.snippet.clone(),
    });
    let mut voices: Vec<Voice> = comments.chain(answers).collect();
    voices.sort_by_key(|v| std::cmp::Reverse(v.at));
    voices.truncate(LATEST);
    voices
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(id: &str, minutes: i64, kind: &str, data: serde_json::Value) -> Event {
        Event {
            id: id.into(),
            customer_id: "c1".into(),
            kind: kind.into(),
            occurred_at: DateTime::UNIX_EPOCH + TimeDelta::minutes(minutes),
            data,
        }
    }

    fn rated(id: &str, minutes: i64, message: i64, scale: &str, score: i64) -> Event {
        let data = json!({"score": score, "scale": scale, "rule": "thanks", "message_id": message});
        event(id, minutes, "rated", data)
    }

    #[test]
    fn the_last_rating_per_message_counts_and_out_of_range_is_ignored() {
        let ratings = last_per_message(vec![
            rated("a", 1, 7, "csat", 1),
            rated("b", 2, 7, "csat", 5),
            rated("c", 3, 8, "csat", 9),
            rated("d", 4, 9, "nps", 10),
        ]);
        let scores: Vec<(Option<i64>, i64)> =
            ratings.iter().map(|r| (r.message_id, r.score)).collect();
        assert_eq!(scores, vec![(Some(7), 5), (Some(9), 10)]);
    }

    #[test]
    fn csat_is_the_share_of_four_and_five_and_nps_promoters_minus_detractors() {
        let ratings = last_per_message(vec![
            rated("a", 1, 1, "csat", 5),
            rated("b", 2, 2, "csat", 4),
            rated("c", 3, 3, "csat", 3),
            rated("d", 4, 4, "nps", 10),
            rated("e", 5, 5, "nps", 8),
            rated("f", 6, 6, "nps", 6),
            rated("g", 7, 7, "nps", 0),
        ]);
        let figures = total(&[("thanks".into(), 10)], &ratings, &[]);
        assert_eq!(figures.csat, Some(66.7));
        assert_eq!(figures.nps, Some(-25.0));
        assert_eq!(figures.rating_rate, Some(70.0));
        assert_eq!(figures.reply_rate, Some(0.0));
    }

    #[test]
    fn auto_replies_and_second_replies_to_one_message_are_not_counted() {
        let replies = first_per_message(vec![
            event(
                "r1",
                1,
                "replied",
                json!({"rule": "thanks", "message_id": 3, "snippet": "hi"}),
            ),
            event(
                "r2",
                2,
                "replied",
                json!({"rule": "thanks", "message_id": 3, "snippet": "again"}),
            ),
            event(
                "r3",
                3,
                "replied",
                json!({"rule": "thanks", "message_id": 4, "snippet": "away", "auto": true}),
            ),
            event("r4", 4, "replied", json!({"snippet": "no message"})),
        ]);
        let snippets: Vec<&str> = replies.iter().map(|r| r.snippet.as_str()).collect();
        assert_eq!(snippets, vec!["hi", "no message"]);
    }

    #[test]
    fn weeks_start_on_monday() {
        // 1970-01-01 was a Thursday.
        assert_eq!(
            week_of(DateTime::UNIX_EPOCH),
            NaiveDate::from_ymd_opt(1969, 12, 29).expect("date")
        );
    }
}
