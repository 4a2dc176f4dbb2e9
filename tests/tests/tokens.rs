//! Tokens as the host issues and verifies them: bad tokens of every kind are 401, refresh
//! tokens are single use, logout reaches another process within a second, keys rotate under
//! load without a failed request, and an external provider's tokens verify from its JWKS.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Client;
use serde_json::{Value, json};
use wasmgate_tests::{
    Server, bearer_client, expect_problem, fresh_postgres, login_v2, redis_url, sign_up, token,
    unique_suffix, users_manifest_with,
};

fn embedded(extra: &str) -> (Server, tempfile::TempDir) {
    let (s, dir, _) = wasmgate_tests::start_embedded(&users_manifest_with(extra, "{}"));
    (s, dir)
}

/// The token's decoded header and claims (no verification: the test reads its own token).
fn parts(token: &str) -> (Value, Value) {
    let mut it = token.split('.');
    let mut next = || {
        serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(it.next().expect("part"))
                .expect("b64"),
        )
        .expect("json")
    };
    (next(), next())
}

fn fresh_ed25519() -> (EncodingKey, String) {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("random");
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let der = key.to_pkcs8_der().expect("pkcs8");
    (
        EncodingKey::from_ed_der(der.as_bytes()),
        URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
    )
}

fn with_kid(alg: Algorithm, kid: Option<&str>) -> Header {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    h
}

async fn status_with(url: &str, token: &str) -> u16 {
    bearer_client(token)
        .get(url)
        .send()
        .await
        .expect("get")
        .status()
        .as_u16()
}

async fn expect_401(url: &str, token: &str, why: &str) -> String {
    let resp = bearer_client(token).get(url).send().await.expect("get");
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().expect("ascii").to_string())
        .unwrap_or_default();
    assert_eq!(resp.status(), 401, "{why}");
    expect_problem(resp, 401, "unauthorized").await;
    assert!(
        challenge.contains("error=\"invalid_token\""),
        "{why}: {challenge}"
    );
    challenge
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let (s, _dir) = embedded("[auth]\naccess_ttl = \"3s\"\nleeway = \"0s\"\n");
    let id = sign_up(&s, "eve@example.com").await;
    let good = token(&s, "eve@example.com").await;
    let url = s.url(&format!("/v1/users/{id}"));
    assert_eq!(status_with(&url, &good).await, 200);
    let (header, claims) = parts(&good);
    let kid = header["kid"].as_str().expect("kid");
    assert_eq!(header["alg"], "EdDSA");

    // Tampered: the same signature over other claims.
    let mut evil = claims.clone();
    evil["roles"] = json!(["admin"]);
    let mut pieces: Vec<&str> = good.split('.').collect();
    let forged_payload = URL_SAFE_NO_PAD.encode(evil.to_string());
    pieces[1] = &forged_payload;
    expect_401(&url, &pieces.join("."), "tampered").await;

    // Signed by another key under the real key id.
    let (other, _) = fresh_ed25519();
    let wrong_key = jsonwebtoken::encode(&with_kid(Algorithm::EdDSA, Some(kid)), &claims, &other)
        .expect("sign");
    expect_401(&url, &wrong_key, "wrong key").await;

    // `alg: none`, no signature.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "JWT", "kid": kid}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    expect_401(&url, &none, "alg none").await;

    // HS256 keyed with the public key (the classic algorithm-confusion attack), as raw bytes
    // and as the JWKS text.
    let jwks: Value = reqwest::get(s.url("/.well-known/jwks.json"))
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    let x = jwks["keys"][0]["x"].as_str().expect("x").to_string();
    for secret in [
        URL_SAFE_NO_PAD.decode(&x).expect("b64"),
        x.as_bytes().to_vec(),
    ] {
        let hs = jsonwebtoken::encode(
            &with_kid(Algorithm::HS256, Some(kid)),
            &claims,
            &EncodingKey::from_secret(&secret).expect("hmac key"),
        )
        .expect("sign");
        expect_401(&url, &hs, "HS256 with the public key").await;
    }

    // Another issuer, and garbage.
    let mut foreign = claims.clone();
    foreign["iss"] = json!("https://elsewhere.example");
    let foreign = jsonwebtoken::encode(&with_kid(Algorithm::EdDSA, Some(kid)), &foreign, &other)
        .expect("sign");
    expect_401(&url, &foreign, "unknown issuer").await;
    expect_401(&url, "abc.def.ghi", "garbage").await;

    // Revoked: logout ends the session's tokens.
    let other_session = token(&s, "eve@example.com").await;
    assert_eq!(status_with(&url, &other_session).await, 200);
    let out = bearer_client(&other_session)
        .post(s.url("/v2/logout"))
        .send()
        .await
        .expect("logout");
    assert_eq!(out.status(), 204);
    let challenge = expect_401(&url, &other_session, "revoked").await;
    assert!(challenge.contains("revoked"), "{challenge}");
    assert_eq!(
        status_with(&url, &good).await,
        200,
        "other sessions live on"
    );

    // Expired (3 s, no leeway).
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let challenge = expect_401(&url, &good, "expired").await;
    assert!(challenge.contains("expired"), "{challenge}");
}

