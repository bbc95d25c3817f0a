//! The benchmarks behind BENCHMARKS.md, shared by the `touchpoint` bench target (full size, in
//! the release build: `cargo bench --bench touchpoint`, or `bench/run`) and by
//! `tests/bench_smoke.rs` (a few thousand rows in the debug build, so that they cannot rot).
//!
//! Everything runs against the real thing: a SQLite file or a fresh PostgreSQL database on the
//! machine's server, the repository's three example rules and templates, Postfix's `smtp-sink`
//! on loopback, and the real `touchpoint` binary as a child process whose CPU time and memory
//! are read from `/proc`. Planning is measured in-process through `touchpoint::plan::plan_pass`,
//! the function the daemon's planner runs every `planner.interval`. Seeding (one set-based
//! statement per table: a recursive CTE on SQLite, `generate_series` on PostgreSQL) is not
//! measured.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Connection, PgPool, SqlitePool};
use touchpoint::config::Config;
use touchpoint::plan::{Cursors, PlanSettings, plan_pass};
use touchpoint::playbook::Playbook;
use touchpoint::store::SharedStore;

/// The rule every sending and punctuality message belongs to: no send window (a window would
/// hold messages back by the clock), and the heaviest guard (an `unless` lookup).
pub const SEND_RULE: &str = "discovery-call-follow-up";

/// Where PostgreSQL databases are created (`TOUCHPOINT_TEST_POSTGRES`, as in the tests).
pub fn postgres_admin_url() -> String {
    std::env::var("TOUCHPOINT_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

/// The bench's own connection to the database, for seeding and reading results.
#[derive(Clone)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Pool {
    pub async fn execute(&self, sql: &str) -> Result<u64> {
        Ok(match self {
            Pool::Sqlite(pool) => sqlx::query(sql).execute(pool).await?.rows_affected(),
            Pool::Postgres(pool) => sqlx::query(sql).execute(pool).await?.rows_affected(),
        })
    }

    pub async fn count(&self, sql: &str) -> Result<i64> {
        Ok(match self {
            Pool::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
            Pool::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await?,
        })
    }

    pub async fn floats(&self, sql: &str) -> Result<Vec<f64>> {
        Ok(match self {
            Pool::Sqlite(pool) => sqlx::query_scalar(sql).fetch_all(pool).await?,
            Pool::Postgres(pool) => sqlx::query_scalar(sql).fetch_all(pool).await?,
        })
    }

    async fn close(&self) {
        match self {
            Pool::Sqlite(pool) => pool.close().await,
            Pool::Postgres(pool) => pool.close().await,
        }
    }
}

/// How the daemon is configured for one benchmark.
#[derive(Debug, Clone)]
pub struct Setup {
    /// SMTP to `smtp-sink` on this port; `None`: the file transport (planning and idle).
    pub smtp_port: Option<u16>,
    /// `transport.smtp.pool_size`: the K SMTP connections.
    pub connections: usize,
    /// `planner.horizon`, when not the default.
    pub horizon: Option<&'static str>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            smtp_port: None,
            connections: 4,
            horizon: None,
        }
    }
}

/// One benchmark's world: a directory with the config, and a database of its own.
pub struct World {
    pub dir: tempfile::TempDir,
    pub backend: Backend,
    pub config_path: PathBuf,
    pub db: Pool,
    postgres_database: Option<String>,
}

