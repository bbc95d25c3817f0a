//! SMTP over a small pool of sessions of our own client (`client`): with PIPELINING when the
//! server offers it, MAIL, RCPT and DATA cost one round trip, the body and the final dot
//! another. When every session is busy, a message waits in line; the next session to send a
//! body takes the first in line and writes its envelope right after the final dot, then hands
//! the session over once the dot's reply is in, so a busy connection costs one round trip per
//! message. Each step has its own timeout, and what can be said about a failure depends on
//! whether the body had started: before it, nothing was delivered; after it, silence means the
//! server may have the message.

mod client;
mod data;
mod reply;
mod stream;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lettre::transport::smtp::extension::ClientId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_rustls::TlsConnector;

use self::client::{Envelope, Failure, Session, Stage, Target, WireError};
use self::reply::Reply;
use super::settings::{SmtpConfig, TlsMode};
use super::{OutgoingEmail, SendError};
use crate::settings::Secret;

/// Everything needed to reach the relay. The password never appears in `Debug`.
#[derive(Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub pool_size: usize,
    pub timeout: Duration,
    pub helo_name: Option<String>,
}

impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl SmtpSettings {
    pub fn from_config(
        config: &SmtpConfig,
        password: Option<Secret>,
    ) -> Result<SmtpSettings, String> {
        if config.username.is_some() && password.is_none() {
            return Err(
                "transport.smtp.username is set but no password is configured: set one of \
                 transport.smtp.password_env, password_file or password_credential"
                    .into(),
            );
        }
        Ok(SmtpSettings {
            host: config.host.clone(),
            port: config.port,
            tls: config.tls,
            username: config.username.clone(),
            password,
            pool_size: config.pool_size,
            timeout: config.timeout.to_std().unwrap_or(Duration::from_secs(30)),
            helo_name: config.helo_name.clone(),
        })
    }
}

pub struct SmtpTransport {
    settings: SmtpSettings,
    /// The name given in EHLO, worked out once.
    hello: String,
    /// The TLS client setup, when the relay is reached over TLS.
    tls: Option<Result<TlsConnector, String>>,
    idle: Mutex<Vec<Session>>,
    /// One per session in use: at most `pool_size` connections.
    permits: Arc<Semaphore>,
    /// Messages waiting for a session, oldest first.
    line: Mutex<VecDeque<Waiter>>,
    next_waiter: AtomicU64,
}

/// A message waiting for a session: the session that takes it sends its envelope after the
/// final dot and hands itself over, with its permit, once the dot's reply is in.
struct Waiter {
    id: u64,
    envelope: Envelope,
    handoff: oneshot::Sender<Handoff>,
}

/// A session whose next envelope went out after the final dot, its replies not yet read.
struct Handoff {
    session: Session,
    permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpTransport")
            .field("settings", &self.settings)
            .finish()
    }
}

impl SmtpTransport {
    pub fn new(settings: SmtpSettings) -> SmtpTransport {
        let permits = Arc::new(Semaphore::new(settings.pool_size.max(1)));
        let hello = settings
            .helo_name
            .clone()
            .unwrap_or_else(|| ClientId::default().to_string());
        let tls = (settings.tls != TlsMode::None).then(|| stream::connector(&[]));
        SmtpTransport {
            settings,
            hello,
            tls,
            idle: Mutex::new(Vec::new()),
            permits,
            line: Mutex::new(VecDeque::new()),
            next_waiter: AtomicU64::new(0),
        }
    }

    /// Also trusts `root` (DER) for the relay's certificate: a relay whose certificate comes
    /// from a private CA.
    pub fn with_root_certificate(mut self, root: Vec<u8>) -> Result<SmtpTransport, String> {
        let root = rustls::pki_types::CertificateDer::from(root);
        self.tls = Some(Ok(stream::connector(std::slice::from_ref(&root))?));
        Ok(self)
    }

    pub fn pool_size(&self) -> usize {
        self.settings.pool_size.max(1)
    }

