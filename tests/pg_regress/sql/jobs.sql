-- Job management: creation, validation errors with hints, alter, enable, drop, audit.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT backup.job_create('nightly', '30 2 * * *') AS job_id \gset
SELECT name, kind, schedule, timezone, active, repository FROM backup.backup_jobs ORDER BY name;

-- Bad input: each error says what is wrong and what to do.
SELECT backup.job_create('nightly', '0 3 * * *');
SELECT backup.job_create('bad name!', '0 3 * * *');
SELECT backup.job_create('hourly', '0 * * *');
SELECT backup.job_create('hourly', '61 * * * *');
SELECT backup.job_create('hourly', '0 * * * *', timezone => 'Mars/Olympus');
SELECT backup.job_create('hourly', '0 * * * *', kind => 'weekly');
SELECT backup.job_create('hourly', '0 * * * *', repository => 'no such repo');
SELECT backup.job_create('twin', '30 2 * * *');
SELECT backup.job_create('berlin', '30 2 * * *', timezone => 'Europe/Berlin');

-- Next runs, evaluated in each job's time zone.
SELECT name, backup.cron_next(schedule, timezone, '2026-11-21 10:00:00+00') AT TIME ZONE 'UTC' AS next_utc
  FROM backup.backup_jobs ORDER BY name;

-- Alter (a job names the repository it backs up to), disable, enable, drop.
SELECT backup.job_alter('nightly', schedule => '45 1 * * *', repository => 'offsite');
SELECT name, schedule, repository FROM backup.backup_jobs WHERE name = 'nightly';
SELECT backup.job_alter('missing', schedule => '0 1 * * *');
SELECT backup.job_alter('berlin', schedule => 'not a schedule');
SELECT backup.job_enable('berlin', false);
SELECT backup.job_create('twin', '30 2 * * *', timezone => 'Europe/Berlin');
SELECT backup.job_enable('berlin', true);
SELECT backup.job_drop('twin');
SELECT backup.job_drop('twin');
SELECT actor = current_user AS by_me, action, object_type, object_name FROM backup.audit_log ORDER BY audit_id;

-- The catalog keeps executions sane.
\set VERBOSITY terse
INSERT INTO backup.backup_executions (kind, status) VALUES ('full', 'failed');
INSERT INTO backup.backup_executions (kind, status, job_id) VALUES ('full', 'queued', :job_id);
INSERT INTO backup.backup_executions (kind, status, job_id) VALUES ('full', 'queued', :job_id);
INSERT INTO backup.backup_executions (kind, status, finished_at, backup_id) VALUES ('full', 'succeeded', now(), '20260101-000000F; rm -rf /');

\set VERBOSITY default
-- Restore points are recorded with their LSN.
SELECT backup.restore_point_create('before_release', 'v2 deploy') IS NOT NULL AS created;
SELECT name, note, lsn <= pg_current_wal_lsn() AS lsn_ok FROM backup.restore_points;
SELECT backup.restore_point_create('before_release');
-- A name goes into postgresql.auto.conf and into shell commands: only
-- letters, digits and _ . : - are accepted.
SELECT backup.restore_point_create(E'x\\''\nshared_preload_libraries = ''evil''');
SELECT backup.restore_point_create(E'back\\slash');
SELECT backup.restore_point_create('two words');
SELECT backup.restore_point_create('x'';touch /tmp/pwned;''');
SELECT backup.restore_point_create('$(id)');
SELECT backup.restore_point_create(repeat('a', 64));
SELECT backup.restore_point_create('release-2.4:rc1') IS NOT NULL AS created;
-- In the WAL each point has a name of its own (a random suffix): one made
-- in a transaction that rolled back stays in the WAL, but is never the
-- target of the point made later under the same name.
BEGIN;
SELECT backup.restore_point_create('rolled_back') IS NOT NULL AS created;
ROLLBACK;
SELECT count(*) AS recorded FROM backup.restore_points WHERE name = 'rolled_back';
SELECT backup.restore_point_create('rolled_back') IS NOT NULL AS created_again;
SELECT name, wal_name ~ ('^' || replace(name, '.', '\.') || '-[0-9a-f]{12}$') AS wal_name_ok
  FROM backup.restore_points ORDER BY name;
SELECT backup.restore_point_create(repeat('b', 48)) IS NOT NULL AS longest_name;

-- Differential and incremental jobs; retention is the repository's, not the job's.
SELECT backup.job_create('hourly_incr', '0 * * * *', kind => 'incr') > 0 AS created;
SELECT object_name, details FROM backup.audit_log WHERE object_name IN ('hourly_incr', 'nightly') ORDER BY audit_id;

-- Leave the catalog empty for the next test file (a superuser may).
TRUNCATE backup.backup_executions, backup.backup_jobs, backup.restore_points, backup.alerts, backup.audit_log RESTART IDENTITY CASCADE;
