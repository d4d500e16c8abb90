"""The `jobs` command line: argument parsing and one function per command."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, NoReturn

from jobs_cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    __version__,
    render,
)
from jobs_cli.client import (
    STREAM_READ_TIMEOUT,
    ApiError,
    Client,
    CliError,
    Reply,
    Unreachable,
    UsageError,
    one_line,
)

DEFAULT_URL = "http://localhost:8080"
PAGE_MAX = 200  # the API's largest `limit`
WAIT_POLL_SECONDS = 0.2
WAIT_OUTAGE_SECONDS = 30.0  # how long `--wait` rides out an unreachable or 503 API
TOKEN_FILE = "admin-token"  # written by `make run` into its data folder (.data)

EPILOG = """\
examples:
  jobs submit REPORT_GENERATION --payload @report.json --wait
  jobs submit EMAIL_SENDING --payload @email.json --run-at +5m
  jobs wait 3f1c9a2e              (live progress until the job ends; exit 0 if it completed)
  jobs submit DATA_EXPORT --payload '{"dataset": "jobs", "format": "jsonl"}'
  jobs list --status DEAD_LETTER --all
  jobs --json status 3f1c9a2e-...      (ids can be shortened to a unique prefix)
  jobs watch
  jobs tokens create ci --scope jobs:submit --scope jobs:read --expires-in 30d
  jobs schedules create nightly REPORT_GENERATION --payload @report.json \
       --cron '0 2 * * *' --timezone Europe/Berlin

authentication: every request sends `Authorization: Bearer <token>` with the token from
  --token, else $JOBS_TOKEN, else the file `make run` writes: .data/admin-token in the
  current folder ($JOBS_DATA_DIR/admin-token when JOBS_DATA_DIR is set)

exit codes: 0 ok; 1 the job failed or the API refused (not found, conflict...);
            2 usage error; 3 the API cannot be reached; 130 interrupted while waiting
