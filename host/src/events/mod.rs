//! Events between functions, exactly once: what the platform does between a publisher's
//! outbox (the `events` capability) and a subscriber's handler.
//!
//! Layout:
//! - `broker`: the trait a broker implements (append, consumer groups, read with claims of
//!   entries a dead consumer left, acknowledge) and its errors.
//! - `queue`: the embedded broker, a queue in the platform database (nothing to install).
//! - `streams`: Redis Streams, a consumer group per subscription.
//! - `relay`: moves committed outbox rows to the broker, at least once (a crash between the
//!   append and the mark appends again; consumers drop duplicates by event id).
//! - `inbox`: what each subscription handled (written with the handler's effects), per-key
//!   sequences, failed tries, dead letters.
//! - `consumer`: a subscription's loop: read, admit through the inbox, run the handler in a
//!   held transaction, commit, acknowledge; retries with backoff; dead letters.
//! - `conformance` (tests): one suite, run against both brokers.

pub mod broker;
#[cfg(test)]
mod conformance;
pub mod consumer;
pub mod inbox;
pub mod queue;
pub mod relay;
pub mod streams;

pub use broker::{Broker, BrokerError, Delivery};

/// A wake-up that is never lost: a waiter busy when it was raised finds it raised when it
/// next waits (a `Notify::notify_waiters` reaches only the tasks waiting at that moment, and a
/// relay or consumer mid-pass then slept until its next poll).
pub struct Signal(std::sync::LazyLock<tokio::sync::watch::Sender<u64>>);

impl Signal {
    pub const fn new() -> Self {
        Self(std::sync::LazyLock::new(|| {
            tokio::sync::watch::channel(0).0
        }))
    }

    pub fn raise(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A waiter: `changed()` returns once the signal was raised after the last time it did.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}

impl Default for Signal {
    fn default() -> Self {
        Self::new()
    }
}

use std::sync::Arc;

use crate::capabilities::Backends;
use crate::capabilities::db::migrations::MigrationError;

/// The broker of this platform: Redis Streams when Redis is configured, the queue in the
/// platform database otherwise.
pub async fn broker(backends: &Backends) -> Result<Arc<dyn Broker>, MigrationError> {
    Ok(match &backends.redis {
        Some(conn) => Arc::new(streams::Streams::new(conn.clone())),
        None => Arc::new(queue::Queue::open(backends.db.backend().clone()).await?),
    })
}
