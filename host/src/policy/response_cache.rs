//! The response cache layer: HTTP semantics on top of `crate::response_cache`'s storage.
//!
//! Only GET (and HEAD, served from GET's entries) of a route that opts in. The key is the
//! function, path, query and the values of the route's `vary` headers. A hit never reaches the
//! bulkhead or the guest. What the guest answers decides what is kept:
//! - 2xx/3xx (not 206) for the route's TTL, a 404 for `not_found_ttl`, nothing else;
//! - `Cache-Control`: `no-store`, `no-cache` and `private` keep nothing, `s-maxage` or `max-age`
//!   shorten the TTL;
//! - never a response with `Set-Cookie`, nor one whose `Vary` names a header the route does
//!   not vary on (or `*`): serving it to another client could be wrong.
//!
//! A request with `Authorization` bypasses the cache unless the route varies on it. Every
//! response on a cached route says what happened in `Cache-Status` (RFC 9211).
//!
//! With compression on the route, an entry is encoded once when it is stored (each of the
//! route's encodings that makes it smaller) and a hit hands out the variant the request accepts,
//! with `Content-Encoding`, its own length and a weak `ETag`; the key stays the same, since the
//! variants are of one response.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use sha2::{Digest, Sha256};

/// Longest path and query kept as they are in an entry key; longer ones are hashed, so a key
/// stays short in memory and in Redis whatever the URL.
const MAX_PLAIN_KEY: usize = 256;

use super::GuestRequest;
use super::layer::{Next, Policy, forward};
use crate::capabilities::response_cache::tags_from_header;
use crate::compression::{
    Compression, Encoding, Verdict, accept_encoding, mark_encoded, negotiate,
};
use crate::config::RouteCacheConfig;
use crate::request_id::RequestId;
use crate::response_cache::{Entry, Filled, MAX_ENTRY_BODY, NotStored, ResponseCache, Source};
use crate::snapshot::Snapshot;

/// The tags a guest put on its response (the header itself is removed before anyone sees it).
#[derive(Debug, Clone)]
pub struct CacheTags(pub HeaderValue);

const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// One route's cache settings and the process-wide cache.
pub struct CachePolicy {
    cache: ResponseCache,
    function: Arc<str>,
    /// Entries are kept per version: two versions may answer the same request differently.
    /// Tags stay per function, so a purge reaches every version's entries.
    version: Arc<str>,
    ttl: Duration,
    not_found_ttl: Duration,
    vary: Vec<HeaderName>,
    /// The route's compression, for the variants an entry keeps.
    compression: Option<Arc<Compression>>,
    counters: Counters,
}

struct Counters {
    hit: metrics::Counter,
    miss: metrics::Counter,
    coalesced: metrics::Counter,
    bypass: metrics::Counter,
}

impl CachePolicy {
    pub fn new(
        cache: ResponseCache,
        function: &str,
        version: &str,
        cfg: &RouteCacheConfig,
        compression: Option<Arc<Compression>>,
    ) -> Self {
        let counter = |result: &'static str| metrics::counter!("wasmgate_response_cache_total", "function" => function.to_string(), "result" => result);
        Self {
            cache,
            function: function.into(),
            version: version.into(),
            ttl: cfg.ttl,
            not_found_ttl: cfg.not_found_ttl.min(cfg.ttl),
            vary: cfg
                .vary
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
                .collect(),
            compression,
            counters: Counters {
                hit: counter("hit"),
                miss: counter("miss"),
                coalesced: counter("coalesced"),
                bypass: counter("bypass"),
            },
        }
    }

