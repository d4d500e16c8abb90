"""Kafka -> function bridge: the local stand-in for a Knative KafkaSource.

Consumes a topic with a consumer group and POSTs each record to a function URL as a
binary-mode CloudEvent. Records that carry `ce_*` headers pass through unchanged;
others become `dev.knative.kafka.event` with id `partition:<p>/offset:<o>`. Several
records are in flight at once, but the committed offset of a partition never passes
a record that is not finished: finished means the function answered 2xx, or the
record was handed to the dead-letter topic. Connection errors and 5xx are retried
with backoff; a 4xx (other than 408/429) dead-letters the record at once, as do
other 5xx after `retries` attempts. 502/503/504 and connection errors are retried
until they succeed: an outage pauses delivery, it never dead-letters. With
`--delivery knative` they too get `retries` attempts and are then dead-lettered, as a
KafkaSource's `delivery` does (`retry`, exponential backoff, `deadLetterSink`): the
fault suite runs that mode to show a long outage still loses nothing.

Run one by hand:  python -m infra.bridge --topic job-queue --target http://127.0.0.1:8083
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import cloudevents.conversion
import cloudevents.kafka
import tenacity
import urllib3
from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent
from cloudevents.kafka import KafkaMessage
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from common.logs import configure_logging
from common.queue import consumer_group
from common.retry import RetryPolicy
from common.settings import kafka_client_config, load_settings

log = logging.getLogger("bridge")

RETRY_FOREVER = {502, 503, 504}


@dataclass
class PartitionState:
    """In-flight offsets of one partition; the commit point is the lowest unfinished one."""

    pending: set[int] = field(default_factory=set)
    next_offset: int | None = None
    committed: int | None = None

    def commit_point(self) -> int | None:
        if self.pending:
            return min(self.pending)
        return self.next_offset


@dataclass
class Delivery:
    """What happened to one record."""

    status: int | None
    body: bytes
    attempts: int

    @property
    def final(self) -> bool:
        """Accepted, or refused for good (a 4xx other than 408/429): no retry changes it."""
        return self.status is not None and (200 <= self.status < 300 or _permanent(self.status))

    @property
    def outage(self) -> bool:
        """No answer, or one that says the function is away or busy: it will pass."""
        return self.status is None or self.status in RETRY_FOREVER or self.status in (408, 429)

    def __str__(self) -> str:
        return str(self.status or self.body[:200].decode(errors="replace"))


KAFKA_EVENT_TYPE = "dev.knative.kafka.event"
# The record carries its own event (Kafka binary content mode) when it has all of these.
REQUIRED_HEADERS = ("ce_specversion", "ce_id", "ce_type", "ce_source")


def _raw(value: Any) -> Any:
    """Data as the record's bytes, as binary mode and the dead-letter record keep them."""
    return value


def record_event(msg: Message, source: str) -> CloudEvent:
    """The CloudEvent a Knative KafkaSource makes of a record: the record's own event if it
    carries one in binary mode (`ce_*` headers), unchanged; otherwise (or if those headers
    are not a valid event) `dev.knative.kafka.event` with id `partition:<p>/offset:<o>`,
    the record key as extension `key` and the record timestamp as time. Its data is the
    record value's bytes."""
    headers = {name: value or b"" for name, value in msg.headers() or ()}
    if all(name in headers for name in REQUIRED_HEADERS):
        try:
            event = cloudevents.kafka.from_binary(
                KafkaMessage(headers, None, msg.value()), data_unmarshaller=_raw)
        except (CloudEventError, UnicodeDecodeError) as exc:
            log.warning("record %s/%d@%d has ce_* headers but no valid event (%s);"
                        " delivered as %s", msg.topic(), msg.partition(), msg.offset(), exc,
                        KAFKA_EVENT_TYPE)
        else:
            if "ce_time" not in headers:
                del event["time"]  # the SDK's default; the record's event has none
            if event.get("datacontenttype") is None:
                event["datacontenttype"] = "application/json"
            return event
    partition, offset = msg.partition(), msg.offset()
    attributes = {
        "specversion": "1.0",
        "id": f"partition:{partition}/offset:{offset}",
        "type": KAFKA_EVENT_TYPE,
        "source": source,
        "subject": f"partition:{partition}#{offset}",
        "datacontenttype": headers.get("content-type", b"application/json").decode(
            errors="replace"),
    }
    ts_type, ts = msg.timestamp()
    if ts_type and ts > 0:
        attributes["time"] = datetime.fromtimestamp(ts / 1000, UTC).isoformat()
    if msg.key() is not None:
        attributes["key"] = msg.key().decode(errors="replace")
    event = CloudEvent(attributes, msg.value())
    if "time" not in attributes:
        del event["time"]  # the SDK's default; a record without a timestamp has none
    return event


