-- Named operations and withdrawn work.
--
-- A dispatch intent with op 'call' runs the named operation `name` (with
-- its `args`) on the agent's broker and keeps what the broker answered in
-- `result` (or, when it failed, its reason in `error` and its
-- machine-readable word in `error_code`); lifecycle intents have no name. 'cancelled' is a final state of
-- intents and messages withdrawn before they were sent. A call without an
-- agent is addressed to the broker's runtime itself (broker-scoped).
ALTER TABLE dispatch_intents
    ALTER COLUMN agent_id DROP NOT NULL,
    ADD CONSTRAINT dispatch_intents_agent_check CHECK (agent_id IS NOT NULL OR op = 'call'),
    DROP CONSTRAINT dispatch_intents_op_check,
    DROP CONSTRAINT dispatch_intents_state_check,
    ADD COLUMN name TEXT,
    ADD COLUMN error_code TEXT CHECK (length(error_code) <= 64),
    ADD CONSTRAINT dispatch_intents_op_check
        CHECK (op IN ('create', 'start', 'stop', 'restart', 'delete', 'call')),
    ADD CONSTRAINT dispatch_intents_state_check
        CHECK (state IN ('pending', 'in_progress', 'done', 'failed', 'cancelled')),
    ADD CONSTRAINT dispatch_intents_name_check
        CHECK ((op = 'call') = (name IS NOT NULL) AND length(name) BETWEEN 1 AND 64);
ALTER TABLE messages
    DROP CONSTRAINT messages_state_check,
    ADD CONSTRAINT messages_state_check
        CHECK (state IN ('pending', 'dispatched', 'delivered', 'expired', 'failed', 'cancelled'));
