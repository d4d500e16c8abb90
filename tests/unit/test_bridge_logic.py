"""The bridge's pure parts: CloudEvent headers of a record, and the commit point."""

from infra.bridge import PartitionState, cloudevent_headers


class FakeRecord:
    """Just the Message methods `cloudevent_headers` reads."""

    def __init__(self, headers, key=b"k", partition=2, offset=41):
        self._headers, self._key, self._p, self._o = headers, key, partition, offset

    def headers(self):
        return self._headers

    def key(self):
        return self._key

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def timestamp(self):
        return (1, 1_700_000_000_000)


def test_a_record_with_ce_headers_passes_through_unchanged():
    record = FakeRecord([("ce_specversion", b"1.0"), ("ce_id", b"job-1"), ("ce_type", b"t"),
                         ("ce_source", b"/s"), ("ce_jobtype", b"ECHO"),
                         ("content-type", b"application/json")])
    headers = cloudevent_headers(record, "/src")
    assert headers["ce-id"] == "job-1" and headers["ce-jobtype"] == "ECHO"
    assert headers["content-type"] == "application/json"


def test_a_plain_record_gets_knative_kafka_event_attributes():
    headers = cloudevent_headers(FakeRecord([]), "/apis/v1/namespaces/default/kafkasources/x#t")
    assert headers["ce-type"] == "dev.knative.kafka.event"
    assert headers["ce-id"] == "partition:2/offset:41"
    assert headers["ce-subject"] == "partition:2#41" and headers["ce-key"] == "k"


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


def test_a_record_becomes_a_structured_event_for_batches_json_or_base64():
    from infra.bridge import structured_event

    class Record(FakeRecord):
        def __init__(self, value, headers):
            super().__init__(headers)
            self._value = value

        def value(self):
            return self._value

    ce = [("ce_specversion", b"1.0"), ("ce_id", b"j"), ("ce_type", b"t"), ("ce_source", b"/s"),
          ("content-type", b"application/json")]
    event = structured_event(Record(b'{"job_id": "x"}', ce), "/src")
    assert event["id"] == "j" and event["data"] == {"job_id": "x"}
    garbage = structured_event(Record(b"\x00not json", []), "/src")
    assert garbage["id"] == "partition:2/offset:41" and "data" not in garbage
    assert garbage["data_base64"] == "AG5vdCBqc29u"
