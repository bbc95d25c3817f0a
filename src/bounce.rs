//! Bounces and complaints that arrive after a message was sent: a delivery status notification
//! (RFC 3464) or an abuse report (ARF, RFC 5965) piped in by the MTA (`touchpoint bounce`), or a
//! provider's webhook (`POST /hooks/bounce`). Each is recorded as a message event; hard bounces
//! and complaints suppress the address at once, soft bounces after `bounces.soft_bounce_limit`.
//!
//! Anyone can mail the bounce address, so a report is believed only when it names its message
//! in a way a stranger cannot forge: a VERP address signed with the link secret
//! (`bounces+42.TAG@...`), or the message's Message-ID, which carries a tag of its own. The
//! recipient it reports must be the message's recipient, too. Both paths go through [`apply`].

use chrono::{TimeDelta, Utc};
use mail_parser::{MessageParser, MimeHeaders, PartType};

use crate::links::MessageTags;
use crate::store::{LogEntry, MessageState, SharedStore, StoreError, normalize_email};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BounceKind {
    /// A permanent failure (5.x.x): the address does not work.
    Hard,
    /// A temporary one (4.x.x): full mailbox, greylisting...
    Soft,
    /// The recipient reported the message as spam.
    Complaint,
}

impl BounceKind {
    /// The `message_events.kind` it is recorded as.
    pub fn event(self) -> &'static str {
        match self {
            BounceKind::Hard => "bounced",
            BounceKind::Soft => "soft_bounced",
            BounceKind::Complaint => "complained",
        }
    }
}

/// A VERP address taken apart: `bounces+42.TAG@acme.example`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verp {
    pub message: i64,
    /// The signature ([`MessageTags::verp`]); `None` in the unsigned addresses
    /// (`bounces+42@...`) of messages sent before VERP was signed.
    pub tag: Option<String>,
}

/// What a report says, as far as touchpoint cares.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct BounceReport {
    #[serde(rename = "type")]
    pub kind: BounceKind,
    /// The Message-ID of the message that bounced.
    #[serde(default)]
    pub message_id: Option<String>,
    /// The message's VERP address: where a DSN was delivered, an ARF's Original-Mail-From, or
    /// the `return_path` a provider's webhook reports.
    #[serde(default, rename = "return_path", deserialize_with = "verp_field")]
    pub verp: Option<Verp>,
    /// The address that bounced: a DSN's Final-Recipient, an ARF's Original-Rcpt-To (else the
    /// To of the message it encloses), a webhook's `email`.
    #[serde(default, alias = "email")]
    pub recipient: Option<String>,
    /// A DSN's Original-Recipient, which a forward may have turned into another
    /// Final-Recipient.
    #[serde(skip)]
    pub original_recipient: Option<String>,
    /// The enhanced status code, e.g. `5.1.1`.
    #[serde(default)]
    pub status: Option<String>,
    /// The server's words, or the provider's.
    #[serde(default, alias = "detail")]
    pub diagnostic: Option<String>,
}

fn verp_field<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Verp>, D::Error> {
    let text: Option<String> = serde::Deserialize::deserialize(deserializer)?;
    Ok(text
        .as_deref()
        .and_then(|t| parse_verp(t.trim_matches(['<', '>', ' ']))))
}

#[derive(Debug, thiserror::Error)]
pub enum BounceError {
    #[error("not a bounce or complaint report: {0}")]
    NotAReport(String),
    #[error(
        "no message matches this report (Message-ID {message_id:?}, VERP id {verp:?}); nothing recorded"
    )]
    UnknownMessage {
        message_id: Option<String>,
        verp: Option<i64>,
    },
    /// The report names its message in a way that is not signed: a forged or missing tag.
    #[error("not believed: {0}; nothing recorded")]
    Unverified(String),
    /// The report's recipient is not the message's (or it names none).
    #[error(
        "not believed: the report's recipient {reported:?} is not the recipient of message {message}; nothing recorded"
    )]
    WrongRecipient { message: i64, reported: Vec<String> },
    #[error(
        "not believed: the report names no recipient to check against message {message}'s (a DSN's Final-Recipient, an ARF's Original-Rcpt-To or enclosed To, a webhook's \"email\"); nothing recorded"
    )]
    NoRecipient { message: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What was done with a report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    pub message: Option<i64>,
    pub email: Option<String>,
    pub kind: BounceKind,
    pub suppressed: bool,
    /// The message had this kind of report already: counted once.
    pub repeated: bool,
}

