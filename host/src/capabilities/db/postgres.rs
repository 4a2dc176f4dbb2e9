//! PostgreSQL through a sqlx pool.
//!
//! Parameters bind by the type PostgreSQL inferred for them (learned from the prepared
//! statement, which sqlx caches per connection), so `int64` fits an `integer` column and `null`
//! fits anything. Columns of types the WIT `value` cannot carry losslessly (numeric, uuid, json)
//! are refused with a hint to cast them in SQL.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions, PgRow, PgTypeInfo};
use sqlx::{
    Arguments, Column, Connection, Executor, PgConnection, PgPool, Row, Statement, TypeInfo,
    ValueRef,
};

use super::backend::{DbBackend, DbTransaction, check_arity, classify, from_micros};
use super::migrations::{Migration, MigrationError, TABLE, pending};
use super::{DbError, Rows, Value};
use crate::capabilities::config::{ConnectError, redact};

/// Pooled connections per wasmgate process: enough to keep 2 cores busy with round trips in
/// flight, few enough that many replicas stay under PostgreSQL's default 100.
const POOL_SIZE: u32 = 16;
/// How long a request waits for a pooled connection; past it the guest sees `unavailable`.
/// Short, so a stopped server answers fast instead of queueing every request.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
/// Server-side statement timeout; past it the guest sees `timeout`.
const STATEMENT_TIMEOUT: &str = "5s";
/// Key of the advisory lock that serializes migrations across processes.
const MIGRATION_LOCK: i64 = 0x7761_736d_6761_7465; // "wasmgate"

pub struct Postgres {
    pool: PgPool,
}

impl Postgres {
    pub fn connect(url: &str) -> Result<Self, ConnectError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| ConnectError::DatabaseUrl {
                url: redact(url),
                reason: e.to_string(),
            })?
            .options([("statement_timeout", STATEMENT_TIMEOUT)]);
        let options = plain_on_loopback(url, options);
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options);
        Ok(Self { pool })
    }
}

/// Without an `sslmode` in the URL, libpq's default (`prefer`: TLS whenever the server offers
/// it) except to this machine: encrypting a loopback connection protects nothing (whoever can
/// read it is already on the machine) and costs PostgreSQL CPU on every statement (`bench/run
/// --only users`, the mix: 0.30 ms of PostgreSQL CPU per request over TLS, 0.23 ms without).
/// Any `sslmode` written in the URL, or set through `PGSSLMODE` (which sqlx reads into
/// `options`), is followed as written.
fn plain_on_loopback(url: &str, options: PgConnectOptions) -> PgConnectOptions {
    let host = options.get_host();
    let loopback = host == "localhost"
        || host.starts_with('/')
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let defaulted = matches!(options.get_ssl_mode(), sqlx::postgres::PgSslMode::Prefer);
    if loopback && defaulted && !url.contains("sslmode=") {
        options.ssl_mode(sqlx::postgres::PgSslMode::Disable)
    } else {
        options
    }
}

fn mismatch(i: usize, ty: &str, v: &Value) -> DbError {
    let got = match v {
        Value::Null => "null",
        Value::Int64(_) => "int64",
        Value::Float64(_) => "float64",
        Value::Text(_) => "text",
        Value::Bytes(_) => "bytes",
        Value::Boolean(_) => "boolean",
        Value::Timestamp(_) => "timestamp",
    };
    DbError::InvalidQuery(format!(
        "parameter ${} is {ty} but a {got} was given; cast it in SQL (e.g. ${}::bigint) or pass the matching value",
        i + 1,
        i + 1
    ))
}

fn add<T>(args: &mut PgArguments, v: T) -> Result<(), DbError>
where
    T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    args.add(v)
        .map_err(|e| DbError::InvalidQuery(format!("cannot encode a parameter: {e}")))
}

