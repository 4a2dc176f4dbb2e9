//! Compiled components are cached on disk: a restart loads them instead of compiling, and a
//! changed module is compiled afresh.

use wasmgate_tests::Server;

const MANIFEST: &str = r#"
[functions.hello]
wasm = "{wasm:hello}"
[[routes]]
path = "/hello"
function = "hello"
"#;

async fn assert_serves(s: &Server) {
    let resp = reqwest::get(s.url("/hello")).await.expect("request");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn restart_loads_from_the_compiled_cache() {
    let cache = tempfile::tempdir().expect("tmp");
    let first = Server::start_with_cache(MANIFEST, cache.path());
    assert_serves(&first).await;
    assert!(first.log().contains("from=\"compiled\""), "{}", first.log());
    drop(first);

    let entries: Vec<_> = std::fs::read_dir(cache.path())
        .expect("cache dir")
        .flatten()
        .collect();
    assert_eq!(entries.len(), 1, "one entry per module and engine");

    let second = Server::start_with_cache(MANIFEST, cache.path());
    assert_serves(&second).await;
    assert!(second.log().contains("from=\"cache\""), "{}", second.log());
}

#[tokio::test]
async fn a_corrupt_cache_entry_is_recompiled() {
    let cache = tempfile::tempdir().expect("tmp");
    drop(Server::start_with_cache(MANIFEST, cache.path()));
    for entry in std::fs::read_dir(cache.path())
        .expect("cache dir")
        .flatten()
    {
        std::fs::write(entry.path(), b"not a compiled component").expect("corrupt");
    }
    let s = Server::start_with_cache(MANIFEST, cache.path());
    assert_serves(&s).await;
    let log = s.log();
    assert!(
        log.contains("ignoring unreadable compiled-cache entry")
            && log.contains("from=\"compiled\""),
        "{log}"
    );
}
