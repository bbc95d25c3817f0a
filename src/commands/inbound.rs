//! `touchpoint inbound`: one email from standard input (a Postfix pipe alias for the
//! `[replies] address`), recorded as the customer's reply.

use anyhow::Result;

use super::{BounceAnswer, envelope_recipients, open_store};
use crate::config::Config;
use crate::replies::{InboundError, process};

/// Reads `raw` and records it. A mail that cannot be read or tied to anyone is logged with
/// the reason and answered `Done` (the MTA must not retry it); only an unavailable database
/// is `TryLater`.
pub async fn inbound(
    config: &Config,
    raw: &[u8],
    recipient: Option<String>,
) -> Result<BounceAnswer> {
    let recipients = envelope_recipients(recipient);
    let reply_user = config.replies.reply_user().map_err(anyhow::Error::msg)?;
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
    // The same path as the [replies.imap] watcher's.
    Ok(
        match process(&store, &tags, raw, &recipients, reply_user.as_deref()).await {
            Ok(done) => {
                let text = done.describe();
                tracing::info!(customer = %done.customer, kind = done.kind, "{text}");
                BounceAnswer::Done(text)
            }
            Err(InboundError::Store(error)) => BounceAnswer::TryLater(error.to_string()),
            Err(error) => ignored(&error, raw.len()),
        },
    )
}

/// Logged with the reason, so the operator sees what was dropped and why.
fn ignored(error: &InboundError, bytes: usize) -> BounceAnswer {
    tracing::warn!(bytes, "inbound mail ignored: {error}");
    BounceAnswer::Done(format!("ignored: {error}"))
}