impl World {
    pub async fn new(backend: Backend, setup: &Setup) -> Result<World> {
        let dir = tempfile::Builder::new()
            .prefix("touchpoint-bench-")
            .tempdir()?;
        let (url, postgres_database) = match backend {
            Backend::Sqlite => (
                format!("sqlite:{}", dir.path().join("touchpoint.db").display()),
                None,
            ),
            Backend::Postgres => {
                let name = format!("tp_bench_{}", uuid::Uuid::new_v4().simple());
                let mut admin =
                    sqlx::PgConnection::connect(&format!("{}/postgres", postgres_admin_url()))
                        .await
                        .context("connect to PostgreSQL (TOUCHPOINT_TEST_POSTGRES)")?;
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await?;
                admin.close().await?;
                (format!("{}/{name}", postgres_admin_url()), Some(name))
            }
        };
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let transport = match setup.smtp_port {
            Some(port) => format!(
                "[transport]\nkind = \"smtp\"\n[transport.smtp]\nhost = \"127.0.0.1\"\nport = {port}\n\
                 pool_size = {}\ntimeout = \"30s\"\n",
                setup.connections
            ),
            None => "[transport]\nkind = \"file\"\n[transport.file]\ndir = \"outbox\"\n".into(),
        };
        let planner = match setup.horizon {
            Some(horizon) => format!("[planner]\nhorizon = \"{horizon}\"\n"),
            None => String::new(),
        };
        // The example config's defaults, except: the repository's rules and templates, HTTP on
        // a free loopback port, and a public base URL so that every message carries its signed
        // List-Unsubscribe link, as in production.
        let config = format!(
            r#"[database]
url = "{url}"

[rules]
dir = "{rules}"

[templates]
dir = "{templates}"

{transport}
{planner}
[sender]
from = "Acme Flowers <hello@acme.example>"

[business]
name = "Acme Flowers"
address = "1 Garden Lane, Springfield"
website = "https://acme.example"

[http]
listen = "127.0.0.1:0"

[links]
base_url = "https://touchpoint.acme.example"
"#,
            rules = repo.join("config/rules").display(),
            templates = repo.join("templates").display(),
        );
        let config_path = dir.path().join("touchpoint.toml");
        std::fs::write(&config_path, config)?;
        let mut world = World {
            dir,
            backend,
            config_path,
            db: Pool::Sqlite(SqlitePool::connect_lazy("sqlite::memory:")?),
            postgres_database,
        };
        // The daemon's own migrations make the tables.
        let store = world.store().await?;
        drop(store);
        world.db = match backend {
            Backend::Sqlite => Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(
                        SqliteConnectOptions::new()
                            .filename(world.dir.path().join("touchpoint.db"))
                            .journal_mode(SqliteJournalMode::Wal)
                            .busy_timeout(Duration::from_secs(30)),
                    )
                    .await?,
            ),
            Backend::Postgres => Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&url)
                    .await?,
            ),
        };
        Ok(world)
    }

    pub fn config(&self) -> Result<Config> {
        Config::load(&self.config_path, Vec::<(String, String)>::new())
            .map_err(|e| anyhow!("the bench config does not load: {e}"))
    }

    /// What `plan::plan_pass` needs, as the daemon's planner has it.
    pub async fn planner(&self) -> Result<(Playbook, PlanSettings, SharedStore)> {
        let config = self.config()?;
        let playbook = Playbook::load(&config).map_err(|e| anyhow!("{e}"))?;
        let settings = PlanSettings::from_config(&config);
        Ok((playbook, settings, self.store().await?))
    }

    /// The daemon's store on this database, migrated.
    pub async fn store(&self) -> Result<SharedStore> {
        let config = self.config()?;
        let store =
            touchpoint::store::open(&config.database_url(), config.database.max_connections)
                .await?;
        store.migrate().await?;
        Ok(store)
    }

    /// `n` customers `c1..cn`, in four time zones (one of them the default).
    pub async fn seed_customers(&self, n: u64) -> Result<()> {
        let sql = match self.backend {
            Backend::Sqlite => format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}) \
                 INSERT INTO customers (id, email, name, timezone) \
                 SELECT 'c' || i, 'customer' || i || '@example.com', \
                 CASE i % 3 WHEN 0 THEN 'Ada Lovelace' WHEN 1 THEN 'Grace Hopper' ELSE 'Alan Turing' END, \
                 CASE i % 4 WHEN 0 THEN 'Europe/London' WHEN 1 THEN 'America/New_York' \
                 WHEN 2 THEN 'Asia/Tokyo' ELSE NULL END FROM n"
            ),
            Backend::Postgres => format!(
                "INSERT INTO customers (id, email, name, timezone) \
                 SELECT 'c' || i, 'customer' || i || '@example.com', \
                 (ARRAY['Ada Lovelace', 'Grace Hopper', 'Alan Turing'])[1 + i % 3], \
                 (ARRAY['Europe/London', 'America/New_York', 'Asia/Tokyo', NULL])[1 + i % 4] \
                 FROM generate_series(1, {n}) AS i"
            ),
        };
        self.db.execute(&sql).await?;
        Ok(())
    }

    /// Events `e{first}..e{first+count-1}`, event `i` for customer `1 + (i-1) % customers`.
    pub async fn seed_events(
        &self,
        first: u64,
        count: u64,
        customers: u64,
        mix: Mix,
    ) -> Result<()> {
        let last = first + count - 1;
        let sqlite = self.backend == Backend::Sqlite;
        let (kind, at) = match mix {
            // One event per customer for each of the three example rules in turn: purchases and
            // discovery calls within the last day, weddings on dates in 2005..2024.
            Mix::ExampleRules => (
                "CASE i % 3 WHEN 0 THEN 'purchase' WHEN 1 THEN 'discovery_call' ELSE 'wedding' END",
                if sqlite {
                    "CASE i % 3 WHEN 2 THEN printf('%04d-%02d-%02dT00:00:00.000Z', 2005 + i % 20, 1 + i % 12, 1 + i % 28) \
                     ELSE strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || (i % 1440) || ' minutes') END"
                } else {
                    "CASE WHEN i % 3 = 2 THEN make_timestamptz(2005 + i % 20, 1 + i % 12, 1 + i % 28, 0, 0, 0, 'UTC') \
                     ELSE now() - (i % 1440) * interval '1 minute' END"
                },
            ),
            Mix::Purchases => (
                "'purchase'",
                if sqlite {
                    "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || (i % 60) || ' minutes')"
                } else {
                    "now() - (i % 60) * interval '1 minute'"
                },
            ),
            // Discovery calls 73 hours ago: their follow-up was due an hour ago.
            Mix::DueFollowUps => (
                "'discovery_call'",
                if sqlite {
                    "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-73 hours')"
                } else {
                    "now() - interval '73 hours'"
                },
            ),
            // Weddings whose anniversary is 2 to 301 days away.
            Mix::FutureAnniversaries => (
                "'wedding'",
                if sqlite {
                    "date('now', '+' || (2 + i % 300) || ' days', '-' || (5 + i % 20) || ' years') || 'T00:00:00.000Z'"
                } else {
                    "(current_date + (2 + i % 300) - make_interval(years => 5 + i % 20)) AT TIME ZONE 'UTC'"
                },
            ),
        };
        let sql = if sqlite {
            format!(
                "WITH RECURSIVE n(i) AS (SELECT {first} UNION ALL SELECT i + 1 FROM n WHERE i < {last}) \
                 INSERT INTO events (id, customer_id, kind, occurred_at) \
                 SELECT 'e' || i, 'c' || (1 + (i - 1) % {customers}), {kind}, {at} FROM n"
            )
        } else {
            format!(
                "INSERT INTO events (id, customer_id, kind, occurred_at) \
                 SELECT 'e' || i, 'c' || (1 + (i - 1) % {customers}), {kind}, {at} \
                 FROM generate_series({first}, {last}) AS i"
            )
        };
        self.db.execute(&sql).await?;
        Ok(())
    }

    /// Messages of `SEND_RULE` for events `e1..en` (seeded with `Mix::DueFollowUps`), the
    /// first due at `first_due` and the rest spread evenly over `spread`.
    pub async fn seed_messages(
        &self,
        n: u64,
        first_due: DateTime<Utc>,
        spread: Duration,
    ) -> Result<()> {
        let t0 = first_due.to_rfc3339_opts(SecondsFormat::Millis, true);
        let spread_ms = spread.as_millis() as u64;
        let sql = match self.backend {
            Backend::Sqlite => format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n}), \
                 d(i, due) AS (SELECT i, strftime('%Y-%m-%dT%H:%M:%fZ', '{t0}', \
                   printf('%+.3f seconds', ((i - 1) * {spread_ms} / {n}) / 1000.0)) FROM n) \
                 INSERT INTO messages (rule, customer_id, event_id, dedupe_key, trigger_at, due_at, \
                   expires_at, next_attempt_at) \
                 SELECT '{SEND_RULE}', 'c' || i, 'e' || i, '{SEND_RULE}:e' || i, due, due, \
                   strftime('%Y-%m-%dT%H:%M:%fZ', due, '+1 days'), due FROM d"
            ),
            Backend::Postgres => format!(
                "INSERT INTO messages (rule, customer_id, event_id, dedupe_key, trigger_at, due_at, \
                   expires_at, next_attempt_at) \
                 SELECT '{SEND_RULE}', 'c' || i, 'e' || i, '{SEND_RULE}:e' || i, due, due, \
                   due + interval '1 day', due \
                 FROM (SELECT i, '{t0}'::timestamptz + ((i - 1) * {spread_ms} / {n}) * interval '1 millisecond' AS due \
                       FROM generate_series(1, {n}) AS i) AS d"
            ),
        };
        self.db.execute(&sql).await?;
        Ok(())
    }

    /// What a database that has been running a while has: statistics (PostgreSQL's autovacuum
    /// gathers them within a minute of a bulk load; the daemon never runs ANALYZE on SQLite, so
    /// neither does the bench).
    pub async fn settle(&self) -> Result<()> {
        if self.backend == Backend::Postgres {
            self.db.execute("VACUUM ANALYZE").await?;
        }
        Ok(())
    }

    /// Messages in a final state.
    pub async fn finished(&self) -> Result<i64> {
        self.db
            .count("SELECT COUNT(*) FROM messages WHERE state IN ('sent', 'failed', 'skipped', 'unknown')")
            .await
    }

    pub async fn count_state(&self, state: &str) -> Result<i64> {
        self.db
            .count(&format!(
                "SELECT COUNT(*) FROM messages WHERE state = '{state}'"
            ))
            .await
    }

    /// Seconds from the first to the last `sent_at`.
    pub async fn send_span(&self) -> Result<f64> {
        let sql = match self.backend {
            Backend::Sqlite => {
                "SELECT (julianday(MAX(sent_at)) - julianday(MIN(sent_at))) * 86400.0 FROM messages WHERE state = 'sent'"
            }
            Backend::Postgres => {
                "SELECT EXTRACT(EPOCH FROM MAX(sent_at) - MIN(sent_at))::float8 FROM messages WHERE state = 'sent'"
            }
        };
        Ok(self.db.floats(sql).await?.first().copied().unwrap_or(0.0))
    }

    /// Seconds the first and the second half of the sent messages took (by `sent_at`): equal
    /// when sending does not slow down as the backlog is worked off.
    pub async fn send_halves(&self) -> Result<(f64, f64)> {
        let seconds = match self.backend {
            Backend::Sqlite => "julianday(sent_at) * 86400.0",
            Backend::Postgres => "EXTRACT(EPOCH FROM sent_at)::float8",
        };
        let times = self
            .db
            .floats(&format!(
                "SELECT {seconds} FROM messages WHERE state = 'sent' ORDER BY sent_at"
            ))
            .await?;
        let (Some(first), Some(last)) = (times.first(), times.last()) else {
            return Ok((0.0, 0.0));
        };
        let middle = times[times.len() / 2];
        Ok((middle - first, last - middle))
    }

    /// `sent_at - due_at` of every sent message, in milliseconds, sorted.
    pub async fn lateness_ms(&self) -> Result<Vec<f64>> {
        let sql = match self.backend {
            Backend::Sqlite => {
                "SELECT (julianday(sent_at) - julianday(due_at)) * 86400000.0 FROM messages WHERE state = 'sent'"
            }
            Backend::Postgres => {
                "SELECT (EXTRACT(EPOCH FROM sent_at - due_at) * 1000)::float8 FROM messages WHERE state = 'sent'"
            }
        };
        let mut values = self.db.floats(sql).await?;
        values.sort_by(f64::total_cmp);
        Ok(values)
    }

    /// PIDs of the PostgreSQL backends serving the daemon (their CPU is the database's share).
    pub async fn postgres_backends(&self) -> Result<Vec<u32>> {
        let Some(name) = &self.postgres_database else {
            return Ok(Vec::new());
        };
        let Pool::Postgres(pool) = &self.db else {
            return Ok(Vec::new());
        };
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = 'touchpoint'",
        )
        .bind(name)
        .fetch_all(pool)
        .await?;
        Ok(pids
            .into_iter()
            .filter_map(|p| u32::try_from(p).ok())
            .collect())
    }

    pub async fn close(self) {
        self.db.close().await;
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(name) = &self.postgres_database {
            // Best effort; a leftover database has a name no other run uses.
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
    }
}

