//! User activity: an event function that turns the users service's events (`user.created`,
//! `user.updated`, `user.deleted`) into an audit log and a read model (a CQRS projection).
//!
//! The host runs each event once in effect, in a transaction it holds, with one user's events
//! of one topic in order. Events of different topics have no common order (each topic has its
//! own sequence per key), so the read model orders them by the user's `version`, which every
//! change increases: an event older than what the row shows counts in `events` and the audit
//! log but does not overwrite newer fields. The users service reads the model back at
//! `GET /v2/users/{id}/activity`.

use serde::Deserialize;
use wasmgate_sdk::db;
use wasmgate_sdk::event::{self, Delivery, HandlerError};

/// What `functions/users` publishes (its `store::Announcement`).
#[derive(Deserialize)]
struct Announcement {
    id: String,
    email: String,
    name: String,
    display_name: Option<String>,
    version: i64,
    at: i64,
    #[serde(default)]
    changed: Vec<String>,
}

fn handle(e: Delivery) -> event::Outcome {
    let a: Announcement = serde_json::from_slice(&e.payload)
        .map_err(|err| HandlerError::Reject(format!("not a user announcement: {err}")))?;
    if a.id != e.key {
        return Err(HandlerError::Reject(format!(
            "event key `{}` is not the user id `{}`",
            e.key, a.id
        )));
    }
    // What the event says about the row's timestamps.
    let (created_at, updated_at, deleted_at) = match e.topic.as_str() {
        "user.created" => (Some(a.at), Some(a.at), None),
        "user.updated" => (None, Some(a.at), None),
        "user.deleted" => (None, None, Some(a.at)),
        other => return Err(HandlerError::Reject(format!("unknown topic `{other}`"))),
    };
    let changed = (!a.changed.is_empty()).then(|| a.changed.join(","));
    db::execute(
        "INSERT INTO user_audit (event_id, user_id, topic, version, changed, at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            e.id.as_str().into(),
            a.id.as_str().into(),
            e.topic.as_str().into(),
            a.version.into(),
            changed.into(),
            a.at.into(),
        ],
    )?;
    let newer = "excluded.version > user_activity.version";
    db::execute(
        &format!(
            "INSERT INTO user_activity \
             (user_id, email, name, display_name, version, events, created_at, updated_at, deleted_at) \
             VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8) \
             ON CONFLICT (user_id) DO UPDATE SET \
             events = user_activity.events + 1, \
             email = CASE WHEN {newer} THEN excluded.email ELSE user_activity.email END, \
             name = CASE WHEN {newer} THEN excluded.name ELSE user_activity.name END, \
             display_name = CASE WHEN {newer} THEN excluded.display_name ELSE user_activity.display_name END, \
             version = CASE WHEN {newer} THEN excluded.version ELSE user_activity.version END, \
             created_at = COALESCE(excluded.created_at, user_activity.created_at), \
             updated_at = CASE WHEN excluded.updated_at > COALESCE(user_activity.updated_at, 0) \
                          THEN excluded.updated_at ELSE user_activity.updated_at END, \
             deleted_at = COALESCE(excluded.deleted_at, user_activity.deleted_at)"
        ),
        &[
            a.id.as_str().into(),
            a.email.as_str().into(),
            a.name.as_str().into(),
            a.display_name.into(),
            a.version.into(),
            created_at.into(),
            updated_at.into(),
            deleted_at.into(),
        ],
    )?;
    Ok(())
}

wasmgate_sdk::export_event_function!(handle);
