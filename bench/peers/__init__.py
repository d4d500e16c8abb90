"""The peers: how to start their workers (standard library only: bench/run.py imports this
from our virtualenv). Their task definitions and clients are in <peer>_peer.py, imported
only by the peers' virtualenv (bench/.venv-peers), with bench/ on PYTHONPATH.

Same resources for every system: 2 worker processes (Dramatiq with its default 8 threads
each, as the issue's reference figures were measured; our process function also runs
threads in each of its 2 worker processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# pip requirement specifiers installed into bench/.venv-peers
REQUIREMENTS = [
    "celery[redis]>=5.3,<6",
    "rq>=2.0,<4",
    "dramatiq[redis]>=1.17,<3",
    "redis>=5,<9",
    "psutil>=5.9,<8",
]
DISTRIBUTIONS = ["celery", "kombu", "billiard", "rq", "dramatiq", "redis"]


@dataclass(frozen=True)
class Peer:
    name: str
    module: str  # imported by bench/driver.py in the peers' venv
    workers: str  # described in the output

    def worker_commands(self, bindir: Path, redis_url: str) -> list[list[str]]:
        """One argv per process we start (a peer with its own supervisor gets one)."""
        if self.name == "celery":
            return [[str(bindir / "celery"), "-A", "peers.celery_peer", "worker",
                     "--pool", "prefork", "--concurrency", "2", "--loglevel", "WARNING",
                     "--without-gossip", "--without-mingle", "--without-heartbeat",
                     "--hostname", "bench@%h"]]
        if self.name == "rq":
            return [[str(bindir / "rq"), "worker", "--worker-class", "rq.worker.SimpleWorker",
                     "--url", redis_url, "--logging_level", "WARNING",
                     "--name", f"bench-{i}", "bench"] for i in (1, 2)]
        if self.name == "dramatiq":
            return [[str(bindir / "dramatiq"), "peers.dramatiq_peer", "--processes", "2",
                     "--threads", "8"]]
        raise ValueError(self.name)


PEERS = {
    "dramatiq": Peer("dramatiq", "peers.dramatiq_peer",
                     "dramatiq --processes 2 --threads 8, its default"
                     " (Redis broker, Redis results)"),
    "celery": Peer("celery", "peers.celery_peer",
                   "celery worker --pool prefork --concurrency 2 (Redis broker and results)"),
    "rq": Peer("rq", "peers.rq_peer", "2 x rq worker --worker-class SimpleWorker"),
}
