//! Password hashing, done by the host (Argon2id in native code, the host's parameters). Needs
//! the `password` capability.
//!
//! ```ignore
//! // Sign-up: store `password::hash(&new.password)?`.
//! // Login: one verify whether or not the account exists, so timing tells nothing.
//! if !password::verify(&given, stored.as_deref())? { return Err(unauthorized()); }
//! if let Some(h) = &stored && password::needs_rehash(h)? { /* store password::hash(&given)? */ }
//! ```

use crate::Problem;
use crate::capabilities::password as wit;
pub use wit::Error;

/// A new hash of `password` (a PHC string, salted) to store.
pub fn hash(password: &str) -> Result<String, Error> {
    wit::hash(password)
}

/// Whether `password` matches `hash`; with `None` (no such account) the host does the same work
/// and answers `false`.
pub fn verify(password: &str, hash: Option<&str>) -> Result<bool, Error> {
    wit::verify(password, hash)
}

/// Whether `hash` predates the host's current parameters: store a new [`hash`] of the password
/// just verified.
pub fn needs_rehash(hash: &str) -> Result<bool, Error> {
    wit::needs_rehash(hash)
}

impl From<Error> for Problem {
    fn from(e: Error) -> Self {
        match e {
            Error::Busy => Problem::unavailable("password hashing"),
            Error::Invalid(m) => Problem::new(
                crate::StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-password",
                "The password cannot be used",
            )
            .with_detail(m),
            Error::Malformed(m) => Problem::internal(format!("stored password hash: {m}")),
        }
    }
}
