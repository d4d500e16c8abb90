"""`submit`: accept jobs over HTTP (POST /jobs, POST /jobs/batch, POST /jobs/{id}/retry)."""

import flask
import functions_framework
from werkzeug.exceptions import HTTPException

from common import api, clients
from common.http import dispatch, http_error, json_response, parse_model, read_json, routes
from common.logs import configure_logging
from common.models import JobSubmission

configure_logging("submit")
clients.warm_up_after_fork()


def create(request: flask.Request) -> flask.Response:
    key = api.check_idempotency_key(request.headers.get("Idempotency-Key"))
    submission = parse_model(JobSubmission, read_json(request, clients.settings().max_body_bytes))
    (doc,), enqueued = api.submit([submission], key)
    headers = {"Location": f"/jobs/{doc['job_id']}"}
    if not enqueued:
        headers["X-Jobs-Enqueue"] = "deferred"
    return json_response(doc, 202, headers)


def create_batch(request: flask.Request) -> flask.Response:
    key = api.check_idempotency_key(request.headers.get("Idempotency-Key"))
    batch = parse_model(api.BatchSubmission, read_json(request, clients.settings().max_body_bytes))
    docs, enqueued = api.submit(batch.jobs, key, batch=True)
    headers = {} if enqueued else {"X-Jobs-Enqueue": "deferred"}
    return json_response({"jobs": docs}, 202, headers)


def retry(request: flask.Request, job_id: str) -> flask.Response:
    doc = api.replay(job_id)
    return json_response(doc, 202, {"Location": f"/jobs/{doc['job_id']}"})


def cancel(request: flask.Request, job_id: str) -> flask.Response:
    return json_response(api.cancel(job_id), 202)


ROUTES = routes(
    ("POST", "/jobs", create),
    ("POST", "/jobs/batch", create_batch),
    ("POST", "/jobs/{job_id}/retry", retry),
    ("POST", "/jobs/{job_id}/cancel", cancel),
)


@functions_framework.http
def submit_job(request: flask.Request) -> flask.Response:
    return dispatch(request, ROUTES)


@functions_framework.errorhandler(HTTPException)
def answer_http_error(exc: HTTPException) -> flask.Response:
    """Framework-level errors (unroutable paths, refused methods) as problem documents too."""
    return http_error(flask.request, exc, ROUTES)
