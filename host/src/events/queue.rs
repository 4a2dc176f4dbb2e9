//! The embedded broker: a queue in the platform database (SQLite by default), so events work
//! with nothing to install. A group is a cursor over its topic's entries plus the entries it
//! has received and not acknowledged (each with who received it and when, so another consumer
//! can claim what a dead one left).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::broker::{Broker, BrokerError, Delivery};
use crate::capabilities::db::migrations::{Migration, MigrationError};
use crate::capabilities::db::{DbBackend, DbError, DbTransaction, Value, placeholders};
use crate::capabilities::events::outbox::{Stored, stored};

const OWNER: &str = "_wasmgate_queue";

fn ddl(kind: &str) -> String {
    let (serial, blob) = if kind == "postgres" {
        ("BIGSERIAL PRIMARY KEY", "BYTEA")
    } else {
        ("INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB")
    };
    format!(
        "CREATE TABLE wasmgate_queue (
           entry {serial},
           topic TEXT NOT NULL,
           id TEXT NOT NULL,
           key TEXT NOT NULL,
           sequence BIGINT NOT NULL,
           payload {blob} NOT NULL,
           headers TEXT NOT NULL,
           source TEXT NOT NULL,
           created_at BIGINT NOT NULL
         );
         CREATE INDEX wasmgate_queue_topic ON wasmgate_queue (topic, entry);
         CREATE TABLE wasmgate_queue_groups (
           topic TEXT NOT NULL,
           grp TEXT NOT NULL,
           cursor BIGINT NOT NULL,
           PRIMARY KEY (topic, grp)
         );
         CREATE TABLE wasmgate_queue_pending (
           topic TEXT NOT NULL,
           grp TEXT NOT NULL,
           entry BIGINT NOT NULL,
           consumer TEXT NOT NULL,
           delivered_at BIGINT NOT NULL,
           PRIMARY KEY (topic, grp, entry)
         )"
    )
}

pub struct Queue {
    db: Arc<dyn DbBackend>,
}

fn unavailable(e: DbError) -> BrokerError {
    BrokerError::Unavailable(format!("{e:?}"))
}

impl Queue {
    /// Creates the queue's tables if needed.
    pub async fn open(db: Arc<dyn DbBackend>) -> Result<Self, MigrationError> {
        db.migrate(OWNER, &[Migration::new("0001_queue", ddl(db.kind()))])
            .await?;
        Ok(Self { db })
    }
}

/// The queue's entries (as the broker hands them out: decimal numbers) as parameters.
fn entry_numbers(entries: &[String]) -> Result<Vec<Value>, BrokerError> {
    entries
        .iter()
        .map(|e| {
            e.parse()
                .map(Value::Int64)
                .map_err(|_| BrokerError::Corrupt(format!("entry `{e}` is not a queue entry")))
        })
        .collect()
}

/// The events of `entries`, in entry order.
async fn events_of(
    tx: &mut dyn DbTransaction,
    topic: &str,
    entries: &[i64],
) -> Result<Vec<Delivery>, DbError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut params = vec![Value::Text(topic.into())];
    params.extend(entries.iter().map(|e| Value::Int64(*e)));
    let rows = tx
        .query(
            &format!(
                "SELECT entry, id, topic, key, sequence, payload, headers, source, created_at FROM wasmgate_queue \
                 WHERE topic = $1 AND entry IN ({}) ORDER BY entry",
                placeholders(2, entries.len())
            ),
            params,
        )
        .await?;
    rows.rows
        .iter()
        .map(|r| {
            Ok(Delivery {
                entry: r[0].int().unwrap_or(0).to_string(),
                event: stored(&r[1..])?,
            })
        })
        .collect()
}

fn entries_of(rows: &crate::capabilities::db::Rows) -> Vec<i64> {
    rows.rows
        .iter()
        .filter_map(|r| r.first().and_then(Value::int))
        .collect()
}

/// How long a read's transaction may sit idle on PostgreSQL before its session is ended (its
/// statements follow one another at once; idle this long, its process has stopped).
const READ_LEASE_MS: &str = "5000";

