//! The whole flow, end to end, on both backends: rules and events in, messages out over real
//! SMTP, and the log saying what happened.
//!
//! Every scenario runs the real daemon in-process against a real database (a SQLite file or a
//! fresh PostgreSQL database) and the real SMTP peer, and checks what ended up in the tables and
//! what the peer received, parsed the way a mail client would parse it.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{
    DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, Offset, SubsecRound, TimeDelta,
    TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::json;
use support::smtp::{Accepted, Fault, SmtpPeer, Stage};
use support::{Backend, Sink, TestEnv, eventually, repo_path, states};
use touchpoint::store::{Customer, Event, LogEntry, LogFilter, MessageState, SharedStore};

const THANK_YOU_SOON: &str = r#"
[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "2s" }
"#;

/// How long a scenario waits for something that should happen within a few seconds.
const PATIENCE: Duration = Duration::from_secs(15);

// --- helpers ---------------------------------------------------------------------------------

fn person(id: &str, name: &str, timezone: Option<&str>, attributes: serde_json::Value) -> Customer {
    Customer {
        id: id.into(),
        email: format!("{id}@example.com"),
        name: Some(name.into()),
        timezone: timezone.map(str::to_string),
        attributes,
    }
}

async fn add(store: &SharedStore, customers: &[Customer]) {
    store
        .upsert_customers(customers)
        .await
        .expect("add customers");
}

async fn happened(
    store: &SharedStore,
    id: &str,
    customer: &str,
    kind: &str,
    at: DateTime<Utc>,
    data: serde_json::Value,
) {
    let event = Event {
        id: id.into(),
        customer_id: customer.into(),
        kind: kind.into(),
        occurred_at: at,
        data,
    };
    assert_eq!(
        store.insert_events(&[event]).await.expect("add event"),
        1,
        "event {id} is new"
    );
}

/// Now, to the millisecond (what both backends store).
fn now_ms() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

async fn log_of(store: &SharedStore, customer: &str) -> Vec<LogEntry> {
    store
        .log(&LogFilter {
            customer_id: Some(customer.into()),
            ..Default::default()
        })
        .await
        .expect("log")
}

/// One pass of the daemon's own planner from the first customer and event, with the test's
/// config (the daemon itself stopped).
async fn plan_from_start(
    env: &TestEnv,
    store: &SharedStore,
) -> (touchpoint::plan::Cursors, touchpoint::plan::PassReport) {
    let config = env.config();
    let playbook = touchpoint::playbook::Playbook::load(&config).expect("playbook");
    let settings = touchpoint::plan::PlanSettings::from_config(&config);
    touchpoint::plan::plan_pass(
        store,
        &playbook,
        touchpoint::plan::Cursors::default(),
        &settings,
    )
    .await
    .expect("plan")
}

async fn whole_log(store: &SharedStore) -> Vec<LogEntry> {
    store.log(&LogFilter::default()).await.expect("log")
}

/// Waits until the customer has a message of `rule` in `state` and returns it; fails with the
/// whole log otherwise.
async fn wait_for(
    store: &SharedStore,
    customer: &str,
    rule: &str,
    state: MessageState,
) -> LogEntry {
    let found = eventually(PATIENCE, || async {
        log_of(store, customer)
            .await
            .iter()
            .any(|e| e.rule == rule && e.state == state)
    })
    .await;
    let log = whole_log(store).await;
    assert!(
        found,
        "no {state} message of {rule:?} for {customer:?} within {PATIENCE:?}; the log: {log:#?}"
    );
    log.into_iter()
        .find(|e| e.customer_id == customer && e.rule == rule && e.state == state)
        .expect("found above")
}

/// Waits until the customer has any message of `rule` (planned), and returns it.
async fn wait_planned(store: &SharedStore, customer: &str, rule: &str) -> LogEntry {
    let found = eventually(PATIENCE, || async {
        log_of(store, customer).await.iter().any(|e| e.rule == rule)
    })
    .await;
    assert!(found, "{rule:?} planned nothing for {customer:?}");
    log_of(store, customer)
        .await
        .into_iter()
        .find(|e| e.rule == rule)
        .expect("found above")
}

/// The messages the peer accepted for `email`.
fn received_by(peer: &SmtpPeer, email: &str) -> Vec<Accepted> {
    peer.accepted()
        .into_iter()
        .filter(|a| a.rcpt_to.iter().any(|r| r == email))
        .collect()
}

/// A received message as a mail client sees it.
#[derive(Debug)]
struct Opened {
    message_id: String,
    subject: String,
    from: (Option<String>, String),
    to: (Option<String>, String),
    date: i64,
    text: String,
    html: String,
}

/// Parses what the peer received with a real MIME parser and checks the shape every touchpoint
/// message has: Message-ID, Date, From, To, Subject, and a multipart/alternative body with a
/// text/plain part and a text/html part, in that order.
fn open(accepted: &Accepted) -> Opened {
    let raw = String::from_utf8_lossy(&accepted.data).into_owned();
    let message = MessageParser::default()
        .parse(&accepted.data[..])
        .unwrap_or_else(|| panic!("a mail client cannot parse the message:\n{raw}"));
    let ctype = message.content_type().expect("a Content-Type header");
    assert!(
        ctype.ctype().eq_ignore_ascii_case("multipart")
            && ctype
                .subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case("alternative")),
        "not multipart/alternative: {ctype:?}\n{raw}"
    );
    let parts = message
        .root_part()
        .sub_parts()
        .expect("a multipart body has parts");
    let kinds: Vec<String> = parts
        .iter()
        .map(|&id| {
            let ct = message.parts[id as usize]
                .content_type()
                .expect("each part has a Content-Type");
            format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or_default()).to_ascii_lowercase()
        })
        .collect();
    assert_eq!(kinds, ["text/plain", "text/html"], "{raw}");
    let body = |i: usize| {
        message.parts[parts[i] as usize]
            .text_contents()
            .expect("a text part")
            .to_string()
    };
    let address = |a: Option<&mail_parser::Address<'_>>, what: &str| {
        let first = a
            .and_then(|a| a.first())
            .unwrap_or_else(|| panic!("no {what} header:\n{raw}"));
        (
            first.name().map(str::to_string),
            first.address().expect("an address").to_string(),
        )
    };
    Opened {
        message_id: message
            .message_id()
            .unwrap_or_else(|| panic!("no Message-ID:\n{raw}"))
            .to_string(),
        subject: message
            .subject()
            .unwrap_or_else(|| panic!("no Subject:\n{raw}"))
            .to_string(),
        from: address(message.from(), "From"),
        to: address(message.to(), "To"),
        date: message
            .date()
            .unwrap_or_else(|| panic!("no Date:\n{raw}"))
            .to_timestamp(),
        text: body(0),
        html: body(1),
    }
}

/// Opens the message the log entry says was sent to `email` (found by its Message-ID, which
/// must have been received exactly once, by `email` alone) and checks it against the entry: same
/// Message-ID, subject and recipient, sender and date present, state `sent` with a 250 reply.
fn open_and_match(peer: &SmtpPeer, email: &str, entry: &LogEntry) -> Opened {
    let logged = entry
        .message_id
        .as_deref()
        .unwrap_or_else(|| panic!("no Message-ID in the log: {entry:?}"))
        .trim_matches(['<', '>']);
    let got: Vec<Accepted> = peer
        .accepted()
        .into_iter()
        .filter(|a| a.message_id.as_deref() == Some(logged))
        .collect();
    assert_eq!(got.len(), 1, "{logged} was received {} times", got.len());
    assert_eq!(got[0].rcpt_to, [email]);
    let mail = open(&got[0]);
    assert_eq!(mail.message_id, logged, "Message-ID header and log differ");
    assert_eq!(Some(&mail.subject), entry.subject.as_ref());
    assert_eq!(mail.to.1, email);
    assert_eq!(entry.email.as_deref(), Some(email));
    assert_eq!(
        mail.from,
        (Some("Acme Flowers".into()), "hello@acme.example".into())
    );
    assert!(
        (mail.date - Utc::now().timestamp()).abs() < 120,
        "Date header {} is not about now",
        mail.date
    );
    assert_eq!(entry.state, MessageState::Sent);
    assert!(
        entry
            .smtp_reply
            .as_deref()
            .is_some_and(|r| r.starts_with("250")),
        "{:?}",
        entry.smtp_reply
    );
    assert!(
        entry.sent_at.is_some_and(|at| at >= entry.due_at),
        "sent before due: {entry:?}"
    );
    mail
}

