"""Fixtures: the real stack, started once per session on its own ports and data folder."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.client import Api
from tests.support.services import service_urls

ROOT = Path(__file__).resolve().parents[1]
TEST_HANDLERS = str(ROOT / "tests" / "support" / "handlers.py")
SERVICE_VARS = ("DATABASE_URL", "REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS", "SMTP_URL")


def _reset_clients() -> None:
    from common import cache, clients, db, queue, settings

    settings.get_settings.cache_clear()
    clients._ready.clear()
    clients._processor = None
    clients._marks.clear()
    clients._writers.clear()
    cache._caches.clear()
    db._databases.clear()
    for publisher in queue._publishers.values():
        publisher.close()  # else librdkafka keeps reconnecting to a stopped broker
    queue._publishers.clear()


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """functions-framework and our settings read os.environ: give each test a clean copy."""
    saved = dict(os.environ)
    for name in (*SERVICE_VARS, "JOBS_HANDLER_MODULES"):
        monkeypatch.delenv(name, raising=False)
    _reset_clients()
    yield
    os.environ.clear()
    os.environ.update(saved)
    _reset_clients()


CALLBACK_SECRET = "callback-" + secrets.token_urlsafe(16)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """PostgreSQL, Redis, Kafka, SMTP sink, every function, bridges and gateway."""
    from infra import services
    from infra.stack import Stack

    data_dir = tmp_path_factory.mktemp("stack")
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    urls = contextlib.ExitStack()
    env.update(urls.enter_context(service_urls(os.environ)))  # JOBS_TEST_SERVICES
    env.update(
        JOBS_HANDLER_MODULES=TEST_HANDLERS,
        JOBS_BACKOFF_BASE_SECONDS="0.2",
        JOBS_BACKOFF_MAX_SECONDS="1",
        JOBS_REQUEUE_AFTER_SECONDS="10",
        JOBS_GATEWAY_READ_TIMEOUT_SECONDS="3",  # tests/integration/test_events.py
        JOBS_EVENTS_HEARTBEAT_SECONDS="1",  # tests/integration/test_events.py
        JOBS_METRICS_TOKEN="scrape-" + secrets.token_urlsafe(16),
        # tests/integration/test_callbacks.py: receivers on this machine, quick retries
        JOBS_CALLBACK_SECRET=CALLBACK_SECRET,
        JOBS_CALLBACK_ALLOWED_HOSTS="127.0.0.1",
        JOBS_CALLBACK_BACKOFF_BASE_SECONDS="0.2",
        JOBS_CALLBACK_MAX_ATTEMPTS="3",
    )
    running = Stack(data_dir, gateway_port=services.free_port(), echo=False, env=env,
                    sweep_interval=0.5).start()
    yield running
    running.stop()
    urls.close()


@pytest.fixture(scope="session")
def api(stack: object) -> Api:
    return Api(stack.gateway_url, stack.admin_token)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def database_url(stack: object) -> str:
    return stack.env["DATABASE_URL"]  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
def function_env(stack: object, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point in-process functions (create_app(...).test_client()) at the stack's services."""
    env = stack.env  # type: ignore[attr-defined]
    for name in (*SERVICE_VARS, "JOBS_HANDLER_MODULES", "JOBS_ARTIFACT_DIR"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("JOBS_BACKOFF_BASE_SECONDS", "0")
    monkeypatch.setenv("JOBS_TOKEN", stack.admin_token)  # type: ignore[attr-defined]
    _reset_clients()
    return dict(os.environ)
