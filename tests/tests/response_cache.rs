//! The host's response cache, black-box: hit, miss, expiry, vary, what is never kept, purge by
//! tag, single flight, and two processes sharing Redis. The `cachey` fixture counts its runs,
//! so a hit is told from a miss by the count, not only by the `Cache-Status` header.

use std::time::{Duration, Instant};

use serde_json::Value;
use wasmgate_tests::{Server, either, get_json, get_text, redis_url, unique_suffix};

const MANIFEST: &str = r#"
[functions.cachey]
wasm = "{wasm:cachey}"
capabilities = ["cache", "response-cache"]

[[routes]]
path = "/c/{name}"
methods = ["GET", "HEAD"]
function = "cachey"
cache = { ttl = "1s", vary = ["accept"], not_found_ttl = "300ms" }

[[routes]]
path = "/runs/{name}"
methods = ["GET"]
function = "cachey"

[[routes]]
path = "/purge"
methods = ["POST"]
function = "cachey"
"#;

struct Get {
    status: u16,
    cache_status: String,
    body: Value,
    headers: reqwest::header::HeaderMap,
}

async fn get(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Get {
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let cache_status = headers
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.json().await.unwrap_or(Value::Null);
    Get {
        status,
        cache_status,
        body,
        headers,
    }
}

async fn runs(client: &reqwest::Client, s: &Server, name: &str) -> i64 {
    get_json(client, &s.url(&format!("/runs/{name}")))
        .await
        .get("runs")
        .and_then(Value::as_i64)
        .expect("a run count")
}

#[tokio::test]
async fn hit_miss_head_and_expiry() {
    let s = Server::start(MANIFEST);
    let c = reqwest::Client::new();
    let url = s.url("/c/a?tags=t1");

    let first = get(&c, &url, &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.cache_status, "wasmgate; fwd=miss; stored");
    assert_eq!(first.body["run"], 1);
    assert!(
        first.headers.get("wasmgate-cache-tags").is_none(),
        "tags are stripped"
    );

    let second = get(&c, &url, &[]).await;
    assert_eq!(second.cache_status, "wasmgate; hit");
    assert_eq!(second.body, first.body, "served from the cache");
    assert!(second.headers.get("age").is_some());
    assert_ne!(
        second.headers.get("x-request-id"),
        first.headers.get("x-request-id"),
        "each response carries its own request id"
    );
    assert_eq!(
        second.headers.get("content-type"),
        first.headers.get("content-type")
    );
    assert!(second.headers.get("wasmgate-cache-tags").is_none());
    assert_eq!(runs(&c, &s, "a").await, 1, "a hit never runs the guest");

    let head = c.head(&url).send().await.expect("head");
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["cache-status"], "wasmgate; hit");
    assert!(head.bytes().await.expect("body").is_empty());

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = get(&c, &url, &[]).await;
    assert_eq!(
        after.cache_status, "wasmgate; fwd=miss; stored",
        "expired after the TTL"
    );
    assert_eq!(after.body["run"], 2);

    let text = get_text(&c, &s.url("/metrics")).await;
    for (result, n) in [("hit", 2), ("miss", 2)] {
        let line =
            format!("wasmgate_response_cache_total{{function=\"cachey\",result=\"{result}\"}} {n}");
        assert!(text.contains(&line), "{line} not in:\n{text}");
    }
}

#[tokio::test]
async fn vary_query_and_authorization() {
    let s = Server::start(MANIFEST);
    let c = reqwest::Client::new();
    let url = s.url("/c/v");
    let json_a = get(&c, &url, &[("accept", "application/json")]).await;
    let text_a = get(&c, &url, &[("accept", "text/plain")]).await;
    assert_eq!(
        (json_a.body["run"].clone(), text_a.body["run"].clone()),
        (1.into(), 2.into())
    );
    let json_b = get(
        &c,
        &url,
        &[("accept", "application/json"), ("user-agent", "other")],
    )
    .await;
    assert_eq!(json_b.body["run"], 1, "headers not in vary do not matter");
    assert_eq!(json_b.body["accept"], "application/json");

    let query = get(&c, &s.url("/c/v?page=2"), &[("accept", "application/json")]).await;
    assert_eq!(query.body["run"], 3, "the query is part of the key");

    let auth = get(
        &c,
        &url,
        &[
            ("accept", "application/json"),
            ("authorization", "Bearer x"),
        ],
    )
    .await;
    assert_eq!(auth.cache_status, "wasmgate; fwd=bypass");
    assert_eq!(
        auth.body["run"], 4,
        "a request with credentials is not served from the cache"
    );
    let again = get(
        &c,
        &url,
        &[
            ("accept", "application/json"),
            ("authorization", "Bearer x"),
        ],
    )
    .await;
    assert_eq!(again.body["run"], 5, "nor stored");
}

