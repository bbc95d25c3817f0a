//! The daemon's configuration: `touchpoint.toml`, with every key overridable from the
//! environment (`TOUCHPOINT_DATABASE__URL` for `database.url`). Relative paths are relative to the
//! config file's directory. Unknown keys are errors.
//!
//! Each subsystem owns its settings type (`[database]` the store's, `[transport]`, `[sender]`
//! and `[dkim]` the transport's, `[web]` the page's, `[http]` the listener's, `[templates]`
//! render's, `[sources.*]` the sources'); this module reads the file and the environment,
//! gathers them into [`Config`], checks what spans several of them, and reports every mistake
//! with its file, line and column. The types are re-exported here under their old paths.

use std::path::{Path, PathBuf};

use chrono::TimeDelta;
use chrono_tz::Tz;
use serde::Deserialize;

use crate::diag::{Diagnostic, Diagnostics};
use crate::listener::HttpConfig;
use crate::render::Business;
use crate::render::TemplatesConfig;
use crate::settings::{Secret, SecretSource};
use crate::settings::{duration, long_enough, normalize, timezone};
use crate::store::{DatabaseConfig, DatabaseUrl};
use crate::transport::settings::{DkimConfig, SenderConfig, TransportConfig, TransportKind};
use crate::web::WebConfig;

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
    /// `[replies]`: the tagged Reply-To and `touchpoint inbound`.
    #[serde(default)]
    pub replies: crate::replies::RepliesConfig,
    #[serde(default)]
    pub dkim: Option<DkimConfig>,
    /// `[digest]`: the owner's summary on a schedule.
    #[serde(default)]
    pub digest: Option<crate::digest::DigestConfig>,
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
pub struct DefaultsConfig {
    /// The time zone of customers who have none.
    #[serde(default = "default_timezone", deserialize_with = "timezone")]
    pub timezone: Tz,
    /// `expire_after` of rules that do not set one: a message this late is skipped, and a new
    /// rule does not reach back further than this.
    #[serde(default = "default_expire_after", deserialize_with = "duration")]
    pub expire_after: TimeDelta,
    /// `frequency_limit = { max = 1, per = "3d" }`: for rules without their own.
    #[serde(default, deserialize_with = "frequency_limit")]
    pub frequency_limit: Option<crate::rules::FrequencyLimit>,
    /// `quiet_dates = ["12-25", "2026-12-31"]`: local dates on which nothing goes out.
    #[serde(default, deserialize_with = "quiet_dates")]
    pub quiet_dates: Vec<crate::calendar::QuietDate>,
}
impl Default for DefaultsConfig {
    fn default() -> Self {
        DefaultsConfig {
            timezone: default_timezone(),
            expire_after: default_expire_after(),
            frequency_limit: None,
            quiet_dates: Vec::new(),
        }
    }
}
impl DefaultsConfig {
    /// What the defaults say about every rule.
    pub fn rules(&self) -> crate::rules::RuleDefaults {
        crate::rules::RuleDefaults {
            frequency_limit: self.frequency_limit,
            quiet_dates: self.quiet_dates.clone(),
        }
    }
}

/// Serde: `{ max = N, per = DURATION }`.
fn frequency_limit<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<crate::rules::FrequencyLimit>, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Written {
        max: i64,
        #[serde(deserialize_with = "duration")]
        per: TimeDelta,
    }
    let written = Written::deserialize(deserializer)?;
    crate::rules::FrequencyLimit::new(written.max, written.per)
        .map(Some)
        .map_err(|why| serde::de::Error::custom(format!("bad frequency_limit: {why}")))
}

