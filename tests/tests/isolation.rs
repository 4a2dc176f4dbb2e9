//! Per-function isolation against the real binary: rate limits, bulkheads, noisy neighbours,
//! fresh instances, metrics, and reload.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use wasmgate_tests::{
    Server, expect_problem, get_json, get_status, get_text, redis_url, unique_suffix,
};

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_and_spares_other_functions() {
    let s = Server::start(
        r#"
        [functions.limited]
        wasm = "{wasm:hello}"
        rate_limit = { rps = 1, burst = 2 }
        [functions.free]
        wasm = "{wasm:hello}"
        [[routes]]
        path = "/limited"
        function = "limited"
        [[routes]]
        path = "/free"
        function = "free"
        "#,
    );
    let client = reqwest::Client::new();
    assert_eq!(get_status(&client, &s.url("/limited")).await, 200);
    assert_eq!(get_status(&client, &s.url("/limited")).await, 200);
    let resp = client.get(s.url("/limited")).send().await.expect("request");
    assert_eq!(resp.headers()["retry-after"], "1");
    expect_problem(resp, 429, "rate-limited").await;
    for _ in 0..5 {
        assert_eq!(get_status(&client, &s.url("/free")).await, 200);
    }
}

#[tokio::test]
async fn keyed_rate_limit_gives_each_client_its_own_budget() {
    let s = Server::start(
        r#"
        [functions.hello]
        wasm = "{wasm:hello}"
        rate_limit = { rps = 1, burst = 1, key = "header:x-api-key" }
        [[routes]]
        path = "/hello"
        function = "hello"
        "#,
    );
    let client = reqwest::Client::new();
    let get = |key: &'static str| client.get(s.url("/hello")).header("x-api-key", key).send();
    assert_eq!(get("alice").await.expect("req").status(), 200);
    assert_eq!(get("alice").await.expect("req").status(), 429);
    assert_eq!(get("bob").await.expect("req").status(), 200);
}

const SLOW: &str = r#"
[functions.slow]
wasm = "{wasm:capprobe}"
capabilities = ["db", "cache", "lock"]
bulkhead = { max_concurrency = 1, max_queue = 1, max_wait = "200ms" }
[[routes]]
path = "/probe/lock/{name}"
function = "slow"
"#;

