-- Periodic schedules (issue 14): a cron expression in a time zone, or every N seconds.
-- The sweeper takes due rows FOR UPDATE SKIP LOCKED and makes one job per tick under the
-- idempotency key `schedule<TAB><schedule_id><TAB><tick>` (common/schedules.py). The id is
-- made at creation, so a schedule deleted and created again under its name never meets
-- the keys of the old one's ticks.
CREATE TABLE IF NOT EXISTS schedules (
    name          text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$'),
    schedule_id   uuid NOT NULL UNIQUE,
    job_type      text NOT NULL,
    payload_json  jsonb NOT NULL,
    max_retries   int,
    cron          text,
    timezone      text,
    every_seconds int CHECK (every_seconds >= 1),
    -- ticks of `every_seconds` fall on anchor_at + k * every_seconds
    anchor_at     timestamptz NOT NULL,
    -- NULL while paused (paused_at set), or when a cron expression has no tick left
    next_run_at   timestamptz,
    paused_at     timestamptz,
    last_run_at   timestamptz,
    last_job_id   uuid,
    created_by    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (every_seconds IS NULL))
);

-- The sweeper's question every second: which active schedules are due?
CREATE INDEX IF NOT EXISTS schedules_due ON schedules (next_run_at) WHERE paused_at IS NULL;
