//! The owner's digest (`[digest]`), end to end on both backends with the real daemon and a real
//! SMTP peer: seeded messages, ratings and replies; the digest planned for the next scheduled
//! time is made due now and goes out once, to the owner, with the period's figures; further
//! planning passes and a restart within the same period plan no second one; it is in
//! `touchpoint log` and on the owner's Upcoming and Log pages. `check` refuses a
//! bad cron with the file, the key and what is expected. (The schedule arithmetic across DST
//! changes is unit-tested in src/digest.rs.)

mod support;

use std::time::Duration;

use chrono::{DateTime, Datelike, SecondsFormat, TimeDelta, Timelike, Utc};
use mail_parser::MessageParser;
use serde_json::json;
use support::smtp::{Accepted, SmtpPeer};
use support::{Backend, Sink, TestEnv};
use touchpoint::store::{Event, LogEntry, LogFilter, NewMessage, SharedStore};

const OWNER: &str = "owner@acme.example";
const DIGEST: &str = "_digest";

const RULES: &str = r#"
[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "1h" }

[[rule]]
name = "follow-up"
template = "follow-up"
subject = "How is it going, {{customer.first_name}}?"
when = { event = "discovery_call", after = "3d" }
"#;

/// A weekly schedule whose next time is three and a half days away, in Berlin: the period
/// (since the previous time) then holds what happened in the last hours but not what happened
/// eight days ago, whatever the day the test runs.
fn schedule_from(now: DateTime<Utc>) -> String {
    let target = (now + TimeDelta::hours(84)).with_timezone(&chrono_tz::Europe::Berlin);
    format!(
        "{} {} * * {}",
        target.minute(),
        target.hour(),
        target.weekday().num_days_from_sunday()
    )
}

async fn world(backend: Backend, peer: &SmtpPeer, digest: &str) -> TestEnv {
    let extra = format!(
        "[links]\nbase_url = \"https://mail.acme.example\"\n\n[defaults]\ntimezone = \"Europe/Berlin\"\n\n{digest}"
    );
    let env = TestEnv::new(backend, Sink::Smtp(peer), &[("rules.toml", RULES)], &extra).await;
    let config = std::fs::read_to_string(&env.config_path).expect("config");
    let config = config.replace(
        "address = \"1 Garden Lane, Springfield\"",
        &format!("address = \"1 Garden Lane, Springfield\"\nowner_email = \"{OWNER}\""),
    );
    std::fs::write(&env.config_path, config).expect("config");
    env
}

