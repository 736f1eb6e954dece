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

-- Cancelling: a queued run ends at once; an ended one cannot be cancelled.
SELECT backup.backup_cancel((SELECT max(execution_id) FROM backup.backup_executions));
SELECT status, error FROM backup.backup_executions ORDER BY execution_id;
SELECT backup.backup_cancel((SELECT max(execution_id) FROM backup.backup_executions));
SELECT backup.backup_cancel(999999);

-- (backup_run(wait => true) needs walshipper: see walshipper/tests/extension.rs.)
SELECT name, health FROM backup.job_status;

-- Differential and incremental backups can be requested too.
SELECT backup.backup_run(kind => 'incr') AS incr_id \gset
SELECT job, kind, status FROM backup.running_backups ORDER BY execution_id;
SELECT backup.backup_cancel(:incr_id);

-- Restore plans: clear reasons when the target is out of reach.
SELECT * FROM backup.restore_plan('2001-01-01 00:00+00'::timestamptz);
SELECT * FROM backup.restore_plan(now() + interval '1 day');
SELECT * FROM backup.restore_plan('no_such_point');

-- Restore plans know backup chains and expiry.
SELECT pg_get_function_result('backup.restore_plan(timestamptz, text)'::regprocedure);
SELECT pg_get_function_result('backup.restore_plan(text, text)'::regprocedure)
     = pg_get_function_result('backup.restore_plan(timestamptz, text)'::regprocedure) AS same_columns;
INSERT INTO backup.backup_executions (kind, status, queued_at, started_at, finished_at, backup_id, summary, expired_at)
VALUES ('full', 'succeeded', '2026-01-05 02:00+00', '2026-01-05 02:00+00', '2026-01-05 02:10+00', '20260105-020000F',
        '{"type": "full", "stop_time": "2026-01-05T02:10:00Z", "chain": ["20260105-020000F"]}', '2026-01-20 03:00+00'),
       ('full', 'succeeded', '2026-01-12 02:00+00', '2026-01-12 02:00+00', '2026-01-12 02:10+00', '20260112-020000F',
        '{"type": "full", "stop_time": "2026-01-12T02:10:00Z", "chain": ["20260112-020000F"]}', NULL),
       ('incr', 'succeeded', '2026-01-13 02:00+00', '2026-01-13 02:00+00', '2026-01-13 02:05+00', '20260113-020000I',
        '{"type": "incr", "requested_type": "incr", "based_on": "20260112-020000F", "stop_time": "2026-01-13T02:05:00Z",
          "chain": ["20260112-020000F", "20260113-020000I"]}', NULL);
SELECT backup_id, type, requested_type, based_on, chain, stop_time FROM backup.backups;
SELECT * FROM backup.restore_plan('2026-01-08 00:00+00'::timestamptz);
-- The incr is found (this cluster does not archive, so the plan stops at the WAL check).
SELECT * FROM backup.restore_plan('2026-01-14 00:00+00'::timestamptz);

-- The views answer without a scheduler.
SELECT rpo_target FROM backup.wal_archive_status;
SELECT count(*) FROM backup.alerts;

-- Leave the catalog empty for the next test file.
TRUNCATE backup.backup_executions, backup.backup_jobs, backup.restore_points, backup.alerts, backup.audit_log RESTART IDENTITY CASCADE;
