"""The `jobs` CLI against a tiny in-process HTTP server answering canned API documents.

The fake stands at the HTTP boundary only: the CLI's real client, parser and renderer run.
The same commands against the real stack are in tests/integration/test_cli.py.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from jobs_cli import cli, render
from jobs_cli.cli import build_parser, parse_payload, parse_run_at, run
from jobs_cli.client import UsageError

JOB_ID = "3f1c9a2e-5b7d-4c1e-9a0b-1234567890ab"
OTHER_ID = "3f1c9a2e-ffff-4c1e-9a0b-1234567890ab"
NOW = datetime(2030, 1, 31, 12, 0, 0, tzinfo=UTC)


def job(status: str = "QUEUED", job_id: str = JOB_ID, **fields: Any) -> dict[str, Any]:
    doc = {"job_id": job_id, "job_type": "ECHO", "status": status, "retries": 0,
           "max_retries": 3, "attempts": 0, "payload": {"message": "hi"}, "result": None,
           "error_message": None, "next_attempt_at": None, "run_at": None, "progress": None,
           "progress_message": None, "cancel_requested": False,
           "created_at": "2030-01-31T11:59:30+00:00",
           "updated_at": "2030-01-31T11:59:55+00:00", "version": 1}
    doc.update(fields)
    return doc


def problem(status: int, title: str, detail: str, **extra: Any) -> tuple[int, Any, dict]:
    return (status, {"type": "about:blank", "title": title, "status": status, "detail": detail,
                     **extra}, {"Content-Type": "application/problem+json"})


# --- the fake API -----------------------------------------------------------------------

Answer = tuple[int, Any] | tuple[int, Any, dict[str, str]]


class FakeApi:
    """Canned answers by (method, path); a list answers in turn and repeats its last one."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Any] = {}
        self.requests: list[dict[str, Any]] = []
        self.delay = 0.0
        self.url = ""

    def on(self, method: str, path: str, *answers: Answer) -> None:
        self.routes[(method, path)] = list(answers)

    def answer(self, method: str, path: str) -> Answer:
        answers = self.routes.get((method, path))
        if not answers:
            return problem(404, "Not found", f"no route for {method} {path}")
        return answers.pop(0) if len(answers) > 1 else answers[0]

    def sent(self, method: str | None = None, path: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.requests
                if (method is None or r["method"] == method)
                and (path is None or r["path"] == path)]


