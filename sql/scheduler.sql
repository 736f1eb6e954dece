-- The scheduler's side of the catalog: the background worker
-- (src/worker.rs) calls these backup._sched_* functions every second; they
-- are executable by the extension's owner only. walshipper does the bytes.

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
RETURNS TABLE (execution_id bigint, kind text, repository text) LANGUAGE plpgsql
AS $$
DECLARE
    j record;
    id bigint;
BEGIN
    FOR j IN SELECT * FROM backup.backup_jobs b WHERE b.active AND b.next_run_at <= now() ORDER BY b.next_run_at FOR UPDATE SKIP LOCKED LOOP
        IF j.kind IN ('verify', 'restore_test') THEN
            -- A check of the backups, recorded in backup.backup_verifications.
            IF NOT EXISTS (SELECT 1 FROM backup.backup_verifications v WHERE v.job_id = j.job_id AND v.status IN ('queued', 'running')) THEN
                PERFORM backup._recovery_enqueue(jsonb_build_object(
                    'table', 'verification', 'kind', CASE j.kind WHEN 'verify' THEN 'integrity' ELSE 'restore_test' END,
                    'repository', j.repository, 'job_id', j.job_id, 'job_name', j.name, 'scheduled', true), NULL, 'scheduler');
            END IF;
        ELSIF NOT EXISTS (SELECT 1 FROM backup.backup_executions e WHERE e.job_id = j.job_id AND e.status IN ('queued', 'running')) THEN
            INSERT INTO backup.backup_executions AS n (job_id, kind, requested_by, repository)
            VALUES (j.job_id, j.kind, 'scheduler', j.repository)
            RETURNING n.execution_id INTO id;
            PERFORM backup._audit('run', 'backup', j.name,
                jsonb_build_object('execution_id', id, 'scheduled', true, 'kind', j.kind), 'scheduler');
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
    RETURNING e.execution_id, e.kind, e.repository;
END
$$;

-- Progress, and whether cancellation was asked for. A row another
-- transaction holds (a cancel not yet committed) is skipped this time: the
-- scheduler never waits on a lock an operator's open transaction holds.
CREATE FUNCTION backup._sched_progress(p_id bigint, p_done bigint, p_total bigint)
RETURNS boolean LANGUAGE sql
AS $$
    UPDATE backup.backup_executions SET bytes_done = p_done, bytes_total = p_total
     WHERE execution_id = (SELECT x.execution_id FROM backup.backup_executions x
                            WHERE x.execution_id = p_id FOR UPDATE SKIP LOCKED);
    SELECT cancel_requested FROM backup.backup_executions WHERE execution_id = p_id;
$$;

