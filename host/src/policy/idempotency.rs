//! `Idempotency-Key` on POST and PATCH (IETF httpapi draft semantics), for routes that opt in.
//!
//! The first request with a key runs; its response is stored with the key and a fingerprint of
//! the request (method, path, query, content type, body). A retry with the same key and the
//! same request gets the stored response with `Idempotent-Replayed: true`, without running the
//! function; the same key with another request gets 422, and while the first still runs, 409.
//! Keys are scoped per route and per principal (the verified subject on routes with an `auth`
//! policy, so a retry after a token refresh still replays; else the `Authorization` header,
//! hashed), so two clients cannot see each other's responses. Failures (5xx, trap, timeout, a response too big
//! to keep) are not stored: the key is released and a retry runs again.
//!
//! Once claimed, the run finishes and its response is stored even if the client goes away, so
//! the retry it will send finds it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::GuestRequest;
use super::layer::{Next, Policy, forward};
use crate::body_limit::LimitedBody;
use crate::config::IdempotencyConfig;
use crate::idempotency::{Claim, Store};
use crate::problem::{Outcome, Problem};
use crate::request_id::RequestId;
use crate::snapshot::Snapshot;

pub const KEY_HEADER: HeaderName = HeaderName::from_static("idempotency-key");
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Longest key accepted (the draft leaves it to the server; UUIDs are 36).
pub const MAX_KEY_LEN: usize = 255;
/// Largest response kept for replay; a bigger one is served once and its key released.
pub const MAX_STORED_BODY: usize = 1024 * 1024;
/// Added to the function's timeout to bound a claim whose process died mid-run.
const LOCK_MARGIN: Duration = Duration::from_secs(30);

/// One route's idempotency settings.
pub struct IdempotencyPolicy {
    store: Store,
    route: Arc<str>,
    ttl: Duration,
    lock: Duration,
    required: bool,
}

impl IdempotencyPolicy {
    pub fn new(store: Store, route: &str, cfg: &IdempotencyConfig, timeout: Duration) -> Self {
        Self {
            store,
            route: route.into(),
            ttl: cfg.ttl,
            lock: timeout + LOCK_MARGIN,
            required: cfg.required,
        }
    }
}

/// The key the client sent: a structured-field string (`"abc"`) or, leniently, a bare token.
pub(crate) fn client_key(headers: &http::HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(KEY_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = |why: &str| Problem::IdempotencyKeyInvalid {
        detail: format!("Idempotency-Key {why}"),
    };
    if values.next().is_some() {
        return Err(invalid("was sent more than once"));
    }
    let text = value.to_str().map_err(|_| invalid("must be ASCII text"))?;
    let key = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(invalid(&format!("must be 1 to {MAX_KEY_LEN} characters")));
    }
    Ok(Some(key.to_string()))
}

fn hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

impl IdempotencyPolicy {
    /// Where the key lives (route, method, principal, key) and what the request was (method,
    /// path and query, content type, body).
    fn scope_and_fingerprint(
        &self,
        head: &http::request::Parts,
        key: &str,
        body: &[u8],
    ) -> (String, String) {
        let header = |name| {
            head.headers
                .get(name)
                .map(HeaderValue::as_bytes)
                .unwrap_or_default()
        };
        let method = head.method.as_str().as_bytes();
        let principal = match head.extensions.get::<Arc<crate::auth::Principal>>() {
            Some(p) => [
                b"sub:".as_slice(),
                p.issuer.as_bytes(),
                b"\0",
                p.subject.as_bytes(),
            ]
            .concat(),
            None => header(header::AUTHORIZATION).to_vec(),
        };
        let scope = hash(&[self.route.as_bytes(), method, &principal, key.as_bytes()]);
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
        let fingerprint = hash(&[method, path.as_bytes(), header(header::CONTENT_TYPE), body]);
        (scope, fingerprint)
    }
}

