-- Per-type rate limits (common/ratelimits.py): one GCRA bucket per limited job type,
-- updated under its row lock in the claim's transaction, so every worker shares it.
CREATE TABLE IF NOT EXISTS rate_limits (
    job_type text PRIMARY KEY,
    tat      timestamptz NOT NULL  -- theoretical arrival time: the bucket's state
);

-- The start time a deferred job was given by its type's rate limit: its delivery at or
-- after that time claims without taking another token. NULL once claimed.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS rate_slot_at timestamptz;
