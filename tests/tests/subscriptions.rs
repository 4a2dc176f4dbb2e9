//! Consuming events exactly once, black-box: the `publisher` fixture publishes amounts, the
//! `tally` event function (subscribed to them) keeps a total per key and records each event
//! under a unique id, rejecting any event older than one its key applied. So a lost event
//! shows in the totals, a double application as a unique violation (a dead letter), and a key
//! applied out of order as a rejection (a dead letter).

use std::time::{Duration, Instant};

use wasmgate_tests::{Server, fresh_postgres, publish_event, redis_url, sql};

/// `topic` is new for each test: a Redis stream outlives it.
fn manifest(topic: &str, extra: &str) -> String {
    format!(
        r#"
        [functions.publisher]
        wasm = "{{wasm:publisher}}"
        capabilities = ["db", "events"]
        [functions.tally]
        wasm = "{{wasm:tally}}"
        capabilities = ["db"]
        timeout = "1s"
        [[routes]]
        path = "/publish/{{topic}}"
        methods = ["POST"]
        function = "publisher"
        [[subscriptions]]
        topic = "{topic}"
        function = "tally"
        redeliver_after = "2s"
        {extra}
        "#
    )
}

async fn publish(s: &Server, topic: &str, key: &str, body: &str) {
    let (status, answer) = publish_event(s, topic, &format!("key={key}"), body).await;
    assert_eq!(status, 201, "{answer}");
}

/// Waits until `query` answers `want` (at most 30 s).
async fn until(db: &str, query: &str, want: &str) {
    wasmgate_tests::until_sql(db, query, want, Duration::from_secs(30)).await;
}

fn totals(db: &str) -> String {
    sql(
        db,
        "SELECT key, total, last_sequence FROM tally_totals ORDER BY key",
    )
}