/// Starts the daemon after checking its rules and templates load (the daemon would only say so
/// when stopped).
async fn start(env: &TestEnv) -> support::InProcess {
    if let Err(problems) = touchpoint::playbook::Playbook::load(&env.config()) {
        panic!("the test's rules or templates do not load:\n{problems}");
    }
    env.start().await
}

/// A shipped example rule with some of its text replaced (each replacement must apply).
fn shipped_rule(file: &str, edits: &[(&str, &str)]) -> String {
    let mut text = std::fs::read_to_string(repo_path(&format!("config/rules/{file}")))
        .expect("shipped rule file");
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "config/rules/{file} no longer contains {from:?}"
        );
        text = text.replace(from, to);
    }
    text
}

/// Adds a template pair to the test's templates directory.
fn template(env: &TestEnv, name: &str, html: &str, text: &str) {
    let dir = env.path().join("templates");
    std::fs::write(dir.join(format!("{name}.html.hbs")), html).expect("html template");
    std::fs::write(dir.join(format!("{name}.txt.hbs")), text).expect("text template");
}

/// Like `support::FAST` but with a long lease, so housekeeping (every lease / 4) runs only when
/// the dispatcher starts.
const SLOW_HOUSEKEEPING: &str = r#"
[planner]
interval = "1s"
reconcile_every = "1m"

[delivery]
lease = "2m"
retry_base = "1s"
retry_max = "2s"
shutdown_grace = "5s"
"#;

// --- 1. the three example rules -----------------------------------------------------------

async fn the_three_example_rules_end_to_end(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let thank_you = shipped_rule(
        "thank-you.toml",
        &[
            ("after = \"2h\"", "after = \"2s\""),
            ("send_window = { from = \"09:00\", to = \"18:00\" }", ""),
        ],
    );
    let follow_up = shipped_rule("follow-up.toml", &[("after = \"3d\"", "after = \"3s\"")]);
    // The anniversary: a wedding N years ago today (in the customer's zone), kept at the
    // customer's current minute less one, so it fell a minute ago and goes out at once.
    let tz = chrono_tz::America::Los_Angeles;
    let local = Utc::now().with_timezone(&tz).naive_local();
    let kept: NaiveDateTime = local
        .date()
        .and_time(NaiveTime::from_hms_opt(local.hour(), local.minute(), 0).unwrap())
        - TimeDelta::minutes(1);
    let years = [5, 4, 8]
        .into_iter()
        .find(|n| NaiveDate::from_ymd_opt(kept.year() - n, kept.month(), kept.day()).is_some())
        .expect("one of them has the day");
    let wedding = NaiveDate::from_ymd_opt(kept.year() - years, kept.month(), kept.day())
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let kept_at = tz
        .from_local_datetime(&kept)
        .earliest()
        .expect("a minute ago exists")
        .with_timezone(&Utc);
    let anniversary = shipped_rule(
        "anniversary.toml",
        &[(
            "at = \"09:00\"",
            &format!("at = \"{}\"", kept.format("%H:%M")),
        )],
    );
    let env = TestEnv::new(
        backend,
        Sink::Smtp(&peer),
        &[
            ("anniversary.toml", &anniversary),
            ("follow-up.toml", &follow_up),
            ("thank-you.toml", &thank_you),
        ],
        "",
    )
    .await;
    let store = env.store().await;
    add(
        &store,
        &[
            person("ada", "Ada Lovelace", Some("Europe/London"), json!({})),
            person("bert", "Bert Berlin", Some("Europe/Berlin"), json!({})),
            person("cleo", "Cleo Coast", Some("America/Los_Angeles"), json!({})),
        ],
    )
    .await;
    let bought = now_ms();
    happened(
        &store,
        "order-1",
        "ada",
        "purchase",
        bought,
        json!({ "order_number": "A-1001" }),
    )
    .await;
    let called = now_ms();
    happened(
        &store,
        "call-1",
        "bert",
        "discovery_call",
        called,
        json!({}),
    )
    .await;
    happened(&store, "wedding-1", "cleo", "wedding", wedding, json!({})).await;

    let daemon = start(&env).await;
    let thanks = wait_for(
        &store,
        "ada",
        "thank-you-after-purchase",
        MessageState::Sent,
    )
    .await;
    let follow = wait_for(
        &store,
        "bert",
        "discovery-call-follow-up",
        MessageState::Sent,
    )
    .await;
    let wishes = wait_for(&store, "cleo", "wedding-anniversary", MessageState::Sent).await;
    daemon.stop().await;
    assert_eq!(peer.accepted_count(), 3, "{:?}", whole_log(&store).await);

    // Thank-you: due two seconds after the purchase, not before.
    assert_eq!(thanks.trigger_at, bought + TimeDelta::seconds(2));
    assert_eq!(thanks.due_at, thanks.trigger_at);
    assert_eq!(thanks.event_id.as_deref(), Some("order-1"));
    let mail = open_and_match(&peer, "ada@example.com", &thanks);
    assert_eq!(mail.subject, "Thank you for your order, Ada");
    assert_eq!(mail.to.0.as_deref(), Some("Ada Lovelace"));
    assert!(mail.text.starts_with("Hi Ada,"), "{}", mail.text);
    assert!(mail.text.contains("(no. A-1001)"), "{}", mail.text);
    assert!(
        mail.text.contains("Acme Flowers\r\n1 Garden Lane")
            || mail.text.contains("Acme Flowers\n1 Garden Lane"),
        "{}",
        mail.text
    );
    assert!(mail.html.contains("Hi Ada,"), "{}", mail.html);
    assert!(mail.html.contains("(no. A-1001)"), "{}", mail.html);
    assert!(mail.html.contains("<!DOCTYPE html>"), "{}", mail.html);

    // Follow-up: three seconds after the call, with the call's date in Berlin.
    assert_eq!(follow.due_at, called + TimeDelta::seconds(3));
    let mail = open_and_match(&peer, "bert@example.com", &follow);
    assert_eq!(mail.subject, "As promised: next steps");
    let day = called
        .with_timezone(&chrono_tz::Europe::Berlin)
        .format("%A, %B %-d")
        .to_string();
    assert!(
        mail.text.contains(&format!("talking with us on {day}")),
        "{}",
        mail.text
    );
    assert!(mail.html.contains(&day), "{}", mail.html);

    // Anniversary: kept at the rule's local time in the customer's zone, N years on.
    assert_eq!(wishes.due_at, kept_at, "kept at {kept} in {tz}");
    assert_eq!(wishes.event_id.as_deref(), Some("wedding-1"));
    let mail = open_and_match(&peer, "cleo@example.com", &wishes);
    assert_eq!(mail.subject, "Happy anniversary, Cleo!");
    let ordinal = format!("Happy {years}th anniversary!");
    assert!(mail.text.contains(&ordinal), "{}", mail.text);
    assert!(mail.html.contains(&ordinal), "{}", mail.html);
}

// --- 2. unless since trigger --------------------------------------------------------------

const FOLLOW_UP_SOON: &str = r#"
[[rule]]
name = "follow-up"
template = "follow-up"
subject = "As promised: next steps"
when = { event = "discovery_call", after = "5s" }
unless = [{ event = "purchase", since = "trigger" }]
"#;

async fn a_purchase_before_the_follow_up_is_due_skips_it(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let env = TestEnv::new(
        backend,
        Sink::Smtp(&peer),
        &[("follow-up.toml", FOLLOW_UP_SOON)],
        "",
    )
    .await;
    let store = env.store().await;
    add(
        &store,
        &[
            person("buyer", "Bea Buyer", None, json!({})),
            person("browser", "Bo Browser", None, json!({})),
        ],
    )
    .await;
    let called = now_ms();
    happened(
        &store,
        "call-1",
        "buyer",
        "discovery_call",
        called,
        json!({}),
    )
    .await;
    happened(
        &store,
        "call-2",
        "browser",
        "discovery_call",
        called,
        json!({}),
    )
    .await;

    let daemon = start(&env).await;
    let planned = wait_planned(&store, "buyer", "follow-up").await;
    assert_eq!(planned.state, MessageState::Scheduled);
    // The customer buys after the call, before the follow-up is due.
    happened(&store, "order-1", "buyer", "purchase", now_ms(), json!({})).await;
    assert!(Utc::now() < planned.due_at, "too slow to test the guard");

    let skipped = wait_for(&store, "buyer", "follow-up", MessageState::Skipped).await;
    let sent = wait_for(&store, "browser", "follow-up", MessageState::Sent).await;
    daemon.stop().await;
    let reason = skipped.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("unless") && reason.contains("purchase") && reason.contains("since"),
        "{reason}"
    );
    assert_eq!(skipped.id, planned.id);
    assert_eq!(
        skipped.message_id, None,
        "a skipped message never got to SMTP"
    );
    let history: Vec<String> = store
        .message_events(skipped.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(history.contains(&"skipped".to_string()), "{history:?}");
    assert!(received_by(&peer, "buyer@example.com").is_empty());
    open_and_match(&peer, "browser@example.com", &sent);
    assert_eq!(peer.accepted_count(), 1);
}

