"""Cancellation, delayed jobs, progress, per-type concurrency, stats and metrics."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.support.client import wait_for

pytestmark = pytest.mark.integration


def test_a_queued_job_cancelled_before_it_runs_never_runs(api, database_url):
    run_at = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)).isoformat()
    job = api.submit("ECHO", {"message": "later"}, run_at=run_at).json
    assert job["status"] == "QUEUED" and job["run_at"] is not None
    reply = api.request("POST", f"/jobs/{job['job_id']}/cancel")
    assert reply.status == 202 and reply.json["status"] == "CANCELLED"
    assert api.job(job["job_id"])["attempts"] == 0
    again = api.request("POST", f"/jobs/{job['job_id']}/cancel")
    assert again.status == 409 and again.content_type == "application/problem+json"


def test_a_running_job_is_told_to_stop_and_ends_cancelled(api):
    job_id = api.submit("PROGRESS", {"steps": 100, "step_seconds": 0.2}).json["job_id"]
    api.wait_status(job_id, "IN_PROGRESS")
    reply = api.request("POST", f"/jobs/{job_id}/cancel")
    assert reply.status == 202 and reply.json["cancel_requested"] is True
    job = api.wait_status(job_id, "CANCELLED", "COMPLETED", "DEAD_LETTER", timeout=20)
    assert job["status"] == "CANCELLED" and job["attempts"] == 1
    assert "stopped at step" in job["error_message"]
    history = api.request("GET", f"/jobs/{job_id}/attempts").json["items"]
    assert [a["outcome"] for a in history] == ["CANCELLED"]
    minutes = api.request("GET", "/stats").json["throughput"]
    assert sum(m["cancelled"] for m in minutes) >= 1  # a cancel is not a failure


def test_a_delayed_job_waits_for_its_time(api):
    run_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    job_id = api.submit("ECHO", {"message": "delayed"}, run_at=run_at.isoformat()).json["job_id"]
    assert api.job(job_id)["status"] == "QUEUED"
    job = api.wait_status(job_id, timeout=30)
    assert job["status"] == "COMPLETED"
    assert dt.datetime.fromisoformat(job["updated_at"]) >= run_at


def test_a_naive_run_at_is_refused_with_a_422(api):
    reply = api.submit("ECHO", {"message": "x"}, run_at="2030-01-01T00:00:00")
    assert reply.status == 422 and "run_at" in reply.json["detail"]


def test_progress_reported_by_a_handler_shows_in_status(api):
    job_id = api.submit("PROGRESS", {"steps": 10, "step_seconds": 0.3}).json["job_id"]
    seen = wait_for(lambda: (doc := api.job(job_id))["progress"] and 0 < doc["progress"] < 1
                    and doc, 20, "a partial progress report")
    assert seen["progress_message"].startswith("step ")
    done = api.wait_status(job_id)
    assert done["progress"] == 1.0 and done["progress_message"] == "done"


def test_a_type_with_a_concurrency_limit_never_runs_two_at_once(api, database_url):
    from common.db import Database

    reply = api.request("POST", "/jobs/batch", json_body={"jobs": [
        {"job_type": "ONE_AT_A_TIME", "payload": {"seconds": 0.3}}] * 4})
    ids = [j["job_id"] for j in reply.json["jobs"]]
    for job_id in ids:
        assert api.wait_status(job_id, timeout=60)["status"] == "COMPLETED"
    db = Database(database_url)
    try:
        spans = db.run("SELECT started_at, finished_at FROM job_attempts"
                       " WHERE job_id = ANY(CAST(:ids AS uuid[])) ORDER BY started_at", ids=ids)
    finally:
        db.close()
    assert len(spans) == 4
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, "two attempts of ONE_AT_A_TIME overlapped"


def test_stats_count_jobs_by_status_and_type(api):
    job_id = api.submit("NOOP", {}).json["job_id"]
    api.wait_status(job_id)
    stats = api.request("GET", "/stats").json
    assert stats["counts"]["COMPLETED"] >= 1 and set(stats["counts"]) >= {"QUEUED", "CANCELLED"}
    assert stats["by_type"]["NOOP"]["COMPLETED"] >= 1
    assert stats["throughput"] and stats["throughput"][-1]["completed"] >= 1
    assert job_id in [j["job_id"] for j in stats["recent"]]


def test_an_attempt_history_lists_every_attempt(api):
    job_id = api.wait_status(api.submit("FLAKY", {"failures": 1}).json["job_id"])["job_id"]
    history = api.request("GET", f"/jobs/{job_id}/attempts").json["items"]
    assert [(a["attempt"], a["outcome"]) for a in history] == [(1, "FAILED"), (2, "COMPLETED")]


def test_metrics_are_in_prometheus_format_with_counters_from_every_process(api):
    job_id = api.submit("NOOP", {}).json["job_id"]
    api.wait_status(job_id)
    api.job(job_id)
    text = api.request("GET", "/metrics").body.decode()
    for name in ("jobs_submitted_total", "jobs_completed_total",
                 "jobs_attempt_duration_seconds_bucket", "jobs_current",
                 "jobs_queue_lag_records", "jobs_status_cache_hit_ratio",
                 "jobs_status_lookups_total"):
        assert name in text, name
    assert 'jobs_submitted_total{job_type="NOOP"}' in text


def test_a_waiting_job_cancelled_through_the_api_is_counted_as_cancelled(api):
    run_at = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    job_id = api.submit("ECHO", {"message": "never"}, run_at=run_at.isoformat()).json["job_id"]
    assert api.request("POST", f"/jobs/{job_id}/cancel").json["status"] == "CANCELLED"
    text = api.request("GET", "/metrics").body.decode()
    assert 'jobs_cancelled_total{job_type="ECHO"}' in text
