//! Who is calling, as the host verified it, and tokens the host issues.
//!
//! On a route with an `auth` policy the host verifies the bearer token before the function
//! runs and passes the principal along; [`principal`] reads it. The host removes any copy a
//! client sends, so it can be trusted. Signing keys stay in the host: [`issue`], [`refresh`] and
//! [`revoke`] ask it (they need the `auth` capability).

use crate::capabilities::auth as wit;
use crate::{Body, Problem, Request, StatusCode};
pub use wit::{Error, Tokens};

/// The caller, as verified by the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    /// The token's id (`jti`).
    pub token_id: String,
    /// The session of a token wasmgate issued: what [`revoke`] ends on logout.
    pub session: Option<String>,
    pub issuer: String,
}

impl Principal {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

fn header<'a>(req: &'a Request<Body>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The verified principal of this request; `None` without a token (or outside wasmgate).
pub fn principal(req: &Request<Body>) -> Option<Principal> {
    let subject = header(req, "wasmgate-principal-subject")?.to_string();
    let list = |name: &str, sep: char| -> Vec<String> {
        header(req, name)
            .unwrap_or_default()
            .split(sep)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    Some(Principal {
        subject,
        roles: list("wasmgate-principal-roles", ','),
        scopes: list("wasmgate-principal-scopes", ' '),
        token_id: header(req, "wasmgate-principal-token-id")
            .unwrap_or_default()
            .to_string(),
        session: header(req, "wasmgate-principal-session").map(str::to_string),
        issuer: header(req, "wasmgate-principal-issuer")
            .unwrap_or_default()
            .to_string(),
    })
}

/// Starts a session for `subject` with `roles` (plus those an operator granted).
pub fn issue(subject: &str, roles: &[&str]) -> Result<Tokens, Error> {
    let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    wit::issue(subject, &roles)
}

/// Rotates a refresh token into the session's next tokens.
pub fn refresh(refresh_token: &str) -> Result<Tokens, Error> {
    wit::refresh(refresh_token)
}

/// Ends a session on every replica.
pub fn revoke(session: &str) -> Result<(), Error> {
    wit::revoke(session)
}

impl From<Error> for Problem {
    fn from(e: Error) -> Self {
        match e {
            Error::Unavailable | Error::Timeout => Problem::unavailable("auth"),
            Error::Invalid(m) => Problem::internal(format!("token request refused: {m}")),
            Error::Refused => {
                Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized")
                    .with_detail("the refresh token is not valid")
            }
        }
    }
}