async fn a_purchase_already_made_prevents_planning_the_follow_up(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let rule = FOLLOW_UP_SOON.replace("after = \"5s\"", "after = \"1s\"");
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("follow-up.toml", &rule)], "").await;
    let store = env.store().await;
    add(
        &store,
        &[
            person("buyer", "Bea Buyer", None, json!({})),
            person("browser", "Bo Browser", None, json!({})),
            person("regular", "Rey Regular", None, json!({})),
        ],
    )
    .await;
    let now = now_ms();
    // Bought after the call: no follow-up at all.
    happened(
        &store,
        "call-1",
        "buyer",
        "discovery_call",
        now - TimeDelta::seconds(10),
        json!({}),
    )
    .await;
    happened(
        &store,
        "order-1",
        "buyer",
        "purchase",
        now - TimeDelta::seconds(5),
        json!({}),
    )
    .await;
    // Never bought: followed up.
    happened(
        &store,
        "call-2",
        "browser",
        "discovery_call",
        now - TimeDelta::seconds(10),
        json!({}),
    )
    .await;
    // Bought before the call only: that is not "since the trigger", so followed up.
    happened(
        &store,
        "order-0",
        "regular",
        "purchase",
        now - TimeDelta::seconds(20),
        json!({}),
    )
    .await;
    happened(
        &store,
        "call-3",
        "regular",
        "discovery_call",
        now - TimeDelta::seconds(10),
        json!({}),
    )
    .await;

    let daemon = start(&env).await;
    let browser = wait_for(&store, "browser", "follow-up", MessageState::Sent).await;
    let regular = wait_for(&store, "regular", "follow-up", MessageState::Sent).await;
    // A few more planner passes over the same rows.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    daemon.stop().await;
    assert_eq!(
        log_of(&store, "buyer").await,
        vec![],
        "the buyer got a follow-up planned"
    );
    open_and_match(&peer, "browser@example.com", &browser);
    open_and_match(&peer, "regular@example.com", &regular);
    assert_eq!(peer.accepted_count(), 2);
}

// --- 3. unless within -----------------------------------------------------------------------

async fn a_monthly_note_is_skipped_after_a_recent_purchase(backend: Backend) {
    let peer = SmtpPeer::start().await;
    // Monthly: this day of the month at the current UTC minute less one, so this month's
    // occurrence fell a minute ago and goes out at once.
    let kept = Utc::now().trunc_subsecs(0).with_second(0).unwrap() - TimeDelta::minutes(1);
    let rule = format!(
        r#"
[[rule]]
name = "monthly-note"
template = "note"
subject = "Your monthly note, {{{{customer.first_name}}}}"
when = {{ schedule = "{} {} {} * *" }}
unless = [{{ event = "purchase", within = "30d" }}]
expire_after = "1h"
"#,
        kept.minute(),
        kept.hour(),
        kept.day()
    );
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("monthly.toml", &rule)], "").await;
    template(
        &env,
        "note",
        "{{#> layout}}<p>Hello {{customer.first_name}}, here is your note.</p>{{/layout}}\n",
        "Hello {{customer.first_name}}, here is your note.\n\n{{> text-footer}}\n",
    );
    let store = env.store().await;
    add(
        &store,
        &[
            person("recent", "Rita Recent", None, json!({})),
            person("lapsed", "Lars Lapsed", None, json!({})),
            person("never", "Nina Never", None, json!({})),
            person("refunded", "Ralf Refund", None, json!({})),
        ],
    )
    .await;
    let now = now_ms();
    happened(
        &store,
        "o1",
        "recent",
        "purchase",
        now - TimeDelta::days(3),
        json!({}),
    )
    .await;
    happened(
        &store,
        "o2",
        "lapsed",
        "purchase",
        now - TimeDelta::days(40),
        json!({}),
    )
    .await;
    happened(
        &store,
        "r1",
        "refunded",
        "refund",
        now - TimeDelta::days(3),
        json!({}),
    )
    .await;

    let daemon = start(&env).await;
    let skipped = wait_for(&store, "recent", "monthly-note", MessageState::Skipped).await;
    let lapsed = wait_for(&store, "lapsed", "monthly-note", MessageState::Sent).await;
    let never = wait_for(&store, "never", "monthly-note", MessageState::Sent).await;
    let refunded = wait_for(&store, "refunded", "monthly-note", MessageState::Sent).await;
    daemon.stop().await;
    let reason = skipped.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("unless") && reason.contains("purchase") && reason.contains("recently"),
        "{reason}"
    );
    assert_eq!(skipped.trigger_at, kept);
    for (email, entry) in [
        ("lapsed@example.com", &lapsed),
        ("never@example.com", &never),
        ("refunded@example.com", &refunded),
    ] {
        assert_eq!(entry.trigger_at, kept);
        let mail = open_and_match(&peer, email, entry);
        assert!(
            mail.subject.starts_with("Your monthly note, "),
            "{}",
            mail.subject
        );
    }
    assert_eq!(peer.accepted_count(), 3);
}

// --- 4. only_if ----------------------------------------------------------------------------

async fn only_customers_matching_only_if_are_mailed(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let rule = r#"
[[rule]]
name = "gold-thanks"
template = "thank-you"
subject = "Thank you, {{customer.first_name}}"
when = { event = "purchase", after = "5s" }
only_if = [
  { attribute = "plan", equals = "gold" },
  { attribute = "country", in = ["FR", "BE"] },
  { attribute = "vip", exists = true },
]
"#;
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("gold.toml", rule)], "").await;
    let store = env.store().await;
    let customers = [
        (
            "match",
            json!({ "plan": "gold", "country": "FR", "vip": true }),
        ),
        (
            "match-be",
            json!({ "plan": "gold", "country": "BE", "vip": false, "extra": 1 }),
        ),
        (
            "silver",
            json!({ "plan": "silver", "country": "FR", "vip": true }),
        ),
        (
            "german",
            json!({ "plan": "gold", "country": "DE", "vip": true }),
        ),
        ("no-vip", json!({ "plan": "gold", "country": "FR" })),
        (
            "null-vip",
            json!({ "plan": "gold", "country": "FR", "vip": null }),
        ),
        ("no-attributes", json!({})),
        (
            "changer",
            json!({ "plan": "gold", "country": "BE", "vip": "yes" }),
        ),
    ];
    let people: Vec<Customer> = customers
        .iter()
        .map(|(id, attrs)| person(id, "Pat Person", None, attrs.clone()))
        .collect();
    add(&store, &people).await;
    let now = now_ms();
    for (id, _) in &customers {
        happened(
            &store,
            &format!("order-{id}"),
            id,
            "purchase",
            now,
            json!({}),
        )
        .await;
    }

    let daemon = start(&env).await;
    let planned = wait_planned(&store, "changer", "gold-thanks").await;
    // The customer's plan changes after planning, before the message is due.
    let mut changed = people.last().unwrap().clone();
    changed.attributes = json!({ "plan": "silver", "country": "BE", "vip": "yes" });
    add(&store, &[changed]).await;
    assert!(Utc::now() < planned.due_at, "too slow to test the guard");

    let first = wait_for(&store, "match", "gold-thanks", MessageState::Sent).await;
    let second = wait_for(&store, "match-be", "gold-thanks", MessageState::Sent).await;
    let skipped = wait_for(&store, "changer", "gold-thanks", MessageState::Skipped).await;
    daemon.stop().await;
    assert!(
        skipped
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("only_if")),
        "{:?}",
        skipped.reason
    );
    open_and_match(&peer, "match@example.com", &first);
    open_and_match(&peer, "match-be@example.com", &second);
    assert_eq!(peer.accepted_count(), 2);
    for id in ["silver", "german", "no-vip", "null-vip", "no-attributes"] {
        assert_eq!(
            log_of(&store, id).await,
            vec![],
            "{id} should not be planned"
        );
    }
}