fn bind(types: &[PgTypeInfo], params: Vec<Value>) -> Result<PgArguments, DbError> {
    check_arity(types.len(), params.len())?;
    let mut args = PgArguments::default();
    for (i, (ty, v)) in types.iter().zip(params).enumerate() {
        let name = ty.name();
        match (name, v) {
            // A NULL carries no bytes, so its declared type never conflicts.
            (_, Value::Null) => add(&mut args, None::<String>)?,
            ("INT8", Value::Int64(n)) => add(&mut args, n)?,
            ("INT4", Value::Int64(n)) => {
                add(&mut args, i32::try_from(n).map_err(|_| out_of_range(i))?)?
            }
            ("INT2", Value::Int64(n)) => {
                add(&mut args, i16::try_from(n).map_err(|_| out_of_range(i))?)?
            }
            ("FLOAT8", Value::Float64(f)) => add(&mut args, f)?,
            ("FLOAT8", Value::Int64(n)) => add(&mut args, n as f64)?,
            ("FLOAT4", Value::Float64(f)) => add(&mut args, f as f32)?,
            ("FLOAT4", Value::Int64(n)) => add(&mut args, n as f32)?,
            ("TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR", Value::Text(s)) => add(&mut args, s)?,
            ("BYTEA", Value::Bytes(b)) => add(&mut args, b)?,
            ("BOOL", Value::Boolean(b)) => add(&mut args, b)?,
            ("TIMESTAMPTZ", Value::Timestamp(us)) => add(&mut args, from_micros(us)?)?,
            ("TIMESTAMP", Value::Timestamp(us)) => add(&mut args, from_micros(us)?.naive_utc())?,
            ("TIMESTAMPTZ" | "TIMESTAMP", Value::Text(s)) => {
                let t = chrono::DateTime::parse_from_rfc3339(&s).map_err(|_| {
                    DbError::InvalidQuery(format!(
                        "parameter ${} is not an RFC 3339 timestamp",
                        i + 1
                    ))
                })?;
                if name == "TIMESTAMP" {
                    add(&mut args, t.naive_utc())?
                } else {
                    add(&mut args, t.with_timezone(&chrono::Utc))?
                }
            }
            (_, v) => return Err(mismatch(i, name, &v)),
        }
    }
    Ok(args)
}

fn out_of_range(i: usize) -> DbError {
    DbError::InvalidQuery(format!(
        "parameter ${} is out of range for its column",
        i + 1
    ))
}

fn value(row: &PgRow, i: usize) -> Result<Value, DbError> {
    let raw = row.try_get_raw(i).map_err(classify)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let column = row.column(i);
    let ty = column.type_info().name();
    let get = |e| classify(e);
    Ok(match ty {
        "BOOL" => Value::Boolean(row.try_get(i).map_err(get)?),
        "INT2" => Value::Int64(row.try_get::<i16, _>(i).map_err(get)?.into()),
        "INT4" => Value::Int64(row.try_get::<i32, _>(i).map_err(get)?.into()),
        "INT8" => Value::Int64(row.try_get(i).map_err(get)?),
        "FLOAT4" => Value::Float64(row.try_get::<f32, _>(i).map_err(get)?.into()),
        "FLOAT8" => Value::Float64(row.try_get(i).map_err(get)?),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" => {
            Value::Text(row.try_get(i).map_err(get)?)
        }
        "BYTEA" => Value::Bytes(row.try_get(i).map_err(get)?),
        "TIMESTAMPTZ" => Value::Timestamp(
            row.try_get::<chrono::DateTime<chrono::Utc>, _>(i)
                .map_err(get)?
                .timestamp_micros(),
        ),
        "TIMESTAMP" => Value::Timestamp(
            row.try_get::<chrono::NaiveDateTime, _>(i)
                .map_err(get)?
                .and_utc()
                .timestamp_micros(),
        ),
        "VOID" => Value::Null,
        other => {
            return Err(DbError::InvalidQuery(format!(
                "column `{}` has type {other}, which the db capability does not carry; cast it in SQL (e.g. `{}::text` or `::bigint`)",
                column.name(),
                column.name()
            )));
        }
    })
}

/// Prepares (cached per connection after the first time) to learn parameter types and columns.
async fn prepare(
    conn: &mut PgConnection,
    sql: &str,
    params: Vec<Value>,
) -> Result<(Vec<String>, PgArguments), DbError> {
    let stmt = conn.prepare(sql).await.map_err(classify)?;
    let types: &[PgTypeInfo] = match stmt.parameters() {
        Some(sqlx::Either::Left(types)) => types,
        _ => &[],
    };
    let args = bind(types, params)?;
    let columns = stmt
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    Ok((columns, args))
}

