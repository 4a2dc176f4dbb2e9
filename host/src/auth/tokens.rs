//! Issuing tokens: a short-lived access token (JWT signed with the current Ed25519 key) and an
//! opaque refresh token (random, stored only as its SHA-256, single use, rotated on each
//! refresh).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Header};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::store::{Redeemed, Session};
use super::{Auth, TokenError, now_ms};

/// What a login or a refresh hands back. Times are milliseconds since the epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub access_token: String,
    pub access_expires_at: u64,
    pub refresh_token: String,
    pub refresh_expires_at: u64,
    pub session: String,
}

/// Longest subject or role accepted, and how many roles: tokens stay small.
const MAX_SUBJECT: usize = 256;
const MAX_ROLES: usize = 32;

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    iat: i64,
    exp: i64,
    jti: String,
    sid: &'a str,
    roles: &'a [String],
}

fn random(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random source is available");
    URL_SAFE_NO_PAD.encode(buf)
}

pub fn hash(refresh_token: &str) -> String {
    hex::encode(Sha256::digest(refresh_token.as_bytes()))
}

fn check(subject: &str, roles: &[String]) -> Result<(), TokenError> {
    let bad = |s: &str| s.is_empty() || s.len() > MAX_SUBJECT || s.chars().any(char::is_control);
    if bad(subject) {
        return Err(TokenError::Invalid(format!(
            "the subject must be 1 to {MAX_SUBJECT} bytes without control characters"
        )));
    }
    if roles.len() > MAX_ROLES || roles.iter().any(|r| bad(r) || r.contains([' ', ','])) {
        return Err(TokenError::Invalid(format!(
            "at most {MAX_ROLES} roles, each 1 to {MAX_SUBJECT} bytes without spaces, commas or control characters"
        )));
    }
    Ok(())
}

/// The session's own roles plus those granted to the subject, sorted and unique.
async fn effective_roles(
    auth: &Auth,
    subject: &str,
    own: &[String],
) -> Result<Vec<String>, TokenError> {
    let mut roles = auth.store().roles(subject).await?;
    roles.extend(own.iter().cloned());
    roles.sort();
    roles.dedup();
    Ok(roles)
}

fn sign(
    auth: &Auth,
    session: &Session,
    roles: &[String],
    now: i64,
) -> Result<(String, u64), TokenError> {
    let cfg = auth.config();
    let keys = auth.inner.keys.current();
    let Some((kid, key)) = &keys.signing else {
        tracing::error!("no signing key loaded");
        return Err(TokenError::Unavailable);
    };
    let exp_ms = now + i64::try_from(cfg.access_ttl.as_millis()).unwrap_or(i64::MAX);
    let claims = Claims {
        iss: &cfg.issuer,
        aud: &cfg.audience,
        sub: &session.subject,
        iat: now / 1000,
        exp: exp_ms / 1000,
        jti: random(12),
        sid: &session.id,
        roles,
    };
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.clone());
    let token = jsonwebtoken::encode(&header, &claims, key).map_err(|e| {
        tracing::error!(error = %e, "cannot sign an access token");
        TokenError::Unavailable
    })?;
    // `exp` has whole seconds; report what the token says.
    Ok((token, u64::try_from(exp_ms / 1000 * 1000).unwrap_or(0)))
}

fn refresh_expiry(auth: &Auth, now: i64) -> i64 {
    now + i64::try_from(auth.config().refresh_ttl.as_millis()).unwrap_or(i64::MAX)
}

pub async fn issue(auth: &Auth, subject: &str, roles: &[String]) -> Result<Tokens, TokenError> {
    check(subject, roles)?;
    let now = now_ms();
    let session = Session {
        id: random(12),
        subject: subject.to_string(),
        roles: roles.to_vec(),
        revoked: false,
    };
    next_tokens(auth, session, now, true).await
}

/// The session's next pair: a new refresh token stored (with the session itself when `new`),
/// and an access token with the subject's roles as they are now.
async fn next_tokens(
    auth: &Auth,
    session: Session,
    now: i64,
    new: bool,
) -> Result<Tokens, TokenError> {
    let refresh_token = random(32);
    let refresh_expires = refresh_expiry(auth, now);
    let store = auth.store();
    if new {
        store
            .create_session(&session, &hash(&refresh_token), now, refresh_expires)
            .await?;
    } else {
        store
            .add_refresh(&session.id, &hash(&refresh_token), refresh_expires)
            .await?;
    }
    let roles = effective_roles(auth, &session.subject, &session.roles).await?;
    let (access_token, access_expires_at) = sign(auth, &session, &roles, now)?;
    Ok(Tokens {
        access_token,
        access_expires_at,
        refresh_token,
        refresh_expires_at: u64::try_from(refresh_expires).unwrap_or(0),
        session: session.id,
    })
}

pub async fn refresh(auth: &Auth, presented: &str) -> Result<Tokens, TokenError> {
    if presented.is_empty() || presented.len() > 256 {
        return Err(TokenError::Refused);
    }
    let now = now_ms();
    let session = match auth.store().redeem(&hash(presented), now).await? {
        Redeemed::Session(s) => s,
        Redeemed::Replayed { session_id } => {
            // Someone holds a copy of a token that was already used: end the whole family, so
            // neither the thief nor the user keeps a working one (the user logs in again).
            tracing::warn!(session = %session_id, "refresh token replayed; revoking its session");
            auth.revoke_session(&session_id).await?;
            return Err(TokenError::Refused);
        }
        Redeemed::Refused => return Err(TokenError::Refused),
    };
    next_tokens(auth, session, now, false).await
}
