"""DATA_EXPORT: an allow-listed PostgreSQL dataset streamed to CSV or JSON Lines as an artifact."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from common.artifacts import artifact_name, csv_safe, text_writer, write_artifact
from common.db import Connection, Database
from common.errors import RetryableError
from common.handlers import JobContext, job_handler
from common.models import JobStatus

#: Rows fetched per query; each batch resumes after the last row of the previous one.
BATCH_SIZE = 1000
MAX_LIMIT = 10_000_000


@dataclass(frozen=True)
class Dataset:
    """What one dataset name may read. SQL names come only from here, never from a payload.

    `columns` are the names the artifact uses, the API's JSON names; `sources` maps
    the few that differ to their SQL column (`payload` is `payload_json`).
    """

    table: str
    columns: tuple[str, ...]
    json_columns: frozenset[str]
    time_column: str  # the created-at filters and the first sort key
    key_column: str  # unique tie-breaker, so the keyset order is total
    has_status: bool = False
    sources: Mapping[str, str] = field(default_factory=dict)

    def select_list(self) -> str:
        """The SELECT list, each column under its API name."""
        return ", ".join(
            f"{self.sources[name]} AS {name}" if name in self.sources else name
            for name in self.columns
        )


DATASETS: dict[str, Dataset] = {
    "jobs": Dataset(
        table="jobs",
        columns=(
            "job_id",
            "job_type",
            "status",
            "retries",
            "max_retries",
            "attempts",
            "payload",
            "result",
            "error_message",
            "submitted_by",
            "created_at",
            "updated_at",
        ),
        json_columns=frozenset({"payload", "result"}),
        time_column="created_at",
        key_column="job_id",
        has_status=True,
        sources={"payload": "payload_json", "result": "result_json"},
    ),
    "dead_letters": Dataset(
        table="dead_letters",
        columns=(
            "dead_letter_id",
            "job_id",
            "job_type",
            "reason",
            "last_error",
            "attempts",
            "history",
            "dead_lettered_at",
            "replayed_at",
        ),
        json_columns=frozenset({"history"}),
        time_column="dead_lettered_at",
        key_column="dead_letter_id",
    ),
}

DatasetName = Literal["jobs", "dead_letters"]
ExportFormat = Literal["csv", "jsonl"]


def _assume_utc(value: datetime | None) -> datetime | None:
    # A time without an offset is read as UTC rather than as the server's local time.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


Timestamp = Annotated[datetime, AfterValidator(_assume_utc)]


class ExportFilters(BaseModel):
    """Which rows to export; every filter is optional and they combine with AND."""

    model_config = ConfigDict(extra="forbid")

    status: list[JobStatus] | None = Field(
        default=None,
        min_length=1,
        max_length=len(JobStatus),
        description="Only rows in one of these states (jobs dataset only)",
        examples=[["FAILED", "DEAD_LETTER"]],
    )
    job_type: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="Only rows of one of these job types",
        examples=[["REPORT_GENERATION"]],
    )
    created_after: Timestamp | None = Field(
        default=None,
        description="Only rows created (dead-lettered) at or after this time; no offset = UTC",
        examples=["2026-01-01T00:00:00Z"],
    )
    created_before: Timestamp | None = Field(
        default=None,
        description="Only rows created (dead-lettered) before this time; no offset = UTC",
        examples=["2026-02-01T00:00:00Z"],
    )

    @model_validator(mode="after")
    def _window_is_ordered(self) -> ExportFilters:
        if self.created_after and self.created_before and self.created_after >= self.created_before:
            raise ValueError("created_after must be earlier than created_before")
        return self


class ExportPayload(BaseModel):
    """Payload of DATA_EXPORT: a dataset, a format, optional filters and a row limit."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "dataset": "jobs",
                    "format": "csv",
                    "filters": {"status": ["DEAD_LETTER"], "created_after": "2026-01-01T00:00:00Z"},
                    "limit": 10000,
                }
            ]
        },
    )

    dataset: DatasetName = Field(
        description="Allow-listed dataset: jobs or dead_letters", examples=["jobs"]
    )
    format: ExportFormat = Field(
        default="csv", description="csv (JSON columns as JSON text) or jsonl", examples=["csv"]
    )
    filters: ExportFilters = Field(
        default_factory=ExportFilters, description="Row filters, all optional"
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        le=MAX_LIMIT,
        description="At most this many rows, oldest first (default: all)",
        examples=[10000],
    )

    @model_validator(mode="after")
    def _filters_fit_dataset(self) -> ExportPayload:
        if self.filters.status and not DATASETS[self.dataset].has_status:
            raise ValueError(f"the {self.dataset} dataset has no status to filter on")
        return self


# Every allow-listed dataset reads across all submitters: only an admin token may export.
@job_handler("DATA_EXPORT", payload_model=ExportPayload, scope="admin")
def export_data(payload: ExportPayload, ctx: JobContext) -> dict[str, Any]:
    """Export an allow-listed PostgreSQL dataset (jobs, dead_letters) to CSV or JSON Lines.

    Rows are streamed in keyset-paginated batches from one consistent snapshot and
    written to the artifact (`<dataset>-<short job id>.<format>`) as they arrive, with
    progress reported along the way. Keys and columns are the API's JSON names.
    """
    from common import clients  # the process's pool, sized by JOBS_DB_POOL_SIZE

    return run_export(payload, ctx, clients.database())


