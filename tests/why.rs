//! `touchpoint why`: the real binary, on both backends, names the check that decided each
//! rule for a customer, with the facts behind it; and what happened while an address was
//! suppressed stays unsent after it is allowed again.

mod support;

use std::time::Duration;

use chrono::{Datelike, TimeDelta, Utc};
use serde_json::Value;
use support::{Backend, Sink, TestEnv};
use touchpoint::store::{Customer, LogFilter, MessageState, SharedStore};

/// A window that opens only tomorrow (UTC), so a message triggered now waits for it.
fn rules() -> String {
    let tomorrow = (Utc::now() + TimeDelta::days(1)).weekday();
    let day = tomorrow.to_string().to_lowercase();
    format!(
        r#"
[[rule]]
name = "follow-up"
template = "thank-you"
subject = "How did the call go?"
when = {{ event = "call", after = "2d" }}
unless = [{{ event = "purchase", since = "trigger" }}]
expire_after = "3d"

[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you"
when = {{ event = "purchase", after = "0s" }}

[[rule]]
name = "vip"
template = "thank-you"
subject = "For our gold customers"
when = {{ event = "purchase", after = "30d" }}
only_if = [{{ attribute = "plan", equals = "gold" }}]

[[rule]]
name = "windowed"
template = "thank-you"
subject = "Welcome"
when = {{ event = "signup", after = "0s" }}
send_window = {{ from = "00:00", to = "23:59", days = ["{day}"] }}
expire_after = "3d"

[[rule]]
name = "later"
template = "thank-you"
subject = "A month with us"
when = {{ event = "signup", after = "30d" }}
"#
    )
}

async fn customer(store: &SharedStore, id: &str, plan: Option<&str>) {
    let attributes = match plan {
        Some(plan) => serde_json::json!({ "plan": plan }),
        None => serde_json::json!({}),
    };
    let customer = Customer {
        id: id.into(),
        email: format!("{id}@example.com"),
        name: Some(id.to_uppercase()),
        timezone: Some("UTC".into()),
        attributes,
    };
    store.upsert_customers(&[customer]).await.expect("customer");
}

/// `touchpoint why --format json` for one rule: the answer's object.
fn why(env: &TestEnv, customer: &str, rule: &str) -> Value {
    let (ok, out, err) = env.run_cli(&[
        "why",
        "--customer",
        customer,
        "--rule",
        rule,
        "--format",
        "json",
    ]);
    assert!(ok, "why {customer} {rule}: {err}");
    let rows: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{out}");
    rows[0].clone()
}

fn reason(answer: &Value) -> &str {
    answer["reason"].as_str().unwrap_or_default()
}

fn says(answer: &Value) -> &str {
    answer["says"].as_str().unwrap_or_default()
}

/// Every reason `why` gives, each for a customer set up to meet it, after the daemon has
/// planned and sent what it would.
async fn why_names_the_check_that_decided(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("rules.toml", &rules())], "").await;
    let store = env.store().await;
    let now = Utc::now();
    for (id, plan) in [
        ("nobody", None),
        ("old", None),
        ("bob", None),
        ("silver", Some("silver")),
        ("blocked", None),
        ("gone", None),
        ("win", None),
        ("sent", None),
        ("gap", None),
    ] {
        customer(&store, id, plan).await;
    }
    env.add_event(&store, "old-call", "old", "call", now - TimeDelta::days(30))
        .await;
    let call_at = now - TimeDelta::hours(5);
    let bought_at = now - TimeDelta::hours(3);
    env.add_event(&store, "bob-call", "bob", "call", call_at)
        .await;
    env.add_event(&store, "bob-buy", "bob", "purchase", bought_at)
        .await;
    env.add_event(&store, "silver-buy", "silver", "purchase", now)
        .await;
    let (ok, _, err) = env.run_cli(&[
        "suppress",
        "add",
        "blocked@example.com",
        "--reason",
        "asked by phone",
    ]);
    assert!(ok, "{err}");
    env.add_event(&store, "blocked-buy", "blocked", "purchase", now)
        .await;
    store
        .suppress(
            "gone@example.com",
            "unsubscribed with the link",
            "unsubscribe",
        )
        .await
        .unwrap();
    env.add_event(&store, "gone-buy", "gone", "purchase", now)
        .await;
    env.add_event(&store, "win-signup", "win", "signup", now)
        .await;
    env.add_event(&store, "sent-buy", "sent", "purchase", now)
        .await;

    // An event while the address is suppressed, then the address is allowed again.
    assert!(
        env.run_cli(&["suppress", "add", "gap@example.com", "--reason", "bounced"])
            .0
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    env.add_event(&store, "gap-buy", "gap", "purchase", Utc::now())
        .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(env.run_cli(&["suppress", "remove", "gap@example.com"]).0);

    let daemon = env.start().await;
    let sent = support::eventually(Duration::from_secs(30), || async {
        let log = store.log(&LogFilter::default()).await.unwrap();
        let sent = log
            .iter()
            .any(|m| m.customer_id == "sent" && m.state == MessageState::Sent);
        let later = log
            .iter()
            .any(|m| m.customer_id == "win" && m.rule == "later");
        sent && later
    })
    .await;
    // Two more planning passes (every second), for anything late to show up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    daemon.stop().await;
    assert!(sent, "{:?}", support::states(&store).await);
    let log = store.log(&LogFilter::default()).await.unwrap();
    assert!(
        !log.iter().any(|m| m.customer_id == "gap"),
        "an event from the suppressed period became a message: {log:?}"
    );

    let answer = why(&env, "nobody", "follow-up");
    assert_eq!(reason(&answer), "no_triggering_event", "{answer}");
    assert!(says(&answer).contains("no \"call\" event"), "{answer}");
    assert_eq!(answer["applies"], false);

    let answer = why(&env, "old", "follow-up");
    assert_eq!(reason(&answer), "event_too_old", "{answer}");
    assert_eq!(answer["event"]["id"], "old-call");

    let answer = why(&env, "bob", "follow-up");
    assert_eq!(reason(&answer), "unless", "{answer}");
    assert_eq!(answer["matched"]["id"], "bob-buy", "{answer}");
    assert_eq!(answer["trigger"]["id"], "bob-call", "{answer}");
    let bought = touchpoint::output::when(Some(bought_at));
    assert!(
        says(&answer).contains(&bought[..16]),
        "{bought} in {answer}"
    );
    let failed: Vec<&Value> = answer["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "failed")
        .collect();
    assert_eq!(failed.len(), 1, "{answer}");
    assert!(failed[0]["check"].as_str().unwrap().starts_with("unless"));

    let answer = why(&env, "silver", "vip");
    assert_eq!(reason(&answer), "only_if", "{answer}");
    assert_eq!(answer["attribute"], "plan");
    assert_eq!(answer["value"], "silver");

    let answer = why(&env, "blocked", "thank-you");
    assert_eq!(reason(&answer), "suppressed", "{answer}");
    assert_eq!(answer["suppression"]["reason"], "asked by phone");
    assert!(answer["suppression"]["since"].is_string(), "{answer}");

    let answer = why(&env, "gone", "thank-you");
    assert_eq!(reason(&answer), "unsubscribed", "{answer}");

    let answer = why(&env, "gap", "thank-you");
    assert_eq!(reason(&answer), "suppressed_at_event", "{answer}");
    assert_eq!(answer["suppression"]["reason"], "bounced");
    assert!(answer["suppression"]["until"].is_string(), "{answer}");

    let answer = why(&env, "win", "windowed");
    assert_eq!(reason(&answer), "outside_window", "{answer}");
    assert_eq!(answer["applies"], true);
    let opens = (now + TimeDelta::days(1)).date_naive();
    assert_eq!(
        answer["at"].as_str().unwrap()[..10],
        opens.to_string(),
        "{answer}"
    );
    assert!(answer["message"].is_i64(), "{answer}");

    let answer = why(&env, "win", "later");
    assert_eq!(reason(&answer), "planned", "{answer}");
    let due = (now + TimeDelta::days(30)).date_naive();
    assert_eq!(answer["at"].as_str().unwrap()[..10], due.to_string());

    let answer = why(&env, "sent", "thank-you");
    assert_eq!(reason(&answer), "already_sent", "{answer}");
    let sent_id = log
        .iter()
        .find(|m| m.customer_id == "sent" && m.rule == "thank-you")
        .unwrap()
        .id;
    assert_eq!(answer["message"], sent_id);

    // The table: one line per rule, every rule.
    let (ok, table, err) = env.run_cli(&["why", "--customer", "bob"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 6, "{table}");
    assert!(lines[0].starts_with("RULE"), "{table}");
    let follow_up = lines.iter().find(|l| l.starts_with("follow-up")).unwrap();
    assert!(
        follow_up.contains("no") && follow_up.contains("\"bob-buy\""),
        "{table}"
    );

    // Mistakes are named.
    let (ok, _, err) = env.run_cli(&["why", "--customer", "nobody-at-all"]);
    assert!(
        !ok && err.contains("no customer \"nobody-at-all\""),
        "{err}"
    );
    let (ok, _, err) = env.run_cli(&["why", "--customer", "bob", "--rule", "nope"]);
    assert!(!ok && err.contains("no rule \"nope\""), "{err}");
}

on_both_backends!(why_names_the_check_that_decided);
