//! The outbox: events written in the platform database, in the transaction that publishes
//! them, until the relay has handed them to the broker.

use serde::{Deserialize, Serialize};

use super::{Event, Published};
use crate::capabilities::db::migrations::{Migration, MigrationError};
use crate::capabilities::db::{DbBackend, DbError, DbTransaction, Rows, Value, placeholders};

/// The migrations namespace of these tables (function names cannot start with `_`).
const OWNER: &str = "_wasmgate_events";

pub const MAX_TOPIC_LEN: usize = 128;
pub const MAX_KEY_LEN: usize = 256;
pub const MAX_PAYLOAD: usize = 1024 * 1024;
pub const MAX_HEADERS: usize = 32;
const MAX_HEADER_LEN: usize = 4096;

fn ddl(blob: &str) -> String {
    format!(
        "CREATE TABLE wasmgate_outbox (
           id TEXT PRIMARY KEY,
           topic TEXT NOT NULL,
           key TEXT NOT NULL,
           sequence BIGINT NOT NULL,
           payload {blob} NOT NULL,
           headers TEXT NOT NULL,
           source TEXT NOT NULL,
           created_at BIGINT NOT NULL,
           relay TEXT,
           claimed_at BIGINT,
           sent_at BIGINT
         );
         CREATE INDEX wasmgate_outbox_unsent ON wasmgate_outbox (sent_at, id);
         CREATE TABLE wasmgate_event_keys (
           topic TEXT NOT NULL,
           key TEXT NOT NULL,
           sequence BIGINT NOT NULL,
           PRIMARY KEY (topic, key)
         )"
    )
}

/// Creates the outbox tables if needed (once, under the migrations lock).
pub async fn open(db: &dyn DbBackend) -> Result<(), MigrationError> {
    db.migrate(
        OWNER,
        &[
            Migration::new("0001_outbox", ddl(db.blob_type())),
            // Unsent rows by id alone, so the relay's pass reads them in order with an index
            // scan, from a starting id (see `claim`): a bitmap scan of `(sent_at, id)` read
            // every dead entry that sent rows leave until vacuum, on every pass.
            Migration::new(
                "0002_unsent_by_id",
                "DROP INDEX wasmgate_outbox_unsent; \
                 CREATE INDEX wasmgate_outbox_unsent ON wasmgate_outbox (id) WHERE sent_at IS NULL"
                    .to_string(),
            ),
        ],
    )
    .await
    .map(|_| ())
}

/// Why `event` is refused, if it is.
pub fn check(event: &Event) -> Result<(), String> {
    let topic = &event.topic;
    if topic.is_empty()
        || topic.len() > MAX_TOPIC_LEN
        || !topic
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(format!(
            "topic `{topic}`: 1 to {MAX_TOPIC_LEN} of a-z 0-9 . _ -"
        ));
    }
    if event.key.is_empty() || event.key.len() > MAX_KEY_LEN {
        return Err(format!("a key is 1 to {MAX_KEY_LEN} bytes"));
    }
    if event.payload.len() > MAX_PAYLOAD {
        return Err(format!(
            "the payload is {} bytes; at most {MAX_PAYLOAD}",
            event.payload.len()
        ));
    }
    if event.headers.len() > MAX_HEADERS {
        return Err(format!("at most {MAX_HEADERS} headers"));
    }
    for (name, value) in &event.headers {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!("header name `{name}`: a-z 0-9 -"));
        }
        if value.len() > MAX_HEADER_LEN {
            return Err(format!("header {name}: at most {MAX_HEADER_LEN} bytes"));
        }
    }
    Ok(())
}

/// A new event id: a UUIDv7 (time-ordered) in 32 hex digits.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// The smallest id an event written at `ms` (since the epoch) or later can have: a UUIDv7
/// starts with its time in ms, 48 bits.
pub fn first_id_at(ms: i64) -> String {
    format!("{:012x}", ms.max(0))
}

/// When the event `id` was written (ms since the epoch), read from its UUIDv7 time.
pub fn written_at(id: &str) -> Option<i64> {
    i64::from_str_radix(id.get(..12)?, 16).ok()
}