def run_export(
    payload: ExportPayload, ctx: JobContext, db: Database, batch_size: int = BATCH_SIZE
) -> dict[str, Any]:
    """Write the export artifact and return its description with the row count."""
    dataset = DATASETS[payload.dataset]
    write_rows = _WRITERS[payload.format]
    written = 0

    def write(out: IO[bytes]) -> None:
        nonlocal written
        with db.transaction() as conn:
            # One snapshot for every batch: a row updated mid-export cannot move
            # past the cursor and appear twice, nor be skipped; the count agrees with it.
            conn.run("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            conn.run("SET LOCAL statement_timeout = '60s'")
            total = count_rows(conn, dataset, payload.filters, payload.limit)
            ctx.progress(0.0, f"exporting {total:,} rows")
            rows = iter_rows(conn, dataset, payload.filters, payload.limit, batch_size, ctx)
            written = write_rows(dataset, _reporting(rows, total, batch_size, ctx), out)

    info = write_artifact(
        ctx.artifact_dir,
        ctx.job_id,
        artifact_name(payload.dataset, ctx.job_id, payload.format),
        write,
    )
    ctx.progress(1.0, f"exported {written:,} rows")
    return {
        **info.as_result(ctx.job_id),
        "format": payload.format,
        "dataset": payload.dataset,
        "rows": written,
    }


def count_rows(
    conn: Connection, dataset: Dataset, filters: ExportFilters, limit: int | None
) -> int:
    """How many rows the export will write (in the transaction's snapshot)."""
    where, params = _filter_sql(dataset, filters)
    sql = f"SELECT 1 FROM {dataset.table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if limit is not None:
        sql += " LIMIT :limit"  # counting stops where the export will
        params["limit"] = limit
    [[count]] = conn.run(f"SELECT count(*) FROM ({sql}) AS matching", **params)
    return int(count)


def _reporting(
    rows: Iterator[list[Any]], total: int, every: int, ctx: JobContext
) -> Iterator[list[Any]]:
    """`rows` as they are, with progress reported every `every` rows (short of 1.0)."""
    for done, row in enumerate(rows, 1):
        yield row
        if done % every == 0 and total:
            ctx.progress(min(done / total, 0.99), f"{done:,} of {total:,} rows exported")


def iter_rows(
    conn: Connection,
    dataset: Dataset,
    filters: ExportFilters,
    limit: int | None,
    batch_size: int,
    ctx: JobContext | None = None,
) -> Iterator[list[Any]]:
    """Rows in (time, key) order, fetched `batch_size` at a time; never the whole table."""
    where, params = _filter_sql(dataset, filters)
    columns = dataset.select_list()
    order = f"{dataset.time_column}, {dataset.key_column}"
    time_at = dataset.columns.index(dataset.time_column)
    key_at = dataset.columns.index(dataset.key_column)
    remaining = limit
    after: tuple[Any, Any] | None = None
    while remaining is None or remaining > 0:
        if ctx is not None and ctx.should_stop():
            raise RetryableError("export stopped before it finished (time limit or shutdown)")
        conditions = list(where)
        if after is not None:
            conditions.append(f"({order}) > (:after_time, :after_key)")
            params["after_time"], params["after_key"] = after
        sql = f"SELECT {columns} FROM {dataset.table}"
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += f" ORDER BY {order} LIMIT :batch"
        params["batch"] = batch_size if remaining is None else min(batch_size, remaining)
        batch = conn.run(sql, **params) or []
        yield from batch
        if remaining is not None:
            remaining -= len(batch)
        if len(batch) < params["batch"]:
            return
        after = (batch[-1][time_at], batch[-1][key_at])


def _filter_sql(dataset: Dataset, filters: ExportFilters) -> tuple[list[str], dict[str, Any]]:
    """WHERE conditions over allow-listed columns, with every value bound as a parameter."""
    where: list[str] = []
    params: dict[str, Any] = {}
    if filters.status:
        where.append("status = ANY(CAST(:status AS job_status[]))")
        params["status"] = [s.value for s in filters.status]
    if filters.job_type:
        where.append("job_type = ANY(CAST(:job_type AS text[]))")
        params["job_type"] = list(filters.job_type)
    if filters.created_after is not None:
        where.append(f"{dataset.time_column} >= :created_after")
        params["created_after"] = filters.created_after
    if filters.created_before is not None:
        where.append(f"{dataset.time_column} < :created_before")
        params["created_before"] = filters.created_before
    return where, params


def _plain(value: Any) -> Any:
    """A value JSON can carry: ids and times as strings."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_plain)


def write_csv(dataset: Dataset, rows: Iterator[list[Any]], out: IO[bytes]) -> int:
    """CSV with a heading row; JSON columns as JSON text, null as an empty cell.

    Text cells come from submitters (payloads, error messages, token names): any a
    spreadsheet would run as a formula is prefixed with `'` (`csv_safe`).
    """
    json_at = {i for i, name in enumerate(dataset.columns) if name in dataset.json_columns}
    count = 0
    with text_writer(out) as text:
        writer = csv.writer(text)
        writer.writerow(dataset.columns)
        for row in rows:
            writer.writerow(_csv_cell(value, i in json_at) for i, value in enumerate(row))
            count += 1
    return count


def _csv_cell(value: Any, is_json: bool) -> Any:
    if value is None:
        return ""
    cell = _json_text(value) if is_json else _plain(value)
    return csv_safe(cell) if isinstance(cell, str) else cell


def write_jsonl(dataset: Dataset, rows: Iterator[list[Any]], out: IO[bytes]) -> int:
    """One JSON object per line; JSON columns stay structured."""
    count = 0
    with text_writer(out, newline="\n") as text:
        for row in rows:
            text.write(_json_text(dict(zip(dataset.columns, row, strict=True))) + "\n")
            count += 1
    return count


_WRITERS: dict[str, Callable[[Dataset, Iterator[list[Any]], IO[bytes]], int]] = {
    "csv": write_csv,
    "jsonl": write_jsonl,
}
