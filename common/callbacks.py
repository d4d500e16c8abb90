"""Completion callbacks: a signed CloudEvent POSTed to a job's `callback_url` when it ends.

- At submit, `check_url` refuses (422) a URL whose host is not in
  `JOBS_CALLBACK_ALLOWED_HOSTS` (none by default), any link-local or cloud metadata
  address, and any callback at all while `JOBS_CALLBACK_SECRET` is unset.
- When the job reaches COMPLETED, DEAD_LETTER or CANCELLED, a trigger (migration 0008)
  queues a delivery in `job_callbacks` in the same transaction as the outcome.
- `deliver_due` takes due deliveries under a lease, resolves the host, refuses if any of
  its addresses is link-local or a metadata address (checked after DNS resolution, and the
  connection goes to the address checked: no second lookup to rebind), POSTs the event
  (structured JSON, the job document as data) with `X-Jobs-Signature: t=<unix time>,
  v1=<hex HMAC-SHA256 of "<t>." + body>`, and records the try. Redirects are not
  followed. Anything but a 2xx is retried with exponential backoff up to
  `JOBS_CALLBACK_MAX_ATTEMPTS` tries, then the delivery is FAILED.

The function that wrote the outcome delivers at once (`deliver_soon`); the sweeper takes
whatever is left or due again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import urllib3
from cloudevents.conversion import to_structured
from cloudevents.http import CloudEvent

from common import jobs
from common.db import Connection, Database, rows_as_dicts
from common.errors import ApiError
from common.models import shown_url
from common.settings import Settings, bracketed, normal_host

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Jobs-Signature"
SOURCE = "/jobs"
# Cloud metadata services, by name and address (GCP, AWS, Azure, Alibaba, Oracle...).
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog",
                            "instance-data", "instance-data.ec2.internal"})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200",
    "192.0.0.192"))
# Sends run on one pool; `deliver_soon`'s runs, which wait for sends, on another: a run
# never waits for a pool its own kind may have filled.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
SENDERS = 8  # deliveries sent at once by one process (and taken per call of deliver_due)
_SENDERS = concurrent.futures.ThreadPoolExecutor(max_workers=SENDERS,
                                                 thread_name_prefix="callbacks")
_SOON = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="callbacks-soon")


class Refused(ValueError):
    """A callback address this system never calls."""


def forbidden_address(address: str) -> str | None:
    """Why an IP address is never called back, or None."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
        address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address inside an IPv6 one reaches that IPv4 host: mapped (::ffff:a.b.c.d),
        # NAT64 (64:ff9b::a.b.c.d) or the old IPv4-compatible form (::a.b.c.d).
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    if ip.is_link_local:
        return f"{ip} is a link-local address"
    if ip.is_unspecified or ip.is_multicast:
        return f"{ip} is not a host"
    return None


