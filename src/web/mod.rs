//! The business owner's web page, served by the daemon's HTTP listener: an overview, the message
//! log (filters, keyset pages, CSV), one message (as sent, its history and why it was sent), one
//! customer's timeline, what is coming up, and the suppression list.
//!
//! Server-rendered HTML from Handlebars templates compiled into the binary (the registry escapes
//! every value), one stylesheet, no JavaScript. Every page only reads, except adding and removing
//! suppressions.
//!
//! Who may look (see [`auth`] for the mechanics, [`client`] for where a request comes from):
//! - only requests whose `Host` is a name of this page (localhost, an IP address, the listen
//!   address, the host of `links.base_url`, `web.allowed_hosts`): a web page that rebinds its
//!   own name to 127.0.0.1 (DNS rebinding) gets a 421;
//! - without `web.password_hash`, only browsers on this machine: a request from a loopback peer
//!   that is not in `web.trusted_proxies` and did not come through a proxy (no `Forwarded`,
//!   `X-Forwarded-For` or `X-Real-IP`), no login; anyone else gets a 403 that says to set a
//!   password. When the listener is reachable from other machines (a non-loopback listen
//!   address, or a `links.base_url` others reach through a proxy that may add no forwarding
//!   header), there is no telling visitors from elsewhere apart: the page is off until a
//!   password is set, and the log says so at start;
//! - with `web.password_hash`, everyone logs in, on loopback too (a reverse proxy on the same
//!   machine makes every visitor look local).

pub mod auth;
pub mod client;
mod pages;
pub mod settings;
pub mod why;

pub use settings::WebConfig;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use handlebars::Handlebars;
use serde_json::json;

use crate::plan::PlanSettings;
use crate::store::{SharedStore, StoreError};

/// A login waits this long for its password to be checked (one at a time, see
/// [`auth::PasswordChecker`]) before it is told to try again (429).
const HASH_WAIT: Duration = Duration::from_secs(5);

/// What the page's handlers look at: the daemon's shared state, carrying the page's own.
pub type Shared = crate::runtime::Shared<Web>;

/// What the page needs to know from outside `[web]`.
#[derive(Debug, Clone)]
pub struct Surroundings<'a> {
    /// `http.listen`.
    pub listen: &'a str,
    /// `links.base_url`.
    pub base_url: Option<&'a str>,
    /// Time zone and expiry defaults; times on the page are shown in `default_timezone`.
    pub plan: PlanSettings,
    /// `delivery.max_attempts`, for the customer page's answer to "why not sent".
    pub max_attempts: u32,
}

/// Why the page could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(String),
}

/// The web page's own state, made once when the daemon starts.
pub struct Web {
    keys: auth::Keys,
    password_hash: Option<String>,
    /// Why the page is off: no password, and the listener is reachable from elsewhere.
    closed: Option<String>,
    proxies: client::TrustedProxies,
    hosts: client::AllowedHosts,
    /// Checks the password, when one is set.
    passwords: Option<auth::PasswordChecker>,
    secure_cookies: Option<bool>,
    https_base: bool,
    session_lifetime: TimeDelta,
    /// Times on the page are shown in this zone (`defaults.timezone`).
    timezone: Tz,
    plan: PlanSettings,
    max_attempts: u32,
    templates: Handlebars<'static>,
}

impl std::fmt::Debug for Web {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Web")
            .field("login", &self.password_hash.is_some())
            .finish()
    }
}

const TEMPLATES: [(&str, &str); 10] = [
    ("layout", include_str!("templates/layout.hbs")),
    ("overview", include_str!("templates/overview.hbs")),
    ("log", include_str!("templates/log.hbs")),
    ("message", include_str!("templates/message.hbs")),
    ("customer", include_str!("templates/customer.hbs")),
    ("upcoming", include_str!("templates/upcoming.hbs")),
    ("experience", include_str!("templates/experience.hbs")),
    ("suppressions", include_str!("templates/suppressions.hbs")),
    ("login", include_str!("templates/login.hbs")),
    ("problem", include_str!("templates/problem.hbs")),
];

const RULE_TABLE: &str = include_str!("templates/rule_table.hbs");

const STYLESHEET: &str = include_str!("templates/style.css");

/// The templates, in strict mode (a misspelt name is an error, not a blank), escaping HTML.
fn templates() -> Handlebars<'static> {
    let mut registry = Handlebars::new();
    registry.set_strict_mode(true);
    for (name, text) in TEMPLATES {
        // Compiled into the binary and covered by the tests: a mistake here is a bug.
        if let Err(error) = registry.register_template_string(name, text) {
            panic!("web template {name} does not compile: {error}");
        }
    }
    for (name, text) in [("layout", TEMPLATES[0].1), ("rule_table", RULE_TABLE)] {
        if let Err(error) = registry.register_partial(name, text) {
            panic!("web partial {name} does not compile: {error}");
        }
    }
    registry
}

