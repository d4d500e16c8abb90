"""The API gateway: the one public origin, locally (`make run`) and deployed (Knative).

An ASGI app (Starlette on uvicorn) whose routes come from the API declaration
(`common.routes`): operations of the `submit` and `status` functions are forwarded to
them with aiohttp, the gateway's own (tokens, whoami, metrics, health, readiness, the
OpenAPI document) are answered here. Every operation that needs a token is checked here,
and again by the function that answers it. Beside the API: Swagger UI (assets from the
swagger-ui-bundle package, no CDN) and the dashboard.

`GET /jobs/{id}` of a job in a final state (COMPLETED, CANCELLED: no transition leaves
them, so such a document never changes) is answered from this process's memory, filled
from the cache's announcements of final documents (Redis pub/sub) and from the status
function's answers. Every other lookup goes to the status function.

`GET /jobs/{id}/events` (server-sent events, live until the job ends) is answered here
too, from the cache's announcements on Redis: see `infra.events`.

Run: python -m infra.gateway --port 8080 --submit URL[,URL...] --status URL[,URL...] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import os
import re
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import aiohttp
import yarl
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from common import auth, clients
from common import metrics as job_metrics
from common.auth import ANONYMOUS, Principal
from common.auth import Scope as TokenScope
from common.cache import FINAL_STATES
from common.errors import ApiError, ServiceUnavailable
from common.http import check_storable
from common.logs import configure_logging
from common.models import Health, Identity, Readiness, TokenCreated, TokenPage, TokenRequest
from common.openapi import build_openapi
from common.routes import API, GATEWAY, Operation
from common.settings import kafka_client_config
from infra.events import JobEvents, JobRead

log = logging.getLogger("gateway")

PROBLEM_JSON = "application/problem+json"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
              "expect", "date", "server"}
STATIC_DIR = Path(__file__).resolve().parent / "static"  # the dashboard
FINAL_DOC = re.compile(rb'"status":\s*"(\w+)"')
# A job cancelled by its parent's failure may come back (common.cache.is_final).
CANCELLED_BY_PARENT = re.compile(rb'"cancelled_by":\s*"')

SWAGGER_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Jobs API</title>
<link rel="stylesheet" href="/swagger-ui/swagger-ui.css">
<link rel="icon" type="image/png" href="/swagger-ui/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/swagger-ui/swagger-ui-standalone-preset.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  persistAuthorization: false,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
  layout: "StandaloneLayout"});
</script></body></html>
"""


def swagger_dir() -> Path:
    import swagger_ui_bundle

    return Path(str(swagger_ui_bundle.swagger_ui_path))


def problem(exc: ApiError, instance: str | None = None) -> Response:
    return Response(json.dumps(exc.to_problem(instance)), status_code=exc.status,
                    headers=exc.headers, media_type=PROBLEM_JSON)


def model_response(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status,
                    media_type="application/json")


