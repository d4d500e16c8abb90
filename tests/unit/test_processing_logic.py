"""What is pure in the processing path: retry delays, message parsing, error descriptions,
answers to deliveries that run nothing, the batch statements' parameters, and the cache
client's behaviour before it ever talks to Redis. No services: what needs PostgreSQL or
Redis is tested against real ones in tests/integration/test_db_and_cache.py.

Not here, because it is not pure: which outcome an exception leads to (`Processor._fail`
builds a `Failure` per error, `record_failures` decides RETRYING or DEAD_LETTER inside its
SQL transaction) and everything in common/sweeper.py (each function is a query); the
lifecycle state machine and test_db_and_cache.py drive those on PostgreSQL.
"""

from __future__ import annotations

import json
import uuid

import pytest

from common.cache import StatusCache, cache_key, get_cache
from common.errors import HandlerTimeout, PermanentError, RetryableError
from common.handlers import JobType
from common.jobs import claim_many_sql, complete_many_sql
from common.lifecycle import transition_many_sql
from common.logs import job_context
from common.models import JobMessage, JobStatus
from common.outcomes import (
    MAX_ERROR_CHARS,
    Outcome,
    describe,
    job_context_of,
    policy_for,
    record_failures,
)
from common.processing import PoisonMessage, _not_waiting, parse_message
from common.retry import RetryPolicy
from common.settings import Settings

S = JobStatus


class Jitter:
    """An injected random source: always draws `pick` ("low" or "high") of its range."""

    def __init__(self, pick: str) -> None:
        self.pick = pick
        self.asked: list[tuple[float, float]] = []

    def uniform(self, low: float, high: float) -> float:
        self.asked.append((low, high))
        return low if self.pick == "low" else high


class NoRandomness:
    def uniform(self, low: float, high: float) -> float:
        raise AssertionError("no jitter should be drawn")


# -- retry delays ----------------------------------------------------------------------


@pytest.mark.parametrize("pick,factor", [("low", 0.75), ("high", 1.25)])
def test_jitter_scales_the_delay_by_the_amount_drawn_within_plus_or_minus_jitter(pick, factor):
    rng = Jitter(pick)
    policy = RetryPolicy(base_seconds=2, max_seconds=100, jitter=0.25, rng=rng)
    assert policy.delay(3) == 16 * factor
    assert rng.asked == [(-0.25, 0.25)]


def test_the_cap_applies_before_jitter_so_a_capped_delay_still_spreads():
    policy = RetryPolicy(base_seconds=1, max_seconds=10, jitter=0.5, rng=Jitter("high"))
    assert policy.delay(20) == 15


def test_a_huge_retry_count_is_the_cap_not_an_overflow():
    assert RetryPolicy(base_seconds=1, max_seconds=300, jitter=0).delay(10**6) == 300


def test_no_backoff_means_no_delay_and_no_jitter_drawn():
    policy = RetryPolicy(base_seconds=0, max_seconds=0, jitter=0.2, rng=NoRandomness())
    assert [policy.delay(n) for n in range(4)] == [0, 0, 0, 0]


def test_a_retryable_errors_delay_is_a_floor_even_below_the_jittered_delay():
    policy = RetryPolicy(base_seconds=8, max_seconds=100, jitter=0.5, rng=Jitter("low"))
    assert policy.delay(0, at_least=5) == 5  # 8 jittered down to 4, floor 5
    assert policy.delay(0, at_least=3) == 4


def test_a_types_backoff_overrides_the_global_one_and_the_rest_stays_global():
    settings = Settings(max_retries=7, backoff_base_seconds=1, backoff_max_seconds=300,
                        backoff_jitter=0.1)
    global_policy = policy_for(settings, None)
    assert (global_policy.max_retries, global_policy.base_seconds, global_policy.max_seconds,
            global_policy.jitter) == (7, 1, 300, 0.1)
    typed = JobType("T", func=lambda payload: None, backoff_base_seconds=0,
                    backoff_max_seconds=None)
    policy = policy_for(settings, typed)
    # 0 is a setting, not "unset": a type may turn backoff off.
    assert (policy.max_retries, policy.base_seconds, policy.max_seconds, policy.jitter) == (
        7, 0, 300, 0.1)


# -- messages and answers --------------------------------------------------------------


def test_a_job_message_is_parsed_from_the_events_data():
    job_id = uuid.uuid4()
    assert parse_message({"job_id": str(job_id), "job_type": "ECHO", "extra": 1}) == JobMessage(
        job_id=job_id, job_type="ECHO")