@pytest.fixture
def fake() -> Iterator[FakeApi]:
    api = FakeApi()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            api.requests.append({"method": self.command, "path": parts.path,
                                 "query": urllib.parse.parse_qs(parts.query),
                                 "headers": {k.lower(): v for k, v in self.headers.items()},
                                 "body": json.loads(body) if body else None})
            if api.delay:
                time.sleep(api.delay)
            status, content, *rest = api.answer(self.command, parts.path)
            headers = {"Content-Type": "application/json", **(rest[0] if rest else {})}
            data = content if isinstance(content, bytes) else (
                content.encode() if isinstance(content, str) else json.dumps(content).encode())
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield api
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polling loops run at full speed; the fake answers the next state at once."""
    monkeypatch.setattr(cli._Sleep, "sleep", staticmethod(lambda seconds: None))
    monkeypatch.delenv("JOBS_URL", raising=False)


@pytest.fixture(autouse=True)
def no_ambient_token(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No token from the environment or from a .data/admin-token of a real `make run`."""
    for name in ("JOBS_TOKEN", "JOBS_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"Result({self.code}, out={self.out!r}, err={self.err!r})"


class TtyIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def jobs(fake: FakeApi | None, *argv: str, tty: bool = False,
         stdin: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> Result:
    out, err = (TtyIO() if tty else io.StringIO()), io.StringIO()
    args = (["--url", fake.url] if fake else []) + list(argv)
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = run(args, stdout=out, stderr=err)
    return Result(code, out.getvalue(), err.getvalue())


def one_line_error(result: Result) -> str:
    lines = result.err.splitlines()
    assert len(lines) == 1, result
    assert lines[0].startswith("jobs: ")
    return lines[0]


# --- argument parsing -------------------------------------------------------------------

def test_global_options_are_accepted_before_or_after_the_command():
    before = build_parser().parse_args(["--json", "--url", "http://h:1", "--timeout", "3",
                                        "status", "ID"])
    after = build_parser().parse_args(["status", "ID", "--json", "--url", "http://h:1",
                                       "--timeout", "3"])
    for args in (before, after):
        assert (args.json, args.url, args.timeout, args.job_id) == (True, "http://h:1", 3.0, "ID")
    plain = build_parser().parse_args(["list"])
    assert (plain.json, plain.url, plain.timeout) == (False, None, 10.0)


def test_submit_options_parse():
    args = build_parser().parse_args(["submit", "ECHO", "--payload", "{}", "--max-retries", "0",
                                      "--idempotency-key", "k1", "--run-at", "+5m", "--wait"])
    assert (args.job_type, args.payload, args.max_retries, args.idempotency_key,
            args.run_at, args.wait) == ("ECHO", "{}", 0, "k1", "+5m", True)


def test_list_options_parse():
    args = build_parser().parse_args(["list", "--status", "COMPLETED", "--type", "ECHO",
                                      "--limit", "5", "--all"])
    assert (args.status, args.job_type, args.limit, args.all) == ("COMPLETED", "ECHO", 5, True)


@pytest.mark.parametrize("argv,needle", [
    (["frobnicate"], "unknown command 'frobnicate'"),
    ([], "a command is needed"),
    (["status"], "required: ID"),
    (["list", "--limit", "0"], "--limit: must be at least 1"),
    (["list", "--limit", "many"], "'many' is not a whole number"),
    (["submit", "ECHO", "--max-retries", "101"], "between 0 and 100"),
    (["submit", "ECHO", "--wait-timeout", "5"], "--wait-timeout needs --wait"),
    (["watch", "--interval", "0"], "must be more than 0"),
    (["--url", "ftp://example.com", "list"], "--url must be an http(s) URL"),
    (["submit", "ECHO", "--run-at", "next tuesday"], "not an ISO 8601 time"),
    (["submit", "ECHO", "--payload", "{oops}"], "not valid JSON"),
])
def test_usage_errors_exit_2_with_one_line(argv, needle):
    result = jobs(None, *argv)
    assert result.code == 2, result
    assert needle in one_line_error(result)
    assert result.out == ""


def test_the_url_defaults_to_jobs_url_from_the_environment(fake, monkeypatch):
    fake.on("GET", f"/jobs/{JOB_ID}", (200, job()))
    monkeypatch.setenv("JOBS_URL", fake.url)
    result = jobs(None, "status", JOB_ID)
    assert result.code == 0, result
    assert fake.sent("GET", f"/jobs/{JOB_ID}")


def test_a_url_without_scheme_gets_http(fake):
    fake.on("GET", f"/jobs/{JOB_ID}", (200, job()))
    result = jobs(None, "--url", fake.url.removeprefix("http://"), "status", JOB_ID)
    assert result.code == 0, result


# --- payloads and run-at ----------------------------------------------------------------

def test_payload_inline_file_stdin_and_default(tmp_path, monkeypatch):
    assert parse_payload(None) == {}
    assert parse_payload('{"message": "hi", "n": [1, 2]}') == {"message": "hi", "n": [1, 2]}
    path = tmp_path / "payload.json"
    path.write_text('{\n  "message": "from a file ✓"\n}\n', encoding="utf-8")
    assert parse_payload(f"@{path}") == {"message": "from a file ✓"}
    assert parse_payload("@-", stdin=io.StringIO('{"from": "stdin"}')) == {"from": "stdin"}


def test_bad_inline_json_says_where():
    with pytest.raises(UsageError) as err:
        parse_payload('{"message": hi}')
    assert err.value.message == ("--payload is not valid JSON: Expecting value at line 1,"
                                 " column 13, near 'hi}'")
    assert err.value.exit_code == 2


def test_bad_json_in_a_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "a": 1,\n  "b": 2,\n}\n')
    with pytest.raises(UsageError) as err:
        parse_payload(f"@{path}")
    assert f"--payload @{path} is not valid JSON" in err.value.message
    assert "line 4, column 1" in err.value.message


def test_truncated_json_says_it_ended_early():
    with pytest.raises(UsageError, match=r"line 1, column 13 \(at the end\)"):
        parse_payload('{"message": ')


@pytest.mark.parametrize("text,needle", [
    ("[1, 2]", "must be a JSON object ({...}), not an array"),
    ('"text"', "not a string"),
    ("42", "not a number"),
    ("null", "not null"),
    ("   ", "is empty"),
    ("@", "needs a file name"),
    ("@/no/such/file.json", "cannot read the file: No such file or directory"),
])
def test_payloads_that_are_not_objects_or_files_that_are_missing(text, needle):
    with pytest.raises(UsageError) as err:
        parse_payload(text)
    assert needle in err.value.message


def test_a_bad_payload_stops_before_any_request(fake):
    result = jobs(fake, "submit", "ECHO", "--payload", '{"a": 1,}')
    assert result.code == 2 and "line 1, column 9" in one_line_error(result)
    assert fake.requests == []


def test_run_at_accepts_iso_with_a_zone_local_time_and_offsets_from_now():
    assert parse_run_at("2030-01-31T14:00:00Z") == "2030-01-31T14:00:00+00:00"
    assert parse_run_at("2030-01-31T14:00:00+02:00") == "2030-01-31T14:00:00+02:00"
    local = datetime.fromisoformat(parse_run_at("2030-01-31T14:00:00"))
    assert local.tzinfo is not None and local.replace(tzinfo=None) == datetime(2030, 1, 31, 14)
    assert parse_run_at("+90s", now=NOW) == (NOW + timedelta(seconds=90)).isoformat()
    assert parse_run_at("+5m", now=NOW) == (NOW + timedelta(minutes=5)).isoformat()
    assert parse_run_at("+2h", now=NOW) == (NOW + timedelta(hours=2)).isoformat()
    with pytest.raises(UsageError):
        parse_run_at("soon")


# --- rendering --------------------------------------------------------------------------

def test_table_aligns_columns_and_right_aligns_numbers():
    text = render.table(["NAME", "N"], [["a", "1"], ["longer name", "1234"]], right=(1,))
    assert text.splitlines() == [
        "NAME            N",
        "a               1",
        "longer name  1234",
    ]


def test_table_counts_wide_characters_as_two_columns_and_clips():
    text = render.table(["A", "B"], [["日本", "x"], ["ab", "y"]])
    lines = text.splitlines()
    assert lines[1] == "日本  x" and lines[2] == "ab    y"
    assert render.clip("abcdefghij", 5) == "abcd…"
    assert render.table(["A"], [["line one\nline two"]]).splitlines()[1] == "line one line two"


@pytest.mark.parametrize("value,expected", [
    ("2030-01-31T11:59:59.6+00:00", "now"),
    ("2030-01-31T11:59:48+00:00", "12s ago"),
    ("2030-01-31T11:57:00+00:00", "3m ago"),
    ("2030-01-31T09:00:00+00:00", "3h ago"),
    ("2030-01-27T12:00:00+00:00", "4d ago"),
    ("2030-01-31T12:05:00+00:00", "in 5m"),
    ("2030-01-31T13:00:00+01:00", "now"),
    ("2030-01-31T11:59:00", "1m ago"),
    (None, "-"),
    ("not a time", "not a time"),
])
def test_relative_times(value, expected):
    assert render.relative(value, NOW) == expected


def test_progress_bar():
    assert render.progress_bar(None) == ""
    assert render.progress_bar("half") == ""
    assert render.progress_bar(0.0, 10, ascii_only=True) == "[----------]   0%"
    assert render.progress_bar(0.5, 10, ascii_only=True) == "[#####-----]  50%"
    assert render.progress_bar(1, 10, ascii_only=True) == "[##########] 100%"
    assert render.progress_bar(7, 4, ascii_only=True) == "[####] 100%"
    assert render.progress_bar(0.25, 4) == "[█░░░]  25%"


def test_jobs_table_shortens_ids_and_shows_relative_times():
    rows = [job("COMPLETED", attempts=1), job("RETRYING", OTHER_ID, job_type="FLAKY",
                                               attempts=2, retries=1)]
    lines = render.jobs_table(rows, now=NOW).splitlines()
    assert lines[0].split() == ["ID", "TYPE", "STATUS", "ATTEMPTS", "RETRIES", "CREATED",
                                "UPDATED"]
    assert lines[1].split() == ["3f1c9a2e", "ECHO", "COMPLETED", "1", "0/3", "30s", "ago",
                                "5s", "ago"]
    assert lines[2].split()[:5] == ["3f1c9a2e", "FLAKY", "RETRYING", "2", "1/3"]
    # columns line up: every row starts its STATUS column at the same offset
    assert len({line.index(word) for line, word in zip(lines, ["STATUS", "COMPLETED",
                                                               "RETRYING"], strict=True)}) == 1
    assert JOB_ID in render.jobs_table(rows, full_ids=True, now=NOW)
    assert "PROGRESS" not in lines[0]


def test_jobs_table_has_a_progress_column_when_a_job_reports_progress():
    rows = [job("IN_PROGRESS", progress=0.5), job("QUEUED", OTHER_ID)]
    lines = render.jobs_table(rows, now=NOW, ascii_only=True).splitlines()
    assert lines[0].endswith("PROGRESS")
    assert lines[1].endswith("[#####-----]  50%") and lines[2].endswith("-")


def test_job_detail_shows_the_full_id_iso_and_relative_times_and_unknown_fields():
    doc = job("DEAD_LETTER", attempts=4, retries=3, error_message="RuntimeError: boom",
              progress=0.75, progress_message="step 3 of 4", shiny_new_field=[1, 2])
    text = render.job_detail(doc, now=NOW, ascii_only=True)
    lines = dict(line.split(":", 1) for line in text.splitlines())
    assert lines["Job"].strip() == JOB_ID
    assert lines["Status"].strip() == "DEAD_LETTER"
    assert lines["Retries"].strip() == "3/3"
    assert lines["Progress"].strip() == "[###############-----]  75% step 3 of 4"
    assert lines["Created"].strip() == "2030-01-31T11:59:30+00:00 (30s ago)"
    assert lines["Payload"].strip() == '{"message": "hi"}'
    assert lines["Error"].strip() == "RuntimeError: boom"
    assert lines["shiny_new_field"].strip() == "[1, 2]"
    assert "Result" not in lines
    # the values start in one column
    assert len({len(line) - len(line.split(":", 1)[1].lstrip())
                for line in text.splitlines()}) == 1
    cancel = render.job_detail(job("IN_PROGRESS", cancel_requested=True), now=NOW)
    assert "IN_PROGRESS  (cancel requested)" in cancel
    assert "(cancel requested)" not in render.job_detail(
        job("CANCELLED", cancel_requested=True), now=NOW)


STATS = {
    "counts": {"QUEUED": 2, "IN_PROGRESS": 1, "COMPLETED": 40, "DEAD_LETTER": 3,
               "CANCELLED": 1},
    "by_type": {"ECHO": {"COMPLETED": 30, "QUEUED": 2},
                "ALWAYS_FAIL": {"DEAD_LETTER": 3}},
    "throughput": [{"minute": "2030-01-31T11:58:00+00:00", "completed": 10, "failed": 0},
                   {"minute": "2030-01-31T11:59:00+00:00", "completed": 5, "failed": 5}],
    "recent": [job("IN_PROGRESS", progress=0.5), job("COMPLETED", OTHER_ID)],
}


def test_stats_frame_shows_counts_types_throughput_and_recent_jobs():
    text = render.stats_frame(STATS, url="http://api", now=NOW, ascii_only=True)
    lines = text.splitlines()
    assert lines[0].startswith("jobs at http://api")

    def row(first: str) -> list[str]:
        return next(line.split() for line in lines if line.split()[:1] == [first])

    assert row("QUEUED") == ["QUEUED", "2"]
    assert row("RETRYING") == ["RETRYING", "0"]  # known statuses are shown at 0
    assert row("CANCELLED") == ["CANCELLED", "1"]
    assert row("TOTAL") == ["TOTAL", "47"]
    assert row("TYPE") == ["TYPE", "QUEUED", "COMPLETED", "DEAD_LETTER", "TOTAL"]
    assert row("ECHO")[:5] == ["ECHO", "2", "30", "0", "32"]
    assert row("ALWAYS_FAIL") == ["ALWAYS_FAIL", "0", "0", "3", "3"]
    assert "Throughput per minute" in lines
    assert any(line.split()[1:3] == ["5", "5"] and line.endswith("#" * 20) for line in lines)
    recent = lines[lines.index("Recent jobs") + 1:]
    assert recent[0].split()[0] == "ID" and len(recent) == 3
    assert "[#####-----]  50%" in recent[1]


def test_stats_frame_copes_with_an_empty_system():
    text = render.stats_frame({"counts": {}, "by_type": {}, "throughput": [], "recent": []},
                              url="http://api", now=NOW)
    assert "TOTAL            0" in text and "(none)" in text


# --- commands against the fake API ------------------------------------------------------

def test_submit_posts_the_job_and_prints_its_id(fake):
    fake.on("POST", "/jobs", (202, job(), {"Location": f"/jobs/{JOB_ID}"}))
    result = jobs(fake, "submit", "ECHO", "--payload", '{"message": "hi"}', "--max-retries",
                  "2", "--idempotency-key", "key-1", "--run-at", "2030-02-01T00:00:00Z")
    assert result.code == 0, result
    assert result.out.split() == ["submitted", JOB_ID, "ECHO", "QUEUED"]
    [sent] = fake.sent("POST", "/jobs")
    assert sent["body"] == {"job_type": "ECHO", "payload": {"message": "hi"}, "max_retries": 2,
                            "run_at": "2030-02-01T00:00:00+00:00"}
    assert sent["headers"]["idempotency-key"] == "key-1"
    assert sent["headers"]["content-type"] == "application/json"


def test_submit_leaves_out_what_was_not_given(fake):
    fake.on("POST", "/jobs", (202, job()))
    assert jobs(fake, "submit", "NOOP").code == 0
    [sent] = fake.sent("POST", "/jobs")
    assert sent["body"] == {"job_type": "NOOP", "payload": {}}
    assert "idempotency-key" not in sent["headers"]


def test_submit_json_prints_exactly_the_api_document(fake):
    body = '{"job_id": "' + JOB_ID + '", "status": "QUEUED",  "odd_spacing": true}'
    fake.on("POST", "/jobs", (202, body))
    result = jobs(fake, "--json", "submit", "ECHO")
    assert result.out == body + "\n"


def test_submit_mentions_a_deferred_enqueue(fake):
    fake.on("POST", "/jobs", (202, job(), {"X-Jobs-Enqueue": "deferred"}))
    result = jobs(fake, "submit", "ECHO")
    assert result.code == 0 and "sweeper" in result.out


def test_submit_wait_prints_a_line_per_change_then_the_result(fake):
    fake.on("POST", "/jobs", (202, job()))
    fake.on("GET", f"/jobs/{JOB_ID}",
            (200, job("QUEUED")),
            (200, job("IN_PROGRESS", attempts=1)),
            (200, job("IN_PROGRESS", attempts=1)),  # no change: no new line
            (200, job("IN_PROGRESS", attempts=1, progress=0.5, progress_message="half way")),
            (200, job("COMPLETED", attempts=1, progress=1.0, result={"echo": "hi"})))
    result = jobs(fake, "submit", "ECHO", "--wait")
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert lines[0] == f"submitted {JOB_ID}  ECHO"
    states = [line.split("  ")[2] for line in lines[1:5]]
    assert states == ["QUEUED", "IN_PROGRESS", "IN_PROGRESS", "COMPLETED"]
    assert "50%" in lines[3] and "half way" in lines[3] and "attempt 1" in lines[3]
    assert "retries 0/3" in lines[3]
    assert lines[5].startswith("COMPLETED after 1 attempt(s)")
    assert json.loads(result.out.split("result: ", 1)[1]) == {"echo": "hi"}
    assert result.err == ""
    assert len(fake.sent("GET", f"/jobs/{JOB_ID}")) == 5


def test_submit_wait_redraws_one_line_on_a_tty(fake):
    fake.on("POST", "/jobs", (202, job()))
    fake.on("GET", f"/jobs/{JOB_ID}",
            (200, job("IN_PROGRESS", attempts=1, progress=0.2)),
            (200, job("COMPLETED", attempts=1, result=None)))
    result = jobs(fake, "submit", "ECHO", "--wait", tty=True)
    assert result.code == 0
    assert result.out.count("\r\x1b[K") == 3  # QUEUED, IN_PROGRESS, COMPLETED redrawn
    assert "20%" in result.out
    assert "result: null" in result.out


@pytest.mark.parametrize("status", ["DEAD_LETTER", "CANCELLED"])
def test_submit_wait_exits_1_when_the_job_does_not_complete(fake, status):
    fake.on("POST", "/jobs", (202, job()))
    fake.on("GET", f"/jobs/{JOB_ID}",
            (200, job(status, attempts=4, retries=3, error_message="RuntimeError: no\nway")))
    result = jobs(fake, "submit", "ECHO", "--wait")
    assert result.code == 1, result
    assert one_line_error(result) == f"jobs: job {JOB_ID} ended {status}: RuntimeError: no way"
    assert f"{status} after 4 attempt(s)" in result.out


def test_submit_wait_json_prints_only_the_final_document(fake):
    final = json.dumps(job("COMPLETED", attempts=1, result={"echo": "hi"}))
    fake.on("POST", "/jobs", (202, job()))
    fake.on("GET", f"/jobs/{JOB_ID}", (200, job("IN_PROGRESS")), (200, final))
    result = jobs(fake, "--json", "submit", "ECHO", "--wait")
    assert result.code == 0
    assert result.out == final + "\n"
    assert result.err == ""


def test_submit_wait_rides_out_a_short_outage(fake):
    fake.on("POST", "/jobs", (202, job()))
    fake.on("GET", f"/jobs/{JOB_ID}",
            problem(503, "Service unavailable", "PostgreSQL is down"),
            (200, job("COMPLETED", attempts=1)))
    result = jobs(fake, "submit", "ECHO", "--wait")
    assert result.code == 0, result
    assert "retrying: 503 Service unavailable: PostgreSQL is down" in result.out


def test_submit_wait_gives_up_after_wait_timeout(fake, monkeypatch):
    fake.on("POST", "/jobs", (202, job()))
    fake.on("GET", f"/jobs/{JOB_ID}", (200, job("IN_PROGRESS")))
    monkeypatch.setattr(cli._Sleep, "sleep", staticmethod(lambda seconds: time.sleep(0.01)))
    result = jobs(fake, "submit", "ECHO", "--wait", "--wait-timeout", "0.05")
    assert result.code == 1
    assert "is still IN_PROGRESS after 0.05s" in one_line_error(result)


def event_stream(*docs: dict[str, Any]) -> Answer:
    """A whole `text/event-stream` answer: one event per document, as the gateway sends."""
    body = "".join(f": ping\r\nid: {doc.get('version', i)}\r\ndata: {json.dumps(doc)}\r\n\r\n"
                   for i, doc in enumerate(docs))
    return 200, body, {"Content-Type": "text/event-stream"}


def test_submit_wait_follows_the_event_stream_and_polls_nothing(fake):
    fake.on("POST", "/jobs", (202, job()))
    fake.on("GET", f"/jobs/{JOB_ID}/events", event_stream(
        job("QUEUED"), job("IN_PROGRESS", attempts=1, progress=0.5, progress_message="half"),
        job("COMPLETED", attempts=1, progress=1.0, result={"echo": "hi"})))
    result = jobs(fake, "submit", "ECHO", "--wait")
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert [line.split("  ")[2] for line in lines[1:4]] == ["QUEUED", "IN_PROGRESS", "COMPLETED"]
    assert "50%" in lines[2] and "half" in lines[2]
    assert json.loads(result.out.split("result: ", 1)[1]) == {"echo": "hi"}
    assert fake.sent("GET", f"/jobs/{JOB_ID}/events")[0]["headers"]["accept"] == \
        "text/event-stream"
    assert not fake.sent("GET", f"/jobs/{JOB_ID}"), "no polling while the stream works"


def test_wait_follows_a_job_by_id_and_exits_1_when_it_is_dead_lettered(fake):
    fake.on("GET", f"/jobs/{JOB_ID}", (200, job("IN_PROGRESS", attempts=1)))
    fake.on("GET", f"/jobs/{JOB_ID}/events", event_stream(
        job("IN_PROGRESS", attempts=1), job("DEAD_LETTER", attempts=4, retries=3,
                                            error_message="boom")))
    result = jobs(fake, "wait", JOB_ID)
    assert result.code == 1, result
    assert one_line_error(result) == f"jobs: job {JOB_ID} ended DEAD_LETTER: boom"
    assert len(fake.sent("GET", f"/jobs/{JOB_ID}")) == 1  # the id's check, no polling


def test_a_stream_that_breaks_after_news_is_opened_again(fake):
    fake.on("POST", "/jobs", (202, job()))
    fake.on("GET", f"/jobs/{JOB_ID}/events",
            event_stream(job("QUEUED", version=1), job("IN_PROGRESS", attempts=1, version=2)),
            event_stream(job("IN_PROGRESS", attempts=1, version=2),
                         job("COMPLETED", attempts=1, version=3)))
    result = jobs(fake, "submit", "ECHO", "--wait")
    assert result.code == 0, result
    states = [line.split("  ")[2] for line in result.out.splitlines() if "  attempt " in line]
    assert states == ["QUEUED", "IN_PROGRESS", "COMPLETED"]  # nothing shown twice
    assert len(fake.sent("GET", f"/jobs/{JOB_ID}/events")) == 2
    assert not fake.sent("GET", f"/jobs/{JOB_ID}")


def test_a_stream_that_breaks_and_brings_nothing_new_when_reopened_is_followed_by_polling(
        fake):
    fake.on("POST", "/jobs", (202, job()))
    fake.on("GET", f"/jobs/{JOB_ID}/events", event_stream(job("IN_PROGRESS", attempts=1)))
    fake.on("GET", f"/jobs/{JOB_ID}", (200, job("COMPLETED", attempts=1)))
    result = jobs(fake, "--json", "submit", "ECHO", "--wait")
    assert result.code == 0, result
    assert json.loads(result.out)["status"] == "COMPLETED"
    assert len(fake.sent("GET", f"/jobs/{JOB_ID}")) == 1


def test_an_answer_that_is_not_an_event_stream_is_followed_by_polling(fake):
    fake.on("POST", "/jobs", (202, job()))
    fake.on("GET", f"/jobs/{JOB_ID}/events", (200, "<html>a proxy</html>",
                                              {"Content-Type": "text/html"}))
    fake.on("GET", f"/jobs/{JOB_ID}", (200, job("COMPLETED", attempts=1)))
    assert jobs(fake, "submit", "ECHO", "--wait").code == 0


def test_ctrl_c_while_waiting_leaves_the_job_alone_and_exits_130(fake, monkeypatch):
    fake.on("POST", "/jobs", (202, job()))

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli._Sleep, "sleep", staticmethod(interrupt))
    result = jobs(fake, "submit", "ECHO", "--wait")
    assert result.code == 130
    assert "stopped waiting" in one_line_error(result)
    assert not fake.sent("POST", f"/jobs/{JOB_ID}/cancel")