    /// The entry key, or `None` when this request must not use the cache. A request with
    /// credentials bypasses the cache, unless the route's `auth` policy has already decided it
    /// may see the resource (`authorized`): then it shares the one cached copy.
    pub(crate) fn key(
        &self,
        uri: &http::Uri,
        headers: &HeaderMap,
        authorized: bool,
    ) -> Option<String> {
        if !authorized
            && headers.contains_key(header::AUTHORIZATION)
            && !self.vary.contains(&header::AUTHORIZATION)
        {
            return None;
        }
        let (path, query) = (uri.path(), uri.query().unwrap_or_default());
        // Without `vary`, a short path and query are the key as they are: hashing them cost a
        // tenth of a hit's instructions (`bench/callgrind`). Header values (a token, when
        // `authorization` is varied on) are always hashed, so no credential lands in a key.
        if self.vary.is_empty() && path.len() + query.len() <= MAX_PLAIN_KEY {
            // Pushed piece by piece: `format!` was a twentieth of a hit's instructions.
            let mut key = String::with_capacity(
                self.function.len() + self.version.len() + path.len() + query.len() + 3,
            );
            for piece in [&*self.function, ":", &*self.version, ":", path, "?", query] {
                key.push_str(piece);
            }
            return Some(key);
        }
        let mut h = Sha256::new();
        h.update(path.as_bytes());
        h.update(b"?");
        h.update(query.as_bytes());
        for name in &self.vary {
            h.update(b"\n");
            h.update(name.as_str().as_bytes());
            for v in headers.get_all(name) {
                h.update(b"\0");
                h.update(v.as_bytes());
            }
        }
        Some(format!(
            "{}:{}:#{}",
            self.function,
            self.version,
            // `#`: never in a path or query, so a hashed key cannot equal a plain one.
            hex::encode(h.finalize())
        ))
    }

    /// How long the guest's response may be kept, if at all, and whether it may be handed to
    /// other requests that waited for it.
    pub(crate) fn judge(&self, status: StatusCode, headers: &HeaderMap) -> Judgement {
        if headers.contains_key(header::SET_COOKIE) {
            return Judgement::Private;
        }
        let mut ttl = match status.as_u16() {
            206 => return Judgement::Shareable,
            200..=399 => self.ttl,
            404 => self.not_found_ttl,
            _ => return Judgement::Shareable,
        };
        for v in headers.get_all(header::VARY) {
            for name in v.to_str().unwrap_or("*").split(',').map(str::trim) {
                let known = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                    .is_ok_and(|n| self.vary.contains(&n));
                if !name.is_empty() && !known {
                    return Judgement::Private;
                }
            }
        }
        let (mut max_age, mut s_maxage) = (None, None);
        for v in headers.get_all(header::CACHE_CONTROL) {
            for d in v.to_str().unwrap_or_default().split(',').map(str::trim) {
                let (name, value) = d.split_once('=').unwrap_or((d, ""));
                let secs = || value.trim_matches('"').parse::<u64>().ok();
                match name.to_ascii_lowercase().as_str() {
                    "private" | "no-store" | "no-cache" => return Judgement::Private,
                    "max-age" => max_age = secs().or(Some(0)),
                    "s-maxage" => s_maxage = secs().or(Some(0)),
                    _ => {}
                }
            }
        }
        if let Some(secs) = s_maxage.or(max_age) {
            ttl = ttl.min(Duration::from_secs(secs));
        }
        if ttl.is_zero() {
            Judgement::Shareable
        } else {
            Judgement::Keep(ttl)
        }
    }
}

/// The entry's variant for a request that sent these `Accept-Encoding` values, if any.
fn accepted<'e>(accepts: &[HeaderValue], e: &'e Entry) -> Option<&'e (Encoding, bytes::Bytes)> {
    if accepts.is_empty() || e.encoded.is_empty() {
        return None;
    }
    let offered: Vec<Encoding> = e.encoded.iter().map(|(enc, _)| *enc).collect();
    let chosen = negotiate(accepts, &offered)?;
    e.encoded.iter().find(|(enc, _)| *enc == chosen)
}

impl CachePolicy {
    /// The variants an entry keeps: each of the route's encodings that makes its body smaller.
    async fn encode(&self, snapshot: &Snapshot) -> Vec<(Encoding, bytes::Bytes)> {
        let Some(compression) = &self.compression else {
            return Vec::new();
        };
        let status = StatusCode::from_u16(snapshot.status).unwrap_or(StatusCode::OK);
        let len = snapshot.body.len() as u64;
        if compression.verdict(status, &snapshot.header_map(), Some(len)) != Verdict::Encode {
            return Vec::new();
        }
        let mut encoded = Vec::new();
        for &e in compression.encodings() {
            match compression.encode_all(&snapshot.body, e).await {
                Ok(body) if body.len() < snapshot.body.len() => encoded.push((e, body)),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, encoding = e.token(), "encoding a cached response failed")
                }
            }
        }
        encoded
    }
}

