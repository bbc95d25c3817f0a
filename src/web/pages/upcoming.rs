//! `/upcoming`: what goes out in the next 7 days (the same list as `touchpoint plan`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::encode_path;
use crate::web::Shared;
use crate::web::{Owner, problem};

pub async fn upcoming(owner: Owner, State(shared): State<Shared>) -> Response {
    let web = owner.web.clone();
    let playbook = shared.playbook.borrow().clone();
    let upcoming = crate::query::upcoming(&playbook, &web.plan, &shared.store, 7).await;
    let rows = match upcoming {
        Ok(upcoming) => {
            for problem in &upcoming.unreadable {
                tracing::warn!(%problem, "web page: the plan leaves out a source it cannot read");
            }
            upcoming.rows
        }
        Err(error) => {
            tracing::warn!(%error, "web page: cannot compute the plan");
            return owner.with_cookie(problem(
                &web,
                StatusCode::SERVICE_UNAVAILABLE,
                "The plan cannot be computed",
                "touchpoint cannot read its database right now. Try again in a minute.",
            ));
        }
    };
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "due": web.time(r.due_at),
                "rule": r.rule,
                "customer_id": r.customer_id,
                "customer_link": format!("/customers/{}", encode_path(&r.customer_id)),
                "email": r.email,
                "status": r.status,
                "why": r.why,
                "link": r.message_id.map(|id| format!("/messages/{id}")),
            })
        })
        .collect();
    let data = json!({
        "page": owner.page("Upcoming", "upcoming"),
        "rows": rows,
        "timezone": web.timezone.name(),
    });
    owner.render("upcoming", &data)
}