def test_status_prints_the_job_with_its_full_id(fake):
    fake.on("GET", f"/jobs/{JOB_ID}", (200, job("COMPLETED", result={"echo": "hi"})))
    result = jobs(fake, "status", JOB_ID)
    assert result.code == 0
    assert f"Job:      {JOB_ID}" in result.out
    assert 'Result:   {"echo": "hi"}' in result.out
    assert not fake.sent("GET", "/jobs")  # a full id needs no lookup


def test_status_json_is_the_raw_document(fake):
    body = json.dumps(job("COMPLETED"))
    fake.on("GET", f"/jobs/{JOB_ID}", (200, body))
    assert jobs(fake, "status", JOB_ID, "--json").out == body + "\n"


def test_a_short_id_is_looked_up_by_the_api_as_an_id_prefix(fake):
    fake.on("GET", "/jobs", (200, {"items": [job(job_id=JOB_ID)], "next_cursor": None}))
    fake.on("GET", f"/jobs/{JOB_ID}", (200, job()))
    result = jobs(fake, "status", "3F1C9A2E-5B")
    assert result.code == 0, result
    [lookup] = fake.sent("GET", "/jobs")
    assert lookup["query"] == {"id_prefix": ["3f1c9a2e-5b"], "limit": ["4"]}


def test_an_ambiguous_short_id_is_a_usage_error_and_an_unknown_one_is_not_found(fake):
    fake.on("GET", "/jobs", (200, {"items": [job(job_id=JOB_ID), job(job_id=OTHER_ID)],
                                   "next_cursor": None}))
    ambiguous = jobs(fake, "status", "3f1c9a2e")
    assert ambiguous.code == 2 and "matches 2 jobs" in one_line_error(ambiguous)
    fake.on("GET", "/jobs", (200, {"items": [], "next_cursor": None}))
    unknown = jobs(fake, "status", "beef")
    assert unknown.code == 1
    assert "no job id starts with 'beef'" in one_line_error(unknown)


