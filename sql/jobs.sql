-- Job management and restore points: thin SQL over the catalog. Every
-- change is written to backup.audit_log. Bad input raises an error with a hint.

CREATE FUNCTION backup.cron_next(schedule text, timezone text DEFAULT 'UTC', after timestamptz DEFAULT now())
RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT to_timestamp(backup.cron_next_epoch(schedule, timezone, extract(epoch FROM after)::float8)) $$;
COMMENT ON FUNCTION backup.cron_next(text, text, timestamptz) IS 'Next time a 5-field cron schedule fires after a time, in a time zone.';

CREATE FUNCTION backup._audit(p_action text, p_type text, p_name text, p_details jsonb DEFAULT '{}')
RETURNS void LANGUAGE sql
AS $$ INSERT INTO backup.audit_log (action, object_type, object_name, details) VALUES (p_action, p_type, p_name, p_details) $$;

-- A job's retention as walshipper's policy would name it, without the unset
-- parts; '{}' when none is set (walshipper's configured policy applies).
-- The same text whatever the session's IntervalStyle (it is audited).
CREATE FUNCTION backup._job_retention(j backup.backup_jobs)
RETURNS jsonb LANGUAGE sql STABLE SET IntervalStyle = 'postgres'
AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'keep_full', j.retention_full_count, 'recovery_window', j.retention_window::text,
        'keep_daily', j.retention_keep_daily, 'keep_weekly', j.retention_keep_weekly,
        'keep_monthly', j.retention_keep_monthly, 'keep_yearly', j.retention_keep_yearly,
        'timezone', CASE WHEN num_nonnulls(j.retention_keep_daily, j.retention_keep_weekly,
                                           j.retention_keep_monthly, j.retention_keep_yearly) > 0
                         THEN j.timezone END))
$$;

-- Checks a job as it would be stored (j.job_id is NULL for a new job).
-- Intervals in its messages read '7 days' whatever the session's IntervalStyle.
CREATE FUNCTION backup._check_job(j backup.backup_jobs)
RETURNS void LANGUAGE plpgsql SET IntervalStyle = 'postgres'
AS $$
DECLARE
    other text;
    c record;
    t timestamptz;
    t2 timestamptz;
    gap interval;
    longest interval := interval '0';
    uncovered boolean := false;
