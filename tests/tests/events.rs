//! Publishing events, black-box: through the `events` capability an event lands in the outbox
//! on its own, or with the transaction that publishes it (and vanishes with one rolled back),
//! each key numbered in order, and relayed to the broker (the embedded queue, or a Redis
//! stream); a shadow run publishes nothing. Consumers are not built yet.

use reqwest::Method;
use serde_json::json;
use wasmgate_tests::{
    AdminApi, Server, fresh_postgres, publish_event as publish, redis_url, sql, with_admin,
};

const MANIFEST: &str = r#"
    [functions.publisher]
    wasm = "{wasm:publisher}"
    capabilities = ["db", "events"]
    [[routes]]
    path = "/publish/{topic}"
    methods = ["POST"]
    function = "publisher"
"#;

/// `topic`'s events in the outbox: `key|sequence|payload as text`, in sequence order.
fn outbox(db: &str, topic: &str) -> Vec<String> {
    sql(
        db,
        &format!(
            "SELECT key, sequence, source FROM wasmgate_outbox WHERE topic = '{topic}' ORDER BY key, sequence"
        ),
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// Waits until the relay has handed every event of the outbox to the broker.
async fn relayed(db: &str) {
    wasmgate_tests::until_sql(
        db,
        "SELECT count(*) FROM wasmgate_outbox WHERE sent_at IS NULL",
        "0",
        std::time::Duration::from_secs(10),
    )
    .await;
}

/// Publishes on `topic` (unique per test: a Redis stream outlives it) and checks the outbox;
/// returns how many events the topic got.
async fn publishes_with_its_transaction(s: &Server, db: &str, topic: &str) -> usize {
    let (status, first) = publish(s, topic, "key=a", r#"{"n":1}"#).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["sequence"], 1);
    assert_eq!(first["id"].as_str().map(str::len), Some(32), "{first}");
    let (status, second) = publish(s, topic, "key=a&tx=commit", "{}").await;
    assert_eq!((status, second["sequence"].as_u64()), (201, Some(2)));
    // Rolled back: the guest was told where it would land, and nothing of it is left.
    let (status, _) = publish(s, topic, "key=a&tx=rollback", "{}").await;
    assert_eq!(status, 201);
    let (_, other) = publish(s, topic, "key=b", "{}").await;
    assert_eq!(other["sequence"], 1, "keys are numbered apart");
    let (_, next) = publish(s, topic, "key=a", "{}").await;
    assert_eq!(
        next["sequence"], 3,
        "the rolled-back event took its number back"
    );
    assert_eq!(
        outbox(db, topic),
        [
            "a|1|publisher",
            "a|2|publisher",
            "a|3|publisher",
            "b|1|publisher"
        ]
    );
    assert_eq!(sql(db, "SELECT count(*) FROM publisher_writes").trim(), "1");
    let id = first["id"].as_str().expect("id");
    assert_eq!(
        sql(
            db,
            &format!("SELECT length(payload) FROM wasmgate_outbox WHERE id = '{id}'")
        )
        .trim(),
        "7"
    );

    // Refused (the guest gets `invalid` with the reason and answers 500), nothing written.
    let (status, problem) = publish(s, "Order%20Placed", "key=a", "{}").await;
    assert_eq!(status, 500, "{problem}");
    assert_eq!(outbox(db, topic).len(), 4);
    relayed(db).await;
    4
}

#[tokio::test]
async fn events_on_the_embedded_default() {
    let (s, _dir, db) = wasmgate_tests::start_embedded(MANIFEST);
    publishes_with_its_transaction(&s, &db, "order.placed").await;
    // Relayed to the embedded queue, in the same database.
    assert_eq!(
        sql(
            &db,
            "SELECT key, sequence FROM wasmgate_queue WHERE topic = 'order.placed' ORDER BY entry"
        )
        .lines()
        .collect::<Vec<_>>()
        .len(),
        4
    );
}

#[tokio::test]
async fn events_on_postgres_and_redis() {
    let db = fresh_postgres();
    let s = Server::start_with_args(
        MANIFEST,
        &["--database-url", &db, "--redis-url", &redis_url()],
    );
    let topic = format!("order.placed.{}", wasmgate_tests::unique_suffix());
    let n = publishes_with_its_transaction(&s, &db, &topic).await;
    // Relayed to a Redis stream of the topic.
    let stream = format!("wasmgate:events:{topic}");
    assert_eq!(wasmgate_tests::redis_cli(&["XLEN", &stream]), n.to_string());
    wasmgate_tests::redis_cli(&["DEL", &stream]);
}

#[test]
fn publishing_needs_the_grant() {
    let manifest = MANIFEST.replace(r#"["db", "events"]"#, r#"["db"]"#);
    let (ok, out) = wasmgate_tests::check(&manifest);
    assert!(!ok);
    assert!(
        out.contains("imports `wasmgate:platform/events@0.1.0` but is not granted `events`"),
        "{out}"
    );
}

/// A shadow of a publishing route runs the handler, and the outbox holds the live events only.
#[tokio::test]
async fn a_shadow_publishes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = fresh_postgres();
    let s = with_admin(dir.path(), MANIFEST, &["--database-url", &db]);
    let api = AdminApi::of(&s);
    api.upload("publisher", "a", "publisher").await;
    api.first("publisher", "a").await;
    api.upload("publisher", "b", "publisher").await;
    api.call(
        Method::PUT,
        "publisher/shadow",
        Some(json!({"version": "b", "percent": 100})),
    )
    .await;
    for (i, mode) in ["none", "commit", "none", "commit", "none"]
        .iter()
        .enumerate()
    {
        let (status, published) = publish(&s, "audit", &format!("key=k&tx={mode}"), "{}").await;
        assert_eq!(
            (status, published["sequence"].as_u64()),
            (201, Some(i as u64 + 1))
        );
    }
    let r = api
        .shadow_compared("publisher", "/publish/{topic}", 5)
        .await;
    // Each shadow run answered 201 too, with an id of its own.
    assert_eq!(
        (r["compared"].as_u64(), r["body_differs"].as_u64()),
        (Some(5), Some(5)),
        "{r}"
    );
    assert_eq!(outbox(&db, "audit").len(), 5, "the live events only");
    assert_eq!(
        sql(&db, "SELECT count(*) FROM publisher_writes").trim(),
        "2"
    );
}

/// An event function (the `tally` fixture exports `wasmgate:platform/event-handler`) loads, and
/// a route to it is refused with the reason.
#[test]
fn a_route_to_an_event_function_is_refused() {
    let function = "[functions.tally]\nwasm = \"{wasm:tally}\"\ncapabilities = [\"db\"]\n";
    let hello = "[functions.hello]\nwasm = \"{wasm:hello}\"\n[[routes]]\npath = \"/hello\"\nfunction = \"hello\"\n";
    let (ok, out) = wasmgate_tests::check(&format!("{function}{hello}"));
    assert!(ok, "{out}");
    let routed = format!("{function}[[routes]]\npath = \"/tally\"\nfunction = \"tally\"\n");
    let (ok, out) = wasmgate_tests::check(&routed);
    assert!(!ok);
    assert!(
        out.contains("`tally` (manifest) is an event function (it exports `wasmgate:platform/event-handler`); a route needs an HTTP function"),
        "{out}"
    );
}
