-- Warm pools: backends kept started and unclaimed per (cluster, drone pool, executable), claimed by
-- connects. Mirrors sqlite.sql.
CREATE TABLE warm_pool (
    name             TEXT PRIMARY KEY,
    cluster          TEXT NOT NULL,
    pool             TEXT NOT NULL,
    size             INTEGER NOT NULL,
    executable       JSONB NOT NULL,
    max_age_seconds  INTEGER NULL,
    claim_path       TEXT NULL,
    -- Store time of the pool's creation or last change of cluster, pool or executable: unclaimed
    -- backends of an older generation are replaced.
    generation       BIGINT NOT NULL,
    -- Claims since the pool was created.
    claimed          BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL
);

-- An unclaimed warm backend has `warm_pool` set (and no key row); a claim clears it, after which the
-- backend is an ordinary one.
ALTER TABLE backend ADD COLUMN warm_pool TEXT NULL;
ALTER TABLE backend ADD COLUMN warm_generation BIGINT NULL;

CREATE INDEX backend_warm ON backend (warm_pool, created_at) WHERE warm_pool IS NOT NULL;
