//! The ingest API over real HTTP, the way an application meets it: the real daemon in-process
//! (HTTP on a free loopback port) against a real database, on both backends. Good input single
//! and in batches, every kind of mistake (all named at once, and nothing written), retried and
//! duplicate events, missing and wrong tokens, bodies that are too large, a database that went
//! away, and an ingested event that is planned and sent like any other.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::http::{HttpResponse, send};
use support::{Backend, InProcess, Sink, TestEnv, eventually};
use touchpoint::store::{LogFilter, MessageState, SharedStore};

const SHOP_TOKEN: &str = "shop-0123456789abcdef0123456789abcdef";
const CRM_TOKEN: &str = "crm-0123456789abcdef0123456789abcdef";

const TOKENS: &str = r#"
[[api.tokens]]
name = "shop"
token_file = "shop-token"

[[api.tokens]]
name = "crm"
token_file = "crm-token"
"#;

const THANK_YOU: &str = r#"
[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "1s" }
"#;

const EVENTS: &str = "/api/v1/events";
const CUSTOMERS: &str = "/api/v1/customers";

struct World {
    env: TestEnv,
    store: SharedStore,
    daemon: Option<InProcess>,
}

impl World {
    /// The daemon with both tokens in files, writing `.eml` files.
    async fn start(backend: Backend) -> World {
        World::start_with(backend, TOKENS).await
    }

    async fn start_with(backend: Backend, extra: &str) -> World {
        World::start_on(World::env(backend, extra).await).await
    }

    /// The world's directory and database, before the daemon starts.
    async fn env(backend: Backend, extra: &str) -> TestEnv {
        let env = TestEnv::new(backend, Sink::Files, &[("rules.toml", THANK_YOU)], extra).await;
        std::fs::write(env.path().join("shop-token"), format!("{SHOP_TOKEN}\n")).expect("token");
        std::fs::write(env.path().join("crm-token"), format!("{CRM_TOKEN}\n")).expect("token");
        env
    }

    async fn start_on(env: TestEnv) -> World {
        let store = env.store().await;
        let daemon = Some(env.start().await);
        World { env, store, daemon }
    }

    async fn stop(mut self) {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop().await;
        }
    }

    /// POSTs `body` with `Authorization: Bearer <token>` (none when `token` is `None`).
    async fn post_as(&self, token: Option<&str>, path: &str, body: &[u8]) -> HttpResponse {
        let addr = self.daemon.as_ref().expect("running").http;
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(bearer) = &bearer {
            headers.push(("Authorization", bearer.as_str()));
        }
        send(addr, "POST", path, &headers, body).await
    }

    /// POSTs JSON as the shop; returns the status and the JSON answer.
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .post_as(Some(SHOP_TOKEN), path, body.to_string().as_bytes())
            .await;
        (response.status, json_of(&response))
    }

    async fn customer_exists(&self, id: &str) -> bool {
        self.store.customer(id).await.expect("read").is_some()
    }

    async fn event_exists(&self, id: &str) -> bool {
        self.store.event(id).await.expect("read").is_some()
    }
}

fn json_of(response: &HttpResponse) -> Value {
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{} {}",
        response.status,
        response.text()
    );
    serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", response.text()))
}

/// The (item, field) of every error in a 422 or 400 answer, in order.
fn named(answer: &Value) -> Vec<(Value, Value)> {
    answer["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no errors list: {answer:#}"))
        .iter()
        .map(|e| (e["item"].clone(), e["field"].clone()))
        .collect()
}

fn ada() -> Value {
    json!({"id": "ada", "email": "ada@example.com", "name": "Ada Lovelace", "timezone": "Europe/London", "attributes": {"plan": "gold"}})
}

fn purchase(id: &str, customer: &str) -> Value {
    json!({"id": id, "customer_id": customer, "kind": "purchase", "occurred_at": "2026-11-23T09:00:00+01:00", "data": {"order": id}})
}

