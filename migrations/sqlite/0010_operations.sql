-- Named operations and withdrawn work.
--
-- A dispatch intent with op 'call' runs the named operation `name` (with
-- its `args`) on the agent's broker and keeps what the broker answered in
-- `result` (or, when it failed, its reason in `error` and its
-- machine-readable word in `error_code`); lifecycle intents have no name. 'cancelled' is a final state of
-- intents and messages withdrawn before they were sent. A call without an
-- agent is addressed to the broker's runtime itself (broker-scoped).
--
-- SQLite cannot alter a CHECK constraint: both tables are rebuilt with the
-- same columns, indexes and rows.
CREATE TABLE dispatch_intents_new (
    id              BLOB PRIMARY KEY,
    broker_id       BLOB NOT NULL REFERENCES brokers (id),
    agent_id        BLOB REFERENCES agents (id) CHECK (agent_id IS NOT NULL OR op = 'call'),
    seq             INTEGER NOT NULL,
    op              TEXT NOT NULL
                    CHECK (op IN ('create', 'start', 'stop', 'restart', 'delete', 'call')),
    name            TEXT
                    CHECK ((op = 'call') = (name IS NOT NULL) AND length(name) BETWEEN 1 AND 64),
    args            TEXT NOT NULL DEFAULT '{}',
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'in_progress', 'done', 'failed', 'cancelled')),
    result          TEXT,
    error           TEXT,
    error_code      TEXT CHECK (length(error_code) <= 64),
    claimed_by      BLOB,
    claimed_at      TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    deadline        TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    request_digest  TEXT,
    ord             BIGINT NOT NULL DEFAULT 0,
    UNIQUE (agent_id, seq)
);
INSERT INTO dispatch_intents_new
    (id, broker_id, agent_id, seq, op, args, state, result, error, claimed_by, claimed_at,
     attempts, deadline, idempotency_key, created_at, updated_at, request_digest, ord)
SELECT id, broker_id, agent_id, seq, op, args, state, result, error, claimed_by, claimed_at,
       attempts, deadline, idempotency_key, created_at, updated_at, request_digest, ord
FROM dispatch_intents;
DROP TABLE dispatch_intents;
ALTER TABLE dispatch_intents_new RENAME TO dispatch_intents;
CREATE INDEX dispatch_intents_pending ON dispatch_intents (broker_id, agent_id, seq)
    WHERE state = 'pending';
CREATE INDEX dispatch_intents_in_progress ON dispatch_intents (claimed_by)
    WHERE state = 'in_progress';
CREATE INDEX dispatch_intents_pending_agent ON dispatch_intents (agent_id, seq)
    WHERE state = 'pending';
CREATE INDEX dispatch_intents_in_progress_agent ON dispatch_intents (agent_id, claimed_by)
    WHERE state = 'in_progress';

CREATE TABLE messages_new (
    id              BLOB PRIMARY KEY,
    agent_id        BLOB NOT NULL REFERENCES agents (id),
    broker_id       BLOB NOT NULL REFERENCES brokers (id),
    seq             INTEGER NOT NULL,
    body            TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'dispatched', 'delivered', 'expired', 'failed',
                                     'cancelled')),
    claimed_by      BLOB,
    claimed_at      TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    expires_at      TEXT NOT NULL,
    delivered_at    TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    request_digest  TEXT,
    error           TEXT,
    ord             BIGINT NOT NULL DEFAULT 0,
    UNIQUE (agent_id, seq)
);
INSERT INTO messages_new
    (id, agent_id, broker_id, seq, body, state, claimed_by, claimed_at, attempts,
     idempotency_key, expires_at, delivered_at, created_at, updated_at, request_digest, error, ord)
SELECT id, agent_id, broker_id, seq, body, state, claimed_by, claimed_at, attempts,
       idempotency_key, expires_at, delivered_at, created_at, updated_at, request_digest, error, ord
FROM messages;
DROP TABLE messages;
ALTER TABLE messages_new RENAME TO messages;
CREATE INDEX messages_pending ON messages (broker_id, agent_id, seq)
    WHERE state = 'pending';
CREATE INDEX messages_dispatched ON messages (claimed_by)
    WHERE state = 'dispatched';
CREATE INDEX messages_pending_agent ON messages (agent_id, seq) WHERE state = 'pending';
CREATE INDEX messages_dispatched_agent ON messages (agent_id, claimed_by)
    WHERE state = 'dispatched';
