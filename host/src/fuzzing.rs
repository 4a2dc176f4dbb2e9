//! What the fuzz targets in `fuzz/` drive, and the regression tests replay: every parser that
//! reads bytes a client or an operator sends, each behind one function of arbitrary bytes.
//! None may panic, hang or allocate without bound; where a result can be checked against the
//! input it is (an assertion failing is a crash like any other).
//!
//! Here rather than in `fuzz/` because the parsers are private to their modules: this is the one
//! door the fuzzers use.

use std::sync::LazyLock;

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use crate::config::Manifest;
use crate::policy::CachePolicy;
use crate::router::{Match, RouteTable};

/// A fuzz target: arbitrary bytes in, a panic if something is wrong.
pub type Target = fn(&[u8]);

/// The targets by name, as `scripts/fuzz` and the regression test call them.
pub const TARGETS: &[(&str, Target)] = &[
    ("manifest", manifest),
    ("routes", routes),
    ("idempotency_key", idempotency_key),
    ("cache_control", cache_control),
    ("token", token),
    ("admin_inputs", admin_inputs),
    ("cors_and_encoding", cors_and_encoding),
];

/// A manifest as an operator writes it: parsed, then validated.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = Manifest::parse(text) {
        let _ = m.validate();
    }
}

/// Lines of `METHODS /path` build a route table; the last line, `METHOD /path`, is looked up.
/// Every literal path that was added must then be found under its own method.
pub fn routes(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines: Vec<&str> = text.lines().take(64).collect();
    let Some(probe) = lines.pop() else {
        return;
    };
    let parse = |line: &str| {
        let (methods, path) = line.split_once(' ').unwrap_or(("", line));
        let methods: Vec<Method> = methods
            .split(',')
            .filter(|m| !m.is_empty())
            .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
            .collect();
        (methods, path.to_string())
    };
    let mut table = RouteTable::default();
    let mut literal = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let (methods, path) = parse(line);
        if table
            .add(&path, &methods, i, &format!("routes[{i}]"))
            .is_ok()
            && !path.contains(['{', '}', '*'])
        {
            literal.push((methods, path));
        }
    }
    for (methods, path) in literal {
        let method = methods.first().cloned().unwrap_or(Method::GET);
        assert!(
            matches!(table.lookup(&method, &path), Match::Found { .. }),
            "{method} {path} was added but is not found"
        );
    }
    let (methods, path) = parse(probe);
    let _ = table.lookup(methods.first().unwrap_or(&Method::GET), &path);
}

fn header_map(name: header::HeaderName, data: &[u8]) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
    // Several values: one per line, as repeated fields.
    for value in data.split(|b| *b == b'\n').take(8) {
        headers.append(name.clone(), HeaderValue::from_bytes(value).ok()?);
    }
    Some(headers)
}

/// The `Idempotency-Key` header: a key it accepts is 1 to 255 characters of what was sent.
pub fn idempotency_key(data: &[u8]) {
    let Some(headers) = header_map(header::HeaderName::from_static("idempotency-key"), data) else {
        return;
    };
    if let Ok(Some(key)) = crate::policy::idempotency::client_key(&headers) {
        assert!(!key.is_empty() && key.len() <= 255, "accepted {key:?}");
        assert!(
            data.windows(key.len()).any(|w| w == key.as_bytes()),
            "{key:?} is not what was sent"
        );
    }
}

/// `Cache-Control` and `Vary` on a guest's response, and a request's URL and headers as the
/// response cache keys them.
pub fn cache_control(data: &[u8]) {
    static POLICY: LazyLock<CachePolicy> = LazyLock::new(|| {
        CachePolicy::new(
            crate::response_cache::ResponseCache::in_memory(),
            "fuzz",
            "0",
            &crate::config::RouteCacheConfig {
                ttl: std::time::Duration::from_secs(30),
                vary: vec!["accept-language".into()],
                not_found_ttl: std::time::Duration::from_secs(5),
            },
            None,
        )
    });
    let (first, rest) = data.split_at(data.len().min(1));
    let status = match first.first() {
        Some(b) if b % 2 == 0 => StatusCode::OK,
        _ => StatusCode::NOT_FOUND,
    };
    if let Some(headers) = header_map(header::CACHE_CONTROL, rest) {
        let mut both = headers.clone();
        if let Ok(v) = HeaderValue::from_bytes(rest) {
            both.insert(header::VARY, v);
        }
        let _ = POLICY.judge(status, &headers);
        let _ = POLICY.judge(status, &both);
    }
    if let Ok(uri) = http::Uri::try_from(rest)
        && let Some(headers) = header_map(header::ACCEPT_LANGUAGE, rest)
    {
        let _ = POLICY.key(&uri, &headers, false);
        let _ = POLICY.key(&uri, &headers, true);
    }
}

