//! The users table. Timestamps are microseconds since the epoch; ids are random hex.

use serde::Deserialize;
use wasmgate_sdk::db::{self, Value};
use wasmgate_sdk::response_cache;
use wasmgate_sdk::{Problem, StatusCode};

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub id: String,
    pub email: String,
    pub name: String,
    pub display_name: Option<String>,
    pub password_hash: String,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

const COLUMNS: &str =
    "id, email, name, display_name, password_hash, version, created_at, updated_at";

pub fn email_taken() -> Problem {
    Problem::new(StatusCode::CONFLICT, "email-taken", "Email already in use")
        .with_detail("another account uses this email")
}

fn map_unique(e: db::Error) -> Problem {
    match e {
        db::Error::UniqueViolation(_) => email_taken(),
        other => other.into(),
    }
}

pub fn now_micros() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    wasmgate_sdk::wstd::rand::get_random_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn insert(
    email: &str,
    name: &str,
    display_name: Option<&str>,
    password_hash: &str,
) -> Result<User, Problem> {
    let now = now_micros();
    let user = User {
        id: random_hex(12),
        email: email.to_string(),
        name: name.to_string(),
        display_name: display_name.map(str::to_string),
        password_hash: password_hash.to_string(),
        version: 1,
        created_at: now,
        updated_at: now,
    };
    db::execute(
        "INSERT INTO users (id, email, email_lower, name, display_name, password_hash, version, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            user.id.as_str().into(),
            user.email.as_str().into(),
            user.email.to_lowercase().into(),
            user.name.as_str().into(),
            user.display_name.clone().into(),
            user.password_hash.as_str().into(),
            user.version.into(),
            Value::Timestamp(now),
            Value::Timestamp(now),
        ],
    )
    .map_err(map_unique)?;
    Ok(user)
}

pub fn by_id(id: &str) -> Result<Option<User>, Problem> {
    db::query_opt(
        &format!("SELECT {COLUMNS} FROM users WHERE id = $1"),
        &[id.into()],
    )
}

pub fn by_email(email: &str) -> Result<Option<User>, Problem> {
    db::query_opt(
        &format!("SELECT {COLUMNS} FROM users WHERE email_lower = $1"),
        &[email.to_lowercase().into()],
    )
}

/// Users after the `(created_at, id)` position, in that order.
pub fn page(after: Option<(i64, String)>, limit: i64) -> Result<Vec<User>, Problem> {
    match after {
        Some((ts, id)) => db::query_as(
            &format!(
                "SELECT {COLUMNS} FROM users WHERE created_at > $1 OR (created_at = $1 AND id > $2) \
                 ORDER BY created_at, id LIMIT $3"
            ),
            &[Value::Timestamp(ts), id.into(), limit.into()],
        ),
        None => db::query_as(
            &format!("SELECT {COLUMNS} FROM users ORDER BY created_at, id LIMIT $1"),
            &[limit.into()],
        ),
    }
}

/// Applies the changes if the row is still at `expected_version` (when given). Returns the
/// number of rows changed: 0 means absent or stale.
pub fn update(
    id: &str,
    email: Option<&str>,
    name: Option<&str>,
    display_name: Option<Option<&str>>,
    expected_version: Option<i64>,
) -> Result<u64, Problem> {
    let mut sets = vec![
        "version = version + 1".to_string(),
        "updated_at = $2".to_string(),
    ];
    let mut params: Vec<Value> = vec![id.into(), Value::Timestamp(now_micros())];
    if let Some(email) = email {
        params.push(email.into());
        sets.push(format!("email = ${}", params.len()));
        params.push(email.to_lowercase().into());
        sets.push(format!("email_lower = ${}", params.len()));
    }
    if let Some(name) = name {
        params.push(name.into());
        sets.push(format!("name = ${}", params.len()));
    }
    if let Some(display_name) = display_name {
        params.push(display_name.map(str::to_string).into());
        sets.push(format!("display_name = ${}", params.len()));
    }
    let mut sql = format!("UPDATE users SET {} WHERE id = $1", sets.join(", "));
    if let Some(v) = expected_version {
        params.push(v.into());
        sql.push_str(&format!(" AND version = ${}", params.len()));
    }
    let changed = db::execute(&sql, &params).map_err(map_unique)?;
    if changed > 0 {
        forget(id);
    }
    Ok(changed)
}

pub fn delete(id: &str) -> Result<bool, Problem> {
    let deleted = db::execute("DELETE FROM users WHERE id = $1", &[id.into()])? > 0;
    if deleted {
        forget(id);
    }
    Ok(deleted)
}

/// The cache tag of everything that shows user `id` (v1 and v2 alike).
pub fn tag(id: &str) -> String {
    format!("user:{id}")
}

/// Purges the user's cached responses after a write. The write has happened either way, so a
/// purge that cannot reach the shared cache is logged, not failed: other processes then serve
/// the old response until it expires (the route's TTL).
fn forget(id: &str) {
    if let Err(e) = response_cache::purge(&[&tag(id)]) {
        eprintln!("cache purge for user {id} failed: {e:?}");
    }
}
