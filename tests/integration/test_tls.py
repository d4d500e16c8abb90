"""PostgreSQL and Redis over TLS, verified: `JOBS_LOCAL_TLS=1` runs the whole stack so.

The PyPI builds of PostgreSQL and Valkey have no TLS, so these tests use the distribution's
servers (Debian's postgresql and redis-server, on this project's machines), started on
ports and folders of their own. Kafka stays plaintext: Tansu 0.6.0 cannot serve TLS (see
tests/integration/test_kafka_security.py for how its clients' settings are checked).
The stack is the one test_topics runs on too (tests/integration/conftest.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pg8000.native
import pytest
import trustme

from common.cache import StatusCache
from common.db import Database, connect_kwargs
from common.errors import ServiceUnavailable
from infra.stack import Stack
from tests.support.client import Api
from tests.support.stacks import tls_servers_missing

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_stack(request: pytest.FixtureRequest) -> Stack:
    if missing := tls_servers_missing():
        pytest.skip(f"no TLS-capable servers on this machine: {missing}")
    stack: Stack = request.getfixturevalue("tls_lanes_stack")
    assert stack.local_tls
    return stack


def test_the_tls_stack_runs_jobs_with_every_connection_encrypted(tls_stack: Stack):
    database_url, redis_url = tls_stack.env["DATABASE_URL"], tls_stack.env["REDIS_URL"]
    assert "sslmode=verify-full" in database_url and "sslrootcert=" in database_url
    assert redis_url.startswith("rediss://") and "ssl_cert_reqs=required" in redis_url

    api = Api(tls_stack.gateway_url, tls_stack.admin_token)
    job_id = api.submit("ECHO", {"message": "over TLS"}).json["job_id"]
    assert api.wait_status(job_id)["result"]["echo"] == "over TLS"

    db = Database(database_url, size=1)
    try:
        # Every TCP client of the server (functions, sweeper, this test) uses TLS.
        rows = db.run("SELECT a.application_name, s.ssl, s.version FROM pg_stat_ssl s"
                      " JOIN pg_stat_activity a USING (pid) WHERE a.client_addr IS NOT NULL")
    finally:
        db.close()
    assert len(rows) > 1
    assert all(ssl and version.startswith("TLS") for _, ssl, version in rows), rows


def test_postgresql_refuses_plaintext_and_a_client_refuses_a_server_it_cannot_verify(
        tls_stack: Stack, tmp_path: Path):
    url = tls_stack.env["DATABASE_URL"]
    kwargs: dict[str, Any] = connect_kwargs(url)
    with pytest.raises(pg8000.native.DatabaseError, match="no encryption"):
        pg8000.native.Connection(**{**kwargs, "ssl_context": False})
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    with pytest.raises(ServiceUnavailable, match="CERTIFICATE_VERIFY_FAILED|certificate"):
        Database(url.replace(url.split("sslrootcert=")[1], str(stranger)), size=1).run(
            "SELECT 1")


def test_redis_serves_tls_only_and_a_client_refuses_a_server_it_cannot_verify(
        tls_stack: Stack, tmp_path: Path):
    url = tls_stack.env["REDIS_URL"]
    assert StatusCache(url).put([{"job_id": "tls-probe", "version": 1, "status": "COMPLETED"}])
    plain = StatusCache(url.replace("rediss://", "redis://", 1).split("?")[0])
    assert plain.get("tls-probe") is None and not plain.available  # no plaintext port
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    doubtful = StatusCache(url.replace(url.split("ssl_ca_certs=")[1].split("&")[0],
                                       str(stranger)))
    assert doubtful.get("tls-probe") is None and not doubtful.available
