-- Running backups: requests from SQL, the scheduler's side of the catalog,
-- alerts, and the status views. The background worker (src/worker.rs) calls
-- the backup._sched_* functions; walshipper does the bytes.

-- Advisory lock keys: (0x70676200, job_id) serialises the runs of one job
-- between the worker and a session running backup_run(wait => true).
CREATE FUNCTION backup._job_lock_key() RETURNS integer LANGUAGE sql IMMUTABLE AS $$ SELECT 1885823488 $$;
-- (0x70676201, 0), session-level: the scheduler holds it exclusively while
-- walshipper expire runs, a backup_run(wait => true) worker shared while its
-- backup runs (walshipper would refuse one of them with exit 7).
CREATE FUNCTION backup._repo_lock_key() RETURNS integer LANGUAGE sql IMMUTABLE AS $$ SELECT 1885823489 $$;

-- kind NULL: the job's kind (full for a one-off backup).
CREATE FUNCTION backup.backup_run(job_name text DEFAULT NULL, kind text DEFAULT NULL, wait boolean DEFAULT false)
RETURNS bigint LANGUAGE plpgsql
AS $$
DECLARE
    j backup.backup_jobs;
    id bigint;
BEGIN
    IF job_name IS NOT NULL THEN
        SELECT * INTO j FROM backup.backup_jobs b WHERE b.name = job_name;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'backup job "%" does not exist', job_name
                USING ERRCODE = 'undefined_object', HINT = 'Omit job_name for a one-off backup, or see backup.backup_jobs.';
        END IF;
    END IF;
    kind := coalesce(kind, j.kind, 'full');
    IF kind NOT IN ('full', 'diff', 'incr') THEN
        RAISE EXCEPTION 'unknown backup kind "%"', kind USING ERRCODE = 'invalid_parameter_value', HINT = 'Use full, diff or incr.';
    END IF;
    IF job_name IS NOT NULL THEN
        IF NOT pg_try_advisory_xact_lock(backup._job_lock_key(), j.job_id::integer)
           OR EXISTS (SELECT 1 FROM backup.backup_executions e WHERE e.job_id = j.job_id AND e.status IN ('queued', 'running')) THEN
            RAISE EXCEPTION 'backup job "%" already has a run queued or running', job_name
                USING ERRCODE = 'object_in_use', HINT = 'See backup.running_backups; cancel with backup.backup_cancel(execution_id).';
        END IF;
    END IF;
    IF NOT wait THEN
        INSERT INTO backup.backup_executions (job_id, kind) VALUES (j.job_id, kind)
        RETURNING execution_id INTO id;
        PERFORM backup._audit('run', 'backup', coalesce(job_name, 'manual'), jsonb_build_object('execution_id', id));
        PERFORM pg_notify('backup_requests', id::text);
        RETURN id;
    END IF;
    -- A worker of its own runs it and records it in its own transactions, so
    -- the outcome is kept even if this statement ends in an error.
    id := backup._run_in_worker(j.job_id, kind);
    IF (SELECT status FROM backup.backup_executions e WHERE e.execution_id = id) <> 'succeeded' THEN
        RAISE EXCEPTION 'backup % failed: %', id, (SELECT error FROM backup.backup_executions e WHERE e.execution_id = id)
            USING HINT = 'The run is recorded in backup.backup_executions; the server log has details.';
    END IF;
    PERFORM backup._audit('run', 'backup', coalesce(job_name, 'manual'), jsonb_build_object('execution_id', id, 'wait', true));
    RETURN id;
END
$$;

CREATE FUNCTION backup.backup_cancel(execution_id bigint)
RETURNS void LANGUAGE plpgsql
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

