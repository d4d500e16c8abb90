"""Every Kafka client the system makes takes its security settings from one place.

The stack's broker (Tansu 0.6.0) speaks only plaintext: its `--cert` and `--key` options
refuse to be given together and `--cert` alone is ignored, and `--authentication` offers
no way to create the first user. So these tests show the settings reach every client by
pointing them, with TLS required, at that plaintext broker: each must fail to connect
instead of quietly talking plaintext, and work again with the default.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from confluent_kafka import KafkaException

from common import clients
from common.errors import ServiceUnavailable
from common.queue import job_event
from common.settings import get_settings, kafka_client_config
from infra import services
from infra.bridge import Bridge
from infra.gateway import readiness

pytestmark = pytest.mark.integration
PROBE_TOPIC = "kafka-security-probe"


@pytest.fixture(scope="module")
def probe_topic(stack) -> str:
    """A topic no function reads, made in plaintext: a client that ignored the TLS setting
    would reach it."""
    services.create_topics(stack.env["KAFKA_BOOTSTRAP_SERVERS"], {PROBE_TOPIC: 1})
    return PROBE_TOPIC


@pytest.fixture
def tls_required(function_env: dict[str, str], probe_topic: str, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("KAFKA_SSL_CA_LOCATION", str(ca))
    monkeypatch.setenv("JOBS_PUBLISH_TIMEOUT_SECONDS", "2")
    get_settings.cache_clear()
    return kafka_client_config(get_settings())


def test_every_client_uses_tls_when_told_to_and_never_falls_back(tls_required, stack):
    assert tls_required["security.protocol"] == "ssl"
    settings = get_settings()
    event = job_event(PROBE_TOPIC, "00000000-0000-4000-8000-000000000000", "ECHO")
    with pytest.raises(ServiceUnavailable):  # the submit and sweeper publisher
        clients.publisher().publish([event])
    checks = readiness({})  # the gateway's admin client
    assert checks["kafka"]["ok"] is False
    bridge = Bridge(bootstrap=settings.kafka_bootstrap_servers, topic=settings.queue_topic,
                    group="tls-probe", target="http://127.0.0.1:9", dlq_topic=None,
                    kafka_config=tls_required)
    with pytest.raises(Exception, match="transport|SSL|timed out|Timed out"):
        bridge._consumer.list_topics(timeout=2)  # the bridge's consumer
    bridge._consumer.close()
    with pytest.raises((KafkaException, RuntimeError, TimeoutError)):
        services.create_topics(settings.kafka_bootstrap_servers, {PROBE_TOPIC: 1}, timeout=3,
                               config=tls_required)  # the stack's topic set-up


def test_the_same_clients_work_with_the_default_plaintext(function_env, probe_topic):
    settings = get_settings()
    assert kafka_client_config(settings)["security.protocol"] == "plaintext"
    services.create_topics(settings.kafka_bootstrap_servers, {PROBE_TOPIC: 1},
                           config=kafka_client_config(settings))  # exists: no error
    event = job_event(PROBE_TOPIC, "00000000-0000-4000-8000-000000000001", "ECHO")
    clients.publisher().publish([event])  # to a topic of its own: no function reads it
    assert readiness({})["kafka"]["ok"] is True
