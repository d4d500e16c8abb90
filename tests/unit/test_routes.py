"""The API is declared once (common.routes): what is served and what is documented are
both derived from it, so neither can drift from the other."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from starlette.routing import Route

from common import clients
from common.openapi import build_openapi
from common.routes import API, GATEWAY, operations
from common.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]
# Served beside the API, not part of it: Swagger UI, the dashboard and their assets.
STATIC = {"/swagger-ui.html", "/docs", "/", "/dashboard"}


@pytest.fixture(autouse=True)
def service_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Functions refuse to load without their services' URLs; nothing connects here."""
    for name, url in [("DATABASE_URL", "postgresql://u@db.invalid/jobs"),
                      ("REDIS_URL", "redis://cache.invalid/0"),
                      ("KAFKA_BOOTSTRAP_SERVERS", "broker.invalid:9092"),
                      ("SMTP_URL", "smtp://mail.invalid:25")]:
        monkeypatch.setenv(name, url)
    get_settings.cache_clear()


def _function_module(name: str):
    spec = importlib.util.spec_from_file_location(f"fn_{name}", ROOT / "functions" / name
                                                  / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _served_by_functions() -> set[tuple[str, str]]:
    served = set()
    for name in ("submit", "status"):
        for rule in _function_module(name).DISPATCH.map.iter_rules():
            path = rule.rule.replace("<", "{").replace(">", "}")
            served |= {(m, path) for m in rule.methods if m not in ("HEAD", "OPTIONS")}
    return served


def _served_by_the_gateway() -> set[tuple[str, str]]:
    from infra.gateway import create_gateway

    app = create_gateway({"submit": "http://submit.invalid", "status": "http://status.invalid"})
    return {(m, route.path) for route in app.routes if isinstance(route, Route)
            and route.path not in STATIC for m in route.methods or () if m != "HEAD"}


def _documented() -> set[tuple[str, str]]:
    clients.handlers()
    return {(method.upper(), path) for path, item in build_openapi()["paths"].items()
            for method in item}


def test_every_declared_operation_is_documented_and_nothing_else_is():
    assert _documented() == {(op.method, op.path) for op in API}


def test_the_gateway_serves_exactly_the_documented_operations():
    assert _served_by_the_gateway() == _documented()


def test_each_function_serves_exactly_its_declared_operations():
    declared = {(op.method, op.path) for op in API if op.function != GATEWAY}
    assert _served_by_functions() == declared


def test_every_operation_but_health_readiness_and_the_document_needs_a_token():
    public = {op.path for op in API if op.public}
    assert public == {"/healthz", "/readyz", "/openapi.json"}
    document = build_openapi()
    for op in API:
        entry = document["paths"][op.path][op.method.lower()]
        assert entry["security"] == ([] if op.public else [{"bearer": []}]), op.operation_id
        if not op.public:
            assert {"401", "403"} <= set(entry["responses"]), op.operation_id
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_operations_that_change_jobs_need_the_operate_scope_and_tokens_need_admin():
    scopes = {op.operation_id: op.scope for op in API}
    assert scopes["cancelJob"] == scopes["replayJob"] == "jobs:operate"
    assert scopes["submitJob"] == scopes["submitBatch"] == "jobs:submit"
    assert {scopes[o] for o in ("createToken", "listTokens", "revokeToken")} == {"admin"}
    assert {op.scope for op in operations("status")} == {"jobs:read"}
    assert scopes["createSchedule"] == "jobs:submit"
    assert {scopes[o] for o in ("deleteSchedule", "pauseSchedule", "resumeSchedule")} == {
        "jobs:operate"}
    assert {scopes[o] for o in ("listSchedules", "getSchedule")} == {"jobs:read"}


def test_the_submission_schema_documents_every_field_of_a_submission():
    clients.handlers()
    schemas = build_openapi()["components"]["schemas"]
    for variant in schemas["JobSubmission"]["oneOf"]:
        name = variant["$ref"].rsplit("/", 1)[1]
        assert {"job_type", "payload", "max_retries", "run_at"} <= set(
            schemas[name]["properties"]), name
    body = build_openapi()["paths"]["/jobs"]["post"]["requestBody"]["content"]
    assert body["application/json"]["example"]["job_type"] == "REPORT_GENERATION"


@pytest.mark.parametrize("name", ["submit", "status", "process", "dlq", "sweeper"])
def test_a_function_without_its_service_urls_refuses_to_load_naming_them(name, monkeypatch):
    monkeypatch.delenv("DATABASE_URL")
    get_settings.cache_clear()
    with pytest.raises(SystemExit, match="DATABASE_URL is not set"):
        _function_module(name)
