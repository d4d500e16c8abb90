"""DATA_EXPORT streams real PostgreSQL rows to CSV and JSON Lines, batch by batch, each row once."""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import common.builtin  # noqa: F401 - registers the built-in job types
from common.builtin.export import DATASETS, ExportPayload, run_export
from common.db import Database
from common.errors import RetryableError
from common.handlers import JobContext, registered
from common.models import DeadLetter, JobDocument
from common.settings import get_settings

pytestmark = pytest.mark.integration

ROWS = 2500
BASE = datetime(2031, 5, 1, tzinfo=UTC)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url, size=2)
    yield database
    database.close()


@pytest.fixture
def seeded(db: Database) -> Iterator[str]:
    """2,500 jobs of a job type of their own; three share each created_at (keyset ties).

    Every fifth is FAILED, the rest COMPLETED; job n is created at BASE + n // 3 seconds.
    """
    job_type = f"EXPORT_TEST_{uuid.uuid4().hex[:12]}"
    db.run(
        """
        INSERT INTO jobs (job_id, job_type, payload_json, status, result_json, error_message,
                          submitted_by, created_at, updated_at)
        SELECT gen_random_uuid(), :job_type, jsonb_build_object('n', n, 'text', 'héllo, "x"'),
               CASE WHEN n % 5 = 0 THEN 'FAILED' ELSE 'COMPLETED' END::job_status,
               CASE WHEN n % 5 = 0 THEN NULL ELSE jsonb_build_object('ok', true) END,
               CASE WHEN n % 5 = 0 THEN 'boom, with a comma' END,
               'billing',
               CAST(:base AS timestamptz) + (n / 3) * interval '1 second',
               CAST(:base AS timestamptz) + (n / 3) * interval '1 second'
        FROM generate_series(0, :last) AS n
        """,
        job_type=job_type,
        base=BASE,
        last=ROWS - 1,
    )
    yield job_type
    db.run("DELETE FROM jobs WHERE job_type = :job_type", job_type=job_type)


def make_ctx(tmp_path: Path) -> JobContext:
    return JobContext(uuid.uuid4(), "DATA_EXPORT", 1, 0, tmp_path)


def export(db: Database, tmp_path: Path, batch_size: int = 1000, **payload: Any):
    ctx = make_ctx(tmp_path)
    result = run_export(ExportPayload.model_validate(payload), ctx, db, batch_size=batch_size)
    return result, tmp_path / str(ctx.job_id) / result["artifact"]


@dataclass
class RecordingContext(JobContext):
    """A JobContext that keeps every progress report, unthrottled."""

    reports: list[tuple[float, str | None]] = field(default_factory=list)

    def progress(self, fraction: float, message: str | None = None) -> None:
        assert 0.0 <= fraction <= 1.0
        self.reports.append((fraction, message))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_csv_export_holds_every_matching_job_in_creation_order(
    db: Database, seeded: str, tmp_path: Path
) -> None:
    result, path = export(
        db, tmp_path, dataset="jobs", format="csv", filters={"job_type": [seeded]}
    )

    rows = read_csv(path)
    assert result["rows"] == len(rows) == ROWS
    assert list(rows[0]) == list(DATASETS["jobs"].columns)
    keys = [(datetime.fromisoformat(r["created_at"]), uuid.UUID(r["job_id"])) for r in rows]
    assert keys == sorted(keys) and len(set(keys)) == ROWS
    by_n = {json.loads(r["payload"])["n"]: r for r in rows}
    assert sorted(by_n) == list(range(ROWS))
    assert json.loads(by_n[1]["payload"]) == {"n": 1, "text": 'héllo, "x"'}
    assert json.loads(by_n[1]["result"]) == {"ok": True}
    assert by_n[0]["result"] == "" and by_n[0]["error_message"] == "boom, with a comma"
    assert by_n[0]["status"] == "FAILED" and by_n[1]["status"] == "COMPLETED"
    assert by_n[0]["submitted_by"] == "billing"
    assert datetime.fromisoformat(by_n[3]["created_at"]) == BASE + timedelta(seconds=1)
    assert result["content_type"] == "text/csv"
    assert result["artifact"] == f"jobs-{path.parent.name[:8]}.csv"
    assert result["bytes"] == path.stat().st_size