// --- 5. send window --------------------------------------------------------------------------

async fn the_send_window_holds_a_message_until_it_opens_in_the_customers_zone(backend: Backend) {
    let peer = SmtpPeer::start().await;
    // A window opening three hours after New York's current hour, two hours long: closed in
    // New York now, open now in a zone three hours ahead of New York.
    let new_york = chrono_tz::America::New_York;
    let now = Utc::now();
    let ny_now = now.with_timezone(&new_york);
    let opens = NaiveTime::from_hms_opt((ny_now.hour() + 3) % 24, 0, 0).unwrap();
    let closes = NaiveTime::from_hms_opt((ny_now.hour() + 5) % 24, 0, 0).unwrap();
    let mut day = ny_now.date_naive();
    if day.and_time(opens) <= ny_now.naive_local() {
        day = day.succ_opt().unwrap();
    }
    let expected_open = new_york
        .from_local_datetime(&day.and_time(opens))
        .earliest()
        .unwrap()
        .with_timezone(&Utc);
    let ahead_hours = ny_now.offset().fix().local_minus_utc() / 3600 + 3;
    let ahead: Tz = format!("Etc/GMT{:+}", -ahead_hours).parse().unwrap();
    let rule = format!(
        r#"
[[rule]]
name = "windowed"
template = "thank-you"
subject = "Thank you, {{{{customer.first_name}}}}"
when = {{ event = "purchase", after = "1s" }}
send_window = {{ from = "{}", to = "{}" }}
expire_after = "1d"
"#,
        opens.format("%H:%M"),
        closes.format("%H:%M")
    );
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("windowed.toml", &rule)], "").await;
    let store = env.store().await;
    add(
        &store,
        &[
            person("nyc", "Nora York", Some("America/New_York"), json!({})),
            person("ahead", "Abe Ahead", Some(ahead.name()), json!({})),
        ],
    )
    .await;
    let bought = now_ms();
    happened(&store, "o-nyc", "nyc", "purchase", bought, json!({})).await;
    happened(&store, "o-ahead", "ahead", "purchase", bought, json!({})).await;

    let daemon = start(&env).await;
    let sent = wait_for(&store, "ahead", "windowed", MessageState::Sent).await;
    let waiting = wait_planned(&store, "nyc", "windowed").await;
    // Another planner pass and dispatcher turn: it still waits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting_now = log_of(&store, "nyc").await;
    daemon.stop().await;
    assert_eq!(
        waiting_now,
        vec![waiting.clone()],
        "the waiting message changed"
    );
    assert_eq!(waiting.state, MessageState::Scheduled);
    assert_eq!(waiting.trigger_at, bought + TimeDelta::seconds(1));
    assert_eq!(
        (waiting.due_at, waiting.next_attempt_at),
        (expected_open, expected_open),
        "New York now {ny_now}, window {opens}-{closes}"
    );
    assert_eq!(waiting.attempts, 0);
    assert!(received_by(&peer, "nyc@example.com").is_empty());
    assert_eq!(
        sent.due_at,
        bought + TimeDelta::seconds(1),
        "inside the window: due at once"
    );
    open_and_match(&peer, "ahead@example.com", &sent);
    assert_eq!(peer.accepted_count(), 1);
}

// --- 6. expire_after ---------------------------------------------------------------------

async fn a_new_rule_does_not_reach_back_past_expire_after(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let rule = r#"
[[rule]]
name = "new-thanks"
template = "thank-you"
subject = "Thank you, {{customer.first_name}}"
when = { event = "purchase", after = "1s" }
expire_after = "1h"
"#;
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("new.toml", rule)], "").await;
    let store = env.store().await;
    add(
        &store,
        &[
            person("old", "Olga Old", None, json!({})),
            person("hour", "Hugo Hour", None, json!({})),
            person("fresh", "Fred Fresh", None, json!({})),
        ],
    )
    .await;
    let now = now_ms();
    happened(
        &store,
        "o-old",
        "old",
        "purchase",
        now - TimeDelta::days(365),
        json!({}),
    )
    .await;
    happened(
        &store,
        "o-hour",
        "hour",
        "purchase",
        now - TimeDelta::minutes(62),
        json!({}),
    )
    .await;
    happened(&store, "o-fresh", "fresh", "purchase", now, json!({})).await;

    let daemon = start(&env).await;
    let fresh = wait_for(&store, "fresh", "new-thanks", MessageState::Sent).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    daemon.stop().await;
    open_and_match(&peer, "fresh@example.com", &fresh);
    assert_eq!(
        log_of(&store, "old").await,
        vec![],
        "last year's purchase was planned"
    );
    assert_eq!(
        log_of(&store, "hour").await,
        vec![],
        "a purchase due 61 minutes ago was planned"
    );
    assert_eq!(peer.accepted_count(), 1);
}

async fn a_planned_message_that_became_overdue_is_skipped_not_sent(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let rule = r#"
[[rule]]
name = "prompt"
template = "thank-you"
subject = "Thank you, {{customer.first_name}}"
when = { event = "purchase", after = "0s" }
expire_after = "2s"
"#;
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("prompt.toml", rule)], "").await;
    let store = env.store().await;
    add(
        &store,
        &[
            person("stale", "Stan Stale", None, json!({})),
            person("late", "Lea Late", None, json!({})),
            person("control", "Cora Control", None, json!({})),
        ],
    )
    .await;
    // Planned with the daemon stopped, by the daemon's own planner.
    let now = now_ms();
    happened(
        &store,
        "o-stale",
        "stale",
        "purchase",
        now - TimeDelta::seconds(5),
        json!({}),
    )
    .await;
    happened(&store, "o-late", "late", "purchase", now, json!({})).await;
    let (_, report) = plan_from_start(&env, &store).await;
    // Due five seconds ago with two seconds to go out: too late already, never planned.
    assert_eq!(report.inserted, 1, "{:#?}", whole_log(&store).await);
    assert_eq!(log_of(&store, "stale").await, vec![]);
    let planned = log_of(&store, "late").await;
    assert_eq!(planned.len(), 1);
    assert_eq!(planned[0].state, MessageState::Scheduled);
    assert_eq!(planned[0].due_at, now);

    // The daemon comes back after the message's two seconds are over.
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(2600)).await;
    assert!(Utc::now() > now + TimeDelta::seconds(2));
    let daemon = start(&env).await;
    happened(
        &store,
        "o-control",
        "control",
        "purchase",
        now_ms(),
        json!({}),
    )
    .await;
    let expired = wait_for(&store, "late", "prompt", MessageState::Skipped).await;
    let control = wait_for(&store, "control", "prompt", MessageState::Sent).await;
    daemon.stop().await;
    assert!(
        expired
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("expired")),
        "{:?}",
        expired.reason
    );
    assert_eq!(expired.id, planned[0].id);
    assert!(
        received_by(&peer, "late@example.com").is_empty(),
        "an expired message was sent"
    );
    open_and_match(&peer, "control@example.com", &control);
    assert_eq!(log_of(&store, "stale").await, vec![]);
    assert_eq!(peer.accepted_count(), 1);
}

async fn a_message_that_expires_during_a_relay_outage_is_not_sent_late(backend: Backend) {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::Greeting421);
    let rule = r#"
