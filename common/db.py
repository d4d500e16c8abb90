"""PostgreSQL access through pg8000: a small connection pool, transactions, migrations."""

from __future__ import annotations

import functools
import logging
import queue
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlparse

import pg8000.converters
import pg8000.native
from pg8000.exceptions import DatabaseError, InterfaceError

from common.errors import ServiceUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# Any constant works; it only has to be the same in every process that migrates.
MIGRATION_LOCK_KEY = 0x6A6F6273  # "jobs"

from pg8000.native import Connection  # noqa: E402

# pg8000 finds the :name placeholders of a statement by walking its text character by
# character in Python, on every call (a third of a claim's CPU in the profiles). The
# result depends on the text alone and our statements are a small fixed set: parse once.
pg8000.native.to_statement = functools.lru_cache(maxsize=1024)(pg8000.native.to_statement)

_NETWORK_WORDS = ("network", "connect", "closed", "timeout", "timed out", "broken pipe",
                  "reset", "eof", "refused")


#: libpq's sslmode values this client honours exactly; `allow` and `prefer` (TLS if the
#: server offers it, else plaintext) are refused: no silent fallback to plaintext.
SSL_MODES = ("disable", "require", "verify-ca", "verify-full")
_URL_PARAMS = {"sslmode", "sslrootcert", "sslcert", "sslkey", "host", "connect_timeout",
               "application_name"}


def connect_kwargs(dsn: str) -> dict[str, Any]:
    """pg8000 keyword arguments for a `postgresql://user:pass@host:port/db?...` URL.

    Parameters as libpq reads them: `sslmode` (disable, require, verify-ca, verify-full),
    `sslrootcert` (CA bundle), `sslcert`/`sslkey` (client certificate), `host=/dir` (a
    Unix socket directory, as Cloud SQL's `/cloudsql/<instance>`), `connect_timeout`,
    `application_name`. Anything else is an error, never silently ignored.
    """
    url = urlparse(dsn)
    if url.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"DATABASE_URL must be a postgresql:// URL, got {_redact(dsn)!r}")
    query = parse_qs(url.query, keep_blank_values=True)
    unknown = sorted(set(query) - _URL_PARAMS)
    if unknown:
        raise ValueError(f"DATABASE_URL: unsupported parameter(s) {', '.join(unknown)};"
                         f" supported: {', '.join(sorted(_URL_PARAMS))}")
    one = {name: values[-1] for name, values in query.items()}
    port = url.port or 5432
    kwargs: dict[str, Any] = {
        "user": unquote(url.username or "postgres"),
        "database": unquote(url.path.lstrip("/")) or "postgres",
        "timeout": float(one.get("connect_timeout", "15")),
        "application_name": one.get("application_name", "jobs"),
    }
    socket_dir = one.get("host")
    if socket_dir:
        if not socket_dir.startswith("/"):
            raise ValueError("DATABASE_URL: host= takes a Unix socket directory (/cloudsql/...);"
                             " put a TCP host in the URL's authority")
        kwargs["unix_sock"] = f"{socket_dir.rstrip('/')}/.s.PGSQL.{port}"
    else:
        kwargs["host"] = url.hostname or "127.0.0.1"
        kwargs["port"] = port
    if url.password:
        kwargs["password"] = unquote(url.password)
    context = ssl_context(one)
    if context is not None:
        kwargs["ssl_context"] = context
    return kwargs


def ssl_context(params: dict[str, str]) -> ssl.SSLContext | None:
    """The TLS context libpq's sslmode and file parameters ask for (None: plaintext)."""
    mode = params.get("sslmode", "disable")
    if mode not in SSL_MODES:
        raise ValueError(f"DATABASE_URL: sslmode={mode!r} is not supported; use one of"
                         f" {', '.join(SSL_MODES)}")
    files = [n for n in ("sslrootcert", "sslcert", "sslkey") if params.get(n)]
    if mode == "disable":
        if files:
            raise ValueError(f"DATABASE_URL: {', '.join(files)} given with sslmode=disable")
        return None
    root = params.get("sslrootcert")
    if mode == "require" and not root:
        # libpq: encrypted, server not verified (unless a root certificate is given).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=root or None)
        context.check_hostname = mode == "verify-full"
    if params.get("sslcert"):
        context.load_cert_chain(params["sslcert"], params.get("sslkey") or None)
    elif params.get("sslkey"):
        raise ValueError("DATABASE_URL: sslkey given without sslcert")
    return context


