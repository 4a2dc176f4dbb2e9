//! The db conformance suite, run against every backend: SQLite (a temp file) and a real
//! PostgreSQL (`DATABASE_URL`, default postgres://postgres@127.0.0.1:5432/test; each run gets
//! its own fresh database).

use std::sync::Arc;

use super::migrations::Migration;
use wasmtime::component::Resource;

use super::{Db, DbBackend, DbError, Value};
use crate::capabilities::breaker::Breaker;

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Creates an empty database next to `DATABASE_URL`'s and returns its URL.
pub async fn fresh_postgres() -> String {
    use sqlx::Connection;
    let base = database_url();
    let mut admin = sqlx::PgConnection::connect(&base)
        .await
        .expect("PostgreSQL reachable at DATABASE_URL");
    let name = format!("wg_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    let (prefix, _) = base.rsplit_once('/').expect("DATABASE_URL ends in /dbname");
    format!("{prefix}/{name}")
}

const SCHEMA: &str = "CREATE TABLE items (
    id BIGINT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    price DOUBLE PRECISION,
    data BYTEA,
    active BOOLEAN NOT NULL DEFAULT TRUE,
    created_at TIMESTAMP
)";

async fn suite(b: Arc<dyn DbBackend>, bytes_type: &str) {
    b.ping().await.expect("reachable");
    b.execute(&SCHEMA.replace("BYTEA", bytes_type), vec![])
        .await
        .expect("create table");

    // Every value type round-trips, with parameters out of order.
    let ts = 1_700_000_000_123_456;
    let n = b
        .execute(
            "INSERT INTO items (name, id, price, data, active, created_at) VALUES ($2, $1, $3, $4, $5, $6)",
            vec![
                Value::Int64(1),
                Value::Text("widget's \"best\"; DROP TABLE items; --".into()),
                Value::Float64(9.5),
                Value::Bytes(vec![0, 255, 1]),
                Value::Boolean(false),
                Value::Timestamp(ts),
            ],
        )
        .await
        .expect("insert");
    assert_eq!(n, 1);
    let rows = b
        .query(
            "SELECT id, name, price, data, active, created_at FROM items WHERE id = $1",
            vec![Value::Int64(1)],
        )
        .await
        .expect("select");
    assert_eq!(
        rows.columns,
        ["id", "name", "price", "data", "active", "created_at"]
    );
    assert_eq!(
        rows.rows,
        vec![vec![
            Value::Int64(1),
            Value::Text("widget's \"best\"; DROP TABLE items; --".into()),
            Value::Float64(9.5),
            Value::Bytes(vec![0, 255, 1]),
            Value::Boolean(false),
            Value::Timestamp(ts),
        ]]
    );

    // Nulls bind into any column and read back as null.
    b.execute(
        "INSERT INTO items (id, name, price, data, created_at) VALUES ($1, $2, $3, $4, $5)",
        vec![
            Value::Int64(2),
            Value::Text("two".into()),
            Value::Null,
            Value::Null,
            Value::Null,
        ],
    )
    .await
    .expect("insert nulls");
    let rows = b
        .query(
            "SELECT price, data, created_at, active FROM items WHERE id = $1",
            vec![Value::Int64(2)],
        )
        .await
        .expect("select");
    assert_eq!(
        rows.rows,
        vec![vec![
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Boolean(true)
        ]]
    );

    // Empty results still name their columns.
    let rows = b
        .query(
            "SELECT id, name FROM items WHERE id = $1",
            vec![Value::Int64(99)],
        )
        .await
        .expect("select");
    assert_eq!(rows.columns, ["id", "name"]);
    assert!(rows.rows.is_empty());

    // Typed errors.
    let dup = b
        .execute(
            "INSERT INTO items (id, name) VALUES ($1, $2)",
            vec![Value::Int64(3), Value::Text("two".into())],
        )
        .await;
    assert!(matches!(dup, Err(DbError::UniqueViolation(_))), "{dup:?}");
    let null = b
        .execute("INSERT INTO items (id) VALUES ($1)", vec![Value::Int64(4)])
        .await;
    assert!(
        matches!(null, Err(DbError::ConstraintViolation(_))),
        "{null:?}"
    );
    let syntax = b.query("SELEC nonsense", vec![]).await;
    assert!(
        matches!(syntax, Err(DbError::InvalidQuery(_))),
        "{syntax:?}"
    );
    let missing = b.query("SELECT nope FROM items", vec![]).await;
    assert!(
        matches!(missing, Err(DbError::InvalidQuery(_))),
        "{missing:?}"
    );
    let arity = b.query("SELECT id FROM items WHERE id = $1", vec![]).await;
    assert!(matches!(arity, Err(DbError::InvalidQuery(_))), "{arity:?}");

    // Transactions: commit keeps, rollback and drop discard.
    let mut tx = b.begin().await.expect("begin");
    tx.execute(
        "UPDATE items SET price = $1 WHERE id = $2",
        vec![Value::Float64(1.0), Value::Int64(1)],
    )
    .await
    .expect("update");
    let inside = tx
        .query(
            "SELECT price FROM items WHERE id = $1",
            vec![Value::Int64(1)],
        )
        .await
        .expect("read own write");
    assert_eq!(inside.rows, vec![vec![Value::Float64(1.0)]]);
    tx.rollback().await.expect("rollback");
    let price = |b: Arc<dyn DbBackend>| async move {
        b.query(
            "SELECT price FROM items WHERE id = $1",
            vec![Value::Int64(1)],
        )
        .await
        .expect("select")
        .rows
    };
    assert_eq!(price(b.clone()).await, vec![vec![Value::Float64(9.5)]]);

    let mut tx = b.begin().await.expect("begin");
    tx.execute(
        "UPDATE items SET price = $1 WHERE id = $2",
        vec![Value::Float64(2.0), Value::Int64(1)],
    )
    .await
    .expect("update");
    drop(tx);
    // sqlx rolls a dropped transaction back when its connection returns to the pool.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(price(b.clone()).await, vec![vec![Value::Float64(9.5)]]);

    let mut tx = b.begin().await.expect("begin");
    tx.execute(
        "UPDATE items SET price = $1 WHERE id = $2",
        vec![Value::Float64(3.0), Value::Int64(1)],
    )
    .await
    .expect("update");
    tx.commit().await.expect("commit");
    assert_eq!(price(b.clone()).await, vec![vec![Value::Float64(3.0)]]);

    // Migrations: applied once, in order, recorded; re-running applies nothing.
    let m = |name: &str, sql: &str| Migration {
        name: name.into(),
        sql: sql.into(),
        checksum: format!("sum-{sql}"),
    };
    let migrations = vec![
        m("1_create", "CREATE TABLE migrated (id BIGINT PRIMARY KEY)"),
        m(
            "2_seed",
            "INSERT INTO migrated (id) VALUES (1); INSERT INTO migrated (id) VALUES (2)",
        ),
    ];
    assert_eq!(
        b.migrate("fn-a", &migrations).await.expect("migrate"),
        ["1_create", "2_seed"]
    );
    assert!(
        b.migrate("fn-a", &migrations)
            .await
            .expect("again")
            .is_empty()
    );
    let count = b
        .query("SELECT count(*) AS n FROM migrated", vec![])
        .await
        .expect("count");
    assert_eq!(count.rows, vec![vec![Value::Int64(2)]]);
    // A failing migration leaves nothing behind.
    let broken = vec![m("3_broken", "CREATE TABLE half (id BIGINT); SELEC oops")];
    assert!(b.migrate("fn-a", &broken).await.is_err());
    assert!(
        b.query("SELECT * FROM half", vec![]).await.is_err(),
        "rolled back"
    );
}

