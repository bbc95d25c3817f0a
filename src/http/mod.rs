//! The HTTP listener: `/healthz` for load balancers and monitors, `/metrics` for Prometheus,
//! the links in messages (`/u/{token}` unsubscribe, `/o/{token}.gif` opens, `/c/{token}`
//! clicks) and `POST /hooks/bounce` for providers' bounce webhooks; the ingest API
//! ([`crate::ingest`]) and the owner's page ([`crate::web`]) are merged into the same router.

mod bounce_hook;
mod health;
mod links;
mod metrics;
mod rating;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::web::Shared;

pub use links::escape_html;

pub fn router(shared: Shared) -> Router {
    let web = crate::web::router(shared.clone());
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(metrics::metrics))
        .route(
            "/u/{token}",
            get(links::unsubscribe_page).post(links::unsubscribe),
        )
        .route("/o/{file}", get(links::open_pixel))
        .route("/c/{token}", get(links::click))
        .route("/r/{token}", get(rating::rating_page).post(rating::rate))
        .route("/hooks/bounce", post(bounce_hook::bounce_hook))
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

/// Answers to links are never cached: every open, click and unsubscribe must reach the daemon.
const NO_STORE: (header::HeaderName, &str) = (
    header::CACHE_CONTROL,
    "no-store, no-cache, must-revalidate, private",
);

/// The same answer for a tampered token, an unknown message and a missing page.
fn not_found() -> Response {
    (StatusCode::NOT_FOUND, [NO_STORE], "not found\n").into_response()
}
