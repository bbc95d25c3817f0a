//! The owner's page against strangers: parallel password guessing (memory and the limit of
//! five), forwarding headers from untrusted peers, DNS rebinding (the Host check), a listener
//! reachable from elsewhere without a password, `next=` after login, and logouts that hold
//! across restarts and replicas (on both backends).

mod support;
mod web_support;

use std::net::SocketAddr;

use support::{Backend, ChildDaemon, Sink, TestEnv, status_kib};
use web_support::*;

async fn env_with(backend: Backend, web: &str, extra: &str) -> TestEnv {
    TestEnv::new(
        backend,
        Sink::Files,
        &[("rules.toml", RULES)],
        &format!("{web}\n{extra}"),
    )
    .await
}

/// The login form's CSRF cookie (as a `Cookie` value) and token.
async fn login_form(addr: SocketAddr) -> (String, String) {
    let form = get(addr, "/login", &[]).await;
    assert_eq!(form.status, 200, "{}", form.text());
    let jar = format!("tp_csrf={}", form.cookie_value("tp_csrf").expect("tp_csrf"));
    let token = input_value(&form.text(), "csrf").expect("a CSRF field");
    (jar, token)
}

async fn attempt(
    addr: SocketAddr,
    (jar, token): &(String, String),
    password: &str,
    headers: &[(&str, &str)],
    next: &str,
) -> HttpResponse {
    let mut all = vec![("Cookie", jar.as_str())];
    all.extend_from_slice(headers);
    post_form(
        addr,
        "/login",
        &all,
        &[("csrf", token), ("password", password), ("next", next)],
    )
    .await
}

/// Logs in; the `Cookie` value with the session.
async fn log_in(addr: SocketAddr) -> String {
    let form = login_form(addr).await;
    let done = attempt(addr, &form, PASSWORD, &[], "/").await;
    assert_eq!(done.status, 303, "{}", done.text());
    format!(
        "tp_session={}",
        done.cookie_value("tp_session").expect("session")
    )
}

