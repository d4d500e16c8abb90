"""One typed settings object, read once from the environment and passed down."""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_DATA_DIR = Path(os.environ.get("JOBS_DATA_DIR", Path.cwd() / ".data"))


def normal_host(host: str) -> str:
    """A host as compared with JOBS_CALLBACK_ALLOWED_HOSTS: an IP address in its one
    canonical text (`0:0::1` and `::1` are the same host), a name in lower case."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.lower()


def bracketed(host: str) -> str:
    """A host as it is written before a port or in a Host header: an IPv6 address in
    brackets (RFC 3986), anything else as it is."""
    return f"[{host}]" if ":" in host else host


_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def _allowed_host(entry: str) -> str:
    """One JOBS_CALLBACK_ALLOWED_HOSTS entry, normalised: `host`, `host:port`, an IPv6
    address bare or in brackets, `[addr]:port` with a port. Anything else (a URL, a
    wildcard, a zone id, a port out of range) is an error rather than an entry that
    silently never matches."""
    entry = entry.strip()
    host, port, in_brackets = entry, "", entry.startswith("[")
    why = ""
    if "/" in entry or "@" in entry:
        why = "a host, not a URL"
    elif in_brackets:
        host, closed, rest = entry[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            why = "an IPv6 address in brackets is written [addr] or [addr]:port"
        port = rest[1:]
    elif entry.count(":") == 1:
        host, port = entry.split(":")
    host = host.lower()
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    why = why or _entry_problem(host, port, in_brackets, ip)
    if why:
        raise ValueError(f"JOBS_CALLBACK_ALLOWED_HOSTS entry {entry!r}: {why}")
    host = ip.compressed if ip is not None else host
    return f"{bracketed(host)}:{int(port)}" if port else host


def _entry_problem(host: str, port: str, in_brackets: bool,
                   ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> str:
    """What is wrong with an allow-list entry's parsed host and port, or ""."""
    if "%" in host:
        return "a zone id (%eth0) never matches a URL's host"
    if ip is not None and ip.is_link_local:
        return "a link-local address is never called back"
    if ip is None and (in_brackets or ":" in host):
        return "not an IPv6 address"
    if ip is None and _HOST_NAME.fullmatch(host) is None:
        return "not a host name (letters, digits, '-', '_' and dots; no wildcards)"
    if ip is not None and ip.version == 4 and in_brackets:
        return "only IPv6 addresses go in brackets"
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return "a port is a number from 1 to 65535"
    return ""


