//! CORS per route (the Fetch standard's CORS protocol), answered by the host.
//!
//! A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is routed by the
//! method it asks about, and answered here: 204, no policy, no instance. On every other request
//! of a route with CORS the allow headers are added to whatever answers it (the guest, a cache
//! hit, a refusal from a policy, so a page can read why it was refused), after the response
//! cache: an entry holds no origin's headers, and each hit gets its own. A disallowed origin gets
//! no CORS headers at all; the request itself is served as usual (the browser withholds the
//! answer from the page), as the standard expects of a server.
//!
//! Not tower-http's `CorsLayer`: a preflight's route is chosen by the method it names, before
//! any stack (the route table refuses `OPTIONS` on a route that does not serve it); an `OPTIONS`
//! that is not a preflight must still reach a function that serves `OPTIONS`; and a policy an
//! operator wrote is refused when the manifest loads, not by a panic when it is first used.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;

use crate::config::{CorsConfig, METHODS};

/// Methods an every-method route allows by default.
const ANY_ROUTE_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE";

#[derive(Debug, Clone, PartialEq)]
enum Origins {
    /// `*`: any origin, the same answer for all.
    Any,
    List(Vec<Rule>),
}

#[derive(Debug, Clone, PartialEq)]
enum Rule {
    /// `https://app.example.com`, lowercase.
    Exact(String),
    /// `https://*.example.com[:port]`: `prefix` is `https://`, `suffix` `.example.com[:port]`.
    Subdomains { prefix: String, suffix: String },
}

impl Rule {
    fn parse(origin: &str) -> Result<Self, String> {
        let hint = "write it as scheme://host[:port], e.g. \"https://app.example.com\" or \"https://*.example.com\"";
        // Browsers send origins in ASCII (an internationalized name as punycode), so any other
        // byte could never match (found by the `cors_and_encoding` fuzz target).
        if !origin.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "cors origin `{origin}` has a space or a character outside ASCII; write an internationalized domain in its punycode form (xn--...)"
            ));
        }
        let lower = origin.to_ascii_lowercase();
        let Some((scheme, authority)) = lower.split_once("://") else {
            return Err(format!("cors origin `{origin}` has no scheme; {hint}"));
        };
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !scheme_ok {
            return Err(format!(
                "cors origin `{origin}`: `{scheme}` is not a scheme; {hint}"
            ));
        }
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "cors origin `{origin}` is not an origin (no path, no trailing `/`); {hint}"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (h, Some(p)),
            _ => (authority, None),
        };
        if let Some(p) = port
            && p.parse::<u16>().is_err()
        {
            return Err(format!(
                "cors origin `{origin}`: `{p}` is not a port; {hint}"
            ));
        }
        match host.strip_prefix("*.") {
            Some(domain) if !domain.is_empty() && !domain.contains('*') => Ok(Self::Subdomains {
                prefix: format!("{scheme}://"),
                suffix: authority[1..].to_string(),
            }),
            _ if host.contains('*') => Err(format!(
                "cors origin `{origin}`: `*` may only stand for the subdomains at the start of the host (\"https://*.example.com\")"
            )),
            _ => Ok(Self::Exact(lower)),
        }
    }

    fn allows(&self, origin: &str) -> bool {
        match self {
            Self::Exact(o) => origin.eq_ignore_ascii_case(o),
            Self::Subdomains { prefix, suffix } => {
                let origin = origin.to_ascii_lowercase();
                let Some(sub) = origin
                    .strip_prefix(prefix.as_str())
                    .and_then(|rest| rest.strip_suffix(suffix.as_str()))
                else {
                    return false;
                };
                !sub.is_empty()
                    && sub.split('.').all(|label| {
                        !label.is_empty()
                            && label
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    })
            }
        }
    }
}

/// Which request headers a preflight's answer allows.
#[derive(Debug)]
enum AllowHeaders {
    /// The configured ones (`None`: only the safelisted).
    Listed(Option<HeaderValue>),
    /// `["*"]`: whatever the preflight asks for (also with credentials, where a literal `*`
    /// would not cover `Authorization`).
    Requested,
}

