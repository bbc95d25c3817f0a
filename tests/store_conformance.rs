//! The store's conformance suite: every scenario runs against each backend (a real SQLite file;
//! a fresh PostgreSQL database), through the role traits the rest of touchpoint uses. A new
//! backend is done when it passes this file.
//!
//! - customers and events (`CustomerStore`): upserts, merges that keep what a patch does not
//!   name, events inserted once, the latest and later events;
//! - planning (`PlanningStore`): dedupe keys unique, `existing_dedupe_keys`, candidates;
//! - the outbox (`OutboxStore`): claims fenced by token and lease, `begin_body_with` and
//!   `finish` refusing a stale token, reaping by phase, expiry; and a model of the whole state
//!   machine driven by random operations (`state_machine_*`), and two claimers racing;
//! - the frequency limit (`OutboxStore::begin_body_limited`, `counted_sends`, `waiting_due`):
//!   what counts, and twenty claims for one customer racing to the body fence;
//! - consent (`ConsentStore`): suppressions normalised, first reason kept, and the body fence
//!   refusing a suppressed address;
//! - tracking (`TrackingStore`): message events recorded once per key, counted per address;
//! - reporting (`ReportingStore`): log paging and filtering, one dating rule for the log, its
//!   count and the overview's counts, the waiting and the other messages in that one order; events of a kind since a moment and sends per rule (the
//!   experience report), replies waiting for an answer and messages due per rule (the digest);
//! - shared state (`SharedStateStore`): settings, session revocation;
//! - ratings (`RatingStore`): the last answer per message, the comment kept, the `rated` event.

mod support;

use chrono::{DateTime, TimeDelta, Utc};
use support::{Backend, Sink, TestEnv};
use touchpoint::store::{
    BodyStart, CandidateQuery, CandidateSource, Change, CheckLine, ClaimedMessage, Customer,
    CustomerPatch, Delivery, Event, FactsWanted, Finishing, FrequencyGate, LogCursor, LogFilter,
    MessageState, NewMessage, Outcome, SentContent, SharedStore,
};

async fn open(backend: Backend) -> (TestEnv, SharedStore) {
    let env = TestEnv::build(backend, Sink::Files, &[], "").await;
    let store = env.store().await;
    (env, store)
}

fn message(key: &str, customer: &str, due: DateTime<Utc>) -> NewMessage {
    NewMessage {
        rule: "r".into(),
        customer_id: customer.into(),
        event_id: None,
        dedupe_key: key.into(),
        trigger_at: due,
        due_at: due,
        expires_at: None,
        detail: serde_json::json!({ "n": key }),
    }
}

fn customer(id: &str, email: &str, name: &str) -> Customer {
    Customer {
        id: id.into(),
        email: email.into(),
        name: Some(name.into()),
        timezone: None,
        attributes: serde_json::json!({}),
    }
}

fn delivery(email: &str) -> Delivery {
    Delivery {
        email: email.into(),
        subject: "Hello".into(),
        message_id: "<m@test>".into(),
    }
}

fn content() -> SentContent {
    SentContent {
        text: "text".into(),
        html: "<p>html</p>".into(),
        checks: vec![CheckLine::passed("customer is not on the suppression list")],
    }
}

/// Content that tells customers apart.
fn content_for(customer: &str) -> SentContent {
    SentContent {
        text: format!("text for {customer}"),
        html: format!("<p>html for {customer}</p>"),
        checks: vec![CheckLine::passed(format!("{customer} is not suppressed"))],
    }
}

const LEASE: TimeDelta = TimeDelta::minutes(5);
const MARGIN: TimeDelta = TimeDelta::seconds(1);

async fn state_of(store: &SharedStore, id: i64) -> MessageState {
    store
        .message(id)
        .await
        .expect("message")
        .expect("exists")
        .state
}

/// Makes every live claim's lease look run out, as if the clock had passed it.
async fn expire_leases(env: &TestEnv) {
    env.execute_sql(
        "UPDATE messages SET lease_expires_at = '2000-01-01T00:00:00.000Z' WHERE lease_expires_at IS NOT NULL",
    )
    .await;
}

async fn claim_all(store: &SharedStore, instance: &str) -> Vec<ClaimedMessage> {
    store.claim_due(instance, 10, LEASE).await.expect("claim")
}

// --- customers and events ------------------------------------------------------------------

async fn customers_and_events(backend: Backend) {
    let (_env, store) = open(backend).await;
    store
        .upsert_customers(&[
            customer("b", "b@example.com", "B"),
            customer("a", "a@example.com", "A"),
        ])
        .await
        .expect("upsert");
    let mut renamed = customer("a", "a2@example.com", "A2");
    renamed.attributes = serde_json::json!({ "plan": "gold" });
    store
        .upsert_customers(&[renamed.clone()])
        .await
        .expect("upsert again");
    assert_eq!(store.customer("a").await.expect("read"), Some(renamed));
    assert_eq!(store.customer("nobody").await.expect("read"), None);

    let at = |h: i64| Utc::now() - TimeDelta::hours(h);
    let event = |id: &str, kind: &str, hours: i64| Event {
        id: id.into(),
        customer_id: "a".into(),
        kind: kind.into(),
        occurred_at: at(hours),
        data: serde_json::json!({ "id": id }),
    };
    let events = [
        event("e1", "purchase", 3),
        event("e2", "purchase", 1),
        event("e3", "refund", 2),
    ];
    assert_eq!(store.insert_events(&events).await.expect("insert"), 3);
    assert_eq!(
        store
            .insert_events(&events[..1])
            .await
            .expect("insert again"),
        0,
        "ids are unique"
    );
    let read = store.event("e1").await.expect("read").expect("exists");
    assert_eq!(read.data, serde_json::json!({ "id": "e1" }));
    assert!(
        (read.occurred_at - events[0].occurred_at)
            .num_milliseconds()
            .abs()
            < 1
    );
    let latest = store.latest_event("a", "purchase").await.expect("latest");
    assert_eq!(latest.map(|e| e.id), Some("e2".to_string()));
    assert!(
        store
            .has_event_after("a", "purchase", at(2))
            .await
            .expect("after")
    );
    assert!(
        !store
            .has_event_after("a", "purchase", at(0))
            .await
            .expect("after")
    );
    assert!(
        !store
            .has_event_after("a", "refund", at(2))
            .await
            .expect("strictly after")
    );
    let recent: Vec<String> = store
        .customer_events("a", 2)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(recent, ["e2", "e3"], "newest first, limited");
    let (customers, events) = store.max_seqs().await.expect("seqs");
    assert!(customers >= 2 && events >= 3, "{customers} {events}");
}

async fn merge_customers_keeps_what_a_patch_does_not_name(backend: Backend) {
    let (env, store) = open(backend).await;
    let patch = |name: Change, timezone: Change, attributes: serde_json::Value| CustomerPatch {
        id: "c".into(),
        email: "c@example.com".into(),
        name,
        timezone,
        attributes: attributes.as_object().cloned().unwrap_or_default(),
    };
    let first = patch(
        Change::Set("Cleo".into()),
        Change::Set("Europe/Paris".into()),
        serde_json::json!({ "plan": "gold", "city": "Paris", "tags": { "a": 1 } }),
    );
    assert_eq!(
        store.merge_customers(&[first]).await.expect("merge"),
        1,
        "one new"
    );
    let second = patch(
        Change::Keep,
        Change::Clear,
        serde_json::json!({ "city": null, "vip": true, "tags": { "b": 2 } }),
    );
    assert_eq!(
        store.merge_customers(&[second]).await.expect("merge"),
        0,
        "none new"
    );
    let stored = store.customer("c").await.expect("read").expect("exists");
    assert_eq!(stored.name.as_deref(), Some("Cleo"), "kept: not named");
    assert_eq!(stored.timezone, None, "cleared");
    assert_eq!(
        stored.attributes,
        serde_json::json!({ "plan": "gold", "vip": true, "tags": { "b": 2 } }),
        "null removes; a set value replaces whole, nested objects are not merged"
    );
    assert_eq!(store.merge_customers(&[]).await.expect("empty"), 0);

    // Two writers (two stores, as two processes) patching one customer at once keep both.
    let other = env.store().await;
    for round in 0..10 {
        let key = |who: &str| format!("{who}{round}");
        let a = CustomerPatch {
            attributes: [(key("a"), serde_json::json!(round))].into_iter().collect(),
            ..patch(Change::Keep, Change::Keep, serde_json::json!({}))
        };
        let b = CustomerPatch {
            attributes: [(key("b"), serde_json::json!(round))].into_iter().collect(),
            ..patch(Change::Keep, Change::Keep, serde_json::json!({}))
        };
        let (a, b) = ([a], [b]);
        let (one, two) = tokio::join!(store.merge_customers(&a), other.merge_customers(&b));
        one.expect("merge a");
        two.expect("merge b");
        let attributes = store
            .customer("c")
            .await
            .expect("read")
            .expect("exists")
            .attributes;
        assert!(
            attributes.get(key("a")).is_some() && attributes.get(key("b")).is_some(),
            "round {round}: {attributes}"
        );
    }
}

// --- planning -------------------------------------------------------------------------------

async fn dedupe_keys_are_unique(backend: Backend) {
    let (_env, store) = open(backend).await;
    let now = Utc::now() + TimeDelta::hours(1);
    let batch = [message("r:1", "c", now), message("r:2", "c", now)];
    assert_eq!(store.insert_messages(&batch).await.expect("insert"), 2);
    let again = [message("r:2", "c", now), message("r:3", "c", now)];
    assert_eq!(
        store.insert_messages(&again).await.expect("insert"),
        1,
        "r:2 exists"
    );
    assert_eq!(
        store.log(&LogFilter::default()).await.expect("log").len(),
        3
    );
    let keys: Vec<String> = ["r:1", "r:3", "r:9"].map(String::from).to_vec();
    let found = store.existing_dedupe_keys(&keys).await.expect("keys");
    assert_eq!(
        found,
        ["r:1", "r:3"].map(String::from).into_iter().collect()
    );
    assert!(
        store
            .existing_dedupe_keys(&[])
            .await
            .expect("none")
            .is_empty()
    );
    let many: Vec<String> = (0..1200).map(|i| format!("r:{i}")).collect();
    assert_eq!(
        store.existing_dedupe_keys(&many).await.expect("many").len(),
        3
    );
}

async fn candidates_skip_planned_and_suppressed(backend: Backend) {
    let (_env, store) = open(backend).await;
    store
        .upsert_customers(&[
            customer("a", "A@example.com", "A"),
            customer("b", "b@example.com", "B"),
        ])
        .await
        .expect("customers");
    let now = Utc::now();
    let event = |id: &str, who: &str| Event {
        id: id.into(),
        customer_id: who.into(),
        kind: "purchase".into(),
        occurred_at: now - TimeDelta::minutes(5),
        data: serde_json::json!({}),
    };
    store
        .insert_events(&[event("e1", "a"), event("e2", "a"), event("e3", "b")])
        .await
        .expect("events");
    store
        .insert_messages(&[NewMessage {
            event_id: Some("e1".into()),
            ..message("thanks:e1", "a", now)
        }])
        .await
        .expect("planned");
    store
        .suppress("b@example.com", "asked", "test")
        .await
        .expect("suppress");
    let (_, up_to) = store.max_seqs().await.expect("seqs");
    let query = CandidateQuery {
        rule: "thanks".into(),
        source: CandidateSource::NewEvents {
            kind: "purchase".into(),
            occurred_from: now - TimeDelta::hours(1),
            unless_since: vec![],
        },
        after_seq: 0,
        up_to_seq: up_to,
        now,
        limit: 10,
        include_suppressed: false,
    };
    let found = store.candidates(&query).await.expect("candidates");
    let ids: Vec<_> = found
        .iter()
        .filter_map(|c| c.event.as_ref().map(|e| e.id.clone()))
        .collect();
    assert_eq!(ids, ["e2"], "e1 is planned, e3's customer is suppressed");
    assert_eq!(found[0].customer.email, "A@example.com");
    let recurring = CandidateQuery {
        source: CandidateSource::RecurringCustomers,
        ..query
    };
    let found = store.candidates(&recurring).await.expect("customers");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].customer.id, "a");
    assert!(found[0].event.is_none());
    // A rule to the owner hears about suppressed customers too.
    let to_owner = CandidateQuery {
        include_suppressed: true,
        ..recurring
    };
    let found = store.candidates(&to_owner).await.expect("owner");
    let ids: Vec<&str> = found.iter().map(|c| c.customer.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
}

// --- the outbox -------------------------------------------------------------------------------

