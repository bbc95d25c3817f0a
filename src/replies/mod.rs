//! Replies become events: a customer's answer to one of our messages, piped in by the MTA
//! (`touchpoint inbound`), is tied to its message and customer and recorded as a `replied`
//! event that rules can react to (`unless = [{ event = "replied", since = "trigger" }]`).
//!
//! A reply is tied to its message by the signed tag in the Reply-To address we sent
//! (`replies+42.TAG@acme.example`, see [`crate::links::MessageTags::reply`]), else by its
//! `In-Reply-To`/`References` naming one of our Message-IDs (unguessable, so only someone who
//! saw the message can name it), else to a customer alone by the sender's address. A forged
//! tag changes nothing. Automatic answers (out-of-office notes) are recorded as
//! `auto_replied`, so they never stop a follow-up.

pub mod imap;
mod imap_client;
mod parse;
mod watch;

use lettre::Address;
use sha2::Digest as _;

pub use imap::ImapConfig;
pub use parse::{Inbound, SNIPPET_CHARS, parse_inbound, snippet};
pub use watch::ImapWatcher;

use crate::bounce::sent;
use crate::links::{self, MessageTags};
use crate::store::{Event, LogEntry, SharedStore, StoreError};

/// The event kind of a customer's reply.
pub const REPLIED: &str = "replied";
/// The event kind of an automatic answer (out of office...).
pub const AUTO_REPLIED: &str = "auto_replied";

/// `[replies]`: where customers' replies go.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepliesConfig {
    /// With it, every message carries `Reply-To: replies+ID.TAG@domain`; the MTA pipes that
    /// address to `touchpoint inbound`.
    #[serde(default)]
    pub address: Option<String>,
    /// `[replies.imap]`: a hosted mailbox the daemon watches for replies instead.
    #[serde(default)]
    pub imap: Option<ImapConfig>,
}

impl RepliesConfig {
    /// The local part of `replies.address`: tags are read only from addresses with it.
    pub fn reply_user(&self) -> Result<Option<String>, String> {
        Ok(self.address()?.map(|a| a.user().to_string()))
    }

    /// `replies.address`, checked.
    pub fn address(&self) -> Result<Option<Address>, String> {
        let Some(text) = &self.address else {
            return Ok(None);
        };
        let address: Address = text.trim().parse().map_err(|e| {
            format!("replies.address {text:?} is not an address ({e}); expected e.g. \"replies@acme.example\"")
        })?;
        if address.user().contains('+') {
            return Err(format!(
                "replies.address {text:?} has a '+' in its local part; touchpoint adds \
                 \"+ID.TAG\" itself, so give the plain address"
            ));
        }
        Ok(Some(address))
    }
}

/// `replies@acme.example` -> `replies+42.TAG@acme.example`, TAG signing the message id.
pub fn reply_address(base: &Address, message: i64, tags: &MessageTags) -> Option<Address> {
    crate::bounce::tagged_address(base, message, &tags.reply(message))
}

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("cannot read the mail: {0}; nothing recorded")]
    Unparseable(String),
    /// A reply tag we did not sign: forged, tampered with, or from another links secret.
    #[error(
        "not believed: the reply address names message {message} with a tag we did not make \
         (forged, or signed with another links secret); nothing recorded"
    )]
    ForgedTag { message: i64 },
    #[error("a reply to a test send (touchpoint preview --send-to); nothing recorded")]
    TestSend,
    #[error(
        "no message or customer matches this mail (from {from}); nothing recorded. It names \
         none of our messages by reply tag or In-Reply-To/References, and its sender is {why}"
    )]
    NoMatch { from: String, why: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reads one raw mail and records it: the one path for `touchpoint inbound` and the IMAP
/// watcher. `recipients` are the envelope's (none from a mailbox); `reply_user` is
/// [`RepliesConfig::reply_user`]. A mail seen before is recorded once (see [`record`]).
pub async fn process(
    store: &SharedStore,
    tags: &MessageTags,
    raw: &[u8],
    recipients: &[String],
    reply_user: Option<&str>,
) -> Result<Recorded, InboundError> {
    let inbound = parse_inbound(raw, recipients, reply_user)?;
    record(store, tags, &inbound, raw).await
}

/// What was recorded for a mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub kind: &'static str,
    pub customer: String,
    pub message: Option<i64>,
    pub rule: Option<String>,
    /// How the mail was tied to its customer: "tag", "in-reply-to" or "sender".
    pub matched_by: &'static str,
    /// The mail was recorded before (the MTA delivered it twice): counted once.
    pub repeated: bool,
}