/// Woken by every event written in this process, so the relay need not wait for its next
/// poll (the event's transaction may still be open: the relay then finds it a poll later).
pub static PUBLISHED: crate::events::Signal = crate::events::Signal::new();

/// Next sequence of the key `$1`, `$2` (topic, key): inserted at 1 or incremented, the row
/// locked until the transaction ends.
const NEXT_SEQUENCE: &str = "INSERT INTO wasmgate_event_keys (topic, key, sequence) VALUES ($1, $2, 1) \
     ON CONFLICT (topic, key) DO UPDATE SET sequence = wasmgate_event_keys.sequence + 1 \
     RETURNING sequence";

/// The row's parameters but its sequence: `$1` topic, `$2` key (as [`NEXT_SEQUENCE`] takes
/// them), `$3` id, then payload, headers, source, created_at.
fn row(id: &str, source: &str, event: &Event) -> Vec<Value> {
    vec![
        Value::Text(event.topic.clone()),
        Value::Text(event.key.clone()),
        Value::Text(id.into()),
        Value::Bytes(event.payload.clone()),
        Value::Text(serde_json::to_string(&event.headers).expect("strings serialize")),
        Value::Text(source.into()),
        Value::Int64(crate::auth::now_ms()),
    ]
}

/// The sequence a statement ending in `RETURNING sequence` gave the event.
fn returned_sequence(rows: &Rows) -> Result<u64, DbError> {
    let sequence = rows
        .first_int()
        .ok_or_else(|| DbError::InvalidState("the key's sequence was not returned".into()))?;
    Ok(u64::try_from(sequence).unwrap_or(0))
}

/// Writes `event` in `tx` with the next sequence of its key, and returns where it landed. The
/// key's counter row stays locked until `tx` ends, so the events of one key commit in the
/// order of their sequence, and a rolled-back event takes its number back with it. On
/// PostgreSQL (`kind`) both writes are one statement.
pub async fn append(
    tx: &mut dyn DbTransaction,
    kind: &str,
    source: &str,
    event: &Event,
) -> Result<Published, DbError> {
    PUBLISHED.raise();
    let id = new_id();
    let mut params = row(&id, source, event);
    if kind == "postgres" {
        let sequence = returned_sequence(&tx.query(&ONE_STATEMENT, params).await?)?;
        return Ok(Published { id, sequence });
    }
    let sequence = returned_sequence(&tx.query(NEXT_SEQUENCE, params[..2].to_vec()).await?)?;
    params.push(Value::uint(sequence));
    tx.execute(
        "INSERT INTO wasmgate_outbox (id, topic, key, sequence, payload, headers, source, created_at) \
         VALUES ($3, $1, $2, $8, $4, $5, $6, $7)",
        params,
    )
    .await?;
    Ok(Published { id, sequence })
}

/// The sequence and the row in one statement (PostgreSQL: a data-modifying CTE), composed
/// once.
static ONE_STATEMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH k AS ({NEXT_SEQUENCE}) \
         INSERT INTO wasmgate_outbox (id, topic, key, sequence, payload, headers, source, created_at) \
         SELECT $3, $1, $2, k.sequence, $4, $5, $6, $7 FROM k RETURNING sequence"
    )
});

/// Writes `event` on its own: durable when this returns. On PostgreSQL one statement,
/// committed by itself; elsewhere a transaction of two.
pub async fn publish(
    db: &dyn DbBackend,
    source: &str,
    event: &Event,
) -> Result<Published, DbError> {
    if db.kind() == "postgres" {
        let id = new_id();
        let sequence =
            returned_sequence(&db.query(&ONE_STATEMENT, row(&id, source, event)).await?)?;
        PUBLISHED.raise();
        return Ok(Published { id, sequence });
    }
    let mut tx = db.begin().await?;
    let published = append(tx.as_mut(), db.kind(), source, event).await?;
    tx.commit().await?;
    Ok(published)
}

/// An event in the outbox, as the relay reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub id: String,
    pub topic: String,
    pub key: String,
    pub sequence: u64,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub source: String,
    pub created_at: i64,
}

