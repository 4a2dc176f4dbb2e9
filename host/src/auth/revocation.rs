//! Revoked sessions, known to every replica without a backend round trip per request.
//!
//! A logout (or a replayed refresh token) marks the session revoked in the database, adds it to
//! this process's set, and publishes it on Redis; every process adds what it hears. A process
//! also reads the sessions revoked lately from the database every [`POLL_EVERY`] (and in full
//! when it starts), which covers a dropped subscription or a deployment without Redis. An entry
//! only needs to live as long as the access tokens of its session can: access TTL plus leeway.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;

use super::store::Store;
use crate::response_cache::unix_ms;

/// Revoked session ids are published here, one per message.
pub const CHANNEL: &str = "wasmgate:auth:revoked";
/// How often each process reads recent revocations from the database.
pub const POLL_EVERY: Duration = Duration::from_millis(500);

pub struct Revocations {
    revoked: moka::sync::Cache<String, ()>,
    /// How long a revocation matters: the longest an access token lives, plus leeway.
    horizon: Duration,
}

impl Revocations {
    pub fn new(horizon: Duration) -> Self {
        Self {
            revoked: moka::sync::Cache::builder()
                .time_to_live(horizon)
                .max_capacity(1_000_000)
                .build(),
            horizon,
        }
    }

    pub fn is_revoked(&self, session: &str) -> bool {
        self.revoked.contains_key(session)
    }

    pub fn add(&self, session: &str) {
        self.revoked.insert(session.to_string(), ());
    }

    /// Reads what was revoked since `since_ms` from the database.
    pub async fn load(
        &self,
        store: &Store,
        since_ms: u64,
    ) -> Result<(), crate::capabilities::db::DbError> {
        for (id, _) in store
            .revoked_since(i64::try_from(since_ms).unwrap_or(i64::MAX))
            .await?
        {
            self.add(&id);
        }
        Ok(())
    }

    pub fn horizon(&self) -> Duration {
        self.horizon
    }
}

/// Polls the database until `revocations` is dropped. Each round reads a little further back
/// than the last one, so a revocation committed during the previous read is not missed.
pub async fn poll(store: Store, revocations: Weak<Revocations>) {
    let mut since = unix_ms();
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        let Some(r) = revocations.upgrade() else {
            return;
        };
        let started = unix_ms();
        let margin = 2 * u64::try_from(POLL_EVERY.as_millis()).unwrap_or(0);
        match r.load(&store, since.saturating_sub(margin)).await {
            Ok(()) => since = started,
            Err(e) => tracing::debug!(error = ?e, "cannot read revocations; retrying"),
        }
    }
}

/// Publishes a revocation to the other processes. Best effort: they also poll the database.
pub async fn publish(conn: &redis::aio::ConnectionManager, session: &str) {
    let sent = tokio::time::timeout(
        crate::capabilities::BACKEND_TIMEOUT,
        redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(session)
            .query_async::<i64>(&mut conn.clone()),
    )
    .await;
    if !matches!(sent, Ok(Ok(_))) {
        tracing::warn!(
            session,
            "revocation not broadcast; other processes learn it from the database within a second"
        );
    }
}

/// Listens for revocations until `revocations` is dropped, reconnecting with backoff.
pub async fn subscribe(client: redis::Client, revocations: Weak<Revocations>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Ok(mut pubsub) = client.get_async_pubsub().await
            && pubsub.subscribe(CHANNEL).await.is_ok()
        {
            backoff = Duration::from_millis(100);
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let Some(r) = revocations.upgrade() else {
                    return;
                };
                r.add(&String::from_utf8_lossy(msg.get_payload_bytes()));
            }
            tracing::warn!("revocation subscription lost; reconnecting");
        }
        if revocations.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Keeps the poller and subscriber tied to the set's lifetime.
pub fn start(store: Store, revocations: &Arc<Revocations>, redis: Option<redis::Client>) {
    tokio::spawn(poll(store, Arc::downgrade(revocations)));
    if let Some(client) = redis {
        tokio::spawn(subscribe(client, Arc::downgrade(revocations)));
    }
}
