"""HTTP plumbing shared by the HTTP functions: routing, JSON bodies, problem answers."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import flask
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, RequestRedirect, Rule

from common import clients
from common.auth import ANONYMOUS
from common.errors import ApiError, ServiceUnavailable
from common.routes import Operation, operations

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
M = TypeVar("M", bound=BaseModel)

#: Deepest nesting of arrays and objects a body may have: far beyond any job payload, and
#: far below what recursive code (json, pydantic, PostgreSQL's jsonb parser) can handle.
MAX_JSON_DEPTH = 64
# Characters PostgreSQL cannot store in text or jsonb: NUL, and UTF-16 surrogates that JSON
# can smuggle in as unpaired `\ud800` escapes.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@dataclass
class Reply:
    """What an operation's handler answers: a status, a body model (or none), headers."""

    body: BaseModel | None
    status: int | None = None  # default: the operation's first declared answer
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[..., "Reply | BaseModel | flask.Response"]


class Dispatcher:
    """One HTTP function's routing, derived from the API declaration (`common.routes`).

    It matches the path and method, checks the bearer token and its scope, calls the
    handler named by the operation id and renders the declared response model. Every
    error becomes a problem document; a handler missing for a declared operation (or one
    for an undeclared operation) is an error at import time, so a route cannot drift.
    """

    def __init__(self, function: str, handlers: dict[str, Handler]) -> None:
        ops = operations(function)
        declared = {op.operation_id for op in ops}
        if declared != set(handlers):
            raise RuntimeError(f"{function}: handlers {sorted(handlers)} do not match the"
                               f" declared operations {sorted(declared)}")
        self.ops = {op.operation_id: op for op in ops}
        self.handlers = handlers
        self.map = Map([Rule(op.rule, endpoint=op.operation_id, methods=[op.method])
                        for op in ops], strict_slashes=False, merge_slashes=False)

    def __call__(self, request: flask.Request) -> flask.Response:
        try:
            adapter = self.map.bind("localhost", url_scheme="http")
            try:
                endpoint, args = adapter.match(request.path, request.method)
            except MethodNotAllowed as exc:
                raise ApiError(405, "Method not allowed",
                               f"{request.method} is not allowed on {request.path}",
                               headers={"Allow": ", ".join(sorted(exc.valid_methods or ()))}
                               ) from exc
            except (NotFound, RequestRedirect) as exc:
                raise ApiError(404, "Not found",
                               f"no route for {request.method} {request.path}") from exc
            op = self.ops[endpoint]
            principal = (ANONYMOUS if op.public else clients.authenticator().check(
                request.headers.get("Authorization"), op.scope))
            return render(op, self.handlers[endpoint](request, principal, **args))
        except ApiError as exc:
            return problem(exc, request.path)
        except HTTPException as exc:  # werkzeug's own, e.g. 416 for a Range past the file
            return problem(ApiError(exc.code or 500, exc.name, exc.description or exc.name),
                           request.path)
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

    def http_error(self, request: flask.Request, exc: HTTPException) -> flask.Response:
        """Werkzeug's own errors as problem documents, never its HTML pages.

        A path no Flask rule matches (one with a newline in a segment, which the
        framework's `<path:path>` rule does not take) is dispatched all the same, so it
        gets the answer any other bad id gets.
        """
        if isinstance(exc, NotFound) and request.url_rule is None:
            return self(request)
        headers = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        status = exc.code or 500
        return problem(ApiError(status, exc.name, exc.description or exc.name,
                                headers=headers), request.path)


def render(op: Operation, result: Reply | BaseModel | flask.Response) -> flask.Response:
    """The handler's answer as the declaration says: the declared model, serialized."""
    if isinstance(result, flask.Response):  # a file
        return result
    reply = result if isinstance(result, Reply) else Reply(result)
    status = reply.status or next(iter(op.answers))
    answer = op.answers[status]
    if answer.model is None:
        response = flask.Response(status=status)
    else:
        if not isinstance(reply.body, answer.model):
            raise TypeError(f"{op.operation_id} answered {type(reply.body).__name__},"
                            f" declared {answer.model.__name__}")
        response = flask.Response(reply.body.model_dump_json(), status=status,
                                  mimetype="application/json")
    response.headers.update(reply.headers)
    return response


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
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "Malformed JSON", f"the request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise _unstorable([], f"nested more than {MAX_JSON_DEPTH} levels deep",
                          "json_too_deep") from exc
    check_storable(data)
    return data


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (RFC 8259) and PostgreSQL do not.
    raise ValueError(f"{name} is not a JSON value")


def check_storable(data: Any) -> None:
    """Refuse valid JSON that PostgreSQL's jsonb cannot store: a 422 naming the first spot.

    That is a string (or key) holding NUL or an unpaired surrogate, a number too large
    for a float (`1e400` parses as infinity), or nesting deeper than MAX_JSON_DEPTH.
    """
    stack: list[tuple[Any, list[str | int], int]] = [(data, [], 0)]
    while stack:
        value, loc, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise _unstorable(loc, f"nested more than {MAX_JSON_DEPTH} levels deep",
                                  "json_too_deep")
            items: Iterable[tuple[Any, Any]] = (
                value.items() if isinstance(value, dict) else enumerate(value))
            for key, item in items:
                if isinstance(key, str) and _UNSTORABLE.search(key):
                    raise _unstorable([*loc, _escape(key)], _TEXT_MSG, "string_unstorable")
                stack.append((item, [*loc, key], depth + 1))
        elif isinstance(value, str):
            if _UNSTORABLE.search(value):
                raise _unstorable(loc, _TEXT_MSG, "string_unstorable")
        elif isinstance(value, float) and not math.isfinite(value):
            raise _unstorable(loc, "number out of range", "number_out_of_range")


_TEXT_MSG = "strings may not contain U+0000 or unpaired surrogates (\\ud800-\\udfff)"


def _escape(text: str) -> str:
    return _UNSTORABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _unstorable(loc: list[str | int], msg: str, kind: str) -> ApiError:
    where = ".".join(map(str, loc)) or "body"
    return ApiError(422, "Invalid request", f"{where}: {msg}",
                    errors=[{"loc": loc, "msg": msg, "type": kind}])


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
    for value in values:
        _check_query_text(name, value)
    return values or None


def query_text(request: flask.Request, name: str) -> str | None:
    """A single query parameter, None when absent or empty."""
    value = request.args.get(name) or None
    if value is not None:
        _check_query_text(name, value)
    return value


def _check_query_text(name: str, value: str) -> None:
    # PostgreSQL refuses NUL in text, and undecodable %-escapes arrive as surrogates.
    if _UNSTORABLE.search(value):
        raise ApiError(400, "Bad query parameter",
                       f"{name} contains a NUL character or invalid UTF-8")


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


def query_bool(request: flask.Request, name: str) -> bool:
    """`true`/`false` (also 1/0); absent is false; anything else a 400."""
    raw = (request.args.get(name) or "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ApiError(400, "Bad query parameter", f"{name} must be true or false")
    return raw in ("true", "1")