class FinalDocuments:
    """Documents of jobs in a final state, least recently used dropped past `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.hits = 0  # answers from memory not yet added to the shared counter
        self._docs: OrderedDict[str, bytes] = OrderedDict()

    def get(self, job_id: str) -> bytes | None:
        doc = self._docs.get(job_id)
        if doc is not None:
            self._docs.move_to_end(job_id)
        return doc

    def remember(self, job_id: str, doc: bytes) -> None:
        """Keep `doc` if it is final (anything else may still change) and small enough."""
        match = FINAL_DOC.search(doc)
        if match is None or match.group(1).decode() not in FINAL_STATES \
                or CANCELLED_BY_PARENT.search(doc) \
                or len(doc) > self.max_bytes // 8 or job_id in self._docs:
            return
        self._docs[job_id] = doc
        self.size += len(doc)
        while self.size > self.max_bytes:
            _, dropped = self._docs.popitem(last=False)
            self.size -= len(dropped)

    def __len__(self) -> int:
        return len(self._docs)


class Gateway:
    """What the routes share: upstream clients, the token checker, remembered documents."""

    def __init__(self, upstreams: dict[str, str], *, memory_bytes: int = 32 << 20) -> None:
        # Each function's URL, or several comma-separated (replicas): taken in turn.
        self.upstreams = upstreams
        self._replicas = {name: [u.strip().rstrip("/") for u in urls.split(",")]
                          for name, urls in upstreams.items()}
        self._turn = {name: itertools.count() for name in upstreams}
        self.settings = clients.settings()
        self.auth = clients.authenticator()
        self.memory = FinalDocuments(memory_bytes)
        # Authorization headers that recently passed a jobs:read check, to the time they
        # stop being trusted without asking `auth` again (the hot path skips the hashing).
        self.readers: dict[bytes, float] = {}
        self._http: aiohttp.ClientSession | None = None  # made in the event loop (lifespan)
        self._metrics: Any = None
        # Event streams, and the cache's announcements (final documents fill `memory`).
        self.events = JobEvents(self.settings, self.read_job, self.memory.get,
                                self.memory.remember)

    # -- life ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self._http = aiohttp.ClientSession(
            # gunicorn closes an idle keep-alive connection after 2 s: reuse under 1 s only.
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=1.0),
            timeout=aiohttp.ClientTimeout(total=60, sock_connect=2), auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))
        tasks = [asyncio.create_task(self.events.announcements.run()),
                 asyncio.create_task(self.count_memory_hits()),
                 asyncio.create_task(self.warm_up())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._flush_hits()
            await self._http.close()

    async def warm_up(self) -> None:
        """Open this worker's database session and rehearse the token lookup now, so that
        its first request is as fast as the tenth. Trouble is only logged."""
        try:
            await run_in_threadpool(lambda: auth.rehearse(clients.database()))
        except Exception as exc:
            log.info("warm-up incomplete (%s); the first request finishes it", exc)

    async def count_memory_hits(self) -> None:
        """Add answers from memory to the shared lookup counter once a second: counting
        each in the multiprocess counter file costs about a tenth of such an answer."""
        while True:
            await asyncio.sleep(1.0)
            self._flush_hits()

    def _flush_hits(self) -> None:
        hits, self.memory.hits = self.memory.hits, 0
        if hits:
            job_metrics.STATUS_LOOKUPS.labels("memory").inc(hits)

    # -- checks ----------------------------------------------------------------------

    async def authorize(self, request: Request, op: Operation) -> Principal:
        if op.public:
            return ANONYMOUS
        header = request.headers.get("authorization")
        scrape = self.settings.metrics_token
        if op.operation_id == "metrics" and scrape and header is not None and \
                hmac.compare_digest(header.encode(), f"Bearer {scrape}".encode()):
            return Principal(token_id=None, name="metrics scrape", scopes=frozenset())
        principal = self.auth.cached(header, op.scope)
        if principal is None:
            principal = await run_in_threadpool(self.auth.check, header, op.scope)
        return principal

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, "Body too large",
                           f"request body is {length} bytes; the limit is {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "Body too large", f"request body exceeds {limit} bytes")
        return bytes(body)

    # -- forwarding ------------------------------------------------------------------

    async def forward(self, request: Request, op: Operation) -> Response:
        """Send the request on to the function that answers `op`; stream files back."""
        await self.authorize(request, op)
        for name in ONCE_ONLY:
            if len(request.headers.getlist(name)) > 1:  # a server would join them with ","
                raise ApiError(400, f"Bad {name.title()}", f"{name.title()} was sent more"
                               " than once; send it once")
        job_id = request.path_params.get("job_id") if op.operation_id == "getJob" else None
        if job_id is not None:
            doc = self.memory.get(job_id)
            if doc is not None:
                self.memory.hits += 1
                return Response(doc, media_type="application/json")
        body = await self.read_body(request) if request.method not in ("GET", "HEAD") else None
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        path = raw_path.decode("latin-1")
        if request.url.query:
            path += "?" + request.url.query
        headers = [(k, v) for k, v in request.headers.items() if k not in HOP_BY_HOP]
        try:
            response = await self._send_to_any(op.function, request.method, path, headers,
                                               body)
            if op.operation_id == "getArtifact":  # files stream; JSON answers are small
                return StreamingResponse(
                    response.content.iter_chunked(65536), status_code=response.status,
                    headers=_passed_on(response), background=BackgroundTask(response.release))
            content = await response.read()
        except aiohttp.ClientError as exc:
            log.warning("%s unreachable: %s", op.function, exc)
            raise ApiError(503, "Service unavailable",
                           f"the {op.function} function is not answering",
                           headers={"Retry-After": "2"}) from exc
        response.release()
        if job_id is not None and response.status == 200:
            self.memory.remember(job_id, content)
        return Response(content, status_code=response.status, headers=_passed_on(response))

    async def read_job(self, job_id: str, authorization: str | None) -> JobRead:
        """`GET /jobs/{id}` from the status function, as the holder of `authorization`."""
        headers = [("Authorization", authorization)] if authorization else []
        try:
            response = await self._send_to_any("status", "GET", f"/jobs/{quote(job_id, safe='')}",
                                               headers, None)
            content = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(503, "Service unavailable", "the status function is not answering",
                           headers={"Retry-After": "2"}) from exc
        response.release()
        if response.status == 200:
            self.memory.remember(job_id, content)
        return response.status, content, _passed_on(response)

    async def _send_to_any(self, function: str, method: str, path: str,
                           headers: list[tuple[str, str]], body: bytes | None
                           ) -> aiohttp.ClientResponse:
        """To the function's replicas in turn. One that refuses the connection never saw
        the request, so the next one is asked, whatever the method."""
        replicas = self._replicas[function]
        start = next(self._turn[function])
        for i in range(len(replicas)):
            url = yarl.URL(replicas[(start + i) % len(replicas)] + path, encoded=True)
            try:
                return await self._send(method, url, headers, body)
            except aiohttp.ClientConnectorError as exc:
                if i == len(replicas) - 1:
                    raise
                log.warning("%s is not answering (%s); asking another replica", url, exc)
        raise AssertionError("unreachable")

    async def _send(self, method: str, url: yarl.URL, headers: list[tuple[str, str]],
                    body: bytes | None) -> aiohttp.ClientResponse:
        assert self._http is not None, "the gateway's lifespan has not started"
        for attempt in (1, 2):
            try:
                return await self._http.request(method, url, headers=headers, data=body,
                                                allow_redirects=False)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # A kept-alive connection the function closed meanwhile: a GET may go again.
                if attempt == 2 or method not in ("GET", "HEAD"):
                    raise
        raise AssertionError("unreachable")

    # -- the gateway's own operations --------------------------------------------------

    async def create_token(self, request: Request, principal: Principal) -> Response:
        from common.http import parse_model

        body = await self.read_body(request)
        mimetype = request.headers.get("content-type", "").split(";")[0].strip()
        if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
            raise ApiError(415, "Unsupported media type",
                           f"send JSON with Content-Type: application/json, not {mimetype}")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, "Malformed JSON", f"the body is not valid JSON: {exc}") from exc
        check_storable(data)
        asked = parse_model(TokenRequest, data)
        made = await run_in_threadpool(auth.create_token, clients.database(), asked.name,
                                       asked.scopes, asked.expires_at)
        return model_response(TokenCreated.model_validate(made), 201)

    async def list_tokens(self, request: Request, principal: Principal) -> Response:
        items = await run_in_threadpool(auth.list_tokens, clients.database())
        return model_response(TokenPage.model_validate({"items": items}))

    async def revoke_token(self, request: Request, principal: Principal) -> Response:
        token_id = request.path_params["token_id"]
        if not await run_in_threadpool(auth.revoke_token, clients.database(), token_id):
            raise ApiError(404, "Token not found", f"no token {token_id}")
        self.auth.forget(token_id)
        self.readers.clear()
        return Response(status_code=204)

    async def job_events(self, request: Request, principal: Principal) -> Response:
        return await self.events.answer(request)

    async def whoami(self, request: Request, principal: Principal) -> Response:
        return model_response(Identity(name=principal.name, scopes=sorted(principal.scopes)))

    async def metrics(self, request: Request, principal: Principal) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        from infra.metrics import MetricsEndpoint

        if self._metrics is None:
            self._metrics = MetricsEndpoint()
        body = await run_in_threadpool(self._metrics.render)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def health(self, request: Request, principal: Principal) -> Response:
        return model_response(Health(status="ok"))

    async def ready(self, request: Request, principal: Principal) -> Response:
        checks = await run_in_threadpool(readiness, self.upstreams)
        ok = all(c["ok"] for c in checks.values())
        return model_response(Readiness(ready=ok, checks=checks), 200 if ok else 503)

    async def openapi(self, request: Request, principal: Principal) -> Response:
        if not hasattr(self, "_openapi"):
            await run_in_threadpool(clients.handlers)
            self._openapi = json.dumps(build_openapi())
        return Response(self._openapi, media_type="application/json")


# Headers whose repeats the functions' server would join into one value ("k1,k2"): an
# Idempotency-Key sent twice must not become a third key.
ONCE_ONLY = ("idempotency-key", "authorization")
READER_SECONDS = 0.5  # well inside the token cache's own 2 s
JOB_PATH = re.compile(r"/jobs/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


class RememberedLookups:
    """ASGI wrapper: `GET /jobs/{id}` of a remembered final job, answered before routing.

    The hot path of every client that polls. It answers only when the document is in
    memory and the token is already verified in this process; anything else (a miss, an
    unknown or refused token, another route) goes to the app, which says why.
    """

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") \
                and not scope["query_string"]:
            match = JOB_PATH.fullmatch(scope["path"])
            doc = self.gateway.memory.get(match.group(1)) if match else None
            if doc is not None and self._allowed(scope):
                self.gateway.memory.hits += 1
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(doc)).encode())]})
                await send({"type": "http.response.body",
                            "body": doc if scope["method"] == "GET" else b""})
                return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if header is None:
            return False
        readers = self.gateway.readers
        now = time.monotonic()
        if readers.get(header, 0.0) > now:  # this very header passed within READER_SECONDS
            return True
        try:
            if self.gateway.auth.cached(header.decode("latin-1"), TokenScope.READ) is None:
                return False
        except ApiError:
            return False  # the app answers the 401 or 403 itself
        if len(readers) > 10_000:
            readers.clear()
        readers[header] = now + READER_SECONDS
        return True


def _passed_on(response: aiohttp.ClientResponse) -> dict[str, str]:
    """The upstream answer's headers a client should see (no hop-by-hop ones)."""
    return {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}