def test_a_prefix_under_four_characters_says_so_without_asking_the_api(fake):
    result = jobs(fake, "status", "abc")
    assert result.code == 2
    assert "'abc' is too short: give at least 4 characters" in one_line_error(result)
    assert not fake.requests


def test_retry_by_prefix_of_a_job_that_is_not_dead_lettered_shows_the_apis_reason(fake):
    fake.on("GET", "/jobs", (200, {"items": [], "next_cursor": None}),
            (200, {"items": [job("CANCELLED", job_id=JOB_ID)], "next_cursor": None}))
    fake.on("POST", f"/jobs/{JOB_ID}/retry", problem(
        409, "Conflict", f"job {JOB_ID} is CANCELLED; only DEAD_LETTER jobs can be replayed"))
    result = jobs(fake, "retry", "3f1c9a2e")
    assert result.code == 1, result
    assert "only DEAD_LETTER jobs can be replayed" in one_line_error(result)
    first, second = fake.sent("GET", "/jobs")
    assert first["query"]["status"] == ["DEAD_LETTER"] and "status" not in second["query"]


def test_list_passes_filters_and_shows_a_table(fake):
    fake.on("GET", "/jobs", (200, {"items": [job("COMPLETED", attempts=1)],
                                   "next_cursor": None}))
    result = jobs(fake, "list", "--status", "completed,dead_letter", "--type", "ECHO",
                  "--limit", "5")
    assert result.code == 0
    [sent] = fake.sent("GET", "/jobs")
    assert sent["query"] == {"status": ["COMPLETED,DEAD_LETTER"], "job_type": ["ECHO"],
                             "limit": ["5"]}
    lines = result.out.splitlines()
    assert lines[0].startswith("ID") and lines[1].startswith("3f1c9a2e  ECHO  COMPLETED")
    assert len(lines) == 2


