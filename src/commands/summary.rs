//! What `touchpoint check` tells a newcomer after the validation passed: the rules loaded, the
//! templates found, where mail goes (and whether the relay answers), the HTTP listener's
//! address, and who can see the owner's page. Also the hint when the directories the config
//! names are missing (`touchpoint default-config > x.toml` in an empty directory).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::io::AsyncReadExt as _;

use crate::config::Config;
use crate::playbook::Playbook;
use crate::transport::{TlsMode, TransportKind};

/// Fails, saying what to do, when the rules or templates directory does not exist.
pub(super) fn require_directories(config: &Config) -> Result<()> {
    let missing: Vec<String> = [
        ("rules.dir", &config.rules.dir),
        ("templates.dir", &config.templates.dir),
    ]
    .into_iter()
    .filter(|(_, dir)| !dir.is_dir())
    .map(|(key, dir)| format!("{key} ({})", dir.display()))
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let verb = if missing.len() == 1 { "does" } else { "do" };
    bail!(
        "{}: {} {verb} not exist. The example config expects the layout `touchpoint init DIR` \
         writes (DIR/config/touchpoint.toml, DIR/config/rules/, DIR/templates/, DIR/var/): run \
         `touchpoint init DIR` for a working setup to start from, or create these directories \
         (rules: *.toml files with [[rule]] tables; templates: NAME.html.hbs and NAME.txt.hbs \
         pairs) or point the keys at yours",
        config.path.display(),
        missing.join(" and ")
    )
}

/// The summary lines, one per subject.
pub(super) async fn summary(config: &Config, playbook: &Playbook) -> Vec<String> {
    vec![
        rules_line(config, playbook),
        templates_line(config, playbook),
        transport_line(config).await,
        listener_line(config),
        owner_page_line(config).await,
    ]
}

fn rules_line(config: &Config, playbook: &Playbook) -> String {
    let rules = &playbook.rules.rules;
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    let enabled = rules.iter().filter(|r| r.enabled).count();
    format!(
        "rules: {} loaded from {} ({enabled} enabled): {}",
        rules.len(),
        config.rules.dir.display(),
        if names.is_empty() {
            "none yet".to_string()
        } else {
            names.join(", ")
        }
    )
}

fn templates_line(config: &Config, playbook: &Playbook) -> String {
    let names = playbook.templates.names();
    format!(
        "templates: {} found in {} ({})",
        names.len(),
        config.templates.dir.display(),
        names.join(", ")
    )
}

/// Where mail goes; for SMTP, whether the relay answers now (it may be down for a while: that
/// is reported, not a failed check).
async fn transport_line(config: &Config) -> String {
    let transport = &config.transport;
    match transport.kind {
        TransportKind::File => format!(
            "transport: file: each message is written as an .eml file into {} (nothing is mailed)",
            transport.file.dir.display()
        ),
        TransportKind::Smtp => {
            let smtp = &transport.smtp;
            let wait = smtp.timeout.to_std().unwrap_or(Duration::from_secs(30));
            let target = format!("{}:{}", smtp.host, smtp.port);
            match relay_answers(&target, smtp.tls, wait.min(Duration::from_secs(10))).await {
                Ok(greeting) => format!("transport: smtp {target}: reachable ({greeting})"),
                Err(why) => format!(
                    "transport: smtp {target}: NOT reachable ({why}); messages wait until it is"
                ),
            }
        }
    }
}

/// Connects to the relay and reads its greeting (with implicit TLS, only connects).
async fn relay_answers(target: &str, tls: TlsMode, wait: Duration) -> Result<String, String> {
    let connect = tokio::net::TcpStream::connect(target);
    let mut stream = match tokio::time::timeout(wait, connect).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(error.to_string()),
        Err(_) => return Err(format!("no connection within {wait:?}")),
    };
    if tls == TlsMode::Tls {
        return Ok("accepts connections".into());
    }
    let mut buffer = [0u8; 512];
    let read = match tokio::time::timeout(wait, stream.read(&mut buffer)).await {
        Ok(Ok(read)) => read,
        Ok(Err(error)) => return Err(error.to_string()),
        Err(_) => return Err(format!("no greeting within {wait:?}")),
    };
    let greeting = String::from_utf8_lossy(&buffer[..read]);
    let first = greeting
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    if first.starts_with("220") {
        Ok(first)
    } else {
        Err(format!("it greets with {first:?}"))
    }
}

fn listener_line(config: &Config) -> String {
    let listen = config.http.listen.trim();
    if listen.is_empty() {
        return "http: off (http.listen is empty): no owner's page, and no unsubscribe links \
                unless links.base_url is set"
            .into();
    }
    let links = config.links_base_url().unwrap_or_default();
    format!("http: listening on {listen}; links in messages point at {links}")
}

/// Who can see the owner's page, by the same rule the daemon applies at start.
async fn owner_page_line(config: &Config) -> String {
    let listen = config.http.listen.trim();
    if listen.is_empty() || !config.web.enabled {
        return "owner's page: off (web.enabled = false or no http.listen)".into();
    }
    let has_password = config
        .web
        .password_hash
        .as_deref()
        .is_some_and(|h| !h.trim().is_empty());
    if has_password {
        return format!("owner's page: http://{listen}/ asks for the password");
    }
    let Some(address) = resolve(listen).await else {
        return format!(
            "owner's page: http://{listen}/ (cannot resolve {listen} to tell who may see it)"
        );
    };
    match crate::web::client::exposure(address, config.links.base_url.as_deref()) {
        Some(reason) => format!(
            "owner's page: OFF, because web.password_hash is not set and {reason}; set one with \
             `touchpoint hash-password`"
        ),
        None => format!(
            "owner's page: http://{listen}/ needs no password, and only browsers on this machine see it"
        ),
    }
}

async fn resolve(listen: &str) -> Option<SocketAddr> {
    if let Ok(address) = listen.parse() {
        return Some(address);
    }
    tokio::net::lookup_host(listen).await.ok()?.next()
}
