//! Capabilities end to end: the example function on the embedded default and on PostgreSQL +
//! Redis, grants, per-function namespacing, and migrations under concurrent start-up.

use std::time::Duration;

use serde_json::Value;
use wasmgate_tests::{Server, check, fresh_postgres, get_json, notes_manifest, redis_url};

async fn notes_roundtrip(s: &Server) {
    let client = reqwest::Client::new();
    let before = get_json(&client, &s.url("/notes")).await;
    let mut fences = Vec::new();
    for text in ["first", "second; DROP TABLE notes; --"] {
        let resp = client
            .post(s.url("/notes"))
            .json(&serde_json::json!({ "text": text }))
            .send()
            .await
            .expect("create");
        assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
        let location = resp.headers()["location"]
            .to_str()
            .expect("ascii")
            .to_string();
        let created: Value = resp.json().await.expect("json");
        assert_eq!(
            location,
            format!("/notes/{}", created["id"].as_str().expect("id"))
        );
        fences.push(created["fence"].as_i64().expect("fence"));

        let got = get_json(&client, &s.url(&location)).await;
        assert_eq!(got, created, "read back what was written");
        assert_eq!(got["text"], text);
    }
    assert!(fences[1] > fences[0], "fencing tokens increase: {fences:?}");
    let after = get_json(&client, &s.url("/notes")).await;
    assert_eq!(
        after["created"].as_i64(),
        before["created"].as_i64().map(|n| n + 2)
    );

    let missing = client.get(s.url("/notes/nope")).send().await.expect("get");
    assert_eq!(missing.status(), 404);
    let bad = client
        .post(s.url("/notes"))
        .body("{not json")
        .send()
        .await
        .expect("post");
    assert_eq!(bad.status(), 400);
    let unknown = client
        .post(s.url("/notes"))
        .json(&serde_json::json!({"text": "x", "extra": 1}))
        .send()
        .await
        .expect("post");
    assert_eq!(unknown.status(), 400);
}

#[tokio::test]
async fn example_function_works_on_the_embedded_default() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!("sqlite://{}", dir.path().join("notes.db").display());
    let s = Server::start_with_args(
        &notes_manifest(r#""db", "cache", "lock""#),
        &["--database-url", &url],
    );
    notes_roundtrip(&s).await;
    let ready: Value = reqwest::get(s.url("/readyz"))
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["backends"]["db"]["kind"], "sqlite");
    assert_eq!(ready["backends"]["cache"]["kind"], "in-process");
}

#[tokio::test]
async fn example_function_works_on_postgres_and_redis() {
    let db = fresh_postgres();
    let s = Server::start_with_args(
        &notes_manifest(r#""db", "cache", "lock""#),
        &["--database-url", &db, "--redis-url", &redis_url()],
    );
    notes_roundtrip(&s).await;
    let ready: Value = reqwest::get(s.url("/readyz"))
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["backends"]["db"]["kind"], "postgres");
    assert_eq!(ready["backends"]["cache"]["kind"], "redis");
    assert_eq!(ready["backends"]["lock"]["kind"], "redis");
}

