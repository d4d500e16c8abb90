"""Schedules against the real stack: the API, ticking every N seconds, exactly one job per
tick with sweepers racing, delete and pause stopping the ticks, and the 4xx answers."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from common.db import Database
from common.schedules import tick_key
from tests.support.client import Api, in_thread, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create(api: Api, name: str, **body: object) -> dict:
    reply = api.request("POST", "/schedules", json_body={"name": name, **body})
    assert reply.status == 201, reply.body
    return reply.json  # type: ignore[no-any-return]


def made_by(db: Database, name: str) -> list[list]:
    """(job id, idempotency key, status) of every job the schedule made, oldest first."""
    return db.run("SELECT job_id::text, idempotency_key, status::text FROM jobs"
                  " WHERE submitted_by = :by ORDER BY created_at", by=f"schedule:{name}")


def tick_of(key: str) -> datetime:
    return datetime.fromisoformat(key.split("\t")[2])


def sweeper_ticked_twice(api: Api, db: Database) -> None:
    """Proof that the stack's sweeper has run since now: a fresh one-second schedule has
    made two jobs (so another schedule's silence meanwhile means something)."""
    name = unique("sentinel")
    create(api, name, job_type="NOOP", every_seconds=1)
    wait_for(lambda: len(made_by(db, name)) >= 2, 30, "the sentinel schedule to tick twice")
    assert api.request("DELETE", f"/schedules/{name}").status == 204


def test_a_cron_schedule_in_a_time_zone_lists_its_next_run(api):
    name = unique("berlin-nine")
    before = datetime.now(UTC)
    doc = create(api, name, job_type="ECHO", payload={"message": "guten Morgen"},
                 cron="0 9 * * *", timezone="Europe/Berlin")
    assert doc["timezone"] == "Europe/Berlin" and doc["every_seconds"] is None
    assert doc["paused"] is False and doc["last_run_at"] is None and doc["last_job_id"] is None
    next_run = datetime.fromisoformat(doc["next_run_at"])
    local = next_run.astimezone(ZoneInfo("Europe/Berlin"))
    assert (local.hour, local.minute) == (9, 0)
    assert before < next_run <= before + timedelta(hours=24)

    assert api.request("GET", f"/schedules/{name}").json == doc
    listed = api.request("GET", "/schedules?limit=200").json
    assert doc in listed["items"]
    utc_default = create(api, unique("utc"), job_type="NOOP", cron="*/5 * * * *")
    assert utc_default["timezone"] == "UTC"
    for made in (name, utc_default["name"]):
        assert api.request("DELETE", f"/schedules/{made}").status == 204


def test_every_two_seconds_makes_a_job_per_tick_until_deleted(api, db):
    name = unique("every-2s")
    created = create(api, name, job_type="ECHO", payload={"message": "tick"},
                     every_seconds=2, max_retries=0)
    assert datetime.fromisoformat(created["next_run_at"]) > datetime.fromisoformat(
        created["created_at"])
    jobs = wait_for(lambda: (rows := made_by(db, name)) and len(rows) >= 3 and rows, 30,
                    "three ticks of an every-2-seconds schedule")
    ticks = [tick_of(key) for _, key, _ in jobs]
    gaps = {(b - a).total_seconds() for a, b in zip(ticks, ticks[1:], strict=False)}
    assert all(gap > 0 and gap % 2 == 0 for gap in gaps), ticks  # on the 2 s grid, no repeat
    for job_id, _, _ in jobs:  # ordinary jobs (their running is tested elsewhere)
        job = api.job(job_id)
        assert job["job_type"] == "ECHO" and job["max_retries"] == 0
        assert job["payload"] == {"message": "tick"} and job["submitted_by"] == f"schedule:{name}"
    doc = api.request("GET", f"/schedules/{name}").json
    assert doc["last_job_id"] in {job_id for job_id, _, _ in made_by(db, name)}

    assert api.request("DELETE", f"/schedules/{name}").status == 204
    count = len(made_by(db, name))  # a tick fired while DELETE waited for its lock counts
    assert api.request("GET", f"/schedules/{name}").status == 404
    sweeper_ticked_twice(api, db)
    assert len(made_by(db, name)) == count


def test_a_paused_schedule_makes_no_job_and_resumes_from_the_next_tick(api, db):
    name = unique("pausing")
    create(api, name, job_type="NOOP", every_seconds=1)
    wait_for(lambda: made_by(db, name), 30, "a first tick")
    paused = api.request("POST", f"/schedules/{name}/pause")
    assert paused.status == 200, paused.body
    assert paused.json["paused"] is True and paused.json["next_run_at"] is None
    assert paused.json["paused_reason"] == "paused by admin"
    assert api.request("POST", f"/schedules/{name}/pause").json["paused"] is True
    count = len(made_by(db, name))
    sweeper_ticked_twice(api, db)
    assert len(made_by(db, name)) == count

    resumed = api.request("POST", f"/schedules/{name}/resume")
    assert resumed.status == 200 and resumed.json["paused"] is False
    assert resumed.json["paused_reason"] is None
    next_run = datetime.fromisoformat(resumed.json["next_run_at"])
    assert next_run > datetime.fromisoformat(paused.json["updated_at"])
    wait_for(lambda: len(made_by(db, name)) > count, 30, "a tick after resume")
    assert api.request("DELETE", f"/schedules/{name}").status == 204


def test_two_sweepers_racing_make_exactly_one_job_per_tick(api, db, function_env):
    from common import clients, schedules

    name = unique("raced")
    doc = create(api, name, job_type="NOOP", every_seconds=3600)
    clients.handlers()  # as the sweeper function does: fire_due checks the job type
    settings, publisher = clients.settings(), clients.publisher()
    sweepers = [Database(function_env["DATABASE_URL"]) for _ in range(2)]
    start = threading.Barrier(2)  # both sweepers ask at the same moment, every round

    def fire(sweeper: Database) -> int:
        """How many times this sweeper fired our schedule (others may be due too)."""
        start.wait(10)
        return schedules.fire_due(sweeper, publisher, settings).count(name)

    mine = 0
    try:
        base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
        for round_ in range(5):
            # a tick that fell while "the system was down" (the stack's own sweeper races too)
            tick = base - timedelta(seconds=round_)
            db.run("UPDATE schedules SET next_run_at = CAST(:t AS timestamptz)"
                   " WHERE name = :name", t=tick.isoformat(), name=name)
            fired = [f.result(30) for f in [in_thread(fire, s) for s in sweepers]]
            assert sum(fired) <= 1, f"both sweepers took the same tick: {fired}"
            mine += sum(fired)
            key = tick_key(doc["schedule_id"], tick)
            jobs = wait_for(lambda key=key: db.run(
                "SELECT job_id::text FROM jobs WHERE idempotency_key = :k", k=key),
                10, "the tick's job")
            assert len(jobs) == 1
            after = api.request("GET", f"/schedules/{name}").json
            assert after["last_job_id"] == jobs[0][0]
            assert datetime.fromisoformat(after["last_run_at"]) == tick
            assert datetime.fromisoformat(after["next_run_at"]) > datetime.now(UTC)
        assert mine >= 1, "the stack's sweeper won every race: nothing was raced here"

        # after a restart that lost the schedule's progress, the same tick again: same job
        db.run("UPDATE schedules SET next_run_at = CAST(:t AS timestamptz)"
               " WHERE name = :name", t=tick.isoformat(), name=name)
        schedules.fire_due(sweepers[0], publisher, settings)
        wait_for(lambda: datetime.fromisoformat(api.request("GET", f"/schedules/{name}").json[
            "next_run_at"]) > datetime.now(UTC), 10, "the replayed tick to be fired")
        assert len(made_by(db, name)) == 5
        assert api.request("GET", f"/schedules/{name}").json["last_job_id"] == jobs[0][0]
    finally:
        for sweeper in sweepers:
            sweeper.close()
        api.request("DELETE", f"/schedules/{name}")


def test_a_schedule_whose_job_type_is_no_longer_registered_pauses_saying_why(api, db):
    """A restart without the type's handler module: its ticks would only make jobs that
    are dead-lettered at once ("no handler for job type"), one per tick."""
    name = unique("orphan-type")
    create(api, name, job_type="NOOP", every_seconds=3600)
    db.run("UPDATE schedules SET job_type = 'GONE_TYPE', next_run_at = now() - interval '1 s'"
           " WHERE name = :name", name=name)
    try:
        paused = wait_for(lambda: (doc := api.request("GET", f"/schedules/{name}").json)[
            "paused"] and doc, 30, "the stack's sweeper to pause it")
        assert "'GONE_TYPE' is not registered here" in paused["paused_reason"]
        assert made_by(db, name) == []
    finally:
        api.request("DELETE", f"/schedules/{name}")


def test_ticks_missed_while_the_system_was_down_make_one_job(api, db):
    name = unique("missed")
    doc = create(api, name, job_type="NOOP", every_seconds=3600)
    first = datetime.fromisoformat(doc["next_run_at"])
    # as if it had been down for three hours: the ticks at -2 h, -1 h and now are all due
    db.run("UPDATE schedules SET next_run_at = next_run_at - interval '3 hours'"
           " WHERE name = :name", name=name)
    wait_for(lambda: made_by(db, name), 30, "the missed ticks' job")
    sweeper_ticked_twice(api, db)
    assert len(made_by(db, name)) == 1
    after = api.request("GET", f"/schedules/{name}").json
    assert datetime.fromisoformat(after["last_run_at"]) == first - timedelta(hours=3)
    assert datetime.fromisoformat(after["next_run_at"]) == first  # the first tick after now
    assert api.request("DELETE", f"/schedules/{name}").status == 204


def test_a_schedule_whose_tick_fails_is_paused_and_holds_up_no_other(api, db):
    broken, healthy = unique("broken"), unique("healthy")
    create(api, broken, job_type="NOOP", cron="* * * * *", timezone="Europe/Berlin")
    # as if the zone had left the tz database since: its next tick cannot be computed
    db.run("UPDATE schedules SET timezone = 'Mars/Olympus_Mons', next_run_at = now()"
           " WHERE name = :name", name=broken)
    create(api, healthy, job_type="NOOP", every_seconds=1)
    wait_for(lambda: api.request("GET", f"/schedules/{broken}").json["paused"], 30,
             "the broken schedule to be paused")
    assert "could not be made" in api.request("GET", f"/schedules/{broken}").json[
        "paused_reason"]
    wait_for(lambda: len(made_by(db, healthy)) >= 2, 30, "the healthy one to keep ticking")
    assert made_by(db, broken) == []  # its job was rolled back with the rest of its tick
    for name in (broken, healthy):
        assert api.request("DELETE", f"/schedules/{name}").status == 204


@pytest.mark.parametrize(("body", "says"), [
    ({"cron": "61 * * * *"}, "Bad minute"),
    ({"cron": "0 9 * *"}, "five fields"),
    ({"cron": "0 9 * * *", "timezone": "Europe/Bxl"}, "not an IANA time zone name"),
    ({"every_seconds": 0}, "greater than or equal to 1"),
    ({"cron": "0 9 * * *", "every_seconds": 5}, "either cron or every_seconds"),
    ({}, "either cron or every_seconds"),
    ({"every_seconds": 5, "timezone": "UTC"}, "timezone applies to cron only"),
])
def test_a_bad_timing_is_a_422_saying_what_is_wrong(api, body, says):
    reply = api.request("POST", "/schedules",
                        json_body={"name": unique("bad"), "job_type": "NOOP", **body})
    assert reply.status == 422, reply.body
    assert reply.content_type == "application/problem+json"
    assert says in reply.json["detail"], reply.json


def test_names_types_payloads_and_unknown_schedules_get_their_4xx(api):
    name = unique("dup")
    create(api, name, job_type="ECHO", payload={"message": "x"}, cron="0 0 1 1 *")
    again = api.request("POST", "/schedules", json_body={
        "name": name, "job_type": "NOOP", "every_seconds": 5})
    assert again.status == 409 and name in again.json["detail"]
    cases = [
        ({"name": unique("t"), "job_type": "NO_SUCH_TYPE", "every_seconds": 5}, 422,
         "not registered"),
        ({"name": unique("p"), "job_type": "ECHO", "payload": {"message": 5},
          "every_seconds": 5}, 422, "payload does not match"),
        ({"name": "has space", "job_type": "NOOP", "every_seconds": 5}, 422, "name"),
    ]
    for body, status, says in cases:
        reply = api.request("POST", "/schedules", json_body=body)
        assert reply.status == status and says in reply.json["detail"], reply.body
    for method, path in [("GET", "/schedules/nope-{}"), ("DELETE", "/schedules/nope-{}"),
                         ("POST", "/schedules/nope-{}/pause"),
                         ("POST", "/schedules/nope-{}/resume")]:
        reply = api.request(method, path.format(uuid.uuid4().hex))
        assert reply.status == 404 and reply.content_type == "application/problem+json"
    assert api.request("GET", "/schedules/-bad%20name").status == 400
    assert api.request("GET", "/schedules?cursor=garbage").status == 400
    assert api.request("DELETE", f"/schedules/{name}").status == 204


def test_each_operation_needs_its_scope(api):
    def token(scopes: list[str]) -> Api:
        reply = api.request("POST", "/tokens", json_body={"name": unique("sched"),
                                                          "scopes": scopes})
        return Api(api.base, reply.json["token"])

    reader, submitter = token(["jobs:read"]), token(["jobs:submit"])
    body = {"name": unique("scoped"), "job_type": "NOOP", "every_seconds": 3600}
    refused = reader.request("POST", "/schedules", json_body=body)
    assert refused.status == 403 and "jobs:submit" in refused.json["detail"]
    made = submitter.request("POST", "/schedules", json_body=body)
    assert made.status == 201 and made.json["created_by"]
    assert reader.request("GET", f"/schedules/{body['name']}").status == 200
    assert submitter.request("GET", "/schedules").status == 403
    for method, suffix in [("POST", "/pause"), ("POST", "/resume"), ("DELETE", "")]:
        reply = submitter.request(method, f"/schedules/{body['name']}{suffix}")
        assert reply.status == 403 and "jobs:operate" in reply.json["detail"], reply.body
    # a type that needs more than jobs:submit needs it to be scheduled too
    export = submitter.request("POST", "/schedules", json_body={
        "name": unique("export"), "job_type": "DATA_EXPORT", "every_seconds": 3600,
        "payload": {"dataset": "jobs", "format": "jsonl"}})
    assert export.status == 403 and "admin" in export.json["detail"], export.body
    assert api.request("DELETE", f"/schedules/{body['name']}").status == 204


def test_a_schedule_stops_when_its_creators_token_is_revoked_or_loses_the_scope(api, db):
    def token(name: str, scopes: list[str]) -> tuple[str, Api]:
        reply = api.request("POST", "/tokens", json_body={"name": name, "scopes": scopes})
        assert reply.status == 201, reply.body
        return reply.json["id"], Api(api.base, reply.json["token"])

    revoked_id, revoked_api = token(unique("sched-owner"), ["jobs:submit"])
    narrowed_id, narrowed_api = token(unique("sched-exporter"), ["admin"])
    by_revoked, by_narrowed = unique("revoked"), unique("narrowed")
    create(revoked_api, by_revoked, job_type="NOOP", every_seconds=1)
    create(narrowed_api, by_narrowed, job_type="DATA_EXPORT",
           payload={"dataset": "jobs", "format": "jsonl", "limit": 1}, every_seconds=1)
    wait_for(lambda: made_by(db, by_revoked) and made_by(db, by_narrowed), 30,
             "both schedules to tick")
    assert api.request("DELETE", f"/tokens/{revoked_id}").status == 204
    # the admin token that scheduled an export is left with jobs:submit only
    db.run("UPDATE api_tokens SET scopes = ARRAY['jobs:submit'] WHERE id = CAST(:id AS uuid)",
           id=narrowed_id)
    for name in (by_revoked, by_narrowed):
        wait_for(lambda name=name: api.request("GET", f"/schedules/{name}").json["paused"],
                 30, f"{name} to be paused")
    reasons = {name: api.request("GET", f"/schedules/{name}").json["paused_reason"]
               for name in (by_revoked, by_narrowed)}
    assert "was revoked or has expired" in reasons[by_revoked], reasons
    assert "'admin' scope" in reasons[by_narrowed], reasons
    counts = {name: len(made_by(db, name)) for name in (by_revoked, by_narrowed)}
    sweeper_ticked_twice(api, db)
    assert counts == {name: len(made_by(db, name)) for name in counts}, "a tick after that"
    for name in counts:
        assert api.request("DELETE", f"/schedules/{name}").status == 204
    api.request("DELETE", f"/tokens/{narrowed_id}")