def test_list_says_when_there_is_more_and_all_follows_the_cursor(fake):
    page1 = {"items": [job(job_id=JOB_ID)], "next_cursor": "c1"}
    page2 = {"items": [job(job_id=OTHER_ID)], "next_cursor": None}
    fake.on("GET", "/jobs", (200, page1))
    one = jobs(fake, "list", "--limit", "1")
    assert one.out.splitlines()[-1] == "(1 shown; more with --all or --cursor c1)"

    fake.requests.clear()
    fake.on("GET", "/jobs", (200, page1), (200, page2))
    every = jobs(fake, "list", "--all", "--limit", "1", "--full-ids")
    assert every.code == 0
    assert [r["query"].get("cursor") for r in fake.sent("GET", "/jobs")] == [None, ["c1"]]
    assert JOB_ID in every.out and OTHER_ID in every.out and "more with" not in every.out


def test_list_all_json_prints_each_page_document_on_its_own_line(fake):
    page1 = json.dumps({"items": [job(job_id=JOB_ID)], "next_cursor": "c1"})
    page2 = json.dumps({"items": [job(job_id=OTHER_ID)], "next_cursor": None})
    fake.on("GET", "/jobs", (200, page1), (200, page2))
    result = jobs(fake, "--json", "list", "--all")
    assert result.out.splitlines() == [page1, page2]


def test_list_with_nothing_to_show(fake):
    fake.on("GET", "/jobs", (200, {"items": [], "next_cursor": None}))
    assert jobs(fake, "list").out == "no jobs\n"


def test_list_limit_above_a_page_fetches_pages_until_it_has_enough(fake):
    fake.on("GET", "/jobs", (200, {"items": [job()] * 200, "next_cursor": "c1"}),
            (200, {"items": [job()] * 50, "next_cursor": "c2"}))
    result = jobs(fake, "list", "--limit", "250")
    assert [r["query"]["limit"] for r in fake.sent("GET", "/jobs")] == [["200"], ["50"]]
    assert len(result.out.splitlines()) == 1 + 250 + 1


def test_dead_letters_table(fake):
    fake.on("GET", "/dead-letters", (200, {"items": [{
        "dead_letter_id": "dl-1", "job_id": JOB_ID, "job_type": "ALWAYS_FAIL",
        "reason": "retries exhausted", "last_error": "RuntimeError: always fails",
        "attempts": 4, "history": [], "dead_lettered_at": "2030-01-31T11:00:00+00:00",
        "replayed_at": None}], "next_cursor": None}))
    result = jobs(fake, "dead-letters", "--limit", "3")
    assert result.code == 0
    assert fake.sent("GET", "/dead-letters")[0]["query"] == {"limit": ["3"]}
    header, row = result.out.splitlines()
    assert header.split() == ["JOB", "TYPE", "REASON", "ATTEMPTS", "DEAD-LETTERED", "REPLAYED",
                              "LAST", "ERROR"]
    assert row.startswith("3f1c9a2e  ALWAYS_FAIL  retries exhausted")
    assert row.endswith("RuntimeError: always fails")


def test_retry_posts_and_reports(fake):
    fake.on("POST", f"/jobs/{JOB_ID}/retry", (202, job("QUEUED", attempts=4)))
    result = jobs(fake, "retry", JOB_ID)
    assert result.code == 0
    assert result.out == f"job {JOB_ID} is back in the queue: QUEUED, retries 0/3 (HTTP 202)\n"


def test_retry_of_a_job_that_is_not_dead_lettered_exits_1(fake):
    fake.on("POST", f"/jobs/{JOB_ID}/retry",
            problem(409, "Job is not dead-lettered", f"job {JOB_ID} is COMPLETED"))
    result = jobs(fake, "retry", JOB_ID)
    assert result.code == 1
    assert one_line_error(result) == (f"jobs: 409 Job is not dead-lettered: job {JOB_ID} is"
                                      " COMPLETED")


def test_retry_resolves_a_short_id_among_dead_lettered_jobs(fake):
    fake.on("GET", "/jobs", (200, {"items": [job("DEAD_LETTER")], "next_cursor": None}))
    fake.on("POST", f"/jobs/{JOB_ID}/retry", (202, job("QUEUED")))
    assert jobs(fake, "retry", "3f1c9a2e").code == 0
    assert fake.sent("GET", "/jobs")[0]["query"]["status"] == ["DEAD_LETTER"]


def test_cancel(fake):
    fake.on("POST", f"/jobs/{JOB_ID}/cancel", (202, job("CANCELLED")))
    assert jobs(fake, "cancel", JOB_ID).out == f"job {JOB_ID} cancelled\n"
    fake.on("POST", f"/jobs/{JOB_ID}/cancel", (202, job("IN_PROGRESS", cancel_requested=True)))
    assert "told to stop" in jobs(fake, "cancel", JOB_ID).out
    fake.on("POST", f"/jobs/{JOB_ID}/cancel",
            problem(409, "Job already ended", f"job {JOB_ID} is COMPLETED"))
    ended = jobs(fake, "cancel", JOB_ID)
    assert ended.code == 1 and "409 Job already ended" in one_line_error(ended)


def test_watch_once_prints_one_frame(fake):
    fake.on("GET", "/stats", (200, STATS))
    result = jobs(fake, "watch", "--once")
    assert result.code == 0, result
    assert "COMPLETED       40" in result.out and "Recent jobs" in result.out
    assert "\x1b[" not in result.out
    assert len(fake.sent("GET", "/stats")) == 1


def test_watch_json_once_is_the_raw_stats_document(fake):
    body = json.dumps(STATS)
    fake.on("GET", "/stats", (200, body))
    assert jobs(fake, "--json", "watch", "--once").out == body + "\n"


