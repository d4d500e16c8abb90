-- Why a schedule is paused: by whom, or what stopped it (its creator's token, a tick that
-- failed). Shown in the schedule document; cleared on resume.
ALTER TABLE schedules ADD COLUMN IF NOT EXISTS paused_reason text;
