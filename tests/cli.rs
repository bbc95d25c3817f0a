//! The command line, through the real binary, as a new user meets it: `check` with every
//! mistake at its file, line and column; the data commands (customers, events, CSV imports) on
//! both backends, with what they wrote checked in the database; `plan`, `preview`, `log` and
//! `suppress` in every output format; `run` stopping cleanly on SIGTERM and SIGINT; and where
//! the config comes from (`--config`, `TOUCHPOINT_CONFIG`, the default, `TOUCHPOINT_*`
//! overrides).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use sqlx::Connection;
use support::smtp::{Fault, SmtpPeer, Stage};
use support::{Backend, Sink, TestEnv, eventually, repo_path, states};
use touchpoint::store::DatabaseUrl;

// --- helpers ----------------------------------------------------------------------------------

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(output: Output) -> Run {
        Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    #[track_caller]
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "expected success: {self:#?}");
        &self.stdout
    }

    /// Asserts a failure (exit 1, nothing on stdout) and returns the error text.
    #[track_caller]
    fn fails(&self) -> &str {
        assert_eq!(self.code, Some(1), "expected exit code 1: {self:#?}");
        assert!(
            self.stderr.starts_with("error: "),
            "the error is not said as one: {self:#?}"
        );
        &self.stderr
    }
}

/// Runs the binary with the test's config, without blocking the async test's workers.
async fn cli(env: &TestEnv, args: &[&str]) -> Run {
    let mut command = env.command();
    command.args(args);
    run(command).await
}

async fn run(mut command: Command) -> Run {
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run touchpoint");
    Run::from(output)
}

/// The binary with no `--config` and no `TOUCHPOINT_*` variables from the caller's environment.
fn bare_command(cwd: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_touchpoint"));
    command.current_dir(cwd).env_remove("NOTIFY_SOCKET");
    for (key, _) in std::env::vars() {
        if key.starts_with("TOUCHPOINT_") {
            command.env_remove(key);
        }
    }
    command
}

/// Rows in a table, read straight from the database.
async fn count(env: &TestEnv, table: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    match env.config().database_url() {
        DatabaseUrl::Sqlite(path) => {
            let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
            let mut connection = sqlx::SqliteConnection::connect_with(&options)
                .await
                .expect("open SQLite");
            sqlx::query_scalar(&sql)
                .fetch_one(&mut connection)
                .await
                .expect("count")
        }
        DatabaseUrl::Postgres(url) => {
            let mut connection = sqlx::PgConnection::connect(&url)
                .await
                .expect("connect to PostgreSQL");
            sqlx::query_scalar(&sql)
                .fetch_one(&mut connection)
                .await
                .expect("count")
        }
    }
}

/// The diagnostics of a failed `check`: one per line, `error: ` taken off the first.
fn diagnostics(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .map(|l| l.strip_prefix("error: ").unwrap_or(l).to_string())
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// Asserts that `check` failed and reported exactly these mistakes, in this order, each as
/// `file:line:column: message` with the message containing the given text.
#[track_caller]
fn assert_reported(run: &Run, expected: &[(&Path, usize, usize, &str)]) {
    run.fails();
    let found = diagnostics(&run.stderr);
    assert_eq!(
        found.len(),
        expected.len(),
        "expected {} problems, got:\n{}",
        expected.len(),
        run.stderr
    );
    for (line, (file, l, c, text)) in found.iter().zip(expected) {
        let place = format!("{}:{l}:{c}: ", file.display());
        assert!(
            line.starts_with(&place),
            "expected a problem at {place}, got: {line}"
        );
        assert!(line.contains(text), "expected {text:?} in: {line}");
    }
}

fn rule_path(env: &TestEnv, name: &str) -> PathBuf {
    env.path().join("rules").join(name)
}

/// A time a minute ago, whole seconds, so due times can be compared exactly.
fn a_minute_ago() -> DateTime<Utc> {
    (Utc::now() - TimeDelta::minutes(1)).trunc_subsecs(0)
}

fn table_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// The newest `daemon-N.log` that `spawn_daemon` wrote.
fn daemon_log(env: &TestEnv) -> String {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(env.path())
        .expect("read dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("daemon-"))
        })
        .collect();
    logs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    logs.last()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .unwrap_or_default()
}

async fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const THANK_YOU: &str = r#"[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "1s" }
"#;

const FOLLOW_UP: &str = r#"[[rule]]
name = "follow-up"
template = "follow-up"
subject = "As promised: next steps"
when = { event = "discovery_call", after = "1s" }
"#;

const THANK_YOU_IN_3_DAYS: &str = r#"[[rule]]
name = "thank-you-later"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "3d" }
"#;

// --- check ------------------------------------------------------------------------------------

#[tokio::test]
async fn check_accepts_the_shipped_config_from_any_directory() {
    let cwd = tempfile::tempdir().expect("temp dir");
    let config = repo_path("config/touchpoint.toml");
    let mut command = bare_command(cwd.path());
    command.arg("--config").arg(&config).arg("check");
    let run = run(command).await;
    let out = run.ok();
    // The OK line, then the summary: rules, templates, transport, http, owner's page.
    assert_eq!(out.lines().count(), 6, "{out}");
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!(
            "{}: OK (3 rules, 3 enabled; 3 templates; database SQLite file ",
            config.display()
        )),
        "{out}"
    );
    // The SQLite path is resolved against the config file's directory, not the cwd.
    assert!(
        first.ends_with(&format!("{})", repo_path("var/touchpoint.db").display())),
        "{out}"
    );
    assert!(
        out.contains(&format!("{}", repo_path("var/outbox").display())),
        "{out}"
    );
    assert!(run.stderr.is_empty(), "{}", run.stderr);
}

#[tokio::test]
async fn check_says_ok_with_counts_for_a_good_setup() {
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[("a.toml", THANK_YOU), ("b.toml", FOLLOW_UP)],
        "",
    )
    .await;
    let run = cli(&env, &["check"]).await;
    assert!(
        run.ok().starts_with(&format!(
            "{}: OK (2 rules, 2 enabled; 3 templates;",
            env.config_path.display()
        )),
        "{run:#?}"
    );
    // `check` validates; it does not create the database.
    assert!(!env.path().join("var").exists());
}

#[tokio::test]
async fn check_reports_an_unknown_key_in_a_rule() {
    let env = TestEnv::new(Backend::Sqlite, Sink::Files, &[], "").await;
    env.write_rule(
        "a.toml",
        "[[rule]]\nname = \"a\"\ntemplate = \"thank-you\"\nsubject = \"Hi\"\n\
         when = { event = \"purchase\", after = \"2h\" }\ntempalte_dir = \"x\"\n",
    );
    let run = cli(&env, &["check"]).await;
    assert_reported(
        &run,
        &[(
            &rule_path(&env, "a.toml"),
            6,
            1,
            "unknown key `tempalte_dir` in rule; expected one of: name, description, template",
        )],
    );
}

#[tokio::test]
async fn check_reports_a_bad_duration_at_its_value() {
    let env = TestEnv::new(Backend::Sqlite, Sink::Files, &[], "").await;
    env.write_rule(
        "a.toml",
        "[[rule]]\nname = \"a\"\ntemplate = \"thank-you\"\nsubject = \"Hi\"\n\
         when = { event = \"purchase\", after = \"2 hours\" }\n",
    );
    let run = cli(&env, &["check"]).await;
    // `when = { event = "purchase", after = ` is 37 characters: the value starts at column 38.
    assert_reported(
        &run,
        &[(
            &rule_path(&env, "a.toml"),
            5,
            38,
            "bad duration \"2 hours\" for after: expected a number followed by s, m, h, d or w",
        )],
    );
}