#[tokio::test]
async fn what_is_never_kept() {
    let s = Server::start(MANIFEST);
    let c = reqwest::Client::new();
    for (name, query, status) in [
        ("e500", "status=500", 500),
        ("e400", "status=400", 400),
        ("cookie", "cookie", 200),
        ("nostore", "cc=no-store", 200),
        ("private", "cc=private%2C%20max-age=60", 200),
        ("nocache", "cc=no-cache", 200),
        ("maxage0", "cc=max-age=0", 200),
        ("varies", "vary=cookie", 200),
        ("varystar", "vary=*", 200),
        ("big", "big=1100000", 200),
    ] {
        let url = s.url(&format!("/c/{name}?{query}"));
        let first = get(&c, &url, &[]).await;
        let second = get(&c, &url, &[]).await;
        assert_eq!((first.status, second.status), (status, status), "{name}");
        assert_eq!(second.body["run"], 2, "{name}: not kept, runs again");
        assert_eq!(second.cache_status, "wasmgate; fwd=miss", "{name}");
        if name == "big" {
            let padding = second.body["padding"].as_str().expect("padding").len();
            assert_eq!(
                padding, 1_100_000,
                "a body over the entry cap passes through intact"
            );
        }
    }

    // max-age shortens the route's TTL; a 404 is kept for not_found_ttl only.
    let short = s.url("/c/short?cc=max-age=0%2C%20s-maxage=1");
    assert_eq!(get(&c, &short, &[]).await.body["run"], 1);
    assert_eq!(
        get(&c, &short, &[]).await.body["run"],
        1,
        "s-maxage=1 keeps it"
    );
    let missing = s.url("/c/gone?status=404");
    let first = get(&c, &missing, &[]).await;
    assert_eq!(
        (first.status, first.cache_status.as_str()),
        (404, "wasmgate; fwd=miss; stored")
    );
    assert_eq!(get(&c, &missing, &[]).await.cache_status, "wasmgate; hit");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        get(&c, &missing, &[]).await.body["run"],
        2,
        "404s expire sooner"
    );
}

#[tokio::test]
async fn purge_by_tag() {
    let s = Server::start(MANIFEST);
    let c = reqwest::Client::new();
    let tagged = s.url("/c/p?tags=user:1,users");
    let other = s.url("/c/q?tags=user:2");
    assert_eq!(get(&c, &tagged, &[]).await.body["run"], 1);
    assert_eq!(get(&c, &other, &[]).await.body["run"], 1);
    assert_eq!(get(&c, &tagged, &[]).await.cache_status, "wasmgate; hit");

    let purged = c
        .post(s.url("/purge?tags=user:1"))
        .send()
        .await
        .expect("purge");
    assert_eq!(purged.status(), 200);
    let after = get(&c, &tagged, &[]).await;
    assert_eq!(
        after.cache_status, "wasmgate; fwd=miss; stored",
        "purged at once"
    );
    assert_eq!(after.body["run"], 2);
    assert_eq!(
        get(&c, &other, &[]).await.cache_status,
        "wasmgate; hit",
        "other tags kept"
    );

    // Either of an entry's tags purges it.
    c.post(s.url("/purge?tags=users"))
        .send()
        .await
        .expect("purge");
    assert_eq!(get(&c, &tagged, &[]).await.body["run"], 3);
}

