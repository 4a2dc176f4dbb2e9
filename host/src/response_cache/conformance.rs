//! The response cache's conformance suite, run on the embedded default (L1 only) and with L2 on
//! a real Redis (`REDIS_URL`, default 127.0.0.1:6379); plus what only two processes sharing
//! Redis can show: a purge in one reaches the other, and L2 serves what the other filled.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{Entry, Filled, NotStored, ResponseCache, Source};
use crate::capabilities::cache::conformance::redis_url;
use crate::snapshot::Snapshot;

/// A cache on Redis whose purge subscription is up (it empties L1 when it starts).
async fn with_redis() -> ResponseCache {
    let url = redis_url();
    let client = redis::Client::open(url.as_str()).expect("redis url");
    let conn = crate::capabilities::cache::redis_manager(&url).expect("redis url");
    let cache = ResponseCache::with_redis(client, conn);
    let started = std::time::Instant::now();
    while !cache.is_listening() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "purge subscription never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cache
}

fn unique(what: &str) -> String {
    format!("conformance-{what}:{}", uuid::Uuid::new_v4().simple())
}

fn entry(body: &str, tags: &[&str], ttl: Duration) -> Entry {
    let response = Snapshot {
        status: 200,
        headers: vec![("content-type".into(), b"text/plain".to_vec())],
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
    };
    Entry::new(response, tags.iter().map(|t| t.to_string()).collect(), ttl)
}

/// Fills `key` with `body` unless an entry is served; returns the body served and its source.
async fn get(cache: &ResponseCache, key: &str, body: &str, tags: &[&str]) -> (String, Source) {
    match cache
        .get_or_fill(key, async {
            Ok(entry(body, tags, Duration::from_secs(30)))
        })
        .await
    {
        Filled::Entry(e, source) => (String::from_utf8_lossy(&e.response.body).into(), source),
        Filled::NotStored(_) => panic!("a fill that keeps must store"),
    }
}

async fn suite(cache: ResponseCache) {
    assert!(cache.ping().await, "backend reachable");
    let tag = unique("tag");

    // Miss fills, hit serves without filling.
    let key = unique("key");
    assert_eq!(
        get(&cache, &key, "one", &[&tag]).await,
        ("one".into(), Source::Fill)
    );
    assert_eq!(
        get(&cache, &key, "two", &[&tag]).await,
        ("one".into(), Source::Memory)
    );

    // Purge by tag forgets it at once; other tags are untouched.
    let other = unique("key");
    let other_tag = unique("tag");
    get(&cache, &other, "kept", &[&other_tag]).await;
    cache
        .purge(std::slice::from_ref(&tag))
        .await
        .expect("purge");
    assert!(
        cache.lookup(&key).await.is_none(),
        "purged entry not served"
    );
    assert_eq!(
        get(&cache, &key, "three", &[&tag]).await,
        ("three".into(), Source::Fill)
    );
    assert_eq!(get(&cache, &other, "x", &[&other_tag]).await.0, "kept");

    // A fill that began before a purge is not served after it.
    let racing = unique("key");
    let racing_tag = unique("tag");
    let filled = cache
        .get_or_fill(&racing, async {
            cache
                .purge(std::slice::from_ref(&racing_tag))
                .await
                .expect("purge");
            Ok(entry("old", &[&racing_tag], Duration::from_secs(30)))
        })
        .await;
    assert!(
        matches!(filled, Filled::Entry(..)),
        "the filler still gets its answer"
    );
    assert!(cache.lookup(&racing).await.is_none(), "stale fill not kept");
    assert_eq!(get(&cache, &racing, "new", &[&racing_tag]).await.0, "new");

    // Expiry.
    let short = unique("key");
    let filled = cache
        .get_or_fill(&short, async {
            Ok(entry("brief", &[], Duration::from_millis(200)))
        })
        .await;
    assert!(matches!(filled, Filled::Entry(..)));
    assert!(cache.lookup(&short).await.is_some());
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(cache.lookup(&short).await.is_none(), "expired in memory");
    assert_eq!(
        get(&cache, &short, "again", &[]).await,
        ("again".into(), Source::Fill)
    );

    // Not stored: nothing kept, the reason handed back.
    let uncached = unique("key");
    let filled = cache
        .get_or_fill(&uncached, async { Err(NotStored { shared: None }) })
        .await;
    assert!(matches!(filled, Filled::NotStored(n) if n.shared.is_none()));
    assert!(cache.lookup(&uncached).await.is_none());

    // Single flight: 16 concurrent misses, one fill, everyone gets its answer.
    let hot = unique("key");
    let fills = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (cache, hot, fills) = (cache.clone(), hot.clone(), fills.clone());
            tokio::spawn(async move {
                let filled = cache
                    .get_or_fill(&hot, async {
                        fills.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok(entry("once", &[], Duration::from_secs(30)))
                    })
                    .await;
                match filled {
                    Filled::Entry(e, source) => (e.response.body.clone(), source),
                    Filled::NotStored(_) => (bytes::Bytes::new(), Source::Memory),
                }
            })
        })
        .collect();
    let mut sources = Vec::new();
    for t in tasks {
        let (body, source) = t.await.expect("task");
        assert_eq!(body, &b"once"[..]);
        sources.push(source);
    }
    assert_eq!(fills.load(Ordering::SeqCst), 1, "one fill for 16 misses");
    let waited = sources.iter().filter(|s| **s == Source::Coalesced).count();
    assert_eq!(waited, 15, "the others waited for it: {sources:?}");
}