    pub fn timeout(&self) -> Duration {
        self.settings.timeout
    }

    pub async fn deliver<F, Fut>(
        &self,
        email: &OutgoingEmail,
        before_body: F,
    ) -> Result<String, SendError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = bool>,
    {
        let envelope = Envelope::of(email);
        let (permit, handed) = self.turn(&envelope).await?;
        let mut session = self.envelope(&envelope, handed).await?;
        if !before_body().await {
            // The server is reading the body now: a QUIT would be taken as message text and
            // never answered. Closing the socket without the final dot delivers nothing.
            drop(session);
            return Err(SendError::Withdrawn);
        }
        let next = if session.pipelines() {
            self.first_in_line()
        } else {
            None
        };
        let sent = session
            .body(&email.bytes, next.as_ref().map(|waiter| &waiter.envelope))
            .await;
        self.pass_on(session, permit, next).await;
        match sent {
            Ok(reply) => Ok(reply.text()),
            Err(failure) => Err(classify(&failure)),
        }
    }

    /// Waits for this message's turn: a free permit (then a pooled or new session is used), or
    /// a session handed over by another message, this message's envelope already sent on it.
    async fn turn(
        &self,
        envelope: &Envelope,
    ) -> Result<(OwnedSemaphorePermit, Option<Session>), SendError> {
        let closed = |_| SendError::RelayUnavailable("transport closed".into());
        let mut again = false;
        loop {
            if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
                return Ok((permit, None));
            }
            let (handoff, mut handed) = oneshot::channel();
            // A message that was taken and given back keeps its place at the front.
            let mut place = self.join_line(envelope.clone(), handoff, again);
            again = true;
            tokio::select! {
                biased;
                handed = &mut handed => {
                    place.taken();
                    if let Ok(Handoff { session, permit }) = handed {
                        return Ok((permit, Some(session)));
                    }
                }
                permit = Arc::clone(&self.permits).acquire_owned() => {
                    let permit = permit.map_err(closed)?;
                    if place.leave() {
                        return Ok((permit, None));
                    }
                    // A session took this message from the line: its handoff is on the way.
                    drop(permit);
                    if let Ok(Handoff { session, permit }) = handed.await {
                        return Ok((permit, Some(session)));
                    }
                }
            }
            // The session that took this message broke before handing itself over: nothing of
            // this message went out; wait again.
        }
    }

    fn join_line(
        &self,
        envelope: Envelope,
        handoff: oneshot::Sender<Handoff>,
        front: bool,
    ) -> Place<'_> {
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let waiter = Waiter {
            id,
            envelope,
            handoff,
        };
        let mut line = lock(&self.line);
        if front {
            line.push_front(waiter);
        } else {
            line.push_back(waiter);
        }
        Place {
            line: &self.line,
            id,
            queued: true,
        }
    }

    fn first_in_line(&self) -> Option<Waiter> {
        lock(&self.line).pop_front()
    }

    /// After a body: the session goes to the message whose envelope followed the dot, or back
    /// to the pool (or is closed if it cannot carry another message).
    async fn pass_on(&self, session: Session, permit: OwnedSemaphorePermit, next: Option<Waiter>) {
        match next {
            Some(waiter) if session.awaits_envelope_replies() => {
                // If that message stopped waiting, the session is in the middle of its
                // envelope and is dropped: without a body and a final dot nothing is delivered.
                let _ = waiter.handoff.send(Handoff { session, permit });
            }
            // The session broke: dropping the waiter's sender sends it back to wait.
            _ => self.put_back(session).await,
        }
    }

    /// A session that has had MAIL, RCPT and DATA accepted, the server waiting for the body.
    /// A pooled or handed-over session is used without RSET or NOOP; if the server closed it
    /// meanwhile (or says 421 on it), the envelope is tried once more on a fresh connection.
    async fn envelope(
        &self,
        envelope: &Envelope,
        handed: Option<Session>,
    ) -> Result<Session, SendError> {
        let (session, result) = match handed {
            Some(mut session) => {
                let result = session.envelope_replies().await;
                (session, result)
            }
            None => match self.take_idle() {
                Some(mut session) => {
                    let result = session.envelope(envelope).await;
                    (session, result)
                }
                None => return self.fresh_envelope(envelope).await,
            },
        };
        let Err(failure) = result else {
            return Ok(session);
        };
        if is_stale(&failure) {
            session.close(self.settings.timeout).await;
            return self.fresh_envelope(envelope).await;
        }
        Err(self.refused(session, &failure).await)
    }

    /// The envelope on a new connection.
    async fn fresh_envelope(&self, envelope: &Envelope) -> Result<Session, SendError> {
        let mut session = self.connect().await?;
        match session.envelope(envelope).await {
            Ok(()) => Ok(session),
            Err(failure) => Err(self.refused(session, &failure).await),
        }
    }

    /// After a failed envelope the session is closed: after a refused RCPT the server may
    /// still hold the MAIL transaction (Postfix answers a new MAIL with "nested MAIL command").
    async fn refused(&self, session: Session, failure: &Failure) -> SendError {
        session.close(self.settings.timeout).await;
        classify(failure)
    }

    /// Connects, greets, and does STARTTLS and AUTH, all within a bound: a relay stalled in
    /// TLS or AUTH must not hold a connection forever.
    async fn connect(&self) -> Result<Session, SendError> {
        let s = &self.settings;
        let unavailable =
            |why: String| SendError::RelayUnavailable(format!("{}:{}: {why}", s.host, s.port));
        let connector = match &self.tls {
            None => None,
            Some(Ok(connector)) => Some(connector),
            Some(Err(why)) => return Err(unavailable(why.clone())),
        };
        let login = match (&s.username, &s.password) {
            (Some(user), Some(password)) => Some((user.as_str(), password)),
            _ => None,
        };
        let target = Target {
            host: &s.host,
            port: s.port,
            tls: s.tls,
            connector,
            hello: &self.hello,
            login,
            step: s.timeout,
        };
        match tokio::time::timeout(s.timeout * 4, Session::open(&target)).await {
            Err(_elapsed) => Err(unavailable(format!(
                "no working session within {:?} (greeting, TLS and login)",
                s.timeout * 4
            ))),
            Ok(opened) => opened.map_err(unavailable),
        }
    }

    /// Keeps a session that can carry another message, closes one that cannot.
    async fn put_back(&self, session: Session) {
        if session.reusable() {
            self.put_idle(session);
        } else {
            session.close(self.settings.timeout).await;
        }
    }

    fn take_idle(&self) -> Option<Session> {
        self.idle.lock().ok()?.pop()
    }

    fn put_idle(&self, session: Session) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.pool_size()
        {
            idle.push(session);
        }
    }

    pub async fn close(&self) {
        let sessions: Vec<_> = match self.idle.lock() {
            Ok(mut idle) => idle.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for session in sessions {
            session.close(Duration::from_secs(2)).await;
        }
    }
}

