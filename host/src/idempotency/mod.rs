//! The durable store behind `Idempotency-Key`: one row per key, in the platform's database
//! (SQLite on the embedded default, PostgreSQL in production), so keys survive restarts and
//! every process sharing the database gives the same answers.
//!
//! A row is claimed before the function runs (an insert that only one process can win), holds
//! no response while the function runs, and gets the response when it finishes. The claim has
//! an owner token and a lock deadline: a process that died mid-request leaves a row that a
//! retry may take over once the deadline passes (the function's timeout plus a margin), and a
//! late owner cannot overwrite the new owner's row. Written in the SQL subset both databases
//! accept, through the same backend trait guests use.

#[cfg(test)]
mod conformance;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::capabilities::db::migrations::{Migration, MigrationError};
use crate::capabilities::db::{DbBackend, DbError, Value, read_again};
use crate::response_cache::unix_ms;
use crate::snapshot::Snapshot;

/// The migrations namespace the host's own tables use; function names cannot contain `_`.
const OWNER: &str = "_wasmgate";
const TABLE: &str = "wasmgate_idempotency";
/// Expired rows are deleted at most this often per process.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What a request with a key may do.
#[derive(Debug, PartialEq)]
pub enum Claim {
    /// Run the function; finish with [`Store::complete`] or [`Store::release`].
    Run(Token),
    /// The first request finished: replay its response.
    Replay(Snapshot),
    /// The key was used with another request.
    Mismatch,
    /// The first request is still running.
    InFlight,
}

/// Proof of a claim: only its holder completes or releases the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    scope: String,
    owner: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the idempotency store is unavailable: {0:?}")]
    Db(DbError),
    #[error("the idempotency store holds a corrupt response: {0}")]
    Corrupt(#[from] crate::snapshot::Corrupt),
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        Self::Db(e)
    }
}

#[derive(Clone)]
pub struct Store {
    db: Arc<dyn DbBackend>,
    last_sweep: Arc<AtomicU64>,
}

impl Store {
    /// Creates the table if needed (once, under the migrations lock).
    pub async fn open(db: Arc<dyn DbBackend>) -> Result<Self, MigrationError> {
        let blob = db.blob_type();
        let ddl = format!(
            "CREATE TABLE {TABLE} (
               scope TEXT PRIMARY KEY,
               fingerprint TEXT NOT NULL,
               owner TEXT NOT NULL,
               response {blob},
               locked_until BIGINT NOT NULL,
               expires_at BIGINT NOT NULL
             );
             CREATE INDEX {TABLE}_expires ON {TABLE} (expires_at);"
        );
        db.migrate(OWNER, &[Migration::new("0001_idempotency", ddl)])
            .await?;
        Ok(Self {
            db,
            last_sweep: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Claims `scope` for a request with `fingerprint`, or says why not. `lock` bounds how long
    /// the claim holds if its process disappears; `ttl` how long the row lives.
    pub async fn claim(
        &self,
        scope: &str,
        fingerprint: &str,
        lock: Duration,
        ttl: Duration,
    ) -> Result<Claim, StoreError> {
        self.sweep().await;
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let now = unix_ms();
        let until =
            |d: Duration| Value::Int64(to_i64(now + u64::try_from(d.as_millis()).unwrap_or(0)));
        // Parameters appear in order of first use in every statement: SQLite numbers `$n`
        // parameters as it meets them.
        // A row can vanish between the steps (expired and swept); then start over, briefly.
        for _ in 0..3 {
            let inserted = self
                .db
                .execute(
                    &format!(
                        "INSERT INTO {TABLE} (scope, fingerprint, owner, response, locked_until, expires_at)
                         VALUES ($1, $2, $3, NULL, $4, $5) ON CONFLICT (scope) DO NOTHING"
                    ),
                    vec![
                        Value::Text(scope.into()),
                        Value::Text(fingerprint.into()),
                        Value::Text(owner.clone()),
                        until(lock),
                        until(ttl),
                    ],
                )
                .await?;
            // Or take over a row that expired, or whose owner vanished mid-run.
            let claimed = inserted == 1
                || self
                    .db
                    .execute(
                        &format!(
                            "UPDATE {TABLE} SET fingerprint = $1, owner = $2, response = NULL,
                               locked_until = $3, expires_at = $4
                             WHERE scope = $5 AND (expires_at <= $6
                               OR (response IS NULL AND locked_until <= $6 AND fingerprint = $1))"
                        ),
                        vec![
                            Value::Text(fingerprint.into()),
                            Value::Text(owner.clone()),
                            until(lock),
                            until(ttl),
                            Value::Text(scope.into()),
                            Value::Int64(to_i64(now)),
                        ],
                    )
                    .await?
                    == 1;
            if claimed {
                return Ok(Claim::Run(Token {
                    scope: scope.into(),
                    owner,
                }));
            }
            // The look-up alone is safe to repeat; the claim above is not (it may have landed).
            let rows = read_again(
                &*self.db,
                &format!("SELECT fingerprint, response FROM {TABLE} WHERE scope = $1"),
                vec![Value::Text(scope.into())],
            )
            .await?;
            let Some(row) = rows.rows.into_iter().next() else {
                continue;
            };
            return Ok(match (&row[0], &row[1]) {
                (Value::Text(fp), _) if fp != fingerprint => Claim::Mismatch,
                (_, Value::Bytes(bytes)) => Claim::Replay(Snapshot::decode(bytes)?),
                _ => Claim::InFlight,
            });
        }
        Err(StoreError::Db(DbError::Unavailable))
    }

    /// Stores the response of a claimed run; later requests with the key replay it.
    pub async fn complete(&self, token: &Token, response: &Snapshot) -> Result<(), StoreError> {
        self.db
            .execute(
                &format!(
                    "UPDATE {TABLE} SET response = $1 WHERE scope = $2 AND owner = $3 AND response IS NULL"
                ),
                vec![
                    Value::Bytes(response.encode()),
                    Value::Text(token.scope.clone()),
                    Value::Text(token.owner.clone()),
                ],
            )
            .await?;
        Ok(())
    }

    /// Gives up a claimed run without a response (the function failed), so a retry runs again.
    pub async fn release(&self, token: &Token) -> Result<(), StoreError> {
        self.db
            .execute(
                &format!(
                    "DELETE FROM {TABLE} WHERE scope = $1 AND owner = $2 AND response IS NULL"
                ),
                vec![
                    Value::Text(token.scope.clone()),
                    Value::Text(token.owner.clone()),
                ],
            )
            .await?;
        Ok(())
    }

    /// Deletes expired rows, at most once per [`SWEEP_EVERY`] in this process.
    async fn sweep(&self) {
        let now = unix_ms();
        let last = self.last_sweep.load(Ordering::Relaxed);
        let every = u64::try_from(SWEEP_EVERY.as_millis()).unwrap_or(u64::MAX);
        if now < last + every
            || self
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let swept = self
            .db
            .execute(
                &format!("DELETE FROM {TABLE} WHERE expires_at <= $1"),
                vec![Value::Int64(to_i64(now))],
            )
            .await;
        if let Err(e) = swept {
            tracing::debug!(error = ?e, "idempotency sweep failed; will retry");
        }
    }
}

fn to_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}
