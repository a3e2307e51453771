-- Indexes for the dashboard's listing of the most recent backends (newest first, optionally of one
-- status), so that its LIMIT query reads only the rows it returns. Mirrors migrations/postgres/0004_recent_backends.sql.
CREATE INDEX backend_created ON backend (created_at, id);
CREATE INDEX backend_status_created ON backend (last_status, created_at, id);