[[rule]]
name = "prompt"
template = "thank-you"
subject = "Thank you, {{customer.first_name}}"
when = { event = "purchase", after = "0s" }
expire_after = "3s"
"#;
    let env = TestEnv::build(
        backend,
        Sink::Smtp(&peer),
        &[("prompt.toml", rule)],
        SLOW_HOUSEKEEPING,
    )
    .await;
    let store = env.store().await;
    add(&store, &[person("late", "Lea Late", None, json!({}))]).await;
    let bought = now_ms();
    happened(&store, "o-late", "late", "purchase", bought, json!({})).await;

    let daemon = start(&env).await;
    // The relay turns the daemon away until the message's three seconds are over.
    assert!(
        eventually(PATIENCE, || async { peer.connections() >= 1 }).await,
        "the daemon never tried the relay"
    );
    let expiry = bought + TimeDelta::seconds(3);
    while Utc::now() < expiry + TimeDelta::milliseconds(300) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peer.clear_faults();
    let done = eventually(PATIENCE, || async {
        log_of(&store, "late")
            .await
            .first()
            .is_some_and(|e| e.state.is_final())
    })
    .await;
    let log = log_of(&store, "late").await;
    daemon.stop().await;
    assert!(done, "no final state: {log:#?}");
    assert!(
        peer.accepted().is_empty(),
        "sent {:?} after its expiry at {expiry}: {log:#?}",
        log[0].sent_at
    );
    assert_eq!(log[0].state, MessageState::Skipped, "{log:#?}");
    assert!(
        log[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("expired")),
        "{log:#?}"
    );
}

// --- 7. SMTP replies ---------------------------------------------------------------------------

async fn smtp_replies_decide_the_state(backend: Backend) {
    let peer = SmtpPeer::start().await;
    peer.fault_for_recipient(
        "temp@",
        Fault::Reply {
            at: Stage::Rcpt,
            code: 451,
            text: "4.3.0 Mailbox busy, try again later".into(),
        },
    );
    peer.fault_for_recipient(
        "refused@",
        Fault::Reply {
            at: Stage::Data,
            code: 554,
            text: "5.6.0 Message content rejected".into(),
        },
    );
    peer.fault_for_recipient(
        "nouser@",
        Fault::Reply {
            at: Stage::Rcpt,
            code: 550,
            text: "5.1.1 No such user here".into(),
        },
    );
    let thanks = THANK_YOU_SOON.replace("after = \"2s\"", "after = \"1s\"");
    let env = TestEnv::new(
        backend,
        Sink::Smtp(&peer),
        &[
            ("follow-up.toml", FOLLOW_UP_SOON),
            ("thank-you.toml", &thanks),
        ],
        "",
    )
    .await;
    let store = env.store().await;
    add(
        &store,
        &[
            person("ok", "Olive Ok", None, json!({})),
            person("temp", "Tim Temp", None, json!({})),
            person("refused", "Rob Refused", None, json!({})),
            person("nouser", "Nobody Here", None, json!({})),
            person("unsubscribed", "Una Subscribed", None, json!({})),
            person("later", "Len Later", None, json!({})),
        ],
    )
    .await;
    // Suppressed before anything happened: no rule mails them (the address in another case).
    store
        .suppress("Unsubscribed@Example.com", "asked to be left alone", "test")
        .await
        .unwrap();
    let now = now_ms();
    for id in ["ok", "temp", "refused", "nouser", "unsubscribed"] {
        happened(
            &store,
            &format!("order-{id}"),
            id,
            "purchase",
            now,
            json!({}),
        )
        .await;
    }
    happened(
        &store,
        "call-unsub",
        "unsubscribed",
        "discovery_call",
        now,
        json!({}),
    )
    .await;
    happened(
        &store,
        "call-later",
        "later",
        "discovery_call",
        now,
        json!({}),
    )
    .await;

    let daemon = start(&env).await;
    // Suppressed after its follow-up was planned: skipped when it comes up.
    wait_planned(&store, "later", "follow-up").await;
    store
        .suppress("later@example.com", "unsubscribed", "test")
        .await
        .unwrap();

    let ok = wait_for(&store, "ok", "thank-you", MessageState::Sent).await;
    let retrying = wait_for(&store, "temp", "thank-you", MessageState::Retrying).await;
    let refused = wait_for(&store, "refused", "thank-you", MessageState::Failed).await;
    let nouser = wait_for(&store, "nouser", "thank-you", MessageState::Failed).await;
    let later = wait_for(&store, "later", "follow-up", MessageState::Skipped).await;
    peer.clear_faults();
    let temp = wait_for(&store, "temp", "thank-you", MessageState::Sent).await;

    // The bad address is suppressed now: a later event of another rule does not reach it.
    happened(
        &store,
        "call-nouser",
        "nouser",
        "discovery_call",
        now_ms(),
        json!({}),
    )
    .await;
    happened(
        &store,
        "call-ok",
        "ok",
        "discovery_call",
        now_ms(),
        json!({}),
    )
    .await;
    let ok_follow_up = wait_for(&store, "ok", "follow-up", MessageState::Sent).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    daemon.stop().await;

    open_and_match(&peer, "ok@example.com", &ok);
    assert!(
        ok.smtp_reply.as_deref().unwrap().contains("queued as"),
        "the server's reply is kept: {:?}",
        ok.smtp_reply
    );
    assert_eq!(ok.attempts, 1);
    assert!(ok_follow_up.smtp_reply.is_some());

    assert!(
        retrying
            .smtp_reply
            .as_deref()
            .is_some_and(|r| r.starts_with("451") && r.contains("Mailbox busy")),
        "{retrying:?}"
    );
    assert!(retrying.next_attempt_at > retrying.updated_at - TimeDelta::seconds(1));
    open_and_match(&peer, "temp@example.com", &temp);
    assert!(temp.attempts >= 2, "{temp:?}");
    let history = store.message_events(temp.id).await.unwrap();
    let kinds: Vec<&str> = history.iter().map(|e| e.kind.as_str()).collect();
    assert!(
        kinds.contains(&"retrying") && kinds.last() == Some(&"sent"),
        "{history:#?}"
    );
    assert!(
        history.iter().any(|e| e.kind == "retrying"
            && e.smtp_reply
                .as_deref()
                .is_some_and(|r| r.starts_with("451"))),
        "{history:#?}"
    );

    assert!(
        refused
            .smtp_reply
            .as_deref()
            .is_some_and(|r| r.starts_with("554") && r.contains("5.6.0")),
        "{refused:?}"
    );
    assert_eq!(refused.attempts, 1, "a 5xx is not retried");
    assert!(
        nouser
            .smtp_reply
            .as_deref()
            .is_some_and(|r| r.starts_with("550") && r.contains("5.1.1")),
        "{nouser:?}"
    );
    let suppressed: BTreeSet<String> = store
        .suppressions()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.email)
        .collect();
    assert_eq!(
        suppressed,
        BTreeSet::from([
            "later@example.com".to_string(),
            "nouser@example.com".to_string(),
            "unsubscribed@example.com".to_string(),
        ]),
        "only the 5.1.1 address is added by SMTP, not the 5.6.0 one"
    );
    let smtp_suppression = store
        .suppressions()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.email == "nouser@example.com")
        .unwrap();
    assert_eq!(smtp_suppression.source, "smtp");
    assert!(
        smtp_suppression.reason.contains("5.1.1"),
        "{smtp_suppression:?}"
    );

    assert!(
        later
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("suppression")),
        "{later:?}"
    );
    assert_eq!(log_of(&store, "unsubscribed").await, vec![]);
    let nouser_log = log_of(&store, "nouser").await;
    assert_eq!(nouser_log.len(), 1, "{nouser_log:#?}");
    // What the peer took: ok (twice: thanks and follow-up) and temp, nothing else.
    let mut rcpts: Vec<String> = peer
        .accepted()
        .into_iter()
        .flat_map(|a| a.rcpt_to)
        .collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        ["ok@example.com", "ok@example.com", "temp@example.com"]
    );
}

/// A retry (or a release) is due again a second later; the dispatcher must not sleep through it
/// until its next heartbeat (10 s with the shipped lease of 2 minutes).
async fn a_retry_goes_out_when_it_is_due(backend: Backend) {
    let peer = SmtpPeer::start().await;
    peer.fault_for_recipient(
        "temp@",
        Fault::Reply {
            at: Stage::Rcpt,
            code: 451,
            text: "4.3.0 Mailbox busy, try again later".into(),
        },
    );
    let thanks = THANK_YOU_SOON.replace("after = \"2s\"", "after = \"0s\"");
    let env = TestEnv::build(
        backend,
        Sink::Smtp(&peer),
        &[("thank-you.toml", &thanks)],
        SLOW_HOUSEKEEPING,
    )
    .await;
    let store = env.store().await;
    add(&store, &[person("temp", "Tim Temp", None, json!({}))]).await;
    happened(
        &store,
        "order-temp",
        "temp",
        "purchase",
        now_ms(),
        json!({}),
    )
    .await;

    let daemon = start(&env).await;
    let retrying = wait_for(&store, "temp", "thank-you", MessageState::Retrying).await;
    peer.clear_faults();
    let sent = wait_for(&store, "temp", "thank-you", MessageState::Sent).await;
    daemon.stop().await;
    // retry_base is 1s (+-25% jitter); allow for the claim and the SMTP exchange.
    let late = sent.sent_at.unwrap() - retrying.next_attempt_at;
    assert!(
        sent.attempts == 2 && late < TimeDelta::seconds(3),
        "due again at {}, sent at {:?} (attempt {}): {late} late",
        retrying.next_attempt_at,
        sent.sent_at,
        sent.attempts
    );
    open_and_match(&peer, "temp@example.com", &sent);
}