const MIB: u64 = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_parallel_wrong_passwords_get_five_checks_and_little_memory() {
    let hash = password_hash();
    let env = env_with(Backend::Sqlite, &web_config(Some(&hash)), "").await;
    let daemon = ChildDaemon::start(&env, "login-flood", "", &[]);
    daemon.ready().await;
    let addr = daemon.http;
    let form = login_form(addr).await;
    let peak_before = status_kib(daemon.pid(), "VmHWM");
    let attempts: Vec<_> = (0..100)
        .map(|_| {
            let form = form.clone();
            tokio::spawn(async move { attempt(addr, &form, "hunter2", &[], "/").await })
        })
        .collect();
    let mut wrong = 0;
    let mut limited = 0;
    for task in attempts {
        let response = task.await.expect("attempt");
        match response.status {
            401 => {
                assert!(response.text().contains("That password is not right."));
                wrong += 1;
            }
            429 => {
                assert!(response.header("retry-after").is_some());
                assert!(
                    response.text().contains("Too many wrong passwords"),
                    "{}",
                    response.text()
                );
                limited += 1;
            }
            other => panic!("{other}: {}", response.text()),
        }
    }
    assert_eq!((wrong, limited), (5, 95), "as many checks as five in a row");
    let peak_after = status_kib(daemon.pid(), "VmHWM");
    let rss = status_kib(daemon.pid(), "VmRSS");
    let grew = peak_after.saturating_sub(peak_before);
    assert!(
        grew <= 40 * MIB,
        "the peak resident memory grew by {} MiB (now {} MiB resident)",
        grew / MIB,
        rss / MIB
    );
    // The right password waits too, from this address.
    let right = attempt(addr, &form, PASSWORD, &[], "/").await;
    assert_eq!(right.status, 429);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_count_only_from_trusted_proxies() {
    let hash = password_hash();
    let env = env_with(Backend::Sqlite, &web_config(Some(&hash)), "").await;
    let daemon = env.start().await;
    let addr = daemon.http;
    let form = login_form(addr).await;
    // Every attempt names another client; nobody is trusted to say so: one address, five.
    for i in 0..5 {
        let client = format!("203.0.113.{i}");
        let response = attempt(addr, &form, "wrong", &[("X-Forwarded-For", &client)], "/").await;
        assert_eq!(response.status, 401);
    }
    let forwarded = "for=198.51.100.1";
    let response = attempt(addr, &form, PASSWORD, &[("Forwarded", forwarded)], "/").await;
    assert_eq!(response.status, 429, "{}", response.text());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_routes_refuse_other_host_names() {
    let env = env_with(
        Backend::Sqlite,
        &format!("{}allowed_hosts = [\"office-pc\"]\n", web_config(None)),
        "",
    )
    .await;
    let daemon = env.start().await;
    let addr = daemon.http;
    let port = addr.port();
    // A page on evil.example that rebinds its name to 127.0.0.1: refused, without a password.
    for path in ["/log.csv", "/", "/login", "/suppressions"] {
        let response = get(addr, path, &[("Host", &format!("evil.example:{port}"))]).await;
        assert_eq!(response.status, 421, "{path}");
        assert!(response.text().contains("web.allowed_hosts"), "{path}");
    }
    let refused = post_form(
        addr,
        "/suppressions",
        &[("Host", "evil.example")],
        &[("csrf", "x"), ("email", "x@example.com")],
    )
    .await;
    assert_eq!(refused.status, 421);
    // Its own names.
    for host in [
        addr.to_string(),
        format!("localhost:{port}"),
        "office-pc".to_string(),
    ] {
        let response = get(addr, "/log.csv", &[("Host", &host)]).await;
        assert_eq!(response.status, 200, "{host}: {}", response.text());
    }
    // The public routes answer to any name.
    let health = get(addr, "/healthz", &[("Host", "evil.example")]).await;
    assert_eq!(health.status, 200);
    let metrics = get(addr, "/metrics", &[("Host", "evil.example")]).await;
    assert_eq!(metrics.status, 200);
    let unknown_link = get(addr, "/u/not-a-token", &[("Host", "evil.example")]).await;
    assert_eq!(unknown_link.status, 404);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_password_a_listener_others_reach_serves_only_the_public_routes() {
    // links.base_url is public: a reverse proxy forwards visitors from anywhere, perhaps
    // without a forwarding header, so that they would look local.
    let env = env_with(
        Backend::Sqlite,
        &web_config(None),
        "[links]\nbase_url = \"https://mail.acme.example\"\n",
    )
    .await;
    let daemon = ChildDaemon::start(&env, "exposed", "", &[]);
    daemon.ready().await;
    let addr = daemon.http;
    for path in ["/", "/log.csv", "/login"] {
        let response = get(addr, path, &[]).await;
        assert_eq!(response.status, 403, "{path}");
        assert!(
            response.text().contains("touchpoint hash-password"),
            "{path}: {}",
            response.text()
        );
    }
    assert_eq!(get(addr, "/healthz", &[]).await.status, 200);
    assert_eq!(get(addr, "/metrics", &[]).await.status, 200);
    assert!(
        daemon.log().contains("the owner's page is OFF"),
        "{}",
        daemon.log()
    );
    daemon.stop().await;

    // On loopback only, but the proxy on this machine is named: its requests are never local.
    let env = env_with(
        Backend::Sqlite,
        &format!("{}trusted_proxies = [\"127.0.0.1\"]\n", web_config(None)),
        "",
    )
    .await;
    let daemon = env.start().await;
    let page = get(daemon.http, "/", &[]).await;
    assert_eq!(page.status, 403, "{}", page.text());
    assert!(page.text().contains("Not from here"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_login_next_stays_on_this_site() {
    let hash = password_hash();
    let env = env_with(Backend::Sqlite, &web_config(Some(&hash)), "").await;
    let daemon = env.start().await;
    let addr = daemon.http;
    let form = login_form(addr).await;
    for (next, expected) in [
        ("/upcoming", "/upcoming"),
        ("/\t/evil.example", "/"),
        ("/\\evil.example", "/"),
        ("/%2F%2Fevil.example", "/"),
        ("//evil.example", "/"),
        ("/log\r\nSet-Cookie: x=1", "/"),
    ] {
        let done = attempt(addr, &form, PASSWORD, &[], next).await;
        assert_eq!(done.status, 303, "{next:?}");
        assert_eq!(done.header("location"), Some(expected), "{next:?}");
    }
    daemon.stop().await;
}

/// A session logged out on one replica is refused by another at once, and by both after a
/// restart; a session that was not logged out lives on.
async fn logging_out_holds_across_replicas_and_restarts(backend: Backend) {
    let hash = password_hash();
    let env = env_with(backend, &web_config(Some(&hash)), "").await;
    let first = env.start().await;
    let second = env.start().await;
    let session = log_in(first.http).await;
    let kept = log_in(first.http).await;
    for daemon in [&first, &second] {
        let page = get(daemon.http, "/", &[("Cookie", &session)]).await;
        assert_eq!(page.status, 200, "{}", page.text());
    }
    let page = get(first.http, "/suppressions", &[("Cookie", &session)]).await;
    let token = input_value(&page.text(), "csrf").expect("csrf");
    let out = post_form(
        first.http,
        "/logout",
        &[("Cookie", &session)],
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(out.status, 303);
    let on_replica = get(second.http, "/", &[("Cookie", &session)]).await;
    assert_eq!(on_replica.status, 303, "the other replica still takes it");
    first.stop().await;
    second.stop().await;

    let restarted = env.start().await;
    let page = get(restarted.http, "/", &[("Cookie", &session)]).await;
    assert_eq!(page.status, 303, "a restart brought the session back");
    assert!(
        page.header("location")
            .unwrap_or_default()
            .starts_with("/login")
    );
    let page = get(restarted.http, "/", &[("Cookie", &kept)]).await;
    assert_eq!(
        page.status, 200,
        "the session that was not logged out ended"
    );
    restarted.stop().await;
}

on_both_backends!(logging_out_holds_across_replicas_and_restarts);
