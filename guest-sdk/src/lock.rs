//! The host's `lock` capability: named locks with leases and fencing tokens.

use std::time::Duration;

use crate::capabilities::lock as wit;
use crate::{Problem, StatusCode};
pub use wit::Error;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Waits up to `wait` for `name`, then holds it for `ttl` unless renewed. Dropping the
/// [`Lease`] releases it.
pub fn acquire(name: &str, ttl: Duration, wait: Duration) -> Result<Lease, Error> {
    wit::acquire(name, ms(ttl), ms(wait)).map(Lease)
}

pub struct Lease(wit::Lease);

impl Lease {
    /// Pass this to what the lock protects, so it can refuse a holder whose lease ended.
    pub fn fencing_token(&self) -> u64 {
        self.0.fencing_token()
    }
    pub fn renew(&self, ttl: Duration) -> Result<(), Error> {
        self.0.renew(ms(ttl))
    }
    pub fn release(self) -> Result<(), Error> {
        self.0.release()
    }
}

impl From<Error> for Problem {
    fn from(e: Error) -> Self {
        match e {
            Error::Busy => {
                Problem::new(StatusCode::CONFLICT, "busy", "The resource is busy; retry")
            }
            Error::Lost => Problem::new(StatusCode::CONFLICT, "lock-lost", "The lock was lost"),
            Error::Unavailable => Problem::unavailable("lock"),
            Error::Invalid(m) => Problem::internal(format!("lock call refused: {m}")),
        }
    }
}