// --- 8. rows written by another application -------------------------------------------------

async fn rows_written_with_plain_sql_are_noticed(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let rule = r#"
[[rule]]
name = "gold-thanks"
template = "thank-you"
subject = "Thank you, {{customer.first_name}}"
when = { event = "purchase", after = "1s" }
only_if = [{ attribute = "plan", equals = "gold" }]
"#;
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("gold.toml", rule)], "").await;
    let store = env.store().await;
    add(
        &store,
        &[person(
            "first",
            "Fay First",
            None,
            json!({ "plan": "gold" }),
        )],
    )
    .await;
    happened(&store, "o-first", "first", "purchase", now_ms(), json!({})).await;
    let daemon = start(&env).await;
    // The daemon is up and has planned what it found.
    wait_for(&store, "first", "gold-thanks", MessageState::Sent).await;

    let at = Utc::now().trunc_subsecs(0);
    let offset_form = at.with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap());
    let written = std::time::Instant::now();
    match backend {
        Backend::Sqlite => {
            use sqlx::Connection;
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(env.path().join("var/touchpoint.db"))
                .busy_timeout(Duration::from_secs(10));
            let mut db = sqlx::SqliteConnection::connect_with(&options)
                .await
                .expect("open the daemon's SQLite file");
            for (id, name) in [("foreign", "Fiona Foreign"), ("offset", "Otto Offset")] {
                sqlx::query(
                    "INSERT INTO customers (id, email, name, timezone, attributes) \
                     VALUES (?, ?, ?, 'Europe/Paris', '{\"plan\": \"gold\", \"source\": \"shop\"}')",
                )
                .bind(id)
                .bind(format!("{id}@example.com"))
                .bind(name)
                .execute(&mut db)
                .await
                .unwrap();
            }
            sqlx::query(
                "INSERT INTO events (id, customer_id, kind, occurred_at, data) \
                 VALUES ('o-foreign', 'foreign', 'purchase', ?, '{\"order_number\": \"F-7\"}')",
            )
            .bind(at.format("%Y-%m-%d %H:%M:%S").to_string())
            .execute(&mut db)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO events (id, customer_id, kind, occurred_at) \
                 VALUES ('o-offset', 'offset', 'purchase', ?)",
            )
            .bind(offset_form.format("%Y-%m-%dT%H:%M:%S%:z").to_string())
            .execute(&mut db)
            .await
            .unwrap();
            let stored: Vec<String> = sqlx::query_scalar(
                "SELECT occurred_at FROM events WHERE id IN ('o-foreign', 'o-offset') ORDER BY id",
            )
            .fetch_all(&mut db)
            .await
            .unwrap();
            let canonical = at.format("%Y-%m-%dT%H:%M:%S.000Z").to_string();
            assert_eq!(
                stored,
                [canonical.clone(), canonical],
                "the trigger normalises times"
            );
            db.close().await.unwrap();
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let mut db = sqlx::PgConnection::connect(&env.database_url)
                .await
                .expect("connect to the daemon's database");
            for (id, name) in [("foreign", "Fiona Foreign"), ("offset", "Otto Offset")] {
                sqlx::query(
                    "INSERT INTO customers (id, email, name, timezone, attributes) \
                     VALUES ($1, $2, $3, 'Europe/Paris', '{\"plan\": \"gold\", \"source\": \"shop\"}'::jsonb)",
                )
                .bind(id)
                .bind(format!("{id}@example.com"))
                .bind(name)
                .execute(&mut db)
                .await
                .unwrap();
            }
            sqlx::query(
                "INSERT INTO events (id, customer_id, kind, occurred_at, data) \
                 VALUES ('o-foreign', 'foreign', 'purchase', $1::timestamptz, '{\"order_number\": \"F-7\"}'::jsonb)",
            )
            .bind(format!("{} UTC", at.format("%Y-%m-%d %H:%M:%S")))
            .execute(&mut db)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO events (id, customer_id, kind, occurred_at) \
                 VALUES ('o-offset', 'offset', 'purchase', $1::timestamptz)",
            )
            .bind(offset_form.format("%Y-%m-%d %H:%M:%S%:z").to_string())
            .execute(&mut db)
            .await
            .unwrap();
            db.close().await.unwrap();
        }
    }
    let foreign = wait_for(&store, "foreign", "gold-thanks", MessageState::Sent).await;
    let offset = wait_for(&store, "offset", "gold-thanks", MessageState::Sent).await;
    let noticed_in = written.elapsed();
    daemon.stop().await;
    assert!(noticed_in < Duration::from_secs(8), "took {noticed_in:?}");
    for entry in [&foreign, &offset] {
        assert_eq!(entry.trigger_at, at + TimeDelta::seconds(1), "{entry:?}");
    }
    let mail = open_and_match(&peer, "foreign@example.com", &foreign);
    assert_eq!(mail.subject, "Thank you, Fiona");
    assert!(mail.text.contains("(no. F-7)"), "{}", mail.text);
    open_and_match(&peer, "offset@example.com", &offset);
    let event = store.event("o-offset").await.unwrap().unwrap();
    assert_eq!(event.occurred_at, at);
    assert_eq!(event.data, json!({}));
    let customer = store.customer("foreign").await.unwrap().unwrap();
    assert_eq!(
        customer.attributes,
        json!({ "plan": "gold", "source": "shop" })
    );
}

/// Another application's transactions commit in any order: an event whose transaction took its
/// `seq` first but committed last is still noticed within seconds (not only at the next full
/// reconciliation, a minute away here and five by default).
async fn an_event_committed_after_a_later_one_is_noticed(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let thanks = THANK_YOU_SOON.replace("after = \"2s\"", "after = \"0s\"");
    let env = TestEnv::new(
        backend,
        Sink::Smtp(&peer),
        &[("thank-you.toml", &thanks)],
        "",
    )
    .await;
    let store = env.store().await;
    add(
        &store,
        &[
            person("slow", "Sam Slow", None, json!({})),
            person("quick", "Quinn Quick", None, json!({})),
        ],
    )
    .await;
    let daemon = start(&env).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let at = Utc::now()
        .trunc_subsecs(0)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    match backend {
        Backend::Postgres => {
            use sqlx::Connection;
            let mut slow = sqlx::PgConnection::connect(&env.database_url)
                .await
                .unwrap();
            let mut quick = sqlx::PgConnection::connect(&env.database_url)
                .await
                .unwrap();
            let mut transaction = slow.begin().await.unwrap();
            sqlx::query(
                "INSERT INTO events (id, customer_id, kind, occurred_at) \
                 VALUES ('o-slow', 'slow', 'purchase', $1::timestamptz)",
            )
            .bind(format!("{at} UTC"))
            .execute(&mut *transaction)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO events (id, customer_id, kind, occurred_at) \
                 VALUES ('o-quick', 'quick', 'purchase', $1::timestamptz)",
            )
            .bind(format!("{at} UTC"))
            .execute(&mut quick)
            .await
            .unwrap();
            // The planner moves past the quick event (and the slow one's seq) meanwhile.
            wait_for(&store, "quick", "thank-you", MessageState::Sent).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            transaction.commit().await.unwrap();
        }
        Backend::Sqlite => {
            // One writer at a time: seq order is commit order, so this is the plain case.
            use sqlx::Connection;
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(env.path().join("var/touchpoint.db"))
                .busy_timeout(Duration::from_secs(10));
            let mut db = sqlx::SqliteConnection::connect_with(&options)
                .await
                .unwrap();
            for (id, customer) in [("o-quick", "quick"), ("o-slow", "slow")] {
                sqlx::query(
                    "INSERT INTO events (id, customer_id, kind, occurred_at) VALUES (?, ?, 'purchase', ?)",
                )
                .bind(id)
                .bind(customer)
                .bind(&at)
                .execute(&mut db)
                .await
                .unwrap();
            }
            wait_for(&store, "quick", "thank-you", MessageState::Sent).await;
        }
    }
    let committed = std::time::Instant::now();
    let slow = wait_for(&store, "slow", "thank-you", MessageState::Sent).await;
    let noticed_in = committed.elapsed();
    daemon.stop().await;
    assert!(noticed_in < Duration::from_secs(8), "took {noticed_in:?}");
    open_and_match(&peer, "slow@example.com", &slow);
    assert_eq!(peer.accepted_count(), 2);
}

