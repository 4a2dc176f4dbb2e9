//! The users service's events, black-box: every write publishes `user.created`,
//! `user.updated` or `user.deleted` in its own transaction, and the `activity` event function
//! projects them into an audit log and a read model (`GET /v2/users/{id}/activity`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use wasmgate_tests::{
    Server, admin, bearer_client, fresh_postgres, get_status, sign_up, sql, start_embedded, token,
    until_sql, users_manifest,
};

/// Polls the read model of `id` until it has counted `events` events; returns it.
async fn activity(s: &Server, bearer: &str, id: &str, events: u64) -> Value {
    let client = bearer_client(bearer);
    let started = std::time::Instant::now();
    loop {
        let resp = client
            .get(s.url(&format!("/v2/users/{id}/activity")))
            .send()
            .await
            .expect("GET activity");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.expect("JSON body");
        if status == 200 && body["events"] == events {
            return body;
        }
        assert!(
            status == 200 || status == 404,
            "activity answered {status}: {body}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "waiting for {events} events of {id}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn patch(bearer: &str, url: String, headers: &[(&str, &str)], body: Value) -> u16 {
    let mut req = bearer_client(bearer).patch(url).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("PATCH");
    let status = resp.status().as_u16();
    resp.bytes().await.expect("body");
    status
}

fn topics(a: &Value) -> Vec<String> {
    a["recent"]
        .as_array()
        .expect("recent")
        .iter()
        .map(|e| e["topic"].as_str().expect("topic").to_string())
        .collect()
}

/// Creates, two updates (v1 and v2), two refused writes and a delete: the read model counts the
/// four changes (the refused writes published nothing), shows the newest state and who changed
/// what; only the owner and admins may read it; the events carry no password hash.
#[tokio::test]
async fn every_write_reaches_the_activity_projection_once() {
    let (s, _dir, db) = start_embedded(&users_manifest());
    let id = sign_up(&s, "ada@example.com").await;
    let ada = token(&s, "ada@example.com").await;
    let created = activity(&s, &ada, &id, 1).await;
    assert_eq!(created["email"], "ada@example.com");
    assert_eq!(created["version"], 1);
    assert_eq!(created["deleted_at"], Value::Null);

    let v2 = s.url(&format!("/v2/users/{id}"));
    let v1 = s.url(&format!("/v1/users/{id}"));
    assert_eq!(
        patch(&ada, v2.clone(), &[], json!({"name": "Ada L"})).await,
        200
    );
    assert_eq!(
        patch(&ada, v1, &[], json!({"email": "ada.l@example.com"})).await,
        200
    );
    // Refused writes roll back with their events: a stale If-Match, a taken email.
    assert_eq!(
        patch(
            &ada,
            v2.clone(),
            &[("if-match", "\"1\"")],
            json!({"name": "x"})
        )
        .await,
        412
    );
    sign_up(&s, "bob@example.com").await;
    assert_eq!(
        patch(&ada, v2.clone(), &[], json!({"email": "bob@example.com"})).await,
        409
    );

    let a = activity(&s, &ada, &id, 3).await;
    assert_eq!(a["name"], "Ada L");
    assert_eq!(a["email"], "ada.l@example.com");
    assert_eq!(a["version"], 3);
    assert_eq!(
        topics(&a),
        ["user.updated", "user.updated", "user.created"],
        "{a}"
    );
    assert_eq!(a["recent"][0]["changed"], json!(["email"]), "{a}");
    assert_eq!(a["recent"][1]["changed"], json!(["name"]), "{a}");
    assert!(
        a["created_at"].is_string() && a["updated_at"].is_string(),
        "{a}"
    );

    // Who may read it: the owner and admins; another account is refused, no token is a 401.
    let bob = token(&s, "bob@example.com").await;
    let activity_url = s.url(&format!("/v2/users/{id}/activity"));
    assert_eq!(get_status(&bearer_client(&bob), &activity_url).await, 403);
    assert_eq!(
        get_status(&reqwest::Client::new(), &activity_url).await,
        401
    );

    let (_, root) = admin(&s, "root@example.com").await;
    let resp = bearer_client(&root)
        .delete(&v2)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status(), 204);
    let gone = activity(&s, &root, &id, 4).await;
    assert!(gone["deleted_at"].is_string(), "{gone}");
    assert_eq!(topics(&gone)[0], "user.deleted");
    assert_eq!(gone["email"], "ada.l@example.com");

    // What the database holds: four events of this user, each applied once, none carrying the
    // password hash; no dead letter.
    assert_eq!(
        sql(
            &db,
            &format!("SELECT topic, sequence FROM wasmgate_outbox WHERE key = '{id}' ORDER BY id")
        ),
        "user.created|1\nuser.updated|1\nuser.updated|2\nuser.deleted|1"
    );
    let payloads = sql(
        &db,
        &format!("SELECT CAST(payload AS TEXT) FROM wasmgate_outbox WHERE key = '{id}'"),
    );
    assert!(payloads.contains("\"version\":3"), "{payloads}");
    assert!(
        !payloads.contains("argon2") && !payloads.contains("password"),
        "{payloads}"
    );
    assert_eq!(
        sql(
            &db,
            &format!(
                "SELECT count(*), count(DISTINCT event_id) FROM user_audit WHERE user_id = '{id}'"
            )
        ),
        "4|4"
    );
    assert_eq!(sql(&db, "SELECT count(*) FROM wasmgate_dead_letters"), "0");
}

/// Holds `LOCK TABLE wasmgate_queue IN EXCLUSIVE MODE` in a psql session until dropped: the
/// relay can claim outbox rows but not append them to the queue.
struct QueueLocked(std::process::Child);

impl QueueLocked {
    fn take(db: &str) -> Self {
        let mut child = Command::new("psql")
            .args([db, "-qtA", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("psql");
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(
            stdin,
            "BEGIN; LOCK TABLE wasmgate_queue IN EXCLUSIVE MODE; SELECT 'locked';"
        )
        .expect("psql stdin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("psql stdout");
        assert_eq!(line.trim(), "locked");
        // Kept open (dropping stdin would end the session); the child owns it from here.
        std::mem::forget(stdin);
        Self(child)
    }
}

impl Drop for QueueLocked {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A user write commits, its relay claims the event but cannot hand it to the broker, and the
/// process is killed: the event is in the outbox only. A new process delivers it (once the dead
/// relay's 30 s claim lapses) and the projection applies it once.
#[tokio::test]
async fn a_write_whose_relay_died_is_delivered_after_restart() {
    let db = fresh_postgres();
    let manifest = users_manifest();
    let args = ["--database-url", db.as_str()];
    let first = Server::start_with_args(&manifest, &args);
    let id = sign_up(&first, "grace@example.com").await;
    let grace = token(&first, "grace@example.com").await;
    activity(&first, &grace, &id, 1).await;

    let lock = QueueLocked::take(&db);
    let url = first.url(&format!("/v2/users/{id}"));
    assert_eq!(
        patch(&grace, url, &[], json!({"name": "Grace H"})).await,
        200
    );
    let stuck = format!(
        "SELECT count(*) FROM wasmgate_outbox WHERE key = '{id}' AND topic = 'user.updated' \
         AND claimed_at IS NOT NULL AND sent_at IS NULL"
    );
    until_sql(&db, &stuck, "1", Duration::from_secs(10)).await;
    first.signal("KILL");
    drop(first);
    drop(lock);
    assert_eq!(
        sql(
            &db,
            "SELECT count(*) FROM wasmgate_queue WHERE topic = 'user.updated'"
        ),
        "0",
        "the event reached the queue before the kill"
    );
    assert_eq!(
        sql(
            &db,
            &format!("SELECT count(*) FROM user_audit WHERE user_id = '{id}'")
        ),
        "1"
    );

    let second = Server::start_with_args(&manifest, &args);
    let a = activity(&second, &grace, &id, 2).await;
    assert_eq!(a["name"], "Grace H");
    assert_eq!(
        sql(
            &db,
            &format!(
                "SELECT count(*), count(DISTINCT event_id) FROM user_audit WHERE user_id = '{id}'"
            )
        ),
        "2|2"
    );
    until_sql(
        &db,
        &format!("SELECT count(*) FROM wasmgate_outbox WHERE key = '{id}' AND sent_at IS NULL"),
        "0",
        Duration::from_secs(10),
    )
    .await;
}
