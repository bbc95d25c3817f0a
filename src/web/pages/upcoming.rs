//! `/upcoming`: what goes out in the next 7 days (the same list as `touchpoint plan`).

use std::collections::{BTreeSet, HashMap};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Timelike, Utc};
use serde_json::{Value, json};

use crate::plan::customer_timezone;
use crate::query::PlannedRow;
use crate::store::Customer;
use crate::web::Shared;
use crate::web::{Owner, Web, problem};

/// Local hours at which a message is unsociable: before 08:00 and from 21:00.
const SOCIABLE_FROM: u32 = 8;
const SOCIABLE_UNTIL: u32 = 21;

/// The customers of the rows, by id (those that cannot be read are left out).
async fn customers(shared: &Shared, rows: &[PlannedRow]) -> HashMap<String, Customer> {
    let ids: BTreeSet<&str> = rows.iter().map(|r| r.customer_id.as_str()).collect();
    let mut customers = HashMap::new();
    for id in ids {
        if let Ok(Some(customer)) = shared.store.customer(id).await {
            customers.insert(id.to_string(), customer);
        }
    }
    customers
}

/// "arrives at 03:10 in Asia/Tokyo" when a message of a rule without a send window reaches
/// the customer at night (their zone, or the default).
fn unsociable_local_time(
    web: &Web,
    customer: Option<&Customer>,
    due: DateTime<Utc>,
) -> Option<String> {
    let zone = customer.map_or(web.plan.default_timezone, |c| {
        customer_timezone(c, web.plan.default_timezone)
    });
    let local = due.with_timezone(&zone);
    let hour = local.hour();
    (!(SOCIABLE_FROM..SOCIABLE_UNTIL).contains(&hour))
        .then(|| format!("arrives at {} in {}", local.format("%H:%M"), zone.name()))
}

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
    let customers = customers(&shared, &rows).await;
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            let customer = customers.get(&r.customer_id);
            let unsociable = playbook
                .rule(&r.rule)
                .is_some_and(|rule| rule.send_window.is_none())
                .then(|| unsociable_local_time(&web, customer, r.due_at))
                .flatten();
            json!({
                "due": web.time(r.due_at),
                "rule": r.rule,
                "customer_id": r.customer_id,
                "name": if r.rule == crate::digest::RULE {
                    Some("the owner's digest".to_string())
                } else {
                    customer.and_then(|c| c.name.clone()).filter(|n| !n.trim().is_empty())
                },
                "customer_link": super::customer_link(&r.customer_id),
                "email": r.email,
                "status": r.status,
                "why": r.event.as_ref().map_or_else(|| r.why.clone(), |e| {
                    format!("{} {} ({})", e.kind, e.id, web.event_time(e.occurred_at))
                }),
                "unsociable": unsociable,
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
