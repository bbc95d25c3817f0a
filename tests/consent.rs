//! Consent and deliverability, end to end, the way the outside world meets them: a mail client
//! reading the headers, a customer (or a mailbox provider) following the links over real HTTP,
//! an MTA piping real bounce and complaint reports into the real binary, a provider calling the
//! webhook, and an independent DKIM verifier (dkimpy) checking the signatures.
//!
//! Every scenario runs the real daemon in-process (HTTP on a free loopback port, SMTP to the test
//! peer) against a real database. `links.base_url` is a public https URL with a path prefix, as
//! behind a reverse proxy; requests go to the daemon's own address with the prefix taken off,
//! as the proxy would forward them.
//!
//! Needs `openssl` and `/usr/bin/python3` with dkimpy (Debian: `openssl`, `python3-dkim`).

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{TimeZone, Utc};
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::{Value, json};
use support::dkim::{DKIM_SELECTOR, dkim_key, dkim_section, dkimpy_verifies, run};
use support::http::{HttpResponse, send};
use support::smtp::{Accepted, SmtpPeer};
use support::{Backend, InProcess, Sink, TestEnv, repo_path};
use tokio::time::Instant;
use touchpoint::links::{Link, LinkSigner, MessageTags};
use touchpoint::store::{LogEntry, LogFilter, MessageState, SharedStore, Suppression};

/// How long a scenario waits for something that should happen within a few seconds.
const PATIENCE: Duration = Duration::from_secs(20);

/// Where customers reach the daemon: through a reverse proxy, under a path.
const BASE_URL: &str = "https://mail.acme.example/touchpoint";
const LINK_SECRET: &str = "b7e151628aed2a6abf7158809cf4f3c762e7160f38b4da56";
const HOOK_SECRET: &str = "whsec_5f0c1d9e8a7b6c5d4e3f2a1b0c9d8e7f";
const SHOP_URL: &str = "https://shop.acme.example/spring?utm_source=touchpoint&id=7";
/// A link with non-ASCII characters, as template authors write them.
const IRI_URL: &str = "https://shop.acme.example/fleurs/été";
const MAILTO: &str = "mailto:unsubscribe@acme.example?subject=unsubscribe";
const FROM_LINE: &str = "from = \"Acme Flowers <hello@acme.example>\"";

const LINKS_WITH_MAILTO: &str = r#"
[links]
base_url = "https://mail.acme.example/touchpoint"
secret_file = "link-secret"
unsubscribe_mailto = "unsubscribe@acme.example"
"#;

const LINKS_PLAIN: &str = r#"
[links]
base_url = "https://mail.acme.example/touchpoint"
secret_file = "link-secret"
"#;

const BOUNCES_WITH_HOOK: &str = r#"
[bounces]
soft_bounce_limit = 2
webhook_secret_file = "hook-secret"
"#;

const BOUNCES_NO_HOOK: &str = r#"
[bounces]
soft_bounce_limit = 2
"#;

const SPRING_HTML: &str = r#"{{#> layout}}
<p style="margin:0 0 16px 0;">Hi {{default customer.first_name "there"}},</p>
<p style="margin:0 0 16px 0;">Our spring bouquets are in: <a href="https://shop.acme.example/spring?utm_source=touchpoint&amp;id=7">see them</a>, or the <a href="https://shop.acme.example/fleurs/été">French selection</a>.</p>
<p style="margin:0 0 16px 0;">Questions? <a href="mailto:hello@acme.example">Write to us</a>.</p>
{{/layout}}
"#;

const SPRING_TEXT: &str = r#"Hi {{default customer.first_name "there"}},

Our spring bouquets are in: https://shop.acme.example/spring?utm_source=touchpoint&id=7

{{> text-footer}}
"#;

/// A welcome right away and a reminder later (still waiting when the customer unsubscribes).
const WELCOME_RULES: &str = r#"
[[rule]]
name = "welcome"
template = "spring"
subject = "Welcome to Acme Flowers, {{customer.first_name}}"
when = { event = "signup", after = "1s" }

[[rule]]
name = "reminder"
template = "spring"
subject = "Still thinking about flowers, {{customer.first_name}}?"
when = { event = "signup", after = "12s" }
"#;

const TRACKING_RULES: &str = r#"
[[rule]]
name = "spring"
template = "spring"
subject = "Spring is here, {{customer.first_name}}"
when = { event = "purchase", after = "1s" }
track_opens = true
track_clicks = true

[[rule]]
name = "receipt"
template = "spring"
subject = "Your receipt"
when = { event = "receipt", after = "1s" }
"#;

const BOUNCE_RULES: &str = r#"
[[rule]]
name = "welcome"
template = "spring"
subject = "Welcome to Acme Flowers, {{customer.first_name}}"
when = { event = "signup", after = "1s" }
"#;

/// One rule of each trigger kind.
const EVERY_TRIGGER: &str = r#"
[[rule]]
name = "thanks"
template = "spring"
subject = "Thank you, {{customer.first_name}}"
when = { event = "purchase", after = "1s" }

[[rule]]
name = "anniversary"
template = "spring"
subject = "Happy anniversary, {{customer.first_name}}"
when = { anniversary_of = "wedding", at = "09:00" }

[[rule]]
name = "monthly"
template = "spring"
subject = "This month at Acme Flowers"
when = { schedule = "0 9 1 * *" }
"#;

// --- the world ---------------------------------------------------------------------------------

struct World {
    peer: SmtpPeer,
    env: TestEnv,
    store: SharedStore,
    daemon: Option<InProcess>,
}

impl World {
    /// Config: the harness's basics plus `extra`, VERP (`sender.bounce_address`), the link and
    /// webhook secrets in files, and the `spring` template.
    async fn new(backend: Backend, rules: &str, extra: &str) -> World {
        let peer = SmtpPeer::start().await;
        let env = TestEnv::new(
            backend,
            Sink::Smtp(&peer),
            &[("consent.toml", rules)],
            extra,
        )
        .await;
        let config = std::fs::read_to_string(&env.config_path).expect("config");
        assert!(config.contains(FROM_LINE), "the harness's sender changed");
        let config = config.replacen(
            FROM_LINE,
            &format!("{FROM_LINE}\nbounce_address = \"bounces@acme.example\""),
            1,
        );
        std::fs::write(&env.config_path, config).expect("config");
        std::fs::write(env.path().join("link-secret"), format!("{LINK_SECRET}\n")).expect("secret");
        std::fs::write(env.path().join("hook-secret"), format!("{HOOK_SECRET}\n")).expect("secret");
        let templates = env.path().join("templates");
        std::fs::write(templates.join("spring.html.hbs"), SPRING_HTML).expect("template");
        std::fs::write(templates.join("spring.txt.hbs"), SPRING_TEXT).expect("template");
        let store = env.store().await;
        World {
            peer,
            env,
            store,
            daemon: None,
        }
    }

    async fn start(&mut self) {
        self.daemon = Some(self.env.start().await);
    }

