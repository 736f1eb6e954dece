-- Retention: each repository's policy (backup.retention_policies), set by
-- operators (audited), applied by `walshipper expire --repo` on every
-- repository after every successful backup, and the record of what expiry
-- removed. A repository without a policy row keeps walshipper's configured
-- policy for it.

-- A policy as walshipper expire's flags. The same text whatever the
-- session's IntervalStyle (it is audited).
CREATE FUNCTION backup._retention_json(p backup.retention_policies)
RETURNS jsonb LANGUAGE sql STABLE SET IntervalStyle = 'postgres'
AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'keep_full', p.keep_full, 'recovery_window', p.recovery_window::text,
        'keep_daily', p.keep_daily, 'keep_weekly', p.keep_weekly,
        'keep_monthly', p.keep_monthly, 'keep_yearly', p.keep_yearly,
        'timezone', CASE WHEN num_nonnulls(p.keep_daily, p.keep_weekly, p.keep_monthly, p.keep_yearly) > 0
                         THEN p.timezone END))
$$;

CREATE FUNCTION backup._retention_args(p backup.retention_policies)
RETURNS text[] LANGUAGE sql STABLE
AS $$
    SELECT ARRAY[]::text[]
        || CASE WHEN p.keep_full IS NOT NULL THEN ARRAY['--keep-full', p.keep_full::text] ELSE '{}' END
        || CASE WHEN p.recovery_window IS NOT NULL
                THEN ARRAY['--recovery-window', ceil(extract(epoch FROM p.recovery_window))::bigint::text || 's'] ELSE '{}' END
        || CASE WHEN p.keep_daily IS NOT NULL THEN ARRAY['--keep-daily', p.keep_daily::text] ELSE '{}' END
        || CASE WHEN p.keep_weekly IS NOT NULL THEN ARRAY['--keep-weekly', p.keep_weekly::text] ELSE '{}' END
        || CASE WHEN p.keep_monthly IS NOT NULL THEN ARRAY['--keep-monthly', p.keep_monthly::text] ELSE '{}' END
        || CASE WHEN p.keep_yearly IS NOT NULL THEN ARRAY['--keep-yearly', p.keep_yearly::text] ELSE '{}' END
        || CASE WHEN num_nonnulls(p.keep_daily, p.keep_weekly, p.keep_monthly, p.keep_yearly) > 0
                THEN ARRAY['--timezone', p.timezone] ELSE '{}' END
$$;

-- A recovery window shorter than the time between two full backups into
-- the repository can only be met by keeping the previous full backup too:
-- refuse the promise. The gaps are those of the next 50 firings of the
-- active full jobs backing up there, together, on a calendar without DST
-- changes (UTC), compared in calendar arithmetic ('1 mon' covers monthly).
-- Intervals in the messages read '7 days' whatever the IntervalStyle.
CREATE FUNCTION backup._check_window(p_repository text, p_window interval)
RETURNS void LANGUAGE plpgsql SET IntervalStyle = 'postgres'
AS $$
DECLARE
    primary_name text := (backup._known_repositories())[1];
    times timestamp[];
    gap interval;
    longest interval := interval '0';
    uncovered boolean := false;
BEGIN
    SELECT array_agg(DISTINCT t ORDER BY t) INTO times
      FROM backup.backup_jobs j,
           LATERAL (WITH RECURSIVE f(n, at) AS (
                        SELECT 1, backup.cron_next(j.schedule, 'UTC', now())
                        UNION ALL
                        SELECT n + 1, backup.cron_next(j.schedule, 'UTC', f.at) FROM f WHERE n < 50)
                    SELECT f.at AT TIME ZONE 'UTC' AS t FROM f) x
     WHERE j.active AND j.kind = 'full'
       AND (j.repository = p_repository
            OR (j.repository IS NULL AND primary_name = p_repository)
            -- Before walshipper reported which repository is the primary,
            -- jobs without one count for a repository no job names (the
            -- stricter reading: fewer jobs, longer gaps).
            OR (j.repository IS NULL AND primary_name IS NULL
                AND NOT EXISTS (SELECT 1 FROM backup.backup_jobs o
                                 WHERE o.active AND o.kind = 'full' AND o.repository = p_repository)));
    IF times IS NULL OR array_length(times, 1) < 2 THEN
        RETURN;
    END IF;
    -- Only the first 50 common firings: a later job's 50th may lie past
    -- another's gaps.
    FOR i IN 1 .. least(array_length(times, 1), 51) - 1 LOOP
        gap := times[i + 1] - times[i];
        longest := greatest(longest, gap);
        uncovered := uncovered OR times[i] + p_window < times[i + 1];
    END LOOP;
    IF uncovered THEN
        RAISE EXCEPTION 'recovery_window % is shorter than the % between full backups into repository "%"',
                        p_window, longest, p_repository
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('Full backups up to %s apart cannot give a recovery window of %s without keeping the previous full backup too: '
                                'set recovery_window to at least %s, or schedule full backups more often.',
                                longest, p_window, longest);
    END IF;
