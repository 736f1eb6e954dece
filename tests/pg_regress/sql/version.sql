-- The extension loads and lives in schema backup.
SELECT extname, extnamespace::regnamespace AS schema FROM pg_extension WHERE extname = 'pg_backup_ext';
SELECT backup.version() ~ '^\d+\.\d+\.\d+$' AS version_ok;
-- Dropping and recreating is clean.
DROP EXTENSION pg_backup_ext;
CREATE EXTENSION pg_backup_ext;
SELECT count(*) FROM pg_proc WHERE pronamespace = 'backup'::regnamespace;
