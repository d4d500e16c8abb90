"""Where the test suite's session stack gets PostgreSQL, Redis and Kafka.

`JOBS_TEST_SERVICES` unset or `embedded` (the default): the stack starts its own servers
from PyPI packages (infra/services.py), which needs nothing installed. `testcontainers`:
containers from the `testcontainers` package (`pip install -e '.[testcontainers]'`) on a
Docker engine; asking for them without one is an error, never a silent fallback. This
project's build machines have no Docker engine, so that mode is not run here; only this
selection is tested. The fault tiers always start embedded servers of their own, since
they stop and restart them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

MODES = ("embedded", "testcontainers")


class ServicesUnavailable(RuntimeError):  # noqa: N818 - the name says what it is
    """The services asked for cannot be had here."""


def selected_mode(env: Mapping[str, str]) -> str:
    mode = env.get("JOBS_TEST_SERVICES", "").strip().lower() or "embedded"
    if mode not in MODES:
        raise ServicesUnavailable(
            f"JOBS_TEST_SERVICES must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def docker_engine(env: Mapping[str, str]) -> str:
    """Where the Docker engine is, or ServicesUnavailable saying why there is none."""
    host = env.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and not os.path.exists(host[len("unix://"):]):
        raise ServicesUnavailable(
            f"JOBS_TEST_SERVICES=testcontainers needs a Docker engine; {host} does not exist"
            " (unset JOBS_TEST_SERVICES to use the embedded servers)")
    return host


@contextlib.contextmanager
def service_urls(env: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """The service URLs to hand the stack: none in embedded mode (it starts its own),
    containers' in testcontainers mode, stopped on exit."""
    if selected_mode(env) == "embedded":
        yield {}
        return
    docker_engine(env)
    try:
        from testcontainers.kafka import KafkaContainer
        from testcontainers.postgres import PostgresContainer
        from testcontainers.redis import RedisContainer
    except ImportError as exc:
        raise ServicesUnavailable(
            "JOBS_TEST_SERVICES=testcontainers needs the testcontainers package:"
            " pip install -e '.[testcontainers]'") from exc
    with PostgresContainer("postgres:16", driver=None) as pg, \
            RedisContainer("redis:7") as rd, KafkaContainer() as kafka:
        yield {
            "DATABASE_URL": pg.get_connection_url(),
            "REDIS_URL": f"redis://{rd.get_container_host_ip()}:"
                         f"{rd.get_exposed_port(6379)}/0",
            "KAFKA_BOOTSTRAP_SERVERS": kafka.get_bootstrap_server(),
        }
