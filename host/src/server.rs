//! The HTTP front: axum listener, the request path, and the host's own endpoints.
//!
//! Request path today: route match -> body limit -> fresh instance -> response. Policies (rate
//! limit, bulkhead, caching, idempotency) slot in as tower layers between match and invoke.

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::body_limit::LimitedBody;
use crate::capabilities::Backends;
use crate::problem::Problem;
use crate::request_id::RequestId;
use crate::router::{Match, RouteTable, VersionSet};
use crate::runtime::Failure;

/// Header prefix the host uses to tell the guest about the matched route. Client-sent headers
/// with this prefix are removed so a guest can trust them.
pub const ROUTE_HEADER_PREFIX: &str = "wasmgate-";

/// Shared by every request; the route table is swapped whole on reload.
pub struct AppState {
    routes: ArcSwap<RouteTable<VersionSet>>,
    backends: Backends,
}

impl AppState {
    pub fn new(routes: RouteTable<VersionSet>, backends: Backends) -> Arc<Self> {
        Arc::new(Self {
            routes: ArcSwap::from_pointee(routes),
            backends,
        })
    }
}

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(dispatch)
        .with_state(state)
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Ready when every backend answers (functions are loaded before the listener opens). A
/// backend that is down is named, so an operator sees which one; `/healthz` stays 200 meanwhile
/// because the process itself is fine and restarting it would not help.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let backends = state.backends.readiness().await;
    let ready = backends.iter().all(|b| b.ready);
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "unavailable" },
        "backends": backends
            .iter()
            .map(|b| (b.name.to_string(), serde_json::json!({"kind": b.kind, "ready": b.ready})))
            .collect::<serde_json::Map<_, _>>(),
    });
    let status = if ready {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn dispatch(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let id = RequestId::new();
    let routes = state.routes.load();
    let (function, pattern, params) = match routes.lookup(req.method(), req.uri().path()) {
        Match::NotFound => return Problem::RouteNotFound.into_response_with(&id),
        Match::MethodNotAllowed { allow } => {
            return Problem::MethodNotAllowed { allow }.into_response_with(&id);
        }
        Match::Found {
            target,
            pattern,
            params,
        } => (target.pick().clone(), pattern.to_string(), params),
    };
    drop(routes);

    let limit = function.limits().max_body;
    if declared_length(&req).is_some_and(|n| n > limit) {
        return Problem::BodyTooLarge { limit }.into_response_with(&id);
    }
    let (mut parts, body) = req.into_parts();
    tell_guest_about_route(&mut parts.headers, &pattern, &params);
    let (body, exceeded) = LimitedBody::new(body, limit);
    let req = hyper::Request::from_parts(parts, body);

    let result = function.handle(req, &id).await;
    if exceeded.get() {
        return Problem::BodyTooLarge { limit }.into_response_with(&id);
    }
    match result {
        Ok(resp) => {
            let mut resp = resp.map(Body::new);
            id.stamp(resp.headers_mut());
            resp
        }
        Err(failure) => problem_for(failure).into_response_with(&id),
    }
}

fn problem_for(failure: Failure) -> Problem {
    match failure {
        Failure::Trap => Problem::GuestTrap,
        Failure::MemoryExceeded => Problem::GuestMemoryExceeded,
        Failure::Timeout => Problem::Timeout,
        Failure::NoResponse => Problem::GuestNoResponse,
        Failure::Overloaded => Problem::Overloaded,
        Failure::Internal => Problem::Internal,
    }
}

fn declared_length(req: &Request) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Replaces any client-sent `wasmgate-*` headers with the route pattern and its parameters.
fn tell_guest_about_route(
    headers: &mut axum::http::HeaderMap,
    pattern: &str,
    params: &[(String, String)],
) {
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(ROUTE_HEADER_PREFIX))
        .cloned()
        .collect();
    for k in forged {
        headers.remove(k);
    }
    if let Ok(v) = HeaderValue::from_str(pattern) {
        headers.insert(HeaderName::from_static("wasmgate-route"), v);
    }
    for (name, value) in params {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(format!("{ROUTE_HEADER_PREFIX}param-{name}").as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(k, v);
        }
    }
}
