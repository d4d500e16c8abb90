"""Prometheus metrics. With PROMETHEUS_MULTIPROC_DIR set (the local stack sets it), every
process writes its samples there and the gateway's /metrics adds them up."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SUBMITTED = Counter("jobs_submitted_total", "Jobs accepted by submit", ["job_type"])
COMPLETED = Counter("jobs_completed_total", "Jobs completed", ["job_type"])
FAILED = Counter("jobs_failed_attempts_total", "Attempts that failed", ["job_type"])
DEAD_LETTERED = Counter("jobs_dead_lettered_total", "Jobs dead-lettered", ["job_type"])
CANCELLED = Counter("jobs_cancelled_total", "Jobs cancelled", ["job_type"])
LEFT_TO_SWEEPER = Counter("jobs_undeliverable_left_to_sweeper_total",
                          "job-queue records the trigger gave up on while their job still"
                          " waits: not dead letters, the sweeper publishes the job again",
                          ["job_type"])
ATTEMPT_SECONDS = Histogram(
    "jobs_attempt_duration_seconds", "Time a handler ran, by outcome", ["job_type", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
STATUS_LOOKUPS = Counter("jobs_status_lookups_total", "GET /jobs/{id} answers, by source",
                         ["source"])  # cache | database
EVENT_STREAMS = Gauge("jobs_event_streams_open",
                      "GET /jobs/{id}/events streams open in the gateway processes",
                      multiprocess_mode="livesum")
