//! The `[replies.imap]` watcher: a daemon task that logs in to the mailbox, feeds every unseen
//! mail through [`super::process`] (the path `touchpoint inbound` takes), marks or moves it,
//! then waits with IDLE (or polls) and does it again. A dropped connection or a server error is
//! logged and retried after a backoff; nothing here can stop the daemon or its sending.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::imap::{ImapSettings, MAX_IDLE, Target};
use super::imap_client::{ImapError, Session, Woken};
use super::{InboundError, process};
use crate::backoff::backoff;
use crate::links::MessageTags;
use crate::metrics::Health;
use crate::store::SharedStore;

/// After a refused login, retry this slowly: a wrong password stays wrong until the operator
/// fixes it, and servers lock out accounts that keep failing.
const LOGIN_RETRY_BASE: Duration = Duration::from_secs(60);
const LOGIN_RETRY_MAX: Duration = Duration::from_secs(3600);
/// After a dropped connection or a server error.
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// A session that lasted this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(120);

/// Everything the watcher needs; the daemon spawns [`ImapWatcher::run`] on its tracker.
pub struct ImapWatcher {
    pub settings: ImapSettings,
    pub store: SharedStore,
    pub tags: MessageTags,
    /// The local part of `[replies] address`, if set.
    pub reply_user: Option<String>,
    pub health: Arc<Health>,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Imap(#[from] ImapError),
    /// The database did not answer: the mail stays unseen and is tried again.
    #[error("the database failed while recording a mail: {0}")]
    Store(crate::store::StoreError),
}

impl ImapWatcher {
    /// Runs until `shutdown`: one session after another, with a backoff between failures.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!("{}", self.settings.describe());
        let mut failures = 0u32;
        loop {
            let started = std::time::Instant::now();
            let error = tokio::select! {
                () = shutdown.cancelled() => return,
                ended = self.session() => match ended {
                    Ok(never) => match never {},
                    Err(error) => error,
                },
            };
            // A session that ran a good while was no failure streak: start the backoff anew.
            // One that fails every time it gets going (a mail the database refuses) backs off.
            if started.elapsed() > HEALTHY_SESSION {
                failures = 0;
            }
            failures += 1;
            let delay = self.trouble(&error, failures);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Logs why the session ended and reports it to /healthz; the delay before the next one.
    fn trouble(&self, error: &SessionError, failures: u32) -> Duration {
        let s = &self.settings;
        if let SessionError::Imap(ImapError::Login(answer)) = error {
            let delay = backoff(failures, LOGIN_RETRY_BASE, LOGIN_RETRY_MAX);
            let text = format!(
                "[replies.imap] the server {}:{} refused the login of {:?} ({answer}); check \
                 replies.imap.username and the password it reads; retrying in {}s",
                s.host,
                s.port,
                s.username,
                delay.as_secs()
            );
            tracing::error!("{text}");
            self.health.imap_status(false, text);
            return delay;
        }
        let delay = backoff(failures, RETRY_BASE, RETRY_MAX);
        let text = format!(
            "[replies.imap] {}:{} mailbox {:?}: {error}; reconnecting in {:.1}s",
            s.host,
            s.port,
            s.mailbox,
            delay.as_secs_f64()
        );
        tracing::warn!("{text}");
        self.health.imap_status(false, text);
        delay
    }

    /// One connection: log in, then process and wait, until something fails.
    async fn session(&self) -> Result<std::convert::Infallible, SessionError> {
        let s = &self.settings;
        let mut imap = Session::connect(s).await?;
        if let Target::MoveTo(folder) = &s.after {
            imap.ensure_folder(folder).await?;
        }
        imap.select(&s.mailbox).await?;
        let idle = imap.has("IDLE");
        let how = if idle { "IDLE" } else { "polling" };
        tracing::info!(mailbox = %s.mailbox, "[replies.imap] logged in to {}:{}; waiting for mail ({how})", s.host, s.port);
        self.health.imap_status(
            true,
            format!("watching {:?} at {}:{} ({how})", s.mailbox, s.host, s.port),
        );
        loop {
            self.process_unseen(&mut imap).await?;
            if idle {
                // Servers may end an IDLE after 30 minutes; re-issue it before that.
                let wait = s.poll_every.min(MAX_IDLE);
                if imap.idle(wait).await? == Woken::NewMail {
                    tracing::debug!("[replies.imap] new mail");
                }
            } else {
                // The next UID SEARCH sees what arrived meanwhile.
                tokio::time::sleep(s.poll_every).await;
            }
        }
    }

    /// Every unseen mail: recorded, then marked or moved so that it is not read again.
    async fn process_unseen(&self, imap: &mut Session) -> Result<(), SessionError> {
        for uid in imap.unseen().await? {
            let Some(raw) = imap.fetch(uid).await? else {
                continue;
            };
            self.record(uid, &raw).await?;
            // Marked only now that it is recorded: a crash before this line means the mail is
            // processed again, and recording is idempotent by Message-ID.
            match &self.settings.after {
                Target::MarkSeen => imap.mark_seen(uid).await?,
                Target::MoveTo(folder) => imap.move_to(uid, folder).await?,
            }
        }
        Ok(())
    }

    /// Records one mail; a mail that is no reply is logged with the reason and still marked,
    /// so it is not read again and again. Only a database failure leaves it unseen.
    async fn record(&self, uid: u32, raw: &[u8]) -> Result<(), SessionError> {
        let reply_user = self.reply_user.as_deref();
        match process(&self.store, &self.tags, raw, &[], reply_user).await {
            Ok(done) => {
                let text = done.describe();
                tracing::info!(uid, customer = %done.customer, kind = done.kind, "[replies.imap] {text}");
                Ok(())
            }
            Err(InboundError::Store(error)) => Err(SessionError::Store(error)),
            Err(error) => {
                tracing::warn!(
                    uid,
                    bytes = raw.len(),
                    "[replies.imap] inbound mail ignored: {error}"
                );
                Ok(())
            }
        }
    }
}
