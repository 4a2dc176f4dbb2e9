//! Cache backends: in-process (moka) and Redis. Both speak full keys (already namespaced) and
//! store increments as decimal text, so `get` reads a counter the same way on either.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use super::CacheError;
use crate::capabilities::config::ConnectError;

/// In-process cache size: bounded so a guest storing many values evicts old ones instead of
/// growing the host. 64 MiB is ample for sessions and counters on one machine.
pub const DEFAULT_MEMORY_CAPACITY: u64 = 64 * 1024 * 1024;

#[async_trait]
pub trait CacheBackend: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError>;
    async fn set(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>)
    -> Result<(), CacheError>;
    async fn delete(&self, key: &str) -> Result<bool, CacheError>;
    async fn increment(&self, key: &str, delta: i64) -> Result<i64, CacheError>;
    async fn ping(&self) -> Result<(), CacheError>;
}

fn not_an_integer() -> CacheError {
    CacheError::Invalid("the stored value is not an integer".into())
}

// ---- in-process ----

#[derive(Clone)]
pub(super) struct Entry {
    value: std::sync::Arc<[u8]>,
    /// Absolute, so an increment keeps the deadline the value was set with (as Redis does).
    expires_at: Option<Instant>,
}

struct EntryExpiry;

impl moka::Expiry<String, Entry> for EntryExpiry {
    fn expire_after_create(&self, _k: &String, e: &Entry, now: Instant) -> Option<Duration> {
        e.expires_at.map(|t| t.saturating_duration_since(now))
    }
    fn expire_after_update(
        &self,
        _k: &String,
        e: &Entry,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        e.expires_at.map(|t| t.saturating_duration_since(now))
    }
}

pub struct MemoryCache {
    pub(super) cache: moka::future::Cache<String, Entry>,
}

impl MemoryCache {
    pub fn new(capacity_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|k: &String, e: &Entry| {
                u32::try_from(k.len() + e.value.len()).unwrap_or(u32::MAX)
            })
            .expire_after(EntryExpiry)
            .build();
        Self { cache }
    }
}

#[async_trait]
impl CacheBackend for MemoryCache {
    fn kind(&self) -> &'static str {
        "in-process"
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        Ok(self.cache.get(key).await.map(|e| e.value.to_vec()))
    }

    async fn set(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        let entry = Entry {
            value: value.into(),
            expires_at: ttl.map(|t| Instant::now() + t),
        };
        self.cache.insert(key.to_string(), entry).await;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        Ok(self.cache.remove(key).await.is_some())
    }

    async fn increment(&self, key: &str, delta: i64) -> Result<i64, CacheError> {
        use moka::ops::compute::Op;
        let mut outcome: Result<i64, CacheError> = Err(not_an_integer());
        // `and_compute_with` runs the closure under the entry's lock: concurrent increments of
        // one key never lose an update.
        self.cache
            .entry(key.to_string())
            .and_compute_with(|current| {
                let (old, expires_at) = match &current {
                    Some(e) => {
                        let parsed = std::str::from_utf8(&e.value().value)
                            .ok()
                            .and_then(|s| s.parse::<i64>().ok());
                        (parsed, e.value().expires_at)
                    }
                    None => (Some(0), None),
                };
                let next = old.and_then(|n| n.checked_add(delta));
                outcome = next.ok_or_else(not_an_integer);
                std::future::ready(match next {
                    Some(n) => Op::Put(Entry {
                        value: n.to_string().into_bytes().into(),
                        expires_at,
                    }),
                    None => Op::Nop,
                })
            })
            .await;
        outcome
    }

    async fn ping(&self) -> Result<(), CacheError> {
        Ok(())
    }
}

// ---- Redis ----

/// Every wasmgate key in Redis starts with this, so the platform can share a Redis.
const REDIS_PREFIX: &str = "wasmgate:cache:";

pub struct RedisCache {
    conn: ConnectionManager,
}

/// A client for `url`, for connections a manager cannot multiplex (pub/sub).
///
/// `rediss://` is Redis over TLS, verified against the system's roots, or against the CA named
/// by `sslrootcert=<PEM file>` in the query (the parameter PostgreSQL URLs use for the same).
pub fn redis_client(url: &str) -> Result<redis::Client, ConnectError> {
    let bad = |reason: String| ConnectError::RedisUrl {
        url: crate::capabilities::config::redact(url),
        reason,
    };
    let Some((plain, ca)) = split_root_cert(url) else {
        return redis::Client::open(url).map_err(|e| bad(e.to_string()));
    };
    if !plain.starts_with("rediss://") {
        return Err(bad("sslrootcert needs TLS: use rediss://".into()));
    }
    let root_cert = std::fs::read(&ca).map_err(|e| bad(format!("sslrootcert {ca}: {e}")))?;
    // redis-rs uses the process's rustls provider; ring, as everything else here.
    let _ = rustls::crypto::ring::default_provider().install_default();
    redis::Client::build_with_tls(
        plain.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        },
    )
    .map_err(|e| bad(e.to_string()))
}

