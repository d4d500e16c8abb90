"""The layer under the functions, against real servers: the group commit, the connection
pool, the status cache and its repair, the sweeper.

This module starts its own PostgreSQL and Redis (it stops and restarts them); the sweeper
tests publish to topics of their own on the session stack's Kafka broker, which no bridge
reads, and read back what was published.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from pg8000.exceptions import DatabaseError

from common import jobs
from common.artifacts import find_artifact, write_artifact
from common.cache import CHANGES_PREFIX, FINAL_CHANNEL, StatusCache, cache_key
from common.db import Database, GroupCommitter, migrate, migration_files
from common.errors import ServiceUnavailable
from common.models import JobSubmission
from common.queue import DEAD_LETTER_EVENT_TYPE, JOB_EVENT_TYPE, Publisher
from common.settings import Settings
from common.sweeper import fold_counts, forget_old_jobs, publish_due, reclaim_expired
from infra.services import ServerProcess, create_topics, start_postgres, start_redis
from tests.support.client import in_thread, wait_for

pytestmark = pytest.mark.integration

WAIT = 15.0  # deadline of every wait
JOB_TYPE = "SWEEPER_PROBE"  # registered nowhere: the sweeper takes the global policy


# -- servers and clients ---------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_postgres(tmp_path_factory.mktemp("db-and-cache-pg"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def db(postgres: ServerProcess) -> Iterator[Database]:
    database = Database(postgres.url, size=8)
    migrate(database)
    yield database
    database.close()


@pytest.fixture
def tables(db: Database) -> Database:
    """The jobs tables, empty."""
    db.run("TRUNCATE jobs, job_attempts, dead_letters, cache_repairs, job_dependencies,"
           " job_settlements, job_callbacks, job_callback_attempts")  # counts too (trigger)
    return db


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_redis(tmp_path_factory.mktemp("db-and-cache-redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def raw(redis_server: ServerProcess) -> Iterator[redis.Redis]:
    """A plain Redis client, to look at what the cache wrote; the database starts empty."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def running(redis_server: ServerProcess, postgres: ServerProcess) -> Iterator[None]:
    """For tests that stop or pause a server: it runs again afterwards, whatever happens."""
    yield
    redis_server.resume()
    redis_server.start(30)
    postgres.start(60)




def backend_pid(db: Database) -> int:
    with db.connection() as conn:
        return int(conn.run("SELECT pg_backend_pid()")[0][0])


# -- the group commit ------------------------------------------------------------------


@pytest.fixture
def probe_table(db: Database) -> str:
    db.run("DROP TABLE IF EXISTS group_probe")
    db.run("CREATE TABLE group_probe (n int PRIMARY KEY)")
    return "group_probe"


def hold(writer: GroupCommitter) -> tuple[threading.Event, concurrent.futures.Future[int]]:
    """Keep a group commit under way (its leader blocked in it) until released, so that
    everything sent meanwhile waits and goes into the next group together."""
    entered, release = threading.Event(), threading.Event()

    def block(conn: Any) -> int:
        entered.set()
        assert release.wait(WAIT)
        return int(conn.run("SELECT txid_current()")[0][0])

    blocker = in_thread(writer.call, block)
    assert entered.wait(WAIT), "the group commit never started"
    return release, blocker


def test_a_submit_rehearsal_runs_the_insert_and_leaves_nothing_behind(tables):
    """What a new `submit` worker does before its first request (clients.warm_up)."""
    job_id = jobs.rehearse_submit(tables)
    uuid.UUID(job_id)  # the insert ran and returned its row
    assert tables.run("SELECT count(*) FROM jobs") == [[0]]
    with tables.connection() as conn:
        assert all(n == 0 for _, _, n in jobs.counts(conn)), jobs.counts(conn)


def test_concurrent_statements_share_one_commit_and_each_caller_gets_its_own_rows(db, probe_table):
    writer = GroupCommitter(db)
    insert = "INSERT INTO group_probe (n) VALUES (:n) RETURNING n, txid_current() AS tx"
    release, blocker = hold(writer)
    calls = {n: in_thread(writer.run, insert, n=n) for n in range(20)}
    wait_for(lambda: writer.pending() == 20, WAIT, "20 statements queued")
    release.set()
    answers = {n: call.result(WAIT) for n, call in calls.items()}
    alone = blocker.result(WAIT)
    assert all(rows == [{"n": n, "tx": rows[0]["tx"]}] for n, rows in answers.items()), answers
    transactions = {rows[0]["tx"] for rows in answers.values()}
    assert len(transactions) == 1 and alone not in transactions, (transactions, alone)
    # Committed: another connection sees every row, once.
    assert db.run("SELECT n FROM group_probe ORDER BY n") == [[n] for n in range(20)]


