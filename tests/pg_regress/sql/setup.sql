CREATE EXTENSION pg_backup_ext;
