"""Dead letters: recorded with the job's history, listed, and replayed."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from common import jobs
from common.db import Connection, rows_as_dicts
from common.errors import ApiError
from common.lifecycle import transition
from common.models import JobStatus


def record_dead_letter(conn: Connection, row: dict[str, Any], reason: str,
                       last_error: str | None) -> dict[str, Any]:
    """Insert the dead-letter row of a job (idempotent) and return it as a message body."""
    job_id = str(row["job_id"])
    history = jobs.attempt_history(conn, job_id)
    letter = {
        "dead_letter_id": f"{job_id}:{row['attempts']}",
        "job_id": job_id,
        "job_type": row["job_type"],
        "reason": reason,
        "last_error": last_error,
        "attempts": row["attempts"],
        "history": history,
    }
    insert_dead_letter(conn, letter)
    return letter


def insert_dead_letter(conn: Connection, letter: dict[str, Any]) -> bool:
    """Store a dead letter once, whatever number of times it is delivered."""
    rows = conn.run(
        "INSERT INTO dead_letters (dead_letter_id, job_id, job_type, reason, last_error,"
        " attempts, history) VALUES (:id, CAST(:job AS uuid), :type, :reason, :err, :n,"
        " CAST(:history AS jsonb)) ON CONFLICT (dead_letter_id) DO NOTHING RETURNING 1",
        id=letter["dead_letter_id"], job=letter.get("job_id"), type=letter.get("job_type"),
        reason=letter["reason"], err=letter.get("last_error"), n=int(letter.get("attempts") or 0),
        history=json.dumps(letter.get("history") or []),
    )
    return bool(rows)


def list_dead_letters(conn: Connection, cursor: str | None,
                      limit: int) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first, keyset-paginated."""
    params: dict[str, Any] = {"limit": limit + 1}
    where = ""
    if cursor:
        at, letter_id = jobs.decode_cursor(cursor, 2)
        try:
            datetime.fromisoformat(at)
            if "\x00" in letter_id:
                raise ValueError
        except ValueError as exc:
            raise ApiError(400, "Bad cursor", "cursor is not one this API handed out") from exc
        where = ("WHERE (dead_lettered_at, dead_letter_id) <"
                 " (CAST(:at AS timestamptz), :lid)")
        params.update(at=at, lid=letter_id)
    rows = rows_as_dicts(conn, conn.run(
        f"SELECT * FROM dead_letters {where}"
        " ORDER BY dead_lettered_at DESC, dead_letter_id DESC LIMIT :limit", **params))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = jobs.encode_cursor(rows[-1]["dead_lettered_at"], rows[-1]["dead_letter_id"])
    return rows, next_cursor


def dead_letter_document(row: dict[str, Any]) -> dict[str, Any]:
    """The API's dead-letter document from a `dead_letters` row."""
    return {
        "dead_letter_id": row["dead_letter_id"],
        "job_id": str(row["job_id"]) if row["job_id"] else None,
        "job_type": row["job_type"],
        "reason": row["reason"],
        "last_error": row["last_error"],
        "attempts": row["attempts"],
        "history": row["history"] or [],
        "dead_lettered_at": row["dead_lettered_at"].isoformat(),
        "replayed_at": row["replayed_at"].isoformat() if row["replayed_at"] else None,
    }


def replay(conn: Connection, job_id: str) -> dict[str, Any]:
    """DEAD_LETTER -> QUEUED with a fresh retry budget; attempts and their history stay."""
    row = transition(conn, job_id, JobStatus.QUEUED, sources=[JobStatus.DEAD_LETTER],
                     values={"retries": 0, "result_json": None, "next_attempt_at": None,
                             "published_at": None, "lease_expires_at": None,
                             # a cancel asked of an earlier cycle does not stop this one
                             "cancel_requested_at": None})
    if row is None:
        raise jobs.refuse_move(conn, job_id, "Job is not dead-lettered",
                               "only DEAD_LETTER jobs can be replayed")
    conn.run("UPDATE dead_letters SET replayed_at = now()"
             " WHERE job_id = CAST(:id AS uuid) AND replayed_at IS NULL", id=job_id)
    return row
