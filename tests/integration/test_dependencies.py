"""Dependencies between jobs (`depends_on`, state WAITING) on the real stack."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest

from tests.integration.test_cli import jobs  # noqa: F401 - the CLI runner fixture
from tests.support.client import wait_for

pytestmark = pytest.mark.integration


def _attempts(api, job_id):
    return api.request("GET", f"/jobs/{job_id}/attempts").json["items"]


def test_a_child_waits_for_its_parent_runs_after_it_and_sees_its_result(api):
    parent = api.submit("SLEEPY", {"seconds": 1.0}).json
    reply = api.submit("PARENTS", depends_on=[parent["job_id"]])
    assert reply.status == 202, reply.body
    child = reply.json
    assert child["status"] == "WAITING" and child["depends_on"] == [parent["job_id"]]
    assert api.job(child["job_id"])["status"] == "WAITING"  # still, while the parent runs
    done = api.wait_status(child["job_id"], timeout=30)
    assert done["status"] == "COMPLETED"
    parent_done = api.job(parent["job_id"])
    assert done["result"] == {"parents": {parent["job_id"]: parent_done["result"]}}
    child_start = dt.datetime.fromisoformat(_attempts(api, child["job_id"])[0]["started_at"])
    parent_end = dt.datetime.fromisoformat(_attempts(api, parent["job_id"])[0]["finished_at"])
    assert child_start >= parent_end
    listed = api.request("GET", f"/jobs/{parent['job_id']}/dependents").json["items"]
    assert [j["job_id"] for j in listed] == [child["job_id"]]


def test_a_child_of_a_completed_parent_is_queued_at_once(api):
    parent = api.submit("ECHO", {"message": "first"}).json
    api.wait_status(parent["job_id"])
    child = api.submit("PARENTS", depends_on=[parent["job_id"]]).json
    assert child["status"] == "QUEUED"
    assert api.wait_status(child["job_id"])["result"]["parents"] == {
        parent["job_id"]: {"echo": "first", "attempt": 1}}


def test_a_whole_graph_in_one_batch_runs_in_order(api):
    reply = api.request("POST", "/jobs/batch", json_body={"jobs": [
        {"job_type": "ECHO", "payload": {"message": "a"}},
        {"job_type": "ECHO", "payload": {"message": "b"}, "depends_on": [0]},
        {"job_type": "PARENTS", "depends_on": [0, 1]},
    ]})
    assert reply.status == 202, reply.body
    a, b, c = reply.json["jobs"]
    assert (a["status"], b["status"], c["status"]) == ("QUEUED", "WAITING", "WAITING")
    assert c["depends_on"] == [a["job_id"], b["job_id"]]
    done = api.wait_status(c["job_id"], timeout=30)
    assert set(done["result"]["parents"]) == {a["job_id"], b["job_id"]}
    starts = [dt.datetime.fromisoformat(_attempts(api, j["job_id"])[0]["started_at"])
              for j in (a, b, c)]
    assert starts == sorted(starts)


def test_children_of_parents_ending_at_the_same_moment_run_exactly_once(api):
    """Two parents of one child completing at once: whichever settles last releases it."""
    batch = []
    for i in range(15):
        batch += [{"job_type": "NOOP"}, {"job_type": "NOOP"},
                  {"job_type": "PARENTS", "depends_on": [3 * i, 3 * i + 1]}]
    created = api.request("POST", "/jobs/batch", json_body={"jobs": batch}).json["jobs"]
    children = [j["job_id"] for j in created[2::3]]
    for child in children:
        assert api.wait_status(child, timeout=60)["status"] == "COMPLETED"
        assert len(_attempts(api, child)) == 1


def test_a_dead_lettered_parent_cancels_its_dependents_down_the_line(api):
    # one batch: the parent cannot fail before its dependents exist
    parent, child, grandchild = api.request("POST", "/jobs/batch", json_body={"jobs": [
        {"job_type": "PERMANENT_FAIL"}, {"job_type": "PARENTS", "depends_on": [0]},
        {"job_type": "PARENTS", "depends_on": [1]}]}).json["jobs"]
    assert api.wait_status(parent["job_id"])["status"] == "DEAD_LETTER"
    doc = api.wait_status(child["job_id"], "CANCELLED", timeout=20)
    assert doc["cancelled_by"] == parent["job_id"]
    assert doc["error_message"] == f"parent {parent['job_id']} ended DEAD_LETTER"
    assert doc["attempts"] == 0
    grand = api.wait_status(grandchild["job_id"], "CANCELLED", timeout=20)
    assert grand["cancelled_by"] == child["job_id"]
    assert f"parent {child['job_id']} ended CANCELLED" == grand["error_message"]

    # A plain replay leaves them cancelled...
    assert api.request("POST", f"/jobs/{parent['job_id']}/retry").status == 202
    assert api.wait_status(parent["job_id"], "DEAD_LETTER")["status"] == "DEAD_LETTER"
    assert api.job(child["job_id"])["status"] == "CANCELLED"
    # ... with_dependents=true brings the whole line back to wait for it again; the parent
    # fails again, and so they are cancelled again.
    reply = api.request("POST", f"/jobs/{parent['job_id']}/retry?with_dependents=true")
    assert reply.status == 202, reply.body
    revived = api.job(grandchild["job_id"])
    assert revived["status"] in ("WAITING", "CANCELLED")
    wait_for(lambda: api.job(child["job_id"])["version"] > doc["version"] + 1, 20,
             "the child to wait again and be cancelled again")
    again = api.wait_status(child["job_id"], "CANCELLED", timeout=20)
    assert again["cancelled_by"] == parent["job_id"] and again["attempts"] == 0
    assert api.wait_status(grandchild["job_id"], "CANCELLED")["version"] > grand["version"]


def test_replay_with_dependents_lets_them_run_when_the_parent_then_succeeds(api, database_url):
    from common.db import Database

    parent, child = api.request("POST", "/jobs/batch", json_body={"jobs": [
        {"job_type": "FLAKY", "payload": {"failures": 1}, "max_retries": 0},
        {"job_type": "PARENTS", "depends_on": [0]}]}).json["jobs"]
    assert api.wait_status(parent["job_id"])["status"] == "DEAD_LETTER"
    api.wait_status(child["job_id"], "CANCELLED", timeout=20)
    reply = api.request("POST", f"/jobs/{parent['job_id']}/retry?with_dependents=true")
    assert reply.status == 202
    assert api.wait_status(child["job_id"], timeout=30)["status"] == "COMPLETED"
    db = Database(database_url)
    try:
        statuses = db.run("SELECT status::text FROM jobs WHERE job_id = CAST(:id AS uuid)",
                          id=child["job_id"])
    finally:
        db.close()
    assert statuses == [["COMPLETED"]]


def test_cancelling_a_waiting_job_cancels_its_own_dependents(api):
    parent = api.submit("SLEEPY", {"seconds": 3}).json
    child = api.submit("PARENTS", depends_on=[parent["job_id"]]).json
    grandchild = api.submit("PARENTS", depends_on=[child["job_id"]]).json
    reply = api.request("POST", f"/jobs/{child['job_id']}/cancel")
    assert reply.status == 202 and reply.json["status"] == "CANCELLED"
    assert reply.json["cancelled_by"] is None  # cancelled by an operator: final
    grand = api.wait_status(grandchild["job_id"], "CANCELLED", timeout=20)
    assert grand["cancelled_by"] == child["job_id"]
    assert api.wait_status(parent["job_id"])["status"] == "COMPLETED"
    assert api.job(child["job_id"])["status"] == "CANCELLED"


@pytest.mark.parametrize("body,words", [
    ({"job_type": "ECHO", "payload": {"message": "x"}, "depends_on": [str(uuid.uuid4())]},
     "names no job"),
    ({"job_type": "ECHO", "payload": {"message": "x"}, "depends_on": [0]}, "is an index"),
    ({"job_type": "ECHO", "payload": {"message": "x"}, "depends_on": ["not-a-uuid"]},
     "depends_on"),
    ({"job_type": "ECHO", "payload": {"message": "x"}, "depends_on": [-1]}, "depends_on"),
])
def test_bad_dependencies_are_422s(api, body, words):
    reply = api.request("POST", "/jobs", json_body=body)
    assert reply.status == 422, reply.body
    assert words in reply.json["detail"] + str(reply.json.get("errors"))


def test_a_batch_item_may_only_depend_on_earlier_items(api):
    for refs in ([1], [2], [5]):
        reply = api.request("POST", "/jobs/batch", json_body={"jobs": [
            {"job_type": "NOOP"}, {"job_type": "NOOP", "depends_on": refs}]})
        assert reply.status == 422 and "jobs[1].depends_on" in reply.json["detail"], reply.body
    assert api.request("GET", "/jobs?job_type=NOOP&status=WAITING").status == 200
    unknown = str(uuid.uuid4())
    reply = api.request("POST", "/jobs/batch", json_body={"jobs": [
        {"job_type": "NOOP"}, {"job_type": "NOOP", "depends_on": [0, unknown]}]})
    assert reply.status == 422
    assert reply.json["detail"] == f"jobs[1].depends_on names no job {unknown}"


def test_a_parent_that_already_failed_is_refused(api):
    parent = api.submit("PERMANENT_FAIL").json
    api.wait_status(parent["job_id"])
    reply = api.submit("PARENTS", depends_on=[parent["job_id"]])
    assert reply.status == 422 and "DEAD_LETTER" in reply.json["detail"]
    assert "replay it first" in reply.json["detail"]


def test_the_cli_submits_a_dependent_job_lists_dependents_and_replays_them(
        jobs, api):  # noqa: F811 - the fixture
    parent = jobs("submit", "PERMANENT_FAIL", "--run-at", "+2s", "--json")  # fails later
    assert parent.returncode == 0, parent.stderr
    parent_id = json.loads(parent.stdout)["job_id"]
    child = jobs("submit", "PARENTS", "--depends-on", parent_id[:12], "--wait",
                 "--wait-timeout", "30")
    assert child.returncode == 1, child.stdout + child.stderr  # cancelled: its parent failed
    assert "CANCELLED" in child.stdout
    listed = jobs("dependents", parent_id, "--full-ids")
    assert listed.returncode == 0 and "CANCELLED" in listed.stdout, listed.stderr
    child_id = api.request("GET", f"/jobs/{parent_id}/dependents").json["items"][0]["job_id"]
    assert child_id in listed.stdout
    shown = jobs("status", child_id)
    assert f"Depends on:   {parent_id}" in shown.stdout
    assert f"Cancelled by: {parent_id}" in shown.stdout
    before = api.job(child_id)["version"]
    again = jobs("retry", parent_id, "--with-dependents")
    assert again.returncode == 0, again.stderr
    assert "the jobs its failure cancelled wait for it again" in again.stdout
    # waits again (one version), then is cancelled again when the parent fails again
    wait_for(lambda: api.job(child_id)["version"] >= before + 2, 20, "the child to wait again")
