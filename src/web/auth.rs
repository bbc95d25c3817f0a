//! Who may see the owner's page: the password (Argon2id, PHC string in the config), the session
//! cookie (HMAC-signed, with an expiry), CSRF tokens tied to the session, and a per-address limit
//! on failed logins.
//!
//! A session cookie is `v1.<expires unix seconds>.<nonce>.<tag>`, the tag being
//! HMAC-SHA256(key, "session|expires|nonce|fingerprint of the password hash") cut to 128 bits:
//! changing the password ends every session, and logging out records a hash of the nonce in the
//! database (`web_session_revocations`) until the cookie would have expired anyway, so the
//! session stays ended after a restart and on every replica. The key is generated once and kept
//! in the database (`settings.web_session_key`), so every replica accepts the same cookies.
//!
//! Failed logins are limited per address, and the limit is taken before the password is
//! checked ([`Keys::reserve_login`]), so parallel attempts get no more checks than sequential
//! ones.
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

/// The configured hash taken apart once, and the memory Argon2 works in (as much as the hash
/// asks for: 19 MiB with the default parameters), allocated at the first check and reused by
/// every later one. (Freed and allocated again per check, the allocator kept a new 19 MiB
/// each time.)
struct PreparedHash {
    argon2: Argon2<'static>,
    salt: Vec<u8>,
    expected: Vec<u8>,
    memory: Vec<argon2::Block>,
}

impl PreparedHash {
    fn new(phc: &str) -> Result<PreparedHash, String> {
        let unusable = |e: &dyn std::fmt::Display| format!("the password hash cannot be used: {e}");
        let parsed = PasswordHash::new(phc.trim()).map_err(|e| unusable(&e))?;
        let algorithm = argon2::Algorithm::try_from(parsed.algorithm).map_err(|e| unusable(&e))?;
        let version = match parsed.version {
            Some(version) => argon2::Version::try_from(version).map_err(|e| unusable(&e))?,
            None => argon2::Version::default(),
        };
        let params = argon2::Params::try_from(&parsed).map_err(|e| unusable(&e))?;
        let salt = parsed.salt.ok_or_else(|| unusable(&"it has no salt"))?;
        let mut salt_bytes = [0u8; 64];
        let salt = salt
            .decode_b64(&mut salt_bytes)
            .map_err(|e| unusable(&e))?
            .to_vec();
        let expected = parsed.hash.ok_or_else(|| unusable(&"it has no hash"))?;
        Ok(PreparedHash {
            argon2: Argon2::new(algorithm, version, params),
            salt,
            expected: expected.as_bytes().to_vec(),
            memory: Vec::new(),
        })
    }

    fn verify(&mut self, password: &str) -> bool {
        let blocks = self.argon2.params().block_count();
        if self.memory.len() < blocks {
            self.memory = vec![argon2::Block::default(); blocks];
        }
        let mut out = vec![0u8; self.expected.len()];
        self.argon2
            .hash_password_into_with_memory(
                password.as_bytes(),
                &self.salt,
                &mut out,
                &mut self.memory,
            )
            .is_ok()
            && constant_time_eq(&out, &self.expected)
    }
}

/// Checks passwords one at a time on a thread of its own, in one block of memory reused by
/// every check ([`PreparedHash`]), so that parallel logins cannot add up memory. A login that
/// gets no answer within its wait is told to try again.
pub struct PasswordChecker {
    jobs: tokio::sync::mpsc::Sender<PasswordJob>,
}

struct PasswordJob {
    password: String,
    answer: tokio::sync::oneshot::Sender<bool>,
}

/// Logins that may wait in line for the checker; more wait to get in line.
const PASSWORD_QUEUE: usize = 8;

impl PasswordChecker {
    /// Starts the thread; it ends when the checker is dropped.
    pub fn start(hash: &str) -> Result<PasswordChecker, String> {
        let mut hash = PreparedHash::new(hash)?;
        let (jobs, mut queue) = tokio::sync::mpsc::channel::<PasswordJob>(PASSWORD_QUEUE);
        std::thread::Builder::new()
            .name("touchpoint-password".into())
            .spawn(move || {
                while let Some(job) = queue.blocking_recv() {
                    // Whoever asked has given up waiting: spare the work.
                    if !job.answer.is_closed() {
                        let _ = job.answer.send(hash.verify(&job.password));
                    }
                }
            })
            .map_err(|e| format!("cannot start the password checker thread: {e}"))?;
        Ok(PasswordChecker { jobs })
    }

    /// Whether `password` is right; `None` when the answer did not come within `wait`.
    pub async fn check(&self, password: String, wait: Duration) -> Option<bool> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job = PasswordJob { password, answer };
        let asked = async {
            self.jobs.send(job).await.ok()?;
            answered.await.ok()
        };
        tokio::time::timeout(wait, asked).await.ok().flatten()
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

    /// Logging out, in this process (the database keeps it for every process: see
    /// [`revocation_key`]): the session's cookie no longer works, even if someone kept a copy.
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

