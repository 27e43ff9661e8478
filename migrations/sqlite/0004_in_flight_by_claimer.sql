-- A claim's head-of-line probe asks "does this agent have a row in flight
-- at *another* claimer?". Indexed on (agent_id) alone, the probe walks every
-- row the claimer itself has in flight (hundreds while it pipelines) before
-- it can answer; on (agent_id, claimed_by) it is a few short range probes
-- (claimed_by below, above, or missing).
DROP INDEX messages_dispatched_agent;
CREATE INDEX messages_dispatched_agent ON messages (agent_id, claimed_by)
    WHERE state = 'dispatched';
DROP INDEX dispatch_intents_in_progress_agent;
CREATE INDEX dispatch_intents_in_progress_agent ON dispatch_intents (agent_id, claimed_by)
    WHERE state = 'in_progress';