def test_watch_on_a_tty_redraws_in_place_and_ctrl_c_exits_0(fake, monkeypatch):
    fake.on("GET", "/stats", (200, STATS))
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli._Sleep, "sleep", staticmethod(nap))
    result = jobs(fake, "watch", "--interval", "0.5", tty=True)
    assert result.code == 0, result
    assert result.out.count("\x1b[H\x1b[2J") == 2
    assert result.out.startswith("\x1b[?25l") and result.out.endswith("\x1b[?25h")
    assert naps == [0.5, 0.5]


def test_watch_keeps_the_last_frame_when_the_api_goes_away(fake, monkeypatch):
    fake.on("GET", "/stats", (200, STATS), problem(503, "Service unavailable", "down"))
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli._Sleep, "sleep", staticmethod(nap))
    result = jobs(fake, "watch", tty=True)
    assert result.code == 0
    last = result.out.split("\x1b[H\x1b[2J")[-1]
    assert "NOT UPDATING: 503 Service unavailable: down" in last and "COMPLETED       40" in last


# --- error mapping ----------------------------------------------------------------------

def test_a_problem_document_becomes_its_status_and_detail(fake):
    fake.on("GET", f"/jobs/{JOB_ID}", problem(404, "Job not found", f"no job {JOB_ID}"))
    result = jobs(fake, "status", JOB_ID)
    assert result.code == 1
    assert one_line_error(result) == f"jobs: 404 Job not found: no job {JOB_ID}"
    assert result.out == ""


def test_a_validation_problem_lists_the_bad_fields(fake):
    fake.on("POST", "/jobs", problem(
        422, "Invalid payload", "payload does not match the ECHO payload model",
        errors=[{"loc": ["payload", "message"], "msg": "Field required"}]))
    result = jobs(fake, "submit", "ECHO")
    assert result.code == 1
    assert one_line_error(result) == ("jobs: 422 Invalid payload: payload does not match the"
                                      " ECHO payload model [payload.message: Field required]")


def test_an_error_that_is_not_a_problem_document_still_gets_one_line(fake):
    fake.on("GET", f"/jobs/{JOB_ID}", (502, "<html>\n<b>Bad gateway</b>\n</html>",
                                       {"Content-Type": "text/html"}))
    result = jobs(fake, "status", JOB_ID)
    assert result.code == 1
    assert one_line_error(result) == "jobs: 502 Bad Gateway: <html> <b>Bad gateway</b> </html>"


def test_a_success_that_is_not_json_is_reported(fake):
    fake.on("GET", f"/jobs/{JOB_ID}", (200, "surprise", {"Content-Type": "text/plain"}))
    result = jobs(fake, "status", JOB_ID)
    assert result.code == 1 and "not JSON" in one_line_error(result)


def test_an_endpoint_the_server_lacks_is_a_404_with_its_detail(fake):
    result = jobs(fake, "watch", "--once")
    assert result.code == 1
    assert one_line_error(result) == "jobs: 404 Not found: no route for GET /stats"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_connection_refused_exits_3_with_a_hint():
    port = _closed_port()
    result = jobs(None, "--url", f"http://127.0.0.1:{port}", "list")
    assert result.code == 3
    assert one_line_error(result) == (f"jobs: cannot reach http://127.0.0.1:{port} (connection"
                                      " refused): is `make run` up?")


def test_a_server_that_does_not_answer_in_time_exits_3(fake):
    fake.delay = 1.0
    fake.on("GET", f"/jobs/{JOB_ID}", (200, job()))
    started = time.monotonic()
    result = jobs(fake, "--timeout", "0.2", "status", JOB_ID)
    assert result.code == 3
    assert one_line_error(result) == f"jobs: no answer from {fake.url} within 0.2s (--timeout" \
                                     " to wait longer)"
    assert time.monotonic() - started < 1.0


