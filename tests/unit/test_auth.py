"""Token auth logic without a database: token format, headers, scopes, the cache.

The database side (create, verify, revoke, last_used_at, bootstrap) runs against a real
PostgreSQL in tests/integration/test_tokens_db.py.
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from common import auth
from common.auth import (
    ANONYMOUS,
    SCOPES,
    Authenticator,
    Principal,
    Scope,
    bearer_token,
    check_name,
    check_scopes,
    create_token,
    forbidden,
    new_secret,
    parse_token,
    revoke_token,
    unauthorized,
    verify_token,
)
from common.errors import ApiError, ServiceUnavailable
from common.settings import load_settings

TOKEN_ID = "3f1c9a2e-5b7d-4c1e-9a0b-1234567890ab"


class NoDatabase:
    """For paths that must refuse before any query: any use fails the test."""

    def connection(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the database was used")

    transaction = connection


# --- token format -----------------------------------------------------------------------

def test_a_new_token_is_prefix_id_and_256_bits_of_secret():
    token = new_secret()
    assert re.fullmatch(r"jobs_[0-9a-f]{32}_[A-Za-z0-9_-]{43}", token), token
    token_id, secret = parse_token(token) or ("", "")
    assert token_id.replace("-", "") == token[5:37]
    assert secret == token[38:]
    assert len({new_secret() for _ in range(500)}) == 500


@pytest.mark.parametrize("text", [
    "",
    "jobs_",
    "token_" + "a" * 32 + "_" + "b" * 43,
    "jobs_" + "A" * 32 + "_" + "b" * 43,  # ids are lowercase hex
    "jobs_" + "a" * 31 + "_" + "b" * 43,
    "jobs_" + "a" * 32 + "_" + "b" * 42,
    "jobs_" + "a" * 32 + "_" + "b" * 44,
    "jobs_" + "a" * 32 + "_" + "b" * 42 + "=",
    "jobs_" + "a" * 32 + "_" + "b" * 42 + "é",
    "jobs_" + "a" * 32 + "_" + "b" * 43 + "\n",
])
def test_malformed_tokens_do_not_parse(text):
    assert parse_token(text) is None


def test_a_malformed_token_is_refused_without_a_query():
    with pytest.raises(ApiError) as err:
        verify_token(NoDatabase(), "jobs_not-a-token")  # type: ignore[arg-type]
    assert err.value.status == 401 and "malformed" in err.value.detail
    assert err.value.headers["WWW-Authenticate"] == 'Bearer realm="jobs", error="invalid_token"'


# --- headers and errors -----------------------------------------------------------------

@pytest.mark.parametrize("header", ["Bearer abc", "bearer abc", "BEARER  abc ", "\tBearer abc"])
def test_the_bearer_scheme_is_case_insensitive_and_spaces_do_not_matter(header):
    assert bearer_token(header) == "abc"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz",
                                    "abc", "Bearer a b", "Token abc"])
def test_a_missing_or_malformed_header_is_a_401_saying_how_to_authenticate(header):
    with pytest.raises(ApiError) as err:
        bearer_token(header)
    assert (err.value.status, err.value.title) == (401, "Unauthorized")
    assert err.value.detail == "send Authorization: Bearer <token>"
    assert err.value.headers == {"WWW-Authenticate": 'Bearer realm="jobs"'}


def test_unauthorized_and_forbidden_are_problem_documents_with_challenges():
    assert unauthorized("no").to_problem() == {"type": "about:blank", "title": "Unauthorized",
                                               "status": 401, "detail": "no"}
    refused = forbidden(Scope.OPERATE)
    assert (refused.status, refused.title) == (403, "Forbidden")
    assert refused.detail == "this token lacks the 'jobs:operate' scope"
    assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]
    assert forbidden("admin").detail == "this token lacks the 'admin' scope"


# --- scopes and principals --------------------------------------------------------------

def test_the_scopes_are_the_four_values_in_order():
    assert SCOPES == ("jobs:submit", "jobs:read", "jobs:operate", "admin")
    assert [s.value for s in Scope] == list(SCOPES)
    assert f"{Scope.READ}" == "jobs:read" and Scope.READ == "jobs:read"


def test_a_principal_is_allowed_exactly_its_scopes_and_admin_everything():
    reader = Principal(TOKEN_ID, "ci", frozenset({"jobs:read"}))
    assert reader.allows("jobs:read") and reader.allows(Scope.READ)
    assert not reader.allows("jobs:submit") and not reader.allows("admin")
    assert reader.allows(None)  # any valid token
    admin = Principal(TOKEN_ID, "root", frozenset({"admin"}))
    assert all(admin.allows(s) for s in (*SCOPES, None, "some:future-scope"))
    assert Principal(TOKEN_ID, "x", frozenset({Scope.SUBMIT})).scopes == {"jobs:submit"}


def test_anonymous_is_an_admin_without_a_token():
    assert (ANONYMOUS.token_id, ANONYMOUS.name, ANONYMOUS.scopes) == (None, "anonymous",
                                                                      {"admin"})
    assert ANONYMOUS.allows("jobs:operate")


def test_scopes_are_deduplicated_into_the_canonical_order():
    assert check_scopes(["admin", "jobs:read", "jobs:read", Scope.SUBMIT]) == [
        "jobs:submit", "jobs:read", "admin"]
    assert check_scopes("jobs:read") == ["jobs:read"]  # one string is one scope


@pytest.mark.parametrize("scopes,loc,needle", [
    (["jobs:read", "jobs:write"], ["scopes", 1], "unknown scope 'jobs:write'"),
    ([42], ["scopes", 0], "unknown scope 42"),
    ([], ["scopes"], "give at least one of jobs:submit, jobs:read, jobs:operate, admin"),
])
def test_an_unknown_or_missing_scope_is_a_422_naming_the_field(scopes, loc, needle):
    with pytest.raises(ApiError) as err:
        check_scopes(scopes)
    assert err.value.status == 422
    assert err.value.errors and err.value.errors[0]["loc"] == loc
    assert needle in err.value.detail and err.value.detail.startswith("scopes")


def test_names_are_stripped_and_must_be_1_to_100_printable_characters():
    assert check_name("  deploy bot ") == "deploy bot"
    assert check_name("x" * 100) == "x" * 100
    for bad in ("", "   ", "x" * 101, "tab\tname", "nul\x00", "\ud800", None, 7):
        with pytest.raises(ApiError) as err:
            check_name(bad)
        assert err.value.status == 422 and err.value.errors
        assert err.value.errors[0]["loc"] == ["name"], bad


def test_create_refuses_bad_input_before_writing_anything():
    db: Any = NoDatabase()
    past = datetime.now(UTC) - timedelta(seconds=1)
    cases = [
        (dict(name="ci", scopes=["jobs:fly"]), "scopes.0"),
        (dict(name="", scopes=["jobs:read"]), "name"),
        (dict(name="ci", scopes=["jobs:read"], expires_at=past), "expires_at: must be in the"),
        (dict(name="ci", scopes=["jobs:read"], expires_at=datetime(2999, 1, 1)),
         "expires_at: needs a UTC offset"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ApiError) as err:
            create_token(db, **kwargs)
        assert err.value.status == 422 and err.value.detail.startswith(needle), kwargs


def test_revoking_a_non_uuid_id_is_a_400():
    with pytest.raises(ApiError) as err:
        revoke_token(NoDatabase(), "../etc")  # type: ignore[arg-type]
    assert err.value.status == 400 and "'../etc' is not a UUID" in err.value.detail


# --- settings ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("on", True), ("OFF", False), ("true", True),
                                           ("false", False), ("1", True), ("0", False),
                                           (" Off ", False)])
def test_jobs_auth_is_on_or_off(text, expected):
    assert load_settings({"JOBS_AUTH": text}).auth is expected


def test_auth_is_on_by_default_and_anything_else_names_the_variable():
    defaults = load_settings({})
    assert defaults.auth is True and defaults.auth_cache_seconds == 2.0
    assert load_settings({"JOBS_AUTH_CACHE_SECONDS": "0.5"}).auth_cache_seconds == 0.5
    with pytest.raises(ValidationError, match="JOBS_AUTH must be on or off"):
        load_settings({"JOBS_AUTH": "maybe"})


# --- the authenticator and its cache ----------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tokens:
    """Stands in for verify_token: a dict of valid tokens, counting lookups."""

    def __init__(self) -> None:
        self.valid: dict[str, Principal] = {}
        self.lookups = 0
        self.down = False

    def verify(self, db: Any, token: str) -> Principal:
        assert db == "db"
        self.lookups += 1
        if self.down:
            raise ServiceUnavailable("postgresql", "connection refused")
        if token not in self.valid:
            raise unauthorized("the token is not valid", invalid_token=True)
        return self.valid[token]


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> Tokens:
    fake = Tokens()
    fake.valid["good"] = Principal(TOKEN_ID, "ci", frozenset({"jobs:read"}))
    monkeypatch.setattr(auth, "verify_token", fake.verify)
    return fake


def authenticator(clock: Clock, **kwargs: Any) -> Authenticator:
    return Authenticator(lambda: "db", clock=clock, **kwargs)  # type: ignore[arg-type,return-value]


def test_a_verified_token_is_trusted_for_cache_seconds_then_checked_again(tokens):
    clock = Clock()
    authn = authenticator(clock, cache_seconds=2.0)
    assert authn.authenticate("Bearer good").name == "ci"
    clock.now += 1.9
    assert authn.authenticate("bearer good").name == "ci"
    assert tokens.lookups == 1
    clock.now += 0.2
    authn.authenticate("Bearer good")
    assert tokens.lookups == 2


def test_a_revoked_token_stops_working_once_its_cache_entry_expires(tokens):
    clock = Clock()
    authn = authenticator(clock, cache_seconds=2.0)
    authn.authenticate("Bearer good")
    del tokens.valid["good"]
    authn.authenticate("Bearer good")  # still cached
    clock.now += 2.0
    with pytest.raises(ApiError) as err:
        authn.authenticate("Bearer good")
    assert err.value.status == 401


def test_forget_drops_a_revoked_token_at_once(tokens):
    clock = Clock()
    authn = authenticator(clock, cache_seconds=60.0)
    authn.authenticate("Bearer good")
    del tokens.valid["good"]
    authn.forget(TOKEN_ID.upper())
    authn.forget("not a uuid")
    with pytest.raises(ApiError):
        authn.authenticate("Bearer good")


def test_a_lookup_that_overlaps_a_forget_is_not_cached(tokens, monkeypatch):
    authn = authenticator(Clock(), cache_seconds=60.0)

    def revoked_meanwhile(db: Any, token: str) -> Principal:
        principal = tokens.verify(db, token)  # the row was read before the revoke...
        authn.forget(TOKEN_ID)  # ...which another request finished during this lookup
        return principal

    monkeypatch.setattr(auth, "verify_token", revoked_meanwhile)
    authn.authenticate("Bearer good")
    monkeypatch.setattr(auth, "verify_token", tokens.verify)
    authn.authenticate("Bearer good")
    assert tokens.lookups == 2


def test_a_refused_token_is_remembered_for_at_most_a_second(tokens):
    clock = Clock()
    authn = authenticator(clock, cache_seconds=30.0)
    for _ in range(3):
        with pytest.raises(ApiError) as err:
            authn.authenticate("Bearer guess")
        assert err.value.status == 401
        assert err.value.headers["WWW-Authenticate"].endswith('error="invalid_token"')
    assert tokens.lookups == 1
    tokens.valid["guess"] = Principal(TOKEN_ID, "late", frozenset({"admin"}))
    clock.now += 1.0
    assert authn.authenticate("Bearer guess").name == "late"
    assert tokens.lookups == 2


def test_a_database_outage_is_not_remembered_as_a_refusal(tokens):
    clock = Clock()
    authn = authenticator(clock)
    tokens.down = True
    with pytest.raises(ServiceUnavailable):
        authn.authenticate("Bearer good")
    tokens.down = False
    assert authn.authenticate("Bearer good").name == "ci"


def test_a_cache_of_zero_seconds_checks_every_time(tokens):
    authn = authenticator(Clock(), cache_seconds=0)
    for _ in range(3):
        authn.authenticate("Bearer good")
        with pytest.raises(ApiError):
            authn.authenticate("Bearer bad")
    assert tokens.lookups == 6


def test_the_cache_keeps_at_most_max_entries(tokens):
    clock = Clock()
    authn = authenticator(clock, cache_seconds=60.0, max_entries=3)
    for i in range(10):
        tokens.valid[f"t{i}"] = Principal(TOKEN_ID, f"t{i}", frozenset({"admin"}))
        authn.authenticate(f"Bearer t{i}")
    assert len(authn._cache) == 3
    authn.authenticate("Bearer t9")
    assert tokens.lookups == 10  # the newest is still cached
    authn.authenticate("Bearer t0")
    assert tokens.lookups == 11  # the oldest was evicted


def test_expired_entries_are_dropped_as_new_ones_arrive(tokens):
    clock = Clock()
    authn = authenticator(clock, cache_seconds=1.0)
    for i in range(5):
        tokens.valid[f"t{i}"] = Principal(TOKEN_ID, f"t{i}", frozenset({"admin"}))
        authn.authenticate(f"Bearer t{i}")
    clock.now += 5
    authn.authenticate("Bearer good")
    assert len(authn._cache) == 1


def test_check_answers_403_for_a_missing_scope_and_401_before_that(tokens):
    authn = authenticator(Clock())
    assert authn.check("Bearer good", "jobs:read").name == "ci"
    assert authn.check("Bearer good", None).name == "ci"
    with pytest.raises(ApiError) as err:
        authn.check("Bearer good", Scope.ADMIN)
    assert err.value.status == 403 and "'admin'" in err.value.detail
    with pytest.raises(ApiError) as err:
        authn.check(None, None)
    assert err.value.status == 401


def test_with_auth_off_everyone_is_anonymous_and_nothing_is_looked_up(tokens):
    authn = authenticator(Clock(), enabled=False)
    assert authn.authenticate(None) is ANONYMOUS
    assert authn.check("Bearer nonsense", "admin") is ANONYMOUS
    assert tokens.lookups == 0


def test_threads_share_one_authenticator(tokens):
    authn = authenticator(Clock(), cache_seconds=60.0)
    tokens.valid.update({f"t{i}": Principal(TOKEN_ID, f"t{i}", frozenset({"admin"}))
                         for i in range(20)})
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(200):
                name = f"t{(i + n) % 20}"
                assert authn.authenticate(f"Bearer {name}").name == name
        except BaseException as exc:  # reported below, from the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert 20 <= tokens.lookups <= 20 * 8
