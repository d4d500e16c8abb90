"""The Knative descriptors in infra/knative parse and have the shapes Knative expects.

They were never applied to a live cluster here: these checks are what stands behind them.
Field names and API versions follow the Knative sources (serving.knative.dev/v1 Service,
sources.knative.dev/v1beta1 KafkaSource, eventing.knative.dev/v1alpha1 KafkaSink,
sources.knative.dev/v1 PingSource / ContainerSource, serving.knative.dev/v1beta1
DomainMapping, eventing duck/v1 DeliverySpec); see infra/knative/README.md.
"""

from __future__ import annotations

import ast
import base64
import copy
import json
import re
import zoneinfo
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.routes import API, GATEWAY
from common.settings import ENV, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
KNATIVE = ROOT / "infra" / "knative"
OPTIONAL = KNATIVE / "optional"

KNOWN_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "PersistentVolumeClaim"),
    ("serving.knative.dev/v1", "Service"),
    ("serving.knative.dev/v1beta1", "DomainMapping"),
    ("sources.knative.dev/v1beta1", "KafkaSource"),
    ("sources.knative.dev/v1", "PingSource"),
    ("sources.knative.dev/v1", "ContainerSource"),
    ("eventing.knative.dev/v1alpha1", "KafkaSink"),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"),
}
# Kinds a sink or dead-letter sink may name: (apiVersion, kind).
ADDRESSABLES = {("serving.knative.dev/v1", "Service"),
                ("eventing.knative.dev/v1alpha1", "KafkaSink")}

# name -> (target, signature type), as in infra/stack.py's FUNCTIONS.
FUNCTIONS = {
    "submit": ("submit_job", "http"),
    "status": ("get_job_status", "http"),
    "process": ("process_job", "cloudevent"),
    "dlq": ("record_dead_letter", "cloudevent"),
    "sweeper": ("sweep_jobs", "http"),
}
DECORATOR_SIGNATURE = {"http": "http", "cloud_event": "cloudevent"}
SECRET_KEYS = {"DATABASE_URL", "REDIS_URL", "SMTP_URL", "JOBS_CALLBACK_SECRET"}
PLACEHOLDER = "REPLACE_ME"

# Fields Knative Serving's webhook accepts without a feature flag (pkg/apis/serving/fieldmask.go).
CONTAINER_FIELDS = {"name", "args", "command", "env", "envFrom", "workingDir", "image",
                    "imagePullPolicy", "livenessProbe", "readinessProbe", "ports", "resources",
                    "securityContext", "terminationMessagePath", "terminationMessagePolicy",
                    "volumeMounts"}
SECURITY_CONTEXT_FIELDS = {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup",
                           "runAsNonRoot"}
REVISION_SPEC_FIELDS = {"containers", "volumes", "serviceAccountName", "imagePullSecrets",
                        "enableServiceLinks", "containerConcurrency", "timeoutSeconds",
                        "responseStartTimeoutSeconds", "idleTimeoutSeconds"}
PROBE_HANDLERS = {"tcpSocket", "httpGet", "exec", "grpc"}
PROBE_FIELDS = PROBE_HANDLERS | {"initialDelaySeconds", "timeoutSeconds", "periodSeconds",
                                 "successThreshold", "failureThreshold"}
RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
AUTOSCALING = {f"autoscaling.knative.dev/{k}" for k in (
    "min-scale", "max-scale", "initial-scale", "activation-scale", "target", "metric",
    "target-utilization-percentage", "window", "panic-window-percentage",
    "panic-threshold-percentage", "scale-down-delay", "scale-to-zero-pod-retention-period",
    "class")}
MAX_REVISION_TIMEOUT = 600  # Knative Serving's default max-revision-timeout-seconds
KAFKA_SECRET = "jobs-kafka"
KAFKA_SOURCE_FIELDS = {"consumers", "bootstrapServers", "net", "topics", "consumerGroup",
                       "initialOffset", "delivery", "ordering", "sink", "ceOverrides"}
KAFKA_SINK_FIELDS = {"topic", "numPartitions", "replicationFactor", "bootstrapServers",
                     "contentMode", "auth"}
PING_SOURCE_FIELDS = {"schedule", "timezone", "contentType", "data", "dataBase64", "sink",
                      "ceOverrides"}
# retryAfterMax is left out on purpose: it needs the alpha `delivery-retryafter` feature.
DELIVERY_FIELDS = {"deadLetterSink", "retry", "timeout", "backoffPolicy", "backoffDelay",
                   "format"}
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HOST_PORT = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?:\d{1,5}$")


# -- helpers ------------------------------------------------------------------------------

def _is_manifest(path: Path) -> bool:
    return path.name != "kustomization.yaml" and not path.name.endswith(".patch.yaml")


@cache
def _loaded() -> tuple[tuple[Path, dict[str, Any]], ...]:
    """Every YAML document of every manifest under infra/knative (multi-document files too)."""
    docs = []
    for path in sorted(KNATIVE.rglob("*.yaml")):
        if _is_manifest(path):
            docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return tuple(docs)


def _kustomization(directory: Path = KNATIVE) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def _base_files() -> set[Path]:
    return {KNATIVE / name for name in _kustomization()["resources"]}


