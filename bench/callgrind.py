"""Instructions per request on the paths whose speed matters most, counted by callgrind.

Each server runs under `valgrind --tool=callgrind` with instrumentation off; once it answers,
instrumentation goes on, a warm-up of 20 requests runs, the counters are zeroed, N requests
go one after another on one keep-alive connection, and the counters are dumped. The figure is
the instructions of every thread over N, except SQLite's worker threads: those run the
platform's periodic polls (relay, revocations, rollouts), whose count follows the seconds the
run took under valgrind, not the requests (up to a sixth of a hit's figure in one run and
almost none in the next). What remains repeats within a few percent run after run. Paths: hello through a fresh instance, hello through a reused instance,
hello from the response cache (and the same hit on a route with `compression = false`, so the
compression layer's cost on a hit shows on its own), and bare axum (the native ceiling). The pool is 4 instances:
valgrind cannot reserve the default 1,000 slots' address space.
"""

import http.client
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, TARGET, free_port  # noqa: E402

WARM_UP = 20


def answering(port, path, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def control(pid, *args):
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def count(command, port, path, n, work, name):
    """Instructions per request of `command` serving `path` on `port`."""
    out = work / f"{name}.%p"
    p = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                          f"--callgrind-out-file={out}", *command], stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.log", "w"))
    try:
        if not answering(port, path):
            raise SystemExit(f"{name}: the server did not answer under valgrind (see {work / (name + '.log')})")
        control(p.pid, "-i", "on")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def get():
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            assert r.status == 200, f"{name}: {r.status} {body[:300]!r}"

        for _ in range(WARM_UP):
            get()
        control(p.pid, "-z")
        for _ in range(n):
            get()
        control(p.pid, "-d")
    finally:
        p.terminate()
        p.wait(60)
    # One file per thread of the dump (`<name>.<pid>.1-<thread>`).
    total = 0
    for d in sorted(work.glob(f"{name}.{p.pid}.1-*")):
        if sqlite_worker(d):
            continue
        text = d.read_text()
        total += int(next((line.split()[1] for line in text.splitlines() if line.startswith("totals:")), 0))
    return total / n


def sqlite_worker(dump):
    """Whether a thread's dump is one of sqlx's SQLite worker threads (started in its worker.rs)."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(dump)], capture_output=True,
                         text=True).stdout
    return any("sqlx-sqlite" in line and "worker.rs:std::sys::backtrace::__rust_begin_short_backtrace" in line
               for line in out.splitlines())


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    subprocess.run([ROOT / "scripts/build-functions"], check=True)
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "wasmgate", "-p", "wasmgate-bench",
                    "--bin", "wasmgate", "--bin", "axum-hello"], check=True, cwd=ROOT)
    work = Path(tempfile.mkdtemp(prefix="wasmgate-callgrind-"))
    hello = ROOT / "functions/dist/hello.wasm"
    manifest = work / "wasmgate.toml"
    manifest.write_text(f"""
[server]
max_instances = 4
[functions.hello]
wasm = "{hello}"
[functions.hello-reuse]
wasm = "{hello}"
instance_reuse = 1000000
[functions.hello-cached]
wasm = "{hello}"
[[routes]]
path = "/hello"
function = "hello"
[[routes]]
path = "/reuse/hello"
function = "hello-reuse"
[[routes]]
path = "/cached/hello"
methods = ["GET"]
function = "hello-cached"
cache = {{ ttl = "1h" }}
[[routes]]
path = "/cached-plain/hello"
methods = ["GET"]
function = "hello-cached"
cache = {{ ttl = "1h" }}
compression = false
""")
    # Compile once natively, so no run counts cranelift.
    port = free_port()
    up = lambda port: [TARGET / "release/wasmgate", "up", "--manifest", manifest, "--listen", f"127.0.0.1:{port}",
                       "--cache-dir", work / "cache", "--database-url", f"sqlite://{work}/db.sqlite"]
    p = subprocess.Popen(up(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answering(port, "/hello")
    p.terminate()
    p.wait()
    rows = {}
    for name, path in (("hello fresh", "/hello"), ("hello reused", "/reuse/hello"),
                       ("hello cache hit", "/cached/hello"),
                       ("hello cache hit, compression off", "/cached-plain/hello")):
        port = free_port()
        rows[name] = count(up(port), port, path, n, work, re.sub(r"[^a-z]+", "-", name))
        print(f"  {name}: {rows[name]:,.0f} instructions per request", file=sys.stderr)
    port = free_port()
    rows["bare axum"] = count([TARGET / "release/axum-hello", f"127.0.0.1:{port}"], port, "/hello", n, work,
                              "axum")
    print(f"  bare axum: {rows['bare axum']:,.0f} instructions per request", file=sys.stderr)
    result = {"requests": n, "instructions_per_request": {k: round(v) for k, v in rows.items()},
              "vs_bare_axum": {k: round(v / rows["bare axum"], 2) for k, v in rows.items()}}
    (ROOT / "bench/results/callgrind.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