#[tokio::test]
async fn check_reports_every_mistake_of_every_file_at_once() {
    let env = TestEnv::new(Backend::Sqlite, Sink::Files, &[], "").await;
    env.write_rule(
        "a.toml",
        "# two mistakes\n[[rule]]\nname = \"a\"\ntemplate = \"thank-you\"\nsubject = \"Hi\"\n\
         when = { event = \"purchase\", after = \"2x\" }\n  colour = \"red\"\n",
    );
    env.write_rule(
        "b.toml",
        "[[rule]]\nname = \"b\"\ntemplate = \"thank-you\"\nsubject = \"Hi\"\n\
         when = { event = \"purchase\", after = \"2h\" }\n\
         send_window = { from = \"25:00\", to = \"18:00\" }\n",
    );
    let run = cli(&env, &["check"]).await;
    assert_reported(
        &run,
        &[
            (&rule_path(&env, "a.toml"), 6, 38, "bad duration \"2x\""),
            (
                &rule_path(&env, "a.toml"),
                7,
                3,
                "unknown key `colour` in rule",
            ),
            // `send_window = { from = ` is 23 characters.
            (
                &rule_path(&env, "b.toml"),
                6,
                24,
                "bad time \"25:00\" for from",
            ),
        ],
    );
}

#[tokio::test]
async fn check_reports_a_rule_name_used_in_two_files() {
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[("a.toml", THANK_YOU), ("b.toml", THANK_YOU)],
        "",
    )
    .await;
    let run = cli(&env, &["check"]).await;
    let first = rule_path(&env, "a.toml");
    assert_reported(
        &run,
        &[(
            &rule_path(&env, "b.toml"),
            2,
            8,
            &format!(
                "duplicate rule name `thank-you`: already used at {}:2",
                first.display()
            ),
        )],
    );
}

#[tokio::test]
async fn check_reports_a_template_that_does_not_exist() {
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[(
            "a.toml",
            &THANK_YOU.replace("\"thank-you\"\nsubject", "\"thanks\"\nsubject"),
        )],
        "",
    )
    .await;
    let run = cli(&env, &["check"]).await;
    assert_reported(
        &run,
        &[(
            &rule_path(&env, "a.toml"),
            3,
            12,
            "no template `thanks`: expected templates/thanks.html.hbs and templates/thanks.txt.hbs",
        )],
    );
}

#[tokio::test]
async fn check_reports_a_misspelt_template_variable_in_strict_mode() {
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[(
            "a.toml",
            &THANK_YOU.replace("\"thank-you\"\nsubject", "\"oops\"\nsubject"),
        )],
        "",
    )
    .await;
    let templates = env.path().join("templates");
    std::fs::write(templates.join("oops.html.hbs"), "<p>Hello</p>\n").unwrap();
    std::fs::write(
        templates.join("oops.txt.hbs"),
        "Hello,\nDear {{customr.name}}, thanks.\n",
    )
    .unwrap();
    let run = cli(&env, &["check"]).await;
    // Reported at the rule's `template` value, naming the template file, line and column.
    assert_reported(
        &run,
        &[(
            &rule_path(&env, "a.toml"),
            3,
            12,
            &format!(
                "rule \"thank-you\", text body: {}:2:6: \"customr.name\" is not in this message's context",
                templates.join("oops.txt.hbs").display()
            ),
        )],
    );
}

/// A whole config file with known line numbers; rules and templates from `env`.
fn config_text(env: &TestEnv, defaults: &str) -> String {
    format!(
        "[database]\nurl = \"sqlite:var/touchpoint.db\"\n\n[rules]\ndir = \"{}\"\n\n\
         [templates]\ndir = \"{}\"\n\n[sender]\nfrom = \"Acme <hello@acme.example>\"\n\n\
         [business]\nname = \"Acme\"\naddress = \"1 Main St\"\n\n[defaults]\n{defaults}\n",
        env.path().join("rules").display(),
        env.path().join("templates").display(),
    )
}

#[tokio::test]
async fn check_reports_an_unknown_config_key() {
    let env = TestEnv::new(Backend::Sqlite, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    let text = config_text(&env, "timezone = \"UTC\"\nexpire_afer = \"1d\"");
    assert_eq!(text.lines().nth(18), Some("expire_afer = \"1d\""));
    std::fs::write(&env.config_path, text).unwrap();
    let run = cli(&env, &["check"]).await;
    assert_reported(
        &run,
        &[(
            &env.config_path,
            19,
            1,
            "unknown field `expire_afer`, expected one of `timezone`, `expire_after`, `frequency_limit`, `quiet_dates`",
        )],
    );
}

#[tokio::test]
async fn check_reports_a_bad_default_time_zone() {
    let env = TestEnv::new(Backend::Sqlite, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    let text = config_text(&env, "timezone = \"Europe/Paritz\"");
    assert_eq!(text.lines().nth(17), Some("timezone = \"Europe/Paritz\""));
    std::fs::write(&env.config_path, text).unwrap();
    let run = cli(&env, &["check"]).await;
    assert_reported(
        &run,
        &[(
            &env.config_path,
            18,
            12,
            "unknown time zone \"Europe/Paritz\": expected an IANA time zone name",
        )],
    );
}

/// Every mistake of the config file, like every mistake of the rules files.
#[tokio::test]
async fn check_reports_every_config_mistake_at_once() {
    let env = TestEnv::new(Backend::Sqlite, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    let text = config_text(
        &env,
        "timezone = \"Europe/Paritz\"\nexpire_afer = \"1d\"\n\n\
         [colours]\nsky = \"blue\"\nsea = \"green\"\n\n[delivery]\nlease = \"soon\"",
    );
    assert_eq!(text.lines().nth(25), Some("lease = \"soon\""));
    std::fs::write(&env.config_path, text).unwrap();
    let run = cli(&env, &["check"]).await;
    // The keys of the unknown table are not reported again as keys of the table above it.
    assert_reported(
        &run,
        &[
            (
                &env.config_path,
                18,
                12,
                "unknown time zone \"Europe/Paritz\"",
            ),
            (&env.config_path, 19, 1, "unknown field `expire_afer`"),
            (&env.config_path, 21, 2, "unknown field `colours`"),
            (&env.config_path, 26, 9, "\"soon\" is not a duration"),
        ],
    );
}

#[tokio::test]
async fn default_config_is_the_shipped_one_and_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    // It needs no config file of its own.
    let run_ = run({
        let mut c = bare_command(dir.path());
        c.arg("default-config");
        c
    })
    .await;
    let text = run_.ok().to_string();
    assert_eq!(
        text,
        std::fs::read_to_string(repo_path("config/touchpoint.toml")).unwrap()
    );
    // Laid out like the repository: config/ with rules/, and templates/ beside it.
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/touchpoint.toml"), &text).unwrap();
    copy_dir(&repo_path("config/rules"), &dir.path().join("config/rules"));
    copy_dir(&repo_path("templates"), &dir.path().join("templates"));
    let mut command = bare_command(dir.path());
    command.arg("check");
    let checked = run(command).await;
    assert!(
        checked
            .ok()
            .starts_with("config/touchpoint.toml: OK (3 rules, 3 enabled; 3 templates;"),
        "{checked:#?}"
    );
}

// --- where the config comes from --------------------------------------------------------------

/// A directory with config/{touchpoint,other,env}.toml, each with its own SQLite file.
fn three_configs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(repo_path("config/touchpoint.toml")).unwrap();
    copy_dir(&repo_path("config/rules"), &dir.path().join("config/rules"));
    copy_dir(&repo_path("templates"), &dir.path().join("templates"));
    for name in ["touchpoint", "other", "env"] {
        let text = shipped.replace(
            "url = \"sqlite:../var/touchpoint.db\"",
            &format!("url = \"sqlite:../var/{name}.db\""),
        );
        assert!(text.contains(&format!("var/{name}.db")));
        std::fs::write(dir.path().join(format!("config/{name}.toml")), text).unwrap();
    }
    dir
}

#[tokio::test]
async fn config_comes_from_the_flag_then_the_environment_then_the_default() {
    let dir = three_configs();
    let check = |flag: Option<&str>, env: Option<&str>| {
        let mut command = bare_command(dir.path());
        if let Some(path) = flag {
            command.arg("--config").arg(path);
        }
        if let Some(path) = env {
            command.env("TOUCHPOINT_CONFIG", path);
        }
        command.arg("check");
        command
    };
    let out = run(check(None, None)).await;
    assert!(
        out.ok().starts_with("config/touchpoint.toml: OK")
            && out.ok().contains("var/touchpoint.db"),
        "{out:#?}"
    );
    let out = run(check(None, Some("config/env.toml"))).await;
    assert!(
        out.ok().starts_with("config/env.toml: OK") && out.ok().contains("var/env.db"),
        "{out:#?}"
    );
    let out = run(check(Some("config/other.toml"), Some("config/env.toml"))).await;
    assert!(
        out.ok().starts_with("config/other.toml: OK") && out.ok().contains("var/other.db"),
        "{out:#?}"
    );
    // --config also works after the subcommand (it is a global flag).
    let mut command = bare_command(dir.path());
    command.args(["check", "--config", "config/other.toml"]);
    let out = run(command).await;
    assert!(out.ok().starts_with("config/other.toml: OK"), "{out:#?}");
}

#[tokio::test]
async fn a_missing_config_file_says_how_to_name_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = bare_command(dir.path());
    command.arg("check");
    let out = run(command).await;
    let error = out.fails();
    assert!(
        error.contains("cannot read the config file config/touchpoint.toml")
            && error.contains("--config PATH")
            && error.contains("TOUCHPOINT_CONFIG"),
        "{error}"
    );
    let mut command = bare_command(dir.path());
    command.args(["--config", "nope.toml", "migrate"]);
    let out = run(command).await;
    assert!(out.fails().contains("nope.toml"), "{out:#?}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "a failed command wrote files"
    );
}

