"""The gateway's connections on the real stack: size limits, read timeouts, protocol errors.

Raw sockets send what no HTTP client library would; replies are read with the standard
library's `http.client`, one after another from the same buffered stream.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import time
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.support.client import in_thread

pytestmark = pytest.mark.integration

READ_TIMEOUT = 3.0  # JOBS_GATEWAY_READ_TIMEOUT_SECONDS of the test stack (tests/conftest.py)


class _Unclosable(io.BufferedReader):
    def close(self) -> None:  # http.client closes its file after each reply
        pass


class Connection:
    """A raw socket to the gateway; `reply()` reads the next answer on it."""

    def __init__(self, base_url: str) -> None:
        url = urlparse(base_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=30)
        self._file = _Unclosable(socket.SocketIO(self.sock, "rb"))

    def makefile(self, mode: str) -> io.BufferedReader:  # what http.client asks a socket for
        return self._file

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        answer = http.client.HTTPResponse(self, method=method)  # type: ignore[arg-type]
        answer.begin()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()

    def closed_by_server(self) -> bool:
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect(stack: Any):
    opened: list[Connection] = []

    def open_one() -> Connection:
        opened.append(Connection(stack.gateway_url))
        return opened[-1]

    yield open_one
    for conn in opened:
        conn.close()


def problem_of(reply: tuple[int, dict[str, str], bytes], status: int) -> dict[str, Any]:
    code, headers, body = reply
    assert code == status, body
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    problem = json.loads(body)
    assert problem["status"] == status and problem["title"] and problem["detail"]
    return problem


def request(method: str, target: str, token: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: test", f"Authorization: Bearer {token}",
             f"Content-Length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_a_request_target_over_the_limit_is_a_414_problem(api):
    reply = api.request("GET", "/jobs?status=" + "Q" * 9000)
    assert reply.status == 414 and reply.content_type == "application/problem+json"
    assert "8192 bytes" in reply.json["detail"]
    assert api.request("GET", "/jobs?limit=1&status=" + "Q" * 7000).status == 400  # under it


def test_headers_over_the_limit_are_a_431_problem_before_the_rest_arrives(connect, stack):
    conn = connect()
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: ")
    sent = 0
    with pytest.raises(OSError):  # refused and closed long before 64 MB arrive
        for _ in range(1024):
            conn.send(b"a" * 65536)
            sent += 65536
    assert sent < 16 << 20
    problem = problem_of(conn.reply(), 431)
    assert "32768 bytes" in problem["detail"]

    for size in (33_000, 36_000):  # just over the limit, sent whole in one write
        just_over = connect()
        just_over.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * size
                       + b"\r\n\r\n")
        problem_of(just_over.reply(), 431)

    many = connect()  # many small headers count the same
    many.send(b"GET /healthz HTTP/1.1\r\nHost: test\r\n"
              + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(1000)) + b"\r\n")
    problem_of(many.reply(), 431)


def test_garbage_after_a_pipelined_submit_is_answered_after_it(connect, api, stack):
    body = json.dumps({"job_type": "ECHO", "payload": {"message": "pipelined"}}).encode()
    conn = connect()
    conn.send(request("POST", "/jobs", stack.admin_token, body,
                      Content_Type="application/json")
              + request("GET", "/healthz", stack.admin_token)
              + b"\x00\x01 this is not HTTP\r\n\r\n")
    status, _, created = conn.reply("POST")
    assert status == 202
    assert conn.reply()[0] == 200  # the request read before the garbage is answered too
    problem = problem_of(conn.reply(), 400)
    assert problem["title"] == "Malformed request"
    assert conn.closed_by_server()
    assert api.wait_status(json.loads(created)["job_id"])["status"] == "COMPLETED"


def test_pipelined_requests_are_answered_in_order_on_one_connection(connect, stack):
    conn = connect()
    conn.send(request("GET", "/healthz", stack.admin_token)
              + request("GET", "/jobs/not-a-uuid", stack.admin_token)
              + request("GET", "/healthz", stack.admin_token))
    assert [conn.reply()[0] for _ in range(3)] == [200, 400, 200]


def test_a_silent_connection_is_closed_and_trickled_headers_get_a_408(connect):
    silent, trickle = connect(), connect()

    def trickle_headers() -> tuple[float, tuple[int, dict[str, str], bytes]]:
        start = time.monotonic()
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"s" * 100:
                trickle.send(bytes([byte]))
                time.sleep(0.25)  # a slow client, on purpose: the server must not wait for it
        except OSError:
            pass
        return time.monotonic() - start, trickle.reply()

    slow = in_thread(trickle_headers)
    start = time.monotonic()
    assert silent.closed_by_server()  # nothing was asked, so nothing is answered
    assert READ_TIMEOUT - 0.5 < time.monotonic() - start < READ_TIMEOUT * 3
    elapsed, reply = slow.result(timeout=60)
    assert f"{READ_TIMEOUT:g} s" in problem_of(reply, 408)["detail"]
    assert elapsed < READ_TIMEOUT * 3  # headers trickled for 35 s were cut off at the timeout


def test_a_connection_kept_alive_between_requests_still_works(connect, stack):
    conn = connect()
    conn.send(request("GET", "/healthz", stack.admin_token))
    assert conn.reply()[0] == 200
    time.sleep(READ_TIMEOUT + 1)  # idle after a reply: the keep-alive timeout (30 s) applies
    conn.send(request("GET", "/healthz", stack.admin_token))
    assert conn.reply()[0] == 200


def test_a_body_trickled_forever_is_cut_off_at_its_total_deadline(connect, stack):
    conn = connect()
    conn.send(b"POST /jobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer "
              + stack.admin_token.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    start = time.monotonic()
    with pytest.raises(OSError):  # one byte every second: never idle for the 3 s timeout
        for _ in range(120):
            conn.send(b" ")
            time.sleep(1)  # a slow client, on purpose
    elapsed = time.monotonic() - start
    # The whole body had 4 x 3 s; the server then closed (reset or broken pipe here).
    assert READ_TIMEOUT * 4 - 1 < elapsed < READ_TIMEOUT * 4 + 10, elapsed
