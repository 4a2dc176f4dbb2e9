//! wasmgate-sdk: write a wasmgate HTTP function as one async fn.
//!
//! ```ignore
//! use wasmgate_sdk::{Body, Request, Response, Result, StatusCode, json};
//!
//! async fn handle(req: Request<Body>) -> Result {
//!     Ok(json(StatusCode::OK, &serde_json::json!({"hello": "world"})))
//! }
//! wasmgate_sdk::export_http_function!(handle);
//! ```
//!
//! Built on [`wstd`], the Bytecode Alliance's async std for WASI 0.2 components, rather than on
//! raw wit-bindgen output: wstd already turns `wasi:http` resources into the `http` crate's
//! `Request`/`Response` and drives async I/O with its own small executor, so this crate only adds
//! what is wasmgate's own: problem responses in the platform's format, JSON helpers, and access to
//! the route parameters the host passes along. The output is a standard `wasi:http/proxy`
//! component that also runs under `wasmtime serve`.
//!
//! Capabilities the host grants ([`db`], [`cache`], [`lock`], [`response_cache`], [`auth`]) are plain
//! functions; their errors
//! convert into a [`Problem`] with a sensible status, so `?` does the right thing by default.
//!
//! Build with `cargo build --target wasm32-wasip2` and a `cdylib` crate type.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod auth;
pub mod cache;
#[doc(hidden)]
pub mod capabilities;
pub mod db;
pub mod event;
pub mod events;
pub mod lock;
pub mod password;
pub mod response_cache;

pub use wstd;
pub use wstd::http::{Body, HeaderValue, Method, Request, Response, StatusCode};

/// A handler's result: a response, or a problem that becomes `application/problem+json`.
pub type Result<T = Response<Body>, E = Problem> = std::result::Result<T, E>;

/// An RFC 9457 problem a handler returns instead of a response.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(serialize_with = "status_code")]
    status: StatusCode,
    r#type: String,
    title: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl Problem {
    /// `slug` becomes the stable `type` (`urn:wasmgate:problem:<slug>`) clients match on.
    pub fn new(status: StatusCode, slug: &str, title: impl Into<String>) -> Self {
        Self {
            status,
            r#type: format!("urn:wasmgate:problem:{slug}"),
            title: title.into(),
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", "Bad request").with_detail(detail)
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found")
    }

    /// A bug or unexpected state in the function. `detail` goes to stderr (the host logs it
    /// with the request id), not to the client.
    pub fn internal(detail: impl Into<String>) -> Self {
        eprintln!("internal error: {}", detail.into());
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
        )
    }

    /// A backend the function needs is down; the client may retry.
    pub fn unavailable(what: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backend-unavailable",
            "A backend is unavailable; retry later",
        )
        .with_detail(format!("{what} unavailable"))
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn into_response(self) -> Response<Body> {
        let bytes = serde_json::to_vec(&self).unwrap_or_default();
        let status = self.status;
        let mut resp = Response::new(Body::from(bytes));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}

fn status_code<S: serde::Serializer>(
    s: &StatusCode,
    ser: S,
) -> std::result::Result<S::Ok, S::Error> {
    ser.serialize_u16(s.as_u16())
}

/// A JSON response.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut resp = Response::new(Body::from(bytes));
            *resp.status_mut() = status;
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            resp
        }
        Err(e) => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "serialization",
            "Response could not be serialized",
        )
        .with_detail(e.to_string())
        .into_response(),
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut resp = Response::new(Body::from(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The value of route parameter `name` (`/users/{id}` -> `param(&req, "id")`), as the host
/// matched it. The host removes any client-sent copy, so it can be trusted.
pub fn param<'a>(req: &'a Request<Body>, name: &str) -> Option<&'a str> {
    req.headers()
        .get(format!("wasmgate-param-{name}"))
        .and_then(|v| v.to_str().ok())
}

/// The pattern of the route the host matched (`/users/{id}`), empty outside wasmgate. The host
/// removes any client-sent copy, so it can be trusted.
pub fn route(req: &Request<Body>) -> &str {
    req.headers()
        .get("wasmgate-route")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Reads the whole body; one that cannot be read (cut off, or over the function's `max_body`)
/// is a 400.
pub async fn read_body(req: &mut Request<Body>) -> Result<&[u8]> {
    req.body_mut()
        .contents()
        .await
        .map_err(|e| Problem::bad_request(format!("cannot read the body: {e}")))
}

/// Reads the body as JSON into `T`; malformed JSON or a wrong shape is a 400 naming the problem.
pub async fn read_json<T: DeserializeOwned>(req: &mut Request<Body>) -> Result<T> {
    let bytes = read_body(req).await?;
    serde_json::from_slice(bytes).map_err(|e| Problem::bad_request(format!("invalid JSON: {e}")))
}

/// Exports `handler` (an `async fn(Request<Body>) -> Result`) as the component's
/// `wasi:http/incoming-handler`.
#[macro_export]
macro_rules! export_http_function {
    ($handler:path) => {
        struct __WasmgateFunction;

        impl $crate::__internal::wasip2::exports::http::incoming_handler::Guest
            for __WasmgateFunction
        {
            fn handle(
                request: $crate::__internal::wasip2::http::types::IncomingRequest,
                response_out: $crate::__internal::wasip2::http::types::ResponseOutparam,
            ) {
                $crate::__internal::serve(request, response_out, $handler)
            }
        }

        $crate::__internal::wasip2::http::proxy::export!(
            __WasmgateFunction with_types_in $crate::__internal::wasip2
        );
    };
}

#[doc(hidden)]
pub mod __internal {
    pub use wstd::__internal::wasip2;
    use wstd::http::server::Responder;

    use super::{Body, Request, Response};

    /// Runs one request through `handler` on wstd's executor and sends what it returns.
    pub fn serve<F, Fut>(
        request: wasip2::http::types::IncomingRequest,
        response_out: wasip2::http::types::ResponseOutparam,
        handler: F,
    ) where
        F: FnOnce(Request<Body>) -> Fut,
        Fut: Future<Output = super::Result<Response<Body>>>,
    {
        let responder = Responder::new(response_out);
        wstd::runtime::block_on(async move {
            match wstd::http::request::try_from_incoming(request) {
                Ok(request) => {
                    let response = handler(request).await.unwrap_or_else(|p| p.into_response());
                    // The client went away mid-body: nothing left to tell it.
                    let _ = responder.respond(response).await;
                }
                Err(err) => responder.fail(err),
            }
        })
    }
}
