//! The ingest API, for applications that push their customers and events rather than write
//! the tables themselves: `POST /api/v1/customers` and `POST /api/v1/events`, JSON, one
//! object or an array of them (a batch).
//!
//! Every request carries `Authorization: Bearer <token>` with one of the `[[api.tokens]]`; the
//! log names the token that wrote. A batch is checked whole before anything is written and is
//! written in one transaction, so a bad item writes nothing, and every mistake is reported at
//! once as `{"item": index, "field": name, "message": text}`. Events are idempotent by id: an
//! event whose id exists already is left as it is, so a retried POST is harmless.
//!
//! Batches posted at the same moment may name the same rows: each is written in the order of
//! its ids, so they wait for each other rather than deadlock, and one the database aborts over
//! a conflict anyway is tried again before the caller gets a 503. A customer update is merged
//! by the database with the row as it is when written, so two at once both keep their changes.

pub mod items;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt as _;
use rand::Rng as _;
use serde_json::Value;

pub use crate::runtime::ApiTokens;
use crate::runtime::Shared;
use crate::store::{SharedStore, StoreError};
use items::Problem;

/// The largest body taken (1 MiB): room for a full batch of ordinary items.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// The most items in one batch: one transaction stays short and one mistake costs little.
pub const MAX_ITEMS: usize = 1000;

pub fn router<W: Send + Sync + 'static>() -> Router<Shared<W>> {
    Router::new()
        .route("/api/v1/events", post(post_events))
        .route("/api/v1/customers", post(post_customers))
}

/// Why a request wrote nothing; each says what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(
        "the ingest API is off: add an [[api.tokens]] entry (name and token_env, token_file or \
         token_credential) to the config and restart touchpoint"
    )]
    Off,
    #[error("this API needs an Authorization: Bearer <token> header with one of api.tokens")]
    MissingToken,
    #[error("the bearer token is not one of api.tokens")]
    WrongToken,
    #[error("the body is larger than {MAX_BODY_BYTES} bytes; send the items in smaller batches")]
    BodyTooLarge,
    #[error("a batch holds at most {MAX_ITEMS} items, this one has {0}; send it in parts")]
    TooManyItems(usize),
    #[error("cannot read the request body: {0}")]
    Read(String),
    #[error("the body is not JSON: {0}")]
    Malformed(String),
    #[error("{}; nothing was written", mistakes(.0.len()))]
    Invalid(Vec<Problem>),
    #[error("the database is unavailable; nothing was written, try again later")]
    Store(#[source] StoreError),
    /// The batch lost a conflict with other writes (a deadlock) on every try.
    #[error(
        "the batch conflicted with other writes of the same rows at the same moment, {CONFLICT_ATTEMPTS} times; nothing was written, try again"
    )]
    Conflict(#[source] StoreError),
    /// The database refused the batch for a reason a retry will not change.
    #[error(
        "the database refused the batch; nothing was written, and retrying will not help (touchpoint's log says why)"
    )]
    Refused(#[source] StoreError),
}

fn mistakes(count: usize) -> String {
    match count {
        1 => "1 mistake".into(),
        n => format!("{n} mistakes"),
    }
}

/// Every error answer: what went wrong, and for 400 and 422 each problem.
#[derive(serde::Serialize)]
struct ErrorBody {
    message: String,
    errors: Vec<Problem>,
}

/// The answer to a customer batch written.
#[derive(serde::Serialize)]
struct CustomerCounts {
    received: u64,
    created: u64,
    updated: u64,
}

/// The answer to an event batch written.
#[derive(serde::Serialize)]
struct EventCounts {
    received: u64,
    created: u64,
    duplicates: u64,
}

