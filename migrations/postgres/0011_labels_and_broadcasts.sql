-- Labels on agents, and broadcasts: one message to every agent of a broker
-- or every agent whose labels contain a selector, written in one
-- transaction. `broadcasts` holds the broadcast's idempotency entry; each
-- agent's copy is an ordinary message pointing at it.
ALTER TABLE agents ADD COLUMN labels JSONB NOT NULL DEFAULT '{}'::jsonb;
CREATE INDEX agents_labels ON agents USING gin (labels jsonb_path_ops);

CREATE TABLE broadcasts (
    id              UUID PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    request_digest  TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
ALTER TABLE messages ADD COLUMN broadcast_id UUID REFERENCES broadcasts (id);
CREATE INDEX messages_broadcast ON messages (broadcast_id) WHERE broadcast_id IS NOT NULL;
