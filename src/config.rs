//! The daemon's configuration: `touchpoint.toml`, with every key overridable from the
//! environment (`TOUCHPOINT_DATABASE__URL` for `database.url`). Relative paths are relative to the
//! config file's directory. Unknown keys are errors.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::TimeDelta;
use chrono_tz::Tz;
use serde::{Deserialize, Deserializer};

use crate::diag::{Diagnostic, Diagnostics};
use crate::render::Business;
use crate::rules::parse_duration;

/// Environment variables with this prefix override config keys; `__` separates key levels.
pub const ENV_PREFIX: &str = "TOUCHPOINT_";
/// Environment variables with the prefix that are not config keys.
const ENV_NOT_KEYS: &[&str] = &["TOUCHPOINT_CONFIG", "TOUCHPOINT_LOG"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub rules: RulesConfig,
    #[serde(default)]
    pub templates: TemplatesConfig,
    #[serde(default)]
    pub transport: TransportConfig,
    pub sender: SenderConfig,
    pub business: Business,
    #[serde(default)]
    pub defaults: DefaultsConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub planner: PlannerConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub links: LinksConfig,
    #[serde(default)]
    pub bounces: BouncesConfig,
    #[serde(default)]
    pub dkim: Option<DkimConfig>,
    #[serde(default)]
    pub web: WebConfig,
    /// The business's own databases, read where they live (`[sources.NAME]`).
    #[serde(default)]
    pub sources: std::collections::BTreeMap<String, crate::sources::SourceConfig>,
    /// The directory of the config file; relative paths were resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file itself, for messages.
    #[serde(skip)]
    pub path: PathBuf,
}

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    #[serde(default = "default_rules_dir")]
    pub dir: PathBuf,
}
impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            dir: default_rules_dir(),
        }
    }
}
fn default_rules_dir() -> PathBuf {
    PathBuf::from("rules")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatesConfig {
    #[serde(default = "default_templates_dir")]
    pub dir: PathBuf,
}
impl Default for TemplatesConfig {
    fn default() -> Self {
        TemplatesConfig {
            dir: default_templates_dir(),
        }
    }
}
fn default_templates_dir() -> PathBuf {
    PathBuf::from("templates")
}

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsConfig {
    /// The time zone of customers who have none.
    #[serde(default = "default_timezone", deserialize_with = "timezone")]
    pub timezone: Tz,
    /// `expire_after` of rules that do not set one: a message this late is skipped, and a new
    /// rule does not reach back further than this.
    #[serde(default = "default_expire_after", deserialize_with = "duration")]
    pub expire_after: TimeDelta,
}
impl Default for DefaultsConfig {
    fn default() -> Self {
        DefaultsConfig {
            timezone: default_timezone(),
            expire_after: default_expire_after(),
        }
    }
}
fn default_timezone() -> Tz {
    Tz::UTC
}
fn default_expire_after() -> TimeDelta {
    TimeDelta::days(1)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// How long a claim on a message lasts before another process may take it over.
    #[serde(default = "default_lease", deserialize_with = "duration")]
    pub lease: TimeDelta,
    /// Messages claimed at once.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Attempts (4xx replies, connection faults) before a message is `failed`.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt up to `retry_max`, with jitter.
    #[serde(default = "default_retry_base", deserialize_with = "duration")]
    pub retry_base: TimeDelta,
    #[serde(default = "default_retry_max", deserialize_with = "duration")]
    pub retry_max: TimeDelta,
    /// Send again a message whose outcome is `unknown` (the server may have it). Off: such a
    /// message waits for the operator.
    #[serde(default)]
    pub resend_unknown: bool,
    /// On shutdown, how long in-flight sends may take to finish.
    #[serde(default = "default_drain", deserialize_with = "duration")]
    pub shutdown_grace: TimeDelta,
}
impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            lease: default_lease(),
            batch_size: default_batch_size(),
            max_attempts: default_max_attempts(),
            retry_base: default_retry_base(),
            retry_max: default_retry_max(),
            resend_unknown: false,
            shutdown_grace: default_drain(),
        }
    }
}
fn default_lease() -> TimeDelta {
    TimeDelta::minutes(2)
}
fn default_batch_size() -> u32 {
    50
}
fn default_max_attempts() -> u32 {
    8
}
fn default_retry_base() -> TimeDelta {
    TimeDelta::minutes(1)
}
fn default_retry_max() -> TimeDelta {
    TimeDelta::hours(1)
}
fn default_drain() -> TimeDelta {
    TimeDelta::seconds(20)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerConfig {
    /// How often to look for new customers and events (a cheap query on what is new).
    #[serde(default = "default_plan_interval", deserialize_with = "duration")]
    pub interval: TimeDelta,
    /// How often to re-examine everything (catches edits to existing rows and yearly and
    /// recurring rules' next occurrences).
    #[serde(default = "default_reconcile", deserialize_with = "duration")]
    pub reconcile_every: TimeDelta,
}
impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            interval: default_plan_interval(),
            reconcile_every: default_reconcile(),
        }
    }
}
fn default_plan_interval() -> TimeDelta {
    TimeDelta::seconds(2)
}
fn default_reconcile() -> TimeDelta {
    TimeDelta::minutes(5)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the health, metrics and web listener; empty to turn it off.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Connections open at once. At the cap the oldest idle connection is closed for a new
    /// one; lowered at start to what the open-files limit leaves after the database, SMTP and
    /// the outbox (see [`crate::listener`]).
    #[serde(default = "default_http_max_connections")]
    pub max_connections: usize,
    /// A request's head (request line and headers) must arrive within this of its first byte
    /// (of the connection, for its first request).
    #[serde(default = "default_header_read_timeout", deserialize_with = "duration")]
    pub header_read_timeout: TimeDelta,
    /// A request's body must arrive within this of its head.
    #[serde(default = "default_body_read_timeout", deserialize_with = "duration")]
    pub body_read_timeout: TimeDelta,
    /// How long a kept-alive connection may wait for its next request.
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: TimeDelta,
}
impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
            max_connections: default_http_max_connections(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            idle_timeout: default_idle_timeout(),
        }
    }
}
fn default_listen() -> String {
    "127.0.0.1:8025".into()
}
fn default_http_max_connections() -> usize {
    512
}
fn default_header_read_timeout() -> TimeDelta {
    TimeDelta::seconds(10)
}
fn default_body_read_timeout() -> TimeDelta {
    TimeDelta::seconds(30)
}
/// Longer than reverse proxies keep idle upstream connections by default (nginx 60 s), so the
/// proxy, not touchpoint, closes them: no request is lost to a connection closed under it.
fn default_idle_timeout() -> TimeDelta {
    TimeDelta::seconds(75)
}

