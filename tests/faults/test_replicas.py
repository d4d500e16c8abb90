"""Two of everything side by side (`JOBS_REPLICAS=2`): two of each function, two bridges per
topic in one consumer group, two sweepers ticking at once, the gateway spreading requests
over both submit and status functions. The invariants hold for every job, with and without
one replica killed, and no job ever ran two attempts at once."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.db import Database
from infra.stack import Stack
from tests.support.client import Api, wait_for
from tests.support.invariants import check_invariants, jobs_by_id
from tests.support.stacks import FAULT_ENV, own_stack

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with own_stack(tmp_path_factory.mktemp("replicas"), {**FAULT_ENV, "JOBS_REPLICAS": "2"},
                   sweep_interval=0.5, process_workers=1) as stack:
        yield stack


@pytest.fixture(scope="module")
def papi(pair: Stack) -> Api:
    return Api(pair.gateway_url, pair.admin_token)


@pytest.fixture(scope="module")
def pdb(pair: Stack) -> Iterator[Database]:
    db = Database(pair.env["DATABASE_URL"])
    yield db
    db.close()


def submit_mix(api: Api) -> list[str]:
    """300 no-ops in batches, 60 single submits from 6 clients (both submit functions get
    some), 20 jobs failing twice before succeeding and 10 that always fail."""
    ids: list[str] = []
    for job_type, payload, n in (("NOOP", {}, 300), ("FLAKY", {"failures": 2}, 20),
                                 ("ALWAYS_FAIL", {}, 10)):
        reply = api.request("POST", "/jobs/batch",
                            json_body={"jobs": [{"job_type": job_type, "payload": payload}] * n})
        assert reply.status == 202, reply.body
        ids += [job["job_id"] for job in reply.json["jobs"]]

    def one(i: int) -> str:
        reply = api.submit("ECHO", {"message": f"single {i}"})
        assert reply.status == 202, reply.body
        return str(reply.json["job_id"])

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        ids += list(pool.map(one, range(60)))
    return ids


def tracked_jobs(api: Api, log: Path, n: int) -> list[str]:
    reply = api.request("POST", "/jobs/batch", json_body={
        "jobs": [{"job_type": "TRACKED", "payload": {"log": str(log), "seconds": 0.05}}] * n})
    assert reply.status == 202, reply.body
    return [job["job_id"] for job in reply.json["jobs"]]


def assert_never_two_at_once(log: Path, killed_at: float | None = None) -> None:
    """From the handlers' own start/end records: no two runs of one job overlapped in time,
    whichever processes ran them. A run without an end was in a process killed at
    `killed_at`."""
    runs: dict[tuple[str, str, str], dict[str, float]] = {}
    for line in log.read_text().splitlines():
        job_id, attempt, pid, what, at = line.split()
        runs.setdefault((job_id, attempt, pid), {})[what] = float(at)
    by_job: dict[str, list[tuple[float, float]]] = {}
    for (job_id, _, _), run in runs.items():
        end = run.get("end", killed_at)
        assert end is not None, f"a run of {job_id} never ended and nothing was killed"
        by_job.setdefault(job_id, []).append((run["start"], end))
    for job_id, spans in by_job.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end, f"job {job_id} ran twice at once: {spans}"


def test_two_of_everything_side_by_side_lose_nothing_and_run_nothing_twice(
        pair, papi, pdb, tmp_path):
    log = tmp_path / "runs.log"
    ids = submit_mix(papi) + tracked_jobs(papi, log, 60)
    jobs = check_invariants(pdb, pair.env["REDIS_URL"], ids)
    by_type = dict(pdb.run("SELECT job_type, array_agg(DISTINCT status::text) FROM jobs"
                           " WHERE job_id = ANY(CAST(:ids AS uuid[])) GROUP BY job_type",
                           ids=ids))
    assert by_type == {"NOOP": ["COMPLETED"], "ECHO": ["COMPLETED"], "FLAKY": ["COMPLETED"],
                       "ALWAYS_FAIL": ["DEAD_LETTER"], "TRACKED": ["COMPLETED"]}
    assert all(j["attempts"] == 3 for j in jobs.values() if j["status"] == "COMPLETED"
               and j["retries"] == 2)
    assert_never_two_at_once(log)
    pids = {line.split()[2] for line in log.read_text().splitlines()}
    assert len(pids) >= 2, "one process ran every tracked job: the replicas were not used"
    # Both bridges of the job queue took partitions of the one consumer group.
    for name in ("bridge-q", "bridge-q-2"):
        log = (pair.data_dir / "logs" / f"{name}.log").read_text()
        assert "assigned [" in log, f"{name} never got a partition"


def test_a_replica_killed_mid_run_loses_nothing(pair, papi, pdb, tmp_path):
    log = tmp_path / "runs.log"
    ids = submit_mix(papi) + tracked_jobs(papi, log, 60)
    wait_for(lambda: sum(j["status"] == "COMPLETED"
                         for j in jobs_by_id(pdb, ids).values()) >= 20, 30, "some progress")
    killed_at = time.time()
    pair.children["process-2"].kill()  # the supervisor restarts it
    pair.children["submit-2"].kill()
    ids += submit_mix(papi)  # the gateway asks the live submit when one refuses
    ids += tracked_jobs(papi, log, 20)
    check_invariants(pdb, pair.env["REDIS_URL"], ids)
    assert_never_two_at_once(log, killed_at)
