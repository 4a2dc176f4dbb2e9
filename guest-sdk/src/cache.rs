//! The host's `cache` capability: keys are private to this function.

use std::time::Duration;

use crate::Problem;
use crate::capabilities::cache as wit;
pub use wit::Error;

pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
    wit::get(key)
}

/// The value as UTF-8 text; a value that is not text reads as absent.
pub fn get_string(key: &str) -> Result<Option<String>, Error> {
    Ok(get(key)?.and_then(|v| String::from_utf8(v).ok()))
}

pub fn set(key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), Error> {
    let ttl_ms = ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1));
    wit::set(key, value, ttl_ms)
}

pub fn delete(key: &str) -> Result<bool, Error> {
    wit::delete(key)
}

pub fn increment(key: &str, delta: i64) -> Result<i64, Error> {
    wit::increment(key, delta)
}

impl From<Error> for Problem {
    fn from(e: Error) -> Self {
        match e {
            Error::Unavailable | Error::Timeout => Problem::unavailable("cache"),
            Error::Invalid(m) => Problem::internal(format!("cache call refused: {m}")),
        }
    }
}
