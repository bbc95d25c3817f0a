//! The transport's own settings: `[transport]` (which transport, the outbox directory, the SMTP
//! relay), `[sender]` (who messages are from) and `[dkim]` (how they are signed).

use std::path::PathBuf;
use std::str::FromStr;

use chrono::TimeDelta;
use serde::Deserialize;

use crate::settings::{Secret, SecretSource, duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Smtp,
    File,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    #[serde(default = "default_transport_kind")]
    pub kind: TransportKind,
    #[serde(default)]
    pub file: FileTransportConfig,
    #[serde(default)]
    pub smtp: SmtpConfig,
}
impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            kind: default_transport_kind(),
            file: FileTransportConfig::default(),
            smtp: SmtpConfig::default(),
        }
    }
}
fn default_transport_kind() -> TransportKind {
    TransportKind::File
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTransportConfig {
    #[serde(default = "default_outbox_dir")]
    pub dir: PathBuf,
}
impl Default for FileTransportConfig {
    fn default() -> Self {
        FileTransportConfig {
            dir: default_outbox_dir(),
        }
    }
}
fn default_outbox_dir() -> PathBuf {
    PathBuf::from("var/outbox")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Tls,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    #[serde(default = "default_smtp_host")]
    pub host: String,
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    #[serde(default = "default_tls")]
    pub tls: TlsMode,
    /// Login name; the password comes from `password_env`, `password_file` or the systemd
    /// credential `password_credential`, never from this file or the command line.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_credential: Option<String>,
    /// SMTP connections kept open and used in parallel.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How long to wait for the server at each step before giving up on a connection.
    #[serde(default = "default_smtp_timeout", deserialize_with = "duration")]
    pub timeout: TimeDelta,
    /// The name this host gives in EHLO.
    #[serde(default)]
    pub helo_name: Option<String>,
}
impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            host: default_smtp_host(),
            port: default_smtp_port(),
            tls: default_tls(),
            username: None,
            password_env: None,
            password_file: None,
            password_credential: None,
            pool_size: default_pool_size(),
            timeout: default_smtp_timeout(),
            helo_name: None,
        }
    }
}
fn default_smtp_host() -> String {
    "localhost".into()
}
fn default_smtp_port() -> u16 {
    25
}
fn default_tls() -> TlsMode {
    TlsMode::None
}
fn default_pool_size() -> usize {
    4
}
fn default_smtp_timeout() -> TimeDelta {
    TimeDelta::seconds(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderConfig {
    /// `From:` of every message, e.g. `"Acme Shop <hello@acme.example>"`.
    pub from: String,
    #[serde(default)]
    pub reply_to: Option<String>,
    /// The domain in generated Message-IDs; defaults to the From address's domain.
    #[serde(default)]
    pub message_id_domain: Option<String>,
    /// Envelope sender for bounces, e.g. `bounces@acme.example`: each message goes out as
    /// `bounces+ID.TAG@acme.example` (VERP, TAG signed with the link secret), so a bounce names
    /// its message even without headers, and a stranger cannot forge one.
    #[serde(default)]
    pub bounce_address: Option<String>,
}

/// DKIM signing of every message.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    pub selector: String,
    pub domain: String,
    /// `"rsa"` or `"ed25519"`; the key must be of this kind.
    pub algorithm: DkimAlgorithm,
    /// The private key (PEM: PKCS#1 or PKCS#8 for RSA, PKCS#8 for Ed25519), from one of these.
    #[serde(default)]
    pub key_env: Option<String>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub key_credential: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DkimAlgorithm {
    Rsa,
    Ed25519,
}

impl SmtpConfig {
    /// The SMTP password from the environment, a file or a systemd credential, if configured.
    pub fn password(&self) -> Result<Option<Secret>, String> {
        let source = SecretSource {
            env: self.password_env.clone(),
            file: self.password_file.clone(),
            credential: self.password_credential.clone(),
        };
        source.read("the SMTP password")
    }
}

impl FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "smtp" => Ok(TransportKind::Smtp),
            "file" => Ok(TransportKind::File),
            other => Err(format!(
                "unknown transport {other:?}: expected \"smtp\" or \"file\""
            )),
        }
    }
}
