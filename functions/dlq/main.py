"""`dlq`: record each `job-dlq` CloudEvent as a dead letter, once, and log it."""

import base64
import logging
import uuid
from typing import Any

import flask
import functions_framework
from cloudevents.http import CloudEvent

from common import clients, metrics
from common.deadletters import insert_dead_letter
from common.errors import ApiError, ServiceUnavailable
from common.http import problem
from common.logs import configure_logging
from common.queue import DEAD_LETTER_EVENT_TYPE

configure_logging("dlq")
clients.needs("database_url")

log = logging.getLogger(__name__)


def letter_from_event(event: CloudEvent) -> dict[str, Any]:
    """A dead letter from either a job dead-lettered by `process` or a record the trigger
    could not deliver (Knative's knativeerror* extensions say why)."""
    data = event.data if isinstance(event.data, dict) else {}
    if event["type"] == DEAD_LETTER_EVENT_TYPE and data.get("dead_letter_id"):
        return data
    code = event.get("knativeerrorcode", "?")
    detail = event.get("knativeerrordata", "")
    try:
        detail = base64.b64decode(detail).decode(errors="replace") if detail else ""
    except ValueError:
        pass
    job_id = data.get("job_id") if isinstance(data.get("job_id"), str) else None
    return {
        # partition/offset ids repeat after a broker restart; the record's time tells them apart
        "dead_letter_id": f"record:{event['source']}:{event['id']}:{event.get('time', '')}",
        "job_id": job_id if job_id and _is_uuid(job_id) else None,
        "job_type": data.get("job_type") if isinstance(data.get("job_type"), str) else None,
        "reason": f"undeliverable record (HTTP {code})",
        "last_error": str(detail)[:4000] or None,
        "attempts": 0,
        "history": [],
    }


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
        return True
    except ValueError:
        return False


# A job in one of these states is not dead: a record about it that the trigger could not
# deliver (an outage longer than a KafkaSource's retries) is the sweeper's to publish again.
STILL_WAITING = ("QUEUED", "RETRYING", "IN_PROGRESS")


@functions_framework.cloud_event
def record_dead_letter(event: CloudEvent) -> None:
    letter = letter_from_event(event)
    undeliverable = event["type"] != DEAD_LETTER_EVENT_TYPE
    try:
        with clients.database().transaction() as conn:
            state = conn.run("SELECT status::text FROM jobs WHERE job_id = CAST(:id AS uuid)",
                             id=letter["job_id"]) if undeliverable and letter["job_id"] else []
            if state and state[0][0] in STILL_WAITING:
                metrics.LEFT_TO_SWEEPER.labels(letter["job_type"] or "?").inc()
                log.warning("job %s: its record was undeliverable (%s) but the job still"
                            " waits; left to the sweeper, not a dead letter",
                            letter["job_id"], letter["reason"])
                return
            if state:  # finished meanwhile (or dead-lettered by process, with its own row)
                log.info("job %s: an undeliverable record of it arrived after it ended %s;"
                         " nothing to record", letter["job_id"], state[0][0])
                return
            new = insert_dead_letter(conn, letter)
    except ServiceUnavailable as exc:
        flask.abort(problem(ApiError(503, "Service unavailable", str(exc),
                                     headers={"Retry-After": str(exc.retry_after)})))
    log.warning("dead letter %s (job %s): %s; %s%s", letter["dead_letter_id"], letter["job_id"],
                letter["reason"], letter["last_error"], "" if new else " [already recorded]")
