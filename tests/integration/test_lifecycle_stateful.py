"""The job lifecycle as a state machine, driven through the production code on PostgreSQL.

Jobs run the way `process` runs them: two `Processor`s (two workers) take batches of job
messages with `handle_batch`, which claims them in one `jobs.claim_many_sql` statement
through the claims' group commit, runs the handlers of a job type registered with
`@job_handler`, completes with `jobs.complete_many_sql` and records failures with
`record_failures`, both through the outcome group commit. The handler of that type blocks
until the test says how its attempt ends, so deliveries stay running while other rules act.

Hypothesis interleaves submits, deliveries of batches (a job twice in one batch, or to both
workers at once), handlers that return, raise or raise a PermanentError, workers that vanish
(their lease runs out and the sweeper's `reclaim_expired` takes the job back) and wake up
later to report, outcomes written again through the production writer, cancels of waiting
and running jobs (`api.cancel`, told to the handler by the worker's heartbeat) and replays
of dead letters. After every step PostgreSQL is read back: a trigger in the scratch database
logs every status change, and each must be an edge of `TRANSITIONS` and exactly the move the
model expects (a late or duplicate outcome moves nothing); no job completes twice; every
attempt has its row with the right outcome and ran its handler exactly once; attempts and
retries stay within the budget; every dead letter has its row and one DLQ message; Redis
holds exactly the final documents, at their PostgreSQL version. Only the Kafka publisher is
faked (it records what would be sent).
"""

from __future__ import annotations

import concurrent.futures
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse, urlunparse

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from common import api, deadletters, jobs
from common import settings as settings_module
from common.cache import FINAL_STATES, StatusCache, cache_key
from common.db import Database, migrate
from common.errors import ApiError, PermanentError
from common.handlers import JobContext, get_job_type, job_handler
from common.lifecycle import TRANSITIONS
from common.models import JobMessage, JobStatus, JobSubmission
from common.outcomes import Failure, Outcome, policy_for, record_failures
from common.processing import Processor
from common.queue import Event
from common.settings import Settings
from common.sweeper import reclaim_expired
from tests.support.client import in_thread

pytestmark = pytest.mark.integration

S = JobStatus
JOB_TYPE = "LIFECYCLE_PROBE"
LEASE_SECONDS = 3600.0  # only a forced expiry (the crash rule) ends a lease
HANDLER_LIMIT = 120.0  # the type's time limit: far past any step, so it never fires here
WAIT = 15.0  # deadline of every wait for a thread of the system under test
# Tables that reference jobs (migration 0008): truncated with it
DEPENDENT_TABLES = "job_dependencies, job_settlements, job_callbacks, job_callback_attempts"
# No backoff: a RETRYING job is due at once, so the next delivery can claim it.
SETTINGS = Settings(max_retries=3, backoff_base_seconds=0, backoff_max_seconds=0,
                    backoff_jitter=0, lease_seconds=LEASE_SECONDS,
                    handler_timeout_seconds=HANDLER_LIMIT)
ORDERS = ("return", "raise", "raise permanently")
WORKERS = (0, 1)
STEPS = 40  # per example

# The trigger is the test's witness: it logs every status change PostgreSQL applied,
# whatever statement made it.
STATUS_LOG = """
CREATE TABLE status_changes (
    seq bigserial PRIMARY KEY, job_id uuid NOT NULL, source job_status, target job_status);
CREATE FUNCTION log_status_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO status_changes (job_id, source, target)
    VALUES (NEW.job_id, OLD.status, NEW.status);
    RETURN NEW;
END $$;
CREATE TRIGGER status_changes AFTER UPDATE OF status ON jobs FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION log_status_change();
"""


@dataclass
class Attempt:
    """One run of the probe handler: started, then told how to end."""

    ctx: JobContext
    runs: int = 0
    order: str | None = None
    ordered: threading.Event = field(default_factory=threading.Event)


