"""The job state graph, checked in one place, written with conditional updates."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any
from uuid import UUID

from common.db import Connection, rows_as_dicts
from common.models import JobStatus

S = JobStatus

#: Every move a job may make. A late or duplicate message can never move a job
#: backwards, because each write names the states it may leave.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.WAITING: frozenset({S.QUEUED, S.CANCELLED}),  # every parent completed / one did not
    S.QUEUED: frozenset({S.IN_PROGRESS, S.CANCELLED}),
    S.IN_PROGRESS: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED}),
    S.FAILED: frozenset({S.RETRYING, S.DEAD_LETTER}),
    S.RETRYING: frozenset({S.IN_PROGRESS, S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.DEAD_LETTER: frozenset({S.QUEUED}),  # replay by an operator
    # Only a job cancelled because a parent failed (`cancelled_by`) leaves CANCELLED, when
    # that parent is replayed with its dependents; any other cancelled job is final.
    S.CANCELLED: frozenset({S.WAITING}),
}

#: Columns `transition` may set besides status; guards against SQL built from names.
SETTABLE = frozenset(
    {
        "retries",
        "max_retries",
        "attempts",
        "result_json",
        "error_message",
        "next_attempt_at",
        "lease_expires_at",
        "published_at",
        "rate_slot_at",
        "progress",
        "progress_message",
        "cancel_requested_at",
        "cancelled_by",
    }
)


JSON_COLUMNS = frozenset({"result_json"})


class IllegalTransition(ValueError):
    """A move the graph does not allow was asked for (a bug, not a race)."""


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """The states a job may be in to move to `target`."""
    return frozenset(src for src, targets in TRANSITIONS.items() if target in targets)


def check(source: JobStatus, target: JobStatus) -> None:
    """Raise IllegalTransition unless the graph has source -> target."""
    if target not in TRANSITIONS[source]:
        raise IllegalTransition(f"{source.value} -> {target.value} is not a job transition")


def _checked(target: JobStatus, sources: Iterable[JobStatus] | None,
             columns: Mapping[str, Any]) -> frozenset[JobStatus]:
    """The states a transition may leave (all of the graph's by default), after checking
    that the graph allows the move and that only SETTABLE columns are set."""
    allowed = sources_of(target)
    chosen = frozenset(sources) if sources is not None else allowed
    if not chosen <= allowed or not chosen:
        raise IllegalTransition(
            f"{sorted(s.value for s in chosen)} -> {target.value} is not a job transition"
        )
    unknown = set(columns) - SETTABLE
    if unknown:
        raise ValueError(f"transition cannot set {sorted(unknown)}")
    return chosen


def transition(
    conn: Connection,
    job_id: UUID | str,
    target: JobStatus,
    **options: Any,
) -> dict[str, Any] | None:
    """Move a job to `target` if it is in one of `sources`; return the new row, or None if lost.

    Options are those of `transition_sql`.
    """
    sql, bound = transition_sql(job_id, target, **options)
    rows = rows_as_dicts(conn, conn.run(sql, **bound))
    return rows[0] if rows else None


def transition_sql(
    job_id: UUID | str,
    target: JobStatus,
    *,
    sources: Iterable[JobStatus] | None = None,
    attempt: int | None = None,
    values: Mapping[str, Any] | None = None,
    expressions: Mapping[str, str] | None = None,
    where: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The conditional `UPDATE ... RETURNING *` of a transition, and its parameters.

    `attempt` fences the write to one attempt: a worker whose lease was taken
    over can no longer record its outcome. `values` are bound parameters,
    `expressions` and `where` are SQL (fixed strings of this package, never input) whose
    own parameters come in `params`. Callers may wrap the statement in a CTE to do more
    in the same round trip.
    """
    chosen = _checked(target, sources, {**(values or {}), **(expressions or {})})
    values = dict(values or {})
    expressions = dict(expressions or {})

    assignments = ["status = CAST(:target AS job_status)", "version = version + 1",
                   "updated_at = now()"]
    bound: dict[str, Any] = dict(params or {})
    bound.update(job_id=str(job_id), target=target.value, sources=[s.value for s in chosen])
    for column, value in values.items():
        if column in JSON_COLUMNS:
            assignments.append(f"{column} = CAST(:v_{column} AS jsonb)")
            bound[f"v_{column}"] = None if value is None else json.dumps(value)
        else:
            assignments.append(f"{column} = :v_{column}")
            bound[f"v_{column}"] = value
    for column, expression in expressions.items():
        assignments.append(f"{column} = {expression}")
    conditions = ["job_id = CAST(:job_id AS uuid)",
                  "status = ANY(CAST(:sources AS job_status[]))"]
    if attempt is not None:
        conditions.append("attempts = :attempt")
        bound["attempt"] = attempt
    if where:
        conditions.append(where)
    sql = (
        f"UPDATE jobs SET {', '.join(assignments)} WHERE {' AND '.join(conditions)} "
        "RETURNING *"
    )
    return sql, bound


#: PostgreSQL array types of the per-row values `transition_many_sql` takes.
ROW_TYPES = {"id": "uuid", "attempt": "int", "result": "jsonb", "message": "text",
             "delay": "float8", "parent": "uuid"}


def transition_many_sql(
    target: JobStatus,
    rows: Mapping[str, list[Any]],
    *,
    sources: Iterable[JobStatus] | None = None,
    values: Mapping[str, str] | None = None,
    expressions: Mapping[str, str] | None = None,
    where: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """`transition_sql` for many jobs in one statement.

    `rows` holds one list per field of `ROW_TYPES`, all of the same length: `id` is
    required; with `attempt`, each write is fenced to that job's attempt. `values` maps a
    column to the row field it takes (`{"result_json": "result"}`). Returns the moved jobs'
    rows (`RETURNING jobs.*`); a job missing from them was not in one of `sources`.
    """
    chosen = _checked(target, sources, {**(values or {}), **(expressions or {})})
    values = dict(values or {})
    expressions = dict(expressions or {})
    fields = list(rows)
    if "id" not in rows or set(fields) - ROW_TYPES.keys() or set(values.values()) - set(fields):
        raise ValueError(f"rows must have `id` and only fields of {sorted(ROW_TYPES)}")
    if len({len(column) for column in rows.values()}) > 1:
        raise ValueError("every row field needs one value per job")

    bound: dict[str, Any] = dict(params or {})
    bound.update(target=target.value, sources=[s.value for s in chosen])
    arrays = []
    for name in fields:
        arrays.append(f"CAST(:r_{name} AS {ROW_TYPES[name]}[])")
        column = list(rows[name])
        if name == "id":
            column = [str(v) for v in column]
        elif ROW_TYPES[name] == "jsonb":
            column = [None if v is None else json.dumps(v) for v in column]
        bound[f"r_{name}"] = column
    assignments = ["status = CAST(:target AS job_status)", "version = jobs.version + 1",
                   "updated_at = now()"]
    assignments += [f"{column} = r.r_{field}" for column, field in values.items()]
    assignments += [f"{column} = {expression}" for column, expression in expressions.items()]
    conditions = ["jobs.job_id = r.r_id", "jobs.status = ANY(CAST(:sources AS job_status[]))"]
    if "attempt" in rows:
        conditions.append("jobs.attempts = r.r_attempt")
    if where:
        conditions.append(where)
    sql = (
        f"UPDATE jobs SET {', '.join(assignments)} FROM unnest({', '.join(arrays)})"
        f" AS r({', '.join('r_' + name for name in fields)})"
        f" WHERE {' AND '.join(conditions)} RETURNING jobs.*"
    )
    return sql, bound
