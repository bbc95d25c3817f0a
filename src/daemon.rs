//! The daemon: planner, dispatcher and HTTP listener under one cancellation token and one task
//! tracker. `run` takes its config, listeners and shutdown token, so tests start the real thing
//! in-process on port 0, and `main` starts it with signals wired to the token.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::backoff;
use crate::config::Config;
use crate::diag::Diagnostics;
use crate::dispatch::{DispatchSettings, Dispatcher};
use crate::plan::{PlanSettings, Planner};
use crate::playbook::Playbook;
use crate::store::{self, MessageState, Outcome, SharedStore, StoreError};
use crate::transport::{self, Transport};

/// Why the daemon could not start (or stopped with an error).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(String),
    #[error("rules or templates have mistakes:\n{0}")]
    Playbook(#[from] Diagnostics),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot serve HTTP: {0}")]
    Http(std::io::Error),
    /// The planner or the dispatcher ended on its own (a bug: it panicked). The daemon stops
    /// with an error so that the service manager restarts it, rather than running on half.
    #[error("the {0} stopped unexpectedly ({1}); see the log above")]
    Stopped(&'static str, &'static str),
}

/// Sockets the daemon serves on, bound by the caller (port 0 in tests, or from the config).
#[derive(Debug, Default)]
pub struct Listeners {
    pub http: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Binds what the config asks for.
    pub async fn bind(config: &Config) -> Result<Listeners, DaemonError> {
        let address = config.http.listen.trim();
        if address.is_empty() {
            return Ok(Listeners::default());
        }
        let listener = tokio::net::TcpListener::bind(address).await.map_err(|e| {
            DaemonError::Config(format!("cannot listen on http.listen = {address:?}: {e} (set another address, or \"\" to turn HTTP off)"))
        })?;
        Ok(Listeners {
            http: Some(listener),
        })
    }
}

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
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadStatus {
    pub at: DateTime<Utc>,
    pub ok: bool,
    pub message: String,
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

/// Everything the HTTP handlers may look at.
#[derive(Clone)]
pub struct Shared {
    pub store: SharedStore,
    pub health: Arc<Health>,
    pub playbook: watch::Receiver<Arc<Playbook>>,
    pub links: Option<crate::links::LinkSigner>,
    /// The bearer token of `POST /hooks/bounce`; `None` turns the hook off.
    pub bounce_webhook_secret: Option<crate::config::Secret>,
    /// What a bounce or complaint report must show to be believed, for the webhook.
    pub bounce_rules: crate::bounce::BounceRules,
    /// The bearer tokens of the ingest API; none turns it off.
    pub api_tokens: Arc<crate::ingest::ApiTokens>,
    /// The owner's web page; `None` when `web.enabled` is false.
    pub web: Option<Arc<crate::web::Web>>,
    /// The /metrics values that scan the messages table, shared between scrapes.
    pub metrics: Arc<crate::http::MetricsCache>,
}

/// Opens the database, retrying while it is unavailable (it may still be starting).
pub async fn open_store(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<SharedStore, DaemonError> {
    let url = config.database_url();
    let mut failures = 0;
    loop {
        let attempt = async {
            let store = store::open(&url, config.database.max_connections).await?;
            store.migrate().await?;
            Ok::<_, StoreError>(store)
        };
        match attempt.await {
            Ok(store) => return Ok(store),
            Err(error) if error.is_unavailable() => {
                failures += 1;
                let delay = backoff(
                    failures,
                    Duration::from_millis(500),
                    Duration::from_secs(30),
                );
                tracing::warn!(%error, database = %url.describe(), retry_in = ?delay, "database unavailable; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return Err(DaemonError::Store(error)),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled, then drains in-flight sends within
/// `delivery.shutdown_grace` and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let store = open_store(&config, &shutdown).await?;
    let playbook = Playbook::load(&config)?;
    let transport = Arc::new(Transport::from_config(&config).map_err(DaemonError::Config)?);
    let secret = link_secret(&config, &store).await?;
    let links = link_signer(&config, &secret);
    let bounce_rules = bounce_rules(&config, &secret);
    let settings = dispatch_settings(&config, links.clone(), bounce_rules.tags.clone())?;
    let bounce_webhook_secret = config
        .bounce_webhook_secret()
        .map_err(DaemonError::Config)?;
    let api_tokens =
        crate::ingest::ApiTokens::new(&config.api_tokens().map_err(DaemonError::Config)?);
    let health = Arc::new(Health::new());
    let (playbook_tx, playbook_rx) = watch::channel(Arc::new(playbook));
    let wake = Arc::new(Notify::new());
    let tracker = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let rules = playbook_rx.borrow().rules.rules.len();
    tracing::info!(database = %config.database_url().describe(), rules, instance = %settings.instance, "touchpoint is running");

    let planner = Planner {
        store: store.clone(),
        playbook: playbook_rx.clone(),
        settings: PlanSettings {
            default_timezone: config.defaults.timezone,
            default_expire_after: config.defaults.expire_after,
        },
        interval: config
            .planner
            .interval
            .to_std()
            .unwrap_or(Duration::from_secs(2)),
        reconcile_every: config
            .planner
            .reconcile_every
            .to_std()
            .unwrap_or(Duration::from_secs(300)),
        wake_dispatcher: wake.clone(),
        health: health.clone(),
    };
    let planner_task = tracker.spawn(planner.run(shutdown.clone()));
    let dispatcher = Dispatcher {
        store: store.clone(),
        playbook: playbook_rx.clone(),
        transport: transport.clone(),
        settings: Arc::new(settings),
        wake: wake.clone(),
        health: health.clone(),
    };
    let dispatcher_task =
        tracker.spawn(dispatcher.run(shutdown.clone(), hard_stop.clone(), tracker.clone()));
    if let Some(listener) = listeners.http {
        let address = listener.local_addr().map_err(DaemonError::Http)?;
        let shared = Shared {
            store: store.clone(),
            health: health.clone(),
            playbook: playbook_rx.clone(),
            links,
            bounce_webhook_secret,
            bounce_rules,
            api_tokens: Arc::new(api_tokens.clone()),
            web: crate::web::Web::setup(&config, &store, address).await?,
            metrics: Arc::default(),
        };
        // Measured now that the database pool and the listener are open.
        let limits =
            crate::listener::limits(&config, &crate::listener::Budget::of_this_process(&config));
        tracing::info!(%address, max_connections = limits.max_connections, "HTTP listener ready (the owner's page at /, /healthz, /metrics, /u, /o, /c, /hooks/bounce)");
        if !shared.api_tokens.is_off() {
            tracing::info!(tokens = ?shared.api_tokens.names(), "ingest API on (POST /api/v1/events, /api/v1/customers)");
        }
        let stop = crate::listener::Stop {
            graceful: shutdown.clone(),
            hard: hard_stop.clone(),
        };
        tracker.spawn(crate::http::serve(
            listener,
            shared,
            limits,
            tracker.clone(),
            stop,
        ));
    } else if !api_tokens.is_off() {
        tracing::warn!(
            "api.tokens are configured but http.listen is off: the ingest API is not served"
        );
    }
    // Listen for SIGHUP here, not in the task: READY=1 below lets systemd send it at once, and
    // SIGHUP's default action would end the process.
    let hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; reloading is off");
            None
        }
    };
    tracker.spawn(reload_on_hangup(
        config.clone(),
        playbook_tx,
        health.clone(),
        wake.clone(),
        hangups,
        shutdown.clone(),
    ));
    tracker.spawn(status_reporter(
        store.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    // READY before the first WATCHDOG: the pinger below may run on another thread at once.
    crate::notify::ready();
    if let Some(interval) = health.watchdog {
        tracker.spawn(watchdog(health.clone(), interval, shutdown.clone()));
    }

    // Send tasks are isolated (a panic loses one claim, which the reaper hands back), but the
    // planner and the dispatcher must never end before shutdown.
    let stopped_early = supervise(&shutdown, planner_task, dispatcher_task).await;
    crate::notify::stopping();
    tracing::info!("stopping: no new claims; letting in-flight sends finish");
    tracker.close();
    let grace = config
        .delivery
        .shutdown_grace
        .to_std()
        .unwrap_or(Duration::from_secs(20));
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            "in-flight sends did not finish in time; releasing what has not started"
        );
        hard_stop.cancel();
        if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .is_err()
        {
            tracing::error!("some sends are still stuck; their claims will expire and be reaped");
        }
    }
    // QUIT on pooled connections; a relay that does not answer must not hold up the exit.
    if tokio::time::timeout(Duration::from_secs(2), transport.close())
        .await
        .is_err()
    {
        tracing::warn!("the mail relay did not answer QUIT within 2s; closing anyway");
    }
    tracing::info!("stopped");
    match stopped_early {
        Some((component, how)) => Err(DaemonError::Stopped(component, how)),
        None => Ok(()),
    }
}

/// The key that signs links, VERP addresses and Message-IDs: from the config, else generated
/// once and kept in the database (the same for every process using it).
pub async fn link_secret(
    config: &Config,
    store: &SharedStore,
) -> Result<crate::config::Secret, DaemonError> {
    if let Some(secret) = config.link_secret().map_err(DaemonError::Config)? {
        return Ok(secret);
    }
    let stored = store
        .setting_or_insert("link_secret", &crate::links::new_secret())
        .await?;
    Ok(crate::config::Secret(stored))
}

/// Signs links, when customers can reach the daemon at a URL.
pub fn link_signer(
    config: &Config,
    secret: &crate::config::Secret,
) -> Option<crate::links::LinkSigner> {
    let Some(base_url) = config.links_base_url() else {
        tracing::warn!(
            "no links.base_url and no http.listen: messages go out without unsubscribe links"
        );
        return None;
    };
    Some(crate::links::LinkSigner::new(
        secret.expose().as_bytes(),
        &base_url,
    ))
}

/// What a bounce or complaint report must show to be believed (`touchpoint bounce` and the
/// webhook alike).
pub fn bounce_rules(config: &Config, secret: &crate::config::Secret) -> crate::bounce::BounceRules {
    crate::bounce::BounceRules {
        tags: crate::links::MessageTags::new(secret.expose().as_bytes()),
        soft_bounce_limit: config.bounces.soft_bounce_limit,
        unsigned_grace: config.bounces.unsigned_grace,
    }
}

fn dispatch_settings(
    config: &Config,
    links: Option<crate::links::LinkSigner>,
    tags: crate::links::MessageTags,
) -> Result<DispatchSettings, DaemonError> {
    let from = transport::parse_mailbox(&config.sender.from)
        .map_err(|e| DaemonError::Config(format!("sender.from: {e}")))?;
    let reply_to = match &config.sender.reply_to {
        Some(text) => Some(
            transport::parse_mailbox(text)
                .map_err(|e| DaemonError::Config(format!("sender.reply_to: {e}")))?,
        ),
        None => None,
    };
    let message_id_domain = config
        .sender
        .message_id_domain
        .clone()
        .unwrap_or_else(|| from.email.domain().to_string());
    let lease = config.delivery.lease;
    let reap_every = (lease / 4)
        .to_std()
        .unwrap_or(Duration::from_secs(30))
        .clamp(Duration::from_millis(200), Duration::from_secs(30));
    let dkim = match &config.dkim {
        Some(dkim) => Some(Arc::new(
            transport::dkim::load(dkim).map_err(|e| DaemonError::Config(format!("dkim: {e}")))?,
        )),
        None => None,
    };
    let bounce_address = match &config.sender.bounce_address {
        Some(text) => Some(text.trim().parse::<lettre::Address>().map_err(|e| {
            DaemonError::Config(format!(
                "sender.bounce_address {text:?} is not an address: {e}"
            ))
        })?),
        None => None,
    };
    Ok(DispatchSettings {
        links,
        unsubscribe_mailto: config.links.unsubscribe_mailto.clone(),
        dkim,
        bounce_address,
        tags,
        instance: format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple()),
        batch_size: config.delivery.batch_size,
        lease,
        max_attempts: config.delivery.max_attempts,
        retry_base: config
            .delivery
            .retry_base
            .to_std()
            .unwrap_or(Duration::from_secs(60)),
        retry_max: config
            .delivery
            .retry_max
            .to_std()
            .unwrap_or(Duration::from_secs(3600)),
        resend_unknown: config.delivery.resend_unknown,
        from,
        reply_to,
        message_id_domain,
        default_timezone: config.defaults.timezone,
        reap_every,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "touchpoint".into())
}

/// The dispatcher's loop may rest this long (back-off while the database is away, up to 30s,
/// plus a database call that times out) before the watchdog gives up on it.
const WATCHDOG_STALL: Duration = Duration::from_secs(120);

/// Pets systemd's watchdog every half `WatchdogSec=`, on its own timer (the dispatcher's loop may
/// rest longer than a short watchdog interval), as long as the dispatcher's loop turned within
/// `WATCHDOG_STALL`. A stuck loop or a wedged runtime stops the pings and systemd restarts us.
async fn watchdog(health: Arc<Health>, interval: Duration, shutdown: CancellationToken) {
    let every = (interval / 2).max(Duration::from_millis(100));
    let stall = WATCHDOG_STALL.max(interval);
    let mut warned = false;
    loop {
        let idle = health.dispatcher_idle_for();
        if idle < stall {
            crate::notify::watchdog();
            warned = false;
        } else if !warned {
            tracing::error!(
                ?idle,
                "the dispatcher's loop has not turned; no longer petting systemd's watchdog"
            );
            warned = true;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Waits for shutdown. If the planner or the dispatcher ends first (a panic), logs it, starts
/// the shutdown and says which and how.
async fn supervise(
    shutdown: &CancellationToken,
    planner: tokio::task::JoinHandle<()>,
    dispatcher: tokio::task::JoinHandle<()>,
) -> Option<(&'static str, &'static str)> {
    let (component, ended) = tokio::select! {
        // A shutdown ends both tasks too: look at it first.
        biased;
        () = shutdown.cancelled() => return None,
        ended = planner => ("planner", ended),
        ended = dispatcher => ("dispatcher", ended),
    };
    let how = if ended.as_ref().is_err_and(|e| e.is_panic()) {
        "it panicked"
    } else {
        "it returned"
    };
    tracing::error!(
        component,
        how,
        "a core task stopped before shutdown; stopping the daemon"
    );
    shutdown.cancel();
    Some((component, how))
}

/// SIGHUP: read the config file, rules and templates again and swap them in whole; on any
/// mistake keep what runs and report every mistake.
async fn reload_on_hangup(
    config: Config,
    playbook: watch::Sender<Arc<Playbook>>,
    health: Arc<Health>,
    wake: Arc<Notify>,
    hangups: Option<tokio::signal::unix::Signal>,
    shutdown: CancellationToken,
) {
    let Some(mut hangups) = hangups else { return };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            received = hangups.recv() => if received.is_none() { return },
        }
        crate::notify::reloading();
        let status = match reload(&config) {
            Ok(next) => {
                let rules = next.rules.rules.len();
                playbook.send_replace(Arc::new(next));
                wake.notify_one();
                tracing::info!(rules, "reloaded rules and templates");
                ReloadStatus {
                    at: Utc::now(),
                    ok: true,
                    message: format!("reloaded {rules} rules"),
                }
            }
            Err(message) => {
                tracing::error!("reload failed; keeping the rules that were running:\n{message}");
                ReloadStatus {
                    at: Utc::now(),
                    ok: false,
                    message,
                }
            }
        };
        let ok = status.ok;
        let summary = status
            .message
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        health.reloaded(status);
        crate::notify::ready();
        crate::notify::status(&if ok {
            summary
        } else {
            format!("reload failed, old rules kept: {summary}")
        });
    }
}

fn reload(running: &Config) -> Result<Playbook, String> {
    let env: Vec<_> = std::env::vars().collect();
    let fresh = Config::load(&running.path, env).map_err(|e| e.to_string())?;
    if fresh.database.url != running.database.url || fresh.http != running.http {
        tracing::warn!(
            "database.url and [http] changes (listen, limits, timeouts) take effect on restart, \
             not on reload"
        );
    }
    Playbook::load(&fresh).map_err(|e| e.to_string())
}

/// Keeps systemd's STATUS= line current: what is due, what went out today, the last error.
async fn status_reporter(store: SharedStore, health: Arc<Health>, shutdown: CancellationToken) {
    if !crate::notify::enabled() {
        return;
    }
    loop {
        let mut line = match store.counts().await {
            Ok(counts) => {
                let of = |state: MessageState| {
                    counts
                        .iter()
                        .filter(|(_, s, _)| *s == state)
                        .map(|(_, _, n)| n)
                        .sum::<i64>()
                };
                format!(
                    "{} waiting, {} sent, {} failed, {} unknown",
                    of(MessageState::Scheduled) + of(MessageState::Retrying),
                    of(MessageState::Sent),
                    of(MessageState::Failed),
                    of(MessageState::Unknown)
                )
            }
            Err(error) => format!("database error: {error}"),
        };
        if let Some(reload) = health.last_reload().filter(|r| !r.ok) {
            line.push_str(&format!(
                "; last reload failed: {}",
                reload.message.lines().next().unwrap_or_default()
            ));
        }
        if let Some((_, relay)) = health.last_relay_error() {
            line.push_str(&format!("; last relay error: {relay}"));
        }
        crate::notify::status(&line);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_core_task_that_panics_stops_the_daemon() {
        let shutdown = CancellationToken::new();
        let planner = tokio::spawn(std::future::pending::<()>());
        let dispatcher = tokio::spawn(async { panic!("a bug") });
        let stopped = supervise(&shutdown, planner, dispatcher).await;
        assert_eq!(stopped, Some(("dispatcher", "it panicked")));
        assert!(shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn a_shutdown_is_not_taken_for_a_failure() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let planner = tokio::spawn(async {});
        let dispatcher = tokio::spawn(async {});
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(supervise(&shutdown, planner, dispatcher).await, None);
    }
}
