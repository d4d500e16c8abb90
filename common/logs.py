"""Structured JSON logs: one object per line, with the job id and attempt when there is one."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

#: Set while a job's attempt runs; every log line in that context carries it.
job_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "job_context", default=None)


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        context = job_context.get()
        if context:
            entry.update(context)
        for key in ("job_id", "attempt", "job_type"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


_configured = False


def configure_logging(component: str) -> None:
    """JSON lines on stderr at JOBS_LOG_LEVEL (INFO); idempotent."""
    global _configured
    if _configured:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(os.environ.get("JOBS_LOG_LEVEL", "INFO").upper())
    _configured = True