async fn claims_are_fenced_by_token_and_lease(backend: Backend) {
    let (env, store) = open(backend).await;
    let now = Utc::now();
    store
        .insert_messages(&[
            message("r:1", "c", now - TimeDelta::seconds(2)),
            message("r:2", "c", now - TimeDelta::seconds(1)),
            message("r:later", "c", now + TimeDelta::hours(1)),
        ])
        .await
        .expect("insert");
    let next = store.next_due_in().await.expect("next due");
    assert_eq!(next, Some(TimeDelta::zero()), "due now");
    let claims = claim_all(&store, "one").await;
    assert_eq!(claims.len(), 2, "only the due ones");
    assert_eq!(
        claims[0].detail,
        serde_json::json!({ "n": "r:1" }),
        "soonest first"
    );
    assert!(
        claims
            .iter()
            .all(|c| c.token == claims[0].token && c.attempts == 1)
    );
    assert!(
        claim_all(&store, "two").await.is_empty(),
        "a claimed message is not claimed again"
    );
    let (one, two) = (&claims[0], &claims[1]);

    let to = delivery("c@example.com");
    assert!(
        !store
            .begin_body_with(one.id, "stale", &to, &content(), MARGIN)
            .await
            .expect("stale")
    );
    assert!(
        !store
            .begin_body_with(one.id, &one.token, &to, &content(), LEASE * 2)
            .await
            .expect("margin"),
        "less than the margin left"
    );
    assert!(
        !store
            .finish(
                one.id,
                "stale",
                &Outcome::Sent {
                    reply: "250".into()
                }
            )
            .await
            .expect("stale")
    );
    assert!(
        store
            .begin_body_with(one.id, &one.token, &to, &content(), MARGIN)
            .await
            .expect("body")
    );
    let sent = Outcome::Sent {
        reply: "250 ok".into(),
    };
    assert!(
        store
            .finish(one.id, &one.token, &sent)
            .await
            .expect("finish")
    );
    assert!(
        !store
            .finish(one.id, &one.token, &sent)
            .await
            .expect("again"),
        "the token is spent"
    );
    let entry = store.message(one.id).await.expect("read").expect("exists");
    assert_eq!(entry.state, MessageState::Sent);
    assert_eq!(entry.smtp_reply.as_deref(), Some("250 ok"));
    assert_eq!(entry.email.as_deref(), Some("c@example.com"));
    assert!(entry.sent_at.is_some());
    assert_eq!(
        store.sent_content(one.id).await.expect("content"),
        Some(content())
    );
    let kinds: Vec<String> = store
        .message_events(one.id)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["sent"], "one line per transition");

    // A lease that ran out fences the body too.
    expire_leases(&env).await;
    assert!(
        !store
            .begin_body_with(two.id, &two.token, &to, &content(), MARGIN)
            .await
            .expect("lapsed")
    );
    // Released: back to scheduled, the attempt not counted.
    let at = Utc::now() + TimeDelta::hours(2);
    let released = Outcome::Released {
        at,
        reason: "relay down".into(),
    };
    assert!(
        store
            .finish(two.id, &two.token, &released)
            .await
            .expect("release")
    );
    let entry = store.message(two.id).await.expect("read").expect("exists");
    assert_eq!((entry.state, entry.attempts), (MessageState::Scheduled, 0));
    assert!((entry.next_attempt_at - at).num_milliseconds().abs() < 1);
    let (waiting, _) = store.due_backlog().await.expect("backlog");
    assert_eq!(waiting, 0, "nothing due now");
    let next = store
        .next_due_in()
        .await
        .expect("next")
        .expect("some waits");
    assert!(next > TimeDelta::minutes(50), "{next}");
}

async fn reaping_goes_by_phase(backend: Backend) {
    let (env, store) = open(backend).await;
    let due = Utc::now() - TimeDelta::seconds(1);
    let batch: Vec<_> = (0..3)
        .map(|i| message(&format!("r:{i}"), "c", due))
        .collect();
    store.insert_messages(&batch).await.expect("insert");
    let claims = claim_all(&store, "one").await;
    let to = delivery("c@example.com");
    let body = &claims[2];
    assert!(
        store
            .begin_body_with(body.id, &body.token, &to, &content(), MARGIN)
            .await
            .expect("body")
    );
    assert_eq!(
        store.reap_expired(false).await.expect("reap"),
        Default::default(),
        "leases live"
    );
    expire_leases(&env).await;
    let reaped = store.reap_expired(false).await.expect("reap");
    assert_eq!((reaped.rescheduled, reaped.unknown), (2, 1));
    assert_eq!(
        state_of(&store, claims[0].id).await,
        MessageState::Scheduled
    );
    assert_eq!(state_of(&store, body.id).await, MessageState::Unknown);
    assert!(
        !store
            .finish(
                body.id,
                &body.token,
                &Outcome::Sent {
                    reply: "250".into()
                }
            )
            .await
            .expect("late")
    );
    let lines = store.message_events(body.id).await.expect("events");
    assert_eq!(
        lines.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["unknown"]
    );
    assert_eq!(lines[0].attempt, Some(1));

    // With resend_unknown, a body that may have gone out is tried again.
    let again = claim_all(&store, "one").await;
    assert_eq!(again.len(), 2);
    let claim = &again[0];
    assert_eq!(claim.attempts, 2);
    assert!(
        store
            .begin_body_with(claim.id, &claim.token, &to, &content(), MARGIN)
            .await
            .expect("body")
    );
    expire_leases(&env).await;
    let reaped = store.reap_expired(true).await.expect("reap");
    assert_eq!((reaped.rescheduled, reaped.unknown), (1, 1));
    assert_eq!(state_of(&store, claim.id).await, MessageState::Retrying);
}

async fn overdue_messages_expire(backend: Backend) {
    let (_env, store) = open(backend).await;
    let now = Utc::now();
    let expired = NewMessage {
        expires_at: Some(now - TimeDelta::seconds(1)),
        ..message("r:old", "c", now + TimeDelta::hours(1))
    };
    let fresh = NewMessage {
        expires_at: Some(now + TimeDelta::hours(2)),
        ..message("r:new", "c", now + TimeDelta::hours(1))
    };
    store
        .insert_messages(&[expired, fresh])
        .await
        .expect("insert");
    let ids = store.expire_overdue().await.expect("expire");
    assert_eq!(ids.len(), 1);
    let entry = store.message(ids[0]).await.expect("read").expect("exists");
    assert_eq!(entry.state, MessageState::Skipped);
    assert!(
        entry
            .reason
            .as_deref()
            .unwrap_or_default()
            .starts_with("expired")
    );
    assert!(store.expire_overdue().await.expect("again").is_empty());
}

// --- consent ----------------------------------------------------------------------------------

async fn suppressions_are_normalised(backend: Backend) {
    let (_env, store) = open(backend).await;
    assert!(
        store
            .suppress(" Ann@Example.COM ", "bounced", "smtp")
            .await
            .expect("add")
    );
    assert!(
        !store
            .suppress("ann@example.com", "asked", "web")
            .await
            .expect("again")
    );
    assert!(store.is_suppressed("ANN@example.com").await.expect("check"));
    let list = store.suppressions().await.expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].email.as_str(), list[0].reason.as_str()),
        ("ann@example.com", "bounced")
    );

    // The body fence refuses an address suppressed after the claim.
    store
        .insert_messages(&[message("r:1", "c", Utc::now() - TimeDelta::seconds(1))])
        .await
        .expect("insert");
    let claim = claim_all(&store, "one").await.remove(0);
    let to = delivery("ANN@example.com");
    assert!(
        !store
            .begin_body_with(claim.id, &claim.token, &to, &content(), MARGIN)
            .await
            .expect("fenced")
    );

    assert!(store.unsuppress("Ann@Example.com").await.expect("remove"));
    assert!(!store.unsuppress("ann@example.com").await.expect("gone"));
    assert!(!store.is_suppressed("ann@example.com").await.expect("check"));
    assert!(
        store
            .begin_body_with(claim.id, &claim.token, &to, &content(), MARGIN)
            .await
            .expect("body")
    );
}

/// `suppress remove` keeps the time the address was suppressed: `suppressed_at` finds it, and
/// planning leaves out the events of that time (but not those before or after).
async fn suppressed_periods_are_kept_and_their_events_left_out(backend: Backend) {
    let (_env, store) = open(backend).await;
    store
        .upsert_customers(&[customer("a", "Gap@Example.com", "A")])
        .await
        .expect("customer");
    let before = Utc::now() - TimeDelta::minutes(5);
    assert!(
        store
            .suppress("gap@example.com", "bounced", "smtp")
            .await
            .expect("add")
    );
    let since = store.suppressions().await.expect("list")[0].created_at;
    let now = store
        .suppressed_at("GAP@example.com", None)
        .await
        .expect("now");
    let now = now.expect("suppressed now");
    assert_eq!(
        (now.since, now.until, now.reason.as_str()),
        (since, None, "bounced")
    );
    assert_eq!(
        store
            .suppressed_at("gap@example.com", Some(before))
            .await
            .expect("before"),
        None
    );
    let during = since + TimeDelta::milliseconds(10);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(store.unsuppress("gap@example.com").await.expect("remove"));
    assert!(
        !store
            .is_suppressed("gap@example.com")
            .await
            .expect("allowed")
    );
    assert_eq!(
        store
            .suppressed_at("gap@example.com", None)
            .await
            .expect("now"),
        None
    );
    let period = store
        .suppressed_at("gap@example.com", Some(during))
        .await
        .expect("then");
    let period = period.expect("a period covers it");
    assert_eq!((period.since, period.source.as_str()), (since, "smtp"));
    let until = period.until.expect("ended");
    assert!(until > during, "{until} after {during}");
    let after = until + TimeDelta::milliseconds(1);
    assert_eq!(
        store
            .suppressed_at("gap@example.com", Some(after))
            .await
            .expect("after"),
        None
    );

    let event = |id: &str, at: DateTime<Utc>| Event {
        id: id.into(),
        customer_id: "a".into(),
        kind: "purchase".into(),
        occurred_at: at,
        data: serde_json::json!({}),
    };
    store
        .insert_events(&[
            event("before", before),
            event("during", during),
            event("after", after),
        ])
        .await
        .expect("events");
    let (_, up_to) = store.max_seqs().await.expect("seqs");
    let query = CandidateQuery {
        rule: "thanks".into(),
        source: CandidateSource::NewEvents {
            kind: "purchase".into(),
            occurred_from: before - TimeDelta::hours(1),
            unless_since: vec![],
        },
        after_seq: 0,
        up_to_seq: up_to,
        now: Utc::now(),
        limit: 10,
        include_suppressed: false,
    };
    let found = store.candidates(&query).await.expect("candidates");
    let mut ids: Vec<_> = found
        .iter()
        .filter_map(|c| c.event.as_ref().map(|e| e.id.clone()))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        ["after", "before"],
        "the event while suppressed is left out"
    );
}

/// The guard's facts for a batch (`send_facts`) say what the one-at-a-time reads say, for
/// everything asked about, and nothing (`None`) about what was not asked.
async fn a_batch_of_send_facts_answers_like_the_single_reads(backend: Backend) {
    let (_env, store) = open(backend).await;
    store
        .upsert_customers(&[
            customer("a", "Ann@Example.com", "A"),
            customer("b", "bob@example.com", "B"),
        ])
        .await
        .expect("customers");
    let t0 = store_time(Utc::now() - TimeDelta::hours(3));
    let event = |id: &str, customer: &str, kind: &str, at: DateTime<Utc>| Event {
        id: id.into(),
        customer_id: customer.into(),
        kind: kind.into(),
        occurred_at: at,
        data: serde_json::json!({ "id": id }),
    };
    store
        .insert_events(&[
            event("e1", "a", "purchase", t0),
            event("e2", "a", "refund", t0 + TimeDelta::hours(1)),
            event("e3", "a", "refund", t0 + TimeDelta::minutes(30)),
            event("e4", "b", "purchase", t0),
        ])
        .await
        .expect("events");
    // Bob is suppressed now; Ann was, for a while, and the owner never.
    store
        .suppress("BOB@example.com", "bounced", "smtp")
        .await
        .expect("bob");
    store
        .suppress("ann@example.com", "asked", "web")
        .await
        .expect("ann");
    let list = store.suppressions().await.expect("list");
    let ann = list.iter().find(|s| s.email == "ann@example.com");
    let ann_since = ann.expect("ann listed").created_at;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        store
            .unsuppress("ann@example.com")
            .await
            .expect("allowed again")
    );

    let wanted = FactsWanted {
        customer_ids: vec!["a".into(), "b".into(), "ghost".into()],
        event_ids: vec!["e1".into(), "e4".into(), "gone".into()],
        addresses: vec!["Owner@Example.com".into()],
        unless_kinds: vec!["refund".into()],
    };
    let facts = store.send_facts(&wanted).await.expect("facts");

    for id in ["a", "b", "ghost"] {
        let single = store.customer(id).await.expect("customer");
        assert_eq!(facts.customer(id), Some(single.as_ref()), "customer {id}");
    }
    assert_eq!(facts.customer("never asked"), None);
    for id in ["e1", "e4", "gone"] {
        let single = store.event(id).await.expect("event");
        assert_eq!(facts.event(id), Some(single.as_ref()), "event {id}");
    }
    assert_eq!(facts.event("e2"), None, "not asked for");

    for address in ["ANN@example.com", "bob@example.com", "owner@example.com"] {
        let single = store.is_suppressed(address).await.expect("suppressed");
        assert_eq!(facts.is_suppressed(address), Some(single), "{address}");
    }
    assert_eq!(facts.is_suppressed("stranger@example.com"), None);
    let moments = [
        ann_since - TimeDelta::seconds(1),
        ann_since + TimeDelta::milliseconds(10),
        Utc::now(),
        Utc::now() - TimeDelta::days(1),
    ];
    for address in ["ann@example.com", "bob@example.com", "owner@example.com"] {
        for at in moments {
            let single = store.suppressed_at(address, Some(at)).await.expect("at");
            assert_eq!(
                facts.was_suppressed_at(address, at),
                Some(single.is_some()),
                "{address} at {at}"
            );
        }
    }
    assert_eq!(
        facts.was_suppressed_at(" Ann@example.com", ann_since + TimeDelta::milliseconds(10)),
        Some(true),
        "the period Ann was suppressed"
    );

    let afters = [t0, t0 + TimeDelta::minutes(45), t0 + TimeDelta::hours(2)];
    for customer in ["a", "b", "ghost"] {
        for after in afters {
            let single = store
                .has_event_after(customer, "refund", after)
                .await
                .expect("unless");
            assert_eq!(
                facts.has_event_after(customer, "refund", after),
                Some(single),
                "{customer} refund after {after}"
            );
        }
    }
    assert_eq!(facts.has_event_after("a", "refund", t0), Some(true));
    assert_eq!(
        facts.has_event_after("a", "refund", t0 + TimeDelta::hours(2)),
        Some(false)
    );
    assert_eq!(
        facts.has_event_after("a", "purchase", t0),
        None,
        "kind not asked for"
    );
    assert_eq!(
        facts.has_event_after("c", "refund", t0),
        None,
        "customer not asked for"
    );

    // Nothing asked, nothing read.
    let empty = store
        .send_facts(&FactsWanted::default())
        .await
        .expect("empty");
    assert_eq!(empty.customer("a"), None);
    assert_eq!(empty.is_suppressed("bob@example.com"), None);
}

