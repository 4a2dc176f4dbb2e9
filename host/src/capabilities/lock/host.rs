//! The guest-facing `lock` calls: bounded waits, lease resources, per-request limits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::Resource;

use super::{
    Lease, LockBackend, LockError, LockView, MAX_DURATION, MAX_LEASES_PER_REQUEST, MAX_NAME_LEN,
    wit,
};
use crate::capabilities::breaker::Breaker;

type Answer<T> = wasmtime::Result<Result<T, LockError>>;

/// First pause between attempts while a lock is busy; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(2);
const MAX_BACKOFF: Duration = Duration::from_millis(50);

fn duration(ms: u64, what: &str) -> Result<Duration, LockError> {
    let d = Duration::from_millis(ms);
    if ms == 0 || d > MAX_DURATION {
        return Err(LockError::Invalid(format!(
            "{what} must be between 1 ms and {} s",
            MAX_DURATION.as_secs()
        )));
    }
    Ok(d)
}

/// A backend call, bounded in time and through the breaker: with the lock backend down, calls
/// fail at once instead of each waiting out the timeout. A busy lock is a healthy answer.
async fn bounded<T>(
    breaker: &Breaker,
    fut: impl Future<Output = Result<T, LockError>>,
) -> Result<T, LockError> {
    breaker
        .call_within(
            fut,
            || LockError::Unavailable,
            |e| matches!(e, LockError::Unavailable),
            || LockError::Unavailable,
        )
        .await
}

/// Tries until the lock is taken or `wait` has passed.
async fn acquire(
    backend: &Arc<dyn LockBackend>,
    breaker: &Breaker,
    name: &str,
    ttl: Duration,
    wait: Duration,
) -> Result<u64, LockError> {
    let deadline = Instant::now() + wait;
    let mut backoff = MIN_BACKOFF;
    loop {
        if let Some(token) = bounded(breaker, backend.try_acquire(name, ttl)).await? {
            return Ok(token);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LockError::Busy);
        }
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

impl wit::Host for LockView<'_> {
    async fn acquire(
        &mut self,
        name: String,
        ttl_ms: u64,
        wait_ms: u64,
    ) -> Answer<Resource<Lease>> {
        let checked = (|| {
            if name.is_empty() || name.len() > MAX_NAME_LEN {
                return Err(LockError::Invalid(format!(
                    "lock names must be 1 to {MAX_NAME_LEN} bytes"
                )));
            }
            if self.lock.held >= MAX_LEASES_PER_REQUEST {
                return Err(LockError::Invalid(format!(
                    "a request may hold at most {MAX_LEASES_PER_REQUEST} leases"
                )));
            }
            Ok((duration(ttl_ms, "ttl-ms")?, duration(wait_ms, "wait-ms")?))
        })();
        let (ttl, wait) = match checked {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let full = format!("{}{name}", self.lock.function.prefix);
        let backend = self.lock.function.backend.clone();
        let breaker = self.lock.function.breaker.clone();
        let token = match acquire(&backend, &breaker, &full, ttl, wait).await {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        let lease = Lease {
            name: full,
            token,
            backend,
            breaker,
            released: false,
        };
        self.lock.held += 1;
        Ok(Ok(self.table.push(lease)?))
    }
}

impl wit::HostLease for LockView<'_> {
    async fn fencing_token(&mut self, lease: Resource<Lease>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&lease)?.token)
    }

    async fn renew(&mut self, lease: Resource<Lease>, ttl_ms: u64) -> Answer<()> {
        let ttl = match duration(ttl_ms, "ttl-ms") {
            Ok(d) => d,
            Err(e) => return Ok(Err(e)),
        };
        let lease = self.table.get(&lease)?;
        if lease.released {
            return Ok(Err(LockError::Lost));
        }
        Ok(bounded(
            &lease.breaker,
            lease.backend.renew(&lease.name, lease.token, ttl),
        )
        .await)
    }

    async fn release(&mut self, lease: Resource<Lease>) -> Answer<()> {
        let lease = self.table.get_mut(&lease)?;
        if lease.released {
            return Ok(Err(LockError::Lost));
        }
        let result = bounded(
            &lease.breaker,
            lease.backend.release(&lease.name, lease.token),
        )
        .await;
        // Released or lost, this lease is finished either way.
        lease.released = true;
        self.lock.held = self.lock.held.saturating_sub(1);
        Ok(result)
    }

    async fn drop(&mut self, lease: Resource<Lease>) -> wasmtime::Result<()> {
        let lease = self.table.delete(lease)?;
        if !lease.released {
            self.lock.held = self.lock.held.saturating_sub(1);
        }
        // `Lease::drop` releases it if still held.
        Ok(())
    }
}
