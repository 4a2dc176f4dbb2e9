//! The response cache's storage: two tiers, tags, purges and single flight. What is cacheable
//! and how a key is built are HTTP questions, answered by the tower layer in
//! `policy::response_cache`; this module only keeps entries and forgets them on time.
//!
//! - L1, in every process: moka, bounded by bytes. An entry lives at most [`L1_MAX_AGE`] here
//!   even when its TTL is longer, which bounds how long a process can serve a response whose
//!   purge message it missed.
//! - L2, shared (Redis, when configured): entries with their TTL, a set of entry keys per tag,
//!   and a purge sequence. A purge deletes the tagged entries in one script and publishes the
//!   tags; every process subscribes and forgets them in its L1. See `redis.rs`.
//!
//! Purges and fills race: a fill that read the old data before a purge may finish after it.
//! Both tiers close that window with sequence numbers: L1 remembers, per tag, the local sequence
//! of its last purge, and an entry filled before it is stale; L2's store script refuses an entry
//! whose tag was purged after the fill began. Fills that take longer than [`FILL_WINDOW`] are
//! not stored, so purge records need only live that long past an entry's life.
//!
//! Concurrent misses on one key share one fill: in a process through moka's `try_get_with`, and
//! across processes through a fill claim in L2 (the others poll for its entry, for at most the
//! claim's 10 s TTL, then fill themselves). The guest runs once, and the others get its response.

#[cfg(test)]
mod conformance;
mod redis;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::snapshot::Snapshot;

pub use self::redis::RedisTier;

/// The longest an entry stays in a process's memory before it is read again from L2 (or, on
/// the embedded default, produced again by the guest).
pub const L1_MAX_AGE: Duration = Duration::from_secs(60);
/// Fills slower than this are served but not stored (see the module docs).
pub const FILL_WINDOW: Duration = Duration::from_secs(60);
/// Memory for L1 entries in one process, headers and bodies counted.
pub const L1_CAPACITY: u64 = 64 * 1024 * 1024;
/// Largest response body the cache keeps; bigger ones stream through uncached.
pub const MAX_ENTRY_BODY: usize = 1024 * 1024;
/// Limits on what a function may send as tags.
pub const MAX_TAGS: usize = 64;
pub const MAX_TAG_LEN: usize = 256;

/// One cached response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub response: Snapshot,
    /// Namespaced tags (`<function>:<tag>`).
    pub tags: Vec<String>,
    /// Unix milliseconds.
    pub stored_at: u64,
    pub expires_at: u64,
    /// The body encoded once when the entry was stored (`compression`), in the storing route's
    /// order of preference; only those smaller than the body itself.
    pub encoded: Vec<(crate::compression::Encoding, bytes::Bytes)>,
}

impl Entry {
    pub fn new(response: Snapshot, tags: Vec<String>, ttl: Duration) -> Self {
        let now = unix_ms();
        Self {
            response,
            tags,
            stored_at: now,
            expires_at: now + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX / 2),
            encoded: Vec::new(),
        }
    }

    pub fn with_encoded(
        mut self,
        encoded: Vec<(crate::compression::Encoding, bytes::Bytes)>,
    ) -> Self {
        self.encoded = encoded;
        self
    }

    /// Bytes it holds, for cache weighing.
    fn size(&self) -> usize {
        self.response.size() + self.encoded.iter().map(|(_, b)| b.len()).sum::<usize>()
    }

    fn remaining(&self) -> Duration {
        Duration::from_millis(self.expires_at.saturating_sub(unix_ms()))
    }

    /// Whole seconds since it was stored, for the `Age` header.
    pub fn age(&self) -> u64 {
        unix_ms().saturating_sub(self.stored_at) / 1000
    }
}

/// A fill whose response is not kept. `shared` is handed to the requests that waited on the
/// fill when the response may be served to anyone; otherwise each runs on its own.
#[derive(Debug)]
pub struct NotStored {
    pub shared: Option<Snapshot>,
}