#[tokio::test]
async fn refresh_tokens_are_single_use_and_a_replay_ends_the_session() {
    let (s, _dir) = embedded("");
    let id = sign_up(&s, "finn@example.com").await;
    let url = s.url(&format!("/v2/users/{id}"));
    let first = login_v2(&s, "finn@example.com").await;
    assert_eq!(first["token_type"], "Bearer");
    let expires_in = first["expires_in"].as_i64().expect("expires_in");
    assert!(
        (890..=900).contains(&expires_in),
        "15 minutes by default: {expires_in}"
    );
    let refresh = |t: &str| {
        let body = json!({"refresh_token": t});
        let url = s.url("/v2/token/refresh");
        async move {
            Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("refresh")
        }
    };
    let r1 = first["refresh_token"].as_str().expect("refresh_token");
    let resp = refresh(r1).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let second: Value = resp.json().await.expect("json");
    let r2 = second["refresh_token"].as_str().expect("rotated");
    assert_ne!(r1, r2, "each refresh rotates the refresh token");
    let a2 = second["access_token"].as_str().expect("access");
    assert_eq!(status_with(&url, a2).await, 200);
    assert_eq!(
        parts(a2).1["sid"],
        parts(first["access_token"].as_str().expect("access")).1["sid"],
        "one session"
    );

    // The used token again: refused, and the whole family with it.
    assert_eq!(refresh(r1).await.status(), 401);
    assert_eq!(
        refresh(r2).await.status(),
        401,
        "the replay revoked the session"
    );
    expect_401(&url, a2, "the session's access token").await;
    assert_eq!(refresh("made-up").await.status(), 401);
    // A new login starts a new, working session.
    assert_eq!(
        status_with(&url, &token(&s, "finn@example.com").await).await,
        200
    );
}

fn two_processes(extra: &str) -> (Server, Server) {
    let db = fresh_postgres();
    let args = ["--database-url", db.as_str(), "--redis-url", &redis_url()];
    let manifest = users_manifest_with(extra, "{}");
    (
        Server::start_with_args(&manifest, &args),
        Server::start_with_args(&manifest, &args),
    )
}

#[tokio::test]
async fn logout_on_one_process_is_refused_on_another_within_a_second() {
    let (a, b) = two_processes("");
    let id = sign_up(&a, "gus@example.com").await;
    let t = token(&a, "gus@example.com").await;
    let on_b = b.url(&format!("/v1/users/{id}"));
    assert_eq!(
        status_with(&on_b, &t).await,
        200,
        "verified (and cached) on b"
    );
    let out = bearer_client(&t)
        .post(a.url("/v2/logout"))
        .send()
        .await
        .expect("logout");
    assert_eq!(out.status(), 204);
    let started = Instant::now();
    while status_with(&on_b, &t).await != 401 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "b still accepts the token"
        );
    }
    eprintln!(
        "b refused the token {:?} after the logout",
        started.elapsed()
    );
}

