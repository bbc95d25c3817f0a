//! Sources: the business's own database (a shop's `clients`, `orders` and `bookings`), read
//! where it lives, on both backends: rules driven by its rows without a copy, customer details
//! read again at send time, a broken source that stops nothing else, planning that reads only
//! the window that can become due, and `touchpoint check` on the queries.

mod support;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use support::smtp::SmtpPeer;
use support::{Backend, Sink, TestEnv, eventually, postgres_admin_url};
use touchpoint::store::{LogEntry, LogFilter, MessageState, SharedStore};

const PATIENCE: Duration = Duration::from_secs(20);

const RULES: &str = r#"
[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "1s" }

[[rule]]
name = "follow-up"
template = "follow-up"
subject = "As promised: next steps"
when = { event = "discovery_call", after = "1s" }
unless = [{ event = "purchase", since = "trigger" }]
"#;

/// A shop's database of its own, beside touchpoint's: a SQLite file or a PostgreSQL database.
struct Shop {
    backend: Backend,
    /// The URL as the source config names it.
    url: String,
    postgres_database: Option<String>,
}

impl Shop {
    async fn create(env: &TestEnv) -> Shop {
        let shop = match env.backend {
            Backend::Sqlite => Shop {
                backend: Backend::Sqlite,
                url: format!("sqlite:{}", env.path().join("shop.db").display()),
                postgres_database: None,
            },
            Backend::Postgres => {
                let name = format!("tp_shop_{}", uuid::Uuid::new_v4().simple());
                support::create_postgres_database(&name).await;
                Shop {
                    backend: Backend::Postgres,
                    url: format!("{}/{name}", postgres_admin_url()),
                    postgres_database: Some(name),
                }
            }
        };
        let schema = match shop.backend {
            Backend::Sqlite => {
                "CREATE TABLE clients (id INTEGER PRIMARY KEY, email TEXT NOT NULL, first_name TEXT, tz TEXT, vip INTEGER);
                 CREATE TABLE orders (id INTEGER PRIMARY KEY, client_id INTEGER NOT NULL, placed_at TEXT NOT NULL, total_cents INTEGER);
                 CREATE INDEX orders_placed_at ON orders (placed_at);
                 CREATE TABLE bookings (id INTEGER PRIMARY KEY, client_id INTEGER NOT NULL, called_at TEXT NOT NULL);
                 CREATE INDEX bookings_called_at ON bookings (called_at);"
            }
            Backend::Postgres => {
                "CREATE TABLE clients (id bigint PRIMARY KEY, email text NOT NULL, first_name text, tz text, vip boolean);
                 CREATE TABLE orders (id bigint PRIMARY KEY, client_id bigint NOT NULL, placed_at timestamptz NOT NULL, total_cents integer);
                 CREATE INDEX orders_placed_at ON orders (placed_at);
                 CREATE TABLE bookings (id bigint PRIMARY KEY, client_id bigint NOT NULL, called_at timestamptz NOT NULL);
                 CREATE INDEX bookings_called_at ON bookings (called_at);"
            }
        };
        shop.exec(schema).await;
        shop
    }

