"""`GET /jobs/{id}/events`: a job's documents as server-sent events, answered by the gateway.

Where changes come from: every state change's cache write (`common.cache`) announces the
job's new document on Redis, a final one (COMPLETED, CANCELLED) on FINAL_CHANNEL, any other
on the job's own channel `jobs:changes:<id>`. Each gateway process keeps one Redis
connection (`Announcements`) subscribed to FINAL_CHANNEL always, and to a job's channel
while a stream of that job is open here, and hands each document to those streams. An
announcement can be lost (Redis down or restarted, a write that never reached the cache),
so each stream also re-reads its job from the status function every
JOBS_EVENTS_POLL_SECONDS, once right after it subscribed (a change between the first read
and the subscription), and sends only documents newer (by `version`) than the last it sent.

A stream ends after a document in END_STATES: COMPLETED, CANCELLED and DEAD_LETTER. Only
an operator's replay leaves a DEAD_LETTER job, or a job CANCELLED by its parent's failure
(the parent replayed with its dependents): a new run, that a new stream can follow. A
stream also ends when the job disappears (retention) or the token stops being accepted,
and when the client goes (sse-starlette watches for the disconnect and cancels the
stream's task) or the server shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from common import metrics
from common.cache import CHANGES_PREFIX, FINAL_CHANNEL, FINAL_STATES
from common.errors import ApiError
from common.settings import Settings

log = logging.getLogger("gateway.events")

#: A stream ends after a document in one of these states.
END_STATES = FINAL_STATES | {"DEAD_LETTER"}
QUEUE_SIZE = 64  # documents waiting for a slow client; past that the next read catches up
SEND_TIMEOUT = 30.0  # a client that takes no bytes for this long is dropped

#: (status, body, headers) of `GET /jobs/{id}` as the status function answered it.
JobRead = tuple[int, bytes, dict[str, str]]


class Announcements:
    """The cache's announcements, handed to the streams watching each job."""

    def __init__(self, redis_url: str, on_final: Callable[[str, bytes], None]) -> None:
        self.redis_url = redis_url
        self.on_final = on_final  # every final document, watched or not (gateway memory)
        self._watchers: dict[str, set[asyncio.Queue[bytes]]] = {}
        self._pubsub: Any = None  # while connected
        self._leaving: set[asyncio.Task[None]] = set()  # unsubscribes under way

    async def run(self) -> None:
        """Listen until cancelled; reconnect (and subscribe again) after any trouble."""
        delay = 0.5
        while True:
            client = aioredis.from_url(self.redis_url)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(FINAL_CHANNEL,
                                           *(CHANGES_PREFIX + j for j in self._watchers))
                    self._pubsub, delay = pubsub, 0.5
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._deliver(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or restarted: the streams' reads go on
                log.info("cache announcements interrupted (%s); retrying", exc)
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _deliver(self, channel: bytes, data: bytes) -> None:
        if channel == FINAL_CHANNEL.encode():
            raw_id, _, doc = data.partition(b" ")
            job_id = raw_id.decode()
            self.on_final(job_id, doc)
        else:
            job_id, doc = channel.decode()[len(CHANGES_PREFIX):], data
        for queue in self._watchers.get(job_id, ()):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(doc)

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[asyncio.Queue[bytes]]:
        """A queue of the job's announced documents, subscribed while the block runs."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_SIZE)
        watchers = self._watchers.setdefault(job_id, set())
        first = not watchers
        watchers.add(queue)
        try:
            if first:
                await self._command("subscribe", job_id)
            yield queue
        finally:
            watchers.discard(queue)
            if not watchers and self._watchers.get(job_id) is watchers:
                del self._watchers[job_id]
                # A task of its own: this block often ends by cancellation (the client
                # left), which an await here could be cut short by.
                task = asyncio.get_running_loop().create_task(
                    self._command("unsubscribe", job_id))
                self._leaving.add(task)
                task.add_done_callback(self._leaving.discard)

    async def _command(self, name: str, job_id: str) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return  # not connected: `run` subscribes to every watched job when it is
        if name == "unsubscribe" and job_id in self._watchers:
            return  # a new stream of the job came meanwhile
        try:
            await getattr(pubsub, name)(CHANGES_PREFIX + job_id)
        except Exception as exc:  # the listener reconnects; the stream reads meanwhile
            log.info("could not %s to job %s's announcements: %s", name, job_id, exc)

    def watched(self) -> int:
        return len(self._watchers)


class _EventStream(EventSourceResponse):
    """sse-starlette's response; a client that stops reading just ends its stream."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info("dropped an event stream whose client took nothing for %gs",
                     SEND_TIMEOUT)