class Script:
    """What the probe handlers were told, and what they did."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.attempts: dict[tuple[str, int], Attempt] = {}
        self.closed = False  # after `release_all`: every handler fails at once

    def reset(self) -> None:
        with self.cond:
            self.attempts = {}
            self.closed = False

    def run(self, ctx: JobContext) -> dict[str, Any]:
        key = (str(ctx.job_id), ctx.attempt)
        with self.cond:
            attempt = self.attempts.setdefault(key, Attempt(ctx))
            attempt.runs += 1
            if self.closed:
                attempt.order = "raise"
                attempt.ordered.set()
            self.cond.notify_all()
        if not attempt.ordered.wait(HANDLER_LIMIT):
            raise RuntimeError("never told how to end")
        if attempt.order == "return":
            return {"attempt": ctx.attempt}
        if attempt.order == "raise permanently":
            raise PermanentError(f"probe failed for good on attempt {ctx.attempt}")
        raise RuntimeError(f"probe failed on attempt {ctx.attempt}")

    def wait_started(self, keys: list[tuple[str, int]]) -> None:
        with self.cond:
            started = self.cond.wait_for(lambda: all(k in self.attempts for k in keys), WAIT)
        assert started, f"handlers of {[k for k in keys if k not in self.attempts]} never ran"

    def started(self, job_id: str) -> dict[int, int]:
        """Attempt -> how many times its handler ran."""
        with self.cond:
            return {n: a.runs for (j, n), a in self.attempts.items() if j == job_id}

    def get(self, job_id: str, attempt: int) -> Attempt:
        with self.cond:
            return self.attempts[(job_id, attempt)]

    def order(self, job_id: str, attempt: int, order: str) -> None:
        slot = self.get(job_id, attempt)
        slot.order = order
        slot.ordered.set()

    def release_all(self) -> None:
        with self.cond:
            self.closed = True
            slots = list(self.attempts.values())
        for slot in slots:
            if slot.order is None:
                slot.order = "raise"
            slot.ordered.set()


SCRIPT = Script()


@job_handler(JOB_TYPE, timeout_seconds=HANDLER_LIMIT)
def lifecycle_probe(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    """End the attempt as the state machine orders (return, raise, raise permanently)."""
    return SCRIPT.run(ctx)




class RecordingPublisher:
    """The Kafka publisher, at the broker boundary: remembers the events."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def publish(self, events: Sequence[Event], timeout: float | None = None) -> None:
        with self._lock:
            self.events.extend(events)

    def since(self, mark: int) -> list[Event]:
        with self._lock:
            return self.events[mark:]


@dataclass
class Job:
    """What the model believes about one job."""

    job_id: str
    max_retries: int
    status: JobStatus = S.QUEUED
    attempts: int = 0
    retries: int = 0
    cycle_start: int = 0  # attempts when the current replay cycle began
    live: int | None = None  # the attempt that owns the job now
    outcomes: dict[int, str | None] = field(default_factory=dict)  # per attempt, None: running
    dead_letters: int = 0
    cancel_requested: bool = False


@dataclass
class Delivery:
    """A `handle_batch` call still running: its handlers wait for their orders."""

    workers: frozenset[int]  # where its handlers may wait (either, if both were sent it)
    messages: list[str]  # job ids, in the order delivered
    attempts: dict[str, int]  # job id -> the attempt this call runs
    future: concurrent.futures.Future[list[Any]]


