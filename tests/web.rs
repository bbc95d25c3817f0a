//! The owner's web page over HTTP: login, wrong passwords, missing and forged sessions, CSRF,
//! the rate limit on logins, loopback-only access without a password, escaping of customer
//! data, and every page's content against the database (on both backends).

mod support;
mod web_support;

use std::net::SocketAddr;

use support::{Backend, Sink, TestEnv};
use touchpoint::store::{LogFilter, MessageState};
use web_support::*;

async fn env_with(backend: Backend, hash: Option<&str>) -> TestEnv {
    TestEnv::new(
        backend,
        Sink::Files,
        &[("rules.toml", RULES)],
        &web_config(hash),
    )
    .await
}

/// Logs in; returns the `Cookie` header value that carries the session.
async fn log_in(addr: SocketAddr) -> String {
    let form = get(addr, "/login", &[]).await;
    assert_eq!(form.status, 200, "{}", form.text());
    let csrf_cookie = form
        .cookie_value("tp_csrf")
        .expect("the login form sets tp_csrf");
    let token = input_value(&form.text(), "csrf").expect("a CSRF field");
    let cookie = format!("tp_csrf={csrf_cookie}");
    let done = post_form(
        addr,
        "/login",
        &[("Cookie", &cookie)],
        &[("csrf", &token), ("password", PASSWORD), ("next", "/")],
    )
    .await;
    assert_eq!(done.status, 303, "{}", done.text());
    let session = done.cookie_value("tp_session").expect("a session cookie");
    format!("tp_session={session}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_sessions_and_csrf() {
    let hash = password_hash();
    let env = env_with(Backend::Sqlite, Some(&hash)).await;
    let daemon = env.start().await;
    let addr = daemon.http;

    // Nothing without a session, not even from loopback: a redirect to the login form.
    let page = get(addr, "/log?state=failed", &[]).await;
    assert_eq!(page.status, 303);
    assert_eq!(
        page.header("location"),
        Some("/login?next=%2Flog%3Fstate%3Dfailed")
    );
    for path in [
        "/",
        "/log.csv",
        "/messages/1",
        "/customers/ada",
        "/upcoming",
        "/suppressions",
    ] {
        let page = get(addr, path, &[]).await;
        assert_eq!(page.status, 303, "{path}");
        assert!(
            page.header("location").unwrap().starts_with("/login"),
            "{path}"
        );
    }

    // The login form: a CSRF cookie and token, no caching, no scripts, no framing.
    let form = get(addr, "/login?next=/upcoming", &[]).await;
    assert_eq!(form.status, 200);
    let csrf_cookie = form.set_cookie("tp_csrf").expect("tp_csrf cookie");
    assert!(
        csrf_cookie.contains("HttpOnly") && csrf_cookie.contains("SameSite=Lax"),
        "{csrf_cookie}"
    );
    let csp = form.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(form.header("cache-control"), Some("no-store"));
    assert!(!form.text().contains("<script"), "no JavaScript");
    let jar = format!("tp_csrf={}", form.cookie_value("tp_csrf").unwrap());
    let token = input_value(&form.text(), "csrf").unwrap();
    assert_eq!(
        input_value(&form.text(), "next").as_deref(),
        Some("/upcoming")
    );

    // A wrong password: 401, the form again, no session.
    let wrong = post_form(
        addr,
        "/login",
        &[("Cookie", &jar)],
        &[
            ("csrf", &token),
            ("password", "hunter2"),
            ("next", "/upcoming"),
        ],
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.text().contains("That password is not right."));
    assert!(wrong.set_cookie("tp_session").is_none());

    // The right password without the form's token (a login CSRF): refused.
    for (cookie, csrf) in [
        (jar.as_str(), "forged"),
        ("", token.as_str()),
        ("tp_csrf=other", token.as_str()),
    ] {
        let forged = post_form(
            addr,
            "/login",
            &[("Cookie", cookie)],
            &[("csrf", csrf), ("password", PASSWORD)],
        )
        .await;
        assert_eq!(forged.status, 403, "cookie {cookie:?}");
        assert!(forged.set_cookie("tp_session").is_none());
    }

    // The right password: a session cookie, HttpOnly and SameSite, not Secure over plain http,
    // and back where the owner wanted to go (never to another site).
    let done = post_form(
        addr,
        "/login",
        &[("Cookie", &jar)],
        &[
            ("csrf", &token),
            ("password", PASSWORD),
            ("next", "/upcoming"),
        ],
    )
    .await;
    assert_eq!(done.status, 303, "{}", done.text());
    assert_eq!(done.header("location"), Some("/upcoming"));
    let set = done.set_cookie("tp_session").unwrap();
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Lax"), "{set}");
    assert!(
        set.contains("Path=/") && set.contains("Max-Age=43200"),
        "{set}"
    );
    assert!(!set.contains("Secure"), "{set}");
    let session = format!("tp_session={}", done.cookie_value("tp_session").unwrap());
    let page = get(addr, "/", &[("Cookie", &session)]).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<h1>Overview</h1>"));

    // Behind a TLS proxy the cookie is Secure; `next` pointing elsewhere goes home instead.
    let done = post_form(
        addr,
        "/login",
        &[("Cookie", &jar), ("X-Forwarded-Proto", "https")],
        &[
            ("csrf", &token),
            ("password", PASSWORD),
            ("next", "//evil.example/"),
        ],
    )
    .await;
    assert_eq!(done.status, 303);
    assert_eq!(done.header("location"), Some("/"));
    assert!(done.set_cookie("tp_session").unwrap().contains("; Secure"));

    // Forged sessions: a changed expiry, a changed tag, a made-up value.
    let value = done.cookie_value("tp_session").unwrap();
    let parts: Vec<&str> = value.split('.').collect();
    let later = parts[1].parse::<i64>().unwrap() + 86_400 * 30;
    let forged = [
        format!("v1.{later}.{}.{}", parts[2], parts[3]),
        format!(
            "v1.{}.{}.{}",
            parts[1],
            parts[2],
            "A".repeat(parts[3].len())
        ),
        "v1.99999999999.abc.def".to_string(),
        "admin".to_string(),
    ];
    for value in &forged {
        let cookie = format!("tp_session={value}");
        let page = get(addr, "/", &[("Cookie", &cookie)]).await;
        assert_eq!(page.status, 303, "{value}");
        let post = post_form(
            addr,
            "/suppressions",
            &[("Cookie", &cookie)],
            &[("csrf", "x"), ("email", "forged@example.com")],
        )
        .await;
        assert_eq!(post.status, 403, "{value}");
    }

    // CSRF on the one form that changes something: no token, another session's token, a
    // made-up one: nothing changes. The page's own token works.
    let store = env.store().await;
    let other = log_in(addr).await;
    let other_page = get(addr, "/suppressions", &[("Cookie", &other)]).await;
    let other_token = input_value(&other_page.text(), "csrf").unwrap();
    for csrf in ["", "forged", other_token.as_str()] {
        let post = post_form(
            addr,
            "/suppressions",
            &[("Cookie", &session)],
            &[
                ("csrf", csrf),
                ("email", "csrf@example.com"),
                ("reason", "test"),
            ],
        )
        .await;
        assert_eq!(post.status, 403, "token {csrf:?}");
        assert!(post.text().contains("Nothing was changed"));
    }
    assert!(!store.is_suppressed("csrf@example.com").await.unwrap());
    let list = get(addr, "/suppressions", &[("Cookie", &session)]).await;
    let mine = input_value(&list.text(), "csrf").unwrap();
    let post = post_form(
        addr,
        "/suppressions",
        &[("Cookie", &session)],
        &[
            ("csrf", &mine),
            ("email", "csrf@example.com"),
            ("reason", "asked by phone"),
        ],
    )
    .await;
    assert_eq!(post.status, 303, "{}", post.text());
    assert!(store.is_suppressed("csrf@example.com").await.unwrap());
    let list = get(addr, "/suppressions", &[("Cookie", &session)]).await;
    assert!(list.text().contains("csrf@example.com") && list.text().contains("asked by phone"));
    // Not an address: shown, not stored.
    let bad = post_form(
        addr,
        "/suppressions",
        &[("Cookie", &session)],
        &[("csrf", &mine), ("email", "not an address")],
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("class=\"alert bad\""));
    // Removing takes the token too.
    let remove = post_form(
        addr,
        "/suppressions/remove",
        &[("Cookie", &session)],
        &[("csrf", "forged"), ("email", "csrf@example.com")],
    )
    .await;
    assert_eq!(remove.status, 403);
    assert!(store.is_suppressed("csrf@example.com").await.unwrap());
    let remove = post_form(
        addr,
        "/suppressions/remove",
        &[("Cookie", &session)],
        &[("csrf", &mine), ("email", "csrf@example.com")],
    )
    .await;
    assert_eq!(remove.status, 303);
    assert!(!store.is_suppressed("csrf@example.com").await.unwrap());

    // Logging out ends the session for good, even for someone who kept the cookie.
    let out = post_form(
        addr,
        "/logout",
        &[("Cookie", &session)],
        &[("csrf", "forged")],
    )
    .await;
    assert_eq!(out.status, 403);
    let out = post_form(addr, "/logout", &[("Cookie", &session)], &[("csrf", &mine)]).await;
    assert_eq!(out.status, 303);
    assert_eq!(out.header("location"), Some("/login"));
    assert!(out.set_cookie("tp_session").unwrap().contains("Max-Age=0"));
    assert_eq!(get(addr, "/", &[("Cookie", &session)]).await.status, 303);
    // The other session is untouched.
    assert_eq!(get(addr, "/", &[("Cookie", &other)]).await.status, 200);

    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_rate_limited_per_address() {
    let hash = password_hash();
    // The proxy in front (here, the test on loopback) is trusted to name the client.
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[("rules.toml", RULES)],
        &format!(
            "{}trusted_proxies = [\"127.0.0.1\"]\n",
            web_config(Some(&hash))
        ),
    )
    .await;
    let daemon = env.start().await;
    let addr = daemon.http;
    let form = get(addr, "/login", &[]).await;
    let jar = format!("tp_csrf={}", form.cookie_value("tp_csrf").unwrap());
    let token = input_value(&form.text(), "csrf").unwrap();
    let attempt = |password: &'static str, client: &'static str| {
        let jar = jar.clone();
        let token = token.clone();
        async move {
            post_form(
                addr,
                "/login",
                &[("Cookie", &jar), ("X-Forwarded-For", client)],
                &[("csrf", &token), ("password", password)],
            )
            .await
        }
    };
    for _ in 0..5 {
        assert_eq!(attempt("wrong", "203.0.113.5").await.status, 401);
    }
    // Now even the right password waits.
    let limited = attempt(PASSWORD, "203.0.113.5").await;
    assert_eq!(limited.status, 429);
    let wait: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!(wait > 0 && wait <= 900, "{wait}");
    assert!(limited.text().contains("Too many wrong passwords"));
    assert!(limited.set_cookie("tp_session").is_none());
    // Another address (as the proxy in front reports it) is not affected.
    let other = attempt(PASSWORD, "203.0.113.6").await;
    assert_eq!(other.status, 303);
    assert!(other.set_cookie("tp_session").is_some());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_password_only_this_machine_sees_the_page() {
    let env = env_with(Backend::Sqlite, None).await;
    let daemon = env.start().await;
    let addr = daemon.http;
    // A browser on this machine: the page, no login.
    let page = get(addr, "/", &[]).await;
    assert_eq!(page.status, 200, "{}", page.text());
    assert!(page.text().contains("<h1>Overview</h1>"));
    assert!(!page.text().contains("Log out"));
    let login = get(addr, "/login", &[]).await;
    assert_eq!(login.status, 303);
    // The same request through a proxy (the visitor may be anywhere): refused, with what to do.
    for header in ["X-Forwarded-For", "X-Real-IP", "Forwarded"] {
        let page = get(addr, "/", &[(header, "203.0.113.9")]).await;
        assert_eq!(page.status, 403, "{header}");
        assert!(page.text().contains("touchpoint hash-password"), "{header}");
        let login = get(addr, "/login", &[(header, "203.0.113.9")]).await;
        assert_eq!(login.status, 403, "{header}");
    }
    // The suppression form is still protected against cross-site posts: its token is tied to
    // the tp_csrf cookie this visitor got.
    let list = get(addr, "/suppressions", &[]).await;
    let cookie = format!("tp_csrf={}", list.cookie_value("tp_csrf").expect("tp_csrf"));
    let token = input_value(&list.text(), "csrf").unwrap();
    let store = env.store().await;
    let forged = post_form(
        addr,
        "/suppressions",
        &[],
        &[("csrf", &token), ("email", "x@example.com")],
    )
    .await;
    assert_eq!(forged.status, 403);
    let forged = post_form(
        addr,
        "/suppressions",
        &[("Cookie", "tp_csrf=mine")],
        &[("csrf", &token), ("email", "x@example.com")],
    )
    .await;
    assert_eq!(forged.status, 403);
    assert!(!store.is_suppressed("x@example.com").await.unwrap());
    let done = post_form(
        addr,
        "/suppressions",
        &[("Cookie", &cookie)],
        &[("csrf", &token), ("email", "x@example.com")],
    )
    .await;
    assert_eq!(done.status, 303);
    assert!(store.is_suppressed("x@example.com").await.unwrap());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_can_be_turned_off() {
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[("rules.toml", RULES)],
        "[web]\nenabled = false\n",
    )
    .await;
    let daemon = env.start().await;
    for path in ["/", "/log", "/login"] {
        assert_eq!(get(daemon.http, path, &[]).await.status, 404, "{path}");
    }
    assert_eq!(get(daemon.http, "/healthz", &[]).await.status, 200);
    daemon.stop().await;
}

/// Every page a customer's data appears on, with a name, attributes and event data full of
/// HTML: shown as text, never as markup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_data_is_escaped_everywhere() {
    let hash = password_hash();
    let env = env_with(Backend::Sqlite, Some(&hash)).await;
    let store = env.store().await;
    let seeded = seed(&store, 0).await;
    let daemon = env.start().await;
    let addr = daemon.http;
    let session = log_in(addr).await;
    let id = seeded.evil_message;
    let pages = [
        "/".to_string(),
        "/log".to_string(),
        "/log?q=eve".to_string(),
        format!("/messages/{id}"),
        "/customers/evil".to_string(),
        "/upcoming".to_string(),
    ];
    for path in &pages {
        let page = get(addr, path, &[("Cookie", &session)]).await;
        assert_eq!(page.status, 200, "{path}: {}", page.text());
        let html = page.text();
        assert!(!html.contains("<script"), "{path}: a raw <script> tag");
        assert!(!html.contains("<img src=x"), "{path}: a raw <img> tag");
        assert!(
            !html.contains("<b>bold</b>"),
            "{path}: raw markup from attributes"
        );
        assert!(
            !html.contains("<order "),
            "{path}: raw markup from event data"
        );
    }
    let message = get(addr, &format!("/messages/{id}"), &[("Cookie", &session)])
        .await
        .text();
    assert!(
        message.contains("&lt;script&gt;alert("),
        "the subject and name, as text"
    );
    let customer = get(addr, "/customers/evil", &[("Cookie", &session)])
        .await
        .text();
    assert!(
        customer.contains("&lt;b&gt;bold&lt;&#x2F;b&gt;")
            || customer.contains("&lt;b&gt;bold&lt;/b&gt;"),
        "{customer}"
    );
    assert!(customer.contains("&lt;order p-evil&gt;"));
    // The HTML body as sent is served on its own, sandboxed, with no remote images (the
    // tracking pixel does not count the owner's look as an open).
    let body = get(
        addr,
        &format!("/messages/{id}/body.html"),
        &[("Cookie", &session)],
    )
    .await;
    assert_eq!(body.status, 200);
    let csp = body.header("content-security-policy").unwrap();
    assert!(
        csp.starts_with("sandbox;") && csp.contains("img-src data:"),
        "{csp}"
    );
    assert!(
        body.text().contains("&lt;script&gt;"),
        "the body as the template escaped it"
    );
    daemon.stop().await;
}

/// Every page against what the database holds.
async fn pages_show_the_database(backend: Backend) {
    let hash = password_hash();
    let env = env_with(backend, Some(&hash)).await;
    let store = env.store().await;
    let seeded = seed(&store, 60).await;
    let daemon = env.start().await;
    let addr = daemon.http;
    let session = log_in(addr).await;
    let cookie = [("Cookie", session.as_str())];
    // Pages as a reader sees them (entities decoded); escaping has its own test.
    let page_text = |path: String| {
        let session = session.clone();
        async move { unescape(&get(addr, &path, &[("Cookie", &session)]).await.text()) }
    };

    // Overview: what needs attention first, then the numbers.
    let overview = page_text("/".to_string()).await;
    let attention = overview
        .find("Needs your attention")
        .expect("an attention section");
    assert!(attention < overview.find("Messages per day").unwrap());
    assert!(
        overview.contains("1 message may or may not have been delivered"),
        "{overview}"
    );
    assert!(
        overview.contains("1 message failed in the last 7 days."),
        "{overview}"
    );
    assert!(overview.contains("<svg class=\"chart\""));
    assert!(overview.contains("<rect class=\"sent\""));
    // The 7-day table's row for the thank-you rule: 1 sent (ada's; evil's too) ...
    let row = table_row(&overview, "thank-you-after-purchase");
    assert_eq!(row[..4], ["2", "1", "0", "1"], "{row:?}");
    assert!(
        row[4].starts_with('2') && row[5].starts_with('1'),
        "{row:?}"
    );
    let row = table_row(&overview, "monthly-newsletter");
    assert_eq!(row[0], "60", "{row:?}");

    // The log: history newest first, 50 a page, keyset links to older pages.
    let all = store
        .log(&LogFilter {
            history: true,
            ..LogFilter::default()
        })
        .await
        .unwrap();
    let first = page_text("/log".to_string()).await;
    let ids = message_ids(&first);
    assert_eq!(ids.len(), 50);
    assert_eq!(ids, all.iter().take(50).map(|e| e.id).collect::<Vec<_>>());
    let older = link_after(&first, "rel=\"next\"").expect("an Older link");
    assert_eq!(older, format!("/log?before={}", ids[49]));
    let second = page_text(older.clone()).await;
    assert_eq!(
        message_ids(&second),
        all.iter().skip(50).map(|e| e.id).collect::<Vec<_>>()
    );
    assert!(link_after(&second, "rel=\"next\"").is_none());

    // Filters: state, rule, customer by name, by email and by id, dates.
    let failed = page_text("/log?state=failed".to_string()).await;
    assert_eq!(message_ids(&failed), vec![seeded.failed]);
    let by_rule = page_text("/log?rule=thank-you-after-purchase".to_string()).await;
    let expected: Vec<i64> = all
        .iter()
        .filter(|e| e.rule == "thank-you-after-purchase")
        .map(|e| e.id)
        .collect();
    assert_eq!(message_ids(&by_rule), expected);
    for q in ["hopper", "GRACE@", "grace"] {
        let page = page_text(format!("/log?q={}", encode(q))).await;
        assert_eq!(message_ids(&page), vec![seeded.failed], "{q}");
    }
    let wildcard = page_text("/log?q=%25".to_string()).await;
    assert!(
        message_ids(&wildcard).is_empty(),
        "LIKE wildcards are literal"
    );
    let combined = page_text("/log?rule=monthly-newsletter&q=bulk00&state=sent".to_string()).await;
    assert_eq!(message_ids(&combined).len(), 10);
    let today = chrono::Utc::now().date_naive();
    let tomorrow = today.succ_opt().unwrap();
    let dated = page_text(format!("/log?from={today}&to={today}&state=sent")).await;
    assert_eq!(
        message_ids(&dated).len(),
        50,
        "60 + 2 sent today, first page"
    );
    let future = page_text(format!("/log?from={tomorrow}&state=scheduled")).await;
    assert_eq!(
        message_ids(&future),
        vec![seeded.upcoming],
        "only the message due in 2 days"
    );
    let history = page_text(format!("/log?from={tomorrow}")).await;
    assert!(
        message_ids(&history).is_empty(),
        "what waits is not history: {history}"
    );
    let bad = page_text("/log?state=lost&from=yesterday".to_string()).await;
    assert!(
        bad.contains("unknown state") && bad.contains("is not a date"),
        "{bad}"
    );

    // The CSV: every filtered row (not just a page), as `touchpoint log --format csv` has them.
    let csv = get(addr, "/log.csv?rule=monthly-newsletter", &cookie).await;
    assert_eq!(csv.status, 200);
    assert!(
        csv.header("content-disposition")
            .unwrap()
            .contains("attachment")
    );
    let mut reader = csv::Reader::from_reader(csv.body.as_slice());
    let headers: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    assert_eq!(headers, touchpoint::query::LOG_HEADERS);
    let rows: Vec<Vec<String>> = reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect();
    let bulk: Vec<_> = store
        .log(&LogFilter {
            rule: Some("monthly-newsletter".into()),
            ..LogFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 60);
    for (row, entry) in rows.iter().zip(&bulk) {
        assert_eq!(row, &touchpoint::query::log_row(entry).to_vec());
    }

    // One message: as sent, its history with SMTP replies, opens and clicks, and why.
    let sent_id = seeded.sent[0];
    let page = page_text(format!("/messages/{sent_id}")).await;
    assert!(page.contains("Thank you for your order, Ada"), "{page}");
    assert!(page.contains("250 2.0.0 Ok: queued as 4XYZ"));
    assert!(page.contains("Hello Ada,"), "the text body as sent");
    assert!(page.contains(&format!("src=\"/messages/{sent_id}/body.html\"")));
    assert!(page.contains("Checked just before sending"));
    assert!(page.contains("ada@example.com is not on the suppression list"));
    assert!(page.contains("2d after a \"purchase\" event"), "{page}");
    assert!(page.contains("p-ada"), "the triggering event");
    assert!(
        page.contains("https://acme.example/shop?a=1&b=<2>"),
        "the click"
    );
    let failed_page = page_text(format!("/messages/{}", seeded.failed)).await;
    assert!(failed_page.contains("550 5.1.1 <grace@example.com>: no such user"));
    assert!(failed_page.contains("the server refused the address"));
    let skipped_page = page_text(format!("/messages/{}", seeded.skipped)).await;
    assert!(skipped_page.contains("The rule's conditions"));
    assert!(
        skipped_page
            .contains("unless the customer had a \"purchase\" event after the triggering one")
    );
    let gone = page_text(format!("/messages/{}", seeded.bulk[0])).await;
    assert!(gone.contains("is no longer in the rules directory"));
    assert_eq!(get(addr, "/messages/999999", &cookie).await.status, 404);
    assert_eq!(get(addr, "/messages/abc", &cookie).await.status, 404);

    // One customer: events, messages, opens, clicks, suppression in one timeline.
    let ada = page_text("/customers/ada".to_string()).await;
    for what in [
        "purchase (event p-ada)",
        "discovery_call (event call-ada)",
        "sent: message",
        "opened: message",
        "clicked https://acme.example/shop",
        "skipped: message",
    ] {
        assert!(ada.contains(what), "{what}: {ada}");
    }
    store
        .suppress("ada@example.com", "asked by phone", "operator")
        .await
        .unwrap();
    let ada = page_text("/customers/ada".to_string()).await;
    assert!(ada.contains("on the suppression list") && ada.contains("asked by phone"));
    assert_eq!(get(addr, "/customers/nobody", &cookie).await.status, 404);

    // Upcoming: what `touchpoint plan` says.
    let upcoming = page_text("/upcoming".to_string()).await;
    assert!(
        upcoming.contains(&format!("/messages/{}", seeded.upcoming)),
        "{upcoming}"
    );
    assert!(upcoming.contains("future@example.com"));
    let waiting = store
        .log(&LogFilter {
            state: Some(MessageState::Scheduled),
            ..LogFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(waiting.len(), 1);

    daemon.stop().await;
}

on_both_backends!(pages_show_the_database);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_password_reads_standard_input_and_check_validates_the_hash() {
    use std::io::Write as _;
    use std::process::Stdio;
    let env = env_with(Backend::Sqlite, None).await;
    let mut child = env
        .command()
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(touchpoint::web::auth::verify_password(&hash, PASSWORD));
    // Never from the command line.
    let (ok, _, stderr) = env.run_cli(&["hash-password", PASSWORD]);
    assert!(!ok && stderr.contains("unexpected argument"), "{stderr}");
    // An empty password is refused.
    let out = env
        .command()
        .arg("hash-password")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    // `check` says what is wrong with a bad hash.
    let bad = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[("rules.toml", RULES)],
        "[web]\npassword_hash = \"hunter2\"\n",
    )
    .await;
    let (ok, _, stderr) = bad.run_cli(&["check"]);
    assert!(!ok && stderr.contains("web.password_hash"), "{stderr}");
    let good = env_with(Backend::Sqlite, Some(&hash)).await;
    let (ok, stdout, stderr) = good.run_cli(&["check"]);
    assert!(ok, "{stdout}{stderr}");
}

/// The ids of the messages a log page lists, in order.
fn message_ids(html: &str) -> Vec<i64> {
    let body = html.split("<tbody>").nth(1).unwrap_or_default();
    let body = body.split("</tbody>").next().unwrap_or_default();
    body.split("<tr>")
        .filter_map(|row| {
            let start = row.find("<a href=\"/messages/")? + "<a href=\"/messages/".len();
            let end = row[start..].find('"')? + start;
            row[start..end].parse().ok()
        })
        .collect()
}

/// The `href` of the first link whose tag contains `marker`.
fn link_after(html: &str, marker: &str) -> Option<String> {
    let at = html.find(marker)?;
    let tag_start = html[..at].rfind("<a ")?;
    let href = html[tag_start..].find("href=\"")? + tag_start + 6;
    let end = html[href..].find('"')? + href;
    Some(unescape(&html[href..end]))
}

/// The cells after the rule's name in the first table row for it (the 7-day table), as text.
fn table_row(html: &str, rule: &str) -> Vec<String> {
    let marker = format!(">{rule}</a></th>");
    let at = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no row for {rule}"));
    let row = &html[at..];
    let row = &row[..row.find("</tr>").unwrap()];
    row.split("<td")
        .skip(1)
        .map(|cell| strip_tags(&cell[cell.find('>').map_or(0, |i| i + 1)..]))
        .collect()
}

/// The log's filters as the page uses them (customer search, dates, rule, state, keyset pages)
/// against a plain scan, with enough customers and messages that SQLite takes each of its
/// access paths (few or many matching customers, a narrow or a wide date range).
async fn log_filters_agree_with_a_plain_scan(backend: Backend) {
    use chrono::{TimeDelta, TimeZone, Utc};
    use touchpoint::store::{Customer, NewMessage};
    let env = env_with(backend, None).await;
    let store = env.store().await;
    let customers: Vec<Customer> = (0..600)
        .map(|i| Customer {
            id: format!("wide{i:04}"),
            email: format!("wide{i}@example.org"),
            name: Some(format!("Wide Person {i}")),
            timezone: None,
            attributes: serde_json::json!({}),
        })
        .collect();
    store.upsert_customers(&customers).await.unwrap();
    let base = Utc.with_ymd_and_hms(2025, 3, 1, 0, 0, 0).unwrap();
    let messages: Vec<NewMessage> = (0..5200)
        .map(|i| NewMessage {
            rule: if i % 2 == 0 { "r-a" } else { "r-b" }.into(),
            customer_id: format!("wide{:04}", i % 600),
            event_id: None,
            dedupe_key: format!("k{i}"),
            trigger_at: base + TimeDelta::minutes(i),
            due_at: base + TimeDelta::minutes(i),
            expires_at: None,
            detail: serde_json::json!({}),
        })
        .collect();
    store.insert_messages(&messages).await.unwrap();
    let all = store.log(&LogFilter::default()).await.unwrap();
    assert_eq!(all.len(), 5200);
    let names: std::collections::HashMap<String, (String, String)> = customers
        .iter()
        .map(|c| {
            (
                c.id.clone(),
                (c.name.clone().unwrap().to_lowercase(), c.email.clone()),
            )
        })
        .collect();
    let day = |d: u32| Utc.with_ymd_and_hms(2025, 3, d, 0, 0, 0).unwrap();
    let searches = [
        None,
        Some("wide"),
        Some("person 12"),
        Some("WIDE0007"),
        Some("nobody"),
    ];
    let ranges = [
        (None, None),
        (Some(day(2)), Some(day(3))),
        (Some(day(1)), None),
        (None, Some(day(2))),
    ];
    let rules = [None, Some("r-b")];
    for search in searches {
        for (from, until) in ranges {
            for rule in rules {
                let expected: Vec<i64> = all
                    .iter()
                    .filter(|e| rule.is_none_or(|r| e.rule == r))
                    .filter(|e| {
                        search.is_none_or(|q| {
                            let (name, email) = &names[&e.customer_id];
                            let q = q.to_lowercase();
                            e.customer_id == search.unwrap()
                                || name.contains(&q)
                                || email.contains(&q)
                        })
                    })
                    .filter(|e| {
                        let when = e.dated_at();
                        from.is_none_or(|f| when >= f) && until.is_none_or(|u| when < u)
                    })
                    .map(|e| e.id)
                    .collect();
                // Page through it 50 at a time, as the page does.
                let mut got = Vec::new();
                let mut before: Option<touchpoint::store::LogCursor> = None;
                loop {
                    let page = store
                        .log(&LogFilter {
                            rule: rule.map(str::to_string),
                            customer_search: search.map(str::to_string),
                            from,
                            until,
                            before,
                            limit: Some(50),
                            ..LogFilter::default()
                        })
                        .await
                        .unwrap();
                    got.extend(page.iter().map(|e| e.id));
                    match page.last() {
                        Some(last) if page.len() == 50 => {
                            before = Some(touchpoint::store::LogCursor::after(last))
                        }
                        _ => break,
                    }
                }
                assert_eq!(
                    got, expected,
                    "search {search:?}, from {from:?}, until {until:?}, rule {rule:?}"
                );
            }
        }
    }
}

on_both_backends!(log_filters_agree_with_a_plain_scan);

/// The page's zone for the tests that look at dates: west of Greenwich, so a UTC date and a
/// local one differ every evening.
const NEW_YORK: &str = "[defaults]\ntimezone = \"America/New_York\"\n";

/// The number a cell of the overview shows, and the link behind it.
fn linked_number(cell_html: &str) -> (i64, Option<String>) {
    let number: String = strip_tags(cell_html)
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let link = cell_html.find("href=\"").map(|at| {
        let start = at + 6;
        let end = cell_html[start..].find('"').unwrap() + start;
        unescape(&cell_html[start..end])
    });
    (number.parse().unwrap_or(0), link)
}

fn strip_tags(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.trim().to_string()
}

/// Every (number, link) in the overview's two tables, rows and totals.
fn overview_cells(html: &str) -> Vec<(i64, Option<String>)> {
    let mut cells = Vec::new();
    for table in html.split("<table class=\"numbers\">").skip(1) {
        let table = &table[..table.find("</table>").unwrap()];
        for cell in table.split("<td").skip(1) {
            let cell = &cell[cell.find('>').unwrap() + 1..];
            let cell = &cell[..cell.find("</td>").unwrap()];
            cells.push(linked_number(cell));
        }
    }
    cells
}

/// Each log row's "When" (`2026-11-23 09:00 EST`), in order.
fn when_cells(html: &str) -> Vec<String> {
    let body = html.split("<tbody>").nth(1).unwrap_or_default();
    let body = body.split("</tbody>").next().unwrap_or_default();
    body.split("<tr>")
        .skip(1)
        .filter_map(|row| {
            let at = row.find("class=\"inline nowrap\">")? + "class=\"inline nowrap\">".len();
            Some(row[at..at + 20].trim().to_string())
        })
        .collect()
}

/// Every number on the overview that links to the log equals the number of messages behind
/// the link, counted by the page ("N messages") and row by row, and every row it lists is
/// dated inside the range it claims. Messages end long after they were due: a follow-up due
/// ten days ago and skipped two days ago, a failure due three days ago that failed nine days
/// ago.
async fn overview_numbers_match_the_lists_behind_them(backend: Backend) {
    use chrono::{SecondsFormat, TimeDelta, Utc};
    let hash = password_hash();
    let env = TestEnv::new(
        backend,
        Sink::Files,
        &[("rules.toml", RULES)],
        &format!("{}{NEW_YORK}", web_config(Some(&hash))),
    )
    .await;
    let store = env.store().await;
    let seeded = seed(&store, 3).await;
    let now = Utc::now();
    let at =
        |t: chrono::DateTime<Utc>| format!("'{}'", t.to_rfc3339_opts(SecondsFormat::Millis, true));
    for (id, set) in [
        (
            seeded.skipped,
            format!(
                "due_at = {0}, next_attempt_at = {0}, updated_at = {1}",
                at(now - TimeDelta::days(10)),
                at(now - TimeDelta::days(2))
            ),
        ),
        (
            seeded.failed,
            format!(
                "due_at = {}, updated_at = {}",
                at(now - TimeDelta::days(3)),
                at(now - TimeDelta::days(9))
            ),
        ),
        (
            seeded.sent[0],
            format!(
                "due_at = {}, sent_at = {1}, updated_at = {1}",
                at(now - TimeDelta::days(40)),
                at(now - TimeDelta::days(6) - TimeDelta::hours(20))
            ),
        ),
    ] {
        env.execute_sql(&format!("UPDATE messages SET {set} WHERE id = {id}"))
            .await;
    }
    let daemon = env.start().await;
    let addr = daemon.http;
    let session = log_in(addr).await;
    let page = |path: String| {
        let session = session.clone();
        async move { get(addr, &path, &[("Cookie", &session)]).await.text() }
    };
    let overview = page("/".to_string()).await;
    let cells = overview_cells(&overview);
    let linked: Vec<_> = cells
        .iter()
        .filter_map(|(n, link)| Some((*n, link.clone()?)))
        .filter(|(_, link)| link.contains("from="))
        .collect();
    assert!(linked.len() >= 10, "{cells:?}");
    assert!(
        linked
            .iter()
            .any(|(n, link)| *n > 0 && link.contains("state=skipped")),
        "{linked:?}"
    );
    for (number, link) in linked {
        let from = link
            .split("from=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap()
            .to_string();
        let mut next = Some(link.clone());
        let mut listed = 0;
        let mut first = true;
        while let Some(path) = next {
            let html = page(path).await;
            if first {
                let count = format!(">{number} message{}<", if number == 1 { "" } else { "s" });
                assert!(
                    html.contains(&count),
                    "{link}: the page says {count}: {html}"
                );
                first = false;
            }
            for when in when_cells(&html) {
                assert!(when[..10] >= *from, "{link}: a row dated {when}");
                assert!(when.ends_with("EST") || when.ends_with("EDT"), "{when}");
            }
            listed += message_ids(&html).len() as i64;
            next = link_after(&html, "rel=\"next\"");
        }
        assert_eq!(listed, number, "{link}");
    }
    daemon.stop().await;
}

on_both_backends!(overview_numbers_match_the_lists_behind_them);

/// The dispatcher keeps what it sent (bodies exactly as they went out, and its checks), and the
/// message page shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_keeps_what_it_sent() {
    const NOW_RULE: &str = r#"
[[rule]]
name = "thank-you-now"
template = "thank-you"
subject = "Thank you for your order, {{customer.first_name}}"
when = { event = "purchase", after = "0s" }
track_opens = true
"#;
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[("rules.toml", NOW_RULE)],
        &web_config(None),
    )
    .await;
    let store = env.store().await;
    env.add_customer(&store, "ada", "ada@example.com", "Ada <Lovelace>", None)
        .await;
    env.add_event(&store, "p1", "ada", "purchase", chrono::Utc::now())
        .await;
    let daemon = env.start().await;
    let sent = support::eventually(std::time::Duration::from_secs(20), || async {
        support::states(&store).await.get("sent") == Some(&1)
    })
    .await;
    assert!(sent, "{:?}", support::states(&store).await);
    let entry = store.log(&LogFilter::default()).await.unwrap().remove(0);
    let content = store.sent_content(entry.id).await.unwrap().expect("kept");
    assert!(content.text.starts_with("Hi Ada,"), "{}", content.text);
    assert!(
        content.html.contains("Ada") && content.html.contains("</p>"),
        "{}",
        content.html
    );
    assert!(
        content
            .checks
            .iter()
            .any(|c| c.text == "the rule \"thank-you-now\" is enabled" && c.verdict == "passed"),
        "{:?}",
        content.checks
    );
    assert!(
        content
            .checks
            .iter()
            .any(|c| c.text.contains("\"purchase\" event \"p1\" still exists"))
    );
    // The .eml the transport wrote carries the same text.
    let outbox = env.path().join("outbox");
    let eml = std::fs::read_dir(&outbox)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .next()
        .expect("an .eml file");
    let first_line = content.text.lines().nth(2).unwrap();
    assert!(
        eml.replace("=\r\n", "").contains(&first_line[..20]),
        "{first_line:?} in {eml}"
    );
    let page = get(daemon.http, &format!("/messages/{}", entry.id), &[]).await;
    let page = unescape(&page.text());
    assert!(page.contains("Checked just before sending"), "{page}");
    assert!(page.contains("the address is not on the suppression list"));
    assert!(page.contains(content.text.lines().next().unwrap()));
    daemon.stop().await;
}

/// Everything on the page is in the page's zone (New York), named once, and a plain date
/// (a wedding imported as 2019-11-12) is that date in every view, never the evening before:
/// the customer's timeline, the message page, Upcoming's "why". Upcoming names customers and
/// flags a message of a rule without a send window that reaches its customer at night.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn times_are_in_the_page_zone_and_plain_dates_are_dates() {
    use chrono::{TimeDelta, TimeZone, Timelike, Utc};
    use touchpoint::store::{Customer, Event, NewMessage, Outcome};
    let hash = password_hash();
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[("rules.toml", RULES)],
        &format!("{}{NEW_YORK}", web_config(Some(&hash))),
    )
    .await;
    let store = env.store().await;
    let person = |id: &str, name: &str, tz: &str| Customer {
        id: id.into(),
        email: format!("{id}@example.com"),
        name: Some(name.into()),
        timezone: Some(tz.into()),
        attributes: serde_json::json!({}),
    };
    store
        .upsert_customers(&[
            person("kenji", "Kenji Sato", "Asia/Tokyo"),
            person("lou", "Lou Reed", "America/Los_Angeles"),
        ])
        .await
        .unwrap();
    let wedding = Utc.with_ymd_and_hms(2019, 11, 12, 0, 0, 0).unwrap();
    store
        .insert_events(&[Event {
            id: "w-kenji".into(),
            customer_id: "kenji".into(),
            kind: "wedding".into(),
            occurred_at: wedding,
            data: serde_json::json!({ "on": "2019-11-12T00:00:00Z" }),
        }])
        .await
        .unwrap();
    // Due at 03:10 in Tokyo, a day or two from now; and one for Lou, retried later.
    let night = tomorrow_at_ten_past_three_in("Asia/Tokyo");
    let due_soon = Utc::now() - TimeDelta::minutes(1);
    let new = |customer: &str, event: Option<&str>, due| NewMessage {
        rule: "thank-you-after-purchase".into(),
        customer_id: customer.into(),
        event_id: event.map(str::to_string),
        dedupe_key: format!("k-{customer}"),
        trigger_at: due,
        due_at: due,
        expires_at: None,
        detail: serde_json::json!({}),
    };
    store
        .insert_messages(&[new("lou", None, due_soon)])
        .await
        .unwrap();
    let retry_at = Utc::now() + TimeDelta::days(2);
    let claim = store
        .claim_due("t", 10, TimeDelta::minutes(5))
        .await
        .unwrap()
        .pop()
        .expect("lou's message");
    assert!(
        store
            .finish(
                claim.id,
                &claim.token,
                &Outcome::Retry {
                    at: retry_at,
                    reply: "451 4.3.0 try later".into()
                }
            )
            .await
            .unwrap()
    );
    store
        .insert_messages(&[new("kenji", Some("w-kenji"), night)])
        .await
        .unwrap();
    let kenji_message = store
        .log(&LogFilter {
            customer_id: Some("kenji".into()),
            ..LogFilter::default()
        })
        .await
        .unwrap()[0]
        .id;
    let daemon = env.start().await;
    let addr = daemon.http;
    let session = log_in(addr).await;
    let page = |path: String| {
        let session = session.clone();
        async move { unescape(&get(addr, &path, &[("Cookie", &session)]).await.text()) }
    };
    assert_eq!(utc_times("at 2026-12-05T09:40:02.123Z.").len(), 1);
    assert_eq!(utc_times("at 09:40:02Z, 09:40 UTC").len(), 2);
    let evening_before = "2019-11-11";
    let timeline = page("/customers/kenji".to_string()).await;
    assert!(timeline.contains("2019-11-12"), "{timeline}");
    assert!(!timeline.contains(evening_before), "{timeline}");
    let message = page(format!("/messages/{kenji_message}")).await;
    assert!(message.contains("2019-11-12"), "{message}");
    assert!(!message.contains(evening_before), "{message}");
    let upcoming = page("/upcoming".to_string()).await;
    assert!(
        upcoming.contains("wedding w-kenji (2019-11-12)"),
        "{upcoming}"
    );
    assert!(upcoming.contains("Kenji Sato") && upcoming.contains("Lou Reed"));
    assert!(
        upcoming.contains("arrives at 03:10 in Asia/Tokyo"),
        "{upcoming}"
    );
    // Lou's retry goes out in the afternoon or evening in Los Angeles or not: flagged only
    // when it is night there.
    let lou_hour = retry_at
        .with_timezone(&chrono_tz::America::Los_Angeles)
        .hour();
    assert_eq!(
        upcoming.contains("in America/Los_Angeles"),
        !(8..21).contains(&lou_hour),
        "{upcoming}"
    );
    let retried = page(format!("/messages/{}", claim.id)).await;
    for (what, html) in [
        ("timeline", &timeline),
        ("message", &message),
        ("upcoming", &upcoming),
        ("retried", &retried),
    ] {
        let utc = utc_times(html);
        assert!(utc.is_empty(), "{what}: times in UTC {utc:?}");
    }
    let shown = retry_at
        .with_timezone(&chrono_tz::America::New_York)
        .format("%Y-%m-%d %H:%M")
        .to_string();
    assert!(
        retried.contains(&shown),
        "the retry time in New York: {retried}"
    );
    daemon.stop().await;
}

