//! Shared test support: a directory with a config, rules and templates; a database of the
//! test's own (a SQLite file, or a fresh PostgreSQL database on the machine's server); the
//! daemon started in-process or as the real binary; a real SMTP peer on loopback; and a small
//! HTTP client (`http`).
#![allow(dead_code)]

pub mod dkim;
pub mod http;
pub mod smtp;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use touchpoint::config::Config;
use touchpoint::store::{Customer, Event, SharedStore};

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("TOUCHPOINT_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs an async scenario once per backend, as two tests: `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$scenario($crate::support::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$scenario($crate::support::Backend::Postgres).await
                }
            }
        )*
    };
}

/// Where messages go in a test.
pub enum Sink<'a> {
    /// The file transport into `<dir>/outbox`.
    Files,
    /// SMTP to this peer.
    Smtp(&'a smtp::SmtpPeer),
}

/// A test's world: directory, config, rules, templates and database.
pub struct TestEnv {
    pub dir: TempDir,
    pub backend: Backend,
    pub database_url: String,
    postgres_database: Option<String>,
    pub config_path: PathBuf,
}

/// Config keys every test wants: fast planning and reaping, HTTP on a free port.
pub const FAST: &str = r#"
[planner]
interval = "1s"
reconcile_every = "1m"

[delivery]
lease = "10s"
retry_base = "1s"
retry_max = "2s"
shutdown_grace = "5s"
"#;

impl TestEnv {
    /// Plans anniversaries up to 400 days ahead (`planner.horizon`, 35 days by default), for
    /// tests that expect next year's anniversary as a message.
    pub fn plan_far_ahead(&self) {
        let text = std::fs::read_to_string(&self.config_path).expect("read config");
        assert!(text.contains("[planner]\n"), "no [planner] in {text}");
        let text = text.replacen("[planner]\n", "[planner]\nhorizon = \"400d\"\n", 1);
        std::fs::write(&self.config_path, text).expect("write config");
    }

    /// A new world with the repository's templates, the given rule files and config text
    /// appended to the basics (database, transport, sender, business). `extra` may hold whole
    /// sections; don't repeat a section that the basics or `FAST` already have unless you
    /// leave out `FAST` (pass `with_fast = false`).
    pub async fn new(
        backend: Backend,
        sink: Sink<'_>,
        rules: &[(&str, &str)],
        extra: &str,
    ) -> TestEnv {
        TestEnv::build(backend, sink, rules, &format!("{FAST}\n{extra}")).await
    }

