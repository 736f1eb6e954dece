-- The extension loads and lives in schema backup.
SELECT extname, extnamespace::regnamespace AS schema FROM pg_extension WHERE extname = 'pg_backup_ext';
SELECT backup.version() ~ '^\d+\.\d+\.\d+$' AS version_ok;
-- Dropping and recreating is clean.
DROP EXTENSION pg_backup_ext;
CREATE EXTENSION pg_backup_ext;
SELECT to_regproc('backup.job_create') IS NOT NULL AS functions_back, to_regclass('backup.backup_jobs') IS NOT NULL AS catalog_back;
