//! The guest-facing `db` calls: a bound on every call, transactions as resources.

use wasmtime::component::Resource;

use super::{DbError, DbView, MAX_TRANSACTIONS_PER_REQUEST, Rows, Transaction, Value, wit};
use crate::capabilities::BACKEND_TIMEOUT;
use crate::capabilities::breaker::Breaker;

type Answer<T> = wasmtime::Result<Result<T, DbError>>;

/// The backend's own timeouts come first; this only guarantees a guest is never stuck longer.
const CALL_TIMEOUT: std::time::Duration = BACKEND_TIMEOUT.saturating_mul(4);

async fn bounded<T>(fut: impl Future<Output = Result<T, DbError>>) -> Result<T, DbError> {
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .unwrap_or(Err(DbError::Timeout))
}

/// A call that takes a connection from the pool: where a database that is down shows first, so
/// through the breaker (calls on a transaction's own connection are not).
async fn pooled<T>(
    breaker: &Breaker,
    fut: impl Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    breaker
        .call(
            bounded(fut),
            // A statement timeout is a slow query on a working database, not an outage.
            |e| matches!(e, DbError::Unavailable),
            || DbError::Unavailable,
        )
        .await
}

fn finished() -> DbError {
    DbError::InvalidState("the transaction was already committed or rolled back".into())
}

impl wit::Host for DbView<'_> {
    async fn query(&mut self, sql: String, params: Vec<Value>) -> Answer<Rows> {
        Ok(match &mut self.db.held {
            Some(h) => bounded(async { h.tx().await?.query(&sql, params).await }).await,
            None => pooled(&self.db.breaker, self.db.backend.query(&sql, params)).await,
        })
    }

    async fn execute(&mut self, sql: String, params: Vec<Value>) -> Answer<u64> {
        Ok(match &mut self.db.held {
            Some(h) => bounded(async { h.tx().await?.execute(&sql, params).await }).await,
            None => pooled(&self.db.breaker, self.db.backend.execute(&sql, params)).await,
        })
    }

    async fn begin(&mut self) -> Answer<Resource<Transaction>> {
        if self.db.open >= MAX_TRANSACTIONS_PER_REQUEST {
            return Ok(Err(DbError::InvalidState(format!(
                "a request may hold at most {MAX_TRANSACTIONS_PER_REQUEST} open transactions"
            ))));
        }
        let tx = match &mut self.db.held {
            Some(h) => {
                h.savepoints += 1;
                let name = format!("wasmgate_sp{}", h.savepoints);
                let savepoint = format!("SAVEPOINT {name}");
                if let Err(e) =
                    bounded(async { h.tx().await?.execute(&savepoint, vec![]).await }).await
                {
                    return Ok(Err(e));
                }
                Transaction::Savepoint(Some(name))
            }
            None => match pooled(&self.db.breaker, self.db.backend.begin()).await {
                Ok(tx) => Transaction::Own(Some(tx)),
                Err(e) => return Ok(Err(e)),
            },
        };
        self.db.open += 1;
        Ok(Ok(self.table.push(tx)?))
    }
}

/// Where a transaction resource's statements go: its own connection, or (a savepoint) the held
/// transaction; `None` once it was finished.
pub(super) fn target<'a>(
    tx: &'a mut Transaction,
    held: &'a mut Option<super::Held>,
) -> Option<&'a mut Box<dyn super::DbTransaction>> {
    match tx {
        Transaction::Own(own) => own.as_mut(),
        Transaction::Savepoint(Some(_)) => held.as_mut().map(|h| &mut h.tx),
        Transaction::Savepoint(None) => None,
    }
}

/// Ends a savepoint: kept (`RELEASE`) or undone (`ROLLBACK TO`, then `RELEASE`).
async fn end_savepoint(
    held: &mut Option<super::Held>,
    name: &str,
    keep: bool,
) -> Result<(), DbError> {
    let Some(h) = held.as_mut() else {
        return Err(finished());
    };
    if !keep {
        bounded(h.tx.execute(&format!("ROLLBACK TO SAVEPOINT {name}"), vec![])).await?;
    }
    bounded(h.tx.execute(&format!("RELEASE SAVEPOINT {name}"), vec![]))
        .await
        .map(|_| ())
}

impl DbView<'_> {
    /// Commits (`keep`) or rolls back a transaction resource, once.
    async fn finish(&mut self, tx: &Resource<Transaction>, keep: bool) -> Answer<()> {
        let done = match self.table.get_mut(tx)? {
            Transaction::Own(own) => match own.take() {
                Some(tx) if keep => bounded(tx.commit()).await,
                Some(tx) => bounded(tx.rollback()).await,
                None => return Ok(Err(finished())),
            },
            Transaction::Savepoint(sp) => match sp.take() {
                Some(name) => end_savepoint(&mut self.db.held, &name, keep).await,
                None => return Ok(Err(finished())),
            },
        };
        self.db.open = self.db.open.saturating_sub(1);
        Ok(done)
    }
}

impl wit::HostTransaction for DbView<'_> {
    async fn query(
        &mut self,
        tx: Resource<Transaction>,
        sql: String,
        params: Vec<Value>,
    ) -> Answer<Rows> {
        let tx = self.table.get_mut(&tx)?;
        let Some(tx) = target(tx, &mut self.db.held) else {
            return Ok(Err(finished()));
        };
        Ok(bounded(tx.query(&sql, params)).await)
    }

    async fn execute(
        &mut self,
        tx: Resource<Transaction>,
        sql: String,
        params: Vec<Value>,
    ) -> Answer<u64> {
        let tx = self.table.get_mut(&tx)?;
        let Some(tx) = target(tx, &mut self.db.held) else {
            return Ok(Err(finished()));
        };
        Ok(bounded(tx.execute(&sql, params)).await)
    }

    async fn commit(&mut self, tx: Resource<Transaction>) -> Answer<()> {
        self.finish(&tx, true).await
    }

    async fn rollback(&mut self, tx: Resource<Transaction>) -> Answer<()> {
        self.finish(&tx, false).await
    }

    async fn drop(&mut self, tx: Resource<Transaction>) -> wasmtime::Result<()> {
        // An open transaction dropped is rolled back: sqlx does it for one of its own; a
        // savepoint is rolled back to here.
        let open = match self.table.delete(tx)? {
            Transaction::Own(own) => own.is_some(),
            Transaction::Savepoint(Some(name)) => {
                let _ = end_savepoint(&mut self.db.held, &name, false).await;
                true
            }
            Transaction::Savepoint(None) => false,
        };
        if open {
            self.db.open = self.db.open.saturating_sub(1);
        }
        Ok(())
    }
}
