-- The compliance report: for a period, what an auditor asks for, as rows
-- (backup.compliance_report()); walshipper report and serve's /report
-- render them as a document.
--
-- Rows: (section, subject, item, value, status, detail). Sections, in this
-- order: summary, schedule, backups, recovery_objectives, verification,
-- retention, encryption, storage, alerts; within one, by subject and item.
-- subject: a job or repository name (an alert kind in alerts), or '';
-- value: text for people; status: ok, warning, failed or info; detail:
-- the figures behind the value. docs/sql-reference.md lists every item.
--
-- SECURITY INVOKER: it reads the catalog as its caller, who needs what a
-- monitor has (backup.grant_monitor() grants EXECUTE on it and on the two
-- formatting helpers below).

-- A duration for people: '2 d 3 h', '3 h', '1 h 5 min', '4 min 12 s', '12.5 s'.
CREATE FUNCTION backup._report_duration(seconds double precision)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN seconds IS NULL OR seconds = 'NaN' THEN NULL
        WHEN seconds < 0 THEN '-' || backup._report_duration(-seconds)
        WHEN seconds >= 86400 * 1e6 THEN 'over 1000000 d'
        WHEN seconds >= 86400 THEN concat_ws(' ', floor(seconds / 86400)::bigint || ' d',
                                             nullif(floor(seconds::numeric % 86400 / 3600)::int, 0) || ' h')
        WHEN seconds >= 3600 THEN concat_ws(' ', floor(seconds / 3600)::int || ' h',
                                            nullif(floor(seconds::numeric % 3600 / 60)::int, 0) || ' min')
        WHEN seconds >= 60 THEN concat_ws(' ', floor(seconds / 60)::int || ' min',
                                          nullif(floor(seconds::numeric % 60)::int, 0) || ' s')
        ELSE round(seconds::numeric, 1) || ' s' END
$$;

-- A time for people, in UTC: '2026-11-20 10:00 UTC'.
CREATE FUNCTION backup._report_time(t timestamptz)
RETURNS text LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI "UTC"') $$;