def test_the_module_runs_as_a_script(fake):
    import subprocess
    import sys

    fake.on("GET", f"/jobs/{JOB_ID}", (200, job("COMPLETED")))
    done = subprocess.run([sys.executable, "-m", "jobs_cli", "--url", fake.url, "status",
                           JOB_ID], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert JOB_ID in done.stdout


def test_main_returns_the_exit_code():
    from jobs_cli.__main__ import main

    assert main(["--url", f"http://127.0.0.1:{_closed_port()}", "list"]) == 3



# --- the token ------------------------------------------------------------------------

TOKEN = "jobs_" + "a" * 32 + "_" + "b" * 43
TOKEN_ID = "3f1c9a2e-5b7d-4c1e-9a0b-00000000000a"


def authorization(fake: FakeApi) -> list[str | None]:
    return [r["headers"].get("authorization") for r in fake.requests]


def write_token_file(folder, token: str = TOKEN):
    path = folder / "admin-token"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    return path


def test_without_a_token_anywhere_no_authorization_header_is_sent(fake):
    fake.on("GET", "/jobs", (200, {"items": [], "next_cursor": None}))
    assert jobs(fake, "list").code == 0
    assert authorization(fake) == [None]


def test_the_token_file_make_run_wrote_in_the_current_folder_is_used(fake, tmp_path):
    write_token_file(tmp_path / ".data", "jobs_from_file")
    fake.on("GET", "/jobs", (200, {"items": [], "next_cursor": None}))
    assert jobs(fake, "list").code == 0
    assert authorization(fake) == ["Bearer jobs_from_file"]


def test_jobs_data_dir_says_where_the_token_file_is(fake, tmp_path, monkeypatch):
    write_token_file(tmp_path / ".data", "jobs_from_dot_data")
    write_token_file(tmp_path / "elsewhere", "jobs_from_data_dir")
    monkeypatch.setenv("JOBS_DATA_DIR", str(tmp_path / "elsewhere"))
    fake.on("GET", "/jobs", (200, {"items": [], "next_cursor": None}))
    assert jobs(fake, "list").code == 0
    assert authorization(fake) == ["Bearer jobs_from_data_dir"]


def test_the_token_option_beats_jobs_token_which_beats_the_file(fake, tmp_path, monkeypatch):
    write_token_file(tmp_path / ".data", "jobs_from_file")
    monkeypatch.setenv("JOBS_TOKEN", "jobs_from_env")
    fake.on("GET", "/jobs", (200, {"items": [], "next_cursor": None}))
    jobs(fake, "list")
    jobs(fake, "--token", "jobs_from_option", "list")
    jobs(fake, "list", "--token", "jobs_after_the_command")
    assert authorization(fake) == ["Bearer jobs_from_env", "Bearer jobs_from_option",
                                   "Bearer jobs_after_the_command"]


def test_resolve_token_names_where_the_token_came_from(tmp_path):
    assert cli.resolve_token(None, {}) == (None, "")
    assert cli.resolve_token(None, {"JOBS_TOKEN": "  "}) == (None, "")
    assert cli.resolve_token(None, {"JOBS_TOKEN": " t1\n"}) == ("t1", "$JOBS_TOKEN")
    assert cli.resolve_token("t2", {"JOBS_TOKEN": "t1"}) == ("t2", "--token")
    path = write_token_file(tmp_path / "d", "t3")
    assert cli.resolve_token(None, {"JOBS_DATA_DIR": str(tmp_path / "d")}) == ("t3", str(path))
    (tmp_path / "d" / "admin-token").write_text("\n")
    assert cli.resolve_token(None, {"JOBS_DATA_DIR": str(tmp_path / "d")}) == (None, "")


@pytest.mark.parametrize("argv,needle", [
    (["--token", "", "list"], "--token is empty"),
    (["--token", "two words", "list"], "the token from --token has spaces"),
    (["--token", "jobs_é", "list"], "non-ASCII"),
])
def test_a_token_that_cannot_be_a_header_is_a_usage_error(fake, argv, needle):
    result = jobs(fake, *argv)
    assert result.code == 2 and needle in one_line_error(result)
    assert fake.requests == []


def test_every_request_of_a_command_carries_the_token(fake):
    fake.on("POST", "/jobs", (202, job()))
    fake.on("GET", f"/jobs/{JOB_ID}", (200, job("IN_PROGRESS")), (200, job("COMPLETED")))
    assert jobs(fake, "--token", TOKEN, "submit", "ECHO", "--wait").code == 0
    assert len(fake.requests) == 4  # the submit, the event stream (404 here), two polls
    assert authorization(fake) == [f"Bearer {TOKEN}"] * 4


UNAUTHORIZED = problem(401, "Unauthorized", "send Authorization: Bearer <token>")


def test_a_401_without_a_token_says_how_to_pass_one(fake):
    fake.on("GET", "/jobs", UNAUTHORIZED)
    result = jobs(fake, "list")
    assert result.code == 1
    assert one_line_error(result) == (
        "jobs: 401 Unauthorized: send Authorization: Bearer <token> (pass --token, set"
        " JOBS_TOKEN, or run from the folder where `make run` wrote .data/admin-token, or set"
        " JOBS_DATA_DIR to the data folder it used)")


def test_a_401_with_a_token_says_which_token_was_refused(fake, monkeypatch):
    fake.on("GET", "/stats", problem(401, "Unauthorized", "the token has expired"))
    monkeypatch.setenv("JOBS_TOKEN", TOKEN)
    result = jobs(fake, "watch", "--once")
    assert result.code == 1
    assert one_line_error(result) == (
        "jobs: 401 Unauthorized: the token has expired (the token from $JOBS_TOKEN was"
        " refused; pass another with --token or JOBS_TOKEN)")


def test_a_403_is_reported_as_the_api_says(fake):
    fake.on("POST", f"/jobs/{JOB_ID}/cancel",
            problem(403, "Forbidden", "this token lacks the 'jobs:operate' scope"))
    result = jobs(fake, "--token", TOKEN, "cancel", JOB_ID)
    assert result.code == 1
    assert one_line_error(result) == ("jobs: 403 Forbidden: this token lacks the"
                                      " 'jobs:operate' scope")


# --- tokens ---------------------------------------------------------------------------

CREATED = {"id": TOKEN_ID, "name": "ci", "scopes": ["jobs:submit", "jobs:read"],
           "token": TOKEN, "created_at": "2030-01-31T11:59:30+00:00", "last_used_at": None,
           "expires_at": None}


def test_tokens_create_posts_name_and_scopes_and_shows_the_token_once(fake):
    fake.on("POST", "/tokens", (201, CREATED))
    result = jobs(fake, "--token", "jobs_admin", "tokens", "create", "ci", "--scope",
                  "jobs:submit", "--scope", "jobs:read")
    assert result.code == 0, result
    [sent] = fake.sent("POST", "/tokens")
    assert sent["body"] == {"name": "ci", "scopes": ["jobs:submit", "jobs:read"]}
    assert sent["headers"]["authorization"] == "Bearer jobs_admin"
    lines = result.out.splitlines()
    assert f"    {TOKEN}" in lines and result.out.count(TOKEN) == 1
    assert "only time the token is shown" in result.out
    assert "scopes: jobs:submit, jobs:read; expires: never" in result.out
    assert TOKEN_ID in lines[0]


def test_tokens_create_takes_comma_separated_scopes_and_an_expiry(fake):
    fake.on("POST", "/tokens", (201, {**CREATED, "expires_at": "2030-03-02T12:00:00+00:00"}))
    before = datetime.now(UTC)
    result = jobs(fake, "tokens", "create", "ci", "--scope", "jobs:submit, jobs:read",
                  "--expires-in", "30d")
    after = datetime.now(UTC)
    assert result.code == 0, result
    body = fake.sent("POST", "/tokens")[0]["body"]
    assert body["scopes"] == ["jobs:submit", "jobs:read"]
    expires = datetime.fromisoformat(body["expires_at"])
    assert before + timedelta(days=30) <= expires <= after + timedelta(days=30)
    assert "expires: 2030-03-02T12:00:00+00:00" in result.out

    fake.requests.clear()
    jobs(fake, "tokens", "create", "ci", "--scope", "admin", "--expires-at",
         "2031-01-01T00:00:00Z")
    assert fake.sent("POST", "/tokens")[0]["body"]["expires_at"] == "2031-01-01T00:00:00+00:00"


@pytest.mark.parametrize("text,seconds", [("90m", 5400), ("12h", 43200), ("30d", 2592000),
                                          ("2w", 1209600), ("45s", 45), ("1D", 86400)])
def test_expires_in_durations(text, seconds):
    assert cli.parse_expiry(text, None, now=NOW) == (NOW + timedelta(seconds=seconds)).isoformat()


def test_tokens_create_json_prints_the_api_document(fake):
    body = json.dumps(CREATED)
    fake.on("POST", "/tokens", (201, body))
    result = jobs(fake, "--json", "tokens", "create", "ci", "--scope", "jobs:read")
    assert result.out == body + "\n"


@pytest.mark.parametrize("argv,needle", [
    (["tokens"], "a tokens command is needed: create, list or revoke"),
    (["tokens", "mint"], "unknown tokens command 'mint'"),
    (["tokens", "create", "ci"], "required: --scope"),
    (["tokens", "create", "--scope", "admin"], "required: NAME"),
    (["tokens", "create", "ci", "--scope", "admin", "--expires-in", "soon"],
     "--expires-in 'soon' is not a duration like 30d"),
    (["tokens", "create", "ci", "--scope", "admin", "--expires-in", "0d"], "N > 0"),
    (["tokens", "create", "ci", "--scope", "admin", "--expires-at", "tomorrow"],
     "--expires-at 'tomorrow' is not an ISO 8601 time"),
    (["tokens", "create", "ci", "--scope", "admin", "--expires-in", "1d", "--expires-at",
      "2031-01-01T00:00:00Z"], "not allowed with argument"),
    (["tokens", "revoke"], "required: ID"),
])
def test_tokens_usage_errors(fake, argv, needle):
    result = jobs(fake, *argv)
    assert result.code == 2, result
    assert needle in one_line_error(result)
    assert fake.requests == []


def test_a_refused_scope_is_the_api_s_422(fake):
    fake.on("POST", "/tokens", problem(422, "Invalid request", "scopes.0: unknown scope",
                                       errors=[{"loc": ["scopes", 0], "msg": "unknown scope"}]))
    result = jobs(fake, "tokens", "create", "ci", "--scope", "jobs:fly")
    assert result.code == 1
    assert "422 Invalid request" in one_line_error(result)


LISTED = [{k: v for k, v in CREATED.items() if k != "token"},
          {"id": OTHER_ID, "name": "old", "scopes": ["admin"],
           "created_at": "2030-01-01T12:00:00+00:00",
           "last_used_at": "2030-01-31T11:00:00+00:00",
           "expires_at": "2030-01-30T12:00:00+00:00"}]


def test_the_tokens_table_has_whole_ids_scopes_and_says_never_and_expired():
    header, first, second = render.tokens_table(LISTED, now=NOW).splitlines()
    assert header.split() == ["ID", "NAME", "SCOPES", "CREATED", "LAST", "USED", "EXPIRES"]
    assert first.split() == [TOKEN_ID, "ci", "jobs:submit,jobs:read", "30s", "ago", "never",
                             "never"]
    assert second.split() == [OTHER_ID, "old", "admin", "30d", "ago", "1h", "ago", "expired",
                              "1d", "ago"]
    future = render.tokens_table([{**LISTED[0], "expires_at": "2030-02-01T12:00:00+00:00"}],
                                 now=NOW)
    assert future.splitlines()[1].endswith("in 1d")


def test_tokens_list_gets_the_tokens_and_prints_the_table(fake):
    fake.on("GET", "/tokens", (200, {"items": LISTED}))
    result = jobs(fake, "tokens", "list")
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("ID")
    assert lines[1].startswith(TOKEN_ID) and lines[2].startswith(OTHER_ID)
    assert fake.sent("GET", "/tokens")


def test_tokens_list_empty_and_json(fake):
    fake.on("GET", "/tokens", (200, {"items": []}))
    assert jobs(fake, "tokens", "list").out == "no tokens\n"
    assert json.loads(jobs(fake, "tokens", "list", "--json").out) == {"items": []}


def test_tokens_revoke_deletes_and_a_missing_one_is_a_404(fake):
    fake.on("DELETE", f"/tokens/{TOKEN_ID}", (204, b""))
    result = jobs(fake, "tokens", "revoke", TOKEN_ID)
    assert result.code == 0, result
    assert result.out == f"token {TOKEN_ID} revoked\n"
    assert len(fake.sent("DELETE", f"/tokens/{TOKEN_ID}")) == 1
    assert jobs(fake, "--json", "tokens", "revoke", TOKEN_ID).out == ""
    fake.on("DELETE", f"/tokens/{OTHER_ID}",
            problem(404, "Token not found", f"no token {OTHER_ID}"))
    missing = jobs(fake, "tokens", "revoke", OTHER_ID)
    assert missing.code == 1
    assert one_line_error(missing) == f"jobs: 404 Token not found: no token {OTHER_ID}"


# --- help and signals -----------------------------------------------------------------

def test_the_help_names_the_real_job_types_and_how_to_authenticate(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    top = capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["submit", "--help"])
    submit = capsys.readouterr().out
    for text in (top, submit):
        assert "ECHO" not in text and "SEND_EMAIL" not in text
    for job_type in ("REPORT_GENERATION", "EMAIL_SENDING", "DATA_EXPORT"):
        assert job_type in top and job_type in " ".join(submit.split())
    assert "JOBS_TOKEN" in top and ".data/admin-token" in top and "--token" in top


def test_watch_ended_by_sigterm_shows_the_cursor_again(fake, monkeypatch):
    import signal

    fake.on("GET", "/stats", (200, STATS))
    outside: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: outside.append(signum))
    try:
        def nap(seconds: float) -> None:
            signal.raise_signal(signal.SIGTERM)  # its Python handler runs before this returns
            pytest.fail("SIGTERM did not end the watch")

        monkeypatch.setattr(cli._Sleep, "sleep", staticmethod(nap))
        result = jobs(fake, "watch", tty=True)
        assert result.code == 0, result
        assert result.out.startswith("\x1b[?25l") and result.out.endswith("\x1b[?25h")
        assert outside == []  # watch handled it, not the handler from before
        signal.raise_signal(signal.SIGTERM)
        assert outside == [signal.SIGTERM]  # and it gave the old handler back
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- schedules --------------------------------------------------------------------------

