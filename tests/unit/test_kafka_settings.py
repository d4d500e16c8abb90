"""Kafka connection settings: one place for every client, errors instead of ignored values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.settings import kafka_client_config, load_settings

BROKERS = {"KAFKA_BOOTSTRAP_SERVERS": "broker-1:9092,broker-2:9092"}
SASL = {**BROKERS, "KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "KAFKA_SASL_MECHANISM": "PLAIN",
        "KAFKA_SASL_USERNAME": "api-key", "KAFKA_SASL_PASSWORD": "api-secret"}


def test_plaintext_is_the_default_and_says_so():
    assert kafka_client_config(load_settings(BROKERS)) == {
        "bootstrap.servers": "broker-1:9092,broker-2:9092", "security.protocol": "plaintext"}


def test_sasl_ssl_as_confluent_cloud_wants_it(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    conf = kafka_client_config(load_settings({**SASL, "KAFKA_SSL_CA_LOCATION": str(ca)}))
    assert conf == {"bootstrap.servers": "broker-1:9092,broker-2:9092",
                    "security.protocol": "sasl_ssl", "sasl.mechanism": "PLAIN",
                    "sasl.username": "api-key", "sasl.password": "api-secret",
                    "ssl.ca.location": str(ca)}


def test_any_other_librdkafka_property_passes_through_kafka_config_variables():
    conf = kafka_client_config(load_settings({
        **SASL, "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_CONFIG_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM": "https",
        "KAFKA_CONFIG_CLIENT_RACK": "europe-west1-b"}))
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["ssl.endpoint.identification.algorithm"] == "https"
    assert conf["client.rack"] == "europe-west1-b"


@pytest.mark.parametrize("env,says", [
    ({"KAFKA_SECURITY_PROTOCOL": "tls"}, "KAFKA_SECURITY_PROTOCOL must be one of"),
    ({**SASL, "KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM must be one of"),
    ({**SASL, "KAFKA_SASL_MECHANISM": ""}, "set KAFKA_SASL_MECHANISM too"),
    ({**SASL, "KAFKA_SASL_PASSWORD": ""}, "needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"),
    ({**BROKERS, "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"},
     "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD set, but KAFKA_SECURITY_PROTOCOL is PLAINTEXT"),
    ({**BROKERS, "KAFKA_SSL_CA_LOCATION": "/etc/hosts"}, "KAFKA_SSL_CA_LOCATION set, but"),
    ({**BROKERS, "KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_LOCATION": "/no/such/ca.pem"},
     "is not a file"),
])
def test_a_setting_that_cannot_take_effect_is_an_error(env, says):
    with pytest.raises(ValidationError) as caught:
        load_settings(env)
    assert says in str(caught.value)
    assert "api-secret" not in str(caught.value)  # values are never echoed


def test_a_pass_through_may_not_shadow_a_named_setting():
    with pytest.raises(ValueError, match="KAFKA_CONFIG_SASL_PASSWORD: set KAFKA_SASL_PASSWORD"):
        load_settings({**SASL, "KAFKA_CONFIG_SASL_PASSWORD": "other"})
