//! The owner's web page in a real browser: headless Chromium (Debian's `chromium` and
//! `chromium-driver` packages) driven through chromedriver's W3C WebDriver API, with JavaScript
//! turned off (the page needs none). Logs in, opens the log, filters it by a rule, opens one
//! message, downloads the CSV and checks its rows against the database, and saves a screenshot
//! of every page (laptop and phone sizes) under `target/screenshots/`.

mod support;
mod web_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use support::{Backend, Sink, TestEnv};
use touchpoint::store::LogFilter;
use web_support::*;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(names: &[&str]) -> PathBuf {
    for name in names {
        for dir in ["/usr/bin", "/usr/lib/chromium", "/usr/local/bin"] {
            let path = Path::new(dir).join(name);
            if path.exists() {
                return path;
            }
        }
    }
    panic!(
        "none of {names:?} is installed: the browser tests need Debian's `chromium` and \
         `chromium-driver` packages (apt-get install chromium chromium-driver)"
    );
}

/// Where screenshots go: `target/screenshots/` (or under `CARGO_TARGET_DIR`).
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// chromedriver, stopped (with its browser) when dropped.
struct Driver {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_driver(log: &Path) -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(find_program(&["chromedriver"]))
        .arg(format!("--port={port}"))
        .arg(format!("--log-path={}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    let ready = support::eventually(Duration::from_secs(20), || async {
        match tokio::net::TcpStream::connect(driver.addr).await {
            Ok(_) => {
                let status = get(driver.addr, "/status", &[]).await;
                serde_json::from_slice::<Value>(&status.body)
                    .ok()
                    .and_then(|v| v["value"]["ready"].as_bool())
                    .unwrap_or(false)
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(ready, "chromedriver did not become ready");
    driver
}

/// One WebDriver session; deleted (closing the browser) when dropped.
struct Browser {
    driver: SocketAddr,
    session: String,
    base: String,
    shots: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Blocking on purpose: Drop cannot await, and the browser must not outlive the test.
        use std::io::{Read as _, Write as _};
        if let Ok(mut stream) = std::net::TcpStream::connect(self.driver) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                stream,
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.session, self.driver
            );
            let _ = stream.read_to_end(&mut Vec::new());
        }
    }
}

async fn webdriver(driver: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
    let response = request(driver, method, path, &[], body).await;
    let value: Value = serde_json::from_slice(&response.body)
        .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {}", response.text()));
    assert_eq!(response.status, 200, "{method} {path}: {value}");
    value["value"].clone()
}

impl Browser {
    async fn open(driver: &Driver, base: &str, downloads: &Path, profile: &Path) -> Browser {
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": find_program(&["chromium", "chromium-browser"]),
                    "args": [
                        "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        "--window-size=1280,900", "--hide-scrollbars",
                        format!("--user-data-dir={}", profile.display()),
                    ],
                    "prefs": {
                        "download.default_directory": downloads,
                        "download.prompt_for_download": false,
                        // The page must work without JavaScript: the browser runs none.
                        "profile.managed_default_content_settings.javascript": 2,
                    },
                },
            }},
        });
        let created = webdriver(driver.addr, "POST", "/session", Some(capabilities)).await;
        let session = created["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        let browser = Browser {
            driver: driver.addr,
            session,
            base: base.to_string(),
            shots: screenshot_dir(),
        };
        browser
            .cdp(
                "Browser.setDownloadBehavior",
                json!({ "behavior": "allow", "downloadPath": downloads }),
            )
            .await;
        browser
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        webdriver(self.driver, method, &path, body).await
    }

    /// A Chrome DevTools command through chromedriver.
    async fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.call(
            "POST",
            "/goog/cdp/execute",
            Some(json!({ "cmd": cmd, "params": params })),
        )
        .await
    }

    async fn go(&self, path: &str) {
        let url = format!("{}{path}", self.base);
        self.call("POST", "/url", Some(json!({ "url": url }))).await;
    }

    async fn path(&self) -> String {
        let url = self.call("GET", "/url", None).await;
        let url = url.as_str().unwrap_or_default();
        url.strip_prefix(&self.base).unwrap_or(url).to_string()
    }

    async fn find_all(&self, css: &str) -> Vec<String> {
        let found = self
            .call(
                "POST",
                "/elements",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        found
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn find(&self, css: &str) -> String {
        let found = self.find_all(css).await;
        found
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no element matches {css:?} on {}", "the page"))
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.call(
            "POST",
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn text_of(&self, element: &str) -> String {
        self.call("GET", &format!("/element/{element}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    async fn text(&self, css: &str) -> String {
        let element = self.find(css).await;
        self.text_of(&element).await
    }

    async fn wait_for_path(&self, wanted: impl Fn(&str) -> bool) -> String {
        for _ in 0..100 {
            let path = self.path().await;
            if wanted(&path) {
                return path;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the browser stayed at {}", self.path().await);
    }

    /// Waits until the page's HTML satisfies `wanted` (reading the source never meets an
    /// element of the page that was just replaced).
    async fn wait_for_source(&self, wanted: impl Fn(&str) -> bool) {
        for _ in 0..100 {
            let html = self.call("GET", "/source", None).await;
            if wanted(html.as_str().unwrap_or_default()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the page at {} never showed what was expected",
            self.path().await
        );
    }

    /// Saves the whole page (not just the window) as `<name>.png`.
    async fn screenshot(&self, name: &str) -> PathBuf {
        self.capture(name, true).await
    }

    /// Saves what fits the screen (a phone's first view) as `<name>.png`.
    async fn screenshot_screen(&self, name: &str) -> PathBuf {
        self.capture(name, false).await
    }

    async fn capture(&self, name: &str, whole_page: bool) -> PathBuf {
        let shot = self
            .cdp(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": whole_page }),
            )
            .await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, bytes).expect("write screenshot");
        path
    }

    /// A phone (390 x 844 CSS pixels) or, with `None`, back to the laptop window.
    async fn phone(&self, on: bool) {
        if on {
            self.cdp(
                "Emulation.setDeviceMetricsOverride",
                json!({ "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true }),
            )
            .await;
        } else {
            self.cdp("Emulation.clearDeviceMetricsOverride", json!({}))
                .await;
        }
    }
}

/// Runs a scenario on a thread (and a runtime) with room: its poll function needs more stack
/// than a test thread's 2 MiB in debug builds.
fn on_a_big_stack<F: std::future::Future<Output = ()> + 'static>(scenario: fn() -> F) {
    const STACK: usize = 16 << 20;
    let thread = std::thread::Builder::new()
        .name("browser-scenario".into())
        .stack_size(STACK)
        .spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_stack_size(STACK)
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(scenario())
        })
        .expect("a thread");
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn the_owner_logs_in_filters_the_log_opens_a_message_and_downloads_the_csv() {
    on_a_big_stack(owner_scenario);
}

async fn owner_scenario() {
    let hash = password_hash();
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[("rules.toml", RULES)],
        &web_config(Some(&hash)),
    )
    .await;
    let store = env.store().await;
    let seeded = seed(&store, 60).await;
    let daemon = env.start().await;
    let base = format!("http://{}", daemon.http);
    let downloads = env.path().join("downloads");
    let profile = env.path().join("chromium-profile");
    std::fs::create_dir_all(&downloads).unwrap();
    std::fs::create_dir_all(&profile).unwrap();
    let driver = start_driver(&env.path().join("chromedriver.log")).await;
    let browser = Browser::open(&driver, &base, &downloads, &profile).await;

    // Not logged in: the login form.
    browser.go("/log").await;
    let at = browser.wait_for_path(|p| p.starts_with("/login")).await;
    assert_eq!(at, "/login?next=%2Flog");
    assert_eq!(browser.text("h1").await, "Log in");
    browser.screenshot("01-login").await;

    // A wrong password first, then the right one.
    browser.type_into("#password", "not it").await;
    browser.click("form button[type=submit]").await;
    // The refusal comes back on the same path (after the password hash is checked, which is
    // slow on purpose): wait for the new page.
    browser
        .wait_for_source(|html| html.contains("p class=\"alert"))
        .await;
    assert_eq!(browser.text("p.alert").await, "That password is not right.");
    browser.type_into("#password", PASSWORD).await;
    browser.click("form button[type=submit]").await;
    browser.wait_for_path(|p| p == "/log").await;
    let cookies = browser.call("GET", "/cookie", None).await;
    let session = cookies
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tp_session")
        .expect("a session cookie");
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["sameSite"], "Lax");

    // The overview: what needs attention on top, the chart, the numbers per rule.
    browser.go("/").await;
    assert_eq!(browser.text("h1").await, "Overview");
    let attention = browser.text("section.attention").await;
    assert!(
        attention.contains("may or may not have been delivered"),
        "{attention}"
    );
    assert!(
        attention.contains("failed in the last 7 days"),
        "{attention}"
    );
    assert!(!browser.find_all("svg.chart rect.sent").await.is_empty());
    browser.screenshot("02-overview").await;

    // The log, then filtered by a rule with the form (no JavaScript: a plain GET form).
    browser.go("/log").await;
    assert_eq!(browser.find_all("table.log tbody tr").await.len(), 50);
    browser.screenshot("03-log").await;
    browser
        .click("#rule option[value=\"thank-you-after-purchase\"]")
        .await;
    browser.click("form.filters button[type=submit]").await;
    let filtered = browser
        .wait_for_path(|p| p.contains("rule=thank-you-after-purchase"))
        .await;
    let rows = browser.find_all("table.log tbody tr").await;
    // History only: what waits to go out is in Upcoming.
    let expected = store
        .log(&LogFilter {
            rule: Some("thank-you-after-purchase".into()),
            history: true,
            ..LogFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), expected.len());
    for cell in browser.find_all("table.log tbody tr td:nth-child(4)").await {
        assert_eq!(browser.text_of(&cell).await, "thank-you-after-purchase");
    }
    browser.screenshot("04-log-filtered").await;

    // One message: the newest of the rule.
    browser.click("table.log tbody tr td a").await;
    let newest = &expected[0];
    browser
        .wait_for_path(|p| p == format!("/messages/{}", newest.id))
        .await;
    let heading = browser.text("h1").await;
    assert_eq!(
        heading,
        newest
            .subject
            .clone()
            .unwrap_or(format!("Message {}", newest.id))
    );
    let page = browser.text("main").await;
    assert!(page.contains("Why it was sent"), "{page}");
    assert!(page.contains("History"), "{page}");
    browser.screenshot("05-message").await;
    // A sent one, with its bodies, opens and the click.
    browser.go(&format!("/messages/{}", seeded.sent[0])).await;
    let page = browser.text("main").await;
    assert!(page.contains("250 2.0.0 Ok: queued as 4XYZ"), "{page}");
    assert!(page.contains("Checked just before sending"), "{page}");
    // The HTML body, as sent, inside its sandboxed frame.
    let frame = browser.find("iframe.body").await;
    browser
        .call("POST", "/frame", Some(json!({ "id": { ELEMENT: frame } })))
        .await;
    let source = browser.call("GET", "/source", None).await;
    browser.call("POST", "/frame/parent", Some(json!({}))).await;
    let source = source.as_str().unwrap_or_default();
    assert!(source.contains("Hello Ada,"), "the frame shows: {source}");
    let shot = browser
        .call("GET", &format!("/element/{frame}/screenshot"), None)
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot.as_str().expect("element screenshot"))
        .expect("base64 PNG");
    std::fs::write(screenshot_dir().join("06-message-html-body.png"), png).unwrap();
    browser.screenshot("06-message-sent").await;
    browser.screenshot_screen("06-message-sent-screen").await;

    // The CSV of the filtered log, downloaded by the browser, against the database.
    browser.go(&filtered).await;
    browser.click("a.download").await;
    let file = downloads.join("touchpoint-log.csv");
    let arrived = support::eventually(Duration::from_secs(20), || async {
        file.exists()
            && std::fs::read_dir(&downloads)
                .map(|d| {
                    d.flatten()
                        .all(|e| !e.file_name().to_string_lossy().ends_with(".crdownload"))
                })
                .unwrap_or(false)
    })
    .await;
    assert!(
        arrived,
        "the CSV was not downloaded: {:?}",
        std::fs::read_dir(&downloads)
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    let mut reader = csv::Reader::from_path(&file).expect("the CSV");
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
    let wanted: Vec<Vec<String>> = expected
        .iter()
        .map(|e| touchpoint::query::log_row(e).to_vec())
        .collect();
    assert_eq!(rows, wanted);

    // The other pages.
    browser.go("/customers/ada").await;
    assert_eq!(browser.text("h1").await, "Ada Lovelace");
    assert!(
        browser
            .text("ol.timeline")
            .await
            .contains("purchase (event p-ada)")
    );
    browser.screenshot("07-customer").await;
    browser.go("/upcoming").await;
    assert!(
        browser
            .text("table.log")
            .await
            .contains("future@example.com")
    );
    browser.screenshot("08-upcoming").await;
    // Suppress an address with the form, then see it listed.
    browser.go("/suppressions").await;
    browser.type_into("#email", "nomore@example.com").await;
    browser.type_into("#reason", "asked by phone").await;
    browser.click("form.inline button[type=submit]").await;
    // The form posts and comes back to the same path: wait for the new page, not the path.
    browser
        .wait_for_source(|html| html.contains("nomore@example.com"))
        .await;
    assert!(
        browser
            .text("table.log")
            .await
            .contains("nomore@example.com")
    );
    assert!(store.is_suppressed("nomore@example.com").await.unwrap());
    browser.screenshot("09-suppressions").await;
    browser.go("/customers/evil").await;
    assert!(
        browser.text("h1").await.contains("<script>"),
        "the name, as text"
    );
    browser.screenshot("10-customer-escaped").await;

    // On a phone.
    browser.phone(true).await;
    let message = format!("/messages/{}", seeded.sent[0]);
    // (page, screenshot, whole page or the first screen)
    for (path, name, whole) in [
        ("/", "11-phone-overview", true),
        ("/log", "12-phone-log", false),
        (message.as_str(), "13-phone-message", false),
    ] {
        browser.go(path).await;
        let overflow = browser.cdp("Page.getLayoutMetrics", json!({})).await;
        let width = overflow["cssContentSize"]["width"].as_f64().unwrap_or(0.0);
        assert!(width <= 391.0, "{path} is {width}px wide on a 390px phone");
        browser.capture(name, whole).await;
    }
    browser.phone(false).await;

    // Logging out.
    browser.go("/").await;
    browser.click("form.logout button").await;
    browser.wait_for_path(|p| p == "/login").await;
    browser.go("/").await;
    browser.wait_for_path(|p| p.starts_with("/login")).await;

    drop(browser);
    drop(driver);
    daemon.stop().await;
}

/// With the web tests' rules (one tracks opens and clicks and has no send window, one tracks
/// nothing): a yearly rule that keeps a wedding entered as a plain date.
const ANNIVERSARY: &str = r#"
[[rule]]
name = "wedding-anniversary"
template = "anniversary"
subject = "Happy anniversary, {{customer.first_name}}!"
when = { anniversary_of = "wedding", at = "09:00" }
"#;

/// Customers' zones on both sides of UTC (the page's is New York).
const ZONES: [&str; 6] = [
    "Asia/Tokyo",
    "Pacific/Auckland",
    "Europe/Berlin",
    "UTC",
    "America/New_York",
    "America/Los_Angeles",
];

/// What `month_of_history` made, for the assertions.
struct Month {
    skipped: i64,
    /// Due at 03:10 in Tokyo within the week, of a rule without a send window.
    night: i64,
    messages: usize,
}

/// About 350 messages over 30 days, through the store's own claim and finish: sent (some
/// opened, clicked, bounced, unsubscribed), failed, skipped, unknown, retrying; each ended
/// hours or days after it was due (as real ones do); a plain-date wedding; one message due
/// at night for its customer.
async fn month_of_history(env: &TestEnv, store: &touchpoint::store::SharedStore) -> Month {
    use chrono::{SecondsFormat, TimeDelta, TimeZone, Utc};
    use touchpoint::store::{Customer, Event, NewMessage, Outcome};
    let now = Utc::now();
    let customers: Vec<Customer> = (0..36)
        .map(|i| Customer {
            id: format!("c{i:02}"),
            email: format!("c{i:02}@example.com"),
            name: Some(format!("Customer {i:02}")),
            timezone: Some(ZONES[i % ZONES.len()].into()),
            attributes: json!({}),
        })
        .collect();
    store.upsert_customers(&customers).await.unwrap();
    let count = 350;
    let due = |i: usize| now - TimeDelta::hours(2 + (i as i64 * 719) % (30 * 24 - 4));
    let kinds = |i: usize| {
        if i % 4 == 3 {
            ("discovery-call-follow-up", "discovery_call")
        } else {
            ("thank-you-after-purchase", "purchase")
        }
    };
    let mut events: Vec<Event> = (0..count)
        .map(|i| Event {
            id: format!("e{i:03}"),
            customer_id: format!("c{:02}", i % 36),
            kind: kinds(i).1.into(),
            occurred_at: due(i) - TimeDelta::days(2),
            data: json!({ "order_number": format!("A-{i}") }),
        })
        .collect();
    events.push(Event {
        id: "wedding-c00".into(),
        customer_id: "c00".into(),
        kind: "wedding".into(),
        occurred_at: Utc.with_ymd_and_hms(2019, 11, 12, 0, 0, 0).unwrap(),
        data: json!({}),
    });
    store.insert_events(&events).await.unwrap();
    let messages: Vec<NewMessage> = (0..count)
        .map(|i| NewMessage {
            rule: kinds(i).0.into(),
            customer_id: format!("c{:02}", i % 36),
            event_id: Some(format!("e{i:03}")),
            dedupe_key: format!("{}:e{i:03}", kinds(i).0),
            trigger_at: due(i),
            due_at: due(i),
            expires_at: None,
            detail: json!({}),
        })
        .collect();
    store.insert_messages(&messages).await.unwrap();
    // Each ends `delay` after it was due (never in the future).
    let ended = |i: usize| {
        let delay = TimeDelta::hours((i as i64 * 37) % 80);
        (due(i) + delay).min(now - TimeDelta::minutes(1))
    };
    let mut updates = Vec::new();
    let mut skipped = 0;
    loop {
        let claims = store
            .claim_due("history", 100, TimeDelta::minutes(5))
            .await
            .unwrap();
        if claims.is_empty() {
            break;
        }
        for claim in claims {
            let i: usize = claim.event_index();
            let outcome = match i % 20 {
                14 | 15 => Outcome::Failed {
                    reply: Some("550 5.1.1 no such user".into()),
                    reason: "the server refused the address".into(),
                },
                16 | 17 => Outcome::Skipped {
                    reason: "expired: could not go out within expire_after of its due time".into(),
                },
                18 => Outcome::Unknown {
                    reason: "the connection dropped after the body".into(),
                },
                19 => Outcome::Retry {
                    at: now + TimeDelta::days(3 + (i as i64 % 3)),
                    reply: "451 4.3.0 try again later".into(),
                },
                _ => Outcome::Sent {
                    reply: "250 2.0.0 Ok".into(),
                },
            };
            if matches!(outcome, Outcome::Skipped { .. }) {
                skipped = claim.id;
            }
            let sent = matches!(outcome, Outcome::Sent { .. });
            let retry = matches!(outcome, Outcome::Retry { .. });
            assert!(
                store
                    .finish(claim.id, &claim.token, &outcome)
                    .await
                    .unwrap()
            );
            if retry {
                continue;
            }
            let at = ended(i).to_rfc3339_opts(SecondsFormat::Millis, true);
            let sent_at = if sent {
                format!(", sent_at = '{at}'")
            } else {
                String::new()
            };
            updates.push(format!(
                "UPDATE messages SET updated_at = '{at}'{sent_at} WHERE id = {}",
                claim.id
            ));
            if sent {
                for (kind, every) in [
                    ("opened", 3),
                    ("clicked", 5),
                    ("bounced", 17),
                    ("unsubscribed", 23),
                ] {
                    if i % every == 0 {
                        store
                            .add_message_event(claim.id, kind, &json!({}))
                            .await
                            .unwrap();
                    }
                }
            }
        }
    }
    env.execute_sql(&updates.join(";\n")).await;
    // Opens and the rest happened when the message was sent, not when the test ran.
    env.execute_sql(
        "UPDATE message_events SET at = (SELECT m.sent_at FROM messages m WHERE m.id = message_events.message_id) \
         WHERE kind IN ('opened', 'clicked', 'bounced', 'unsubscribed')",
    )
    .await;
    // One due at 03:10 in Tokyo in a day or two: the rule has no send window.
    let night = tomorrow_at_ten_past_three_in("Asia/Tokyo");
    store
        .insert_messages(&[NewMessage {
            rule: "thank-you-after-purchase".into(),
            customer_id: "c00".into(),
            event_id: None,
            dedupe_key: "thank-you-after-purchase:night".into(),
            trigger_at: night,
            due_at: night,
            expires_at: None,
            detail: json!({}),
        }])
        .await
        .unwrap();
    let night = store
        .log(&LogFilter {
            customer_id: Some("c00".into()),
            state: Some(touchpoint::store::MessageState::Scheduled),
            ..LogFilter::default()
        })
        .await
        .unwrap()
        .iter()
        .find(|e| e.event_id.is_none())
        .expect("the night message")
        .id;
    Month {
        skipped,
        night,
        messages: count + 1,
    }
}

trait EventIndex {
    fn event_index(&self) -> usize;
}

impl EventIndex for touchpoint::store::ClaimedMessage {
    /// `i` of the event `e{i}` the message was planned for.
    fn event_index(&self) -> usize {
        self.event_id
            .as_deref()
            .and_then(|e| e.strip_prefix('e'))
            .and_then(|n| n.parse().ok())
            .expect("a history message")
    }
}

#[test]
fn the_owner_checks_a_month_of_history() {
    on_a_big_stack(month_scenario);
}

/// The `(number, href)` of every linked count in the overview's two tables.
async fn overview_links(browser: &Browser) -> Vec<(i64, String)> {
    let mut found = Vec::new();
    for link in browser.find_all("table.numbers td a").await {
        let number = browser.text_of(&link).await;
        let href = browser
            .call("GET", &format!("/element/{link}/attribute/href"), None)
            .await;
        let href = href.as_str().unwrap_or_default();
        let href = href.strip_prefix(&browser.base).unwrap_or(href).to_string();
        found.push((number.trim().parse().expect("a number"), href));
    }
    found
}

/// Follows a log link page by page: (the count the page states, every row's state and When).
async fn rows_behind(browser: &Browser, link: &str) -> (i64, Vec<(String, String)>) {
    browser.go(link).await;
    let stated: i64 = browser
        .call(
            "GET",
            &format!(
                "/element/{}/attribute/data-count",
                browser.find("#match-count").await
            ),
            None,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .parse()
        .expect("the page states its count");
    let mut rows = Vec::new();
    loop {
        let states = browser.find_all("table.log tbody tr td:nth-child(3)").await;
        let whens = browser.find_all("table.log tbody tr td:nth-child(2)").await;
        for (state, when) in states.iter().zip(&whens) {
            rows.push((browser.text_of(state).await, browser.text_of(when).await));
        }
        if browser.find_all("a[rel=next]").await.is_empty() {
            break;
        }
        browser.click("a[rel=next]").await;
        browser
            .wait_for_source(|html| html.contains("id=\"match-count\""))
            .await;
    }
    (stated, rows)
}

async fn month_scenario() {
    let hash = password_hash();
    let env = TestEnv::new(
        Backend::Sqlite,
        Sink::Files,
        &[("rules.toml", RULES), ("anniversary.toml", ANNIVERSARY)],
        &format!(
            "{}[defaults]\ntimezone = \"America/New_York\"\n",
            web_config(Some(&hash))
        ),
    )
    .await;
    let store = env.store().await;
    let month = month_of_history(&env, &store).await;
    // Next year's anniversary is further ahead than the default planner.horizon.
    env.plan_far_ahead();
    let daemon = env.start().await;
    // The planner keeps the wedding (next year's anniversary): wait for it.
    let planned = support::eventually(Duration::from_secs(20), || async {
        store
            .log(&LogFilter {
                rule: Some("wedding-anniversary".into()),
                ..LogFilter::default()
            })
            .await
            .is_ok_and(|l| !l.is_empty())
    })
    .await;
    assert!(planned, "the anniversary was not planned");
    let base = format!("http://{}", daemon.http);
    let downloads = env.path().join("downloads");
    let profile = env.path().join("chromium-profile");
    std::fs::create_dir_all(&downloads).unwrap();
    std::fs::create_dir_all(&profile).unwrap();
    let driver = start_driver(&env.path().join("chromedriver.log")).await;
    let browser = Browser::open(&driver, &base, &downloads, &profile).await;
    browser.go("/login").await;
    browser.type_into("#password", PASSWORD).await;
    browser.click("form button[type=submit]").await;
    browser.wait_for_path(|p| p == "/").await;

    // Every number on the overview that links to the log is the list behind the link: the
    // count the log states, and its rows, page by page, each of the linked state and dated
    // inside the range.
    let overview = browser.text("main").await;
    assert!(utc_times(&overview).is_empty(), "{overview}");
    assert!(overview.contains("America/New_York"));
    assert!(overview.contains('%'), "rates: {overview}");
    assert!(overview.contains('—'), "not tracked: {overview}");
    browser.screenshot("20-month-overview").await;
    let links = overview_links(&browser).await;
    let linked: Vec<_> = links.iter().filter(|(_, l)| l.contains("from=")).collect();
    assert!(linked.len() >= 12, "{links:?}");
    let mut total = 0;
    for (number, link) in &linked {
        let (stated, rows) = rows_behind(&browser, link).await;
        assert_eq!(stated, *number, "{link}: the page says {stated}");
        assert_eq!(rows.len() as i64, *number, "{link}: rows listed");
        let from = link
            .split("from=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        let state = link
            .split("state=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        for (row_state, when) in &rows {
            assert_eq!(row_state, state, "{link}");
            assert!(when.as_str()[..10] >= *from, "{link}: a row dated {when}");
            assert!(when.contains("EST") || when.contains("EDT"), "{when}");
        }
        total += number;
    }
    assert!(total > 300, "the links cover the month: {total}");

    // The log: history only, newest first, with its count; what waits is behind a filter.
    browser.go("/log").await;
    let count: i64 = browser
        .text("#match-count")
        .await
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(count > 300 && (count as usize) < month.messages, "{count}");
    let whens: Vec<String> = {
        let mut v = Vec::new();
        for cell in browser.find_all("table.log tbody tr td:nth-child(2)").await {
            v.push(browser.text_of(&cell).await);
        }
        v
    };
    assert!(
        whens.windows(2).all(|w| w[0][..16] >= w[1][..16]),
        "newest first: {whens:?}"
    );
    for cell in browser.find_all("table.log tbody tr td:nth-child(3)").await {
        let state = browser.text_of(&cell).await;
        assert!(
            state != "scheduled" && state != "retrying",
            "{state} in history"
        );
    }
    browser.screenshot("21-month-log").await;
    browser.go("/log?state=scheduled").await;
    let scheduled = browser.text("table.log").await;
    assert!(scheduled.contains("wedding-anniversary"), "{scheduled}");

    // A skipped message: what it would have said, as a preview, and what to do; no config key.
    browser.go(&format!("/messages/{}", month.skipped)).await;
    let page = browser.text("main").await;
    assert!(page.contains("Preview: what it would have said"), "{page}");
    assert!(page.contains("A preview"), "{page}");
    assert!(page.contains("What you can do:"), "{page}");
    assert!(!page.contains("expire_after"), "no config key: {page}");
    assert!(!page.contains(".toml"), "no server file path: {page}");
    assert!(utc_times(&page).is_empty(), "{page}");
    browser.screenshot("22-month-skipped-preview").await;

    // Upcoming: names, and the message that arrives at night in Tokyo.
    browser.go("/upcoming").await;
    let upcoming = browser.text("main").await;
    assert!(upcoming.contains("Customer 00"), "{upcoming}");
    assert!(
        upcoming.contains("arrives at 03:10 in Asia/Tokyo"),
        "{upcoming}"
    );
    assert!(utc_times(&upcoming).is_empty(), "{upcoming}");
    assert!(
        browser
            .find_all(&format!("a[href=\"/messages/{}\"]", month.night))
            .await
            .len()
            == 1
    );
    browser.screenshot("23-month-upcoming").await;

    // The plain-date wedding is that date, on the timeline and on its anniversary message.
    browser.go("/customers/c00").await;
    let timeline = browser.text("ol.timeline").await;
    assert!(timeline.contains("2019-11-12"), "{timeline}");
    assert!(!timeline.contains("2019-11-11"), "{timeline}");
    browser.screenshot("24-month-customer").await;
    let anniversary = store
        .log(&LogFilter {
            rule: Some("wedding-anniversary".into()),
            ..LogFilter::default()
        })
        .await
        .unwrap()[0]
        .id;
    browser.go(&format!("/messages/{anniversary}")).await;
    let page = browser.text("main").await;
    assert!(
        page.contains("2019-11-12") && !page.contains("2019-11-11"),
        "{page}"
    );
    assert!(
        page.contains("Happy anniversary, Customer!"),
        "the preview's subject: {page}"
    );

    drop(browser);
    drop(driver);
    daemon.stop().await;
}
