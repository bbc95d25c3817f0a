//! Delivery under SMTP faults, and a model of the message state machine.
//!
//! # What each SMTP fault does to a message
//!
//! Every case runs the real daemon in-process (SQLite) against a real SMTP peer on loopback and
//! checks the message row (state, attempts, kept reply or reason) and what the peer accepted.
//! "Relay paused" means: the attempt is not counted, the message goes back to `scheduled`, and
//! nobody sends until the relay's backoff runs out.
//!
//! | Fault (where)                                  | Outcome                                                    | Attempts       | Kept                           | Peer accepted     |
//! |------------------------------------------------|------------------------------------------------------------|----------------|--------------------------------|-------------------|
//! | connection refused (no server on the port)     | `scheduled`, relay paused; `sent` once a server listens    | 0, then 1      | reason "mail relay is unavailable" | 0, then 1     |
//! | connection closed before the greeting          | as refused                                                 | 0, then 1      | reason                         | 0, then 1         |
//! | `421` greeting                                 | as refused                                                 | 0, then 1      | reason                         | 0, then 1         |
//! | `421` at MAIL                                  | as refused                                                 | 0, then 1      | reason                         | 0, then 1         |
//! | `4xx` at MAIL / RCPT / DATA / after the dot    | `retrying` (backoff), `sent` once the fault clears         | 1, then 2      | the 4xx reply, then the 250    | 0, then 1         |
//! | the same `4xx` on every attempt                | `failed` after `delivery.max_attempts`                     | max_attempts   | the last 4xx reply             | 0                 |
//! | `5xx` at MAIL / RCPT / DATA / after the dot    | `failed`                                                   | 1              | the 5xx reply                  | 0                 |
//! | `550 5.1.1` at RCPT                            | `failed`, address added to the suppression list            | 1              | the 550 reply                  | 0                 |
//! | hang-up at RCPT, or after RCPT (at DATA)       | `retrying` (body never sent), `sent` once the fault clears | 1, then 2      | "connection lost before the body was sent" | 0, then 1 |
//! | hang-up after the final dot (not taken)        | `unknown`, never resent                                    | 1              | reason: "incomplete response"  | 0 (stays 0)       |
//! | server takes it, hangs up before its 250       | `unknown`, never resent                                    | 1              | reason: "incomplete response"  | 1 (stays 1)       |
//! | no reply after the dot until `smtp.timeout`    | `unknown` within the timeout, never resent                 | 1              | reason "did not answer within" | 0 (stays 0)       |
//! | every reply slow, but within `smtp.timeout`    | `sent`                                                     | 1              | the 250 reply                  | 1                 |
//! | shutdown deadline passes before the body       | `scheduled` (released, not counted), body never sent       | 0              | reason "shutting down"         | 0                 |
//! | hang-up after the dot, `resend_unknown = true` | `retrying`, then `sent` (documented duplicate risk)        | 1, then 2      | "no reply after the body: ..." | 0, then 1         |
//! | server took it, hung up, `resend_unknown = true` | `retrying`, then `sent`: the customer gets it **twice** | 1, then 2      | the 250 reply                  | 1, then 2         |
//!
//! # The state machine, as a model
//!
//! `state_machine_*` drive the real stores (a SQLite file; a PostgreSQL database) with random
//! sequences of claims by two instances, `begin_body`, `finish`, crashes, time warps past the
//! lease, `reap_expired` and `expire_overdue`, against a model that predicts every row and
//! counts the bodies that may have reached a (fake) server. See [`model`] for the invariants.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use support::smtp::{Fault, SmtpPeer, Stage};
use support::{Backend, Sink, TestEnv, eventually};
use touchpoint::store::{LogEntry, LogFilter, MessageState, SharedStore};

const THANK_YOU_NOW: &str = r#"
[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "0s" }
"#;

/// Fast planning and retries. `max_attempts` and `resend_unknown` vary by case.
fn settings(max_attempts: u32, resend_unknown: bool) -> String {
    format!(
        r#"
[planner]
interval = "1s"
reconcile_every = "1m"

[delivery]
lease = "10s"
retry_base = "2s"
retry_max = "2s"
shutdown_grace = "3s"
max_attempts = {max_attempts}
resend_unknown = {resend_unknown}
"#
    )
}

/// One test's world: the daemon's config pointing at `peer`'s port, one customer with a
/// purchase (so one message), and the store.
struct World {
    env: TestEnv,
    store: SharedStore,
}

impl World {
    async fn new(peer: &SmtpPeer, max_attempts: u32, resend_unknown: bool) -> World {
        World::with_timeout(peer, max_attempts, resend_unknown, None).await
    }

    /// `smtp_timeout` replaces the harness's `transport.smtp.timeout` ("3s").
    async fn with_timeout(
        peer: &SmtpPeer,
        max_attempts: u32,
        resend_unknown: bool,
        smtp_timeout: Option<&str>,
    ) -> World {
        let env = TestEnv::build(
            Backend::Sqlite,
            Sink::Smtp(peer),
            &[("thank-you.toml", THANK_YOU_NOW)],
            &settings(max_attempts, resend_unknown),
        )
        .await;
        let store = env.store().await;
        let world = World { env, store };
        if let Some(timeout) = smtp_timeout {
            world.edit_config("timeout = \"3s\"", &format!("timeout = \"{timeout}\""));
        }
        world.purchase("c1", "ada@example.com").await;
        world
    }

