//! The HTTP listener: `/healthz` for load balancers and monitors, `/metrics` for Prometheus,
//! the links in messages (`/u/{token}` unsubscribe, `/o/{token}.gif` opens, `/c/{token}`
//! clicks) and `POST /hooks/bounce` for providers' bounce webhooks; the ingest API
//! ([`crate::ingest`]) and the owner's page ([`crate::web`]) are merged into the same router.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::bounce::BounceReport;
use crate::links::Link;
use crate::store::LogEntry;
use crate::store::MessageState;
use crate::store::StoreError;
use crate::web::Shared;

pub use crate::metrics::{METRICS_TTL, MetricsCache};

/// The dispatcher turns its loop at least every 10 s; three missed turns mean it is stuck.
const DISPATCHER_STALL: Duration = Duration::from_secs(30);

pub fn router(shared: Shared) -> Router {
    let web = crate::web::router(shared.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/u/{token}", get(unsubscribe_page).post(unsubscribe))
        .route("/o/{file}", get(open_pixel))
        .route("/c/{token}", get(click))
        .route("/hooks/bounce", axum::routing::post(bounce_hook))
        .merge(crate::ingest::router())
        .merge(web)
        .with_state(shared)
}

/// Serves until `stop.graceful`, under `limits` (see [`crate::listener`]); connections run on
/// `tracker`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Shared,
    limits: crate::listener::Limits,
    tracker: tokio_util::task::TaskTracker,
    stop: crate::listener::Stop,
) {
    crate::listener::serve(listener, router(shared), limits, tracker, stop).await;
}

#[derive(serde::Serialize)]
struct HealthReport {
    healthy: bool,
    database: Check,
    dispatcher: Check,
    last_reload: Option<crate::metrics::ReloadStatus>,
    /// Each source's latest use. A failing source does not make the daemon unhealthy: only its
    /// rules wait, and restarting touchpoint would not help.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sources: Vec<SourceCheck>,
}

#[derive(serde::Serialize)]
struct SourceCheck {
    name: String,
    ok: bool,
    detail: String,
}

#[derive(serde::Serialize)]
struct Check {
    ok: bool,
    detail: String,
}

/// What /healthz says about the database: a reason class, never the error's text (which can
/// quote customer data: a value in a constraint message); the text goes to the debug log.
/// `None` is no answer in time.
fn database_check(answer: Option<Result<(), StoreError>>) -> Check {
    let detail = match answer {
        Some(Ok(())) => {
            return Check {
                ok: true,
                detail: "reachable".into(),
            };
        }
        None => "timeout",
        Some(Err(error)) => {
            tracing::debug!(%error, "/healthz: the database check failed");
            if error.is_unavailable() {
                "unreachable"
            } else {
                "error"
            }
        }
    };
    Check {
        ok: false,
        detail: detail.into(),
    }
}

