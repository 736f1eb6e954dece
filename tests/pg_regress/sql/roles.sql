-- Least privilege: what backup.grant_operator() and backup.grant_monitor()
-- allow, and everything they do not (each refusal shown).
\set VERBOSITY terse
\set SHOW_CONTEXT never
CREATE ROLE pgb_operator;
CREATE ROLE pgb_monitor;
CREATE ROLE pgb_nobody;
CREATE ROLE pgb_operator_no_retention;
SELECT backup.grant_operator('pgb_operator', retention => true);
SELECT backup.grant_operator('pgb_operator_no_retention');
SELECT backup.grant_monitor('pgb_monitor');
-- Only the owner grants.
SET ROLE pgb_operator;
SELECT backup.grant_operator('pgb_nobody');
RESET ROLE;

-- An operator acts through the functions, and is recorded as the actor.
SET ROLE pgb_operator;
SELECT backup.job_create('operator_job', '15 4 * * *') > 0 AS created;
SELECT backup.job_alter('operator_job', schedule => '20 4 * * *');
SELECT backup.backup_run('operator_job') > 0 AS queued;
SELECT backup.backup_cancel((SELECT max(execution_id) FROM backup.backup_executions));
SELECT backup.restore_point_create('operator_point') IS NOT NULL AS point;
SELECT backup.retention_set('repo1', keep_full => 2);
SELECT backup.job_enable('operator_job', false);
SELECT backup.job_drop('operator_job');
SELECT count(*) >= 0 AS reads_views FROM backup.backups, backup.job_status, backup.wal_archive_status,
       backup.running_backups, backup.repositories;
-- ... but never writes the catalog, nor runs the scheduler's functions.
INSERT INTO backup.backup_executions (kind) VALUES ('full');
UPDATE backup.backup_jobs SET active = false;
DELETE FROM backup.audit_log;
INSERT INTO backup.audit_log (action, object_type) VALUES ('forged', 'backup');
UPDATE backup.retention_policies SET keep_full = 1;
SELECT backup._sched_claim(1);
SELECT backup._sched_finish(1, 'succeeded', '{}', NULL, 0, 0);
SELECT backup._sched_expire_done(NULL, 1, 'x');
SELECT backup._audit('forged', 'backup', 'x');
SELECT backup._run_in_worker(1, NULL, 'full', NULL);
SELECT backup.grant_monitor('pgb_nobody');
SELECT backup.revoke_all('pgb_monitor');
SELECT pg_create_restore_point('direct');
RESET ROLE;
SELECT actor, action, object_type, object_name FROM backup.audit_log ORDER BY audit_id;
SELECT created_by, updated_by FROM backup.backup_jobs;
SELECT requested_by FROM backup.backup_executions;
SELECT created_by FROM backup.restore_points;
SELECT updated_by FROM backup.retention_policies;

-- Retention removes backups: only an operator granted it may change it.
SET ROLE pgb_operator_no_retention;
SELECT backup.retention_set('repo1', keep_full => 1);
SELECT backup.retention_reset('repo1');
SELECT backup.job_create('allowed_job', '15 6 * * *') > 0 AS created;
RESET ROLE;

-- A monitor reads every view and table, backups included, and acts on nothing.
SET ROLE pgb_monitor;
SELECT count(*) >= 0 AS readable FROM backup.backups;
SELECT count(*) >= 0 AS readable FROM backup.job_status;
SELECT count(*) >= 0 AS readable FROM backup.wal_archive_status;
SELECT count(*) >= 0 AS readable FROM backup.running_backups;
SELECT count(*) >= 0 AS readable FROM backup.repositories;
SELECT count(*) >= 0 AS readable FROM backup.alerts;
SELECT count(*) >= 0 AS readable FROM backup.audit_log;
SELECT count(*) >= 0 AS readable FROM backup.retention_policies;
SELECT count(*) >= 0 AS readable FROM backup.repository_backups;
SELECT backup.job_create('monitor_job', '15 5 * * *');
SELECT backup.backup_run();
SELECT backup.alert_ack(1);
SELECT * FROM backup.restore_plan(now());
DELETE FROM backup.backup_jobs;
SELECT backup._backup_chain(e) FROM backup.backup_executions e;
RESET ROLE;

-- Anyone else: nothing at all, not even the names.
SET ROLE pgb_nobody;
SELECT count(*) FROM backup.backup_jobs;
SELECT count(*) FROM backup.backups;
SELECT backup.job_create('sneaky', '0 1 * * *');
RESET ROLE;

-- The audit log is append-only, even for a role granted UPDATE and DELETE
-- on it; a superuser may clean up.
CREATE ROLE pgb_owner_like;
GRANT SELECT, UPDATE, DELETE ON backup.audit_log TO pgb_owner_like;
GRANT USAGE ON SCHEMA backup TO pgb_owner_like;
SET ROLE pgb_owner_like;
UPDATE backup.audit_log SET actor = 'someone_else';
DELETE FROM backup.audit_log;
RESET ROLE;
REVOKE ALL ON backup.audit_log FROM pgb_owner_like;
REVOKE ALL ON SCHEMA backup FROM pgb_owner_like;

-- Revoking takes everything back.
SELECT backup.revoke_all('pgb_operator');
SET ROLE pgb_operator;
SELECT backup.job_create('after_revoke', '0 1 * * *');
RESET ROLE;

TRUNCATE backup.backup_executions, backup.backup_jobs, backup.restore_points, backup.alerts, backup.audit_log,
         backup.retention_policies RESTART IDENTITY CASCADE;
SELECT backup.revoke_all('pgb_monitor');
SELECT backup.revoke_all('pgb_operator_no_retention');
DROP ROLE pgb_operator, pgb_monitor, pgb_nobody, pgb_owner_like, pgb_operator_no_retention;
