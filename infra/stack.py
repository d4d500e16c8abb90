"""The whole system on one machine: `make run` (python -m infra.stack).

Starts PostgreSQL, Redis and a Kafka-compatible broker unless their URLs are given
(DATABASE_URL, REDIS_URL, KAFKA_BOOTSTRAP_SERVERS), an SMTP sink unless SMTP_URL is
given, creates the topics, applies migrations, then runs each function as its own
functions-framework process, the Kafka bridges (one per job topic: the job queue and
each topic a job type asked for with `@job_handler(topic=...)`, plus the DLQ's), the
sweeper's ticker and the gateway. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from pydantic import ValidationError

from common.auth import bootstrap_admin_token
from common.db import Database, migrate
from common.handlers import handler_file
from common.logs import log_level
from common.settings import Settings, describe_error, kafka_client_config, load_settings
from infra import services

log = logging.getLogger("stack")
ROOT = Path(__file__).resolve().parents[1]

# name -> (target, signature type); each is served by `functions-framework`.
FUNCTIONS = {
    "submit": ("submit_job", "http"),
    "status": ("get_job_status", "http"),
    # the batch-capable target of the same function: see functions/process/main.py
    "process": ("process_job_batch", "http"),
    "dlq": ("record_dead_letter", "cloudevent"),
    "sweeper": ("sweep_jobs", "http"),
}


@dataclass
class Child:
    """A process of ours (function, bridge, gateway), restarted if it dies on its own."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    echo: bool = True
    port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    stopping: bool = False
    _pump: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        # Its own session: a terminal's Ctrl-C reaches only the stack, which stops us in
        # order. SIGTERM from the kernel if the stack is killed before it can (kill -9).
        self.proc = services.spawn(self.argv, env=self.env, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, death_signal=signal.SIGTERM)
        # Only now: with the stopped process still in self.proc, the supervisor would take
        # its exit for a crash and start another one over this.
        self.stopping = False
        self._pump = threading.Thread(target=self._copy_output, args=(self.proc,), daemon=True)
        self._pump.start()

    def _copy_output(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with open(self.log_path, "ab") as sink:
            for line in proc.stdout:
                sink.write(line)
                sink.flush()
                if self.echo:
                    sys.stdout.write(f"{self.name:>8} | {line.decode(errors='replace')}")
                    sys.stdout.flush()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive() and self.proc is not None:
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL (fault injection); the supervisor restarts it unless `stopping`."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def end_leftovers(self, grace: float = 5.0) -> None:
        """Once the main process is gone (kill -9), end what it left in its process group:
        its workers, which would hold its port. SIGTERM, then SIGKILL after `grace`."""
        if self.proc is None or self.proc.poll() is None:
            return
        for sig, patience in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            left = _group_members(self.proc.pid)  # the session's group: its pid is the pgid
            if not left:
                return
            log.warning("%s: stopping %d process(es) it left behind", self.name, len(left))
            for proc in left:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(sig)
            deadline = time.monotonic() + patience
            while _group_members(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)  # poll interval; the deadline bounds the wait

    def stop(self, grace: float = 15.0) -> None:
        self.stopping = True
        if not self.alive() or self.proc is None:
            self.end_leftovers()
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()


def _group_members(pgid: int) -> list[psutil.Process]:
    """The live processes of a process group (a zombie is as good as gone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass  # some member is not ours to signal: look anyway
    members = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc)
    return members


class Stack:
    """Services plus our processes, started in dependency order and stopped in reverse."""

    def __init__(self, data_dir: Path, *, gateway_port: int = 8080, echo: bool = True,
                 env: dict[str, str] | None = None, sweep_interval: float = 1.0,
                 bridge_in_flight: int = 256, process_workers: int = 2,
                 batch_size: int = 64, bridge_delivery: str = "local",
                 bridge_retries: int = 5) -> None:
        self.data_dir = data_dir.resolve()
        self.gateway_port = gateway_port
        self.echo = echo
        self.sweep_interval = sweep_interval
        self.bridge_in_flight = bridge_in_flight
        self.process_workers = process_workers
        self.batch_size = batch_size
        # "knative": the job-queue bridge gives an outage `bridge_retries` attempts and then
        # dead-letters the record, as a KafkaSource's delivery settings do (see bridge.py).
        if bridge_delivery not in ("local", "knative"):
            raise ValueError(f"bridge_delivery must be local or knative, not {bridge_delivery!r}")
        self.bridge_delivery = bridge_delivery
        self.bridge_retries = bridge_retries
        self.env = dict(os.environ if env is None else env)
        flag = self.env.get("JOBS_LOCAL_TLS", "").strip().lower()
        if flag not in ("", "0", "1", "false", "true", "off", "on"):
            raise ValueError(f"JOBS_LOCAL_TLS must be 1 or 0 (true/false, on/off), not {flag!r}")
        self.local_tls = flag in ("1", "true", "on")
        replicas = self.env.get("JOBS_REPLICAS", "1").strip() or "1"
        if not replicas.isdigit() or not 1 <= int(replicas) <= 8:
            raise ValueError(f"JOBS_REPLICAS must be a whole number from 1 to 8, not {replicas!r}")
        self.replicas = int(replicas)
        self.replica_suffixes = [""] + [f"-{i}" for i in range(2, self.replicas + 1)]
        self.services: dict[str, services.ServerProcess] = {}
        self.children: dict[str, Child] = {}
        self._stop = threading.Event()
        self._held: set[str] = set()  # servers stopped on purpose, not to be restarted
        # One restart of a server at a time: the supervisor seeing a server down in the
        # middle of restart_service (stopped, not yet started) must not start a second one.
        self._servers_lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self.new_admin_token: str | None = None  # made by this start, to print once
        self._queue_topics: dict[str, str] | None = None

    # -- start ---------------------------------------------------------------------

    def start(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def _pidfile(self) -> Path:
        return self.data_dir / "stack.pids"

    def _reap_leftovers(self) -> None:
        """Stop what a previous run left behind (it was killed -9 and could not clean up)."""
        if not self._pidfile.exists():
            return
        for line in self._pidfile.read_text().split():
            pid, _, started = line.partition(":")
            try:
                proc = psutil.Process(int(pid))
                if abs(proc.create_time() - float(started)) > 0.01:
                    continue  # the pid was reused by an unrelated process
                log.warning("stopping pid %s left over by a previous run", pid)
                proc.terminate()
                proc.wait(10)
            except psutil.TimeoutExpired:
                proc.kill()
            except (psutil.Error, ValueError):
                continue
        self._pidfile.unlink(missing_ok=True)

    def _record_pids(self) -> None:
        pids = [s.pid for s in self.services.values()] + [c.pid for c in self.children.values()]
        lines = []
        for pid in pids:
            with contextlib.suppress(psutil.Error, TypeError):
                lines.append(f"{pid}:{psutil.Process(pid).create_time()}")
        self._pidfile.write_text("\n".join(lines) + "\n")

    def _start(self) -> None:
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._reap_leftovers()
        env = self.env
        # JOBS_LOCAL_TLS=1: our PostgreSQL and Redis serve TLS only, with certificates made
        # now, and every client verifies them (the distribution's servers: the PyPI builds
        # have no TLS). Tansu cannot serve TLS: Kafka stays plaintext.
        tls = services.Tls.make(self.data_dir / "tls") if self.local_tls else None
        suffix = "-tls" if tls else ""  # another server version: a cluster of its own
        env.setdefault("JOBS_ARTIFACT_DIR", str(self.data_dir / "artifacts"))
        env.setdefault("JOBS_DATA_DIR", str(self.data_dir))
        if not env.get("JOBS_CALLBACK_SECRET"):  # kept across restarts: receivers keep it
            env["JOBS_CALLBACK_SECRET"] = self._callback_secret()
        # The servers start side by side, and beside them the child process that finds the
        # job topics by importing the handler modules (it needs no server): a second or two
        # each, most of it waiting.
        starts: dict[str, Callable[[], services.ServerProcess]] = {}
        if not env.get("DATABASE_URL"):
            starts["postgresql"] = lambda: services.start_postgres(
                self.data_dir / f"postgres{suffix}", tls=tls)
        if not env.get("REDIS_URL"):
            starts["redis"] = lambda: services.start_redis(self.data_dir / f"redis{suffix}",
                                                           tls=tls)
        if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
            starts["kafka"] = lambda: services.start_kafka(self.data_dir / "kafka")
        if not env.get("SMTP_URL"):
            starts["smtp"] = lambda: services.start_smtp_sink(self.data_dir / "mail")
        with concurrent.futures.ThreadPoolExecutor(len(starts) + 1) as pool:
            finding = pool.submit(job_topics, dict(env)) if self._queue_topics is None else None
            servers = {name: pool.submit(start) for name, start in starts.items()}
        failed: BaseException | None = None
        for name, server in servers.items():  # all have ended: stop() finds every server
            try:
                self.services[name] = server.result()
            except BaseException as exc:
                failed = failed or exc
        if finding is not None:
            try:
                self._queue_topics = finding.result()
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
        for name, variable in (("postgresql", "DATABASE_URL"), ("redis", "REDIS_URL"),
                               ("kafka", "KAFKA_BOOTSTRAP_SERVERS"), ("smtp", "SMTP_URL")):
            if name in self.services:
                env[variable] = self.services[name].url
        # Every process's counters go here; the gateway's /metrics adds them up.
        metrics_dir = self.data_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        env["PYTHONUNBUFFERED"] = "1"
        topics = self.topics
        log.info("job topics (each with its own bridges): %s", ", ".join(
            f"{topic} (group {group})" for topic, group in self.queue_topics.items()))
        services.create_topics(env["KAFKA_BOOTSTRAP_SERVERS"], topics,
                               config=kafka_client_config(load_settings(env)))
        db = Database(env["DATABASE_URL"])
        try:
            migrate(db)
            if load_settings(env).auth:
                # First start: an admin token, printed once and kept (0600) for the CLI.
                self.new_admin_token = bootstrap_admin_token(db, self.admin_token_path)
        finally:
            db.close()

        py = sys.executable
        # JOBS_REPLICAS=N: N of every function, N bridges per topic in one consumer group
        # (each feeding its own instance of the function) and N sweepers, side by side.
        # The first of each keeps the plain name ("process"), the others "process-2", ...
        for replica in self.replica_suffixes:
            for name, (target, signature) in FUNCTIONS.items():
                port = services.free_port()
                threads = str(max(16, self.bridge_in_flight)) if name == "process" else "8"
                # Two worker processes for the busy functions: one per core, past the GIL.
                workers = str(self.process_workers) \
                    if name in ("process", "submit", "status") else "1"
                # gunicorn 23+ opens a control socket in $XDG_RUNTIME_DIR (else one shared
                # ~/.gunicorn/gunicorn.ctl that a second server fails to bind): one each.
                run_dir = self.data_dir / "run" / (name + replica)
                run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._child(name + replica, [
                    py, "-m", "functions_framework", "--target", target,
                    "--source", str(ROOT / "functions" / name / "main.py"),
                    "--signature-type", signature, "--host", "127.0.0.1", "--port", str(port)],
                    port=port, extra_env={"THREADS": threads, "WORKERS": workers,
                                          "XDG_RUNTIME_DIR": str(run_dir)})
        settings = load_settings(env)
        dlq_topic = settings.dlq_topic
        url = self.function_url
        for replica in self.replica_suffixes:
            # One bridge per job topic (its own consumer group), each feeding `process`:
            # a flood on one topic cannot hold up the records of another.
            for topic, group in self.queue_topics.items():
                self._child(self.bridge_name(topic) + replica, [
                    py, "-m", "infra.bridge", "--topic", topic,
                    "--target", url("process" + replica), "--dlq-topic", dlq_topic,
                    "--group", group, "--max-in-flight",
                    str(self.bridge_in_flight), "--batch-size", str(self.batch_size),
                    "--fetch-wait-ms", str(settings.bridge_fetch_wait_ms),
                    "--delivery", self.bridge_delivery, "--retries", str(self.bridge_retries)])
            self._child("bridge-d" + replica, [
                py, "-m", "infra.bridge", "--topic", dlq_topic, "--target", url("dlq" + replica),
                "--group", settings.dlq_consumer_group,
                "--fetch-wait-ms", "250"])  # dead letters are not urgent
        # The gateway: the same ASGI app that infra/knative deploys, on the public port;
        # with replicas it spreads each function's requests over them.
        self._child("gateway", [
            py, "-m", "infra.gateway", "--port", str(self.gateway_port),
            "--submit", ",".join(url("submit" + r) for r in self.replica_suffixes),
            "--status", ",".join(url("status" + r) for r in self.replica_suffixes),
            "--workers", str(self.process_workers)], port=self.gateway_port)
        for child in self.children.values():
            child.start()
        self._record_pids()
        self._wait_http(f"{self.gateway_url}/healthz", 60)
        # Ready means a job submitted now runs now: the bridges have joined their groups.
        self._wait_http(f"{self.gateway_url}/readyz", 60)
        for name in FUNCTIONS:
            for replica in self.replica_suffixes:
                self._wait_port(self.children[name + replica].port or 0, 60)
        self._spawn(self._supervise)
        self._tick_sweepers()

    @property
    def settings(self) -> Settings:
        return load_settings(self.env)

    @property
    def queue_topics(self) -> dict[str, str]:
        """The job topics (the job queue, then those of job types with `topic=`), each
        with the consumer group of its bridges."""
        if self._queue_topics is None:
            self._queue_topics = job_topics(self.env)
        return self._queue_topics

    @property
    def topics(self) -> dict[str, int]:
        """Every topic the stack creates, with its partitions."""
        settings = self.settings
        return {**{topic: settings.queue_partitions for topic in self.queue_topics},
                settings.dlq_topic: settings.dlq_partitions}

    def bridge_name(self, topic: str) -> str:
        """`bridge-q` for the job queue, `bridge-topic-<topic>` for a job type's own topic
        (never the name of the job queue's or the DLQ's bridge, whatever the topic)."""
        return "bridge-q" if topic == self.settings.queue_topic else f"bridge-topic-{topic}"

    def restart_service(self, name: str) -> None:
        """Restart one of our servers in place; a broker comes back empty, so recreate the
        topics at once (PostgreSQL rebuilds the queue itself: the sweeper republishes)."""
        server = self.services[name]
        with self._servers_lock:
            self._held.add(name)  # the supervisor leaves it alone meanwhile
            try:
                server.restart()
                if name == "kafka":
                    services.create_topics(server.url, self.topics)
            finally:
                self._held.discard(name)
            self._record_pids()

    def stop_service(self, name: str) -> None:
        """Stop one of our servers and keep it down (an outage) until restart_service."""
        with self._servers_lock:
            self._held.add(name)
            self.services[name].stop()

    def _child(self, name: str, argv: list[str], *, port: int | None = None,
               extra_env: dict[str, str] | None = None) -> None:
        env = {**self.env, **(extra_env or {})}
        self.children[name] = Child(name, argv, env, self.data_dir / "logs" / f"{name}.log",
                                    echo=self.echo, port=port)

    def function_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.children[name].port}"

    @property
    def callback_secret_path(self) -> Path:
        return self.data_dir / "callback-secret"

    def _callback_secret(self) -> str:
        """The secret completion callbacks are signed with, made on first start (0600)."""
        path = self.callback_secret_path
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32) + "\n")
        return path.read_text().strip()

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin-token"

    @property
    def admin_token(self) -> str:
        """The admin token `make run` keeps in .data/admin-token."""
        return self.admin_token_path.read_text().strip()

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def _spawn(self, target: object) -> None:
        thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError as exc:
                if time.monotonic() > deadline:
                    said = exc.read().decode(errors="replace")[:600] \
                        if isinstance(exc, urllib.error.HTTPError) else ""
                    raise RuntimeError(f"{url} did not come up: {exc} {said}") from exc
            time.sleep(0.1)

    @staticmethod
    def _wait_port(port: int, timeout: float) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nothing listens on port {port}") from exc
                time.sleep(0.1)

    # -- run -----------------------------------------------------------------------

    def _supervise(self) -> None:
        """Restart a child or server that died on its own (crash, kill -9)."""
        while not self._stop.wait(0.2):
            for name, server in list(self.services.items()):
                if name in self._held or server.is_running() or self._stop.is_set():
                    continue
                with self._servers_lock:  # asked again: a restart may have just ended
                    if name in self._held or server.is_running() or self._stop.is_set():
                        continue
                    log.warning("%s is not running; restarting it", name)
                    try:
                        self.restart_service(name)
                    except Exception as exc:
                        log.error("could not restart %s: %s", name, exc)
            for child in list(self.children.values()):
                if child.stopping or child.alive() or child.proc is None:
                    continue
                code = child.proc.returncode
                child.restarts += 1
                log.warning("%s exited (%s); restarting", child.name, code)
                child.end_leftovers()
                time.sleep(min(2.0, 0.2 * child.restarts))
                if not self._stop.is_set() and not child.stopping:
                    child.start()
                    self._record_pids()

    def _tick_sweepers(self) -> None:
        """The local Cloud Scheduler: each sweeper is POSTed to every interval (with
        replicas, side by side: their ticks must not publish a job twice)."""
        for replica in self.replica_suffixes:
            self._spawn(lambda name="sweeper" + replica: self._tick_sweeper(name))

    def _tick_sweeper(self, name: str) -> None:
        while not self._stop.wait(self.sweep_interval):
            try:
                request = urllib.request.Request(self.function_url(name), data=b"{}",
                                                 method="POST",
                                                 headers={"Content-Type": "application/json"})
                urllib.request.urlopen(request, timeout=30).read()
            except OSError as exc:
                log.debug("sweeper tick failed: %s", exc)

    def summary(self) -> str:
        env = self.env
        lines = [
            "",
            "Jobs stack is up.",
            f"  API gateway   {self.gateway_url}"
            f"   (Swagger UI: {self.gateway_url}/swagger-ui.html)",
            f"  PostgreSQL    {env['DATABASE_URL']}",
            f"  Redis         {env['REDIS_URL']}",
            f"  Kafka         {env['KAFKA_BOOTSTRAP_SERVERS']}  topics: {', '.join(self.topics)}"
            + ("  (plaintext: Tansu 0.6.0 cannot serve TLS)" if self.local_tls else ""),
            f"  SMTP          {env['SMTP_URL']}"
            + (f"  (mail lands in {self.data_dir / 'mail'})" if "smtp" in self.services else ""),
            f"  artifacts     {env['JOBS_ARTIFACT_DIR']}",
            "  callbacks     to " + (env.get("JOBS_CALLBACK_ALLOWED_HOSTS") or
                                     "no host (set JOBS_CALLBACK_ALLOWED_HOSTS)")
            + (f", signed with the secret in {self.callback_secret_path}"
               if self.callback_secret_path.exists() else ""),
        ]
        for name in FUNCTIONS:
            lines.append(f"  function      {name:<8} " + ", ".join(
                self.function_url(name + r) for r in self.replica_suffixes))
        lines += [
            "  bridges       " + ", ".join(
                [f"{topic} -> process ({group})" for topic, group in self.queue_topics.items()]
                + [f"{self.settings.dlq_topic} -> dlq"]),
            f"  logs          {self.data_dir / 'logs'}",
            "",
        ]
        auth = "Authorization: Bearer $(cat " + str(self.admin_token_path) + ")"
        if not load_settings(env).auth:
            auth = ""
            lines += ["  WARNING: JOBS_AUTH=off: the API answers anyone who reaches the port.", ""]
        elif self.new_admin_token:
            lines += ["  A new admin token (shown once here; kept in "
                      f"{self.admin_token_path}, mode 0600):",
                      f"    {self.new_admin_token}", ""]
        else:
            lines += [f"  admin token   in {self.admin_token_path} (mode 0600)", ""]
        lines += [
            f"  curl -s -XPOST {self.gateway_url}/jobs -H 'Content-Type: application/json' \\",
            *([f'       -H "{auth}" \\'] if auth else []),
            "       -d '{\"job_type\": \"REPORT_GENERATION\", \"payload\": {\"title\": \"Hello\","
            " \"columns\": [\"a\"], \"rows\": [[1]]}}'",
            "",
            "Press Ctrl-C to stop everything.",
        ]
        return "\n".join(lines)

    # -- stop ----------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        bridges = [name for name in self.children if name.startswith("bridge-")]
        functions = [name + replica for name in ("submit", "status", "process", "dlq", "sweeper")
                     for replica in self.replica_suffixes]
        # The gateway first (no new request), the bridges (no new delivery), the functions.
        order = [["gateway"], bridges, functions]
        for group in order:
            for name in group:
                if name in self.children:
                    self.children[name].stopping = True
        # Each group side by side (every one waits for its processes to end their work),
        # the groups one after the other, then the servers, side by side.
        for group in order:
            _side_by_side([self.children[name].stop for name in group if name in self.children])

        def stop_server(name: str) -> None:
            try:
                self.services[name].stop()
            except Exception as exc:
                log.error("could not stop %s: %s", name, exc)

        _side_by_side([functools.partial(stop_server, name)
                       for name in ("smtp", "kafka", "redis", "postgresql")
                       if name in self.services])
        with contextlib.suppress(OSError):
            self._pidfile.unlink()


def _side_by_side(calls: list[Callable[[], None]]) -> None:
    """Run the calls in threads of their own and return once every one has; the first
    exception is raised then."""
    if len(calls) <= 1:
        for call in calls:
            call()
        return
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        done = [pool.submit(call) for call in calls]
    for future in done:
        future.result()


def job_topics(env: dict[str, str]) -> dict[str, str]:
    """`common.clients.job_topics` as the functions will see it: in a process of their
    environment that imports their handler modules (this one may have registered others,
    a test process certainly has). The servers' URLs may not be in `env` yet: the topics
    come from the settings and the handler modules only."""
    run = subprocess.run(
        [sys.executable, "-c", "import json; from common import clients;"
         " print(json.dumps(clients.job_topics()))"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        modules = env.get("JOBS_HANDLER_MODULES") or "built-in only"
        raise RuntimeError(f"cannot import the handler modules ({modules}):"
                           f" {run.stderr.strip()[-2000:]}")
    topics: dict[str, str] = json.loads(run.stdout.strip().splitlines()[-1])
    return topics


def _port_from_environment() -> int:
    text = os.environ.get("PORT", "").strip() or "8080"
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"PORT must be a port number from 1 to 65535, not {text!r}")
    return int(text)


def missing_handler_files(modules: str) -> None:
    """ValueError naming a JOBS_HANDLER_MODULES file that does not exist (modules given by
    dotted name are imported, and checked, by the processes that use them)."""
    for spec in modules.split(","):
        path = handler_file(spec, base=ROOT)  # the processes run in ROOT
        if path is not None and not path.is_file():
            raise ValueError(f"JOBS_HANDLER_MODULES: no such file {spec.strip()!r}"
                             f" (relative paths start at {ROOT})")


def port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _started_by_make() -> bool:
    with contextlib.suppress(psutil.Error):
        parent = psutil.Process().parent()
        return parent is not None and parent.name() in ("make", "gmake")
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get(
        "JOBS_DATA_DIR", ROOT / ".data")))
    parser.add_argument("--port", type=int, default=None,
                        help="the gateway's port (default: $PORT, else 8080)")
    parser.add_argument("--quiet", action="store_true", help="do not echo process logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # A bad setting stops us here, in one line, before any server starts.
    try:
        port = args.port if args.port is not None else _port_from_environment()
        log_level()
        missing_handler_files(os.environ.get("JOBS_HANDLER_MODULES", ""))
        load_settings()
        stack = Stack(args.data_dir, gateway_port=port, echo=not args.quiet)
    except ValidationError as exc:
        sys.exit(f"cannot start:\n{describe_error(exc)}")
    except ValueError as exc:
        sys.exit(f"cannot start: {exc}")
    if not port_is_free(port):
        sys.exit(f"port {port} is taken; stop what runs there or pass --port N")
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    # SIGHUP: the terminal went away; stop as for Ctrl-C rather than die without cleaning up.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    if _started_by_make():
        # `make run` killed (even by SIGKILL) stops the stack as SIGTERM does.
        services.die_with_parent(signal.SIGTERM, parent=os.getppid())()
    started = time.monotonic()
    try:
        stack.start()
        print(stack.summary() + f"\n(services and processes started in"
              f" {time.monotonic() - started:.1f}s)", flush=True)
        stopping.wait()
    finally:
        print("\nstopping...", flush=True)
        stack.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    main()