#[tokio::test]
async fn environment_variables_override_config_keys() {
    let dir = three_configs();
    let elsewhere = dir.path().join("elsewhere.db");
    let mut command = bare_command(dir.path());
    command
        .env(
            "TOUCHPOINT_DATABASE__URL",
            format!("sqlite:{}", elsewhere.display()),
        )
        .args([
            "customer",
            "add",
            "--id",
            "c1",
            "--email",
            "ada@example.com",
        ]);
    run(command).await.ok();
    assert!(elsewhere.exists(), "the override was not used");
    assert!(
        !dir.path().join("var/touchpoint.db").exists(),
        "the config file's database was used despite the override"
    );
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&elsewhere);
    let mut connection = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    let email: String = sqlx::query_scalar("SELECT email FROM customers WHERE id = 'c1'")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(email, "ada@example.com");

    // A typed override, and a bad one named by its variable.
    let mut command = bare_command(dir.path());
    command
        .env("TOUCHPOINT_DEFAULTS__TIMEZONE", "Mars/Olympus")
        .arg("check");
    let out = run(command).await;
    let error = out.fails();
    assert!(
        error.contains("TOUCHPOINT_DEFAULTS__TIMEZONE") && error.contains("Mars/Olympus"),
        "{error}"
    );
    let mut command = bare_command(dir.path());
    command.env("TOUCHPOINT_NOPE", "1").arg("check");
    let out = run(command).await;
    assert!(
        out.fails().contains("TOUCHPOINT_NOPE") && out.stderr.contains("unknown field `nope`"),
        "{out:#?}"
    );
}

// --- migrate ----------------------------------------------------------------------------------

async fn migrate_creates_the_tables_and_is_idempotent(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    let out = cli(&env, &["migrate"]).await;
    let expected = match backend {
        Backend::Sqlite => format!(
            "migrations applied to SQLite file {}\n",
            env.path().join("var/touchpoint.db").display()
        ),
        Backend::Postgres => format!(
            "migrations applied to PostgreSQL {}",
            env.database_url.rsplit('@').next().unwrap_or_default()
        ),
    };
    assert_eq!(out.ok().trim_end(), expected.trim_end());
    assert!(
        !out.stdout.contains("postgres@"),
        "credentials shown: {}",
        out.stdout
    );
    for table in [
        "customers",
        "events",
        "messages",
        "message_events",
        "suppressions",
    ] {
        assert_eq!(count(&env, table).await, 0, "{table}");
    }
    cli(&env, &["migrate"]).await.ok();
}

// --- customers and events ---------------------------------------------------------------------

async fn customer_add_saves_and_updates(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    let out = cli(
        &env,
        &[
            "customer",
            "add",
            "--id",
            "c1",
            "--email",
            "ada@example.com",
            "--name",
            "Ada Lovelace",
            "--timezone",
            "Europe/London",
            "--attr",
            "plan=gold",
            "--attr",
            "visits=3",
            "--attr",
            "note=a=b",
        ],
    )
    .await;
    assert_eq!(out.ok(), "customer c1 saved\n");
    let store = env.store().await;
    let customer = store.customer("c1").await.unwrap().expect("saved");
    assert_eq!(customer.email, "ada@example.com");
    assert_eq!(customer.name.as_deref(), Some("Ada Lovelace"));
    assert_eq!(customer.timezone.as_deref(), Some("Europe/London"));
    assert_eq!(
        customer.attributes,
        serde_json::json!({ "plan": "gold", "visits": 3, "note": "a=b" })
    );

    // The same id again updates that customer: what the command names changes, the rest stays.
    let out = cli(
        &env,
        &[
            "customer",
            "add",
            "--id",
            "c1",
            "--email",
            "ada@lovelace.example",
            "--attr",
            "plan=platinum",
        ],
    )
    .await;
    assert_eq!(out.ok(), "customer c1 updated\n");
    assert_eq!(count(&env, "customers").await, 1);
    let customer = store.customer("c1").await.unwrap().expect("still there");
    assert_eq!(customer.email, "ada@lovelace.example");
    assert_eq!(customer.name.as_deref(), Some("Ada Lovelace"));
    assert_eq!(customer.timezone.as_deref(), Some("Europe/London"));
    assert_eq!(
        customer.attributes,
        serde_json::json!({ "plan": "platinum", "visits": 3, "note": "a=b" })
    );
}

