"""The five workloads of issue 5, written once against a small `System` interface.

Standard library only: this module runs in our virtualenv (imported as `bench.workloads`)
and in the peers' one (imported as `workloads`, with bench/ on PYTHONPATH).

A system (bench/ours_client.py, bench/peers/*_peer.py) provides:

    name                          "ours", "celery", ...
    w1_stop                       how W1/W4 decide "all done" (printed with the results)
    describe() -> dict            versions and configuration
    wait_ready(deadline)          until its workers consume (raise on deadline)
    submit_noop() -> handle       one job, the way a user enqueues one
    submit_noop_many(n) -> list   n jobs through the best bulk call it offers
    submit_failing_many(n) -> list  n always-failing jobs (3 retries, no backoff)
    completed(handles) -> bool    are all these NOOP jobs done (cheap; polled)
    dead(handles) -> bool         are all these failing jobs dead-lettered (polled)
    count_completed(handles) -> int, count_dead(handles) -> int   untimed verification
    is_completed(handle) -> bool  the status read W2 polls (thread-safe)
    lookup(handle) -> str         one status lookup for W3; returns the state seen
    completed_state               what lookup() returns for a finished job
    close()

Every wait polls with a deadline; a workload past its deadline reports "timeout".
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PARAMS: dict[str, dict[str, Any]] = {
    "full": {"w1_jobs": 5000, "w2_jobs": 200, "w2_rate": 50.0, "w3_lookups": 20000,
             "w4_jobs": 200, "w5_clients": 8, "w5_seconds": 10.0, "warmup_jobs": 50},
    "quick": {"w1_jobs": 500, "w2_jobs": 50, "w2_rate": 50.0, "w3_lookups": 2000,
              "w4_jobs": 20, "w5_clients": 8, "w5_seconds": 2.0, "warmup_jobs": 20},
}
# Seconds each workload may take before it reports "timeout" (full run; quick runs use less).
TIMEOUTS: dict[str, dict[str, float]] = {
    "full": {"warmup": 60, "w1": 200, "w2": 60, "w3": 100, "w4": 150, "w5": 40},
    "quick": {"warmup": 60, "w1": 60, "w2": 30, "w3": 30, "w4": 60, "w5": 15},
}
WORKLOADS = ("w1", "w2", "w3", "w4", "w5")
STOP_POLL = 0.02     # W1/W4: seconds between two checks of the stop condition
STATUS_POLL = 0.001  # W2: at most this long between the starts of two status polls of a job


class Timeout(Exception):
    """A workload ran past its deadline."""


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile (no interpolation): p99 of 200 samples is the 198th."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary(seconds: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max/mean in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else None,
        "mean_ms": sum(ms) / len(ms) if ms else None,
    }


def wait_until(check: Callable[[], bool], deadline: float, what: str,
               interval: float = STOP_POLL) -> float:
    """Call check() every `interval` until true; return the time it first was. Timeout past
    the deadline."""
    while True:
        if check():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise Timeout(f"{what} not reached in time")
        time.sleep(interval)


def chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# --- the workloads ----------------------------------------------------------------------------


def warmup(system: Any, p: dict[str, Any], deadline: float) -> dict[str, Any]:
    """Not measured: workers consuming, connections open, first jobs run."""
    system.wait_ready(deadline)
    handles = system.submit_noop_many(p["warmup_jobs"])
    wait_until(lambda: system.completed(handles), deadline, "warm-up jobs completed")
    system.is_completed(system.submit_noop())
    return {"jobs": p["warmup_jobs"]}


def w1_drain(system: Any, p: dict[str, Any], deadline: float, state: dict[str, Any]
             ) -> dict[str, Any]:
    """Submit w1_jobs no-op jobs in bulk; time from the first submit until all are done."""
    n = p["w1_jobs"]
    start = time.perf_counter()
    handles = system.submit_noop_many(n)
    submitted = time.perf_counter()
    done = wait_until(lambda: system.completed(handles), deadline, f"{n} jobs completed")
    seconds = done - start
    state["w1_handles"] = handles
    verified = system.count_completed(handles)
    return {"jobs": n, "seconds": seconds, "jobs_per_s": n / seconds,
            "submit_seconds": submitted - start, "verified_completed": verified,
            "stop_condition": system.w1_stop}


def w2_latency(system: Any, p: dict[str, Any], deadline: float, state: dict[str, Any]
               ) -> dict[str, Any]:
    """w2_jobs jobs at w2_rate/s; each: just before submit -> first poll that sees it done."""
    n, rate = p["w2_jobs"], p["w2_rate"]
    latencies: list[float | None] = [None] * n
    submit_times: list[float | None] = [None] * n
    polls = [0] * n
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            t0 = time.perf_counter()
            handle = system.submit_noop()
            submit_times[i] = time.perf_counter() - t0
            next_poll = time.perf_counter()
            while True:
                polls[i] += 1
                if system.is_completed(handle):
                    latencies[i] = time.perf_counter() - t0
                    return
                now = time.perf_counter()
                if now > deadline:
                    return
                next_poll += STATUS_POLL
                if next_poll > now:
                    time.sleep(next_poll - now)
                else:
                    next_poll = now
        except Exception as exc:  # reported, not raised: one bad job must not hide the rest
            errors.append(f"{type(exc).__name__}: {exc}")

    lateness = []
    with ThreadPoolExecutor(max_workers=64, thread_name_prefix="w2") as pool:
        start = time.perf_counter() + 0.05
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            lateness.append(time.perf_counter() - due)
            pool.submit(one, i)
            if time.perf_counter() > deadline:
                break
    done = [x for x in latencies if x is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} job(s) failed, first: {errors[0]}")
    if len(done) < n:
        raise Timeout(f"{n - len(done)} of {n} jobs not seen completed in time")
    out = {"jobs": n, "rate_per_s": rate, **latency_summary(done)}
    out["submit_call_p50_ms"] = latency_summary([s for s in submit_times if s])["p50_ms"]
    out["polls_per_job_mean"] = sum(polls) / n
    out["max_schedule_lag_ms"] = max(lateness) * 1000
    return out


def w3_status(system: Any, p: dict[str, Any], deadline: float, state: dict[str, Any]
              ) -> dict[str, Any]:
    """w3_lookups status reads of finished jobs (W1's), one client, one after another."""
    handles = state.get("w1_handles")
    if not handles:
        raise RuntimeError("skipped: W1 did not finish, so there are no finished jobs to read")
    n = p["w3_lookups"]
    lookup, want = system.lookup, system.completed_state
    latencies = [0.0] * n
    wrong = 0
    count = len(handles)
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        seen = lookup(handles[i % count])
        latencies[i] = time.perf_counter() - t
        if seen != want:
            wrong += 1
        if i % 256 == 0 and t > deadline:
            raise Timeout(f"only {i} of {n} lookups in time")
    seconds = time.perf_counter() - start
    return {"lookups": n, "seconds": seconds, "ops_per_s": n / seconds,
            **latency_summary(latencies), "not_finished_answers": wrong}


def w4_failures(system: Any, p: dict[str, Any], deadline: float, state: dict[str, Any]
                ) -> dict[str, Any]:
    """w4_jobs always-failing jobs (3 retries, no backoff): time until all dead-lettered."""
    n = p["w4_jobs"]
    start = time.perf_counter()
    handles = system.submit_failing_many(n)
    done = wait_until(lambda: system.dead(handles), deadline, f"{n} jobs dead-lettered")
    seconds = done - start
    return {"jobs": n, "seconds": seconds, "attempts_per_s": 4 * n / seconds,
            "verified_dead": system.count_dead(handles), "stop_condition": system.w4_stop}


def w5_submit(system: Any, p: dict[str, Any], deadline: float, state: dict[str, Any]
              ) -> dict[str, Any]:
    """w5_clients threads submitting single jobs back to back for w5_seconds."""
    clients, seconds = p["w5_clients"], p["w5_seconds"]
    per_thread: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    stop_at = min(time.perf_counter() + seconds, deadline)
    gate = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        mine = per_thread[i]
        gate.wait()
        while True:
            t = time.perf_counter()
            if t >= stop_at:
                return
            try:
                system.submit_noop()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if len(errors) > 100:
                    return
                continue
            mine.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(max(0.1, deadline + 30 - time.perf_counter()))
    elapsed = time.perf_counter() - start
    latencies = [x for lst in per_thread for x in lst]
    if any(t.is_alive() for t in threads):
        raise Timeout("a submit call hung past the deadline")
    if errors and not latencies:
        raise RuntimeError(f"every submit failed, first: {errors[0]}")
    return {"clients": clients, "seconds": elapsed, "submitted": len(latencies),
            "submits_per_s": len(latencies) / elapsed, **latency_summary(latencies),
            "errors": len(errors)}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "w1": w1_drain, "w2": w2_latency, "w3": w3_status, "w4": w4_failures, "w5": w5_submit,
}


class RemainingTracker:
    """'Are all these done?' for peers whose store answers per job: keeps the jobs not yet
    seen done, in submission order, and checks the oldest `batch` of them per poll (jobs
    finish roughly in order, so each poll reads few keys)."""

    def __init__(self, check: Callable[[list[Any]], list[bool]], batch: int = 500) -> None:
        self.check = check
        self.batch = batch
        # id(handles) -> (handles, not yet seen done); holding handles keeps the id unique
        self.remaining: dict[int, tuple[list[Any], list[Any]]] = {}

    def __call__(self, handles: list[Any]) -> bool:
        _, remaining = self.remaining.setdefault(id(handles), (handles, list(handles)))
        while remaining:
            head = remaining[:self.batch]
            flags = self.check(head)
            left = [h for h, ok in zip(head, flags, strict=True) if not ok]
            remaining[:len(head)] = left
            if left:
                return False
        return True

    def count(self, handles: list[Any]) -> int:
        return sum(sum(self.check(part)) for part in chunks(list(handles), self.batch))
