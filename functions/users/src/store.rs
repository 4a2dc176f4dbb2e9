//! The users table. Timestamps are microseconds since the epoch; ids are random hex.
//!
//! Every write announces itself: `user.created`, `user.updated` or `user.deleted` (key: the
//! user's id, payload: [`Announcement`] as JSON) goes to the outbox in the write's own
//! transaction, so an event exists exactly when its change does.

use serde::{Deserialize, Serialize};
use wasmgate_sdk::db::{self, Transaction, Value};
use wasmgate_sdk::{Problem, StatusCode};
use wasmgate_sdk::{events, response_cache};

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
    let tx = db::begin()?;
    tx.execute(
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
    announce(tx, CREATED, &user, now, &[])?;
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

/// Applies the changes if the row is still at `expected_version` (when given) and returns the
/// row as it now is; `None` means absent or stale.
pub fn update(
    id: &str,
    email: Option<&str>,
    name: Option<&str>,
    display_name: Option<Option<&str>>,
    expected_version: Option<i64>,
) -> Result<Option<User>, Problem> {
    let now = now_micros();
    let mut sets = vec![
        "version = version + 1".to_string(),
        "updated_at = $2".to_string(),
    ];
    let mut changed = Vec::new();
    let mut params: Vec<Value> = vec![id.into(), Value::Timestamp(now)];
    if let Some(email) = email {
        params.push(email.into());
        sets.push(format!("email = ${}", params.len()));
        params.push(email.to_lowercase().into());
        sets.push(format!("email_lower = ${}", params.len()));
        changed.push("email");
    }
    if let Some(name) = name {
        params.push(name.into());
        sets.push(format!("name = ${}", params.len()));
        changed.push("name");
    }
    if let Some(display_name) = display_name {
        params.push(display_name.map(str::to_string).into());
        sets.push(format!("display_name = ${}", params.len()));
        changed.push("display_name");
    }
    let mut sql = format!("UPDATE users SET {} WHERE id = $1", sets.join(", "));
    if let Some(v) = expected_version {
        params.push(v.into());
        sql.push_str(&format!(" AND version = ${}", params.len()));
    }
    sql.push_str(&format!(" RETURNING {COLUMNS}"));
    let tx = db::begin()?;
    let rows = tx.query(&sql, &params).map_err(map_unique)?;
    let Some(user) = db::decode::<User>(rows)?.into_iter().next() else {
        return Ok(None);
    };
    announce(tx, UPDATED, &user, now, &changed)?;
    forget(id);
    Ok(Some(user))
}

/// Stores a new hash of the same password (made with the host's current parameters) if the
/// row still holds `old`. Not a change of the account: no new version, no event.
pub fn replace_password_hash(id: &str, old: &str, new: &str) -> Result<(), Problem> {
    db::execute(
        "UPDATE users SET password_hash = $3 WHERE id = $1 AND password_hash = $2",
        &[id.into(), old.into(), new.into()],
    )?;
    Ok(())
}

/// Deletes the user; `false` when there was none.
pub fn delete(id: &str) -> Result<bool, Problem> {
    let tx = db::begin()?;
    let rows = tx.query(
        &format!("DELETE FROM users WHERE id = $1 RETURNING {COLUMNS}"),
        &[id.into()],
    )?;
    let Some(user) = db::decode::<User>(rows)?.into_iter().next() else {
        return Ok(false);
    };
    announce(tx, DELETED, &user, now_micros(), &[])?;
    forget(id);
    Ok(true)
}

pub const CREATED: &str = "user.created";
pub const UPDATED: &str = "user.updated";
pub const DELETED: &str = "user.deleted";

/// The payload of every user event: the account as the change left it (as it was, for
/// `user.deleted`), never its password hash. `version` is the row's version, which increases
/// with every change: events of one user on different topics have no common sequence, so a
/// consumer that needs them in order (a projection) orders them by it.
#[derive(Debug, Serialize)]
pub struct Announcement<'a> {
    pub id: &'a str,
    pub email: &'a str,
    pub name: &'a str,
    pub display_name: Option<&'a str>,
    pub version: i64,
    /// When the change happened (microseconds since the epoch).
    pub at: i64,
    /// The fields a `user.updated` changed.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub changed: &'a [&'a str],
}

/// Puts the change's event in `tx` and commits both.
fn announce(
    tx: Transaction,
    topic: &str,
    user: &User,
    at: i64,
    changed: &[&str],
) -> Result<(), Problem> {
    let announcement = Announcement {
        id: &user.id,
        email: &user.email,
        name: &user.name,
        display_name: user.display_name.as_deref(),
        version: user.version,
        at,
        changed,
    };
    events::publish_json_in(&tx, topic, &user.id, &announcement)?;
    Ok(tx.commit()?)
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