async fn customer_add_refuses_bad_input_and_writes_nothing(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    env.store().await;
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--id", "c1", "--email", "ada.example.com"],
            &["\"ada.example.com\" is not a valid email address"],
        ),
        (
            &[
                "--id",
                "c1",
                "--email",
                "ada@example.com",
                "--timezone",
                "Europe/Londn",
            ],
            &[
                "unknown time zone \"Europe/Londn\"",
                "expected an IANA time zone name",
            ],
        ),
        (
            &[
                "--id",
                "c1",
                "--email",
                "ada@example.com",
                "--attr",
                "plan:gold",
            ],
            &["--attr \"plan:gold\": expected KEY=VALUE"],
        ),
        (
            &[
                "--id",
                "c1",
                "--email",
                "ada@example.com",
                "--attr",
                "=gold",
            ],
            &["--attr \"=gold\": the key is empty"],
        ),
        (
            &["--id", " ", "--email", "ada@example.com"],
            &["the customer id is empty"],
        ),
    ];
    for (args, messages) in cases {
        let mut full = vec!["customer", "add"];
        full.extend_from_slice(args);
        let out = cli(&env, &full).await;
        let error = out.fails();
        for message in *messages {
            assert!(error.contains(message), "{args:?}: {error}");
        }
        assert!(out.stdout.is_empty(), "{out:#?}");
    }
    assert_eq!(count(&env, "customers").await, 0);
}

async fn event_add_saves_once_and_explains_mistakes(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    cli(
        &env,
        &[
            "customer",
            "add",
            "--id",
            "c1",
            "--email",
            "ada@example.com",
        ],
    )
    .await
    .ok();
    let store = env.store().await;

    // A date alone is midnight UTC of that date.
    let out = cli(
        &env,
        &[
            "event",
            "add",
            "--customer",
            "c1",
            "--kind",
            "wedding",
            "--at",
            "2019-06-15",
            "--id",
            "w1",
            "--data",
            "venue=Lyon",
            "--data",
            "guests=80",
        ],
    )
    .await;
    assert_eq!(out.ok(), "event w1 saved\n");
    let event = store.event("w1").await.unwrap().expect("saved");
    assert_eq!(event.customer_id, "c1");
    assert_eq!(event.kind, "wedding");
    assert_eq!(event.occurred_at.to_rfc3339(), "2019-06-15T00:00:00+00:00");
    assert_eq!(
        event.data,
        serde_json::json!({ "venue": "Lyon", "guests": 80 })
    );

    // RFC 3339 with an offset.
    let out = cli(
        &env,
        &[
            "event",
            "add",
            "--customer",
            "c1",
            "--kind",
            "purchase",
            "--at",
            "2026-01-02T10:30:00+01:00",
            "--id",
            "p1",
        ],
    )
    .await;
    out.ok();
    let event = store.event("p1").await.unwrap().expect("saved");
    assert_eq!(event.occurred_at.to_rfc3339(), "2026-01-02T09:30:00+00:00");

    // The same id again: nothing changes, and it says so.
    let out = cli(
        &env,
        &[
            "event",
            "add",
            "--customer",
            "c1",
            "--kind",
            "purchase",
            "--at",
            "2026-03-03",
            "--id",
            "p1",
        ],
    )
    .await;
    assert_eq!(out.ok(), "event p1 exists already; nothing changed\n");
    let event = store.event("p1").await.unwrap().expect("kept");
    assert_eq!(event.occurred_at.to_rfc3339(), "2026-01-02T09:30:00+00:00");

    // Without --at and --id: now, with a new id.
    let before = Utc::now() - TimeDelta::seconds(1);
    let out = cli(
        &env,
        &["event", "add", "--customer", "c1", "--kind", "purchase"],
    )
    .await;
    let id = out
        .ok()
        .strip_prefix("event ")
        .and_then(|s| s.strip_suffix(" saved\n"))
        .expect("event ID saved")
        .to_string();
    let event = store.event(&id).await.unwrap().expect("saved");
    assert!(event.occurred_at >= before && event.occurred_at <= Utc::now());
    assert_eq!(count(&env, "events").await, 3);

    // Mistakes: nothing written.
    let out = cli(
        &env,
        &["event", "add", "--customer", "nobody", "--kind", "purchase"],
    )
    .await;
    assert!(
        out.fails().contains(
            "no customer with id \"nobody\": add it first with `touchpoint customer add`"
        ),
        "{out:#?}"
    );
    for bad in ["yesterday", "15/06/2019", "2019-06-15 10:00"] {
        let out = cli(
            &env,
            &[
                "event",
                "add",
                "--customer",
                "c1",
                "--kind",
                "purchase",
                "--at",
                bad,
            ],
        )
        .await;
        let error = out.fails();
        assert!(
            error.contains(&format!("--at: \"{bad}\" is not a time"))
                && error.contains("RFC 3339 like 2026-11-23T09:00:00Z")
                && error.contains("a date like 2019-06-15"),
            "{error}"
        );
    }
    let out = cli(
        &env,
        &[
            "event",
            "add",
            "--customer",
            "c1",
            "--kind",
            "purchase",
            "--data",
            "order",
        ],
    )
    .await;
    assert!(
        out.fails().contains("--data \"order\": expected KEY=VALUE"),
        "{out:#?}"
    );
    assert_eq!(count(&env, "events").await, 3);
}

// --- CSV imports ------------------------------------------------------------------------------

async fn import_customers_all_or_nothing(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    cli(
        &env,
        &[
            "customer",
            "add",
            "--id",
            "c1",
            "--email",
            "old@example.com",
        ],
    )
    .await
    .ok();
    let store = env.store().await;
    let bad = env.path().join("bad-customers.csv");
    // Line 3 starts a row whose quoted name spans two lines (a line break, which a name may
    // not hold: it would go into the To header), so the next bad rows are lines 5-7.
    std::fs::write(
        &bad,
        "id,email,name,timezone,plan,city\n\
         c1,ada@example.com,\"Lovelace, Ada\",Europe/London,gold,\"Lyon, France\"\n\
         c2,bob@example.com,\"Bob\nSmith\",,silver,\n\
         c3,not-an-email,Carol,,,\n\
         ,dan@example.com,Dan,,,\n\
         c4,eve@example.com,Eve,Mars/Olympus,,\n",
    )
    .unwrap();
    let out = cli(&env, &["import", "customers", bad.to_str().unwrap()]).await;
    let error = out.fails();
    let path = bad.display();
    let lines: Vec<&str> = error
        .trim_start_matches("error: ")
        .lines()
        .collect::<Vec<_>>();
    assert_eq!(lines.len(), 5, "{error}");
    assert_eq!(
        lines[0],
        format!("{path}:3: the name contains a line break (LF)")
    );
    assert!(
        lines[1].starts_with(&format!("{path}:5: \"not-an-email\" is not a valid email")),
        "{error}"
    );
    assert_eq!(lines[2], format!("{path}:6: the id is empty"));
    assert!(
        lines[3].starts_with(&format!("{path}:7: unknown time zone \"Mars/Olympus\"")),
        "{error}"
    );
    assert_eq!(
        lines[4],
        "nothing was imported; fix these rows and run the import again"
    );
    // Nothing of the file was written: c1 kept its address, no one was added.
    assert_eq!(count(&env, "customers").await, 1, "a bad file wrote rows");
    assert_eq!(
        store.customer("c1").await.unwrap().expect("c1").email,
        "old@example.com"
    );

    // A header without an email column is line 1.
    let headless = env.path().join("headless.csv");
    std::fs::write(&headless, "id,mail\nc1,ada@example.com\n").unwrap();
    let out = cli(&env, &["import", "customers", headless.to_str().unwrap()]).await;
    assert!(
        out.fails().contains(&format!(
            "{}:1: the header has no `email` column",
            headless.display()
        )),
        "{out:#?}"
    );

    let good = env.path().join("customers.csv");
    std::fs::write(
        &good,
        "ID, Email ,name,timezone,plan,city,visits,zip\n\
         c1,ada@example.com,\"Lovelace, Ada\",Europe/London,gold,\"Lyon, France\",3,01234\n\
         c2,bob@example.com,\"Bob \"\"the builder\"\"\",,silver,,,\n",
    )
    .unwrap();
    let out = cli(&env, &["import", "customers", good.to_str().unwrap()]).await;
    assert_eq!(
        out.ok(),
        format!("imported 2 customers from {}\n", good.display())
    );
    assert_eq!(count(&env, "customers").await, 2);
    let ada = store.customer("c1").await.unwrap().expect("c1");
    assert_eq!(ada.email, "ada@example.com");
    assert_eq!(ada.name.as_deref(), Some("Lovelace, Ada"));
    assert_eq!(ada.timezone.as_deref(), Some("Europe/London"));
    assert_eq!(
        ada.attributes,
        serde_json::json!({ "plan": "gold", "city": "Lyon, France", "visits": 3, "zip": "01234" })
    );
    let bob = store.customer("c2").await.unwrap().expect("c2");
    assert_eq!(bob.name.as_deref(), Some("Bob \"the builder\""));
    assert_eq!(bob.timezone, None);
    assert_eq!(bob.attributes, serde_json::json!({ "plan": "silver" }));

    // A missing file is a clear error.
    let out = cli(&env, &["import", "customers", "no-such.csv"]).await;
    assert!(out.fails().contains("cannot read no-such.csv"), "{out:#?}");
}

