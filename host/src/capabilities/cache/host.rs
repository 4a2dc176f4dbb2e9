//! The guest-facing `cache` calls: argument checks, namespacing, a bound on every backend call.

use std::time::Duration;

use super::{CacheError, MAX_KEY_LEN, MAX_VALUE_LEN, RequestCache, wit};
use crate::capabilities::breaker::Breaker;

type Answer<T> = wasmtime::Result<Result<T, CacheError>>;

impl RequestCache {
    fn key(&self, key: &str) -> Result<String, CacheError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(CacheError::Invalid(format!(
                "keys must be 1 to {MAX_KEY_LEN} bytes"
            )));
        }
        Ok(format!("{}{key}", self.0.prefix))
    }
}

/// A backend call, bounded in time and through the breaker: a cache that is down fails calls at
/// once instead of each waiting out the timeout.
async fn bounded<T>(
    breaker: &Breaker,
    fut: impl Future<Output = Result<T, CacheError>>,
) -> Result<T, CacheError> {
    breaker
        .call_within(
            fut,
            || CacheError::Timeout,
            |e| matches!(e, CacheError::Unavailable | CacheError::Timeout),
            || CacheError::Unavailable,
        )
        .await
}

impl wit::Host for RequestCache {
    async fn get(&mut self, key: String) -> Answer<Option<Vec<u8>>> {
        let key = match self.key(&key) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        Ok(bounded(&self.0.breaker, self.0.backend.get(&key)).await)
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Answer<()> {
        let key = match self.key(&key) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        if value.len() > MAX_VALUE_LEN {
            return Ok(Err(CacheError::Invalid(format!(
                "values must be at most {MAX_VALUE_LEN} bytes"
            ))));
        }
        if ttl_ms == Some(0) {
            return Ok(Err(CacheError::Invalid("ttl-ms must be above 0".into())));
        }
        let ttl = ttl_ms.map(Duration::from_millis);
        Ok(bounded(&self.0.breaker, self.0.backend.set(&key, value, ttl)).await)
    }

    async fn delete(&mut self, key: String) -> Answer<bool> {
        let key = match self.key(&key) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        Ok(bounded(&self.0.breaker, self.0.backend.delete(&key)).await)
    }

    async fn increment(&mut self, key: String, delta: i64) -> Answer<i64> {
        let key = match self.key(&key) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        Ok(bounded(&self.0.breaker, self.0.backend.increment(&key, delta)).await)
    }
}