const COLUMNS: &str = "id, topic, key, sequence, payload, headers, source, created_at";

/// An event from a row of `id, topic, key, sequence, payload, headers, source, created_at`
/// (the outbox's, the queue's and the dead letters' columns).
pub(crate) fn stored(r: &[Value]) -> Result<Stored, DbError> {
    Ok(Stored {
        id: r[0].text(),
        topic: r[1].text(),
        key: r[2].text(),
        sequence: r[3].unsigned(),
        payload: r[4].bytes(),
        headers: serde_json::from_str(&r[5].text())
            .map_err(|e| DbError::InvalidState(format!("stored headers: {e}")))?,
        source: r[6].text(),
        created_at: r[7].int().unwrap_or(0),
    })
}

/// Up to `limit` committed events not yet handed to the broker, oldest first.
pub async fn unsent(db: &dyn DbBackend, limit: u32) -> Result<Vec<Stored>, DbError> {
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM wasmgate_outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1"
            ),
            vec![Value::Int64(i64::from(limit))],
        )
        .await?;
    rows.rows.iter().map(|r| stored(r)).collect()
}

/// Claims up to `limit` unsent events with ids from `from` on (`""`: all) for `relay` until
/// `lease` from now: those nobody claimed and those whose claim lapsed (a relay that died
/// between appending and marking). The condition is checked again in the claiming statement
/// so that, of two relays racing for a row, the second sees the first one's claim and skips it.
pub async fn claim(
    db: &dyn DbBackend,
    relay: &str,
    limit: u32,
    lease: std::time::Duration,
    from: &str,
) -> Result<Vec<Stored>, DbError> {
    let now = crate::auth::now_ms();
    let lapsed = now - i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    // Chosen, then claimed with the condition repeated: as one `UPDATE ... IN (SELECT ...
    // LIMIT)` PostgreSQL may run the subquery once per row.
    let candidates = db
        .query(
            "SELECT id FROM wasmgate_outbox WHERE sent_at IS NULL AND id >= $3 \
             AND (claimed_at IS NULL OR claimed_at < $1) ORDER BY id LIMIT $2",
            vec![
                Value::Int64(lapsed),
                Value::Int64(i64::from(limit)),
                Value::Text(from.into()),
            ],
        )
        .await?;
    if candidates.rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut params = vec![
        Value::Text(relay.into()),
        Value::Int64(now),
        Value::Int64(lapsed),
    ];
    params.extend(candidates.rows.iter().map(|r| Value::Text(r[0].text())));
    let list = placeholders(4, candidates.rows.len());
    let rows = db
        .query(
            &format!(
                "UPDATE wasmgate_outbox SET relay = $1, claimed_at = $2 \
                 WHERE sent_at IS NULL AND (claimed_at IS NULL OR claimed_at < $3) AND id IN ({list}) \
                 RETURNING {COLUMNS}"
            ),
            params,
        )
        .await?;
    let mut claimed = rows
        .rows
        .iter()
        .map(|r| stored(r))
        .collect::<Result<Vec<_>, _>>()?;
    claimed.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(claimed)
}

/// Marks events `relay` handed to the broker as sent.
pub async fn mark_sent(db: &dyn DbBackend, relay: &str, ids: &[String]) -> Result<u64, DbError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let mut params = vec![
        Value::Int64(crate::auth::now_ms()),
        Value::Text(relay.into()),
    ];
    params.extend(ids.iter().map(|id| Value::Text(id.clone())));
    let list = placeholders(3, ids.len());
    db.execute(
        &format!(
            "UPDATE wasmgate_outbox SET sent_at = $1 WHERE relay = $2 AND sent_at IS NULL AND id IN ({list})"
        ),
        params,
    )
    .await
}

/// Deletes events sent before `before` (ms since the epoch).
pub async fn prune_sent(db: &dyn DbBackend, before: i64) -> Result<u64, DbError> {
    db.execute(
        "DELETE FROM wasmgate_outbox WHERE sent_at IS NOT NULL AND sent_at < $1",
        vec![Value::Int64(before)],
    )
    .await
}
