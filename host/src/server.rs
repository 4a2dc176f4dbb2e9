//! The HTTP front: axum listener, the request path, and the host's own endpoints.
//!
//! Request path: CORS preflight (answered here) -> route match -> version pick -> body limit ->
//! the version's policy stack (auth -> rate limit -> login throttle -> compression ->
//! idempotency -> response cache -> bulkhead -> invoke) -> response, which names the version
//! that served it (`wasmgate-version`) and carries the route's CORS headers. The deployment
//! (routes and the versions behind them) is swapped whole on reload; a request keeps the
//! deployment it started with. The backends live as long as the process.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::body_limit::LimitedBody;
use crate::capabilities::Backends;
use crate::deploy::{PREVIEW_HEADER, PREVIEW_TOKEN_HEADER, VERSION_HEADER, VersionSet};
use crate::problem::{Outcome, Problem};
use crate::request_id::RequestId;
use crate::router::{Match, RouteTable};

/// Header prefix the host uses to tell the guest about the matched route. Client-sent headers
/// with this prefix are removed so a guest can trust them.
pub const ROUTE_HEADER_PREFIX: &str = "wasmgate-";

/// What a route serves: its function's versions, and its own CORS policy (which answers
/// preflights before any version is picked).
#[derive(Clone)]
pub struct Route {
    pub versions: VersionSet,
    pub cors: Option<Arc<crate::cors::Cors>>,
    /// The route's path as written, as the guest gets it in `wasmgate-route` (made once here,
    /// not per request; `None` for a path that is not a valid header value).
    pub path: Option<HeaderValue>,
}

impl Route {
    pub fn new(path: &str, versions: VersionSet, cors: Option<Arc<crate::cors::Cors>>) -> Self {
        Self {
            versions,
            cors,
            path: HeaderValue::from_str(path).ok(),
        }
    }
}

/// What serves requests: swapped whole on reload.
pub struct Deployment {
    pub routes: RouteTable<Route>,
    /// How many functions it serves.
    pub functions: usize,
}

/// Shared by every request.
pub struct AppState {
    current: ArcSwap<Deployment>,
    backends: Backends,
    previews: Option<Arc<crate::deploy::Previews>>,
    metrics: Option<PrometheusHandle>,
}

impl AppState {
    pub fn new(
        deployment: Deployment,
        backends: Backends,
        previews: Option<Arc<crate::deploy::Previews>>,
        metrics: Option<PrometheusHandle>,
    ) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(deployment),
            backends,
            previews,
            metrics,
        })
    }

    /// Replaces the deployment; requests already running finish on the old one.
    pub fn swap(&self, deployment: Deployment) {
        self.current.store(Arc::new(deployment));
    }
}

pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(crate::auth::JWKS_PATH, get(jwks))
        .fallback(dispatch)
        .with_state(state)
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    limits: crate::connections::Limits,
    tls: Option<crate::tls::Tls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::connections::serve(listener, app(state), limits, tls, shutdown).await
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
            .map(|b| (b.name.to_string(), serde_json::to_value(b).unwrap_or_default()))
            .collect::<serde_json::Map<_, _>>(),
    });
    let status = if ready {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// The public keys of the tokens this host issues, for anyone verifying them (RFC 7517). Keys
/// rotate; clients may cache this for a few minutes.
async fn jwks(State(state): State<Arc<AppState>>) -> Response {
    match &state.backends.auth {
        Some(auth) => (
            [
                (header::CACHE_CONTROL, "public, max-age=300"),
                (header::CONTENT_TYPE, "application/jwk-set+json"),
            ],
            axum::Json(auth.jwks()),
        )
            .into_response(),
        None => Problem::RouteNotFound.into_response_with(&RequestId::new()),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

async fn dispatch(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let started = Instant::now();
    let id = RequestId::new();
    let deployment = state.current.load_full();
    if let Some(asked) = crate::cors::preflight_method(req.method(), req.headers())
        && let Match::Found {
            target: Route {
                cors: Some(cors), ..
            },
            ..
        } = deployment.routes.lookup(&asked, req.uri().path())
    {
        let mut resp = cors.preflight(req.headers());
        id.stamp(resp.headers_mut());
        return resp;
    }
    // A guest is told the request's authority (wasi:http has no request without one): refuse a
    // request that names none rather than fail it inside the runtime as a 500.
    if req.uri().authority().is_none() && !req.headers().contains_key(header::HOST) {
        return Problem::HostMissing.into_response_with(&id);
    }
    let (version, route_path, params, cors) =
        match deployment.routes.lookup(req.method(), req.uri().path()) {
            Match::NotFound => return Problem::RouteNotFound.into_response_with(&id),
            Match::MethodNotAllowed { allow } => {
                return Problem::MethodNotAllowed { allow }.into_response_with(&id);
            }
            Match::Found {
                target:
                    Route {
                        versions,
                        cors,
                        path,
                    },
                params,
                ..
            } => {
                let version = match req.headers().get(PREVIEW_HEADER) {
                    None => versions.pick(req.headers(), req.extensions()).clone(),
                    Some(label) => match preview(&state, versions, label, req.headers()).await {
                        Some(v) => v,
                        None => return Problem::PreviewRefused.into_response_with(&id),
                    },
                };
                (version, path, params, cors)
            }
        };
    // The answer's CORS headers depend on the origin only: taken now, added at the end, so no
    // policy (and no cached entry) ever holds them.
    let origin = cors
        .as_ref()
        .map(|_| req.headers().get(header::ORIGIN).cloned());
    let limit = version.function.limits().max_body;
    let metrics = version.metrics;
    let resp = if declared_length(&req).is_some_and(|n| n > limit) {
        Problem::BodyTooLarge { limit }.into_response_with(&id)
    } else {
        req.extensions_mut().insert(id.clone());
        let (mut parts, body) = req.into_parts();
        tell_guest_about_route(&mut parts.headers, route_path.as_ref(), &params);
        let (body, exceeded) = LimitedBody::new(body, limit);
        let body = body.read_within(version.function.limits().timeout);
        let req = http::Request::from_parts(parts, body);
        let resp = match version.service.oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
        if exceeded.get() {
            Problem::BodyTooLarge { limit }.into_response_with(&id)
        } else {
            resp
        }
    };

    let mut resp = resp;
    resp.headers_mut()
        .insert(VERSION_HEADER, version.header.clone());
    if let (Some(cors), Some(origin)) = (cors, origin) {
        cors.decorate(origin.as_ref(), resp.headers_mut());
    }
    let (elapsed, outcome) = (
        started.elapsed(),
        resp.extensions().get::<Outcome>().map(|o| o.0),
    );
    version.counts.record(resp.status(), outcome, elapsed);
    match outcome {
        None => metrics.ok.increment(1),
        // Rejections are the rare path: only they build labels per request.
        Some(outcome) => metrics::counter!("wasmgate_requests_total",
            "function" => metrics.function.clone(), "version" => metrics.version.clone(), "outcome" => outcome)
        .increment(1),
    }
    metrics.duration.record(elapsed.as_secs_f64());
    resp
}

/// The version a preview request names, if its token allows it.
async fn preview(
    state: &AppState,
    target: &VersionSet,
    label: &HeaderValue,
    headers: &axum::http::HeaderMap,
) -> Option<crate::deploy::Version> {
    let version = target.labelled(label.to_str().ok()?)?;
    let token = headers.get(PREVIEW_TOKEN_HEADER)?.to_str().ok()?;
    state
        .previews
        .as_ref()?
        .allows(token, version.function.name())
        .await
        .then(|| version.clone())
}

fn declared_length(req: &Request) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Replaces any client-sent `wasmgate-*` headers with the route's path and its parameters.
fn tell_guest_about_route(
    headers: &mut axum::http::HeaderMap,
    route_path: Option<&HeaderValue>,
    params: &[(String, String)],
) {
    let forged = |k: &HeaderName| k.as_str().starts_with(ROUTE_HEADER_PREFIX);
    // Collected only when there is something to remove (a client rarely sends any).
    if headers.keys().any(forged) {
        let forged: Vec<HeaderName> = headers.keys().filter(|k| forged(k)).cloned().collect();
        for k in forged {
            headers.remove(k);
        }
    }
    // A preview token is for the host; the guest never needs it.
    headers.remove(PREVIEW_TOKEN_HEADER);
    if let Some(v) = route_path {
        headers.insert(HeaderName::from_static("wasmgate-route"), v.clone());
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
