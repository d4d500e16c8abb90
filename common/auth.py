"""API bearer tokens: issue, list, revoke and verify them, and check requests against them.

A token reads `jobs_<token id, 32 hex>_<secret, 43 base64url characters>`. The id finds
its row in one primary-key lookup; only the SHA-256 of the secret is stored, and it is
compared in constant time. 256 random bits need no slow hash: nobody can guess them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from common.db import Database, rows_as_dicts
from common.errors import ApiError


class Scope(str, Enum):
    """What a token may do. ADMIN may do everything, managing tokens included."""

    SUBMIT = "jobs:submit"
    READ = "jobs:read"
    OPERATE = "jobs:operate"
    ADMIN = "admin"

    def __str__(self) -> str:
        return str(self.value)


SCOPES: tuple[str, ...] = tuple(scope.value for scope in Scope)
NAME_MAX = 100
TOUCH_AFTER_SECONDS = 60  # last_used_at is written at most this often per token
FAILURE_CACHE_SECONDS = 1.0
MAX_CACHED = 10_000
HOW_TO_AUTHENTICATE = "send Authorization: Bearer <token>"

_TOKEN = re.compile(r"jobs_([0-9a-f]{32})_([A-Za-z0-9_-]{43})")
_NO_HASH = bytes(32)  # compared against when the id is unknown, to take the same time


def _scope_text(scope: Any) -> Any:
    return scope.value if isinstance(scope, Scope) else scope


@dataclass(frozen=True)
class Principal:
    """Who is calling: a verified token, or ANONYMOUS when authentication is off."""

    token_id: str | None
    name: str
    scopes: frozenset[str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "scopes", frozenset(_scope_text(s) for s in self.scopes))

    def allows(self, scope: str | None) -> bool:
        """May this principal act under `scope`? None asks only for a valid token."""
        return scope is None or Scope.ADMIN.value in self.scopes or \
            _scope_text(scope) in self.scopes


ANONYMOUS = Principal(None, "anonymous", frozenset({Scope.ADMIN.value}))


# --- errors -----------------------------------------------------------------------------

def unauthorized(detail: str, *, invalid_token: bool = False) -> ApiError:
    """A 401 with its challenge; `invalid_token` when a token was sent and refused (RFC 6750)."""
    challenge = 'Bearer realm="jobs"' + (', error="invalid_token"' if invalid_token else "")
    return ApiError(401, "Unauthorized", detail, headers={"WWW-Authenticate": challenge})


def forbidden(scope: str) -> ApiError:
    """A 403 for a valid token without `scope`."""
    text = _scope_text(scope)
    return ApiError(403, "Forbidden", f"this token lacks the {text!r} scope", headers={
        "WWW-Authenticate": f'Bearer realm="jobs", error="insufficient_scope", scope="{text}"'})


def _invalid(loc: list[str | int], msg: str) -> ApiError:
    where = ".".join(map(str, loc))
    return ApiError(422, "Invalid request", f"{where}: {msg}",
                    errors=[{"loc": loc, "msg": msg, "type": "value_error"}])


# --- tokens -----------------------------------------------------------------------------

def new_secret() -> str:
    """A fresh token for a new id: what the user sees, once."""
    return f"jobs_{uuid.uuid4().hex}_{secrets.token_urlsafe(32)}"


def parse_token(token: str) -> tuple[str, str] | None:
    """(token id as a UUID string, secret) of a well-formed token, else None."""
    match = _TOKEN.fullmatch(token)
    return (str(uuid.UUID(match.group(1))), match.group(2)) if match else None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def check_name(name: Any) -> str:
    """A token's name, stripped; 422 unless it is 1-100 printable characters."""
    if not isinstance(name, str):
        raise _invalid(["name"], "must be a string")
    name = name.strip()
    if not 1 <= len(name) <= NAME_MAX:
        raise _invalid(["name"], f"must be 1 to {NAME_MAX} characters")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise _invalid(["name"], "may not contain control characters or unpaired surrogates")
    return name


def check_scopes(scopes: Iterable[Any]) -> list[str]:
    """Known scopes, each once, in SCOPES order; 422 naming the first unknown one."""
    given = [_scope_text(s) for s in ([scopes] if isinstance(scopes, str) else scopes)]
    for i, scope in enumerate(given):
        if scope not in SCOPES:
            raise _invalid(["scopes", i], f"unknown scope {scope!r}; known: {', '.join(SCOPES)}")
    if not given:
        raise _invalid(["scopes"], f"give at least one of {', '.join(SCOPES)}")
    return [s for s in SCOPES if s in given]