/// 100 events over 10 keys, then every one of them delivered twice more in shuffled order, and
/// 60 events of 6 more keys delivered shuffled from the start: each applied once, in its key's
/// order (the embedded queue, in PostgreSQL).
#[tokio::test]
async fn duplicates_and_shuffled_deliveries_are_applied_once_in_order() {
    let db = fresh_postgres();
    let s = Server::start_with_args(&manifest("amounts", ""), &["--database-url", &db]);
    for i in 0..100 {
        publish(&s, "amounts", &format!("k{}", i % 10), &i.to_string()).await;
    }
    until(&db, "SELECT count(*) FROM tally_applied", "100").await;
    let expected: String = (0..10)
        .map(|k| {
            let total: i32 = (0..100).filter(|i| i % 10 == k).sum();
            format!("k{k}|{total}|10")
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(totals(&db), expected);

    // Every entry twice more, shuffled: what a broker redelivering does at its worst.
    for _ in 0..2 {
        sql(
            &db,
            "INSERT INTO wasmgate_queue (topic, id, key, sequence, payload, headers, source, created_at) \
             SELECT topic, id, key, sequence, payload, headers, source, created_at FROM wasmgate_queue \
             WHERE topic = 'amounts' ORDER BY random()",
        );
    }
    // 6 keys whose 10 events each arrive in random order (bypassing the outbox).
    sql(
        &db,
        "INSERT INTO wasmgate_queue (topic, id, key, sequence, payload, headers, source, created_at) \
         SELECT 'amounts', md5('shuffled' || g), 's' || (g % 6), (g / 6) + 1, convert_to(g::text, 'UTF8'), '[]', 'test', 0 \
         FROM generate_series(0, 59) g ORDER BY random()",
    );
    until(&db, "SELECT count(*) FROM wasmgate_queue_pending", "0").await;
    until(&db, "SELECT count(*) FROM tally_applied", "160").await;
    until(
        &db,
        "SELECT max(cursor) = (SELECT max(entry) FROM wasmgate_queue) FROM wasmgate_queue_groups",
        "t",
    )
    .await;
    assert_eq!(sql(&db, "SELECT count(*) FROM wasmgate_dead_letters"), "0");
    assert_eq!(sql(&db, "SELECT count(*) FROM wasmgate_inbox"), "160");
    let shuffled: String = (0..6)
        .map(|k| {
            let total: i32 = (0..60).filter(|g| g % 6 == k).sum();
            format!("s{k}|{total}|10")
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(totals(&db), format!("{expected}\n{shuffled}"));
}

/// On PostgreSQL and Redis Streams: a rejected event is a dead letter at once, one that keeps
/// failing after `max_attempts`; the key of a dead letter waits, the other keys flow.
#[tokio::test]
async fn failing_events_become_dead_letters_and_park_only_their_key() {
    let db = fresh_postgres();
    let topic = format!("amounts-{}", wasmgate_tests::unique_suffix());
    let m = manifest(&topic, "max_attempts = 3\nbackoff = \"50ms\"");
    let s = Server::start_with_args(&m, &["--database-url", &db, "--redis-url", &redis_url()]);
    for (key, body) in [
        ("p", "1"),
        ("p", "poison"),
        ("p", "2"),
        ("f", "fail"),
        ("ok", "1"),
        ("ok", "2"),
        ("ok", "3"),
    ] {
        publish(&s, &topic, key, body).await;
    }
    until(
        &db,
        "SELECT key, sequence, attempts, error FROM wasmgate_dead_letters ORDER BY key",
        "f|1|3|asked to fail\np|2|1|rejected: poison payload",
    )
    .await;
    until(
        &db,
        "SELECT key, total, last_sequence FROM tally_totals WHERE key = 'ok'",
        "ok|6|3",
    )
    .await;
    // p's third event waits behind its dead letter.
    assert_eq!(
        sql(
            &db,
            "SELECT key, total, last_sequence FROM tally_totals WHERE key = 'p'"
        ),
        "p|1|1"
    );
    wasmgate_tests::redis_cli(&["DEL", &format!("wasmgate:events:{topic}")]);
}

/// Two keys' events in one group (one consumer group at a time; PostgreSQL admits a group's
/// runs in one statement), one rejected in the middle of its key's run: it and its key's later
/// event are taken back (the later one waits behind the dead letter), the other key's run
/// applies in the same transaction.
#[tokio::test]
async fn a_rejected_event_in_a_group_takes_back_only_the_rest_of_its_key() {
    let db = fresh_postgres();
    let s = Server::start_with_args(
        &manifest("batch", "concurrency = 1"),
        &["--database-url", &db],
    );
    publish(&s, "batch", "warm", "1").await;
    until(&db, "SELECT count(*) FROM tally_applied", "1").await;
    // At once, so that one read takes them all.
    sql(
        &db,
        "INSERT INTO wasmgate_queue (topic, id, key, sequence, payload, headers, source, created_at) \
         SELECT 'batch', md5('batch' || k || n), k, n, convert_to(p, 'UTF8'), '[]', 'test', 0 \
         FROM (VALUES ('q', 1, '1'), ('q', 2, 'poison'), ('q', 3, '2'), ('r', 1, '1'), ('r', 2, '2'), ('r', 3, '3')) v (k, n, p)",
    );
    until(
        &db,
        "SELECT key, sequence, attempts, error FROM wasmgate_dead_letters",
        "q|2|1|rejected: poison payload",
    )
    .await;
    until(&db, "SELECT count(*) FROM tally_applied", "5").await;
    assert_eq!(totals(&db), "q|1|1\nr|6|3\nwarm|1|1");
    assert_eq!(
        sql(
            &db,
            "SELECT key, sequence FROM wasmgate_inbox_keys ORDER BY key"
        ),
        "q|1\nr|3\nwarm|1"
    );
    assert_eq!(sql(&db, "SELECT count(*) FROM wasmgate_inbox"), "5");
}

/// A consumer stopped (SIGSTOP) in the middle of an event, its transaction open, past
/// `redeliver_after`: PostgreSQL ends its session (the lease), another process takes the event
/// over and applies it, and the stopped one, woken, cannot commit: applied once.
#[tokio::test]
async fn a_paused_consumer_that_wakes_up_cannot_commit() {
    let db = fresh_postgres();
    let topic = format!("amounts-{}", wasmgate_tests::unique_suffix());
    let m = manifest(&topic, "");
    let a = Server::start_with_args(&m, &["--database-url", &db]);
    // One event first, so the handler's tables exist.
    publish(&a, &topic, "y", "1").await;
    until(&db, "SELECT count(*) FROM tally_applied", "1").await;
    publish(&a, &topic, "z", "slow:900:5").await;
    until(
        &db,
        // The group's transaction, idle in the handler (its last statement the admission), not
        // some other transaction of the consumer's.
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database() \
         AND state = 'idle in transaction' AND query LIKE '%wasmgate_inbox%'",
        "t",
    )
    .await;
    a.signal("STOP");
    let b = Server::start_with_args(&m, &["--database-url", &db]);
    let taken_over = wasmgate_tests::try_until_sql(
        &db,
        "SELECT count(*) FROM tally_applied",
        "2",
        Duration::from_secs(30),
    )
    .await;
    assert!(
        taken_over,
        "the second process did not apply the event in 30 s; its log:\n{}\nsessions: {}",
        b.log(),
        sql(
            &db,
            "SELECT state, left(query, 120) FROM pg_stat_activity WHERE datname = current_database()"
        )
    );
    a.signal("CONT");
    // A finishes its run and tries to commit; give it time to, then to see the duplicate.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sql(&db, "SELECT count(*) FROM tally_applied"), "2");
    assert_eq!(totals(&db), "y|1|1\nz|5|1");
    assert_eq!(sql(&db, "SELECT count(*) FROM wasmgate_dead_letters"), "0");
    until(&db, "SELECT count(*) FROM wasmgate_queue_pending", "0").await;
    drop(b);
}

/// Dead letters through the CLI: listed, replayed after the bug is fixed (each applied once,
/// its parked key moving on), replaying again changes nothing; a discarded one lets its key's
/// later events flow.
#[tokio::test]
async fn dead_letters_are_replayed_after_a_fix_and_discarded() {
    let db = fresh_postgres();
    let topic = format!("amounts-{}", wasmgate_tests::unique_suffix());
    let dir = tempfile::tempdir().expect("temp dir");
    let s = wasmgate_tests::with_admin(
        dir.path(),
        &manifest(&topic, "max_attempts = 2\nbackoff = \"20ms\""),
        &["--database-url", &db],
    );
    let admin = s.admin.clone().expect("admin");
    let name = format!("tally.{topic}");
    let cli = |args: &[&str]| {
        let mut all = vec!["dead-letters", name.as_str()];
        all.extend(args);
        wasmgate_tests::admin_cli(&admin, &all)
    };
    publish(&s, &topic, "a", "1").await;
    until(&db, "SELECT count(*) FROM tally_applied", "1").await;
    sql(&db, "CREATE TABLE IF NOT EXISTS tally_broken (why TEXT)");
    sql(&db, "INSERT INTO tally_broken VALUES ('a bug')");
    for (key, body) in [("a", "flaky:10"), ("a", "3"), ("b", "flaky:5"), ("c", "7")] {
        publish(&s, &topic, key, body).await;
    }
    until(
        &db,
        "SELECT key, sequence, attempts, state FROM wasmgate_dead_letters ORDER BY key",
        "a|2|2|dead\nb|1|2|dead",
    )
    .await;
    until(&db, "SELECT total FROM tally_totals WHERE key = 'c'", "7").await;
    let (code, out, err) = cli(&[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.contains("key a #2 (2 attempts) dead: tally is broken"),
        "{out}"
    );

    // The fix, then every dead letter again: each applied once, a's third event after them.
    sql(&db, "DELETE FROM tally_broken");
    let (code, out, err) = cli(&["--replay-all"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "2 dead letter(s) will run again");
    until(
        &db,
        "SELECT key, total, last_sequence FROM tally_totals ORDER BY key",
        "a|14|3\nb|5|1\nc|7|1",
    )
    .await;
    until(
        &db,
        "SELECT count(*) FROM wasmgate_dead_letters WHERE state = 'replayed'",
        "2",
    )
    .await;
    let (_, out, _) = cli(&["--replay-all"]);
    assert_eq!(out.trim(), "0 dead letter(s) will run again");
    let id = sql(
        &db,
        "SELECT event_id FROM wasmgate_dead_letters WHERE key = 'a'",
    );
    let (code, _, err) = cli(&["--replay", &id]);
    assert_ne!(code, 0);
    assert!(err.contains("is not a dead letter"), "{err}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(sql(&db, "SELECT count(*) FROM tally_applied"), "5");

    // Given up on: its key's next event flows.
    publish(&s, &topic, "d", "poison").await;
    publish(&s, &topic, "d", "4").await;
    until(
        &db,
        "SELECT count(*) FROM wasmgate_dead_letters WHERE key = 'd' AND state = 'dead'",
        "1",
    )
    .await;
    let id = sql(
        &db,
        "SELECT event_id FROM wasmgate_dead_letters WHERE key = 'd'",
    );
    let (code, out, err) = cli(&["--show", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("payload: poison"), "{out}");
    let (code, out, err) = cli(&["--discard", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("discarded"), "{out}");
    until(
        &db,
        "SELECT total, last_sequence FROM tally_totals WHERE key = 'd'",
        "4|2",
    )
    .await;
}

/// 10,000 events over 1,000 keys, each in the queue 1 to 3 times, all shuffled, consumed by two
/// processes while one of them is killed (SIGKILL) and restarted three times at random points:
/// 0 lost, 0 applied twice, every key in order.
#[tokio::test]
async fn ten_thousand_events_survive_killed_consumers() {
    let db = fresh_postgres();
    let m = manifest("amounts", "");
    let a = Server::start_with_args(&m, &["--database-url", &db]);
    // The handler's tables, before the load.
    publish(&a, "amounts", "warm", "0").await;
    until(&db, "SELECT count(*) FROM tally_applied", "1").await;
    let started = Instant::now();
    sql(
        &db,
        "INSERT INTO wasmgate_queue (topic, id, key, sequence, payload, headers, source, created_at) \
         SELECT 'amounts', md5('load' || g), 'k' || (g % 1000), (g / 1000) + 1, convert_to(g::text, 'UTF8'), '[]', 'test', 0 \
         FROM generate_series(0, 9999) g, generate_series(1, 3) copy \
         WHERE copy = 1 OR random() < 0.5 ORDER BY random()",
    );
    let deliveries = sql(
        &db,
        "SELECT count(*) FROM wasmgate_queue WHERE source = 'test'",
    );
    let mut b = Server::start_with_args(&m, &["--database-url", &db]);
    let mut kills = 0;
    let mut seen = Vec::new();
    while kills < 3 {
        let mut r = [0u8; 1];
        getrandom::fill(&mut r).expect("random");
        tokio::time::sleep(Duration::from_millis(300 + u64::from(r[0]) * 8)).await;
        seen.push(sql(&db, "SELECT count(*) FROM tally_applied"));
        b.signal("KILL");
        kills += 1;
        b = Server::start_with_args(&m, &["--database-url", &db]);
    }
    let started_wait = Instant::now();
    loop {
        let applied = sql(&db, "SELECT count(*) FROM tally_applied");
        if applied == "10001" {
            break;
        }
        assert!(
            started_wait.elapsed() < Duration::from_secs(240),
            "{applied} of 10001 applied"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "10,000 events ({deliveries} deliveries) applied in {:.1} s by two processes, one killed {kills} times (applied at the kills: {seen:?})",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(sql(&db, "SELECT count(*) FROM wasmgate_dead_letters"), "0");
    // Every key: its 10 events, in order, summed once.
    assert_eq!(
        sql(
            &db,
            "SELECT count(*) FROM tally_totals t WHERE key LIKE 'k%' AND last_sequence = 10 \
             AND total = (SELECT sum(g) FROM generate_series(0, 9999) g WHERE 'k' || (g % 1000) = t.key)"
        ),
        "1000"
    );
    assert_eq!(
        sql(&db, "SELECT count(DISTINCT event_id) FROM wasmgate_inbox"),
        "10001"
    );
    drop(a);
}