impl Recorded {
    /// One line for the operator: what was recorded, for whom, and how it was matched.
    pub fn describe(&self) -> String {
        format!(
            "recorded {} for customer {} (message {}, rule {}, matched by {}){}",
            self.kind,
            self.customer,
            self.message.map_or_else(|| "-".into(), |m| m.to_string()),
            self.rule.as_deref().unwrap_or("-"),
            self.matched_by,
            if self.repeated {
                "; a repeat of a mail it had, counted once"
            } else {
                ""
            }
        )
    }
}

/// Who a mail is from and what it answers.
struct Match {
    customer: String,
    message: Option<LogEntry>,
    matched_by: &'static str,
}

/// Ties `inbound` to its message and customer and records the event. `raw` identifies the
/// mail when it has no Message-ID, so a redelivery is recorded once.
pub async fn record(
    store: &SharedStore,
    tags: &MessageTags,
    inbound: &Inbound,
    raw: &[u8],
) -> Result<Recorded, InboundError> {
    let found = match_inbound(store, tags, inbound).await?;
    let kind = if inbound.auto { AUTO_REPLIED } else { REPLIED };
    let rule = found.message.as_ref().map(|m| m.rule.clone());
    let message = found.message.as_ref().map(|m| m.id);
    let event = Event {
        id: event_id(inbound, raw),
        customer_id: found.customer.clone(),
        kind: kind.into(),
        occurred_at: chrono::Utc::now(),
        data: serde_json::json!({
            "rule": rule,
            "message_id": message,
            "snippet": inbound.snippet,
            "auto": inbound.auto,
        }),
    };
    let new = store.insert_events(std::slice::from_ref(&event)).await? > 0;
    if new && let Some(message) = message {
        let detail = serde_json::json!({ "snippet": inbound.snippet, "event": event.id });
        store
            .record_message_event_once(message, kind, &event.id, &detail)
            .await?;
    }
    Ok(Recorded {
        kind,
        customer: found.customer,
        message,
        rule,
        matched_by: found.matched_by,
        repeated: !new,
    })
}

/// The same for every delivery of one mail: from its Message-ID, else its bytes.
fn event_id(inbound: &Inbound, raw: &[u8]) -> String {
    let digest = match &inbound.message_id {
        Some(id) => sha2::Sha256::digest(id.as_bytes()),
        None => sha2::Sha256::digest(raw),
    };
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("reply-{hex}")
}

async fn match_inbound(
    store: &SharedStore,
    tags: &MessageTags,
    inbound: &Inbound,
) -> Result<Match, InboundError> {
    if let Some(tagged) = inbound.reply_tags.first() {
        let message = tagged.message;
        if links::is_test_send(message) {
            return Err(InboundError::TestSend);
        }
        let signed = tagged
            .tag
            .as_deref()
            .is_some_and(|t| tags.reply_matches(message, t));
        if !signed {
            return Err(InboundError::ForgedTag { message });
        }
        if let Some(entry) = sent(store.message(message).await?) {
            return Ok(by_message(entry, "tag"));
        }
    }
    for id in &inbound.answers {
        if let Some(entry) = sent(store.message_by_message_id(id).await?) {
            return Ok(by_message(entry, "in-reply-to"));
        }
    }
    let customers = store.customers_by_email(&inbound.from, 2).await?;
    match customers.as_slice() {
        [one] => Ok(Match {
            customer: one.id.clone(),
            message: None,
            matched_by: "sender",
        }),
        [] => Err(InboundError::NoMatch {
            from: inbound.from.clone(),
            why: "no customer's address",
        }),
        _ => Err(InboundError::NoMatch {
            from: inbound.from.clone(),
            why: "the address of several customers",
        }),
    }
}

fn by_message(entry: LogEntry, matched_by: &'static str) -> Match {
    Match {
        customer: entry.customer_id.clone(),
        message: Some(entry),
        matched_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reply_address_carries_the_message_and_its_signed_tag() {
        let tags = MessageTags::new(b"test secret");
        let base: Address = "replies@acme.example".parse().unwrap();
        let address = reply_address(&base, 42, &tags).unwrap();
        assert_eq!(
            address.to_string(),
            format!("replies+42.{}@acme.example", tags.reply(42))
        );
        let parsed = crate::bounce::parse_verp(address.as_ref()).unwrap();
        assert_eq!(parsed.message, 42);
        assert!(tags.reply_matches(42, parsed.tag.as_deref().unwrap()));
    }

    #[test]
    fn a_bad_reply_address_is_explained() {
        let config = |a: &str| RepliesConfig {
            address: Some(a.into()),
            ..RepliesConfig::default()
        };
        let error = config("not an address").address().unwrap_err();
        assert!(
            error.contains("replies.address") && error.contains("expected"),
            "{error}"
        );
        let error = config("replies+x@acme.example").address().unwrap_err();
        assert!(error.contains("'+'"), "{error}");
        assert!(
            config(" replies@acme.example ")
                .address()
                .unwrap()
                .is_some()
        );
        assert!(RepliesConfig::default().address().unwrap().is_none());
    }
}
