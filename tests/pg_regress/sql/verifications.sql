-- Verifications and restore tests: the API's errors, job kinds, what the
-- scheduler starts (walshipper's argument vector), how results, alerts
-- and the recovery objectives are recorded (no walshipper needed: results
-- are fed as walshipper prints them; end to end: walshipper/tests/extension.rs).
\set VERBOSITY default
\set SHOW_CONTEXT never

-- Job kinds: a monthly restore test is one call; a weekly read-back another.
SELECT backup.job_create('monthly-test', '0 3 1 * *', kind => 'restore_test') > 0 AS created;
SELECT backup.job_create('weekly-verify', '0 5 * * 0', kind => 'verify') > 0 AS created;
SELECT backup.backup_run('monthly-test');
SELECT backup.job_create('other-test', '0 3 1 * *', kind => 'restore_test');

-- The DBA's checks: for every restore test, or one job's.
SELECT backup.restore_check_create('orders', 'SELECT count(*) > 0 FROM orders', 't', database => 'shop') > 0 AS created;
SELECT backup.restore_check_create('monthly_only', 'SELECT 1', '1', job_name => 'monthly-test') > 0 AS created;
SELECT backup.restore_check_create('orders', 'SELECT 1', '1');
SELECT backup.restore_check_create('bad name', 'SELECT 1', '1');
SELECT backup.restore_check_create('noquery', '', '1');
SELECT backup.restore_check_create('nojob', 'SELECT 1', '1', job_name => 'weekly-verify');
SELECT name, database, query, expected, job_id IS NOT NULL AS per_job FROM backup.restore_checks ORDER BY name;

-- A due restore_test job queues a restore test (and its recovery
-- operation), never a backup, and never two at once.
UPDATE backup.backup_jobs SET next_run_at = now() - interval '1 minute' WHERE name = 'monthly-test';
SELECT count(*) AS claimed_backups FROM backup._sched_claim(1);
UPDATE backup.backup_jobs SET next_run_at = now() - interval '1 minute' WHERE name = 'monthly-test';
SELECT count(*) AS claimed_backups FROM backup._sched_claim(1);
SELECT v.kind, v.status, v.requested_by, j.name AS job, o.kind AS operation, o.status AS operation_status
  FROM backup.backup_verifications v JOIN backup.backup_jobs j USING (job_id)
  LEFT JOIN backup.recovery_operations o USING (operation_id);
SELECT count(*) AS backups FROM backup.backup_executions;
SELECT name, kind, health FROM backup.job_status ORDER BY name;

-- The scheduler starts it: walshipper's arguments, with the checks. One at a time.
SELECT backup._sched_recovery_claim() - 'id';
SELECT backup._sched_recovery_claim() IS NULL AS nothing_more;
SELECT status, worker_pid = pg_backend_pid() AS mine FROM backup.backup_verifications;

-- Phases show on its recovery operation; a cancel reaches the scheduler.
SELECT backup._sched_recovery_progress('verification', 1, 'replay', 0, 0) AS cancel;
SELECT phase, status FROM backup.recovery_operations;
SELECT backup.verification_cancel(1);
SELECT backup._sched_recovery_progress('verification', 1, 'checks', 0, 0) AS cancel;

-- A failed restore test: the failing check named, an alert raised.
SELECT backup._sched_recovery_finish('verification', 1,
  '{"event":"restore_test","operation_id":"20261126T030001Z-0a1b2c3d","repository":"repo1","backup_id":"20261125-020000F",
    "target":{"kind":"end","value":null},"passed":false,"restore_s":40.5,"replay_s":12.25,"checks_s":3,"total_s":55.75,
    "recovered_lsn":"0/5000060","recovered_time":"2026-11-26 02:59:58+00",
    "checks":[{"name":"pg_verifybackup","passed":true,"detail":"backup successfully verified","duration_s":1},
              {"name":"pg_amcheck shop","passed":false,"detail":"heap table \"public.orders\", block 7: invalid line pointer","duration_s":2}],
    "error":"1 of 2 checks failed","server_log":"/var/tmp/rt/server.log"}',
  6, 'restore test failed: 1 of 2 checks failed (exit 6)', 'See the checks.');
