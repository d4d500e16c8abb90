"""EMAIL_SENDING talks real SMTP: to an in-process aiosmtpd server that stores what it gets."""

from __future__ import annotations

import email
import email.policy
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from pydantic import ValidationError

import common.builtin  # noqa: F401 - registers the built-in job types
from common.builtin.email import EmailPayload, build_message, parse_address, send_email
from common.errors import PermanentError, RetryableError
from common.handlers import JobContext, registered
from common.settings import Settings, get_settings, load_settings


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


@dataclass
class RecordingHandler:
    """Stores each message; refuses `reject*` recipients (550) and defers `busy*` ones (450)."""

    received: list[Received] = field(default_factory=list)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address.startswith("reject"):
            return "550 5.1.1 No such mailbox here"
        if address.startswith("busy"):
            return "450 4.2.1 Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def smtp_server() -> Iterator[tuple[RecordingHandler, str]]:
    handler = RecordingHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, f"smtp://127.0.0.1:{port}"
    finally:
        controller.stop()


def settings_for(smtp_url: str) -> Settings:
    return load_settings({"SMTP_URL": smtp_url, "SMTP_FROM": "Reports <reports@example.com>"})


def payload(**overrides: Any) -> EmailPayload:
    values: dict[str, Any] = {
        "to": ["Ann Lee <ann@example.com>"],
        "subject": "Your report is ready ✓",
        "text": "Hello Ann,\nthe report is ready.",
        "html": "<p>Hello Ann,</p><p>the report is <b>ready</b>.</p>",
    }
    return EmailPayload.model_validate({**values, **overrides})


def test_a_text_and_html_mail_arrives_as_multipart_alternative(smtp_server) -> None:
    handler, url = smtp_server
    job_id = uuid.uuid4()

    result = send_email(
        payload(cc=["ops@example.com"], reply_to="help@example.com"), job_id, settings_for(url)
    )

    assert result == {
        "message_id": f"<job-{job_id}@example.com>",
        "accepted": ["ann@example.com", "ops@example.com"],
        "refused": {},
    }
    [got] = handler.received
    assert got.mail_from == "reports@example.com"
    assert got.rcpt_tos == ["ann@example.com", "ops@example.com"]
    msg = got.message
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["Message-ID"] == f"<job-{job_id}@example.com>"
    assert msg["Subject"] == "Your report is ready ✓"
    assert msg["To"] == "Ann Lee <ann@example.com>"
    assert msg["Cc"] == "ops@example.com"
    assert msg["Reply-To"] == "help@example.com"
    assert msg["X-Job-Id"] == str(job_id)
    text = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    assert text is not None
    # SMTP carries CRLF line ends; the content is otherwise what was submitted.
    assert text.get_content().replace("\r\n", "\n") == "Hello Ann,\nthe report is ready.\n"
    assert html is not None and "<b>ready</b>" in html.get_content()


def test_a_retried_send_carries_the_same_message_id(smtp_server) -> None:
    handler, url = smtp_server
    job_id = uuid.uuid4()

    send_email(payload(), job_id, settings_for(url))
    send_email(payload(), job_id, settings_for(url))

    assert len({r.message["Message-ID"] for r in handler.received}) == 1


def test_credentials_in_the_smtp_url_are_used_to_log_in() -> None:
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
        logins.append((auth_data.login, auth_data.password))
        # handled=False makes aiosmtpd answer a failure with 535 itself.
        return AuthResult(success=auth_data.password == b"p@ss:word", handled=False)

    handler = RecordingHandler()
    port = free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        authenticator=authenticator,
        auth_require_tls=False,
    )
    controller.start()
    try:
        url = f"smtp://mailer:p%40ss%3Aword@127.0.0.1:{port}"
        send_email(payload(), uuid.uuid4(), settings_for(url))
        with pytest.raises(PermanentError, match="535"):
            send_email(
                payload(), uuid.uuid4(), settings_for(f"smtp://mailer:wrong@127.0.0.1:{port}")
            )
    finally:
        controller.stop()

    assert logins[0] == (b"mailer", b"p@ss:word")
    assert len(handler.received) == 1


def test_a_text_only_mail_is_a_single_plain_part(smtp_server) -> None:
    handler, url = smtp_server

    send_email(payload(html=None), uuid.uuid4(), settings_for(url))

    assert handler.received[0].message.get_content_type() == "text/plain"


