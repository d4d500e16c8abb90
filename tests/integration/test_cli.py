"""The `jobs` command line, run as a real process against the real stack."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable

import pytest

from tests.support.client import wait_for

pytestmark = pytest.mark.integration

Run = Callable[..., subprocess.CompletedProcess]


def _env(stack) -> dict[str, str]:
    """The CLI's environment: the stack's admin token in JOBS_TOKEN, as a user would set it."""
    env = {k: v for k, v in os.environ.items() if k != "JOBS_URL"}
    env["PYTHONIOENCODING"] = "utf-8"
    env["JOBS_TOKEN"] = stack.admin_token
    return env


@pytest.fixture(scope="module")
def jobs(stack) -> Run:
    def run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "jobs_cli", "--url", stack.gateway_url,
                               *args], capture_output=True, text=True, timeout=timeout,
                              env=_env(stack))
    return run


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("jobs: ")
    return lines[0]


def test_submit_wait_exits_0_and_prints_the_result(jobs):
    message = f"cli-{uuid.uuid4()}"
    done = jobs("submit", "ECHO", "--payload", json.dumps({"message": message}), "--wait")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("submitted ")
    assert any(" COMPLETED " in f" {line} " for line in lines[1:])
    assert json.loads(done.stdout.split("result: ", 1)[1]) == {"echo": message, "attempt": 1}
    assert done.stderr == ""


def test_submit_wait_follows_the_event_stream_printing_each_step(stack, monkeypatch):
    """In this process, so that a fall back to polling (its sleep) fails the test."""
    from jobs_cli import cli

    def polled(seconds: float) -> None:
        raise AssertionError("--wait polled instead of following the event stream")

    monkeypatch.setattr(cli._Sleep, "sleep", staticmethod(polled))
    monkeypatch.setenv("JOBS_TOKEN", stack.admin_token)
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(["--url", stack.gateway_url, "submit", "PROGRESS", "--payload",
                    '{"steps": 3, "step_seconds": 0.4}', "--wait"], stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    live = [line for line in out.getvalue().splitlines() if "  attempt " in line]
    assert live[-1].split("  ")[2] == "COMPLETED", live
    assert any("step 2 of 3" in line for line in live), live
    assert any("step 3 of 3" in line for line in live), live
    assert json.loads(out.getvalue().split("result: ", 1)[1]) == {"steps": 3}


def test_wait_follows_a_job_submitted_elsewhere_to_its_end(jobs, api):
    done = api.submit("SLEEPY", {"seconds": 1}).json["job_id"]
    waited = jobs("wait", done[:13])
    assert waited.returncode == 0, waited.stderr
    assert "COMPLETED after 1 attempt(s)" in waited.stdout
    dead = api.wait_status(api.submit("PERMANENT_FAIL").json["job_id"], "DEAD_LETTER")
    failed = jobs("wait", dead["job_id"])
    assert failed.returncode == 1
    assert _one_line(failed.stderr) == (f"jobs: job {dead['job_id']} ended DEAD_LETTER:"
                                        " PermanentError: this input can never work")


def test_payload_from_a_file_and_json_status(jobs, api, tmp_path):
    path = tmp_path / "payload.json"
    path.write_text(json.dumps({"message": "from a file ✓"}), encoding="utf-8")
    submitted = jobs("--json", "submit", "ECHO", "--payload", f"@{path}", "--max-retries", "1")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    api.wait_status(job_id)

    status = jobs("--json", "status", job_id)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["job_id"] == job_id and doc["status"] == "COMPLETED"
    assert doc["payload"] == {"message": "from a file ✓"} and doc["max_retries"] == 1
    assert doc == api.job(job_id)

    people = jobs("status", job_id[:8])  # a unique prefix of a recent job is enough
    assert people.returncode == 0, people.stderr
    assert job_id in people.stdout and "COMPLETED" in people.stdout


def test_list_by_status_shows_a_completed_job(jobs):
    done = jobs("--json", "submit", "ECHO", "--payload", '{"message": "listed"}', "--wait")
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["job_id"]

    listed = jobs("list", "--status", "COMPLETED", "--type", "ECHO", "--limit", "50")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:3] == ["ID", "TYPE", "STATUS"]
    mine = [row for row in rows if row.startswith(job_id[:8])]
    assert mine and mine[0].split()[1:3] == ["ECHO", "COMPLETED"]

    as_json = jobs("--json", "list", "--status", "COMPLETED", "--limit", "50")
    page = json.loads(as_json.stdout)
    assert job_id in {item["job_id"] for item in page["items"]}
    assert {item["status"] for item in page["items"]} == {"COMPLETED"}


def test_a_failing_job_exits_1_shows_in_dead_letters_and_retry_puts_it_back(jobs, api):
    failed = jobs("submit", "ALWAYS_FAIL", "--max-retries", "0", "--wait")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    job_id = failed.stdout.split()[1]
    assert f"job {job_id} ended DEAD_LETTER: RuntimeError: always fails" in \
        _one_line(failed.stderr)

    letters = jobs("dead-letters", "--limit", "200")
    assert letters.returncode == 0, letters.stderr
    assert any(row.startswith(job_id[:8]) and "ALWAYS_FAIL" in row
               for row in letters.stdout.splitlines())

    retried = jobs("retry", job_id)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.startswith(f"job {job_id} is back in the queue")
    assert "(HTTP 202)" in retried.stdout
    wait_for(lambda: (doc := api.job(job_id))["attempts"] == 2
             and doc["status"] == "DEAD_LETTER", 30, "the replayed job to fail again")

    again = jobs("retry", job_id[:8])  # dead letter again: replayable again, by prefix
    assert again.returncode == 0, again.stderr

    not_dead = jobs("retry", job_id)
    if not_dead.returncode == 0:  # it may already be dead-lettered a third time
        return
    assert not_dead.returncode == 1
    assert "409" in _one_line(not_dead.stderr)


def test_an_unknown_job_exits_1_with_the_api_detail(jobs):
    missing = str(uuid.uuid4())
    done = jobs("status", missing)
    assert done.returncode == 1
    assert _one_line(done.stderr).startswith("jobs: 404 ")
    assert missing in done.stderr


def test_a_payload_the_type_refuses_exits_1_with_the_field(jobs):
    done = jobs("submit", "ECHO", "--payload", '{"message": ["not", "a", "string"]}')
    assert done.returncode == 1
    line = _one_line(done.stderr)
    assert line.startswith("jobs: 422 ") and "message" in line


def test_bad_payload_json_is_a_usage_error_before_any_request(jobs):
    done = jobs("submit", "ECHO", "--payload", '{"message": }')
    assert done.returncode == 2
    assert "line 1, column 13" in _one_line(done.stderr)


def test_an_unreachable_url_exits_3_with_one_line(stack):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "jobs_cli", "--url", f"http://127.0.0.1:{port}",
                           "list"], capture_output=True, text=True, timeout=60, env=_env(stack))
    assert done.returncode == 3
    assert _one_line(done.stderr) == (f"jobs: cannot reach http://127.0.0.1:{port} (connection"
                                      " refused): is `make run` up?")
    assert done.stdout == ""


def test_an_unknown_command_exits_2(jobs):
    done = jobs("frobnicate")
    assert done.returncode == 2
    assert "unknown command 'frobnicate'" in _one_line(done.stderr)


def test_the_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "jobs")
    if not os.path.exists(script):
        pytest.skip("the `jobs` script is not installed in this environment")
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("jobs ")


def test_cancel_a_running_job_and_a_waiting_cli_exits_1(jobs, api, stack):
    waiting = subprocess.Popen(
        [sys.executable, "-m", "jobs_cli", "--url", stack.gateway_url, "submit", "SLEEPY",
         "--payload", '{"seconds": 20}', "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(stack))
    try:
        assert waiting.stdout is not None
        first = waiting.stdout.readline()
        assert first.startswith("submitted "), first
        job_id = first.split()[1]
        api.wait_status(job_id, "IN_PROGRESS")

        cancelled = jobs("cancel", job_id)
        assert cancelled.returncode == 0, cancelled.stderr
        assert job_id in cancelled.stdout

        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 1, out + err
    assert f"job {job_id} ended CANCELLED" in _one_line(err)
    assert api.job(job_id)["status"] == "CANCELLED"

    again = jobs("cancel", job_id)
    assert again.returncode == 1
    assert _one_line(again.stderr).startswith("jobs: 409 ")


def test_watch_once_prints_counts_per_status(jobs, api):
    assert jobs("submit", "ECHO", "--payload", '{"message": "watched"}',
                "--wait").returncode == 0
    frame = jobs("watch", "--once")
    assert frame.returncode == 0, frame.stderr
    lines = frame.stdout.splitlines()
    counts = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert counts["COMPLETED"] >= 1 and counts["TOTAL"] >= counts["COMPLETED"]
    assert "Recent jobs" in lines
    assert "\x1b[" not in frame.stdout

    raw = jobs("--json", "watch", "--once")
    stats = json.loads(raw.stdout)
    assert set(stats) >= {"counts", "by_type", "throughput", "recent"}
    assert stats["counts"]["COMPLETED"] >= 1


def test_tokens_made_listed_and_revoked_with_the_cli_work_against_the_api(jobs, stack):
    made = jobs("--json", "tokens", "create", "cli-reader", "--scope", "jobs:read")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    listed = jobs("tokens", "list")
    assert listed.returncode == 0 and "cli-reader" in listed.stdout, listed.stderr
    assert token["token"] not in listed.stdout
    reader = jobs("--token", token["token"], "list", "--limit", "1")
    assert reader.returncode == 0, reader.stderr
    refused = jobs("--token", token["token"], "submit", "ECHO", "--payload", "{}")
    assert refused.returncode == 1 and "403" in _one_line(refused.stderr)
    assert jobs("tokens", "revoke", token["id"]).returncode == 0
    # Refused within JOBS_AUTH_CACHE_SECONDS (2 s) by every process, at once by the one
    # that revoked it.
    gone = wait_for(lambda: (done := jobs("--token", token["token"], "list", "--limit", "1"))
                    .returncode == 1 and done, 10, "the revoked token to be refused")
    assert "401" in _one_line(gone.stderr)


def test_schedules_created_listed_paused_resumed_and_deleted_with_the_cli(jobs, api):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    made = jobs("schedules", "create", name, "ECHO", "--payload", '{"message": "cron"}',
                "--cron", "0 9 * * MON-FRI", "--timezone", "America/New_York")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"created schedule {name}: ECHO cron '0 9 * * MON-FRI'"
                                  " (America/New_York)")
    next_run = api.request("GET", f"/schedules/{name}").json["next_run_at"]
    assert f"next run: {next_run}" in made.stdout

    listed = jobs("schedules", "list", "--limit", "200")
    assert listed.returncode == 0, listed.stderr
    mine = [row for row in listed.stdout.splitlines() if row.startswith(name + " ")]
    assert mine and "active" in mine[0] and "America/New_York" in mine[0]

    paused = jobs("--json", "schedules", "pause", name)
    assert paused.returncode == 0 and json.loads(paused.stdout)["paused"] is True
    shown = jobs("schedules", "show", name)
    assert "State:" in shown.stdout and "paused" in shown.stdout
    resumed = jobs("schedules", "resume", name)
    assert resumed.returncode == 0 and "next run: 20" in resumed.stdout, resumed.stdout

    deleted = jobs("schedules", "delete", name)
    assert deleted.returncode == 0 and deleted.stdout == f"deleted schedule {name}\n"
    gone = jobs("schedules", "show", name)
    assert gone.returncode == 1 and "404" in _one_line(gone.stderr)


def test_a_schedule_every_second_from_the_cli_makes_jobs(jobs, api):
    name = f"cli-every-{uuid.uuid4().hex[:8]}"
    assert jobs("schedules", "create", name, "NOOP", "--every", "1s").returncode == 0
    first = wait_for(lambda: api.request("GET", f"/schedules/{name}").json["last_job_id"],
                     30, "the schedule's first job")
    assert api.wait_status(first)["submitted_by"] == f"schedule:{name}"
    assert jobs("schedules", "delete", name).returncode == 0


def test_a_bad_cron_expression_from_the_cli_is_one_line_saying_why(jobs):
    bad = jobs("schedules", "create", "cli-bad", "NOOP", "--cron", "0 25 * * *")
    assert bad.returncode == 1
    assert "422" in _one_line(bad.stderr) and "Bad hour" in bad.stderr
