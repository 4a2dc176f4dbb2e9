//! Progressive delivery, black-box: rollouts judged in the host from per-version figures. A
//! failing canary is rolled back with the gate and its figures in the history, a healthy one is
//! promoted through every step, one without traffic holds, and a second process takes over a
//! rollout whose driver was killed without skipping or repeating a step.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wasmgate_tests::{AdminApi, Server, with_admin};

/// `functions` functions named `f0`, `f1`..., each on `/f<k>/{name}`.
fn manifest(functions: usize) -> String {
    (0..functions)
        .map(|k| {
            format!(
                r#"
    [functions.f{k}]
    wasm = "{{wasm:hello}}"
    [[routes]]
    path = "/f{k}/{{name}}"
    methods = ["GET"]
    function = "f{k}"
    "#
            )
        })
        .collect()
}

/// What the rollout tests ask of the admin API.
trait Rollouts {
    async fn rollout(&self, function: &str) -> Value;
    async fn history(&self, function: &str) -> Vec<Value>;
    async fn until_ended(&self, function: &str, limit: Duration) -> Value;
}

impl Rollouts for AdminApi {
    async fn rollout(&self, function: &str) -> Value {
        self.call(reqwest::Method::GET, &format!("{function}/rollout"), None)
            .await
    }

    async fn history(&self, function: &str) -> Vec<Value> {
        let h = self
            .call(reqwest::Method::GET, &format!("{function}/history"), None)
            .await;
        h["history"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `function`'s rollout is no longer running (at most `limit`); returns it.
    async fn until_ended(&self, function: &str, limit: Duration) -> Value {
        let started = Instant::now();
        loop {
            let r = self.rollout(function).await;
            if r["state"] != "running" {
                return r;
            }
            assert!(started.elapsed() < limit, "still running: {r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Requests on `paths` from `clients` tasks until dropped, each numbered (`?i=`) in turn.
struct Load {
    stop: Arc<AtomicBool>,
}

impl Load {
    fn start(servers: Vec<String>, paths: Vec<String>, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        for k in 0..clients {
            let (stop, servers, paths) = (stop.clone(), servers.clone(), paths.clone());
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                let mut i: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let server = &servers[(i as usize + k) % servers.len()];
                    let path = &paths[(i as usize + k) % paths.len()];
                    // A server that was killed refuses; the others carry on.
                    let _ = c.get(format!("{server}{path}?i={i}")).send().await;
                }
            });
        }
        Self { stop }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn sqlite(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("platform.db").display())
}

/// The reasons in `history`, oldest first.
fn reasons(history: &[Value]) -> Vec<String> {
    history
        .iter()
        .rev()
        .map(|h| h["reason"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_answering_5_percent_500s_is_rolled_back_with_the_failing_gate() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = with_admin(
        dir.path(),
        &manifest(1),
        &["--database-url", &sqlite(dir.path())],
    );
    let api = AdminApi::of(&s);
    api.upload("f0", "v1", "hello").await;
    api.upload("f0", "v2", "flaky").await;
    api.first("f0", "v1").await;
    let _load = Load::start(vec![s.url("")], vec!["/f0/x".into()], 8);

    let interval = Duration::from_secs(3);
    let started = Instant::now();
    let r = api
        .call(
            reqwest::Method::POST,
            "f0/rollout",
            Some(json!({"version": "v2", "interval": "3s", "gates": {"min_requests": 40}})),
        )
        .await;
    assert_eq!(
        (r["state"].as_str(), r["step"].as_u64()),
        (Some("running"), Some(1)),
        "{r}"
    );
    let r = api.until_ended("f0", 2 * interval).await;
    let took = started.elapsed();
    eprintln!("rolled back {took:?} after the start: {}", r["last"]);
    assert_eq!(r["state"], "rolled-back", "{r}");
    let last = r["last"].as_str().unwrap_or("");
    assert!(
        last.contains("success gate: v2: ") && last.contains("below 99%"),
        "{r}"
    );

    // The history says which gate and the figures; the traffic is back on v1 alone.
    let history = api.history("f0").await;
    let newest = &history[0];
    assert!(
        newest["reason"]
            .as_str()
            .is_some_and(|r| r.contains("rolled back at step") && r.contains("success gate")),
        "{newest}"
    );
    assert_eq!(newest["versions"], json!([{"label": "v1", "weight": 100}]));
    assert!(
        newest["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with("rollout driver")),
        "{newest}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted_through_every_step_and_a_quiet_one_holds() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = with_admin(
        dir.path(),
        &manifest(2),
        &["--database-url", &sqlite(dir.path())],
    );
    let api = AdminApi::of(&s);
    for f in ["f0", "f1"] {
        api.upload(f, "v1", "hello").await;
        api.upload(f, "v2", "echo").await;
        api.first(f, "v1").await;
    }
    // f0 gets traffic, f1 none.
    let load = Load::start(vec![s.url("")], vec!["/f0/x".into()], 6);
    let plan = json!({"version": "v2", "steps": [10, 50, 100], "interval": "1s", "gates": {"min_requests": 20}});
    api.call(reqwest::Method::POST, "f0/rollout", Some(plan.clone()))
        .await;
    api.call(reqwest::Method::POST, "f1/rollout", Some(plan))
        .await;

    let r = api.until_ended("f0", Duration::from_secs(30)).await;
    drop(load);
    assert_eq!(r["state"], "promoted", "{r}");
    let steps: Vec<String> = reasons(&api.history("f0").await)
        .into_iter()
        .skip(1)
        .collect();
    assert_eq!(steps.len(), 4, "start, two steps, promotion: {steps:?}");
    assert!(steps[0].contains("step 1 of 3 (10% on v2)"), "{steps:?}");
    assert!(
        steps[1].contains("step 2 of 3 (50% on v2) after step 1 of 3"),
        "{steps:?}"
    );
    assert!(
        steps[2].contains("step 3 of 3 (100% on v2) after step 2 of 3"),
        "{steps:?}"
    );
    assert!(
        steps[3].contains("promoted v2 after step 3 of 3"),
        "{steps:?}"
    );
    let live = api.call(reqwest::Method::GET, "f0/deployment", None).await;
    assert_eq!(live["versions"], json!([{"label": "v2", "weight": 100}]));

    // Without traffic f1 neither promotes nor fails: it holds at its first step.
    let quiet = api.rollout("f1").await;
    assert_eq!(
        (quiet["state"].as_str(), quiet["step"].as_u64()),
        (Some("running"), Some(1)),
        "{quiet}"
    );
    assert!(
        quiet["last"]
            .as_str()
            .is_some_and(|l| l.starts_with("holding")),
        "{quiet}"
    );
    // The CLI shows it, and aborts it: the traffic goes back to v1.
    let (code, out, _) = cli(&s, &["rollout", "f1"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("f1 rollout")
            && out.contains("running, step 1 of 3 (10%)")
            && out.contains("holding"),
        "{out}"
    );
    let (code, out, _) = cli(&s, &["rollout", "f1", "--abort"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("aborted"), "{out}");
    let live = api.call(reqwest::Method::GET, "f1/deployment", None).await;
    assert_eq!(live["versions"], json!([{"label": "v1", "weight": 100}]));
    let (code, _, err) = cli(&s, &["rollout", "f1", "--abort"]);
    assert_eq!(code, 1, "nothing left to abort");
    assert!(err.contains("no rollout of `f1` is running"), "{err}");
}

/// Runs `wasmgate <args>` against `s`'s admin API: (exit code, stdout, stderr).
fn cli(s: &Server, args: &[&str]) -> (i32, String, String) {
    wasmgate_tests::admin_cli(s.admin.as_deref().expect("admin"), args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_healthy_canaries_with_the_default_gates_are_never_rolled_back() {
    const FUNCTIONS: usize = 10;
    const EACH: usize = 10;
    let dir = tempfile::tempdir().expect("tmp");
    let s = with_admin(
        dir.path(),
        &manifest(FUNCTIONS),
        &["--database-url", &sqlite(dir.path())],
    );
    let api = Arc::new(AdminApi::of(&s));
    let paths = (0..FUNCTIONS).map(|k| format!("/f{k}/x")).collect();
    let _load = Load::start(vec![s.url("")], paths, 8);
    let started = Instant::now();
    let runs: Vec<_> = (0..FUNCTIONS)
        .map(|k| {
            let api = api.clone();
            tokio::spawn(async move {
                let f = format!("f{k}");
                api.upload(&f, "v0", "hello").await;
                api.first(&f, "v0").await;
                let mut states = Vec::new();
                for n in 1..=EACH {
                    // Alternating modules, so each rollout moves to another build.
                    let fixture = if n % 2 == 0 { "hello" } else { "echo" };
                    api.upload(&f, &format!("v{n}"), fixture).await;
                    // The default gates; short steps.
                    api.call(
                        reqwest::Method::POST,
                        &format!("{f}/rollout"),
                        Some(json!({"version": format!("v{n}"), "steps": [50, 100], "interval": "1s"})),
                    )
                    .await;
                    let r = api.until_ended(&f, Duration::from_secs(60)).await;
                    states.push((r["state"].as_str().unwrap_or("?").to_string(), r["last"].to_string()));
                }
                states
            })
        })
        .collect();
    let mut rolled_back = Vec::new();
    let mut promoted = 0;
    for run in runs {
        for (state, last) in run.await.expect("task") {
            if state == "promoted" {
                promoted += 1;
            } else {
                rolled_back.push(format!("{state}: {last}"));
            }
        }
    }
    eprintln!(
        "{} rollouts of healthy canaries in {:?}: {promoted} promoted, {} rolled back",
        FUNCTIONS * EACH,
        started.elapsed(),
        rolled_back.len()
    );
    assert!(rolled_back.is_empty(), "false rollbacks: {rolled_back:#?}");
    assert_eq!(promoted, FUNCTIONS * EACH);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_takes_over_a_rollout_whose_driver_was_killed() {
    let dir = tempfile::tempdir().expect("tmp");
    let db = wasmgate_tests::fresh_postgres();
    let redis = wasmgate_tests::redis_url();
    let shared = ["--database-url", db.as_str(), "--redis-url", redis.as_str()];
    let a = with_admin(dir.path(), &manifest(1), &shared);
    let b = with_admin(dir.path(), &manifest(1), &shared);
    let api = AdminApi::of(&a);
    api.upload("f0", "v1", "hello").await;
    api.upload("f0", "v2", "echo").await;
    api.first("f0", "v1").await;
    let _load = Load::start(vec![a.url(""), b.url("")], vec!["/f0/x".into()], 6);
    api.call(
        reqwest::Method::POST,
        "f0/rollout",
        Some(json!({"version": "v2", "steps": [10, 25, 50, 75, 100], "interval": "1s", "gates": {"min_requests": 20}})),
    )
    .await;

    // Whoever drives makes the first step change; kill that process.
    let driver = loop {
        let history = api.history("f0").await;
        if let Some(actor) = history[0]["actor"]
            .as_str()
            .filter(|a| a.starts_with("rollout driver"))
        {
            break actor.to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (victim, survivor) = if driver.contains(&format!("pid {})", a.pid)) {
        (a, b)
    } else {
        assert!(driver.contains(&format!("pid {})", b.pid)), "{driver}");
        (b, a)
    };
    let killed = Instant::now();
    drop(victim);
    let api = AdminApi::of(&survivor);

    // The other process continues within a lease (3 s) and finishes the rollout.
    let r = api.until_ended("f0", Duration::from_secs(40)).await;
    assert_eq!(r["state"], "promoted", "{r}");
    let history = api.history("f0").await;
    let took_over = history
        .iter()
        .rev()
        .find(|h| {
            h["actor"]
                .as_str()
                .is_some_and(|a| a.starts_with("rollout driver") && a != driver)
                && h["at"].as_i64().is_some()
        })
        .expect("the survivor changed the traffic");
    eprintln!(
        "driver killed; the other process made its first step change {} ms later (interval 1 s, lease 3 s)",
        took_over["at"].as_i64().unwrap_or(0)
            - (chrono_ms() - i64::try_from(killed.elapsed().as_millis()).unwrap_or(0))
    );
    // Every step exactly once, in order.
    let steps: Vec<String> = reasons(&history)
        .into_iter()
        .filter(|r| r.contains("rollout"))
        .collect();
    let expected = [
        "step 1 of 5 (10% on v2)",
        "step 2 of 5 (25% on v2) after step 1",
        "step 3 of 5 (50% on v2) after step 2",
        "step 4 of 5 (75% on v2) after step 3",
        "step 5 of 5 (100% on v2) after step 4",
        "promoted v2 after step 5 of 5",
    ];
    assert_eq!(steps.len(), expected.len(), "{steps:#?}");
    for (got, want) in steps.iter().zip(expected) {
        assert!(got.contains(want), "{got} is not {want}: {steps:#?}");
    }
}

fn chrono_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .unwrap_or(0)
}
