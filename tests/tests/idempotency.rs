//! `Idempotency-Key`, black-box: every rule of the IETF draft as wasmgate implements it, a
//! restart, and two processes sharing PostgreSQL racing retries of one key. The `cachey`
//! fixture counts its runs, so "not executed again" is checked by the count.

use std::time::Duration;

use serde_json::Value;
use wasmgate_tests::{
    Server, either, expect_problem, fresh_postgres, get_json, redis_url, unique_suffix,
};

fn manifest() -> String {
    r#"
[functions.cachey]
wasm = "{wasm:cachey}"
capabilities = ["cache", "response-cache"]
max_body = "1KiB"

[[routes]]
path = "/effects/{name}"
methods = ["POST", "PATCH"]
function = "cachey"
idempotency = {}

[[routes]]
path = "/effects/{name}/again"
methods = ["POST"]
function = "cachey"
idempotency = { ttl = "1h", required = true }

[[routes]]
path = "/runs/{name}"
methods = ["GET"]
function = "cachey"
"#
    .to_string()
}

fn sqlite(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("wasmgate.db").display())
}

async fn post(
    c: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &str,
    auth: Option<&str>,
) -> reqwest::Response {
    let mut req = c
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().await.expect("request")
}

async fn runs(c: &reqwest::Client, s: &Server, name: &str) -> i64 {
    get_json(c, &s.url(&format!("/runs/{name}"))).await["runs"]
        .as_i64()
        .expect("count")
}