#[tokio::test]
async fn keys_rotate_under_load_without_a_failed_request() {
    let (a, b) = two_processes("[auth]\naccess_ttl = \"4s\"\nleeway = \"0s\"\n");
    let id = sign_up(&a, "hana@example.com").await;
    let path = format!("/v1/users/{id}");
    let old = token(&a, "hana@example.com").await;
    let old_kid = parts(&old).0["kid"].as_str().expect("kid").to_string();

    // Load: tokens issued by one process, used on the other, back to back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (ua, ub, la, lb) = (a.url(&path), b.url(&path), a.base.clone(), b.base.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed, mut kids) = (0, Vec::new(), std::collections::BTreeSet::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (login, use_on) = if i % 2 == 0 { (&la, &ub) } else { (&lb, &ua) };
                i += 1;
                let resp = Client::new()
                    .post(format!("{login}/v2/login"))
                    .json(
                        &json!({"email": "hana@example.com", "password": wasmgate_tests::PASSWORD}),
                    )
                    .send()
                    .await
                    .expect("login");
                if resp.status() != 200 {
                    failed.push(format!("login {}", resp.status()));
                    continue;
                }
                let t: Value = resp.json().await.expect("json");
                let t = t["access_token"].as_str().expect("token").to_string();
                kids.insert(parts(&t).0["kid"].as_str().expect("kid").to_string());
                for _ in 0..5 {
                    match status_with(use_on, &t).await {
                        200 => ok += 1,
                        other => failed.push(format!("get {other}")),
                    }
                }
            }
            (ok, failed, kids)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = a.cli(&["keys", "rotate"]);
    assert!(out.contains("new signing key"), "{out}");
    // Just after the rotation the old token still verifies on both.
    assert_eq!(status_with(&a.url(&path), &old).await, 200);
    assert_eq!(status_with(&b.url(&path), &old).await, 200);
    // Both processes sign with the new key within their reload period (10 s).
    let started = Instant::now();
    loop {
        let (ka, kb) = (
            parts(&token(&a, "hana@example.com").await).0["kid"].clone(),
            parts(&token(&b, "hana@example.com").await).0["kid"].clone(),
        );
        if ka != json!(old_kid) && kb != json!(old_kid) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still signing with the old key"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, kids) = load.await.expect("load");
    eprintln!("{ok} requests under rotation, kids seen: {kids:?}");
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(
        ok > 20 && kids.len() == 2,
        "the load spanned both keys: {ok} {kids:?}"
    );
    // The old token, past its expiry: refused.
    expect_401(&b.url(&path), &old, "expired after rotation").await;
}

