"""Stacks of a test module's own (the fault tiers stop and restart their servers)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra import services
from infra.stack import Stack
from tests.conftest import SERVICE_VARS, TEST_HANDLERS

TOPIC_HANDLERS = str(Path(__file__).resolve().parent / "topic_handlers.py")
LANES_IN_FLIGHT = 8  # records each bridge delivers at once: a flood of more fills its window

# Short leases, requeue times and backoff, so recovery happens within a test's patience.
FAULT_ENV = {"JOBS_LEASE_SECONDS": "3", "JOBS_REQUEUE_AFTER_SECONDS": "4",
             "JOBS_BACKOFF_BASE_SECONDS": "0.1", "JOBS_BACKOFF_MAX_SECONDS": "0.5"}


@contextlib.contextmanager
def own_stack(folder: Path, env: dict[str, str] | None = None, **options: Any
              ) -> Iterator[Stack]:
    """A whole stack with servers of its own in `folder` and the test handlers: this
    process's environment without service URLs, plus `env`; `options` go to Stack."""
    full = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    full.update({"JOBS_HANDLER_MODULES": TEST_HANDLERS, **(env or {})})  # env may replace it
    stack = Stack(folder, gateway_port=services.free_port(), echo=False, env=full,
                  **options).start()
    try:
        yield stack
    finally:
        stack.stop()


def tls_servers_missing() -> str | None:
    """Why this machine cannot run a TLS stack (the distribution's PostgreSQL and Redis:
    the PyPI builds have no TLS), or None if it can."""
    try:
        services.system_postgres_bindir(), services.system_redis_server()
    except RuntimeError as exc:
        return str(exc)
    return None
