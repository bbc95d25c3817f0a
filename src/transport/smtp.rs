//! SMTP over a small pool of lettre connections. Each step has its own timeout, and what can
//! be said about a failure depends on whether the body had gone out: before it, nothing was
//! delivered; after it, silence means the server may have the message.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use lettre::transport::smtp::Error as SmtpError;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use tokio::sync::Semaphore;

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
    idle: Mutex<Vec<AsyncSmtpConnection>>,
    permits: Semaphore,
}

impl std::fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpTransport")
            .field("settings", &self.settings)
            .finish()
    }
}

/// Whether the body had been handed over when a step failed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Mail,
    Rcpt,
    Data,
    /// The body and the final dot.
    Body,
}

impl SmtpTransport {
    pub fn new(settings: SmtpSettings) -> SmtpTransport {
        let permits = Semaphore::new(settings.pool_size.max(1));
        SmtpTransport {
            settings,
            idle: Mutex::new(Vec::new()),
            permits,
        }
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
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| SendError::RelayUnavailable("transport closed".into()))?;
        let pooled = self.take_idle();
        let reused = pooled.is_some();
        let mut connection = match pooled {
            Some(connection) => connection,
            None => self.connect().await?,
        };
        if let Err(error) = self.envelope(&mut connection, email).await {
            self.discard(connection, !matches!(error, StepError::TimedOut))
                .await;
            // A pooled connection the server closed while idle is not the message's fault.
            if !(reused && is_connection_fault(&error)) {
                return Err(classify_step(&error));
            }
            connection = self.connect().await?;
            if let Err(error) = self.envelope(&mut connection, email).await {
                self.discard(connection, !matches!(error, StepError::TimedOut))
                    .await;
                return Err(classify_step(&error));
            }
        }
        if !before_body().await {
            // The server is reading the body now: a QUIT would be taken as message text and
            // never answered. Closing the socket without the final dot delivers nothing.
            self.discard(connection, false).await;
            return Err(SendError::Withdrawn);
        }
        match tokio::time::timeout(self.settings.timeout, connection.message(&email.bytes)).await {
            Err(_elapsed) => {
                // A silent server would not answer a QUIT either.
                self.discard(connection, false).await;
                Err(SendError::Ambiguous(format!(
                    "the server did not answer within {:?} after the final dot",
                    self.settings.timeout
                )))
            }
            Ok(Ok(response)) => {
                self.put_idle(connection);
                Ok(reply_text(&response))
            }
            Ok(Err(error)) => {
                if error.status().is_some() && !connection.has_broken() {
                    self.put_idle(connection);
                } else {
                    self.discard(connection, true).await;
                }
                Err(classify(&error, Stage::Body))
            }
        }
    }

    /// MAIL FROM, RCPT TO and DATA, each within the timeout.
    async fn envelope(
        &self,
        connection: &mut AsyncSmtpConnection,
        email: &OutgoingEmail,
    ) -> Result<(), StepError> {
        let step = self.settings.timeout;
        let failed = |stage: Stage| move |error: SmtpError| StepError::Smtp(error, stage);
        let mail = Mail::new(Some(email.envelope_from.clone()), vec![]);
        tokio::time::timeout(step, connection.command(mail))
            .await
            .map_err(|_| StepError::TimedOut)?
            .map_err(failed(Stage::Mail))?;
        let rcpt = Rcpt::new(email.to.clone(), vec![]);
        tokio::time::timeout(step, connection.command(rcpt))
            .await
            .map_err(|_| StepError::TimedOut)?
            .map_err(failed(Stage::Rcpt))?;
        tokio::time::timeout(step, connection.command(Data))
            .await
            .map_err(|_| StepError::TimedOut)?
            .map_err(failed(Stage::Data))?;
        Ok(())
    }

    /// Connects, greets, and does STARTTLS and AUTH, all within a bound: lettre times out only
    /// the TCP connect, and a relay stalled in TLS or AUTH must not hold a connection forever.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SendError> {
        let s = &self.settings;
        tokio::time::timeout(s.timeout * 4, self.open_connection())
            .await
            .unwrap_or_else(|_| {
                Err(SendError::RelayUnavailable(format!(
                    "{}:{}: no working session within {:?} (greeting, TLS and login)",
                    s.host,
                    s.port,
                    s.timeout * 4
                )))
            })
    }

    async fn open_connection(&self) -> Result<AsyncSmtpConnection, SendError> {
        let s = &self.settings;
        let hello = s
            .helo_name
            .clone()
            .map_or_else(ClientId::default, ClientId::Domain);
        let unavailable = |e: SmtpError| {
            SendError::RelayUnavailable(format!("{}:{}: {}", s.host, s.port, describe(&e)))
        };
        let tls = match s.tls {
            TlsMode::None => None,
            TlsMode::Starttls | TlsMode::Tls => {
                Some(TlsParameters::new(s.host.clone()).map_err(unavailable)?)
            }
        };
        let greeting_deadline = s.timeout * 2;
        let no_greeting = || {
            SendError::RelayUnavailable(format!(
                "{}:{}: no greeting within {:?}",
                s.host, s.port, greeting_deadline
            ))
        };
        let mut connection = if s.tls == TlsMode::Tls {
            let connecting = AsyncSmtpConnection::connect_tokio1(
                (s.host.as_str(), s.port),
                Some(s.timeout),
                &hello,
                tls.clone(),
                None,
            );
            tokio::time::timeout(greeting_deadline, connecting)
                .await
                .map_err(|_| no_greeting())?
                .map_err(unavailable)?
        } else {
            // Our own socket, to turn off Nagle: lettre writes the body and the final dot
            // separately, which otherwise waits out the peer's delayed ACK on every message.
            let refused = |e: std::io::Error| {
                SendError::RelayUnavailable(format!("{}:{}: {e}", s.host, s.port))
            };
            let tcp = tokio::time::timeout(
                s.timeout,
                tokio::net::TcpStream::connect((s.host.as_str(), s.port)),
            )
            .await
            .map_err(|_| {
                SendError::RelayUnavailable(format!("{}:{}: connect timed out", s.host, s.port))
            })?
            .map_err(refused)?;
            tcp.set_nodelay(true).map_err(refused)?;
            let connecting = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &hello);
            tokio::time::timeout(greeting_deadline, connecting)
                .await
                .map_err(|_| no_greeting())?
                .map_err(unavailable)?
        };
        if s.tls == TlsMode::Starttls
            && let Some(tls) = tls
        {
            connection
                .starttls(tls, &hello)
                .await
                .map_err(unavailable)?;
        }
        if let (Some(user), Some(password)) = (&s.username, &s.password) {
            let credentials = Credentials::new(user.clone(), password.expose().to_string());
            connection
                .auth(&[Mechanism::Plain, Mechanism::Login], &credentials)
                .await
                .map_err(unavailable)?;
        }
        Ok(connection)
    }

    /// Gives up a connection. With `quit`, says QUIT first (lettre's `abort`, which waits for
    /// the reply without a deadline, so within the step timeout here); without, just closes
    /// the socket: for a server that stopped answering, or one waiting for the body.
    async fn discard(&self, mut connection: AsyncSmtpConnection, quit: bool) {
        if quit {
            let _ = tokio::time::timeout(self.settings.timeout, connection.abort()).await;
        }
        drop(connection);
    }

    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        self.idle.lock().ok()?.pop()
    }

    fn put_idle(&self, connection: AsyncSmtpConnection) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.pool_size()
        {
            idle.push(connection);
        }
    }

    pub async fn close(&self) {
        let connections: Vec<_> = match self.idle.lock() {
            Ok(mut idle) => idle.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for mut connection in connections {
            let _ = tokio::time::timeout(Duration::from_secs(2), connection.quit()).await;
        }
    }
}

