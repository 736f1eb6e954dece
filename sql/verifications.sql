-- Proving backups restorable: integrity read-backs (walshipper verify) and
-- restore tests (walshipper restore-test) on request, queued for the
-- scheduler or waited for in a background worker of their own, like
-- backup_run(); the DBA's own checks of restored clusters. The scheduler's
-- side (starting, following and recording them) is in sql/recovery.sql.

-- The target of a restore test or table restore: end of the archived WAL,
-- a time, or a restore point (restore_points.wal_name, the name in the
-- WAL). Refuses, with the reason, a target no backup or archived WAL
-- reaches (backup.restore_plan()'s checks).
CREATE FUNCTION backup._recovery_target(p_time timestamptz, p_point text)
RETURNS jsonb LANGUAGE plpgsql
AS $$
DECLARE
    wal text;
BEGIN
    IF p_time IS NOT NULL AND p_point IS NOT NULL THEN
        RAISE EXCEPTION 'give target_time or restore_point, not both'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_time IS NOT NULL THEN
        PERFORM backup.restore_plan(p_time);
        RETURN jsonb_build_object('kind', 'time',
            'value', to_char(p_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00');
    END IF;
    IF p_point IS NOT NULL THEN
        PERFORM backup.restore_plan(p_point);
        SELECT r.wal_name INTO wal FROM backup.restore_points r WHERE r.name = p_point;
        RETURN jsonb_build_object('kind', 'name', 'value', wal);
    END IF;
    RETURN jsonb_build_object('kind', 'end', 'value', NULL);
END
$$;

-- A backup id as the caller gave it: of walshipper's form (it becomes an
-- argument) and one the catalog knows to be held.
CREATE FUNCTION backup._check_backup_id(p_backup_id text)
RETURNS void LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF p_backup_id !~ '^[0-9]{8}-[0-9]{6}[FDI]([1-9][0-9]{0,2})?$' THEN
        RAISE EXCEPTION 'invalid backup id %', to_json(p_backup_id)::text
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Backup ids look like 20261121-224754F; see backup.backups.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM backup.backups b WHERE b.backup_id = p_backup_id)
       AND NOT EXISTS (SELECT 1 FROM backup.repository_backups r WHERE r.backup_id = p_backup_id) THEN
        RAISE EXCEPTION 'no backup %', p_backup_id
            USING ERRCODE = 'undefined_object', HINT = 'See backup.backups for the backups held.';
    END IF;
END
$$;

-- Records a requested verification or recovery (p_req, built by the API
-- functions) as queued, with its audit row, and returns its id. p_id: the
-- id a waiting caller took; p_requester: who asked (a worker records it
-- for the caller). A restore test gets its recovery operation at once.
CREATE FUNCTION backup._recovery_enqueue(p_req jsonb, p_id bigint DEFAULT NULL, p_requester name DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql
AS $$
DECLARE
    who name := coalesce(p_requester, backup._caller());
    id bigint;
    op bigint;
BEGIN
    IF p_req->>'table' = 'verification' THEN
        IF p_req->>'kind' = 'restore_test' THEN
            INSERT INTO backup.recovery_operations AS o (kind, source, repository, backup_id, target_kind, target_value, requested_by)
            VALUES ('restore_test', 'sql', p_req->>'repository', p_req->>'backup_id',
                    coalesce(p_req->>'target_kind', 'end'), p_req->>'target_value', who)
            RETURNING o.operation_id INTO op;
        END IF;
        INSERT INTO backup.backup_verifications AS v
               (verification_id, backup_id, repository, kind, job_id, requested_by, target_kind, target_value, operation_id)
        OVERRIDING SYSTEM VALUE
        VALUES (coalesce(p_id, nextval(pg_get_serial_sequence('backup.backup_verifications', 'verification_id'))),
                p_req->>'backup_id', p_req->>'repository', p_req->>'kind', (p_req->>'job_id')::bigint, who,
                coalesce(p_req->>'target_kind', 'end'), p_req->>'target_value', op)
        RETURNING v.verification_id INTO id;
        PERFORM backup._audit('run', 'verification', coalesce(p_req->>'job_name', p_req->>'kind'),
            jsonb_strip_nulls(jsonb_build_object('verification_id', id, 'kind', p_req->>'kind', 'operation_id', op,
                'backup_id', p_req->>'backup_id', 'repository', p_req->>'repository',
                'target', CASE WHEN p_req->>'kind' = 'restore_test'
                               THEN jsonb_build_object('kind', coalesce(p_req->>'target_kind', 'end'), 'value', p_req->>'target_value') END,
                'wait', p_id IS NOT NULL, 'scheduled', p_req->'scheduled', 'after_execution', p_req->'after_execution')),
            who);
        RETURN id;
    END IF;
    INSERT INTO backup.recovery_operations AS o
           (operation_id, kind, source, target_kind, target_value, database, schema_name, tables, load_role, requested_by)
    OVERRIDING SYSTEM VALUE
    VALUES (coalesce(p_id, nextval(pg_get_serial_sequence('backup.recovery_operations', 'operation_id'))),
            'table_restore', 'sql', coalesce(p_req->>'target_kind', 'end'), p_req->>'target_value',
            p_req->>'database', p_req->>'schema_name', p_req->'tables', p_req->>'load_role', who)
    RETURNING o.operation_id INTO id;
    PERFORM backup._audit('run', 'recovery', 'table_restore',
        jsonb_build_object('operation_id', id, 'database', p_req->>'database', 'schema', p_req->>'schema_name',
                           'tables', p_req->'tables',
                           'target', jsonb_build_object('kind', p_req->>'target_kind', 'value', p_req->>'target_value'),
                           'wait', p_id IS NOT NULL),
        who);
    RETURN id;
END
$$;

-- Queues p_req, or with p_wait runs it now in a worker of its own and
-- raises its failure (like backup_run(wait => true)). Returns its id.
CREATE FUNCTION backup._recovery_request(p_req jsonb, p_wait boolean)
RETURNS bigint LANGUAGE plpgsql
AS $$
DECLARE
    tbl text := p_req->>'table';
    id bigint;
    st text;
    err text;
    hint text;
BEGIN
    IF NOT coalesce(p_wait, false) THEN
        id := backup._recovery_enqueue(p_req);
        PERFORM pg_notify('backup_requests', tbl || ' ' || id);
        RETURN id;
    END IF;
    -- The worker records the request, its audit row and its outcome in
    -- its own transactions: they are kept whatever happens to this one.
    id := nextval(pg_get_serial_sequence(CASE tbl WHEN 'verification' THEN 'backup.backup_verifications'
                                                  ELSE 'backup.recovery_operations' END,
                                         CASE tbl WHEN 'verification' THEN 'verification_id' ELSE 'operation_id' END));
    PERFORM backup._recovery_in_worker(tbl, id, p_req::text,
                                       (SELECT r.oid::bigint FROM pg_roles r WHERE r.rolname = backup._caller()));
    LOOP
        -- A worker that died on an error left its row running: interrupted.
        PERFORM backup._sched_interrupt_stale();
        IF tbl = 'verification' THEN
            SELECT v.status, v.error, v.error_hint INTO st, err, hint FROM backup.backup_verifications v WHERE v.verification_id = id;
        ELSE
            SELECT o.status, o.error, o.error_hint INTO st, err, hint FROM backup.recovery_operations o WHERE o.operation_id = id;
        END IF;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the worker ended without recording % %', replace(tbl, 'operation', 'recovery operation'), id
                USING HINT = 'See the server log.';
        END IF;
        -- The scheduler starts the oldest queued request, ours included, and
        -- may have started it before our worker did: then wait for its end.
        EXIT WHEN st <> 'running';
        PERFORM pg_sleep(1);
    END LOOP;
    IF st NOT IN ('passed', 'succeeded') THEN
        RAISE EXCEPTION '% % %: %', CASE WHEN p_req->>'kind' = 'integrity' THEN 'verification'
                                         ELSE replace(p_req->>'kind', '_', ' ') END,
                        id, st, coalesce(err, st)
            USING ERRCODE = 'external_routine_exception',
                  HINT = coalesce(hint || ' ', '') || CASE tbl
                      WHEN 'verification' THEN format('It is recorded: SELECT * FROM backup.backup_verifications WHERE verification_id = %s.', id)
                      ELSE format('It is recorded: SELECT * FROM backup.recovery_operations WHERE operation_id = %s.', id) END;
    END IF;
    RETURN id;
END
$$;

-- Operator API: an integrity read-back of a backup (NULL: every backup of
-- the repository) by walshipper verify. Returns the verification_id.
CREATE FUNCTION backup.verify_run(backup_id text DEFAULT NULL, wait boolean DEFAULT false, repository text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
AS $$
BEGIN
    IF backup_id IS NOT NULL THEN
        PERFORM backup._check_backup_id(backup_id);
    END IF;
    IF repository IS NOT NULL THEN
        PERFORM backup._check_repository(repository);
    END IF;
    RETURN backup._recovery_request(jsonb_build_object('table', 'verification', 'kind', 'integrity',
                                                       'backup_id', backup_id, 'repository', repository), wait);
END
$$;

-- Operator API: a restore test of a backup (NULL: the newest) to a target
-- (NULL: the end of the archived WAL) by walshipper restore-test, with the
-- checks of backup.restore_checks. Returns the verification_id.
CREATE FUNCTION backup.restore_test_run(backup_id text DEFAULT NULL, target_time timestamptz DEFAULT NULL,
                                        restore_point text DEFAULT NULL, wait boolean DEFAULT false,
                                        repository text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    t jsonb;
BEGIN
    IF backup_id IS NOT NULL THEN
        PERFORM backup._check_backup_id(backup_id);
    END IF;
    IF repository IS NOT NULL THEN
        PERFORM backup._check_repository(repository);
    END IF;
    t := backup._recovery_target(target_time, restore_point);
    RETURN backup._recovery_request(jsonb_build_object('table', 'verification', 'kind', 'restore_test',
                                                       'backup_id', backup_id, 'repository', repository,
                                                       'target_kind', t->>'kind', 'target_value', t->>'value'), wait);
END
$$;

-- Operator API: a queued verification ends at once; a running one is
-- stopped by the scheduler within seconds (walshipper cleans up).
CREATE FUNCTION backup.verification_cancel(verification_id bigint)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    v backup.backup_verifications;
BEGIN
    SELECT * INTO v FROM backup.backup_verifications x WHERE x.verification_id = verification_cancel.verification_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no verification %', verification_id
            USING ERRCODE = 'undefined_object', HINT = 'See backup.backup_verifications.';
    END IF;
    IF v.status = 'queued' THEN
        UPDATE backup.backup_verifications x SET status = 'cancelled', finished_at = now(), error = 'cancelled before it started'
         WHERE x.verification_id = v.verification_id;
        UPDATE backup.recovery_operations o SET status = 'cancelled', finished_at = now(), error = 'cancelled before it started'
         WHERE o.operation_id = v.operation_id AND o.status = 'queued';
    ELSIF v.status = 'running' THEN
        UPDATE backup.backup_verifications x SET cancel_requested = true WHERE x.verification_id = v.verification_id;
    ELSE
        RAISE EXCEPTION 'verification % already ended (%)', verification_id, v.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    PERFORM backup._audit('cancel', 'verification', verification_id::text,
        jsonb_strip_nulls(jsonb_build_object('verification_id', verification_id, 'operation_id', v.operation_id)));
END
$$;

-- A check every restore test (or, with job_name, that restore_test job's)
-- runs in the restored cluster: query, in database, must return expected
-- (the first column of its first row, as text). Not an operator function:
-- the query runs as a member of pg_read_all_data in the restored copy and
-- its result lands in backup_verifications (checks, report), which
-- monitors read, so only superusers and roles given
-- backup.grant_table_restore(role), already trusted with all past data,
-- may execute it (and restore_check_drop).
CREATE FUNCTION backup.restore_check_create(name text, query text, expected text,
                                            database text DEFAULT current_database(), job_name text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    j backup.backup_jobs;
    id bigint;
BEGIN
    IF name IS NULL OR name !~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid check name %', coalesce(to_json(name)::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 63 letters, digits, "_", "." or "-", starting with a letter, digit or "_".';
    END IF;
    IF EXISTS (SELECT 1 FROM backup.restore_checks c WHERE c.name = restore_check_create.name) THEN
        RAISE EXCEPTION 'restore check "%" already exists', name
            USING ERRCODE = 'duplicate_object', HINT = 'Drop it with backup.restore_check_drop() first, or choose another name.';
    END IF;
    IF coalesce(length(query), 0) NOT BETWEEN 1 AND 10000 OR expected IS NULL OR length(expected) > 10000 THEN
        RAISE EXCEPTION 'a restore check needs a query and an expected result (each up to 10000 characters)'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'E.g. restore_check_create(''orders'', ''SELECT count(*) > 0 FROM orders'', ''t'').';
    END IF;
    IF coalesce(length(database), 0) NOT BETWEEN 1 AND 63 THEN
        RAISE EXCEPTION 'invalid database name %', coalesce(to_json(database)::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF job_name IS NOT NULL THEN
        SELECT * INTO j FROM backup.backup_jobs b WHERE b.name = job_name;
        IF NOT FOUND OR j.kind <> 'restore_test' THEN
            RAISE EXCEPTION 'no restore_test job "%"', job_name
                USING ERRCODE = 'undefined_object',
                      HINT = 'Name a job created with kind => ''restore_test'', or omit job_name for every restore test.';
        END IF;
    END IF;
    INSERT INTO backup.restore_checks AS c (name, database, query, expected, job_id)
    VALUES (name, database, query, expected, j.job_id)
    RETURNING c.check_id INTO id;
    PERFORM backup._audit('create', 'restore_check', name,
        jsonb_build_object('database', database, 'query', query, 'expected', expected, 'job', job_name));
    RETURN id;
END
$$;

-- Superusers and table restorers, as restore_check_create().
CREATE FUNCTION backup.restore_check_drop(name text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    c backup.restore_checks;
BEGIN
    DELETE FROM backup.restore_checks x WHERE x.name = restore_check_drop.name RETURNING * INTO c;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'restore check "%" does not exist', name
            USING ERRCODE = 'undefined_object', HINT = 'See SELECT name FROM backup.restore_checks.';
    END IF;
    PERFORM backup._audit('drop', 'restore_check', name,
        jsonb_build_object('database', c.database, 'query', c.query, 'expected', c.expected));
END
$$;
