"""Kafka side: publishing jobs and dead letters as binary-mode CloudEvents."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from cloudevents.http import CloudEvent
from cloudevents.kafka import KafkaMessage, to_binary
from confluent_kafka import KafkaError, KafkaException, Producer

from common.errors import ServiceUnavailable
from common.handlers import JobType, get_job_type
from common.settings import Settings

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


def job_topic(settings: Settings, job_type: str) -> str:
    """The topic of a job's messages: its type's own (`@job_handler(topic=...)`), else the
    job queue. Every publisher of a job message (submit, replay, process's requeue, the
    sweeper) asks here, so a type's messages never land on another type's topic."""
    declared = get_job_type(job_type)
    return declared.topic if declared is not None and declared.topic else settings.queue_topic


def consumer_group(settings: Settings, topic: str) -> str:
    """The consumer group that delivers `topic` to its function: JOBS_QUEUE_CONSUMER_GROUP
    for the job queue, JOBS_DLQ_CONSUMER_GROUP for the DLQ, and for a job type's own topic
    the job queue's group, a dash and the topic (`jobs-process-job-queue-reports`)."""
    if topic == settings.queue_topic:
        return settings.queue_consumer_group
    if topic == settings.dlq_topic:
        return settings.dlq_consumer_group
    return f"{settings.queue_consumer_group}-{topic}"


def queue_topics(settings: Settings, types: Iterable[JobType]) -> dict[str, str]:
    """Every topic jobs of `types` are published to, the job queue first, each with the
    consumer group that delivers it to `process`."""
    topics = {settings.queue_topic: settings.queue_consumer_group}
    for declared in sorted(types, key=lambda t: t.name):
        topic = declared.topic
        if topic is None or topic in topics:
            continue
        if topic == settings.dlq_topic:
            raise ValueError(f"job type {declared.name}: topic {topic!r} is the dead-letter"
                             " topic (JOBS_DLQ_TOPIC); give it a topic of its own")
        topics[topic] = consumer_group(settings, topic)
    return topics


def _is_fatal(exc: BaseException) -> bool:
    """Whether `exc` says the producer can never send again (librdkafka's fatal errors)."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return isinstance(err, KafkaError) and err.fatal()


class _Delivery:
    """The broker's acknowledgements that one `send` waits for."""

    def __init__(self, count: int, on_done: Callable[[_Delivery], None]) -> None:
        self.pending = count
        self.errors: list[str] = []
        self.abandoned = False  # given up on by us, not failed by the broker
        self.done = threading.Event()
        self._on_done = on_done
        self._lock = threading.Lock()

    def report(self, err: KafkaError | None) -> None:
        """One message's delivery report."""
        with self._lock:
            if self.done.is_set():
                return  # abandoned already: a late report changes nothing
            if err is not None:
                self.errors.append(str(err))
            self.pending -= 1
            if self.pending > 0:
                return
            self.done.set()
        self._on_done(self)

    def abandon(self, reason: str) -> bool:
        """Stop waiting for what is still pending; False if everything was reported."""
        with self._lock:
            if self.done.is_set():
                return False
            self.abandoned = True
            self.errors.append(reason)
            self.done.set()
        return True