/// What a lookup or fill produced.
pub enum Filled {
    /// From L1, L2 or this fill.
    Entry(Arc<Entry>, Source),
    /// The fill's response was not cacheable.
    NotStored(Arc<NotStored>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// L1.
    Memory,
    /// L2, filled by some process.
    Shared,
    /// This caller's fill.
    Fill,
    /// Another caller's fill, waited for.
    Coalesced,
}

/// A purge that reached this process but not the shared tier.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("the shared response cache is unavailable")]
    Unavailable,
    #[error("the shared response cache did not answer in time")]
    Timeout,
}

/// An entry in L1, with the local purge sequence when its fill began.
struct Held {
    entry: Arc<Entry>,
    filled: u64,
}

struct HeldExpiry;

impl moka::Expiry<String, Arc<Held>> for HeldExpiry {
    fn expire_after_create(&self, _k: &String, h: &Arc<Held>, _now: Instant) -> Option<Duration> {
        Some(h.entry.remaining().min(L1_MAX_AGE))
    }
}

/// The process-wide response cache. Cheap to clone.
#[derive(Clone)]
pub struct ResponseCache {
    inner: Arc<Inner>,
}

struct Inner {
    l1: moka::future::Cache<String, Arc<Held>>,
    /// Tag -> local sequence of its last purge; kept as long as an entry filled before it may
    /// live in L1.
    purged: moka::sync::Cache<String, u64>,
    seq: AtomicU64,
    l2: Option<RedisTier>,
    /// Whether purges from other processes are being heard right now.
    listening: std::sync::atomic::AtomicBool,
    /// Stops the purge subscription when the cache is dropped (on reload).
    subscription: OnceLock<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ResponseCache {
    /// L1 only: the embedded default.
    pub fn in_memory() -> Self {
        Self::build(None)
    }

    /// L1 plus L2 on Redis, with a subscription to purges from other processes.
    pub fn with_redis(client: ::redis::Client, conn: ::redis::aio::ConnectionManager) -> Self {
        let cache = Self::build(Some(RedisTier::new(conn)));
        let handle = tokio::spawn(redis::subscribe(client, Arc::downgrade(&cache.inner)));
        let _ = cache
            .inner
            .subscription
            .set(AbortOnDrop(handle.abort_handle()));
        cache
    }

    fn build(l2: Option<RedisTier>) -> Self {
        let l1 = moka::future::Cache::builder()
            .max_capacity(L1_CAPACITY)
            .weigher(|k: &String, h: &Arc<Held>| {
                u32::try_from(k.len() + h.entry.size()).unwrap_or(u32::MAX)
            })
            .expire_after(HeldExpiry)
            .build();
        let purged = moka::sync::Cache::builder()
            .time_to_live(L1_MAX_AGE + FILL_WINDOW)
            .build();
        Self {
            inner: Arc::new(Inner {
                l1,
                purged,
                seq: AtomicU64::new(0),
                l2,
                listening: std::sync::atomic::AtomicBool::new(false),
                subscription: OnceLock::new(),
            }),
        }
    }

    pub fn kind(&self) -> &'static str {
        if self.inner.l2.is_some() {
            "memory+redis"
        } else {
            "memory"
        }
    }

    /// A fresh entry from L1, if there is one.
    pub async fn lookup(&self, key: &str) -> Option<Arc<Entry>> {
        let held = self.inner.l1.get(key).await?;
        if self.inner.is_fresh(&held) {
            Some(held.entry.clone())
        } else {
            self.inner.l1.invalidate(key).await;
            None
        }
    }

