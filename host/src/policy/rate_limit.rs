//! Rate limit: GCRA, requests per second with a burst, per function or per client key.
//!
//! Local budgets use governor. A `shared` budget lives in Redis (one GCRA step per request, in a
//! Lua script, so every wasmgate process on that Redis draws from it). When Redis cannot be
//! reached the limiter falls back to its local budget (logged once, counted in
//! `wasmgate_rate_limit_fallback_total`), or refuses with 503 when configured to fail closed.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ConnectInfo;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use http::HeaderName;

use super::gate::Gate;
use crate::config::RateLimitConfig;
use crate::problem::Problem;

/// Keyed budgets not touched for a while are dropped once there are this many, so a client
/// cycling through keys cannot grow the host's memory without bound.
const MAX_TRACKED_KEYS: usize = 100_000;
/// A Redis call for the shared budget that takes longer than this counts as unreachable.
const SHARED_TIMEOUT: Duration = Duration::from_millis(250);

/// One GCRA step. KEYS[1]: the budget; ARGV[1]: emission interval (ms); ARGV[2]: burst window
/// (ms). Returns 0 when allowed, else the milliseconds until a request would be.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + t[2] / 1000
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - window
if allow_at > now then return math.ceil(allow_at - now) end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return 0
";

/// Where a keyed budget's key comes from.
#[derive(Debug, Clone)]
enum KeySource {
    Header(HeaderName),
    ClientIp,
}

enum Local {
    Whole(DefaultDirectRateLimiter),
    Keyed(DefaultKeyedRateLimiter<String>),
}

struct Shared {
    conn: redis::aio::ConnectionManager,
    script: redis::Script,
    interval_ms: f64,
    window_ms: f64,
}

/// The verdict for one request.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Allow,
    Deny {
        retry_after: Duration,
    },
    /// Fail-closed and the shared budget cannot be reached.
    Unavailable,
}

pub struct RateLimiter {
    function: String,
    key: Option<KeySource>,
    local: Local,
    shared: Option<Shared>,
    fail_closed: bool,
    fallback_logged: AtomicBool,
}

impl RateLimiter {
    pub fn new(
        function: &str,
        cfg: &RateLimitConfig,
        redis: Option<redis::aio::ConnectionManager>,
    ) -> Self {
        let rps = NonZeroU32::new(cfg.rps).unwrap_or(NonZeroU32::MIN);
        let burst = cfg.burst.and_then(NonZeroU32::new).unwrap_or(rps);
        let quota = Quota::per_second(rps).allow_burst(burst);
        let key = cfg.key.as_deref().and_then(|k| match k {
            "client-ip" => Some(KeySource::ClientIp),
            other => other
                .strip_prefix("header:")
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .map(KeySource::Header),
        });
        let local = if key.is_some() {
            Local::Keyed(DefaultKeyedRateLimiter::keyed(quota))
        } else {
            Local::Whole(DefaultDirectRateLimiter::direct(quota))
        };
        let interval_ms = 1000.0 / f64::from(rps.get());
        let shared = redis.filter(|_| cfg.shared).map(|conn| Shared {
            conn,
            script: redis::Script::new(GCRA),
            interval_ms,
            window_ms: interval_ms * f64::from(burst.get()),
        });
        Self {
            function: function.to_string(),
            key,
            local,
            shared,
            fail_closed: cfg.fail_closed,
            fallback_logged: AtomicBool::new(false),
        }
    }