#[tokio::test]
async fn concurrent_misses_run_the_guest_once() {
    let s = Server::start(MANIFEST);
    let c = reqwest::Client::new();
    let url = s.url("/c/hot?delay=300");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { get(&c, &url, &[]).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let g = t.await.expect("task");
        assert_eq!((g.status, g.body["run"].clone()), (200, 1.into()));
        statuses.push(g.cache_status);
    }
    assert_eq!(
        runs(&c, &s, "hot").await,
        1,
        "20 concurrent misses, one execution"
    );
    let led = statuses.iter().filter(|s| s.contains("fwd=miss")).count();
    assert_eq!(led, 1, "{statuses:?}");
    let waited = statuses
        .iter()
        .filter(|s| *s == "wasmgate; hit; detail=coalesced")
        .count();
    assert!(
        waited >= 10,
        "most arrived while the fill ran and waited for it: {statuses:?}"
    );
}

#[tokio::test]
async fn two_processes_share_entries_and_purges() {
    // Separate fixture names per run: Redis outlives the test.
    let name = format!("shared{}", unique_suffix());
    let (a, b) = (
        Server::start_with_args(MANIFEST, &["--redis-url", &redis_url()]),
        Server::start_with_args(MANIFEST, &["--redis-url", &redis_url()]),
    );
    let c = reqwest::Client::new();
    let path = format!("/c/{name}?tags=item");
    let first = get(&c, &a.url(&path), &[]).await;
    assert_eq!(first.body["run"], 1);
    let from_b = get(&c, &b.url(&path), &[]).await;
    assert_eq!(
        from_b.cache_status, "wasmgate; hit; detail=shared",
        "B reads A's entry"
    );
    assert_eq!(from_b.body["run"], 1);
    assert_eq!(
        get(&c, &b.url(&path), &[]).await.cache_status,
        "wasmgate; hit"
    );

    // The process that purges serves the next read fresh...
    let purged = c
        .post(a.url("/purge?tags=item"))
        .send()
        .await
        .expect("purge");
    assert_eq!(purged.status(), 200);
    let started = Instant::now();
    let fresh = get(&c, &a.url(&path), &[]).await;
    assert_eq!(
        fresh.body["run"], 2,
        "fresh right after the purge on the purging process"
    );
    // ...and the other one within a bounded time (its copy in memory is dropped by pub/sub).
    loop {
        let g = get(&c, &b.url(&path), &[]).await;
        if g.body["run"] != 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "B kept serving the purged entry"
        );
    }
    eprintln!("other process served fresh after {:?}", started.elapsed());
    assert_eq!(
        runs(&c, &a, &name).await,
        2,
        "counts are shared through Redis too"
    );

    // Vary and expiry hold across processes too: B finds A's entry per `accept`, and after the
    // TTL neither serves it.
    let varied = format!("/c/{name}-vary");
    let json = [("accept", "application/json")];
    let text = [("accept", "text/plain")];
    assert_eq!(get(&c, &a.url(&varied), &json).await.body["run"], 1);
    assert_eq!(get(&c, &a.url(&varied), &text).await.body["run"], 2);
    let b_json = get(&c, &b.url(&varied), &json).await;
    assert_eq!(b_json.cache_status, "wasmgate; hit; detail=shared");
    assert_eq!(b_json.body["run"], 1);
    let b_text = get(&c, &b.url(&varied), &text).await;
    assert_eq!(
        (b_text.body["accept"].as_str(), b_text.body["run"].as_i64()),
        (Some("text/plain"), Some(2))
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = get(&c, &b.url(&varied), &json).await;
    assert_eq!(
        expired.cache_status, "wasmgate; fwd=miss; stored",
        "expired everywhere"
    );
    assert_eq!(expired.body["run"], 3);
}

#[tokio::test]
async fn two_processes_run_a_cold_key_once() {
    let name = format!("cold{}", unique_suffix());
    let (a, b) = (
        Server::start_with_args(MANIFEST, &["--redis-url", &redis_url()]),
        Server::start_with_args(MANIFEST, &["--redis-url", &redis_url()]),
    );
    let c = reqwest::Client::new();
    let path = format!("/c/{name}?delay=300");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (c, url) = (c.clone(), either(&a, &b, i, &path));
            tokio::spawn(async move { get(&c, &url, &[]).await })
        })
        .collect();
    for t in tasks {
        let g = t.await.expect("task");
        assert_eq!((g.status, g.body["run"].clone()), (200, 1.into()));
    }
    assert_eq!(
        runs(&c, &a, &name).await,
        1,
        "20 misses on two processes, one execution"
    );
}