/// What `why` and the message page read: the first event after a time, a message's detail,
/// and the checks kept for a stopped message (older kept checks, plain lines, read as passed).
async fn why_reads_events_details_and_kept_checks(backend: Backend) {
    let (env, store) = open(backend).await;
    store
        .upsert_customers(&[customer("c", "c@example.com", "C")])
        .await
        .expect("customer");
    let at = |h: i64| Utc::now() - TimeDelta::hours(h);
    let event = |id: &str, kind: &str, at: DateTime<Utc>| Event {
        id: id.into(),
        customer_id: "c".into(),
        kind: kind.into(),
        occurred_at: at,
        data: serde_json::json!({}),
    };
    let (early, late) = (at(3), at(1));
    store
        .insert_events(&[
            event("p2", "purchase", late),
            event("p1", "purchase", early),
            event("r1", "refund", at(2)),
        ])
        .await
        .expect("events");
    let first = store
        .first_event_after("c", "purchase", at(4))
        .await
        .expect("first");
    assert_eq!(first.map(|e| e.id), Some("p1".to_string()));
    let next = store
        .first_event_after("c", "purchase", early)
        .await
        .expect("next");
    assert_eq!(next.map(|e| e.id), Some("p2".to_string()));
    assert_eq!(
        store
            .first_event_after("c", "purchase", late)
            .await
            .expect("none"),
        None
    );
    assert_eq!(
        store
            .first_event_after("x", "purchase", at(4))
            .await
            .expect("nobody"),
        None
    );

    store
        .insert_messages(&[message("r:1", "c", Utc::now() - TimeDelta::seconds(1))])
        .await
        .expect("insert");
    let claim = claim_all(&store, "one").await.remove(0);
    assert_eq!(
        store.message_detail(claim.id).await.expect("detail"),
        Some(serde_json::json!({ "n": "r:1" }))
    );
    assert_eq!(
        store.message_detail(claim.id + 1000).await.expect("none"),
        None
    );
    let lines = vec![
        CheckLine::passed("enabled"),
        CheckLine {
            text: "unless refund".into(),
            verdict: "failed".into(),
        },
        CheckLine {
            text: "the window".into(),
            verdict: "not_reached".into(),
        },
    ];
    assert!(
        !store
            .keep_checks(claim.id, "not-the-token", &lines)
            .await
            .expect("fenced")
    );
    assert!(
        store
            .keep_checks(claim.id, &claim.token, &lines)
            .await
            .expect("kept")
    );
    let kept = store
        .sent_content(claim.id)
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(kept.checks, lines);
    env.execute_sql(&format!(
        "UPDATE messages SET checks = '[\"an old line\"]' WHERE id = {}",
        claim.id
    ))
    .await;
    let kept = store
        .sent_content(claim.id)
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(kept.checks, [CheckLine::passed("an old line")]);
}

// --- tracking ---------------------------------------------------------------------------------

async fn message_events_are_recorded_once(backend: Backend) {
    let (_env, store) = open(backend).await;
    store
        .insert_messages(&[message("r:1", "c", Utc::now() - TimeDelta::seconds(1))])
        .await
        .expect("insert");
    let claim = claim_all(&store, "one").await.remove(0);
    let to = delivery("Pat@example.com");
    assert!(
        store
            .begin_body_with(claim.id, &claim.token, &to, &content(), MARGIN)
            .await
            .expect("body")
    );
    assert!(
        store
            .finish(
                claim.id,
                &claim.token,
                &Outcome::Sent {
                    reply: "250".into()
                }
            )
            .await
            .expect("sent")
    );
    let found = store
        .message_by_message_id("m@test")
        .await
        .expect("by id")
        .expect("found");
    assert_eq!(found.id, claim.id, "with or without angle brackets");

    let detail = serde_json::json!({ "ip": "192.0.2.1" });
    let once =
        |key: &'static str| store.record_message_event_once(claim.id, "opened", key, &detail);
    assert!(once("pixel").await.expect("first"));
    assert!(!once("pixel").await.expect("repeat"));
    assert!(!once("pixel").await.expect("repeat"));
    assert!(once("other").await.expect("another key"));
    store
        .add_message_event(
            claim.id,
            "clicked",
            &serde_json::json!({ "url": "https://x.example" }),
        )
        .await
        .expect("click");
    let lines = store.message_events(claim.id).await.expect("events");
    let opened: Vec<i64> = lines
        .iter()
        .filter(|e| e.kind == "opened")
        .map(|e| e.count)
        .collect();
    assert_eq!(opened, [3, 1], "a repeat adds to the count, not a row");
    let entry = store
        .message(claim.id)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!((entry.opens, entry.clicks), (4, 1));
    assert!(entry.opened_at.is_some() && entry.clicked_at.is_some());
    assert_eq!(
        store
            .events_for_address("pat@EXAMPLE.com", "opened")
            .await
            .expect("count"),
        1
    );
    assert_eq!(
        store
            .events_for_address("pat@example.com", "bounced")
            .await
            .expect("count"),
        0
    );
    let engagement = store
        .engagement(Utc::now() - TimeDelta::hours(1))
        .await
        .expect("engagement");
    assert_eq!(
        engagement,
        [
            ("r".to_string(), "clicked".to_string(), 1),
            ("r".to_string(), "opened".to_string(), 1)
        ]
    );
    let activity = store
        .activity(Utc::now() - TimeDelta::hours(1))
        .await
        .expect("activity");
    assert_eq!(
        activity
            .iter()
            .map(|a| (a.state, a.count))
            .collect::<Vec<_>>(),
        [(MessageState::Sent, 1)]
    );
    let history = store
        .customer_message_events("c", 10)
        .await
        .expect("history");
    assert_eq!(
        history.len(),
        4,
        "sent, two opened lines, clicked: {history:?}"
    );
}

// --- reporting --------------------------------------------------------------------------------

async fn the_log_pages_and_filters(backend: Backend) {
    let (_env, store) = open(backend).await;
    store
        .upsert_customers(&[
            customer("ann", "ann@example.com", "Ann Smith"),
            customer("bob", "bob@example.com", "Bob 100%_Real"),
        ])
        .await
        .expect("customers");
    let now = Utc::now();
    let batch: Vec<NewMessage> = (0..6)
        .map(|i| NewMessage {
            rule: if i % 2 == 0 { "even" } else { "odd" }.into(),
            ..message(
                &format!("k{i}"),
                if i < 4 { "ann" } else { "bob" },
                now + TimeDelta::hours(i),
            )
        })
        .collect();
    store.insert_messages(&batch).await.expect("insert");
    let ids = |entries: Vec<touchpoint::store::LogEntry>| -> Vec<i64> {
        entries.into_iter().map(|e| e.id).collect()
    };
    let all = ids(store.log(&LogFilter::default()).await.expect("log"));
    assert_eq!(all.len(), 6);
    assert!(all.windows(2).all(|w| w[0] > w[1]), "newest first: {all:?}");

    let page = |before| LogFilter {
        limit: Some(4),
        before,
        ..LogFilter::default()
    };
    let first = store.log(&page(None)).await.expect("page");
    let second = ids(store
        .log(&page(first.last().map(LogCursor::after)))
        .await
        .expect("page"));
    assert_eq!([ids(first), second].concat(), all, "keyset pages");

    let by = |filter: LogFilter| {
        let store = store.clone();
        async move { store.log(&filter).await.expect("log").len() }
    };
    assert_eq!(
        by(LogFilter {
            rule: Some("even".into()),
            ..Default::default()
        })
        .await,
        3
    );
    assert_eq!(
        by(LogFilter {
            state: Some(MessageState::Scheduled),
            ..Default::default()
        })
        .await,
        6
    );
    assert_eq!(
        by(LogFilter {
            state: Some(MessageState::Sent),
            ..Default::default()
        })
        .await,
        0
    );
    assert_eq!(
        by(LogFilter {
            customer_id: Some("bob".into()),
            ..Default::default()
        })
        .await,
        2
    );
    let search = |text: &str| LogFilter {
        customer_search: Some(text.into()),
        ..Default::default()
    };
    assert_eq!(by(search("ANN@")).await, 4, "email, case-insensitive");
    assert_eq!(by(search("smith")).await, 4, "name");
    assert_eq!(by(search("bob")).await, 2, "id");
    assert_eq!(
        by(search("100%_r")).await,
        2,
        "LIKE's wildcards are literal"
    );
    assert_eq!(by(search("0%_x")).await, 0);
    assert_eq!(
        by(LogFilter {
            customer_search: Some("ann".into()),
            rule: Some("odd".into()),
            ..Default::default()
        })
        .await,
        2
    );
    let window = LogFilter {
        from: Some(now + TimeDelta::minutes(90)),
        until: Some(now + TimeDelta::minutes(270)),
        ..Default::default()
    };
    assert_eq!(by(window).await, 3, "due at +2h, +3h and +4h");
    assert_eq!(
        by(LogFilter {
            from: Some(now + TimeDelta::minutes(90)),
            ..Default::default()
        })
        .await,
        4
    );
    assert_eq!(
        by(LogFilter {
            until: Some(now + TimeDelta::minutes(30)),
            ..Default::default()
        })
        .await,
        1
    );
    let upcoming = store
        .log(&LogFilter {
            due_before: Some(now + TimeDelta::minutes(150)),
            ..Default::default()
        })
        .await
        .expect("upcoming");
    let due: Vec<_> = upcoming.iter().map(|e| e.due_at).collect();
    assert_eq!(due.len(), 3);
    assert!(due.windows(2).all(|w| w[0] <= w[1]), "soonest first");
    assert_eq!(
        by(LogFilter {
            since: Some(now - TimeDelta::minutes(5)),
            ..Default::default()
        })
        .await,
        6
    );

    let counts = store.counts().await.expect("counts");
    assert_eq!(
        counts,
        [
            ("even".to_string(), MessageState::Scheduled, 3),
            ("odd".to_string(), MessageState::Scheduled, 3)
        ]
    );
    assert_eq!(
        store
            .count_state(MessageState::Scheduled)
            .await
            .expect("count"),
        6
    );
    assert_eq!(
        store.sent_content(all[0]).await.expect("content"),
        None,
        "nothing kept yet"
    );
}

/// One dating rule for the log, its filters, its order, its count and the overview's counts:
/// history by what happened when (sent, failed, skipped at), the plan by when it is due.
async fn the_log_dates_messages_by_what_happened(backend: Backend) {
    let (env, store) = open(backend).await;
    store
        .upsert_customers(&[customer("ann", "ann@example.com", "Ann Smith")])
        .await
        .expect("customers");
    let now = Utc::now();
    let day = |n: i64| now - TimeDelta::days(n);
    // All due ten days ago; they ended on other days (the order of ids is not the order of
    // dates), and one waits for next month.
    let batch: Vec<NewMessage> = (0..5)
        .map(|i| message(&format!("d{i}"), "ann", day(10) + TimeDelta::minutes(i)))
        .collect();
    store.insert_messages(&batch).await.expect("insert");
    let claims = claim_all(&store, "w").await;
    assert_eq!(claims.len(), 5);
    let reply = |n: &str| Some(n.to_string());
    let outcomes = [
        Outcome::Sent {
            reply: "250 ok".into(),
        },
        Outcome::Failed {
            reply: reply("550 no"),
            reason: "refused".into(),
        },
        Outcome::Skipped {
            reason: "unless".into(),
        },
        Outcome::Unknown {
            reason: "lost".into(),
        },
        Outcome::Released {
            at: now + TimeDelta::days(30),
            reason: "window".into(),
        },
    ];
    for (claim, outcome) in claims.iter().zip(&outcomes) {
        assert!(
            store
                .finish(claim.id, &claim.token, outcome)
                .await
                .expect("finish")
        );
    }
    let id = |i: usize| claims[i].id;
    let at = |t: DateTime<Utc>| {
        format!(
            "'{}'",
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
    };
    for (i, set) in [
        (0, format!("sent_at = {0}, updated_at = {0}", at(day(1)))),
        (1, format!("updated_at = {}", at(day(3)))),
        (2, format!("updated_at = {}", at(day(2)))),
        (3, format!("updated_at = {}", at(day(5)))),
        (4, format!("updated_at = {}", at(day(4)))),
    ] {
        env.execute_sql(&format!("UPDATE messages SET {set} WHERE id = {}", id(i)))
            .await;
    }
    let ids = |entries: &[touchpoint::store::LogEntry]| -> Vec<i64> {
        entries.iter().map(|e| e.id).collect()
    };
    let all = store.log(&LogFilter::default()).await.expect("log");
    assert_eq!(
        ids(&all),
        [id(4), id(0), id(2), id(1), id(3)],
        "newest first by date"
    );
    let expected = [now + TimeDelta::days(30), day(1), day(2), day(3), day(5)];
    for (entry, when) in all.iter().zip(expected) {
        assert_eq!(
            entry.dated_at().timestamp_millis(),
            when.timestamp_millis(),
            "{entry:?}"
        );
    }
    let history = LogFilter {
        history: true,
        ..LogFilter::default()
    };
    let past = store.log(&history).await.expect("history");
    assert_eq!(
        ids(&past),
        [id(0), id(2), id(1), id(3)],
        "no waiting message in history"
    );
    assert_eq!(store.log_count(&history).await.expect("count"), 4);

    // Failed three days ago: inside a range that starts four days ago, though it was due ten.
    let range = LogFilter {
        from: Some(day(4)),
        until: Some(day(1) - TimeDelta::hours(1)),
        ..history.clone()
    };
    assert_eq!(
        ids(&store.log(&range).await.expect("range")),
        [id(2), id(1)]
    );
    assert_eq!(store.log_count(&range).await.expect("count"), 2);
    let since = LogFilter {
        since: Some(day(4)),
        ..history.clone()
    };
    assert_eq!(
        ids(&store.log(&since).await.expect("since")),
        [id(0), id(2), id(1)]
    );

    // The overview's counts are the log's: one per final state since four days ago.
    let activity = store.activity(day(4)).await.expect("activity");
    let mut counted: Vec<(MessageState, i64)> =
        activity.iter().map(|a| (a.state, a.count)).collect();
    counted.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(
        counted,
        [
            (MessageState::Failed, 1),
            (MessageState::Sent, 1),
            (MessageState::Skipped, 1)
        ]
    );
    for (state, n) in counted {
        let filter = LogFilter {
            state: Some(state),
            from: Some(day(4)),
            ..LogFilter::default()
        };
        assert_eq!(store.log_count(&filter).await.expect("count"), n, "{state}");
    }

    // Pages of two, by the date and then the id.
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .log(&LogFilter {
                limit: Some(2),
                before,
                ..LogFilter::default()
            })
            .await
            .expect("page");
        paged.extend(ids(&page));
        match page.last() {
            Some(last) if page.len() == 2 => before = Some(LogCursor::after(last)),
            _ => break,
        }
    }
    assert_eq!(paged, ids(&all));
    assert_eq!(
        store
            .log_count(&LogFilter {
                limit: Some(1),
                ..LogFilter::default()
            })
            .await
            .expect("count"),
        5
    );
}