CREATE FUNCTION backup.compliance_report(period_start timestamptz, period_end timestamptz DEFAULT now())
RETURNS TABLE (section text, subject text, item text, value text, status text, detail jsonb)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
DECLARE
    p_start timestamptz := period_start;
    p_end timestamptz := period_end;
    grace interval := coalesce(nullif(current_setting('pg_backup.overdue_grace', true), ''), '1h')::interval;
    rpo_target interval := coalesce(nullif(current_setting('pg_backup.rpo_target', true), ''), '900s')::interval;
    rto_target interval := coalesce(nullif(current_setting('pg_backup.rto_target', true), ''), '1h')::interval;
    warn_percent integer := coalesce(nullif(current_setting('pg_backup.storage_warn_percent', true), ''), '85')::integer;
    warn_days integer := coalesce(nullif(current_setting('pg_backup.storage_warn_days', true), ''), '14')::integer;
    -- A data key older than this is reported: the rotation policy's period
    -- (backup.set_key_rotation) plus its grace when one is set, else a year
    -- (the common policy: PCI DSS, NIST SP 800-57's cryptoperiods).
    key_policy record;
    key_max_age interval;
    max_slots constant integer := 10000;
    acc jsonb := '[]';
    j record;
    r record;
    slot timestamptz;
    next_slot timestamptz;
    n_slots integer;
    n_ok integer;
    n_pending integer;
    missed jsonb;
    truncated boolean;
    pct numeric;
    primary_name text;
    sysid text;
    worst text;
    any_runs boolean;
BEGIN
    IF p_start IS NULL OR p_end IS NULL THEN
        RAISE EXCEPTION 'compliance_report needs a period: period_start and period_end must not be NULL'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example: SELECT * FROM backup.compliance_report(now() - interval ''30 days'', now());';
    END IF;
    IF p_end <= p_start THEN
        RAISE EXCEPTION 'the period must end after it starts (it runs from % to %)',
                        backup._report_time(p_start), backup._report_time(p_end)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'period_end must be later than period_start.';
    END IF;
    SELECT s.name INTO primary_name FROM backup.repository_status s WHERE s.position = 1;
    -- Backups ran in the period: then no verification in it is a finding.
    any_runs := EXISTS (SELECT 1 FROM backup.backup_executions e WHERE e.finished_at >= p_start AND e.finished_at < p_end);

    -- schedule: each active job's slots in the period, and those honoured
    -- by a successful run queued from the slot until the next slot and
    -- finished before the next slot plus pg_backup.overdue_grace. A slot
    -- whose window is still open now and has no success yet is pending,
    -- not counted.
    FOR j IN SELECT b.* FROM backup.backup_jobs b WHERE b.active ORDER BY b.name LOOP
        n_slots := 0; n_ok := 0; n_pending := 0; missed := '[]'; truncated := false;
        slot := backup.cron_next(j.schedule, j.timezone, greatest(p_start, j.created_at) - interval '1 second');
        WHILE slot < p_end LOOP
            IF n_slots + n_pending >= max_slots THEN
                truncated := true;
                EXIT;
            END IF;
            next_slot := backup.cron_next(j.schedule, j.timezone, slot);
            EXIT WHEN next_slot <= slot;
            IF (j.kind IN ('verify', 'restore_test') AND EXISTS (
                    SELECT 1 FROM backup.backup_verifications v
                     WHERE v.job_id = j.job_id AND v.status = 'passed'
                       AND v.queued_at >= slot AND v.queued_at < next_slot AND v.finished_at < next_slot + grace))
               OR (j.kind NOT IN ('verify', 'restore_test') AND EXISTS (
                    SELECT 1 FROM backup.backup_executions e
                     WHERE e.job_id = j.job_id AND e.status = 'succeeded'
                       AND e.queued_at >= slot AND e.queued_at < next_slot AND e.finished_at < next_slot + grace)) THEN
                n_slots := n_slots + 1;
                n_ok := n_ok + 1;
            ELSIF next_slot + grace > now() THEN
                n_pending := n_pending + 1;
            ELSE
                n_slots := n_slots + 1;
                IF jsonb_array_length(missed) < 20 THEN
                    missed := missed || to_jsonb(to_char(slot AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'));
                END IF;
            END IF;
            slot := next_slot;
        END LOOP;
        pct := CASE WHEN n_slots > 0 THEN round(100.0 * n_ok / n_slots, 1) END;
        acc := acc || jsonb_build_object(
            'section', 'schedule', 'subject', j.name, 'item', 'on_schedule',
            'value', CASE WHEN n_slots = 0 THEN 'no data'
                          ELSE format('%s %% (%s of %s slots)', pct, n_ok, n_slots) END
                     || CASE WHEN truncated THEN format(' (the first %s slots)', max_slots) ELSE '' END,
            'status', CASE WHEN n_slots = 0 THEN 'info' WHEN pct >= 100 THEN 'ok' WHEN pct >= 95 THEN 'warning' ELSE 'failed' END,
            'detail', jsonb_build_object('kind', j.kind, 'schedule', j.schedule, 'timezone', j.timezone,
                                         'slots', n_slots, 'on_schedule', n_ok, 'missed', n_slots - n_ok,
                                         'pending', n_pending, 'percent', pct, 'first_missed', missed,
                                         'truncated', truncated, 'grace_s', extract(epoch FROM grace)));
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(acc) x WHERE x->>'section' = 'schedule') THEN
        acc := acc || jsonb_build_object('section', 'schedule', 'subject', '', 'item', 'jobs',
            'value', 'no data', 'status', 'info', 'detail', jsonb_build_object('reason', 'no active job'));
    END IF;

    -- backups: runs that ended in the period, per job (or 'manual') and kind.
    acc := acc || coalesce((
        SELECT jsonb_agg(jsonb_build_object(
            'section', 'backups', 'subject', g.job, 'item', g.kind,
            'value', format('%s %% succeeded (%s of %s runs), %s stored, %s on average',
                            g.rate, g.succeeded, g.runs, pg_size_pretty(g.stored), coalesce(backup._report_duration(g.avg_s), '-')),
            'status', CASE WHEN g.failed = 0 THEN 'ok' WHEN g.rate >= 95 THEN 'warning' ELSE 'failed' END,
            'detail', jsonb_build_object('kind', g.kind, 'runs', g.runs, 'succeeded', g.succeeded, 'failed', g.failed,
                                         'cancelled', g.cancelled, 'success_rate', g.rate, 'stored_bytes', g.stored,
                                         'avg_duration_s', round(g.avg_s::numeric, 1))))
          FROM (SELECT coalesce(b.name, 'manual') AS job, e.kind,
                       count(*) AS runs,
                       count(*) FILTER (WHERE e.status = 'succeeded') AS succeeded,
                       count(*) FILTER (WHERE e.status = 'failed') AS failed,
                       count(*) FILTER (WHERE e.status = 'cancelled') AS cancelled,
                       round(100.0 * count(*) FILTER (WHERE e.status = 'succeeded') / count(*), 1) AS rate,
                       coalesce(sum(e.stored_bytes) FILTER (WHERE e.status = 'succeeded'), 0) AS stored,
                       avg(extract(epoch FROM e.finished_at - e.started_at)) FILTER (WHERE e.status = 'succeeded') AS avg_s
                  FROM backup.backup_executions e
                  LEFT JOIN backup.backup_jobs b USING (job_id)
                 WHERE e.finished_at >= p_start AND e.finished_at < p_end
                 GROUP BY 1, 2) g), '[]');
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(acc) x WHERE x->>'section' = 'backups') THEN
        acc := acc || jsonb_build_object('section', 'backups', 'subject', '', 'item', 'runs',
            'value', 'no data', 'status', 'info', 'detail', jsonb_build_object('runs', 0));
    END IF;

    -- recovery_objectives: per repository, the worst RPO sampled in the
    -- period against the target, and the longest RTO a restore test
    -- measured in the period against the target (the targets in force now).
    FOR r IN
        WITH repos AS (
            SELECT s.name, s.position FROM backup.repository_status s
            UNION
            SELECT x.repository, NULL FROM backup.rpo_samples x WHERE x.sampled_at >= p_start AND x.sampled_at < p_end
            UNION
            SELECT coalesce(v.repository, primary_name, 'primary'), NULL FROM backup.backup_verifications v
             WHERE v.kind = 'restore_test' AND v.finished_at >= p_start AND v.finished_at < p_end)
        SELECT n.name,
               (SELECT max(x.rpo) FROM backup.rpo_samples x
                 WHERE x.repository = n.name AND x.sampled_at >= p_start AND x.sampled_at < p_end) AS rpo_worst,
               (SELECT count(*) FROM backup.rpo_samples x
                 WHERE x.repository = n.name AND x.sampled_at >= p_start AND x.sampled_at < p_end) AS rpo_samples,
               (SELECT max(v.rto_s) FROM backup.backup_verifications v
                 WHERE v.kind = 'restore_test' AND v.rto_s IS NOT NULL
                   AND coalesce(v.repository, primary_name, 'primary') = n.name
                   AND v.finished_at >= p_start AND v.finished_at < p_end) AS rto_worst,
               (SELECT count(*) FROM backup.backup_verifications v
                 WHERE v.kind = 'restore_test' AND v.rto_s IS NOT NULL
                   AND coalesce(v.repository, primary_name, 'primary') = n.name
                   AND v.finished_at >= p_start AND v.finished_at < p_end) AS rto_tests
          FROM (SELECT name, min(position) AS position FROM repos WHERE name IS NOT NULL GROUP BY name) n
    LOOP
        acc := acc || jsonb_build_object(
            'section', 'recovery_objectives', 'subject', r.name, 'item', 'rpo',
            'value', CASE WHEN r.rpo_worst IS NULL THEN 'no data'
                          ELSE format('worst %s, target %s: %s', backup._report_duration(extract(epoch FROM r.rpo_worst)),
                                      backup._report_duration(extract(epoch FROM rpo_target)),
                                      CASE WHEN r.rpo_worst <= rpo_target THEN 'met' ELSE 'not met' END) END,
            'status', CASE WHEN r.rpo_worst IS NULL THEN 'info' WHEN r.rpo_worst <= rpo_target THEN 'ok' ELSE 'failed' END,
            'detail', jsonb_build_object('worst_s', extract(epoch FROM r.rpo_worst), 'target_s', extract(epoch FROM rpo_target),
                                         'samples', r.rpo_samples,
                                         'met', CASE WHEN r.rpo_worst IS NOT NULL THEN r.rpo_worst <= rpo_target END));
        acc := acc || jsonb_build_object(
            'section', 'recovery_objectives', 'subject', r.name, 'item', 'rto',
            'value', CASE WHEN r.rto_worst IS NULL THEN 'not measured (no restore test in the period)'
                          ELSE format('longest %s of %s restore test(s), target %s: %s', backup._report_duration(r.rto_worst), r.rto_tests,
                                      backup._report_duration(extract(epoch FROM rto_target)),
                                      CASE WHEN r.rto_worst <= extract(epoch FROM rto_target) THEN 'met' ELSE 'not met' END) END,
            'status', CASE WHEN r.rto_worst IS NULL THEN 'info'
                           WHEN r.rto_worst <= extract(epoch FROM rto_target) THEN 'ok' ELSE 'failed' END,
            'detail', jsonb_build_object('worst_s', r.rto_worst, 'target_s', extract(epoch FROM rto_target),
                                         'restore_tests', r.rto_tests,
                                         'met', CASE WHEN r.rto_worst IS NOT NULL THEN r.rto_worst <= extract(epoch FROM rto_target) END));
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(acc) x WHERE x->>'section' = 'recovery_objectives') THEN
        acc := acc || jsonb_build_object('section', 'recovery_objectives', 'subject', '', 'item', 'rpo',
            'value', 'no data', 'status', 'info', 'detail', '{}'::jsonb);
    END IF;

    -- verification: integrity read-backs and restore tests that ended in
    -- the period, per repository; and the backups held that none passed.
    FOR r IN
        WITH repos AS (
            SELECT s.name FROM backup.repository_status s
            UNION
            SELECT coalesce(v.repository, primary_name, 'primary') FROM backup.backup_verifications v
             WHERE v.finished_at >= p_start AND v.finished_at < p_end),
        k(kind) AS (VALUES ('integrity'), ('restore_test'))
        SELECT n.name, k.kind,
               count(v.verification_id) AS done,
               count(v.verification_id) FILTER (WHERE v.status = 'passed') AS passed,
               count(v.verification_id) FILTER (WHERE v.status IN ('failed', 'interrupted')) AS failed,
               max(v.finished_at) FILTER (WHERE v.status = 'passed') AS last_passed,
               (array_agg(v.status ORDER BY v.finished_at DESC) FILTER (WHERE v.status IN ('passed', 'failed', 'interrupted')))[1] AS last_status
          FROM repos n CROSS JOIN k
          LEFT JOIN backup.backup_verifications v
            ON v.kind = k.kind AND coalesce(v.repository, primary_name, 'primary') = n.name
           AND v.finished_at >= p_start AND v.finished_at < p_end AND v.status <> 'cancelled'
         GROUP BY n.name, k.kind
    LOOP
        acc := acc || jsonb_build_object(
            'section', 'verification', 'subject', r.name, 'item', r.kind,
            'value', CASE WHEN r.done = 0 AND NOT any_runs THEN 'no data'
                          WHEN r.done = 0 THEN 'none in the period'
                          ELSE format('%s done, %s passed, %s failed; last passed %s', r.done, r.passed, r.failed,
                                      coalesce(backup._report_time(r.last_passed), 'never')) END,
            'status', CASE WHEN r.done = 0 AND NOT any_runs THEN 'info' WHEN r.done = 0 THEN 'warning'
                           WHEN r.last_status <> 'passed' THEN 'failed'
                           WHEN r.failed > 0 THEN 'warning' ELSE 'ok' END,
            'detail', jsonb_build_object('done', r.done, 'passed', r.passed, 'failed', r.failed,
                                         'last_passed', r.last_passed, 'last_status', r.last_status));
    END LOOP;
    acc := acc || coalesce((
        SELECT jsonb_agg(jsonb_build_object(
            'section', 'verification', 'subject', o.repository, 'item', 'never_verified',
            'value', format('%s backup(s) held that no check has passed', o.backups_never_verified),
            'status', CASE WHEN o.backups_never_verified = 0 THEN 'ok' ELSE 'warning' END,
            'detail', jsonb_build_object('count', o.backups_never_verified,
                                         'backup_ids', to_jsonb(o.never_verified_ids[1:50]))))
          FROM backup.recovery_objectives o), '[]');
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(acc) x WHERE x->>'section' = 'verification') THEN
        acc := acc || jsonb_build_object('section', 'verification', 'subject', '', 'item', 'integrity',
            'value', 'no data', 'status', 'info', 'detail', '{}'::jsonb);
    END IF;

    -- retention: the policy in force per repository and its oldest
    -- restorable point (as walshipper info last reported it).
    acc := acc || coalesce((
        SELECT jsonb_agg(x) FROM (
            SELECT jsonb_build_object(
                'section', 'retention', 'subject', s.name, 'item', 'policy',
                'value', CASE WHEN p.repository IS NULL THEN 'walshipper configuration'
                              ELSE concat_ws(', ',
                                   'keep ' || p.keep_full || ' full',
                                   'recovery window ' || backup._report_duration(extract(epoch FROM p.recovery_window)),
                                   nullif(p.keep_daily, 0) || ' daily', nullif(p.keep_weekly, 0) || ' weekly',
                                   nullif(p.keep_monthly, 0) || ' monthly', nullif(p.keep_yearly, 0) || ' yearly') END,
                'status', 'info',
                'detail', CASE WHEN p.repository IS NULL THEN jsonb_build_object('source', 'walshipper configuration')
                               ELSE jsonb_build_object('source', 'backup.retention_policies', 'keep_full', p.keep_full,
                                        'recovery_window_s', extract(epoch FROM p.recovery_window),
                                        'keep_daily', p.keep_daily, 'keep_weekly', p.keep_weekly,
                                        'keep_monthly', p.keep_monthly, 'keep_yearly', p.keep_yearly,
                                        'timezone', p.timezone, 'updated_at', p.updated_at, 'updated_by', p.updated_by) END) AS x
              FROM backup.repository_status s
              LEFT JOIN backup.retention_policies p ON p.repository = s.name
            UNION ALL
            SELECT jsonb_build_object(
                'section', 'retention', 'subject', s.name, 'item', 'oldest_restorable',
                'value', coalesce(backup._report_time(s.first_backup_stop), 'no backup held'),
                'status', CASE WHEN s.first_backup_stop IS NOT NULL THEN 'ok' WHEN s.ok THEN 'warning' ELSE 'info' END,
                'detail', jsonb_build_object('first_backup_stop', s.first_backup_stop, 'backups', s.backups,
                                             'checked_at', s.checked_at))
              FROM backup.repository_status s) y), '[]');

    SELECT p.rotate_every, p.retire_after INTO key_policy FROM backup.key_rotation_policy p;
    key_max_age := coalesce(key_policy.rotate_every
                            + coalesce(nullif(current_setting('pg_backup.key_rotation_grace', true), ''), '1d')::interval,
                            interval '365 days');
    -- encryption: the rotation policy, the key operations of the period,
    -- then per repository: encryption, the age of the key new objects are
    -- sealed with (a warning past key_max_age), and the older keys still in
    -- use (what they seal).
    acc := acc || jsonb_build_array(jsonb_build_object(
        'section', 'encryption', 'subject', '', 'item', 'rotation_policy',
        'value', CASE WHEN key_policy.rotate_every IS NULL THEN 'none: keys are rotated by hand only'
                      ELSE format('rotate every %s%s', key_policy.rotate_every,
                                  CASE WHEN key_policy.retire_after IS NULL THEN ', old keys kept'
                                       ELSE format(', retire keys after %s', key_policy.retire_after) END) END,
        'status', CASE WHEN key_policy.rotate_every IS NULL THEN 'warning' ELSE 'ok' END,
        'detail', jsonb_build_object('rotate_every', key_policy.rotate_every::text,
                                     'retire_after', key_policy.retire_after::text)));
    acc := acc || (
        SELECT jsonb_build_array(jsonb_build_object(
            'section', 'encryption', 'subject', '', 'item', 'key_operations',
            'value', format('%s rotations, %s retirements, %s failed', count(*) FILTER (WHERE o.operation = 'rotate' AND o.status = 'succeeded'),
                            count(*) FILTER (WHERE o.operation = 'retire' AND o.status = 'succeeded'),
                            count(*) FILTER (WHERE o.status = 'failed')),
            'status', CASE WHEN count(*) FILTER (WHERE o.status = 'failed') > 0 THEN 'warning'
                           WHEN count(*) = 0 THEN 'info' ELSE 'ok' END,
            'detail', jsonb_build_object(
                'rotated', count(*) FILTER (WHERE o.operation = 'rotate' AND o.status = 'succeeded'),
                'retired', count(*) FILTER (WHERE o.operation = 'retire' AND o.status = 'succeeded'),
                'failed', count(*) FILTER (WHERE o.status = 'failed'))))
          FROM backup.key_operations o
         WHERE o.finished_at >= p_start AND o.finished_at < p_end);
    acc := acc || coalesce((
        SELECT jsonb_agg(x) FROM (
            SELECT jsonb_build_object(
                'section', 'encryption', 'subject', s.name, 'item', 'encryption',
                'value', coalesce(s.encryption, 'unknown'),
                'status', CASE WHEN s.encryption IS NULL THEN 'info' WHEN s.encryption = 'none' THEN 'warning' ELSE 'ok' END,
                'detail', jsonb_build_object('encryption', s.encryption)) AS x
              FROM backup.repository_status s
            UNION ALL
            SELECT jsonb_build_object(
                'section', 'encryption', 'subject', s.name, 'item', 'key_age',
                'value', CASE WHEN s.key_created_at IS NULL THEN
                                   CASE WHEN s.encryption = 'none' THEN 'no key (not encrypted)' ELSE 'unknown' END
                              ELSE format('%s days (created %s)', floor(extract(epoch FROM now() - s.key_created_at) / 86400),
                                          backup._report_time(s.key_created_at)) END,
                'status', CASE WHEN s.key_created_at IS NULL THEN 'info'
                               WHEN s.key_created_at < now() - key_max_age THEN 'warning' ELSE 'ok' END,
                'detail', jsonb_build_object('key_created_at', s.key_created_at,
                                             'age_days', floor(extract(epoch FROM now() - s.key_created_at) / 86400),
                                             'max_age_days', extract(day FROM key_max_age)))
              FROM backup.repository_status s
            UNION ALL
            SELECT jsonb_build_object(
                'section', 'encryption', 'subject', s.name, 'item', 'older_keys',
                'value', CASE WHEN k.previous = 0 AND k.missing = 0 THEN 'none'
                              ELSE concat_ws(', ',
                                   CASE WHEN k.previous > 0 THEN format('%s still in use%s', k.previous,
                                        CASE WHEN k.objects IS NOT NULL THEN format(' (sealing %s objects)', k.objects) END) END,
                                   CASE WHEN k.missing > 0 THEN format('%s missing: objects name a key the repository no longer holds', k.missing) END) END,
                'status', CASE WHEN k.missing > 0 THEN 'failed'
                               WHEN k.retire_overdue > 0 THEN 'warning' ELSE 'ok' END,
                'detail', jsonb_build_object('previous', k.previous, 'missing', k.missing,
                                             'objects', k.objects, 'retire_overdue', k.retire_overdue))
              FROM backup.repository_status s
              CROSS JOIN LATERAL (
                   SELECT count(*) FILTER (WHERE kk.status = 'previous') AS previous,
                          count(*) FILTER (WHERE kk.status = 'missing') AS missing,
                          sum(kk.objects) FILTER (WHERE kk.status = 'previous') AS objects,
                          count(*) FILTER (WHERE kk.retire_due_at < now()) AS retire_overdue
                     FROM backup.keys kk
                    WHERE kk.repository = s.name) k
             WHERE s.encryption IS DISTINCT FROM 'none') y), '[]');

    -- storage: per repository, stored bytes at the start and the end of the
    -- period (the samples nearest inside it), the growth, and room now.
    FOR r IN
        SELECT n.name, f.sampled_at AS t0, f.stored_bytes AS b0, l.sampled_at AS t1, l.stored_bytes AS b1,
               c.capacity_bytes, c.free_bytes, c.used_ratio, c.min_free_bytes, c.growth_bytes_per_day, c.projected_full_at
          FROM (SELECT s.name FROM backup.repository_status s
                UNION
                SELECT u.repository FROM backup.repository_usage u WHERE u.sampled_at >= p_start AND u.sampled_at < p_end) n
          LEFT JOIN LATERAL (SELECT u.sampled_at, u.stored_bytes FROM backup.repository_usage u
                              WHERE u.repository = n.name AND u.sampled_at >= p_start AND u.sampled_at < p_end
                              ORDER BY u.sampled_at LIMIT 1) f ON true
          LEFT JOIN LATERAL (SELECT u.sampled_at, u.stored_bytes FROM backup.repository_usage u
                              WHERE u.repository = n.name AND u.sampled_at >= p_start AND u.sampled_at < p_end
                              ORDER BY u.sampled_at DESC LIMIT 1) l ON true
          LEFT JOIN backup.repository_capacity c ON c.repository = n.name
    LOOP
        acc := acc || jsonb_build_object(
            'section', 'storage', 'subject', r.name, 'item', 'stored',
            'value', CASE WHEN r.t0 IS NULL THEN 'no data'
                          ELSE format('%s -> %s (%s%s)', pg_size_pretty(r.b0), pg_size_pretty(r.b1),
                                      CASE WHEN r.b1 >= r.b0 THEN '+' ELSE '-' END, pg_size_pretty(abs(r.b1 - r.b0))) END,
            'status', 'info',
            'detail', jsonb_build_object('start_at', r.t0, 'start_bytes', r.b0, 'end_at', r.t1, 'end_bytes', r.b1,
                                         'growth_bytes', r.b1 - r.b0,
                                         'growth_bytes_per_day', CASE WHEN r.t1 > r.t0 THEN
                                             round((r.b1 - r.b0) / (extract(epoch FROM r.t1 - r.t0) / 86400)) END));
        acc := acc || jsonb_build_object(
            'section', 'storage', 'subject', r.name, 'item', 'free',
            'value', CASE WHEN r.free_bytes IS NULL THEN 'unknown (no file system or quota to measure against)'
                          ELSE format('%s free of %s (%s %% used)', pg_size_pretty(r.free_bytes), pg_size_pretty(r.capacity_bytes),
                                      round(r.used_ratio * 100, 1)) END,
            'status', CASE WHEN r.free_bytes IS NULL THEN 'info'
                           WHEN r.free_bytes < r.min_free_bytes THEN 'failed'
                           WHEN r.used_ratio * 100 >= warn_percent THEN 'warning' ELSE 'ok' END,
            'detail', jsonb_build_object('capacity_bytes', r.capacity_bytes, 'free_bytes', r.free_bytes,
                                         'used_ratio', r.used_ratio, 'min_free_bytes', r.min_free_bytes,
                                         'warn_percent', warn_percent));
        acc := acc || jsonb_build_object(
            'section', 'storage', 'subject', r.name, 'item', 'projected_full',
            'value', CASE WHEN r.projected_full_at IS NOT NULL
                               THEN format('%s (growing %s a day)', backup._report_time(r.projected_full_at),
                                           pg_size_pretty(r.growth_bytes_per_day))
                          WHEN r.free_bytes IS NULL THEN 'unknown'
                          WHEN r.growth_bytes_per_day IS NULL THEN 'unknown (not enough samples)'
                          ELSE 'not in sight' END,
            'status', CASE WHEN r.projected_full_at IS NULL THEN 'info'
                           WHEN warn_days > 0 AND r.projected_full_at < now() + make_interval(days => warn_days) THEN 'warning'
                           ELSE 'ok' END,
            'detail', jsonb_build_object('projected_full_at', r.projected_full_at,
                                         'growth_bytes_per_day', r.growth_bytes_per_day, 'warn_days', warn_days));
    END LOOP;

    -- alerts: those raised in the period, or raised before and still open
    -- at its start, per kind and severity: raised, resolved, still open
    -- now, and the mean time to resolve.
    acc := acc || coalesce((
        SELECT jsonb_agg(jsonb_build_object(
            'section', 'alerts', 'subject', g.kind, 'item', g.severity,
            'value', format('%s raised, %s resolved, %s open%s', g.raised, g.resolved, g.open,
                            CASE WHEN g.mttr_s IS NOT NULL THEN '; resolved in ' || backup._report_duration(g.mttr_s) || ' on average' ELSE '' END),
            'status', CASE WHEN g.open = 0 THEN 'ok' WHEN g.severity = 'critical' THEN 'failed'
                           WHEN g.severity = 'warning' THEN 'warning' ELSE 'info' END,
            'detail', jsonb_build_object('raised', g.raised, 'resolved', g.resolved, 'open', g.open,
                                         'mean_time_to_resolve_s', round(g.mttr_s::numeric, 1))))
          FROM (SELECT a.kind, a.severity,
                       count(*) FILTER (WHERE a.raised_at >= p_start) AS raised,
                       count(*) FILTER (WHERE a.resolved_at >= p_start AND a.resolved_at < p_end) AS resolved,
                       count(*) FILTER (WHERE a.resolved_at IS NULL) AS open,
                       avg(extract(epoch FROM a.resolved_at - a.raised_at))
                           FILTER (WHERE a.resolved_at >= p_start AND a.resolved_at < p_end) AS mttr_s
                  FROM backup.alerts a
                 WHERE a.raised_at < p_end AND (a.resolved_at IS NULL OR a.resolved_at >= p_start)
                 GROUP BY a.kind, a.severity) g), '[]');
    IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(acc) x WHERE x->>'section' = 'alerts') THEN
        acc := acc || jsonb_build_object('section', 'alerts', 'subject', '', 'item', 'total',
            'value', 'none raised', 'status', 'info', 'detail', jsonb_build_object('raised', 0));
    END IF;

    -- summary: the worst status of everything above, the period, the cluster.
    SELECT CASE max(CASE x->>'status' WHEN 'failed' THEN 3 WHEN 'warning' THEN 2 WHEN 'ok' THEN 1 END)
                WHEN 3 THEN 'failed' WHEN 2 THEN 'warning' WHEN 1 THEN 'ok' ELSE 'info' END
      INTO worst FROM jsonb_array_elements(acc) x;
    -- pg_control_system() is a superuser's or pg_monitor's by default.
    IF has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE') THEN
        SELECT c.system_identifier::text INTO sysid FROM pg_catalog.pg_control_system() c;
    END IF;
    acc := acc || jsonb_build_object('section', 'summary', 'subject', '', 'item', 'overall',
            'value', CASE worst WHEN 'info' THEN 'no data'
                     ELSE format('%s: %s failed, %s warning(s), %s ok', worst,
                                 (SELECT count(*) FROM jsonb_array_elements(acc) x WHERE x->>'status' = 'failed'),
                                 (SELECT count(*) FROM jsonb_array_elements(acc) x WHERE x->>'status' = 'warning'),
                                 (SELECT count(*) FROM jsonb_array_elements(acc) x WHERE x->>'status' = 'ok')) END,
            'status', worst,
            'detail', jsonb_build_object(
                'failed', (SELECT count(*) FROM jsonb_array_elements(acc) x WHERE x->>'status' = 'failed'),
                'warning', (SELECT count(*) FROM jsonb_array_elements(acc) x WHERE x->>'status' = 'warning'),
                'ok', (SELECT count(*) FROM jsonb_array_elements(acc) x WHERE x->>'status' = 'ok')))
        || jsonb_build_object('section', 'summary', 'subject', '', 'item', 'period',
            'value', backup._report_time(p_start) || ' to ' || backup._report_time(p_end),
            'status', 'info',
            'detail', jsonb_build_object('start', p_start, 'end', p_end, 'generated_at', now()))
        || jsonb_build_object('section', 'summary', 'subject', '', 'item', 'system_identifier',
            'value', coalesce(sysid, 'unknown (pg_control_system() is not granted)'),
            'status', 'info',
            'detail', jsonb_build_object('system_identifier', sysid, 'database', current_database()));

    RETURN QUERY
    SELECT x->>'section', x->>'subject', x->>'item', x->>'value', x->>'status', x->'detail'
      FROM jsonb_array_elements(acc) x
     ORDER BY array_position(ARRAY['summary', 'schedule', 'backups', 'recovery_objectives', 'verification',
                                   'retention', 'encryption', 'storage', 'alerts'], x->>'section'),
              x->>'subject', x->>'item';
END
$$;
COMMENT ON FUNCTION backup.compliance_report(timestamptz, timestamptz) IS 'For a period: jobs on schedule, success rates, recovery objectives met, verifications, retention, encryption, storage and alerts, as rows an auditor reads (walshipper report renders them).';
