-- The durable event log behind GET /v1/events: each committed fact a
-- replica published (agent phase changes, finished dispatches, brokers
-- online/offline, messages delivered/expired/failed), kept for the
-- retention period. Appends take one transaction-level advisory lock, so
-- ids become visible in id order and a reader resuming after an id never
-- skips one that commits later.
CREATE TABLE event_log (
    id         BIGSERIAL PRIMARY KEY,
    kind       TEXT NOT NULL,
    agent_id   UUID,
    data       TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- The highest id pruned so far: a client resuming from below it has
-- missed events that are gone.
CREATE TABLE event_log_horizon (
    one            BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    pruned_through BIGINT NOT NULL
);
INSERT INTO event_log_horizon (one, pruned_through) VALUES (TRUE, 0);
