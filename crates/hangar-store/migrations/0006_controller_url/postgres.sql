-- The address at which a controller serves the other controllers of its store (issue 15: a log
-- request reaching a controller that does not hold the drone's session is forwarded to the one that
-- does). NULL for controllers that never announced one. Mirrors sqlite.sql beside it.
ALTER TABLE controller ADD COLUMN internal_url TEXT NULL;
