//! Support for the web page's tests (`tests/web.rs`, `tests/browser.rs`): form helpers on top
//! of the HTTP client in `tests/support/http.rs`, and a database seeded with messages in every
//! state through the store's own API.
#![allow(dead_code)]

use std::net::SocketAddr;

use chrono::{TimeDelta, Utc};
use touchpoint::store::{
    CheckLine, Customer, Delivery, Event, NewMessage, Outcome, SentContent, SharedStore,
};

pub use crate::support::http::{HttpResponse, get, request};

/// POSTs a form (`application/x-www-form-urlencoded`).
pub async fn post_form(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    fields: &[(&str, &str)],
) -> HttpResponse {
    let body = form_body(fields);
    request(
        addr,
        "POST",
        path,
        headers,
        Some(("application/x-www-form-urlencoded", body.into_bytes())),
    )
    .await
}

pub fn form_body(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

pub fn encode(value: &str) -> String {
    touchpoint::links::encode_component(value)
}

/// The `value` of the first `<input name="NAME" value="...">` in a page, HTML entities decoded.
pub fn input_value(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')? + start;
    Some(unescape(&html[start..end]))
}

pub fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&#39;", "'")
        .replace("&#x3D;", "=")
        .replace("&#x60;", "`")
        .replace("&#x2F;", "/")
        .replace("&amp;", "&")
}

/// A password hash that is quick to check (the tests log in many times); the daemon reads its
/// cost from the PHC string, so the same code checks it.
pub const PASSWORD: &str = "correct horse battery staple";

pub fn password_hash() -> String {
    touchpoint::web::auth::hash_password(PASSWORD).expect("hash")
}

/// The rules the web tests run with: both planned far enough ahead that the daemon never sends
/// during a test, so every message is one the test made.
pub const RULES: &str = r#"
[[rule]]
name = "thank-you-after-purchase"
description = "Thank the customer for their order."
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "2d" }
expire_after = "30d"
track_opens = true
track_clicks = true

[[rule]]
name = "discovery-call-follow-up"
template = "follow-up"
subject = "As promised: next steps"
when = { event = "discovery_call", after = "3d" }
unless = [{ event = "purchase", since = "trigger" }]
expire_after = "30d"
"#;

/// What `seed` made, for the assertions.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub sent: Vec<i64>,
    pub failed: i64,
    pub skipped: i64,
    pub unknown: i64,
    /// Waiting, due in two days.
    pub upcoming: i64,
    /// Messages of the bulk rule (a rule no longer in the rules directory).
    pub bulk: Vec<i64>,
    pub evil_message: i64,
}

pub const EVIL_NAME: &str = "<script>alert('name')</script> & \"Eve\" <img src=x onerror=alert(1)>";

