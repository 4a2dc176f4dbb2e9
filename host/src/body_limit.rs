//! Request bodies capped without reading them first.
//!
//! A declared `Content-Length` over the limit is refused before the guest runs. A body without
//! one (chunked) streams to the guest through [`LimitedBody`], which fails the read that crosses
//! the limit and raises a flag, so the server answers 413 whatever the guest then does, or, when
//! the guest has already sent its response head, cuts the response (`runtime::GuestBody`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::problem::Problem;

pub struct LimitedBody {
    inner: axum::body::Body,
    remaining: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
    /// How long [`LimitedBody::read_whole`] waits; none for a body already in memory.
    read_timeout: Option<Duration>,
}

/// Tells, after the fact, whether the guest hit the limit.
#[derive(Clone, Default)]
pub struct Exceeded(Arc<AtomicBool>);

impl Exceeded {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl LimitedBody {
    /// The flag this body raises when it crosses its limit.
    pub fn exceeded(&self) -> Exceeded {
        Exceeded(self.exceeded.clone())
    }

    pub fn new(inner: axum::body::Body, limit: u64) -> (Self, Exceeded) {
        let flag = Exceeded::default();
        let body = Self {
            inner,
            remaining: limit,
            limit,
            exceeded: flag.0.clone(),
            read_timeout: None,
        };
        (body, flag)
    }

    /// Bounds [`LimitedBody::read_whole`]: a client that sends its body slowly cannot hold a
    /// request forever on a route whose policy reads the body before the guest (whose own reads
    /// are inside its deadline).
    pub fn read_within(mut self, timeout: Duration) -> Self {
        self.read_timeout = Some(timeout);
        self
    }

    /// The whole body, for a policy that needs it before the guest runs (an idempotency
    /// fingerprint, a login's account, a shadow copy), or the problem to answer instead.
    pub async fn read_whole(self) -> Result<Bytes, Problem> {
        let (limit, exceeded, timeout) = (self.limit, self.exceeded(), self.read_timeout);
        let read = http_body_util::BodyExt::collect(self);
        let read = match timeout {
            Some(after) => tokio::time::timeout(after, read)
                .await
                .map_err(|_| Problem::BodyTimeout { after })?,
            None => read.await,
        };
        read.map(http_body_util::Collected::to_bytes).map_err(|_| {
            if exceeded.get() {
                Problem::BodyTooLarge { limit }
            } else {
                Problem::BodyIncomplete
            }
        })
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > this.remaining {
                        this.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(
                            wasmtime_wasi_http::Error::HttpRequestBodySize(Some(this.limit)),
                        )));
                    }
                    this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "client request body failed");
                Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpProtocolError)))
            }
            other => other.map(|_| None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn fails_the_read_that_crosses_the_limit() {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"12345")),
            Ok(Bytes::from_static(b"6789")),
        ];
        let inner = axum::body::Body::from_stream(futures::stream::iter(chunks));
        let (mut body, exceeded) = LimitedBody::new(inner, 8);
        let first = body
            .frame()
            .await
            .expect("a frame")
            .expect("under the limit");
        assert_eq!(first.into_data().expect("data").len(), 5);
        assert!(!exceeded.get());
        let second = body.frame().await.expect("a frame");
        assert!(matches!(
            second,
            Err(wasmtime_wasi_http::Error::HttpRequestBodySize(Some(8)))
        ));
        assert!(exceeded.get());
    }

    #[tokio::test]
    async fn passes_a_body_at_the_limit() {
        let (body, exceeded) = LimitedBody::new(axum::body::Body::from("12345678"), 8);
        let all = body.collect().await.expect("within limit").to_bytes();
        assert_eq!(&all[..], b"12345678");
        assert!(!exceeded.get());
    }
}
