//! Private Redis and PostgreSQL servers for tests that stop and restart them, so they never
//! disturb the shared servers other tests use.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn wait_for_port(port: u16, up: bool) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let open = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        if open == up {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "port {port} did not become {}",
        if up { "open" } else { "closed" }
    );
}

/// A `redis-server` on its own port.
pub struct PrivateRedis {
    port: u16,
    child: Option<Child>,
    /// `--tls-*` arguments when it speaks only TLS.
    tls: Vec<String>,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let mut r = Self {
            port: crate::free_port(),
            child: None,
            tls: Vec::new(),
        };
        r.resume();
        r
    }

    /// One that speaks only TLS, with this certificate and key (PEM files); clients are not
    /// asked for certificates.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Self {
        let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_string();
        let mut r = Self {
            port: crate::free_port(),
            child: None,
            tls: vec![
                "--tls-cert-file".into(),
                path(cert),
                "--tls-key-file".into(),
                path(key),
                "--tls-auth-clients".into(),
                "no".into(),
            ],
        };
        r.resume();
        r
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_empty() {
            "redis"
        } else {
            "rediss"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        wait_for_port(self.port, false);
    }

    /// Starts it again on the same port.
    pub fn resume(&mut self) {
        let port = self.port.to_string();
        let ports: &[&str] = if self.tls.is_empty() {
            &["--port", &port]
        } else {
            &["--port", "0", "--tls-port", &port]
        };
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(ports)
            .args(&self.tls)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting redis-server (scripts/services installs it)");
        self.child = Some(child);
        wait_for_port(self.port, true);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A PostgreSQL cluster in a temp dir, on its own port, with trust auth.
pub struct PrivatePostgres {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// `-c` settings beyond the defaults.
    settings: String,
}

fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL installed under /usr/lib/postgresql (scripts/services installs it)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL tool as the `postgres` user when we are root (PostgreSQL refuses root).
fn pg_command(bin: &std::path::Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

impl PrivatePostgres {
    pub fn start() -> Self {
        Self::start_with(|_| String::new())
    }

    /// One that accepts only TLS connections over TCP, with this certificate and key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_with(|data| {
            for (name, text) in [
                ("server.crt", cert_pem),
                ("server.key", key_pem),
                (
                    "pg_hba.conf",
                    "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
                ),
            ] {
                let path = data.join(name);
                std::fs::write(&path, text).expect("write into the data dir");
                set_mode(&path, 0o600);
            }
            "-c ssl=on".into()
        })
    }

    /// `prepare` gets the data directory after initdb and returns extra `-c` settings.
    fn start_with(prepare: impl FnOnce(&std::path::Path) -> String) -> Self {
        let bin = pg_bin();
        let dir = std::env::temp_dir().join(format!("wasmgate-pg-{}", crate::unique_suffix()));
        std::fs::create_dir_all(&dir).expect("pg dir");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "chown of the PostgreSQL test dir failed");
        }
        let status = pg_command(&bin, "initdb")
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(dir.join("data"))
            .stdout(Stdio::null())
            .status()
            .expect("initdb");
        assert!(status.success(), "initdb failed");
        let settings = prepare(&dir.join("data"));
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.join("data"))
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "chown of the PostgreSQL data dir failed");
        }
        let pg = Self {
            port: crate::free_port(),
            dir,
            bin,
            settings,
        };
        pg.resume();
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) {
        let status = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args)
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl");
        assert!(status.success(), "pg_ctl {args:?} failed");
    }

    pub fn stop(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        wait_for_port(self.port, false);
    }

    pub fn resume(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off {}",
            self.port,
            self.dir.display(),
            self.settings
        );
        self.pg_ctl(&[
            "-o",
            &opts,
            "-l",
            &self.dir.join("log").display().to_string(),
            "-w",
            "start",
        ]);
        wait_for_port(self.port, true);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
