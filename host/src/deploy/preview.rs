//! Preview requests: `x-wasmgate-preview: <label>` pins a request to any deployed version of
//! the route's function (one at 0% too), honoured only with a preview token the admin API
//! issued for that function (`x-wasmgate-preview-token`), so the public cannot pick versions.
//! Tokens are checked in the registry (their hash) and the answer kept briefly per process.

use std::time::Duration;

use http::HeaderName;

use crate::registry::Registry;
use crate::response_cache::unix_ms;

pub const PREVIEW_HEADER: HeaderName = HeaderName::from_static("x-wasmgate-preview");
pub const PREVIEW_TOKEN_HEADER: HeaderName = HeaderName::from_static("x-wasmgate-preview-token");
/// How long a preview token lives.
pub const PREVIEW_TTL: Duration = Duration::from_secs(3600);
/// How long a process trusts what it read about a token.
const KEEP: Duration = Duration::from_secs(10);

pub struct Previews {
    registry: Registry,
    known: moka::future::Cache<String, Option<(String, i64)>>,
}

impl Previews {
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            known: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(KEEP)
                .build(),
        }
    }

    /// Whether `token` is a live preview token for `function`.
    pub async fn allows(&self, token: &str, function: &str) -> bool {
        if token.is_empty() || token.len() > 128 {
            return false;
        }
        let found = match self.known.get(token).await {
            Some(found) => found,
            None => {
                let found = match self.registry.preview_token(token).await {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot check a preview token");
                        return false;
                    }
                };
                self.known.insert(token.to_string(), found.clone()).await;
                found
            }
        };
        found.is_some_and(|(f, expires)| {
            f == function && expires > i64::try_from(unix_ms()).unwrap_or(i64::MAX)
        })
    }
}