-- Raises an alert once per open (kind, subject) and notifies listeners.
CREATE FUNCTION backup._raise_alert(p_kind text, p_severity text, p_subject text, p_message text, p_details jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO backup.alerts (kind, severity, subject, message, details)
    VALUES (p_kind, p_severity, p_subject, p_message, p_details)
    ON CONFLICT (kind, subject) WHERE resolved_at IS NULL DO NOTHING
    RETURNING alert_id INTO new_id;
    IF new_id IS NOT NULL THEN
        PERFORM pg_notify('backup_alerts', jsonb_build_object('alert_id', new_id, 'kind', p_kind,
            'severity', p_severity, 'subject', p_subject, 'message', p_message)::text);
    END IF;
END
$$;

CREATE FUNCTION backup._resolve_alert(p_kind text, p_subject text)
RETURNS void LANGUAGE sql
AS $$ UPDATE backup.alerts SET resolved_at = now() WHERE kind = p_kind AND subject = p_subject AND resolved_at IS NULL $$;

-- Worker start: runs left 'running' by a crash or restart did not finish.
CREATE FUNCTION backup._sched_fail_stale()
RETURNS integer LANGUAGE plpgsql
AS $$
DECLARE
    n integer;
BEGIN
    UPDATE backup.backup_executions e
       SET status = 'failed', finished_at = greatest(now(), e.queued_at),
           error = 'interrupted: the server or the scheduler restarted during the run'
     WHERE e.status = 'running'
       AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = e.worker_pid AND a.pid <> pg_backend_pid());
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Queues due jobs, then claims up to p_slots queued runs for the worker.
CREATE FUNCTION backup._sched_claim(p_slots integer)
RETURNS TABLE (execution_id bigint, kind text) LANGUAGE plpgsql
AS $$
DECLARE
    j record;
BEGIN
    FOR j IN SELECT * FROM backup.backup_jobs b WHERE b.active AND b.next_run_at <= now() ORDER BY b.next_run_at FOR UPDATE SKIP LOCKED LOOP
        IF pg_try_advisory_xact_lock(backup._job_lock_key(), j.job_id::integer)
           AND NOT EXISTS (SELECT 1 FROM backup.backup_executions e WHERE e.job_id = j.job_id AND e.status IN ('queued', 'running')) THEN
            INSERT INTO backup.backup_executions (job_id, kind, requested_by) VALUES (j.job_id, j.kind, 'scheduler');
        END IF;
        -- A run still going when the next is due skips that slot (never two at once).
        UPDATE backup.backup_jobs b SET next_run_at = backup.cron_next(j.schedule, j.timezone, now()) WHERE b.job_id = j.job_id;
    END LOOP;
    IF p_slots <= 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE backup.backup_executions e
       SET status = 'running', started_at = now(), worker_pid = pg_backend_pid()
     WHERE e.execution_id IN (SELECT q.execution_id FROM backup.backup_executions q
                               WHERE q.status = 'queued' AND q.not_before <= now()
                               ORDER BY q.queued_at LIMIT p_slots FOR UPDATE SKIP LOCKED)
    RETURNING e.execution_id, e.kind;
END
$$;

CREATE FUNCTION backup._sched_progress(p_id bigint, p_done bigint, p_total bigint)
RETURNS boolean LANGUAGE sql
AS $$
    UPDATE backup.backup_executions SET bytes_done = p_done, bytes_total = p_total WHERE execution_id = p_id;
    SELECT cancel_requested FROM backup.backup_executions WHERE execution_id = p_id;
$$;

-- Records the end of a run. On failure: an alert, and a retry if the job allows one.
CREATE FUNCTION backup._sched_finish(p_id bigint, p_status text, p_summary jsonb, p_error text,
                                     p_retry_max integer, p_retry_delay integer)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    e backup.backup_executions;
    jname text;
BEGIN
    UPDATE backup.backup_executions x
       SET status = p_status, finished_at = greatest(now(), coalesce(x.started_at, x.queued_at)),
           error = CASE WHEN p_status = 'succeeded' THEN NULL ELSE coalesce(p_error, 'unknown error') END,
           summary = p_summary,
           -- What walshipper took: a full backup when a diff or incr had no base.
           kind = CASE WHEN p_status = 'succeeded' AND p_summary->>'type' IN ('full', 'diff', 'incr')
                       THEN p_summary->>'type' ELSE x.kind END,
           backup_id = p_summary->>'backup_id',
           start_lsn = (p_summary->>'start_lsn')::pg_lsn,
           stop_lsn = (p_summary->>'stop_lsn')::pg_lsn,
           timeline = (p_summary->>'timeline')::integer,
           size_bytes = (p_summary->>'size')::bigint,
           stored_bytes = (p_summary->>'stored_size')::bigint,
           bytes_done = coalesce((p_summary->>'size')::bigint, x.bytes_done)
     WHERE x.execution_id = p_id
    RETURNING * INTO e;
    SELECT name INTO jname FROM backup.backup_jobs WHERE job_id = e.job_id;
    IF p_status = 'failed' THEN
        PERFORM backup._raise_alert('backup_failed', 'critical', coalesce(jname, 'manual'),
            format('backup %s (%s) failed: %s', p_id, coalesce(jname, 'manual'), e.error),
            jsonb_build_object('execution_id', p_id, 'attempt', e.attempt));
        IF e.job_id IS NOT NULL AND e.attempt <= p_retry_max THEN
            INSERT INTO backup.backup_executions (job_id, kind, requested_by, attempt, not_before)
            VALUES (e.job_id, e.kind, 'scheduler', e.attempt + 1, now() + make_interval(secs => p_retry_delay));
        END IF;
    ELSIF p_status = 'succeeded' THEN
        PERFORM backup._resolve_alert('backup_failed', coalesce(jname, 'manual'));
    END IF;
