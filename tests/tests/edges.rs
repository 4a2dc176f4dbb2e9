//! Behaviour at the edges, against the real binary: every failure is a problem+json answer for
//! that request alone, and the host keeps serving everything else.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmgate_tests::{Server, expect_problem};

const MANIFEST: &str = r#"
[functions.hello]
wasm = "{wasm:hello}"

[functions.echo]
wasm = "{wasm:echo}"
max_body = "1KiB"
timeout = "2s"

[functions.trap]
wasm = "{wasm:trap}"

[functions.spin]
wasm = "{wasm:spin}"
timeout = "500ms"

[functions.memhog]
wasm = "{wasm:memhog}"
memory = "8MiB"

[[routes]]
path = "/hello"
methods = ["GET"]
function = "hello"

[[routes]]
path = "/hello/{name}"
methods = ["GET"]
function = "hello"

[[routes]]
path = "/echo/*"
methods = ["POST", "PUT"]
function = "echo"

[[routes]]
path = "/users/{id}/echo"
function = "echo"

[[routes]]
path = "/trap"
function = "trap"

[[routes]]
path = "/spin"
function = "spin"

[[routes]]
path = "/memhog"
function = "memhog"
"#;

fn server() -> Server {
    Server::start(MANIFEST)
}

async fn hello_ok(client: &reqwest::Client, s: &Server) {
    let resp = client.get(s.url("/hello")).send().await.expect("hello");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["message"], "hello, world");
}

#[tokio::test]
async fn serves_a_function_with_a_request_id() {
    let s = server();
    let resp = reqwest::get(s.url("/hello/ada")).await.expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.headers()["x-request-id"].len(), 32);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body, serde_json::json!({"message": "hello, ada"}));
}

#[tokio::test]
async fn head_is_answered_by_a_get_route() {
    let s = server();
    let resp = reqwest::Client::new()
        .head(s.url("/hello"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.expect("body").len(), 0);
}

#[tokio::test]
async fn unknown_route_is_404() {
    let s = server();
    let resp = reqwest::get(s.url("/nowhere")).await.expect("request");
    expect_problem(resp, 404, "route-not-found").await;
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    let s = server();
    let resp = reqwest::Client::new()
        .delete(s.url("/hello"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.headers()["allow"], "GET, HEAD");
    expect_problem(resp, 405, "method-not-allowed").await;
}

#[tokio::test]
async fn route_parameters_reach_the_guest_and_cannot_be_forged() {
    let s = server();
    let client = reqwest::Client::new();
    let resp = client
        .put(s.url("/users/42/echo"))
        .header("wasmgate-param-id", "forged")
        .header("wasmgate-param-admin", "true")
        .body("abc")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(
        body["headers"],
        serde_json::json!({"wasmgate-param-id": "42", "wasmgate-route": "/users/{id}/echo"})
    );
    assert_eq!(body["body_len"], 3);
    // A prefix route matches below its prefix and the prefix with its trailing slash, gets no
    // parameters, and is named as written.
    for path in ["/echo/a/b", "/echo/"] {
        let resp = client
            .post(s.url(path))
            .body("x")
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200, "{path}");
        let body: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(
            body["headers"],
            serde_json::json!({"wasmgate-route": "/echo/*"}),
            "{path}"
        );
    }
}

#[tokio::test]
async fn guest_trap_is_500_without_internals_and_logged_with_the_request_id() {
    let s = server();
    let client = reqwest::Client::new();
    let resp = client.get(s.url("/trap")).send().await.expect("request");
    let text_check = resp.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    let body = expect_problem(resp, 500, "function-failed").await;
    let raw = body.to_string();
    assert!(
        !raw.contains("hunter2") && !raw.contains("secret-guest-internal"),
        "{raw}"
    );
    // The details are in the log, on the line that carries the request id.
    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains(&text_check))
        .unwrap_or_else(|| panic!("no log line for {text_check}:\n{log}"));
    assert!(line.contains("secret-guest-internal"), "{line}");
    assert!(line.contains("function=trap"), "{line}");
    hello_ok(&client, &s).await;
}

#[tokio::test]
async fn spinning_guest_is_504_within_its_timeout_and_others_keep_serving() {
    let s = server();
    let client = reqwest::Client::new();
    let spin = {
        let client = client.clone();
        let url = s.url("/spin");
        tokio::spawn(async move {
            let started = Instant::now();
            let resp = client.get(url).send().await.expect("request");
            (resp, started.elapsed())
        })
    };
    // While it spins, another function answers.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    hello_ok(&client, &s).await;
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "hello took {:?} next to a spinning guest",
        started.elapsed()
    );

    let (resp, elapsed) = spin.await.expect("spin task");
    expect_problem(resp, 504, "function-timeout").await;
    // Timeout 500 ms; the margin covers one epoch tick plus scheduling on a debug build.
    assert!(
        elapsed >= Duration::from_millis(500),
        "answered after {elapsed:?}, before the timeout"
    );
    assert!(
        elapsed < Duration::from_millis(800),
        "answered after {elapsed:?}"
    );
    hello_ok(&client, &s).await;
}

