//! The idempotency store's conformance suite, on SQLite and on a real PostgreSQL (a fresh
//! database next to `DATABASE_URL`'s), plus concurrent claims from several "processes" (stores
//! with their own pools) on one PostgreSQL database.

use std::time::Duration;

use super::{Claim, Store};
use crate::capabilities::db::Db;
use crate::capabilities::db::conformance::fresh_postgres;
use crate::snapshot::Snapshot;

const LOCK: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn response(body: &str) -> Snapshot {
    Snapshot {
        status: 201,
        headers: vec![("location".into(), b"/v1/users/1".to_vec())],
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
    }
}

async fn open(url: &str) -> Store {
    Store::open(Db::connect(url).await.expect("db").backend().clone())
        .await
        .expect("idempotency table")
}

fn scope() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

async fn suite(store: Store) {
    // First claim runs; a retry while it runs is in flight; another payload is a mismatch.
    let s = scope();
    let Claim::Run(token) = store.claim(&s, "fp", LOCK, TTL).await.expect("claim") else {
        panic!("the first request runs");
    };
    assert_eq!(
        store.claim(&s, "fp", LOCK, TTL).await.expect("claim"),
        Claim::InFlight
    );
    assert_eq!(
        store.claim(&s, "other", LOCK, TTL).await.expect("claim"),
        Claim::Mismatch
    );

    // Completed: replayed byte for byte; another payload still a mismatch.
    store
        .complete(&token, &response("made"))
        .await
        .expect("complete");
    assert_eq!(
        store.claim(&s, "fp", LOCK, TTL).await.expect("claim"),
        Claim::Replay(response("made"))
    );
    assert_eq!(
        store.claim(&s, "other", LOCK, TTL).await.expect("claim"),
        Claim::Mismatch
    );

    // Released (the function failed): the retry runs again.
    let s = scope();
    let Claim::Run(token) = store.claim(&s, "fp", LOCK, TTL).await.expect("claim") else {
        panic!("runs");
    };
    store.release(&token).await.expect("release");
    assert!(matches!(
        store.claim(&s, "fp", LOCK, TTL).await.expect("claim"),
        Claim::Run(_)
    ));

    // A claim whose owner vanished is taken over after its lock; the old owner can then
    // neither complete nor release the new owner's row.
    let s = scope();
    let Claim::Run(stale) = store
        .claim(&s, "fp", Duration::ZERO, TTL)
        .await
        .expect("claim")
    else {
        panic!("runs");
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let Claim::Run(fresh) = store.claim(&s, "fp", LOCK, TTL).await.expect("claim") else {
        panic!("a dead owner's claim is taken over");
    };
    store
        .complete(&stale, &response("late"))
        .await
        .expect("no-op");
    store.release(&stale).await.expect("no-op");
    assert_eq!(
        store.claim(&s, "fp", LOCK, TTL).await.expect("claim"),
        Claim::InFlight
    );
    store
        .complete(&fresh, &response("new owner"))
        .await
        .expect("complete");
    assert_eq!(
        store.claim(&s, "fp", LOCK, TTL).await.expect("claim"),
        Claim::Replay(response("new owner"))
    );

    // Expired: the key is free again, even for another payload.
    let s = scope();
    let Claim::Run(token) = store
        .claim(&s, "fp", LOCK, Duration::from_millis(1))
        .await
        .expect("claim")
    else {
        panic!("runs");
    };
    store
        .complete(&token, &response("old"))
        .await
        .expect("complete");
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(matches!(
        store.claim(&s, "new", LOCK, TTL).await.expect("claim"),
        Claim::Run(_)
    ));
}

#[tokio::test]
async fn sqlite_conforms() {
    let dir = tempfile::tempdir().expect("tmp");
    suite(open(&format!("sqlite://{}", dir.path().join("t.db").display())).await).await;
}

#[tokio::test]
async fn postgres_conforms() {
    suite(open(&fresh_postgres().await).await).await;
}

#[tokio::test]
async fn survives_reopening() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let s = scope();
    {
        let store = open(&url).await;
        let Claim::Run(token) = store.claim(&s, "fp", LOCK, TTL).await.expect("claim") else {
            panic!("runs");
        };
        store
            .complete(&token, &response("kept"))
            .await
            .expect("complete");
    }
    let store = open(&url).await;
    assert_eq!(
        store.claim(&s, "fp", LOCK, TTL).await.expect("claim"),
        Claim::Replay(response("kept"))
    );
}

#[tokio::test]
async fn concurrent_claims_on_postgres_run_once() {
    let url = fresh_postgres().await;
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(open(&url).await);
    }
    let s = scope();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (store, s) = (stores[i % 4].clone(), s.clone());
            tokio::spawn(async move { store.claim(&s, "fp", LOCK, TTL).await.expect("claim") })
        })
        .collect();
    let mut runs = 0;
    for t in tasks {
        match t.await.expect("task") {
            Claim::Run(_) => runs += 1,
            Claim::InFlight => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(runs, 1, "exactly one claim wins");
}
