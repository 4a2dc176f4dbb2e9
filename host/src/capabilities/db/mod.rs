//! `wasmgate:platform/db`: SQL with typed values and transactions, on SQLite (the embedded
//! default) or PostgreSQL, both through sqlx pools.
//!
//! Guests write `$1`-style parameters in the portable subset of SQL both accept. Functions ship
//! migrations the host applies once, in order, at start (see `migrations`).
//!
//! A run may instead be held in one transaction the host opens ([`RequestDb::hold`]): every
//! call of the guest goes into it and its transactions become savepoints, so the host decides
//! for all of it at once (an event's handler commits with its inbox record; a shadow run is
//! always rolled back): event functions (`events::consumer`) and shadow runs
//! (`runtime::shadow`) run this way.

mod backend;
#[cfg(test)]
pub(crate) mod conformance;
mod host;
pub mod migrations;
mod postgres;
mod sqlite;

use std::sync::Arc;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use super::bindings::wasmgate::platform::db as wit;
use super::config::ConnectError;
use crate::runtime::GuestState;

use super::breaker::Breaker;
pub use backend::{DbBackend, DbTransaction, read_again};
pub use wit::{Error as DbError, Rows, Value};

/// How the host's own tables (auth, registry) read a column: text or empty, integer or none.
impl Value {
    pub fn text(&self) -> String {
        match self {
            Value::Text(s) => s.clone(),
            _ => String::new(),
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int64(n) => Some(*n),
            _ => None,
        }
    }

    /// A count or sequence: the integer, 0 when absent or negative.
    pub fn unsigned(&self) -> u64 {
        self.int().and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
    }

