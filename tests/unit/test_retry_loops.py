"""The one retry policy, run in-process (`RetryPolicy.retrying`): outcome writes through an
outage, bridge deliveries through a function's outage."""

import threading
import time

import pytest
import tenacity

from common.errors import ServiceUnavailable
from common.retry import RetryPolicy
from infra.bridge import Delivery

FAST = RetryPolicy(max_retries=2, base_seconds=0.001, max_seconds=0.004, jitter=0)


class Flaky:
    """Fails `failures` times (raising, or answering `bad`), then answers `good`."""

    def __init__(self, failures: int, bad: object = None, good: object = "done") -> None:
        self.failures, self.bad, self.good, self.calls = failures, bad, good, 0

    def __call__(self) -> object:
        self.calls += 1
        if self.calls <= self.failures:
            if self.bad is None:
                raise ServiceUnavailable("PostgreSQL", f"down (call {self.calls})")
            return self.bad
        return self.good


def on_outage(**kw):
    return FAST.retrying(retry=tenacity.retry_if_exception_type(ServiceUnavailable), **kw)


def test_an_outage_shorter_than_the_patience_is_waited_out():
    call = Flaky(failures=5)  # more than max_retries: patience, not the count, decides
    assert on_outage(patience=5.0)(call) == "done"
    assert call.calls == 6


def test_past_the_patience_the_last_error_itself_is_raised():
    call = Flaky(failures=10**6)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="down"):
        on_outage(patience=0.05)(call)
    assert time.monotonic() - started < 2.0
    assert call.calls > 3


def test_errors_it_does_not_retry_go_straight_through():
    def broken():
        raise KeyError("bug")

    with pytest.raises(KeyError):
        on_outage(patience=5.0)(broken)


def test_a_bad_result_is_retried_max_retries_times_then_returned_as_it_is():
    call = Flaky(failures=10, bad="503")
    retrying = FAST.retrying(retry=tenacity.retry_if_result(lambda r: r != "done"))
    assert retrying(call) == "503"
    assert call.calls == 3  # the first try and max_retries=2 retries


def test_forever_keeps_retrying_past_max_retries():
    call = Flaky(failures=6, bad="503")
    retrying = FAST.retrying(retry=tenacity.retry_if_result(lambda r: r != "done"),
                             forever=lambda state: True)
    assert retrying(call) == "done"
    assert call.calls == 7


def test_a_stop_request_ends_the_wait_at_once():
    slow = RetryPolicy(max_retries=5, base_seconds=30, max_seconds=30, jitter=0)
    stopping = threading.Event()
    call = Flaky(failures=10, bad="503")
    threading.Timer(0.1, stopping.set).start()
    started = time.monotonic()
    result = slow.retrying(retry=tenacity.retry_if_result(lambda r: r != "done"),
                           forever=lambda state: True, stopping=stopping)(call)
    assert result == "503"
    assert time.monotonic() - started < 10  # not the 30 s wait
    assert call.calls <= 2


def test_the_waits_follow_the_policy():
    waits = []
    policy = RetryPolicy(max_retries=4, base_seconds=0.002, max_seconds=0.008, jitter=0)
    retrying = policy.retrying(retry=tenacity.retry_if_result(lambda r: r != "done"))
    retrying.sleep = waits.append  # tenacity's own hook for the wait
    retrying(Flaky(failures=10, bad="503"))
    assert waits == [0.002, 0.004, 0.008, 0.008]


@pytest.mark.parametrize(("status", "final", "outage"), [
    (200, True, False), (202, True, False), (400, True, False), (404, True, False),
    (408, False, True), (429, False, True), (500, False, False), (502, False, True),
    (503, False, True), (504, False, True), (None, False, True),
])
def test_which_deliveries_are_retried_and_which_wait_out_an_outage(status, final, outage):
    delivery = Delivery(status, b"", 1)
    assert (delivery.final, delivery.outage) == (final, outage)