SELECT status, backup_id, restore_s, replay_s, checks_s, rto_s, recovered_lsn, error, error_hint
  FROM backup.backup_verifications;
SELECT kind, status, record_id, backup_id, duration_s, phase, error FROM backup.recovery_operations;
SELECT kind, severity, subject, message FROM backup.alerts WHERE resolved_at IS NULL;
SELECT backup.verification_cancel(1);

-- verify_run(): queued; bad input refused.
SELECT backup.verify_run() AS verification_id;
SELECT backup.verify_run('20261125-020000X');
SELECT backup.verify_run('20261125-020000F');
SELECT backup.verify_run(repository => 'no such repo');

-- restore_test_run(): targets out of reach are refused with the reason.
SELECT backup.restore_test_run(target_time => now() + interval '1 day');
SELECT backup.restore_test_run(target_time => '2001-01-01 00:00+00');
SELECT backup.restore_test_run(restore_point => 'no_such_point');
SELECT backup.restore_test_run(target_time => now(), restore_point => 'x');

-- A backup the catalog knows; verify_after_backup queues its read-back.
INSERT INTO backup.backup_executions (kind, status, started_at) VALUES ('full', 'running', now());
SELECT backup._sched_finish(max(execution_id), 'succeeded',
  '{"backup_id":"20261125-020000F","type":"full","stop_time":"2026-11-25T02:10:00Z","chain":["20261125-020000F"]}',
  NULL, 0, 60, NULL, true) FROM backup.backup_executions;
SELECT verification_id, kind, backup_id, status, requested_by FROM backup.backup_verifications ORDER BY verification_id;
SELECT backup.verify_run('20261125-020000F') > 0 AS queued;
-- The queue, oldest first: the read-back of all backups, then of the new one.
SELECT backup._sched_recovery_claim() - 'id';
SELECT backup._sched_recovery_finish('verification', 2,
  '{"event":"verify","ok":true,"repository":"repo1","backups":["20261125-020000F"],"damaged_backups":[],
    "objects_checked":42,"files_rebuilt":0,"wal_segments_checked":5,"problems":[],"duration_s":1.5}', 0, NULL, NULL);
SELECT backup._sched_recovery_claim() - 'id';
SELECT backup._sched_recovery_finish('verification', 3,
  '{"event":"verify","ok":false,"repository":"repo1","backups":["20261125-020000F"],"damaged_backups":[],
    "objects_checked":42,"files_rebuilt":0,"wal_segments_checked":5,
    "problems":["backup 20261125-020000F: base/5/16384: checksum mismatch"],"duration_s":1.5}',
  6, 'verify found 1 problem (exit 6)', NULL);
SELECT verification_id, status, backup_id, error FROM backup.backup_verifications ORDER BY verification_id;
SELECT kind, subject, message FROM backup.alerts WHERE resolved_at IS NULL ORDER BY kind;

-- A queued one is cancelled at once.
SELECT backup.verification_cancel(4);
SELECT status, error FROM backup.backup_verifications WHERE verification_id = 4;

-- A passed restore test resolves its alert and measures the RTO. Asked of
-- no repository, it is credited to the one walshipper reports it read.
SELECT backup.restore_test_run() AS rt \gset
SELECT backup._sched_recovery_claim()->>'id' = :'rt' AS started;
SELECT backup._sched_recovery_progress('verification', :rt, 'restore', 1000, 4000) AS cancel;
SELECT phase, bytes_done, bytes_total FROM backup.recovery_operations WHERE status = 'running';
SELECT backup._sched_recovery_finish('verification', :rt,
  '{"event":"restore_test","operation_id":"20261126T040001Z-00000001","repository":"offsite","backup_id":"20261125-020000F",
    "target":{"kind":"end","value":null},"passed":true,"restore_s":4000,"replay_s":20,"checks_s":5,"total_s":4025,
    "recovered_lsn":"0/6000000","recovered_time":null,"checks":[{"name":"target","passed":true,"detail":"0/6000000","duration_s":0}],
    "error":null,"server_log":null}', 0, NULL, NULL);
