"""RQ: job functions (imported by `rq worker` from the queue's records) and the bench client.

Two `rq worker --worker-class SimpleWorker` processes on the queue "bench". Failure path:
Retry(max=3, interval=0), then the job is in the queue's FailedJobRegistry.
"""

from __future__ import annotations

import os
import time
from typing import Any

from redis import Redis
from rq import Queue, Retry, Worker
from rq.job import Job, JobStatus
from workloads import RemainingTracker

REDIS_URL = os.environ["BENCH_REDIS_URL"]
RESULT_TTL = 3600


def noop() -> None:
    return None


def always_fail() -> None:
    raise RuntimeError("always fails")


class RqPeer:
    name = "rq"
    completed_state = JobStatus.FINISHED
    w1_stop = "Redis: HGET rq:job:<id> status of the jobs not yet seen, 'finished'"
    w4_stop = "Redis: ZCARD of the queue's FailedJobRegistry"

    def __init__(self) -> None:
        self.redis = Redis.from_url(REDIS_URL)
        self.queue = Queue("bench", connection=self.redis)
        self._completed = RemainingTracker(lambda ids: self._states(ids, "finished"))
        self._dead_tracker = RemainingTracker(lambda ids: self._states(ids, "failed"))

    def _states(self, ids: list[str], want: str) -> list[bool]:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(f"rq:job:{job_id}", "status")
            return [s is not None and s.decode() == want for s in pipe.execute()]

    def describe(self) -> dict[str, Any]:
        return {"config": "2 x rq worker --worker-class SimpleWorker, queue 'bench'",
                "submit_bulk": "Queue.enqueue_many (one pipeline)",
                "status_lookup": "Job.fetch(id).get_status()"}

    def wait_ready(self, deadline: float) -> None:
        while len(Worker.all(queue=self.queue)) < 2:
            if time.perf_counter() > deadline:
                raise TimeoutError("the 2 RQ workers did not register")
            time.sleep(0.05)

    def submit_noop(self) -> str:
        return self.queue.enqueue(noop, result_ttl=RESULT_TTL).id

    def submit_noop_many(self, n: int) -> list[str]:
        data = [Queue.prepare_data(noop, result_ttl=RESULT_TTL) for _ in range(n)]
        return [job.id for job in self.queue.enqueue_many(data)]

    def submit_failing_many(self, n: int) -> list[str]:
        data = [Queue.prepare_data(always_fail, retry=Retry(max=3, interval=0))
                for _ in range(n)]
        return [job.id for job in self.queue.enqueue_many(data)]

    def completed(self, handles: list[str]) -> bool:
        return self._completed(handles)

    def dead(self, handles: list[str]) -> bool:
        return self.redis.zcard(self.queue.failed_job_registry.key) >= len(handles)

    def count_completed(self, handles: list[str]) -> int:
        return self._completed.count(handles)

    def count_dead(self, handles: list[str]) -> int:
        return self._dead_tracker.count(handles)

    def is_completed(self, handle: str) -> bool:
        return self.lookup(handle) == JobStatus.FINISHED

    def lookup(self, handle: str) -> str:
        return Job.fetch(handle, connection=self.redis).get_status()  # type: ignore[return-value]

    def close(self) -> None:
        self.redis.close()


System = RqPeer