-- Records the end of a run, with an audit row (actor: who asked for it,
-- or 'scheduler'). On failure: an alert, and a retry if the job allows one.
-- p_hint is walshipper's advice (its JSON error event), kept for the DBA.
CREATE FUNCTION backup._sched_finish(p_id bigint, p_status text, p_summary jsonb, p_error text,
                                     p_retry_max integer, p_retry_delay integer, p_hint text DEFAULT NULL,
                                     p_verify boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    e backup.backup_executions;
    jname text;
    retry_id bigint;
BEGIN
    -- walshipper's summary is checked before it is believed: its backup id
    -- lands in shell commands (restore_plan).
    IF p_status = 'succeeded'
       AND coalesce(p_summary->>'backup_id', '') !~ '^[0-9]{8}-[0-9]{6}[FDI]([1-9][0-9]{0,2})?$' THEN
        p_status := 'failed';
        p_error := format('walshipper reported success with an invalid backup id %s',
                          coalesce(to_json(left(p_summary->>'backup_id', 40))::text, 'NULL'));
        p_summary := NULL;
    END IF;
    UPDATE backup.backup_executions x
       SET status = p_status, finished_at = greatest(now(), coalesce(x.started_at, x.queued_at)),
           error = CASE WHEN p_status = 'succeeded' THEN NULL ELSE coalesce(p_error, 'unknown error') END,
           error_hint = CASE WHEN p_status = 'succeeded' THEN NULL ELSE p_hint END,
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
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT name INTO jname FROM backup.backup_jobs WHERE job_id = e.job_id;
    PERFORM backup._audit('finish', 'backup', coalesce(jname, 'manual'),
        jsonb_strip_nulls(jsonb_build_object('execution_id', p_id, 'status', p_status, 'backup_id', e.backup_id,
                                             'kind', e.kind, 'error', e.error, 'attempt', e.attempt)),
        e.requested_by);
    IF p_status = 'failed' THEN
        PERFORM backup._raise_alert('backup_failed', 'critical', coalesce(jname, 'manual'),
            format('backup %s (%s) failed: %s', p_id, coalesce(jname, 'manual'), e.error),
            jsonb_build_object('execution_id', p_id, 'attempt', e.attempt));
        IF e.job_id IS NOT NULL AND e.attempt <= p_retry_max THEN
            INSERT INTO backup.backup_executions (job_id, kind, requested_by, attempt, not_before, repository)
            VALUES (e.job_id, e.kind, 'scheduler', e.attempt + 1, now() + make_interval(secs => p_retry_delay), e.repository)
            RETURNING execution_id INTO retry_id;
            PERFORM backup._audit('retry', 'backup', jname,
                jsonb_build_object('execution_id', retry_id, 'after', p_id, 'attempt', e.attempt + 1), 'scheduler');
        END IF;
    ELSIF p_status = 'succeeded' THEN
        PERFORM backup._resolve_alert('backup_failed', coalesce(jname, 'manual'));
        IF e.backup_id IS NOT NULL THEN
            INSERT INTO backup.repository_backups (repository, backup_id)
            VALUES (coalesce(e.repository, (backup._known_repositories())[1], 'primary'), e.backup_id)
            ON CONFLICT DO NOTHING;
            -- pg_backup.verify_after_backup: read the new backup back at once.
            IF p_verify THEN
                PERFORM backup._recovery_enqueue(jsonb_build_object(
                    'table', 'verification', 'kind', 'integrity', 'backup_id', e.backup_id, 'repository', e.repository,
                    'after_execution', p_id), NULL, 'scheduler');
            END IF;
        END IF;
    END IF;
END
$$;

-- The scheduler itself failed at something (p_message), or (NULL) has
-- run 30 seconds without failing (src/worker.rs): raises or resolves worker_error.
CREATE FUNCTION backup._sched_worker_error(p_message text)
RETURNS void LANGUAGE plpgsql
AS $$
BEGIN
    IF p_message IS NULL THEN
        PERFORM backup._resolve_alert('worker_error', 'scheduler');
    ELSE
        PERFORM backup._raise_alert('worker_error', 'critical', 'scheduler',
            'pg_backup scheduler: ' || p_message);
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
        IF j.kind IN ('verify', 'restore_test') THEN
            SELECT max(finished_at) INTO last_ok FROM backup.backup_verifications
             WHERE job_id = j.job_id AND status = 'passed';
        END IF;
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

-- The scheduler's report of `walshipper info --json` (NULL report: info
-- itself failed, with p_error). Raises/resolves repository_unavailable and
-- repository_lagging alerts; samples storage use and raises/resolves
-- repository_almost_full (backup._capacity_refresh()).
CREATE FUNCTION backup._sched_repo_status(p_report jsonb, p_error text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    r jsonb;
    c jsonb;
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
    DELETE FROM backup.repository_backups
     WHERE repository NOT IN (SELECT x->>'name' FROM jsonb_array_elements(p_report->'repositories') x);
    DELETE FROM backup.repository_status
     WHERE name NOT IN (SELECT x->>'name' FROM jsonb_array_elements(p_report->'repositories') x);
    FOR r IN SELECT * FROM jsonb_array_elements(p_report->'repositories') LOOP
        i := i + 1;
        -- Its size, room and keys: only what a repository that answered says.
        c := CASE WHEN (r->>'ok')::boolean THEN r ELSE '{}' END;
        INSERT INTO backup.repository_status AS s (name, type, location, ok, error, wal_segments,
               last_wal, backups, last_backup, last_backup_stop, position, checked_at,
               stored_bytes, capacity_bytes, free_bytes, capacity_source, min_free_bytes,
               encryption, key_created_at, first_backup_stop)
        VALUES (r->>'name', r->>'type', r->>'location', (r->>'ok')::boolean, r->>'error',
               (r->>'segments')::bigint, r->>'last_wal', (r->>'backups')::integer,
               r->>'last_backup', backup._timestamptz_or_null(r->>'last_backup_stop_time'), i, now(),
               backup._capacity_bytes_or_null(c->'stored_bytes'), backup._capacity_bytes_or_null(c->'capacity_bytes'),
               backup._capacity_bytes_or_null(c->'free_bytes'),
               CASE WHEN c->>'capacity_source' IN ('filesystem', 'quota', 'none') THEN c->>'capacity_source' END,
               backup._capacity_bytes_or_null(c->'min_free_bytes'),
               left(nullif(c->>'encryption', ''), 64),
               backup._timestamptz_or_null(c->>'key_created_at'),
               backup._timestamptz_or_null(c->>'first_backup_stop_time'))
        ON CONFLICT (name) DO UPDATE SET type = EXCLUDED.type, location = EXCLUDED.location,
               ok = EXCLUDED.ok, error = EXCLUDED.error, wal_segments = EXCLUDED.wal_segments,
               last_wal = EXCLUDED.last_wal, backups = EXCLUDED.backups,
               last_backup = EXCLUDED.last_backup, last_backup_stop = EXCLUDED.last_backup_stop,
               position = EXCLUDED.position, checked_at = EXCLUDED.checked_at,
               -- A repository that did not answer keeps what was last known of it.
               stored_bytes = CASE WHEN EXCLUDED.ok THEN EXCLUDED.stored_bytes ELSE s.stored_bytes END,
               capacity_bytes = CASE WHEN EXCLUDED.ok THEN EXCLUDED.capacity_bytes ELSE s.capacity_bytes END,
               free_bytes = CASE WHEN EXCLUDED.ok THEN EXCLUDED.free_bytes ELSE s.free_bytes END,
               capacity_source = CASE WHEN EXCLUDED.ok THEN EXCLUDED.capacity_source ELSE s.capacity_source END,
               min_free_bytes = CASE WHEN EXCLUDED.ok THEN EXCLUDED.min_free_bytes ELSE s.min_free_bytes END,
               encryption = CASE WHEN EXCLUDED.ok THEN EXCLUDED.encryption ELSE s.encryption END,
               key_created_at = CASE WHEN EXCLUDED.ok THEN EXCLUDED.key_created_at ELSE s.key_created_at END,
               first_backup_stop = CASE WHEN EXCLUDED.ok THEN EXCLUDED.first_backup_stop ELSE s.first_backup_stop END;
        -- What it holds, when walshipper lists it (backup_ids).
        IF (r->>'ok')::boolean AND jsonb_typeof(r->'backup_ids') = 'array' THEN
            DELETE FROM backup.repository_backups b
             WHERE b.repository = r->>'name'
               AND b.backup_id NOT IN (SELECT jsonb_array_elements_text(r->'backup_ids'));
            INSERT INTO backup.repository_backups (repository, backup_id)
            SELECT r->>'name', ids.id FROM jsonb_array_elements_text(r->'backup_ids') AS ids (id)
             WHERE ids.id ~ '^[0-9]{8}-[0-9]{6}[FDI]([1-9][0-9]{0,2})?$'
            ON CONFLICT (repository, backup_id) DO UPDATE SET seen_at = now();
        END IF;
        -- Its recovery records: restores run from the command line, and
        -- the records of those started from SQL.
        IF (r->>'ok')::boolean AND jsonb_typeof(r->'recoveries') = 'array' THEN
            PERFORM backup._sched_import_recoveries(r->>'name', r->'recoveries');
        END IF;
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
    -- Storage history, growth and the repository_almost_full alert (sql/capacity.sql).
    PERFORM backup._capacity_refresh();
    -- Data keys, and the key_rotation_overdue alert (sql/keys.sql).
    PERFORM backup._key_refresh(p_report);
END
$$;

