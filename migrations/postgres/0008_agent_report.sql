-- What an agent last reported beside its phase: the exit code of its
-- process and the broker's detail, so an operator can see why an agent is
-- in `error`.
ALTER TABLE agents ADD COLUMN exit_code INTEGER;
ALTER TABLE agents ADD COLUMN detail TEXT;
