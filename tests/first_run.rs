//! An operator's first ten minutes, through the real binary: the README's quick start run as
//! written (its commands are read from README.md, so the two cannot drift apart);
//! `touchpoint init` (every example file, never overwriting); what `check` tells a newcomer;
//! `default-config` in an empty directory; `preview --format eml` and `--event`; and test sends
//! through a real SMTP peer, DKIM-verified by dkimpy, whose links change nothing.
//!
//! Needs bash and GNU date (the quick start uses them), `openssl` and `/usr/bin/python3` with
//! dkimpy (Debian: `openssl`, `python3-dkim`).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chrono::Utc;
use mail_parser::{Message, MessageParser};
use support::dkim::{dkim_key, dkim_section, dkimpy_verifies};
use support::http::send;
use support::smtp::SmtpPeer;
use support::{Backend, Sink, TestEnv, eventually, free_port, repo_path};
use touchpoint::store::{Event, LogFilter, SharedStore};

const PATIENCE: Duration = Duration::from_secs(30);

// --- running the binary -----------------------------------------------------------------------

/// The binary with no `TOUCHPOINT_*` variables from the caller's environment.
fn touchpoint(cwd: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_touchpoint"));
    command.current_dir(cwd).env_remove("NOTIFY_SOCKET");
    for (key, _) in std::env::vars() {
        if key.starts_with("TOUCHPOINT_") {
            command.env_remove(key);
        }
    }
    command.env("TOUCHPOINT_LOG", "warn");
    command
}

fn output(mut command: Command) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("run touchpoint");
    (
        status.code(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[track_caller]
fn succeeds(command: Command) -> String {
    let (code, out, err) = output(command);
    assert_eq!(code, Some(0), "expected success:\n{out}\n{err}");
    out
}

#[track_caller]
fn fails(command: Command) -> String {
    let (code, out, err) = output(command);
    assert_eq!(code, Some(1), "expected exit code 1:\n{out}\n{err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

/// Every file under `dir`, by path relative to it, with its text.
fn files_under(dir: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(dir).expect("under dir");
                let text = std::fs::read_to_string(&path).expect("read file");
                found.insert(relative.to_string_lossy().into_owned(), text);
            }
        }
    }
    found
}

fn parse(bytes: &[u8]) -> Message<'_> {
    MessageParser::default()
        .parse(bytes)
        .expect("an RFC 5322 message")
}

