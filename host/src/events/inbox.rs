//! The inbox: what a subscription has handled, in the platform database, written in the same
//! transaction as the handler's own writes, so an event's effects and the record that it was
//! handled commit together or not at all.
//!
//! - `wasmgate_inbox`: `(subscription, event id)` of every handled event. A second delivery
//!   (a broker redelivery, a relay that appended twice, a replay) finds it and is acknowledged
//!   without running the handler. Rows are kept as long as the subscription exists: events can
//!   be redelivered for as long as the broker retains them, and replayed from the dead-letter
//!   queue at any time, so no shorter window would be safe.
//! - `wasmgate_inbox_keys`: per key, the sequence last applied (`ordering = "key"`). The
//!   commit takes the key's row from `sequence - 1` to `sequence` (compare and set, the row
//!   locked until commit), so a consumer that lost the event to another (paused past its
//!   lease, partitioned) cannot commit it too, and no key applies an event out of order.
//! - `wasmgate_inbox_attempts`: failed tries per event, so `max_attempts` holds across
//!   restarts.
//! - `wasmgate_dead_letters`: events that failed `max_attempts` times or were rejected, with
//!   the error, attempts and times.

use std::sync::Arc;

use super::broker::Delivery;
use crate::capabilities::db::migrations::{Migration, MigrationError};
use crate::capabilities::db::{DbBackend, DbError, DbTransaction, Value, placeholders};

const OWNER: &str = "_wasmgate_inbox";

fn ddl(blob: &str) -> String {
    format!(
        "CREATE TABLE wasmgate_inbox (
           subscription TEXT NOT NULL,
           event_id TEXT NOT NULL,
           handled_at BIGINT NOT NULL,
           PRIMARY KEY (subscription, event_id)
         );
         CREATE TABLE wasmgate_inbox_keys (
           subscription TEXT NOT NULL,
           topic TEXT NOT NULL,
           key TEXT NOT NULL,
           sequence BIGINT NOT NULL,
           PRIMARY KEY (subscription, topic, key)
         );
         CREATE TABLE wasmgate_inbox_attempts (
           subscription TEXT NOT NULL,
           event_id TEXT NOT NULL,
           attempts BIGINT NOT NULL,
           last_error TEXT NOT NULL,
           first_failed_at BIGINT NOT NULL,
           last_failed_at BIGINT NOT NULL,
           PRIMARY KEY (subscription, event_id)
         );
         CREATE TABLE wasmgate_dead_letters (
           subscription TEXT NOT NULL,
           event_id TEXT NOT NULL,
           topic TEXT NOT NULL,
           key TEXT NOT NULL,
           sequence BIGINT NOT NULL,
           payload {blob} NOT NULL,
           headers TEXT NOT NULL,
           source TEXT NOT NULL,
           published_at BIGINT NOT NULL,
           error TEXT NOT NULL,
           attempts BIGINT NOT NULL,
           first_failed_at BIGINT NOT NULL,
           dead_at BIGINT NOT NULL,
           state TEXT NOT NULL,
           PRIMARY KEY (subscription, event_id)
         );
         CREATE INDEX wasmgate_dead_letters_key ON wasmgate_dead_letters (subscription, topic, key, state)"
    )
}

/// Creates the inbox tables if needed.
pub async fn open(db: &dyn DbBackend) -> Result<(), MigrationError> {
    db.migrate(OWNER, &[Migration::new("0001_inbox", ddl(db.blob_type()))])
        .await
        .map(|_| ())
}

/// What the inbox says of a delivery, inside the transaction that would handle it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Handle it: recorded (and, by key, the key moved to its sequence) in this transaction.
    Apply,
    /// Handled before: acknowledge it.
    Duplicate,
    /// Older than (or equal to) what its key already applied: acknowledge it.
    Stale,
    /// Its key has not applied the previous sequence yet: try again later.
    Early,
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