    /// Like `new` but without the `FAST` sections, for tests that set them themselves.
    pub async fn build(
        backend: Backend,
        sink: Sink<'_>,
        rules: &[(&str, &str)],
        extra: &str,
    ) -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("touchpoint-test-")
            .tempdir()
            .expect("temp dir");
        copy_dir(&repo_path("templates"), &dir.path().join("templates"));
        std::fs::create_dir_all(dir.path().join("rules")).expect("rules dir");
        for (name, text) in rules {
            std::fs::write(dir.path().join("rules").join(name), text).expect("rule file");
        }
        let (database_url, postgres_database) = match backend {
            Backend::Sqlite => ("sqlite:var/touchpoint.db".to_string(), None),
            Backend::Postgres => {
                let name = format!("tp_test_{}", uuid::Uuid::new_v4().simple());
                create_postgres_database(&name).await;
                (format!("{}/{name}", postgres_admin_url()), Some(name))
            }
        };
        let transport = match sink {
            Sink::Files => {
                "[transport]\nkind = \"file\"\n[transport.file]\ndir = \"outbox\"\n".to_string()
            }
            Sink::Smtp(peer) => format!(
                "[transport]\nkind = \"smtp\"\n[transport.smtp]\nhost = \"127.0.0.1\"\nport = {}\ntimeout = \"3s\"\npool_size = 4\n",
                peer.port()
            ),
        };
        let config = format!(
            r#"[database]
url = "{database_url}"

[rules]
dir = "rules"

[templates]
dir = "templates"

{transport}
[sender]
from = "Acme Flowers <hello@acme.example>"

[business]
name = "Acme Flowers"
address = "1 Garden Lane, Springfield"

[http]
listen = ""

{extra}
"#
        );
        let config_path = dir.path().join("touchpoint.toml");
        std::fs::write(&config_path, config).expect("config file");
        TestEnv {
            dir,
            backend,
            database_url,
            postgres_database,
            config_path,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path, Vec::<(String, String)>::new()).expect("test config loads")
    }

    /// The database, migrated.
    pub async fn store(&self) -> SharedStore {
        let config = self.config();
        let store = touchpoint::store::open(&config.database_url(), 4)
            .await
            .expect("open store");
        store.migrate().await.expect("migrate");
        store
    }

    /// Runs one SQL statement on the test's database, for what the store does not offer
    /// (making a row look older than it is).
    pub async fn execute_sql(&self, sql: &str) {
        use sqlx::Connection as _;
        let done = match self.backend {
            Backend::Sqlite => {
                let options = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(self.path().join("var/touchpoint.db"))
                    .busy_timeout(Duration::from_secs(10));
                let mut connection = sqlx::SqliteConnection::connect_with(&options)
                    .await
                    .expect("open the SQLite database");
                sqlx::query(sql).execute(&mut connection).await.map(|_| ())
            }
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&self.database_url)
                    .await
                    .expect("connect to PostgreSQL");
                sqlx::query(sql).execute(&mut connection).await.map(|_| ())
            }
        };
        done.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Replaces (or adds) a rule file.
    pub fn write_rule(&self, name: &str, text: &str) {
        std::fs::write(self.path().join("rules").join(name), text).expect("rule file");
    }

    /// The real binary with `--config` set and a quiet log unless the test asks.
    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_touchpoint"));
        command
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("NOTIFY_SOCKET")
            // The harness's own variable is not a config key; the binary would reject it.
            .env_remove("TOUCHPOINT_TEST_POSTGRES")
            .env("TOUCHPOINT_LOG", "info");
        command
    }

    /// Runs the binary to completion; returns (exit ok, stdout, stderr).
    pub fn run_cli(&self, args: &[&str]) -> (bool, String, String) {
        let output = self.command().args(args).output().expect("run touchpoint");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Starts `touchpoint run` as a child process, logs going to `<dir>/daemon-N.log`.
    pub fn spawn_daemon(&self) -> Child {
        let n = std::fs::read_dir(self.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let log =
            std::fs::File::create(self.path().join(format!("daemon-{n}.log"))).expect("log file");
        self.command()
            .arg("run")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn touchpoint run")
    }

    /// Starts the daemon in this process (with HTTP on a free loopback port).
    pub async fn start(&self) -> InProcess {
        let config = self.config();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http = listener.local_addr().expect("addr");
        let listeners = touchpoint::Listeners {
            http: Some(listener),
        };
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(touchpoint::run(config, listeners, shutdown.clone()));
        InProcess {
            shutdown,
            handle,
            http,
        }
    }

    pub async fn add_customer(
        &self,
        store: &SharedStore,
        id: &str,
        email: &str,
        name: &str,
        timezone: Option<&str>,
    ) {
        let customer = Customer {
            id: id.into(),
            email: email.into(),
            name: Some(name.into()),
            timezone: timezone.map(str::to_string),
            attributes: serde_json::json!({}),
        };
        store
            .upsert_customers(&[customer])
            .await
            .expect("add customer");
    }

    pub async fn add_event(
        &self,
        store: &SharedStore,
        id: &str,
        customer: &str,
        kind: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) {
        let event = Event {
            id: id.into(),
            customer_id: customer.into(),
            kind: kind.into(),
            occurred_at: at,
            data: serde_json::json!({}),
        };
        store.insert_events(&[event]).await.expect("add event");
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(name) = &self.postgres_database {
            drop_postgres_database(name);
        }
    }
}

/// Drops a test's database, best effort: the next run's databases have other names anyway.
pub fn drop_postgres_database(name: &str) {
    let _ = Command::new("psql")
        .args(["-q", "-d", &format!("{}/postgres", postgres_admin_url())])
        .args([
            "-c",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The daemon running inside the test process.
pub struct InProcess {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), touchpoint::daemon::DaemonError>>,
    pub http: std::net::SocketAddr,
}

impl InProcess {
    /// Stops it the way SIGTERM does and waits for it to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.handle).await;
        let result = result
            .expect("daemon stops within 30s")
            .expect("daemon task");
        result.expect("daemon ran without error");
    }
}

pub async fn create_postgres_database(name: &str) {
    use sqlx::Connection;
    let url = format!("{}/postgres", postgres_admin_url());
    let mut connection = sqlx::PgConnection::connect(&url)
        .await
        .expect("connect to the test PostgreSQL server");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut connection)
        .await
        .expect("create test database");
}

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy file");
        }
    }
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts of messages by state, from the log.
pub async fn states(store: &SharedStore) -> std::collections::BTreeMap<String, usize> {
    let entries = store
        .log(&touchpoint::store::LogFilter::default())
        .await
        .expect("log");
    let mut counts = std::collections::BTreeMap::new();
    for entry in entries {
        *counts.entry(entry.state.to_string()).or_default() += 1;
    }
    counts
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// The open file descriptors of a process: (all, sockets), from /proc/PID/fd.
pub fn open_fds(pid: u32) -> (usize, usize) {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let mut all = 0;
    let mut sockets = 0;
    for entry in entries.flatten() {
        all += 1;
        if std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        {
            sockets += 1;
        }
    }
    (all, sockets)
}

/// A `kB` line of /proc/PID/status (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// `touchpoint run` as a child process with its log in a file, killed when dropped.
pub struct ChildDaemon {
    pub child: Child,
    pub log: PathBuf,
    pub http: std::net::SocketAddr,
}

impl ChildDaemon {
    /// Runs `touchpoint run` with HTTP on a free loopback port, under `sh -c` with `limits`
    /// (shell commands such as `ulimit -n 256`) applied first, and `env` set.
    pub fn start(env: &TestEnv, name: &str, limits: &str, vars: &[(&str, &str)]) -> ChildDaemon {
        let http: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let log = env.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let script = format!("{limits}\nexec \"$0\" \"$@\"");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .arg(env!("CARGO_BIN_EXE_touchpoint"))
            .arg("--config")
            .arg(&env.config_path)
            .arg("run")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env_remove("TOUCHPOINT_TEST_POSTGRES")
            .env("TOUCHPOINT_LOG", "info")
            .env("TOUCHPOINT_HTTP__LISTEN", http.to_string())
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        let child = command.spawn().expect("spawn touchpoint run");
        ChildDaemon { child, log, http }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until /healthz answers 200.
    pub async fn ready(&self) {
        let up = eventually(Duration::from_secs(30), || async {
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(self.http),
            )
            .await;
            matches!(attempt, Ok(Ok(_)))
                && http::get(self.http, "/healthz", &[]).await.status == 200
        })
        .await;
        assert!(up, "the daemon did not come up:\n{}", self.log());
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let exited = eventually(Duration::from_secs(30), || {
            let done = matches!(self.child.try_wait(), Ok(Some(_)));
            async move { done }
        })
        .await;
        let status = self.child.try_wait().ok().flatten();
        assert!(
            exited && status.is_some_and(|s| s.success()),
            "{status:?}\n{}",
            self.log()
        );
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
