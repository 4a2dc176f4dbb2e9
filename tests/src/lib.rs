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
    assert!(
        path.exists(),
        "{} was not built (scripts/build-functions builds the Rust guests, scripts/build-other-languages the Python and JavaScript ones)",
        path.display()
    );
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
    /// The `--database-url`/`--redis-url` it was started with, for [`Server::cli`].
    overrides: Vec<String>,
    /// The admin API's base URL, when it was started with a token.
    pub admin: Option<String>,
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
        let admin = std::sync::Arc::new(std::sync::Mutex::new(None));
        let admin_seen = admin.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("wasmgate admin listening on ") {
                    *admin_seen.lock().expect("admin url") = Some(url.to_string());
                }
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
            overrides: args
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .chunks(2)
                .filter(|kv| matches!(kv[0].as_str(), "--database-url" | "--redis-url"))
                .flatten()
                .cloned()
                .collect(),
            admin: admin.lock().expect("admin url").clone(),
        }
    }

    /// Runs an operator command (`wasmgate roles ...`, `wasmgate keys ...`) against this
    /// server's manifest and databases; returns its stdout, panicking if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let (command, rest) = args.split_first().expect("a command");
        let out = Command::new(binary())
            .arg(command)
            .arg("--manifest")
            .arg(self.dir.path().join("wasmgate.toml"))
            .args(&self.overrides)
            .args(rest)
            .output()
            .expect("running wasmgate");
        assert!(
            out.status.success(),
            "wasmgate {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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

    /// The sum of a metric's samples in `/metrics` whose labels contain `labels`.
    pub async fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .filter(|l| {
                (l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
                    && l.contains(labels)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident set size of the server process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// The anonymous part of the resident set (heap, stacks, instance slots), in KiB: what the
    /// server allocated, without the pages of its own executable it has read.
    pub fn anon_kib(&self) -> u64 {
        self.status_kib("RssAnon")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("reading /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
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

/// Runs one query against a test database (`sqlite://path` through Python's sqlite3, or
/// `postgres://...` through psql) and returns its rows, one per line, columns joined by `|`.
/// Tests read the tables behind the binary's back with it, to see what really changed.
pub fn sql(database_url: &str, query: &str) -> String {
    try_sql(database_url, query).unwrap_or_else(|e| panic!("query failed: {e}"))
}

/// [`sql`], with a failed query (a table not there yet...) as its error text.
pub fn try_sql(database_url: &str, query: &str) -> Result<String, String> {
    let out = match database_url.strip_prefix("sqlite://") {
        Some(path) => Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys\nfor r in sqlite3.connect(sys.argv[1]).execute(sys.argv[2]): print('|'.join(map(str, r)))",
                path,
                query,
            ])
            .output(),
        None => Command::new("psql")
            .arg(database_url)
            .args(["-tAqc", query])
            .output(),
    }
    .expect("running the query tool");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
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

/// The user-management function with every v1 and v2 route and the `activity` projection of
/// its events, as the example manifest has them.
pub fn users_manifest() -> String {
    users_manifest_with("", "{}")
}

/// [`users_manifest`] with `extra` TOML before the functions (e.g. an `[auth]` section) and
/// `throttle` as the login routes' `login_throttle`.
pub fn users_manifest_with(extra: &str, throttle: &str) -> String {
    let mut m = format!(
        r#"
        {extra}
        [functions.users]
        wasm = "{{wasm:users}}"
        capabilities = ["db", "response-cache", "auth", "events", "password"]
        migrations = "{}"
        max_body = "64KiB"

        [functions.activity]
        wasm = "{{wasm:activity}}"
        capabilities = ["db"]
        migrations = "{}"
        "#,
        repo().join("functions/users/migrations").display(),
        repo().join("functions/activity/migrations").display()
    );
    for topic in ["user.created", "user.updated", "user.deleted"] {
        m.push_str(&format!(
            "[[subscriptions]]\ntopic = \"{topic}\"\nfunction = \"activity\"\n"
        ));
    }
    // As in the example manifest: accounts readable and changeable by their owner or an admin,
    // reads of one user cached, creates and updates idempotent, logins throttled.
    let owned = "auth = { owner = \"id\" }\ncache = { ttl = \"30s\" }\nidempotency = {}\n";
    let admin = "auth = { roles = [\"admin\"] }\n";
    let throttled = format!("login_throttle = {throttle}\n");
    for (path, methods, policies) in [
        ("/v1/users", r#"["POST"]"#, "idempotency = {}\n"),
        ("/v1/users", r#"["GET"]"#, admin),
        ("/v1/users/{id}", r#"["GET", "PATCH", "DELETE"]"#, owned),
        ("/v1/login", r#"["POST"]"#, throttled.as_str()),
        ("/v1/me", r#"["GET"]"#, "auth = {}\n"),
        ("/v2/users", r#"["POST"]"#, "idempotency = {}\n"),
        ("/v2/users", r#"["GET"]"#, admin),
        ("/v2/users/{id}", r#"["GET", "PATCH", "DELETE"]"#, owned),
        (
            "/v2/users/{id}/activity",
            r#"["GET"]"#,
            "auth = { owner = \"id\" }\n",
        ),
        ("/v2/login", r#"["POST"]"#, throttled.as_str()),
        ("/v2/token/refresh", r#"["POST"]"#, ""),
        ("/v2/logout", r#"["POST"]"#, "auth = {}\n"),
    ] {
        m.push_str(&format!(
            "[[routes]]\npath = \"{path}\"\nmethods = {methods}\nfunction = \"users\"\n{policies}"
        ));
    }
    m
}

/// Starts `manifest` on the embedded default with a SQLite file of its own; returns the
/// server, the directory that holds the file (keep it alive) and the database URL.
pub fn start_embedded(manifest: &str) -> (Server, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = format!("sqlite://{}", dir.path().join("data.db").display());
    let server = Server::start_with_args(manifest, &["--database-url", &db]);
    (server, dir, db)
}

/// The version a component serves as: the first 12 hex digits of its sha256, as the
/// `wasmgate-version` response header and the metrics name it.
pub fn version_of(name: &str) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(wasm(name)).expect("wasm");
    hex::encode(sha2::Sha256::digest(bytes))[..12].to_string()
}

/// The admin API's token in tests that turn it on ([`with_admin`]).
pub const ADMIN_TOKEN: &str = "admin-token-for-the-tests";

/// Starts `manifest` with the admin API on (its token in a file in `dir`) and `backends`
/// (`--database-url ...`, `--redis-url ...`).
pub fn with_admin(dir: &Path, manifest: &str, backends: &[&str]) -> Server {
    let token = dir.join("admin-token");
    std::fs::write(&token, ADMIN_TOKEN).expect("token file");
    let mut args = backends.to_vec();
    args.extend([
        "--admin-listen",
        "127.0.0.1:0",
        "--admin-token-file",
        token.to_str().expect("utf-8 path"),
    ]);
    Server::start_with_args(manifest, &args)
}

/// Runs `wasmgate <args> --admin-url <admin> --admin-token <ADMIN_TOKEN>`: (exit code, stdout,
/// stderr).
pub fn admin_cli(admin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .args(["--admin-url", admin, "--admin-token", ADMIN_TOKEN])
        .env_remove("WASMGATE_ADMIN_TOKEN")
        .output()
        .expect("running wasmgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The password every test account gets.
pub const PASSWORD: &str = "correct horse";

/// Creates an account (POST /v2/users) and returns its id.
pub async fn sign_up(s: &Server, email: &str) -> String {
    let resp = reqwest::Client::new()
        .post(s.url("/v2/users"))
        .json(&serde_json::json!({"email": email, "name": email, "password": PASSWORD}))
        .send()
        .await
        .expect("sign up");
    assert_eq!(resp.status(), 201, "sign up {email}");
    let body: serde_json::Value = resp.json().await.expect("json");
    body["id"].as_str().expect("id").to_string()
}

/// Logs in through POST /v2/login and returns the whole token response.
pub async fn login_v2(s: &Server, email: &str) -> serde_json::Value {
    let resp = reqwest::Client::new()
        .post(s.url("/v2/login"))
        .json(&serde_json::json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!(resp.status(), 200, "login {email}");
    resp.json().await.expect("json")
}

/// An access token for `email`.
pub async fn token(s: &Server, email: &str) -> String {
    login_v2(s, email).await["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

/// A fresh loopback address (127.x.y.z, never 127.0.0.1) to send from. Login throttling counts
/// failures per client address, in Redis when the server has it; Redis outlives a test, so a
/// test whose logins fail sends from an address no other test (or earlier run) used.
pub fn loopback() -> std::net::IpAddr {
    let mut b = [0u8; 3];
    getrandom::fill(&mut b).expect("random");
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, b[0].max(1), b[1], b[2].max(2)))
}

/// A client that sends `token` as its bearer token on every request, from a fresh loopback
/// address.
pub fn bearer_client(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .local_address(loopback())
        .build()
        .expect("client")
}

/// Creates `email`, makes it an admin with `wasmgate roles grant`, and returns (its id, an
/// admin token).
pub async fn admin(s: &Server, email: &str) -> (String, String) {
    let id = sign_up(s, email).await;
    s.cli(&["roles", "grant", &id, "admin"]);
    (id.clone(), token(s, email).await)
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

/// The admin API of a test server ([`with_admin`]), every call expected to succeed.
pub struct AdminApi {
    pub base: String,
    pub c: reqwest::Client,
}

impl AdminApi {
    pub fn of(s: &Server) -> Self {
        Self {
            base: s.admin.clone().expect("the admin API is on"),
            c: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> serde_json::Value {
        let mut req = self
            .c
            .request(method, format!("{}/admin/v1/functions/{path}", self.base))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("admin call");
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    /// Uploads fixture `name` as `label` of `function`.
    pub async fn upload(&self, function: &str, label: &str, name: &str) {
        let resp = self
            .c
            .post(format!(
                "{}/admin/v1/functions/{function}/versions?label={label}",
                self.base
            ))
            .bearer_auth(ADMIN_TOKEN)
            .body(std::fs::read(wasm(name)).expect("wasm"))
            .send()
            .await
            .expect("upload");
        assert_eq!(
            resp.status(),
            201,
            "{}",
            resp.text().await.unwrap_or_default()
        );
    }

    /// Waits until the shadow of `function` has compared (or skipped) `n` runs on `route`, every
    /// process's comparisons reaching the registry once a second; returns that route's figures.
    pub async fn shadow_compared(&self, function: &str, route: &str, n: u64) -> serde_json::Value {
        let started = std::time::Instant::now();
        loop {
            let view = self
                .call(reqwest::Method::GET, &format!("{function}/shadow"), None)
                .await;
            let r = view["routes"]
                .as_array()
                .and_then(|rs| rs.iter().find(|r| r["route"] == route).cloned())
                .unwrap_or(serde_json::Value::Null);
            let done = r["compared"].as_u64().unwrap_or(0) + r["skipped"].as_u64().unwrap_or(0);
            if done >= n {
                return r;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "{done} of {n} shadow runs on {route} compared: {view}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// `function` on `label` at 100%, as its first deployment.
    pub async fn first(&self, function: &str, label: &str) {
        self.call(
            reqwest::Method::PUT,
            &format!("{function}/deployment"),
            Some(serde_json::json!({"versions": [{"label": label, "weight": 100}]})),
        )
        .await;
    }
}

/// The notes example (`functions/notes`) granted `caps` (`"db", "cache"`...), on `/notes` and
/// `/notes/{id}`.
pub fn notes_manifest(caps: &str) -> String {
    format!(
        r#"
        [functions.notes]
        wasm = "{{wasm:notes}}"
        capabilities = [{caps}]
        migrations = "{}"
        [[routes]]
        path = "/notes"
        methods = ["GET", "POST"]
        function = "notes"
        [[routes]]
        path = "/notes/{{id}}"
        methods = ["GET"]
        function = "notes"
        "#,
        repo().join("functions/notes/migrations").display()
    )
}

/// Waits until `query` answers `want` on `database_url` (a failing query, e.g. a table not
/// created yet, counts as not yet), at most `limit`.
pub async fn until_sql(database_url: &str, query: &str, want: &str, limit: std::time::Duration) {
    if !try_until_sql(database_url, query, want, limit).await {
        let got = try_sql(database_url, query).unwrap_or_default();
        panic!("{query}: {got:?}, waiting for {want:?}");
    }
}

/// [`until_sql`] that says whether `query` answered `want` within `limit` instead of failing.
pub async fn try_until_sql(
    database_url: &str,
    query: &str,
    want: &str,
    limit: std::time::Duration,
) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if try_sql(database_url, query).unwrap_or_default() == want {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// `POST /publish/{topic}?{query}` with `body`, to the `publisher` fixture: its status and
/// JSON answer (`null` when not JSON).
pub async fn publish_event(
    s: &Server,
    topic: &str,
    query: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(s.url(&format!("/publish/{topic}?{query}")))
        .body(body.to_string())
        .send()
        .await
        .expect("publish");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

/// Runs `redis-cli -u REDIS_URL <args>` and returns what it printed.
pub fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-u", &redis_url()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