/// One route's CORS policy, with its answers' header values made once.
#[derive(Debug)]
pub struct Cors {
    origins: Origins,
    credentials: bool,
    allow_headers: AllowHeaders,
    allow_methods: HeaderValue,
    expose: Option<HeaderValue>,
    max_age: HeaderValue,
    preflights: [metrics::Counter; 2],
}

/// The method a preflight asks about, when `headers` (of an `OPTIONS`) make one.
pub fn preflight_method(method: &Method, headers: &HeaderMap) -> Option<Method> {
    if method != Method::OPTIONS || !headers.contains_key(header::ORIGIN) {
        return None;
    }
    let asked = headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(asked.as_bytes()).ok()
}

fn list(values: &[String]) -> Option<HeaderValue> {
    (!values.is_empty())
        .then(|| HeaderValue::from_str(&values.join(", ")).ok())
        .flatten()
}

impl Cors {
    /// The policy for a route serving `route_methods` (empty: every method), or every problem
    /// with it.
    pub fn new(
        function: &str,
        cfg: &CorsConfig,
        route_methods: &[String],
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let origins = if cfg.origins.iter().any(|o| o == "*") {
            if cfg.origins.len() > 1 {
                problems
                    .push("cors origins: `*` already allows every origin; list it alone".into());
            }
            if cfg.credentials {
                problems.push(
                    "cors: credentials = true cannot go with origins = [\"*\"] (browsers refuse it); list the origins"
                        .into(),
                );
            }
            Origins::Any
        } else {
            if cfg.origins.is_empty() {
                problems.push("cors origins is empty; list the origins allowed to call".into());
            }
            Origins::List(
                cfg.origins
                    .iter()
                    .filter_map(|o| Rule::parse(o).map_err(|e| problems.push(e)).ok())
                    .collect(),
            )
        };
        let upper = |m: &String| m.to_ascii_uppercase();
        let served: Vec<String> = route_methods.iter().map(upper).collect();
        for m in cfg.methods.iter().map(upper) {
            if !METHODS.contains(&m.as_str()) {
                problems.push(format!(
                    "cors methods: `{m}` is not a method wasmgate routes"
                ));
            } else if !served.is_empty() && !served.contains(&m) {
                problems.push(format!(
                    "cors methods: the route does not serve `{m}`; list only its methods (or leave `methods` out)"
                ));
            }
        }
        let methods: Vec<String> = if cfg.methods.is_empty() {
            served
        } else {
            cfg.methods.iter().map(upper).collect()
        };
        let wildcard = cfg.headers.iter().any(|h| h == "*");
        for h in cfg.headers.iter().chain(&cfg.expose) {
            if h != "*" && HeaderName::from_bytes(h.as_bytes()).is_err() {
                problems.push(format!("cors: `{h}` is not a header name"));
            }
        }
        if cfg.expose.iter().any(|h| h == "*") {
            problems.push("cors expose: list the headers a page may read (`*` is not honoured with credentials, and hides nothing without them)".into());
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let allow_methods = if methods.is_empty() {
            HeaderValue::from_static(ANY_ROUTE_METHODS)
        } else {
            HeaderValue::from_str(&methods.join(", ")).expect("methods are tokens")
        };
        let counter = |result: &'static str| metrics::counter!("wasmgate_cors_preflights_total", "function" => function.to_string(), "result" => result);
        Ok(Self {
            origins,
            credentials: cfg.credentials,
            allow_headers: if wildcard {
                AllowHeaders::Requested
            } else {
                AllowHeaders::Listed(list(&cfg.headers))
            },
            allow_methods,
            expose: list(&cfg.expose),
            max_age: HeaderValue::from(cfg.max_age.as_secs()),
            preflights: [counter("allowed"), counter("refused")],
        })
    }

    /// `Access-Control-Allow-Origin`'s value for a request from `origin`, if it may call.
    fn allow_origin(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        match &self.origins {
            Origins::Any => Some(HeaderValue::from_static("*")),
            Origins::List(rules) => {
                let origin = origin?;
                let text = origin.to_str().ok()?;
                rules.iter().any(|r| r.allows(text)).then(|| origin.clone())
            }
        }
    }

    /// The host's answer to a preflight: 204, with the allow headers when the origin may call.
    pub fn preflight(&self, headers: &HeaderMap) -> Response {
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let out = resp.headers_mut();
        out.insert(
            header::VARY,
            HeaderValue::from_static(
                "origin, access-control-request-method, access-control-request-headers",
            ),
        );
        let Some(origin) = self.allow_origin(headers.get(header::ORIGIN)) else {
            self.preflights[1].increment(1);
            return resp;
        };
        self.preflights[0].increment(1);
        out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        out.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        let allowed = match &self.allow_headers {
            AllowHeaders::Listed(listed) => listed.as_ref(),
            AllowHeaders::Requested => headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS),
        };
        if let Some(allowed) = allowed {
            out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed.clone());
        }
        if self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        out.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        resp
    }

    /// Adds the CORS headers for a request from `origin` to its response, replacing any the
    /// guest or a cached entry carried: on this route the host alone answers for CORS.
    pub fn decorate(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        for name in [
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
        ] {
            headers.remove(name);
        }
        if self.origins != Origins::Any {
            // The answer depends on the origin: a shared cache must keep them apart.
            headers.append(header::VARY, HeaderValue::from_static("origin"));
        }
        let Some(allowed) = self.allow_origin(origin) else {
            return;
        };
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &self.expose {
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(origins: &[&str]) -> CorsConfig {
        CorsConfig {
            origins: origins.iter().map(|s| s.to_string()).collect(),
            methods: vec![],
            headers: vec!["content-type".into(), "authorization".into()],
            expose: vec!["etag".into()],
            credentials: false,
            max_age: Duration::from_secs(600),
        }
    }

    fn cors(origins: &[&str]) -> Cors {
        Cors::new("f", &cfg(origins), &["GET".into(), "POST".into()]).expect("valid")
    }

    #[test]
    fn matches_exact_origins_and_subdomain_patterns() {
        let c = cors(&["http://localhost:5173", "https://*.example.com"]);
        let allowed = |o: &'static str| c.allow_origin(Some(&HeaderValue::from_static(o)));
        for yes in [
            "http://localhost:5173",
            "HTTP://LOCALHOST:5173",
            "https://a.example.com",
            "https://a.b-c.example.com",
        ] {
            assert_eq!(
                allowed(yes).as_ref().map(|v| v.to_str().ok()),
                Some(Some(yes)),
                "{yes}"
            );
        }
        for no in [
            "http://localhost:5174",
            "https://localhost:5173",
            "http://localhost",
            "https://example.com",
            "https://evilexample.com",
            "https://.example.com",
            "https://a..example.com",
            "https://a.example.com:8443",
            "https://a.example.com.evil.net",
            "http://a.example.com",
            "null",
            "",
        ] {
            assert_eq!(allowed(no), None, "{no}");
        }
        assert_eq!(c.allow_origin(None), None);
        let port = cors(&["https://*.example.com:8443"]);
        assert!(
            port.allow_origin(Some(&HeaderValue::from_static(
                "https://a.example.com:8443"
            )))
            .is_some()
        );
        assert!(
            port.allow_origin(Some(&HeaderValue::from_static("https://a.example.com")))
                .is_none()
        );
        let any = cors(&["*"]);
        assert_eq!(any.allow_origin(None).expect("any"), "*");
    }

    #[test]
    fn refuses_policies_browsers_would_not_honour() {
        let problems = |c: CorsConfig, methods: &[&str]| {
            let methods: Vec<String> = methods.iter().map(|s| s.to_string()).collect();
            Cors::new("f", &c, &methods)
                .expect_err("refused")
                .join("\n")
        };
        for (origin, says) in [
            ("http://localhost:5173/", "no trailing"),
            ("localhost:5173", "no scheme"),
            ("https://a.*.example.com", "subdomains at the start"),
            ("https://example.com:http", "not a port"),
            ("1http://x", "not a scheme"),
            ("https://bücher.example", "punycode"),
        ] {
            let p = problems(cfg(&[origin]), &[]);
            assert!(p.contains(says), "{origin}: {p}");
        }
        assert!(problems(cfg(&[]), &[]).contains("empty"));
        let mut creds = cfg(&["*"]);
        creds.credentials = true;
        assert!(problems(creds, &[]).contains("credentials"));
        let mut methods = cfg(&["https://a.com"]);
        methods.methods = vec!["delete".into()];
        assert!(problems(methods.clone(), &["GET"]).contains("does not serve `DELETE`"));
        methods.methods = vec!["FETCH".into()];
        assert!(problems(methods, &[]).contains("not a method"));
        let mut header = cfg(&["https://a.com"]);
        header.headers = vec!["bad header".into()];
        assert!(problems(header, &[]).contains("not a header name"));
    }

    fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn answers_preflights_only_for_allowed_origins() {
        let c = cors(&["http://localhost:5173"]);
        let ok = c.preflight(&request(&[
            ("origin", "http://localhost:5173"),
            ("access-control-request-method", "POST"),
        ]));
        assert_eq!(ok.status(), StatusCode::NO_CONTENT);
        let h = ok.headers();
        assert_eq!(h["access-control-allow-origin"], "http://localhost:5173");
        assert_eq!(h["access-control-allow-methods"], "GET, POST");
        assert_eq!(
            h["access-control-allow-headers"],
            "content-type, authorization"
        );
        assert_eq!(h["access-control-max-age"], "600");
        assert!(h["vary"].to_str().expect("text").contains("origin"));
        assert!(!h.contains_key("access-control-allow-credentials"));
        let refused = c.preflight(&request(&[
            ("origin", "http://evil.test"),
            ("access-control-request-method", "POST"),
        ]));
        assert_eq!(refused.status(), StatusCode::NO_CONTENT);
        assert!(
            refused
                .headers()
                .keys()
                .all(|k| !k.as_str().starts_with("access-control-"))
        );
        let mut any_header = cfg(&["http://localhost:5173"]);
        any_header.headers = vec!["*".into()];
        any_header.credentials = true;
        let c = Cors::new("f", &any_header, &[]).expect("valid");
        let ok = c.preflight(&request(&[
            ("origin", "http://localhost:5173"),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "authorization, x-trace"),
        ]));
        let h = ok.headers();
        assert_eq!(h["access-control-allow-headers"], "authorization, x-trace");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["access-control-allow-methods"], ANY_ROUTE_METHODS);
    }

    #[test]
    fn decorates_answers_per_origin_and_replaces_the_guests() {
        let c = cors(&["http://localhost:5173"]);
        let mut h = request(&[("access-control-allow-origin", "*")]);
        c.decorate(
            Some(&HeaderValue::from_static("http://localhost:5173")),
            &mut h,
        );
        assert_eq!(h["access-control-allow-origin"], "http://localhost:5173");
        assert_eq!(h["access-control-expose-headers"], "etag");
        assert_eq!(h["vary"], "origin");
        let mut h = request(&[("access-control-allow-origin", "*")]);
        c.decorate(Some(&HeaderValue::from_static("http://evil.test")), &mut h);
        assert!(!h.contains_key("access-control-allow-origin"));
        assert_eq!(h["vary"], "origin");
        let mut h = HeaderMap::new();
        cors(&["*"]).decorate(None, &mut h);
        assert_eq!(h["access-control-allow-origin"], "*");
        assert!(!h.contains_key("vary"), "one answer for every origin");
    }

    #[test]
    fn only_options_with_origin_and_a_method_is_a_preflight() {
        let asked = request(&[
            ("origin", "http://a.test"),
            ("access-control-request-method", "PATCH"),
        ]);
        assert_eq!(
            preflight_method(&Method::OPTIONS, &asked),
            Some(Method::PATCH)
        );
        assert_eq!(preflight_method(&Method::GET, &asked), None);
        let no_origin = request(&[("access-control-request-method", "PATCH")]);
        assert_eq!(preflight_method(&Method::OPTIONS, &no_origin), None);
        let plain = request(&[("origin", "http://a.test")]);
        assert_eq!(preflight_method(&Method::OPTIONS, &plain), None);
    }
}
