"""The OpenAPI 3.1 document, generated from the pydantic models and the job-type registry."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from common.api import MAX_BATCH
from common.handlers import registered
from common.models import DeadLetterPage, JobDocument, JobPage, JobStatus, Problem

REF = "#/components/schemas/{model}"


def _problem(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/problem+json": {"schema": {"$ref": REF.format(
                model="Problem")}}}}


def _json(ref: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {
        "application/json": {"schema": {"$ref": REF.format(model=ref)}}}}
    if headers:
        out["headers"] = headers
    return out


def _submission_schemas(types: dict[str, Any]) -> dict[str, Any]:
    """One submission schema per job type, so each type's payload model is documented."""
    schemas: dict[str, Any] = {}
    variants = []
    for name, jt in sorted(types.items()):
        model_name = f"Submit_{name}"
        payload: dict[str, Any] = {"type": "object", "description": "Free-form payload"}
        if jt.payload_model is not None:
            payload = {"$ref": REF.format(model=jt.payload_model.__name__)}
        schemas[model_name] = {
            "type": "object",
            "title": model_name,
            "description": jt.description or f"Submit a {name} job",
            "properties": {
                "job_type": {"const": name},
                "payload": payload,
                "max_retries": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100},
                                          {"type": "null"}],
                                "description": "Retries after the first attempt"},
            },
            "required": ["job_type", "payload"],
            "additionalProperties": False,
        }
        variants.append({"$ref": REF.format(model=model_name)})
    schemas["JobSubmission"] = ({"oneOf": variants, "discriminator": {
        "propertyName": "job_type",
        "mapping": {name: REF.format(model=f"Submit_{name}") for name in sorted(types)}}}
        if variants else {"type": "object"})
    return schemas


def build_openapi(server_url: str | None = None) -> dict[str, Any]:
    """The whole document for the public API."""
    types = registered()
    models: list[type[BaseModel]] = [JobDocument, JobPage, DeadLetterPage, Problem]
    models += [jt.payload_model for jt in types.values() if jt.payload_model is not None]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas = defs.get("$defs", {})
    schemas.update(_submission_schemas(types))
    schemas["BatchSubmission"] = {
        "type": "object",
        "properties": {"jobs": {"type": "array", "minItems": 1,
                                "maxItems": MAX_BATCH,
                                "items": {"$ref": REF.format(model="JobSubmission")}}},
        "required": ["jobs"], "additionalProperties": False,
    }
    schemas["BatchAccepted"] = {"type": "object", "properties": {"jobs": {
        "type": "array", "items": {"$ref": REF.format(model="JobDocument")}}},
        "required": ["jobs"]}
    job_id = {"name": "job_id", "in": "path", "required": True,
              "schema": {"type": "string", "format": "uuid"}}
    cursor = {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
              "description": "`next_cursor` of the previous page"}
    limit = {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}}
    location = {"Location": {"schema": {"type": "string"}, "description": "URL of the job"}}
    bad = {"400": _problem("Malformed JSON or bad parameter"),
           "413": _problem("Body over the size limit"),
           "415": _problem("Body is not JSON"),
           "422": _problem("Unknown job type or invalid payload"),
           "503": _problem("PostgreSQL unavailable; retry after `Retry-After` seconds")}
    idem = {"name": "Idempotency-Key", "in": "header", "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
            "description": "Same key and body: the same job. Same key, other body: 409."}
    paths: dict[str, Any] = {
        "/jobs": {
            "post": {
                "summary": "Submit a job", "operationId": "submitJob",
                "parameters": [idem],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": REF.format(model="JobSubmission")}}}},
                "responses": {"202": _json("JobDocument", "Accepted", location),
                              "409": _problem("Idempotency-Key reused with another body"),
                              **bad},
            },
            "get": {
                "summary": "List jobs, newest first", "operationId": "listJobs",
                "parameters": [
                    {"name": "status", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": [s.value for s in JobStatus]}},
                    {"name": "job_type", "in": "query", "required": False,
                     "schema": {"type": "string"}},
                    cursor, limit],
                "responses": {"200": _json("JobPage", "A page of jobs"),
                              "400": _problem("Bad filter or cursor")},
            },
        },
        "/jobs/batch": {"post": {
            "summary": "Submit up to 1000 jobs in one transaction", "operationId": "submitBatch",
            "parameters": [idem],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": REF.format(model="BatchSubmission")}}}},
            "responses": {"202": _json("BatchAccepted", "Accepted"),
                          "409": _problem("Idempotency-Key reused with another body"), **bad},
        }},
        "/jobs/{job_id}": {"get": {
            "summary": "A job's state (served from the Redis cache)", "operationId": "getJob",
            "parameters": [job_id],
            "responses": {"200": _json("JobDocument", "The job"),
                          "400": _problem("Not a UUID"), "404": _problem("No such job")},
        }},
        "/jobs/{job_id}/artifact": {"get": {
            "summary": "Download the file a job produced", "operationId": "getArtifact",
            "parameters": [job_id],
            "responses": {"200": {"description": "The artifact",
                                  "content": {"application/octet-stream": {}}},
                          "400": _problem("Not a UUID"),
                          "404": _problem("No such job or no artifact")},
        }},
        "/jobs/{job_id}/retry": {"post": {
            "summary": "Replay a dead-lettered job with a fresh retry budget",
            "operationId": "replayJob", "parameters": [job_id],
            "responses": {"202": _json("JobDocument", "Queued again", location),
                          "400": _problem("Not a UUID"), "404": _problem("No such job"),
                          "409": _problem("The job is not dead-lettered"),
                          "503": _problem("PostgreSQL unavailable")},
        }},
        "/dead-letters": {"get": {
            "summary": "Dead letters, newest first", "operationId": "listDeadLetters",
            "parameters": [cursor, limit],
            "responses": {"200": _json("DeadLetterPage", "A page of dead letters"),
                          "400": _problem("Bad cursor")},
        }},
        "/healthz": {"get": {"summary": "Liveness", "operationId": "health",
                             "responses": {"200": {"description": "Alive"}}}},
        "/readyz": {"get": {"summary": "Readiness of every dependency", "operationId": "ready",
                            "responses": {"200": {"description": "All dependencies up"},
                                          "503": {"description": "Some dependency down"}}}},
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "Jobs API", "version": "0.1.0",
                 "description": "Submit slow work, get a job id back at once, follow it."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
