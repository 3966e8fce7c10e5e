"""Gateway overhead benchmark: the same requests straight at a stub upstream and through the gateway.

    python benchmarks/overhead.py            # full run, a few minutes on 2 cores
    python benchmarks/overhead.py --quick    # a few seconds; a smoke test of the set-up, noisy numbers

Set-up (all on 127.0.0.1, separate processes, production settings):

* a fast stub of an OpenAI images endpoint (``benchmarks/stub_server.py``: raw ASGI, uvicorn + uvloop +
  httptools, response bodies pre-built); tiny images, or a realistic 1.5 MB base64 image for 1024x1024;
* the gateway, started exactly as ``imagegate serve`` starts it (uvicorn, uvloop + httptools, access log
  off, the gateway's own JSON line per request ON, written to a file), with one ``type: openai`` backend
  pointing at the stub;
* ``wrk`` as the load generator (C, so the client is not the bottleneck), with a Lua script that POSTs the
  body, stops after a fixed number of responses and collects each ``X-Gateway-Overhead-Ms`` header.

With two or more cores the gateway gets a core of its own and the stub shares the other with wrk, so the
gateway's CPU is not disturbed by the load it is measured under. For each body size and concurrency (1, 8,
64) wrk first drives the stub directly, then the gateway, with identical request bodies and counts.

Reported per run: latency p50/p90/p99 direct and through the gateway, the added latency (gateway minus
direct at the same percentile), the header-reported overhead p50/p99, requests/s, and the gateway's CPU time
per request (``utime + stime`` from ``/proc/<pid>/stat`` over the run, divided by the requests it logged).
Results go to ``benchmarks/results/overhead.json``.

Checks (PASS/FAIL): the header is honest (at concurrency 1 its p50 is within 25% or 0.1 ms of the measured
added p50), and the targets: gateway CPU ≤ 0.4 ms per request, added p50 ≤ 0.4 ms at concurrency 1, header
p99 ≤ 2 ms at concurrency 8, added p50 ≤ 2 ms with 1.5 MB bodies.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GENERATIONS = "/v1/images/generations"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Targets from the issue (milliseconds).
CPU_TARGET_MS = 0.4
ADDED_P50_TARGET_MS = 0.4
HEADER_P99_C8_TARGET_MS = 2.0
LARGE_ADDED_P50_TARGET_MS = 2.0
HONESTY_REL, HONESTY_ABS_MS = 0.25, 0.1

# wrk script: POST the body in $BENCH_BODY, stop each thread after $BENCH_LIMIT responses, and write the
# summary plus every X-Gateway-Overhead-Ms value to $BENCH_OUT as JSON. Latency is recorded by wrk before
# the response hook runs, so the hook's own work does not count in the percentiles.
WRK_LUA = r"""
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local limit = tonumber(os.getenv("BENCH_LIMIT") or "0")
local threads = {}
-- wrk's main thread sleeps for the whole -d duration; a SIGINT (its own handler) ends the run as soon as
-- the count is reached, so the reported duration (and req/s) is that of the requests actually made.
local ffi = require("ffi")
ffi.cdef[[ int kill(int pid, int sig); int getpid(void); ]]

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  count = 0
  bad = 0
  overheads = {}
end