on_both_backends!(
    good_input_single_and_batch_is_written,
    duplicate_event_ids_are_left_as_they_are,
    a_batch_with_a_bad_item_writes_nothing_and_names_every_mistake,
    malformed_json_and_bodies_of_the_wrong_shape,
    a_missing_or_wrong_token_is_refused_and_writes_nothing,
    too_large_bodies_and_batches_are_refused_whole,
    a_customer_update_keeps_what_it_does_not_name,
    an_ingested_event_is_planned_and_sent,
    overlapping_batches_posted_at_once_are_all_written,
    two_updates_of_one_customer_at_once_both_stay,
);

async fn good_input_single_and_batch_is_written(backend: Backend) {
    let world = World::start(backend).await;
    let (status, answer) = world.post(CUSTOMERS, ada()).await;
    assert_eq!(status, 201, "{answer:#}");
    assert_eq!(answer, json!({"received": 1, "created": 1, "updated": 0}));
    let batch = json!([
        {"id": "grace", "email": "grace@example.org"},
        {"id": "hedy", "email": " hedy@example.net ", "name": "Hedy Lamarr", "timezone": "America/Los_Angeles"},
    ]);
    let (status, answer) = world.post(CUSTOMERS, batch).await;
    assert_eq!(status, 201, "{answer:#}");
    assert_eq!(answer, json!({"received": 2, "created": 2, "updated": 0}));
    let stored = world
        .store
        .customer("ada")
        .await
        .expect("read")
        .expect("ada");
    assert_eq!(stored.email, "ada@example.com");
    assert_eq!(stored.timezone.as_deref(), Some("Europe/London"));
    assert_eq!(stored.attributes, json!({"plan": "gold"}));
    let hedy = world
        .store
        .customer("hedy")
        .await
        .expect("read")
        .expect("hedy");
    assert_eq!(hedy.email, "hedy@example.net");

    let (status, answer) = world.post(EVENTS, purchase("o-1", "ada")).await;
    assert_eq!(status, 201, "{answer:#}");
    assert_eq!(
        answer,
        json!({"received": 1, "created": 1, "duplicates": 0})
    );
    let batch = json!([purchase("o-2", "grace"), purchase("o-3", "hedy"), {
        "id": "w-1", "customer_id": "ada", "kind": "wedding", "occurred_at": "2019-06-15"
    }]);
    let (status, answer) = world.post(EVENTS, batch).await;
    assert_eq!(status, 201, "{answer:#}");
    assert_eq!(
        answer,
        json!({"received": 3, "created": 3, "duplicates": 0})
    );
    let event = world.store.event("o-1").await.expect("read").expect("o-1");
    assert_eq!(event.customer_id, "ada");
    assert_eq!(event.occurred_at.to_rfc3339(), "2026-11-23T08:00:00+00:00");
    assert_eq!(event.data, json!({"order": "o-1"}));
    let wedding = world.store.event("w-1").await.expect("read").expect("w-1");
    assert_eq!(
        wedding.occurred_at.to_rfc3339(),
        "2019-06-15T00:00:00+00:00"
    );
    assert_eq!(wedding.data, json!({}));
    // The other application's token works too.
    let response = world
        .post_as(
            Some(CRM_TOKEN),
            EVENTS,
            purchase("o-4", "ada").to_string().as_bytes(),
        )
        .await;
    assert_eq!(response.status, 201, "{}", response.text());
    world.stop().await;
}

