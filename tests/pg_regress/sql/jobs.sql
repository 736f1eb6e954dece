-- Job management: creation, validation errors with hints, alter, enable, drop, audit.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT backup.job_create('nightly', '30 2 * * *') AS job_id \gset
SELECT name, kind, schedule, timezone, active FROM backup.backup_jobs ORDER BY name;

-- Bad input: each error says what is wrong and what to do.
SELECT backup.job_create('nightly', '0 3 * * *');
SELECT backup.job_create('bad name!', '0 3 * * *');
SELECT backup.job_create('hourly', '0 * * *');
SELECT backup.job_create('hourly', '61 * * * *');
SELECT backup.job_create('hourly', '0 * * * *', timezone => 'Mars/Olympus');
SELECT backup.job_create('hourly', '0 * * * *', kind => 'weekly');
SELECT backup.job_create('hourly', '0 * * * *', retention_full_count => 0);
SELECT backup.job_create('twin', '30 2 * * *');
SELECT backup.job_create('berlin', '30 2 * * *', timezone => 'Europe/Berlin');

-- Next runs, evaluated in each job's time zone.
SELECT name, backup.cron_next(schedule, timezone, '2026-11-21 10:00:00+00') AT TIME ZONE 'UTC' AS next_utc
  FROM backup.backup_jobs ORDER BY name;

-- Alter, disable, enable, drop.
SELECT backup.job_alter('nightly', schedule => '45 1 * * *', retention_full_count => 7);
SELECT name, schedule, retention_full_count FROM backup.backup_jobs WHERE name = 'nightly';
SELECT backup.job_alter('missing', schedule => '0 1 * * *');
SELECT backup.job_alter('berlin', schedule => 'not a schedule');
SELECT backup.job_enable('berlin', false);
SELECT backup.job_create('twin', '30 2 * * *', timezone => 'Europe/Berlin');
SELECT backup.job_enable('berlin', true);
SELECT backup.job_drop('twin');
SELECT backup.job_drop('twin');
SELECT action, object_type, object_name FROM backup.audit_log ORDER BY audit_id;

-- The catalog keeps executions sane.
\set VERBOSITY terse
INSERT INTO backup.backup_executions (kind, status) VALUES ('full', 'failed');
INSERT INTO backup.backup_executions (kind, status, job_id) VALUES ('full', 'queued', :job_id);
INSERT INTO backup.backup_executions (kind, status, job_id) VALUES ('full', 'queued', :job_id);

\set VERBOSITY default
-- Restore points are recorded with their LSN.
SELECT backup.restore_point_create('before_release', 'v2 deploy') IS NOT NULL AS created;
SELECT name, note, lsn <= pg_current_wal_lsn() AS lsn_ok FROM backup.restore_points;
SELECT backup.restore_point_create('before_release');
-- Names with control characters or backslashes are refused: a name goes
-- into postgresql.auto.conf and into shell commands.
SELECT backup.restore_point_create(E'x\\''\nshared_preload_libraries = ''evil''');
SELECT backup.restore_point_create(E'back\\slash');

-- Only the owner and those granted may act.
CREATE ROLE pgb_nobody;
SET ROLE pgb_nobody;
SELECT backup.job_create('sneaky', '0 1 * * *');
SELECT count(*) FROM backup.backup_jobs;
RESET ROLE;
DROP ROLE pgb_nobody;
-- Differential and incremental jobs, and retention: expiry after each backup
-- applies the retention of the backup's job to the whole repository.
SELECT backup.job_create('hourly_incr', '0 * * * *', kind => 'incr', retention_full_count => 7) > 0 AS created;
SELECT backup.job_create('weekly_full', '0 3 * * 0', timezone => 'Europe/Berlin', retention_full_count => 4,
                         retention_window => '14 days', retention_keep_daily => 7, retention_keep_weekly => 4,
                         retention_keep_monthly => 12, retention_keep_yearly => 3) > 0 AS created;
SELECT name, kind, retention_full_count AS full, retention_window AS window, retention_keep_daily AS daily,
       retention_keep_weekly AS weekly, retention_keep_monthly AS monthly, retention_keep_yearly AS yearly
  FROM backup.backup_jobs WHERE name IN ('hourly_incr', 'weekly_full') ORDER BY name;
SELECT backup.job_create('bad_gfs', '0 4 * * *', retention_keep_weekly => -1);
SELECT backup.job_create('keeps_nothing', '0 4 * * *', retention_keep_daily => 0);
-- A full job's recovery window must cover the time between its backups.
SELECT backup.job_create('short_window', '0 3 * * 6', retention_window => '1 day');
SELECT backup.job_create('workdays', '0 2 * * 1-5', retention_window => '1 day');
SELECT backup.job_alter('weekly_full', retention_window => '3 days');
SELECT backup.job_alter('weekly_full', retention_keep_weekly => 8);
SELECT retention_window, retention_keep_weekly FROM backup.backup_jobs WHERE name = 'weekly_full';
SELECT backup.job_create('monthly_full', '0 4 1 * *', retention_window => '1 mon', active => false) > 0 AS created;
SELECT backup.job_create('daily_diff', '0 5 * * *', kind => 'diff', retention_keep_daily => 0, retention_keep_weekly => 5,
                         active => false) > 0 AS created;
SELECT object_name, details->'retention' AS retention FROM backup.audit_log
 WHERE object_name IN ('hourly_incr', 'weekly_full', 'monthly_full') ORDER BY audit_id;

-- Leave the catalog empty for the next test file.
TRUNCATE backup.backup_executions, backup.backup_jobs, backup.restore_points, backup.alerts, backup.audit_log RESTART IDENTITY CASCADE;