def test_a_lone_statement_runs_on_its_callers_own_thread(db, probe_table):
    writer = GroupCommitter(db)
    ran_on = []

    def work(conn: Any) -> int:
        ran_on.append(threading.current_thread())
        return int(conn.run("INSERT INTO group_probe (n) VALUES (7) RETURNING n")[0][0])

    assert writer.call(work, single=True) == 7
    assert ran_on == [threading.current_thread()]  # no hand-off to another thread
    assert writer.pending() == 0 and not writer._leading


def test_a_caller_interrupted_while_waiting_never_blocks_the_ones_after_it(db, probe_table):
    writer = GroupCommitter(db)
    release, blocker = hold(writer)

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)  # while it waits for the group under way
        with pytest.raises(Interrupted):
            writer.run("INSERT INTO group_probe (n) VALUES (1)")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    later = in_thread(writer.run, "INSERT INTO group_probe (n) VALUES (2) RETURNING n")
    wait_for(lambda: writer.pending() == 1, WAIT, "the later statement waiting")
    release.set()
    blocker.result(WAIT)
    assert later.result(WAIT) == [{"n": 2}]  # led by someone: not left waiting for good
    assert db.run("SELECT n FROM group_probe") == [[2]]  # the abandoned one never ran
    assert writer.pending() == 0 and not writer._leading


def test_a_failing_statement_in_a_group_fails_only_its_caller(db, probe_table):
    writer = GroupCommitter(db)
    db.run("INSERT INTO group_probe (n) VALUES (99)")
    insert = "INSERT INTO group_probe (n) VALUES (:n) RETURNING n"
    release, _ = hold(writer)
    calls = {n: in_thread(writer.run, insert, n=n) for n in (1, 2, 99, 3, 4)}
    wait_for(lambda: writer.pending() == 5, WAIT, "5 statements queued")
    release.set()
    with pytest.raises(DatabaseError) as duplicate:
        calls[99].result(WAIT)
    answers = {n: calls[n].result(WAIT) for n in (1, 2, 3, 4)}
    assert duplicate.value.args[0]["C"] == "23505"  # unique_violation, only for its caller
    assert answers == {n: [{"n": n}] for n in (1, 2, 3, 4)}
    assert db.run("SELECT n FROM group_probe ORDER BY n") == [[1], [2], [3], [4], [99]]


# -- the connection pool ---------------------------------------------------------------


def test_the_pool_reuses_connections_and_never_opens_more_than_its_size(postgres):
    name = f"pool-{uuid.uuid4().hex[:8]}"
    db = Database(f"{postgres.url}?application_name={name}", size=2, wait=0.5)
    try:
        first = backend_pid(db)
        assert backend_pid(db) == first, "a returned connection is used again"
        with db.connection() as a, db.connection() as b:
            held = {backend_pid_of(conn) for conn in (a, b)}
            assert len(held) == 2 and first in held
            started = time.monotonic()
            # A third caller waits its turn, then is told to come back.
            with pytest.raises(ServiceUnavailable, match="all 2 connections"), db.connection():
                pass
            assert time.monotonic() - started >= 0.5
            # A caller waiting when one is returned gets it.
            waiter = in_thread(backend_pid, db)
            time.sleep(0.1)  # time to block on the pool (it gets a held one either way)
        assert waiter.result(timeout=WAIT) in held
        assert connections_named(db, name) == 2
    finally:
        db.close()


def backend_pid_of(conn: Any) -> int:
    return int(conn.run("SELECT pg_backend_pid()")[0][0])


def connections_named(db: Database, name: str) -> int:
    with db.connection() as conn:
        return int(conn.run("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n",
                            n=name)[0][0])


def test_the_pool_recovers_by_itself_after_a_postgresql_restart(postgres, running):
    db = Database(postgres.url, size=4)
    try:
        with db.connection() as a, db.connection() as b:
            before = {backend_pid_of(a), backend_pid_of(b)}
        postgres.restart()
        # Each pooled connection died with the server: the first call of each kind works.
        with db.transaction() as conn:
            assert backend_pid_of(conn) not in before
        with db.connection() as a, db.connection() as b:
            before = {backend_pid_of(a), backend_pid_of(b)}
        postgres.restart()
        assert db.run("SELECT 1") == [[1]]
        assert backend_pid(db) not in before
    finally:
        db.close()


def test_a_stopped_postgresql_is_service_unavailable_until_it_is_back(postgres, running):
    db = Database(postgres.url, size=4)
    try:
        assert db.run("SELECT 1") == [[1]]
        postgres.stop()
        with pytest.raises(ServiceUnavailable):
            db.run("SELECT 1")
        with pytest.raises(ServiceUnavailable), db.transaction():
            pass
        postgres.start(60)
        assert db.run("SELECT 1") == [[1]]
    finally:
        db.close()


# -- the status cache ------------------------------------------------------------------


def doc(job_id: str, version: int, status: str = "COMPLETED") -> dict[str, Any]:
    return {"job_id": job_id, "version": version, "status": status}


