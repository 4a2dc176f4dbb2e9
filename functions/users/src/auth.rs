//! Passwords (Argon2id) and who may do what. Tokens are issued and verified by the host (the
//! `auth` capability and the routes' `auth` policies); this function only checks the principal
//! the host hands it, as a second line of defence.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use wasmgate_sdk::auth::{self, Principal, Tokens};
use wasmgate_sdk::{Body, HeaderValue, Problem, Request, Response, StatusCode};

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

/// The role that may read and change every account (granted with `wasmgate roles grant`).
pub const ADMIN: &str = "admin";

/// The verified caller; 401 without one. The host refuses such requests before the function
/// runs on routes with an `auth` policy: this is the second check, in case a manifest forgets.
pub fn caller(req: &Request<Body>) -> Result<Principal, Problem> {
    auth::principal(req).ok_or_else(|| unauthorized("a valid bearer token is required"))
}

/// The caller may act on account `id`: it is theirs, or they are an admin.
pub fn owner_or_admin(req: &Request<Body>, id: &str) -> Result<Principal, Problem> {
    let p = caller(req)?;
    if p.subject == id || p.has_role(ADMIN) {
        Ok(p)
    } else {
        Err(forbidden(
            "only the account's owner or an admin may do this",
        ))
    }
}

pub fn admin(req: &Request<Body>) -> Result<Principal, Problem> {
    let p = caller(req)?;
    if p.has_role(ADMIN) {
        Ok(p)
    } else {
        Err(forbidden("only an admin may do this"))
    }
}

pub fn forbidden(detail: &str) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden").with_detail(detail)
}

/// A new session for `user_id`, its tokens issued by the host.
pub fn start_session(user_id: &str) -> Result<Tokens, Problem> {
    Ok(auth::issue(user_id, &[])?)
}
