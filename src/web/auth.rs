//! Who may see the owner's page: the password (Argon2id, PHC string in the config), the session
//! cookie (HMAC-signed, with an expiry), CSRF tokens tied to the session, and a per-address limit
//! on failed logins.
//!
//! A session cookie is `v1.<expires unix seconds>.<nonce>.<tag>`, the tag being
//! HMAC-SHA256(key, "session|expires|nonce|fingerprint of the password hash") cut to 128 bits:
//! changing the password ends every session, and logging out revokes the nonce in memory until
//! the cookie would have expired anyway. The key is generated once and kept in the database
//! (`settings.web_session_key`), so every replica accepts the same cookies.
//!
//! A CSRF token is HMAC(key, "csrf|" + binding), where the binding is the session's nonce, or,
//! before login (the login form) and on a loopback-only page without a password, the value of
//! the `tp_csrf` cookie. A forged form from another site knows neither.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

pub const SESSION_COOKIE: &str = "tp_session";
pub const CSRF_COOKIE: &str = "tp_csrf";

/// Failed logins an address may make within `LOGIN_WINDOW` before it must wait.
pub const MAX_FAILED_LOGINS: u32 = 5;
pub const LOGIN_WINDOW: Duration = Duration::from_secs(15 * 60);

/// The PHC string of `password` (Argon2id, the crate's default parameters, a random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    let bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&bytes).map_err(|e| format!("cannot make a salt: {e}"))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Whether `hash` is a PHC string this build can verify against.
pub fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash.trim()).map_err(|e| {
        format!("not a password hash ({e}); make one with `touchpoint hash-password`")
    })?;
    if !parsed.algorithm.as_str().starts_with("argon2") {
        return Err(format!(
            "the algorithm {} is not supported; make an Argon2 hash with `touchpoint hash-password`",
            parsed.algorithm
        ));
    }
    Ok(())
}

/// Checks `password` against the PHC string (slow on purpose: run it off the async threads).
pub fn verify_password(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash.trim()) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A session that a valid cookie stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub nonce: String,
    pub expires: i64,
}

/// Signs and checks sessions and CSRF tokens; remembers logged-out sessions and failed logins.
pub struct Keys {
    key: Vec<u8>,
    /// Part of every session's tag: a new password hash ends old sessions.
    fingerprint: String,
    revoked: Mutex<HashMap<String, i64>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("key", &"***").finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    first: Instant,
}

/// A random 256-bit value, base64url.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

