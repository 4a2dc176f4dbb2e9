//! The compression layer: a route's responses encoded for clients that accept it.
//!
//! Outside the idempotency and response-cache layers: a cache hit arrives already encoded
//! (the entry keeps its variants) and passes untouched; a replay, a miss the cache did not keep
//! and every other response are encoded here as they stream. What is encoded, and how, is
//! `crate::compression`'s.

use std::sync::Arc;

use axum::http::{Method, header};
use axum::response::Response;
use http_body::Body as _;

use super::GuestRequest;
use super::layer::{Next, Policy, forward};
use crate::compression::{
    Compression, Encoding, Verdict, accept_encoding, mark_encoded, vary_on_accept_encoding,
};
use crate::snapshot::Snapshot;

pub struct CompressionPolicy {
    compression: Arc<Compression>,
    /// Responses encoded here, per encoding (in `Encoding::ALL`'s order).
    encoded: [metrics::Counter; 3],
}

impl CompressionPolicy {
    pub fn new(function: &str, compression: Arc<Compression>) -> Self {
        let counter = |e: Encoding| metrics::counter!("wasmgate_responses_compressed_total", "function" => function.to_string(), "encoding" => e.token());
        Self {
            compression,
            encoded: Encoding::ALL.map(counter),
        }
    }
}

impl Policy for CompressionPolicy {
    async fn call<S: Next>(self: Arc<Self>, req: GuestRequest, mut next: S) -> Response {
        // A HEAD answer has no body to encode; its headers say what a GET would get only when
        // the cache served a kept variant. Negotiated only for an answer worth encoding.
        let accepts = if req.method() == Method::HEAD {
            Vec::new()
        } else {
            accept_encoding(req.headers())
        };
        let mut resp = forward(&mut next, req).await;
        let len = resp.body().size_hint().exact().or_else(|| {
            resp.headers()
                .get(header::CONTENT_LENGTH)?
                .to_str()
                .ok()?
                .parse()
                .ok()
        });
        if self.compression.verdict(resp.status(), resp.headers(), len) != Verdict::Encode {
            return resp;
        }
        vary_on_accept_encoding(resp.headers_mut());
        let Some(encoding) = self.compression.negotiate(&accepts) else {
            return resp;
        };
        if len.is_none() {
            // A streamed body of unknown length: read up to the route's minimum first, so a
            // short one still goes out as it is (a failure read here still reaches the client).
            let min = usize::try_from(self.compression.min_size()).unwrap_or(usize::MAX);
            resp = match Snapshot::capture(resp, min.saturating_sub(1)).await {
                Ok((_, whole)) => return whole,
                Err(started) => started,
            };
        }
        let (mut parts, body) = resp.into_parts();
        mark_encoded(&mut parts.headers, encoding, None);
        let i = Encoding::ALL
            .iter()
            .position(|e| *e == encoding)
            .expect("one of ALL");
        self.encoded[i].increment(1);
        Response::from_parts(parts, self.compression.encode_stream(body, encoding))
    }
}
