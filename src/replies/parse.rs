//! Reading one inbound mail: who sent it, which of our addresses and Message-IDs it names,
//! whether a machine wrote it, and the new words in it.

use mail_parser::{HeaderValue, MessageParser};

use super::InboundError;
use crate::bounce::{Verp, parse_verp};

/// The longest snippet kept, in characters.
pub const SNIPPET_CHARS: usize = 280;

/// What touchpoint reads from an inbound mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The mail's own Message-ID, without angle brackets.
    pub message_id: Option<String>,
    /// The sender's address.
    pub from: String,
    /// Tagged reply addresses it was sent to (`replies+42.TAG@...`), first the envelope's.
    pub reply_tags: Vec<Verp>,
    /// `In-Reply-To` then `References` (newest first), without angle brackets.
    pub answers: Vec<String>,
    /// Written by a machine: an out-of-office note, an autoresponder.
    pub auto: bool,
    /// The new text, without quoted history or signature.
    pub snippet: String,
}

/// Reads `raw`. `recipients` are the envelope addresses the MTA delivered it to;
/// `reply_user` is the local part of `[replies] address` (a tag is read only from addresses
/// with that local part before the `+`; from any `x+ID.TAG` address when `None`).
pub fn parse_inbound(
    raw: &[u8],
    recipients: &[String],
    reply_user: Option<&str>,
) -> Result<Inbound, InboundError> {
    let message = MessageParser::default()
        .parse(raw)
        .filter(|m| !m.headers().is_empty())
        .ok_or_else(|| InboundError::Unparseable("the input is not a mail message".into()))?;
    let from = message
        .from()
        .and_then(|f| f.first())
        .and_then(|a| a.address())
        .map(str::to_string)
        .ok_or_else(|| InboundError::Unparseable("it has no From address".into()))?;
    let mut addresses: Vec<String> = recipients.to_vec();
    for header in ["X-Original-To", "Delivered-To", "To", "Cc"] {
        for value in message.header_values(header) {
            addresses.extend(addresses_in(value));
        }
    }
    let reply_tags = addresses
        .iter()
        .filter(|a| is_reply_address(a, reply_user))
        .filter_map(|a| parse_verp(a))
        .collect();
    let mut answers: Vec<String> = ids_in(message.in_reply_to());
    let mut references = ids_in(message.references());
    references.reverse();
    answers.extend(references);
    let text = message
        .body_text(0)
        .map(|t| t.into_owned())
        .unwrap_or_default();
    Ok(Inbound {
        message_id: message.message_id().map(str::to_string),
        from,
        reply_tags,
        answers,
        auto: is_automatic(&message),
        snippet: snippet(&text),
    })
}

fn addresses_in(value: &HeaderValue<'_>) -> Vec<String> {
    match value {
        HeaderValue::Address(address) => address
            .iter()
            .filter_map(|a| a.address().map(str::to_string))
            .collect(),
        HeaderValue::Text(text) => vec![text.trim().trim_matches(['<', '>']).to_string()],
        HeaderValue::TextList(list) => list.iter().map(|t| t.trim().to_string()).collect(),
        _ => Vec::new(),
    }
}

fn ids_in(value: &HeaderValue<'_>) -> Vec<String> {
    let ids = match value {
        HeaderValue::Text(text) => vec![text.to_string()],
        HeaderValue::TextList(list) => list.iter().map(|t| t.to_string()).collect(),
        _ => Vec::new(),
    };
    ids.into_iter()
        .map(|id| id.trim().trim_matches(['<', '>']).to_string())
        .filter(|id| !id.is_empty())
        .collect()
}

/// `replies+42.TAG@acme.example` when our local part is `replies`.
fn is_reply_address(address: &str, reply_user: Option<&str>) -> bool {
    let local = address.split('@').next().unwrap_or_default();
    let Some((user, _)) = local.rsplit_once('+') else {
        return false;
    };
    reply_user.is_none_or(|wanted| user.eq_ignore_ascii_case(wanted))
}

/// Subjects mail programs give their automatic answers (English, German, French, Spanish).
const AUTO_SUBJECTS: &[&str] = &[
    "out of office",
    "out of the office",
    "automatic reply",
    "auto-reply",
    "autoreply",
    "auto:",
    "abwesenheitsnotiz",
    "automatische antwort",
    "réponse automatique",
    "absence du bureau",
    "respuesta automática",
];

/// RFC 3834's `Auto-Submitted` (anything but `no`), the headers autoresponders add, a
/// `Precedence` of bulk, junk or auto_reply, or an out-of-office subject.
fn is_automatic(message: &mail_parser::Message<'_>) -> bool {
    let header = |name: &str| {
        message
            .header_raw(name)
            .map(|v| v.trim().to_ascii_lowercase())
    };
    if header("Auto-Submitted").is_some_and(|v| v != "no") {
        return true;
    }
    if ["X-Autoreply", "X-Autorespond", "X-Auto-Reply"]
        .iter()
        .any(|h| header(h).is_some())
    {
        return true;
    }
    if header("Precedence").is_some_and(|v| matches!(v.as_str(), "bulk" | "junk" | "auto_reply")) {
        return true;
    }
    let subject = message.subject().unwrap_or_default().to_lowercase();
    AUTO_SUBJECTS.iter().any(|s| subject.starts_with(s))
}