END
$$;

-- Health alerts: jobs overdue, WAL archiving failing, RPO above target.
CREATE FUNCTION backup._sched_check_health(p_rpo_target integer, p_overdue_grace integer)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    a pg_stat_archiver;
    rpo interval;
    j record;
    n1 timestamptz;
    period interval;
    last_ok timestamptz;
BEGIN
    -- A job is overdue when its last success is older than one period of
    -- its schedule plus the grace time.
    FOR j IN SELECT * FROM backup.backup_jobs WHERE active LOOP
        n1 := backup.cron_next(j.schedule, j.timezone, now());
        period := backup.cron_next(j.schedule, j.timezone, n1) - n1;
        SELECT max(finished_at) INTO last_ok FROM backup.backup_executions
         WHERE job_id = j.job_id AND status = 'succeeded';
        IF coalesce(last_ok, j.created_at) < now() - period - make_interval(secs => p_overdue_grace) THEN
            PERFORM backup._raise_alert('job_overdue', 'warning', j.name,
                format('backup job %s has not succeeded since %s (it runs every %s)',
                       j.name, coalesce(last_ok::text, 'its creation'), period));
        ELSE
            PERFORM backup._resolve_alert('job_overdue', j.name);
        END IF;
    END LOOP;
    PERFORM backup._resolve_alert('job_overdue', name) FROM backup.backup_jobs WHERE NOT active;

    SELECT * INTO a FROM pg_stat_archiver;
    IF a.last_failed_time IS NOT NULL AND a.last_failed_time > coalesce(a.last_archived_time, '-infinity') THEN
        PERFORM backup._raise_alert('archive_failing', 'critical', 'archiver',
            format('WAL archiving is failing (last failure on %s at %s)', a.last_failed_wal, a.last_failed_time),
            jsonb_build_object('failed_count', a.failed_count, 'last_failed_wal', a.last_failed_wal));
    ELSE
        PERFORM backup._resolve_alert('archive_failing', 'archiver');
    END IF;
    SELECT w.rpo_estimate INTO rpo FROM backup.wal_archive_status w;
    IF rpo IS NOT NULL AND rpo > make_interval(secs => p_rpo_target) THEN
        PERFORM backup._raise_alert('rpo_exceeded', 'warning', 'archiver',
            format('WAL not archived for %s, above the RPO target of %s', date_trunc('second', rpo), make_interval(secs => p_rpo_target)));
    ELSE
        PERFORM backup._resolve_alert('rpo_exceeded', 'archiver');
    END IF;
END
$$;

CREATE VIEW backup.wal_archive_status AS
SELECT a.archived_count, a.last_archived_wal, a.last_archived_time,
       now() - a.last_archived_time AS last_archived_age,
       a.failed_count, a.last_failed_wal, a.last_failed_time,
       pg_walfile_name(pg_current_wal_lsn()) AS current_wal,
       -- Data at risk: everything since the last archived segment, if WAL was written since.
       CASE WHEN a.last_archived_wal IS NULL THEN NULL
            WHEN pg_walfile_name(pg_current_wal_lsn()) > a.last_archived_wal
                 AND pg_current_wal_lsn() > ('0/0'::pg_lsn + 0) THEN now() - a.last_archived_time
            ELSE interval '0' END AS rpo_estimate,
       coalesce(nullif(current_setting('pg_backup.rpo_target', true), ''), '900s')::interval AS rpo_target
  FROM pg_stat_archiver a;