// --- 9. HTML escaping ------------------------------------------------------------------------

async fn a_hostile_name_is_escaped_in_html_only(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let greeting = r#"
[[rule]]
name = "greeting"
template = "greeting"
subject = "Welcome, {{customer.name}}"
when = { event = "signup", after = "1s" }
"#;
    let thanks = THANK_YOU_SOON.replace("after = \"2s\"", "after = \"1s\"");
    let env = TestEnv::new(
        backend,
        Sink::Smtp(&peer),
        &[("greeting.toml", greeting), ("thank-you.toml", &thanks)],
        "",
    )
    .await;
    template(
        &env,
        "greeting",
        "{{#> layout}}<p>Welcome, {{customer.name}}!</p><p>{{default event.data.note \"\"}}</p>{{/layout}}\n",
        "Welcome, {{customer.name}}!\n{{default event.data.note \"\"}}\n\n{{> text-footer}}\n",
    );
    let name = r#"<script>alert(1)</script> & "Bob""#;
    let note = "<b>bold</b> & 'quoted'";
    let store = env.store().await;
    add(&store, &[person("mallory", name, None, json!({}))]).await;
    let now = now_ms();
    happened(
        &store,
        "s-1",
        "mallory",
        "signup",
        now,
        json!({ "note": note }),
    )
    .await;
    happened(&store, "o-1", "mallory", "purchase", now, json!({})).await;

    let daemon = start(&env).await;
    let welcome = wait_for(&store, "mallory", "greeting", MessageState::Sent).await;
    let thank_you = wait_for(&store, "mallory", "thank-you", MessageState::Sent).await;
    daemon.stop().await;

    let all = received_by(&peer, "mallory@example.com");
    assert_eq!(all.len(), 2);
    let by_id = |entry: &LogEntry| {
        let id = entry
            .message_id
            .as_deref()
            .unwrap()
            .trim_matches(['<', '>']);
        let accepted = all
            .iter()
            .find(|a| a.message_id.as_deref() == Some(id))
            .expect("the logged Message-ID was received");
        open(accepted)
    };

    let mail = by_id(&welcome);
    assert_eq!(mail.subject, format!("Welcome, {name}"));
    assert_eq!(Some(&mail.subject), welcome.subject.as_ref());
    assert_eq!(mail.to.0.as_deref(), Some(name), "the To display name");
    assert!(
        mail.text.contains(&format!("Welcome, {name}!")),
        "{}",
        mail.text
    );
    assert!(mail.text.contains(note), "{}", mail.text);
    let escaped = "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;Bob&quot;";
    assert!(
        mail.html.contains(&format!("Welcome, {escaped}!")),
        "{}",
        mail.html
    );
    assert!(
        mail.html.contains("&lt;b&gt;bold&lt;/b&gt; &amp; "),
        "{}",
        mail.html
    );
    assert!(!mail.html.contains("<script"), "{}", mail.html);
    assert!(!mail.html.contains("<b>"), "{}", mail.html);

    // The shipped template: the first word of the name.
    let mail = by_id(&thank_you);
    assert_eq!(
        mail.subject,
        "Thank you for your order, <script>alert(1)</script>"
    );
    assert!(
        mail.text.starts_with("Hi <script>alert(1)</script>,"),
        "{}",
        mail.text
    );
    assert!(
        mail.html
            .contains("Hi &lt;script&gt;alert(1)&lt;/script&gt;,"),
        "{}",
        mail.html
    );
    assert!(!mail.html.contains("<script"), "{}", mail.html);
}

// --- 10. restart under load ---------------------------------------------------------------

async fn a_restart_under_load_sends_each_message_exactly_once(backend: Backend) {
    const N: usize = 200;
    let peer = SmtpPeer::start().await;
    // Slow replies, so that stopping lands in the middle of the work.
    peer.set_reply_delay(Duration::from_millis(15));
    let rule = THANK_YOU_SOON.replace("after = \"2s\"", "after = \"0s\"");
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("thank-you.toml", &rule)], "").await;
    let store = env.store().await;
    let people: Vec<Customer> = (0..N)
        .map(|i| person(&format!("c{i:03}"), &format!("Cust {i}"), None, json!({})))
        .collect();
    add(&store, &people).await;
    let now = now_ms();
    let events: Vec<Event> = (0..N)
        .map(|i| Event {
            id: format!("o{i:03}"),
            customer_id: format!("c{i:03}"),
            kind: "purchase".into(),
            occurred_at: now,
            data: json!({}),
        })
        .collect();
    assert_eq!(store.insert_events(&events).await.unwrap(), N as u64);

    let daemon = start(&env).await;
    assert!(
        peer.wait_for_accepted(N / 4, Duration::from_secs(20)).await,
        "only {} sent",
        peer.accepted_count()
    );
    daemon.stop().await;
    let at_stop = peer.accepted_count();
    assert!(
        at_stop < N,
        "all {N} went out before the stop: not a restart mid-way"
    );
    // A graceful stop leaves nothing half done: every accepted message is recorded as sent.
    let counts = states(&store).await;
    assert_eq!(counts.get("sent"), Some(&at_stop), "{counts:?}");
    assert_eq!(counts.get("sending"), None, "{counts:?}");
    assert_eq!(counts.get("unknown"), None, "{counts:?}");

    let daemon = start(&env).await;
    assert!(
        peer.wait_for_accepted(N, Duration::from_secs(25)).await,
        "only {} sent after the restart",
        peer.accepted_count()
    );
    assert!(
        eventually(PATIENCE, || async {
            states(&store).await.get("sent") == Some(&N)
        })
        .await,
        "{:?}",
        states(&store).await
    );
    // Give a duplicate a chance to show up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    daemon.stop().await;

    let accepted = peer.accepted();
    assert_eq!(
        accepted.len(),
        N,
        "accepted {} messages for {N} events",
        accepted.len()
    );
    let ids: BTreeSet<String> = accepted
        .iter()
        .filter_map(|a| a.message_id.clone())
        .collect();
    assert_eq!(ids.len(), N, "a Message-ID was accepted twice");
    let rcpts: BTreeSet<String> = accepted.iter().flat_map(|a| a.rcpt_to.clone()).collect();
    assert_eq!(rcpts.len(), N);
    let log = whole_log(&store).await;
    assert_eq!(log.len(), N);
    let logged: BTreeSet<String> = log
        .iter()
        .map(|e| {
            assert_eq!(e.state, MessageState::Sent, "{e:?}");
            assert_eq!(e.attempts, 1, "{e:?}");
            e.message_id
                .as_deref()
                .unwrap()
                .trim_matches(['<', '>'])
                .to_string()
        })
        .collect();
    assert_eq!(logged, ids);
}

// --- the original smoke scenario -----------------------------------------------------------

async fn a_purchase_is_thanked_once_over_smtp(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let env = TestEnv::new(
        backend,
        Sink::Smtp(&peer),
        &[("thank-you.toml", THANK_YOU_SOON)],
        "",
    )
    .await;
    let store = env.store().await;
    env.add_customer(
        &store,
        "c1",
        "ada@example.com",
        "Ada Lovelace",
        Some("Europe/London"),
    )
    .await;
    env.add_event(&store, "order-1", "c1", "purchase", Utc::now())
        .await;

    let daemon = start(&env).await;
    assert!(
        peer.wait_for_accepted(1, Duration::from_secs(15)).await,
        "the thank-you was not sent"
    );
    let accepted = &peer.accepted()[0];
    assert_eq!(accepted.rcpt_to, vec!["ada@example.com".to_string()]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            states(&store).await.get("sent") == Some(&1)
        })
        .await
    );
    let log = store.log(&Default::default()).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].state.to_string(), "sent");
    assert!(
        log[0]
            .smtp_reply
            .as_deref()
            .unwrap_or_default()
            .starts_with("250"),
        "{:?}",
        log[0].smtp_reply
    );
    assert_eq!(
        log[0]
            .message_id
            .as_deref()
            .map(|m| m.trim_matches(['<', '>'])),
        accepted.message_id.as_deref()
    );
    assert!(log[0].sent_at.unwrap() - log[0].due_at < TimeDelta::seconds(5));
    daemon.stop().await;

    // A restart plans again and sends nothing twice.
    let daemon = start(&env).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    daemon.stop().await;
    assert_eq!(peer.accepted().len(), 1);
    assert!(
        eventually(Duration::from_secs(1), || async {
            states(&store).await.get("sent") == Some(&1)
        })
        .await
    );
}