/// Records `d` as handled by `subscription` in `tx` (and, with `by_key`, moves its key from the
/// previous sequence to this one), or says why not. On PostgreSQL (`kind`) one statement.
pub async fn admit(
    tx: &mut dyn DbTransaction,
    kind: &str,
    subscription: &str,
    d: &Delivery,
    by_key: bool,
) -> Result<Admission, DbError> {
    let e = &d.event;
    let params = vec![
        text(subscription),
        text(&e.id),
        Value::Int64(crate::auth::now_ms()),
        text(&e.topic),
        text(&e.key),
        Value::uint(e.sequence),
        Value::uint(e.sequence.saturating_sub(1)),
    ];
    if by_key && kind == "postgres" {
        let statement = if e.sequence == 1 {
            &ADMIT_FIRST
        } else {
            &ADMIT_NEXT
        };
        let rows = tx.query(statement, params).await?;
        let row = rows
            .rows
            .first()
            .ok_or_else(|| DbError::InvalidState("the admission was not returned".into()))?;
        let (recorded, moved, last) = (row[0].unsigned(), row[1].unsigned(), row[2].unsigned());
        return Ok(admission(recorded, moved, last, e.sequence));
    }
    let recorded = tx.execute(RECORD, params[..3].to_vec()).await?;
    if recorded == 0 || !by_key {
        return Ok(admission(recorded, 1, 0, e.sequence));
    }
    let mut key = params;
    key.drain(1..3);
    let moved = if e.sequence == 1 {
        tx.execute("INSERT INTO wasmgate_inbox_keys (subscription, topic, key, sequence) VALUES ($1, $2, $3, 1) \
             ON CONFLICT (subscription, topic, key) DO NOTHING", key[..3].to_vec()).await?
    } else {
        tx.execute(
            "UPDATE wasmgate_inbox_keys SET sequence = $4 \
             WHERE subscription = $1 AND topic = $2 AND key = $3 AND sequence = $5",
            key,
        )
        .await?
    };
    if moved == 1 {
        return Ok(Admission::Apply);
    }
    let last = key_at(tx, subscription, &e.topic, &e.key).await?;
    Ok(admission(
        1,
        0,
        u64::try_from(last).unwrap_or(0),
        e.sequence,
    ))
}

/// The inbox row of an event: `$1` subscription, `$2` event id, `$3` handled at.
const RECORD: &str = "INSERT INTO wasmgate_inbox (subscription, event_id, handled_at) VALUES ($1, $2, $3) \
     ON CONFLICT (subscription, event_id) DO NOTHING";

/// The admission in one statement (PostgreSQL: data-modifying CTEs). Parameters: `$1`
/// subscription, `$2` event id, `$3` handled at, `$4` topic, `$5` key, `$6` sequence, `$7` the
/// sequence before it. Returns whether the event was recorded, whether its key moved, and the
/// key's sequence as the statement found it (all three read from one snapshot: a key moved by
/// another consumer meanwhile reads as not yet moved, so the event waits and is then found
/// applied, never applied twice).
static ADMIT_FIRST: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| admit_with(FIRST_MOVES));
static ADMIT_NEXT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| admit_with(NEXT_MOVES));
fn admit_with(moves: &str) -> String {
    format!("WITH recorded AS ({RECORD} RETURNING 1), moved AS ({moves}){ADMIT_TAIL}")
}

/// A key's first event creates its row (`$7` is 0 here: named so that both forms take the same
/// parameters).
const FIRST_MOVES: &str = "INSERT INTO wasmgate_inbox_keys (subscription, topic, key, sequence) \
     SELECT $1, $4, $5, $6 WHERE $7::bigint = 0 AND EXISTS (SELECT 1 FROM recorded) \
     ON CONFLICT (subscription, topic, key) DO NOTHING RETURNING 1";
const NEXT_MOVES: &str = "UPDATE wasmgate_inbox_keys SET sequence = $6 \
     WHERE subscription = $1 AND topic = $4 AND key = $5 AND sequence = $7 AND EXISTS (SELECT 1 FROM recorded) \
     RETURNING 1";
const ADMIT_TAIL: &str = " SELECT (SELECT count(*) FROM recorded), (SELECT count(*) FROM moved), \
     COALESCE((SELECT sequence FROM wasmgate_inbox_keys WHERE subscription = $1 AND topic = $4 AND key = $5), 0)";

/// What the inbox says of an event of `sequence`: whether it was `recorded` now, whether its
/// key `moved` to it, and the key's `last` applied sequence.
fn admission(recorded: u64, moved: u64, last: u64, sequence: u64) -> Admission {
    match (recorded, moved) {
        (0, _) => Admission::Duplicate,
        (_, 1) => Admission::Apply,
        _ if last >= sequence => Admission::Stale,
        _ => Admission::Early,
    }
}

