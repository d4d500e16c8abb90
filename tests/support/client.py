"""A small HTTP client for the tests, and polling with a deadline (never sleep-and-hope)."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import urllib3

T = TypeVar("T")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0]


class Api:
    """The public API through the gateway, as the holder of `token` (None: no header)."""

    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.token = token
        # GETs are retried once when a kept-alive connection was closed under us, as any
        # HTTP client does; POSTs never, so the tests see exactly what they sent.
        retries = urllib3.Retry(total=1, connect=1, read=1, redirect=0, status=0, other=0,
                                allowed_methods=frozenset({"GET"}), raise_on_status=False)
        self.http = urllib3.PoolManager(maxsize=32, retries=retries,
                                        timeout=urllib3.Timeout(connect=5, read=30))

    def request(self, method: str, path: str, *, json_body: Any = None, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        hdrs = dict(headers or {})
        if self.token is not None:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        r = self.http.request(method, self.base + path, body=body, headers=hdrs)
        return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.data)

    def submit(self, job_type: str, payload: dict[str, Any] | None = None, **extra: Any) -> Reply:
        return self.request("POST", "/jobs",
                            json_body={"job_type": job_type, "payload": payload or {}, **extra})

    def job(self, job_id: str) -> dict[str, Any]:
        reply = self.request("GET", f"/jobs/{job_id}")
        assert reply.status == 200, reply.body
        return reply.json  # type: ignore[no-any-return]

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 30) -> dict[str, Any]:
        """Poll the job until it reaches one of `statuses` (default: a terminal one)."""
        wanted = statuses or ("COMPLETED", "DEAD_LETTER")
        return wait_for(lambda: (doc := self.job(job_id))["status"] in wanted and doc,
                        timeout, f"job {job_id} to reach {wanted}")


def wait_for(predicate: Callable[[], T], timeout: float = 30, what: str = "condition",
             interval: float = 0.05) -> T:
    """Call `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def in_thread(call: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
    """`call(*args, **kwargs)` in a daemon thread: if the code under test hangs, the test
    fails at its deadline and the test process can still exit."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(call(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def healthy(url: str) -> bool:
    """Whether the gateway at `url` answers /healthz with 200 now."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
