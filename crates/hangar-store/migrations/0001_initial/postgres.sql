-- Hangar store schema (PostgreSQL). Mirrors migrations/sqlite/0001_initial.sql table for table: every
-- time is BIGINT milliseconds of the store clock, JSON is JSONB, and SQLite's `INTEGER PRIMARY KEY` is
-- `BIGINT GENERATED ALWAYS AS IDENTITY`. Constraints whose violation the store maps to an outcome are
-- named explicitly (see src/postgres/backends.rs).

-- The store clock: the database server's clock in milliseconds, plus an offset that is always 0 except
-- in the store test suite (which moves the clock with it). `now()` is the start of the transaction, so
-- every statement of one transaction sees the same time.
CREATE FUNCTION hangar_now_ms(offset_ms BIGINT) RETURNS BIGINT
    LANGUAGE sql STABLE
    AS $$ SELECT floor(extract(epoch FROM now()) * 1000)::BIGINT + offset_ms $$;

-- Self-reported controller liveness.
CREATE TABLE controller (
    name            TEXT PRIMARY KEY,
    first_seen      BIGINT NOT NULL,
    last_heartbeat  BIGINT NOT NULL,
    is_online       BOOLEAN NOT NULL
);

-- Drones and proxies. `controller` is the controller holding the node's current session (NULL =
-- detached); `session` counts registrations so that a stale session cannot detach a newer one.
CREATE TABLE node (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('drone', 'proxy')),
    cluster       TEXT NOT NULL,
    name          TEXT NOT NULL,
    version       TEXT NOT NULL,
    controller    TEXT NULL,
    session       BIGINT NOT NULL,
    connected_at  BIGINT NOT NULL,
    UNIQUE (cluster, name, kind)
);

-- Scheduling data of a drone (1:1 with its node row). `draining` survives reconnects.
CREATE TABLE drone (
    id               BIGINT PRIMARY KEY REFERENCES node (id),
    pool             TEXT NOT NULL DEFAULT '',
    draining         BOOLEAN NOT NULL DEFAULT FALSE,
    last_heartbeat   BIGINT NULL,
    last_local_time  BIGINT NULL
);

CREATE INDEX drone_last_heartbeat ON drone (last_heartbeat);

-- Executors a drone offers (from its latest registration).
CREATE TABLE drone_executor (
    drone_id  BIGINT NOT NULL REFERENCES drone (id),
    executor  TEXT NOT NULL,
    PRIMARY KEY (drone_id, executor)
);

-- One row per backend, kept after termination until cleanup. The key config is copied here because the
-- key row is deleted when the backend terminates.
CREATE TABLE backend (
    id                      TEXT NOT NULL,
    cluster                 TEXT NOT NULL,
    pool                    TEXT NOT NULL,
    drone_id                BIGINT NOT NULL REFERENCES drone (id),
    key_namespace           TEXT NOT NULL,
    key_name                TEXT NOT NULL,
    key_tag                 TEXT NOT NULL,
    fencing_token           BIGINT NOT NULL,
    last_status             TEXT NOT NULL,
    last_status_number      INTEGER NOT NULL,
    last_status_time        BIGINT NOT NULL,
    state                   JSONB NOT NULL,
    cluster_address         TEXT NULL,
    static_token            TEXT NULL UNIQUE,
    subdomain               TEXT NULL,
    created_at              BIGINT NOT NULL,
    max_idle_seconds        INTEGER NULL,
    lifetime_limit_seconds  INTEGER NULL,
    expiration_time         BIGINT NULL,
    last_keepalive          BIGINT NOT NULL,
    terminate_requested_at  BIGINT NULL,
    CONSTRAINT backend_id_unique PRIMARY KEY (id)
);

CREATE INDEX backend_drone_live ON backend (drone_id) WHERE last_status_number < 70;
CREATE INDEX backend_terminated ON backend (last_status_time) WHERE last_status_number = 70;

-- Key leases. The unique (namespace, name) is what guarantees at most one live backend per key.
CREATE TABLE backend_key (
    backend_id     TEXT PRIMARY KEY REFERENCES backend (id),
    namespace      TEXT NOT NULL,
    name           TEXT NOT NULL,
    tag            TEXT NOT NULL,
    expires_at     BIGINT NOT NULL,
    fencing_token  BIGINT NOT NULL,
    allow_renew    BOOLEAN NOT NULL DEFAULT TRUE,
    CONSTRAINT backend_key_single_holder UNIQUE (namespace, name)
);

-- Last fencing token handed out per key; survives key release so tokens keep increasing even if the
-- clock goes backwards. Its row lock also serializes concurrent acquisitions of one key.
CREATE TABLE key_fencing (
    namespace   TEXT NOT NULL,
    name        TEXT NOT NULL,
    last_token  BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);

-- State history, in insertion order (`id`).
CREATE TABLE backend_state (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    backend_id  TEXT NOT NULL REFERENCES backend (id),
    state       JSONB NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE INDEX backend_state_backend ON backend_state (backend_id, id);

-- Actions queued for drones; `seq` orders them, `acked_at` is set when the drone acknowledges.
CREATE TABLE backend_action (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    action_id   TEXT NOT NULL UNIQUE,
    backend_id  TEXT NOT NULL REFERENCES backend (id),
    drone_id    BIGINT NOT NULL REFERENCES drone (id),
    action      JSONB NOT NULL,
    created_at  BIGINT NOT NULL,
    acked_at    BIGINT NULL
);

CREATE INDEX backend_action_pending ON backend_action (drone_id, seq) WHERE acked_at IS NULL;
CREATE INDEX backend_action_backend ON backend_action (backend_id);

-- Dynamic connection tokens (static tokens live on the backend row).
CREATE TABLE token (
    token       TEXT PRIMARY KEY,
    backend_id  TEXT NOT NULL REFERENCES backend (id),
    secret      TEXT NOT NULL,
    username    TEXT NULL,
    auth        JSONB NOT NULL,
    expires_at  BIGINT NOT NULL
);

CREATE INDEX token_backend_user ON token (backend_id, username);
CREATE INDEX token_expires_at ON token (expires_at);
