//! Signed links in messages: one-click unsubscribe, the open pixel and click tracking.
//!
//! A token is `base64url(payload) "." base64url(HMAC-SHA256(payload)[..16])`. It says what it is
//! for and which message, and a click token carries its target URL, so `/c/{token}` can only
//! redirect where the message itself pointed (never an open redirect). Tags are compared in
//! constant time; a tampered or unknown token is indistinguishable from a missing page.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the HMAC tag kept in a token (128 bits).
const TAG_BYTES: usize = 16;

/// What a link does, for which message (the `messages.id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Unsubscribe {
        message: i64,
    },
    Open {
        message: i64,
    },
    Click {
        message: i64,
        url: String,
    },
    /// `{{rating_url N}}`: the page where the customer confirms score N for the message.
    Rating {
        message: i64,
        score: u8,
    },
}

impl Link {
    fn payload(&self) -> String {
        match self {
            Link::Unsubscribe { message } => format!("u.{message}"),
            Link::Open { message } => format!("o.{message}"),
            Link::Click { message, url } => format!("c.{message}.{url}"),
            Link::Rating { message, score } => format!("r.{message}.{score}"),
        }
    }

    fn parse(payload: &str) -> Option<Link> {
        let (kind, rest) = payload.split_once('.')?;
        match kind {
            "u" => Some(Link::Unsubscribe {
                message: rest.parse().ok()?,
            }),
            "o" => Some(Link::Open {
                message: rest.parse().ok()?,
            }),
            "c" => {
                let (message, url) = rest.split_once('.')?;
                Some(Link::Click {
                    message: message.parse().ok()?,
                    url: url.to_string(),
                })
            }
            "r" => {
                let (message, score) = rest.split_once('.')?;
                Some(Link::Rating {
                    message: message.parse().ok()?,
                    score: score.parse().ok()?,
                })
            }
            _ => None,
        }
    }

    pub fn message(&self) -> i64 {
        match self {
            Link::Unsubscribe { message }
            | Link::Open { message }
            | Link::Click { message, .. }
            | Link::Rating { message, .. } => *message,
        }
    }
}

/// Test sends (`touchpoint preview --send-to`) have no row in `messages`: their links, VERP
/// address and Message-ID carry a negative id instead, which no message has (ids count up from
/// 1), so the link handlers and the bounce reader can tell a test from a customer's message.
/// Percent-encodes a URL path segment or query value (everything but unreserved characters).
pub fn encode_component(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

pub fn is_test_send(message: i64) -> bool {
    message < 0
}

/// A new test-send id: negative, and different for every test send (microseconds since 1970).
pub fn new_test_send_id() -> i64 {
    -chrono::Utc::now().timestamp_micros().max(1)
}

/// Makes and checks links. The key never appears in `Debug` output.
#[derive(Clone)]
pub struct LinkSigner {
    key: Vec<u8>,
    base_url: String,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSigner")
            .field("base_url", &self.base_url)
            .field("key", &"***")
            .finish()
    }
}

