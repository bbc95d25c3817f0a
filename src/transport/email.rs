//! Building the RFC 5322 message: From, To, Subject, Date, Message-ID and a
//! multipart/alternative body with the plain text first and the HTML second.

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::{Address, Message};

/// A message ready for a transport.
#[derive(Debug, Clone)]
pub struct OutgoingEmail {
    pub envelope_from: Address,
    pub to: Address,
    /// With angle brackets, as in the header.
    pub message_id: String,
    pub bytes: Vec<u8>,
}

/// Parses `"Name <user@example.com>"` or `"user@example.com"`.
pub fn parse_mailbox(text: &str) -> Result<Mailbox, String> {
    text.parse::<Mailbox>().map_err(|e| {
        format!("{text:?} is not an email address ({e}); expected \"Name <user@example.com>\"")
    })
}

/// A Message-ID that is the same on every attempt of a message, so a receiving server or a
/// mail client can recognise a resent copy. `tag` ([`crate::links::MessageTags::message_id`])
/// makes it unguessable, so a report that names a message by Message-ID alone cannot pick one
/// by counting ids.
pub fn message_id_for(message_row_id: i64, tag: &str, rule: &str, domain: &str) -> String {
    format!("<{message_row_id}.{tag}.{rule}@{domain}>")
}

/// Everything that goes into one message.
pub struct EmailParts<'a> {
    pub from: &'a Mailbox,
    pub reply_to: Option<&'a Mailbox>,
    pub to_name: Option<&'a str>,
    pub to_email: &'a str,
    pub subject: &'a str,
    pub text: String,
    pub html: String,
    pub message_id: String,
    /// Further headers (List-Unsubscribe...), name and value.
    pub headers: Vec<(&'static str, String)>,
    /// Sign with DKIM, after every header is in place.
    pub dkim: Option<&'a super::dkim::Dkim>,
    /// The envelope sender (MAIL FROM), when it is not the From address (VERP bounces).
    pub envelope_from: Option<Address>,
}

/// Builds the message; fails only on a recipient address that is not valid.
pub fn build_email(parts: EmailParts<'_>) -> Result<OutgoingEmail, String> {
    let to_address: Address = parts.to_email.trim().parse().map_err(|e| {
        format!(
            "the customer's address {:?} is not valid: {e}",
            parts.to_email
        )
    })?;
    let to = Mailbox::new(
        parts
            .to_name
            .filter(|n| !n.trim().is_empty())
            .map(str::to_string),
        to_address.clone(),
    );
    let mut builder = Message::builder()
        .from(parts.from.clone())
        .to(to)
        .subject(parts.subject)
        .date_now()
        .message_id(Some(parts.message_id.clone()));
    if let Some(reply_to) = parts.reply_to {
        builder = builder.reply_to(reply_to.clone());
    }
    let mut message = builder
        .multipart(MultiPart::alternative_plain_html(parts.text, parts.html))
        .map_err(|e| format!("cannot build the message: {e}"))?;
    for (name, value) in parts.headers {
        message.headers_mut().insert_raw(HeaderValue::new(
            HeaderName::new_from_ascii_str(name),
            value,
        ));
    }
    // Signed last, over the headers as they go out (List-Unsubscribe included).
    if let Some(dkim) = parts.dkim {
        message.sign(&dkim.config);
    }
    Ok(OutgoingEmail {
        envelope_from: parts
            .envelope_from
            .unwrap_or_else(|| parts.from.email.clone()),
        to: to_address,
        message_id: parts.message_id,
        bytes: message.formatted(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_multipart_alternative_message_with_the_given_message_id() {
        let from = parse_mailbox("Acme <hello@acme.example>").unwrap();
        let email = build_email(EmailParts {
            from: &from,
            reply_to: None,
            to_name: Some("Ada Lovelace"),
            to_email: "ada@example.com",
            subject: "Thank you, Ada",
            text: "Plain".into(),
            html: "<p>Rich</p>".into(),
            message_id: message_id_for(42, "0f1e2d3c4b5a69788796", "thank-you", "acme.example"),
            headers: vec![("X-Touchpoint-Rule", "thank-you".into())],
            dkim: None,
            envelope_from: None,
        })
        .unwrap();
        let text = String::from_utf8(email.bytes).unwrap();
        assert!(
            text.contains("Message-ID: <42.0f1e2d3c4b5a69788796.thank-you@acme.example>"),
            "{text}"
        );
        assert!(text.contains("multipart/alternative"));
        assert!(
            text.contains("To: \"Ada Lovelace\" <ada@example.com>"),
            "{text}"
        );
        assert!(text.contains("X-Touchpoint-Rule: thank-you"));
        assert!(text.contains("Date: "));
        assert!(text.find("text/plain").unwrap() < text.find("text/html").unwrap());
    }

    #[test]
    fn a_bad_customer_address_is_an_error_not_a_panic() {
        let from = parse_mailbox("hello@acme.example").unwrap();
        let error = build_email(EmailParts {
            from: &from,
            reply_to: None,
            to_name: None,
            to_email: "not an address",
            subject: "s",
            text: String::new(),
            html: String::new(),
            message_id: "<1.r@x>".into(),
            headers: vec![],
            dkim: None,
            envelope_from: None,
        })
        .unwrap_err();
        assert!(error.contains("not valid"), "{error}");
        assert!(parse_mailbox("nope").is_err());
    }
}
