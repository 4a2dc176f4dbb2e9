//! The database backend trait, and what SQLite and PostgreSQL share: error classification.

use async_trait::async_trait;

use super::migrations::{Migration, MigrationError};
use super::{DbError, Rows, Value};

#[async_trait]
pub trait DbBackend: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    /// The column type of bytes in this database's DDL (the host's own tables).
    fn blob_type(&self) -> &'static str {
        if self.kind() == "postgres" {
            "BYTEA"
        } else {
            "BLOB"
        }
    }
    async fn query(&self, sql: &str, params: Vec<Value>) -> Result<Rows, DbError>;
    async fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, DbError>;
    async fn begin(&self) -> Result<Box<dyn DbTransaction>, DbError>;
    async fn ping(&self) -> Result<(), DbError>;
    /// Applies `migrations` of `function` not applied yet, in order, recording each; safe when
    /// several processes run it at once. Returns the names applied now.
    async fn migrate(
        &self,
        function: &str,
        migrations: &[Migration],
    ) -> Result<Vec<String>, MigrationError>;
}

/// A transaction holding one pooled connection; dropped without commit, it rolls back.
#[async_trait]
pub trait DbTransaction: Send + Sync {
    async fn query(&mut self, sql: &str, params: Vec<Value>) -> Result<Rows, DbError>;
    async fn execute(&mut self, sql: &str, params: Vec<Value>) -> Result<u64, DbError>;
    async fn commit(self: Box<Self>) -> Result<(), DbError>;
    async fn rollback(self: Box<Self>) -> Result<(), DbError>;
}

