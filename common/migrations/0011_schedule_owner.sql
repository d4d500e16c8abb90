-- The token that created a schedule: each tick checks it still exists, has not expired and
-- still has the scopes the schedule needs, else the schedule is paused (a revoked token's
-- schedules stop). NULL when created with authentication off.
ALTER TABLE schedules ADD COLUMN IF NOT EXISTS created_by_token uuid;
