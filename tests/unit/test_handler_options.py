"""`@job_handler` options checked when a module is imported: rate limits and topics."""

from __future__ import annotations

import pytest

from common.handlers import get_job_type, job_handler
from common.ratelimits import RateLimit, parse_rate_limit


@pytest.mark.parametrize(("text", "count", "period"), [
    ("100/m", 100, 60.0), ("5/s", 5, 1.0), ("1/h", 1, 3600.0), (" 3 / second ", 3, 1.0),
    ("7/MIN", 7, 60.0), ("2/hour", 2, 3600.0)])
def test_a_rate_limit_is_a_count_per_second_minute_or_hour(text, count, period):
    assert parse_rate_limit(text) == RateLimit(count, period)


def test_a_rate_limits_burst_is_its_count_and_then_one_per_interval():
    assert parse_rate_limit("5/s").interval == pytest.approx(0.2)
    assert parse_rate_limit("120/m").interval == pytest.approx(0.5)


@pytest.mark.parametrize("text", ["", "5", "5/d", "0/s", "-1/s", "1.5/s", "5/s/s", "s/5",
                                  "10000000/s", "five/s"])
def test_a_malformed_rate_limit_is_refused_at_decoration_time(text):
    with pytest.raises(ValueError, match="rate_limit"):
        job_handler("BAD_RATE", rate_limit=text)


@pytest.mark.parametrize("topic", ["", ".", "..", "job queue", "jobs/reports", "é", "a" * 250,
                                   "job-queue:reports"])
def test_a_topic_kafka_would_refuse_is_refused_at_decoration_time(topic):
    with pytest.raises(ValueError, match="topic"):
        job_handler("BAD_TOPIC", topic=topic)


def test_a_type_may_have_a_rate_limit_a_concurrency_limit_and_a_topic_at_once():
    @job_handler("UNIT_LIMITED", rate_limit="10/m", concurrency=2, topic="job-queue.unit_1")
    def limited(payload):
        return None

    declared = get_job_type("UNIT_LIMITED")
    assert declared is not None and declared.limited
    assert declared.rate_limit == RateLimit(10, 60.0) and declared.concurrency == 2
    assert declared.topic == "job-queue.unit_1"
    assert get_job_type("BAD_RATE") is None and get_job_type("BAD_TOPIC") is None


def test_the_openapi_document_states_a_types_limits_and_topic():
    from common.openapi import build_openapi

    @job_handler("UNIT_DOCUMENTED", rate_limit="120/minute", concurrency=3,
                 topic="job-queue-documented")
    def documented(payload):
        """Do nothing."""

    @job_handler("UNIT_PLAIN")
    def plain(payload):
        """Do nothing."""

    schemas = build_openapi()["components"]["schemas"]
    assert schemas["Submit_UNIT_DOCUMENTED"]["description"] == (
        "Do nothing. (at most 3 running at once; rate limit 120/m;"
        " Kafka topic job-queue-documented)")
    assert schemas["Submit_UNIT_PLAIN"]["description"] == "Do nothing."