/// Which events to seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    ExampleRules,
    Purchases,
    DueFollowUps,
    FutureAnniversaries,
}

// --- processes ----------------------------------------------------------------------------------

/// CPU time (user + system, all threads) of a process, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it are plain.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `after` starts at field 3.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?
            .parse::<u64>()
            .map_err(Into::into)
    };
    let total = ticks(14)? + ticks(15)?;
    Ok(Duration::from_millis(total * 1000 / clock_ticks()))
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

/// Summed CPU time of processes (those that have gone away count as zero).
pub fn cpu_of(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|p| cpu_time(*p).ok()).sum()
}

/// Resident memory now and at its peak (`VmRSS`, `VmHWM`), in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss: u64,
    pub peak: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok(Memory {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
    })
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
pub const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";

/// Postfix's `smtp-sink` on a free loopback port: accepts every message and throws it away.
pub struct Sink {
    child: Child,
    pub port: u16,
}

impl Sink {
    pub fn start() -> Result<Sink> {
        if !Path::new(SMTP_SINK).exists() {
            bail!(
                "{SMTP_SINK} is missing: install Postfix (DEBIAN_FRONTEND=noninteractive apt-get install -y postfix; bench/run and .ci/run do)"
            );
        }
        let port = free_port()?;
        let mut command = Command::new(SMTP_SINK);
        if running_as_root() {
            // smtp-sink refuses to run as root without dropping privileges.
            command.args(["-u", "nobody"]);
        }
        let child = command
            .arg(format!("127.0.0.1:{port}"))
            .arg("1024")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start smtp-sink")?;
        let mut sink = Sink { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = sink.child.try_wait()? {
                bail!("smtp-sink exited at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("smtp-sink does not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(sink)
    }

    /// The machine's ceiling: `smtp-source -d` sending `count` copies of `message` over
    /// `sessions` connections to this sink. Returns messages per second.
    pub fn ceiling(&self, message: &Path, sessions: usize, count: u64) -> Result<f64> {
        let started = Instant::now();
        let output = Command::new(SMTP_SOURCE)
            .arg("-d")
            .args(["-s", &sessions.to_string()])
            .args(["-m", &count.to_string()])
            .arg("-F")
            .arg(message)
            .args(["-f", "hello@acme.example", "-t", "customer1@example.com"])
            .arg(format!("127.0.0.1:{}", self.port))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .context("run smtp-source")?;
        let took = started.elapsed();
        if !output.status.success() {
            bail!(
                "smtp-source failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(count as f64 / took.as_secs_f64())
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `touchpoint run` as a child process, its log in the world's directory.
pub struct Daemon {
    child: Child,
    pub pid: u32,
    pub started: Instant,
    log: PathBuf,
}

impl Daemon {
    pub fn start(world: &World) -> Result<Daemon> {
        let log = world.dir.path().join("daemon.log");
        let child = Command::new(env!("CARGO_BIN_EXE_touchpoint"))
            .arg("--config")
            .arg(&world.config_path)
            .arg("run")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("TOUCHPOINT_TEST_POSTGRES")
            .env("TOUCHPOINT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start touchpoint run")?;
        Ok(Daemon {
            pid: child.id(),
            child,
            started: Instant::now(),
            log,
        })
    }

    pub fn cpu(&self) -> Result<Duration> {
        cpu_time(self.pid)
    }

    pub fn memory(&self) -> Result<Memory> {
        memory(self.pid)
    }

    /// Fails (with the end of its log) if the daemon has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the daemon exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(mut self) -> Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the daemon exited with {status}:\n{}", self.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the daemon did not stop within 60s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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

/// Polls `done` every `every` until it is true, the daemon dies, or `timeout` passes.
async fn wait_for<F, Fut>(
    daemon: &mut Daemon,
    timeout: Duration,
    every: Duration,
    mut done: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if done().await? {
            return Ok(());
        }
        daemon.check_running()?;
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}:\n{}", daemon.log_tail());
        }
        tokio::time::sleep(every).await;
    }
}

/// The message the daemon sends for customer c1's follow-up, built by the same functions the
/// dispatcher uses, as `smtp-source -F` wants it (LF line ends; it adds the CRs).
pub async fn sample_message(world: &World) -> Result<Vec<u8>> {
    let config = world.config()?;
    let playbook = Playbook::load(&config).map_err(|e| anyhow!("{e}"))?;
    let store = world.store().await?;
    let customer = store
        .customer("c1")
        .await?
        .ok_or_else(|| anyhow!("no customer c1"))?;
    let event = store.event("e1").await?;
    let rule = playbook
        .rule(SEND_RULE)
        .ok_or_else(|| anyhow!("no rule {SEND_RULE}"))?;
    let signer = touchpoint::links::LinkSigner::new(
        b"a secret of thirty-two bytes....",
        "https://touchpoint.acme.example",
    );
    let unsubscribe = signer.url(&touchpoint::links::Link::Unsubscribe { message: 100_000 });
    let tags = touchpoint::links::MessageTags::new(b"a secret of thirty-two bytes....");
    let message_id = touchpoint::transport::message_id_for(
        100_000,
        &tags.message_id(100_000),
        SEND_RULE,
        "acme.example",
    );
    let extras = touchpoint::render::MessageExtras {
        years: None,
        message_id: message_id.clone(),
        unsubscribe_url: Some(unsubscribe.clone()),
        customer_url: None,
        timezone: customer.timezone.clone().unwrap_or_else(|| "UTC".into()),
    };
    let context = touchpoint::render::message_context(
        &customer,
        event.as_ref(),
        rule,
        &playbook.business,
        &extras,
    );
    let rendered = playbook.templates.render(rule, &context)?;
    let from = touchpoint::transport::parse_mailbox(&config.sender.from).map_err(|e| anyhow!(e))?;
    let email = touchpoint::transport::build_email(touchpoint::transport::EmailParts {
        from: &from,
        reply_to: None,
        to_name: customer.name.as_deref(),
        to_email: &customer.email,
        subject: &rendered.subject,
        text: rendered.text,
        html: rendered.html,
        message_id,
        headers: vec![
            ("X-Touchpoint-Rule", rule.name.clone()),
            ("List-Unsubscribe", format!("<{unsubscribe}>")),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click".into()),
        ],
        dkim: None,
        envelope_from: None,
    })
    .map_err(|e| anyhow!(e))?;
    let text = String::from_utf8_lossy(&email.bytes).replace("\r\n", "\n");
    Ok(text.into_bytes())
}

// --- the benchmarks -----------------------------------------------------------------------------

/// 1. Planning: the first pass over `customers` customers with one event each (the three example
///    rules in turn), then passes when nothing new happened, then one with `new_events` new ones.
#[derive(Debug, Clone, Default)]
pub struct Planning {
    pub customers: u64,
    pub planned: u64,
    pub first_pass: Duration,
    /// What the planner does every `planner.interval` when nothing new arrived.
    pub idle_pass: Duration,
    /// The full reconciliation (at start and every `planner.reconcile_every`) with nothing new.
    pub full_pass_again: Duration,
    pub new_events: u64,
    pub new_planned: u64,
    /// An incremental pass over `new_events` new purchases.
    pub new_events_pass: Duration,
}

pub async fn planning(backend: Backend, customers: u64, new_events: u64) -> Result<Planning> {
    let world = World::new(backend, &Setup::default()).await?;
    world.seed_customers(customers).await?;
    world
        .seed_events(1, customers, customers, Mix::ExampleRules)
        .await?;
    world.settle().await?;
    let (playbook, settings, store) = world.planner().await?;
    let mut result = Planning {
        customers,
        new_events,
        ..Planning::default()
    };

    let started = Instant::now();
    let (cursors, report) = plan_pass(&store, &playbook, Cursors::default(), &settings).await?;
    result.first_pass = started.elapsed();
    result.planned = report.inserted;

    let started = Instant::now();
    let (cursors, report) = plan_pass(&store, &playbook, cursors, &settings).await?;
    result.idle_pass = started.elapsed();
    if report.inserted != 0 {
        bail!(
            "a pass with nothing new planned {} messages",
            report.inserted
        );
    }

    world.settle().await?;
    let started = Instant::now();
    let (_, report) = plan_pass(&store, &playbook, Cursors::default(), &settings).await?;
    result.full_pass_again = started.elapsed();
    if report.inserted != 0 {
        bail!(
            "a full pass with nothing new planned {} messages",
            report.inserted
        );
    }

    world
        .seed_events(customers + 1, new_events, customers, Mix::Purchases)
        .await?;
    let started = Instant::now();
    let (_, report) = plan_pass(&store, &playbook, cursors, &settings).await?;
    result.new_events_pass = started.elapsed();
    result.new_planned = report.inserted;
    drop(store);
    world.close().await;
    Ok(result)
}

/// 2 and 5. Sending `messages` due messages over `connections` SMTP connections to smtp-sink,
/// and smtp-source's ceiling over as many sessions with the same message.
#[derive(Debug, Clone, Default)]
pub struct Sending {
    pub messages: u64,
    pub connections: usize,
    pub message_bytes: usize,
    pub sent: u64,
    /// Messages per second, first to last `sent_at`.
    pub rate: f64,
    /// Seconds from starting the daemon until every message was sent.
    pub wall: f64,
    pub ceiling: f64,
    pub peak_rss: u64,
    /// Messages per second over the first and the second half of the messages.
    pub first_half_rate: f64,
    pub second_half_rate: f64,
    pub daemon_cpu: Duration,
    /// PostgreSQL backends' CPU over the same run (zero on SQLite: it is in the daemon).
    pub database_cpu: Duration,
}

impl Sending {
    pub fn ratio(&self) -> f64 {
        if self.ceiling > 0.0 {
            self.rate / self.ceiling
        } else {
            0.0
        }
    }
}

pub async fn sending(backend: Backend, messages: u64, connections: usize) -> Result<Sending> {
    let sink = Sink::start()?;
    let world = World::new(
        backend,
        &Setup {
            smtp_port: Some(sink.port),
            connections,
            horizon: None,
        },
    )
    .await?;
    world.seed_customers(messages).await?;
    world
        .seed_events(1, messages, messages, Mix::DueFollowUps)
        .await?;
    world
        .seed_messages(
            messages,
            Utc::now() - TimeDelta::hours(1),
            Duration::from_secs(1),
        )
        .await?;
    world.settle().await?;

    let sample = sample_message(&world).await?;
    let sample_path = world.dir.path().join("sample.eml");
    std::fs::write(&sample_path, &sample)?;
    let ceiling = sink.ceiling(&sample_path, connections, messages)?;

    let mut daemon = Daemon::start(&world)?;
    let deadline = Instant::now() + Duration::from_secs(60 + messages / 50);
    while world.finished().await? < messages as i64 {
        daemon.check_running()?;
        if Instant::now() > deadline {
            bail!("not all messages were sent in time:\n{}", daemon.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Every backend of this database's daemon started with it: its whole CPU time counts.
    let database_cpu = cpu_of(&world.postgres_backends().await?);
    let wall = daemon.started.elapsed().as_secs_f64();
    let memory = daemon.memory()?;
    let daemon_cpu = daemon.cpu()?;
    daemon.stop()?;
    let sent = world.count_state("sent").await? as u64;
    let span = world.send_span().await?;
    let (first_half, second_half) = world.send_halves().await?;
    let half = (sent / 2) as f64;
    let per_second = |seconds: f64| if seconds > 0.0 { half / seconds } else { 0.0 };
    let result = Sending {
        messages,
        connections,
        message_bytes: sample.len() + sample.iter().filter(|b| **b == b'\n').count(),
        sent,
        rate: if span > 0.0 {
            (sent.saturating_sub(1)) as f64 / span
        } else {
            0.0
        },
        wall,
        ceiling,
        peak_rss: memory.peak,
        first_half_rate: per_second(first_half),
        second_half_rate: per_second(second_half),
        daemon_cpu,
        database_cpu,
    };
    world.close().await;
    Ok(result)
}

/// 3. Punctuality: `messages` due at times spread evenly over `spread`, starting `lead` after
///    the daemon starts; sent time minus due time.
#[derive(Debug, Clone, Default)]
pub struct Punctuality {
    pub messages: u64,
    pub spread: Duration,
    pub sent: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub min_ms: f64,
}

pub async fn punctuality(
    backend: Backend,
    messages: u64,
    spread: Duration,
    lead: Duration,
) -> Result<Punctuality> {
    let sink = Sink::start()?;
    let world = World::new(
        backend,
        &Setup {
            smtp_port: Some(sink.port),
            connections: 4,
            horizon: None,
        },
    )
    .await?;
    world.seed_customers(messages).await?;
    world
        .seed_events(1, messages, messages, Mix::DueFollowUps)
        .await?;
    let first_due = Utc::now() + TimeDelta::from_std(lead)?;
    world.seed_messages(messages, first_due, spread).await?;
    world.settle().await?;
    let mut daemon = Daemon::start(&world)?;
    let timeout = lead + spread + Duration::from_secs(120);
    wait_for(&mut daemon, timeout, Duration::from_millis(500), || async {
        Ok(world.finished().await? >= messages as i64)
    })
    .await?;
    daemon.stop()?;
    let late = world.lateness_ms().await?;
    let result = Punctuality {
        messages,
        spread,
        sent: late.len() as u64,
        p50_ms: percentile(&late, 50.0),
        p99_ms: percentile(&late, 99.0),
        max_ms: late.last().copied().unwrap_or(f64::NAN),
        min_ms: late.first().copied().unwrap_or(f64::NAN),
    };
    world.close().await;
    Ok(result)
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// 4. Idle cost: the daemon with `messages` future messages (next year's anniversaries of as
///    many weddings, planned by the real planner) and nothing due, over `window`.
#[derive(Debug, Clone, Default)]
pub struct Idle {
    pub messages: u64,
    /// From start until the daemon and its PostgreSQL backends went quiet (the startup
    /// reconciliation).
    pub startup: Duration,
    /// CPU of the daemon and its PostgreSQL backends until then.
    pub startup_cpu: Duration,
    pub window: Duration,
    pub cpu: Duration,
    pub database_cpu: Duration,
    pub rss: u64,
    pub peak_rss: u64,
}

pub async fn idle(backend: Backend, messages: u64, window: Duration) -> Result<Idle> {
    // Every future anniversary planned, however far (the default horizon would leave most of
    // them for later): the idle cost of a million waiting messages is what is measured.
    let setup = Setup {
        horizon: Some("400d"),
        ..Setup::default()
    };
    let world = World::new(backend, &setup).await?;
    world.seed_customers(messages).await?;
    world
        .seed_events(1, messages, messages, Mix::FutureAnniversaries)
        .await?;
    world.settle().await?;
    {
        let (playbook, settings, store) = world.planner().await?;
        let (_, report) = plan_pass(&store, &playbook, Cursors::default(), &settings).await?;
        if report.inserted != messages {
            bail!("planned {} anniversaries of {messages}", report.inserted);
        }
    }
    world.settle().await?;
    let mut daemon = Daemon::start(&world)?;
    // Quiet: a whole second with under 10 ms of CPU in the daemon and its PostgreSQL backends
    // together (the startup reconciliation is over).
    let busy = |daemon: &Daemon, backends: &[u32]| -> Result<Duration> {
        Ok(daemon.cpu()? + cpu_of(backends))
    };
    let mut backends = world.postgres_backends().await?;
    let mut last = busy(&daemon, &backends)?;
    let settle_deadline = Instant::now() + Duration::from_secs(600);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        daemon.check_running()?;
        let seen = world.postgres_backends().await?;
        if seen != backends {
            backends = seen;
            last = busy(&daemon, &backends)?;
            continue;
        }
        let now = busy(&daemon, &backends)?;
        if now.saturating_sub(last) < Duration::from_millis(10) {
            break;
        }
        last = now;
        if Instant::now() > settle_deadline {
            bail!("the daemon did not go quiet within 10 minutes");
        }
    }
    let startup = daemon.started.elapsed();
    // The daemon and its PostgreSQL backends (all started with it).
    let startup_cpu = busy(&daemon, &backends)?;
    let backends_before: Vec<(u32, Duration)> = world
        .postgres_backends()
        .await?
        .into_iter()
        .map(|pid| (pid, cpu_time(pid).unwrap_or_default()))
        .collect();
    let before = daemon.cpu()?;
    tokio::time::sleep(window).await;
    daemon.check_running()?;
    let cpu = daemon.cpu()?.saturating_sub(before);
    let database_cpu = world
        .postgres_backends()
        .await?
        .into_iter()
        .map(|pid| {
            let start = backends_before
                .iter()
                .find(|(p, _)| *p == pid)
                .map(|(_, cpu)| *cpu)
                .unwrap_or_default();
            cpu_time(pid).unwrap_or_default().saturating_sub(start)
        })
        .sum();
    let memory = daemon.memory()?;
    daemon.stop()?;
    let waiting = world.count_state("scheduled").await? as u64;
    if waiting != messages {
        bail!("{waiting} of {messages} messages still scheduled after the idle minute");
    }
    world.close().await;
    Ok(Idle {
        messages,
        startup,
        startup_cpu,
        window,
        cpu,
        database_cpu,
        rss: memory.rss,
        peak_rss: memory.peak,
    })
}

// --- reporting ----------------------------------------------------------------------------------

pub fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_000_000.0)
}

pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// The machine, for BENCHMARKS.md.
pub async fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    let postgres = async {
        let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_admin_url()))
            .await
            .ok()?;
        sqlx::query_scalar::<_, String>("SHOW server_version")
            .fetch_one(&mut admin)
            .await
            .ok()
    };
    // The SQLite that sqlx links (bundled), not the system's.
    let sqlite = async {
        let pool = SqlitePool::connect("sqlite::memory:").await.ok()?;
        sqlx::query_scalar::<_, String>("SELECT sqlite_version()")
            .fetch_one(&pool)
            .await
            .ok()
    };
    format!(
        "{model}, {cores} cores, {:.1} GiB RAM, PostgreSQL {}, SQLite {}",
        total as f64 / 1024.0 / 1024.0,
        postgres.await.unwrap_or_default(),
        sqlite.await.unwrap_or_default(),
    )
}