/// Customers, events, and messages in every final state (through the store's own claim and
/// finish, as the dispatcher would), with opens and clicks, plus `bulk` messages of a rule that
/// is gone, and one message still to come.
pub async fn seed(store: &SharedStore, bulk: usize) -> Seeded {
    let now = Utc::now();
    let customers = vec![
        customer("ada", "ada@example.com", "Ada Lovelace", "Europe/London"),
        customer(
            "grace",
            "grace@example.com",
            "Grace Hopper",
            "America/New_York",
        ),
        customer(
            "linus",
            "linus@example.com",
            "Linus Torvalds",
            "Europe/Helsinki",
        ),
        customer("evil", "eve@example.com", EVIL_NAME, "UTC"),
        customer("future", "future@example.com", "Fiona Future", "UTC"),
    ];
    let mut customers = customers;
    customers[3].attributes = serde_json::json!({ "note": "<b>bold</b> & <i>more</i>" });
    for i in 0..bulk {
        customers.push(customer(
            &format!("bulk{i:03}"),
            &format!("bulk{i:03}@example.com"),
            &format!("Bulk Customer {i:03}"),
            "UTC",
        ));
    }
    store.upsert_customers(&customers).await.expect("customers");
    let event = |id: &str, customer: &str, kind: &str, ago: TimeDelta| Event {
        id: id.into(),
        customer_id: customer.into(),
        kind: kind.into(),
        occurred_at: now - ago,
        data: serde_json::json!({ "order": format!("<order {id}>") }),
    };
    let events = vec![
        event("p-ada", "ada", "purchase", TimeDelta::days(3)),
        event("p-grace", "grace", "purchase", TimeDelta::days(4)),
        event("p-linus", "linus", "purchase", TimeDelta::days(5)),
        event("p-evil", "evil", "purchase", TimeDelta::days(3)),
        event("call-ada", "ada", "discovery_call", TimeDelta::days(6)),
        event("p-future", "future", "purchase", TimeDelta::hours(1)),
    ];
    store.insert_events(&events).await.expect("events");

    // (rule, customer, event, outcome)
    let thanks = "thank-you-after-purchase";
    let plans: Vec<(&str, &str, Option<&str>)> = vec![
        (thanks, "ada", Some("p-ada")),
        (thanks, "grace", Some("p-grace")),
        (thanks, "linus", Some("p-linus")),
        (thanks, "evil", Some("p-evil")),
        ("discovery-call-follow-up", "ada", Some("call-ada")),
    ];
    let mut messages: Vec<NewMessage> = plans
        .iter()
        .map(|(rule, customer, event)| NewMessage {
            rule: rule.to_string(),
            customer_id: customer.to_string(),
            event_id: event.map(str::to_string),
            dedupe_key: format!("{rule}:{}", event.unwrap_or(customer)),
            trigger_at: now - TimeDelta::minutes(10),
            due_at: now - TimeDelta::minutes(10),
            expires_at: Some(now + TimeDelta::days(1)),
            detail: serde_json::json!({}),
        })
        .collect();
    for i in 0..bulk {
        messages.push(NewMessage {
            rule: "monthly-newsletter".into(),
            customer_id: format!("bulk{i:03}"),
            event_id: None,
            dedupe_key: format!("monthly-newsletter:bulk{i:03}"),
            trigger_at: now - TimeDelta::minutes(20),
            due_at: now - TimeDelta::minutes(20),
            expires_at: None,
            detail: serde_json::json!({}),
        });
    }
    store.insert_messages(&messages).await.expect("messages");
    let mut sent = Vec::new();
    let mut bulk_ids = Vec::new();
    let (mut failed, mut skipped, mut unknown, mut evil_message) = (0, 0, 0, 0);
    loop {
        let claims = store
            .claim_due("web-test", 100, TimeDelta::minutes(5))
            .await
            .expect("claim");
        if claims.is_empty() {
            break;
        }
        for claim in claims {
            let customer = store
                .customer(&claim.customer_id)
                .await
                .expect("customer")
                .expect("the customer exists");
            let first = customer
                .name
                .clone()
                .unwrap_or_default()
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_string();
            let subject = if claim.rule == thanks {
                format!("Thank you for your order, {first}")
            } else if claim.rule == "monthly-newsletter" {
                "News from Acme Flowers".to_string()
            } else {
                "As promised: next steps".to_string()
            };
            let delivery = Delivery {
                email: customer.email.clone(),
                subject,
                message_id: format!("<{}.{}@acme.example>", claim.id, claim.rule),
            };
            let content = SentContent {
                text: format!("Hello {first},\n\nThank you! <not html> & more.\n"),
                html: format!(
                    "<html><body><p>Hello {},</p><p><a href=\"https://acme.example/shop\">Shop</a></p>\
                     <img src=\"http://127.0.0.1:1/o/pixel.gif\"></body></html>",
                    html_escape(&first)
                ),
                checks: vec![
                    CheckLine::passed(format!("{} is not on the suppression list", customer.email)),
                    CheckLine::passed("attempt 1"),
                ],
            };
            let outcome = match (claim.rule.as_str(), claim.customer_id.as_str()) {
                (_, "grace") => Outcome::Failed {
                    reply: Some("550 5.1.1 <grace@example.com>: no such user".into()),
                    reason: "the server refused the address".into(),
                },
                (_, "linus") => Outcome::Unknown {
                    reason: "the connection dropped after the body".into(),
                },
                ("discovery-call-follow-up", _) => Outcome::Skipped {
                    reason:
                        "unless: the customer had a \"purchase\" event since the triggering event"
                            .into(),
                },
                _ => Outcome::Sent {
                    reply: "250 2.0.0 Ok: queued as 4XYZ".into(),
                },
            };
            if !matches!(outcome, Outcome::Skipped { .. }) {
                assert!(
                    store
                        .begin_body_with(
                            claim.id,
                            &claim.token,
                            &delivery,
                            &content,
                            TimeDelta::seconds(1)
                        )
                        .await
                        .expect("begin body"),
                    "the claim is held"
                );
            }
            match &outcome {
                Outcome::Failed { .. } => failed = claim.id,
                Outcome::Skipped { .. } => skipped = claim.id,
                Outcome::Unknown { .. } => unknown = claim.id,
                _ if claim.rule == "monthly-newsletter" => bulk_ids.push(claim.id),
                _ => sent.push(claim.id),
            }
            if claim.customer_id == "evil" {
                evil_message = claim.id;
            }
            assert!(
                store
                    .finish(claim.id, &claim.token, &outcome)
                    .await
                    .expect("finish"),
                "the claim is held"
            );
        }
    }
    // What the recipients did.
    for id in &sent {
        store
            .add_message_event(*id, "opened", &serde_json::json!({}))
            .await
            .expect("open");
    }
    if let Some(first) = sent.first() {
        store
            .add_message_event(
                *first,
                "clicked",
                &serde_json::json!({ "url": "https://acme.example/shop?a=1&b=<2>" }),
            )
            .await
            .expect("click");
    }
    // One still to come.
    store
        .insert_messages(&[NewMessage {
            rule: thanks.into(),
            customer_id: "future".into(),
            event_id: Some("p-future".into()),
            dedupe_key: format!("{thanks}:p-future"),
            trigger_at: now + TimeDelta::days(2),
            due_at: now + TimeDelta::days(2),
            expires_at: Some(now + TimeDelta::days(30)),
            detail: serde_json::json!({}),
        }])
        .await
        .expect("future message");
    let upcoming = store
        .log(&touchpoint::store::LogFilter {
            customer_id: Some("future".into()),
            ..Default::default()
        })
        .await
        .expect("log")[0]
        .id;
    sent.sort();
    bulk_ids.sort();
    Seeded {
        sent,
        failed,
        skipped,
        unknown,
        upcoming,
        bulk: bulk_ids,
        evil_message,
    }
}