/// A run inside a transaction the host holds: the guest's statements and its transactions (as
/// savepoints) all land in it, and the host's commit or rollback decides for all of them.
async fn held(b: Arc<dyn DbBackend>) {
    use super::wit::{Host, HostTransaction};
    b.execute("CREATE TABLE held (n BIGINT NOT NULL)", vec![])
        .await
        .expect("create");
    let count = || async {
        b.query("SELECT n FROM held ORDER BY n", vec![])
            .await
            .expect("count")
            .rows
            .iter()
            .filter_map(|r| r[0].int())
            .collect::<Vec<_>>()
    };
    let insert = |n: i64| {
        (
            "INSERT INTO held (n) VALUES ($1)".to_string(),
            vec![Value::Int64(n)],
        )
    };
    for keep in [false, true] {
        let mut db = super::FunctionDb {
            backend: b.clone(),
            breaker: Arc::new(Breaker::new("db")),
        }
        .instance();
        let mut table = wasmtime::component::ResourceTable::new();
        db.hold().await.expect("hold");
        let mut view = super::DbView {
            table: &mut table,
            db: &mut db,
        };
        let (sql, params) = insert(1);
        assert_eq!(
            Host::execute(&mut view, sql, params).await.expect("call"),
            Ok(1)
        );
        // Undone savepoint, kept savepoint, and one the guest dropped open.
        let undone = Host::begin(&mut view)
            .await
            .expect("call")
            .expect("savepoint");
        let (sql, params) = insert(2);
        HostTransaction::execute(&mut view, Resource::new_borrow(undone.rep()), sql, params)
            .await
            .expect("call")
            .expect("insert");
        HostTransaction::rollback(&mut view, Resource::new_borrow(undone.rep()))
            .await
            .expect("call")
            .expect("rollback");
        assert!(
            HostTransaction::commit(&mut view, Resource::new_borrow(undone.rep()))
                .await
                .expect("call")
                .is_err(),
            "finished once"
        );
        HostTransaction::drop(&mut view, undone)
            .await
            .expect("drop");
        let kept = Host::begin(&mut view)
            .await
            .expect("call")
            .expect("savepoint");
        let (sql, params) = insert(3);
        HostTransaction::execute(&mut view, Resource::new_borrow(kept.rep()), sql, params)
            .await
            .expect("call")
            .expect("insert");
        HostTransaction::commit(&mut view, Resource::new_borrow(kept.rep()))
            .await
            .expect("call")
            .expect("release");
        HostTransaction::drop(&mut view, kept).await.expect("drop");
        let open = Host::begin(&mut view)
            .await
            .expect("call")
            .expect("savepoint");
        let (sql, params) = insert(4);
        HostTransaction::execute(&mut view, Resource::new_borrow(open.rep()), sql, params)
            .await
            .expect("call")
            .expect("insert");
        HostTransaction::drop(&mut view, open).await.expect("drop");
        // The guest sees its own writes; nobody else does yet.
        let seen = Host::query(&mut view, "SELECT n FROM held ORDER BY n".into(), vec![])
            .await
            .expect("call")
            .expect("query");
        assert_eq!(seen.rows.len(), 2, "1 and 3");
        let tx = db.release().expect("held").tx;
        if keep {
            tx.commit().await.expect("commit");
        } else {
            tx.rollback().await.expect("rollback");
            assert_eq!(
                count().await,
                Vec::<i64>::new(),
                "a rolled-back run leaves nothing"
            );
        }
    }
    assert_eq!(
        count().await,
        [1, 3],
        "a committed run keeps what the guest kept"
    );
}

