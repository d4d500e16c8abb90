"""The OpenAPI 3.1 document, derived from the API declaration (`common.routes`), the
pydantic models and the job-type registry."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from common.api import MAX_BATCH
from common.handlers import JobType, registered
from common.models import JobSubmission, Problem
from common.routes import API, AUTH_ERRORS, UNAVAILABLE, Operation
from common.schedules import NAME_PATTERN

REF = "#/components/schemas/{model}"
SECURITY_SCHEME = "bearer"
_PATH_PARAMS = {
    "job_id": {"type": "string", "format": "uuid"},
    "token_id": {"type": "string", "format": "uuid"},
    "name": {"type": "string", "pattern": NAME_PATTERN},  # a schedule's
}
_EXAMPLE_SUBMISSION = {
    "job_type": "REPORT_GENERATION",
    "payload": {"title": "Sales", "columns": ["region", "total"],
                "rows": [["north", 120], ["south", 80]], "format": "pdf"},
}


def _ref(model: str) -> dict[str, str]:
    return {"$ref": REF.format(model=model)}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/problem+json": {"schema": _ref("Problem")}}}


def _policy(jt: JobType) -> str:
    """The type's limits and topic, as a sentence for its schema's description."""
    parts = [f"at most {jt.concurrency} running at once" if jt.concurrency else "",
             f"rate limit {jt.rate_limit}" if jt.rate_limit else "",
             f"Kafka topic {jt.topic}" if jt.topic else ""]
    return "(" + "; ".join(p for p in parts if p) + ")" if any(parts) else ""


def _submission_schemas(types: dict[str, JobType], base: dict[str, Any]) -> dict[str, Any]:
    """One submission schema per job type (JobSubmission's fields, with the type's payload
    model), so each type's payload is documented and generated clients can build it."""
    schemas: dict[str, Any] = {}
    for name, jt in sorted(types.items()):
        properties = dict(base["properties"])
        properties["job_type"] = {"type": "string", "const": name, "enum": [name]}
        properties["payload"] = (_ref(jt.payload_model.__name__) if jt.payload_model
                                 else {"type": "object", "description": "Free-form payload"})
        schemas[f"Submit_{name}"] = {
            **base, "title": f"Submit_{name}", "properties": properties,
            "description": " ".join(filter(None, [jt.description or f"Submit a {name} job",
                                                  _policy(jt)])),
            "required": ["job_type", "payload"]}
    schemas["JobSubmission"] = {
        "oneOf": [_ref(f"Submit_{name}") for name in sorted(types)],
        "discriminator": {"propertyName": "job_type", "mapping": {
            name: REF.format(model=f"Submit_{name}") for name in sorted(types)}},
    } if types else base
    schemas["BatchSubmission"] = {
        "type": "object", "title": "BatchSubmission",
        "properties": {"jobs": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                                "items": _ref("JobSubmission")}},
        "required": ["jobs"], "additionalProperties": False,
    }
    return schemas


def _request_body(op: Operation) -> dict[str, Any] | None:
    schema: dict[str, Any]
    example: dict[str, Any] | None
    if op.operation_id == "submitJob":
        schema, example = _ref("JobSubmission"), _EXAMPLE_SUBMISSION
    elif op.operation_id == "submitBatch":
        schema, example = _ref("BatchSubmission"), {"jobs": [_EXAMPLE_SUBMISSION]}
    elif op.request is not None:
        schema, example = _ref(op.request.__name__), None
    else:
        return None
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"required": True, "content": {"application/json": media}}


def _operation(op: Operation) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True,
         "schema": _PATH_PARAMS.get(name, {"type": "string"})} for name in op.path_params]
    params += [{"name": p.name, "in": p.location, "required": False, "schema": p.schema,
                **({"description": p.description} if p.description else {})}
               for p in op.params]
    responses: dict[str, Any] = {}
    for status, answer in op.answers.items():
        out: dict[str, Any] = {"description": answer.description}
        if answer.media_type is not None:
            schema = _ref(answer.model.__name__) if answer.model else {}
            out["content"] = {answer.media_type: {"schema": schema} if schema else {}}
        if answer.headers:
            out["headers"] = {name: {"schema": {"type": "string"}, "description": text}
                              for name, text in answer.headers}
        responses[str(status)] = out
    errors = dict(op.errors)
    if not op.public:
        errors.update(AUTH_ERRORS)
        errors.setdefault(503, UNAVAILABLE)
    if op.path_params:
        errors.setdefault(400, "A malformed id")
    for status, description in sorted(errors.items()):
        responses[str(status)] = _problem(description)
    doc: dict[str, Any] = {
        "summary": op.summary, "operationId": op.operation_id, "tags": [op.tag],
        "responses": responses,
        # OpenAPI's bearer scheme carries no scopes; the one needed is in the description.
        "security": [] if op.public else [{SECURITY_SCHEME: []}],
    }
    if not op.public:
        doc["description"] = (f"Needs a token with the `{op.scope}` scope (or `admin`)."
                              if op.scope else "Needs any valid token.")
    if params:
        doc["parameters"] = params
    body = _request_body(op)
    if body is not None:
        doc["requestBody"] = body
    return doc


def build_openapi(server_url: str | None = None) -> dict[str, Any]:
    """The whole document for the public API: every declared operation, nothing else."""
    types = registered()
    models: set[type[BaseModel]] = {Problem, JobSubmission}
    models |= {a.model for op in API for a in op.answers.values() if a.model is not None}
    models |= {op.request for op in API if op.request is not None}
    models |= {jt.payload_model for jt in types.values() if jt.payload_model is not None}
    ordered = sorted(models, key=lambda m: m.__name__)
    _, defs = models_json_schema([(m, "validation") for m in ordered], ref_template=REF)
    schemas: dict[str, Any] = defs.get("$defs", {})
    schemas.update(_submission_schemas(types, schemas.pop("JobSubmission")))
    paths: dict[str, dict[str, Any]] = {}
    for op in API:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Jobs API", "version": "0.2.0",
                 "description": "Submit slow work, get a job id back at once, follow it. "
                                "Every operation but health, readiness and this document "
                                "needs `Authorization: Bearer <token>`."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {SECURITY_SCHEME: {
            "type": "http", "scheme": "bearer",
            "description": "An API token (make run writes an admin one to"
                           " .data/admin-token; more with POST /tokens)"}}},
        "security": [{SECURITY_SCHEME: []}],
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