/// A first pass larger than one insert batch (20,000 rows, written while the next pages are
/// read): every event gets exactly one message, and a full pass again plans none.
async fn a_pass_over_several_batches_plans_each_event_once(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("thanks.toml", THANK_YOU_SOON)], "").await;
    let store = env.store().await;
    let n = 45_000;
    let (customers, events) = match backend {
        Backend::Sqlite => (
            format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) \
                 INSERT INTO customers (id, email) SELECT 'c' || i, 'c' || i || '@example.com' FROM n"
            ),
            format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) \
                 INSERT INTO events (id, customer_id, kind, occurred_at) \
                 SELECT 'e' || i, 'c' || i, 'purchase', strftime('%Y-%m-%dT%H:%M:%fZ', 'now') FROM n"
            ),
        ),
        Backend::Postgres => (
            format!(
                "INSERT INTO customers (id, email) SELECT 'c' || i, 'c' || i || '@example.com' \
                 FROM generate_series(1, {n}) AS i"
            ),
            format!(
                "INSERT INTO events (id, customer_id, kind, occurred_at) \
                 SELECT 'e' || i, 'c' || i, 'purchase', now() FROM generate_series(1, {n}) AS i"
            ),
        ),
    };
    raw_sql(&env, &customers).await;
    raw_sql(&env, &events).await;
    let mut planned = Vec::new();
    for _ in 0..2 {
        let (_, report) = plan_from_start(&env, &store).await;
        planned.push(report.inserted);
    }
    assert_eq!(planned, vec![n, 0]);
    assert_eq!(
        store
            .count_state(MessageState::Scheduled)
            .await
            .expect("count"),
        i64::try_from(n).expect("small")
    );
}

/// `seq` has gaps (on PostgreSQL every upsert of an existing customer uses up a value): a pass
/// over a sparse range still finds every row, without a query per empty stretch.
async fn a_sparse_seq_range_is_planned_whole(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("thanks.toml", THANK_YOU_SOON)], "").await;
    let store = env.store().await;
    add(&store, &[person("ada", "Ada", None, json!({}))]).await;
    let now = now_ms();
    for (n, next_seq) in [(1, 0_i64), (2, 150_000), (3, 2_000_000)] {
        if next_seq > 0 {
            let sql = match backend {
                Backend::Sqlite => {
                    format!("UPDATE sqlite_sequence SET seq = {next_seq} WHERE name = 'events'")
                }
                Backend::Postgres => format!("SELECT setval('events_seq_seq', {next_seq})"),
            };
            raw_sql(&env, &sql).await;
        }
        happened(&store, &format!("o-{n}"), "ada", "purchase", now, json!({})).await;
    }
    let (cursors, report) = plan_from_start(&env, &store).await;
    assert_eq!(report.inserted, 3, "{:#?}", whole_log(&store).await);
    assert_eq!(cursors.events, 2_000_001);
}

const ANNIVERSARY: &str = r#"
[[rule]]
name = "anniversary"
template = "anniversary"
subject = "Happy anniversary, {{customer.first_name}}!"
when = { anniversary_of = "wedding", at = "09:00" }
"#;

/// A wedding on the day `days` from today, five years ago (a plain date, as imports give).
fn wedding_day(days: i64) -> DateTime<Utc> {
    let day = Utc::now().date_naive() + TimeDelta::days(days);
    let then =
        NaiveDate::from_ymd_opt(day.year() - 5, day.month(), day.day().min(28)).expect("a date");
    then.and_time(NaiveTime::MIN).and_utc()
}

/// `planner.horizon` (35 days by default): an anniversary further ahead gets no message yet,
/// and every full pass leaves it so, with no second message for the near one; `touchpoint
/// plan` and `why` show it as not yet planned.
async fn anniversaries_are_planned_within_the_horizon(backend: Backend) {
    let env = TestEnv::new(
        backend,
        Sink::Files,
        &[("anniversary.toml", ANNIVERSARY)],
        "",
    )
    .await;
    let store = env.store().await;
    let utc = Some("UTC");
    add(
        &store,
        &[
            person("soon", "Sam Soon", utc, json!({})),
            person("later", "Lou Later", utc, json!({})),
        ],
    )
    .await;
    happened(
        &store,
        "w-soon",
        "soon",
        "wedding",
        wedding_day(10),
        json!({}),
    )
    .await;
    happened(
        &store,
        "w-later",
        "later",
        "wedding",
        wedding_day(120),
        json!({}),
    )
    .await;
    let config = env.config();
    assert_eq!(config.planner.horizon, TimeDelta::days(35));
    for pass in 0..2 {
        let (_, report) = plan_from_start(&env, &store).await;
        assert_eq!(report.inserted, 1 - pass, "{:#?}", whole_log(&store).await);
    }
    let soon = log_of(&store, "soon").await;
    assert_eq!(soon.len(), 1);
    assert_eq!(
        soon[0].due_at.date_naive(),
        (Utc::now() + TimeDelta::days(10)).date_naive()
    );
    assert_eq!(log_of(&store, "later").await, vec![]);

    let playbook = touchpoint::playbook::Playbook::load(&config).expect("playbook");
    let settings = touchpoint::plan::PlanSettings::from_config(&config);
    let upcoming = touchpoint::query::upcoming(&playbook, &settings, &store, 200)
        .await
        .expect("upcoming");
    let status = |customer: &str| {
        upcoming
            .rows
            .iter()
            .filter(|r| r.customer_id == customer)
            .map(|r| r.status.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(status("soon"), vec!["scheduled"]);
    assert_eq!(status("later"), vec!["not yet planned"]);

    let (ok, out, err) = env.run_cli(&[
        "why",
        "--customer",
        "later",
        "--rule",
        "anniversary",
        "--format",
        "json",
    ]);
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(rows[0]["reason"], "not_yet_planned", "{out}");
}

/// Runs one statement on the daemon's own database, as another application would.
async fn raw_sql(env: &TestEnv, sql: &str) {
    use sqlx::Connection;
    match env.backend {
        Backend::Sqlite => {
            let mut db = sqlx::SqliteConnection::connect(&format!(
                "sqlite:{}",
                env.path().join("var/touchpoint.db").display()
            ))
            .await
            .expect("open the daemon's SQLite file");
            sqlx::raw_sql(sql).execute(&mut db).await.expect(sql);
        }
        Backend::Postgres => {
            let mut db = sqlx::PgConnection::connect(&env.database_url)
                .await
                .expect("connect");
            sqlx::raw_sql(sql).execute(&mut db).await.expect(sql);
        }
    }
}

on_both_backends!(
    a_pass_over_several_batches_plans_each_event_once,
    anniversaries_are_planned_within_the_horizon,
    a_sparse_seq_range_is_planned_whole,
    a_purchase_is_thanked_once_over_smtp,
    the_three_example_rules_end_to_end,
    a_purchase_before_the_follow_up_is_due_skips_it,
    a_purchase_already_made_prevents_planning_the_follow_up,
    a_monthly_note_is_skipped_after_a_recent_purchase,
    only_customers_matching_only_if_are_mailed,
    the_send_window_holds_a_message_until_it_opens_in_the_customers_zone,
    a_new_rule_does_not_reach_back_past_expire_after,
    a_planned_message_that_became_overdue_is_skipped_not_sent,
    a_message_that_expires_during_a_relay_outage_is_not_sent_late,
    smtp_replies_decide_the_state,
    a_retry_goes_out_when_it_is_due,
    rows_written_with_plain_sql_are_noticed,
    an_event_committed_after_a_later_one_is_noticed,
    a_hostile_name_is_escaped_in_html_only,
    a_restart_under_load_sends_each_message_exactly_once,
);
