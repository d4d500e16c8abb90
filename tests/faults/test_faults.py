"""Fault injection on a real stack of its own: processes killed, paused and stopped;
servers stopped and restarted. After each fault, the invariants hold for every job."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition

from common.db import Database
from tests.conftest import SERVICE_VARS
from tests.support.client import Api, healthy, wait_for
from tests.support.invariants import check_invariants, jobs_by_id
from tests.support.stacks import FAULT_ENV, own_stack

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Short leases and requeue times, so recovery happens within a test's patience."""
    with own_stack(tmp_path_factory.mktemp("faults"),
                   {**FAULT_ENV, "JOBS_PUBLISH_TIMEOUT_SECONDS": "2"},
                   sweep_interval=0.5) as stack:
        yield stack


@pytest.fixture(scope="module")
def fapi(fault_stack) -> Api:
    return Api(fault_stack.gateway_url, fault_stack.admin_token)


@pytest.fixture(scope="module")
def fdb(fault_stack) -> Iterator[Database]:
    db = Database(fault_stack.env["DATABASE_URL"])
    yield db
    db.close()


def submit_many(api: Api, job_type: str, payload: dict, n: int) -> list[str]:
    reply = api.request("POST", "/jobs/batch",
                        json_body={"jobs": [{"job_type": job_type, "payload": payload}] * n})
    assert reply.status == 202, reply.body
    return [job["job_id"] for job in reply.json["jobs"]]


def wait_running(db: Database, job_ids: list[str], at_least: int = 1) -> None:
    wait_for(lambda: sum(j["status"] == "IN_PROGRESS"
                         for j in jobs_by_id(db, job_ids).values()) >= at_least,
             30, f"{at_least} job(s) to be running")


def invariants(stack, db, job_ids):
    return check_invariants(db, stack.env["REDIS_URL"], job_ids)


def test_a_worker_killed_mid_job_loses_nothing(fault_stack, fapi, fdb):
    ids = submit_many(fapi, "SLEEPY", {"seconds": 1.5}, 6)
    wait_running(fdb, ids, 2)
    fault_stack.children["process"].kill()  # the supervisor restarts it
    jobs = invariants(fault_stack, fdb, ids)
    assert {j["status"] for j in jobs.values()} == {"COMPLETED"}
    assert any(j["attempts"] > 1 for j in jobs.values()), "no attempt was interrupted"


def test_a_bridge_killed_after_the_commit_but_before_the_offset_commit_runs_nothing_twice(
        fault_stack, fapi, fdb):
    ids = submit_many(fapi, "NOOP", {}, 300)
    wait_for(lambda: sum(j["status"] == "COMPLETED"
                         for j in jobs_by_id(fdb, ids).values()) >= 30, 30, "some progress")
    fault_stack.children["bridge-q"].kill()
    jobs = invariants(fault_stack, fdb, ids)
    assert {j["status"] for j in jobs.values()} == {"COMPLETED"}
    assert {j["attempts"] for j in jobs.values()} == {1}


def test_a_worker_paused_past_its_lease_is_fenced_out_when_it_resumes(fault_stack, fapi, fdb):
    ids = submit_many(fapi, "SLEEPY", {"seconds": 2}, 3)
    wait_running(fdb, ids, 1)
    process = fault_stack.children["process"]
    process.pause()
    try:
        # The sweeper takes the jobs back once their 3 s leases run out.
        wait_for(lambda: fdb.run("SELECT count(*) FROM job_attempts WHERE outcome = 'FAILED'"
                                 " AND error LIKE 'lease expired%'"
                                 " AND job_id = ANY(CAST(:ids AS uuid[]))", ids=ids)[0][0] >= 1,
                 30, "a lease to expire and the job to be taken back")
    finally:
        process.resume()
    jobs = invariants(fault_stack, fdb, ids)
    assert {j["status"] for j in jobs.values()} == {"COMPLETED"}
    fenced = fdb.run("SELECT count(*) FROM job_attempts WHERE attempt = 1 AND outcome ="
                     " 'COMPLETED' AND job_id = ANY(CAST(:ids AS uuid[]))"
                     " AND job_id IN (SELECT job_id FROM job_attempts WHERE attempt = 2)",
                     ids=ids)
    assert fenced == [[0]], "a fenced-out attempt recorded its result"


def test_a_broker_restart_with_jobs_queued_loses_nothing(fault_stack, fapi, fdb):
    bridge = fault_stack.children["bridge-q"]
    bridge.pause()
    try:
        ids = submit_many(fapi, "NOOP", {}, 20)
        fault_stack.restart_service("kafka")  # memory storage: every queued record is gone
    finally:
        bridge.resume()
    jobs = invariants(fault_stack, fdb, ids)
    assert {j["status"] for j in jobs.values()} == {"COMPLETED"}