def _guarded(handler: Callable[[Request], Awaitable[Response]]
             ) -> Callable[[Request], Awaitable[Response]]:
    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except ClientDisconnect:  # nobody to answer; nothing was forwarded
            return Response(status_code=400)
        except ApiError as exc:
            return problem(exc, request.url.path)
        except ServiceUnavailable as exc:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
            return problem(ApiError(503, "Service unavailable",
                                    f"{exc.service} is unavailable; try again shortly",
                                    headers={"Retry-After": str(exc.retry_after)}),
                           request.url.path)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return problem(ApiError(500, "Internal error",
                                    "the gateway failed to answer; the error is in its log"),
                           request.url.path)
    return guarded


def api_routes(gateway: Gateway) -> list[Route]:
    """One route per declared path; each method goes to its operation."""
    by_path: dict[str, dict[str, Operation]] = {}
    for op in API:
        by_path.setdefault(op.path, {})[op.method] = op
    routes = []
    for path, ops in by_path.items():
        async def endpoint(request: Request, ops: dict[str, Operation] = ops) -> Response:
            op = ops["GET" if request.method == "HEAD" else request.method]
            if op.function != GATEWAY:
                return await gateway.forward(request, op)
            principal = await gateway.authorize(request, op)
            own: Callable[[Request, Principal], Awaitable[Response]] = getattr(
                gateway, _OWN[op.operation_id])
            return await own(request, principal)

        routes.append(Route(path, _guarded(endpoint), methods=list(ops)))
    return routes


