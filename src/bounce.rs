//! Bounces and complaints that arrive after a message was sent: a delivery status notification
//! (RFC 3464) or an abuse report (ARF, RFC 5965) piped in by the MTA (`touchpoint bounce`), or a
//! provider's webhook (`POST /hooks/bounce`). Each is recorded as a message event; hard bounces
//! and complaints suppress the address at once, soft bounces after `bounces.soft_bounce_limit`.

use mail_parser::{MessageParser, MimeHeaders, PartType};

use crate::store::{SharedStore, StoreError};

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

/// What a report says, as far as touchpoint cares.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct BounceReport {
    #[serde(rename = "type")]
    pub kind: BounceKind,
    /// The Message-ID of the message that bounced.
    #[serde(default)]
    pub message_id: Option<String>,
    /// The message's id, from a VERP envelope sender (`bounces+42@...`).
    #[serde(skip)]
    pub verp_message: Option<i64>,
    /// The address that bounced.
    #[serde(default, alias = "email")]
    pub recipient: Option<String>,
    /// The enhanced status code, e.g. `5.1.1`.
    #[serde(default)]
    pub status: Option<String>,
    /// The server's words, or the provider's.
    #[serde(default, alias = "detail")]
    pub diagnostic: Option<String>,
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
    let mut diagnostic = None;
    let mut original_id = None;
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
                recipient = fields.recipient;
                diagnostic = fields.diagnostic;
            }
            "message/feedback-report" => {
                kind = Some(BounceKind::Complaint);
                diagnostic = field(&body, "feedback-type").map(|t| format!("feedback type: {t}"));
                recipient = recipient.or_else(|| field(&body, "original-rcpt-to"));
                // The envelope sender of the reported message: its VERP address.
                report_verp = field(&body, "original-mail-from")
                    .and_then(|from| verp_id(from.trim_matches(['<', '>', ' '])));
            }
            "message/rfc822" | "message/global" => {
                if let PartType::Message(inner) = &part.body {
                    original_id = original_id.or_else(|| inner.message_id().map(str::to_string));
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
    let verp_message = recipients
        .iter()
        .find_map(|r| verp_id(r))
        .or(report_verp)
        .or_else(|| {
            ["X-Original-To", "Delivered-To", "To"]
                .iter()
                .find_map(|h| {
                    message
                        .header_raw(*h)
                        .and_then(|value| value.split([',', '<', '>', ' ']).find_map(verp_id))
                })
        });
    Ok(BounceReport {
        kind,
        message_id: original_id.map(|id| id.trim().trim_matches(['<', '>']).to_string()),
        verp_message,
        recipient: recipient.map(|r| strip_address_type(&r)),
        status,
        diagnostic,
    })
}

/// `bounces+42@acme.example` -> 42.
pub fn verp_id(address: &str) -> Option<i64> {
    let local = address.trim().split('@').next()?;
    local.rsplit_once('+')?.1.parse().ok()
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
    recipient: Option<String>,
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
        recipient: field(block, "final-recipient").or_else(|| field(block, "original-recipient")),
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

/// Records a report against its message and suppresses the address where it must.
///
/// `address_only` allows a report that names no message we sent (the authenticated webhook).
/// Reports piped in by the MTA may come from anyone who can mail the bounce address, so they
/// must match a message that actually went out, to that address, before anyone is suppressed.
pub async fn apply(
    store: &SharedStore,
    report: &BounceReport,
    soft_limit: i64,
    address_only: bool,
) -> Result<Applied, BounceError> {
    let by_message_id = match &report.message_id {
        Some(id) => store.message_by_message_id(id).await?,
        None => None,
    };
    let entry = match (by_message_id, report.verp_message) {
        (Some(entry), _) => Some(entry),
        (None, Some(id)) => store.message(id).await?,
        (None, None) => None,
    };
    let sent = entry.as_ref().is_some_and(|e| {
        e.message_id.is_some()
            && matches!(
                e.state,
                crate::store::MessageState::Sent | crate::store::MessageState::Unknown
            )
    });
    if !address_only && !sent {
        return Err(BounceError::UnknownMessage {
            message_id: report.message_id.clone(),
            verp: report.verp_message,
        });
    }
    let email = entry
        .as_ref()
        .and_then(|e| e.email.clone())
        .or_else(|| report.recipient.clone());
    let Some(email) = email else {
        return Err(BounceError::UnknownMessage {
            message_id: report.message_id.clone(),
            verp: report.verp_message,
        });
    };
    if let Some(entry) = &entry {
        let detail = serde_json::json!({
            "recipient": report.recipient,
            "status": report.status,
            "diagnostic": report.diagnostic,
        });
        store
            .add_message_event(entry.id, report.kind.event(), &detail)
            .await?;
    } else if report.message_id.is_some() || report.verp_message.is_some() {
        return Err(BounceError::UnknownMessage {
            message_id: report.message_id.clone(),
            verp: report.verp_message,
        });
    }
    let reason = match report.kind {
        BounceKind::Hard => Some(format!(
            "hard bounce {} {}",
            report.status.as_deref().unwrap_or_default(),
            report.diagnostic.as_deref().unwrap_or_default()
        )),
        BounceKind::Complaint => Some("the recipient reported a message as spam".to_string()),
        BounceKind::Soft => {
            let count = store
                .events_for_address(&email, BounceKind::Soft.event())
                .await?;
            (count >= soft_limit).then(|| format!("{count} soft bounces (limit {soft_limit})"))
        }
    };
    let suppressed = match reason {
        Some(reason) => {
            let source = if report.kind == BounceKind::Complaint {
                "complaint"
            } else {
                "bounce"
            };
            store.suppress(&email, reason.trim(), source).await?;
            true
        }
        None => false,
    };
    Ok(Applied {
        message: entry.map(|e| e.id),
        email: Some(email),
        kind: report.kind,
        suppressed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DSN: &str = "From: MAILER-DAEMON@mx.example\r\nTo: bounces+42@acme.example\r\nSubject: Undelivered Mail\r\nMessage-ID: <dsn-1@mx.example>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\nFinal-Recipient: rfc822; ada@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 No such user\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: hello@acme.example\r\nTo: ada@example.com\r\nMessage-ID: <42.thank-you@acme.example>\r\nSubject: Thank you\r\n--B--\r\n";

    #[test]
    fn a_delivery_status_notification_is_read() {
        let report = parse_report(DSN.as_bytes(), &[]).unwrap();
        assert_eq!(report.kind, BounceKind::Hard);
        assert_eq!(
            report.message_id.as_deref(),
            Some("42.thank-you@acme.example")
        );
        assert_eq!(report.verp_message, Some(42));
        assert_eq!(report.recipient.as_deref(), Some("ada@example.com"));
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
        assert_eq!(verp_id("bounces+7@acme.example"), Some(7));
        assert_eq!(verp_id("bounces@acme.example"), None);
    }
}