def test_the_registered_handler_sends_through_smtp_url(
    smtp_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    handler, url = smtp_server
    monkeypatch.setenv("SMTP_URL", url)
    monkeypatch.setenv("SMTP_FROM", "jobs@example.org")
    get_settings.cache_clear()
    try:
        job_type = registered()["EMAIL_SENDING"]
        ctx = JobContext(uuid.uuid4(), "EMAIL_SENDING", 1, 0, tmp_path)
        result = job_type.run(
            job_type.parse_payload({"to": ["x@example.com"], "subject": "s", "html": "<p>hi</p>"}),
            ctx,
        )
    finally:
        get_settings.cache_clear()

    assert result["accepted"] == ["x@example.com"]
    assert handler.received[0].message["Message-ID"] == f"<job-{ctx.job_id}@example.org>"
    assert handler.received[0].message.get_content_type() == "text/html"


def test_some_refused_recipients_are_reported_while_the_rest_get_the_mail(smtp_server) -> None:
    handler, url = smtp_server

    result = send_email(
        payload(to=["ann@example.com", "reject@example.com"]), uuid.uuid4(), settings_for(url)
    )

    assert result["accepted"] == ["ann@example.com"]
    assert result["refused"] == {"reject@example.com": "550 5.1.1 No such mailbox here"}
    assert handler.received[0].rcpt_tos == ["ann@example.com"]


def test_a_mail_whose_every_recipient_is_refused_fails_permanently(smtp_server) -> None:
    handler, url = smtp_server

    with pytest.raises(PermanentError, match="550 5.1.1 No such mailbox here"):
        send_email(payload(to=["reject@example.com"]), uuid.uuid4(), settings_for(url))
    assert handler.received == []


def test_a_temporarily_refused_recipient_is_retried(smtp_server) -> None:
    _, url = smtp_server

    with pytest.raises(RetryableError, match="450"):
        send_email(payload(to=["busy@example.com"]), uuid.uuid4(), settings_for(url))


def test_a_server_that_is_not_listening_is_a_retryable_error() -> None:
    url = f"smtp://127.0.0.1:{free_port()}"

    with pytest.raises(RetryableError, match="could not reach the SMTP server"):
        send_email(payload(), uuid.uuid4(), settings_for(url))


def test_an_smtp_url_of_another_scheme_is_a_permanent_error() -> None:
    with pytest.raises(PermanentError, match="smtp:// or smtps://"):
        send_email(payload(), uuid.uuid4(), settings_for("http://127.0.0.1:25"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"to": []},
        {"to": ["not-an-address"]},
        {"to": ["ann@example.com\r\nBcc: spy@example.com"]},
        {"to": [f"u{i}@example.com" for i in range(51)]},
        {
            "to": [f"u{i}@example.com" for i in range(30)],
            "cc": [f"c{i}@example.com" for i in range(21)],
        },
        {"subject": "hi\r\nBcc: spy@example.com"},
        {"subject": ""},
        {"text": None, "html": None},
        {"reply_to": "nobody"},
        {"bcc": ["x@example.com"]},
    ],
)
def test_a_malformed_email_payload_is_rejected(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        payload(**overrides)


def test_display_names_with_commas_are_kept_quoted() -> None:
    assert payload(to=['"Lee, Ann" <ann@example.com>']).to == ['"Lee, Ann" <ann@example.com>']


def _refusal(overrides: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The locations of the errors a payload with `overrides` is refused with."""
    with pytest.raises(ValidationError) as refused:
        payload(**overrides)
    return [error["loc"] for error in refused.value.errors()]


@pytest.mark.parametrize(
    "recipient",
    [
        "billing@partner.example <ap@partner.example>",  # an address as the display name
        '"billing@partner.example" <ap@partner.example>',  # the same, quoted
        "=?utf-8?q?billing=40partner.example?= <ap@partner.example>",  # the same, encoded
        "ap@partner.example (billing@partner.example)",  # another address in a comment
        "alice@example.org)<bob@example.org>",
        "Ann <ann@example.com>, Bob <bob@example.com>",  # two recipients in one item
        "ann@example.com, bob@example.com",
        "Ann, Bob <bob@example.com>",
        "Ann <ann@example.com> Bob",
        "Ann <ann@example.com>;",
        "team: ann@example.com;",  # a group
        "undisclosed-recipients:;",
    ],
)
def test_a_recipient_item_that_is_not_exactly_one_address_is_refused(recipient: str) -> None:
    assert _refusal({"to": ["ok@example.com", recipient]}) == [("to", 1)]
    assert _refusal({"cc": [recipient]}) == [("cc", 0)]
    assert _refusal({"reply_to": recipient}) == [("reply_to",)]


# Every character str.splitlines() breaks a line at: the email library refuses each in a
# header when the message is sent, so a payload holding one could never be delivered.
LINE_BREAKS = [chr(c) for c in range(0x110000) if len(f"x{chr(c)}y".splitlines()) > 1]


def test_the_line_breaks_refused_include_every_one_str_splitlines_knows() -> None:
    assert {"\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"} == set(
        LINE_BREAKS
    )


@pytest.mark.parametrize("char", [*LINE_BREAKS, "\t", "\x00", "\x1b", "\x7f", "\x9f"])
def test_a_header_value_with_a_line_break_or_control_character_is_refused(char: str) -> None:
    assert _refusal({"subject": f"Your report{char}is ready"}) == [("subject",)]
    assert _refusal({"to": [f"Ann{char}Lee <ann@example.com>"]}) == [("to", 0)]
    assert _refusal({"cc": [f"ops@example.com{char}"]}) == [("cc", 0)]
    assert _refusal({"reply_to": f"Help{char}desk <help@example.com>"}) == [("reply_to",)]


def test_an_encoded_display_name_that_decodes_to_a_line_break_is_refused() -> None:
    assert _refusal({"to": ["=?utf-8?q?Ann=0ALee?= <ann@example.com>"]}) == [("to", 0)]


@pytest.mark.parametrize(
    ("recipient", "canonical", "delivered_to"),
    [
        ("ann@example.com", "ann@example.com", "ann@example.com"),
        ("<ann@example.com>", "ann@example.com", "ann@example.com"),
        ("Ann Lee <ann@example.com>", "Ann Lee <ann@example.com>", "ann@example.com"),
        ("Dr. Ann Lee <ann@example.com>", '"Dr. Ann Lee" <ann@example.com>', "ann@example.com"),
        ('"Lee, Ann" <ann@example.com>', '"Lee, Ann" <ann@example.com>', "ann@example.com"),
        ("Zoë <zoe@example.com>", "Zoë <zoe@example.com>", "zoe@example.com"),
    ],
)
def test_the_mail_goes_to_the_address_the_recipient_item_shows(
    smtp_server, recipient: str, canonical: str, delivered_to: str
) -> None:
    handler, url = smtp_server
    accepted = payload(to=[recipient])

    result = send_email(accepted, uuid.uuid4(), settings_for(url))

    assert accepted.to == [canonical]
    assert result["accepted"] == [delivered_to]
    assert handler.received[0].rcpt_tos == [delivered_to]
    assert handler.received[0].message["To"].addresses[0].addr_spec == delivered_to


def test_every_subject_the_model_accepts_can_be_sent() -> None:
    accepted, refused = [], set()
    # C0, C1 and Latin, then General Punctuation (U+2028, U+2029, bidi controls...)
    for code in [*range(0x300), *range(0x2000, 0x2070)]:
        try:
            payload(subject=f"x{chr(code)}y")
        except ValidationError:
            refused.add(chr(code))
        else:
            accepted.append(chr(code))
    assert set(LINE_BREAKS) <= refused
    for start in range(0, len(accepted), 900):  # a subject holds at most 998 characters
        subject = "x" + "".join(accepted[start : start + 900]) + "y"
        build_message(payload(subject=subject), uuid.uuid4(), "reports@example.com").as_bytes()


@pytest.mark.parametrize(
    "bare",
    ["ann@example.com", "o'brien+tag@mail.example.co.uk", "x@localhost", "a.b-c_d@example.com"],
)
def test_a_bare_address_reads_the_same_as_the_rfc_5322_parser_reads_it(bare: str) -> None:
    [parsed] = HeaderRegistry()("To", bare).addresses

    assert parse_address(bare) == parsed
    assert payload(to=[bare]).to == [bare]
