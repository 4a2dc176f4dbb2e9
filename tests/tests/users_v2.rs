//! v2 beside v1 over the same data: display name, updated_at, versions with ETag / If-Match.

use serde_json::{Value, json};
use wasmgate_tests::{
    Server, fresh_postgres, get_json, get_status, redis_url, sorted_statuses, users_manifest,
};

async fn create_v2(c: &reqwest::Client, s: &Server, email: &str) -> (String, String, Value) {
    let resp = c
        .post(s.url("/v2/users"))
        .json(
            &json!({"email": email, "name": "Lin", "password": "12345678", "display_name": "lin"}),
        )
        .send()
        .await
        .expect("create");
    assert_eq!(resp.status(), 201);
    let etag = resp.headers()["etag"].to_str().expect("ascii").to_string();
    let location = resp.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_string();
    (location, etag, resp.json().await.expect("json"))
}

#[tokio::test]
async fn v2_shape_etag_and_if_match() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = format!("sqlite://{}", dir.path().join("u.db").display());
    let s = Server::start_with_args(&users_manifest(), &["--database-url", &db]);
    let c = wasmgate_tests::bearer_client(&wasmgate_tests::admin(&s, "root@example.com").await.1);
    let (location, etag, body) = create_v2(&c, &s, "lin@example.com").await;
    let mut keys: Vec<_> = body.as_object().expect("object").keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "created_at",
            "display_name",
            "email",
            "id",
            "name",
            "updated_at",
            "version"
        ]
    );
    assert_eq!(body["version"], 1);
    assert_eq!(body["display_name"], "lin");
    assert_eq!(etag, "\"1\"");

    // A write through v1 is visible through v2 (and bumps the version), and v1's shape is
    // unchanged by v2's fields.
    let id = body["id"].as_str().expect("id");
    let v1: Value = c
        .patch(s.url(&format!("/v1/users/{id}")))
        .json(&json!({"name": "Lin Yu"}))
        .send()
        .await
        .expect("v1 patch")
        .json()
        .await
        .expect("json");
    assert!(
        v1.get("display_name").is_none() && v1.get("version").is_none(),
        "{v1}"
    );
    let resp = c.get(s.url(&location)).send().await.expect("get");
    assert_eq!(resp.headers()["etag"], "\"2\"");
    let now: Value = resp.json().await.expect("json");
    assert_eq!(now["name"], "Lin Yu");
    assert_eq!(now["version"], 2);
    assert!(now["updated_at"].as_str() > body["updated_at"].as_str());

    // Stale If-Match: 412, nothing changes.
    let stale = c
        .patch(s.url(&location))
        .header("if-match", &etag)
        .json(&json!({"display_name": "stale"}))
        .send()
        .await
        .expect("patch");
    assert_eq!(stale.status(), 412);
    assert_eq!(stale.headers()["content-type"], "application/problem+json");
    // Current If-Match: 200, new ETag; null clears the display name.
    let ok = c
        .patch(s.url(&location))
        .header("if-match", "\"2\"")
        .json(&json!({"display_name": null}))
        .send()
        .await
        .expect("patch");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["etag"], "\"3\"");
    let ok: Value = ok.json().await.expect("json");
    assert_eq!(ok["display_name"], Value::Null);
    // A v2 write is visible through v1.
    let v1 = get_json(&c, &s.url(&format!("/v1/users/{id}"))).await;
    assert_eq!(v1["name"], "Lin Yu");
    assert_eq!(
        c.delete(s.url(&location))
            .send()
            .await
            .expect("delete")
            .status(),
        204
    );
    assert_eq!(get_status(&c, &s.url(&location)).await, 404);
}

#[tokio::test]
async fn parallel_patches_with_one_if_match_yield_exactly_one_200_on_postgres() {
    let s = Server::start_with_args(
        &users_manifest(),
        &[
            "--database-url",
            &fresh_postgres(),
            "--redis-url",
            &redis_url(),
        ],
    );
    let c = wasmgate_tests::bearer_client(&wasmgate_tests::admin(&s, "root@example.com").await.1);
    let (location, etag, _) = create_v2(&c, &s, "race2@example.com").await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (c, url, etag) = (c.clone(), s.url(&location), etag.clone());
            tokio::spawn(async move {
                c.patch(url)
                    .header("if-match", etag)
                    .json(&json!({"name": format!("writer {i}")}))
                    .send()
                    .await
                    .expect("patch")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let statuses = sorted_statuses(tasks).await;
    assert_eq!(statuses, [200, 412, 412, 412, 412, 412, 412, 412]);
    let now = get_json(&c, &s.url(&location)).await;
    assert_eq!(now["version"], 2, "exactly one write applied");
}
