-- Table restores from SQL (refused input leaves nothing behind; who may),
-- and command-line restores taken into backup.recovery_operations from
-- walshipper's recovery records.
\set VERBOSITY default
\set SHOW_CONTEXT never

-- Bad input is refused at once, with the reason.
SELECT backup.table_restore('{}', 'restored');
SELECT backup.table_restore(ARRAY['a.b.c'], 'restored');
SELECT backup.table_restore(ARRAY['public.orders', 'orders'], 'restored');
SELECT backup.table_restore(ARRAY['public.orders'], 'Restored');
SELECT backup.table_restore(ARRAY['public.orders'], 'pg_restored');
SELECT backup.table_restore(ARRAY['public.orders'], 'public');
SELECT backup.table_restore(ARRAY['public.orders'], 'restored');
SELECT backup.table_restore(ARRAY['public.orders'], 'restored', target_time => now() + interval '1 hour');
INSERT INTO backup.backup_executions (kind, status, queued_at, started_at, finished_at, backup_id, summary)
VALUES ('full', 'succeeded', '2026-01-12 02:00+00', '2026-01-12 02:00+00', '2026-01-12 02:10+00', '20260112-020000F',
        '{"type": "full", "stop_time": "2026-01-12T02:10:00Z", "chain": ["20260112-020000F"]}');
SELECT backup.table_restore(ARRAY['public.orders'], 'restored', target_time => '2001-01-01 00:00+00');
SELECT backup.table_restore(ARRAY['public.orders'], 'restored', restore_point => 'no_such_point');
-- Nothing was recorded, audited or created.
SELECT (SELECT count(*) FROM backup.recovery_operations) AS operations, (SELECT count(*) FROM backup.audit_log) AS audited,
       (SELECT count(*) FROM pg_namespace WHERE nspname = 'restored') AS schemas;

-- Queued: the names in SQL identifier syntax, the caller's role and database.
SELECT backup.table_restore(ARRAY['orders', 'shop."Order Lines"'], 'restored', wait => false) AS op \gset
SELECT kind, source, status, database = current_database() AS this_db, schema_name, tables, load_role = current_user AS mine,
       target_kind FROM backup.recovery_operations;
SELECT backup.table_restore(ARRAY['orders'], 'restored', wait => false);
SELECT replace(replace((backup._sched_recovery_claim()->'args')::text, current_database(), 'DB'), current_user, 'ME') AS args;
SELECT backup._sched_recovery_progress('operation', :op, 'copy', 10, 100) AS cancel;
SELECT backup.recovery_cancel(:op);
SELECT backup._sched_recovery_progress('operation', :op, 'copy', 20, 100) AS cancel;
SELECT backup._sched_recovery_finish('operation', :op, NULL, NULL, 'cancelled', NULL, 'cancelled');
SELECT status, error, phase FROM backup.recovery_operations;
SELECT backup.recovery_cancel(:op);
-- A successful one resolves the failure alert of its database.
SELECT backup._raise_alert('table_restore_failed', 'warning', current_database(), 'x');
SELECT backup.table_restore(ARRAY['orders'], 'restored2', wait => false) AS op2 \gset
SELECT backup._sched_recovery_claim() IS NOT NULL AS started;
SELECT backup._sched_recovery_finish('operation', :op2,
  '{"event":"table_restore","operation_id":"20261126T050001Z-0000abcd","repository":"repo1","backup_id":"20260112-020000F",
    "target":{"kind":"end","value":null},"database":"x","schema":"restored2",
    "tables":[{"source":"public.orders","restored_as":"restored2.orders","rows":1000}],
    "restore_s":1,"replay_s":2,"copy_s":3,"total_s":6.5,"recovered_lsn":null,"recovered_time":null}', 0, NULL, NULL);
SELECT status, record_id, backup_id, duration_s FROM backup.recovery_operations WHERE operation_id = :op2;
SELECT count(*) AS open FROM backup.alerts WHERE kind = 'table_restore_failed' AND resolved_at IS NULL;