/// What decides whether a report is believed and when an address is suppressed.
#[derive(Debug, Clone)]
pub struct BounceRules {
    /// From the link secret: checks VERP signatures and tagged Message-IDs.
    pub tags: MessageTags,
    pub soft_bounce_limit: i64,
    /// How long after sending an unsigned report (`bounces+42@...`, an untagged Message-ID) is
    /// still believed, for messages that went out before VERP and Message-IDs were signed.
    pub unsigned_grace: TimeDelta,
}

/// Who handed the report over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// Mail piped in by the MTA: anyone can mail the bounce address.
    Anyone,
    /// The webhook, authenticated by its bearer token: it may also name an address alone.
    Provider,
}

/// Reads a DSN or ARF report. `recipients` are the addresses the report was delivered to (the
/// MTA's `$RECIPIENT`), for VERP.
pub fn parse_report(raw: &[u8], recipients: &[String]) -> Result<BounceReport, BounceError> {
    let message = MessageParser::default()
        .parse(raw)
        .ok_or_else(|| BounceError::NotAReport("the input is not a mail message".into()))?;
    let mut kind = None;
    let mut status = None;
    let mut recipient = None;
    let mut original_recipient = None;
    let mut diagnostic = None;
    let mut original_id = None;
    let mut original_to = None;
    let mut report_verp = None;
    for part in message.parts.iter().skip(1) {
        let content_type = part
            .content_type()
            .map(|c| {
                format!(
                    "{}/{}",
                    c.c_type,
                    c.c_subtype.as_deref().unwrap_or_default()
                )
                .to_ascii_lowercase()
            })
            .unwrap_or_default();
        let body = part_text(raw, part);
        match content_type.as_str() {
            "message/delivery-status" | "message/global-delivery-status" => {
                let fields = failed_recipient_fields(&body);
                let code = fields.status.clone().unwrap_or_default();
                let failed = matches!(fields.action.as_deref(), Some("failed" | "delayed"))
                    || code.starts_with('4')
                    || code.starts_with('5');
                if !failed {
                    // "delivered", "relayed", "expanded", 2.x.x: news of success, not a bounce.
                    continue;
                }
                kind = Some(
                    if code.starts_with('4') || fields.action.as_deref() == Some("delayed") {
                        BounceKind::Soft
                    } else {
                        BounceKind::Hard
                    },
                );
                status = fields.status;
                recipient = fields.final_recipient;
                original_recipient = fields.original_recipient;
                diagnostic = fields.diagnostic;
            }
            "message/feedback-report" => {
                kind = Some(BounceKind::Complaint);
                diagnostic = field(&body, "feedback-type").map(|t| format!("feedback type: {t}"));
                recipient = recipient.or_else(|| field(&body, "original-rcpt-to"));
                // The envelope sender of the reported message: its VERP address.
                report_verp = field(&body, "original-mail-from")
                    .and_then(|from| parse_verp(from.trim_matches(['<', '>', ' '])));
            }
            "message/rfc822" | "message/global" => {
                if let PartType::Message(inner) = &part.body {
                    original_id = original_id.or_else(|| inner.message_id().map(str::to_string));
                    original_to = original_to.or_else(|| single_address(inner.to()));
                }
                original_id = original_id.or_else(|| field(&body, "message-id"));
            }
            "text/rfc822-headers" | "message/rfc822-headers" | "text/rfc822-header" => {
                original_id = original_id.or_else(|| field(&body, "message-id"));
            }
            _ => {}
        }
    }
    let kind = kind.ok_or_else(|| {
        BounceError::NotAReport("no message/delivery-status or message/feedback-report part".into())
    })?;
    if kind == BounceKind::Complaint {
        // An abuse report names the recipient in Original-Rcpt-To, else in the enclosed To.
        recipient = recipient.or(original_to);
    }
    let verp = recipients
        .iter()
        .find_map(|r| parse_verp(r))
        .or(report_verp)
        .or_else(|| {
            ["X-Original-To", "Delivered-To", "To"]
                .iter()
                .find_map(|h| {
                    message
                        .header_raw(*h)
                        .and_then(|value| value.split([',', '<', '>', ' ']).find_map(parse_verp))
                })
        });
    Ok(BounceReport {
        kind,
        message_id: original_id.map(|id| id.trim().trim_matches(['<', '>']).to_string()),
        verp,
        recipient: recipient.map(|r| strip_address_type(&r)),
        original_recipient: original_recipient.map(|r| strip_address_type(&r)),
        status,
        diagnostic,
    })
}