async fn import_events_all_or_nothing_and_idempotent(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    cli(
        &env,
        &[
            "customer",
            "add",
            "--id",
            "c1",
            "--email",
            "ada@example.com",
        ],
    )
    .await
    .ok();
    cli(
        &env,
        &[
            "customer",
            "add",
            "--id",
            "c2",
            "--email",
            "bob@example.com",
        ],
    )
    .await
    .ok();
    cli(
        &env,
        &[
            "event",
            "add",
            "--customer",
            "c1",
            "--kind",
            "purchase",
            "--id",
            "o0",
        ],
    )
    .await
    .ok();

    let bad = env.path().join("bad-events.csv");
    std::fs::write(
        &bad,
        "customer_id,kind,occurred_at,id,order_number\n\
         c1,purchase,2026-01-02T10:00:00Z,o1,1\n\
         c1,purchase,last tuesday,o2,2\n\
         ghost,purchase,2026-01-02T10:00:00Z,o3,3\n\
         ,purchase,2026-01-02T10:00:00Z,o4,4\n\
         c2,purchase,2026-01-02T10:00:00Z,o5,5\n",
    )
    .unwrap();
    let out = cli(&env, &["import", "events", bad.to_str().unwrap()]).await;
    let error = out.fails();
    let path = bad.display();
    let lines: Vec<&str> = error.trim_start_matches("error: ").lines().collect();
    assert_eq!(lines.len(), 4, "every bad row, then the verdict:\n{error}");
    assert!(
        lines[0].starts_with(&format!("{path}:3: \"last tuesday\" is not a time")),
        "{error}"
    );
    assert_eq!(
        lines[1],
        format!("{path}:4: no customer with id \"ghost\" (import customers first)")
    );
    assert_eq!(lines[2], format!("{path}:5: the customer_id is empty"));
    assert_eq!(
        lines[3],
        "nothing was imported; fix these rows and run the import again"
    );
    assert_eq!(count(&env, "events").await, 1, "a bad file wrote rows");

    // An unknown customer alone is reported with its line too.
    let ghost = env.path().join("ghost.csv");
    std::fs::write(
        &ghost,
        "customer,kind,at\nc1,purchase,2026-01-02\nghost,purchase,2026-01-02\n",
    )
    .unwrap();
    let out = cli(&env, &["import", "events", ghost.to_str().unwrap()]).await;
    assert!(
        out.fails().contains(&format!(
            "{}:3: no customer with id \"ghost\"",
            ghost.display()
        )),
        "{out:#?}"
    );
    assert_eq!(count(&env, "events").await, 1);

    let good = env.path().join("events.csv");
    std::fs::write(
        &good,
        "customer_id,kind,occurred_at,id,order_number,note,coupon\n\
         c1,purchase,2026-01-02T10:00:00Z,o1,1042,\"gift, wrapped\",01234\n\
         c2,purchase,2026-01-03T11:00:00+01:00,,77,,\n\
         c2,wedding,2019-06-15,,,,\n",
    )
    .unwrap();
    let out = cli(&env, &["import", "events", good.to_str().unwrap()]).await;
    assert_eq!(
        out.ok(),
        format!("imported 3 events from {} (3 new)\n", good.display())
    );
    assert_eq!(count(&env, "events").await, 4);
    let store = env.store().await;
    let o1 = store.event("o1").await.unwrap().expect("o1");
    assert_eq!(o1.customer_id, "c1");
    assert_eq!(o1.occurred_at.to_rfc3339(), "2026-01-02T10:00:00+00:00");
    assert_eq!(
        o1.data,
        serde_json::json!({ "order_number": 1042, "note": "gift, wrapped", "coupon": "01234" })
    );
    let wedding = store
        .latest_event("c2", "wedding")
        .await
        .unwrap()
        .expect("wedding");
    assert_eq!(
        wedding.occurred_at.to_rfc3339(),
        "2019-06-15T00:00:00+00:00"
    );
    assert_eq!(wedding.data, serde_json::json!({}));
    let purchase = store
        .latest_event("c2", "purchase")
        .await
        .unwrap()
        .expect("purchase");
    assert_eq!(
        purchase.occurred_at.to_rfc3339(),
        "2026-01-03T10:00:00+00:00"
    );
    assert_eq!(purchase.data, serde_json::json!({ "order_number": 77 }));

    // The same file again adds nothing, rows with and without ids alike.
    let out = cli(&env, &["import", "events", good.to_str().unwrap()]).await;
    assert_eq!(
        out.ok(),
        format!("imported 3 events from {} (0 new)\n", good.display())
    );
    assert_eq!(count(&env, "events").await, 4);
}

// --- plan and preview -------------------------------------------------------------------------

