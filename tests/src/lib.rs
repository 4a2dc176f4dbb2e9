//! Harness for black-box tests: builds the guest functions once, starts the real `wasmgate`
//! binary on a free port with a manifest written for the test, and stops it on drop.
//!
//! The binary is the one `cargo build -p wasmgate` put beside this test executable (the README's
//! test command builds it first); the harness refuses a binary older than the host sources, so a
//! stale build cannot pass for the current code.

pub mod servers;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `functions/dist/<name>.wasm`, building every guest the first time it is asked for.
pub fn wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(repo().join("scripts/build-functions"))
            .status()
            .expect("running scripts/build-functions");
        assert!(status.success(), "building the guest functions failed");
    });
    let path = repo().join("functions/dist").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The `wasmgate` binary from the same target directory as this test.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>/wasmgate
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable lives in target/<profile>/deps")
            .join("wasmgate");
        let built = std::fs::metadata(&bin)
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| {
                panic!(
                    "{} is missing: run `cargo build -p wasmgate` first",
                    bin.display()
                )
            });
        let newest = newest_source(&repo().join("host/src"));
        assert!(
            built >= newest,
            "{} is older than host/src: run `cargo build -p wasmgate` first",
            bin.display()
        );
        bin
    })
    .clone()
}

fn newest_source(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).expect("reading host/src").flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_source(&path)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        newest = newest.max(t);
    }
    newest
}

/// Compiled components shared by every test, so each server start after the first is quick.
pub fn shared_cache_dir() -> PathBuf {
    binary()
        .parent()
        .expect("binary has a parent")
        .join("wasmgate-test-cache")
}

