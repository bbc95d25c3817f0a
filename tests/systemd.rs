//! touchpoint as systemd runs it: the real binary as a child process, talking the notify
//! protocol over a Unix datagram socket, reloading on SIGHUP, draining on SIGTERM, serving
//! /healthz and /metrics, and reading its SMTP password from a systemd credential.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use support::smtp::SmtpPeer;
use support::{Backend, Sink, TestEnv, eventually, states};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const THANK_YOU_SOON: &str = r#"
[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "1s" }
"#;

/// The real daemon as a child process, its log in a file; killed if a test fails.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `command` (the binary with `--config` set) with `run`, stderr to `<dir>/<name>.log`.
    fn start(env: &TestEnv, name: &str, mut command: Command) -> Daemon {
        let log = env.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = command
            .arg("run")
            // Logs go to stderr, not journald, even when the tests run under systemd.
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn touchpoint run");
        Daemon { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit; None if it is still running after `timeout`.
    async fn exited_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the log contains `needle`.
    async fn logged(&self, needle: &str, timeout: Duration) -> bool {
        eventually(timeout, || async { self.log().contains(needle) }).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The binary under `sh`, which puts its own pid (the daemon's, after `exec`) in WATCHDOG_PID,
/// as systemd does: the sd-notify crate only honours WATCHDOG_USEC when WATCHDOG_PID is the
/// process's own pid.
fn with_watchdog(env: &TestEnv, usec: u64) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_touchpoint"))
        .arg("--config")
        .arg(&env.config_path)
        .env_remove("NOTIFY_SOCKET")
        .env("TOUCHPOINT_LOG", "info")
        .env("WATCHDOG_USEC", usec.to_string());
    command
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// A plain HTTP/1.1 GET; (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::other("no HTTP response within 10s"))??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((status, if chunked { dechunk(body) } else { body.into() }))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// GET until the listener answers.
async fn http_when_up(addr: SocketAddr, path: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http_get(addr, path).await {
            Ok(answer) => return answer,
            Err(error) if Instant::now() >= deadline => {
                panic!("no answer from http://{addr}{path} within 30s: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn healthz(addr: SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = http_when_up(addr, "/healthz").await;
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/healthz is not JSON ({e}): {body:?}"));
    (status, json)
}

/// Parses Prometheus text: `name{labels}` (as written) to value; comments left out.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {line:?}"));
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number in {line:?}"));
            (series.to_string(), value)
        })
        .collect()
}

fn subject(data: &[u8]) -> String {
    mail_parser::MessageParser::default()
        .parse(data)
        .and_then(|m| m.subject().map(str::to_string))
        .unwrap_or_default()
}

fn monotonic_usec_now() -> i128 {
    let now = sd_notify::NotifyState::monotonic_usec_now().expect("CLOCK_MONOTONIC");
    now.to_string()
        .strip_prefix("MONOTONIC_USEC=")
        .and_then(|n| n.parse().ok())
        .expect("MONOTONIC_USEC=<n>")
}

/// The notify socket systemd would give the service: a datagram socket in the test's directory.
struct NotifySocket {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
    /// Every datagram received so far, with when it arrived.
    seen: Vec<(Instant, String)>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        socket.set_nonblocking(true).expect("nonblocking");
        NotifySocket {
            socket: tokio::net::UnixDatagram::from_std(socket).expect("tokio socket"),
            path,
            seen: Vec::new(),
        }
    }

    /// Receives datagrams until one satisfies `wanted`; returns its index in `seen`.
    async fn until(&mut self, timeout: Duration, wanted: impl Fn(&str) -> bool) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("not received within {timeout:?}; got {:#?}", self.seen))
                .expect("recv");
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push((Instant::now(), message));
            if wanted(&self.seen.last().expect("just pushed").1) {
                return self.seen.len() - 1;
            }
        }
    }

    /// Receives whatever comes for `period`.
    async fn collect_for(&mut self, period: Duration) {
        let deadline = tokio::time::Instant::now() + period;
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(received) = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf)).await
        {
            let n = received.expect("recv");
            self.seen.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            ));
        }
    }
}

