-- Labels on agents, and broadcasts: one message to every agent of a broker
-- or every agent whose labels contain a selector, written in one
-- transaction. `broadcasts` holds the broadcast's idempotency entry; each
-- agent's copy is an ordinary message pointing at it.
ALTER TABLE agents ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';

CREATE TABLE broadcasts (
    id              BLOB PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    request_digest  TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);
ALTER TABLE messages ADD COLUMN broadcast_id BLOB REFERENCES broadcasts (id);
CREATE INDEX messages_broadcast ON messages (broadcast_id) WHERE broadcast_id IS NOT NULL;
