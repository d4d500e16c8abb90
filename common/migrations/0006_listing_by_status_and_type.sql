-- Listings filtered by status (and type) read one index range per (status, type) pair
-- (common.jobs.list_jobs), so a filter that matches nothing among a million finished jobs
-- costs a few index probes, not a scan of them all.
CREATE INDEX jobs_by_status_type ON jobs (status, job_type, created_at DESC, job_id DESC);
DROP INDEX jobs_by_status;
