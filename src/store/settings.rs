//! The store's own settings: `[database]` and the URL that picks the backend.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::settings::{Secret, normalize};

/// `[database]` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite:PATH` (relative to the config file) or `postgres://...`.
    #[serde(default = "default_database_url")]
    pub url: Secret,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: default_database_url(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_database_url() -> Secret {
    Secret("sqlite:var/touchpoint.db".into())
}
fn default_max_connections() -> u32 {
    8
}

/// Which database, chosen once from the URL's scheme.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite(path) => write!(f, "Sqlite({})", path.display()),
            DatabaseUrl::Postgres(_) => f.write_str("Postgres(***)"),
        }
    }
}

impl DatabaseUrl {
    pub fn parse(url: &str, base_dir: &Path) -> Result<DatabaseUrl, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(url.to_string()));
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let path = rest.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err("sqlite: needs a file path, like sqlite:var/touchpoint.db".into());
            }
            let path = PathBuf::from(path);
            return Ok(DatabaseUrl::Sqlite(if path.is_relative() {
                normalize(&base_dir.join(path))
            } else {
                path
            }));
        }
        Err("expected sqlite:PATH or postgres://USER@HOST/DATABASE".into())
    }

    /// Where the data lives, without credentials, for logs.
    pub fn describe(&self) -> String {
        match self {
            DatabaseUrl::Sqlite(path) => format!("SQLite file {}", path.display()),
            DatabaseUrl::Postgres(url) => {
                let host = url.rsplit('@').next().unwrap_or(url);
                let host = host
                    .trim_start_matches("postgres://")
                    .trim_start_matches("postgresql://");
                format!("PostgreSQL {}", host.split('?').next().unwrap_or(host))
            }
        }
    }
}