async fn plan_shows_what_would_be_sent_and_why(backend: Backend) {
    let env = TestEnv::new(
        backend,
        Sink::Files,
        &[("later.toml", THANK_YOU_IN_3_DAYS)],
        "",
    )
    .await;
    let bought = a_minute_ago();
    cli(
        &env,
        &[
            "customer",
            "add",
            "--id",
            "c1",
            "--email",
            "ada@example.com",
            "--name",
            "Ada",
        ],
    )
    .await
    .ok();
    cli(
        &env,
        &[
            "event",
            "add",
            "--customer",
            "c1",
            "--kind",
            "purchase",
            "--id",
            "order-7",
            "--at",
            &bought.to_rfc3339(),
        ],
    )
    .await
    .ok();
    let due = bought + TimeDelta::days(3);

    let out = cli(&env, &["plan"]).await;
    let table = out.ok();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    for header in ["due (UTC)", "rule", "customer", "email", "status", "why"] {
        assert!(lines[0].contains(header), "{table}");
    }
    let row: Vec<&str> = lines[1].split("  ").filter(|c| !c.is_empty()).collect();
    assert_eq!(
        row.iter().map(|c| c.trim()).collect::<Vec<_>>(),
        vec![
            table_time(due).as_str(),
            "thank-you-later",
            "c1",
            "ada@example.com",
            "not yet planned",
            format!("purchase order-7 at {}", table_time(bought)).as_str(),
        ],
        "{table}"
    );
    // A dry run: nothing was written.
    assert_eq!(count(&env, "messages").await, 0);

    let out = cli(&env, &["plan", "--format", "json"]).await;
    let json: serde_json::Value = serde_json::from_str(out.ok()).expect("plan JSON parses");
    let rows = json.as_array().expect("an array");
    assert_eq!(rows.len(), 1, "{json:#}");
    let row = &rows[0];
    assert_eq!(row["rule"], "thank-you-later");
    assert_eq!(row["customer_id"], "c1");
    assert_eq!(row["email"], "ada@example.com");
    let due_at: DateTime<Utc> = row["due_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(due_at, due);
    assert_eq!(
        row["why"],
        format!("purchase order-7 at {}", table_time(bought))
    );

    // The horizon: due in 3 days is outside 2 and inside 3.
    let out = cli(&env, &["plan", "--days", "2"]).await;
    assert_eq!(out.ok(), "nothing to send in the next 2 days\n");
    let out = cli(&env, &["plan", "--days", "2", "--format", "json"]).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(out.ok()).unwrap(),
        serde_json::json!([])
    );
    let out = cli(&env, &["plan", "--days", "3", "--format", "json"]).await;
    let json: serde_json::Value = serde_json::from_str(out.ok()).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(1));

    // Once the daemon has planned it, it shows once, as scheduled, with its message id.
    let store = env.store().await;
    let daemon = env.start().await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            states(&store).await.get("scheduled") == Some(&1)
        })
        .await,
        "the daemon did not plan the message"
    );
    daemon.stop().await;
    let out = cli(&env, &["plan", "--format", "json"]).await;
    let json: serde_json::Value = serde_json::from_str(out.ok()).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 1, "planned twice: {json:#}");
    assert_eq!(rows[0]["status"], "scheduled");
    assert!(rows[0]["message_id"].is_i64(), "{json:#}");
    let due_at: DateTime<Utc> = rows[0]["due_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(due_at, due);
    assert_eq!(
        rows[0]["why"],
        format!("purchase order-7 at {}", table_time(bought))
    );
}

async fn preview_renders_subject_text_and_html(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    cli(
        &env,
        &[
            "customer",
            "add",
            "--id",
            "c1",
            "--email",
            "ada@example.com",
            "--name",
            "Ada Lovelace",
        ],
    )
    .await
    .ok();
    cli(
        &env,
        &[
            "customer",
            "add",
            "--id",
            "c2",
            "--email",
            "bob@example.com",
        ],
    )
    .await
    .ok();
    cli(
        &env,
        &[
            "event",
            "add",
            "--customer",
            "c1",
            "--kind",
            "purchase",
            "--data",
            "order_number=1042",
        ],
    )
    .await
    .ok();

    let out = cli(
        &env,
        &["preview", "--rule", "thank-you", "--customer", "c1"],
    )
    .await;
    let text = out.ok();
    assert!(
        text.starts_with(
            "Subject: Thank you for your order, Ada\nTo: ada@example.com\n\n--- text ---\nHi Ada,\n"
        ),
        "{text}"
    );
    let (plain, html) = text.split_once("--- html ---\n").expect("an HTML part");
    assert!(
        plain.contains("Thank you for your order (no. 1042)."),
        "{plain}"
    );
    assert!(
        plain.contains("Acme Flowers\n1 Garden Lane, Springfield"),
        "{plain}"
    );
    assert!(!plain.contains('<'), "{plain}");
    assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
    assert!(
        html.contains("<p style=\"margin:0 0 16px 0;\">Hi Ada,</p>") && html.contains("(no. 1042)"),
        "{html}"
    );
    // Nothing was planned or sent.
    assert_eq!(count(&env, "messages").await, 0);

    let out = cli(&env, &["preview", "--rule", "thanks", "--customer", "c1"]).await;
    assert!(
        out.fails()
            .contains("no rule named \"thanks\"; the rules are: thank-you"),
        "{out:#?}"
    );
    let out = cli(
        &env,
        &["preview", "--rule", "thank-you", "--customer", "zz"],
    )
    .await;
    assert!(
        out.fails().contains("no customer with id \"zz\""),
        "{out:#?}"
    );
    let out = cli(
        &env,
        &["preview", "--rule", "thank-you", "--customer", "c2"],
    )
    .await;
    assert!(
        out.fails().contains(
            "customer \"c2\" has no \"purchase\" event to preview the rule with (pass --event ID)"
        ),
        "{out:#?}"
    );
}

// --- the log, after real sends ----------------------------------------------------------------

const LOG_TABLE_COLUMNS: [&str; 12] = [
    "id",
    "rule",
    "customer_id",
    "email",
    "subject",
    "state",
    "due_at",
    "sent_at",
    "attempts",
    "smtp_reply",
    "message_id",
    "reason",
];

fn csv_rows(text: &str) -> (Vec<String>, Vec<csv::StringRecord>) {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .expect("CSV header")
        .iter()
        .map(str::to_string)
        .collect();
    let rows = reader
        .records()
        .collect::<Result<Vec<_>, _>>()
        .expect("CSV parses");
    (headers, rows)
}

