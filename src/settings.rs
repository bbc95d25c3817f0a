//! What every subsystem's settings type is made of: secrets and where they come from, durations
//! written as `"30s"`, and paths relative to the config file. Each subsystem owns its settings
//! type (`store::DatabaseConfig`, `transport::TransportConfig`, `web::WebConfig`, ...); the
//! `config` module reads the file and gathers them.

use std::fmt;
use std::path::{Path, PathBuf};

use chrono::TimeDelta;
use chrono_tz::Tz;
use serde::{Deserialize, Deserializer};

/// Where a secret comes from: an environment variable, a file, or a systemd credential
/// (`LoadCredential=`, read from `$CREDENTIALS_DIRECTORY`).
#[derive(Debug, Clone, Default)]
pub struct SecretSource {
    pub env: Option<String>,
    pub file: Option<PathBuf>,
    pub credential: Option<String>,
}

impl SecretSource {
    /// The secret, if a source is configured; `what` names it in errors.
    pub fn read(&self, what: &str) -> Result<Option<Secret>, String> {
        if let Some(var) = &self.env {
            return std::env::var(var)
                .map(|v| Some(Secret(v)))
                .map_err(|_| format!("{what}: the environment variable {var} is not set"));
        }
        if let Some(file) = &self.file {
            return read_secret_file(file)
                .map(Some)
                .map_err(|e| format!("{what}: {e}"));
        }
        if let Some(name) = &self.credential {
            let dir = std::env::var("CREDENTIALS_DIRECTORY").map_err(|_| {
                format!("{what}: the credential {name:?} needs CREDENTIALS_DIRECTORY (is the unit's LoadCredential= in place?)")
            })?;
            return read_secret_file(&Path::new(&dir).join(name))
                .map(Some)
                .map_err(|e| format!("{what}: {e}"));
        }
        Ok(None)
    }
}

/// A value that must not appear in logs or `Debug` output (passwords, database URLs).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

fn read_secret_file(path: &Path) -> Result<Secret, String> {
    std::fs::read_to_string(path)
        .map(|text| Secret(text.trim_end_matches(['\r', '\n']).to_string()))
        .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))
}

/// Signing and bearer secrets: an empty or short one (an unset variable exported as "", a
/// truncated file) would let anyone forge links or call the webhook.
pub const MIN_SECRET_BYTES: usize = 16;

/// `secret`, unless it is shorter than [`MIN_SECRET_BYTES`]; `what` names it in the error.
pub fn long_enough(secret: Option<Secret>, what: &str) -> Result<Option<Secret>, String> {
    match secret {
        Some(secret) if secret.expose().trim().len() < MIN_SECRET_BYTES => Err(format!(
            "{what} is {} bytes long; it must be at least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)",
            secret.expose().trim().len()
        )),
        other => Ok(other),
    }
}

/// `config/../var/x` -> `var/x`, without touching the file system (the path may not exist yet).
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out
    }
}

/// Serde: a duration written as `"30s"`, `"2m"`, `"1h30m"`.
pub fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<TimeDelta, D::Error> {
    let text = String::deserialize(deserializer)?;
    crate::duration::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
}

/// Serde: an IANA time zone name.
pub fn timezone<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Tz, D::Error> {
    let text = String::deserialize(deserializer)?;
    crate::calendar::parse_timezone(&text).map_err(serde::de::Error::custom)
}
