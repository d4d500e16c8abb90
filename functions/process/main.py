"""`process`: run the job named by a `job-queue` CloudEvent and record its outcome.

`process_job` is the deployment target: one binary-mode CloudEvent per request, as a
Knative KafkaSource delivers. `process_job_batch` also takes several events in one
request (CloudEvents batched content mode) and answers each event's status; the local
bridge uses it for throughput (`--batch-size`).
"""

import json
import logging
from typing import Any

import flask
import functions_framework
from cloudevents.exceptions import GenericException as CloudEventError
from cloudevents.http import CloudEvent, from_dict, from_http, from_json

from common import clients
from common.errors import ApiError, ServiceUnavailable
from common.http import json_response, problem
from common.logs import configure_logging
from common.processing import PoisonMessage, parse_message

configure_logging("process")
clients.needs("database_url", "redis_url", "kafka_bootstrap_servers", "smtp_url")
clients.warm_up_after_fork(process=True)

log = logging.getLogger(__name__)
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
REQUIRED_ATTRIBUTES = frozenset({"specversion", "id", "type", "source"})


def decode_event(element: Any) -> CloudEvent | CloudEventError:
    """One element of a batched-mode body (an event in the JSON format) as the SDK decodes
    it, or the SDK's error saying why it is not an event."""
    try:
        if (isinstance(element, dict) and element.keys() >= REQUIRED_ATTRIBUTES
                and "data_base64" not in element):
            # Attributes and a JSON `data`: the SDK's dict form as it is, no JSON round trip.
            return from_dict(element)
        # Base64 data, or something the SDK's JSON-format reader should refuse and explain.
        return from_json(json.dumps(element))
    except CloudEventError as exc:
        return exc


def run_events(events: list[tuple[str, Any]]) -> list[tuple[int, str]]:
    """(HTTP status, detail) for each (event id, data): 200 recorded, 400 never
    processable, 503 to deliver again later (every event of the batch, then)."""
    answers: list[tuple[int, str] | None] = [None] * len(events)
    messages, where = [], []
    for i, (event_id, data) in enumerate(events):
        try:
            messages.append(parse_message(data))
            where.append(i)
        except PoisonMessage as exc:
            log.error("poison record %s: %s", event_id, exc)
            answers[i] = (400, str(exc))
    try:
        outcomes = clients.processor().handle_batch(messages) if messages else []
    except ServiceUnavailable as exc:
        log.warning("%d record(s) not processed, %s", len(messages), exc)
        outcomes = [exc] * len(messages)
    for i, outcome in zip(where, outcomes, strict=True):
        if isinstance(outcome, PoisonMessage):
            log.error("poison record %s: %s", events[i][0], outcome)
            answers[i] = (400, str(outcome))
        elif isinstance(outcome, ServiceUnavailable):
            answers[i] = (503, str(outcome))
        else:
            answers[i] = (200, outcome.outcome)
    return [a for a in answers if a is not None]


def run_event(event_id: str, data: Any) -> tuple[int, str]:
    return run_events([(event_id, data)])[0]


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
    elements = request.get_json(silent=True)
    if not isinstance(elements, list):
        return problem(ApiError(400, "Not a CloudEvents batch",
                                "the body must be a JSON array of structured events"))
    events = [decode_event(element) for element in elements]
    answers = iter(run_events([(event["id"], event.data) for event in events
                               if isinstance(event, CloudEvent)]))
    results = []
    for element, event in zip(elements, events, strict=True):
        if isinstance(event, CloudEvent):
            status, detail = next(answers)
            results.append({"id": event["id"], "status": status, "detail": detail})
        else:
            log.error("batch element is not a CloudEvent: %s", event)
            results.append({"id": element.get("id") if isinstance(element, dict) else None,
                            "status": 400, "detail": f"not a CloudEvent: {event}"})
    return json_response({"results": results})
