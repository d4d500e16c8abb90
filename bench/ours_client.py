"""Our system as the workloads see it: only the public HTTP API, through the gateway.

Standard library only (http.client, one keep-alive connection per thread), so the client
costs the same as the peers' (redis-py) clients and nothing of our code runs client-side.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

from workloads import chunks

NOT_COMPLETED = "QUEUED,IN_PROGRESS,FAILED,RETRYING,DEAD_LETTER,CANCELLED"
NOT_DEAD = "QUEUED,IN_PROGRESS,FAILED,RETRYING,COMPLETED,CANCELLED"
BATCH = 1000  # POST /jobs/batch takes up to 1,000 jobs


class ApiError(RuntimeError):
    pass


class Ours:
    name = "ours"
    completed_state = "COMPLETED"
    w1_stop = ("API: GET /jobs?status=<every state but COMPLETED>&job_type=NOOP&limit=1 "
               "answers no item (polled after every job was accepted)")
    w4_stop = ("API: GET /jobs?status=<every state but DEAD_LETTER>&job_type=ALWAYS_FAIL"
               "&limit=1 answers no item")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._local = threading.local()
        token = os.environ.get("JOBS_TOKEN")
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}

    # -- HTTP ------------------------------------------------------------------------------

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            self._local.conn = conn
        return conn

    def request(self, method: str, path: str, body: Any = None,
                expect: tuple[int, ...] = (200,)) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self._auth)
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):  # a keep-alive connection the server closed: reconnect once
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.CannotSendRequest):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        if response.status not in expect:
            raise ApiError(f"{method} {path}: {response.status} {payload[:300]!r}")
        return json.loads(payload) if payload else None

    # -- the interface of bench/workloads.py -----------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {"client": "http.client, keep-alive, through the gateway",
                "submit_bulk": "POST /jobs/batch (1,000 jobs per request)"}

    def wait_ready(self, deadline: float) -> None:
        while True:
            try:
                if self.request("GET", "/readyz", expect=(200, 503))["ready"]:
                    return
            except (OSError, ApiError, http.client.HTTPException):
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError("our gateway's /readyz never said ready")
            time.sleep(0.1)

    def submit_noop(self) -> str:
        doc = self.request("POST", "/jobs", {"job_type": "NOOP", "payload": {}}, expect=(202,))
        return doc["job_id"]  # type: ignore[no-any-return]

    def _submit_many(self, job_type: str, n: int) -> list[str]:
        ids: list[str] = []
        for part in chunks(list(range(n)), BATCH):
            body = {"jobs": [{"job_type": job_type, "payload": {}} for _ in part]}
            ids += [d["job_id"] for d in self.request("POST", "/jobs/batch", body,
                                                      expect=(202,))["jobs"]]
        return ids

    def submit_noop_many(self, n: int) -> list[str]:
        return self._submit_many("NOOP", n)

    def submit_failing_many(self, n: int) -> list[str]:
        return self._submit_many("ALWAYS_FAIL", n)

    def _none_in(self, statuses: str, job_type: str) -> bool:
        query = urlencode({"status": statuses, "job_type": job_type, "limit": 1})
        return not self.request("GET", f"/jobs?{query}")["items"]

    def completed(self, handles: list[str]) -> bool:
        return self._none_in(NOT_COMPLETED, "NOOP")

    def dead(self, handles: list[str]) -> bool:
        return self._none_in(NOT_DEAD, "ALWAYS_FAIL")

    def _count_listed(self, handles: list[str], status: str, job_type: str) -> int:
        """Page through GET /jobs?status=&job_type= and count how many of handles it lists."""
        wanted, seen, cursor = set(handles), 0, None
        while True:
            query = {"status": status, "job_type": job_type, "limit": 200}
            if cursor:
                query["cursor"] = cursor
            page = self.request("GET", f"/jobs?{urlencode(query)}")
            seen += sum(1 for item in page["items"] if item["job_id"] in wanted)
            cursor = page.get("next_cursor")
            if not cursor:
                return seen

    def count_completed(self, handles: list[str]) -> int:
        return self._count_listed(handles, "COMPLETED", "NOOP")

    def count_dead(self, handles: list[str]) -> int:
        return self._count_listed(handles, "DEAD_LETTER", "ALWAYS_FAIL")

    def is_completed(self, handle: str) -> bool:
        return self.lookup(handle) == "COMPLETED"

    def lookup(self, handle: str) -> str:
        return self.request("GET", f"/jobs/{handle}")["status"]  # type: ignore[no-any-return]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