fn at(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn message(rule: &str, key: &str, customer: &str, due: DateTime<Utc>) -> NewMessage {
    NewMessage {
        rule: rule.into(),
        customer_id: customer.into(),
        event_id: None,
        dedupe_key: key.into(),
        trigger_at: due,
        due_at: due,
        expires_at: Some(due + TimeDelta::days(1)),
        detail: json!({}),
    }
}

fn event(
    id: &str,
    customer: &str,
    kind: &str,
    when: DateTime<Utc>,
    data: serde_json::Value,
) -> Event {
    Event {
        id: id.into(),
        customer_id: customer.into(),
        kind: kind.into(),
        occurred_at: when,
        data,
    }
}

/// Messages, ratings and replies: some in the period, some eight days old.
async fn seed(env: &TestEnv, store: &SharedStore, now: DateTime<Utc>) {
    env.add_customer(store, "c1", "ada@example.com", "Ada Lovelace", None)
        .await;
    env.add_customer(store, "c2", "bob@example.com", "Bob Smith", None)
        .await;
    env.add_customer(store, "c3", "cy@example.com", "Cy Young", None)
        .await;
    let hours = |h: i64| now - TimeDelta::hours(h);
    let future = |d: i64| now + TimeDelta::days(d);
    store
        .insert_messages(&[
            message("thank-you", "t1", "c1", hours(3)),
            message("thank-you", "t2", "c2", hours(3)),
            message("thank-you", "t3", "c3", hours(3)),
            message("thank-you", "t4", "c1", hours(3)),
            message("thank-you", "old", "c2", now - TimeDelta::days(8)),
            message("low-score-alert", "a1", "c3", hours(1)),
            message("follow-up", "f1", "c1", future(3)),
            message("follow-up", "f2", "c2", future(10)),
            message("follow-up", "f3", "c2", future(2)),
        ])
        .await
        .expect("messages");
    let finish = |key: &str, state: &str, when: DateTime<Utc>, email: &str| {
        let sent_at = if state == "sent" {
            format!(", sent_at = '{}'", at(when))
        } else {
            String::new()
        };
        format!(
            "UPDATE messages SET state = '{state}', updated_at = '{}'{sent_at}, email = '{email}' \
             WHERE dedupe_key = '{key}'",
            at(when)
        )
    };
    for sql in [
        finish("t1", "sent", hours(2), "ada@example.com"),
        finish("t2", "sent", hours(2), "bob@example.com"),
        finish("t3", "failed", hours(2), "cy@example.com"),
        finish("t4", "skipped", hours(2), "ada@example.com"),
        finish("old", "sent", now - TimeDelta::days(8), "bob@example.com"),
        // To the owner about Cy: it answers nobody.
        finish("a1", "sent", hours(1), OWNER),
    ] {
        env.execute_sql(&sql).await;
    }
    let rated = |id: &str, customer: &str, when, message: i64, scale: &str, score: i64| {
        let data =
            json!({"score": score, "scale": scale, "rule": "thank-you", "message_id": message});
        event(id, customer, "rated", when, data)
    };
    let replied = |id: &str, customer: &str, when, snippet: &str| {
        let data = json!({"rule": "thank-you", "message_id": 1, "snippet": snippet});
        event(id, customer, "replied", when, data)
    };
    store
        .insert_events(&[
            rated("r1", "c1", hours(2), 101, "csat", 5),
            rated("r2", "c2", hours(2), 102, "csat", 2),
            rated("r3", "c3", hours(2), 103, "csat", 4),
            rated("n1", "c1", hours(2), 201, "nps", 10),
            rated("n2", "c2", hours(2), 202, "nps", 9),
            rated("n3", "c3", hours(2), 203, "nps", 3),
            // Before the period: not counted.
            rated("r0", "c2", now - TimeDelta::days(8), 100, "csat", 1),
            replied(
                "p1",
                "c1",
                now - TimeDelta::minutes(30),
                "Can I change the delivery day?",
            ),
            // Bob's reply had an answer (t2, an hour later).
            replied("p2", "c2", hours(3), "Thanks, lovely flowers"),
            replied(
                "p3",
                "c3",
                now - TimeDelta::minutes(90),
                "Wrong colour, sadly",
            ),
            replied("p0", "c1", now - TimeDelta::days(8), "An old reply"),
        ])
        .await
        .expect("events");
}

async fn digests(store: &SharedStore) -> Vec<LogEntry> {
    let filter = LogFilter {
        rule: Some(DIGEST.into()),
        ..LogFilter::default()
    };
    store.log(&filter).await.expect("log")
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

/// Waits until planning passes have run: the planner's interval is 1s.
async fn a_few_planning_passes() {
    tokio::time::sleep(Duration::from_secs(3)).await;
}

async fn the_digest_goes_out_once_with_the_figures(backend: Backend) {
    let now = Utc::now();
    let peer = SmtpPeer::start().await;
    let schedule = schedule_from(now);
    let env = world(
        backend,
        &peer,
        &format!("[digest]\nschedule = \"{schedule}\"\n"),
    )
    .await;
    let store = env.store().await;
    seed(&env, &store, now).await;

    let daemon = env.start().await;
    let planned = support::eventually(Duration::from_secs(20), || async {
        digests(&store).await.len() == 1
    })
    .await;
    assert!(
        planned,
        "the digest is planned: {:?}",
        digests(&store).await
    );
    let waiting = digests(&store).await.remove(0);
    assert_eq!(waiting.state.to_string(), "scheduled");
    let local = waiting.due_at.with_timezone(&chrono_tz::Europe::Berlin);
    assert_eq!(
        format!(
            "{} {} * * {}",
            local.minute(),
            local.hour(),
            local.weekday().num_days_from_sunday()
        ),
        schedule,
        "planned for the next scheduled time, in defaults.timezone"
    );
    assert!(waiting.due_at > now + TimeDelta::days(3), "{waiting:?}");
    // Due now: the dispatcher wakes within its heartbeat.
    env.execute_sql(&format!(
        "UPDATE messages SET next_attempt_at = '{}' WHERE rule = '{DIGEST}'",
        at(Utc::now())
    ))
    .await;
    let sent = peer.wait_for_accepted(1, Duration::from_secs(30)).await;
    assert!(sent, "{:?}", support::states(&store).await);
    a_few_planning_passes().await;
    daemon.stop().await;

    let accepted = peer.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(accepted[0].rcpt_to, [OWNER]);
    let raw = String::from_utf8_lossy(&accepted[0].data);
    let headers = raw.split("\r\n\r\n").next().unwrap_or("");
    assert!(!headers.contains("List-Unsubscribe"), "{headers}");
    assert!(
        headers.contains("Subject: Acme Flowers: your touchpoint digest"),
        "{headers}"
    );
    let text = text_of(&accepted[0]);
    for expected in [
        "- low-score-alert: 1 sent, 0 failed, 0 skipped",
        "- thank-you: 2 sent, 1 failed, 1 skipped",
        // r1 5, r2 2, r3 4: two of three happy; r0 is before the period.
        "- CSAT 66.7% of 3 answers rated 4 or 5",
        // 10 and 9 promote, 3 detracts: (2 - 1) / 3.
        "- NPS +33.3 from 3 answers",
        "- Ada Lovelace (",
        "\"Can I change the delivery day?\"",
        "https://mail.acme.example/customers/c1",
        // The owner heard about Cy, but Cy heard nothing since.
        "- Cy Young (",
        "\"Wrong colour, sadly\"",
        // f1 in 3 days, f3 in 2; f2 in 10 days is further than a week.
        "- follow-up: 2",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} not in the digest:\n{text}"
        );
    }
    for unexpected in ["Bob Smith (", "An old reply", "_digest"] {
        assert!(
            !text.contains(unexpected),
            "{unexpected:?} in the digest:\n{text}"
        );
    }

    // Logged with the owner as recipient, once.
    let logged = digests(&store).await;
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].state.to_string(), "sent");
    assert_eq!(logged[0].email.as_deref(), Some(OWNER));
    let (ok, log, stderr) = env.run_cli(&["log", "--format", "csv"]);
    assert!(ok, "{stderr}");
    let line = log
        .lines()
        .find(|l| l.contains(DIGEST))
        .unwrap_or_else(|| panic!("the digest in `touchpoint log`:\n{log}"));
    assert!(line.contains(OWNER) && line.contains("sent"), "{line}");

    // A restart within the same period plans nothing new and sends nothing.
    let daemon = env.start().await;
    a_few_planning_passes().await;
    daemon.stop().await;
    assert_eq!(digests(&store).await.len(), 1);
    assert_eq!(peer.accepted_count(), 1);
}

