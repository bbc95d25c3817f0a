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
    crate::import::check_header_text("address", text)
        .map_err(|e| format!("{text:?} is not an email address: {e}"))?;
    text.parse::<Mailbox>().map_err(|e| {
        format!("{text:?} is not an email address ({e}); expected \"Name <user@example.com>\"")
    })
}

/// A Message-ID that is the same on every attempt of a message, so a receiving server or a
/// mail client can recognise a resent copy. `tag` ([`crate::links::MessageTags::message_id`])
/// makes it unguessable, so a report that names a message by Message-ID alone cannot pick one
/// by counting ids. A test send's id (negative, see `links::is_test_send`) is written
/// `test<N>`, which names no message and makes no file name that starts with `-`.
pub fn message_id_for(message_row_id: i64, tag: &str, rule: &str, domain: &str) -> String {
    if message_row_id < 0 {
        let test = message_row_id.unsigned_abs();
        return format!("<test{test}.{tag}.{rule}@{domain}>");
    }
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

/// Builds the message. Fails, never panics, on a value that cannot go into a header (a
/// recipient address that is not valid, a line break or other control character in a name, the
/// subject or any other header), naming the field: such a message can never be built, so the
/// dispatcher fails it at once rather than retrying.
pub fn build_email(parts: EmailParts<'_>) -> Result<OutgoingEmail, String> {
    check_header_values(&parts)?;
    let to_address: Address = parts.to_email.trim().parse().map_err(|e| {
        format!(
            "the customer's address {:?} is not valid: {e}",
            parts.to_email
        )
    })?;
    let to = Mailbox::new(
        parts
            .to_name
            .map(str::trim)
            .filter(|n| !n.is_empty())
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
        let name = HeaderName::new_from_ascii(name.to_string())
            .map_err(|_| format!("{name:?} is not a header name"))?;
        message
            .headers_mut()
            .insert_raw(HeaderValue::new(name, value));
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

/// Every header value, checked before lettre sees it: lettre panics on a display name with a
/// line break in it, and would write most other control characters into the header as they are.
fn check_header_values(parts: &EmailParts<'_>) -> Result<(), String> {
    let check = crate::import::check_header_text;
    check("customer's email address", parts.to_email.trim())?;
    if let Some(name) = parts.to_name {
        check("customer's name", name.trim())?;
    }
    check("subject", parts.subject)?;
    for (what, mailbox) in [("sender", Some(parts.from)), ("reply-to", parts.reply_to)] {
        if let Some(mailbox) = mailbox {
            check(&format!("{what} address"), mailbox.email.as_ref())?;
            if let Some(name) = &mailbox.name {
                check(&format!("{what} name"), name)?;
            }
        }
    }
    check("Message-ID", &parts.message_id)?;
    for (name, value) in &parts.headers {
        check(&format!("{name} header"), value)?;
    }
    Ok(())
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

    fn parts<'a>(from: &'a Mailbox, name: &'a str, subject: &'a str) -> EmailParts<'a> {
        EmailParts {
            from,
            reply_to: None,
            to_name: Some(name),
            to_email: "ada@example.com",
            subject,
            text: "Plain".into(),
            html: "<p>Rich</p>".into(),
            message_id: "<1.r@acme.example>".into(),
            headers: vec![("X-Touchpoint-Rule", "r".into())],
            dkim: None,
            envelope_from: None,
        }
    }

    #[test]
    fn a_line_break_in_a_header_value_is_an_error_that_names_the_field() {
        let from = parse_mailbox("Acme <hello@acme.example>").unwrap();
        for (name, expected) in [
            ("Ada\rBcc: x@evil.example", "line break (CR)"),
            ("Ada\nBcc: x@evil.example", "line break (LF)"),
            ("Ada\r\nBcc: x@evil.example", "line break (CR)"),
            ("Ada\u{1b}[31m", "control character (U+001B)"),
            ("Ada\u{2028}Lovelace", "line break (U+2028)"),
        ] {
            let error = build_email(parts(&from, name, "Hi")).unwrap_err();
            assert_eq!(error, format!("the customer's name contains a {expected}"));
        }
        let error = build_email(parts(&from, "Ada", "Hi\u{7f}")).unwrap_err();
        assert_eq!(error, "the subject contains a control character (U+007F)");
        let mut with_header = parts(&from, "Ada", "Hi");
        with_header.headers = vec![("List-Unsubscribe", "<https://x>\r\nBcc: y".into())];
        assert_eq!(
            build_email(with_header).unwrap_err(),
            "the List-Unsubscribe header contains a line break (CR)"
        );
        let mut bad_address = parts(&from, "Ada", "Hi");
        bad_address.to_email = "ada@example.com\nBcc: y@evil.example";
        assert_eq!(
            build_email(bad_address).unwrap_err(),
            "the customer's email address contains a line break (LF)"
        );
    }

    #[test]
    fn a_tab_in_a_name_is_white_space_in_the_header() {
        let from = parse_mailbox("Acme <hello@acme.example>").unwrap();
        let email = build_email(parts(&from, "Ada\tLovelace", "Hi\tthere")).unwrap();
        let text = String::from_utf8(email.bytes).unwrap();
        assert!(text.contains("Subject: Hi\tthere\r\n"), "{text}");
    }

    #[test]
    fn a_sender_with_a_line_break_is_refused_when_the_config_is_read() {
        let error = parse_mailbox("Acme\r\nBcc: x@evil.example <hello@acme.example>").unwrap_err();
        assert!(error.contains("line break (CR)"), "{error}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5000))]
        /// Whatever a customer record or a template holds, building is an answer, not a panic.
        #[test]
        fn building_never_panics(
            name in "(?s).{0,12}",
            subject in "(?s).{0,60}",
            user in "(?s).{1,8}",
            header in "(?s).{0,12}",
        ) {
            let from = parse_mailbox("Acme <hello@acme.example>").unwrap();
            let to_email = format!("{user}@example.com");
            let mut email = parts(&from, &name, &subject);
            email.to_email = &to_email;
            email.headers = vec![("X-Touchpoint-Rule", header)];
            let _ = build_email(email);
        }
    }
}
