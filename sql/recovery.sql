-- Recoveries: table restores from SQL, cancelling them, and the
-- scheduler's side of every verification and recovery (sql/verifications.sql
-- queues them): at most one runs at a time, never while walshipper expire
-- runs (it could remove the backup under test), as a walshipper child
-- process whose argument vector is built here; its phases, progress and
-- result are recorded here. Command-line restores come in through the
-- repository status refresh (backup._sched_import_recoveries).

-- Table restore: tables (schema.table, in SQL identifier syntax) of the
-- current database as they were at a target, loaded into the new schema
-- into_schema of this database, owned by the caller. Not an operator
-- function: it reveals past contents of any table, so only superusers and
-- roles given backup.grant_table_restore(role) may execute it. Bad input is
-- refused here, before anything is recorded or created.
CREATE FUNCTION backup.table_restore(tables text[], into_schema text, target_time timestamptz DEFAULT NULL,
                                     restore_point text DEFAULT NULL, wait boolean DEFAULT true)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    t text;
    parts text[];
    names jsonb := '[]';
    tgt jsonb;
BEGIN
    IF tables IS NULL OR cardinality(tables) = 0 THEN
        RAISE EXCEPTION 'no tables to restore'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Pass ARRAY[''schema.table'', ...].';
    END IF;
    IF cardinality(tables) > 100 THEN
        RAISE EXCEPTION '% tables asked for; at most 100 in one table restore', cardinality(tables)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Restore the cluster, or a database, with walshipper restore instead.';
    END IF;
    FOREACH t IN ARRAY tables LOOP
        BEGIN
            parts := parse_ident(t);
        EXCEPTION WHEN OTHERS THEN
            parts := NULL;
        END;
        IF t IS NULL OR parts IS NULL OR cardinality(parts) NOT IN (1, 2)
           OR EXISTS (SELECT 1 FROM unnest(parts) p WHERE p = '' OR octet_length(p) > 63 OR p ~ '[[:cntrl:]]') THEN
            RAISE EXCEPTION 'invalid table name %', coalesce(to_json(t)::text, 'NULL')
                USING ERRCODE = 'invalid_name',
                      HINT = 'Name each table as schema.table or table (in public), quoting as in SQL: public."Order Lines".';
        END IF;
        IF cardinality(parts) = 1 THEN
            parts := ARRAY['public'] || parts;
        END IF;
        t := quote_ident(parts[1]) || '.' || quote_ident(parts[2]);
        IF names ? t THEN
            RAISE EXCEPTION 'table % is named twice', t USING ERRCODE = 'invalid_parameter_value';
        END IF;
        names := names || to_jsonb(t);
    END LOOP;
    IF into_schema IS NULL OR into_schema !~ '^[a-z_][a-z0-9_]{0,62}$' OR into_schema ~ '^pg_' THEN
        RAISE EXCEPTION 'invalid schema name %', coalesce(to_json(into_schema)::text, 'NULL')
            USING ERRCODE = 'invalid_name',
                  HINT = 'Name a new schema: lower-case letters, digits and "_", not starting with a digit or "pg_" (e.g. restored_orders).';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = into_schema) THEN
        RAISE EXCEPTION 'schema "%" already exists', into_schema
            USING ERRCODE = 'duplicate_schema',
                  HINT = 'Tables are restored into a new schema, never over existing objects: choose a schema name not in use.';
    END IF;
    IF EXISTS (SELECT 1 FROM backup.recovery_operations o
                WHERE o.kind = 'table_restore' AND o.status IN ('queued', 'running')
                  AND o.database = current_database() AND o.schema_name = into_schema) THEN
        RAISE EXCEPTION 'a table restore into schema "%" is already queued or running', into_schema
            USING ERRCODE = 'object_in_use', HINT = 'See backup.recovery_operations; choose another schema name.';
    END IF;
    IF target_time IS NULL AND restore_point IS NULL THEN
        -- The end of the archived WAL: the tables as they are now, give or take the RPO.
        PERFORM 1 FROM backup._restorable() LIMIT 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'no backup to restore from'
                USING ERRCODE = 'no_data_found', HINT = 'Run SELECT backup.backup_run(wait => true) first.';
        END IF;
    END IF;
    tgt := backup._recovery_target(target_time, restore_point);
    RETURN backup._recovery_request(jsonb_build_object('table', 'operation', 'kind', 'table_restore',
        'database', current_database(), 'schema_name', into_schema, 'tables', names,
        'load_role', backup._caller(), 'target_kind', tgt->>'kind', 'target_value', tgt->>'value'), wait);