async fn log_shows_what_the_daemon_did(backend: Backend) {
    let peer = SmtpPeer::start().await;
    peer.fault_for_recipient(
        "bob@",
        Fault::Reply {
            at: Stage::Rcpt,
            code: 550,
            text: "5.1.1 No such user".into(),
        },
    );
    let env = TestEnv::new(
        backend,
        Sink::Smtp(&peer),
        &[("a.toml", THANK_YOU), ("b.toml", FOLLOW_UP)],
        "",
    )
    .await;
    for (id, email, name) in [
        ("c1", "ada@example.com", "Ada Lovelace"),
        ("c2", "bob@example.com", "Bob Smith"),
    ] {
        cli(
            &env,
            &[
                "customer", "add", "--id", id, "--email", email, "--name", name,
            ],
        )
        .await
        .ok();
    }
    for (customer, kind, id) in [
        ("c1", "purchase", "o1"),
        ("c1", "discovery_call", "call1"),
        ("c2", "purchase", "o2"),
    ] {
        cli(
            &env,
            &[
                "event",
                "add",
                "--customer",
                customer,
                "--kind",
                kind,
                "--id",
                id,
            ],
        )
        .await
        .ok();
    }
    let out = cli(&env, &["log"]).await;
    assert_eq!(out.ok(), "no messages match\n");

    let store = env.store().await;
    let daemon = env.start().await;
    assert!(peer.wait_for_accepted(2, Duration::from_secs(20)).await);
    assert!(
        eventually(Duration::from_secs(10), || async {
            let s = states(&store).await;
            s.get("sent") == Some(&2) && s.get("failed") == Some(&1)
        })
        .await,
        "{:?}",
        states(&store).await
    );
    daemon.stop().await;
    let ada_message_ids: Vec<String> = peer.accepted_message_ids();

    // The table: every required column, one row per message.
    let out = cli(&env, &["log"]).await;
    let table = out.ok();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    let headers: Vec<&str> = lines[0].split_whitespace().collect();
    // The required columns first, in this order (more may follow).
    assert_eq!(headers.get(..12), Some(&LOG_TABLE_COLUMNS[..]), "{table}");
    assert!(
        lines[1..]
            .iter()
            .any(|l| l.contains("failed") && l.contains("bob@example.com") && l.contains("550")),
        "{table}"
    );

    // CSV: every column, parsed by a CSV reader (the subject has a comma).
    let out = cli(&env, &["log", "--format", "csv"]).await;
    let (headers, rows) = csv_rows(out.ok());
    for column in LOG_TABLE_COLUMNS {
        assert!(headers.iter().any(|h| h == column), "{column}: {headers:?}");
    }
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    assert_eq!(rows.len(), 3);
    let find = |rule: &str, customer: &str| {
        rows.iter()
            .find(|r| &r[col("rule")] == rule && &r[col("customer_id")] == customer)
            .unwrap_or_else(|| panic!("no {rule}/{customer} row: {rows:?}"))
            .clone()
    };
    let thanks = find("thank-you", "c1");
    assert_eq!(&thanks[col("email")], "ada@example.com");
    assert_eq!(&thanks[col("subject")], "Thank you for your order, Ada");
    assert_eq!(&thanks[col("state")], "sent");
    assert_eq!(&thanks[col("attempts")], "1");
    assert!(thanks[col("smtp_reply")].starts_with("250"), "{thanks:?}");
    assert!(!thanks[col("due_at")].is_empty());
    assert!(!thanks[col("sent_at")].is_empty());
    assert!(thanks[col("id")].parse::<i64>().is_ok());
    assert_eq!(&thanks[col("event_id")], "o1");
    let message_id = thanks[col("message_id")]
        .trim_matches(['<', '>'])
        .to_string();
    assert!(
        ada_message_ids.contains(&message_id),
        "{message_id} not in {ada_message_ids:?}"
    );
    assert_eq!(&thanks[col("reason")], "");
    let follow = find("follow-up", "c1");
    assert_eq!(&follow[col("subject")], "As promised: next steps");
    assert_eq!(&follow[col("state")], "sent");
    let refused = find("thank-you", "c2");
    assert_eq!(&refused[col("email")], "bob@example.com");
    assert_eq!(&refused[col("state")], "failed");
    assert_eq!(&refused[col("sent_at")], "");
    assert!(
        refused[col("smtp_reply")].starts_with("550")
            && refused[col("smtp_reply")].contains("5.1.1"),
        "{refused:?}"
    );
    assert!(!refused[col("reason")].is_empty(), "{refused:?}");

    // JSON parses and carries the same facts.
    let out = cli(&env, &["log", "--format", "json"]).await;
    let json: serde_json::Value = serde_json::from_str(out.ok()).expect("log JSON parses");
    let entries = json.as_array().expect("array");
    assert_eq!(entries.len(), 3);
    for entry in entries {
        for key in [
            "id",
            "rule",
            "customer_id",
            "email",
            "subject",
            "state",
            "due_at",
            "sent_at",
            "attempts",
            "smtp_reply",
            "message_id",
            "reason",
        ] {
            assert!(entry.get(key).is_some(), "{key} missing in {entry:#}");
        }
    }
    let failed = entries
        .iter()
        .find(|e| e["state"] == "failed")
        .expect("failed");
    assert_eq!(failed["customer_id"], "c2");
    assert_eq!(failed["attempts"], 1);
    assert!(failed["sent_at"].is_null());

    // Filters, alone and together.
    let ids = |text: &str| -> Vec<(String, String, String)> {
        let (headers, rows) = csv_rows(text);
        let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
        let mut out: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r[col("rule")].to_string(),
                    r[col("customer_id")].to_string(),
                    r[col("state")].to_string(),
                )
            })
            .collect();
        out.sort();
        out
    };
    let triple = |r: &str, c: &str, s: &str| (r.to_string(), c.to_string(), s.to_string());
    let filtered = |args: &'static [&'static str]| {
        let env = &env;
        async move {
            let mut full = vec!["log", "--format", "csv"];
            full.extend_from_slice(args);
            ids(cli(env, &full).await.ok())
        }
    };
    assert_eq!(
        filtered(&["--status", "sent"]).await,
        vec![
            triple("follow-up", "c1", "sent"),
            triple("thank-you", "c1", "sent")
        ]
    );
    assert_eq!(
        filtered(&["--status", "failed"]).await,
        vec![triple("thank-you", "c2", "failed")]
    );
    assert_eq!(filtered(&["--status", "scheduled"]).await, vec![]);
    assert_eq!(
        filtered(&["--rule", "follow-up"]).await,
        vec![triple("follow-up", "c1", "sent")]
    );
    assert_eq!(
        filtered(&["--customer", "c2"]).await,
        vec![triple("thank-you", "c2", "failed")]
    );
    assert_eq!(
        filtered(&["--rule", "thank-you", "--status", "sent"]).await,
        vec![triple("thank-you", "c1", "sent")]
    );
    assert_eq!(filtered(&["--customer", "nobody"]).await, vec![]);
    assert_eq!(filtered(&["--since", "1h"]).await.len(), 3);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(filtered(&["--since", "2s"]).await, vec![]);
    let out = cli(&env, &["log", "--rule", "nope"]).await;
    assert_eq!(out.ok(), "no messages match\n");

    // Bad filter values are clear errors.
    let out = cli(&env, &["log", "--status", "delivered"]).await;
    assert!(
        out.fails().contains(
            "--status: unknown state \"delivered\": expected one of scheduled, sending, \
             retrying, sent, failed, skipped, unknown"
        ),
        "{out:#?}"
    );
    let out = cli(&env, &["log", "--since", "yesterday"]).await;
    let error = out.fails();
    assert!(
        error.contains("--since") && error.contains("like 90s, 15m, 2h, 3d, 1w"),
        "{error}"
    );
    let out = cli(&env, &["log", "--format", "xml"]).await;
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(out.stderr.contains("table, csv, json"), "{out:#?}");

    // The 5.1.1 refusal put bob on the suppression list.
    let out = cli(&env, &["suppress", "list", "--format", "json"]).await;
    let json: serde_json::Value = serde_json::from_str(out.ok()).unwrap();
    let list = json.as_array().unwrap();
    assert_eq!(list.len(), 1, "{json:#}");
    assert_eq!(list[0]["email"], "bob@example.com");
    assert!(
        list[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("5.1.1"),
        "{json:#}"
    );
}

// --- suppressions -----------------------------------------------------------------------------

