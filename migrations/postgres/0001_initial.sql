-- Switchyard schema, PostgreSQL flavour. The SQLite flavour in
-- migrations/sqlite/0001_initial.sql must describe the same tables.

-- One row per running hub replica. A replica whose last_seen is older than
-- the liveness window is dead; live replicas reap it and release its
-- brokers' affinities.
CREATE TABLE replicas (
    instance_id UUID PRIMARY KEY,
    address     TEXT NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Affinity lives on the broker row: (connected_replica, session_id) is
-- written by a compare-and-swap claim and cleared only by a
-- compare-and-clear on the same pair.
CREATE TABLE brokers (
    id                UUID PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    secret_hash       TEXT NOT NULL,
    status            TEXT NOT NULL DEFAULT 'offline'
                      CHECK (status IN ('online', 'offline')),
    connected_replica UUID,
    session_id        UUID,
    connected_at      TIMESTAMPTZ,
    last_heartbeat    TIMESTAMPTZ,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((status = 'online') = (session_id IS NOT NULL)),
    CHECK ((connected_replica IS NULL) = (session_id IS NULL))
);

-- message_seq and intent_seq are per-agent counters. Writers bump them
-- under the agent's row lock, so within one agent the sequence order is
-- also the commit order: a claimer never sees seq n+1 before seq n.
CREATE TABLE agents (
    id          UUID PRIMARY KEY,
    name        TEXT NOT NULL,
    broker_id   UUID NOT NULL REFERENCES brokers (id),
    command     JSONB NOT NULL,
    env         JSONB NOT NULL DEFAULT '{}'::jsonb,
    phase       TEXT NOT NULL DEFAULT 'created'
                CHECK (phase IN ('created', 'starting', 'running', 'stopping',
                                 'stopped', 'error', 'deleted')),
    status_seq  BIGINT NOT NULL DEFAULT 0,
    message_seq BIGINT NOT NULL DEFAULT 0,
    intent_seq  BIGINT NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- A deleted agent's name may be reused.
CREATE UNIQUE INDEX agents_live_name ON agents (name) WHERE phase <> 'deleted';
CREATE INDEX agents_broker ON agents (broker_id);

CREATE TABLE dispatch_intents (
    id              UUID PRIMARY KEY,
    broker_id       UUID NOT NULL REFERENCES brokers (id),
    agent_id        UUID NOT NULL REFERENCES agents (id),
    seq             BIGINT NOT NULL,
    op              TEXT NOT NULL
                    CHECK (op IN ('create', 'start', 'stop', 'restart', 'delete')),
    args            JSONB NOT NULL DEFAULT '{}'::jsonb,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'in_progress', 'done', 'failed')),
    result          JSONB,
    error           TEXT,
    claimed_by      UUID,
    claimed_at      TIMESTAMPTZ,
    attempts        INTEGER NOT NULL DEFAULT 0,
    deadline        TIMESTAMPTZ NOT NULL,
    idempotency_key TEXT UNIQUE,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (agent_id, seq)
);
-- "Pending work of these brokers", in per-agent order.
CREATE INDEX dispatch_intents_pending ON dispatch_intents (broker_id, agent_id, seq)
    WHERE state = 'pending';
CREATE INDEX dispatch_intents_in_progress ON dispatch_intents (claimed_by)
    WHERE state = 'in_progress';

CREATE TABLE messages (
    id              UUID PRIMARY KEY,
    agent_id        UUID NOT NULL REFERENCES agents (id),
    broker_id       UUID NOT NULL REFERENCES brokers (id),
    seq             BIGINT NOT NULL,
    body            JSONB NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'dispatched', 'delivered', 'expired', 'failed')),
    claimed_by      UUID,
    claimed_at      TIMESTAMPTZ,
    attempts        INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    expires_at      TIMESTAMPTZ NOT NULL,
    delivered_at    TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (agent_id, seq)
);
CREATE INDEX messages_pending ON messages (broker_id, agent_id, seq)
    WHERE state = 'pending';
CREATE INDEX messages_dispatched ON messages (claimed_by)
    WHERE state = 'dispatched';