    /// Replaces `from` (which must be there) in the daemon's config file.
    fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.env.config_path).expect("read config");
        assert!(text.contains(from), "{from:?} not in {text}");
        std::fs::write(&self.env.config_path, text.replace(from, to)).expect("write config");
    }

    /// A customer and a purchase right now: one message, due at once.
    async fn purchase(&self, customer: &str, email: &str) {
        self.env
            .add_customer(&self.store, customer, email, "Ada Lovelace", None)
            .await;
        self.env
            .add_event(
                &self.store,
                &format!("order-{customer}"),
                customer,
                "purchase",
                Utc::now() - TimeDelta::seconds(1),
            )
            .await;
    }

    async fn message(&self, customer: &str) -> Option<LogEntry> {
        let filter = LogFilter {
            customer_id: Some(customer.into()),
            ..LogFilter::default()
        };
        let mut entries = self.store.log(&filter).await.expect("log");
        assert!(entries.len() <= 1, "more than one message: {entries:#?}");
        entries.pop()
    }

    /// Waits until the customer's message satisfies `check`; panics with the row if it never
    /// does.
    async fn wait_for(
        &self,
        customer: &str,
        within: Duration,
        what: &str,
        check: impl Fn(&LogEntry) -> bool,
    ) -> LogEntry {
        let ok = eventually(within, || async {
            self.message(customer).await.is_some_and(|m| check(&m))
        })
        .await;
        let entry = self.message(customer).await;
        assert!(
            ok,
            "expected {what} within {within:?}; the message is {entry:#?}"
        );
        entry.expect("message")
    }

    async fn wait_state(&self, customer: &str, state: MessageState, within: Duration) -> LogEntry {
        self.wait_for(customer, within, state.as_str(), |m| m.state == state)
            .await
    }

    async fn suppressed(&self, email: &str) -> bool {
        self.store.is_suppressed(email).await.expect("suppressed")
    }
}

fn reply(entry: &LogEntry) -> &str {
    entry.smtp_reply.as_deref().unwrap_or_default()
}

fn reason(entry: &LogEntry) -> &str {
    entry.reason.as_deref().unwrap_or_default()
}

fn mail_commands(peer: &SmtpPeer) -> usize {
    peer.commands()
        .iter()
        .filter(|c| c.to_ascii_uppercase().starts_with("MAIL"))
        .count()
}