SELECT status, repository, rto_s, error FROM backup.backup_verifications WHERE verification_id = :rt;
SELECT o.status, o.repository, o.record_id, o.duration_s FROM backup.recovery_operations o
  JOIN backup.backup_verifications v USING (operation_id) WHERE v.verification_id = :rt;
SELECT kind, subject FROM backup.alerts WHERE resolved_at IS NULL ORDER BY kind;

-- Health: the RTO above its target; no passed restore test for too long
-- (only once the oldest backup is older than that).
SELECT backup._sched_check_recoveries(3600, 86400 * 35);
SELECT kind, subject, message FROM backup.alerts WHERE resolved_at IS NULL AND kind IN ('rto_exceeded', 'restore_test_overdue');
UPDATE backup.backup_executions SET finished_at = now() - interval '60 days', started_at = now() - interval '60 days',
       queued_at = now() - interval '60 days';
UPDATE backup.backup_verifications SET finished_at = now() - interval '40 days' WHERE kind = 'restore_test' AND status = 'passed';
SELECT backup._sched_check_recoveries(7200, 86400 * 35);
SELECT kind, subject, left(message, 47) AS message FROM backup.alerts
 WHERE resolved_at IS NULL AND kind IN ('rto_exceeded', 'restore_test_overdue');

-- The recovery objectives, per repository walshipper reported.
INSERT INTO backup.repository_status (name, type, location, ok, position, last_wal)
VALUES ('repo1', 'posix', '/r1', true, 1, '000000010000000000000006'), ('offsite', 'posix', '/r2', true, 2, '000000010000000000000004');
INSERT INTO backup.repository_backups (repository, backup_id) VALUES ('repo1', '20261125-020000F'), ('repo1', '20261126-020000F'),
       ('offsite', '20261125-020000F');
SELECT repository, is_primary, rpo_target, rto_target, last_rto, last_restore_test = :rt AS last_test,
       backups_never_verified, never_verified_ids, wal_in_sync
  FROM backup.recovery_objectives;
SELECT backup._sched_sample_rpo(86400);
SELECT repository, in_sync FROM backup.rpo_samples ORDER BY repository;
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = 'backup.recovery_objectives'::regclass AND attnum > 0 ORDER BY attnum;

-- A verification whose worker is gone was interrupted; a live pid with
-- another backend start is a reused pid, not its worker. A live worker's
-- (this session, pid and start) is kept running.
SELECT backup.verify_run() AS v \gset
SELECT backup.verify_run() AS v2 \gset
SELECT backup.verify_run() AS v3 \gset
UPDATE backup.backup_verifications SET status = 'running', started_at = now(), worker_pid = 0 WHERE verification_id = :v;
UPDATE backup.backup_verifications SET status = 'running', started_at = now(), worker_pid = pg_backend_pid(),
       worker_started = backup._backend_started() - interval '1 hour' WHERE verification_id = :v2;
UPDATE backup.backup_verifications SET status = 'running', started_at = now(), worker_pid = pg_backend_pid(),
       worker_started = backup._backend_started() WHERE verification_id = :v3;
SELECT backup._recovery_running() AS running;
SELECT backup._sched_interrupt_stale();
SELECT verification_id - :v AS n, status, error FROM backup.backup_verifications WHERE verification_id IN (:v, :v2, :v3)
 ORDER BY verification_id;
UPDATE backup.backup_verifications SET worker_started = worker_started - interval '1 hour' WHERE verification_id = :v3;
SELECT backup._recovery_running() AS running;
SELECT backup._sched_interrupt_stale();

-- Every request and end is audited (the scheduler's as 'scheduler').
SELECT actor = current_user AS by_me, action, object_type, object_name, details - 'verification_id' - 'operation_id' - 'rto_s' AS details
  FROM backup.audit_log WHERE object_type IN ('verification', 'restore_check') ORDER BY audit_id;
SELECT backup.restore_check_drop('monthly_only');
SELECT backup.restore_check_drop('monthly_only');

TRUNCATE backup.backup_verifications, backup.recovery_operations, backup.restore_checks, backup.backup_executions,
         backup.alerts, backup.audit_log, backup.repository_status, backup.repository_backups, backup.rpo_samples,
         backup.backup_jobs RESTART IDENTITY CASCADE;
