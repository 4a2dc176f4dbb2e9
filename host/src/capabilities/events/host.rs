//! The guest-facing `events` calls: checked, bounded in time, written through the outbox.

use wasmtime::component::Resource;

use super::{Event, EventsError, EventsView, Published, outbox, wit};
use crate::capabilities::BACKEND_TIMEOUT;
use crate::capabilities::db::{DbError, Transaction};

type Answer<T> = wasmtime::Result<Result<T, EventsError>>;

fn to_wit(e: DbError) -> EventsError {
    match e {
        DbError::Timeout => EventsError::Timeout,
        DbError::InvalidState(m) => EventsError::InvalidState(m),
        other => {
            tracing::warn!(error = ?other, "an event could not be written to the outbox");
            EventsError::Unavailable
        }
    }
}

async fn bounded(
    fut: impl Future<Output = Result<Published, DbError>>,
) -> Result<Published, EventsError> {
    match tokio::time::timeout(BACKEND_TIMEOUT.saturating_mul(2), fut).await {
        Ok(done) => done.map_err(to_wit),
        Err(_) => Err(EventsError::Timeout),
    }
}

impl EventsView<'_> {
    /// Checks `event`; in a shadow run answers without writing it.
    fn admit(&self, event: &Event) -> Result<Option<Published>, EventsError> {
        outbox::check(event).map_err(EventsError::Invalid)?;
        Ok((!self.events.0.publishes).then(|| Published {
            id: outbox::new_id(),
            sequence: 0,
        }))
    }
}

impl wit::Host for EventsView<'_> {
    async fn publish(&mut self, event: Event) -> Answer<Published> {
        match self.admit(&event) {
            Err(e) => return Ok(Err(e)),
            Ok(Some(unwritten)) => return Ok(Ok(unwritten)),
            Ok(None) => {}
        }
        let source = self.events.0.function.clone();
        let backend = self.db.backend().clone();
        if self.db.is_held() {
            return Ok(bounded(async {
                let held = self.db.held_transaction().await?;
                outbox::append(held.as_mut(), backend.kind(), &source, &event).await
            })
            .await);
        }
        Ok(bounded(outbox::publish(backend.as_ref(), &source, &event)).await)
    }

    async fn publish_in(&mut self, tx: Resource<Transaction>, event: Event) -> Answer<Published> {
        let admitted = self.admit(&event);
        let source = self.events.0.function.clone();
        let backend = self.db.backend().clone();
        let Some(target) = self.db.statements_of(self.table, &tx)? else {
            return Ok(Err(EventsError::InvalidState(
                "the transaction was already committed or rolled back".into(),
            )));
        };
        match admitted {
            Err(e) => Ok(Err(e)),
            Ok(Some(unwritten)) => Ok(Ok(unwritten)),
            Ok(None) => Ok(bounded(outbox::append(
                target.as_mut(),
                backend.kind(),
                &source,
                &event,
            ))
            .await),
        }
    }
}
