//! Delivery under SMTP faults. (The model of the message state machine, which drives the
//! stores directly, is in `store_conformance.rs`.)
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

// --- claims held ahead: given back, never left `sending` -----------------------------------

/// Every message of customers `c1..=cN` (c1 is the world's own).
async fn messages(world: &World, customers: usize) -> Vec<LogEntry> {
    let mut all = Vec::new();
    for i in 1..=customers {
        all.extend(world.message(&format!("c{i}")).await);
    }
    all
}

/// Purchases for `c2..=cN`, on top of the world's `c1`.
async fn more_purchases(world: &World, customers: usize) {
    for i in 2..=customers {
        world
            .purchase(&format!("c{i}"), &format!("customer{i}@example.com"))
            .await;
    }
}

/// The dispatcher claims a few messages per connection ahead; a shutdown gives back those
/// that never started (unsent, uncounted), so nothing is left `sending` for the reaper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_gives_back_the_claims_held_ahead() {
    const CUSTOMERS: usize = 12;
    let peer = SmtpPeer::start().await;
    peer.set_reply_delay(Duration::from_millis(300));
    let world = World::new(&peer, 3, false).await;
    more_purchases(&world, CUSTOMERS).await;
    let daemon = world.env.start().await;
    let claimed_ahead = eventually(Duration::from_secs(20), || async {
        let all = messages(&world, CUSTOMERS).await;
        all.iter()
            .filter(|m| m.state == MessageState::Sending)
            .count()
            > 4
    })
    .await;
    assert!(
        claimed_ahead,
        "more claims than the 4 connections were never held"
    );
    daemon.stop().await;
    let all = messages(&world, CUSTOMERS).await;
    assert_eq!(all.len(), CUSTOMERS);
    for m in &all {
        match m.state {
            MessageState::Sent => assert_eq!(m.attempts, 1, "{m:#?}"),
            MessageState::Scheduled => {
                assert_eq!(m.attempts, 0, "{m:#?}");
                assert!(reason(m).contains("shutting down"), "{m:#?}");
            }
            _ => panic!("left behind by the shutdown: {m:#?}"),
        }
    }
    let sent = all.iter().filter(|m| m.state == MessageState::Sent).count();
    assert_eq!(peer.accepted_count(), sent);
    assert!(
        sent < CUSTOMERS,
        "the shutdown came too late to test anything"
    );
}

/// While the relay is away, the claims held ahead go back too: every message waits
/// `scheduled`, uncounted, and all are sent once the relay answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_relay_gives_back_the_claims_held_ahead() {
    const CUSTOMERS: usize = 12;
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::Greeting421);
    let world = World::new(&peer, 3, false).await;
    more_purchases(&world, CUSTOMERS).await;
    let daemon = world.env.start().await;
    released_while_relay_down(&world).await;
    let all_waiting = eventually(Duration::from_secs(10), || async {
        let all = messages(&world, CUSTOMERS).await;
        all.len() == CUSTOMERS
            && all
                .iter()
                .all(|m| m.state == MessageState::Scheduled && m.attempts == 0)
    })
    .await;
    assert!(
        all_waiting,
        "claims held while the relay is paused: {:#?}",
        messages(&world, CUSTOMERS).await
    );
    peer.clear_faults();
    let all_sent = eventually(Duration::from_secs(30), || async {
        let all = messages(&world, CUSTOMERS).await;
        all.iter()
            .all(|m| m.state == MessageState::Sent && m.attempts == 1)
    })
    .await;
    assert!(all_sent, "{:#?}", messages(&world, CUSTOMERS).await);
    assert_eq!(peer.accepted_count(), CUSTOMERS);
    daemon.stop().await;
}

/// A message's body starts only while its lease, by the daemon's clock, still covers the
/// SMTP timeout for the body and its reply. Claimed behind slow exchanges on the only
/// connection, the later messages cannot: they are released unsent, uncounted, and sent on a
/// later turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_cannot_start_within_its_lease_is_released_unsent() {
    const CUSTOMERS: usize = 4;
    let peer = SmtpPeer::start().await;
    // Every reply waits 0.3 s: a message takes about 1-2 s on the one connection, and a
    // claim's lease (5 s) leaves 3 s to start a body (the timeout is 2 s): the first of a
    // batch always makes it, the third or fourth cannot.
    peer.set_reply_delay(Duration::from_millis(300));
    let world = World::with_timeout(&peer, 3, false, Some("2s")).await;
    world.edit_config("pool_size = 4", "pool_size = 1");
    world.edit_config("lease = \"10s\"", "lease = \"5s\"");
    more_purchases(&world, CUSTOMERS).await;
    let daemon = world.env.start().await;
    let mut late = Vec::new();
    for i in 1..=CUSTOMERS {
        let m = world
            .wait_state(
                &format!("c{i}"),
                MessageState::Sent,
                Duration::from_secs(40),
            )
            .await;
        assert_eq!(m.attempts, 1, "a late start was counted: {m:#?}");
        let history = world.store.message_events(m.id).await.expect("history");
        late.extend(
            history.into_iter().filter(|e| {
                e.kind == "released" && e.detail.to_string().contains("lease was left")
            }),
        );
    }
    assert!(!late.is_empty(), "no message was released for a late start");
    assert_eq!(peer.accepted_count(), CUSTOMERS);
    daemon.stop().await;
}

/// A relay that answers every step just within the timeout but takes longer than the lease
/// allows to reach the body: the message, whose phase was already written, is released unsent
/// before its lease runs out, never reaped as `unknown` (which would say it may have gone out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_too_slow_to_reach_the_body_within_the_lease_leaves_nothing_unknown() {
    let peer = SmtpPeer::start().await;
    // 1.8 s per reply (the timeout is 2 s): greeting, EHLO and the envelope take 5 s or more,
    // the lease (5 s) leaves 3 s to start the body.
    peer.set_reply_delay(Duration::from_millis(1800));
    let world = World::with_timeout(&peer, 3, false, Some("2s")).await;
    world.edit_config("pool_size = 4", "pool_size = 1");
    world.edit_config("lease = \"10s\"", "lease = \"5s\"");
    let daemon = world.env.start().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    while tokio::time::Instant::now() < deadline {
        if let Some(m) = world.message("c1").await {
            assert_ne!(m.state, MessageState::Unknown, "{m:#?}");
            assert_ne!(m.state, MessageState::Sent, "{m:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peer.set_reply_delay(Duration::ZERO);
    let m = world
        .wait_state("c1", MessageState::Sent, Duration::from_secs(30))
        .await;
    assert_eq!(m.attempts, 1, "the late starts were counted: {m:#?}");
    let history = world.store.message_events(m.id).await.expect("history");
    assert!(
        history
            .iter()
            .any(|e| e.kind == "released" && e.detail.to_string().contains("lease was left")),
        "{history:#?}"
    );
    assert!(!history.iter().any(|e| e.kind == "unknown"), "{history:#?}");
    assert_eq!(peer.accepted_count(), 1);
    daemon.stop().await;
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
