//! Shadow traffic, black-box: copies of live requests run on a candidate after the live response,
//! with every side effect held back (checked in the database, the shared cache and the response
//! cache's purges), and their answers are compared per route with request ids of mismatches.

use reqwest::Method;
use serde_json::{Value, json};
use wasmgate_tests::{
    AdminApi, Server, fresh_postgres, notes_manifest, redis_url, sql, users_manifest, with_admin,
};

/// The notes example takes a lock, inserts a row and counts it in the cache. Its shadow does all
/// three for real (201, like the live run) and none of it is left: the rows are the live
/// requests', the shared counter counts only them.
async fn notes_shadow_leaves_no_rows_and_no_cache_writes(backends: &[&str], db: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = with_admin(
        dir.path(),
        &notes_manifest(r#""db", "cache", "lock""#),
        backends,
    );
    let api = AdminApi::of(&s);
    api.upload("notes", "a", "notes").await;
    api.first("notes", "a").await;
    api.upload("notes", "b", "notes").await;
    // Redis keeps the counter across tests: what counts is what this test adds to it.
    let c = reqwest::Client::new();
    let counted = || async {
        let body: Value = c
            .get(s.url("/notes"))
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        body["created"].as_u64().unwrap_or(0)
    };
    let before = counted().await;
    let started = api
        .call(
            Method::PUT,
            "notes/shadow",
            Some(json!({"version": "b", "percent": 100})),
        )
        .await;
    assert_eq!(
        (started["version"].as_str(), started["percent"].as_u64()),
        (Some("b"), Some(100))
    );
    let d = api.call(Method::GET, "notes/deployment", None).await;
    assert_eq!(
        d["versions"],
        json!([{"label": "a", "weight": 100}, {"label": "b", "weight": 0}]),
        "{d}"
    );

    let n = 20;
    for i in 0..n {
        let resp = c
            .post(s.url("/notes"))
            .json(&json!({"text": format!("note {i}")}))
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), 201);
        // Read to its end: a response the client drops unread is not compared (skipped).
        resp.text().await.expect("body");
    }
    let r = api.shadow_compared("notes", "/notes", n).await;
    // Each shadow run inserted its note (201, as live) under another id: same status, other body.
    assert_eq!(
        (r["compared"].as_u64(), r["body_differs"].as_u64()),
        (Some(n), Some(n)),
        "{r}"
    );
    assert_eq!(r["skipped"], 0, "{r}");
    let mismatches = r["mismatches"].as_array().expect("samples");
    assert!(
        !mismatches.is_empty()
            && mismatches
                .iter()
                .all(|m| m["live_status"] == 201 && m["shadow_status"] == 201),
        "{r}"
    );

    assert_eq!(
        sql(db, "SELECT count(*) FROM notes").trim(),
        n.to_string(),
        "rows: the live requests' only"
    );
    assert_eq!(
        counted().await - before,
        n,
        "the shared cache counted the live requests only"
    );
    // The GET itself was copied too: the shadow's own empty cache answers 0 there.
    let r = api.shadow_compared("notes", "/notes", n + 1).await;
    assert_eq!(r["body_differs"].as_u64(), Some(n + 1), "{r}");
}

#[tokio::test]
async fn notes_shadow_on_the_embedded_default() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = format!("sqlite://{}", dir.path().join("data.db").display());
    notes_shadow_leaves_no_rows_and_no_cache_writes(&["--database-url", &db], &db).await;
}

#[tokio::test]
async fn notes_shadow_on_postgres_and_redis() {
    let db = fresh_postgres();
    notes_shadow_leaves_no_rows_and_no_cache_writes(
        &["--database-url", &db, "--redis-url", &redis_url()],
        &db,
    )
    .await;
}

/// `n` users renamed through PATCH (each write purges the user's cached responses).
async fn rename_all(s: &Server, token: &str, ids: &[String], name: &str) {
    let c = reqwest::Client::new();
    for id in ids {
        let resp = c
            .patch(s.url(&format!("/v1/users/{id}")))
            .bearer_auth(token)
            .json(&json!({"name": name}))
            .send()
            .await
            .expect("patch");
        assert_eq!(resp.status(), 200);
        // Read to its end: a response the client drops unread is not compared (skipped).
        resp.text().await.expect("body");
    }
}