/// `url` without its `sslrootcert` query parameter, and that parameter's value; `None` when the
/// URL has none.
fn split_root_cert(url: &str) -> Option<(String, String)> {
    let (base, query) = url.split_once('?')?;
    let (mut ca, mut rest) = (None, Vec::new());
    for pair in query.split('&') {
        match pair.strip_prefix("sslrootcert=") {
            Some(path) => ca = Some(path.to_string()),
            None => rest.push(pair),
        }
    }
    let plain = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Some((plain, ca?))
}

/// A ConnectionManager that fails fast while Redis is down and reconnects on its own when it
/// returns.
pub fn redis_manager(url: &str) -> Result<ConnectionManager, ConnectError> {
    let bad = |e: redis::RedisError| ConnectError::RedisUrl {
        url: crate::capabilities::config::redact(url),
        reason: e.to_string(),
    };
    let client = redis_client(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(100));
    ConnectionManager::new_lazy_with_config(client, config).map_err(bad)
}

/// Maps a Redis failure to the guest's error, logging the detail once here.
pub fn redis_error(op: &str, e: &redis::RedisError) -> CacheError {
    if e.is_timeout() {
        tracing::warn!(op, error = %e, "redis timed out");
        CacheError::Timeout
    } else {
        tracing::warn!(op, error = %e, "redis unavailable");
        CacheError::Unavailable
    }
}

impl RedisCache {
    pub fn new(conn: ConnectionManager) -> Self {
        Self { conn }
    }

    pub fn connect(url: &str) -> Result<Self, ConnectError> {
        Ok(Self::new(redis_manager(url)?))
    }
}

#[async_trait]
impl CacheBackend for RedisCache {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let mut c = self.conn.clone();
        c.get(format!("{REDIS_PREFIX}{key}"))
            .await
            .map_err(|e| redis_error("get", &e))
    }

    async fn set(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        let mut c = self.conn.clone();
        let key = format!("{REDIS_PREFIX}{key}");
        let r: redis::RedisResult<()> = match ttl {
            Some(ttl) => {
                let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
                c.pset_ex(key, value, ms).await
            }
            None => c.set(key, value).await,
        };
        r.map_err(|e| redis_error("set", &e))
    }

    async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        let mut c = self.conn.clone();
        let n: u64 = c
            .del(format!("{REDIS_PREFIX}{key}"))
            .await
            .map_err(|e| redis_error("delete", &e))?;
        Ok(n > 0)
    }

    async fn increment(&self, key: &str, delta: i64) -> Result<i64, CacheError> {
        let mut c = self.conn.clone();
        c.incr(format!("{REDIS_PREFIX}{key}"), delta)
            .await
            .map_err(|e| match e.kind() {
                // INCRBY on a non-integer (or an overflow) is the guest's doing, not an outage.
                redis::ErrorKind::Server(_) => not_an_integer(),
                _ => redis_error("increment", &e),
            })
    }

    async fn ping(&self) -> Result<(), CacheError> {
        let mut c = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map(drop)
            .map_err(|e| redis_error("ping", &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_cert_is_taken_out_of_the_url_and_needs_tls() {
        assert_eq!(split_root_cert("rediss://h:1"), None);
        assert_eq!(split_root_cert("rediss://h:1/?protocol=resp3"), None);
        assert_eq!(
            split_root_cert("rediss://h:1/?sslrootcert=/ca.pem"),
            Some(("rediss://h:1/".into(), "/ca.pem".into()))
        );
        assert_eq!(
            split_root_cert("rediss://h:1/0?protocol=resp3&sslrootcert=/ca.pem"),
            Some(("rediss://h:1/0?protocol=resp3".into(), "/ca.pem".into()))
        );
        let plain = redis_client("redis://h:1/?sslrootcert=/ca.pem").expect_err("refused");
        assert!(plain.to_string().contains("use rediss://"), "{plain}");
        let missing = redis_client("rediss://h:1/?sslrootcert=/nowhere.pem").expect_err("refused");
        assert!(missing.to_string().contains("/nowhere.pem"), "{missing}");
    }
}
