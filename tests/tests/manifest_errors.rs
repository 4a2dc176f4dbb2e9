//! Every manifest problem stops start-up with a message naming the file, the entry and the fix,
//! and nothing serves until the whole manifest is valid.

use std::process::Command;
use std::time::Duration;

use wasmgate_tests::{binary, check, wasm, write_manifest};

fn assert_refused(manifest: &str, expected: &[&str]) -> String {
    let (ok, stderr) = check(manifest);
    assert!(!ok, "manifest was accepted:\n{manifest}");
    assert!(stderr.contains("wasmgate.toml"), "names the file: {stderr}");
    for e in expected {
        assert!(stderr.contains(e), "expected `{e}` in:\n{stderr}");
    }
    stderr
}

#[test]
fn unknown_function() {
    assert_refused(
        r#"
        [functions.hello]
        wasm = "{wasm:hello}"
        [[routes]]
        path = "/hi"
        function = "helo"
        "#,
        &[
            "routes[0] (* /hi)",
            "unknown function `helo`",
            "define [functions.helo] or use one of [hello]",
        ],
    );
}

#[test]
fn duplicate_route() {
    assert_refused(
        r#"
        [functions.hello]
        wasm = "{wasm:hello}"
        [[routes]]
        path = "/hi"
        methods = ["GET", "POST"]
        function = "hello"
        [[routes]]
        path = "/hi"
        methods = ["get"]
        function = "hello"
        "#,
        &[
            "routes[1] (get /hi)",
            "duplicate route",
            "routes[0] (GET,POST /hi)",
            "distinct methods",
        ],
    );
}

#[test]
fn overlapping_route() {
    assert_refused(
        r#"
        [functions.hello]
        wasm = "{wasm:hello}"
        [[routes]]
        path = "/users/{id}"
        function = "hello"
        [[routes]]
        path = "/users/{name}"
        methods = ["POST"]
        function = "hello"
        "#,
        &[
            "routes[1] (POST /users/{name})",
            "overlaps routes[0] (* /users/{id})",
        ],
    );
}

#[test]
fn missing_wasm() {
    assert_refused(
        r#"
        [functions.ghost]
        wasm = "does/not/exist.wasm"
        [[routes]]
        path = "/g"
        function = "ghost"
        "#,
        &[
            "[functions.ghost]",
            "does/not/exist.wasm",
            "build the function first or fix its `wasm` path",
        ],
    );
}

#[test]
fn invalid_wasm() {
    let dir = tempfile::tempdir().expect("tmp");
    let junk = dir.path().join("junk.wasm");
    std::fs::write(
        &junk,
        b"\0asm\x0d\x00\x01\x00garbage that is not a component",
    )
    .expect("write");
    assert_refused(
        &format!(
            r#"
            [functions.junk]
            wasm = "{}"
            [[routes]]
            path = "/j"
            function = "junk"
            "#,
            junk.display()
        ),
        &[
            "[functions.junk]",
            "junk.wasm",
            "is not a valid wasm component",
        ],
    );
}

#[test]
fn core_module_instead_of_component() {
    let dir = tempfile::tempdir().expect("tmp");
    let core = dir.path().join("core.wasm");
    // The smallest valid core module: magic and version, no sections.
    std::fs::write(&core, b"\0asm\x01\x00\x00\x00").expect("write");
    assert_refused(
        &format!(
            r#"
            [functions.core]
            wasm = "{}"
            [[routes]]
            path = "/c"
            function = "core"
            "#,
            core.display()
        ),
        &[
            "[functions.core]",
            "is a core wasm module, not a component",
            "wasm32-wasip2",
        ],
    );
}

#[test]
fn component_without_the_http_world() {
    assert_refused(
        r#"
        [functions.cmd]
        wasm = "{wasm:command}"
        [[routes]]
        path = "/c"
        function = "cmd"
        "#,
        &[
            "[functions.cmd]",
            "command.wasm",
            "does not export the `wasi:http/incoming-handler`",
            "export_http_function!",
        ],
    );
}

