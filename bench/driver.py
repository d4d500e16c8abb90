"""Run the workloads against one system and write its figures as JSON.

    python bench/driver.py --system ours --url http://127.0.0.1:PORT --mode full --out F
    python bench/driver.py --system celery --mode quick --out F   (BENCH_REDIS_URL set)

Started by bench/run.py, which has already started the system: with our venv's python
for "ours", with bench/.venv-peers's python for a peer; bench/ is on sys.path either way.
The JSON file is rewritten after every workload, so what finished survives a hard stop.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from typing import Any

from workloads import PARAMS, RUNNERS, TIMEOUTS, WORKLOADS, Timeout, warmup


def make_system(name: str, url: str | None) -> Any:
    if name in ("ours", "ours-aged"):  # ours-aged: the same client, fuller tables
        from ours_client import Ours

        if not url:
            raise SystemExit("--url is required for ours")
        return Ours(url)
    return importlib.import_module(f"peers.{name}_peer").System()


def summary(name: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return result["error"]
    if name == "w1":
        return (f"{result['jobs']} jobs in {result['seconds']:.2f} s = "
                f"{result['jobs_per_s']:.0f} jobs/s (submit took {result['submit_seconds']:.2f} s;"
                f" verified completed: {result['verified_completed']})")
    if name == "w2":
        return (f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                f"max {result['max_ms']:.1f} ms ({result['polls_per_job_mean']:.0f} polls/job, "
                f"{result['poll_gap_mean_ms']:.1f} ms apart)")
    if name == "w3":
        return (f"{result['ops_per_s']:.0f} lookups/s, p50 {result['p50_ms']:.2f} ms, "
                f"p99 {result['p99_ms']:.2f} ms" +
                (f" ({result['partial']})" if result.get("partial") else ""))
    if name == "w4":
        return (f"{result['jobs']} jobs dead in {result['seconds']:.2f} s "
                f"(verified dead: {result['verified_dead']})")
    if name == "w5":
        return (f"{result['submits_per_s']:.0f} submits/s, p50 {result['p50_ms']:.1f} ms, "
                f"p99 {result['p99_ms']:.1f} ms, {result['errors']} errors")
    if name == "w6":
        return (f"{result['submits_per_s']:.0f} submits/s, p50 {result['p50_ms']:.2f} ms, "
                f"p99 {result['p99_ms']:.2f} ms")
    return json.dumps(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", required=True)
    parser.add_argument("--url")
    parser.add_argument("--mode", choices=sorted(PARAMS), default="full")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for everything; each workload gets its timeout or less")
    args = parser.parse_args(argv)
    params, timeouts = PARAMS[args.mode], TIMEOUTS[args.mode]
    end = time.perf_counter() + args.budget if args.budget else float("inf")
    system = make_system(args.system, args.url)
    out: dict[str, Any] = {"system": args.system, "params": params, "timeouts": timeouts,
                           "describe": system.describe(), "workloads": {}}

    def save() -> None:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2, default=str)
        os.replace(tmp, args.out)

    def log(text: str) -> None:
        print(f"[{args.system}] {text}", flush=True)

    state: dict[str, Any] = {}
    try:
        try:
            started = time.perf_counter()
            out["warmup"] = warmup(system, params,
                                   min(end, time.perf_counter() + timeouts["warmup"]))
            log(f"ready (warm-up {time.perf_counter() - started:.1f} s)")
        except Exception as exc:
            out["warmup"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"warm-up failed: {out['warmup']['error']}; skipping the workloads")
            save()
            return 1
        for name in WORKLOADS:
            deadline = min(end, time.perf_counter() + timeouts[name])
            try:
                result = RUNNERS[name](system, params, deadline, state)
            except Timeout as exc:
                result = {"error": "timeout", "detail": str(exc), "timeout_s": timeouts[name]}
            except Exception as exc:
                traceback.print_exc()
                result = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            out["workloads"][name] = result
            log(f"{name.upper()}: {summary(name, result)}")
            save()
    finally:
        save()
        try:
            system.close()
        except Exception:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