/// Watches the message for `period`: it must stay waiting (scheduled, or briefly `sending`
/// while a claim finds the relay still down) with no attempt counted once it is released.
async fn stays_released(world: &World, period: Duration) {
    let deadline = tokio::time::Instant::now() + period;
    while tokio::time::Instant::now() < deadline {
        let m = world.message("c1").await.expect("message");
        match m.state {
            MessageState::Scheduled => assert_eq!(m.attempts, 0, "{m:#?}"),
            MessageState::Sending => assert!(m.attempts <= 1, "{m:#?}"),
            _ => panic!("the relay being down changed the message: {m:#?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The relay is unavailable: the message is released (not an attempt) and the relay paused.
async fn released_while_relay_down(world: &World) -> LogEntry {
    let m = world
        .wait_for("c1", Duration::from_secs(10), "released", |m| {
            m.state == MessageState::Scheduled
                && m.attempts == 0
                && reason(m).contains("mail relay is unavailable")
        })
        .await;
    assert_eq!(m.smtp_reply, None, "{m:#?}");
    stays_released(world, Duration::from_millis(1500)).await;
    m
}

async fn sent_on_first_counted_attempt(world: &World, peer: &SmtpPeer) {
    assert!(
        peer.wait_for_accepted(1, Duration::from_secs(20)).await,
        "never sent once the relay was back"
    );
    let m = world
        .wait_state("c1", MessageState::Sent, Duration::from_secs(5))
        .await;
    assert_eq!(m.attempts, 1, "the relay's absence was counted: {m:#?}");
    assert!(reply(&m).starts_with("250"), "{m:#?}");
    assert_eq!(peer.accepted_count(), 1);
}

// --- the relay is unavailable: pause, no attempt burnt ------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_pauses_the_relay_and_sends_once_a_server_listens() {
    let addr: SocketAddr;
    let world = {
        let placeholder = SmtpPeer::start().await;
        addr = placeholder.addr();
        World::new(&placeholder, 3, false).await
        // Dropped here: nothing listens on the port any more.
    };
    // Let the dropped peer's listener close before the daemon connects.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let daemon = world.env.start().await;
    let m = released_while_relay_down(&world).await;
    assert!(m.next_attempt_at > m.updated_at, "not paused: {m:#?}");

    let peer = SmtpPeer::start_on(addr).await.expect("rebind the port");
    sent_on_first_counted_attempt(&world, &peer).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_before_the_greeting_pauses_the_relay() {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::DropOnConnect);
    let world = World::new(&peer, 3, false).await;
    let daemon = world.env.start().await;
    released_while_relay_down(&world).await;
    assert!(peer.connections() >= 1);
    peer.clear_faults();
    sent_on_first_counted_attempt(&world, &peer).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_greeting_pauses_the_relay_without_burning_an_attempt() {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::Greeting421);
    let world = World::new(&peer, 3, false).await;
    let daemon = world.env.start().await;
    let m = released_while_relay_down(&world).await;
    assert!(reason(&m).contains("421"), "{m:#?}");
    peer.clear_faults();
    sent_on_first_counted_attempt(&world, &peer).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_421_at_mail_pauses_the_relay_without_burning_an_attempt() {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::Reply {
        at: Stage::Mail,
        code: 421,
        text: "4.3.2 Shutting down".into(),
    });
    let world = World::new(&peer, 3, false).await;
    let daemon = world.env.start().await;
    let m = released_while_relay_down(&world).await;
    assert!(reason(&m).contains("421"), "{m:#?}");
    peer.clear_faults();
    sent_on_first_counted_attempt(&world, &peer).await;
    daemon.stop().await;
}

// --- temporary refusals: retry with backoff, give up after max_attempts ---------------------

/// A 4xx at `stage`: `retrying` with backoff, `sent` once cleared; a second message that meets
/// the fault on every attempt is `failed` after max_attempts (2) with the last reply kept.
async fn transient_refusal(stage: Stage) {
    let fault = Fault::Reply {
        at: stage,
        code: 451,
        text: "4.3.0 Try again later".into(),
    };
    let peer = SmtpPeer::start().await;
    peer.set_fault(fault.clone());
    let world = World::new(&peer, 2, false).await;
    let daemon = world.env.start().await;

    let m = world
        .wait_state("c1", MessageState::Retrying, Duration::from_secs(10))
        .await;
    assert_eq!(m.attempts, 1, "{m:#?}");
    assert_eq!(reply(&m), "451 4.3.0 Try again later", "{m:#?}");
    let delay = m.next_attempt_at - m.updated_at;
    assert!(
        delay >= TimeDelta::milliseconds(1400) && delay <= TimeDelta::milliseconds(2100),
        "retry_base is 2s (-25%, at most retry_max): {delay:?} {m:#?}"
    );
    assert_eq!(peer.accepted_count(), 0);
    peer.clear_faults();
    let m = world
        .wait_state("c1", MessageState::Sent, Duration::from_secs(10))
        .await;
    assert_eq!(m.attempts, 2, "{m:#?}");
    assert!(reply(&m).starts_with("250"), "{m:#?}");
    assert_eq!(peer.accepted_count(), 1);

    // The same fault on every attempt: failed after max_attempts, the last reply kept.
    peer.set_fault(fault);
    world.purchase("c2", "bob@example.com").await;
    let m = world
        .wait_state("c2", MessageState::Failed, Duration::from_secs(15))
        .await;
    assert_eq!(m.attempts, 2, "{m:#?}");
    assert_eq!(reply(&m), "451 4.3.0 Try again later", "{m:#?}");
    assert!(reason(&m).contains("gave up after 2 attempts"), "{m:#?}");
    assert_eq!(peer.accepted_count(), 1, "only c1's message went through");
    assert!(!world.suppressed("bob@example.com").await);
    let events = world.store.message_events(m.id).await.expect("events");
    let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["retrying", "failed"], "{events:#?}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_at_mail_is_retried_then_fails_after_max_attempts() {
    transient_refusal(Stage::Mail).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_at_rcpt_is_retried_then_fails_after_max_attempts() {
    transient_refusal(Stage::Rcpt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_at_data_is_retried_then_fails_after_max_attempts() {
    transient_refusal(Stage::Data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_after_the_dot_is_retried_then_fails_after_max_attempts() {
    transient_refusal(Stage::AfterDot).await;
}

// --- permanent refusals ---------------------------------------------------------------------

async fn permanent_refusal(stage: Stage, code: u16, text: &str, suppressed: bool) {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::Reply {
        at: stage,
        code,
        text: text.into(),
    });
    let world = World::new(&peer, 3, false).await;
    let daemon = world.env.start().await;
    let m = world
        .wait_state("c1", MessageState::Failed, Duration::from_secs(10))
        .await;
    assert_eq!(m.attempts, 1, "{m:#?}");
    assert_eq!(reply(&m), format!("{code} {text}"), "{m:#?}");
    assert_eq!(world.suppressed("ada@example.com").await, suppressed);
    // Failed is final: nothing more happens.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = world.message("c1").await.expect("message");
    assert_eq!((later.state, later.attempts), (MessageState::Failed, 1));
    assert_eq!(peer.accepted_count(), 0);
    assert_eq!(mail_commands(&peer), 1, "{:?}", peer.commands());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_at_mail_fails_the_message() {
    permanent_refusal(Stage::Mail, 553, "5.7.1 Sender rejected", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_at_rcpt_fails_the_message() {
    permanent_refusal(Stage::Rcpt, 554, "5.7.1 Relay access denied", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_550_5_1_1_at_rcpt_fails_and_suppresses_the_address() {
    permanent_refusal(Stage::Rcpt, 550, "5.1.1 No such user", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_at_data_fails_the_message() {
    permanent_refusal(Stage::Data, 554, "5.3.0 No DATA for you", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_after_the_dot_fails_the_message() {
    permanent_refusal(Stage::AfterDot, 554, "5.7.1 Looks like spam", false).await;
}

// --- broken connections ---------------------------------------------------------------------

/// The server hangs up at `stage`, before the body: nothing was delivered, so retry.
async fn hang_up_before_the_body(stage: Stage) {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::HangUp { at: stage });
    let world = World::new(&peer, 3, false).await;
    let daemon = world.env.start().await;
    let m = world
        .wait_state("c1", MessageState::Retrying, Duration::from_secs(10))
        .await;
    assert_eq!(m.attempts, 1, "{m:#?}");
    assert!(
        reply(&m).contains("connection lost before the body was sent"),
        "{m:#?}"
    );
    assert_eq!(peer.accepted_count(), 0);
    peer.clear_faults();
    let m = world
        .wait_state("c1", MessageState::Sent, Duration::from_secs(10))
        .await;
    assert_eq!(m.attempts, 2, "{m:#?}");
    assert_eq!(peer.accepted_count(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_up_at_rcpt_is_retried_and_sent() {
    hang_up_before_the_body(Stage::Rcpt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_up_after_rcpt_is_retried_and_sent() {
    hang_up_before_the_body(Stage::Data).await;
}

/// The body went out and no reply came back: `unknown`, and it stays that way (not resent)
/// while retries and the reaper get every chance to act.
async fn body_out_no_reply(peer: &SmtpPeer, world: &World, reason_has: &str) {
    let m = world
        .wait_state("c1", MessageState::Unknown, Duration::from_secs(10))
        .await;
    assert_eq!(m.attempts, 1, "{m:#?}");
    assert!(reason(&m).contains(reason_has), "{m:#?}");
    assert_eq!(m.smtp_reply, None, "{m:#?}");
    let accepted = peer.accepted_count();
    // Longer than a retry (at most retry_max, 2s) and the reaper's period (lease / 4 = 2.5s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = world.message("c1").await.expect("message");
    assert_eq!((later.state, later.attempts), (MessageState::Unknown, 1));
    assert_eq!(peer.accepted_count(), accepted, "resent an unknown message");
    assert_eq!(mail_commands(peer), 1, "{:?}", peer.commands());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_up_after_the_dot_is_unknown_and_not_resent() {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::HangUp {
        at: Stage::AfterDot,
    });
    let world = World::new(&peer, 3, false).await;
    let daemon = world.env.start().await;
    body_out_no_reply(&peer, &world, "incomplete response").await;
    assert_eq!(peer.accepted_count(), 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_then_hung_up_is_unknown_and_not_resent() {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::AcceptThenHangUp);
    let world = World::new(&peer, 3, false).await;
    let daemon = world.env.start().await;
    body_out_no_reply(&peer, &world, "incomplete response").await;
    assert_eq!(peer.accepted_count(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_after_the_dot_is_unknown_after_the_timeout() {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::SilentAfterDot);
    let world = World::with_timeout(&peer, 3, false, Some("1s")).await;
    let daemon = world.env.start().await;
    // Through the transport's timeout, not through the reaper after the 10s lease (which
    // would also say `unknown`, with another reason).
    body_out_no_reply(&peer, &world, "did not answer within 1s").await;
    assert_eq!(peer.accepted_count(), 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_within_the_timeout_gets_the_message() {
    let peer = SmtpPeer::start().await;
    peer.set_reply_delay(Duration::from_millis(400));
    let world = World::with_timeout(&peer, 3, false, Some("1s")).await;
    let daemon = world.env.start().await;
    let m = world
        .wait_state("c1", MessageState::Sent, Duration::from_secs(15))
        .await;
    assert_eq!(m.attempts, 1, "{m:#?}");
    assert!(reply(&m).starts_with("250"), "{m:#?}");
    assert_eq!(peer.accepted_count(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_before_the_body_releases_the_message_unsent() {
    // Every reply takes 0.7s, so the envelope takes about 3.5s; the shutdown deadline (1s)
    // passes while it is under way, and the body must then not go out.
    let peer = SmtpPeer::start().await;
    peer.set_reply_delay(Duration::from_millis(700));
    let world = World::new(&peer, 3, false).await;
    world.edit_config("shutdown_grace = \"3s\"", "shutdown_grace = \"1s\"");
    let daemon = world.env.start().await;
    world
        .wait_state("c1", MessageState::Sending, Duration::from_secs(10))
        .await;
    let stopping = tokio::time::Instant::now();
    daemon.stop().await;
    // Released when the server agreed to take the body (about 3.5s after the claim), before
    // the 1s grace plus the daemon's 5s last wait for stuck sends runs out.
    assert!(
        stopping.elapsed() < Duration::from_millis(5500),
        "the send was stuck: {:?}",
        stopping.elapsed()
    );
    let m = world.message("c1").await.expect("message");
    assert_eq!(m.state, MessageState::Scheduled, "{m:#?}");
    assert_eq!(m.attempts, 0, "{m:#?}");
    assert!(reason(&m).contains("shutting down"), "{m:#?}");
    assert_eq!(peer.accepted_count(), 0);
}

// --- resend_unknown = true: retried, at the documented risk of a duplicate -------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_resend_unknown_a_hang_up_after_the_dot_is_retried() {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::HangUp {
        at: Stage::AfterDot,
    });
    let world = World::new(&peer, 3, true).await;
    let daemon = world.env.start().await;
    let m = world
        .wait_state("c1", MessageState::Retrying, Duration::from_secs(10))
        .await;
    assert_eq!(m.attempts, 1, "{m:#?}");
    assert!(reply(&m).contains("no reply after the body"), "{m:#?}");
    peer.clear_faults();
    let m = world
        .wait_state("c1", MessageState::Sent, Duration::from_secs(10))
        .await;
    assert_eq!(m.attempts, 2, "{m:#?}");
    assert_eq!(peer.accepted_count(), 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_resend_unknown_a_message_the_server_took_is_sent_twice() {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::AcceptThenHangUp);
    let world = World::new(&peer, 3, true).await;
    let daemon = world.env.start().await;
    world
        .wait_state("c1", MessageState::Retrying, Duration::from_secs(10))
        .await;
    peer.clear_faults();
    let m = world
        .wait_state("c1", MessageState::Sent, Duration::from_secs(10))
        .await;
    assert_eq!(m.attempts, 2, "{m:#?}");
    // The risk the operator accepted: the same Message-ID twice.
    let ids = peer.accepted_message_ids();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], ids[1]);
    daemon.stop().await;
}

// --- the state machine, against a model --------------------------------------------------------

pub mod model {
    //! A model of one store's message state machine, driven by random operations.
    //!
    //! Invariants checked after every step:
    //! - the model predicts every row exactly: state, attempts, claim token and owner, phase,
    //!   and one `message_events` line per transition (claims and `begin_body` add none);
    //! - `claim_due` returns only waiting, due messages, as many as it may, under one new
    //!   token, and never one that holds a claim: there is at most one live claim per message;
    //! - `begin_body` and `finish` with a stale or finished token return false and change no
    //!   byte of the table; `begin_body` also refuses an expired lease or one shorter than the
    //!   margin;
    //! - a message whose body may have been delivered (`begin_body` returned true and the
    //!   attempt did not end with a definite refusal: sent, unknown, or reaped) is never
    //!   claimable again, unless `resend_unknown`; without it, no message is possibly
    //!   delivered twice;
    //! - `sent` is only ever reached by a `finish` with the live token, after `begin_body`;
    //! - attempts never decrease except by exactly one on `Released`;
    //! - after a final time warp past every lease, a reap and an expiry, no message is left in
    //!   `sending`: each is final, or `scheduled`/`retrying`.

    use std::collections::{BTreeMap, BTreeSet};
    use std::str::FromStr;
    use std::time::Duration;

    use chrono::{TimeDelta, Utc};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    use touchpoint::store::{
        Delivery, MessageState, NewMessage, Outcome, PostgresStore, SqliteStore, Store,
    };

    /// How long a normal claim lasts; `Advance` always jumps past it.
    const LEASE_MINUTES: i64 = 10;
    const SMALL_STEP: i64 = 15;
    const BIG_STEP: i64 = 120;
    /// `expires_at` of the messages that have one, in model minutes from the start.
    const EXPIRES: i64 = 50;

    #[derive(Debug, Clone)]
    pub enum Op {
        Claim {
            instance: u8,
            limit: u32,
            tiny: bool,
        },
        BeginBody {
            claim: usize,
            wide_margin: bool,
        },
        Finish {
            claim: usize,
            verdict: u8,
            delay: u8,
        },
        Crash {
            claim: usize,
        },
        Advance {
            big: bool,
        },
        Reap,
        Expire,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..2u8, 1..4u32, prop::bool::weighted(0.2))
                .prop_map(|(instance, limit, tiny)| Op::Claim { instance, limit, tiny }),
            4 => (any::<usize>(), prop::bool::weighted(0.1))
                .prop_map(|(claim, wide_margin)| Op::BeginBody { claim, wide_margin }),
            4 => (any::<usize>(), any::<u8>(), any::<u8>())
                .prop_map(|(claim, verdict, delay)| Op::Finish { claim, verdict, delay }),
            1 => any::<usize>().prop_map(|claim| Op::Crash { claim }),
            2 => prop::bool::weighted(0.3).prop_map(|big| Op::Advance { big }),
            2 => Just(Op::Reap),
            1 => Just(Op::Expire),
        ]
    }

    /// (resend_unknown, messages as (due now, has expires_at), operations)
    pub fn case() -> impl Strategy<Value = (bool, Vec<(bool, bool)>, Vec<Op>)> {
        (
            prop::bool::weighted(0.3),
            prop::collection::vec((prop::bool::weighted(0.75), any::<bool>()), 1..5),
            prop::collection::vec(op(), 1..40),
        )
    }

    /// Direct SQL for what the trait does not offer: reading whole rows and moving the clock.
    pub enum Raw {
        Sqlite(sqlx::SqlitePool),
        Postgres(sqlx::PgPool),
    }

    type RowTuple = (
        i64,
        String,
        i32,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        i64,
    );

    /// One `messages` row, every column that can change, times as text.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Row {
        pub state: MessageState,
        pub attempts: i32,
        pub token: Option<String>,
        pub claimed_by: Option<String>,
        pub phase: Option<String>,
        pub smtp_reply: Option<String>,
        pub reason: Option<String>,
        pub next_attempt_at: Option<String>,
        pub lease_expires_at: Option<String>,
        pub updated_at: Option<String>,
        pub sent_at: Option<String>,
        pub events: i64,
    }

    const SNAPSHOT: &str = "SELECT m.id, m.state, m.attempts, m.claim_token, m.claimed_by, m.phase, \
        m.smtp_reply, m.reason, CAST(m.next_attempt_at AS TEXT), CAST(m.lease_expires_at AS TEXT), \
        CAST(m.updated_at AS TEXT), CAST(m.sent_at AS TEXT), \
        (SELECT COUNT(*) FROM message_events e WHERE e.message_id = m.id) \
        FROM messages m ORDER BY m.id";

    impl Raw {
        async fn execute(&self, sql: &str) {
            match self {
                Raw::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
                Raw::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
            }
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }

        pub async fn clear(&self) {
            self.execute("DELETE FROM message_events").await;
            self.execute("DELETE FROM messages").await;
        }

        pub async fn snapshot(&self) -> BTreeMap<i64, Row> {
            let rows: Vec<RowTuple> = match self {
                Raw::Sqlite(pool) => sqlx::query_as(SNAPSHOT).fetch_all(pool).await,
                Raw::Postgres(pool) => sqlx::query_as(SNAPSHOT).fetch_all(pool).await,
            }
            .expect("snapshot");
            rows.into_iter()
                .map(|r| {
                    let row = Row {
                        state: MessageState::from_str(&r.1).expect("state"),
                        attempts: r.2,
                        token: r.3,
                        claimed_by: r.4,
                        phase: r.5,
                        smtp_reply: r.6,
                        reason: r.7,
                        next_attempt_at: r.8,
                        lease_expires_at: r.9,
                        updated_at: r.10,
                        sent_at: r.11,
                        events: r.12,
                    };
                    (r.0, row)
                })
                .collect()
        }

        /// Moves the clock forward by `minutes`, as the rows see it: every stored instant that is
        /// compared with "now" moves back.
        async fn advance(&self, minutes: i64) {
            let sql = match self {
                Raw::Sqlite(_) => {
                    let shift = |c: &str| {
                        format!(
                            "{c} = strftime('%Y-%m-%dT%H:%M:%fZ', {c}, '-{} seconds')",
                            minutes * 60
                        )
                    };
                    format!(
                        "UPDATE messages SET {}, {}, {}, {}",
                        shift("next_attempt_at"),
                        shift("lease_expires_at"),
                        shift("expires_at"),
                        shift("due_at")
                    )
                }
                Raw::Postgres(_) => {
                    let shift = |c: &str| format!("{c} = {c} - interval '{minutes} minutes'");
                    format!(
                        "UPDATE messages SET {}, {}, {}, {}",
                        shift("next_attempt_at"),
                        shift("lease_expires_at"),
                        shift("expires_at"),
                        shift("due_at")
                    )
                }
            };
            self.execute(&sql).await;
        }
    }

    /// What the model expects of one message.
    #[derive(Debug, Clone)]
    struct Expected {
        state: MessageState,
        attempts: i32,
        token: Option<String>,
        claimed_by: Option<String>,
        body: bool,
        lease_expired: bool,
        /// `next_attempt_at`, in model minutes.
        due: i64,
        expires: Option<i64>,
        events: i64,
        /// Bodies that may have reached the server (sent, unknown, or reaped after the body).
        deliveries: u32,
    }

    #[derive(Debug)]
    struct ClaimRecord {
        id: i64,
        token: String,
        /// `begin_body` returned true for this claim.
        body: bool,
        /// The process holding it crashed: it never acts again.
        dead: bool,
    }

    struct Run<'a> {
        store: &'a dyn Store,
        raw: &'a Raw,
        resend_unknown: bool,
        /// Model minutes since the case started.
        now: i64,
        messages: BTreeMap<i64, Expected>,
        claims: Vec<ClaimRecord>,
        tokens: BTreeSet<String>,
        rows: BTreeMap<i64, Row>,
        log: Vec<String>,
    }

    macro_rules! check {
        ($run:expr, $cond:expr, $($arg:tt)+) => {
            if !$cond {
                return Err(TestCaseError::fail(format!(
                    "{}\nsteps:\n  {}",
                    format!($($arg)+),
                    $run.log.join("\n  ")
                )));
            }
        };
    }

    fn is_waiting(state: MessageState) -> bool {
        matches!(state, MessageState::Scheduled | MessageState::Retrying)
    }

    impl Run<'_> {
        fn claim_index(&self, selector: usize) -> Option<usize> {
            (!self.claims.is_empty()).then(|| selector % self.claims.len())
        }

        async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
            self.log.push(format!("{op:?}"));
            let before = self.rows.clone();
            let mut unchanged = false;
            let mut released: Option<i64> = None;
            let mut sent_by: Option<(i64, String)> = None;
            match *op {
                Op::Claim {
                    instance,
                    limit,
                    tiny,
                } => {
                    let name = format!("instance-{instance}");
                    let lease = if tiny {
                        TimeDelta::milliseconds(1)
                    } else {
                        TimeDelta::minutes(LEASE_MINUTES)
                    };
                    let due: BTreeSet<i64> = self
                        .messages
                        .iter()
                        .filter(|(_, m)| is_waiting(m.state) && m.due <= self.now)
                        .map(|(id, _)| *id)
                        .collect();
                    let claims = self
                        .store
                        .claim_due(&name, limit, lease)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    if tiny {
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                    self.log.push(format!(
                        "  -> claimed {:?}",
                        claims.iter().map(|c| c.id).collect::<Vec<_>>()
                    ));
                    check!(
                        self,
                        claims.len() == due.len().min(limit as usize),
                        "claimed {} of {:?} due (limit {limit})",
                        claims.len(),
                        due
                    );
                    let ids: BTreeSet<i64> = claims.iter().map(|c| c.id).collect();
                    check!(
                        self,
                        ids.len() == claims.len(),
                        "a message claimed twice at once"
                    );
                    if let Some(first) = claims.first() {
                        check!(
                            self,
                            claims.iter().all(|c| c.token == first.token),
                            "one claim, several tokens"
                        );
                        check!(
                            self,
                            self.tokens.insert(first.token.clone()),
                            "a token was reused"
                        );
                    }
                    for claim in &claims {
                        check!(
                            self,
                            due.contains(&claim.id),
                            "claimed {} which was not waiting and due: {:?}",
                            claim.id,
                            self.messages.get(&claim.id)
                        );
                        let resend_unknown = self.resend_unknown;
                        let m = self.messages.get_mut(&claim.id).expect("known message");
                        check!(
                            self,
                            m.deliveries == 0 || resend_unknown,
                            "message {} may have been delivered, yet it was claimed again",
                            claim.id
                        );
                        m.state = MessageState::Sending;
                        m.attempts += 1;
                        m.token = Some(claim.token.clone());
                        m.claimed_by = Some(name.clone());
                        m.body = false;
                        m.lease_expired = tiny;
                        let expected = m.attempts;
                        check!(
                            self,
                            claim.attempts == expected,
                            "claim says attempt {} for {}, model {expected}",
                            claim.attempts,
                            claim.id
                        );
                        self.claims.push(ClaimRecord {
                            id: claim.id,
                            token: claim.token.clone(),
                            body: false,
                            dead: false,
                        });
                    }
                }
                Op::BeginBody { claim, wide_margin } => {
                    let Some(index) = self.claim_index(claim) else {
                        return Ok(());
                    };
                    if self.claims[index].dead {
                        return Ok(());
                    }
                    let (id, token) = (self.claims[index].id, self.claims[index].token.clone());
                    let margin = if wide_margin {
                        TimeDelta::minutes(LEASE_MINUTES * 2)
                    } else {
                        TimeDelta::seconds(1)
                    };
                    let m = &self.messages[&id];
                    // begin_body also refuses a message whose expires_at has passed (the
                    // database's last word before the body goes out).
                    let expect = m.token.as_deref() == Some(token.as_str())
                        && !m.lease_expired
                        && !wide_margin
                        && m.expires.is_none_or(|e| e > self.now);
                    let delivery = Delivery {
                        email: format!("customer-{id}@example.com"),
                        subject: "Hello".into(),
                        message_id: format!("{id}@touchpoint.test"),
                    };
                    let held = self
                        .store
                        .begin_body(id, &token, &delivery, margin)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    self.log.push(format!("  -> {held} (message {id})"));
                    check!(
                        self,
                        held == expect,
                        "begin_body on {id} returned {held}, model {expect}: {m:?}"
                    );
                    if held {
                        let resend_unknown = self.resend_unknown;
                        let m = self.messages.get_mut(&id).expect("known");
                        check!(
                            self,
                            m.deliveries == 0 || resend_unknown,
                            "a second body of message {id} went out"
                        );
                        m.body = true;
                        self.claims[index].body = true;
                    } else {
                        unchanged = true;
                    }
                }
                Op::Finish {
                    claim,
                    verdict,
                    delay,
                } => {
                    let Some(index) = self.claim_index(claim) else {
                        return Ok(());
                    };
                    if self.claims[index].dead {
                        return Ok(());
                    }
                    let record = &self.claims[index];
                    let (id, token, body) = (record.id, record.token.clone(), record.body);
                    let offset = [0, 5, 24 * 60][delay as usize % 3];
                    let at = Utc::now() + TimeDelta::minutes(offset);
                    // What the dispatcher can record: after the body, the server's verdict;
                    // before it, a refusal, a skip by the guard, or a release.
                    let outcome = match (body, verdict % 4) {
                        (true, 0) => Outcome::Sent {
                            reply: "250 2.0.0 Ok".into(),
                        },
                        (true, 3) => Outcome::Unknown {
                            reason: "no reply after the dot".into(),
                        },
                        (false, 2) => Outcome::Skipped {
                            reason: "unless".into(),
                        },
                        (false, 3) => Outcome::Released {
                            at,
                            reason: "relay paused".into(),
                        },
                        (_, 1) => Outcome::Retry {
                            at,
                            reply: "451 4.3.0 later".into(),
                        },
                        _ => Outcome::Failed {
                            reply: Some("554 5.7.1 no".into()),
                            reason: "refused".into(),
                        },
                    };
                    let expect = self.messages[&id].token.as_deref() == Some(token.as_str());
                    let done = self
                        .store
                        .finish(id, &token, &outcome)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    self.log
                        .push(format!("  -> {done} (message {id}, {:?})", outcome.state()));
                    check!(
                        self,
                        done == expect,
                        "finish on {id} returned {done}, model {expect}"
                    );
                    if done {
                        let now = self.now;
                        let m = self.messages.get_mut(&id).expect("known");
                        if m.body
                            && matches!(outcome, Outcome::Sent { .. } | Outcome::Unknown { .. })
                        {
                            m.deliveries += 1;
                        }
                        match &outcome {
                            Outcome::Retry { .. } => m.due = now + offset,
                            Outcome::Released { .. } => {
                                m.due = now + offset;
                                m.attempts -= 1;
                                released = Some(id);
                            }
                            Outcome::Sent { .. } => sent_by = Some((id, token.clone())),
                            _ => {}
                        }
                        m.state = outcome.state();
                        m.token = None;
                        m.claimed_by = None;
                        m.body = false;
                        m.lease_expired = false;
                        m.events += 1;
                    } else {
                        unchanged = true;
                    }
                }
                Op::Crash { claim } => {
                    if let Some(index) = self.claim_index(claim) {
                        self.claims[index].dead = true;
                    }
                    unchanged = true;
                }
                Op::Advance { big } => {
                    let minutes = if big { BIG_STEP } else { SMALL_STEP };
                    self.raw.advance(minutes).await;
                    self.now += minutes;
                    for m in self.messages.values_mut() {
                        if m.token.is_some() {
                            m.lease_expired = true;
                        }
                    }
                }
                Op::Reap => {
                    let reaped = self
                        .store
                        .reap_expired(self.resend_unknown)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    self.log.push(format!("  -> {reaped:?}"));
                    let (mut rescheduled, mut unknown) = (0, 0);
                    let now = self.now;
                    for m in self.messages.values_mut() {
                        if m.token.is_none() || !m.lease_expired {
                            continue;
                        }
                        if m.body {
                            unknown += 1;
                            m.deliveries += 1;
                            m.state = if self.resend_unknown {
                                MessageState::Retrying
                            } else {
                                MessageState::Unknown
                            };
                        } else {
                            rescheduled += 1;
                            m.state = MessageState::Scheduled;
                        }
                        m.token = None;
                        m.claimed_by = None;
                        m.body = false;
                        m.lease_expired = false;
                        m.due = now;
                        m.events += 1;
                    }
                    check!(
                        self,
                        (reaped.rescheduled, reaped.unknown) == (rescheduled, unknown),
                        "reaped {reaped:?}, model rescheduled {rescheduled} unknown {unknown}"
                    );
                }
                Op::Expire => {
                    let expired = self
                        .store
                        .expire_overdue()
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let expired: BTreeSet<i64> = expired.into_iter().collect();
                    self.log.push(format!("  -> expired {expired:?}"));
                    let mut expected = BTreeSet::new();
                    for (id, m) in self.messages.iter_mut() {
                        if is_waiting(m.state) && m.expires.is_some_and(|e| e < self.now) {
                            expected.insert(*id);
                            m.state = if m.state == MessageState::Scheduled {
                                MessageState::Skipped
                            } else {
                                MessageState::Failed
                            };
                            m.events += 1;
                        }
                    }
                    check!(
                        self,
                        expired == expected,
                        "expired {expired:?}, model {expected:?}"
                    );
                }
            }
            self.rows = self.raw.snapshot().await;
            if unchanged {
                check!(
                    self,
                    self.rows == before,
                    "a refused write changed the table:\nbefore {before:#?}\nafter {:#?}",
                    self.rows
                );
            }
            self.compare(&before, released, sent_by.as_ref())
        }

        /// The rows against the model, and the step-to-step invariants.
        fn compare(
            &self,
            before: &BTreeMap<i64, Row>,
            released: Option<i64>,
            sent_by: Option<&(i64, String)>,
        ) -> Result<(), TestCaseError> {
            check!(
                self,
                self.rows.keys().eq(self.messages.keys()),
                "rows {:?}, model {:?}",
                self.rows.keys(),
                self.messages.keys()
            );
            for (id, row) in &self.rows {
                let m = &self.messages[id];
                let phase = match (&m.token, m.body) {
                    (None, _) => None,
                    (Some(_), false) => Some("claimed"),
                    (Some(_), true) => Some("body"),
                };
                check!(
                    self,
                    row.state == m.state
                        && row.attempts == m.attempts
                        && row.token == m.token
                        && row.claimed_by == m.claimed_by
                        && row.phase.as_deref() == phase
                        && row.events == m.events,
                    "message {id}: row {row:#?}\nmodel {m:#?}"
                );
                check!(
                    self,
                    (row.state == MessageState::Sending) == row.token.is_some(),
                    "message {id}: a claim token outside `sending`: {row:#?}"
                );
                check!(
                    self,
                    self.resend_unknown || m.deliveries <= 1,
                    "message {id} may have been delivered {} times",
                    m.deliveries
                );
                check!(
                    self,
                    row.state != MessageState::Sent || m.deliveries >= 1,
                    "message {id} is sent but no body went out"
                );
                let Some(old) = before.get(id) else { continue };
                if released == Some(*id) {
                    check!(
                        self,
                        row.attempts == old.attempts - 1,
                        "released {id}: attempts {} -> {}",
                        old.attempts,
                        row.attempts
                    );
                } else {
                    check!(
                        self,
                        row.attempts >= old.attempts,
                        "attempts of {id} went down: {} -> {}",
                        old.attempts,
                        row.attempts
                    );
                }
                if row.state == MessageState::Sent && old.state != MessageState::Sent {
                    check!(
                        self,
                        sent_by.is_some_and(|(sid, token)| sid == id
                            && old.token.as_deref() == Some(token.as_str())),
                        "message {id} became sent other than by finish with its live token"
                    );
                }
                if old.state.is_final() {
                    // A time warp moves every stored instant; nothing else may change.
                    let unwarped = Row {
                        next_attempt_at: old.next_attempt_at.clone(),
                        ..row.clone()
                    };
                    check!(
                        self,
                        &unwarped == old,
                        "final message {id} changed: {old:#?} -> {row:#?}"
                    );
                }
            }
            Ok(())
        }
    }

    /// One case: fresh messages, the operations, then everything expired and reaped.
    pub async fn run_case(
        store: &dyn Store,
        raw: &Raw,
        resend_unknown: bool,
        messages: &[(bool, bool)],
        ops: &[Op],
    ) -> Result<(), TestCaseError> {
        raw.clear().await;
        let now = Utc::now();
        let batch = uuid::Uuid::new_v4().simple().to_string();
        let new: Vec<NewMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, &(due_now, expires))| NewMessage {
                rule: "model".into(),
                customer_id: format!("c{i}"),
                event_id: None,
                dedupe_key: format!("model:{batch}:{i}"),
                trigger_at: now,
                due_at: if due_now {
                    now - TimeDelta::minutes(1)
                } else {
                    now + TimeDelta::minutes(30)
                },
                expires_at: expires.then(|| now + TimeDelta::minutes(EXPIRES)),
                detail: serde_json::json!({}),
            })
            .collect();
        let inserted = store
            .insert_messages(&new)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(inserted as usize, new.len());
        let rows = raw.snapshot().await;
        prop_assert_eq!(rows.len(), new.len());
        let expected = rows
            .keys()
            .zip(messages)
            .map(|(id, &(due_now, expires))| {
                let m = Expected {
                    state: MessageState::Scheduled,
                    attempts: 0,
                    token: None,
                    claimed_by: None,
                    body: false,
                    lease_expired: false,
                    due: if due_now { -1 } else { 30 },
                    expires: expires.then_some(EXPIRES),
                    events: 0,
                    deliveries: 0,
                };
                (*id, m)
            })
            .collect();
        let mut run = Run {
            store,
            raw,
            resend_unknown,
            now: 0,
            messages: expected,
            claims: Vec::new(),
            tokens: BTreeSet::new(),
            rows,
            log: vec![format!(
                "resend_unknown = {resend_unknown}, messages {messages:?}"
            )],
        };
        for op in ops {
            run.step(op).await?;
        }
        // Every process is gone; time passes; the reaper and the expiry run.
        for op in [Op::Advance { big: true }, Op::Reap, Op::Expire] {
            run.step(&op).await?;
        }
        for (id, row) in &run.rows {
            check!(
                run,
                row.state != MessageState::Sending,
                "message {id} is stuck in sending: {row:#?}"
            );
            check!(
                run,
                row.state.is_final() || is_waiting(row.state),
                "message {id}: {row:#?}"
            );
        }
        Ok(())
    }

    /// Runs `cases` random cases against one store.
    pub fn check_store(
        runtime: &tokio::runtime::Runtime,
        store: &dyn Store,
        raw: &Raw,
        cases: u32,
    ) {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&case(), |(resend_unknown, messages, ops)| {
            runtime.block_on(run_case(store, raw, resend_unknown, &messages, &ops))
        });
        if let Err(error) = result {
            panic!("{error}");
        }
    }

    pub async fn sqlite(dir: &std::path::Path) -> (SqliteStore, Raw) {
        let path = dir.join("model.db");
        let store = SqliteStore::open(&path, 2).await.expect("open sqlite");
        store.migrate().await.expect("migrate");
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("raw sqlite");
        (store, Raw::Sqlite(pool))
    }

    pub async fn postgres(url: &str) -> (PostgresStore, Raw) {
        let store = PostgresStore::open(url, 4).await.expect("open postgres");
        store.migrate().await.expect("migrate");
        let raw = Raw::Postgres(store.pool().clone());
        (store, raw)
    }
}

fn model_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn state_machine_sqlite() {
    let runtime = model_runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, raw) = runtime.block_on(model::sqlite(dir.path()));
    model::check_store(&runtime, &store, &raw, 300);
}

#[test]
fn state_machine_postgres() {
    let runtime = model_runtime();
    let env = runtime.block_on(TestEnv::build(Backend::Postgres, Sink::Files, &[], ""));
    let (store, raw) = runtime.block_on(model::postgres(&env.database_url));
    model::check_store(&runtime, &store, &raw, 150);
    drop(store);
    drop(raw);
    drop(env);
}

/// Two instances claiming at once, in a loop, over one set of due messages: every message is
/// claimed exactly once (SKIP LOCKED on PostgreSQL; the write lock on SQLite, here with two
/// stores, as two processes would have, on one file).
async fn concurrent_claims(backend: Backend) {
    use touchpoint::store::NewMessage;
    let env = TestEnv::build(backend, Sink::Files, &[], "").await;
    let (a, b): (SharedStore, SharedStore) = match backend {
        Backend::Sqlite => (env.store().await, env.store().await),
        Backend::Postgres => (env.store().await, env.store().await),
    };
    let now = Utc::now();
    let messages: Vec<NewMessage> = (0..60)
        .map(|i| NewMessage {
            rule: "race".into(),
            customer_id: format!("c{i}"),
            event_id: None,
            dedupe_key: format!("race:{i}"),
            trigger_at: now,
            due_at: now - TimeDelta::seconds(1),
            expires_at: None,
            detail: serde_json::json!({}),
        })
        .collect();
    a.insert_messages(&messages).await.expect("insert");
    let claimer = |store: SharedStore, name: &'static str| {
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut errors = Vec::new();
            loop {
                match store.claim_due(name, 3, TimeDelta::minutes(5)).await {
                    Ok(claims) if claims.is_empty() => break,
                    Ok(claims) => {
                        for claim in claims {
                            let outcome = touchpoint::store::Outcome::Skipped {
                                reason: "race".into(),
                            };
                            match store.finish(claim.id, &claim.token, &outcome).await {
                                Ok(true) => ids.push(claim.id),
                                Ok(false) => errors.push(format!("lost claim {}", claim.id)),
                                Err(e) => errors.push(format!("finish: {e}")),
                            }
                        }
                    }
                    Err(e) => errors.push(format!("claim: {e}")),
                }
                if errors.len() > 20 {
                    break;
                }
            }
            (ids, errors)
        })
    };
    let (one, two) = tokio::join!(claimer(a.clone(), "one"), claimer(b.clone(), "two"));
    let (mut ids, errors_one) = one.expect("task");
    let (ids_two, errors_two) = two.expect("task");
    assert!(
        errors_one.is_empty() && errors_two.is_empty(),
        "{errors_one:?} {errors_two:?}"
    );
    ids.extend(ids_two);
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), total, "a message was claimed twice");
    assert_eq!(total, 60);
    let log = a.log(&LogFilter::default()).await.expect("log");
    assert!(log.iter().all(|m| m.state == MessageState::Skipped));
    assert!(log.iter().all(|m| m.attempts == 1), "{log:#?}");
}

on_both_backends!(concurrent_claims);
