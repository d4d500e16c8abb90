"""The job lifecycle as a state machine, driven through the real code against PostgreSQL.

Hypothesis interleaves submits, deliveries (duplicated or late), successes, retryable and
permanent failures, worker crashes reclaimed by the sweeper, late results of fenced-out
attempts and replays of dead letters. After every step the jobs are read back from
PostgreSQL and checked: every status change is an edge of `TRANSITIONS`, no job completes
twice, attempts and retries stay within the budget, every dead-lettered job has its
dead letter. Only the broker boundary (status cache, publisher) is faked.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse, urlunparse

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from common import deadletters, jobs
from common.db import Database, migrate
from common.errors import ApiError
from common.lifecycle import TRANSITIONS, transition
from common.models import JobStatus, JobSubmission
from common.processing import record_failure
from common.queue import Event
from common.retry import RetryPolicy
from common.settings import Settings
from common.sweeper import reclaim_expired

pytestmark = pytest.mark.integration

S = JobStatus
# No backoff: a RETRYING job is due at once, so the next delivery can claim it.
POLICY = RetryPolicy(max_retries=3, base_seconds=0, max_seconds=0, jitter=0)
SETTINGS = Settings(max_retries=3, backoff_base_seconds=0, backoff_max_seconds=0,
                    backoff_jitter=0)
# Registered nowhere, so the sweeper takes its retry policy from SETTINGS.
JOB_TYPE = "LIFECYCLE_PROBE"
LEASE_SECONDS = 3600.0  # only a forced expiry (the crash rule) ends a lease
FAILURE = "RuntimeError: boom"


class RecordingCache:
    """The status cache, at the broker boundary: remembers what it was given."""

    def __init__(self) -> None:
        self.documents: list[dict[str, Any]] = []

    def put(self, documents: Sequence[dict[str, Any]]) -> bool:
        self.documents.extend(documents)
        return True


class RecordingPublisher:
    """The Kafka publisher, at the broker boundary: remembers the events."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def publish(self, events: Sequence[Event], timeout: float | None = None) -> None:
        self.events.extend(events)


@dataclass
class Job:
    """What the model believes about one job."""

    job_id: str
    max_retries: int
    status: JobStatus = S.QUEUED
    attempts: int = 0
    retries: int = 0
    cycle_start: int = 0  # attempts when the current replay cycle began
    live: int | None = None  # the attempt whose worker owns the job now
    stale: set[int] = field(default_factory=set)  # attempts that may still report, too late
    dead_letters: int = 0  # times dead-lettered