BEGIN
    IF j.name IS NULL OR j.name !~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid job name "%"', j.name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 63 letters, digits, "_", "." or "-", starting with a letter, digit or "_".';
    END IF;
    IF j.kind IS NULL OR j.kind NOT IN ('full', 'diff', 'incr') THEN
        RAISE EXCEPTION 'unknown backup kind "%"', j.kind
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use full, diff or incr.';
    END IF;
    IF j.timezone IS NULL OR NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = j.timezone) THEN
        RAISE EXCEPTION 'unknown time zone "%"', j.timezone
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use a name from pg_timezone_names, such as UTC or Europe/Berlin.';
    END IF;
    PERFORM backup.cron_check(j.schedule, j.timezone);
    IF j.retention_full_count IS NOT NULL AND j.retention_full_count < 1 THEN
        RAISE EXCEPTION 'retention_full_count must be at least 1, not %', j.retention_full_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF j.retention_window IS NOT NULL AND j.retention_window <= interval '0' THEN
        RAISE EXCEPTION 'retention_window must be positive, not %', j.retention_window
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR c IN SELECT * FROM (VALUES ('retention_keep_daily', j.retention_keep_daily, 'day'),
                                   ('retention_keep_weekly', j.retention_keep_weekly, 'week'),
                                   ('retention_keep_monthly', j.retention_keep_monthly, 'month'),
                                   ('retention_keep_yearly', j.retention_keep_yearly, 'year')) v (col, n, period)
              WHERE v.n < 0 LOOP
        RAISE EXCEPTION '% must be 0 or more, not %', c.col, c.n
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('It is the number of %ss whose newest backup is kept: 0 keeps none, NULL leaves it unset.', c.period);
    END LOOP;
    IF j.retention_full_count IS NULL AND j.retention_window IS NULL
       AND num_nonnulls(j.retention_keep_daily, j.retention_keep_weekly, j.retention_keep_monthly, j.retention_keep_yearly) > 0
       AND coalesce(j.retention_keep_daily, 0) + coalesce(j.retention_keep_weekly, 0)
           + coalesce(j.retention_keep_monthly, 0) + coalesce(j.retention_keep_yearly, 0) = 0 THEN
        RAISE EXCEPTION 'the retention of job "%" keeps no backup', j.name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Set a keep count above 0, retention_full_count or retention_window; or leave them all NULL to use walshipper''s configured policy.';
    END IF;
    -- A recovery window shorter than the time between two full backups can
    -- only be met by keeping the previous full backup as well: refuse the
    -- promise. The gaps are those of the schedule's next 50 firings on a
    -- calendar without DST changes (UTC: the time zone only shifts them, and
    -- a daily job stays one day apart), compared in calendar arithmetic (a
    -- '1 mon' window covers monthly backups).
    IF j.kind = 'full' AND j.retention_window IS NOT NULL THEN
        t := backup.cron_next(j.schedule, 'UTC', now());
        FOR i IN 1..50 LOOP
            t2 := backup.cron_next(j.schedule, 'UTC', t);
            gap := (t2 AT TIME ZONE 'UTC') - (t AT TIME ZONE 'UTC');
            longest := greatest(longest, gap);
            uncovered := uncovered OR (t AT TIME ZONE 'UTC') + j.retention_window < (t2 AT TIME ZONE 'UTC');
            t := t2;
        END LOOP;
        IF uncovered THEN
            RAISE EXCEPTION 'retention_window % is shorter than the % between full backups of job "%"',
                            j.retention_window, longest, j.name
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = format('Full backups up to %s apart cannot give a recovery window of %s without keeping the previous full backup too: '
                                    'set retention_window to at least %s, or schedule full backups more often.',
                                    longest, j.retention_window, longest);
        END IF;
    END IF;
    SELECT b.name INTO other FROM backup.backup_jobs b
     WHERE b.active AND b.schedule = j.schedule AND b.timezone = j.timezone AND b.kind = j.kind
       AND b.job_id IS DISTINCT FROM j.job_id AND b.name <> j.name
     LIMIT 1;
    IF other IS NOT NULL THEN
        RAISE EXCEPTION 'job "%" already runs % backups on schedule "%" in %', other, j.kind, j.schedule, j.timezone
            USING ERRCODE = 'unique_violation',
                  HINT = 'Two jobs doing the same thing at the same moment would only compete; alter or drop the other job.';
    END IF;
END
$$;

-- Expiry after a job's backup applies that job's retention to the whole
-- repository: warn when active jobs disagree about it.
CREATE FUNCTION backup._warn_retention_conflict(j backup.backup_jobs)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    mine jsonb := backup._job_retention(j);
    o record;
BEGIN
    SELECT b.name, backup._job_retention(b) AS retention INTO o FROM backup.backup_jobs b
     WHERE b.active AND b.job_id IS DISTINCT FROM j.job_id AND b.name <> j.name
       AND backup._job_retention(b) <> mine
     ORDER BY b.name LIMIT 1;
    IF FOUND THEN
        RAISE WARNING 'jobs "%" and "%" have different retention (% and %)', j.name, o.name,
                      CASE WHEN mine = '{}' THEN 'walshipper''s configured policy' ELSE mine::text END,
                      CASE WHEN o.retention = '{}' THEN 'walshipper''s configured policy' ELSE o.retention::text END
            USING HINT = 'Expiry applies the retention of the job whose backup finished last to the whole repository. '
                         'Give every job the same retention, or leave it NULL on every job and set it in walshipper''s configuration.';
    END IF;
END
$$;

