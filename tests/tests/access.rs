//! Who may call the users routes, decided in the host before the function runs: no token is
//! 401, another user's token 403, the owner's and an admin's succeed, on every route, method and
//! version; a refused write changes nothing in the database; forged principal headers are
//! ignored; a refused request starts no instance. On the embedded default and on PostgreSQL +
//! Redis.

use reqwest::{Client, Method};
use serde_json::{Value, json};
use wasmgate_tests::{
    Server, admin, bearer_client, expect_problem, fresh_postgres, redis_url, sign_up, sql, token,
    users_manifest,
};

async fn refused(resp: reqwest::Response, status: u16) {
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().expect("ascii").to_string());
    let slug = if status == 401 {
        assert!(
            challenge
                .as_deref()
                .is_some_and(|c| c.starts_with("Bearer realm=\"wasmgate\"")),
            "a 401 carries a Bearer challenge: {challenge:?}"
        );
        "unauthorized"
    } else {
        "forbidden"
    };
    expect_problem(resp, status, slug).await;
}

async fn metric(s: &Server, name: &str, labels: &str) -> f64 {
    s.metric(name, labels).await
}

fn forged(req: reqwest::RequestBuilder, subject: &str) -> reqwest::RequestBuilder {
    req.header("wasmgate-principal-subject", subject)
        .header("wasmgate-principal-roles", "admin")
        .header("wasmgate-principal-session", "forged")
}

async fn every_route(s: &Server, db: &str) {
    let public = Client::new();
    let (_, admin_token) = admin(s, "root@example.com").await;
    let root = bearer_client(&admin_token);
    let bob_id = sign_up(s, "bob@example.com").await;
    let bob = bearer_client(&token(s, "bob@example.com").await);

    for v in ["v1", "v2"] {
        let email = format!("alice-{v}@example.com");
        let alice_id = sign_up(s, &email).await;
        let alice = bearer_client(&token(s, &email).await);
        let path = s.url(&format!("/{v}/users/{alice_id}"));
        let row = || {
            sql(
                db,
                &format!("SELECT name, email, version FROM users WHERE id = '{alice_id}'"),
            )
        };
        let before = row();
        assert!(!before.is_empty(), "alice is in the table");
        let runs = metric(s, "wasmgate_guest_runs_total", "function=\"users\"").await;
        let unauthorized = metric(s, "wasmgate_requests_total", "outcome=\"unauthorized\"").await;

        for method in [Method::GET, Method::PATCH, Method::DELETE] {
            let body = json!({"name": "Mallory"});
            let req = |c: &Client| c.request(method.clone(), &path).json(&body);
            refused(req(&public).send().await.expect("send"), 401).await;
            refused(req(&bob).send().await.expect("send"), 403).await;
            // A client cannot hand the guest a principal of its choosing.
            refused(
                forged(req(&public), &alice_id).send().await.expect("send"),
                401,
            )
            .await;
            refused(
                forged(req(&bob), &alice_id).send().await.expect("send"),
                403,
            )
            .await;
            refused(
                req(&public)
                    .bearer_auth("not.a.token")
                    .send()
                    .await
                    .expect("send"),
                401,
            )
            .await;
        }
        let list = s.url(&format!("/{v}/users"));
        refused(public.get(&list).send().await.expect("list"), 401).await;
        refused(bob.get(&list).send().await.expect("list"), 403).await;
        refused(
            forged(public.get(&list), &bob_id)
                .send()
                .await
                .expect("list"),
            401,
        )
        .await;

        assert_eq!(row(), before, "{v}: refused writes changed nothing");
        assert_eq!(
            metric(s, "wasmgate_guest_runs_total", "function=\"users\"").await,
            runs,
            "{v}: no refused request reached an instance"
        );
        assert_eq!(
            metric(s, "wasmgate_requests_total", "outcome=\"unauthorized\"").await - unauthorized,
            11.0,
            "{v}: the 401s are counted"
        );

        // The owner and an admin get through.
        let own: Value = alice
            .get(&path)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        assert_eq!(own["id"], alice_id.as_str());
        assert_eq!(root.get(&path).send().await.expect("get").status(), 200);
        assert_eq!(root.get(&list).send().await.expect("list").status(), 200);
        let patched = alice
            .patch(&path)
            .json(&json!({"name": "Alice A."}))
            .send()
            .await
            .expect("patch");
        assert_eq!(patched.status(), 200);
        let patched = root
            .patch(&path)
            .json(&json!({"name": "Alice B."}))
            .send()
            .await
            .expect("patch");
        assert_eq!(patched.status(), 200);
        assert_eq!(
            row(),
            format!("Alice B.|{email}|3"),
            "{v}: both writes landed"
        );
        // Each may delete: the owner their own account, an admin anyone's.
        let other = sign_up(s, &format!("carol-{v}@example.com")).await;
        let other_path = s.url(&format!("/{v}/users/{other}"));
        assert_eq!(
            root.delete(&other_path)
                .send()
                .await
                .expect("delete")
                .status(),
            204
        );
        assert_eq!(
            alice.delete(&path).send().await.expect("delete").status(),
            204
        );
        assert_eq!(row(), "", "{v}: deleted");
    }

    // /v1/me and /v2/logout need a token; sign-up and login do not.
    refused(public.get(s.url("/v1/me")).send().await.expect("me"), 401).await;
    let me: Value = bob
        .get(s.url("/v1/me"))
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("json");
    assert_eq!(me["id"], bob_id.as_str());
    refused(
        public
            .post(s.url("/v2/logout"))
            .send()
            .await
            .expect("logout"),
        401,
    )
    .await;
}

#[tokio::test]
async fn every_users_route_checks_who_asks_on_the_embedded_default() {
    let (s, _dir, db) = wasmgate_tests::start_embedded(&users_manifest());
    every_route(&s, &db).await;
}

#[tokio::test]
async fn every_users_route_checks_who_asks_on_postgres_and_redis() {
    let db = fresh_postgres();
    let s = Server::start_with_args(
        &users_manifest(),
        &["--database-url", &db, "--redis-url", &redis_url()],
    );
    every_route(&s, &db).await;
}

#[tokio::test]
async fn an_authorized_read_is_served_from_the_shared_cache() {
    let (s, _dir, _) = wasmgate_tests::start_embedded(&users_manifest());
    let (_, admin_token) = admin(&s, "root@example.com").await;
    let id = sign_up(&s, "dana@example.com").await;
    let dana = bearer_client(&token(&s, "dana@example.com").await);
    let path = s.url(&format!("/v1/users/{id}"));
    let status = |r: &reqwest::Response| {
        r.headers()["cache-status"]
            .to_str()
            .expect("ascii")
            .to_string()
    };
    let first = dana.get(&path).send().await.expect("get");
    assert_eq!(status(&first), "wasmgate; fwd=miss; stored");
    // Another token of the same user, and an admin's: one cached copy serves them all.
    let again = bearer_client(&token(&s, "dana@example.com").await);
    assert_eq!(
        status(&again.get(&path).send().await.expect("get")),
        "wasmgate; hit"
    );
    let root = bearer_client(&admin_token);
    assert_eq!(
        status(&root.get(&path).send().await.expect("get")),
        "wasmgate; hit"
    );
    // Nobody else gets it, cached or not.
    refused(Client::new().get(&path).send().await.expect("get"), 401).await;
}
