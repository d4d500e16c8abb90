"""Where the suite's services come from: embedded by default, testcontainers on request."""

from __future__ import annotations

import pytest

from tests.support.services import (
    ServicesUnavailable,
    docker_engine,
    selected_mode,
    service_urls,
)


def test_the_embedded_servers_are_the_default_and_need_no_urls():
    assert selected_mode({}) == "embedded" == selected_mode({"JOBS_TEST_SERVICES": " "})
    with service_urls({}) as urls:
        assert urls == {}


def test_an_unknown_mode_is_an_error():
    with pytest.raises(ServicesUnavailable, match="must be one of embedded, testcontainers"):
        selected_mode({"JOBS_TEST_SERVICES": "docker"})


def test_testcontainers_without_a_docker_engine_is_an_error_not_a_fallback(tmp_path):
    env = {"JOBS_TEST_SERVICES": "TestContainers",
           "DOCKER_HOST": f"unix://{tmp_path / 'docker.sock'}"}
    assert selected_mode(env) == "testcontainers"
    with pytest.raises(ServicesUnavailable, match="needs a Docker engine"), \
            service_urls(env):
        pass


def test_a_docker_engine_that_exists_is_used(tmp_path):
    sock = tmp_path / "docker.sock"
    sock.touch()
    assert docker_engine({"DOCKER_HOST": f"unix://{sock}"}) == f"unix://{sock}"
    assert docker_engine({"DOCKER_HOST": "tcp://10.0.0.5:2376"}) == "tcp://10.0.0.5:2376"
