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