/// A message that did not go out shows what it would have said (rendered as the dispatcher
/// renders, marked as a preview) and what the owner can do next; text for the owner names no
/// config key; the overview shows "—" where a rule does not track opens or clicks, and rates
/// of opens, clicks, bounces and unsubscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_did_not_go_out_show_a_preview_and_next_steps() {
    let hash = password_hash();
    let env = env_with(Backend::Sqlite, Some(&hash)).await;
    let store = env.store().await;
    let seeded = seed(&store, 0).await;
    env.execute_sql(&format!(
        "UPDATE messages SET reason = 'expired: could not go out within expire_after of its due time' WHERE id = {}",
        seeded.skipped
    ))
    .await;
    store
        .add_message_event(seeded.sent[0], "bounced", &serde_json::json!({}))
        .await
        .unwrap();
    store
        .add_message_event(seeded.sent[1], "unsubscribed", &serde_json::json!({}))
        .await
        .unwrap();
    let daemon = env.start().await;
    let addr = daemon.http;
    let session = log_in(addr).await;
    let page = |path: String| {
        let session = session.clone();
        async move { unescape(&get(addr, &path, &[("Cookie", &session)]).await.text()) }
    };

    let skipped = page(format!("/messages/{}", seeded.skipped)).await;
    assert!(
        skipped.contains("Preview: what it would have said"),
        "{skipped}"
    );
    assert!(skipped.contains("A preview, rendered now"));
    assert!(
        skipped.contains("As promised: next steps"),
        "the rendered subject"
    );
    assert!(
        skipped.contains("Hi Ada") || skipped.contains("Ada"),
        "{skipped}"
    );
    assert!(skipped.contains("What you can do:"));
    assert!(
        skipped.contains("in the time the rule allows") && !skipped.contains("expire_after"),
        "{skipped}"
    );
    let log = page("/log?state=skipped".to_string()).await;
    assert!(!log.contains("expire_after"), "{log}");

    let upcoming = page(format!("/messages/{}", seeded.upcoming)).await;
    assert!(
        upcoming.contains("Thank you for your order, Fiona"),
        "{upcoming}"
    );
    assert!(upcoming.contains("has not gone out yet"));

    // A failure whose body was kept shows it as tried, not a preview; once the address is
    // suppressed, the next step says so.
    let failed = page(format!("/messages/{}", seeded.failed)).await;
    assert!(failed.contains("As it was tried") && !failed.contains("Preview: what"));
    assert!(failed.contains("refused the address"), "{failed}");
    store
        .suppress("grace@example.com", "hard bounce", "bounce")
        .await
        .unwrap();
    let failed = page(format!("/messages/{}", seeded.failed)).await;
    assert!(failed.contains("The address is now suppressed"), "{failed}");
    let sent = page(format!("/messages/{}", seeded.sent[0])).await;
    assert!(!sent.contains("What you can do:") && !sent.contains("Preview: what"));

    let overview = get(addr, "/", &[("Cookie", &session)]).await.text();
    assert!(!overview.contains("track_opens"), "no config keys");
    let follow_up = table_row(&overview, "discovery-call-follow-up");
    assert_eq!(follow_up[4..6], ["—", "—"], "not tracked: {follow_up:?}");
    let thanks = table_row(&overview, "thank-you-after-purchase");
    // Two sent: one opened each, one bounced, one unsubscribed.
    assert_eq!(thanks[0], "2", "{thanks:?}");
    assert!(
        thanks[4].starts_with("2") && thanks[4].contains("100%"),
        "{thanks:?}"
    );
    assert_eq!(thanks[6], "1 50%", "{thanks:?}");
    assert_eq!(thanks[7], "1 50%", "{thanks:?}");
    daemon.stop().await;
}