@pytest.mark.parametrize("data,reason", [
    (b'{"job_id": "x"}', "not a JSON object"),
    ('{"job_id": "x"}', "not a JSON object"),
    ({"job_type": "ECHO"}, "bad or missing: job_id"),
    ({"job_id": "not-a-uuid", "job_type": "ECHO"}, "bad or missing: job_id"),
    ({}, "bad or missing: job_id, job_type"),
    (None, "bad or missing: data"),
])
def test_data_that_is_no_job_message_is_poison_and_says_why(data, reason):
    with pytest.raises(PoisonMessage, match=reason):
        parse_message(data)


def test_a_delivery_of_a_job_that_is_not_waiting_is_ignored_with_its_status():
    assert _not_waiting("j", {"status": "IN_PROGRESS"}) == Outcome(
        "j", "ignored", "IN_PROGRESS", "job is not waiting to run")


def test_a_delivery_of_a_job_that_does_not_exist_is_poison():
    answer = _not_waiting("j", None)
    assert isinstance(answer, PoisonMessage) and "no job j" in str(answer)


def test_recording_no_failures_touches_no_database():
    assert record_failures(None, []) == []


# -- error descriptions ----------------------------------------------------------------


def fail_here(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as exc:
        return exc


def test_an_unexpected_error_is_described_with_the_line_that_raised_it():
    error = fail_here(RuntimeError("boom"))
    line = error.__traceback__.tb_lineno
    assert describe(error) == f"RuntimeError: boom (at test_processing_logic.py:{line})"


@pytest.mark.parametrize("error", [PermanentError("bad input"), RetryableError("bad input", 3),
                                   HandlerTimeout("bad input")])
def test_a_job_error_is_described_by_its_message_alone(error):
    assert describe(fail_here(error)) == f"{type(error).__name__}: bad input"


def test_an_error_without_a_message_is_described_by_its_type():
    assert describe(ValueError()) == "ValueError"


def test_a_description_is_bounded():
    assert len(describe(PermanentError("x" * 10 * MAX_ERROR_CHARS))) == MAX_ERROR_CHARS


def test_log_lines_within_a_jobs_context_name_it_and_the_context_ends_after():
    row = {"job_id": uuid.UUID(int=1), "attempts": 2, "job_type": "ECHO"}
    assert job_context.get() is None
    with job_context_of(row):
        assert job_context.get() == {"job_id": str(row["job_id"]), "attempt": 2,
                                     "job_type": "ECHO"}
    assert job_context.get() is None


# -- the batch statements --------------------------------------------------------------


def test_a_batch_claim_takes_waiting_jobs_whatever_their_attempt():
    ids = [str(uuid.uuid4()) for _ in range(3)]
    sql, params = claim_many_sql(ids, 30)
    assert params["r_id"] == ids and params["lease"] == 30.0
    assert set(params["sources"]) == {"QUEUED", "RETRYING"} and params["target"] == "IN_PROGRESS"
    assert "r_attempt" not in params and "jobs.attempts = r.r_attempt" not in sql


def test_a_batch_completion_is_fenced_by_each_attempt_and_leaves_only_in_progress():
    done = [(str(uuid.uuid4()), 2, {"rows": 3}), (str(uuid.uuid4()), 1, None)]
    sql, params = complete_many_sql(done)
    assert params["sources"] == ["IN_PROGRESS"] and params["target"] == "COMPLETED"
    assert params["r_id"] == [d[0] for d in done] and params["r_attempt"] == [2, 1]
    assert params["r_result"] == [json.dumps({"rows": 3}), None]
    assert "jobs.attempts = r.r_attempt" in sql


@pytest.mark.parametrize("rows,values", [
    ({"id": ["a", "b"], "attempt": [1]}, {}),  # one attempt for two jobs
    ({"attempt": [1]}, {}),  # no ids
    ({"id": ["a"], "colour": ["red"]}, {}),  # a field it does not know
    ({"id": ["a"]}, {"result_json": "result"}),  # a value from a field not given
])
def test_a_batch_transition_refuses_rows_that_do_not_line_up(rows, values):
    with pytest.raises(ValueError):
        transition_many_sql(S.COMPLETED, rows, sources=[S.IN_PROGRESS], values=values)


# -- the cache client, before any I/O --------------------------------------------------


def test_a_cache_client_is_built_once_per_url_without_touching_redis():
    url = "redis://127.0.0.1:1/0"  # nothing listens there: any I/O would fail
    cache = get_cache(url)
    assert get_cache(url) is cache and cache.available


def test_storing_no_documents_asks_nothing_of_redis_and_trips_nothing():
    cache = StatusCache("redis://127.0.0.1:1/0")
    assert cache.put([]) is False
    assert cache.available


def test_each_job_has_its_own_cache_key():
    assert cache_key("abc") == "jobs:status:abc" != cache_key("abd")
