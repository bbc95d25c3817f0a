//! Transports hand a finished message to the world: over SMTP (a small client of our own, with
//! PIPELINING, also across messages: a message waiting for a connection has its envelope sent
//! right after the previous body's final dot; it asks the dispatcher once more, after DATA's 354
//! and before the body's first byte, whether the body may still go out) or as `.eml` files in a
//! directory.

pub mod dkim;
mod email;
mod file;
pub mod settings;
mod smtp;

pub use email::{EmailParts, OutgoingEmail, build_email, message_id_for, parse_mailbox};
pub use file::FileTransport;
pub use smtp::{SmtpSettings, SmtpTransport};

use std::future::Future;

pub use settings::{
    DkimAlgorithm, DkimConfig, FileTransportConfig, SenderConfig, SmtpConfig, TlsMode,
    TransportConfig, TransportKind,
};

/// Why a message did not go out, in the terms the dispatcher acts on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The relay cannot be used at all (connection refused, a 421 greeting, TLS or login
    /// failure). Nothing specific to this message happened: pause sending, do not count it.
    #[error("the mail relay is unavailable: {0}")]
    RelayUnavailable(String),
    /// A temporary refusal (4xx) or a broken connection before the body went out: retry later.
    #[error("temporary failure: {0}")]
    Transient(String),
    /// A permanent refusal (5xx). `bad_address` is a 5.1.x status: the address does not exist.
    #[error("permanent failure: {reply}")]
    Permanent { reply: String, bad_address: bool },
    /// The body was handed over but no reply came back: the server may have accepted it.
    #[error("no reply after the message body was sent: {0}")]
    Ambiguous(String),
    /// The body was not sent because the dispatcher withdrew: its phase write was refused (the
    /// claim was lost, the message expired, the address was suppressed, the frequency limit),
    /// the body's local deadline passed, or the daemon is stopping.
    #[error("not sent: the dispatcher withdrew the message before the body went out")]
    Withdrawn,
}

/// Where messages go.
#[derive(Debug)]
pub enum Transport {
    /// Boxed: the pool and the TLS setup make it much larger than the file transport.
    Smtp(Box<SmtpTransport>),
    File(FileTransport),
}

impl Transport {
    /// Builds the configured transport. Reading the SMTP password happens here, once.
    pub fn from_config(settings: &TransportConfig) -> Result<Transport, String> {
        Ok(match settings.kind {
            TransportKind::File => Transport::File(FileTransport::new(settings.file.dir.clone())?),
            TransportKind::Smtp => {
                let password = settings.smtp.password()?;
                Transport::Smtp(Box::new(SmtpTransport::new(SmtpSettings::from_config(
                    &settings.smtp,
                    password,
                )?)))
            }
        })
    }

    /// How many messages may be in flight at once.
    pub fn parallelism(&self) -> usize {
        match self {
            Transport::Smtp(smtp) => smtp.pool_size(),
            Transport::File(_) => 4,
        }
    }

    /// How long handing over one body may take at most; a claim needs this much lease left.
    pub fn body_deadline(&self) -> std::time::Duration {
        match self {
            Transport::Smtp(smtp) => smtp.timeout(),
            Transport::File(_) => std::time::Duration::from_secs(5),
        }
    }

    /// Sends `email`. `before_body` runs after the server agreed to take the body and before a
    /// byte of it goes out; if it returns false the body is not sent (`Withdrawn`). Returns the
    /// server's reply on acceptance.
    pub async fn deliver<F, Fut>(
        &self,
        email: &OutgoingEmail,
        before_body: F,
    ) -> Result<String, SendError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = bool> + Send,
    {
        match self {
            Transport::Smtp(smtp) => smtp.deliver(email, before_body).await,
            Transport::File(file) => file.deliver(email, before_body).await,
        }
    }

    /// Closes pooled connections politely.
    pub async fn close(&self) {
        if let Transport::Smtp(smtp) = self {
            smtp.close().await;
        }
    }
}