CREATE VIEW backup.job_status AS
SELECT j.name, j.kind, j.schedule, j.timezone, j.active,
       s.last_success, f.last_failure,
       coalesce(c.consecutive_failures, 0) AS consecutive_failures,
       j.next_run_at AS next_run,
       CASE WHEN NOT j.active THEN 'disabled'
            WHEN r.running THEN 'running'
            WHEN coalesce(c.consecutive_failures, 0) > 0 THEN 'failing'
            WHEN s.last_success IS NULL THEN 'never succeeded'
            ELSE 'ok' END AS health,
       s.last_backup_id, s.last_backup_type,
       coalesce(k.backups_kept, 0) AS backups_kept
  FROM backup.backup_jobs j
  LEFT JOIN LATERAL (SELECT e.finished_at AS last_success, e.backup_id AS last_backup_id, e.kind AS last_backup_type
                       FROM backup.backup_executions e
                      WHERE e.job_id = j.job_id AND e.status = 'succeeded'
                      ORDER BY e.finished_at DESC LIMIT 1) s ON true
  -- Backups of this job still in the repository (expiry has not removed them).
  LEFT JOIN LATERAL (SELECT count(*) AS backups_kept FROM backup.backup_executions e
                      WHERE e.job_id = j.job_id AND e.status = 'succeeded' AND e.expired_at IS NULL) k ON true
  LEFT JOIN LATERAL (SELECT max(finished_at) AS last_failure FROM backup.backup_executions e
                      WHERE e.job_id = j.job_id AND e.status = 'failed') f ON true
  LEFT JOIN LATERAL (SELECT count(*) AS consecutive_failures FROM backup.backup_executions e
                      WHERE e.job_id = j.job_id AND e.status = 'failed'
                        AND e.finished_at > coalesce(s.last_success, '-infinity')) c ON true
  LEFT JOIN LATERAL (SELECT bool_or(e.status IN ('queued', 'running')) AS running FROM backup.backup_executions e
                      WHERE e.job_id = j.job_id) r ON true;

CREATE VIEW backup.running_backups AS
SELECT e.execution_id, j.name AS job, e.kind, e.status, e.started_at, now() - e.started_at AS elapsed,
       e.bytes_done, e.bytes_total,
       round(100.0 * e.bytes_done / nullif(e.bytes_total, 0), 1) AS percent
  FROM backup.backup_executions e LEFT JOIN backup.backup_jobs j USING (job_id)
 WHERE e.status IN ('queued', 'running');

-- The backups a backup needs to be restored, from its full backup to itself.
CREATE FUNCTION backup._backup_chain(e backup.backup_executions)
RETURNS text[] LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN jsonb_typeof(e.summary->'chain') = 'array' AND jsonb_array_length(e.summary->'chain') > 0
                THEN ARRAY(SELECT jsonb_array_elements_text(e.summary->'chain'))
                ELSE ARRAY[e.backup_id] END
$$;

-- Succeeded backups that expiry has not removed and whose chain it has not
-- broken: what the catalog knows to be restorable.
CREATE FUNCTION backup._restorable()
RETURNS SETOF backup.backup_executions LANGUAGE sql STABLE
AS $$
    SELECT x.* FROM backup.backup_executions x
     WHERE x.status = 'succeeded' AND x.expired_at IS NULL
       AND NOT EXISTS (SELECT 1 FROM backup.backup_executions y
                        WHERE y.expired_at IS NOT NULL AND y.backup_id = ANY (backup._backup_chain(x)))
$$;

-- The newest restorable backup that ends at or before a moment, or an error
-- saying why there is none.
CREATE FUNCTION backup._restore_base(target_time timestamptz)
RETURNS backup.backup_executions LANGUAGE plpgsql STABLE
AS $$
DECLARE
    e backup.backup_executions;
    oldest timestamptz;
BEGIN
    SELECT * INTO e FROM backup._restorable() x
     WHERE (x.summary->>'stop_time')::timestamptz <= target_time
     ORDER BY (x.summary->>'stop_time')::timestamptz DESC LIMIT 1;
    IF FOUND THEN
        RETURN e;
    END IF;
    SELECT min((x.summary->>'stop_time')::timestamptz) INTO oldest FROM backup._restorable() x;
    IF EXISTS (SELECT 1 FROM backup.backup_executions x
                WHERE x.status = 'succeeded' AND x.expired_at IS NOT NULL
                  AND (x.summary->>'stop_time')::timestamptz <= target_time) THEN
        IF oldest IS NULL THEN
            RAISE EXCEPTION 'no backup ends before %: every recorded backup was removed by retention', target_time
                USING ERRCODE = 'no_data_found', HINT = 'Run SELECT backup.backup_run(wait => true) for a new one.';
        END IF;
        RAISE EXCEPTION 'no backup ends before %: backups before % were removed by retention', target_time, oldest
            USING ERRCODE = 'no_data_found',
                  HINT = 'Choose a later target. To reach further back, keep more backups: see the retention of '
                         'backup.backup_jobs, or walshipper''s configured policy.';
    END IF;
    RAISE EXCEPTION 'no backup ends before %', target_time
        USING ERRCODE = 'no_data_found',
              HINT = coalesce('The oldest recorded backup ends at ' || oldest::text || '; choose a later target.',
                              'No backup has succeeded yet: run SELECT backup.backup_run(wait => true).');