/// Runs sharing one held transaction, each with a mark: a run that makes no statement takes
/// none (no round trip); one that does takes it before its first, and rolling back to it
/// undoes that run alone, keeping what the host and the earlier runs wrote.
async fn marked_runs(b: Arc<dyn DbBackend>) {
    use super::wit::Host;
    b.execute("CREATE TABLE marked (n BIGINT NOT NULL)", vec![])
        .await
        .expect("create");
    let mut tx = b.begin().await.expect("begin");
    tx.execute("INSERT INTO marked (n) VALUES (0)", vec![])
        .await
        .expect("the host's own write");
    let functions = super::FunctionDb {
        backend: b.clone(),
        breaker: Arc::new(Breaker::new("db")),
    };
    // Runs 1 and 3 insert their number; run 2 makes no statement; run 3 is undone.
    for n in 1..=3i64 {
        let mut db = functions.instance();
        db.hold_in(tx, Some("mark"));
        let mut table = wasmtime::component::ResourceTable::new();
        let mut view = super::DbView {
            table: &mut table,
            db: &mut db,
        };
        if n != 2 {
            let inserted = Host::execute(
                &mut view,
                "INSERT INTO marked (n) VALUES ($1)".into(),
                vec![Value::Int64(n)],
            )
            .await
            .expect("call");
            assert_eq!(inserted, Ok(1));
        }
        let released = db.release().expect("held");
        assert_eq!(
            released.marked,
            n != 2,
            "run {n} marked only if it made a statement"
        );
        tx = released.tx;
        if n == 3 {
            tx.execute("ROLLBACK TO SAVEPOINT mark", vec![])
                .await
                .expect("back to run 3's mark");
        }
    }
    tx.commit().await.expect("commit");
    let kept = b
        .query("SELECT n FROM marked ORDER BY n", vec![])
        .await
        .expect("read")
        .rows
        .iter()
        .filter_map(|r| r[0].int())
        .collect::<Vec<_>>();
    assert_eq!(kept, [0, 1], "run 3 undone alone");
}

