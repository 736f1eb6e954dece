-- Restore planning: which backup and WAL reach a moment, and the exact
-- walshipper command, every value in it quoted for the shell.

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
                  HINT = 'Choose a later target. To reach further back, keep more backups: see '
                         'backup.retention_policies, or walshipper''s configured policy.';
    END IF;
    RAISE EXCEPTION 'no backup ends before %', target_time
        USING ERRCODE = 'no_data_found',
              HINT = coalesce('The oldest recorded backup ends at ' || oldest::text || '; choose a later target.',
                              'No backup has succeeded yet: run SELECT backup.backup_run(wait => true).');
END
$$;

-- The walshipper restore command for backup e, every word shell-quoted
-- (values come from settings, the caller and the catalog, and a DBA pastes
-- the command into a shell as root or postgres).
CREATE FUNCTION backup._restore_command(e backup.backup_executions, target_dir text, target text[])
RETURNS text LANGUAGE plpgsql STABLE
AS $$
DECLARE
    dir text := coalesce(target_dir, current_setting('data_directory') || '_restored');
    cfg text := coalesce(nullif(current_setting('pg_backup.walshipper_config', true), ''), '/etc/walshipper/walshipper.toml');
    exe text := coalesce(nullif(current_setting('pg_backup.walshipper_path', true), ''), '/usr/local/bin/walshipper');
    words text[];
BEGIN
    IF dir ~ '[[:cntrl:]]' OR dir !~ '^/' THEN
        RAISE EXCEPTION 'invalid target_dir %', to_json(dir)::text
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Give an absolute directory path without control characters.';
    END IF;
    words := ARRAY[exe, '--config', cfg]
          || CASE WHEN e.repository IS NOT NULL THEN ARRAY['--repo', e.repository] ELSE '{}' END
          || ARRAY['restore', '--target-dir', dir, '--backup', e.backup_id] || target
          || ARRAY['--target-action', 'promote'];
    RETURN (SELECT string_agg(backup._shell_quote(w), ' ' ORDER BY i) FROM unnest(words) WITH ORDINALITY u (w, i));
END
$$;

-- Operator API: how to restore to a moment: which backup, which WAL, and
-- the exact command. The catalog mirrors the repository (it goes back in
-- time with the database); walshipper restore re-checks everything against
-- the repository.
CREATE FUNCTION backup.restore_plan(target_time timestamptz, target_dir text DEFAULT NULL)
RETURNS TABLE (backup_id text, backup_stop_time timestamptz, wal_from text, wal_to text, command text,
               backup_type text, backup_chain text[])
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    e backup.backup_executions;
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
        backup._restore_command(e, target_dir,
            ARRAY['--target-time', to_char(target_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00']),
        e.kind, backup._backup_chain(e);
END
$$;

-- Operator API: the same for a named restore point. Its WAL is checked
-- by position: the segment holding the point must be archived (on the
-- point's timeline, when that is the server's), not by the clock.
CREATE FUNCTION backup.restore_plan(restore_point text, target_dir text DEFAULT NULL)
RETURNS TABLE (backup_id text, backup_stop_time timestamptz, wal_from text, wal_to text, command text,
               backup_type text, backup_chain text[])
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    rp backup.restore_points;
    e backup.backup_executions;
    last_wal text;
    need text;
BEGIN
    SELECT * INTO rp FROM backup.restore_points r WHERE r.name = restore_point;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no restore point %', coalesce(to_json(restore_point)::text, 'NULL')
            USING ERRCODE = 'undefined_object', HINT = 'See backup.restore_points, or create one with backup.restore_point_create().';
    END IF;
    e := backup._restore_base(rp.created_at);
    SELECT a.last_archived_wal INTO last_wal FROM pg_stat_archiver a;
    IF NOT pg_is_in_recovery()
       AND rp.timeline = (SELECT c.timeline_id FROM pg_control_checkpoint() c) THEN
        need := pg_walfile_name(rp.lsn);
    END IF;
    -- A .backup file of segment N is archived before N is complete: only
    -- a later segment, or N itself, proves N is.
    IF last_wal IS NULL OR left(last_wal, 24) < coalesce(need, '')
       OR (left(last_wal, 24) = need AND length(last_wal) <> 24) THEN
        RAISE EXCEPTION 'the WAL of restore point "%" (segment %) is not archived yet (last archived: %)',
                        rp.name, need, coalesce(last_wal, 'none')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Run SELECT pg_switch_wal() and wait for archiving (see backup.wal_archive_status).';
    END IF;
    RETURN QUERY SELECT e.backup_id, (e.summary->>'stop_time')::timestamptz, e.summary->>'wal_start',
        coalesce(need, last_wal),
        backup._restore_command(e, target_dir, ARRAY['--target-name', rp.wal_name]),
        e.kind, backup._backup_chain(e);
END
$$;
