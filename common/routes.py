"""The HTTP API, declared once.

Every public operation is one `Operation` row in `API`: its method and path, the function
that answers it, the token scope it needs, its request model, its answers and errors.
From this table come each HTTP function's dispatch (`common.http.Dispatcher`), the
gateway's routing (`infra.gateway`) and the OpenAPI document (`common.openapi`); a route
is never written twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from common.auth import Scope
from common.models import (
    AttemptPage,
    BatchAccepted,
    CallbackPage,
    DeadLetterPage,
    Health,
    Identity,
    JobDocument,
    JobPage,
    JobStatus,
    JobSubmission,
    Readiness,
    Stats,
    TokenCreated,
    TokenPage,
    TokenRequest,
)
from common.schedules import ScheduleDocument, SchedulePage, ScheduleRequest

#: Which process answers an operation: an HTTP function, or the gateway itself.
SUBMIT, STATUS, GATEWAY = "submit", "status", "gateway"


@dataclass(frozen=True)
class Answer:
    """One success answer: a model (JSON), a file, or no body."""

    description: str
    model: type[BaseModel] | None = None
    media_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Param:
    """A query or header parameter, as OpenAPI describes it."""

    name: str
    location: str  # "query" or "header"
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class Operation:
    operation_id: str
    method: str
    path: str  # OpenAPI style: /jobs/{job_id}
    function: str
    scope: str | None  # None: any valid token (or none at all when `public`)
    summary: str
    answers: dict[int, Answer]
    errors: dict[int, str] = field(default_factory=dict)
    request: type[BaseModel] | None = None
    params: tuple[Param, ...] = ()
    tag: str = "jobs"
    public: bool = False  # answered without a token

    @property
    def rule(self) -> str:
        """The path in werkzeug's rule syntax (`/jobs/<job_id>`)."""
        return re.sub(r"\{(\w+)\}", r"<\1>", self.path)

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.path)


_LOCATION = (("Location", "URL of the job"),)
_ENQUEUE = (("X-Jobs-Enqueue", "`deferred` when the broker did not acknowledge in time: the"
             " job is committed and the sweeper publishes it"),)
_CURSOR = Param("cursor", "query", {"type": "string"}, "`next_cursor` of the previous page")
_LIMIT = Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 200,
                                  "default": 50})
_IDEMPOTENCY = Param("Idempotency-Key", "header",
                     {"type": "string", "minLength": 1, "maxLength": 200},
                     "Same key and body: the same job. Same key, other body: 409.")
_LIST_FILTERS = (
    Param("status", "query", {"type": "string", "enum": [s.value for s in JobStatus]},
          "Only jobs in this state (repeat or comma-separate for several)"),
    Param("job_type", "query", {"type": "string"}, "Only jobs of this type"),
    Param("id_prefix", "query", {"type": "string", "minLength": 1, "maxLength": 36},
          "Only jobs whose id starts with this (hex digits, dashes where a UUID has them)"),
)
_BODY_ERRORS = {
    400: "Malformed JSON or bad header",
    409: "Idempotency-Key reused with another body",
    413: "Body over the size limit",
    415: "Body is not JSON",
    422: "Unknown job type, invalid payload, or a field out of range",
}
_NOT_A_JOB = {400: "Not a UUID", 404: "No such job"}
_NOT_A_SCHEDULE = {400: "Not a schedule name", 404: "No such schedule"}

