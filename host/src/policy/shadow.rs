//! Shadow traffic: a copy of a share of a route's requests runs on a candidate version after
//! the live response has been sent, and the two answers are compared.
//!
//! The layer sits right before the guest (after auth, limits, idempotency, the response cache
//! and the bulkhead), so only requests the live version really runs are copied, with the
//! principal the auth layer verified. A chosen request's body is read first (it is already
//! capped at the route's limit) so both runs get the same bytes; the live response streams to
//! the client through a hash, and when its last byte has gone the shadow run starts in a task
//! of its own: the client never waits for it. Its side effects are held back by the runtime
//! (`Function::shadow`); the idempotency and response-cache layers are not on its path at all.
//!
//! Shadow runs are bounded per process ([`Shadows`]): a chosen request that finds them all busy
//! is skipped and counted, never queued, so a shadow can slow the live path by its CPU share at
//! most.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as _, Frame};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, oneshot};

use super::GuestRequest;
use super::layer::{Next, Policy, forward};
use crate::body_limit::LimitedBody;
use crate::deploy::{Comparisons, Sample, Verdict};
use crate::request_id::RequestId;
use crate::runtime::{Answer, Failure, Function};

/// Shadow runs at once in one process, over every function.
pub const MAX_SHADOW_RUNS: usize = 8;

/// The process's shadow-run slots.
pub type Shadows = Arc<Semaphore>;

pub fn shadows() -> Shadows {
    Arc::new(Semaphore::new(MAX_SHADOW_RUNS))
}

pub struct ShadowPolicy {
    candidate: Function,
    percent: u32,
    comparisons: Arc<Comparisons>,
    runs: Shadows,
}

impl ShadowPolicy {
    pub fn new(
        candidate: Function,
        percent: u32,
        comparisons: Arc<Comparisons>,
        runs: Shadows,
    ) -> Self {
        Self {
            candidate,
            percent,
            comparisons,
            runs,
        }
    }

    fn chosen(&self) -> bool {
        self.percent >= 100 || crate::deploy::random_point() < f64::from(self.percent)
    }
}

impl Policy for ShadowPolicy {
    async fn call<S: Next>(self: Arc<Self>, req: GuestRequest, mut next: S) -> Response {
        if !self.chosen() {
            return forward(&mut next, req).await;
        }
        let id = RequestId::of(req.extensions());
        let (parts, body) = req.into_parts();
        let bytes = match body.read_whole().await {
            Ok(bytes) => bytes,
            Err(problem) => return problem.into_response_with(&id),
        };
        let copy = http::Request::from_parts(
            parts.clone(),
            LimitedBody::new(Body::from(bytes.clone()), u64::MAX).0,
        );
        let live =
            http::Request::from_parts(parts, LimitedBody::new(Body::from(bytes), u64::MAX).0);
        let resp = forward(&mut next, live).await;
        let live_status = resp.status();
        let (sent, hashed) = oneshot::channel();
        let resp = resp.map(|body| {
            Body::new(Hashed {
                inner: body,
                hash: Sha256::new(),
                sent: Some(sent),
            })
        });
        tokio::spawn(async move {
            let Ok(live_sha256) = hashed.await else {
                // The client did not get the whole response: nothing to compare with.
                self.comparisons.skip();
                return;
            };
            let Ok(_slot) = self.runs.clone().try_acquire_owned() else {
                self.comparisons.skip();
                return;
            };
            let answer = self.candidate.shadow(copy, &id).await;
            self.comparisons
                .record(compare(&id, live_status, live_sha256, answer));
        });
        resp
    }
}

fn compare(
    id: &RequestId,
    live_status: http::StatusCode,
    live_sha256: [u8; 32],
    shadow: Result<Answer, Failure>,
) -> Sample {
    let (verdict, shadow_status) = match shadow {
        Ok(a) if a.status != live_status => (Verdict::Status, a.status.as_u16()),
        Ok(a) if a.sha256 != live_sha256 => (Verdict::Body, a.status.as_u16()),
        Ok(a) => (Verdict::Matched, a.status.as_u16()),
        Err(f) => (
            Verdict::Failed,
            super::invoke::problem_for(f).status().as_u16(),
        ),
    };
    Sample {
        request_id: id.to_string(),
        verdict,
        live_status: live_status.as_u16(),
        shadow_status,
    }
}

/// The live response's body on its way to the client, hashed as it goes. The hash is sent once
/// the body has ended (hyper stops polling a body that says it has, so that is checked after
/// every frame and when it is dropped), and never if it failed or was dropped first.
struct Hashed {
    inner: Body,
    hash: Sha256,
    sent: Option<oneshot::Sender<[u8; 32]>>,
}

impl Hashed {
    fn finish_if_ended(&mut self) {
        if self.inner.is_end_stream()
            && let Some(sent) = self.sent.take()
        {
            let _ = sent.send(std::mem::take(&mut self.hash).finalize().into());
        }
    }
}

impl Drop for Hashed {
    fn drop(&mut self) {
        self.finish_if_ended();
    }
}

impl http_body::Body for Hashed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.hash.update(data);
                }
                this.finish_if_ended();
            }
            Poll::Ready(None) => {
                if let Some(sent) = this.sent.take() {
                    let _ = sent.send(std::mem::take(&mut this.hash).finalize().into());
                }
            }
            Poll::Ready(Some(Err(_))) => this.sent = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
