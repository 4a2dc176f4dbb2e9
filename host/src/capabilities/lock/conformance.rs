//! The lock conformance suite, run against every backend: in-process and a real Redis.

use std::sync::Arc;
use std::time::Duration;

use super::{LockBackend, LockError, MemoryLocks, RedisLocks};

fn unique(prefix: &str) -> String {
    format!("conformance:{prefix}:{}", uuid::Uuid::new_v4().simple())
}

const LONG: Duration = Duration::from_secs(10);

async fn suite(b: Arc<dyn LockBackend>) {
    b.ping().await.expect("backend reachable");

    // Exclusive while held; tokens increase per name.
    let n = unique("exclusive");
    let t1 = b
        .try_acquire(&n, LONG)
        .await
        .expect("acquire")
        .expect("free");
    assert_eq!(b.try_acquire(&n, LONG).await, Ok(None), "held");
    b.release(&n, t1).await.expect("release");
    let t2 = b
        .try_acquire(&n, LONG)
        .await
        .expect("acquire")
        .expect("free again");
    assert!(t2 > t1, "fencing tokens increase: {t1} then {t2}");
    b.renew(&n, t2, LONG).await.expect("renew while held");
    // Someone with a stale token can neither renew nor release.
    assert_eq!(b.renew(&n, t1, LONG).await, Err(LockError::Lost));
    assert_eq!(b.release(&n, t1).await, Err(LockError::Lost));
    b.release(&n, t2).await.expect("release");
    assert_eq!(
        b.release(&n, t2).await,
        Err(LockError::Lost),
        "released twice"
    );

    // An expired lease is lost: the next holder gets a higher token and the old holder can
    // touch nothing.
    let n = unique("expiry");
    let old = b
        .try_acquire(&n, Duration::from_millis(100))
        .await
        .expect("acquire")
        .expect("free");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let new = b
        .try_acquire(&n, LONG)
        .await
        .expect("acquire")
        .expect("expired lease");
    assert!(new > old);
    assert_eq!(b.renew(&n, old, LONG).await, Err(LockError::Lost));
    assert_eq!(b.release(&n, old).await, Err(LockError::Lost));
    assert_eq!(
        b.try_acquire(&n, LONG).await,
        Ok(None),
        "still held by the new holder"
    );
    b.release(&n, new).await.expect("release");

    // An expired lease cannot be renewed even when nobody took it.
    let n = unique("renew-expired");
    let t = b
        .try_acquire(&n, Duration::from_millis(100))
        .await
        .expect("acquire")
        .expect("free");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(b.renew(&n, t, LONG).await, Err(LockError::Lost));

    // Renewal extends the lease.
    let n = unique("renew");
    let t = b
        .try_acquire(&n, Duration::from_millis(200))
        .await
        .expect("acquire")
        .expect("free");
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.renew(&n, t, Duration::from_millis(400))
        .await
        .expect("renew");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        b.try_acquire(&n, LONG).await,
        Ok(None),
        "renewed lease still held"
    );

    // Contention: exactly one of many concurrent acquirers wins.
    let n = unique("race");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let b = b.clone();
            let n = n.clone();
            tokio::spawn(async move { b.try_acquire(&n, LONG).await })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        if t.await.expect("task").expect("acquire").is_some() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

#[tokio::test]
async fn in_process_conforms() {
    suite(Arc::new(MemoryLocks::default())).await;
}

#[tokio::test]
async fn redis_conforms() {
    let url = crate::capabilities::cache::conformance::redis_url();
    suite(Arc::new(RedisLocks::connect(&url).expect("redis url"))).await;
}
