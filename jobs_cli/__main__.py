"""Entry point of `jobs` and `python -m jobs_cli`."""

from __future__ import annotations

import sys

from jobs_cli.cli import run


def main(argv: list[str] | None = None) -> int:
    """Run the command line; the return value is the process exit code."""
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
