//! Functions written in Python (componentize-py) and JavaScript (componentize-js) run like the
//! Rust ones: they answer, they are cut at their timeout and their memory cap, they reach a
//! capability through the platform's WIT, and one they are not granted refuses them at load.
//! Both are plain wasi:http components built by `scripts/build-other-languages`.

use std::time::{Duration, Instant};

use wasmgate_tests::{Server, check, expect_problem};

const LANGUAGES: [(&str, &str); 2] = [("greeter-py", "python"), ("greeter-js", "javascript")];

fn manifest(wasm: &str, extra: &str) -> String {
    format!(
        r#"
        {extra}
        [functions.greeter]
        wasm = "{{wasm:{wasm}}}"
        capabilities = ["cache"]
        timeout = "1s"
        memory = "64MiB"
        [[routes]]
        path = "/greet/*"
        function = "greeter"
        "#
    )
}

/// Compiles once into the shared compiled cache (tens of seconds for these runtimes in a debug
/// build), so the server that follows starts from it.
fn compiled(wasm: &str) {
    let (ok, stderr) = check(&manifest(wasm, ""));
    assert!(ok, "{wasm}: {stderr}");
}

#[tokio::test]
async fn python_and_javascript_functions_answer_call_a_capability_and_are_cut_at_their_limits() {
    for (wasm, language) in LANGUAGES {
        compiled(wasm);
        let s = Server::start(&manifest(wasm, ""));
        let client = reqwest::Client::new();
        let resp = client
            .get(s.url("/greet/there?x=1"))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200, "{language}");
        assert_eq!(resp.headers()["x-written-in"], language);
        assert!(resp.headers().contains_key("x-request-id"));
        let text = resp.text().await.expect("body");
        assert_eq!(
            text,
            format!("hello from {language} at /greet/there?x=1\n"),
            "{language}"
        );

        // The count lives in the cache capability: each request has a fresh instance.
        for n in 1..=2 {
            let text = client
                .get(s.url("/greet/?cache"))
                .send()
                .await
                .expect("request")
                .text()
                .await
                .expect("body");
            assert_eq!(text, format!("calls: {n}\n"), "{language}");
        }

        let started = Instant::now();
        let resp = client
            .get(s.url("/greet/?spin"))
            .send()
            .await
            .expect("request");
        expect_problem(resp, 504, "function-timeout").await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{language}: cut after {:?}, timeout 1s",
            started.elapsed()
        );

        let resp = client
            .get(s.url("/greet/?hog"))
            .send()
            .await
            .expect("request");
        expect_problem(resp, 500, "function-memory-exceeded").await;

        // And the next request is served as if nothing happened.
        let resp = client.get(s.url("/greet/")).send().await.expect("request");
        assert_eq!(resp.status(), 200, "{language}");
    }
}

#[test]
fn a_capability_not_granted_refuses_them_at_load() {
    for (wasm, language) in LANGUAGES {
        let (ok, stderr) = check(&manifest(wasm, "").replace(r#"capabilities = ["cache"]"#, ""));
        assert!(!ok, "{language}: accepted without the cache grant");
        assert!(
            stderr.contains("imports `wasmgate:platform/cache@0.1.0` but is not granted `cache`"),
            "{language}: {stderr}"
        );
    }
}

/// A component over the pool's per-component limits is refused at load, naming the setting to
/// raise; the defaults admit these toolchains (componentize-py's component holds 14 core
/// instances).
#[test]
fn a_component_over_the_pools_limits_is_refused_naming_the_setting() {
    let (ok, stderr) = check(&manifest(
        "greeter-py",
        "[server.component_limits]\ncore_instances = 8",
    ));
    assert!(!ok, "accepted with 8 core instances a component");
    assert!(
        stderr.contains("does not fit the instance pool")
            && stderr.contains("14 core module instances")
            && stderr.contains("raise `core_instances` under `[server.component_limits]`"),
        "{stderr}"
    );
}

#[test]
fn a_component_limit_of_zero_is_refused() {
    let (ok, stderr) = check(&manifest(
        "greeter-py",
        "[server.component_limits]\ntables = 0",
    ));
    assert!(!ok);
    assert!(
        stderr.contains("[server.component_limits] tables is 0"),
        "{stderr}"
    );
}
