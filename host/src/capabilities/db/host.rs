//! The guest-facing `db` calls: a bound on every call, transactions as resources.

use wasmtime::component::Resource;

use super::{DbError, DbView, MAX_TRANSACTIONS_PER_REQUEST, Rows, Transaction, Value, wit};
use crate::capabilities::BACKEND_TIMEOUT;

type Answer<T> = wasmtime::Result<Result<T, DbError>>;

/// The backend's own timeouts come first; this only guarantees a guest is never stuck longer.
const CALL_TIMEOUT: std::time::Duration = BACKEND_TIMEOUT.saturating_mul(4);

async fn bounded<T>(fut: impl Future<Output = Result<T, DbError>>) -> Result<T, DbError> {
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .unwrap_or(Err(DbError::Timeout))
}

fn finished() -> DbError {
    DbError::InvalidState("the transaction was already committed or rolled back".into())
}

impl wit::Host for DbView<'_> {
    async fn query(&mut self, sql: String, params: Vec<Value>) -> Answer<Rows> {
        Ok(bounded(self.db.backend.query(&sql, params)).await)
    }

    async fn execute(&mut self, sql: String, params: Vec<Value>) -> Answer<u64> {
        Ok(bounded(self.db.backend.execute(&sql, params)).await)
    }

    async fn begin(&mut self) -> Answer<Resource<Transaction>> {
        if self.db.open >= MAX_TRANSACTIONS_PER_REQUEST {
            return Ok(Err(DbError::InvalidState(format!(
                "a request may hold at most {MAX_TRANSACTIONS_PER_REQUEST} open transactions"
            ))));
        }
        let tx = match bounded(self.db.backend.begin()).await {
            Ok(tx) => tx,
            Err(e) => return Ok(Err(e)),
        };
        self.db.open += 1;
        Ok(Ok(self.table.push(Transaction(Some(tx)))?))
    }
}

impl wit::HostTransaction for DbView<'_> {
    async fn query(
        &mut self,
        tx: Resource<Transaction>,
        sql: String,
        params: Vec<Value>,
    ) -> Answer<Rows> {
        let Some(tx) = self.table.get_mut(&tx)?.0.as_mut() else {
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
        let Some(tx) = self.table.get_mut(&tx)?.0.as_mut() else {
            return Ok(Err(finished()));
        };
        Ok(bounded(tx.execute(&sql, params)).await)
    }

    async fn commit(&mut self, tx: Resource<Transaction>) -> Answer<()> {
        let Some(tx) = self.table.get_mut(&tx)?.0.take() else {
            return Ok(Err(finished()));
        };
        self.db.open = self.db.open.saturating_sub(1);
        Ok(bounded(tx.commit()).await)
    }

    async fn rollback(&mut self, tx: Resource<Transaction>) -> Answer<()> {
        let Some(tx) = self.table.get_mut(&tx)?.0.take() else {
            return Ok(Err(finished()));
        };
        self.db.open = self.db.open.saturating_sub(1);
        Ok(bounded(tx.rollback()).await)
    }

    async fn drop(&mut self, tx: Resource<Transaction>) -> wasmtime::Result<()> {
        // Dropping an open sqlx transaction rolls it back.
        if self.table.delete(tx)?.0.is_some() {
            self.db.open = self.db.open.saturating_sub(1);
        }
        Ok(())
    }
}
