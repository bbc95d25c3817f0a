//! Compose: the message as it will go out. Renders the rule's templates with what planning
//! fixed ([`MessageDetail`]), adds click and open tracking, the unsubscribe headers and the
//! VERP envelope sender, and keeps the bodies and the guard's checks for the owner.
//! [`render_message`] is the rendering step on its own, shared with `touchpoint preview`;
//! [`compose_draft`] is the whole of it for `preview --format eml` and test sends.

use chrono_tz::Tz;
use lettre::Address;

use super::DispatchSettings;
use super::guard::Found;
use crate::links::{self, Link, MessageTags};
use crate::playbook::Playbook;
use crate::render::rating::{self, sample_url};
use crate::render::{MessageExtras, RenderError, Rendered, message_context};
use crate::rules::{CheckRecord, MessageDetail, Recipient, Rule};
use crate::store::{ClaimedMessage, Customer, Delivery, Event, SentContent};
use crate::transport::{self, OutgoingEmail};

/// A message ready to go out.
pub(super) struct Composed {
    pub email: OutgoingEmail,
    /// Written with the "body about to go out" phase.
    pub delivery: Delivery,
    /// Kept with the message for the owner: what went out, and why it was allowed to.
    pub content: SentContent,
}

/// Renders and builds the email for a claimed message that passed its checks. `Err(reason)`
/// when it cannot be rendered or built (the message fails with that reason).
pub(super) fn compose(
    settings: &DispatchSettings,
    playbook: &Playbook,
    rule: &Rule,
    claim: &ClaimedMessage,
    found: &Found,
    checks: &CheckRecord,
) -> Result<Composed, String> {
    let detail = MessageDetail::from_json(&claim.detail);
    // A rule to the owner writes to the business about the customer.
    let to_email = playbook.recipient(rule, &found.customer.email);
    let to_name = match rule.to {
        Recipient::Customer => found.customer.name.as_deref(),
        Recipient::Owner => Some(playbook.business.name.as_str()),
    };
    let built = build(
        settings,
        playbook,
        rule,
        &Envelope {
            id: claim.id,
            draft: Draft {
                customer: &found.customer,
                event: found.event.as_ref(),
                tz: found.tz,
                detail: &detail,
            },
            to_name,
            to_email,
            subject_prefix: "",
        },
    )?;
    let delivery = Delivery {
        email: to_email.to_string(),
        subject: built.subject,
        message_id: built.email.message_id.clone(),
    };
    let content = SentContent {
        text: built.text,
        html: built.html,
        checks: super::guard::check_lines(checks),
    };
    Ok(Composed {
        email: built.email,
        delivery,
        content,
    })
}

/// What a message is rendered from: its customer and event, and what planning fixed.
pub struct Draft<'a> {
    pub customer: &'a Customer,
    pub event: Option<&'a Event>,
    /// The customer's effective time zone.
    pub tz: Tz,
    pub detail: &'a MessageDetail,
}

/// The subject of every test send begins with this.
pub const TEST_SUBJECT_PREFIX: &str = "[TEST] ";

/// The message [`compose`] would build from `draft`, under the test-send id `id` (negative,
/// see [`links::is_test_send`]) so that its links, VERP address and Message-ID name no
/// customer's message. With `test_send_to` it is addressed to that address only (no customer
/// name) and its subject starts with [`TEST_SUBJECT_PREFIX`]; without, it is addressed to the
/// customer, as it would go out.
pub fn compose_draft(
    settings: &DispatchSettings,
    playbook: &Playbook,
    rule: &Rule,
    draft: Draft<'_>,
    id: i64,
    test_send_to: Option<&str>,
) -> Result<OutgoingEmail, String> {
    debug_assert!(
        links::is_test_send(id),
        "a draft never takes a message's id"
    );
    let (to_name, to_email, subject_prefix) = match test_send_to {
        Some(address) => (None, address, TEST_SUBJECT_PREFIX),
        None => (
            draft.customer.name.as_deref(),
            playbook.recipient(rule, &draft.customer.email),
            "",
        ),
    };
    let envelope = Envelope {
        id,
        draft,
        to_name,
        to_email,
        subject_prefix,
    };
    Ok(build(settings, playbook, rule, &envelope)?.email)
}