/// The log reads the messages that wait (on `messages_waiting`) and the others (on the partial
/// `messages_dated`) apart and merges them: every page, filter and count is the order of
/// `LogEntry::dated_at` (then the id, both newest first) over all the messages, with waiting
/// messages due before, between, after and at the same moment as finished ones.
async fn the_log_merges_waiting_and_finished_messages_in_one_order(backend: Backend) {
    let (env, store) = open(backend).await;
    store
        .upsert_customers(&[
            customer("ann", "ann@example.com", "Ann Smith"),
            customer("bob", "bob@example.com", "Bob Jones"),
        ])
        .await
        .expect("customers");
    // Whole milliseconds, as the times are written below: a bound equal to a date is equal.
    let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now");
    let hour = move |n: i64| now - TimeDelta::hours(n);
    let later = now + TimeDelta::days(1);
    let sent = || {
        Some(Outcome::Sent {
            reply: "250 ok".into(),
        })
    };
    let wait = || {
        Some(Outcome::Released {
            at: later,
            reason: "window".into(),
        })
    };
    let retry = || {
        Some(Outcome::Retry {
            at: later,
            reply: "451 later".into(),
        })
    };
    // What each message becomes (`None`: it stays in `sending`), and the hours ago that date
    // it. Ties on purpose: 3 and 4 (a waiting and a failed message), 9 and 10 (two waiting
    // ones), 6 and 12 (one in `sending`, dated by its next attempt, and a sent one).
    let plan: [(Option<Outcome>, i64); 13] = [
        (wait(), 30),
        (wait(), -5),
        (sent(), 2),
        (wait(), 7),
        (
            Some(Outcome::Failed {
                reply: Some("550 no".into()),
                reason: "refused".into(),
            }),
            7,
        ),
        (
            Some(Outcome::Skipped {
                reason: "unless".into(),
            }),
            12,
        ),
        (None, 9),
        (retry(), 1),
        (
            Some(Outcome::Unknown {
                reason: "lost".into(),
            }),
            15,
        ),
        (wait(), 20),
        (wait(), 20),
        (retry(), 40),
        (sent(), 9),
    ];
    let batch: Vec<NewMessage> = (0..plan.len())
        .map(|i| NewMessage {
            rule: if i % 3 == 0 { "one" } else { "two" }.into(),
            ..message(
                &format!("m{i}"),
                if i % 2 == 0 { "ann" } else { "bob" },
                hour(50),
            )
        })
        .collect();
    store.insert_messages(&batch).await.expect("insert");
    let mut claims = claim_all(&store, "w").await;
    claims.extend(claim_all(&store, "w").await);
    claims.sort_by_key(|c| c.id);
    assert_eq!(claims.len(), plan.len());
    let at = |t: DateTime<Utc>| {
        format!(
            "'{}'",
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
    };
    for (claim, (outcome, hours)) in claims.iter().zip(&plan) {
        let when = at(hour(*hours));
        let set = match outcome {
            Some(Outcome::Sent { .. }) => format!("sent_at = {when}, updated_at = {when}"),
            Some(Outcome::Retry { .. } | Outcome::Released { .. }) | None => {
                format!("next_attempt_at = {when}")
            }
            Some(_) => format!("updated_at = {when}"),
        };
        if let Some(outcome) = outcome {
            assert!(
                store
                    .finish(claim.id, &claim.token, outcome)
                    .await
                    .expect("finish")
            );
        }
        env.execute_sql(&format!(
            "UPDATE messages SET {set} WHERE id = {}",
            claim.id
        ))
        .await;
    }
    let mut everything = Vec::new();
    for claim in &claims {
        everything.push(
            store
                .message(claim.id)
                .await
                .expect("read")
                .expect("exists"),
        );
    }
    let states: Vec<MessageState> = everything.iter().map(|e| e.state).collect();
    use MessageState::*;
    assert_eq!(
        states,
        [
            Scheduled, Scheduled, Sent, Scheduled, Failed, Skipped, Sending, Retrying, Unknown,
            Scheduled, Scheduled, Retrying, Sent
        ]
    );
    for (entry, (_, hours)) in everything.iter().zip(&plan) {
        assert_eq!(
            entry.dated_at().timestamp_millis(),
            hour(*hours).timestamp_millis(),
            "{entry:?}"
        );
    }
    // The order the log promises, from the one definition of a message's date.
    everything.sort_by_key(|e| std::cmp::Reverse((e.dated_at(), e.id)));
    let ids = |entries: &[touchpoint::store::LogEntry]| -> Vec<i64> {
        entries.iter().map(|e| e.id).collect()
    };
    let waits = |e: &touchpoint::store::LogEntry| matches!(e.state, Scheduled | Retrying);
    type Keep = Box<dyn Fn(&touchpoint::store::LogEntry) -> bool>;
    fn only(keep: impl Fn(&touchpoint::store::LogEntry) -> bool + 'static) -> Keep {
        Box::new(keep)
    }
    let filters: Vec<(LogFilter, Keep)> = vec![
        (LogFilter::default(), only(|_| true)),
        (
            LogFilter {
                history: true,
                ..LogFilter::default()
            },
            only(move |e| !waits(e)),
        ),
        (
            LogFilter {
                since: Some(hour(10)),
                ..LogFilter::default()
            },
            only(move |e| e.dated_at() >= hour(10)),
        ),
        (
            LogFilter {
                from: Some(hour(21)),
                until: Some(hour(2)),
                ..LogFilter::default()
            },
            only(move |e| e.dated_at() >= hour(21) && e.dated_at() < hour(2)),
        ),
        (
            LogFilter {
                rule: Some("two".into()),
                ..LogFilter::default()
            },
            only(|e| e.rule == "two"),
        ),
        (
            LogFilter {
                customer_id: Some("ann".into()),
                ..LogFilter::default()
            },
            only(|e| e.customer_id == "ann"),
        ),
        (
            LogFilter {
                customer_search: Some("jones".into()),
                from: Some(hour(45)),
                ..LogFilter::default()
            },
            only(move |e| e.customer_id == "bob" && e.dated_at() >= hour(45)),
        ),
    ]
    .into_iter()
    .chain(MessageState::ALL.into_iter().map(|state| {
        let filter = LogFilter {
            state: Some(state),
            ..LogFilter::default()
        };
        let keep = only(move |e| e.state == state);
        (filter, keep)
    }))
    .collect();
    for (filter, keep) in &filters {
        let expected: Vec<i64> = everything
            .iter()
            .filter(|e| keep(e))
            .map(|e| e.id)
            .collect();
        let whole = store.log(filter).await.expect("log");
        assert_eq!(ids(&whole), expected, "{filter:?}");
        assert_eq!(
            store.log_count(filter).await.expect("count"),
            expected.len() as i64,
            "{filter:?}"
        );
        // Pages smaller than either part, keyset after keyset.
        for size in [1, 2, 3, 5] {
            let mut paged = Vec::new();
            let mut before = None;
            loop {
                let page = store
                    .log(&LogFilter {
                        limit: Some(size),
                        before,
                        ..filter.clone()
                    })
                    .await
                    .expect("page");
                assert!(page.len() as i64 <= size);
                paged.extend(ids(&page));
                match page.last() {
                    Some(last) if page.len() as i64 == size => {
                        before = Some(LogCursor::after(last))
                    }
                    _ => break,
                }
            }
            assert_eq!(paged, expected, "pages of {size}, {filter:?}");
        }
    }
    // The plan, soonest first, is the waiting messages due by then.
    let upcoming = store
        .log(&LogFilter {
            due_before: Some(hour(7)),
            ..LogFilter::default()
        })
        .await
        .expect("upcoming");
    let mut due: Vec<&touchpoint::store::LogEntry> = everything
        .iter()
        .filter(|e| waits(e) && e.next_attempt_at <= hour(7))
        .collect();
    due.sort_by_key(|e| (e.next_attempt_at, e.id));
    assert_eq!(ids(&upcoming), due.iter().map(|e| e.id).collect::<Vec<_>>());
    // History and a waiting state together match nothing.
    let none = LogFilter {
        history: true,
        state: Some(Scheduled),
        ..LogFilter::default()
    };
    assert!(store.log(&none).await.expect("log").is_empty());
    assert_eq!(store.log_count(&none).await.expect("count"), 0);
    // The overview counts finished messages by the same date.
    let activity = store.activity(hour(10)).await.expect("activity");
    let counted: i64 = activity.iter().map(|a| a.count).sum();
    let finished = everything
        .iter()
        .filter(|e| e.state.is_final() && e.dated_at() >= hour(10))
        .count();
    assert_eq!(counted, finished as i64, "{activity:?}");
}

// --- shared state -----------------------------------------------------------------------------

async fn settings_and_sessions(backend: Backend) {
    let (env, store) = open(backend).await;
    assert_eq!(
        store.setting_or_insert("key", "one").await.expect("set"),
        "one"
    );
    let other = env.store().await;
    assert_eq!(
        other.setting_or_insert("key", "two").await.expect("get"),
        "one",
        "first wins"
    );

    let future = Utc::now().timestamp() + 3600;
    assert!(!store.session_revoked("h1").await.expect("check"));
    store.revoke_session("h1", future).await.expect("revoke");
    store
        .revoke_session("h1", future)
        .await
        .expect("revoke twice");
    assert!(
        other.session_revoked("h1").await.expect("check"),
        "seen by every process"
    );
    store
        .revoke_session("old", 1)
        .await
        .expect("revoke an expired one");
    store.revoke_session("h2", future).await.expect("revoke");
    assert!(
        !store.session_revoked("old").await.expect("check"),
        "expired records are deleted"
    );
    assert!(store.session_revoked("h2").await.expect("check"));
    store.ping().await.expect("ping");
}

async fn customers_are_found_by_address_without_case(backend: Backend) {
    let (_env, store) = open(backend).await;
    store
        .upsert_customers(&[
            customer("c2", "Ada@Example.com", "Ada at work"),
            customer("c1", "ada@example.com", "Ada"),
            customer("c3", "grace@example.com", "Grace"),
        ])
        .await
        .unwrap();
    let ids = |found: Vec<Customer>| found.into_iter().map(|c| c.id).collect::<Vec<_>>();
    let both = store
        .customers_by_email(" ADA@example.COM ", 5)
        .await
        .unwrap();
    assert_eq!(ids(both), ["c1", "c2"], "both, in the order of their ids");
    let first = store
        .customers_by_email("ada@example.com", 1)
        .await
        .unwrap();
    assert_eq!(ids(first), ["c1"], "at most the limit");
    let grace = store
        .customers_by_email("grace@example.com", 5)
        .await
        .unwrap();
    assert_eq!(ids(grace), ["c3"]);
    assert!(
        store
            .customers_by_email("nobody@example.com", 5)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn replies_are_counted_by_rule(backend: Backend) {
    let (_env, store) = open(backend).await;
    store
        .upsert_customers(&[customer("c1", "a@example.com", "A")])
        .await
        .unwrap();
    assert!(store.reply_counts().await.unwrap().is_empty());
    store
        .insert_messages(&[message("k1", "c1", Utc::now())])
        .await
        .unwrap();
    let id = store.log(&LogFilter::default()).await.unwrap()[0].id;
    let reply = |id: &str, kind: &str| Event {
        id: id.into(),
        customer_id: "c1".into(),
        kind: kind.into(),
        occurred_at: Utc::now(),
        data: serde_json::json!({}),
    };
    store
        .insert_events(&[
            reply("r1", "replied"),
            reply("r2", "replied"),
            reply("r3", "replied"),
            reply("r4", "auto_replied"),
        ])
        .await
        .unwrap();
    let detail = serde_json::json!({});
    store
        .record_message_event_once(id, "replied", "r1", &detail)
        .await
        .unwrap();
    store
        .record_message_event_once(id, "auto_replied", "r4", &detail)
        .await
        .unwrap();
    assert_eq!(
        store.reply_counts().await.unwrap(),
        [(String::new(), 2), ("r".to_string(), 1)],
        "one reply to a message of rule r, two tied to no message; auto-replies are no replies"
    );
}

on_both_backends!(
    replies_are_counted_by_rule,
    customers_are_found_by_address_without_case,
    customers_and_events,
    merge_customers_keeps_what_a_patch_does_not_name,
    dedupe_keys_are_unique,
    candidates_skip_planned_and_suppressed,
    claims_are_fenced_by_token_and_lease,
    reaping_goes_by_phase,
    overdue_messages_expire,
    suppressions_are_normalised,
    suppressed_periods_are_kept_and_their_events_left_out,
    a_batch_of_send_facts_answers_like_the_single_reads,
    why_reads_events_details_and_kept_checks,
    message_events_are_recorded_once,
    the_log_pages_and_filters,
    the_log_dates_messages_by_what_happened,
    the_log_merges_waiting_and_finished_messages_in_one_order,
    settings_and_sessions,
);

// --- the state machine, against a model --------------------------------------------------------

pub mod model {
    //! A model of one store's message state machine, driven by random operations.
    //!
    //! Invariants checked after every step:
    //! - the model predicts every row exactly: state, attempts, claim token and owner, phase,
    //!   and one `message_events` line per transition (claims and `begin_body` add none);
    //! - `claim_due` returns only waiting, due messages, as many as it may, under one new
    //!   token, and never one that holds a claim: there is at most one live claim per message;
    //! - `begin_body` and `finish` with a stale or finished token return false and change no
    //!   byte of the table; `begin_body` also refuses an expired lease or one shorter than the
    //!   margin;
    //! - a message whose body may have been delivered (`begin_body` returned true and the
    //!   attempt did not end with a definite refusal: sent, unknown, or reaped) is never
    //!   claimable again, unless `resend_unknown`; without it, no message is possibly
    //!   delivered twice;
    //! - `sent` is only ever reached by a `finish` with the live token, after `begin_body`;
    //! - attempts never decrease except by exactly one on `Released`;
    //! - after a final time warp past every lease, a reap and an expiry, no message is left in
    //!   `sending`: each is final, or `scheduled`/`retrying`.

    use std::collections::{BTreeMap, BTreeSet};
    use std::str::FromStr;
    use std::time::Duration;

    use chrono::{TimeDelta, Utc};
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    use touchpoint::store::{
        Delivery, MessageState, NewMessage, Outcome, PostgresStore, SentContent, SqliteStore, Store,
    };

    /// How long a normal claim lasts; `Advance` always jumps past it.
    const LEASE_MINUTES: i64 = 10;
    const SMALL_STEP: i64 = 15;
    const BIG_STEP: i64 = 120;
    /// `expires_at` of the messages that have one, in model minutes from the start.
    const EXPIRES: i64 = 50;

    #[derive(Debug, Clone)]
    pub enum Op {
        Claim {
            instance: u8,
            limit: u32,
            tiny: bool,
        },
        BeginBody {
            claim: usize,
            wide_margin: bool,
        },
        Finish {
            claim: usize,
            verdict: u8,
            delay: u8,
        },
        Crash {
            claim: usize,
        },
        Advance {
            big: bool,
        },
        Reap,
        Expire,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..2u8, 1..4u32, prop::bool::weighted(0.2))
                .prop_map(|(instance, limit, tiny)| Op::Claim { instance, limit, tiny }),
            4 => (any::<usize>(), prop::bool::weighted(0.1))
                .prop_map(|(claim, wide_margin)| Op::BeginBody { claim, wide_margin }),
            4 => (any::<usize>(), any::<u8>(), any::<u8>())
                .prop_map(|(claim, verdict, delay)| Op::Finish { claim, verdict, delay }),
            1 => any::<usize>().prop_map(|claim| Op::Crash { claim }),
            2 => prop::bool::weighted(0.3).prop_map(|big| Op::Advance { big }),
            2 => Just(Op::Reap),
            1 => Just(Op::Expire),
        ]
    }

    /// (resend_unknown, messages as (due now, has expires_at), operations)
    pub fn case() -> impl Strategy<Value = (bool, Vec<(bool, bool)>, Vec<Op>)> {
        (
            prop::bool::weighted(0.3),
            prop::collection::vec((prop::bool::weighted(0.75), any::<bool>()), 1..5),
            prop::collection::vec(op(), 1..40),
        )
    }

    /// Direct SQL for what the trait does not offer: reading whole rows and moving the clock.
    pub enum Raw {
        Sqlite(sqlx::SqlitePool),
        Postgres(sqlx::PgPool),
    }

    type RowTuple = (
        i64,
        String,
        i32,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        i64,
    );

    /// One `messages` row, every column that can change, times as text.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Row {
        pub state: MessageState,
        pub attempts: i32,
        pub token: Option<String>,
        pub claimed_by: Option<String>,
        pub phase: Option<String>,
        pub smtp_reply: Option<String>,
        pub reason: Option<String>,
        pub next_attempt_at: Option<String>,
        pub lease_expires_at: Option<String>,
        pub updated_at: Option<String>,
        pub sent_at: Option<String>,
        pub events: i64,
    }

    const SNAPSHOT: &str = "SELECT m.id, m.state, m.attempts, m.claim_token, m.claimed_by, m.phase, \
        m.smtp_reply, m.reason, CAST(m.next_attempt_at AS TEXT), CAST(m.lease_expires_at AS TEXT), \
        CAST(m.updated_at AS TEXT), CAST(m.sent_at AS TEXT), \
        (SELECT COUNT(*) FROM message_events e WHERE e.message_id = m.id) \
        FROM messages m ORDER BY m.id";

    impl Raw {
        async fn execute(&self, sql: &str) {
            match self {
                Raw::Sqlite(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
                Raw::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
            }
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }

        pub async fn clear(&self) {
            self.execute("DELETE FROM message_events").await;
            self.execute("DELETE FROM messages").await;
        }

        pub async fn snapshot(&self) -> BTreeMap<i64, Row> {
            let rows: Vec<RowTuple> = match self {
                Raw::Sqlite(pool) => sqlx::query_as(SNAPSHOT).fetch_all(pool).await,
                Raw::Postgres(pool) => sqlx::query_as(SNAPSHOT).fetch_all(pool).await,
            }
            .expect("snapshot");
            rows.into_iter()
                .map(|r| {
                    let row = Row {
                        state: MessageState::from_str(&r.1).expect("state"),
                        attempts: r.2,
                        token: r.3,
                        claimed_by: r.4,
                        phase: r.5,
                        smtp_reply: r.6,
                        reason: r.7,
                        next_attempt_at: r.8,
                        lease_expires_at: r.9,
                        updated_at: r.10,
                        sent_at: r.11,
                        events: r.12,
                    };
                    (r.0, row)
                })
                .collect()
        }

        /// Moves the clock forward by `minutes`, as the rows see it: every stored instant that is
        /// compared with "now" moves back.
        async fn advance(&self, minutes: i64) {
            let sql = match self {
                Raw::Sqlite(_) => {
                    let shift = |c: &str| {
                        format!(
                            "{c} = strftime('%Y-%m-%dT%H:%M:%fZ', {c}, '-{} seconds')",
                            minutes * 60
                        )
                    };
                    format!(
                        "UPDATE messages SET {}, {}, {}, {}",
                        shift("next_attempt_at"),
                        shift("lease_expires_at"),
                        shift("expires_at"),
                        shift("due_at")
                    )
                }
                Raw::Postgres(_) => {
                    let shift = |c: &str| format!("{c} = {c} - interval '{minutes} minutes'");
                    format!(
                        "UPDATE messages SET {}, {}, {}, {}",
                        shift("next_attempt_at"),
                        shift("lease_expires_at"),
                        shift("expires_at"),
                        shift("due_at")
                    )
                }
            };
            self.execute(&sql).await;
        }
    }

    /// What the model expects of one message.
    #[derive(Debug, Clone)]
    struct Expected {
        state: MessageState,
        attempts: i32,
        token: Option<String>,
        claimed_by: Option<String>,
        body: bool,
        lease_expired: bool,
        /// `next_attempt_at`, in model minutes.
        due: i64,
        expires: Option<i64>,
        events: i64,
        /// Bodies that may have reached the server (sent, unknown, or reaped after the body).
        deliveries: u32,
    }

    #[derive(Debug)]
    struct ClaimRecord {
        id: i64,
        token: String,
        /// `begin_body` returned true for this claim.
        body: bool,
        /// The process holding it crashed: it never acts again.
        dead: bool,
    }

    struct Run<'a> {
        store: &'a dyn Store,
        raw: &'a Raw,
        resend_unknown: bool,
        /// Model minutes since the case started.
        now: i64,
        messages: BTreeMap<i64, Expected>,
        claims: Vec<ClaimRecord>,
        tokens: BTreeSet<String>,
        rows: BTreeMap<i64, Row>,
        log: Vec<String>,
    }

    macro_rules! check {
        ($run:expr, $cond:expr, $($arg:tt)+) => {
            if !$cond {
                return Err(TestCaseError::fail(format!(
                    "{}\nsteps:\n  {}",
                    format!($($arg)+),
                    $run.log.join("\n  ")
                )));
            }
        };
    }

    fn is_waiting(state: MessageState) -> bool {
        matches!(state, MessageState::Scheduled | MessageState::Retrying)
    }

    impl Run<'_> {
        fn claim_index(&self, selector: usize) -> Option<usize> {
            (!self.claims.is_empty()).then(|| selector % self.claims.len())
        }

        async fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
            self.log.push(format!("{op:?}"));
            let before = self.rows.clone();
            let mut unchanged = false;
            let mut released: Option<i64> = None;
            let mut sent_by: Option<(i64, String)> = None;
            match *op {
                Op::Claim {
                    instance,
                    limit,
                    tiny,
                } => {
                    let name = format!("instance-{instance}");
                    let lease = if tiny {
                        TimeDelta::milliseconds(1)
                    } else {
                        TimeDelta::minutes(LEASE_MINUTES)
                    };
                    let due: BTreeSet<i64> = self
                        .messages
                        .iter()
                        .filter(|(_, m)| is_waiting(m.state) && m.due <= self.now)
                        .map(|(id, _)| *id)
                        .collect();
                    let claims = self
                        .store
                        .claim_due(&name, limit, lease)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    if tiny {
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                    self.log.push(format!(
                        "  -> claimed {:?}",
                        claims.iter().map(|c| c.id).collect::<Vec<_>>()
                    ));
                    check!(
                        self,
                        claims.len() == due.len().min(limit as usize),
                        "claimed {} of {:?} due (limit {limit})",
                        claims.len(),
                        due
                    );
                    let ids: BTreeSet<i64> = claims.iter().map(|c| c.id).collect();
                    check!(
                        self,
                        ids.len() == claims.len(),
                        "a message claimed twice at once"
                    );
                    if let Some(first) = claims.first() {
                        check!(
                            self,
                            claims.iter().all(|c| c.token == first.token),
                            "one claim, several tokens"
                        );
                        check!(
                            self,
                            self.tokens.insert(first.token.clone()),
                            "a token was reused"
                        );
                    }
                    for claim in &claims {
                        check!(
                            self,
                            due.contains(&claim.id),
                            "claimed {} which was not waiting and due: {:?}",
                            claim.id,
                            self.messages.get(&claim.id)
                        );
                        let resend_unknown = self.resend_unknown;
                        let m = self.messages.get_mut(&claim.id).expect("known message");
                        check!(
                            self,
                            m.deliveries == 0 || resend_unknown,
                            "message {} may have been delivered, yet it was claimed again",
                            claim.id
                        );
                        m.state = MessageState::Sending;
                        m.attempts += 1;
                        m.token = Some(claim.token.clone());
                        m.claimed_by = Some(name.clone());
                        m.body = false;
                        m.lease_expired = tiny;
                        let expected = m.attempts;
                        check!(
                            self,
                            claim.attempts == expected,
                            "claim says attempt {} for {}, model {expected}",
                            claim.attempts,
                            claim.id
                        );
                        self.claims.push(ClaimRecord {
                            id: claim.id,
                            token: claim.token.clone(),
                            body: false,
                            dead: false,
                        });
                    }
                }
                Op::BeginBody { claim, wide_margin } => {
                    let Some(index) = self.claim_index(claim) else {
                        return Ok(());
                    };
                    if self.claims[index].dead {
                        return Ok(());
                    }
                    let (id, token) = (self.claims[index].id, self.claims[index].token.clone());
                    let margin = if wide_margin {
                        TimeDelta::minutes(LEASE_MINUTES * 2)
                    } else {
                        TimeDelta::seconds(1)
                    };
                    let m = &self.messages[&id];
                    // begin_body also refuses a message whose expires_at has passed (the
                    // database's last word before the body goes out).
                    let expect = m.token.as_deref() == Some(token.as_str())
                        && !m.lease_expired
                        && !wide_margin
                        && m.expires.is_none_or(|e| e > self.now);
                    let delivery = Delivery {
                        email: format!("customer-{id}@example.com"),
                        subject: "Hello".into(),
                        message_id: format!("{id}@touchpoint.test"),
                    };
                    let held = self
                        .store
                        .begin_body_with(id, &token, &delivery, &SentContent::default(), margin)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    self.log.push(format!("  -> {held} (message {id})"));
                    check!(
                        self,
                        held == expect,
                        "begin_body on {id} returned {held}, model {expect}: {m:?}"
                    );
                    if held {
                        let resend_unknown = self.resend_unknown;
                        let m = self.messages.get_mut(&id).expect("known");
                        check!(
                            self,
                            m.deliveries == 0 || resend_unknown,
                            "a second body of message {id} went out"
                        );
                        m.body = true;
                        self.claims[index].body = true;
                    } else {
                        unchanged = true;
                    }
                }
                Op::Finish {
                    claim,
                    verdict,
                    delay,
                } => {
                    let Some(index) = self.claim_index(claim) else {
                        return Ok(());
                    };
                    if self.claims[index].dead {
                        return Ok(());
                    }
                    let record = &self.claims[index];
                    let (id, token, body) = (record.id, record.token.clone(), record.body);
                    let offset = [0, 5, 24 * 60][delay as usize % 3];
                    let at = Utc::now() + TimeDelta::minutes(offset);
                    // What the dispatcher can record: after the body, the server's verdict;
                    // before it, a refusal, a skip by the guard, or a release.
                    let outcome = match (body, verdict % 4) {
                        (true, 0) => Outcome::Sent {
                            reply: "250 2.0.0 Ok".into(),
                        },
                        (true, 3) => Outcome::Unknown {
                            reason: "no reply after the dot".into(),
                        },
                        (false, 2) => Outcome::Skipped {
                            reason: "unless".into(),
                        },
                        (false, 3) => Outcome::Released {
                            at,
                            reason: "relay paused".into(),
                        },
                        (_, 1) => Outcome::Retry {
                            at,
                            reply: "451 4.3.0 later".into(),
                        },
                        _ => Outcome::Failed {
                            reply: Some("554 5.7.1 no".into()),
                            reason: "refused".into(),
                        },
                    };
                    let expect = self.messages[&id].token.as_deref() == Some(token.as_str());
                    let done = self
                        .store
                        .finish(id, &token, &outcome)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    self.log
                        .push(format!("  -> {done} (message {id}, {:?})", outcome.state()));
                    check!(
                        self,
                        done == expect,
                        "finish on {id} returned {done}, model {expect}"
                    );
                    if done {
                        let now = self.now;
                        let m = self.messages.get_mut(&id).expect("known");
                        if m.body
                            && matches!(outcome, Outcome::Sent { .. } | Outcome::Unknown { .. })
                        {
                            m.deliveries += 1;
                        }
                        match &outcome {
                            Outcome::Retry { .. } => m.due = now + offset,
                            Outcome::Released { .. } => {
                                m.due = now + offset;
                                m.attempts -= 1;
                                released = Some(id);
                            }
                            Outcome::Sent { .. } => sent_by = Some((id, token.clone())),
                            _ => {}
                        }
                        m.state = outcome.state();
                        m.token = None;
                        m.claimed_by = None;
                        m.body = false;
                        m.lease_expired = false;
                        m.events += 1;
                    } else {
                        unchanged = true;
                    }
                }
                Op::Crash { claim } => {
                    if let Some(index) = self.claim_index(claim) {
                        self.claims[index].dead = true;
                    }
                    unchanged = true;
                }
                Op::Advance { big } => {
                    let minutes = if big { BIG_STEP } else { SMALL_STEP };
                    self.raw.advance(minutes).await;
                    self.now += minutes;
                    for m in self.messages.values_mut() {
                        if m.token.is_some() {
                            m.lease_expired = true;
                        }
                    }
                }
                Op::Reap => {
                    let reaped = self
                        .store
                        .reap_expired(self.resend_unknown)
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    self.log.push(format!("  -> {reaped:?}"));
                    let (mut rescheduled, mut unknown) = (0, 0);
                    let now = self.now;
                    for m in self.messages.values_mut() {
                        if m.token.is_none() || !m.lease_expired {
                            continue;
                        }
                        if m.body {
                            unknown += 1;
                            m.deliveries += 1;
                            m.state = if self.resend_unknown {
                                MessageState::Retrying
                            } else {
                                MessageState::Unknown
                            };
                        } else {
                            rescheduled += 1;
                            m.state = MessageState::Scheduled;
                        }
                        m.token = None;
                        m.claimed_by = None;
                        m.body = false;
                        m.lease_expired = false;
                        m.due = now;
                        m.events += 1;
                    }
                    check!(
                        self,
                        (reaped.rescheduled, reaped.unknown) == (rescheduled, unknown),
                        "reaped {reaped:?}, model rescheduled {rescheduled} unknown {unknown}"
                    );
                }
                Op::Expire => {
                    let expired = self
                        .store
                        .expire_overdue()
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let expired: BTreeSet<i64> = expired.into_iter().collect();
                    self.log.push(format!("  -> expired {expired:?}"));
                    let mut expected = BTreeSet::new();
                    for (id, m) in self.messages.iter_mut() {
                        if is_waiting(m.state) && m.expires.is_some_and(|e| e < self.now) {
                            expected.insert(*id);
                            m.state = if m.state == MessageState::Scheduled {
                                MessageState::Skipped
                            } else {
                                MessageState::Failed
                            };
                            m.events += 1;
                        }
                    }
                    check!(
                        self,
                        expired == expected,
                        "expired {expired:?}, model {expected:?}"
                    );
                }
            }
            self.rows = self.raw.snapshot().await;
            if unchanged {
                check!(
                    self,
                    self.rows == before,
                    "a refused write changed the table:\nbefore {before:#?}\nafter {:#?}",
                    self.rows
                );
            }
            self.compare(&before, released, sent_by.as_ref())
        }

        /// The rows against the model, and the step-to-step invariants.
        fn compare(
            &self,
            before: &BTreeMap<i64, Row>,
            released: Option<i64>,
            sent_by: Option<&(i64, String)>,
        ) -> Result<(), TestCaseError> {
            check!(
                self,
                self.rows.keys().eq(self.messages.keys()),
                "rows {:?}, model {:?}",
                self.rows.keys(),
                self.messages.keys()
            );
            for (id, row) in &self.rows {
                let m = &self.messages[id];
                let phase = match (&m.token, m.body) {
                    (None, _) => None,
                    (Some(_), false) => Some("claimed"),
                    (Some(_), true) => Some("body"),
                };
                check!(
                    self,
                    row.state == m.state
                        && row.attempts == m.attempts
                        && row.token == m.token
                        && row.claimed_by == m.claimed_by
                        && row.phase.as_deref() == phase
                        && row.events == m.events,
                    "message {id}: row {row:#?}\nmodel {m:#?}"
                );
                check!(
                    self,
                    (row.state == MessageState::Sending) == row.token.is_some(),
                    "message {id}: a claim token outside `sending`: {row:#?}"
                );
                check!(
                    self,
                    self.resend_unknown || m.deliveries <= 1,
                    "message {id} may have been delivered {} times",
                    m.deliveries
                );
                check!(
                    self,
                    row.state != MessageState::Sent || m.deliveries >= 1,
                    "message {id} is sent but no body went out"
                );
                // The log reads waiting messages by `next_attempt_at` (`messages_waiting`) as
                // their date: only `sent`, which is final, may have a `sent_at`.
                check!(
                    self,
                    row.sent_at.is_none() || row.state == MessageState::Sent,
                    "message {id} has a sent_at outside `sent`: {row:#?}"
                );
                let Some(old) = before.get(id) else { continue };
                if released == Some(*id) {
                    check!(
                        self,
                        row.attempts == old.attempts - 1,
                        "released {id}: attempts {} -> {}",
                        old.attempts,
                        row.attempts
                    );
                } else {
                    check!(
                        self,
                        row.attempts >= old.attempts,
                        "attempts of {id} went down: {} -> {}",
                        old.attempts,
                        row.attempts
                    );
                }
                if row.state == MessageState::Sent && old.state != MessageState::Sent {
                    check!(
                        self,
                        sent_by.is_some_and(|(sid, token)| sid == id
                            && old.token.as_deref() == Some(token.as_str())),
                        "message {id} became sent other than by finish with its live token"
                    );
                }
                if old.state.is_final() {
                    // A time warp moves every stored instant; nothing else may change.
                    let unwarped = Row {
                        next_attempt_at: old.next_attempt_at.clone(),
                        ..row.clone()
                    };
                    check!(
                        self,
                        &unwarped == old,
                        "final message {id} changed: {old:#?} -> {row:#?}"
                    );
                }
            }
            Ok(())
        }
    }

    /// One case: fresh messages, the operations, then everything expired and reaped.
    pub async fn run_case(
        store: &dyn Store,
        raw: &Raw,
        resend_unknown: bool,
        messages: &[(bool, bool)],
        ops: &[Op],
    ) -> Result<(), TestCaseError> {
        raw.clear().await;
        let now = Utc::now();
        let batch = uuid::Uuid::new_v4().simple().to_string();
        let new: Vec<NewMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, &(due_now, expires))| NewMessage {
                rule: "model".into(),
                customer_id: format!("c{i}"),
                event_id: None,
                dedupe_key: format!("model:{batch}:{i}"),
                trigger_at: now,
                due_at: if due_now {
                    now - TimeDelta::minutes(1)
                } else {
                    now + TimeDelta::minutes(30)
                },
                expires_at: expires.then(|| now + TimeDelta::minutes(EXPIRES)),
                detail: serde_json::json!({}),
            })
            .collect();
        let inserted = store
            .insert_messages(&new)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(inserted as usize, new.len());
        let rows = raw.snapshot().await;
        prop_assert_eq!(rows.len(), new.len());
        let expected = rows
            .keys()
            .zip(messages)
            .map(|(id, &(due_now, expires))| {
                let m = Expected {
                    state: MessageState::Scheduled,
                    attempts: 0,
                    token: None,
                    claimed_by: None,
                    body: false,
                    lease_expired: false,
                    due: if due_now { -1 } else { 30 },
                    expires: expires.then_some(EXPIRES),
                    events: 0,
                    deliveries: 0,
                };
                (*id, m)
            })
            .collect();
        let mut run = Run {
            store,
            raw,
            resend_unknown,
            now: 0,
            messages: expected,
            claims: Vec::new(),
            tokens: BTreeSet::new(),
            rows,
            log: vec![format!(
                "resend_unknown = {resend_unknown}, messages {messages:?}"
            )],
        };
        for op in ops {
            run.step(op).await?;
        }
        // Every process is gone; time passes; the reaper and the expiry run.
        for op in [Op::Advance { big: true }, Op::Reap, Op::Expire] {
            run.step(&op).await?;
        }
        for (id, row) in &run.rows {
            check!(
                run,
                row.state != MessageState::Sending,
                "message {id} is stuck in sending: {row:#?}"
            );
            check!(
                run,
                row.state.is_final() || is_waiting(row.state),
                "message {id}: {row:#?}"
            );
        }
        Ok(())
    }

    /// Runs `cases` random cases against one store.
    pub fn check_store(
        runtime: &tokio::runtime::Runtime,
        store: &dyn Store,
        raw: &Raw,
        cases: u32,
    ) {
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&case(), |(resend_unknown, messages, ops)| {
            runtime.block_on(run_case(store, raw, resend_unknown, &messages, &ops))
        });
        if let Err(error) = result {
            panic!("{error}");
        }
    }

    pub async fn sqlite(dir: &std::path::Path) -> (SqliteStore, Raw) {
        let path = dir.join("model.db");
        let store = SqliteStore::open(&path, 2).await.expect("open sqlite");
        store.migrate().await.expect("migrate");
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .expect("raw sqlite");
        (store, Raw::Sqlite(pool))
    }

    pub async fn postgres(url: &str) -> (PostgresStore, Raw) {
        let store = PostgresStore::open(url, 4).await.expect("open postgres");
        store.migrate().await.expect("migrate");
        let raw = Raw::Postgres(store.pool().clone());
        (store, raw)
    }
}