/// The ingest API on the HTTP listener (`POST /api/v1/events`, `POST /api/v1/customers`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// One bearer token per application, so each can be revoked alone; none turns the API off.
    #[serde(default)]
    pub tokens: Vec<ApiTokenConfig>,
}

/// A named bearer token. The token itself comes from exactly one of `token_env`, `token_file`
/// or `token_credential`, never from this file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenConfig {
    /// Who uses it ("shop"), for the log.
    pub name: String,
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub token_credential: Option<String>,
}

impl ApiTokenConfig {
    fn source(&self) -> SecretSource {
        SecretSource {
            env: self.token_env.clone(),
            file: self.token_file.clone(),
            credential: self.token_credential.clone(),
        }
    }
}

impl ApiConfig {
    /// Mistakes that need no secret read: bad or repeated names, not exactly one source.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for token in &self.tokens {
            let name = &token.name;
            let name_ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !name_ok {
                problems.push(format!(
                    "api.tokens: name {name:?}: expected letters, digits, '-', '_' or '.'"
                ));
            }
            if !seen.insert(name.as_str()) {
                problems.push(format!("api.tokens: the name {name:?} is used twice"));
            }
            let sources = [
                token.token_env.is_some(),
                token.token_file.is_some(),
                token.token_credential.is_some(),
            ];
            if sources.iter().filter(|set| **set).count() != 1 {
                problems.push(format!(
                    "api.tokens {name:?}: set exactly one of token_env, token_file, token_credential"
                ));
            }
        }
        problems
    }
}

