//! Ratings in one click, end to end: the real daemon sends a thank-you asking "How did we do?"
//! to the test SMTP peer, the customer follows a link from the received mail over real HTTP,
//! the page posts the score, and the `rated` event drives a rule that tests its score, checked
//! again at send time. Bad input (forged links, a message never sent, a score out of range)
//! changes nothing. Both backends.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use chrono::Utc;
use mail_parser::MessageParser;
use support::http::{HttpResponse, get, send};
use support::smtp::SmtpPeer;
use support::{Backend, Sink, TestEnv};
use tokio::time::Instant;
use touchpoint::links::{Link, LinkSigner};
use touchpoint::store::{LogEntry, LogFilter, MessageState, Rating, SharedStore};

const PATIENCE: Duration = Duration::from_secs(30);
const BASE_URL: &str = "https://mail.acme.example/touchpoint";
const LINK_SECRET: &str = "c3d1f2a9b8e7d6c5b4a39281706f5e4d3c2b1a09";
const LINKS: &str = r#"
[links]
base_url = "https://mail.acme.example/touchpoint"
secret_file = "link-secret"
"#;

const RULES: &str = r#"
[[rule]]
name = "thanks"
template = "thanks"
subject = "Thank you, {{customer.first_name}}"
when = { event = "purchase", after = "1s" }
rating = { scale = "csat", question = "How did we do?" }

[[rule]]
name = "apology"
template = "apology"
subject = "We are sorry"
when = { event = "rated", after = "4s" }
only_if = [{ event_field = "score", at_most = 2 }]

[[rule]]
name = "later"
template = "thanks"
subject = "Later"
when = { event = "purchase", after = "30d" }
rating = { scale = "nps" }
"#;

const THANKS_HTML: &str =
    "<p>Thank you!</p>{{> rating}}<p>Or: <a href=\"{{rating_url 5}}\">great</a></p>";
const THANKS_TEXT: &str = "Thank you!\n\n{{> rating}}";
const APOLOGY_HTML: &str =
    "<p>Sorry: {{event.data.score}} of 5. {{default event.data.comment \"\"}}</p>";
const APOLOGY_TEXT: &str = "Sorry: {{event.data.score}} of 5. {{default event.data.comment \"\"}}";

struct World {
    peer: SmtpPeer,
    env: TestEnv,
    store: SharedStore,
    addr: SocketAddr,
    daemon: support::InProcess,
}

