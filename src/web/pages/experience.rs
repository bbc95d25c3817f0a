//! `/experience`: how customers answered over the last 90 days (the same figures as
//! `touchpoint report --since 90d`): CSAT and NPS per rule and by week, ratings and replies per
//! message sent, and the latest comments and replies with links to the customer and message.

use axum::extract::State;
use axum::response::Response;
use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};

use super::unavailable;
use crate::experience::{Figures, experience};
use crate::web::{Owner, Shared};

/// The period the page shows.
const DAYS: i64 = 90;

pub async fn experience_page(owner: Owner, State(shared): State<Shared>) -> Response {
    let web = owner.web.clone();
    let since = Utc::now() - TimeDelta::days(DAYS);
    let report = match experience(&shared.store, since, None).await {
        Ok(report) => report,
        Err(error) => return owner.with_cookie(unavailable(&web, &error)),
    };
    let rules: Vec<Value> = report
        .rules
        .iter()
        .map(|r| figures(&r.rule, &r.figures))
        .collect();
    let weeks: Vec<Value> = report
        .weeks
        .iter()
        .map(|w| figures(&w.week.format("%Y-%m-%d").to_string(), &w.figures))
        .collect();
    let latest: Vec<Value> = report
        .latest
        .iter()
        .map(|v| {
            json!({
                "at": web.time(v.at),
                "kind": if v.kind == "rated" { "comment" } else { "reply" },
                "score": v.score.map(|s| format!("{s} ({})", v.scale.as_deref().unwrap_or(""))),
                "customer_id": v.customer_id,
                "customer_link": super::customer_link(&v.customer_id),
                "rule": v.rule,
                "message_link": v.message_id.map(|id| format!("/messages/{id}")),
                "message_id": v.message_id,
                "text": v.text,
            })
        })
        .collect();
    let data = json!({
        "page": owner.page("Experience", "experience"),
        "days": DAYS,
        "rules": rules,
        "total": figures("All rules", &report.total),
        "weeks": weeks,
        "latest": latest,
    });
    owner.render("experience", &data)
}

/// One row of figures, percentages written out ("–" where there is nothing to compute from).
fn figures(name: &str, f: &Figures) -> Value {
    let percent = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |v| format!("{v}%"));
    let signed = |v: Option<f64>| v.map_or_else(|| "–".to_string(), |v| format!("{v:+}"));
    json!({
        "name": name,
        "sent": f.sent,
        "rated": f.rated,
        "rating_rate": percent(f.rating_rate),
        "csat": percent(f.csat),
        "csat_answers": f.csat_answers,
        "nps": signed(f.nps),
        "nps_answers": f.nps_answers,
        "replied": f.replied,
        "reply_rate": percent(f.reply_rate),
    })
}
