-- Storage capacity: each repository's size, room and growth, the
-- projection of when it fills, and the repository_almost_full alert.
--
-- walshipper info --json reports each repository's stored bytes, capacity
-- and free space (posix: its file system; s3: a configured quota) and the
-- minimum free space a backup must leave; the scheduler stores them in
-- backup.repository_status (backup._sched_repo_status()) and then calls
-- backup._capacity_refresh(), which samples them into
-- backup.repository_usage and raises or resolves the alert. Settings:
-- pg_backup.storage_sample_interval, storage_history, storage_growth_window,
-- storage_warn_percent, storage_warn_days (docs/operations.md, "Storage
-- capacity").

-- A byte count from walshipper's report: a whole number from 0 to bigint's
-- largest, else NULL (the report is walshipper's, but never trusted to fit).
CREATE FUNCTION backup._capacity_bytes_or_null(v jsonb)
RETURNS bigint LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN jsonb_typeof(v) = 'number' AND v::text ~ '^[0-9]{1,19}$'
                     AND v::text::numeric <= 9223372036854775807
                THEN v::text::bigint END
$$;

-- Each repository's room and growth now. used_ratio: the share of its
-- capacity not free (for a file system, other files count too: what
-- matters is what is left); growth_bytes_per_day: the least-squares slope
-- of the bytes stored over the samples of the last
-- pg_backup.storage_growth_window; projected_full_at: when, at that growth,
-- its free space reaches min_free_bytes (now if it already has; NULL when
-- it does not grow, its free space is unknown, or it is over a century
-- away).
CREATE VIEW backup.repository_capacity AS
SELECT s.name AS repository,
       s.stored_bytes,
       s.capacity_bytes,
       s.free_bytes,
       CASE WHEN s.capacity_bytes > 0 AND s.free_bytes IS NOT NULL
            THEN round(greatest(s.capacity_bytes - s.free_bytes, 0)::numeric / s.capacity_bytes, 4) END AS used_ratio,
       coalesce(s.min_free_bytes, 0) AS min_free_bytes,
       round(g.growth::numeric, 0) AS growth_bytes_per_day,
       CASE WHEN g.growth > 0 AND s.free_bytes IS NOT NULL
                 AND greatest(s.free_bytes - coalesce(s.min_free_bytes, 0), 0) / g.growth < 36500
            THEN now() + make_interval(secs => greatest(s.free_bytes - coalesce(s.min_free_bytes, 0), 0) / g.growth * 86400)
       END AS projected_full_at,
       s.checked_at
  FROM backup.repository_status s
  LEFT JOIN LATERAL (
       SELECT regr_slope(u.stored_bytes::float8, extract(epoch FROM u.sampled_at)::float8) * 86400 AS growth
         FROM backup.repository_usage u
        WHERE u.repository = s.name
          AND u.sampled_at > now() - coalesce(nullif(current_setting('pg_backup.storage_growth_window', true), ''), '14d')::interval
       ) g ON true
 ORDER BY s.position;
COMMENT ON VIEW backup.repository_capacity IS 'Each repository''s stored bytes, capacity, free space, growth per day and when it is projected to reach its minimum free space.';

-- After each refresh of repository status: a sample of each repository
-- that answered (at most every pg_backup.storage_sample_interval), samples
-- older than pg_backup.storage_history removed, and repository_almost_full
-- raised for a repository at or above pg_backup.storage_warn_percent, or
-- projected to reach its minimum free space within
-- pg_backup.storage_warn_days, or below that minimum already; resolved
-- when none holds. A repository that did not answer keeps its alert as is.
-- The thresholds may be given (tests); NULL: the settings'.
CREATE FUNCTION backup._capacity_refresh(p_warn_percent integer DEFAULT NULL, p_warn_days integer DEFAULT NULL)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    every interval := coalesce(nullif(current_setting('pg_backup.storage_sample_interval', true), ''), '1h')::interval;
    keep interval := coalesce(nullif(current_setting('pg_backup.storage_history', true), ''), '400d')::interval;
    warn_percent integer := coalesce(p_warn_percent,
        nullif(current_setting('pg_backup.storage_warn_percent', true), '')::integer, 85);
    warn_days integer := coalesce(p_warn_days,
        nullif(current_setting('pg_backup.storage_warn_days', true), '')::integer, 14);
    c record;
    why text[];
BEGIN
    INSERT INTO backup.repository_usage (repository, sampled_at, stored_bytes, capacity_bytes, free_bytes)
    SELECT s.name, now(), s.stored_bytes, s.capacity_bytes, s.free_bytes
      FROM backup.repository_status s
     WHERE s.ok AND s.stored_bytes IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM backup.repository_usage u
                        WHERE u.repository = s.name AND u.sampled_at > now() - every)
    ON CONFLICT DO NOTHING;
    DELETE FROM backup.repository_usage WHERE sampled_at < now() - keep;

    FOR c IN SELECT x.*, s.ok FROM backup.repository_capacity x
               JOIN backup.repository_status s ON s.name = x.repository LOOP
        CONTINUE WHEN NOT c.ok;
        why := '{}';
        IF c.used_ratio * 100 >= warn_percent THEN
            why := why || format('%s %% of its %s used (pg_backup.storage_warn_percent = %s)',
                                 round(c.used_ratio * 100, 1), pg_size_pretty(c.capacity_bytes), warn_percent);
        END IF;
        IF c.free_bytes < c.min_free_bytes THEN
            why := why || format('%s free, below its min_free_space of %s: backups are refused',
                                 pg_size_pretty(c.free_bytes), pg_size_pretty(c.min_free_bytes));
        ELSIF warn_days > 0 AND c.projected_full_at < now() + make_interval(days => warn_days) THEN
            why := why || format('growing %s a day, it reaches its min_free_space of %s around %s',
                                 pg_size_pretty(c.growth_bytes_per_day), pg_size_pretty(c.min_free_bytes),
                                 to_char(c.projected_full_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI "UTC"'));
        END IF;
        IF cardinality(why) > 0 THEN
            PERFORM backup._raise_alert('repository_almost_full', 'warning', c.repository,
                format('repository %s is almost full: %s', c.repository, array_to_string(why, '; ')),
                jsonb_build_object('stored_bytes', c.stored_bytes, 'capacity_bytes', c.capacity_bytes,
                                   'free_bytes', c.free_bytes, 'min_free_bytes', c.min_free_bytes,
                                   'used_ratio', c.used_ratio, 'growth_bytes_per_day', c.growth_bytes_per_day,
                                   'projected_full_at', c.projected_full_at));
        ELSE
            PERFORM backup._resolve_alert('repository_almost_full', c.repository);
        END IF;
    END LOOP;
    -- Repositories no longer configured.
    PERFORM backup._resolve_alert('repository_almost_full', a.subject)
       FROM backup.alerts a
      WHERE a.kind = 'repository_almost_full' AND a.resolved_at IS NULL
        AND NOT EXISTS (SELECT 1 FROM backup.repository_status s WHERE s.name = a.subject);
END
$$;