/// Admits whole runs in one statement (PostgreSQL, by key): each run is one key's events of
/// `topic` in sequence order without gaps, expected to follow what its key applied. Records
/// every event and moves every key to its run's last sequence; `true` if all of it took (every
/// event new, every key where its run expected it). `false` leaves part of it written: the
/// caller rolls the transaction back and admits one event at a time, which says why.
pub async fn admit_runs(
    tx: &mut dyn DbTransaction,
    subscription: &str,
    topic: &str,
    runs: &[&[Arc<Delivery>]],
) -> Result<bool, DbError> {
    let events: Vec<&Delivery> = runs.iter().flat_map(|r| r.iter().map(|d| &**d)).collect();
    let mut params = vec![
        text(subscription),
        text(topic),
        Value::Int64(crate::auth::now_ms()),
    ];
    let rows: Vec<String> = events
        .iter()
        .enumerate()
        .map(|(i, d)| {
            params.extend([
                text(&d.event.id),
                text(&d.event.key),
                Value::uint(d.event.sequence),
            ]);
            let at = 4 + 3 * i;
            format!("(${at}, ${}, ${}::bigint)", at + 1, at + 2)
        })
        .collect();
    // One key: named to the index as a plain equality. Joined to `runs` alone, a plan made
    // while the table had no statistics walked every key of the subscription and topic per
    // admission (7 ms at 4,700 keys, growing with the keys). Several keys (`IN` over them) got
    // no better plan without statistics and cost more: they keep the join alone.
    let one_key = if runs.len() == 1 {
        " AND k.key = $5"
    } else {
        ""
    };
    let sql = format!(
        "WITH ev (event_id, key, sequence) AS (VALUES {}), \
         recorded AS (INSERT INTO wasmgate_inbox (subscription, event_id, handled_at) \
           SELECT $1, event_id, $3 FROM ev ON CONFLICT (subscription, event_id) DO NOTHING RETURNING 1), \
         runs AS (SELECT key, min(sequence) AS first, max(sequence) AS last FROM ev GROUP BY key), \
         moved AS (UPDATE wasmgate_inbox_keys k SET sequence = runs.last FROM runs \
           WHERE k.subscription = $1 AND k.topic = $2{one_key} AND k.key = runs.key \
           AND k.sequence = runs.first - 1 RETURNING 1), \
         created AS (INSERT INTO wasmgate_inbox_keys (subscription, topic, key, sequence) \
           SELECT $1, $2, key, last FROM runs WHERE first = 1 \
           ON CONFLICT (subscription, topic, key) DO NOTHING RETURNING 1) \
         SELECT (SELECT count(*) FROM recorded), (SELECT count(*) FROM moved) + (SELECT count(*) FROM created)",
        rows.join(", ")
    );
    let found = tx.query(&sql, params).await?;
    let row = found
        .rows
        .first()
        .ok_or_else(|| DbError::InvalidState("the admission was not returned".into()))?;
    Ok(row[0].unsigned() == events.len() as u64 && row[1].unsigned() == runs.len() as u64)
}

/// Takes back what [`admit`] (or [`admit_runs`]) wrote for `tail`, the end of one key's run
/// from some event on: their inbox rows and, if `moved`, the key's move (back to before the
/// tail's first event). Cheaper than a savepoint around every admission, which most events
/// never need (a run that made statements of its own is rolled back to its savepoint first).
pub async fn unadmit(
    tx: &mut dyn DbTransaction,
    subscription: &str,
    tail: &[Arc<Delivery>],
    moved: bool,
) -> Result<(), DbError> {
    let (Some(first), Some(last)) = (tail.first(), tail.last()) else {
        return Ok(());
    };
    let mut ids = vec![text(subscription)];
    ids.extend(tail.iter().map(|d| text(&d.event.id)));
    tx.execute(
        &format!(
            "DELETE FROM wasmgate_inbox WHERE subscription = $1 AND event_id IN ({})",
            placeholders(2, tail.len())
        ),
        ids,
    )
    .await?;
    if !moved {
        return Ok(());
    }
    let e = &first.event;
    let mut key = vec![
        text(subscription),
        text(&e.topic),
        text(&e.key),
        Value::uint(last.event.sequence),
    ];
    if e.sequence == 1 {
        tx.execute(
            "DELETE FROM wasmgate_inbox_keys WHERE subscription = $1 AND topic = $2 AND key = $3 AND sequence = $4",
            key,
        )
        .await?;
    } else {
        key.push(Value::uint(e.sequence - 1));
        tx.execute(
            "UPDATE wasmgate_inbox_keys SET sequence = $5 \
             WHERE subscription = $1 AND topic = $2 AND key = $3 AND sequence = $4",
            key,
        )
        .await?;
    }
    Ok(())
}

