-- Restore points: named moments to restore to, recorded with their LSN.

CREATE FUNCTION backup.restore_point_create(name text, note text DEFAULT NULL)
RETURNS pg_lsn LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    at_lsn pg_lsn;
BEGIN
    -- The name goes into postgresql.auto.conf (recovery_target_name) and
    -- into the shell command restore_plan prints: only characters neither
    -- treats specially (no quote, backslash, space, newline or $).
    IF name IS NULL OR name !~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid restore point name %', coalesce(to_json(name)::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 63 letters, digits, "_", ".", ":" or "-", starting with a letter, digit or "_" (e.g. before_release_2.4).';
    END IF;
    IF EXISTS (SELECT 1 FROM backup.restore_points r WHERE r.name = restore_point_create.name) THEN
        RAISE EXCEPTION 'restore point "%" already exists', name
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Recovery stops at the first point of a name: give each point its own name.';
    END IF;
    IF pg_is_in_recovery() THEN
        RAISE EXCEPTION 'restore points can only be created on a primary'
            USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    at_lsn := pg_create_restore_point(name);
    INSERT INTO backup.restore_points (name, lsn, timeline, note)
    VALUES (name, at_lsn, (SELECT timeline_id FROM pg_control_checkpoint()), note);
    PERFORM backup._audit('create', 'restore_point', name, jsonb_build_object('lsn', at_lsn::text));
    -- Archive it promptly: a point is only a target once its WAL is in the repository.
    PERFORM pg_switch_wal();
    RETURN at_lsn;
END
$$;

