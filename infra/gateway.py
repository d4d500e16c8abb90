"""The local API gateway on :8080: routes the public API to the functions, serves the
OpenAPI document, Swagger UI (assets from the swagger-ui-bundle package, no CDN),
`/healthz` and `/readyz`.

Run: python -m infra.gateway --port 8080 --submit URL --status URL
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

import flask
import urllib3
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from common import clients
from common import metrics as job_metrics
from common.openapi import build_openapi

log = logging.getLogger("gateway")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}

# (method, path) -> upstream name; the same table the OpenAPI document describes.
ROUTES = [
    ("POST", r"/jobs", "submit"),
    ("POST", r"/jobs/batch", "submit"),
    ("POST", r"/jobs/[^/]+/retry", "submit"),
    ("POST", r"/jobs/[^/]+/cancel", "submit"),
    ("GET", r"/jobs", "status"),
    ("GET", r"/jobs/[^/]+", "status"),
    ("GET", r"/jobs/[^/]+/artifact", "status"),
    ("GET", r"/jobs/[^/]+/attempts", "status"),
    ("GET", r"/dead-letters", "status"),
    ("GET", r"/stats", "status"),
]
JOB_PATH = re.compile(r"^/jobs/[0-9a-fA-F-]{36}\Z")
COMPILED = [(m, re.compile(rf"^{p}/?\Z"), u) for m, p, u in ROUTES]

STATIC_DIR = Path(__file__).resolve().parent / "static"  # the dashboard

SWAGGER_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Jobs API</title>
<link rel="stylesheet" href="/swagger-ui/swagger-ui.css">
<link rel="icon" type="image/png" href="/swagger-ui/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/swagger-ui/swagger-ui-standalone-preset.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
  layout: "StandaloneLayout"});
</script></body></html>
"""


def swagger_dir() -> Path:
    import swagger_ui_bundle

    return Path(str(swagger_ui_bundle.swagger_ui_path))


def problem(status: int, title: str, detail: str, **headers: str) -> flask.Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    response = flask.Response(json.dumps(body), status=status,
                              mimetype="application/problem+json")
    response.headers.update(headers)
    return response