/// The sequence `key` of `topic` last applied in `subscription` (0: none yet), read in `tx`.
async fn key_at(
    tx: &mut dyn DbTransaction,
    subscription: &str,
    topic: &str,
    key: &str,
) -> Result<i64, DbError> {
    Ok(tx
        .query(
            "SELECT sequence FROM wasmgate_inbox_keys WHERE subscription = $1 AND topic = $2 AND key = $3",
            vec![text(subscription), text(topic), text(key)],
        )
        .await?
        .first_int()
        .unwrap_or(0))
}

/// Failed tries so far of each of `event_ids` that has any, read in `tx` (one query).
pub async fn attempts_of(
    tx: &mut dyn DbTransaction,
    subscription: &str,
    event_ids: &[&str],
) -> Result<std::collections::HashMap<String, u32>, DbError> {
    let mut out = std::collections::HashMap::new();
    for chunk in event_ids.chunks(500) {
        let mut params = vec![text(subscription)];
        params.extend(chunk.iter().map(|id| text(id)));
        let list = placeholders(2, chunk.len());
        let rows = tx
            .query(
                &format!(
                    "SELECT event_id, attempts FROM wasmgate_inbox_attempts WHERE subscription = $1 AND event_id IN ({list})"
                ),
                params,
            )
            .await?;
        for r in rows.rows {
            out.insert(
                r[0].text(),
                u32::try_from(r[1].unsigned()).unwrap_or(u32::MAX),
            );
        }
    }
    Ok(out)
}

/// Counts a failed try; returns the tries so far (one statement, committed by itself).
pub async fn failed(
    db: &dyn DbBackend,
    subscription: &str,
    event_id: &str,
    error: &str,
) -> Result<u32, DbError> {
    let now = Value::Int64(crate::auth::now_ms());
    let rows = db
        .query(
            "INSERT INTO wasmgate_inbox_attempts (subscription, event_id, attempts, last_error, first_failed_at, last_failed_at) \
             VALUES ($1, $2, 1, $3, $4, $4) ON CONFLICT (subscription, event_id) \
             DO UPDATE SET attempts = wasmgate_inbox_attempts.attempts + 1, last_error = $3, last_failed_at = $4 \
             RETURNING attempts",
            vec![text(subscription), text(event_id), text(error), now],
        )
        .await?;
    Ok(rows
        .first_int()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0))
}

/// Moves `d` to the dead-letter queue (a replay that failed again goes back to `dead`).
pub async fn dead_letter(
    db: &dyn DbBackend,
    subscription: &str,
    d: &Delivery,
    error: &str,
    attempts: u32,
) -> Result<(), DbError> {
    let e = &d.event;
    let now = crate::auth::now_ms();
    // The first failure's time from the tries' row (none for an event rejected at once).
    db.execute(
        "INSERT INTO wasmgate_dead_letters (subscription, event_id, topic, key, sequence, payload, headers, source, published_at, error, attempts, first_failed_at, dead_at, state) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
         COALESCE((SELECT first_failed_at FROM wasmgate_inbox_attempts WHERE subscription = $1 AND event_id = $2), $12), \
         $12, 'dead') ON CONFLICT (subscription, event_id) \
         DO UPDATE SET state = 'dead', error = $10, attempts = $11, dead_at = $12",
        vec![
            text(subscription),
            text(&e.id),
            text(&e.topic),
            text(&e.key),
            Value::uint(e.sequence),
            Value::Bytes(e.payload.clone()),
            Value::Text(serde_json::to_string(&e.headers).expect("strings serialize")),
            text(&e.source),
            Value::Int64(e.created_at),
            text(error),
            Value::Int64(i64::from(attempts)),
            Value::Int64(now),
        ],
    )
    .await?;
    Ok(())
}

/// Whether `key` of `topic` has a dead letter waiting in `subscription` (its later events wait).
pub async fn parked(
    db: &dyn DbBackend,
    subscription: &str,
    topic: &str,
    key: &str,
) -> Result<bool, DbError> {
    Ok(!db
        .query(
            "SELECT 1 FROM wasmgate_dead_letters WHERE subscription = $1 AND topic = $2 AND key = $3 AND state = 'dead' LIMIT 1",
            vec![text(subscription), text(topic), text(key)],
        )
        .await?
        .rows
        .is_empty())
}