async fn duplicate_event_ids_are_left_as_they_are(backend: Backend) {
    let world = World::start(backend).await;
    world.post(CUSTOMERS, ada()).await;
    let batch = json!([purchase("o-1", "ada"), purchase("o-2", "ada")]);
    let (status, first) = world.post(EVENTS, batch.clone()).await;
    assert_eq!(status, 201, "{first:#}");
    // A retried POST changes nothing and says so.
    let (status, again) = world.post(EVENTS, batch).await;
    assert_eq!(status, 200, "{again:#}");
    assert_eq!(again, json!({"received": 2, "created": 0, "duplicates": 2}));
    // An id that exists keeps what it had, even when the new item says otherwise.
    let mut changed = purchase("o-1", "ada");
    changed["kind"] = json!("refund");
    let (status, mixed) = world
        .post(EVENTS, json!([changed, purchase("o-3", "ada")]))
        .await;
    assert_eq!(status, 201, "{mixed:#}");
    assert_eq!(mixed, json!({"received": 2, "created": 1, "duplicates": 1}));
    let kept = world.store.event("o-1").await.expect("read").expect("o-1");
    assert_eq!(kept.kind, "purchase");
    // The same id twice in one batch is a mistake, not a guess at which one is meant.
    let (status, twice) = world
        .post(
            EVENTS,
            json!([purchase("o-9", "ada"), purchase("o-9", "ada")]),
        )
        .await;
    assert_eq!(status, 422, "{twice:#}");
    assert_eq!(named(&twice), vec![(json!(1), json!("id"))]);
    assert!(!world.event_exists("o-9").await);
    world.stop().await;
}

async fn a_batch_with_a_bad_item_writes_nothing_and_names_every_mistake(backend: Backend) {
    let world = World::start(backend).await;
    let customers = json!([
        {"id": "grace", "email": "grace@example.org"},
        {"id": "bad", "email": "not an address", "timezone": "Mars/Olympus", "nickname": "x"},
        {"email": "hedy@example.net", "name": 7, "attributes": ["vip"]},
        "hedy",
    ]);
    let (status, answer) = world.post(CUSTOMERS, customers).await;
    assert_eq!(status, 422, "{answer:#}");
    assert_eq!(
        named(&answer),
        vec![
            (json!(1), json!("nickname")),
            (json!(1), json!("email")),
            (json!(1), json!("timezone")),
            (json!(2), json!("id")),
            (json!(2), json!("name")),
            (json!(2), json!("attributes")),
            (json!(3), Value::Null),
        ]
    );
    let messages: Vec<&str> = answer["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(messages[0].contains("unknown field"), "{messages:?}");
    assert!(
        messages[1].contains("not a valid email address"),
        "{messages:?}"
    );
    assert!(messages[2].contains("Mars/Olympus"), "{messages:?}");
    assert!(messages[3].contains("missing"), "{messages:?}");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("nothing was written")),
        "{answer:#}"
    );
    assert!(!world.customer_exists("grace").await, "a bad batch wrote");

    world.post(CUSTOMERS, ada()).await;
    let events = json!([
        purchase("o-1", "ada"),
        {"id": "o-2", "customer_id": "ada", "kind": "purchase", "occurred_at": "last tuesday"},
        purchase("o-3", "nobody"),
        {"id": "o-4", "customer_id": "ada", "kind": " ", "occurred_at": "2026-11-23T09:00:00Z", "data": "x"},
        // PostgreSQL cannot keep a NUL: refused on both backends, not a database failure.
        {"id": "o-5", "customer_id": "ada", "kind": "purchase\0", "occurred_at": "2026-11-23T09:00:00Z"},
    ]);
    let (status, answer) = world.post(EVENTS, events).await;
    assert_eq!(status, 422, "{answer:#}");
    assert_eq!(
        named(&answer),
        vec![
            (json!(1), json!("occurred_at")),
            (json!(2), json!("customer_id")),
            (json!(3), json!("kind")),
            (json!(3), json!("data")),
            (json!(4), json!("kind")),
        ]
    );
    let unknown = &answer["errors"][1]["message"];
    assert!(
        unknown.as_str().is_some_and(|m| m.contains("\"nobody\"")),
        "{answer:#}"
    );
    assert!(!world.event_exists("o-1").await, "a bad batch wrote");
    world.stop().await;
}

