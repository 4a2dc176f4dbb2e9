//! The embedded default: SQLite through a sqlx pool, in WAL mode.
//!
//! SQLite is dynamically typed, so values bind by their own type; reading back, a column
//! declared `BOOLEAN` yields booleans and one declared `TIMESTAMP`/`DATETIME` yields timestamps
//! (stored as ISO 8601 text, which sorts in time order).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{
    Column, Connection, Executor, Row, SqliteConnection, SqlitePool, Statement, TypeInfo, ValueRef,
};

use super::backend::{DbBackend, DbTransaction, check_arity, classify, from_micros};
use super::migrations::{Migration, MigrationError, TABLE, pending};
use super::{DbError, Rows, Value};
use crate::capabilities::config::ConnectError;

/// Connections in the pool: readers run in parallel under WAL, writers queue on SQLite's lock.
const POOL_SIZE: u32 = 8;
/// How long a writer waits for SQLite's write lock before the guest sees `timeout`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Timestamps are written in this fixed-width form so text order is time order.
const TIMESTAMP_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

pub struct Sqlite {
    pool: SqlitePool,
}

impl Sqlite {
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        let fail = |reason: String| ConnectError::Database {
            url: url.to_string(),
            reason,
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| ConnectError::DatabaseUrl {
                url: url.to_string(),
                reason: e.to_string(),
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        if let Some(parent) = options.get_filename().parent() {
            std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options)
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok(Self { pool })
    }
}

fn bind<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    params: Vec<Value>,
) -> Result<sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>, DbError> {
    for v in params {
        q = match v {
            Value::Null => q.bind(None::<i64>),
            Value::Int64(n) => q.bind(n),
            Value::Float64(f) => q.bind(f),
            Value::Text(s) => q.bind(s),
            Value::Bytes(b) => q.bind(b),
            Value::Boolean(b) => q.bind(b),
            Value::Timestamp(us) => q.bind(from_micros(us)?.format(TIMESTAMP_FORMAT).to_string()),
        };
    }
    Ok(q)
}

fn parse_timestamp(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    // SQLite's own CURRENT_TIMESTAMP form, in UTC.
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().timestamp_micros())
}

fn value(row: &SqliteRow, i: usize) -> Result<Value, DbError> {
    let raw = row.try_get_raw(i).map_err(classify)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let actual = raw.type_info().name().to_string();
    let declared = row.column(i).type_info().name().to_ascii_uppercase();
    Ok(match actual.as_str() {
        "INTEGER" if declared.contains("BOOL") => {
            Value::Boolean(row.try_get_unchecked::<i64, _>(i).map_err(classify)? != 0)
        }
        "INTEGER" => Value::Int64(row.try_get_unchecked(i).map_err(classify)?),
        "REAL" => Value::Float64(row.try_get_unchecked(i).map_err(classify)?),
        "BLOB" => Value::Bytes(row.try_get_unchecked(i).map_err(classify)?),
        _ => {
            let s: String = row.try_get_unchecked(i).map_err(classify)?;
            let is_time = declared.contains("TIMESTAMP") || declared.contains("DATETIME");
            match is_time.then(|| parse_timestamp(&s)).flatten() {
                Some(us) => Value::Timestamp(us),
                None => Value::Text(s),
            }
        }
    })
}

async fn query(
    conn: &mut SqliteConnection,
    sql: &str,
    params: Vec<Value>,
) -> Result<Rows, DbError> {
    let stmt = conn.prepare(sql).await.map_err(classify)?;
    if let Some(sqlx::Either::Right(n)) = stmt.parameters() {
        check_arity(n, params.len())?;
    }
    let columns: Vec<String> = stmt
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let rows = bind(sqlx::query(sql), params)?
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?;
    let rows = rows
        .iter()
        .map(|r| (0..r.len()).map(|i| value(r, i)).collect())
        .collect::<Result<_, _>>()?;
    Ok(Rows { columns, rows })
}

