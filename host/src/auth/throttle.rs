//! Failed-login counters with exponential backoff: in-process (moka), or on Redis so every
//! replica counts the same failures. A key is an account or a client address; its failures are
//! forgotten `window` after the last one, and a success resets an account.
//!
//! After `free` failures each further one blocks the key for `base * 2^(n - free - 1)`, at most
//! `max`: guessing slows to a crawl, yet nobody is locked out for longer than `max`.

use std::time::Duration;

use async_trait::async_trait;

use crate::response_cache::unix_ms;

/// The backoff rule of one route.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    pub free: u32,
    pub base: Duration,
    pub max: Duration,
    pub window: Duration,
}

impl Rule {
    /// How long the key is blocked after its `n`th failure in a row.
    pub fn delay(&self, n: u32) -> Duration {
        if n <= self.free {
            return Duration::ZERO;
        }
        let doublings = (n - self.free - 1).min(40);
        self.base
            .checked_mul(1u32 << doublings.min(31))
            .unwrap_or(self.max)
            .min(self.max)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the throttle store is unreachable: {0}")]
pub struct Unreachable(pub String);

#[async_trait]
pub trait ThrottleBackend: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    /// How long `key` is still blocked (zero when it is not).
    async fn blocked_for(&self, key: &str) -> Result<Duration, Unreachable>;
    /// Counts a failure; returns how long the key is now blocked.
    async fn fail(&self, key: &str, rule: &Rule) -> Result<Duration, Unreachable>;
    async fn reset(&self, key: &str) -> Result<(), Unreachable>;
}

/// In-process counters: failures, when the block ends and when the failures are forgotten
/// (ms). One per function, kept across reloads, so its routes count together.
pub struct MemoryThrottle {
    entries: moka::sync::Cache<String, (u32, u64, u64)>,
}

/// Keys tracked in process; an attacker cycling through keys evicts the least recently used.
const MAX_KEYS: u64 = 200_000;

impl MemoryThrottle {
    pub fn new() -> Self {
        Self {
            entries: moka::sync::Cache::builder().max_capacity(MAX_KEYS).build(),
        }
    }
}

impl Default for MemoryThrottle {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl ThrottleBackend for MemoryThrottle {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn blocked_for(&self, key: &str) -> Result<Duration, Unreachable> {
        Ok(self
            .entries
            .get(key)
            .map_or(Duration::ZERO, |(_, until, _)| {
                Duration::from_millis(until.saturating_sub(unix_ms()))
            }))
    }

    async fn fail(&self, key: &str, rule: &Rule) -> Result<Duration, Unreachable> {
        let entry = self.entries.entry(key.to_string()).and_upsert_with(|e| {
            let now = unix_ms();
            let n = e
                .map(|e| *e.value())
                .filter(|(_, _, forget)| *forget > now)
                .map_or(0, |(n, _, _)| n)
                + 1;
            let delay = ms(rule.delay(n));
            (n, now + delay, now + delay.max(ms(rule.window)))
        });
        Ok(Duration::from_millis(
            entry.value().1.saturating_sub(unix_ms()),
        ))
    }

    async fn reset(&self, key: &str) -> Result<(), Unreachable> {
        self.entries.invalidate(key);
        Ok(())
    }
}

/// One failure, on the Redis clock. KEYS[1]: the counter. ARGV: free, base ms, max ms,
/// window ms. Returns the block in ms.
const FAIL: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
local free = tonumber(ARGV[1])
local delay = 0
if n > free then
  delay = math.min(tonumber(ARGV[2]) * 2 ^ math.min(n - free - 1, 40), tonumber(ARGV[3]))
  redis.call('HSET', KEYS[1], 'until', now + delay)
end
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[4]), delay))
return delay
";

/// KEYS[1]: the counter. Returns the ms left of its block.
const BLOCKED: &str = r"
local u = redis.call('HGET', KEYS[1], 'until')
if not u then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return math.max(0, tonumber(u) - now)
";

const PREFIX: &str = "wasmgate:lt:";

pub struct RedisThrottle {
    conn: redis::aio::ConnectionManager,
    fail: redis::Script,
    blocked: redis::Script,
}

impl RedisThrottle {
    pub fn new(conn: redis::aio::ConnectionManager) -> Self {
        Self {
            conn,
            fail: redis::Script::new(FAIL),
            blocked: redis::Script::new(BLOCKED),
        }
    }
}