fn model_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn state_machine_sqlite() {
    let runtime = model_runtime();
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, raw) = runtime.block_on(model::sqlite(dir.path()));
    model::check_store(&runtime, &store, &raw, 300);
}

#[test]
fn state_machine_postgres() {
    let runtime = model_runtime();
    let env = runtime.block_on(TestEnv::build(Backend::Postgres, Sink::Files, &[], ""));
    let (store, raw) = runtime.block_on(model::postgres(&env.database_url));
    model::check_store(&runtime, &store, &raw, 150);
    drop(store);
    drop(raw);
    drop(env);
}

/// Two instances claiming at once, in a loop, over one set of due messages: every message is
/// claimed exactly once (SKIP LOCKED on PostgreSQL; the write lock on SQLite, here with two
/// stores, as two processes would have, on one file).
async fn concurrent_claims(backend: Backend) {
    use touchpoint::store::NewMessage;
    let env = TestEnv::build(backend, Sink::Files, &[], "").await;
    let (a, b): (SharedStore, SharedStore) = match backend {
        Backend::Sqlite => (env.store().await, env.store().await),
        Backend::Postgres => (env.store().await, env.store().await),
    };
    let now = Utc::now();
    let messages: Vec<NewMessage> = (0..60)
        .map(|i| NewMessage {
            rule: "race".into(),
            customer_id: format!("c{i}"),
            event_id: None,
            dedupe_key: format!("race:{i}"),
            trigger_at: now,
            due_at: now - TimeDelta::seconds(1),
            expires_at: None,
            detail: serde_json::json!({}),
        })
        .collect();
    a.insert_messages(&messages).await.expect("insert");
    let claimer = |store: SharedStore, name: &'static str| {
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut errors = Vec::new();
            loop {
                match store.claim_due(name, 3, TimeDelta::minutes(5)).await {
                    Ok(claims) if claims.is_empty() => break,
                    Ok(claims) => {
                        for claim in claims {
                            let outcome = touchpoint::store::Outcome::Skipped {
                                reason: "race".into(),
                            };
                            match store.finish(claim.id, &claim.token, &outcome).await {
                                Ok(true) => ids.push(claim.id),
                                Ok(false) => errors.push(format!("lost claim {}", claim.id)),
                                Err(e) => errors.push(format!("finish: {e}")),
                            }
                        }
                    }
                    Err(e) => errors.push(format!("claim: {e}")),
                }
                if errors.len() > 20 {
                    break;
                }
            }
            (ids, errors)
        })
    };
    let (one, two) = tokio::join!(claimer(a.clone(), "one"), claimer(b.clone(), "two"));
    let (mut ids, errors_one) = one.expect("task");
    let (ids_two, errors_two) = two.expect("task");
    assert!(
        errors_one.is_empty() && errors_two.is_empty(),
        "{errors_one:?} {errors_two:?}"
    );
    ids.extend(ids_two);
    let total = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), total, "a message was claimed twice");
    assert_eq!(total, 60);
    let log = a.log(&LogFilter::default()).await.expect("log");
    assert!(log.iter().all(|m| m.state == MessageState::Skipped));
    assert!(log.iter().all(|m| m.attempts == 1), "{log:#?}");
}