    /// Runs statements as the shop's own application would (read-write).
    async fn exec(&self, sql: &str) {
        use sqlx::Connection;
        match self.backend {
            Backend::Sqlite => {
                let mut connection =
                    sqlx::SqliteConnection::connect(&format!("{}?mode=rwc", self.url))
                        .await
                        .expect("open the shop's SQLite file");
                sqlx::raw_sql(sql)
                    .execute(&mut connection)
                    .await
                    .expect(sql);
            }
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("connect to the shop's database");
                sqlx::raw_sql(sql)
                    .execute(&mut connection)
                    .await
                    .expect(sql);
            }
        }
    }

    /// How many rows the table holds, read as the shop's own application would.
    async fn count(&self, table: &str) -> i64 {
        use sqlx::Connection;
        let sql = format!("SELECT COUNT(*) FROM {table}");
        match self.backend {
            Backend::Sqlite => {
                let mut connection = sqlx::SqliteConnection::connect(&self.url)
                    .await
                    .expect("open the shop's SQLite file");
                sqlx::query_scalar(&sql)
                    .fetch_one(&mut connection)
                    .await
                    .expect(&sql)
            }
            Backend::Postgres => {
                let mut connection = sqlx::PgConnection::connect(&self.url)
                    .await
                    .expect("connect to the shop's database");
                sqlx::query_scalar(&sql)
                    .fetch_one(&mut connection)
                    .await
                    .expect(&sql)
            }
        }
    }

    /// A time as the shop stores it.
    fn at(&self, t: DateTime<Utc>) -> String {
        match self.backend {
            Backend::Sqlite => format!("'{}'", t.format("%Y-%m-%d %H:%M:%S")),
            Backend::Postgres => format!("'{}+00'", t.format("%Y-%m-%d %H:%M:%S%.3f")),
        }
    }

    fn vip(&self, vip: bool) -> &'static str {
        match (self.backend, vip) {
            (Backend::Sqlite, true) => "1",
            (Backend::Sqlite, false) => "0",
            (Backend::Postgres, true) => "true",
            (Backend::Postgres, false) => "false",
        }
    }

    async fn client(&self, id: i64, email: &str, first_name: &str) {
        self.exec(&format!(
            "INSERT INTO clients (id, email, first_name, tz, vip) VALUES ({id}, '{email}', '{first_name}', 'Europe/Berlin', {})",
            self.vip(false)
        ))
        .await;
    }

    async fn order(&self, id: i64, client: i64, at: DateTime<Utc>) {
        self.exec(&format!(
            "INSERT INTO orders (id, client_id, placed_at, total_cents) VALUES ({id}, {client}, {}, 4250)",
            self.at(at)
        ))
        .await;
    }

    async fn booking(&self, id: i64, client: i64, at: DateTime<Utc>) {
        self.exec(&format!(
            "INSERT INTO bookings (id, client_id, called_at) VALUES ({id}, {client}, {})",
            self.at(at)
        ))
        .await;
    }

    /// The `[sources.NAME]` section that reads this shop.
    fn config(&self, name: &str) -> String {
        let (orders, bookings, clients) = match self.backend {
            Backend::Sqlite => (
                "SELECT 'order-' || id AS id, client_id AS customer_id, 'purchase' AS kind,
                        placed_at AS occurred_at,
                        json_object('order_number', id, 'total', total_cents / 100.0) AS data
                 FROM orders WHERE placed_at >= :from AND placed_at < :to -- the recent ones",
                "SELECT 'booking-' || id AS id, client_id AS customer_id, 'discovery_call' AS kind,
                        called_at AS occurred_at
                 FROM bookings WHERE called_at >= :from AND called_at < :to",
                "SELECT id, NULLIF(email, '') AS email, first_name AS name, tz AS timezone,
                        json_object('vip', vip) AS attributes
                 FROM clients WHERE id = :id",
            ),
            Backend::Postgres => (
                "SELECT 'order-' || id AS id, client_id::text AS customer_id, 'purchase' AS kind,
                        placed_at AS occurred_at,
                        jsonb_build_object('order_number', id, 'total', total_cents / 100.0) AS data
                 FROM orders WHERE placed_at >= :from AND placed_at < :to -- the recent ones",
                "SELECT 'booking-' || id AS id, client_id::text AS customer_id, 'discovery_call' AS kind,
                        called_at AS occurred_at
                 FROM bookings WHERE called_at >= :from AND called_at < :to",
                "SELECT id::text AS id, NULLIF(email, '') AS email, first_name AS name, tz AS timezone,
                        jsonb_build_object('vip', vip) AS attributes
                 FROM clients WHERE id = :id::bigint",
            ),
        };
        format!(
            r#"
[sources.{name}]
url = "{url}"

[[sources.{name}.events]]
name = "orders"
kinds = ["purchase"]
query = """{orders}"""

[[sources.{name}.events]]
name = "bookings"
kinds = ["discovery_call"]
query = """{bookings}"""

[sources.{name}.customers]
query = """{clients}"""
"#,
            url = self.url
        )
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        if let Some(name) = &self.postgres_database {
            support::drop_postgres_database(name);
        }
    }
}

/// A world whose config reads the shop (the config is written after the shop exists).
async fn world(backend: Backend, peer: &SmtpPeer, extra: &str) -> (TestEnv, Shop) {
    let env = TestEnv::new(backend, Sink::Smtp(peer), &[("rules.toml", RULES)], "").await;
    let shop = Shop::create(&env).await;
    let mut config = std::fs::read_to_string(&env.config_path).expect("config");
    config.push_str(&shop.config("shop"));
    config.push_str(extra);
    std::fs::write(&env.config_path, config).expect("config");
    (env, shop)
}

async fn log(store: &SharedStore) -> Vec<LogEntry> {
    store.log(&LogFilter::default()).await.expect("log")
}

/// Waits for a message of `rule` to `customer` in `state`; fails with the whole log.
async fn wait_for(
    store: &SharedStore,
    rule: &str,
    customer: &str,
    state: MessageState,
) -> LogEntry {
    let found = eventually(PATIENCE, || async {
        log(store)
            .await
            .iter()
            .any(|e| e.rule == rule && e.customer_id == customer && e.state == state)
    })
    .await;
    let all = log(store).await;
    assert!(
        found,
        "no {state} {rule:?} message for {customer:?}; the log: {all:#?}"
    );
    all.into_iter()
        .find(|e| e.rule == rule && e.customer_id == customer && e.state == state)
        .expect("found above")
}