impl Web {
    /// The page's state, or `None` when `web.enabled` is false; `listening` is the listener's
    /// address. The key that signs sessions is generated once and kept in the database.
    pub async fn setup(
        settings: &WebConfig,
        around: Surroundings<'_>,
        store: &SharedStore,
        listening: SocketAddr,
    ) -> Result<Option<Arc<Web>>, SetupError> {
        if !settings.enabled {
            return Ok(None);
        }
        let key = store
            .setting_or_insert("web_session_key", &auth::random_token())
            .await?;
        let password_hash = settings
            .password_hash
            .as_ref()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty());
        let base_url = around.base_url;
        let closed = match &password_hash {
            Some(_) => None,
            None => client::exposure(listening, base_url),
        };
        announce_access(password_hash.is_some(), closed.as_deref());
        let passwords = match &password_hash {
            Some(hash) => Some(
                auth::PasswordChecker::start(hash)
                    .map_err(|e| SetupError::Config(format!("web.password_hash: {e}")))?,
            ),
            None => None,
        };
        Ok(Some(Arc::new(Web {
            keys: auth::Keys::new(key.as_bytes(), password_hash.as_deref()),
            password_hash,
            closed,
            proxies: client::TrustedProxies::new(&settings.trusted_proxies),
            hosts: client::AllowedHosts::new(around.listen, base_url, &settings.allowed_hosts),
            passwords,
            secure_cookies: settings.secure_cookies,
            https_base: base_url.is_some_and(|u| u.trim().starts_with("https://")),
            session_lifetime: settings.session_lifetime,
            timezone: around.plan.default_timezone,
            plan: around.plan,
            max_attempts: around.max_attempts,
            templates: templates(),
        })))
    }

    /// The session a request's cookie stands for: signed, not expired, and not logged out
    /// here or (by the database) on any replica.
    async fn session(
        &self,
        headers: &HeaderMap,
        store: &SharedStore,
    ) -> Result<Option<auth::Session>, StoreError> {
        let Some(session) = cookie_value(headers, auth::SESSION_COOKIE)
            .and_then(|cookie| self.keys.session(cookie, Utc::now()))
        else {
            return Ok(None);
        };
        if store
            .session_revoked(&auth::revocation_key(&session.nonce))
            .await?
        {
            self.keys.revoke(&session, Utc::now());
            return Ok(None);
        }
        Ok(Some(session))
    }

    /// Logs a session out for good: in the database for every replica and restart, and here.
    async fn end_session(
        &self,
        session: &auth::Session,
        store: &SharedStore,
    ) -> Result<(), StoreError> {
        store
            .revoke_session(&auth::revocation_key(&session.nonce), session.expires)
            .await?;
        self.keys.revoke(session, Utc::now());
        Ok(())
    }

    /// Whether cookies get `Secure`.
    fn secure(&self, headers: &HeaderMap) -> bool {
        self.secure_cookies.unwrap_or_else(|| {
            self.https_base
                || headers
                    .get("x-forwarded-proto")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
        })
    }

    fn cookie(&self, name: &str, value: &str, max_age: Option<i64>, secure: bool) -> String {
        let mut cookie = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax");
        if let Some(age) = max_age {
            cookie.push_str(&format!("; Max-Age={age}"));
        }
        if secure {
            cookie.push_str("; Secure");
        }
        cookie
    }

    /// A time on the page: `2026-11-23 09:00 CET`.
    fn time(&self, t: DateTime<Utc>) -> String {
        t.with_timezone(&self.timezone)
            .format("%Y-%m-%d %H:%M %Z")
            .to_string()
    }

    /// When an event happened: a plain date (a wedding imported as 2019-11-12) as that date,
    /// other times as [`Web::time`].
    fn event_time(&self, t: DateTime<Utc>) -> String {
        match crate::calendar::plain_date(t) {
            Some(date) => date.format("%Y-%m-%d").to_string(),
            None => self.time(t),
        }
    }

    fn render(&self, template: &str, data: &serde_json::Value) -> Response {
        match self.templates.render(template, data) {
            Ok(html) => html_response(StatusCode::OK, html),
            Err(error) => {
                tracing::error!(%error, template, "cannot render a web page");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the page cannot be shown\n",
                )
                    .into_response()
            }
        }
    }
}

