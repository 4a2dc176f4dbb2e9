//! With Redis or PostgreSQL stopped, guests get a typed `unavailable` fast, other routes keep
//! serving, `/readyz` names the backend that is down, and everything recovers on its own.

use std::time::{Duration, Instant};

use serde_json::Value;
use wasmgate_tests::servers::{PrivatePostgres, PrivateRedis};
use wasmgate_tests::{Server, get_status};

const MANIFEST: &str = r#"
[functions.probe]
wasm = "{wasm:capprobe}"
capabilities = ["db", "cache", "lock"]
[functions.hello]
wasm = "{wasm:hello}"
[[routes]]
path = "/probe/cache/{key}"
function = "probe"
[[routes]]
path = "/probe/lock/{name}"
function = "probe"
[[routes]]
path = "/probe/db"
function = "probe"
[[routes]]
path = "/hello"
function = "hello"
[[routes]]
path = "/cached/hello"
methods = ["GET"]
function = "hello"
cache = { ttl = "60s" }
"#;

/// The bound a guest waits on a dead backend (BACKEND_TIMEOUT is 2 s), plus slack.
const FAST: Duration = Duration::from_secs(3);

async fn readyz(s: &Server) -> (u16, Value) {
    let resp = reqwest::get(s.url("/readyz")).await.expect("readyz");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json"))
}

async fn until_ok(client: &reqwest::Client, url: &str, method: reqwest::Method) {
    let started = Instant::now();
    loop {
        let resp = client
            .request(method.clone(), url)
            .send()
            .await
            .expect("request");
        if resp.status() == 200 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{url} did not recover: {}",
            resp.status()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn assert_unavailable_fast(client: &reqwest::Client, req: reqwest::RequestBuilder) {
    let started = Instant::now();
    let resp = req.send().await.expect("request");
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 503, "{:?}", resp.text().await);
    assert!(elapsed < FAST, "took {elapsed:?}");
    let _ = client;
}

/// The manifest's server on `redis` (cache and lock) and a SQLite file of its own.
fn on_redis(redis: &PrivateRedis) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let s = Server::start_with_args(
        MANIFEST,
        &["--redis-url", &redis.url(), "--database-url", &db],
    );
    (s, dir)
}

#[tokio::test]
async fn redis_down_is_unavailable_and_recovers() {
    let mut redis = PrivateRedis::start();
    let (s, _dir) = on_redis(&redis);
    let client = reqwest::Client::new();
    let put = client
        .put(s.url("/probe/cache/k"))
        .body("v")
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 200);
    assert_eq!(readyz(&s).await.0, 200);

    redis.stop();
    let resp = client
        .get(s.url("/probe/cache/k"))
        .send()
        .await
        .expect("get");
    let body = wasmgate_tests::expect_guest_problem(resp, 503, "backend-unavailable").await;
    assert!(
        !body.to_string().contains("127.0.0.1"),
        "no backend details: {body}"
    );
    assert_unavailable_fast(&client, client.get(s.url("/probe/cache/k"))).await;
    assert_unavailable_fast(&client, client.post(s.url("/probe/lock/x?wait_ms=100"))).await;
    // Routes that do not need Redis keep serving; the response cache falls back to memory.
    assert_eq!(get_status(&client, &s.url("/hello")).await, 200);
    for _ in 0..2 {
        assert_eq!(get_status(&client, &s.url("/cached/hello")).await, 200);
    }
    assert_eq!(get_status(&client, &s.url("/probe/db")).await, 200);
    let (status, body) = readyz(&s).await;
    assert_eq!(status, 503);
    assert_eq!(body["backends"]["cache"]["ready"], false, "{body}");
    assert_eq!(body["backends"]["lock"]["ready"], false, "{body}");
    assert_eq!(body["backends"]["db"]["ready"], true, "{body}");
    assert_eq!(get_status(&client, &s.url("/healthz")).await, 200);

    redis.resume();
    until_ok(&client, &s.url("/probe/cache/k"), reqwest::Method::GET).await;
    until_ok(
        &client,
        &s.url("/probe/lock/x?wait_ms=100"),
        reqwest::Method::POST,
    )
    .await;
    assert_eq!(readyz(&s).await.0, 200);
}

#[tokio::test]
async fn postgres_down_is_unavailable_and_recovers() {
    let pg = PrivatePostgres::start();
    let s = Server::start_with_args(MANIFEST, &["--database-url", &pg.url()]);
    let client = reqwest::Client::new();
    assert_eq!(get_status(&client, &s.url("/probe/db")).await, 200);

    pg.stop();
    let resp = client.get(s.url("/probe/db")).send().await.expect("db");
    wasmgate_tests::expect_guest_problem(resp, 503, "backend-unavailable").await;
    assert_unavailable_fast(&client, client.get(s.url("/probe/db"))).await;
    assert_eq!(get_status(&client, &s.url("/hello")).await, 200);
    assert_eq!(get_status(&client, &s.url("/probe/cache/k")).await, 200);
    let (status, body) = readyz(&s).await;
    assert_eq!(status, 503);
    assert_eq!(body["backends"]["db"]["ready"], false, "{body}");
    assert_eq!(body["backends"]["cache"]["ready"], true, "{body}");

    pg.resume();
    until_ok(&client, &s.url("/probe/db"), reqwest::Method::GET).await;
    assert_eq!(readyz(&s).await.0, 200);
}