_OWN = {"createToken": "create_token", "listTokens": "list_tokens",
        "revokeToken": "revoke_token", "whoami": "whoami", "metrics": "metrics",
        "health": "health", "ready": "ready", "openapi": "openapi",
        "streamJobEvents": "job_events"}


async def _swagger(request: Request) -> Response:
    return HTMLResponse(SWAGGER_HTML)


async def _dashboard(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        detail = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    else:
        detail = str(exc.detail)
    title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "Error")
    return problem(ApiError(exc.status_code, title, detail, headers=headers),
                   request.url.path)


def create_gateway(upstreams: dict[str, str]) -> Starlette:
    """The gateway app, forwarding to `upstreams` ({"submit": url, "status": url})."""
    gateway = Gateway(upstreams, memory_bytes=clients.settings().gateway_memory_bytes)
    routes: list[Route | Mount] = [
        *api_routes(gateway),
        Route("/swagger-ui.html", _swagger, methods=["GET"]),
        Route("/docs", _swagger, methods=["GET"]),
        Route("/", _dashboard, methods=["GET"]),
        Route("/dashboard", _dashboard, methods=["GET"]),
        Mount("/swagger-ui", StaticFiles(directory=swagger_dir())),
        Mount("/static", StaticFiles(directory=STATIC_DIR)),
    ]
    for route in routes:
        if isinstance(route, Route):
            # Starlette anchors paths with `$`, which also matches before a final newline:
            # `/jobs%0A` would be `/jobs`. Anchor at the very end instead.
            route.path_regex = re.compile(route.path_regex.pattern.removesuffix("$") + r"\Z")
    app = Starlette(routes=routes, lifespan=gateway.lifespan,
                    exception_handlers={HTTPException: _http_error})
    app.state.gateway = gateway
    return app


