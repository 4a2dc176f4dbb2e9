//! The admin API's dead letters (`/admin/v1/subscriptions/{subscription}/dead-letters`):
//! - `GET ?state=dead|replay|replayed|discarded`: the list, oldest first (without payloads).
//! - `GET {event}`: one, with its payload (`payload` as text when it is UTF-8, and always as
//!   `payload_base64`) and headers.
//! - `POST replay` (every `dead` one) or `POST {event}/replay`: run again with fresh tries,
//!   through the inbox (a letter applied meanwhile is not applied twice).
//! - `POST {event}/discard`: give up on it; by key, its key moves past it and the key's later
//!   events flow (refused while an earlier dead letter of the key waits).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64::Engine as _;
use serde::Deserialize;

use super::{Admin, Answer, Failure};
use crate::config::{Ordering, SubscriptionConfig};
use crate::events::inbox::{self, DiscardError};

fn subscription(admin: &Admin, name: &str) -> Result<SubscriptionConfig, Failure> {
    super::manifest(admin)?
        .subscriptions
        .iter()
        .find(|s| s.name() == name)
        .cloned()
        .ok_or_else(|| {
            Failure(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("the manifest has no subscription `{name}`"),
            )
        })
}

fn db_failed(e: impl std::fmt::Debug) -> Failure {
    tracing::error!(error = ?e, "dead-letter call failed");
    Failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "database-unavailable",
        "the platform database cannot be reached; retry".into(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    state: Option<String>,
}

/// At most this many in one list.
const LIST_LIMIT: u32 = 1000;

pub(super) async fn list(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    Query(q): Query<ListQuery>,
) -> Answer {
    subscription(&admin, &name)?;
    let db = admin.deployer.platform().backends.db.backend().clone();
    let letters = inbox::dead_letters(db.as_ref(), &name, q.state.as_deref(), LIST_LIMIT)
        .await
        .map_err(db_failed)?;
    Ok(
        axum::Json(serde_json::json!({"subscription": name, "dead_letters": letters}))
            .into_response(),
    )
}

pub(super) async fn show(
    State(admin): State<Arc<Admin>>,
    Path((name, event)): Path<(String, String)>,
) -> Answer {
    subscription(&admin, &name)?;
    let db = admin.deployer.platform().backends.db.backend().clone();
    let letter = inbox::find_dead_letter(db.as_ref(), &name, &event)
        .await
        .map_err(db_failed)?
        .ok_or_else(|| {
            Failure(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("no dead letter {event} in `{name}`"),
            )
        })?;
    let mut body = serde_json::to_value(&letter).expect("a dead letter serializes");
    body["payload"] = std::str::from_utf8(&letter.payload)
        .map(serde_json::Value::from)
        .unwrap_or(serde_json::Value::Null);
    body["payload_base64"] = base64::engine::general_purpose::STANDARD
        .encode(&letter.payload)
        .into();
    body["headers"] = serde_json::json!(letter.headers);
    Ok(axum::Json(body).into_response())
}

async fn replay_some(admin: &Admin, name: &str, event: Option<&str>) -> Answer {
    subscription(admin, name)?;
    let db = admin.deployer.platform().backends.db.backend().clone();
    let n = inbox::replay(db.as_ref(), name, event)
        .await
        .map_err(db_failed)?;
    if n == 0 && event.is_some() {
        return Err(Failure(
            StatusCode::CONFLICT,
            "not-dead",
            format!(
                "{} is not a dead letter of `{name}` waiting to be replayed",
                event.unwrap_or_default()
            ),
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"subscription": name, "replaying": n})),
    )
        .into_response())
}

pub(super) async fn replay_all(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
) -> Answer {
    replay_some(&admin, &name, None).await
}

pub(super) async fn replay_one(
    State(admin): State<Arc<Admin>>,
    Path((name, event)): Path<(String, String)>,
) -> Answer {
    replay_some(&admin, &name, Some(&event)).await
}

pub(super) async fn discard(
    State(admin): State<Arc<Admin>>,
    Path((name, event)): Path<(String, String)>,
) -> Answer {
    let sub = subscription(&admin, &name)?;
    let db = admin.deployer.platform().backends.db.backend().clone();
    match inbox::discard(db.as_ref(), &name, &event, sub.ordering == Ordering::Key).await {
        Ok(letter) => Ok(axum::Json(letter).into_response()),
        Err(e @ DiscardError::NotFound(_)) => {
            Err(Failure(StatusCode::NOT_FOUND, "not-found", e.to_string()))
        }
        Err(e @ DiscardError::Behind { .. }) => {
            Err(Failure(StatusCode::CONFLICT, "key-behind", e.to_string()))
        }
        Err(DiscardError::Db(e)) => Err(db_failed(e)),
    }
}