/// Maps a sqlx error to what the guest sees. Messages about the guest's own SQL (syntax,
/// unknown column, constraint names) are passed on; connection trouble is logged here and shows
/// only as `unavailable`.
pub fn classify(e: sqlx::Error) -> DbError {
    match e {
        sqlx::Error::Database(db) => {
            let constraint = db.constraint().unwrap_or_default().to_string();
            match db.kind() {
                sqlx::error::ErrorKind::UniqueViolation => DbError::UniqueViolation(constraint),
                sqlx::error::ErrorKind::ForeignKeyViolation
                | sqlx::error::ErrorKind::NotNullViolation
                | sqlx::error::ErrorKind::CheckViolation => {
                    DbError::ConstraintViolation(if constraint.is_empty() {
                        db.message().to_string()
                    } else {
                        constraint
                    })
                }
                _ => classify_code(db.code().as_deref(), db.message()),
            }
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Encode(_)
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnNotFound(_) => DbError::InvalidQuery(e.to_string()),
        other => {
            tracing::warn!(error = %other, "database unavailable");
            DbError::Unavailable
        }
    }
}

fn classify_code(code: Option<&str>, message: &str) -> DbError {
    match code {
        // PostgreSQL: connection exceptions, shutdown, too many connections.
        Some(c)
            if c.starts_with("08")
                || c == "57P01"
                || c == "57P02"
                || c == "57P03"
                || c == "53300" =>
        {
            tracing::warn!(code = c, message, "database unavailable");
            DbError::Unavailable
        }
        // PostgreSQL: statement timeout / cancelled.
        Some("57014") => DbError::Timeout,
        // SQLite: SQLITE_BUSY / SQLITE_LOCKED after the busy timeout.
        Some("5" | "6" | "261" | "517") => DbError::Timeout,
        // Integrity constraints not mapped to a kind above (PostgreSQL class 23).
        Some(c) if c.starts_with("23") => DbError::ConstraintViolation(message.to_string()),
        _ => DbError::InvalidQuery(message.to_string()),
    }
}

/// Checks a parameter count against what the statement expects.
pub fn check_arity(expected: usize, got: usize) -> Result<(), DbError> {
    if expected == got {
        Ok(())
    } else {
        Err(DbError::InvalidQuery(format!(
            "the statement has {expected} parameter(s) but {got} value(s) were given"
        )))
    }
}

/// Microseconds since the epoch -> UTC timestamp.
pub fn from_micros(us: i64) -> Result<chrono::DateTime<chrono::Utc>, DbError> {
    chrono::DateTime::from_timestamp_micros(us)
        .ok_or_else(|| DbError::InvalidQuery(format!("timestamp {us} is out of range")))
}

/// Attempts of a host read ([`read_again`]) in all, and the first pause between them (doubled
/// each time, with jitter).
const READ_ATTEMPTS: usize = 3;
const READ_FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(25);

/// A read the host makes for itself (a registry look-up, an `Idempotency-Key` look-up), tried
/// again with backoff and jitter when the database was unreachable or too slow: a blip (a
/// failover, a pool that was reconnecting) does not fail the request or the reload that needed
/// it. Only reads: a write is never repeated by the host (it may have landed), and a guest's
/// statements never go through here.
pub async fn read_again(
    db: &dyn DbBackend,
    sql: &str,
    params: Vec<Value>,
) -> Result<Rows, DbError> {
    use backon::{ExponentialBuilder, Retryable};
    (|| db.query(sql, params.clone()))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(READ_FIRST_PAUSE)
                .with_max_times(READ_ATTEMPTS - 1)
                .with_jitter(),
        )
        .when(|e| matches!(e, DbError::Unavailable | DbError::Timeout))
        .notify(|e, pause| tracing::debug!(error = ?e, ?pause, "host read failed; trying again"))
        .await
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::capabilities::db::Db;

    /// The real SQLite backend behind a door that fails the next queries with the given errors.
    struct Failing {
        inner: Arc<dyn DbBackend>,
        next: Mutex<Vec<DbError>>,
        calls: Mutex<usize>,
    }

    #[async_trait]
    impl DbBackend for Failing {
        fn kind(&self) -> &'static str {
            self.inner.kind()
        }
        async fn query(&self, sql: &str, params: Vec<Value>) -> Result<Rows, DbError> {
            *self.calls.lock().expect("calls") += 1;
            let failure = self.next.lock().expect("next").pop();
            match failure {
                Some(e) => Err(e),
                None => self.inner.query(sql, params).await,
            }
        }
        async fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, DbError> {
            self.inner.execute(sql, params).await
        }
        async fn begin(&self) -> Result<Box<dyn DbTransaction>, DbError> {
            self.inner.begin().await
        }
        async fn ping(&self) -> Result<(), DbError> {
            self.inner.ping().await
        }
        async fn migrate(
            &self,
            function: &str,
            migrations: &[Migration],
        ) -> Result<Vec<String>, MigrationError> {
            self.inner.migrate(function, migrations).await
        }
    }

    async fn failing(next: Vec<DbError>) -> (Failing, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tmp");
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let inner = Db::connect(&url).await.expect("sqlite").backend().clone();
        let f = Failing {
            inner,
            next: Mutex::new(next),
            calls: Mutex::new(0),
        };
        (f, dir)
    }

    #[tokio::test]
    async fn a_host_read_is_tried_again_only_when_the_database_was_unreachable_or_slow() {
        let (f, _dir) = failing(vec![DbError::Timeout, DbError::Unavailable]).await;
        let rows = read_again(&f, "SELECT 1", vec![]).await.expect("third try");
        assert_eq!(rows.rows.len(), 1);
        assert_eq!(*f.calls.lock().expect("calls"), 3);

        let (f, _dir) = failing(vec![DbError::Unavailable; 3]).await;
        assert_eq!(
            read_again(&f, "SELECT 1", vec![]).await,
            Err(DbError::Unavailable)
        );
        assert_eq!(*f.calls.lock().expect("calls"), 3, "3 attempts in all");

        let (f, _dir) = failing(vec![DbError::InvalidQuery("no such table".into())]).await;
        assert!(matches!(
            read_again(&f, "SELECT 1", vec![]).await,
            Err(DbError::InvalidQuery(_))
        ));
        assert_eq!(
            *f.calls.lock().expect("calls"),
            1,
            "a bad query is not repeated"
        );
    }
}
