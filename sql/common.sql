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

-- A word for a POSIX shell: as it is when it holds only characters no
-- shell treats specially (so commands stay readable), else '...' with each
-- ' written '\''. Nothing inside single quotes is special to a shell, so
-- any text comes out as one word.
CREATE FUNCTION backup._shell_quote(s text)
RETURNS text LANGUAGE sql IMMUTABLE STRICT
AS $$
    SELECT CASE WHEN s ~ '^[A-Za-z0-9_./:@%+,-]+$' THEN s
                ELSE '''' || replace(s, '''', '''\''''') || '''' END
$$;

-- Expire and backups must not run on a repository at once (walshipper
-- would refuse one with exit 7). They are kept apart through the catalog,
-- never through advisory locks, which any role that can connect may take
-- (and so stop every backup): each check locks the single row of
-- backup.repository_activity, which only the owner may lock.

-- The scheduler, before starting walshipper expire: true (and recorded)
-- when no backup, verification or recovery runs.
CREATE FUNCTION backup._sched_expire_begin()
RETURNS boolean LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM 1 FROM backup.repository_activity a WHERE a.id = 1 FOR UPDATE;
    IF EXISTS (SELECT 1 FROM backup.backup_executions e
                WHERE e.status = 'running'
                  AND EXISTS (SELECT 1 FROM pg_stat_activity s WHERE s.pid = e.worker_pid)) THEN
        RETURN false;
    END IF;
    -- Nor while a verification or recovery reads a backup it could remove.
    IF backup._recovery_running() THEN
        RETURN false;
    END IF;
    UPDATE backup.repository_activity a SET expire_pid = pg_backend_pid(), expire_since = now() WHERE a.id = 1;
    RETURN true;
END
$$;

CREATE FUNCTION backup._sched_expire_end()
RETURNS void LANGUAGE sql
AS $$ UPDATE backup.repository_activity SET expire_pid = NULL, expire_since = NULL WHERE id = 1 $$;

-- A backup_run(wait => true) worker, its run already recorded as running:
-- may its backup start (no expire running)?
CREATE FUNCTION backup._run_may_start()
RETURNS boolean LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM 1 FROM backup.repository_activity a WHERE a.id = 1 FOR UPDATE;
    RETURN NOT EXISTS (SELECT 1 FROM backup.repository_activity a
                        WHERE a.expire_pid IS NOT NULL
                          AND EXISTS (SELECT 1 FROM pg_stat_activity s WHERE s.pid = a.expire_pid));
END
$$;

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
    IF p_repository IS NULL OR p_repository !~ '^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid repository name %', coalesce(to_json(p_repository)::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use the name of a [[repo]] in walshipper''s configuration (letters, digits, "-" and "_", not starting with "-"); see backup.repositories.';
    END IF;
    IF known IS NOT NULL AND NOT p_repository = ANY (known) THEN
        RAISE EXCEPTION 'walshipper has no repository "%"', p_repository
            USING ERRCODE = 'undefined_object',
                  HINT = format('The configured repositories are %s (backup.repositories).', array_to_string(known, ', '));
    END IF;
END
$$;

-- walshipper's report is untrusted where it repeats repository content: a
-- time that does not parse is NULL, never an error that would stop the
-- scheduler recording every other repository.
CREATE FUNCTION backup._timestamptz_or_null(t text)
RETURNS timestamptz LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN t::timestamptz;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END
$$;
