//! `/login` and `/logout`: the password form (CSRF-bound, rate-limited per address) and the
//! end of a session.

use axum::extract::{ConnectInfo, Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use super::{csrf_failed, plural, unavailable};
use crate::web::Shared;
use crate::web::{Owner, Web, auth, redirect, safe_next};

#[derive(Debug, Default, Deserialize)]
pub struct NextQuery {
    #[serde(default)]
    next: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    next: Option<String>,
}

/// The login form, with a CSRF token tied to a `tp_csrf` cookie (set here when missing).
fn login_form(
    web: &Web,
    headers: &HeaderMap,
    status: StatusCode,
    next: &str,
    error: Option<&str>,
) -> Response {
    let (binding, cookie) = match crate::web::cookie_value(headers, auth::CSRF_COOKIE) {
        Some(value) => (value.to_string(), None),
        None => {
            let value = auth::random_token();
            let cookie = web.cookie(auth::CSRF_COOKIE, &value, None, web.secure(headers));
            (value, Some(cookie))
        }
    };
    let data = json!({
        "page": { "title": "Log in", "nav": "", "csrf": "", "logged_in": false },
        "csrf": web.keys.csrf_token(&binding),
        "next": next,
        "error": error,
    });
    let mut response = web.render("login", &data);
    *response.status_mut() = status;
    if let Some(cookie) = cookie
        && let Ok(value) = HeaderValue::from_str(&cookie)
    {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

pub async fn login_page(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<NextQuery>,
) -> Response {
    let Some(web) = shared.web.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let next = safe_next(query.next.as_deref());
    if web.password_hash.is_none() {
        return match crate::web::not_for_you(&web, Some(peer), &headers) {
            Some(refusal) => refusal,
            None => redirect(&next),
        };
    }
    match web.session(&headers, &shared.store).await {
        Ok(Some(_)) => redirect(&next),
        Ok(None) => login_form(&web, &headers, StatusCode::OK, &next, None),
        Err(error) => unavailable(&web, &error),
    }
}

/// 429 with `Retry-After` and the login form saying why.
fn too_many(web: &Web, headers: &HeaderMap, next: &str, wait: u64, message: &str) -> Response {
    let mut response = login_form(
        web,
        headers,
        StatusCode::TOO_MANY_REQUESTS,
        next,
        Some(message),
    );
    if let Ok(value) = HeaderValue::from_str(&wait.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Checks the password (one check at a time); `None` when no answer came within `HASH_WAIT`.
async fn check_password(web: &Web, password: String) -> Option<bool> {
    web.passwords
        .as_ref()?
        .check(password, crate::web::HASH_WAIT)
        .await
}

pub async fn login(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let Some(web) = shared.web.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let next = safe_next(form.next.as_deref());
    if web.password_hash.is_none() {
        return redirect(&next);
    }
    let ip = crate::web::client::client_ip(Some(peer), &headers, &web.proxies);
    let binding = crate::web::cookie_value(&headers, auth::CSRF_COOKIE).unwrap_or_default();
    if !web.keys.csrf_ok(binding, &form.csrf) {
        return login_form(
            &web,
            &headers,
            StatusCode::FORBIDDEN,
            &next,
            Some("The form was too old or did not come from this page. Please try again."),
        );
    }
    // Counted before the check: parallel attempts get no more checks than sequential ones.
    if let Err(wait) = web.keys.reserve_login(ip) {
        tracing::warn!(%ip, "web login: too many failed attempts");
        let minutes = wait.div_ceil(60);
        let message = format!(
            "Too many wrong passwords from your address. Try again in {minutes} minute{}.",
            plural(minutes as i64)
        );
        return too_many(&web, &headers, &next, wait, &message);
    }
    let Some(verified) = check_password(&web, form.password).await else {
        web.keys.release_login(ip);
        tracing::warn!(%ip, "web login: too many logins at once");
        let message = "Too many logins at once. Try again in a few seconds.";
        return too_many(&web, &headers, &next, 2, message);
    };
    if !verified {
        tracing::warn!(%ip, "web login: wrong password");
        return login_form(
            &web,
            &headers,
            StatusCode::UNAUTHORIZED,
            &next,
            Some("That password is not right."),
        );
    }
    web.keys.login_succeeded(ip);
    tracing::info!(%ip, "web login");
    let lifetime = web.session_lifetime;
    let (_, cookie) = web.keys.new_session(Utc::now() + lifetime);
    let mut response = redirect(&next);
    let set = web.cookie(
        auth::SESSION_COOKIE,
        &cookie,
        Some(lifetime.num_seconds()),
        web.secure(&headers),
    );
    if let Ok(value) = HeaderValue::from_str(&set) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

#[derive(Debug, Deserialize)]
pub struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

/// Ends the session for good (in the database, for every replica and after restarts); if the
/// database cannot record it, says so and keeps the cookie, so that the owner can try again.
pub async fn logout(
    owner: Owner,
    State(shared): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    if !owner.csrf_ok(&form.csrf) {
        return csrf_failed(&owner);
    }
    let web = &owner.web;
    if let Some(session) = &owner.session
        && let Err(error) = web.end_session(session, &shared.store).await
    {
        return unavailable(web, &error);
    }
    let target = if web.password_hash.is_some() {
        "/login"
    } else {
        "/"
    };
    let mut response = redirect(target);
    let cleared = web.cookie(auth::SESSION_COOKIE, "", Some(0), web.secure(&headers));
    if let Ok(value) = HeaderValue::from_str(&cleared) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}