/// Links in messages: one-click unsubscribe, open pixel, click tracking.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinksConfig {
    /// Where customers reach this daemon's HTTP listener (usually through a reverse proxy),
    /// e.g. `https://mail.acme.example`. Default: `http://` + `http.listen`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The secret that signs links, from one of these; without one, a secret is generated once
    /// and kept in the database (shared by every replica).
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub secret_credential: Option<String>,
    /// Also offer unsubscribing by mail: `List-Unsubscribe: <mailto:...>`.
    #[serde(default)]
    pub unsubscribe_mailto: Option<String>,
}

/// Bounces and complaints that arrive after sending.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BouncesConfig {
    /// Soft bounces (4.x.x in a report) an address may collect before it is suppressed.
    #[serde(default = "default_soft_bounce_limit")]
    pub soft_bounce_limit: i64,
    /// How long after sending an unsigned report (`bounces+42@...` or an untagged Message-ID)
    /// is believed, for messages sent before VERP and Message-IDs were signed; `"0s"` for never.
    #[serde(default = "default_unsigned_grace", deserialize_with = "duration")]
    pub unsigned_grace: TimeDelta,
    /// The bearer token `POST /hooks/bounce` requires, from one of these; without one the
    /// hook is off.
    #[serde(default)]
    pub webhook_secret_env: Option<String>,
    #[serde(default)]
    pub webhook_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub webhook_secret_credential: Option<String>,
}
impl Default for BouncesConfig {
    fn default() -> Self {
        BouncesConfig {
            soft_bounce_limit: default_soft_bounce_limit(),
            unsigned_grace: default_unsigned_grace(),
            webhook_secret_env: None,
            webhook_secret_file: None,
            webhook_secret_credential: None,
        }
    }
}
fn default_soft_bounce_limit() -> i64 {
    3
}
/// Longer than an MTA keeps retrying (Postfix and Exim give up after 5 days), so every bounce
/// of a message sent before the upgrade still arrives within it.
fn default_unsigned_grace() -> TimeDelta {
    TimeDelta::days(7)
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

/// The owner's web page on the HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// Serve the page at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The owner's password as an Argon2 PHC string (`touchpoint hash-password` prints one).
    /// Without it the page is served only to browsers on this machine (loopback), without login;
    /// with it, everyone logs in.
    #[serde(default)]
    pub password_hash: Option<String>,
    /// Mark the session cookie `Secure`. Default: when `links.base_url` is https or the request
    /// came through a proxy that says `X-Forwarded-Proto: https`.
    #[serde(default)]
    pub secure_cookies: Option<bool>,
    /// How long a login lasts.
    #[serde(default = "default_session_lifetime", deserialize_with = "duration")]
    pub session_lifetime: TimeDelta,
    /// Reverse proxies (IP addresses or CIDR ranges) whose `X-Forwarded-For` / `Forwarded`
    /// name the client for the login limit. A request from one of them is never "on this
    /// machine".
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// More names the owner's page answers to (besides localhost, IP addresses, the listen
    /// address and the host of `links.base_url`), e.g. a LAN name.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}
impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            enabled: true,
            password_hash: None,
            secure_cookies: None,
            session_lifetime: default_session_lifetime(),
            trusted_proxies: Vec::new(),
            allowed_hosts: Vec::new(),
        }
    }
}
fn default_true() -> bool {
    true
}
fn default_session_lifetime() -> TimeDelta {
    TimeDelta::hours(12)
}

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

/// What went wrong loading the config, said so the operator knows what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read the config file {path}: {source} (pass --config PATH or set TOUCHPOINT_CONFIG)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Diagnostics),
    #[error("environment variable {var}: {message}")]
    Environment { var: String, message: String },
}