#[tokio::test]
async fn bulkhead_queues_briefly_then_sheds_with_503() {
    let s = Server::start(SLOW);
    let client = reqwest::Client::new();
    // One holds the only slot for a second (waiting in a host call: a wasi clock sleep).
    let holder = {
        let (client, url) = (client.clone(), s.url("/probe/lock/a?hold_ms=1000"));
        tokio::spawn(async move { client.post(url).send().await.expect("holder").status() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // One waits in the queue, gives up after max_wait; one more finds the queue full at once.
    let queued = {
        let (client, url) = (client.clone(), s.url("/probe/lock/b"));
        tokio::spawn(async move {
            let started = Instant::now();
            let resp = client.post(url).send().await.expect("queued");
            (resp, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let shed = client
        .post(s.url("/probe/lock/c"))
        .send()
        .await
        .expect("shed");
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "shed at once"
    );
    assert_eq!(shed.headers()["retry-after"], "1");
    expect_problem(shed, 503, "bulkhead-full").await;
    let (resp, waited) = queued.await.expect("task");
    assert!(waited >= Duration::from_millis(200), "waited {waited:?}");
    expect_problem(resp, 503, "bulkhead-full").await;
    assert_eq!(holder.await.expect("task"), 200);
}

/// Under a flood the queue is bounded by the wait it predicts, not by a small count: requests
/// whose place in line fits in `max_wait` wait and are served, the rest are refused at once
/// (503 with `Retry-After`, before the guest or the body), instead of waiting `max_wait` to fail.
#[tokio::test]
async fn a_flood_waits_while_the_wait_fits_and_is_refused_at_once_past_it() {
    let s = Server::start(
        r#"
[functions.slow]
wasm = "{wasm:capprobe}"
capabilities = ["db", "cache", "lock"]
bulkhead = { max_concurrency = 2, max_wait = "1s" }
[[routes]]
path = "/probe/lock/{name}"
function = "slow"
"#,
    );
    let client = reqwest::Client::new();
    let send = |n: usize| {
        let (client, url) = (
            client.clone(),
            s.url(&format!("/probe/lock/l{n}?hold_ms=50")),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let resp = client.post(url).send().await.expect("request");
            let retry_after = resp.headers().get("retry-after").cloned();
            (resp.status().as_u16(), retry_after, started.elapsed())
        })
    };
    // The mean time a slot is held: about 50 ms.
    for n in 0..4 {
        assert_eq!(send(n).await.expect("task").0, 200);
    }
    // 16 at once on 2 slots: the last waits about 16 x 50 / 2 = 400 ms, within max_wait.
    let burst: Vec<_> = (0..16).map(send).collect();
    for task in burst {
        let (status, _, took) = task.await.expect("task");
        assert_eq!(
            status, 200,
            "a request whose wait fits was refused after {took:?}"
        );
    }
    // 120 at once: places past about 40 would wait more than a second.
    let flood: Vec<_> = (0..120).map(send).collect();
    let (mut served, mut refused) = (0, Vec::new());
    for task in flood {
        match task.await.expect("task") {
            (200, _, _) => served += 1,
            (503, retry_after, took) => {
                assert_eq!(retry_after.expect("Retry-After on a shed"), "1");
                refused.push(took);
            }
            (other, _, took) => panic!("{other} after {took:?}"),
        }
    }
    refused.sort();
    assert!(served >= 20, "only {served} of 120 served");
    assert!(refused.len() >= 30, "only {} of 120 refused", refused.len());
    let median = refused[refused.len() / 2];
    assert!(
        median < Duration::from_millis(500),
        "refusals should come at once, the median took {median:?}"
    );
    let shed = s
        .metric(
            "wasmgate_bulkhead_shed_total",
            r#"function="slow",reason="would-wait-too-long""#,
        )
        .await;
    assert!(shed >= 30.0, "{shed}");
}

#[tokio::test]
async fn a_saturated_function_does_not_take_down_its_neighbour() {
    let s = Server::start(
        r#"
        [functions.spin]
        wasm = "{wasm:spin}"
        timeout = "1s"
        bulkhead = { max_concurrency = 8, max_queue = 8, max_wait = "100ms" }
        [functions.slow]
        wasm = "{wasm:capprobe}"
        capabilities = ["db", "cache", "lock"]
        timeout = "2s"
        bulkhead = { max_concurrency = 8, max_queue = 8, max_wait = "100ms" }
        [functions.hello]
        wasm = "{wasm:hello}"
        [[routes]]
        path = "/spin"
        function = "spin"
        [[routes]]
        path = "/probe/lock/{name}"
        function = "slow"
        [[routes]]
        path = "/hello"
        function = "hello"
        "#,
    );
    let client = reqwest::Client::new();
    let stop = Instant::now() + Duration::from_secs(3);
    let mut flood = Vec::new();
    for i in 0..24 {
        let client = client.clone();
        let url = if i % 2 == 0 {
            s.url("/spin")
        } else {
            s.url(&format!("/probe/lock/l{i}?hold_ms=1500"))
        };
        flood.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let _ = client
                    .request(
                        if url.contains("lock") {
                            reqwest::Method::POST
                        } else {
                            reqwest::Method::GET
                        },
                        &url,
                    )
                    .send()
                    .await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut answered = 0;
    while Instant::now() < stop {
        assert_eq!(
            get_status(&client, &s.url("/hello")).await,
            200,
            "the neighbour failed"
        );
        answered += 1;
    }
    for f in flood {
        f.await.expect("flood task");
    }
    assert!(
        answered >= 5,
        "only {answered} neighbour requests completed"
    );
    let metrics = get_text(&client, &s.url("/metrics")).await;
    assert!(
        metrics.contains(r#"outcome="function-timeout""#),
        "spin timed out: {metrics}"
    );
}

/// Instances made ahead of demand (`[server] warm_instances`) serve one request each, sequential
/// or concurrent, and take the request's deadline when they are taken: one made longer than its
/// timeout ago still runs its full timeout.
#[tokio::test]
async fn instances_made_ahead_serve_one_request_each_with_the_requests_own_deadline() {
    let s = Server::start(
        r#"
        [server]
        warm_instances = 8
        [functions.stateful]
        wasm = "{wasm:stateful}"
        [functions.spin]
        wasm = "{wasm:spin}"
        timeout = "300ms"
        [[routes]]
        path = "/count"
        function = "stateful"
        [[routes]]
        path = "/spin"
        function = "spin"
        "#,
    );
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let body = get_json(&client, &s.url("/count")).await;
        assert_eq!(body["seen"], 1, "an instance served twice");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let concurrent: Vec<_> = (0..16)
        .map(|_| {
            let (client, url) = (client.clone(), s.url("/count"));
            tokio::spawn(async move { get_json(&client, &url).await })
        })
        .collect();
    for task in concurrent {
        assert_eq!(
            task.await.expect("task")["seen"],
            1,
            "an instance served twice"
        );
    }
    let used = s
        .metric(
            "wasmgate_instances_ready_used_total",
            r#"function="stateful""#,
        )
        .await;
    assert!(used >= 10.0, "only {used} requests found an instance ready");

    let spin = |client: reqwest::Client| {
        let url = s.url("/spin");
        async move {
            let started = Instant::now();
            let resp = client.get(url).send().await.expect("spin");
            (resp, started.elapsed())
        }
    };
    let (first, _) = spin(client.clone()).await;
    expect_problem(first, 504, "function-timeout").await;
    // The instance made after that request is older than the timeout when the next one takes it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (second, took) = spin(client.clone()).await;
    expect_problem(second, 504, "function-timeout").await;
    assert!(
        took >= Duration::from_millis(250),
        "timed out after {took:?}: the deadline was the one it was made with"
    );
    let used = s
        .metric("wasmgate_instances_ready_used_total", r#"function="spin""#)
        .await;
    assert_eq!(used, 1.0, "the second spin ran on the instance made ahead");
}

/// By default nothing is made ahead: every request instantiates its own.
#[tokio::test]
async fn no_instance_is_made_ahead_by_default() {
    let s = Server::start(
        r#"
        [functions.stateful]
        wasm = "{wasm:stateful}"
        [[routes]]
        path = "/count"
        function = "stateful"
        "#,
    );
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let body = get_json(&client, &s.url("/count")).await;
        assert_eq!(body["seen"], 1, "state leaked between requests");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.metric("wasmgate_instances_ready", r#"function="stateful""#)
            .await,
        0.0
    );
    assert_eq!(
        s.metric("wasmgate_instances_ready_used_total", "").await,
        0.0
    );
}

#[tokio::test]
async fn every_request_gets_a_fresh_instance() {
    let s = Server::start(
        r#"
        [functions.stateful]
        wasm = "{wasm:stateful}"
        [[routes]]
        path = "/count"
        function = "stateful"
        "#,
    );
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let body = get_json(&client, &s.url("/count")).await;
        assert_eq!(body["seen"], 1, "state leaked between requests");
    }
}

#[tokio::test]
async fn opted_in_reuse_serves_sequential_requests_and_a_trap_discards_the_instance() {
    let s = Server::start(
        r#"
        [functions.stateful]
        wasm = "{wasm:stateful}"
        instance_reuse = 3
        [[routes]]
        path = "/count"
        function = "stateful"
        "#,
    );
    let client = reqwest::Client::new();
    let seen = |q: &'static str| {
        let client = client.clone();
        let url = s.url(&format!("/count{q}"));
        async move {
            let resp = client.get(url).send().await.expect("req");
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.expect("json");
            (status, body["seen"].as_u64())
        }
    };
    // One instance serves three requests, then a fresh one takes over.
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(seen("").await.1);
    }
    assert_eq!(got, [Some(1), Some(2), Some(3), Some(1)]);
    // A trap discards the instance: the next request starts from a fresh one.
    assert_eq!(seen("?trap").await.0, 500);
    assert_eq!(seen("").await.1, Some(1));
}

/// What a guest writes to stdout and stderr is logged with the id of the request that wrote it,
/// also when one instance serves several requests; a guest that writes more than the host keeps
/// still answers, and the log says how much was dropped.
#[tokio::test]
async fn guest_output_is_logged_per_request_and_bounded() {
    let s = Server::start(
        r#"
        [functions.stateful]
        wasm = "{wasm:stateful}"
        instance_reuse = 10
        [[routes]]
        path = "/count"
        function = "stateful"
        "#,
    );
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for expected in 1..=2u64 {
        let resp = client.get(s.url("/count?print")).send().await.expect("req");
        assert_eq!(resp.status(), 200);
        ids.push(
            resp.headers()["x-request-id"]
                .to_str()
                .expect("id")
                .to_string(),
        );
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["seen"], expected, "one instance serves both");
    }
    let flood = client.get(s.url("/count?flood")).send().await.expect("req");
    assert_eq!(flood.status(), 200, "too much output is not a failure");
    let flood_id = flood.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_string();
    let log = s.log();
    let lines = |id: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(id))
            .map(str::to_string)
            .collect()
    };
    for (i, id) in ids.iter().enumerate() {
        let n = i + 1;
        let lines = lines(id);
        let stdout = lines.iter().find(|l| l.contains("guest wrote to stdout"));
        let stderr = lines.iter().find(|l| l.contains("guest wrote to stderr"));
        assert!(
            stdout.is_some_and(|l| l.contains(&format!("stdout of request {n}"))),
            "{lines:?}"
        );
        assert!(
            stderr.is_some_and(|l| l.contains(&format!("stderr of request {n}"))),
            "{lines:?}"
        );
        // Nothing of another request's output under this id.
        let other = if n == 1 { 2 } else { 1 };
        assert!(
            !lines
                .iter()
                .any(|l| l.contains(&format!("of request {other}"))),
            "{lines:?}"
        );
    }
    let flooded = lines(&flood_id);
    // 200 lines of 1,024 bytes; 64 KiB kept.
    assert!(
        flooded
            .iter()
            .any(|l| l.contains(&format!("[{} more bytes not kept]", 200 * 1024 - 64 * 1024))),
        "{flooded:?}"
    );
}

#[tokio::test]
async fn metrics_count_outcomes_per_function() {
    let s = Server::start(
        r#"
        [functions.hello]
        wasm = "{wasm:hello}"
        rate_limit = { rps = 1, burst = 1 }
        [functions.trap]
        wasm = "{wasm:trap}"
        [[routes]]
        path = "/hello"
        function = "hello"
        [[routes]]
        path = "/trap"
        function = "trap"
        "#,
    );
    let client = reqwest::Client::new();
    get_status(&client, &s.url("/hello")).await;
    get_status(&client, &s.url("/hello")).await;
    get_status(&client, &s.url("/trap")).await;
    let resp = client.get(s.url("/metrics")).send().await.expect("metrics");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    let text = resp.text().await.expect("text");
    for needle in [
        r#"wasmgate_requests_total{function="hello""#,
        r#"outcome="ok"} 1"#,
        r#"outcome="rate-limited"} 1"#,
        r#"outcome="function-failed"} 1"#,
        r#"wasmgate_request_duration_seconds_bucket{function="hello""#,
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[tokio::test]
async fn a_shared_rate_limit_holds_across_two_processes() {
    let function = format!("shared-{}", unique_suffix());
    let (rps, burst) = (20.0, 5.0);
    let manifest = format!(
        r#"
        [functions.{function}]
        wasm = "{{wasm:hello}}"
        rate_limit = {{ rps = {rps}, burst = {burst}, shared = true }}
        [[routes]]
        path = "/hello"
        function = "{function}"
        "#
    );
    let redis = redis_url();
    let a = Server::start_with_args(&manifest, &["--redis-url", &redis]);
    let b = Server::start_with_args(&manifest, &["--redis-url", &redis]);
    let accepted = Arc::new(AtomicU32::new(0));
    let client = reqwest::Client::new();
    let started = Instant::now();
    let duration = Duration::from_secs(4);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let url = if i % 2 == 0 {
            a.url("/hello")
        } else {
            b.url("/hello")
        };
        let (client, accepted) = (client.clone(), accepted.clone());
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < duration {
                if get_status(&client, &url).await == 200 {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = rps * elapsed + burst;
    let got = f64::from(accepted.load(Ordering::Relaxed));
    println!(
        "accepted {got} in {elapsed:.2}s across two processes; configured allows {expected:.1}"
    );
    assert!(
        (got - expected).abs() <= expected * 0.10,
        "accepted {got}, expected {expected:.1} ±10%"
    );
}

#[tokio::test]
async fn sighup_applies_new_limits_without_losing_in_flight_requests() {
    let base = r#"
        [functions.slow]
        wasm = "{wasm:capprobe}"
        capabilities = ["db", "cache", "lock"]
        [functions.hello]
        wasm = "{wasm:hello}"
        [[routes]]
        path = "/probe/lock/{name}"
        function = "slow"
        [[routes]]
        path = "/hello"
        function = "hello"
        "#;
    let s = Server::start(base);
    let client = reqwest::Client::new();
    let in_flight = {
        let (client, url) = (client.clone(), s.url("/probe/lock/x?hold_ms=1500"));
        tokio::spawn(async move { client.post(url).send().await.expect("in flight").status() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let limited = base.replace(
        "[functions.hello]\n        wasm = \"{wasm:hello}\"",
        "[functions.hello]\n        wasm = \"{wasm:hello}\"\n        rate_limit = { rps = 1, burst = 1 }",
    );
    assert_ne!(limited, base);
    s.rewrite_manifest(&limited);
    s.signal("HUP");
    let started = Instant::now();
    while !s.log().contains("reloaded manifest") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no reload:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get_status(&client, &s.url("/hello")).await, 200);
    assert_eq!(
        get_status(&client, &s.url("/hello")).await,
        429,
        "the new limit applies"
    );
    assert_eq!(
        in_flight.await.expect("task"),
        200,
        "the in-flight request finished"
    );

    // A broken manifest is refused and the current one keeps serving.
    s.rewrite_manifest("this is not toml [");
    s.signal("HUP");
    let started = Instant::now();
    while !s.log().contains("reload refused") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no refusal:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get_status(&client, &s.url("/hello")).await, 200);
}
