//! Bad data never crashes a send, and exports cannot be turned into weapons (issue #12), on both
//! backends, through the real binary, the real HTTP listener and a real SMTP peer:
//!
//! - line breaks and other control characters in names and addresses are refused where they
//!   are written (command line, CSV import, ingest API), and so are event times after
//!   9000-12-31;
//! - a customer already in the database with such a name (written with SQL, as an old version
//!   or another program could) fails their message once, with a reason that names the field;
//!   a subject rendered from an attribute with a line break stays one line;
//! - an event in year 9999 is never sent at once: what falls after 9999-12-31 is not planned;
//! - CSV exports (`log --format csv`, `suppress list --format csv`, `/log.csv`) neutralise cells
//!   a spreadsheet would run as formulas.

mod support;

use std::time::Duration;

use chrono::{Datelike, TimeDelta, TimeZone, Utc};
use serde_json::{Value, json};
use support::smtp::SmtpPeer;
use support::{Backend, Sink, TestEnv, eventually};
use touchpoint::store::{Customer, LogEntry, LogFilter, MessageState, SharedStore};

const PATIENCE: Duration = Duration::from_secs(20);

const THANK_YOU: &str = r#"
[[rule]]
name = "thank-you"
template = "thank-you"
subject = 'Thank you, {{customer.first_name}}: {{default customer.attributes.note ""}}'
when = { event = "purchase", after = "0s" }
"#;

on_both_backends!(
    writers_refuse_control_characters_and_far_future_times,
    the_ingest_api_names_the_item_and_field,
    a_bad_name_already_stored_fails_once_through_smtp,
    an_event_in_year_9999_is_never_sent_at_once,
    csv_exports_neutralise_formulas,
);

