//! Revoked sessions, known to every replica without a backend round trip per request.
//!
//! A logout (or a replayed refresh token) marks the session revoked in the database, adds it to
//! this process's set, and publishes it on Redis; every process adds what it hears. A process
//! also reads the sessions revoked lately from the database every [`POLL_EVERY`] (and in full
//! when it starts), which covers a dropped subscription or a deployment without Redis. An entry
//! only needs to live as long as the access tokens of its session can: access TTL plus leeway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

use super::store::Store;
use crate::response_cache::unix_ms;

/// Revoked session ids are published here, one per message.
pub const CHANNEL: &str = "wasmgate:auth:revoked";
/// How often each process reads recent revocations from the database.
pub const POLL_EVERY: Duration = Duration::from_millis(500);

/// Revoked sessions and until when they matter (ms). Read on every request, written on a
/// logout: a map swapped whole on each change, so a read is one atomic load and a lookup.
pub struct Revocations {
    revoked: ArcSwap<HashMap<String, u64>>,
    /// Serializes writers (each copies the map).
    writing: Mutex<()>,
    /// How long a revocation matters: the longest an access token lives, plus leeway.
    horizon: Duration,
}

impl Revocations {
    pub fn new(horizon: Duration) -> Self {
        Self {
            revoked: ArcSwap::from_pointee(HashMap::new()),
            writing: Mutex::new(()),
            horizon,
        }
    }

    pub fn is_revoked(&self, session: &str) -> bool {
        let map = self.revoked.load();
        !map.is_empty() && map.contains_key(session)
    }

    pub fn add(&self, session: &str) {
        self.add_all(std::iter::once(session.to_string()));
    }

    /// Adds sessions, dropping those whose tokens have all expired by now.
    fn add_all(&self, sessions: impl Iterator<Item = String>) {
        let _writer = self
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = unix_ms();
        let until = now + u64::try_from(self.horizon.as_millis()).unwrap_or(u64::MAX);
        let mut map: HashMap<String, u64> = self
            .revoked
            .load()
            .iter()
            .filter(|(_, t)| **t > now)
            .map(|(k, t)| (k.clone(), *t))
            .collect();
        for s in sessions {
            map.entry(s).or_insert(until);
        }
        self.revoked.store(Arc::new(map));
    }

    /// Reads what was revoked since `since_ms` from the database.
    pub async fn load(
        &self,
        store: &Store,
        since_ms: u64,
    ) -> Result<(), crate::capabilities::db::DbError> {
        let found = store
            .revoked_since(i64::try_from(since_ms).unwrap_or(i64::MAX))
            .await?;
        let known = self.revoked.load();
        if found.iter().any(|(id, _)| !known.contains_key(id)) {
            self.add_all(found.into_iter().map(|(id, _)| id));
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
    if !crate::notices::publish(conn, CHANNEL, session).await {
        tracing::warn!(
            session,
            "revocation not broadcast; other processes learn it from the database within a second"
        );
    }
}

/// Keeps the poller and subscriber tied to the set's lifetime.
pub fn start(store: Store, revocations: &Arc<Revocations>, redis: Option<redis::Client>) {
    tokio::spawn(poll(store, Arc::downgrade(revocations)));
    if let Some(client) = redis {
        tokio::spawn(crate::notices::listen(
            client,
            CHANNEL,
            Arc::downgrade(revocations),
            |r: &Revocations, session| r.add(&String::from_utf8_lossy(session)),
        ));
    }
}
