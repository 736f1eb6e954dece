-- Job management: thin SQL over the catalog. Every change is written to
-- backup.audit_log. Bad input raises an error with a hint.

CREATE FUNCTION backup.cron_next(schedule text, timezone text DEFAULT 'UTC', after timestamptz DEFAULT now())
RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT to_timestamp(backup.cron_next_epoch(schedule, timezone, extract(epoch FROM after)::float8)) $$;
COMMENT ON FUNCTION backup.cron_next(text, text, timestamptz) IS 'Next time a 5-field cron schedule fires after a time, in a time zone.';

-- Checks a job as it would be stored (j.job_id is NULL for a new job).
CREATE FUNCTION backup._check_job(j backup.backup_jobs)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    other text;
BEGIN
    IF j.name IS NULL OR j.name !~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid job name "%"', j.name
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 63 letters, digits, "_", "." or "-", starting with a letter, digit or "_".';
    END IF;
    IF j.kind IS NULL OR j.kind NOT IN ('full', 'diff', 'incr', 'verify', 'restore_test') THEN
        RAISE EXCEPTION 'unknown job kind "%"', j.kind
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use full, diff or incr (backups), verify (an integrity read-back) or restore_test.';
    END IF;
    IF j.timezone IS NULL OR NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = j.timezone) THEN
        RAISE EXCEPTION 'unknown time zone "%"', j.timezone
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use a name from pg_timezone_names, such as UTC or Europe/Berlin.';
    END IF;
    PERFORM backup.cron_check(j.schedule, j.timezone);
    IF j.repository IS NOT NULL THEN
        PERFORM backup._check_repository(j.repository);
    END IF;
    SELECT b.name INTO other FROM backup.backup_jobs b
     WHERE b.active AND b.schedule = j.schedule AND b.timezone = j.timezone AND b.kind = j.kind
       AND b.job_id IS DISTINCT FROM j.job_id AND b.name <> j.name
     LIMIT 1;
    IF other IS NOT NULL THEN
        RAISE EXCEPTION 'job "%" already runs % on schedule "%" in %', other,
                        CASE WHEN j.kind IN ('full', 'diff', 'incr') THEN j.kind || ' backups' ELSE j.kind END,
                        j.schedule, j.timezone
            USING ERRCODE = 'unique_violation',
                  HINT = 'Two jobs doing the same thing at the same moment would only compete; alter or drop the other job.';
    END IF;
END
$$;

-- Operator API (SECURITY DEFINER, see sql/security.sql): a scheduled job.
CREATE FUNCTION backup.job_create(name text, schedule text, kind text DEFAULT 'full',
                                  timezone text DEFAULT 'UTC', active boolean DEFAULT true,
                                  repository text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
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
    j.active := coalesce(job_create.active, true);
    j.repository := job_create.repository;
    PERFORM backup._check_job(j);
    INSERT INTO backup.backup_jobs (name, kind, schedule, timezone, active, repository, next_run_at)
    VALUES (j.name, j.kind, j.schedule, j.timezone, j.active, j.repository,
            backup.cron_next(j.schedule, j.timezone, now()))
    RETURNING job_id INTO id;
    PERFORM backup._audit('create', 'job', j.name,
        jsonb_build_object('schedule', j.schedule, 'kind', j.kind, 'timezone', j.timezone,
                           'active', j.active, 'repository', j.repository));
    RETURN id;
END
$$;

-- Changes only what is given.
CREATE FUNCTION backup.job_alter(name text, schedule text DEFAULT NULL, kind text DEFAULT NULL,
                                 timezone text DEFAULT NULL, repository text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
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
    j.repository := coalesce(job_alter.repository, j.repository);
    PERFORM backup._check_job(j);
    UPDATE backup.backup_jobs b
       SET schedule = j.schedule, kind = j.kind, timezone = j.timezone, repository = j.repository,
           updated_by = backup._caller(), updated_at = now(),
           next_run_at = backup.cron_next(j.schedule, j.timezone, now())
     WHERE b.job_id = j.job_id;
    PERFORM backup._audit('alter', 'job', j.name,
        jsonb_build_object('schedule', j.schedule, 'kind', j.kind, 'timezone', j.timezone,
                           'repository', j.repository));
END
$$;

CREATE FUNCTION backup.job_enable(name text, enabled boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
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
    END IF;
    UPDATE backup.backup_jobs b SET active = enabled, updated_by = backup._caller(), updated_at = now(),
           next_run_at = backup.cron_next(j.schedule, j.timezone, now())
     WHERE b.job_id = j.job_id;
    PERFORM backup._audit(CASE WHEN enabled THEN 'enable' ELSE 'disable' END, 'job', j.name);
END
$$;

CREATE FUNCTION backup.job_drop(name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
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