#[async_trait]
impl Broker for Queue {
    fn kind(&self) -> &'static str {
        "queue"
    }

    async fn append(&self, events: &[Stored]) -> Result<(), BrokerError> {
        let mut tx = self.db.begin().await.map_err(unavailable)?;
        for e in events {
            tx.execute(
                "INSERT INTO wasmgate_queue (topic, id, key, sequence, payload, headers, source, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                vec![
                    Value::Text(e.topic.clone()),
                    Value::Text(e.id.clone()),
                    Value::Text(e.key.clone()),
                    Value::uint(e.sequence),
                    Value::Bytes(e.payload.clone()),
                    Value::Text(serde_json::to_string(&e.headers).expect("strings serialize")),
                    Value::Text(e.source.clone()),
                    Value::Int64(e.created_at),
                ],
            )
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn create_group(&self, topic: &str, group: &str) -> Result<(), BrokerError> {
        self.db
            .execute(
                "INSERT INTO wasmgate_queue_groups (topic, grp, cursor) VALUES ($1, $2, 0) \
                 ON CONFLICT (topic, grp) DO NOTHING",
                vec![Value::Text(topic.into()), Value::Text(group.into())],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn read(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        max: usize,
        claim_idle: Option<Duration>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let now = crate::auth::now_ms();
        let max_i = i64::try_from(max).unwrap_or(i64::MAX);
        let (t, g, c) = (
            Value::Text(topic.into()),
            Value::Text(group.into()),
            Value::Text(consumer.into()),
        );
        let mut tx = self.db.begin().await.map_err(unavailable)?;
        // The group's row first: it serializes readers of one group (a row lock on PostgreSQL,
        // the write lock on SQLite), so no entry is handed out twice at once. On PostgreSQL the
        // same statement sets the transaction's lease: a process stopped mid-read (SIGSTOP, a
        // frozen VM) has its session ended, instead of holding every other reader of the group
        // up for as long as it is stopped.
        let (lock, params) = if self.db.kind() == "postgres" {
            (
                "WITH lease AS (SELECT set_config('idle_in_transaction_session_timeout', $3, true)) \
                 UPDATE wasmgate_queue_groups SET cursor = cursor FROM lease \
                 WHERE topic = $1 AND grp = $2 RETURNING cursor",
                vec![t.clone(), g.clone(), Value::Text(READ_LEASE_MS.into())],
            )
        } else {
            (
                "UPDATE wasmgate_queue_groups SET cursor = cursor WHERE topic = $1 AND grp = $2 RETURNING cursor",
                vec![t.clone(), g.clone()],
            )
        };
        let locked = tx.query(lock, params).await.map_err(unavailable)?;
        let Some(cursor) = locked
            .rows
            .first()
            .and_then(|r| r.first())
            .and_then(Value::int)
        else {
            return Err(BrokerError::Corrupt(format!(
                "group {group} of {topic} does not exist"
            )));
        };
        // Idle entries first, chosen then claimed in two statements: as one `UPDATE ... IN
        // (SELECT ... LIMIT)` PostgreSQL may run the subquery once per pending row (measured:
        // 1.2 s with 2,000 pending on a table not analyzed yet). The group's row lock keeps
        // the two together.
        let idle = match claim_idle {
            Some(idle) => {
                let cut = now - i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
                let rows = tx
                    .query(
                        "SELECT entry FROM wasmgate_queue_pending WHERE topic = $1 AND grp = $2 AND delivered_at <= $3 \
                         ORDER BY entry LIMIT $4",
                        vec![t.clone(), g.clone(), Value::Int64(cut), Value::Int64(max_i)],
                    )
                    .await
                    .map_err(unavailable)?;
                entries_of(&rows)
            }
            None => Vec::new(),
        };
        let claimed = if idle.is_empty() {
            crate::capabilities::db::Rows {
                columns: Vec::new(),
                rows: Vec::new(),
            }
        } else {
            let mut params = vec![t.clone(), g.clone(), c.clone(), Value::Int64(now)];
            params.extend(idle.iter().map(|e| Value::Int64(*e)));
            tx.query(
                &format!(
                    "UPDATE wasmgate_queue_pending SET consumer = $3, delivered_at = $4 \
                     WHERE topic = $1 AND grp = $2 AND entry IN ({}) RETURNING entry",
                    placeholders(5, idle.len())
                ),
                params,
            )
            .await
            .map_err(unavailable)?
        };
        let mut entries = entries_of(&claimed);
        entries.sort_unstable();
        let room = max.saturating_sub(entries.len());
        if room > 0 {
            // Handed out in one statement: the new entries become this consumer's pending ones.
            let fresh = tx
                .query(
                    "INSERT INTO wasmgate_queue_pending (topic, grp, entry, consumer, delivered_at) \
                     SELECT topic, $2, entry, $3, $4 FROM wasmgate_queue WHERE topic = $1 AND entry > $5 \
                     ORDER BY entry LIMIT $6 RETURNING entry",
                    vec![
                        t.clone(),
                        g.clone(),
                        c.clone(),
                        Value::Int64(now),
                        Value::Int64(cursor),
                        Value::Int64(i64::try_from(room).unwrap_or(i64::MAX)),
                    ],
                )
                .await
                .map_err(unavailable)?;
            let mut fresh = entries_of(&fresh);
            fresh.sort_unstable();
            if let Some(last) = fresh.last() {
                tx.execute(
                    "UPDATE wasmgate_queue_groups SET cursor = $3 WHERE topic = $1 AND grp = $2",
                    vec![t.clone(), g.clone(), Value::Int64(*last)],
                )
                .await
                .map_err(unavailable)?;
            }
            entries.extend(fresh);
        }
        let deliveries = events_of(tx.as_mut(), topic, &entries)
            .await
            .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(deliveries)
    }

    async fn renew(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        entries: &[String],
    ) -> Result<(), BrokerError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut params = vec![
            Value::Text(topic.into()),
            Value::Text(group.into()),
            Value::Text(consumer.into()),
            Value::Int64(crate::auth::now_ms()),
        ];
        params.extend(entry_numbers(entries)?);
        self.db
            .execute(
                &format!(
                    "UPDATE wasmgate_queue_pending SET delivered_at = $4 WHERE topic = $1 AND grp = $2 AND consumer = $3 AND entry IN ({})",
                    placeholders(5, entries.len())
                ),
                params,
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn ack(&self, topic: &str, group: &str, entries: &[String]) -> Result<(), BrokerError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut params = vec![Value::Text(topic.into()), Value::Text(group.into())];
        params.extend(entry_numbers(entries)?);
        self.db
            .execute(
                &format!(
                    "DELETE FROM wasmgate_queue_pending WHERE topic = $1 AND grp = $2 AND entry IN ({})",
                    placeholders(3, entries.len())
                ),
                params,
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