fn has(message: &str, assignment: &str) -> bool {
    message.lines().any(|line| line == assignment)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_protocol_ready_watchdog_reloading_stopping_in_order() {
    let peer = SmtpPeer::start().await;
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Smtp(&peer),
        &[("thank-you.toml", THANK_YOU_SOON)],
        "",
    )
    .await;
    let mut notify = NotifySocket::bind(env.path());
    let watchdog = Duration::from_secs(2);
    let mut command = with_watchdog(&env, watchdog.as_micros() as u64);
    command.env("NOTIFY_SOCKET", &notify.path);
    let started = Instant::now();
    let mut daemon = Daemon::start(&env, "notify", command);

    // READY=1 first: nothing about watchdog, reload or stop before it.
    let ready = notify
        .until(Duration::from_secs(30), |m| has(m, "READY=1"))
        .await;
    for (_, earlier) in &notify.seen[..ready] {
        assert!(
            !["WATCHDOG=1", "RELOADING=1", "STOPPING=1"]
                .iter()
                .any(|a| has(earlier, a)),
            "{earlier:?} came before READY=1"
        );
    }

    // WATCHDOG=1, again and again, each well within WATCHDOG_USEC of the one before (systemd
    // counts the first interval from the start).
    notify.collect_for(watchdog * 3).await;
    let pings: Vec<Instant> = notify
        .seen
        .iter()
        .filter(|(_, m)| has(m, "WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect();
    assert!(
        pings.len() >= 2,
        "expected repeated WATCHDOG=1 within {:?}; got {:#?}",
        watchdog * 3,
        notify.seen
    );
    let mut previous = started;
    for ping in &pings {
        assert!(
            *ping - previous < watchdog,
            "a WATCHDOG=1 came {:?} after the previous one (or the start), later than \
             WATCHDOG_USEC ({watchdog:?}): systemd would have killed the service",
            *ping - previous
        );
        previous = *ping;
    }
    assert!(
        notify.seen.iter().any(|(_, m)| m.starts_with("STATUS=")),
        "no STATUS= line: {:#?}",
        notify.seen
    );

    // SIGHUP: RELOADING=1 with the current CLOCK_MONOTONIC, then READY=1.
    let before = monotonic_usec_now();
    daemon.signal("HUP");
    let reloading = notify
        .until(Duration::from_secs(10), |m| has(m, "RELOADING=1"))
        .await;
    let after = monotonic_usec_now();
    let message = notify.seen[reloading].1.clone();
    let stamp: i128 = message
        .lines()
        .find_map(|line| line.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {message:?}"))
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!(
        before <= stamp && stamp <= after,
        "MONOTONIC_USEC={stamp} is not between {before} and {after}"
    );
    let ready_again = notify
        .until(Duration::from_secs(10), |m| has(m, "READY=1"))
        .await;
    assert!(ready_again > reloading);
    assert!(
        daemon
            .logged("reloaded rules and templates", Duration::from_secs(5))
            .await,
        "{}",
        daemon.log()
    );

    // SIGTERM: STOPPING=1, then exit 0.
    daemon.signal("TERM");
    let stopping = notify
        .until(Duration::from_secs(10), |m| has(m, "STOPPING=1"))
        .await;
    assert!(stopping > ready_again);
    let status = daemon
        .exited_within(Duration::from_secs(10))
        .await
        .expect("the daemon exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", daemon.log());
    notify.collect_for(Duration::from_millis(200)).await;
    for (_, later) in &notify.seen[stopping + 1..] {
        assert!(
            !has(later, "READY=1") && !has(later, "RELOADING=1"),
            "{later:?} after STOPPING=1"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_notify_socket_nothing_fails() {
    let peer = SmtpPeer::start().await;
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Smtp(&peer),
        &[("thank-you.toml", THANK_YOU_SOON)],
        "",
    )
    .await;
    let store = env.store().await;
    env.add_customer(&store, "c1", "ada@example.com", "Ada Lovelace", None)
        .await;
    env.add_event(&store, "order-1", "c1", "purchase", Utc::now())
        .await;
    let port = free_port();
    let http: SocketAddr = ([127, 0, 0, 1], port).into();
    // No NOTIFY_SOCKET (but a watchdog asked for), then a NOTIFY_SOCKET nobody listens on.
    let unheard = env.path().join("nobody-listens.sock");
    for (name, socket) in [("unset", None), ("unheard", Some(&unheard))] {
        let mut command = with_watchdog(&env, 1_000_000);
        command.env("TOUCHPOINT_HTTP__LISTEN", http.to_string());
        if let Some(path) = socket {
            command.env("NOTIFY_SOCKET", path);
        }
        let mut daemon = Daemon::start(&env, name, command);
        let (status, _) = healthz(http).await;
        assert_eq!(status, 200, "{name}: {}", daemon.log());
        daemon.signal("HUP");
        assert!(
            daemon
                .logged("reloaded rules and templates", Duration::from_secs(10))
                .await,
            "{name}: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(daemon.running(), "{name}: {}", daemon.log());
        daemon.signal("TERM");
        let status = daemon
            .exited_within(Duration::from_secs(10))
            .await
            .expect("the daemon exits after SIGTERM");
        assert!(status.success(), "{name}: {status:?}\n{}", daemon.log());
    }
    assert_eq!(states(&store).await.get("sent"), Some(&1));
}

/// The reload handler is in place by the time READY=1 goes out: `systemctl reload` right after
/// start must not kill the service (SIGHUP's default action).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_right_after_ready_reloads() {
    let peer = SmtpPeer::start().await;
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Smtp(&peer),
        &[("thank-you.toml", THANK_YOU_SOON)],
        "",
    )
    .await;
    for round in 0..5 {
        let dir = env.path().join(format!("round-{round}"));
        std::fs::create_dir(&dir).expect("dir");
        let mut notify = NotifySocket::bind(&dir);
        let mut command = env.command();
        command.env("NOTIFY_SOCKET", &notify.path);
        let mut daemon = Daemon::start(&env, &format!("round-{round}"), command);
        notify
            .until(Duration::from_secs(30), |m| has(m, "READY=1"))
            .await;
        daemon.signal("HUP");
        notify
            .until(Duration::from_secs(10), |m| has(m, "RELOADING=1"))
            .await;
        assert!(daemon.running(), "{}", daemon.log());
        daemon.signal("TERM");
        let status = daemon
            .exited_within(Duration::from_secs(10))
            .await
            .expect("exits after SIGTERM");
        assert!(status.success(), "{status:?}\n{}", daemon.log());
    }
}

const BROKEN_AT: &str = r#""2 fortnights""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_rule_file_on_sighup_keeps_the_old_rules_until_it_is_fixed() {
    let peer = SmtpPeer::start().await;
    let rule = |subject: &str, after: &str| {
        format!(
            "[[rule]]\nname = \"thank-you\"\ntemplate = \"thank-you\"\nsubject = \"{subject}\"\n\
             when = {{ event = \"purchase\", after = {after} }}\n"
        )
    };
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Smtp(&peer),
        &[("thank-you.toml", &rule("Old subject", "\"1s\""))],
        "",
    )
    .await;
    let store = env.store().await;
    for (id, email) in [
        ("c1", "ada@example.com"),
        ("c2", "grace@example.com"),
        ("c3", "edsger@example.com"),
    ] {
        env.add_customer(&store, id, email, "Someone", None).await;
    }
    let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut command = env.command();
    command.env("TOUCHPOINT_HTTP__LISTEN", http.to_string());
    let mut daemon = Daemon::start(&env, "reload", command);
    assert_eq!(healthz(http).await.0, 200, "{}", daemon.log());

    env.add_event(&store, "order-1", "c1", "purchase", Utc::now())
        .await;
    assert!(peer.wait_for_accepted(1, Duration::from_secs(20)).await);
    assert_eq!(subject(&peer.accepted()[0].data), "Old subject");

    // A mistake (and a new subject) in the rule file: the reload fails, the old rules stay.
    let broken = rule("New subject", BROKEN_AT);
    env.write_rule("thank-you.toml", &broken);
    let line = broken
        .lines()
        .position(|l| l.contains(BROKEN_AT))
        .expect("line")
        + 1;
    let column = broken
        .lines()
        .nth(line - 1)
        .expect("line")
        .find(BROKEN_AT)
        .expect("column")
        + 1;
    let location = format!(
        "{}:{line}:{column}",
        env.path().join("rules/thank-you.toml").display()
    );
    daemon.signal("HUP");
    let failed = eventually(Duration::from_secs(10), || async {
        let (_, report) = healthz(http).await;
        report["last_reload"]["ok"] == false
    })
    .await;
    let (status, report) = healthz(http).await;
    assert!(failed, "{report:#}\n{}", daemon.log());
    assert_eq!(
        status, 200,
        "a failed reload leaves the daemon healthy: {report:#}"
    );
    let message = report["last_reload"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains(&location), "{location} not in {message:?}");
    assert!(message.contains("fortnights"), "{message}");
    assert!(
        daemon.logged(&location, Duration::from_secs(5)).await,
        "{location} not in the log:\n{}",
        daemon.log()
    );
    assert!(daemon.running());

    env.add_event(&store, "order-2", "c2", "purchase", Utc::now())
        .await;
    assert!(
        peer.wait_for_accepted(2, Duration::from_secs(20)).await,
        "nothing sent after a failed reload\n{}",
        daemon.log()
    );
    assert_eq!(subject(&peer.accepted()[1].data), "Old subject");

    // Fixed: the next reload takes the new subject.
    env.write_rule("thank-you.toml", &rule("New subject", "\"1s\""));
    daemon.signal("HUP");
    let reloaded = eventually(Duration::from_secs(10), || async {
        let (_, report) = healthz(http).await;
        report["last_reload"]["ok"] == true
    })
    .await;
    assert!(reloaded, "{}", daemon.log());
    env.add_event(&store, "order-3", "c3", "purchase", Utc::now())
        .await;
    assert!(peer.wait_for_accepted(3, Duration::from_secs(20)).await);
    assert_eq!(subject(&peer.accepted()[2].data), "New subject");

    let (_, text) = http_when_up(http, "/metrics").await;
    let metrics = parse_metrics(&text);
    assert_eq!(
        metrics.get("touchpoint_reloads_total"),
        Some(&2.0),
        "{text}"
    );
    assert_eq!(
        metrics.get("touchpoint_reload_failures_total"),
        Some(&1.0),
        "{text}"
    );

    daemon.signal("TERM");
    let status = daemon.exited_within(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        daemon.log()
    );
}

/// Many due messages and a slow relay: SIGTERM lets what is in flight finish, claims nothing
/// new, exits 0 within `delivery.shutdown_grace`, and leaves no message `sending`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_the_middle_of_a_batch_drains_and_exits_zero() {
    let peer = SmtpPeer::start().await;
    peer.set_reply_delay(Duration::from_millis(150));
    let grace = Duration::from_secs(5);
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Smtp(&peer),
        &[("thank-you.toml", THANK_YOU_SOON)],
        "",
    )
    .await;
    let store = env.store().await;
    let total = 40;
    for i in 0..total {
        let id = format!("c{i}");
        env.add_customer(
            &store,
            &id,
            &format!("customer{i}@example.com"),
            "Someone",
            None,
        )
        .await;
        env.add_event(
            &store,
            &format!("order-{i}"),
            &id,
            "purchase",
            Utc::now() - TimeDelta::minutes(1),
        )
        .await;
    }
    let mut daemon = Daemon::start(&env, "drain", env.command());
    assert!(
        peer.wait_for_accepted(3, Duration::from_secs(30)).await,
        "{}",
        daemon.log()
    );
    daemon.signal("TERM");
    let stopped_at = Instant::now();
    let status = daemon.exited_within(grace + Duration::from_secs(10)).await;
    let took = stopped_at.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        daemon.log()
    );
    assert!(
        took < grace,
        "took {took:?} to stop, more than shutdown_grace {grace:?}\n{}",
        daemon.log()
    );
    let sent_before_stop = peer.accepted_count();
    assert!(
        sent_before_stop < total,
        "the batch finished before SIGTERM"
    );

    let counts = states(&store).await;
    assert_eq!(counts.values().sum::<usize>(), total, "{counts:?}");
    assert_eq!(counts.get("sending"), None, "{counts:?}");
    assert_eq!(counts.get("unknown"), None, "{counts:?}");
    assert_eq!(
        counts.get("sent").copied().unwrap_or(0),
        sent_before_stop,
        "every message the relay took is recorded as sent, and only those: {counts:?}"
    );

    // The rest go out after a restart, none twice.
    peer.set_reply_delay(Duration::ZERO);
    let mut daemon = Daemon::start(&env, "drain-restart", env.command());
    assert!(
        peer.wait_for_accepted(total, Duration::from_secs(60)).await,
        "{}",
        daemon.log()
    );
    daemon.signal("TERM");
    assert!(
        daemon
            .exited_within(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success())
    );
    let mut recipients: Vec<String> = peer
        .accepted()
        .iter()
        .flat_map(|a| a.rcpt_to.clone())
        .collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(recipients.len(), total, "someone got two messages");
    assert_eq!(peer.accepted_count(), total);
    assert_eq!(states(&store).await.get("sent"), Some(&total));
}

