-- A job whose parents (depends_on) have not all completed waits in WAITING. A new enum
-- value cannot be used in the transaction that adds it: the tables using it come in 0008.
ALTER TYPE job_status ADD VALUE IF NOT EXISTS 'WAITING' BEFORE 'QUEUED';