def create_token(db: Database, name: str, scopes: Iterable[str],
                 expires_at: datetime | None = None) -> dict[str, Any]:
    """Store a new token; its document includes the token itself, never shown again."""
    name, scope_list = check_name(name), check_scopes(scopes)
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise _invalid(["expires_at"], "needs a UTC offset, e.g. 2030-01-31T14:00:00Z")
        try:  # PostgreSQL takes offsets up to 15:59 only: store the instant in UTC
            expires_at = expires_at.astimezone(UTC)
        except OverflowError:
            raise _invalid(["expires_at"], "is out of range once converted to UTC") from None
        if expires_at <= datetime.now(UTC):
            raise _invalid(["expires_at"], "must be in the future")
    token = new_secret()
    parsed = parse_token(token)
    assert parsed is not None  # new_secret() makes well-formed tokens
    token_id, secret = parsed
    with db.connection() as conn:
        [row] = rows_as_dicts(conn, conn.run(
            "INSERT INTO api_tokens (id, name, scopes, secret_hash, expires_at)"
            " VALUES (CAST(:id AS uuid), :name, CAST(:scopes AS text[]), :hash,"
            " CAST(:expires_at AS timestamptz))"
            " RETURNING id, name, scopes, created_at, last_used_at, expires_at",
            id=token_id, name=name, scopes=scope_list, hash=_digest(secret),
            expires_at=expires_at.isoformat() if expires_at else None))
    doc = _document(row)
    return {"id": doc.pop("id"), "name": doc.pop("name"), "scopes": doc.pop("scopes"),
            "token": token, **doc}


def list_tokens(db: Database) -> list[dict[str, Any]]:
    """Every token, newest first, without secrets."""
    with db.connection() as conn:
        rows = rows_as_dicts(conn, conn.run(
            "SELECT id, name, scopes, created_at, last_used_at, expires_at FROM api_tokens"
            " ORDER BY created_at DESC, id DESC"))
    return [_document(row) for row in rows]


def revoke_token(db: Database, token_id: str) -> bool:
    """Delete a token; False if there was none with that id."""
    try:
        token_id = str(uuid.UUID(token_id))
    except (ValueError, TypeError, AttributeError):
        raise ApiError(400, "Bad token id", f"{token_id!r} is not a UUID") from None
    with db.connection() as conn:
        return bool(conn.run("DELETE FROM api_tokens WHERE id = CAST(:id AS uuid) RETURNING id",
                             id=token_id))


_STALE = ("last_used_at IS NULL OR last_used_at"
          f" < now() - interval '{TOUCH_AFTER_SECONDS} seconds'")
_LOOKUP = ("SELECT name, scopes, secret_hash, coalesce(expires_at <= now(), false) AS expired,"
           f" {_STALE} AS stale FROM api_tokens WHERE id = CAST(:id AS uuid)")


def rehearse(db: Database) -> None:
    """Run the token lookup once for no token, so that a new process's first request does
    not pay for its server session's first read of `api_tokens` (see clients.warm_up)."""
    with db.connection() as conn:
        conn.run(_LOOKUP, id=str(uuid.UUID(int=0)))


def verify_token(db: Database, token: str) -> Principal:
    """The principal of a valid, unexpired token; unauthorized() otherwise.

    A database outage is not the caller's fault: it stays ServiceUnavailable (503).
    """
    parsed = parse_token(token.strip()) if isinstance(token, str) else None
    if parsed is None:
        raise unauthorized("the token is malformed (expected jobs_<id>_<secret>)",
                           invalid_token=True)
    token_id, secret = parsed
    with db.connection() as conn:
        rows = rows_as_dicts(conn, conn.run(_LOOKUP, id=token_id))
        row = rows[0] if rows else None
        stored = bytes(row["secret_hash"]) if row else _NO_HASH
        if not hmac.compare_digest(_digest(secret), stored) or row is None:
            raise unauthorized("the token is not valid (unknown, revoked or mistyped)",
                               invalid_token=True)
        if row["expired"]:
            raise unauthorized("the token has expired", invalid_token=True)
        if row["stale"]:
            conn.run(f"UPDATE api_tokens SET last_used_at = now()"
                     f" WHERE id = CAST(:id AS uuid) AND ({_STALE})", id=token_id)
    return Principal(token_id, row["name"], frozenset(row["scopes"]))