SCHEDULE = {"name": "nightly", "schedule_id": "5b1f7d0e-3c44-4c7a-9a57-0c4b6f0f6a11",
            "job_type": "ECHO", "payload": {"message": "hi"}, "max_retries": None,
            "cron": "0 2 * * *", "timezone": "Europe/Berlin", "every_seconds": None,
            "paused": False, "next_run_at": "2030-01-02T01:00:00+00:00", "last_run_at": None,
            "last_job_id": None, "created_by": "admin",
            "created_at": "2029-12-31T10:00:00+00:00", "updated_at": "2029-12-31T10:00:00+00:00"}


def test_schedules_create_sends_cron_and_zone_or_every_in_seconds(fake):
    fake.on("POST", "/schedules", (201, SCHEDULE))
    result = jobs(fake, "schedules", "create", "nightly", "ECHO", "--payload",
                  '{"message": "hi"}', "--cron", "0 2 * * *", "--timezone", "Europe/Berlin")
    assert result.code == 0, result
    assert fake.sent("POST", "/schedules")[0]["body"] == {
        "name": "nightly", "job_type": "ECHO", "payload": {"message": "hi"},
        "cron": "0 2 * * *", "timezone": "Europe/Berlin"}
    assert "created schedule nightly: ECHO cron '0 2 * * *' (Europe/Berlin)" in result.out
    assert "next run: 2030-01-02T01:00:00+00:00" in result.out

    fake.requests.clear()
    assert jobs(fake, "schedules", "create", "often", "NOOP", "--every", "5m",
                "--max-retries", "0").code == 0
    assert fake.sent("POST", "/schedules")[0]["body"] == {
        "name": "often", "job_type": "NOOP", "payload": {}, "every_seconds": 300,
        "max_retries": 0}


@pytest.mark.parametrize("text,seconds", [("2", 2), ("2s", 2), ("5m", 300), ("1h", 3600),
                                          ("1d", 86400), ("1W", 604800)])
def test_every_takes_seconds_or_a_duration(text, seconds):
    assert cli.parse_every(text) == seconds


@pytest.mark.parametrize("argv,needle", [
    (["schedules"], "a schedules command is needed: create, list, show"),
    (["schedules", "mint"], "unknown schedules command 'mint'"),
    (["schedules", "create", "n", "ECHO"], "one of the arguments --cron --every is required"),
    (["schedules", "create", "n", "ECHO", "--every", "0"], "N > 0"),
    (["schedules", "create", "n", "ECHO", "--every", "soon"], "not a duration like 30"),
    (["schedules", "create", "n", "ECHO", "--every", "5", "--timezone", "UTC"],
     "--timezone goes with --cron"),
    (["schedules", "pause"], "required: NAME"),
])
def test_schedules_usage_errors_exit_2_with_one_line(argv, needle):
    result = jobs(None, *argv)
    assert result.code == 2, result
    assert needle in one_line_error(result)


def test_schedules_list_and_show_render_the_api_documents(fake):
    every = {**SCHEDULE, "name": "often", "cron": None, "timezone": None, "every_seconds": 2,
             "paused": True, "next_run_at": None}
    fake.on("GET", "/schedules", (200, {"items": [SCHEDULE, every], "next_cursor": None}))
    listed = jobs(fake, "schedules", "list")
    assert listed.code == 0, listed
    header, *rows = listed.out.splitlines()
    assert header.split()[:4] == ["NAME", "TYPE", "WHEN", "STATE"]
    assert rows[0].split()[:3] == ["nightly", "ECHO", "cron"] and "active" in rows[0]
    assert "every 2s" in rows[1] and "paused" in rows[1]

    fake.on("GET", "/schedules/nightly", (200, SCHEDULE))
    shown = jobs(fake, "schedules", "show", "nightly")
    assert "Schedule:    nightly" in shown.out and "Europe/Berlin" in shown.out
    fake.on("GET", "/schedules/often", (200, {**every, "paused_reason": "paused by ops"}))
    shown = jobs(fake, "schedules", "show", "often")
    assert "paused (paused by ops)" in shown.out
