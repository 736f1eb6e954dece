-- A role that can create objects in a schema on the default search_path
-- plants functions and operators shadowing the built-ins the extension
-- uses. Nothing it planted may ever run, through any operator-facing
-- function (the scheduler's cycles: walshipper/tests/extension.rs).
\set VERBOSITY terse
\set SHOW_CONTEXT never
-- Every function of the extension has its search_path pinned.
SELECT p.oid::regprocedure AS unpinned FROM pg_proc p
 WHERE p.pronamespace = 'backup'::regnamespace
   AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false);

CREATE ROLE pgb_planter;
CREATE SCHEMA planted AUTHORIZATION pgb_planter;
CREATE TABLE planted.fired (what text, by_user name DEFAULT current_user);
ALTER TABLE planted.fired OWNER TO pgb_planter;
GRANT INSERT ON planted.fired TO PUBLIC;
SET ROLE pgb_planter;
-- Exact-type versions of built-ins, which would win over pg_catalog's if
-- planted ahead of it.
CREATE FUNCTION planted.make_interval(secs integer) RETURNS interval LANGUAGE sql
  AS $$ INSERT INTO planted.fired (what) VALUES ('make_interval') RETURNING interval '1 second' $$;
CREATE FUNCTION planted.now() RETURNS timestamptz LANGUAGE sql
  AS $$ INSERT INTO planted.fired (what) VALUES ('now') RETURNING '2000-01-01'::timestamptz $$;
CREATE FUNCTION planted.coalesce_text(text, text) RETURNS text LANGUAGE sql
  AS $$ INSERT INTO planted.fired (what) VALUES ('coalesce') RETURNING $1 $$;
CREATE FUNCTION planted.jsonb_build_object(VARIADIC "any") RETURNS jsonb LANGUAGE sql
  AS $$ INSERT INTO planted.fired (what) VALUES ('jsonb_build_object') RETURNING '{}'::jsonb $$;
CREATE FUNCTION planted.format(text, VARIADIC "any") RETURNS text LANGUAGE sql
  AS $$ INSERT INTO planted.fired (what) VALUES ('format') RETURNING $1 $$;
CREATE FUNCTION planted.replace(text, text, text) RETURNS text LANGUAGE sql
  AS $$ INSERT INTO planted.fired (what) VALUES ('replace') RETURNING $1 $$;
CREATE FUNCTION planted.pg_notify(text, text) RETURNS void LANGUAGE sql
  AS $$ INSERT INTO planted.fired (what) VALUES ('pg_notify') $$;
CREATE FUNCTION planted.text_eq(text, text) RETURNS boolean LANGUAGE sql
  AS $$ INSERT INTO planted.fired (what) VALUES ('operator =') RETURNING $1 OPERATOR(pg_catalog.=) $2 $$;
CREATE OPERATOR planted.= (LEFTARG = text, RIGHTARG = text, FUNCTION = planted.text_eq);
CREATE FUNCTION planted.text_concat(text, text) RETURNS text LANGUAGE sql
  AS $$ INSERT INTO planted.fired (what) VALUES ('operator ||') RETURNING $1 OPERATOR(pg_catalog.||) $2 $$;
CREATE OPERATOR planted.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = planted.text_concat);
RESET ROLE;

-- Runs q, returning its SQLSTATE instead of a message with a timestamp.
CREATE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql
  AS $$ BEGIN EXECUTE q; RETURN 'ok'; EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$;
-- The caller's path puts the planted schema first, even before pg_catalog.
CREATE ROLE pgb_op;
SELECT backup.grant_operator('pgb_op', retention => true);
SET search_path = planted, pg_catalog, public;
SET ROLE pgb_op;
SELECT backup.job_create('shadowed', '0 3 * * *') > 0 AS created;
SELECT backup.job_alter('shadowed', schedule => '0 4 * * *');
SELECT backup.job_enable('shadowed', false);
SELECT backup.job_enable('shadowed', true);
SELECT backup.backup_run('shadowed') > 0 AS queued;
SELECT backup.backup_cancel((SELECT max(execution_id) FROM backup.backup_executions));
SELECT backup.restore_point_create('shadow_point') IS NOT NULL AS point;
SELECT backup.retention_set('repo1', keep_full => 3, recovery_window => '30 days');
SELECT backup.retention_reset('repo1');
-- No backup yet (no_data_found), but every line of both ran.
SELECT pg_temp.sqlstate_of($q$SELECT * FROM backup.restore_plan('shadow_point')$q$);
SELECT pg_temp.sqlstate_of($q$SELECT * FROM backup.restore_plan(pg_catalog.now() - interval '1 hour')$q$);
SELECT count(*) >= 0 AS ok FROM backup.job_status, backup.backups, backup.wal_archive_status, backup.repositories;
RESET ROLE;
-- The scheduler's SQL, as the owner with the same hostile path (a job is
-- active, so the health check computes its period and grace).
SELECT backup._sched_claim(0);
SELECT backup._sched_check_health(900, 60);
SELECT backup._raise_alert('worker_error', 'critical', 'scheduler', 'test');
SELECT backup.alert_ack((SELECT max(alert_id) FROM backup.alerts));
SELECT backup._sched_worker_error(NULL);
-- A failed run of the job: alert, audit, and a retry later (make_interval).
INSERT INTO backup.backup_executions (job_id, kind, status, started_at)
SELECT job_id, 'full', 'running', pg_catalog.now() FROM backup.backup_jobs WHERE name OPERATOR(pg_catalog.=) 'shadowed';
SELECT backup._sched_finish((SELECT max(execution_id) FROM backup.backup_executions), 'failed', NULL, 'test', 5, 60);
SELECT status, attempt FROM backup.backup_executions ORDER BY execution_id;
SELECT backup.backup_cancel((SELECT max(execution_id) FROM backup.backup_executions));
SELECT backup.job_drop('shadowed');
SELECT count(*) AS planted_code_ran FROM planted.fired;
RESET search_path;

TRUNCATE backup.backup_executions, backup.backup_jobs, backup.restore_points, backup.alerts, backup.audit_log,
         backup.retention_policies RESTART IDENTITY CASCADE;
SELECT backup.revoke_all('pgb_op');
DROP SCHEMA planted CASCADE;
DROP ROLE pgb_op, pgb_planter;
