//! `POST /hooks/bounce`: bounce and complaint reports from a mail provider's webhook.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::not_found;
use crate::bounce::BounceReport;
use crate::web::Shared;

/// `POST /hooks/bounce` with `Authorization: Bearer <bounces.webhook_secret>` and a JSON body
/// `{"type": "hard"|"soft"|"complaint", "message_id": "...", "return_path": "...", "email": "...",
/// "status": "5.1.1", "detail": "..."}`. A report that names a message (by Message-ID or the VERP
/// `return_path`) is held to the same rules as a piped one ([`crate::bounce::apply`]); one with
/// only an `email` suppresses that address.
pub(super) async fn bounce_hook(
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