CREATE FUNCTION backup.job_create(name text, schedule text, kind text DEFAULT 'full',
                                  timezone text DEFAULT 'UTC',
                                  retention_full_count integer DEFAULT NULL,
                                  retention_window interval DEFAULT NULL,
                                  options jsonb DEFAULT '{}', active boolean DEFAULT true,
                                  retention_keep_daily integer DEFAULT NULL,
                                  retention_keep_weekly integer DEFAULT NULL,
                                  retention_keep_monthly integer DEFAULT NULL,
                                  retention_keep_yearly integer DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql
AS $$
DECLARE
    j backup.backup_jobs;
    id bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM backup.backup_jobs b WHERE b.name = job_create.name) THEN
        RAISE EXCEPTION 'backup job "%" already exists', job_create.name
            USING ERRCODE = 'duplicate_object', HINT = 'Choose another name, or use backup.job_alter().';
    END IF;
    j.name := job_create.name;
    j.kind := job_create.kind;
    j.schedule := job_create.schedule;
    j.timezone := job_create.timezone;
    j.active := job_create.active;
    j.retention_full_count := job_create.retention_full_count;
    j.retention_window := job_create.retention_window;
    j.retention_keep_daily := job_create.retention_keep_daily;
    j.retention_keep_weekly := job_create.retention_keep_weekly;
    j.retention_keep_monthly := job_create.retention_keep_monthly;
    j.retention_keep_yearly := job_create.retention_keep_yearly;
    PERFORM backup._check_job(j);
    IF options IS NULL OR jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION 'options must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF j.active THEN
        PERFORM backup._warn_retention_conflict(j);
    END IF;
    INSERT INTO backup.backup_jobs (name, kind, schedule, timezone, active, retention_full_count, retention_window,
                                    retention_keep_daily, retention_keep_weekly, retention_keep_monthly,
                                    retention_keep_yearly, options, next_run_at)
    VALUES (j.name, j.kind, j.schedule, j.timezone, j.active, j.retention_full_count, j.retention_window,
            j.retention_keep_daily, j.retention_keep_weekly, j.retention_keep_monthly, j.retention_keep_yearly,
            job_create.options, backup.cron_next(j.schedule, j.timezone, now()))
    RETURNING job_id INTO id;
    PERFORM backup._audit('create', 'job', j.name,
        jsonb_build_object('schedule', j.schedule, 'kind', j.kind, 'timezone', j.timezone,
                           'retention', backup._job_retention(j)));
    RETURN id;
END
$$;

CREATE FUNCTION backup.job_alter(name text, schedule text DEFAULT NULL, kind text DEFAULT NULL,
                                 timezone text DEFAULT NULL,
                                 retention_full_count integer DEFAULT NULL,
                                 retention_window interval DEFAULT NULL,
                                 options jsonb DEFAULT NULL,
                                 retention_keep_daily integer DEFAULT NULL,
                                 retention_keep_weekly integer DEFAULT NULL,
                                 retention_keep_monthly integer DEFAULT NULL,
                                 retention_keep_yearly integer DEFAULT NULL)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    j backup.backup_jobs;
BEGIN
    SELECT * INTO j FROM backup.backup_jobs b WHERE b.name = job_alter.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'backup job "%" does not exist', job_alter.name
            USING ERRCODE = 'undefined_object', HINT = 'See SELECT name FROM backup.backup_jobs.';
    END IF;
    j.schedule := coalesce(job_alter.schedule, j.schedule);
    j.kind := coalesce(job_alter.kind, j.kind);
    j.timezone := coalesce(job_alter.timezone, j.timezone);
    j.retention_full_count := coalesce(job_alter.retention_full_count, j.retention_full_count);
    j.retention_window := coalesce(job_alter.retention_window, j.retention_window);
    j.retention_keep_daily := coalesce(job_alter.retention_keep_daily, j.retention_keep_daily);
    j.retention_keep_weekly := coalesce(job_alter.retention_keep_weekly, j.retention_keep_weekly);
    j.retention_keep_monthly := coalesce(job_alter.retention_keep_monthly, j.retention_keep_monthly);
    j.retention_keep_yearly := coalesce(job_alter.retention_keep_yearly, j.retention_keep_yearly);
    j.options := coalesce(job_alter.options, j.options);
    PERFORM backup._check_job(j);
    IF j.active THEN
        PERFORM backup._warn_retention_conflict(j);
    END IF;
    UPDATE backup.backup_jobs b
       SET schedule = j.schedule, kind = j.kind, timezone = j.timezone,
           retention_full_count = j.retention_full_count, retention_window = j.retention_window,
           retention_keep_daily = j.retention_keep_daily, retention_keep_weekly = j.retention_keep_weekly,
           retention_keep_monthly = j.retention_keep_monthly, retention_keep_yearly = j.retention_keep_yearly,
           options = j.options, updated_by = current_user, updated_at = now(),
           next_run_at = backup.cron_next(j.schedule, j.timezone, now())
     WHERE b.job_id = j.job_id;
    PERFORM backup._audit('alter', 'job', j.name,
        jsonb_build_object('schedule', j.schedule, 'kind', j.kind, 'timezone', j.timezone,
                           'retention', backup._job_retention(j)));