    /// Looks `key` up in L1, then L2, then runs `fill` — once for all concurrent callers with
    /// the same key, in this process and (with L2) across processes. `fill` yields the entry to
    /// keep, or why not.
    pub async fn get_or_fill(
        &self,
        key: &str,
        fill: impl Future<Output = Result<Entry, NotStored>>,
    ) -> Filled {
        if let Some(entry) = self.lookup(key).await {
            return Filled::Entry(entry, Source::Memory);
        }
        let mut source = Source::Coalesced;
        let inner = &self.inner;
        let result = inner
            .l1
            .try_get_with_by_ref(key, async {
                let filled = inner.seq.load(Ordering::SeqCst);
                let held = |entry| Ok::<_, NotStored>(Arc::new(Held { entry: Arc::new(entry), filled }));
                let (mut shared_seq, mut leading) = (None, false);
                if let Some(l2) = &inner.l2 {
                    match l2.get(key).await {
                        Ok((Some(entry), _)) => {
                            source = Source::Shared;
                            return held(entry);
                        }
                        Ok((None, seq)) => {
                            shared_seq = Some(seq);
                            // One fill across processes: the others wait for its entry.
                            leading = l2.lead(key).await.unwrap_or(true);
                            if !leading && let Some(entry) = l2.wait_for(key).await {
                                return held(entry);
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "shared response cache unavailable; filling locally"),
                    }
                }
                let started = Instant::now();
                let outcome = fill.await;
                source = Source::Fill;
                if let (Some(l2), Some(seq), Ok(entry)) = (&inner.l2, shared_seq, &outcome)
                    && started.elapsed() <= FILL_WINDOW
                    && let Err(e) = l2.put(key, entry, seq).await
                {
                    tracing::debug!(error = %e, "shared response cache unavailable; kept in memory only");
                }
                if let (Some(l2), true) = (&inner.l2, leading) {
                    l2.unlead(key).await;
                }
                let entry = outcome?;
                if started.elapsed() > FILL_WINDOW {
                    return Err(NotStored {
                        shared: Some(entry.response),
                    });
                }
                held(entry)
            })
            .await;
        match result {
            // Another caller's fill that raced a purge: not served. Rare enough to leave the
            // key to the next request rather than filling again here.
            Ok(held) if source == Source::Coalesced && !inner.is_fresh(&held) => {
                inner.l1.invalidate(key).await;
                Filled::NotStored(Arc::new(NotStored { shared: None }))
            }
            Ok(held) => Filled::Entry(held.entry.clone(), source),
            Err(not_stored) => Filled::NotStored(not_stored),
        }
    }

    /// Forgets every entry carrying one of `tags` (already namespaced): in this process before
    /// it returns, in L2 before it returns, in other processes when the message reaches them.
    pub async fn purge(&self, tags: &[String]) -> Result<(), PurgeError> {
        metrics::counter!("wasmgate_response_cache_purges_total").increment(1);
        self.inner.forget(tags);
        match &self.inner.l2 {
            None => Ok(()),
            Some(l2) => {
                match tokio::time::timeout(crate::capabilities::BACKEND_TIMEOUT, l2.purge(tags))
                    .await
                {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "response cache purge did not reach Redis");
                        Err(PurgeError::Unavailable)
                    }
                    Err(_) => Err(PurgeError::Timeout),
                }
            }
        }
    }

    /// Whether this process hears purges from others (always false without Redis).
    pub fn is_listening(&self) -> bool {
        self.inner.listening.load(Ordering::SeqCst)
    }

    pub async fn ping(&self) -> bool {
        match &self.inner.l2 {
            None => true,
            Some(l2) => crate::capabilities::answers(l2.ping()).await,
        }
    }
}

impl Inner {
    fn is_fresh(&self, held: &Held) -> bool {
        held.entry.expires_at > unix_ms()
            && held.entry.tags.iter().all(|t| {
                self.purged
                    .get(t)
                    .is_none_or(|purged| purged <= held.filled)
            })
    }

    /// Records a purge of `tags` in this process: entries filled before now are stale.
    fn forget(&self, tags: &[String]) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        for tag in tags {
            self.purged.insert(tag.clone(), seq);
        }
    }

    /// After a gap in the purge subscription: anything held may have missed a purge.
    fn forget_all(&self) {
        self.l1.invalidate_all();
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
