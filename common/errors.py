"""Error hierarchy: what a handler may raise, and what the API answers with."""

from __future__ import annotations

from typing import Any


class JobError(Exception):
    """Base class of errors raised by job handlers."""


class RetryableError(JobError):
    """A failure worth another attempt, optionally after at least `delay` seconds."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentError(JobError):
    """A failure no retry can fix: the job is dead-lettered at once."""


class HandlerTimeout(JobError):
    """The handler ran past its time limit; counts as a failed attempt."""


class ServiceUnavailable(Exception):
    """A dependency (PostgreSQL, Kafka) is down; the caller should try again later."""

    def __init__(self, service: str, detail: str, retry_after: int = 5) -> None:
        super().__init__(f"{service} unavailable: {detail}")
        self.service = service
        self.detail = detail
        self.retry_after = retry_after


class ApiError(Exception):
    """An HTTP error answered as application/problem+json (RFC 9457)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        """The RFC 9457 problem document."""
        body: dict[str, Any] = {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = self.errors
        return body
