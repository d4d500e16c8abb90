-- Jobs whose status could not be written to Redis (down or hung); the sweeper writes
-- them once Redis answers again, so the cache never stays behind PostgreSQL.
CREATE TABLE cache_repairs (
    job_id    uuid PRIMARY KEY,
    queued_at timestamptz NOT NULL DEFAULT now()
);
