//! Every error the host answers itself, as `application/problem+json` (RFC 9457).
//!
//! Each cause has a stable `type` URI that clients may match on; the body never carries guest or
//! backend internals, only the request id that finds the details in the log.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::request_id::RequestId;

/// Why the host answered instead of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    RouteNotFound,
    MethodNotAllowed {
        allow: String,
    },
    /// A body the host reads whole itself did not arrive within the function's timeout.
    BodyTimeout {
        after: std::time::Duration,
    },
    /// The client's body ended early or was malformed.
    BodyIncomplete,
    BodyTooLarge {
        limit: u64,
    },
    GuestTrap,
    GuestMemoryExceeded,
    GuestNoResponse,
    Timeout,
    Overloaded,
    RateLimited {
        retry_after: std::time::Duration,
    },
    RateLimitUnavailable,
    BulkheadFull,
    IdempotencyKeyMissing,
    IdempotencyKeyInvalid {
        detail: String,
    },
    IdempotencyKeyReused,
    IdempotencyKeyInFlight,
    IdempotencyUnavailable,
    /// No usable bearer token; `None` when none was sent, else why it was refused.
    Unauthorized {
        rejection: Option<crate::auth::Rejection>,
    },
    /// A valid token that may not do this; `insufficient` when roles or scopes are missing.
    Forbidden {
        detail: String,
        insufficient: bool,
    },
    LoginThrottled {
        retry_after: std::time::Duration,
    },
    /// A preview header without a valid preview token, or naming no deployed version.
    PreviewRefused,
    /// Neither the request target nor a `Host` header names a host (RFC 9112 3.2: 400).
    HostMissing,
    Internal,
}

