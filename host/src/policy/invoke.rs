//! The innermost service: runs the request through the function and turns a failure into its
//! problem response.

use std::convert::Infallible;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use futures::future::BoxFuture;

use super::GuestRequest;
use super::response_cache::CacheTags;
use crate::capabilities::response_cache::TAG_HEADER;
use crate::problem::Problem;
use crate::request_id::RequestId;
use crate::runtime::{Failure, Function};

#[derive(Clone)]
pub struct Invoke {
    function: Function,
}

impl Invoke {
    pub fn new(function: Function) -> Self {
        Self { function }
    }
}

impl tower::Service<GuestRequest> for Invoke {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: GuestRequest) -> Self::Future {
        let function = self.function.clone();
        Box::pin(async move {
            let id = RequestId::of(req.extensions());
            let request_body = req.body().exceeded();
            Ok(match function.handle(req, &id).await {
                Ok(resp) => {
                    let mut resp = resp.map(|body| Body::new(body.watching(request_body)));
                    id.stamp(resp.headers_mut());
                    // Tags are for the response cache, never for the client.
                    if let Some(tags) = resp.headers_mut().remove(TAG_HEADER) {
                        resp.extensions_mut().insert(CacheTags(tags));
                    }
                    resp
                }
                Err(failure) => problem_for(failure).into_response_with(&id),
            })
        })
    }
}

pub(super) fn problem_for(failure: Failure) -> Problem {
    match failure {
        Failure::Trap => Problem::GuestTrap,
        Failure::MemoryExceeded => Problem::GuestMemoryExceeded,
        Failure::Timeout => Problem::Timeout,
        Failure::NoResponse => Problem::GuestNoResponse,
        Failure::Overloaded => Problem::Overloaded,
        Failure::Internal => Problem::Internal,
    }
}