/// A dead letter, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    pub event_id: String,
    pub topic: String,
    pub key: String,
    pub sequence: u64,
    pub source: String,
    pub published_at: i64,
    pub error: String,
    pub attempts: u32,
    pub first_failed_at: i64,
    pub dead_at: i64,
    /// `dead`, `replay` (asked for, not yet run), `replayed` or `discarded`.
    pub state: String,
    #[serde(skip)]
    pub payload: Vec<u8>,
    #[serde(skip)]
    pub headers: Vec<(String, String)>,
}

impl DeadLetter {
    /// As a delivery under `entry` (a dead letter has no broker entry of its own).
    fn delivery(self, entry: String) -> Delivery {
        Delivery {
            entry,
            event: crate::capabilities::events::outbox::Stored {
                id: self.event_id,
                topic: self.topic,
                key: self.key,
                sequence: self.sequence,
                payload: self.payload,
                headers: self.headers,
                source: self.source,
                created_at: self.published_at,
            },
        }
    }
}

const DEAD_COLUMNS: &str = "event_id, topic, key, sequence, source, published_at, error, attempts, first_failed_at, dead_at, state, payload, headers";

fn dead_letter_of(r: Vec<Value>) -> DeadLetter {
    DeadLetter {
        event_id: r[0].text(),
        topic: r[1].text(),
        key: r[2].text(),
        sequence: r[3].unsigned(),
        source: r[4].text(),
        published_at: r[5].int().unwrap_or(0),
        error: r[6].text(),
        attempts: u32::try_from(r[7].unsigned()).unwrap_or(0),
        first_failed_at: r[8].int().unwrap_or(0),
        dead_at: r[9].int().unwrap_or(0),
        state: r[10].text(),
        payload: r[11].bytes(),
        headers: serde_json::from_str(&r[12].text()).unwrap_or_default(),
    }
}

/// The subscription's dead letters (in `state`, or all), oldest first, at most `limit`.
pub async fn dead_letters(
    db: &dyn DbBackend,
    subscription: &str,
    state: Option<&str>,
    limit: u32,
) -> Result<Vec<DeadLetter>, DbError> {
    let rows = db
        .query(
            &format!(
                "SELECT {DEAD_COLUMNS} FROM wasmgate_dead_letters WHERE subscription = $1 \
                 AND ($2 = '' OR state = $2) ORDER BY dead_at, event_id LIMIT $3"
            ),
            vec![
                text(subscription),
                text(state.unwrap_or("")),
                Value::Int64(i64::from(limit)),
            ],
        )
        .await?;
    Ok(rows.rows.into_iter().map(dead_letter_of).collect())
}

/// One dead letter, with its payload.
pub async fn find_dead_letter(
    db: &dyn DbBackend,
    subscription: &str,
    event_id: &str,
) -> Result<Option<DeadLetter>, DbError> {
    let rows = db
        .query(
            &format!(
                "SELECT {DEAD_COLUMNS} FROM wasmgate_dead_letters WHERE subscription = $1 AND event_id = $2"
            ),
            vec![text(subscription), text(event_id)],
        )
        .await?;
    Ok(rows.rows.into_iter().next().map(dead_letter_of))
}

/// Asks for dead letters (one, or every `dead` one) to be run again, with fresh tries: the
/// consumers pick them up through the inbox, so one that was applied meanwhile is not applied
/// twice. Returns how many.
pub async fn replay(
    db: &dyn DbBackend,
    subscription: &str,
    event_id: Option<&str>,
) -> Result<u64, DbError> {
    let mut tx = db.begin().await?;
    let which = event_id.unwrap_or("");
    tx.execute(
        "DELETE FROM wasmgate_inbox_attempts WHERE subscription = $1 AND event_id IN \
         (SELECT event_id FROM wasmgate_dead_letters WHERE subscription = $1 AND state = 'dead' AND ($2 = '' OR event_id = $2))",
        vec![text(subscription), text(which)],
    )
    .await?;
    let n = tx
        .execute(
            "UPDATE wasmgate_dead_letters SET state = 'replay' WHERE subscription = $1 AND state = 'dead' AND ($2 = '' OR event_id = $2)",
            vec![text(subscription), text(which)],
        )
        .await?;
    tx.commit().await?;
    Ok(n)
}

