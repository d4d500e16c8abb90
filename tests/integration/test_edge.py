"""The gateway's asyncio front (infra/edge.py) speaks HTTP/1.1 as clients expect: raw
sockets here, so nothing smooths over what the server sends."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.integration


def connect(stack) -> socket.socket:
    url = urlsplit(stack.gateway_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    return sock


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length framed) from `sock`; leftovers stay in `buffer`."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed; got {bytes(buffer)[:200]!r}"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the body"
        rest += chunk
    buffer[:] = rest[length:]
    return status, headers, rest[:length]


def test_pipelined_requests_are_answered_in_order(stack, api):
    done = api.wait_status(api.submit("ECHO", {"message": "pipelined"}).json["job_id"])
    with connect(stack) as sock:
        sock.sendall(f"GET /jobs/{done['job_id']} HTTP/1.1\r\nHost: x\r\n\r\n"
                     "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                     "GET /jobs/not-a-uuid HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        buffer = bytearray()
        first, second, third = (read_response(sock, buffer) for _ in range(3))
    assert first[0] == 200 and json.loads(first[2])["job_id"] == done["job_id"]
    assert second[0] == 200 and json.loads(second[2]) == {"status": "ok"}
    assert third[0] == 400 and third[1]["content-type"] == "application/problem+json"


def test_a_client_expecting_100_continue_gets_it_then_the_answer(stack):
    body = json.dumps({"job_type": "NOOP", "payload": {"padding": "x" * 2000}}).encode()
    with connect(stack) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        buffer = bytearray()
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        buffer += interim[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        sock.sendall(body)
        status, headers, answer = read_response(sock, buffer)
    assert status == 202 and headers["location"].startswith("/jobs/")
    assert json.loads(answer)["status"] in ("QUEUED", "IN_PROGRESS", "COMPLETED")


def test_a_body_over_the_limit_is_refused_before_it_is_read(stack):
    with connect(stack) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 99999999\r\n\r\n{")
        status, headers, body = read_response(sock, bytearray())
    assert status == 413 and headers["connection"] == "close"
    assert "limit" in json.loads(body)["detail"] or "exceeds" in json.loads(body)["detail"]


def test_a_malformed_request_gets_a_problem_not_a_hang(stack):
    with connect(stack) as sock:
        sock.sendall(b"GET /jobs HTTP/1.1\r\nHost x no colon\r\n\r\n")
        status, headers, body = read_response(sock, bytearray())
    assert status == 400 and json.loads(body)["title"] == "Bad request"


def test_head_answers_headers_only_and_the_connection_stays_usable(stack):
    with connect(stack) as sock:
        sock.sendall(b"HEAD /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200")
        assert head.endswith(b"\r\n\r\n")  # no body follows the head
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(sock, bytearray())
    assert status == 200 and json.loads(body) == {"status": "ok"}
