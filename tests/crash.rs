//! Crash safety with real processes, real databases and a real SMTP peer: "at most one delivery
//! per message, none lost silently" under kill -9, several replicas, a stopped replica and
//! database outages.
//!
//! Every scenario ends with the same audit ([`audit`]): no Message-ID accepted twice by the
//! peer, every message in a final state, every `sent` message accepted exactly once, and every
//! accepted Message-ID belonging to a message that is `sent` or `unknown`.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use rand::Rng;
use support::smtp::SmtpPeer;
use support::{Backend, Sink, TestEnv, postgres_admin_url};
use touchpoint::store::{Customer, Event, LogFilter, MessageState, SharedStore};

const RULE: &str = r#"
[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "0s" }
"#;

/// SMTP connections per daemon (a daemon holds claims on up to four times as many at once).
const POOL: usize = 4;

/// What one crash may leave `unknown` (RELIABILITY.md): per connection, one message whose body
/// was going out, the next one whose phase was written while it waited for the connection,
/// and one whose outcome was waiting in the completer, not yet written.
const UNKNOWN_PER_CRASH: usize = 3 * POOL;

/// A short lease so expired claims come back quickly; the SMTP timeout must stay below half.
fn settings() -> String {
    r#"
[planner]
interval = "1s"
reconcile_every = "1m"

[delivery]
lease = "3s"
batch_size = 20
retry_base = "1s"
retry_max = "2s"
shutdown_grace = "2s"
"#
    .to_string()
}

/// A test world whose SMTP transport has a 1 s timeout and `POOL` connections.
async fn world(backend: Backend, peer: &SmtpPeer) -> TestEnv {
    let env = TestEnv::build(
        backend,
        Sink::Smtp(peer),
        &[("thank-you.toml", RULE)],
        &settings(),
    )
    .await;
    let text = std::fs::read_to_string(&env.config_path).expect("read config");
    let edited = text
        .replace("timeout = \"3s\"", "timeout = \"1s\"")
        .replace("pool_size = 4", &format!("pool_size = {POOL}"));
    std::fs::write(&env.config_path, edited).expect("write config");
    let config = env.config();
    assert_eq!(
        config.transport.smtp.timeout,
        TimeDelta::seconds(1),
        "the SMTP timeout override did not apply; has the harness's transport section changed?"
    );
    assert_eq!(config.transport.smtp.pool_size, POOL);
    env
}

/// `n` customers with one purchase each, a minute ago: `n` messages due at once.
async fn seed(store: &SharedStore, n: usize) {
    let customers: Vec<Customer> = (0..n)
        .map(|i| Customer {
            id: format!("c{i}"),
            email: format!("c{i}@example.com"),
            name: Some(format!("Customer {i}")),
            timezone: None,
            attributes: serde_json::json!({}),
        })
        .collect();
    store.upsert_customers(&customers).await.expect("customers");
    let at = Utc::now() - TimeDelta::minutes(1);
    let events: Vec<Event> = (0..n)
        .map(|i| Event {
            id: format!("order-{i}"),
            customer_id: format!("c{i}"),
            kind: "purchase".into(),
            occurred_at: at,
            data: serde_json::json!({}),
        })
        .collect();
    assert_eq!(
        store.insert_events(&events).await.expect("events"),
        n as u64
    );
}

/// Messages per state, or `None` if the database did not answer (e.g. during an outage).
async fn counts(store: &SharedStore) -> Option<BTreeMap<MessageState, i64>> {
    let rows = store.counts().await.ok()?;
    let mut by_state = BTreeMap::new();
    for (_, state, n) in rows {
        *by_state.entry(state).or_default() += n;
    }
    Some(by_state)
}