impl IngestError {
    fn status(&self) -> StatusCode {
        match self {
            IngestError::Off => StatusCode::NOT_FOUND,
            IngestError::MissingToken | IngestError::WrongToken => StatusCode::UNAUTHORIZED,
            IngestError::BodyTooLarge | IngestError::TooManyItems(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            IngestError::Read(_) | IngestError::Malformed(_) => StatusCode::BAD_REQUEST,
            IngestError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            IngestError::Store(_) | IngestError::Conflict(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Refused(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let errors = match &self {
            IngestError::Invalid(problems) => problems.clone(),
            IngestError::Malformed(_) => vec![Problem::request(self.to_string())],
            _ => Vec::new(),
        };
        let body = ErrorBody {
            message: self.to_string(),
            errors,
        };
        let mut response = (self.status(), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            IngestError::MissingToken => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"touchpoint\""),
                );
            }
            IngestError::WrongToken => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"touchpoint\", error=\"invalid_token\"",
                    ),
                );
            }
            IngestError::Store(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            }
            IngestError::Conflict(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// The name of the caller's token; checked before the body is read.
fn authenticate<'a>(tokens: &'a ApiTokens, headers: &HeaderMap) -> Result<&'a str, IngestError> {
    if tokens.is_off() {
        return Err(IngestError::Off);
    }
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(IngestError::MissingToken)?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(IngestError::MissingToken);
    }
    tokens.identify(token.trim()).ok_or_else(|| {
        tracing::warn!("ingest API: refused a request with a wrong bearer token");
        IngestError::WrongToken
    })
}

/// The body, refused as soon as it is known to be larger than `MAX_BODY_BYTES` (by its
/// Content-Length, else while reading).
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, IngestError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(IngestError::BodyTooLarge);
    }
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| IngestError::Read(e.to_string()))?;
        if bytes.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(IngestError::BodyTooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The items of a body: an array is a batch, an object a batch of one.
fn batch(body: &[u8]) -> Result<Vec<Value>, IngestError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| IngestError::Malformed(e.to_string()))?;
    let values = match value {
        Value::Array(values) => values,
        object @ Value::Object(_) => vec![object],
        _ => {
            return Err(IngestError::Invalid(vec![Problem::request(
                "expected a JSON object or an array of objects",
            )]));
        }
    };
    if values.len() > MAX_ITEMS {
        return Err(IngestError::TooManyItems(values.len()));
    }
    Ok(values)
}