/// Marks a response the host answered itself, with the problem's slug: `/metrics` counts
/// outcomes by it.
#[derive(Debug, Clone, Copy)]
pub struct Outcome(pub &'static str);

impl Problem {
    pub fn status(&self) -> StatusCode {
        match self {
            Problem::RouteNotFound => StatusCode::NOT_FOUND,
            Problem::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Problem::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Problem::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Problem::BodyIncomplete => StatusCode::BAD_REQUEST,
            Problem::GuestTrap
            | Problem::GuestMemoryExceeded
            | Problem::GuestNoResponse
            | Problem::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Problem::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Problem::Overloaded | Problem::RateLimitUnavailable | Problem::BulkheadFull => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Problem::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Problem::IdempotencyKeyMissing | Problem::IdempotencyKeyInvalid { .. } => {
                StatusCode::BAD_REQUEST
            }
            Problem::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Problem::IdempotencyKeyInFlight => StatusCode::CONFLICT,
            Problem::IdempotencyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Problem::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Problem::Forbidden { .. } => StatusCode::FORBIDDEN,
            Problem::LoginThrottled { .. } => StatusCode::TOO_MANY_REQUESTS,
            Problem::PreviewRefused => StatusCode::FORBIDDEN,
            Problem::HostMissing => StatusCode::BAD_REQUEST,
        }
    }

    /// The stable last segment of the `type` URI.
    pub fn slug(&self) -> &'static str {
        match self {
            Problem::RouteNotFound => "route-not-found",
            Problem::MethodNotAllowed { .. } => "method-not-allowed",
            Problem::BodyTooLarge { .. } => "body-too-large",
            Problem::BodyTimeout { .. } => "body-timeout",
            Problem::BodyIncomplete => "body-incomplete",
            Problem::GuestTrap => "function-failed",
            Problem::GuestMemoryExceeded => "function-memory-exceeded",
            Problem::GuestNoResponse => "function-no-response",
            Problem::Timeout => "function-timeout",
            Problem::Overloaded => "overloaded",
            Problem::RateLimited { .. } => "rate-limited",
            Problem::RateLimitUnavailable => "rate-limit-unavailable",
            Problem::BulkheadFull => "bulkhead-full",
            Problem::IdempotencyKeyMissing => "idempotency-key-missing",
            Problem::IdempotencyKeyInvalid { .. } => "idempotency-key-invalid",
            Problem::IdempotencyKeyReused => "idempotency-key-reused",
            Problem::IdempotencyKeyInFlight => "idempotency-key-in-flight",
            Problem::IdempotencyUnavailable => "idempotency-unavailable",
            Problem::Unauthorized { .. } => "unauthorized",
            Problem::Forbidden { .. } => "forbidden",
            Problem::LoginThrottled { .. } => "login-throttled",
            Problem::PreviewRefused => "preview-refused",
            Problem::HostMissing => "host-missing",
            Problem::Internal => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Problem::RouteNotFound => "No route matches this path",
            Problem::MethodNotAllowed { .. } => "Method not allowed on this path",
            Problem::BodyTooLarge { .. } => "Request body too large",
            Problem::BodyTimeout { .. } => "Request body not received in time",
            Problem::BodyIncomplete => "Request body incomplete",
            Problem::GuestTrap => "The function failed",
            Problem::GuestMemoryExceeded => "The function exceeded its memory limit",
            Problem::GuestNoResponse => "The function returned no response",
            Problem::Timeout => "The function did not answer in time",
            Problem::Overloaded => "The platform is at capacity",
            Problem::RateLimited { .. } => "Too many requests for this function",
            Problem::RateLimitUnavailable => "The function's shared rate limit cannot be checked",
            Problem::BulkheadFull => "The function is at its concurrency limit",
            Problem::IdempotencyKeyMissing => "Idempotency-Key required",
            Problem::IdempotencyKeyInvalid { .. } => "Invalid Idempotency-Key",
            Problem::IdempotencyKeyReused => "Idempotency-Key already used for another request",
            Problem::IdempotencyKeyInFlight => "A request with this Idempotency-Key is in progress",
            Problem::IdempotencyUnavailable => "Idempotency-Key cannot be checked right now",
            Problem::Unauthorized { .. } => "Authentication required",
            Problem::Forbidden { .. } => "Not allowed",
            Problem::LoginThrottled { .. } => "Too many failed logins; wait before trying again",
            Problem::PreviewRefused => "Preview refused",
            Problem::HostMissing => "The request names no host",
            Problem::Internal => "Internal error",
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Problem::MethodNotAllowed { allow } => Some(format!("allowed methods: {allow}")),
            Problem::BodyTooLarge { limit } => {
                Some(format!("this function accepts bodies up to {limit} bytes"))
            }
            Problem::BodyTimeout { after } => Some(format!(
                "this route reads the whole body before the function runs; it must arrive within {after:?}"
            )),
            Problem::BodyIncomplete => {
                Some("the body ended before its declared end, or its framing was malformed".into())
            }
            Problem::IdempotencyKeyMissing => Some(
                "this route runs POST and PATCH only with an Idempotency-Key header; send a new unique key per request and reuse it on retries".into(),
            ),
            Problem::IdempotencyKeyInvalid { detail } => Some(detail.clone()),
            Problem::IdempotencyKeyReused => Some(
                "a key may be retried only with the same method, path and body; use a new key for a new request".into(),
            ),
            Problem::IdempotencyKeyInFlight => {
                Some("retry after the first request has finished".into())
            }
            Problem::Unauthorized { rejection: None } => {
                Some("this route needs a bearer token in the Authorization header".into())
            }
            Problem::Unauthorized {
                rejection: Some(r),
            } => Some(r.description().into()),
            Problem::Forbidden { detail, .. } => Some(detail.clone()),
            Problem::PreviewRefused => Some(
                "x-wasmgate-preview needs the label of a deployed version of this route's function and a valid x-wasmgate-preview-token from the admin API".into(),
            ),
            Problem::HostMissing => {
                Some("send a Host header (HTTP/1.1 requires one) or an absolute URI".into())
            }
            _ => None,
        }
    }

    /// The response, carrying the request id so the log entry can be found.
    pub fn into_response_with(self, request_id: &RequestId) -> Response {
        let body = Body {
            r#type: format!("{TYPE_BASE}{}", self.slug()),
            title: self.title(),
            status: self.status().as_u16(),
            detail: self.detail(),
            request_id: request_id.as_str(),
        };
        let json = serde_json::to_vec(&body).expect("problem body serializes");
        let mut resp = (self.status(), json).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Problem::MethodNotAllowed { allow } = &self
            && let Ok(v) = HeaderValue::from_str(allow)
        {
            headers.insert(header::ALLOW, v);
        }
        match &self {
            Problem::Overloaded
            | Problem::BulkheadFull
            | Problem::RateLimitUnavailable
            | Problem::IdempotencyKeyInFlight
            | Problem::IdempotencyUnavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Problem::RateLimited { retry_after } | Problem::LoginThrottled { retry_after } => {
                // Whole seconds, rounded up: a client that waits this long will be let in.
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            // RFC 6750 section 3: the challenge says what was wrong, never more.
            Problem::Unauthorized { rejection } => {
                let challenge = match rejection {
                    None => "Bearer realm=\"wasmgate\"".to_string(),
                    Some(r) => format!(
                        "Bearer realm=\"wasmgate\", error=\"invalid_token\", error_description=\"{}\"",
                        r.description()
                    ),
                };
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    headers.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            Problem::Forbidden {
                insufficient: true, ..
            } => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"wasmgate\", error=\"insufficient_scope\"",
                    ),
                );
            }
            _ => {}
        }
        request_id.stamp(headers);
        resp.extensions_mut().insert(Outcome(self.slug()));
        resp
    }
}

/// Prefix of every problem `type`; the slug follows.
pub const TYPE_BASE: &str = "urn:wasmgate:problem:";

#[derive(Serialize)]
struct Body<'a> {
    r#type: String,
    title: &'static str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    request_id: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn method_not_allowed_carries_allow_and_problem_json() {
        let id = RequestId::new();
        let resp = Problem::MethodNotAllowed {
            allow: "GET, HEAD".into(),
        }
        .into_response_with(&id);
        assert_eq!(resp.status(), 405);
        assert_eq!(resp.headers()[header::ALLOW], "GET, HEAD");
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["type"], "urn:wasmgate:problem:method-not-allowed");
        assert_eq!(v["status"], 405);
        assert_eq!(v["request_id"], id.as_str());
    }
}
