//! Passwords (Argon2id) and sessions (random tokens in the cache capability, with a TTL).

use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use wasmgate_sdk::{Body, HeaderValue, Problem, Request, Response, StatusCode, cache};

/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(24 * 3600);

/// Verified against when the email is unknown, so a login for a missing account costs the same
/// as one with a wrong password and timing does not reveal who has an account. Same parameters
/// as real hashes (Argon2id, m=19456, t=2, p=1).
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$d2FzbWdhdGUtZHVtbXktc2FsdA$m8rcN9LEI3UXJ7P4MZKvRnFHznpmwP+nuCS4EIB5RB4";

pub fn hash_password(password: &str) -> Result<String, Problem> {
    let mut salt = [0u8; 16];
    wasmgate_sdk::wstd::rand::get_random_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| Problem::internal(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Problem::internal(e.to_string()))
}

/// Checks `password` against `hash`, or against the dummy hash when there is no account.
pub fn verify(password: &str, hash: Option<&str>) -> bool {
    let stored = hash.unwrap_or(DUMMY_HASH);
    let ok = PasswordHash::new(stored)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false);
    ok && hash.is_some()
}

pub fn unauthorized(detail: &str) -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized").with_detail(detail)
}

/// Adds the challenge a 401 must carry.
pub fn challenge(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    resp
}

/// Starts a session for `user_id`; returns the token and its expiry (µs since the epoch).
pub fn start_session(user_id: &str) -> Result<(String, i64), Problem> {
    let token = crate::store::random_hex(32);
    cache::set(
        &format!("session:{token}"),
        user_id.as_bytes(),
        Some(SESSION_TTL),
    )?;
    let expires = crate::store::now_micros() + i64::try_from(SESSION_TTL.as_micros()).unwrap_or(0);
    Ok((token, expires))
}

/// The user id behind the request's bearer token, if it is a live session.
pub fn session_user(req: &Request<Body>) -> Result<Option<String>, Problem> {
    let Some(token) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= 128)
    else {
        return Ok(None);
    };
    Ok(cache::get_string(&format!("session:{token}"))?)
}
