//! `touchpoint report` through the real binary on both backends: the daemon sends real
//! messages, `rated` and `replied` events are recorded for them (as the rating page and
//! `touchpoint inbound` record them), and the report's CSAT, NPS, response rates, weeks and
//! latest comments follow from them in every format, with `--since` and `--rule`.

mod support;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use support::{Backend, Sink, TestEnv, eventually, states};
use touchpoint::store::{Event, LogFilter, SharedStore};

const THANK_YOU: &str = r#"[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "1s" }
"#;

/// Sends one thank-you to each of c1, c2, c3; returns their message ids by customer.
async fn send_three(env: &TestEnv, store: &SharedStore) -> Vec<(String, i64)> {
    let now = Utc::now();
    for (id, email) in [
        ("c1", "ada@example.com"),
        ("c2", "bob@example.com"),
        ("c3", "cy@example.com"),
    ] {
        env.add_customer(store, id, email, id, None).await;
        env.add_event(
            store,
            &format!("o-{id}"),
            id,
            "purchase",
            now - TimeDelta::seconds(2),
        )
        .await;
    }
    let daemon = env.start().await;
    let all_sent = eventually(Duration::from_secs(30), || async {
        states(store).await.get("sent") == Some(&3)
    })
    .await;
    daemon.stop().await;
    assert!(all_sent, "{:?}", states(store).await);
    let mut ids: Vec<(String, i64)> = store
        .log(&LogFilter::default())
        .await
        .expect("log")
        .into_iter()
        .map(|e| (e.customer_id, e.id))
        .collect();
    ids.sort();
    ids
}

fn event(id: &str, customer: &str, kind: &str, at: DateTime<Utc>, data: Value) -> Event {
    Event {
        id: id.into(),
        customer_id: customer.into(),
        kind: kind.into(),
        occurred_at: at,
        data,
    }
}

fn rated(id: &str, customer: &str, at: DateTime<Utc>, message: i64, score: i64) -> Event {
    let data = json!({"score": score, "scale": "csat", "rule": "thank-you", "message_id": message});
    event(id, customer, "rated", at, data)
}

fn report(env: &TestEnv, args: &[&str]) -> String {
    let (ok, stdout, stderr) = env.run_cli(&[&["report"], args].concat());
    assert!(ok, "report {args:?} failed: {stderr}");
    stdout
}

fn report_json(env: &TestEnv, args: &[&str]) -> Value {
    let text = report(env, &[args, &["--format", "json"]].concat());
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

async fn report_shows_ratings_and_replies(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    let store = env.store().await;
    let ids = send_three(&env, &store).await;
    let (m1, m2, m3) = (ids[0].1, ids[1].1, ids[2].1);
    let now = Utc::now();
    let mut changed = rated("r1b", "c1", now - TimeDelta::minutes(1), m1, 5);
    changed.data["comment"] = json!("Lovely flowers");
    store
        .insert_events(&[
            // c1 first chose 2, then changed it to 5 with a comment: the 5 counts.
            rated("r1a", "c1", now - TimeDelta::minutes(2), m1, 2),
            changed,
            rated("r2", "c2", now - TimeDelta::minutes(3), m2, 3),
            // Older than the default 30 days.
            rated("r3", "c3", now - TimeDelta::days(40), m3, 1),
            // Outside the scale: not counted.
            rated("r4", "c3", now - TimeDelta::minutes(4), m3 + 1000, 9),
            event("p1", "c3", "replied", now - TimeDelta::minutes(5),
                json!({"rule": "thank-you", "message_id": m3, "snippet": "See you next week"})),
            event("p2", "c2", "replied", now - TimeDelta::minutes(6),
                json!({"rule": "thank-you", "message_id": m2, "snippet": "I am away", "auto": true})),
        ])
        .await
        .expect("insert events");

    let json = report_json(&env, &[]);
    let rule = &json["rules"][0];
    assert_eq!(rule["rule"], "thank-you", "{json:#}");
    assert_eq!(rule["sent"], 3);
    assert_eq!(rule["rated"], 2);
    assert_eq!(rule["csat_answers"], 2);
    assert_eq!(rule["csat"], 50.0);
    assert_eq!(rule["nps"], Value::Null);
    assert_eq!(rule["replied"], 1);
    assert_eq!(rule["rating_rate"], 66.7);
    assert_eq!(rule["reply_rate"], 33.3);
    assert_eq!(json["total"]["csat"], 50.0);
    assert_eq!(json["weeks"].as_array().map(Vec::len), Some(1), "{json:#}");
    let latest: Vec<(&str, &str)> = json["latest"]
        .as_array()
        .expect("latest")
        .iter()
        .map(|v| {
            (
                v["kind"].as_str().unwrap_or(""),
                v["text"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        latest,
        vec![
            ("rated", "Lovely flowers"),
            ("replied", "See you next week")
        ]
    );

    // A longer period takes in c3's old 1: three CSAT answers (5, 3, 1), one of them happy.
    let longer = report_json(&env, &["--since", "60d"]);
    assert_eq!(longer["total"]["csat_answers"], 3, "{longer:#}");
    assert_eq!(longer["total"]["csat"], 33.3);

    let other = report_json(&env, &["--rule", "follow-up"]);
    assert_eq!(other["rules"], json!([]), "{other:#}");
    assert_eq!(other["total"]["sent"], 0);

    let csv = report(&env, &["--format", "csv"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines,
        vec![
            "rule,sent,rated,rating_rate,csat,csat_answers,nps,nps_answers,replied,reply_rate",
            "thank-you,3,2,66.7,50,2,,0,1,33.3",
            "all,3,2,66.7,50,2,,0,1,33.3",
        ],
        "{csv}"
    );

    let table = report(&env, &[]);
    assert!(table.contains("Lovely flowers"), "{table}");
    assert!(table.contains("See you next week"), "{table}");
    assert!(!table.contains("I am away"), "{table}");
}

async fn report_refuses_a_bad_period(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    env.store().await;
    let (ok, stdout, stderr) = env.run_cli(&["report", "--since", "a month"]);
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("--since"), "{stderr}");
    let empty = report(&env, &[]);
    assert!(
        empty.contains("nothing was sent, rated or answered"),
        "{empty}"
    );
}

on_both_backends!(
    report_shows_ratings_and_replies,
    report_refuses_a_bad_period
);
