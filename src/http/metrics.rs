//! `GET /metrics` for Prometheus: message counts (from a shared, rate-limited scan), this
//! process's outcomes and latencies, reloads, database errors and each source's reads.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::store::MessageState;
use crate::web::Shared;

/// Always 200 with what is known: when the database does not answer, the per-state gauges are
/// left out and `touchpoint_database_up` is 0, so the error counters stay visible in an outage.
pub(super) async fn metrics(State(shared): State<Shared>) -> Response {
    let text = render_metrics(&shared).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn render_metrics(shared: &Shared) -> String {
    let scan = shared.metrics.scan(&shared.store).await;
    let counts = scan.counts.as_ref();
    let mut out = String::new();
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
    render_sending(&mut out, shared);
    if let Some(backlog) = scan.backlog {
        render_backlog(&mut out, backlog);
    }
    if let Some(ratings) = &scan.ratings {
        render_ratings(&mut out, ratings);
    }
    if let Some(replies) = &scan.replies {
        render_replies(&mut out, replies);
    }
    render_daemon(&mut out, shared);
    let sources = shared.playbook.borrow().sources.clone();
    render_sources(&mut out, &sources);
    out
}

/// Rated messages per rule, scale and score (each message counted once, by its last answer).
fn render_ratings(out: &mut String, ratings: &[(String, String, i64, i64)]) {
    let _ = writeln!(
        out,
        "# HELP touchpoint_ratings_total Rated messages by rule, scale and score (the last answer \
         of each message)."
    );
    let _ = writeln!(out, "# TYPE touchpoint_ratings_total counter");
    for (rule, scale, score, n) in ratings {
        let _ = writeln!(
            out,
            "touchpoint_ratings_total{{rule=\"{}\",scale=\"{}\",score=\"{score}\"}} {n}",
            escape(rule),
            escape(scale)
        );
    }
}

/// This process's attempt outcomes and its send and lateness histograms.
fn render_sending(out: &mut String, shared: &Shared) {
    let health = &shared.health;
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
        out,
        "touchpoint_send_seconds",
        "Time from claim to outcome of a send attempt.",
        &health.send_latency(),
    );
    histogram(
        out,
        "touchpoint_lateness_seconds",
        "How long after its due time a sent message went out.",
        &health.lateness(),
    );
}

/// The waiting messages already due, and how long the oldest has waited.
fn render_backlog(out: &mut String, (due, oldest): (i64, Option<f64>)) {
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

/// Reloads, failed reloads and database errors seen by this process.
fn render_daemon(out: &mut String, shared: &Shared) {
    let health = &shared.health;
    let ordering = Ordering::Relaxed;
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
    // Only when [replies.imap] is on (the watcher reports from its first attempt).
    if let Some(imap) = health.imap() {
        let _ = writeln!(
            out,
            "# HELP touchpoint_replies_imap_up Whether the [replies.imap] watcher is logged in \
             and watching its mailbox."
        );
        let _ = writeln!(out, "# TYPE touchpoint_replies_imap_up gauge");
        let _ = writeln!(out, "touchpoint_replies_imap_up {}", u8::from(imap.ok));
    }
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

fn render_replies(out: &mut String, replies: &[(String, i64)]) {
    let _ = writeln!(
        out,
        "# HELP touchpoint_replies_total Customers' replies by the rule of the message they \
         answered (rule=\"\" when known by the sender's address alone)."
    );
    let _ = writeln!(out, "# TYPE touchpoint_replies_total counter");
    for (rule, n) in replies {
        let _ = writeln!(
            out,
            "touchpoint_replies_total{{rule=\"{}\"}} {n}",
            escape(rule)
        );
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