def cached_version(raw: redis.Redis, job_id: str) -> int | None:
    value = raw.hget(cache_key(job_id), "v")
    return None if value is None else int(value)


def announcements(raw: redis.Redis, write: Any) -> list[str]:
    """Job ids the cache announced as final on its channel while `write()` ran."""
    with raw.pubsub() as pubsub:
        pubsub.subscribe(FINAL_CHANNEL)
        assert pubsub.get_message(timeout=WAIT)["type"] == "subscribe"
        write()
        end = f"end-{uuid.uuid4()}"
        raw.publish(FINAL_CHANNEL, end)  # delivered after everything published before it
        seen: list[str] = []
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1.0)
            if message is None or message["type"] != "message":
                continue
            text = message["data"].decode()
            if text == end:
                return seen
            seen.append(text.split(" ", 1)[0])
        raise AssertionError("the end marker never arrived")


def test_an_older_version_never_overwrites_a_newer_one_in_the_cache(redis_server, raw):
    cache = StatusCache(redis_server.url)
    job_id = str(uuid.uuid4())
    assert cache.put([doc(job_id, 2)])
    assert cache.put([doc(job_id, 1, "CANCELLED")])  # Redis answered: not an error
    assert cache.put([doc(job_id, 2, "CANCELLED")])  # the same version is not newer either
    assert cache.get(job_id) == doc(job_id, 2)
    assert cache.put([doc(job_id, 3, "CANCELLED")])
    assert cache.get(job_id) == doc(job_id, 3, "CANCELLED")


def test_a_document_cached_with_a_whole_callback_url_is_read_with_its_origin_only(
        redis_server, raw):
    """Documents cached before URLs were shown by origin only stay for days: a read
    never hands their path or query (often the webhook's secret) to a reader."""
    cache = StatusCache(redis_server.url)
    job_id = str(uuid.uuid4())
    old = {**doc(job_id, 2, "COMPLETED"), "callback_url": "https://hooks.example.com/s/T0/x?k=1"}
    raw.hset(cache_key(job_id), mapping={"doc": json.dumps(old), "version": 2})
    assert cache.get(job_id) == {**old, "callback_url": "https://hooks.example.com/…"}


def test_many_documents_in_one_put_each_keep_their_newest_version(redis_server, raw):
    cache = StatusCache(redis_server.url)
    ids = [str(uuid.uuid4()) for _ in range(1200)]  # more than one script call's chunk
    assert cache.put([doc(job_id, 5) for job_id in ids])
    # One call: every third one older, every third newer, every third the same version;
    # the first job twice, newest first.
    offered = {job_id: 4 + i % 3 for i, job_id in enumerate(ids)}  # 4, 5, 6, 4, 5, 6...
    batch = [doc(ids[0], 9), *(doc(job_id, v) for job_id, v in offered.items()), doc(ids[0], 8)]
    announced = announcements(raw, lambda: cache.put(batch))
    with raw.pipeline() as pipe:
        for job_id in ids:
            pipe.hget(cache_key(job_id), "v")
        stored = dict(zip(ids, (int(v) for v in pipe.execute()), strict=True))
    want = {job_id: max(5, v) for job_id, v in offered.items()} | {ids[0]: 9}
    assert stored == want
    written = [ids[0]] + [job_id for job_id, v in offered.items() if v == 6 and job_id != ids[0]]
    assert sorted(announced) == sorted(written), "only documents written are announced"


def test_other_documents_are_announced_on_their_jobs_channel_only_if_newer_never_stored(
        redis_server, raw):
    cache = StatusCache(redis_server.url)
    job_id, other = str(uuid.uuid4()), str(uuid.uuid4())
    with raw.pubsub() as pubsub:
        pubsub.subscribe(CHANGES_PREFIX + job_id, FINAL_CHANNEL)
        for _ in range(2):
            assert pubsub.get_message(timeout=WAIT)["type"] == "subscribe"
        cache.put([], announce=[doc(job_id, 1, "IN_PROGRESS"), doc(other, 1, "QUEUED")])
        assert cache.get(job_id) is None, "an announced document is not stored"
        cache.put([], announce=[doc(job_id, 2, "IN_PROGRESS")])
        assert cache.put([doc(job_id, 3)])
        cache.put([], announce=[doc(job_id, 2, "IN_PROGRESS")])  # older than stored: silent
        raw.publish(FINAL_CHANNEL, "end")
        seen = []
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and seen[-1:] != [(FINAL_CHANNEL, "end")]:
            message = pubsub.get_message(timeout=WAIT)
            if message and message["type"] == "message":
                seen.append((message["channel"].decode(), message["data"].decode()))
    changes = CHANGES_PREFIX + job_id
    assert [(c, json.loads(d)["version"] if c == changes else d.split(" ")[0])
            for c, d in seen] == [(changes, 1), (changes, 2), (FINAL_CHANNEL, job_id),
                                  (FINAL_CHANNEL, "end")]
    assert cached_version(raw, job_id) == 3


