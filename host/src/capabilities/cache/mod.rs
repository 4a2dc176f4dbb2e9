//! `wasmgate:platform/cache`: a key-value cache, in-process (moka) or on Redis.
//!
//! Keys are namespaced per function (`<function>:<key>`), so a function cannot see another's.

mod backend;
#[cfg(test)]
pub(crate) mod conformance;
mod host;

use std::sync::Arc;

use wasmtime::component::{HasData, Linker};

use super::bindings::wasmgate::platform::cache as wit;
use super::breaker::Breaker;
use crate::runtime::GuestState;

pub use backend::{CacheBackend, MemoryCache, RedisCache, redis_client, redis_manager};
pub use wit::Error as CacheError;

/// Largest key a guest may use, in bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Largest value a guest may store: the cache holds small things, not blobs.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;

/// The process-wide cache backend.
#[derive(Clone)]
pub struct Cache {
    backend: Arc<dyn CacheBackend>,
    breaker: Arc<Breaker>,
}

impl Cache {
    /// On Redis when given a connection, in-process otherwise.
    pub fn new(redis: Option<redis::aio::ConnectionManager>) -> Self {
        let backend: Arc<dyn CacheBackend> = match redis {
            Some(conn) => Arc::new(RedisCache::new(conn)),
            None => Arc::new(MemoryCache::new(backend::DEFAULT_MEMORY_CAPACITY)),
        };
        Self {
            backend,
            breaker: Arc::new(Breaker::new("cache")),
        }
    }

    pub fn kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// Its circuit breaker's state, for `/readyz`.
    pub fn breaker(&self) -> &'static str {
        self.breaker.state()
    }

    pub async fn ready(&self) -> bool {
        super::answers(self.backend.ping()).await
    }

    pub fn configure(&self, function: &str) -> FunctionCache {
        FunctionCache {
            backend: self.backend.clone(),
            breaker: self.breaker.clone(),
            prefix: Arc::from(format!("{function}:")),
        }
    }
}

/// One function's view of the cache: the backend plus its key prefix.
#[derive(Clone)]
pub struct FunctionCache {
    backend: Arc<dyn CacheBackend>,
    breaker: Arc<Breaker>,
    prefix: Arc<str>,
}

/// What a shadow run's cache holds at most: it starts empty and lives as long as the run.
const SHADOW_CAPACITY: u64 = 4 * 1024 * 1024;

impl FunctionCache {
    pub fn instance(&self) -> RequestCache {
        RequestCache(self.clone())
    }

    /// A cache of the request's own, empty and in-process: what a shadow run writes is seen by
    /// that run alone and dropped with it.
    pub fn private(&self) -> RequestCache {
        RequestCache(FunctionCache {
            backend: Arc::new(MemoryCache::new(SHADOW_CAPACITY)),
            breaker: Arc::new(Breaker::new("cache")),
            prefix: self.prefix.clone(),
        })
    }
}

/// A request's handle on its function's cache.
pub struct RequestCache(FunctionCache);

struct CacheCap;

impl HasData for CacheCap {
    type Data<'a> = &'a mut RequestCache;
}

pub fn link(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<GuestState, CacheCap>(linker, |s| &mut s.caps.cache)
}