async fn suppress_add_remove_list(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    let out = cli(&env, &["suppress", "list"]).await;
    assert_eq!(out.ok(), "no suppressed addresses\n");

    let out = cli(
        &env,
        &[
            "suppress",
            "add",
            "Ada@Example.com",
            "--reason",
            "asked us, by phone",
        ],
    )
    .await;
    assert_eq!(out.ok(), "Ada@Example.com will not be mailed again\n");
    let out = cli(&env, &["suppress", "add", "bob@example.com"]).await;
    out.ok();
    let store = env.store().await;
    assert!(store.is_suppressed("ada@example.com").await.unwrap());
    assert_eq!(count(&env, "suppressions").await, 2);

    let out = cli(&env, &["suppress", "list"]).await;
    let table = out.ok();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["email", "reason", "source", "created_at"]
    );
    assert!(table.contains("asked us, by phone"), "{table}");

    let out = cli(&env, &["suppress", "list", "--format", "csv"]).await;
    let (headers, rows) = csv_rows(out.ok());
    assert_eq!(headers, ["email", "reason", "source", "created_at"]);
    let mut listed: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r[0].to_string(), r[1].to_string(), r[2].to_string()))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            (
                "ada@example.com".to_string(),
                "asked us, by phone".to_string(),
                "operator".to_string()
            ),
            (
                "bob@example.com".to_string(),
                "added by the operator".to_string(),
                "operator".to_string()
            ),
        ]
    );
    assert!(rows.iter().all(|r| !r[3].is_empty()));

    let out = cli(&env, &["suppress", "list", "--format", "json"]).await;
    let json: serde_json::Value = serde_json::from_str(out.ok()).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(2));
    assert!(json[0]["created_at"].is_string(), "{json:#}");

    let out = cli(&env, &["suppress", "remove", "ADA@example.com"]).await;
    assert_eq!(out.ok(), "ADA@example.com may be mailed again\n");
    assert!(!store.is_suppressed("ada@example.com").await.unwrap());
    let out = cli(&env, &["suppress", "remove", "ada@example.com"]).await;
    assert_eq!(out.ok(), "ada@example.com was not suppressed\n");
    assert_eq!(count(&env, "suppressions").await, 1);

    let out = cli(&env, &["suppress", "add", "not an address"]).await;
    assert!(
        out.fails()
            .contains("\"not an address\" is not a valid email address"),
        "{out:#?}"
    );
    assert_eq!(count(&env, "suppressions").await, 1);
}

// --- run and signals --------------------------------------------------------------------------

async fn daemon_stops_cleanly_on(signal: &str) {
    let env = TestEnv::new(Backend::Sqlite, Sink::Files, &[("a.toml", THANK_YOU)], "").await;
    cli(
        &env,
        &[
            "customer",
            "add",
            "--id",
            "c1",
            "--email",
            "ada@example.com",
            "--name",
            "Ada",
        ],
    )
    .await
    .ok();
    cli(
        &env,
        &["event", "add", "--customer", "c1", "--kind", "purchase"],
    )
    .await
    .ok();
    let mut child = env.spawn_daemon();
    let store = env.store().await;
    // The real process sends (to the outbox) and records it.
    let sent = eventually(Duration::from_secs(20), || async {
        states(&store).await.get("sent") == Some(&1)
    })
    .await;
    if !sent {
        let _ = child.kill();
        panic!("the daemon sent nothing:\n{}", daemon_log(&env));
    }
    assert!(daemon_log(&env).contains("touchpoint is running"));
    let outbox: Vec<_> = std::fs::read_dir(env.path().join("outbox"))
        .expect("outbox")
        .flatten()
        .collect();
    assert_eq!(outbox.len(), 1, "{outbox:?}");

    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    let Some(status) = wait_for_exit(&mut child, Duration::from_secs(15)).await else {
        let _ = child.kill();
        panic!("still running 15s after SIG{signal}:\n{}", daemon_log(&env));
    };
    let log = daemon_log(&env);
    assert_eq!(status.code(), Some(0), "{status:?}\n{log}");
    assert!(log.contains(&format!("SIG{signal} received")), "{log}");
    assert!(log.contains("stopped"), "{log}");
    let out = cli(&env, &["log", "--status", "sent", "--format", "json"]).await;
    let json: serde_json::Value = serde_json::from_str(out.ok()).unwrap();
    assert_eq!(json.as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_cleanly_on_sigterm() {
    daemon_stops_cleanly_on("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stops_cleanly_on_sigint() {
    daemon_stops_cleanly_on("INT").await;
}

#[tokio::test]
async fn run_refuses_a_bad_setup_before_starting() {
    let env = TestEnv::new(Backend::Sqlite, Sink::Files, &[], "").await;
    env.write_rule(
        "a.toml",
        "[[rule]]\nname = \"a\"\ntemplate = \"thank-you\"\nsubject = \"Hi\"\n\
         when = { event = \"purchase\", after = \"soon\" }\n",
    );
    let out = cli(&env, &["run"]).await;
    let error = out.fails();
    assert!(
        error.contains(&format!(
            "{}:5:38: bad duration \"soon\"",
            rule_path(&env, "a.toml").display()
        )),
        "{error}"
    );
}

on_both_backends!(
    migrate_creates_the_tables_and_is_idempotent,
    customer_add_saves_and_updates,
    customer_add_refuses_bad_input_and_writes_nothing,
    event_add_saves_once_and_explains_mistakes,
    import_customers_all_or_nothing,
    import_events_all_or_nothing_and_idempotent,
    plan_shows_what_would_be_sent_and_why,
    preview_renders_subject_text_and_html,
    log_shows_what_the_daemon_did,
    suppress_add_remove_list,
);

/// `touchpoint log --format csv|json` carries every matching message, past the table's 1000,
/// read in batches; `--limit` still cuts an export; the table says on stderr that it shows
/// only the newest 1000 of how many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_exports_carry_every_matching_message() {
    use touchpoint::store::{Customer, NewMessage};
    let env = TestEnv::new(Backend::Sqlite, Sink::Files, &[], "").await;
    let store = env.store().await;
    store
        .upsert_customers(&[Customer {
            id: "c".into(),
            email: "c@example.com".into(),
            name: None,
            timezone: None,
            attributes: serde_json::json!({}),
        }])
        .await
        .unwrap();
    let later = Utc::now() + TimeDelta::days(30);
    let messages: Vec<NewMessage> = (0..2345)
        .map(|i| NewMessage {
            rule: "r".into(),
            customer_id: "c".into(),
            event_id: None,
            dedupe_key: format!("k{i}"),
            trigger_at: later,
            due_at: later + TimeDelta::seconds(i),
            expires_at: None,
            detail: serde_json::json!({}),
        })
        .collect();
    store.insert_messages(&messages).await.unwrap();

    let csv = cli(&env, &["log", "--format", "csv"]).await;
    let mut reader = csv::Reader::from_reader(csv.ok().as_bytes());
    let ids: Vec<i64> = reader
        .records()
        .map(|r| r.unwrap()[0].parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 2345);
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "newest (due last) first"
    );
    assert!(csv.stderr.is_empty(), "{}", csv.stderr);
    let json = cli(&env, &["log", "--format", "json"]).await;
    let entries: serde_json::Value = serde_json::from_str(json.ok()).expect("JSON");
    assert_eq!(entries.as_array().unwrap().len(), 2345);
    let cut = cli(&env, &["log", "--format", "json", "--limit", "1500"]).await;
    let entries: serde_json::Value = serde_json::from_str(cut.ok()).expect("JSON");
    assert_eq!(entries.as_array().unwrap().len(), 1500);
    let none = cli(&env, &["log", "--format", "json", "--rule", "nope"]).await;
    assert_eq!(none.ok(), "[]\n");

    let table = cli(&env, &["log"]).await;
    assert_eq!(table.ok().lines().count(), 1001, "a header and 1000 rows");
    assert!(
        table
            .stderr
            .contains("showing the newest 1000 of 2345 matching messages"),
        "{}",
        table.stderr
    );
    let all = cli(&env, &["log", "--limit", "3000"]).await;
    assert_eq!(all.ok().lines().count(), 2346);
    assert!(all.stderr.is_empty(), "{}", all.stderr);
}