/// Waits until `expected` messages exist and none is scheduled, retrying or sending.
async fn settled(store: &SharedStore, expected: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(by_state) = counts(store).await {
            let total: i64 = by_state.values().sum();
            let open: i64 = by_state
                .iter()
                .filter(|(state, _)| !state.is_final())
                .map(|(_, n)| n)
                .sum();
            if total == expected as i64 && open == 0 {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `touchpoint run` processes of one test. Dropping it SIGKILLs whatever still runs and, when
/// the test is failing, prints the daemons' logs.
struct Fleet {
    dir: PathBuf,
    children: Vec<Child>,
    logs: Vec<PathBuf>,
}

impl Fleet {
    fn new(env: &TestEnv) -> Fleet {
        Fleet {
            dir: env.path().to_path_buf(),
            children: Vec::new(),
            logs: Vec::new(),
        }
    }

    /// Starts one more daemon; returns its index.
    fn spawn(&mut self, env: &TestEnv) -> usize {
        let before = daemon_logs(&self.dir);
        let child = env.spawn_daemon();
        let log = daemon_logs(&self.dir)
            .into_iter()
            .find(|path| !before.contains(path))
            .expect("spawn_daemon creates a new log file");
        self.children.push(child);
        self.logs.push(log);
        self.children.len() - 1
    }

    fn pid(&self, i: usize) -> u32 {
        self.children[i].id()
    }

    /// SIGKILL (std's `Child::kill`), then reap it.
    fn kill(&mut self, i: usize) {
        let child = &mut self.children[i];
        child.kill().expect("SIGKILL the daemon");
        child.wait().expect("reap the daemon");
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`) to daemon `i`.
    fn signal(&self, i: usize, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid(i).to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {}", self.pid(i));
    }

    /// Whether daemon `i` is still running; panics with its log if it exited.
    fn assert_alive(&mut self, i: usize) {
        if let Some(status) = self.children[i].try_wait().expect("try_wait") {
            panic!(
                "daemon {i} exited ({status}); its log:\n{}",
                self.log_text(i)
            );
        }
    }

    /// Waits until daemon `i` says it is running (migrations done); panics if it exits first.
    async fn wait_running(&mut self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log_lines(i, "touchpoint is running") == 0 {
            self.assert_alive(i);
            assert!(
                Instant::now() < deadline,
                "daemon {i} did not start within {timeout:?}:\n{}",
                self.log_text(i)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self, i: usize) -> String {
        strip_ansi(&std::fs::read_to_string(&self.logs[i]).unwrap_or_default())
    }

    /// Lines of daemon `i`'s log containing `needle`.
    fn log_lines(&self, i: usize, needle: &str) -> usize {
        self.log_text(i)
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Outcomes daemon `i` recorded (not the ones it was refused for a lost claim) in `state`.
    fn recorded(&self, i: usize, state: &str) -> usize {
        let field = format!("state={state}");
        self.log_text(i)
            .lines()
            .filter(|l| l.contains(" INFO ") && l.contains(&field))
            .count()
    }

    /// Outcomes recorded in `state` by every daemon.
    fn all_recorded(&self, state: &str) -> usize {
        (0..self.logs.len()).map(|i| self.recorded(i, state)).sum()
    }

    /// Lines containing `needle` across every daemon's log.
    fn all_log_lines(&self, needle: &str) -> usize {
        (0..self.logs.len())
            .map(|i| self.log_lines(i, needle))
            .sum()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            print_logs(&self.logs);
        }
    }
}

fn daemon_logs(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("daemon-") && n.ends_with(".log"))
                })
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    logs
}

/// The log without terminal colour codes (tracing colours its output even into a file).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Each log's warnings and errors (at most 40) and its last 15 lines.
fn print_logs(logs: &[PathBuf]) {
    for path in logs {
        let text = strip_ansi(&std::fs::read_to_string(path).unwrap_or_default());
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("===== {} ({} lines) =====", path.display(), lines.len());
        let trouble: Vec<&&str> = lines
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.starts_with("error"))
            .collect();
        for line in trouble.iter().take(40) {
            eprintln!("  ! {line}");
        }
        if trouble.len() > 40 {
            eprintln!("  ! ... {} more warnings/errors", trouble.len() - 40);
        }
        for line in &lines[lines.len().saturating_sub(15)..] {
            eprintln!("  | {line}");
        }
    }
}

/// What the audit found.
#[derive(Debug)]
struct Audit {
    by_state: BTreeMap<MessageState, usize>,
    accepted: usize,
    /// Messages attempted more than once (their first claim died with a daemon, or was lost).
    reclaimed: usize,
}

impl Audit {
    fn of(&self, state: MessageState) -> usize {
        self.by_state.get(&state).copied().unwrap_or(0)
    }

    /// What several kills may leave: at most `UNKNOWN_PER_CRASH` reaped `unknown` per kill
    /// (beyond those a live daemon recorded itself), a kill that landed mid-claim, and nothing
    /// failed or skipped.
    fn assert_within_kill_bound(&self, kills: usize, declared: usize, messages: usize) {
        let unknown = self.of(MessageState::Unknown);
        assert!(
            unknown.saturating_sub(declared) <= kills * UNKNOWN_PER_CRASH,
            "{unknown} unknown ({declared} recorded by a live daemon), more than the bound of \
             {kills} kills x {UNKNOWN_PER_CRASH}"
        );
        assert!(
            unknown + self.reclaimed > 0,
            "no kill landed while a message was claimed; the test did not test anything"
        );
        assert_eq!(
            self.of(MessageState::Sent) + unknown,
            messages,
            "nothing here should fail or be skipped: {:?}",
            self.by_state
        );
    }
}

/// The promise, checked against the database and what the SMTP peer accepted.
async fn audit(store: &SharedStore, peer: &SmtpPeer, expected: usize) -> Audit {
    let log = store
        .log(&LogFilter::default())
        .await
        .expect("read the log");
    assert_eq!(
        log.len(),
        expected,
        "one message per purchase, no more, no less"
    );

    let accepted = peer.accepted();
    let mut times: HashMap<String, usize> = HashMap::new();
    for message in &accepted {
        let id = message
            .message_id
            .clone()
            .expect("every accepted message has a Message-ID");
        *times.entry(id).or_default() += 1;
    }
    let mut duplicates: Vec<(&String, &usize)> = times.iter().filter(|(_, n)| **n > 1).collect();
    duplicates.sort();
    assert!(
        duplicates.is_empty(),
        "{} Message-IDs were accepted more than once: {:?}",
        duplicates.len(),
        &duplicates[..duplicates.len().min(20)]
    );

    // Message-IDs carry a tag made with the link secret, which the daemon generated and kept
    // in the database at its first start (this reads it; it is there already).
    let secret = store
        .setting_or_insert("link_secret", "")
        .await
        .expect("the link secret");
    let tags = touchpoint::links::MessageTags::new(secret.as_bytes());
    let mut by_state = BTreeMap::new();
    let mut by_message_id = HashMap::new();
    let mut reclaimed = 0;
    for entry in &log {
        *by_state.entry(entry.state).or_default() += 1;
        assert!(
            entry.state.is_final(),
            "message {} is still {} (attempts {}, reason {:?})",
            entry.id,
            entry.state,
            entry.attempts,
            entry.reason
        );
        if entry.attempts > 1 {
            reclaimed += 1;
        }
        let expected_id = format!(
            "{}.{}.{}@acme.example",
            entry.id,
            tags.message_id(entry.id),
            entry.rule
        );
        if entry.state == MessageState::Sent {
            assert_eq!(
                entry.message_id.as_deref(),
                Some(format!("<{expected_id}>").as_str()),
                "sent message {} records its Message-ID",
                entry.id
            );
            assert_eq!(
                times.get(&expected_id).copied().unwrap_or(0),
                1,
                "sent message {} ({expected_id}) was accepted exactly once by the peer",
                entry.id
            );
        }
        by_message_id.insert(expected_id, entry);
    }
    for id in times.keys() {
        let entry = by_message_id
            .get(id)
            .unwrap_or_else(|| panic!("the peer accepted {id}, which is no message of ours"));
        assert!(
            matches!(entry.state, MessageState::Sent | MessageState::Unknown),
            "the peer accepted {id} but message {} is {} ({:?})",
            entry.id,
            entry.state,
            entry.reason
        );
    }
    Audit {
        by_state,
        accepted: accepted.len(),
        reclaimed,
    }
}

// --- 1. kill -9 -----------------------------------------------------------------------------

/// 1,000 messages due at once; the daemon is SIGKILLed 20 times at random moments (most of them
/// while sends are under way, each taking ~80 ms at the peer) and restarted until nothing waits.
async fn kill_nine_at_random_moments(backend: Backend) {
    const MESSAGES: usize = 1000;
    const KILLS: usize = 20;
    let begun = Instant::now();
    let peer = SmtpPeer::start().await;
    // Four delayed replies per message (MAIL, RCPT, DATA, the dot): ~80 ms per send.
    peer.set_reply_delay(Duration::from_millis(20));
    let env = world(backend, &peer).await;
    let store = env.store().await;
    seed(&store, MESSAGES).await;

    let mut fleet = Fleet::new(&env);
    let mut mid_send_kills = 0;
    for kill in 0..KILLS {
        let daemon = fleet.spawn(&env);
        let before = peer.accepted_count();
        if kill % 5 == 4 {
            // Anywhere: start-up, migrations, planning, reaping, claiming.
            let ms = rand::rng().random_range(20..700);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        } else {
            // A random moment once sending is under way.
            assert!(
                peer.wait_for_accepted(before + 1, Duration::from_secs(15))
                    .await,
                "run {kill}: the daemon sent nothing within 15 s"
            );
            let ms = rand::rng().random_range(0..500);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            mid_send_kills += 1;
        }
        fleet.assert_alive(daemon);
        fleet.kill(daemon);
    }
    let accepted_during_kills = peer.accepted_count();
    assert!(
        accepted_during_kills < MESSAGES,
        "all messages went out before the last kill; the kills were not mid-run"
    );

    // The rest goes out quickly: the kills are over.
    peer.set_reply_delay(Duration::from_millis(2));
    let last = fleet.spawn(&env);
    let done = settled(&store, MESSAGES, Duration::from_secs(90)).await;
    fleet.assert_alive(last);
    assert!(done, "not settled: {:?}", counts(&store).await);
    fleet.kill(last);

    let audit = audit(&store, &peer, MESSAGES).await;
    // A daemon itself records `unknown` when the server does not answer the dot in time (a
    // loaded machine); the rest were reaped from the claims of killed daemons.
    let declared = fleet.all_recorded("unknown");
    eprintln!(
        "kill -9 ({backend:?}): {MESSAGES} messages, {KILLS} kills ({mid_send_kills} mid-send), \
         {accepted_during_kills} accepted before the last kill, {} accepted in all; states {:?} \
         ({declared} unknown recorded by a live daemon); {} attempted more than once; {:.1} s",
        audit.accepted,
        audit.by_state,
        audit.reclaimed,
        begun.elapsed().as_secs_f64()
    );
    audit.assert_within_kill_bound(KILLS, declared, MESSAGES);
}

on_both_backends!(kill_nine_at_random_moments);

// --- 2. replicas ----------------------------------------------------------------------------

/// Three replicas start together on one empty PostgreSQL database, then share 3,000 messages;
/// one replica is SIGKILLed mid-run and another SIGSTOPped for longer than the lease, then
/// continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_work_and_survive_a_kill_and_a_stall() {
    const MESSAGES: usize = 3000;
    const REPLICAS: usize = 3;
    let begun = Instant::now();
    let peer = SmtpPeer::start().await;
    peer.set_reply_delay(Duration::from_millis(10));
    let env = world(Backend::Postgres, &peer).await;

    // All replicas start together on the empty database (and migrate it), then the data comes.
    let mut fleet = Fleet::new(&env);
    for _ in 0..REPLICAS {
        fleet.spawn(&env);
    }
    for i in 0..REPLICAS {
        fleet.wait_running(i, Duration::from_secs(20)).await;
    }
    let store = env.store().await;
    seed(&store, MESSAGES).await;
    assert!(
        peer.wait_for_accepted(MESSAGES / 6, Duration::from_secs(60))
            .await,
        "the replicas did not get going: {} accepted",
        peer.accepted_count()
    );
    fleet.assert_alive(0);
    fleet.kill(0);
    let killed_at = peer.accepted_count();

    assert!(
        peer.wait_for_accepted(MESSAGES / 3, Duration::from_secs(60))
            .await,
        "sending stalled after the kill: {} accepted",
        peer.accepted_count()
    );
    fleet.assert_alive(1);
    fleet.signal(1, "STOP");
    let stopped_at = peer.accepted_count();
    // Longer than the lease (3 s) plus a reaping interval: the others take its claims over.
    tokio::time::sleep(Duration::from_millis(5000)).await;
    let continued_at = peer.accepted_count();
    fleet.signal(1, "CONT");
    assert!(
        continued_at > stopped_at,
        "nothing was sent while replica 1 was stopped"
    );

    let done = settled(&store, MESSAGES, Duration::from_secs(90)).await;
    for i in 1..REPLICAS {
        fleet.assert_alive(i);
    }
    assert!(done, "not settled: {:?}", counts(&store).await);
    let took = begun.elapsed();
    for i in 1..REPLICAS {
        fleet.kill(i);
    }

    let audit = audit(&store, &peer, MESSAGES).await;
    let sent_by: Vec<usize> = (0..REPLICAS).map(|i| fleet.recorded(i, "sent")).collect();
    let lost_claims = fleet.all_log_lines("the claim was lost");
    let unknown = audit.of(MessageState::Unknown);
    let declared = fleet.all_recorded("unknown");
    eprintln!(
        "replicas: {MESSAGES} messages, {REPLICAS} replicas; killed #0 at {killed_at} accepted, \
         stopped #1 at {stopped_at} for 5 s ({continued_at} accepted when continued); states {:?} \
         ({declared} unknown recorded by a live daemon); sent per replica (logs) {sent_by:?}; \
         {lost_claims} outcomes refused for a lost claim; {} attempted more than once; {:.1} s",
        audit.by_state,
        audit.reclaimed,
        took.as_secs_f64()
    );
    assert!(
        sent_by.iter().filter(|n| **n > 0).count() >= 2,
        "the work was not shared: sent per replica {sent_by:?}"
    );
    // What was in flight or unwritten at the kill and at the stall: the bound for each.
    assert!(
        unknown.saturating_sub(declared) <= 2 * UNKNOWN_PER_CRASH,
        "{unknown} unknown ({declared} recorded by a live daemon), more than could have been in \
         flight at a kill and a stall"
    );
    assert_eq!(
        audit.of(MessageState::Sent) + unknown,
        MESSAGES,
        "{:?}",
        audit.by_state
    );
}

/// Three replicas on one PostgreSQL database share 2,000 messages while a random replica is
/// SIGKILLed and replaced twenty times, each time while sends are under way: no duplicate at
/// the peer, every message `sent` or `unknown`, and `unknown` within the bound per kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_killed_twenty_times() {
    const MESSAGES: usize = 2000;
    const REPLICAS: usize = 3;
    const KILLS: usize = 20;
    let begun = Instant::now();
    let peer = SmtpPeer::start().await;
    peer.set_reply_delay(Duration::from_millis(20));
    let env = world(Backend::Postgres, &peer).await;
    let mut fleet = Fleet::new(&env);
    let mut live: Vec<usize> = (0..REPLICAS).map(|_| fleet.spawn(&env)).collect();
    for &i in &live {
        fleet.wait_running(i, Duration::from_secs(20)).await;
    }
    let store = env.store().await;
    seed(&store, MESSAGES).await;
    for kill in 0..KILLS {
        let before = peer.accepted_count();
        assert!(
            peer.wait_for_accepted(before + 1, Duration::from_secs(15))
                .await,
            "kill {kill}: the replicas sent nothing within 15 s"
        );
        let ms = rand::rng().random_range(0..400);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let slot = rand::rng().random_range(0..live.len());
        fleet.assert_alive(live[slot]);
        fleet.kill(live[slot]);
        live[slot] = fleet.spawn(&env);
    }
    let accepted_during_kills = peer.accepted_count();
    assert!(
        accepted_during_kills < MESSAGES,
        "all messages went out before the last kill; the kills were not mid-run"
    );
    peer.set_reply_delay(Duration::from_millis(2));
    let done = settled(&store, MESSAGES, Duration::from_secs(120)).await;
    for &i in &live {
        fleet.assert_alive(i);
    }
    assert!(done, "not settled: {:?}", counts(&store).await);
    for &i in &live {
        fleet.kill(i);
    }

    let audit = audit(&store, &peer, MESSAGES).await;
    let declared = fleet.all_recorded("unknown");
    eprintln!(
        "three replicas, {KILLS} kills (PostgreSQL): {MESSAGES} messages, \
         {accepted_during_kills} accepted before the last kill; states {:?} ({declared} unknown \
         recorded by a live daemon); {} attempted more than once; {:.1} s",
        audit.by_state,
        audit.reclaimed,
        begun.elapsed().as_secs_f64()
    );
    audit.assert_within_kill_bound(KILLS, declared, MESSAGES);
}

// --- 3. database outage ---------------------------------------------------------------------

/// Terminates every connection to the test database `rounds` times; returns how many backends
/// each round ended.
async fn terminate_connections(database: &str) -> i64 {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_admin_url()))
        .await
        .expect("connect as admin");
    let ended: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_all(&mut admin)
    .await
    .expect("pg_terminate_backend");
    ended.iter().filter(|(ok,)| *ok).count() as i64
}

/// While one daemon sends 1,500 messages, every connection to its database is terminated six
/// times; it keeps running, recovers by itself, and the counts add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_rides_out_terminated_database_connections() {
    const MESSAGES: usize = 1500;
    const ROUNDS: usize = 6;
    let begun = Instant::now();
    let peer = SmtpPeer::start().await;
    peer.set_reply_delay(Duration::from_millis(10));
    let env = world(Backend::Postgres, &peer).await;
    let database = env
        .database_url
        .rsplit('/')
        .next()
        .expect("database name")
        .to_string();
    let store = env.store().await;
    seed(&store, MESSAGES).await;

    let mut fleet = Fleet::new(&env);
    let daemon = fleet.spawn(&env);
    assert!(
        peer.wait_for_accepted(100, Duration::from_secs(30)).await,
        "the daemon did not get going"
    );
    let mut terminated = Vec::new();
    for round in 0..ROUNDS {
        let ms = rand::rng().random_range(300..900);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        // Twice in a row: also hit the connections the pool opens right after the first blow.
        let mut ended = terminate_connections(&database).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        ended += terminate_connections(&database).await;
        // A daemon backing off after the previous blow may hold no connection for a moment:
        // wait (at most 3 s) for one to strike, so that every round is a real outage.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while ended == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            ended += terminate_connections(&database).await;
        }
        terminated.push(ended);
        fleet.assert_alive(daemon);
        assert!(
            peer.accepted_count() < MESSAGES,
            "round {round}: everything was sent already; the outage came too late"
        );
    }
    let accepted_after_outages = peer.accepted_count();
    assert!(
        terminated.iter().all(|n| *n > 0),
        "some rounds found no connection to terminate: {terminated:?}"
    );

    let done = settled(&store, MESSAGES, Duration::from_secs(90)).await;
    fleet.assert_alive(daemon);
    assert!(done, "not settled: {:?}", counts(&store).await);
    let took = begun.elapsed();
    let reconnected = fleet.log_lines(daemon, "reachable again");
    let db_warnings = fleet.log_lines(daemon, "database");
    let unrecorded = fleet.log_lines(daemon, "could not record the outcome");
    let withdrawn = fleet.log_lines(daemon, "not sending the body");
    fleet.kill(daemon);

    let audit = audit(&store, &peer, MESSAGES).await;
    eprintln!(
        "outage: {MESSAGES} messages, {ROUNDS} rounds terminating {terminated:?} connections; \
         {accepted_after_outages} accepted when the last round ended; states {:?}; \
         {db_warnings} log lines about the database, {reconnected} 'reachable again', \
         {unrecorded} outcomes not recorded, {withdrawn} bodies withheld; {} attempted more \
         than once; {:.1} s",
        audit.by_state,
        audit.reclaimed,
        took.as_secs_f64()
    );
    assert_eq!(
        audit.of(MessageState::Sent) + audit.of(MessageState::Unknown),
        MESSAGES,
        "{:?}",
        audit.by_state
    );
}

// --- 4. two daemons on one SQLite file ---------------------------------------------------------

/// Two daemons start together on a SQLite file that does not exist yet (both migrate it), then
/// share 800 messages; one is SIGKILLed halfway and the other finishes the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_one_sqlite_file() {
    const MESSAGES: usize = 800;
    let begun = Instant::now();
    let peer = SmtpPeer::start().await;
    peer.set_reply_delay(Duration::from_millis(10));
    let env = world(Backend::Sqlite, &peer).await;

    let mut fleet = Fleet::new(&env);
    let first = fleet.spawn(&env);
    let second = fleet.spawn(&env);
    // Both must get through start-up (migrations included) on the fresh file.
    fleet.wait_running(first, Duration::from_secs(20)).await;
    fleet.wait_running(second, Duration::from_secs(20)).await;

    let store = env.store().await;
    seed(&store, MESSAGES).await;
    assert!(
        peer.wait_for_accepted(MESSAGES / 2, Duration::from_secs(60))
            .await,
        "the daemons did not send half the messages: {} accepted",
        peer.accepted_count()
    );
    fleet.assert_alive(first);
    let killed_at = peer.accepted_count();
    let sent_by_first = fleet.recorded(first, "sent");
    let sent_by_second_then = fleet.recorded(second, "sent");
    fleet.kill(first);

    let done = settled(&store, MESSAGES, Duration::from_secs(60)).await;
    fleet.assert_alive(second);
    assert!(done, "not settled: {:?}", counts(&store).await);
    let took = begun.elapsed();
    let busy = fleet.all_log_lines("database is locked") + fleet.all_log_lines("busy");
    fleet.kill(second);

    let audit = audit(&store, &peer, MESSAGES).await;
    let unknown = audit.of(MessageState::Unknown);
    let declared = fleet.all_recorded("unknown");
    eprintln!(
        "sqlite, two daemons: {MESSAGES} messages; when #0 was killed at {killed_at} accepted it \
         had sent {sent_by_first} and #1 {sent_by_second_then}; states {:?} ({declared} unknown \
         recorded by a live daemon); {busy} busy/locked log lines; {} attempted more than once; \
         {:.1} s",
        audit.by_state,
        audit.reclaimed,
        took.as_secs_f64()
    );
    assert!(
        sent_by_first > 0 && sent_by_second_then > 0,
        "the work was not shared: {sent_by_first} and {sent_by_second_then}"
    );
    assert!(
        unknown.saturating_sub(declared) <= UNKNOWN_PER_CRASH,
        "{unknown} unknown ({declared} recorded by a live daemon) after a single kill"
    );
    assert_eq!(
        audit.of(MessageState::Sent) + unknown,
        MESSAGES,
        "{:?}",
        audit.by_state
    );
}

// --- 5. the frequency limit under replicas and kill -9 ------------------------------------------

/// Three more rules on the same purchase: two held by the limit (of the same priority, so that
/// nothing but the limit keeps their messages apart), and a receipt that ignores it.
const MORE_RULES: &str = r#"
[[rule]]
name = "thanks-again"
template = "thank-you"
subject = "Thanks again, {{customer.first_name}}"
when = { event = "purchase", after = "0s" }

[[rule]]
name = "vip-note"
template = "thank-you"
subject = "A note for you, {{customer.first_name}}"
when = { event = "purchase", after = "0s" }

[[rule]]
name = "receipt"
template = "thank-you"
subject = "Your receipt, {{customer.first_name}}"
when = { event = "purchase", after = "0s" }
ignore_frequency_limit = true
"#;

/// One message per customer per day across rules, a minute of slack before messages expire.
const LIMIT: &str = r#"
[defaults]
expire_after = "1h"
frequency_limit = { max = 1, per = "1d" }
"#;

/// Each customer's three limited messages become due at once, and three replicas race for
/// them while replicas are SIGKILLed and restarted at random moments: never two limited
/// messages reach one customer, exactly one is sent (or `unknown`), the others are skipped
/// for the limit, and every receipt goes out.
async fn the_frequency_limit_holds_across_replicas_and_kill_nine(backend: Backend) {
    const CUSTOMERS: usize = 200;
    const REPLICAS: usize = 3;
    const KILLS: usize = 4;
    let begun = Instant::now();
    let peer = SmtpPeer::start().await;
    peer.set_reply_delay(Duration::from_millis(30));
    let env = world(backend, &peer).await;
    env.write_rule("more.toml", MORE_RULES);
    let config = std::fs::read_to_string(&env.config_path).expect("read config");
    std::fs::write(&env.config_path, format!("{config}\n{LIMIT}")).expect("write config");
    assert!(env.config().defaults.frequency_limit.is_some());

    let mut fleet = Fleet::new(&env);
    let mut live: Vec<usize> = (0..REPLICAS).map(|_| fleet.spawn(&env)).collect();
    for &i in &live {
        fleet.wait_running(i, Duration::from_secs(20)).await;
    }
    let store = env.store().await;
    seed(&store, CUSTOMERS).await;
    assert!(
        peer.wait_for_accepted(1, Duration::from_secs(30)).await,
        "nothing was sent"
    );
    for _ in 0..KILLS {
        let ms = rand::rng().random_range(50..600);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let slot = rand::rng().random_range(0..live.len());
        fleet.assert_alive(live[slot]);
        fleet.kill(live[slot]);
        live[slot] = fleet.spawn(&env);
    }
    let accepted_during_kills = peer.accepted_count();
    let done = settled(&store, 4 * CUSTOMERS, Duration::from_secs(120)).await;
    for &i in &live {
        fleet.assert_alive(i);
    }
    assert!(done, "not settled: {:?}", counts(&store).await);
    for &i in &live {
        fleet.kill(i);
    }

    let audit = audit(&store, &peer, 4 * CUSTOMERS).await;
    let log = store.log(&LogFilter::default()).await.expect("log");
    let mut limited_out: HashMap<String, Vec<String>> = HashMap::new();
    let mut receipts = 0;
    for entry in &log {
        let out = matches!(entry.state, MessageState::Sent | MessageState::Unknown);
        if entry.rule == "receipt" {
            receipts += usize::from(out);
        } else if out {
            limited_out
                .entry(entry.customer_id.clone())
                .or_default()
                .push(entry.rule.clone());
        } else {
            assert_eq!(entry.state, MessageState::Skipped, "{entry:?}");
            let reason = entry.reason.as_deref().unwrap_or_default();
            assert!(reason.contains("frequency limit"), "{entry:?}");
        }
    }
    assert_eq!(
        receipts, CUSTOMERS,
        "every receipt went out: {:?}",
        audit.by_state
    );
    let doubled: Vec<_> = limited_out
        .iter()
        .filter(|(_, rules)| rules.len() > 1)
        .collect();
    assert!(
        doubled.is_empty(),
        "two limited messages to one customer: {doubled:?}"
    );
    assert_eq!(
        limited_out.len(),
        CUSTOMERS,
        "each customer got one limited message"
    );
    // What the peer took, by recipient: never two limited messages to one address.
    let mut at_peer: HashMap<String, usize> = HashMap::new();
    for message in peer.accepted() {
        let id = message.message_id.clone().unwrap_or_default();
        if !id.ends_with(".receipt@acme.example") {
            *at_peer.entry(message.rcpt_to.join(",")).or_default() += 1;
        }
    }
    let twice: Vec<_> = at_peer.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "the peer got two limited messages for {twice:?}"
    );
    let firsts: std::collections::BTreeMap<&str, usize> =
        limited_out
            .values()
            .fold(Default::default(), |mut by_rule, rules| {
                *by_rule.entry(rules[0].as_str()).or_default() += 1;
                by_rule
            });
    eprintln!(
        "frequency limit ({backend:?}): {CUSTOMERS} customers x 3 limited + 1 receipt, \
         {REPLICAS} replicas, {KILLS} kills ({accepted_during_kills} accepted by the last); \
         states {:?}; the one limited message each was of {firsts:?}; {} attempted more than \
         once; {:.1} s",
        audit.by_state,
        audit.reclaimed,
        begun.elapsed().as_secs_f64()
    );
}

on_both_backends!(the_frequency_limit_holds_across_replicas_and_kill_nine);
