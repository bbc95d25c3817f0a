//! Replies become events, end to end: the real daemon sends over SMTP to the test peer with a
//! signed `Reply-To`, customers' replies are piped into the real `touchpoint inbound` binary,
//! and a follow-up with `unless = [{ event = "replied", since = "trigger" }]` is skipped for
//! those who answered and sent to those who did not (an out-of-office note is no answer).

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use mail_parser::MessageParser;
use support::smtp::{Accepted, SmtpPeer};
use support::{Backend, Sink, TestEnv};
use tokio::time::Instant;
use touchpoint::store::{LogEntry, LogFilter, MessageState, SharedStore};

const PATIENCE: Duration = Duration::from_secs(40);

const RULES: &str = r#"
[[rule]]
name = "thanks"
template = "thank-you"
subject = "Thank you, {{customer.first_name}}"
when = { event = "purchase", after = "1s" }

[[rule]]
name = "check-in"
template = "follow-up"
subject = "How is it going, {{customer.first_name}}?"
when = { event = "purchase", after = "12s" }
unless = [{ event = "replied", since = "trigger" }]
"#;

const REPLIES: &str = "[replies]\naddress = \"replies@acme.example\"\n";

struct World {
    peer: SmtpPeer,
    env: TestEnv,
    store: SharedStore,
}

impl World {
    async fn new(backend: Backend) -> World {
        let peer = SmtpPeer::start().await;
        let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("r.toml", RULES)], REPLIES).await;
        let store = env.store().await;
        World { peer, env, store }
    }

    async fn sent(&self, rule: &str, customer: &str) -> (LogEntry, Accepted) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let entry = self.entry(rule, customer).await;
            if let Some(entry) = entry.filter(|e| e.state == MessageState::Sent) {
                let id = entry.message_id.clone().unwrap_or_default();
                let id = id.trim_matches(['<', '>']).to_string();
                let accepted = self
                    .peer
                    .accepted()
                    .into_iter()
                    .find(|a| a.message_id.as_deref() == Some(&id));
                if let Some(accepted) = accepted {
                    return (entry, accepted);
                }
            }
            assert!(Instant::now() < deadline, "no sent {rule} for {customer}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn entry(&self, rule: &str, customer: &str) -> Option<LogEntry> {
        let log = self.store.log(&LogFilter::default()).await.expect("log");
        log.into_iter()
            .find(|e| e.rule == rule && e.customer_id == customer)
    }

    async fn finished(&self, rule: &str, customer: &str) -> LogEntry {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(entry) = self.entry(rule, customer).await
                && matches!(entry.state, MessageState::Sent | MessageState::Skipped)
            {
                return entry;
            }
            assert!(
                Instant::now() < deadline,
                "{rule} for {customer} never finished"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Pipes `mail` into `touchpoint inbound`; (exit code, stdout, stderr).
    fn inbound(&self, mail: &str) -> (i32, String, String) {
        let mut command = self.env.command();
        command
            .arg("inbound")
            .env_remove("RECIPIENT")
            .env_remove("ORIGINAL_RECIPIENT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        pipe(command, mail.as_bytes())
    }

    async fn events(&self, customer: &str, kind: &str) -> Vec<serde_json::Value> {
        let events = self
            .store
            .customer_events(customer, 100)
            .await
            .expect("events");
        events
            .into_iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.data)
            .collect()
    }
}

fn pipe(mut command: Command, input: &[u8]) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = command.spawn().expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    let output = child.wait_with_output().expect("wait");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The Reply-To address of a message as the peer received it.
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

fn reply(from: &str, to: &str, id: &str, in_reply_to: &str, extra: &str, body: &str) -> String {
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: Re: Thank you\r\nMessage-ID: <{id}>\r\n\
         In-Reply-To: <{in_reply_to}>\r\nDate: Thu, 3 Dec 2026 10:00:00 +0000\r\n{extra}\r\n{body}"
    )
}