/// Runs the binary with the test's config without blocking the async test's workers; returns
/// (exit ok, stdout, stderr).
async fn cli(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let mut command = env.command();
    command.args(args);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run touchpoint");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Asserts the command failed with `needle` in its error; returns the error.
async fn refused(env: &TestEnv, args: &[&str], needle: &str) -> String {
    let (ok, stdout, stderr) = cli(env, args).await;
    assert!(!ok, "{args:?} was accepted: {stdout}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
    stderr
}

async fn customer_count(store: &SharedStore) -> usize {
    let mut n = 0;
    for id in ["c1", "c2", "c3", "ada"] {
        n += usize::from(store.customer(id).await.expect("read").is_some());
    }
    n
}

async fn writers_refuse_control_characters_and_far_future_times(backend: Backend) {
    let env = TestEnv::new(backend, Sink::Files, &[("rules.toml", THANK_YOU)], "").await;
    let store = env.store().await;
    let add = |name: &'static str, email: &'static str| {
        vec![
            "customer", "add", "--id", "c1", "--email", email, "--name", name,
        ]
    };
    let injected = "Ada\r\nBcc: evil@example.com";
    refused(
        &env,
        &add(injected, "ada@example.com"),
        "the name contains a line break (CR)",
    )
    .await;
    refused(
        &env,
        &add("Ada\u{1b}[2J", "ada@example.com"),
        "the name contains a control character (U+001B)",
    )
    .await;
    refused(
        &env,
        &add("Ada", "ada@example.com\nBcc: evil@example.com"),
        "the email address contains a line break (LF)",
    )
    .await;
    assert_eq!(
        customer_count(&store).await,
        0,
        "a refused customer was written"
    );
    // A tab is white space within a header line, not a new line: taken.
    let (ok, _, stderr) = cli(&env, &add("Ada\tLovelace", "ada@example.com")).await;
    assert!(ok, "{stderr}");
    let ada = store.customer("c1").await.unwrap().expect("c1");
    assert_eq!(ada.name.as_deref(), Some("Ada\tLovelace"));
    refused(
        &env,
        &["suppress", "add", "x@example.com\r\nBcc: y@example.com"],
        "line break (CR)",
    )
    .await;
    refused(
        &env,
        &[
            "event",
            "add",
            "--customer",
            "c1",
            "--kind",
            "purchase",
            "--at",
            "9999-06-01",
        ],
        "--at: 9999-06-01T00:00:00Z is after 9000-12-31: times that far ahead are refused",
    )
    .await;

    // CSV: the bad row is named by its line, and nothing of the file is written.
    let customers = env.path().join("customers.csv");
    std::fs::write(
        &customers,
        "id,email,name\nc2,bob@example.com,Bob\nc3,carol@example.com,\"Carol\rBcc: evil@example.com\"\n",
    )
    .unwrap();
    let error = refused(
        &env,
        &["import", "customers", customers.to_str().unwrap()],
        &format!(
            "{}:3: the name contains a line break (CR)",
            customers.display()
        ),
    )
    .await;
    assert!(error.contains("nothing was imported"), "{error}");
    assert_eq!(
        customer_count(&store).await,
        1,
        "a refused file was written"
    );
    // A NUL in an attribute cell: PostgreSQL cannot store it, so the row is refused by line
    // (it used to fail the whole import in the database as "unavailable").
    std::fs::write(
        &customers,
        "id,email,name,plan\nc2,bob@example.com,Bob,gold\nc3,carol@example.com,Carol,go\0ld\n",
    )
    .unwrap();
    refused(
        &env,
        &["import", "customers", customers.to_str().unwrap()],
        &format!(
            "{}:3: the column \"plan\" holds a NUL character",
            customers.display()
        ),
    )
    .await;
    assert_eq!(
        customer_count(&store).await,
        1,
        "a refused file was written"
    );
    let events = env.path().join("events.csv");
    std::fs::write(
        &events,
        "customer_id,kind,occurred_at,id\nc1,purchase,2026-01-02T10:00:00Z,o1\nc1,purchase,9999-12-31T00:00:00Z,o2\n",
    )
    .unwrap();
    refused(
        &env,
        &["import", "events", events.to_str().unwrap()],
        &format!(
            "{}:3: 9999-12-31T00:00:00Z is after 9000-12-31",
            events.display()
        ),
    )
    .await;
    assert!(
        store.event("o1").await.unwrap().is_none(),
        "a refused file was written"
    );
}

/// POSTs JSON with the ingest token; returns the status and the JSON answer.
async fn post(addr: std::net::SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let headers = [
        ("Content-Type", "application/json"),
        (
            "Authorization",
            "Bearer shop-0123456789abcdef0123456789abcdef",
        ),
    ];
    let response =
        support::http::send(addr, "POST", path, &headers, body.to_string().as_bytes()).await;
    let answer = serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", response.text()));
    (response.status, answer)
}

/// The (item, field, message) of every error of an answer.
fn problems(answer: &Value) -> Vec<(Value, Value, String)> {
    answer["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors: {answer:#}"))
        .iter()
        .map(|e| {
            (
                e["item"].clone(),
                e["field"].clone(),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn the_ingest_api_names_the_item_and_field(backend: Backend) {
    let tokens = "[[api.tokens]]\nname = \"shop\"\ntoken_file = \"shop-token\"\n";
    let env = TestEnv::new(backend, Sink::Files, &[("rules.toml", THANK_YOU)], tokens).await;
    std::fs::write(
        env.path().join("shop-token"),
        "shop-0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let store = env.store().await;
    let daemon = env.start().await;
    let batch = json!([
        {"id": "c1", "email": "ada@example.com", "name": "Ada"},
        {"id": "c2", "email": "bob@example.com", "name": "Bob\r\nBcc: evil@example.com"},
        {"id": "c3", "email": "carol@example.com\u{7}"},
    ]);
    let (status, answer) = post(daemon.http, "/api/v1/customers", batch).await;
    assert_eq!(status, 422, "{answer:#}");
    assert_eq!(
        problems(&answer),
        vec![
            (
                json!(1),
                json!("name"),
                "the name contains a line break (CR)".to_string()
            ),
            (
                json!(2),
                json!("email"),
                "the email address contains a control character (U+0007)".to_string()
            ),
        ]
    );
    assert_eq!(
        customer_count(&store).await,
        0,
        "a refused batch was written"
    );
    let (status, answer) = post(
        daemon.http,
        "/api/v1/customers",
        json!({"id": "c1", "email": "ada@example.com"}),
    )
    .await;
    assert_eq!(status, 201, "{answer:#}");
    let event = json!({"id": "o1", "customer_id": "c1", "kind": "purchase", "occurred_at": "9999-06-01T00:00:00Z"});
    let (status, answer) = post(daemon.http, "/api/v1/events", event).await;
    assert_eq!(status, 422, "{answer:#}");
    let found = problems(&answer);
    assert_eq!(
        (&found[0].0, &found[0].1),
        (&json!(0), &json!("occurred_at"))
    );
    assert!(found[0].2.contains("is after 9000-12-31"), "{found:?}");
    assert!(store.event("o1").await.unwrap().is_none());
    daemon.stop().await;
}

/// Runs one statement against the test's own database, bypassing every check of touchpoint's,
/// as an older version or another program could have written it. `CRLF` in `sql` becomes the
/// backend's expression for a CR LF pair.
async fn raw_sql(env: &TestEnv, sql: &str) {
    use sqlx::Connection;
    match env.backend {
        Backend::Sqlite => {
            let path = env.path().join("var/touchpoint.db");
            let mut connection =
                sqlx::SqliteConnection::connect(&format!("sqlite:{}", path.display()))
                    .await
                    .expect("open the SQLite file");
            let sql = sql.replace("CRLF", "char(13) || char(10)");
            sqlx::raw_sql(&sql)
                .execute(&mut connection)
                .await
                .expect(&sql);
        }
        Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&env.database_url)
                .await
                .expect("connect");
            let sql = sql.replace("CRLF", "chr(13) || chr(10)");
            sqlx::raw_sql(&sql)
                .execute(&mut connection)
                .await
                .expect(&sql);
        }
    }
}

async fn message(store: &SharedStore, customer: &str) -> Option<LogEntry> {
    let filter = LogFilter {
        customer_id: Some(customer.into()),
        ..LogFilter::default()
    };
    store.log(&filter).await.expect("log").pop()
}

/// Waits until the customer's message is in `state`; fails with the whole log.
async fn wait_state(store: &SharedStore, customer: &str, state: MessageState) -> LogEntry {
    let done = eventually(PATIENCE, || async {
        message(store, customer)
            .await
            .is_some_and(|m| m.state == state)
    })
    .await;
    let entry = message(store, customer).await;
    assert!(
        done,
        "{customer}'s message never became {state}: {entry:#?}"
    );
    entry.expect("message")
}

fn customer(id: &str, email: &str, note: &str) -> Customer {
    Customer {
        id: id.into(),
        email: email.into(),
        name: Some("Grace Hopper".into()),
        timezone: None,
        attributes: json!({ "note": note }),
    }
}

/// The header section of a message as the peer received it.
fn headers_of(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    text.split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string()
}

async fn a_bad_name_already_stored_fails_once_through_smtp(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("rules.toml", THANK_YOU)], "").await;
    let store = env.store().await;
    raw_sql(
        &env,
        "INSERT INTO customers (id, email, name) VALUES ('ada', 'ada@example.com', 'Ada' || CRLF || 'Bcc: evil@example.com')",
    )
    .await;
    let stored = store.customer("ada").await.unwrap().expect("ada");
    assert_eq!(stored.name.as_deref(), Some("Ada\r\nBcc: evil@example.com"));
    // An attribute with a line break goes into the subject as one line; one with an escape
    // character cannot go into a header at all.
    store
        .upsert_customers(&[
            customer("grace", "grace@example.com", "see\r\nBcc: evil@example.com"),
            customer("hedy", "hedy@example.com", "red\u{1b}[31m"),
        ])
        .await
        .unwrap();
    let now = Utc::now() - TimeDelta::seconds(1);
    for who in ["ada", "grace", "hedy"] {
        env.add_event(&store, &format!("order-{who}"), who, "purchase", now)
            .await;
    }
    let daemon = env.start().await;

    let ada = wait_state(&store, "ada", MessageState::Failed).await;
    assert_eq!(ada.attempts, 1, "{ada:#?}");
    assert_eq!(
        ada.reason.as_deref(),
        Some("the customer's name contains a line break (CR)")
    );
    assert_eq!(ada.smtp_reply, None, "{ada:#?}");
    let hedy = wait_state(&store, "hedy", MessageState::Failed).await;
    assert_eq!(hedy.attempts, 1, "{hedy:#?}");
    assert_eq!(
        hedy.reason.as_deref(),
        Some("the subject contains a control character (U+001B)")
    );
    let grace = wait_state(&store, "grace", MessageState::Sent).await;
    assert_eq!(grace.attempts, 1);
    assert_eq!(
        grace.subject.as_deref(),
        Some("Thank you, Grace: see Bcc: evil@example.com")
    );
    // Failed is final: nothing more is tried, and only Grace's message reached the server.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (who, state) in [
        ("ada", MessageState::Failed),
        ("hedy", MessageState::Failed),
    ] {
        let later = message(&store, who).await.expect("message");
        assert_eq!((later.state, later.attempts), (state, 1), "{later:#?}");
    }
    let accepted = peer.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:#?}");
    assert_eq!(accepted[0].rcpt_to, vec!["grace@example.com".to_string()]);
    let mails = peer
        .commands()
        .iter()
        .filter(|c| c.to_ascii_uppercase().starts_with("MAIL"))
        .count();
    assert_eq!(mails, 1, "{:?}", peer.commands());
    let headers = headers_of(&accepted[0].data);
    assert!(
        headers.contains("Subject: Thank you, Grace: see Bcc: evil@example.com\r\n"),
        "{headers}"
    );
    assert!(
        !headers
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("bcc:")),
        "a header was injected: {headers}"
    );
    daemon.stop().await;
}

