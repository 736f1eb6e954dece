-- Backup requests, cancellation, restore plans and status views (no walshipper needed).
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT backup.job_create('nightly_runs', '30 2 * * *');

-- A queued request, and a second one for the same job is refused.
SELECT backup.backup_run('nightly_runs') > 0 AS queued;
SELECT job, kind, status FROM backup.running_backups;
SELECT backup.backup_run('nightly_runs');
SELECT backup.backup_run('no_such_job');
SELECT backup.backup_run(kind => 'weekly');
SELECT backup.backup_run(kind => 'incr');

-- Cancelling: a queued run ends at once; an ended one cannot be cancelled.
SELECT backup.backup_cancel((SELECT max(execution_id) FROM backup.backup_executions));
SELECT status, error FROM backup.backup_executions ORDER BY execution_id;
SELECT backup.backup_cancel((SELECT max(execution_id) FROM backup.backup_executions));
SELECT backup.backup_cancel(999999);

-- (backup_run(wait => true) needs walshipper: see walshipper/tests/extension.rs.)
SELECT name, health FROM backup.job_status;

-- Restore plans: clear reasons when the target is out of reach.
SELECT * FROM backup.restore_plan('2001-01-01 00:00+00'::timestamptz);
SELECT * FROM backup.restore_plan(now() + interval '1 day');
SELECT * FROM backup.restore_plan('no_such_point');

-- The views answer without a scheduler.
SELECT rpo_target FROM backup.wal_archive_status;
SELECT count(*) FROM backup.alerts;
