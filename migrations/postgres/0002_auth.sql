-- Admin API tokens, stored as hex SHA-256 digests. Any replica sharing the
-- database accepts any stored token.
CREATE TABLE admin_tokens (
    token_hash TEXT PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Handshake nonces seen per broker, so a replayed handshake is refused on
-- every replica. Rows older than the allowed clock skew are pruned.
CREATE TABLE broker_nonces (
    broker_id UUID NOT NULL REFERENCES brokers (id) ON DELETE CASCADE,
    nonce     TEXT NOT NULL,
    seen_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (broker_id, nonce)
);
CREATE INDEX broker_nonces_seen_at ON broker_nonces (seen_at);