async fn malformed_json_and_bodies_of_the_wrong_shape(backend: Backend) {
    let world = World::start(backend).await;
    for body in [&b"{not json"[..], b"", b"[{\"id\": \"a\"},", b"\xff\xfe"] {
        let response = world.post_as(Some(SHOP_TOKEN), CUSTOMERS, body).await;
        assert_eq!(response.status, 400, "{:?}", String::from_utf8_lossy(body));
        let answer = json_of(&response);
        assert_eq!(
            named(&answer),
            vec![(Value::Null, Value::Null)],
            "{answer:#}"
        );
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the body is not JSON")),
            "{answer:#}"
        );
    }
    for body in [json!(42), json!("ada"), json!(null)] {
        let (status, answer) = world.post(EVENTS, body).await;
        assert_eq!(status, 422, "{answer:#}");
        assert_eq!(named(&answer), vec![(Value::Null, Value::Null)]);
    }
    // An empty batch is no mistake.
    let (status, answer) = world.post(EVENTS, json!([])).await;
    assert_eq!(status, 200, "{answer:#}");
    assert_eq!(
        answer,
        json!({"received": 0, "created": 0, "duplicates": 0})
    );
    world.stop().await;
}

async fn a_missing_or_wrong_token_is_refused_and_writes_nothing(backend: Backend) {
    let world = World::start(backend).await;
    let addr = world.daemon.as_ref().expect("running").http;
    let body = ada().to_string();
    let wrong = [
        None,
        Some("Bearer ".to_string()),
        Some("Bearer wrong".to_string()),
        Some(format!("Bearer {}", &SHOP_TOKEN[..SHOP_TOKEN.len() - 1])),
        Some(format!("Bearer {SHOP_TOKEN}x")),
        Some(format!("Basic {SHOP_TOKEN}")),
        Some(SHOP_TOKEN.to_string()),
    ];
    for path in [CUSTOMERS, EVENTS] {
        for auth in &wrong {
            let mut headers = vec![("Content-Type", "application/json")];
            if let Some(auth) = auth {
                headers.push(("Authorization", auth.as_str()));
            }
            let response = send(addr, "POST", path, &headers, body.as_bytes()).await;
            assert_eq!(response.status, 401, "{path} {auth:?}: {}", response.text());
            let challenge = response.header("www-authenticate").unwrap_or_default();
            assert!(challenge.starts_with("Bearer"), "{auth:?}: {challenge:?}");
            let answer = json_of(&response);
            assert!(answer["message"].is_string(), "{answer:#}");
        }
    }
    assert!(!world.customer_exists("ada").await);
    world.stop().await;
}

async fn too_large_bodies_and_batches_are_refused_whole(backend: Backend) {
    let world = World::start(backend).await;
    // A body just over 1 MiB, sent whole.
    let blob = "x".repeat(1024 * 1024);
    let big = json!([{"id": "big", "email": "big@example.com", "attributes": {"blob": blob}}]);
    let response = world
        .post_as(Some(SHOP_TOKEN), CUSTOMERS, big.to_string().as_bytes())
        .await;
    assert_eq!(response.status, 413, "{}", response.text());
    let answer = json_of(&response);
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("larger than 1048576 bytes")),
        "{answer:#}"
    );
    // More items than a batch may hold, in a body that is small enough.
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"id": format!("c{i}"), "email": format!("c{i}@example.com")}))
        .collect();
    let (status, answer) = world.post(CUSTOMERS, Value::Array(many)).await;
    assert_eq!(status, 413, "{answer:#}");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("at most 1000 items")),
        "{answer:#}"
    );
    assert!(!world.customer_exists("big").await);
    assert!(!world.customer_exists("c0").await);
    // The most a batch may hold is fine.
    let full: Vec<Value> = (0..1000)
        .map(|i| json!({"id": format!("c{i}"), "email": format!("c{i}@example.com")}))
        .collect();
    let (status, answer) = world.post(CUSTOMERS, Value::Array(full)).await;
    assert_eq!(status, 201, "{answer:#}");
    assert_eq!(answer["created"], 1000);
    world.stop().await;
}