#[tokio::test]
async fn declared_oversized_body_is_413_without_reading_it() {
    let s = server();
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    // Announce 100 MB but send only a few bytes: the answer must come anyway.
    conn.write_all(b"POST /echo/x HTTP/1.1\r\nhost: test\r\ncontent-length: 100000000\r\n\r\nabc")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("answered without waiting for the body")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("application/problem+json"), "{head}");
    assert!(
        head.contains("urn:wasmgate:problem:body-too-large"),
        "{head}"
    );
}

#[tokio::test]
async fn streamed_oversized_body_is_413() {
    let s = server();
    let client = reqwest::Client::new();
    // No content-length: chunks that cross the 1 KiB limit while the guest reads them.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b'x'; 512])).collect();
    let resp = client
        .post(s.url("/echo/x"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("request");
    expect_problem(resp, 413, "body-too-large").await;
    // At the limit is fine.
    let resp = client
        .post(s.url("/echo/x"))
        .body(vec![b'x'; 1024])
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["body_len"], 1024);
}

/// Chunked uploads that cross `max_body` while the guest streams them back (its 200 head already
/// sent): a response the client sees fail, never a complete 200, and the server counts each cut.
/// (Without the cut the server ended these bodies cleanly; whether the client noticed then
/// depended on the TCP reset that follows unread request bytes, hence the server-side count.)
#[tokio::test]
async fn a_streamed_body_past_its_limit_never_looks_like_success() {
    let s = server();
    let client = reqwest::Client::new();
    // 512 bytes, a pause in which the guest's 200 head goes out, then the rest in 16 KiB chunks.
    let chunked = |total: usize| {
        let sizes: Vec<usize> = std::iter::once(512)
            .chain(
                (512..total)
                    .step_by(16 * 1024)
                    .map(|at| (total - at).min(16 * 1024)),
            )
            .collect();
        let stream =
            futures::stream::iter(sizes.into_iter().enumerate()).then(|(i, n)| async move {
                if i == 1 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok::<_, std::io::Error>(vec![b'x'; n])
            });
        reqwest::Body::wrap_stream(stream)
    };
    // The guest aborts its response when its read fails, or (lenient) ends it as if all was read.
    let uploads = ["stream", "stream=lenient"]
        .into_iter()
        .flat_map(|mode| [1, 16 * 1024, 49 * 1024 * 1024].map(|over| (mode, over)));
    for (mode, over) in uploads {
        let sent = client
            .post(s.url(&format!("/echo/x?{mode}")))
            .body(chunked(1024 + over))
            .send()
            .await;
        // A send that fails is a failed response too: the server closed the connection.
        if let Ok(resp) = sent {
            assert_eq!(resp.status(), 200, "{mode}, {over} bytes over");
            if let Ok(body) = resp.bytes().await {
                panic!(
                    "{mode}, {over} bytes over: a complete 200 with {} bytes",
                    body.len()
                );
            }
        }
    }
    let cut = s
        .metric("wasmgate_responses_cut_total", r#"cause="body-too-large""#)
        .await;
    assert_eq!(cut, 6.0, "each upload cut once, after its head");
    // At the limit, the whole body streams back.
    let resp = client
        .post(s.url("/echo/x?stream"))
        .body(chunked(1024))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.expect("whole").len(), 1024);
    hello_ok(&client, &s).await;
}

/// A guest that traps or times out after sending its head: the client's read of the body fails
/// (the connection closes before the chunked body's end), and the cut is counted. (Before the
/// cut, a trap after 64 KiB ended the body cleanly: a complete-looking 200.)
#[tokio::test]
async fn a_guest_that_fails_after_its_head_never_sends_a_complete_response() {
    let s = server();
    let client = reqwest::Client::new();
    for (query, cause) in [("cut=trap", "trap"), ("cut=spin", "timeout")] {
        // The head may not even reach the client before the connection closes.
        if let Ok(resp) = client.post(s.url(&format!("/echo/x?{query}"))).send().await {
            assert_eq!(resp.status(), 200);
            if let Ok(body) = resp.bytes().await {
                panic!("{query}: a complete 200 with {} bytes", body.len());
            }
        }
        let cut = s
            .metric(
                "wasmgate_responses_cut_total",
                &format!(r#"function="echo",cause="{cause}""#),
            )
            .await;
        assert_eq!(cut, 1.0, "{query}");
    }
    hello_ok(&client, &s).await;
}

#[tokio::test]
async fn memory_hog_is_500_and_host_memory_stays_bounded() {
    let s = server();
    let client = reqwest::Client::new();
    // Under its cap the same guest works.
    let resp = client
        .get(s.url("/memhog?mb=2"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let resp = client.get(s.url("/memhog")).send().await.expect("request");
    expect_problem(resp, 500, "function-memory-exceeded").await;

    // RSS across 1,040 hogs (8 at a time), sampled after each of 10 rounds: it must plateau.
    // Freed slots wait in wasmtime's decommit queues (one per core, flushed every 16 slots), so a
    // single sample can hold up to 30 freed 8 MiB slots or none: each round ends with 32 small
    // requests that push the queues along, and the comparison is between the lowest samples.
    let round = || {
        let client = client.clone();
        let (hog, small) = (s.url("/memhog"), s.url("/memhog?mb=0"));
        async move {
            let statuses = futures::future::join_all((0..8).map(|_| {
                let (client, hog) = (client.clone(), hog.clone());
                async move {
                    let mut statuses = Vec::new();
                    for _ in 0..13 {
                        let resp = client.get(&hog).send().await.expect("request");
                        statuses.push(resp.status().as_u16());
                    }
                    statuses
                }
            }))
            .await;
            for _ in 0..32 {
                let resp = client.get(&small).send().await.expect("request");
                assert_eq!(resp.status(), 200);
            }
            statuses.into_iter().flatten().collect::<Vec<u16>>()
        }
    };
    let before = s.rss_kib();
    let mut samples = Vec::new();
    for _ in 0..10 {
        let statuses = round().await;
        assert!(statuses.iter().all(|&c| c == 500), "every hog fails alone");
        samples.push(s.rss_kib());
    }
    println!("RSS before {before} KiB, after each round of 104 memory hogs {samples:?} KiB");
    // Bounded by configuration: 8 hogs running at their 8 MiB cap plus 30 freed slots waiting in
    // the two decommit queues, plus slack.
    let bound = before + (8 + 30) * 8 * 1024 + 32 * 1024;
    let highest = *samples.iter().max().expect("samples");
    assert!(
        highest < bound,
        "RSS grew from {before} KiB to {highest} KiB (bound {bound} KiB)"
    );
    // And it plateaus: the last rounds add (almost) nothing to the early ones, so nothing leaks
    // per request (16 MiB over about 600 requests would be 27 KiB each).
    let early = samples[1..4].iter().min().expect("samples");
    let late = samples[7..].iter().min().expect("samples");
    assert!(
        *late < early + 16 * 1024,
        "RSS kept growing: {early} KiB -> {late} KiB"
    );
    hello_ok(&client, &s).await;
}

/// A function sees the environment variables its manifest entry names and nothing else (never
/// the host's own), and the same module without `env` sees none.
#[tokio::test]
async fn a_guest_sees_its_manifests_environment_and_never_the_hosts() {
    let s = Server::start(
        r#"
        [functions.configured]
        wasm = "{wasm:echo}"
        env = { GREETING = "hello there", EMPTY = "", "WITH SPACE" = "ok" }
        [functions.bare]
        wasm = "{wasm:echo}"
        [[routes]]
        path = "/configured"
        function = "configured"
        [[routes]]
        path = "/bare"
        function = "bare"
        "#,
    );
    let client = reqwest::Client::new();
    let env = |path: &'static str| {
        let (client, url) = (client.clone(), s.url(&format!("{path}?env")));
        async move {
            let resp = client.get(url).send().await.expect("request");
            assert_eq!(resp.status(), 200);
            resp.json::<serde_json::Value>().await.expect("json")
        }
    };
    assert_eq!(
        env("/configured").await,
        serde_json::json!({"EMPTY": "", "GREETING": "hello there", "WITH SPACE": "ok"})
    );
    assert!(std::env::var_os("PATH").is_some(), "the host has a PATH");
    assert_eq!(env("/bare").await, serde_json::json!({}));
}

/// A guest is told the request's scheme and authority: `http` and the `Host` the client sent
/// (over TLS `https`, in tls.rs). A request that names no host is a 400, not a failure inside
/// the runtime.
#[tokio::test]
async fn a_guest_sees_scheme_and_authority_and_a_request_without_a_host_is_refused() {
    let s = server();
    let resp = reqwest::Client::new()
        .put(s.url("/echo/x?uri"))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    let authority = s
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    assert_eq!(body["uri"], format!("http://{authority}/echo/x?uri"));

    let mut conn = tokio::net::TcpStream::connect(&authority)
        .await
        .expect("connect");
    conn.write_all(b"GET /hello HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.0 400"), "{answer}");
    assert!(
        answer.contains("urn:wasmgate:problem:host-missing"),
        "{answer}"
    );
}
