"""The workloads (W1-W5 of issue 5, W6 of issue 13), written once against one `System` API.

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

import contextlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PARAMS: dict[str, dict[str, Any]] = {
    "full": {"w1_jobs": 5000, "w2_jobs": 200, "w2_rate": 50.0, "w3_lookups": 20000,
             "w4_jobs": 200, "w5_clients": 8, "w5_seconds": 10.0, "w6_jobs": 1000,
             "warmup_jobs": 50},
    "quick": {"w1_jobs": 500, "w2_jobs": 50, "w2_rate": 50.0, "w3_lookups": 2000,
              "w4_jobs": 20, "w5_clients": 8, "w5_seconds": 2.0, "w6_jobs": 100,
              "warmup_jobs": 20},
}
# Seconds each workload may take before it reports "timeout" (full run; quick runs use less).
TIMEOUTS: dict[str, dict[str, float]] = {
    "full": {"warmup": 60, "w1": 200, "w2": 90, "w3": 120, "w4": 150, "w5": 40, "w6": 60},
    "quick": {"warmup": 60, "w1": 60, "w2": 30, "w3": 30, "w4": 60, "w5": 15, "w6": 15},
}
WORKLOADS = ("w1", "w2", "w3", "w4", "w5", "w6")
STOP_POLL = 0.05     # W1/W4: seconds between two checks of the stop condition
STATUS_POLL = 0.001  # W2: a poller's passes over its jobs in flight start at most this often
W2_POLLERS = 4       # W2: threads polling the jobs in flight
FIRST_SUBMITS = 10   # warm-up: single submits timed right after the system is ready


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
    """Workers consuming, connections open, first jobs run. Measured only: the first
    FIRST_SUBMITS single submits once the system says it is ready (ready should mean
    ready: the first as fast as the ones after it)."""
    system.wait_ready(deadline)
    took = []
    for _ in range(FIRST_SUBMITS):
        start = time.perf_counter()
        system.submit_noop()
        took.append(time.perf_counter() - start)
    handles = system.submit_noop_many(p["warmup_jobs"])
    wait_until(lambda: system.completed(handles), deadline, "warm-up jobs completed")
    single = system.submit_noop()
    wait_until(lambda: system.is_completed(single), deadline, "a single job completed")
    rest = sorted(took[1:])
    return {"jobs": p["warmup_jobs"], "first_submit_ms": 1000 * took[0],
            "next_submits_p50_ms": 1000 * rest[len(rest) // 2]}


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
    """w2_jobs jobs at w2_rate/s; each: just before its submit -> first poll that sees it done.

    Submits run on schedule from a pool (so a slow submit does not delay the next one);
    W2_POLLERS threads poll the jobs in flight (job i belongs to poller i % W2_POLLERS), each
    pass over its jobs at most STATUS_POLL apart. With one job in flight (the peers' case) a
    job is polled every millisecond; when many are in flight the polling load stays bounded
    and the gap between two polls of a job grows (reported as poll_gap_mean_ms).
    """
    n, rate = p["w2_jobs"], p["w2_rate"]
    latencies: list[float | None] = [None] * n
    submit_times: list[float | None] = [None] * n
    polls = [0] * n
    errors: list[str] = []
    inboxes: list[queue.SimpleQueue[tuple[int, Any, float]]] = [
        queue.SimpleQueue() for _ in range(W2_POLLERS)]
    all_submitted = threading.Event()

    def submit(i: int) -> None:
        try:
            t0 = time.perf_counter()
            handle = system.submit_noop()
            submit_times[i] = time.perf_counter() - t0
            inboxes[i % W2_POLLERS].put((i, handle, t0))
        except Exception as exc:  # reported, not raised: one bad job must not hide the rest
            errors.append(f"submit: {type(exc).__name__}: {exc}")

    def poller(inbox: queue.SimpleQueue[tuple[int, Any, float]]) -> None:
        active: list[tuple[int, Any, float]] = []
        while time.perf_counter() < deadline:
            try:
                while True:
                    active.append(inbox.get_nowait())
            except queue.Empty:
                pass
            if not active:
                if all_submitted.is_set() and inbox.empty():
                    return
                with contextlib.suppress(queue.Empty):
                    active.append(inbox.get(timeout=0.001))
                continue
            pass_start = time.perf_counter()
            left = []
            for item in active:
                i, handle, t0 = item
                polls[i] += 1
                try:
                    done = system.is_completed(handle)
                except Exception as exc:
                    errors.append(f"status: {type(exc).__name__}: {exc}")
                    return
                if done:
                    latencies[i] = time.perf_counter() - t0
                else:
                    left.append(item)
            active = left
            pause = pass_start + STATUS_POLL - time.perf_counter()
            if active and pause > 0:
                time.sleep(pause)

    pollers = [threading.Thread(target=poller, args=(box,), daemon=True) for box in inboxes]
    for t in pollers:
        t.start()
    lateness = []
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="w2-submit") as pool:
        start = time.perf_counter() + 0.05
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            lateness.append(time.perf_counter() - due)
            pool.submit(submit, i)
            if time.perf_counter() > deadline:
                break
    all_submitted.set()
    for t in pollers:
        t.join(max(0.1, deadline - time.perf_counter() + 5))
    done = [x for x in latencies if x is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} error(s), first: {errors[0]}")
    if len(done) < n:
        raise Timeout(f"{n - len(done)} of {n} jobs not seen completed in time")
    out = {"jobs": n, "rate_per_s": rate, **latency_summary(done)}
    out["submit_call_p50_ms"] = latency_summary([s for s in submit_times if s])["p50_ms"]
    out["polls_per_job_mean"] = sum(polls) / n
    out["poll_gap_mean_ms"] = 1000 * sum(done) / sum(polls)
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
    done = n
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        seen = lookup(handles[i % count])
        latencies[i] = time.perf_counter() - t
        if seen != want:
            wrong += 1
        if i % 256 == 255 and t > deadline:
            done = i + 1  # a rate is still a rate: report it over the lookups made, marked
            break
    seconds = time.perf_counter() - start
    out = {"lookups": done, "seconds": seconds, "ops_per_s": done / seconds,
           **latency_summary(latencies[:done]), "not_finished_answers": wrong}
    if done < n:
        out["partial"] = f"timeout: {done} of {n} lookups made in time"
    return out


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


def w6_single_submits(system: Any, p: dict[str, Any], deadline: float, state: dict[str, Any]
                      ) -> dict[str, Any]:
    """w6_jobs single submits from one client, one after another: what a web app that
    enqueues one job per request sees."""
    n = p["w6_jobs"]
    latencies: list[float] = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        if t > deadline:
            raise Timeout(f"{len(latencies)} of {n} single submits made in time")
        system.submit_noop()
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    return {"jobs": n, "seconds": elapsed, "submits_per_s": n / elapsed,
            **latency_summary(latencies)}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "w1": w1_drain, "w2": w2_latency, "w3": w3_status, "w4": w4_failures, "w5": w5_submit,
    "w6": w6_single_submits,
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
