"""The gateway's HTTP/1.1 connections: uvicorn's httptools protocol with a public front's limits.

uvicorn parses with httptools (llhttp) and, in that mode, bounds neither the request target
nor the headers (one 200 MB header grows a worker by that much), never times out a
connection that opens and sends nothing or trickles its headers, answers a request it
cannot parse in text/plain, and closes the connection at once, cutting off the answers still
due to earlier pipelined requests on it (a valid POST followed by garbage ran the job while
its client saw only the 400). This subclass keeps uvicorn's parser and response writer and
adds, from `Settings`:

- a request target longer than `gateway_max_url_bytes`: 414;
- request line and headers together longer than `gateway_max_header_bytes`: 431;
- a request whose headers are not complete `gateway_read_timeout_seconds` after its first
  byte: 408, then close; a connection that opens and sends nothing for that long, a request
  body that stops arriving for that long or is not whole within BODY_TIMEOUTS times it:
  closed (the app sees the client go). While uvicorn itself has stopped reading (a
  pipelined request waits its turn, or a body past its buffer), no timer runs out;
- every such answer, and llhttp's 400 for a request that is not HTTP, is
  `application/problem+json`, written by uvicorn's own response cycle after the answers to
  the requests before it on the connection, and the connection is then closed.

Select it with `uvicorn.run(..., http="infra.http_guard:GuardedHttpToolsProtocol")`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from common.errors import ApiError
from common.settings import get_settings

PROBLEM_JSON = b"application/problem+json"
HEAD_SLICE = 4096
BODY_TIMEOUTS = 4  # a whole body must arrive within this many read timeouts


class Refused(Exception):  # noqa: N818 - raised inside a parser callback to stop parsing
    """A parser callback refused the request; the answer is in the protocol's `_refusal`."""


