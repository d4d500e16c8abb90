"""The local stack's servers are real: they start, answer, restart, pause and stop cleanly."""

from __future__ import annotations

import email
import email.policy
import logging
import os
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pg8000.exceptions
import pg8000.native
import psutil
import pytest
import redis
from confluent_kafka import Consumer, Producer
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.errors import ServiceUnavailable
from common.queue import Publisher, job_event
from infra.services import (
    ServerProcess,
    create_topics,
    free_port,
    start_kafka,
    start_postgres,
    start_redis,
    start_smtp_sink,
)
from tests.conftest import SERVICE_VARS

pytestmark = pytest.mark.integration

KAFKA_LOG = logging.getLogger("tests.rdkafka")


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_postgres(tmp_path / "pg")
    yield server
    server.stop()


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_kafka(tmp_path / "kafka")
    yield server
    server.stop()


@pytest.fixture
def smtp(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start_smtp_sink(tmp_path / "mail")
    yield server
    server.stop()


def _processes(server: ServerProcess) -> list[psutil.Process]:
    assert server.pid is not None
    main = psutil.Process(server.pid)
    return [main, *main.children(recursive=True)]


def _assert_gone(procs: list[psutil.Process]) -> None:
    # A zombie left to an init that doesn't reap is dead for our purposes.
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []


def _pg(server: ServerProcess) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        "postgres", host="127.0.0.1", port=server.port, database="postgres", timeout=10
    )


def _redis(server: ServerProcess, timeout: float = 5.0) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=timeout, retry=Retry(NoBackoff(), 0))


def test_free_port_can_be_bound_and_is_not_handed_out_twice() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))


def test_postgres_runs_sql_and_keeps_committed_rows_across_restart_and_crash(
    postgres: ServerProcess,
) -> None:
    assert postgres.url == f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres"
    conn = _pg(postgres)
    conn.run("CREATE TABLE t (id int PRIMARY KEY, note text)")
    conn.run("INSERT INTO t VALUES (1, :note)", note="héllo")
    assert conn.run("SELECT note FROM t WHERE id = 1") == [["héllo"]]
    assert conn.run("SHOW max_connections") == [["200"]]
    assert conn.run("SHOW fsync") == [["on"]]
    # A new pytest session chmods /tmp/pytest-of-root back to 0700 while servers run; as
    # root, PostgreSQL runs as another user and must not depend on traversing that.
    postgres.data_dir.parent.chmod(0o700)
    conn.run("CHECKPOINT")
    conn.close()

    port, old_pid = postgres.port, postgres.pid
    postgres.restart()
    assert (postgres.port, postgres.is_running()) == (port, True)
    assert postgres.pid != old_pid
    conn = _pg(postgres)
    conn.run("INSERT INTO t VALUES (2, 'committed before the crash')")
    conn.close()

    procs = _processes(postgres)
    postgres.kill()
    _assert_gone(procs)
    assert not postgres.is_running() and postgres.pid is None
    postgres.restart()  # crash recovery replays the WAL
    conn = _pg(postgres)
    assert conn.run("SELECT id FROM t ORDER BY id") == [[1], [2]]
    conn.close()


def test_postgres_stop_leaves_no_process_and_is_idempotent(postgres: ServerProcess) -> None:
    procs = _processes(postgres)
    assert len(procs) > 1  # the postmaster and its helpers
    postgres.stop()
    _assert_gone(procs)
    postgres.stop()
    with pytest.raises(pg8000.exceptions.InterfaceError):
        _pg(postgres)


def test_a_paused_postgres_freezes_all_its_processes_until_resumed(
    postgres: ServerProcess,
) -> None:
    postgres.pause()
    try:
        procs = _processes(postgres)
        assert len(procs) > 1
        # A child that exited just before the pause stays a zombie until the postmaster reaps it.
        assert {p.status() for p in procs} <= {psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE}
        assert procs[0].status() == psutil.STATUS_STOPPED
        with pytest.raises(TimeoutError):
            pg8000.native.Connection("postgres", host="127.0.0.1", port=postgres.port, timeout=1)
    finally:
        postgres.resume()
    conn = _pg(postgres)
    assert conn.run("SELECT 1") == [[1]]
    conn.close()


def test_redis_sets_and_gets_and_answers_again_after_restart(valkey: ServerProcess) -> None:
    assert valkey.url == f"redis://127.0.0.1:{valkey.port}/0"
    with _redis(valkey) as client:
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
    port = valkey.port
    valkey.restart()
    assert valkey.port == port
    with _redis(valkey) as client:
        assert client.get("greeting") is None  # no persistence, by design
        client.set("greeting", "again")
        assert client.get("greeting") == b"again"


def test_a_paused_redis_times_out_and_answers_once_resumed(valkey: ServerProcess) -> None:
    valkey.pause()
    try:
        assert psutil.Process(valkey.pid).status() == psutil.STATUS_STOPPED
        with _redis(valkey, timeout=0.5) as client, pytest.raises(redis.TimeoutError):
            client.ping()
    finally:
        valkey.resume()
    with _redis(valkey) as client:
        assert client.ping() is True


def test_a_paused_redis_still_stops(valkey: ServerProcess) -> None:
    procs = _processes(valkey)
    valkey.pause()
    valkey.stop(timeout=5)
    _assert_gone(procs)


def test_redis_stop_leaves_no_process(valkey: ServerProcess) -> None:
    procs = _processes(valkey)
    valkey.stop()
    _assert_gone(procs)
    with _redis(valkey, timeout=1) as client, pytest.raises(redis.ConnectionError):
        client.ping()


def test_a_server_that_cannot_start_raises_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # bound, not listening: the server's bind fails fast
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=r"redis exited with code .*\n(.|\n)*in use"):
            start_redis(tmp_path / "redis", port=port, timeout=10)


