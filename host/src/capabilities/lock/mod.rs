//! `wasmgate:platform/lock`: named locks with a lease TTL and fencing tokens, in-process or on
//! Redis.
//!
//! Names are namespaced per function. A lease is a guest resource: dropping it releases the lock,
//! and if the guest traps the lock still ends at its TTL, so no guest can hold a lock forever.

mod backend;
#[cfg(test)]
mod conformance;
mod host;

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{HasData, Linker, ResourceTable};

use super::bindings::wasmgate::platform::lock as wit;
use super::breaker::Breaker;
use crate::runtime::GuestState;

pub use backend::{LockBackend, MemoryLocks, RedisLocks};
pub use wit::Error as LockError;

/// Longest lease and longest wait a guest may ask for: a lock is for a request, not a session.
pub const MAX_DURATION: Duration = Duration::from_secs(300);
/// Leases one request may hold at once; beyond this the guest gets `invalid`.
pub const MAX_LEASES_PER_REQUEST: usize = 16;
/// Longest lock name, in bytes.
pub const MAX_NAME_LEN: usize = 256;

#[derive(Clone)]
pub struct Lock {
    backend: Arc<dyn LockBackend>,
    breaker: Arc<Breaker>,
}

impl Lock {
    /// On Redis when given a connection, in-process otherwise.
    pub fn new(redis: Option<redis::aio::ConnectionManager>) -> Self {
        let backend: Arc<dyn LockBackend> = match redis {
            Some(conn) => Arc::new(RedisLocks::new(conn)),
            None => Arc::new(MemoryLocks::default()),
        };
        Self {
            backend,
            breaker: Arc::new(Breaker::new("lock")),
        }
    }

    /// Its circuit breaker's state, for `/readyz`.
    pub fn breaker(&self) -> &'static str {
        self.breaker.state()
    }

    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// The backend itself, for the host's own leases (rollout drivers), under names no function
    /// can reach (function names do not start with `_`).
    pub fn backend(&self) -> &Arc<dyn LockBackend> {
        &self.backend
    }

    pub async fn ready(&self) -> bool {
        super::answers(self.backend.ping()).await
    }

    pub fn configure(&self, function: &str) -> FunctionLock {
        FunctionLock {
            backend: self.backend.clone(),
            breaker: self.breaker.clone(),
            prefix: Arc::from(format!("{function}:")),
        }
    }
}

#[derive(Clone)]
pub struct FunctionLock {
    backend: Arc<dyn LockBackend>,
    breaker: Arc<Breaker>,
    prefix: Arc<str>,
}

impl FunctionLock {
    pub fn instance(&self) -> RequestLock {
        RequestLock {
            function: self.clone(),
            held: 0,
        }
    }

    /// Locks of the request's own, in-process: a shadow run never holds a lock a live request
    /// could wait on.
    pub fn private(&self) -> RequestLock {
        RequestLock {
            function: FunctionLock {
                backend: Arc::new(MemoryLocks::default()),
                breaker: Arc::new(Breaker::new("lock")),
                prefix: self.prefix.clone(),
            },
            held: 0,
        }
    }
}

/// A request's handle on its function's locks.
pub struct RequestLock {
    function: FunctionLock,
    /// Leases currently open in this request.
    held: usize,
}

/// The `lease` resource: a held lock.
pub struct Lease {
    /// Full (namespaced) name.
    name: String,
    token: u64,
    backend: Arc<dyn LockBackend>,
    breaker: Arc<Breaker>,
    released: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // Dropped while held (the guest dropped the handle, or the request ended): release in
        // the background. If that fails the TTL still ends the lease.
        let backend = self.backend.clone();
        let (name, token) = (std::mem::take(&mut self.name), self.token);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = tokio::time::timeout(super::BACKEND_TIMEOUT, backend.release(&name, token))
                    .await;
            });
        }
    }
}

/// What the generated bindings see: the request's lock state and the store's resource table.
pub struct LockView<'a> {
    pub table: &'a mut ResourceTable,
    pub lock: &'a mut RequestLock,
}

struct LockCap;

impl HasData for LockCap {
    type Data<'a> = LockView<'a>;
}

pub fn link(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<GuestState, LockCap>(linker, |s| LockView {
        table: &mut s.table,
        lock: &mut s.caps.lock,
    })
}
