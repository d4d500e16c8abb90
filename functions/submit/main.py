"""`submit`: accept jobs over HTTP (POST /jobs, POST /jobs/batch, retry and cancel), and
create, delete, pause and resume schedules.

Its operations and their scopes are declared in `common.routes`."""

import flask
import functions_framework
from werkzeug.exceptions import HTTPException

from common import api, clients, schedules
from common.auth import Principal
from common.http import Dispatcher, Reply, parse_model, query_bool, read_json
from common.logs import configure_logging
from common.models import BatchAccepted, JobSubmission

configure_logging("submit")
clients.needs("database_url", "redis_url", "kafka_bootstrap_servers")
clients.warm_up_after_fork(submit=True)


def _enqueue_header(enqueued: bool) -> dict[str, str]:
    return {} if enqueued else {"X-Jobs-Enqueue": "deferred"}


def create(request: flask.Request, principal: Principal) -> Reply:
    key = api.check_idempotency_key(request.headers.get("Idempotency-Key"))
    submission = parse_model(JobSubmission, read_json(request, clients.settings().max_body_bytes))
    (doc,), enqueued = api.submit([submission], key, principal=principal)
    return Reply(doc, headers={"Location": f"/jobs/{doc.job_id}", **_enqueue_header(enqueued)})


def create_batch(request: flask.Request, principal: Principal) -> Reply:
    key = api.check_idempotency_key(request.headers.get("Idempotency-Key"))
    batch = parse_model(api.BatchSubmission, read_json(request, clients.settings().max_body_bytes))
    docs, enqueued = api.submit(batch.jobs, key, batch=True, principal=principal)
    return Reply(BatchAccepted(jobs=docs), headers=_enqueue_header(enqueued))


def retry(request: flask.Request, principal: Principal, job_id: str) -> Reply:
    doc = api.replay(job_id, with_dependents=query_bool(request, "with_dependents"))
    return Reply(doc, headers={"Location": f"/jobs/{doc.job_id}"})


def cancel(request: flask.Request, principal: Principal, job_id: str) -> Reply:
    return Reply(api.cancel(job_id))


def create_schedule(request: flask.Request, principal: Principal) -> Reply:
    body = parse_model(schedules.ScheduleRequest,
                       read_json(request, clients.settings().max_body_bytes))
    clients.handlers()
    doc = schedules.create(clients.database(), body, principal)
    return Reply(doc, headers={"Location": f"/schedules/{doc.name}"})


def delete_schedule(request: flask.Request, principal: Principal, name: str) -> Reply:
    schedules.delete(clients.database(), name)
    return Reply(None)


def pause_schedule(request: flask.Request, principal: Principal,
                   name: str) -> schedules.ScheduleDocument:
    return schedules.pause(clients.database(), name, by=principal.name)


def resume_schedule(request: flask.Request, principal: Principal,
                    name: str) -> schedules.ScheduleDocument:
    return schedules.resume(clients.database(), name)


DISPATCH = Dispatcher("submit", {"submitJob": create, "submitBatch": create_batch,
                                 "replayJob": retry, "cancelJob": cancel,
                                 "createSchedule": create_schedule,
                                 "deleteSchedule": delete_schedule,
                                 "pauseSchedule": pause_schedule,
                                 "resumeSchedule": resume_schedule})


@functions_framework.http
def submit_job(request: flask.Request) -> flask.Response:
    return DISPATCH(request)


@functions_framework.errorhandler(HTTPException)
def answer_http_error(exc: HTTPException) -> flask.Response:
    """Framework-level errors (unroutable paths, refused methods) as problem documents too."""
    return DISPATCH.http_error(flask.request, exc)