/// The users write routes at 100%: the rows are the live requests' alone, and the response
/// cache sees exactly the purges it sees without a shadow.
#[tokio::test]
async fn users_shadow_commits_nothing_and_purges_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = fresh_postgres();
    let s = with_admin(
        dir.path(),
        &users_manifest(),
        &["--database-url", &db, "--redis-url", &redis_url()],
    );
    let api = AdminApi::of(&s);
    api.upload("users", "a", "users").await;
    api.first("users", "a").await;
    api.upload("users", "b", "users").await;
    let (_, token) = wasmgate_tests::admin(&s, "root@example.com").await;
    api.call(
        Method::PUT,
        "users/shadow",
        Some(json!({"version": "b", "percent": 100})),
    )
    .await;

    let c = reqwest::Client::new();
    let mut ids = Vec::new();
    let mut request_ids = Vec::new();
    for i in 0..10 {
        let resp = c
            .post(s.url("/v1/users"))
            .header("idempotency-key", format!("create-{i}"))
            .json(&json!({"email": format!("u{i}@example.com"), "name": "U", "password": "correct horse"}))
            .send()
            .await
            .expect("create");
        assert_eq!(resp.status(), 201);
        request_ids.push(
            resp.headers()["x-request-id"]
                .to_str()
                .expect("id")
                .to_string(),
        );
        let body: Value = resp.json().await.expect("json");
        ids.push(body["id"].as_str().expect("id").to_string());
    }
    // The shadow's create finds the email the live one just committed: 409, a status mismatch,
    // reported with the request id the live response carried.
    let r = api.shadow_compared("users", "/v1/users", 10).await;
    assert_eq!(r["status_differs"].as_u64(), Some(10), "{r}");
    let sampled: Vec<&str> = r["mismatches"]
        .as_array()
        .expect("samples")
        .iter()
        .filter_map(|m| m["request_id"].as_str())
        .collect();
    assert!(
        !sampled.is_empty() && sampled.iter().all(|id| request_ids.iter().any(|r| r == id)),
        "{r}"
    );

    let purges = || s.metric("wasmgate_response_cache_purges_total", "");
    let before = purges().await;
    rename_all(&s, &token, &ids, "Shadowed").await;
    let r = api.shadow_compared("users", "/v1/users/{id}", 10).await;
    // The shadow renamed each user as the live request had: same status, same body.
    assert_eq!(r["matched"].as_u64(), Some(10), "{r}");
    let with_shadow = purges().await - before;

    api.call(Method::DELETE, "users/shadow", None).await;
    let before = purges().await;
    rename_all(&s, &token, &ids, "Alone").await;
    let without = purges().await - before;
    assert!(without > 0.0, "the live writes purge");
    assert_eq!(with_shadow, without, "the shadow's purges reached no cache");

    // One row per live create (and the admin), one idempotency record per keyed live create.
    assert_eq!(sql(&db, "SELECT count(*) FROM users").trim(), "11");
    assert_eq!(
        sql(&db, "SELECT count(*) FROM wasmgate_idempotency").trim(),
        "10"
    );
    let history = api.call(Method::GET, "users/history", None).await;
    assert_eq!(
        history["history"][0]["reason"], "shadow on b stopped",
        "{history}"
    );
}

/// Comparisons name what differs: a candidate answering another body on every request and
/// another status on some is reported so, per route, with request ids; at 0% of the deployment
/// it takes no live traffic, and the CLI shows the same figures.
#[tokio::test]
async fn mismatches_are_counted_per_route_and_shown_by_the_cli() {
    let manifest = r#"
        [functions.f]
        wasm = "{wasm:flaky}"
        [[routes]]
        path = "/f/{name}"
        methods = ["GET"]
        function = "f"
    "#;
    let dir = tempfile::tempdir().expect("temp dir");
    let s = with_admin(dir.path(), manifest, &[]);
    let api = AdminApi::of(&s);
    api.upload("f", "live", "hello").await;
    api.first("f", "live").await;
    api.upload("f", "candidate", "flaky").await;
    let admin = s.admin.clone().expect("admin");
    let (code, out, err) =
        wasmgate_tests::admin_cli(&admin, &["shadow", "f", "candidate", "--percent", "100"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("f shadow on candidate (100% of requests)"),
        "{out}"
    );

    let c = reqwest::Client::new();
    let live = wasmgate_tests::version_of("hello");
    for i in 1..=40 {
        let resp = c
            .get(s.url(&format!("/f/x?i={i}")))
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["wasmgate-version"],
            live.as_str(),
            "only the live version answers"
        );
        resp.text().await.expect("body");
    }
    let r = api.shadow_compared("f", "/f/{name}", 40).await;
    // flaky answers 500 for i = 20 and 40, another body for the rest.
    assert_eq!(
        (
            r["status_differs"].as_u64(),
            r["body_differs"].as_u64(),
            r["matched"].as_u64()
        ),
        (Some(2), Some(38), Some(0)),
        "{r}"
    );
    let (code, out, err) = wasmgate_tests::admin_cli(&admin, &["shadow", "f"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(
            "/f/{name}: 0.0% of 40 matched (2 other status, 38 other body, 0 failed, 0 skipped)"
        ),
        "{out}"
    );
    // A shadow while the version serves all traffic is refused; stopping twice is a conflict.
    let (code, _, err) = wasmgate_tests::admin_cli(&admin, &["shadow", "f", "live"]);
    assert_ne!(code, 0);
    assert!(err.contains("nothing to compare it with"), "{err}");
    let (code, _, _) = wasmgate_tests::admin_cli(&admin, &["shadow", "f", "--stop"]);
    assert_eq!(code, 0);
    let (code, _, err) = wasmgate_tests::admin_cli(&admin, &["shadow", "f", "--stop"]);
    assert_ne!(code, 0);
    assert!(err.contains("has no shadow"), "{err}");
}
