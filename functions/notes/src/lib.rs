//! The example function that uses all three capabilities.
//!
//! - `POST /notes {"text": "..."}`: under the `writer` lock, stores the note with the lock's
//!   fencing token in one transaction, then counts it in the cache. 201 with `Location`.
//! - `GET /notes/{id}`: the note, or 404.
//! - `GET /notes`: `{"created": N}` from the cache counter.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use wasmgate_sdk::{
    Body, HeaderValue, Method, Problem, Request, Result, StatusCode, cache, db, json, lock, param,
    read_json,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNote {
    text: String,
}

#[derive(Serialize, Deserialize)]
struct Note {
    id: String,
    text: String,
    /// The writer lock's fencing token: notes are ordered by it even across processes.
    fence: i64,
    /// Microseconds since the epoch.
    created_at: i64,
}

const MAX_TEXT: usize = 10_000;

async fn handle(mut req: Request<Body>) -> Result {
    match (req.method().clone(), param(&req, "id").map(str::to_string)) {
        (Method::POST, None) => {
            let new: NewNote = read_json(&mut req).await?;
            create(new)
        }
        (Method::GET, Some(id)) => {
            let note: Option<Note> = db::query_opt(
                "SELECT id, text, fence, created_at FROM notes WHERE id = $1",
                &[id.into()],
            )?;
            note.map(|n| json(StatusCode::OK, &n))
                .ok_or_else(Problem::not_found)
        }
        (Method::GET, None) => {
            let created = cache::get_string("created")?.and_then(|s| s.parse::<i64>().ok());
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "created": created.unwrap_or(0) }),
            ))
        }
        _ => Err(Problem::not_found()),
    }
}

fn create(new: NewNote) -> Result {
    if new.text.trim().is_empty() || new.text.len() > MAX_TEXT {
        return Err(Problem::bad_request(format!(
            "text must be 1 to {MAX_TEXT} bytes"
        )));
    }
    let lease = lock::acquire("writer", Duration::from_secs(5), Duration::from_secs(2))?;
    let note = Note {
        id: new_id(),
        text: new.text,
        fence: i64::try_from(lease.fencing_token()).unwrap_or(i64::MAX),
        created_at: now_micros(),
    };
    let tx = db::begin()?;
    tx.execute(
        "INSERT INTO notes (id, text, fence, created_at) VALUES ($1, $2, $3, $4)",
        &[
            note.id.as_str().into(),
            note.text.as_str().into(),
            note.fence.into(),
            db::Value::Timestamp(note.created_at),
        ],
    )?;
    tx.commit()?;
    lease.release()?;
    cache::increment("created", 1)?;

    let mut resp = json(StatusCode::CREATED, &note);
    if let Ok(location) = HeaderValue::from_str(&format!("/notes/{}", note.id)) {
        resp.headers_mut().insert("location", location);
    }
    Ok(resp)
}

fn new_id() -> String {
    let mut bytes = [0u8; 16];
    wasmgate_sdk::wstd::rand::get_random_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_micros() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}

wasmgate_sdk::export_http_function!(handle);
