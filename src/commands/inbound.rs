//! `touchpoint inbound`: one email from standard input (a Postfix pipe alias for the
//! `[replies] address`), recorded as the customer's reply.

use anyhow::Result;

use super::{BounceAnswer, envelope_recipients, open_store};
use crate::config::Config;
use crate::replies::{InboundError, parse_inbound, record};

/// Reads `raw` and records it. A mail that cannot be read or tied to anyone is logged with
/// the reason and answered `Done` (the MTA must not retry it); only an unavailable database
/// is `TryLater`.
pub async fn inbound(
    config: &Config,
    raw: &[u8],
    recipient: Option<String>,
) -> Result<BounceAnswer> {
    let recipients = envelope_recipients(recipient);
    let reply_user = config
        .replies
        .address()
        .map_err(anyhow::Error::msg)?
        .map(|a| a.user().to_string());
    let inbound = match parse_inbound(raw, &recipients, reply_user.as_deref()) {
        Ok(inbound) => inbound,
        Err(error) => return Ok(ignored(&error, raw.len())),
    };
    let store = match open_store(config).await {
        Ok(store) => store,
        Err(error) => return Ok(BounceAnswer::TryLater(format!("{error:#}"))),
    };
    let tags = match crate::daemon::link_secret(config, &store).await {
        Ok(secret) => crate::links::MessageTags::new(secret.expose().as_bytes()),
        Err(crate::daemon::DaemonError::Store(error)) => {
            return Ok(BounceAnswer::TryLater(error.to_string()));
        }
        Err(error) => return Err(error.into()),
    };
    Ok(match record(&store, &tags, &inbound, raw).await {
        Ok(done) => {
            let text = format!(
                "recorded {} for customer {} (message {}, rule {}, matched by {}){}",
                done.kind,
                done.customer,
                done.message.map_or_else(|| "-".into(), |m| m.to_string()),
                done.rule.as_deref().unwrap_or("-"),
                done.matched_by,
                if done.repeated {
                    "; a repeat of a mail it had, counted once"
                } else {
                    ""
                }
            );
            tracing::info!(customer = %done.customer, kind = done.kind, "{text}");
            BounceAnswer::Done(text)
        }
        Err(InboundError::Store(error)) => BounceAnswer::TryLater(error.to_string()),
        Err(error) => ignored(&error, raw.len()),
    })
}

/// Logged with the reason, so the operator sees what was dropped and why.
fn ignored(error: &InboundError, bytes: usize) -> BounceAnswer {
    tracing::warn!(bytes, "inbound mail ignored: {error}");
    BounceAnswer::Done(format!("ignored: {error}"))
}
