//! `[replies.imap]`: the hosted mailbox the daemon watches for replies, and what it does with
//! each mail once it is recorded (mark it seen or move it to a folder).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use serde::Deserialize;

use crate::settings::{Secret, SecretSource, duration};
use crate::transport::settings::TlsMode;

/// RFC 2177: a client re-issues IDLE at least every 29 minutes, or the server may log it out.
pub const MAX_IDLE: Duration = Duration::from_secs(29 * 60);

/// `[replies.imap]` as written in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImapConfig {
    pub host: String,
    /// 993 with `tls = "tls"`, else 143.
    #[serde(default)]
    pub port: Option<u16>,
    /// `"tls"` (implicit TLS, the default), `"starttls"` or `"none"`, as in `[transport.smtp]`.
    #[serde(default = "default_tls")]
    pub tls: TlsMode,
    /// A PEM file of CA certificates to trust besides the usual public ones (a server with a
    /// self-signed certificate).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    pub username: String,
    /// The password comes from one of these, never from this file or the command line.
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_credential: Option<String>,
    #[serde(default = "default_mailbox")]
    pub mailbox: String,
    /// What to do with a mail once it is recorded (or found to be no reply).
    #[serde(default)]
    pub after: After,
    /// The folder for `after = "move"`; created if missing.
    #[serde(default)]
    pub move_to: Option<String>,
    /// How often to look when the server has no IDLE; with IDLE, how often to re-issue it.
    #[serde(default = "default_poll_every", deserialize_with = "duration")]
    pub poll_every: TimeDelta,
    /// How long to wait for the server at each step before giving up on the connection.
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: TimeDelta,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum After {
    /// Set `\Seen`: the mail stays where it is, read.
    #[default]
    Seen,
    /// Move it to `move_to`.
    Move,
}

fn default_tls() -> TlsMode {
    TlsMode::Tls
}
fn default_mailbox() -> String {
    "INBOX".into()
}
fn default_poll_every() -> TimeDelta {
    TimeDelta::seconds(60)
}
fn default_timeout() -> TimeDelta {
    TimeDelta::seconds(30)
}

impl ImapConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            TlsMode::Tls => 993,
            TlsMode::Starttls | TlsMode::None => 143,
        })
    }

    /// Mistakes that need no file or network to see, one message each.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.host.trim().is_empty() {
            problems.push("replies.imap.host: expected the IMAP server's name".into());
        }
        if self.username.trim().is_empty() {
            problems.push("replies.imap.username: expected the mailbox's login name".into());
        }
        if self.password_env.is_none()
            && self.password_file.is_none()
            && self.password_credential.is_none()
        {
            problems.push(
                "replies.imap: no password configured: set one of replies.imap.password_env, \
                 password_file or password_credential"
                    .into(),
            );
        }
        match (self.after, &self.move_to) {
            (After::Move, None) => problems.push(
                "replies.imap.after = \"move\" needs replies.imap.move_to (e.g. \"Processed\")"
                    .into(),
            ),
            (After::Seen, Some(_)) => problems.push(
                "replies.imap.move_to is set but replies.imap.after is \"seen\"; set after = \
                 \"move\" to move processed mail"
                    .into(),
            ),
            _ => {}
        }
        if self.poll_every < TimeDelta::seconds(1) {
            problems.push("replies.imap.poll_every: expected at least 1s".into());
        }
        if self.timeout < TimeDelta::seconds(1) {
            problems.push("replies.imap.timeout: expected at least 1s".into());
        }
        for (key, name) in [
            ("mailbox", Some(&self.mailbox)),
            ("move_to", self.move_to.as_ref()),
        ] {
            if name.is_some_and(|n| n.trim().is_empty() || n.contains(['\r', '\n', '"', '\\'])) {
                problems.push(format!(
                    "replies.imap.{key}: expected a folder name without quotes, backslashes or \
                     line breaks"
                ));
            }
        }
        problems
    }

    /// What the watcher connects with: the password read and the TLS trust built.
    pub fn settings(&self) -> Result<ImapSettings, String> {
        let password = SecretSource {
            env: self.password_env.clone(),
            file: self.password_file.clone(),
            credential: self.password_credential.clone(),
        }
        .read("replies.imap: the IMAP password")?
        .ok_or("replies.imap: no password configured")?;
        let tls = match self.tls {
            TlsMode::None => None,
            TlsMode::Tls | TlsMode::Starttls => Some(tls_config(self.ca_file.as_ref())?),
        };
        let target = match self.after {
            After::Seen => Target::MarkSeen,
            After::Move => Target::MoveTo(self.move_to.clone().unwrap_or_default()),
        };
        Ok(ImapSettings {
            host: self.host.trim().to_string(),
            port: self.port(),
            tls_mode: self.tls,
            tls,
            username: self.username.clone(),
            password,
            mailbox: self.mailbox.clone(),
            after: target,
            poll_every: self.poll_every.to_std().unwrap_or(Duration::from_secs(60)),
            timeout: self.timeout.to_std().unwrap_or(Duration::from_secs(30)),
        })
    }
}

