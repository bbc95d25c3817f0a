//! `/r/{token}`: the page a rating link opens. GET only shows it, and the page posts the score
//! itself (a button where scripts are off), so a mail scanner prefetching links casts no vote;
//! POST records it as the message's rating (the last answer counts, a comment once given is
//! kept) and the customer's `rated` event. Forged links get the 404 of an unknown page; a link
//! of a message that was never sent, or a score outside the scale, changes nothing.

use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::links::{business_name, escape_html, page, verified};
use super::{NO_STORE, not_found};
use crate::links::Link;
use crate::rules::RatingScale;
use crate::store::{LogEntry, MessageState, Rating};
use crate::web::Shared;

/// A comment longer than this is cut (characters).
const MAX_COMMENT: usize = 2000;

/// What the page posts: the score, and the comment once there is a box for it.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Answer {
    score: Option<String>,
    comment: Option<String>,
}

/// A rating link that checks out: the message (sent), its scale and the score in the link.
struct Rated {
    entry: LogEntry,
    scale: RatingScale,
    score: u8,
}

pub(super) async fn rating_page(
    State(shared): State<Shared>,
    Path(token): Path<String>,
) -> Response {
    let rated = match check(&shared, &token).await {
        Ok(rated) => rated,
        Err(response) => return response,
    };
    let body = format!(
        "<h1>You chose {score} of {high}</h1><form id=\"rate\" method=\"post\">\
         <input type=\"hidden\" name=\"score\" value=\"{score}\">\
         <p><button type=\"submit\">Send my rating to {business}</button></p></form>\
         <script>document.getElementById(\"rate\").submit();</script>",
        score = rated.score,
        high = rated.scale.highest(),
        business = business_name(&shared),
    );
    page("Your rating", &body)
}

pub(super) async fn rate(
    State(shared): State<Shared>,
    Path(token): Path<String>,
    Form(answer): Form<Answer>,
) -> Response {
    let rated = match check(&shared, &token).await {
        Ok(rated) => rated,
        Err(response) => return response,
    };
    let score = match answer.score.as_deref().map(str::trim) {
        None | Some("") => rated.score,
        Some(text) => match text.parse::<i64>() {
            Ok(score) if rated.scale.contains(score) => score as u8,
            _ => return out_of_range(rated.scale),
        },
    };
    let comment = answer
        .comment
        .map(|c| c.trim().chars().take(MAX_COMMENT).collect::<String>())
        .filter(|c| !c.is_empty());
    let rating = Rating {
        message_id: rated.entry.id,
        customer_id: rated.entry.customer_id.clone(),
        rule: rated.entry.rule.clone(),
        scale: rated.scale.as_str().into(),
        score: i64::from(score),
        comment,
    };
    match shared.store.record_rating(&rating).await {
        Ok(stored) => {
            tracing::info!(message_id = stored.message_id, score, "rated");
            thanks(&shared, rated.scale, &stored)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot record a rating");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [NO_STORE],
                "please try again in a minute\n",
            )
                .into_response()
        }
    }
}

/// The link's message, which must have gone out, and its rule's scale; else the answer to
/// give (404 for a forged link or unknown message, a page for the rest).
async fn check(shared: &Shared, token: &str) -> Result<Rated, Response> {
    let (link, entry) = verified(shared, token).await?;
    let Link::Rating { score, .. } = link else {
        return Err(not_found());
    };
    if !matches!(entry.state, MessageState::Sent | MessageState::Unknown) {
        tracing::info!(message_id = entry.id, state = %entry.state, "rating link of a message that was not sent: refused");
        return Err(refused(
            StatusCode::NOT_FOUND,
            "This message was never sent, so it cannot be rated.",
        ));
    }
    let scale = shared
        .playbook
        .borrow()
        .rules
        .rules
        .iter()
        .find(|r| r.name == entry.rule)
        .and_then(|r| r.rating.as_ref().map(|rating| rating.scale));
    let Some(scale) = scale else {
        return Err(refused(
            StatusCode::GONE,
            "This message no longer asks for a rating.",
        ));
    };
    if !scale.contains(i64::from(score)) {
        return Err(out_of_range(scale));
    }
    Ok(Rated {
        entry,
        scale,
        score,
    })
}

fn refused(status: StatusCode, why: &str) -> Response {
    let mut response = page(
        "Not recorded",
        &format!("<h1>Not recorded</h1><p>{why}</p>"),
    );
    *response.status_mut() = status;
    response
}

fn out_of_range(scale: RatingScale) -> Response {
    refused(
        StatusCode::BAD_REQUEST,
        &format!(
            "A score is a whole number from {} to {}; nothing was recorded.",
            scale.lowest(),
            scale.highest()
        ),
    )
}

/// "You chose 4 of 5 — thank you", the comment box (with the comment kept), and the scores to
/// change to.
fn thanks(shared: &Shared, scale: RatingScale, stored: &Rating) -> Response {
    let comment = escape_html(stored.comment.as_deref().unwrap_or_default());
    let scores: String = scale
        .scores()
        .map(|s| format!("<button type=\"submit\" name=\"score\" value=\"{s}\">{s}</button> "))
        .collect();
    let body = format!(
        "<h1>You chose {score} of {high} — thank you</h1>\
         <form method=\"post\"><input type=\"hidden\" name=\"score\" value=\"{score}\">\
         <p><label for=\"comment\">Anything you would like {business} to know?</label></p>\
         <p><textarea id=\"comment\" name=\"comment\" rows=\"4\" cols=\"40\" maxlength=\"{MAX_COMMENT}\">{comment}</textarea></p>\
         <p><button type=\"submit\">Send comment</button></p></form>\
         <form method=\"post\"><p>Changed your mind? {scores}</p></form>",
        score = stored.score,
        high = scale.highest(),
        business = business_name(shared),
    );
    page("Thank you", &body)
}
