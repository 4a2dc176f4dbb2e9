//! The id that ties a response to its log lines.
//!
//! Minted by the host for every request (a client-supplied id is not trusted: it could collide or
//! be used to forge log lines), returned in `x-request-id` and in every problem body.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }

    /// The id the server put in a request's extensions (a fresh one if none, which only a
    /// test's hand-made request lacks).
    pub fn of(extensions: &http::Extensions) -> Self {
        extensions.get::<Self>().cloned().unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn stamp(&self, headers: &mut HeaderMap) {
        headers.insert(
            HEADER,
            HeaderValue::from_str(&self.0).expect("a uuid is a valid header value"),
        );
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
