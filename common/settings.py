"""One typed settings object, read once from the environment and passed down."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

DEFAULT_DATA_DIR = Path(os.environ.get("JOBS_DATA_DIR", Path.cwd() / ".data"))


class Settings(BaseModel):
    """Every knob of the system; environment variable names are given in `ENV`."""

    # Service addresses have no default: a process never falls back to whatever listens
    # on a standard port. `make run` starts each one not given and passes its URL.
    database_url: str = ""
    redis_url: str = ""
    kafka_bootstrap_servers: str = ""
    smtp_url: str = ""
    smtp_from: str = "jobs@localhost"
    queue_topic: str = "job-queue"
    dlq_topic: str = "job-dlq"
    # The consumer groups that deliver each topic to its function (the local bridges, the
    # KafkaSources of infra/knative): the lag metric and /readyz look at the first.
    queue_consumer_group: str = "jobs-process"
    dlq_consumer_group: str = "jobs-dlq"
    max_retries: int = Field(3, ge=0, le=100)
    backoff_base_seconds: float = Field(1.0, ge=0)
    backoff_max_seconds: float = Field(300.0, ge=0)
    backoff_jitter: float = Field(0.2, ge=0, le=1)
    handler_timeout_seconds: float = Field(300.0, gt=0)
    lease_seconds: float = Field(30.0, gt=0)
    handler_modules: str = ""
    artifact_dir: Path = DEFAULT_DATA_DIR / "artifacts"
    max_body_bytes: int = 256 * 1024
    # API bearer tokens (common/auth.py): JOBS_AUTH=off lets every request in as admin.
    auth: bool = True
    auth_cache_seconds: float = Field(2.0, ge=0)

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_on_or_off(cls, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("on", "true", "1"):
            return True
        if text in ("off", "false", "0"):
            return False
        raise ValueError(f"JOBS_AUTH must be on or off (or true/false, 1/0), not {value!r}")

    publish_timeout_seconds: float = Field(5.0, gt=0)
    redis_timeout_seconds: float = Field(0.5, gt=0)
    cache_ttl_seconds: int = 7 * 24 * 3600
    requeue_after_seconds: float = Field(30.0, gt=0)
    metrics_token: str = Field("", description="A bearer token that may read /metrics only")
    gateway_memory_bytes: int = Field(32 << 20, ge=0)
    # The gateway's connections (infra/http_guard.py): 414, 431, and 408 after the timeout.
    gateway_max_url_bytes: int = Field(8192, ge=256)
    gateway_max_header_bytes: int = Field(32768, ge=1024)
    gateway_read_timeout_seconds: float = Field(15.0, gt=0)


ENV = {
    "database_url": "DATABASE_URL",
    "redis_url": "REDIS_URL",
    "kafka_bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS",
    "smtp_url": "SMTP_URL",
    "smtp_from": "SMTP_FROM",
    "queue_topic": "JOBS_QUEUE_TOPIC",
    "dlq_topic": "JOBS_DLQ_TOPIC",
    "queue_consumer_group": "JOBS_QUEUE_CONSUMER_GROUP",
    "dlq_consumer_group": "JOBS_DLQ_CONSUMER_GROUP",
    "max_retries": "JOBS_MAX_RETRIES",
    "backoff_base_seconds": "JOBS_BACKOFF_BASE_SECONDS",
    "backoff_max_seconds": "JOBS_BACKOFF_MAX_SECONDS",
    "backoff_jitter": "JOBS_BACKOFF_JITTER",
    "handler_timeout_seconds": "JOBS_HANDLER_TIMEOUT_SECONDS",
    "lease_seconds": "JOBS_LEASE_SECONDS",
    "handler_modules": "JOBS_HANDLER_MODULES",
    "artifact_dir": "JOBS_ARTIFACT_DIR",
    "max_body_bytes": "JOBS_MAX_BODY_BYTES",
    "auth": "JOBS_AUTH",
    "auth_cache_seconds": "JOBS_AUTH_CACHE_SECONDS",
    "publish_timeout_seconds": "JOBS_PUBLISH_TIMEOUT_SECONDS",
    "redis_timeout_seconds": "JOBS_REDIS_TIMEOUT_SECONDS",
    "cache_ttl_seconds": "JOBS_CACHE_TTL_SECONDS",
    "requeue_after_seconds": "JOBS_REQUEUE_AFTER_SECONDS",
    "metrics_token": "JOBS_METRICS_TOKEN",
    "gateway_memory_bytes": "JOBS_GATEWAY_MEMORY_BYTES",
    "gateway_max_url_bytes": "JOBS_GATEWAY_MAX_URL_BYTES",
    "gateway_max_header_bytes": "JOBS_GATEWAY_MAX_HEADER_BYTES",
    "gateway_read_timeout_seconds": "JOBS_GATEWAY_READ_TIMEOUT_SECONDS",
}


class MissingSetting(RuntimeError):
    """A service address the process needs was not given."""


_WHAT = {
    "database_url": "the PostgreSQL URL, postgresql://user:password@host:port/database",
    "redis_url": "the Redis URL, redis://host:port/0 (rediss:// for TLS)",
    "kafka_bootstrap_servers": "the Kafka brokers, host:port[,host:port]",
    "smtp_url": "the SMTP server, smtp://[user:password@]host:port",
}


def require(settings: Settings, *fields: str) -> None:
    """MissingSetting naming every variable among `fields` that is not set."""
    missing = [f for f in fields if not getattr(settings, f)]
    if missing:
        raise MissingSetting("; ".join(f"{ENV[f]} is not set ({_WHAT[f]})" for f in missing)
                             + ". `make run` starts local servers and sets them for you.")


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build settings from `environ` (default: the process environment)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {field: env[name] for field, name in ENV.items() if env.get(name)}
    return Settings.model_validate(values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