#[derive(Debug)]
pub(crate) enum Judgement {
    Keep(Duration),
    /// Not kept, but the same answer any concurrent requester would have had.
    Shareable,
    /// For this requester only.
    Private,
}

/// A kept response, for this request: `variant` is the encoded body it accepts, if any;
/// `varies` says the entry has variants (so its identity form varies on `Accept-Encoding` too).
/// With `if_none_match` naming the kept response's ETag, a 304 without a body (RFC 9110 13.1.2,
/// weak comparison).
fn serve(
    snapshot: &Snapshot,
    variant: Option<&(Encoding, bytes::Bytes)>,
    varies: bool,
    head_only: bool,
    if_none_match: Option<&HeaderValue>,
    status: &'static str,
    age: Option<u64>,
) -> Response {
    let mut resp = snapshot.to_response();
    if let Some((encoding, body)) = variant {
        mark_encoded(resp.headers_mut(), *encoding, Some(body.len()));
        *resp.body_mut() = axum::body::Body::from(body.clone());
    }
    if varies {
        crate::compression::vary_on_accept_encoding(resp.headers_mut());
    }
    if head_only {
        *resp.body_mut() = axum::body::Body::empty();
    }
    if let (Some(wanted), Some(etag)) = (if_none_match, resp.headers().get(header::ETAG))
        && etag_matches(wanted, etag)
    {
        let mut not_modified = Response::new(axum::body::Body::empty());
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        for name in [
            header::ETAG,
            header::CACHE_CONTROL,
            header::VARY,
            header::EXPIRES,
        ] {
            if let Some(v) = resp.headers().get(&name) {
                not_modified.headers_mut().insert(name, v.clone());
            }
        }
        resp = not_modified;
    }
    let headers = resp.headers_mut();
    headers.insert(CACHE_STATUS, HeaderValue::from_static(status));
    if let Some(age) = age {
        headers.insert(header::AGE, HeaderValue::from(age));
    }
    resp
}

/// Whether an `If-None-Match` value names `etag` (`*`, or one of its tags, `W/` ignored).
fn etag_matches(wanted: &HeaderValue, etag: &HeaderValue) -> bool {
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let (Ok(wanted), Ok(etag)) = (wanted.to_str(), etag.to_str()) else {
        return false;
    };
    wanted.trim() == "*" || wanted.split(',').any(|t| opaque(t) == opaque(etag))
}

/// Runs the request past the cache and says so.
async fn forwarded<S: Next>(next: &mut S, req: GuestRequest, status: &'static str) -> Response {
    let mut resp = forward(next, req).await;
    resp.headers_mut()
        .insert(CACHE_STATUS, HeaderValue::from_static(status));
    resp
}

/// What a request asked of the cache, beside its key: how a kept response is handed to it.
struct Asked {
    id: RequestId,
    head_only: bool,
    if_none_match: Option<HeaderValue>,
    /// Its `Accept-Encoding` values; empty where the route does not compress, so no variant is
    /// handed out there.
    accepts: Vec<HeaderValue>,
}

impl CachePolicy {
    /// `e` for this request, with the variant it accepts.
    fn reply(&self, asked: &Asked, e: &Entry, status: &'static str, age: Option<u64>) -> Response {
        let variants = self.compression.is_some() && !e.encoded.is_empty();
        let chosen = accepted(&asked.accepts, e);
        self.reply_with(asked, &e.response, chosen, variants, status, age)
    }

    fn reply_with(
        &self,
        asked: &Asked,
        snapshot: &Snapshot,
        chosen: Option<&(Encoding, bytes::Bytes)>,
        varies: bool,
        status: &'static str,
        age: Option<u64>,
    ) -> Response {
        let mut resp = serve(
            snapshot,
            chosen,
            varies,
            asked.head_only,
            asked.if_none_match.as_ref(),
            status,
            age,
        );
        asked.id.stamp(resp.headers_mut());
        resp
    }

