-- Dependencies between jobs and completion callbacks (issue 14).

ALTER TABLE jobs
    ADD COLUMN depends_on uuid[],                            -- parents; NULL when none
    ADD COLUMN has_dependents boolean NOT NULL DEFAULT false, -- some job waits for this one
    ADD COLUMN cancelled_by uuid,      -- the parent whose failure cancelled this job
    ADD COLUMN callback_url text;      -- POSTed a CloudEvent when the job ends

-- Who waits for whom. A row lives as long as both jobs (retention deletes final jobs).
CREATE TABLE job_dependencies (
    parent_id uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    child_id  uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    PRIMARY KEY (parent_id, child_id)
);
CREATE INDEX job_dependencies_by_child ON job_dependencies (child_id);

-- Jobs that ended while others wait for them: their dependents are settled (released or
-- cancelled) by `common.dependencies.settle`, right after the outcome by the function
-- that wrote it, and by the sweeper for any it could not (a crash, an outage).
CREATE TABLE job_settlements (
    job_id    uuid PRIMARY KEY REFERENCES jobs (job_id) ON DELETE CASCADE,
    queued_at timestamptz NOT NULL DEFAULT now()
);

-- One row per completion event to deliver to a job's callback_url, and one per try.
CREATE TABLE job_callbacks (
    callback_id     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id          uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    event_type      text NOT NULL,
    url             text NOT NULL,
    job_version     bigint NOT NULL,
    state           text NOT NULL DEFAULT 'PENDING'
                    CHECK (state IN ('PENDING', 'DELIVERED', 'FAILED')),
    attempts        int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX job_callbacks_due ON job_callbacks (next_attempt_at) WHERE state = 'PENDING';
CREATE INDEX job_callbacks_by_job ON job_callbacks (job_id, created_at);

CREATE TABLE job_callback_attempts (
    callback_id uuid NOT NULL REFERENCES job_callbacks (callback_id) ON DELETE CASCADE,
    attempt     int NOT NULL,
    started_at  timestamptz NOT NULL,
    duration_ms double precision NOT NULL,
    status_code int,
    error       text,
    PRIMARY KEY (callback_id, attempt)
);

-- Whoever writes a final state (process, the API's cancel, the sweeper, a settlement),
-- the follow-up work is queued in the same transaction: nothing is lost in a crash.
CREATE FUNCTION jobs_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.has_dependents THEN
        INSERT INTO job_settlements (job_id) VALUES (NEW.job_id) ON CONFLICT DO NOTHING;
    END IF;
    IF NEW.callback_url IS NOT NULL THEN
        INSERT INTO job_callbacks (job_id, event_type, url, job_version)
        VALUES (NEW.job_id, CASE NEW.status WHEN 'COMPLETED' THEN 'jobs.job.completed'
                WHEN 'DEAD_LETTER' THEN 'jobs.job.dead_lettered' ELSE 'jobs.job.cancelled'
                END, NEW.callback_url, NEW.version);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_ended AFTER UPDATE OF status ON jobs FOR EACH ROW
    WHEN (NEW.status IN ('COMPLETED', 'DEAD_LETTER', 'CANCELLED')
          AND OLD.status IS DISTINCT FROM NEW.status
          AND (NEW.has_dependents OR NEW.callback_url IS NOT NULL))
    EXECUTE FUNCTION jobs_ended();

-- Replay with its dependents finds the jobs a parent's failure cancelled.
CREATE INDEX jobs_cancelled_by ON jobs (cancelled_by) WHERE cancelled_by IS NOT NULL;