async fn healthz(State(shared): State<Shared>) -> Response {
    let answer = tokio::time::timeout(Duration::from_secs(3), shared.store.ping()).await;
    let database = database_check(answer.ok());
    let idle = shared.health.dispatcher_idle_for();
    let dispatcher = Check {
        ok: idle < DISPATCHER_STALL,
        detail: format!("last loop turn {:.1}s ago", idle.as_secs_f64()),
    };
    let healthy = database.ok && dispatcher.ok;
    let report = HealthReport {
        healthy,
        database,
        dispatcher,
        last_reload: shared.health.last_reload(),
        sources: source_checks(&shared.playbook.borrow().sources.clone()),
    };
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

fn source_checks(sources: &crate::sources::Sources) -> Vec<SourceCheck> {
    sources
        .sources
        .iter()
        .map(|source| {
            let error = source.last_error_summary();
            SourceCheck {
                name: source.name.clone(),
                ok: error.is_none(),
                detail: error.unwrap_or_else(|| "the latest query worked".into()),
            }
        })
        .collect()
}

/// Always 200 with what is known: when the database does not answer, the per-state gauges are
/// left out and `touchpoint_database_up` is 0, so the error counters stay visible in an outage.
async fn metrics(State(shared): State<Shared>) -> Response {
    let text = render_metrics(&shared).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn render_metrics(shared: &Shared) -> String {
    let scan = shared.metrics.scan(&shared.store).await;
    let counts = scan.counts.as_ref();
    let mut out = String::new();
    let health = &shared.health;
    let _ = writeln!(
        out,
        "# HELP touchpoint_database_up Whether the database answered the latest count (at most 5 s old)."
    );
    let _ = writeln!(out, "# TYPE touchpoint_database_up gauge");
    let _ = writeln!(out, "touchpoint_database_up {}", u8::from(counts.is_some()));
    if let Some(counts) = counts {
        render_counts(&mut out, counts);
    }
    let _ = writeln!(
        out,
        "# HELP touchpoint_metrics_scans_total Counts of the messages table made for /metrics \
         (at most one per 5 s, shared by the scrapes meanwhile)."
    );
    let _ = writeln!(out, "# TYPE touchpoint_metrics_scans_total counter");
    let _ = writeln!(
        out,
        "touchpoint_metrics_scans_total {}",
        shared.metrics.scans.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP touchpoint_outcomes_total Attempt outcomes recorded by this process."
    );
    let _ = writeln!(out, "# TYPE touchpoint_outcomes_total counter");
    for ((rule, state), n) in health.outcomes() {
        let _ = writeln!(
            out,
            "touchpoint_outcomes_total{{rule=\"{}\",state=\"{state}\"}} {n}",
            escape(&rule)
        );
    }
    histogram(
        &mut out,
        "touchpoint_send_seconds",
        "Time from claim to outcome of a send attempt.",
        &health.send_latency(),
    );
    histogram(
        &mut out,
        "touchpoint_lateness_seconds",
        "How long after its due time a sent message went out.",
        &health.lateness(),
    );
    if let Some((due, oldest)) = scan.backlog {
        let _ = writeln!(
            out,
            "# HELP touchpoint_due_messages Waiting messages already due (late if this stays above zero)."
        );
        let _ = writeln!(out, "# TYPE touchpoint_due_messages gauge");
        let _ = writeln!(out, "touchpoint_due_messages {due}");
        let _ = writeln!(
            out,
            "# HELP touchpoint_oldest_due_seconds How long the oldest due message has been waiting."
        );
        let _ = writeln!(out, "# TYPE touchpoint_oldest_due_seconds gauge");
        let _ = writeln!(
            out,
            "touchpoint_oldest_due_seconds {}",
            oldest.unwrap_or(0.0).max(0.0)
        );
    }
    let ordering = std::sync::atomic::Ordering::Relaxed;
    let _ = writeln!(out, "# TYPE touchpoint_reloads_total counter");
    let _ = writeln!(
        out,
        "touchpoint_reloads_total {}",
        health.reloads.load(ordering)
    );
    let _ = writeln!(out, "# TYPE touchpoint_reload_failures_total counter");
    let _ = writeln!(
        out,
        "touchpoint_reload_failures_total {}",
        health.reload_failures.load(ordering)
    );
    let _ = writeln!(out, "# TYPE touchpoint_database_errors_total counter");
    let _ = writeln!(
        out,
        "touchpoint_database_errors_total {}",
        health.database_errors.load(ordering)
    );
    let sources = shared.playbook.borrow().sources.clone();
    render_sources(&mut out, &sources);
    out
}

/// One per-source series of /metrics: name, type, help, and its value for a source.
type SourceSeries = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::sources::Source) -> u64,
);

fn render_sources(out: &mut String, sources: &crate::sources::Sources) {
    use std::sync::atomic::Ordering::Relaxed;
    let series: [SourceSeries; 4] = [
        (
            "touchpoint_source_up",
            "gauge",
            "Whether the source's latest query worked.",
            |s| u64::from(s.last_error().is_none()),
        ),
        (
            "touchpoint_source_rows_read_total",
            "counter",
            "Rows read from the source (planning reads only the window that can become due).",
            |s| s.rows_read.load(Relaxed),
        ),
        (
            "touchpoint_source_bad_rows_total",
            "counter",
            "Rows skipped because they cannot be read (a NULL email, text that is not a time).",
            |s| s.bad_rows.load(Relaxed),
        ),
        (
            "touchpoint_source_errors_total",
            "counter",
            "Queries of the source that failed.",
            |s| s.errors.load(Relaxed),
        ),
    ];
    if sources.is_empty() {
        return;
    }
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for source in &sources.sources {
            let _ = writeln!(
                out,
                "{name}{{source=\"{}\"}} {}",
                escape(&source.name),
                value(source)
            );
        }
    }
}

