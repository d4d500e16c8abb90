"""`sweeper`: periodic recovery (Cloud Scheduler / a local ticker POSTs here)."""

import logging

import flask
import functions_framework

from common import clients
from common.errors import ApiError, ServiceUnavailable
from common.http import json_response, problem
from common.logs import configure_logging
from common.sweeper import sweep

log = logging.getLogger(__name__)

configure_logging("sweeper")
clients.needs("database_url", "redis_url", "kafka_bootstrap_servers")


@functions_framework.http
def sweep_jobs(request: flask.Request) -> flask.Response:
    clients.handlers()
    try:
        counts = sweep(clients.database(), clients.cache(), clients.publisher(),
                       clients.settings())
    except ServiceUnavailable as exc:
        log.warning("sweep incomplete: %s", exc)
        return problem(ApiError(503, "Service unavailable", str(exc),
                                headers={"Retry-After": str(exc.retry_after)}))
    return json_response(counts)
