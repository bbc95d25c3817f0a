//! The links in messages: `/u/{token}` unsubscribe (a page with a button, and RFC 8058
//! one-click POST), `/o/{token}.gif` the open pixel, `/c/{token}` clicks. Each token is signed
//! ([`crate::links`]); a bad one gets the same 404 as an unknown message. The links of a test
//! send ([`crate::links::is_test_send`]) change and record nothing: they answer with a page
//! saying so (the pixel with the pixel).

use std::fmt::Write as _;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{NO_STORE, not_found};
use crate::links::{Link, is_test_send};
use crate::store::LogEntry;
use crate::web::Shared;

/// A 1x1 transparent GIF.
const PIXEL: [u8; 43] = [
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// The link a valid token stands for and its message: 404 for a bad token or an unknown
/// message, 503 while the database is unavailable (so a provider's one-click POST is retried
/// rather than lost).
pub(super) async fn verified(shared: &Shared, token: &str) -> Result<(Link, LogEntry), Response> {
    let Some(link) = shared.links.as_ref().and_then(|links| links.verify(token)) else {
        return Err(not_found());
    };
    if is_test_send(link.message()) {
        return Err(test_send_page(&link));
    }
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

pub(super) fn page(title: &str, body: &str) -> Response {
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

/// What a link of a test send answers: nobody is unsubscribed, nothing is counted.
fn test_send_page(link: &Link) -> Response {
    if let Link::Open { .. } = link {
        return pixel();
    }
    let leads_to = match link {
        Link::Click { url, .. } => {
            let url = escape_html(url);
            format!("<p>In a real message this link leads to <a href=\"{url}\">{url}</a>.</p>")
        }
        Link::Rating { score, .. } => {
            format!("<p>In a real message this link rates it {score} and asks for a comment.</p>")
        }
        _ => "<p>In a real message this link unsubscribes the customer.</p>".into(),
    };
    let body = format!(
        "<h1>This was a test</h1><p>This link is in a test send (<code>touchpoint preview \
         --send-to</code>): nothing was changed or recorded, and nobody was unsubscribed.</p>\
         {leads_to}"
    );
    page("This was a test", &body)
}

fn pixel() -> Response {
    (
        [NO_STORE, (header::CONTENT_TYPE, "image/gif")],
        PIXEL.as_slice(),
    )
        .into_response()
}

pub(super) fn business_name(shared: &Shared) -> String {
    escape_html(&shared.playbook.borrow().business.name)
}

/// GET shows a button; it never unsubscribes by itself (link scanners follow GET links). The
/// form has no `action`, so it posts to the URL the customer opened, whatever path prefix a
/// reverse proxy puts before `/u/`.
pub(super) async fn unsubscribe_page(
    State(shared): State<Shared>,
    Path(token): Path<String>,
) -> Response {
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
pub(super) async fn unsubscribe(
    State(shared): State<Shared>,
    Path(token): Path<String>,
) -> Response {
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

pub(super) async fn open_pixel(State(shared): State<Shared>, Path(file): Path<String>) -> Response {
    let Some(token) = file.strip_suffix(".gif") else {
        return not_found();
    };
    match shared.links.as_ref().and_then(|links| links.verify(token)) {
        // A test send's pixel: served, not counted.
        Some(Link::Open { message }) if is_test_send(message) => return pixel(),
        Some(Link::Open { .. }) => {}
        _ => return not_found(),
    }
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
    pixel()
}

/// Redirects only to the URL inside the signed token. The token alone decides, so a click
/// still works while the database is away; recording it is best effort.
pub(super) async fn click(State(shared): State<Shared>, Path(token): Path<String>) -> Response {
    let Some(Link::Click { message, url }) =
        shared.links.as_ref().and_then(|links| links.verify(&token))
    else {
        return not_found();
    };
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return not_found();
    }
    if is_test_send(message) {
        return test_send_page(&Link::Click { message, url });
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