fn customer(id: &str, email: &str, name: &str, tz: &str) -> Customer {
    Customer {
        id: id.into(),
        email: email.into(),
        name: Some(name.into()),
        timezone: Some(tz.into()),
        attributes: serde_json::json!({}),
    }
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The `[web]` section for a config.
pub fn web_config(hash: Option<&str>) -> String {
    match hash {
        Some(hash) => format!("[web]\npassword_hash = \"{hash}\"\n"),
        None => "[web]\nenabled = true\n".into(),
    }
}

/// Times written the UTC way (`2026-11-23T09:00:00.123Z`, `09:00:00Z`, `09:00 UTC`) in a page.
pub fn utc_times(html: &str) -> Vec<String> {
    let bytes = html.as_bytes();
    let digit = |at: usize| bytes.get(at).is_some_and(u8::is_ascii_digit);
    let around = |i: usize| {
        String::from_utf8_lossy(&bytes[i.saturating_sub(16)..(i + 8).min(bytes.len())]).into_owned()
    };
    let mut found = Vec::new();
    for i in 3..bytes.len() {
        let iso =
            bytes[i] == b'T' && digit(i - 1) && digit(i + 1) && bytes.get(i + 3) == Some(&b':');
        let zulu = bytes[i] == b'Z' && digit(i - 1) && digit(i - 2) && bytes[i - 3] == b':';
        let utc = bytes[i..].starts_with(b" UTC") && digit(i - 1);
        if iso || zulu || utc {
            found.push(around(i));
        }
    }
    found
}

/// 03:10 tomorrow (a day or two from now) in `zone`: night for a customer there.
pub fn tomorrow_at_ten_past_three_in(zone: &str) -> chrono::DateTime<Utc> {
    let zone: chrono_tz::Tz = zone.parse().expect("a time zone");
    (Utc::now() + TimeDelta::days(1))
        .with_timezone(&zone)
        .date_naive()
        .and_hms_opt(3, 10, 0)
        .expect("a time")
        .and_local_timezone(zone)
        .single()
        .expect("03:10 exists once")
        .with_timezone(&Utc)
}
