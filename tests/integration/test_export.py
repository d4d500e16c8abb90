"""DATA_EXPORT streams real PostgreSQL rows to CSV and JSON Lines, batch by batch, each row once."""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Iterator
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
                          created_at, updated_at)
        SELECT gen_random_uuid(), :job_type, jsonb_build_object('n', n, 'text', 'héllo, "x"'),
               CASE WHEN n % 5 = 0 THEN 'FAILED' ELSE 'COMPLETED' END::job_status,
               CASE WHEN n % 5 = 0 THEN NULL ELSE jsonb_build_object('ok', true) END,
               CASE WHEN n % 5 = 0 THEN 'boom, with a comma' END,
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
    by_n = {json.loads(r["payload_json"])["n"]: r for r in rows}
    assert sorted(by_n) == list(range(ROWS))
    assert json.loads(by_n[1]["payload_json"]) == {"n": 1, "text": 'héllo, "x"'}
    assert json.loads(by_n[1]["result_json"]) == {"ok": True}
    assert by_n[0]["result_json"] == "" and by_n[0]["error_message"] == "boom, with a comma"
    assert by_n[0]["status"] == "FAILED" and by_n[1]["status"] == "COMPLETED"
    assert datetime.fromisoformat(by_n[3]["created_at"]) == BASE + timedelta(seconds=1)
    assert result["content_type"] == "text/csv" and result["artifact"] == "jobs.csv"
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
    assert sorted(r["payload_json"]["n"] for r in rows) == expected
    assert {r["status"] for r in rows} == {"FAILED"}
    assert all(r["result_json"] is None for r in rows)
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
    assert sorted(json.loads(r["payload_json"])["n"] for r in rows) == list(range(249))


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