    /// A GET that this process's memory did not answer: the shared cache, then one fill for
    /// every concurrent request with the same key. Boxed by the caller: its state (the capture,
    /// the encoders) is large, and a hit should not carry it.
    async fn miss<S: Next>(
        self: Arc<Self>,
        key: String,
        req: GuestRequest,
        mut next: S,
        asked: Asked,
    ) -> Response {
        // The fill runs only in the request that leads it; the others keep their request and
        // wait for its outcome.
        let mut request = Some(req);
        let mut own: Option<Response> = None;
        let filled = {
            let (slot, own, mut leader, policy) = (&mut request, &mut own, next.clone(), &self);
            let fill = async move {
                let req = slot.take().expect("the fill runs once");
                let resp = forward(&mut leader, req).await;
                let judgement = policy.judge(resp.status(), resp.headers());
                let tags = resp
                    .extensions()
                    .get::<CacheTags>()
                    .map(|t| tags_from_header(&policy.function, t.0.as_bytes()))
                    .unwrap_or_default();
                let (snapshot, resp) = match Snapshot::capture(resp, MAX_ENTRY_BODY).await {
                    Ok(captured) => captured,
                    Err(resp) => {
                        *own = Some(resp);
                        return Err(NotStored { shared: None });
                    }
                };
                *own = Some(resp);
                match judgement {
                    Judgement::Keep(ttl) => {
                        let encoded = policy.encode(&snapshot).await;
                        Ok(Entry::new(snapshot, tags, ttl).with_encoded(encoded))
                    }
                    Judgement::Shareable => Err(NotStored {
                        shared: Some(snapshot),
                    }),
                    Judgement::Private => Err(NotStored { shared: None }),
                }
            };
            self.cache.get_or_fill(&key, fill).await
        };
        if let Some(mut resp) = own {
            self.counters.miss.increment(1);
            if let Filled::Entry(e, _) = &filled
                && accepted(&asked.accepts, e).is_some()
            {
                // Encoded once, as stored: the leader gets that variant like everyone after it.
                return self.reply(&asked, e, "wasmgate; fwd=miss; stored", None);
            }
            let status = if matches!(filled, Filled::Entry(..)) {
                "wasmgate; fwd=miss; stored"
            } else {
                "wasmgate; fwd=miss"
            };
            resp.headers_mut()
                .insert(CACHE_STATUS, HeaderValue::from_static(status));
            return resp;
        }
        match (filled, request) {
            (Filled::Entry(e, source), _) => {
                let status = match source {
                    Source::Memory | Source::Fill => "wasmgate; hit",
                    Source::Shared => "wasmgate; hit; detail=shared",
                    Source::Coalesced => "wasmgate; hit; detail=coalesced",
                };
                if source == Source::Coalesced {
                    self.counters.coalesced.increment(1);
                } else {
                    self.counters.hit.increment(1);
                }
                self.reply(&asked, &e, status, Some(e.age()))
            }
            (Filled::NotStored(n), request) => match (&n.shared, request) {
                (Some(snapshot), _) => {
                    self.counters.coalesced.increment(1);
                    self.reply_with(
                        &asked,
                        snapshot,
                        None,
                        false,
                        "wasmgate; fwd=miss; detail=coalesced",
                        None,
                    )
                }
                (None, Some(req)) => {
                    self.counters.miss.increment(1);
                    forwarded(&mut next, req, "wasmgate; fwd=miss").await
                }
                (None, None) => unreachable!("the request that led the fill has its response"),
            },
        }
    }
}

