-- Privileges, applied last. The model:
--   * the extension's owner (a superuser: the scheduler's functions run
--     walshipper) owns and alone writes every table;
--   * operators act only through the operator API below, SECURITY DEFINER
--     functions that check their input and audit what they do;
--   * monitors read the tables and views;
--   * nobody else gets anything, and internal functions (backup._*) are
--     executable by the owner only;
--   * every function runs with search_path pinned to pg_catalog, pg_temp,
--     so no object another role creates (in public or anywhere) can stand
--     in for a built-in one: a planted public.make_interval() or operator
--     never runs as the owner.
-- backup.grant_operator(role) and backup.grant_monitor(role) give the roles
-- in one call each (backup.grant_notifier(role): walshipper's notifier;
-- backup.grant_key_manager(role): the data keys' rotation policy);
-- backup.revoke_all(role) takes everything back.

DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'backup'::regnamespace LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA backup FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA backup FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA backup FROM PUBLIC;
REVOKE ALL ON SCHEMA backup FROM PUBLIC;
-- Harmless helpers (they read nothing), for whoever has USAGE on the schema.
GRANT EXECUTE ON FUNCTION backup.version(), backup.cron_next(text, text, timestamptz),
    backup.cron_next_epoch(text, text, float8), backup.cron_check(text, text) TO PUBLIC;

-- What an operator may execute.
CREATE FUNCTION backup._operator_functions()
RETURNS regprocedure[] LANGUAGE sql IMMUTABLE
AS $$
    SELECT ARRAY[
        'backup.backup_run(text, text, boolean)',
        'backup.backup_cancel(bigint)',
        'backup.job_create(text, text, text, text, boolean, text)',
        'backup.job_alter(text, text, text, text, text)',
        'backup.job_enable(text, boolean)',
        'backup.job_drop(text)',
        'backup.restore_point_create(text, text)',
        'backup.restore_plan(timestamptz, text)',
        'backup.restore_plan(text, text)',
        'backup.alert_ack(bigint, text)',
        'backup.verify_run(text, boolean, text)',
        'backup.restore_test_run(text, timestamptz, text, boolean, text)',
        'backup.verification_cancel(bigint)',
        'backup.recovery_cancel(bigint)',
        'backup.notification_test(text)'
    ]::regprocedure[]
$$;

-- What walshipper's notifier calls (sql/notifications.sql) besides what a
-- monitor may read.
CREATE FUNCTION backup._notifier_functions()
RETURNS regprocedure[] LANGUAGE sql IMMUTABLE
AS $$
    SELECT ARRAY[
        'backup.notification_pending(text, integer)',
        'backup.notification_sent_last_hour(text)',
        'backup.notification_seen(bigint, text)',
        'backup.notification_claim(bigint, text, integer)',
        'backup.notification_done(bigint, text, text, text, integer, integer)'
    ]::regprocedure[]
$$;

-- What a table restorer may execute besides what a monitor may: each
-- reveals past contents of any table, never part of grant_operator.
-- table_restore() loads them into a schema of the caller's; a restore
-- check runs its query as a member of pg_read_all_data in the restored
-- copy, and its result (or mere pass/fail) is stored where monitors read.
CREATE FUNCTION backup._table_restore_functions()
RETURNS regprocedure[] LANGUAGE sql IMMUTABLE
AS $$
    SELECT ARRAY[
        'backup.table_restore(text[], text, timestamptz, text, boolean)',
        'backup.restore_check_create(text, text, text, text, text)',
        'backup.restore_check_drop(text)'
    ]::regprocedure[]
$$;

-- Changing retention removes backups (expiry follows the next backup): an
-- operator may only with grant_operator(role, retention => true).
CREATE FUNCTION backup._retention_functions()
RETURNS regprocedure[] LANGUAGE sql IMMUTABLE
AS $$
    SELECT ARRAY[
        'backup.retention_set(text, integer, interval, integer, integer, integer, integer, text)',
        'backup.retention_reset(text)'
    ]::regprocedure[]
$$;

-- The data keys' rotation policy and operations: key custodians only
-- (backup.grant_key_manager()), never part of grant_operator. Separation
-- of duties, as an audit of key handling expects: those who run backups do
-- not decide how long a key protects them; and retiring a key re-encrypts
-- every object it sealed, holding backups off while it runs.
CREATE FUNCTION backup._key_functions()
RETURNS regprocedure[] LANGUAGE sql IMMUTABLE
AS $$
    SELECT ARRAY[
        'backup.set_key_rotation(interval, interval)',
        'backup.rotate_key_now()',
        'backup.retire_key(text)'
    ]::regprocedure[]
$$;

-- What a monitor may read: every table and view of the schema.
CREATE FUNCTION backup._monitor_relations()
RETURNS regclass[] LANGUAGE sql STABLE
AS $$
    SELECT array_agg(c.oid::regclass ORDER BY c.relname) FROM pg_catalog.pg_class c
     WHERE c.relnamespace = 'backup'::regnamespace AND c.relkind IN ('r', 'v')
$$;

-- Owner only: role may read every catalog table and view (monitoring).
CREATE FUNCTION backup.grant_monitor(role regrole)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    r regclass;
BEGIN
    IF role IS NULL OR role::oid = 0 THEN
        RAISE EXCEPTION 'grant_monitor needs a role' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA backup TO %s', role);
    FOREACH r IN ARRAY backup._monitor_relations() LOOP
        EXECUTE format('GRANT SELECT ON %s TO %s', r, role);
    END LOOP;
    -- The compliance report (it reads as its caller) and its formatting helpers.
    EXECUTE format('GRANT EXECUTE ON FUNCTION backup.compliance_report(timestamptz, timestamptz), '
                   'backup._report_duration(double precision), backup._report_time(timestamptz) TO %s', role);
    PERFORM backup._audit('grant', 'role', role::text, '{"grant": "monitor"}');
END
$$;

-- Owner only: role may monitor, and act through the operator API; with
-- retention => true also set repositories' retention.
CREATE FUNCTION backup.grant_operator(role regrole, retention boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    f regprocedure;
BEGIN
    PERFORM backup.grant_monitor(role);
    FOREACH f IN ARRAY backup._operator_functions()
                       || CASE WHEN retention THEN backup._retention_functions() ELSE '{}' END LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, role);
    END LOOP;
    PERFORM backup._audit('grant', 'role', role::text,
        jsonb_build_object('grant', 'operator', 'retention', coalesce(retention, false)));
END
$$;

-- Owner only: role may restore tables from SQL (backup.table_restore())
-- and create and drop restore checks (backup.restore_check_create(),
-- restore_check_drop(): a check's query reads anything in the restored
-- copy), both revealing what any table held: never part of grant_operator;
-- and monitor, to follow its recovery operations.
CREATE FUNCTION backup.grant_table_restore(role regrole)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    f regprocedure;
BEGIN
    PERFORM backup.grant_monitor(role);
    FOREACH f IN ARRAY backup._table_restore_functions() LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, role);
    END LOOP;
    PERFORM backup._audit('grant', 'role', role::text, '{"grant": "table_restore"}');