/// An `Authorization` header, and the token in it read as far as the host reads it before any
/// signature is checked (the header's algorithm and key id, the issuer that picks the keys).
pub fn token(data: &[u8]) {
    let Some(headers) = header_map(header::AUTHORIZATION, data) else {
        return;
    };
    if let crate::policy::auth::Credentials::Bearer(token) =
        crate::policy::auth::credentials(&headers)
    {
        assert!(!token.is_empty() && token == token.trim());
        let _ = jsonwebtoken::decode_header(token);
        let _ = crate::auth::verify::peek_issuer(token);
    }
}

/// What the admin API reads before it changes anything: an upload's query (a version's
/// settings, checked against a function's), a deployment's JSON body, its sticky key and
/// `If-Match`.
pub fn admin_inputs(data: &[u8]) {
    static FUNCTION: LazyLock<crate::config::FunctionConfig> = LazyLock::new(|| {
        Manifest::parse("[functions.f]\nwasm = \"f.wasm\"\ncapabilities = [\"cache\"]\n")
            .expect("a valid manifest")
            .functions
            .remove("f")
            .expect("f")
    });
    crate::admin::fuzz_inputs(data, &FUNCTION);
}

/// Three lines: a route's CORS origins (space-separated), a request's `Origin` and its
/// `Accept-Encoding`. A policy that builds answers a preflight and decorates an answer; an
/// exact origin it lists is allowed for itself; a negotiated encoding is one that was offered.
pub fn cors_and_encoding(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.lines();
    let origins: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split(' ')
        .filter(|o| !o.is_empty())
        .take(16)
        .map(String::from)
        .collect();
    let (origin, accept) = (lines.next(), lines.next());
    let cfg = crate::config::CorsConfig {
        origins: origins.clone(),
        methods: Vec::new(),
        headers: vec!["content-type".into()],
        expose: Vec::new(),
        credentials: false,
        max_age: std::time::Duration::from_secs(60),
    };
    if let Ok(cors) = crate::cors::Cors::new("fuzz", &cfg, &[]) {
        let mut request = HeaderMap::new();
        if let Some(o) = origin.and_then(|o| HeaderValue::from_str(o).ok()) {
            request.insert(header::ORIGIN, o);
        }
        request.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("GET"),
        );
        let _ = cors.preflight(&request);
        let mut answer = HeaderMap::new();
        cors.decorate(request.get(header::ORIGIN), &mut answer);
        for exact in origins.iter().filter(|o| *o != "*" && !o.contains('*')) {
            let Ok(value) = HeaderValue::from_str(exact) else {
                continue;
            };
            let mut answer = HeaderMap::new();
            cors.decorate(Some(&value), &mut answer);
            assert!(
                answer.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN),
                "{exact} is listed but not allowed"
            );
        }
    }
    if let Some(a) = accept.and_then(|a| HeaderValue::from_str(a).ok()) {
        let offered = [
            crate::compression::Encoding::Gzip,
            crate::compression::Encoding::Zstd,
        ];
        if let Some(e) = crate::compression::negotiate([&a], &offered) {
            assert!(offered.contains(&e), "{e:?} was not offered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input a fuzzer ever crashed on (`fuzz/regressions/<target>/`), and the seeds it
    /// starts from (`fuzz/seeds/<target>/`), replayed: a crash found once stays fixed.
    #[test]
    fn what_the_fuzzers_found_stays_fixed() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        for (name, target) in TARGETS {
            let mut replayed = 0;
            for dir in ["regressions", "seeds"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.expect("entry").path();
                    target(&std::fs::read(&path).expect("readable"));
                    replayed += 1;
                }
            }
            assert!(replayed > 0, "no seeds for {name} under {root:?}");
        }
    }

    #[test]
    fn a_route_that_was_added_is_found() {
        routes(b"GET,POST /users\n/health\nGET /users/{id}\nGET /users");
        idempotency_key(b"\"abc\"");
        token(b"Bearer a.eyJpc3MiOiJ4In0.c");
    }
}