/// The addresses of the To header.
fn to_addresses(message: &Message<'_>) -> Vec<String> {
    message
        .to()
        .map(|to| {
            to.iter()
                .filter_map(|a| a.address().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

// --- the README's quick start -----------------------------------------------------------------

/// The command lines of the ```sh blocks under README.md's "## Quick start", in order.
fn quick_start_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_path("README.md")).expect("README.md");
    let start = readme
        .find("\n## Quick start\n")
        .expect("README.md has a \"## Quick start\" section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let mut commands = Vec::new();
    let mut in_block = false;
    for line in section.lines() {
        match line.trim() {
            "```sh" => in_block = true,
            "```" => in_block = false,
            text if in_block && !text.is_empty() && !text.starts_with('#') => {
                commands.push(text.to_string())
            }
            _ => {}
        }
    }
    commands
}

/// The first word of a command line.
fn program(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or_default()
}

/// The quick start as one bash script. What stands in for a person: the built binary is put
/// on PATH in place of `cargo install` (which the test checks is the only cargo command, and
/// installs a binary of this name); `touchpoint run` is started in the background (its log in
/// `daemon.log`) and, once the planner has planned the thank-you, stopped at the end with
/// SIGINT, as Ctrl-C would. Each command's output is preceded by a line `@@@ N`.
fn quick_start_script(commands: &[String], work: &Path) -> String {
    let mut script = String::from("set -euo pipefail\n");
    let mut daemon = false;
    for (n, line) in commands.iter().enumerate() {
        script.push_str(&format!("echo '@@@ {n}'\n"));
        if line.starts_with("cargo install") {
            continue;
        }
        if line.split('#').next().map(str::trim) == Some("touchpoint run") {
            daemon = true;
            let log = work.join("daemon.log");
            script.push_str(&format!(
                "touchpoint run 2> '{log}' & daemon=$!\n\
                 for i in $(seq 300); do grep -q 'touchpoint is running' '{log}' && break; sleep 0.1; done\n\
                 grep -q 'touchpoint is running' '{log}'\n\
                 for i in $(seq 300); do touchpoint log --format csv | grep -q thank-you && break; sleep 0.1; done\n",
                log = log.display()
            ));
            continue;
        }
        script.push_str(line);
        script.push('\n');
    }
    if daemon {
        script.push_str("kill -INT $daemon\nwait $daemon\n");
    }
    script
}

/// Each command's output, by its index.
fn outputs_by_command(stdout: &str) -> BTreeMap<usize, String> {
    let mut outputs = BTreeMap::new();
    let mut current = None;
    for line in stdout.lines() {
        if let Some(n) = line.strip_prefix("@@@ ") {
            current = n.parse().ok();
            continue;
        }
        if let Some(n) = current {
            let entry: &mut String = outputs.entry(n).or_default();
            entry.push_str(line);
            entry.push('\n');
        }
    }
    outputs
}

/// The quick start, run: each command's output, and where it ran.
struct QuickStart {
    commands: Vec<String>,
    outputs: BTreeMap<usize, String>,
    work: tempfile::TempDir,
    port: u16,
    daemon_log: String,
}

impl QuickStart {
    /// What the first command starting with `line` printed.
    fn output(&self, line: &str) -> &str {
        let n = self
            .commands
            .iter()
            .position(|c| c.starts_with(line))
            .unwrap_or_else(|| {
                panic!(
                    "the quick start has no command {line:?}: {:#?}",
                    self.commands
                )
            });
        self.outputs.get(&n).map_or("", String::as_str)
    }

    fn shop(&self) -> PathBuf {
        self.work.path().join("my-shop")
    }
}

/// Every command is one the test knows how to check, and `cargo install` is the only cargo
/// command (the test stands in for it).
fn assert_known_commands(commands: &[String]) {
    let cargo: Vec<&String> = commands.iter().filter(|c| program(c) == "cargo").collect();
    assert_eq!(
        cargo,
        [&"cargo install --locked --path .    # builds `touchpoint` into ~/.cargo/bin (a few minutes)".to_string()],
        "the test puts the built binary on PATH in place of exactly this command"
    );
    let manifest = std::fs::read_to_string(repo_path("Cargo.toml")).expect("Cargo.toml");
    assert!(
        manifest.contains("name = \"touchpoint\""),
        "cargo install would not make `touchpoint`"
    );
    for line in commands {
        assert!(
            ["cargo", "touchpoint", "cd", "ls"].contains(&program(line)),
            "a quick-start command this test does not know how to check: {line}"
        );
    }
}

/// Runs the quick start with bash in a new directory, the built binary first on PATH.
async fn run_quick_start(commands: Vec<String>) -> QuickStart {
    let work = tempfile::tempdir().expect("temp dir");
    let bin = work.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_touchpoint"), bin.join("touchpoint"))
        .expect("symlink");
    let script = quick_start_script(&commands, work.path());
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let port = free_port();
    let mut bash = Command::new("bash");
    bash.current_dir(work.path())
        .args(["-c", &script])
        .env("PATH", path)
        // Another test may hold the example's port 8025.
        .env("TOUCHPOINT_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("TOUCHPOINT_") && key != "TOUCHPOINT_HTTP__LISTEN" {
            bash.env_remove(key);
        }
    }
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || output(bash))
        .await
        .expect("join");
    let daemon_log = std::fs::read_to_string(work.path().join("daemon.log")).unwrap_or_default();
    assert_eq!(
        code,
        Some(0),
        "the quick start failed:\n--- script ---\n{script}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- daemon ---\n{daemon_log}"
    );
    QuickStart {
        commands,
        outputs: outputs_by_command(&stdout),
        work,
        port,
        daemon_log,
    }
}

fn assert_what_each_command_said(run: &QuickStart) {
    let init = run.output("touchpoint init");
    assert!(
        init.contains("wrote a working setup into my-shop"),
        "{init}"
    );
    let check = run.output("touchpoint check");
    for expected in [
        "config/touchpoint.toml: OK (3 rules, 3 enabled; 3 templates;",
        "rules: 3 loaded",
        "templates: 3 found",
        "transport: file",
        &format!("http: listening on 127.0.0.1:{}", run.port),
        "owner's page: http://127.0.0.1:",
    ] {
        assert!(
            check.contains(expected),
            "check lacks {expected:?}:\n{check}"
        );
    }
    let plan = run.output("touchpoint plan");
    assert!(
        plan.contains("thank-you-after-purchase") && plan.contains("ada@example.com"),
        "{plan}"
    );
    let words = run.output("touchpoint preview --rule thank-you-after-purchase --customer c1");
    assert!(
        words.starts_with("Subject: Thank you for your order, Ada\nTo: ada@example.com\n"),
        "{words}"
    );
    let sent =
        run.output("touchpoint preview --rule thank-you-after-purchase --customer c1 --send-to");
    assert!(
        sent.contains("sent a test of rule \"thank-you-after-purchase\" for customer \"c1\" to you@example.com"),
        "{sent}"
    );
    let logged = run.output("touchpoint log");
    assert!(logged.contains("thank-you-after-purchase"), "{logged}");
    assert!(
        run.daemon_log.contains("SIGINT received"),
        "{}",
        run.daemon_log
    );
}

/// The outbox holds one test, to you only, which `ls` listed; the daemon planned the
/// customer's own thank-you (the test did not take its place).
async fn assert_the_test_and_the_real_message(run: &QuickStart) {
    let outbox = run.shop().join("var/outbox");
    let tests: Vec<PathBuf> = std::fs::read_dir(&outbox)
        .expect("var/outbox")
        .map(|e| e.expect("entry").path())
        .filter(|p| to_addresses(&parse(&std::fs::read(p).expect("read"))) == ["you@example.com"])
        .collect();
    assert_eq!(tests.len(), 1, "{tests:?}");
    let name = tests[0]
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let listed = run.output("ls var/outbox/");
    assert!(listed.contains(&name), "ls did not list {name}: {listed}");
    let bytes = std::fs::read(&tests[0]).expect("read");
    assert_eq!(
        parse(&bytes).subject(),
        Some("[TEST] Thank you for your order, Ada")
    );

    let config = touchpoint::config::Config::load(
        &run.shop().join("config/touchpoint.toml"),
        Vec::<(String, String)>::new(),
    )
    .expect("the written config loads");
    let store = touchpoint::store::open(&config.database_url(), 2)
        .await
        .expect("open the quick start's database");
    let log = store.log(&LogFilter::default()).await.expect("log");
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(
        (
            log[0].rule.as_str(),
            log[0].customer_id.as_str(),
            log[0].email.as_deref()
        ),
        ("thank-you-after-purchase", "c1", Some("ada@example.com"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_works_as_written() {
    let commands = quick_start_commands();
    assert_known_commands(&commands);
    let run = run_quick_start(commands).await;
    assert_what_each_command_said(&run);
    assert_the_test_and_the_real_message(&run).await;
}

// --- touchpoint init ----------------------------------------------------------------------------

/// What `init` must write: the repository's example config, rules and templates.
fn example_files() -> BTreeMap<String, String> {
    let mut expected = BTreeMap::new();
    expected.insert(
        "config/touchpoint.toml".to_string(),
        std::fs::read_to_string(repo_path("config/touchpoint.toml")).expect("config"),
    );
    for (dir, prefix) in [
        ("config/rules", "config/rules/"),
        ("templates", "templates/"),
    ] {
        for (path, text) in files_under(&repo_path(dir)) {
            expected.insert(format!("{prefix}{path}"), text);
        }
    }
    expected
}

#[test]
fn init_writes_every_example_file_and_a_setup_that_passes_check() {
    let work = tempfile::tempdir().expect("temp dir");
    let mut command = touchpoint(work.path());
    command.args(["init", "new/shop"]);
    let out = succeeds(command);
    let shop = work.path().join("new/shop");
    assert_eq!(
        files_under(&shop),
        example_files(),
        "init wrote something else"
    );
    assert!(shop.join("var").is_dir(), "no var/");
    let next: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("touchpoint "))
        .collect();
    assert_eq!(next.len(), 3, "not three commands to try:\n{out}");
    assert!(
        next[0].starts_with("touchpoint check") && next[1].starts_with("touchpoint run"),
        "{out}"
    );
    assert!(next[2].contains("--send-to"), "{out}");
    assert!(out.contains("cd new/shop"), "{out}");

    let mut check = touchpoint(&shop);
    check.arg("check");
    let report = succeeds(check);
    assert!(
        report.starts_with("config/touchpoint.toml: OK (3 rules, 3 enabled; 3 templates;"),
        "{report}"
    );
}

#[test]
fn init_never_overwrites_and_writes_nothing_when_a_file_is_in_the_way() {
    let work = tempfile::tempdir().expect("temp dir");
    let shop = work.path().join("shop");
    std::fs::create_dir_all(shop.join("templates")).expect("dir");
    std::fs::write(shop.join("templates/thank-you.txt.hbs"), "mine\n").expect("write");
    let mut command = touchpoint(work.path());
    command.args(["init", "shop"]);
    let error = fails(command);
    assert!(
        error.contains("shop already holds templates/thank-you.txt.hbs")
            && error.contains("never overwrites"),
        "{error}"
    );
    assert_eq!(
        files_under(&shop),
        BTreeMap::from([(
            "templates/thank-you.txt.hbs".to_string(),
            "mine\n".to_string()
        )]),
        "a refused init wrote something"
    );

    // Into a finished setup, a second init changes nothing either.
    let mut command = touchpoint(work.path());
    command.args(["init", "other"]);
    succeeds(command);
    let config = work.path().join("other/config/touchpoint.toml");
    std::fs::write(&config, "# edited\n").expect("edit");
    let mut command = touchpoint(work.path());
    command.args(["init", "other"]);
    let error = fails(command);
    assert!(error.contains("config/touchpoint.toml"), "{error}");
    assert_eq!(
        std::fs::read_to_string(&config).expect("read"),
        "# edited\n"
    );
}

#[test]
fn default_config_in_an_empty_directory_fails_check_saying_what_to_do() {
    let work = tempfile::tempdir().expect("temp dir");
    let mut command = touchpoint(work.path());
    command.arg("default-config");
    let text = succeeds(command);
    std::fs::write(work.path().join("x.toml"), text).expect("write");
    let mut command = touchpoint(work.path());
    command.args(["--config", "x.toml", "check"]);
    let error = fails(command);
    assert!(
        error.contains("rules.dir (")
            && error.contains("templates.dir (")
            && error.contains("do not exist"),
        "{error}"
    );
    assert!(error.contains("run `touchpoint init DIR`"), "{error}");
}

// --- what check tells a newcomer ------------------------------------------------------------------

/// `check` in a fresh setup with these `TOUCHPOINT_*` overrides.
fn check_with(shop: &Path, vars: &[(&str, &str)]) -> String {
    let mut command = touchpoint(shop);
    command.arg("check").envs(vars.iter().copied());
    succeeds(command)
}

fn line_of<'a>(report: &'a str, prefix: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line:\n{report}"))
}

/// A fresh setup from `init`, in its own directory.
fn fresh_setup() -> (tempfile::TempDir, PathBuf) {
    let work = tempfile::tempdir().expect("temp dir");
    let mut command = touchpoint(work.path());
    command.args(["init", "shop"]);
    succeeds(command);
    let shop = work.path().join("shop");
    (work, shop)
}

/// What `touchpoint hash-password` prints for `password`.
fn password_hash(cwd: &Path, password: &str) -> String {
    use std::io::Write as _;
    let mut command = touchpoint(cwd);
    command
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write");
    let done = child.wait_with_output().expect("hash-password");
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    String::from_utf8_lossy(&done.stdout).trim().to_string()
}

#[test]
fn check_summarises_rules_templates_the_listener_and_who_sees_the_page() {
    let (_work, shop) = fresh_setup();
    let report = check_with(&shop, &[]);
    let rules = line_of(&report, "rules: ");
    assert!(
        rules.starts_with("rules: 3 loaded from ") && rules.contains("thank-you-after-purchase"),
        "{report}"
    );
    assert!(
        line_of(&report, "templates: ").starts_with("templates: 3 found in "),
        "{report}"
    );
    assert!(
        line_of(&report, "transport: ").contains("var/outbox"),
        "{report}"
    );
    assert_eq!(
        line_of(&report, "http: "),
        "http: listening on 127.0.0.1:8025; links in messages point at http://127.0.0.1:8025"
    );
    assert_eq!(
        line_of(&report, "owner's page: "),
        "owner's page: http://127.0.0.1:8025/ needs no password, and only browsers on this machine see it"
    );

    let exposed = check_with(&shop, &[("TOUCHPOINT_HTTP__LISTEN", "0.0.0.0:8025")]);
    let page = line_of(&exposed, "owner's page: ");
    assert!(
        page.starts_with("owner's page: OFF") && page.contains("touchpoint hash-password"),
        "{page}"
    );
    let hash = password_hash(&shop, "a long enough password");
    let guarded = check_with(
        &shop,
        &[
            ("TOUCHPOINT_HTTP__LISTEN", "0.0.0.0:8025"),
            ("TOUCHPOINT_WEB__PASSWORD_HASH", &hash),
        ],
    );
    assert_eq!(
        line_of(&guarded, "owner's page: "),
        "owner's page: http://0.0.0.0:8025/ asks for the password"
    );
    let off = check_with(&shop, &[("TOUCHPOINT_HTTP__LISTEN", "")]);
    assert!(line_of(&off, "http: ").starts_with("http: off"), "{off}");
}

/// `check` with the SMTP transport to 127.0.0.1:`port`, off the async workers.
async fn check_smtp(shop: &Path, port: u16) -> String {
    let shop = shop.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let port = port.to_string();
        let vars = [
            ("TOUCHPOINT_TRANSPORT__KIND", "smtp"),
            ("TOUCHPOINT_TRANSPORT__SMTP__HOST", "127.0.0.1"),
            ("TOUCHPOINT_TRANSPORT__SMTP__PORT", port.as_str()),
        ];
        check_with(&shop, &vars)
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_whether_the_smtp_relay_answers_and_passes_either_way() {
    let (_work, shop) = fresh_setup();
    let peer = SmtpPeer::start().await;
    let port = peer.port();
    let reachable = check_smtp(&shop, port).await;
    let line = line_of(&reachable, "transport: ");
    assert!(
        line.starts_with(&format!("transport: smtp 127.0.0.1:{port}: reachable (220")),
        "{line}"
    );
    let closed = free_port();
    let unreachable = check_smtp(&shop, closed).await;
    let line = line_of(&unreachable, "transport: ");
    assert!(
        line.starts_with(&format!(
            "transport: smtp 127.0.0.1:{closed}: NOT reachable ("
        )),
        "{line}"
    );
}

// --- preview and test sends ---------------------------------------------------------------------

const BASE_URL: &str = "https://mail.acme.example/touchpoint";
const SHOP_URL: &str = "https://shop.acme.example/spring";

const WELCOME_HTML: &str = r#"{{#> layout}}
<p>Hi {{default customer.first_name "there"}}, your plan: {{default event.data.plan "none"}}.</p>
<p>Our spring bouquets are in: <a href="https://shop.acme.example/spring">see them</a>.</p>
{{/layout}}
"#;

const WELCOME_TEXT: &str = r#"Hi {{default customer.first_name "there"}}, your plan: {{default event.data.plan "none"}}.

{{> text-footer}}
"#;

const WELCOME_RULE: &str = r#"
[[rule]]
name = "welcome"
template = "welcome"
subject = "Welcome, {{customer.first_name}}"
when = { event = "signup", after = "1s" }
track_opens = true
track_clicks = true
"#;

/// A setup sending over SMTP to `peer`, with links, VERP and a DKIM key; returns the key's TXT
/// record.
async fn signing_env(backend: Backend, peer: &SmtpPeer) -> (TestEnv, String) {
    let extra = format!(
        "[links]\nbase_url = \"{BASE_URL}\"\n{}",
        dkim_section("ed25519")
    );
    let env = TestEnv::new(
        backend,
        Sink::Smtp(peer),
        &[("welcome.toml", WELCOME_RULE)],
        &extra,
    )
    .await;
    let config = std::fs::read_to_string(&env.config_path).expect("config");
    let from = "from = \"Acme Flowers <hello@acme.example>\"";
    let config = config.replacen(
        from,
        &format!("{from}\nbounce_address = \"bounces@acme.example\""),
        1,
    );
    std::fs::write(&env.config_path, config).expect("config");
    let templates = env.path().join("templates");
    std::fs::write(templates.join("welcome.html.hbs"), WELCOME_HTML).expect("template");
    std::fs::write(templates.join("welcome.txt.hbs"), WELCOME_TEXT).expect("template");
    let record = dkim_key(env.path(), "dkim.pem", "ed25519");
    (env, record)
}

/// Runs `touchpoint ARGS` with the test's config, off the async workers.
async fn cli(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let mut command = env.command();
    command.args(args);
    tokio::task::spawn_blocking(move || {
        let (code, out, err) = output(command);
        (code == Some(0), out, err)
    })
    .await
    .expect("join")
}

/// `touchpoint preview --rule welcome --customer ada ARGS`.
async fn preview_welcome(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["preview", "--rule", "welcome", "--customer", "ada"];
    all.extend_from_slice(args);
    cli(env, &all).await
}

/// What a customer has in the database: their row, messages and suppressions.
async fn customer_state(store: &SharedStore, id: &str) -> String {
    let customer = store.customer(id).await.expect("customer");
    let log = store.log(&LogFilter::default()).await.expect("log");
    let suppressions = store.suppressions().await.expect("suppressions");
    format!("{customer:?}\n{log:?}\n{suppressions:?}")
}

/// The daemon's path for a link URL (what the reverse proxy forwards).
fn local_path(url: &str) -> String {
    url.strip_prefix(BASE_URL)
        .unwrap_or_else(|| panic!("{url} is not under {BASE_URL}"))
        .to_string()
}

/// Every `attr="..."` value in `html` that starts with `prefix`.
fn html_urls(html: &str, attr: &str, prefix: &str) -> Vec<String> {
    let needle = format!("{attr}=\"{prefix}");
    html.match_indices(&needle)
        .map(|(at, _)| {
            let value = &html[at + attr.len() + 2..];
            value[..value.find('"').expect("closing quote")].replace("&amp;", "&")
        })
        .collect()
}

/// Ada, with two signups: an hour ago on the gold plan, and now on the silver one.
async fn ada_with_two_signups(env: &TestEnv, store: &SharedStore) {
    env.add_customer(store, "ada", "ada@example.net", "Ada Lovelace", None)
        .await;
    let signup = |id: &str, hours_ago: i64, plan: &str| Event {
        id: id.into(),
        customer_id: "ada".into(),
        kind: "signup".into(),
        occurred_at: Utc::now() - chrono::TimeDelta::hours(hours_ago),
        data: serde_json::json!({ "plan": plan }),
    };
    store
        .insert_events(&[
            signup("signup-old", 1, "gold"),
            signup("signup-new", 0, "silver"),
        ])
        .await
        .expect("events");
}

/// `--format eml --event`: the message as it would go out, for that event, on standard
/// output, signed; nothing is sent.
async fn assert_eml_preview(env: &TestEnv, peer: &SmtpPeer, record: &str) {
    let (ok, eml, err) = preview_welcome(env, &["--event", "signup-old", "--format", "eml"]).await;
    assert!(ok, "{err}");
    let message = parse(eml.as_bytes());
    assert_eq!(to_addresses(&message), ["ada@example.net"]);
    assert_eq!(message.subject(), Some("Welcome, Ada"));
    let text = message.body_text(0).expect("text").into_owned();
    assert!(
        text.contains("your plan: gold."),
        "--event was not used:\n{eml}"
    );
    assert!(
        message.header_raw("List-Unsubscribe").is_some()
            && message.header_raw("DKIM-Signature").is_some(),
        "{eml}"
    );
    assert!(
        dkimpy_verifies(env.path(), eml.as_bytes(), record),
        "dkimpy rejects:\n{eml}"
    );
    assert_eq!(peer.accepted_count(), 0, "--format eml sent something");
}

/// `--send-to`: one message through the peer, to that address only, `[TEST] `, VERP that
/// names no message, DKIM that dkimpy accepts. Returns what the peer received.
async fn assert_test_send(env: &TestEnv, peer: &SmtpPeer, record: &str) -> Vec<u8> {
    let (ok, out, err) = preview_welcome(env, &["--send-to", "tester@example.org"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("sent a test of rule \"welcome\" for customer \"ada\" to tester@example.org"),
        "{out}"
    );
    assert!(
        err.contains("test send") && err.contains("tester@example.org"),
        "not logged: {err}"
    );
    let accepted = peer.accepted();
    assert_eq!(accepted.len(), 1);
    let mail = &accepted[0];
    assert_eq!(mail.rcpt_to, ["tester@example.org"]);
    let message = parse(&mail.data);
    assert_eq!(to_addresses(&message), ["tester@example.org"]);
    assert_eq!(message.subject(), Some("[TEST] Welcome, Ada"));
    let text = message.body_text(0).expect("text").into_owned();
    assert!(
        text.contains("your plan: silver."),
        "not the latest signup: {text}"
    );
    let raw = String::from_utf8_lossy(&mail.data).into_owned();
    assert!(
        !raw.contains("ada@example.net"),
        "the customer's address is in the test"
    );
    let verp = touchpoint::bounce::parse_verp(&mail.mail_from).expect("a VERP address");
    assert!(
        mail.mail_from.ends_with("@acme.example") && verp.message < 0,
        "a test send's VERP names a message: {}",
        mail.mail_from
    );
    assert!(
        dkimpy_verifies(env.path(), &mail.data, record),
        "dkimpy rejects the test send"
    );
    let tampered = raw.replacen("[TEST] Welcome", "Welcome", 1);
    assert!(
        !dkimpy_verifies(env.path(), tampered.as_bytes(), record),
        "the verifier accepts anything"
    );
    mail.data.clone()
}

/// The unsubscribe, click and pixel URLs of a message.
fn links_of(message: &Message<'_>) -> (String, String, String) {
    let html = message.body_html(0).expect("html").into_owned();
    let unsubscribe = message
        .list_unsubscribe()
        .as_address()
        .and_then(|a| {
            a.iter().find_map(|a| {
                a.address()
                    .filter(|u| u.starts_with("https://"))
                    .map(str::to_string)
            })
        })
        .expect("an https List-Unsubscribe");
    let clicks = html_urls(&html, "href", &format!("{BASE_URL}/c/"));
    let pixels = html_urls(&html, "src", &format!("{BASE_URL}/o/"));
    assert_eq!((clicks.len(), pixels.len()), (1, 1), "{html}");
    (unsubscribe, clicks[0].clone(), pixels[0].clone())
}

/// The customer's own welcomes (one per signup) go out after the test, with no opens, clicks
/// or unsubscribes on them and no suppression.
async fn assert_real_messages_untouched(store: &SharedStore, peer: &SmtpPeer) {
    assert!(
        eventually(PATIENCE, || async { peer.accepted_count() == 3 }).await,
        "the real messages did not go out: {:#?}",
        store.log(&LogFilter::default()).await
    );
    for real in peer.accepted().iter().skip(1) {
        assert_eq!(real.rcpt_to, ["ada@example.net"]);
        assert_eq!(parse(&real.data).subject(), Some("Welcome, Ada"));
    }
    let log = store.log(&LogFilter::default()).await.expect("log");
    assert_eq!(log.len(), 2, "{log:#?}");
    for entry in &log {
        let events = store.message_events(entry.id).await.expect("events");
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert!(
            !kinds
                .iter()
                .any(|k| ["opened", "clicked", "unsubscribed"].contains(k)),
            "{kinds:?}"
        );
    }
    assert!(store.suppressions().await.expect("suppressions").is_empty());
}

async fn a_test_send_goes_out_signed_to_that_address_only_and_changes_nothing(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let (env, record) = signing_env(backend, &peer).await;
    let store = env.store().await;
    ada_with_two_signups(&env, &store).await;
    let before = customer_state(&store, "ada").await;
    assert_eml_preview(&env, &peer, &record).await;
    let data = assert_test_send(&env, &peer, &record).await;
    assert_eq!(
        customer_state(&store, "ada").await,
        before,
        "the test send changed the customer's state"
    );
    // Its links: the daemon answers that it was a test, and records nothing.
    let daemon = env.start().await;
    let (unsubscribe, click, pixel) = links_of(&parse(&data));
    follow_test_links(daemon.http, &unsubscribe, &click, &pixel).await;
    assert_real_messages_untouched(&store, &peer).await;
    daemon.stop().await;
}

/// GET and one-click POST of the unsubscribe link, the click and the pixel of a test send.
async fn follow_test_links(addr: SocketAddr, unsubscribe: &str, click: &str, pixel: &str) {
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    for (method, url, headers, body) in [
        ("GET", unsubscribe, &[][..], &b""[..]),
        (
            "POST",
            unsubscribe,
            &form[..],
            &b"List-Unsubscribe=One-Click"[..],
        ),
        ("GET", click, &[][..], &b""[..]),
    ] {
        let response = send(addr, method, &local_path(url), headers, body).await;
        let text = String::from_utf8_lossy(&response.body).into_owned();
        assert_eq!(response.status, 200, "{method} {url}: {text}");
        assert!(
            text.contains("This was a test") && text.contains("nobody was unsubscribed"),
            "{text}"
        );
        if url == click {
            assert!(text.contains(&format!("<a href=\"{SHOP_URL}\">")), "{text}");
        }
    }
    let response = send(addr, "GET", &local_path(pixel), &[], b"").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("image/gif"));
}

on_both_backends!(a_test_send_goes_out_signed_to_that_address_only_and_changes_nothing);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_send_to_something_that_is_not_an_address_is_refused_before_anything_happens() {
    let peer = SmtpPeer::start().await;
    let (env, _) = signing_env(Backend::Sqlite, &peer).await;
    let store = env.store().await;
    env.add_customer(&store, "ada", "ada@example.net", "Ada Lovelace", None)
        .await;
    env.add_event(&store, "signup-ada", "ada", "signup", Utc::now())
        .await;
    let (ok, _, err) = preview_welcome(&env, &["--send-to", "not an address"]).await;
    assert!(
        !ok && err.contains("--send-to \"not an address\" is not an email address"),
        "{err}"
    );
    let (ok, _, err) =
        preview_welcome(&env, &["--send-to", "x@example.org\r\nBcc: y@example.org"]).await;
    assert!(!ok && err.contains("line break"), "{err}");
    let (ok, _, err) = preview_welcome(&env, &["--event", "nope", "--format", "eml"]).await;
    assert!(!ok && err.contains("no event with id \"nope\""), "{err}");
    assert_eq!(peer.accepted_count(), 0);
    assert!(
        store
            .log(&LogFilter::default())
            .await
            .expect("log")
            .is_empty()
    );
}