END
$$;

-- Operator API: sets a repository's retention (every argument; NULL = not
-- part of the policy). Audited with the old and the new policy.
CREATE FUNCTION backup.retention_set(repository text, keep_full integer DEFAULT NULL,
                                     recovery_window interval DEFAULT NULL,
                                     keep_daily integer DEFAULT NULL, keep_weekly integer DEFAULT NULL,
                                     keep_monthly integer DEFAULT NULL, keep_yearly integer DEFAULT NULL,
                                     timezone text DEFAULT 'UTC')
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET IntervalStyle = 'postgres'
AS $$
DECLARE
    p backup.retention_policies;
    old backup.retention_policies;
    c record;
BEGIN
    PERFORM backup._check_repository(repository);
    IF keep_full IS NOT NULL AND keep_full < 1 THEN
        RAISE EXCEPTION 'keep_full must be at least 1, not %', keep_full
            USING ERRCODE = 'invalid_parameter_value', HINT = 'NULL leaves it out of the policy.';
    END IF;
    IF recovery_window IS NOT NULL AND recovery_window <= interval '0' THEN
        RAISE EXCEPTION 'recovery_window must be positive, not %', recovery_window
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR c IN SELECT * FROM (VALUES ('keep_daily', keep_daily, 'day'), ('keep_weekly', keep_weekly, 'week'),
                                   ('keep_monthly', keep_monthly, 'month'), ('keep_yearly', keep_yearly, 'year')) v (col, n, period)
              WHERE v.n < 0 LOOP
        RAISE EXCEPTION '% must be 0 or more, not %', c.col, c.n
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = format('It is the number of %ss whose newest backup is kept: 0 keeps none, NULL leaves it unset.', c.period);
    END LOOP;
    IF coalesce(keep_full, 0) + coalesce(keep_daily, 0) + coalesce(keep_weekly, 0)
       + coalesce(keep_monthly, 0) + coalesce(keep_yearly, 0) = 0 AND recovery_window IS NULL THEN
        RAISE EXCEPTION 'this retention of repository "%" keeps no backup', repository
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Set keep_full, recovery_window or a keep count above 0; backup.retention_reset() returns to walshipper''s configured policy.';
    END IF;
    IF timezone IS NULL OR NOT EXISTS (SELECT 1 FROM pg_timezone_names z WHERE z.name = retention_set.timezone) THEN
        RAISE EXCEPTION 'unknown time zone "%"', timezone
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use a name from pg_timezone_names, such as UTC or Europe/Berlin.';
    END IF;
    IF recovery_window IS NOT NULL THEN
        PERFORM backup._check_window(repository, recovery_window);
    END IF;
    SELECT * INTO old FROM backup.retention_policies r WHERE r.repository = retention_set.repository FOR UPDATE;
    INSERT INTO backup.retention_policies AS r (repository, keep_full, recovery_window, keep_daily, keep_weekly,
                                               keep_monthly, keep_yearly, timezone, updated_by, updated_at)
    VALUES (repository, keep_full, recovery_window, keep_daily, keep_weekly, keep_monthly, keep_yearly,
            timezone, backup._caller(), now())
    ON CONFLICT ON CONSTRAINT retention_policies_pkey DO UPDATE
       SET keep_full = EXCLUDED.keep_full, recovery_window = EXCLUDED.recovery_window,
           keep_daily = EXCLUDED.keep_daily, keep_weekly = EXCLUDED.keep_weekly,
           keep_monthly = EXCLUDED.keep_monthly, keep_yearly = EXCLUDED.keep_yearly,
           timezone = EXCLUDED.timezone, updated_by = EXCLUDED.updated_by, updated_at = EXCLUDED.updated_at
    RETURNING * INTO p;
    PERFORM backup._audit('set', 'retention', repository,
        jsonb_build_object('policy', backup._retention_json(p),
                           'previous', CASE WHEN old.repository IS NULL THEN NULL ELSE backup._retention_json(old) END));
END
$$;

