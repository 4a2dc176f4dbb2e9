//! `wasmgate:platform/response-cache`: lets a function purge the host's cached responses by
//! tag after a write. The cache itself (tiers, single flight) lives in `crate::response_cache`;
//! this unit is its guest-facing side: tags namespaced per function and checked.

mod host;

use wasmtime::component::{HasData, Linker};

use super::bindings::wasmgate::platform::response_cache as wit;
use crate::response_cache::{MAX_TAG_LEN, MAX_TAGS, ResponseCache};
use crate::runtime::GuestState;

pub use wit::Error as PurgeError;

/// Response header a function tags its response with; the host strips it.
pub const TAG_HEADER: &str = "wasmgate-cache-tags";

/// A function's handle: the process-wide cache and the function's tag namespace.
#[derive(Clone)]
pub struct FunctionResponseCache {
    /// `None` in a shadow run: its purges are checked, then dropped.
    cache: Option<ResponseCache>,
    function: std::sync::Arc<str>,
}

impl FunctionResponseCache {
    pub fn new(cache: ResponseCache, function: &str) -> Self {
        Self {
            cache: Some(cache),
            function: function.into(),
        }
    }

    pub fn instance(&self) -> RequestResponseCache {
        RequestResponseCache(self.clone())
    }

    /// For a shadow run: purges are answered as done and reach no cache.
    pub fn discarding(&self) -> RequestResponseCache {
        RequestResponseCache(Self {
            cache: None,
            function: self.function.clone(),
        })
    }
}

/// `tag` in the function's namespace, or why it is refused.
pub fn namespaced(function: &str, tag: &str) -> Result<String, String> {
    let tag = tag.trim();
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(format!("tags must be 1 to {MAX_TAG_LEN} bytes"));
    }
    if tag.chars().any(|c| c == ',' || c.is_control()) {
        return Err(format!(
            "tag `{}` holds a comma or a control character",
            tag.escape_debug()
        ));
    }
    Ok(format!("{function}:{tag}"))
}

/// The tags of a `wasmgate-cache-tags` header value, namespaced; invalid ones are dropped with a
/// warning, since the response itself is fine.
pub fn tags_from_header(function: &str, value: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(value);
    let mut tags = Vec::new();
    for raw in text.split(',').filter(|t| !t.trim().is_empty()) {
        match namespaced(function, raw) {
            Ok(t) if tags.len() < MAX_TAGS => tags.push(t),
            Ok(_) => {
                tracing::warn!(
                    function,
                    "more than {MAX_TAGS} cache tags; the rest are ignored"
                );
                break;
            }
            Err(e) => tracing::warn!(function, "cache tag ignored: {e}"),
        }
    }
    tags
}

/// A request's handle on its function's response cache.
pub struct RequestResponseCache(FunctionResponseCache);

struct ResponseCacheCap;

impl HasData for ResponseCacheCap {
    type Data<'a> = &'a mut RequestResponseCache;
}

pub fn link(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<GuestState, ResponseCacheCap>(linker, |s| &mut s.caps.response_cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_tags_are_namespaced_and_checked() {
        let tags = tags_from_header("users", b" user:42 , users,,bad\x01tag");
        assert_eq!(tags, vec!["users:user:42", "users:users"]);
        assert!(namespaced("users", "").is_err());
        assert!(namespaced("users", &"x".repeat(MAX_TAG_LEN + 1)).is_err());
    }
}