def _redact(dsn: str) -> str:
    url = urlparse(dsn)
    if url.password:
        return dsn.replace(f":{url.password}@", ":***@", 1)
    return dsn


def is_connection_error(exc: BaseException) -> bool:
    """True when `exc` means the server is unreachable rather than the SQL being wrong."""
    if isinstance(exc, OSError | ServiceUnavailable):
        return True
    if isinstance(exc, InterfaceError):
        # pg8000 raises InterfaceError for misuse too; only network trouble means "down".
        text = str(exc).lower()
        return any(word in text for word in _NETWORK_WORDS)
    if isinstance(exc, DatabaseError) and exc.args and isinstance(exc.args[0], dict):
        # 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now, 08xxx connection
        code = str(exc.args[0].get("C", ""))
        return code.startswith(("57P", "08"))
    return False


def is_transient(exc: BaseException) -> bool:
    """True for trouble that says nothing about the statement: the server unreachable,
    a deadlock or serialization failure (40xxx), a lock or statement timeout or a
    cancelled query (55P03, 57014), too many connections (53xxx). Worth trying again."""
    if is_connection_error(exc):
        return True
    if isinstance(exc, DatabaseError) and exc.args and isinstance(exc.args[0], dict):
        code = str(exc.args[0].get("C", ""))
        return code.startswith(("40", "53", "55P03", "57014"))
    return False


TIMESTAMPTZ_OID = 1184
PING_AFTER_IDLE = 2.0  # seconds: a pooled connection idle longer is checked before use


