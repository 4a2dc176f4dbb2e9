//! The cache conformance suite, run against every backend: in-process and a real Redis
//! (`REDIS_URL`, default 127.0.0.1:6379).

use std::sync::Arc;
use std::time::Duration;

use super::{CacheBackend, CacheError, MemoryCache, RedisCache};

/// The Redis the tests use: `REDIS_URL`, or the local default.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn unique(prefix: &str) -> String {
    format!("conformance:{prefix}:{}", uuid::Uuid::new_v4().simple())
}

async fn suite(b: Arc<dyn CacheBackend>) {
    b.ping().await.expect("backend reachable");

    // get / set / overwrite / delete
    let k = unique("basic");
    assert_eq!(b.get(&k).await, Ok(None));
    b.set(&k, b"one".to_vec(), None).await.expect("set");
    assert_eq!(b.get(&k).await, Ok(Some(b"one".to_vec())));
    b.set(&k, vec![0, 159, 146, 150], None)
        .await
        .expect("overwrite with non-UTF-8");
    assert_eq!(b.get(&k).await, Ok(Some(vec![0, 159, 146, 150])));
    assert_eq!(b.delete(&k).await, Ok(true));
    assert_eq!(b.delete(&k).await, Ok(false));
    assert_eq!(b.get(&k).await, Ok(None));

    // TTL
    let k = unique("ttl");
    b.set(&k, b"short".to_vec(), Some(Duration::from_millis(150)))
        .await
        .expect("set with ttl");
    assert_eq!(b.get(&k).await, Ok(Some(b"short".to_vec())));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.get(&k).await, Ok(None), "expired");

    // increment: missing key counts as 0, stored as decimal text, negative deltas
    let k = unique("counter");
    assert_eq!(b.increment(&k, 5).await, Ok(5));
    assert_eq!(b.increment(&k, -2).await, Ok(3));
    assert_eq!(b.get(&k).await, Ok(Some(b"3".to_vec())));
    b.set(&k, b"not a number".to_vec(), None)
        .await
        .expect("set");
    assert!(matches!(
        b.increment(&k, 1).await,
        Err(CacheError::Invalid(_))
    ));
    assert_eq!(
        b.get(&k).await,
        Ok(Some(b"not a number".to_vec())),
        "unchanged"
    );

    // increment keeps an existing TTL
    let k = unique("counter-ttl");
    b.set(&k, b"10".to_vec(), Some(Duration::from_millis(150)))
        .await
        .expect("set");
    assert_eq!(b.increment(&k, 1).await, Ok(11));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.get(&k).await,
        Ok(None),
        "the counter expired with its TTL"
    );

    // concurrent increments are atomic
    let k = unique("atomic");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let b = b.clone();
            let k = k.clone();
            tokio::spawn(async move { b.increment(&k, 1).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("increment");
    }
    assert_eq!(b.get(&k).await, Ok(Some(b"50".to_vec())));
}

#[tokio::test]
async fn in_process_conforms() {
    suite(Arc::new(MemoryCache::new(1024 * 1024))).await;
}

#[tokio::test]
async fn redis_conforms() {
    suite(Arc::new(
        RedisCache::connect(&redis_url()).expect("redis url"),
    ))
    .await;
}

#[tokio::test]
async fn in_process_cache_stays_within_capacity() {
    let b = MemoryCache::new(64 * 1024);
    for i in 0..1000 {
        b.set(&format!("k{i}"), vec![0; 1024], None)
            .await
            .expect("set");
    }
    b.cache.run_pending_tasks().await;
    assert!(
        b.cache.weighted_size() <= 64 * 1024,
        "{}",
        b.cache.weighted_size()
    );
}