impl LinkSigner {
    /// `base_url` is where customers reach the daemon's HTTP listener (no trailing slash needed).
    pub fn new(key: &[u8], base_url: &str) -> LinkSigner {
        LinkSigner {
            key: key.to_vec(),
            base_url: base_url.trim_end_matches('/').to_string(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length.
        HmacSha256::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
    }

    pub fn token(&self, link: &Link) -> String {
        let payload = link.payload();
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(&tag[..TAG_BYTES])
        )
    }

    /// The link's full URL.
    /// The owner's page about a customer (`/customers/ID` of the web page, served at the same
    /// address as the links), for messages written to the owner.
    pub fn customer_page(&self, customer_id: &str) -> String {
        format!(
            "{}/customers/{}",
            self.base_url,
            encode_component(customer_id)
        )
    }

    pub fn url(&self, link: &Link) -> String {
        let token = self.token(link);
        match link {
            Link::Unsubscribe { .. } => format!("{}/u/{token}", self.base_url),
            Link::Open { .. } => format!("{}/o/{token}.gif", self.base_url),
            Link::Click { .. } => format!("{}/c/{token}", self.base_url),
            Link::Rating { .. } => format!("{}/r/{token}", self.base_url),
        }
    }

    /// The link a token stands for, if its tag is right.
    pub fn verify(&self, token: &str) -> Option<Link> {
        let (payload, tag) = token.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        if tag.len() != TAG_BYTES {
            return None;
        }
        let mut mac = self.mac();
        mac.update(&payload);
        mac.verify_truncated_left(&tag).ok()?;
        Link::parse(std::str::from_utf8(&payload).ok()?)
    }
}

/// Bytes of a message tag (80 bits): as lowercase hex, 20 characters.
const MESSAGE_TAG_BYTES: usize = 10;

/// Tags that tie a message's id to the link secret: the signature in its VERP envelope sender
/// (`bounces+42.TAG@acme.example`) and the unguessable part of its Message-ID. The same for
/// every attempt of a message, and not computable without the secret, so a bounce or complaint
/// for a message can only come from someone who saw that message. Lowercase hex, because MTAs
/// may change the case of local parts. The key never appears in `Debug` output.
#[derive(Clone)]
pub struct MessageTags {
    key: Vec<u8>,
}

impl std::fmt::Debug for MessageTags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageTags").field("key", &"***").finish()
    }
}

/// What a message tag is for; each purpose signs its own payload, so one never stands in for
/// the other.
#[derive(Debug, Clone, Copy)]
enum TagPurpose {
    Verp,
    MessageId,
    Reply,
}

impl MessageTags {
    /// `key` is the link secret, as [`LinkSigner::new`] takes it.
    pub fn new(key: &[u8]) -> MessageTags {
        MessageTags { key: key.to_vec() }
    }

    fn mac(&self, purpose: TagPurpose, message: i64) -> HmacSha256 {
        let prefix = match purpose {
            TagPurpose::Verp => "verp",
            TagPurpose::MessageId => "message-id",
            TagPurpose::Reply => "reply",
        };
        let mut mac = HmacSha256::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(format!("{prefix}.{message}").as_bytes());
        mac
    }

