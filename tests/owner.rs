//! Rules written `to = "owner"`, end to end on both backends with the real daemon and a real
//! SMTP peer: a low rating alerts the owner at `business.owner_email` with the customer, the
//! score, the comment and a link to the customer's page; the alert goes even when the customer
//! is suppressed, has no unsubscribe link, is logged with the owner as recipient, and does not
//! use up the customer's frequency limit. `check` refuses an owner rule without an owner_email.
//! The customer's page shows their ratings and replies in place on the timeline, and the
//! Experience page the figures and the latest comments and replies.

mod support;
mod web_support;

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use mail_parser::MessageParser;
use serde_json::json;
use support::smtp::{Accepted, SmtpPeer};
use support::{Backend, Sink, TestEnv};
use touchpoint::store::{Event, LogFilter, SharedStore};

const OWNER: &str = "owner@acme.example";

const RULES: &str = r#"
[[rule]]
name = "low-score-alert"
template = "owner-alert"
subject = "{{customer.name}} rated us {{event.data.score}}"
to = "owner"
when = { event = "rated", after = "1s" }

[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "4s" }
"#;

const ALERT_TEXT: &str = "{{customer.name}} <{{customer.email}}> chose {{event.data.score}} \
({{event.data.scale}}){{#if event.data.comment}}: \"{{event.data.comment}}\"{{/if}}\n\
Their page: {{customer_url}}\n";

const ALERT_HTML: &str = "<p>{{customer.name}} chose {{event.data.score}}</p>\
<p><a href=\"{{customer_url}}\">Their page</a></p>";

/// A world whose business has an owner address, the alert template, and at most one message
/// per customer a day.
async fn world(backend: Backend, peer: &SmtpPeer, owner_email: bool) -> TestEnv {
    let extra = "[links]\nbase_url = \"https://mail.acme.example\"\n\n[defaults]\nfrequency_limit = { max = 1, per = \"1d\" }\n";
    let env = TestEnv::new(backend, Sink::Smtp(peer), &[("rules.toml", RULES)], extra).await;
    let templates = env.path().join("templates");
    std::fs::write(templates.join("owner-alert.txt.hbs"), ALERT_TEXT).expect("template");
    std::fs::write(templates.join("owner-alert.html.hbs"), ALERT_HTML).expect("template");
    if owner_email {
        let config = std::fs::read_to_string(&env.config_path).expect("config");
        let config = config.replace(
            "address = \"1 Garden Lane, Springfield\"",
            &format!("address = \"1 Garden Lane, Springfield\"\nowner_email = \"{OWNER}\""),
        );
        std::fs::write(&env.config_path, config).expect("config");
    }
    env
}

fn event(id: &str, customer: &str, kind: &str, data: serde_json::Value) -> Event {
    Event {
        id: id.into(),
        customer_id: customer.into(),
        kind: kind.into(),
        occurred_at: Utc::now() - TimeDelta::milliseconds(100),
        data,
    }
}

fn text_of(accepted: &Accepted) -> String {
    let message = MessageParser::default()
        .parse(&accepted.data[..])
        .expect("a parseable message");
    message
        .body_text(0)
        .map(|t| t.into_owned())
        .unwrap_or_default()
}

fn headers_of(accepted: &Accepted) -> String {
    let raw = String::from_utf8_lossy(&accepted.data);
    raw.split("\r\n\r\n").next().unwrap_or("").to_string()
}

async fn add_customers(env: &TestEnv, store: &SharedStore) {
    env.add_customer(store, "c1", "ada@example.com", "Ada Lovelace", None)
        .await;
    env.add_customer(store, "c2", "bob@example.com", "Bob Smith", None)
        .await;
    store
        .suppress("bob@example.com", "unsubscribed", "test")
        .await
        .expect("suppress");
}

