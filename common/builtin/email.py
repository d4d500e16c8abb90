"""EMAIL_SENDING: one message, text and/or HTML, sent through the SMTP server in `SMTP_URL`."""

from __future__ import annotations

import functools
import re
import smtplib
import ssl
import unicodedata
from datetime import UTC, datetime
from email.errors import ObsoleteHeaderDefect
from email.headerregistry import Address, AddressHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Annotated, Any, cast
from urllib.parse import parse_qs, unquote, urlparse
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from common.errors import PermanentError, RetryableError
from common.handlers import JobContext, job_handler
from common.settings import Settings, get_settings

MAX_RECIPIENTS = 50
SMTP_TIMEOUT_SECONDS = 10.0

# Deliberately plain: an ASCII local part without quoting, and a dotted host name
# (single-label names such as `localhost` allowed for local use).
_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}"
    r"@(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
# A bare dot-atom address that `_ADDRESS` accepts: it parses to itself, so it skips the
# (slow, some 200 µs) RFC 5322 parser; anything else goes through the parser.
_BARE_ADDRESS = re.compile(
    r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)@(.+)"
)
# Cc holds \r, \n, \v, \f, \x1c-\x1e and \x85, Zl and Zp are U+2028 and U+2029: every
# character str.splitlines() breaks at, which the email library refuses in a header
# at send time, plus the other control characters (NUL, ESC, DEL, tab...).
_CONTROL_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})
_TO_HEADER = HeaderRegistry()["to"]  # the class, made once: making it costs a lot


def _check_header_text(value: str) -> str:
    """Refuse a header value holding a line break or another control character."""
    for char in value:
        if unicodedata.category(char) in _CONTROL_CATEGORIES:
            raise ValueError(
                f"a header cannot contain a line break or control character ({char!r})"
            )
    return value


@functools.lru_cache(maxsize=4096)
def parse_address(value: str) -> Address:
    """Exactly one address, `user@host` or `Name <user@host>`, parsed strictly.

    RFC 5322 parsing (email.headerregistry) with no defect allowed beyond obsolete
    but harmless syntax (`Dr. Ann <ann@example.com>`), one mailbox and no group, and
    a single `@` in the whole item, so no display name or comment can show an address
    other than the one the mail goes to. Raises ValueError saying what is wrong.
    """
    _check_header_text(value)
    bare = _BARE_ADDRESS.fullmatch(value)
    if bare and _ADDRESS.fullmatch(value):
        return Address(username=bare[1], domain=bare[2])
    try:
        parsed = _TO_HEADER("To", value)
    except Exception:  # the parser raises on some malformed input: that is a bad value too
        raise ValueError(f"not a valid e-mail address: {value[:100]!r}") from None
    invalid = [d for d in parsed.defects if not isinstance(d, ObsoleteHeaderDefect)]
    header = cast(AddressHeader, parsed)  # the "to" class is a BaseHeader and an AddressHeader
    addresses = header.addresses
    if len(addresses) > 1 or value.count("@") > 1:
        raise ValueError(
            "one address per item (with an optional display name): a display name or"
            f" comment cannot hold another address or an '@', got {value[:100]!r}"
        )
    if invalid or len(addresses) != 1 or any(group.display_name for group in header.groups):
        raise ValueError(f"not a valid e-mail address: {value[:100]!r}")
    address = addresses[0]
    addr = address.addr_spec
    if not _ADDRESS.fullmatch(addr) or addr.startswith(".") or ".." in addr:
        raise ValueError(f"not a valid e-mail address: {value[:100]!r}")
    # An encoded word (=?utf-8?q?...?=) decodes only now: check what it became.
    _check_header_text(address.display_name)
    if "@" in address.display_name:
        raise ValueError(f"a display name cannot contain '@', got {value[:100]!r}")
    return address


def _check_address(value: str) -> str:
    """The canonical form of one address (display name quoted where it needs to be)."""
    address = parse_address(value)
    canonical = str(address)
    # What is stored is what is delivered to: the canonical form must parse back the same.
    if canonical != value:
        again = parse_address(canonical)
        if (again.display_name, again.addr_spec) != (address.display_name, address.addr_spec):
            raise ValueError(f"not a valid e-mail address: {value[:100]!r}")
    return canonical


EmailAddress = Annotated[str, Field(max_length=320), AfterValidator(_check_address)]