/// The owner's page (local access, no password: no `links.base_url`) shows the planned digest
/// under Upcoming and the sent one in the Log, to the owner.
async fn the_digest_is_on_the_owners_pages(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let config = "[web]\nenabled = true\n\n[digest]\nschedule = \"0 8 * * mon\"\n";
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("rules.toml", RULES)], config).await;
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    let text = text.replace(
        "address = \"1 Garden Lane, Springfield\"",
        &format!("address = \"1 Garden Lane, Springfield\"\nowner_email = \"{OWNER}\""),
    );
    std::fs::write(&env.config_path, text).expect("config");
    let store = env.store().await;
    let daemon = env.start().await;
    let planned = support::eventually(Duration::from_secs(20), || async {
        digests(&store).await.len() == 1
    })
    .await;
    assert!(planned);
    let upcoming = support::http::get(daemon.http, "/upcoming", &[]).await;
    assert_eq!(upcoming.status, 200);
    assert!(
        upcoming.text().contains("the owner&#x27;s digest"),
        "{}",
        upcoming.text()
    );
    env.execute_sql(&format!(
        "UPDATE messages SET next_attempt_at = '{}' WHERE rule = '{DIGEST}'",
        at(Utc::now())
    ))
    .await;
    assert!(peer.wait_for_accepted(1, Duration::from_secs(30)).await);
    let logged = support::eventually(Duration::from_secs(10), || async {
        let page = support::http::get(daemon.http, "/log", &[]).await.text();
        page.contains("the owner&#x27;s digest") && page.contains(OWNER)
    })
    .await;
    let page = support::http::get(daemon.http, "/log", &[]).await.text();
    daemon.stop().await;
    assert!(logged, "{page}");
}

/// `touchpoint check` names the file, the key and what is expected.
async fn check_refuses_a_bad_cron(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let env = world(backend, &peer, "[digest]\nschedule = \"0 8 * mon\"\n").await;
    let (ok, stdout, stderr) = env.run_cli(&["check"]);
    assert!(!ok, "{stdout}");
    let config = env.config_path.display().to_string();
    assert!(stderr.contains(&format!("{config}:")), "{stderr}");
    assert!(
        stderr.contains("digest.schedule: bad cron schedule \"0 8 * mon\""),
        "{stderr}"
    );
    assert!(stderr.contains("expected 5 fields"), "{stderr}");

    // A good one is reported with its next time.
    let text = std::fs::read_to_string(&env.config_path).expect("config");
    std::fs::write(&env.config_path, text.replace("0 8 * mon", "0 8 * * mon")).expect("config");
    let (ok, stdout, stderr) = env.run_cli(&["check"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!(
            "digest: \"0 8 * * mon\" in Europe/Berlin to {OWNER} (next Mon "
        )),
        "{stdout}"
    );
}

on_both_backends!(
    the_digest_goes_out_once_with_the_figures,
    the_digest_is_on_the_owners_pages,
    check_refuses_a_bad_cron
);
