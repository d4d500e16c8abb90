"""Local SMTP server that stores every accepted message as an .eml file, so a user can read it.

Run as ``python -m infra.smtp_sink --port 2525 --maildir .data/mail``. Each message becomes
``<maildir>/<UTC timestamp>-<uuid>.eml`` (written under a dot-prefixed temporary name, then
renamed, so readers globbing ``*.eml`` never see half a file), with ``X-Envelope-From`` and
``X-Envelope-To`` headers prepended. Recipients whose address starts with ``reject`` are
refused with 550, so tests can exercise a refused recipient. SIGTERM or SIGINT stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import uuid
from datetime import UTC, datetime
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger("infra.smtp_sink")


class MaildirHandler:
    """aiosmtpd handler: refuse ``reject*`` recipients, store each message atomically."""

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list
    ) -> str:
        if address.lower().startswith("reject"):
            return f"550 5.1.1 <{address}>: recipient rejected by the local SMTP sink"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        # File I/O (with fsync) off the event loop, so other sessions keep being served.
        path = await asyncio.to_thread(self.store, envelope)
        log.info(
            "stored message from %s to %s as %s",
            envelope.mail_from,
            ", ".join(envelope.rcpt_tos),
            path,
        )
        return f"250 OK stored as {path.name}"

    def store(self, envelope: Envelope) -> Path:
        """Write the message under a temporary name, fsync, then rename it into place."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        final = self.maildir / f"{stamp}-{uuid.uuid4().hex}.eml"
        tmp = self.maildir / f".{final.name}.tmp"
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode("utf-8")
        headers = (
            f"X-Envelope-From: {envelope.mail_from}\r\n"
            f"X-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        with tmp.open("wb") as f:
            f.write(headers + content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description="Local SMTP sink writing .eml files.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # aiosmtpd logs several lines per connection at INFO; keep the log to one line per message.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    args.maildir.mkdir(parents=True, exist_ok=True)

    # Block the stop signals before the server thread starts (it inherits the mask), then
    # wait for them synchronously: no handler racing with the thread, no polling.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    controller = Controller(
        MaildirHandler(args.maildir.resolve()),
        hostname=args.host,
        port=args.port,
        server_hostname="smtp-sink.localhost",  # avoids a slow getfqdn() DNS lookup
        enable_SMTPUTF8=True,
    )
    controller.start()
    log.info("SMTP sink listening on %s:%d, storing mail in %s", args.host, args.port, args.maildir)
    received = signal.sigwait(stop_signals)
    log.info("received %s, stopping", signal.Signals(received).name)
    controller.stop()


if __name__ == "__main__":
    main()