-- Operator API: back to walshipper's configured policy for the repository.
CREATE FUNCTION backup.retention_reset(repository text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    old backup.retention_policies;
BEGIN
    DELETE FROM backup.retention_policies r WHERE r.repository = retention_reset.repository RETURNING * INTO old;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'repository "%" has no retention set in SQL', repository
            USING ERRCODE = 'undefined_object', HINT = 'See backup.retention_policies; it already uses walshipper''s configured policy.';
    END IF;
    PERFORM backup._audit('reset', 'retention', repository,
        jsonb_build_object('previous', backup._retention_json(old)));
END
$$;

-- What the scheduler runs after a backup: one `walshipper --repo R expire
-- --json <flags>` per repository walshipper reported (and per policy row),
-- in configuration order. Before the first `walshipper info` nothing is
-- known: one row with a NULL repository, for `walshipper expire --json`,
-- which expires every repository with its configured policy.
CREATE FUNCTION backup._sched_expire_plan()
RETURNS TABLE (repository text, args text[]) LANGUAGE sql STABLE
AS $$
    WITH names AS (
        SELECT s.name, s.position FROM backup.repository_status s
        UNION
        SELECT r.repository, 1000000 FROM backup.retention_policies r
         WHERE NOT EXISTS (SELECT 1 FROM backup.repository_status s WHERE s.name = r.repository)
    )
    SELECT x.repository, x.args FROM (
        SELECT n.name AS repository, coalesce(backup._retention_args(p), '{}') AS args, n.position
          FROM names n LEFT JOIN backup.retention_policies p ON p.repository = n.name
        UNION ALL
        SELECT NULL, '{}'::text[], 0 WHERE NOT EXISTS (SELECT 1 FROM names)
    ) x
    ORDER BY x.position, x.repository
$$;

-- Records the end of `walshipper expire` on one repository, run after
-- backup p_execution_id: its report (`expire --json`), or NULL and the
-- reason it failed. On success an audit_log row (actor 'scheduler'), the
-- repository's removed backups dropped from backup.repository_backups, the
-- executions whose own repository it is marked expired, and an open
-- expire_failed alert of that repository resolved. Returns the number of
-- executions marked expired.
CREATE FUNCTION backup._sched_expire_done(p_report jsonb, p_execution_id bigint, p_error text DEFAULT NULL,
                                          p_repository text DEFAULT NULL, p_primary text DEFAULT NULL)
RETURNS integer LANGUAGE plpgsql
AS $$
DECLARE
    repo text := coalesce(p_repository, p_report->>'repository');
    -- Which repository executions without one were taken into: the one
    -- walshipper reported first, else the first report of an expire of
    -- every repository (p_primary).
    primary_name text := coalesce((backup._known_repositories())[1], p_primary);
    subject text := coalesce('walshipper expire ' || repo, 'walshipper expire');
    removed jsonb;
    kept jsonb;
    n integer := 0;
BEGIN
    IF p_report IS NULL THEN
        PERFORM backup._raise_alert('expire_failed', 'warning', subject,
            format('expiry of repository %s after backup %s failed: %s', coalesce(repo, '(all)'), p_execution_id,
                   coalesce(p_error, 'unknown error')),
            jsonb_build_object('execution_id', p_execution_id, 'repository', repo, 'error', p_error));
        RETURN 0;
    END IF;
    IF p_report->>'repository' IS DISTINCT FROM repo THEN
        PERFORM backup._raise_alert('expire_failed', 'warning', subject,
            format('expiry of repository %s after backup %s reported on repository %s instead', repo, p_execution_id,
                   coalesce(p_report->>'repository', 'none')),
            jsonb_build_object('execution_id', p_execution_id, 'repository', repo));
        RETURN 0;
    END IF;
    removed := CASE WHEN jsonb_typeof(p_report->'removed') = 'array' THEN p_report->'removed' ELSE '[]' END;
    kept := CASE WHEN jsonb_typeof(p_report->'kept') = 'array' THEN p_report->'kept' ELSE '[]' END;
    PERFORM backup._audit('expire', 'repository', repo,
        -- Bounded: a repository can hold any number of damaged manifests.
        (p_report - 'kept' - 'damaged') || jsonb_build_object(
            'damaged', (SELECT coalesce(jsonb_agg(d), '[]') FROM (SELECT d FROM jsonb_array_elements(
                            CASE WHEN jsonb_typeof(p_report->'damaged') = 'array' THEN p_report->'damaged' ELSE '[]' END) d
                            LIMIT 20) x),
            'kept', (SELECT coalesce(jsonb_agg(k->'id'), '[]') FROM jsonb_array_elements(kept) k),
            'execution_id', p_execution_id,
            'policy_set_by', (SELECT r.updated_by FROM backup.retention_policies r WHERE r.repository = repo)),
        'scheduler');
    IF coalesce((p_report->>'dry_run')::boolean, false) THEN
        RETURN 0;
    END IF;
    DELETE FROM backup.repository_backups b
     WHERE b.repository = repo AND b.backup_id IN (SELECT r->>'id' FROM jsonb_array_elements(removed) r);
    UPDATE backup.backup_executions e SET expired_at = now()
     WHERE e.status = 'succeeded' AND e.expired_at IS NULL
       AND coalesce(e.repository, primary_name) = repo
       AND e.backup_id IN (SELECT r->>'id' FROM jsonb_array_elements(removed) r);
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM backup._resolve_alert('expire_failed', subject);
    RETURN n;
END
$$;