async fn a_customer_update_keeps_what_it_does_not_name(backend: Backend) {
    let world = World::start(backend).await;
    world.post(CUSTOMERS, ada()).await;
    let update = json!({"id": "ada", "email": "ada@example.org", "attributes": {"vip": true}});
    let (status, answer) = world.post(CUSTOMERS, update).await;
    assert_eq!(status, 200, "{answer:#}");
    assert_eq!(answer, json!({"received": 1, "created": 0, "updated": 1}));
    let ada = world
        .store
        .customer("ada")
        .await
        .expect("read")
        .expect("ada");
    assert_eq!(ada.email, "ada@example.org");
    assert_eq!(ada.name.as_deref(), Some("Ada Lovelace"));
    assert_eq!(ada.timezone.as_deref(), Some("Europe/London"));
    assert_eq!(ada.attributes, json!({"plan": "gold", "vip": true}));
    // null removes a field or an attribute.
    let clear = json!({"id": "ada", "email": "ada@example.org", "timezone": null, "attributes": {"plan": null}});
    let (status, answer) = world.post(CUSTOMERS, clear).await;
    assert_eq!(status, 200, "{answer:#}");
    let ada = world
        .store
        .customer("ada")
        .await
        .expect("read")
        .expect("ada");
    assert_eq!(ada.timezone, None);
    assert_eq!(ada.name.as_deref(), Some("Ada Lovelace"));
    assert_eq!(ada.attributes, json!({"vip": true}));
    world.stop().await;
}

async fn an_ingested_event_is_planned_and_sent(backend: Backend) {
    let world = World::start(backend).await;
    world.post(CUSTOMERS, ada()).await;
    let now = chrono::Utc::now().to_rfc3339();
    let event = json!({"id": "o-1", "customer_id": "ada", "kind": "purchase", "occurred_at": now});
    let (status, answer) = world.post(EVENTS, event).await;
    assert_eq!(status, 201, "{answer:#}");
    let store = world.store.clone();
    let sent = eventually(Duration::from_secs(20), || {
        let store = store.clone();
        async move {
            let log = store.log(&LogFilter::default()).await.expect("log");
            log.iter().any(|e| {
                e.rule == "thank-you"
                    && e.event_id.as_deref() == Some("o-1")
                    && e.state == MessageState::Sent
            })
        }
    })
    .await;
    let log = world.store.log(&LogFilter::default()).await.expect("log");
    assert!(sent, "the ingested event was not sent: {log:#?}");
    assert_eq!(log[0].email.as_deref(), Some("ada@example.com"));
    let outbox: Vec<_> = std::fs::read_dir(world.env.path().join("outbox"))
        .expect("outbox")
        .flatten()
        .collect();
    assert_eq!(outbox.len(), 1, "{outbox:?}");
    let mail = std::fs::read_to_string(outbox[0].path()).expect("mail");
    assert!(mail.contains("Thank you for your order, Ada"), "{mail}");
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_the_api_is_off_and_says_how_to_turn_it_on() {
    let world = World::start_with(Backend::Sqlite, "").await;
    let response = world
        .post_as(
            Some(SHOP_TOKEN),
            EVENTS,
            purchase("o-1", "ada").to_string().as_bytes(),
        )
        .await;
    assert_eq!(response.status, 404, "{}", response.text());
    let answer = json_of(&response);
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("[[api.tokens]]")),
        "{answer:#}"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_went_away_is_a_503_to_try_again() {
    let world = World::start(Backend::Postgres).await;
    let (status, _) = world.post(CUSTOMERS, ada()).await;
    assert_eq!(status, 201);
    let name = world
        .env
        .database_url
        .rsplit('/')
        .next()
        .expect("database name")
        .to_string();
    let dropped = Command::new("psql")
        .args(["-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-d", &format!("{}/postgres", support::postgres_admin_url())])
        .args(["-c", &format!("DROP DATABASE {name} WITH (FORCE)")])
        .output()
        .expect("run psql");
    assert!(dropped.status.success(), "{dropped:?}");
    let response = world
        .post_as(
            Some(SHOP_TOKEN),
            EVENTS,
            purchase("o-1", "ada").to_string().as_bytes(),
        )
        .await;
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(response.header("retry-after").is_some());
    let answer = json_of(&response);
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("nothing was written")),
        "{answer:#}"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_start_refuse_a_missing_or_short_token() {
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[("rules.toml", THANK_YOU)],
        TOKENS,
    )
    .await;
    std::fs::write(env.path().join("shop-token"), "short\n").expect("token");
    let (ok, _, err) = env.run_cli(&["check"]);
    assert!(!ok, "check passed");
    assert!(err.contains("api.tokens \"shop\" is 5 bytes long"), "{err}");
    assert!(
        err.contains("api.tokens \"crm\": cannot read the secret file"),
        "{err}"
    );
    assert!(!err.contains("short"), "the token itself is shown: {err}");
    let listeners = touchpoint::Listeners::default();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let started = touchpoint::run(env.config(), listeners, shutdown).await;
    let error = started.expect_err("the daemon started with a short token");
    assert!(error.to_string().contains("at least 16"), "{error}");
}

