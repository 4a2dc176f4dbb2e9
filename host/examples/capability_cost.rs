//! Native baseline for `bench/capability-cost`: the same calls the guest benchmark makes
//! (cache get, `SELECT 1`), made directly from Rust on the same backends, as microseconds per
//! call. Reads DATABASE_URL and REDIS_URL (defaults: the local servers).

use std::time::Instant;

use wasmgate::capabilities::cache::{CacheBackend, MemoryCache, RedisCache};
use wasmgate::capabilities::db::Db;

const N: u32 = 2000;

async fn per_call<F, Fut>(mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    f().await; // warm up: connect, prepare
    let started = Instant::now();
    for _ in 0..N {
        f().await;
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(N)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let dir = tempfile::tempdir()?;
    let sqlite_url = format!("sqlite://{}", dir.path().join("bench.db").display());

    let memory = MemoryCache::new(1024 * 1024);
    memory
        .set("bench", b"value".to_vec(), None)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let redis = RedisCache::connect(&redis_url)?;
    redis
        .set("bench", b"value".to_vec(), None)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let sqlite = Db::connect(&sqlite_url).await?;
    let postgres = Db::connect(&database_url).await?;

    let rows = [
        (
            "cache get, in-process",
            per_call(|| async { memory.get("bench").await.map(drop).unwrap_or(()) }).await,
        ),
        (
            "cache get, redis",
            per_call(|| async { redis.get("bench").await.map(drop).unwrap_or(()) }).await,
        ),
        (
            "db SELECT 1, sqlite",
            per_call(|| async {
                sqlite
                    .backend()
                    .query("SELECT 1 AS one", vec![])
                    .await
                    .map(drop)
                    .unwrap_or(())
            })
            .await,
        ),
        (
            "db SELECT 1, postgres",
            per_call(|| async {
                postgres
                    .backend()
                    .query("SELECT 1 AS one", vec![])
                    .await
                    .map(drop)
                    .unwrap_or(())
            })
            .await,
        ),
    ];
    for (name, us) in rows {
        println!("{name}\t{us:.1}");
    }
    Ok(())
}