def describe_error(exc: ValidationError) -> str:
    """Settings errors one per line, each naming its environment variable (never echoing
    a value: pydantic's messages do not, and ours name only what is safe to show)."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        name = ENV.get(field, field)
        lines.append(message if name and name in message else f"{name}: {message}")
    return "\n".join(lines)


class Settings(BaseModel):
    """Every knob of the system; environment variable names are given in `ENV`."""

    # An error names the variable; it never echoes values (passwords live in some).
    model_config = ConfigDict(hide_input_in_errors=True)

    # Service addresses have no default: a process never falls back to whatever listens
    # on a standard port. `make run` starts each one not given and passes its URL.
    database_url: str = ""
    # Connections each process may hold open (threads beyond it wait, then get a 503).
    db_pool_size: int = Field(32, ge=1, le=1000)
    db_pool_wait_seconds: float = Field(10.0, gt=0)
    redis_url: str = ""
    kafka_bootstrap_servers: str = ""
    # How every Kafka client of the system connects (see `kafka_client_config`).
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = Field("", repr=False)
    kafka_ssl_ca_location: str = ""
    # Any other librdkafka property, from KAFKA_CONFIG_<PROPERTY> variables
    # (KAFKA_CONFIG_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM=https -> ssl.endpoint...).
    kafka_config: dict[str, str] = Field(default_factory=dict, repr=False)
    smtp_url: str = ""
    smtp_from: str = "jobs@localhost"
    queue_topic: str = "job-queue"
    dlq_topic: str = "job-dlq"
    # The consumer groups that deliver each topic to its function (the local bridges, the
    # KafkaSources of infra/knative): the lag metric and /readyz look at the first, and at
    # `<queue group>-<topic>` for each job type's own topic (common.queue.consumer_group).
    # Partitions of each topic when `make run` creates it: the most consumers (bridges,
    # KafkaSource `consumers`) that can share its records.
    queue_partitions: int = Field(4, ge=1, le=1000)
    dlq_partitions: int = Field(2, ge=1, le=1000)
    # The local job-queue bridge's fetch.wait.max.ms: Tansu answers a fetch only when it
    # runs out, so it is both the idle polling period and a job's wait in the queue.
    bridge_fetch_wait_ms: int = Field(10, ge=1, le=5000)
    queue_consumer_group: str = "jobs-process"
    dlq_consumer_group: str = "jobs-dlq"
    max_retries: int = Field(3, ge=0, le=100)
    backoff_base_seconds: float = Field(1.0, ge=0)
    backoff_max_seconds: float = Field(300.0, ge=0)
    backoff_jitter: float = Field(0.2, ge=0, le=1)
    handler_timeout_seconds: float = Field(300.0, gt=0)
    lease_seconds: float = Field(30.0, gt=0)
    # `process`'s timing. A running attempt learns of a cancel request within
    # cancel_check_seconds (leases are renewed every third of lease_seconds on the same
    # beat). A job done within claim_cache_delay_seconds of its claim is cached once, as
    # done, never as IN_PROGRESS. An outcome whose write fails (PostgreSQL down) is tried
    # again with backoff from outcome_retry_base_seconds up to outcome_retry_max_seconds
    # for outcome_patience_seconds: the handler's work is not thrown away for an outage.
    cancel_check_seconds: float = Field(1.0, gt=0)
    claim_cache_delay_seconds: float = Field(0.02, ge=0)
    outcome_retry_base_seconds: float = Field(0.1, gt=0)
    outcome_retry_max_seconds: float = Field(5.0, gt=0)
    outcome_patience_seconds: float = Field(300.0, ge=0)
    handler_modules: str = ""
    artifact_dir: Path = DEFAULT_DATA_DIR / "artifacts"
    # Where artifacts live when not in artifact_dir: file:///path, gs://bucket/prefix,
    # s3://bucket/prefix (see common.artifacts); checked at start, never ignored.
    artifact_url: str = ""
    max_body_bytes: int = 256 * 1024
    # A handler's result is stored with its job, cached, listed and handed to dependents:
    # one larger (as JSON) fails the attempt permanently. Files belong in artifacts.
    max_result_bytes: int = Field(1 << 20, ge=1024)
    # API bearer tokens (common/auth.py): JOBS_AUTH=off lets every request in as admin.
    auth: bool = True
    auth_cache_seconds: float = Field(2.0, ge=0)

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _kafka_choice(cls, value: Any, info: Any) -> str:
        text = str(value).strip().upper()
        allowed = KAFKA_CHOICES[info.field_name]
        if text not in allowed:
            raise ValueError(f"{ENV[info.field_name]} must be one of "
                             f"{', '.join(a for a in allowed if a)}, not {value!r}")
        return text

    @model_validator(mode="after")
    def _kafka_consistent(self) -> Settings:
        """Kafka security settings that cannot take effect are errors, never ignored."""
        sasl = self.kafka_security_protocol.startswith("SASL_")
        tls = self.kafka_security_protocol in ("SSL", "SASL_SSL")
        if sasl and not self.kafka_sasl_mechanism:
            raise ValueError(f"KAFKA_SECURITY_PROTOCOL is {self.kafka_security_protocol}:"
                             " set KAFKA_SASL_MECHANISM too")
        if sasl and self.kafka_sasl_mechanism != "OAUTHBEARER" and not (
                self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(f"KAFKA_SASL_MECHANISM {self.kafka_sasl_mechanism} needs"
                             " KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD")
        unused = [ENV[f] for f in ("kafka_sasl_mechanism", "kafka_sasl_username",
                                   "kafka_sasl_password") if getattr(self, f) and not sasl]
        if self.kafka_ssl_ca_location and not tls:
            unused.append("KAFKA_SSL_CA_LOCATION")
        if unused:
            raise ValueError(f"{', '.join(unused)} set, but KAFKA_SECURITY_PROTOCOL is"
                             f" {self.kafka_security_protocol}, which would never use it")
        if self.kafka_ssl_ca_location and not Path(self.kafka_ssl_ca_location).is_file():
            raise ValueError(f"KAFKA_SSL_CA_LOCATION {self.kafka_ssl_ca_location} is not a file")
        return self

    @field_validator("artifact_url")
    @classmethod
    def _artifact_store_usable(cls, value: str) -> str:
        if value:
            from common.artifacts import check_store

            check_store(value)
        return value

    @property
    def artifact_store(self) -> str | Path:
        """Where artifacts are written and read: JOBS_ARTIFACT_URL, else JOBS_ARTIFACT_DIR."""
        return self.artifact_url or self.artifact_dir

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
    # Retention (the sweeper deletes in batches): COMPLETED and CANCELLED jobs, with their
    # attempts and artifacts, this many days after they finished; DEAD_LETTER jobs and
    # dead-letter records after the second. 0 keeps them forever.
    retain_finished_days: float = Field(7.0, ge=0)
    retain_dead_days: float = Field(30.0, ge=0)
    requeue_after_seconds: float = Field(30.0, gt=0)
    metrics_token: str = Field("", description="A bearer token that may read /metrics only")
    gateway_memory_bytes: int = Field(32 << 20, ge=0)
    # The gateway's connections (infra/http_guard.py): 414, 431, and 408 after the timeout.
    gateway_max_url_bytes: int = Field(8192, ge=256)
    gateway_max_header_bytes: int = Field(32768, ge=1024)
    gateway_read_timeout_seconds: float = Field(15.0, gt=0)
    # GET /jobs/{id}/events (infra/events.py): open streams per gateway process (more: 503),
    # how often each re-reads its job in case an announcement was lost, and how long an
    # idle stream waits before a heartbeat comment.
    events_max_streams: int = Field(1000, ge=0)
    events_poll_seconds: float = Field(2.0, gt=0)
    events_heartbeat_seconds: float = Field(15.0, gt=0)
    # Completion callbacks (common/callbacks.py): signed with the secret, only to these
    # hosts ("host" or "host:port", comma-separated); none by default.
    callback_secret: str = Field("", repr=False)
    callback_allowed_hosts: tuple[str, ...] = ()
    callback_timeout_seconds: float = Field(5.0, gt=0, le=60)
    callback_max_attempts: int = Field(8, ge=1, le=50)
    callback_backoff_base_seconds: float = Field(2.0, ge=0)

    @field_validator("callback_secret")
    @classmethod
    def _strong_secret(cls, value: str) -> str:
        if value and ("REPLACE_ME" in value or len(value) < 16):
            raise ValueError("JOBS_CALLBACK_SECRET must be a secret of 16 characters or more"
                             " (not the template's placeholder), or empty to refuse callbacks")
        return value

    @field_validator("callback_allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [h for h in value.split(",") if h.strip()]
        return tuple(_allowed_host(str(h)) for h in value)


ENV = {
    "database_url": "DATABASE_URL",
    "db_pool_size": "JOBS_DB_POOL_SIZE",
    "db_pool_wait_seconds": "JOBS_DB_POOL_WAIT_SECONDS",
    "redis_url": "REDIS_URL",
    "kafka_bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS",
    "kafka_security_protocol": "KAFKA_SECURITY_PROTOCOL",
    "kafka_sasl_mechanism": "KAFKA_SASL_MECHANISM",
    "kafka_sasl_username": "KAFKA_SASL_USERNAME",
    "kafka_sasl_password": "KAFKA_SASL_PASSWORD",
    "kafka_ssl_ca_location": "KAFKA_SSL_CA_LOCATION",
    "smtp_url": "SMTP_URL",
    "smtp_from": "SMTP_FROM",
    "queue_topic": "JOBS_QUEUE_TOPIC",
    "dlq_topic": "JOBS_DLQ_TOPIC",
    "queue_partitions": "JOBS_QUEUE_PARTITIONS",
    "dlq_partitions": "JOBS_DLQ_PARTITIONS",
    "bridge_fetch_wait_ms": "JOBS_BRIDGE_FETCH_WAIT_MS",
    "queue_consumer_group": "JOBS_QUEUE_CONSUMER_GROUP",
    "dlq_consumer_group": "JOBS_DLQ_CONSUMER_GROUP",
    "max_retries": "JOBS_MAX_RETRIES",
    "backoff_base_seconds": "JOBS_BACKOFF_BASE_SECONDS",
    "backoff_max_seconds": "JOBS_BACKOFF_MAX_SECONDS",
    "backoff_jitter": "JOBS_BACKOFF_JITTER",
    "handler_timeout_seconds": "JOBS_HANDLER_TIMEOUT_SECONDS",
    "lease_seconds": "JOBS_LEASE_SECONDS",
    "cancel_check_seconds": "JOBS_CANCEL_CHECK_SECONDS",
    "claim_cache_delay_seconds": "JOBS_CLAIM_CACHE_DELAY_SECONDS",
    "outcome_retry_base_seconds": "JOBS_OUTCOME_RETRY_BASE_SECONDS",
    "outcome_retry_max_seconds": "JOBS_OUTCOME_RETRY_MAX_SECONDS",
    "outcome_patience_seconds": "JOBS_OUTCOME_PATIENCE_SECONDS",
    "handler_modules": "JOBS_HANDLER_MODULES",
    "artifact_dir": "JOBS_ARTIFACT_DIR",
    "artifact_url": "JOBS_ARTIFACT_URL",
    "max_body_bytes": "JOBS_MAX_BODY_BYTES",
    "max_result_bytes": "JOBS_MAX_RESULT_BYTES",
    "auth": "JOBS_AUTH",
    "auth_cache_seconds": "JOBS_AUTH_CACHE_SECONDS",
    "publish_timeout_seconds": "JOBS_PUBLISH_TIMEOUT_SECONDS",
    "redis_timeout_seconds": "JOBS_REDIS_TIMEOUT_SECONDS",
    "cache_ttl_seconds": "JOBS_CACHE_TTL_SECONDS",
    "retain_finished_days": "JOBS_RETAIN_FINISHED_DAYS",
    "retain_dead_days": "JOBS_RETAIN_DEAD_DAYS",
    "requeue_after_seconds": "JOBS_REQUEUE_AFTER_SECONDS",
    "metrics_token": "JOBS_METRICS_TOKEN",
    "gateway_memory_bytes": "JOBS_GATEWAY_MEMORY_BYTES",
    "gateway_max_url_bytes": "JOBS_GATEWAY_MAX_URL_BYTES",
    "gateway_max_header_bytes": "JOBS_GATEWAY_MAX_HEADER_BYTES",
    "gateway_read_timeout_seconds": "JOBS_GATEWAY_READ_TIMEOUT_SECONDS",
    "events_max_streams": "JOBS_EVENTS_MAX_STREAMS",
    "events_poll_seconds": "JOBS_EVENTS_POLL_SECONDS",
    "events_heartbeat_seconds": "JOBS_EVENTS_HEARTBEAT_SECONDS",
    "callback_secret": "JOBS_CALLBACK_SECRET",
    "callback_allowed_hosts": "JOBS_CALLBACK_ALLOWED_HOSTS",
    "callback_timeout_seconds": "JOBS_CALLBACK_TIMEOUT_SECONDS",
    "callback_max_attempts": "JOBS_CALLBACK_MAX_ATTEMPTS",
    "callback_backoff_base_seconds": "JOBS_CALLBACK_BACKOFF_BASE_SECONDS",
}


KAFKA_CHOICES = {
    "kafka_security_protocol": ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "kafka_sasl_mechanism": ("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"),
}
KAFKA_CONFIG_PREFIX = "KAFKA_CONFIG_"
# Properties with a setting of their own: a KAFKA_CONFIG_ variable may not set them too.
_KAFKA_OWN = {"bootstrap.servers": "KAFKA_BOOTSTRAP_SERVERS",
              "security.protocol": "KAFKA_SECURITY_PROTOCOL",
              "sasl.mechanism": "KAFKA_SASL_MECHANISM", "sasl.mechanisms": "KAFKA_SASL_MECHANISM",
              "sasl.username": "KAFKA_SASL_USERNAME", "sasl.password": "KAFKA_SASL_PASSWORD",
              "ssl.ca.location": "KAFKA_SSL_CA_LOCATION"}


def kafka_client_config(settings: Settings) -> dict[str, str]:
    """The librdkafka properties every Kafka client of the system starts from: the brokers,
    the security protocol and its credentials, and the KAFKA_CONFIG_* pass-through."""
    conf = {"bootstrap.servers": settings.kafka_bootstrap_servers,
            "security.protocol": settings.kafka_security_protocol.lower()}
    if settings.kafka_sasl_mechanism:
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
    if settings.kafka_sasl_username:
        conf["sasl.username"] = settings.kafka_sasl_username
        conf["sasl.password"] = settings.kafka_sasl_password
    if settings.kafka_ssl_ca_location:
        conf["ssl.ca.location"] = settings.kafka_ssl_ca_location
    return {**conf, **settings.kafka_config}


def _kafka_passthrough(env: Any) -> dict[str, str]:
    conf = {}
    for name, value in env.items():
        if name.startswith(KAFKA_CONFIG_PREFIX) and name != KAFKA_CONFIG_PREFIX:
            prop = name[len(KAFKA_CONFIG_PREFIX):].lower().replace("_", ".")
            if prop in _KAFKA_OWN:
                raise ValueError(f"{name}: set {_KAFKA_OWN[prop]} instead")
            conf[prop] = value
    return conf


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
    values["kafka_config"] = _kafka_passthrough(env)
    return Settings.model_validate(values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