async fn replies_are_recorded_and_stop_the_follow_up(backend: Backend) {
    let world = World::new(backend).await;
    for (id, email, name) in [
        ("ada", "ada@example.com", "Ada Lovelace"),
        ("grace", "grace@example.com", "Grace Hopper"),
        ("hedy", "hedy@example.com", "Hedy Lamarr"),
    ] {
        world
            .env
            .add_customer(&world.store, id, email, name, None)
            .await;
        world
            .env
            .add_event(&world.store, &format!("p-{id}"), id, "purchase", Utc::now())
            .await;
    }
    let daemon = world.env.start().await;
    let (ada_thanks, ada_mail) = world.sent("thanks", "ada").await;
    let (grace_thanks, grace_mail) = world.sent("thanks", "grace").await;
    let (hedy_thanks, _) = world.sent("thanks", "hedy").await;

    let ada_reply_to = reply_to(&ada_mail);
    assert!(
        ada_reply_to.starts_with(&format!("replies+{}.", ada_thanks.id))
            && ada_reply_to.ends_with("@acme.example"),
        "{ada_reply_to}"
    );
    assert_ne!(ada_reply_to, reply_to(&grace_mail), "a tag per message");

    // Ada answers through the tagged address; her mail client's In-Reply-To is stale.
    let ada = reply(
        "Ada <ada@example.com>",
        &format!("Acme Flowers <{ada_reply_to}>"),
        "ada-1@example.com",
        "nothing-of-ours@example.com",
        "",
        "Thank you, the roses are lovely!\r\n\r\nOn Thu, Acme Flowers wrote:\r\n> Thank you for your order\r\n",
    );
    let (code, out, err) = world.inbound(&ada);
    assert_eq!(code, 0, "{out}{err}");
    let expected = format!(
        "recorded replied for customer ada (message {}, rule thanks, matched by tag)",
        ada_thanks.id
    );
    assert!(out.contains(&expected), "{out}{err}");
    let (code, out, _) = world.inbound(&ada);
    assert!(
        code == 0 && out.contains("counted once"),
        "a redelivery: {out}"
    );
    let ada_events = world.events("ada", "replied").await;
    assert_eq!(ada_events.len(), 1, "{ada_events:?}");
    assert_eq!(ada_events[0]["rule"], "thanks");
    assert_eq!(ada_events[0]["message_id"], ada_thanks.id);
    assert_eq!(ada_events[0]["snippet"], "Thank you, the roses are lovely!");
    assert_eq!(ada_events[0]["auto"], false);
    let history = world
        .store
        .message_events(ada_thanks.id)
        .await
        .expect("history");
    assert_eq!(history.iter().filter(|e| e.kind == "replied").count(), 1);

    // Grace's out-of-office note is recorded as such, not as a reply.
    let grace = reply(
        "grace@example.com",
        &reply_to(&grace_mail),
        "ooo-1@example.com",
        grace_thanks
            .message_id
            .as_deref()
            .unwrap_or_default()
            .trim_matches(['<', '>']),
        "Auto-Submitted: auto-replied\r\n",
        "I am away until Monday.\r\n",
    );
    let (code, out, err) = world.inbound(&grace);
    assert!(
        code == 0 && out.contains("recorded auto_replied for customer grace"),
        "{out}{err}"
    );
    assert!(world.events("grace", "replied").await.is_empty());
    assert_eq!(world.events("grace", "auto_replied").await[0]["auto"], true);

    // Hedy writes to the plain address: her In-Reply-To names our Message-ID.
    let hedy_id = hedy_thanks.message_id.clone().unwrap_or_default();
    let hedy = reply(
        "hedy@example.com",
        "hello@acme.example",
        "hedy-1@example.com",
        hedy_id.trim_matches(['<', '>']),
        "",
        "Yes, please call me.\r\n",
    );
    let (code, out, err) = world.inbound(&hedy);
    assert!(
        code == 0
            && out.contains("customer hedy (message")
            && out.contains("matched by in-reply-to"),
        "{out}{err}"
    );

    // A forged tag changes nothing, even from the customer's own address.
    let forged_to = format!(
        "replies+{}.{}@acme.example",
        grace_thanks.id,
        "0".repeat(20)
    );
    let forged = reply(
        "grace@example.com",
        &forged_to,
        "forged-1@example.com",
        "x@example.com",
        "",
        "Stop it.\r\n",
    );
    let (code, out, _) = world.inbound(&forged);
    assert!(code == 0 && out.contains("ignored: not believed"), "{out}");
    assert!(world.events("grace", "replied").await.is_empty());

    assert_eq!(
        world.finished("check-in", "ada").await.state,
        MessageState::Skipped
    );
    assert_eq!(
        world.finished("check-in", "hedy").await.state,
        MessageState::Skipped
    );
    assert_eq!(
        world.finished("check-in", "grace").await.state,
        MessageState::Sent,
        "an auto-reply is no answer"
    );
    let metrics = support::http::send(daemon.http, "GET", "/metrics", &[], b"").await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics.contains("touchpoint_replies_total{rule=\"thanks\"} 2\n"),
        "Ada's and Hedy's replies, not Grace's auto-reply: {metrics}"
    );
    daemon.stop().await;

    // Known only by the sender's address (any case): a reply with no message.
    let fresh = "From: ADA@Example.com\r\nTo: replies@acme.example\r\nSubject: A question\r\nMessage-ID: <ada-2@example.com>\r\n\r\nDo you deliver on Sundays?\r\n";
    let (code, out, _) = world.inbound(fresh);
    assert!(
        code == 0 && out.contains("customer ada (message -, rule -, matched by sender)"),
        "{out}"
    );
    let latest = world
        .store
        .latest_event("ada", "replied")
        .await
        .expect("read")
        .expect("an event");
    assert_eq!(latest.data["snippet"], "Do you deliver on Sundays?");
    assert!(latest.data["message_id"].is_null());

    let stranger = "From: someone@elsewhere.example\r\nTo: replies@acme.example\r\nSubject: hi\r\n\r\nhello\r\n";
    let (code, out, _) = world.inbound(stranger);
    assert!(
        code == 0 && out.contains("ignored: no message or customer matches"),
        "{out}"
    );
}

on_both_backends!(replies_are_recorded_and_stop_the_follow_up);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_mail_is_logged_with_the_reason_and_never_crashes() {
    let world = World::new(Backend::Sqlite).await;
    for garbage in [
        "",
        "no headers at all",
        "Subject: no sender\r\n\r\nbody\r\n",
    ] {
        let (code, out, err) = world.inbound(garbage);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("ignored: cannot read the mail"), "{out}");
        assert!(
            err.contains("inbound mail ignored"),
            "the log keeps the reason: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reply_address_is_a_clear_error() {
    let peer = SmtpPeer::start().await;
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Smtp(&peer),
        &[("r.toml", RULES)],
        "[replies]\naddress = \"replies+x@acme.example\"\n",
    )
    .await;
    let (ok, out, err) = env.run_cli(&["check"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("replies.address") && err.contains("'+'"),
        "{err}"
    );
}