@pytest.fixture(scope="module")
def scratch_db(database_url: str) -> Iterator[Database]:
    """A database of its own on the stack's server, migrated like the real one.

    The stack's sweeper and workers poll the main database; jobs here are out of their
    reach, so only this test moves them.
    """
    name = f"lifecycle_{uuid.uuid4().hex[:12]}"
    admin = Database(database_url)
    admin.run(f"CREATE DATABASE {name}")
    db = Database(urlunparse(urlparse(database_url)._replace(path=f"/{name}")))
    try:
        migrate(db)
        yield db
    finally:
        db.close()
        admin.run(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


class Lifecycle(RuleBasedStateMachine):
    db: Database  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.db.run("TRUNCATE jobs, job_attempts, dead_letters")
        self.jobs: dict[str, Job] = {}
        # The moves this step performed, per job: [from, (through,)* to].
        self.moves: dict[str, list[JobStatus]] = {}
        self.cache = RecordingCache()
        self.publisher = RecordingPublisher()

    # -- helpers --------------------------------------------------------------------

    def _pick(self, data: st.DataObject, jobs_: list[Job]) -> Job:
        return data.draw(st.sampled_from(jobs_), label="job")

    def _in(self, status: JobStatus) -> list[Job]:
        return [j for j in self.jobs.values() if j.status is status]

    def _waiting(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.status in (S.QUEUED, S.RETRYING)]

    def _running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.live is not None]

    def _with_stale(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.stale]

    def _claim(self, job: Job) -> dict[str, Any] | None:
        with self.db.transaction() as conn:
            return jobs.claim(conn, job.job_id, LEASE_SECONDS)

    def _complete(self, job: Job, attempt: int) -> dict[str, Any] | None:
        """What `Processor._complete` does when a handler returned."""
        with self.db.transaction() as conn:
            row = transition(conn, job.job_id, S.COMPLETED, sources=[S.IN_PROGRESS],
                             attempt=attempt,
                             values={"result_json": {"attempt": attempt},
                                     "lease_expires_at": None, "error_message": None})
            if row is not None:
                jobs.finish_attempt(conn, job.job_id, attempt, S.COMPLETED.value, None)
        return row

    def _fail(self, job: Job, attempt: int, permanent: bool
              ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        with self.db.transaction() as conn:
            return record_failure(conn, job.job_id, attempt, FAILURE, POLICY,
                                  permanent=permanent)

    def _failed(self, job: Job, row: dict[str, Any], permanent: bool) -> None:
        """Account for a failure of the live attempt that moved the job on."""
        expected = (S.DEAD_LETTER if permanent or job.retries >= job.max_retries
                    else S.RETRYING)
        assert row["status"] == expected, (job, row["status"], expected)
        self.moves[job.job_id] = [S.IN_PROGRESS, S.FAILED, expected]
        if expected is S.DEAD_LETTER:
            job.dead_letters += 1
        assert job.live is not None
        job.stale.add(job.live)
        job.live = None

    # -- rules ----------------------------------------------------------------------

    @rule(max_retries=st.integers(0, 3))
    def submit(self, max_retries: int) -> None:
        submission = JobSubmission(job_type=JOB_TYPE, payload={"n": len(self.jobs)},
                                   max_retries=max_retries)
        ((row, created),) = jobs.create_jobs(
            self.db, [(submission, submission.payload, None, max_retries,
                       jobs.request_fingerprint(submission))])
        assert created and row["status"] == S.QUEUED
        job_id = str(row["job_id"])
        self.jobs[job_id] = Job(job_id, max_retries)
        self.moves[job_id] = [S.QUEUED]

    @precondition(lambda self: self._waiting())
    @rule(data=st.data(), copies=st.integers(1, 2))
    def deliver(self, data: st.DataObject, copies: int) -> None:
        """A waiting job's message arrives, perhaps twice (at-least-once): one claim wins."""
        job = self._pick(data, self._waiting())
        won = [row for row in (self._claim(job) for _ in range(copies)) if row is not None]
        assert len(won) == 1, (job, copies, won)
        row = won[0]
        assert row["attempts"] == job.attempts + 1, (job, row["attempts"])
        expected_retries = job.retries + (1 if job.status is S.RETRYING else 0)
        assert row["retries"] == expected_retries, (job, row["retries"])
        self.moves[job.job_id] = [job.status, S.IN_PROGRESS]
        job.attempts, job.retries, job.live = row["attempts"], row["retries"], row["attempts"]

    @precondition(lambda self: len(self._waiting()) < len(self.jobs))
    @rule(data=st.data())
    def redeliver(self, data: st.DataObject) -> None:
        """A message for a job that is running or finished (a duplicate, or one the sweeper
        re-sent): ignored, nothing moves."""
        job = self._pick(data, [j for j in self.jobs.values()
                                if j.status not in (S.QUEUED, S.RETRYING)])
        assert self._claim(job) is None, job

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def succeed(self, data: st.DataObject) -> None:
        job = self._pick(data, self._running())
        assert job.live is not None
        row = self._complete(job, job.live)
        assert row is not None and row["status"] == S.COMPLETED, (job, row)
        self.moves[job.job_id] = [S.IN_PROGRESS, S.COMPLETED]
        job.stale.add(job.live)
        job.live = None

    @precondition(lambda self: self._running())
    @rule(data=st.data(), permanent=st.booleans())
    def fail(self, data: st.DataObject, permanent: bool) -> None:
        """The handler raised: RETRYING while retries are left, else (or if permanent)
        DEAD_LETTER with a dead-letter row."""
        job = self._pick(data, self._running())
        assert job.live is not None
        row, letter = self._fail(job, job.live, permanent)
        assert row is not None, job
        assert (letter is not None) == (row["status"] == S.DEAD_LETTER), (row, letter)
        self._failed(job, row, permanent)

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """The worker vanishes: its lease runs out and the sweeper takes the job back."""
        job = self._pick(data, self._running())
        self.db.run("UPDATE jobs SET lease_expires_at = now() - interval '1 second'"
                    " WHERE job_id = CAST(:id AS uuid)", id=job.job_id)
        published = len(self.publisher.events)
        assert reclaim_expired(self.db, self.cache, self.publisher, SETTINGS) == 1, job
        # A second sweeper pass (or a second sweeper) finds nothing more to do.
        assert reclaim_expired(self.db, self.cache, self.publisher, SETTINGS) == 0, job
        rows = self.db.run(
            "SELECT status::text, attempts FROM jobs WHERE job_id = CAST(:id AS uuid)",
            id=job.job_id)
        status, attempts = rows[0]
        letters = self.publisher.events[published:]
        if status == S.DEAD_LETTER:
            assert [e.ce_id for e in letters] == [f"{job.job_id}:{attempts}"], letters
        else:
            assert letters == [], letters
        self._failed(job, {"status": status}, permanent=False)

    @precondition(lambda self: self._with_stale())
    @rule(data=st.data(), outcome=st.sampled_from(["complete", "fail", "fail permanently"]))
    def late_result(self, data: st.DataObject, outcome: str) -> None:
        """A fenced-out attempt (crashed, or already reported) reports: refused, no move."""
        job = self._pick(data, self._with_stale())
        attempt = data.draw(st.sampled_from(sorted(job.stale)), label="attempt")
        if outcome == "complete":
            assert self._complete(job, attempt) is None, (job, attempt)
        else:
            row, letter = self._fail(job, attempt, outcome == "fail permanently")
            assert row is None and letter is None, (job, attempt, row, letter)

    @precondition(lambda self: self._in(S.DEAD_LETTER))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """An operator replays a dead letter: QUEUED again, fresh retry budget, history kept."""
        job = self._pick(data, self._in(S.DEAD_LETTER))
        with self.db.transaction() as conn:
            row = deadletters.replay(conn, job.job_id)
        assert row["status"] == S.QUEUED, (job, row)
        assert row["retries"] == 0 and row["attempts"] == job.attempts, (job, row)
        self.moves[job.job_id] = [S.DEAD_LETTER, S.QUEUED]
        job.retries, job.cycle_start = 0, row["attempts"]

    @precondition(lambda self: len(self._in(S.DEAD_LETTER)) < len(self.jobs))
    @rule(data=st.data())
    def replay_a_job_that_is_not_dead_lettered(self, data: st.DataObject) -> None:
        """Replay of any other job is a 409 and moves nothing."""
        job = self._pick(data, [j for j in self.jobs.values() if j.status is not S.DEAD_LETTER])
        with pytest.raises(ApiError) as refused, self.db.transaction() as conn:
            deadletters.replay(conn, job.job_id)
        assert refused.value.status == 409, (job, refused.value)

    # -- invariants, read back from PostgreSQL -----------------------------------------

    @invariant()
    def every_status_change_is_an_edge_of_the_graph(self) -> None:
        rows = self.db.run("SELECT job_id::text, status::text FROM jobs")
        stored = {job_id: S(status) for job_id, status in rows}
        assert set(stored) == set(self.jobs), "jobs appeared or vanished"
        for job_id, job in self.jobs.items():
            path = self.moves.get(job_id, [job.status])  # a new job starts QUEUED
            assert path[0] == job.status, (job, path)
            for source, target in zip(path, path[1:], strict=False):
                assert target in TRANSITIONS[source], f"{source} -> {target} is not an edge"
            assert stored[job_id] == path[-1], (
                f"job {job_id}: expected {' -> '.join(path)}, PostgreSQL has {stored[job_id]}")
            job.status = stored[job_id]
        self.moves.clear()

    @invariant()
    def attempts_and_retries_stay_within_the_budget(self) -> None:
        rows = self.db.run("SELECT job_id::text, attempts, retries, max_retries FROM jobs")
        for job_id, attempts, retries, max_retries in rows:
            job = self.jobs[job_id]
            assert attempts - job.cycle_start <= max_retries + 1, (job, attempts)
            assert 0 <= retries <= max_retries, (job, retries)
            assert (attempts, retries) == (job.attempts, job.retries), (job, attempts, retries)

    @invariant()
    def every_attempt_has_a_row_and_at_most_one_completed(self) -> None:
        rows = self.db.run(
            "SELECT j.job_id::text, j.status::text, j.attempts, count(a.attempt),"
            " count(*) FILTER (WHERE a.outcome = 'COMPLETED')"
            " FROM jobs j LEFT JOIN job_attempts a ON a.job_id = j.job_id"
            " GROUP BY j.job_id, j.status, j.attempts")
        for job_id, status, attempts, attempt_rows, completed in rows:
            assert attempt_rows == attempts, (job_id, attempts, attempt_rows)
            assert completed <= 1, f"job {job_id} has {completed} COMPLETED attempts"
            assert (completed == 1) == (status == S.COMPLETED), (job_id, status, completed)

    @invariant()
    def every_dead_lettered_job_has_its_dead_letter(self) -> None:
        rows = self.db.run(
            "SELECT j.job_id::text, j.status::text, j.attempts,"
            " (SELECT count(*) FROM dead_letters d WHERE d.job_id = j.job_id),"
            " EXISTS (SELECT 1 FROM dead_letters d WHERE d.replayed_at IS NULL"
            "         AND d.dead_letter_id = j.job_id::text || ':' || j.attempts)"
            " FROM jobs j")
        for job_id, status, _attempts, letters, current in rows:
            assert letters == self.jobs[job_id].dead_letters, (self.jobs[job_id], letters)
            if status == S.DEAD_LETTER:
                assert current, f"DEAD_LETTER job {job_id} has no open dead letter"

    @invariant()
    def only_a_running_job_holds_a_lease(self) -> None:
        rows = self.db.run("SELECT job_id::text, status::text, lease_expires_at IS NOT NULL"
                           " FROM jobs")
        for job_id, status, leased in rows:
            assert leased == (status == S.IN_PROGRESS), (job_id, status, leased)


def test_the_job_lifecycle_keeps_its_invariants_under_any_interleaving(scratch_db: Database):
    Lifecycle.db = scratch_db
    run_state_machine_as_test(Lifecycle, settings=settings(
        max_examples=30, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))
