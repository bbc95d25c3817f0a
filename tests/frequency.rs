//! Frequency limits and priorities with the real daemon, a real database (both backends) and a
//! real SMTP peer: a message outranked by a higher-priority one waits for it, then is held back
//! by the limit (skipped when that is past its expiry, kept waiting when it is not), a rule that
//! ignores the limit goes at once, and `plan` shows what is held back and until when. (Replicas
//! and kill -9 are in `crash.rs`; what the store counts in `store_conformance.rs`.)

mod support;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use support::smtp::SmtpPeer;
use support::{Backend, Sink, TestEnv, eventually};
use touchpoint::store::{LogEntry, LogFilter, MessageState, SharedStore};

/// In file order, so one planning pass writes them in this order. The purchase is a minute old:
/// `vip` is due 4 s from now, the others at once.
const RULES: &str = r#"
[[rule]]
name = "vip"
template = "thank-you"
subject = "A note for you, {{customer.first_name}}"
when = { event = "purchase", after = "64s" }
priority = 10

[[rule]]
name = "low"
template = "thank-you"
subject = "Thank you, {{customer.first_name}}"
when = { event = "purchase", after = "0s" }

[[rule]]
name = "patient"
template = "thank-you"
subject = "Still thinking of you, {{customer.first_name}}"
when = { event = "purchase", after = "0s" }
expire_after = "3d"

[[rule]]
name = "receipt"
template = "thank-you"
subject = "Your receipt, {{customer.first_name}}"
when = { event = "purchase", after = "0s" }
ignore_frequency_limit = true
"#;

const LIMIT: &str = r#"
[defaults]
expire_after = "1h"
frequency_limit = { max = 1, per = "1d" }
"#;

async fn message_of(store: &SharedStore, rule: &str) -> Option<LogEntry> {
    let filter = LogFilter {
        rule: Some(rule.into()),
        ..LogFilter::default()
    };
    store.log(&filter).await.ok()?.into_iter().next()
}

async fn frequency_limit_and_priority(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("rules.toml", RULES)], LIMIT).await;
    let store = env.store().await;
    env.add_customer(&store, "c1", "ada@example.com", "Ada", None)
        .await;
    let bought = Utc::now() - TimeDelta::minutes(1);
    env.add_event(&store, "order-1", "c1", "purchase", bought)
        .await;
    let daemon = env.start().await;

    // The receipt goes at once; the two due now yield to `vip`, due in a few seconds.
    let settled = eventually(Duration::from_secs(40), || async {
        let low = message_of(&store, "low").await;
        low.is_some_and(|m| m.state == MessageState::Skipped)
    })
    .await;
    let vip = message_of(&store, "vip").await.expect("vip planned");
    let low = message_of(&store, "low").await.expect("low planned");
    let patient = message_of(&store, "patient")
        .await
        .expect("patient planned");
    let receipt = message_of(&store, "receipt")
        .await
        .expect("receipt planned");
    assert!(settled, "low: {low:?}");
    assert_eq!(vip.state, MessageState::Sent, "{vip:?}");
    assert_eq!(receipt.state, MessageState::Sent, "{receipt:?}");
    let vip_sent: DateTime<Utc> = vip.sent_at.expect("sent_at");
    assert!(
        receipt.sent_at.expect("sent_at") < vip_sent,
        "the receipt did not wait"
    );
    assert!(vip_sent >= vip.due_at, "vip went when due");
    // low would have to wait a day, past its hour of expiry.
    let reason = low.reason.as_deref().unwrap_or_default();
    assert!(
        reason.starts_with("expired: held back by the frequency limit"),
        "{reason}"
    );
    // patient may wait three days: it waits until a day after vip went.
    assert_eq!(patient.state, MessageState::Scheduled, "{patient:?}");
    let reason = patient.reason.as_deref().unwrap_or_default();
    assert!(
        reason.starts_with("held back by the frequency limit"),
        "{reason}"
    );
    let free = vip_sent + TimeDelta::days(1);
    let off = (patient.next_attempt_at - free).num_seconds().abs();
    assert!(
        off <= 2,
        "patient waits until {} not {free}",
        patient.next_attempt_at
    );
    // What the peer took: the receipt and vip, no more.
    let mut subjects: Vec<String> = peer
        .accepted()
        .iter()
        .map(|m| {
            let data = String::from_utf8_lossy(&m.data).into_owned();
            let subject = data.lines().find(|l| l.starts_with("Subject: "));
            subject.unwrap_or_default().to_string()
        })
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        ["Subject: A note for you, Ada", "Subject: Your receipt, Ada"]
    );
    // The owner's Upcoming page (from this machine, no password) shows it held back.
    let page = support::http::get(daemon.http, "/upcoming", &[]).await;
    assert_eq!(page.status, 200, "{}", page.text());
    let html = page.text();
    let row = html
        .split("<tr")
        .find(|row| row.contains("patient"))
        .unwrap_or_default();
    assert!(row.contains("held back by the frequency limit"), "{html}");
    daemon.stop().await;

    // `plan` shows patient held back, due when the limit lets it go.
    let (ok, out, err) = env.run_cli(&["plan", "--days", "2", "--format", "json"]);
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("plan JSON");
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["rule"], "patient");
    let status = rows[0]["status"].as_str().unwrap_or_default();
    assert!(
        status.starts_with("scheduled: held back by the frequency limit"),
        "{status}"
    );
    let due: DateTime<Utc> = rows[0]["due_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(due, patient.next_attempt_at);
}

