-- Switchyard schema, SQLite flavour. The PostgreSQL flavour in
-- migrations/postgres/0001_initial.sql must describe the same tables.

-- One row per running hub replica. A replica whose last_seen is older than
-- the liveness window is dead; live replicas reap it and release its
-- brokers' affinities.
CREATE TABLE replicas (
    instance_id BLOB PRIMARY KEY,
    address     TEXT NOT NULL,
    started_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    last_seen   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);

-- Affinity lives on the broker row: (connected_replica, session_id) is
-- written by a compare-and-swap claim and cleared only by a
-- compare-and-clear on the same pair.
CREATE TABLE brokers (
    id                BLOB PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    secret_hash       TEXT NOT NULL,
    status            TEXT NOT NULL DEFAULT 'offline'
                      CHECK (status IN ('online', 'offline')),
    connected_replica BLOB,
    session_id        BLOB,
    connected_at      TEXT,
    last_heartbeat    TEXT,
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    updated_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    CHECK ((status = 'online') = (session_id IS NOT NULL)),
    CHECK ((connected_replica IS NULL) = (session_id IS NULL))
);

-- message_seq and intent_seq are per-agent counters. Writers bump them
-- under the agent's row lock, so within one agent the sequence order is
-- also the commit order: a claimer never sees seq n+1 before seq n.
CREATE TABLE agents (
    id          BLOB PRIMARY KEY,
    name        TEXT NOT NULL,
    broker_id   BLOB NOT NULL REFERENCES brokers (id),
    command     TEXT NOT NULL,
    env         TEXT NOT NULL DEFAULT '{}',
    phase       TEXT NOT NULL DEFAULT 'created'
                CHECK (phase IN ('created', 'starting', 'running', 'stopping',
                                 'stopped', 'error', 'deleted')),
    status_seq  INTEGER NOT NULL DEFAULT 0,
    message_seq INTEGER NOT NULL DEFAULT 0,
    intent_seq  INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);
-- A deleted agent's name may be reused.
CREATE UNIQUE INDEX agents_live_name ON agents (name) WHERE phase <> 'deleted';
CREATE INDEX agents_broker ON agents (broker_id);

CREATE TABLE dispatch_intents (
    id              BLOB PRIMARY KEY,
    broker_id       BLOB NOT NULL REFERENCES brokers (id),
    agent_id        BLOB NOT NULL REFERENCES agents (id),
    seq             INTEGER NOT NULL,
    op              TEXT NOT NULL
                    CHECK (op IN ('create', 'start', 'stop', 'restart', 'delete')),
    args            TEXT NOT NULL DEFAULT '{}',
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'in_progress', 'done', 'failed')),
    result          TEXT,
    error           TEXT,
    claimed_by      BLOB,
    claimed_at      TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    deadline        TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    UNIQUE (agent_id, seq)
);
-- "Pending work of these brokers", in per-agent order.
CREATE INDEX dispatch_intents_pending ON dispatch_intents (broker_id, agent_id, seq)
    WHERE state = 'pending';
CREATE INDEX dispatch_intents_in_progress ON dispatch_intents (claimed_by)
    WHERE state = 'in_progress';

CREATE TABLE messages (
    id              BLOB PRIMARY KEY,
    agent_id        BLOB NOT NULL REFERENCES agents (id),
    broker_id       BLOB NOT NULL REFERENCES brokers (id),
    seq             INTEGER NOT NULL,
    body            TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'dispatched', 'delivered', 'expired', 'failed')),
    claimed_by      BLOB,
    claimed_at      TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    expires_at      TEXT NOT NULL,
    delivered_at    TEXT,
    created_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    updated_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    UNIQUE (agent_id, seq)
);
CREATE INDEX messages_pending ON messages (broker_id, agent_id, seq)
    WHERE state = 'pending';
CREATE INDEX messages_dispatched ON messages (claimed_by)
    WHERE state = 'dispatched';