def test_the_breaker_skips_a_stopped_redis_for_its_cooldown_then_uses_it_again(
        redis_server, raw, running):
    cache = StatusCache(redis_server.url, timeout=0.3, cooldown=3.0)
    job_id, other = str(uuid.uuid4()), str(uuid.uuid4())
    assert cache.put([doc(job_id, 1)])
    redis_server.stop()
    assert cache.put([doc(job_id, 2)]) is False
    assert not cache.available
    redis_server.start(30)  # empty: no persistence, and the put script is gone too
    raw.hset(cache_key(other), mapping={"v": 1, "doc": json.dumps(doc(other, 1))})
    assert not cache.available, "restarting Redis took longer than the cooldown"
    # Within the cooldown the cache does not even try: nothing reaches Redis.
    assert cache.put([doc(job_id, 3)]) is False
    assert cache.get(other) is None
    assert cached_version(raw, job_id) is None
    wait_for(lambda: cache.available, WAIT, "the cooldown to end")
    assert cache.put([doc(job_id, 3)])  # loads its script again
    assert cache.get(job_id) == doc(job_id, 3) and cache.get(other) == doc(other, 1)


def test_a_hung_redis_costs_one_timeout_then_is_skipped_for_the_cooldown(
        redis_server, raw, running):
    cache = StatusCache(redis_server.url, timeout=0.3, cooldown=3.0)
    job_id = str(uuid.uuid4())
    assert cache.put([doc(job_id, 1)])
    redis_server.pause()
    try:
        started = time.monotonic()
        assert cache.put([doc(job_id, 2)]) is False
        assert time.monotonic() - started >= 0.3, "it did wait for the hung server"
        started = time.monotonic()
        assert cache.put([doc(job_id, 3)]) is False and cache.get(job_id) is None
        assert time.monotonic() - started < 0.3, "the second call waited for Redis again"
    finally:
        redis_server.resume()
    wait_for(lambda: cache.available, WAIT, "the cooldown to end")
    assert cache.put([doc(job_id, 3)])
    assert cached_version(raw, job_id) == 3


# -- cache repairs ---------------------------------------------------------------------


def new_job(db: Database, max_retries: int = 3) -> dict[str, Any]:
    submission = JobSubmission(job_type=JOB_TYPE, payload={"id": str(uuid.uuid4())},
                               max_retries=max_retries)
    ((row, _),) = jobs.create_jobs(db, [(submission, submission.payload, None, max_retries,
                                         jobs.request_fingerprint(submission))])
    return row


def claimed(db: Database, max_retries: int = 3, lease: float = 3600) -> dict[str, Any]:
    """A job claimed by a worker (IN_PROGRESS, attempt 1 counted and its row written)."""
    job_id = str(new_job(db, max_retries)["job_id"])
    with db.transaction() as conn:
        row = jobs.claim(conn, job_id, lease)
    assert row is not None
    return row


def completed(db: Database) -> dict[str, Any]:
    row = claimed(db)
    sql, params = jobs.complete_many_sql([(str(row["job_id"]), row["attempts"], {"ok": True})])
    with db.transaction() as conn:
        assert conn.run(sql, **params), "the attempt owns its job"
        return jobs.get_job(conn, str(row["job_id"])) or {}


def repairs(db: Database) -> set[str]:
    return {job_id for [job_id] in db.run("SELECT job_id::text FROM cache_repairs")}


def test_a_final_document_redis_cannot_take_is_queued_and_the_repair_writes_it(
        tables, redis_server, raw, running):
    db = tables
    cache = StatusCache(redis_server.url, timeout=0.3, cooldown=1.0)
    done, waiting = completed(db), new_job(db)
    redis_server.stop()
    docs = jobs.cache_rows(db, cache, [done, waiting])
    assert [d["status"] for d in docs] == ["COMPLETED", "QUEUED"]
    # Only a final document is ever cached, so only that one waits for a repair.
    assert repairs(db) == {str(done["job_id"])}
    redis_server.start(30)
    assert jobs.repair_cache(db, cache) == 0, "the breaker is open: no repair tried yet"
    assert repairs(db) == {str(done["job_id"])}
    wait_for(lambda: cache.available, WAIT, "the cooldown to end")
    assert jobs.repair_cache(db, cache) == 1
    assert cached_version(raw, str(done["job_id"])) == done["version"]
    assert cached_version(raw, str(waiting["job_id"])) is None
    assert repairs(db) == set()
    assert jobs.repair_cache(db, cache) == 0


