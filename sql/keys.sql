-- Data keys and their rotation policy (issue 16): backup.encryption_keys
-- (filled from walshipper info --json's `keys`), the policy the scheduler
-- carries out (walshipper key rotate / key retire), its audit and alerts.
-- Key material and passphrases never enter the database: what is stored is
-- a key's id (a random name, not derived from the key), its creation time
-- and what walshipper counted of the objects it seals.
--
-- Settings (read here with current_setting(), defined in
-- pg_backup_ext/src/settings.rs): pg_backup.key_rotation_grace,
-- pg_backup.key_retry_delay; the scheduler's own: pg_backup.key_task_timeout,
-- pg_backup.key_usage_interval (docs/operations.md, "Key rotation from SQL").

-- Each data key of each repository as walshipper last reported it. Rows are
-- never removed by a refresh: a key that left a repository that answered
-- keeps its row with retired_at set, so the history stays.
CREATE TABLE backup.encryption_keys (
    repository      text NOT NULL,
    key_id          text NOT NULL CHECK (key_id ~ '^[0-9a-f]{32}$'),
    -- When it was created (its key file says); NULL: unknown.
    created_at      timestamptz,
    -- New objects of the repository are sealed by it.
    is_current      boolean NOT NULL DEFAULT false,
    -- Its key file is in the repository (false: objects name a key the
    -- repository no longer holds, and cannot be read).
    present         boolean NOT NULL DEFAULT true,
    -- Objects sealed by it and their bytes when last counted (counted_at).
    objects         bigint CHECK (objects >= 0),
    bytes           bigint CHECK (bytes >= 0),
    counted_at      timestamptz,
    -- What is wrong with its key file, as walshipper said.
    error           text,
    first_seen      timestamptz NOT NULL DEFAULT now(),
    last_seen       timestamptz NOT NULL DEFAULT now(),
    -- When it was gone from a repository that answered (its file removed by
    -- walshipper key retire, or no object names a missing key any more).
    retired_at      timestamptz,
    PRIMARY KEY (repository, key_id)
);
COMMENT ON TABLE backup.encryption_keys IS 'Each repository''s data keys as walshipper info reported them (never key material), kept after they are retired.';

-- The rotation policy the scheduler carries out (one row). rotate_every
-- NULL: no scheduled rotation; retire_after NULL: keys are retired only on
-- request (backup.retire_key()).
CREATE TABLE backup.key_rotation_policy (
    id              integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    rotate_every    interval CHECK (rotate_every > interval '0'),
    retire_after    interval CHECK (retire_after > interval '0'),
    updated_by      name NOT NULL DEFAULT backup._caller(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
INSERT INTO backup.key_rotation_policy (id) VALUES (1);
COMMENT ON TABLE backup.key_rotation_policy IS 'How often the data key is rotated and when older keys are retired (backup.set_key_rotation()).';

-- Every key operation the scheduler ran or is to run: asked for
-- (rotate_key_now(), retire_key()) or due by the policy.
CREATE TABLE backup.key_operations (
    operation_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    operation       text NOT NULL CHECK (operation IN ('rotate', 'retire')),
    -- retire: the key retired; rotate: the new current key, once known.
    key_id          text CHECK (key_id ~ '^[0-9a-f]{32}$'),
    reason          text NOT NULL CHECK (reason IN ('policy', 'requested')),
    requested_by    name NOT NULL DEFAULT backup._caller(),
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    queued_at       timestamptz NOT NULL DEFAULT now(),
    -- Not started before (a repository that was busy is tried again later).
    not_before      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    worker_pid      integer,
    error           text,
    error_hint      text,
    -- walshipper's report, checked: per repository, what was done.
    details         jsonb,
    CHECK (operation = 'rotate' OR key_id IS NOT NULL)
);
CREATE INDEX key_operations_open ON backup.key_operations (operation_id) WHERE status IN ('queued', 'running');
COMMENT ON TABLE backup.key_operations IS 'Key rotations and retirements the scheduler ran (walshipper key rotate / key retire), asked for or due by the policy.';

-- Each key with its status: current (new objects are sealed by it),
-- previous (still in the repository, objects may be sealed by it), retired
-- (gone from the repository), missing (objects name it, its file is gone).
-- rotation_due_at: the current key's created_at plus rotate_every;
-- retire_due_at: a previous key's created_at plus retire_after.
CREATE VIEW backup.keys AS
SELECT x.repository, x.key_id, x.status, x.created_at,
       date_trunc('second', now() - x.created_at) AS age,
       x.objects, x.bytes, x.counted_at,
       x.rotation_due_at,
       round((extract(epoch FROM x.rotation_due_at - now()) / 86400)::numeric, 1) AS days_until_rotation_due,
       x.retire_due_at,
       x.first_seen, x.last_seen, x.retired_at, x.error
  FROM (SELECT k.*,
               CASE WHEN k.retired_at IS NOT NULL THEN 'retired'
                    WHEN NOT k.present THEN 'missing'
                    WHEN k.is_current THEN 'current'
                    ELSE 'previous' END AS status,
               CASE WHEN k.retired_at IS NULL AND k.present AND k.is_current
                    THEN k.created_at + p.rotate_every END AS rotation_due_at,
               CASE WHEN k.retired_at IS NULL AND k.present AND NOT k.is_current
                    THEN k.created_at + p.retire_after END AS retire_due_at,
               coalesce(s.position, 1000000) AS position
          FROM backup.encryption_keys k
          CROSS JOIN backup.key_rotation_policy p
          LEFT JOIN backup.repository_status s ON s.name = k.repository) x
 ORDER BY x.position, x.repository,
          CASE x.status WHEN 'current' THEN 0 WHEN 'missing' THEN 1 WHEN 'previous' THEN 2 ELSE 3 END,
          x.created_at DESC NULLS LAST, x.key_id;
COMMENT ON VIEW backup.keys IS 'Each repository''s data keys: status (current, previous, retired, missing), age, objects still sealed by each, when rotation and retirement are due.';

-- The policy as audited: the same text whatever the session's IntervalStyle.
CREATE FUNCTION backup._key_policy_json(p backup.key_rotation_policy)
RETURNS jsonb LANGUAGE sql STABLE SET IntervalStyle = 'postgres'
AS $$
    SELECT jsonb_build_object('rotate_every', p.rotate_every::text, 'retire_after', p.retire_after::text)
$$;

-- key_rotation_overdue: a policy is set and a repository's current key is
-- older than rotate_every plus pg_backup.key_rotation_grace (raised per
-- repository, warning); resolved once rotated, or when the policy is off.
CREATE FUNCTION backup._key_overdue_check()
RETURNS void LANGUAGE plpgsql SET IntervalStyle = 'postgres'
AS $$
DECLARE
    -- Shown with its unit ('1d'): read as an interval, shown in days.
    grace interval := justify_interval(coalesce(
        nullif(current_setting('pg_backup.key_rotation_grace', true), ''), '1d')::interval);
    p backup.key_rotation_policy;
    k record;
BEGIN
    SELECT * INTO p FROM backup.key_rotation_policy WHERE id = 1;
    FOR k IN SELECT s.name AS repository, c.key_id, c.created_at
               FROM backup.repository_status s
               LEFT JOIN backup.encryption_keys c
                      ON c.repository = s.name AND c.is_current AND c.present AND c.retired_at IS NULL
              WHERE s.ok LOOP
        IF p.rotate_every IS NOT NULL AND k.created_at + p.rotate_every + grace < now() THEN
            PERFORM backup._raise_alert('key_rotation_overdue', 'warning', k.repository,
                format('the data key of repository %s (%s) was created %s ago: rotation is overdue (every %s, grace %s)',
                       k.repository, k.key_id, date_trunc('second', now() - k.created_at), p.rotate_every, grace),
                jsonb_build_object('key_id', k.key_id, 'created_at', k.created_at,
                                   'rotate_every', p.rotate_every::text, 'grace', grace::text));
        ELSE
            PERFORM backup._resolve_alert('key_rotation_overdue', k.repository);
        END IF;
    END LOOP;
    -- Repositories no longer configured.
    PERFORM backup._resolve_alert('key_rotation_overdue', a.subject)
       FROM backup.alerts a
      WHERE a.kind = 'key_rotation_overdue' AND a.resolved_at IS NULL
        AND NOT EXISTS (SELECT 1 FROM backup.repository_status s WHERE s.name = a.subject);
END
$$;

-- After each refresh of repository status (backup._sched_repo_status()):
-- the keys of every repository that answered, from its `keys` (contract:
-- key_status). Every value is checked (the report is walshipper's, never
-- trusted to fit): an entry without a valid key id is skipped, a time or
-- count that does not fit is NULL; a repository reporting more than 1000
-- keys, or none while encrypted, is left as it was. A known key absent
-- from the report of a repository that answered is retired (a missing one
-- only when objects were counted: only then would walshipper name it).
CREATE FUNCTION backup._key_refresh(p_report jsonb)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    r jsonb;
    counted timestamptz;
BEGIN
    IF jsonb_typeof(p_report->'repositories') IS DISTINCT FROM 'array' THEN
        RETURN;
    END IF;
    FOR r IN SELECT * FROM jsonb_array_elements(p_report->'repositories') LOOP
        CONTINUE WHEN jsonb_typeof(r) IS DISTINCT FROM 'object'
                   OR r->'ok' IS DISTINCT FROM 'true'::jsonb
                   OR jsonb_typeof(r->'keys') IS DISTINCT FROM 'array'
                   OR jsonb_array_length(r->'keys') > 1000
                   -- An encrypted repository has at least its current key:
                   -- a report naming none is not believed.
                   OR (jsonb_array_length(r->'keys') = 0 AND r->>'encryption' IS DISTINCT FROM 'none')
                   OR coalesce(r->>'name', '') !~ '^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$';
        counted := backup._timestamptz_or_null(r->>'keys_counted_at');
        IF counted > now() + interval '1 day' THEN
            counted := NULL;
        END IF;
        WITH given AS (
            SELECT DISTINCT ON (k->>'key_id') k->>'key_id' AS key_id, k, n
              FROM jsonb_array_elements(r->'keys') WITH ORDINALITY AS e (k, n)
             WHERE jsonb_typeof(k) = 'object' AND k->>'key_id' ~ '^[0-9a-f]{32}$'
             ORDER BY k->>'key_id', n
        ), ranked AS (
            -- One current key: the first the report marks so.
            SELECT g.*, g.k->'current' = 'true'::jsonb
                        AND g.n = min(g.n) FILTER (WHERE g.k->'current' = 'true'::jsonb) OVER () AS is_current
              FROM given g
        )
        INSERT INTO backup.encryption_keys AS e (repository, key_id, created_at, is_current, present,
                                                 objects, bytes, counted_at, error)
        SELECT r->>'name', x.key_id,
               (SELECT t FROM backup._timestamptz_or_null(x.k->>'created_at') t WHERE t <= now() + interval '1 day'),
               coalesce(x.is_current, false),
               x.k->'present' IS DISTINCT FROM 'false'::jsonb,
               CASE WHEN counted IS NOT NULL THEN backup._capacity_bytes_or_null(x.k->'objects') END,
               CASE WHEN counted IS NOT NULL THEN backup._capacity_bytes_or_null(x.k->'bytes') END,
               counted,
               CASE WHEN jsonb_typeof(x.k->'error') = 'string'
                    THEN left(regexp_replace(x.k->>'error', '[[:cntrl:]]', ' ', 'g'), 500) END
          FROM ranked x
        ON CONFLICT (repository, key_id) DO UPDATE
           SET created_at = coalesce(EXCLUDED.created_at, e.created_at),
               is_current = EXCLUDED.is_current, present = EXCLUDED.present,
               -- Counts stay those of the last count until the next one.
               objects = CASE WHEN EXCLUDED.counted_at IS NOT NULL THEN EXCLUDED.objects ELSE e.objects END,
               bytes = CASE WHEN EXCLUDED.counted_at IS NOT NULL THEN EXCLUDED.bytes ELSE e.bytes END,
               counted_at = coalesce(EXCLUDED.counted_at, e.counted_at),
               error = EXCLUDED.error, last_seen = now(), retired_at = NULL;
        UPDATE backup.encryption_keys e
           SET retired_at = now(), is_current = false
         WHERE e.repository = r->>'name' AND e.retired_at IS NULL
           AND (e.present OR counted IS NOT NULL)
           AND e.key_id NOT IN (SELECT k->>'key_id' FROM jsonb_array_elements(r->'keys') k
                                 WHERE jsonb_typeof(k) = 'object' AND k->>'key_id' IS NOT NULL);
    END LOOP;
    -- A retirement that failed is moot once its key is gone everywhere.
    PERFORM backup._resolve_alert('key_rotation_failed', a.subject)
       FROM backup.alerts a
      WHERE a.kind = 'key_rotation_failed' AND a.resolved_at IS NULL AND a.subject LIKE 'key retire %'
        AND NOT EXISTS (SELECT 1 FROM backup.encryption_keys e
                         WHERE e.key_id = substr(a.subject, 13) AND e.retired_at IS NULL);
    PERFORM backup._key_overdue_check();
END
$$;

-- Operator API (backup.grant_key_manager()): the rotation policy.
-- rotate_every NULL turns scheduled rotation off; retire_after (optional)
-- retires keys, once no longer current, when they are that old: every
-- object they sealed is re-encrypted under the current key, then their key
-- file is removed. Audited with the old and the new policy.
CREATE FUNCTION backup.set_key_rotation(rotate_every interval, retire_after interval DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET IntervalStyle = 'postgres'
AS $$
DECLARE
    old backup.key_rotation_policy;
    p backup.key_rotation_policy;
BEGIN
    IF rotate_every <= interval '0' THEN
        RAISE EXCEPTION 'rotate_every must be positive, not %', rotate_every
            USING ERRCODE = 'invalid_parameter_value', HINT = 'NULL turns scheduled rotation off.';
    END IF;
    IF retire_after <= interval '0' THEN
        RAISE EXCEPTION 'retire_after must be positive, not %', retire_after
            USING ERRCODE = 'invalid_parameter_value', HINT = 'NULL retires keys only when backup.retire_key() asks.';
    END IF;
    -- Intervals of days and months compare as PostgreSQL does ('1 mon' = '30 days').
    IF retire_after < rotate_every THEN
        RAISE EXCEPTION 'retire_after (%) is shorter than rotate_every (%)', retire_after, rotate_every
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A key is retired once it is no longer current; shorter than the rotation period, every rotation would '
                         're-encrypt the whole repository at once. Set retire_after to at least rotate_every.';
    END IF;
    SELECT * INTO old FROM backup.key_rotation_policy WHERE id = 1 FOR UPDATE;
    UPDATE backup.key_rotation_policy x
       SET rotate_every = set_key_rotation.rotate_every, retire_after = set_key_rotation.retire_after,
           updated_by = backup._caller(), updated_at = now()
     WHERE x.id = 1
    RETURNING * INTO p;
    PERFORM backup._audit('key_rotation_policy_set', 'key_rotation_policy', 'policy',
        jsonb_build_object('policy', backup._key_policy_json(p), 'previous', backup._key_policy_json(old)));
    PERFORM backup._key_overdue_check();
END
$$;

-- A key operation queued for the scheduler, unless the same one already is.
CREATE FUNCTION backup._key_enqueue(p_operation text, p_key_id text, p_reason text, p_actor name)
RETURNS bigint LANGUAGE plpgsql
AS $$
DECLARE
    id bigint;
BEGIN
    SELECT o.operation_id INTO id FROM backup.key_operations o
     WHERE o.operation = p_operation AND o.status IN ('queued', 'running')
       AND (p_operation = 'rotate' OR o.key_id = p_key_id);
    IF id IS NOT NULL THEN
        RETURN id;
    END IF;
    INSERT INTO backup.key_operations AS o (operation, key_id, reason, requested_by)
    VALUES (p_operation, p_key_id, p_reason, p_actor)
    RETURNING o.operation_id INTO id;
    RETURN id;
END
$$;

-- Operator API: rotate now (the scheduler runs walshipper key rotate when
-- no backup runs). Returns the operation's id (backup.key_operations).
CREATE FUNCTION backup.rotate_key_now()
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    id bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM backup.repository_status s WHERE s.ok AND s.encryption = 'none') THEN
        RAISE EXCEPTION 'repository % is not encrypted: it has no key to rotate',
                        (SELECT string_agg(s.name, ', ') FROM backup.repository_status s WHERE s.ok AND s.encryption = 'none')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Keys are rotated in every configured repository together; see backup.repositories.';
    END IF;
    id := backup._key_enqueue('rotate', NULL, 'requested', backup._caller());
    PERFORM backup._audit('key_rotation_requested', 'key', NULL, jsonb_build_object('operation_id', id));
    RETURN id;
END
$$;

-- Operator API: retire key_id (the scheduler runs walshipper key retire:
-- every object it sealed is re-encrypted under the current key, then its
-- key file is removed, in every repository). Only a key a configured
-- repository holds as previous: never the current one. Returns the
-- operation's id.
CREATE FUNCTION backup.retire_key(key_id text)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    id bigint;
    st text[];
BEGIN
    IF key_id IS NULL OR key_id !~ '^[0-9a-f]{32}$' THEN
        RAISE EXCEPTION 'invalid key id %', coalesce(to_json(left(key_id, 40))::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A key id is 32 lowercase hexadecimal digits; see backup.keys.';
    END IF;
    -- As the repositories still configured last reported it.
    SELECT array_agg(DISTINCT k.status) INTO st FROM backup.keys k
     WHERE k.key_id = retire_key.key_id AND k.repository IN (SELECT s.name FROM backup.repository_status s);
    IF st IS NULL THEN
        RAISE EXCEPTION 'no key % is known', key_id
            USING ERRCODE = 'undefined_object', HINT = 'See backup.keys (refreshed with backup.repositories).';
    ELSIF 'current' = ANY (st) THEN
        RAISE EXCEPTION 'key % is the current key: it cannot be retired', key_id
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Rotate first (backup.rotate_key_now()); the key is then previous and may be retired.';
    ELSIF NOT 'previous' = ANY (st) THEN
        RAISE EXCEPTION 'key % is % in every repository: nothing to retire', key_id, array_to_string(st, ' or ')
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Only a key whose file is still in a repository can be retired; see backup.keys.';
    END IF;
    id := backup._key_enqueue('retire', key_id, 'requested', backup._caller());
    PERFORM backup._audit('key_retirement_requested', 'key', key_id, jsonb_build_object('operation_id', id));
    RETURN id;
END
$$;

-- The scheduler, when no key operation of its runs and no expire is due:
-- operations interrupted by a restart are recorded so; operations due by
-- the policy are queued (only after a refresh of repository status that
-- followed the last key operation, and not within pg_backup.key_retry_delay
-- of a failed one); then the oldest queued one is started when no backup,
-- verification or recovery runs (recorded in backup.repository_activity
-- like an expire, so that none starts until it ends). NULL: nothing to do;
-- {"waiting": true}: one is queued, the repositories are busy;
-- {"operation_id": N, "args": [...]}: started, run walshipper with args.
CREATE FUNCTION backup._sched_key_start()
RETURNS jsonb LANGUAGE plpgsql
AS $$
DECLARE
    retry interval := coalesce(nullif(current_setting('pg_backup.key_retry_delay', true), ''), '1h')::interval;
    p backup.key_rotation_policy;
    o backup.key_operations;
    last_end timestamptz;
    due text;
BEGIN
    FOR o IN SELECT * FROM backup.key_operations x
              WHERE x.status = 'running'
                AND (x.worker_pid = pg_backend_pid()
                     OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = x.worker_pid)) LOOP
        PERFORM backup._sched_key_done(o.operation_id, NULL,
            'interrupted: the server or the scheduler restarted during the operation', NULL);
    END LOOP;
    SELECT * INTO p FROM backup.key_rotation_policy WHERE id = 1;
    IF NOT EXISTS (SELECT 1 FROM backup.key_operations x WHERE x.status IN ('queued', 'running'))
       AND (p.rotate_every IS NOT NULL OR p.retire_after IS NOT NULL) THEN
        SELECT max(x.finished_at) INTO last_end FROM backup.key_operations x;
        IF (SELECT min(s.checked_at) FROM backup.repository_status s) > coalesce(last_end, '-infinity')
           AND NOT EXISTS (SELECT 1 FROM backup.key_operations x
                            WHERE x.status = 'failed' AND x.finished_at > now() - retry)
           AND NOT EXISTS (SELECT 1 FROM backup.repository_status s WHERE NOT s.ok) THEN
            IF EXISTS (SELECT 1 FROM backup.keys k
                        WHERE k.status = 'current' AND k.rotation_due_at <= now()
                          AND k.repository IN (SELECT s.name FROM backup.repository_status s))
               -- Never twice within the period, whatever a report says of
               -- the keys' ages (a clock or report gone wrong would
               -- otherwise rotate at every refresh).
               AND NOT EXISTS (SELECT 1 FROM backup.key_operations x
                                WHERE x.operation = 'rotate' AND x.status = 'succeeded'
                                  AND x.finished_at > now() - p.rotate_every) THEN
                PERFORM backup._key_enqueue('rotate', NULL, 'policy', 'scheduler');
            ELSE
                -- The oldest key due, never one still current anywhere.
                SELECT k.key_id INTO due FROM backup.keys k
                 WHERE k.status = 'previous' AND k.retire_due_at <= now()
                   AND k.repository IN (SELECT s.name FROM backup.repository_status s)
                   AND NOT EXISTS (SELECT 1 FROM backup.keys c WHERE c.key_id = k.key_id AND c.status = 'current')
                 ORDER BY k.created_at, k.key_id LIMIT 1;
                IF due IS NOT NULL THEN
                    PERFORM backup._key_enqueue('retire', due, 'policy', 'scheduler');
                END IF;
            END IF;
        END IF;
    END IF;
    SELECT * INTO o FROM backup.key_operations x
     WHERE x.status = 'queued' ORDER BY x.queued_at, x.operation_id LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF o.not_before > now() OR NOT backup._sched_expire_begin() THEN
        RETURN '{"waiting": true}';
    END IF;
    UPDATE backup.key_operations x SET status = 'running', started_at = now(), worker_pid = pg_backend_pid()
     WHERE x.operation_id = o.operation_id;
    RETURN jsonb_build_object('operation_id', o.operation_id,
        'args', CASE o.operation WHEN 'rotate' THEN jsonb_build_array('key', 'rotate', '--json')
                                 ELSE jsonb_build_array('key', 'retire', o.key_id, '--json') END);
END
$$;

-- The end of a key operation: walshipper's `key` event (contract: key and
-- key_repository; NULL when it printed none) and, when it failed, its
-- reason and hint; p_busy: it found a repository locked, so the operation
-- goes back to the queue for a minute later. Checked before it is
-- believed. Records the operation, an audit row (actor 'scheduler'; ids
-- and counts, never anything secret), the keys it changed, and raises
-- key_rotation_failed (critical when the repositories were left with
-- different current keys, else warning) or resolves it.
CREATE FUNCTION backup._sched_key_done(p_id bigint, p_report jsonb, p_error text, p_hint text,
                                       p_busy boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    o backup.key_operations;
    repos jsonb;
    new_key text;
    ok boolean;
    err text := left(regexp_replace(p_error, '[[:cntrl:]]', ' ', 'g'), 2000);
    hint text := left(regexp_replace(p_hint, '[[:cntrl:]]', ' ', 'g'), 1000);
    subject text;
    previous text;
    split boolean;
BEGIN
    SELECT * INTO o FROM backup.key_operations x WHERE x.operation_id = p_id FOR UPDATE;
    IF NOT FOUND OR o.status <> 'running' THEN
        RETURN;
    END IF;
    PERFORM backup._sched_expire_end();
    IF p_busy THEN
        UPDATE backup.key_operations x
           SET status = 'queued', started_at = NULL, worker_pid = NULL, not_before = now() + interval '1 minute'
         WHERE x.operation_id = p_id;
        RETURN;
    END IF;
    subject := CASE o.operation WHEN 'rotate' THEN 'key rotate' ELSE 'key retire ' || o.key_id END;
    IF jsonb_typeof(p_report) = 'object' AND p_report->>'operation' = o.operation
       AND jsonb_typeof(p_report->'repositories') = 'array' THEN
        SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'repository', left(x->>'repository', 64),
                   'ok', x->'ok' = 'true'::jsonb,
                   'error', left(regexp_replace(x->>'error', '[[:cntrl:]]', ' ', 'g'), 500),
                   'current_key_id', CASE WHEN x->>'current_key_id' ~ '^[0-9a-f]{32}$' THEN x->>'current_key_id' END,
                   'key_files', backup._capacity_bytes_or_null(x->'key_files'),
                   'objects_rewritten', backup._capacity_bytes_or_null(x->'objects_rewritten'),
                   'bytes_rewritten', backup._capacity_bytes_or_null(x->'bytes_rewritten'),
                   'objects_remaining', backup._capacity_bytes_or_null(x->'objects_remaining'),
                   'key_file_removed', x->'key_file_removed' = 'true'::jsonb) ORDER BY n), '[]')
          INTO repos
          FROM jsonb_array_elements(p_report->'repositories') WITH ORDINALITY AS e (x, n)
         WHERE jsonb_typeof(x) = 'object' AND n <= 64;
        new_key := CASE WHEN p_report->>'key_id' ~ '^[0-9a-f]{32}$' THEN p_report->>'key_id' END;
    END IF;
    ok := err IS NULL AND repos IS NOT NULL AND p_report->'succeeded' = 'true'::jsonb
          AND (o.operation = 'rotate' AND new_key IS NOT NULL OR o.operation = 'retire' AND new_key = o.key_id)
          AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(repos) x WHERE x->'ok' <> 'true'::jsonb);
    IF err IS NULL AND NOT ok THEN
        err := CASE WHEN repos IS NULL THEN format('walshipper key %s reported no valid result', o.operation)
                    ELSE format('walshipper key %s reported that it did not succeed', o.operation) END;
    END IF;
    IF o.operation = 'rotate' THEN
        SELECT string_agg(DISTINCT k.key_id, ',') INTO previous FROM backup.encryption_keys k
         WHERE k.is_current AND k.retired_at IS NULL;
    END IF;
    UPDATE backup.key_operations x
       SET status = CASE WHEN ok THEN 'succeeded' ELSE 'failed' END,
           finished_at = greatest(now(), x.started_at),
           key_id = coalesce(x.key_id, new_key),
           error = CASE WHEN ok THEN NULL ELSE err END,
           error_hint = CASE WHEN ok THEN NULL ELSE hint END,
           details = jsonb_build_object('repositories', repos,
                                        'duration_s', CASE WHEN jsonb_typeof(p_report->'duration_s') = 'number'
                                                           THEN p_report->'duration_s' END)
     WHERE x.operation_id = p_id
    RETURNING * INTO o;
    -- What walshipper changed, at once (the next refresh confirms it): the
    -- policy must not see the old key as current and rotate again.
    IF repos IS NOT NULL AND o.operation = 'rotate' THEN
        UPDATE backup.encryption_keys k SET is_current = false
         WHERE (k.repository, k.key_id) IN (
               SELECT k2.repository, k2.key_id FROM backup.encryption_keys k2, jsonb_array_elements(repos) x
                WHERE x->'ok' = 'true'::jsonb AND k2.repository = x->>'repository'
                  AND k2.key_id IS DISTINCT FROM x->>'current_key_id');
        INSERT INTO backup.encryption_keys AS k (repository, key_id, created_at, is_current, present)
        SELECT x->>'repository', x->>'current_key_id', now(), true, true
          FROM jsonb_array_elements(repos) x
         WHERE x->'ok' = 'true'::jsonb AND x->>'current_key_id' IS NOT NULL
           AND x->>'repository' ~ '^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$'
        ON CONFLICT (repository, key_id) DO UPDATE SET is_current = true, present = true, retired_at = NULL, last_seen = now();
    ELSIF repos IS NOT NULL AND o.operation = 'retire' THEN
        UPDATE backup.encryption_keys k SET retired_at = now(), is_current = false
          FROM jsonb_array_elements(repos) x
         WHERE x->'key_file_removed' = 'true'::jsonb AND k.repository = x->>'repository'
           AND k.key_id = o.key_id AND k.retired_at IS NULL;
    END IF;
    split := (SELECT count(DISTINCT x->>'current_key_id') > 1 FROM jsonb_array_elements(coalesce(repos, '[]')) x);
    IF ok THEN
        PERFORM backup._audit(CASE o.operation WHEN 'rotate' THEN 'key_rotated' ELSE 'key_retired' END, 'key', o.key_id,
            jsonb_strip_nulls(jsonb_build_object('operation_id', o.operation_id, 'reason', o.reason,
                'requested_by', o.requested_by, 'previous_key_id', previous,
                'repositories', repos, 'duration_s', o.details->'duration_s')), 'scheduler');
        PERFORM backup._resolve_alert('key_rotation_failed', subject);
    ELSE
        PERFORM backup._audit(CASE o.operation WHEN 'rotate' THEN 'key_rotation_failed' ELSE 'key_retirement_failed' END,
            'key', o.key_id,
            jsonb_strip_nulls(jsonb_build_object('operation_id', o.operation_id, 'reason', o.reason,
                'requested_by', o.requested_by, 'error', err, 'hint', hint, 'repositories', repos)), 'scheduler');
        PERFORM backup._raise_alert('key_rotation_failed', CASE WHEN split THEN 'critical' ELSE 'warning' END, subject,
            format('walshipper key %s%s failed: %s%s%s', o.operation, coalesce(' ' || o.key_id, ''), err,
                   coalesce(' (' || hint || ')', ''),
                   CASE WHEN split THEN '; the repositories now seal with different keys: copies between them fail until it is rerun' ELSE '' END),
            jsonb_strip_nulls(jsonb_build_object('operation_id', o.operation_id, 'operation', o.operation,
                'key_id', o.key_id, 'error', err, 'hint', hint, 'repositories', repos)));
    END IF;
    PERFORM backup._key_overdue_check();
END
$$;

-- Is a key operation queued or running (the scheduler holds backups so
-- that it finds a moment between them)?
CREATE FUNCTION backup._sched_key_pending()
RETURNS boolean LANGUAGE sql STABLE
AS $$ SELECT EXISTS (SELECT 1 FROM backup.key_operations x WHERE x.status IN ('queued', 'running')) $$;
