"""The job state graph and the retry policy: pure logic, no services."""

import random

import pytest

from common.lifecycle import TRANSITIONS, IllegalTransition, check, sources_of, transition
from common.models import JobStatus as S
from common.retry import RetryPolicy


def test_the_graph_is_exactly_the_one_in_the_spec():
    edges = {(a.value, b.value) for a, targets in TRANSITIONS.items() for b in targets}
    assert edges == {
        ("QUEUED", "IN_PROGRESS"), ("IN_PROGRESS", "COMPLETED"), ("IN_PROGRESS", "FAILED"),
        ("FAILED", "RETRYING"), ("RETRYING", "IN_PROGRESS"), ("FAILED", "DEAD_LETTER"),
        ("DEAD_LETTER", "QUEUED"),
        # cancellation, added for the operator features
        ("QUEUED", "CANCELLED"), ("RETRYING", "CANCELLED"), ("IN_PROGRESS", "CANCELLED"),
        # dependencies: a child waits for its parents, is cancelled by a failed one, and
        # waits again when that parent is replayed with its dependents
        ("WAITING", "QUEUED"), ("WAITING", "CANCELLED"), ("CANCELLED", "WAITING"),
    }


def test_completed_is_terminal_and_nothing_moves_a_job_backwards_to_queued_but_replay():
    assert TRANSITIONS[S.COMPLETED] == frozenset()
    assert TRANSITIONS[S.CANCELLED] == {S.WAITING}  # only for a job cancelled by its parent
    assert sources_of(S.QUEUED) == {S.DEAD_LETTER, S.WAITING}
    assert sources_of(S.IN_PROGRESS) == {S.QUEUED, S.RETRYING}


@pytest.mark.parametrize("source,target", [(S.COMPLETED, S.IN_PROGRESS), (S.QUEUED, S.COMPLETED),
                                           (S.RETRYING, S.DEAD_LETTER)])
def test_a_move_outside_the_graph_is_refused(source, target):
    with pytest.raises(IllegalTransition):
        check(source, target)


def test_transition_refuses_an_illegal_move_before_touching_the_database():
    with pytest.raises(IllegalTransition):
        transition(None, "x", S.COMPLETED, sources=[S.QUEUED])  # type: ignore[arg-type]


def test_transition_refuses_to_set_unknown_columns():
    with pytest.raises(ValueError, match="cannot set"):
        transition(None, "x", S.COMPLETED, values={"status; DROP TABLE jobs": 1})  # type: ignore


def test_backoff_doubles_and_is_capped():
    policy = RetryPolicy(base_seconds=1, max_seconds=5, jitter=0)
    assert [policy.delay(n) for n in range(5)] == [1, 2, 4, 5, 5]


def test_jitter_stays_within_its_bounds():
    policy = RetryPolicy(base_seconds=10, max_seconds=100, jitter=0.2, rng=random.Random(7))
    delays = [policy.delay(0) for _ in range(200)]
    assert all(8 <= d <= 12 for d in delays) and len(set(delays)) > 100


def test_a_retryable_errors_own_delay_is_a_floor():
    assert RetryPolicy(base_seconds=1, jitter=0).delay(0, at_least=30) == 30


def test_the_budget_is_spent_after_max_retries_and_a_job_can_override_it():
    policy = RetryPolicy(max_retries=3)
    assert not policy.exhausted(2) and policy.exhausted(3)
    assert policy.exhausted(0, max_retries=0) and not policy.exhausted(5, max_retries=10)


def test_the_cache_calls_final_exactly_the_states_no_transition_leaves():
    from common.cache import FINAL_STATES, is_final

    # CANCELLED's one way out is for jobs cancelled by a parent (`cancelled_by`), which
    # the cache never takes for final.
    leaving = {s.value for s, targets in TRANSITIONS.items() if targets <= {S.WAITING}}
    assert leaving == FINAL_STATES
    assert is_final({"status": "CANCELLED", "cancelled_by": None})
    assert not is_final({"status": "CANCELLED", "cancelled_by": "2b1e..."})
    assert sources_of(S.WAITING) == {S.CANCELLED}
