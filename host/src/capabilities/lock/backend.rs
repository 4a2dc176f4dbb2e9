//! Lock backends: in-process and Redis. Both take full (namespaced) names. A holder is known by
//! its fencing token, which is unique per acquisition.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::LockError;
use crate::capabilities::config::ConnectError;

#[async_trait]
pub trait LockBackend: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    /// Takes the lock if free (or expired) and returns its new fencing token; `None` if held.
    async fn try_acquire(&self, name: &str, ttl: Duration) -> Result<Option<u64>, LockError>;
    /// Extends the lease held with `token`; `Lost` if it expired or someone else holds it.
    async fn renew(&self, name: &str, token: u64, ttl: Duration) -> Result<(), LockError>;
    /// Ends the lease held with `token`; `Lost` if it is no longer held with that token.
    async fn release(&self, name: &str, token: u64) -> Result<(), LockError>;
    async fn ping(&self) -> Result<(), LockError>;
}

// ---- in-process ----

/// Locks held by this process. Tokens come from one process-wide counter, so they increase per
/// name (and across names).
#[derive(Default)]
pub struct MemoryLocks {
    held: Mutex<HashMap<String, (u64, Instant)>>,
    next_token: AtomicU64,
}

impl MemoryLocks {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, (u64, Instant)>) -> T) -> T {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut held)
    }
}

#[async_trait]
impl LockBackend for MemoryLocks {
    fn kind(&self) -> &'static str {
        "in-process"
    }

    async fn try_acquire(&self, name: &str, ttl: Duration) -> Result<Option<u64>, LockError> {
        let now = Instant::now();
        Ok(self.with(|held| {
            // Drop expired leases as we go, so the map only holds live locks.
            held.retain(|_, (_, until)| *until > now);
            if held.contains_key(name) {
                return None;
            }
            let token = self.next_token.fetch_add(1, Ordering::Relaxed) + 1;
            held.insert(name.to_string(), (token, now + ttl));
            Some(token)
        }))
    }

    async fn renew(&self, name: &str, token: u64, ttl: Duration) -> Result<(), LockError> {
        let now = Instant::now();
        self.with(|held| match held.get_mut(name) {
            Some((t, until)) if *t == token && *until > now => {
                *until = now + ttl;
                Ok(())
            }
            _ => Err(LockError::Lost),
        })
    }

    async fn release(&self, name: &str, token: u64) -> Result<(), LockError> {
        let now = Instant::now();
        self.with(|held| match held.get(name) {
            Some((t, until)) if *t == token && *until > now => {
                held.remove(name);
                Ok(())
            }
            _ => Err(LockError::Lost),
        })
    }

    async fn ping(&self) -> Result<(), LockError> {
        Ok(())
    }
}

// ---- Redis ----

const HELD_PREFIX: &str = "wasmgate:lock:";
const FENCE_PREFIX: &str = "wasmgate:fence:";

/// Takes the lock if absent: the fencing counter (which never expires) is incremented only on
/// success, and the lock's value is the token, which identifies the holder.
const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

pub struct RedisLocks {
    conn: ConnectionManager,
    acquire: redis::Script,
    renew: redis::Script,
    release: redis::Script,
}

impl RedisLocks {
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            acquire: redis::Script::new(ACQUIRE),
            renew: redis::Script::new(RENEW),
            release: redis::Script::new(RELEASE),
        }
    }

    pub fn connect(url: &str) -> Result<Self, ConnectError> {
        Ok(Self::new(crate::capabilities::cache::redis_manager(url)?))
    }
}

fn unavailable(op: &str, e: &redis::RedisError) -> LockError {
    tracing::warn!(op, error = %e, "redis unavailable for locks");
    LockError::Unavailable
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl LockBackend for RedisLocks {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn try_acquire(&self, name: &str, ttl: Duration) -> Result<Option<u64>, LockError> {
        let mut c = self.conn.clone();
        let token: u64 = self
            .acquire
            .key(format!("{HELD_PREFIX}{name}"))
            .key(format!("{FENCE_PREFIX}{name}"))
            .arg(millis(ttl))
            .invoke_async(&mut c)
            .await
            .map_err(|e| unavailable("acquire", &e))?;
        Ok((token > 0).then_some(token))
    }

    async fn renew(&self, name: &str, token: u64, ttl: Duration) -> Result<(), LockError> {
        let mut c = self.conn.clone();
        let ok: u64 = self
            .renew
            .key(format!("{HELD_PREFIX}{name}"))
            .arg(token)
            .arg(millis(ttl))
            .invoke_async(&mut c)
            .await
            .map_err(|e| unavailable("renew", &e))?;
        if ok == 1 {
            Ok(())
        } else {
            Err(LockError::Lost)
        }
    }

    async fn release(&self, name: &str, token: u64) -> Result<(), LockError> {
        let mut c = self.conn.clone();
        let ok: u64 = self
            .release
            .key(format!("{HELD_PREFIX}{name}"))
            .arg(token)
            .invoke_async(&mut c)
            .await
            .map_err(|e| unavailable("release", &e))?;
        if ok == 1 {
            Ok(())
        } else {
            Err(LockError::Lost)
        }
    }

    async fn ping(&self) -> Result<(), LockError> {
        let mut c = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map(drop)
            .map_err(|e| unavailable("ping", &e))
    }
}