/// The line, also after a panic elsewhere while it was held: no push or pop leaves it
/// half-changed.
fn lock(line: &Mutex<VecDeque<Waiter>>) -> std::sync::MutexGuard<'_, VecDeque<Waiter>> {
    line.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A message's place in the line: leaving it (or being dropped) takes the message out unless
/// a session already took it.
struct Place<'a> {
    line: &'a Mutex<VecDeque<Waiter>>,
    id: u64,
    queued: bool,
}

impl Place<'_> {
    /// Leaves the line; false if a session had already taken the message.
    fn leave(&mut self) -> bool {
        if !std::mem::take(&mut self.queued) {
            return false;
        }
        let mut line = lock(self.line);
        let before = line.len();
        line.retain(|waiter| waiter.id != self.id);
        line.len() < before
    }

    /// A session took the message (its handoff came): nothing to leave.
    fn taken(&mut self) {
        self.queued = false;
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A failure that says the pooled connection had gone stale while idle, not that this message
/// met a problem: it broke before the body, or the first reply was 421 (a server closing an
/// idle connection says so to whatever it reads next).
fn is_stale(failure: &Failure) -> bool {
    match failure {
        Failure::Lost { stage, .. } => *stage != Stage::Body,
        Failure::Refused { stage, reply } => *stage == Stage::Mail && reply.code == 421,
    }
}

/// Maps a failed step to what the dispatcher does next. Before the body's first byte nothing
/// can have been delivered; after it, silence means the server may have the message.
fn classify(failure: &Failure) -> SendError {
    match failure {
        Failure::Refused { stage, reply } => classify_reply(*stage, reply),
        Failure::Lost {
            stage: Stage::Body,
            error: WireError::TimedOut(limit),
        } => SendError::Ambiguous(format!(
            "the server did not answer within {limit:?} after the final dot"
        )),
        Failure::Lost {
            stage: Stage::Body,
            error,
        } => SendError::Ambiguous(error.to_string()),
        Failure::Lost {
            error: WireError::TimedOut(_),
            ..
        } => SendError::Transient(
            "the server did not answer in time before the body was sent".into(),
        ),
        Failure::Lost { error, .. } => {
            SendError::Transient(format!("connection lost before the body was sent: {error}"))
        }
    }
}

/// Maps the server's refusal at `stage` to what the dispatcher does next.
fn classify_reply(stage: Stage, reply: &Reply) -> SendError {
    let text = reply.text();
    match reply.code {
        421 if stage != Stage::Body => SendError::RelayUnavailable(text),
        400..500 => SendError::Transient(text),
        500..600 => {
            // Only a refusal of the recipient says the customer's address is bad; a 5.1.x at
            // MAIL FROM is about our own sender address and must not suppress anyone.
            let about_recipient = matches!(stage, Stage::Rcpt | Stage::Body);
            let bad_address =
                about_recipient && enhanced_status(&text).is_some_and(is_bad_mailbox_status);
            SendError::Permanent {
                reply: text,
                bad_address,
            }
        }
        // A 2xx or 3xx where it makes no sense: the server is not following the protocol.
        _ if stage == Stage::Body => {
            SendError::Ambiguous(format!("unexpected reply after the final dot: {text}"))
        }
        _ => SendError::Transient(format!("unexpected reply before the body was sent: {text}")),
    }
}

/// RFC 3463 statuses that mean the destination mailbox does not exist or cannot be: bad
/// mailbox (5.1.1), bad system (5.1.2), bad syntax (5.1.3), moved (5.1.6), null MX (5.1.10).
fn is_bad_mailbox_status(status: &str) -> bool {
    matches!(status, "5.1.1" | "5.1.2" | "5.1.3" | "5.1.6" | "5.1.10")
}

/// The RFC 3463 enhanced status code after the basic code: `"550 5.1.1 ..."` -> `"5.1.1"`.
fn enhanced_status(reply: &str) -> Option<&str> {
    let word = reply.split_whitespace().nth(1)?;
    let mut parts = word.split('.');
    let well_formed = parts.clone().count() == 3
        && parts.all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    well_formed.then_some(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_status_codes_are_recognised() {
        assert_eq!(enhanced_status("550 5.1.1 No such user"), Some("5.1.1"));
        assert_eq!(enhanced_status("550 No such user"), None);
        assert_eq!(enhanced_status("451 4.3.0"), Some("4.3.0"));
        assert_eq!(enhanced_status(""), None);
    }

    #[test]
    fn the_password_stays_out_of_debug_output() {
        let settings = SmtpSettings {
            host: "relay".into(),
            port: 587,
            tls: TlsMode::Starttls,
            username: Some("shop".into()),
            password: Some(Secret("hunter2".into())),
            pool_size: 2,
            timeout: Duration::from_secs(5),
            helo_name: None,
        };
        let shown = format!("{:?}", SmtpTransport::new(settings));
        assert!(
            !shown.contains("hunter2") && shown.contains("relay"),
            "{shown}"
        );
    }
}
