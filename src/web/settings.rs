//! The web page's own settings: `[web]`, and what of it can be checked without the rest of
//! the config.

use chrono::TimeDelta;
use serde::Deserialize;

use crate::settings::duration;

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

impl WebConfig {
    /// Mistakes in `[web]` alone: a password hash that is not one, a session that ends at once,
    /// a trusted proxy that is not an address or range.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(hash) = &self.password_hash
            && let Err(message) = super::auth::check_hash(hash)
        {
            problems.push(format!("web.password_hash: {message}"));
        }
        if self.session_lifetime <= TimeDelta::zero() {
            problems.push("web.session_lifetime: expected more than 0s".into());
        }
        for proxy in &self.trusted_proxies {
            if let Err(message) = super::client::Cidr::parse(proxy) {
                problems.push(format!("web.trusted_proxies: {message}"));
            }
        }
        problems
    }
}
