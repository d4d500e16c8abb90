"""The public front of the local gateway: a small asyncio HTTP/1.1 reverse proxy.

It answers `GET /jobs/{id}` itself when it can (the hot path of every client that polls),
sends the API's other routes straight to their function, and everything else (OpenAPI,
Swagger UI, dashboard, health, metrics, errors for unknown routes) to the gateway app
(`infra.gateway`, Flask). In a deployment an ingress plays this part.

A job document is looked up in two tiers: this process's memory, which only ever holds
documents of jobs in a final state (COMPLETED, CANCELLED: no transition leaves them, so
such a document can never change), then the Redis cache. A miss, a job in any other
state, or any Redis trouble goes to the `status` function, which reads PostgreSQL.

Run: python -m infra.edge --port 8080 --app URL --submit URL --status URL [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import httptools

from common.cache import FINAL_CHANNEL, FINAL_STATES, cache_key
from common.settings import get_settings
from infra.gateway import COMPILED

log = logging.getLogger("edge")

JOB_URL = re.compile(rb"/jobs/[0-9a-fA-F-]{36}\Z")  # a job document, no query string
MEMORY_ITEMS = 20_000  # final documents kept per process (a few KB each at most)
UPSTREAM_IDLE = 1.0  # seconds: reuse an upstream connection only if idle less (gunicorn: 2 s)
IDLE_UPSTREAM_CONNECTIONS = 32
UPSTREAM_TIMEOUT = 60.0  # seconds without a byte from an upstream before giving up
DROPPED_HEADERS = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                   b"te", b"trailer", b"upgrade", b"expect", b"content-length", b"host"}


def problem(status: int, title: str, detail: str, *, close: bool = False,
            headers: dict[str, str] | None = None) -> bytes:
    """A complete problem+json response."""
    body = json.dumps({"type": "about:blank", "title": title, "status": status,
                       "detail": detail}).encode()
    lines = [f"HTTP/1.1 {status} {title}", "Content-Type: application/problem+json",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def json_response(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(body)) + body


class Request:
    __slots__ = ("method", "url", "headers", "body", "too_large", "keep_alive")

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.too_large = False
        self.keep_alive = True


class RedisReader:
    """HGET over one pipelined connection: the edge's only Redis command, without a client
    library's per-call overhead. Any error or timeout drops the connection (a reply that
    comes late could otherwise answer the wrong request); the next call reconnects."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 6379
        self.password = parts.password
        self.db = int(parts.path.strip("/") or 0)
        self.timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._pending: collections.deque[asyncio.Future[bytes | None]] = collections.deque()
        self._connecting = asyncio.Lock()

    @staticmethod
    def command(*args: bytes) -> bytes:
        return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is not None:
                return self._writer
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout)
            setup = []
            if self.password:
                setup.append(self.command(b"AUTH", self.password.encode()))
            if self.db:
                setup.append(self.command(b"SELECT", str(self.db).encode()))
            for command in setup:
                writer.write(command)
                reply = await asyncio.wait_for(reader.readline(), self.timeout)
                if not reply.startswith(b"+"):
                    writer.close()
                    raise OSError(f"redis refused the connection setup: {reply[:100]!r}")
            self._writer = writer
            asyncio.get_running_loop().create_task(self._read_replies(reader, writer))
            return writer

    async def _read_replies(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    raise OSError("redis closed the connection")
                if line[:1] == b"$":
                    size = int(line[1:])
                    value = None if size < 0 else (await reader.readexactly(size + 2))[:-2]
                    result: BaseException | bytes | None = value
                elif line[:1] == b"-":
                    result = OSError(line[1:].strip().decode(errors="replace"))
                else:
                    result = OSError(f"unexpected redis reply {line[:50]!r}")
                future = self._pending.popleft()
                if not future.done():
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        except Exception as exc:
            self._drop(writer, exc)

    def _drop(self, writer: asyncio.StreamWriter, exc: BaseException) -> None:
        if self._writer is writer:
            self._writer = None
        writer.close()
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(OSError(f"redis connection lost: {exc}"))

    async def hget(self, key: str, field: str) -> bytes | None:
        writer = self._writer or await self._connect()
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        writer.write(self.command(b"HGET", key.encode(), field.encode()))
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            self._drop(writer, TimeoutError("no reply in time"))
            raise


class Documents:
    """The two lookup tiers of job documents: final ones in memory, then Redis.

    The memory learns a final document from the first lookup that finds it in Redis, and
    ahead of any lookup from the cache's announcements of final documents (FINAL_CHANNEL,
    published by the same script call that stores them); a missed announcement only
    means that lookup goes to Redis."""

    def __init__(self, redis_url: str, timeout: float = 0.5, cooldown: float = 2.0) -> None:
        self.redis = RedisReader(redis_url, timeout)
        self.memory: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.cooldown = cooldown
        self._down_until = 0.0

    async def get(self, job_id: str) -> bytes | None:
        doc = self.memory.get(job_id)
        if doc is not None:
            return doc
        if time.monotonic() < self._down_until:
            return None
        try:
            doc = await self.redis.hget(cache_key(job_id), "doc")
        except (OSError, TimeoutError, ValueError) as exc:  # the status function answers
            log.warning("redis lookup failed (%s); going to the status function", exc)
            self._down_until = time.monotonic() + self.cooldown
            return None
        if doc is not None and _status(doc) in FINAL_STATES:
            self.remember(job_id, doc)
        return doc

    def remember(self, job_id: str, doc: bytes) -> None:
        self.memory[job_id] = doc
        if len(self.memory) > MEMORY_ITEMS:
            self.memory.popitem(last=False)

    async def listen(self) -> None:
        """Keep the memory fed from FINAL_CHANNEL, reconnecting after any trouble."""
        reader = self.redis  # its address and password; the subscription is a connection
        while True:
            writer = None
            try:
                stream, writer = await asyncio.open_connection(reader.host, reader.port)
                if reader.password:
                    writer.write(reader.command(b"AUTH", reader.password.encode()))
                    if not (await stream.readline()).startswith(b"+"):
                        raise OSError("redis refused AUTH")
                writer.write(reader.command(b"SUBSCRIBE", FINAL_CHANNEL.encode()))
                while True:
                    message = [await _bulk(stream) for _ in range(_array_size(
                        await stream.readline()))]
                    if len(message) == 3 and message[0] == b"message" and message[2]:
                        job_id, _, doc = message[2].partition(b" ")
                        self.remember(job_id.decode(), doc)
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                log.warning("final-document announcements interrupted (%s); resubscribing",
                            exc)
            finally:
                if writer is not None:
                    writer.close()
            await asyncio.sleep(1.0)


def _array_size(line: bytes) -> int:
    if not line.startswith(b"*"):
        raise ValueError(f"unexpected redis reply {line[:50]!r}")
    return int(line[1:])


async def _bulk(stream: asyncio.StreamReader) -> bytes:
    line = await stream.readline()
    if line.startswith(b"$"):
        size = int(line[1:])
        return b"" if size < 0 else (await stream.readexactly(size + 2))[:-2]
    if line.startswith(b":"):
        return line[1:].strip()
    raise ValueError(f"unexpected redis reply {line[:50]!r}")


def _status(doc: bytes) -> str | None:
    try:
        value = json.loads(doc)
    except ValueError:
        return None
    return value.get("status") if isinstance(value, dict) else None


class PartlyAnswered(Exception):
    """The upstream failed after part of its response went to the client."""


class Upstream:
    """Keep-alive connections to one upstream server."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.name = url
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self.idle:
            reader, writer, since = self.idle.pop()
            if time.monotonic() - since < UPSTREAM_IDLE and not reader.at_eof():
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self.host, self.port)

    def release(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.idle) >= IDLE_UPSTREAM_CONNECTIONS:
            writer.close()  # after a burst: keep a few, not one per request that was in flight
            return
        self.idle.append((reader, writer, time.monotonic()))


class ResponseReader:
    """httptools callbacks that tell when an upstream response is complete."""

    def __init__(self) -> None:
        self.complete = False
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it after the body

    def on_message_complete(self) -> None:
        self.complete = True


class Edge:
    def __init__(self, upstreams: dict[str, str], app_url: str, redis_url: str,
                 max_body: int) -> None:
        self.hits = 0  # lookups answered here; added to the shared counter now and then
        self.upstreams = {name: Upstream(url) for name, url in upstreams.items()}
        self.app = Upstream(app_url)
        self.documents = Documents(redis_url)
        self.max_body = max_body

    def remembered(self, request: Request) -> bytes | None:
        """The document of a final job this process holds in memory, if that is asked."""
        if request.method != b"GET" or not JOB_URL.match(request.url):
            return None
        doc = self.documents.memory.get(request.url[len(b"/jobs/"):].decode().lower())
        if doc is not None:
            self.hits += 1
        return doc

    def route(self, method: bytes, path: str) -> Upstream:
        wanted = "GET" if method == b"HEAD" else method.decode("latin-1")
        for route_method, pattern, name in COMPILED:
            if route_method == wanted and pattern.match(path):
                return self.upstreams[name]
        return self.app  # its own pages, and the 404/405 answers for everything else

    async def answer(self, request: Request, conn: ClientConnection) -> bool:
        """Send the response to `request`; False if the connection must close after it."""
        if request.too_large:
            conn.write(problem(413, "Body too large", f"request body exceeds {self.max_body}"
                               " bytes", close=True))
            return False
        if request.method == b"GET" and JOB_URL.match(request.url):
            doc = await self.documents.get(request.url[len(b"/jobs/"):].decode().lower())
            if doc is not None:
                conn.write(json_response(doc))
                self.hits += 1
                return request.keep_alive
        path = (httptools.parse_url(request.url).path or b"/").decode("latin-1")
        return await self.proxy(self.route(request.method, path), request, conn)

    async def proxy(self, upstream: Upstream, request: Request, conn: ClientConnection) -> bool:
        head = [b"%s %s HTTP/1.1\r\nHost: %s:%d\r\n" % (
            request.method, request.url, upstream.host.encode(), upstream.port)]
        head += [b"%s: %s\r\n" % (k, v) for k, v in request.headers
                 if k.lower() not in DROPPED_HEADERS]
        if request.body or request.method in (b"POST", b"PUT", b"PATCH"):
            head.append(b"Content-Length: %d\r\n" % len(request.body))
        data = b"".join(head) + b"\r\n" + bytes(request.body)
        idempotent = request.method in (b"GET", b"HEAD")
        for attempt in (1, 2):
            try:
                reader, writer = await upstream.connection()
            except OSError as exc:
                log.warning("%s unreachable: %s", upstream.name, exc)
                conn.write(problem(503, "Service unavailable", "the upstream function is not"
                                   " answering", headers={"Retry-After": "2"}))
                return request.keep_alive
            try:
                writer.write(data)
                sent = await self._relay(reader, writer, upstream, request, conn)
            except PartlyAnswered as exc:
                writer.close()
                log.warning("%s broke off its answer: %s", upstream.name, exc)
                return False  # the client sees a short response and must reconnect
            except (OSError, asyncio.IncompleteReadError, httptools.HttpParserError,
                    TimeoutError) as exc:
                writer.close()
                if attempt == 1 and idempotent:
                    continue  # a kept-alive connection closed under us: once more, fresh
                log.warning("%s failed: %s", upstream.name, exc)
                conn.write(problem(502, "Bad gateway", "the upstream function failed to"
                                   " answer", headers={"Retry-After": "2"}))
                return request.keep_alive
            return sent and request.keep_alive
        return False

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     upstream: Upstream, request: Request, conn: ClientConnection) -> bool:
        """Copy one response from upstream to the client; True if both may be reused."""
        if request.method == b"HEAD":
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), UPSTREAM_TIMEOUT)
            conn.write(head)
            writer.close()
            return b"connection: close" not in head.lower()
        response = ResponseReader()
        answered = False
        while not response.complete:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), UPSTREAM_TIMEOUT)
                if not chunk:
                    raise OSError("upstream closed the connection")
                response.parser.feed_data(chunk)
            except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                if answered:
                    raise PartlyAnswered(str(exc)) from exc
                raise
            conn.write(chunk)
            answered = True
            await conn.drained()
        if response.keep_alive:
            upstream.release(reader, writer)
            return True
        writer.close()
        return False


class ClientConnection(asyncio.Protocol):
    """One client connection: requests are parsed as they arrive and answered in order."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.current = Request()
        self.header_name = b""
        self.queue: collections.deque[Request] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = False
        self.refused = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                          socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # a body we refused: what follows is not read, the connection closes
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "Upgrade is not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writable.set()
        if self.worker is not None:
            self.worker.cancel()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # -- httptools callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = Request()

    def on_url(self, url: bytes) -> None:
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.current
        request.method = self.parser.get_method()
        request.keep_alive = self.parser.should_keep_alive()
        if request.method in (b"GET", b"HEAD"):
            return  # no body expected (one sent anyway is still held to the limit)
        length = next((v for k, v in request.headers if k.lower() == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.edge.max_body:
            request.too_large = True  # answered now, without waiting for the body
            self.refused = True
            self._enqueue(request)
        elif any(k.lower() == b"expect" and v.lower() == b"100-continue"
                 for k, v in request.headers) and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if not self.current.too_large:
            self.current.body += body
            if len(self.current.body) > self.edge.max_body:
                self.current.too_large = True
                self.current.body = bytearray()

    def on_message_complete(self) -> None:
        if self.refused:
            return
        request = self.current
        if not self.queue and (self.worker is None or self.worker.done()):
            # The hot path, answered at once when nothing is ahead of it: a final job's
            # document this process remembers (no task, no await).
            doc = self.edge.remembered(request)
            if doc is not None:
                self.write(json_response(doc))
                if not request.keep_alive:
                    self._close()
                return
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        self.queue.append(request)
        if len(self.queue) > 8 and self.transport is not None:
            self.transport.pause_reading()  # a client pipelining faster than we answer
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._serve())

    # -- answering --------------------------------------------------------------------

    async def _serve(self) -> None:
        while self.queue and not self.closed:
            request = self.queue.popleft()
            try:
                keep = await self.edge.answer(request, self)
            except Exception:
                log.exception("error answering %s %s", request.method, request.url[:200])
                self.write(problem(500, "Internal error", "the gateway failed to answer",
                                   close=True))
                keep = False
            if not keep:
                self._close()
                return
            if self.transport is not None and len(self.queue) <= 8:
                self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    async def drained(self) -> None:
        await self.writable.wait()

    def _fail(self, status: int, detail: str) -> None:
        self.write(problem(status, "Bad request", detail, close=True))
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


def serve(sock: socket.socket, edge_args: dict[str, Any]) -> None:
    """One worker: an event loop (uvloop when installed) serving the shared socket."""
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    from common import metrics  # after the fork: each worker counts in its own file

    counter = metrics.STATUS_LOOKUPS.labels("cache")

    async def main() -> None:
        edge = Edge(**edge_args)
        loop = asyncio.get_running_loop()

        def count_hits() -> None:  # a shared-memory counter costs too much per lookup
            hits, edge.hits = edge.hits, 0
            if hits:
                counter.inc(hits)
            loop.call_later(1.0, count_hits)

        count_hits()
        listener = loop.create_task(edge.documents.listen())
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await loop.create_server(lambda: ClientConnection(edge), sock=sock,
                                          backlog=1024)
        async with server:
            await stop.wait()
        listener.cancel()
        hits, edge.hits = edge.hits, 0
        counter.inc(hits)

    asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--app", required=True, help="URL of the gateway app (infra.gateway)")
    parser.add_argument("--submit", default=os.environ.get("JOBS_SUBMIT_URL"), required=False)
    parser.add_argument("--status", default=os.environ.get("JOBS_STATUS_URL"), required=False)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s edge[%(process)d] %(message)s")
    settings = get_settings()
    edge_args = {"upstreams": {"submit": args.submit, "status": args.status},
                 "app_url": args.app, "redis_url": settings.redis_url,
                 "max_body": settings.max_body_bytes}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(1024)
    sock.setblocking(False)
    children = []
    for _ in range(max(1, args.workers)):
        pid = os.fork()
        if pid == 0:
            try:
                serve(sock, edge_args)
            finally:
                os._exit(0)
        children.append(pid)
    sock.close()

    def forward(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # One worker gone means something is wrong: stop them all, the supervisor restarts us.
    pid, status = os.wait()
    forward(signal.SIGTERM, None)
    for child in children:
        if child != pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, 0)
    sys.exit(0 if os.waitstatus_to_exitcode(status) == 0 else 1)


if __name__ == "__main__":
    main()