#[tokio::test]
async fn in_memory_conforms() {
    suite(ResponseCache::in_memory()).await;
}

#[tokio::test]
async fn redis_conforms() {
    suite(with_redis().await).await;
}

#[tokio::test]
async fn two_processes_share_l2_and_purges() {
    let (a, b) = (with_redis().await, with_redis().await);
    let key = unique("key");
    let tag = unique("tag");
    assert_eq!(get(&a, &key, "from a", &[&tag]).await.1, Source::Fill);
    // B finds A's fill in L2 without filling, then holds it in memory.
    assert_eq!(
        get(&b, &key, "from b", &[&tag]).await,
        ("from a".into(), Source::Shared)
    );
    assert_eq!(get(&b, &key, "from b", &[&tag]).await.1, Source::Memory);

    // A purges: B stops serving it once the message arrives.
    let started = std::time::Instant::now();
    a.purge(std::slice::from_ref(&tag)).await.expect("purge");
    while b.lookup(&key).await.is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "purge never reached B"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eprintln!("purge reached the other process in {:?}", started.elapsed());
    assert_eq!(
        get(&b, &key, "fresh", &[&tag]).await,
        ("fresh".into(), Source::Fill)
    );
}

/// An entry's encoded variants travel with it: a second process serves the same bytes per
/// encoding, compressed by the first.
#[tokio::test]
async fn encoded_variants_are_shared_through_l2() {
    use crate::compression::Encoding;
    let (a, b) = (with_redis().await, with_redis().await);
    let key = unique("variants");
    let variants = vec![
        (Encoding::Br, bytes::Bytes::from_static(b"br bytes")),
        (Encoding::Gzip, bytes::Bytes::from_static(b"gzip bytes")),
    ];
    let stored = variants.clone();
    let filled = a
        .get_or_fill(&key, async move {
            Ok(entry("identity", &[], Duration::from_secs(30)).with_encoded(stored))
        })
        .await;
    assert!(matches!(filled, Filled::Entry(_, Source::Fill)));
    let Filled::Entry(e, source) = b
        .get_or_fill(&key, async { Err(NotStored { shared: None }) })
        .await
    else {
        panic!("B finds A's entry");
    };
    assert_eq!(source, Source::Shared);
    assert_eq!(e.encoded, variants);
    assert_eq!(&e.response.body[..], b"identity");
}

#[tokio::test]
async fn redis_down_degrades_to_memory() {
    // Nothing listens on port 1: L2 and purges fail, L1 keeps working.
    let url = "redis://127.0.0.1:1";
    let client = redis::Client::open(url).expect("url");
    let conn = crate::capabilities::cache::redis_manager(url).expect("url");
    let cache = ResponseCache::with_redis(client, conn);
    assert!(!cache.ping().await);
    let key = unique("key");
    let tag = unique("tag");
    assert_eq!(get(&cache, &key, "local", &[&tag]).await.1, Source::Fill);
    assert_eq!(get(&cache, &key, "x", &[&tag]).await.1, Source::Memory);
    assert!(
        cache.purge(std::slice::from_ref(&tag)).await.is_err(),
        "purge reports Redis down"
    );
    assert!(
        cache.lookup(&key).await.is_none(),
        "but this process forgot it"
    );
}

#[tokio::test]
async fn two_processes_fill_a_cold_key_once() {
    let caches = [with_redis().await, with_redis().await];
    let key = unique("cold");
    let fills = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (cache, key, fills) = (caches[i % 2].clone(), key.clone(), fills.clone());
            tokio::spawn(async move {
                let filled = cache
                    .get_or_fill(&key, async {
                        fills.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok(entry("once", &[], Duration::from_secs(30)))
                    })
                    .await;
                match filled {
                    Filled::Entry(e, _) => e.response.body.clone(),
                    Filled::NotStored(_) => bytes::Bytes::new(),
                }
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), &b"once"[..]);
    }
    assert_eq!(
        fills.load(Ordering::SeqCst),
        1,
        "one fill for two processes"
    );

    // A fill that keeps nothing lets the waiting process fill for itself at once.
    let key = unique("private");
    let (a, b) = (caches[0].clone(), caches[1].clone());
    let slow = tokio::spawn({
        let key = key.clone();
        async move {
            a.get_or_fill(&key, async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err(NotStored { shared: None })
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let waited = b
        .get_or_fill(&key, async {
            Ok(entry("own", &[], Duration::from_secs(30)))
        })
        .await;
    assert!(matches!(waited, Filled::Entry(e, Source::Fill) if e.response.body == b"own"[..]));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited {:?}",
        started.elapsed()
    );
    assert!(matches!(slow.await.expect("task"), Filled::NotStored(_)));
}