-- Command-line restores come in from walshipper info's recovery records:
-- known ones and malformed ones skipped, one started from SQL attached.
SELECT backup._sched_recoveries_after();
INSERT INTO backup.recovery_operations (kind, source, status, started_at, requested_by, target_kind)
VALUES ('restore_test', 'sql', 'running', '2026-11-26 06:00:00+00', 'alice', 'end');
SELECT backup._sched_repo_status('{"repositories": [{"name": "repo1", "type": "posix", "location": "/r", "ok": true,
  "segments": 3, "backups": 1, "backup_ids": ["20260112-020000F"], "recoveries": [
  {"id": "20261126T050001Z-0000abcd", "operation": "table_restore", "host": "db1", "os_user": "postgres",
   "started_at": "2026-11-26T05:00:01Z", "finished_at": "2026-11-26T05:00:08Z", "backup_id": "20260112-020000F",
   "target": {"kind": "end", "value": null}, "target_dir": "/tmp/x", "databases": [], "succeeded": true, "duration_s": 7,
   "error": null, "walshipper_version": "0.1.0"},
  {"id": "20261126T055500Z-1234abcd", "operation": "restore", "host": "db1", "os_user": "postgres",
   "started_at": "2026-11-26T05:55:00Z", "finished_at": "2026-11-26T05:57:00Z", "backup_id": "20260112-020000F",
   "target": {"kind": "time", "value": "2026-11-26 05:00:00+00"}, "target_dir": "/var/lib/postgresql/15/restored",
   "databases": ["shop"], "succeeded": true, "duration_s": 120.5, "error": null, "walshipper_version": "0.1.0"},
  {"id": "20261126T060003Z-00000002", "operation": "restore_test", "host": "db1", "os_user": "postgres",
   "started_at": "2026-11-26T06:00:03Z", "finished_at": "2026-11-26T06:01:00Z", "backup_id": "20260112-020000F",
   "target": {"kind": "end", "value": null}, "target_dir": "/tmp/rt", "databases": [], "succeeded": true, "duration_s": 57,
   "error": null, "walshipper_version": "0.1.0"},
  {"id": "20261126T061000Z-00000003", "operation": "restore", "host": "db2", "os_user": "root",
   "started_at": "2026-11-26T06:10:00Z", "finished_at": "2026-11-26T06:10:05Z", "backup_id": "x; rm -rf /",
   "target": {"kind": "bogus", "value": null}, "target_dir": "/tmp/y", "databases": "shop", "succeeded": false,
   "duration_s": -3, "error": "restore failed:\nno space left", "walshipper_version": "0.1.0"},
  {"id": "../../etc/passwd", "operation": "restore"},
  {"id": "20261126T062000Z-00000004", "operation": "drop_database"}
  ]}]}');
SELECT operation_id, kind, source, record_id, repository, backup_id, target_kind, target_value, target_dir, databases,
       requested_by, status, CASE WHEN status <> 'cancelled' THEN duration_s END AS duration_s, error
  FROM backup.recovery_operations ORDER BY operation_id;
SELECT actor, action, object_type, object_name, details - 'operation_id' AS details,
       (details->>'operation_id')::bigint = (SELECT operation_id FROM backup.recovery_operations o WHERE o.record_id = a.object_name) AS names_it
  FROM backup.audit_log a WHERE details->>'source' = 'command_line' ORDER BY audit_id;
-- The next refresh asks for records after the point each repository was
-- listed up to (now, for repo1), less 7 days; one listed last a month ago
-- (unreachable since) holds that point back, so none of its records is skipped.
SELECT backup._sched_recoveries_after()
       BETWEEN to_char((now() - interval '7 days 5 minutes') AT TIME ZONE 'UTC', 'YYYYMMDD"T"HH24MISS"Z"')
           AND to_char((now() - interval '7 days') AT TIME ZONE 'UTC', 'YYYYMMDD"T"HH24MISS"Z-00000000"') AS week_before_now;
INSERT INTO backup.repository_status (name, type, location, ok, position, recoveries_seen)
VALUES ('offsite', 'posix', '/r2', false, 2, '20261001T000000Z-00000000');
SELECT backup._sched_recoveries_after();
DELETE FROM backup.repository_status WHERE name = 'offsite';
-- Reported again: nothing new.
SELECT backup._sched_import_recoveries('repo1', (SELECT jsonb_agg(report) FROM backup.recovery_operations WHERE source = 'command_line'));

-- Who may: not an operator (it reveals past contents of any table), a role
-- given grant_table_restore; the objects belong to the caller.
\set VERBOSITY terse
CREATE ROLE pgb_rec_operator;
CREATE ROLE pgb_rec_restorer;
SELECT backup.grant_operator('pgb_rec_operator');
SELECT backup.grant_table_restore('pgb_rec_restorer');
SET ROLE pgb_rec_operator;
SELECT backup.table_restore(ARRAY['orders'], 'restored3', wait => false);
SELECT backup.restore_test_run() > 0 AS operator_may_test;
SELECT backup.verify_run() > 0 AS operator_may_verify;
SELECT backup._sched_recovery_claim();
SELECT backup._recovery_in_worker('verification', 1, '{}', NULL);
SELECT backup.grant_table_restore('pgb_rec_operator');
-- A restore check reads anything in the restored copy and its result is
-- stored where monitors read: not an operator's either.
SELECT backup.restore_check_create('secrets', 'SELECT count(*) FROM pg_authid', '1');
SELECT backup.restore_check_drop('secrets');
RESET ROLE;
SET ROLE pgb_rec_restorer;
SELECT backup.table_restore(ARRAY['orders'], 'restored3', wait => false) > 0 AS queued;
SELECT backup.restore_check_create('restorer_check', 'SELECT 1', '1') > 0 AS restorer_may_check;
SELECT backup.restore_check_drop('restorer_check');
SELECT load_role, requested_by FROM backup.recovery_operations WHERE schema_name = 'restored3';
SELECT backup.verify_run();
RESET ROLE;
SELECT backup.revoke_all('pgb_rec_operator');
SELECT backup.revoke_all('pgb_rec_restorer');
DROP ROLE pgb_rec_operator;
DROP ROLE pgb_rec_restorer;
TRUNCATE backup.backup_verifications, backup.recovery_operations, backup.backup_executions, backup.alerts,
         backup.audit_log, backup.repository_status, backup.repository_backups RESTART IDENTITY CASCADE;