@pytest.fixture(scope="module")
def scratch_url(database_url: str) -> Iterator[str]:
    """A database of its own on the stack's server, migrated like the real one, with the
    status-change log. The stack's sweeper and workers poll the main database; jobs here
    are out of their reach, so only this test moves them."""
    name = f"lifecycle_{uuid.uuid4().hex[:12]}"
    admin = Database(database_url)
    admin.run(f"CREATE DATABASE {name}")
    url = urlunparse(urlparse(database_url)._replace(path=f"/{name}"))
    db = Database(url)
    try:
        migrate(db)
        with db.connection() as conn:
            conn.execute_simple(STATUS_LOG)
        yield url
    finally:
        db.close()
        admin.run(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


class Lifecycle(RuleBasedStateMachine):
    # set by the test
    db: Database
    workers: list[Processor]
    publisher: RecordingPublisher
    redis: redis.Redis

    def __init__(self) -> None:
        super().__init__()
        self.db.run("TRUNCATE jobs, job_attempts, dead_letters, cache_repairs, status_changes,"
                    f" {DEPENDENT_TABLES} RESTART IDENTITY")
        SCRIPT.reset()
        with self.publisher._lock:
            self.publisher.events.clear()
        self.jobs: dict[str, Job] = {}
        self.deliveries: list[Delivery] = []
        # The moves this step should make, per job: [from, (through,)* to].
        self.moves: dict[str, list[JobStatus]] = {}
        self.logged = 0  # status_changes seen so far

    def teardown(self) -> None:
        SCRIPT.release_all()
        concurrent.futures.wait([d.future for d in self.deliveries], WAIT)

    # -- helpers --------------------------------------------------------------------

    def _pick(self, data: st.DataObject, jobs_: list[Job]) -> Job:
        return data.draw(st.sampled_from(jobs_), label="job")

    def _in(self, *statuses: JobStatus) -> list[Job]:
        return [j for j in self.jobs.values() if j.status in statuses]

    def _running(self) -> list[Job]:
        return [j for j in self.jobs.values() if j.live is not None]

    def _held(self, worker: int) -> set[str]:
        """Jobs with a handler waiting in `worker` (a worker runs one attempt of a job at a
        time: its heartbeat knows one attempt per job)."""
        return {job_id for d in self.deliveries if worker in d.workers for job_id in d.attempts}

    def _deliverable(self, worker: int) -> list[Job]:
        held = self._held(worker)
        return [j for j in self._in(S.QUEUED, S.RETRYING) if j.job_id not in held]

    def _replayable(self) -> list[Job]:
        return [j for j in self.jobs.values()
                if j.status is not S.DEAD_LETTER or not j.cancel_requested]

    def _messages(self, job_ids: list[str]) -> list[JobMessage]:
        return [JobMessage(job_id=uuid.UUID(j), job_type=JOB_TYPE) for j in job_ids]

    def _move(self, job: Job, *path: JobStatus) -> None:
        """The model's job moves along `path` in this step (checked against the log)."""
        self.moves.setdefault(job.job_id, [job.status]).extend(path)
        job.status = path[-1]

    def _claimed(self, job: Job) -> int:
        """Account for the claim of `job` by a delivery; returns its attempt."""
        if job.status is S.RETRYING:
            job.retries += 1
        self._move(job, S.IN_PROGRESS)
        job.attempts += 1
        job.live = job.attempts
        job.outcomes[job.attempts] = None
        return job.attempts

    def _failed(self, job: Job, permanent: bool) -> tuple[str, JobStatus]:
        """Account for a failure of the live attempt: (outcome, status) it must lead to."""
        dead = permanent or job.retries >= job.max_retries
        target = S.DEAD_LETTER if dead else S.RETRYING
        self._move(job, S.FAILED, target)
        assert job.live is not None
        job.outcomes[job.live] = "FAILED"
        job.live = None
        if dead:
            job.dead_letters += 1
        return ("dead_lettered" if dead else "retrying"), target

    # -- rules ----------------------------------------------------------------------

    @rule(max_retries=st.integers(0, 3))
    def submit(self, max_retries: int) -> None:
        """What `submit` does: one insert through the group commit."""
        submission = JobSubmission(job_type=JOB_TYPE, payload={"n": len(self.jobs)},
                                   max_retries=max_retries)
        ((row, created),) = jobs.create_jobs(
            self.db, [(submission, submission.payload, None, max_retries,
                       jobs.request_fingerprint(submission))],
            writer=self.workers[0].outcomes.writer)
        assert created and row["status"] == S.QUEUED
        self.jobs[str(row["job_id"])] = Job(str(row["job_id"]), max_retries)

    @precondition(lambda self: any(self._deliverable(w) for w in WORKERS))
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        """A batch of messages reaches a worker, perhaps with a job twice in it: one claim
        statement takes every waiting job once and their handlers start."""
        worker = data.draw(st.sampled_from([w for w in WORKERS if self._deliverable(w)]),
                           label="worker")
        chosen = data.draw(st.lists(st.sampled_from(self._deliverable(worker)), min_size=1,
                                    max_size=3, unique_by=lambda j: j.job_id), label="jobs")
        twice = data.draw(st.lists(st.sampled_from(chosen), max_size=2,
                                   unique_by=lambda j: j.job_id), label="sent twice")
        ids = data.draw(st.permutations([j.job_id for j in chosen + twice]), label="order")
        attempts = {job.job_id: self._claimed(job) for job in chosen}
        future = in_thread(self.workers[worker].handle_batch, self._messages(ids))
        self.deliveries.append(Delivery(frozenset({worker}), ids, attempts, future))
        SCRIPT.wait_started(list(attempts.items()))

    @precondition(lambda self: [j for j in self._deliverable(0) if j in self._deliverable(1)])
    @rule(data=st.data())
    def deliver_to_both_workers_at_once(self, data: st.DataObject) -> None:
        """The same message reaches both workers at once: one claims it, the other answers
        `ignored` at once and runs nothing."""
        job = self._pick(data, [j for j in self._deliverable(0) if j in self._deliverable(1)])
        attempt = self._claimed(job)
        futures = [in_thread(self.workers[w].handle_batch, self._messages([job.job_id]))
                   for w in WORKERS]
        SCRIPT.wait_started([(job.job_id, attempt)])
        done, running = concurrent.futures.wait(futures, WAIT, concurrent.futures.FIRST_COMPLETED)
        assert len(done) == 1 and len(running) == 1, (job, done, running)
        [loser], [winner] = done, running
        [answer] = loser.result()
        assert (answer.outcome, answer.status) == ("ignored", "IN_PROGRESS"), answer
        # Which worker won is a race: the model counts the handler as waiting in both, so
        # that what hypothesis draws next does not depend on it.
        self.deliveries.append(Delivery(frozenset(WORKERS), [job.job_id],
                                        {job.job_id: attempt}, winner))

    @precondition(lambda self: len(self._in(S.QUEUED, S.RETRYING)) < len(self.jobs))
    @rule(data=st.data(), worker=st.sampled_from(WORKERS))
    def redeliver(self, data: st.DataObject, worker: int) -> None:
        """A message for a job that is running or has ended (a duplicate, or one the sweeper
        re-sent): answered `ignored` with the job's status, nothing runs or moves."""
        job = self._pick(data, [j for j in self.jobs.values()
                                if j.status not in (S.QUEUED, S.RETRYING)])
        before = SCRIPT.started(job.job_id)
        [answer] = self.workers[worker].handle_batch(self._messages([job.job_id]))
        assert (answer.outcome, answer.status) == ("ignored", job.status.value), (job, answer)
        assert SCRIPT.started(job.job_id) == before, job

    @precondition(lambda self: self.deliveries)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        """Every handler of a running delivery ends as drawn; the worker records the
        completions in one statement and the failures in one transaction. An attempt that
        lost its job meanwhile (its lease expired) is fenced out: `ignored`, nothing moves."""
        delivery = data.draw(st.sampled_from(self.deliveries), label="delivery")
        published = len(self.publisher.events)
        expected: dict[str, tuple[str, str | None]] = {}
        events: set[str] = set()
        for job_id, attempt in delivery.attempts.items():
            job = self.jobs[job_id]
            label = f"order for job {list(self.jobs).index(job_id)}"
            live = job.live == attempt
            if live and job.cancel_requested:
                # The worker's heartbeat passes the cancel request on to the handler.
                ctx = SCRIPT.get(job_id, attempt).ctx
                assert ctx.cancelled.wait(WAIT), f"attempt {attempt} of {job} never told to stop"
                order = data.draw(st.sampled_from(ORDERS[1:]), label=label)
            else:
                order = data.draw(st.sampled_from(ORDERS), label=label)
            SCRIPT.order(job_id, attempt, order)
            if not live:
                expected[job_id] = ("ignored", None)
            elif job.cancel_requested:
                self._move(job, S.CANCELLED)
                job.outcomes[attempt], job.live = "CANCELLED", None
                expected[job_id] = ("cancelled", S.CANCELLED.value)
            elif order == "return":
                self._move(job, S.COMPLETED)
                job.outcomes[attempt], job.live = "COMPLETED", None
                expected[job_id] = ("completed", S.COMPLETED.value)
            else:
                retries = job.retries
                outcome, target = self._failed(job, order == "raise permanently")
                expected[job_id] = (outcome, target.value)
                # Dead letters go to the DLQ topic; a retry without backoff to the queue.
                events.add(f"{job_id}:{attempt}" if target is S.DEAD_LETTER
                           else f"{job_id}:retry-{retries + 1}")
        answers: list[Outcome] = delivery.future.result(timeout=WAIT)
        self.deliveries.remove(delivery)
        seen: set[str] = set()
        for job_id, answer in zip(delivery.messages, answers, strict=True):
            want = expected[job_id] if job_id not in seen else ("ignored", "IN_PROGRESS")
            seen.add(job_id)
            assert (answer.outcome, answer.status) == want, (job_id, answer, want)
        assert {e.ce_id for e in self.publisher.since(published)} == events

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        """The worker vanishes: its lease runs out and the sweeper takes the job back; the
        attempt counts (a job asked to stop ends CANCELLED, as its worker would have ended
        it). Its handler is still waiting, to report later (and be fenced out)."""
        job = self._pick(data, self._running())
        self.db.run("UPDATE jobs SET lease_expires_at = now() - interval '1 second'"
                    " WHERE job_id = CAST(:id AS uuid)", id=job.job_id)
        published = len(self.publisher.events)
        cache = self.workers[0].cache
        assert reclaim_expired(self.db, cache, self.publisher, SETTINGS) == 1, job
        # A second sweeper pass (or a second sweeper) finds nothing more to do.
        assert reclaim_expired(self.db, cache, self.publisher, SETTINGS) == 0, job
        attempt = job.live
        if job.cancel_requested:
            self._move(job, S.CANCELLED)
            job.outcomes[attempt], job.live, target = "CANCELLED", None, S.CANCELLED
        else:
            _, target = self._failed(job, permanent=False)
        letters = [e.ce_id for e in self.publisher.since(published)]
        assert letters == ([f"{job.job_id}:{attempt}"] if target is S.DEAD_LETTER else []), letters

    @precondition(lambda self: any(n != j.live for j in self.jobs.values() for n in j.outcomes))
    @rule(data=st.data(), outcome=st.sampled_from(ORDERS))
    def report_an_old_attempt_again(self, data: st.DataObject, outcome: str) -> None:
        """An attempt that no longer owns its job (it reported already, or was taken back)
        writes an outcome again through the production writer: refused, nothing moves."""
        job = self._pick(data, [j for j in self.jobs.values()
                                if any(n != j.live for n in j.outcomes)])
        attempt = data.draw(st.sampled_from(sorted(n for n in job.outcomes if n != job.live)),
                            label="attempt")
        writer = self.workers[data.draw(st.sampled_from(WORKERS), label="worker")].outcomes.writer
        if outcome == "return":
            sql, params = jobs.complete_many_sql([(job.job_id, attempt, {"late": attempt})])
            assert writer.run(sql, **params) == [], (job, attempt)
        else:
            failure = Failure(job.job_id, attempt, "late failure",
                              policy_for(SETTINGS, get_job_type(JOB_TYPE)),
                              permanent=outcome == "raise permanently")
            recorded = writer.call(lambda conn: record_failures(conn, [failure]))
            assert recorded == [(None, None)], (job, attempt, recorded)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """`POST /jobs/{id}/cancel`: a waiting job is CANCELLED at once and never runs; a
        running one stays IN_PROGRESS with `cancel_requested` until its handler, told by the
        worker's heartbeat, stops (see `finish`); an ended one is a 409 and nothing moves."""
        job = self._pick(data, list(self.jobs.values()))
        if job.status in (S.QUEUED, S.RETRYING):
            doc = api.cancel(job.job_id)
            assert doc.status is S.CANCELLED, (job, doc)
            self._move(job, S.CANCELLED)
        elif job.status is S.IN_PROGRESS:
            doc = api.cancel(job.job_id)
            assert doc.status is S.IN_PROGRESS and doc.cancel_requested, (job, doc)
            job.cancel_requested = True
        else:
            with pytest.raises(ApiError) as refused:
                api.cancel(job.job_id)
            assert refused.value.status == 409, (job, refused.value)

    @precondition(lambda self: self._replayable())
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """An operator replays a job: a dead letter goes back to QUEUED with a fresh retry
        budget, its history kept; any other job is a 409 and nothing moves. (A dead letter
        that still carries a cancel request is left out: its replay is cancelled again, see
        test_a_replayed_dead_letter_carries_no_cancel_request_from_its_last_cycle.)"""
        job = self._pick(data, self._replayable())
        if job.status is not S.DEAD_LETTER:
            with pytest.raises(ApiError) as refused, self.db.transaction() as conn:
                deadletters.replay(conn, job.job_id)
            assert refused.value.status == 409, (job, refused.value)
            return
        with self.db.transaction() as conn:
            row = deadletters.replay(conn, job.job_id)
        assert row["status"] == S.QUEUED, (job, row)
        assert row["retries"] == 0 and row["attempts"] == job.attempts, (job, row)
        self._move(job, S.QUEUED)
        job.retries, job.cycle_start = 0, row["attempts"]

    # -- invariants, read back from PostgreSQL and Redis -------------------------------

    @invariant()
    def every_status_change_is_an_edge_of_the_graph_and_the_one_expected(self) -> None:
        changes = self.db.run("SELECT seq, job_id::text, source::text, target::text"
                              " FROM status_changes WHERE seq > :seen ORDER BY seq",
                              seen=self.logged)
        paths: dict[str, list[JobStatus]] = {}
        for seq, job_id, source, target in changes:
            assert S(target) in TRANSITIONS[S(source)], f"{source} -> {target} is not an edge"
            path = paths.setdefault(job_id, [S(source)])
            assert path[-1] == S(source), (job_id, path, source)
            path.append(S(target))
            self.logged = seq
        assert paths == self.moves, f"PostgreSQL moved {paths}, expected {self.moves}"
        stored = dict(self.db.run("SELECT job_id::text, status::text FROM jobs"))
        assert stored.keys() == self.jobs.keys(), "jobs appeared or vanished"
        for job_id, job in self.jobs.items():
            assert stored[job_id] == job.status, (job, stored[job_id])
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
    def every_attempt_has_its_row_and_ran_its_handler_once(self) -> None:
        rows = self.db.run("SELECT job_id::text, attempt, outcome, finished_at IS NOT NULL"
                           " FROM job_attempts ORDER BY job_id, attempt")
        recorded: dict[str, dict[int, str | None]] = {j: {} for j in self.jobs}
        for job_id, attempt, outcome, finished in rows:
            assert finished == (outcome is not None), (job_id, attempt, outcome)
            recorded[job_id][attempt] = outcome
        for job_id, job in self.jobs.items():
            assert recorded[job_id] == job.outcomes, (job, recorded[job_id])
            assert list(recorded[job_id].values()).count("COMPLETED") <= 1, job
            assert SCRIPT.started(job_id) == dict.fromkeys(job.outcomes, 1), (
                job, SCRIPT.started(job_id))

    @invariant()
    def every_dead_letter_has_its_row_and_one_dlq_message(self) -> None:
        rows = self.db.run("SELECT job_id::text, dead_letter_id, replayed_at IS NULL"
                           " FROM dead_letters")
        letters = {job_id: 0 for job_id in self.jobs}
        for job_id, letter_id, open_ in rows:
            letters[job_id] += 1
            job = self.jobs[job_id]
            assert open_ == (job.status is S.DEAD_LETTER and letter_id ==
                             f"{job_id}:{job.attempts}"), (job, letter_id, open_)
        for job_id, job in self.jobs.items():
            assert letters[job_id] == job.dead_letters, (job, letters[job_id])
        dlq = [e.ce_id for e in self.publisher.since(0) if e.topic == SETTINGS.dlq_topic]
        assert sorted(dlq) == sorted(letter_id for _, letter_id, _ in rows)

    @invariant()
    def only_a_running_job_holds_a_lease(self) -> None:
        rows = self.db.run("SELECT job_id::text, status::text, lease_expires_at IS NOT NULL"
                           " FROM jobs")
        for job_id, status, leased in rows:
            assert leased == (status == S.IN_PROGRESS), (job_id, status, leased)

    @invariant()
    def redis_holds_exactly_the_final_documents_at_their_version(self) -> None:
        rows = self.db.run("SELECT job_id::text, status::text, version,"
                           " job_id IN (SELECT job_id FROM cache_repairs) FROM jobs")
        for job_id, status, version, repair_queued in rows:
            cached = self.redis.hget(cache_key(job_id), "v")
            if status not in FINAL_STATES:
                assert cached is None, (job_id, status, cached)
            elif not repair_queued:  # a failed cache write is queued for repair instead
                assert cached is not None and int(cached) == version, (job_id, version, cached)


@dataclass
class System:
    """The production pieces the tests drive, on the scratch database."""

    db: Database
    workers: list[Processor]
    publisher: RecordingPublisher
    redis: redis.Redis


@pytest.fixture
def system(stack, scratch_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[System]:
    # `api.cancel` finds PostgreSQL and Redis through the settings, as in `status`.
    monkeypatch.setenv("DATABASE_URL", scratch_url)
    monkeypatch.setenv("REDIS_URL", stack.env["REDIS_URL"])
    settings_module.get_settings.cache_clear()
    db = Database(scratch_url)
    cache = StatusCache(stack.env["REDIS_URL"])
    publisher = RecordingPublisher()
    system = System(db, [Processor(SETTINGS, db, cache, publisher) for _ in WORKERS],
                    publisher, redis.Redis.from_url(stack.env["REDIS_URL"]))
    db.run(f"TRUNCATE jobs, job_attempts, dead_letters, cache_repairs, status_changes,"
           f" {DEPENDENT_TABLES}")
    SCRIPT.reset()
    try:
        yield system
    finally:
        SCRIPT.release_all()
        for worker in system.workers:
            worker.claims.db.close()
        db.close()
        system.redis.close()


def test_the_job_lifecycle_keeps_its_invariants_under_any_interleaving(system: System):
    Lifecycle.db, Lifecycle.workers, Lifecycle.publisher = (
        system.db, system.workers, system.publisher)
    Lifecycle.redis = system.redis
    run_state_machine_as_test(Lifecycle, settings=settings(
        max_examples=30, stateful_step_count=STEPS, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))


def submitted(system: System, max_retries: int = 3) -> str:
    submission = JobSubmission(job_type=JOB_TYPE, payload={}, max_retries=max_retries)
    ((row, _),) = jobs.create_jobs(system.db, [(submission, submission.payload, None,
                                                max_retries, jobs.request_fingerprint(
                                                    submission))])
    return str(row["job_id"])


def running(system: System, job_id: str) -> concurrent.futures.Future[list[Any]]:
    """A delivery of the job to a worker, whose handler has started (and waits)."""
    future = in_thread(system.workers[0].handle_batch,
                       [JobMessage(job_id=uuid.UUID(job_id), job_type=JOB_TYPE)])
    SCRIPT.wait_started([(job_id, 1)])
    return future


def test_a_handler_that_returns_after_a_cancel_request_ends_cancelled(system: System):
    """README: a handler told to stop should "return or raise then (a cancelled job ends
    CANCELLED whatever the handler does next)". Fails today: `Processor._attempts` treats
    an attempt as cancelled only if its handler raised (`r.error is not None and
    r.ctx.stop_reason == "cancelled"`), so one that stops and returns is COMPLETED."""
    job_id = submitted(system)
    delivery = running(system, job_id)
    assert api.cancel(job_id).cancel_requested
    assert SCRIPT.get(job_id, 1).ctx.cancelled.wait(WAIT), "the heartbeat passes the cancel on"
    SCRIPT.order(job_id, 1, "return")  # the handler stops early, cleanly
    [answer] = delivery.result(WAIT)
    history = system.db.run("SELECT status::text, (SELECT outcome FROM job_attempts a"
                            " WHERE a.job_id = j.job_id) FROM jobs j")
    assert (answer.outcome, history) == ("cancelled", [["CANCELLED", "CANCELLED"]])


def test_a_replayed_dead_letter_carries_no_cancel_request_from_its_last_cycle(system: System):
    """Replay gives a dead letter "a fresh retry budget"; it should not inherit a cancel
    request made while its last attempt ran (`deadletters.replay` once left
    `cancel_requested_at` set, so the replayed job showed `cancel_requested` and the
    heartbeat stopped its next attempt). A worker that vanishes after a cancel request now
    ends its job CANCELLED (see the crash rule), so here the request lands as the attempt
    fails: set in PostgreSQL, as `request_cancel` would, once the job is dead."""
    job_id = submitted(system, max_retries=0)
    delivery = running(system, job_id)
    SCRIPT.order(job_id, 1, "raise")
    assert [a.outcome for a in delivery.result(WAIT)] == ["dead_lettered"]
    system.db.run("UPDATE jobs SET cancel_requested_at = now()")
    with system.db.transaction() as conn:
        replayed = jobs.document(deadletters.replay(conn, job_id))
    assert (replayed["status"], replayed["cancel_requested"]) == ("QUEUED", False)
