"""Job-type registry: `@job_handler("TYPE")`, payload models, and user handler modules."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ValidationError

from common.errors import ApiError, PermanentError
from common.ratelimits import RateLimit, parse_rate_limit

log = logging.getLogger(__name__)

BUILTIN_MODULES = ("common.builtin",)
# Kafka's own rule for topic names (its Topic.validate): these characters, 1-249 of them.
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@dataclass
class JobContext:
    """What a handler knows about the attempt it runs in."""

    job_id: UUID
    job_type: str
    attempt: int
    retries: int
    artifact_dir: Path | str  # where write_artifact stores: a folder or an object-store URL
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None
    progress_sink: Callable[[float, str | None], None] | None = field(default=None, repr=False)
    #: job id -> result of each job this one depends on (`depends_on`): all COMPLETED.
    parent_results: dict[str, Any] = field(default_factory=dict)
    _last_progress: float = field(default=0.0, repr=False)

    def should_stop(self) -> bool:
        """True once the attempt was cancelled or its time is up: stop soon, cleanly."""
        return self.cancelled.is_set()

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.cancelled.set()

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report progress (0.0-1.0, and a short message), shown in status, CLI and dashboard.

        Cheap to call often: writes are throttled to a few a second.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress must be between 0 and 1, got {fraction}")
        now = time.monotonic()
        if self.progress_sink is None or (fraction < 1.0 and now - self._last_progress < 0.25):
            return
        self._last_progress = now
        self.progress_sink(fraction, message[:500] if message else None)


@dataclass(frozen=True)
class JobType:
    """A registered job type and its policy (None = the global default)."""

    name: str
    func: Callable[..., Any]
    payload_model: type[BaseModel] | None = None
    max_retries: int | None = None
    timeout_seconds: float | None = None
    backoff_base_seconds: float | None = None
    backoff_max_seconds: float | None = None
    concurrency: int | None = None
    rate_limit: RateLimit | None = None
    topic: str | None = None  # None: the job queue (JOBS_QUEUE_TOPIC)
    description: str = ""
    scope: str | Callable[[dict[str, Any]], str | None] | None = None

    @property
    def limited(self) -> bool:
        """Whether attempts are claimed one at a time, under the type's limits."""
        return bool(self.concurrency or self.rate_limit)

    def run(self, payload: Any, ctx: JobContext) -> Any:
        """Call the handler with the payload, and the context if it takes one."""
        if _takes_context(self.func):
            return self.func(payload, ctx)
        return self.func(payload)

    def parse_payload(self, payload: dict[str, Any]) -> Any:
        """The payload as the handler receives it (a model instance when there is a model)."""
        if self.payload_model is None:
            return payload
        return self.payload_model.model_validate(payload)


@functools.lru_cache(maxsize=1024)
def _takes_context(func: Callable[..., Any]) -> bool:
    return len(inspect.signature(func).parameters) >= 2


_registry: dict[str, JobType] = {}
_loaded: set[str] = set()
_lock = threading.RLock()


def job_handler(
    name: str,
    *,
    payload_model: type[BaseModel] | None = None,
    max_retries: int | None = None,
    timeout_seconds: float | None = None,
    backoff_base_seconds: float | None = None,
    backoff_max_seconds: float | None = None,
    concurrency: int | None = None,
    rate_limit: str | None = None,
    topic: str | None = None,
    scope: str | Callable[[dict[str, Any]], str | None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the handler of job type `name`.

    The function takes `(payload)` or `(payload, ctx)` and returns a JSON-able
    result. Raise `RetryableError` / any exception for a retryable failure,
    `PermanentError` to dead-letter at once. `concurrency` caps how many attempts of
    this type run at once across every worker. `rate_limit` ("100/m": per s, m or h)
    caps how many start per period across every worker, a burst of that many at once;
    a job over it waits for its slot without counting an attempt. `topic` routes the
    type to a Kafka topic of its own, with its own consumers. `scope` is a token scope a
    submitter needs beyond `jobs:submit` (or a function of the validated payload naming one).
    """
    if concurrency is not None and concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    limit = parse_rate_limit(rate_limit) if rate_limit is not None else None
    if topic is not None and (not isinstance(topic, str) or not TOPIC_NAME.match(topic)
                              or topic in (".", "..")):
        raise ValueError("topic must be a Kafka topic name: 1-249 of letters, digits, '.',"
                         f" '_' and '-' (not '.' or '..'), got {topic!r}")
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError(f"job type names are letters, digits, '_', '-' and '.', got {name!r}")

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        with _lock:
            existing = _registry.get(name)
            if existing is not None and existing.func.__qualname__ != func.__qualname__:
                raise ValueError(f"job type {name!r} is already registered by {existing.func!r}")
            _registry[name] = JobType(
                name=name,
                func=func,
                payload_model=payload_model,
                max_retries=max_retries,
                timeout_seconds=timeout_seconds,
                backoff_base_seconds=backoff_base_seconds,
                backoff_max_seconds=backoff_max_seconds,
                concurrency=concurrency,
                rate_limit=limit,
                topic=topic,
                scope=scope,
                description=(inspect.getdoc(func) or "").split("\n\n")[0],
            )
        return func

    return register


def handler_file(spec: str, base: Path | None = None) -> Path | None:
    """The file a JOBS_HANDLER_MODULES entry names (a path ending in .py or holding a "/",
    relative to `base`, else the working directory); None for a dotted module name."""
    spec = spec.strip()
    if not (spec.endswith(".py") or "/" in spec):
        return None
    return ((base or Path.cwd()) / Path(spec).expanduser()).resolve()


def import_handler_module(spec: str) -> None:
    """Import a dotted module path or a path to a .py file, once."""
    spec = spec.strip()
    if not spec or spec in _loaded:
        return
    path = handler_file(spec)
    if path is not None:
        if not path.is_file():
            raise ImportError(f"JOBS_HANDLER_MODULES: no such file {path}")
        name = f"jobs_user_handlers_{abs(hash(str(path)))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"JOBS_HANDLER_MODULES: cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        importlib.import_module(spec)
    _loaded.add(spec)


def load_handlers(handler_modules: str = "") -> dict[str, JobType]:
    """Import the built-in types and every module named in `handler_modules` (comma-separated)."""
    with _lock:
        for spec in (*BUILTIN_MODULES, *handler_modules.split(",")):
            import_handler_module(spec)
        return dict(_registry)


def registered() -> dict[str, JobType]:
    """The job types registered so far."""
    with _lock:
        return dict(_registry)


def get_job_type(name: str) -> JobType | None:
    return _registry.get(name)


def validate_payload(job_type: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Check a submission against the registry; raise ApiError(422) with the reason."""
    jt = _registry.get(job_type)
    if jt is None:
        known = ", ".join(sorted(_registry)) or "none"
        raise ApiError(422, "Unknown job type",
                       f"job_type {job_type!r} is not registered; registered types: {known}")
    if jt.payload_model is None:
        return payload
    try:
        model = jt.payload_model.model_validate(payload)
    except ValidationError as exc:
        raise ApiError(
            422,
            "Invalid payload",
            f"payload does not match the {job_type} payload model: {exc.error_count()} error(s)",
            errors=_json_errors(exc),
        ) from exc
    return model.model_dump(mode="json", exclude_unset=True)


def parse_or_permanent(jt: JobType, payload: dict[str, Any]) -> Any:
    """The handler's payload; a payload that no longer validates is a permanent error."""
    try:
        return jt.parse_payload(payload)
    except ValidationError as exc:
        raise PermanentError(f"payload does not validate: {exc}") from exc


def _json_errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]