class CacheWhileTheJobMovesOn(StatusCache):
    """The real cache; just before it writes, the job moves on (another worker's write,
    whose own cache write failed)."""

    def __init__(self, url: str, db: Database, job_id: str) -> None:
        super().__init__(url)
        self.db, self.job_id = db, job_id

    def put(self, documents: Any) -> bool:
        self.db.run("UPDATE jobs SET version = version + 1, updated_at = now()"
                    " WHERE job_id = CAST(:id AS uuid)", id=self.job_id)
        return super().put(documents)


def test_a_repair_whose_job_moved_on_meanwhile_is_kept_for_the_next_pass(
        tables, redis_server, raw):
    db = tables
    row = completed(db)
    job_id = str(row["job_id"])
    db.run("INSERT INTO cache_repairs (job_id) VALUES (CAST(:id AS uuid))", id=job_id)
    assert jobs.repair_cache(db, CacheWhileTheJobMovesOn(redis_server.url, db, job_id)) == 1
    assert cached_version(raw, job_id) == row["version"]
    assert repairs(db) == {job_id}, "the newer version still has to reach the cache"
    assert jobs.repair_cache(db, StatusCache(redis_server.url)) == 1
    assert cached_version(raw, job_id) == row["version"] + 1
    assert repairs(db) == set()


# -- the sweeper -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kafka(stack: Any) -> Iterator[tuple[Publisher, Settings]]:
    """A publisher to the stack's broker and settings naming topics of this module's own."""
    bootstrap = stack.env["KAFKA_BOOTSTRAP_SERVERS"]
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(kafka_bootstrap_servers=bootstrap, queue_topic=f"sweep-q-{suffix}",
                        dlq_topic=f"sweep-dlq-{suffix}", max_retries=3,
                        backoff_base_seconds=0, backoff_jitter=0)
    create_topics(bootstrap, {settings.queue_topic: 1, settings.dlq_topic: 1})
    publisher = Publisher(bootstrap)
    yield publisher, settings
    publisher.close()


def records(bootstrap: str, topic: str) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(ce_* headers, data) of every record on `topic`, from the start to its end now."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        tp = TopicPartition(topic, 0, 0)
        end = consumer.get_watermark_offsets(tp, timeout=WAIT)[1]
        consumer.assign([tp])
        found: list[tuple[dict[str, str], dict[str, Any]]] = []
        deadline = time.monotonic() + WAIT
        while len(found) < end:
            assert time.monotonic() < deadline, f"read {len(found)} of {end} records"
            for message in consumer.consume(100, 0.5):
                if message.error() is None:
                    headers = {k: v.decode() for k, v in message.headers() or []}
                    found.append((headers, json.loads(message.value())))
        return found
    finally:
        consumer.close()


def test_reclaim_expired_fails_an_expired_attempt_and_leaves_a_live_lease_alone(
        tables, kafka, redis_server, stack):
    db, (publisher, settings) = tables, kafka
    cache = StatusCache(redis_server.url)
    live, lost = claimed(db), claimed(db)
    db.run("UPDATE jobs SET lease_expires_at = now() - interval '1 second'"
           " WHERE job_id = CAST(:id AS uuid)", id=str(lost["job_id"]))
    assert reclaim_expired(db, cache, publisher, settings) == 1
    assert reclaim_expired(db, cache, publisher, settings) == 0
    [[status, attempts, retries, leased, due, error]] = db.run(
        "SELECT status::text, attempts, retries, lease_expires_at IS NOT NULL,"
        " next_attempt_at <= now(), error_message FROM jobs WHERE job_id = CAST(:id AS uuid)",
        id=str(lost["job_id"]))
    assert (status, attempts, retries, leased, due) == ("RETRYING", 1, 0, False, True)
    assert error.startswith("lease expired")
    assert db.run("SELECT attempt, outcome FROM job_attempts WHERE job_id = CAST(:id AS uuid)",
                  id=str(lost["job_id"])) == [[1, "FAILED"]]
    assert db.run("SELECT status::text, lease_expires_at = :lease FROM jobs"
                  " WHERE job_id = CAST(:id AS uuid)", id=str(live["job_id"]),
                  lease=live["lease_expires_at"]) == [["IN_PROGRESS", True]]
    dead_letters = records(stack.env["KAFKA_BOOTSTRAP_SERVERS"], settings.dlq_topic)
    assert all(data["job_id"] != str(lost["job_id"]) for _, data in dead_letters)


def test_reclaim_expired_dead_letters_a_job_out_of_retries_with_one_dlq_message(
        tables, kafka, redis_server, stack):
    db, (publisher, settings) = tables, kafka
    lost = claimed(db, max_retries=0)
    job_id = str(lost["job_id"])
    db.run("UPDATE jobs SET lease_expires_at = now() - interval '1 second'"
           " WHERE job_id = CAST(:id AS uuid)", id=job_id)
    assert reclaim_expired(db, StatusCache(redis_server.url), publisher, settings) == 1
    assert db.run("SELECT status::text FROM jobs WHERE job_id = CAST(:id AS uuid)",
                  id=job_id) == [["DEAD_LETTER"]]
    assert db.run("SELECT dead_letter_id, reason FROM dead_letters") == [
        [f"{job_id}:1", "retries exhausted"]]
    mine = [(h, data) for h, data in records(stack.env["KAFKA_BOOTSTRAP_SERVERS"],
                                             settings.dlq_topic) if data["job_id"] == job_id]
    assert [(h["ce_id"], h["ce_type"]) for h, _ in mine] == [
        (f"{job_id}:1", DEAD_LETTER_EVENT_TYPE)]
    assert mine[0][1]["history"][0]["outcome"] == "FAILED"