/// The same items in three orders: as given, reversed, and rotated by half.
fn three_orders(items: &[Value]) -> [Vec<Value>; 3] {
    let reversed: Vec<Value> = items.iter().rev().cloned().collect();
    let mut rotated = items.to_vec();
    rotated.rotate_left(items.len() / 2);
    [items.to_vec(), reversed, rotated]
}

/// Posts the batches at the same moment; returns each answer's status and text.
async fn post_together(world: &World, path: &str, batches: [Vec<Value>; 3]) -> Vec<(u16, String)> {
    let bodies = batches.map(|batch| Value::Array(batch).to_string());
    let [a, b, c] = &bodies;
    let (a, b, c) = tokio::join!(
        world.post_as(Some(SHOP_TOKEN), path, a.as_bytes()),
        world.post_as(Some(CRM_TOKEN), path, b.as_bytes()),
        world.post_as(Some(SHOP_TOKEN), path, c.as_bytes()),
    );
    [a, b, c]
        .into_iter()
        .map(|r| (r.status, r.text()))
        .collect()
}

/// Applications posting overlapping batches at the same moment, in different orders (new
/// customers, updates of the same customers, new events): every answer is a success and every
/// item is written. Unordered, the batches deadlocked on PostgreSQL and got a 500.
async fn overlapping_batches_posted_at_once_are_all_written(backend: Backend) {
    let world = World::start(backend).await;
    const ROUNDS: usize = 12;
    const ITEMS: usize = 120;
    for round in 0..ROUNDS {
        // Half the customers are new this round, half are the same every round (updates).
        let customers: Vec<Value> = (0..ITEMS)
            .map(|i| {
                let id = if i % 2 == 0 { format!("shared-{i}") } else { format!("r{round}-{i}") };
                json!({"id": id, "email": format!("c{i}@example.com"), "attributes": {"round": round}})
            })
            .collect();
        for (status, text) in post_together(&world, CUSTOMERS, three_orders(&customers)).await {
            assert!(
                status == 200 || status == 201,
                "round {round}: {status} {text}"
            );
        }
        let events: Vec<Value> = (0..ITEMS)
            .map(|i| purchase(&format!("r{round}-e{i}"), &format!("shared-{}", i / 2 * 2)))
            .collect();
        for (status, text) in post_together(&world, EVENTS, three_orders(&events)).await {
            assert!(
                status == 200 || status == 201,
                "round {round}: {status} {text}"
            );
        }
        for (i, item) in customers.iter().enumerate() {
            let id = item["id"].as_str().expect("id");
            let customer = world.store.customer(id).await.expect("read");
            let customer = customer.unwrap_or_else(|| panic!("round {round}: no customer {id}"));
            assert_eq!(customer.attributes, json!({"round": round}), "{id}");
            assert!(
                world.event_exists(&format!("r{round}-e{i}")).await,
                "round {round}: no event r{round}-e{i}"
            );
        }
    }
    world.stop().await;
}

