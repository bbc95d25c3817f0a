//! The README's worked example, "Closing the loop", run as written: the rules and templates
//! are read from config/examples/close-the-loop/ (the README shows the same files), with the
//! real daemon, a real SMTP peer, the rating page over real HTTP and the real
//! `touchpoint inbound` binary. A purchase brings the thank-you asking "How did we do?"; the
//! customer rates 2 with a comment; the owner is alerted and the customer's apology is planned
//! for 09:00 the next morning in their time zone, and goes out; a reply to the thank-you stops
//! the discovery-call follow-up. Time is not waited for: messages are made due by setting
//! `next_attempt_at`, as other tests do.

mod support;

use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, NaiveTime, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;
use mail_parser::MessageParser;
use support::http::{get, send};
use support::smtp::{Accepted, SmtpPeer};
use support::{Backend, Sink, TestEnv, repo_path};
use tokio::time::Instant;
use touchpoint::store::{LogEntry, LogFilter, MessageState, SharedStore};

const OWNER: &str = "owner@acme.example";
const BASE_URL: &str = "https://mail.acme.example";
const PATIENCE: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[links]
base_url = "https://mail.acme.example"

[replies]
address = "replies@acme.example"
"#;

/// The example's rule files and templates, copied as they are.
fn example_world(env: &TestEnv) {
    let example = repo_path("config/examples/close-the-loop");
    for (from, to) in [("rules", "rules"), ("templates", "templates")] {
        for entry in std::fs::read_dir(example.join(from))
            .expect("the example")
            .flatten()
        {
            std::fs::copy(entry.path(), env.path().join(to).join(entry.file_name())).expect("copy");
        }
    }
    let config = std::fs::read_to_string(&env.config_path).expect("config");
    let config = config.replace(
        "address = \"1 Garden Lane, Springfield\"",
        &format!("address = \"1 Garden Lane, Springfield\"\nowner_email = \"{OWNER}\""),
    );
    std::fs::write(&env.config_path, config).expect("config");
}