    /// Bytes, or empty.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Value::Bytes(b) => b.clone(),
            _ => Vec::new(),
        }
    }

    /// A count or sequence as a parameter (saturating at `i64::MAX`).
    pub fn uint(n: u64) -> Self {
        Value::Int64(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

/// `$from, $from+1, ...` for `n` parameters: the list of an `IN (...)`.
pub fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Rows {
    /// The first column of the first row as an integer: what `SELECT count(*)`, `RETURNING n`
    /// and one-value lookups answer.
    pub fn first_int(&self) -> Option<i64> {
        self.rows.first()?.first()?.int()
    }
}

/// Open transactions one request may hold; each pins a pooled connection.
pub const MAX_TRANSACTIONS_PER_REQUEST: usize = 4;

#[derive(Clone)]
pub struct Db {
    backend: Arc<dyn DbBackend>,
    breaker: Arc<Breaker>,
}

impl Db {
    /// Opens the pool for `url` (`sqlite://...` or `postgres://...`). PostgreSQL connects
    /// lazily, so wasmgate starts (and `/readyz` says why it is not ready) while it is down.
    pub async fn connect(url: &str) -> Result<Self, ConnectError> {
        let backend: Arc<dyn DbBackend> =
            if url.starts_with("postgres:") || url.starts_with("postgresql:") {
                Arc::new(postgres::Postgres::connect(url)?)
            } else if url.starts_with("sqlite:") {
                Arc::new(sqlite::Sqlite::connect(url).await?)
            } else {
                return Err(ConnectError::DatabaseUrl {
                    url: super::config::redact(url),
                    reason: "unknown scheme".into(),
                });
            };
        Ok(Self {
            backend,
            breaker: Arc::new(Breaker::new("db")),
        })
    }

    /// Its circuit breaker's state, for `/readyz`.
    pub fn breaker(&self) -> &'static str {
        self.breaker.state()
    }

    pub fn backend(&self) -> &Arc<dyn DbBackend> {
        &self.backend
    }

    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    pub async fn ready(&self) -> bool {
        super::answers(self.backend.ping()).await
    }

    pub fn configure(&self, _function: &str) -> FunctionDb {
        FunctionDb {
            backend: self.backend.clone(),
            breaker: self.breaker.clone(),
        }
    }
}

/// A function's database handle. Tables are not namespaced: a function's migrations own its
/// tables, and several functions of one service may share them on purpose.
#[derive(Clone)]
pub struct FunctionDb {
    backend: Arc<dyn DbBackend>,
    breaker: Arc<Breaker>,
}

impl FunctionDb {
    pub fn instance(&self) -> RequestDb {
        RequestDb {
            backend: self.backend.clone(),
            breaker: self.breaker.clone(),
            open: 0,
            held: None,
        }
    }
}

pub struct RequestDb {
    backend: Arc<dyn DbBackend>,
    /// Calls that take a connection from the pool go through it.
    breaker: Arc<Breaker>,
    /// Transactions open in this request.
    open: usize,
    /// A transaction the host opened around the whole run (see [`RequestDb::hold`]).
    held: Option<Held>,
}

struct Held {
    tx: Box<dyn DbTransaction>,
    /// Savepoints named so far (names are never reused within the run).
    savepoints: usize,
    /// A savepoint the host asked for, taken just before the run's first statement: a run
    /// that never touches the database costs no round trip for it.
    mark: Option<&'static str>,
    /// Whether `mark` was taken.
    marked: bool,
}

impl Held {
    /// The transaction, with the host's mark taken first if it is still pending.
    async fn tx(&mut self) -> Result<&mut Box<dyn DbTransaction>, DbError> {
        if let Some(name) = self.mark.take() {
            self.tx
                .execute(&format!("SAVEPOINT {name}"), vec![])
                .await?;
            self.marked = true;
        }
        Ok(&mut self.tx)
    }
}

/// What a run leaves of the transaction the host held it in.
pub struct Released {
    pub tx: Box<dyn DbTransaction>,
    /// Whether the mark asked for in [`RequestDb::hold_in`] was taken (the run made a
    /// statement): only then is there a savepoint to roll back to.
    pub marked: bool,
}

impl RequestDb {
    /// Runs every db call of this guest run inside one transaction the host opens now: the
    /// guest's own calls in it, its transactions as savepoints of it. The host then commits it
    /// with what it records itself (an event's inbox row), or rolls it back (a shadow run),
    /// after taking it back with [`RequestDb::release`].
    pub async fn hold(&mut self) -> Result<(), DbError> {
        let tx = self.backend.begin().await?;
        self.hold_in(tx, None);
        Ok(())
    }

    /// [`RequestDb::hold`] in `tx`, a transaction the host already holds (several event runs
    /// share one), with a savepoint `mark` taken before the run's first statement, so that
    /// the host can undo the run alone.
    pub fn hold_in(&mut self, tx: Box<dyn DbTransaction>, mark: Option<&'static str>) {
        self.held = Some(Held {
            tx,
            savepoints: 0,
            mark,
            marked: false,
        });
    }

    /// Whether the host holds the run in a transaction.
    pub(crate) fn is_held(&self) -> bool {
        self.held.is_some()
    }

    /// The transaction the host holds the run in: where the run's statements go.
    pub(crate) async fn held_transaction(
        &mut self,
    ) -> Result<&mut Box<dyn DbTransaction>, DbError> {
        match self.held.as_mut() {
            Some(h) => h.tx().await,
            None => Err(DbError::InvalidState("no transaction is held".into())),
        }
    }

    pub(crate) fn backend(&self) -> &Arc<dyn DbBackend> {
        &self.backend
    }

    /// Where the guest's transaction `tx` sends statements (its own connection, or the held
    /// transaction for a savepoint); `None` once it was committed or rolled back.
    pub(crate) fn statements_of<'a>(
        &'a mut self,
        table: &'a mut ResourceTable,
        tx: &Resource<Transaction>,
    ) -> wasmtime::Result<Option<&'a mut Box<dyn DbTransaction>>> {
        Ok(host::target(table.get_mut(tx)?, &mut self.held))
    }

    /// The transaction [`RequestDb::hold`] opened, for the host to finish; `None` if none was.
    /// Savepoints the guest left open are part of it.
    pub fn release(&mut self) -> Option<Released> {
        self.held.take().map(|h| Released {
            tx: h.tx,
            marked: h.marked,
        })
    }
}

/// The `transaction` resource.
pub enum Transaction {
    /// On a connection of its own; `None` once committed or rolled back.
    Own(Option<Box<dyn DbTransaction>>),
    /// A savepoint of the host's held transaction; `None` once released or rolled back.
    Savepoint(Option<String>),
}

pub struct DbView<'a> {
    pub table: &'a mut ResourceTable,
    pub db: &'a mut RequestDb,
}

struct DbCap;

impl HasData for DbCap {
    type Data<'a> = DbView<'a>;
}

pub fn link(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<GuestState, DbCap>(linker, |s| DbView {
        table: &mut s.table,
        db: &mut s.caps.db,
    })
}