fn replayed(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

#[tokio::test]
async fn first_runs_retries_replay() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = Server::start_with_args(&manifest(), &["--database-url", &sqlite(&dir)]);
    let c = reqwest::Client::new();
    let url = s.url("/effects/x");

    let first = post(&c, &url, Some("\"k-1\""), r#"{"a":1}"#, None).await;
    assert_eq!(first.status(), 201);
    assert!(!replayed(&first));
    let first_id = first.headers()["x-request-id"].clone();
    let first_body: Value = first.json().await.expect("json");
    assert_eq!(first_body["run"], 1);

    let retry = post(&c, &url, Some("\"k-1\""), r#"{"a":1}"#, None).await;
    assert_eq!(retry.status(), 201);
    assert!(replayed(&retry), "a replay says so");
    assert_eq!(retry.headers()["content-type"], "application/json");
    assert_ne!(
        retry.headers()["x-request-id"],
        first_id,
        "with its own request id"
    );
    assert_eq!(retry.json::<Value>().await.expect("json"), first_body);
    assert_eq!(
        runs(&c, &s, "x").await,
        1,
        "the retry did not run the function"
    );

    // A bare token key works too; without a key every request runs.
    assert_eq!(post(&c, &url, Some("k-2"), "{}", None).await.status(), 201);
    assert!(replayed(&post(&c, &url, Some("k-2"), "{}", None).await));
    post(&c, &url, None, "{}", None).await;
    post(&c, &url, None, "{}", None).await;
    assert_eq!(runs(&c, &s, "x").await, 4);
}

#[tokio::test]
async fn misuse_of_a_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = Server::start_with_args(&manifest(), &["--database-url", &sqlite(&dir)]);
    let c = reqwest::Client::new();
    let url = s.url("/effects/m");

    // Same key, another payload: 422, nothing runs.
    assert_eq!(
        post(&c, &url, Some("k"), r#"{"a":1}"#, None).await.status(),
        201
    );
    let other = post(&c, &url, Some("k"), r#"{"a":2}"#, None).await;
    expect_problem(other, 422, "idempotency-key-reused").await;
    // Same key and body on another path of the same route is another request too.
    let elsewhere = post(&c, &s.url("/effects/m2"), Some("k"), r#"{"a":1}"#, None).await;
    expect_problem(elsewhere, 422, "idempotency-key-reused").await;
    assert_eq!(runs(&c, &s, "m").await, 1);

    // Keys are scoped per route and per principal: the same key elsewhere is a new request.
    let again = post(
        &c,
        &s.url("/effects/m/again"),
        Some("k"),
        r#"{"a":1}"#,
        None,
    )
    .await;
    assert_eq!((again.status().as_u16(), replayed(&again)), (201, false));
    let alice = post(&c, &url, Some("k"), r#"{"a":1}"#, Some("Bearer alice")).await;
    let bob = post(&c, &url, Some("k"), r#"{"a":1}"#, Some("Bearer bob")).await;
    assert_eq!((replayed(&alice), replayed(&bob)), (false, false));
    assert!(replayed(
        &post(&c, &url, Some("k"), r#"{"a":1}"#, Some("Bearer alice")).await
    ));
    // PATCH is its own request even with the same key.
    let patch = c
        .patch(&url)
        .header("idempotency-key", "k")
        .header("content-type", "application/json")
        .body(r#"{"a":1}"#)
        .send()
        .await
        .expect("patch");
    assert_eq!((patch.status().as_u16(), replayed(&patch)), (201, false));

    // A route that requires keys refuses a write without one, and runs nothing.
    let required = post(&c, &s.url("/effects/m/again"), None, r#"{"a":1}"#, None).await;
    expect_problem(required, 400, "idempotency-key-missing").await;
    let next = post(&c, &s.url("/effects/m/again"), Some("k2"), "{}", None).await;
    let next: Value = next.json().await.expect("json");
    assert_eq!(next["run"], 2, "the refused request did not run");

    // Malformed keys: 400, nothing runs.
    let before = runs(&c, &s, "m").await;
    let empty = post(&c, &url, Some("\"\""), "{}", None).await;
    expect_problem(empty, 400, "idempotency-key-invalid").await;
    let long = "k".repeat(300);
    expect_problem(
        post(&c, &url, Some(&long), "{}", None).await,
        400,
        "idempotency-key-invalid",
    )
    .await;
    let twice = c
        .post(&url)
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .send()
        .await
        .expect("request");
    expect_problem(twice, 400, "idempotency-key-invalid").await;
    // An oversized body is refused before anything is stored.
    let big = format!("\"{}\"", "x".repeat(2048));
    assert_eq!(post(&c, &url, Some("big"), &big, None).await.status(), 413);
    assert_eq!(runs(&c, &s, "m").await, before);
    assert_eq!(
        post(&c, &url, Some("big"), "{}", None).await.status(),
        201,
        "the key was not taken"
    );
}

#[tokio::test]
async fn in_flight_and_failures() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = Server::start_with_args(&manifest(), &["--database-url", &sqlite(&dir)]);
    let c = reqwest::Client::new();

    // While the first runs: 409 with Retry-After; afterwards the retry replays.
    let slow = s.url("/effects/slow?delay=800");
    let first = {
        let (c, slow) = (c.clone(), slow.clone());
        tokio::spawn(async move { post(&c, &slow, Some("k"), "{}", None).await.status() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = post(&c, &slow, Some("k"), "{}", None).await;
    assert_eq!(during.headers()["retry-after"], "1");
    expect_problem(during, 409, "idempotency-key-in-flight").await;
    assert_eq!(first.await.expect("task"), 201);
    assert!(replayed(&post(&c, &slow, Some("k"), "{}", None).await));
    assert_eq!(runs(&c, &s, "slow").await, 1);

    // A 5xx is not stored: the retry runs again.
    let failing = s.url("/effects/failing?status=503");
    assert_eq!(
        post(&c, &failing, Some("f"), "{}", None).await.status(),
        503
    );
    let retry = post(&c, &failing, Some("f"), "{}", None).await;
    assert_eq!((retry.status().as_u16(), replayed(&retry)), (503, false));
    assert_eq!(runs(&c, &s, "failing").await, 2);

    // A 4xx is the function's answer, and is replayed.
    let refused = s.url("/effects/refused?status=409");
    assert_eq!(
        post(&c, &refused, Some("r"), "{}", None).await.status(),
        409
    );
    assert!(replayed(&post(&c, &refused, Some("r"), "{}", None).await));
    assert_eq!(runs(&c, &s, "refused").await, 1);
}

#[tokio::test]
async fn survives_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = reqwest::Client::new();
    let body = {
        let s = Server::start_with_args(&manifest(), &["--database-url", &sqlite(&dir)]);
        let first = post(&c, &s.url("/effects/r"), Some("k"), "{}", None).await;
        assert_eq!(first.status(), 201);
        first.json::<Value>().await.expect("json")
    };
    let s = Server::start_with_args(&manifest(), &["--database-url", &sqlite(&dir)]);
    let retry = post(&c, &s.url("/effects/r"), Some("k"), "{}", None).await;
    assert!(replayed(&retry), "the stored response outlives the process");
    assert_eq!(retry.json::<Value>().await.expect("json"), body);
    assert_eq!(
        runs(&c, &s, "r").await,
        0,
        "and the new process did not run it"
    );
}

#[tokio::test]
async fn two_processes_racing_retries_execute_once() {
    let db = fresh_postgres();
    let args = ["--database-url", db.as_str(), "--redis-url", &redis_url()];
    let (a, b) = (
        Server::start_with_args(&manifest(), &args),
        Server::start_with_args(&manifest(), &args),
    );
    let c = reqwest::Client::new();
    let name = format!("race{}", unique_suffix());
    let path = format!("/effects/{name}?delay=300");
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let (c, url) = (c.clone(), either(&a, &b, i, &path));
            tokio::spawn(async move {
                let r = post(&c, &url, Some("one-key"), r#"{"n":1}"#, None).await;
                (r.status().as_u16(), replayed(&r))
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("task"));
    }
    let ran = outcomes.iter().filter(|o| **o == (201, false)).count();
    assert_eq!(ran, 1, "exactly one execution: {outcomes:?}");
    assert!(
        outcomes
            .iter()
            .all(|o| *o == (201, false) || *o == (409, false) || *o == (201, true)),
        "{outcomes:?}"
    );
    // Once it finished, both processes replay it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for s in [&a, &b] {
        let r = post(&c, &s.url(&path), Some("one-key"), r#"{"n":1}"#, None).await;
        assert_eq!((r.status().as_u16(), replayed(&r)), (201, true));
    }
    assert_eq!(runs(&c, &a, &name).await, 1);
}