impl Keys {
    pub fn new(key: &[u8], password_hash: Option<&str>) -> Keys {
        let fingerprint = password_hash
            .map(|h| hex(&Sha256::digest(h.trim().as_bytes())[..8]))
            .unwrap_or_default();
        Keys {
            key: key.to_vec(),
            fingerprint,
            revoked: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn tag(&self, message: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(message.as_bytes());
        URL_SAFE_NO_PAD.encode(&mac.finalize().into_bytes()[..16])
    }

    fn session_message(&self, expires: i64, nonce: &str) -> String {
        format!("session|{expires}|{nonce}|{}", self.fingerprint)
    }

    /// A new session lasting until `expires`, and its cookie value.
    pub fn new_session(&self, expires: DateTime<Utc>) -> (Session, String) {
        let session = Session {
            nonce: random_token(),
            expires: expires.timestamp(),
        };
        let tag = self.tag(&self.session_message(session.expires, &session.nonce));
        let cookie = format!("v1.{}.{}.{tag}", session.expires, session.nonce);
        (session, cookie)
    }

    /// The session a cookie value stands for, if its tag is right, it has not expired and it
    /// was not logged out.
    pub fn session(&self, cookie: &str, now: DateTime<Utc>) -> Option<Session> {
        let mut parts = cookie.split('.');
        let (version, expires, nonce, tag) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "v1" || parts.next().is_some() || nonce.is_empty() {
            return None;
        }
        let expires: i64 = expires.parse().ok()?;
        let wanted = self.tag(&self.session_message(expires, nonce));
        if !constant_time_eq(tag.as_bytes(), wanted.as_bytes()) || expires <= now.timestamp() {
            return None;
        }
        if self
            .revoked
            .lock()
            .map(|r| r.contains_key(nonce))
            .unwrap_or(true)
        {
            return None;
        }
        Some(Session {
            nonce: nonce.to_string(),
            expires,
        })
    }

    /// Logging out: the session's cookie no longer works, here, even if someone kept a copy.
    pub fn revoke(&self, session: &Session, now: DateTime<Utc>) {
        if let Ok(mut revoked) = self.revoked.lock() {
            revoked.retain(|_, expires| *expires > now.timestamp());
            revoked.insert(session.nonce.clone(), session.expires);
        }
    }

    /// The CSRF token for forms shown with this binding (a session nonce or a `tp_csrf` value).
    pub fn csrf_token(&self, binding: &str) -> String {
        self.tag(&format!("csrf|{binding}"))
    }

    pub fn csrf_ok(&self, binding: &str, presented: &str) -> bool {
        !binding.is_empty()
            && constant_time_eq(presented.as_bytes(), self.csrf_token(binding).as_bytes())
    }

    /// `Err(seconds to wait)` when `ip` failed too often lately.
    pub fn login_allowed(&self, ip: IpAddr) -> Result<(), u64> {
        let Ok(mut failures) = self.failures.lock() else {
            return Err(60);
        };
        let now = Instant::now();
        failures.retain(|_, f| now.duration_since(f.first) < LOGIN_WINDOW);
        match failures.get(&ip) {
            Some(f) if f.count >= MAX_FAILED_LOGINS => {
                let wait = LOGIN_WINDOW.saturating_sub(now.duration_since(f.first));
                Err(wait.as_secs().max(1))
            }
            _ => Ok(()),
        }
    }

    pub fn login_failed(&self, ip: IpAddr) {
        if let Ok(mut failures) = self.failures.lock() {
            let now = Instant::now();
            let entry = failures.entry(ip).or_insert(Failures {
                count: 0,
                first: now,
            });
            if now.duration_since(entry.first) >= LOGIN_WINDOW {
                *entry = Failures {
                    count: 0,
                    first: now,
                };
            }
            entry.count += 1;
        }
    }

    pub fn login_succeeded(&self, ip: IpAddr) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(&ip);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares without an early exit, so timing does not reveal how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    #[test]
    fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        check_hash(&hash).unwrap();
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horse "));
        assert!(check_hash("hunter2").is_err());
    }

    #[test]
    fn sessions_are_signed_expire_and_can_be_revoked() {
        let keys = Keys::new(b"k", Some("$argon2id$x"));
        let now = Utc::now();
        let (session, cookie) = keys.new_session(now + TimeDelta::hours(1));
        assert_eq!(keys.session(&cookie, now), Some(session.clone()));
        assert_eq!(keys.session(&cookie, now + TimeDelta::hours(2)), None);
        // Another key, another password, or a changed expiry: not valid.
        assert_eq!(
            Keys::new(b"other", Some("$argon2id$x")).session(&cookie, now),
            None
        );
        assert_eq!(
            Keys::new(b"k", Some("$argon2id$y")).session(&cookie, now),
            None
        );
        let later = (now + TimeDelta::days(9)).timestamp();
        let forged = cookie.replacen(&session.expires.to_string(), &later.to_string(), 1);
        assert_eq!(keys.session(&forged, now), None);
        assert_eq!(keys.session("v1.1.2.3", now), None);
        keys.revoke(&session, now);
        assert_eq!(keys.session(&cookie, now), None);
    }

    #[test]
    fn csrf_tokens_are_tied_to_their_binding() {
        let keys = Keys::new(b"k", None);
        let token = keys.csrf_token("a");
        assert!(keys.csrf_ok("a", &token));
        assert!(!keys.csrf_ok("b", &token));
        assert!(!keys.csrf_ok("", &keys.csrf_token("")));
    }

    #[test]
    fn failed_logins_are_limited_per_address() {
        let keys = Keys::new(b"k", None);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..MAX_FAILED_LOGINS {
            assert!(keys.login_allowed(ip).is_ok());
            keys.login_failed(ip);
        }
        assert!(keys.login_allowed(ip).is_err());
        assert!(keys.login_allowed(other).is_ok());
        keys.login_succeeded(ip);
        assert!(keys.login_allowed(ip).is_ok());
    }
}
