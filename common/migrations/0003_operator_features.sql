-- Cancellation, delayed jobs, progress reporting (issue: operator experience).
ALTER TYPE job_status ADD VALUE IF NOT EXISTS 'CANCELLED';

ALTER TABLE jobs
    ADD COLUMN run_at              timestamptz,
    ADD COLUMN progress            real,
    ADD COLUMN progress_message    text,
    ADD COLUMN cancel_requested_at timestamptz;

CREATE INDEX jobs_by_updated ON jobs (updated_at DESC);
CREATE INDEX job_attempts_by_finished ON job_attempts (finished_at) WHERE finished_at IS NOT NULL;