/// A follow-up stopped by its `unless` (the customer bought after the call, before it was due):
/// the message page marks that check ✗, the checks before it ✓ and the one after it "not
/// reached"; the customer page says, per rule, what each does for the customer and why not.
async fn pages_say_which_check_stopped_a_message(backend: Backend) {
    const RULES: &str = r#"
[[rule]]
name = "follow-up"
template = "thank-you"
subject = "How did the call go?"
when = { event = "call", after = "6s" }
unless = [{ event = "purchase", since = "trigger" }, { event = "refund", within = "1d" }]

[[rule]]
name = "vip"
template = "thank-you"
subject = "For gold customers"
when = { event = "call", after = "0s" }
only_if = [{ attribute = "plan", equals = "gold" }]
"#;
    let env = TestEnv::new(
        backend,
        Sink::Files,
        &[("rules.toml", RULES)],
        &web_config(None),
    )
    .await;
    let store = env.store().await;
    env.add_customer(&store, "bob", "bob@example.com", "Bob", Some("UTC"))
        .await;
    let call_at = chrono::Utc::now();
    env.add_event(&store, "call-1", "bob", "call", call_at)
        .await;
    let daemon = env.start().await;
    let planned = support::eventually(std::time::Duration::from_secs(20), || async {
        support::states(&store).await.get("scheduled") == Some(&1)
    })
    .await;
    assert!(planned, "{:?}", support::states(&store).await);
    env.add_event(&store, "buy-1", "bob", "purchase", chrono::Utc::now())
        .await;
    let skipped = support::eventually(std::time::Duration::from_secs(30), || async {
        support::states(&store).await.get("skipped") == Some(&1)
    })
    .await;
    assert!(skipped, "{:?}", support::states(&store).await);
    let entry = store.log(&LogFilter::default()).await.unwrap().remove(0);

    let page = get(daemon.http, &format!("/messages/{}", entry.id), &[]).await;
    let page = unescape(&page.text());
    let line = |needle: &str| -> String {
        page.split("<li")
            .map(|item| item.split("</li>").next().unwrap_or_default())
            .find(|item| item.contains(needle))
            .unwrap_or_else(|| panic!("no check line with {needle:?} in {page}"))
            .to_string()
    };
    let stopper = line("had a \"purchase\" event after the triggering one");
    assert!(stopper.contains('✗') && !stopper.contains('✓'), "{stopper}");
    assert!(stopper.contains("matched"), "{stopper}");
    let not_reached = line("had a \"refund\" event within");
    assert!(
        not_reached.contains("not reached") && !not_reached.contains('✓'),
        "{not_reached}"
    );
    let passed = line("is not on the suppression list");
    assert!(passed.contains('✓'), "{passed}");
    assert!(page.contains("what stopped it"), "{page}");

    let page = get(daemon.http, "/customers/bob", &[]).await;
    let page = unescape(&page.text());
    let section = &page[page.find("What each rule does").expect("the rules section")..];
    let rule_line = |rule: &str| -> String {
        section
            .split("<li")
            .map(|item| item.split("</li>").next().unwrap_or_default())
            .find(|item| item.contains(&format!("<strong>{rule}</strong>")))
            .unwrap_or_else(|| panic!("no line for {rule} in {section}"))
            .to_string()
    };
    let follow_up = rule_line("follow-up");
    assert!(
        follow_up.contains(&format!("message {} was skipped", entry.id))
            && follow_up.contains("\"purchase\" event after the triggering one: matched"),
        "{follow_up}"
    );
    let vip = rule_line("vip");
    assert!(
        vip.contains("not sent") && vip.contains("\"plan\" is not set"),
        "{vip}"
    );
    daemon.stop().await;
}

on_both_backends!(pages_say_which_check_stopped_a_message);
