//! What the running daemon's parts share: the state every HTTP handler may look at
//! ([`Shared`]) and the ingest API's tokens. The daemon makes it; the HTTP listener, the ingest
//! API and the owner's page import it from here, not from the daemon (which sits above them).

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::bounce::BounceRules;
use crate::links::LinkSigner;
use crate::metrics::{Health, MetricsCache};
use crate::playbook::Playbook;
use crate::settings::Secret;
use crate::store::SharedStore;

/// Everything the HTTP handlers may look at. `W` is the owner's page's own state
/// (the web module's `Web`), which lives above this module; `Shared` only carries it.
pub struct Shared<W> {
    pub store: SharedStore,
    pub health: Arc<Health>,
    pub playbook: watch::Receiver<Arc<Playbook>>,
    pub links: Option<LinkSigner>,
    /// The bearer token of `POST /hooks/bounce`; `None` turns the hook off.
    pub bounce_webhook_secret: Option<Secret>,
    /// What a bounce or complaint report must show to be believed, for the webhook.
    pub bounce_rules: BounceRules,
    /// The bearer tokens of the ingest API; none turns it off.
    pub api_tokens: Arc<ApiTokens>,
    /// The owner's web page; `None` when `web.enabled` is false.
    pub web: Option<Arc<W>>,
    /// The /metrics values that scan the messages table, shared between scrapes.
    pub metrics: Arc<MetricsCache>,
}

// Not derived: deriving would ask `W: Clone`, but only the `Arc<W>` is cloned.
impl<W> Clone for Shared<W> {
    fn clone(&self) -> Self {
        Shared {
            store: self.store.clone(),
            health: self.health.clone(),
            playbook: self.playbook.clone(),
            links: self.links.clone(),
            bounce_webhook_secret: self.bounce_webhook_secret.clone(),
            bounce_rules: self.bounce_rules.clone(),
            api_tokens: self.api_tokens.clone(),
            web: self.web.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// The configured tokens, kept only as SHA-256 digests: comparing digests takes the same time
/// whatever the presented token's length or how much of it matches.
#[derive(Clone, Default)]
pub struct ApiTokens {
    tokens: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for ApiTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.tokens.iter().map(|(name, _)| name))
            .finish()
    }
}

impl ApiTokens {
    pub fn new(tokens: &[(String, Secret)]) -> ApiTokens {
        let tokens = tokens
            .iter()
            .map(|(name, secret)| (name.clone(), digest(secret.expose().trim())))
            .collect();
        ApiTokens { tokens }
    }

    /// No tokens: the API is off.
    pub fn is_off(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn names(&self) -> Vec<&str> {
        self.tokens.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// The name of the token presented. Every token is compared, without early exits.
    pub fn identify(&self, presented: &str) -> Option<&str> {
        let presented = digest(presented);
        let mut found = None;
        for (name, expected) in &self.tokens {
            let difference = expected
                .iter()
                .zip(&presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if difference == 0 {
                found = Some(name.as_str());
            }
        }
        found
    }
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}
