//! Publishing events through the host's `events` capability (the platform's outbox).
//!
//! ```ignore
//! let tx = db::begin()?;
//! tx.execute("UPDATE users SET name = $1 WHERE id = $2", &[name.into(), id.into()])?;
//! events::publish_json_in(&tx, "user.updated", &id, &change)?; // commits with the update
//! tx.commit()?;
//! ```

use serde::Serialize;

use crate::Problem;
use crate::capabilities::events as wit;
use crate::db::Transaction;
pub use wit::{Error, Event, Published};

fn event(topic: &str, key: &str, payload: Vec<u8>, headers: &[(&str, &str)]) -> Event {
    Event {
        topic: topic.into(),
        key: key.into(),
        payload,
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
    }
}

/// Publishes on its own: durable when this returns.
pub fn publish(
    topic: &str,
    key: &str,
    payload: &[u8],
    headers: &[(&str, &str)],
) -> Result<Published, Error> {
    wit::publish(&event(topic, key, payload.to_vec(), headers))
}

/// Publishes in `tx`: the event commits with the transaction's writes, or vanishes with them.
pub fn publish_in(
    tx: &Transaction,
    topic: &str,
    key: &str,
    payload: &[u8],
    headers: &[(&str, &str)],
) -> Result<Published, Error> {
    wit::publish_in(tx.raw(), &event(topic, key, payload.to_vec(), headers))
}

/// [`publish_in`] with `value` as JSON (`content-type: application/json`).
pub fn publish_json_in<T: Serialize>(
    tx: &Transaction,
    topic: &str,
    key: &str,
    value: &T,
) -> Result<Published, Problem> {
    let payload =
        serde_json::to_vec(value).map_err(|e| Problem::internal(format!("event payload: {e}")))?;
    Ok(wit::publish_in(
        tx.raw(),
        &event(topic, key, payload, &[("content-type", "application/json")]),
    )?)
}

impl From<Error> for Problem {
    fn from(e: Error) -> Self {
        match e {
            Error::Unavailable | Error::Timeout => Problem::unavailable("events"),
            Error::Invalid(m) | Error::InvalidState(m) => {
                Problem::internal(format!("event not published: {m}"))
            }
        }
    }
}
