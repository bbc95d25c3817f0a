//! DKIM in tests: a fresh key made with `openssl`, its TXT record, and an independent verifier
//! (dkimpy, Debian `python3-dkim`) that checks a message against that record.

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

pub const DKIM_SELECTOR: &str = "s2025";
const PYTHON: &str = "/usr/bin/python3";

/// dkimpy, with the selector's TXT record given instead of looked up.
const VERIFY_PY: &str = r#"
import sys, dkim
message = open(sys.argv[1], 'rb').read()
record = open(sys.argv[2], 'rb').read()
def dns(name, timeout=5):
    return record if name == sys.argv[3].encode() else None
sys.exit(0 if dkim.verify(message, dnsfunc=dns) else 1)
"#;

pub fn run(program: &str, args: &[&str], dir: &Path) -> Vec<u8> {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (Debian package openssl): {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// A new private key in `dir/name` (PKCS#8 PEM) and its DKIM TXT record.
pub fn dkim_key(dir: &Path, name: &str, algorithm: &str) -> String {
    let spec: &[&str] = match algorithm {
        "rsa" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        _ => &["-algorithm", "ED25519"],
    };
    let mut args = vec!["genpkey"];
    args.extend_from_slice(spec);
    args.extend_from_slice(&["-out", name]);
    run("openssl", &args, dir);
    let der = run(
        "openssl",
        &["pkey", "-in", name, "-pubout", "-outform", "DER"],
        dir,
    );
    let p = match algorithm {
        // RSA: p= is the SubjectPublicKeyInfo; Ed25519 (RFC 8463): the bare 32-byte key.
        "rsa" => STANDARD.encode(&der),
        _ => STANDARD.encode(&der[der.len() - 32..]),
    };
    format!("v=DKIM1; k={algorithm}; p={p}")
}

/// Whether dkimpy accepts the message with this TXT record at `s2025._domainkey.acme.example`.
pub fn dkimpy_verifies(dir: &Path, message: &[u8], record: &str) -> bool {
    let probe = Command::new(PYTHON)
        .args(["-c", "import dkim, nacl"])
        .output()
        .expect("python3 runs");
    assert!(
        probe.status.success(),
        "the DKIM check needs dkimpy for {PYTHON}: apt-get install python3-dkim ({})",
        String::from_utf8_lossy(&probe.stderr)
    );
    std::fs::write(dir.join("message.eml"), message).expect("write");
    std::fs::write(dir.join("record.txt"), record).expect("write");
    std::fs::write(dir.join("verify.py"), VERIFY_PY).expect("write");
    let status = Command::new(PYTHON)
        .args([
            "verify.py",
            "message.eml",
            "record.txt",
            &format!("{DKIM_SELECTOR}._domainkey.acme.example."),
        ])
        .current_dir(dir)
        .status()
        .expect("python3 runs");
    status.success()
}

pub fn dkim_section(algorithm: &str) -> String {
    format!(
        "\n[dkim]\nselector = \"{DKIM_SELECTOR}\"\ndomain = \"acme.example\"\nalgorithm = \"{algorithm}\"\nkey_file = \"dkim.pem\"\n"
    )
}
