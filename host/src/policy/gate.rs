//! The layer every admission policy shares: ask the policy, answer its problem at once on a
//! refusal, or call the next service. Policies only say yes or no (and what a yes holds); the
//! tower plumbing lives here once.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::response::Response;
use futures::future::BoxFuture;

use super::GuestRequest;
use crate::problem::Problem;
use crate::request_id::RequestId;

/// A policy that admits or refuses a request before it goes further.
pub trait Gate: Send + Sync + 'static {
    /// What an admitted request holds while it runs.
    type Pass: Send + 'static;

    /// Decides on the request's head (the body is not `Sync`, and no policy needs it).
    fn admit(
        &self,
        head: &http::request::Parts,
    ) -> impl Future<Output = Result<Self::Pass, Problem>> + Send;

    /// Ties the pass to the response; by default it is dropped when the response head is ready.
    fn hold(_pass: Self::Pass, resp: Response) -> Response {
        resp
    }
}

pub struct GateLayer<G> {
    gate: Arc<G>,
}

impl<G> GateLayer<G> {
    pub fn new(gate: Arc<G>) -> Self {
        Self { gate }
    }
}

impl<G> Clone for GateLayer<G> {
    fn clone(&self) -> Self {
        Self {
            gate: self.gate.clone(),
        }
    }
}

impl<S, G> tower::Layer<S> for GateLayer<G> {
    type Service = GateService<S, G>;
    fn layer(&self, inner: S) -> Self::Service {
        GateService {
            inner,
            gate: self.gate.clone(),
        }
    }
}

pub struct GateService<S, G> {
    inner: S,
    gate: Arc<G>,
}

impl<S: Clone, G> Clone for GateService<S, G> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<S, G> tower::Service<GuestRequest> for GateService<S, G>
where
    S: tower::Service<GuestRequest, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    G: Gate,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: GuestRequest) -> Self::Future {
        let gate = self.gate.clone();
        // The clone that was made ready is the one we call (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (head, body) = req.into_parts();
            match gate.admit(&head).await {
                Ok(pass) => {
                    let req = GuestRequest::from_parts(head, body);
                    Ok(G::hold(pass, inner.call(req).await?))
                }
                Err(problem) => {
                    let id = head
                        .extensions
                        .get::<RequestId>()
                        .cloned()
                        .unwrap_or_default();
                    Ok(problem.into_response_with(&id))
                }
            }
        })
    }
}
