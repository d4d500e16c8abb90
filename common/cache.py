"""Redis status cache: versioned entries, short timeouts, and a breaker for a sick Redis."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.models import shown_url

log = logging.getLogger(__name__)

KEY_PREFIX = "jobs:status:"
FINAL_CHANNEL = "jobs:final"
# Each job's other documents are announced on a channel of its own, "jobs:changes:<id>":
# only the processes that watch that job (the gateway's event streams) receive them.
CHANGES_PREFIX = "jobs:changes:"
# States no transition leaves (see common.lifecycle.TRANSITIONS): their documents never
# change, so a reader may keep them.
FINAL_STATES = frozenset({"COMPLETED", "CANCELLED"})


def is_final(doc: dict[str, Any]) -> bool:
    """Whether a job document can never change again: COMPLETED, or CANCELLED other than
    by a parent's failure (a job cancelled by its parent comes back when that parent is
    replayed with its dependents, see `common.dependencies`)."""
    return doc.get("status") in FINAL_STATES and not doc.get("cancelled_by")


# What a script call does with each document (ARGV[3i+1]).
STORE, FINAL, ANNOUNCE = "0", "1", "a"

# Write only if the cached version is older: a late writer can never overwrite a newer
# state, whatever order the functions' writes arrive in.
# Many documents per call (KEYS[i] takes ARGV[3i-1] as version, ARGV[3i] as document and
# ARGV[3i+1] as its mode; ARGV[1] is the TTL): one command for a batch.
# FINAL: stored, and announced on FINAL_CHANNEL as "<job id> <document>": it never changes
# again, so readers may keep it (the gateway's front does). STORE: stored and announced on
# the job's own channel. ANNOUNCE: only announced on the job's own channel, and only if
# newer than the stored document (a late IN_PROGRESS after the COMPLETED is not).
_PUT_IF_NEWER = """
local written = 0
for i, key in ipairs(KEYS) do
  local version = tonumber(ARGV[3 * i - 1])
  local mode = ARGV[3 * i + 1]
  local current = redis.call('HGET', key, 'v')
  if not current or tonumber(current) < version then
    local job_id = string.sub(key, """ + str(len(KEY_PREFIX) + 1) + """)
    if mode ~= '""" + ANNOUNCE + """' then
      redis.call('HSET', key, 'v', ARGV[3 * i - 1], 'doc', ARGV[3 * i])
      redis.call('EXPIRE', key, ARGV[1])
    end
    if mode == '""" + FINAL + """' then
      redis.call('PUBLISH', '""" + FINAL_CHANNEL + """', job_id .. ' ' .. ARGV[3 * i])
    else
      redis.call('PUBLISH', '""" + CHANGES_PREFIX + """' .. job_id, ARGV[3 * i])
    end
    written = written + 1
  end
end
return written
"""
# Documents per script call. One: each call then touches one key, so one hash slot, as
# Redis Cluster requires of a script (a multi-key call would be CROSSSLOT there); the
# calls still go in one pipelined round trip.
PUT_CHUNK = 1


def cache_key(job_id: str) -> str:
    return f"{KEY_PREFIX}{job_id}"


class StatusCache:
    """Job documents by id. Every failure is swallowed: PostgreSQL stays the answer.

    After an error the cache is skipped for `cooldown` seconds, so a hanging Redis
    costs one timeout per cooldown instead of one per request.
    """

    def __init__(self, url: str, *, timeout: float = 0.5, ttl: int = 7 * 24 * 3600,
                 cooldown: float = 2.0) -> None:
        self.ttl = ttl
        self.cooldown = cooldown
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=0,
            # One immediate retry absorbs a scheduling hiccup on a busy machine; redis-py's
            # default (3 retries with backoff) would stall a caller for seconds on a hung
            # server. After that a write is queued for repair and a read falls back.
            retry=Retry(NoBackoff(), 1),
        )
        self._put = self._client.register_script(_PUT_IF_NEWER)
        self._down_until = 0.0
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _trip(self, exc: Exception) -> None:
        with self._lock:
            if self.available:
                log.warning("redis unavailable, serving from PostgreSQL: %s", exc)
            self._down_until = time.monotonic() + self.cooldown

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The cached document, or None on a miss or any Redis trouble."""
        if not self.available:
            return None
        try:
            raw = self._client.hget(cache_key(job_id), "doc")
        except redis.RedisError as exc:
            self._trip(exc)
            return None
        if raw is None:
            return None
        doc: dict[str, Any] = json.loads(raw)  # type: ignore[arg-type]
        if doc.get("callback_url"):  # cached before URLs were shown by origin only
            doc["callback_url"] = shown_url(doc["callback_url"])
        return doc

    def put(self, documents: Iterable[dict[str, Any]],
            announce: Iterable[dict[str, Any]] = ()) -> bool:
        """Store documents whose version is newer than the cached one, and announce the
        documents of `announce` (not stored) to their jobs' watchers, in one round trip;
        False if Redis failed (or there was nothing to store)."""
        docs = [(doc, FINAL if is_final(doc) else STORE)
                for doc in documents]
        docs += [(doc, ANNOUNCE) for doc in announce]
        if not docs or not self.available:
            return False
        try:
            try:
                self._put_all(docs)
            except redis.exceptions.NoScriptError:
                self._client.script_load(_PUT_IF_NEWER)  # Redis restarted: scripts are gone
                self._put_all(docs)
            return any(mode != ANNOUNCE for _, mode in docs)
        except redis.RedisError as exc:
            self._trip(exc)
            return False

    def _put_all(self, docs: list[tuple[dict[str, Any], str]]) -> None:
        # EVALSHA in a plain pipeline: one round trip (redis-py's Script objects would add
        # a SCRIPT EXISTS round trip to every pipeline).
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(docs), PUT_CHUNK):
            chunk = docs[start:start + PUT_CHUNK]
            args: list[Any] = [self.ttl]
            for doc, mode in chunk:
                args += (int(doc["version"]), json.dumps(doc, default=str), mode)
            pipe.evalsha(self._put.sha, len(chunk),
                         *[cache_key(str(doc["job_id"])) for doc, _ in chunk], *args)
        for result in pipe.execute(raise_on_error=False):
            if isinstance(result, Exception):
                raise result

    def forget(self, job_ids: Iterable[str]) -> bool:
        """Drop these jobs' documents (deleted jobs); False if Redis failed. One key per
        command, pipelined."""
        ids = list(job_ids)
        if not ids or not self.available:
            return not ids
        try:
            pipe = self._client.pipeline(transaction=False)
            for job_id in ids:
                pipe.delete(cache_key(job_id))
            pipe.execute()
            return True
        except redis.RedisError as exc:
            self._trip(exc)
            return False

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False


_caches: dict[str, StatusCache] = {}
_caches_lock = threading.Lock()


def get_cache(url: str, timeout: float = 0.5, ttl: int = 7 * 24 * 3600) -> StatusCache:
    """The process-wide cache client for `url`, created on first use (no I/O here)."""
    with _caches_lock:
        cache = _caches.get(url)
        if cache is None:
            cache = _caches[url] = StatusCache(url, timeout=timeout, ttl=ttl)
        return cache
