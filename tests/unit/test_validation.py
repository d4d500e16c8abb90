"""Request models, the handler registry and JOBS_HANDLER_MODULES, the OpenAPI document."""

import pytest
from pydantic import BaseModel, ValidationError

from common import handlers
from common.errors import ApiError
from common.jobs import decode_cursor, encode_cursor, request_fingerprint
from common.models import JobSubmission
from common.openapi import build_openapi
from common.settings import load_settings


def test_a_submission_needs_a_job_type_and_rejects_unknown_fields():
    with pytest.raises(ValidationError):
        JobSubmission.model_validate({"payload": {}})
    with pytest.raises(ValidationError):
        JobSubmission.model_validate({"job_type": "X", "payload": {}, "surprise": 1})
    with pytest.raises(ValidationError):
        JobSubmission.model_validate({"job_type": "X", "max_retries": -1})


def test_the_same_request_has_the_same_fingerprint_whatever_the_key_order():
    a = JobSubmission.model_validate({"job_type": "X", "payload": {"a": 1, "b": [1, 2]}})
    b = JobSubmission.model_validate({"payload": {"b": [1, 2], "a": 1}, "job_type": "X"})
    c = JobSubmission.model_validate({"job_type": "X", "payload": {"a": 2, "b": [1, 2]}})
    assert request_fingerprint(a) == request_fingerprint(b) != request_fingerprint(c)


def test_a_user_module_given_as_a_file_path_registers_its_types(tmp_path):
    module = tmp_path / "my_jobs.py"
    module.write_text(
        "from pydantic import BaseModel\n"
        "from common.handlers import job_handler\n"
        "class Thumb(BaseModel):\n    url: str\n    width: int = 100\n"
        "@job_handler('THUMBNAIL_TEST', payload_model=Thumb)\n"
        "def thumbnail(payload):\n    '''Make a thumbnail.'''\n    return {'w': payload.width}\n"
    )
    types = handlers.load_handlers(str(module))
    assert "THUMBNAIL_TEST" in types
    assert handlers.validate_payload("THUMBNAIL_TEST", {"url": "u"}) == {"url": "u"}
    with pytest.raises(ApiError) as bad:
        handlers.validate_payload("THUMBNAIL_TEST", {"width": "wide"})
    assert bad.value.status == 422 and {tuple(e["loc"]) for e in bad.value.errors} == {
        ("url",), ("width",)}


def test_an_unknown_type_is_a_422_that_names_the_registered_ones():
    handlers.load_handlers()
    with pytest.raises(ApiError) as err:
        handlers.validate_payload("NO_SUCH_TYPE", {})
    assert err.value.status == 422 and "REPORT_GENERATION" in err.value.detail


def test_a_missing_handler_module_file_fails_loudly(tmp_path):
    with pytest.raises(ImportError, match="no such file"):
        handlers.load_handlers(str(tmp_path / "nope.py"))


def test_a_type_name_cannot_be_registered_twice_by_different_functions():
    class P(BaseModel):
        x: int

    @handlers.job_handler("DUP_TEST")
    def one(payload):
        return 1

    with pytest.raises(ValueError, match="already registered"):

        @handlers.job_handler("DUP_TEST")
        def two(payload):
            return 2


def test_cursors_round_trip_and_garbage_is_a_400():
    assert decode_cursor(encode_cursor("2026-01-01T00:00:00+00:00", "abc"), 2) == [
        "2026-01-01T00:00:00+00:00", "abc"]
    with pytest.raises(ApiError) as err:
        decode_cursor("not-a-cursor!!", 2)
    assert err.value.status == 400


def test_settings_come_from_the_environment_with_types_checked():
    s = load_settings({"JOBS_MAX_RETRIES": "5", "REDIS_URL": "redis://h:1/0"})
    assert s.max_retries == 5 and s.redis_url == "redis://h:1/0"
    with pytest.raises(ValidationError):
        load_settings({"JOBS_MAX_RETRIES": "many"})


def test_the_openapi_document_is_3_1_and_documents_every_registered_payload_model():
    handlers.load_handlers()
    doc = build_openapi()
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    for name, jt in handlers.registered().items():
        assert f"Submit_{name}" in schemas
        if jt.payload_model is not None:
            assert jt.payload_model.__name__ in schemas
    assert {"/jobs", "/jobs/{job_id}", "/dead-letters", "/jobs/{job_id}/retry"} <= set(
        doc["paths"])


@pytest.mark.parametrize("run_at", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00",
                                    "1969-12-31T23:59:59Z", "2500-01-01T00:00:00Z"])
def test_a_run_at_outside_1970_to_a_century_ahead_is_refused(run_at):
    with pytest.raises(ValidationError, match="run_at"):
        JobSubmission.model_validate({"job_type": "X", "run_at": run_at})


@pytest.mark.parametrize("run_at", [5, 1893456000, 1893456000.5, True, "1893456000",
                                    " 1893456000000 ", "1.8e9", "-5"])
def test_a_run_at_that_is_a_number_is_refused_not_read_as_unix_time(run_at):
    with pytest.raises(ValidationError, match="RFC 3339 date-time string"):
        JobSubmission.model_validate({"job_type": "X", "run_at": run_at})


@pytest.mark.parametrize(("run_at", "kind"), [
    (5, "a number"), ("1893456000", "a number"), (True, "a JSON boolean"), ([], "a JSON array"),
    ({"a": 1}, "a JSON object")])
def test_a_run_at_that_is_not_a_string_says_what_it_was(run_at, kind):
    with pytest.raises(ValidationError, match=f"not {kind}"):
        JobSubmission.model_validate({"job_type": "X", "run_at": run_at})


def test_a_run_at_with_an_offset_is_kept_as_the_same_instant_in_utc():
    sub = JobSubmission.model_validate({"job_type": "X", "run_at": "2030-01-01T05:30:00+05:30"})
    assert sub.run_at.isoformat() == "2030-01-01T00:00:00+00:00"
