"""`GET /metrics` for the gateway: every process's counters (prometheus-client multiprocess
mode) plus gauges read at scrape time: jobs by status, queue lag, cache hit ratio."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from common import clients, jobs
from common.settings import kafka_client_config

log = logging.getLogger(__name__)


class LiveCollector(Collector):
    """Gauges computed when scraped, from PostgreSQL, Kafka and the lookup counters."""

    def __init__(self, counters: MultiProcessCollector | None) -> None:
        self.counters = counters
        self._consumers: dict[str, Any] = {}  # consumer group -> a consumer reading its offsets
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs_by_status()
        yield from self._queue_lag()
        yield from self._cache_ratio()

    def _jobs_by_status(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("jobs_current", "Jobs in PostgreSQL by status and type",
                                  labels=["status", "job_type"])
        try:
            with clients.database().connection() as conn:
                rows = jobs.counts(conn)  # kept by triggers: no scan of the jobs table
        except Exception as exc:
            log.warning("metrics: jobs by status unavailable: %s", exc)
            return
        for job_type, status, n in rows:
            gauge.add_metric([status, job_type], n)
        yield gauge

    def _queue_lag(self) -> Iterator[Metric]:
        """Per partition of every job topic (the job queue and each type's own), the records
        its consumer group has not committed yet."""
        from confluent_kafka import Consumer, TopicPartition

        settings = clients.settings()
        gauge = GaugeMetricFamily("jobs_queue_lag_records",
                                  "Records not yet committed by the processing consumer group",
                                  labels=["topic", "partition"])
        try:
            with self._lock:
                for topic, group in clients.job_topics().items():
                    consumer = self._consumers.get(group)
                    if consumer is None:
                        # Never subscribes, so it never joins the group: it only reads offsets.
                        consumer = self._consumers[group] = Consumer({
                            **kafka_client_config(settings),
                            "group.id": group, "enable.auto.commit": False})
                    partitions = consumer.list_topics(topic, timeout=2).topics[topic].partitions
                    tps = [TopicPartition(topic, p) for p in partitions]
                    for tp in consumer.committed(tps, timeout=2):
                        low, high = consumer.get_watermark_offsets(tp, timeout=2, cached=False)
                        position = tp.offset if tp.offset >= 0 else low
                        gauge.add_metric([topic, str(tp.partition)], max(0, high - position))
        except Exception as exc:
            log.warning("metrics: queue lag unavailable: %s", exc)
            return
        yield gauge

    def _cache_ratio(self) -> Iterator[Metric]:
        if self.counters is None:
            return
        hits = misses = 0.0
        for metric in self.counters.collect():
            if metric.name == "jobs_status_lookups":
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        if sample.labels.get("source") == "cache":
                            hits += sample.value
                        else:
                            misses += sample.value
        gauge = GaugeMetricFamily("jobs_status_cache_hit_ratio",
                                  "Share of GET /jobs/{id} answered from Redis")
        gauge.add_metric([], hits / (hits + misses) if hits + misses else 0.0)
        yield gauge


class MetricsEndpoint:
    """Builds the exposition text; one per gateway process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        counters = None
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            counters = MultiProcessCollector(self.registry)
        self.registry.register(LiveCollector(counters))

    def render(self) -> bytes:
        return generate_latest(self.registry)