def _document(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(row["id"]), "name": row["name"], "scopes": list(row["scopes"]),
            "created_at": _iso(row["created_at"]), "last_used_at": _iso(row["last_used_at"]),
            "expires_at": _iso(row["expires_at"])}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def bootstrap_admin_token(db: Database, path: Path) -> str | None:
    """`make run`'s first start: an admin token in `path` (mode 0600) unless it holds a
    valid one already. Returns the new token, or None when the file's token still works."""
    try:
        existing = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        existing = ""
    if existing:
        try:
            verify_token(db, existing)
            return None
        except ApiError as exc:
            if exc.status != 401:
                raise
    token = str(create_token(db, "admin", [Scope.ADMIN.value])["token"])
    _write_private(path, token + "\n")
    return token


def _write_private(path: Path, text: str) -> None:
    """Replace `path` by a file only its owner can read, never readable by others on the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)  # exactly 0600 whatever the umask
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- requests ---------------------------------------------------------------------------

def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header; unauthorized() otherwise."""
    parts = (authorization or "").split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise unauthorized(HOW_TO_AUTHENTICATE)
    return parts[1]


class Authenticator:
    """Bearer-token checks with a short in-process cache, safe to share between threads.

    A verified token is trusted for `cache_seconds`, so a revoked or expired one stops
    working within that time (at once in the process that revoked it, see `forget`). A
    refused token is remembered for at most FAILURE_CACHE_SECONDS, to blunt guessing.
    """

    def __init__(self, db: Callable[[], Database], *, enabled: bool = True,
                 cache_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = MAX_CACHED) -> None:
        self.enabled = enabled
        self.cache_seconds = cache_seconds
        self._db = db
        self._clock = clock
        self._max = max_entries
        # sha256(token) -> (good until, principal or the refusal's detail); oldest first
        self._cache: OrderedDict[bytes, tuple[float, Principal | str]] = OrderedDict()
        self._lock = threading.Lock()
        self._forgotten = 0  # counts forget() calls: a lookup that overlaps one is not kept

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller's principal; unauthorized() for a missing, malformed or bad token."""
        if not self.enabled:
            return ANONYMOUS
        token = bearer_token(authorization)
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = self._clock()
        with self._lock:
            hit, forgotten = self._cache.get(key), self._forgotten
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], Principal):
                return hit[1]
            raise unauthorized(hit[1], invalid_token=True)
        try:
            principal = verify_token(self._db(), token)
        except ApiError as exc:
            if exc.status == 401:
                self._remember(key, exc.detail, now,
                               min(FAILURE_CACHE_SECONDS, self.cache_seconds))
            raise
        # A revoke (and forget) during the lookup may have come after the row was read.
        self._remember(key, principal, now, self.cache_seconds, unless_forgotten=forgotten)
        return principal

    def check(self, authorization: str | None, scope: str | None) -> Principal:
        """authenticate(), then forbidden(scope) unless the principal has that scope."""
        principal = self.authenticate(authorization)
        if scope is not None and not principal.allows(scope):
            raise forbidden(scope)
        return principal

    def cached(self, authorization: str | None, scope: str | None) -> Principal | None:
        """check() answered from memory alone, or None when that needs the database (an
        event loop calls this first and check() in a thread only on a miss)."""
        if not self.enabled:
            return ANONYMOUS
        token = bearer_token(authorization)
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        hit = self._cache.get(key)  # a dict read is atomic; no lock on the hot path
        if hit is None or hit[0] <= self._clock():
            return None
        if not isinstance(hit[1], Principal):
            raise unauthorized(hit[1], invalid_token=True)
        if scope is not None and not hit[1].allows(scope):
            raise forbidden(scope)
        return hit[1]

    def forget(self, token_id: str) -> None:
        """Drop what is cached for a token (after revoking it in this process)."""
        try:
            token_id = str(uuid.UUID(token_id))
        except (ValueError, TypeError, AttributeError):
            return
        with self._lock:
            self._forgotten += 1
            for key in [k for k, (_, v) in self._cache.items()
                        if isinstance(v, Principal) and v.token_id == token_id]:
                del self._cache[key]

    def _remember(self, key: bytes, value: Principal | str, now: float, ttl: float,
                  unless_forgotten: int | None = None) -> None:
        if ttl <= 0:
            return
        with self._lock:
            if unless_forgotten is not None and unless_forgotten != self._forgotten:
                return
            while self._cache and next(iter(self._cache.values()))[0] <= now:
                self._cache.popitem(last=False)
            self._cache[key] = (now + ttl, value)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
