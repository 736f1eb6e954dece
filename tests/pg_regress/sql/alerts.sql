-- Alerts: raised once per kind and subject, acknowledged by an operator
-- (audited), resolved by the scheduler when the condition clears.
\set VERBOSITY default
\set SHOW_CONTEXT never
SELECT backup._raise_alert('backup_failed', 'critical', 'nightly', 'backup 7 (nightly) failed: disk full');
SELECT backup._raise_alert('backup_failed', 'critical', 'nightly', 'backup 8 (nightly) failed: disk full');
SELECT alert_id, kind, severity, subject, message, acknowledged_at IS NULL AS unacknowledged FROM backup.alerts;
SELECT backup.alert_ack((SELECT alert_id FROM backup.alerts), 'disk replaced');
SELECT kind, acknowledged_by = current_user AS by_me, resolved_at IS NULL AS still_open FROM backup.alerts;
SELECT backup.alert_ack((SELECT alert_id FROM backup.alerts));
SELECT backup.alert_ack(424242);
SELECT action, object_type, details FROM backup.audit_log;
SELECT backup._resolve_alert('backup_failed', 'nightly');
SELECT backup.alert_ack((SELECT alert_id FROM backup.alerts));
-- A scheduler failure is an alert of its own, resolved after a clean cycle.
SELECT backup._sched_worker_error('cannot run walshipper at /nonexistent: No such file or directory (os error 2) (check pg_backup.walshipper_path)');
SELECT kind, subject, message FROM backup.alerts WHERE resolved_at IS NULL;
SELECT backup._sched_worker_error(NULL);
SELECT count(*) AS open FROM backup.alerts WHERE resolved_at IS NULL;
TRUNCATE backup.alerts, backup.audit_log RESTART IDENTITY;