    /// Counts an attempt from `ip` as a failure before its password is checked, in one step
    /// under the lock, so that parallel attempts get exactly as many checks as sequential ones.
    /// `Err(seconds to wait)` when `ip` has used its `MAX_FAILED_LOGINS` within
    /// `LOGIN_WINDOW`. A right password clears the count ([`Keys::login_succeeded`]); an
    /// attempt that was not checked after all gives its place back ([`Keys::release_login`]).
    pub fn reserve_login(&self, ip: IpAddr) -> Result<(), u64> {
        let Ok(mut failures) = self.failures.lock() else {
            return Err(60);
        };
        let now = Instant::now();
        failures.retain(|_, f| now.duration_since(f.first) < LOGIN_WINDOW);
        let entry = failures.entry(ip).or_insert(Failures {
            count: 0,
            first: now,
        });
        if entry.count >= MAX_FAILED_LOGINS {
            let wait = LOGIN_WINDOW.saturating_sub(now.duration_since(entry.first));
            return Err(wait.as_secs().max(1));
        }
        entry.count += 1;
        Ok(())
    }

    /// Gives back a place taken by [`Keys::reserve_login`] for an attempt whose password was
    /// not checked.
    pub fn release_login(&self, ip: IpAddr) {
        if let Ok(mut failures) = self.failures.lock()
            && let Some(entry) = failures.get_mut(&ip)
        {
            entry.count = entry.count.saturating_sub(1);
        }
    }

    pub fn login_succeeded(&self, ip: IpAddr) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(&ip);
        }
    }
}

/// What the database keeps of a logged-out session: a hash of its nonce (the nonce alone
/// opens nothing without the key, but a hash is all a lookup needs).
pub fn revocation_key(nonce: &str) -> String {
    hex(&Sha256::digest(format!("revoked|{nonce}").as_bytes()))
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
    fn a_prepared_hash_agrees_with_the_crate_for_every_argon2_variant() {
        for algorithm in [
            argon2::Algorithm::Argon2id,
            argon2::Algorithm::Argon2i,
            argon2::Algorithm::Argon2d,
        ] {
            let params = argon2::Params::new(64, 1, 2, Some(24)).unwrap();
            let salt = SaltString::encode_b64(b"sixteen byte salt").unwrap();
            let phc = Argon2::new(algorithm, argon2::Version::V0x13, params)
                .hash_password(b"correct horse", &salt)
                .unwrap()
                .to_string();
            let mut prepared = PreparedHash::new(&phc).unwrap();
            for (password, right) in [("correct horse", true), ("correct horse ", false)] {
                assert_eq!(verify_password(&phc, password), right, "{phc}");
                assert_eq!(prepared.verify(password), right, "{phc}");
            }
        }
        assert!(PreparedHash::new("hunter2").is_err());
        assert!(PreparedHash::new("$argon2id$v=19$m=64,t=1,p=1").is_err());
    }

    #[tokio::test]
    async fn the_checker_answers_and_gives_up_after_its_wait() {
        let hash = hash_password("correct horse").unwrap();
        let checker = PasswordChecker::start(&hash).unwrap();
        let wait = Duration::from_secs(30);
        assert_eq!(
            checker.check("correct horse".into(), wait).await,
            Some(true)
        );
        assert_eq!(checker.check("wrong".into(), wait).await, Some(false));
        assert_eq!(checker.check("wrong".into(), Duration::ZERO).await, None);
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
    fn failed_logins_are_limited_per_address_before_the_check() {
        let keys = Keys::new(b"k", None);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..MAX_FAILED_LOGINS {
            assert!(keys.reserve_login(ip).is_ok());
        }
        let wait = keys.reserve_login(ip).unwrap_err();
        assert!(wait > 0 && wait <= LOGIN_WINDOW.as_secs(), "{wait}");
        assert!(keys.reserve_login(other).is_ok());
        // An attempt that was not checked gives its place back.
        keys.release_login(ip);
        assert!(keys.reserve_login(ip).is_ok());
        assert!(keys.reserve_login(ip).is_err());
        keys.login_succeeded(ip);
        assert!(keys.reserve_login(ip).is_ok());
    }

    #[test]
    fn parallel_attempts_get_no_more_checks_than_sequential_ones() {
        let keys = std::sync::Arc::new(Keys::new(b"k", None));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let threads: Vec<_> = (0..64)
            .map(|_| {
                let keys = keys.clone();
                std::thread::spawn(move || keys.reserve_login(ip).is_ok())
            })
            .collect();
        let allowed = threads
            .into_iter()
            .map(|t| t.join().unwrap_or(false))
            .filter(|ok| *ok)
            .count();
        assert_eq!(allowed, MAX_FAILED_LOGINS as usize);
    }

    #[test]
    fn revocations_are_kept_as_hashes() {
        let key = revocation_key("nonce");
        assert_eq!(key.len(), 64);
        assert!(!key.contains("nonce"));
        assert_ne!(key, revocation_key("other"));
    }
}