def check_url(url: str, settings: Settings) -> str:
    """The callback URL if this system may call it; else ApiError(422) saying why."""
    def refuse(why: str) -> ApiError:
        return ApiError(422, "Callback not allowed", f"callback_url: {why}")

    if not settings.callback_secret:
        raise refuse("callbacks are off here: JOBS_CALLBACK_SECRET is not set")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise refuse("must not contain spaces or control characters (percent-encode them)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = _port(parts)
    except ValueError as exc:
        raise refuse(f"not a URL ({exc})") from None
    if port == 0:
        raise refuse("port 0 cannot be connected to")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise refuse("must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise refuse("must not carry credentials (user:password@)")
    host = normal_host(parts.hostname)
    if host in METADATA_HOSTS:
        raise refuse(f"{host} is a cloud metadata host")
    try:
        why = forbidden_address(host)
    except ValueError:
        why = None  # a name: checked again after resolution, at each delivery
    if why:
        raise refuse(why)
    allowed = settings.callback_allowed_hosts
    # An IPv6 address is listed in brackets with a port ([::1]:9999), bare without one.
    with_port = f"{bracketed(host)}:{port}"
    if host not in allowed and with_port not in allowed:
        # The list itself is not shown: it names hosts of the operator's network.
        hint = "" if allowed else " (empty: no callback is accepted until hosts are listed)"
        raise refuse(f"host {with_port} is not in JOBS_CALLBACK_ALLOWED_HOSTS{hint}")
    return url


DEFAULT_PORTS = {"http": 80, "https": 443}


def _port(parts: urllib.parse.SplitResult) -> int:
    """The URL's port, else its scheme's (a port 0 stays 0: it is refused, not defaulted)."""
    port = parts.port
    return port if port is not None else DEFAULT_PORTS.get(parts.scheme, 80)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `X-Jobs-Signature` value of `body` sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, header: str, body: bytes, tolerance: float = 300.0) -> bool:
    """Check a signature header (what a receiver does; see the README for a copy)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body)
    return hmac.compare_digest(expected, f"t={timestamp},v1={fields.get('v1', '')}")


def event_body(callback: dict[str, Any], document: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """The structured CloudEvent of a delivery: headers and body."""
    event = CloudEvent({
        "id": str(callback["callback_id"]), "source": SOURCE, "type": callback["event_type"],
        "subject": str(callback["job_id"]), "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
    }, document)
    return to_structured(event)


def resolve(host: str, port: int) -> str:
    """An address of `host` that may be called; Refused if any of them may not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused(f"cannot resolve {host}: {exc.strerror}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        why = forbidden_address(address)
        if why:
            raise Refused(f"{host} resolves to {why}")
    return addresses[0]


def post(url: str, headers: dict[str, str], body: bytes, timeout: float) -> int:
    """POST to the checked address of `url`'s host (TLS verified against the host name);
    the status code. Refused for a forbidden address; urllib3's errors for the network."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = _port(parts)
    address = resolve(host, port)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    pool: urllib3.HTTPConnectionPool
    if parts.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(address, port, timeout=_limit(timeout),
                                           retries=False,
                                           server_hostname=host, assert_hostname=host,
                                           cert_reqs="CERT_REQUIRED")
    else:
        pool = urllib3.HTTPConnectionPool(address, port, timeout=_limit(timeout),
                                          retries=False)
    with pool:
        named = bracketed(host)
        host_header = named if port == DEFAULT_PORTS.get(parts.scheme) else f"{named}:{port}"
        # Only the status matters: the body is never read (a receiver cannot make us hold
        # a large or endless answer), and the whole exchange has one time limit.
        response = pool.urlopen("POST", path, body=body, redirect=False,
                                preload_content=False,
                                headers={**headers, "Host": host_header,
                                         "User-Agent": "jobs-callbacks/1"})
        response.release_conn()
        return response.status


def _limit(seconds: float) -> urllib3.Timeout:
    """One limit for the whole try (connect, send, answer), not one per socket read."""
    return urllib3.Timeout(total=seconds, connect=seconds, read=seconds)


_CLAIM = """
UPDATE job_callbacks SET attempts = attempts + 1,
    next_attempt_at = now() + make_interval(secs => :lease)
WHERE callback_id IN (
    SELECT callback_id FROM job_callbacks
    WHERE state = 'PENDING' AND next_attempt_at <= now() {where}
    ORDER BY next_attempt_at LIMIT :limit FOR UPDATE SKIP LOCKED)
RETURNING *
"""


def deliver_due(db: Database, settings: Settings, job_ids: list[str] | None = None,
                limit: int = SENDERS) -> int:
    """Deliver the callbacks that are due (of `job_ids`, or any); returns how many were
    tried. Each is taken under a lease (the timeout and a margin), so a process that dies
    mid-delivery only delays it; no more are taken than there are senders, so each is
    sent as soon as it is taken, well within its lease."""
    where = "" if job_ids is None else "AND job_id = ANY(CAST(:ids AS uuid[]))"
    with db.transaction() as conn:
        taken = rows_as_dicts(conn, conn.run(
            _CLAIM.format(where=where), lease=settings.callback_timeout_seconds + 10,
            limit=limit, **({} if job_ids is None else {"ids": job_ids})))
        if not taken:
            return 0
        rows = jobs.get_jobs(conn, sorted({str(c["job_id"]) for c in taken}))
    futures = [_SENDERS.submit(_deliver, db, settings, callback,
                               rows.get(str(callback["job_id"]))) for callback in taken]
    concurrent.futures.wait(futures)
    return len(taken)


def deliver_soon(db: Database, settings: Settings, job_ids: list[str]) -> None:
    """`deliver_due` for these jobs in the background (after an outcome is committed)."""
    def run() -> None:
        try:
            deliver_due(db, settings, job_ids)
        except Exception as exc:  # noqa: BLE001 - the sweeper delivers them later
            log.warning("callbacks of %d job(s) not delivered now (%s); the sweeper will",
                        len(job_ids), exc)

    _SOON.submit(run)


def _deliver(db: Database, settings: Settings, callback: dict[str, Any],
             row: dict[str, Any] | None) -> None:
    attempt = callback["attempts"]
    started, clock = datetime.now(UTC), time.monotonic()
    status: int | None = None
    error: str | None = None
    refusal = _refusal(callback["url"], settings)
    if row is None:
        error = "the job no longer exists"
    elif refusal:
        error = f"refused: {refusal}"  # the settings changed since submit
    else:
        headers, body = event_body(callback, jobs.document(row))
        headers[SIGNATURE_HEADER] = sign(settings.callback_secret, int(time.time()), body)
        try:
            status = post(callback["url"], headers, body, settings.callback_timeout_seconds)
            if not 200 <= status < 300:
                error = f"answered {status}"
        except Refused as exc:
            error = f"refused: {exc}"
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            error = _network_error(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. UnicodeError for a bad host label
            log.exception("callback %s: unexpected error", callback["callback_id"])
            error = f"{type(exc).__name__}: {exc}"[:500]
    elapsed_ms = (time.monotonic() - clock) * 1000
    if error is None:
        state = "DELIVERED"
    elif row is None or refusal or attempt >= settings.callback_max_attempts:
        state = "FAILED"
    else:
        state = "PENDING"
    delay = settings.callback_backoff_base_seconds * 2 ** (attempt - 1)
    try:
        with db.transaction() as conn:
            conn.run("INSERT INTO job_callback_attempts (callback_id, attempt, started_at,"
                     " duration_ms, status_code, error) VALUES (CAST(:id AS uuid), :n, :at,"
                     " :ms, :code, :error) ON CONFLICT DO NOTHING",
                     id=str(callback["callback_id"]), n=attempt, at=started, ms=elapsed_ms,
                     code=status, error=error)
            conn.run("UPDATE job_callbacks SET state = :state, delivered_at = CASE WHEN"
                     " :state = 'DELIVERED' THEN now() END, next_attempt_at = now() +"
                     " make_interval(secs => :delay) WHERE callback_id = CAST(:id AS uuid)"
                     " AND attempts = :n AND state = 'PENDING'",
                     id=str(callback["callback_id"]), n=attempt, state=state,
                     delay=min(delay, 3600.0))
    except Exception as exc:  # noqa: BLE001 - the lease runs out: tried again
        log.warning("callback %s: try %d not recorded (%s)", callback["callback_id"], attempt,
                    exc)
        return
    level = logging.INFO if error is None else logging.WARNING
    log.log(level, "callback %s of job %s to %s: %s (try %d, %s)", callback["event_type"],
            callback["job_id"], shown_url(callback["url"]), error or f"delivered ({status})",
            attempt, state)


def _network_error(exc: BaseException) -> str:
    """What went wrong, without the address the host resolved to (an internal detail)."""
    reason = getattr(exc, "reason", None) or exc
    # In this order: urllib3's NewConnectionError is also a TimeoutError.
    text = ((urllib3.exceptions.NewConnectionError, "could not connect"),
            (urllib3.exceptions.TimeoutError, "timed out"),
            (urllib3.exceptions.ProtocolError, "the connection broke"),
            (urllib3.exceptions.SSLError, "TLS failed"))
    for kind, words in text:
        if isinstance(exc, kind) or isinstance(reason, kind):
            return words if kind is not urllib3.exceptions.SSLError else f"{words}: {reason}"[:500]
    return type(reason).__name__


def _refusal(url: str, settings: Settings) -> str | None:
    try:
        check_url(url, settings)
    except ApiError as exc:
        return exc.detail
    return None


def deliveries(conn: Connection, job_id: str) -> list[dict[str, Any]]:
    """A job's callbacks with their tries, oldest first (`GET /jobs/{id}/callbacks`)."""
    callbacks = rows_as_dicts(conn, conn.run(
        "SELECT * FROM job_callbacks WHERE job_id = CAST(:id AS uuid)"
        " ORDER BY created_at, callback_id", id=job_id))
    tries = rows_as_dicts(conn, conn.run(
        "SELECT a.* FROM job_callback_attempts a JOIN job_callbacks c USING (callback_id)"
        " WHERE c.job_id = CAST(:id AS uuid) ORDER BY a.attempt", id=job_id))
    out = []
    for c in callbacks:
        out.append({
            "callback_id": str(c["callback_id"]), "event_type": c["event_type"],
            "url": shown_url(c["url"]), "state": c["state"],
            "attempts": [{k: t[k] for k in ("attempt", "started_at", "duration_ms",
                                            "status_code", "error")}
                         for t in tries if t["callback_id"] == c["callback_id"]],
            "next_attempt_at": c["next_attempt_at"] if c["state"] == "PENDING" else None,
            "created_at": c["created_at"], "delivered_at": c["delivered_at"]})
    return out