def create_gateway(upstreams: dict[str, str], *, max_body: int | None = None) -> flask.Flask:
    """The gateway app, forwarding to `upstreams` ({"submit": url, "status": url})."""
    app = flask.Flask("gateway", static_folder=None)  # /static/ is the dashboard's, below
    # A pooled connection the function closed while idle (gunicorn's keep-alive is 2 s)
    # fails on reuse: retry reads only where a repeat is harmless (GET), connects always.
    retries = urllib3.Retry(total=2, connect=2, read=1, redirect=0, status=0, other=0,
                            allowed_methods=frozenset({"GET", "HEAD"}), raise_on_status=False)
    http = urllib3.PoolManager(maxsize=64, block=False, retries=retries,
                               timeout=urllib3.Timeout(connect=2.0, read=30.0))
    assets = swagger_dir()
    limit = max_body or clients.settings().max_body_bytes
    openapi_cache: dict[str, Any] = {}

    @app.get("/healthz")
    def healthz() -> flask.Response:
        return flask.jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> flask.Response:
        checks = readiness(upstreams)
        ok = all(c["ok"] for c in checks.values())
        return flask.Response(json.dumps({"ready": ok, "checks": checks}),
                              status=200 if ok else 503, mimetype="application/json")

    metrics_endpoint: list[Any] = []

    @app.get("/metrics")
    def metrics() -> flask.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        from infra.metrics import MetricsEndpoint

        if not metrics_endpoint:
            metrics_endpoint.append(MetricsEndpoint())
        return flask.Response(metrics_endpoint[0].render(), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json")
    def openapi() -> flask.Response:
        if "doc" not in openapi_cache:
            clients.handlers()
            openapi_cache["doc"] = build_openapi()
        return flask.jsonify(openapi_cache["doc"])

    @app.get("/swagger-ui.html")
    @app.get("/docs")
    def swagger() -> flask.Response:
        return flask.Response(SWAGGER_HTML, mimetype="text/html")

    @app.get("/swagger-ui/<path:name>")
    def swagger_asset(name: str) -> flask.Response:
        return flask.send_from_directory(assets, name, max_age=3600)

    # The dashboard: one page (hash routing) and its assets, shipped in the package.
    @app.get("/")
    @app.get("/dashboard")
    def dashboard() -> flask.Response:
        return flask.send_from_directory(STATIC_DIR, "index.html", max_age=0)

    @app.get("/static/<path:name>")
    def static_asset(name: str) -> flask.Response:
        return flask.send_from_directory(STATIC_DIR, name, max_age=0)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> flask.Response:
        # Werkzeug's own errors as problem documents, never its HTML pages. A path the
        # `<path:path>` rule does not take (a newline in a segment) is forwarded all the
        # same, so the function gives it the answer any other bad id gets.
        if isinstance(exc, NotFound) and flask.request.url_rule is None:
            return forward(flask.request.path.removeprefix("/"))
        headers = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return problem(exc.code or 500, exc.name, exc.description or exc.name, **headers)

    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
    def forward(path: str) -> flask.Response:
        request = flask.request
        route_path = "/" + path
        if request.method == "GET" and JOB_PATH.match(route_path):
            cached = cached_job(route_path[len("/jobs/"):])
            if cached is not None:
                return cached
        matches = [(m, u) for m, p, u in COMPILED if p.match(route_path)]
        method = "GET" if request.method == "HEAD" else request.method
        upstream = next((u for m, u in matches if m == method), None)
        if upstream is None:
            methods = {m for m, _ in matches}
            if _own_get_route(route_path):
                methods |= {"GET", "HEAD"}  # /healthz and the like: the gateway's own
            if methods:
                return problem(405, "Method not allowed",
                               f"{request.method} is not allowed on {route_path}",
                               Allow=", ".join(sorted(methods)))
            return problem(404, "Not found", f"no route for {request.method} {route_path}")
        length = request.content_length
        if length is not None and length > limit:
            return problem(413, "Body too large",
                           f"request body is {length} bytes; the limit is {limit} bytes")
        body = request.stream.read(limit + 1) if method != "GET" else None
        if body is not None and len(body) > limit:
            return problem(413, "Body too large", f"request body exceeds {limit} bytes")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = upstreams[upstream] + route_path
        if request.query_string:
            url += "?" + request.query_string.decode("latin-1")
        stream = route_path.endswith("/artifact")  # files stream; JSON answers are small
        try:
            upstream_response = http.request(request.method, url, body=body, headers=headers,
                                             preload_content=not stream)
        except urllib3.exceptions.HTTPError as exc:
            log.warning("%s unreachable: %s", upstream, exc)
            return problem(503, "Service unavailable",
                           f"the {upstream} function is not answering", **{"Retry-After": "2"})
        out_headers = [(k, v) for k, v in upstream_response.headers.items()
                       if k.lower() not in HOP_BY_HOP]
        if not stream:
            return flask.Response(upstream_response.data, status=upstream_response.status,
                                  headers=out_headers)
        return flask.Response(upstream_response.stream(65536), status=upstream_response.status,
                              headers=out_headers, direct_passthrough=True)

    def cached_job(job_id: str) -> flask.Response | None:
        """Edge cache: a job document straight from Redis, saving the hop to `status`.
        Anything else (a miss, a bad id, Redis trouble) goes to the status function."""
        try:
            uuid.UUID(job_id)
        except ValueError:
            return None
        doc = clients.cache().get(job_id)
        if doc is None:
            return None
        job_metrics.STATUS_LOOKUPS.labels("cache").inc()
        return flask.Response(json.dumps(doc), mimetype="application/json")

    def _own_get_route(route_path: str) -> bool:
        """True for a page the gateway serves itself (/healthz, /openapi.json...)."""
        try:
            endpoint, _ = app.url_map.bind("localhost").match(route_path, method="GET")
        except HTTPException:
            return False
        return endpoint != "forward"

    return app


def readiness(upstreams: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each dependency and function, checked with a short timeout."""
    import socket
    from urllib.parse import urlparse

    from confluent_kafka.admin import AdminClient

    settings = clients.settings()
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, probe: Any) -> None:
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
    check("kafka", lambda: AdminClient({
        "bootstrap.servers": settings.kafka_bootstrap_servers}).list_topics(timeout=2))
    for name, url in upstreams.items():
        parsed = urlparse(url)
        check(f"function:{name}", lambda p=parsed: socket.create_connection(
            (p.hostname, p.port or 80), timeout=1).close())
    return checks


def main(argv: list[str] | None = None) -> None:
    from gunicorn.app.base import BaseApplication

    parser = argparse.ArgumentParser(description="Local API gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--submit", default=os.environ.get("JOBS_SUBMIT_URL"), required=False)
    parser.add_argument("--status", default=os.environ.get("JOBS_STATUS_URL"), required=False)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    app = create_gateway({"submit": args.submit, "status": args.status})

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("threads", args.threads)
            self.cfg.set("loglevel", "warning")
            self.cfg.set("timeout", 0)

        def load(self) -> flask.Flask:
            return app

    Server().run()


if __name__ == "__main__":
    main()