def binary_request(msg: Message, source: str) -> tuple[dict[str, str], bytes]:
    """Headers and body of the HTTP binary-mode CloudEvent for a record."""
    headers, body = cloudevents.conversion.to_binary(record_event(msg, source), _raw)
    return headers, body or b""


def batch_body(msgs: list[Message], source: str) -> bytes:
    """Records as one request body in the batched content mode: a JSON array of events in
    the JSON (structured) format. JSON data goes in `data`, by the SDK's `to_dict` (its
    canonical form, which is the JSON format for such data); other data by its
    `to_structured`, which writes it as `data_base64`."""
    events = []
    for msg in msgs:
        event = record_event(msg, source)
        data = _json_data(event)
        if data is None:
            event.data = event.data or None  # an empty value: neither data nor data_base64
            events.append(json.loads(cloudevents.conversion.to_structured(event)[1]))
        else:
            event.data = data
            events.append(cloudevents.conversion.to_dict(event))
    return json.dumps(events).encode()


def _json_data(event: CloudEvent) -> Any:
    """The event's data as a JSON value, if its content type says JSON and it parses (and is
    not null); else None."""
    if not event.data or "json" not in event["datacontenttype"]:
        return None
    try:
        return json.loads(event.data)
    except ValueError:
        return None


def dead_letter_record(msg: Message, source: str, target: str, status: int | None,
                       reply: bytes) -> KafkaMessage:
    """The record for the dead-letter topic: the event as delivered plus Knative's
    `knativeerror*` extensions, in Kafka binary content mode (the record's other headers
    kept, its key and value as they were)."""
    event = record_event(msg, source)
    event["knativeerrordest"] = target
    event["knativeerrorcode"] = str(status or 0)
    event["knativeerrordata"] = base64.b64encode(reply[:1024]).decode()
    headers = {name: value for name, value in msg.headers() or ()
               if not name.startswith("ce_") and name != "content-type"}
    headers.update(cloudevents.kafka.to_binary(event, _raw).headers)
    return KafkaMessage(headers, msg.key(), msg.value())