class JobEvents:
    """Answers `GET /jobs/{id}/events`; a `503` once `events_max_streams` are open (a
    stream counts from its first event, so a burst of opens can pass the limit by the few
    still starting; 0 turns streams off)."""

    def __init__(self, settings: Settings, read_job: Callable[[str, str | None],
                                                             Awaitable[JobRead]],
                 remembered: Callable[[str], bytes | None],
                 on_final: Callable[[str, bytes], None]) -> None:
        self.read_job = read_job  # GET /jobs/{id} from the status function, this token
        self.remembered = remembered  # a final document this process keeps, if any
        self.announcements = Announcements(settings.redis_url, on_final)
        self.max_streams = settings.events_max_streams
        self.poll_seconds = settings.events_poll_seconds
        self.heartbeat_seconds = settings.events_heartbeat_seconds
        self.open = 0

    async def answer(self, request: Request) -> Response:
        """The stream, or an error answer before any stream starts (400, 404, 503)."""
        if self.open >= self.max_streams:
            raise ApiError(503, "Too many event streams",
                           f"this gateway process has {self.open} event streams open, its"
                           " limit (JOBS_EVENTS_MAX_STREAMS); poll GET /jobs/{id} meanwhile",
                           headers={"Retry-After": "5"})
        job_id = request.path_params["job_id"]
        authorization = request.headers.get("authorization")
        first = self.remembered(job_id)
        if first is None:
            status, body, headers = await self.read_job(job_id, authorization)
            if status != 200:  # 400 not a UUID, 404 no such job, 503...: as the function said
                return Response(_instance(body, request.url.path), status_code=status,
                                headers=headers)
            first = body
        doc = json.loads(first)
        last_seen = _last_event_id(request)
        if doc["version"] <= last_seen and doc["status"] in END_STATES:
            return Response(status_code=204)  # the client has the last document already
        return _EventStream(self._stream(doc["job_id"], doc, last_seen, authorization),
                            ping=self.heartbeat_seconds, send_timeout=SEND_TIMEOUT)

    async def _stream(self, job_id: str, doc: dict[str, Any], last_seen: int,
                      authorization: str | None) -> AsyncIterator[ServerSentEvent]:
        self.open += 1
        metrics.EVENT_STREAMS.inc()
        try:
            if doc["version"] > last_seen:
                last_seen = doc["version"]
                yield _event(doc)
            if doc["status"] in END_STATES:
                return
            loop = asyncio.get_running_loop()
            async with self.announcements.watch(job_id) as queue:
                next_read = loop.time()  # at once: a change before the subscription
                while True:
                    wait = next_read - loop.time()
                    if wait > 0:
                        try:
                            raw = await asyncio.wait_for(queue.get(), wait)
                        except TimeoutError:
                            continue
                    else:
                        next_read = loop.time() + self.poll_seconds
                        raw = await self._read(job_id, authorization)
                        if raw is None:
                            continue
                    doc = json.loads(raw)
                    if doc["version"] <= last_seen:
                        continue
                    last_seen = doc["version"]
                    yield _event(doc)
                    if doc["status"] in END_STATES:
                        return
        except _Gone:
            return
        finally:
            self.open -= 1
            metrics.EVENT_STREAMS.dec()

    async def _read(self, job_id: str, authorization: str | None) -> bytes | None:
        """The job as the status function has it now; None if it cannot say just now."""
        try:
            status, body, _ = await self.read_job(job_id, authorization)
        except ApiError as exc:  # the status function does not answer: the next read may
            log.info("event stream of job %s: cannot read it now (%s)", job_id, exc.detail)
            return None
        if status in (401, 403, 404):
            raise _Gone  # the token was revoked meanwhile, or the job deleted (retention)
        return body if status == 200 else None


class _Gone(Exception):
    """The stream's job, or its reader's right to it, is gone: the stream ends."""


def _event(doc: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(doc, separators=(",", ":")), id=str(doc["version"]))


def _last_event_id(request: Request) -> int:
    """The version a reconnecting client already has (Last-Event-ID), else -1."""
    value = request.headers.get("last-event-id", "").strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else -1


def _instance(body: bytes, path: str) -> bytes:
    """The status function's problem document about the job, naming the events URL that
    was asked for (not the GET /jobs/{id} made for it); any other body as it came."""
    try:
        problem = json.loads(body)
    except ValueError:
        return body
    if not isinstance(problem, dict) or "instance" not in problem:
        return body
    return json.dumps({**problem, "instance": path}).encode()
