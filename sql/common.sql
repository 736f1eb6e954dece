-- Shared helpers of the SQL files: auditing, quoting for a shell, the
-- advisory lock keys. Internal: executable by the extension's owner only.

-- One audit row; the actor is the caller (backup._caller()) unless given
-- (the scheduler acts as 'scheduler').
CREATE FUNCTION backup._audit(p_action text, p_type text, p_name text, p_details jsonb DEFAULT '{}',
                              p_actor name DEFAULT NULL)
RETURNS void LANGUAGE sql
AS $$
    INSERT INTO backup.audit_log (actor, action, object_type, object_name, details)
    VALUES (coalesce(p_actor, backup._caller()), p_action, p_type, p_name, coalesce(p_details, '{}'))
$$;

-- A word for a POSIX shell: '...' with each ' written '\''. Nothing inside
-- single quotes is special to a shell, so any text comes out as one word.
CREATE FUNCTION backup._shell_quote(s text)
RETURNS text LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT '''' || replace(s, '''', '''\''''') || '''' $$;

-- Advisory lock keys: (0x70676200, job_id) serialises the runs of one job
-- between the worker and a session running backup_run(wait => true).
CREATE FUNCTION backup._job_lock_key() RETURNS integer LANGUAGE sql IMMUTABLE AS $$ SELECT 1885823488 $$;
-- (0x70676201, 0), session-level: the scheduler holds it exclusively while
-- walshipper expire runs, a backup_run(wait => true) worker shared while its
-- backup runs (walshipper would refuse one of them with exit 7).
CREATE FUNCTION backup._repo_lock_key() RETURNS integer LANGUAGE sql IMMUTABLE AS $$ SELECT 1885823489 $$;

-- The repository names walshipper reported (backup.repositories), or NULL
-- before the scheduler's first `walshipper info`.
CREATE FUNCTION backup._known_repositories()
RETURNS text[] LANGUAGE sql STABLE
AS $$ SELECT nullif(array_agg(s.name ORDER BY s.position), '{}') FROM backup.repository_status s $$;

-- A repository name as jobs and policies store it: walshipper's [[repo]]
-- name, and one walshipper reported if it reported any.
CREATE FUNCTION backup._check_repository(p_repository text)
RETURNS void LANGUAGE plpgsql STABLE
AS $$
DECLARE
    known text[] := backup._known_repositories();
BEGIN
    IF p_repository IS NULL OR p_repository !~ '^[A-Za-z0-9_-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid repository name %', coalesce(to_json(p_repository)::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use the name of a [[repo]] in walshipper''s configuration (letters, digits, "-" and "_"); see backup.repositories.';
    END IF;
    IF known IS NOT NULL AND NOT p_repository = ANY (known) THEN
        RAISE EXCEPTION 'walshipper has no repository "%"', p_repository
            USING ERRCODE = 'undefined_object',
                  HINT = format('The configured repositories are %s (backup.repositories).', array_to_string(known, ', '));
    END IF;
END
$$;