/// A relay so slow that no send gets near its body before the grace runs out: at the hard stop
/// every claimed message is released (back to `scheduled`), none is left `sending` for the
/// reaper, and the process still exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_sends_outlasting_the_grace_releases_them_and_exits_zero() {
    let peer = SmtpPeer::start().await;
    // Every reply takes 2.5s (the SMTP timeout is 3s): greeting, EHLO, MAIL, RCPT and DATA take
    // 12.5s, far longer than the 1s grace and the 5s after it.
    peer.set_reply_delay(Duration::from_millis(2500));
    let env = TestEnv::build(
        Backend::Sqlite,
        Sink::Smtp(&peer),
        &[("thank-you.toml", THANK_YOU_SOON)],
        r#"
[planner]
interval = "1s"

[delivery]
lease = "10s"
retry_base = "1s"
retry_max = "2s"
shutdown_grace = "1s"
"#,
    )
    .await;
    let store = env.store().await;
    let total = 12;
    for i in 0..total {
        let id = format!("c{i}");
        env.add_customer(
            &store,
            &id,
            &format!("customer{i}@example.com"),
            "Someone",
            None,
        )
        .await;
        env.add_event(
            &store,
            &format!("order-{i}"),
            &id,
            "purchase",
            Utc::now() - TimeDelta::minutes(1),
        )
        .await;
    }
    let mut daemon = Daemon::start(&env, "hard-stop", env.command());
    let claimed = eventually(Duration::from_secs(30), || async {
        states(&store).await.get("sending").copied().unwrap_or(0) >= 4
    })
    .await;
    assert!(claimed, "{:?}\n{}", states(&store).await, daemon.log());
    daemon.signal("TERM");
    let stopped_at = Instant::now();
    let status = daemon.exited_within(Duration::from_secs(30)).await;
    let took = stopped_at.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        daemon.log()
    );
    // The grace, at most 5s more for sends past the point of no return, at most 2s for QUIT.
    assert!(
        took < Duration::from_secs(9),
        "took {took:?}\n{}",
        daemon.log()
    );
    assert_eq!(peer.accepted_count(), 0);
    let counts = states(&store).await;
    assert_eq!(
        counts.get("scheduled"),
        Some(&total),
        "claims not yet at the body are released at the hard stop, not left to the reaper: \
         {counts:?}\n{}",
        daemon.log()
    );
}