#[tokio::test]
async fn idempotency_store_down_refuses_keyed_writes_and_recovers() {
    const EFFECTS: &str = r#"
[functions.cachey]
wasm = "{wasm:cachey}"
capabilities = ["cache", "response-cache"]
[[routes]]
path = "/effects/{name}"
methods = ["POST"]
function = "cachey"
idempotency = {}
"#;
    let pg = PrivatePostgres::start();
    let s = Server::start_with_args(EFFECTS, &["--database-url", &pg.url()]);
    let client = reqwest::Client::new();
    let post = |key: Option<&str>| {
        let req = client.post(s.url("/effects/x"));
        match key {
            Some(k) => req.header("idempotency-key", k),
            None => req,
        }
    };
    assert_eq!(post(Some("a")).send().await.expect("post").status(), 201);

    pg.stop();
    let started = Instant::now();
    let resp = post(Some("b")).send().await.expect("post");
    assert!(started.elapsed() < FAST, "took {:?}", started.elapsed());
    // Not run: without the store a retry could run it twice.
    wasmgate_tests::expect_problem(resp, 503, "idempotency-unavailable").await;
    assert_eq!(
        post(None).send().await.expect("post").status(),
        201,
        "unkeyed writes still run"
    );

    pg.resume();
    let started = Instant::now();
    while post(Some("b")).send().await.expect("post").status() != 201 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never recovered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let replay = post(Some("a")).send().await.expect("post");
    assert_eq!(
        replay.headers()["idempotent-replayed"],
        "true",
        "keys kept across the outage"
    );
}

/// Eight requests at once that each find the backend down (and wait out its bound): enough to
/// open its breaker.
async fn find_it_down(client: &reqwest::Client, method: reqwest::Method, url: &str) {
    let first: Vec<_> = (0..8)
        .map(|_| {
            let request = client.request(method.clone(), url);
            tokio::spawn(async move { request.send().await.expect("request").status() })
        })
        .collect();
    for request in first {
        assert_eq!(request.await.expect("task"), 503);
    }
}

/// With PostgreSQL stopped under load, the db breaker opens after a few calls that waited out
/// the backend's bound: from then on requests that need the database fail at once (instead of
/// about 2 s each), other routes are unaffected, `/readyz` and `/metrics` show the breaker, and
/// service returns soon after PostgreSQL does.
#[tokio::test]
async fn the_db_breaker_fails_fast_while_postgres_is_down_and_closes_when_it_is_back() {
    let pg = PrivatePostgres::start();
    let s = Server::start_with_args(MANIFEST, &["--database-url", &pg.url()]);
    let client = reqwest::Client::new();
    assert_eq!(get_status(&client, &s.url("/probe/db")).await, 200);

    pg.stop();
    find_it_down(&client, reqwest::Method::GET, &s.url("/probe/db")).await;
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let resp = client.get(s.url("/probe/db")).send().await.expect("db");
        slowest = slowest.max(started.elapsed());
        wasmgate_tests::expect_guest_problem(resp, 503, "backend-unavailable").await;
    }
    // A debug build answering over loopback; without the breaker each took about 2 s.
    assert!(
        slowest < Duration::from_millis(250),
        "with the breaker open a request took {slowest:?}"
    );
    assert_eq!(get_status(&client, &s.url("/hello")).await, 200);
    let (_, body) = readyz(&s).await;
    assert!(
        ["open", "half-open"].contains(&body["backends"]["db"]["breaker"].as_str().unwrap_or("")),
        "{body}"
    );
    assert_eq!(body["backends"]["cache"]["breaker"], "closed", "{body}");
    assert_eq!(
        s.metric("wasmgate_breaker_open", r#"capability="db""#)
            .await,
        1.0
    );
    assert!(
        s.metric("wasmgate_breaker_refused_total", r#"capability="db""#)
            .await
            >= 10.0
    );

    pg.resume();
    let back = Instant::now();
    loop {
        if get_status(&client, &s.url("/probe/db")).await == 200 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(3),
            "not serving {:?} after PostgreSQL came back",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "served again {:?} after PostgreSQL came back",
        back.elapsed()
    );
    assert_eq!(readyz(&s).await.1["backends"]["db"]["breaker"], "closed");
}

/// The same for Redis behind the cache capability: once its breaker is open, cache calls fail at
/// once, and it closes when Redis is back.
#[tokio::test]
async fn the_cache_breaker_fails_fast_while_redis_is_down_and_closes_when_it_is_back() {
    breaker_on_redis("cache", reqwest::Method::GET, "/probe/cache/k").await;
}

/// And behind the lock capability (a busy lock is a healthy answer; only a lock backend that
/// cannot be reached counts).
#[tokio::test]
async fn the_lock_breaker_fails_fast_while_redis_is_down_and_closes_when_it_is_back() {
    breaker_on_redis("lock", reqwest::Method::POST, "/probe/lock/x?wait_ms=100").await;
}

async fn breaker_on_redis(capability: &str, method: reqwest::Method, path: &str) {
    let mut redis = PrivateRedis::start();
    let (s, _dir) = on_redis(&redis);
    let client = reqwest::Client::new();
    let url = s.url(path);
    let status = |client: &reqwest::Client| {
        let request = client.request(method.clone(), &url);
        async move { request.send().await.expect("request").status() }
    };
    assert_eq!(status(&client).await, 200);

    redis.stop();
    find_it_down(&client, method.clone(), &url).await;
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(status(&client).await, 503);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "20 requests with the {capability} breaker open took {:?}",
        started.elapsed()
    );
    let label = format!(r#"capability="{capability}""#);
    assert_eq!(s.metric("wasmgate_breaker_open", &label).await, 1.0);

    redis.resume();
    until_ok(&client, &url, method.clone()).await;
    assert_eq!(
        readyz(&s).await.1["backends"][capability]["breaker"],
        "closed"
    );
}
