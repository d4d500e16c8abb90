"""Reads of a job never go backwards, whatever Redis does.

Readers poll jobs through the gateway while the jobs move through many versions (retries,
progress) and Redis is paused (SIGSTOP), paused by command (`CLIENT PAUSE`) and stopped
and restarted. In real-time order, no read may return an older version of a job than a
read that had already returned before it was sent.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass

import pytest
import redis

from tests.support.client import Api

pytestmark = pytest.mark.integration

READERS = 8


@dataclass(frozen=True)
class Read:
    job_id: str
    sent: float
    received: float
    version: int
    status: str


def backwards_reads(reads: list[Read]) -> list[tuple[Read, Read]]:
    """Pairs (earlier, later) where `later` was sent after `earlier` returned, yet saw an
    older version."""
    found = []
    by_job: dict[str, list[Read]] = {}
    for read in reads:
        by_job.setdefault(read.job_id, []).append(read)
    for job_reads in by_job.values():
        done = sorted(job_reads, key=lambda r: r.received)
        ends = [r.received for r in done]
        newest: list[Read] = []  # newest[i]: the highest version among done[:i + 1]
        for read in done:
            newest.append(read if not newest or read.version > newest[-1].version
                          else newest[-1])
        for read in job_reads:
            i = bisect.bisect_left(ends, read.sent)  # reads that returned before it was sent
            if i and newest[i - 1].version > read.version:
                found.append((newest[i - 1], read))
    return found


def test_the_checker_finds_a_read_that_went_backwards():
    reads = [Read("a", 0.0, 1.0, 3, "COMPLETED"), Read("a", 2.0, 3.0, 1, "QUEUED"),
             Read("a", 0.5, 4.0, 1, "QUEUED")]  # the last overlapped the first: allowed
    assert backwards_reads(reads) == [(reads[0], reads[1])]


def test_no_read_returns_an_older_version_than_one_already_returned(api, stack):
    jobs: list[str] = []
    reads: list[Read] = []
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def submitter() -> None:
        """New jobs all along, so that some change state during every outage."""
        client = Api(api.base, api.token)
        n = 0
        while not stop.is_set():
            kind = ("FLAKY", {"failures": 2}) if n % 2 else ("SLEEPY", {"seconds": 0.4})
            reply = client.request("POST", "/jobs", json_body={"job_type": kind[0],
                                                               "payload": kind[1]})
            if reply.status == 202:
                with lock:
                    jobs.append(reply.json["job_id"])
            n += 1
            stop.wait(0.1)

    def reader(offset: int) -> None:
        client = Api(api.base, api.token)
        i = offset
        while not stop.is_set():
            with lock:
                recent = jobs[-24:]
            if not recent:
                stop.wait(0.05)
                continue
            job_id = recent[i % len(recent)]
            i += 1
            sent = time.monotonic()
            reply = client.request("GET", f"/jobs/{job_id}")
            received = time.monotonic()
            with lock:
                if reply.status != 200:
                    errors.append(f"{reply.status} {reply.body[:200]!r}")
                else:
                    doc = reply.json
                    reads.append(Read(job_id, sent, received, doc["version"], doc["status"]))

    threads = [threading.Thread(target=submitter, daemon=True)]
    threads += [threading.Thread(target=reader, args=(n,), daemon=True) for n in range(READERS)]
    for thread in threads:
        thread.start()
    server = stack.services["redis"]
    try:
        for _ in range(3):
            stop.wait(1.0)  # traffic between outages
            server.pause()  # SIGSTOP: every Redis call times out
            stop.wait(1.5)  # the outage itself, not a wait for a result
            server.resume()
            stop.wait(2.5)  # past the breakers' 2 s: Redis is trusted again
            client = redis.Redis.from_url(stack.env["REDIS_URL"], socket_timeout=5)
            client.execute_command("CLIENT", "PAUSE", "1200", "WRITE")
            stop.wait(2.5)
            client.close()
        stack.stop_service("redis")
        stop.wait(1.5)  # the outage
        stack.restart_service("redis")
        stop.wait(3.0)
    finally:
        stop.set()
        server.resume()
        if not server.is_running():
            stack.restart_service("redis")
        for thread in threads:
            thread.join(30)
    assert not errors, errors[:5]
    assert len(reads) > 1000 and len(jobs) > 50, (len(reads), len(jobs))
    assert len({r.version for r in reads}) > 5
    assert backwards_reads(reads) == []
