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
    Unsubscribe { message: i64 },
    Open { message: i64 },
    Click { message: i64, url: String },
}

impl Link {
    fn payload(&self) -> String {
        match self {
            Link::Unsubscribe { message } => format!("u.{message}"),
            Link::Open { message } => format!("o.{message}"),
            Link::Click { message, url } => format!("c.{message}.{url}"),
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
            _ => None,
        }
    }

    pub fn message(&self) -> i64 {
        match self {
            Link::Unsubscribe { message }
            | Link::Open { message }
            | Link::Click { message, .. } => *message,
        }
    }
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
    pub fn url(&self, link: &Link) -> String {
        let token = self.token(link);
        match link {
            Link::Unsubscribe { .. } => format!("{}/u/{token}", self.base_url),
            Link::Open { .. } => format!("{}/o/{token}.gif", self.base_url),
            Link::Click { .. } => format!("{}/c/{token}", self.base_url),
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
