"""A small HTTP client for the jobs API (urllib from the standard library; server-sent
events parsed by sseclient-py)."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import sseclient

from jobs_cli import __version__

#: An event stream sends a heartbeat every 15 s while idle (JOBS_EVENTS_HEARTBEAT_SECONDS):
#: silence this long means it is gone.
STREAM_READ_TIMEOUT = 45.0


class CliError(Exception):
    """Something to report on one line of stderr, with the process exit code."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CliError):
    """Bad command line input (exit 2)."""

    exit_code = 2


class Unreachable(CliError):
    """The API does not answer: refused, unknown host, timed out (exit 3)."""

    exit_code = 3


class ApiError(CliError):
    """The API answered with an error status; `detail` comes from its problem document."""

    exit_code = 1

    def __init__(self, status: int, title: str, detail: str,
                 errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}
        super().__init__(self._line())

    def _line(self) -> str:
        line = f"{self.status} {self.title}: {self.detail}" if self.title else (
            f"{self.status}: {self.detail}")
        if self.errors:
            parts = []
            for err in self.errors[:3]:
                loc = err.get("loc") or err.get("field") or err.get("path")
                where = ".".join(str(p) for p in loc) if isinstance(loc, list | tuple) else loc
                msg = err.get("msg") or err.get("message") or json.dumps(err)
                parts.append(f"{where}: {msg}" if where else str(msg))
            more = f" (+{len(self.errors) - 3} more)" if len(self.errors) > 3 else ""
            line += " [" + "; ".join(parts) + more + "]"
        return one_line(line)


def one_line(text: str, limit: int = 400) -> str:
    """`text` on a single line, cut to `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    _json: Any = field(default=None, repr=False)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    @property
    def json(self) -> Any:
        if self._json is None:
            try:
                self._json = json.loads(self.body)
            except ValueError as exc:
                raise CliError(f"the API answered {self.status} with a body that is not JSON:"
                               f" {one_line(self.text, 120)!r}") from exc
        return self._json


def normalize_url(url: str) -> str:
    """`localhost:8080` -> `http://localhost:8080`; refuse what is not an http(s) URL."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url must be an http(s) URL like http://localhost:8080, not {url!r}")
    return url