/// Authenticates, then reads and splits the body: (the token's name, the items).
async fn accept<W>(
    shared: &Shared<W>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(String, Vec<Value>), IngestError> {
    let caller = authenticate(&shared.api_tokens, headers)?.to_string();
    let bytes = read_body(headers, body).await?;
    Ok((caller, batch(&bytes)?))
}

fn created_or_ok(created: u64) -> StatusCode {
    if created > 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

/// Logs a store failure (the caller gets no detail) and passes it on: a passing fault is
/// worth retrying (503), anything else is not (500).
fn store_failure(caller: &str, error: StoreError) -> IngestError {
    tracing::warn!(token = caller, %error, "ingest API: the database failed; nothing written");
    if error.is_conflict() {
        IngestError::Conflict(error)
    } else if error.is_unavailable() {
        IngestError::Store(error)
    } else {
        IngestError::Refused(error)
    }
}

/// How many times a batch is written before a lost conflict is the caller's to retry.
const CONFLICT_ATTEMPTS: u32 = 4;

/// Runs `write` (one transaction) again while the database aborts it over a conflict with
/// another transaction (a deadlock or a serialization failure), after a short random pause
/// that grows with each try, so that the two writers do not collide again in step.
async fn retry_conflicts<T, F, Fut>(mut write: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 1;
    loop {
        match write().await {
            Err(error) if error.is_conflict() && attempt < CONFLICT_ATTEMPTS => {
                tracing::debug!(attempt, %error, "ingest API: the batch lost a conflict; trying again");
                let pause = rand::rng().random_range(10..=40) * u64::from(attempt);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// `POST /api/v1/events`: `{"received": N, "created": M, "duplicates": N - M}`, 201 when
/// something was new, 200 when every event existed already.
async fn post_events<W: Send + Sync + 'static>(
    State(shared): State<Shared<W>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match ingest_events(&shared, &headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn ingest_events<W>(
    shared: &Shared<W>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, IngestError> {
    let (caller, values) = accept(shared, headers, body).await?;
    let (good, mut problems) = items::events(&values);
    problems.extend(
        unknown_customers(&shared.store, &good)
            .await
            .map_err(|e| store_failure(&caller, e))?,
    );
    if !problems.is_empty() {
        problems.sort_by_key(|p| p.item);
        return Err(IngestError::Invalid(problems));
    }
    let events: Vec<_> = good.into_iter().map(|(_, event)| event).collect();
    let (store, batch) = (&shared.store, &events);
    let created = retry_conflicts(|| store.insert_events(batch))
        .await
        .map_err(|e| store_failure(&caller, e))?;
    let received = events.len() as u64;
    tracing::info!(token = caller, received, created, "ingested events");
    let counts = EventCounts {
        received,
        created,
        duplicates: received - created,
    };
    Ok((created_or_ok(created), axum::Json(counts)).into_response())
}

/// An event must name a customer that exists, as in the CSV import: a problem per such item.
async fn unknown_customers(
    store: &SharedStore,
    events: &[(usize, crate::store::Event)],
) -> Result<Vec<Problem>, StoreError> {
    let wanted: BTreeSet<&str> = events.iter().map(|(_, e)| e.customer_id.as_str()).collect();
    let mut missing = BTreeSet::new();
    for id in wanted {
        if store.customer(id).await?.is_none() {
            missing.insert(id);
        }
    }
    Ok(events
        .iter()
        .filter(|(_, e)| missing.contains(e.customer_id.as_str()))
        .map(|(item, e)| Problem {
            item: Some(*item),
            field: Some("customer_id".into()),
            message: format!(
                "no customer with id {:?}; POST it to /api/v1/customers first",
                e.customer_id
            ),
        })
        .collect())
}

/// `POST /api/v1/customers`: `{"received": N, "created": M, "updated": N - M}`, 201 when a
/// customer was new, else 200.
async fn post_customers<W: Send + Sync + 'static>(
    State(shared): State<Shared<W>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match ingest_customers(&shared, &headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn ingest_customers<W>(
    shared: &Shared<W>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, IngestError> {
    let (caller, values) = accept(shared, headers, body).await?;
    let (good, problems) = items::customers(&values);
    if !problems.is_empty() {
        return Err(IngestError::Invalid(problems));
    }
    let patches: Vec<_> = good.into_iter().map(|(_, patch)| patch).collect();
    let (store, batch) = (&shared.store, &patches);
    let created = retry_conflicts(|| store.merge_customers(batch))
        .await
        .map_err(|e| store_failure(&caller, e))?;
    let received = patches.len() as u64;
    tracing::info!(token = caller, received, created, "ingested customers");
    let counts = CustomerCounts {
        received,
        created,
        updated: received - created,
    };
    Ok((created_or_ok(created), axum::Json(counts)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Secret;

    fn tokens() -> ApiTokens {
        ApiTokens::new(&[
            ("shop".into(), Secret("shop-token-0123456789abcdef".into())),
            ("crm".into(), Secret("crm-token-0123456789abcdef\n".into())),
        ])
    }

    fn bearer(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(value).expect("header"),
        );
        headers
    }

    #[test]
    fn each_token_is_known_by_its_name() {
        let tokens = tokens();
        let who = |h: &str| authenticate(&tokens, &bearer(h)).map_err(|e| e.to_string());
        assert_eq!(who("Bearer shop-token-0123456789abcdef"), Ok("shop"));
        assert_eq!(who("bearer  crm-token-0123456789abcdef "), Ok("crm"));
        assert!(matches!(
            authenticate(&tokens, &bearer("Bearer shop-token-0123456789abcde")),
            Err(IngestError::WrongToken)
        ));
        assert!(matches!(
            authenticate(&tokens, &bearer("Basic c2hvcA==")),
            Err(IngestError::MissingToken)
        ));
        assert!(matches!(
            authenticate(&tokens, &HeaderMap::new()),
            Err(IngestError::MissingToken)
        ));
        assert!(matches!(
            authenticate(&ApiTokens::default(), &bearer("Bearer x")),
            Err(IngestError::Off)
        ));
    }

    const MINIMAL: &str = r#"
[sender]
from = "Acme <hello@acme.example>"
[business]
name = "Acme"
address = "1 Main St, Springfield"
"#;

    fn config(api: &str) -> Result<crate::config::Config, String> {
        let text = format!("{MINIMAL}\n{api}");
        let path = std::path::Path::new("/etc/tp/touchpoint.toml");
        crate::config::Config::from_source(path, &text, Vec::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn tokens_come_from_their_sources_and_short_or_missing_ones_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let good = dir.path().join("good");
        let short = dir.path().join("short");
        std::fs::write(&good, "0123456789abcdef0123\n").expect("write");
        std::fs::write(&short, "tiny\n").expect("write");
        let entry = |name: &str, file: &std::path::Path| {
            format!(
                "[[api.tokens]]\nname = \"{name}\"\ntoken_file = \"{}\"\n",
                file.display()
            )
        };
        let one = config(&entry("shop", &good)).expect("config loads");
        let tokens = one.api_tokens().expect("token reads");
        assert_eq!(tokens[0].0, "shop");
        assert!(!format!("{one:?} {tokens:?}").contains("0123456789abcdef"));
        let missing = dir.path().join("missing");
        let text = format!(
            "{}{}{}",
            entry("shop", &good),
            entry("crm", &short),
            entry("blog", &missing)
        );
        let problems = config(&text)
            .expect("config loads")
            .api_tokens()
            .unwrap_err();
        assert!(
            problems.contains("api.tokens \"crm\" is 4 bytes long"),
            "{problems}"
        );
        assert!(
            problems.contains("api.tokens \"blog\": cannot read"),
            "{problems}"
        );
        let same = format!("{}{}", entry("shop", &good), entry("crm", &good));
        let problems = config(&same)
            .expect("config loads")
            .api_tokens()
            .unwrap_err();
        assert!(problems.contains("the same token as another"), "{problems}");
        assert!(
            config("[api]\n")
                .expect("loads")
                .api_tokens()
                .expect("none")
                .is_empty()
        );
    }

    #[test]
    fn a_token_in_the_config_file_or_a_bad_entry_is_a_config_error() {
        let error =
            config("[[api.tokens]]\nname = \"shop\"\ntoken = \"0123456789abcdef\"\n").unwrap_err();
        assert!(error.contains("unknown field `token`"), "{error}");
        let error = config(
            "[[api.tokens]]\nname = \"shop\"\n[[api.tokens]]\nname = \"shop\"\ntoken_env = \"A\"\ntoken_file = \"b\"\n",
        )
        .unwrap_err();
        assert!(error.contains("\"shop\" is used twice"), "{error}");
        assert!(error.contains("set exactly one of token_env"), "{error}");
    }

    #[tokio::test]
    async fn a_body_without_a_length_is_cut_off_at_the_limit() {
        let headers = HeaderMap::new();
        let fits = read_body(&headers, Body::from(vec![b' '; MAX_BODY_BYTES])).await;
        assert_eq!(fits.map(|b| b.len()).ok(), Some(MAX_BODY_BYTES));
        let over = read_body(&headers, Body::from(vec![b' '; MAX_BODY_BYTES + 1])).await;
        assert!(matches!(over, Err(IngestError::BodyTooLarge)));
    }

    #[tokio::test]
    async fn a_lost_conflict_is_tried_again_and_at_last_answered_503() {
        let conflict = || StoreError::Conflict(sqlx::Error::Protocol("deadlock detected".into()));
        let mut tries = 0;
        let third = retry_conflicts(|| {
            tries += 1;
            let result = if tries < 3 {
                Err(conflict())
            } else {
                Ok(tries)
            };
            async move { result }
        })
        .await;
        assert_eq!(third.ok(), Some(3));

        let mut tries = 0;
        let never: Result<(), _> = retry_conflicts(|| {
            tries += 1;
            let error = conflict();
            async move { Err(error) }
        })
        .await;
        assert_eq!(tries, CONFLICT_ATTEMPTS);
        let response = store_failure("shop", never.unwrap_err()).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from_static("1"))
        );

        // A mistake in the data is not a conflict: tried once, and a retry will not help.
        let mut tries = 0;
        let mistake: Result<(), _> = retry_conflicts(|| {
            tries += 1;
            async { Err(StoreError::Query(sqlx::Error::RowNotFound)) }
        })
        .await;
        assert_eq!(tries, 1);
        let refused = store_failure("shop", mistake.unwrap_err());
        assert_eq!(refused.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn debug_output_shows_names_only() {
        let shown = format!("{:?}", tokens());
        assert_eq!(shown, "[\"shop\", \"crm\"]");
    }

    #[test]
    fn a_body_is_an_object_or_an_array_of_at_most_max_items() {
        assert_eq!(batch(br#"{"id": 1}"#).map(|v| v.len()).ok(), Some(1));
        assert_eq!(batch(b"[]").map(|v| v.len()).ok(), Some(0));
        assert!(matches!(batch(b"{"), Err(IngestError::Malformed(_))));
        assert!(matches!(batch(b"42"), Err(IngestError::Invalid(_))));
        let many = format!("[{}]", vec!["{}"; MAX_ITEMS + 1].join(","));
        assert!(matches!(
            batch(many.as_bytes()),
            Err(IngestError::TooManyItems(n)) if n == MAX_ITEMS + 1
        ));
    }
}