/// One message to build: its id (a row of `messages`, or a test send's), what it is rendered
/// from, and where it goes.
struct Envelope<'a> {
    id: i64,
    draft: Draft<'a>,
    to_name: Option<&'a str>,
    to_email: &'a str,
    subject_prefix: &'a str,
}

/// The built email, and the subject and bodies kept with a sent message.
struct Built {
    email: OutgoingEmail,
    subject: String,
    text: String,
    html: String,
}

/// The one way a message is built, for the dispatcher and test sends alike: rendering, click
/// and open tracking, unsubscribe headers, VERP, DKIM.
fn build(
    settings: &DispatchSettings,
    playbook: &Playbook,
    rule: &Rule,
    envelope: &Envelope<'_>,
) -> Result<Built, String> {
    let id = envelope.id;
    let message_id = transport::message_id_for(
        id,
        &settings.tags.message_id(id),
        &rule.name,
        &settings.message_id_domain,
    );
    // The owner's mail has no unsubscribe link: it is not the customer's to stop.
    let unsubscribe_url = settings
        .links
        .as_ref()
        .filter(|_| rule.to == Recipient::Customer)
        .map(|l| l.url(&Link::Unsubscribe { message: id }));
    check_rating_links(settings, rule)?;
    let rate = |score| match &settings.links {
        Some(signer) => signer.url(&Link::Rating { message: id, score }),
        None => sample_url(score),
    };
    let customer_url = settings
        .links
        .as_ref()
        .map(|l| l.customer_page(&envelope.draft.customer.id));
    let rendered = render_message(
        playbook,
        rule,
        &MessageInputs {
            draft: &envelope.draft,
            message_id: message_id.clone(),
            unsubscribe_url: unsubscribe_url.clone(),
            rating_url: Some(&rate),
            customer_url,
        },
    )
    .map_err(|error| format!("cannot render: {error}"))?;
    let unsubscribe = unsubscribe_url.as_deref();
    let html = tracked_html(settings, rule, id, rendered.html, unsubscribe);
    let subject = format!("{}{}", envelope.subject_prefix, rendered.subject);
    let tagged_reply_to = tagged_reply_to(settings, id);
    let email = transport::build_email(transport::EmailParts {
        from: &settings.from,
        reply_to: tagged_reply_to.as_ref().or(settings.reply_to.as_ref()),
        to_name: envelope.to_name,
        to_email: envelope.to_email,
        subject: &subject,
        text: rendered.text.clone(),
        html: html.clone(),
        message_id,
        headers: extra_headers(settings, rule, unsubscribe),
        dkim: settings.dkim.as_deref(),
        envelope_from: settings
            .bounce_address
            .as_ref()
            .and_then(|a| verp(a, id, &settings.tags)),
    })?;
    Ok(Built {
        email,
        subject,
        text: rendered.text,
        html,
    })
}

/// `Reply-To: Acme Flowers <replies+42.TAG@acme.example>` with `[replies] address`, so a
/// reply names its message in a way only we can sign.
fn tagged_reply_to(settings: &DispatchSettings, id: i64) -> Option<lettre::message::Mailbox> {
    let base = settings.reply_address.as_ref()?;
    let address = crate::replies::reply_address(base, id, &settings.tags)?;
    Some(lettre::message::Mailbox::new(
        settings.from.name.clone(),
        address,
    ))
}

/// What one message is rendered from: its customer and event, what planning fixed, and the
/// headers the templates may show. `touchpoint preview` passes stand-ins for the last two.
pub struct MessageInputs<'a> {
    pub draft: &'a Draft<'a>,
    pub message_id: String,
    pub unsubscribe_url: Option<String>,
    /// The link that rates the message N, for rules with `rating`; `None`: stand-ins
    /// ([`crate::render::rating::sample_url`]).
    pub rating_url: Option<&'a dyn Fn(u8) -> String>,
    /// The owner's page about the customer.
    pub customer_url: Option<String>,
}

