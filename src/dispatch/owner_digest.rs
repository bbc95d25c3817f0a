//! The send path of a digest ([`crate::digest`]): no rule, customer or event to look up. It is
//! skipped when `[digest]` is gone or off, or past its expiry (the next digest says it all);
//! otherwise its figures are read now, rendered, and it goes out behind the same phase fence
//! as every other message, to the owner, whatever the suppressions and limits of customers.

use chrono::Utc;

use super::ahead::Queued;
use super::compose::{Composed, verp};
use super::guard::LookupError;
use super::{Context, deliver};
use crate::digest::{self, Digest};
use crate::playbook::Playbook;
use crate::store::{CheckLine, ClaimedMessage, Delivery, Outcome, SentContent};
use crate::transport;

/// Sends a claimed digest, or says why not.
pub(super) async fn attempt(
    context: &Context,
    playbook: &Playbook,
    queued: &Queued,
) -> Result<Option<Outcome>, LookupError> {
    let claim = &queued.claim;
    let Some(digest) = &playbook.digest else {
        return Ok(Some(Outcome::Skipped {
            reason: "the digest is off: the config has no [digest], or enabled = false".into(),
        }));
    };
    let now = Utc::now();
    if claim.expires_at.is_some_and(|expiry| now >= expiry) {
        return Ok(Some(Outcome::Skipped {
            reason: "expired: the next scheduled digest covers this period".into(),
        }));
    }
    if let Some(outcome) = context.held_back() {
        return Ok(Some(outcome));
    }
    let start = digest::period_start(&claim.detail, claim.trigger_at);
    let links = context.settings.links.clone();
    let customer_url = move |id: &str| links.as_ref().map(|l| l.customer_page(id));
    let figures = digest::figures(&context.store, start, now, &customer_url).await?;
    let composed = match compose(context, playbook, digest, claim, &figures) {
        Ok(composed) => composed,
        Err(reason) => {
            return Ok(Some(Outcome::Failed {
                reply: None,
                reason,
            }));
        }
    };
    let rule = digest.rule();
    Ok(Some(
        deliver::deliver(context, &rule, queued, digest.tz, composed).await,
    ))
}

/// The digest's email: no unsubscribe link, no tracking, no tagged Reply-To (an answer to it
/// is the owner's, not a customer's reply).
fn compose(
    context: &Context,
    playbook: &Playbook,
    digest: &Digest,
    claim: &ClaimedMessage,
    figures: &digest::Figures,
) -> Result<Composed, String> {
    let settings = &context.settings;
    let rendered = digest.render(&playbook.business, figures, figures.period_end)?;
    let message_id = transport::message_id_for(
        claim.id,
        &settings.tags.message_id(claim.id),
        digest::RULE,
        &settings.message_id_domain,
    );
    let email = transport::build_email(transport::EmailParts {
        from: &settings.from,
        reply_to: settings.reply_to.as_ref(),
        to_name: Some(playbook.business.name.as_str()),
        to_email: &digest.to,
        subject: &rendered.subject,
        text: rendered.text.clone(),
        html: rendered.html.clone(),
        message_id: message_id.clone(),
        headers: vec![("X-Touchpoint-Rule", digest::RULE.to_string())],
        dkim: settings.dkim.as_deref(),
        envelope_from: settings
            .bounce_address
            .as_ref()
            .and_then(|a| verp(a, claim.id, &settings.tags)),
    })?;
    let period = format!(
        "the digest of {} to {} ({})",
        figures
            .period_start
            .with_timezone(&digest.tz)
            .format("%Y-%m-%d %H:%M"),
        figures
            .period_end
            .with_timezone(&digest.tz)
            .format("%Y-%m-%d %H:%M"),
        digest.tz.name()
    );
    Ok(Composed {
        email,
        delivery: Delivery {
            email: digest.to.clone(),
            subject: rendered.subject,
            message_id,
        },
        content: SentContent {
            text: rendered.text,
            html: rendered.html,
            checks: vec![CheckLine {
                text: period,
                verdict: "passed".into(),
            }],
        },
    })
}