    fn tag(&self, purpose: TagPurpose, message: i64) -> String {
        let digest = self.mac(purpose, message).finalize().into_bytes();
        digest[..MESSAGE_TAG_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The signature in message `message`'s VERP address.
    pub fn verp(&self, message: i64) -> String {
        self.tag(TagPurpose::Verp, message)
    }

    /// The unguessable part of message `message`'s Message-ID.
    pub fn message_id(&self, message: i64) -> String {
        self.tag(TagPurpose::MessageId, message)
    }

    /// The signature in message `message`'s Reply-To address (`replies+42.TAG@...`).
    pub fn reply(&self, message: i64) -> String {
        self.tag(TagPurpose::Reply, message)
    }

    /// Whether `tag` is message `message`'s VERP signature (any case), compared in constant
    /// time.
    pub fn verp_matches(&self, message: i64, tag: &str) -> bool {
        self.matches(TagPurpose::Verp, message, tag)
    }

    /// Whether `tag` is message `message`'s Reply-To signature (any case), in constant time.
    pub fn reply_matches(&self, message: i64, tag: &str) -> bool {
        self.matches(TagPurpose::Reply, message, tag)
    }

    fn matches(&self, purpose: TagPurpose, message: i64, tag: &str) -> bool {
        let Some(bytes) = decode_hex(tag) else {
            return false;
        };
        bytes.len() == MESSAGE_TAG_BYTES
            && self
                .mac(purpose, message)
                .verify_truncated_left(&bytes)
                .is_ok()
    }

    /// Whether a stored Message-ID carries message `message`'s tag: `false` for the untagged
    /// ids of messages sent before tags existed (or signed with another secret).
    pub fn message_id_is_tagged(&self, message: i64, message_id: &str) -> bool {
        message_id.contains(&self.message_id(message))
    }
}

/// What tells a message's clicks on different links apart, short enough for any index: a hash of
/// the URL (128 bits of SHA-256, hex).
pub fn click_key(url: &str) -> String {
    use sha2::Digest as _;
    Sha256::digest(url.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `"0aFf"` -> `[0x0a, 0xff]`; `None` for anything that is not an even number of hex digits.
fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&text[at..at + 2], 16).ok())
        .collect()
}

/// Rewrites every `href="http..."` in `html` through click tracking, except `keep` (the
/// unsubscribe link, which must work as it is).
pub fn track_clicks(
    html: &str,
    keep: Option<&str>,
    mut rewrite: impl FnMut(&str) -> String,
) -> String {
    let mut out = String::with_capacity(html.len() + 256);
    let mut rest = html;
    while let Some(start) = rest.find("href=\"") {
        let value_start = start + "href=\"".len();
        out.push_str(&rest[..value_start]);
        rest = &rest[value_start..];
        let Some(end) = rest.find('"') else { break };
        let escaped = &rest[..end];
        let target = decode_html_references(escaped);
        let is_web = target.starts_with("http://") || target.starts_with("https://");
        if is_web && Some(target.as_str()) != keep {
            out.push_str(&rewrite(&target));
        } else {
            out.push_str(escaped);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The text an attribute value stands for: `&amp;`, `&quot;`, `&#39;`, `&#x3D;` (Handlebars
/// escapes `=`, `'` and backticks this way) and the other numeric references, decoded.
fn decode_html_references(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let decoded = rest.find(';').filter(|end| *end <= 10).and_then(|end| {
            let name = &rest[1..end];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => {
                    let number = name.strip_prefix('#')?;
                    let code = match number.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => number.parse().ok()?,
                    };
                    char::from_u32(code)
                }
            }?;
            Some((c, end + 1))
        });
        match decoded {
            Some((c, used)) => {
                out.push(c);
                rest = &rest[used..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Adds the open pixel just before `</body>` (or at the end).
pub fn add_open_pixel(html: &str, pixel_url: &str) -> String {
    let image =
        format!(r#"<img src="{pixel_url}" width="1" height="1" alt="" style="display:none">"#);
    match html.rfind("</body>") {
        Some(at) => format!("{}{image}{}", &html[..at], &html[at..]),
        None => format!("{html}{image}"),
    }
}

/// A new random secret, for a database that has none yet.
pub fn new_secret() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> LinkSigner {
        LinkSigner::new(b"test secret", "https://mail.acme.example/")
    }

    #[test]
    fn the_customer_page_link_encodes_the_id() {
        assert_eq!(
            signer().customer_page("ada@example.com/x y"),
            "https://mail.acme.example/customers/ada%40example.com%2Fx%20y"
        );
        assert_eq!(encode_component("a-Z_0.~"), "a-Z_0.~");
    }

    #[test]
    fn test_send_links_round_trip_and_are_told_from_messages() {
        let s = signer();
        let id = new_test_send_id();
        assert!(is_test_send(id) && !is_test_send(1));
        for link in [
            Link::Unsubscribe { message: id },
            Link::Open { message: id },
            Link::Click {
                message: id,
                url: "https://shop.example/a.b?c=d".into(),
            },
        ] {
            let verified = s.verify(&s.token(&link)).expect("verifies");
            assert!(is_test_send(verified.message()));
            assert_eq!(verified, link);
        }
    }

    #[test]
    fn tokens_round_trip_and_urls_point_at_the_daemon() {
        let s = signer();
        for link in [
            Link::Unsubscribe { message: 42 },
            Link::Open { message: 7 },
            Link::Click {
                message: 7,
                url: "https://acme.example/shop?a=1&b=2".into(),
            },
        ] {
            assert_eq!(s.verify(&s.token(&link)), Some(link.clone()));
        }
        assert!(
            s.url(&Link::Unsubscribe { message: 1 })
                .starts_with("https://mail.acme.example/u/")
        );
        assert!(s.url(&Link::Open { message: 1 }).ends_with(".gif"));
    }

    #[test]
    fn tampered_truncated_and_foreign_tokens_are_refused() {
        let s = signer();
        let token = s.token(&Link::Unsubscribe { message: 42 });
        let (payload, tag) = token.split_once('.').unwrap();
        let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode("u.43"));
        assert_eq!(s.verify(&forged), None);
        assert_eq!(s.verify(&token[..token.len() - 2]), None);
        assert_eq!(s.verify(payload), None);
        assert_eq!(s.verify(""), None);
        assert_eq!(s.verify("!!.??"), None);
        let other = LinkSigner::new(b"another secret", "https://x");
        assert_eq!(other.verify(&token), None);
        let click = s.token(&Link::Click {
            message: 1,
            url: "https://acme.example".into(),
        });
        let (_, click_tag) = click.split_once('.').unwrap();
        let redirected = format!(
            "{}.{click_tag}",
            URL_SAFE_NO_PAD.encode("c.1.https://evil.example")
        );
        assert_eq!(s.verify(&redirected), None);
    }

    #[test]
    fn message_tags_are_lowercase_hex_per_message_and_purpose_and_need_the_secret() {
        let tags = MessageTags::new(b"test secret");
        let verp = tags.verp(42);
        assert_eq!(verp.len(), 20, "{verp}");
        assert!(
            verp.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
        );
        assert_eq!(verp, tags.verp(42), "the same on every attempt");
        assert_ne!(verp, tags.verp(43));
        assert_ne!(
            verp,
            tags.message_id(42),
            "a Message-ID tag is no VERP signature"
        );
        assert!(tags.verp_matches(42, &verp));
        assert!(tags.verp_matches(42, &verp.to_ascii_uppercase()));
        assert!(!tags.verp_matches(43, &verp));
        assert!(!tags.verp_matches(42, &tags.message_id(42)));
        assert!(
            !tags.verp_matches(42, &tags.reply(42)),
            "a reply tag is no VERP signature"
        );
        assert!(tags.reply_matches(42, &tags.reply(42).to_ascii_uppercase()));
        assert!(!tags.reply_matches(42, &verp));
        assert!(!tags.reply_matches(43, &tags.reply(42)));
        assert!(!tags.verp_matches(42, &verp[..18]));
        assert!(!tags.verp_matches(42, ""));
        assert!(!tags.verp_matches(42, "zz"));
        assert!(!tags.verp_matches(42, "é1"));
        assert!(!MessageTags::new(b"another secret").verp_matches(42, &verp));
        let id = format!("<42.{}.welcome@acme.example>", tags.message_id(42));
        assert!(tags.message_id_is_tagged(42, &id));
        assert!(!tags.message_id_is_tagged(42, "<42.welcome@acme.example>"));
        assert!(!format!("{tags:?}").contains("secret"));
    }

    #[test]
    fn links_are_rewritten_except_the_unsubscribe_link_and_non_web_links() {
        let html = r#"<a href="https://acme.example/?a=1&amp;b=2">shop</a> <a href="mailto:x@y">mail</a> <a href="https://u/1">unsubscribe</a>"#;
        let out = track_clicks(html, Some("https://u/1"), |url| format!("T[{url}]"));
        assert_eq!(
            out,
            r#"<a href="T[https://acme.example/?a=1&b=2]">shop</a> <a href="mailto:x@y">mail</a> <a href="https://u/1">unsubscribe</a>"#
        );
        assert_eq!(
            add_open_pixel("<body>x</body>", "P"),
            r#"<body>x<img src="P" width="1" height="1" alt="" style="display:none"></body>"#
        );
    }
}
