"""The publisher's poll loop and producer replacement, with a fake producer in place of
librdkafka's (the real one against a real broker: tests/integration/test_services.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from common import queue
from common.errors import ServiceUnavailable
from common.queue import Publisher, job_event

OUT_OF_ORDER = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
                          "the broker lost this producer's sequence", fatal=True)


class FakeProducer:
    """A producer whose broker acknowledges each message at the next poll(), unless
    `acknowledges` is False; `failure(producer)` returns what its poll() raises, if any."""

    def __init__(self, conf: dict[str, Any], *, acknowledges: bool = True,
                 failure: Callable[[FakeProducer], BaseException | None] = lambda _: None
                 ) -> None:
        self.conf = conf
        self.acknowledges = acknowledges
        self.failure = failure
        self.in_flight: list[Callable[[KafkaError | None, Any], None]] = []
        self.produced = threading.Event()
        self.purged = False
        self._lock = threading.Lock()

    def produce(self, topic: str, *, key: Any, value: Any, headers: Any,
                on_delivery: Callable[[KafkaError | None, Any], None]) -> None:
        with self._lock:
            self.in_flight.append(on_delivery)
        self.produced.set()

    def poll(self, timeout: float) -> int:
        self.produced.wait(timeout)
        self.produced.clear()
        error = self.failure(self)
        if error is not None:
            raise error
        if not self.acknowledges:
            return 0
        with self._lock:
            delivered, self.in_flight = self.in_flight, []
        for on_delivery in delivered:
            on_delivery(None, None)
        return len(delivered)

    def purge(self, in_queue: bool = True, in_flight: bool = True) -> None:
        self.purged = True

    def flush(self, timeout: float = -1) -> int:
        return 0

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> None:
        return None


class Producers:
    """What `Producer(conf)` builds inside common.queue: the scripted ones first, then
    producers that acknowledge everything."""

    def __init__(self, *scripted: Callable[[dict[str, Any]], FakeProducer]) -> None:
        self.scripted = list(scripted)
        self.made: list[FakeProducer] = []

    def __call__(self, conf: dict[str, Any]) -> FakeProducer:
        make = self.scripted.pop(0) if self.scripted else FakeProducer
        self.made.append(make(conf))
        return self.made[-1]


def once(error: BaseException, when: Callable[[FakeProducer], bool] = lambda _: True
         ) -> Callable[[FakeProducer], BaseException | None]:
    """A poll() failure raised the first time `when(producer)` holds, and never again."""
    raised = []

    def failure(producer: FakeProducer) -> BaseException | None:
        if raised or not when(producer):
            return None
        raised.append(error)
        return error

    return failure


@pytest.fixture
def publishers() -> Iterator[list[Publisher]]:
    made: list[Publisher] = []
    yield made
    for publisher in made:
        publisher.close()


def events(n: int = 1) -> list[queue.Event]:
    return [job_event("job-queue", f"job-{i}", "NOOP") for i in range(n)]


def test_a_fatal_error_from_poll_leaves_the_poll_thread_alive_and_a_new_producer_sends(
        monkeypatch, publishers):
    producers = Producers(lambda conf: FakeProducer(
        conf, failure=once(KafkaException(OUT_OF_ORDER))))
    monkeypatch.setattr(queue, "Producer", producers)
    publisher = Publisher("kafka:9092", timeout=2)
    publishers.append(publisher)
    # The first producer's poll raised; the loop replaced it and polls the new one.
    deadline = time.monotonic() + 5
    while len(producers.made) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # poll interval; the deadline bounds the wait
    assert len(producers.made) == 2, "the failed producer was not replaced"
    publisher.publish(events(3))
    assert publisher._poller.is_alive()
    assert producers.made[0].purged


def test_any_other_error_from_poll_is_logged_and_polling_goes_on_with_the_same_producer(
        monkeypatch, publishers, caplog):
    producers = Producers(lambda conf: FakeProducer(
        conf, failure=once(RuntimeError("a callback raised"))))
    monkeypatch.setattr(queue, "Producer", producers)
    publisher = Publisher("kafka:9092", timeout=2)
    publishers.append(publisher)
    deadline = time.monotonic() + 5
    while "polling the kafka producer failed" not in caplog.text \
            and time.monotonic() < deadline:
        time.sleep(0.01)  # poll interval; the deadline bounds the wait
    assert "a callback raised" in caplog.text
    publisher.publish(events())
    assert publisher._poller.is_alive() and len(producers.made) == 1


def test_a_send_in_flight_when_its_producer_fails_for_good_is_refused_at_once(
        monkeypatch, publishers):
    # The broker forgets the producer while a message is in flight: it is never confirmed.
    producers = Producers(lambda conf: FakeProducer(
        conf, acknowledges=False,
        failure=once(KafkaException(OUT_OF_ORDER), when=lambda p: bool(p.in_flight))))
    monkeypatch.setattr(queue, "Producer", producers)
    publisher = Publisher("kafka:9092", timeout=10)
    publishers.append(publisher)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="producer replaced"):
        publisher.publish(events(2))
    assert time.monotonic() - started < 2, "the waiter sat out its 10 s deadline"
    # The refused send does not count against the new producer: it stays, and sends.
    for _ in range(3):
        publisher.publish(events(2))
    assert len(producers.made) == 2 and publisher._poller.is_alive()


def test_a_delivery_not_confirmed_in_time_has_the_producer_replaced_before_the_next_send(
        monkeypatch, publishers):
    producers = Producers(lambda conf: FakeProducer(conf, acknowledges=False))
    monkeypatch.setattr(queue, "Producer", producers)
    publisher = Publisher("kafka:9092", timeout=0.2)
    publishers.append(publisher)
    with pytest.raises(ServiceUnavailable, match="not confirmed in time"):
        publisher.publish(events())
    publisher.publish(events(), timeout=2)
    assert len(producers.made) == 2
    # A confirmation arriving late from the replaced producer changes nothing.
    for on_delivery in producers.made[0].in_flight:
        on_delivery(None, None)
    publisher.publish(events(), timeout=2)
    assert len(producers.made) == 2
