//! The HTTP listener: `/healthz` for load balancers and monitors, `/metrics` for Prometheus.

use std::fmt::Write as _;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::daemon::{LATENCY_BUCKETS, Shared};
use crate::store::MessageState;

/// The dispatcher turns its loop at least every 10 s; three missed turns mean it is stuck.
const DISPATCHER_STALL: Duration = Duration::from_secs(30);

pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// Serves until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, shared: Shared, shutdown: CancellationToken) {
    let server =
        axum::serve(listener, router(shared)).with_graceful_shutdown(shutdown.cancelled_owned());
    if let Err(error) = server.await {
        tracing::error!(%error, "the HTTP listener stopped");
    }
}

#[derive(serde::Serialize)]
struct HealthReport {
    healthy: bool,
    database: Check,
    dispatcher: Check,
    last_reload: Option<crate::daemon::ReloadStatus>,
}

#[derive(serde::Serialize)]
struct Check {
    ok: bool,
    detail: String,
}

async fn healthz(State(shared): State<Shared>) -> Response {
    let database = match tokio::time::timeout(Duration::from_secs(3), shared.store.ping()).await {
        Ok(Ok(())) => Check {
            ok: true,
            detail: "reachable".into(),
        },
        Ok(Err(error)) => Check {
            ok: false,
            detail: error.to_string(),
        },
        Err(_) => Check {
            ok: false,
            detail: "no answer within 3s".into(),
        },
    };
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
    };
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

async fn metrics(State(shared): State<Shared>) -> Response {
    match render_metrics(&shared).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database error: {error}\n"),
        )
            .into_response(),
    }
}

async fn render_metrics(shared: &Shared) -> Result<String, crate::store::StoreError> {
    let counts = shared.store.counts().await?;
    let mut out = String::new();
    let health = &shared.health;
    let _ = writeln!(
        out,
        "# HELP touchpoint_messages Messages in the database by rule and state."
    );
    let _ = writeln!(out, "# TYPE touchpoint_messages gauge");
    for (rule, state, n) in &counts {
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
    let latency = health.send_latency();
    let _ = writeln!(
        out,
        "# HELP touchpoint_send_seconds Time from claim to outcome of a send attempt."
    );
    let _ = writeln!(out, "# TYPE touchpoint_send_seconds histogram");
    for (bound, count) in LATENCY_BUCKETS.iter().zip(latency.counts) {
        let _ = writeln!(
            out,
            "touchpoint_send_seconds_bucket{{le=\"{bound}\"}} {count}"
        );
    }
    let _ = writeln!(
        out,
        "touchpoint_send_seconds_bucket{{le=\"+Inf\"}} {}",
        latency.count
    );
    let _ = writeln!(out, "touchpoint_send_seconds_sum {}", latency.sum);
    let _ = writeln!(out, "touchpoint_send_seconds_count {}", latency.count);
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
    Ok(out)
}

/// Prometheus label values escape backslash, quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