/// A running `wasmgate up`, killed on drop.
pub struct Server {
    child: Child,
    pub base: String,
    pub pid: u32,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts `wasmgate up` on `manifest` (TOML; `{wasm:NAME}` is replaced by the absolute path
    /// of that guest) and waits until it listens.
    pub fn start(manifest: &str) -> Server {
        Self::start_with(manifest, &shared_cache_dir(), &[])
    }

    pub fn start_with_cache(manifest: &str, cache_dir: &Path) -> Server {
        Self::start_with(manifest, cache_dir, &[])
    }

    /// Starts with extra `wasmgate up` arguments (e.g. `--database-url`).
    pub fn start_with_args(manifest: &str, args: &[&str]) -> Server {
        Self::start_with(manifest, &shared_cache_dir(), args)
    }

    fn start_with(manifest: &str, cache_dir: &Path, args: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let manifest_path = write_manifest(dir.path(), manifest);
        let log = dir.path().join("wasmgate.log");
        let mut child = Command::new(binary())
            .args(["up", "--listen", "127.0.0.1:0", "--manifest"])
            .arg(&manifest_path)
            .arg("--cache-dir")
            .arg(cache_dir)
            .args(args)
            .env("WASMGATE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starting wasmgate");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("wasmgate listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "wasmgate did not start; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        Server {
            pid: child.id(),
            child,
            base,
            log,
            dir,
        }
    }

    /// Replaces the manifest this server was started with (for reload tests).
    pub fn rewrite_manifest(&self, manifest: &str) {
        write_manifest(self.dir.path(), manifest);
    }

    /// Sends a signal (e.g. "HUP") to the server.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{name} {} failed", self.pid);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident set size of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("reading /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `manifest` into `dir`, expanding `{wasm:NAME}` placeholders.
pub fn write_manifest(dir: &Path, manifest: &str) -> PathBuf {
    let mut text = manifest.to_string();
    while let Some(start) = text.find("{wasm:") {
        let end = start + text[start..].find('}').expect("closing brace");
        let name = &text[start + 6..end];
        let path = wasm(name).display().to_string();
        text.replace_range(start..=end, &path);
    }
    let path = dir.join("wasmgate.toml");
    std::fs::write(&path, text).expect("writing manifest");
    path
}

/// `DATABASE_URL`, defaulting to the local PostgreSQL.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `REDIS_URL`, defaulting to the local Redis.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Creates an empty PostgreSQL database beside `DATABASE_URL`'s, for one test.
pub fn fresh_postgres() -> String {
    let base = database_url();
    let name = format!("wgt_{}_{}", std::process::id(), unique_suffix());
    let out = Command::new("psql")
        .arg(&base)
        .args(["-v", "ON_ERROR_STOP=1", "-qc"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .expect("running psql");
    assert!(
        out.status.success(),
        "cannot create a database at {base}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (prefix, _) = base.rsplit_once('/').expect("DATABASE_URL ends in /dbname");
    format!("{prefix}/{name}")
}

/// A short suffix unique within this machine for a while.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:x}{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs `wasmgate check` on `manifest` and returns (success, stderr).
pub fn check(manifest: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_manifest(dir.path(), manifest);
    let out = Command::new(binary())
        .args(["check", "--manifest"])
        .arg(&path)
        .arg("--cache-dir")
        .arg(shared_cache_dir())
        .output()
        .expect("running wasmgate check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts a response is an RFC 9457 problem with the given status and type slug, and returns
/// its body.
pub async fn expect_problem(resp: reqwest::Response, status: u16, slug: &str) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "content-type"
    );
    let id = resp.headers()["x-request-id"]
        .to_str()
        .expect("ascii request id")
        .to_string();
    let body: serde_json::Value = resp.json().await.expect("problem body is JSON");
    assert_eq!(
        body["type"],
        format!("urn:wasmgate:problem:{slug}"),
        "{body}"
    );
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["request_id"], id, "{body}");
    body
}

/// Asserts a guest-produced problem (no host request id in the body) and returns its body.
pub async fn expect_guest_problem(
    resp: reqwest::Response,
    status: u16,
    slug: &str,
) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let body: serde_json::Value = resp.json().await.expect("problem body is JSON");
    assert_eq!(
        body["type"],
        format!("urn:wasmgate:problem:{slug}"),
        "{body}"
    );
    body
}

/// The user-management function with every v1 and v2 route, as the example manifest has it.
pub fn users_manifest() -> String {
    let mut m = format!(
        r#"
        [functions.users]
        wasm = "{{wasm:users}}"
        capabilities = ["db", "cache", "response-cache"]
        migrations = "{}"
        max_body = "64KiB"
        "#,
        repo().join("functions/users/migrations").display()
    );
    // As in the example manifest: reads of one user cached, creates and updates idempotent.
    let cached = "cache = { ttl = \"30s\" }\nidempotency = {}\n";
    for (path, methods, policies) in [
        ("/v1/users", r#"["GET", "POST"]"#, "idempotency = {}\n"),
        ("/v1/users/{id}", r#"["GET", "PATCH", "DELETE"]"#, cached),
        ("/v1/login", r#"["POST"]"#, ""),
        ("/v1/me", r#"["GET"]"#, ""),
        ("/v2/users", r#"["GET", "POST"]"#, "idempotency = {}\n"),
        ("/v2/users/{id}", r#"["GET", "PATCH", "DELETE"]"#, cached),
    ] {
        m.push_str(&format!(
            "[[routes]]\npath = \"{path}\"\nmethods = {methods}\nfunction = \"users\"\n{policies}"
        ));
    }
    m
}

/// GET `url` and its JSON body.
pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    client
        .get(url)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("a JSON body")
}

/// GET `url` and its body as text.
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client
        .get(url)
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("a text body")
}

/// `path` on `a` for even `i`, on `b` for odd: spreads requests over two processes.
pub fn either(a: &Server, b: &Server, i: usize, path: &str) -> String {
    if i.is_multiple_of(2) {
        a.url(path)
    } else {
        b.url(path)
    }
}

/// GET `url` and its status code.
pub async fn get_status(client: &reqwest::Client, url: &str) -> u16 {
    client.get(url).send().await.expect("GET").status().as_u16()
}

/// Waits for every request task and returns their statuses, sorted.
pub async fn sorted_statuses(tasks: Vec<tokio::task::JoinHandle<u16>>) -> Vec<u16> {
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.expect("request task"));
    }
    statuses.sort_unstable();
    statuses
}
