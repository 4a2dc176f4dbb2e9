//! Redis Streams: a stream per topic (`wasmgate:events:<topic>`) and a consumer group per
//! subscription. Reading claims entries left idle by a dead consumer (`XAUTOCLAIM`) before new
//! ones (`XREADGROUP`); acknowledging is `XACK`, after the consumer's commit.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};

use super::broker::{Broker, BrokerError, Delivery};
use crate::capabilities::events::outbox::Stored;

const PREFIX: &str = "wasmgate:events:";

pub struct Streams {
    conn: ConnectionManager,
}

impl Streams {
    pub fn new(conn: ConnectionManager) -> Self {
        Self { conn }
    }
}

fn stream(topic: &str) -> String {
    format!("{PREFIX}{topic}")
}

fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// The event an entry carries.
fn event_of(topic: &str, entry: &StreamId) -> Result<Delivery, BrokerError> {
    let field = |name: &str| {
        entry
            .get::<String>(name)
            .ok_or_else(|| BrokerError::Corrupt(format!("entry {} has no `{name}`", entry.id)))
    };
    Ok(Delivery {
        entry: entry.id.clone(),
        event: Stored {
            id: field("id")?,
            topic: topic.into(),
            key: field("key")?,
            sequence: field("sequence")?
                .parse()
                .map_err(|_| BrokerError::Corrupt(format!("entry {}: sequence", entry.id)))?,
            payload: entry.get::<Vec<u8>>("payload").unwrap_or_default(),
            headers: serde_json::from_str(&field("headers")?)
                .map_err(|e| BrokerError::Corrupt(format!("entry {}: headers: {e}", entry.id)))?,
            source: field("source")?,
            created_at: field("created_at")?
                .parse()
                .map_err(|_| BrokerError::Corrupt(format!("entry {}: created_at", entry.id)))?,
        },
    })
}

#[async_trait]
impl Broker for Streams {
    fn kind(&self) -> &'static str {
        "redis-streams"
    }

    async fn append(&self, events: &[Stored]) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        for e in events {
            pipe.cmd("XADD")
                .arg(stream(&e.topic))
                .arg("*")
                .arg("id")
                .arg(&e.id)
                .arg("key")
                .arg(&e.key)
                .arg("sequence")
                .arg(e.sequence)
                .arg("payload")
                .arg(&e.payload)
                .arg("headers")
                .arg(serde_json::to_string(&e.headers).expect("strings serialize"))
                .arg("source")
                .arg(&e.source)
                .arg("created_at")
                .arg(e.created_at)
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn create_group(&self, topic: &str, group: &str) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream(topic))
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn read(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        max: usize,
        claim_idle: Option<Duration>,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let key = stream(topic);
        let mut conn = self.conn.clone();
        let mut out = Vec::new();
        if let Some(idle) = claim_idle {
            let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&key)
                .arg(group)
                .arg(consumer)
                .arg(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX))
                .arg("0-0")
                .arg("COUNT")
                .arg(max)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            for e in &claimed.claimed {
                out.push(event_of(topic, e)?);
            }
        }
        let room = max.saturating_sub(out.len());
        if room > 0 {
            let fresh: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(group)
                .arg(consumer)
                .arg("COUNT")
                .arg(room)
                .arg("STREAMS")
                .arg(&key)
                .arg(">")
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            for k in fresh.map(|r| r.keys).unwrap_or_default() {
                for e in &k.ids {
                    out.push(event_of(topic, e)?);
                }
            }
        }
        Ok(out)
    }

    async fn renew(
        &self,
        topic: &str,
        group: &str,
        consumer: &str,
        entries: &[String],
    ) -> Result<(), BrokerError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        // Claiming what it holds resets the entries' idle time; JUSTID leaves the delivery
        // count alone.
        redis::cmd("XCLAIM")
            .arg(stream(topic))
            .arg(group)
            .arg(consumer)
            .arg(0)
            .arg(entries)
            .arg("JUSTID")
            .query_async::<redis::Value>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn ack(&self, topic: &str, group: &str, entries: &[String]) -> Result<(), BrokerError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        redis::cmd("XACK")
            .arg(stream(topic))
            .arg(group)
            .arg(entries)
            .query_async::<u64>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
