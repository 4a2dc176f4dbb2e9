//! The tower plumbing every policy shares, written once. A policy is an async function of the
//! request and the rest of the stack (`next`); [`PolicyLayer`] makes it a tower middleware.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::response::Response;
use futures::future::BoxFuture;

use super::GuestRequest;

/// The rest of the stack, as a policy sees it.
pub trait Next:
    tower::Service<GuestRequest, Response = Response, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static
{
}

impl<S> Next for S where
    S: tower::Service<GuestRequest, Response = Response, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// One request through a policy: answer it, or pass it (changed or not) to `next`.
pub trait Policy: Send + Sync + 'static {
    fn call<S: Next>(
        self: Arc<Self>,
        req: GuestRequest,
        next: S,
    ) -> impl Future<Output = Response> + Send;
}

/// Passes `req` on to the rest of the stack.
pub async fn forward<S: Next>(next: &mut S, req: GuestRequest) -> Response {
    next.call(req).await.unwrap_or_else(|never| match never {})
}

pub struct PolicyLayer<P> {
    policy: Arc<P>,
}

impl<P> PolicyLayer<P> {
    pub fn new(policy: Arc<P>) -> Self {
        Self { policy }
    }
}

impl<P> Clone for PolicyLayer<P> {
    fn clone(&self) -> Self {
        Self {
            policy: self.policy.clone(),
        }
    }
}

impl<S, P> tower::Layer<S> for PolicyLayer<P> {
    type Service = PolicyService<S, P>;
    fn layer(&self, inner: S) -> Self::Service {
        PolicyService {
            inner,
            policy: self.policy.clone(),
        }
    }
}

pub struct PolicyService<S, P> {
    inner: S,
    policy: Arc<P>,
}

impl<S: Clone, P> Clone for PolicyService<S, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<S: Next, P: Policy> tower::Service<GuestRequest> for PolicyService<S, P> {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: GuestRequest) -> Self::Future {
        // The clone that was made ready is the one we call (tower's usual swap).
        let clone = self.inner.clone();
        let next = std::mem::replace(&mut self.inner, clone);
        let policy = self.policy.clone();
        Box::pin(async move { Ok(policy.call(req, next).await) })
    }
}
