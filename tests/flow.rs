//! The whole flow, end to end, on both backends: rules and events in, messages out over real
//! SMTP, and the log saying what happened.

mod support;

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use support::smtp::SmtpPeer;
use support::{Backend, Sink, TestEnv, eventually, states};

const THANK_YOU_SOON: &str = r#"
[[rule]]
name = "thank-you"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "2s" }
"#;

async fn a_purchase_is_thanked_once_over_smtp(backend: Backend) {
    let peer = SmtpPeer::start().await;
    let env = TestEnv::new(
        backend,
        Sink::Smtp(&peer),
        &[("thank-you.toml", THANK_YOU_SOON)],
        "",
    )
    .await;
    let store = env.store().await;
    env.add_customer(
        &store,
        "c1",
        "ada@example.com",
        "Ada Lovelace",
        Some("Europe/London"),
    )
    .await;
    env.add_event(&store, "order-1", "c1", "purchase", Utc::now())
        .await;

    let daemon = env.start().await;
    assert!(
        peer.wait_for_accepted(1, Duration::from_secs(15)).await,
        "the thank-you was not sent"
    );
    let accepted = &peer.accepted()[0];
    assert_eq!(accepted.rcpt_to, vec!["ada@example.com".to_string()]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            states(&store).await.get("sent") == Some(&1)
        })
        .await
    );
    let log = store.log(&Default::default()).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].state.to_string(), "sent");
    assert!(
        log[0]
            .smtp_reply
            .as_deref()
            .unwrap_or_default()
            .starts_with("250"),
        "{:?}",
        log[0].smtp_reply
    );
    assert_eq!(
        log[0]
            .message_id
            .as_deref()
            .map(|m| m.trim_matches(['<', '>'])),
        accepted.message_id.as_deref()
    );
    assert!(log[0].sent_at.unwrap() - log[0].due_at < TimeDelta::seconds(5));
    daemon.stop().await;

    // A restart plans again and sends nothing twice.
    let daemon = env.start().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    daemon.stop().await;
    assert_eq!(peer.accepted().len(), 1);
    assert!(
        eventually(Duration::from_secs(1), || async {
            states(&store).await.get("sent") == Some(&1)
        })
        .await
    );
}

on_both_backends!(a_purchase_is_thanked_once_over_smtp);