def problem_app(error: ApiError) -> Any:
    """A tiny ASGI app answering `error` as problem+json on a connection about to close."""
    body = json.dumps(error.to_problem()).encode()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", PROBLEM_JSON),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with size limits, read timeouts and problem+json errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.max_url_bytes = settings.gateway_max_url_bytes
        self.max_header_bytes = settings.gateway_max_header_bytes
        self.read_timeout = settings.gateway_read_timeout_seconds
        self._awaiting_headers = False  # a request has begun, its headers not all parsed
        self._head_bytes = 0  # bytes fed since then (counted per slice: a slice over)
        self._in_body = False  # headers of the current request parsed, its body not all read
        self._rejected = False  # an error answer is queued: read nothing more
        self._read_timer: asyncio.TimerHandle | None = None
        self._body_deadline = 0.0  # loop time by which the current body must be whole
        self._wait_started = 0.0  # loop time the current wait for headers began
        self._piece = 0  # bytes of the read being fed to the parser
        self._refusal: ApiError | None = None  # what a callback refused the request with

    # Timers: one per connection, (re)armed only when a read leaves a request unfinished,
    # so a request that arrives whole in one read costs no timer work at all.
    def _deadline(self) -> float:
        """When the current wait must end (loop time)."""
        if self._in_body:  # the next bytes within a timeout, the whole body within four
            return min(self.loop.time() + self.read_timeout, self._body_deadline)
        return self._wait_started + self.read_timeout  # headers, or a first request

    def _arm_read_timer(self) -> None:
        self._cancel_read_timer()
        self._read_timer = self.loop.call_at(self._deadline(), self._read_timed_out)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _after_read(self) -> None:
        """Keep the timer to what is still awaited after a read."""
        if self._rejected:
            return
        if self._in_body:
            self._arm_read_timer()  # body bytes keep arriving: a fresh idle allowance
        elif self._awaiting_headers:
            if self._read_timer is None or self._read_timer.when() != self._deadline():
                self._arm_read_timer()
        else:
            self._cancel_read_timer()  # between requests: uvicorn's keep-alive applies

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or self._rejected:
            return
        if self.flow.read_paused and not (self._in_body
                                          and self.loop.time() >= self._body_deadline):
            self._wait_started = self.loop.time()
            self._arm_read_timer()  # we are not reading: the client cannot be late
            return
        if self._in_body or not self._awaiting_headers:
            # Nothing of a request came (a client would resend on a new connection, as
            # after the keep-alive timeout), or the app is reading this body (it sees the
            # client go): close without an answer.
            self.transport.close()
            return
        self._reject(ApiError(408, "Request timeout", "the request's headers did not arrive "
                              f"within {self.read_timeout:g} s"))

    # Connection events
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait_started = self.loop.time()
        self._arm_read_timer()  # a connection that never sends a request is closed

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return  # the rest of a request being refused: read and dropped
        if self._in_body or len(data) <= HEAD_SLICE:
            # After a body, the next pipelined request's headers in the same read are not
            # counted (at most one read over); else the read counts whole.
            self._piece = 0 if self._in_body else len(data)
            super().data_received(data)
            self._count_head(len(data))
        else:
            # httptools keeps a header's pieces until the header ends, so a 200 MB header
            # would be held whole: while headers are awaited, feed at most HEAD_SLICE bytes
            # at a time and count them.
            while data and not self._in_body and not self._rejected:
                piece, data = data[:HEAD_SLICE], data[HEAD_SLICE:]
                self._piece = len(piece)
                super().data_received(piece)
                self._count_head(len(piece))
            if data and not self._rejected:
                super().data_received(data)
        self._after_read()

    def _count_head(self, size: int) -> None:
        """Bytes read while a request's headers are still awaited (a read that began the
        request counts whole: at most HEAD_SLICE over)."""
        if self._awaiting_headers and not self._rejected:
            self._head_bytes += size
            if self._head_bytes > self.max_header_bytes:
                self._reject(ApiError(
                    431, "Request header fields too large",
                    f"the request line and headers exceed {self.max_header_bytes} bytes"))

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this when llhttp fails, or when a callback of ours refused."""
        error, self._refusal = self._refusal, None
        self._reject(error or ApiError(400, "Malformed request",
                                       "the request is not valid HTTP/1.1"))

    def _reject(self, error: ApiError) -> None:
        """Answer `error` after the answers already due on this connection, then close it."""
        self._rejected = True
        self._cancel_read_timer()
        if self._in_body:
            # The request whose body broke is being served by the app; it cannot also get
            # an error answer. uvicorn closes here too; the app sees the client go.
            self.transport.close()
            return
        scope = {"type": "http", "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
                 "http_version": "1.1", "server": self.server, "client": self.client,
                 "scheme": self.scheme, "root_path": self.root_path, "method": "GET",
                 "path": "/", "raw_path": b"/", "query_string": b"", "headers": [],
                 "state": {}}
        cycle = RequestResponseCycle(
            scope=scope,  # type: ignore[arg-type]
            transport=self.transport, flow=self.flow, logger=self.logger,
            access_logger=self.access_logger, access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(), expect_100_continue=False, keep_alive=False,
            on_response=self.on_response_complete)
        cycle.more_body = False
        existing, self.cycle = self.cycle, cycle
        if existing is None or existing.response_complete:
            self._start_asgi_task(cycle, problem_app(error))
        else:  # answered in order, after the requests already read
            self.pipeline.appendleft((cycle, problem_app(error)))

    def _refuse(self, error: ApiError) -> None:
        self._refusal = error
        raise Refused(error.detail)  # llhttp stops; uvicorn calls send_400_response

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        self._head_bytes = 0
        self._wait_started = self.loop.time()  # its headers are due a timeout from now

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.max_url_bytes:
            self._refuse(ApiError(414, "URI too long", "the request target is longer than "
                                  f"{self.max_url_bytes} bytes"))

    def on_headers_complete(self) -> None:
        # The read that ends the headers counts too (whole: at most HEAD_SLICE over).
        if self._head_bytes + self._piece > self.max_header_bytes:
            self._refuse(ApiError(431, "Request header fields too large", "the request line"
                                  f" and headers exceed {self.max_header_bytes} bytes"))
        self._awaiting_headers = False
        self._in_body = True
        self._body_deadline = self.loop.time() + BODY_TIMEOUTS * self.read_timeout
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

