//! The auth service's conformance suite, on the embedded default (SQLite) and on a real
//! PostgreSQL (a fresh database next to `DATABASE_URL`'s): issuing, verifying, refreshing,
//! replays, revocation, roles, key rotation and the tokens that must be refused.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::{Auth, AuthConfig, Rejection, TokenError};
use crate::capabilities::db::Db;
use crate::capabilities::db::conformance::fresh_postgres;

async fn open(url: &str) -> Auth {
    let db = Db::connect(url).await.expect("db");
    Auth::open(
        &AuthConfig::default(),
        Path::new("."),
        db.backend().clone(),
        None,
    )
    .await
    .expect("auth opens")
}

fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("b64")).expect("json")
}

async fn suite(auth: Auth) {
    // Issue and verify: subject, roles asked for plus roles granted, session.
    auth.store().grant("u1", "admin", 0).await.expect("grant");
    let t = auth.issue("u1", &["reader".into()]).await.expect("issue");
    let p = auth.verify(&t.access_token).await.expect("verifies");
    assert_eq!(p.subject, "u1");
    assert_eq!(p.roles, ["admin", "reader"]);
    assert_eq!(p.session.as_deref(), Some(t.session.as_str()));
    assert!(!p.token_id.is_empty());
    // A second verification is the cached one, and says the same.
    assert_eq!(auth.verify(&t.access_token).await.expect("cached"), p);

    // Refresh rotates; the roles are read again; a replay ends the session.
    auth.store().ungrant("u1", "admin").await.expect("ungrant");
    let t2 = auth.refresh(&t.refresh_token).await.expect("refresh");
    assert_ne!(t2.refresh_token, t.refresh_token);
    assert_eq!(t2.session, t.session);
    let p2 = auth.verify(&t2.access_token).await.expect("verifies");
    assert_eq!(
        p2.roles,
        ["reader"],
        "the revoked grant is gone after a refresh"
    );
    assert_eq!(
        auth.refresh(&t.refresh_token).await,
        Err(TokenError::Refused)
    );
    assert_eq!(
        auth.refresh(&t2.refresh_token).await,
        Err(TokenError::Refused)
    );
    assert_eq!(auth.verify(&t2.access_token).await, Err(Rejection::Revoked));
    assert_eq!(auth.refresh("unknown").await, Err(TokenError::Refused));

    // Revoking one session leaves the others alone.
    let a = auth.issue("u2", &[]).await.expect("issue");
    let b = auth.issue("u2", &[]).await.expect("issue");
    auth.revoke_session(&a.session).await.expect("revoke");
    assert_eq!(auth.verify(&a.access_token).await, Err(Rejection::Revoked));
    assert_eq!(
        auth.refresh(&a.refresh_token).await,
        Err(TokenError::Refused)
    );
    assert!(auth.verify(&b.access_token).await.is_ok());

    // Bad input is refused with the reason.
    assert!(matches!(
        auth.issue("", &[]).await,
        Err(TokenError::Invalid(_))
    ));
    assert!(matches!(
        auth.issue("u3", &["two words".into()]).await,
        Err(TokenError::Invalid(_))
    ));

    // Rotation: new tokens carry the new key id; the old ones still verify.
    let kid = |token: &str| jsonwebtoken::decode_header(token).expect("header").kid;
    let before = auth.issue("u4", &[]).await.expect("issue");
    auth.store()
        .add_key(&super::keys::generate())
        .await
        .expect("rotate");
    auth.inner.keys.reload().await.expect("reload");
    let after = auth.issue("u4", &[]).await.expect("issue");
    assert_ne!(kid(&before.access_token), kid(&after.access_token));
    assert!(auth.verify(&before.access_token).await.is_ok());
    assert_eq!(auth.jwks()["keys"].as_array().map(Vec::len), Some(2));

    // Forged tokens.
    let c = claims(&b.access_token);
    let real_kid = kid(&b.access_token);
    let mut h = Header::new(Algorithm::HS256);
    h.kid = real_kid.clone();
    let x = auth.jwks()["keys"][0]["x"].as_str().expect("x").to_string();
    let secret = URL_SAFE_NO_PAD.decode(&x).expect("b64");
    let hs = jsonwebtoken::encode(&h, &c, &EncodingKey::from_secret(&secret).expect("key"))
        .expect("sign");
    assert_eq!(auth.verify(&hs).await, Err(Rejection::Algorithm));
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        b.access_token.split('.').nth(1).expect("payload")
    );
    assert!(auth.verify(&none).await.is_err());
    let mut parts: Vec<String> = b.access_token.split('.').map(str::to_string).collect();
    let mut evil = c.clone();
    evil["sub"] = serde_json::json!("someone-else");
    parts[1] = URL_SAFE_NO_PAD.encode(evil.to_string());
    assert_eq!(
        auth.verify(&parts.join(".")).await,
        Err(Rejection::Signature)
    );
    let other = super::keys::generate();
    let der = base64::engine::general_purpose::STANDARD
        .decode(&other.private_pkcs8)
        .expect("der");
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = real_kid;
    let wrong = jsonwebtoken::encode(&h, &c, &EncodingKey::from_ed_der(&der)).expect("sign");
    assert_eq!(auth.verify(&wrong).await, Err(Rejection::Signature));
    h.kid = Some("no-such-key".into());
    let unknown = jsonwebtoken::encode(&h, &c, &EncodingKey::from_ed_der(&der)).expect("sign");
    assert_eq!(auth.verify(&unknown).await, Err(Rejection::UnknownKey));
    assert_eq!(auth.verify("").await, Err(Rejection::Malformed));
}

#[tokio::test]
async fn sqlite_conforms() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!("sqlite://{}", dir.path().join("auth.db").display());
    suite(open(&url).await).await;
}

#[tokio::test]
async fn postgres_conforms() {
    suite(open(&fresh_postgres().await).await).await;
}

#[tokio::test]
async fn a_revocation_reaches_another_process_through_the_database() {
    // Two services on one database, no Redis: the poller carries the revocation.
    let url = fresh_postgres().await;
    let (a, b) = (open(&url).await, open(&url).await);
    let t = a.issue("u", &[]).await.expect("issue");
    assert!(b.verify(&t.access_token).await.is_ok());
    a.revoke_session(&t.session).await.expect("revoke");
    let started = std::time::Instant::now();
    while b.verify(&t.access_token).await.is_ok() {
        assert!(
            started.elapsed() < super::revocation::POLL_EVERY * 4,
            "b still accepts the token"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
