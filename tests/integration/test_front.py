"""The gateway's connections on the real stack: size limits, read timeouts, protocol errors.

Raw sockets send what no HTTP client library would; replies are read with the standard
library's `http.client`, one after another from the same buffered stream. The read
timeouts are waited for several times over, so their tests talk to a second gateway
process of this module's own, with a 1 s read timeout, in front of the same functions.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from infra import services
from tests.support.client import healthy, in_thread, wait_for

pytestmark = pytest.mark.integration

READ_TIMEOUT = 1.0  # JOBS_GATEWAY_READ_TIMEOUT_SECONDS of the module's own gateway
SLACK = 5.0  # how late a busy machine may be to act on a timeout
ROOT = Path(__file__).resolve().parents[2]


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


@pytest.fixture(scope="module")
def timed_gateway(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The stack's gateway program (`python -m infra.gateway`, as the stack runs it, with
    one worker) in front of the stack's functions, with a 1 s read timeout."""
    port = services.free_port()
    env = {**stack.env, "JOBS_GATEWAY_READ_TIMEOUT_SECONDS": f"{READ_TIMEOUT:g}"}
    log = tmp_path_factory.mktemp("timed-gateway") / "gateway.log"
    with log.open("wb") as out:
        gateway = services.spawn(
            [sys.executable, "-m", "infra.gateway", "--port", str(port),
             "--submit", stack.function_url("submit"), "--status", stack.function_url("status"),
             "--workers", "1"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: gateway.poll() is not None or healthy(url), 60, "the gateway to start")
        assert gateway.poll() is None, log.read_text()[-3000:]
        yield url
    finally:
        gateway.terminate()
        try:
            gateway.wait(15)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait()


def connector(base_url: str) -> Iterator[Any]:
    opened: list[Connection] = []

    def open_one() -> Connection:
        opened.append(Connection(base_url))
        return opened[-1]

    yield open_one
    for conn in opened:
        conn.close()


@pytest.fixture
def connect(stack: Any) -> Iterator[Any]:
    """Raw connections to the stack's gateway."""
    yield from connector(stack.gateway_url)


@pytest.fixture
def connect_timed(timed_gateway: str) -> Iterator[Any]:
    """Raw connections to the module's gateway with the 1 s read timeout."""
    yield from connector(timed_gateway)


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


def test_a_silent_connection_is_closed_and_trickled_headers_get_a_408(connect_timed):
    silent, trickle = connect_timed(), connect_timed()

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
    assert READ_TIMEOUT - 0.5 < time.monotonic() - start < READ_TIMEOUT + SLACK
    elapsed, reply = slow.result(timeout=60)
    assert f"{READ_TIMEOUT:g} s" in problem_of(reply, 408)["detail"]
    assert elapsed < READ_TIMEOUT + SLACK  # headers trickled for 35 s were cut off at the timeout


def test_a_connection_kept_alive_between_requests_still_works(connect_timed, stack):
    conn = connect_timed()
    conn.send(request("GET", "/healthz", stack.admin_token))
    assert conn.reply()[0] == 200
    time.sleep(READ_TIMEOUT + 1)  # idle after a reply: the keep-alive timeout (30 s) applies
    conn.send(request("GET", "/healthz", stack.admin_token))
    assert conn.reply()[0] == 200


def test_a_body_trickled_forever_is_cut_off_at_its_total_deadline(connect_timed, stack):
    conn = connect_timed()
    conn.send(b"POST /jobs HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer "
              + stack.admin_token.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    start = time.monotonic()
    with pytest.raises(OSError):  # a byte every quarter timeout: never idle for the timeout
        for _ in range(480):
            conn.send(b" ")
            time.sleep(READ_TIMEOUT / 4)  # a slow client, on purpose
    elapsed = time.monotonic() - start
    # The whole body had 4 x 1 s; the server then closed (reset or broken pipe here).
    assert READ_TIMEOUT * 4 - 1 < elapsed < READ_TIMEOUT * 4 + 2 * SLACK, elapsed
