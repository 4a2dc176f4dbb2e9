//! The deployer outlives deployments: a reload swaps the routes and versions on the same engine
//! and backends (the response cache keeps its entries), entries are kept per version, every
//! response names its version, and what only a restart can change is refused by name.

use std::time::{Duration, Instant};

use wasmgate_tests::{Server, version_of};

fn manifest(function_wasm: &str) -> String {
    format!(
        r#"
        [functions.pages]
        wasm = "{{wasm:{function_wasm}}}"
        capabilities = ["cache", "response-cache"]
        [[routes]]
        path = "/c/{{name}}"
        methods = ["GET"]
        function = "pages"
        cache = {{ ttl = "60s" }}
        "#
    )
}

async fn get(c: &reqwest::Client, url: &str) -> (u16, String, String) {
    let resp = c.get(url).send().await.expect("get");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().expect("ascii").to_string())
            .unwrap_or_default()
    };
    let (cache, version) = (header("cache-status"), header("wasmgate-version"));
    (resp.status().as_u16(), cache, version)
}

/// Sends SIGHUP and waits for the `n`th line saying how it went.
async fn reload(s: &Server, n: usize, outcome: &str) {
    s.signal("HUP");
    let started = Instant::now();
    while s.log().matches(outcome).count() < n {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no `{outcome}`:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_reload_keeps_the_response_cache_and_responses_name_their_version() {
    let s = Server::start(&manifest("cachey"));
    let c = reqwest::Client::new();
    let url = s.url("/c/page");
    let cachey = version_of("cachey");
    assert_eq!(
        get(&c, &url).await,
        (200, "wasmgate; fwd=miss; stored".into(), cachey.clone())
    );
    assert_eq!(
        get(&c, &url).await,
        (200, "wasmgate; hit".into(), cachey.clone())
    );

    // The same manifest again: the engine and backends stay, and so does the cached entry.
    reload(&s, 1, "reloaded manifest").await;
    assert_eq!(
        get(&c, &url).await,
        (200, "wasmgate; hit".into(), cachey.clone())
    );

    // Another component for the function: a new version, which never sees the old one's entries.
    s.rewrite_manifest(&manifest("echo"));
    reload(&s, 2, "reloaded manifest").await;
    let echo = version_of("echo");
    assert_ne!(echo, cachey);
    assert_eq!(
        get(&c, &url).await,
        (200, "wasmgate; fwd=miss; stored".into(), echo.clone())
    );
    assert_eq!(get(&c, &url).await, (200, "wasmgate; hit".into(), echo));
}

#[tokio::test]
async fn a_reload_that_needs_a_restart_is_refused_naming_why() {
    let s = Server::start(&manifest("cachey"));
    let c = reqwest::Client::new();
    let url = s.url("/c/page");
    s.rewrite_manifest(&format!(
        "[backends]\ndatabase_url = \"sqlite:///tmp/elsewhere-{}.db\"\n{}",
        wasmgate_tests::unique_suffix(),
        manifest("echo")
    ));
    reload(&s, 1, "reload refused").await;
    assert!(
        s.log()
            .contains("[backends] is read at start; restart wasmgate to change it"),
        "{}",
        s.log()
    );
    assert_eq!(
        get(&c, &url).await.2,
        version_of("cachey"),
        "still the previous deployment"
    );
}
