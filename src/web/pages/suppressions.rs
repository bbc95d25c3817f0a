//! `/suppressions`: the addresses never emailed, and the forms that add and remove one.

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{csrf_failed, unavailable};
use crate::store::Suppression;
use crate::web::Shared;
use crate::web::{Owner, Web, redirect, safe_next};

pub async fn suppressions(owner: Owner, State(shared): State<Shared>) -> Response {
    let web = owner.web.clone();
    let list = match shared.store.suppressions().await {
        Ok(list) => list,
        Err(error) => return owner.with_cookie(unavailable(&web, &error)),
    };
    let data = json!({
        "page": owner.page("Suppressions", "suppressions"),
        "rows": rows(&web, &list),
        "error": Value::Null,
        "email": "",
    });
    owner.render("suppressions", &data)
}

/// The list, newest first.
fn rows(web: &Web, list: &[Suppression]) -> Vec<Value> {
    list.iter()
        .rev()
        .map(|s| {
            json!({
                "email": s.email,
                "reason": s.reason,
                "source": s.source,
                "at": web.time(s.created_at),
            })
        })
        .collect()
}

#[derive(Debug, Deserialize)]
pub struct SuppressForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    reason: String,
    /// Where to go afterwards (a path on this site).
    #[serde(default)]
    back: Option<String>,
}

pub async fn suppress(
    owner: Owner,
    State(shared): State<Shared>,
    Form(form): Form<SuppressForm>,
) -> Response {
    if !owner.csrf_ok(&form.csrf) {
        return csrf_failed(&owner);
    }
    let email = form.email.trim();
    if let Err(message) = crate::import::check_email(email) {
        let web = owner.web.clone();
        let list = shared.store.suppressions().await.unwrap_or_default();
        let data = json!({
            "page": owner.page("Suppressions", "suppressions"),
            "rows": rows(&web, &list),
            "error": message,
            "email": email,
        });
        let mut response = owner.render("suppressions", &data);
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    }
    let reason = match form.reason.trim() {
        "" => "added by the owner on the web page",
        reason => reason,
    };
    if let Err(error) = shared.store.suppress(email, reason, "owner").await {
        return owner.with_cookie(unavailable(&owner.web, &error));
    }
    // Addresses only at debug level, like everywhere else in the logs.
    tracing::info!("an address was suppressed from the web page");
    tracing::debug!(email, "suppressed from the web page");
    owner.with_cookie(redirect(&safe_next(
        form.back.as_deref().or(Some("/suppressions")),
    )))
}

pub async fn unsuppress(
    owner: Owner,
    State(shared): State<Shared>,
    Form(form): Form<SuppressForm>,
) -> Response {
    if !owner.csrf_ok(&form.csrf) {
        return csrf_failed(&owner);
    }
    if let Err(error) = shared.store.unsuppress(form.email.trim()).await {
        return owner.with_cookie(unavailable(&owner.web, &error));
    }
    tracing::info!("an address was removed from the suppressions from the web page");
    tracing::debug!(email = form.email.trim(), "unsuppressed from the web page");
    owner.with_cookie(redirect(&safe_next(
        form.back.as_deref().or(Some("/suppressions")),
    )))
}