class EmailPayload(BaseModel):
    """Payload of EMAIL_SENDING: recipients, subject and a text and/or HTML body."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "to": ["Ann Lee <ann@example.com>"],
                    "cc": ["ops@example.com"],
                    "subject": "Your report is ready",
                    "text": "Hello Ann,\n\nthe report is attached to job 42.",
                    "html": "<p>Hello Ann,</p><p>the report is attached to job 42.</p>",
                    "reply_to": "support@example.com",
                }
            ]
        },
    )

    to: list[EmailAddress] = Field(
        min_length=1,
        max_length=MAX_RECIPIENTS,
        description="Recipients, `user@host` or `Name <user@host>`",
        examples=[["ann@example.com", "Bob <bob@example.com>"]],
    )
    cc: list[EmailAddress] = Field(
        default_factory=list,
        max_length=MAX_RECIPIENTS,
        description=f"Carbon-copy recipients (to and cc together: at most {MAX_RECIPIENTS})",
        examples=[["ops@example.com"]],
    )
    subject: Annotated[str, AfterValidator(_check_header_text)] = Field(
        min_length=1, max_length=998, description="Subject line", examples=["Your report is ready"]
    )
    text: str | None = Field(
        default=None,
        max_length=1_000_000,
        description="Plain-text body (text, html or both)",
        examples=["Hello Ann,\n\nthe report is ready."],
    )
    html: str | None = Field(
        default=None,
        max_length=1_000_000,
        description="HTML body; sent as multipart/alternative when `text` is given too",
        examples=["<p>Hello Ann,</p><p>the report is ready.</p>"],
    )
    reply_to: EmailAddress | None = Field(
        default=None, description="Where replies go", examples=["support@example.com"]
    )

    @model_validator(mode="after")
    def _body_and_recipient_count(self) -> EmailPayload:
        if self.text is None and self.html is None:
            raise ValueError("give a text body, an html body, or both")
        if len(self.to) + len(self.cc) > MAX_RECIPIENTS:
            raise ValueError(f"at most {MAX_RECIPIENTS} recipients in to and cc together")
        return self


@job_handler("EMAIL_SENDING", payload_model=EmailPayload)
def send_email_job(payload: EmailPayload, ctx: JobContext) -> dict[str, Any]:
    """Send one e-mail through the SMTP server in SMTP_URL.

    The Message-ID is derived from the job id, so a retried send is recognisable.
    Rejected recipients and other 5xx answers are permanent; connection trouble
    and 4xx answers are retried.
    """
    return send_email(payload, ctx.job_id, get_settings())


def message_id(job_id: UUID | str, sender: str) -> str:
    """The Message-ID of a job's mail: the same for every attempt of the job."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    return f"<job-{job_id}@{domain}>"


def build_message(payload: EmailPayload, job_id: UUID | str, sender: str) -> EmailMessage:
    """The message as it goes on the wire (multipart/alternative when both bodies are set)."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = [parse_address(a) for a in payload.to]
    if payload.cc:
        msg["Cc"] = [parse_address(a) for a in payload.cc]
    if payload.reply_to:
        msg["Reply-To"] = parse_address(payload.reply_to)
    msg["Subject"] = payload.subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = message_id(job_id, sender)
    msg["X-Job-Id"] = str(job_id)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to a robot
    if payload.text is not None:
        msg.set_content(payload.text)
        if payload.html is not None:
            msg.add_alternative(payload.html, subtype="html")
    else:
        msg.set_content(payload.html or "", subtype="html")
    return msg


def send_email(payload: EmailPayload, job_id: UUID | str, settings: Settings) -> dict[str, Any]:
    """Send the payload as one message; map SMTP failures to retryable or permanent."""
    msg = build_message(payload, job_id, settings.smtp_from)
    # Each address once, in order: a duplicate would be a second delivery. Parsed as the
    # validator parsed it, so the mail goes to the address the item shows.
    addrs = (parse_address(item).addr_spec for item in [*payload.to, *payload.cc])
    recipients = list(dict.fromkeys(addrs))
    try:
        with _connect(settings.smtp_url) as smtp:
            refused = smtp.send_message(msg, to_addrs=recipients)
    except smtplib.SMTPRecipientsRefused as exc:  # every recipient was refused
        raise _refusal_error(exc.recipients) from exc
    except smtplib.SMTPResponseException as exc:
        raise _reply_error(exc.smtp_code, exc.smtp_error, "SMTP server") from exc
    except smtplib.SMTPNotSupportedError as exc:
        raise PermanentError(f"SMTP server does not support what SMTP_URL asks: {exc}") from exc
    except (smtplib.SMTPException, OSError) as exc:  # disconnects, refused connections, timeouts
        raise RetryableError(f"could not reach the SMTP server: {exc}") from exc
    return {
        "message_id": msg["Message-ID"],
        "accepted": [addr for addr in recipients if addr not in refused],
        "refused": {addr: _reply_text(code, text) for addr, (code, text) in refused.items()},
    }


def _connect(smtp_url: str) -> smtplib.SMTP:
    """An SMTP session for `smtp[s]://[user:password@]host[:port][?starttls=1]`, logged in."""
    url = urlparse(smtp_url)
    if url.scheme not in ("smtp", "smtps"):
        raise PermanentError(f"SMTP_URL must be smtp:// or smtps://, got scheme {url.scheme!r}")
    host = url.hostname or "127.0.0.1"
    smtp: smtplib.SMTP
    if url.scheme == "smtps":
        smtp = smtplib.SMTP_SSL(
            host,
            url.port or 465,
            timeout=SMTP_TIMEOUT_SECONDS,
            context=ssl.create_default_context(),
        )
    else:
        smtp = smtplib.SMTP(host, url.port or 25, timeout=SMTP_TIMEOUT_SECONDS)
    try:
        if parse_qs(url.query).get("starttls", ["0"])[0].lower() in ("1", "true", "yes"):
            smtp.starttls(context=ssl.create_default_context())
        if url.username:
            smtp.login(unquote(url.username), unquote(url.password or ""))
    except BaseException:
        smtp.close()
        raise
    return smtp


def _refusal_error(recipients: dict[str, tuple[int, bytes]]) -> Exception:
    """Permanent when every refusal is 5xx; a single 4xx (mailbox busy...) is worth a retry."""
    detail = "; ".join(
        f"{addr}: {_reply_text(code, text)}" for addr, (code, text) in recipients.items()
    )
    if all(code >= 500 for code, _ in recipients.values()):
        return PermanentError(f"all recipients refused: {detail}")
    return RetryableError(f"recipients refused (temporarily): {detail}")


def _reply_error(code: int, text: bytes | str, who: str) -> Exception:
    reply = _reply_text(code, text)
    if 500 <= code < 600:
        return PermanentError(f"{who} rejected the message: {reply}")
    return RetryableError(f"{who} answered: {reply}")


def _reply_text(code: int, text: bytes | str) -> str:
    message = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return f"{code} {message}".strip()