/// What `plan` forecasts before anything is sent: of two messages due at once to one customer,
/// the higher priority first and the other a day later.
async fn plan_forecasts_the_limit(backend: Backend) {
    let rules = r#"
[[rule]]
name = "first"
template = "thank-you"
subject = "Hi"
when = { event = "purchase", after = "1h" }

[[rule]]
name = "second"
template = "thank-you"
subject = "Hi"
when = { event = "purchase", after = "1h" }
priority = 3

[[rule]]
name = "alert"
template = "thank-you"
subject = "Hi"
when = { event = "purchase", after = "1h" }
ignore_frequency_limit = true
"#;
    let limit = "[defaults]\nfrequency_limit = { max = 1, per = \"1d\" }\nexpire_after = \"3d\"\n";
    let env = TestEnv::new(backend, Sink::Files, &[("rules.toml", rules)], limit).await;
    let store = env.store().await;
    env.add_customer(&store, "c1", "ada@example.com", "Ada", None)
        .await;
    let bought = Utc::now() - TimeDelta::minutes(1);
    env.add_event(&store, "order-1", "c1", "purchase", bought)
        .await;
    let (ok, out, err) = env.run_cli(&["plan", "--format", "json"]);
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("plan JSON");
    let rows: Vec<(String, String, String)> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["rule"].as_str().unwrap_or_default().to_string(),
                r["due_at"].as_str().unwrap_or_default().to_string(),
                r["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let due = bought + TimeDelta::hours(1);
    assert_eq!(rows.len(), 3, "{rows:#?}");
    assert_eq!(
        (rows[0].0.as_str(), rows[1].0.as_str()),
        ("alert", "second"),
        "{rows:#?}"
    );
    assert_eq!(rows[2].0, "first", "{rows:#?}");
    assert!(
        rows[2]
            .2
            .starts_with("not yet planned: held back by the frequency limit until"),
        "{rows:#?}"
    );
    let first_due: DateTime<Utc> = rows[2].1.parse().expect("time");
    // The event's time is stored to the millisecond (SQLite) or microsecond.
    let off = (first_due - (due + TimeDelta::days(1)))
        .num_milliseconds()
        .abs();
    assert!(
        off < 1000,
        "{rows:#?}: first due {first_due}, a day after {due}"
    );
}

on_both_backends!(frequency_limit_and_priority, plan_forecasts_the_limit);