def _base(kind: str | None = None) -> list[dict[str, Any]]:
    """Documents `kubectl apply -k infra/knative` applies, optionally of one kind."""
    files = _base_files()
    return [doc for path, doc in _loaded() if path in files and kind in (None, doc["kind"])]


def _optional(kind: str) -> list[dict[str, Any]]:
    return [doc for path, doc in _loaded() if OPTIONAL in path.parents and doc["kind"] == kind]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in _base(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r}, found {len(found)}"
    return found[0]


def _services() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _base("Service")}


def _container(service: dict[str, Any]) -> dict[str, Any]:
    return service["spec"]["template"]["spec"]["containers"][0]


def _literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _config() -> dict[str, str]:
    (config_map,) = _base("ConfigMap")
    return config_map["data"]


def _secret_values(secret: dict[str, Any]) -> dict[str, str]:
    values = dict(secret.get("stringData") or {})
    for key, encoded in (secret.get("data") or {}).items():
        values[key] = base64.b64decode(encoded).decode()
    return values


def _kafka_sources() -> dict[str, dict[str, Any]]:
    """KafkaSources by the one topic each consumes."""
    sources = {}
    for doc in _base("KafkaSource"):
        (topic,) = doc["spec"]["topics"]
        sources[topic] = doc
    return sources


def _queue_topic() -> str:
    return _config().get("JOBS_QUEUE_TOPIC", "job-queue")


def _dlq_topic() -> str:
    return _config().get("JOBS_DLQ_TOPIC", "job-dlq")


def _resolve(ref: dict[str, Any]) -> dict[str, Any]:
    """The base document a sink `ref` names."""
    assert set(ref) <= {"apiVersion", "kind", "name", "namespace"}, ref
    assert (ref.get("apiVersion"), ref.get("kind")) in ADDRESSABLES, ref
    assert "namespace" not in ref, "refs stay in the kustomization's namespace"
    found = [doc for doc in _base(ref["kind"]) if doc["apiVersion"] == ref["apiVersion"]
             and doc["metadata"]["name"] == ref["name"]]
    assert len(found) == 1, f"{ref} names no manifest in the kustomization"
    return found[0]


def _decorated_functions(source: Path) -> dict[str, str]:
    """Top-level functions decorated with functions_framework.http / .cloud_event."""
    found = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Attribute) and isinstance(deco.value, ast.Name)
                        and deco.value.id == "functions_framework"
                        and deco.attr in DECORATOR_SIGNATURE):
                    found[node.name] = DECORATOR_SIGNATURE[deco.attr]
    return found


def _variables_the_code_reads() -> set[str]:
    """Environment variable names read by common/, functions-framework and the gateway."""
    names = set(ENV.values()) | {"FUNCTION_TARGET", "FUNCTION_SOURCE", "FUNCTION_SIGNATURE_TYPE",
                                 "THREADS"}
    pattern = re.compile(r"""environ(?:\.get\(|\[)\s*["']([A-Z][A-Z0-9_]*)["']""")
    for path in [*sorted((ROOT / "common").rglob("*.py")), ROOT / "infra" / "gateway.py"]:
        names |= set(pattern.findall(path.read_text()))
    return names


_DURATION = re.compile(
    r"^P(?!$)(?:(?P<Y>\d+(?:[.,]\d+)?)Y)?(?:(?P<Mo>\d+(?:[.,]\d+)?)M)?(?:(?P<W>\d+(?:[.,]\d+)?)W)?"
    r"(?:(?P<D>\d+(?:[.,]\d+)?)D)?(?:T(?=\d)(?:(?P<H>\d+(?:[.,]\d+)?)H)?"
    r"(?:(?P<Mi>\d+(?:[.,]\d+)?)M)?(?:(?P<S>\d+(?:[.,]\d+)?)S)?)?$")
_SECONDS = {"Y": 365 * 86400, "Mo": 30 * 86400, "W": 7 * 86400, "D": 86400, "H": 3600,
            "Mi": 60, "S": 1}


def iso8601_duration(text: str) -> timedelta:
    """An ISO-8601 duration (`PT1S`, `PT10M`, `P1DT2H`); years and months approximated."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    seconds = sum(float(v.replace(",", ".")) * _SECONDS[k]
                  for k, v in match.groupdict().items() if v)
    return timedelta(seconds=seconds)


_CRON_FIELDS = [  # (low, high, names)
    (0, 59, []), (0, 23, []), (1, 31, []),
    (1, 12, ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV",
             "DEC"]),
    (0, 6, ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]),
]


def _cron_value(text: str, low: int, high: int, names: list[str]) -> int:
    if text.upper() in names:
        return names.index(text.upper()) + low
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{text!r} is outside {low}-{high}")
    return int(text)


def valid_cron(schedule: str) -> bool:
    """True for a standard 5-field cron expression (minute hour day-of-month month weekday),
    the form a PingSource schedule takes; no seconds field, no @descriptors."""
    fields = schedule.split()
    if len(fields) != 5:
        return False
    try:
        for index, (field, (low, high, names)) in enumerate(zip(fields, _CRON_FIELDS,
                                                                 strict=True)):
            for part in field.split(","):
                span, _, step = part.partition("/")
                if step and (not step.isdigit() or int(step) < 1):
                    return False
                if span == "*" or (span == "?" and index in (2, 4)):  # ? only for the days
                    continue
                first, _, last = span.partition("-")
                a = _cron_value(first, low, high, names)
                if last and _cron_value(last, low, high, names) < a:
                    return False
    except ValueError:
        return False
    return True


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _bytes(quantity: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(quantity))
    assert match and match.group(2) in {"", *units}, f"bad memory quantity {quantity!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


def _image_reference_is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def _json_patch_add(doc: dict[str, Any], path: str, value: Any) -> None:
    """RFC 6902 `add`, enough to prove a patch's paths land where they should."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), value)
    else:
        assert isinstance(node, dict), f"{path}: parent is not an object"
        node[last] = value


