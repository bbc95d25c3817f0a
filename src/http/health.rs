//! `GET /healthz` for load balancers and monitors: 200 when the database answers and the
//! dispatcher turns its loop, 503 otherwise, with each part's state as JSON.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;
use crate::web::Shared;

/// The dispatcher turns its loop at least every 10 s; three missed turns mean it is stuck.
const DISPATCHER_STALL: Duration = Duration::from_secs(30);

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
    /// The `[replies.imap]` watcher, when on. Like a source, a mailbox that cannot be read
    /// does not make the daemon unhealthy: sending goes on, and a restart would not help.
    #[serde(skip_serializing_if = "Option::is_none")]
    replies_imap: Option<crate::metrics::ImapStatus>,
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

pub(super) async fn healthz(State(shared): State<Shared>) -> Response {
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
        replies_imap: shared.health.imap(),
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