/// A transaction that reads, then writes, while another connection writes meanwhile: both
/// succeed (on SQLite the transaction holds the write lock from its start and the other write
/// waits for it; a deferred one would fail with SQLITE_BUSY_SNAPSHOT at its first write).
async fn read_then_write_beside_a_writer(b: Arc<dyn DbBackend>) {
    b.execute("CREATE TABLE beside (n BIGINT NOT NULL)", vec![])
        .await
        .expect("create");
    let mut tx = b.begin().await.expect("begin");
    tx.query("SELECT count(*) FROM beside", vec![])
        .await
        .expect("read");
    let other = b.clone();
    let writer = tokio::spawn(async move {
        other
            .execute("INSERT INTO beside (n) VALUES (2)", vec![])
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    tx.execute("INSERT INTO beside (n) VALUES (1)", vec![])
        .await
        .expect("the transaction's write, after another connection's");
    tx.commit().await.expect("commit");
    writer.await.expect("task").expect("the other write");
    let rows = b
        .query("SELECT count(*) FROM beside", vec![])
        .await
        .expect("count");
    assert_eq!(rows.first_int(), Some(2));
}

#[tokio::test]
async fn sqlite_conforms() {
    let dir = tempfile::tempdir().expect("tmp");
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let db = Db::connect(&url).await.expect("sqlite");
    suite(db.backend().clone(), "BLOB").await;
    held(db.backend().clone()).await;
    marked_runs(db.backend().clone()).await;
    read_then_write_beside_a_writer(db.backend().clone()).await;
}

#[tokio::test]
async fn postgres_conforms() {
    let db = Db::connect(&fresh_postgres().await)
        .await
        .expect("postgres");
    suite(db.backend().clone(), "BYTEA").await;
    held(db.backend().clone()).await;
    marked_runs(db.backend().clone()).await;
    read_then_write_beside_a_writer(db.backend().clone()).await;
}

#[tokio::test]
async fn concurrent_migrations_apply_once_on_postgres() {
    let url = fresh_postgres().await;
    let migrations = vec![Migration {
        name: "1_create".into(),
        sql: "CREATE TABLE once (id BIGINT PRIMARY KEY)".into(),
        checksum: "x".into(),
    }];
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        let migrations = migrations.clone();
        tasks.push(tokio::spawn(async move {
            let db = Db::connect(&url).await.expect("postgres");
            db.backend().migrate("fn", &migrations).await
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.expect("task").expect("migrate").len();
    }
    assert_eq!(applied, 1, "exactly one process applied the migration");
}
