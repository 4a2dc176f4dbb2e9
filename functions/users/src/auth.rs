//! Who may do what (passwords are hashed by the host: the `password` capability). Tokens are issued and verified by the host (the
//! `auth` capability and the routes' `auth` policies); this function only checks the principal
//! the host hands it, as a second line of defence.

use wasmgate_sdk::auth::{self, Principal, Tokens};
use wasmgate_sdk::{Body, HeaderValue, Problem, Request, Response, StatusCode};

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
