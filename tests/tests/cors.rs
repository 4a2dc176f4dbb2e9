//! CORS per route, black-box: preflights answered by the host without an instance, allow
//! headers only for allowed origins, per request even on a cache hit, on refusals too; and a
//! real browser (headless Chromium) calling the users API from an allowed and a disallowed
//! origin.

use std::time::Duration;

use wasmgate_tests::{Server, check};

const MANIFEST: &str = r#"
[functions.echo]
wasm = "{wasm:echo}"
max_body = "1KiB"

[[routes]]
path = "/items"
methods = ["GET", "POST"]
function = "echo"
cors = { origins = ["http://localhost:5173", "https://*.example.com"], credentials = true, max_age = "1h" }

[[routes]]
path = "/cached"
methods = ["GET"]
function = "echo"
cache = { ttl = "60s" }
cors = { origins = ["http://localhost:5173", "https://*.example.com"] }

[[routes]]
path = "/public"
function = "echo"
cors = { origins = ["*"] }

[[routes]]
path = "/private"
methods = ["GET"]
function = "echo"
"#;

const ALLOWED: &str = "http://localhost:5173";

async fn send(
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new().request(method, url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    req.send().await.expect("request")
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

fn varies_on_origin(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim().eq_ignore_ascii_case("origin"))
}

async fn guest_runs(s: &Server) -> f64 {
    s.metric("wasmgate_guest_runs_total", r#"function="echo""#)
        .await
}

#[tokio::test]
async fn preflights_are_answered_by_the_host_without_an_instance() {
    let s = Server::start(MANIFEST);
    // One ordinary request first, so the guest-run counter exists.
    send(reqwest::Method::GET, &s.url("/items"), &[], None).await;
    let runs = guest_runs(&s).await;
    assert!(runs >= 1.0);
    let preflight = |origin: &'static str, method: &'static str| {
        let url = s.url("/items");
        async move {
            send(
                reqwest::Method::OPTIONS,
                &url,
                &[
                    ("origin", origin),
                    ("access-control-request-method", method),
                    (
                        "access-control-request-headers",
                        "content-type, idempotency-key",
                    ),
                ],
                None,
            )
            .await
        }
    };

    let ok = preflight(ALLOWED, "POST").await;
    assert_eq!(ok.status(), 204);
    assert_eq!(header(&ok, "access-control-allow-origin"), Some(ALLOWED));
    assert_eq!(
        header(&ok, "access-control-allow-methods"),
        Some("GET, POST")
    );
    let allowed_headers = header(&ok, "access-control-allow-headers").expect("allow headers");
    for h in ["content-type", "idempotency-key", "authorization"] {
        assert!(allowed_headers.contains(h), "{allowed_headers}");
    }
    assert_eq!(
        header(&ok, "access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(header(&ok, "access-control-max-age"), Some("3600"));
    assert!(varies_on_origin(&ok));
    assert!(header(&ok, "x-request-id").is_some());

    let subdomain = preflight("https://app.example.com", "GET").await;
    assert_eq!(
        header(&subdomain, "access-control-allow-origin"),
        Some("https://app.example.com")
    );

    let other = preflight("http://evil.test", "POST").await;
    assert_eq!(other.status(), 204);
    assert!(
        other
            .headers()
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-")),
        "a disallowed origin learns nothing: {:?}",
        other.headers()
    );

    // A method the path does not serve: the router's 405, which the browser takes as a refusal.
    let put = preflight(ALLOWED, "PUT").await;
    assert_eq!(put.status(), 405);
    assert!(header(&put, "access-control-allow-origin").is_none());
    // A route without CORS: the preflight is an OPTIONS like any other (405 here).
    let private = send(
        reqwest::Method::OPTIONS,
        &s.url("/private"),
        &[
            ("origin", ALLOWED),
            ("access-control-request-method", "GET"),
        ],
        None,
    )
    .await;
    assert_eq!(private.status(), 405);

    assert_eq!(
        guest_runs(&s).await,
        runs,
        "no preflight started an instance"
    );
    let preflights = "wasmgate_cors_preflights_total";
    assert_eq!(s.metric(preflights, r#"result="allowed""#).await, 2.0);
    assert_eq!(s.metric(preflights, r#"result="refused""#).await, 1.0);
}

#[tokio::test]
async fn answers_carry_allow_headers_for_allowed_origins_only() {
    let s = Server::start(MANIFEST);
    let get = |origin: Option<&'static str>| {
        let url = s.url("/items");
        async move {
            let headers: Vec<(&str, &str)> = origin.map(|o| ("origin", o)).into_iter().collect();
            send(reqwest::Method::GET, &url, &headers, None).await
        }
    };
    let ok = get(Some(ALLOWED)).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(header(&ok, "access-control-allow-origin"), Some(ALLOWED));
    assert_eq!(
        header(&ok, "access-control-allow-credentials"),
        Some("true")
    );
    let exposed = header(&ok, "access-control-expose-headers").expect("exposed");
    assert!(
        exposed.contains("etag") && exposed.contains("x-request-id"),
        "{exposed}"
    );
    assert!(varies_on_origin(&ok));

    // Served (the standard leaves blocking to the browser), but without a grant.
    let other = get(Some("http://evil.test")).await;
    assert_eq!(other.status(), 200);
    assert!(header(&other, "access-control-allow-origin").is_none());
    assert!(header(&other, "access-control-allow-credentials").is_none());
    assert!(varies_on_origin(&other));
    let none = get(None).await;
    assert!(header(&none, "access-control-allow-origin").is_none());
    assert!(varies_on_origin(&none));

    // A refusal from the host carries the grant too, so a page can read why.
    let too_big = send(
        reqwest::Method::POST,
        &s.url("/items"),
        &[("origin", ALLOWED), ("content-type", "application/json")],
        Some("x".repeat(4096)),
    )
    .await;
    assert_eq!(too_big.status(), 413);
    assert_eq!(
        header(&too_big, "access-control-allow-origin"),
        Some(ALLOWED)
    );

    // `*`: the same answer for every origin, so nothing to vary on.
    let public = send(
        reqwest::Method::GET,
        &s.url("/public"),
        &[("origin", "http://anyone.test")],
        None,
    )
    .await;
    assert_eq!(header(&public, "access-control-allow-origin"), Some("*"));
    assert!(!varies_on_origin(&public));
    // An OPTIONS that is not a preflight still reaches a function that serves OPTIONS.
    let options = send(reqwest::Method::OPTIONS, &s.url("/public"), &[], None).await;
    assert_eq!(options.status(), 200);
    let body: serde_json::Value = options.json().await.expect("json");
    assert_eq!(body["method"], "OPTIONS");
}

/// The cache keeps the guest's answer without any origin's headers; each hit gets its own.
#[tokio::test]
async fn a_cached_answer_never_carries_another_origins_grant() {
    let s = Server::start(MANIFEST);
    let get = |origin: &'static str| {
        let url = s.url("/cached?x=1");
        async move { send(reqwest::Method::GET, &url, &[("origin", origin)], None).await }
    };
    let first = get(ALLOWED).await;
    assert_eq!(
        header(&first, "cache-status"),
        Some("wasmgate; fwd=miss; stored")
    );
    assert_eq!(header(&first, "access-control-allow-origin"), Some(ALLOWED));
    let sub = get("https://shop.example.com").await;
    assert_eq!(header(&sub, "cache-status"), Some("wasmgate; hit"));
    assert_eq!(
        header(&sub, "access-control-allow-origin"),
        Some("https://shop.example.com")
    );
    let other = get("http://evil.test").await;
    assert_eq!(header(&other, "cache-status"), Some("wasmgate; hit"));
    assert!(header(&other, "access-control-allow-origin").is_none());
    assert!(varies_on_origin(&other));
}

#[test]
fn policies_browsers_would_not_honour_are_refused_at_load() {
    for (cors, says) in [
        (
            r#"{ origins = ["http://localhost:5173/"] }"#,
            "no trailing `/`",
        ),
        (
            r#"{ origins = ["*"], credentials = true }"#,
            "credentials = true cannot go with",
        ),
        (
            r#"{ origins = ["https://a.com"], methods = ["DELETE"] }"#,
            "does not serve `DELETE`",
        ),
        (r#"{ origins = [] }"#, "origins is empty"),
        (r#"{ origin = ["https://a.com"] }"#, "origin"),
    ] {
        let manifest = format!(
            "[functions.echo]\nwasm = \"{{wasm:echo}}\"\n[[routes]]\npath = \"/x\"\nmethods = [\"GET\"]\nfunction = \"echo\"\ncors = {cors}\n"
        );
        let (ok, out) = check(&manifest);
        assert!(!ok, "{cors} must be refused");
        assert!(out.contains(says), "{cors}: {out}");
    }
}

/// Headless Chromium on a page from an allowed origin creates a user with `fetch` and reads the
/// answer; the same page from a disallowed origin is blocked by the browser, and its request
/// never reaches the function.
#[tokio::test]
async fn a_browser_calls_the_users_api_only_from_an_allowed_origin() {
    let chromium = chromium();
    let mut allowed = PageServer::start().await;
    let mut blocked = PageServer::start().await;
    let manifest = wasmgate_tests::users_manifest().replacen(
        "path = \"/v1/users\"\nmethods = [\"POST\"]\nfunction = \"users\"\n",
        &format!(
            "path = \"/v1/users\"\nmethods = [\"POST\"]\nfunction = \"users\"\ncors = {{ origins = [\"{}\"] }}\n",
            allowed.origin()
        ),
        1,
    );
    assert!(manifest.contains("cors = "), "the POST route was found");
    let (s, _dir, _db) = wasmgate_tests::start_embedded(&manifest);
    let api = s.url("/v1/users");

    let report = allowed.visit(&chromium, &api, "allowed@example.com").await;
    assert!(
        report.starts_with("ok 201 allowed@example.com"),
        "from the allowed origin: {report}"
    );
    let report = blocked.visit(&chromium, &api, "blocked@example.com").await;
    assert!(
        report.starts_with("blocked"),
        "from a disallowed origin: {report}"
    );
    // The browser stopped at the preflight: the POST was never sent.
    let login = reqwest::Client::new()
        .post(s.url("/v1/login"))
        .json(&serde_json::json!({"email": "blocked@example.com", "password": "correct horse battery"}))
        .send()
        .await
        .expect("login");
    assert_eq!(login.status(), 401, "no such user was created");
}

fn chromium() -> std::path::PathBuf {
    let path = std::path::PathBuf::from(
        std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
    );
    assert!(
        path.exists(),
        "{} not found: the browser test needs Debian's chromium (scripts/test installs it)",
        path.display()
    );
    path
}

/// Serves the calling page on its own port (its own origin) and takes the page's report.
struct PageServer {
    port: u16,
    reports: tokio::sync::mpsc::Receiver<String>,
    _task: tokio::task::JoinHandle<()>,
}

impl PageServer {
    async fn start() -> Self {
        use axum::routing::{get, post};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (tx, reports) = tokio::sync::mpsc::channel(4);
        let app = axum::Router::new()
            .route("/", get(|| async { axum::response::Html(PAGE) }))
            .route(
                "/report",
                post(move |body: String| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(body).await;
                    }
                }),
            );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            port,
            reports,
            _task: task,
        }
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Opens the page in Chromium, which calls `api`; returns what the page reported.
    async fn visit(&mut self, chromium: &std::path::Path, api: &str, email: &str) -> String {
        let profile = tempfile::tempdir().expect("profile dir");
        let url = format!(
            "{}/?api={}&email={}",
            self.origin(),
            api.replace(':', "%3A").replace('/', "%2F"),
            email.replace('@', "%40")
        );
        let mut browser = tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(&url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        let report = tokio::time::timeout(Duration::from_secs(60), self.reports.recv())
            .await
            .expect("the page reported within 60 s")
            .expect("a report");
        let _ = browser.kill().await;
        report
    }
}

/// Creates a user on the API named in its query with `fetch` (JSON, so the browser sends a
/// preflight) and reports what it could read, or that it was blocked, to its own origin.
const PAGE: &str = r#"<!doctype html>
<html><body><script>
const q = new URLSearchParams(location.search);
const report = (text) => fetch("/report", { method: "POST", body: text });
fetch(q.get("api"), {
  method: "POST",
  headers: { "content-type": "application/json" },
  body: JSON.stringify({ email: q.get("email"), name: "From A Browser", password: "correct horse battery" }),
})
  .then(async (r) => { const j = await r.json(); return report(`ok ${r.status} ${j.email}`); })
  .catch((e) => report(`blocked ${e}`));
</script></body></html>
"#;