#[tokio::test]
async fn an_external_providers_tokens_verify_from_its_jwks() {
    let dir = tempfile::tempdir().expect("tmp");
    let (key, x) = fresh_ed25519();
    let jwks = dir.path().join("idp-jwks.json");
    std::fs::write(
        &jwks,
        json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "kid": "idp-1", "x": x}]})
            .to_string(),
    )
    .expect("write jwks");
    let issuer = format!("https://idp-{}.example", unique_suffix());
    let extra = format!(
        "[[auth.providers]]\nissuer = \"{issuer}\"\njwks_file = \"{}\"\naudience = \"users-api\"\nroles_claim = \"groups\"\n",
        jwks.display()
    );
    let db = format!("sqlite://{}", dir.path().join("users.db").display());
    let s = Server::start_with_args(&users_manifest_with(&extra, "{}"), &["--database-url", &db]);
    let id = sign_up(&s, "ivy@example.com").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mint = |claims: Value, kid: &str| {
        jsonwebtoken::encode(&with_kid(Algorithm::EdDSA, Some(kid)), &claims, &key).expect("sign")
    };
    let claims = |sub: &str, aud: &str, groups: Value| json!({"iss": issuer, "sub": sub, "aud": aud, "exp": now + 300, "iat": now, "groups": groups});
    let own = s.url(&format!("/v1/users/{id}"));
    assert_eq!(
        status_with(&own, &mint(claims(&id, "users-api", json!([])), "idp-1")).await,
        200
    );
    assert_eq!(
        status_with(
            &s.url("/v1/users"),
            &mint(claims("ops", "users-api", json!(["admin"])), "idp-1")
        )
        .await,
        200,
        "the provider's groups are roles"
    );
    expect_401(
        &own,
        &mint(claims(&id, "another-api", json!([])), "idp-1"),
        "wrong audience",
    )
    .await;
    expect_401(
        &own,
        &mint(claims(&id, "users-api", json!([])), "idp-2"),
        "unknown kid",
    )
    .await;
    assert_eq!(
        status_with(
            &own,
            &mint(claims("someone-else", "users-api", json!([])), "idp-1")
        )
        .await,
        403
    );
    // An HS256 token over the provider's issuer is refused too.
    let hs = jsonwebtoken::encode(
        &with_kid(Algorithm::HS256, Some("idp-1")),
        &claims(&id, "users-api", json!([])),
        &EncodingKey::from_secret(STANDARD.encode(x.as_bytes()).as_bytes()).expect("hmac key"),
    )
    .expect("sign");
    expect_401(&own, &hs, "HS256").await;
}

/// Serves `jwks` (swappable) over plain HTTP and counts the fetches.
async fn jwks_server(
    jwks: std::sync::Arc<std::sync::Mutex<String>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (jwks, fetches) = (jwks.clone(), fetches.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body = jwks.lock().expect("jwks").clone();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/jwks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_jwks_url_is_fetched_and_fetched_again_for_a_new_key() {
    let (k1, x1) = fresh_ed25519();
    let (k2, x2) = fresh_ed25519();
    let jwk = |kid: &str, x: &str| json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": x});
    let jwks = std::sync::Arc::new(std::sync::Mutex::new(
        json!({"keys": [jwk("idp-1", &x1)]}).to_string(),
    ));
    let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let url = jwks_server(jwks.clone(), fetches.clone()).await;
    let issuer = "https://idp.example";
    let extra = format!(
        "[[auth.providers]]\nissuer = \"{issuer}\"\njwks_url = \"{url}\"\naudience = \"users-api\"\njwks_refresh = \"1h\"\n"
    );
    let (s, _dir, _) = wasmgate_tests::start_embedded(&users_manifest_with(&extra, "{}"));
    let id = sign_up(&s, "jo@example.com").await;
    let own = s.url(&format!("/v1/users/{id}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = json!({"iss": issuer, "sub": id, "aud": "users-api", "exp": now + 300});
    let mint = |kid: &str, key: &EncodingKey| {
        jsonwebtoken::encode(&with_kid(Algorithm::EdDSA, Some(kid)), &claims, key).expect("sign")
    };
    assert_eq!(status_with(&own, &mint("idp-1", &k1)).await, 200);
    let count = || fetches.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(count(), 1, "fetched once, at start");

    // The provider publishes a second key; a token signed with it fetches the set again.
    *jwks.lock().expect("jwks") =
        json!({"keys": [jwk("idp-1", &x1), jwk("idp-2", &x2)]}).to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(status_with(&own, &mint("idp-2", &k2)).await, 200);
    assert_eq!(count(), 2);
    // Made-up key ids do not make the host hammer the provider.
    for i in 0..20 {
        expect_401(&own, &mint(&format!("made-up-{i}"), &k2), "unknown kid").await;
    }
    assert!(count() <= 3, "{} fetches", count());
}