def test_publish_due_republishes_jobs_never_published_or_published_long_ago(
        tables, kafka, stack):
    db, (publisher, settings) = tables, kafka
    never, fresh, lost, sent = (str(new_job(db)["job_id"]) for _ in range(4))
    # Submit died between its commit and its publish a minute ago; `fresh` was just
    # submitted (its submit may still publish it); `lost` was published an hour ago and
    # its message lost (a broker restart); `sent` was published just now.
    db.run("UPDATE jobs SET updated_at = now() - interval '1 minute'"
           " WHERE job_id = CAST(:id AS uuid)", id=never)
    db.run("UPDATE jobs SET published_at = now() - interval '1 hour'"
           " WHERE job_id = CAST(:id AS uuid)", id=lost)
    db.run("UPDATE jobs SET published_at = now() WHERE job_id = CAST(:id AS uuid)", id=sent)
    assert publish_due(db, publisher, settings) == 2
    assert publish_due(db, publisher, settings) == 0, "marked published: not sent again"
    published = records(stack.env["KAFKA_BOOTSTRAP_SERVERS"], settings.queue_topic)
    mine = sorted((h["ce_id"], h["ce_type"], data["job_id"], data["job_type"])
                  for h, data in published if data["job_id"] in (never, fresh, lost, sent))
    assert mine == sorted((f"{j}:queued-0", JOB_EVENT_TYPE, j, JOB_TYPE) for j in (never, lost))
    marked = dict(db.run("SELECT job_id::text, published_at > now() - interval '1 minute'"
                         " FROM jobs"))
    assert marked == {never: True, fresh: None, lost: True, sent: True}


def test_publish_marks_are_written_in_batches_and_the_marker_sleeps_when_idle(tables):
    db = tables
    marks = jobs.PublishMarks(db, interval=0.05)
    first = [str(new_job(db)["job_id"]) for _ in range(3)]
    marks.add([(job_id, 0) for job_id in first])

    def published(ids: list[str]) -> bool:
        rows = db.run("SELECT count(*) FROM jobs WHERE job_id = ANY(CAST(:ids AS uuid[]))"
                      " AND published_at IS NOT NULL", ids=ids)
        return rows[0][0] == len(ids)

    wait_for(lambda: published(first), WAIT, "the first marks")
    assert marks._thread is not None
    ident = marks._thread.ident

    def asleep_until_work() -> bool:  # in Condition.wait_for, not in a timed sleep loop
        frame, names = sys._current_frames().get(ident), []  # type: ignore[arg-type]
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        return "wait_for" in names

    wait_for(asleep_until_work, WAIT, "the marker to wait for work")
    later = [str(new_job(db)["job_id"]) for _ in range(2)]
    marks.add([(job_id, 0) for job_id in later])  # woken by new work, not by a timer
    wait_for(lambda: published(later), WAIT, "marks added after an idle spell")


