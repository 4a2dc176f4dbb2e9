//! The guest-facing `purge` call: tags checked and namespaced, the shared tier bounded.

use super::{MAX_TAGS, PurgeError, RequestResponseCache, namespaced, wit};
use crate::response_cache;

impl wit::Host for RequestResponseCache {
    async fn purge(&mut self, tags: Vec<String>) -> wasmtime::Result<Result<(), PurgeError>> {
        if tags.len() > MAX_TAGS {
            return Ok(Err(PurgeError::Invalid(format!(
                "at most {MAX_TAGS} tags per purge"
            ))));
        }
        let mut full = Vec::with_capacity(tags.len());
        for t in &tags {
            match namespaced(&self.0.function, t) {
                Ok(t) => full.push(t),
                Err(e) => return Ok(Err(PurgeError::Invalid(e))),
            }
        }
        let Some(cache) = self.0.cache.as_ref().filter(|_| !full.is_empty()) else {
            return Ok(Ok(()));
        };
        Ok(cache.purge(&full).await.map_err(|e| match e {
            response_cache::PurgeError::Unavailable => PurgeError::Unavailable,
            response_cache::PurgeError::Timeout => PurgeError::Timeout,
        }))
    }
}