API: tuple[Operation, ...] = (
    Operation("submitJob", "POST", "/jobs", SUBMIT, Scope.SUBMIT, "Submit a job",
              {202: Answer("Accepted: committed, and queued unless `X-Jobs-Enqueue` says"
                           " deferred", JobDocument, headers=_LOCATION + _ENQUEUE)},
              _BODY_ERRORS, JobSubmission, (_IDEMPOTENCY,)),
    Operation("submitBatch", "POST", "/jobs/batch", SUBMIT, Scope.SUBMIT,
              "Submit up to 1,000 jobs in one transaction",
              {202: Answer("Accepted, in the order submitted", BatchAccepted,
                           headers=_ENQUEUE)},
              _BODY_ERRORS, None, (_IDEMPOTENCY,)),  # body schema: see common.openapi
    Operation("listJobs", "GET", "/jobs", STATUS, Scope.READ, "List jobs, newest first",
              {200: Answer("A page of jobs", JobPage)},
              {400: "Bad filter, limit or cursor"}, params=(*_LIST_FILTERS, _CURSOR, _LIMIT)),
    Operation("getJob", "GET", "/jobs/{job_id}", STATUS, Scope.READ,
              "A job's state (a finished job from memory or the Redis cache, any other from"
              " PostgreSQL)",
              {200: Answer("The job", JobDocument)}, _NOT_A_JOB),
    Operation("streamJobEvents", "GET", "/jobs/{job_id}/events", GATEWAY, Scope.READ,
              "A job's documents as server-sent events, live, until it ends",
              {200: Answer("`text/event-stream`: one event per change, its `data` the job"
                           " document (JobDocument) as JSON and its `id` the document's"
                           " `version`, starting with the current document; a comment line"
                           " as heartbeat while nothing changes; the stream ends after a"
                           " COMPLETED, CANCELLED or DEAD_LETTER document", None,
                           "text/event-stream"),
               204: Answer("The job has ended and `Last-Event-ID` is its last version:"
                           " nothing more will come (EventSource stops reconnecting)",
                           None, None)},
              {**_NOT_A_JOB, 503: "This gateway process has JOBS_EVENTS_MAX_STREAMS streams"
               " open; retry after `Retry-After` seconds"},
              params=(Param("Last-Event-ID", "header", {"type": "string"},
                            "Resume: documents of this version and older are not sent"),)),
    Operation("getArtifact", "GET", "/jobs/{job_id}/artifact", STATUS, Scope.READ,
              "Download the file a job produced",
              {200: Answer("The artifact", None, "application/octet-stream"),
               206: Answer("Part of it (a Range request)", None, "application/octet-stream")},
              {400: "Not a UUID", 404: "No such job, or it has no artifact",
               416: "A Range the file cannot satisfy"}),
    Operation("getAttempts", "GET", "/jobs/{job_id}/attempts", STATUS, Scope.READ,
              "Every attempt of a job: start, end, outcome, error",
              {200: Answer("The attempts, oldest first", AttemptPage)}, _NOT_A_JOB),
    Operation("getDependents", "GET", "/jobs/{job_id}/dependents", STATUS, Scope.READ,
              "The jobs that depend on this one (`depends_on`), oldest first",
              {200: Answer("Up to 1,000 dependents", JobPage)}, _NOT_A_JOB),
    Operation("getCallbacks", "GET", "/jobs/{job_id}/callbacks", STATUS, Scope.READ,
              "The job's completion callbacks and every try at delivering them",
              {200: Answer("The deliveries, oldest first", CallbackPage)}, _NOT_A_JOB),
    Operation("replayJob", "POST", "/jobs/{job_id}/retry", SUBMIT, Scope.OPERATE,
              "Replay a dead-lettered job with a fresh retry budget",
              {202: Answer("Queued again", JobDocument, headers=_LOCATION)},
              {**_NOT_A_JOB, 409: "The job is not dead-lettered"},
              params=(Param("with_dependents", "query", {"type": "boolean", "default": False},
                            "Also bring back the jobs its failure cancelled (they wait for"
                            " it again)"),)),
    Operation("cancelJob", "POST", "/jobs/{job_id}/cancel", SUBMIT, Scope.OPERATE,
              "Cancel a job: a waiting one at once, a running one is asked to stop",
              {202: Answer("Cancelled, or asked to stop (`cancel_requested`)", JobDocument)},
              {**_NOT_A_JOB, 409: "The job already ended"}),
    Operation("listDeadLetters", "GET", "/dead-letters", STATUS, Scope.READ,
              "Dead letters, newest first",
              {200: Answer("A page of dead letters", DeadLetterPage)},
              {400: "Bad limit or cursor"}, params=(_CURSOR, _LIMIT)),
    Operation("getStats", "GET", "/stats", STATUS, Scope.READ,
              "Counts by status and type, completions per minute, recent and running jobs",
              {200: Answer("The counts", Stats)}),
    Operation("createSchedule", "POST", "/schedules", SUBMIT, Scope.SUBMIT,
              "Create a schedule: a job made on every tick of a cron expression (in a time"
              " zone) or every N seconds",
              {201: Answer("Created, with its first `next_run_at`", ScheduleDocument,
                           headers=(("Location", "URL of the schedule"),))},
              {**_BODY_ERRORS, 409: "A schedule with this name exists",
               422: "Bad name, cron expression or time zone; unknown job type, or a payload"
                    " that does not match the type's model"},
              ScheduleRequest, tag="schedules"),
    Operation("listSchedules", "GET", "/schedules", STATUS, Scope.READ,
              "Schedules, by name", {200: Answer("A page of schedules", SchedulePage)},
              {400: "Bad limit or cursor"}, params=(_CURSOR, _LIMIT), tag="schedules"),
    Operation("getSchedule", "GET", "/schedules/{name}", STATUS, Scope.READ,
              "A schedule: its next tick, its last tick and the job that made",
              {200: Answer("The schedule", ScheduleDocument)}, _NOT_A_SCHEDULE,
              tag="schedules"),
    Operation("deleteSchedule", "DELETE", "/schedules/{name}", SUBMIT, Scope.OPERATE,
              "Delete a schedule: it makes no job after this",
              {204: Answer("Deleted", None, None)}, _NOT_A_SCHEDULE, tag="schedules"),
    Operation("pauseSchedule", "POST", "/schedules/{name}/pause", SUBMIT, Scope.OPERATE,
              "Pause a schedule: no ticks until it is resumed",
              {200: Answer("Paused (`next_run_at` is null)", ScheduleDocument)},
              _NOT_A_SCHEDULE, tag="schedules"),
    Operation("resumeSchedule", "POST", "/schedules/{name}/resume", SUBMIT, Scope.OPERATE,
              "Resume a schedule from its first tick after now (missed ones are not made up)",
              {200: Answer("Active again, with its `next_run_at`", ScheduleDocument)},
              _NOT_A_SCHEDULE, tag="schedules"),
    Operation("createToken", "POST", "/tokens", GATEWAY, Scope.ADMIN,
              "Create an API token (its secret is shown this once)",
              {201: Answer("The token, with its secret", TokenCreated)},
              {400: "Malformed JSON", 413: "Body over the size limit", 415: "Body is not JSON",
               422: "Bad name, scope or expiry"}, TokenRequest, tag="tokens"),
    Operation("listTokens", "GET", "/tokens", GATEWAY, Scope.ADMIN,
              "Every API token (never a secret)", {200: Answer("The tokens", TokenPage)},
              tag="tokens"),
    Operation("revokeToken", "DELETE", "/tokens/{token_id}", GATEWAY, Scope.ADMIN,
              "Revoke an API token", {204: Answer("Revoked", None, None)},
              {400: "Not a UUID", 404: "No such token"}, tag="tokens"),
    Operation("whoami", "GET", "/whoami", GATEWAY, None, "The token this request carries"
              " (any valid token)", {200: Answer("Its name and scopes", Identity)},
              tag="tokens"),
    Operation("metrics", "GET", "/metrics", GATEWAY, Scope.ADMIN,
              "Prometheus metrics of every process (an admin token, or the scrape token"
              " in JOBS_METRICS_TOKEN)",
              {200: Answer("Prometheus text format", None, "text/plain")}, tag="operations"),
    Operation("health", "GET", "/healthz", GATEWAY, None, "Liveness",
              {200: Answer("Alive", Health)}, tag="operations", public=True),
    Operation("ready", "GET", "/readyz", GATEWAY, None, "Readiness of every dependency",
              {200: Answer("Every dependency answers", Readiness)},
              {503: "Some dependency does not answer"}, tag="operations", public=True),
    Operation("openapi", "GET", "/openapi.json", GATEWAY, None, "This document",
              {200: Answer("OpenAPI 3.1", None)}, tag="operations", public=True),
)

#: Operations that need a token answer 401 without one and 403 without the scope.
AUTH_ERRORS = {401: "No valid token (missing, unknown, revoked or expired)",
               403: "The token lacks the scope this operation needs"}
#: Any operation that reads PostgreSQL may answer 503 while it is down.
UNAVAILABLE = "A dependency is unavailable; retry after `Retry-After` seconds"

BY_ID = {op.operation_id: op for op in API}


def operations(function: str) -> list[Operation]:
    """The operations that `function` answers."""
    return [op for op in API if op.function == function]