def timestamptz_in(text: str) -> datetime | str:
    """A `timestamptz` column's text, parsed by `datetime.fromisoformat` (pg8000's own
    parser goes through `strptime`, the largest single cost of reading a job row)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return pg8000.converters.timestamptz_in(text)  # infinity, BC dates...


class PoolExhausted(ServiceUnavailable):
    """Every connection of the pool stayed busy past the wait: come back later."""


class Database:
    """A thread-safe pool of at most `size` pg8000 connections to one DSN. A caller that
    finds them all busy waits up to `wait` seconds, then gets ServiceUnavailable (a 503,
    or a redelivery): a burst never opens more connections than PostgreSQL (or a pooler)
    was sized for."""

    def __init__(self, dsn: str, size: int = 64, wait: float = 10.0) -> None:
        self.dsn = dsn
        self._kwargs = connect_kwargs(dsn)
        # (connection, when it was returned): the most recently used first
        self._idle: queue.LifoQueue[tuple[Connection, float]] = queue.LifoQueue()
        self._size = size
        self.wait = wait
        self._slots = threading.BoundedSemaphore(size)  # connections lent out or opening

    def _connect(self) -> Connection:
        try:
            conn = pg8000.native.Connection(**self._kwargs)
        except Exception as exc:
            if is_connection_error(exc):
                raise ServiceUnavailable("postgresql", str(exc)) from exc
            raise
        conn.register_in_adapter(TIMESTAMPTZ_OID, timestamptz_in)
        return conn

    def _run_fresh(self, conn: Connection, statement: str) -> None:
        """`statement` on a connection just opened: if it fails the connection is closed,
        and a lost server is ServiceUnavailable."""
        try:
            conn.run(statement)
        except Exception as exc:
            self._close_quietly(conn)
            if is_connection_error(exc):
                raise ServiceUnavailable("postgresql", str(exc)) from exc
            raise

    def _checkout(self, begin: bool) -> Connection:
        """A connection from the pool (or a new one), optionally inside BEGIN.

        An idle connection may have died with a server restart; when BEGIN (or, for one
        idle a while, a ping) shows that, the whole idle pool is dropped and a fresh
        connection is used instead.
        """
        try:
            (conn, since), pooled = self._idle.get_nowait(), True
        except queue.Empty:
            conn, since, pooled = self._connect(), 0.0, False
        if not begin and (not pooled or time.monotonic() - since < PING_AFTER_IDLE):
            return conn
        try:
            conn.run("BEGIN" if begin else "SELECT 1")
            return conn
        except Exception as exc:
            self._close_quietly(conn)
            if not is_connection_error(exc):
                raise
            if not pooled:
                raise ServiceUnavailable("postgresql", str(exc)) from exc
        self.close()
        conn = self._connect()
        if begin:
            self._run_fresh(conn, "BEGIN")
        return conn

    @contextmanager
    def connection(self, begin: bool = False) -> Iterator[Connection]:
        """Borrow a connection; a broken one is discarded, never returned to the pool."""
        if not self._slots.acquire(timeout=self.wait):
            raise PoolExhausted("postgresql", f"all {self._size} connections of this"
                                f" process stayed busy for {self.wait:g} s", 1)
        try:
            conn = self._checkout(begin)
        except BaseException:
            self._slots.release()
            raise
        healthy = True
        try:
            yield conn
        except ServiceUnavailable as exc:
            if exc.service != "postgresql":
                raise  # another service failed while we held a healthy connection
            healthy = False
            self._close_quietly(conn)
            raise
        except Exception as exc:
            if is_connection_error(exc):
                healthy = False
                self._close_quietly(conn)
                self.close()  # after a server restart every idle connection is dead too
                raise ServiceUnavailable("postgresql", str(exc)) from exc
            raise
        except BaseException:
            healthy = False
            self._close_quietly(conn)
            raise
        finally:
            if healthy:
                self._idle.put((conn, time.monotonic()))
            self._slots.release()

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[Connection]:
        """A connection inside BEGIN ... COMMIT, rolled back on any exception.

        `durable=False` commits without waiting for the WAL flush (synchronous_commit off
        for this transaction only): as atomic and as visible at once, but a crash of
        PostgreSQL itself in the next fraction of a second may forget it. Only for writes
        whose loss is harmless; a later durable commit makes it durable too (WAL order).
        """
        with self.connection(begin=True) as conn:
            try:
                if not durable:
                    conn.run("SET LOCAL synchronous_commit TO OFF")
                yield conn
            except BaseException:
                try:
                    conn.run("ROLLBACK")
                except Exception:  # the connection is gone; the pool drops it
                    pass
                raise
            conn.run("COMMIT")

    def run(self, sql: str, **params: Any) -> list[list[Any]]:
        """One statement in autocommit mode; tried twice if the first connection was dead."""
        return self.autocommit(lambda conn: conn.run(sql, **params) or [])

    def autocommit(self, work: Callable[[Connection], T]) -> T:
        """`work(conn)` outside a transaction (one statement); done once more on a fresh
        connection if the pooled one had died with a server restart (the pool is dropped
        then)."""
        try:
            with self.connection() as conn:
                return work(conn)
        except PoolExhausted:
            raise  # waited once already; no second wait
        except ServiceUnavailable:
            with self.connection() as conn:
                return work(conn)

    def close(self) -> None:
        while True:
            try:
                self._close_quietly(self._idle.get_nowait()[0])
            except queue.Empty:
                return

    @staticmethod
    def _close_quietly(conn: Connection) -> None:
        try:
            conn.close()
        except Exception:
            pass


def rows_as_dicts(conn: Connection, rows: list[list[Any]] | None) -> list[dict[str, Any]]:
    """Turn the rows of the last statement into dicts keyed by column name."""
    names = [c["name"] for c in (conn.columns or [])]
    return [dict(zip(names, row, strict=True)) for row in rows or []]


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every packaged migration, in order."""
    found = []
    for entry in resources.files("common.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


def migrate(db: Database) -> list[str]:
    """Apply pending migrations; safe to run twice and from several processes at once."""
    applied: list[str] = []
    # Each file in a transaction of its own (a new enum value must be committed before a
    # later file uses it), under a transaction-level lock: a pooler in transaction mode
    # may hand each statement outside a transaction to another server connection, so a
    # session lock could be taken on one and released on another.
    for version, name, sql in migration_files():
        with db.transaction() as conn:
            conn.run("SELECT pg_advisory_xact_lock(:k)", k=MIGRATION_LOCK_KEY)
            conn.run("CREATE TABLE IF NOT EXISTS schema_migrations ("
                     " version integer PRIMARY KEY, name text NOT NULL,"
                     " applied_at timestamptz NOT NULL DEFAULT now())")
            if conn.run("SELECT 1 FROM schema_migrations WHERE version = :v", v=version):
                continue
            conn.execute_simple(sql)
            conn.run("INSERT INTO schema_migrations (version, name) VALUES (:v, :n)",
                     v=version, n=name)
        log.info("applied migration %s", name)
        applied.append(name)
    return applied


_databases: dict[str, Database] = {}
_databases_lock = threading.Lock()


def get_database(dsn: str, size: int = 64, wait: float = 10.0) -> Database:
    """The process-wide pool for `dsn`, created on first use."""
    with _databases_lock:
        db = _databases.get(dsn)
        if db is None:
            db = _databases[dsn] = Database(dsn, size=size, wait=wait)
        return db


class GroupCommitter:
    """Runs single statements from many threads in shared transactions: one commit (one
    WAL flush) for a whole group instead of one per statement.

    Each caller blocks until its statement is committed. There is no writer thread: the
    first caller to find no commit under way leads, running what is pending (its own
    statement at least) on its own thread; whoever arrives meanwhile waits and goes into
    the next group, which the leader hands to one of them to run. A lone statement thus
    runs on its caller's thread, with no hand-off. If a group fails for a reason other
    than a lost connection, its statements are retried one transaction each, so one bad
    statement never fails the others.
    """

    def __init__(self, db: Database, max_batch: int = 64, durable: bool = True) -> None:
        # Not durable: commits do not wait for the WAL flush (see Database.transaction),
        # on a small pool of its own (claims never wait behind handlers' connections).
        # Set per transaction (SET LOCAL), never per session: behind a pooler in
        # transaction mode a session setting would leak to whoever gets the connection.
        self.db = db if durable else Database(db.dsn, size=4, wait=db.wait)
        self.durable = durable
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[_Op] = []  # waiting for the next group, oldest first
        self._leading = False  # a caller is running a group now

    def run(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        """Execute `sql` in the next group commit; return its rows as dicts once committed."""
        return self.call(lambda conn: rows_as_dicts(conn, conn.run(sql, **params)),
                         single=True)

    def call(self, work: Callable[[Connection], T], *, single: bool = False) -> T:
        """Run `work(conn)` inside the next group commit; return its result once committed.
        `work` may run twice (its group failed and is replayed one by one): it must only
        touch the database. `single`: it is one statement (atomic without a transaction)."""
        op = _Op(work, single)
        with self._lock:
            self._pending.append(op)
            lead = not self._leading
            self._leading = True
        try:
            while True:
                if lead:
                    lead = False
                    self._lead()
                op.wake.wait()
                with self._lock:
                    if op.finished:
                        break
                    op.wake.clear()  # handed the lead: run the next group
                    lead = True
        except BaseException:
            self._abandon(op, lead)
            raise
        if op.error is not None:
            raise op.error
        return op.result

    def _abandon(self, op: _Op, leading: bool) -> None:
        """Our caller stopped waiting (an exception while it waited, e.g. KeyboardInterrupt):
        take its statement out if not yet in a group, and never leave the lead with a
        thread that is gone."""
        with self._lock:
            if op in self._pending:
                self._pending.remove(op)
            handed = leading or (op.wake.is_set() and not op.finished)
            if not handed:
                return
            if self._pending:
                self._pending[0].wake.set()
            else:
                self._leading = False

    def pending(self) -> int:
        """Statements waiting for a group (not the one being committed)."""
        with self._lock:
            return len(self._pending)

    def _lead(self) -> None:
        """Commit the next group, then hand the lead to a waiting caller (if any) and go
        back to answering our own caller."""
        with self._lock:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
        try:
            self._commit(batch)
        finally:
            with self._lock:
                for op in batch:
                    if not op.finished:  # _commit raised (BaseException): not committed
                        op.finish(error=ServiceUnavailable("PostgreSQL", "group commit failed"))
                if self._pending:
                    self._pending[0].wake.set()  # its thread leads the next group
                else:
                    self._leading = False

    def _commit(self, batch: list[_Op]) -> None:
        try:
            if len(batch) == 1 and batch[0].single and self.durable:
                # Nothing to group with: one statement in autocommit, two round trips fewer.
                results = [self.db.autocommit(batch[0].work)]
            else:
                with self.db.transaction(durable=self.durable) as conn:
                    results = [op.work(conn) for op in batch]
        except ServiceUnavailable as exc:
            for op in batch:
                op.finish(error=exc)
            return
        except Exception:
            if len(batch) > 1:  # find the culprit: each statement on its own
                for op in batch:
                    self._commit([op])
                return
            batch[0].finish(error=sys.exc_info()[1])
            return
        for op, result in zip(batch, results, strict=True):
            op.finish(result=result)


class _Op:
    __slots__ = ("work", "single", "result", "error", "finished", "wake")

    def __init__(self, work: Callable[[Connection], Any], single: bool = False) -> None:
        self.work = work
        self.single = single
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self.wake = threading.Event()  # finished, or handed the lead

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result = result
        self.error = error
        self.finished = True
        self.wake.set()
