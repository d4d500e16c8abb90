"""Built-in job types; importing this package registers them."""

from common.builtin import email, export, reports

__all__ = ["email", "export", "reports"]
