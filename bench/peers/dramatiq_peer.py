"""Dramatiq: broker and actors (imported by `dramatiq peers.dramatiq_peer`) and the client.

Redis broker, Results middleware with the Redis backend (store_results=True). Failure
path: max_retries=3, min_backoff=0, max_backoff=1 ms, then the message is dead-lettered
(the broker's dead-letter set, <namespace>:<queue>.XQ).
"""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.message import Message
from dramatiq.results import ResultFailure, ResultMissing, Results
from dramatiq.results.backends.redis import RedisBackend
from workloads import RemainingTracker

REDIS_URL = os.environ["BENCH_REDIS_URL"]

broker = RedisBroker(url=REDIS_URL)
backend = RedisBackend(url=REDIS_URL)
broker.add_middleware(Results(backend=backend))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench", store_results=True, max_retries=0)
def noop() -> None:
    return None


@dramatiq.actor(queue_name="bench", store_results=True, max_retries=3, min_backoff=0,
                max_backoff=1)
def always_fail() -> None:
    raise RuntimeError("always fails")


class DramatiqPeer:
    name = "dramatiq"
    completed_state = "done"
    w1_stop = "Redis: EXISTS on the result key of the messages not yet seen"
    w4_stop = "Redis: ZCARD of the dead-letter set dramatiq:bench.XQ"

    def __init__(self) -> None:
        self.client = backend.client
        self._completed = RemainingTracker(self._have_results)
        self.xq = f"{broker.namespace}:bench.XQ"

    def _have_results(self, messages: list[Message]) -> list[bool]:
        with self.client.pipeline(transaction=False) as pipe:
            for message in messages:
                pipe.exists(backend.build_message_key(message))
            return [bool(x) for x in pipe.execute()]

    def describe(self) -> dict[str, Any]:
        return {"config": "--processes 2 --threads 1, Redis broker, Results(RedisBackend)",
                "submit_bulk": "actor.send() in a loop (Dramatiq has no bulk enqueue)",
                "status_lookup": "RedisBackend.get_result(message) of a finished message"}

    def wait_ready(self, deadline: float) -> None:
        # Each worker process's consumer heartbeats into this set once it fetches.
        key = f"{broker.namespace}:__heartbeats__"
        while self.client.zcard(key) < 2:
            if time.perf_counter() > deadline:
                raise TimeoutError("the 2 Dramatiq worker processes did not heartbeat")
            time.sleep(0.05)

    def submit_noop(self) -> Message:
        return noop.send()

    def submit_noop_many(self, n: int) -> list[Message]:
        return [noop.send() for _ in range(n)]

    def submit_failing_many(self, n: int) -> list[Message]:
        return [always_fail.send() for _ in range(n)]

    def completed(self, handles: list[Message]) -> bool:
        return self._completed(handles)

    def dead(self, handles: list[Message]) -> bool:
        return self.client.zcard(self.xq) >= len(handles)

    def count_completed(self, handles: list[Message]) -> int:
        return self._completed.count(handles)

    def count_dead(self, handles: list[Message]) -> int:
        dead = 0
        for message in handles:
            try:
                backend.get_result(message)
            except ResultFailure:
                dead += 1
            except ResultMissing:
                pass
        return dead

    def is_completed(self, handle: Message) -> bool:
        return self.lookup(handle) == "done"

    def lookup(self, handle: Message) -> str:
        try:
            backend.get_result(handle)
        except ResultMissing:
            return "missing"
        except ResultFailure:
            return "failed"
        return "done"

    def close(self) -> None:
        broker.close()


System = DramatiqPeer
