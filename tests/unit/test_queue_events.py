"""Job events as Kafka records: binary content mode, as the SDK reads them back."""

import uuid

import cloudevents.kafka

from common.queue import JOB_EVENT_TYPE, job_event


def test_a_job_event_is_a_binary_mode_record_with_the_job_as_key_and_json_value():
    job_id = uuid.uuid4()
    message = job_event("job-queue", job_id, "ECHO").message("2024-05-01T10:00:00+00:00")
    assert message.key == str(job_id)
    assert message.value == b'{"job_id":"%s","job_type":"ECHO"}' % str(job_id).encode()
    assert message.headers == {
        "content-type": b"application/json",
        "ce_specversion": b"1.0",
        "ce_id": str(job_id).encode(),
        "ce_type": JOB_EVENT_TYPE.encode(),
        "ce_source": b"/jobs/submit",
        "ce_time": b"2024-05-01T10:00:00+00:00",
        "ce_jobtype": b"ECHO",
    }
    event = cloudevents.kafka.from_binary(message)
    assert event["id"] == str(job_id) and event["partitionkey"] == str(job_id)
    assert event.data == {"job_id": str(job_id), "job_type": "ECHO"}


def test_a_job_event_without_a_time_is_stamped_now():
    message = job_event("job-queue", uuid.uuid4(), "ECHO", ce_id="retry-1").message()
    assert message.headers["ce_id"] == b"retry-1" and message.headers["ce_time"]