class Bridge:
    """One consumer, a pool of deliveries, and a committer that never skips a hole."""

    def __init__(self, *, bootstrap: str, topic: str, group: str, target: str,
                 dlq_topic: str | None, max_in_flight: int = 16, retries: int = 5,
                 batch_size: int = 1, fetch_wait_ms: int = 10,
                 backoff_base: float = 0.2, backoff_max: float = 10.0,
                 request_timeout: float = 600.0,
                 kafka_config: dict[str, str] | None = None,
                 retry_outages_forever: bool = True) -> None:
        self.topic = topic
        self.target = target
        self.batch_size = max(1, batch_size)
        self.dlq_topic = dlq_topic
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.retry_outages_forever = retry_outages_forever  # False: as Knative delivers
        self.backoff = RetryPolicy(max_retries=retries, base_seconds=backoff_base,
                                   max_seconds=backoff_max)
        self.source = f"/apis/v1/namespaces/default/kafkasources/{group}#{topic}"
        kafka = {**(kafka_config or {}), "bootstrap.servers": bootstrap}
        self._consumer = Consumer({
            **kafka,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # SPEC section 6: with the default 45 s, the first assignment on Tansu takes ~23 s.
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "max.poll.interval.ms": 600000,
            # Latency: the broker answers a fetch only when this runs out (Tansu does not
            # wake a waiting fetch when a record arrives), so a busy topic wants it short;
            # each idle fetch costs the broker CPU, so a quiet topic wants it long.
            "fetch.wait.max.ms": fetch_wait_ms,
        })
        self._producer = Producer({**kafka, "enable.idempotence": True,
                                   "acks": "all", "linger.ms": 1}) if dlq_topic else None
        self._http = urllib3.PoolManager(
            maxsize=max_in_flight, block=False,
            timeout=urllib3.Timeout(connect=2.0, read=request_timeout), retries=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_in_flight, "deliver")
        self._lock = threading.Lock()
        self._partitions: dict[int, PartitionState] = {}
        self._in_flight = 0
        self._stopping = threading.Event()
        self.delivered = 0
        self.dead_lettered = 0

    # -- consumer side -------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                self._partitions[tp.partition] = PartitionState()
        log.info("assigned %s", sorted(tp.partition for tp in partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._commit()
        with self._lock:
            for tp in partitions:
                # Unfinished records of a revoked partition are redelivered to its next owner.
                self._partitions.pop(tp.partition, None)
        log.info("revoked %s", sorted(tp.partition for tp in partitions))

    def run(self) -> None:
        self._consumer.subscribe([self.topic], on_assign=self._on_assign,
                                 on_revoke=self._on_revoke)
        log.info("bridge %s -> %s started", self.topic, self.target)
        last_commit = time.monotonic()
        try:
            while not self._stopping.is_set():
                with self._lock:
                    free = self.max_in_flight - self._in_flight
                if free <= 0:
                    time.sleep(0.002)
                else:
                    # Block for the first record only, then take what is already here:
                    # consume(n, timeout) alone would wait for n records or the timeout.
                    first = self._consumer.poll(0.05)
                    if first is not None:
                        ready = [first]
                        if free > 1:
                            ready += self._consumer.consume(num_messages=free - 1, timeout=0)
                        self._accept_all(ready)
                if time.monotonic() - last_commit >= 0.05:
                    self._commit()
                    last_commit = time.monotonic()
        finally:
            self._drain()

    def _accept_all(self, msgs: list[Message]) -> None:
        accepted: list[tuple[Message, PartitionState]] = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err)
                continue
            with self._lock:
                state = self._partitions.setdefault(msg.partition(), PartitionState())
                state.pending.add(msg.offset())
                state.next_offset = max(state.next_offset or 0, msg.offset() + 1)
                self._in_flight += 1
            accepted.append((msg, state))
        for i in range(0, len(accepted), self.batch_size):
            self._pool.submit(self._handle, accepted[i:i + self.batch_size])

    def _handle(self, batch: list[tuple[Message, PartitionState]]) -> None:
        try:
            if len(batch) == 1:
                self._deliver_or_dead_letter(batch[0][0])
            else:
                self._deliver_batch([msg for msg, _ in batch])
        except Exception:
            log.exception("%d record(s) from %s/%d@%d not finished; they will be redelivered",
                          len(batch), batch[0][0].topic(), batch[0][0].partition(),
                          batch[0][0].offset())
            self._stopping.set()  # never commit past them: stop, a restart redelivers
            return
        finally:
            with self._lock:
                self._in_flight -= len(batch)
        with self._lock:
            for msg, state in batch:
                state.pending.discard(msg.offset())

    def _commit(self) -> None:
        with self._lock:
            offsets = []
            for partition, state in self._partitions.items():
                point = state.commit_point()
                if point is not None and point != state.committed:
                    offsets.append(TopicPartition(self.topic, partition, point))
                    state.committed = point
        if offsets:
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            except Exception as exc:  # e.g. a rebalance in progress; committed again later
                log.warning("offset commit failed: %s", exc)
                with self._lock:
                    for tp in offsets:
                        if tp.partition in self._partitions:
                            self._partitions[tp.partition].committed = None

    def _drain(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._in_flight == 0:
                    break
            time.sleep(0.01)
        self._commit()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._consumer.close()

    def stop(self) -> None:
        self._stopping.set()

    # -- delivery side -------------------------------------------------------------

    def _deliver_batch(self, msgs: list[Message]) -> None:
        """Several records in one request (CloudEvents batched content mode). The target
        answers each event's own status; anything not settled falls back to one request
        per record, with the usual retries."""
        body = batch_body(msgs, self.source)
        results: list[dict[str, Any]] = []
        try:
            response = self._http.request(
                "POST", self.target, body=body,
                headers={"content-type": "application/cloudevents-batch+json"})
            if response.status == 200:
                results = json.loads(response.data).get("results", [])
        except (urllib3.exceptions.HTTPError, ValueError, AttributeError) as exc:
            log.warning("batch delivery failed (%s); delivering one by one", exc)
        for i, msg in enumerate(msgs):
            status = results[i].get("status") if i < len(results) else None
            if isinstance(status, int) and 200 <= status < 300:
                self.delivered += 1
            elif isinstance(status, int) and _permanent(status):
                detail = str(results[i].get("detail", "")).encode()
                self._dead_letter(msg, Delivery(status, detail, 1))
            else:
                self._deliver_or_dead_letter(msg)

    def _deliver_or_dead_letter(self, msg: Message) -> None:
        result = self.deliver(msg)
        if result.status is not None and 200 <= result.status < 300:
            self.delivered += 1
            return
        self._dead_letter(msg, result)

    def deliver(self, msg: Message) -> Delivery:
        """POST the record until it is accepted, refused for good, or retries run out
        (outages are waited out when `retry_outages_forever`)."""
        headers, body = binary_request(msg, self.source)
        tries = 0

        def post() -> Delivery:
            nonlocal tries
            tries += 1
            try:
                response = self._http.request("POST", self.target, body=body, headers=headers)
            except urllib3.exceptions.HTTPError as exc:
                return Delivery(None, str(exc).encode(), tries)
            return Delivery(response.status, response.data, tries)

        def outage(state: tenacity.RetryCallState) -> bool:
            assert state.outcome is not None
            return self.retry_outages_forever and state.outcome.result().outage

        retrying = self.backoff.retrying(
            retry=tenacity.retry_if_result(lambda delivery: not delivery.final),
            forever=outage, stopping=self._stopping,
            what=f"delivery of {msg.topic()}/{msg.partition()}@{msg.offset()}")
        result: Delivery = retrying(post)
        exhausted = result.attempts > self.retries and not (
            self.retry_outages_forever and result.outage)
        if not result.final and not exhausted:  # given up only because the bridge stops
            raise RuntimeError("stopping before the record was delivered")
        return result

    def _dead_letter(self, msg: Message, result: Delivery) -> None:
        if self._producer is None or self.dlq_topic is None:
            log.error("record %s/%d@%d undeliverable (HTTP %s) and no dead-letter topic;"
                      " skipped", msg.topic(), msg.partition(), msg.offset(), result.status)
            return
        record = dead_letter_record(msg, self.source, self.target, result.status, result.body)
        done = threading.Event()
        errors: list[Any] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(err)
            done.set()

        while True:
            errors.clear()
            done.clear()
            self._producer.produce(self.dlq_topic, key=record.key, value=record.value,
                                   headers=record.headers, on_delivery=on_delivery)
            while not done.is_set():
                self._producer.poll(0.1)
            if not errors:
                break
            log.warning("dead-letter publish failed (%s); retrying", errors[0])
            time.sleep(1)
        self.dead_lettered += 1
        log.error("record %s/%d@%d dead-lettered to %s (HTTP %s): %s", msg.topic(),
                  msg.partition(), msg.offset(), self.dlq_topic, result.status,
                  result.body[:300].decode(errors="replace"))


def _permanent(status: int) -> bool:
    return 400 <= status < 500 and status not in (408, 429)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                        help="the Kafka brokers (default: KAFKA_BOOTSTRAP_SERVERS; no fallback)")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", help="consumer group (default: JOBS_QUEUE_CONSUMER_GROUP"
                        " for the job queue, JOBS_DLQ_CONSUMER_GROUP for the DLQ topic,"
                        " else JOBS_QUEUE_CONSUMER_GROUP-<topic>, a job type's own topic)")
    parser.add_argument("--target", required=True, help="function URL to POST events to")
    parser.add_argument("--dlq-topic", help="where undeliverable records go")
    parser.add_argument("--max-in-flight", type=int, default=16)
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--delivery", choices=("local", "knative"), default="local",
                        help="local: outages (502/503/504, no connection) are retried until"
                             " they end; knative: they get --retries attempts, then the"
                             " dead-letter topic, as a KafkaSource's delivery settings do")
    parser.add_argument("--backoff-base", type=float, default=0.2,
                        help="first retry delay in seconds, doubling each time")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="records per request (CloudEvents batched content mode); 1 ="
                             " one binary-mode event per request, as a Knative KafkaSource")
    parser.add_argument("--fetch-wait-ms", type=int, default=10,
                        help="longest a fetch waits for records (latency vs idle broker CPU)")
    args = parser.parse_args(argv)
    if not args.bootstrap:
        parser.error("KAFKA_BOOTSTRAP_SERVERS is not set and --bootstrap was not given")
    configure_logging(f"bridge:{args.topic}")  # JSON lines, as every process logs
    settings = load_settings()
    group = args.group or consumer_group(settings, args.topic)
    bridge = Bridge(bootstrap=args.bootstrap, topic=args.topic, group=group, target=args.target,
                    dlq_topic=args.dlq_topic, max_in_flight=args.max_in_flight,
                    retries=args.retries, batch_size=args.batch_size,
                    fetch_wait_ms=args.fetch_wait_ms,
                    kafka_config=kafka_client_config(settings),
                    retry_outages_forever=args.delivery == "local",
                    backoff_base=args.backoff_base)
    signal.signal(signal.SIGTERM, lambda *_: bridge.stop())
    signal.signal(signal.SIGINT, lambda *_: bridge.stop())
    bridge.run()


if __name__ == "__main__":
    main()