impl Policy for IdempotencyPolicy {
    async fn call<S: Next>(self: Arc<Self>, req: GuestRequest, mut next: S) -> Response {
        if !matches!(*req.method(), Method::POST | Method::PATCH) {
            return forward(&mut next, req).await;
        }
        let id = RequestId::of(req.extensions());
        let key = match client_key(req.headers()) {
            Ok(Some(key)) => key,
            Ok(None) if self.required => {
                return Problem::IdempotencyKeyMissing.into_response_with(&id);
            }
            Ok(None) => return forward(&mut next, req).await,
            Err(problem) => return problem.into_response_with(&id),
        };
        // The fingerprint needs the body; it is capped in size and in time.
        let (head, body) = req.into_parts();
        let body = match body.read_whole().await {
            Ok(body) => body,
            Err(problem) => return problem.into_response_with(&id),
        };
        let (scope, fingerprint) = self.scope_and_fingerprint(&head, &key, &body);
        let token = match self
            .store
            .claim(&scope, &fingerprint, self.lock, self.ttl)
            .await
        {
            Ok(Claim::Run(token)) => token,
            Ok(Claim::Replay(snapshot)) => {
                let mut resp = snapshot.to_response();
                resp.headers_mut()
                    .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
                id.stamp(resp.headers_mut());
                return resp;
            }
            Ok(Claim::Mismatch) => return Problem::IdempotencyKeyReused.into_response_with(&id),
            Ok(Claim::InFlight) => return Problem::IdempotencyKeyInFlight.into_response_with(&id),
            Err(e) => {
                tracing::warn!(error = %e, request_id = %id, "idempotency store unavailable");
                return Problem::IdempotencyUnavailable.into_response_with(&id);
            }
        };
        let req = GuestRequest::from_parts(head, LimitedBody::new(Body::from(body), u64::MAX).0);
        // Its own task: the run and its record finish even if this request is dropped.
        let store = self.store.clone();
        let run = tokio::spawn(async move {
            let resp = forward(&mut next, req).await;
            record(&store, &token, resp).await
        });
        run.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "idempotent run panicked");
            Problem::Internal.into_response_with(&id)
        })
    }
}

/// Stores a claimed run's response for replay, or releases the key when the run failed (or
/// its response cannot be kept), so a retry runs again.
async fn record(store: &Store, token: &crate::idempotency::Token, resp: Response) -> Response {
    if resp.status().is_server_error() || resp.extensions().get::<Outcome>().is_some() {
        release(store, token).await;
        return resp;
    }
    match Snapshot::capture(resp, MAX_STORED_BODY).await {
        Ok((snapshot, resp)) => {
            if let Err(e) = store.complete(token, &snapshot).await {
                tracing::warn!(error = %e, "idempotent response not stored; a retry will run again");
                release(store, token).await;
            }
            resp
        }
        Err(resp) => {
            tracing::warn!(
                "response not kept for Idempotency-Key replay: over {MAX_STORED_BODY} bytes, or its body failed; a retry will run again"
            );
            release(store, token).await;
            resp
        }
    }
}

async fn release(store: &Store, token: &crate::idempotency::Token) {
    if let Err(e) = store.release(token).await {
        // The claim then holds until its lock deadline; a retry gets 409 until then.
        tracing::warn!(error = %e, "idempotency key not released");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(values: &[&'static str]) -> GuestRequest {
        let mut req = http::Request::post("/x")
            .body(LimitedBody::new(Body::empty(), 10).0)
            .expect("request");
        for v in values {
            req.headers_mut()
                .append(KEY_HEADER, HeaderValue::from_static(v));
        }
        req
    }

    #[test]
    fn reads_keys_as_structured_strings_or_tokens() {
        assert_eq!(client_key(request(&[]).headers()).expect("ok"), None);
        assert_eq!(
            client_key(request(&["\"8e03978e-40d5\""]).headers()).expect("ok"),
            Some("8e03978e-40d5".into())
        );
        assert_eq!(
            client_key(request(&["abc"]).headers()).expect("ok"),
            Some("abc".into())
        );
        assert!(client_key(request(&["\"\""]).headers()).is_err());
        assert!(client_key(request(&["a", "b"]).headers()).is_err());
        let long: &'static str = Box::leak("k".repeat(MAX_KEY_LEN + 1).into_boxed_str());
        assert!(client_key(request(&[long]).headers()).is_err());
    }

    #[test]
    fn hashes_are_unambiguous() {
        assert_ne!(hash(&[b"ab", b"c"]), hash(&[b"a", b"bc"]));
    }
}