class Publisher:
    """An idempotent, acks=all producer that confirms delivery before returning.

    One thread polls the producer (delivery reports run inside poll()). A producer that
    failed for good (the broker restarted and forgot its producer id, a delivery never
    confirmed) is replaced, by that thread or the next send; whoever still waits for
    the old one is answered at once (ServiceUnavailable) rather than at its deadline.
    """

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
        self._fatal: str | None = None  # why self._producer must be replaced
        self._waiting: set[_Delivery] = set()  # sends not yet confirmed by self._producer
        self._lock = threading.Lock()
        self._poller = threading.Thread(target=self._poll_forever, name="kafka-poll", daemon=True)
        self._closed = threading.Event()
        self._poller.start()

    def _poll_forever(self) -> None:
        # Delivery callbacks run inside poll(); one thread serves every waiting request.
        # Only close() may end this loop: without it no send is ever confirmed again.
        while not self._closed.is_set():
            producer = self._producer
            try:
                producer.poll(0.5)  # returns at once when a delivery report is due
            except Exception as exc:
                if _is_fatal(exc):
                    # e.g. UNKNOWN_PRODUCER_ID or OUT_OF_ORDER_SEQUENCE_NUMBER once a
                    # restarted broker forgot this idempotent producer: it is done for.
                    log.error("kafka producer failed for good (%s); replacing it", exc)
                    self._mark_fatal(str(exc), producer)
                else:
                    log.exception("polling the kafka producer failed; polling on")
                    self._closed.wait(0.05)  # no busy loop if it keeps failing
            try:
                if self._fatal is not None:
                    self._renew_if_fatal()
            except ServiceUnavailable as exc:
                log.error("%s; trying again", exc)
                self._closed.wait(0.5)

    def _on_error(self, err: KafkaError) -> None:
        # confluent-kafka raises fatal errors from poll() instead; older ones call this.
        if err.fatal():
            log.error("kafka producer failed for good (%s); it will be replaced", err)
            self._mark_fatal(str(err))

    def _mark_fatal(self, reason: str, producer: Any = None) -> None:
        """Have `producer` (default: the current one) replaced; a report about a producer
        replaced already changes nothing."""
        with self._lock:
            if producer is None or producer is self._producer:
                self._fatal = self._fatal or reason

    def _forget(self, delivery: _Delivery) -> None:
        with self._lock:
            self._waiting.discard(delivery)

    def _renew_if_fatal(self) -> None:
        with self._lock:
            if self._fatal is None:
                return
            reason = self._fatal
            try:
                fresh = Producer(self._conf)
            except KafkaException as exc:
                raise ServiceUnavailable("kafka", f"cannot create a producer: {exc}") from exc
            old, self._producer, self._fatal = self._producer, fresh, None
            stranded, self._waiting = self._waiting, set()
        log.warning("replaced the kafka producer (%s); %d send(s) in flight failed",
                    reason, len(stranded))
        for delivery in stranded:
            delivery.abandon(f"producer replaced ({reason}); not confirmed")
        # What the old producer holds can never be confirmed now; drop it without waiting.
        try:
            old.purge(in_queue=True, in_flight=True)
            old.flush(0)
        except Exception as exc:  # its own fatal error, once more: nothing left to do
            log.debug("discarding the old kafka producer: %s", exc)

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
        delivery = _Delivery(len(events), self._forget)
        with self._lock:
            producer = self._producer
            self._waiting.add(delivery)

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None and err.fatal():
                self._mark_fatal(str(err), producer)
            delivery.report(err)

        sent_at = datetime.now(UTC).isoformat()
        try:
            for event in events:
                message = event.message(sent_at)
                while True:
                    try:
                        producer.produce(
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
                        if _is_fatal(exc):
                            self._mark_fatal(str(exc), producer)
                        raise ServiceUnavailable("kafka", str(exc)) from exc
        except BaseException:
            # Nobody will wait for the part already handed over.
            delivery.abandon("send failed")
            self._forget(delivery)
            raise

        def wait() -> None:
            if not delivery.done.wait(max(0.0, deadline - time.monotonic())) \
                    and delivery.abandon("delivery not confirmed in time"):
                self._forget(delivery)
                # A producer stuck after a broker restart (its idempotence state is gone on
                # the broker) may never recover by itself: have it replaced.
                self._mark_fatal("delivery not confirmed in time", producer)
                raise ServiceUnavailable("kafka", "delivery not confirmed in time")
            if delivery.errors:
                if not delivery.abandoned:
                    self._mark_fatal(delivery.errors[0], producer)
                raise ServiceUnavailable("kafka", delivery.errors[0])

        return wait

    def close(self) -> None:
        self._closed.set()
        self._poller.join(timeout=1)
        self._producer.flush(2)
        with self._lock:
            stranded, self._waiting = self._waiting, set()
        for delivery in stranded:
            delivery.abandon("publisher closed")


_publishers: dict[str, Publisher] = {}
_publishers_lock = threading.Lock()


def get_publisher(bootstrap_servers: str, timeout: float = 5.0,
                  config: dict[str, Any] | None = None) -> Publisher:
    """The process-wide publisher for a cluster, created on first use; `config` adds
    librdkafka properties (security, `common.settings.kafka_client_config`)."""
    with _publishers_lock:
        pub = _publishers.get(bootstrap_servers)
        if pub is None:
            pub = _publishers[bootstrap_servers] = Publisher(bootstrap_servers, timeout=timeout,
                                                             config=config)
        return pub
