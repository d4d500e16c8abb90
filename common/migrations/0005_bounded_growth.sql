-- Bounded growth and no full scans on hot paths (issue: ready for managed services).

-- Counts by type and status without a GROUP BY over every job. Each statement that inserts,
-- deletes or changes the status of jobs appends its net changes to a ledger (inserts only:
-- no counter row is locked, so writers never wait for each other or deadlock); the sweeper
-- folds the ledger into job_counts. A reader adds job_counts and what the ledger holds.
CREATE TABLE job_counts (
    job_type text NOT NULL,
    status   job_status NOT NULL,
    n        bigint NOT NULL,
    PRIMARY KEY (job_type, status)
);

CREATE TABLE job_count_changes (
    job_type text NOT NULL,
    status   job_status NOT NULL,
    delta    bigint NOT NULL
);

CREATE FUNCTION jobs_counted_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_count_changes (job_type, status, delta)
    SELECT job_type, status, count(*) FROM new_rows GROUP BY 1, 2;
    RETURN NULL;
END $$;

CREATE FUNCTION jobs_counted_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_count_changes (job_type, status, delta)
    SELECT job_type, status, -count(*) FROM old_rows GROUP BY 1, 2;
    RETURN NULL;
END $$;

CREATE FUNCTION jobs_counted_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Most updates (leases, progress, publish marks) change no status: nothing to write.
    INSERT INTO job_count_changes (job_type, status, delta)
    SELECT job_type, status, sum(d) FROM (
        SELECT o.job_type, o.status, -1 AS d FROM old_rows o JOIN new_rows n USING (job_id)
        WHERE o.status <> n.status
        UNION ALL
        SELECT n.job_type, n.status, 1 FROM old_rows o JOIN new_rows n USING (job_id)
        WHERE o.status <> n.status) AS moved
    GROUP BY 1, 2;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION jobs_counted_insert();
CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION jobs_counted_delete();
CREATE TRIGGER jobs_counted_update AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_counted_update();

-- TRUNCATE fires no delete trigger: it empties the counts itself.
CREATE FUNCTION jobs_counted_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_counts;
    DELETE FROM job_count_changes;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_counted_truncate AFTER TRUNCATE ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_counted_truncate();

-- The jobs that exist now (this migration runs under a lock, in one transaction).
INSERT INTO job_counts (job_type, status, n)
SELECT job_type, status, count(*) FROM jobs GROUP BY 1, 2;

-- Retention: final jobs in the order they became final, for the sweeper's deletes.
CREATE INDEX jobs_final_by_age ON jobs (updated_at)
    WHERE status IN ('COMPLETED', 'CANCELLED', 'DEAD_LETTER');