/// A rule asking for a rating cannot go out without links to answer with.
fn check_rating_links(settings: &DispatchSettings, rule: &Rule) -> Result<(), String> {
    if rule.rating.is_some() && settings.links.is_none() {
        return Err(format!(
            "rule {:?} asks for a rating, but links are off: set [links] base_url (or [http] listen) so \
             rating links can reach it",
            rule.name
        ));
    }
    Ok(())
}

/// Renders the rule's templates for one message: the dispatcher's first step, and all of
/// `touchpoint preview`, so a preview shows the words that would go out.
pub fn render_message(
    playbook: &Playbook,
    rule: &Rule,
    inputs: &MessageInputs<'_>,
) -> Result<Rendered, RenderError> {
    let rating_url = inputs.rating_url.unwrap_or(&sample_url);
    let extras = MessageExtras {
        years: inputs.draft.detail.years,
        message_id: inputs.message_id.clone(),
        unsubscribe_url: inputs.unsubscribe_url.clone(),
        customer_url: inputs.customer_url.clone(),
        timezone: inputs.draft.tz.name().to_string(),
    };
    let context = message_context(
        inputs.draft.customer,
        inputs.draft.event,
        rule,
        &playbook.business,
        &extras,
    );
    let mut context = context;
    if let Some(request) = &rule.rating {
        context["rating"] = rating::context(request, rating_url);
    }
    playbook.templates.render(rule, &context)
}

/// Click tracking and the open pixel, where the rule asks for them.
fn tracked_html(
    settings: &DispatchSettings,
    rule: &Rule,
    message: i64,
    html: String,
    keep: Option<&str>,
) -> String {
    let Some(signer) = &settings.links else {
        return html;
    };
    let mut html = html;
    if rule.track_clicks {
        html = links::track_clicks(&html, keep, |url| {
            signer.url(&Link::Click {
                message,
                url: url.to_string(),
            })
        });
    }
    if rule.track_opens {
        html = links::add_open_pixel(&html, &signer.url(&Link::Open { message }));
    }
    html
}

/// `List-Unsubscribe` (RFC 2369) with one-click `List-Unsubscribe-Post` (RFC 8058).
fn extra_headers(
    settings: &DispatchSettings,
    rule: &Rule,
    unsubscribe_url: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![("X-Touchpoint-Rule", rule.name.clone())];
    let mut targets = Vec::new();
    if rule.to == Recipient::Owner {
        return headers;
    }
    if let Some(url) = unsubscribe_url {
        targets.push(format!("<{url}>"));
    }
    if let Some(mailto) = &settings.unsubscribe_mailto {
        targets.push(format!("<mailto:{mailto}?subject=unsubscribe>"));
    }
    if !targets.is_empty() {
        headers.push(("List-Unsubscribe", targets.join(", ")));
    }
    if unsubscribe_url.is_some() {
        headers.push(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click".into()));
    }
    headers
}

/// `bounces@acme.example` -> `bounces+42.TAG@acme.example`, TAG signing the message id (see
/// [`crate::bounce::parse_verp`]).
pub fn verp(bounce_address: &Address, message: i64, tags: &MessageTags) -> Option<Address> {
    crate::bounce::tagged_address(bounce_address, message, &tags.verp(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verp_address_carries_the_message_id_and_its_signature() {
        let tags = MessageTags::new(b"test secret");
        let bounces: Address = "bounces@acme.example".parse().unwrap();
        let address = verp(&bounces, 42, &tags).unwrap();
        assert_eq!(
            address.to_string(),
            format!("bounces+42.{}@acme.example", tags.verp(42))
        );
        let parsed = crate::bounce::parse_verp(address.as_ref()).unwrap();
        assert_eq!(parsed.message, 42);
        assert!(tags.verp_matches(42, parsed.tag.as_deref().unwrap()));
    }
}