async fn query(conn: &mut PgConnection, sql: &str, params: Vec<Value>) -> Result<Rows, DbError> {
    let (columns, args) = prepare(conn, sql, params).await?;
    let rows = sqlx::query_with(sql, args)
        .fetch_all(&mut *conn)
        .await
        .map_err(classify)?;
    let rows = rows
        .iter()
        .map(|r| (0..r.len()).map(|i| value(r, i)).collect())
        .collect::<Result<_, _>>()?;
    Ok(Rows { columns, rows })
}

async fn execute(conn: &mut PgConnection, sql: &str, params: Vec<Value>) -> Result<u64, DbError> {
    let (_, args) = prepare(conn, sql, params).await?;
    Ok(sqlx::query_with(sql, args)
        .execute(&mut *conn)
        .await
        .map_err(classify)?
        .rows_affected())
}

#[async_trait]
impl DbBackend for Postgres {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn query(&self, sql: &str, params: Vec<Value>) -> Result<Rows, DbError> {
        let mut conn = self.pool.acquire().await.map_err(classify)?;
        query(&mut conn, sql, params).await
    }

    async fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64, DbError> {
        let mut conn = self.pool.acquire().await.map_err(classify)?;
        execute(&mut conn, sql, params).await
    }

    async fn begin(&self) -> Result<Box<dyn DbTransaction>, DbError> {
        let tx = self.pool.begin().await.map_err(classify)?;
        Ok(Box::new(PgTx(tx)))
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
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // Held until commit: a second process blocks here, then sees what the first applied.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        (&mut *tx).execute(format!("CREATE TABLE IF NOT EXISTS {TABLE} (function TEXT NOT NULL, name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (function, name))").as_str())
        .await
        .map_err(unavailable)?;
        let applied: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT name, checksum FROM {TABLE} WHERE function = $1"
        ))
        .bind(function)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        let mut done = Vec::new();
        for m in pending(migrations, &applied)? {
            (&mut *tx)
                .execute(m.sql.as_str())
                .await
                .map_err(|e| MigrationError::Failed {
                    name: m.name.clone(),
                    reason: e.to_string(),
                })?;
            sqlx::query(&format!(
                "INSERT INTO {TABLE} (function, name, checksum) VALUES ($1, $2, $3)"
            ))
            .bind(function)
            .bind(&m.name)
            .bind(&m.checksum)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            done.push(m.name.clone());
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(done)
    }
}

struct PgTx(sqlx::Transaction<'static, sqlx::Postgres>);

#[async_trait]
impl DbTransaction for PgTx {
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

#[cfg(test)]
mod tls_tests {
    use sqlx::postgres::PgSslMode;

    use super::*;

    fn mode(url: &str) -> PgSslMode {
        let options = PgConnectOptions::from_str(url).expect("url");
        plain_on_loopback(url, options).get_ssl_mode()
    }

    #[test]
    fn loopback_is_plain_unless_the_url_says_otherwise() {
        assert!(matches!(
            mode("postgres://u@127.0.0.1/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@localhost:5432/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@[::1]:5432/db"),
            PgSslMode::Disable
        ));
        assert!(matches!(
            mode("postgres://u@db.internal/db"),
            PgSslMode::Prefer
        ));
        assert!(matches!(
            mode("postgres://u@127.0.0.1/db?sslmode=verify-full"),
            PgSslMode::VerifyFull
        ));
        assert!(matches!(
            mode("postgres://u@127.0.0.1/db?sslmode=require"),
            PgSslMode::Require
        ));
        // As `PGSSLMODE=require` leaves it: the operator's choice, not the default.
        let url = "postgres://u@127.0.0.1/db";
        let from_env = PgConnectOptions::from_str(url)
            .expect("url")
            .ssl_mode(PgSslMode::Require);
        assert!(matches!(
            plain_on_loopback(url, from_env).get_ssl_mode(),
            PgSslMode::Require
        ));
    }
}
