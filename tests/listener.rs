//! The HTTP listener under abuse: the real binary under a low open-files limit flooded with
//! idle, slow-header and slow-body connections keeps its descriptors, answers /healthz and
//! goes on sending; /metrics shares one count of the messages table between scrapes; /healthz
//! names a reason, never a database error's text.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use support::http::get;
use support::{Backend, ChildDaemon, Sink, TestEnv, eventually, open_fds};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RULE: &str = r#"
[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "0s" }
"#;

/// The daemon's open-files limit in the flood test.
const NOFILE: usize = 256;
/// Idle connections the flood opens: more than the cap and more than the limit itself.
const IDLE: usize = 600;
const SLOW: usize = 20;

/// The cap the daemon settled on, from its "HTTP listener ready" line.
fn logged_cap(log: &str) -> usize {
    log.lines()
        .find(|l| l.contains("HTTP listener ready"))
        .and_then(|l| l.split("max_connections=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no max_connections in the log:\n{log}"))
}

async fn connect(addr: SocketAddr) -> Option<TcpStream> {
    tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()
}

/// Whether the server closes `stream` within `patience` (reading whatever it sends first).
async fn closed_by_server(stream: &mut TcpStream, patience: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + patience;
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Sends `head`, then one byte of `trickle` every 300 ms; true once the server closes the
/// connection, false if it is still open after `patience`.
async fn trickle(
    addr: SocketAddr,
    head: String,
    trickle: &'static [u8],
    patience: Duration,
) -> bool {
    let Some(mut stream) = connect(addr).await else {
        return true;
    };
    let started = Instant::now();
    if stream.write_all(head.as_bytes()).await.is_err() {
        return true;
    }
    for byte in trickle.iter().cycle() {
        if started.elapsed() > patience {
            return false;
        }
        if stream.write_all(&[*byte]).await.is_err()
            || closed_by_server(&mut stream, Duration::from_millis(300)).await
        {
            return true;
        }
    }
    false
}

/// The most descriptors and sockets the process had, sampled until `stop` is cancelled.
async fn sample_fds(pid: u32, stop: tokio_util::sync::CancellationToken) -> (usize, usize) {
    let mut most = (0, 0);
    while !stop.is_cancelled() {
        let (all, sockets) = open_fds(pid);
        most = (most.0.max(all), most.1.max(sockets));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_and_slow_connections_leaves_the_daemon_its_descriptors() {
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[("thank-you.toml", RULE)],
        "",
    )
    .await;
    let store = env.store().await;
    let daemon = ChildDaemon::start(
        &env,
        "flood",
        &format!("ulimit -n {NOFILE}"),
        &[
            ("TOUCHPOINT_HTTP__MAX_CONNECTIONS", "1000"),
            ("TOUCHPOINT_HTTP__HEADER_READ_TIMEOUT", "2s"),
            ("TOUCHPOINT_HTTP__BODY_READ_TIMEOUT", "2s"),
            ("TOUCHPOINT_HTTP__IDLE_TIMEOUT", "2s"),
        ],
    );
    daemon.ready().await;
    let addr = daemon.http;
    let log = daemon.log();
    let cap = logged_cap(&log);
    assert!(
        cap < NOFILE && log.contains("http.max_connections lowered"),
        "the cap of 1000 must be fitted to the limit of {NOFILE}:\n{log}"
    );
    // Sockets of its own: the listener, the signal pipe...
    let (_, own_sockets) = open_fds(daemon.pid());
    let stop_sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn(sample_fds(daemon.pid(), stop_sampling.clone()));

    // Slow heads (never finished) and slow bodies (a login form that never arrives whole).
    let patience = Duration::from_secs(20);
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let head = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n");
        slow.push(tokio::spawn(trickle(
            addr,
            head,
            b"X-Slow: 1\r\n",
            patience,
        )));
        let head = format!(
            "POST /login HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: 1000\r\n\r\n"
        );
        slow.push(tokio::spawn(trickle(addr, head, b"password=x&", patience)));
    }
    // Idle connections: more than the cap, more than the daemon's whole limit.
    let mut idle = Vec::new();
    let mut refused = 0;
    while idle.len() < IDLE && refused < 5 {
        match connect(addr).await {
            Some(stream) => idle.push(stream),
            None => refused += 1,
        }
    }
    assert!(
        idle.len() > NOFILE,
        "only {} connections opened",
        idle.len()
    );

    // Meanwhile a fresh connection gets /healthz, and a due message goes out.
    let health = get(addr, "/healthz", &[]).await;
    assert_eq!(health.status, 200, "{}\n{}", health.text(), daemon.log());
    env.add_customer(&store, "ada", "ada@example.com", "Ada Lovelace", None)
        .await;
    env.add_event(&store, "order-1", "ada", "purchase", Utc::now())
        .await;
    let outbox = env.path().join("outbox");
    let sent = eventually(Duration::from_secs(30), || async {
        std::fs::read_dir(&outbox).is_ok_and(|d| d.count() == 1)
    })
    .await;
    assert!(
        sent,
        "no message went out during the flood:\n{}",
        daemon.log()
    );

    // Every idle connection is closed by the daemon (made room for a newer one, or timed out),
    // and so is every slow one.
    let mut still_open = 0;
    for stream in &mut idle {
        if !closed_by_server(stream, patience).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "idle connections left open");
    for task in slow {
        assert!(
            task.await.expect("trickle task"),
            "a slow connection was left open"
        );
    }
    // A kept-alive connection that goes quiet after a request is closed too.
    let mut kept = connect(addr).await.expect("connect");
    kept.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    assert!(closed_by_server(&mut kept, Duration::from_secs(10)).await);
    assert_eq!(get(addr, "/healthz", &[]).await.status, 200);

    stop_sampling.cancel();
    let (most_fds, most_sockets) = sampler.await.expect("sampler");
    assert!(
        most_fds + 16 <= NOFILE,
        "the daemon had {most_fds} descriptors open, too close to its limit of {NOFILE}"
    );
    // Its own, the cap, and one accepted connection waiting for a slot.
    assert!(
        most_sockets <= own_sockets + cap + 1,
        "{most_sockets} sockets open with {own_sockets} of its own and a cap of {cap}"
    );
    let log = daemon.log();
    assert!(!log.contains("Too many open files"), "{log}");
    drop(idle);
    daemon.stop().await;
}

fn scans(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("touchpoint_metrics_scans_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no scan counter in:\n{metrics}"))
}