/// `bounces+42.TAG@acme.example` -> message 42 with its tag; `bounces+42@...` -> 42 without.
pub fn parse_verp(address: &str) -> Option<Verp> {
    let local = address.trim().split('@').next()?;
    let detail = local.rsplit_once('+')?.1;
    let (id, tag) = match detail.split_once('.') {
        Some((id, tag)) => (id, Some(tag.to_string())),
        None => (detail, None),
    };
    Some(Verp {
        message: id.parse().ok()?,
        tag,
    })
}

/// The other way round: `bounces@acme.example`, 42 and TAG -> `bounces+42.TAG@acme.example`
/// (VERP addresses and the tagged Reply-To alike).
pub fn tagged_address(base: &lettre::Address, message: i64, tag: &str) -> Option<lettre::Address> {
    format!("{}+{message}.{tag}@{}", base.user(), base.domain())
        .parse()
        .ok()
}

/// The one address of a header; `None` when it holds none or several (a report naming many
/// recipients must not get several guesses at the right one).
fn single_address(header: Option<&mail_parser::Address<'_>>) -> Option<String> {
    let mut addresses = header?.iter().filter_map(|a| a.address());
    let first = addresses.next()?;
    addresses.next().is_none().then(|| first.to_string())
}

fn part_text(raw: &[u8], part: &mail_parser::MessagePart<'_>) -> String {
    let start = part.offset_body as usize;
    let end = (part.offset_end as usize).min(raw.len());
    if start >= end {
        return String::new();
    }
    String::from_utf8_lossy(&raw[start..end]).into_owned()
}

#[derive(Default)]
struct RecipientFields {
    action: Option<String>,
    status: Option<String>,
    final_recipient: Option<String>,
    original_recipient: Option<String>,
    diagnostic: Option<String>,
}

/// The per-recipient block that reports a failure (or a delay), from a delivery-status body.
fn failed_recipient_fields(body: &str) -> RecipientFields {
    let unfolded = body
        .replace("\r\n", "\n")
        .replace("\n ", " ")
        .replace("\n\t", " ");
    let blocks: Vec<&str> = unfolded.split("\n\n").collect();
    let fields_of = |block: &str| RecipientFields {
        action: field(block, "action").map(|a| a.to_ascii_lowercase()),
        status: field(block, "status")
            .map(|s| s.split_whitespace().next().unwrap_or_default().to_string()),
        final_recipient: field(block, "final-recipient"),
        original_recipient: field(block, "original-recipient"),
        diagnostic: field(block, "diagnostic-code"),
    };
    blocks
        .iter()
        .skip(1)
        .map(|b| fields_of(b))
        .find(|f| matches!(f.action.as_deref(), Some("failed" | "delayed")))
        .unwrap_or_else(|| {
            blocks
                .iter()
                .skip(1)
                .map(|b| fields_of(b))
                .find(|f| f.status.is_some())
                .unwrap_or_default()
        })
}