async fn health_and_metrics(backend: Backend) {
    let peer = SmtpPeer::start().await;
    peer.fault_for_recipient(
        "bounce",
        support::smtp::Fault::Reply {
            at: support::smtp::Stage::Rcpt,
            code: 550,
            text: "5.1.1 No such user".into(),
        },
    );
    let later = r#"
[[rule]]
name = "follow-up"
template = "follow-up"
subject = "Next steps"
when = { event = "purchase", after = "1h" }
"#;
    let env = TestEnv::new(
        backend,
        Sink::Smtp(&peer),
        &[
            ("thank-you.toml", THANK_YOU_SOON),
            ("follow-up.toml", later),
        ],
        "",
    )
    .await;
    let store = env.store().await;
    for (i, email) in ["ada@example.com", "grace@example.com", "bounce@example.com"]
        .iter()
        .enumerate()
    {
        let id = format!("c{i}");
        env.add_customer(&store, &id, email, "Someone", None).await;
        env.add_event(&store, &format!("order-{i}"), &id, "purchase", Utc::now())
            .await;
    }
    let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut command = env.command();
    command.env("TOUCHPOINT_HTTP__LISTEN", http.to_string());
    let mut daemon = Daemon::start(&env, "http", command);

    // Settled: two thank-yous sent, one failed, three follow-ups an hour away.
    let settled = eventually(Duration::from_secs(30), || async {
        let counts = states(&store).await;
        counts.get("sent") == Some(&2)
            && counts.get("failed") == Some(&1)
            && counts.get("scheduled") == Some(&3)
    })
    .await;
    assert!(settled, "{:?}\n{}", states(&store).await, daemon.log());

    let (status, report) = healthz(http).await;
    assert_eq!(status, 200, "{report:#}");
    assert_eq!(report["healthy"], true, "{report:#}");
    assert_eq!(report["database"]["ok"], true, "{report:#}");
    assert_eq!(report["dispatcher"]["ok"], true, "{report:#}");
    assert_eq!(report["last_reload"]["ok"], true, "{report:#}");

    let (status, text) = http_when_up(http, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let metrics = parse_metrics(&text);
    let mut expected: BTreeMap<(String, String), usize> = BTreeMap::new();
    for entry in store.log(&Default::default()).await.expect("log") {
        *expected
            .entry((entry.rule.clone(), entry.state.to_string()))
            .or_default() += 1;
    }
    let mut exported: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (series, value) in &metrics {
        let Some(labels) = series.strip_prefix("touchpoint_messages{") else {
            continue;
        };
        let labels = labels.trim_end_matches('}');
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_else(|| panic!("no {name} label in {series}"))
        };
        if *value != 0.0 {
            exported.insert((label("rule"), label("state")), *value as usize);
        }
    }
    assert_eq!(exported, expected, "{text}");
    assert_eq!(metrics.get("touchpoint_queue_depth"), Some(&3.0), "{text}");
    // Due but not sent, and how late: the same as the database says.
    let (due, _) = store.due_backlog().await.expect("due backlog");
    assert_eq!(
        metrics.get("touchpoint_due_messages"),
        Some(&(due as f64)),
        "{text}"
    );
    assert!(
        metrics.contains_key("touchpoint_oldest_due_seconds"),
        "{text}"
    );
    let sent = expected
        .iter()
        .filter(|((_, state), _)| state == "sent")
        .map(|(_, n)| *n)
        .sum::<usize>();
    assert_eq!(
        metrics.get("touchpoint_lateness_seconds_count"),
        Some(&(sent as f64)),
        "{text}"
    );
    assert_eq!(
        metrics.get("touchpoint_send_seconds_count"),
        Some(&3.0),
        "{text}"
    );
    assert_eq!(
        metrics.get("touchpoint_send_seconds_bucket{le=\"+Inf\"}"),
        Some(&3.0),
        "{text}"
    );
    assert!(
        metrics
            .keys()
            .any(|k| k.starts_with("touchpoint_send_seconds_bucket{le=\"0.")),
        "{text}"
    );
    assert!(
        metrics.contains_key("touchpoint_send_seconds_sum"),
        "{text}"
    );
    assert_eq!(
        metrics.get("touchpoint_reloads_total"),
        Some(&0.0),
        "{text}"
    );
    assert_eq!(
        metrics.get("touchpoint_reload_failures_total"),
        Some(&0.0),
        "{text}"
    );
    assert_eq!(
        metrics.get("touchpoint_database_errors_total"),
        Some(&0.0),
        "{text}"
    );
    assert!(
        text.contains("# TYPE touchpoint_send_seconds histogram"),
        "{text}"
    );
    assert_eq!(metrics.get("touchpoint_database_up"), Some(&1.0), "{text}");

    if backend == Backend::Postgres {
        // The database goes away under the daemon.
        let name = env
            .database_url
            .rsplit('/')
            .next()
            .expect("database name")
            .to_string();
        let dropped = Command::new("psql")
            .args(["-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-d", &format!("{}/postgres", support::postgres_admin_url())])
            .args(["-c", &format!("DROP DATABASE {name} WITH (FORCE)")])
            .output()
            .expect("run psql");
        assert!(
            dropped.status.success(),
            "{}",
            String::from_utf8_lossy(&dropped.stderr)
        );
        let unhealthy = eventually(Duration::from_secs(20), || async {
            healthz(http).await.0 != 200
        })
        .await;
        let (status, report) = healthz(http).await;
        assert!(unhealthy, "{status} {report:#}");
        assert_eq!(status, 503, "{report:#}");
        assert_eq!(report["healthy"], false, "{report:#}");
        assert_eq!(report["database"]["ok"], false, "{report:#}");
        // The error counter is there to alert on during an outage: /metrics still answers.
        // (Its count of messages may be up to METRICS_TTL old: wait for the failed one.)
        let counted = eventually(Duration::from_secs(20), || async {
            let (status, text) = http_when_up(http, "/metrics").await;
            let metrics = parse_metrics(&text);
            status == 200
                && metrics
                    .get("touchpoint_database_errors_total")
                    .is_some_and(|n| *n > 0.0)
                && metrics.get("touchpoint_database_up") == Some(&0.0)
        })
        .await;
        let (status, text) = http_when_up(http, "/metrics").await;
        assert!(counted, "{status}\n{text}");
        let metrics = parse_metrics(&text);
        assert_eq!(metrics.get("touchpoint_database_up"), Some(&0.0), "{text}");
        assert!(
            !metrics
                .keys()
                .any(|k| k.starts_with("touchpoint_messages{")),
            "counts from nowhere: {text}"
        );
        assert!(daemon.running(), "{}", daemon.log());
    }

    daemon.signal("TERM");
    let status = daemon.exited_within(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        daemon.log()
    );
}

