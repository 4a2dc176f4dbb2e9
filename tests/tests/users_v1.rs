//! The v1 users contract, frozen: exact statuses, the headers that matter and whole JSON bodies
//! (ids and timestamps matched by shape). Runs on the embedded default and on PostgreSQL + Redis.

use serde_json::{Value, json};
use wasmgate_tests::{
    Server, fresh_postgres, get_json, redis_url, sorted_statuses, users_manifest,
};

fn embedded() -> (Server, tempfile::TempDir) {
    let (s, dir, _) = wasmgate_tests::start_embedded(&users_manifest());
    (s, dir)
}

fn on_services() -> Server {
    Server::start_with_args(
        &users_manifest(),
        &[
            "--database-url",
            &fresh_postgres(),
            "--redis-url",
            &redis_url(),
        ],
    )
}

fn is_id(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// RFC 3339 UTC with microseconds, e.g. 2026-11-23T21:00:00.123456Z.
fn is_timestamp(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 27 && s.ends_with('Z') && s.as_bytes()[10] == b'T' && s.as_bytes()[19] == b'.'
    })
}

/// Asserts `body` is a v1 user with these fields, and returns its id.
fn assert_user(body: &Value, email: &str, name: &str) -> String {
    let obj = body.as_object().expect("an object");
    let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["created_at", "email", "id", "name"], "{body}");
    assert!(is_id(&body["id"]), "{body}");
    assert!(is_timestamp(&body["created_at"]), "{body}");
    assert_eq!(body["email"], email);
    assert_eq!(body["name"], name);
    body["id"].as_str().expect("id").to_string()
}

async fn problem(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:wasmgate:problem:")),
        "{body}"
    );
    body
}

