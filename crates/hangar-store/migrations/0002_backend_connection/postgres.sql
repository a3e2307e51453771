-- Proxies' reports of open connections to a backend: a ready backend is not idle while any report
-- is unexpired. One row per (backend, proxy); a proxy withdraws its row when its last connection closes.
CREATE TABLE backend_connection (
    backend_id      TEXT NOT NULL REFERENCES backend (id) ON DELETE CASCADE,
    proxy_id        BIGINT NOT NULL REFERENCES node (id) ON DELETE CASCADE,
    connected_until BIGINT NOT NULL,
    PRIMARY KEY (backend_id, proxy_id)
);
