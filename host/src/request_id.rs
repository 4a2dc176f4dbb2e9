//! The id that ties a response to its log lines.
//!
//! Minted by the host for every request (a client-supplied id is not trusted: it could collide or
//! be used to forge log lines), returned in `x-request-id` and in every problem body.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Held as the header value it is sent as: stamping a response (often more than once on the
/// way out) shares its bytes instead of copying and checking them again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// A UUID v4 in simple form, from a thread-local generator (`uuid`'s `fast-rng`), not a
    /// `getrandom` system call per request: the id must be unique, not secret.
    pub fn new() -> Self {
        let mut buf = [0u8; uuid::fmt::Simple::LENGTH];
        let text = uuid::Uuid::new_v4().simple().encode_lower(&mut buf);
        Self(HeaderValue::from_str(text).expect("hex digits are a header value"))
    }

    /// The id the server put in a request's extensions (a fresh one if none, which only a
    /// test's hand-made request lacks).
    pub fn of(extensions: &http::Extensions) -> Self {
        extensions.get::<Self>().cloned().unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("made of hex digits")
    }

    pub fn stamp(&self, headers: &mut HeaderMap) {
        headers.insert(HEADER, self.0.clone());
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