def queue_size(bootstrap: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"w-{uuid.uuid4()}"})
    try:
        partitions = consumer.list_topics("job-queue", timeout=10).topics["job-queue"].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition("job-queue", p), timeout=10)[1]
                   for p in partitions)
    finally:
        consumer.close()


def test_postgres_down_at_submit_answers_503_and_writes_nothing_anywhere(fault_stack, fapi):
    r = redis.Redis.from_url(fault_stack.env["REDIS_URL"])
    bootstrap = fault_stack.env["KAFKA_BOOTSTRAP_SERVERS"]
    before = (r.dbsize(), queue_size(bootstrap))
    fault_stack.stop_service("postgresql")
    try:
        reply = fapi.submit("ECHO", {"message": "while postgres is down"})
        assert reply.status == 503 and reply.content_type == "application/problem+json"
        assert int(reply.headers["retry-after"]) > 0
        assert (r.dbsize(), queue_size(bootstrap)) == before
    finally:
        fault_stack.restart_service("postgresql")
    after = wait_for(lambda: (reply := fapi.submit("ECHO", {"message": "back"})).status == 202
                     and reply, 30, "submit to work again")
    assert fapi.wait_status(after.json["job_id"])["status"] == "COMPLETED"


def test_postgres_down_during_processing_pauses_and_resumes_without_dead_letters(
        fault_stack, fapi, fdb):
    ids = submit_many(fapi, "SLEEPY", {"seconds": 1}, 10)
    wait_running(fdb, ids, 2)
    fault_stack.stop_service("postgresql")
    time.sleep(4)  # the outage itself: no condition to wait for while it lasts
    fault_stack.restart_service("postgresql")
    jobs = invariants(fault_stack, fdb, ids)
    assert {j["status"] for j in jobs.values()} == {"COMPLETED"}


def test_redis_stopped_then_restarted_empty_is_refilled_from_postgres(fault_stack, fapi, fdb):
    fault_stack.stop_service("redis")
    try:
        ids = [fapi.submit("ECHO", {"message": f"no redis {i}"}).json["job_id"] for i in range(10)]
        for job_id in ids:
            assert fapi.wait_status(job_id)["status"] == "COMPLETED"
    finally:
        fault_stack.restart_service("redis")
    invariants(fault_stack, fdb, ids)


def test_a_hung_redis_does_not_leave_the_cache_behind(fault_stack, fapi, fdb):
    ids = submit_many(fapi, "ECHO", {"message": "before the hang"}, 10)
    for job_id in ids:
        fapi.job(job_id)  # cache filled with QUEUED or later
    server = fault_stack.services["redis"]
    server.pause()
    try:
        for job_id in ids:
            assert fapi.wait_status(job_id)["status"] == "COMPLETED"
    finally:
        server.resume()
    invariants(fault_stack, fdb, ids)


def test_fifty_concurrent_submits_with_one_key_make_one_job(fault_stack, fapi, fdb):
    key = f"fifty-{uuid.uuid4()}"

    def send(_):
        return fapi.request("POST", "/jobs", json_body={"job_type": "NOOP", "payload": {}},
                            headers={"Idempotency-Key": key})

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(send, range(50)))
    assert {r.status for r in replies} == {202}
    ids = list({r.json["job_id"] for r in replies})
    assert len(ids) == 1
    invariants(fault_stack, fdb, ids)


def test_a_handler_that_hangs_past_its_time_limit_is_failed_and_its_late_end_ignored(
        fault_stack, fapi, fdb):
    ids = [fapi.submit("HANG", {"seconds": 4}, max_retries=1).json["job_id"]]
    jobs = invariants(fault_stack, fdb, ids)
    assert jobs[ids[0]]["status"] == "DEAD_LETTER" and jobs[ids[0]]["attempts"] == 2


def test_sigterm_lets_an_in_flight_job_finish(fault_stack, fapi, fdb):
    ids = submit_many(fapi, "SLEEPY", {"seconds": 1.5}, 2)
    wait_running(fdb, ids, 1)
    fault_stack.children["process"].signal(signal.SIGTERM)
    jobs = invariants(fault_stack, fdb, ids)
    assert {j["status"] for j in jobs.values()} == {"COMPLETED"}
    assert {j["attempts"] for j in jobs.values()} == {1}, "SIGTERM cut a job short"


def keep_submitting(api: Api, stop: threading.Event, accepted: list[str]) -> None:
    while not stop.is_set():
        reply = api.submit("NOOP")
        assert reply.status == 202, reply.body
        accepted.append(reply.json["job_id"])


