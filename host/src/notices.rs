//! Redis pub/sub notices between wasmgate processes: revocations and deployment changes.
//! Best effort by design: every user of a notice also polls the database, so a lost one costs
//! latency, never correctness.

use std::sync::Weak;
use std::time::Duration;

use futures::StreamExt;

/// Publishes `payload` on `channel`, bounded by the backend timeout. Returns whether Redis took
/// it.
pub async fn publish(conn: &redis::aio::ConnectionManager, channel: &str, payload: &str) -> bool {
    let sent = tokio::time::timeout(
        crate::capabilities::BACKEND_TIMEOUT,
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async::<i64>(&mut conn.clone()),
    )
    .await;
    matches!(sent, Ok(Ok(_)))
}

/// Hands every message on `channel` to `on_message` until `owner` is dropped, resubscribing
/// with backoff when the connection drops.
pub async fn listen<T>(
    client: redis::Client,
    channel: &'static str,
    owner: Weak<T>,
    on_message: impl Fn(&T, &[u8]),
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if let Ok(mut pubsub) = client.get_async_pubsub().await
            && pubsub.subscribe(channel).await.is_ok()
        {
            backoff = Duration::from_millis(100);
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let Some(o) = owner.upgrade() else { return };
                on_message(&o, msg.get_payload_bytes());
            }
            tracing::warn!(channel, "notice subscription lost; reconnecting");
        }
        if owner.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
