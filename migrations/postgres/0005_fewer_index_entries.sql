-- Fewer index entries per message. A state change is never a HOT update
-- (`state` appears in partial-index predicates), so every index that holds
-- a row version gets an entry for it, and a message is written three times
-- (insert, claim, ack).
--
-- 1. Idempotency keys: most rows have none, and NULLs never conflicted; a
--    partial unique index holds only the rows that have one (the inserts
--    name it as their ON CONFLICT arbiter).
-- 2. Pending rows by broker: claims reach pending rows through the broker's
--    agents (`*_pending_agent`), and nothing else reads these.
ALTER TABLE messages DROP CONSTRAINT messages_idempotency_key_key;
CREATE UNIQUE INDEX messages_idempotency_key ON messages (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
ALTER TABLE dispatch_intents DROP CONSTRAINT dispatch_intents_idempotency_key_key;
CREATE UNIQUE INDEX dispatch_intents_idempotency_key ON dispatch_intents (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
DROP INDEX messages_pending;
DROP INDEX dispatch_intents_pending;