# -- the helpers themselves ---------------------------------------------------------------

def test_the_duration_parser_accepts_iso_8601_and_rejects_anything_else():
    assert iso8601_duration("PT1S") == timedelta(seconds=1)
    assert iso8601_duration("PT0.5S") == timedelta(seconds=0.5)
    assert iso8601_duration("PT10M") == timedelta(minutes=10)
    assert iso8601_duration("P1DT2H") == timedelta(days=1, hours=2)
    for bad in ("", "P", "PT", "1s", "10m", "PT1", "P1H", "pt1s", 5):
        with pytest.raises(ValueError):
            iso8601_duration(bad)  # type: ignore[arg-type]


def test_the_cron_check_accepts_five_fields_and_rejects_seconds_and_out_of_range_values():
    for good in ("* * * * *", "*/5 * * * *", "0 9-17 * * MON-FRI", "0,30 * 1 JAN,JUL 0"):
        assert valid_cron(good), good
    for bad in ("* * * * * *", "60 * * * *", "* 24 * * *", "@every 10s", "*/0 * * * *",
                "5-1 * * * *", "* * * *"):
        assert not valid_cron(bad), bad


# -- files and documents ------------------------------------------------------------------

def test_every_manifest_file_parses_and_holds_only_mappings():
    paths = [p for p in sorted(KNATIVE.rglob("*.yaml")) if _is_manifest(p)]
    assert paths, "no manifests under infra/knative"
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path.relative_to(ROOT)} holds no document"
        assert all(isinstance(d, dict) for d in docs), path


def test_every_document_is_a_known_api_version_and_kind_with_a_valid_name():
    seen = set()
    for path, doc in _loaded():
        where = f"{path.relative_to(ROOT)}: {doc.get('kind')} {doc.get('metadata')}"
        assert (doc.get("apiVersion"), doc.get("kind")) in KNOWN_KINDS, where
        name = doc["metadata"]["name"]
        pattern = DNS_SUBDOMAIN if doc["kind"] in ("DomainMapping", "KafkaTopic") else DNS_LABEL
        assert pattern.match(name) and len(name) <= 63, where
        assert (doc["kind"], name) not in seen, f"duplicate {where}"
        seen.add((doc["kind"], name))


def test_labels_annotations_and_config_values_are_all_strings():
    for path, doc in _loaded():
        metas = [doc["metadata"], doc.get("spec", {}).get("template", {}).get("metadata", {})]
        for meta in metas:
            for field in ("labels", "annotations"):
                for key, value in (meta.get(field) or {}).items():
                    assert isinstance(value, str), f"{path.name}: {key} must be a string"
        for field in ("data", "stringData"):
            if doc["kind"] in ("ConfigMap", "Secret"):
                for key, value in (doc.get(field) or {}).items():
                    assert isinstance(value, str), f"{path.name}: {key} must be a string"