#[test]
fn refuses_ungranted_import() {
    let (ok, stderr) = check(&notes_manifest(r#""db""#));
    assert!(!ok);
    assert!(stderr.contains("[functions.notes]"), "{stderr}");
    assert!(
        stderr.contains("imports `wasmgate:platform/cache@0.1.0` but is not granted `cache`")
            || stderr.contains("imports `wasmgate:platform/lock@0.1.0` but is not granted `lock`"),
        "{stderr}"
    );
    assert!(stderr.contains("to its `capabilities`"), "{stderr}");
}

#[test]
fn migrations_need_the_db_grant() {
    let (ok, stderr) = check(&notes_manifest(r#""cache", "lock""#));
    assert!(!ok);
    assert!(
        stderr.contains("has migrations but is not granted `db`"),
        "{stderr}"
    );
}

/// Two functions from the same probe component, each with its own routes.
fn probes_manifest() -> String {
    let mut m = String::new();
    for f in ["a", "b"] {
        m.push_str(&format!(
            r#"
            [functions.probe-{f}]
            wasm = "{{wasm:capprobe}}"
            capabilities = ["db", "cache", "lock"]
            "#
        ));
    }
    m.push_str(
        r#"
        [functions.hello]
        wasm = "{wasm:hello}"
        [[routes]]
        path = "/hello"
        function = "hello"
        "#,
    );
    for (f, host) in [("a", "probe-a"), ("b", "probe-b")] {
        for path in [
            "/probe/cache/{key}",
            "/probe/lock/{name}",
            "/probe/db",
            "/probe/bench",
        ] {
            m.push_str(&format!(
                r#"
                [[routes]]
                path = "/{f}{path}"
                function = "{host}"
                "#
            ));
        }
    }
    m
}

async fn namespaces_are_private(s: &Server) {
    let client = reqwest::Client::new();
    let put = client
        .put(s.url("/a/probe/cache/secret"))
        .body("from-a")
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 200);
    let a = get_json(&client, &s.url("/a/probe/cache/secret")).await;
    assert_eq!(a["value"], "from-a");
    let b = get_json(&client, &s.url("/b/probe/cache/secret")).await;
    assert_eq!(b["value"], Value::Null, "b cannot read a's key");

    // a holds lock "L" for a while; b's "L" is a different lock, a's second request is busy.
    let hold = {
        let client = client.clone();
        let url = s.url("/a/probe/lock/L?hold_ms=1500&wait_ms=1");
        tokio::spawn(async move { client.post(url).send().await.expect("hold").status() })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b = client
        .post(s.url("/b/probe/lock/L?wait_ms=1"))
        .send()
        .await
        .expect("b lock");
    assert_eq!(b.status(), 200, "b's L is its own");
    let a2 = client
        .post(s.url("/a/probe/lock/L?wait_ms=1"))
        .send()
        .await
        .expect("a lock");
    assert_eq!(a2.status(), 409, "a's L is held");
    assert_eq!(hold.await.expect("task"), 200);
    let a3 = client
        .post(s.url("/a/probe/lock/L?wait_ms=1"))
        .send()
        .await
        .expect("a lock");
    assert_eq!(a3.status(), 200, "released when the holder finished");
}

#[tokio::test]
async fn cache_keys_and_locks_are_private_per_function_in_process() {
    let s = Server::start(&probes_manifest());
    namespaces_are_private(&s).await;
}

#[tokio::test]
async fn cache_keys_and_locks_are_private_per_function_on_redis() {
    let s = Server::start_with_args(&probes_manifest(), &["--redis-url", &redis_url()]);
    namespaces_are_private(&s).await;
}

#[tokio::test]
async fn two_processes_starting_together_apply_migrations_once() {
    let db = fresh_postgres();
    let manifest = notes_manifest(r#""db", "cache", "lock""#);
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| Server::start_with_args(&manifest, &["--database-url", &db]));
        let b = scope.spawn(|| Server::start_with_args(&manifest, &["--database-url", &db]));
        (a.join().expect("first"), b.join().expect("second"))
    });
    let applied = |s: &Server| s.log().contains("applied migrations");
    assert!(
        applied(&a) ^ applied(&b),
        "exactly one applied:\n{}\n---\n{}",
        a.log(),
        b.log()
    );
    let out = std::process::Command::new("psql")
        .arg(&db)
        .args([
            "-tAc",
            "SELECT count(*) FROM wasmgate_migrations WHERE function = 'notes'",
        ])
        .output()
        .expect("psql");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    // Both serve the same data.
    let client = reqwest::Client::new();
    let created: Value = client
        .post(a.url("/notes"))
        .json(&serde_json::json!({"text": "shared"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("id");
    let got = client
        .get(b.url(&format!("/notes/{id}")))
        .send()
        .await
        .expect("get");
    assert_eq!(got.status(), 200);
}

fn configured_manifest(token: &std::path::Path, grants: &str) -> String {
    format!(
        r#"
        [functions.configured]
        wasm = "{{wasm:configured}}"
        capabilities = [{grants}]
        config = {{ greeting = "hello", token = {{ file = "{}" }} }}
        [[routes]]
        path = "/configured"
        function = "configured"
        "#,
        token.display()
    )
}

/// `wasi:config/store` (the `config` capability) hands a function the values its manifest
/// entry names, a secret read from a file among them, which never reaches the log.
#[tokio::test]
async fn config_values_reach_the_guest_through_wasi_config() {
    let dir = tempfile::tempdir().expect("dir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").expect("write");
    let s = Server::start(&configured_manifest(&token, r#""config""#));
    let client = reqwest::Client::new();
    assert_eq!(
        get_json(&client, &s.url("/configured")).await,
        serde_json::json!({"greeting": "hello", "token": "s3cret-token"})
    );
    assert_eq!(
        get_json(&client, &s.url("/configured?key=greeting")).await,
        serde_json::json!({"value": "hello"})
    );
    assert_eq!(
        get_json(&client, &s.url("/configured?key=unset")).await,
        serde_json::json!({"value": null})
    );
    assert!(!s.log().contains("s3cret"), "a config value was logged");
}

#[test]
fn config_needs_its_grant_and_a_readable_source() {
    let dir = tempfile::tempdir().expect("dir");
    let token = dir.path().join("token");
    std::fs::write(&token, "t").expect("write");
    let (ok, stderr) = check(&configured_manifest(&token, ""));
    assert!(!ok);
    assert!(
        stderr.contains("has config values but is not granted `config`"),
        "{stderr}"
    );
    // Granted, but the file is not there: the key and the path are named.
    let missing = dir.path().join("missing");
    let (ok, stderr) = check(&configured_manifest(&missing, r#""config""#));
    assert!(!ok);
    assert!(
        stderr.contains("config `token`: cannot read") && stderr.contains("missing"),
        "{stderr}"
    );
    // A component that imports wasi:config/store without the grant is refused at load.
    let (ok, stderr) = check(
        r#"
        [functions.configured]
        wasm = "{wasm:configured}"
        [[routes]]
        path = "/configured"
        function = "configured"
        "#,
    );
    assert!(!ok);
    assert!(
        stderr.contains("imports `wasi:config/store@0.2.0-rc.1` but is not granted `config`"),
        "{stderr}"
    );
}
