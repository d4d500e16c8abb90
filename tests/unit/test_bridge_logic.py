"""The bridge's pure parts: the CloudEvent of a record (binary mode, batches, dead letters),
checked by decoding what it writes with the SDK, and the commit point."""

import json

import cloudevents.kafka
from cloudevents.http import from_http, from_json

from infra.bridge import (
    PartitionState,
    batch_body,
    binary_request,
    dead_letter_record,
    record_event,
)

SOURCE = "/apis/v1/namespaces/default/kafkasources/x#t"
JOB_HEADERS = [("ce_specversion", b"1.0"), ("ce_id", b"job-1"), ("ce_type", b"t"),
               ("ce_source", b"/s"), ("ce_time", b"2024-05-01T10:00:00+00:00"),
               ("ce_jobtype", b"ECHO"), ("content-type", b"application/json")]


class FakeRecord:
    """Just the Message methods the bridge reads."""

    def __init__(self, headers, value=b'{"job_id": "x"}', key=b"k", partition=2, offset=41,
                 timestamp=(1, 1_700_000_000_000)):
        self._headers, self._value, self._key = headers, value, key
        self._p, self._o, self._ts = partition, offset, timestamp

    def headers(self):
        return self._headers

    def value(self):
        return self._value

    def key(self):
        return self._key

    def topic(self):
        return "t"

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def timestamp(self):
        return self._ts


def test_a_record_with_ce_headers_passes_through_unchanged():
    headers, body = binary_request(FakeRecord(JOB_HEADERS), "/src")
    assert headers == {("ce-" + k[3:] if k.startswith("ce_") else k): v.decode()
                       for k, v in JOB_HEADERS}
    assert body == b'{"job_id": "x"}'
    event = from_http(headers, body)
    assert event["id"] == "job-1" and event["jobtype"] == "ECHO"
    assert event.data == {"job_id": "x"}


def test_a_record_event_without_time_or_content_type_gets_no_time_and_json():
    no_time = [(k, v) for k, v in JOB_HEADERS if k not in ("ce_time", "content-type")]
    headers, _ = binary_request(FakeRecord(no_time), "/src")
    assert "ce-time" not in headers and headers["content-type"] == "application/json"


def test_a_plain_record_gets_knative_kafka_event_attributes():
    headers, body = binary_request(FakeRecord([]), SOURCE)
    assert headers == {
        "content-type": "application/json",
        "ce-specversion": "1.0",
        "ce-id": "partition:2/offset:41",
        "ce-type": "dev.knative.kafka.event",
        "ce-source": SOURCE,
        "ce-subject": "partition:2#41",
        "ce-time": "2023-11-14T22:13:20+00:00",
        "ce-key": "k",
    }
    assert body == b'{"job_id": "x"}'
    keyless, _ = binary_request(FakeRecord([], key=None, timestamp=(0, -1)), SOURCE)
    assert "ce-key" not in keyless and "ce-time" not in keyless


def test_a_record_whose_ce_headers_are_no_valid_event_becomes_a_kafka_event():
    bad = [("ce_specversion", b"9.9"), ("ce_id", b"j"), ("ce_type", b"t"), ("ce_source", b"/s")]
    event = record_event(FakeRecord(bad), SOURCE)
    assert event["type"] == "dev.knative.kafka.event" and event["id"] == "partition:2/offset:41"
    partial = record_event(FakeRecord([("ce_type", b"t"), ("ce_source", b"/s")]), SOURCE)
    assert partial["id"] == "partition:2/offset:41"


def test_the_commit_point_never_passes_an_unfinished_record():
    state = PartitionState()
    assert state.commit_point() is None
    state.pending.update({10, 11, 12})
    state.next_offset = 13
    state.pending.discard(11)
    state.pending.discard(12)
    assert state.commit_point() == 10
    state.pending.discard(10)
    assert state.commit_point() == 13


def test_a_batch_body_decodes_back_with_the_sdk_json_or_base64():
    records = [FakeRecord(JOB_HEADERS), FakeRecord([], b"\x00not json"),
               FakeRecord([], b"null", offset=42), FakeRecord([], b"", offset=43)]
    elements = json.loads(batch_body(records, "/src"))
    assert elements[0]["data"] == {"job_id": "x"} and elements[0]["jobtype"] == "ECHO"
    assert elements[1]["data_base64"] == "AG5vdCBqc29u" and "data" not in elements[1]
    assert elements[2]["data_base64"] == "bnVsbA==" and "data" not in elements[2]
    assert "data" not in elements[3] and "data_base64" not in elements[3]
    events = [from_json(json.dumps(element)) for element in elements]
    assert events[0] == from_http(*binary_request(records[0], "/src"))
    assert events[0].data == {"job_id": "x"} and events[0]["time"] == "2024-05-01T10:00:00+00:00"
    assert events[1]["id"] == "partition:2/offset:41" and events[1].data == b"\x00not json"
    assert events[1]["type"] == "dev.knative.kafka.event" and events[1]["key"] == "k"
    assert events[2]["id"] == "partition:2/offset:42"
    assert events[3].data is None


def test_a_dead_letter_record_is_the_event_with_knatives_error_extensions():
    record = FakeRecord(JOB_HEADERS + [("traceparent", b"00-abc")])
    dead = dead_letter_record(record, "/src", "http://process", 400, b"bad" * 500)
    assert dead.key == b"k" and dead.value == b'{"job_id": "x"}'
    assert dead.headers["traceparent"] == b"00-abc"
    event = cloudevents.kafka.from_binary(dead)
    assert event["id"] == "job-1" and event["jobtype"] == "ECHO" and event.data == {"job_id": "x"}
    assert event["knativeerrordest"] == "http://process"
    assert event["knativeerrorcode"] == "400"
    assert len(event["knativeerrordata"]) == 1368  # base64 of the first 1,024 bytes
    plain = cloudevents.kafka.from_binary(
        dead_letter_record(FakeRecord([]), SOURCE, "http://process", None, b"refused"),
        data_unmarshaller=lambda raw: raw)
    assert plain["id"] == "partition:2/offset:41" and plain["key"] == "k"
    assert plain["knativeerrorcode"] == "0" and plain["knativeerrordata"] == "cmVmdXNlZA=="