/// The public roots, plus the CAs in `ca_file` if given.
fn tls_config(
    ca_file: Option<&PathBuf>,
) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certificates = CertificateDer::pem_file_iter(path)
            .and_then(|all| all.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("replies.imap.ca_file {}: {e}", path.display()))?;
        if certificates.is_empty() {
            return Err(format!(
                "replies.imap.ca_file {}: no certificate in it (expected PEM)",
                path.display()
            ));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|e| format!("replies.imap.ca_file {}: {e}", path.display()))?;
        }
    }
    let config = ClientConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("replies.imap: TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What to do with a processed mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    MarkSeen,
    MoveTo(String),
}

/// `[replies.imap]` ready to connect with. The password never appears in `Debug`.
#[derive(Clone)]
pub struct ImapSettings {
    pub host: String,
    pub port: u16,
    pub tls_mode: TlsMode,
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    pub username: String,
    pub password: Secret,
    pub mailbox: String,
    pub after: Target,
    pub poll_every: Duration,
    pub timeout: Duration,
}

impl std::fmt::Debug for ImapSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls_mode", &self.tls_mode)
            .field("username", &self.username)
            .field("password", &"***")
            .field("mailbox", &self.mailbox)
            .field("after", &self.after)
            .field("poll_every", &self.poll_every)
            .finish_non_exhaustive()
    }
}

impl ImapSettings {
    /// One line for `touchpoint check` and the daemon's start-up log.
    pub fn describe(&self) -> String {
        let after = match &self.after {
            Target::MarkSeen => "marks each processed mail seen".to_string(),
            Target::MoveTo(folder) => format!("moves each processed mail to {folder:?}"),
        };
        let tls = match self.tls_mode {
            TlsMode::Tls => "TLS",
            TlsMode::Starttls => "STARTTLS",
            TlsMode::None => "no TLS",
        };
        format!(
            "replies.imap: watches {:?} at {}:{} ({tls}) as {:?}; {after}",
            self.mailbox, self.host, self.port, self.username
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<ImapConfig, toml::de::Error> {
        toml::from_str(&format!(
            "host = \"imap.example.com\"\nusername = \"replies@acme.example\"\n\
             password_env = \"TP_TEST_UNSET_IMAP_PASSWORD\"\n{extra}"
        ))
    }

    #[test]
    fn defaults_follow_the_tls_mode() {
        let tls = config("").unwrap();
        assert_eq!((tls.tls, tls.port()), (TlsMode::Tls, 993));
        assert_eq!(tls.mailbox, "INBOX");
        assert_eq!(tls.after, After::Seen);
        assert!(tls.problems().is_empty(), "{:?}", tls.problems());
        let plain = config("tls = \"none\"").unwrap();
        assert_eq!(plain.port(), 143);
        assert_eq!(
            config("tls = \"starttls\"\nport = 1143").unwrap().port(),
            1143
        );
    }

    #[test]
    fn mistakes_are_named() {
        let moving = config("after = \"move\"").unwrap().problems();
        assert!(moving.iter().any(|p| p.contains("move_to")), "{moving:?}");
        let stray = config("move_to = \"Done\"").unwrap().problems();
        assert!(stray.iter().any(|p| p.contains("after")), "{stray:?}");
        let error = config("tls = \"ssl\"").unwrap_err().to_string();
        assert!(error.contains("starttls"), "{error}");
        let error = config("after = \"delete\"").unwrap_err().to_string();
        assert!(error.contains("move"), "{error}");
        let unset = config("").unwrap().settings().unwrap_err();
        assert!(unset.contains("TP_TEST_UNSET_IMAP_PASSWORD"), "{unset}");
    }

    #[test]
    fn the_password_stays_out_of_debug_output() {
        let settings = ImapSettings {
            host: "imap.example.com".into(),
            port: 993,
            tls_mode: TlsMode::Tls,
            tls: None,
            username: "replies".into(),
            password: Secret("hunter2-imap".into()),
            mailbox: "INBOX".into(),
            after: Target::MarkSeen,
            poll_every: Duration::from_secs(60),
            timeout: Duration::from_secs(30),
        };
        let shown = format!("{settings:?} {}", settings.describe());
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
