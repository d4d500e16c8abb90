"""Periodic schedules: a cron expression in a time zone, or every N seconds.

A schedule is a row in `schedules` (migration 0009) keyed by name. The sweeper calls
`fire_due` on every pass: it takes the due rows FOR UPDATE SKIP LOCKED, makes each one's
job through `jobs.create_jobs` under an idempotency key derived from the schedule's id and
the tick (`tick_key`), moves `next_run_at` on and records `last_run_at` / `last_job_id`, all
in one transaction; then it publishes the new jobs. So a tick makes one job whatever the
number of sweepers, and a sweeper that dies mid-way leaves either everything or nothing.

Semantics (documented in the README, tested in tests/unit/test_schedules.py):
- Missed ticks (the system was down, or the sweeper late): one job for all of them, made
  for the earliest one; the next tick is then the first one after now.
- Cron follows Debian's cron through `cronsim`, in the schedule's time zone (zoneinfo, with
  the `tzdata` package): at a spring-forward gap, a time-of-day tick that falls in the
  skipped hour fires at the first instant after the gap (02:30 -> 03:00), while expressions
  with a wildcard hour just have no ticks in the missing hour; at a fall-back, a time-of-day
  tick in the repeated hour fires once (at its first occurrence), while wildcard-hour
  expressions fire in both occurrences.
- `every_seconds` ticks are absolute: creation time + k * every_seconds, DST-blind.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

from cronsim import CronSim
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common import jobs, metrics
from common.api import check_type_scope, max_retries_for
from common.auth import Principal, Scope
from common.db import Connection, Database, is_transient, rows_as_dicts
from common.errors import ApiError, ServiceUnavailable
from common.handlers import get_job_type, validate_payload
from common.models import JobSubmission
from common.queue import Publisher, job_event, job_topic
from common.settings import Settings

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
EVERY_MAX = 366 * 86400
PAGE_MAX = 200
_NAME = re.compile(NAME_PATTERN)


# --- when ticks fall ----------------------------------------------------------------------

def check_cron(expression: str) -> str:
    """A five-field cron expression, normalised to single spaces; ValueError saying what
    is wrong otherwise (a bad field, a wrong field count, or no tick within 50 years)."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError("a cron expression has five fields (minute hour day-of-month month"
                         f" day-of-week); {expression!r} has {len(fields)}")
    text = " ".join(fields)
    try:
        next(CronSim(text, datetime.now(UTC)))
    except StopIteration:
        raise ValueError(f"{text!r} matches no time within the next 50 years") from None
    except Exception as exc:  # CronSimError, or whatever else a hostile string provokes
        if _valid_in_some_month(fields):
            raise ValueError(f"{text!r} never fires: no month it names has day"
                             f" {fields[2]}") from None
        raise ValueError(f"{text!r} is not a valid cron expression: {exc}") from None
    return text


def _valid_in_some_month(fields: list[str]) -> bool:
    """Whether the expression is valid with every month: cronsim refuses a day-of-month
    that its months lack (30 in February) with the words of a bad field."""
    if fields[3] == "*":
        return False
    now = datetime.now(UTC)
    try:  # the months themselves valid (any day), and the days valid in some month
        next(CronSim(" ".join([*fields[:2], "*", fields[3], fields[4]]), now))
        next(CronSim(" ".join([*fields[:3], "*", fields[4]]), now))
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def check_zone(name: str) -> str:
    """An IANA time zone name the tz database (system or `tzdata`) knows; ValueError else."""
    if name not in _zones():
        raise ValueError(f"{name!r} is not an IANA time zone name (such as UTC,"
                         " Europe/Berlin or America/New_York)")
    return name


