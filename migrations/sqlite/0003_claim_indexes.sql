-- Indexes for the per-agent checks of a claim: "does this agent have
-- pending rows" and "does it have rows in flight". Without them both scan
-- every row of the agent, which grows with the backlog.
CREATE INDEX messages_pending_agent ON messages (agent_id, seq) WHERE state = 'pending';
CREATE INDEX messages_dispatched_agent ON messages (agent_id) WHERE state = 'dispatched';
CREATE INDEX dispatch_intents_pending_agent ON dispatch_intents (agent_id, seq)
    WHERE state = 'pending';
CREATE INDEX dispatch_intents_in_progress_agent ON dispatch_intents (agent_id)
    WHERE state = 'in_progress';