def all_acknowledged(api: Api, accepted: list[str], n: int = 16) -> bool:
    """n concurrent submits (spread over both submit workers): none deferred?"""
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(lambda _: api.submit("NOOP"), range(n)))
    assert {r.status for r in replies} == {202}, [r.body for r in replies]
    accepted += [r.json["job_id"] for r in replies]
    return not any("x-jobs-enqueue" in r.headers for r in replies)


def test_submits_are_acknowledged_again_after_each_of_three_broker_restarts(
        fault_stack, fapi, fdb):
    accepted: list[str] = []
    for _ in range(3):
        # Submits in flight while the broker restarts: it forgets the idempotent producers
        # that sent them, and their next poll() raises a fatal error.
        stop = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            loads = [pool.submit(keep_submitting, fapi, stop, accepted) for _ in range(8)]
            wanted = len(accepted) + 40
            try:
                wait_for(lambda n=wanted: len(accepted) >= n, 30, "submits to flow")
                fault_stack.restart_service("kafka")
            finally:
                stop.set()
            for load in loads:
                load.result()
        wait_for(lambda: all_acknowledged(fapi, accepted), 60,
                 "submits acknowledged by the restarted broker (no X-Jobs-Enqueue: deferred)")
    jobs = invariants(fault_stack, fdb, accepted)
    assert {j["status"] for j in jobs.values()} == {"COMPLETED"}


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie is as good as gone)."""
    running = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc)
    return running


def end(procs: list[psutil.Process]) -> None:
    """SIGKILL what is left, so that a failed test leaves no process behind either."""
    for proc in alive(procs):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def test_a_gateway_killed_with_sigkill_takes_its_workers_along_and_comes_back_on_its_port(
        fault_stack):
    gateway = fault_stack.children["gateway"]
    main = psutil.Process(gateway.pid)
    workers = main.children(recursive=True)
    assert workers, "the gateway runs no workers"
    os.kill(main.pid, signal.SIGKILL)  # the main process only, not its group
    try:
        wait_for(lambda: not alive(workers), 30, "the killed gateway's workers to exit")
    finally:
        end(workers)
    wait_for(lambda: gateway.pid not in (None, main.pid) and healthy(fault_stack.gateway_url),
             60, "the restarted gateway to answer /healthz on its port")


def test_a_stack_killed_with_sigkill_leaves_no_process_it_started_running(tmp_path):
    from infra import services

    data_dir = tmp_path / "data"
    port = services.free_port()
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    log_path = tmp_path / "stack.log"
    with log_path.open("wb") as log:
        stack = subprocess.Popen(
            [sys.executable, "-m", "infra.stack", "--data-dir", str(data_dir),
             "--port", str(port), "--quiet"],
            cwd=Path(__file__).resolve().parents[2], env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        wait_for(lambda: stack.poll() is not None or "Jobs stack is up" in log_path.read_text(),
                 90, "the stack to start")
        assert stack.poll() is None, log_path.read_text()[-3000:]
        assert healthy(f"http://127.0.0.1:{port}")
        for line in (data_dir / "stack.pids").read_text().split():
            proc = psutil.Process(int(line.partition(":")[0]))
            started += [proc, *proc.children(recursive=True)]
        started += psutil.Process(stack.pid).children(recursive=True)
        started = list({p.pid: p for p in started}.values())
        assert len(started) > 10, started  # services, functions, their workers, bridges
        os.kill(stack.pid, signal.SIGKILL)
        stack.wait()
        wait_for(lambda: not alive(started), 60, "every process the stack started to exit")
    finally:
        end(started)
        if stack.poll() is None:
            stack.kill()
            stack.wait()


def test_a_gateway_killed_while_its_workers_start_leaves_none_of_them_behind(fault_stack):
    # Killed before its workers reach the app factory (where they ask to die with their
    # parent), the workers would serve on its port forever: the supervisor ends them.
    gateway = fault_stack.children["gateway"]
    gateway.stop()
    gateway.start()
    main = psutil.Process(gateway.pid)

    def spawned_workers() -> list[psutil.Process]:
        workers = []
        for proc in main.children():
            with contextlib.suppress(psutil.Error):  # one that ended meanwhile
                if "spawn_main" in " ".join(proc.cmdline()):
                    workers.append(proc)
        return workers

    workers = wait_for(lambda: len(spawned_workers()) == 2 and spawned_workers(), 30,
                       "the gateway to spawn its workers")
    os.kill(main.pid, signal.SIGKILL)
    try:
        wait_for(lambda: not alive(workers), 30, "the killed gateway's workers to exit")
    finally:
        end(workers)
    wait_for(lambda: gateway.pid not in (None, main.pid) and healthy(fault_stack.gateway_url),
             60, "the restarted gateway to answer /healthz on its port")
