//! L2 on Redis, shared by every process, and the purge subscription.
//!
//! Keys (`wasmgate:rc:` prefix): `e2:<key>` an entry (postcard) with its TTL (`e2`: entries
//! with encoded variants; a process of the version before reads its own `e:` entries, so during a
//! rolling upgrade neither mistakes the other's for corrupt); `t:<tag>` the set of
//! entry keys carrying the tag; `p:<tag>` the purge sequence of the tag's last purge, kept for
//! twice [`FILL_WINDOW`]; `seq` the purge sequence; `f:<key>` while a process fills the key, so
//! the others wait for its entry instead of running the guest too. Both writes are Lua scripts,
//! so a purge and a store never interleave.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use super::{Entry, FILL_WINDOW, Inner};

const PREFIX: &str = "wasmgate:rc:";
/// Entry keys' part after the prefix (see the module docs).
const ENTRY: &str = "e2:";
/// Purged tags, newline-separated, are published here.
pub const CHANNEL: &str = "wasmgate:rc:purge";

/// Stores an entry unless one of its tags was purged after the fill began (`ARGV[3]`, the
/// purge sequence the fill saw). KEYS: entry, then n tag sets, then n purge records.
const STORE: &str = r"
local n = tonumber(ARGV[4])
for i = 1, n do
  local purged = redis.call('GET', KEYS[1 + n + i])
  if purged and tonumber(purged) > tonumber(ARGV[3]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 1, n do
  redis.call('SADD', KEYS[1 + i], KEYS[1])
  if redis.call('PTTL', KEYS[1 + i]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[1 + i], ARGV[2])
  end
end
return 1
";

/// Deletes every entry of the tags, records the purge and publishes it. KEYS: n tag sets, n
/// purge records, the sequence.
const PURGE: &str = r"
local n = tonumber(ARGV[1])
local seq = redis.call('INCR', KEYS[2 * n + 1])
for i = 1, n do
  for _, key in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    redis.call('UNLINK', key)
  end
  redis.call('UNLINK', KEYS[i])
  redis.call('SET', KEYS[n + i], seq, 'PX', ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return seq
";

/// How long a process may hold a key's fill before others stop waiting and fill it themselves.
const LEAD_TTL: Duration = Duration::from_secs(10);
/// How often a waiting process looks for the leader's entry.
const WAIT_POLL: Duration = Duration::from_millis(5);

fn decode(key: &str, bytes: Option<Vec<u8>>) -> Option<Entry> {
    match postcard::from_bytes::<Entry>(&bytes?) {
        Ok(e) if e.expires_at > super::unix_ms() => Some(e),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(key, error = %e, "corrupt shared cache entry ignored");
            None
        }
    }
}

pub struct RedisTier {
    conn: ConnectionManager,
    store: redis::Script,
    purge: redis::Script,
}

impl RedisTier {
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            store: redis::Script::new(STORE),
            purge: redis::Script::new(PURGE),
        }
    }

    /// The entry under `key`, and the purge sequence now (a fill that follows a miss passes it
    /// to [`RedisTier::put`]). One round trip.
    pub async fn get(&self, key: &str) -> redis::RedisResult<(Option<Entry>, u64)> {
        let mut conn = self.conn.clone();
        let (entry, seq): (Option<Vec<u8>>, Option<u64>) = conn
            .mget(&[format!("{PREFIX}{ENTRY}{key}"), format!("{PREFIX}seq")])
            .await?;
        Ok((decode(key, entry), seq.unwrap_or(0)))
    }

    /// Claims the fill of `key` across processes; false when another process holds it.
    pub async fn lead(&self, key: &str) -> redis::RedisResult<bool> {
        let set: Option<String> = redis::cmd("SET")
            .arg(format!("{PREFIX}f:{key}"))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(LEAD_TTL.as_millis()).unwrap_or(u64::MAX))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(set.is_some())
    }

    /// Ends this process's fill of `key` (after its entry, if any, is stored). Without an owner
    /// token a leader slower than [`LEAD_TTL`] may end a successor's claim: the cost is one
    /// more fill, never a wrong answer.
    pub async fn unlead(&self, key: &str) {
        let del = redis::cmd("DEL")
            .arg(format!("{PREFIX}f:{key}"))
            .query_async::<()>(&mut self.conn.clone())
            .await;
        if let Err(e) = del {
            tracing::debug!(error = %e, "fill claim not released; it expires on its own");
        }
    }

    /// Waits while another process fills `key`: its entry once stored, or `None` when that fill
    /// ended without one, Redis failed, or [`LEAD_TTL`] passed (then the caller fills itself).
    pub async fn wait_for(&self, key: &str) -> Option<Entry> {
        let deadline = Instant::now() + LEAD_TTL;
        let keys = [format!("{PREFIX}{ENTRY}{key}"), format!("{PREFIX}f:{key}")];
        while Instant::now() < deadline {
            tokio::time::sleep(WAIT_POLL).await;
            let (entry, lead): (Option<Vec<u8>>, Option<String>) =
                self.conn.clone().mget(&keys).await.ok()?;
            if let Some(entry) = decode(key, entry) {
                return Some(entry);
            }
            lead.as_ref()?;
        }
        None
    }

    /// Stores `entry` unless a tag was purged after `seen` (the sequence the fill's miss read).
    /// Returns whether it was stored.
    pub async fn put(&self, key: &str, entry: &Entry, seen: u64) -> redis::RedisResult<bool> {
        let ttl = entry.expires_at.saturating_sub(super::unix_ms());
        if ttl == 0 {
            return Ok(false);
        }
        let bytes = postcard::to_stdvec(entry).expect("an entry serializes");
        let mut inv = self.store.prepare_invoke();
        inv.key(format!("{PREFIX}{ENTRY}{key}"));
        for t in &entry.tags {
            inv.key(format!("{PREFIX}t:{t}"));
        }
        for t in &entry.tags {
            inv.key(format!("{PREFIX}p:{t}"));
        }
        inv.arg(bytes).arg(ttl).arg(seen).arg(entry.tags.len());
        let stored: i64 = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(stored == 1)
    }

    pub async fn purge(&self, tags: &[String]) -> redis::RedisResult<()> {
        let mut inv = self.purge.prepare_invoke();
        for t in tags {
            inv.key(format!("{PREFIX}t:{t}"));
        }
        for t in tags {
            inv.key(format!("{PREFIX}p:{t}"));
        }
        inv.key(format!("{PREFIX}seq"));
        let record_ms = u64::try_from((FILL_WINDOW * 2).as_millis()).unwrap_or(u64::MAX);
        inv.arg(tags.len())
            .arg(record_ms)
            .arg(CHANNEL)
            .arg(tags.join("\n"));
        let _seq: u64 = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    pub async fn ping(&self) -> redis::RedisResult<()> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn.clone())
            .await
    }
}

/// Listens for purges until the cache is dropped, reconnecting with backoff. Each (re)subscribe
/// empties L1: purges published while nobody listened are lost, and only that makes up for them.
pub(super) async fn subscribe(client: redis::Client, cache: Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(CHANNEL).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    match cache.upgrade() {
                        Some(c) => {
                            c.forget_all();
                            c.listening.store(true, Ordering::SeqCst);
                        }
                        None => return,
                    }
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let Some(c) = cache.upgrade() else { return };
                        let payload = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
                        let tags: Vec<String> = payload.split('\n').map(str::to_string).collect();
                        c.forget(&tags);
                    }
                    if let Some(c) = cache.upgrade() {
                        c.listening.store(false, Ordering::SeqCst);
                    }
                    tracing::warn!("response cache purge subscription lost; reconnecting");
                }
                Err(e) => tracing::warn!(error = %e, "cannot subscribe to response cache purges"),
            },
            Err(e) => tracing::debug!(error = %e, "cannot connect for response cache purges"),
        }
        if cache.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
