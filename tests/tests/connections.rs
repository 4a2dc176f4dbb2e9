//! Connection hygiene at the edge, against the real binary: stalled request heads are closed at
//! their deadline while others are served, the cap on open connections refuses clearly and
//! recovers, and HTTP/2 clients are served.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmgate_tests::{Server, expect_problem};

const HELLO: &str = r#"
[functions.hello]
wasm = "{wasm:hello}"
[[routes]]
path = "/hello"
function = "hello"
"#;

fn addr(s: &Server) -> String {
    s.base.trim_start_matches("http://").to_string()
}

/// A keep-alive connection that has been served one `GET /hello`.
async fn served_connection(s: &Server) -> TcpStream {
    let mut conn = TcpStream::connect(addr(s)).await.expect("connect");
    conn.write_all(b"GET /hello HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.expect("answer");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    conn
}

/// Whether the server has closed `conn`: a read that ends (EOF or reset) within `wait`.
async fn closed_within(conn: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(wait, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // A 408-style answer before the close is fine; keep reading until the end.
            Ok(Ok(_)) => {}
        }
    }
}

/// 2,000 connections that send half a request head and then nothing are all closed within the
/// deadline (plus a margin for this machine), while a client beside them keeps its latency.
#[tokio::test]
async fn stalled_request_heads_are_closed_at_their_deadline_while_others_are_served() {
    let s = Server::start(&format!("[server]\nrequest_head_timeout = \"1s\"\n{HELLO}"));
    let client = reqwest::Client::new();
    let mut stalled = Vec::new();
    for _ in 0..2000 {
        let mut conn = TcpStream::connect(addr(&s)).await.expect("connect");
        conn.write_all(b"GET /hello HTTP/1.1\r\nhost: test\r\nx-half: ")
            .await
            .expect("write");
        stalled.push((conn, Instant::now()));
    }
    // Meanwhile, requests on fresh connections are answered at once.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let resp = client.get(s.url("/hello")).send().await.expect("hello");
        assert_eq!(resp.status(), 200);
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a request beside the stalled heads took {slowest:?}"
    );
    // Every stalled head is closed 1 s after it was opened, give or take a second here.
    for (i, (conn, opened)) in stalled.iter_mut().enumerate() {
        let deadline = *opened + Duration::from_secs(2);
        let wait = deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(10);
        assert!(
            closed_within(conn, wait).await,
            "stalled connection {i} still open {:?} after it was opened",
            opened.elapsed()
        );
    }
    // The gauge settles to the metrics request's own connection.
    let t = Instant::now();
    loop {
        let open = s.metric("wasmgate_connections_open", "").await;
        if open == 1.0 {
            break;
        }
        // Seconds, not the request deadline: with 2,000 connections closing at once on a
        // loaded 2-core machine the last connection tasks end up to a few seconds late.
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{open} connections still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A keep-alive connection that stays idle past the deadline is closed too.
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_deadline() {
    let s = Server::start(&format!("[server]\nrequest_head_timeout = \"1s\"\n{HELLO}"));
    let mut conn = served_connection(&s).await;
    let t = Instant::now();
    assert!(closed_within(&mut conn, Duration::from_secs(3)).await);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before its deadline",
        t.elapsed()
    );
}

/// Past `max_connections` a connection gets a 503 problem with `Retry-After` and is closed; once
/// held connections close, new ones are served again.
#[tokio::test]
async fn the_connection_cap_refuses_clearly_and_recovers() {
    let s = Server::start(&format!("[server]\nmax_connections = 8\n{HELLO}"));
    // Eight keep-alive connections, each proven accepted by a served request.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(served_connection(&s).await);
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let refused = client.get(s.url("/hello")).send().await.expect("answered");
    assert_eq!(refused.headers()["retry-after"], "1");
    assert!(refused.headers().contains_key("x-request-id"));
    expect_problem(refused, 503, "too-many-connections").await;

    drop(held.drain(..4));
    let t = Instant::now();
    loop {
        let resp = client.get(s.url("/hello")).send().await.expect("answered");
        if resp.status() == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "still refused after closing half the connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        s.metric("wasmgate_connections_refused_total", "").await >= 1.0,
        "refusals are counted"
    );
}

/// Connections past the cap that say nothing are answered only 256 at a time (each may wait up
/// to 2 s for its request head): the rest are closed at once, so a flood of new connections
/// holds a bounded number of descriptors beyond the cap.
#[tokio::test]
async fn refusals_in_progress_are_bounded_too() {
    let s = Server::start(&format!("[server]\nmax_connections = 1\n{HELLO}"));
    let _held = served_connection(&s).await;
    // Each connection is watched from the moment it is made, for 1.5 s: one closed at once is
    // closed well within that even when accepting lags on a loaded machine, and one being
    // answered stays open its full 2 s, so a slow loop cannot blur the two.
    let mut checks = Vec::new();
    for _ in 0..400 {
        let mut conn = TcpStream::connect(addr(&s)).await.expect("connect");
        checks.push(tokio::spawn(async move {
            closed_within(&mut conn, Duration::from_millis(1500)).await
        }));
    }
    let mut closed_at_once = 0;
    for check in checks {
        closed_at_once += usize::from(check.await.expect("task"));
    }
    // 144 when accepting keeps up. Without the bound none would close before its 2 s; on a
    // loaded 2-core machine accepting lags, and connections accepted late close late: 70 to
    // 110 were seen, so the floor only proves the bound is there.
    assert!(
        (40..=300).contains(&closed_at_once),
        "{closed_at_once} of 400 silent connections past the cap were closed at once (256 may wait for their head)"
    );
}

/// A client that speaks HTTP/2 in clear text (prior knowledge) is served.
#[tokio::test]
async fn http2_clients_are_served() {
    let s = Server::start(HELLO);
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let resp = client
        .get(s.url("/hello"))
        .send()
        .await
        .expect("h2 request");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["message"], "hello, world");
}

/// A route whose policy reads the body before the guest runs (here `Idempotency-Key`) answers
/// 408 when the body does not arrive within the function's timeout, instead of waiting forever.
#[tokio::test]
async fn a_body_that_stops_arriving_is_answered_408_at_the_functions_timeout() {
    let s = Server::start(
        r#"
        [functions.echo]
        wasm = "{wasm:echo}"
        timeout = "1s"
        [[routes]]
        path = "/echo"
        methods = ["POST"]
        function = "echo"
        idempotency = {}
        "#,
    );
    let mut conn = TcpStream::connect(addr(&s)).await.expect("connect");
    let t = Instant::now();
    conn.write_all(
        b"POST /echo HTTP/1.1\r\nhost: test\r\nidempotency-key: slow-1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("answered before the test gave up")
        .expect("read");
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("urn:wasmgate:problem:body-timeout"),
        "{answer}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "answered after {:?}, before the timeout",
        t.elapsed()
    );
}