on_both_backends!(concurrent_claims);

// --- the frequency limit ---------------------------------------------------------------------

fn gate(customer: &str, max: u32, per: TimeDelta) -> FrequencyGate {
    FrequencyGate {
        customer_id: customer.into(),
        max,
        per,
        exempt_rules: vec!["alert".into()],
    }
}

fn of_rule(rule: &str, key: &str, customer: &str, due: DateTime<Utc>) -> NewMessage {
    NewMessage {
        rule: rule.into(),
        ..message(key, customer, due)
    }
}

/// What counts is what went out (sent, unknown, the body going out now), by rules that do not
/// ignore the limit, within the window; the body fence refuses past the limit.
async fn the_frequency_limit_counts_what_went_out(backend: Backend) {
    let (env, store) = open(backend).await;
    let due = Utc::now() - TimeDelta::seconds(1);
    let batch = [
        of_rule("a", "a:1", "f", due),
        of_rule("b", "b:1", "f", due),
        of_rule("alert", "alert:1", "f", due),
        of_rule("b", "b:2", "g", due),
        of_rule("c", "c:1", "f", due),
    ];
    store.insert_messages(&batch).await.expect("insert");
    let claims = claim_all(&store, "one").await;
    let find = |rule: &str, customer: &str| {
        claims
            .iter()
            .find(|c| c.rule == rule && c.customer_id == customer)
            .cloned()
            .expect("claimed")
    };
    let (a, b, alert, other, c) = (
        find("a", "f"),
        find("b", "f"),
        find("alert", "f"),
        find("b", "g"),
        find("c", "f"),
    );
    let to = delivery("f@example.com");
    let day = TimeDelta::days(1);
    let limited = |m: &ClaimedMessage, max: u32| {
        let store = store.clone();
        let m = m.clone();
        let to = to.clone();
        async move {
            store
                .begin_body_limited(
                    m.id,
                    &m.token,
                    &to,
                    &content(),
                    MARGIN,
                    &gate(&m.customer_id, max, day),
                )
                .await
                .expect("body")
        }
    };
    assert!(limited(&a, 1).await, "nothing went out yet");
    // a's body is going out now: it counts, for f only, and the alert does not.
    assert!(!limited(&b, 1).await, "a's body is going out");
    assert!(
        limited(&other, 1).await,
        "another customer has their own allowance"
    );
    assert!(
        store
            .begin_body_with(alert.id, &alert.token, &to, &content(), MARGIN)
            .await
            .expect("alert")
    );
    let since = Utc::now() - day;
    let exempt = ["alert".to_string()];
    let counted = store
        .counted_sends("f", since, &exempt, b.id)
        .await
        .expect("counted");
    assert_eq!(counted.len(), 1, "a only: {counted:?}");
    assert!(counted[0] <= Utc::now() + TimeDelta::seconds(5));
    let in_flight = store
        .in_flight_sends("f", since, &exempt, b.id)
        .await
        .expect("in flight");
    assert_eq!(in_flight, counted, "a's body is still going out");
    // A body the server refused (failed after the body) was not delivered: it stops counting.
    let refused = Outcome::Failed {
        reply: Some("554 no".into()),
        reason: "refused".into(),
    };
    assert!(
        store
            .finish(a.id, &a.token, &refused)
            .await
            .expect("finish")
    );
    assert!(limited(&b, 1).await, "a failed: b may go");
    let sent = Outcome::Sent {
        reply: "250 ok".into(),
    };
    assert!(store.finish(b.id, &b.token, &sent).await.expect("finish"));
    assert!(!limited(&c, 1).await, "b was sent");
    assert!(limited(&c, 2).await, "a limit of two lets c go too");
    // c's claim dies with its body handed over: `unknown` counts, as it may have arrived.
    expire_leases(&env).await;
    store.reap_expired(false).await.expect("reap");
    assert_eq!(state_of(&store, c.id).await, MessageState::Unknown);
    let counted = store
        .counted_sends("f", since, &exempt, 0)
        .await
        .expect("counted");
    assert_eq!(counted.len(), 2, "b sent and c unknown: {counted:?}");
    assert!(counted[0] <= counted[1], "oldest first");
    let in_flight = store.in_flight_sends("f", since, &exempt, 0).await;
    assert_eq!(
        in_flight.expect("in flight"),
        Vec::<DateTime<Utc>>::new(),
        "both settled"
    );
    // Only the window counts: nothing went out after now.
    let later = Utc::now() + TimeDelta::seconds(5);
    let none = store.counted_sends("f", later, &exempt, 0).await;
    assert_eq!(none.expect("counted"), Vec::<DateTime<Utc>>::new());
    // Without the exemption the alert counts too.
    let all = store.counted_sends("f", since, &[], 0).await.expect("all");
    assert_eq!(all.len(), 3);
}

