-- Restore points: named moments to restore to, recorded with their LSN.

CREATE FUNCTION backup.restore_point_create(name text, note text DEFAULT NULL)
RETURNS pg_lsn LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    at_lsn pg_lsn;
    wal text;
BEGIN
    -- The name goes into postgresql.auto.conf (recovery_target_name) and
    -- into the shell command restore_plan prints: only characters neither
    -- treats specially (no quote, backslash, space, newline or $).
    IF name IS NULL OR name !~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,47}$' THEN
        RAISE EXCEPTION 'invalid restore point name %', coalesce(to_json(name)::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 48 letters, digits, "_", ".", ":" or "-", starting with a letter, digit or "_" (e.g. before_release_2.4).';
    END IF;
    IF EXISTS (SELECT 1 FROM backup.restore_points r WHERE r.name = restore_point_create.name) THEN
        RAISE EXCEPTION 'restore point "%" already exists', name
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Give each point its own name.';
    END IF;
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION 'restore points can only be created on a primary'
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    -- The point's name in the WAL carries a random suffix: recovery stops
    -- at the first point of a name, and pg_create_restore_point() cannot
    -- be rolled back, so a point made in a transaction that rolled back,
    -- or by hand under the same name, must never be the one restore_plan
    -- targets.
    wal := name || '-' || left(replace(gen_random_uuid()::text, '-', ''), 12);
    at_lsn := pg_create_restore_point(wal);
    INSERT INTO backup.restore_points (name, wal_name, lsn, timeline, note)
    VALUES (name, wal, at_lsn, (SELECT timeline_id FROM pg_control_checkpoint()), note);
    PERFORM backup._audit('create', 'restore_point', name, jsonb_build_object('lsn', at_lsn::text, 'wal_name', wal));
    -- Archive it promptly: a point is only a target once its WAL is in the repository.
    PERFORM pg_switch_wal();
    RETURN at_lsn;
END
$$;