    fn key_of(&self, head: &http::request::Parts) -> Option<String> {
        Some(match self.key.as_ref()? {
            KeySource::Header(h) => head
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            KeySource::ClientIp => head
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_string())
                .unwrap_or_default(),
        })
    }

    pub async fn check(&self, key: Option<&str>) -> Verdict {
        if let Some(shared) = &self.shared {
            match self.check_shared(shared, key).await {
                Ok(v) => return v,
                Err(e) => {
                    metrics::counter!("wasmgate_rate_limit_fallback_total", "function" => self.function.clone())
                        .increment(1);
                    if !self.fallback_logged.swap(true, Ordering::Relaxed) {
                        tracing::warn!(function = %self.function, error = %e, fail_closed = self.fail_closed,
                            "shared rate limit unreachable; {}",
                            if self.fail_closed { "refusing requests" } else { "using the local budget" });
                    }
                    if self.fail_closed {
                        return Verdict::Unavailable;
                    }
                }
            }
        }
        self.check_local(key)
    }

    fn check_local(&self, key: Option<&str>) -> Verdict {
        let result = match (&self.local, key) {
            (Local::Keyed(l), Some(k)) => {
                if l.len() > MAX_TRACKED_KEYS {
                    l.retain_recent();
                }
                l.check_key(&k.to_string())
            }
            (Local::Keyed(l), None) => l.check_key(&String::new()),
            (Local::Whole(l), _) => l.check(),
        };
        match result {
            Ok(()) => Verdict::Allow,
            Err(not_until) => Verdict::Deny {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            },
        }
    }

    async fn check_shared(&self, shared: &Shared, key: Option<&str>) -> Result<Verdict, String> {
        let redis_key = format!("wasmgate:rl:{}:{}", self.function, key.unwrap_or_default());
        let mut conn = shared.conn.clone();
        let mut invocation = shared.script.key(redis_key);
        invocation.arg(shared.interval_ms).arg(shared.window_ms);
        let call = invocation.invoke_async::<u64>(&mut conn);
        let wait_ms = tokio::time::timeout(SHARED_TIMEOUT, call)
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        // Reachable again: the next outage is worth a log line too.
        self.fallback_logged.store(false, Ordering::Relaxed);
        Ok(if wait_ms == 0 {
            Verdict::Allow
        } else {
            Verdict::Deny {
                retry_after: Duration::from_millis(wait_ms),
            }
        })
    }
}

impl Gate for RateLimiter {
    type Pass = ();

    async fn admit(&self, head: &http::request::Parts) -> Result<(), Problem> {
        match self.check(self.key_of(head).as_deref()).await {
            Verdict::Allow => Ok(()),
            Verdict::Deny { retry_after } => Err(Problem::RateLimited { retry_after }),
            Verdict::Unavailable => Err(Problem::RateLimitUnavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rps: u32, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            rps,
            burst: Some(burst),
            key: None,
            shared: false,
            fail_closed: false,
        }
    }

    #[tokio::test]
    async fn allows_the_burst_then_denies_with_a_retry_after() {
        let l = RateLimiter::new("f", &cfg(10, 3), None);
        for _ in 0..3 {
            assert_eq!(l.check(None).await, Verdict::Allow);
        }
        match l.check(None).await {
            Verdict::Deny { retry_after } => {
                assert!(
                    retry_after > Duration::ZERO && retry_after <= Duration::from_millis(100),
                    "{retry_after:?}"
                );
            }
            other => panic!("expected a denial, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn keyed_budgets_are_separate() {
        let mut c = cfg(1, 1);
        c.key = Some("header:x-api-key".into());
        let l = RateLimiter::new("f", &c, None);
        assert_eq!(l.check(Some("alice")).await, Verdict::Allow);
        assert!(matches!(l.check(Some("alice")).await, Verdict::Deny { .. }));
        assert_eq!(
            l.check(Some("bob")).await,
            Verdict::Allow,
            "bob has his own budget"
        );
    }

    fn redis_manager(url: &str) -> redis::aio::ConnectionManager {
        crate::capabilities::cache::redis_manager(url).expect("redis url")
    }

    #[tokio::test]
    async fn shared_budget_is_one_budget_across_limiters() {
        let url = crate::capabilities::cache::conformance::redis_url();
        let mut c = cfg(5, 4);
        c.shared = true;
        let function = format!("shared-{}", uuid::Uuid::new_v4().simple());
        // Two limiters: as two processes would be.
        let a = RateLimiter::new(&function, &c, Some(redis_manager(&url)));
        let b = RateLimiter::new(&function, &c, Some(redis_manager(&url)));
        let mut allowed = 0;
        for i in 0..10 {
            let l = if i % 2 == 0 { &a } else { &b };
            if l.check(None).await == Verdict::Allow {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 4, "the burst is shared, not doubled");
    }

    #[tokio::test]
    async fn unreachable_redis_falls_back_or_fails_closed() {
        // Nothing listens on port 1. One request a second: the local budget cannot refill
        // between the checks below.
        let mut c = cfg(1, 2);
        c.shared = true;
        let open = RateLimiter::new("f", &c, Some(redis_manager("redis://127.0.0.1:1")));
        assert_eq!(open.check(None).await, Verdict::Allow, "local budget");
        assert_eq!(open.check(None).await, Verdict::Allow);
        assert!(
            matches!(open.check(None).await, Verdict::Deny { .. }),
            "local budget still limits"
        );
        c.fail_closed = true;
        let closed = RateLimiter::new("f", &c, Some(redis_manager("redis://127.0.0.1:1")));
        assert_eq!(closed.check(None).await, Verdict::Unavailable);
    }
}
