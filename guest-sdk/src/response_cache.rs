//! The host's response cache: tag what you answer, purge what you change.
//!
//! A route opts in to caching in the manifest; the host then answers repeated GETs itself.
//! Tag a response with what it shows ([`tag`]) and, after a write, purge those tags
//! ([`purge`]) so no process serves the old answer.
//!
//! ```ignore
//! let resp = tag(json(StatusCode::OK, &user), &[&format!("user:{id}")]);
//! // ... after an UPDATE:
//! response_cache::purge(&[&format!("user:{id}")])?;
//! ```

use crate::capabilities::response_cache as wit;
use crate::{HeaderValue, Problem, Response};
pub use wit::Error;

/// The response header the host reads tags from (and strips).
pub const TAG_HEADER: &str = "wasmgate-cache-tags";

/// Adds `tags` to the response's cache tags.
pub fn tag<B>(mut resp: Response<B>, tags: &[&str]) -> Response<B> {
    let mut all: Vec<String> = resp
        .headers()
        .get(TAG_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| vec![v.to_string()])
        .unwrap_or_default();
    all.extend(tags.iter().map(|t| t.to_string()));
    if let Ok(v) = HeaderValue::from_str(&all.join(", ")) {
        resp.headers_mut().insert(TAG_HEADER, v);
    }
    resp
}

/// Drops every cached response tagged with one of `tags`, in every process.
pub fn purge(tags: &[&str]) -> Result<(), Error> {
    let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    wit::purge(&tags)
}

impl From<Error> for Problem {
    fn from(e: Error) -> Self {
        match e {
            Error::Unavailable | Error::Timeout => Problem::unavailable("response cache"),
            Error::Invalid(m) => Problem::internal(format!("purge refused: {m}")),
        }
    }
}