#[test]
fn reports_every_problem_in_one_pass() {
    let stderr = assert_refused(
        r#"
        [functions.hello]
        wasm = "{wasm:hello}"
        [functions.ghost]
        wasm = "nope.wasm"
        [[routes]]
        path = "/a"
        function = "nobody"
        [[routes]]
        path = "/b"
        function = "hello"
        [[routes]]
        path = "/b"
        function = "hello"
        "#,
        &[
            "3 problems",
            "unknown function `nobody`",
            "nope.wasm",
            "duplicate route",
        ],
    );
    assert_eq!(stderr.matches("\n  - ").count(), 3, "{stderr}");
}

#[test]
fn misspelt_key_is_named() {
    assert_refused(
        r#"
        [functions.hello]
        wasm = "{wasm:hello}"
        timout = "1s"
        "#,
        &["timout", "unknown field"],
    );
}

#[test]
fn up_refuses_to_serve_an_invalid_manifest() {
    let dir = tempfile::tempdir().expect("tmp");
    let manifest = write_manifest(
        dir.path(),
        r#"
        [functions.hello]
        wasm = "{wasm:hello}"
        [[routes]]
        path = "/hi"
        function = "nobody"
        "#,
    );
    let mut child = Command::new(binary())
        .args(["up", "--listen", "127.0.0.1:0", "--manifest"])
        .arg(&manifest)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "wasmgate kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("output");
    assert!(!status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("listening"), "it served: {stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown function `nobody`"));
}

#[test]
fn valid_manifest_passes_check() {
    let (ok, stderr) = check(&format!(
        r#"
        [functions.hello]
        wasm = "{}"
        [[routes]]
        path = "/hi"
        function = "hello"
        "#,
        wasm("hello").display()
    ));
    assert!(ok, "{stderr}");
}

#[test]
fn the_example_manifest_is_valid() {
    wasm("hello");
    let dir = tempfile::tempdir().expect("tmp");
    let db = format!("sqlite://{}", dir.path().join("example.db").display());
    let out = Command::new(binary())
        .args(["check", "--manifest"])
        .arg(wasmgate_tests::repo().join("wasmgate.toml"))
        .args(["--database-url", &db, "--cache-dir"])
        .arg(wasmgate_tests::shared_cache_dir())
        .output()
        .expect("running wasmgate check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn access_control_problems_are_named() {
    let migrations = wasmgate_tests::repo().join("functions/users/migrations");
    assert_refused(
        &format!(
            r#"
            [functions.users]
            wasm = "{{wasm:users}}"
            capabilities = ["db", "response-cache"]
            migrations = "{}"
            [[routes]]
            path = "/v1/users/{{id}}"
            methods = ["GET"]
            function = "users"
            auth = {{ owner = "uid" }}
            login_throttle = {{}}
            [[routes]]
            path = "/v1/open"
            methods = ["GET"]
            function = "users"
            auth = {{ required = false, roles = ["admin"] }}
            [[auth.providers]]
            issuer = "https://idp.example"
            audience = "api"
            "#,
            migrations.display()
        ),
        &[
            "imports `wasmgate:platform/auth",
            "add \"auth\" to its `capabilities`",
            "auth.owner `uid` is not a parameter of the path",
            "`login_throttle` applies to POST",
            "auth with required = false cannot demand roles",
            "providers[0] needs exactly one of jwks_file and jwks_url",
        ],
    );
}

#[test]
fn warm_instances_over_half_the_pool() {
    assert_refused(
        r#"
        [server]
        max_instances = 10
        warm_instances = 6
        [functions.hello]
        wasm = "{wasm:hello}"
        [[routes]]
        path = "/hi"
        function = "hello"
        "#,
        &[
            "[server] warm_instances (6) is over half of max_instances (10)",
            "0 turns them off",
        ],
    );
}

#[test]
fn an_environment_variable_that_cannot_be_one() {
    assert_refused(
        r#"
        [functions.hello]
        wasm = "{wasm:hello}"
        env = { "A=B" = "x" }
        [[routes]]
        path = "/hi"
        function = "hello"
        "#,
        &["[functions.hello] env: `A=B` cannot be an environment variable"],
    );
}