    async fn stop(mut self) {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop().await;
        }
    }

    fn addr(&self) -> SocketAddr {
        self.daemon.as_ref().expect("the daemon is running").http
    }

    async fn customer(&self, id: &str, email: &str, name: &str) {
        self.env
            .add_customer(&self.store, id, email, name, None)
            .await;
    }

    async fn event(&self, id: &str, customer: &str, kind: &str) {
        self.env
            .add_event(&self.store, id, customer, kind, Utc::now())
            .await;
    }

    async fn log(&self) -> Vec<LogEntry> {
        self.store.log(&LogFilter::default()).await.expect("log")
    }

    async fn entry(&self, id: i64) -> LogEntry {
        self.store
            .message(id)
            .await
            .expect("read message")
            .expect("message exists")
    }

    /// Waits until the message for `event` of `rule` is sent and the peer has it.
    async fn sent(&self, rule: &str, event: &str) -> (LogEntry, Accepted) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let log = self.log().await;
            let entry = log.iter().find(|e| {
                e.rule == rule
                    && e.event_id.as_deref() == Some(event)
                    && e.state == MessageState::Sent
            });
            if let Some(entry) = entry {
                let id = entry.message_id.clone().unwrap_or_default();
                let id = id.trim_matches(['<', '>']);
                let accepted = self
                    .peer
                    .accepted()
                    .into_iter()
                    .find(|a| a.message_id.as_deref() == Some(id));
                if let Some(accepted) = accepted {
                    return (entry.clone(), accepted);
                }
            }
            assert!(
                Instant::now() < deadline,
                "no sent {rule:?} message for event {event:?} within {PATIENCE:?}; the log: {log:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the message for `event` of `rule` reaches `state`.
    async fn wait_state(&self, rule: &str, event: &str, state: MessageState) -> LogEntry {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let log = self.log().await;
            if let Some(entry) = log.iter().find(|e| {
                e.rule == rule && e.event_id.as_deref() == Some(event) && e.state == state
            }) {
                return entry.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {state} {rule:?} message for event {event:?}; the log: {log:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The kinds of a message's events (state changes and tracking), oldest first.
    async fn event_kinds(&self, message: i64) -> Vec<String> {
        self.store
            .message_events(message)
            .await
            .expect("message events")
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    async fn count_events(&self, message: i64, kind: &str) -> usize {
        self.event_kinds(message)
            .await
            .iter()
            .filter(|k| *k == kind)
            .count()
    }

    async fn suppressions(&self) -> Vec<Suppression> {
        self.store.suppressions().await.expect("suppressions")
    }

    async fn suppression_of(&self, email: &str) -> Option<Suppression> {
        self.suppressions()
            .await
            .into_iter()
            .find(|s| s.email.eq_ignore_ascii_case(email))
    }

    fn received_by(&self, email: &str) -> Vec<Accepted> {
        self.peer
            .accepted()
            .into_iter()
            .filter(|a| a.rcpt_to.iter().any(|r| r.eq_ignore_ascii_case(email)))
            .collect()
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        self.env.run_cli(args)
    }

    /// `touchpoint log --format json`, as an array.
    fn cli_log(&self) -> Vec<Value> {
        let (ok, out, err) = self.cli(&["log", "--format", "json"]);
        assert!(ok, "touchpoint log --format json failed: {err}");
        let value: Value = serde_json::from_str(&out).expect("the log is JSON");
        value.as_array().expect("a JSON array").clone()
    }

    /// Pipes `report` into `touchpoint bounce ARGS`; returns (exit code, stdout, stderr).
    fn bounce(&self, report: &str, args: &[&str], vars: &[(&str, &str)]) -> (i32, String, String) {
        let mut command = self.env.command();
        command
            .arg("bounce")
            .args(args)
            .env_remove("RECIPIENT")
            .env_remove("ORIGINAL_RECIPIENT")
            .envs(vars.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        pipe(command, report.as_bytes())
    }
}

fn pipe(mut command: Command, input: &[u8]) -> (i32, String, String) {
    use std::io::Write as _;
    let mut child = command.spawn().expect("spawn");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write stdin");
    }
    let output = child.wait_with_output().expect("wait");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

// --- a mail client's view of a message -----------------------------------------------------------

#[derive(Debug)]
struct Mail {
    mail_from: String,
    message_id: Option<String>,
    content_type: String,
    /// The targets of List-Unsubscribe, in order, without angle brackets.
    list_unsubscribe: Vec<String>,
    list_unsubscribe_raw: Option<String>,
    list_unsubscribe_post: Option<String>,
    text: String,
    html: String,
    dkim_signature: Option<String>,
}

fn read_mail(accepted: &Accepted) -> Mail {
    let message = MessageParser::default()
        .parse(&accepted.data)
        .expect("the message parses");
    let unfold = |raw: &str| raw.replace("\r\n", "").replace('\n', "").trim().to_string();
    let list_unsubscribe = message
        .list_unsubscribe()
        .as_address()
        .map(|a| {
            a.iter()
                .filter_map(|addr| addr.address().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Mail {
        mail_from: accepted.mail_from.clone(),
        message_id: message.message_id().map(str::to_string),
        content_type: message
            .content_type()
            .map(|c| {
                format!(
                    "{}/{}",
                    c.c_type,
                    c.c_subtype.as_deref().unwrap_or_default()
                )
                .to_ascii_lowercase()
            })
            .unwrap_or_default(),
        list_unsubscribe,
        list_unsubscribe_raw: message.header_raw("List-Unsubscribe").map(unfold),
        list_unsubscribe_post: message.header_raw("List-Unsubscribe-Post").map(unfold),
        text: message
            .body_text(0)
            .map(|t| t.into_owned())
            .unwrap_or_default(),
        html: message
            .body_html(0)
            .map(|t| t.into_owned())
            .unwrap_or_default(),
        dkim_signature: message.header_raw("DKIM-Signature").map(unfold),
    }
}

impl Mail {
    fn unsubscribe_url(&self) -> String {
        self.list_unsubscribe
            .iter()
            .find(|u| u.starts_with("https://"))
            .unwrap_or_else(|| panic!("no https URL in List-Unsubscribe: {self:#?}"))
            .clone()
    }

    /// Every `attr="..."` value in the HTML that starts with `prefix`.
    fn html_urls(&self, attr: &str, prefix: &str) -> Vec<String> {
        let needle = format!("{attr}=\"{prefix}");
        let mut found = Vec::new();
        let mut rest = self.html.as_str();
        while let Some(at) = rest.find(&needle) {
            let value = &rest[at + attr.len() + 2..];
            let end = value.find('"').expect("closing quote");
            found.push(value[..end].replace("&amp;", "&"));
            rest = &value[end..];
        }
        found
    }
}

/// The path the daemon serves for a public URL (what the reverse proxy forwards).
fn local_path(url: &str) -> String {
    url.strip_prefix(BASE_URL)
        .unwrap_or_else(|| panic!("{url} is not under {BASE_URL}"))
        .to_string()
}

/// The token of a link URL (`.../u/TOKEN`, `.../o/TOKEN.gif`, `.../c/TOKEN`).
fn token_of(url: &str) -> String {
    let last = url.rsplit('/').next().expect("a path");
    last.strip_suffix(".gif").unwrap_or(last).to_string()
}

/// What the daemon tags Message-IDs and VERP addresses with (from the link secret).
fn tags() -> MessageTags {
    MessageTags::new(LINK_SECRET.as_bytes())
}

/// Where a form with this `action` posts, from a page at `page_url` (RFC 3986 reference
/// resolution for the shapes a form action takes).
fn resolve(page_url: &str, action: Option<&str>) -> String {
    let origin_end = page_url[8..].find('/').map_or(page_url.len(), |i| i + 8);
    match action {
        None | Some("") => page_url.to_string(),
        Some(a) if a.starts_with("https://") || a.starts_with("http://") => a.to_string(),
        Some(a) if a.starts_with('/') => format!("{}{a}", &page_url[..origin_end]),
        Some(a) => {
            let dir = &page_url[..=page_url.rfind('/').expect("a slash")];
            format!("{dir}{a}")
        }
    }
}

/// The value of `name="..."` in a tag.
fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let needle = format!(" {name}=\"");
    let start = tag.to_ascii_lowercase().find(&needle)? + needle.len();
    let end = tag[start..].find('"')? + start;
    Some(&tag[start..end])
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// --- HTTP, as a browser or a mailbox provider speaks it ---------------------------------------

const ONE_CLICK: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

async fn one_click(addr: SocketAddr, path: &str) -> HttpResponse {
    send(
        addr,
        "POST",
        path,
        &[ONE_CLICK],
        b"List-Unsubscribe=One-Click",
    )
    .await
}

fn no_store(response: &HttpResponse) -> bool {
    response
        .header("cache-control")
        .is_some_and(|v| v.contains("no-store"))
}

// --- one-click unsubscribe ------------------------------------------------------------------------

on_both_backends!(
    one_click_unsubscribe_suppresses_at_once_and_only_by_post,
    concurrent_one_click_posts_record_one_unsubscribe,
    tampered_and_foreign_tokens_are_plain_404s,
    opens_and_clicks_are_recorded_and_redirect_only_where_the_message_pointed,
    bounce_and_complaint_reports_piped_into_the_binary_are_recorded,
    forged_guessed_and_mismatched_reports_piped_into_the_binary_suppress_nothing,
    unsigned_reports_of_messages_sent_before_signing_count_only_within_the_grace,
    the_bounce_webhook_wants_the_bearer_token_and_good_json,
    the_bounce_webhook_holds_reports_to_the_rules_of_the_pipe,
    a_thousand_pixel_fetches_and_clicks_record_one_line_each,
    a_suppressed_address_is_never_planned_by_any_rule,
);

async fn one_click_unsubscribe_suppresses_at_once_and_only_by_post(backend: Backend) {
    let mut world = World::new(
        backend,
        WELCOME_RULES,
        &format!("{LINKS_WITH_MAILTO}{BOUNCES_NO_HOOK}"),
    )
    .await;
    world
        .customer("ada", "ada@example.net", "Ada Lovelace")
        .await;
    world
        .customer("grace", "grace@example.org", "Grace Hopper")
        .await;
    world.start().await;
    world.event("signup-ada", "ada", "signup").await;
    world.event("signup-grace", "grace", "signup").await;
    let (entry, accepted) = world.sent("welcome", "signup-ada").await;
    let mail = read_mail(&accepted);

    // The headers, as a mail client reads them.
    let url = mail.unsubscribe_url();
    assert!(url.starts_with(&format!("{BASE_URL}/u/")), "{mail:#?}");
    assert_eq!(
        mail.list_unsubscribe,
        vec![url.clone(), MAILTO.to_string()],
        "List-Unsubscribe: the https URL first, then the mailto; raw: {:?}",
        mail.list_unsubscribe_raw
    );
    assert_eq!(
        mail.list_unsubscribe_post.as_deref(),
        Some("List-Unsubscribe=One-Click"),
        "{mail:#?}"
    );
    // The Message-ID and the VERP address carry tags made with the link secret.
    let tags = tags();
    let expected_id = format!(
        "{}.{}.welcome@acme.example",
        entry.id,
        tags.message_id(entry.id)
    );
    assert_eq!(mail.message_id.as_deref(), Some(expected_id.as_str()));
    assert_eq!(
        entry.message_id.as_deref(),
        Some(format!("<{expected_id}>").as_str())
    );
    assert_eq!(mail.content_type, "multipart/alternative");
    assert_eq!(
        mail.mail_from,
        format!("bounces+{}.{}@acme.example", entry.id, tags.verp(entry.id)),
        "the envelope sender is the signed VERP address of sender.bounce_address"
    );
    assert!(mail.dkim_signature.is_none(), "no [dkim], no signature");
    // {{unsubscribe_url}} in both bodies is the same URL as in the header; without tracking,
    // links stay as written and there is no pixel.
    assert!(
        mail.text.contains(&format!("Unsubscribe: {url}")),
        "{}",
        mail.text
    );
    assert_eq!(mail.html_urls("href", BASE_URL), vec![url.clone()]);
    assert_eq!(
        mail.html_urls("href", "https://shop.acme.example/"),
        vec![SHOP_URL.to_string(), IRI_URL.to_string()]
    );
    assert!(mail.html_urls("src", BASE_URL).is_empty(), "no open pixel");

    let addr = world.addr();
    let path = local_path(&url);
    assert!(world.suppressions().await.is_empty());

    // GET (what a link scanner does) shows a page with a button, and changes nothing.
    for _ in 0..3 {
        let page = send(addr, "GET", &path, &[], b"").await;
        assert_eq!(page.status, 200, "{}", page.text());
        assert!(
            page.header("content-type")
                .is_some_and(|t| t.starts_with("text/html")),
            "{page:?}"
        );
        assert!(no_store(&page), "{page:?}");
        assert!(page.header("set-cookie").is_none(), "{page:?}");
        let html = page.text();
        let form_at = html
            .find("<form")
            .unwrap_or_else(|| panic!("no form: {html}"));
        let form = &html[form_at..form_at + html[form_at..].find('>').expect("form tag end")];
        assert_eq!(
            attribute(form, "method").map(str::to_ascii_lowercase),
            Some("post".into()),
            "{form}"
        );
        assert_eq!(
            resolve(&url, attribute(form, "action")),
            url,
            "the form must post to the very URL the customer opened (behind the proxy, under {BASE_URL}): {form}"
        );
        assert!(html.contains("<button"), "{html}");
        assert!(
            html.contains("a**@example.net"),
            "shows whose address, masked: {html}"
        );
        assert!(!html.contains("ada@example.net"), "{html}");
    }
    assert!(
        world.suppressions().await.is_empty(),
        "GET must not unsubscribe"
    );
    assert_eq!(world.count_events(entry.id, "unsubscribed").await, 0);

    // The one-click POST (RFC 8058): at once, no cookies, no redirect.
    let before = Utc::now() - chrono::TimeDelta::seconds(5);
    let done = one_click(addr, &path).await;
    assert_eq!(done.status, 200, "{}", done.text());
    assert!(done.header("location").is_none(), "{done:?}");
    assert!(done.header("set-cookie").is_none(), "{done:?}");
    let suppression = world
        .suppression_of("ada@example.net")
        .await
        .expect("suppressed at once");
    assert_eq!(suppression.source, "unsubscribe");
    assert!(!suppression.reason.is_empty());
    assert!(
        suppression.created_at >= before && suppression.created_at <= Utc::now(),
        "{suppression:?}"
    );
    assert_eq!(world.count_events(entry.id, "unsubscribed").await, 1);
    assert!(world.entry(entry.id).await.unsubscribed_at.is_some());

    // Idempotent: again, and the page's own form (an empty body), change nothing more.
    let again = one_click(addr, &path).await;
    assert_eq!(again.status, 200, "{}", again.text());
    let form_post = send(addr, "POST", &path, &[ONE_CLICK], b"").await;
    assert_eq!(form_post.status, 200, "{}", form_post.text());
    assert_eq!(world.suppressions().await.len(), 1);
    assert_eq!(world.count_events(entry.id, "unsubscribed").await, 1);

    // Never mailed again: a new event is not planned; the reminder planned before is skipped
    // by the guard when it comes due.
    world.event("signup-ada-2", "ada", "signup").await;
    let skipped = world
        .wait_state("reminder", "signup-ada", MessageState::Skipped)
        .await;
    assert!(
        skipped
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("suppression")),
        "{skipped:?}"
    );
    let log = world.log().await;
    assert!(
        !log.iter()
            .any(|e| e.event_id.as_deref() == Some("signup-ada-2")),
        "a suppressed address was planned: {log:#?}"
    );
    assert_eq!(world.received_by("ada@example.net").len(), 1);

    // The operator sees it, and can undo it.
    let (ok, out, err) = world.cli(&["suppress", "list", "--format", "json"]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).expect("JSON");
    let ada = list
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["email"] == "ada@example.net")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(ada["source"], "unsubscribe");
    assert!(ada["created_at"].is_string() && ada["reason"].is_string());
    let json_log = world.cli_log();
    let logged = json_log
        .iter()
        .find(|e| e["id"] == entry.id)
        .expect("in the log");
    assert!(logged["unsubscribed_at"].is_string(), "{logged}");
    let (ok, out, err) = world.cli(&["suppress", "remove", "ADA@example.net"]);
    assert!(ok && out.contains("may be mailed again"), "{out}{err}");
    world.event("signup-ada-3", "ada", "signup").await;
    world.sent("welcome", "signup-ada-3").await;
    world.stop().await;
}

/// Mailbox providers may fire the one-click POST more than once at the same moment (retries,
/// several of their machines): still one suppression and one `unsubscribed` event.
async fn concurrent_one_click_posts_record_one_unsubscribe(backend: Backend) {
    let mut world = World::new(
        backend,
        BOUNCE_RULES,
        &format!("{LINKS_PLAIN}{BOUNCES_NO_HOOK}"),
    )
    .await;
    world
        .customer("grace", "grace@example.org", "Grace Hopper")
        .await;
    world.start().await;
    world.event("signup-grace", "grace", "signup").await;
    let addr = world.addr();
    let (grace_entry, grace_mail) = world.sent("welcome", "signup-grace").await;
    let grace_path = local_path(&read_mail(&grace_mail).unsubscribe_url());
    let posts: Vec<_> = (0..8)
        .map(|_| {
            let path = grace_path.clone();
            tokio::spawn(async move { one_click(addr, &path).await.status })
        })
        .collect();
    for post in posts {
        assert_eq!(post.await.expect("request task"), 200);
    }
    assert_eq!(world.suppressions().await.len(), 1);
    assert_eq!(
        world.count_events(grace_entry.id, "unsubscribed").await,
        1,
        "concurrent one-click POSTs must record one unsubscribe: {:?}",
        world.event_kinds(grace_entry.id).await
    );

    world.stop().await;
}

async fn tampered_and_foreign_tokens_are_plain_404s(backend: Backend) {
    let mut world = World::new(
        backend,
        TRACKING_RULES,
        &format!("{LINKS_PLAIN}{BOUNCES_NO_HOOK}"),
    )
    .await;
    world
        .customer("ada", "ada@example.net", "Ada Lovelace")
        .await;
    world.start().await;
    world.event("buy-1", "ada", "purchase").await;
    let (entry, accepted) = world.sent("spring", "buy-1").await;
    let mail = read_mail(&accepted);
    let url = mail.unsubscribe_url();
    assert_eq!(
        mail.list_unsubscribe,
        vec![url.clone()],
        "no mailto unless configured"
    );
    let id = entry.id;
    let u = token_of(&url);
    let o = token_of(&mail.html_urls("src", &format!("{BASE_URL}/o/"))[0]);
    let c = token_of(&mail.html_urls("href", &format!("{BASE_URL}/c/"))[0]);
    let signer = LinkSigner::new(LINK_SECRET.as_bytes(), BASE_URL);
    let foreign = LinkSigner::new(b"another deployment's secret", BASE_URL);
    assert_eq!(
        signer.verify(&u),
        Some(Link::Unsubscribe { message: id }),
        "the test knows the configured secret"
    );
    let (u_payload, u_tag) = u.split_once('.').expect("payload.tag");
    let (_, c_tag) = c.split_once('.').expect("payload.tag");
    let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
    let flip = |token: &str, at: usize| {
        let mut bytes = token.as_bytes().to_vec();
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).expect("ascii")
    };

    let reference = send(world.addr(), "GET", "/u/no-such-page", &[], b"").await;
    assert_eq!(reference.status, 404);
    let bad_unsubscribe = [
        flip(&u, u.len() - 5),
        flip(&u, 1),
        u[..u.len() - 1].to_string(),
        u[..u.len() / 2].to_string(),
        u_payload.to_string(),
        format!("{u}."),
        format!("{u}A"),
        format!("{}.{u_tag}", b64(&format!("u.{}", id + 1))),
        format!("{}.{u_tag}", b64(&format!("u.{id}0"))),
        foreign.token(&Link::Unsubscribe { message: id }),
        signer.token(&Link::Unsubscribe { message: 987_654 }),
        o.clone(),
        c.clone(),
        "A".repeat(4000),
    ];
    for token in &bad_unsubscribe {
        for method in ["GET", "POST"] {
            let path = format!("/u/{token}");
            let response = send(
                world.addr(),
                method,
                &path,
                &[ONE_CLICK],
                b"List-Unsubscribe=One-Click",
            )
            .await;
            assert_eq!(response.status, 404, "{method} {path}: {}", response.text());
            assert_eq!(
                response.body, reference.body,
                "{method} {path}: reveals nothing"
            );
            assert!(response.header("location").is_none());
        }
    }
    let bad_open = [
        format!("/o/{}.gif", flip(&o, o.len() - 5)),
        format!("/o/{}.gif", &o[..o.len() - 2]),
        format!("/o/{o}"),
        format!("/o/{u}.gif"),
        format!("/o/{c}.gif"),
        format!("/o/{}.gif", foreign.token(&Link::Open { message: id })),
        format!("/o/{}.gif", signer.token(&Link::Open { message: 987_654 })),
    ];
    let swapped = format!(
        "{}.{c_tag}",
        b64(&format!("c.{id}.https://evil.example/login"))
    );
    let bad_click = [
        format!("/c/{swapped}"),
        format!("/c/{}", flip(&c, c.len() - 5)),
        format!("/c/{}", &c[..c.len() - 3]),
        format!("/c/{u}"),
        format!("/c/{o}"),
        format!(
            "/c/{}",
            foreign.token(&Link::Click {
                message: id,
                url: SHOP_URL.into()
            })
        ),
        format!(
            "/c/{}",
            signer.token(&Link::Click {
                message: id,
                url: "javascript:alert(document.cookie)".into()
            })
        ),
        format!(
            "/c/{}",
            signer.token(&Link::Click {
                message: id,
                url: "//evil.example/".into()
            })
        ),
    ];
    for path in bad_open.iter().chain(&bad_click) {
        let response = send(world.addr(), "GET", path, &[], b"").await;
        assert_eq!(response.status, 404, "GET {path}: {:?}", response);
        assert_eq!(response.body, reference.body, "GET {path}");
        assert!(response.header("location").is_none(), "GET {path}");
    }
    // A click token we signed still leads where it says after its message is gone (only our
    // secret can make one, so this is no open redirect); nothing is recorded for it.
    let orphan = signer.token(&Link::Click {
        message: 987_654,
        url: SHOP_URL.into(),
    });
    let response = send(world.addr(), "GET", &format!("/c/{orphan}"), &[], b"").await;
    assert_eq!(response.status, 302, "{response:?}");
    assert_eq!(response.header("location"), Some(SHOP_URL));
    // The webhook is off without a secret.
    let hook = send(
        world.addr(),
        "POST",
        "/hooks/bounce",
        &[
            ("Authorization", "Bearer "),
            ("Content-Type", "application/json"),
        ],
        br#"{"type":"hard","email":"ada@example.net"}"#,
    )
    .await;
    assert_eq!(hook.status, 404, "{}", hook.text());

    assert!(world.suppressions().await.is_empty());
    let kinds = world.event_kinds(id).await;
    for kind in ["unsubscribed", "opened", "clicked", "bounced"] {
        assert!(
            !kinds.iter().any(|k| k == kind),
            "{kind} recorded: {kinds:?}"
        );
    }
    world.stop().await;
}

async fn opens_and_clicks_are_recorded_and_redirect_only_where_the_message_pointed(
    backend: Backend,
) {
    let mut world = World::new(
        backend,
        TRACKING_RULES,
        &format!("{LINKS_WITH_MAILTO}{BOUNCES_NO_HOOK}"),
    )
    .await;
    world
        .customer("ada", "ada@example.net", "Ada Lovelace")
        .await;
    world
        .customer("grace", "grace@example.org", "Grace Hopper")
        .await;
    world.start().await;
    world.event("buy-1", "ada", "purchase").await;
    world.event("receipt-1", "grace", "receipt").await;
    let (entry, accepted) = world.sent("spring", "buy-1").await;
    let mail = read_mail(&accepted);

    // Tracked: web links go through /c/, the unsubscribe link and mailto: stay, one pixel.
    let url = mail.unsubscribe_url();
    let clicks = mail.html_urls("href", &format!("{BASE_URL}/c/"));
    assert_eq!(clicks.len(), 2, "{}", mail.html);
    assert!(
        mail.html_urls("href", "https://shop.").is_empty(),
        "{}",
        mail.html
    );
    assert_eq!(mail.html_urls("href", &format!("{BASE_URL}/u/")), vec![url]);
    assert_eq!(
        mail.html_urls("href", "mailto:"),
        vec!["mailto:hello@acme.example".to_string()]
    );
    let pixels = mail.html_urls("src", &format!("{BASE_URL}/o/"));
    assert_eq!(pixels.len(), 1, "{}", mail.html);
    assert!(pixels[0].ends_with(".gif"));
    let pixel_at = mail.html.find(&pixels[0]).expect("pixel");
    assert!(pixel_at < mail.html.rfind("</body>").expect("</body>"));
    // Untracked rule: nothing rewritten, no pixel.
    let (_, receipt) = world.sent("receipt", "receipt-1").await;
    let receipt = read_mail(&receipt);
    assert!(
        receipt
            .html_urls("href", &format!("{BASE_URL}/c/"))
            .is_empty()
    );
    assert!(receipt.html_urls("src", BASE_URL).is_empty());
    assert_eq!(
        receipt.html_urls("href", "https://shop.acme.example/spring"),
        vec![SHOP_URL.to_string()]
    );

    // Clicks redirect exactly to the URL in the message, never cached.
    let addr = world.addr();
    let shop = send(addr, "GET", &local_path(&clicks[0]), &[], b"").await;
    assert!(
        matches!(shop.status, 302 | 303 | 307),
        "{} {}",
        shop.status,
        shop.text()
    );
    assert_eq!(shop.header("location"), Some(SHOP_URL));
    assert!(no_store(&shop), "{shop:?}");
    let iri = send(addr, "GET", &local_path(&clicks[1]), &[], b"").await;
    assert!(
        matches!(iri.status, 302 | 303 | 307),
        "a link with non-ASCII characters must redirect too: {} {}",
        iri.status,
        iri.text()
    );
    let location = iri.header("location").expect("Location");
    assert!(location.is_ascii(), "{location}");
    assert_eq!(percent_decode(location), IRI_URL);

    // Opens: one line per message that counts every fetch and keeps the first time; the pixel
    // is a GIF that is never cached.
    for _ in 0..3 {
        let gif = send(addr, "GET", &local_path(&pixels[0]), &[], b"").await;
        assert_eq!(gif.status, 200);
        assert_eq!(gif.header("content-type"), Some("image/gif"));
        assert!(no_store(&gif), "{gif:?}");
        assert!(gif.body.starts_with(b"GIF89a") || gif.body.starts_with(b"GIF87a"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = world.store.message_events(entry.id).await.expect("events");
    let opens: Vec<_> = events.iter().filter(|e| e.kind == "opened").collect();
    assert_eq!(opens.len(), 1, "{events:#?}");
    assert_eq!(opens[0].count, 3, "{events:#?}");
    let clicked: Vec<_> = events.iter().filter(|e| e.kind == "clicked").collect();
    assert_eq!(clicked.len(), 2, "one line per link: {events:#?}");
    assert_eq!(clicked[0].detail["url"], SHOP_URL);
    let logged = world.entry(entry.id).await;
    assert_eq!(logged.opens, 3);
    assert_eq!(
        logged.opened_at,
        Some(opens[0].at),
        "the first open is kept"
    );
    assert_eq!(logged.clicks, 2);
    assert_eq!(logged.clicked_at, Some(clicked[0].at));

    // The owner's views.
    let json_log = world.cli_log();
    let row = json_log
        .iter()
        .find(|e| e["id"] == entry.id)
        .expect("in the log");
    assert_eq!(row["opens"], 3, "{row}");
    assert_eq!(row["clicks"], 2, "{row}");
    assert!(
        row["opened_at"].is_string() && row["clicked_at"].is_string(),
        "{row}"
    );
    assert!(
        row["unsubscribed_at"].is_null() && row["bounced_at"].is_null(),
        "{row}"
    );
    let (ok, csv, err) = world.cli(&["log", "--format", "csv"]);
    assert!(ok, "touchpoint log --format csv: {err}");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    for column in [
        "opened_at",
        "opens",
        "clicked_at",
        "clicks",
        "bounced_at",
        "complained_at",
        "unsubscribed_at",
    ] {
        assert!(
            header.contains(&column),
            "CSV header lacks {column}: {header:?}"
        );
    }
    world.stop().await;
}

/// A pixel fetched 1,000 times (by 8 clients at once) and links followed 100 times each: one
/// line per message (and link) that counts them, so a flood cannot fill the database.
async fn a_thousand_pixel_fetches_and_clicks_record_one_line_each(backend: Backend) {
    const FETCHES: usize = 1000;
    const CLIENTS: usize = 8;
    let mut world = World::new(
        backend,
        TRACKING_RULES,
        &format!("{LINKS_PLAIN}{BOUNCES_NO_HOOK}"),
    )
    .await;
    world
        .customer("ada", "ada@example.net", "Ada Lovelace")
        .await;
    world.start().await;
    world.event("buy-1", "ada", "purchase").await;
    let (entry, accepted) = world.sent("spring", "buy-1").await;
    let mail = read_mail(&accepted);
    let pixel = local_path(&mail.html_urls("src", &format!("{BASE_URL}/o/"))[0]);
    let clicks: Vec<String> = mail
        .html_urls("href", &format!("{BASE_URL}/c/"))
        .iter()
        .map(|url| local_path(url))
        .collect();
    assert_eq!(clicks.len(), 2, "{}", mail.html);
    let addr = world.addr();

    let fetch_all = |path: String, times: usize| async move {
        let mut clients = tokio::task::JoinSet::new();
        for client in 0..CLIENTS {
            let path = path.clone();
            clients.spawn(async move {
                let mut statuses = Vec::new();
                for _ in (client..times).step_by(CLIENTS) {
                    statuses.push(send(addr, "GET", &path, &[], b"").await.status);
                }
                statuses
            });
        }
        let mut statuses = Vec::new();
        while let Some(done) = clients.join_next().await {
            statuses.extend(done.expect("a client"));
        }
        statuses
    };
    let statuses = fetch_all(pixel, FETCHES).await;
    assert_eq!(statuses.len(), FETCHES);
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    for click in &clicks {
        let statuses = fetch_all(click.clone(), 100).await;
        assert!(statuses.iter().all(|s| *s == 302), "{statuses:?}");
    }

    let events = world.store.message_events(entry.id).await.expect("events");
    let lines = |kind: &str| -> Vec<i64> {
        events
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.count)
            .collect()
    };
    assert_eq!(lines("opened"), vec![FETCHES as i64], "{events:#?}");
    assert_eq!(lines("clicked"), vec![100, 100], "{events:#?}");
    assert!(events.len() <= 5, "a handful of lines in all: {events:#?}");
    let logged = world.entry(entry.id).await;
    assert_eq!(logged.opens, FETCHES as i64);
    assert_eq!(logged.clicks, 200);
    world.stop().await;
}

// --- bounces and complaints ------------------------------------------------------------------------

fn fixture(name: &str) -> String {
    std::fs::read_to_string(repo_path("tests/fixtures").join(name))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// The made-up tags in the fixtures' VERP addresses and Message-IDs (of their messages 1 to 4).
const FIXTURE_VERP_TAG: &str = "8f3a1c9e5b7d2f4a6c0e";
const FIXTURE_ID_TAG: &str = "2b9d4f6a8c1e3a5c7e9b";

/// How reports name a message of the rule `welcome`: its Message-ID (in angle brackets) and
/// its VERP address.
#[derive(Debug, Clone)]
struct Named {
    id: i64,
    message_id: String,
    verp: String,
}

impl Named {
    /// As the daemon sends message `id`: both signed with the link secret.
    fn signed(id: i64) -> Named {
        let tags = tags();
        Named {
            id,
            message_id: format!("<{id}.{}.welcome@acme.example>", tags.message_id(id)),
            verp: format!("bounces+{id}.{}@acme.example", tags.verp(id)),
        }
    }

    /// As messages went out before signing: `<42.welcome@...>` and `bounces+42@...`.
    fn unsigned(id: i64) -> Named {
        Named {
            id,
            message_id: format!("<{id}.welcome@acme.example>"),
            verp: format!("bounces+{id}@acme.example"),
        }
    }
}

/// A fixture made for message `template` (its Message-ID and VERP address) pointed at `named`.
fn report_for(name: &str, template: i64, named: &Named) -> String {
    fixture(name)
        .replace(
            &format!("<{template}.{FIXTURE_ID_TAG}.welcome@acme.example>"),
            &named.message_id,
        )
        .replace(
            &format!("bounces+{template}.{FIXTURE_VERP_TAG}@acme.example"),
            &named.verp,
        )
}

fn without_lines_containing(text: &str, needle: &str) -> String {
    text.lines()
        .filter(|l| !l.contains(needle))
        .map(|l| format!("{l}\n"))
        .collect()
}

impl World {
    /// Waits until the `welcome` message for `event` is sent; checks that it went out with the
    /// signed Message-ID and VERP address.
    async fn sent_signed(&self, event: &str) -> Named {
        let (entry, accepted) = self.sent("welcome", event).await;
        let named = Named::signed(entry.id);
        assert_eq!(accepted.mail_from, named.verp, "the signed VERP address");
        assert_eq!(entry.message_id.as_deref(), Some(named.message_id.as_str()));
        named
    }

    /// Makes message `id` look sent `days_ago` before signing began: its stored Message-ID
    /// of the old, untagged form.
    async fn sent_unsigned(&self, id: i64, days_ago: i64) -> Named {
        let named = Named::unsigned(id);
        let sent_at = match self.env.backend {
            Backend::Sqlite => {
                format!("strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-{days_ago} days', '-1 hours')")
            }
            Backend::Postgres => format!("now() - interval '{days_ago} days 1 hour'"),
        };
        self.env
            .execute_sql(&format!(
                "UPDATE messages SET message_id = '{}', sent_at = {sent_at} WHERE id = {id}",
                named.message_id
            ))
            .await;
        named
    }

    /// Pipes a report that must be refused; returns what `touchpoint bounce` said.
    fn refused(&self, report: &str, why: &str) -> String {
        let (code, out, err) = self.bounce(report, &[], &[]);
        assert_eq!(code, 0, "nothing to retry: {out}{err}");
        assert!(
            out.contains("ignored: ") && out.contains(why),
            "expected the report to be refused because {why:?}: {out}{err}"
        );
        out
    }

    /// Events of these messages other than their sending.
    async fn reports_recorded(&self, messages: &[i64]) -> Vec<String> {
        let mut kinds = Vec::new();
        for id in messages {
            kinds.extend(
                self.event_kinds(*id)
                    .await
                    .into_iter()
                    .filter(|k| k != "sent")
                    .map(|k| format!("{id}: {k}")),
            );
        }
        kinds
    }

    /// How many times the one `kind` line of a message counts.
    async fn event_count(&self, message: i64, kind: &str) -> i64 {
        let events = self.store.message_events(message).await.expect("events");
        let lines: Vec<_> = events.iter().filter(|e| e.kind == kind).collect();
        assert_eq!(lines.len(), 1, "one {kind} line: {events:#?}");
        lines[0].count
    }
}

/// `POST /hooks/bounce` with the right bearer token.
async fn hook(addr: SocketAddr, body: &Value) -> HttpResponse {
    let bearer = format!("Bearer {HOOK_SECRET}");
    send(
        addr,
        "POST",
        "/hooks/bounce",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", bearer.as_str()),
        ],
        body.to_string().as_bytes(),
    )
    .await
}

/// Asserts the webhook answered `status` and said `why`.
fn answered(response: &HttpResponse, status: u16, why: &str) {
    assert_eq!(response.status, status, "{}", response.text());
    assert!(
        response.text().contains(why),
        "expected {why:?} in {}",
        response.text()
    );
}

async fn bounce_and_complaint_reports_piped_into_the_binary_are_recorded(backend: Backend) {
    let mut world = World::new(
        backend,
        BOUNCE_RULES,
        &format!("{LINKS_WITH_MAILTO}{BOUNCES_NO_HOOK}"),
    )
    .await;
    let people = [
        ("ada", "ada@example.net", "Ada Lovelace"),
        ("grace", "grace@example.org", "Grace Hopper"),
        ("hedy", "hedy@yahoo.com", "Hedy Lamarr"),
        ("joan", "joan@example.com", "Joan Clarke"),
        ("kate", "kate@example.net", "Katherine Johnson"),
        ("lin", "lin@yahoo.com", "Lin Lanying"),
    ];
    for (id, email, name) in people {
        world.customer(id, email, name).await;
    }
    world.start().await;
    for (id, _, _) in people {
        world.event(&format!("signup-{id}"), id, "signup").await;
    }
    let mut named = std::collections::HashMap::new();
    for (id, email, _) in people {
        named.insert(email, world.sent_signed(&format!("signup-{id}")).await);
    }
    let all_events = |world: &World| {
        let ids: Vec<i64> = named.values().map(|n| n.id).collect();
        let store = world.store.clone();
        async move {
            let mut n = 0;
            for id in ids {
                n += store
                    .message_events(id)
                    .await
                    .expect("events")
                    .iter()
                    .filter(|e| e.kind != "sent")
                    .count();
            }
            n
        }
    };

    // A report for a message we never sent (signed right): nothing to retry, nothing recorded.
    let unknown = report_for("postfix-hard-bounce.eml", 1, &Named::signed(999_999));
    world.refused(&unknown, "no message matches");
    // Mail that is not a report at all.
    let plain =
        "From: someone@example.com\nTo: bounces@acme.example\nSubject: hello\n\nJust saying hi.\n";
    world.refused(plain, "not a bounce or complaint report");
    assert!(world.suppressions().await.is_empty());
    assert_eq!(all_events(&world).await, 0);

    // Postfix: a hard bounce with the whole message returned.
    let ada = &named["ada@example.net"];
    let (code, out, err) = world.bounce(&report_for("postfix-hard-bounce.eml", 1, ada), &[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("recorded bounced for message {}", ada.id))
            && out.contains("suppressed"),
        "{out}{err}"
    );
    let events = world.store.message_events(ada.id).await.expect("events");
    let bounced = events
        .iter()
        .find(|e| e.kind == "bounced")
        .unwrap_or_else(|| panic!("{events:#?}"));
    assert_eq!(bounced.detail["status"], "5.1.1", "{bounced:?}");
    assert_eq!(
        bounced.detail["recipient"], "ada@example.net",
        "{bounced:?}"
    );
    assert!(
        bounced.detail["diagnostic"]
            .as_str()
            .is_some_and(|d| d.contains("User unknown")),
        "{bounced:?}"
    );
    let suppression = world
        .suppression_of("ada@example.net")
        .await
        .expect("suppressed");
    assert_eq!(suppression.source, "bounce");
    assert!(suppression.reason.contains("5.1.1"), "{suppression:?}");

    // Postfix: a delay warning is a soft bounce. The same warning again counts once; a soft
    // bounce of a second message reaches the limit (2).
    let grace = &named["grace@example.org"];
    let delayed = report_for("postfix-delayed.eml", 2, grace);
    let (code, out, err) = world.bounce(&delayed, &[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("recorded soft_bounced for message {}", grace.id)),
        "{out}{err}"
    );
    assert!(!out.contains("suppressed"), "{out}");
    for _ in 0..3 {
        let (code, out, err) = world.bounce(&delayed, &[], &[]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("counted once") && !out.contains("suppressed"),
            "a repeated soft bounce of one message counts once: {out}{err}"
        );
    }
    assert!(world.suppression_of("grace@example.org").await.is_none());
    assert_eq!(world.event_count(grace.id, "soft_bounced").await, 4);
    world.event("signup-grace-again", "grace", "signup").await;
    let grace_again = world.sent_signed("signup-grace-again").await;
    let (code, out, err) = world.bounce(
        &report_for("postfix-delayed.eml", 2, &grace_again),
        &[],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("suppressed"),
        "a soft bounce of a second message reaches the limit: {out}{err}"
    );
    assert_eq!(
        world
            .suppression_of("grace@example.org")
            .await
            .expect("suppressed")
            .source,
        "bounce"
    );

    // Yahoo's complaint feedback loop (ARF).
    let hedy = &named["hedy@yahoo.com"];
    let (code, out, err) = world.bounce(&report_for("yahoo-arf-complaint.eml", 3, hedy), &[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("recorded complained for message {}", hedy.id)),
        "{out}{err}"
    );
    assert_eq!(world.count_events(hedy.id, "complained").await, 1);
    assert_eq!(
        world
            .suppression_of("hedy@yahoo.com")
            .await
            .expect("suppressed")
            .source,
        "complaint"
    );

    // Gmail's DSN, with every Message-ID gone: found by the VERP address it was sent to.
    let joan = &named["joan@example.com"];
    let gmail = without_lines_containing(
        &report_for("gmail-hard-bounce.eml", 4, joan),
        ".welcome@acme.example>",
    );
    assert!(!gmail.contains(".welcome@"), "no Message-ID left");
    let (code, out, err) = world.bounce(&gmail, &[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("recorded bounced for message {}", joan.id)),
        "{out}{err}"
    );
    assert!(world.suppression_of("joan@example.com").await.is_some());

    // No Message-ID and no VERP in the headers: the recipient the MTA hands over (--recipient).
    let kate = &named["kate@example.net"];
    let bare = without_lines_containing(
        &fixture("postfix-hard-bounce.eml"),
        ".welcome@acme.example>",
    )
    .replace(&format!("bounces+1.{FIXTURE_VERP_TAG}@"), "bounces@")
    .replace("ada@example.net", "kate@example.net");
    assert!(!bare.contains("bounces+"), "no VERP address left");
    let (code, out, err) = world.bounce(&bare, &["--recipient", &kate.verp], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("recorded bounced for message {}", kate.id)),
        "{out}{err}"
    );

    // An ARF whose enclosed message lost its Message-ID: the VERP address is in the report's
    // Original-Mail-From.
    let lin = &named["lin@yahoo.com"];
    let arf = without_lines_containing(
        &report_for("yahoo-arf-complaint.eml", 3, lin),
        ".welcome@acme.example>",
    )
    .replace("hedy@yahoo.com", "lin@yahoo.com");
    let (code, out, err) = world.bounce(&arf, &[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("recorded complained for message {}", lin.id)),
        "a complaint must find its message by the VERP Original-Mail-From: {out}{err}"
    );

    // The database is away: EX_TEMPFAIL, so the MTA keeps the report and tries again.
    let (code, out, err) = world.bounce(
        &report_for("postfix-hard-bounce.eml", 1, ada),
        &[],
        &[(
            "TOUCHPOINT_DATABASE__URL",
            "postgres://postgres@127.0.0.1:9/nowhere",
        )],
    );
    assert_eq!(code, 75, "{out}{err}");

    // The owner's log shows it.
    let json_log = world.cli_log();
    let row = |id: i64| {
        json_log
            .iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("message {id} in the log"))
            .clone()
    };
    assert!(row(ada.id)["bounced_at"].is_string(), "{}", row(ada.id));
    assert!(
        row(hedy.id)["complained_at"].is_string(),
        "{}",
        row(hedy.id)
    );

    // And nobody suppressed is mailed again.
    world.event("signup-ada-2", "ada", "signup").await;
    world.event("signup-hedy-2", "hedy", "signup").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = world.log().await;
    assert!(
        !log.iter()
            .any(|e| e.event_id.as_deref().is_some_and(|e| e.ends_with("-2"))),
        "{log:#?}"
    );
    world.stop().await;
}

/// What a stranger can mail the bounce address: reports with a forged or missing VERP
/// signature, a Message-ID guessed by counting, or someone else's recipient. None is believed,
/// and `touchpoint bounce` says why; the genuine reports still count.
async fn forged_guessed_and_mismatched_reports_piped_into_the_binary_suppress_nothing(
    backend: Backend,
) {
    let mut world = World::new(
        backend,
        BOUNCE_RULES,
        &format!("{LINKS_PLAIN}{BOUNCES_NO_HOOK}"),
    )
    .await;
    world
        .customer("ada", "ada@example.net", "Ada Lovelace")
        .await;
    world
        .customer("hedy", "hedy@yahoo.com", "Hedy Lamarr")
        .await;
    world.start().await;
    world.event("signup-ada", "ada", "signup").await;
    world.event("signup-hedy", "hedy", "signup").await;
    let ada = world.sent_signed("signup-ada").await;
    let hedy = world.sent_signed("signup-hedy").await;
    let hard = |named: &Named| report_for("postfix-hard-bounce.eml", 1, named);

    // A VERP address with the right message id and a signature we did not make.
    let forged = Named {
        verp: format!("bounces+{}.{FIXTURE_VERP_TAG}@acme.example", ada.id),
        ..ada.clone()
    };
    world.refused(&hard(&forged), "with a signature we did not make");
    let borrowed = Named {
        verp: format!("bounces+{}.{}@acme.example", ada.id, tags().verp(hedy.id)),
        ..ada.clone()
    };
    world.refused(&hard(&borrowed), "with a signature we did not make");
    // The unsigned form, for a message that went out signed (its real Message-ID or not).
    let unsigned = Named {
        verp: format!("bounces+{}@acme.example", ada.id),
        ..ada.clone()
    };
    world.refused(&hard(&unsigned), "carries no signature");
    world.refused(
        &without_lines_containing(&hard(&unsigned), ".welcome@acme.example>"),
        "carries no signature",
    );
    // No VERP at all, and a Message-ID guessed by counting: in the old form, or with a tag.
    for guess in [
        format!("<{}.welcome@acme.example>", ada.id),
        format!("<{}.{FIXTURE_ID_TAG}.welcome@acme.example>", ada.id),
    ] {
        let report = fixture("postfix-hard-bounce.eml")
            .replace(&format!("bounces+1.{FIXTURE_VERP_TAG}@"), "bounces@")
            .replace(
                &format!("<1.{FIXTURE_ID_TAG}.welcome@acme.example>"),
                &guess,
            );
        assert!(!report.contains("bounces+"), "no VERP address left");
        world.refused(&report, "no message matches");
    }
    // The right signature with someone else's Final-Recipient (what anyone who got one of our
    // messages could send), or with no recipient at all.
    let other_recipient = hard(&ada).replace("ada@example.net", "grace@example.org");
    world.refused(&other_recipient, "is not the recipient of message");
    world.refused(
        &without_lines_containing(&hard(&ada), "-Recipient:"),
        "names no recipient",
    );
    // A complaint that reports another recipient: in Original-Rcpt-To, or, without one, in the
    // enclosed message's To.
    let arf = report_for("yahoo-arf-complaint.eml", 3, &hedy);
    world.refused(
        &arf.replace(
            "Original-Rcpt-To: <hedy@yahoo.com>",
            "Original-Rcpt-To: <ada@example.net>",
        ),
        "is not the recipient of message",
    );
    let no_rcpt_to = without_lines_containing(&arf, "Original-Rcpt-To");
    world.refused(
        &no_rcpt_to.replace(
            "To: Hedy Lamarr <hedy@yahoo.com>",
            "To: Ada <ada@example.net>",
        ),
        "is not the recipient of message",
    );
    assert!(world.suppressions().await.is_empty());
    assert_eq!(
        world.reports_recorded(&[ada.id, hedy.id]).await,
        Vec::<String>::new()
    );

    // The genuine reports count (addresses compared whatever their case), the enclosed To
    // standing in for a missing Original-Rcpt-To.
    let (code, out, err) = world.bounce(
        &hard(&ada).replace("rfc822; ada@example.net", "rfc822; ADA@Example.NET"),
        &[],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("recorded bounced for message {}", ada.id))
            && out.contains("suppressed"),
        "{out}{err}"
    );
    let (code, out, err) = world.bounce(&no_rcpt_to, &[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("recorded complained for message {}", hedy.id)),
        "{out}{err}"
    );
    assert!(world.suppression_of("ada@example.net").await.is_some());
    assert!(world.suppression_of("hedy@yahoo.com").await.is_some());
    world.stop().await;
}

/// Messages sent before VERP and Message-IDs were signed: their unsigned reports count for
/// `bounces.unsigned_grace` (7 days) after sending, by pipe and by webhook, and not after.
async fn unsigned_reports_of_messages_sent_before_signing_count_only_within_the_grace(
    backend: Backend,
) {
    let mut world = World::new(
        backend,
        BOUNCE_RULES,
        &format!("{LINKS_PLAIN}{BOUNCES_WITH_HOOK}"),
    )
    .await;
    let people = [
        ("ada", "ada@example.net", "Ada Lovelace"),
        ("grace", "grace@example.org", "Grace Hopper"),
        ("hedy", "hedy@yahoo.com", "Hedy Lamarr"),
        ("joan", "joan@example.com", "Joan Clarke"),
    ];
    for (id, email, name) in people {
        world.customer(id, email, name).await;
    }
    world.start().await;
    let mut ids = Vec::new();
    for (id, _, _) in people {
        world.event(&format!("signup-{id}"), id, "signup").await;
        ids.push(world.sent_signed(&format!("signup-{id}")).await.id);
    }
    let ada = world.sent_unsigned(ids[0], 1).await;
    let grace = world.sent_unsigned(ids[1], 8).await;
    let hedy = world.sent_unsigned(ids[2], 1).await;
    let joan = world.sent_unsigned(ids[3], 30).await;
    let hard = |named: &Named| report_for("postfix-hard-bounce.eml", 1, named);

    // Past the grace: refused, by pipe and by webhook.
    let out = world.refused(
        &hard(&grace).replace("ada@example.net", "grace@example.org"),
        "bounces.unsigned_grace (1w)",
    );
    assert!(out.contains("carries no signature"), "{out}");
    let response = hook(
        world.addr(),
        &json!({"type": "complaint", "message_id": joan.message_id, "email": "joan@example.com"}),
    )
    .await;
    answered(&response, 422, "bounces.unsigned_grace (1w)");
    // Within it, the recipient must still be right.
    world.refused(
        &hard(&ada).replace("ada@example.net", "grace@example.org"),
        "is not the recipient of message",
    );
    assert!(world.suppressions().await.is_empty());
    assert_eq!(
        world.reports_recorded(&ids).await,
        Vec::<String>::new(),
        "nothing recorded"
    );

    // Within the grace: believed, by the unsigned VERP address or the untagged Message-ID.
    let (code, out, err) = world.bounce(&hard(&ada), &[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("recorded bounced for message {}", ada.id))
            && out.contains("suppressed"),
        "{out}{err}"
    );
    let by_message_id = without_lines_containing(&hard(&ada), "bounces+");
    let (code, out, err) = world.bounce(&by_message_id, &[], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("counted once"), "{out}{err}");
    let response = hook(
        world.addr(),
        &json!({"type": "complaint", "message_id": hedy.message_id, "email": "hedy@yahoo.com"}),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(world.suppression_of("ada@example.net").await.is_some());
    assert!(world.suppression_of("hedy@yahoo.com").await.is_some());
    assert!(world.suppression_of("grace@example.org").await.is_none());
    assert!(world.suppression_of("joan@example.com").await.is_none());
    world.stop().await;
}

async fn the_bounce_webhook_wants_the_bearer_token_and_good_json(backend: Backend) {
    let mut world = World::new(
        backend,
        BOUNCE_RULES,
        &format!("{LINKS_PLAIN}{BOUNCES_WITH_HOOK}"),
    )
    .await;
    for (id, email, name) in [
        ("ada", "ada@example.net", "Ada Lovelace"),
        ("grace", "grace@example.org", "Grace Hopper"),
        ("hedy", "hedy@yahoo.com", "Hedy Lamarr"),
    ] {
        world.customer(id, email, name).await;
    }
    world.start().await;
    for id in ["ada", "grace", "hedy"] {
        world.event(&format!("signup-{id}"), id, "signup").await;
    }
    let (ada, _) = world.sent("welcome", "signup-ada").await;
    let (grace, _) = world.sent("welcome", "signup-grace").await;
    let (hedy, _) = world.sent("welcome", "signup-hedy").await;
    let addr = world.addr();
    let bearer = format!("Bearer {HOOK_SECRET}");
    let json_type = ("Content-Type", "application/json");
    let hook_with = |auth: Option<String>, body: Value| async move {
        let mut headers = vec![json_type];
        let auth = auth.unwrap_or_default();
        if !auth.is_empty() {
            headers.push(("Authorization", auth.as_str()));
        }
        send(
            addr,
            "POST",
            "/hooks/bounce",
            &headers,
            body.to_string().as_bytes(),
        )
        .await
    };
    let hard_for_grace = json!({
        "type": "hard",
        "message_id": grace.message_id,
        "email": "grace@example.org",
        "status": "5.1.1",
        "detail": "550 5.1.1 mailbox does not exist",
    });

    // Without the right token: 401, and nothing happens.
    let wrong_tokens = [
        None,
        Some("Bearer ".to_string()),
        Some("Bearer wrong".to_string()),
        Some(format!("Bearer {}", &HOOK_SECRET[..HOOK_SECRET.len() - 1])),
        Some(format!("Bearer {HOOK_SECRET}x")),
        Some(format!(
            "Basic {}",
            STANDARD.encode(format!("hook:{HOOK_SECRET}"))
        )),
        Some(HOOK_SECRET.to_string()),
    ];
    for auth in wrong_tokens {
        let response = hook_with(auth.clone(), hard_for_grace.clone()).await;
        assert_eq!(response.status, 401, "{auth:?}: {}", response.text());
    }
    assert!(world.suppressions().await.is_empty());
    assert_eq!(world.count_events(grace.id, "bounced").await, 0);

    // The right token with a body that is not what the hook takes: 400.
    for body in [
        &b"{not json"[..],
        b"",
        br#"{"message_id":"<1.welcome@acme.example>"}"#,
        br#"{"type":"explode","email":"ada@example.net"}"#,
    ] {
        let response = send(
            addr,
            "POST",
            "/hooks/bounce",
            &[json_type, ("Authorization", bearer.as_str())],
            body,
        )
        .await;
        assert_eq!(
            response.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(body),
            response.text()
        );
    }
    assert!(world.suppressions().await.is_empty());

    // Right token, good JSON.
    let response = hook(
        addr,
        &json!({"type": "hard", "message_id": ada.message_id, "email": "ada@example.net", "status": "5.1.1", "detail": "mailbox does not exist"}),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let applied: Value = serde_json::from_slice(&response.body).expect("JSON answer");
    assert_eq!(applied["message"], ada.id, "{applied}");
    assert_eq!(applied["suppressed"], true, "{applied}");
    assert_eq!(world.count_events(ada.id, "bounced").await, 1);
    assert_eq!(
        world
            .suppression_of("ada@example.net")
            .await
            .expect("suppressed")
            .source,
        "bounce"
    );

    // A complaint, Message-ID without angle brackets.
    let bare_id = hedy.message_id.clone().unwrap_or_default();
    let bare_id = bare_id.trim_matches(['<', '>']);
    let response = hook(
        addr,
        &json!({"type": "complaint", "message_id": bare_id, "email": "hedy@yahoo.com"}),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(world.count_events(hedy.id, "complained").await, 1);
    assert_eq!(
        world
            .suppression_of("hedy@yahoo.com")
            .await
            .expect("suppressed")
            .source,
        "complaint"
    );

    // Soft bounces count once per message, up to the limit (2).
    let soft = json!({"type": "soft", "message_id": grace.message_id, "email": "grace@example.org", "status": "4.2.2"});
    let first: Value = serde_json::from_slice(&hook(addr, &soft).await.body).expect("JSON");
    assert_eq!(first["suppressed"], false, "{first}");
    assert_eq!(first["repeated"], false, "{first}");
    let again: Value = serde_json::from_slice(&hook(addr, &soft).await.body).expect("JSON");
    assert_eq!(again["repeated"], true, "{again}");
    assert_eq!(again["suppressed"], false, "a repeat counts once: {again}");
    assert_eq!(world.event_count(grace.id, "soft_bounced").await, 2);
    world.event("signup-grace-again", "grace", "signup").await;
    let (grace_again, _) = world.sent("welcome", "signup-grace-again").await;
    let second: Value = serde_json::from_slice(
        &hook(
            addr,
            &json!({"type": "soft", "message_id": grace_again.message_id, "email": "grace@example.org"}),
        )
        .await
        .body,
    )
    .expect("JSON");
    assert_eq!(second["suppressed"], true, "{second}");

    // A Message-ID we never sent.
    let response = hook(
        addr,
        &json!({"type": "hard", "message_id": "<424242.welcome@acme.example>", "email": "nobody@example.com"}),
    )
    .await;
    assert_eq!(response.status, 404, "{}", response.text());
    assert!(world.suppression_of("nobody@example.com").await.is_none());
    world.stop().await;
}

/// The webhook is held to the rules of the pipe: a report that names a message must name it
/// verifiably (the signed VERP `return_path` or the tagged Message-ID) and report its
/// recipient; otherwise 422 (404 for a message it cannot find) and nothing is recorded.
async fn the_bounce_webhook_holds_reports_to_the_rules_of_the_pipe(backend: Backend) {
    let mut world = World::new(
        backend,
        BOUNCE_RULES,
        &format!("{LINKS_PLAIN}{BOUNCES_WITH_HOOK}"),
    )
    .await;
    world
        .customer("ada", "ada@example.net", "Ada Lovelace")
        .await;
    world
        .customer("grace", "grace@example.org", "Grace Hopper")
        .await;
    world.start().await;
    world.event("signup-ada", "ada", "signup").await;
    world.event("signup-grace", "grace", "signup").await;
    let ada = world.sent_signed("signup-ada").await;
    let grace = world.sent_signed("signup-grace").await;
    let addr = world.addr();

    let cases = [
        (
            json!({"type": "hard", "return_path": format!("bounces+{}.{FIXTURE_VERP_TAG}@acme.example", ada.id), "email": "ada@example.net"}),
            422,
            "with a signature we did not make",
        ),
        (
            json!({"type": "hard", "return_path": format!("bounces+{}@acme.example", ada.id), "email": "ada@example.net"}),
            422,
            "carries no signature",
        ),
        (
            json!({"type": "hard", "message_id": ada.message_id, "email": "grace@example.org"}),
            422,
            "is not the recipient of message",
        ),
        (
            json!({"type": "complaint", "return_path": grace.verp, "email": "ada@example.net"}),
            422,
            "is not the recipient of message",
        ),
        (
            json!({"type": "hard", "message_id": ada.message_id}),
            422,
            "names no recipient",
        ),
        (
            json!({"type": "hard", "message_id": format!("<{}.welcome@acme.example>", ada.id), "email": "ada@example.net"}),
            404,
            "no message matches",
        ),
    ];
    for (body, status, why) in &cases {
        answered(&hook(addr, body).await, *status, why);
    }
    assert!(world.suppressions().await.is_empty());
    assert_eq!(
        world.reports_recorded(&[ada.id, grace.id]).await,
        Vec::<String>::new()
    );

    // The genuine report: the signed VERP address and the recipient, whatever its case.
    let response = hook(
        addr,
        &json!({"type": "hard", "return_path": format!("<{}>", ada.verp), "email": "Ada@Example.net"}),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let applied: Value = serde_json::from_slice(&response.body).expect("JSON answer");
    assert_eq!(applied["message"], ada.id, "{applied}");
    assert_eq!(applied["suppressed"], true, "{applied}");
    assert!(world.suppression_of("ada@example.net").await.is_some());
    assert!(world.suppression_of("grace@example.org").await.is_none());
    world.stop().await;
}

// --- suppression, planning and guard --------------------------------------------------------------

async fn a_suppressed_address_is_never_planned_by_any_rule(backend: Backend) {
    let mut world = World::new(
        backend,
        EVERY_TRIGGER,
        &format!("{LINKS_PLAIN}{BOUNCES_NO_HOOK}"),
    )
    .await;
    world
        .customer("carol", "carol@example.com", "Carol Shaw")
        .await;
    world.customer("bea", "Bea@Example.com", "Bea Arthur").await;
    // Next June's anniversary is further ahead than the default planner.horizon.
    world.env.plan_far_ahead();
    let (ok, out, err) = world.cli(&[
        "suppress",
        "add",
        "bea@example.com",
        "--reason",
        "asked by phone",
    ]);
    assert!(ok && out.contains("will not be mailed again"), "{out}{err}");
    let wedding = Utc.with_ymd_and_hms(2015, 6, 15, 0, 0, 0).unwrap();
    for id in ["carol", "bea"] {
        world
            .env
            .add_event(
                &world.store,
                &format!("wedding-{id}"),
                id,
                "wedding",
                wedding,
            )
            .await;
        world.event(&format!("buy-{id}"), id, "purchase").await;
    }
    // The dry run already leaves her out.
    let (ok, plan, err) = world.cli(&["plan", "--days", "400", "--format", "json"]);
    assert!(ok, "{err}");
    assert!(plan.contains("carol@example.com"), "{plan}");
    assert!(
        !plan.to_ascii_lowercase().contains("bea@example.com"),
        "{plan}"
    );

    world.start().await;
    world.sent("thanks", "buy-carol").await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let log = world.log().await;
        let carol: Vec<&str> = log
            .iter()
            .filter(|e| e.customer_id == "carol")
            .map(|e| e.rule.as_str())
            .collect();
        if ["thanks", "anniversary", "monthly"]
            .iter()
            .all(|r| carol.contains(r))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "carol's messages were not all planned: {log:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Another planner turn or two, then: nothing for her, by any rule.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = world.log().await;
    assert!(!log.iter().any(|e| e.customer_id == "bea"), "{log:#?}");
    assert!(world.received_by("bea@example.com").is_empty());
    let suppression = world
        .suppression_of("bea@example.com")
        .await
        .expect("listed");
    assert_eq!(suppression.reason, "asked by phone");
    assert_eq!(suppression.source, "operator");

    // Lifted: a new purchase is thanked.
    let (ok, out, err) = world.cli(&["suppress", "remove", "bea@example.com"]);
    assert!(ok && out.contains("may be mailed again"), "{out}{err}");
    world.event("buy-bea-2", "bea", "purchase").await;
    let (_, accepted) = world.sent("thanks", "buy-bea-2").await;
    assert_eq!(accepted.rcpt_to, vec!["Bea@Example.com".to_string()]);
    world.stop().await;
}

// --- DKIM -------------------------------------------------------------------------------------------

async fn dkim_signs_so_that_an_independent_verifier_agrees(algorithm: &str) {
    let mut world = World::new(
        Backend::Sqlite,
        WELCOME_RULES,
        &format!(
            "{LINKS_WITH_MAILTO}{BOUNCES_NO_HOOK}{}",
            dkim_section(algorithm)
        ),
    )
    .await;
    let record = dkim_key(world.env.path(), "dkim.pem", algorithm);
    let (ok, out, err) = world.cli(&["check"]);
    assert!(ok && out.contains("DKIM key loads"), "{out}{err}");
    world
        .customer("ada", "ada@example.net", "Ada Lovelace")
        .await;
    world.start().await;
    world.event("signup-ada", "ada", "signup").await;
    let (_, accepted) = world.sent("welcome", "signup-ada").await;
    let mail = read_mail(&accepted);
    let signature = mail.dkim_signature.clone().unwrap_or_else(|| {
        panic!(
            "no DKIM-Signature: {}",
            String::from_utf8_lossy(&accepted.data)
        )
    });
    let sig = signature.replace([' ', '\t'], "");
    assert!(
        sig.contains(&format!("a={algorithm}-sha256;")),
        "{signature}"
    );
    assert!(
        sig.contains("d=acme.example;") && sig.contains(&format!("s={DKIM_SELECTOR};")),
        "{signature}"
    );
    let h = sig
        .split(';')
        .find_map(|t| t.strip_prefix("h="))
        .expect("h=")
        .to_ascii_lowercase();
    let signed: Vec<&str> = h.split(':').collect();
    for header in [
        "from",
        "subject",
        "date",
        "message-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
    ] {
        assert!(signed.contains(&header), "{header} not signed: {signature}");
    }
    let dir = world.env.path().to_path_buf();
    assert!(
        dkimpy_verifies(&dir, &accepted.data, &record),
        "dkimpy rejects the {algorithm} signature:\n{}",
        String::from_utf8_lossy(&accepted.data)
    );
    // The verifier is not a rubber stamp: a changed subject fails.
    let text = String::from_utf8_lossy(&accepted.data).into_owned();
    let tampered = text.replacen("Subject: Welcome", "Subject: Welcome back", 1);
    assert_ne!(tampered, text);
    assert!(!dkimpy_verifies(&dir, tampered.as_bytes(), &record));
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkim_rsa_signature_verifies_with_dkimpy() {
    dkim_signs_so_that_an_independent_verifier_agrees("rsa").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkim_ed25519_signature_verifies_with_dkimpy() {
    dkim_signs_so_that_an_independent_verifier_agrees("ed25519").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dkim_key_of_the_wrong_kind_is_a_clear_error_at_check_and_start() {
    let world = World::new(
        Backend::Sqlite,
        BOUNCE_RULES,
        &format!("{LINKS_PLAIN}{BOUNCES_NO_HOOK}{}", dkim_section("rsa")),
    )
    .await;
    let dir = world.env.path().to_path_buf();
    dkim_key(&dir, "ed25519.pem", "ed25519");
    dkim_key(&dir, "rsa.pem", "rsa");
    // PKCS#1 ("BEGIN RSA PRIVATE KEY"), as older tools write RSA keys.
    run(
        "openssl",
        &[
            "pkey",
            "-in",
            "rsa.pem",
            "-traditional",
            "-out",
            "rsa-pkcs1.pem",
        ],
        &dir,
    );
    let config = std::fs::read_to_string(&world.env.config_path).expect("config");
    let set = |key: &str, algorithm: &str| {
        std::fs::copy(dir.join(key), dir.join("dkim.pem")).expect("copy key");
        let text = config.replace(
            "algorithm = \"rsa\"",
            &format!("algorithm = \"{algorithm}\""),
        );
        std::fs::write(&world.env.config_path, text).expect("config");
    };

    for (key, algorithm) in [
        ("rsa.pem", "rsa"),
        ("rsa-pkcs1.pem", "rsa"),
        ("ed25519.pem", "ed25519"),
    ] {
        set(key, algorithm);
        let (ok, out, err) = world.cli(&["check"]);
        assert!(
            ok && out.contains("DKIM key loads"),
            "{key} as {algorithm}: {out}{err}"
        );
    }
    for (key, algorithm, expected) in [
        (
            "ed25519.pem",
            "rsa",
            "dkim.algorithm is \"rsa\" but the key is an Ed25519 key",
        ),
        (
            "rsa.pem",
            "ed25519",
            "dkim.algorithm is \"ed25519\" but the key is an RSA key",
        ),
        (
            "rsa-pkcs1.pem",
            "ed25519",
            "dkim.algorithm is \"ed25519\" but the key is an RSA key",
        ),
    ] {
        set(key, algorithm);
        let (ok, out, err) = world.cli(&["check"]);
        assert!(!ok, "{key} as {algorithm} passed check: {out}");
        assert!(err.contains(expected), "{key} as {algorithm}: {err}");
        // The daemon refuses to start with the same words.
        let daemon = world.env.start().await;
        let result = tokio::time::timeout(Duration::from_secs(20), daemon.handle)
            .await
            .expect("the daemon gives up at once")
            .expect("daemon task");
        let error = result
            .expect_err("the daemon must not start with a wrong key")
            .to_string();
        assert!(error.contains(expected), "{error}");
    }
    std::fs::write(dir.join("dkim.pem"), "not a key\n").expect("write");
    let (ok, _, err) = world.cli(&["check"]);
    assert!(!ok && err.contains("not a PEM private key"), "{err}");
    assert!(world.peer.accepted().is_empty());
}
