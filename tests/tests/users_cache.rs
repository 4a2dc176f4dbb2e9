//! User management with the host's response cache and Idempotency-Key, as the example manifest
//! deploys it: reads of one user are cached and every write to the user purges them, on one
//! process and across two sharing PostgreSQL and Redis; creates and updates are idempotent.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmgate_tests::{Server, fresh_postgres, redis_url, users_manifest};

async fn read(c: &reqwest::Client, url: &str) -> (u16, String, Value) {
    let resp = c.get(url).send().await.expect("get");
    let status = resp.status().as_u16();
    let cache = resp.headers()["cache-status"]
        .to_str()
        .expect("ascii")
        .to_string();
    (status, cache, resp.json().await.expect("json"))
}

async fn create(c: &reqwest::Client, s: &Server, key: &str, email: &str) -> reqwest::Response {
    c.post(s.url("/v1/users"))
        .header("idempotency-key", key)
        .json(&json!({"email": email, "name": "Ada", "password": "correct horse"}))
        .send()
        .await
        .expect("create")
}

#[tokio::test]
async fn reads_are_cached_and_writes_purge_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = format!("sqlite://{}", dir.path().join("users.db").display());
    let s = Server::start_with_args(&users_manifest(), &["--database-url", &db]);
    let c = wasmgate_tests::bearer_client(&wasmgate_tests::admin(&s, "root@example.com").await.1);

    // An idempotent create: the retry replays the same user instead of a 409 duplicate.
    let first = create(&c, &s, "signup-1", "ada@example.com").await;
    assert_eq!(first.status(), 201);
    let user: Value = first.json().await.expect("json");
    let retry = create(&c, &s, "signup-1", "ada@example.com").await;
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.expect("json"), user);
    let id = user["id"].as_str().expect("id");

    let v1 = s.url(&format!("/v1/users/{id}"));
    let v2 = s.url(&format!("/v2/users/{id}"));
    assert_eq!(read(&c, &v1).await.1, "wasmgate; fwd=miss; stored");
    let (status, cache, body) = read(&c, &v1).await;
    assert_eq!((status, cache.as_str()), (200, "wasmgate; hit"));
    assert_eq!(body, user, "a hit is the v1 shape, unchanged");
    read(&c, &v2).await;
    assert_eq!(read(&c, &v2).await.1, "wasmgate; hit");
    // A client holding the current ETag gets a 304 from the cache.
    let conditional = c
        .get(&v2)
        .header("if-none-match", "\"1\"")
        .send()
        .await
        .expect("conditional get");
    assert_eq!(conditional.status(), 304);
    assert_eq!(conditional.headers()["etag"], "\"1\"");
    assert!(conditional.bytes().await.expect("body").is_empty());

    // A v2 write purges the v1 and v2 entries of that user at once.
    let rename = || {
        c.patch(&v2)
            .header("idempotency-key", "rename-1")
            .json(&json!({"name": "Ada L."}))
            .send()
    };
    assert_eq!(rename().await.expect("patch").status(), 200);
    let (_, cache, body) = read(&c, &v1).await;
    assert_eq!(
        (cache.as_str(), body["name"].as_str()),
        ("wasmgate; fwd=miss; stored", Some("Ada L."))
    );
    let (_, _, body) = read(&c, &v2).await;
    assert_eq!(
        (body["name"].as_str(), body["version"].as_i64()),
        (Some("Ada L."), Some(2))
    );

    // The PATCH retried is replayed, not applied twice (the version would be 3).
    let again = rename().await.expect("patch");
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(read(&c, &v2).await.2["version"], 2);

    // Delete purges too: the next read is a 404, not the cached user.
    let deleted = c.delete(&v1).send().await.expect("delete");
    assert_eq!(deleted.status(), 204);
    assert_eq!(read(&c, &v1).await.0, 404);
    assert_eq!(read(&c, &v2).await.0, 404);
}

#[tokio::test]
async fn a_write_on_one_process_reaches_the_other() {
    let db = fresh_postgres();
    let args = ["--database-url", db.as_str(), "--redis-url", &redis_url()];
    let (a, b) = (
        Server::start_with_args(&users_manifest(), &args),
        Server::start_with_args(&users_manifest(), &args),
    );
    let c = wasmgate_tests::bearer_client(&wasmgate_tests::admin(&a, "root@example.com").await.1);
    let email = format!("grace{}@example.com", wasmgate_tests::unique_suffix());
    let user: Value = create(&c, &a, "k", &email)
        .await
        .json()
        .await
        .expect("json");
    let path = format!("/v1/users/{}", user["id"].as_str().expect("id"));
    read(&c, &a.url(&path)).await;
    assert_eq!(
        read(&c, &b.url(&path)).await.1,
        "wasmgate; hit; detail=shared"
    );
    assert_eq!(read(&c, &b.url(&path)).await.1, "wasmgate; hit");

    let patched = c
        .patch(a.url(&path))
        .json(&json!({"name": "Grace H."}))
        .send()
        .await
        .expect("patch");
    assert_eq!(patched.status(), 200);
    let started = Instant::now();
    assert_eq!(
        read(&c, &a.url(&path)).await.2["name"],
        "Grace H.",
        "fresh on the writer"
    );
    while read(&c, &b.url(&path)).await.2["name"] != "Grace H." {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "B kept the old user"
        );
    }
    eprintln!(
        "the other process served the new name after {:?}",
        started.elapsed()
    );
}
