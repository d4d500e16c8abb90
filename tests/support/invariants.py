"""The invariants every fault test checks over every job it got a 202 for."""

from __future__ import annotations

import json
from typing import Any

import redis

from common.db import Database
from tests.support.client import wait_for

TERMINAL = ("COMPLETED", "DEAD_LETTER")


def jobs_by_id(db: Database, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = db.run("SELECT job_id::text, status::text, attempts, max_retries, retries"
                  " FROM jobs WHERE job_id = ANY(CAST(:ids AS uuid[]))", ids=job_ids)
    return {r[0]: {"status": r[1], "attempts": r[2], "max_retries": r[3], "retries": r[4]}
            for r in rows}


def settle(db: Database, job_ids: list[str], timeout: float = 90) -> dict[str, dict[str, Any]]:
    """Wait until every job is terminal; fail naming the ones that are not."""

    def all_terminal() -> dict[str, dict[str, Any]] | None:
        jobs = jobs_by_id(db, job_ids)
        return jobs if all(j["status"] in TERMINAL for j in jobs.values()) else None

    try:
        return wait_for(all_terminal, timeout, "every accepted job to reach a terminal state",
                        interval=0.2)
    except AssertionError:
        stuck = {k: v for k, v in jobs_by_id(db, job_ids).items() if v["status"] not in TERMINAL}
        raise AssertionError(f"{len(stuck)} job(s) never settled: {stuck}") from None


def check_invariants(db: Database, redis_url: str, job_ids: list[str],
                     timeout: float = 90) -> dict[str, dict[str, Any]]:
    """Every 202 is terminal; nothing completed twice; attempts within budget; one dead-letter
    row per DEAD_LETTER job; Redis agrees with PostgreSQL once settled."""
    assert job_ids, "a fault test must submit jobs"
    jobs = settle(db, job_ids, timeout)
    assert set(jobs) == set(job_ids), "a 202 job is missing from PostgreSQL"
    completed_attempts = dict(db.run(
        "SELECT job_id::text, count(*) FROM job_attempts WHERE outcome = 'COMPLETED'"
        " AND job_id = ANY(CAST(:ids AS uuid[])) GROUP BY job_id", ids=job_ids))
    for job_id, job in jobs.items():
        done = completed_attempts.get(job_id, 0)
        assert done <= 1, f"job {job_id} completed {done} times"
        assert (done == 1) == (job["status"] == "COMPLETED"), (job_id, job, done)
        assert job["attempts"] <= job["max_retries"] + 1, (job_id, job)
        assert job["retries"] <= job["max_retries"], (job_id, job)
    dead = {j for j, job in jobs.items() if job["status"] == "DEAD_LETTER"}
    letters = dict(db.run("SELECT job_id::text, count(*) FROM dead_letters"
                          " WHERE job_id = ANY(CAST(:ids AS uuid[])) GROUP BY job_id",
                          ids=job_ids))
    assert set(letters) == dead and all(n == 1 for n in letters.values()), (letters, dead)

    client = redis.Redis.from_url(redis_url, socket_timeout=2)

    def disagreements() -> dict[str, tuple[str, str]]:
        out = {}
        for job_id, job in jobs.items():
            raw = client.hget(f"jobs:status:{job_id}", "doc")
            if raw is not None and json.loads(raw)["status"] != job["status"]:
                out[job_id] = (json.loads(raw)["status"], job["status"])
        return out

    wait_for(lambda: not disagreements() or None, 30,
             f"Redis to agree with PostgreSQL (cached, stored): {disagreements()}", interval=0.2)
    return jobs