impl World {
    async fn new(backend: Backend) -> World {
        let peer = SmtpPeer::start().await;
        let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("r.toml", RULES)], LINKS).await;
        std::fs::write(env.path().join("link-secret"), LINK_SECRET).expect("secret");
        let templates = env.path().join("templates");
        for (name, text) in [
            ("thanks.html.hbs", THANKS_HTML),
            ("thanks.txt.hbs", THANKS_TEXT),
            ("apology.html.hbs", APOLOGY_HTML),
            ("apology.txt.hbs", APOLOGY_TEXT),
        ] {
            std::fs::write(templates.join(name), text).expect("template");
        }
        let store = env.store().await;
        let (ok, out, err) = env.run_cli(&["check"]);
        assert!(ok, "touchpoint check: {out}{err}");
        let daemon = env.start().await;
        World {
            addr: daemon.http,
            peer,
            env,
            store,
            daemon,
        }
    }

    async fn purchase(&self, customer: &str) {
        let email = format!("{customer}@example.com");
        self.env
            .add_customer(&self.store, customer, &email, customer, None)
            .await;
        let event = format!("{customer}-order");
        self.env
            .add_event(&self.store, &event, customer, "purchase", Utc::now())
            .await;
    }

    /// Waits for `rule`'s message of `event` to reach `state`.
    async fn wait(&self, rule: &str, event: &str, state: MessageState) -> LogEntry {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let log = self.store.log(&LogFilter::default()).await.expect("log");
            if let Some(entry) = log.iter().find(|e| {
                e.rule == rule && e.event_id.as_deref() == Some(event) && e.state == state
            }) {
                return entry.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {state} {rule} for {event}: {log:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text and HTML of the mail that went out as `entry`.
    fn mail(&self, entry: &LogEntry) -> (String, String) {
        let id = entry.message_id.clone().unwrap_or_default();
        let id = id.trim_matches(['<', '>']);
        let accepted = self
            .peer
            .accepted()
            .into_iter()
            .find(|a| a.message_id.as_deref() == Some(id))
            .expect("the peer has the message");
        let message = MessageParser::default()
            .parse(&accepted.data)
            .expect("parses");
        (
            message.body_text(0).expect("text").into_owned(),
            message.body_html(0).expect("html").into_owned(),
        )
    }

    async fn post(&self, url: &str, form: &str) -> HttpResponse {
        let form_type = ("Content-Type", "application/x-www-form-urlencoded");
        send(
            self.addr,
            "POST",
            &local(url),
            &[form_type],
            form.as_bytes(),
        )
        .await
    }

    async fn rating(&self, message: i64) -> Option<Rating> {
        self.store.rating(message).await.expect("rating")
    }
}

/// The daemon's path for a public link (what the reverse proxy forwards).
fn local(url: &str) -> String {
    url.strip_prefix(BASE_URL)
        .expect("under the base URL")
        .to_string()
}

/// The rating links of the text part, `score: url` per line, in order.
fn text_links(text: &str) -> Vec<(u8, String)> {
    text.lines()
        .filter_map(|line| {
            let (score, url) = line.split_once(": ")?;
            Some((score.parse().ok()?, url.trim().to_string()))
        })
        .collect()
}

on_both_backends!(
    a_rating_is_asked_answered_by_post_and_drives_a_rule,
    forged_unsent_and_out_of_range_ratings_change_nothing,
    preview_and_test_sends_have_rating_links_that_record_nothing,
);

async fn a_rating_is_asked_answered_by_post_and_drives_a_rule(backend: Backend) {
    let world = World::new(backend).await;
    world.purchase("ada").await;
    world.purchase("bob").await;
    let ada = world.wait("thanks", "ada-order", MessageState::Sent).await;
    let bob = world.wait("thanks", "bob-order", MessageState::Sent).await;

    // The mail has a link per score in both parts, and {{rating_url 5}} is the same as 5's.
    let (text, html) = world.mail(&ada);
    assert!(text.contains("How did we do?"), "{text}");
    let links = text_links(&text);
    assert_eq!(
        links.iter().map(|l| l.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5],
        "{text}"
    );
    for (_, url) in &links {
        assert!(html.contains(&format!("href=\"{url}\"")), "{html}");
    }
    assert_eq!(html.matches(&format!("href=\"{}\"", links[4].1)).count(), 2);

    // GET shows the choice and a form that posts it; it records nothing.
    let page = get(world.addr, &local(&links[0].1), &[]).await;
    assert_eq!(page.status, 200);
    let body = page.text();
    assert!(
        body.contains("You chose 1 of 5") && body.contains("method=\"post\""),
        "{body}"
    );
    assert!(body.contains("name=\"score\" value=\"1\""), "{body}");
    assert_eq!(world.rating(ada.id).await, None);

    // The page's POST records it, with the comment, as the message's rating and a rated event.
    let done = world
        .post(&links[0].1, "score=1&comment=Late+%26+cold")
        .await;
    assert_eq!(done.status, 200, "{}", done.text());
    assert!(
        done.text().contains("You chose 1 of 5 — thank you"),
        "{}",
        done.text()
    );
    assert!(done.text().contains("Late &amp; cold"), "{}", done.text());
    let rating = world.rating(ada.id).await.expect("recorded");
    assert_eq!(
        (rating.score, rating.comment.as_deref()),
        (1, Some("Late & cold"))
    );
    let event_id = Rating::event_id(ada.id);
    let event = world
        .store
        .event(&event_id)
        .await
        .expect("read")
        .expect("the rated event");
    assert_eq!(event.kind, "rated");
    assert_eq!(event.customer_id, "ada");
    assert_eq!(
        event.data,
        serde_json::json!({ "score": 1, "scale": "csat", "rule": "thanks",
                            "message_id": ada.id, "comment": "Late & cold" })
    );

    // Bob rates 2, then changes his mind to 5 before the apology is due: the last answer
    // counts, and the send-time check skips the apology.
    let bob_links = text_links(&world.mail(&bob).0);
    let posted = world.post(&bob_links[1].1, "score=2&comment=meh").await;
    assert_eq!(posted.status, 200);
    let bob_event = Rating::event_id(bob.id);
    world
        .wait("apology", &bob_event, MessageState::Scheduled)
        .await;
    let changed = world.post(&bob_links[1].1, "score=5").await;
    assert!(
        changed.text().contains("You chose 5 of 5"),
        "{}",
        changed.text()
    );
    let bob_rating = world.rating(bob.id).await.expect("recorded");
    assert_eq!(
        (bob_rating.score, bob_rating.comment.as_deref()),
        (5, Some("meh"))
    );
    let skipped = world
        .wait("apology", &bob_event, MessageState::Skipped)
        .await;
    assert!(
        skipped
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("triggering event no longer matches"),
        "{skipped:#?}"
    );
    // The kept check record explains it with the score the check saw.
    let kept = world.store.sent_content(skipped.id).await.expect("read");
    let checks: Vec<String> = kept
        .map(|c| c.checks)
        .unwrap_or_default()
        .into_iter()
        .map(|line| format!("{}: {}", line.verdict, line.text))
        .collect();
    assert!(
        checks.contains(&"failed: only if the triggering event's \"score\" is at most 2: not met (the event's is 5)".to_string()),
        "{checks:#?}"
    );

    // Ada's stays at 1: the apology goes out, with her score and comment.
    let apology = world.wait("apology", &event_id, MessageState::Sent).await;
    let (apology_text, _) = world.mail(&apology);
    assert!(
        apology_text.contains("Sorry: 1 of 5. Late & cold"),
        "{apology_text}"
    );

    // /metrics counts each rated message once, by its last answer.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let metrics = get(world.addr, "/metrics", &[]).await.text();
        let ada_line = "touchpoint_ratings_total{rule=\"thanks\",scale=\"csat\",score=\"1\"} 1";
        let bob_line = "touchpoint_ratings_total{rule=\"thanks\",scale=\"csat\",score=\"5\"} 1";
        if metrics.contains(ada_line) && metrics.contains(bob_line) {
            assert!(!metrics.contains("score=\"2\""), "{metrics}");
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    world.daemon.stop().await;
}

async fn forged_unsent_and_out_of_range_ratings_change_nothing(backend: Backend) {
    let world = World::new(backend).await;
    world.purchase("cy").await;
    let sent = world.wait("thanks", "cy-order", MessageState::Sent).await;
    let links = text_links(&world.mail(&sent).0);

    // A tampered token, or one signed with another secret, is a plain 404.
    let good = local(&links[3].1);
    let mut tampered = good.clone().into_bytes();
    let at = tampered.len() - 3;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    let foreign = LinkSigner::new(b"another secret", BASE_URL).url(&Link::Rating {
        message: sent.id,
        score: 4,
    });
    for path in [tampered, local(&foreign)] {
        assert_eq!(get(world.addr, &path, &[]).await.status, 404, "{path}");
        let form_type = ("Content-Type", "application/x-www-form-urlencoded");
        let posted = send(world.addr, "POST", &path, &[form_type], b"score=1").await;
        assert_eq!(posted.status, 404, "{path}");
    }

    // A rightly signed link of a message that was never sent (still waiting) is refused.
    let later = world
        .wait("later", "cy-order", MessageState::Scheduled)
        .await;
    let signer = LinkSigner::new(LINK_SECRET.as_bytes(), BASE_URL);
    let unsent = signer.url(&Link::Rating {
        message: later.id,
        score: 9,
    });
    let refused = world.post(&unsent, "score=9").await;
    assert_eq!(refused.status, 404);
    assert!(refused.text().contains("never sent"), "{}", refused.text());
    assert_eq!(world.rating(later.id).await, None);

    // A score outside the scale, in the form or in a signed link, is refused.
    for form in ["score=6", "score=0", "score=-1", "score=four"] {
        let answer = world.post(&links[3].1, form).await;
        assert_eq!(answer.status, 400, "{form}");
        assert!(answer.text().contains("from 1 to 5"), "{}", answer.text());
    }
    let eleven = signer.url(&Link::Rating {
        message: sent.id,
        score: 11,
    });
    assert_eq!(world.post(&eleven, "").await.status, 400);
    assert_eq!(world.rating(sent.id).await, None);
    assert_eq!(
        world
            .store
            .event(&Rating::event_id(sent.id))
            .await
            .expect("read"),
        None
    );

    // The real link still works after all that.
    assert_eq!(world.post(&links[3].1, "").await.status, 200);
    assert_eq!(world.rating(sent.id).await.map(|r| r.score), Some(4));

    // A 4 never becomes an apology, and `why` says which check and what it saw.
    let why = [
        "why",
        "--customer",
        "cy",
        "--rule",
        "apology",
        "--format",
        "json",
    ];
    let (ok, out, err) = world.env.run_cli(&why);
    assert!(ok, "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).expect("json");
    let answer = &answer[0];
    assert_eq!(answer["reason"], "only_if", "{answer}");
    assert_eq!(
        (answer["event_field"].as_bool(), answer["value"].as_i64()),
        (Some(true), Some(4))
    );
    let says = answer["says"].as_str().unwrap_or_default();
    assert!(
        says.contains(
            "only if the triggering event's \"score\" is at most 2, and the event's \"score\" is 4"
        ),
        "{answer}"
    );
    world.daemon.stop().await;
}

async fn preview_and_test_sends_have_rating_links_that_record_nothing(backend: Backend) {
    let world = World::new(backend).await;
    world
        .env
        .add_customer(&world.store, "di", "di@example.com", "Di", None)
        .await;
    world
        .env
        .add_event(&world.store, "di-order", "di", "purchase", Utc::now())
        .await;
    let preview = ["preview", "--rule", "thanks", "--customer", "di"];
    let (ok, out, err) = world.env.run_cli(&preview);
    assert!(ok, "{err}");
    assert!(out.contains("5: https://example.com/r/sample-5"), "{out}");

    let mut test_send = preview.to_vec();
    test_send.extend(["--send-to", "tester@example.org"]);
    let (ok, _, err) = world.env.run_cli(&test_send);
    assert!(ok, "{err}");
    let accepted = world
        .peer
        .accepted()
        .into_iter()
        .find(|a| a.rcpt_to.iter().any(|r| r == "tester@example.org"))
        .expect("the test send");
    let message = MessageParser::default()
        .parse(&accepted.data)
        .expect("parses");
    let links = text_links(&message.body_text(0).expect("text"));
    assert_eq!(links.len(), 5);
    let page = world.post(&links[0].1, "score=1").await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("This was a test"), "{}", page.text());
    assert!(
        world
            .store
            .rating_counts()
            .await
            .expect("counts")
            .is_empty()
    );
    world.daemon.stop().await;
}