/// Dead letters asked to run again, as deliveries (their entry is `dead-letter:<event id>`).
pub async fn replays(
    db: &dyn DbBackend,
    subscription: &str,
    limit: u32,
) -> Result<Vec<Delivery>, DbError> {
    let letters = db
        .query(
            &format!(
                "SELECT {DEAD_COLUMNS} FROM wasmgate_dead_letters WHERE subscription = $1 AND state = 'replay' \
                 ORDER BY topic, key, sequence LIMIT $2"
            ),
            vec![text(subscription), Value::Int64(i64::from(limit))],
        )
        .await?;
    Ok(letters
        .rows
        .into_iter()
        .map(dead_letter_of)
        .map(|l| {
            let entry = format!("{REPLAY_ENTRY}{}", l.event_id);
            l.delivery(entry)
        })
        .collect())
}

/// The entry prefix of a replayed dead letter (it has no broker entry).
pub const REPLAY_ENTRY: &str = "dead-letter:";

/// A replay that went through (applied, or found applied): done with.
pub async fn replayed(
    db: &dyn DbBackend,
    subscription: &str,
    event_id: &str,
) -> Result<(), DbError> {
    db.execute(
        "UPDATE wasmgate_dead_letters SET state = 'replayed' WHERE subscription = $1 AND event_id = $2 AND state = 'replay'",
        vec![text(subscription), text(event_id)],
    )
    .await?;
    Ok(())
}

/// Why a dead letter cannot be discarded.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("no dead letter {0} waits in this subscription")]
    NotFound(String),
    #[error(
        "key {key} has applied up to sequence {at}; the dead letters before this one ({sequence}) must be replayed or discarded first"
    )]
    Behind { key: String, at: i64, sequence: u64 },
    #[error("the database failed: {0:?}")]
    Db(DbError),
}

impl From<DbError> for DiscardError {
    fn from(e: DbError) -> Self {
        Self::Db(e)
    }
}

/// Gives up on a dead letter: recorded as handled (a redelivery is dropped) and, by key, its
/// key moves past it so the key's later events flow again.
pub async fn discard(
    db: &dyn DbBackend,
    subscription: &str,
    event_id: &str,
    by_key: bool,
) -> Result<DeadLetter, DiscardError> {
    let letter = find_dead_letter(db, subscription, event_id)
        .await?
        .filter(|l| l.state == "dead" || l.state == "replay")
        .ok_or_else(|| DiscardError::NotFound(event_id.into()))?;
    let mut tx = db.begin().await?;
    let delivery = letter.clone().delivery(String::new());
    match admit(tx.as_mut(), db.kind(), subscription, &delivery, by_key).await? {
        Admission::Early => {
            let at = key_at(tx.as_mut(), subscription, &letter.topic, &letter.key).await?;
            return Err(DiscardError::Behind {
                key: letter.key,
                at,
                sequence: letter.sequence,
            });
        }
        Admission::Apply | Admission::Duplicate | Admission::Stale => {}
    }
    tx.execute(
        "UPDATE wasmgate_dead_letters SET state = 'discarded' WHERE subscription = $1 AND event_id = $2",
        vec![text(subscription), text(event_id)],
    )
    .await?;
    tx.commit().await?;
    Ok(DeadLetter {
        state: "discarded".into(),
        ..letter
    })
}

/// The sequence each of `keys` of `topic` last applied in `subscription` (absent: none yet).
pub async fn key_sequences(
    db: &dyn DbBackend,
    subscription: &str,
    topic: &str,
    keys: &[&str],
) -> Result<std::collections::HashMap<String, u64>, DbError> {
    let mut out = std::collections::HashMap::new();
    for chunk in keys.chunks(500) {
        let mut params = vec![text(subscription), text(topic)];
        params.extend(chunk.iter().map(|k| text(k)));
        let list = placeholders(3, chunk.len());
        let rows = db
            .query(
                &format!(
                    "SELECT key, sequence FROM wasmgate_inbox_keys WHERE subscription = $1 AND topic = $2 AND key IN ({list})"
                ),
                params,
            )
            .await?;
        for r in rows.rows {
            out.insert(r[0].text(), r[1].unsigned());
        }
    }
    Ok(out)
}