/// Two applications changing one attribute each of the same customer at the same moment: both
/// changes stay (the database merges each into the row as it is when written).
async fn two_updates_of_one_customer_at_once_both_stay(backend: Backend) {
    let world = World::start(backend).await;
    world.post(CUSTOMERS, ada()).await;
    const ROUNDS: usize = 25;
    for round in 0..ROUNDS {
        let shop = json!({"id": "ada", "email": "ada@example.com", "attributes": {format!("shop{round}"): round}});
        let crm = json!({"id": "ada", "email": "ada@example.com", "attributes": {format!("crm{round}"): round}});
        let (shop, crm) = (shop.to_string(), crm.to_string());
        let (shop, crm) = tokio::join!(
            world.post_as(Some(SHOP_TOKEN), CUSTOMERS, shop.as_bytes()),
            world.post_as(Some(CRM_TOKEN), CUSTOMERS, crm.as_bytes()),
        );
        assert_eq!(shop.status, 200, "{}", shop.text());
        assert_eq!(crm.status, 200, "{}", crm.text());
    }
    let ada = world
        .store
        .customer("ada")
        .await
        .expect("read")
        .expect("ada");
    let attributes = ada.attributes.as_object().expect("an object");
    let lost: Vec<String> = (0..ROUNDS)
        .flat_map(|round| [format!("shop{round}"), format!("crm{round}")])
        .filter(|key| !attributes.contains_key(key))
        .collect();
    assert!(lost.is_empty(), "lost updates {lost:?}: {attributes:?}");
    assert_eq!(attributes.get("plan"), Some(&json!("gold")));
    assert_eq!(ada.name.as_deref(), Some("Ada Lovelace"));
}

/// A deadlock that happens anyway (here with another application holding a row the batch
/// needs, and then wanting one the batch holds) is retried inside the request: the caller gets
/// its 200, and both writers' changes stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_is_retried_inside_the_request() {
    use sqlx::Connection;
    let env = World::env(Backend::Postgres, TOKENS).await;
    let database = env
        .database_url
        .rsplit('/')
        .next()
        .expect("name")
        .to_string();
    let mut other = sqlx::PgConnection::connect(&env.database_url)
        .await
        .expect("connect");
    // touchpoint's connections look for deadlocks after 3 s of waiting; the other application
    // waits longer (60 s), so that touchpoint's finds the deadlock and is the one aborted.
    sqlx::raw_sql(&format!(
        "ALTER DATABASE {database} SET deadlock_timeout = '3s'; SET deadlock_timeout = '60s'"
    ))
    .execute(&mut other)
    .await
    .expect("set deadlock_timeout");
    let world = World::start_on(env).await;
    let (status, _) = world
        .post(
            CUSTOMERS,
            json!([{"id": "a", "email": "a@example.com"}, {"id": "b", "email": "b@example.com"}]),
        )
        .await;
    assert_eq!(status, 201);
    sqlx::query("BEGIN")
        .execute(&mut other)
        .await
        .expect("begin");
    let touch = "UPDATE customers SET attributes = attributes || '{\"other\": true}' WHERE id = $1";
    sqlx::query(touch)
        .bind("b")
        .execute(&mut other)
        .await
        .expect("lock b");

    let body = json!([
        {"id": "a", "email": "a@example.com", "attributes": {"posted": true}},
        {"id": "b", "email": "b@example.com", "attributes": {"posted": true}},
    ])
    .to_string();
    let post = world.post_as(Some(SHOP_TOKEN), CUSTOMERS, body.as_bytes());
    let deadlock = async {
        // Once the batch holds a and waits for b, the other application wants a: a deadlock.
        let mut watcher = sqlx::PgConnection::connect(&world.env.database_url)
            .await
            .expect("connect");
        let mut waiting = false;
        for _ in 0..200 {
            let count: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'touchpoint' AND wait_event_type = 'Lock'",
            )
            .fetch_one(&mut watcher)
            .await
            .expect("pg_stat_activity");
            if count > 0 {
                waiting = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(waiting, "the batch never waited for b");
        sqlx::query(touch)
            .bind("a")
            .execute(&mut other)
            .await
            .expect("lock a");
        sqlx::query("COMMIT")
            .execute(&mut other)
            .await
            .expect("commit");
    };
    let (response, ()) = tokio::join!(post, deadlock);
    assert_eq!(response.status, 200, "{}", response.text());
    for id in ["a", "b"] {
        let customer = world
            .store
            .customer(id)
            .await
            .expect("read")
            .expect("customer");
        assert_eq!(
            customer.attributes,
            json!({"other": true, "posted": true}),
            "{id}"
        );
    }
    world.stop().await;
}