def test_the_kustomization_lists_exactly_the_manifests_beside_it():
    listed = _kustomization()["resources"]
    present = sorted(p.name for p in KNATIVE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert sorted(listed) == present


def test_base_manifests_leave_the_namespace_to_the_kustomization():
    namespace = _kustomization()["namespace"]
    (ns,) = _base("Namespace")
    assert ns["metadata"]["name"] == namespace
    for doc in _base():
        assert "namespace" not in doc["metadata"], f"{doc['kind']} {doc['metadata']['name']}"


def test_optional_manifests_are_marked_optional_kept_out_of_the_base_and_documented():
    readme = (KNATIVE / "README.md").read_text()
    files = sorted(p for p in OPTIONAL.rglob("*.yaml"))
    assert files
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# OPTIONAL"), f"{path.relative_to(ROOT)} must say OPTIONAL first"
        assert path not in _base_files()
        if path.parent == OPTIONAL:
            assert f"optional/{path.name}" in readme, f"README.md does not mention {path.name}"
    assert "optional/artifacts-pvc" in readme


# -- Services -----------------------------------------------------------------------------

def test_there_is_one_knative_service_per_function_plus_the_gateway():
    assert set(_services()) == set(FUNCTIONS) | {"gateway"}


def test_each_function_service_names_a_target_decorated_in_its_source_with_that_signature():
    workdir = "/app"
    for name, (target, signature) in FUNCTIONS.items():
        env = _literal_env(_container(_services()[name]))
        assert env["FUNCTION_TARGET"] == target
        assert env["FUNCTION_SIGNATURE_TYPE"] == signature
        source = env["FUNCTION_SOURCE"]
        assert source == f"{workdir}/functions/{name}/main.py"
        decorated = _decorated_functions(ROOT / source.removeprefix(f"{workdir}/"))
        assert decorated.get(target) == signature, f"{source} does not define {target}"


SERVICE_URLS = {"DATABASE_URL": "postgresql://u@db.invalid/jobs",
                "REDIS_URL": "redis://cache.invalid/0",
                "KAFKA_BOOTSTRAP_SERVERS": "broker.invalid:9092",
                "SMTP_URL": "smtp://mail.invalid:25"}


def test_each_function_target_loads_with_the_service_urls_its_manifest_gives_it(monkeypatch):
    """A function refuses to load without the services it needs: the manifests must give
    each one those variables (placeholders here: loading connects to nothing)."""
    from common.settings import get_settings

    functions_framework = pytest.importorskip("functions_framework")
    for name, (target, signature) in FUNCTIONS.items():
        container = _container(_services()[name])
        given = {e["name"] for e in container["env"]}
        if any("configMapRef" in e for e in container.get("envFrom", [])):
            given |= set(_config())
        for variable, placeholder in SERVICE_URLS.items():
            if variable in given:
                monkeypatch.setenv(variable, placeholder)
            else:
                monkeypatch.delenv(variable, raising=False)
        get_settings.cache_clear()
        source = ROOT / "functions" / name / "main.py"
        app = functions_framework.create_app(target, str(source), signature)
        assert app is not None, name


def test_every_env_var_has_either_a_value_or_a_value_from_a_config_map_or_secret():
    for name, service in _services().items():
        container = _container(service)
        names = [e["name"] for e in container["env"]]
        assert len(names) == len(set(names)), f"{name}: duplicate env var"
        for env in container["env"]:
            assert ENV_NAME.match(env["name"]), env
            assert env["name"] not in RESERVED_ENV, f"{name}: Knative sets {env['name']} itself"
            assert ("value" in env) != ("valueFrom" in env), f"{name}: {env}"
            assert set(env) <= {"name", "value", "valueFrom"}, env
            if "value" in env:
                assert isinstance(env["value"], str), f"{name}: {env['name']} must be a string"
            else:
                (source,) = env["valueFrom"]
                assert source in ("configMapKeyRef", "secretKeyRef"), f"{name}: {env}"


def test_config_map_and_secret_references_resolve_to_keys_that_exist():
    (config_map,) = _base("ConfigMap")
    (secret,) = _base("Secret")
    tables = {"configMapKeyRef": (config_map["metadata"]["name"], set(config_map["data"])),
              "secretKeyRef": (secret["metadata"]["name"], set(_secret_values(secret)))}
    for name, service in _services().items():
        container = _container(service)
        for env in container["env"]:
            for source, ref in env.get("valueFrom", {}).items():
                wanted_name, keys = tables[source]
                assert ref["name"] == wanted_name and ref["key"] in keys, f"{name}: {env}"
        for env_from in container.get("envFrom", []):
            if "configMapRef" in env_from:
                assert env_from["configMapRef"]["name"] == config_map["metadata"]["name"]
            elif env_from["secretRef"]["name"] == KAFKA_SECRET:
                # Kafka credentials for a managed cluster: optional (plaintext without it)
                # and described in secret.yaml.
                assert env_from["secretRef"].get("optional") is True, name
                assert f"name: {KAFKA_SECRET}" in (KNATIVE / "secret.yaml").read_text()
            else:
                assert env_from["secretRef"]["name"] == secret["metadata"]["name"]
        assert any("configMapRef" in e for e in container.get("envFrom", [])), name


def test_every_variable_set_is_one_the_code_reads_and_the_settings_accept_the_values():
    known = _variables_the_code_reads()
    (secret,) = _base("Secret")
    assert set(_config()) <= known, set(_config()) - known
    assert set(_secret_values(secret)) <= known
    for name, service in _services().items():
        container = _container(service)
        unknown = {e["name"] for e in container["env"]} - known
        assert not unknown, f"{name} sets variables nothing reads: {unknown}"
    # The same types the functions will parse at start-up (ints, floats, paths).
    # The callback secret's placeholder is refused at start (a known signing key): filled in.
    filled = {**_secret_values(secret), "JOBS_CALLBACK_SECRET": "x" * 32}
    settings = load_settings({**_config(), **filled})
    with pytest.raises(ValueError, match="placeholder"):
        load_settings({**_config(), **_secret_values(secret)})
    assert settings.queue_topic == _queue_topic() and settings.dlq_topic == _dlq_topic()


def test_the_dsns_live_only_in_the_secret_and_every_secret_value_is_a_placeholder():
    (secret,) = _base("Secret")
    values = _secret_values(secret)
    assert set(values) == SECRET_KEYS
    for key, value in values.items():
        assert PLACEHOLDER in value, f"{key} must be a {PLACEHOLDER} placeholder, not a secret"
    assert not SECRET_KEYS & set(_config()), "a DSN is in the ConfigMap"
    credentials = re.compile(r"://[^/@\s:]+:[^/@\s]+@")
    for key, value in _config().items():
        assert not credentials.search(value), f"{key} in the ConfigMap carries credentials"
    for name, service in _services().items():
        assert not SECRET_KEYS & set(_literal_env(_container(service))), f"{name}: literal DSN"
    for name in FUNCTIONS:
        refs = {e["name"] for e in _container(_services()[name])["env"] if "valueFrom" in e}
        assert {"DATABASE_URL", "REDIS_URL"} <= refs, f"{name} lacks a DSN"


def test_containers_use_only_fields_knative_accepts_without_feature_flags():
    for name, service in _services().items():
        spec = service["spec"]["template"]["spec"]
        assert set(spec) <= REVISION_SPEC_FIELDS, f"{name}: {set(spec) - REVISION_SPEC_FIELDS}"
        assert len(spec["containers"]) == 1, name
        container = spec["containers"][0]
        assert set(container) <= CONTAINER_FIELDS, f"{name}: {set(container) - CONTAINER_FIELDS}"
        context = container.get("securityContext", {})
        assert set(context) <= SECURITY_CONTEXT_FIELDS, name
        assert set(context.get("capabilities", {})) <= {"drop"}, name
        assert context.get("runAsNonRoot") is True, f"{name} should refuse to run as root"
        (port,) = container["ports"]
        assert port["containerPort"] == 8080 and port.get("name", "http1") in ("http1", "h2c")


def test_every_service_has_resources_concurrency_a_timeout_and_sane_autoscaling_bounds():
    for name, service in _services().items():
        template = service["spec"]["template"]
        spec = template["spec"]
        resources = _container(service)["resources"]
        for quantity, parse in (("cpu", _cpu), ("memory", _bytes)):
            request = parse(resources["requests"][quantity])
            limit = parse(resources["limits"][quantity])
            assert 0 < request <= limit, f"{name}: {quantity} request {request} > limit {limit}"
        concurrency = spec["containerConcurrency"]
        assert isinstance(concurrency, int) and 0 <= concurrency <= 1000, name
        assert isinstance(spec["timeoutSeconds"], int), name
        assert 0 < spec["timeoutSeconds"] <= MAX_REVISION_TIMEOUT, name
        annotations = template["metadata"]["annotations"]
        assert set(annotations) <= AUTOSCALING, f"{name}: {set(annotations) - AUTOSCALING}"
        low = int(annotations["autoscaling.knative.dev/min-scale"])
        high = int(annotations["autoscaling.knative.dev/max-scale"])
        assert 0 <= low <= high and high > 0, f"{name}: min-scale {low}, max-scale {high}"
        metric = annotations.get("autoscaling.knative.dev/metric", "concurrency")
        assert metric in ("concurrency", "rps"), name
        target = float(annotations.get("autoscaling.knative.dev/target", "1"))
        assert target > 0, name
        if metric == "concurrency" and concurrency:
            assert target <= concurrency, f"{name}: target {target} > containerConcurrency"
        delay = annotations.get("autoscaling.knative.dev/scale-down-delay")
        assert delay is None or re.fullmatch(r"\d+(s|m|h)", delay), f"{name}: {delay!r}"


def test_server_threads_match_the_container_concurrency_knative_allows():
    for name, service in _services().items():
        concurrency = service["spec"]["template"]["spec"]["containerConcurrency"]
        container = _container(service)
        if name in FUNCTIONS:  # functions-framework's gunicorn reads THREADS
            assert int(_literal_env(container)["THREADS"]) == concurrency, name
        else:  # the gateway is asyncio: one worker per container, no thread count to match
            args = container["args"]
            assert "--threads" not in args and args[args.index("--workers") + 1] == "1", name


def test_probes_are_ones_knative_accepts_and_target_the_serving_port():
    for name, service in _services().items():
        container = _container(service)
        port = container["ports"][0]["containerPort"]
        for kind in ("readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert set(probe) <= PROBE_FIELDS, f"{name} {kind}: {set(probe) - PROBE_FIELDS}"
            (handler,) = set(probe) & PROBE_HANDLERS
            assert probe[handler].get("port", port) == port, f"{name} {kind}: another port"
            if name in FUNCTIONS:
                # A function app routes every path to the function: no health route to probe.
                assert handler == "tcpSocket", f"{name} {kind} should be a TCP check"
            elif handler == "httpGet":
                path = probe["httpGet"]["path"]
                assert any(op.path == path and op.method == "GET" and op.public
                           and op.function == GATEWAY for op in API), f"gateway serves no {path}"


def test_only_the_gateway_is_reachable_from_outside_the_cluster():
    for name, service in _services().items():
        visibility = service["metadata"].get("labels", {}).get("networking.knative.dev/visibility")
        assert visibility == (None if name == "gateway" else "cluster-local"), name


def test_the_gateway_runs_infra_gateway_against_the_submit_and_status_services():
    gateway = _services()["gateway"]
    container = _container(gateway)
    assert container["command"] == ["python", "-m", "infra.gateway"]
    source = (ROOT / "infra" / "gateway.py").read_text()
    flags = set(re.findall(r'add_argument\("(--[a-z-]+)"', source))
    assert {a for a in container["args"] if a.startswith("--")} <= flags
    namespace = _kustomization()["namespace"]
    env = _literal_env(container)
    for upstream in ("submit", "status"):
        variable = f"JOBS_{upstream.upper()}_URL"
        assert variable in source
        assert env[variable] == f"http://{upstream}.{namespace}.svc.cluster.local"
        assert upstream in _services()
    routes = {(op.method, op.path): op.function for op in API}
    assert routes[("POST", "/jobs")] == "submit" and routes[("GET", "/jobs")] == "status"
    assert routes[("GET", "/dead-letters")] == "status"
    assert {op.function for op in API} <= {"submit", "status", GATEWAY}


# -- image and container build ------------------------------------------------------------

def _dockerfile() -> str:
    return (KNATIVE / "Dockerfile").read_text()


def test_every_image_is_pinned_to_a_tag_or_digest_never_latest():
    images = {_container(s)["image"] for s in _services().values()}
    assert len(images) == 1, f"one image for every Service, found {images}"
    (image,) = images
    assert _image_reference_is_pinned(image), image
    for source in _optional("ContainerSource"):
        for container in source["spec"]["template"]["spec"]["containers"]:
            assert container["image"] == image
    (entry,) = _kustomization()["images"]
    assert entry["name"] == image.rpartition(":")[0]
    assert str(entry.get("newTag", "")) != "latest"
    assert "newTag" in entry or "digest" in entry
    dockerfile = _dockerfile()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    for base in re.findall(r"^FROM (\S+)", dockerfile, re.M):
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        assert _image_reference_is_pinned(resolved), f"FROM {resolved}"


def test_the_dockerfile_installs_the_package_with_pip_and_starts_the_function_from_the_env():
    dockerfile = _dockerfile()
    assert re.search(r"pip install \.$", dockerfile, re.M), "the package is installed with pip"
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for part in source.split():
            assert (ROOT / part).exists(), f"COPY {part}: no such file in the repository"
    final_stage = dockerfile.split("\nFROM ")[-1]
    assert re.search(r"^WORKDIR /app$", final_stage, re.M)
    assert re.search(r"^COPY functions \./functions$", final_stage, re.M)
    assert re.search(r"^USER \d+$", final_stage, re.M), "a numeric USER, for runAsNonRoot"
    (cmd,) = re.findall(r"^CMD (\[.*\])$", final_stage, re.M)
    command = " ".join(json.loads(cmd))
    for flag, variable in (("--target", "FUNCTION_TARGET"), ("--source", "FUNCTION_SOURCE"),
                           ("--signature-type", "FUNCTION_SIGNATURE_TYPE"), ("--port", "PORT")):
        assert f'{flag} "${variable}"' in command, flag
    assert "exec functions-framework " in command
    ignore = (KNATIVE / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".data", ".git"} <= set(ignore)


# -- Kafka --------------------------------------------------------------------------------

def test_kafka_sources_feed_job_queue_to_process_and_job_dlq_to_dlq():
    sources = _kafka_sources()
    assert set(sources) == {_queue_topic(), _dlq_topic()}
    groups = [doc["spec"]["consumerGroup"] for doc in sources.values()]
    assert all(isinstance(g, str) and g for g in groups) and len(set(groups)) == len(groups)
    for topic, want in ((_queue_topic(), "process"), (_dlq_topic(), "dlq")):
        spec = sources[topic]["spec"]
        assert set(spec) <= KAFKA_SOURCE_FIELDS, set(spec) - KAFKA_SOURCE_FIELDS
        assert isinstance(spec["bootstrapServers"], list) and spec["bootstrapServers"]
        assert all(HOST_PORT.match(s) for s in spec["bootstrapServers"])
        assert isinstance(spec["topics"], list)
        assert spec.get("initialOffset", "latest") in ("earliest", "latest")
        assert spec.get("ordering", "ordered") in ("ordered", "unordered")
        assert set(spec["sink"]) == {"ref"}
        ref = spec["sink"]["ref"]
        assert (ref["apiVersion"], ref["kind"]) == ("serving.knative.dev/v1", "Service")
        assert ref["name"] == want
        target = _resolve(ref)
        signature = _literal_env(_container(target))["FUNCTION_SIGNATURE_TYPE"]
        assert signature == "cloudevent", f"{want} must take CloudEvents"


def test_kafka_sources_deliver_unordered_from_the_oldest_record():
    for topic, source in _kafka_sources().items():
        assert source["spec"]["ordering"] == "unordered", topic
        assert source["spec"]["initialOffset"] == "earliest", topic
        assert "kafka.eventing.knative.dev/delivery.order" not in source["metadata"].get(
            "annotations", {}), "that annotation belongs on a Kafka Broker Trigger"


def test_kafka_source_delivery_retries_with_backoff_and_times_out_after_the_handler():
    handler_timeout = load_settings(_config()).handler_timeout_seconds
    for topic, source in _kafka_sources().items():
        delivery = source["spec"]["delivery"]
        assert set(delivery) <= DELIVERY_FIELDS, f"{topic}: {set(delivery) - DELIVERY_FIELDS}"
        retry = delivery["retry"]
        assert isinstance(retry, int) and not isinstance(retry, bool) and retry > 0, topic
        assert delivery["backoffPolicy"] in ("linear", "exponential"), topic
        assert iso8601_duration(delivery["backoffDelay"]) > timedelta(0), topic
        if "timeout" in delivery:
            timeout = iso8601_duration(delivery["timeout"]).total_seconds()
            service = _resolve(source["spec"]["sink"]["ref"])
            assert 0 < timeout <= service["spec"]["template"]["spec"]["timeoutSeconds"], topic
    queue = _kafka_sources()[_queue_topic()]
    process_timeout = _resolve(queue["spec"]["sink"]["ref"])["spec"]["template"]["spec"]
    assert iso8601_duration(queue["spec"]["delivery"]["timeout"]).total_seconds() > \
        handler_timeout, "the delivery would time out before the job's own time limit"
    assert process_timeout["timeoutSeconds"] > handler_timeout


def test_undeliverable_job_queue_records_go_to_a_kafka_sink_writing_job_dlq():
    delivery = _kafka_sources()[_queue_topic()]["spec"]["delivery"]
    assert set(delivery["deadLetterSink"]) == {"ref"}
    sink = _resolve(delivery["deadLetterSink"]["ref"])
    assert sink["kind"] == "KafkaSink"
    spec = sink["spec"]
    assert set(spec) <= KAFKA_SINK_FIELDS, set(spec) - KAFKA_SINK_FIELDS
    assert spec["topic"] == _dlq_topic()
    # ce_* headers, as infra/bridge.py writes poison records, so `dlq` sees the same event.
    assert spec["contentMode"] == "binary"


def test_the_dead_letter_source_has_no_dead_letter_sink_that_would_loop():
    delivery = _kafka_sources()[_dlq_topic()]["spec"]["delivery"]
    assert "deadLetterSink" not in delivery


def test_bootstrap_servers_agree_between_the_config_map_sources_and_sink():
    configured = _config()["KAFKA_BOOTSTRAP_SERVERS"].split(",")
    assert all(HOST_PORT.match(s) for s in configured)
    for source in _base("KafkaSource"):
        assert source["spec"]["bootstrapServers"] == configured, source["metadata"]["name"]
    for sink in _base("KafkaSink"):
        assert sink["spec"]["bootstrapServers"] == configured, sink["metadata"]["name"]


def test_the_optional_strimzi_topics_are_the_two_topics_the_system_uses():
    topics = {t["metadata"]["name"]: t["spec"] for t in _optional("KafkaTopic")}
    assert set(topics) == {_queue_topic(), _dlq_topic()}
    for spec in topics.values():
        assert spec["partitions"] >= 1 and spec["replicas"] >= 1


# -- the sweeper's schedule ---------------------------------------------------------------

def test_a_ping_source_calls_the_sweeper_on_a_valid_five_field_cron_schedule():
    (ping,) = _base("PingSource")
    spec = ping["spec"]
    assert set(spec) <= PING_SOURCE_FIELDS, set(spec) - PING_SOURCE_FIELDS
    assert valid_cron(spec["schedule"]), spec["schedule"]
    assert not ("data" in spec and "dataBase64" in spec)
    if spec.get("contentType") == "application/json" and "data" in spec:
        json.loads(spec["data"])
    zones = zoneinfo.available_timezones()
    if zones and "timezone" in spec:
        assert spec["timezone"] in zones
    ref = spec["sink"]["ref"]
    assert ref["name"] == "sweeper" and _resolve(ref)["kind"] == "Service"
    assert _literal_env(_container(_resolve(ref)))["FUNCTION_TARGET"] == "sweep_jobs"


def test_the_optional_sweeper_ticker_posts_to_the_sweeper_service():
    (ticker,) = _optional("ContainerSource")
    assert _resolve(ticker["spec"]["sink"]["ref"])["metadata"]["name"] == "sweeper"
    (container,) = ticker["spec"]["template"]["spec"]["containers"]
    script = container["args"][-1]
    compile(script, "sweeper-ticker", "exec")
    assert 'os.environ["K_SINK"]' in script


# -- public API and artifacts -------------------------------------------------------------

def test_the_optional_domain_mapping_points_at_the_public_gateway():
    (mapping,) = _optional("DomainMapping")
    assert _resolve(mapping["spec"]["ref"])["metadata"]["name"] == "gateway"


def test_the_artifacts_overlay_mounts_one_claim_at_the_artifact_dir_of_process_and_status():
    overlay = OPTIONAL / "artifacts-pvc"
    kustomization = _kustomization(overlay)
    assert kustomization["namespace"] == _kustomization()["namespace"]
    files = sorted(p.name for p in overlay.glob("*.yaml") if _is_manifest(p))
    listed = [r for r in kustomization["resources"] if r.endswith(".yaml")]
    assert sorted(listed) == files
    for resource in set(kustomization["resources"]) - set(listed):
        base = (overlay / resource / "kustomization.yaml").resolve()
        assert base == KNATIVE / "kustomization.yaml", resource
    (claim,) = [doc for path, doc in _loaded() if path.parent == overlay]
    assert claim["kind"] == "PersistentVolumeClaim"
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    patched = set()
    for patch in kustomization["patches"]:
        target = patch["target"]
        assert (target["group"], target["version"], target["kind"]) == (
            "serving.knative.dev", "v1", "Service")
        service = copy.deepcopy(_services()[target["name"]])
        for op in yaml.safe_load((overlay / patch["path"]).read_text()):
            assert op["op"] == "add", op
            _json_patch_add(service, op["path"], op["value"])
        spec = service["spec"]["template"]["spec"]
        (volume,) = spec["volumes"]
        (mount,) = spec["containers"][0]["volumeMounts"]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert mount["name"] == volume["name"]
        assert mount["mountPath"] == _config()["JOBS_ARTIFACT_DIR"]
        patched.add(target["name"])
    assert patched == {"process", "status"}


# -- the walkthrough ----------------------------------------------------------------------

def test_the_readme_walks_through_the_deployment_and_says_it_was_not_applied_here():
    readme = (KNATIVE / "README.md").read_text()
    for step in ("docker build", "docker push", "kafka-topics", "secret.yaml",
                 "kubectl apply -k infra/knative", "curl"):
        assert step in readme, f"README.md does not cover `{step}`"
    assert re.search(r"not\s+(been\s+)?applied to a live cluster", readme, re.I | re.S)


def test_each_kafka_source_has_one_consumer_per_partition_make_run_creates():
    settings = Settings()
    sources = _kafka_sources()
    assert sources[_queue_topic()]["spec"]["consumers"] == settings.queue_partitions
    assert sources[_dlq_topic()]["spec"]["consumers"] == settings.dlq_partitions


# -- job types' own topics (python -m infra.knative.topics) -------------------------------

def _typed(*topics: str | None) -> list[Any]:
    from common.handlers import JobType

    return [JobType(name=f"T{i}", func=print, topic=topic) for i, topic in enumerate(topics)]


def test_each_types_own_topic_gets_a_kafka_source_like_the_job_queues():
    from common.queue import consumer_group
    from infra.knative.topics import kafka_sources

    settings = load_settings(_config())
    topics = ["job-queue-reports", "Billing_Events.v2", "9lives"]
    sources = kafka_sources(settings, _typed(None, _queue_topic(), *topics, topics[0]))
    assert [s["spec"]["topics"] for s in sources] == [[t] for t in topics]
    queue = _kafka_sources()[_queue_topic()]
    base_names = {doc["metadata"]["name"] for doc in _base("KafkaSource")}
    base_groups = {doc["spec"]["consumerGroup"] for doc in _base("KafkaSource")}
    names = [s["metadata"]["name"] for s in sources]
    assert len(set(names)) == len(names) and not set(names) & base_names
    for topic, source in zip(topics, sources, strict=True):
        assert (source["apiVersion"], source["kind"]) in KNOWN_KINDS
        assert DNS_LABEL.match(source["metadata"]["name"]), source["metadata"]["name"]
        assert len(source["metadata"]["name"]) <= 63
        spec = source["spec"]
        assert set(spec) <= KAFKA_SOURCE_FIELDS, set(spec) - KAFKA_SOURCE_FIELDS
        # The group the lag metric and /readyz look at, one of its own.
        assert spec["consumerGroup"] == consumer_group(settings, topic)
        assert spec["consumerGroup"] not in base_groups
        # Everything else as the job queue's: servers, delivery, dead letters, `process`.
        for field in ("bootstrapServers", "delivery", "sink", "ordering", "initialOffset",
                      "consumers"):
            assert spec[field] == queue["spec"][field], field
        assert _resolve(spec["sink"]["ref"])["metadata"]["name"] == "process"


def test_a_type_topic_equal_to_the_dead_letter_topic_or_to_another_sources_name_is_refused():
    from infra.knative.topics import kafka_sources

    settings = load_settings(_config())
    with pytest.raises(ValueError, match="dead-letter topic"):
        kafka_sources(settings, _typed(_dlq_topic()))
    with pytest.raises(ValueError, match="source name"):
        kafka_sources(settings, _typed("reports.v1", "reports_v1"))


def test_the_topics_command_prints_kafka_sources_of_the_handler_modules_types():
    import subprocess
    import sys

    lane = "job-queue-slow-lane"  # tests/support/topic_handlers.py (not imported: registers)
    run = subprocess.run([sys.executable, "-m", "infra.knative.topics"], cwd=ROOT, env={
        "JOBS_HANDLER_MODULES": str(ROOT / "tests" / "support" / "topic_handlers.py"),
        "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60, check=True)
    (source,) = list(yaml.safe_load_all(run.stdout))
    assert source["kind"] == "KafkaSource" and source["spec"]["topics"] == [lane]
    bare = subprocess.run([sys.executable, "-m", "infra.knative.topics"], cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=60, check=True)
    assert bare.stdout == "", "no type of the built-in modules has a topic of its own"
