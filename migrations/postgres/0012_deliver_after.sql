-- A message may be held until `deliver_after`; it holds back the later
-- messages (and operations) of its agent. The claim probes for such rows
-- through this index, which holds only delayed pending messages.
ALTER TABLE messages ADD COLUMN deliver_after TIMESTAMPTZ;
CREATE INDEX messages_delayed ON messages (agent_id, seq)
    WHERE state = 'pending' AND deliver_after IS NOT NULL;
