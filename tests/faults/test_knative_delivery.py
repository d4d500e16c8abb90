"""The job-queue trigger as Knative runs it: an outage gets a bounded number of delivery
attempts, then the record goes to the dead-letter topic (a KafkaSource's `delivery.retry`
and `deadLetterSink`). A PostgreSQL outage longer than those retries must still lose
nothing and leave no dead letters for jobs that later complete: `dlq` recognises a record
whose job still waits and leaves the job to the sweeper."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from common.db import Database
from infra.stack import Stack
from tests.support.client import Api, wait_for
from tests.support.invariants import check_invariants
from tests.support.stacks import FAULT_ENV, own_stack

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture(scope="module")
def knative_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Two retries, 0.2 s then 0.4 s apart: a 4 s outage outlasts them.
    with own_stack(tmp_path_factory.mktemp("knative-delivery"), FAULT_ENV, sweep_interval=0.5,
                   process_workers=1, bridge_delivery="knative", bridge_retries=2) as stack:
        yield stack


def test_an_outage_longer_than_the_retries_loses_nothing_and_dead_letters_nothing(
        knative_stack):
    api = Api(knative_stack.gateway_url, knative_stack.admin_token)
    db = Database(knative_stack.env["DATABASE_URL"])
    try:
        # Submit needs PostgreSQL: stop it right after the jobs are accepted, while most
        # of their records are still being delivered.
        reply = api.request("POST", "/jobs/batch", json_body={
            "jobs": [{"job_type": "SLEEPY", "payload": {"seconds": 0.2}}] * 40})
        assert reply.status == 202, reply.body
        ids = [job["job_id"] for job in reply.json["jobs"]]
        knative_stack.stop_service("postgresql")
        time.sleep(4)  # the outage itself: no condition to wait for while it lasts
        knative_stack.restart_service("postgresql")
        jobs = check_invariants(db, knative_stack.env["REDIS_URL"], ids)
        assert {j["status"] for j in jobs.values()} == {"COMPLETED"}
        logs = knative_stack.data_dir / "logs"
        given_up = (logs / "bridge-q.log").read_text().count("dead-lettered to")
        assert given_up, "the outage never outlasted the retries"

        def settled_by_dlq() -> bool:  # every record given up on has been through dlq
            said = (logs / "dlq.log").read_text()
            # Its job still waited (the sweeper publishes it again) or had finished by the
            # time dlq saw it (PostgreSQL came back meanwhile): both are no dead letter.
            handled = said.count("left to the sweeper") + said.count("nothing to record")
            recorded = db.run("SELECT count(*) FROM dead_letters")[0][0]
            return handled + recorded >= given_up

        wait_for(settled_by_dlq, 30, f"dlq to handle the {given_up} record(s) given up on")
        assert db.run("SELECT count(*) FROM dead_letters") == [[0]]
    finally:
        db.close()