impl Policy for CachePolicy {
    async fn call<S: Next>(self: Arc<Self>, req: GuestRequest, mut next: S) -> Response {
        let head_only = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return forward(&mut next, req).await,
        };
        let authorized = req
            .extensions()
            .get::<Arc<crate::auth::Principal>>()
            .is_some();
        let Some(key) = self.key(req.uri(), req.headers(), authorized) else {
            self.counters.bypass.increment(1);
            return forwarded(&mut next, req, "wasmgate; fwd=bypass").await;
        };
        let asked = Asked {
            id: RequestId::of(req.extensions()),
            head_only,
            if_none_match: req.headers().get(header::IF_NONE_MATCH).cloned(),
            accepts: match &self.compression {
                Some(_) => accept_encoding(req.headers()),
                None => Vec::new(),
            },
        };
        // A hit in this process's memory, the common case, is answered before anything a fill
        // needs exists.
        if let Some(e) = self.cache.lookup(&key).await {
            self.counters.hit.increment(1);
            return self.reply(&asked, &e, "wasmgate; hit", Some(e.age()));
        }
        if head_only {
            // HEAD reads GET's entries but does not fill them: its response has no body.
            self.counters.miss.increment(1);
            return forwarded(&mut next, req, "wasmgate; fwd=miss").await;
        }
        Box::pin(self.miss(key, req, next, asked)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(vary: &[&str]) -> CachePolicy {
        CachePolicy::new(
            ResponseCache::in_memory(),
            "users",
            "0123456789ab",
            &RouteCacheConfig {
                ttl: Duration::from_secs(30),
                vary: vary.iter().map(|s| s.to_string()).collect(),
                not_found_ttl: Duration::from_secs(5),
            },
            None,
        )
    }

    /// `PolicyService` moves each policy's future into a box on every request through it, hit
    /// or not: a large one costs every request its size in copies. Held inline, the encoders of
    /// a cached entry's variants once made this one tens of KiB (a hit 37k -> 127k instructions
    /// in `bench/callgrind`); the bound leaves room for ordinary growth, not for that. (Measured
    /// in a debug build, where futures are larger: 6,064 and 1,080 bytes when this was written.)
    #[test]
    fn the_cache_and_compression_futures_stay_small() {
        use crate::body_limit::LimitedBody;
        use crate::compression::Compression;
        use crate::config::CompressionConfig;
        use crate::policy::CompressionPolicy;

        let next = tower::service_fn(|_req: GuestRequest| async {
            Ok::<_, std::convert::Infallible>(Response::new(axum::body::Body::empty()))
        });
        let request = || http::Request::new(LimitedBody::new(axum::body::Body::empty(), 1024).0);
        let compression = Arc::new(Compression::new(&CompressionConfig::default()));
        let mut cached = policy(&[]);
        cached.compression = Some(compression.clone());
        let cached = std::mem::size_of_val(&Arc::new(cached).call(request(), next));
        let compressing = CompressionPolicy::new("f", compression);
        let compressing = std::mem::size_of_val(&Arc::new(compressing).call(request(), next));
        eprintln!("futures: response cache {cached} bytes, compression {compressing} bytes");
        // 6,064 bytes (debug) while a fill's state was held inline; 1,680 with the miss boxed.
        assert!(
            cached <= 2048,
            "the response cache's future is {cached} bytes"
        );
        assert!(
            compressing <= 4096,
            "the compression layer's future is {compressing} bytes"
        );
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn kept(j: Judgement) -> Option<Duration> {
        match j {
            Judgement::Keep(d) => Some(d),
            _ => None,
        }
    }

    #[test]
    fn judges_statuses_and_cache_control() {
        let p = policy(&["accept"]);
        let ok = StatusCode::OK;
        assert_eq!(
            kept(p.judge(ok, &headers(&[]))),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            kept(p.judge(StatusCode::NOT_FOUND, &headers(&[]))),
            Some(Duration::from_secs(5))
        );
        assert!(matches!(
            p.judge(StatusCode::INTERNAL_SERVER_ERROR, &headers(&[])),
            Judgement::Shareable
        ));
        assert!(matches!(
            p.judge(StatusCode::BAD_REQUEST, &headers(&[])),
            Judgement::Shareable
        ));
        let max_age = headers(&[("cache-control", "public, max-age=7")]);
        assert_eq!(kept(p.judge(ok, &max_age)), Some(Duration::from_secs(7)));
        let s_maxage = headers(&[("cache-control", "max-age=7, s-maxage=3")]);
        assert_eq!(kept(p.judge(ok, &s_maxage)), Some(Duration::from_secs(3)));
        assert!(matches!(
            p.judge(ok, &headers(&[("cache-control", "max-age=0")])),
            Judgement::Shareable
        ));
        for private in [
            ("cache-control", "no-store"),
            ("cache-control", "Private"),
            ("cache-control", "no-cache"),
            ("set-cookie", "a=b"),
            ("vary", "*"),
            ("vary", "accept, cookie"),
        ] {
            assert!(
                matches!(p.judge(ok, &headers(&[private])), Judgement::Private),
                "{private:?}"
            );
        }
        assert!(kept(p.judge(ok, &headers(&[("vary", "Accept")]))).is_some());
    }

    #[test]
    fn if_none_match_gets_304_from_a_kept_response() {
        let snapshot = Snapshot {
            status: 200,
            headers: vec![
                ("etag".into(), b"\"7\"".to_vec()),
                ("content-type".into(), b"application/json".to_vec()),
            ],
            body: bytes::Bytes::from_static(b"{}"),
        };
        let status = "wasmgate; hit";
        for (sent, expected) in [
            ("\"7\"", 304),
            ("W/\"7\"", 304),
            ("\"6\", \"7\"", 304),
            ("*", 304),
            ("\"8\"", 200),
        ] {
            let wanted = HeaderValue::from_static(sent);
            let resp = serve(
                &snapshot,
                None,
                false,
                false,
                Some(&wanted),
                status,
                Some(1),
            );
            assert_eq!(resp.status().as_u16(), expected, "{sent}");
            assert_eq!(resp.headers()["etag"], "\"7\"");
            assert_eq!(resp.headers()["cache-status"], status);
        }
        assert_eq!(
            serve(&snapshot, None, false, false, None, status, None).status(),
            200
        );
    }

    /// Without `vary` a short URL is its own key; header values and long URLs are hashed
    /// (`#` then), so the two kinds never meet and no credential shows in a key.
    #[test]
    fn plain_keys_for_short_urls_hashed_keys_for_headers_and_long_ones() {
        let plain = policy(&[]);
        let key = |p: &CachePolicy, uri: &str, h: &[(&'static str, &'static str)]| {
            p.key(&uri.parse().expect("uri"), &headers(h), true)
                .expect("cacheable")
        };
        let k = key(&plain, "/u/1?x=1", &[("authorization", "Bearer secret")]);
        assert_eq!(k, "users:0123456789ab:/u/1?x=1");
        let long = format!("/u/{}", "x".repeat(MAX_PLAIN_KEY));
        let k = key(&plain, &long, &[]);
        assert!(k.contains(":#") && k.len() < 150, "{k}");
        let by_user = policy(&["authorization"]);
        let k = key(&by_user, "/u/1", &[("authorization", "Bearer secret")]);
        assert!(k.contains(":#") && !k.contains("secret"), "{k}");
    }

    #[test]
    fn keys_by_path_query_and_vary_only() {
        let p = policy(&["accept"]);
        let key = |uri: &str, h: &[(&'static str, &'static str)]| {
            p.key(&uri.parse().expect("uri"), &headers(h), false)
        };
        let base = key("/u/1?x=1", &[("accept", "a/b")]);
        assert!(base.is_some());
        assert_eq!(
            base,
            key("/u/1?x=1", &[("accept", "a/b"), ("user-agent", "z")])
        );
        assert_ne!(base, key("/u/1?x=2", &[("accept", "a/b")]));
        assert_ne!(base, key("/u/2?x=1", &[("accept", "a/b")]));
        assert_ne!(base, key("/u/1?x=1", &[("accept", "c/d")]));
        assert_eq!(key("/u/1", &[("authorization", "Bearer t")]), None);
        let by_user = policy(&["authorization"]);
        let auth = headers(&[("authorization", "Bearer t")]);
        assert!(
            by_user
                .key(&"/u/1".parse().expect("uri"), &auth, false)
                .is_some()
        );
        assert!(
            policy(&[])
                .key(&"/u/1".parse().expect("uri"), &auth, true)
                .is_some(),
            "a request the auth policy let in shares the cached copy"
        );
    }
}