END
$$;

-- How to restore to a moment: which backup, which WAL, and the exact command.
-- The catalog mirrors the repository (it goes back in time with the
-- database); walshipper restore re-checks everything against the repository.
CREATE FUNCTION backup.restore_plan(target_time timestamptz, target_dir text DEFAULT NULL)
RETURNS TABLE (backup_id text, backup_stop_time timestamptz, wal_from text, wal_to text, command text,
               backup_type text, backup_chain text[])
LANGUAGE plpgsql
AS $$
DECLARE
    e backup.backup_executions;
    dir text := coalesce(target_dir, current_setting('data_directory') || '_restored');
    cfg text := coalesce(current_setting('pg_backup.walshipper_config', true), '/etc/walshipper/walshipper.toml');
    exe text := coalesce(current_setting('pg_backup.walshipper_path', true), '/usr/local/bin/walshipper');
    last_wal text;
    last_time timestamptz;
BEGIN
    IF target_time IS NULL THEN
        RAISE EXCEPTION 'target_time is required' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF target_time > now() THEN
        RAISE EXCEPTION 'the target time is in the future'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Choose a moment in the past.';
    END IF;
    e := backup._restore_base(target_time);
    SELECT a.last_archived_wal, a.last_archived_time INTO last_wal, last_time FROM pg_stat_archiver a;
    IF last_time IS NULL OR last_time < target_time THEN
        RAISE EXCEPTION 'the archived WAL does not reach % yet (last archived at %)', target_time, last_time
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Run SELECT pg_switch_wal() and wait for archiving, or choose an earlier target.';
    END IF;
    RETURN QUERY SELECT e.backup_id, (e.summary->>'stop_time')::timestamptz, e.summary->>'wal_start', last_wal,
        format('%s --config %s restore --target-dir %s --backup %s --target-time %s --target-action promote',
               quote_literal(exe), quote_literal(cfg), quote_literal(dir), e.backup_id,
               quote_literal(to_char(target_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00')),
        e.kind, backup._backup_chain(e);
END
$$;

CREATE FUNCTION backup.restore_plan(restore_point text, target_dir text DEFAULT NULL)
RETURNS TABLE (backup_id text, backup_stop_time timestamptz, wal_from text, wal_to text, command text,
               backup_type text, backup_chain text[])
LANGUAGE plpgsql
AS $$
DECLARE
    rp backup.restore_points;
    p record;
BEGIN
    SELECT * INTO rp FROM backup.restore_points r WHERE r.name = restore_point;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no restore point "%"', restore_point
            USING ERRCODE = 'undefined_object', HINT = 'See backup.restore_points, or create one with backup.restore_point_create().';
    END IF;
    SELECT * INTO p FROM backup.restore_plan(rp.created_at, target_dir);
    RETURN QUERY SELECT p.backup_id, p.backup_stop_time, p.wal_from, p.wal_to,
        replace(p.command, substring(p.command from ' --target-time .*$'),
                -- Shell-quoted: '...', each ' in the name written '\''.
                ' --target-name ' || '''' || replace(rp.name, '''', '''\''''') || '''' || ' --target-action promote'),
        p.backup_type, p.backup_chain;
END
$$;

-- The backups the catalog knows to be in the repository, oldest first
-- (expired ones left out: see backup_executions.expired_at for those).
CREATE VIEW backup.backups AS
SELECT e.backup_id,
       e.kind AS type,
       coalesce(e.summary->>'requested_type', e.kind) AS requested_type,
       e.summary->>'based_on' AS based_on,
       backup._backup_chain(e) AS chain,
       j.name AS job,
       (e.summary->>'start_time')::timestamptz AS start_time,
       (e.summary->>'stop_time')::timestamptz AS stop_time,
       e.start_lsn, e.stop_lsn, e.timeline,
       e.size_bytes, e.stored_bytes,
       e.execution_id
  FROM backup.backup_executions e
  LEFT JOIN backup.backup_jobs j USING (job_id)
 WHERE e.status = 'succeeded' AND e.expired_at IS NULL
 ORDER BY (e.summary->>'stop_time')::timestamptz, e.execution_id;

-- Expiry after a backup (run by the scheduler): walshipper expire's
-- retention flags from the retention of the backup's job. None (no job, or
-- none set): walshipper applies the policy of its configuration.
CREATE FUNCTION backup._sched_expire_args(p_execution_id bigint)
RETURNS text[] LANGUAGE plpgsql STABLE
AS $$
DECLARE
    j backup.backup_jobs;
    a text[] := '{}';
BEGIN
    SELECT b.* INTO j FROM backup.backup_executions e JOIN backup.backup_jobs b USING (job_id)
     WHERE e.execution_id = p_execution_id;
    IF NOT FOUND THEN
        RETURN a;
    END IF;
    IF j.retention_full_count IS NOT NULL THEN
        a := a || ARRAY['--keep-full', j.retention_full_count::text];
    END IF;
    IF j.retention_window IS NOT NULL THEN
        a := a || ARRAY['--recovery-window', ceil(extract(epoch FROM j.retention_window))::bigint::text || 's'];
    END IF;
    IF j.retention_keep_daily IS NOT NULL THEN
        a := a || ARRAY['--keep-daily', j.retention_keep_daily::text];
    END IF;
    IF j.retention_keep_weekly IS NOT NULL THEN
        a := a || ARRAY['--keep-weekly', j.retention_keep_weekly::text];
    END IF;
    IF j.retention_keep_monthly IS NOT NULL THEN
        a := a || ARRAY['--keep-monthly', j.retention_keep_monthly::text];
    END IF;
    IF j.retention_keep_yearly IS NOT NULL THEN
        a := a || ARRAY['--keep-yearly', j.retention_keep_yearly::text];
    END IF;
    IF num_nonnulls(j.retention_keep_daily, j.retention_keep_weekly, j.retention_keep_monthly, j.retention_keep_yearly) > 0 THEN
        a := a || ARRAY['--timezone', j.timezone];
    END IF;
    RETURN a;
END
$$;

-- Records the end of walshipper expire run after backup p_execution_id:
-- its report (`expire --json`), or NULL and the reason it failed. On success
-- an audit_log row (actor: the job's owner, or 'scheduler'), the removed
-- backups marked expired, and an open expire_failed alert resolved. Returns
-- the number of executions marked expired.
CREATE FUNCTION backup._sched_expire_done(p_report jsonb, p_execution_id bigint, p_error text DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql
AS $$
DECLARE
    jname text;
    who name;
    removed jsonb;
    kept jsonb;
    n integer := 0;
BEGIN
    SELECT b.name, b.created_by INTO jname, who
      FROM backup.backup_executions e JOIN backup.backup_jobs b USING (job_id)
     WHERE e.execution_id = p_execution_id;
    IF p_report IS NULL THEN
        PERFORM backup._raise_alert('expire_failed', 'warning', 'walshipper expire',
            format('expiry after backup %s failed: %s', p_execution_id, coalesce(p_error, 'unknown error')),
            jsonb_build_object('execution_id', p_execution_id, 'job', jname, 'error', p_error));
        RETURN 0;
    END IF;
    removed := CASE WHEN jsonb_typeof(p_report->'removed') = 'array' THEN p_report->'removed' ELSE '[]' END;
    kept := CASE WHEN jsonb_typeof(p_report->'kept') = 'array' THEN p_report->'kept' ELSE '[]' END;
    INSERT INTO backup.audit_log (actor, action, object_type, object_name, details)
    VALUES (coalesce(who, 'scheduler'), 'expire', 'repository', p_report->>'repository',
            (p_report - 'kept') || jsonb_build_object(
                'kept', (SELECT coalesce(jsonb_agg(k->'id'), '[]') FROM jsonb_array_elements(kept) k),
                'execution_id', p_execution_id, 'job', jname));
    IF coalesce((p_report->>'dry_run')::boolean, false) THEN
        RETURN 0;
    END IF;
    UPDATE backup.backup_executions e SET expired_at = now()
     WHERE e.status = 'succeeded' AND e.expired_at IS NULL
       AND e.backup_id IN (SELECT r->>'id' FROM jsonb_array_elements(removed) r);
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM backup._resolve_alert('expire_failed', 'walshipper expire');
    RETURN n;
END
$$;

-- The scheduler's report of `walshipper info --json` (NULL report: info
-- itself failed, with p_error). Raises/resolves repository_unavailable and
-- repository_lagging alerts.
CREATE FUNCTION backup._sched_repo_status(p_report jsonb, p_error text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    r jsonb;
    i integer := 0;
    primary_wal text;
BEGIN
    IF p_report IS NULL THEN
        UPDATE backup.repository_status
           SET ok = false, error = p_error, checked_at = now();
        PERFORM backup._raise_alert('repository_unavailable', 'critical', 'walshipper info',
            'walshipper info failed: ' || p_error);
        RETURN;
    END IF;
    PERFORM backup._resolve_alert('repository_unavailable', 'walshipper info');
    DELETE FROM backup.repository_status
     WHERE name NOT IN (SELECT x->>'name' FROM jsonb_array_elements(p_report->'repositories') x);
    FOR r IN SELECT * FROM jsonb_array_elements(p_report->'repositories') LOOP
        i := i + 1;
        INSERT INTO backup.repository_status AS s (name, type, location, ok, error, wal_segments,
               last_wal, backups, last_backup, last_backup_stop, position, checked_at)
        VALUES (r->>'name', r->>'type', r->>'location', (r->>'ok')::boolean, r->>'error',
               (r->>'segments')::bigint, r->>'last_wal', (r->>'backups')::integer,
               r->>'last_backup', (r->>'last_backup_stop_time')::timestamptz, i, now())
        ON CONFLICT (name) DO UPDATE SET type = EXCLUDED.type, location = EXCLUDED.location,
               ok = EXCLUDED.ok, error = EXCLUDED.error, wal_segments = EXCLUDED.wal_segments,
               last_wal = EXCLUDED.last_wal, backups = EXCLUDED.backups,
               last_backup = EXCLUDED.last_backup, last_backup_stop = EXCLUDED.last_backup_stop,
               position = EXCLUDED.position, checked_at = EXCLUDED.checked_at;
        IF (r->>'ok')::boolean THEN
            PERFORM backup._resolve_alert('repository_unavailable', r->>'name');
        ELSE
            PERFORM backup._raise_alert('repository_unavailable', 'critical', r->>'name',
                format('repository %s (%s) cannot be read: %s', r->>'name', r->>'location', r->>'error'));
        END IF;
    END LOOP;
    SELECT last_wal INTO primary_wal FROM backup.repository_status WHERE position = 1;
    FOR r IN SELECT to_jsonb(s) FROM backup.repository_status s WHERE position > 1 AND ok LOOP
        IF r->>'last_wal' IS DISTINCT FROM primary_wal THEN
            PERFORM backup._raise_alert('repository_lagging', 'warning', r->>'name',
                format('repository %s has WAL up to %s, the primary up to %s: run walshipper repo-sync',
                       r->>'name', coalesce(r->>'last_wal', 'nothing'), primary_wal));
        ELSE
            PERFORM backup._resolve_alert('repository_lagging', r->>'name');
        END IF;
    END LOOP;
END
$$;

-- One row per configured repository: where it is, whether it answers, how
-- far its WAL and backups reach, and how far it trails the primary.
CREATE VIEW backup.repositories AS
SELECT s.name,
       s.position = 1 AS is_primary,
       s.type,
       s.location,
       CASE WHEN NOT s.ok THEN 'unavailable'
            WHEN s.last_wal IS DISTINCT FROM p.last_wal THEN 'lagging'
            ELSE 'ok' END AS status,
       s.last_wal AS last_archived_wal,
       s.wal_segments,
       s.last_backup,
       s.last_backup_stop,
       s.backups,
       s.error,
       s.checked_at
  FROM backup.repository_status s
  LEFT JOIN backup.repository_status p ON p.position = 1
 ORDER BY s.position;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA backup FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA backup FROM PUBLIC;
GRANT EXECUTE ON FUNCTION backup.version(), backup.cron_next(text, text, timestamptz),
    backup.cron_next_epoch(text, text, float8), backup.cron_check(text, text) TO PUBLIC;