class Client:
    """The jobs API at `base_url`; every error becomes a CliError subclass."""

    def __init__(self, base_url: str, timeout: float = 10.0, token: str | None = None) -> None:
        self.base = normalize_url(base_url)
        self.timeout = timeout
        self.token = token  # sent as `Authorization: Bearer <token>` on every request
        # No proxies from the environment: the API is usually on localhost.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _headers(self, accept: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        hdrs = {"Accept": accept, "User-Agent": f"jobs-cli/{__version__}", **(extra or {})}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        return hdrs

    def request(self, method: str, path: str, *, body: Any = None,
                params: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        url = self.base + path
        query = {k: v for k, v in (params or {}).items() if v is not None}
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        hdrs = self._headers("application/json, application/problem+json", headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        elif method == "POST":
            data = b""
        req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return Reply(resp.status, _lower(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as exc:
            reply = Reply(exc.code, _lower(exc.headers.items()), _read(exc))
            raise api_error(reply) from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except OSError as exc:  # TimeoutError, ConnectionError...
            raise self._unreachable(exc) from None

    def events(self, job_id: str, timeout: float = STREAM_READ_TIMEOUT
               ) -> Iterator[dict[str, Any]]:
        """The job's documents from `GET /jobs/{id}/events`, each as it comes, until the
        server ends the stream. Opening it raises as `request` does (and CliError for an
        answer that is not an event stream); a stream that breaks, or is silent for
        `timeout` seconds, raises Unreachable."""
        url = f"{self.base}/jobs/{_seg(job_id)}/events"
        req = urllib.request.Request(url, headers=self._headers("text/event-stream"))
        try:
            resp = self._opener.open(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise api_error(Reply(exc.code, _lower(exc.headers.items()), _read(exc))) from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except OSError as exc:
            raise self._unreachable(exc) from None
        kind = resp.headers.get("Content-Type", "")
        if resp.status != 200 or not kind.startswith("text/event-stream"):
            resp.close()
            raise CliError(f"{url} answered {resp.status} {kind or 'without a type'}, not an"
                           " event stream")
        return self._documents(resp)

    def _documents(self, resp: Any) -> Iterator[dict[str, Any]]:
        with resp:
            try:
                for event in sseclient.SSEClient(resp).events():
                    try:
                        yield json.loads(event.data)
                    except ValueError as exc:
                        raise CliError("the event stream sent an event that is not JSON:"
                                       f" {one_line(event.data, 120)!r}") from exc
            except (OSError, http.client.HTTPException) as exc:  # timeout, reset, cut short
                raise Unreachable(f"the event stream from {self.base} broke:"
                                  f" {one_line(str(exc) or type(exc).__name__, 100)}") from None

    def _unreachable(self, reason: Any) -> Unreachable:
        if isinstance(reason, TimeoutError):
            return Unreachable(f"no answer from {self.base} within {self.timeout:g}s"
                               " (--timeout to wait longer)")
        if isinstance(reason, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(reason, socket.gaierror):
            why = "unknown host"
        else:
            why = one_line(getattr(reason, "strerror", None) or str(reason), 100)
        return Unreachable(f"cannot reach {self.base} ({why}): is `make run` up?")

    # The API, one method per call.

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> Reply:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.request("POST", "/jobs", body=body, headers=headers)

    def job(self, job_id: str) -> Reply:
        return self.request("GET", f"/jobs/{_seg(job_id)}")

    def jobs(self, *, status: str | None = None, job_type: str | None = None,
             limit: int | None = None, cursor: str | None = None,
             id_prefix: str | None = None) -> Reply:
        return self.request("GET", "/jobs", params={"status": status, "job_type": job_type,
                                                    "limit": limit, "cursor": cursor,
                                                    "id_prefix": id_prefix})

    def dead_letters(self, *, limit: int | None = None, cursor: str | None = None) -> Reply:
        return self.request("GET", "/dead-letters", params={"limit": limit, "cursor": cursor})

    def retry(self, job_id: str, with_dependents: bool = False) -> Reply:
        query = "?with_dependents=true" if with_dependents else ""
        return self.request("POST", f"/jobs/{_seg(job_id)}/retry{query}")

    def dependents(self, job_id: str) -> Reply:
        return self.request("GET", f"/jobs/{_seg(job_id)}/dependents")

    def callbacks(self, job_id: str) -> Reply:
        return self.request("GET", f"/jobs/{_seg(job_id)}/callbacks")

    def cancel(self, job_id: str) -> Reply:
        return self.request("POST", f"/jobs/{_seg(job_id)}/cancel")

    def stats(self) -> Reply:
        return self.request("GET", "/stats")

    def create_token(self, body: dict[str, Any]) -> Reply:
        return self.request("POST", "/tokens", body=body)

    def tokens(self) -> Reply:
        return self.request("GET", "/tokens")

    def revoke_token(self, token_id: str) -> Reply:
        return self.request("DELETE", f"/tokens/{_seg(token_id)}")

    def create_schedule(self, body: dict[str, Any]) -> Reply:
        return self.request("POST", "/schedules", body=body)

    def schedules(self, limit: int | None = None, cursor: str | None = None) -> Reply:
        return self.request("GET", "/schedules", params={"limit": limit, "cursor": cursor})

    def schedule(self, name: str) -> Reply:
        return self.request("GET", f"/schedules/{_seg(name)}")

    def pause_schedule(self, name: str) -> Reply:
        return self.request("POST", f"/schedules/{_seg(name)}/pause")

    def resume_schedule(self, name: str) -> Reply:
        return self.request("POST", f"/schedules/{_seg(name)}/resume")

    def delete_schedule(self, name: str) -> Reply:
        return self.request("DELETE", f"/schedules/{_seg(name)}")


def api_error(reply: Reply) -> ApiError:
    """The ApiError for an error answer: the problem document's detail when there is one."""
    title, detail, errors = "", "", None
    try:
        doc = json.loads(reply.body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        title = str(doc.get("title") or "")
        detail = str(doc.get("detail") or doc.get("message") or doc.get("error") or "")
        errors = doc.get("errors") if isinstance(doc.get("errors"), list) else None
    if not detail:
        detail = one_line(reply.text, 200) or "(empty body)"
    if not title:
        from http import HTTPStatus

        try:
            title = HTTPStatus(reply.status).phrase
        except ValueError:
            title = "HTTP error"
    return ApiError(reply.status, title, detail, errors, reply.headers)


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _lower(items: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in items}


def _read(exc: urllib.error.HTTPError) -> bytes:
    try:
        return exc.read()
    except Exception:
        return b""