/// Says at start who can see the page.
fn announce_access(password: bool, closed: Option<&str>) {
    match (password, closed) {
        (true, _) => tracing::info!("the owner's page at / asks for the password"),
        (false, Some(reason)) => tracing::warn!(
            "the owner's page is OFF: web.password_hash is not set and {reason}; only /healthz, \
             /metrics, the links in messages, /hooks/bounce and the API are served. Set a \
             password (`touchpoint hash-password`) to turn the page on"
        ),
        (false, None) => tracing::info!(
            "the owner's page at / is shown without a password, only to browsers on this machine"
        ),
    }
}

/// The routes of the page. Each handler finds out through [`Owner`] whether the visitor may see
/// it; with `web.enabled = false` they are all 404. Every route checks `Host` first.
pub fn router(shared: Shared) -> Router<Shared> {
    Router::new()
        .route("/", get(pages::overview))
        .route("/log", get(pages::log))
        .route("/log.csv", get(pages::log_csv))
        .route("/messages/{id}", get(pages::message))
        .route("/messages/{id}/body.html", get(pages::message_html))
        .route("/customers/{id}", get(pages::customer))
        .route("/upcoming", get(pages::upcoming))
        .route("/experience", get(pages::experience_page))
        .route(
            "/suppressions",
            get(pages::suppressions).post(pages::suppress),
        )
        .route("/suppressions/remove", post(pages::unsuppress))
        .route("/login", get(pages::login_page).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/assets/touchpoint.css", get(stylesheet))
        .route_layer(axum::middleware::from_fn_with_state(shared, check_host))
}

/// Refuses a request whose `Host` is not a name of this page (421): a page on another site
/// that rebinds its name to this machine cannot read the owner's page through the browser.
async fn check_host(
    State(shared): State<Shared>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(web) = &shared.web {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| request.uri().host());
        if !web.hosts.allows(host) {
            tracing::debug!(
                ?host,
                "owner's page: refused a request for another host name"
            );
            return (
                StatusCode::MISDIRECTED_REQUEST,
                [
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                ],
                "This page answers only to localhost, IP addresses, the address it listens on and \
                 the host of links.base_url; the Host of this request is none of them. Add the \
                 name to web.allowed_hosts if you use it.\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLESHEET,
    )
        .into_response()
}

/// Headers every page carries: no caching of customer data, no framing, no scripts at all.
fn html_response(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; img-src 'self' data:; frame-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// A value of the request's `Cookie` header.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

/// Answers a visitor the page does not serve without a password: 403 with what to do.
fn not_for_you(web: &Web, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<Response> {
    if let Some(reason) = &web.closed {
        return Some(problem(
            web,
            StatusCode::FORBIDDEN,
            "The owner's page is off",
            &format!(
                "No password is set and {reason}, so there is no telling who is on this machine. \
                 Run `touchpoint hash-password`, put what it prints in web.password_hash, and restart."
            ),
        ));
    }
    if client::is_local(peer, headers, &web.proxies) {
        return None;
    }
    Some(problem(
        web,
        StatusCode::FORBIDDEN,
        "Not from here",
        "This page is shown only to a browser on the machine touchpoint runs on until a password is set. \
         Run `touchpoint hash-password`, put what it prints in web.password_hash, and restart.",
    ))
}

/// A visitor allowed to see the page. Extracting it answers everyone else: 404 when the page is
/// off, a redirect to the login form (or 403 for a form post) without a session, 403 from
/// elsewhere while no password is set.
pub struct Owner {
    web: Arc<Web>,
    session: Option<auth::Session>,
    /// What CSRF tokens of this visitor are tied to.
    binding: String,
    /// A `tp_csrf` cookie to set with the response (a new local visitor).
    set_cookie: Option<String>,
}

impl Owner {
    fn csrf(&self) -> String {
        self.web.keys.csrf_token(&self.binding)
    }

    fn csrf_ok(&self, presented: &str) -> bool {
        self.web.keys.csrf_ok(&self.binding, presented)
    }

    /// The values every page's layout uses.
    fn page(&self, title: &str, nav: &str) -> serde_json::Value {
        json!({
            "title": title,
            "nav": nav,
            "csrf": self.csrf(),
            "logged_in": self.session.is_some(),
        })
    }

    /// A rendered page, with the CSRF cookie when this visitor needs one.
    fn render(&self, template: &str, data: &serde_json::Value) -> Response {
        let response = self.web.render(template, data);
        self.with_cookie(response)
    }

    fn with_cookie(&self, mut response: Response) -> Response {
        if let Some(cookie) = &self.set_cookie
            && let Ok(value) = HeaderValue::from_str(cookie)
        {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
        response
    }
}

impl FromRequestParts<Shared> for Owner {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, shared: &Shared) -> Result<Self, Response> {
        let Some(web) = shared.web.clone() else {
            return Err((StatusCode::NOT_FOUND, "not found\n").into_response());
        };
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        let headers = &parts.headers;
        if web.password_hash.is_none() {
            if let Some(refusal) = not_for_you(&web, peer, headers) {
                return Err(refusal);
            }
            let (binding, set_cookie) = match cookie_value(headers, auth::CSRF_COOKIE) {
                Some(value) => (value.to_string(), None),
                None => {
                    let value = auth::random_token();
                    let cookie = web.cookie(auth::CSRF_COOKIE, &value, None, web.secure(headers));
                    (value, Some(cookie))
                }
            };
            return Ok(Owner {
                web,
                session: None,
                binding,
                set_cookie,
            });
        }
        let session = match web.session(headers, &shared.store).await {
            Ok(session) => session,
            Err(error) => return Err(pages::unavailable(&web, &error)),
        };
        match session {
            Some(session) => Ok(Owner {
                binding: session.nonce.clone(),
                session: Some(session),
                web,
                set_cookie: None,
            }),
            None if parts.method == axum::http::Method::GET => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                let location = format!("/login?next={}", encode_query(&next));
                Err(redirect(&location))
            }
            None => Err(problem(
                &web,
                StatusCode::FORBIDDEN,
                "Please log in again",
                "Your session has ended, so nothing was changed. Log in and try again.",
            )),
        }
    }
}

/// A short page that says what went wrong and what to do.
fn problem(web: &Web, status: StatusCode, title: &str, detail: &str) -> Response {
    let data = json!({
        "page": { "title": title, "nav": "", "csrf": "", "logged_in": false },
        "detail": detail,
    });
    let mut response = web.render("problem", &data);
    *response.status_mut() = status;
    response
}

/// 303 See Other to a path on this site.
fn redirect(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn encode_query(value: &str) -> String {
    crate::links::encode_component(value)
}

/// Where to go after logging in: only a path on this site, else `/`.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(next) if is_same_origin_path(next) => next.to_string(),
        _ => "/".into(),
    }
}

/// Whether a browser sent to `next` stays on this site: a path of printable ASCII starting with
/// one `/`. Browsers drop tabs and newlines anywhere in a URL and read `\` as `/`, so
/// `/\t/evil.example` or `/\\evil.example` would lead to another host; a path that still
/// looks like that once percent-decoded (`/%2F%2Fevil.example`) is refused too, in case
/// something on the way decodes it.
fn is_same_origin_path(next: &str) -> bool {
    let plain = |path: &str| {
        path.starts_with('/')
            && !path[1..].starts_with(['/', '\\'])
            && !path.contains('\\')
            && !path.chars().any(|c| c.is_control())
    };
    next.bytes().all(|b| b.is_ascii_graphic()) && plain(next) && plain(&percent_decode(next))
}

/// `%XX` sequences decoded (bytes that are not UTF-8 become U+FFFD); others left as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles() {
        let registry = templates();
        for (name, _) in TEMPLATES {
            assert!(registry.has_template(name), "{name}");
        }
    }

    #[test]
    fn after_login_only_paths_on_this_site() {
        for good in [
            "/",
            "/log?state=failed",
            "/messages/5",
            "/log?q=a%20b&rule=thank-you",
            "/customers/ada%40example.com",
        ] {
            assert_eq!(safe_next(Some(good)), good, "{good:?}");
        }
        let hostile = [
            "",
            "log",
            "evil.example",
            "//evil.example/",
            "///evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "/log\\..\\x",
            "https://evil.example/",
            "http:evil.example",
            "javascript:alert(1)",
            "/\t/evil.example",
            "/\n/evil.example",
            "/\r\n/evil.example",
            "\t//evil.example",
            "/log\n",
            "/log?next=\r\nSet-Cookie:x=1",
            " /log",
            "/ /evil.example",
            "/log\u{0}",
            "/\u{ff0f}evil.example",
            "/%2F%2Fevil.example",
            "/%2fevil.example",
            "/%5Cevil.example",
            "/%5cevil.example",
            "%2F%2Fevil.example",
            "/%09/evil.example",
            "/%0A/evil.example",
            "/log%0d%0aSet-Cookie:x=1",
        ];
        for next in hostile {
            assert_eq!(safe_next(Some(next)), "/", "{next:?}");
        }
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn cookies_are_read_from_every_cookie_header() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; tp_session=xyz"),
        );
        headers.append(header::COOKIE, HeaderValue::from_static("tp_csrf=abc"));
        assert_eq!(cookie_value(&headers, "tp_session"), Some("xyz"));
        assert_eq!(cookie_value(&headers, "tp_csrf"), Some("abc"));
        assert_eq!(cookie_value(&headers, "nope"), None);
    }
}