/// A whole-hour zone in which it is now between 10:00 and 11:00, so that the apology's
/// morning window (09:00 to 12:00) is open when the test makes it due.
fn zone_where_it_is_ten() -> (String, Tz) {
    let hour = i64::from(Utc::now().hour());
    let mut offset = (10 - hour).rem_euclid(24);
    if offset > 14 {
        offset -= 24;
    }
    // POSIX-style names: Etc/GMT-3 is three hours ahead of UTC.
    let name = match offset {
        0 => "Etc/GMT".to_string(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    };
    let tz: Tz = name.parse().expect("a zone");
    (name, tz)
}

async fn wait(store: &SharedStore, rule: &str, customer: &str, state: MessageState) -> LogEntry {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let log = store.log(&LogFilter::default()).await.expect("log");
        if let Some(entry) = log
            .iter()
            .find(|e| e.rule == rule && e.customer_id == customer && e.state == state)
        {
            return entry.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {state} {rule} for {customer}: {log:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn due_now(env: &TestEnv, entry: &LogEntry) {
    let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    env.execute_sql(&format!(
        "UPDATE messages SET next_attempt_at = '{now}' WHERE id = {}",
        entry.id
    ))
    .await;
}

fn mail(peer: &SmtpPeer, entry: &LogEntry) -> Accepted {
    let id = entry.message_id.clone().unwrap_or_default();
    let id = id.trim_matches(['<', '>']).to_string();
    peer.accepted()
        .into_iter()
        .find(|a| a.message_id.as_deref() == Some(id.as_str()))
        .expect("the peer has the message")
}

fn text(accepted: &Accepted) -> String {
    let message = MessageParser::default()
        .parse(&accepted.data)
        .expect("parses");
    message.body_text(0).expect("text").into_owned()
}

fn reply_to(accepted: &Accepted) -> String {
    let message = MessageParser::default()
        .parse(&accepted.data)
        .expect("parses");
    let address = message
        .reply_to()
        .and_then(|r| r.first())
        .and_then(|a| a.address());
    address.expect("a Reply-To address").to_string()
}

/// The first 09:00 in `tz` at or after `at`.
fn next_nine(at: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
    let local = at.with_timezone(&tz);
    let nine = NaiveTime::from_hms_opt(9, 0, 0).expect("09:00");
    let mut day = local.date_naive();
    if local.time() > nine {
        day = day.succ_opt().expect("tomorrow");
    }
    day.and_time(nine)
        .and_local_timezone(tz)
        .single()
        .expect("a whole-hour zone has every 09:00")
        .with_timezone(&Utc)
}

fn inbound(env: &TestEnv, mail: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = env
        .command()
        .arg("inbound")
        .env_remove("RECIPIENT")
        .env_remove("ORIGINAL_RECIPIENT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn inbound");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(mail.as_bytes())
        .expect("write");
    let output = child.wait_with_output().expect("wait");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

async fn the_loop_closes(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[], CONFIG).await;
    example_world(&env);
    let (ok, out, err) = env.run_cli(&["check"]);
    assert!(ok, "touchpoint check of the example: {out}{err}");
    let store = env.store().await;
    let (zone, tz) = zone_where_it_is_ten();
    env.add_customer(
        &store,
        "ada",
        "ada@example.com",
        "Ada Lovelace",
        Some(&zone),
    )
    .await;
    // The purchase two hours ago (the thank-you is due now), and a discovery call an hour ago
    // (its follow-up is due in three days).
    let now = Utc::now();
    env.add_event(
        &store,
        "order-1",
        "ada",
        "purchase",
        now - TimeDelta::minutes(121),
    )
    .await;
    env.add_event(
        &store,
        "call-1",
        "ada",
        "discovery_call",
        now - TimeDelta::hours(1),
    )
    .await;
    let daemon = env.start().await;

    // The thank-you asks "How did we do?" with a link per score.
    let thanks = wait(&store, "thank-you", "ada", MessageState::Sent).await;
    let thanks_mail = mail(&peer, &thanks);
    let thanks_text = text(&thanks_mail);
    assert!(thanks_text.contains("How did we do?"), "{thanks_text}");
    let two = thanks_text
        .lines()
        .find_map(|line| line.strip_prefix("2: "))
        .expect("a link for 2")
        .trim()
        .to_string();
    let path = two.strip_prefix(BASE_URL).expect("under the base URL");

    // Ada follows it and the page posts 2 with a comment.
    assert_eq!(get(daemon.http, path, &[]).await.status, 200);
    let form = ("Content-Type", "application/x-www-form-urlencoded");
    let posted = send(
        daemon.http,
        "POST",
        path,
        &[form],
        b"score=2&comment=The+roses+arrived+wilted",
    )
    .await;
    assert_eq!(posted.status, 200, "{}", posted.text());
    let rated = store
        .event(&format!("touchpoint-rating-{}", thanks.id))
        .await
        .expect("read")
        .expect("the rated event");

    // The owner is alerted (after the rule's five minutes: made due now).
    let alert = wait(&store, "low-score-alert", "ada", MessageState::Scheduled).await;
    due_now(&env, &alert).await;
    let alert = wait(&store, "low-score-alert", "ada", MessageState::Sent).await;
    assert_eq!(alert.email.as_deref(), Some(OWNER));
    let alert_text = text(&mail(&peer, &alert));
    assert!(
        alert_text.contains("rated us 2 of 5 and wrote: \"The roses arrived wilted\""),
        "{alert_text}"
    );
    assert!(
        alert_text.contains("https://mail.acme.example/customers/ada"),
        "{alert_text}"
    );

    // The apology is planned for 09:00 the next morning in Ada's zone, and goes out.
    let apology = wait(&store, "apology", "ada", MessageState::Scheduled).await;
    let morning = next_nine(rated.occurred_at + TimeDelta::hours(9), tz);
    assert_eq!(apology.due_at, morning, "in {zone}");
    assert!(
        morning - rated.occurred_at > TimeDelta::hours(9)
            && morning - rated.occurred_at < TimeDelta::hours(24),
        "the next morning: {morning} after a rating at {}",
        rated.occurred_at
    );
    due_now(&env, &apology).await;
    let apology = wait(&store, "apology", "ada", MessageState::Sent).await;
    assert_eq!(apology.email.as_deref(), Some("ada@example.com"));
    let apology_text = text(&mail(&peer, &apology));
    assert!(
        apology_text.contains("I am sorry") && apology_text.contains("The roses arrived wilted"),
        "{apology_text}"
    );

    // Ada answers the thank-you; the follow-up of her discovery call is then not sent.
    let follow_up = wait(
        &store,
        "discovery-call-follow-up",
        "ada",
        MessageState::Scheduled,
    )
    .await;
    let reply = format!(
        "From: Ada <ada@example.com>\r\nTo: Acme Flowers <{}>\r\nSubject: Re: Thank you\r\n\
         Message-ID: <ada-reply-1@example.com>\r\nDate: Thu, 3 Dec 2026 10:00:00 +0000\r\n\r\n\
         We have decided: the peonies, for the 12th.\r\n",
        reply_to(&thanks_mail)
    );
    let (ok, said) = inbound(&env, &reply);
    assert!(
        ok && said.contains("recorded replied for customer ada"),
        "{said}"
    );
    due_now(&env, &follow_up).await;
    let skipped = wait(
        &store,
        "discovery-call-follow-up",
        "ada",
        MessageState::Skipped,
    )
    .await;
    assert!(
        skipped
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("\"replied\" event since the triggering event"),
        "{skipped:#?}"
    );
    daemon.stop().await;

    // Three messages, each once: the thank-you, the alert, the apology; no follow-up.
    let rcpts: Vec<Vec<String>> = peer.accepted().iter().map(|a| a.rcpt_to.clone()).collect();
    assert_eq!(rcpts.len(), 3, "{rcpts:?}");
}

on_both_backends!(the_loop_closes);