END
$$;

-- Operator API: cancels a queued or running recovery started from SQL (a
-- restore test's too). The scheduler stops a running one within seconds.
CREATE FUNCTION backup.recovery_cancel(operation_id bigint)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    o backup.recovery_operations;
BEGIN
    SELECT * INTO o FROM backup.recovery_operations x WHERE x.operation_id = recovery_cancel.operation_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no recovery operation %', operation_id
            USING ERRCODE = 'undefined_object', HINT = 'See backup.recovery_operations.';
    END IF;
    IF o.status NOT IN ('queued', 'running') THEN
        RAISE EXCEPTION 'recovery operation % already ended (%)', operation_id, o.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF o.status = 'queued' THEN
        UPDATE backup.recovery_operations x SET status = 'cancelled', finished_at = now(), error = 'cancelled before it started'
         WHERE x.operation_id = o.operation_id;
        UPDATE backup.backup_verifications v SET status = 'cancelled', finished_at = now(), error = 'cancelled before it started'
         WHERE v.operation_id = o.operation_id AND v.status = 'queued';
    ELSE
        UPDATE backup.recovery_operations x SET cancel_requested = true WHERE x.operation_id = o.operation_id;
    END IF;
    PERFORM backup._audit('cancel', 'recovery', o.kind, jsonb_build_object('operation_id', o.operation_id));
END
$$;

-- The backend that started at p_started with pid p_pid is alive: the pid
-- alone could be another process's once that backend died.
CREATE FUNCTION backup._worker_alive(p_pid integer, p_started timestamptz)
RETURNS boolean LANGUAGE sql STABLE
AS $$
    SELECT EXISTS (SELECT 1 FROM pg_stat_activity s WHERE s.pid = p_pid AND s.backend_start = p_started)
$$;

-- This backend's start, recorded with its pid by whoever runs a task.
CREATE FUNCTION backup._backend_started()
RETURNS timestamptz LANGUAGE sql STABLE
AS $$
    SELECT s.backend_start FROM pg_stat_activity s WHERE s.pid = pg_backend_pid()
$$;

-- A verification or recovery runs (its worker is alive).
CREATE FUNCTION backup._recovery_running()
RETURNS boolean LANGUAGE sql STABLE
AS $$
    SELECT EXISTS (SELECT 1 FROM backup.backup_verifications v
                    WHERE v.status = 'running' AND backup._worker_alive(v.worker_pid, v.worker_started))
        OR EXISTS (SELECT 1 FROM backup.recovery_operations o
                    WHERE o.status = 'running' AND o.source = 'sql'
                      AND backup._worker_alive(o.worker_pid, o.worker_started))
$$;

-- walshipper's words for a target.
CREATE FUNCTION backup._recovery_target_args(p_kind text, p_value text)
RETURNS text[] LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE p_kind WHEN 'time' THEN ARRAY['--target-time', p_value]
                       WHEN 'name' THEN ARRAY['--target-name', p_value]
                       WHEN 'lsn' THEN ARRAY['--target-lsn', p_value]
                       ELSE '{}' END
$$;

-- The arguments of walshipper (after --config) for verification or
-- recovery operation p_id (p_table 'verification' or 'operation').
CREATE FUNCTION backup._recovery_args(p_table text, p_id bigint)
RETURNS text[] LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v backup.backup_verifications;
    o backup.recovery_operations;
BEGIN
    IF p_table = 'verification' THEN
        SELECT * INTO v FROM backup.backup_verifications x WHERE x.verification_id = p_id;
        IF v.kind = 'integrity' THEN
            RETURN CASE WHEN v.repository IS NOT NULL THEN ARRAY['--repo', v.repository] ELSE '{}' END
                || ARRAY['verify', '--json']
                || CASE WHEN v.backup_id IS NOT NULL THEN ARRAY['--backup', v.backup_id] ELSE '{}' END;
        END IF;
        RETURN CASE WHEN v.repository IS NOT NULL THEN ARRAY['--repo', v.repository] ELSE '{}' END
            || ARRAY['restore-test', '--json']
            || CASE WHEN v.backup_id IS NOT NULL THEN ARRAY['--backup', v.backup_id] ELSE '{}' END
            || backup._recovery_target_args(v.target_kind, v.target_value)
            || coalesce((SELECT array_agg(w ORDER BY c.name, i)
                           FROM backup.restore_checks c,
                                unnest(ARRAY['--check-json',
                                             jsonb_build_object('name', c.name, 'database', c.database,
                                                                'query', c.query, 'expected', c.expected)::text])
                                    WITH ORDINALITY u (w, i)
                          WHERE c.job_id IS NULL OR c.job_id = v.job_id), '{}');
    END IF;
    SELECT * INTO o FROM backup.recovery_operations x WHERE x.operation_id = p_id;
    RETURN CASE WHEN o.repository IS NOT NULL THEN ARRAY['--repo', o.repository] ELSE '{}' END
        || ARRAY['table-restore', '--json', '--database', o.database]
        || coalesce((SELECT array_agg(w ORDER BY t.n, u.i)
                       FROM jsonb_array_elements_text(o.tables) WITH ORDINALITY t (name, n),
                            unnest(ARRAY['--table', t.name]) WITH ORDINALITY u (w, i)), '{}')
        || ARRAY['--into-schema', o.schema_name, '--role', o.load_role]
        || CASE WHEN o.backup_id IS NOT NULL THEN ARRAY['--backup', o.backup_id] ELSE '{}' END
        || backup._recovery_target_args(o.target_kind, o.target_value);
END
$$;

-- Starts queued verification or recovery p_id if nothing keeps it from
-- starting (another one running, walshipper expire running): marks it
-- running as this backend's and returns walshipper's arguments; else NULL.
-- Takes the lock that keeps expire and backups apart (sql/common.sql), so
-- that no expire starts in between.
CREATE FUNCTION backup._recovery_try_start(p_table text, p_id bigint)
RETURNS text[] LANGUAGE plpgsql
AS $$
DECLARE
    op bigint;
BEGIN
    PERFORM 1 FROM backup.repository_activity a WHERE a.id = 1 FOR UPDATE;
    IF EXISTS (SELECT 1 FROM backup.repository_activity a
                WHERE a.expire_pid IS NOT NULL AND EXISTS (SELECT 1 FROM pg_stat_activity s WHERE s.pid = a.expire_pid))
       OR backup._recovery_running() THEN
        RETURN NULL;
    END IF;
    IF p_table = 'verification' THEN
        UPDATE backup.backup_verifications v SET status = 'running', started_at = now(), worker_pid = pg_backend_pid(),
               worker_started = backup._backend_started()
         WHERE v.verification_id = p_id AND v.status = 'queued'
        RETURNING v.operation_id INTO op;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        UPDATE backup.recovery_operations o SET status = 'running', started_at = now(), worker_pid = pg_backend_pid(),
               worker_started = backup._backend_started(), phase = 'starting'
         WHERE o.operation_id = op AND o.status = 'queued';
    ELSE
        UPDATE backup.recovery_operations o SET status = 'running', started_at = now(), worker_pid = pg_backend_pid(),
               worker_started = backup._backend_started(), phase = 'starting'
         WHERE o.operation_id = p_id AND o.status = 'queued';
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
    END IF;
    RETURN backup._recovery_args(p_table, p_id);
END
$$;

-- The scheduler: the oldest queued verification or recovery, started if
-- it may start, as {table, id, args}; NULL when there is none or it must wait.
CREATE FUNCTION backup._sched_recovery_claim()
RETURNS jsonb LANGUAGE plpgsql
AS $$
DECLARE
    c record;
    args text[];
BEGIN
    SELECT * INTO c FROM (
        SELECT 'verification' AS tbl, v.verification_id AS id, v.queued_at FROM backup.backup_verifications v WHERE v.status = 'queued'
        UNION ALL
        SELECT 'operation', o.operation_id, o.queued_at FROM backup.recovery_operations o
         WHERE o.status = 'queued' AND o.kind = 'table_restore' AND o.source = 'sql'
    ) q ORDER BY q.queued_at, q.id LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    args := backup._recovery_try_start(c.tbl, c.id);
    IF args IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN jsonb_build_object('table', c.tbl, 'id', c.id, 'args', to_jsonb(args));
END
$$;

-- Live progress: the phase and bytes of a running one (on its recovery
-- operation), and whether it was asked to stop. A row another transaction
-- holds is skipped this time: the scheduler never waits on an operator.
CREATE FUNCTION backup._sched_recovery_progress(p_table text, p_id bigint, p_phase text, p_done bigint, p_total bigint)
RETURNS boolean LANGUAGE plpgsql
AS $$
DECLARE
    op bigint := CASE WHEN p_table = 'operation' THEN p_id
                      ELSE (SELECT v.operation_id FROM backup.backup_verifications v WHERE v.verification_id = p_id) END;
BEGIN
    UPDATE backup.recovery_operations o
       SET phase = coalesce(left(p_phase, 40), o.phase),
           bytes_done = CASE WHEN p_total > 0 THEN p_done ELSE o.bytes_done END,
           bytes_total = CASE WHEN p_total > 0 THEN p_total ELSE o.bytes_total END
     WHERE o.operation_id = (SELECT x.operation_id FROM backup.recovery_operations x
                              WHERE x.operation_id = op FOR UPDATE SKIP LOCKED);
    RETURN coalesce((SELECT v.cancel_requested FROM backup.backup_verifications v
                      WHERE p_table = 'verification' AND v.verification_id = p_id), false)
        OR coalesce((SELECT o.cancel_requested FROM backup.recovery_operations o WHERE o.operation_id = op), false);
END
$$;

-- A number from walshipper's report (untrusted): NULL unless finite and >= 0.
CREATE FUNCTION backup._seconds_or_null(v jsonb)
RETURNS double precision LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN jsonb_typeof(v) = 'number' AND v::text::double precision BETWEEN 0 AND 1e9
                THEN v::text::double precision END
$$;

CREATE FUNCTION backup._lsn_or_null(t text)
RETURNS pg_lsn LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    RETURN t::pg_lsn;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;

-- A report's text as it goes into the catalog: one line, at most 2000 characters.
CREATE FUNCTION backup._line(t text)
RETURNS text LANGUAGE sql IMMUTABLE
AS $$ SELECT left(regexp_replace(t, '[[:cntrl:]]', ' ', 'g'), 2000) $$;

-- Records the end of verification or recovery p_id: walshipper's result
-- event (verify, restore_test or table_restore; NULL if it printed none),
-- its exit code, its error message and hint. p_status forces the outcome
-- ('cancelled', 'interrupted', 'failed': stopped, timed out). Raises or
-- resolves verification_failed, restore_test_failed, table_restore_failed.
CREATE FUNCTION backup._sched_recovery_finish(p_table text, p_id bigint, p_result jsonb, p_code integer,
                                              p_error text, p_hint text, p_status text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    v backup.backup_verifications;
    o backup.recovery_operations;
    ok boolean;
    st text;
    err text;
    rid text;
    bid text;
    failing text;
    subject text;
    ev text := p_result->>'event';
    repo text;
BEGIN
    rid := CASE WHEN p_result->>'operation_id' ~ '^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$' THEN p_result->>'operation_id' END;
    bid := CASE WHEN p_result->>'backup_id' ~ '^[0-9]{8}-[0-9]{6}[FDI]([1-9][0-9]{0,2})?$' THEN p_result->>'backup_id' END;
    -- The repository walshipper read (a request naming none ran on one, the
    -- primary): what recovery_objectives credits.
    repo := CASE WHEN p_result->>'repository' ~ '^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$' THEN p_result->>'repository' END;
    IF p_table = 'verification' THEN
        SELECT * INTO v FROM backup.backup_verifications x WHERE x.verification_id = p_id FOR UPDATE;
        IF NOT FOUND OR v.status NOT IN ('queued', 'running') THEN
            RETURN;
        END IF;
        IF v.kind = 'integrity' THEN
            ok := coalesce(p_status IS NULL AND p_code = 0 AND ev = 'verify' AND p_result->'ok' = 'true', false);
            failing := (SELECT string_agg(x, '; ') FROM (SELECT jsonb_array_elements_text(
                           CASE WHEN jsonb_typeof(p_result->'problems') = 'array' THEN p_result->'problems' ELSE '[]' END) x
                           LIMIT 10) y);
        ELSE
            ok := coalesce(p_status IS NULL AND p_code = 0 AND ev = 'restore_test' AND p_result->'passed' = 'true', false);
            -- The checks that failed, with what they found.
            failing := (SELECT string_agg((c->>'name') || ': ' || coalesce(c->>'detail', ''), '; ') FROM (SELECT c FROM jsonb_array_elements(
                           CASE WHEN jsonb_typeof(p_result->'checks') = 'array' THEN p_result->'checks' ELSE '[]' END) c
                           WHERE c->'passed' IS DISTINCT FROM 'true' LIMIT 10) y);
        END IF;
        st := CASE WHEN ok THEN 'passed' ELSE coalesce(p_status, 'failed') END;
        err := CASE WHEN NOT ok THEN backup._line(coalesce(concat_ws(': ', coalesce(p_result->>'error', p_error), failing),
                                                           'walshipper reported no result')) END;
        UPDATE backup.backup_verifications x
           SET status = st, finished_at = greatest(now(), x.queued_at, coalesce(x.started_at, x.queued_at)),
               repository = coalesce(x.repository, repo),
               backup_id = coalesce(x.backup_id, bid,
                                    -- A read-back of one backup names it.
                                    CASE WHEN jsonb_typeof(p_result->'backups') = 'array' AND jsonb_array_length(p_result->'backups') = 1
                                              AND p_result->'backups'->>0 ~ '^[0-9]{8}-[0-9]{6}[FDI]([1-9][0-9]{0,2})?$'
                                         THEN p_result->'backups'->>0 END),
               target_kind = CASE WHEN p_result->'target'->>'kind' IN ('end', 'immediate', 'time', 'lsn', 'xid', 'name')
                                  THEN p_result->'target'->>'kind' ELSE x.target_kind END,
               target_value = coalesce(left(p_result->'target'->>'value', 256), x.target_value),
               restore_s = backup._seconds_or_null(p_result->'restore_s'),
               replay_s = backup._seconds_or_null(p_result->'replay_s'),
               checks_s = backup._seconds_or_null(p_result->'checks_s'),
               rto_s = backup._seconds_or_null(p_result->'total_s'),
               recovered_lsn = backup._lsn_or_null(p_result->>'recovered_lsn'),
               recovered_time = backup._timestamptz_or_null(p_result->>'recovered_time'),
               checks = CASE WHEN jsonb_typeof(p_result->'checks') = 'array' THEN p_result->'checks' END,
               error = err, error_hint = CASE WHEN NOT ok THEN backup._line(p_hint) END,
               report = p_result
         WHERE x.verification_id = p_id
        RETURNING * INTO v;
        IF v.operation_id IS NOT NULL THEN
            UPDATE backup.recovery_operations x
               SET status = CASE st WHEN 'passed' THEN 'succeeded' ELSE st END,
                   finished_at = greatest(now(), coalesce(x.started_at, x.queued_at)), phase = NULL,
                   record_id = CASE WHEN NOT EXISTS (SELECT 1 FROM backup.recovery_operations y
                                                      WHERE y.record_id = rid AND y.operation_id <> x.operation_id)
                                    THEN coalesce(rid, x.record_id) ELSE x.record_id END,
                   repository = v.repository,
                   backup_id = v.backup_id, target_kind = v.target_kind, target_value = v.target_value,
                   duration_s = coalesce(v.rto_s, extract(epoch FROM now() - x.started_at)),
                   error = err, error_hint = v.error_hint, report = p_result
             WHERE x.operation_id = v.operation_id;
        END IF;
        PERFORM backup._audit('finish', 'verification', v.kind,
            jsonb_strip_nulls(jsonb_build_object('verification_id', p_id, 'operation_id', v.operation_id, 'status', st,
                                                 'backup_id', v.backup_id, 'rto_s', v.rto_s, 'error', err)),
            v.requested_by);
        subject := coalesce(v.repository, (backup._known_repositories())[1], 'primary');
        IF st = 'passed' THEN
            PERFORM backup._resolve_alert(CASE v.kind WHEN 'integrity' THEN 'verification_failed' ELSE 'restore_test_failed' END, subject);
        ELSIF st = 'failed' THEN
            PERFORM backup._raise_alert(CASE v.kind WHEN 'integrity' THEN 'verification_failed' ELSE 'restore_test_failed' END,
                'critical', subject,
                format('%s %s of %s (repository %s) failed: %s', CASE v.kind WHEN 'integrity' THEN 'verification' ELSE 'restore test' END,
                       p_id, coalesce(v.backup_id, 'the backups'), subject, err),
                jsonb_strip_nulls(jsonb_build_object('verification_id', p_id, 'operation_id', v.operation_id, 'backup_id', v.backup_id)));
        END IF;
        RETURN;
    END IF;

    SELECT * INTO o FROM backup.recovery_operations x WHERE x.operation_id = p_id FOR UPDATE;
    IF NOT FOUND OR o.status NOT IN ('queued', 'running') THEN
        RETURN;
    END IF;
    ok := coalesce(p_status IS NULL AND p_code = 0 AND ev = 'table_restore', false);
    st := CASE WHEN ok THEN 'succeeded' ELSE coalesce(p_status, 'failed') END;
    err := CASE WHEN NOT ok THEN backup._line(coalesce(p_error, 'walshipper reported no result')) END;
    UPDATE backup.recovery_operations x
       SET status = st, finished_at = greatest(now(), coalesce(x.started_at, x.queued_at)), phase = NULL,
           record_id = CASE WHEN NOT EXISTS (SELECT 1 FROM backup.recovery_operations y
                                              WHERE y.record_id = rid AND y.operation_id <> x.operation_id)
                            THEN coalesce(rid, x.record_id) ELSE x.record_id END,
           repository = coalesce(x.repository, repo),
           backup_id = coalesce(bid, x.backup_id),
           target_kind = CASE WHEN p_result->'target'->>'kind' IN ('end', 'immediate', 'time', 'lsn', 'xid', 'name')
                              THEN p_result->'target'->>'kind' ELSE x.target_kind END,
           target_value = coalesce(left(p_result->'target'->>'value', 256), x.target_value),
           duration_s = coalesce(backup._seconds_or_null(p_result->'total_s'), extract(epoch FROM now() - x.started_at)),
           error = err, error_hint = CASE WHEN NOT ok THEN backup._line(p_hint) END,
           report = p_result
     WHERE x.operation_id = p_id
    RETURNING * INTO o;
    PERFORM backup._audit('finish', 'recovery', 'table_restore',
        jsonb_strip_nulls(jsonb_build_object('operation_id', p_id, 'status', st, 'backup_id', o.backup_id,
                                             'schema', o.schema_name, 'error', err,
                                             'rows', (SELECT sum((t->>'rows')::numeric) FROM jsonb_array_elements(
                                                         CASE WHEN jsonb_typeof(p_result->'tables') = 'array' THEN p_result->'tables' ELSE '[]' END) t
                                                       WHERE jsonb_typeof(t->'rows') = 'number'))),
        o.requested_by::name);
    IF st = 'succeeded' THEN
        PERFORM backup._resolve_alert('table_restore_failed', o.database);
    ELSIF st = 'failed' THEN
        PERFORM backup._raise_alert('table_restore_failed', 'warning', o.database,
            format('table restore %s into schema %s of database %s failed: %s', p_id, o.schema_name, o.database, err),
            jsonb_build_object('operation_id', p_id));
    END IF;
END
$$;

-- Every scheduler tick (and at its start): verifications and recoveries
-- whose worker (pid and backend start) is gone, by a restart or a worker
-- that died on an error, were interrupted; marking them so lets the queue
-- behind them (and expire) go on. Returns how many.
CREATE FUNCTION backup._sched_interrupt_stale()
RETURNS integer LANGUAGE plpgsql
AS $$
DECLARE
    n integer;
    m integer;
    msg text := 'interrupted: its worker ended without recording a result (a server or scheduler restart, '
                || 'or the worker failed: see the server log)';
BEGIN
    -- Fresh backend states for each statement: a worker that claimed a row
    -- after this transaction first looked must be seen alive.
    PERFORM pg_stat_clear_snapshot();
    UPDATE backup.backup_verifications v
       SET status = 'interrupted', finished_at = greatest(now(), v.queued_at, coalesce(v.started_at, v.queued_at)),
           error = msg
     WHERE v.status = 'running' AND NOT backup._worker_alive(v.worker_pid, v.worker_started);
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pg_stat_clear_snapshot();
    UPDATE backup.recovery_operations o
       SET status = 'interrupted', finished_at = greatest(now(), coalesce(o.started_at, o.queued_at)), phase = NULL,
           error = msg
     WHERE o.status = 'running' AND o.source = 'sql' AND NOT backup._worker_alive(o.worker_pid, o.worker_started);
    GET DIAGNOSTICS m = ROW_COUNT;
    RETURN n + m;
END
$$;

-- `walshipper info --recoveries-after` for the next refresh (one id for
-- every repository): the oldest point up to which a repository's records
-- were taken in (repository_status.recoveries_seen: one unreachable for a
-- while keeps its older point, so nothing it holds is skipped), less 7
-- days, because a record is named by the time its restore started and
-- stored when it ended (a long restore's record lands after shorter ones
-- started later). Records listed again are known and skipped. NULL when
-- none was taken in yet (walshipper lists its newest).
CREATE FUNCTION backup._sched_recoveries_after()
RETURNS text LANGUAGE sql STABLE
AS $$
    SELECT to_char(to_timestamp(left(min(s.recoveries_seen), 16), 'YYYYMMDD"T"HH24MISS"Z"') - interval '7 days',
                   'YYYYMMDD"T"HH24MISS"Z"') || '-00000000'
      FROM backup.repository_status s WHERE s.recoveries_seen IS NOT NULL
$$;

-- Takes a repository's recovery records (info --json's `recoveries`,
-- untrusted) into backup.recovery_operations: a record of an operation
-- started from SQL is attached to it, any other is a command-line restore,
-- recorded with an audit row. Records already known are skipped; a
-- malformed one is skipped with a warning. Returns how many were added.
CREATE FUNCTION backup._sched_import_recoveries(p_repository text, p_records jsonb)
RETURNS integer LANGUAGE plpgsql
AS $$
DECLARE
    r jsonb;
    rid text;
    op text;
    started timestamptz;
    finished timestamptz;
    mine bigint;
    id bigint;
    bid text;
    who text;
    n integer := 0;
BEGIN
    IF jsonb_typeof(p_records) IS DISTINCT FROM 'array' THEN
        RETURN 0;
    END IF;
    FOR r IN SELECT x FROM jsonb_array_elements(p_records) x WHERE jsonb_typeof(x) = 'object' LOOP
        rid := r->>'id';
        op := r->>'operation';
        IF rid !~ '^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$' OR op NOT IN ('restore', 'restore_test', 'table_restore')
           OR EXISTS (SELECT 1 FROM backup.recovery_operations o WHERE o.record_id = rid) THEN
            CONTINUE;
        END IF;
        started := backup._timestamptz_or_null(r->>'started_at');
        finished := coalesce(backup._timestamptz_or_null(r->>'finished_at'), now());
        -- Ours: an operation of that kind started from SQL moments before
        -- the record's, whose result did not give us its id (yet).
        SELECT o.operation_id INTO mine FROM backup.recovery_operations o
         WHERE o.source = 'sql' AND o.kind = op AND o.record_id IS NULL AND o.started_at IS NOT NULL
           AND started BETWEEN o.started_at - interval '5 seconds' AND o.started_at + interval '2 minutes'
         ORDER BY abs(extract(epoch FROM started - o.started_at)) LIMIT 1;
        IF FOUND THEN
            UPDATE backup.recovery_operations o SET record_id = rid WHERE o.operation_id = mine;
            CONTINUE;
        END IF;
        who := left(coalesce(r->>'os_user', '?'), 60) || '@' || left(coalesce(r->>'host', '?'), 190);
        BEGIN
            INSERT INTO backup.recovery_operations AS o
                   (kind, source, record_id, repository, backup_id, target_kind, target_value, target_dir, databases,
                    requested_by, status, queued_at, started_at, finished_at, duration_s, error, report)
            VALUES (op, 'command_line', rid, p_repository,
                    CASE WHEN r->>'backup_id' ~ '^[0-9]{8}-[0-9]{6}[FDI]([1-9][0-9]{0,2})?$' THEN r->>'backup_id' END,
                    CASE WHEN r->'target'->>'kind' IN ('end', 'immediate', 'time', 'lsn', 'xid', 'name') THEN r->'target'->>'kind' ELSE 'end' END,
                    backup._line(r->'target'->>'value'),
                    left(r->>'target_dir', 4096),
                    CASE WHEN jsonb_typeof(r->'databases') = 'array'
                         THEN ARRAY(SELECT left(d, 63) FROM jsonb_array_elements_text(r->'databases') d LIMIT 1000) END,
                    who,
                    CASE WHEN r->'succeeded' = 'true' THEN 'succeeded' ELSE 'failed' END,
                    coalesce(started, finished), coalesce(started, finished), greatest(finished, coalesce(started, finished)),
                    backup._seconds_or_null(r->'duration_s'),
                    CASE WHEN r->'succeeded' = 'true' THEN NULL ELSE backup._line(coalesce(r->>'error', 'failed (no reason recorded)')) END,
                    r)
            RETURNING o.operation_id, o.backup_id INTO id, bid;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'pg_backup: recovery record % of repository % skipped: %', rid, p_repository, SQLERRM;
            CONTINUE;
        END;
        PERFORM backup._audit(op, 'recovery', rid,
            jsonb_strip_nulls(jsonb_build_object('operation_id', id, 'source', 'command_line', 'repository', p_repository,
                                                 'backup_id', bid, 'target_dir', left(r->>'target_dir', 4096),
                                                 'succeeded', r->'succeeded', 'requested_by', who)),
            left(who, 63)::name);
        n := n + 1;
    END LOOP;
    -- Taken in up to now; a listing cut at walshipper's limit (500
    -- records) only up to its newest record, where the next one goes on.
    UPDATE backup.repository_status s
       SET recoveries_seen = greatest(s.recoveries_seen,
               CASE WHEN jsonb_array_length(p_records) >= 500
                    THEN (SELECT max(x->>'id') FROM jsonb_array_elements(p_records) x
                           WHERE x->>'id' ~ '^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$')
                    ELSE to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD"T"HH24MISS"Z"') || '-00000000' END)
     WHERE s.name = p_repository;
    RETURN n;
END
$$;

-- Health of the proofs: restore_test_overdue (no passed restore test
-- within p_max_age seconds, once the oldest backup is older than that) and
-- rto_exceeded (the newest passed restore test of a repository took
-- longer than p_rto_target seconds).
CREATE FUNCTION backup._sched_check_recoveries(p_rto_target integer, p_max_age integer)
RETURNS void LANGUAGE plpgsql SET IntervalStyle = 'postgres'
AS $$
DECLARE
    age interval := make_interval(secs => p_max_age);
    oldest timestamptz;
    last_pass timestamptz;
    r record;
    primary_name text := coalesce((backup._known_repositories())[1], 'primary');
BEGIN
    SELECT min(e.finished_at) INTO oldest FROM backup.backup_executions e WHERE e.status = 'succeeded';
    SELECT max(v.finished_at) INTO last_pass FROM backup.backup_verifications v
     WHERE v.kind = 'restore_test' AND v.status = 'passed';
    IF oldest < now() - age AND coalesce(last_pass, '-infinity') < now() - age THEN
        PERFORM backup._raise_alert('restore_test_overdue', 'warning', 'restore_test',
            format('no restore test passed in the last %s (last: %s): nothing proves the backups restorable',
                   justify_interval(age), coalesce(to_char(last_pass AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' UTC', 'never')),
            jsonb_build_object('last_passed_at', last_pass));
    ELSE
        PERFORM backup._resolve_alert('restore_test_overdue', 'restore_test');
    END IF;
    FOR r IN SELECT DISTINCT ON (coalesce(v.repository, primary_name)) coalesce(v.repository, primary_name) AS repo,
                    v.rto_s, v.verification_id
               FROM backup.backup_verifications v
              WHERE v.kind = 'restore_test' AND v.status = 'passed' AND v.rto_s IS NOT NULL
              ORDER BY coalesce(v.repository, primary_name), v.finished_at DESC LOOP
        IF r.rto_s > p_rto_target THEN
            PERFORM backup._raise_alert('rto_exceeded', 'warning', r.repo,
                format('the last restore test from repository %s took %s, above the RTO target of %s',
                       r.repo, make_interval(secs => round(r.rto_s)), make_interval(secs => p_rto_target)),
                jsonb_build_object('verification_id', r.verification_id, 'rto_s', r.rto_s));
        ELSE
            PERFORM backup._resolve_alert('rto_exceeded', r.repo);
        END IF;
    END LOOP;
END
$$;

-- About once a minute: each repository's RPO now, for
-- backup.recovery_objectives' worst RPO; samples older than p_keep
-- seconds are removed.
CREATE FUNCTION backup._sched_sample_rpo(p_keep integer)
RETURNS void LANGUAGE plpgsql
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM backup.rpo_samples s WHERE s.sampled_at > now() - interval '55 seconds') THEN
        RETURN;
    END IF;
    INSERT INTO backup.rpo_samples (repository, sampled_at, rpo, in_sync)
    SELECT o.repository, now(), o.rpo_now, o.wal_in_sync FROM backup.recovery_objectives o
    ON CONFLICT DO NOTHING;
    DELETE FROM backup.rpo_samples s WHERE s.sampled_at < now() - make_interval(secs => p_keep);
END
$$;
