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
