//! What a broker does for the platform. Delivery is at least once: an entry is delivered
//! again until acknowledged, to the same or another consumer of the group, so whoever consumes
//! must drop duplicates (by event id) and acknowledge only after its work committed.

use std::time::Duration;

use async_trait::async_trait;

use crate::capabilities::events::outbox::Stored;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker cannot be reached: {0}")]
    Unavailable(String),
    #[error("the broker answered something unexpected: {0}")]
    Corrupt(String),
}

/// An entry handed to a consumer: the event and the broker's id for acknowledging it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub entry: String,
    pub event: Stored,
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    fn kind(&self) -> &'static str;

    /// Appends `events` to their topics, in order.
    async fn append(&self, events: &[Stored]) -> Result<(), BrokerError>;

    /// Creates `group` on `topic` if it does not exist; a new group starts at the topic's
    /// first retained entry.
    async fn create_group(&self, topic: &str, group: &str) -> Result<(), BrokerError>;

    /// Up to `max` entries for `consumer` of `group`: with `claim_idle`, first those another
    /// consumer (or this one) received more than that long ago and has not acknowledged; then
    /// new ones. Claiming looks through the group's pending entries, so a consumer does it
    /// now and then, not on every read.
    async fn read(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        max: usize,
        claim_idle: Option<Duration>,
    ) -> Result<Vec<Delivery>, BrokerError>;

    /// Renews `consumer`'s hold on `entries` (it still works on them): they do not count as
    /// idle, so no other consumer takes them over.
    async fn renew(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        entries: &[String],
    ) -> Result<(), BrokerError>;

    /// Acknowledges entries of `group`: they are not delivered to it again.
    async fn ack(&self, topic: &str, group: &str, entries: &[String]) -> Result<(), BrokerError>;
}