async fn a_low_rating_alerts_the_owner(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let env = world(backend, &peer, true).await;
    let store = env.store().await;
    add_customers(&env, &store).await;
    let rated = |id: &str, customer: &str, score: i64, comment: Option<&str>| {
        let mut data =
            json!({"score": score, "scale": "csat", "rule": "thank-you", "message_id": 7});
        if let Some(comment) = comment {
            data["comment"] = json!(comment);
        }
        event(id, customer, "rated", data)
    };
    store
        .insert_events(&[
            rated("r1", "c1", 2, Some("The roses arrived wilted")),
            // Bob is suppressed: he hears nothing, the owner still hears about him.
            rated("r2", "c2", 1, None),
            // Ada's purchase: her thank-you goes after the alert about her, within the day's
            // limit of one, because the owner's mail does not count.
            event("o1", "c1", "purchase", json!({})),
        ])
        .await
        .expect("events");
    // `why` agrees with the guard: Bob's suppression does not stop the owner's alert.
    let (ok, why, stderr) = env.run_cli(&["why", "--customer", "c2", "--rule", "low-score-alert"]);
    assert!(ok, "{stderr}");
    assert!(!why.contains("suppression"), "{why}");
    assert!(why.contains("low-score-alert  yes"), "{why}");
    let daemon = env.start().await;
    let all = peer.wait_for_accepted(3, Duration::from_secs(30)).await;
    daemon.stop().await;
    let accepted = peer.accepted();
    assert!(all, "{:?}", support::states(&store).await);
    assert_eq!(accepted.len(), 3, "{accepted:?}");

    let to =
        |who: &str| -> Vec<&Accepted> { accepted.iter().filter(|a| a.rcpt_to == [who]).collect() };
    let alerts = to(OWNER);
    assert_eq!(alerts.len(), 2, "both alerts go to the owner");
    assert!(
        to("bob@example.com").is_empty(),
        "a suppressed customer hears nothing"
    );
    assert_eq!(
        to("ada@example.com").len(),
        1,
        "Ada's thank-you is not held back"
    );

    let texts: Vec<String> = alerts.iter().map(|a| text_of(a)).collect();
    let ada = texts
        .iter()
        .find(|t| t.contains("Ada Lovelace"))
        .expect("the alert about Ada");
    assert!(
        ada.contains("<ada@example.com> chose 2 (csat): \"The roses arrived wilted\""),
        "{ada}"
    );
    assert!(
        ada.contains("Their page: https://mail.acme.example/customers/c1"),
        "{ada}"
    );
    let bob = texts
        .iter()
        .find(|t| t.contains("Bob Smith"))
        .expect("the alert about Bob");
    assert!(bob.contains("chose 1 (csat)"), "{bob}");
    assert!(!bob.contains(": \""), "no comment, no quotes: {bob}");
    for alert in &alerts {
        let headers = headers_of(alert);
        assert!(!headers.contains("List-Unsubscribe"), "{headers}");
    }
    let log = store.log(&LogFilter::default()).await.expect("log");
    let logged: Vec<(&str, &str, Option<&str>)> = {
        let mut rows: Vec<_> = log
            .iter()
            .map(|e| (e.rule.as_str(), e.customer_id.as_str(), e.email.as_deref()))
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(
        logged,
        [
            ("low-score-alert", "c1", Some(OWNER)),
            ("low-score-alert", "c2", Some(OWNER)),
            ("thank-you", "c1", Some("ada@example.com")),
        ]
    );
    assert!(log.iter().all(|e| e.state.to_string() == "sent"), "{log:?}");
}

async fn check_wants_an_owner_email_for_an_owner_rule(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let env = world(backend, &peer, false).await;
    let (ok, stdout, stderr) = env.run_cli(&["check"]);
    assert!(!ok, "{stdout}");
    let rules = env.path().join("rules").join("rules.toml");
    let expected = format!(
        "{}:2:1: the rule \"low-score-alert\" writes to the owner (to = \"owner\") but [business]",
        rules.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("add owner_email = "), "{stderr}");

    let config = std::fs::read_to_string(&env.config_path).expect("config");
    let config = config.replace(
        "address = \"1 Garden Lane, Springfield\"",
        "address = \"1 Garden Lane, Springfield\"\nowner_email = \"not an address\"",
    );
    std::fs::write(&env.config_path, config).expect("config");
    let (ok, _, stderr) = env.run_cli(&["check"]);
    assert!(!ok);
    assert!(
        stderr.contains("owner_email \"not an address\" is not an email address"),
        "{stderr}"
    );
}

async fn the_customer_page_shows_ratings_and_replies(backend: Backend) {
    let thank_you = RULES.split("[[rule]]").nth(2).expect("the thank-you rule");
    let rules = format!("[[rule]]{thank_you}");
    let env = TestEnv::new(
        backend,
        Sink::Files,
        &[("rules.toml", &rules)],
        "[web]\nenabled = true\n",
    )
    .await;
    let store = env.store().await;
    add_customers(&env, &store).await;
    let low = json!({"score": 2, "scale": "csat", "rule": "thank-you", "message_id": 41,
        "comment": "The roses arrived <b>wilted</b>"});
    let nps = json!({"score": 9, "scale": "nps", "rule": "thank-you", "message_id": 42});
    let reply = json!({"rule": "thank-you", "message_id": 41, "snippet": "Can you call me?"});
    let away = json!({"rule": "thank-you", "snippet": "I am out of the office", "auto": true});
    store
        .insert_events(&[
            event("r1", "c1", "rated", low),
            event("r2", "c1", "rated", nps),
            event("p1", "c1", "replied", reply),
            event("p2", "c1", "replied", away),
        ])
        .await
        .expect("events");
    let daemon = env.start().await;
    let page = web_support::get(daemon.http, "/customers/c1", &[]).await;
    let experience = web_support::get(daemon.http, "/experience", &[]).await;
    daemon.stop().await;
    assert_eq!(experience.status, 200, "{}", experience.text());
    let figures = web_support::unescape(&experience.text());
    for expected in [
        "<td class=\"inline rule\">thank-you</td>",
        "<td>2 <small class=\"muted\">(– of sent)</small></td>",
        "<td>0% <small class=\"muted\">(1 answers)</small></td>",
        "<td>+100 <small class=\"muted\">(1 answers)</small></td>",
        "comment from <a href=\"/customers/c1\">c1</a>, rated 2 (csat) on <a href=\"/messages/41\">message 41</a>",
        "The roses arrived <b>wilted</b>",
        "Can you call me?",
    ] {
        assert!(
            figures.contains(expected),
            "{expected:?} not on the page:\n{figures}"
        );
    }
    assert!(
        !figures.contains("I am out of the office"),
        "auto-replies are not replies"
    );
    assert_eq!(page.status, 200, "{}", page.text());
    let html = page.text();
    let text = web_support::unescape(&html);
    for expected in [
        "rated 2 of 5 to message 41 (thank-you)",
        "The roses arrived <b>wilted</b>",
        "rated 9 of 10 to message 42 (thank-you)",
        "replied to message 41 (thank-you)",
        "Can you call me?",
        "auto-reply to thank-you",
        "I am out of the office",
        "href=\"/messages/41\"",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} not on the page:\n{text}"
        );
    }
    assert!(!html.contains("<b>wilted"), "the comment is escaped");
}

on_both_backends!(
    the_customer_page_shows_ratings_and_replies,
    a_low_rating_alerts_the_owner,
    check_wants_an_owner_email_for_an_owner_rule
);