"""


# --- parsing ----------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"argument (COMMAND|ACTION): invalid choice: (.+?)"
                           r" \(choose from (.*)\)$", message)
        if unknown:
            # an ACTION belongs to the command whose parser this is: `jobs tokens`...
            kind = "command" if unknown.group(1) == "COMMAND" else \
                f"{self.prog.split()[-1]} command"
            message = f"unknown {kind} {unknown.group(2)} (commands: {unknown.group(3)})"
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def retries_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, not {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _global_options(parser: argparse.ArgumentParser, *, sub: bool) -> None:
    """--url/--json/--timeout, accepted before or after the command name.

    On subcommands the defaults are SUPPRESS, so an option given before the command is
    not overwritten by the subcommand's default.
    """
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if sub else value

    parser.add_argument("--url", default=default(None), metavar="URL",
                        help=f"API base URL (default: $JOBS_URL or {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the API's JSON documents instead of tables")
    parser.add_argument("--timeout", type=positive_float, default=default(10.0), metavar="S",
                        help="seconds to wait for each HTTP answer (default 10)")
    parser.add_argument("--token", default=default(None), metavar="TOKEN",
                        help="API bearer token (default: $JOBS_TOKEN, else the admin-token"
                             " file `make run` wrote in .data, or in $JOBS_DATA_DIR)")


def build_parser() -> Parser:
    parser = Parser(prog="jobs", description="Submit, inspect and manage jobs through the"
                    " jobs HTTP API.", epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(parser, sub=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, sub=True)
        return sub

    p = command("submit", "submit a job (POST /jobs)")
    p.add_argument("job_type", metavar="TYPE", help="a registered job type, e.g."
                   " REPORT_GENERATION, EMAIL_SENDING or DATA_EXPORT")
    p.add_argument("--payload", metavar="JSON|@FILE",
                   help="the job's input: a JSON object, @path to read it from a file,"
                        " or @- for stdin (default {})")
    p.add_argument("--max-retries", type=retries_int, metavar="N",
                   help="retries after the first attempt (0-100; default: the API's, 3)")
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="submitting again with the same key returns the same job")
    p.add_argument("--run-at", metavar="WHEN",
                   help="run no earlier than WHEN: ISO 8601 (2030-01-31T14:00:00Z; no zone"
                        " means local time) or +N[s|m|h|d] from now")
    p.add_argument("--depends-on", action="append", metavar="ID", default=[],
                   help="run only after this job completed (repeat for several; a unique"
                        " prefix will do); cancelled if it does not")
    p.add_argument("--callback-url", metavar="URL",
                   help="POST a signed CloudEvent here when the job ends (the host must be"
                        " in the server's JOBS_CALLBACK_ALLOWED_HOSTS)")
    p.add_argument("--wait", action="store_true",
                   help="show live progress until the job ends; exit 0 if it completed,"
                        " 1 if it was dead-lettered or cancelled")
    p.add_argument("--wait-timeout", type=positive_float, metavar="S",
                   help="with --wait, give up (exit 1) after S seconds")
    p.set_defaults(handler=cmd_submit)

    p = command("wait", "follow a job until it ends, with live progress (GET"
                " /jobs/{id}/events); exit 0 if it completed, 1 if it was dead-lettered or"
                " cancelled")
    p.add_argument("job_id", metavar="ID", help="job id, or a unique prefix of it")
    p.add_argument("--wait-timeout", type=positive_float, metavar="S",
                   help="give up (exit 1) after S seconds")
    p.set_defaults(handler=cmd_wait)

    p = command("status", "show one job (GET /jobs/{id})")
    p.add_argument("job_id", metavar="ID", help="job id, or a unique prefix of it")
    p.set_defaults(handler=cmd_status)

    p = command("list", "list jobs, newest first (GET /jobs)")
    p.add_argument("--status", metavar="S", help="only these statuses (comma-separated)")
    p.add_argument("--type", dest="job_type", metavar="T", help="only these job types"
                   " (comma-separated)")
    _paging_options(p, default_limit=20)
    p.add_argument("--full-ids", action="store_true", help="show whole job ids")
    p.set_defaults(handler=cmd_list)

    p = command("dead-letters", "list dead-lettered jobs (GET /dead-letters)")
    _paging_options(p, default_limit=20)
    p.add_argument("--full-ids", action="store_true", help="show whole job ids")
    p.set_defaults(handler=cmd_dead_letters)

    p = command("retry", "put a dead-lettered job back in the queue (POST /jobs/{id}/retry)")
    p.add_argument("job_id", metavar="ID", help="job id, or a unique prefix of a dead-lettered"
                   " job")
    p.add_argument("--with-dependents", action="store_true",
                   help="also bring back the jobs its failure cancelled (they wait for it"
                        " again)")
    p.add_argument("--wait", action="store_true", help="then wait for it, as submit --wait")
    p.add_argument("--wait-timeout", type=positive_float, metavar="S",
                   help="with --wait, give up (exit 1) after S seconds")
    p.set_defaults(handler=cmd_retry)

    p = command("dependents", "list the jobs that depend on a job (GET /jobs/{id}/dependents)")
    p.add_argument("job_id", metavar="ID", help="job id, or a unique prefix of it")
    p.add_argument("--full-ids", action="store_true", help="show whole job ids")
    p.set_defaults(handler=cmd_dependents)

    p = command("callbacks", "show a job's callback deliveries (GET /jobs/{id}/callbacks)")
    p.add_argument("job_id", metavar="ID", help="job id, or a unique prefix of it")
    p.set_defaults(handler=cmd_callbacks)

    p = command("cancel", "cancel a job (POST /jobs/{id}/cancel)")
    p.add_argument("job_id", metavar="ID", help="job id, or a unique prefix of it")
    p.set_defaults(handler=cmd_cancel)

    p = command("watch", "live counts per status and recent jobs (GET /stats)")
    p.add_argument("--interval", type=positive_float, default=2.0, metavar="S",
                   help="seconds between refreshes (default 2)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--recent", type=positive_int, default=10, metavar="N",
                   help="recent jobs to show (default 10; fewer if the terminal is short)")
    p.set_defaults(handler=cmd_watch)

    p = command("tokens", "create, list and revoke API tokens (/tokens; needs the admin scope)")
    p.set_defaults(handler=cmd_tokens_missing)
    action = _actions(p)

    t = action("create", "create a token (POST /tokens); it is shown only this once")
    t.add_argument("name", metavar="NAME", help="a label for people, e.g. the client's name")
    t.add_argument("--scope", dest="scopes", action="append", required=True, metavar="SCOPE",
                   help="jobs:submit, jobs:read, jobs:operate or admin (everything); repeat"
                        " or comma-separate for several")
    when = t.add_mutually_exclusive_group()
    when.add_argument("--expires-in", metavar="DURATION",
                      help="expire after DURATION: N followed by s, m, h, d or w (30d, 12h)")
    when.add_argument("--expires-at", metavar="WHEN",
                      help="expire at WHEN, ISO 8601 (no zone means local time)")
    t.set_defaults(handler=cmd_tokens_create)

    t = action("list", "list tokens, newest first (GET /tokens)")
    t.set_defaults(handler=cmd_tokens_list)

    t = action("revoke", "revoke a token at once (DELETE /tokens/{id})")
    t.add_argument("token_id", metavar="ID", help="the token's id (from `jobs tokens list`)")
    t.set_defaults(handler=cmd_tokens_revoke)

    p = command("schedules", "create, list, show, pause, resume and delete schedules: a job"
                " made on every tick of a cron expression or every N seconds (/schedules)")
    p.set_defaults(handler=cmd_schedules_missing)
    action = _actions(p)
    s = action("create", "create a schedule (POST /schedules)")
    s.add_argument("name", metavar="NAME", help="letters, digits, '_', '-', '.' (at most 100)")
    s.add_argument("job_type", metavar="TYPE", help="the job type each tick submits")
    s.add_argument("--payload", metavar="JSON|@FILE",
                   help="each job's input, as for submit (default {})")
    timing = s.add_mutually_exclusive_group(required=True)
    timing.add_argument("--cron", metavar="EXPR", help="five fields: minute hour"
                        " day-of-month month day-of-week, e.g. '30 2 * * MON-FRI'")
    timing.add_argument("--every", metavar="DURATION", help="a tick every DURATION: seconds,"
                        " or N followed by s, m, h, d or w (2s, 5m, 1h)")
    s.add_argument("--timezone", metavar="TZ", help="with --cron: the IANA time zone it is"
                   " read in (default UTC), e.g. Europe/Berlin")
    s.add_argument("--max-retries", type=retries_int, metavar="N",
                   help="each job's retries (0-100; default: its type's, else 3)")
    s.set_defaults(handler=cmd_schedules_create)
    s = action("list", "list schedules by name, with their next and last runs (GET /schedules)")
    _paging_options(s, default_limit=50)
    s.set_defaults(handler=cmd_schedules_list)
    for name, help_text, handler in [
            ("show", "show one schedule (GET /schedules/{name})", cmd_schedules_show),
            ("pause", "stop a schedule's ticks until resumed (POST /schedules/{name}/pause)",
             cmd_schedules_pause),
            ("resume", "tick again from the next tick after now"
             " (POST /schedules/{name}/resume)", cmd_schedules_resume),
            ("delete", "delete a schedule (DELETE /schedules/{name})", cmd_schedules_delete)]:
        s = action(name, help_text)
        s.add_argument("name", metavar="NAME", help="the schedule's name")
        s.set_defaults(handler=handler)
    return parser


def _actions(parent: argparse.ArgumentParser) -> Callable[[str, str], argparse.ArgumentParser]:
    """The ACTION sub-commands of a command (`jobs tokens create`): a maker of each."""
    group = parent.add_subparsers(dest=f"{parent.prog.split()[-1]}_command", metavar="ACTION",
                                  parser_class=Parser)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, sub=True)
        return sub

    return action


def _paging_options(p: argparse.ArgumentParser, default_limit: int) -> None:
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help=f"show at most N (default {default_limit}); with --all, the page size")
    p.add_argument("--all", action="store_true", help="follow next_cursor to the end")
    p.add_argument("--cursor", metavar="C", help="start from this next_cursor")
    p.set_defaults(default_limit=default_limit)


def parse_payload(text: str | None, stdin: IO[str] | None = None) -> dict[str, Any]:
    """The --payload value: inline JSON, @file or @- (stdin); must be a JSON object."""
    if text is None:
        return {}
    source = "--payload"
    raw = text
    if text.startswith("@"):
        path = text[1:]
        if not path:
            raise UsageError("--payload @ needs a file name (or @- for stdin)")
        if path == "-":
            source, raw = "--payload @- (stdin)", (stdin or sys.stdin).read()
        else:
            source = f"--payload @{path}"
            try:
                with open(path, encoding="utf-8") as handle:
                    raw = handle.read()
            except OSError as exc:
                raise UsageError(f"{source}: cannot read the file: {exc.strerror or exc}") \
                    from None
            except UnicodeDecodeError as exc:
                raise UsageError(f"{source}: not UTF-8 text ({exc.reason} at byte"
                                 f" {exc.start})") from None
    if not raw.strip():
        raise UsageError(f"{source} is empty; give a JSON object such as '{{}}'")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        line = raw.splitlines()[exc.lineno - 1] if raw.splitlines() else ""
        near = line[exc.colno - 1: exc.colno + 19]
        where = f"line {exc.lineno}, column {exc.colno}"
        hint = f", near {near!r}" if near.strip() else " (at the end)"
        raise UsageError(f"{source} is not valid JSON: {exc.msg} at {where}{hint}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(value), "a number")
        raise UsageError(f"{source} must be a JSON object ({{...}}), not {kind}")
    return value


_RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd]?)$")


def parse_run_at(text: str, now: datetime | None = None) -> str:
    """--run-at as an ISO 8601 string with a UTC offset."""
    match = _RELATIVE.match(text.strip())
    if match:
        unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        when = (now or datetime.now(UTC)) + timedelta(seconds=float(match.group(1)) * unit)
        return when.astimezone(UTC).isoformat()
    return _iso_time(text, "--run-at", ", nor +N[s|m|h|d]")


def _iso_time(text: str, option: str, alternative: str = "") -> str:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r} is not an ISO 8601 time like"
                         f" 2030-01-31T14:00:00Z{alternative}") from None
    if when.tzinfo is None:
        when = when.astimezone()  # a time without a zone is local time
    return when.isoformat()


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_EVERY = re.compile(r"^(\d+)([smhdw]?)$")


def parse_every(text: str) -> int:
    """--every: seconds, or N followed by s, m, h, d or w; at least one second."""
    match = _EVERY.match(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"--every {text!r} is not a duration like 30, 30s, 5m or 1h"
                         " (N > 0, optionally followed by s, m, h, d or w)")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]


def parse_expiry(expires_in: str | None, expires_at: str | None,
                 now: datetime | None = None) -> str | None:
    """--expires-in (30d, 12h, 90m) or --expires-at as an ISO 8601 time with an offset."""
    if expires_at is not None:
        return _iso_time(expires_at, "--expires-at")
    if expires_in is None:
        return None
    match = _DURATION.match(expires_in.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"--expires-in {expires_in!r} is not a duration like 30d, 12h or 90m"
                         " (N > 0 followed by s, m, h, d or w)")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        when = (now or datetime.now(UTC)) + timedelta(seconds=seconds)
    except OverflowError:
        raise UsageError(f"--expires-in {expires_in!r} is too far away") from None
    return when.astimezone(UTC).isoformat()


# --- the token --------------------------------------------------------------------------

def token_file(environ: Mapping[str, str]) -> Path:
    """Where `make run` writes its admin token: $JOBS_DATA_DIR or .data, in the current folder."""
    return Path(environ.get("JOBS_DATA_DIR") or ".data") / TOKEN_FILE


def resolve_token(option: str | None, environ: Mapping[str, str] | None = None
                  ) -> tuple[str | None, str]:
    """(token, where it came from): --token, else $JOBS_TOKEN, else the token file, else
    (None, "")."""
    env = os.environ if environ is None else environ
    if option is not None:
        return _checked_token(option, "--token"), "--token"
    if env.get("JOBS_TOKEN", "").strip():
        return _checked_token(env["JOBS_TOKEN"], "$JOBS_TOKEN"), "$JOBS_TOKEN"
    path = token_file(env)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, ""
    return (_checked_token(text, str(path)), str(path)) if text else (None, "")


def _checked_token(text: str, source: str) -> str:
    token = text.strip()
    if not token:
        raise UsageError(f"{source} is empty; give a token like jobs_<id>_<secret>")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise UsageError(f"the token from {source} has spaces, line breaks or non-ASCII"
                         " characters; a token looks like jobs_<id>_<secret>")
    return token


def _unauthorized_hint(source: str, environ: Mapping[str, str] | None = None) -> str:
    if source:
        return f"(the token from {source} was refused; pass another with --token or JOBS_TOKEN)"
    path = token_file(os.environ if environ is None else environ)
    return (f"(pass --token, set JOBS_TOKEN, or run from the folder where `make run` wrote"
            f" {path}, or set JOBS_DATA_DIR to the data folder it used)")


# --- running ----------------------------------------------------------------------------

class Out:
    """Where a command writes: stdout for results, stderr for the one-line reasons."""

    def __init__(self, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> None:
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.ascii_only = not _can_encode(self.stdout, "█░…")

    def print(self, text: str = "") -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def raw(self, reply: Reply) -> None:
        """A document exactly as the API sent it, one per line."""
        self.print(reply.text.strip())

    def warn(self, text: str) -> None:
        self.stderr.write(f"jobs: {text}\n")
        self.stderr.flush()


def _can_encode(stream: IO[str], sample: str) -> bool:
    try:
        sample.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def run(argv: list[str] | None = None, *, stdout: IO[str] | None = None,
        stderr: IO[str] | None = None) -> int:
    """Parse `argv`, run the command, and answer the exit code; errors as one line."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    out = Out(stdout, stderr)
    token_source = ""
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "command", None):
            raise UsageError("a command is needed: submit, wait, status, list, dead-letters,"
                             " retry, cancel, watch, tokens or schedules (see `jobs --help`)")
        url = args.url or os.environ.get("JOBS_URL") or DEFAULT_URL
        token, token_source = resolve_token(args.token)
        client = Client(url, timeout=args.timeout, token=token)
        handler: Callable[[argparse.Namespace, Client, Out], int] = args.handler
        return handler(args, client, out)
    except CliError as exc:
        if isinstance(exc, ApiError) and exc.status == 401:
            out.warn(one_line(exc.message, 300) + " " + _unauthorized_hint(token_source))
        else:
            out.warn(exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        out.warn("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `jobs list | head`: the reader left; say nothing more.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_OK


# --- commands ---------------------------------------------------------------------------

def cmd_submit(args: argparse.Namespace, client: Client, out: Out) -> int:
    body: dict[str, Any] = {"job_type": args.job_type, "payload": parse_payload(args.payload)}
    if args.max_retries is not None:
        body["max_retries"] = args.max_retries
    if args.run_at:
        body["run_at"] = parse_run_at(args.run_at)
    if args.depends_on:
        body["depends_on"] = [resolve_id(client, ref) for ref in args.depends_on]
    if args.callback_url:
        body["callback_url"] = args.callback_url
    if args.wait_timeout and not args.wait:
        raise UsageError("--wait-timeout needs --wait")
    reply = client.submit(body, args.idempotency_key)
    job = reply.json
    deferred = reply.headers.get("x-jobs-enqueue") == "deferred"
    if not args.wait:
        if args.json:
            out.raw(reply)
        else:
            out.print(f"submitted {job.get('job_id')}  {job.get('job_type')}  "
                      f"{job.get('status')}" + (f"  run at {job['run_at']}"
                                                if job.get("run_at") else ""))
            if deferred:
                out.print("note: the broker did not acknowledge in time; the job is stored"
                          " and will be enqueued by the sweeper")
        return EXIT_OK
    if not args.json:
        out.print(f"submitted {job.get('job_id')}  {job.get('job_type')}"
                  + ("  (enqueue deferred: broker unavailable)" if deferred else ""))
    return wait_and_report(client, out, reply, args)


def wait_and_report(client: Client, out: Out, reply: Reply, args: argparse.Namespace) -> int:
    """Follow a job to its end with a live display, then print its outcome."""
    job = reply.json
    job_id = str(job.get("job_id"))
    if args.json:
        stream, tty = out.stderr, _isatty(out.stderr)
        show = tty  # keep stderr quiet for scripts; stdout gets the final document only
    else:
        stream, tty, show = out.stdout, _isatty(out.stdout), True
    started = time.monotonic()
    try:
        final = wait_for_job(client, reply, stream=stream if show else None, tty=tty,
                             ascii_only=out.ascii_only, timeout=args.wait_timeout)
    except KeyboardInterrupt:
        if show and tty:
            stream.write("\n")
        out.warn(f"stopped waiting; job {job_id} goes on (jobs status {job_id})")
        return EXIT_INTERRUPTED
    doc = final.json
    status = doc.get("status")
    if args.json:
        out.raw(final)
    else:
        elapsed = time.monotonic() - started
        out.print(f"{status} after {doc.get('attempts')} attempt(s), retries"
                  f" {render.retries_cell(doc)}, {elapsed:.1f}s")
        if status == "COMPLETED":
            out.print("result: " + json.dumps(doc.get("result"), indent=2, ensure_ascii=False))
    if status == "COMPLETED":
        return EXIT_OK
    reason = f": {one_line(doc['error_message'], 300)}" if doc.get("error_message") else ""
    out.warn(f"job {job_id} ended {status}{reason}")
    return EXIT_FAILED


class _Sleep:
    """time.sleep, replaceable in tests."""

    sleep = staticmethod(time.sleep)


def wait_for_job(client: Client, reply: Reply, *, stream: IO[str] | None, tty: bool,
                 ascii_only: bool = False, timeout: float | None = None,
                 interval: float = WAIT_POLL_SECONDS) -> Reply:
    """Follow a job until it is COMPLETED, DEAD_LETTER or CANCELLED: from its event stream
    (GET /jobs/{id}/events) as each change happens, or by polling GET /jobs/{id} if the
    stream cannot be opened (an older server, a proxy that does not pass it, a gateway at
    its limit of streams) or breaks before the end.

    On a TTY one line is redrawn with \\r; otherwise a line is printed per change. While
    polling, an unreachable API or a 503 is ridden out for WAIT_OUTAGE_SECONDS.
    """
    job_id = str(reply.json.get("job_id"))
    progress = _Progress(stream, tty, ascii_only)
    final, last = _follow_stream(client, job_id, progress, timeout)
    if final is not None:
        return final
    if last is not None:
        reply = _as_reply(last)
    outage_since: float | None = None
    note = ""
    while True:
        job = reply.json
        progress.show(job, note)
        if job.get("status") in render.TERMINAL:
            progress.end()
            return reply
        _check_wait_timeout(job, progress, timeout)
        _Sleep.sleep(interval)
        try:
            reply = client.job(job_id)
            outage_since, note = None, ""
        except (Unreachable, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status != 503:
                raise
            now = time.monotonic()
            outage_since = outage_since or now
            if now - outage_since > WAIT_OUTAGE_SECONDS:
                raise
            note = f"  (retrying: {exc.message})"


def _follow_stream(client: Client, job_id: str, progress: _Progress, timeout: float | None
                   ) -> tuple[Reply | None, dict[str, Any] | None]:
    """(the final document, None) from the job's event stream, or (None, the last document
    it sent, if any) when it cannot be opened, or breaks (a proxy's time limit, a gateway
    restart) and opening it again brings nothing new: the caller polls from there."""
    last: dict[str, Any] | None = None
    read_timeout = STREAM_READ_TIMEOUT if timeout is None else min(STREAM_READ_TIMEOUT,
                                                                  timeout)
    reopened = False
    while True:
        try:
            events = client.events(job_id, timeout=read_timeout)
        except CliError as exc:
            if isinstance(exc, ApiError) and exc.status in (401, 403):
                raise  # polling would be refused just the same
            return None, last
        news = False
        while True:
            try:
                job = next(events, None)
            except CliError:  # broke, or sent something that is not a job document
                break
            if job is None:
                break
            if reopened and last is not None and \
                    job.get("version", 0) <= last.get("version", 0):
                continue  # a reopened stream starts with what was shown already
            news, last = True, job
            progress.show(job)
            if job.get("status") in render.TERMINAL:
                progress.end()
                return _as_reply(job), None
            _check_wait_timeout(job, progress, timeout)
        if not news:
            return None, last
        if last is not None:
            _check_wait_timeout(last, progress, timeout)
        reopened = True


def _as_reply(job: dict[str, Any]) -> Reply:
    return Reply(200, {"content-type": "application/json"}, json.dumps(job).encode())


def _check_wait_timeout(job: dict[str, Any], progress: _Progress, timeout: float | None
                        ) -> None:
    if timeout is not None and progress.elapsed() > timeout:
        progress.end()
        raise CliError(f"job {job.get('job_id')} is still {job.get('status')} after"
                       f" {timeout:g}s (--wait-timeout)")


class _Progress:
    """The live line of a waiting job: redrawn on a TTY, else printed once per change."""

    def __init__(self, stream: IO[str] | None, tty: bool, ascii_only: bool) -> None:
        self.stream, self.tty, self.ascii_only = stream, tty, ascii_only
        self.started = time.monotonic()
        self.last_state: tuple[Any, ...] | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def show(self, job: dict[str, Any], note: str = "") -> None:
        if self.stream is None:
            return
        line = render.wait_line(job, self.elapsed(), self.ascii_only) + note
        state = tuple(job.get(k) for k in ("status", "attempts", "retries", "progress",
                                           "progress_message", "cancel_requested")) + (note,)
        if self.tty:
            cols = shutil.get_terminal_size((100, 24)).columns
            self.stream.write("\r\x1b[K" + render.clip(line, max(cols - 1, 20)))
            self.stream.flush()
        elif state != self.last_state:
            self.stream.write(line + "\n")
            self.stream.flush()
        self.last_state = state

    def end(self) -> None:
        """After the last redraw of the line on a TTY: move past it."""
        if self.stream is not None and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def cmd_wait(args: argparse.Namespace, client: Client, out: Out) -> int:
    reply = client.job(resolve_id(client, args.job_id))
    return wait_and_report(client, out, reply, args)


def cmd_status(args: argparse.Namespace, client: Client, out: Out) -> int:
    reply = client.job(resolve_id(client, args.job_id))
    if args.json:
        out.raw(reply)
    else:
        out.print(render.job_detail(reply.json, ascii_only=out.ascii_only))
    return EXIT_OK


def _pages(fetch: Callable[[int, str | None], Reply], args: argparse.Namespace
           ) -> Iterator[tuple[Reply, list[dict[str, Any]], str | None]]:
    """Pages until --limit items (or the end, with --all); yields (reply, items, cursor)."""
    wanted: int | None = None if args.all else (args.limit or args.default_limit)
    cursor, seen = args.cursor, 0
    while True:
        if wanted is None:
            size = min(args.limit or PAGE_MAX, PAGE_MAX)
        else:
            size = min(wanted - seen, PAGE_MAX)
        reply = fetch(size, cursor)
        doc = reply.json
        items = doc.get("items") or []
        cursor = doc.get("next_cursor")
        seen += len(items)
        yield reply, items, cursor
        if not cursor or not items or (wanted is not None and seen >= wanted):
            return


def _list_output(out: Out, args: argparse.Namespace, pages: Iterator[Any],
                 table: Callable[[list[dict[str, Any]]], str], noun: str) -> int:
    items: list[dict[str, Any]] = []
    cursor = None
    for reply, page_items, next_cursor in pages:
        if args.json:
            out.raw(reply)
        items += page_items
        cursor = next_cursor
    if args.json:
        return EXIT_OK
    if not items:
        out.print(f"no {noun}")
    else:
        out.print(table(items))
    if cursor and not args.all:
        out.print(f"({len(items)} shown; more with --all or --cursor {cursor})")
    return EXIT_OK


def cmd_list(args: argparse.Namespace, client: Client, out: Out) -> int:
    status = args.status.upper().replace(" ", "") if args.status else None
    job_type = args.job_type.replace(" ", "") if args.job_type else None

    def fetch(limit: int, cursor: str | None) -> Reply:
        return client.jobs(status=status, job_type=job_type, limit=limit, cursor=cursor)

    return _list_output(out, args, _pages(fetch, args),
                        lambda items: render.jobs_table(items, full_ids=args.full_ids,
                                                        ascii_only=out.ascii_only), "jobs")


def cmd_dead_letters(args: argparse.Namespace, client: Client, out: Out) -> int:
    def fetch(limit: int, cursor: str | None) -> Reply:
        return client.dead_letters(limit=limit, cursor=cursor)

    return _list_output(out, args, _pages(fetch, args),
                        lambda items: render.dead_letters_table(items, full_ids=args.full_ids),
                        "dead letters")


def cmd_retry(args: argparse.Namespace, client: Client, out: Out) -> int:
    if args.wait_timeout and not args.wait:
        raise UsageError("--wait-timeout needs --wait")
    reply = client.retry(resolve_id(client, args.job_id, status="DEAD_LETTER"),
                         with_dependents=args.with_dependents)
    job = reply.json
    # How many came back is not in the answer, and counting them afterwards would race
    # with the job itself: say where to look.
    waiting = (f"; the jobs its failure cancelled wait for it again (jobs dependents"
               f" {str(job.get('job_id'))[:8]})") if args.with_dependents else ""
    if args.wait:
        if not args.json:
            out.print(f"job {job.get('job_id')} is back in the queue{waiting}")
        return wait_and_report(client, out, reply, args)
    if args.json:
        out.raw(reply)
    else:
        out.print(f"job {job.get('job_id')} is back in the queue: {job.get('status')},"
                  f" retries {render.retries_cell(job)} (HTTP {reply.status}){waiting}")
    return EXIT_OK


def cmd_dependents(args: argparse.Namespace, client: Client, out: Out) -> int:
    reply = client.dependents(resolve_id(client, args.job_id))
    return _list_output(out, args, _one_page(reply),
                        lambda items: render.jobs_table(items, full_ids=args.full_ids,
                                                        ascii_only=out.ascii_only),
                        "job depends on it")


def cmd_callbacks(args: argparse.Namespace, client: Client, out: Out) -> int:
    reply = client.callbacks(resolve_id(client, args.job_id))
    return _list_output(out, args, _one_page(reply), render.callbacks_table,
                        "callbacks (none asked, or the job has not ended)")


def _one_page(reply: Reply) -> Iterator[tuple[Reply, list[dict[str, Any]], None]]:
    """A listing the API answers whole (no cursor), as `_list_output` takes pages."""
    yield reply, reply.json.get("items") or [], None


def cmd_cancel(args: argparse.Namespace, client: Client, out: Out) -> int:
    reply = client.cancel(resolve_id(client, args.job_id))
    job = reply.json
    if args.json:
        out.raw(reply)
    elif job.get("status") == "CANCELLED":
        out.print(f"job {job.get('job_id')} cancelled")
    else:
        out.print(f"cancel requested for job {job.get('job_id')}: it is {job.get('status')}"
                  " and has been told to stop")
    return EXIT_OK


# --- tokens -----------------------------------------------------------------------------

def cmd_tokens_missing(args: argparse.Namespace, client: Client, out: Out) -> int:
    raise UsageError("a tokens command is needed: create, list or revoke"
                     " (see `jobs tokens --help`)")


def cmd_tokens_create(args: argparse.Namespace, client: Client, out: Out) -> int:
    body: dict[str, Any] = {
        "name": args.name,
        "scopes": [s.strip() for raw in args.scopes for s in raw.split(",") if s.strip()]}
    expires_at = parse_expiry(args.expires_in, args.expires_at)
    if expires_at is not None:
        body["expires_at"] = expires_at
    reply = client.create_token(body)
    if args.json:
        out.raw(reply)
        return EXIT_OK
    doc = reply.json
    expires = render.iso_and_relative(doc.get("expires_at")) if doc.get("expires_at") else \
        "never"
    out.print(f"created token {doc.get('name')!r}  id {doc.get('id')}")
    out.print(f"scopes: {', '.join(doc.get('scopes') or [])}; expires: {expires}")
    out.print("")
    out.print(f"    {doc.get('token')}")
    out.print("")
    out.print("This is the only time the token is shown (the API keeps only a hash): store it"
              " now. Use it with --token or JOBS_TOKEN.")
    return EXIT_OK


def cmd_tokens_list(args: argparse.Namespace, client: Client, out: Out) -> int:
    reply = client.tokens()
    if args.json:
        out.raw(reply)
        return EXIT_OK
    items = reply.json.get("items") or []
    out.print(render.tokens_table(items) if items else "no tokens")
    return EXIT_OK


def cmd_tokens_revoke(args: argparse.Namespace, client: Client, out: Out) -> int:
    client.revoke_token(args.token_id.strip())
    if not args.json:  # 204: the API has no document to print
        out.print(f"token {args.token_id.strip()} revoked")
    return EXIT_OK


# --- schedules --------------------------------------------------------------------------

def cmd_schedules_missing(args: argparse.Namespace, client: Client, out: Out) -> int:
    raise UsageError("a schedules command is needed: create, list, show, pause, resume or"
                     " delete (see `jobs schedules --help`)")


def cmd_schedules_create(args: argparse.Namespace, client: Client, out: Out) -> int:
    body: dict[str, Any] = {"name": args.name, "job_type": args.job_type,
                            "payload": parse_payload(args.payload)}
    if args.cron is not None:
        body["cron"] = args.cron
        if args.timezone:
            body["timezone"] = args.timezone
    elif args.timezone:
        raise UsageError("--timezone goes with --cron (--every ticks are absolute)")
    else:
        body["every_seconds"] = parse_every(args.every)
    if args.max_retries is not None:
        body["max_retries"] = args.max_retries
    return _schedule_answer(out, args, client.create_schedule(body), "created schedule")


def cmd_schedules_list(args: argparse.Namespace, client: Client, out: Out) -> int:
    return _list_output(out, args, _pages(client.schedules, args), render.schedules_table,
                        "schedules")


def cmd_schedules_show(args: argparse.Namespace, client: Client, out: Out) -> int:
    reply = client.schedule(args.name)
    if args.json:
        out.raw(reply)
    else:
        out.print(render.schedule_detail(reply.json))
    return EXIT_OK


def cmd_schedules_pause(args: argparse.Namespace, client: Client, out: Out) -> int:
    return _schedule_answer(out, args, client.pause_schedule(args.name), "paused schedule")


def cmd_schedules_resume(args: argparse.Namespace, client: Client, out: Out) -> int:
    return _schedule_answer(out, args, client.resume_schedule(args.name), "resumed schedule")


def cmd_schedules_delete(args: argparse.Namespace, client: Client, out: Out) -> int:
    client.delete_schedule(args.name)
    if not args.json:  # 204: no document to print
        out.print(f"deleted schedule {args.name}")
    return EXIT_OK


def _schedule_answer(out: Out, args: argparse.Namespace, reply: Reply, done: str) -> int:
    if args.json:
        out.raw(reply)
        return EXIT_OK
    doc = reply.json
    out.print(f"{done} {doc.get('name')}: {doc.get('job_type')} {render.schedule_when(doc)}")
    out.print("next run: " + (render.iso_and_relative(doc["next_run_at"])
                              if doc.get("next_run_at") else "none (paused)"))
    return EXIT_OK


# --- watch ------------------------------------------------------------------------------

def cmd_watch(args: argparse.Namespace, client: Client, out: Out) -> int:
    with _sigterm_as_interrupt():  # `kill` ends it like Ctrl-C, so the cursor comes back
        return _watch(args, client, out)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt; the old handler comes back after."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous: Any = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _watch(args: argparse.Namespace, client: Client, out: Out) -> int:
    tty = _isatty(out.stdout) and not args.once and not args.json
    first = True
    error: str | None = None
    stats: dict[str, Any] = {}
    try:
        if tty:
            out.stdout.write("\x1b[?25l")  # hide the cursor while redrawing
        while True:
            try:
                reply = client.stats()
                stats, error = reply.json, None
                if args.json:
                    out.raw(reply)
            except CliError as exc:
                if first or args.once or not tty:
                    raise
                error = exc.message  # keep showing the last frame, with the reason
            first = False
            if not args.json:
                footer = f"every {args.interval:g}s, Ctrl-C to quit" if tty else None
                if error:
                    footer = f"NOT UPDATING: {error}"
                frame = _fit_frame(stats, client.base, args.recent, tty, out.ascii_only, footer)
                if tty:
                    out.stdout.write("\x1b[H\x1b[2J" + frame + "\n")
                    out.stdout.flush()
                else:
                    out.print(frame + ("" if args.once else "\n"))
            if args.once:
                return EXIT_OK
            _Sleep.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        if tty:
            out.stdout.write("\x1b[?25h")
            out.stdout.flush()


def _fit_frame(stats: dict[str, Any], url: str, recent: int, tty: bool, ascii_only: bool,
               footer: str | None) -> str:
    frame = render.stats_frame(stats, url=url, recent_limit=recent, ascii_only=ascii_only,
                               footer=footer)
    if tty:
        rows = shutil.get_terminal_size((100, 24)).lines
        excess = frame.count("\n") + 2 - rows
        if excess > 0 and recent > 0:
            frame = render.stats_frame(stats, url=url, recent_limit=max(recent - excess, 1),
                                       ascii_only=ascii_only, footer=footer)
    return frame


# --- ids --------------------------------------------------------------------------------

_PREFIX = re.compile(r"^[0-9a-f-]{4,35}$")
_SHORT = re.compile(r"^[0-9a-f-]{1,3}$")


def resolve_id(client: Client, raw: str, status: str | None = None) -> str:
    """A full job id from `raw`: itself when it is a UUID, else the one job whose id starts
    with it (the API looks it up by its primary key). Anything else goes to the API as
    given (which says what is wrong)."""
    text = raw.strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        pass
    prefix = text.lower()
    if _SHORT.match(prefix):
        raise UsageError(f"{text!r} is too short: give at least 4 characters of the job id")
    if not _PREFIX.match(prefix):
        return text
    reply = client.jobs(status=status, limit=4, id_prefix=prefix)  # a 400 says what is wrong
    matches = sorted({str(j["job_id"]) for j in (reply.json.get("items") or [])})
    if not matches and status:  # the one job of another state: the API says why not
        return resolve_id(client, raw)
    if not matches:
        raise CliError(f"no job id starts with {text!r}")
    if len(matches) > 1:
        more = bool(reply.json.get("next_cursor"))
        shown = ", ".join(m[:13] for m in matches[:3]) + (", ..." if more else "")
        count = f"{len(matches)}{'+' if more else ''}"
        raise UsageError(f"{text!r} matches {count} jobs ({shown}); give more of the id")
    return matches[0]


__all__ = ["build_parser", "parse_payload", "parse_run_at", "run"]
