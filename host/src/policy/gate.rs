//! Admission policies (rate limit, bulkhead): each only says yes or no on the request's head,
//! and what a yes holds while the request runs; answering a refusal is written here once.

use std::future::Future;
use std::sync::Arc;

use axum::response::Response;

use super::GuestRequest;
use super::layer::{Next, Policy, forward};
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

impl<G: Gate> Policy for G {
    async fn call<S: Next>(self: Arc<Self>, req: GuestRequest, mut next: S) -> Response {
        let (head, body) = req.into_parts();
        match self.admit(&head).await {
            Ok(pass) => {
                let req = GuestRequest::from_parts(head, body);
                let resp = forward(&mut next, req).await;
                G::hold(pass, resp)
            }
            Err(problem) => problem.into_response_with(&RequestId::of(&head.extensions)),
        }
    }
}
