"""The stack that test_tls and test_topics share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.stack import Stack
from tests.conftest import TEST_HANDLERS
from tests.support.stacks import LANES_IN_FLIGHT, TOPIC_HANDLERS, own_stack, tls_servers_missing


@pytest.fixture(scope="package")
def tls_lanes_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own with what the session's lacks: TLS-only PostgreSQL and Redis
    (`JOBS_LOCAL_TLS=1`, where the machine has such servers) for test_tls, and job types
    with a topic of their own, few records in flight per bridge and one process worker
    for test_topics. Neither configuration gets in the way of the other's tests, and one
    stack fewer to start and stop saves 15-20 s."""
    env = {"JOBS_HANDLER_MODULES": f"{TEST_HANDLERS},{TOPIC_HANDLERS}",
           "JOBS_BACKOFF_BASE_SECONDS": "0.2", "JOBS_BACKOFF_MAX_SECONDS": "1",
           "JOBS_LOCAL_TLS": "0" if tls_servers_missing() else "1"}
    with own_stack(tmp_path_factory.mktemp("tls-lanes"), env, sweep_interval=0.5,
                   process_workers=1, bridge_in_flight=LANES_IN_FLIGHT,
                   batch_size=4) as stack:
        yield stack
