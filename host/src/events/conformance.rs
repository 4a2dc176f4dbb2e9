//! The brokers' conformance suite: the embedded queue (on SQLite and on PostgreSQL) and Redis
//! Streams pass the same tests; and the relay hands every committed outbox row over once per
//! claim, again only when a claim lapsed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::broker::Broker;
use super::queue::Queue;
use super::relay::Relay;
use super::streams::Streams;
use crate::capabilities::db::conformance::fresh_postgres;
use crate::capabilities::db::{Db, DbBackend, Value};
use crate::capabilities::events::Event;
use crate::capabilities::events::outbox::{self, Stored};

const LONG: Duration = Duration::from_secs(60);

fn stored(topic: &str, key: &str, sequence: u64, payload: &[u8]) -> Stored {
    Stored {
        id: outbox::new_id(),
        topic: topic.into(),
        key: key.into(),
        sequence,
        payload: payload.to_vec(),
        headers: vec![("content-type".into(), "application/json".into())],
        source: "users".into(),
        created_at: 1_700_000_000_000,
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", uuid::Uuid::new_v4().simple())
}

async fn suite(broker: Arc<dyn Broker>) {
    let topic = unique("user.created");
    broker.create_group(&topic, "audit").await.expect("group");
    broker
        .create_group(&topic, "audit")
        .await
        .expect("again: nothing to do");
    assert!(
        broker
            .read(&topic, "nobody", "c1", 10, Some(LONG))
            .await
            .is_err(),
        "reading a group that does not exist fails"
    );

    let sent: Vec<Stored> = (1..=5)
        .map(|i| {
            stored(
                &topic,
                if i % 2 == 0 { "b" } else { "a" },
                i,
                &[0, 255, i as u8],
            )
        })
        .collect();
    broker.append(&sent).await.expect("append");

    // New entries in order, each handed out once.
    let first = broker
        .read(&topic, "audit", "c1", 3, Some(LONG))
        .await
        .expect("read");
    assert_eq!(
        first.iter().map(|d| &d.event).collect::<Vec<_>>(),
        sent[..3].iter().collect::<Vec<_>>(),
        "the events as appended, bytes and headers included"
    );
    let rest = broker
        .read(&topic, "audit", "c1", 10, Some(LONG))
        .await
        .expect("read");
    assert_eq!(rest.len(), 2);
    assert!(
        broker
            .read(&topic, "audit", "c2", 10, Some(LONG))
            .await
            .expect("read")
            .is_empty()
    );

    // Unacknowledged entries go to whoever asks once they have been idle long enough.
    let entries = |ds: &[super::Delivery]| ds.iter().map(|d| d.entry.clone()).collect::<Vec<_>>();
    broker
        .ack(&topic, "audit", &entries(&first))
        .await
        .expect("ack");
    assert!(
        broker
            .read(&topic, "audit", "c2", 10, None)
            .await
            .expect("read")
            .is_empty(),
        "without a claim, idle entries stay with their consumer"
    );
    let again = broker
        .read(&topic, "audit", "c2", 10, Some(Duration::ZERO))
        .await
        .expect("claim");
    assert_eq!(
        entries(&again),
        entries(&rest),
        "the unacknowledged ones, again"
    );
    broker
        .ack(&topic, "audit", &entries(&again))
        .await
        .expect("ack");
    assert!(
        broker
            .read(&topic, "audit", "c2", 10, Some(Duration::ZERO))
            .await
            .expect("read")
            .is_empty()
    );

    // Another group reads the topic from its start, on its own.
    broker
        .create_group(&topic, "projection")
        .await
        .expect("group");
    let all = broker
        .read(&topic, "projection", "p", 10, Some(LONG))
        .await
        .expect("read");
    assert_eq!(all.len(), 5);

    // Four consumers of one group at once: every entry to exactly one of them.
    let busy = unique("hot");
    broker.create_group(&busy, "g").await.expect("group");
    let many: Vec<Stored> = (1..=100).map(|i| stored(&busy, "k", i, b"x")).collect();
    broker.append(&many).await.expect("append");
    let readers: Vec<_> = (0..4)
        .map(|c| {
            let (broker, busy) = (broker.clone(), busy.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let batch = broker
                        .read(&busy, "g", &format!("c{c}"), 7, Some(LONG))
                        .await
                        .expect("read");
                    if batch.is_empty() {
                        return got;
                    }
                    let ids: Vec<String> = batch.iter().map(|d| d.entry.clone()).collect();
                    broker.ack(&busy, "g", &ids).await.expect("ack");
                    got.extend(batch.into_iter().map(|d| d.event.sequence));
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    for r in readers {
        seen.extend(r.await.expect("reader"));
    }
    seen.sort_unstable();
    assert_eq!(seen, (1..=100).collect::<Vec<u64>>(), "each once");
}

/// Every committed event reaches the broker; two relays at once hand over each once; a claim
/// that lapsed (its relay died before marking) is handed over again.
async fn relay(db: Arc<dyn DbBackend>, broker: Arc<dyn Broker>) {
    outbox::open(db.as_ref()).await.expect("outbox");
    let topic = unique("relayed");
    broker.create_group(&topic, "g").await.expect("group");
    for i in 0..40 {
        let mut tx = db.begin().await.expect("begin");
        outbox::append(
            tx.as_mut(),
            db.kind(),
            "users",
            &Event {
                topic: topic.clone(),
                key: format!("k{}", i % 3),
                payload: vec![i],
                headers: vec![],
            },
        )
        .await
        .expect("append");
        tx.commit().await.expect("commit");
    }
    let (a, b) = (
        Relay::new(db.clone(), broker.clone()),
        Relay::new(db.clone(), broker.clone()),
    );
    let (ra, rb) = tokio::join!(a.pass(), b.pass());
    assert_eq!(ra.expect("a") + rb.expect("b"), 40);
    assert_eq!(a.pass().await.expect("a"), 0, "nothing left");
    let got = broker
        .read(&topic, "g", "c", 100, Some(LONG))
        .await
        .expect("read");
    let ids: BTreeSet<&str> = got.iter().map(|d| d.event.id.as_str()).collect();
    assert_eq!((got.len(), ids.len()), (40, 40), "each once");

    // A relay that claimed and died: nobody else takes its rows until the claim lapses.
    let mut tx = db.begin().await.expect("begin");
    outbox::append(
        tx.as_mut(),
        db.kind(),
        "users",
        &Event {
            topic: topic.clone(),
            key: "late".into(),
            payload: vec![],
            headers: vec![],
        },
    )
    .await
    .expect("append");
    tx.commit().await.expect("commit");
    let dead = outbox::claim(db.as_ref(), "dead-relay", 10, LONG, "")
        .await
        .expect("claim");
    assert_eq!(dead.len(), 1);
    assert_eq!(a.pass().await.expect("a"), 0, "claimed by another");
    let lapsed = outbox::claim(db.as_ref(), "next-relay", 10, Duration::ZERO, "")
        .await
        .expect("claim");
    assert_eq!(
        lapsed.iter().map(|e| &e.id).collect::<Vec<_>>(),
        [&dead[0].id]
    );

    // A pass looks from a starting id on (ids are time-ordered); a new relay's first pass
    // looks through everything, so a row written long ago and committed only now is not lost.
    let insert_old = |n: u32| {
        let (db, topic) = (db.clone(), topic.clone());
        async move {
            let id = format!("{}{n:020}", outbox::first_id_at(1_000));
            db.execute(
                "INSERT INTO wasmgate_outbox (id, topic, key, sequence, payload, headers, source, created_at) \
                 VALUES ($1, $2, 'old', $3, $4, '[]', 'users', 1000)",
                vec![
                    crate::capabilities::db::Value::Text(id.clone()),
                    crate::capabilities::db::Value::Text(topic),
                    crate::capabilities::db::Value::Int64(i64::from(n)),
                    crate::capabilities::db::Value::Bytes(vec![]),
                ],
            )
            .await
            .expect("an old row");
            id
        }
    };
    // A backlog stays in view while it drains: the next pass looks back from the oldest row
    // the last one found.
    let backlog = super::relay::BATCH + 10;
    for n in 0..backlog {
        insert_old(n).await;
    }
    let fresh = Relay::new(db.clone(), broker.clone());
    let batch = super::relay::BATCH as usize;
    assert_eq!(fresh.pass().await.expect("whole pass"), batch);
    assert_eq!(
        fresh.pass().await.expect("pass"),
        10,
        "the rest of the backlog"
    );
    assert_eq!(fresh.pass().await.expect("pass"), 0);
    let old = insert_old(backlog).await;
    assert_eq!(fresh.pass().await.expect("pass"), 0, "looks back 10 s only");
    let now = crate::auth::now_ms();
    for (from, found) in [
        (outbox::first_id_at(now - 60_000), false),
        (String::new(), true),
    ] {
        let claimed = outbox::claim(db.as_ref(), "look", 10, Duration::ZERO, &from)
            .await
            .expect("claim");
        assert_eq!(claimed.iter().any(|e| e.id == old), found, "from `{from}`");
    }
}

async fn sqlite() -> (tempfile::TempDir, Arc<dyn DbBackend>) {
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    let db = Db::connect(&url).await.expect("sqlite").backend().clone();
    (dir, db)
}

/// A fresh PostgreSQL database.
async fn postgres() -> Arc<dyn DbBackend> {
    Db::connect(&fresh_postgres().await)
        .await
        .expect("postgres")
        .backend()
        .clone()
}

async fn queue(db: &Arc<dyn DbBackend>) -> Arc<dyn Broker> {
    Arc::new(Queue::open(db.clone()).await.expect("queue"))
}

#[tokio::test]
async fn queue_on_sqlite_conforms() {
    let (_dir, db) = sqlite().await;
    let broker = queue(&db).await;
    suite(broker.clone()).await;
    relay(db, broker).await;
}

#[tokio::test]
async fn queue_on_postgres_conforms() {
    let db = postgres().await;
    let broker = queue(&db).await;
    suite(broker.clone()).await;
    relay(db, broker).await;
}

#[tokio::test]
async fn redis_streams_conform() {
    let url = crate::capabilities::cache::conformance::redis_url();
    let conn = crate::capabilities::cache::redis_manager(&url).expect("redis");
    let broker: Arc<dyn Broker> = Arc::new(Streams::new(conn));
    suite(broker.clone()).await;
    let (_dir, db) = sqlite().await;
    relay(db, broker).await;
}

/// The inbox's admission on `db`: a key's run taken back from any of its events leaves the key
/// where that event found it and the events unrecorded; from its first event, as if the key
/// had never been seen. On PostgreSQL whole runs are admitted in one statement, which takes only
/// when every event is new and every run follows on from its key.
async fn admission(db: Arc<dyn DbBackend>) {
    use super::broker::Delivery;
    use super::inbox::{self, Admission};
    inbox::open(db.as_ref()).await.expect("inbox");
    let topic = unique("accounts");
    let delivery = |key: &str, sequence| {
        Arc::new(Delivery {
            entry: format!("{key}-{sequence}"),
            event: stored(&topic, key, sequence, b"{}"),
        })
    };
    let a: Vec<_> = (1..=3).map(|s| delivery("a", s)).collect();
    let b: Vec<_> = (1..=2).map(|s| delivery("b", s)).collect();
    let sequences = |db: Arc<dyn DbBackend>, topic: String| async move {
        let found = inbox::key_sequences(db.as_ref(), "s", &topic, &["a", "b"])
            .await
            .expect("sequences");
        (found.get("a").copied(), found.get("b").copied())
    };
    let postgres = db.kind() == "postgres";
    let mut tx = db.begin().await.expect("begin");
    if postgres {
        assert!(
            inbox::admit_runs(tx.as_mut(), "s", &topic, &[&a, &b])
                .await
                .expect("admit")
        );
    } else {
        for d in a.iter().chain(&b) {
            let admitted = inbox::admit(tx.as_mut(), db.kind(), "s", d, true).await;
            assert_eq!(admitted.expect("admit"), Admission::Apply);
        }
    }
    inbox::unadmit(tx.as_mut(), "s", &a[1..], true)
        .await
        .expect("a from 2");
    inbox::unadmit(tx.as_mut(), "s", &b, true)
        .await
        .expect("b from 1");
    tx.commit().await.expect("commit");
    assert_eq!(sequences(db.clone(), topic.clone()).await, (Some(1), None));
    // What was taken back is new again: admitted one at a time it applies.
    let mut tx = db.begin().await.expect("begin");
    for d in [&a[1], &b[0]] {
        let admitted = inbox::admit(tx.as_mut(), db.kind(), "s", d, true).await;
        assert_eq!(admitted.expect("admit"), Admission::Apply, "{}", d.entry);
    }
    tx.rollback().await.expect("rollback");
    if !postgres {
        return;
    }
    // Runs that do not follow their key, or repeat an event, do not take as a whole.
    for (why, runs) in [
        ("a gap before a's run", vec![&a[2..]]),
        ("a's first event again", vec![&a[..1]]),
        ("b fine, a repeated", vec![&b[..], &a[..2]]),
    ] {
        let mut tx = db.begin().await.expect("begin");
        let took = inbox::admit_runs(tx.as_mut(), "s", &topic, &runs)
            .await
            .expect("admit");
        assert!(!took, "{why}");
        tx.rollback().await.expect("rollback");
    }
    let mut tx = db.begin().await.expect("begin");
    assert!(
        inbox::admit_runs(tx.as_mut(), "s", &topic, &[&a[1..], &b])
            .await
            .expect("admit")
    );
    tx.commit().await.expect("commit");
    assert_eq!(sequences(db, topic).await, (Some(3), Some(2)));
}

#[tokio::test]
async fn admission_on_sqlite() {
    let (_dir, db) = sqlite().await;
    admission(db).await;
}

#[tokio::test]
async fn admission_on_postgres() {
    let db = postgres().await;
    admission(db).await;
}

/// On PostgreSQL a one-key group's admission reads its key, not every key of its subscription
/// and topic, whatever plan the server picks: with 2,000 keys applied and the plan forced
/// generic (what a prepared statement gets after a few runs, with statistics from when the
/// table was empty), two admissions fetch a handful of key rows. (A group of several keys
/// still reads them all until the table has statistics: not fixed yet.)
#[tokio::test]
async fn a_group_admission_reads_only_its_keys() {
    use super::broker::Delivery;
    use super::inbox;
    let db = postgres().await;
    inbox::open(db.as_ref()).await.expect("inbox");
    let topic = unique("accounts");
    let mut tx = db.begin().await.expect("begin");
    tx.execute(
        "INSERT INTO wasmgate_inbox_keys (subscription, topic, key, sequence) \
         SELECT 's', $1, 'k' || g, 1 FROM generate_series(1, 2000) g",
        vec![Value::Text(topic.clone())],
    )
    .await
    .expect("keys");
    tx.commit().await.expect("commit");
    let mut tx = db.begin().await.expect("begin");
    tx.execute("SET LOCAL plan_cache_mode = force_generic_plan", vec![])
        .await
        .expect("generic plans");
    let run: Vec<_> = [("k7", 2), ("k1999", 2)]
        .into_iter()
        .map(|(key, sequence)| {
            Arc::new(Delivery {
                entry: format!("{key}-{sequence}"),
                event: stored(&topic, key, sequence, b"{}"),
            })
        })
        .collect();
    // Twice, so the second runs the prepared statement's plan.
    for (i, d) in run.iter().enumerate() {
        assert!(
            inbox::admit_runs(tx.as_mut(), "s", &topic, &[&run[i..=i]])
                .await
                .expect("admit"),
            "{}",
            d.entry
        );
    }
    let fetched = tx
        .query(
            "SELECT coalesce(idx_tup_fetch, 0) + coalesce(seq_tup_read, 0) FROM pg_stat_xact_user_tables \
             WHERE relname = 'wasmgate_inbox_keys'",
            vec![],
        )
        .await
        .expect("stats");
    let fetched = fetched.rows[0][0].int().expect("a count");
    assert!(fetched < 20, "two admissions read {fetched} key rows");
    tx.rollback().await.expect("rollback");
}