def test_kafka_delivers_a_produced_message_to_a_consumer_group(kafka: ServerProcess) -> None:
    topic = f"test-{uuid.uuid4().hex[:8]}"
    create_topics(kafka.url, {topic: 3, f"{topic}-dlq": 1})
    create_topics(kafka.url, {topic: 3})  # idempotent

    producer = Producer({"bootstrap.servers": kafka.url, "logger": KAFKA_LOG})
    producer.produce(topic, value=b"hello kafka", key=b"k1")
    assert producer.flush(10) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": kafka.url,
            "group.id": f"g-{topic}",
            "session.timeout.ms": 6000,
            "auto.offset.reset": "earliest",
            "logger": KAFKA_LOG,
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        message = None
        while message is None and time.monotonic() < deadline:
            polled = consumer.poll(0.5)
            if polled is not None and polled.error() is None:
                message = polled
        assert message is not None, "no message within 60s"
        assert (message.key(), message.value()) == (b"k1", b"hello kafka")
    finally:
        consumer.close()

    procs = _processes(kafka)
    kafka.stop()
    _assert_gone(procs)


def test_smtp_sink_stores_a_mail_as_an_eml_file_and_refuses_reject_recipients(
    smtp: ServerProcess,
) -> None:
    assert smtp.url == f"smtp://127.0.0.1:{smtp.port}"
    msg = EmailMessage()
    msg["From"] = "jobs@example.test"
    msg["To"] = "user@example.test"
    msg["Subject"] = "Your report is ready"
    msg.set_content("Hello, the report is attached. Grüße")
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=10) as client:
        refused = client.send_message(msg, to_addrs=["user@example.test", "reject-me@example.test"])
        assert set(refused) == {"reject-me@example.test"}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("jobs@example.test", ["reject@example.test"], b"Subject: x\r\n\r\nx")

    files = sorted(smtp.data_dir.glob("*.eml"))
    assert len(files) == 1
    stored = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert stored["Subject"] == "Your report is ready"
    assert stored["X-Envelope-To"] == "user@example.test"
    assert "Grüße" in stored.get_content()
    assert files[0].name in smtp.log_path.read_text()

    procs = _processes(smtp)
    smtp.stop()
    _assert_gone(procs)
    assert "received SIGTERM" in smtp.log_path.read_text()


def test_a_publisher_under_load_confirms_sends_again_after_each_of_three_broker_restarts(
    kafka: ServerProcess,
) -> None:
    # The broker keeps everything in memory: a restart forgets the idempotent producer's id
    # and sequence numbers, and the producer's next poll() raises a fatal KafkaException.
    create_topics(kafka.url, {"job-queue": 4})
    publisher = Publisher(kafka.url, timeout=2, config={"logger": KAFKA_LOG})
    confirmed = [0]
    stop = threading.Event()

    def load(worker: int) -> None:
        # Keeps messages in flight, so that each restart catches some of them.
        n = 0
        while not stop.is_set():
            n += 1
            try:
                publisher.publish([job_event("job-queue", f"load-{worker}-{n}-{i}", "NOOP")
                                   for i in range(3)])
                confirmed[0] += 1
            except ServiceUnavailable:
                pass

    def confirmed_in_a_row(wanted: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        streak, last_error = 0, None
        while streak < wanted:
            assert time.monotonic() < deadline, f"{streak} confirmed in a row; {last_error}"
            try:
                publisher.publish([job_event("job-queue", uuid.uuid4(), "NOOP")])
                streak += 1
            except ServiceUnavailable as exc:
                streak, last_error = 0, exc

    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            before = confirmed[0]
            deadline = time.monotonic() + 30
            while confirmed[0] < before + 50:
                assert time.monotonic() < deadline, "the load made no progress"
                time.sleep(0.01)  # poll interval; the deadline bounds the wait
            kafka.restart()
            create_topics(kafka.url, {"job-queue": 4})
            confirmed_in_a_row(20, timeout=30)
            assert publisher._poller.is_alive()
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        publisher.close()


@pytest.mark.parametrize(("setting", "said"), [
    ({"JOBS_CALLBACK_ALLOWED_HOSTS": "hooks.example.com,host:99999"},
     "cannot start:\nJOBS_CALLBACK_ALLOWED_HOSTS entry 'host:99999': a port is a number"
     " from 1 to 65535"),
    ({"JOBS_LOG_LEVEL": "LOUD"}, "cannot start: JOBS_LOG_LEVEL must be one of DEBUG, INFO,"
     " WARNING, ERROR, CRITICAL, not 'LOUD'"),
    ({"JOBS_REPLICAS": "9"}, "cannot start: JOBS_REPLICAS must be a whole number from 1 to 8,"
     " not '9'"),
    ({"JOBS_HANDLER_MODULES": "/nonexistent/handlers.py"},
     "cannot start: JOBS_HANDLER_MODULES: no such file '/nonexistent/handlers.py'"),
    ({"PORT": "abc"}, "cannot start: PORT must be a port number from 1 to 65535, not 'abc'"),
])
def test_the_stack_refuses_a_bad_setting_in_one_line_before_it_starts_any_server(
        tmp_path: Path, setting: dict[str, str], said: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    env.update(setting)
    port = [] if "PORT" in setting else ["--port", str(free_port())]
    run = subprocess.run(
        [sys.executable, "-m", "infra.stack", "--data-dir", str(tmp_path / "data"), *port,
         "--quiet"], cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True,
        text=True, timeout=60)
    assert run.returncode != 0
    assert run.stderr.strip().startswith(said) and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "data").exists()  # no server was started, nothing written