/// The new words of a reply: everything before the quoted history or the signature, quoted
/// lines left out, white space collapsed, at most [`SNIPPET_CHARS`] characters.
pub fn snippet(text: &str) -> String {
    let mut words = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if ends_the_new_text(trimmed) {
            break;
        }
        if trimmed.starts_with('>') {
            continue;
        }
        words.extend(trimmed.split_whitespace());
    }
    let joined = words.join(" ");
    if joined.chars().count() <= SNIPPET_CHARS {
        return joined;
    }
    let cut: String = joined.chars().take(SNIPPET_CHARS - 1).collect();
    format!("{}…", cut.trim_end())
}

/// A line where what the customer wrote ends: a signature delimiter, a quoted-history header
/// ("On ... wrote:", Outlook's "-----Original Message-----" or "From: ..."), a phone's tag.
fn ends_the_new_text(line: &str) -> bool {
    let lower = line.to_lowercase();
    line == "--"
        || line == "-- "
        || line.starts_with("-----Original Message")
        || line.starts_with("________________")
        || (lower.starts_with("on ") && lower.ends_with("wrote:"))
        || (lower.starts_with("am ") && lower.ends_with("schrieb:"))
        || (lower.starts_with("le ") && lower.ends_with("a écrit :"))
        || lower.starts_with("from: ")
        || lower.starts_with("sent from my ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail(headers: &str, body: &str) -> Vec<u8> {
        format!("{headers}\r\n\r\n{body}").into_bytes()
    }

    #[test]
    fn tags_answers_and_sender_are_read() {
        let raw = mail(
            "From: Ada <Ada@Example.com>\r\nTo: Acme <replies+42.00112233445566778899@acme.example>, other+7.ab@x.example\r\n\
             Subject: Re: Thank you\r\nMessage-ID: <r1@example.com>\r\nIn-Reply-To: <42.t.thanks@acme.example>\r\n\
             References: <1.a@acme.example> <42.t.thanks@acme.example>",
            "Lovely flowers!\r\n",
        );
        let inbound = parse_inbound(&raw, &[], Some("replies")).unwrap();
        assert_eq!(inbound.from, "Ada@Example.com");
        assert_eq!(inbound.message_id.as_deref(), Some("r1@example.com"));
        assert_eq!(
            inbound.reply_tags,
            [Verp {
                message: 42,
                tag: Some("00112233445566778899".into())
            }]
        );
        assert_eq!(
            inbound.answers,
            [
                "42.t.thanks@acme.example",
                "42.t.thanks@acme.example",
                "1.a@acme.example"
            ]
        );
        assert!(!inbound.auto);
        assert_eq!(inbound.snippet, "Lovely flowers!");
        let envelope = parse_inbound(&raw, &["replies+9.ff@acme.example".into()], None).unwrap();
        assert_eq!(envelope.reply_tags[0].message, 9, "the envelope's first");
    }

    #[test]
    fn automatic_answers_are_told_apart() {
        let auto = |headers: &str| {
            let raw = mail(&format!("From: a@b.example\r\n{headers}"), "x");
            parse_inbound(&raw, &[], None).unwrap().auto
        };
        assert!(auto("Auto-Submitted: auto-replied\r\nSubject: Re: hi"));
        assert!(!auto("Auto-Submitted: no\r\nSubject: Re: hi"));
        assert!(auto("Subject: Out of Office: Thank you"));
        assert!(auto("Subject: Automatic reply: Thank you"));
        assert!(auto("Precedence: auto_reply\r\nSubject: Re: hi"));
        assert!(auto("X-Autoreply: yes\r\nSubject: Re: hi"));
        assert!(!auto("Subject: Re: Out of office supplies"));
    }

    #[test]
    fn the_snippet_leaves_out_quotes_and_signatures() {
        let text = "Thanks,   it was\r\nperfect.\r\n> quoted line\r\n\r\nOn Tue, 1 Dec 2026, Acme <hello@acme.example> wrote:\r\n> Thank you for your order\r\n";
        assert_eq!(snippet(text), "Thanks, it was perfect.");
        assert_eq!(snippet("Yes please\n-- \nAda Lovelace\nCEO"), "Yes please");
        assert_eq!(snippet("Ok\n\n-----Original Message-----\nFrom: x"), "Ok");
        assert_eq!(snippet("Great\n\nSent from my iPhone"), "Great");
        let long = "word ".repeat(200);
        let cut = snippet(&long);
        assert_eq!(cut.chars().count(), SNIPPET_CHARS);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn what_is_not_a_mail_is_refused_with_the_reason() {
        for raw in [&b""[..], b"just some words", b"\xff\xfe\x00"] {
            let error = parse_inbound(raw, &[], None).unwrap_err();
            assert!(matches!(error, InboundError::Unparseable(_)), "{error}");
        }
        let error = parse_inbound(b"Subject: hi\r\n\r\nno sender", &[], None).unwrap_err();
        assert!(error.to_string().contains("no From address"), "{error}");
    }
}
