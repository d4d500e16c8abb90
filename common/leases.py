"""The attempts running in one `process` instance: their leases, cancel requests, progress."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from common import jobs
from common.db import Database
from common.errors import ServiceUnavailable
from common.handlers import JobContext
from common.settings import Settings

log = logging.getLogger(__name__)
ENDED_REMEMBERED = 10_000  # attempts that ended, kept until their claim's cache write


class Leases:
    """Keeps the leases of this process's running attempts alive and passes cancel
    requests on to their handlers; writes their progress reports.

    A dead or frozen process stops beating, and the sweeper takes its jobs back once
    their lease runs out. Renewals and progress use a pool of their own: a handler
    holding a connection of the main pool (DATA_EXPORT streams inside one) must never
    wait for another to report progress, and a busy pool must never starve the heartbeat
    (a missed renewal hands a running job to the sweeper).
    """

    def __init__(self, settings: Settings, db: Database,
                 on_progress: Callable[[dict[str, Any]], None]) -> None:
        self.settings = settings
        self.db = Database(db.dsn, size=2, wait=db.wait)
        self._on_progress = on_progress
        # job id -> (attempt, context) of the running attempts
        self._running: dict[str, tuple[int, JobContext]] = {}
        # job id -> attempt of attempts that just ended (see `still_running`)
        self._ended: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def track(self, job_id: str, attempt: int, ctx: JobContext) -> None:
        """An attempt started: keep its lease alive until `release`."""
        with self._lock:
            self._running[job_id] = (attempt, ctx)
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="lease-heartbeat",
                                                daemon=True)
                self._thread.start()

    def release(self, job_id: str, attempt: int) -> None:
        """The attempt's handler is done (its outcome is about to be written)."""
        with self._lock:
            self._running.pop(job_id, None)
            self._ended[job_id] = attempt
            if len(self._ended) > ENDED_REMEMBERED:  # those whose claim was cached already
                self._ended.popitem(last=False)

    def still_running(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The claimed rows whose attempt has not ended yet: an ended one's IN_PROGRESS
        need not be cached (its outcome's write says more)."""
        with self._lock:
            return [row for row in rows
                    if self._ended.pop(str(row["job_id"]), None) != row["attempts"]]

    def progress(self, job_id: str, attempt: int, fraction: float, text: str | None) -> None:
        """A handler's progress report: best effort (the outcome is not)."""
        try:
            with self.db.transaction() as conn:
                row = jobs.record_progress(conn, job_id, attempt, fraction, text)
        except ServiceUnavailable as exc:
            log.warning("progress of job %s not recorded: %s", job_id, exc)
            return
        if row is not None:
            self._on_progress(row)

    def _beat(self) -> None:
        renew_every = self.settings.lease_seconds / 3
        last_renewal = time.monotonic()
        while True:
            time.sleep(min(self.settings.cancel_check_seconds, renew_every))
            with self._lock:
                running = dict(self._running)
            if not running:
                continue
            renew = time.monotonic() - last_renewal >= renew_every
            try:
                rows = self.db.run(
                    "UPDATE jobs SET lease_expires_at = CASE WHEN :renew THEN"
                    " now() + make_interval(secs => :lease) ELSE lease_expires_at END"
                    " FROM unnest(CAST(:ids AS uuid[]), CAST(:ns AS int[])) AS r(id, n)"
                    " WHERE jobs.job_id = r.id AND jobs.attempts = r.n"
                    " AND jobs.status = 'IN_PROGRESS'"
                    " AND (:renew OR jobs.cancel_requested_at IS NOT NULL)"
                    " RETURNING jobs.job_id::text, jobs.cancel_requested_at IS NOT NULL",
                    renew=renew, lease=self.settings.lease_seconds, ids=list(running),
                    ns=[attempt for attempt, _ in running.values()])
            except Exception as exc:  # PostgreSQL down: the outcome writer retries anyway
                log.warning("lease heartbeat failed: %s", exc)
                continue
            if renew:
                last_renewal = time.monotonic()
            for job_id, cancel in rows:
                if cancel and job_id in running:
                    running[job_id][1].request_stop("cancelled")
