"""Kafka side: publishing jobs and dead letters as binary-mode CloudEvents."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from cloudevents.http import CloudEvent
from cloudevents.kafka import KafkaMessage, to_binary
from confluent_kafka import KafkaError, KafkaException, Producer

from common.errors import ServiceUnavailable

log = logging.getLogger(__name__)
SPECVERSION = "1.0"
JOB_EVENT_TYPE = "dev.jobs.job.ready"
DEAD_LETTER_EVENT_TYPE = "dev.jobs.job.dead_lettered"
# One encoder for every value: json.dumps with separators builds a new one per call.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class Event:
    """One CloudEvent bound for a topic; `key` picks the partition."""

    topic: str
    key: str
    ce_id: str
    ce_type: str
    ce_source: str
    data: dict[str, Any]
    extensions: tuple[tuple[str, str], ...] = ()

    def message(self, time: str | None = None) -> KafkaMessage:
        """The record in Kafka binary content mode, by the SDK's `to_binary`: attributes as
        `ce_*` headers, data as the (compact JSON) value, `key` as the record key (the
        binding's `partitionkey`). `time` (ISO 8601) defaults to now; a batch sent at once
        may share one."""
        return to_binary(CloudEvent({
            "specversion": SPECVERSION,
            "id": self.ce_id,
            "type": self.ce_type,
            "source": self.ce_source,
            "time": time or datetime.now(UTC).isoformat(),
            "datacontenttype": "application/json",
            "partitionkey": self.key,
            **dict(self.extensions),
        }, self.data), _compact_json)


def job_event(topic: str, job_id: uuid.UUID | str, job_type: str, *, ce_id: str | None = None,
              source: str = "/jobs/submit") -> Event:
    """The message that asks `process` to run a job; ce_id defaults to the job id."""
    job = str(job_id)
    return Event(
        topic=topic,
        key=job,
        ce_id=ce_id or job,
        ce_type=JOB_EVENT_TYPE,
        ce_source=source,
        data={"job_id": job, "job_type": job_type},
        extensions=(("jobtype", job_type),),
    )


class Publisher:
    """An idempotent, acks=all producer that confirms delivery before returning."""

    def __init__(self, bootstrap_servers: str, *, timeout: float = 5.0,
                 config: dict[str, Any] | None = None) -> None:
        self.timeout = timeout
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            # No linger: a lone submit should not wait; bursts still batch on their own.
            "linger.ms": 0,
            "socket.connection.setup.timeout.ms": 3000,
            # librdkafka keeps retrying until this; past it the delivery report is an error.
            "message.timeout.ms": int(max(timeout, 1.0) * 1000),
            "client.id": "jobs-publisher",
        }
        conf.update(config or {})
        conf["error_cb"] = self._on_error
        self._conf = conf
        self._producer = Producer(conf)
        self._fatal: KafkaError | str | None = None
        self._lock = threading.Lock()
        self._poller = threading.Thread(target=self._poll_forever, name="kafka-poll", daemon=True)
        self._closed = threading.Event()
        self._poller.start()

    def _poll_forever(self) -> None:
        # Delivery callbacks run inside poll(); one thread serves every waiting request.
        while not self._closed.is_set():
            self._producer.poll(0.05)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            # e.g. the broker lost the idempotent producer's state in a restart: this
            # producer can never send again, so the next publish builds a new one.
            log.error("kafka producer failed for good (%s); it will be recreated", err)
            self._fatal = err

    def _renew_if_fatal(self) -> None:
        with self._lock:
            if self._fatal is None:
                return
            old, self._producer = self._producer, Producer(self._conf)
            self._fatal = None
        old.purge(in_queue=True, in_flight=True)
        old.flush(0)

    def warm(self, topic: str, timeout: float = 5.0) -> None:
        """Fetch the topic's metadata now rather than on the first send."""
        self._producer.list_topics(topic, timeout=timeout)

    def publish(self, events: Sequence[Event], timeout: float | None = None) -> None:
        """Send `events` and wait until the broker acknowledged all of them.

        Raises ServiceUnavailable if any was not confirmed within the timeout.
        """
        self.send(events, timeout)()

    def send(self, events: Sequence[Event], timeout: float | None = None
             ) -> Callable[[], None]:
        """Hand `events` to the producer; returns the wait for the broker's acknowledgement
        (which raises ServiceUnavailable as `publish` does), so the caller can do other
        work meanwhile."""
        if not events:
            return lambda: None
        self._renew_if_fatal()
        deadline = time.monotonic() + (timeout or self.timeout)
        done = threading.Event()
        pending = [len(events)]
        errors: list[str] = []
        lock = threading.Lock()

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            with lock:
                if err is not None:
                    errors.append(str(err))
                    if err.fatal():
                        self._fatal = err
                pending[0] -= 1
                if pending[0] == 0:
                    done.set()

        sent_at = datetime.now(UTC).isoformat()
        for event in events:
            message = event.message(sent_at)
            while True:
                try:
                    self._producer.produce(
                        event.topic,
                        key=message.key,
                        value=message.value,
                        # dict[str, bytes] is one (dict is invariant to mypy)
                        headers=cast(dict[str, str | bytes | None], message.headers),
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    # Local queue full: let the poller drain it, within our deadline.
                    if time.monotonic() > deadline:
                        raise ServiceUnavailable("kafka", "producer queue is full") from None
                    time.sleep(0.005)
                except KafkaException as exc:
                    raise ServiceUnavailable("kafka", str(exc)) from exc

        def wait() -> None:
            if not done.wait(max(0.0, deadline - time.monotonic())):
                # A producer stuck after a broker restart (its idempotence state is gone on
                # the broker) may never recover by itself: the next publish builds a new one.
                self._fatal = "delivery not confirmed in time"
                raise ServiceUnavailable("kafka", "delivery not confirmed in time")
            if errors:
                self._fatal = errors[0]
                raise ServiceUnavailable("kafka", errors[0])

        return wait

    def close(self) -> None:
        self._closed.set()
        self._poller.join(timeout=1)
        self._producer.flush(2)


_publishers: dict[str, Publisher] = {}
_publishers_lock = threading.Lock()


def get_publisher(bootstrap_servers: str, timeout: float = 5.0) -> Publisher:
    """The process-wide publisher for a cluster, created on first use."""
    with _publishers_lock:
        pub = _publishers.get(bootstrap_servers)
        if pub is None:
            pub = _publishers[bootstrap_servers] = Publisher(bootstrap_servers, timeout=timeout)
        return pub