def test_migrations_run_once_when_four_processes_start_at_once(postgres):
    name = f"mig_{uuid.uuid4().hex[:8]}"
    admin = Database(postgres.url, size=1)
    admin.run(f"CREATE DATABASE {name}")
    url = postgres.url.rsplit("/", 1)[0] + f"/{name}"
    pools = [Database(url, size=2) for _ in range(4)]
    try:
        gate = threading.Barrier(4)

        def start(db: Database) -> list[str]:
            gate.wait()
            return migrate(db)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            applied = list(pool.map(start, pools))
        files = [name for _, name, _ in migration_files()]
        assert sorted(sum(applied, [])) == sorted(files), "each file applied exactly once"
        assert [r[0] for r in pools[0].run("SELECT name FROM schema_migrations"
                                           " ORDER BY version")] == files
        assert migrate(pools[0]) == [], "a second run applies nothing"
    finally:
        for db in pools:
            db.close()
        admin.run(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


# -- counts and retention --------------------------------------------------------------


def counted(db: Database) -> dict[tuple[str, str], int]:
    with db.connection() as conn:
        return {(t, s): n for t, s, n in jobs.counts(conn)}


def scanned(db: Database) -> dict[tuple[str, str], int]:
    return {(t, s): n for t, s, n in db.run(
        "SELECT job_type, status::text, count(*) FROM jobs GROUP BY 1, 2")}


def test_counts_follow_every_insert_transition_and_delete_without_scanning(tables):
    db = tables
    assert counted(db) == {}
    rows = [claimed(db) for _ in range(3)] + [new_job(db) for _ in range(2)]
    assert counted(db) == scanned(db) == {(JOB_TYPE, "IN_PROGRESS"): 3, (JOB_TYPE, "QUEUED"): 2}
    sql, params = jobs.complete_many_sql([(str(r["job_id"]), r["attempts"], {"ok": 1})
                                          for r in rows[:2]])
    db.run(sql, **params)
    db.run("UPDATE jobs SET published_at = now()")  # no status change: nothing to count
    assert counted(db) == scanned(db)
    assert fold_counts(db) >= 1
    assert db.run("SELECT count(*) FROM job_count_changes") == [[0]]
    assert counted(db) == scanned(db)
    db.run("DELETE FROM jobs WHERE job_id = CAST(:id AS uuid)", id=str(rows[0]["job_id"]))
    assert counted(db) == scanned(db) == {(JOB_TYPE, "IN_PROGRESS"): 1,
                                          (JOB_TYPE, "COMPLETED"): 1, (JOB_TYPE, "QUEUED"): 2}
    db.run("TRUNCATE jobs CASCADE")
    assert counted(db) == {}


def test_counts_stay_exact_under_concurrent_writers_and_folds(tables):
    db = tables

    def work(i: int) -> None:
        row = claimed(db)
        if i % 3:
            sql, params = jobs.complete_many_sql([(str(row["job_id"]), row["attempts"], {})])
            db.run(sql, **params)
        if i % 7 == 0:
            fold_counts(db)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(120)))
    assert counted(db) == scanned(db)
    fold_counts(db)
    assert counted(db) == scanned(db) == {(JOB_TYPE, "IN_PROGRESS"): 40,
                                          (JOB_TYPE, "COMPLETED"): 80}


def test_retention_deletes_old_final_jobs_with_their_traces_and_keeps_the_rest(
        tables, raw, redis_server, tmp_path):
    db = tables
    settings = Settings(database_url="x", artifact_dir=tmp_path, retain_finished_days=7,
                        retain_dead_days=30)
    cache = StatusCache(redis_server.url)
    old_done, new_done, old_dead, young_dead = (completed(db) for _ in range(4))
    db.run("UPDATE jobs SET status = 'DEAD_LETTER' WHERE job_id = ANY(CAST(:ids AS uuid[]))",
           ids=[str(old_dead["job_id"]), str(young_dead["job_id"])])
    waiting = new_job(db)
    for row, days in ((old_done, 8), (old_dead, 31), (young_dead, 10), (waiting, 400)):
        db.run("UPDATE jobs SET updated_at = now() - make_interval(days => :d)"
               " WHERE job_id = CAST(:id AS uuid)", d=days, id=str(row["job_id"]))
    db.run("INSERT INTO dead_letters (dead_letter_id, job_id, reason, dead_lettered_at)"
           " VALUES ('old', CAST(:a AS uuid), 'x', now() - interval '31 days'),"
           " ('young', CAST(:b AS uuid), 'x', now() - interval '10 days')",
           a=str(old_dead["job_id"]), b=str(young_dead["job_id"]))
    every = [old_done, new_done, old_dead, young_dead, waiting]
    for row in every:
        write_artifact(tmp_path, row["job_id"], "out.txt", lambda f: f.write(b"data"))
    assert cache.put([{"job_id": str(r["job_id"]), "version": 99, "status": "COMPLETED"}
                      for r in every])

    assert forget_old_jobs(db, cache, settings, limit=1) == 1  # bounded batches
    assert forget_old_jobs(db, cache, settings) == 1
    assert forget_old_jobs(db, cache, settings) == 0
    gone = {str(old_done["job_id"]), str(old_dead["job_id"])}
    left = {r[0] for r in db.run("SELECT job_id::text FROM jobs")}
    assert left == {str(r["job_id"]) for r in every} - gone
    assert db.run("SELECT count(*) FROM job_attempts WHERE job_id = ANY(CAST(:ids AS uuid[]))",
                  ids=list(gone)) == [[0]]
    assert [r[0] for r in db.run("SELECT dead_letter_id FROM dead_letters")] == ["young"]
    for row in every:
        kept = str(row["job_id"]) not in gone
        assert (find_artifact(tmp_path, row["job_id"]) is not None) == kept
        assert (raw.hget(cache_key(str(row["job_id"])), "doc") is not None) == kept
    assert counted(db) == scanned(db)

    db.run("UPDATE jobs SET updated_at = now() - interval '1000 days'")
    keep_done = settings.model_copy(update={"retain_finished_days": 0})  # dead ones go
    assert forget_old_jobs(db, cache, keep_done) == 1  # young_dead, now old too
    assert {r[0] for r in db.run("SELECT status::text FROM jobs")} == {"COMPLETED", "QUEUED"}
    forever = settings.model_copy(update={"retain_finished_days": 0, "retain_dead_days": 0})
    assert forget_old_jobs(db, cache, forever) == 0