async fn contract(s: &Server) {
    // An operator's account, made admin with `wasmgate roles grant`: every route below that
    // needs a token gets this one, so the shapes and statuses are exactly v1's; who else may
    // call each route is tested in tests/tests/access.rs.
    let (root, admin_token) = wasmgate_tests::admin(s, "root@example.com").await;
    let c = wasmgate_tests::bearer_client(&admin_token);
    let url = |p: &str| s.url(p);

    // POST /v1/users
    let resp = c
        .post(url("/v1/users"))
        .json(&json!({"email": "Ada@Example.com", "name": "Ada", "password": "correct horse"}))
        .send()
        .await
        .expect("create");
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let location = resp.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_string();
    let body: Value = resp.json().await.expect("json");
    let id = assert_user(&body, "Ada@Example.com", "Ada");
    assert_eq!(location, format!("/v1/users/{id}"));
    assert!(!body.to_string().contains("password"));

    for (bad, why) in [
        (
            json!({"name": "x", "password": "12345678"}),
            "missing email",
        ),
        (
            json!({"email": "nope", "name": "x", "password": "12345678"}),
            "invalid email",
        ),
        (
            json!({"email": "b@example.com", "name": "x", "password": "short"}),
            "short password",
        ),
        (
            json!({"email": "b@example.com", "name": "", "password": "12345678"}),
            "empty name",
        ),
    ] {
        let resp = c
            .post(url("/v1/users"))
            .json(&bad)
            .send()
            .await
            .expect("create");
        assert_eq!(resp.status(), 400, "{why}");
        problem(resp, 400).await;
    }
    let dup = c
        .post(url("/v1/users"))
        .json(&json!({"email": "ada@EXAMPLE.com", "name": "Other", "password": "12345678"}))
        .send()
        .await
        .expect("dup");
    let p = problem(dup, 409).await;
    assert_eq!(p["type"], "urn:wasmgate:problem:email-taken");

    // GET /v1/users/{id}
    let got = get_json(&c, &url(&location)).await;
    assert_eq!(got, body);
    problem(
        c.get(url("/v1/users/000000000000000000000000"))
            .send()
            .await
            .expect("get"),
        404,
    )
    .await;

    // PATCH /v1/users/{id}
    let resp = c
        .patch(url(&location))
        .json(&json!({"name": "Ada L."}))
        .send()
        .await
        .expect("patch");
    assert_eq!(resp.status(), 200);
    let patched: Value = resp.json().await.expect("json");
    assert_user(&patched, "Ada@Example.com", "Ada L.");
    assert_eq!(patched["created_at"], body["created_at"]);
    let other: Value = c
        .post(url("/v1/users"))
        .json(&json!({"email": "grace@example.com", "name": "Grace", "password": "12345678"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let taken = c
        .patch(url(&location))
        .json(&json!({"email": "GRACE@example.com"}))
        .send()
        .await
        .expect("patch");
    problem(taken, 409).await;
    problem(
        c.patch(url("/v1/users/000000000000000000000000"))
            .json(&json!({"name": "x"}))
            .send()
            .await
            .expect("patch"),
        404,
    )
    .await;

    // GET /v1/users: stable order, limit, cursor
    for i in 0..3 {
        c.post(url("/v1/users"))
            .json(&json!({"email": format!("u{i}@example.com"), "name": format!("U{i}"), "password": "12345678"}))
            .send()
            .await
            .expect("create");
    }
    let page1 = get_json(&c, &url("/v1/users?limit=2")).await;
    let mut keys: Vec<_> = page1.as_object().expect("object").keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["next_cursor", "users"]);
    assert_eq!(page1["users"].as_array().expect("array").len(), 2);
    assert_eq!(page1["users"][0]["id"], root.as_str(), "oldest first");
    assert_eq!(page1["users"][1]["id"], id.as_str());
    let cursor = page1["next_cursor"].as_str().expect("a cursor");
    let page2 = get_json(&c, &url(&format!("/v1/users?limit=2&cursor={cursor}"))).await;
    let names: Vec<_> = page2["users"]
        .as_array()
        .expect("array")
        .iter()
        .map(|u| u["name"].clone())
        .collect();
    assert_eq!(names, [json!("Grace"), json!("U0")]);
    assert_eq!(page2["users"][0]["id"], other["id"]);
    let last = get_json(
        &c,
        &url(&format!(
            "/v1/users?limit=2&cursor={}",
            page2["next_cursor"].as_str().expect("cursor")
        )),
    )
    .await;
    assert_eq!(last["users"].as_array().expect("array").len(), 2);
    assert_eq!(last["next_cursor"], Value::Null);
    let all = get_json(&c, &url("/v1/users")).await;
    assert_eq!(
        all["users"].as_array().expect("array").len(),
        6,
        "default limit 20 holds all 6"
    );
    let capped = get_json(&c, &url("/v1/users?limit=1000")).await;
    assert_eq!(capped["users"].as_array().expect("array").len(), 6);
    problem(
        c.get(url("/v1/users?cursor=zz"))
            .send()
            .await
            .expect("list"),
        400,
    )
    .await;
    problem(
        c.get(url("/v1/users?limit=0")).send().await.expect("list"),
        400,
    )
    .await;

    // POST /v1/login and GET /v1/me
    let resp = c
        .post(url("/v1/login"))
        .json(&json!({"email": "ada@example.com", "password": "correct horse"}))
        .send()
        .await
        .expect("login");
    assert_eq!(resp.status(), 200);
    let login: Value = resp.json().await.expect("json");
    let mut keys: Vec<_> = login.as_object().expect("object").keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["expires_at", "token"]);
    assert!(is_timestamp(&login["expires_at"]));
    let token = login["token"].as_str().expect("token");
    let me: Value = c
        .get(url("/v1/me"))
        .bearer_auth(token)
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("json");
    assert_eq!(me, patched);

    let wrong = c
        .post(url("/v1/login"))
        .json(&json!({"email": "ada@example.com", "password": "wrong password"}))
        .send()
        .await
        .expect("login");
    assert_eq!(wrong.headers()["www-authenticate"], "Bearer");
    let wrong = problem(wrong, 401).await;
    let unknown = problem(
        c.post(url("/v1/login"))
            // A new unknown email each run: failed logins are counted per account in Redis,
            // which outlives the test.
            .json(&json!({"email": format!("nobody{}@example.com", wasmgate_tests::unique_suffix()), "password": "wrong password"}))
            .send()
            .await
            .expect("login"),
        401,
    )
    .await;
    assert_eq!(
        wrong, unknown,
        "the same body for a wrong password and an unknown email"
    );
    let public = reqwest::Client::new();
    problem(public.get(url("/v1/me")).send().await.expect("me"), 401).await;
    problem(
        public
            .get(url("/v1/me"))
            .bearer_auth("not-a-token")
            .send()
            .await
            .expect("me"),
        401,
    )
    .await;

    // DELETE /v1/users/{id}
    let resp = c.delete(url(&location)).send().await.expect("delete");
    assert_eq!(resp.status(), 204);
    assert!(resp.bytes().await.expect("body").is_empty());
    problem(c.delete(url(&location)).send().await.expect("delete"), 404).await;
    problem(c.get(url(&location)).send().await.expect("get"), 404).await;
    problem(
        c.get(url("/v1/me"))
            .bearer_auth(token)
            .send()
            .await
            .expect("me"),
        401,
    )
    .await;
}

#[tokio::test]
async fn v1_contract_on_the_embedded_default() {
    let (s, _dir) = embedded();
    contract(&s).await;
}

#[tokio::test]
async fn v1_contract_on_postgres_and_redis() {
    contract(&on_services()).await;
}

#[tokio::test]
async fn bad_input_is_a_clear_400_never_a_500() {
    let (s, _dir) = embedded();
    let c = wasmgate_tests::bearer_client(&wasmgate_tests::admin(&s, "root@example.com").await.1);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "unknown field",
            br#"{"email":"a@example.com","name":"A","password":"12345678","admin":true}"#.to_vec(),
        ),
        (
            "wrong type",
            br#"{"email":42,"name":"A","password":"12345678"}"#.to_vec(),
        ),
        (
            "invalid UTF-8",
            b"{\"email\":\"a@example.com\",\"name\":\"\xff\xfe\",\"password\":\"12345678\"}"
                .to_vec(),
        ),
        ("not JSON", b"email=a".to_vec()),
        (
            "huge name",
            format!(
                r#"{{"email":"a@example.com","name":"{}","password":"12345678"}}"#,
                "n".repeat(10_000)
            )
            .into_bytes(),
        ),
        (
            "huge password",
            format!(
                r#"{{"email":"a@example.com","name":"A","password":"{}"}}"#,
                "p".repeat(5_000)
            )
            .into_bytes(),
        ),
    ];
    for (why, body) in cases {
        let resp = c
            .post(s.url("/v1/users"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), 400, "{why}");
    }
    // SQL metacharacters are stored literally.
    let nasty = "Robert'); DROP TABLE users;-- \" % _ \\";
    let resp = c
        .post(s.url("/v1/users"))
        .json(&json!({"email": "bobby@example.com", "name": nasty, "password": "' OR '1'='1"}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.expect("json");
    assert_eq!(created["name"], nasty);
    let login = c
        .post(s.url("/v1/login"))
        .json(&json!({"email": "bobby@example.com", "password": "' OR '1'='1"}))
        .send()
        .await
        .expect("login");
    assert_eq!(login.status(), 200);
    let page = get_json(&c, &s.url("/v1/users")).await;
    assert_eq!(
        page["users"].as_array().expect("array").len(),
        2,
        "the table is still there (the admin and bobby)"
    );
}

#[tokio::test]
async fn parallel_creates_with_one_email_yield_exactly_one_201_on_postgres() {
    let s = on_services();
    let c = reqwest::Client::new();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let c = c.clone();
            let url = s.url("/v1/users");
            tokio::spawn(async move {
                let email = if i % 2 == 0 {
                    "race@example.com"
                } else {
                    "RACE@example.com"
                };
                c.post(url)
                    .json(&json!({"email": email, "name": "R", "password": "12345678"}))
                    .send()
                    .await
                    .expect("create")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let statuses = sorted_statuses(tasks).await;
    assert_eq!(statuses, [201, 409, 409, 409, 409, 409, 409, 409]);
}

/// Passwords are hashed by the host with the `[password]` parameters; when an operator raises
/// them, a login replaces the stored hash with one made with the new parameters (no new version
/// of the account), and the password keeps working. Wrong passwords are refused throughout.
#[tokio::test]
async fn a_login_rehashes_a_password_hashed_with_older_parameters() {
    let db = fresh_postgres();
    let args = ["--database-url", db.as_str()];
    let hash_of = |id: &str| {
        wasmgate_tests::sql(
            &db,
            &format!("SELECT password_hash, version FROM users WHERE id = '{id}'"),
        )
    };
    let login = |s: &Server, password: &'static str| {
        let url = s.url("/v1/login");
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({"email": "rehash@example.com", "password": password}))
                .send()
                .await
                .expect("login")
                .status()
        }
    };
    let old = Server::start_with_args(
        &wasmgate_tests::users_manifest_with("[password]\nmemory_kib = 8192\niterations = 1", "{}"),
        &args,
    );
    let id = wasmgate_tests::sign_up(&old, "rehash@example.com").await;
    let before = hash_of(&id);
    assert!(
        before.starts_with("$argon2id$v=19$m=8192,t=1,p=1$"),
        "{before}"
    );
    assert!(before.ends_with("|1"), "{before}");
    assert_eq!(login(&old, wasmgate_tests::PASSWORD).await, 200);
    assert_eq!(hash_of(&id), before, "current parameters: nothing to redo");
    drop(old);

    let raised = Server::start_with_args(&users_manifest(), &args);
    assert_eq!(login(&raised, "wrong").await, 401);
    assert_eq!(hash_of(&id), before, "a failed login changes nothing");
    assert_eq!(login(&raised, wasmgate_tests::PASSWORD).await, 200);
    let after = hash_of(&id);
    assert!(
        after.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{after}"
    );
    assert!(
        after.ends_with("|1"),
        "the account's version stays: {after}"
    );
    assert_eq!(login(&raised, wasmgate_tests::PASSWORD).await, 200);
    assert_eq!(login(&raised, "wrong").await, 401);
}
