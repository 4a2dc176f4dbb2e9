//! `GET /v2/users/{id}/activity`: the read model the `activity` event function builds from this
//! service's events (tables `user_activity` and `user_audit`, its migrations). It lags the
//! writes by the time events take to arrive; an account with no event applied yet is a 404.

use serde::{Deserialize, Serialize};
use wasmgate_sdk::db::{self, Error};
use wasmgate_sdk::{Problem, Result, StatusCode, json};

use crate::v1::rfc3339;

#[derive(Deserialize)]
struct Row {
    email: String,
    name: String,
    display_name: Option<String>,
    version: i64,
    events: i64,
    created_at: Option<i64>,
    updated_at: Option<i64>,
    deleted_at: Option<i64>,
}

#[derive(Deserialize)]
struct Audit {
    event_id: String,
    topic: String,
    version: i64,
    changed: Option<String>,
    at: i64,
}

#[derive(Serialize)]
struct Entry {
    event_id: String,
    topic: String,
    version: i64,
    changed: Vec<String>,
    at: String,
}

/// How many audit entries the response lists, newest first.
const RECENT: i64 = 20;

pub fn get(id: &str) -> Result {
    let row: Option<Row> = db::query(
        "SELECT email, name, display_name, version, events, created_at, updated_at, deleted_at \
         FROM user_activity WHERE user_id = $1",
        &[id.into()],
    )
    .map_err(unavailable)
    .and_then(|rows| Ok(db::decode(rows)?.into_iter().next()))?;
    let Some(row) = row else {
        return Err(
            Problem::new(StatusCode::NOT_FOUND, "not-found", "Not Found")
                .with_detail("no activity recorded for this user (yet)"),
        );
    };
    let recent: Vec<Audit> = db::query_as(
        "SELECT event_id, topic, version, changed, at FROM user_audit WHERE user_id = $1 \
         ORDER BY at DESC, version DESC LIMIT $2",
        &[id.into(), RECENT.into()],
    )?;
    let recent: Vec<Entry> = recent
        .into_iter()
        .map(|a| Entry {
            event_id: a.event_id,
            topic: a.topic,
            version: a.version,
            changed: a
                .changed
                .map(|c| c.split(',').map(str::to_string).collect())
                .unwrap_or_default(),
            at: rfc3339(a.at),
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "id": id,
            "email": row.email,
            "name": row.name,
            "display_name": row.display_name,
            "version": row.version,
            "events": row.events,
            "created_at": row.created_at.map(rfc3339),
            "updated_at": row.updated_at.map(rfc3339),
            "deleted_at": row.deleted_at.map(rfc3339),
            "recent": recent,
        }),
    ))
}

/// The tables are the `activity` function's: absent when it is not deployed.
fn unavailable(e: Error) -> Problem {
    match e {
        Error::InvalidQuery(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "activity-unavailable",
            "Activity is not available",
        )
        .with_detail("the activity projection is not deployed"),
        other => other.into(),
    }
}
