-- The durable event log behind GET /v1/events: each committed fact the
-- replica published (agent phase changes, finished dispatches, brokers
-- online/offline, messages delivered/expired/failed), kept for the
-- retention period. AUTOINCREMENT: an id is never reused after pruning,
-- so a client's Last-Event-ID never names a different event.
CREATE TABLE event_log (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,
    agent_id   BLOB,
    data       TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);
-- The highest id pruned so far: a client resuming from below it has
-- missed events that are gone.
CREATE TABLE event_log_horizon (
    one            INTEGER PRIMARY KEY DEFAULT 1 CHECK (one = 1),
    pruned_through INTEGER NOT NULL
);
INSERT INTO event_log_horizon (one, pruned_through) VALUES (1, 0);