/// The waiting messages of given rules due by a time, earliest first.
async fn waiting_messages_by_rule_and_due_time(backend: Backend) {
    let (_env, store) = open(backend).await;
    let now = Utc::now();
    let batch = [
        of_rule("high", "high:1", "f", now + TimeDelta::minutes(10)),
        of_rule("high", "high:2", "f", now + TimeDelta::minutes(2)),
        of_rule("high", "high:3", "g", now + TimeDelta::minutes(2)),
        of_rule("low", "low:1", "f", now + TimeDelta::minutes(1)),
    ];
    store.insert_messages(&batch).await.expect("insert");
    let high = ["high".to_string()];
    let until = now + TimeDelta::minutes(30);
    let due = store.waiting_due("f", &high, until, 0).await.expect("due");
    assert_eq!(due.len(), 2, "{due:?}");
    assert!(due[0] < due[1], "earliest first");
    let soon = now + TimeDelta::minutes(5);
    let due = store.waiting_due("f", &high, soon, 0).await.expect("due");
    assert_eq!(due.len(), 1);
    let none = store.waiting_due("f", &[], until, 0).await.expect("none");
    assert!(none.is_empty());
    let other = ["other".to_string()];
    let none = store
        .waiting_due("f", &other, until, 0)
        .await
        .expect("none");
    assert!(none.is_empty());
}

/// Twenty claims for one customer race to the body fence from two connections pools at once:
/// exactly `max` pass. (On PostgreSQL without the per-customer lock several would: each
/// statement's snapshot misses the others' uncommitted phase.)
async fn the_body_fence_holds_the_limit_under_a_race(backend: Backend) {
    let env = TestEnv::build(backend, Sink::Files, &[], "").await;
    let stores = [env.store().await, env.store().await];
    let due = Utc::now() - TimeDelta::seconds(1);
    let batch: Vec<NewMessage> = (0..20)
        .map(|i| of_rule(&format!("r{i}"), &format!("r{i}:1"), "f", due))
        .collect();
    stores[0].insert_messages(&batch).await.expect("insert");
    let claims = stores[0].claim_due("one", 20, LEASE).await.expect("claim");
    assert_eq!(claims.len(), 20);
    let max = 2;
    {
        let tasks: Vec<_> = claims
            .iter()
            .enumerate()
            .map(|(i, claim)| {
                let store = stores[i % 2].clone();
                let claim = claim.clone();
                tokio::spawn(async move {
                    let to = delivery("f@example.com");
                    let gate = gate("f", max, TimeDelta::days(3));
                    store
                        .begin_body_limited(claim.id, &claim.token, &to, &content(), MARGIN, &gate)
                        .await
                })
            })
            .collect();
        let mut passed = 0;
        for task in tasks {
            // SQLite may answer "busy" to a racer past its timeout; that is a refusal too.
            if let Ok(Ok(true)) = task.await {
                passed += 1;
            }
        }
        assert_eq!(passed, max, "exactly {max} bodies may start");
    }
}

/// Body fences committed as one group are judged in order: two messages of one customer with
/// `max = 1` in the same group, exactly the first passes (the second counts the first's phase,
/// written in the same transaction); a third customer's fence and a stale token in the group
/// are judged on their own.
/// Fences without a frequency limit are written as one statement per run; each row is still
/// judged on its own token, suppression and expiry, and a limited fence between them keeps
/// its place in the order.
async fn a_run_of_plain_fences_judges_each_row(backend: Backend) {
    let (_env, store) = open(backend).await;
    let due = Utc::now() - TimeDelta::seconds(1);
    let expired = NewMessage {
        expires_at: Some(Utc::now() - TimeDelta::milliseconds(1)),
        ..of_rule("p", "p:4", "x", due)
    };
    store
        .insert_messages(&[
            of_rule("p", "p:1", "u", due),
            of_rule("p", "p:2", "v", due),
            of_rule("p", "p:3", "w", due),
            expired,
            of_rule("q", "q:1", "u", due),
            of_rule("p", "p:5", "y", due),
        ])
        .await
        .expect("insert");
    store
        .suppress("W@example.com", "bounced", "smtp")
        .await
        .expect("suppress");
    let claims = store.claim_due("one", 10, LEASE).await.expect("claim");
    assert_eq!(claims.len(), 6);
    let by_key = |customer: &str, rule: &str| {
        claims
            .iter()
            .find(|c| c.customer_id == customer && c.rule == rule)
            .expect("claimed")
    };
    let start = |claim: &ClaimedMessage, token: &str, gate: Option<FrequencyGate>| BodyStart {
        id: claim.id,
        token: token.into(),
        delivery: delivery(&format!("{}@example.com", claim.customer_id)),
        content: content_for(&claim.customer_id),
        margin: MARGIN,
        gate,
    };
    let (u, v, w, x, uq, y) = (
        by_key("u", "p"),
        by_key("v", "p"),
        by_key("w", "p"),
        by_key("x", "p"),
        by_key("u", "q"),
        by_key("y", "p"),
    );
    let group = [
        start(u, &u.token, None),
        start(v, "stale", None),
        start(w, &w.token, None),
        start(x, &x.token, None),
        // Limited to one for u: u's plain fence just before it in the group counts.
        start(uq, &uq.token, Some(gate("u", 1, TimeDelta::days(1)))),
        start(y, &y.token, None),
    ];
    let held = store.begin_bodies(&group).await.expect("group");
    assert_eq!(
        held,
        [true, false, false, false, false, true],
        "u held; v's token stale; w suppressed; x expired; u's limited one after u's plain one; y held"
    );
    // Each held row got its own bodies and checks from the one statement.
    for claim in [u, y] {
        let kept = store
            .sent_content(claim.id)
            .await
            .expect("read")
            .expect("kept");
        assert_eq!(kept, content_for(&claim.customer_id));
    }
    for (claim, phase) in [(u, true), (v, false), (w, false), (x, false), (y, true)] {
        let counted = store
            .counted_sends(&claim.customer_id, Utc::now() - TimeDelta::days(1), &[], 0)
            .await
            .expect("counted");
        assert_eq!(!counted.is_empty(), phase, "{}", claim.customer_id);
    }
}

async fn a_group_of_body_fences_is_judged_in_order(backend: Backend) {
    let (_env, store) = open(backend).await;
    let due = Utc::now() - TimeDelta::seconds(1);
    store
        .insert_messages(&[
            of_rule("a", "a:1", "f", due),
            of_rule("b", "b:1", "f", due),
            of_rule("c", "c:1", "g", due),
            of_rule("d", "d:1", "h", due),
        ])
        .await
        .expect("insert");
    let claims = store.claim_due("one", 10, LEASE).await.expect("claim");
    assert_eq!(claims.len(), 4);
    let by_rule = |rule: &str| claims.iter().find(|c| c.rule == rule).expect("claimed");
    let start = |claim: &ClaimedMessage, customer: &str, token: &str| BodyStart {
        id: claim.id,
        token: token.into(),
        delivery: delivery(&format!("{customer}@example.com")),
        content: content(),
        margin: MARGIN,
        gate: Some(gate(customer, 1, TimeDelta::days(3))),
    };
    let (a, b, c, d) = (by_rule("a"), by_rule("b"), by_rule("c"), by_rule("d"));
    let group = [
        start(a, "f", &a.token),
        start(c, "g", &c.token),
        start(b, "f", &b.token),
        start(d, "h", "stale"),
    ];
    let held = store.begin_bodies(&group).await.expect("group");
    assert_eq!(held, [true, true, false, false]);
    let counted = store
        .counted_sends("f", Utc::now() - TimeDelta::days(1), &[], 0)
        .await
        .expect("counted");
    assert_eq!(counted.len(), 1, "one of the customer's two went out");
    // The refused ones are still claimed and may be finished as usual.
    assert!(
        store
            .begin_body_with(
                d.id,
                &d.token,
                &delivery("h@example.com"),
                &content(),
                MARGIN
            )
            .await
            .expect("alone")
    );
}

