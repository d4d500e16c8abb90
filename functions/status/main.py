"""`status`: answer job state (GET /jobs/{id}, GET /jobs, artifacts, dead letters)."""

import flask
import functions_framework
from werkzeug.exceptions import HTTPException

from common import api, artifacts, clients
from common.errors import ApiError
from common.http import (
    dispatch,
    http_error,
    json_response,
    query_int,
    query_list,
    query_text,
    routes,
)
from common.logs import configure_logging

configure_logging("status")
clients.warm_up_after_fork(publish=False)


def get_one(request: flask.Request, job_id: str) -> flask.Response:
    return json_response(api.get_job(job_id))


def get_many(request: flask.Request) -> flask.Response:
    page = api.list_jobs(
        status=query_list(request, "status"),
        job_type=query_list(request, "job_type"),
        cursor=query_text(request, "cursor"),
        limit=query_int(request, "limit", 50, 1, 200),
    )
    return json_response(page)


def get_artifact(request: flask.Request, job_id: str) -> flask.Response:
    doc = api.get_job(job_id)
    result = doc.get("result") if isinstance(doc.get("result"), dict) else None
    name = result.get("artifact") if result else None
    if doc["status"] != "COMPLETED" or not name:
        raise ApiError(404, "No artifact", f"job {doc['job_id']} has no artifact"
                       f" (status {doc['status']})")
    found = artifacts.find_artifact(clients.settings().artifact_dir, doc["job_id"], name)
    if found is None:
        raise ApiError(404, "Artifact missing",
                       f"the artifact {name!r} of job {doc['job_id']} is no longer stored")
    path, content_type = found
    return flask.send_file(path, mimetype=content_type, as_attachment=True,
                           download_name=path.name)


def get_dead_letters(request: flask.Request) -> flask.Response:
    page = api.list_dead_letters(
        cursor=query_text(request, "cursor"),
        limit=query_int(request, "limit", 50, 1, 200),
    )
    return json_response(page)


def get_attempts(request: flask.Request, job_id: str) -> flask.Response:
    return json_response(api.attempts(job_id))


def get_stats(request: flask.Request) -> flask.Response:
    return json_response(api.stats())


ROUTES = routes(
    ("GET", "/jobs", get_many),
    ("GET", "/jobs/{job_id}", get_one),
    ("GET", "/jobs/{job_id}/artifact", get_artifact),
    ("GET", "/jobs/{job_id}/attempts", get_attempts),
    ("GET", "/dead-letters", get_dead_letters),
    ("GET", "/stats", get_stats),
)


@functions_framework.http
def get_job_status(request: flask.Request) -> flask.Response:
    return dispatch(request, ROUTES)


@functions_framework.errorhandler(HTTPException)
def answer_http_error(exc: HTTPException) -> flask.Response:
    """Framework-level errors (unroutable paths, refused methods) as problem documents too."""
    return http_error(flask.request, exc, ROUTES)
