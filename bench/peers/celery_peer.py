"""Celery: tasks (imported by `celery -A peers.celery_peer worker`) and the bench client.

Redis broker and Redis result backend, JSON, Celery's defaults otherwise (acks early,
prefetch multiplier 4). Failure path: autoretry_for=Exception, max_retries=3, countdown 0,
then the task is FAILURE in the result backend.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from workloads import RemainingTracker

REDIS_URL = os.environ["BENCH_REDIS_URL"]

app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"],
    broker_connection_retry_on_startup=True, result_expires=3600,
    worker_hijack_root_logger=False, broker_pool_limit=16,
)


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.always_fail", bind=True, autoretry_for=(RuntimeError,), max_retries=3,
          retry_backoff=False, retry_jitter=False, default_retry_delay=0,
          retry_kwargs={"countdown": 0})
def always_fail(self: Any) -> None:
    raise RuntimeError(f"always fails (retry {self.request.retries})")


class CeleryPeer:
    name = "celery"
    completed_state = "SUCCESS"
    w1_stop = "Redis: MGET celery-task-meta-<id> of the jobs not yet seen, status SUCCESS"
    w4_stop = "Redis: MGET celery-task-meta-<id> of the jobs not yet seen, status FAILURE"

    def __init__(self) -> None:
        self.client = app.backend.client
        self._completed = RemainingTracker(lambda ids: self._states(ids, "SUCCESS"))
        self._dead = RemainingTracker(lambda ids: self._states(ids, "FAILURE"))

    def _states(self, ids: list[str], want: str) -> list[bool]:
        metas = self.client.mget([app.backend.get_key_for_task(i) for i in ids])
        return [m is not None and json.loads(m)["status"] == want for m in metas]

    def describe(self) -> dict[str, Any]:
        return {"config": "prefork --concurrency 2, Redis broker + Redis result backend, "
                          "acks early, prefetch multiplier 4",
                "submit_bulk": "apply_async() in a loop (Celery has no bulk enqueue)",
                "status_lookup": "AsyncResult(id).state + .result"}

    def wait_ready(self, deadline: float) -> None:
        while not app.control.ping(timeout=0.5):
            if time.perf_counter() > deadline:
                raise TimeoutError("no Celery worker answered ping")

    def submit_noop(self) -> str:
        return noop.apply_async().id  # type: ignore[no-any-return]

    def submit_noop_many(self, n: int) -> list[str]:
        return [noop.apply_async().id for _ in range(n)]

    def submit_failing_many(self, n: int) -> list[str]:
        return [always_fail.apply_async().id for _ in range(n)]

    def completed(self, handles: list[str]) -> bool:
        return self._completed(handles)

    def dead(self, handles: list[str]) -> bool:
        return self._dead(handles)

    def count_completed(self, handles: list[str]) -> int:
        return self._completed.count(handles)

    def count_dead(self, handles: list[str]) -> int:
        return self._dead.count(handles)

    def is_completed(self, handle: str) -> bool:
        return AsyncResult(handle, app=app).state == "SUCCESS"  # type: ignore[no-any-return]

    def lookup(self, handle: str) -> str:
        result = AsyncResult(handle, app=app)
        state = result.state
        result.result  # noqa: B018 - the result read of a status lookup (cached once ready)
        return state  # type: ignore[no-any-return]

    def close(self) -> None:
        app.close()


System = CeleryPeer
