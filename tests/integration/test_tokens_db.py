"""API tokens against a real PostgreSQL: create, list, verify, revoke, bootstrap.

Only PostgreSQL is started (once for this module), not the whole stack.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pg8000.exceptions import DatabaseError

from common.auth import (
    bootstrap_admin_token,
    create_token,
    list_tokens,
    parse_token,
    revoke_token,
    verify_token,
)
from common.db import Database, migrate
from common.errors import ApiError
from infra.services import start_postgres

pytestmark = pytest.mark.integration

KEYS = ["id", "name", "scopes", "created_at", "last_used_at", "expires_at"]


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    server = start_postgres(tmp_path_factory.mktemp("tokens-pg"))
    database = Database(server.url, size=4)
    try:
        migrate(database)
        yield database
    finally:
        database.close()
        server.stop()


def sql(db: Database, statement: str, **params: object) -> list[list[object]]:
    with db.connection() as conn:
        return conn.run(statement, **params) or []


def refusal(db: Database, token: str) -> ApiError:
    with pytest.raises(ApiError) as err:
        verify_token(db, token)
    assert err.value.status == 401
    assert err.value.headers["WWW-Authenticate"] == 'Bearer realm="jobs", error="invalid_token"'
    return err.value


def test_a_created_token_verifies_with_its_name_and_scopes(db):
    doc = create_token(db, " deploy bot ", ["jobs:read", "jobs:submit", "jobs:read"])
    assert list(doc) == ["id", "name", "scopes", "token", "created_at", "last_used_at",
                         "expires_at"]
    assert doc["name"] == "deploy bot" and doc["scopes"] == ["jobs:submit", "jobs:read"]
    assert (doc["last_used_at"], doc["expires_at"]) == (None, None)
    assert datetime.fromisoformat(doc["created_at"]).tzinfo is not None
    assert (parse_token(doc["token"]) or ("",))[0] == doc["id"]
    principal = verify_token(db, doc["token"])
    assert (principal.token_id, principal.name) == (doc["id"], "deploy bot")
    assert principal.scopes == {"jobs:submit", "jobs:read"}
    assert principal.allows("jobs:read") and not principal.allows("jobs:operate")


def test_only_the_hash_of_the_secret_is_stored_and_listing_never_shows_it(db):
    doc = create_token(db, "secretive", ["admin"])
    _, secret = parse_token(doc["token"]) or ("", "")
    [[stored]] = sql(db, "SELECT secret_hash FROM api_tokens WHERE id = CAST(:id AS uuid)",
                     id=doc["id"])
    assert isinstance(stored, bytes) and len(stored) == 32 and secret.encode() not in stored
    listed = list_tokens(db)
    mine = next(t for t in listed if t["id"] == doc["id"])
    assert list(mine) == KEYS
    assert mine == {k: doc[k] for k in KEYS}
    text = repr(listed)
    assert secret not in text and doc["token"] not in text and "hash" not in text


def test_tokens_are_listed_newest_first(db):
    older = create_token(db, "older", ["jobs:read"])
    sql(db, "UPDATE api_tokens SET created_at = created_at - interval '1 hour'"
            " WHERE id = CAST(:id AS uuid)", id=older["id"])
    newer = create_token(db, "newer", ["jobs:read"])
    ids = [t["id"] for t in list_tokens(db)]
    assert ids.index(newer["id"]) < ids.index(older["id"])
    stamps = [t["created_at"] for t in list_tokens(db)]
    assert stamps == sorted(stamps, reverse=True)


def test_a_revoked_token_no_longer_verifies(db):
    doc = create_token(db, "short-lived", ["jobs:operate"])
    verify_token(db, doc["token"])
    assert revoke_token(db, doc["id"]) is True
    assert "not valid" in refusal(db, doc["token"]).detail
    assert revoke_token(db, doc["id"]) is False
    assert revoke_token(db, "00000000-0000-4000-8000-000000000000") is False
    assert doc["id"] not in [t["id"] for t in list_tokens(db)]


def test_an_expired_token_is_refused(db):
    expires = datetime.now(UTC) + timedelta(days=30)
    doc = create_token(db, "expiring", ["jobs:read"], expires_at=expires)
    assert datetime.fromisoformat(doc["expires_at"]) == expires
    verify_token(db, doc["token"])
    sql(db, "UPDATE api_tokens SET expires_at = now() - interval '1 second'"
            " WHERE id = CAST(:id AS uuid)", id=doc["id"])
    assert refusal(db, doc["token"]).detail == "the token has expired"


def test_a_token_with_one_character_changed_is_refused(db):
    token = create_token(db, "typo", ["admin"])["token"]
    for i in (5, 20, 36, 38, 60, len(token) - 1):  # in the id, and in the secret
        flipped = token[:i] + ("1" if token[i] != "1" else "2") + token[i + 1:]
        refusal(db, flipped)
    refusal(db, token[:-1])
    verify_token(db, token)


def test_an_unknown_id_and_a_wrong_secret_get_the_same_answer(db):
    token = create_token(db, "ghost", ["admin"])["token"]
    unknown_id = "jobs_" + "0" * 32 + token[37:]
    wrong_secret = token[:38] + ("A" if token[38] != "A" else "B") + token[39:]
    assert refusal(db, unknown_id).detail == refusal(db, wrong_secret).detail


def test_last_used_at_is_set_on_use_and_written_at_most_once_a_minute(db):
    doc = create_token(db, "used", ["jobs:read"])

    def last_used() -> datetime:
        [[when]] = sql(db, "SELECT last_used_at FROM api_tokens WHERE id = CAST(:id AS uuid)",
                       id=doc["id"])
        assert isinstance(when, datetime)
        return when

    verify_token(db, doc["token"])
    first = last_used()
    verify_token(db, doc["token"])
    assert last_used() == first  # within a minute: no write
    sql(db, "UPDATE api_tokens SET last_used_at = now() - interval '61 seconds'"
            " WHERE id = CAST(:id AS uuid)", id=doc["id"])
    verify_token(db, doc["token"])
    assert last_used() > first
    listed = next(t for t in list_tokens(db) if t["id"] == doc["id"])
    assert listed["last_used_at"] == last_used().isoformat()


def test_the_migration_checks_names_and_adds_submitted_by_to_jobs(db):
    with pytest.raises(DatabaseError):
        sql(db, "INSERT INTO api_tokens (id, name, scopes, secret_hash)"
                " VALUES (gen_random_uuid(), repeat('x', 101), '{admin}', :h)", h=bytes(32))
    [[kind, nullable]] = sql(db, "SELECT data_type, is_nullable FROM information_schema.columns"
                                 " WHERE table_name = 'jobs' AND column_name = 'submitted_by'")
    assert (kind, nullable) == ("text", "YES")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_bootstrap_writes_an_admin_token_readable_only_by_its_owner_once(db, tmp_path):
    path = tmp_path / "data" / "nested" / "admin-token"
    token = bootstrap_admin_token(db, path)
    assert token is not None
    assert path.read_text() == token + "\n" and mode(path) == 0o600
    principal = verify_token(db, token)
    assert (principal.name, principal.scopes) == ("admin", {"admin"})
    assert bootstrap_admin_token(db, path) is None
    assert path.read_text() == token + "\n"
    assert [p.name for p in path.parent.iterdir()] == ["admin-token"]  # no temp file left


def test_bootstrap_replaces_a_file_whose_token_no_longer_verifies(db, tmp_path):
    path = tmp_path / "admin-token"
    first = bootstrap_admin_token(db, path)
    assert first is not None
    revoke_token(db, (parse_token(first) or ("",))[0])
    second = bootstrap_admin_token(db, path)
    assert second is not None and second != first
    assert path.read_text() == second + "\n" and mode(path) == 0o600
    verify_token(db, second)


def test_bootstrap_replaces_garbage_in_a_world_readable_file(db, tmp_path):
    path = tmp_path / "admin-token"
    path.write_text("not a token\n")
    path.chmod(0o644)
    token = bootstrap_admin_token(db, path)
    assert token is not None and path.read_text() == token + "\n" and mode(path) == 0o600


def test_an_expiry_with_an_offset_postgresql_cannot_store_is_kept_as_its_utc_instant(db):
    from datetime import timezone

    odd = datetime(8998, 10, 13, 16, 43, tzinfo=timezone(timedelta(hours=21, minutes=5)))
    made = create_token(db, "far", ["jobs:read"], odd)
    assert datetime.fromisoformat(made["expires_at"]) == odd