END
$$;

CREATE FUNCTION backup.job_enable(name text, enabled boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    j backup.backup_jobs;
BEGIN
    SELECT * INTO j FROM backup.backup_jobs b WHERE b.name = job_enable.name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'backup job "%" does not exist', job_enable.name
            USING ERRCODE = 'undefined_object', HINT = 'See SELECT name FROM backup.backup_jobs.';
    END IF;
    IF enabled THEN
        PERFORM backup._check_job(j);
        PERFORM backup._warn_retention_conflict(j);
    END IF;
    UPDATE backup.backup_jobs b SET active = enabled, updated_by = current_user, updated_at = now(),
           next_run_at = backup.cron_next(j.schedule, j.timezone, now())
     WHERE b.job_id = j.job_id;
    PERFORM backup._audit(CASE WHEN enabled THEN 'enable' ELSE 'disable' END, 'job', j.name);
END
$$;

CREATE FUNCTION backup.job_drop(name text)
RETURNS void LANGUAGE plpgsql
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM backup.backup_executions e JOIN backup.backup_jobs b USING (job_id)
                WHERE b.name = job_drop.name AND e.status IN ('queued', 'running')) THEN
        RAISE EXCEPTION 'backup job "%" has a run in progress', job_drop.name
            USING ERRCODE = 'object_in_use', HINT = 'Wait for it, or cancel it with backup.backup_cancel().';
    END IF;
    DELETE FROM backup.backup_jobs b WHERE b.name = job_drop.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'backup job "%" does not exist', job_drop.name
            USING ERRCODE = 'undefined_object', HINT = 'See SELECT name FROM backup.backup_jobs.';
    END IF;
    PERFORM backup._audit('drop', 'job', job_drop.name);
END
$$;

CREATE FUNCTION backup.restore_point_create(name text, note text DEFAULT NULL)
RETURNS pg_lsn LANGUAGE plpgsql
AS $$
DECLARE
    at_lsn pg_lsn;
BEGIN
    IF name IS NULL OR length(name) NOT BETWEEN 1 AND 63 THEN
        RAISE EXCEPTION 'invalid restore point name "%"', name
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use 1 to 63 characters.';
    END IF;
    -- The name goes into postgresql.auto.conf (recovery_target_name) and
    -- into shell commands: control characters (a newline ends a setting and
    -- starts another) and backslashes (escapes) are refused.
    IF name ~ '[[:cntrl:]]' OR position(chr(92) IN name) > 0 THEN
        RAISE EXCEPTION 'invalid restore point name %: control characters and backslashes are not allowed', to_json(name)::text
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use printable characters other than a backslash.';
    END IF;
    IF EXISTS (SELECT 1 FROM backup.restore_points r WHERE r.name = restore_point_create.name) THEN
        RAISE EXCEPTION 'restore point "%" already exists', name
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Recovery stops at the first point of a name: give each point its own name.';
    END IF;
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION 'restore points can only be created on a primary'
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    at_lsn := pg_create_restore_point(name);
    INSERT INTO backup.restore_points (name, lsn, timeline, note)
    VALUES (name, at_lsn, (SELECT timeline_id FROM pg_control_checkpoint()), note);
    PERFORM backup._audit('create', 'restore_point', name, jsonb_build_object('lsn', at_lsn::text));
    -- Archive it promptly: a point is only a target once its WAL is in the repository.
    PERFORM pg_switch_wal();
    RETURN at_lsn;
END
$$;