/// The value of a `Name: value` line (case-insensitive), unfolded.
fn field(text: &str, name: &str) -> Option<String> {
    let unfolded = text
        .replace("\r\n", "\n")
        .replace("\n ", " ")
        .replace("\n\t", " ");
    unfolded.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

/// `rfc822; user@example.com` -> `user@example.com`.
fn strip_address_type(value: &str) -> String {
    value
        .split_once(';')
        .map_or(value, |(_, address)| address)
        .trim()
        .trim_matches(['<', '>'])
        .to_string()
}

/// Records a report against its message and suppresses the address where it must. Every path
/// (the MTA's pipe, the webhook) comes here, so the same rules hold for all.
///
/// A report must name its message verifiably (see [`message_of`]) and report the message's
/// own recipient; otherwise nothing is recorded and the error says why. Only the authenticated
/// webhook ([`Sender::Provider`]) may name an address without a message.
pub async fn apply(
    store: &SharedStore,
    report: &BounceReport,
    rules: &BounceRules,
    sender: Sender,
) -> Result<Applied, BounceError> {
    let Some(entry) = message_of(store, report, rules).await? else {
        return match (sender, &report.recipient) {
            (Sender::Provider, Some(email)) => {
                let suppressed = suppress_if_due(store, report, rules, email).await?;
                Ok(Applied {
                    message: None,
                    email: Some(email.clone()),
                    kind: report.kind,
                    suppressed,
                    repeated: false,
                })
            }
            _ => Err(report.unknown()),
        };
    };
    let email = recipient_of(report, &entry)?;
    let detail = serde_json::json!({
        "recipient": report.recipient,
        "status": report.status,
        "diagnostic": report.diagnostic,
    });
    // Once per message and kind: a repeated soft bounce must not count twice.
    let first = store
        .record_message_event_once(entry.id, report.kind.event(), "", &detail)
        .await?;
    let suppressed = suppress_if_due(store, report, rules, &email).await?;
    Ok(Applied {
        message: Some(entry.id),
        email: Some(email),
        kind: report.kind,
        suppressed,
        repeated: !first,
    })
}

impl BounceReport {
    fn unknown(&self) -> BounceError {
        BounceError::UnknownMessage {
            message_id: self.message_id.clone(),
            verp: self.verp.as_ref().map(|v| v.message),
        }
    }
}

/// The sent message a report is about, if it names one: by its VERP address, which must carry
/// the right signature, else by its Message-ID, which a stranger cannot guess. Unsigned forms
/// count only for messages sent unsigned, within `bounces.unsigned_grace`.
async fn message_of(
    store: &SharedStore,
    report: &BounceReport,
    rules: &BounceRules,
) -> Result<Option<LogEntry>, BounceError> {
    if let Some(verp) = &report.verp {
        if let Some(tag) = &verp.tag
            && !rules.tags.verp_matches(verp.message, tag)
        {
            return Err(BounceError::Unverified(format!(
                "the VERP address names message {} with a signature we did not make (forged, or \
                 signed with another links secret)",
                verp.message
            )));
        }
        let entry = sent(store.message(verp.message).await?).ok_or_else(|| report.unknown())?;
        if verp.tag.is_none() {
            rules.unsigned_allowed(&entry, "its VERP address carries no signature")?;
        }
        return Ok(Some(entry));
    }
    let Some(message_id) = &report.message_id else {
        return Ok(None);
    };
    let entry =
        sent(store.message_by_message_id(message_id).await?).ok_or_else(|| report.unknown())?;
    let tagged = entry
        .message_id
        .as_deref()
        .is_some_and(|id| rules.tags.message_id_is_tagged(entry.id, id));
    if !tagged {
        rules.unsigned_allowed(&entry, "its Message-ID is of the old, unsigned form")?;
    }
    Ok(Some(entry))
}

/// Only a message that went out (or may have) can bounce, or be answered.
pub fn sent(entry: Option<LogEntry>) -> Option<LogEntry> {
    entry.filter(|e| {
        e.message_id.is_some() && matches!(e.state, MessageState::Sent | MessageState::Unknown)
    })
}

impl BounceRules {
    /// Whether an unsigned report may name `entry`: only one sent before signing began, and
    /// only within the grace.
    fn unsigned_allowed(&self, entry: &LogEntry, why: &str) -> Result<(), BounceError> {
        let id = entry.id;
        let signed = entry
            .message_id
            .as_deref()
            .is_some_and(|m| self.tags.message_id_is_tagged(id, m));
        if signed {
            return Err(BounceError::Unverified(format!(
                "the report names message {id} but {why}, while that message went out signed"
            )));
        }
        let sent_at = entry.sent_at.unwrap_or(entry.updated_at);
        if Utc::now() - sent_at > self.unsigned_grace {
            return Err(BounceError::Unverified(format!(
                "the report names message {id} but {why}; unsigned reports are believed only \
                 within bounces.unsigned_grace ({}) of sending",
                crate::rules::format_duration(self.unsigned_grace)
            )));
        }
        Ok(())
    }
}

/// The message's recipient, when the report names it (compared lower-cased): a DSN's
/// Final-Recipient or Original-Recipient, an ARF's reported recipient, a webhook's `email`.
fn recipient_of(report: &BounceReport, entry: &LogEntry) -> Result<String, BounceError> {
    let message = entry.id;
    let named: Vec<String> = [&report.recipient, &report.original_recipient]
        .into_iter()
        .flatten()
        .map(|r| normalize_email(&strip_address_type(r)))
        .collect();
    if named.is_empty() {
        return Err(BounceError::NoRecipient { message });
    }
    // A sent message always has its address recorded (with the send, in one write).
    match entry.email.clone() {
        Some(sent_to) if named.contains(&normalize_email(&sent_to)) => Ok(sent_to),
        _ => Err(BounceError::WrongRecipient {
            message,
            reported: named,
        }),
    }
}

/// Suppresses `email` for a hard bounce or a complaint, or once the soft bounces of its
/// messages (one per message) reach the limit. `true` when the address is suppressed.
async fn suppress_if_due(
    store: &SharedStore,
    report: &BounceReport,
    rules: &BounceRules,
    email: &str,
) -> Result<bool, BounceError> {
    let limit = rules.soft_bounce_limit;
    let reason = match report.kind {
        BounceKind::Hard => format!(
            "hard bounce {} {}",
            report.status.as_deref().unwrap_or_default(),
            report.diagnostic.as_deref().unwrap_or_default()
        ),
        BounceKind::Complaint => "the recipient reported a message as spam".to_string(),
        BounceKind::Soft => {
            let count = store
                .events_for_address(email, BounceKind::Soft.event())
                .await?;
            if count < limit {
                return Ok(false);
            }
            format!("{count} soft bounces (limit {limit})")
        }
    };
    let source = if report.kind == BounceKind::Complaint {
        "complaint"
    } else {
        "bounce"
    };
    store.suppress(email, reason.trim(), source).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DSN: &str = "From: MAILER-DAEMON@mx.example\r\nTo: bounces+42.00112233445566778899@acme.example\r\nSubject: Undelivered Mail\r\nMessage-ID: <dsn-1@mx.example>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\nFinal-Recipient: rfc822; ada@example.com\r\nOriginal-Recipient: rfc822; ada@old.example\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 No such user\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: hello@acme.example\r\nTo: ada@example.com\r\nMessage-ID: <42.thank-you@acme.example>\r\nSubject: Thank you\r\n--B--\r\n";

    #[test]
    fn a_delivery_status_notification_is_read() {
        let report = parse_report(DSN.as_bytes(), &[]).unwrap();
        assert_eq!(report.kind, BounceKind::Hard);
        assert_eq!(
            report.message_id.as_deref(),
            Some("42.thank-you@acme.example")
        );
        assert_eq!(
            report.verp,
            Some(Verp {
                message: 42,
                tag: Some("00112233445566778899".into())
            })
        );
        assert_eq!(report.recipient.as_deref(), Some("ada@example.com"));
        assert_eq!(
            report.original_recipient.as_deref(),
            Some("ada@old.example")
        );
        assert_eq!(report.status.as_deref(), Some("5.1.1"));
        assert!(report.diagnostic.unwrap().contains("No such user"));
    }

    #[test]
    fn a_delay_is_a_soft_bounce_and_plain_mail_is_no_report() {
        let delayed = DSN
            .replace("Action: failed", "Action: delayed")
            .replace("Status: 5.1.1", "Status: 4.2.2");
        assert_eq!(
            parse_report(delayed.as_bytes(), &[]).unwrap().kind,
            BounceKind::Soft
        );
        let plain = "From: a@b\r\nTo: c@d\r\nSubject: hi\r\n\r\nhello\r\n";
        assert!(matches!(
            parse_report(plain.as_bytes(), &[]),
            Err(BounceError::NotAReport(_))
        ));
    }

    #[test]
    fn verp_addresses_are_read_with_and_without_their_signature() {
        let verp = |message, tag: Option<&str>| {
            Some(Verp {
                message,
                tag: tag.map(str::to_string),
            })
        };
        assert_eq!(parse_verp("bounces+7@acme.example"), verp(7, None));
        assert_eq!(
            parse_verp("bounces+7.abc123@acme.example"),
            verp(7, Some("abc123"))
        );
        assert_eq!(
            parse_verp("BOUNCES+7.ABC@acme.example"),
            verp(7, Some("ABC"))
        );
        assert_eq!(parse_verp("bounces+7.@acme.example"), verp(7, Some("")));
        assert_eq!(parse_verp("bounces@acme.example"), None);
        assert_eq!(parse_verp("bounces+x.abc@acme.example"), None);
        assert_eq!(parse_verp(""), None);
    }

    #[test]
    fn a_complaint_names_its_recipient_by_original_rcpt_to_else_by_a_single_enclosed_to() {
        let arf = |rcpt: &str, to: &str| {
            format!(
                "From: fbl@isp.example\r\nTo: fbl@acme.example\r\nSubject: report\r\nMIME-Version: 1.0\r\n\
                 Content-Type: multipart/report; report-type=feedback-report; boundary=\"B\"\r\n\r\n\
                 --B\r\nContent-Type: text/plain\r\n\r\nabuse\r\n\
                 --B\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n{rcpt}\
                 \r\n--B\r\nContent-Type: message/rfc822\r\n\r\nFrom: hello@acme.example\r\nTo: {to}\r\n\
                 Message-ID: <1.t.welcome@acme.example>\r\nSubject: hi\r\n\r\nhello\r\n--B--\r\n"
            )
        };
        let recipient = |text: String| parse_report(text.as_bytes(), &[]).unwrap().recipient;
        assert_eq!(
            recipient(arf(
                "Original-Rcpt-To: <hedy@yahoo.com>\r\n",
                "Other <x@y.example>"
            )),
            Some("hedy@yahoo.com".into())
        );
        assert_eq!(
            recipient(arf("", "Hedy <hedy@yahoo.com>")),
            Some("hedy@yahoo.com".into())
        );
        assert_eq!(
            recipient(arf("", "a@yahoo.com, b@yahoo.com, hedy@yahoo.com")),
            None,
            "a To with many addresses names no one"
        );
    }
}