function response(status, headers, body)
  count = count + 1
  if status ~= 200 then bad = bad + 1 end
  local v = headers["x-gateway-overhead-ms"] or headers["X-Gateway-Overhead-Ms"]
  if v then overheads[#overheads + 1] = v end
  if limit > 0 and count == limit then
    wrk.thread:stop()
    ffi.C.kill(ffi.C.getpid(), 2)
  end
end

function done(summary, latency, requests)
  local out = assert(io.open(os.getenv("BENCH_OUT"), "w"))
  local e = summary.errors
  out:write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d},\n', summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout))
  out:write(string.format(
    '"latency_us": {"min": %d, "mean": %.3f, "max": %d, "p50": %d, "p90": %d, "p99": %d, "p999": %d},\n',
    latency.min, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
  local non200 = 0
  out:write('"overhead_ms": [')
  local first = true
  for _, t in ipairs(threads) do
    non200 = non200 + (t:get("bad") or 0)
    for _, v in ipairs(t:get("overheads") or {}) do
      if first then first = false else out:write(",") end
      out:write(v)
    end
  end
  out:write('],\n"non_200": ' .. non200 .. '}\n')
  out:close()
end
"""

SMALL_BODY = {"prompt": "a watercolor fox in fresh snow, morning light", "size": "512x512", "n": 1}
LARGE_BODY = {"prompt": "a watercolor fox in fresh snow, morning light", "size": "1024x1024", "n": 1}


@dataclass
class Plan:
    concurrency: tuple[int, ...]
    small_requests: dict[int, int]
    large_requests: dict[int, int]
    max_seconds: float
    warmup_requests: int
    repeat: int


FULL = Plan((1, 8, 64), {1: 4000, 8: 8000, 64: 8000}, {1: 400, 8: 600, 64: 600}, 15.0, 300, 3)
QUICK = Plan((1, 8, 64), {1: 400, 8: 800, 64: 800}, {1: 40, 8: 60, 64: 60}, 3.0, 50, 1)


@dataclass
class Run:
    """One wrk run against one target."""

    target: str  # direct | gateway
    body: str  # small | large
    concurrency: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    header_p50_ms: float | None = None
    header_p90_ms: float | None = None
    header_p99_ms: float | None = None
    header_count: int = 0
    gateway_requests: int | None = None  # requests the gateway logged over the run
    gateway_cpu_ms_per_request: float | None = None
    stub_cpu_ms_per_request: float | None = None


@dataclass
class Row:
    body: str
    concurrency: int
    layout: str
    direct: Run
    gateway: Run
    added_p50_ms: float = 0.0
    added_p90_ms: float = 0.0
    added_p99_ms: float = 0.0


# -- processes ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Layout:
    """Which cores each process may run on (None: anywhere)."""

    name: str
    gateway: set[int] | None
    stub: set[int] | None
    wrk: set[int] | None

    def describe(self) -> str:
        def show(cpus: set[int] | None) -> str:
            return ",".join(map(str, sorted(cpus))) if cpus else "any"

        return f"{self.name}: gateway on {show(self.gateway)}, stub on {show(self.stub)}, wrk on {show(self.wrk)}"


LAYOUTS = ("auto", "peers", "split", "client-side", "none")


def cpu_layout(name: str, concurrency: int = 1) -> Layout:
    """Where each process runs. With fewer than two cores nothing is pinned.

    * ``peers``: wrk alone on one core; the stub and the gateway share the other. This is how the issue's
      reference numbers for other gateways were taken, and the fairest set-up for latency at concurrency 1:
      the direct run (wrk → stub) and the proxied run (wrk → gateway → stub) cross cores the same number
      of times, and the stub never sits idle between requests in either. (A core that idles takes tens of
      µs to wake on this VM: driven back to back the stub answers in ~50 µs, called at the gateway's pace
      from another core it answers ~35 µs slower — which would be charged to the gateway.)
    * ``split``: the gateway alone on one core; the stub and wrk share the other. Under load the stub's
      CPU then does not compete with the gateway's, so CPU per request, req/s and the overhead header
      measure the gateway alone.
    * ``auto`` (default): ``peers`` at concurrency 1, ``split`` above.
    * ``client-side``: the gateway shares a core with wrk; the stub has the other.
    """
    if name == "auto":
        name = "peers" if concurrency == 1 else "split"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or name == "none":
        return Layout("none", None, None, None)
    a, b = {cpus[0]}, set(cpus[1:])
    if name == "split":
        return Layout(name, a, b, b)
    if name == "peers":
        return Layout(name, b, b, a)
    return Layout("client-side", a, b, a)


def pin(pid: int, cpus: set[int] | None) -> None:
    """Move a running process, every thread of it, onto ``cpus`` (None: all of ours)."""
    target = cpus or os.sched_getaffinity(0)
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), target)


def _pinned(cpus: set[int] | None):
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def wait_ready(port: int, path: str, proc: subprocess.Popen[bytes], name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} during start-up")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"no 200 from 127.0.0.1:{port}{path} after {timeout}s")


@contextlib.contextmanager
def process(argv: list[str], cpus: set[int] | None, stdout: Any, ready: tuple[int, str]) -> Iterator[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "0"}
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        preexec_fn=_pinned(cpus),
        start_new_session=True,
    )
    try:
        wait_ready(*ready, proc, name=argv[1])
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all its threads, user + system, in seconds: nanosecond ``schedstat`` where
    the kernel has it, else ``utime + stime`` from ``/proc/<pid>/stat`` (10 ms ticks)."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        return stat_cpu_seconds(pid)


def stat_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class LineCounter:
    """Counts the per-request lines the gateway has written to its log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0

    def count(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        # Complete lines only, and only the per-request ones (a traceback would otherwise count too).
        data = data[: data.rfind(b"\n") + 1]
        self.offset += len(data)
        self.lines += data.count(b'"event":"request"')
        return self.lines

    def settle(self, quiet_s: float = 0.15, timeout: float = 10.0) -> int:
        """Wait until the count stops moving (requests abandoned by wrk at stop still finish)."""
        last = self.count()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(quiet_s)
            now = self.count()
            if now == last:
                return now
            last = now
        return last


GATEWAY_CONFIG = """\
server:
  host: 127.0.0.1
  port: {port}
  default_deadline_s: 60
backends:
  stub:
    type: openai
    quality: 0.5
    cost: {{per_image: 0.01}}
    timeouts: {{connect: 5, read: 60, total: 60}}
    max_concurrency: 256
    capabilities: {{max_width: 2048, max_height: 2048}}
    settings: {{base_url: "http://127.0.0.1:{stub_port}/v1", api_key: "sk-bench-not-a-secret"}}
tiers:
  standard: {{quality_floor: 0.0}}
routes:
  - name: default
    strategy: fallback
    candidates: [{{backend: stub}}]
default_tier: standard
"""


# -- wrk ---------------------------------------------------------------------------------------------


def run_wrk(
    wrk: str, url: str, body: Path, concurrency: int, limit: int, max_seconds: float, cpus: set[int] | None, work: Path
) -> dict[str, Any]:
    out = work / "wrk.json"
    out.unlink(missing_ok=True)
    script = work / "bench.lua"
    if not script.exists():
        script.write_text(WRK_LUA)
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_OUT": str(out), "BENCH_LIMIT": str(limit)}
    argv = [wrk, "-t1", f"-c{concurrency}", f"-d{max_seconds:g}s", "--timeout", "30s", "-s", str(script), url]
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, preexec_fn=_pinned(cpus), timeout=max_seconds + 60
    )
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return json.loads(out.read_text())


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an unsorted list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def to_run(target: str, body: str, concurrency: int, res: dict[str, Any]) -> Run:
    lat = res["latency_us"]
    seconds = res["duration_us"] / 1e6
    errors = sum(res["errors"].values()) + res["non_200"]
    run = Run(
        target,
        body,
        concurrency,
        res["requests"],
        round(seconds, 3),
        round(res["requests"] / seconds, 1),
        lat["p50"] / 1e3,
        lat["p90"] / 1e3,
        lat["p99"] / 1e3,
        lat["max"] / 1e3,
        errors,
    )
    overheads = res["overhead_ms"]
    if overheads:
        run.header_count = len(overheads)
        run.header_p50_ms = percentile(overheads, 50)
        run.header_p90_ms = percentile(overheads, 90)
        run.header_p99_ms = percentile(overheads, 99)
    return run


def median_run(runs: list[Run]) -> Run:
    """Per-field median over repeats (requests and errors summed)."""
    if len(runs) == 1:
        return runs[0]
    merged = Run(**asdict(runs[0]))
    for name in (
        "seconds",
        "rps",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "header_p50_ms",
        "header_p90_ms",
        "header_p99_ms",
        "gateway_cpu_ms_per_request",
        "stub_cpu_ms_per_request",
    ):
        values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
        setattr(merged, name, statistics.median(values) if values else None)
    merged.requests = sum(r.requests for r in runs)
    merged.errors = sum(r.errors for r in runs)
    merged.header_count = sum(r.header_count for r in runs)
    return merged


# -- the benchmark -----------------------------------------------------------------------------------


def check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "pass": ok, "detail": detail}


def evaluate(rows: list[Row]) -> list[dict[str, Any]]:
    checks = []
    for row in rows:
        gw = row.gateway
        if row.body == "small" and row.concurrency == 1 and gw.header_p50_ms is not None:
            diff = abs(gw.header_p50_ms - row.added_p50_ms)
            allowed = max(HONESTY_REL * row.added_p50_ms, HONESTY_ABS_MS)
            checks.append(
                check(
                    "header honest (c=1, small)",
                    diff <= allowed,
                    f"header p50 {gw.header_p50_ms:.3f} ms vs added p50 {row.added_p50_ms:.3f} ms "
                    f"(|diff| {diff:.3f} ≤ {allowed:.3f})",
                )
            )
            checks.append(
                check(
                    f"added p50 ≤ {ADDED_P50_TARGET_MS} ms (c=1, small)",
                    row.added_p50_ms <= ADDED_P50_TARGET_MS,
                    f"{row.added_p50_ms:.3f} ms",
                )
            )
        if row.body == "small" and gw.gateway_cpu_ms_per_request is not None:
            checks.append(
                check(
                    f"gateway CPU ≤ {CPU_TARGET_MS} ms/request (c={row.concurrency}, small)",
                    gw.gateway_cpu_ms_per_request <= CPU_TARGET_MS,
                    f"{gw.gateway_cpu_ms_per_request:.3f} ms",
                )
            )
        if row.body == "small" and row.concurrency == 8 and gw.header_p99_ms is not None:
            checks.append(
                check(
                    f"header p99 ≤ {HEADER_P99_C8_TARGET_MS} ms (c=8, small)",
                    gw.header_p99_ms <= HEADER_P99_C8_TARGET_MS,
                    f"{gw.header_p99_ms:.3f} ms",
                )
            )
        if row.body == "large" and row.concurrency == 1:
            checks.append(
                check(
                    f"added p50 ≤ {LARGE_ADDED_P50_TARGET_MS} ms (c=1, 1.5 MB)",
                    row.added_p50_ms <= LARGE_ADDED_P50_TARGET_MS,
                    f"{row.added_p50_ms:.3f} ms",
                )
            )
        if gw.errors or row.direct.errors:
            checks.append(
                check(
                    f"no errors ({row.body}, c={row.concurrency})",
                    False,
                    f"direct {row.direct.errors}, gateway {gw.errors}",
                )
            )
    return checks


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    head = (
        "body",
        "conc",
        "direct p50/p90/p99 ms",
        "gateway p50/p90/p99 ms",
        "added p50/p90/p99 ms",
        "header p50/p99 ms",
        "req/s direct",
        "req/s gateway",
        "gw CPU ms/req",
    )
    lines = [head]
    for r in rows:
        d, g = r.direct, r.gateway
        lines.append(
            (
                r.body,
                str(r.concurrency),
                f"{d.p50_ms:.3f}/{d.p90_ms:.3f}/{d.p99_ms:.3f}",
                f"{g.p50_ms:.3f}/{g.p90_ms:.3f}/{g.p99_ms:.3f}",
                f"{r.added_p50_ms:+.3f}/{r.added_p90_ms:+.3f}/{r.added_p99_ms:+.3f}",
                f"{fmt(g.header_p50_ms)}/{fmt(g.header_p99_ms)}",
                f"{d.rps:.0f}",
                f"{g.rps:.0f}",
                fmt(g.gateway_cpu_ms_per_request),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        out.append(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
        if i == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def measure(
    target: str,
    body_name: str,
    url: str,
    body: Path,
    conc: int,
    count: int,
    plan: Plan,
    wrk: str,
    layout: Layout,
    work: Path,
    gateway: subprocess.Popen,
    stub: subprocess.Popen,
    lines: LineCounter,
) -> Run:
    # Warm up: connections opened (the gateway's pool grows to the concurrency), code paths hot.
    run_wrk(wrk, url, body, conc, plan.warmup_requests, plan.max_seconds, layout.wrk, work)
    logged0 = lines.settle(quiet_s=0.05)
    gw_cpu0, stub_cpu0 = cpu_seconds(gateway.pid), cpu_seconds(stub.pid)
    res = run_wrk(wrk, url, body, conc, count, plan.max_seconds, layout.wrk, work)
    logged = lines.settle() - logged0
    gw_cpu, stub_cpu = cpu_seconds(gateway.pid) - gw_cpu0, cpu_seconds(stub.pid) - stub_cpu0
    run = to_run(target, body_name, conc, res)
    # Every request the stub answered (direct or proxied) costs stub CPU; divide by what wrk completed.
    run.stub_cpu_ms_per_request = round(stub_cpu * 1e3 / max(res["requests"], 1), 4)
    if target == "gateway":
        run.gateway_requests = logged
        run.gateway_cpu_ms_per_request = round(gw_cpu * 1e3 / max(logged, 1), 4)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds; checks the set-up, noisy numbers")
    parser.add_argument("--repeat", type=int, help="runs per measurement; the table shows medians")
    parser.add_argument("--concurrency", type=int, nargs="+", help="override the concurrency levels")
    parser.add_argument("--bodies", nargs="+", choices=("small", "large"), default=("small", "large"))
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="core pinning (see cpu_layout)")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    parser.add_argument("--keep-log", action="store_true", help="keep the gateway's log file (path printed)")
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else FULL
    if args.repeat:
        plan.repeat = args.repeat
    if args.concurrency:
        plan.concurrency = tuple(args.concurrency)
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk not found: install it (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="imagegate-bench-"))
    py = sys.executable
    stub_port, gw_port = free_port(), free_port()
    config = work / "routes.yaml"
    config.write_text(GATEWAY_CONFIG.format(port=gw_port, stub_port=stub_port))
    bodies = {"small": work / "small.json", "large": work / "large.json"}
    bodies["small"].write_text(json.dumps(SMALL_BODY))
    bodies["large"].write_text(json.dumps(LARGE_BODY))
    log_path = work / "gateway.log"
    print(
        f"layout {args.layout}; load average {os.getloadavg()[0]:.2f}; "
        f"{'quick' if args.quick else 'full'} plan, repeat {plan.repeat}",
        flush=True,
    )

    rows: list[Row] = []
    first = cpu_layout(args.layout, plan.concurrency[0])
    with (
        open(work / "stub.log", "wb") as stub_log,
        open(log_path, "wb") as gw_log,
        process(
            [py, str(ROOT / "benchmarks" / "stub_server.py"), "--port", str(stub_port)],
            first.stub,
            stub_log,
            (stub_port, "/healthz"),
        ) as stub,
        process(
            [py, "-m", "gateway", "serve", "--config", str(config), "--port", str(gw_port)],
            first.gateway,
            gw_log,
            (gw_port, "/healthz"),
        ) as gateway,
    ):
        lines = LineCounter(log_path)
        urls = {
            "direct": f"http://127.0.0.1:{stub_port}{GENERATIONS}",
            "gateway": f"http://127.0.0.1:{gw_port}{GENERATIONS}",
        }
        for body_name in args.bodies:
            counts = plan.small_requests if body_name == "small" else plan.large_requests
            for conc in plan.concurrency:
                count = counts.get(conc) or max(counts.values())
                layout = cpu_layout(args.layout, conc)
                pin(stub.pid, layout.stub)
                pin(gateway.pid, layout.gateway)
                runs: dict[str, list[Run]] = {"direct": [], "gateway": []}
                for _ in range(plan.repeat):
                    for target in ("direct", "gateway"):
                        runs[target].append(
                            measure(
                                target,
                                body_name,
                                urls[target],
                                bodies[body_name],
                                conc,
                                count,
                                plan,
                                wrk,
                                layout,
                                work,
                                gateway,
                                stub,
                                lines,
                            )
                        )
                d, g = median_run(runs["direct"]), median_run(runs["gateway"])
                row = Row(
                    body_name,
                    conc,
                    layout.describe(),
                    d,
                    g,
                    round(g.p50_ms - d.p50_ms, 3),
                    round(g.p90_ms - d.p90_ms, 3),
                    round(g.p99_ms - d.p99_ms, 3),
                )
                rows.append(row)
                print(
                    f"  {body_name:<5} c={conc:<3} [{layout.name}] direct p50 {d.p50_ms:.3f} ms, "
                    f"gateway p50 {g.p50_ms:.3f} ms, "
                    f"header p50 {fmt(g.header_p50_ms)} ms, gateway CPU {fmt(g.gateway_cpu_ms_per_request)} "
                    f"ms/req, {g.rps:.0f} req/s",
                    flush=True,
                )

    checks = evaluate(rows)
    print()
    print(table(rows))
    print()
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['detail']}")
    elapsed = time.time() - started
    print(f"\n{elapsed:.0f} s; results in {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "meta": {
                    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                    "seconds": round(elapsed, 1),
                    "mode": "quick" if args.quick else "full",
                    "repeat": plan.repeat,
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "cpus": os.cpu_count(),
                    "layout": args.layout,
                    "load_average_at_end": os.getloadavg()[0],
                    "load_generator": subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout.split(
                        "\n"
                    )[0],
                    "bodies": {"small": SMALL_BODY, "large": LARGE_BODY},
                },
                "rows": [asdict(r) for r in rows],
                "checks": checks,
            },
            indent=2,
        )
    )
    if args.keep_log:
        print(f"gateway log: {log_path}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(c["pass"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