async fn execute(
    conn: &mut SqliteConnection,
    sql: &str,
    params: Vec<Value>,
) -> Result<u64, DbError> {
    let stmt = conn.prepare(sql).await.map_err(classify)?;
    if let Some(sqlx::Either::Right(n)) = stmt.parameters() {
        check_arity(n, params.len())?;
    }
    Ok(bind(sqlx::query(sql), params)?
        .execute(&mut *conn)
        .await
        .map_err(classify)?
        .rows_affected())
}

#[async_trait]
impl DbBackend for Sqlite {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn query(&self, sql: &str, params: Vec<Value>) -> Result<Rows, DbError> {
        let mut conn = self.pool.acquire().await.map_err(classify)?;
        query(&mut conn, sql, params).await
    }

    async fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, DbError> {
        let mut conn = self.pool.acquire().await.map_err(classify)?;
        execute(&mut conn, sql, params).await
    }

    /// `BEGIN IMMEDIATE`: the write lock up front, waited for under the busy timeout. A
    /// deferred transaction that reads and then writes fails at once (SQLITE_BUSY_SNAPSHOT)
    /// when another connection wrote in between, as the relay and consumers do at any time.
    async fn begin(&self) -> Result<Box<dyn DbTransaction>, DbError> {
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)?;
        Ok(Box::new(SqliteTx(tx)))
    }

    async fn ping(&self) -> Result<(), DbError> {
        let mut conn = self.pool.acquire().await.map_err(classify)?;
        conn.ping().await.map_err(classify)
    }

    async fn migrate(
        &self,
        function: &str,
        migrations: &[Migration],
    ) -> Result<Vec<String>, MigrationError> {
        let unavailable = |e: sqlx::Error| MigrationError::Unavailable(e.to_string());
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        // IMMEDIATE takes the write lock up front: a second process waits here, then sees the
        // migrations the first applied.
        (&mut *conn)
            .execute("BEGIN IMMEDIATE")
            .await
            .map_err(unavailable)?;
        let result = apply(&mut conn, function, migrations).await;
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        (&mut *conn).execute(end).await.map_err(unavailable)?;
        result
    }
}

async fn apply(
    conn: &mut SqliteConnection,
    function: &str,
    migrations: &[Migration],
) -> Result<Vec<String>, MigrationError> {
    let unavailable = |e: sqlx::Error| MigrationError::Unavailable(e.to_string());
    (&mut *conn).execute(format!("CREATE TABLE IF NOT EXISTS {TABLE} (function TEXT NOT NULL, name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at TEXT NOT NULL, PRIMARY KEY (function, name))").as_str())
    .await
    .map_err(unavailable)?;
    let applied: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT name, checksum FROM {TABLE} WHERE function = $1"
    ))
    .bind(function)
    .fetch_all(&mut *conn)
    .await
    .map_err(unavailable)?;
    let mut done = Vec::new();
    for m in pending(migrations, &applied)? {
        (&mut *conn)
            .execute(m.sql.as_str())
            .await
            .map_err(|e| MigrationError::Failed {
                name: m.name.clone(),
                reason: e.to_string(),
            })?;
        sqlx::query(&format!(
            "INSERT INTO {TABLE} (function, name, checksum, applied_at) VALUES ($1, $2, $3, $4)"
        ))
        .bind(function)
        .bind(&m.name)
        .bind(&m.checksum)
        .bind(chrono::Utc::now().format(TIMESTAMP_FORMAT).to_string())
        .execute(&mut *conn)
        .await
        .map_err(unavailable)?;
        done.push(m.name.clone());
    }
    Ok(done)
}

struct SqliteTx(sqlx::Transaction<'static, sqlx::Sqlite>);

#[async_trait]
impl DbTransaction for SqliteTx {
    async fn query(&mut self, sql: &str, params: Vec<Value>) -> Result<Rows, DbError> {
        query(&mut self.0, sql, params).await
    }
    async fn execute(&mut self, sql: &str, params: Vec<Value>) -> Result<u64, DbError> {
        execute(&mut self.0, sql, params).await
    }
    async fn commit(self: Box<Self>) -> Result<(), DbError> {
        self.0.commit().await.map_err(classify)
    }
    async fn rollback(self: Box<Self>) -> Result<(), DbError> {
        self.0.rollback().await.map_err(classify)
    }
}
