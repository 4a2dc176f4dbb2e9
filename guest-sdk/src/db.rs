//! SQL through the host's `db` capability, with rows decoded into serde types.
//!
//! ```ignore
//! #[derive(serde::Deserialize)]
//! struct User { id: i64, email: String }
//! let users: Vec<User> = db::query_as("SELECT id, email FROM users WHERE id = $1", &[id.into()])?;
//! ```
//!
//! Timestamps decode as microseconds since the epoch (`i64`); bytes as `Vec<u8>`.

use serde::de::DeserializeOwned;

use crate::Problem;
use crate::capabilities::db as wit;
pub use wit::{Error, Rows, Value};

pub fn query(sql: &str, params: &[Value]) -> Result<Rows, Error> {
    wit::query(sql, params)
}

pub fn execute(sql: &str, params: &[Value]) -> Result<u64, Error> {
    wit::execute(sql, params)
}

/// Rows decoded into `T` by column name.
pub fn query_as<T: DeserializeOwned>(sql: &str, params: &[Value]) -> Result<Vec<T>, Problem> {
    decode(query(sql, params)?)
}

/// The first row decoded into `T`, if any.
pub fn query_opt<T: DeserializeOwned>(sql: &str, params: &[Value]) -> Result<Option<T>, Problem> {
    Ok(query_as(sql, params)?.into_iter().next())
}

/// Starts a transaction; dropped without [`Transaction::commit`], it rolls back.
pub fn begin() -> Result<Transaction, Error> {
    wit::begin().map(Transaction)
}

pub struct Transaction(wit::Transaction);

impl Transaction {
    /// The capability's handle, for the calls that take a transaction (`events::publish_in`).
    pub(crate) fn raw(&self) -> &wit::Transaction {
        &self.0
    }

    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows, Error> {
        self.0.query(sql, params)
    }
    pub fn query_as<T: DeserializeOwned>(
        &self,
        sql: &str,
        params: &[Value],
    ) -> Result<Vec<T>, Problem> {
        decode(self.0.query(sql, params)?)
    }
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, Error> {
        self.0.execute(sql, params)
    }
    pub fn commit(self) -> Result<(), Error> {
        self.0.commit()
    }
    pub fn rollback(self) -> Result<(), Error> {
        self.0.rollback()
    }
}

fn to_json(v: Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Int64(n) | Value::Timestamp(n) => n.into(),
        Value::Float64(f) => f.into(),
        Value::Text(s) => s.into(),
        Value::Bytes(b) => b.into(),
        Value::Boolean(b) => b.into(),
    }
}

/// Decodes rows into `T` by column name.
pub fn decode<T: DeserializeOwned>(rows: Rows) -> Result<Vec<T>, Problem> {
    rows.rows
        .into_iter()
        .map(|row| {
            let object: serde_json::Map<String, serde_json::Value> = rows
                .columns
                .iter()
                .cloned()
                .zip(row.into_iter().map(to_json))
                .collect();
            serde_json::from_value(object.into()).map_err(|e| {
                Problem::internal(format!("a row does not match the expected shape: {e}"))
            })
        })
        .collect()
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int64(n)
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float64(f)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Boolean(b)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}
impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Self {
        Value::Bytes(b)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// The default HTTP answer for each database error. A unique violation is usually the
/// client's conflict; a bad query is the function's own bug.
impl From<Error> for Problem {
    fn from(e: Error) -> Self {
        use crate::StatusCode;
        match e {
            Error::UniqueViolation(c) => Problem::new(StatusCode::CONFLICT, "conflict", "Conflict")
                .with_detail(format!("already exists ({c})")),
            Error::ConstraintViolation(c) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "constraint-violation",
                "The data breaks a constraint",
            )
            .with_detail(c),
            Error::Unavailable => Problem::unavailable("database"),
            Error::Timeout => Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                "backend-timeout",
                "The database did not answer in time",
            ),
            Error::InvalidQuery(_) | Error::InvalidState(_) => {
                Problem::internal("database query failed")
            }
        }
    }
}
