#!/usr/bin/env python3
"""wasmgate benchmark harness: every server on 127.0.0.1, driven by wrk, measured in one run.

Prints one table (requests/s, p50, p99, errors, server RSS, ratios between rows) and writes
bench/results/latest.json. `--quick` only proves the harness runs (short runs, few connections)
and judges no numbers. Rows whose baseline binary is missing (wasmtime serve) or whose feature is
not built yet are listed as skipped, with the reason.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/wasmgate/target"))
TOOLS = Path.home() / ".cache/wasmgate/tools/bin"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(url, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except Exception:
            time.sleep(0.002)
    return False


def rss_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Proc:
    def __init__(self, args, env=None, log=None):
        self.p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL, env=env)

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.p.kill()


def to_ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url, seconds, connections, headers=(), pin=None):
    args = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if pin is not None:
        args = ["taskset", "-c", str(pin)] + args
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def parse_wrk(out):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    def parse(v):
        m = re.match(r"([\d.]+)(us|ms|s)", v)
        return to_ms(*m.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    done = re.search(r"(\d+) requests in", out)
    took = re.search(r"requests in ([\d.]+)(us|ms|s)", out)
    return {"rps": rps, "p50_ms": parse(lat["50"]), "p99_ms": parse(lat["99"]), "errors": errors,
            "requests": int(done.group(1)) if done else 0,
            "seconds": to_ms(*took.groups()) / 1000 if took else None}


def cpu_seconds(pids):
    """User + system CPU seconds the processes `pids` have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def costed(pid, run, settle=lambda: None):
    """The row of the wrk run `run()` (which returns wrk's output), with the CPU each request
    cost in `pid` and in PostgreSQL (every `postgres` process: the server is local), in ms,
    counted until `settle()` returns, so work the requests left behind (events) counts too. Its
    note says that CPU and the answers that were not 2xx (`users-mix.lua` lists them)."""
    postgres = lambda: [int(p) for p in subprocess.run(["pgrep", "-x", "postgres"], capture_output=True,
                                                       text=True).stdout.split()]
    before = (cpu_seconds([pid]), cpu_seconds(postgres()))
    out = run()
    settle()
    after = (cpu_seconds([pid]), cpu_seconds(postgres()))
    r = parse_wrk(out)
    n = max(1, r["requests"])
    c = r["cpu_ms_per_request"] = {"wasmgate": round((after[0] - before[0]) * 1000 / n, 3),
                                   "postgres": round((after[1] - before[1]) * 1000 / n, 3)}
    failures = ", ".join(re.findall(r"^non-2xx: (.*)$", out, re.M))
    r["note"] = (f"CPU per request: wasmgate {c['wasmgate']:.2f} ms, PostgreSQL {c['postgres']:.2f} ms"
                 + (f"; non-2xx: {failures}" if failures else ""))
    return r


def wasmtime_bin():
    for candidate in [TOOLS / "wasmtime", shutil.which("wasmtime")]:
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


DUMMY_HASH = "$argon2id$v=19$m=19456,t=2,p=1$d2FzbWdhdGUtZHVtbXktc2FsdA$m8rcN9LEI3UXJ7P4MZKvRnFHznpmwP+nuCS4EIB5RB4"


