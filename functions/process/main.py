"""`process`: run the job named by a `job-queue` CloudEvent and record its outcome."""

import logging

import flask
import functions_framework
from cloudevents.http import CloudEvent

from common import clients
from common.errors import ApiError, ServiceUnavailable
from common.http import problem
from common.logs import configure_logging
from common.processing import PoisonMessage, parse_message

configure_logging("process")

log = logging.getLogger(__name__)


@functions_framework.cloud_event
def process_job(event: CloudEvent) -> None:
    """2xx once the outcome is recorded; 400 for a record no retry can fix; 503 to retry later."""
    try:
        message = parse_message(event.data)
        outcome = clients.processor().handle(message)
    except PoisonMessage as exc:
        log.error("poison record %s: %s", event["id"], exc)
        flask.abort(problem(ApiError(400, "Undeliverable record", str(exc))))
    except ServiceUnavailable as exc:
        log.warning("record %s not processed, %s", event["id"], exc)
        flask.abort(problem(ApiError(503, "Service unavailable", str(exc),
                                     headers={"Retry-After": str(exc.retry_after)})))
    log.info("record %s: job %s %s", event["id"], outcome.job_id, outcome.outcome)
