-- One order per agent across operations and messages: every dispatch
-- intent and message takes the next `ord` from its agent's `work_seq`, and
-- a row is claimed only when no unfinished row of the other kind comes
-- before it (an operation is a barrier for the messages written after it,
-- and waits for the messages written before it). Rows written before this
-- migration share ord 0.
ALTER TABLE agents ADD COLUMN work_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN ord BIGINT NOT NULL DEFAULT 0;
ALTER TABLE dispatch_intents ADD COLUMN ord BIGINT NOT NULL DEFAULT 0;
