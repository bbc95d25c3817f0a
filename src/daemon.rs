//! The daemon: planner, dispatcher and HTTP listener under one cancellation token and one task
//! tracker. `run` takes its config, listeners and shutdown token, so tests start the real thing
//! in-process on port 0, and `main` starts it with signals wired to the token.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::backoff;
use crate::config::Config;
use crate::diag::Diagnostics;
use crate::dispatch::{DispatchSettings, Dispatcher};
use crate::metrics::{Health, ReloadStatus};
use crate::plan::{PlanSettings, Planner};
use crate::playbook::Playbook;
use crate::runtime::Shared;
use crate::settings::Secret;
use crate::store::{self, MessageState, SharedStore, StoreError};
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

impl From<crate::web::SetupError> for DaemonError {
    fn from(error: crate::web::SetupError) -> Self {
        match error {
            crate::web::SetupError::Store(error) => DaemonError::Store(error),
            crate::web::SetupError::Config(message) => DaemonError::Config(message),
        }
    }
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

/// `touchpoint run`: binds the configured listeners, then runs until SIGTERM or SIGINT.
pub async fn run_until_signalled(config: Config) -> Result<(), DaemonError> {
    let shutdown = CancellationToken::new();
    let listeners = Listeners::bind(&config).await?;
    // Listening starts here, before the daemon can tell systemd it is ready.
    let signals = stop_signals().map_err(|e| DaemonError::Config(e.to_string()))?;
    let signals = tokio::spawn(stop_on_signal(signals, shutdown.clone()));
    let result = run(config, listeners, shutdown).await;
    signals.abort();
    result
}

type StopSignals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

/// SIGTERM and SIGINT (Ctrl-C), listened for from the moment this returns.
fn stop_signals() -> Result<StopSignals, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot listen for SIGTERM: {e}"))?;
    let interrupt =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot listen for SIGINT: {e}"))?;
    Ok((terminate, interrupt))
}

/// SIGTERM and SIGINT (Ctrl-C) stop the daemon cleanly.
async fn stop_on_signal((mut terminate, mut interrupt): StopSignals, shutdown: CancellationToken) {
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
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
    let transport =
        Arc::new(Transport::from_config(&config.transport).map_err(DaemonError::Config)?);
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
        settings: PlanSettings::from_config(&config),
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
            web: setup_web(&config, &store, address).await?,
            metrics: Arc::default(),
        };
        // Measured now that the database pool and the listener are open.
        let budget = crate::listener::Budget::of_this_process(&config.other_descriptors());
        let limits = crate::listener::limits(&config.http, &budget);
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
    if let Some(watcher) = imap_watcher(&config, &store, &secret, &health)? {
        tracker.spawn(watcher.run(shutdown.clone()));
    }
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

/// The `[replies.imap]` watcher, when configured. Its password is read now, so a missing one
/// stops the start like the SMTP password does; a wrong one is the watcher's to report.
fn imap_watcher(
    config: &Config,
    store: &SharedStore,
    secret: &Secret,
    health: &Arc<Health>,
) -> Result<Option<crate::replies::ImapWatcher>, DaemonError> {
    let Some(imap) = &config.replies.imap else {
        return Ok(None);
    };
    Ok(Some(crate::replies::ImapWatcher {
        settings: imap.settings().map_err(DaemonError::Config)?,
        store: store.clone(),
        tags: crate::links::MessageTags::new(secret.expose().as_bytes()),
        reply_user: config.replies.reply_user().map_err(DaemonError::Config)?,
        health: health.clone(),
    }))
}

/// The owner's page's state, or `None` when `web.enabled` is false.
async fn setup_web(
    config: &Config,
    store: &SharedStore,
    listening: std::net::SocketAddr,
) -> Result<Option<Arc<crate::web::Web>>, DaemonError> {
    let around = crate::web::Surroundings {
        listen: &config.http.listen,
        base_url: config.links.base_url.as_deref(),
        plan: PlanSettings::from_config(config),
        max_attempts: config.delivery.max_attempts,
    };
    Ok(crate::web::Web::setup(&config.web, around, store, listening).await?)
}

/// The key that signs links, VERP addresses and Message-IDs: from the config, else generated
/// once and kept in the database (the same for every process using it).
pub async fn link_secret(config: &Config, store: &SharedStore) -> Result<Secret, DaemonError> {
    if let Some(secret) = config.link_secret().map_err(DaemonError::Config)? {
        return Ok(secret);
    }
    let stored = store
        .setting_or_insert("link_secret", &crate::links::new_secret())
        .await?;
    Ok(Secret(stored))
}

/// Signs links, when customers can reach the daemon at a URL.
pub fn link_signer(config: &Config, secret: &Secret) -> Option<crate::links::LinkSigner> {
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
pub fn bounce_rules(config: &Config, secret: &Secret) -> crate::bounce::BounceRules {
    crate::bounce::BounceRules {
        tags: crate::links::MessageTags::new(secret.expose().as_bytes()),
        soft_bounce_limit: config.bounces.soft_bounce_limit,
        unsigned_grace: config.bounces.unsigned_grace,
    }
}

/// What the dispatcher would compose a message with, for `touchpoint preview`: the same link
/// signer, tags, sender, VERP and DKIM key as `run`.
pub async fn preview_settings(
    config: &Config,
    store: &SharedStore,
) -> Result<DispatchSettings, DaemonError> {
    let secret = link_secret(config, store).await?;
    let tags = crate::links::MessageTags::new(secret.expose().as_bytes());
    dispatch_settings(config, link_signer(config, &secret), tags)
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
    let reply_address = config.replies.address().map_err(DaemonError::Config)?;
    Ok(DispatchSettings {
        reply_address,
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
    if fresh.replies.imap != running.replies.imap {
        tracing::warn!("[replies.imap] changes take effect on restart, not on reload");
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
