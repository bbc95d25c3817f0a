//! What the daemon measures about itself, for /healthz, /metrics and systemd's STATUS: the
//! health of its parts ([`Health`]), latency histograms, outcome counters, and the cached scan
//! of the messages table that /metrics shows ([`MetricsCache`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::store::{MessageState, Outcome, SharedStore, StoreError};

/// What the daemon knows about its own health, for /healthz, /metrics and systemd's STATUS.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the dispatcher's last loop turn.
    dispatcher_seen: AtomicU64,
    database_error: Mutex<Option<String>>,
    pub database_errors: AtomicU64,
    relay_error: Mutex<Option<(DateTime<Utc>, String)>>,
    reload: Mutex<ReloadStatus>,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    outcomes: Mutex<BTreeMap<(String, MessageState), u64>>,
    send_seconds: Mutex<Histogram>,
    lateness_seconds: Mutex<Histogram>,
    /// `WatchdogSec=` as systemd passed it (WATCHDOG_USEC), if it is on for this process.
    pub watchdog: Option<Duration>,
    /// The `[replies.imap]` watcher's state; `None` when it is off.
    imap: Mutex<Option<ImapStatus>>,
}

/// How the `[replies.imap]` watcher is doing, for /healthz.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImapStatus {
    pub ok: bool,
    pub detail: String,
    pub at: DateTime<Utc>,
}

/// Send latency buckets in seconds (claim to outcome).
pub const LATENCY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];
/// Lateness buckets in seconds (due time to sent).
pub const LATENESS_BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0];

/// A Prometheus-style histogram (counts per upper bound; cumulative when written out).
#[derive(Debug, Clone)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        for (count, bound) in self.counts.iter_mut().zip(self.bounds) {
            if value <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += value;
    }
}

impl Health {
    pub fn new() -> Health {
        Health {
            started: Instant::now(),
            dispatcher_seen: AtomicU64::new(0),
            database_error: Mutex::new(None),
            database_errors: AtomicU64::new(0),
            relay_error: Mutex::new(None),
            reload: Mutex::new(ReloadStatus {
                at: Utc::now(),
                ok: true,
                message: "rules and templates loaded".into(),
            }),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            outcomes: Mutex::new(BTreeMap::new()),
            send_seconds: Mutex::new(Histogram::new(&LATENCY_BUCKETS)),
            lateness_seconds: Mutex::new(Histogram::new(&LATENESS_BUCKETS)),
            watchdog: crate::notify::watchdog_interval(),
            imap: Mutex::new(None),
        }
    }

    fn millis(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Called every turn of the dispatcher's loop; `watchdog` pets systemd's watchdog only while
    /// the loop keeps turning, so a stuck loop gets the service restarted.
    pub fn dispatcher_alive(&self) {
        self.dispatcher_seen.store(self.millis(), Ordering::Relaxed);
    }

    /// How long ago the dispatcher's loop last turned.
    pub fn dispatcher_idle_for(&self) -> Duration {
        Duration::from_millis(
            self.millis()
                .saturating_sub(self.dispatcher_seen.load(Ordering::Relaxed)),
        )
    }

    pub fn database_ok(&self) {
        if let Ok(mut error) = self.database_error.lock() {
            *error = None;
        }
    }

    pub fn database_error(&self, error: &StoreError) {
        self.database_errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.database_error.lock() {
            *last = Some(error.to_string());
        }
    }

    pub fn last_database_error(&self) -> Option<String> {
        self.database_error.lock().ok().and_then(|e| e.clone())
    }

    pub fn relay_trouble(&self, reason: &str) {
        if let Ok(mut last) = self.relay_error.lock() {
            *last = Some((Utc::now(), reason.to_string()));
        }
    }

    pub fn last_relay_error(&self) -> Option<(DateTime<Utc>, String)> {
        self.relay_error.lock().ok().and_then(|e| e.clone())
    }

    pub fn reloaded(&self, status: ReloadStatus) {
        self.reloads.fetch_add(1, Ordering::Relaxed);
        if !status.ok {
            self.reload_failures.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut last) = self.reload.lock() {
            *last = status;
        }
    }

    /// The IMAP watcher's latest state: `ok` with what it does, or the reason it is stuck.
    pub fn imap_status(&self, ok: bool, detail: String) {
        if let Ok(mut status) = self.imap.lock() {
            *status = Some(ImapStatus {
                ok,
                detail,
                at: Utc::now(),
            });
        }
    }

    pub fn imap(&self) -> Option<ImapStatus> {
        self.imap.lock().ok().and_then(|s| s.clone())
    }

    pub fn last_reload(&self) -> Option<ReloadStatus> {
        self.reload.lock().ok().map(|r| r.clone())
    }

    pub fn record_outcome(&self, rule: &str, outcome: &Outcome, took: Duration) {
        if let Ok(mut outcomes) = self.outcomes.lock() {
            *outcomes
                .entry((rule.to_string(), outcome.state()))
                .or_default() += 1;
        }
        if matches!(
            outcome,
            Outcome::Sent { .. }
                | Outcome::Retry { .. }
                | Outcome::Failed { .. }
                | Outcome::Unknown { .. }
        ) && let Ok(mut histogram) = self.send_seconds.lock()
        {
            histogram.observe(took.as_secs_f64());
        }
    }

    /// How late a sent message went out, after its due time.
    pub fn record_lateness(&self, seconds: f64) {
        if let Ok(mut histogram) = self.lateness_seconds.lock() {
            histogram.observe(seconds.max(0.0));
        }
    }

    pub fn lateness(&self) -> Histogram {
        self.lateness_seconds
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| Histogram::new(&LATENESS_BUCKETS))
    }

