"""Make an admin API token in the database named by DATABASE_URL and print it once.

For a deployment, where no `make run` bootstraps one:
    DATABASE_URL=... python -m infra.admin_token [--name NAME]
(on Knative: `kubectl -n jobs run` the image with this command; see infra/knative/README.md).
"""

from __future__ import annotations

import argparse
import os

from common.auth import Scope, create_token
from common.db import Database, migrate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="admin", help="the token's name (default admin)")
    args = parser.parse_args(argv)
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("set DATABASE_URL to the jobs database")
    db = Database(url)
    try:
        migrate(db)
        made = create_token(db, args.name, [Scope.ADMIN.value])
    finally:
        db.close()
    print(made["token"])


if __name__ == "__main__":
    main()