fn body_of(peer: &SmtpPeer, to: &str) -> String {
    let accepted = peer.accepted();
    let message = accepted
        .iter()
        .find(|m| m.rcpt_to.iter().any(|r| r == to))
        .unwrap_or_else(|| panic!("nothing was sent to {to}: {accepted:#?}"));
    let parsed = mail_parser::MessageParser::default()
        .parse(&message.data)
        .expect("parse the message");
    parsed
        .body_text(0)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

// --- scenarios -------------------------------------------------------------------------------

/// The shop's orders and bookings drive the rules; the shop's clients are the recipients;
/// touchpoint's own tables work beside them; nothing is copied.
async fn source_rows_drive_rules(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let (env, shop) = world(backend, &peer, "").await;
    let store = env.store().await;
    let now = Utc::now();
    shop.client(1, "ada@shop.example", "Ada").await;
    shop.client(2, "bob@shop.example", "Bob").await;
    shop.order(501, 1, now - TimeDelta::minutes(5)).await;
    // Bob had a discovery call, then bought: the follow-up must not go out.
    shop.booking(71, 2, now - TimeDelta::minutes(30)).await;
    shop.order(502, 2, now - TimeDelta::minutes(10)).await;
    // An order from last year is outside every rule's window.
    shop.order(400, 1, now - TimeDelta::days(400)).await;
    // touchpoint's own customers and events, side by side.
    env.add_customer(&store, "own-1", "own@example.com", "Olive", None)
        .await;
    env.add_event(
        &store,
        "own-purchase",
        "own-1",
        "purchase",
        now - TimeDelta::minutes(1),
    )
    .await;
    // touchpoint's own customer "1" is not the shop's client 1: the shop's purchase must not
    // cancel the follow-up of touchpoint's own discovery call.
    env.add_customer(&store, "1", "own-one@example.com", "Una", None)
        .await;
    env.add_event(
        &store,
        "own-call",
        "1",
        "discovery_call",
        now - TimeDelta::minutes(20),
    )
    .await;
    // A client the shop keeps without an address: their order is skipped, the others go on.
    shop.client(3, "", "Nobody").await;
    shop.order(503, 3, now - TimeDelta::minutes(4)).await;

    let daemon = env.start().await;
    let ada = wait_for(&store, "thank-you", "1", MessageState::Sent).await;
    assert_eq!(ada.email.as_deref(), Some("ada@shop.example"));
    assert_eq!(ada.event_id.as_deref(), Some("order-501"));
    assert_eq!(
        ada.subject.as_deref(),
        Some("Thank you for your order, Ada")
    );
    let text = body_of(&peer, "ada@shop.example");
    assert!(
        text.contains("(no. 501)"),
        "the order's data reaches the template: {text}"
    );
    wait_for(&store, "thank-you", "2", MessageState::Sent).await;
    wait_for(&store, "thank-you", "own-1", MessageState::Sent).await;
    let una = wait_for(&store, "follow-up", "1", MessageState::Sent).await;
    assert_eq!(una.email.as_deref(), Some("own-one@example.com"));
    let bob = wait_for(&store, "follow-up", "2", MessageState::Skipped).await;
    let reason = bob.reason.unwrap_or_default();
    assert!(
        reason.contains("\"purchase\" event since the triggering event"),
        "{reason}"
    );
    // Another pass plans nothing twice.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    daemon.stop().await;
    let all = log(&store).await;
    assert_eq!(
        all.len(),
        5,
        "one message per rule and event, none for old orders: {all:#?}"
    );
    assert_eq!(peer.accepted_count(), 4);
    assert!(all.iter().all(|e| e.customer_id != "3"), "{all:#?}");
    assert!(
        store.event("order-501").await.expect("read").is_none(),
        "no copy in touchpoint"
    );
    assert!(
        store.customer("2").await.expect("read").is_none(),
        "no copy in touchpoint"
    );
}

/// Details are read from the source at send time: a changed address is used, a deleted
/// customer is skipped with a reason, and so is a deleted order.
async fn send_time_reads_the_source(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let (env, shop) = world(backend, &peer, "").await;
    let slow = RULES.replace(r#"after = "1s" }"#, r#"after = "6s" }"#);
    env.write_rule("rules.toml", &slow);
    let store = env.store().await;
    let now = Utc::now();
    shop.client(1, "old@shop.example", "Ada").await;
    shop.client(2, "bob@shop.example", "Bob").await;
    shop.client(3, "cy@shop.example", "Cy").await;
    shop.client(4, "dee@shop.example", "Dee").await;
    shop.order(1, 1, now).await;
    shop.order(2, 2, now).await;
    shop.order(3, 3, now).await;
    shop.order(4, 4, now).await;
    let daemon = env.start().await;
    for customer in ["1", "2", "3", "4"] {
        wait_for(&store, "thank-you", customer, MessageState::Scheduled).await;
    }
    shop.exec("UPDATE clients SET email = 'new@shop.example' WHERE id = 1")
        .await;
    shop.exec("DELETE FROM clients WHERE id = 2").await;
    shop.exec("DELETE FROM orders WHERE id = 3").await;
    shop.exec("UPDATE clients SET email = '' WHERE id = 4")
        .await;
    let ada = wait_for(&store, "thank-you", "1", MessageState::Sent).await;
    assert_eq!(ada.email.as_deref(), Some("new@shop.example"));
    let bob = wait_for(&store, "thank-you", "2", MessageState::Skipped).await;
    assert_eq!(
        bob.reason.as_deref(),
        Some("the customer \"2\" is no longer in the source \"shop\"")
    );
    let cy = wait_for(&store, "thank-you", "3", MessageState::Skipped).await;
    assert_eq!(
        cy.reason.as_deref(),
        Some("the triggering event \"order-3\" is no longer in the source \"shop\"")
    );
    let dee = wait_for(&store, "thank-you", "4", MessageState::Skipped).await;
    assert_eq!(
        dee.reason.as_deref(),
        Some(
            "the customer cannot be read from the source \"shop\": customer \"4\": column email is missing or NULL"
        )
    );
    daemon.stop().await;
    let recipients: Vec<_> = peer
        .accepted()
        .iter()
        .flat_map(|m| m.rcpt_to.clone())
        .collect();
    assert_eq!(recipients, ["new@shop.example"]);
}

/// A client whose name holds a line break cannot be a recipient (it would go into the To
/// header): at planning the row is skipped and counted in /metrics, and a name changed to one
/// before sending skips the message with the reason. The other clients are mailed.
async fn a_name_with_a_line_break_skips_the_row(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let (env, shop) = world(backend, &peer, "").await;
    let slow = RULES.replace(r#"after = "1s" }"#, r#"after = "6s" }"#);
    env.write_rule("rules.toml", &slow);
    let store = env.store().await;
    let now = Utc::now();
    shop.client(1, "ada@shop.example", "Ada").await;
    shop.client(5, "eve@shop.example", "Eve").await;
    shop.client(9, "mal@shop.example", "Mal\r\nBcc: evil@example.com")
        .await;
    for (order, client) in [(1, 1), (5, 5), (9, 9)] {
        shop.order(order, client, now).await;
    }
    let daemon = env.start().await;
    wait_for(&store, "thank-you", "1", MessageState::Scheduled).await;
    wait_for(&store, "thank-you", "5", MessageState::Scheduled).await;
    shop.exec("UPDATE clients SET first_name = 'Eve\nBcc: evil@example.com' WHERE id = 5")
        .await;
    wait_for(&store, "thank-you", "1", MessageState::Sent).await;
    let eve = wait_for(&store, "thank-you", "5", MessageState::Skipped).await;
    assert_eq!(
        eve.reason.as_deref(),
        Some(
            "the customer cannot be read from the source \"shop\": customer \"5\": the name contains a line break (LF)"
        )
    );
    assert!(
        !log(&store).await.iter().any(|e| e.customer_id == "9"),
        "a message was planned for the bad row: {:#?}",
        log(&store).await
    );
    let metrics = support::http::get(daemon.http, "/metrics", &[])
        .await
        .text();
    let bad_rows = metrics
        .lines()
        .find_map(|l| l.strip_prefix("touchpoint_source_bad_rows_total{source=\"shop\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no bad-rows count: {metrics}"));
    assert!(bad_rows >= 2, "{metrics}");
    daemon.stop().await;
    let recipients: Vec<_> = peer
        .accepted()
        .iter()
        .flat_map(|m| m.rcpt_to.clone())
        .collect();
    assert_eq!(recipients, ["ada@shop.example"]);
}

on_both_backends!(a_name_with_a_line_break_skips_the_row);

/// A source that is not there and a query that breaks stop neither touchpoint's own rules
/// nor the healthy source; /healthz and /metrics say which source fails.
async fn a_broken_source_stops_nothing_else(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let broken = r#"
[sources.legacy]
url = "sqlite:gone/legacy.db"

[[sources.legacy.events]]
name = "sales"
kinds = ["purchase"]
query = "SELECT * FROM sales WHERE at >= :from AND at < :to"
"#;
    let (env, shop) = world(backend, &peer, broken).await;
    let store = env.store().await;
    let now = Utc::now();
    shop.client(1, "ada@shop.example", "Ada").await;
    shop.order(1, 1, now).await;
    env.add_customer(&store, "own-1", "own@example.com", "Olive", None)
        .await;
    env.add_event(&store, "own-purchase", "own-1", "purchase", now)
        .await;
    let daemon = env.start().await;
    wait_for(&store, "thank-you", "1", MessageState::Sent).await;
    wait_for(&store, "thank-you", "own-1", MessageState::Sent).await;

    // Now the shop's query breaks too (a column renamed by a migration of theirs): touchpoint's
    // own rules go on.
    shop.exec("ALTER TABLE bookings RENAME COLUMN called_at TO call_time")
        .await;
    shop.order(2, 1, Utc::now()).await;
    env.add_event(&store, "own-purchase-2", "own-1", "purchase", Utc::now())
        .await;
    for event in ["own-purchase-2", "order-2"] {
        assert!(
            eventually(PATIENCE, || async {
                log(&store)
                    .await
                    .iter()
                    .any(|e| e.event_id.as_deref() == Some(event) && e.state == MessageState::Sent)
            })
            .await,
            "{event} is sent: {:#?}",
            log(&store).await
        );
    }
    let health = support::http::get(daemon.http, "/healthz", &[]).await;
    assert_eq!(health.status, 200);
    let health = health.text();
    assert!(health.contains(r#""name":"legacy","ok":false"#), "{health}");
    assert!(health.contains("source legacy"), "{health}");
    assert!(health.contains(r#""name":"shop","ok":false"#), "{health}");
    assert!(health.contains("query bookings"), "{health}");
    // Only a summary: the database's own words (which can quote the shop's data) stay in the log.
    assert!(health.contains("the query failed"), "{health}");
    assert!(!health.contains("called_at"), "{health}");
    let metrics = support::http::get(daemon.http, "/metrics", &[])
        .await
        .text();
    assert!(
        metrics.contains("touchpoint_source_up{source=\"legacy\"} 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("touchpoint_source_errors_total{source=\"legacy\"} 0\n"),
        "{metrics}"
    );
    daemon.stop().await;
}

/// Planning reads only what can become due: over 100,000 old orders, a pass reads the few in
/// the rule's window, and an incremental pass only the last minute's.
async fn planning_reads_only_the_window(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let (env, shop) = world(backend, &peer, "").await;
    let store = env.store().await;
    let seed = match backend {
        Backend::Sqlite => {
            "INSERT INTO clients (id, email, first_name, tz, vip)
               SELECT value, 'c' || value || '@shop.example', 'C' || value, 'UTC', 0
               FROM (WITH RECURSIVE n(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM n WHERE value < 1000) SELECT value FROM n);
             INSERT INTO orders (id, client_id, placed_at, total_cents)
               SELECT value, value % 1000 + 1, datetime('now', '-3 days', '-' || value || ' minutes'), 100
               FROM (WITH RECURSIVE n(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM n WHERE value < 100000) SELECT value FROM n);
             INSERT INTO orders (id, client_id, placed_at, total_cents)
               SELECT 200000 + value, value, datetime('now', '-' || (value * 2) || ' minutes'), 100
               FROM (WITH RECURSIVE n(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM n WHERE value < 25) SELECT value FROM n);"
        }
        Backend::Postgres => {
            "INSERT INTO clients SELECT i, 'c' || i || '@shop.example', 'C' || i, 'UTC', false FROM generate_series(1, 1000) i;
             INSERT INTO orders SELECT i, i % 1000 + 1, now() - interval '3 days' - i * interval '1 minute', 100 FROM generate_series(1, 100000) i;
             INSERT INTO orders SELECT 200000 + i, i, now() - i * interval '2 minutes', 100 FROM generate_series(1, 25) i;
             ANALYZE orders;"
        }
    };
    shop.exec(seed).await;
    let config = env.config();
    let sources = touchpoint::sources::Sources::from_config(&config.sources, &config.base_dir)
        .expect("sources");
    let playbook = touchpoint::playbook::Playbook::load(&config).expect("rules");
    let settings = touchpoint::plan::PlanSettings {
        default_timezone: chrono_tz::UTC,
        default_expire_after: config.defaults.expire_after,
        horizon: Some(config.planner.horizon),
    };
    let shop_source = &sources.sources[0];
    let full_pass = touchpoint::plan::SourceCursors::new();
    let now = Utc::now();
    let full = touchpoint::plan::plan_sources(
        &store, &sources, &playbook, &full_pass, now, &settings, true,
    )
    .await;
    assert!(full.failures.is_empty(), "{:?}", full.failures);
    assert_eq!(full.inserted, 25, "one thank-you per recent order");
    // The orders query read the 25 orders of the last day, not the 100,000 older ones; the
    // customers query one row per customer.
    assert_eq!(full.events_read, 25);
    assert_eq!(
        shop_source
            .rows_read
            .load(std::sync::atomic::Ordering::Relaxed),
        25 + 25
    );

    let again = touchpoint::plan::plan_sources(
        &store,
        &sources,
        &playbook,
        &full_pass,
        Utc::now(),
        &settings,
        true,
    )
    .await;
    assert_eq!((again.events_read, again.inserted), (25, 0), "idempotent");
    assert_eq!(
        shop_source
            .rows_read
            .load(std::sync::atomic::Ordering::Relaxed),
        50 + 25,
        "what was planned before needs no customer read"
    );
    // An incremental pass reads only what occurred since the last one (less a minute): the
    // order placed 2 minutes ago is outside, the new one inside.
    shop.order(300_000, 7, Utc::now()).await;
    let since = Utc::now() - TimeDelta::seconds(90);
    let since: touchpoint::plan::SourceCursors = [
        (("shop".to_string(), "orders".to_string()), since),
        (("shop".to_string(), "bookings".to_string()), since),
    ]
    .into();
    let incremental = touchpoint::plan::plan_sources(
        &store,
        &sources,
        &playbook,
        &since,
        Utc::now(),
        &settings,
        true,
    )
    .await;
    assert_eq!((incremental.events_read, incremental.inserted), (1, 1));
    if backend == Backend::Postgres {
        // And PostgreSQL finds them through the index, wrapped as touchpoint wraps the query.
        let plan = explain(&shop.url).await;
        assert!(plan.contains("orders_placed_at"), "{plan}");
        assert!(!plan.contains("Seq Scan on orders"), "{plan}");
    }
}

async fn explain(url: &str) -> String {
    use sqlx::{Connection, Row};
    let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
    let rows = sqlx::query(
        "EXPLAIN SELECT * FROM (SELECT 'order-' || id AS id, client_id::text AS customer_id, placed_at AS occurred_at \
         FROM orders WHERE placed_at >= $1 AND placed_at < $2) AS touchpoint_source WHERE CAST(customer_id AS TEXT) = $3",
    )
    .bind(Utc::now() - TimeDelta::days(1))
    .bind(Utc::now())
    .bind("7")
    .fetch_all(&mut connection)
    .await
    .expect("explain");
    rows.iter()
        .map(|r| r.get::<String, _>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `touchpoint check` runs each query once and names the source, the query and the mistake.
async fn check_reports_query_mistakes(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let (env, shop) = world(backend, &peer, "").await;
    let (ok, stdout, stderr) = env.run_cli(&["check"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("source shop (")
            && stdout
                .contains("): OK; events: purchase, discovery_call; customers: from the source"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "note: source shop, query orders: returned no rows for any time until tomorrow"
        ),
        "an empty table is worth a note: {stdout}"
    );
    let config = std::fs::read_to_string(&env.config_path).expect("config");

    // A filter that does not hold to :to (as one comparing times kept in another form would
    // not) is caught by the sample.
    shop.client(1, "ada@shop.example", "Ada").await;
    shop.order(1, 1, Utc::now() - TimeDelta::days(2)).await;
    shop.order(2, 1, Utc::now() + TimeDelta::days(3)).await;
    let (ok, stdout, stderr) = env.run_cli(&["check"]);
    assert!(ok, "{stderr}");
    assert!(
        !stdout.contains("query orders: returned no rows"),
        "{stdout}"
    );
    let loose = config.replace("placed_at < :to", "(:to IS NOT NULL)");
    std::fs::write(&env.config_path, &loose).expect("config");
    let (ok, _, stderr) = env.run_cli(&["check"]);
    assert!(!ok);
    assert!(
        stderr.contains("source shop, query orders: asked for events before")
            && stderr.contains("it returned event \"order-2\" that occurred at"),
        "{stderr}"
    );

    let no_time = config.replace("placed_at AS occurred_at", "placed_at AS placed");
    std::fs::write(&env.config_path, &no_time).expect("config");
    let (ok, _, stderr) = env.run_cli(&["check"]);
    assert!(!ok);
    assert!(
        stderr.contains("source shop, query orders: no column occurred_at (it returns id, customer_id, kind, placed, data; it must return id, customer_id, kind, occurred_at, data"),
        "{stderr}"
    );

    let no_table = config.replace("FROM bookings", "FROM calls");
    std::fs::write(&env.config_path, &no_table).expect("config");
    let (ok, _, stderr) = env.run_cli(&["check"]);
    assert!(!ok);
    assert!(stderr.contains("source shop, query bookings:"), "{stderr}");
    assert!(
        stderr.contains("calls"),
        "the database's own words name the table: {stderr}"
    );

    let unknown = config.replace("placed_at < :to", "placed_at < :until");
    std::fs::write(&env.config_path, &unknown).expect("config");
    let (ok, _, stderr) = env.run_cli(&["check"]);
    assert!(!ok);
    assert!(
        stderr.contains("sources.shop.events[0] (\"orders\").query: unknown parameter :until; this query takes :from and :to"),
        "{stderr}"
    );
    drop(shop);
}

/// `touchpoint plan` shows what the source's rows will send before the daemon has seen them,
/// and says so when a source cannot be read.
async fn plan_lists_source_messages(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let (env, shop) = world(backend, &peer, "").await;
    shop.client(1, "ada@shop.example", "Ada").await;
    shop.order(9, 1, Utc::now() - TimeDelta::minutes(3)).await;
    let (ok, stdout, stderr) = env.run_cli(&["plan", "--format", "json"]);
    assert!(ok, "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let rows = rows.as_array().expect("a list");
    assert_eq!(rows.len(), 1, "{stdout}");
    assert_eq!(rows[0]["rule"], "thank-you");
    assert_eq!(rows[0]["email"], "ada@shop.example");
    assert_eq!(rows[0]["status"], "not yet planned");
    assert!(
        rows[0]["why"]
            .as_str()
            .unwrap_or_default()
            .contains("order-9"),
        "{stdout}"
    );

    shop.exec("ALTER TABLE orders RENAME COLUMN placed_at TO created")
        .await;
    let (ok, _, stderr) = env.run_cli(&["plan"]);
    assert!(!ok);
    assert!(
        stderr.contains("cannot read every source, so the plan would be incomplete")
            && stderr.contains("source shop, query orders:"),
        "{stderr}"
    );
}

/// Times that SQLite keeps as text in other forms (JavaScript's toISOString, plain dates) work
/// when the query converts the parameter, as the README shows; planning and the send-time
/// lookup both find the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_times_in_other_forms() {
    let peer = SmtpPeer::start().await;
    let rules = format!(
        "{RULES}\n[[rule]]\nname = \"delivered\"\ntemplate = \"thank-you\"\nsubject = \"Delivered\"\nwhen = {{ event = \"delivery\", after = \"1s\" }}\n"
    );
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Smtp(&peer),
        &[("rules.toml", &rules)],
        "",
    )
    .await;
    let shop = Shop::create(&env).await;
    shop.exec(
        "CREATE TABLE payments (id INTEGER PRIMARY KEY, client_id INTEGER, paid_at TEXT);
         CREATE TABLE deliveries (id INTEGER PRIMARY KEY, client_id INTEGER, delivered_on TEXT);",
    )
    .await;
    shop.client(1, "ada@shop.example", "Ada").await;
    let paid = (Utc::now() - TimeDelta::minutes(2)).format("%Y-%m-%dT%H:%M:%S%.3fZ");
    let today = Utc::now().format("%Y-%m-%d");
    shop.exec(&format!(
        "INSERT INTO payments VALUES (1, 1, '{paid}'); INSERT INTO deliveries VALUES (1, 1, '{today}');"
    ))
    .await;
    let source = format!(
        r#"
[sources.shop]
url = "{url}"

[[sources.shop.events]]
name = "payments"
kinds = ["purchase"]
query = """
SELECT 'payment-' || id AS id, client_id AS customer_id, 'purchase' AS kind, paid_at AS occurred_at
FROM payments
WHERE paid_at >= strftime('%Y-%m-%dT%H:%M:%fZ', :from) AND paid_at < strftime('%Y-%m-%dT%H:%M:%fZ', :to)
"""

[[sources.shop.events]]
name = "deliveries"
kinds = ["delivery"]
query = """
SELECT 'delivery-' || id AS id, client_id AS customer_id, 'delivery' AS kind, delivered_on AS occurred_at
FROM deliveries WHERE delivered_on BETWEEN date(:from) AND date(:to)
"""

[sources.shop.customers]
query = "SELECT id, email, first_name AS name FROM clients WHERE id = :id"
"#,
        url = shop.url
    );
    let mut config = std::fs::read_to_string(&env.config_path).expect("config");
    config.push_str(&source);
    std::fs::write(&env.config_path, config).expect("config");
    let (ok, stdout, stderr) = env.run_cli(&["check"]);
    assert!(ok && !stdout.contains("note:"), "{stdout}{stderr}");
    let store = env.store().await;
    let daemon = env.start().await;
    let payment = wait_for(&store, "thank-you", "1", MessageState::Sent).await;
    assert_eq!(payment.event_id.as_deref(), Some("payment-1"));
    let delivery = wait_for(&store, "delivered", "1", MessageState::Sent).await;
    assert_eq!(delivery.event_id.as_deref(), Some("delivery-1"));
    daemon.stop().await;
}

on_both_backends!(
    plan_lists_source_messages,
    source_rows_drive_rules,
    send_time_reads_the_source,
    a_broken_source_stops_nothing_else,
    planning_reads_only_the_window,
    check_reports_query_mistakes,
);

/// PostgreSQL says column types before a row exists: a JSON column that is not JSON is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_column_types_on_postgres() {
    let peer = SmtpPeer::start().await;
    let (env, _shop) = world(Backend::Postgres, &peer, "").await;
    let config = std::fs::read_to_string(&env.config_path).expect("config");
    let wrong = config.replace(
        "jsonb_build_object('vip', vip) AS attributes",
        "vip AS attributes",
    );
    std::fs::write(&env.config_path, wrong).expect("config");
    let (ok, _, stderr) = env.run_cli(&["check"]);
    assert!(!ok);
    assert!(
        stderr.contains(
            "source shop, query customers: column attributes is BOOL; expected a JSON object"
        ),
        "{stderr}"
    );
}

/// The source is opened read-only: a query that writes is refused by the database itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_are_read_only() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let peer = SmtpPeer::start().await;
        let (env, shop) = world(backend, &peer, "").await;
        shop.client(1, "ada@shop.example", "Ada").await;
        let config = env.config();
        let mut sources = config.sources.clone();
        let customers = sources
            .get_mut("shop")
            .and_then(|s| s.customers.as_mut())
            .expect("customers query");
        customers.query = match backend {
            Backend::Sqlite => "DELETE FROM clients WHERE id = :id RETURNING id, email",
            Backend::Postgres => {
                "DELETE FROM clients WHERE id = :id::bigint RETURNING id::text, email"
            }
        }
        .into();
        let sources =
            touchpoint::sources::Sources::from_config(&sources, &config.base_dir).expect("sources");
        let error = sources.sources[0]
            .customer("1")
            .await
            .expect_err("writing is refused");
        let text = error.to_string().to_lowercase();
        assert!(
            text.contains("read-only") || text.contains("readonly"),
            "{backend:?}: {text}"
        );
    }
}

/// A source whose queries the test writes itself, read through one connection (so a setting
/// that one query changes would reach the next).
fn source_with(url: &str, orders: &str, customers: &str) -> String {
    format!(
        r#"
[sources.shop]
url = "{url}"
max_connections = 1

[[sources.shop.events]]
name = "orders"
kinds = ["purchase"]
query = """{orders}"""

[sources.shop.customers]
query = """{customers}"""
"#
    )
}

/// SQL written to change the shop's data, and the query the database must refuse.
/// A query with a second statement is refused when the config is read, before it can run.
const LOAD_REFUSAL: &str = "holds more than one statement";

struct Attack {
    what: &'static str,
    orders: String,
    customers: String,
    refused: &'static str,
    /// The database's words for the refusal, when the query gets as far as running.
    refusal: &'static str,
}

fn attacks(backend: Backend) -> Vec<Attack> {
    match backend {
        Backend::Postgres => {
            let orders = "SELECT 'order-' || id AS id, client_id::text AS customer_id, 'purchase' AS kind, placed_at AS occurred_at
                 FROM orders WHERE placed_at >= :from AND placed_at < :to";
            let customers = "SELECT id::text AS id, email, first_name AS name FROM clients WHERE id = :id::bigint";
            let deleting = "WITH gone AS (DELETE FROM orders RETURNING id) ";
            vec![
                Attack {
                    what: "set_config turns the read-only default off, then a CTE deletes",
                    orders: format!(
                        "{orders} AND set_config('default_transaction_read_only', 'off', false) = 'off'"
                    ),
                    customers: format!("{deleting}{customers}"),
                    refused: "customers",
                    refusal: "read-only transaction",
                },
                Attack {
                    what: "a data-modifying CTE",
                    orders: format!("{deleting}{orders}"),
                    customers: customers.to_string(),
                    refused: "orders",
                    refusal: "read-only transaction",
                },
            ]
        }
        Backend::Sqlite => {
            let orders = "SELECT 'order-' || id AS id, client_id AS customer_id, 'purchase' AS kind, placed_at AS occurred_at
                 FROM orders WHERE placed_at >= :from AND placed_at < :to";
            let customers = "SELECT id, email, first_name AS name FROM clients WHERE id = :id";
            vec![
                Attack {
                    what: "DELETE ... RETURNING as the customers query",
                    orders: orders.to_string(),
                    customers: "DELETE FROM orders WHERE client_id = :id RETURNING client_id AS id, 'ada@shop.example' AS email".into(),
                    refused: "customers",
                    refusal: "readonly database",
                },
                Attack {
                    what: "a second statement after the SELECT",
                    orders: format!("{orders}; VACUUM INTO 'copy.db'; DELETE FROM orders"),
                    customers: customers.to_string(),
                    refused: "orders",
                    refusal: LOAD_REFUSAL,
                },
            ]
        }
    }
}

/// A source's own SQL cannot write to it: queries that delete the shop's orders (on
/// PostgreSQL also after turning the session's read-only default off) are refused by the
/// database, by `touchpoint check` (which fails, naming the query) and by the running daemon
/// (the query fails and is counted; the others go on), and the shop keeps every row.
async fn a_source_query_cannot_write(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("rules.toml", RULES)], "").await;
    let shop = Shop::create(&env).await;
    let base = std::fs::read_to_string(&env.config_path).expect("config");
    shop.client(1, "ada@shop.example", "Ada").await;
    shop.order(1, 1, Utc::now() - TimeDelta::minutes(1)).await;
    shop.order(2, 1, Utc::now() - TimeDelta::days(1)).await;
    for attack in attacks(backend) {
        let what = attack.what;
        let source = source_with(&shop.url, &attack.orders, &attack.customers);
        std::fs::write(&env.config_path, format!("{base}{source}")).expect("config");

        let (ok, stdout, stderr) = env.run_cli(&["check"]);
        assert!(!ok, "{what}: check passed: {stdout}");
        if attack.refusal == LOAD_REFUSAL {
            assert!(
                stderr.contains(&format!("(\"{}\").query: {LOAD_REFUSAL}", attack.refused)),
                "{what}: {stderr}"
            );
            let (ok, _, stderr) = env.run_cli(&["run"]);
            assert!(!ok && stderr.contains(LOAD_REFUSAL), "{what}: {stderr}");
            assert_eq!(shop.count("orders").await, 2, "{what}");
            assert!(
                !env.path().join("copy.db").exists(),
                "{what}: a copy was written"
            );
            continue;
        }
        assert!(
            stderr.contains(&format!("source shop, query {}:", attack.refused)),
            "{what}: {stderr}"
        );
        assert_eq!(
            shop.count("orders").await,
            2,
            "{what}: check changed the shop"
        );
        assert_eq!(
            shop.count("clients").await,
            1,
            "{what}: check changed the shop"
        );

        let mut daemon = env.spawn_daemon();
        let log_path = newest_daemon_log(&env);
        let refused = eventually(PATIENCE, || async {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            log.contains(&format!("query {}:", attack.refused)) && log.contains(attack.refusal)
        })
        .await;
        let stopped = std::process::Command::new("kill")
            .arg(daemon.id().to_string())
            .status()
            .expect("kill");
        assert!(stopped.success());
        let _ = daemon.wait();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        assert!(
            refused,
            "{what}: the daemon did not refuse the query:\n{log}"
        );
        assert_eq!(
            shop.count("orders").await,
            2,
            "{what}: the daemon changed the shop:\n{log}"
        );
        assert_eq!(
            shop.count("clients").await,
            1,
            "{what}: the daemon changed the shop"
        );
    }
}

/// The newest `daemon-N.log` that `spawn_daemon` wrote.
fn newest_daemon_log(env: &TestEnv) -> std::path::PathBuf {
    let mut logs: Vec<std::path::PathBuf> = std::fs::read_dir(env.path())
        .expect("read dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("daemon-"))
        })
        .collect();
    logs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    logs.pop().expect("spawn_daemon wrote a log")
}

on_both_backends!(a_source_query_cannot_write);

/// What the README says of a SQLite source in WAL mode: when no other connection has it open,
/// reading it creates its `-shm` and `-wal` files (as touchpoint's user, which is why the
/// README asks for a shared group), and they stay after touchpoint closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_wal_source_leaves_its_shm_and_wal_files() {
    let peer = SmtpPeer::start().await;
    let (env, shop) = world(Backend::Sqlite, &peer, "").await;
    shop.exec("PRAGMA journal_mode = WAL").await;
    let file = |suffix: &str| env.path().join(format!("shop.db{suffix}"));
    // The shop's connection was the last: closing it removed them.
    assert!(!file("-shm").exists() && !file("-wal").exists());
    let (ok, _, stderr) = env.run_cli(&["check"]);
    assert!(ok, "{stderr}");
    assert!(
        file("-shm").exists(),
        "no -shm after touchpoint read the file"
    );
    assert!(
        file("-wal").exists(),
        "no -wal after touchpoint read the file"
    );
}