/// Outcomes written as one group: each row checks its own token; a stale one in the group
/// changes nothing and is the only `false`, the others are written with their history lines.
async fn a_group_of_outcomes_checks_each_token(backend: Backend) {
    let (_env, store) = open(backend).await;
    let due = Utc::now() - TimeDelta::seconds(1);
    let batch: Vec<_> = (0..3)
        .map(|i| message(&format!("r:{i}"), "c", due))
        .collect();
    store.insert_messages(&batch).await.expect("insert");
    let claims = claim_all(&store, "one").await;
    assert_eq!(claims.len(), 3);
    let sent = Outcome::Sent {
        reply: "250 ok".into(),
    };
    let retry = Outcome::Retry {
        at: Utc::now() + TimeDelta::hours(1),
        reply: "451 later".into(),
    };
    let group = [
        Finishing {
            id: claims[2].id,
            token: &claims[2].token,
            outcome: &sent,
        },
        Finishing {
            id: claims[0].id,
            token: "stale",
            outcome: &sent,
        },
        Finishing {
            id: claims[1].id,
            token: &claims[1].token,
            outcome: &retry,
        },
    ];
    let held = store.finish_all(&group).await.expect("group");
    assert_eq!(held, [true, false, true], "in the order given");
    assert_eq!(state_of(&store, claims[2].id).await, MessageState::Sent);
    assert_eq!(state_of(&store, claims[0].id).await, MessageState::Sending);
    assert_eq!(state_of(&store, claims[1].id).await, MessageState::Retrying);
    let kinds = |id: i64| {
        let store = store.clone();
        async move {
            store
                .message_events(id)
                .await
                .expect("events")
                .into_iter()
                .map(|e| e.kind)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(kinds(claims[2].id).await, ["sent"]);
    assert!(
        kinds(claims[0].id).await.is_empty(),
        "nothing for the stale token"
    );
    assert_eq!(kinds(claims[1].id).await, ["retrying"]);
    assert_eq!(
        store.finish_all(&group[..1]).await.expect("again"),
        [false],
        "the token is spent"
    );
}

/// Fences from many tasks at once (grouped into shared commits) still hold the limit:
/// forty claims of one customer with `max = 3`, and forty unlimited ones of others, at once.
async fn concurrent_fences_hold_the_limit(backend: Backend) {
    let (_env, store) = open(backend).await;
    let due = Utc::now() - TimeDelta::seconds(1);
    let mut batch: Vec<NewMessage> = (0..40)
        .map(|i| of_rule(&format!("r{i}"), &format!("r{i}:1"), "f", due))
        .collect();
    batch.extend((0..40).map(|i| message(&format!("free:{i}"), &format!("o{i}"), due)));
    store.insert_messages(&batch).await.expect("insert");
    let claims = store.claim_due("one", 80, LEASE).await.expect("claim");
    assert_eq!(claims.len(), 80);
    let tasks: Vec<_> = claims
        .into_iter()
        .map(|claim| {
            let store = store.clone();
            tokio::spawn(async move {
                let limited = claim.customer_id == "f";
                let to = delivery(&format!("{}@example.com", claim.customer_id));
                let held = if limited {
                    let gate = gate("f", 3, TimeDelta::days(3));
                    store
                        .begin_body_limited(claim.id, &claim.token, &to, &content(), MARGIN, &gate)
                        .await
                } else {
                    store
                        .begin_body_with(claim.id, &claim.token, &to, &content(), MARGIN)
                        .await
                };
                (limited, held.expect("fence"))
            })
        })
        .collect();
    let (mut limited, mut free) = (0, 0);
    for task in tasks {
        match task.await.expect("task") {
            (true, true) => limited += 1,
            (false, true) => free += 1,
            _ => {}
        }
    }
    assert_eq!((limited, free), (3, 40));
}

on_both_backends!(
    the_frequency_limit_counts_what_went_out,
    waiting_messages_by_rule_and_due_time,
    the_body_fence_holds_the_limit_under_a_race,
    a_group_of_body_fences_is_judged_in_order,
    a_group_of_outcomes_checks_each_token,
    concurrent_fences_hold_the_limit,
);

// --- ratings (`RatingStore`) ---------------------------------------------------------------------

/// The last answer per message counts, a comment once given is kept, and the customer's
/// `rated` event follows each answer (its data changes, its id and time do not).
async fn ratings_keep_the_last_answer_and_the_comment(backend: Backend) {
    let (_env, store) = open(backend).await;
    store
        .upsert_customers(&[customer("c", "c@example.com", "C")])
        .await
        .expect("customer");
    let due = Utc::now() + TimeDelta::hours(1);
    store
        .insert_messages(&[message("r:1", "c", due), message("r:2", "c", due)])
        .await
        .expect("insert");
    let ids: Vec<i64> = store
        .log(&LogFilter::default())
        .await
        .expect("log")
        .iter()
        .map(|e| e.id)
        .collect();
    let rating = |message_id: i64, score: i64, comment: Option<&str>| touchpoint::store::Rating {
        message_id,
        customer_id: "c".into(),
        rule: "r".into(),
        scale: "csat".into(),
        score,
        comment: comment.map(str::to_string),
    };
    assert_eq!(store.rating(ids[0]).await.expect("read"), None);
    let first = store
        .record_rating(&rating(ids[0], 2, Some("slow")))
        .await
        .expect("record");
    assert_eq!(first.comment.as_deref(), Some("slow"));
    let event_id = touchpoint::store::Rating::event_id(ids[0]);
    let event = store.event(&event_id).await.expect("read").expect("rated");
    let changed = store
        .record_rating(&rating(ids[0], 4, None))
        .await
        .expect("record again");
    assert_eq!(
        (changed.score, changed.comment.as_deref()),
        (4, Some("slow"))
    );
    assert_eq!(store.rating(ids[0]).await.expect("read"), Some(changed));
    let after = store.event(&event_id).await.expect("read").expect("rated");
    assert_eq!(
        (after.kind.as_str(), after.customer_id.as_str()),
        ("rated", "c")
    );
    assert_eq!(
        after.occurred_at, event.occurred_at,
        "the first answer's time"
    );
    assert_eq!(
        after.data,
        serde_json::json!({ "score": 4, "scale": "csat", "rule": "r",
                            "message_id": ids[0], "comment": "slow" })
    );
    store
        .record_rating(&rating(ids[1], 4, None))
        .await
        .expect("record");
    let no_comment = store
        .event(&touchpoint::store::Rating::event_id(ids[1]))
        .await
        .expect("read")
        .expect("rated");
    assert_eq!(no_comment.data.get("comment"), None, "no comment, no key");
    assert_eq!(
        store.rating_counts().await.expect("counts"),
        vec![("r".to_string(), "csat".to_string(), 4, 2)]
    );
    // A message that does not exist cannot be rated (the foreign key refuses it).
    assert!(
        store
            .record_rating(&rating(ids[1] + 1000, 3, None))
            .await
            .is_err()
    );
}

on_both_backends!(ratings_keep_the_last_answer_and_the_comment);

// --- the experience report's reads -----------------------------------------------------------

async fn events_of_a_kind_and_sends_per_rule(backend: Backend) {
    let (_env, store) = open(backend).await;
    let now = Utc::now();
    store
        .upsert_customers(&[customer("f", "f@example.com", "F")])
        .await
        .expect("customer");
    let event = |id: &str, kind: &str, minutes: i64| Event {
        id: id.into(),
        customer_id: "f".into(),
        kind: kind.into(),
        occurred_at: now - TimeDelta::minutes(minutes),
        data: serde_json::json!({ "score": 4, "comment": "ok" }),
    };
    let events = [
        event("r-new", "rated", 1),
        event("r-mid", "rated", 5),
        event("r-old", "rated", 60),
        event("p", "purchase", 2),
    ];
    store.insert_events(&events).await.expect("events");
    let since = now - TimeDelta::minutes(10);
    let found = store
        .events_of_kind_since("rated", since)
        .await
        .expect("rated");
    let ids: Vec<&str> = found.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["r-mid", "r-new"], "oldest first, none before `since`");
    assert_eq!(found[0].data["comment"], "ok");

    let due = now - TimeDelta::seconds(1);
    let batch = [
        of_rule("a", "a:1", "f", due),
        of_rule("a", "a:2", "f", due),
        of_rule("b", "b:1", "f", due),
        of_rule("b", "b:2", "f", due),
    ];
    store.insert_messages(&batch).await.expect("insert");
    let claims = claim_all(&store, "one").await;
    let sent = Outcome::Sent {
        reply: "250 ok".into(),
    };
    // Both of a and one of b go out; the other b stays claimed.
    let first_b = claims.iter().position(|c| c.rule == "b");
    let going = claims
        .iter()
        .enumerate()
        .filter(|(i, c)| c.rule == "a" || Some(*i) == first_b);
    for (_, claim) in going {
        let to = delivery("f@example.com");
        assert!(
            store
                .begin_body_with(claim.id, &claim.token, &to, &content(), MARGIN)
                .await
                .expect("body")
        );
        assert!(
            store
                .finish(claim.id, &claim.token, &sent)
                .await
                .expect("finish")
        );
    }
    let per_rule = store.sent_per_rule(since).await.expect("sent");
    assert_eq!(per_rule, [("a".to_string(), 2), ("b".to_string(), 1)]);
    let later = store
        .sent_per_rule(now + TimeDelta::minutes(5))
        .await
        .expect("sent");
    assert!(later.is_empty(), "{later:?}");
}

on_both_backends!(events_of_a_kind_and_sends_per_rule);

// --- the owner's digest's reads --------------------------------------------------------------

async fn replies_waiting_and_messages_due_per_rule(backend: Backend) {
    let (_env, store) = open(backend).await;
    let now = Utc::now();
    store
        .upsert_customers(&[
            customer("g", "g@example.com", "G"),
            customer("h", "H@Example.com", "H"),
        ])
        .await
        .expect("customers");
    let replied = |id: &str, customer: &str, minutes: i64| Event {
        id: id.into(),
        customer_id: customer.into(),
        kind: "replied".into(),
        occurred_at: now - TimeDelta::minutes(minutes),
        data: serde_json::json!({ "snippet": id }),
    };
    let events = [
        replied("g-old", "g", 120),
        replied("g-new", "g", 30),
        replied("h-new", "h", 30),
    ];
    store.insert_events(&events).await.expect("events");
    let due = now - TimeDelta::seconds(1);
    let batch = [of_rule("a", "a:g", "g", due), of_rule("a", "a:h", "h", due)];
    store.insert_messages(&batch).await.expect("insert");
    // H is answered (her address, in other case); about G only the owner heard.
    for claim in claim_all(&store, "one").await {
        let to = if claim.customer_id == "h" {
            delivery("h@example.com")
        } else {
            delivery("owner@example.com")
        };
        assert!(
            store
                .begin_body_with(claim.id, &claim.token, &to, &content(), MARGIN)
                .await
                .expect("body")
        );
        let sent = Outcome::Sent {
            reply: "250 ok".into(),
        };
        assert!(
            store
                .finish(claim.id, &claim.token, &sent)
                .await
                .expect("finish")
        );
    }
    let waiting = store
        .replies_waiting(now - TimeDelta::minutes(60))
        .await
        .expect("waiting");
    let ids: Vec<&str> = waiting.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["g-new"], "none before `since`, none answered since");

    let future = [
        of_rule("c", "c:1", "g", now + TimeDelta::days(1)),
        of_rule("c", "c:2", "h", now + TimeDelta::days(3)),
        of_rule("d", "d:1", "g", now + TimeDelta::days(10)),
    ];
    store.insert_messages(&future).await.expect("insert");
    let due = store
        .due_per_rule(now + TimeDelta::days(7))
        .await
        .expect("due");
    assert_eq!(
        due,
        [("c".to_string(), 2)],
        "sent ones and later ones are not due"
    );
}

on_both_backends!(replies_waiting_and_messages_due_per_rule);

// --- planning pages (issue #14) ----------------------------------------------------------------

/// A page of `n` planned messages `p:{first}..`, due over the next hours, every other one with
/// an event; the page is larger than one statement of either backend.
fn page(first: usize, n: usize, now: DateTime<Utc>) -> Vec<NewMessage> {
    (first..first + n)
        .map(|i| NewMessage {
            event_id: (i % 2 == 0).then(|| format!("e{i}")),
            expires_at: Some(now + TimeDelta::days(3)),
            ..message(
                &format!("p:{i}"),
                &format!("c{}", i % 7),
                now + TimeDelta::minutes(i as i64),
            )
        })
        .collect()
}

async fn scheduled(store: &SharedStore) -> i64 {
    store
        .count_state(MessageState::Scheduled)
        .await
        .expect("count")
}

async fn a_page_is_planned_once(backend: Backend) {
    let (_env, store) = open(backend).await;
    let now = store_time(Utc::now() + TimeDelta::hours(1));
    let first = page(0, 6_000, now);
    assert_eq!(store.insert_messages(&first).await.expect("insert"), 6_000);
    assert_eq!(
        store.insert_messages(&first).await.expect("again"),
        0,
        "the same page twice plans nothing the second time"
    );
    assert_eq!(scheduled(&store).await, 6_000);
    // Half of this page exists: the rest is inserted, and counted.
    let overlapping = page(3_000, 6_000, now);
    assert_eq!(
        store.insert_messages(&overlapping).await.expect("overlap"),
        3_000
    );
    assert_eq!(scheduled(&store).await, 9_000);
    // A key twice in one page is one message (the first).
    let twice = [
        message("p:twice", "c1", now),
        message("p:twice", "c2", now + TimeDelta::hours(1)),
    ];
    assert_eq!(store.insert_messages(&twice).await.expect("twice"), 1);
    assert!(store.insert_messages(&[]).await.expect("empty") == 0);
    // Every column as planned, and ids in the page's order.
    let log = store
        .log(&LogFilter {
            due_before: Some(now + TimeDelta::days(30)),
            limit: Some(20_000),
            ..LogFilter::default()
        })
        .await
        .expect("log");
    assert_eq!(log.len(), 9_001);
    let mut rows: Vec<_> = log.iter().collect();
    rows.sort_by_key(|m| m.id);
    let head: Vec<(Option<&str>, &str)> = rows
        .iter()
        .take(3)
        .map(|m| (m.event_id.as_deref(), m.customer_id.as_str()))
        .collect();
    assert_eq!(head, [(Some("e0"), "c0"), (None, "c1"), (Some("e2"), "c2")]);
    let last = rows.last().expect("rows");
    assert_eq!(
        (last.customer_id.as_str(), last.due_at),
        ("c1", store_time(now)),
        "of a key twice in a page, the first is kept"
    );
    let e8 = log
        .iter()
        .find(|m| m.event_id.as_deref() == Some("e8998"))
        .expect("e8998");
    assert_eq!(e8.trigger_at, store_time(now + TimeDelta::minutes(8_998)));
    assert_eq!(e8.next_attempt_at, e8.due_at);
    assert_eq!(e8.state, MessageState::Scheduled);
    let detail = store.message_detail(e8.id).await.expect("detail");
    assert_eq!(detail, Some(serde_json::json!({ "n": "p:8998" })));
}

/// Times as both backends keep them (milliseconds on SQLite, microseconds on PostgreSQL: the
/// test's times are whole milliseconds).
fn store_time(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).expect("in range")
}

/// Schedules look up their messages by customer through a partial index (`event_id IS NULL`):
/// a customer with an occurrence still to come is no candidate, and the last one planned is
/// where the next starts.
async fn schedules_find_their_planned_occurrences(backend: Backend) {
    let (_env, store) = open(backend).await;
    store
        .upsert_customers(&[
            customer("a", "a@example.com", "A"),
            customer("b", "b@example.com", "B"),
            customer("c", "c@example.com", "C"),
        ])
        .await
        .expect("customers");
    let now = store_time(Utc::now());
    let weekly = |key: &str, who: &str, at: DateTime<Utc>| NewMessage {
        rule: "weekly".into(),
        ..message(key, who, at)
    };
    store
        .insert_messages(&[
            weekly("weekly:a:next", "a", now + TimeDelta::days(2)),
            weekly("weekly:b:last", "b", now - TimeDelta::days(5)),
        ])
        .await
        .expect("planned");
    let (customers_hi, _) = store.max_seqs().await.expect("seqs");
    let query = CandidateQuery {
        rule: "weekly".into(),
        source: CandidateSource::RecurringCustomers,
        after_seq: 0,
        up_to_seq: customers_hi,
        now,
        limit: 10,
        include_suppressed: false,
    };
    let found = store.candidates(&query).await.expect("candidates");
    let seen: Vec<(&str, Option<DateTime<Utc>>)> = found
        .iter()
        .map(|c| (c.customer.id.as_str(), c.last_trigger))
        .collect();
    assert_eq!(
        seen,
        [("b", Some(now - TimeDelta::days(5))), ("c", None)],
        "a has an occurrence to come"
    );
}

on_both_backends!(
    a_page_is_planned_once,
    schedules_find_their_planned_occurrences,
    a_run_of_plain_fences_judges_each_row
);
