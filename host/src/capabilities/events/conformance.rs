//! The outbox's conformance suite, on SQLite and on a real PostgreSQL (a fresh database next to
//! `DATABASE_URL`'s): an event commits or vanishes with its transaction, and one key's
//! sequence has no gaps and no repeats, however many writers publish on it at once.

use std::sync::Arc;

use super::Event;
use super::outbox;
use crate::capabilities::db::conformance::fresh_postgres;
use crate::capabilities::db::{Db, DbBackend};

fn event(topic: &str, key: &str, payload: &[u8]) -> Event {
    Event {
        topic: topic.into(),
        key: key.into(),
        payload: payload.to_vec(),
        headers: vec![("content-type".into(), "application/json".into())],
    }
}

async fn suite(db: Arc<dyn DbBackend>) {
    outbox::open(db.as_ref()).await.expect("open");
    outbox::open(db.as_ref())
        .await
        .expect("open again: nothing to do");

    // Rolled back: gone, and its sequence number with it.
    let mut tx = db.begin().await.expect("begin");
    let p = outbox::append(
        tx.as_mut(),
        db.kind(),
        "users",
        &event("user.created", "u1", b"{}"),
    )
    .await
    .expect("append");
    assert_eq!(p.sequence, 1);
    tx.rollback().await.expect("rollback");
    assert!(
        outbox::unsent(db.as_ref(), 10)
            .await
            .expect("read")
            .is_empty()
    );

    // Committed: there, with its bytes, headers and source; the key's next one is 2.
    // (The second on its own: `publish`, one statement on PostgreSQL, counts on the same key.)
    for (key, payload) in [
        ("u1", &b"\x00\xffbinary"[..]),
        ("u1", b"second"),
        ("u2", b"other"),
    ] {
        if payload == b"second" {
            let p = outbox::publish(db.as_ref(), "users", &event("user.created", key, payload))
                .await
                .expect("publish");
            assert_eq!(p.sequence, 2);
            continue;
        }
        let mut tx = db.begin().await.expect("begin");
        outbox::append(
            tx.as_mut(),
            db.kind(),
            "users",
            &event("user.created", key, payload),
        )
        .await
        .expect("append");
        tx.commit().await.expect("commit");
    }
    let stored = outbox::unsent(db.as_ref(), 10).await.expect("read");
    let seen: Vec<_> = stored
        .iter()
        .map(|e| (e.key.as_str(), e.sequence, e.payload.as_slice()))
        .collect();
    assert_eq!(
        seen,
        [
            ("u1", 1, &b"\x00\xffbinary"[..]),
            ("u1", 2, b"second"),
            ("u2", 1, b"other")
        ]
    );
    assert_eq!(stored[0].source, "users");
    assert_eq!(
        stored[0].headers,
        [("content-type".to_string(), "application/json".to_string())]
    );
    assert!(
        stored.windows(2).all(|w| w[0].id < w[1].id),
        "ids are time-ordered"
    );
    // The same key on another topic counts from 1.
    let mut tx = db.begin().await.expect("begin");
    let p = outbox::append(
        tx.as_mut(),
        db.kind(),
        "users",
        &event("user.deleted", "u1", b""),
    )
    .await
    .expect("append");
    tx.commit().await.expect("commit");
    assert_eq!(p.sequence, 1);

    // 16 writers on one key at once, some rolling back: the committed sequences are 1..=n.
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut tx = db.begin().await.expect("begin");
                let p = outbox::append(tx.as_mut(), db.kind(), "f", &event("hot", "k", b"x"))
                    .await
                    .expect("append");
                if i % 4 == 3 {
                    tx.rollback().await.expect("rollback");
                    None
                } else {
                    tx.commit().await.expect("commit");
                    Some(p.sequence)
                }
            })
        })
        .collect();
    let mut committed = Vec::new();
    for t in tasks {
        committed.extend(t.await.expect("task"));
    }
    committed.sort_unstable();
    assert_eq!(committed, (1..=12).collect::<Vec<u64>>());
    let hot: Vec<u64> = outbox::unsent(db.as_ref(), 100)
        .await
        .expect("read")
        .iter()
        .filter(|e| e.topic == "hot")
        .map(|e| e.sequence)
        .collect();
    assert_eq!(hot.len(), 12);
}

#[test]
fn events_are_checked() {
    let ok = event("user.created", "u1", b"{}");
    assert_eq!(outbox::check(&ok), Ok(()));
    for (bad, why) in [
        (
            Event {
                topic: "".into(),
                ..ok.clone()
            },
            "topic",
        ),
        (
            Event {
                topic: "User.Created".into(),
                ..ok.clone()
            },
            "topic",
        ),
        (
            Event {
                topic: "a".repeat(129),
                ..ok.clone()
            },
            "topic",
        ),
        (
            Event {
                key: "".into(),
                ..ok.clone()
            },
            "key",
        ),
        (
            Event {
                key: "k".repeat(257),
                ..ok.clone()
            },
            "key",
        ),
        (
            Event {
                payload: vec![0; outbox::MAX_PAYLOAD + 1],
                ..ok.clone()
            },
            "payload",
        ),
        (
            Event {
                headers: vec![("Bad Name".into(), "v".into())],
                ..ok.clone()
            },
            "header",
        ),
        (
            Event {
                headers: vec![("a".into(), "v".into()); 33],
                ..ok.clone()
            },
            "headers",
        ),
    ] {
        let refused = outbox::check(&bad).expect_err(why);
        assert!(refused.contains(why), "{refused}");
    }
}

#[tokio::test]
async fn sqlite_conforms() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    suite(Db::connect(&url).await.expect("sqlite").backend().clone()).await;
}

#[tokio::test]
async fn postgres_conforms() {
    let url = fresh_postgres().await;
    suite(Db::connect(&url).await.expect("postgres").backend().clone()).await;
}
