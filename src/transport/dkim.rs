//! DKIM signing keys, read once at startup: the kind of key is checked against
//! `dkim.algorithm`, so a wrong key is a clear error at start, not a bad signature later.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use lettre::message::dkim::{
    DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm,
    DkimSigningKey,
};
use lettre::message::header::HeaderName;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;

use super::settings::{self as transport_settings, DkimAlgorithm};
use crate::settings::SecretSource;

/// The PKCS#8 prefix of an Ed25519 private key; the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Headers signed: those a receiver shows or acts on, the one-click unsubscribe pair included
/// (Gmail requires List-Unsubscribe-Post to be signed).
const SIGNED_HEADERS: [&str; 7] = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// A loaded signing config. Its `Debug` shows the selector and domain, never the key.
pub struct Dkim {
    pub config: DkimConfig,
    selector: String,
    domain: String,
}

impl std::fmt::Debug for Dkim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dkim")
            .field("selector", &self.selector)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// Loads the key and builds the signing config.
pub fn load(settings: &transport_settings::DkimConfig) -> Result<Dkim, String> {
    let source = SecretSource {
        env: settings.key_env.clone(),
        file: settings.key_file.clone(),
        credential: settings.key_credential.clone(),
    };
    let pem = source
        .read("dkim key")?
        .ok_or("dkim: set key_file, key_env or key_credential to the private key")?;
    let key = signing_key(pem.expose(), settings.algorithm)?;
    let headers = SIGNED_HEADERS
        .iter()
        .map(|name| HeaderName::new_from_ascii_str(name))
        .collect();
    let relaxed = DkimCanonicalization {
        header: DkimCanonicalizationType::Relaxed,
        body: DkimCanonicalizationType::Relaxed,
    };
    let config = DkimConfig::new(
        settings.selector.clone(),
        settings.domain.clone(),
        key,
        headers,
        relaxed,
    );
    Ok(Dkim {
        config,
        selector: settings.selector.clone(),
        domain: settings.domain.clone(),
    })
}

fn signing_key(pem: &str, algorithm: DkimAlgorithm) -> Result<DkimSigningKey, String> {
    let kind = |found: &str| match algorithm {
        DkimAlgorithm::Rsa => format!("dkim.algorithm is \"rsa\" but the key is {found}"),
        DkimAlgorithm::Ed25519 => format!("dkim.algorithm is \"ed25519\" but the key is {found}"),
    };
    let wrong = |e: &dyn std::fmt::Display| format!("the DKIM key cannot be read: {e}");
    if let Some(der) = pem_body(pem, "RSA PRIVATE KEY") {
        let _ = der?;
        if algorithm != DkimAlgorithm::Rsa {
            return Err(kind("an RSA key"));
        }
        return DkimSigningKey::new(pem.trim(), DkimSigningAlgorithm::Rsa).map_err(|e| wrong(&e));
    }
    let Some(der) = pem_body(pem, "PRIVATE KEY") else {
        return Err("the DKIM key is not a PEM private key (expected -----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----)".into());
    };
    let der = der?;
    if der.len() == 48 && der[..16] == ED25519_PKCS8_PREFIX {
        if algorithm != DkimAlgorithm::Ed25519 {
            return Err(kind("an Ed25519 key"));
        }
        return DkimSigningKey::new(&STANDARD.encode(&der[16..]), DkimSigningAlgorithm::Ed25519)
            .map_err(|e| wrong(&e));
    }
    let rsa = rsa::RsaPrivateKey::from_pkcs8_der(&der)
        .map_err(|_| kind("neither an RSA nor an Ed25519 key"))?;
    if algorithm != DkimAlgorithm::Rsa {
        return Err(kind("an RSA key"));
    }
    let pkcs1 = rsa
        .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
        .map_err(|e| wrong(&e))?;
    DkimSigningKey::new(&pkcs1, DkimSigningAlgorithm::Rsa).map_err(|e| wrong(&e))
}

/// The DER inside `-----BEGIN {label}-----`, if the text has that block.
fn pem_body(pem: &str, label: &str) -> Option<Result<Vec<u8>, String>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = pem[start..].find(&end)? + start;
    let body: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    Some(
        STANDARD
            .decode(body)
            .map_err(|e| format!("the DKIM key's PEM is damaged: {e}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n-----END PRIVATE KEY-----\n";

    #[test]
    fn an_ed25519_key_loads_and_the_wrong_kind_is_named() {
        assert!(signing_key(ED25519, DkimAlgorithm::Ed25519).is_ok());
        let error = signing_key(ED25519, DkimAlgorithm::Rsa).err().unwrap();
        assert!(
            error.contains("\"rsa\" but the key is an Ed25519 key"),
            "{error}"
        );
        let error = signing_key("not a key", DkimAlgorithm::Rsa).err().unwrap();
        assert!(error.contains("not a PEM private key"), "{error}");
    }
}