/// PostgreSQL's deadlock (40P01) and serialization failure (40001) are conflicts, worth running
/// again, not mistakes that a retry will not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlocks_and_serialization_failures_are_conflicts() {
    use sqlx::Connection;
    use touchpoint::store::StoreError;
    let env = TestEnv::new(Backend::Postgres, Sink::Files, &[], "").await;
    let url = env.database_url.clone();
    let connect = || async { sqlx::PgConnection::connect(&url).await.expect("connect") };
    let mut setup = connect().await;
    sqlx::raw_sql(
        "CREATE TABLE t (id int PRIMARY KEY, n int); INSERT INTO t VALUES (1, 0), (2, 0);",
    )
    .execute(&mut setup)
    .await
    .expect("setup");

    // Serialization failure: two serializable transactions that each read what the other writes.
    let (mut one, mut two) = (connect().await, connect().await);
    for connection in [&mut one, &mut two] {
        sqlx::query("BEGIN ISOLATION LEVEL SERIALIZABLE")
            .execute(&mut *connection)
            .await
            .expect("begin");
        sqlx::query("SELECT SUM(n) FROM t")
            .execute(&mut *connection)
            .await
            .expect("read");
    }
    sqlx::query("UPDATE t SET n = n + 1 WHERE id = 1")
        .execute(&mut one)
        .await
        .expect("write");
    sqlx::query("UPDATE t SET n = n + 1 WHERE id = 2")
        .execute(&mut two)
        .await
        .expect("write");
    sqlx::query("COMMIT")
        .execute(&mut one)
        .await
        .expect("commit");
    let error = sqlx::query("COMMIT")
        .execute(&mut two)
        .await
        .expect_err("serialization failure");
    let error = StoreError::from(error);
    assert!(error.is_conflict() && error.is_unavailable(), "{error:?}");

    // Deadlock: each holds the row the other wants.
    let (mut one, mut two) = (connect().await, connect().await);
    sqlx::query("SET deadlock_timeout = '60s'")
        .execute(&mut one)
        .await
        .expect("set");
    for (connection, id) in [(&mut one, 1), (&mut two, 2)] {
        sqlx::query("BEGIN")
            .execute(&mut *connection)
            .await
            .expect("begin");
        sqlx::query("UPDATE t SET n = n + 1 WHERE id = $1")
            .bind(id)
            .execute(&mut *connection)
            .await
            .expect("lock");
    }
    let first = sqlx::query("UPDATE t SET n = n + 1 WHERE id = 2").execute(&mut one);
    let second = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        sqlx::query("UPDATE t SET n = n + 1 WHERE id = 1")
            .execute(&mut two)
            .await
    };
    let (first, second) = tokio::join!(first, second);
    assert!(first.is_ok(), "{first:?}");
    let error = StoreError::from(second.expect_err("deadlock"));
    assert!(error.is_conflict() && error.is_unavailable(), "{error:?}");
    assert!(error.to_string().contains("deadlock"), "{error}");
}
