"""Structured JSON logs: one object per line, with the job id and attempt when there is one."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from collections.abc import Mapping
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


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(environ: Mapping[str, str] | None = None) -> str:
    """JOBS_LOG_LEVEL (INFO by default), checked: ValueError naming the choices."""
    environ = os.environ if environ is None else environ
    level = environ.get("JOBS_LOG_LEVEL", "").strip().upper() or "INFO"
    if level not in LEVELS:
        raise ValueError(f"JOBS_LOG_LEVEL must be one of {', '.join(LEVELS)}, not {level!r}")
    return level


def configure_logging(component: str) -> None:
    """JSON lines on stderr at JOBS_LOG_LEVEL (INFO); idempotent."""
    global _configured
    if _configured:
        return
    try:
        level = log_level()
    except ValueError as exc:
        raise SystemExit(f"cannot start: {exc}") from None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    _configured = True