def test_a_jsonl_export_applies_the_status_and_time_filters(
    db: Database, seeded: str, tmp_path: Path
) -> None:
    filters = {
        "job_type": [seeded],
        "status": ["FAILED"],
        "created_after": (BASE + timedelta(seconds=100)).isoformat(),
        "created_before": "2031-05-01T00:10:00",  # no offset: read as UTC
    }
    result, path = export(db, tmp_path, dataset="jobs", format="jsonl", filters=filters)

    rows = read_jsonl(path)
    expected = [n for n in range(ROWS) if n % 5 == 0 and 100 <= n // 3 < 600]
    assert result["rows"] == len(rows) == len(expected)
    assert sorted(r["payload"]["n"] for r in rows) == expected
    assert {r["status"] for r in rows} == {"FAILED"}
    assert all(r["result"] is None for r in rows)
    assert result["content_type"] == "application/x-ndjson"


def test_a_batch_smaller_than_the_table_still_yields_every_row_exactly_once(
    db: Database, seeded: str, tmp_path: Path
) -> None:
    expected = {
        str(row[0]) for row in db.run("SELECT job_id FROM jobs WHERE job_type = :t", t=seeded)
    }

    # 7 does not divide 3: batches end in the middle of groups sharing a created_at.
    result, path = export(
        db, tmp_path, batch_size=7, dataset="jobs", format="jsonl", filters={"job_type": [seeded]}
    )

    ids = [r["job_id"] for r in read_jsonl(path)]
    assert len(ids) == len(set(ids)) == ROWS == result["rows"]
    assert set(ids) == expected


def test_a_limit_stops_the_export_after_that_many_rows(
    db: Database, seeded: str, tmp_path: Path
) -> None:
    result, path = export(
        db,
        tmp_path,
        batch_size=100,
        dataset="jobs",
        format="csv",
        filters={"job_type": [seeded]},
        limit=249,
    )

    rows = read_csv(path)
    assert result["rows"] == len(rows) == 249
    # The oldest 249: jobs 0..248, 83 whole groups of three sharing a created_at.
    assert sorted(json.loads(r["payload"])["n"] for r in rows) == list(range(249))


def test_filter_values_are_bound_as_parameters_not_spliced_into_sql(
    db: Database, seeded: str, tmp_path: Path
) -> None:
    result, path = export(
        db,
        tmp_path,
        dataset="jobs",
        format="csv",
        filters={"job_type": ["x' OR '1'='1", f"{seeded}'; DROP TABLE jobs; --"]},
    )

    assert result["rows"] == 0
    assert read_csv(path) == []
    assert db.run("SELECT count(*) FROM jobs WHERE job_type = :t", t=seeded) == [[ROWS]]


def test_dead_letters_export_with_their_history_as_json(db: Database, tmp_path: Path) -> None:
    job_type = f"EXPORT_DLQ_{uuid.uuid4().hex[:12]}"
    db.run(
        """
        INSERT INTO dead_letters (dead_letter_id, job_id, job_type, reason, last_error, attempts,
                                  history, dead_lettered_at)
        SELECT 'dl-' || :t || '-' || n, gen_random_uuid(), :t, 'retries exhausted', 'boom', 4,
               jsonb_build_array(jsonb_build_object('attempt', 1, 'error', 'boom')),
               CAST(:base AS timestamptz) + n * interval '1 minute'
        FROM generate_series(1, 30) AS n
        """,
        t=job_type,
        base=BASE,
    )
    try:
        result, path = export(
            db,
            tmp_path,
            batch_size=4,
            dataset="dead_letters",
            format="jsonl",
            filters={"job_type": [job_type]},
        )
        rows = read_jsonl(path)
        csv_result, csv_path = export(
            db, tmp_path, dataset="dead_letters", format="csv", filters={"job_type": [job_type]}
        )
    finally:
        db.run("DELETE FROM dead_letters WHERE job_type = :t", t=job_type)

    assert result["rows"] == len(rows) == 30
    assert rows[0]["history"] == [{"attempt": 1, "error": "boom"}]
    assert list(rows[0]) == list(DATASETS["dead_letters"].columns)
    assert csv_result["rows"] == 30
    assert json.loads(read_csv(csv_path)[0]["history"]) == [{"attempt": 1, "error": "boom"}]


def test_the_registered_handler_reads_the_configured_database(
    database_url: str, seeded: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    try:
        job_type = registered()["DATA_EXPORT"]
        ctx = make_ctx(tmp_path)
        payload = {"dataset": "jobs", "format": "csv", "filters": {"job_type": [seeded]}}
        result = job_type.run(job_type.parse_payload(payload), ctx)
    finally:
        get_settings.cache_clear()

    assert result["rows"] == ROWS
    assert result["location"] == f"/jobs/{ctx.job_id}/artifact"


def test_a_cancelled_export_stops_and_leaves_no_artifact(
    db: Database, seeded: str, tmp_path: Path
) -> None:
    ctx = make_ctx(tmp_path)
    ctx.cancelled.set()
    payload = ExportPayload.model_validate({"dataset": "jobs", "filters": {"job_type": [seeded]}})

    with pytest.raises(RetryableError, match="stopped"):
        run_export(payload, ctx, db)
    assert list((tmp_path / str(ctx.job_id)).iterdir()) == []


def test_exported_keys_are_the_api_document_names_with_submitted_by(
    db: Database, seeded: str, tmp_path: Path
) -> None:
    _, path = export(db, tmp_path, dataset="jobs", format="jsonl", filters={"job_type": [seeded]})

    first = read_jsonl(path)[0]
    assert list(first) == list(DATASETS["jobs"].columns)
    assert set(first) <= set(JobDocument.model_fields)
    assert {"payload", "result", "submitted_by"} <= set(first)
    assert not {"payload_json", "result_json"} & set(first)
    assert set(DATASETS["dead_letters"].columns) <= set(DeadLetter.model_fields)
    assert first["submitted_by"] == "billing"


def test_csv_export_cells_a_spreadsheet_would_run_as_formulas_start_with_a_quote(
    db: Database, tmp_path: Path
) -> None:
    job_type = f"EXPORT_CSV_{uuid.uuid4().hex[:12]}"
    db.run(
        """
        INSERT INTO jobs (job_id, job_type, payload_json, status, error_message, submitted_by,
                          retries, created_at, updated_at)
        VALUES (gen_random_uuid(), :t, '{"cell": "=1+1"}', 'FAILED',
                '=HYPERLINK("http://evil.example","click")', '@admin', 0, :base, :base)
        """,
        t=job_type,
        base=BASE,
    )
    db.run(
        """
        INSERT INTO dead_letters (dead_letter_id, job_id, job_type, reason, last_error, attempts,
                                  history, dead_lettered_at)
        VALUES ('dl-' || :t, gen_random_uuid(), :t, '+reason', '-2+3', 4, '[]', :base)
        """,
        t=job_type,
        base=BASE,
    )
    try:
        _, jobs_path = export(db, tmp_path, dataset="jobs", filters={"job_type": [job_type]})
        _, letters_path = export(
            db, tmp_path, dataset="dead_letters", filters={"job_type": [job_type]}
        )
    finally:
        db.run("DELETE FROM jobs WHERE job_type = :t", t=job_type)
        db.run("DELETE FROM dead_letters WHERE job_type = :t", t=job_type)

    [job] = read_csv(jobs_path)
    assert job["error_message"] == '\'=HYPERLINK("http://evil.example","click")'
    assert job["submitted_by"] == "'@admin"
    assert json.loads(job["payload"]) == {"cell": "=1+1"}  # JSON text starts with "{"
    assert job["retries"] == "0"
    [letter] = read_csv(letters_path)
    assert letter["reason"] == "'+reason" and letter["last_error"] == "'-2+3"
    assert letter["attempts"] == "4"


def test_an_export_reports_progress_rising_to_one_as_its_batches_are_written(
    db: Database, seeded: str, tmp_path: Path
) -> None:
    ctx = RecordingContext(uuid.uuid4(), "DATA_EXPORT", 1, 0, tmp_path)
    payload = ExportPayload.model_validate({"dataset": "jobs", "filters": {"job_type": [seeded]}})

    run_export(payload, ctx, db, batch_size=100)

    fractions = [fraction for fraction, _ in ctx.reports]
    assert ctx.reports[0] == (0.0, f"exporting {ROWS:,} rows")
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0 and fractions.count(1.0) == 1
    assert len([f for f in fractions if 0.0 < f < 1.0]) >= 20  # a report per 100 rows
    assert ctx.reports[-1][1] == f"exported {ROWS:,} rows"


def test_an_export_with_a_limit_counts_its_progress_against_that_limit(
    db: Database, seeded: str, tmp_path: Path
) -> None:
    ctx = RecordingContext(uuid.uuid4(), "DATA_EXPORT", 1, 0, tmp_path)
    payload = ExportPayload.model_validate(
        {"dataset": "jobs", "filters": {"job_type": [seeded]}, "limit": 300}
    )

    run_export(payload, ctx, db, batch_size=100)

    assert ctx.reports[0] == (0.0, "exporting 300 rows")
    assert [f for f, _ in ctx.reports] == [0.0, 100 / 300, 200 / 300, 0.99, 1.0]


def test_each_export_job_stores_its_file_under_a_name_of_its_own(
    db: Database, seeded: str, tmp_path: Path
) -> None:
    names = {
        export(db, tmp_path, dataset="jobs", format="jsonl", filters={"job_type": [seeded]})[0][
            "artifact"
        ]
        for _ in range(2)
    }

    assert len(names) == 2
    assert all(name.startswith("jobs-") and name.endswith(".jsonl") for name in names)


@pytest.mark.parametrize(
    "payload",
    [
        {"dataset": "users"},
        {"dataset": "jobs", "format": "xlsx"},
        {"dataset": "jobs", "filters": {"status": ["LOST"]}},
        {"dataset": "dead_letters", "filters": {"status": ["FAILED"]}},
        {
            "dataset": "jobs",
            "filters": {"created_after": "2031-02-01", "created_before": "2031-01-01"},
        },
        {"dataset": "jobs", "limit": 0},
        {"dataset": "jobs", "columns": ["job_id"]},
    ],
)
def test_a_malformed_export_payload_is_rejected(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ExportPayload.model_validate(payload)
