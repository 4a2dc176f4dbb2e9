//! The relay: moves committed outbox rows to the broker. Every process runs one; a claim (a
//! lease on the rows, in the outbox itself) keeps two relays from handing over the same rows at
//! once. Appending and marking are two steps, so a relay that dies between them leaves rows
//! that another relay claims again once the lease lapses: an event may reach the broker twice,
//! never zero times. Consumers drop the second by its id.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::broker::{Broker, BrokerError};
use crate::capabilities::db::{DbBackend, DbError};
use crate::capabilities::events::outbox;

/// Rows one pass moves at most.
pub const BATCH: u32 = 256;
/// How long a claim keeps other relays off its rows.
pub const CLAIM: Duration = Duration::from_secs(30);
/// The pause between passes that found nothing.
pub const IDLE: Duration = Duration::from_millis(50);

/// Woken when this process's relay appended events, so this process's consumers read them at
/// once (those of other processes find them at their next poll).
pub static APPENDED: super::Signal = super::Signal::new();
/// Sent rows are deleted after this long.
pub const KEEP_SENT: Duration = Duration::from_secs(3600);
/// How far back (by event id, which is time-ordered) an ordinary pass looks for unsent rows:
/// from this long before now, or before the oldest row the last pass found (so a backlog stays
/// in view while it drains). Every sent row leaves a dead index entry until vacuum, and a pass
/// from the oldest id would walk them all; a row that commits longer than this after it was
/// written, or whose claim lapsed, is found by the next whole pass.
pub const LOOK_BACK: Duration = Duration::from_secs(10);
/// How often a pass looks through the whole outbox.
pub const WHOLE_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the outbox cannot be read or marked: {0:?}")]
    Outbox(DbError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

pub struct Relay {
    db: Arc<dyn DbBackend>,
    broker: Arc<dyn Broker>,
    id: String,
    scan: std::sync::Mutex<Scan>,
}

/// Where the next pass looks from.
#[derive(Default)]
struct Scan {
    /// When the last whole pass started (`None`: the next one is).
    whole_at: Option<tokio::time::Instant>,
    /// When the oldest row the last pass found was written (by its id), if it found any.
    oldest: Option<i64>,
}

impl Scan {
    /// The id the next pass starts from (`""`: all).
    fn from(&mut self) -> String {
        if self.whole_at.is_some_and(|at| at.elapsed() < WHOLE_EVERY) {
            let now = crate::auth::now_ms();
            let look_back = i64::try_from(LOOK_BACK.as_millis()).unwrap_or(i64::MAX);
            outbox::first_id_at(self.oldest.unwrap_or(now).min(now) - look_back)
        } else {
            self.whole_at = Some(tokio::time::Instant::now());
            String::new()
        }
    }
}

impl Relay {
    pub fn new(db: Arc<dyn DbBackend>, broker: Arc<dyn Broker>) -> Self {
        Self {
            db,
            broker,
            id: uuid::Uuid::new_v4().simple().to_string(),
            scan: std::sync::Mutex::default(),
        }
    }

    /// One pass: claims, appends, marks. Returns how many events went to the broker.
    pub async fn pass(&self) -> Result<usize, RelayError> {
        let from = self.scan().from();
        let events = outbox::claim(self.db.as_ref(), &self.id, BATCH, CLAIM, &from)
            .await
            .map_err(RelayError::Outbox)?;
        self.scan().oldest = events.first().and_then(|e| outbox::written_at(&e.id));
        if events.is_empty() {
            return Ok(0);
        }
        self.broker.append(&events).await?;
        APPENDED.raise();
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        outbox::mark_sent(self.db.as_ref(), &self.id, &ids)
            .await
            .map_err(RelayError::Outbox)?;
        Ok(events.len())
    }

    fn scan(&self) -> std::sync::MutexGuard<'_, Scan> {
        self.scan
            .lock()
            .expect("the relay's scan is never poisoned")
    }

    /// Passes until `owner` is dropped: back to back while there is work, otherwise when
    /// this process publishes or every [`IDLE`]; sent rows older than [`KEEP_SENT`] are
    /// deleted once a minute.
    pub async fn run<T: Send + Sync + 'static>(self, owner: Weak<T>) {
        let mut pruned = tokio::time::Instant::now();
        let mut published = outbox::PUBLISHED.watch();
        loop {
            if owner.strong_count() == 0 {
                return;
            }
            match self.pass().await {
                Ok(0) => {
                    // A publish in this process wakes the relay at once; its transaction may
                    // still be committing, hence the short pause before the next pass.
                    tokio::select! {
                        _ = published.changed() => {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        _ = tokio::time::sleep(IDLE) => {}
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, broker = self.broker.kind(), "events not relayed; retrying");
                    tokio::time::sleep(IDLE * 10).await;
                }
            }
            if pruned.elapsed() > Duration::from_secs(60) {
                pruned = tokio::time::Instant::now();
                let before = crate::auth::now_ms()
                    - i64::try_from(KEEP_SENT.as_millis()).unwrap_or(i64::MAX);
                if let Err(e) = outbox::prune_sent(self.db.as_ref(), before).await {
                    tracing::debug!(error = ?e, "sent events not pruned");
                }
            }
        }
    }
}
