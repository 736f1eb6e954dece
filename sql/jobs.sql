-- Job management and restore points: thin SQL over the catalog. Every
-- change is written to backup.audit_log. Bad input raises an error with a hint.

CREATE FUNCTION backup.cron_next(schedule text, timezone text DEFAULT 'UTC', after timestamptz DEFAULT now())
RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT to_timestamp(backup.cron_next_epoch(schedule, timezone, extract(epoch FROM after)::float8)) $$;
COMMENT ON FUNCTION backup.cron_next(text, text, timestamptz) IS 'Next time a 5-field cron schedule fires after a time, in a time zone.';

CREATE FUNCTION backup._audit(p_action text, p_type text, p_name text, p_details jsonb DEFAULT '{}')
RETURNS void LANGUAGE sql
AS $$ INSERT INTO backup.audit_log (action, object_type, object_name, details) VALUES (p_action, p_type, p_name, p_details) $$;

CREATE FUNCTION backup._check_job(p_name text, p_kind text, p_schedule text, p_timezone text,
                                  p_retention_full_count integer, p_retention_window interval,
                                  p_exclude_job bigint)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    other text;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid job name "%"', p_name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 63 letters, digits, "_", "." or "-", starting with a letter, digit or "_".';
    END IF;
    IF p_kind IS NULL OR p_kind NOT IN ('full', 'diff', 'incr') THEN
        RAISE EXCEPTION 'unknown backup kind "%"', p_kind
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use full, diff or incr.';
    END IF;
    IF p_kind <> 'full' THEN
        RAISE EXCEPTION 'backup kind "%" is not available yet', p_kind
            USING ERRCODE = 'feature_not_supported', HINT = 'Use full for now.';
    END IF;
    IF p_timezone IS NULL OR NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = p_timezone) THEN
        RAISE EXCEPTION 'unknown time zone "%"', p_timezone
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use a name from pg_timezone_names, such as UTC or Europe/Berlin.';
    END IF;
    PERFORM backup.cron_check(p_schedule, p_timezone);
    IF p_retention_full_count IS NOT NULL AND p_retention_full_count < 1 THEN
        RAISE EXCEPTION 'retention_full_count must be at least 1, not %', p_retention_full_count
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_retention_window IS NOT NULL AND p_retention_window <= interval '0' THEN
        RAISE EXCEPTION 'retention_window must be positive, not %', p_retention_window
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT name INTO other FROM backup.backup_jobs
     WHERE active AND schedule = p_schedule AND timezone = p_timezone AND kind = p_kind
       AND job_id IS DISTINCT FROM p_exclude_job AND name <> p_name
     LIMIT 1;
    IF other IS NOT NULL THEN
        RAISE EXCEPTION 'job "%" already runs % backups on schedule "%" in %', other, p_kind, p_schedule, p_timezone
            USING ERRCODE = 'unique_violation',
                  HINT = 'Two jobs doing the same thing at the same moment would only compete; alter or drop the other job.';
    END IF;
END
$$;

CREATE FUNCTION backup.job_create(name text, schedule text, kind text DEFAULT 'full',
                                  timezone text DEFAULT 'UTC',
                                  retention_full_count integer DEFAULT NULL,
                                  retention_window interval DEFAULT NULL,
                                  options jsonb DEFAULT '{}', active boolean DEFAULT true)
RETURNS bigint LANGUAGE plpgsql
AS $$
DECLARE
    id bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM backup.backup_jobs j WHERE j.name = job_create.name) THEN
        RAISE EXCEPTION 'backup job "%" already exists', job_create.name
            USING ERRCODE = 'duplicate_object', HINT = 'Choose another name, or use backup.job_alter().';
    END IF;
    PERFORM backup._check_job(job_create.name, job_create.kind, job_create.schedule, job_create.timezone,
                              job_create.retention_full_count, job_create.retention_window, NULL);
    IF options IS NULL OR jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION 'options must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO backup.backup_jobs (name, kind, schedule, timezone, active, retention_full_count, retention_window, options, next_run_at)
    VALUES (job_create.name, job_create.kind, job_create.schedule, job_create.timezone, job_create.active,
            job_create.retention_full_count, job_create.retention_window, job_create.options,
            backup.cron_next(job_create.schedule, job_create.timezone, now()))
    RETURNING job_id INTO id;
    PERFORM backup._audit('create', 'job', job_create.name,
        jsonb_build_object('schedule', job_create.schedule, 'kind', job_create.kind, 'timezone', job_create.timezone));
    RETURN id;
END
$$;

CREATE FUNCTION backup.job_alter(name text, schedule text DEFAULT NULL, kind text DEFAULT NULL,
                                 timezone text DEFAULT NULL,
                                 retention_full_count integer DEFAULT NULL,
                                 retention_window interval DEFAULT NULL,
                                 options jsonb DEFAULT NULL)
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
    j.options := coalesce(job_alter.options, j.options);
    PERFORM backup._check_job(j.name, j.kind, j.schedule, j.timezone, j.retention_full_count, j.retention_window, j.job_id);
    UPDATE backup.backup_jobs b
       SET schedule = j.schedule, kind = j.kind, timezone = j.timezone,
           retention_full_count = j.retention_full_count, retention_window = j.retention_window,
           options = j.options, updated_by = current_user, updated_at = now(),
           next_run_at = backup.cron_next(j.schedule, j.timezone, now())
     WHERE b.job_id = j.job_id;
    PERFORM backup._audit('alter', 'job', j.name,
        jsonb_build_object('schedule', j.schedule, 'kind', j.kind, 'timezone', j.timezone));
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
        PERFORM backup._check_job(j.name, j.kind, j.schedule, j.timezone, j.retention_full_count, j.retention_window, j.job_id);
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