@dataclass(frozen=True)
class Timing:
    """When a schedule's ticks fall: `cron` in `timezone`, or every `every_seconds` from
    `anchor`."""

    cron: str | None = None
    timezone: str | None = None
    every_seconds: int | None = None
    anchor: datetime | None = None

    def next_after(self, moment: datetime) -> datetime | None:
        """The first tick strictly after `moment` (aware), in UTC; None if there is none."""
        if self.every_seconds is not None:
            anchor = self.anchor or moment
            step = timedelta(seconds=self.every_seconds)
            return (anchor + ((moment - anchor) // step + 1) * step).astimezone(UTC)
        assert self.cron is not None
        zone = ZoneInfo(self.timezone or "UTC")
        try:
            return next(CronSim(self.cron, moment.astimezone(zone))).astimezone(UTC)
        except StopIteration:
            return None


def tick_key(schedule_id: str | uuid.UUID, tick: datetime) -> str:
    """The idempotency key of a tick's job. Clients' keys cannot hold a tab
    (`api.check_idempotency_key`), so none can ever name a tick."""
    return f"schedule\t{schedule_id}\t{tick.astimezone(UTC).isoformat()}"


# --- shapes -------------------------------------------------------------------------------

class ScheduleRequest(BaseModel):
    """Body of `POST /schedules`: a job to make on every tick, and when ticks fall."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Letters, digits, `_`, `-`, `.`;"
                      " at most 100", examples=["nightly-report"])
    job_type: str = Field(min_length=1, max_length=100, examples=["EMAIL_SENDING"])
    payload: dict[str, Any] = Field(default_factory=dict,
                                    description="Each job's input, checked at creation")
    max_retries: int | None = Field(None, ge=0, le=100, strict=True,
                                    description="Each job's retries (default: its type's, 3)")
    cron: str | None = Field(None, max_length=200, examples=["30 2 * * MON-FRI"],
                             description="Five fields, Debian cron's meaning; or every_seconds")
    timezone: str | None = Field(None, max_length=64, examples=["Europe/Berlin"],
                                 description="IANA name the cron expression is read in"
                                             " (default UTC); only with cron")
    every_seconds: int | None = Field(None, ge=1, le=EVERY_MAX, strict=True,
                                      description="A tick every N seconds from creation;"
                                                  " or cron")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return None if value is None else check_zone(value)

    @model_validator(mode="after")
    def _one_timing(self) -> ScheduleRequest:
        if (self.cron is None) == (self.every_seconds is None):
            raise ValueError("give either cron or every_seconds (one of them)")
        if self.timezone is not None and self.cron is None:
            raise ValueError("timezone applies to cron only; every_seconds ticks are"
                             " absolute")
        return self


class ScheduleDocument(BaseModel):
    """A schedule as the API shows it."""

    name: str
    schedule_id: uuid.UUID
    job_type: str
    payload: dict[str, Any]
    max_retries: int | None = None
    cron: str | None = None
    timezone: str | None = Field(None, description="With cron: the zone it is read in")
    every_seconds: int | None = None
    paused: bool
    paused_reason: str | None = Field(
        None, description="While paused: who paused it, or what stopped it (its creator's"
        " token revoked or without the scope, a tick that could not be made)")
    next_run_at: datetime | None = Field(None, description="The next tick (null while paused)")
    last_run_at: datetime | None = Field(None, description="The tick the last job was made for")
    last_job_id: uuid.UUID | None = None
    created_by: str | None = Field(None, description="Name of the token that created it")
    created_at: datetime
    updated_at: datetime


class SchedulePage(BaseModel):
    """A page of `GET /schedules`, by name."""

    items: list[ScheduleDocument]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page")


def document(row: dict[str, Any]) -> ScheduleDocument:
    return ScheduleDocument.model_validate({
        **{k: row[k] for k in ("name", "schedule_id", "job_type", "max_retries", "cron",
                               "timezone", "every_seconds", "next_run_at", "last_run_at",
                               "last_job_id", "created_by", "created_at", "updated_at")},
        "payload": row["payload_json"],
        "paused": row["paused_at"] is not None,
        "paused_reason": row.get("paused_reason") if row["paused_at"] is not None else None,
    })


def _timing(row: dict[str, Any]) -> Timing:
    return Timing(row["cron"], row["timezone"], row["every_seconds"], row["anchor_at"])


# --- the API's operations -----------------------------------------------------------------

def parse_name(raw: str) -> str:
    if not _NAME.match(raw):
        raise ApiError(400, "Bad schedule name", f"{raw!r} is not a schedule name (letters,"
                       " digits, '_', '-' and '.', at most 100, not starting with a symbol)")
    return raw


def create(db: Database, request: ScheduleRequest, principal: Principal) -> ScheduleDocument:
    """A new schedule, its payload checked against its type now; 409 if the name is taken."""
    payload = validate_payload(request.job_type, request.payload)
    check_type_scope(principal, request.job_type, payload, "scheduling")
    timezone = request.timezone or ("UTC" if request.cron else None)
    with db.transaction() as conn:
        now = conn.run("SELECT date_trunc('second', now())")[0][0]
        first = Timing(request.cron, timezone, request.every_seconds, now).next_after(now)
        rows = rows_as_dicts(conn, conn.run(
            "INSERT INTO schedules (name, schedule_id, job_type, payload_json, max_retries,"
            " cron, timezone, every_seconds, anchor_at, next_run_at, created_by,"
            " created_by_token)"
            " VALUES (:name, CAST(:id AS uuid), :type, CAST(:payload AS jsonb), :retries,"
            " :cron, :zone, :every, CAST(:anchor AS timestamptz),"
            " CAST(:first AS timestamptz), :by, CAST(:token AS uuid))"
            " ON CONFLICT (name) DO NOTHING RETURNING *",
            name=request.name, id=str(uuid.uuid4()), type=request.job_type,
            payload=json.dumps(payload), retries=request.max_retries, cron=request.cron,
            zone=timezone, every=request.every_seconds, anchor=now.isoformat(),
            first=first.isoformat() if first else None, by=principal.name,
            token=principal.token_id))
    if not rows:
        raise ApiError(409, "Schedule exists", f"a schedule named {request.name!r} already"
                       " exists; delete it first, or choose another name")
    return document(rows[0])


def get(db: Database, name: str) -> ScheduleDocument:
    with db.connection() as conn:
        return document(_one(conn, "SELECT * FROM schedules WHERE name = :name", name))


def list_page(db: Database, cursor: str | None, limit: int) -> SchedulePage:
    after = jobs.decode_cursor(cursor, 1)[0] if cursor else ""
    with db.connection() as conn:
        rows = rows_as_dicts(conn, conn.run(
            "SELECT * FROM schedules WHERE name > :after ORDER BY name LIMIT :limit",
            after=after, limit=limit + 1))
    next_cursor = jobs.encode_cursor(rows[limit - 1]["name"]) if len(rows) > limit else None
    return SchedulePage(items=[document(r) for r in rows[:limit]], next_cursor=next_cursor)


def delete(db: Database, name: str) -> None:
    """Remove a schedule: no tick after this (a job its last tick made stays)."""
    with db.connection() as conn:
        _one(conn, "DELETE FROM schedules WHERE name = :name RETURNING name", name)


def pause(db: Database, name: str, by: str | None = None) -> ScheduleDocument:
    """No ticks until resumed (pausing a paused schedule changes nothing)."""
    with db.connection() as conn:
        return document(_one(
            conn, "UPDATE schedules SET paused_reason = CASE WHEN paused_at IS NULL THEN"
            " :reason ELSE paused_reason END, paused_at = coalesce(paused_at, now()),"
            " next_run_at = NULL, updated_at = now() WHERE name = :name RETURNING *", name,
            reason=f"paused by {by}" if by else "paused"))


def resume(db: Database, name: str) -> ScheduleDocument:
    """Tick again from the first tick after now (none is made up for the pause)."""
    with db.transaction() as conn:
        row = _one(conn, "SELECT *, now() AS db_now FROM schedules WHERE name = :name"
                   " FOR UPDATE", name)
        if row["paused_at"] is None:
            return document(row)
        after = _timing(row).next_after(row["db_now"])
        row = _one(conn, "UPDATE schedules SET paused_at = NULL, paused_reason = NULL,"
                   " updated_at = now(),"
                   " next_run_at = CAST(:next AS timestamptz) WHERE name = :name RETURNING *",
                   name, next=after.isoformat() if after else None)
    return document(row)


def _one(conn: Connection, sql: str, name: str, **params: Any) -> dict[str, Any]:
    rows = rows_as_dicts(conn, conn.run(sql, name=parse_name(name), **params))
    if not rows:
        raise ApiError(404, "Schedule not found", f"no schedule named {name!r}")
    return rows[0]


# --- the sweeper's step -------------------------------------------------------------------

_DUE = """
SELECT s.*, now() AS db_now, t.scopes AS owner_scopes,
       s.created_by_token IS NOT NULL AND (t.id IS NULL OR t.expires_at <= now()) AS orphaned
FROM schedules s LEFT JOIN api_tokens t ON t.id = s.created_by_token
WHERE s.paused_at IS NULL AND s.next_run_at <= now()
ORDER BY s.next_run_at
LIMIT :limit
FOR UPDATE OF s SKIP LOCKED
"""


def _owner_refuses(row: dict[str, Any]) -> str | None:
    """Why the token that created a schedule may no longer have its ticks made, or None:
    revoked, expired, or without the scopes creating it needed."""
    if row["orphaned"]:
        return f"its creator's token ({row['created_by']}) was revoked or has expired"
    if row["owner_scopes"] is None:  # created with authentication off
        return None
    owner = Principal(str(row["created_by_token"]), row["created_by"] or "",
                      frozenset(row["owner_scopes"]))
    if not owner.allows(Scope.SUBMIT):
        return f"its creator's token ({row['created_by']}) no longer has jobs:submit"
    try:
        check_type_scope(owner, row["job_type"], row["payload_json"],
                         "scheduling")
    except ApiError as exc:
        return exc.detail
    return None


def _unhandled(row: dict[str, Any]) -> str | None:
    """Why a schedule's job could not run here, or None: its type is registered by none of
    this deployment's handler modules (removed, or JOBS_HANDLER_MODULES left out on a
    restart). Its ticks would only make jobs that are dead-lettered at once."""
    if get_job_type(row["job_type"]) is None:
        return (f"its job type {row['job_type']!r} is not registered here (is its module in"
                " JOBS_HANDLER_MODULES?); resume it once it is")
    return None


def fire_due(db: Database, publisher: Publisher, settings: Settings,
             limit: int = 100) -> list[str]:
    """Make the job of every due tick, once, and move each schedule to its next tick.

    Returns the names of the schedules whose tick this call fired. A job whose message
    cannot be published now is committed all the same; `sweeper.publish_due` sends it later.
    A schedule whose tick fails (say its time zone left the tz database) is paused, with an
    error in the log, so that it cannot hold up every other schedule, tick after tick.
    """
    made: list[dict[str, Any]] = []
    fired: list[str] = []
    with db.transaction() as conn:
        for row in rows_as_dicts(conn, conn.run(_DUE, limit=limit)):
            refusal = _owner_refuses(row) or _unhandled(row)
            if refusal:
                log.warning("schedule %s paused: %s", row["name"], refusal)
                _stop(conn, row["name"], refusal)
                continue
            conn.run("SAVEPOINT tick")
            try:
                job, is_new = _fire(db, conn, row, settings)
            except Exception as exc:
                if is_transient(exc):  # the next sweep tries this tick again
                    raise
                conn.run("ROLLBACK TO SAVEPOINT tick")
                log.exception("schedule %s failed to fire its tick at %s; pausing it",
                              row["name"], row["next_run_at"].isoformat())
                _stop(conn, row["name"], f"its tick at {row['next_run_at'].isoformat()}"
                      f" could not be made ({type(exc).__name__}; see the sweeper's log)")
                continue
            fired.append(row["name"])
            if is_new:
                made.append(job)
    for job in made:
        metrics.SUBMITTED.labels(job["job_type"]).inc()
    if made:
        try:
            publisher.publish([job_event(job_topic(settings, job["job_type"]), job["job_id"],
                                         job["job_type"], source="/schedules")
                               for job in made])
            jobs.mark_published(db, [(str(job["job_id"]), job["attempts"]) for job in made])
        except ServiceUnavailable as exc:
            log.warning("made %d scheduled job(s) but could not enqueue them now (%s);"
                        " the sweeper will", len(made), exc.detail)
        log.info("schedules made %d job(s)", len(made))
    return fired


def _stop(conn: Connection, name: str, reason: str) -> None:
    conn.run("UPDATE schedules SET paused_at = now(), next_run_at = NULL, updated_at = now(),"
             " paused_reason = :reason WHERE name = :name", name=name, reason=reason[:500])


def _fire(db: Database, conn: Connection, row: dict[str, Any],
          settings: Settings) -> tuple[dict[str, Any], bool]:
    """One due schedule's tick: its job (new, or the one an earlier try made) and the move
    to the first tick after now (missed ticks: one job for all)."""
    tick = row["next_run_at"]
    submission = JobSubmission(job_type=row["job_type"], max_retries=row["max_retries"],
                               payload=row["payload_json"])
    [(job, is_new)] = jobs.create_jobs(
        db, [(submission, submission.payload, tick_key(row["schedule_id"], tick),
              max_retries_for(submission, settings.max_retries),
              jobs.request_fingerprint(submission))],
        submitted_by=f"schedule:{row['name']}", conn=conn)
    after = _timing(row).next_after(row["db_now"])
    conn.run("UPDATE schedules SET next_run_at = CAST(:next AS timestamptz),"
             " last_run_at = CAST(:tick AS timestamptz), last_job_id = CAST(:job AS uuid),"
             " updated_at = now() WHERE name = :name",
             next=after.isoformat() if after else None, tick=tick.isoformat(),
             job=str(job["job_id"]), name=row["name"])
    return job, is_new