/// A failed SMTP step: the server's answer (and to which command), or no answer in time.
enum StepError {
    Smtp(SmtpError, Stage),
    TimedOut,
}

fn is_connection_fault(error: &StepError) -> bool {
    match error {
        StepError::Smtp(error, _) => error.status().is_none(),
        StepError::TimedOut => true,
    }
}

/// The server's words: `"250 2.0.0 Ok: queued as 12345"`.
fn reply_text(response: &Response) -> String {
    let lines: Vec<&str> = response.message().collect();
    format!("{} {}", response.code(), lines.join(" "))
        .trim()
        .to_string()
}

fn describe(error: &SmtpError) -> String {
    match (error.status(), std::error::Error::source(error)) {
        (Some(code), Some(text)) => format!("{code} {text}"),
        (Some(code), None) => code.to_string(),
        (None, _) => error.to_string(),
    }
}

/// Maps a failed step to what the dispatcher does next.
fn classify_step(error: &StepError) -> SendError {
    match error {
        StepError::Smtp(error, stage) => classify(error, *stage),
        StepError::TimedOut => SendError::Transient(
            "the server did not answer in time before the body was sent".into(),
        ),
    }
}

/// Maps lettre's error to what the dispatcher does next.
fn classify(error: &SmtpError, stage: Stage) -> SendError {
    let reply = describe(error);
    match error.status().map(u16::from) {
        Some(421) if stage != Stage::Body => SendError::RelayUnavailable(reply),
        Some(code) if (400..500).contains(&code) => SendError::Transient(reply),
        Some(_) if error.is_permanent() => {
            // Only a refusal of the recipient says the customer's address is bad; a 5.1.x at
            // MAIL FROM is about our own sender address and must not suppress anyone.
            let about_recipient = matches!(stage, Stage::Rcpt | Stage::Body);
            let bad_address =
                about_recipient && enhanced_status(&reply).is_some_and(is_bad_mailbox_status);
            SendError::Permanent { reply, bad_address }
        }
        _ if stage == Stage::Body => SendError::Ambiguous(reply),
        _ => SendError::Transient(format!("connection lost before the body was sent: {reply}")),
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
