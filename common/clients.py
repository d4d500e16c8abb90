"""Process-wide clients built lazily from settings: no I/O happens at import time."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable

from pydantic import ValidationError

from common import auth, jobs
from common.auth import Authenticator
from common.cache import StatusCache, get_cache
from common.db import Database, GroupCommitter, connect_kwargs, get_database, migrate
from common.handlers import load_handlers
from common.jobs import PublishMarks
from common.processing import Processor
from common.queue import Publisher, get_publisher, queue_topics
from common.settings import (
    MissingSetting,
    Settings,
    describe_error,
    get_settings,
    kafka_client_config,
    require,
)

log = logging.getLogger(__name__)
_ready: set[str] = set()
_lock = threading.RLock()


def settings() -> Settings:
    return get_settings()


def needs(*fields: str) -> None:
    """Refuse to start (SystemExit naming each variable) unless these services are given:
    called by each function as it is loaded, before it answers anything."""
    try:
        require(get_settings(), *fields)
        if "database_url" in fields:
            connect_kwargs(get_settings().database_url)  # a bad parameter stops us here
    except ValidationError as exc:
        raise SystemExit(f"cannot start:\n{describe_error(exc)}") from None
    except (MissingSetting, ValueError, OSError) as exc:
        raise SystemExit(f"cannot start: {exc}") from None


def database() -> Database:
    """The PostgreSQL pool; the schema is migrated on this process's first use."""
    s = get_settings()
    require(s, "database_url")
    db = get_database(s.database_url, size=s.db_pool_size, wait=s.db_pool_wait_seconds)
    if s.database_url not in _ready:
        with _lock:
            if s.database_url not in _ready:
                migrate(db)
                _ready.add(s.database_url)
    return db


_marks: dict[str, PublishMarks] = {}
_writers: dict[str, GroupCommitter] = {}


def writer() -> GroupCommitter:
    """The process-wide group committer: concurrent single statements share a commit."""
    s = get_settings()
    db = database()
    with _lock:
        if s.database_url not in _writers:
            _writers[s.database_url] = GroupCommitter(db)
        return _writers[s.database_url]


def publish_marks() -> PublishMarks:
    """The process-wide background writer of `published_at`."""
    s = get_settings()
    with _lock:
        if s.database_url not in _marks:
            _marks[s.database_url] = PublishMarks(database())
        return _marks[s.database_url]


_authenticators: dict[str, Authenticator] = {}


def authenticator() -> Authenticator:
    """The process-wide bearer-token checker (JOBS_AUTH=off: everyone is anonymous admin)."""
    s = get_settings()
    with _lock:
        if s.database_url not in _authenticators:
            _authenticators[s.database_url] = Authenticator(
                database, enabled=s.auth, cache_seconds=s.auth_cache_seconds)
        return _authenticators[s.database_url]


def cache() -> StatusCache:
    s = get_settings()
    require(s, "redis_url")
    return get_cache(s.redis_url, timeout=s.redis_timeout_seconds, ttl=s.cache_ttl_seconds)


def publisher() -> Publisher:
    s = get_settings()
    require(s, "kafka_bootstrap_servers")
    return get_publisher(s.kafka_bootstrap_servers, timeout=s.publish_timeout_seconds,
                         config=kafka_client_config(s))


def handlers() -> None:
    """Import built-in and user handler modules (JOBS_HANDLER_MODULES) once."""
    load_handlers(get_settings().handler_modules)


def job_topics() -> dict[str, str]:
    """Every job topic (the job queue, then the registered types' own), each with the
    consumer group that delivers it to `process`."""
    settings = get_settings()
    return queue_topics(settings, load_handlers(settings.handler_modules).values())


_processor: Processor | None = None


def processor() -> Processor:
    """The process-wide job processor (handlers loaded, clients shared)."""
    global _processor
    if _processor is None:
        with _lock:
            if _processor is None:
                handlers()
                _processor = Processor(get_settings(), database(), cache(), publisher())
    return _processor


def warm_up_after_fork(*, publish: bool = True, process: bool = False,
                       submit: bool = False) -> None:
    """Build this process's clients in the background in each worker process a server
    forks (`os.register_at_fork`), so that a worker's first request does not pay for its
    connections, its database session's first statements (rehearsed: the token lookup
    where requests carry tokens, and with `submit` an insert rolled back) and the
    broker's metadata. Trouble is only logged, step by step: requests build what they
    need anyway."""
    steps: list[tuple[str, Callable[[], object]]] = [
        ("handlers", handlers), ("database", database), ("cache", lambda: cache().ping())]
    if not process:  # `process` is called by the trigger, without a token
        steps.append(("token lookup", lambda: auth.rehearse(database())))
    if submit:
        steps.append(("insert", lambda: jobs.rehearse_submit(database())))
    if publish:
        steps.append(("broker", lambda: publisher().warm(get_settings().queue_topic)))
    if process:
        steps.append(("processor", processor))

    def warm() -> None:
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                log.info("warm-up: %s not ready (%s); the first request finishes it", name, exc)
        # What exists now lives as long as the process: keep it out of the collector's
        # full passes, which otherwise walk it all and stall requests now and then.
        gc.freeze()

    def start() -> None:
        threading.Thread(target=warm, name="warm-up", daemon=True).start()

    import os

    os.register_at_fork(after_in_child=start)
