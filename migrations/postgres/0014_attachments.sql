-- Files sent with a message. The bytes live in the database, in chunks of
-- at most 1 MiB, so every replica can serve them without a shared disk and
-- neither side ever holds more than a chunk of one in memory. A message's
-- files go with it: written in its transaction, deleted once it is final
-- (delivered, expired, failed or cancelled) or pruned.
ALTER TABLE messages ADD COLUMN attachments INTEGER NOT NULL DEFAULT 0;
CREATE TABLE attachments (
    id          UUID PRIMARY KEY,
    message_id  UUID NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    broker_id   UUID NOT NULL,
    position    INTEGER NOT NULL,
    name        TEXT NOT NULL,
    size        BIGINT NOT NULL CHECK (size >= 0),
    sha256      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX attachments_message ON attachments (message_id, position);
CREATE TABLE attachment_chunks (
    attachment_id UUID NOT NULL REFERENCES attachments (id) ON DELETE CASCADE,
    n             INTEGER NOT NULL,
    data          BYTEA NOT NULL,
    PRIMARY KEY (attachment_id, n)
);