    /// Outcomes recorded by this process since it started, by rule and state.
    pub fn outcomes(&self) -> BTreeMap<(String, MessageState), u64> {
        self.outcomes.lock().map(|o| o.clone()).unwrap_or_default()
    }

    pub fn send_latency(&self) -> Histogram {
        self.send_seconds
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| Histogram::new(&LATENCY_BUCKETS))
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

/// The latest reload of rules and templates (SIGHUP), for /healthz and STATUS.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadStatus {
    pub at: DateTime<Utc>,
    pub ok: bool,
    pub message: String,
}

/// Scans of the messages table are shared for this long: a scrape costs a scan at most this
/// often, however many clients scrape.
pub const METRICS_TTL: Duration = Duration::from_secs(5);

/// The /metrics values that scan the messages table, computed at most once per `METRICS_TTL`
/// and shared by every scrape meanwhile; concurrent scrapes wait for the one scan in progress
/// (single flight) rather than start their own.
#[derive(Debug, Default)]
pub struct MetricsCache {
    latest: tokio::sync::Mutex<Option<(Instant, Arc<Scan>)>>,
    /// Scans made, shown on /metrics.
    pub scans: AtomicU64,
}

/// One scan's results; `None` where the database did not answer.
#[derive(Debug)]
pub struct Scan {
    pub counts: Option<Vec<(String, MessageState, i64)>>,
    pub backlog: Option<(i64, Option<f64>)>,
    /// Rated messages per (rule, scale, score).
    pub ratings: Option<Vec<(String, String, i64, i64)>>,
    /// Replies by rule ([`crate::store::ReportingStore::reply_counts`]).
    pub replies: Option<Vec<(String, i64)>>,
}

impl MetricsCache {
    pub async fn scan(&self, store: &SharedStore) -> Arc<Scan> {
        let mut latest = self.latest.lock().await;
        if let Some((at, scan)) = latest.as_ref()
            && at.elapsed() < METRICS_TTL
        {
            return scan.clone();
        }
        let scan = Arc::new(Scan::take(store).await);
        self.scans.fetch_add(1, Ordering::Relaxed);
        *latest = Some((Instant::now(), scan.clone()));
        scan
    }
}

impl Scan {
    async fn take(store: &SharedStore) -> Scan {
        let limit = Duration::from_secs(3);
        let counts = match tokio::time::timeout(limit, store.counts()).await {
            Ok(Ok(counts)) => Some(counts),
            Ok(Err(error)) => {
                tracing::debug!(%error, "/metrics: cannot count messages");
                None
            }
            Err(_) => None,
        };
        let backlog = match tokio::time::timeout(limit, store.due_backlog()).await {
            Ok(Ok(backlog)) => Some(backlog),
            _ => None,
        };
        let ratings = match tokio::time::timeout(limit, store.rating_counts()).await {
            Ok(Ok(ratings)) => Some(ratings),
            _ => None,
        };
        let replies = match tokio::time::timeout(limit, store.reply_counts()).await {
            Ok(Ok(replies)) => Some(replies),
            _ => None,
        };
        Scan {
            counts,
            backlog,
            ratings,
            replies,
        }
    }
}