fn waiting(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("touchpoint_queue_depth "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no queue depth in:\n{metrics}"))
}

/// 16 scrapes at once: (scan counter, queue depth) each saw.
async fn scrape_together(addr: SocketAddr) -> Vec<(u64, u64)> {
    let scrapes: Vec<_> = (0..16)
        .map(|_| tokio::spawn(async move { get(addr, "/metrics", &[]).await }))
        .collect();
    let mut seen = Vec::new();
    for scrape in scrapes {
        let response = scrape.await.expect("scrape");
        assert_eq!(response.status, 200);
        seen.push((scans(&response.text()), waiting(&response.text())));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scrapes_share_one_count_of_the_messages_table() {
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[("thank-you.toml", RULE)],
        "",
    )
    .await;
    let store = env.store().await;
    let daemon = env.start().await;
    let first = get(daemon.http, "/metrics", &[]).await.text();
    assert_eq!(scans(&first), 1, "{first}");
    assert_eq!(waiting(&first), 0);
    // A message appears; scrapes within the TTL still share the first count.
    env.add_customer(&store, "ada", "ada@example.com", "Ada", None)
        .await;
    let later = Utc::now() + TimeDelta::days(1);
    store
        .insert_messages(&[touchpoint::store::NewMessage {
            rule: "thank-you".into(),
            customer_id: "ada".into(),
            event_id: None,
            dedupe_key: "thank-you:ada".into(),
            trigger_at: later,
            due_at: later,
            expires_at: None,
            detail: serde_json::json!({}),
        }])
        .await
        .expect("message");
    assert!(
        scrape_together(daemon.http)
            .await
            .iter()
            .all(|s| *s == (1, 0))
    );
    // After the TTL, 16 scrapes at once make one new count between them, and see it.
    tokio::time::sleep(touchpoint::metrics::METRICS_TTL + Duration::from_millis(200)).await;
    let seen = scrape_together(daemon.http).await;
    assert!(seen.iter().all(|s| *s == (2, 1)), "{seen:?}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_names_a_reason_not_the_database_error() {
    let env = TestEnv::new(
        Backend::Postgres,
        Sink::Files,
        &[("thank-you.toml", RULE)],
        "",
    )
    .await;
    let daemon = env.start().await;
    let health = get(daemon.http, "/healthz", &[]).await;
    assert_eq!(health.status, 200, "{}", health.text());
    let report: serde_json::Value = serde_json::from_slice(&health.body).expect("JSON");
    assert_eq!(report["database"]["detail"], "reachable", "{report:#}");
    // The database goes away: PostgreSQL's error names it ("database ... does not exist").
    let name = env
        .database_url
        .rsplit('/')
        .next()
        .expect("name")
        .to_string();
    support::drop_postgres_database(&name);
    let down = eventually(Duration::from_secs(20), || async {
        get(daemon.http, "/healthz", &[]).await.status == 503
    })
    .await;
    let health = get(daemon.http, "/healthz", &[]).await;
    assert!(down, "{} {}", health.status, health.text());
    let report: serde_json::Value = serde_json::from_slice(&health.body).expect("JSON");
    assert_eq!(report["healthy"], false, "{report:#}");
    assert_eq!(report["database"]["ok"], false, "{report:#}");
    let detail = report["database"]["detail"].as_str().unwrap_or_default();
    assert!(
        ["unreachable", "timeout", "error"].contains(&detail),
        "{report:#}"
    );
    let text = health.text();
    for leak in [
        name.as_str(),
        "does not exist",
        "terminating",
        "database error",
    ] {
        assert!(!text.contains(leak), "{leak:?} in {text}");
    }
    daemon.shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), daemon.handle).await;
}
