"""Per-type topics on a real stack of their own (shared with test_tls, whose TLS servers
change nothing here: tests/integration/conftest.py): a type with `topic=` gets its topic,
its bridge and consumer group, every publisher of its messages uses that topic, and a
flood of slow jobs there does not hold up a fast type on the job queue."""

from __future__ import annotations

import collections
import json
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, TopicPartition

from common.db import Database
from infra.stack import Stack
from tests.support.client import Api, wait_for
from tests.support.stacks import LANES_IN_FLIGHT
from tests.support.topic_handlers import LANE

pytestmark = pytest.mark.integration
IN_FLIGHT = LANES_IN_FLIGHT  # records each bridge delivers at once: a flood of more fills it


@pytest.fixture(scope="module")
def lanes(tls_lanes_stack: Stack) -> Stack:
    return tls_lanes_stack


@pytest.fixture(scope="module")
def lapi(lanes: Stack) -> Api:
    return Api(lanes.gateway_url, lanes.admin_token)


@pytest.fixture(scope="module")
def ldb(lanes: Stack) -> Iterator[Database]:
    db = Database(lanes.env["DATABASE_URL"])
    yield db
    db.close()


def job_ids_on(bootstrap: str, topic: str) -> collections.Counter[str]:
    """How many records of each job id `topic` holds, from its start to its end now."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        seen: collections.Counter[str] = collections.Counter()
        read = dict.fromkeys(ends, 0)

        def done() -> bool:
            for message in consumer.consume(100, 0.2):
                if message.error() is None:
                    read[message.partition()] = message.offset() + 1
                    seen[json.loads(message.value())["job_id"]] += 1
            return all(read[p] >= ends[p] for p in ends)

        wait_for(done, 20, f"every record of {topic}")
        return seen
    finally:
        consumer.close()


def test_the_stack_creates_each_types_topic_with_a_bridge_and_group_of_its_own(lanes, lapi):
    assert list(lanes.queue_topics.items()) == [("job-queue", "jobs-process"),
                                                (LANE, f"jobs-process-{LANE}")]
    assert lanes.topics[LANE] == lanes.topics["job-queue"]  # JOBS_QUEUE_PARTITIONS
    assert f"{LANE} -> process (jobs-process-{LANE})" in lanes.summary()
    log = (lanes.data_dir / "logs" / f"bridge-topic-{LANE}.log").read_text()
    assert "assigned [" in log, "the lane's bridge never got a partition"
    ready = lapi.request("GET", "/readyz").json
    assert ready["checks"][f"trigger:{LANE}"] == ready["checks"]["handlers"] == {"ok": True}
    metrics = lapi.request("GET", "/metrics").body.decode()
    assert f'jobs_queue_lag_records{{partition="0",topic="{LANE}"}}' in metrics


def test_every_message_of_a_type_goes_to_its_topic_submit_requeue_sweeper_and_replay(
        lanes, lapi):
    ids = {job_type: lapi.submit(job_type).json["job_id"]
           for job_type in ("LANE_RETRY_NOW", "LANE_RETRY_LATER", "LANE_DEAD", "NOOP")}
    # released by its parent, and made by a schedule's tick
    _, released = lapi.request("POST", "/jobs/batch", json_body={"jobs": [
        {"job_type": "NOOP"}, {"job_type": "LANE_DEAD", "depends_on": [0]}]}).json["jobs"]
    name = f"lane-{uuid.uuid4().hex[:8]}"
    assert lapi.request("POST", "/schedules", json_body={
        "name": name, "job_type": "LANE_DEAD", "every_seconds": 1}).status == 201
    ticked = wait_for(lambda: lapi.request("GET", f"/schedules/{name}").json["last_job_id"],
                      20, "the schedule's first tick")
    assert lapi.request("DELETE", f"/schedules/{name}").status == 204
    for job_id in (released["job_id"], ticked):
        assert lapi.wait_status(job_id)["status"] == "DEAD_LETTER"
    for job_type in ("LANE_RETRY_NOW", "LANE_RETRY_LATER", "NOOP"):
        job = lapi.wait_status(ids[job_type])
        assert (job["status"], job["attempts"]) == ("COMPLETED", 2 if "LANE" in job_type else 1)
    assert lapi.wait_status(ids["LANE_DEAD"])["status"] == "DEAD_LETTER"
    reply = lapi.request("POST", f"/jobs/{ids['LANE_DEAD']}/retry")
    assert reply.status == 202, reply.body
    assert lapi.wait_status(ids["LANE_DEAD"], "COMPLETED")["attempts"] == 2
    bootstrap = lanes.env["KAFKA_BOOTSTRAP_SERVERS"]
    lane, queue = job_ids_on(bootstrap, LANE), job_ids_on(bootstrap, "job-queue")
    for job_type in ("LANE_RETRY_NOW", "LANE_RETRY_LATER", "LANE_DEAD"):
        # The submit's record and the retry's (process, sweeper, replay), both on the lane.
        assert lane[ids[job_type]] >= 2, (job_type, lane[ids[job_type]])
        assert queue[ids[job_type]] == 0, f"a {job_type} record went to the job queue"
    assert queue[ids["NOOP"]] >= 1 and lane[ids["NOOP"]] == 0
    for job_id in (released["job_id"], ticked):
        assert lane[job_id] >= 1 and queue[job_id] == 0, "a release or a tick missed the lane"


def test_a_flood_of_slow_jobs_on_one_topic_does_not_hold_up_a_fast_type_on_another(
        lanes, lapi, ldb):
    reply = lapi.request("POST", "/jobs/batch", json_body={
        "jobs": [{"job_type": "SLOW_LANE", "payload": {"seconds": 3}}] * (IN_FLIGHT * 3)})
    assert reply.status == 202, reply.body
    slow = [job["job_id"] for job in reply.json["jobs"]]
    wait_for(lambda: ldb.run("SELECT count(*) FROM jobs WHERE job_id = ANY(CAST(:ids AS"
                             " uuid[])) AND status = 'IN_PROGRESS'", ids=slow)[0][0] > 0,
             30, "the flood to be running")
    fast = lapi.submit("NOOP").json["job_id"]
    assert lapi.wait_status(fast, timeout=60)["status"] == "COMPLETED"
    for job_id in slow:
        assert lapi.wait_status(job_id, timeout=90)["status"] == "COMPLETED"
    [[fast_done]] = ldb.run("SELECT finished_at FROM job_attempts"
                            " WHERE job_id = CAST(:id AS uuid)", id=fast)
    [[first_slow_done, started_after]] = ldb.run(
        "SELECT min(finished_at), count(*) FILTER (WHERE started_at > :t) FROM job_attempts"
        " WHERE job_id = ANY(CAST(:ids AS uuid[]))", ids=slow, t=fast_done)
    # On a shared topic the fast job's record waits behind the flood's (its bridge holds
    # IN_FLIGHT of them until slow jobs end): it would run after the first slow job ended,
    # and after every slow job had started.
    assert started_after > 0, "every slow job started before the fast job was done"
    assert fast_done < first_slow_done, "the fast job waited for a slow one to end"