def test_retention_keeps_an_old_parent_while_a_child_waits_for_its_other_parents(
        tables, redis_server, tmp_path):
    db = tables
    settings = Settings(database_url="x", artifact_dir=tmp_path, retain_finished_days=7)
    cache = StatusCache(redis_server.url)
    old_parent, old_alone = completed(db), completed(db)
    other_parent, child = new_job(db), new_job(db)
    db.run("UPDATE jobs SET status = 'WAITING', depends_on = CAST(:parents AS uuid[])"
           " WHERE job_id = CAST(:child AS uuid)", child=str(child["job_id"]),
           parents=[str(old_parent["job_id"]), str(other_parent["job_id"])])
    db.run("UPDATE jobs SET has_dependents = true WHERE job_id = ANY(CAST(:ids AS uuid[]))",
           ids=[str(old_parent["job_id"]), str(other_parent["job_id"])])
    db.run("INSERT INTO job_dependencies (parent_id, child_id) SELECT p, CAST(:c AS uuid)"
           " FROM unnest(CAST(:ps AS uuid[])) AS p", c=str(child["job_id"]),
           ps=[str(old_parent["job_id"]), str(other_parent["job_id"])])
    db.run("UPDATE jobs SET updated_at = now() - interval '30 days'"
           " WHERE job_id = ANY(CAST(:ids AS uuid[]))",
           ids=[str(old_parent["job_id"]), str(old_alone["job_id"])])

    assert forget_old_jobs(db, cache, settings) == 1  # the old job nobody waits for
    left = {r[0] for r in db.run("SELECT job_id::text FROM jobs")}
    assert str(old_parent["job_id"]) in left and str(old_alone["job_id"]) not in left
    # Once the child has run (no longer WAITING), the parent goes like any other.
    db.run("UPDATE jobs SET status = 'CANCELLED' WHERE job_id = CAST(:id AS uuid)",
           id=str(child["job_id"]))
    assert forget_old_jobs(db, cache, settings) == 1
    assert str(old_parent["job_id"]) not in {r[0] for r in db.run("SELECT job_id::text FROM jobs")}


def test_listings_by_status_and_type_page_exactly_like_one_plain_query(tables):
    db = tables
    for job_type, status, n in (("A", "COMPLETED", 7), ("B", "COMPLETED", 5), ("A", "QUEUED", 4),
                                ("B", "DEAD_LETTER", 3), ("C", "IN_PROGRESS", 2)):
        db.run("INSERT INTO jobs (job_id, job_type, payload_json, status, created_at)"
               " SELECT gen_random_uuid(), :t, '{}', CAST(:s AS job_status),"
               " now() - i * interval '1 second' FROM generate_series(1, :n) AS i",
               t=job_type, s=status, n=n)
    cases = [(["COMPLETED"], None), (["COMPLETED", "QUEUED"], ["A"]), (None, ["B", "C"]),
             (["QUEUED", "DEAD_LETTER", "IN_PROGRESS"], None), (None, None),
             (["CANCELLED"], None), (["COMPLETED"], ["C"])]
    for status, job_type in cases:
        where, params = [], {}
        if status:
            where.append("status = ANY(CAST(:status AS job_status[]))")
            params["status"] = status
        if job_type:
            where.append("job_type = ANY(CAST(:job_types AS text[]))")
            params["job_types"] = job_type
        expected = [r[0] for r in db.run(
            "SELECT job_id::text FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY created_at DESC, job_id DESC", **params)]
        got, cursor = [], None
        with db.connection() as conn:
            while True:
                rows, cursor = jobs.list_jobs(conn, status=status, job_type=job_type,
                                              cursor=cursor, limit=3)
                got += [str(r["job_id"]) for r in rows]
                if cursor is None:
                    break
        assert got == expected, (status, job_type)


def test_publish_due_takes_the_longest_due_first_so_a_backlog_never_starves_a_delayed_job(
        tables, kafka):
    db, (publisher, settings) = tables, kafka
    backlog = [str(new_job(db)["job_id"]) for _ in range(5)]
    db.run("UPDATE jobs SET created_at = now() - interval '10 seconds',"
           " updated_at = now() - interval '10 seconds'")  # never published, due for a while
    delayed = str(new_job(db)["job_id"])
    db.run("UPDATE jobs SET next_attempt_at = now() - interval '1 minute'"
           " WHERE job_id = CAST(:id AS uuid)", id=delayed)  # due a minute ago
    assert publish_due(db, publisher, settings, limit=3) == 3
    published = {r[0] for r in db.run("SELECT job_id::text FROM jobs"
                                      " WHERE published_at IS NOT NULL")}
    assert delayed in published and len(published & set(backlog)) == 2
