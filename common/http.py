"""HTTP plumbing shared by the HTTP functions: routing, JSON bodies, problem answers."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

import flask
from pydantic import BaseModel, ValidationError

from common.errors import ApiError, ServiceUnavailable

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
Handler = Callable[..., flask.Response]
Route = tuple[str, "re.Pattern[str]", Handler]
M = TypeVar("M", bound=BaseModel)


def routes(*table: tuple[str, str, Handler]) -> list[Route]:
    """Compile (method, path pattern, handler) rows; `{name}` in a path captures a segment."""
    compiled = []
    for method, path, handler in table:
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)
        compiled.append((method, re.compile(f"^{pattern}/?$"), handler))
    return compiled


def dispatch(request: flask.Request, table: list[Route]) -> flask.Response:
    """Call the handler matching the request; every error becomes a problem document."""
    try:
        allowed = []
        for method, pattern, handler in table:
            match = pattern.match(request.path)
            if match is None:
                continue
            if method != request.method:
                allowed.append(method)
                continue
            return handler(request, **match.groupdict())
        if allowed:
            raise ApiError(405, "Method not allowed",
                           f"{request.method} is not allowed on {request.path}",
                           headers={"Allow": ", ".join(sorted(set(allowed)))})
        raise ApiError(404, "Not found", f"no route for {request.method} {request.path}")
    except ApiError as exc:
        return problem(exc, request.path)
    except ServiceUnavailable as exc:
        log.warning("%s %s: %s", request.method, request.path, exc)
        return problem(ApiError(503, "Service unavailable",
                                f"{exc.service} is unavailable; try again shortly",
                                headers={"Retry-After": str(exc.retry_after)}), request.path)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return problem(ApiError(500, "Internal error",
                                "the server failed to answer; the error is in its log"),
                       request.path)


def problem(exc: ApiError, instance: str | None = None) -> flask.Response:
    """An RFC 9457 problem answer."""
    response = flask.Response(json.dumps(exc.to_problem(instance)), status=exc.status,
                              mimetype=PROBLEM_JSON)
    for name, value in exc.headers.items():
        response.headers[name] = value
    return response


def json_response(body: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> flask.Response:
    response = flask.Response(json.dumps(body, default=str), status=status,
                              mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def read_json(request: flask.Request, max_bytes: int) -> Any:
    """The request body as JSON, enforcing the size limit before reading it."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise ApiError(413, "Body too large",
                       f"request body is {length} bytes; the limit is {max_bytes} bytes")
    raw = request.stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ApiError(413, "Body too large", f"request body exceeds {max_bytes} bytes")
    mimetype = request.mimetype or ""
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError(415, "Unsupported media type",
                       f"send JSON with Content-Type: application/json, not {mimetype}")
    if not raw.strip():
        raise ApiError(400, "Empty body", "the request body must be a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "Malformed JSON", f"the request body is not valid JSON: {exc}") from exc


def parse_model(model: type[M], data: Any) -> M:
    """Validate `data` against `model`; a mismatch is a 422 naming each bad field."""
    if not isinstance(data, dict):
        raise ApiError(422, "Invalid request",
                       f"the body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
        first = errors[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise ApiError(422, "Invalid request", f"{where}: {first['msg']}",
                       errors=errors) from exc


def query_list(request: flask.Request, name: str) -> list[str] | None:
    """A repeatable or comma-separated query parameter."""
    values = [v for raw in request.args.getlist(name) for v in raw.split(",") if v]
    return values or None


def query_int(request: flask.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ApiError(400, "Bad query parameter", f"{name} must be an integer") from exc
    if not lo <= value <= hi:
        raise ApiError(400, "Bad query parameter", f"{name} must be between {lo} and {hi}")
    return value
