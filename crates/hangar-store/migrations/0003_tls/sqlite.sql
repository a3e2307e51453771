-- TLS for the proxies' ACME client (plane-api.md §7.9.3). Mirrored by migrations/postgres/0003_tls.sql.

-- The certificate lease of a cluster: the one proxy allowed to run an ACME order, until `expires_at`
-- (store clock). `txt_value` is the holder's ACME DNS-01 TXT value, served by the DNS responders.
CREATE TABLE cert_lease (
    cluster     TEXT PRIMARY KEY,
    leased_by   BIGINT NOT NULL REFERENCES node (id) ON DELETE CASCADE,
    leased_at   BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    txt_value   TEXT NULL
);

-- ACME HTTP-01 challenge answers of a cluster, served by every proxy of the cluster.
CREATE TABLE acme_http_challenge (
    cluster            TEXT NOT NULL,
    token              TEXT NOT NULL,
    key_authorization  TEXT NOT NULL,
    created_at         BIGINT NOT NULL,
    PRIMARY KEY (cluster, token)
);

CREATE INDEX acme_http_challenge_created_at ON acme_http_challenge (created_at);

-- The current certificate of a cluster, stored by a proxy and handed to every proxy of the cluster.
CREATE TABLE cluster_certificate (
    cluster    TEXT PRIMARY KEY,
    cert_pem   TEXT NOT NULL,
    key_pem    TEXT NOT NULL,
    stored_at  BIGINT NOT NULL,
    stored_by  BIGINT NULL REFERENCES node (id) ON DELETE SET NULL
);
