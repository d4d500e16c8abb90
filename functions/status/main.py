"""`status`: answer job state (GET /jobs/{id}, GET /jobs, artifacts, attempts, dead
letters, stats) and list schedules. Its operations and their scopes are declared in
`common.routes`."""

import flask
import functions_framework
from werkzeug.exceptions import HTTPException

from common import api, artifacts, clients, schedules
from common.auth import Principal
from common.errors import ApiError
from common.http import Dispatcher, query_int, query_list, query_text
from common.logs import configure_logging
from common.models import (
    AttemptPage,
    CallbackPage,
    DeadLetterPage,
    JobDocument,
    JobPage,
    Stats,
)

configure_logging("status")
clients.needs("database_url", "redis_url")
clients.warm_up_after_fork(publish=False)


def get_one(request: flask.Request, principal: Principal, job_id: str) -> JobDocument:
    return api.get_job(job_id)


def get_many(request: flask.Request, principal: Principal) -> JobPage:
    return api.list_jobs(
        status=query_list(request, "status"),
        job_type=query_list(request, "job_type"),
        id_prefix=query_text(request, "id_prefix"),
        cursor=query_text(request, "cursor"),
        limit=query_int(request, "limit", 50, 1, 200),
    )


def get_artifact(request: flask.Request, principal: Principal, job_id: str) -> flask.Response:
    doc = api.get_job(job_id)
    clients.handlers()
    api.check_type_scope(principal, doc.job_type, doc.payload, "downloading the file of")
    result = doc.result if isinstance(doc.result, dict) else None
    name = result.get("artifact") if result else None
    if doc.status != "COMPLETED" or not name:
        raise ApiError(404, "No artifact", f"job {doc.job_id} has no artifact"
                       f" (status {doc.status.value})")
    found = artifacts.find_artifact(clients.settings().artifact_store, str(doc.job_id), name)
    if found is None:
        raise ApiError(404, "Artifact missing",
                       f"the artifact {name!r} of job {doc.job_id} is no longer stored")
    where, content_type = found
    if isinstance(where, str):  # in object storage: streamed (no ranges)
        return flask.send_file(artifacts.open_artifact(where), mimetype=content_type,
                               as_attachment=True, download_name=name)
    return flask.send_file(where, mimetype=content_type, as_attachment=True,
                           download_name=where.name)


def get_dead_letters(request: flask.Request, principal: Principal) -> DeadLetterPage:
    return api.list_dead_letters(
        cursor=query_text(request, "cursor"),
        limit=query_int(request, "limit", 50, 1, 200),
    )


def get_attempts(request: flask.Request, principal: Principal, job_id: str) -> AttemptPage:
    return api.attempts(job_id)


def get_stats(request: flask.Request, principal: Principal) -> Stats:
    return api.stats()


def get_dependents(request: flask.Request, principal: Principal, job_id: str) -> JobPage:
    return api.dependents(job_id)


def get_callbacks(request: flask.Request, principal: Principal, job_id: str) -> CallbackPage:
    return api.callback_deliveries(job_id)
def get_schedules(request: flask.Request, principal: Principal) -> schedules.SchedulePage:
    return schedules.list_page(clients.database(), cursor=query_text(request, "cursor"),
                               limit=query_int(request, "limit", 50, 1, 200))


def get_schedule(request: flask.Request, principal: Principal,
                 name: str) -> schedules.ScheduleDocument:
    return schedules.get(clients.database(), name)


DISPATCH = Dispatcher("status", {
    "listJobs": get_many, "getJob": get_one, "getArtifact": get_artifact,
    "getAttempts": get_attempts, "listDeadLetters": get_dead_letters, "getStats": get_stats,
    "getDependents": get_dependents, "getCallbacks": get_callbacks,
    "listSchedules": get_schedules, "getSchedule": get_schedule,
})


@functions_framework.http
def get_job_status(request: flask.Request) -> flask.Response:
    return DISPATCH(request)


@functions_framework.errorhandler(HTTPException)
def answer_http_error(exc: HTTPException) -> flask.Response:
    """Framework-level errors (unroutable paths, refused methods) as problem documents too."""
    return DISPATCH.http_error(flask.request, exc)
