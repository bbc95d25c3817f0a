//! `touchpoint preview`: one rule rendered for one customer, as words (`--format text`), as the
//! complete message that would go out (`--format eml`), or sent as a test to one address
//! (`--send-to`).
//!
//! The message is built by the dispatcher's own compose step ([`compose_draft`]): the same
//! rendering, tracking, headers, VERP and DKIM. It has no row in `messages`: its id is a
//! negative test-send id ([`new_test_send_id`]), so the planner, dedupe, the owner's page and
//! its counts never see it, and its links only answer that it was a test. A test send is
//! logged (target `touchpoint::test_send`) and reported on standard output; nothing is stored.

use anyhow::{Context, Result, bail};
use chrono::Utc;

use crate::cli::{PreviewArgs, PreviewFormat};
use crate::config::Config;
use crate::dispatch::{Draft, MessageInputs, compose_draft, render_message};
use crate::links::new_test_send_id;
use crate::plan::customer_timezone;
use crate::playbook::Playbook;
use crate::rules::{MessageDetail, Rule, Trigger};
use crate::store::{Customer, Event, SharedStore};
use crate::transport::{OutgoingEmail, Transport};

/// `touchpoint preview`.
pub async fn preview(config: &Config, store: &SharedStore, args: &PreviewArgs) -> Result<String> {
    let send_to = args.send_to.as_deref().map(test_address).transpose()?;
    let playbook = Playbook::load(config).map_err(|d| anyhow::anyhow!("{d}"))?;
    let rule = find_rule(&playbook, &args.rule)?;
    let (customer, event) = subject_of(store, rule, args).await?;
    let tz = customer_timezone(&customer, config.defaults.timezone);
    let detail = next_detail(rule, event.as_ref(), tz);
    let draft = Draft {
        customer: &customer,
        event: event.as_ref(),
        tz,
        detail: &detail,
    };
    if send_to.is_none() && args.format == PreviewFormat::Text {
        return words(&playbook, rule, &draft);
    }
    let settings = crate::daemon::preview_settings(config, store).await?;
    let email = compose_draft(
        &settings,
        &playbook,
        rule,
        draft,
        new_test_send_id(),
        send_to.as_deref(),
    )
    .map_err(anyhow::Error::msg)
    .with_context(|| format!("cannot build the message of rule {:?}", rule.name))?;
    let report = match &send_to {
        Some(address) => send_test(config, rule, &customer, address, &email).await?,
        None => String::new(),
    };
    Ok(match args.format {
        PreviewFormat::Eml => String::from_utf8_lossy(&email.bytes).into_owned(),
        PreviewFormat::Text => report,
    })
}

/// `--send-to`, checked as an address before anything is rendered.
fn test_address(text: &str) -> Result<String> {
    let text = text.trim();
    crate::import::check_header_text("--send-to address", text).map_err(anyhow::Error::msg)?;
    text.parse::<lettre::Address>()
        .map_err(|e| anyhow::anyhow!("--send-to {text:?} is not an email address: {e}"))?;
    Ok(text.to_string())
}

fn find_rule<'a>(playbook: &'a Playbook, name: &str) -> Result<&'a Rule> {
    if let Some(rule) = playbook.rule(name) {
        return Ok(rule);
    }
    let names: Vec<_> = playbook
        .rules
        .rules
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    bail!(
        "no rule named {name:?}; the rules are: {}",
        names.join(", ")
    )
}

/// The customer, and the event that triggers the rule for them: `--event`, else their latest
/// event of the rule's kind (none for a scheduled rule).
async fn subject_of(
    store: &SharedStore,
    rule: &Rule,
    args: &PreviewArgs,
) -> Result<(Customer, Option<Event>)> {
    let Some(customer) = store.customer(&args.customer).await? else {
        bail!("no customer with id {:?}", args.customer);
    };
    let kind = match &rule.trigger {
        Trigger::Event { kind, .. } | Trigger::Anniversary { kind, .. } => Some(kind),
        Trigger::Schedule { .. } => None,
    };
    let event = match (&args.event, kind) {
        (Some(id), _) => {
            let event = store.event(id).await?;
            let event = event.with_context(|| format!("no event with id {id:?}"))?;
            if event.customer_id != customer.id {
                bail!(
                    "event {id:?} belongs to customer {:?}, not {:?}",
                    event.customer_id,
                    customer.id
                );
            }
            Some(event)
        }
        (None, Some(kind)) => Some(store.latest_event(&customer.id, kind).await?.with_context(|| {
            format!("customer {:?} has no {kind:?} event to preview the rule with (pass --event ID)", customer.id)
        })?),
        (None, None) => None,
    };
    Ok((customer, event))
}

/// What planning would fix for the next occurrence, from now.
fn next_detail(rule: &Rule, event: Option<&Event>, tz: chrono_tz::Tz) -> MessageDetail {
    event
        .and_then(|e| rule.trigger.next_anniversary(e.occurred_at, tz, Utc::now()))
        .map_or_else(MessageDetail::default, |next| {
            MessageDetail::anniversary(next.years)
        })
}

/// `--format text`: subject, text and HTML, with stand-ins for what only sending fixes.
fn words(playbook: &Playbook, rule: &Rule, draft: &Draft<'_>) -> Result<String> {
    let inputs = MessageInputs {
        draft,
        message_id: "<preview@touchpoint>".into(),
        unsubscribe_url: None,
        rating_url: None,
        customer_url: None,
    };
    let rendered = render_message(playbook, rule, &inputs)?;
    Ok(format!(
        "Subject: {}\nTo: {}\n\n--- text ---\n{}\n--- html ---\n{}\n",
        rendered.subject,
        draft.customer.email,
        rendered.text.trim_end(),
        rendered.html.trim_end()
    ))
}

/// Hands the test message to the configured transport, logs it as a test, and says what
/// happened. Nothing is written to the database.
async fn send_test(
    config: &Config,
    rule: &Rule,
    customer: &Customer,
    address: &str,
    email: &OutgoingEmail,
) -> Result<String> {
    let transport = Transport::from_config(&config.transport)
        .map_err(anyhow::Error::msg)
        .context("the transport settings are wrong")?;
    let result = transport.deliver(email, || async { true }).await;
    transport.close().await;
    let reply = result.with_context(|| format!("the test send to {address} failed"))?;
    tracing::info!(
        target: "touchpoint::test_send",
        rule = %rule.name,
        customer = %customer.id,
        to = %address,
        message_id = %email.message_id,
        %reply,
        "test send"
    );
    Ok(format!(
        "sent a test of rule {:?} for customer {:?} to {address}\n\
         Message-ID: {}\nserver: {}\n\
         It is not the customer's message: nothing was recorded for them, and its links only \
         answer that it was a test.\n",
        rule.name,
        customer.id,
        email.message_id,
        reply.trim()
    ))
}