impl Config {
    /// Reads the config file and applies `TOUCHPOINT_*` overrides from `env`.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_source(path, &source, env)
    }

    /// Parses config text as if read from `path`.
    pub fn from_source(
        path: &Path,
        source: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let diagnostic = |error: toml::de::Error| {
            let offset = error.span().map_or(0, |span| span.start);
            let message = error.message().trim().to_string();
            ConfigError::Invalid(Diagnostics(vec![Diagnostic::at_offset(
                path, source, offset, message,
            )]))
        };
        let mut table: toml::Table = toml::from_str(source).map_err(diagnostic)?;
        let mut overridden = Vec::new();
        for (var, value) in env {
            let Some(key) = env_key(&var) else { continue };
            set_path(&mut table, &key, parse_env_value(&value)).map_err(|message| {
                ConfigError::Environment {
                    var: var.clone(),
                    message,
                }
            })?;
            overridden.push(var);
        }
        let mut config = match Config::deserialize(toml::Value::Table(table)) {
            Ok(config) => config,
            Err(merged_error) => {
                // Blame the file (every mistake, with line and column) when the file alone is
                // wrong too.
                let mistakes = file_mistakes(path, source);
                if !mistakes.is_empty() {
                    return Err(ConfigError::Invalid(Diagnostics(mistakes)));
                }
                return Err(ConfigError::Environment {
                    var: overridden.join(", "),
                    message: merged_error.message().trim().to_string(),
                });
            }
        };
        config.path = path.to_path_buf();
        config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.resolve_paths();
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self) {
        let base = self.base_dir.clone();
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        resolve(&mut self.rules.dir);
        resolve(&mut self.templates.dir);
        resolve(&mut self.transport.file.dir);
        for token in &mut self.api.tokens {
            if let Some(file) = &mut token.token_file {
                resolve(file);
            }
        }
        if let Some(file) = &mut self.transport.smtp.password_file {
            resolve(file);
        }
        let dkim_key = self.dkim.as_mut().and_then(|d| d.key_file.as_mut());
        for file in [
            self.links.secret_file.as_mut(),
            self.bounces.webhook_secret_file.as_mut(),
            dkim_key,
        ]
        .into_iter()
        .flatten()
        {
            resolve(file);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(message) = crate::transport::parse_mailbox(&self.sender.from) {
            problems.push(format!("sender.from: {message}"));
        }
        if self.transport.smtp.pool_size == 0 {
            problems.push("transport.smtp.pool_size: expected at least 1".into());
        }
        if self.delivery.batch_size == 0 {
            problems.push("delivery.batch_size: expected at least 1".into());
        }
        if self.delivery.max_attempts == 0 {
            problems.push("delivery.max_attempts: expected at least 1".into());
        }
        // Only SMTP sends can stall for the SMTP timeout; the file transport has none.
        if self.transport.kind == TransportKind::Smtp
            && self.delivery.lease <= self.transport.smtp.timeout * 2
        {
            problems.push(format!(
                "delivery.lease ({}) must be longer than twice transport.smtp.timeout ({}), so a claim \
                 cannot expire while its message is being sent",
                crate::rules::format_duration(self.delivery.lease),
                crate::rules::format_duration(self.transport.smtp.timeout)
            ));
        }
        if let Some(hash) = &self.web.password_hash
            && let Err(message) = crate::web::auth::check_hash(hash)
        {
            problems.push(format!("web.password_hash: {message}"));
        }
        problems.extend(self.api.problems());
        if self.web.session_lifetime <= TimeDelta::zero() {
            problems.push("web.session_lifetime: expected more than 0s".into());
        }
        problems.extend(self.http_problems());
        for proxy in &self.web.trusted_proxies {
            if let Err(message) = crate::web::client::Cidr::parse(proxy) {
                problems.push(format!("web.trusted_proxies: {message}"));
            }
        }
        if let Err(message) = DatabaseUrl::parse(self.database.url.expose(), &self.base_dir) {
            problems.push(format!("database.url: {message}"));
        }
        problems.extend(crate::sources::validate(&self.sources, &self.base_dir));
        if problems.is_empty() {
            return Ok(());
        }
        let list = problems
            .into_iter()
            .map(|m| Diagnostic::whole_file(&self.path, m))
            .collect();
        Err(ConfigError::Invalid(Diagnostics(list)))
    }

    fn http_problems(&self) -> Vec<String> {
        let http = &self.http;
        let mut problems = Vec::new();
        if http.max_connections == 0 {
            problems.push("http.max_connections: expected at least 1".into());
        }
        for (key, value) in [
            ("header_read_timeout", http.header_read_timeout),
            ("body_read_timeout", http.body_read_timeout),
            ("idle_timeout", http.idle_timeout),
        ] {
            if value <= TimeDelta::zero() {
                problems.push(format!("http.{key}: expected more than 0s"));
            }
        }
        problems
    }

    /// The database to use, with a relative SQLite path resolved.
    pub fn database_url(&self) -> DatabaseUrl {
        // Validated in `validate`; a config that got here parses.
        DatabaseUrl::parse(self.database.url.expose(), &self.base_dir)
            .unwrap_or(DatabaseUrl::Sqlite(self.base_dir.join("var/touchpoint.db")))
    }

    /// The SMTP password from the environment, a file or a systemd credential, if configured.
    pub fn smtp_password(&self) -> Result<Option<Secret>, String> {
        let smtp = &self.transport.smtp;
        let source = SecretSource {
            env: smtp.password_env.clone(),
            file: smtp.password_file.clone(),
            credential: smtp.password_credential.clone(),
        };
        source.read("the SMTP password")
    }

    pub fn link_secret_source(&self) -> SecretSource {
        let l = &self.links;
        SecretSource {
            env: l.secret_env.clone(),
            file: l.secret_file.clone(),
            credential: l.secret_credential.clone(),
        }
    }

    /// The configured secret that signs links, if any (at least 16 bytes).
    pub fn link_secret(&self) -> Result<Option<Secret>, String> {
        long_enough(
            self.link_secret_source().read("links.secret")?,
            "links.secret",
        )
    }

    pub fn bounce_webhook_secret(&self) -> Result<Option<Secret>, String> {
        let b = &self.bounces;
        let source = SecretSource {
            env: b.webhook_secret_env.clone(),
            file: b.webhook_secret_file.clone(),
            credential: b.webhook_secret_credential.clone(),
        };
        long_enough(
            source.read("bounces.webhook_secret")?,
            "bounces.webhook_secret",
        )
    }

    /// The ingest API's tokens by name, each read from its source and at least
    /// `MIN_SECRET_BYTES` long; every problem at once, one per line. Empty: the API is off.
    pub fn api_tokens(&self) -> Result<Vec<(String, Secret)>, String> {
        let mut tokens: Vec<(String, Secret)> = Vec::new();
        let mut problems = Vec::new();
        for token in &self.api.tokens {
            let what = format!("api.tokens {:?}", token.name);
            match token
                .source()
                .read(&what)
                .and_then(|s| long_enough(s, &what))
            {
                Ok(Some(secret)) if tokens.iter().any(|(_, other)| *other == secret) => problems
                    .push(format!(
                        "{what}: the same token as another entry; give each application its own"
                    )),
                Ok(Some(secret)) => tokens.push((token.name.clone(), secret)),
                Ok(None) => {}
                Err(message) => problems.push(message),
            }
        }
        if problems.is_empty() {
            Ok(tokens)
        } else {
            Err(problems.join("\n"))
        }
    }

    /// Where customers reach the HTTP listener, for links in messages; `None` when neither
    /// `links.base_url` nor `http.listen` is set.
    pub fn links_base_url(&self) -> Option<String> {
        match &self.links.base_url {
            Some(url) => Some(url.trim_end_matches('/').to_string()),
            None if self.http.listen.trim().is_empty() => None,
            None => Some(format!("http://{}", self.http.listen.trim())),
        }
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

fn long_enough(secret: Option<Secret>, what: &str) -> Result<Option<Secret>, String> {
    match secret {
        Some(secret) if secret.expose().trim().len() < MIN_SECRET_BYTES => Err(format!(
            "{what} is {} bytes long; it must be at least {MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32`)",
            secret.expose().trim().len()
        )),
        other => Ok(other),
    }
}

/// Every mistake serde finds in the config text, not only the first: each one found is
/// commented out (byte offsets kept) and the text read again, until it reads or a mistake could
/// be a consequence of the commenting (a required key now missing, a broken multi-line value).
fn file_mistakes(path: &Path, source: &str) -> Vec<Diagnostic> {
    let mut masked = source.to_string();
    let mut found: Vec<Diagnostic> = Vec::new();
    for _ in 0..100 {
        if !found.is_empty() && toml::from_str::<toml::Table>(&masked).is_err() {
            break;
        }
        let Err(error) = toml::from_str::<Config>(&masked) else {
            break;
        };
        let message = error.message().trim().to_string();
        let Some(span) = error.span() else {
            if found.is_empty() {
                found.push(Diagnostic::at_offset(path, source, 0, message));
            }
            break;
        };
        let diagnostic = Diagnostic::at_offset(path, source, span.start, message);
        let repeated = found.iter().any(|d| d.line == diagnostic.line);
        if !found.is_empty() && (diagnostic.message.starts_with("missing field") || repeated) {
            break;
        }
        found.push(diagnostic);
        // Comment out the line; a table header takes its keys with it, so that they are not
        // read as keys of the table above.
        let start = masked[..span.start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = |from: usize| masked[from..].find('\n').map_or(masked.len(), |i| from + i);
        let mut end = line_end(span.start);
        if masked[start..end].trim_start().starts_with('[') {
            while end < masked.len() && !masked[end + 1..].trim_start().starts_with('[') {
                end = line_end(end + 1);
            }
        }
        let blank: String = masked[start..end]
            .char_indices()
            .map(|(i, c)| match c {
                '\n' => "\n".to_string(),
                _ if i == 0 => format!("#{}", " ".repeat(c.len_utf8() - 1)),
                _ => " ".repeat(c.len_utf8()),
            })
            .collect();
        masked.replace_range(start..end, &blank);
    }
    found.sort_by_key(|d| (d.line, d.column));
    found
}

/// `TOUCHPOINT_DATABASE__URL` -> `["database", "url"]`.
fn env_key(var: &str) -> Option<Vec<String>> {
    if ENV_NOT_KEYS.contains(&var) {
        return None;
    }
    let rest = var.strip_prefix(ENV_PREFIX)?;
    Some(rest.split("__").map(str::to_ascii_lowercase).collect())
}

/// Environment values are TOML values where they parse as one (`25`, `true`), else strings.
fn parse_env_value(text: &str) -> toml::Value {
    let wrapped = format!("v = {text}");
    match toml::from_str::<toml::Table>(&wrapped) {
        Ok(mut table) => table
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(text.into())),
        Err(_) => toml::Value::String(text.into()),
    }
}

fn set_path(table: &mut toml::Table, key: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = key.split_last() else {
        return Err("names no config key".into());
    };
    let mut current = table;
    for part in parents {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{part}` is a value in the config file, not a table"))?;
    }
    current.insert(last.clone(), value);
    Ok(())
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

/// `config/../var/x` -> `var/x`, without touching the file system (the path may not exist yet).
fn normalize(path: &Path) -> PathBuf {
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

pub(crate) fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<TimeDelta, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
}

fn timezone<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Tz, D::Error> {
    let text = String::deserialize(deserializer)?;
    crate::calendar::parse_timezone(&text).map_err(serde::de::Error::custom)
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

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[sender]
from = "Acme <hello@acme.example>"
[business]
name = "Acme"
address = "1 Main St, Springfield"
"#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_source(Path::new("/etc/tp/touchpoint.toml"), text, env)
    }

    #[test]
    fn defaults_resolve_relative_to_the_config_directory() {
        let config = load(MINIMAL, &[]).unwrap();
        assert_eq!(config.rules.dir, PathBuf::from("/etc/tp/rules"));
        assert_eq!(
            config.database_url(),
            DatabaseUrl::Sqlite("/etc/tp/var/touchpoint.db".into())
        );
        assert_eq!(config.transport.kind, TransportKind::File);
        assert_eq!(config.defaults.timezone, Tz::UTC);
    }

    #[test]
    fn environment_overrides_nested_keys_with_typed_values() {
        let env = [
            (
                "TOUCHPOINT_DATABASE__URL",
                "postgres://postgres@127.0.0.1/tp",
            ),
            ("TOUCHPOINT_TRANSPORT__SMTP__PORT", "2525"),
            ("TOUCHPOINT_TRANSPORT__KIND", "smtp"),
            ("TOUCHPOINT_CONFIG", "/ignored"),
            ("HOME", "/root"),
        ];
        let config = load(MINIMAL, &env).unwrap();
        assert_eq!(
            config.database_url(),
            DatabaseUrl::Postgres("postgres://postgres@127.0.0.1/tp".into())
        );
        assert_eq!(config.transport.smtp.port, 2525);
        assert_eq!(config.transport.kind, TransportKind::Smtp);
    }

    #[test]
    fn unknown_keys_are_reported_with_line_and_column() {
        let text = format!("{MINIMAL}\n[transport]\nknd = \"smtp\"\n");
        let error = load(&text, &[]).unwrap_err().to_string();
        assert!(error.starts_with("/etc/tp/touchpoint.toml:9:1:"), "{error}");
        assert!(error.contains("unknown field `knd`"), "{error}");
    }

    #[test]
    fn a_bad_environment_override_names_the_variable() {
        let error = load(MINIMAL, &[("TOUCHPOINT_TRANSPORT__SMTP__PORT", "lots")])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("TOUCHPOINT_TRANSPORT__SMTP__PORT"),
            "{error}"
        );
        let error = load(MINIMAL, &[("TOUCHPOINT_NOPE", "1")])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("TOUCHPOINT_NOPE") && error.contains("unknown field `nope`"),
            "{error}"
        );
    }

    #[test]
    fn bad_values_say_what_is_expected() {
        let text = format!("{MINIMAL}\n[defaults]\ntimezone = \"Mars/Olympus\"\n");
        let error = load(&text, &[]).unwrap_err().to_string();
        assert!(error.contains("touchpoint.toml:9:"), "{error}");
        let text = format!("{MINIMAL}\n[delivery]\nlease = \"2x\"\n");
        let error = load(&text, &[]).unwrap_err().to_string();
        assert!(
            error.contains("touchpoint.toml:9:9") && error.contains("\"2x\" is not a duration"),
            "{error}"
        );
        let error = load(
            &MINIMAL.replace("hello@acme.example", "not an address"),
            &[],
        )
        .unwrap_err();
        assert!(error.to_string().contains("sender.from"), "{error}");
    }

    #[test]
    fn http_limits_have_defaults_and_bad_values_are_named() {
        let config = load(MINIMAL, &[]).unwrap();
        assert_eq!(config.http.max_connections, 512);
        assert_eq!(config.http.header_read_timeout, TimeDelta::seconds(10));
        assert_eq!(config.http.body_read_timeout, TimeDelta::seconds(30));
        assert_eq!(config.http.idle_timeout, TimeDelta::seconds(75));
        let env = [
            ("TOUCHPOINT_HTTP__MAX_CONNECTIONS", "0"),
            ("TOUCHPOINT_HTTP__IDLE_TIMEOUT", "0s"),
        ];
        let error = load(MINIMAL, &env).unwrap_err().to_string();
        assert!(
            error.contains("http.max_connections") && error.contains("http.idle_timeout"),
            "{error}"
        );
        let text = format!("{MINIMAL}\n[web]\ntrusted_proxies = [\"10.0.0.0/8\", \"proxy.lan\"]\n");
        let error = load(&text, &[]).unwrap_err().to_string();
        assert!(
            error.contains("web.trusted_proxies") && error.contains("proxy.lan"),
            "{error}"
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let env = [("TOUCHPOINT_DATABASE__URL", "postgres://app:hunter2@db/tp")];
        let config = load(MINIMAL, &env).unwrap();
        let shown = format!("{config:?} {:?}", config.database_url());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(config.database_url().describe(), "PostgreSQL db/tp");
    }
}
