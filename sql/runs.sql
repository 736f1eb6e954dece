-- Running backups on request: backup_run() queues one for the scheduler
-- or, with wait => true, runs it now in a background worker of its own
-- (src/lib.rs, src/worker.rs); backup_cancel() stops one.

-- Operator API. kind NULL: the job's kind (full for a one-off backup). A
-- job's run backs up to the job's repository, a one-off to the primary.
CREATE FUNCTION backup.backup_run(job_name text DEFAULT NULL, kind text DEFAULT NULL, wait boolean DEFAULT false)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    j backup.backup_jobs;
    id bigint;
    run backup.backup_executions;
BEGIN
    IF job_name IS NOT NULL THEN
        -- Locked until this transaction ends (with wait => true, until the
        -- backup has): the scheduler skips the job meanwhile. Not a key
        -- lock, so executions may still reference the job.
        SELECT * INTO j FROM backup.backup_jobs b WHERE b.name = job_name FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'backup job "%" does not exist', job_name
                USING ERRCODE = 'undefined_object', HINT = 'Omit job_name for a one-off backup, or see backup.backup_jobs.';
        END IF;
    END IF;
    IF j.kind IN ('verify', 'restore_test') THEN
        RAISE EXCEPTION 'job "%" is a % job, not a backup job', job_name, j.kind
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'Run it now with backup.verify_run() or backup.restore_test_run().';
    END IF;
    kind := coalesce(kind, j.kind, 'full');
    IF kind NOT IN ('full', 'diff', 'incr') THEN
        RAISE EXCEPTION 'unknown backup kind "%"', kind USING ERRCODE = 'invalid_parameter_value', HINT = 'Use full, diff or incr.';
    END IF;
    IF job_name IS NOT NULL THEN
        IF EXISTS (SELECT 1 FROM backup.backup_executions e WHERE e.job_id = j.job_id AND e.status IN ('queued', 'running')) THEN
            RAISE EXCEPTION 'backup job "%" already has a run queued or running', job_name
                USING ERRCODE = 'object_in_use', HINT = 'See backup.running_backups; cancel with backup.backup_cancel(execution_id).';
        END IF;
    END IF;
    IF NOT wait THEN
        INSERT INTO backup.backup_executions (job_id, kind, repository) VALUES (j.job_id, kind, j.repository)
        RETURNING execution_id INTO id;
        PERFORM backup._audit('run', 'backup', coalesce(job_name, 'manual'), jsonb_build_object('execution_id', id));
        PERFORM pg_notify('backup_requests', id::text);
        RETURN id;
    END IF;
    -- The id is taken here, so the caller knows it whatever happens; a
    -- worker of its own records the run, its audit row and its outcome in
    -- its own transactions, so they are kept even if this statement fails.
    id := nextval(pg_get_serial_sequence('backup.backup_executions', 'execution_id'));
    PERFORM backup._run_in_worker(id, j.job_id, kind,
                                  (SELECT r.oid::bigint FROM pg_roles r WHERE r.rolname = backup._caller()));
    SELECT * INTO run FROM backup.backup_executions x WHERE x.execution_id = id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the backup worker ended without recording run %', id
            USING HINT = 'See the server log.';
    END IF;
    IF run.status <> 'succeeded' THEN
        RAISE EXCEPTION 'backup % failed: %', id, run.error
            USING ERRCODE = 'external_routine_exception',
                  HINT = coalesce(run.error_hint || ' ', '') || format('The run is recorded: SELECT * FROM backup.backup_executions WHERE execution_id = %s.', id);
    END IF;
    RETURN id;
END
$$;

-- Operator API.
CREATE FUNCTION backup.backup_cancel(execution_id bigint)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    st text;
BEGIN
    SELECT status INTO st FROM backup.backup_executions e WHERE e.execution_id = backup_cancel.execution_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no backup execution %', execution_id USING ERRCODE = 'undefined_object';
    END IF;
    IF st = 'queued' THEN
        UPDATE backup.backup_executions e SET status = 'cancelled', finished_at = now(), error = 'cancelled before it started'
         WHERE e.execution_id = backup_cancel.execution_id;
    ELSIF st = 'running' THEN
        UPDATE backup.backup_executions e SET cancel_requested = true WHERE e.execution_id = backup_cancel.execution_id;
    ELSE
        RAISE EXCEPTION 'backup execution % already ended (%)', execution_id, st USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    PERFORM backup._audit('cancel', 'backup', execution_id::text);
END
$$;