on_both_backends!(health_and_metrics);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smtp_password_comes_from_a_systemd_credential_and_stays_out_of_the_log() {
    const PASSWORD: &str = "c0rrect-h0rse-battery-staple";
    const USER: &str = "shop@acme.example";
    let peer = SmtpPeer::start().await;
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Smtp(&peer),
        &[("thank-you.toml", THANK_YOU_SOON)],
        "",
    )
    .await;
    // The production layout: the config names the credential, systemd provides the file.
    let config = std::fs::read_to_string(&env.config_path).expect("config");
    let config = config.replacen(
        "[transport.smtp]\n",
        &format!(
            "[transport.smtp]\nusername = \"{USER}\"\npassword_credential = \"smtp-password\"\n"
        ),
        1,
    );
    std::fs::write(&env.config_path, config).expect("config");
    let credentials = env.path().join("credentials");
    std::fs::create_dir(&credentials).expect("credentials dir");
    std::fs::write(credentials.join("smtp-password"), format!("{PASSWORD}\n")).expect("credential");

    // Without the credential directory, `check` says what is missing.
    let (ok, _, stderr) = env.run_cli(&["check"]);
    assert!(!ok);
    assert!(stderr.contains("CREDENTIALS_DIRECTORY"), "{stderr}");
    let mut check = env.command();
    check
        .arg("check")
        .env("CREDENTIALS_DIRECTORY", &credentials);
    let output = check.output().expect("run check");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let store = env.store().await;
    env.add_customer(&store, "c1", "ada@example.com", "Ada Lovelace", None)
        .await;
    env.add_event(&store, "order-1", "c1", "purchase", Utc::now())
        .await;
    let mut command = env.command();
    command
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .env("TOUCHPOINT_LOG", "trace");
    let mut daemon = Daemon::start(&env, "credential", command);
    assert!(
        peer.wait_for_accepted(1, Duration::from_secs(20)).await,
        "{}",
        daemon.log()
    );
    assert_eq!(peer.auth_users(), vec![USER.to_string()]);
    assert_eq!(peer.accepted()[0].auth_user.as_deref(), Some(USER));
    daemon.signal("HUP");
    assert!(
        daemon
            .logged("reloaded rules and templates", Duration::from_secs(10))
            .await
    );
    daemon.signal("TERM");
    assert!(
        daemon
            .exited_within(Duration::from_secs(10))
            .await
            .is_some_and(|s| s.success()),
        "{}",
        daemon.log()
    );
    let log = daemon.log();
    assert!(log.contains("touchpoint is running"), "{log}");
    assert!(
        !log.contains(PASSWORD),
        "the SMTP password is in the daemon's log"
    );
    for needle in [base64(&format!("\0{USER}\0{PASSWORD}")), base64(PASSWORD)] {
        assert!(
            !log.contains(&needle),
            "the password (base64) is in the log"
        );
    }
}

fn base64(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let mut n = 0u32;
        for (i, b) in chunk.iter().enumerate() {
            n |= u32::from(*b) << (16 - 8 * i);
        }
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