/// Serde: a list of `"MM-DD"` and `"YYYY-MM-DD"`.
fn quiet_dates<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<crate::calendar::QuietDate>, D::Error> {
    let texts = Vec::<String>::deserialize(deserializer)?;
    let mut dates = Vec::new();
    for text in texts {
        let date = crate::calendar::QuietDate::parse(&text)
            .map_err(|why| serde::de::Error::custom(format!("in quiet_dates: {why}")))?;
        if !dates.contains(&date) {
            dates.push(date);
        }
    }
    Ok(dates)
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
    /// How far ahead anniversaries are planned: one further away gets its message from the
    /// full pass that first finds it within this, not a year early (a million weddings need
    /// not be a million rows). Must be longer than `reconcile_every`.
    #[serde(default = "default_horizon", deserialize_with = "duration")]
    pub horizon: TimeDelta,
}
impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            interval: default_plan_interval(),
            reconcile_every: default_reconcile(),
            horizon: default_horizon(),
        }
    }
}
fn default_horizon() -> TimeDelta {
    TimeDelta::days(35)
}
fn default_plan_interval() -> TimeDelta {
    TimeDelta::seconds(2)
}
fn default_reconcile() -> TimeDelta {
    TimeDelta::minutes(5)
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

impl<'a> From<&'a Config> for crate::playbook::Origin<'a> {
    fn from(config: &'a Config) -> Self {
        crate::playbook::Origin {
            rules_dir: &config.rules.dir,
            templates_dir: &config.templates.dir,
            business: &config.business,
            sources: &config.sources,
            base_dir: &config.base_dir,
            config_path: &config.path,
            defaults: config.defaults.rules(),
            digest: config.digest.as_ref(),
            default_timezone: config.defaults.timezone,
        }
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
        if let Some(imap) = &mut self.replies.imap {
            for file in [imap.password_file.as_mut(), imap.ca_file.as_mut()]
                .into_iter()
                .flatten()
            {
                resolve(file);
            }
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
        if self.planner.horizon <= self.planner.reconcile_every {
            problems.push(format!(
                "planner.horizon ({}) must be longer than planner.reconcile_every ({}), so an \
                 anniversary is planned before it is due",
                crate::rules::format_duration(self.planner.horizon),
                crate::rules::format_duration(self.planner.reconcile_every)
            ));
        }
        problems.extend(self.web.problems());
        if let Err(message) = self.replies.address() {
            problems.push(message);
        }
        if let Some(imap) = &self.replies.imap {
            problems.extend(imap.problems());
        }
        problems.extend(self.api.problems());
        problems.extend(self.http_problems());
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

    /// What the rest of the daemon may still open, for the HTTP listener's descriptor budget.
    pub fn other_descriptors(&self) -> crate::listener::OtherDescriptors {
        crate::listener::OtherDescriptors {
            database_connections: self.database.max_connections,
            database_is_sqlite: matches!(self.database_url(), DatabaseUrl::Sqlite(_)),
            smtp_connections: self.transport.smtp.pool_size,
            source_connections: self.sources.values().map(|s| s.max_connections).collect(),
        }
    }

    /// The database to use, with a relative SQLite path resolved.
    pub fn database_url(&self) -> DatabaseUrl {
        // Validated in `validate`; a config that got here parses.
        DatabaseUrl::parse(self.database.url.expose(), &self.base_dir)
            .unwrap_or(DatabaseUrl::Sqlite(self.base_dir.join("var/touchpoint.db")))
    }

    /// The SMTP password from the environment, a file or a systemd credential, if configured.
    pub fn smtp_password(&self) -> Result<Option<Secret>, String> {
        self.transport.smtp.password()
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
    fn the_planning_horizon_defaults_to_35_days_and_must_outlast_a_reconciliation() {
        assert_eq!(
            load(MINIMAL, &[]).unwrap().planner.horizon,
            TimeDelta::days(35)
        );
        let text = format!("{MINIMAL}\n[planner]\nhorizon = \"10d\"\n");
        assert_eq!(
            load(&text, &[]).unwrap().planner.horizon,
            TimeDelta::days(10)
        );
        let text = format!("{MINIMAL}\n[planner]\nhorizon = \"1h\"\nreconcile_every = \"2h\"\n");
        let error = load(&text, &[]).unwrap_err().to_string();
        assert!(
            error.contains("planner.horizon (1h) must be longer than planner.reconcile_every (2h)"),
            "{error}"
        );
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
    fn frequency_limit_and_quiet_dates_in_defaults() {
        let text = format!(
            "{MINIMAL}\n[defaults]\nfrequency_limit = {{ max = 2, per = \"3d\" }}\nquiet_dates = [\"12-25\", \"2026-12-31\"]\n"
        );
        let config = load(&text, &[]).unwrap();
        let defaults = config.defaults.rules();
        assert_eq!(
            defaults.frequency_limit,
            Some(crate::rules::FrequencyLimit {
                max: 2,
                per: TimeDelta::days(3)
            })
        );
        assert_eq!(defaults.quiet_dates.len(), 2);
        for (bad, says) in [
            ("frequency_limit = { max = 0, per = \"3d\" }", "from 1 up"),
            (
                "frequency_limit = { max = 1, per = \"0s\" }",
                "longer than 0s",
            ),
            ("frequency_limit = { max = 1 }", "missing field `per`"),
            (
                "frequency_limit = { max = 1, per = \"3d\", min = 2 }",
                "unknown field `min`",
            ),
            ("quiet_dates = [\"12-32\"]", "no such date \"12-32\""),
        ] {
            let text = format!("{MINIMAL}\n[defaults]\n{bad}\n");
            let error = load(&text, &[]).unwrap_err().to_string();
            assert!(
                error.contains("touchpoint.toml:9:") && error.contains(says),
                "{bad}: {error}"
            );
        }
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