const FAR_FUTURE_RULES: &str = r#"
[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you"
when = { event = "purchase", after = "0s" }

[[rule]]
name = "at-once"
template = "thank-you"
subject = "At once"
when = { event = "future", after = "0s" }

[[rule]]
name = "a-year-on"
template = "thank-you"
subject = "A year on"
when = { event = "future", after = "400d" }

[[rule]]
name = "yearly"
template = "anniversary"
subject = "Happy anniversary"
when = { anniversary_of = "future", at = "09:00" }
"#;

/// An event in year 9999 (written past the input checks): the message due then waits; the
/// one a year later and the next anniversary (year 10000) are not planned at all. On SQLite
/// such a time kept as text (`+10000-...`) sorted before now and was sent at once.
async fn an_event_in_year_9999_is_never_sent_at_once(backend: Backend) {
    let env = TestEnv::new(
        backend,
        Sink::Files,
        &[("rules.toml", FAR_FUTURE_RULES)],
        "",
    )
    .await;
    let store = env.store().await;
    env.add_customer(&store, "ada", "ada@example.com", "Ada", None)
        .await;
    let far = Utc.with_ymd_and_hms(9999, 6, 1, 0, 0, 0).unwrap();
    env.add_event(&store, "far", "ada", "future", far).await;
    // A message due now shows that planning and sending ran.
    env.add_event(
        &store,
        "now",
        "ada",
        "purchase",
        Utc::now() - TimeDelta::seconds(1),
    )
    .await;
    let daemon = env.start().await;
    let outbox = env.path().join("outbox");
    let files = || {
        std::fs::read_dir(&outbox)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert!(
        eventually(PATIENCE, || async { files() >= 1 }).await,
        "nothing was sent"
    );
    // A few more planning passes (every second) and claims.
    tokio::time::sleep(Duration::from_secs(3)).await;
    daemon.stop().await;
    let log = store.log(&LogFilter::default()).await.expect("log");
    let by_rule = |rule: &str| log.iter().find(|e| e.rule == rule);
    assert_eq!(files(), 1, "sent at once: {log:#?}");
    assert_eq!(
        by_rule("thank-you").map(|e| e.state),
        Some(MessageState::Sent)
    );
    let waiting = by_rule("at-once").expect("the message due in 9999 is planned");
    assert_eq!(waiting.state, MessageState::Scheduled, "{waiting:#?}");
    assert_eq!(waiting.due_at, far);
    assert_eq!(waiting.next_attempt_at.year(), 9999);
    assert!(by_rule("a-year-on").is_none(), "{log:#?}");
    assert!(by_rule("yearly").is_none(), "{log:#?}");
    assert_eq!(log.len(), 2, "{log:#?}");
}

/// A customer and a subject that a spreadsheet would run as formulas, sent, then exported by
/// `touchpoint log --format csv` and `/log.csv`; and a suppression reason through
/// `suppress list --format csv`.
async fn csv_exports_neutralise_formulas(backend: Backend) {
    let web = "[web]\nenabled = true\n";
    let env = TestEnv::new(backend, Sink::Files, &[("rules.toml", THANK_YOU)], web).await;
    let store = env.store().await;
    let id = "=HYPERLINK(\"http://evil.example\",\"x\")";
    store
        .upsert_customers(&[customer(id, "-2+3@example.com", "x")])
        .await
        .unwrap();
    env.add_event(
        &store,
        "order-1",
        id,
        "purchase",
        Utc::now() - TimeDelta::seconds(1),
    )
    .await;
    let daemon = env.start().await;
    assert!(
        eventually(PATIENCE, || async {
            message(&store, id)
                .await
                .is_some_and(|m| m.state == MessageState::Sent)
        })
        .await,
        "never sent: {:#?}",
        message(&store, id).await
    );
    let (ok, from_cli, stderr) = cli(&env, &["log", "--format", "csv"]).await;
    assert!(ok, "{stderr}");
    let page = support::http::get(daemon.http, "/log.csv", &[]).await;
    assert_eq!(page.status, 200, "{}", page.text());
    let from_web = page.text();
    for (what, text) in [("log --format csv", &from_cli), ("/log.csv", &from_web)] {
        let rows = csv_rows(text);
        let row = &rows[1];
        let column = |name: &str| {
            let i = rows[0].iter().position(|h| h == name).expect(name);
            row[i].as_str()
        };
        assert_eq!(column("customer_id"), format!("'{id}"), "{what}: {text}");
        assert_eq!(column("email"), "'-2+3@example.com", "{what}");
        assert_eq!(column("subject"), "Thank you, Grace: x", "{what}");
        assert_no_formula(what, &rows);
    }
    assert_eq!(csv_rows(&from_cli), csv_rows(&from_web));
    daemon.stop().await;

    let (ok, _, stderr) = cli(
        &env,
        &[
            "suppress",
            "add",
            "ada@example.com",
            "--reason",
            "@SUM(1+1)*cmd|' /C calc'!A0",
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    let (ok, list, stderr) = cli(&env, &["suppress", "list", "--format", "csv"]).await;
    assert!(ok, "{stderr}");
    let rows = csv_rows(&list);
    assert_eq!(rows[1][1], "'@SUM(1+1)*cmd|' /C calc'!A0", "{list}");
    assert_no_formula("suppress list --format csv", &rows);
}

fn csv_rows(text: &str) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes())
        .records()
        .map(|r| r.expect("CSV").iter().map(str::to_string).collect())
        .collect()
}

fn assert_no_formula(what: &str, rows: &[Vec<String>]) {
    for cell in rows.iter().flatten() {
        assert!(
            !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
            "{what}: the cell {cell:?} would run as a formula"
        );
    }
}