fn render_counts(out: &mut String, counts: &[(String, MessageState, i64)]) {
    let _ = writeln!(
        out,
        "# HELP touchpoint_messages Messages in the database by rule and state."
    );
    let _ = writeln!(out, "# TYPE touchpoint_messages gauge");
    for (rule, state, n) in counts {
        let _ = writeln!(
            out,
            "touchpoint_messages{{rule=\"{}\",state=\"{state}\"}} {n}",
            escape(rule)
        );
    }
    let waiting: i64 = counts
        .iter()
        .filter(|(_, s, _)| matches!(s, MessageState::Scheduled | MessageState::Retrying))
        .map(|(_, _, n)| n)
        .sum();
    let _ = writeln!(
        out,
        "# HELP touchpoint_queue_depth Messages waiting to be sent (scheduled or retrying)."
    );
    let _ = writeln!(out, "# TYPE touchpoint_queue_depth gauge");
    let _ = writeln!(out, "touchpoint_queue_depth {waiting}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &crate::metrics::Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (bound, count) in h.bounds.iter().zip(&h.counts) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

/// Prometheus label values escape backslash, quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A 1x1 transparent GIF.
const PIXEL: [u8; 43] = [
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

const NO_STORE: (header::HeaderName, &str) = (
    header::CACHE_CONTROL,
    "no-store, no-cache, must-revalidate, private",
);

/// The same answer for a tampered token, an unknown message and a missing page.
fn not_found() -> Response {
    (StatusCode::NOT_FOUND, [NO_STORE], "not found\n").into_response()
}

/// The link a valid token stands for and its message: 404 for a bad token or an unknown
/// message, 503 while the database is unavailable (so a provider's one-click POST is retried
/// rather than lost).
async fn verified(shared: &Shared, token: &str) -> Result<(Link, LogEntry), Response> {
    let Some(link) = shared.links.as_ref().and_then(|links| links.verify(token)) else {
        return Err(not_found());
    };
    match shared.store.message(link.message()).await {
        Ok(Some(entry)) => Ok((link, entry)),
        Ok(None) => Err(not_found()),
        Err(error) => {
            tracing::warn!(%error, "cannot look up the message of a link");
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                [NO_STORE],
                "please try again in a minute\n",
            )
                .into_response())
        }
    }
}

fn page(title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{title}</title><style>body{{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;color:#222}}\
         button{{font-size:1rem;padding:.6rem 1.2rem}}</style></head><body>{body}</body></html>"
    );
    (
        [NO_STORE, (header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

fn business_name(shared: &Shared) -> String {
    escape_html(&shared.playbook.borrow().business.name)
}

/// GET shows a button; it never unsubscribes by itself (link scanners follow GET links). The
/// form has no `action`, so it posts to the URL the customer opened, whatever path prefix a
/// reverse proxy puts before `/u/`.
async fn unsubscribe_page(State(shared): State<Shared>, Path(token): Path<String>) -> Response {
    let (link, entry) = match verified(&shared, &token).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let Link::Unsubscribe { .. } = link else {
        return not_found();
    };
    let email = escape_html(&mask(entry.email.as_deref().unwrap_or_default()));
    let body = format!(
        "<h1>Unsubscribe</h1><p>Stop all emails from {} to {email}?</p>\
         <form method=\"post\"><button type=\"submit\">Unsubscribe</button></form>",
        business_name(&shared),
    );
    page("Unsubscribe", &body)
}

/// One-click unsubscribe (RFC 8058): takes effect at once, idempotently, with no cookies or
/// redirects; the form on the GET page posts here too.
async fn unsubscribe(State(shared): State<Shared>, Path(token): Path<String>) -> Response {
    let (link, entry) = match verified(&shared, &token).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let Link::Unsubscribe { message } = link else {
        return not_found();
    };
    let Some(email) = entry.email.filter(|e| !e.is_empty()) else {
        return not_found();
    };
    let done = async {
        let reason = format!("unsubscribed with the link in message {message}");
        // Whoever inserts the suppression records the event: concurrent POSTs record one.
        if shared
            .store
            .suppress(&email, &reason, "unsubscribe")
            .await?
        {
            shared
                .store
                .add_message_event(message, "unsubscribed", &serde_json::json!({}))
                .await?;
            tracing::info!(message_id = message, "unsubscribed");
        }
        Ok::<_, crate::store::StoreError>(())
    };
    if let Err(error) = done.await {
        tracing::warn!(%error, "cannot record an unsubscribe");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [NO_STORE],
            "please try again in a minute\n",
        )
            .into_response();
    }
    let body = format!(
        "<h1>You are unsubscribed</h1><p>{} will not email {} again.</p>",
        business_name(&shared),
        escape_html(&mask(&email))
    );
    page("Unsubscribed", &body)
}

async fn open_pixel(State(shared): State<Shared>, Path(file): Path<String>) -> Response {
    let Some(token) = file.strip_suffix(".gif") else {
        return not_found();
    };
    let Ok((Link::Open { message }, _)) = verified(&shared, token).await else {
        return not_found();
    };
    // One line per message however often the pixel is fetched; repeats are counted.
    if let Err(error) = shared
        .store
        .record_message_event_once(message, "opened", "", &serde_json::json!({}))
        .await
    {
        tracing::warn!(%error, "cannot record an open");
    }
    (
        [NO_STORE, (header::CONTENT_TYPE, "image/gif")],
        PIXEL.as_slice(),
    )
        .into_response()
}

/// Redirects only to the URL inside the signed token. The token alone decides, so a click
/// still works while the database is away; recording it is best effort.
async fn click(State(shared): State<Shared>, Path(token): Path<String>) -> Response {
    let Some(Link::Click { message, url }) =
        shared.links.as_ref().and_then(|links| links.verify(&token))
    else {
        return not_found();
    };
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return not_found();
    }
    // One line per message and link however often it is followed; repeats are counted.
    let detail = serde_json::json!({ "url": url });
    if let Err(error) = shared
        .store
        .record_message_event_once(message, "clicked", &crate::links::click_key(&url), &detail)
        .await
    {
        tracing::warn!(%error, "cannot record a click");
    }
    (
        StatusCode::FOUND,
        [NO_STORE, (header::LOCATION, location(&url).as_str())],
    )
        .into_response()
}

/// A URL as a `Location` value: ASCII only (RFC 9110), so bytes outside printable ASCII (an
/// `été` in a path) are percent-encoded; everything else is left exactly as written.
fn location(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    for byte in url.bytes() {
        if byte.is_ascii_graphic() {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// `POST /hooks/bounce` with `Authorization: Bearer <bounces.webhook_secret>` and a JSON body
/// `{"type": "hard"|"soft"|"complaint", "message_id": "...", "return_path": "...", "email": "...",
/// "status": "5.1.1", "detail": "..."}`. A report that names a message (by Message-ID or the VERP
/// `return_path`) is held to the same rules as a piped one ([`crate::bounce::apply`]); one with
/// only an `email` suppresses that address.
async fn bounce_hook(
    State(shared): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(secret) = &shared.bounce_webhook_secret else {
        return not_found();
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !constant_time_eq(presented.as_bytes(), secret.expose().as_bytes()) {
        return (
            StatusCode::UNAUTHORIZED,
            "a valid Authorization: Bearer token is required\n",
        )
            .into_response();
    }
    let report: BounceReport = match serde_json::from_slice(&body) {
        Ok(report) => report,
        Err(error) => {
            return (StatusCode::BAD_REQUEST, format!("bad JSON body: {error}\n")).into_response();
        }
    };
    use crate::bounce::{BounceError, Sender};
    match crate::bounce::apply(
        &shared.store,
        &report,
        &shared.bounce_rules,
        Sender::Provider,
    )
    .await
    {
        Ok(applied) => axum::Json(applied).into_response(),
        Err(error @ BounceError::UnknownMessage { .. }) => {
            tracing::info!(%error, "bounce webhook");
            (StatusCode::NOT_FOUND, format!("{error}\n")).into_response()
        }
        Err(error @ BounceError::Unverified(_)) => {
            tracing::warn!(%error, "bounce webhook: report refused");
            (StatusCode::UNPROCESSABLE_ENTITY, format!("{error}\n")).into_response()
        }
        Err(
            error @ (BounceError::WrongRecipient { message, .. }
            | BounceError::NoRecipient { message }),
        ) => {
            // The addresses go to the caller, not into the log.
            tracing::warn!(
                message_id = message,
                "bounce webhook: report refused: its recipient is not the message's"
            );
            (StatusCode::UNPROCESSABLE_ENTITY, format!("{error}\n")).into_response()
        }
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")).into_response(),
    }
}

/// Compares without an early exit, so timing does not reveal how much of a secret matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `ada@example.com` -> `a**@example.com`: enough for its owner to recognise.
fn mask(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!(
                "{first}{}@{domain}",
                "*".repeat(local.chars().count().saturating_sub(1).min(6))
            )
        }
        None => email.to_string(),
    }
}

pub fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod health_tests {
    use super::*;

    #[test]
    fn healthz_names_a_reason_class_never_the_error_text() {
        let leaky = || "duplicate key value (email)=(ada@example.com)".to_string();
        let cases = [
            (Some(Ok(())), true, "reachable"),
            (None, false, "timeout"),
            (
                Some(Err(StoreError::Unavailable(sqlx::Error::Protocol(leaky())))),
                false,
                "unreachable",
            ),
            (
                Some(Err(StoreError::Query(sqlx::Error::Protocol(leaky())))),
                false,
                "error",
            ),
            (Some(Err(StoreError::Invalid(leaky()))), false, "error"),
        ];
        for (answer, ok, detail) in cases {
            let check = database_check(answer);
            assert_eq!((check.ok, check.detail.as_str()), (ok, detail));
        }
    }
}