/// A Redis call bounded like every other backend call.
async fn bounded<T>(call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, Unreachable> {
    match tokio::time::timeout(crate::capabilities::BACKEND_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Unreachable(e.to_string())),
        Err(_) => Err(Unreachable("timed out".into())),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl ThrottleBackend for RedisThrottle {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn blocked_for(&self, key: &str) -> Result<Duration, Unreachable> {
        let mut conn = self.conn.clone();
        let left: u64 = bounded(
            self.blocked
                .key(format!("{PREFIX}{key}"))
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(Duration::from_millis(left))
    }

    async fn fail(&self, key: &str, rule: &Rule) -> Result<Duration, Unreachable> {
        let mut conn = self.conn.clone();
        let mut inv = self.fail.key(format!("{PREFIX}{key}"));
        inv.arg(rule.free)
            .arg(ms(rule.base))
            .arg(ms(rule.max))
            .arg(ms(rule.window));
        let delay: u64 = bounded(inv.invoke_async(&mut conn)).await?;
        Ok(Duration::from_millis(delay))
    }

    async fn reset(&self, key: &str) -> Result<(), Unreachable> {
        let mut conn = self.conn.clone();
        bounded(
            redis::cmd("DEL")
                .arg(format!("{PREFIX}{key}"))
                .query_async::<()>(&mut conn),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> Rule {
        Rule {
            free: 2,
            base: Duration::from_millis(200),
            max: Duration::from_millis(700),
            window: Duration::from_secs(5),
        }
    }

    #[test]
    fn backoff_doubles_from_base_up_to_max() {
        let r = rule();
        let delays: Vec<u128> = (1..=6).map(|n| r.delay(n).as_millis()).collect();
        assert_eq!(delays, [0, 0, 200, 400, 700, 700]);
    }

    /// Every backend: free attempts, blocks that double and end, separate keys, reset.
    async fn conformance(b: &dyn ThrottleBackend) {
        let key = format!("t-{}", uuid::Uuid::new_v4().simple());
        let other = format!("{key}-other");
        let r = rule();
        assert_eq!(b.fail(&key, &r).await.expect("fail"), Duration::ZERO);
        assert_eq!(b.fail(&key, &r).await.expect("fail"), Duration::ZERO);
        assert_eq!(b.blocked_for(&key).await.expect("check"), Duration::ZERO);
        let d = b.fail(&key, &r).await.expect("fail");
        assert!(
            d > Duration::from_millis(150) && d <= Duration::from_millis(200),
            "{d:?}"
        );
        let left = b.blocked_for(&key).await.expect("check");
        assert!(
            left > Duration::ZERO && left <= Duration::from_millis(200),
            "{left:?}"
        );
        assert_eq!(
            b.blocked_for(&other).await.expect("check"),
            Duration::ZERO,
            "keys are separate"
        );
        let d = b.fail(&key, &r).await.expect("fail");
        assert!(
            d > Duration::from_millis(350) && d <= Duration::from_millis(400),
            "doubled: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(
            b.blocked_for(&key).await.expect("check"),
            Duration::ZERO,
            "a block ends"
        );
        b.reset(&key).await.expect("reset");
        assert_eq!(
            b.fail(&key, &r).await.expect("fail"),
            Duration::ZERO,
            "reset forgets the failures"
        );
    }

    #[tokio::test]
    async fn memory_backend_conforms() {
        conformance(&MemoryThrottle::new()).await;
    }

    #[tokio::test]
    async fn redis_backend_conforms() {
        let url = crate::capabilities::cache::conformance::redis_url();
        let conn = crate::capabilities::cache::redis_manager(&url).expect("redis url");
        conformance(&RedisThrottle::new(conn)).await;
    }

    #[tokio::test]
    async fn redis_failures_are_shared_between_processes() {
        let url = crate::capabilities::cache::conformance::redis_url();
        let a = RedisThrottle::new(crate::capabilities::cache::redis_manager(&url).expect("url"));
        let b = RedisThrottle::new(crate::capabilities::cache::redis_manager(&url).expect("url"));
        let key = format!("t-{}", uuid::Uuid::new_v4().simple());
        let r = rule();
        a.fail(&key, &r).await.expect("fail");
        b.fail(&key, &r).await.expect("fail");
        assert!(
            a.fail(&key, &r).await.expect("fail") > Duration::ZERO,
            "the third failure, counted across both"
        );
        assert!(b.blocked_for(&key).await.expect("check") > Duration::ZERO);
    }
}
