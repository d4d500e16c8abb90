-- Jobs, their attempts, and dead letters (SPEC section 2).
CREATE TYPE job_status AS ENUM (
    'QUEUED', 'IN_PROGRESS', 'COMPLETED', 'FAILED', 'RETRYING', 'DEAD_LETTER'
);

CREATE TABLE jobs (
    job_id           uuid PRIMARY KEY,
    job_type         text NOT NULL,
    payload_json     jsonb NOT NULL,
    status           job_status NOT NULL DEFAULT 'QUEUED',
    retries          integer NOT NULL DEFAULT 0,
    max_retries      integer NOT NULL DEFAULT 3,
    attempts         integer NOT NULL DEFAULT 0,
    result_json      jsonb,
    error_message    text,
    idempotency_key  text UNIQUE,
    request_hash     text,
    next_attempt_at  timestamptz,
    lease_expires_at timestamptz,
    published_at     timestamptz,
    version          bigint NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX jobs_by_created ON jobs (created_at DESC, job_id DESC);
CREATE INDEX jobs_by_status ON jobs (status, created_at DESC, job_id DESC);
CREATE INDEX jobs_by_type ON jobs (job_type, created_at DESC, job_id DESC);
CREATE INDEX jobs_waiting ON jobs (next_attempt_at) WHERE status IN ('QUEUED', 'RETRYING');
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE status = 'IN_PROGRESS';

-- One row per attempt, written when the attempt is claimed: a crash still counts.
CREATE TABLE job_attempts (
    job_id      uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     text,
    error       text,
    PRIMARY KEY (job_id, attempt)
);

CREATE TABLE dead_letters (
    dead_letter_id   text PRIMARY KEY,
    job_id           uuid,
    job_type         text,
    reason           text NOT NULL,
    last_error       text,
    attempts         integer NOT NULL DEFAULT 0,
    history          jsonb NOT NULL DEFAULT '[]',
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    replayed_at      timestamptz
);

CREATE INDEX dead_letters_by_time ON dead_letters (dead_lettered_at DESC, dead_letter_id DESC);
CREATE INDEX dead_letters_by_job ON dead_letters (job_id);
