-- The transport of each broker's latest session ('ws' or 'poll'). Work a
-- poll returned is leased: the sweeper sends it again when the broker has
-- not acknowledged it in time, which it does only for poll sessions.
ALTER TABLE brokers ADD COLUMN transport TEXT NOT NULL DEFAULT 'ws'
    CHECK (transport IN ('ws', 'poll'));
-- When the broker acknowledged receiving a dispatch it has not answered
-- yet (a message it has not acked yet). It counts only for the current
-- claim (received_at >= claimed_at): a poll sends again what was claimed
-- and not received.
ALTER TABLE dispatch_intents ADD COLUMN received_at TIMESTAMPTZ;
ALTER TABLE messages ADD COLUMN received_at TIMESTAMPTZ;
