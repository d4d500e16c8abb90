"""`process`: run the job named by a `job-queue` CloudEvent and record its outcome.

`process_job` is the deployment target: one binary-mode CloudEvent per request, as a
Knative KafkaSource delivers. `process_job_batch` also takes several events in one
request (CloudEvents batched content mode) and answers each event's status; the local
bridge uses it for throughput (`--batch-size`).
"""

import concurrent.futures
import logging
from typing import Any

import flask
import functions_framework
from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_http

from common import clients
from common.errors import ApiError, ServiceUnavailable
from common.http import json_response, problem
from common.logs import configure_logging
from common.processing import PoisonMessage, parse_message

configure_logging("process")

log = logging.getLogger(__name__)
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
_batch_pool = concurrent.futures.ThreadPoolExecutor(64, thread_name_prefix="batch")


def run_event(event_id: str, data: Any) -> tuple[int, str]:
    """(HTTP status, detail) for one event: 200 recorded, 400 never processable, 503 later."""
    try:
        outcome = clients.processor().handle(parse_message(data))
    except PoisonMessage as exc:
        log.error("poison record %s: %s", event_id, exc)
        return 400, str(exc)
    except ServiceUnavailable as exc:
        log.warning("record %s not processed, %s", event_id, exc)
        return 503, str(exc)
    log.info("record %s: job %s %s", event_id, outcome.job_id, outcome.outcome)
    return 200, outcome.outcome


@functions_framework.cloud_event
def process_job(event: CloudEvent) -> None:
    """2xx once the outcome is recorded; 400 for a record no retry can fix; 503 to retry later."""
    status, detail = run_event(event["id"], event.data)
    if status == 400:
        flask.abort(problem(ApiError(400, "Undeliverable record", detail)))
    if status == 503:
        flask.abort(problem(ApiError(503, "Service unavailable", detail,
                                     headers={"Retry-After": "5"})))


@functions_framework.http
def process_job_batch(request: flask.Request) -> flask.Response:
    """A batch of events (each answered in `results`, in order), or one binary-mode event."""
    if request.mimetype != BATCH_CONTENT_TYPE:
        try:
            event = from_http(request.headers, request.get_data())
        except CloudEventError as exc:
            return problem(ApiError(400, "Not a CloudEvent", str(exc)))
        status, detail = run_event(event["id"], event.data)
        if status == 200:
            return json_response({"outcome": detail})
        return problem(ApiError(status, "Not processed", detail))
    events = request.get_json(silent=True)
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        return problem(ApiError(400, "Not a CloudEvents batch",
                                "the body must be a JSON array of structured events"))
    futures = [_batch_pool.submit(run_event, str(e.get("id")),
                                  e.get("data", b"<binary data>"))
               for e in events]
    results = []
    for event, future in zip(events, futures, strict=True):
        status, detail = future.result()
        results.append({"id": event.get("id"), "status": status, "detail": detail})
    return json_response({"results": results})