def create_front(upstreams: dict[str, str]) -> ASGIApp:
    """The gateway app behind its fast path for remembered job documents."""
    app = create_gateway(upstreams)
    return RememberedLookups(app, app.state.gateway)


def app_from_environment() -> ASGIApp:
    """The uvicorn factory: upstream URLs from JOBS_SUBMIT_URL and JOBS_STATUS_URL."""
    _die_with_parent()
    configure_logging("gateway")
    clients.needs("database_url", "redis_url")
    missing = [n for n in ("JOBS_SUBMIT_URL", "JOBS_STATUS_URL") if not os.environ.get(n)]
    if missing:
        raise SystemExit(f"the gateway needs {' and '.join(missing)}")
    settings = clients.settings()
    if not settings.auth:
        log.warning("JOBS_AUTH=off: every route is open to anyone who reaches this port;"
                    " for local experiments only")
    return create_front({"submit": os.environ["JOBS_SUBMIT_URL"],
                         "status": os.environ["JOBS_STATUS_URL"]})


def _die_with_parent() -> None:
    """A worker ends when the process that started it dies, even by SIGKILL (Linux), and
    at once if that process is gone already."""
    import multiprocessing
    import signal

    from infra.services import die_with_parent

    parent = multiprocessing.parent_process()  # None: uvicorn runs one worker in-process
    if parent is not None and parent.pid is not None:
        die_with_parent(signal.SIGTERM, parent=parent.pid)()


def readiness(upstreams: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each dependency and function, checked with a short timeout."""
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    settings = clients.settings()
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, probe: Callable[[], Any]) -> None:
        try:
            probe()
            checks[name] = {"ok": True}
        except Exception as exc:
            checks[name] = {"ok": False, "error": str(exc)[:300]}

    check("postgresql", lambda: clients.database().run("SELECT 1"))

    def redis_ping() -> None:
        if not clients.cache().ping():
            raise RuntimeError("no answer to PING")

    check("redis", redis_ping)
    admin = AdminClient(kafka_client_config(settings))
    check("kafka", lambda: admin.list_topics(timeout=2))

    def consumed(group: str, topic: str) -> None:
        # A group that has not finished joining would leave the first jobs waiting for it.
        state = admin.describe_consumer_groups([group], request_timeout=2)[group].result().state
        if state != ConsumerGroupState.STABLE:
            raise RuntimeError(f"consumer group {group} is {state.name}: nothing delivers"
                               f" {topic} to its function yet")

    # Every job topic: the job queue and each job type's own (JOBS_HANDLER_MODULES).
    topics = {settings.queue_topic: settings.queue_consumer_group}
    check("handlers", lambda: topics.update(clients.job_topics()))
    for topic, group in topics.items():
        check(f"trigger:{topic}", lambda g=group, t=topic: consumed(g, t))
    for name, urls in upstreams.items():
        for i, url in enumerate(urls.split(",")):
            parsed = urlparse(url.strip())
            check(f"function:{name}" + (f"-{i + 1}" if i else ""),
                  lambda p=parsed: socket.create_connection(
                      (p.hostname, p.port or 80), timeout=1).close())
    return checks


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="The API gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8080)))
    parser.add_argument("--submit", default=os.environ.get("JOBS_SUBMIT_URL"))
    parser.add_argument("--status", default=os.environ.get("JOBS_STATUS_URL"))
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.submit:
        os.environ["JOBS_SUBMIT_URL"] = args.submit
    if args.status:
        os.environ["JOBS_STATUS_URL"] = args.status
    configure_logging("gateway")
    # log_config=None: uvicorn's loggers keep no handlers of their own and reach ours
    # (JSON lines), in the supervisor and in each worker (app_from_environment).
    uvicorn.run("infra.gateway:app_from_environment", factory=True, host=args.host,
                port=args.port, workers=args.workers, log_config=None, log_level="warning",
                access_log=False,
                http="infra.http_guard:GuardedHttpToolsProtocol",  # limits and timeouts
                timeout_keep_alive=30, timeout_graceful_shutdown=30,
                server_header=False, proxy_headers=False)


if __name__ == "__main__":
    main()