END
$$;

-- Owner only: role may monitor, and record what walshipper's notifier
-- sends (the role walshipper serve connects as when [notify] has channels).
CREATE FUNCTION backup.grant_notifier(role regrole)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    f regprocedure;
BEGIN
    PERFORM backup.grant_monitor(role);
    FOREACH f IN ARRAY backup._notifier_functions() LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, role);
    END LOOP;
    PERFORM backup._audit('grant', 'role', role::text, '{"grant": "notifier"}');
END
$$;

-- Owner only: role may monitor, and set the data keys' rotation policy,
-- rotate now and retire a key (backup.set_key_rotation(), rotate_key_now(),
-- retire_key()): a key custodian. Never part of grant_operator.
CREATE FUNCTION backup.grant_key_manager(role regrole)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    f regprocedure;
BEGIN
    PERFORM backup.grant_monitor(role);
    FOREACH f IN ARRAY backup._key_functions() LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, role);
    END LOOP;
    PERFORM backup._audit('grant', 'role', role::text, '{"grant": "key_manager"}');
END
$$;

-- Owner only: takes back everything granted on the schema's objects.
CREATE FUNCTION backup.revoke_all(role regrole)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    r regclass;
    f regprocedure;
BEGIN
    IF role IS NULL OR role::oid = 0 THEN
        RAISE EXCEPTION 'revoke_all needs a role' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    EXECUTE format('REVOKE ALL ON SCHEMA backup FROM %s', role);
    FOREACH r IN ARRAY backup._monitor_relations() LOOP
        EXECUTE format('REVOKE ALL ON %s FROM %s', r, role);
    END LOOP;
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'backup'::regnamespace LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %s', f, role);
    END LOOP;
    PERFORM backup._audit('revoke', 'role', role::text);
END
$$;

-- The functions above too.
ALTER FUNCTION backup._operator_functions() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backup._retention_functions() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backup._table_restore_functions() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backup._notifier_functions() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backup.grant_notifier(regrole) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backup._monitor_relations() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backup.grant_monitor(regrole) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backup.grant_operator(regrole, boolean) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backup.revoke_all(regrole) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backup.grant_table_restore(regrole) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backup._key_functions() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION backup.grant_key_manager(regrole) SET search_path = pg_catalog, pg_temp;
REVOKE ALL ON FUNCTION backup._operator_functions(), backup._retention_functions(),
    backup._table_restore_functions(), backup._monitor_relations(),
    backup.grant_monitor(regrole), backup.grant_operator(regrole, boolean), backup.revoke_all(regrole),
    backup.grant_table_restore(regrole), backup._notifier_functions(), backup.grant_notifier(regrole),
    backup._key_functions(), backup.grant_key_manager(regrole) FROM PUBLIC;