def login(url, email, password):
    req = urllib.request.Request(url, data=json.dumps({"email": email, "password": password}).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


USERS_ROUTES = """
[[routes]]
path = "/v1/users"
methods = ["POST"]
function = "users"
idempotency = {}
[[routes]]
path = "/v1/login"
methods = ["POST"]
function = "users"
[[routes]]
path = "/v1/users/{id}"
methods = ["GET", "PATCH", "DELETE"]
function = "users"
auth = { owner = "id" }
cache = { ttl = "60s" }
idempotency = {}
"""


def fresh_database(skipped, what):
    """An empty PostgreSQL database beside DATABASE_URL's: (its URL, a function that drops it)."""
    base_url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
    name = f"wgbench_{os.getpid()}_{int(time.time() * 1000)}"
    if subprocess.run(["psql", base_url, "-qc", f"CREATE DATABASE {name}"], capture_output=True).returncode:
        skipped.append(f"{what}: cannot create a database at {base_url}")
        return None, None
    drop = lambda: subprocess.run(["psql", base_url, "-qc", f"DROP DATABASE IF EXISTS {name}"], capture_output=True)
    return base_url.rsplit("/", 1)[0] + "/" + name, drop


def users_manifest(work, name):
    """The users service as the example manifest deploys it."""
    path = work / name
    path.write_text(f"""
[functions.users]
wasm = "{ROOT / 'functions/dist/users.wasm'}"
capabilities = ["db", "response-cache", "auth", "events", "password"]
migrations = "{ROOT / 'functions/users/migrations'}"
bulkhead = {{ max_concurrency = 512, max_queue = 512 }}

[functions.activity]
wasm = "{ROOT / 'functions/dist/activity.wasm'}"
capabilities = ["db"]
migrations = "{ROOT / 'functions/activity/migrations'}"
""" + "".join(f'[[subscriptions]]\ntopic = "user.{t}"\nfunction = "activity"\n' for t in ("created", "updated", "deleted"))
      + USERS_ROUTES)
    return path


def seed_users(wasmgate, manifest, db, base, work, n_users):
    """`n_users` accounts in the database and an admin (ops) who may read and change them all,
    made as an operator would (`wasmgate roles grant`). Returns the admin's bearer header and
    the file of seeded ids."""
    seed = (f"INSERT INTO users (id, email, email_lower, name, password_hash, version, created_at, updated_at) "
            f"SELECT lpad(to_hex(g), 24, '0'), 'seed' || g || '@example.com', 'seed' || g || '@example.com', "
            f"'Seed ' || g, '{DUMMY_HASH}', 1, now(), now() FROM generate_series(1, {n_users}) g")
    subprocess.run(["psql", db, "-qc", seed], check=True, capture_output=True)
    req = urllib.request.Request(f"{base}/v1/users", method="POST", headers={"content-type": "application/json"},
                                 data=json.dumps({"email": "ops@example.com", "name": "Ops",
                                                  "password": "bench-password"}).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        ops = json.load(r)["id"]
    subprocess.run([wasmgate, "roles", "--manifest", manifest, "--database-url", db, "grant", ops, "admin"],
                   check=True, capture_output=True)
    bearer = "Authorization: Bearer " + login(f"{base}/v1/login", "ops@example.com", "bench-password")["token"]
    ids = work / "ids.txt"
    ids.write_text("".join(f"{g:024x}\n" for g in range(1, n_users + 1)))
    return bearer, ids


def wrk_script(url, conns, secs, headers, script, *script_args):
    args = ["wrk", "-t2", f"-c{conns}", f"-d{secs}s", "--latency"]
    for h in headers:
        args += ["-H", h]
    args += ["-s", ROOT / "bench" / script, url]
    if script_args:
        args += ["--", *script_args]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def users_mix(work, wasmgate, cache, seconds, conns, rows, skipped, n_users=10_000):
    """On PostgreSQL + Redis with 10,000 seeded users, as the example manifest deploys them
    (accounts behind the host's `auth` policy, reads of one user cached, writes idempotent).
    Rows: one user read from the response cache with a verified token, against the same entry
    served by a second process whose route has no `auth` (it shares the entry through Redis),
    and against the same read with the cache missed (the guest and PostgreSQL run); then the
    mix: 90% GET / 9.8% PATCH / 0.2% POST, as an admin (whose token may read and change every
    seeded account); then logins (one Argon2id verify each, in the host's `password`
    capability) against the native ceiling: the cores divided by one native hash's time, measured
    by `argon2-time` in the same run."""
    redis = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    db, drop = fresh_database(skipped, "user-management mix")
    if not db:
        return
    manifest = users_manifest(work, "users.toml")
    # The baseline: the same function and route with no `auth`, in a second process on the
    # same Redis, so it serves the very entry the first one cached.
    open_manifest = work / "users-open.toml"
    open_manifest.write_text(manifest.read_text().replace('auth = { owner = "id" }\n', ""))
    port = free_port()
    up = [wasmgate, "up", "--manifest", manifest, "--listen", f"127.0.0.1:{port}",
          "--cache-dir", cache, "--database-url", db, "--redis-url", redis]
    gate = Proc(up)
    opened = None
    try:
        if not wait_ok(f"http://127.0.0.1:{port}/healthz"):
            skipped.append("user-management mix: wasmgate did not start")
            return
        base = f"http://127.0.0.1:{port}"
        bearer, ids = seed_users(wasmgate, manifest, db, base, work, n_users)
        one = f"{base}/v1/users/{1:024x}"
        urllib.request.urlopen(urllib.request.Request(one, headers=dict([bearer.split(": ", 1)]))).read()
        oport = free_port()
        opened = Proc([wasmgate, "up", "--manifest", open_manifest, "--listen", f"127.0.0.1:{oport}",
                       "--cache-dir", cache, "--database-url", db, "--redis-url", redis])
        if not wait_ok(f"http://127.0.0.1:{oport}/healthz"):
            skipped.append("users cache hit without auth: the second process did not start")
        open_one = f"http://127.0.0.1:{oport}/v1/users/{1:024x}"
        with urllib.request.urlopen(open_one) as r:
            assert r.headers["cache-status"].startswith("wasmgate; hit"), r.headers["cache-status"]
        def run_row(url, headers, script, secs):
            if script:
                return parse_wrk(wrk_script(url, conns, secs, headers, script))
            return wrk(url, secs, conns, headers)

        # The two hit rows alternate in short runs (A B A B A B) and each reports the mean, so a
        # drift of the machine during the run falls on both alike.
        verified, open_hit = [], []
        for _ in range(3):
            verified.append(run_row(one, (bearer,), None, max(1, seconds // 3)))
            open_hit.append(run_row(open_one, (), None, max(1, seconds // 3)))
        for row_name, runs, pid in (("users GET one id, cache hit, token verified", verified, gate.p.pid),
                                    ("users GET one id, cache hit, no auth on the route", open_hit, opened.p.pid)):
            r = mean_of(runs)
            r.update(name=row_name, rss_kib=rss_kib(pid), note="mean of 3 alternating runs")
            rows.append(r)
            print(f"  {row_name}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms, errors {r['errors']}", file=sys.stderr)
        r = costed(gate.p.pid, lambda: wrk_script(one, conns, seconds, (bearer,), "unique-query.lua"))
        r.update(name="users GET one id, cache missed (guest + PostgreSQL)", rss_kib=rss_kib(gate.p.pid))
        rows.append(r)
        print(f"  {r['name']}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms, errors {r['errors']}", file=sys.stderr)
        def settled():
            """Waits (up to a minute) for `activity` to consume the writes' events, so a row's
            CPU figures do not carry the previous row's backlog."""
            for _ in range(300):
                if psql(db, "SELECT (SELECT count(*) FROM wasmgate_outbox) - (SELECT count(*) FROM wasmgate_inbox)"
                            " - (SELECT count(*) FROM wasmgate_dead_letters)") == "0":
                    return
                time.sleep(0.2)

        # The mix, then its writes alone (where each request class spends its CPU).
        for name, mode in (("user-management mix (PostgreSQL + Redis)", ()),
                           ("users PATCH one id (idempotent, purge, event)", ("patch",))):
            settled()
            r = costed(gate.p.pid, lambda: wrk_script(base, conns, seconds, (bearer,), "users-mix.lua", ids, *mode),
                       settled)
            r.update(name=name, rss_kib=rss_kib(gate.p.pid))
            rows.append(r)
            print(f"  {r['name']}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms, errors {r['errors']} {r['note']}",
                  file=sys.stderr)
        # Logins: 16 connections keep the hashing threads busy without a queue past its 2 s;
        # the second process (idle from here) is stopped first, so it takes none of the cores.
        if opened:
            opened.stop()
        # The ceiling, measured before and after the row (this machine's speed drifts): the
        # faster of the two, so the ratio errs low.
        one_hash = lambda: float(subprocess.run([TARGET / "release/argon2-time", "100"], capture_output=True,
                                                text=True, check=True).stdout)
        hash_times = [one_hash()]
        settled()
        r = costed(gate.p.pid, lambda: wrk_script(base, min(conns, 16), seconds, (), "users-mix.lua", "-", "login",
                                                  "ops@example.com", "bench-password"))
        r.update(name="users login (Argon2id in the host)", rss_kib=rss_kib(gate.p.pid),
                 note="16 connections, one account; " + r["note"])
        rows.append(r)
        print(f"  {r['name']}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms, errors {r['errors']} {r['note']}",
              file=sys.stderr)
        gate.stop()
        hash_times.append(one_hash())
        one_hash = min(hash_times)
        cores = os.cpu_count()
        rows.append({"name": "native Argon2id ceiling (cores / one hash's time)", "rps": cores / one_hash,
                     "p50_ms": one_hash * 1000, "p99_ms": 0, "errors": 0, "rss_kib": 0,
                     "note": f"{cores} cores, {one_hash * 1000:.1f} ms per hash (m=19456,t=2,p=1; the faster of two medians "
                             f"of 100, before and after the logins row: "
                             f"{', '.join(f'{t * 1000:.1f}' for t in hash_times)} ms)"})
        print(f"  native Argon2id: {one_hash * 1000:.1f} ms per hash, ceiling {cores / one_hash:.0f}/s",
              file=sys.stderr)
    finally:
        gate.stop()
        if opened:
            opened.stop()
        drop()


def warm_rows(work, wasmgate, cache, seconds, rows, skipped, ratios):
    """Fresh-instance hello with instances made ahead (`warm_instances = 8`) against none, on one
    connection and on 64, with wasmgate unpinned and pinned to core 0 (wrk on core 1), each pair
    alternated twice in this run."""
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        skipped.append("warm instances: needs 2 cores and taskset")
        return
    hello = ROOT / "functions/dist/hello.wasm"
    manifests = {}
    for warm in (8, 0):
        manifests[warm] = work / f"warm-{warm}.toml"
        manifests[warm].write_text(f"""
[server]
warm_instances = {warm}
[functions.hello]
wasm = "{hello}"
bulkhead = {{ max_concurrency = 512, max_queue = 512 }}
[[routes]]
path = "/hello"
function = "hello"
""")
    for pinned in (False, True):
        for conns in (1, 64):
            runs = {8: [], 0: []}
            for _ in range(2):
                for warm in (8, 0):
                    port = free_port()
                    pin = ["taskset", "-c", "0"] if pinned else []
                    p = Proc(pin + [wasmgate, "up", "--manifest", manifests[warm], "--listen", f"127.0.0.1:{port}",
                                    "--cache-dir", cache, "--database-url", f"sqlite://{work}/warm-{warm}.sqlite"])
                    assert wait_ok(f"http://127.0.0.1:{port}/hello"), "wasmgate did not start"
                    runs[warm].append(wrk(f"http://127.0.0.1:{port}/hello", seconds, conns, pin=1 if pinned else None))
                    p.stop()
            where = "pinned to one core" if pinned else "unpinned"
            for warm in (8, 0):
                r = mean_of(runs[warm])
                r.update(name=f"hello fresh, warm_instances={warm}, {conns} conn, {where}", rss_kib=None,
                         note="mean of 2 alternated runs")
                rows.append(r)
                print(f"  {r['name']}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.2f} ms",
                      file=sys.stderr)
            key = f"warm_vs_none_{conns}conn_{'pinned' if pinned else 'unpinned'}"
            ratios[key] = round(mean_of(runs[8])["rps"] / mean_of(runs[0])["rps"], 2)


def overload_rows(work, binaries, cache, seconds, rows, skipped, ratios, quick=False):
    """Goodput under a flash crowd: fresh-instance hello on the product's default bulkhead, driven
    by wrk's closed loop (every answer, refusals included, is followed by the next request at once)
    at 64, 1,000 and 4,000 connections. Successful requests per second at each against the
    64-connection figure of the same binary; `binaries` maps a label to a wasmgate build, so a
    baseline build can be measured in the same run (`--baseline`)."""
    hello = ROOT / "functions/dist/hello.wasm"
    manifest = work / "overload.toml"
    manifest.write_text(f"""
[functions.hello]
wasm = "{hello}"
[[routes]]
path = "/hello/{{name}}"
function = "hello"
""")
    levels = (16, 64) if quick else (64, 1000, 4000)
    need = max(levels) + 1000
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
        if min(need, hard) < need:
            skipped.append(f"overload: needs {need} file descriptors, the hard limit is {hard}")
            return
    for label, binary in binaries.items():
        port = free_port()
        p = Proc([binary, "up", "--manifest", manifest, "--listen", f"127.0.0.1:{port}", "--cache-dir", cache,
                  "--database-url", f"sqlite://{work}/overload-{label}.sqlite"])
        assert wait_ok(f"http://127.0.0.1:{port}/hello/x"), "wasmgate did not start"
        url = f"http://127.0.0.1:{port}/hello/crowd"
        peak = None
        for conns in levels:
            r = wrk(url, seconds, conns)
            good = (r["requests"] - r["errors"]) / r["seconds"]
            r.update(name=f"overload {label}: hello fresh, {conns} conns, closed loop", rss_kib=rss_kib(p.p.pid),
                     goodput=round(good), note=f"{r['errors']} of {r['requests']} answers not 2xx (or socket errors); "
                                                "p50/p99 over every answer")
            rows.append(r)
            peak = peak or good
            ratios[f"goodput_{conns}_vs_{levels[0]}_conns{'' if label == 'wasmgate' else '_' + label}"] = \
                round(good / peak, 2) if peak else None
            print(f"  {r['name']}: {good:.0f} ok/s ({r['errors']} refused/failed), p50 {r['p50_ms']:.1f} ms, "
                  f"p99 {r['p99_ms']:.1f} ms", file=sys.stderr)
        p.stop()


def hello_rows_manifest(hello):
    """The hello rows' functions, shared by the main rows and the pinned ones: a fresh instance
    per request, a reused instance, and a response-cache hit, each with room for a flood."""
    return f"""
[server]
max_instances = 1000
[functions.hello]
wasm = "{hello}"
bulkhead = {{ max_concurrency = 512, max_queue = 512 }}
[functions.hello-reuse]
wasm = "{hello}"
instance_reuse = 100000
bulkhead = {{ max_concurrency = 512, max_queue = 512 }}
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
cache = {{ ttl = "60s" }}
"""


def pinned_rows(work, wasmgate, cache, seconds, conns, rows, skipped, ratios):
    """The hello rows per core: each server pinned to core 0, wrk to core 1, so the load generator
    never shares the server's core (on two shared cores wrk saturates first and a cache hit and
    bare axum read alike). Fresh instance, reused instance, response-cache hit, bare axum, and
    `wasmtime serve` (default flags and instance reuse) when it is installed."""
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        skipped.append("pinned rows: need 2 cores and taskset")
        return
    hello = ROOT / "functions/dist/hello.wasm"
    manifest = work / "pinned.toml"
    manifest.write_text(hello_rows_manifest(hello))
    pin = ["taskset", "-c", "0"]
    found = {}

    def measure(name, url, pid):
        r = wrk(url, seconds, conns, pin=1)
        r.update(name=f"{name}, pinned (server core 0, wrk core 1)", rss_kib=rss_kib(pid), note="")
        rows.append(r)
        found[name] = r["rps"]
        print(f"  {r['name']}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms", file=sys.stderr)

    port = free_port()
    gate = Proc(pin + [wasmgate, "up", "--manifest", manifest, "--listen", f"127.0.0.1:{port}",
                       "--cache-dir", cache, "--database-url", f"sqlite://{work}/pinned.sqlite"])
    assert wait_ok(f"http://127.0.0.1:{port}/hello"), "wasmgate did not start"
    for name, path in (("fresh", "/hello"), ("reuse", "/reuse/hello"), ("hit", "/cached/hello")):
        measure(f"wasmgate hello {name}", f"http://127.0.0.1:{port}{path}", gate.p.pid)
    gate.stop()
    aport = free_port()
    axum = Proc(pin + [TARGET / "release/axum-hello", f"127.0.0.1:{aport}"])
    assert wait_ok(f"http://127.0.0.1:{aport}/hello"), "axum-hello did not start"
    measure("bare axum hello", f"http://127.0.0.1:{aport}/hello", axum.p.pid)
    axum.stop()
    wt = wasmtime_bin()
    if wt:
        for name, extra in (("wasmtime serve", []),
                            ("wasmtime serve reuse", ["--max-instance-reuse-count", "100000"])):
            wport = free_port()
            p = Proc(pin + [wt, "serve", "-Scli", *extra, "--addr", f"127.0.0.1:{wport}", hello])
            if wait_ok(f"http://127.0.0.1:{wport}/"):
                measure(name, f"http://127.0.0.1:{wport}/", p.p.pid)
            p.stop()
    else:
        skipped.append("pinned wasmtime serve rows: not installed")
    ratio = lambda a, b: round(found[a] / found[b], 2) if found.get(a) and found.get(b) else None
    ratios["pinned_hit_vs_bare_axum"] = ratio("wasmgate hello hit", "bare axum hello")
    ratios["pinned_fresh_vs_wasmtime_serve"] = ratio("wasmgate hello fresh", "wasmtime serve")
    ratios["pinned_reuse_vs_wasmtime_serve_reuse"] = ratio("wasmgate hello reuse", "wasmtime serve reuse")


def http_rows(work, wasmgate, cache, seconds, conns, rows, skipped, ratios, extra):
    """Compression, as a client sees it. A response-cache hit (an 8 KiB JSON body) asked for with
    `Accept-Encoding: gzip, br` against the same hit asked for without: the entry keeps its
    encoded variants, so the first should cost no more than the second (alternated, two runs
    each, the mean). And the bytes on the wire for `GET /v1/users?limit=100` (as an admin, on
    PostgreSQL) in each encoding against none."""
    echo = ROOT / "functions/dist/echo.wasm"
    manifest = users_manifest(work, "http.toml")
    manifest.write_text(manifest.read_text() + f"""
[functions.echo]
wasm = "{echo}"
[[routes]]
path = "/cached"
methods = ["GET"]
function = "echo"
cache = {{ ttl = "600s" }}
[[routes]]
path = "/v1/users"
methods = ["GET"]
function = "users"
auth = {{ roles = ["admin"] }}
""")
    db, drop = fresh_database(skipped, "http rows")
    if not db:
        return
    port = free_port()
    gate = Proc([wasmgate, "up", "--manifest", manifest, "--listen", f"127.0.0.1:{port}",
                 "--cache-dir", cache, "--database-url", db])
    try:
        base = f"http://127.0.0.1:{port}"
        if not wait_ok(f"{base}/healthz"):
            skipped.append("http rows: wasmgate did not start")
            return
        hit = f"{base}/cached?generate=8192"
        for accept in (None, "gzip, br"):
            req = urllib.request.Request(hit, headers={"accept-encoding": accept} if accept else {})
            urllib.request.urlopen(req).read()
        found = {"identity": [], "encoded": []}
        for _ in range(2):
            for name, headers in (("identity", ()), ("encoded", ("Accept-Encoding: gzip, br",))):
                found[name].append(wrk(hit, max(1, seconds // 2), conns, headers))
        for name, label in (("encoded", "Accept-Encoding: gzip, br (kept br variant)"),
                            ("identity", "no Accept-Encoding")):
            r = mean_of(found[name])
            r.update(name=f"cache hit, 8 KiB JSON, {label}", rss_kib=rss_kib(gate.p.pid), note="")
            rows.append(r)
            print(f"  {r['name']}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms", file=sys.stderr)
        enc, ident = mean_of(found["encoded"])["rps"], mean_of(found["identity"])["rps"]
        ratios["cache_hit_encoded_vs_identity"] = round(enc / ident, 2) if ident else None

        bearer, _ = seed_users(wasmgate, manifest, db, base, work, 200)
        auth = dict([bearer.split(": ", 1)])
        wire = {}
        for accept in ("identity", "gzip", "br", "zstd"):
            req = urllib.request.Request(f"{base}/v1/users?limit=100",
                                         headers={**auth, "accept-encoding": accept})
            with urllib.request.urlopen(req) as r:
                body = r.read()
                assert (r.headers.get("content-encoding") or "identity") == accept, r.headers
            wire[accept] = len(body)
        extra["wire_bytes_users_limit_100"] = wire
        for accept in ("gzip", "br", "zstd"):
            ratios[f"wire_bytes_users_limit_100_{accept}_vs_identity"] = round(wire[accept] / wire["identity"], 3)
        print(f"  bytes on the wire, GET /v1/users?limit=100: {wire}", file=sys.stderr)
    finally:
        gate.stop()
        drop()


def mean_of(runs):
    """The mean of wrk runs' figures (errors summed)."""
    return {k: (sum(x[k] for x in runs) / len(runs) if k != "errors" else sum(x[k] for x in runs))
            for k in ("rps", "p50_ms", "p99_ms", "errors")}


def shadow_rows(work, wasmgate, cache, seconds, conns, rows, skipped, extra, n_users=10_000):
    """Shadow traffic's cost to the live path: users PATCH (a write to one of 10,000 seeded
    accounts, PostgreSQL + Redis) with every request copied to a second version, against the
    same load with no shadow, alternated in short runs (A B A B A B) at a load below
    saturation (2 connections: about 60% of what this machine's PATCH path takes; at 8 it is
    saturated and the shadow's doubled work shows in the queue: +4 ms p99 measured), so the
    figure is the latency a client sees rather than a queue."""
    token = "bench-admin-token-0123456789"
    redis = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    db, drop = fresh_database(skipped, "shadow rows")
    if not db:
        return
    manifest = users_manifest(work, "users-shadow.toml")
    port, aport = free_port(), free_port()
    gate = Proc([wasmgate, "up", "--manifest", manifest, "--listen", f"127.0.0.1:{port}",
                 "--admin-listen", f"127.0.0.1:{aport}", "--cache-dir", cache, "--database-url", db,
                 "--redis-url", redis], env=dict(os.environ, WASMGATE_ADMIN_TOKEN=token))
    try:
        base = f"http://127.0.0.1:{port}"
        if not wait_ok(f"{base}/healthz"):
            skipped.append("shadow rows: wasmgate did not start")
            return
        admin = f"http://127.0.0.1:{aport}/admin/v1/functions/users"
        module = (ROOT / "functions/dist/users.wasm").read_bytes()
        for label in ("live", "candidate"):
            admin_call(f"{admin}/versions?label={label}", token, "POST", module)
        admin_call(f"{admin}/deployment", token, "PUT", {"versions": [{"label": "live", "weight": 100}]})
        bearer, ids = seed_users(wasmgate, manifest, db, base, work, n_users)
        light = max(2, conns // 32)
        plain, shadowed = [], []
        for _ in range(3):
            plain.append(parse_wrk(wrk_script(base, light, max(1, seconds // 3), (bearer,), "users-mix.lua", ids, "patch")))
            admin_call(f"{admin}/shadow", token, "PUT", {"version": "candidate", "percent": 100})
            shadowed.append(parse_wrk(wrk_script(base, light, max(1, seconds // 3), (bearer,), "users-mix.lua", ids, "patch")))
            time.sleep(1.2)  # the comparisons reach the registry once a second
            seen = admin_call(f"{admin}/shadow", token)
            admin_call(f"{admin}/shadow", token, "DELETE")
        routes = {r["route"]: r for r in seen["routes"]}
        patch = routes.get("/v1/users/{id}", {})
        for row_name, runs, note in (
                ("users PATCH, no shadow (shadow baseline)", plain, "mean of 3 alternating runs"),
                ("users PATCH, 100% shadowed", shadowed,
                 f"mean of 3 alternating runs; last run: {patch.get('compared', 0)} compared, "
                 f"{patch.get('matched', 0)} matched, {patch.get('skipped', 0)} skipped")):
            r = mean_of(runs)
            r.update(name=row_name, rss_kib=rss_kib(gate.p.pid), note=note)
            rows.append(r)
            print(f"  {row_name}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms, errors {r['errors']}", file=sys.stderr)
        extra["shadow_p99_minus_without_ms"] = round(rows[-1]["p99_ms"] - rows[-2]["p99_ms"], 2)
    finally:
        gate.stop()
        drop()


def psql(db, query):
    return subprocess.run(["psql", db, "-tAqc", query], capture_output=True, text=True, check=True).stdout.strip()


#: Events each request publishes in the batched end-to-end row.
EVENTS_PER_REQUEST = 10


def event_rows(work, wasmgate, cache, seconds, rows, skipped, extra):
    """Events end to end on PostgreSQL + Redis Streams: the `publisher` fixture publishes (one
    outbox row per request), the relay appends to the stream, the consumer runs the `sink`
    fixture (the trivial handler: the cost is the host's held transaction, inbox record, key
    sequence and acknowledgement) over 1,000 keys in key order. Latency is publish (the outbox
    row's created_at) to handled (the inbox row's handled_at), both host clock, in ms. Phases:
    at about 2,000/s (10 per request, then one per request); at about 500/s without and with
    5% of events poison (`fail`, each on a key of its own: retried until max_attempts, then a
    dead letter), judged by the healthy keys' latency; as fast as wrk publishes, one and 10
    per request (publishing and consuming share the cores); the consumer alone, draining all
    of it in a second subscription. The two throughput rows and the consumer alone run again with
    both functions opted in to `instance_reuse` (what an operator running a high-volume event
    path would set): what fresh instances cost on this path."""
    redis = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    db, drop = fresh_database(skipped, "event rows")
    if not db:
        return
    topic = f"bench.{os.getpid()}.{int(time.time())}"
    sub = f"sink.{topic}"

    def manifest(name, subscription, reuse=False):
        path = work / name
        reused = "instance_reuse = 1000" if reuse else ""
        path.write_text(f"""
[functions.publisher]
wasm = "{ROOT / 'functions/dist/publisher.wasm'}"
capabilities = ["db", "events"]
bulkhead = {{ max_concurrency = 512, max_queue = 512 }}
{reused}
[functions.sink]
wasm = "{ROOT / 'functions/dist/sink.wasm'}"
{reused}
[[routes]]
path = "/publish/{{topic}}"
methods = ["POST"]
function = "publisher"
[[subscriptions]]
topic = "{topic}"
function = "sink"
name = "{subscription}"
max_attempts = 3
backoff = "100ms"
""")
        return path

    port = free_port()
    start = lambda m: Proc([wasmgate, "up", "--manifest", m, "--listen", f"127.0.0.1:{port}",
                            "--cache-dir", cache, "--database-url", db, "--redis-url", redis])
    gate = start(manifest("events.toml", sub))

    def drained(subscription, limit=180):
        """Waits until every published event is handled or a dead letter."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            left = psql(db, "SELECT (SELECT count(*) FROM wasmgate_outbox)"
                            f" - (SELECT count(*) FROM wasmgate_inbox WHERE subscription = '{subscription}')"
                            f" - (SELECT count(*) FROM wasmgate_dead_letters WHERE subscription = '{subscription}')")
            if left == "0":
                return True
            time.sleep(0.2)
        skipped.append(f"event rows: {left} events not handled by {subscription} after {limit}s")
        return False

    def phase(name, since, note, subscription=sub, published_rate=None, errors=0):
        """A row from the events published in `since` (a start in ms, or (start, end) windows)."""
        windows = since if isinstance(since, list) else [(since, 2**62)]
        within = " OR ".join(f"(o.created_at > {a} AND o.created_at <= {b})" for a, b in windows)
        n, first, last, p50, p99 = psql(db, (
            "SELECT count(*), min(o.created_at), max(i.handled_at), "
            "percentile_cont(0.5) WITHIN GROUP (ORDER BY i.handled_at - o.created_at), "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY i.handled_at - o.created_at) "
            "FROM wasmgate_outbox o JOIN wasmgate_inbox i ON i.event_id = o.id "
            f"WHERE i.subscription = '{subscription}' AND ({within}) AND o.key NOT LIKE 'poison%'"
        )).split("|")
        if len(windows) > 1:  # the rate over the windows' own time
            last, first = sum(b - a for a, b in windows), 0
        if subscription != sub:  # the backlog: from the first handled to the last
            first = psql(db, f"SELECT min(handled_at) FROM wasmgate_inbox WHERE subscription = '{subscription}'")
        rate = int(n) * 1000 / max(1, int(last) - int(first))
        r = {"name": name, "rps": rate, "p50_ms": float(p50), "p99_ms": float(p99), "errors": errors,
             "rss_kib": rss_kib(gate.p.pid), "note": note.format(published=published_rate or 0, n=n)}
        rows.append(r)
        print(f"  {name}: {rate:.0f} events/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms", file=sys.stderr)
        return r

    def publish(*script_args):
        since = int(time.time() * 1000)
        w = parse_wrk(wrk_script(url, 16, seconds, (), "publish.lua", "1000", *script_args))
        return since, w

    try:
        base = f"http://127.0.0.1:{port}"
        url = f"{base}/publish/{topic}"
        if not wait_ok(f"{base}/healthz"):
            skipped.append("event rows: wasmgate did not start")
            return
        # Latency first, while the tables and the stream are small. About 2,000 events/s:
        # 10 per request, 16 connections each waiting 70 ms (the event path's latency, with the
        # HTTP edge a small share of the load); then one per request, 16 connections 7 ms apart
        # (the edge's cost on the same cores decides the rate reached).
        since, w = publish("70", "0", str(EVENTS_PER_REQUEST))
        if not drained(sub):
            return
        steady = phase(f"events at ~2,000/s, {EVENTS_PER_REQUEST} per request, publish to handled", since,
                       "{n} events, published at {published:.0f}/s", published_rate=w["rps"] * EVENTS_PER_REQUEST,
                       errors=w["errors"])
        since, w = publish("7")
        if not drained(sub):
            return
        phase("events at ~2,000/s asked, one per request, publish to handled", since,
              "{n} events, published at {published:.0f}/s (what 16 connections 7 ms apart reached)",
              published_rate=w["rps"], errors=w["errors"])
        # Poison judged below saturation (about 500/s: 16 connections, 30 ms apart), where the
        # poison's extra tries do not simply queue behind a full machine: without and with 5%
        # poison alternated twice, each kind's healthy events pooled.
        plain, poisoned_windows, rates = [], [], {False: [], True: []}
        for poisoned_run in (False, True, False, True):
            since, w = publish("30", *(["5"] if poisoned_run else []))
            (poisoned_windows if poisoned_run else plain).append((since, int(time.time() * 1000)))
            rates[poisoned_run].append(w["rps"])
            if not drained(sub):
                return
        calm = phase("events at ~500/s, publish to handled (poison baseline)", plain,
                     "{n} events in 2 runs alternating with the next row's, published at {published:.0f}/s",
                     published_rate=sum(rates[False]) / 2)
        poisoned = phase("events at ~500/s with 5% poison, healthy keys", poisoned_windows,
                         "{n} healthy events in 2 runs, published at {published:.0f}/s (poison included)",
                         published_rate=sum(rates[True]) / 2)
        # Throughput: as fast as wrk publishes, one event per request, then 10 per request in
        # one transaction each (a write that emits several events, an import): what the event
        # path carries past the HTTP edge, where one request per event caps the rate first.
        since, w = publish()
        if not drained(sub):
            return
        full = phase("events end to end, one per request, published as fast as wrk can (PG + Redis)", since,
                     "handled/s from first publish to last handled; {n} events, published at {published:.0f}/s "
                     "by wrk (16 connections) on the same cores; latency includes the backlog",
                     published_rate=w["rps"], errors=w["errors"])
        since, w = publish("0", "0", str(EVENTS_PER_REQUEST))
        if not drained(sub):
            return
        batched = phase(f"events end to end, {EVENTS_PER_REQUEST} per request (PG + Redis)", since,
                        "handled/s from first publish to last handled; {n} events, published at {published:.0f}/s "
                        f"({EVENTS_PER_REQUEST} per request, one transaction each, by wrk with 16 connections); "
                        "latency includes the backlog",
                        published_rate=w["rps"] * EVENTS_PER_REQUEST, errors=w["errors"])
        # The same two throughput rows with both functions reusing their instances.
        gate.stop()
        gate = start(manifest("events-reused.toml", sub, reuse=True))
        if not wait_ok(f"{base}/healthz"):
            return
        since, w = publish()
        if not drained(sub):
            return
        full_reused = phase("events end to end, one per request, instances reused (PG + Redis)", since,
                            "as two rows up, with instance_reuse = 1000 on the publisher and the sink; "
                            "{n} events, published at {published:.0f}/s",
                            published_rate=w["rps"], errors=w["errors"])
        since, w = publish("0", "0", str(EVENTS_PER_REQUEST))
        if not drained(sub):
            return
        batched_reused = phase(f"events end to end, {EVENTS_PER_REQUEST} per request, instances reused (PG + Redis)",
                               since, "as two rows up, with instance_reuse = 1000 on the publisher and the sink; "
                               "{n} events, published at {published:.0f}/s",
                               published_rate=w["rps"] * EVENTS_PER_REQUEST, errors=w["errors"])
        # Everything above, already in the stream, for a new subscription: the consumer alone,
        # with fresh instances, then (another new subscription) reusing them.
        gate.stop()
        gate = start(manifest("events-drain.toml", "drain"))
        if not wait_ok(f"{base}/healthz") or not drained("drain"):
            return
        alone = phase("events consumed alone, a backlog in the stream (PG + Redis)", 0,
                      "{n} healthy events (every row's above) handled by a new subscription from its first to its "
                      "last; latency is from publish, so it includes the wait", subscription="drain")
        gate.stop()
        gate = start(manifest("events-drain-reused.toml", "drain-reused", reuse=True))
        if not wait_ok(f"{base}/healthz") or not drained("drain-reused"):
            return
        alone_reused = phase("events consumed alone, instances reused (PG + Redis)", 0,
                             "as the row above, another new subscription, with instance_reuse = 1000 on the sink",
                             subscription="drain-reused")
        dead = psql(db, "SELECT count(*), coalesce(min(attempts), 0), coalesce(max(attempts), 0) "
                        f"FROM wasmgate_dead_letters WHERE subscription = '{sub}'")
        poison = psql(db, "SELECT count(*) FROM wasmgate_outbox WHERE key LIKE 'poison%'")
        n_dead, lo, hi = dead.split("|")
        poisoned["note"] += f"; {poison} poison events, {n_dead} dead letters with {lo} to {hi} attempts"
        extra["events_per_s_vs_5000_target"] = round(batched["rps"] / 5000, 2)
        extra["events_one_per_request_per_s_vs_5000_target"] = round(full["rps"] / 5000, 2)
        extra["events_consumed_alone_per_s_vs_5000_target"] = round(alone["rps"] / 5000, 2)
        extra["events_reused_per_s_vs_5000_target"] = round(batched_reused["rps"] / 5000, 2)
        extra["events_reused_one_per_request_per_s_vs_5000_target"] = round(full_reused["rps"] / 5000, 2)
        extra["events_reused_consumed_alone_per_s_vs_5000_target"] = round(alone_reused["rps"] / 5000, 2)
        extra["events_p99_ms_at_2000_vs_50_target"] = round(steady["p99_ms"] / 50, 2)
        extra["events_healthy_p99_poison_vs_without"] = round(poisoned["p99_ms"] / max(calm["p99_ms"], 0.001), 2)
        extra["events_healthy_p50_poison_vs_without"] = round(poisoned["p50_ms"] / max(calm["p50_ms"], 0.001), 2)
    finally:
        gate.stop()
        drop()
        subprocess.run(["redis-cli", "-u", redis, "DEL", f"wasmgate:events:{topic}"], capture_output=True)


def admin_call(url, token, method="GET", body=None, headers=None):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"authorization": f"Bearer {token}", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def swap_rows(work, wasmgate, cache, seconds, conns, rows, skipped, extra):
    """Deployments under load: hello's p99 while the admin API swaps its version every half
    second, against the same load with no swaps, in one run; how long an admin change takes
    to be served (the call returns once it is); and how long a second process takes to serve
    it (through Redis)."""
    token = "bench-admin-token-0123456789"
    manifest = work / "swap.toml"
    manifest.write_text(f"""
[functions.hello]
wasm = "{ROOT / 'functions/dist/hello.wasm'}"
bulkhead = {{ max_concurrency = 512, max_queue = 512 }}
[[routes]]
path = "/hello"
function = "hello"
""")
    db = f"sqlite://{work}/swap.db"
    redis = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    port, aport, port2 = free_port(), free_port(), free_port()
    env = dict(os.environ, WASMGATE_ADMIN_TOKEN=token)
    common = ["--manifest", manifest, "--cache-dir", cache, "--database-url", db, "--redis-url", redis]
    gate = Proc([wasmgate, "up", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{aport}", *common], env=env)
    quiet = {k: v for k, v in os.environ.items() if k != "WASMGATE_ADMIN_TOKEN"}
    other = Proc([wasmgate, "up", "--listen", f"127.0.0.1:{port2}", *common], env=quiet)
    try:
        if not (wait_ok(f"http://127.0.0.1:{port}/hello") and wait_ok(f"http://127.0.0.1:{port2}/hello")):
            skipped.append("deployment swap rows: wasmgate did not start")
            return
        admin = f"http://127.0.0.1:{aport}/admin/v1/functions/hello"
        versions = {}
        for label, name in (("v1", "hello"), ("v2", "echo")):
            up = admin_call(f"{admin}/versions?label={label}", token, "POST",
                            (ROOT / f"functions/dist/{name}.wasm").read_bytes())
            versions[label] = up["sha256"][:12]
        generation = admin_call(f"{admin}/deployment", token, "PUT",
                                {"versions": [{"label": "v1", "weight": 100}]})["generation"]
        url = f"http://127.0.0.1:{port}/hello"
        steady = wrk(url, seconds, conns)
        steady.update(name="hello, steady (swap baseline)", rss_kib=rss_kib(gate.p.pid), note="")
        rows.append(steady)
        load = subprocess.Popen(["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", url],
                                stdout=subprocess.PIPE, text=True)
        calls, converged, label = [], [], "v1"
        deadline = time.monotonic() + seconds - 0.5
        while time.monotonic() < deadline:
            time.sleep(0.5)
            label = "v2" if label == "v1" else "v1"
            t0 = time.monotonic()
            generation = admin_call(f"{admin}/deployment", token, "PUT",
                                    {"versions": [{"label": label, "weight": 100}]},
                                    {"if-match": f'"{generation}"'})["generation"]
            calls.append((time.monotonic() - t0) * 1000)
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{port2}/hello") as r:
                    if r.headers["wasmgate-version"] == versions[label]:
                        break
                if time.monotonic() - t0 > 5:
                    break
            converged.append((time.monotonic() - t0) * 1000)
        swapped = parse_wrk(load.communicate()[0])
        swapped.update(name=f"hello, version swapped every 0.5 s ({len(calls)} swaps)",
                       rss_kib=rss_kib(gate.p.pid), note="")
        rows.append(swapped)
        calls.sort()
        converged.sort()
        extra["swap_p99_vs_steady"] = round(swapped["p99_ms"] / steady["p99_ms"], 2) if steady["p99_ms"] else None
        extra["admin_call_to_new_version_ms_median"] = round(calls[len(calls) // 2], 1) if calls else None
        extra["admin_call_to_new_version_ms_max"] = round(calls[-1], 1) if calls else None
        extra["admin_call_to_other_process_ms_median"] = round(converged[len(converged) // 2], 1) if converged else None
        extra["admin_call_to_other_process_ms_max"] = round(converged[-1], 1) if converged else None
        print(f"  swaps: {len(calls)}, admin call {extra['admin_call_to_new_version_ms_median']} ms median, "
              f"other process {extra['admin_call_to_other_process_ms_median']} ms median", file=sys.stderr)
    finally:
        gate.stop()
        other.stop()


def users_ratios(rows):
    """The users rows' ratios (`users_mix`'s rows)."""
    ratio = lambda a, b: round(a / b, 2) if a and b else None
    row = lambda prefix: next((r["rps"] for r in rows if r["name"].startswith(prefix)), None)
    return {
        "users_read_cache_hit_vs_missed": ratio(row("users GET one id, cache hit, token verified"),
                                                row("users GET one id, cache missed")),
        "verified_token_hit_vs_hit_without_auth": ratio(row("users GET one id, cache hit, token verified"),
                                                        row("users GET one id, cache hit, no auth")),
        "users_mix_rps_vs_10000_target": ratio(row("user-management"), 10_000),
        "logins_vs_native_argon2_ceiling": ratio(row("users login"), row("native Argon2id ceiling")),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="prove the harness runs; judge nothing")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--baseline", type=Path,
                    help="with --only overload or users: also measure this wasmgate binary, in the same run")
    ap.add_argument("--only", choices=["events", "users", "warm", "overload", "pinned", "http"],
                    help="run one group of rows (writes bench/results/<group>.json)")
    args = ap.parse_args()
    seconds, conns = (2, 16) if args.quick else (args.seconds, args.connections)
    if args.only:
        subprocess.run([ROOT / "scripts/build-functions"], check=True)
        subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "wasmgate", "-p", "wasmgate-bench",
                        "--bin", "wasmgate", "--bin", "argon2-time", "--bin", "axum-hello"], check=True, cwd=ROOT)
        work = Path(tempfile.mkdtemp(prefix="wasmgate-bench-"))
        rows, skipped, ratios = [], [], {}
        if args.only == "events":
            event_rows(work, TARGET / "release/wasmgate", work / "cache", seconds, rows, skipped, ratios)
        elif args.only == "overload":
            binaries = {"wasmgate": TARGET / "release/wasmgate"}
            if args.baseline:
                binaries["baseline"] = args.baseline
            overload_rows(work, binaries, work / "cache", seconds, rows, skipped, ratios, args.quick)
        elif args.only == "pinned":
            pinned_rows(work, TARGET / "release/wasmgate", work / "cache", seconds, conns, rows, skipped, ratios)
        elif args.only == "http":
            extra = {}
            http_rows(work, TARGET / "release/wasmgate", work / "cache", seconds, conns, rows, skipped, ratios, extra)
            ratios.update(extra)
        elif args.only == "warm":
            warm_rows(work, TARGET / "release/wasmgate", work / "cache", seconds, rows, skipped, ratios)
        else:
            users_mix(work, TARGET / "release/wasmgate", work / "cache", seconds, conns, rows, skipped)
            ratios.update(users_ratios(rows))
            if args.baseline:
                base_rows = []
                users_mix(work, args.baseline, work / "cache-baseline", seconds, conns, base_rows, skipped)
                mix = lambda rs: next((r["rps"] for r in rs if r["name"].startswith("user-management")), None)
                if mix(rows) and mix(base_rows):
                    ratios["users_mix_vs_baseline"] = round(mix(rows) / mix(base_rows), 2)
                for r in base_rows:
                    r["name"] += " [baseline]"
                rows.extend(base_rows)
        result = {"quick": args.quick, "seconds": seconds, "rows": rows, "ratios": ratios, "skipped": skipped}
        (ROOT / f"bench/results/{args.only}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        shutil.rmtree(work, ignore_errors=True)
        return

    subprocess.run([ROOT / "scripts/build-functions"], check=True)
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "wasmgate", "-p", "wasmgate-bench",
                    "--bin", "wasmgate", "--bin", "axum-hello", "--bin", "argon2-time"], check=True, cwd=ROOT)
    wasmgate = TARGET / "release/wasmgate"
    hello = ROOT / "functions/dist/hello.wasm"
    spin = ROOT / "functions/dist/spin.wasm"

    work = Path(tempfile.mkdtemp(prefix="wasmgate-bench-"))
    manifest = work / "wasmgate.toml"
    manifest.write_text(hello_rows_manifest(hello) + f"""
[functions.spin]
wasm = "{spin}"
timeout = "100ms"
bulkhead = {{ max_concurrency = 4, max_queue = 0 }}
[[routes]]
path = "/spin"
function = "spin"
""")
    rows, skipped, startup = [], [], {}

    def measure(name, url, pid, note=""):
        r = wrk(url, seconds, conns)
        r.update(name=name, rss_kib=rss_kib(pid), note=note)
        rows.append(r)
        print(f"  {name}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.2f} ms", file=sys.stderr)
        return r

    # --- start-up: wasmgate up -> first 200, cold compile and warm cache ---
    cache = work / "cache"
    for label in ("cold", "cached"):
        port = free_port()
        log = open(work / f"startup-{label}.log", "w")
        t0 = time.monotonic()
        p = Proc([wasmgate, "up", "--manifest", manifest, "--listen", f"127.0.0.1:{port}",
                  "--cache-dir", cache, "--database-url", f"sqlite://{work}/db.sqlite"], log=log)
        ok = wait_ok(f"http://127.0.0.1:{port}/hello")
        startup[f"wasmgate_up_to_first_200_ms_{label}"] = round((time.monotonic() - t0) * 1000, 1) if ok else None
        p.stop()
        loads = [float(x) for x in re.findall(r"function=hello .*?load_ms=([\d.]+)",
                                              (work / f"startup-{label}.log").read_text())]
        startup[f"component_load_ms_{label}"] = loads[0] if loads else None

    wt = wasmtime_bin()
    if wt:
        port = free_port()
        t0 = time.monotonic()
        p = Proc([wt, "serve", "-Scli", "--addr", f"127.0.0.1:{port}", hello])
        ok = wait_ok(f"http://127.0.0.1:{port}/")
        p.stop()
        port = free_port()
        t0 = time.monotonic()
        p = Proc([wt, "serve", "-Scli", "--addr", f"127.0.0.1:{port}", hello])
        ok = wait_ok(f"http://127.0.0.1:{port}/")
        startup["wasmtime_serve_to_first_200_ms_cached"] = round((time.monotonic() - t0) * 1000, 1) if ok else None
        p.stop()

    # --- throughput scenarios ---
    print("measuring:", file=sys.stderr)
    port = free_port()
    gate = Proc([wasmgate, "up", "--manifest", manifest, "--listen", f"127.0.0.1:{port}",
                 "--cache-dir", cache, "--database-url", f"sqlite://{work}/db.sqlite"])
    assert wait_ok(f"http://127.0.0.1:{port}/hello"), "wasmgate did not start"
    base = f"http://127.0.0.1:{port}"
    fresh = measure("wasmgate hello (fresh instance)", f"{base}/hello", gate.p.pid)
    reuse = measure("wasmgate hello (instance reuse)", f"{base}/reuse/hello", gate.p.pid)
    cached = measure("wasmgate hello (response cache hit)", f"{base}/cached/hello", gate.p.pid)

    # noisy neighbour: hello's p99 while a looping function is saturated
    noise = subprocess.Popen(["wrk", "-t1", "-c8", f"-d{seconds + 2}s", f"{base}/spin"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    noisy = measure("wasmgate hello, spin saturated", f"{base}/hello", gate.p.pid)
    noise.wait()
    gate.stop()

    aport = free_port()
    axum = Proc([TARGET / "release/axum-hello", f"127.0.0.1:{aport}"])
    assert wait_ok(f"http://127.0.0.1:{aport}/hello"), "axum-hello did not start"
    native = measure("bare axum hello (native ceiling)", f"http://127.0.0.1:{aport}/hello", axum.p.pid)
    axum.stop()

    serve = serve_reuse = None
    if wt:
        for label, extra in (("default flags", []), ("--max-instance-reuse-count", ["--max-instance-reuse-count", "100000"])):
            wport = free_port()
            p = Proc([wt, "serve", "-Scli", *extra, "--addr", f"127.0.0.1:{wport}", hello])
            if wait_ok(f"http://127.0.0.1:{wport}/"):
                r = measure(f"wasmtime serve ({label})", f"http://127.0.0.1:{wport}/", p.p.pid)
                if extra:
                    serve_reuse = r
                else:
                    serve = r
            else:
                skipped.append(f"wasmtime serve ({label}): did not start (flag unsupported?)")
            p.stop()
    else:
        skipped.append("wasmtime serve: not installed (cargo install wasmtime-cli --version 48.0.8 "
                       "--root ~/.cache/wasmgate/tools)")
    users_mix(work, wasmgate, cache, seconds, conns, rows, skipped)
    swaps = {}
    swap_rows(work, wasmgate, cache, seconds, conns, rows, skipped, swaps)
    shadow_rows(work, wasmgate, cache, seconds, conns, rows, skipped, swaps)
    event_rows(work, wasmgate, cache, seconds, rows, skipped, swaps)
    overload_rows(work, {"wasmgate": wasmgate}, cache, seconds, rows, skipped, swaps, args.quick)
    pinned_rows(work, wasmgate, cache, seconds, conns, rows, skipped, swaps)
    http_rows(work, wasmgate, cache, seconds, conns, rows, skipped, swaps, swaps)

    ratio = lambda a, b: round(a / b, 2) if a and b else None
    row = lambda prefix: next((r["rps"] for r in rows if r["name"].startswith(prefix)), None)
    ratios = {
        "fresh_vs_wasmtime_serve": ratio(fresh["rps"], serve and serve["rps"]),
        "reuse_vs_wasmtime_serve_reuse": ratio(reuse["rps"], serve_reuse and serve_reuse["rps"]),
        "fresh_vs_bare_axum": ratio(fresh["rps"], native["rps"]),
        "hello_cache_hit_vs_fresh": ratio(cached["rps"], fresh["rps"]),
        "hello_cache_hit_vs_bare_axum": ratio(cached["rps"], native["rps"]),
        **users_ratios(rows),
        "reuse_vs_bare_axum": ratio(reuse["rps"], native["rps"]),
        "noisy_p99_vs_alone": ratio(noisy["p99_ms"], fresh["p99_ms"]),
        "startup_vs_wasmtime_serve": ratio(startup.get("wasmgate_up_to_first_200_ms_cached"),
                                           startup.get("wasmtime_serve_to_first_200_ms_cached")),
        **swaps,
    }
    result = {"quick": args.quick, "seconds": seconds, "connections": conns, "rows": rows,
              "ratios": ratios, "startup": startup, "skipped": skipped,
              "machine": {"cpus": os.cpu_count()}}
    out = ROOT / "bench/results"
    out.mkdir(exist_ok=True)
    (out / ("quick.json" if args.quick else "latest.json")).write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{'scenario':40} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'RSS MiB':>8}")
    for r in rows:
        rss = f"{r['rss_kib'] / 1024:.0f}" if r["rss_kib"] else "-"
        print(f"{r['name']:40} {r['rps']:>10.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>7} {rss:>8}")
    print("\nratios:")
    for k, v in ratios.items():
        print(f"  {k:32} {v if v is not None else '- (baseline missing)'}")
    print("start-up:")
    for k, v in startup.items():
        print(f"  {k:40} {v}")
    for s in skipped:
        print(f"skipped: {s}")
    if args.quick:
        print("\n--quick: the harness ran; numbers from a quick run are not judged.")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
