//! TLS: both listeners serve HTTPS with a certificate from the test's own CA (HTTP/2 when the
//! client offers it), a renewed certificate is served without a restart, a plain-text client
//! gets nothing, and PostgreSQL and Redis are reached over TLS, verified against that CA, on
//! servers that accept nothing else.

use std::path::Path;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use wasmgate_tests::servers::{PrivatePostgres, PrivateRedis};
use wasmgate_tests::{ADMIN_TOKEN, Server, with_admin};

/// A CA of the test's own, and what it signs.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wasmgate test CA");
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for localhost and 127.0.0.1: (certificate PEM, key PEM, certificate DER).
    fn leaf(&self, name: &str) -> (String, String, Vec<u8>) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

fn client(ca: &Ca) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("CA"))
        .tls_info(true)
        .build()
        .expect("client")
}

/// The certificate the server presented.
fn presented(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("TLS info")
        .to_vec()
}

fn write_pair(dir: &Path, (cert, key, _): &(String, String, Vec<u8>)) {
    // As a renewal tool would: each file replaced whole.
    for (name, text) in [("cert.pem", cert), ("key.pem", key)] {
        let tmp = dir.join(format!("{name}.new"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
}

#[tokio::test]
async fn both_listeners_serve_https_and_a_renewed_certificate_without_a_restart() {
    let ca = Ca::new();
    let files = tempfile::tempdir().expect("tmp");
    let first = ca.leaf("first");
    write_pair(files.path(), &first);
    let manifest = format!(
        r#"
[server]
tls = {{ cert = "{dir}/cert.pem", key = "{dir}/key.pem" }}
[functions.hello]
wasm = "{{wasm:hello}}"
[functions.echo]
wasm = "{{wasm:echo}}"
[[routes]]
path = "/hello"
function = "hello"
[[routes]]
path = "/echo"
function = "echo"
"#,
        dir = files.path().display()
    );
    let s = with_admin(files.path(), &manifest, &[]);
    assert!(s.url("/").starts_with("https://"), "{}", s.url("/"));
    let https = client(&ca);

    let resp = https.get(s.url("/hello")).send().await.expect("https");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.version(),
        reqwest::Version::HTTP_2,
        "h2 offered by ALPN"
    );
    assert_eq!(presented(&resp), first.2);
    // The guest is told it was asked over https.
    let seen: serde_json::Value = https
        .get(s.url("/echo?uri"))
        .send()
        .await
        .expect("https")
        .json()
        .await
        .expect("json");
    assert!(
        seen["uri"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://")),
        "{seen}"
    );
    let h1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("CA"))
        .http1_only()
        .build()
        .expect("client");
    let resp = h1.get(s.url("/hello")).send().await.expect("https/1.1");
    assert_eq!(
        (resp.status(), resp.version()),
        (reqwest::StatusCode::OK, reqwest::Version::HTTP_11)
    );

    // The admin API is behind the same certificate.
    let admin = s.admin.clone().expect("admin listener");
    assert!(admin.starts_with("https://"), "{admin}");
    let resp = https
        .get(format!("{admin}/admin/v1/deployments"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("admin over https");
    assert_eq!(resp.status(), 200);
    // And the deployment commands reach it, trusting the CA they are given.
    let ca_file = files.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("ca");
    let ca_arg = ca_file.to_str().expect("utf-8");
    let (code, out, err) =
        wasmgate_tests::admin_cli(&admin, &["versions", "hello", "--admin-ca-file", ca_arg]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = wasmgate_tests::admin_cli(&admin, &["versions", "hello"]);
    assert_ne!(
        code, 0,
        "a private CA's certificate was trusted without --admin-ca-file"
    );
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = s.url("/hello").replacen("https://", "http://", 1);
    let answered = reqwest::Client::new()
        .get(&plain)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(answered.is_err(), "plain HTTP answered: {answered:?}");

    // Renewal: new files, served within a few seconds, no restart; connections made after it
    // see the new certificate.
    let second = ca.leaf("second");
    write_pair(files.path(), &second);
    let started = Instant::now();
    loop {
        let fresh = client(&ca);
        let resp = fresh.get(s.url("/hello")).send().await.expect("https");
        assert_eq!(resp.status(), 200);
        if presented(&resp) == second.2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the renewed certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("renewed certificate served after {:?}", started.elapsed());

    // A broken renewal (a key that does not match) is refused; the certificate in force stays.
    std::fs::write(files.path().join("key.pem"), ca.leaf("other").1).expect("write");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let resp = client(&ca)
        .get(s.url("/hello"))
        .send()
        .await
        .expect("still serving");
    assert_eq!(presented(&resp), second.2);
    let log = s.log();
    assert!(log.contains("TLS certificate not reloaded"), "{log}");
}

/// PostgreSQL and Redis that accept only TLS, reached through URLs that name the test's CA:
/// a request that needs each succeeds (so it went over TLS), and a URL without TLS is refused
/// by the server.
#[tokio::test]
async fn the_backends_are_reached_over_tls_verified_against_the_operators_ca() {
    let ca = Ca::new();
    let files = tempfile::tempdir().expect("tmp");
    let leaf = ca.leaf("backend");
    write_pair(files.path(), &leaf);
    let ca_file = files.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("ca");

    let pg = PrivatePostgres::start_tls(&leaf.0, &leaf.1);
    let redis = PrivateRedis::start_tls(
        &files.path().join("cert.pem"),
        &files.path().join("key.pem"),
    );
    let ca_path = ca_file.to_str().expect("utf-8");
    let database_url = format!("{}?sslmode=verify-full&sslrootcert={ca_path}", pg.url());
    let redis_url = format!("{}/?sslrootcert={ca_path}", redis.url());
    assert!(redis_url.starts_with("rediss://"));
    let manifest = r#"
[functions.probe]
wasm = "{wasm:capprobe}"
capabilities = ["db", "cache", "lock"]
[[routes]]
path = "/probe/cache/{key}"
function = "probe"
[[routes]]
path = "/probe/db"
function = "probe"
"#;
    let s = Server::start_with_args(
        manifest,
        &["--database-url", &database_url, "--redis-url", &redis_url],
    );
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(s.url("/probe/db"))
            .send()
            .await
            .expect("db")
            .status(),
        200,
        "a db call over TLS"
    );
    let put = http
        .put(s.url("/probe/cache/k"))
        .body("over tls")
        .send()
        .await
        .expect("put");
    assert_eq!(put.status(), 200, "a cache write over TLS");
    let got = http.get(s.url("/probe/cache/k")).send().await.expect("get");
    assert_eq!(got.status(), 200);
    let ready = http.get(s.url("/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);

    // The same servers refuse clients without TLS, so what worked above went over TLS.
    let psql = std::process::Command::new("psql")
        .arg(format!("{}?sslmode=disable", pg.url()))
        .args(["-c", "SELECT 1"])
        .output()
        .expect("psql");
    assert!(!psql.status.success(), "PostgreSQL took a plain connection");
    assert!(
        String::from_utf8_lossy(&psql.stderr).contains("no encryption"),
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );
    let port = redis.url().rsplit(':').next().expect("port").to_string();
    let ping = std::process::Command::new("timeout")
        .args(["5", "redis-cli", "-p", &port, "PING"])
        .output()
        .expect("redis-cli");
    assert!(
        !String::from_utf8_lossy(&ping.stdout).contains("PONG"),
        "Redis answered a plain client"
    );
}
