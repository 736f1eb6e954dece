-- pg_backup catalog (schema backup). The control plane's record of what to
-- back up, when, and what happened. It never holds a secret: keys and
-- credentials live in walshipper's configuration.
--
-- Nobody but the extension's owner writes these tables: operators act
-- through the SECURITY DEFINER functions of the other files, monitors read
-- (sql/security.sql grants both). Every function has search_path pinned to
-- pg_catalog, pg_temp (sql/security.sql), so it names everything else with
-- its schema.

-- The schema must be ours alone: CREATE EXTENSION reuses an existing
-- schema "backup" as is, and objects another role put there (operators,
-- functions) would be bound into this script's views and run as the
-- installing superuser. Refuse anything but the empty schema the
-- installation itself created.
DO $$
DECLARE
    nsp oid := (SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) 'backup');
BEGIN
    IF (SELECT n.nspowner FROM pg_catalog.pg_namespace n WHERE n.oid OPERATOR(pg_catalog.=) nsp)
           OPERATOR(pg_catalog.<>) (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) current_user)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) g
                   WHERE n.oid OPERATOR(pg_catalog.=) nsp AND g.grantee OPERATOR(pg_catalog.<>) n.nspowner)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.pronamespace OPERATOR(pg_catalog.=) nsp)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.relnamespace OPERATOR(pg_catalog.=) nsp)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_operator o WHERE o.oprnamespace OPERATOR(pg_catalog.=) nsp)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_type t WHERE t.typnamespace OPERATOR(pg_catalog.=) nsp) THEN
        RAISE EXCEPTION 'schema "backup" already exists with an owner, grants or objects of its own'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'pg_backup_ext installs into a schema "backup" that only it populates: drop or rename the existing one first.';
    END IF;
END
$$;

-- Who is acting: inside a SECURITY DEFINER function current_user is the
-- extension's owner, so the caller is the role set with SET ROLE, else the
-- session's user. Recorded in every audit row and "by" column.
CREATE FUNCTION backup._caller() RETURNS name LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE WHEN current_setting('role') IN ('none', '') THEN session_user
                  ELSE current_setting('role')::name END $$;

CREATE TABLE backup.backup_jobs (
    job_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL UNIQUE
                    CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$'),
    -- A backup (full, diff, incr), or a check of the backups: an integrity
    -- read-back (verify) or a restore test (restore_test), recorded in
    -- backup.backup_verifications.
    kind            text NOT NULL DEFAULT 'full'
                    CHECK (kind IN ('full', 'diff', 'incr', 'verify', 'restore_test')),
    schedule        text NOT NULL CHECK (length(schedule) <= 200),
    timezone        text NOT NULL DEFAULT 'UTC',
    active          boolean NOT NULL DEFAULT true,
    -- The walshipper repository it backs up to (a [[repo]] name); NULL: the
    -- primary (the first configured). Retention is the repository's, not
    -- the job's: see backup.retention_policies.
    repository      text CHECK (repository ~ '^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$'),
    next_run_at     timestamptz,
    created_by      name NOT NULL DEFAULT backup._caller(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_by      name NOT NULL DEFAULT backup._caller(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE backup.backup_jobs IS 'Scheduled backups: what kind, when (cron in a time zone), into which repository.';

CREATE TABLE backup.backup_executions (
    execution_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id          bigint REFERENCES backup.backup_jobs (job_id) ON DELETE SET NULL,
    -- The job's name when the run was queued (set by a trigger): kept when
    -- the job is renamed or deleted, so metrics and reports label past runs
    -- as they were (NULL: a run asked for by hand).
    job_name        text,
    -- What was taken: walshipper takes a full backup when a diff or incr
    -- has no base (the requested kind is then in summary->>'requested_type').
    kind            text NOT NULL CHECK (kind IN ('full', 'diff', 'incr')),
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    requested_by    name NOT NULL DEFAULT backup._caller(),
    -- The repository it backs up to; NULL: the primary.
    repository      text CHECK (repository ~ '^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$'),
    queued_at       timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    attempt         integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    not_before      timestamptz NOT NULL DEFAULT now(),
    cancel_requested boolean NOT NULL DEFAULT false,
    start_lsn       pg_lsn,
    stop_lsn        pg_lsn,
    timeline        integer,
    -- walshipper's id (it lands in shell commands restore_plan prints).
    backup_id       text CHECK (backup_id ~ '^[0-9]{8}-[0-9]{6}[FDI]([1-9][0-9]{0,2})?$'),
    size_bytes      bigint CHECK (size_bytes >= 0),
    stored_bytes    bigint CHECK (stored_bytes >= 0),
    bytes_done      bigint CHECK (bytes_done >= 0),
    bytes_total     bigint CHECK (bytes_total >= 0),
    error           text,
    -- walshipper's advice for the failure (its JSON error event's hint).
    error_hint      text,
    summary         jsonb,
    worker_pid      integer,
    -- When walshipper expire removed this backup from its repository (the
    -- one it was taken into; copies elsewhere: backup.repository_backups).
    expired_at      timestamptz,
    CHECK (started_at IS NULL OR started_at >= queued_at),
    CHECK (finished_at IS NULL OR finished_at >= coalesce(started_at, queued_at)),
    CHECK ((status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    CHECK (status <> 'failed' OR error IS NOT NULL),
    CHECK (status <> 'succeeded' OR backup_id IS NOT NULL),
    CHECK (expired_at IS NULL OR status = 'succeeded')
);
COMMENT ON TABLE backup.backup_executions IS 'Every backup run, requested or scheduled, with its outcome.';
-- Never two runs of one job at once.
CREATE UNIQUE INDEX backup_executions_one_active_per_job
    ON backup.backup_executions (job_id) WHERE status IN ('queued', 'running');
CREATE INDEX backup_executions_job_time ON backup.backup_executions (job_id, queued_at DESC);
CREATE INDEX backup_executions_open ON backup.backup_executions (status)
    WHERE status IN ('queued', 'running');
CREATE INDEX backup_executions_backup_id ON backup.backup_executions (backup_id) WHERE backup_id IS NOT NULL;
-- The scheduler looks for new successes every second (expiry after a backup).
CREATE INDEX backup_executions_succeeded ON backup.backup_executions (finished_at) WHERE status = 'succeeded';

-- A run keeps the name its job had when it was queued (backup_executions.job_name).
CREATE FUNCTION backup._execution_job_name() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.job_id IS NOT NULL AND NEW.job_name IS NULL THEN
        NEW.job_name := (SELECT j.name FROM backup.backup_jobs j WHERE j.job_id = NEW.job_id);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER backup_executions_job_name BEFORE INSERT ON backup.backup_executions
    FOR EACH ROW EXECUTE FUNCTION backup._execution_job_name();

CREATE TABLE backup.restore_points (
    -- Names land in postgresql.auto.conf and in shell commands: only
    -- characters neither needs to escape.
    name            text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,47}$'),
    -- The name in the WAL (recovery_target_name): name-<12 random hex
    -- digits>, unique to this call (sql/restore_points.sql says why).
    wal_name        text NOT NULL UNIQUE CHECK (wal_name ~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,47}-[0-9a-f]{12}$'),
    lsn             pg_lsn NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    timeline        integer NOT NULL,
    created_by      name NOT NULL DEFAULT backup._caller(),
    note            text CHECK (length(note) <= 1000)
);
COMMENT ON TABLE backup.restore_points IS 'Named points to restore to (walshipper restore --target-name).';

CREATE TABLE backup.alerts (
    alert_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('backup_failed', 'job_overdue', 'archive_failing', 'rpo_exceeded', 'worker_error',
                                                 'repository_unavailable', 'repository_lagging', 'expire_failed',
                                                 'verification_failed', 'restore_test_failed', 'table_restore_failed',
                                                 'restore_test_overdue', 'rto_exceeded',
                                                 'notification_failed', 'repository_almost_full',
                                                 'key_rotation_failed', 'key_rotation_overdue',
                                                 'wal_receiver_down', 'wal_stream_lagging')),
    severity        text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    subject         text NOT NULL,
    message         text NOT NULL,
    details         jsonb NOT NULL DEFAULT '{}',
    raised_at       timestamptz NOT NULL DEFAULT now(),
    acknowledged_at timestamptz,
    acknowledged_by name,
    resolved_at     timestamptz,
    CHECK (resolved_at IS NULL OR resolved_at >= raised_at)
);
-- One open alert per kind and subject: a failing condition is one alert, not thousands.
CREATE UNIQUE INDEX alerts_one_open ON backup.alerts (kind, subject) WHERE resolved_at IS NULL;

CREATE TABLE backup.audit_log (
    audit_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    actor           name NOT NULL DEFAULT backup._caller(),
    action          text NOT NULL,
    object_type     text NOT NULL,
    object_name     text,
    details         jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON backup.audit_log (at DESC);

-- Append-only: rows are never changed or removed, except by a superuser
-- (who could drop the trigger anyway). Nothing in the extension does either.
CREATE FUNCTION backup._audit_log_append_only() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user), false) THEN
        RAISE EXCEPTION 'backup.audit_log is append-only (% refused)', TG_OP
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Audit rows are kept for good; only a superuser may remove them.';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON backup.audit_log
    FOR EACH ROW EXECUTE FUNCTION backup._audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON backup.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION backup._audit_log_append_only();

-- Retention belongs to a repository: the policy `walshipper expire --repo`
-- applies to it after every backup. A repository without a row keeps the
-- policy of walshipper's configuration. Changed only through
-- backup.retention_set() and backup.retention_reset(), which audit it.
CREATE TABLE backup.retention_policies (
    repository      text PRIMARY KEY CHECK (repository ~ '^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$'),
    keep_full       integer CHECK (keep_full >= 1),
    recovery_window interval CHECK (recovery_window > interval '0'),
    -- Grandfather-father-son: how many days, weeks, months and years keep
    -- their newest backup, counted in timezone.
    keep_daily      integer CHECK (keep_daily >= 0),
    keep_weekly     integer CHECK (keep_weekly >= 0),
    keep_monthly    integer CHECK (keep_monthly >= 0),
    keep_yearly     integer CHECK (keep_yearly >= 0),
    timezone        text NOT NULL DEFAULT 'UTC',
    updated_by      name NOT NULL DEFAULT backup._caller(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (coalesce(keep_full, 0) + coalesce(keep_daily, 0) + coalesce(keep_weekly, 0)
           + coalesce(keep_monthly, 0) + coalesce(keep_yearly, 0) > 0 OR recovery_window IS NOT NULL)
);
COMMENT ON TABLE backup.retention_policies IS 'Retention of each repository, applied by walshipper expire after every backup.';

-- What each configured repository holds, as `walshipper info --json` last
-- reported it (refreshed by the scheduler every pg_backup.repo_status_interval).
CREATE TABLE backup.repository_status (
    name            text PRIMARY KEY,
    type            text NOT NULL,
    location        text NOT NULL,
    ok              boolean NOT NULL,
    error           text,
    wal_segments    bigint,
    last_wal        text,
    backups         integer,
    last_backup     text,
    last_backup_stop timestamptz,
    position        integer NOT NULL,
    checked_at      timestamptz NOT NULL DEFAULT now(),
    -- Up to where its recovery records were taken in (a record id, or the
    -- time of the last complete listing as one): the next refresh asks for
    -- records after the oldest of these, less a margin
    -- (backup._sched_recoveries_after()).
    recoveries_seen text CHECK (recoveries_seen ~ '^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$'),
    -- Its size and room (info --json, docs/contract.md): bytes stored; the
    -- file system's size and space left (posix) or the configured quota
    -- and what is left of it (s3); NULL: unknown.
    stored_bytes    bigint CHECK (stored_bytes >= 0),
    capacity_bytes  bigint CHECK (capacity_bytes >= 0),
    free_bytes      bigint CHECK (free_bytes >= 0),
    capacity_source text CHECK (capacity_source IN ('filesystem', 'quota', 'none')),
    -- The minimum free space a backup must leave there (0: none).
    min_free_bytes  bigint CHECK (min_free_bytes >= 0),
    encryption      text,
    -- When the data key new objects are sealed with was created.
    key_created_at  timestamptz,
    -- When its oldest backup ended: the earliest moment it restores to.
    first_backup_stop timestamptz
);

-- Each repository's size and room over time, sampled by the scheduler when
-- it refreshes repository status (at most every pg_backup.storage_sample_interval)
-- and kept pg_backup.storage_history long: growth, the projection of when
-- it fills, the dashboard's and the compliance report's storage charts.
CREATE TABLE backup.repository_usage (
    repository      text NOT NULL,
    sampled_at      timestamptz NOT NULL DEFAULT now(),
    stored_bytes    bigint NOT NULL CHECK (stored_bytes >= 0),
    capacity_bytes  bigint CHECK (capacity_bytes >= 0),
    free_bytes      bigint CHECK (free_bytes >= 0),
    PRIMARY KEY (repository, sampled_at)
);

-- One row: locked by every check that keeps walshipper expire and backups
-- apart (sql/common.sql), and the scheduler's pid while an expire runs.
CREATE TABLE backup.repository_activity (
    id              integer PRIMARY KEY CHECK (id = 1),
    expire_pid      integer,
    expire_since    timestamptz
);
INSERT INTO backup.repository_activity (id) VALUES (1);

-- Which repository holds which backup, as walshipper last reported it
-- (info --json every pg_backup.repo_status_interval; expire reports remove
-- rows at once). A backup copied by repo-sync appears here for each copy.
CREATE TABLE backup.repository_backups (
    repository      text NOT NULL,
    backup_id       text NOT NULL,
    seen_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (repository, backup_id)
);

-- Every recovery: restore tests and table restores started from SQL, and
-- the restores walshipper recorded in a repository (recoveries/), taken in
-- when the scheduler refreshes repository status (source 'command_line').
CREATE TABLE backup.recovery_operations (
    operation_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('restore', 'restore_test', 'table_restore')),
    source          text NOT NULL CHECK (source IN ('sql', 'command_line')),
    -- walshipper's id of its record in the repository (YYYYmmddTHHMMSSZ-<8 hex>).
    record_id       text UNIQUE CHECK (record_id ~ '^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$'),
    -- NULL: the primary.
    repository      text CHECK (repository ~ '^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$'),
    backup_id       text CHECK (backup_id ~ '^[0-9]{8}-[0-9]{6}[FDI]([1-9][0-9]{0,2})?$'),
    -- end (of the archived WAL), immediate, time, lsn, xid or name; value:
    -- the time (UTC), LSN, xid or restore point name in the WAL.
    target_kind     text NOT NULL DEFAULT 'end'
                    CHECK (target_kind IN ('end', 'immediate', 'time', 'lsn', 'xid', 'name')),
    target_value    text CHECK (length(target_value) <= 256),
    target_dir      text CHECK (length(target_dir) <= 4096),
    -- The databases a restore brought back (--db-include); empty: all.
    databases       text[],
    -- A table restore: the database, the new schema, the tables asked for
    -- (schema.table) and the role the loaded objects belong to.
    database        text,
    schema_name     text,
    tables          jsonb,
    load_role       name,
    -- A role, or os_user@host for a command-line restore.
    requested_by    text NOT NULL DEFAULT backup._caller(),
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'interrupted')),
    -- Where a running operation is (walshipper's phase events).
    phase           text,
    bytes_done      bigint CHECK (bytes_done >= 0),
    bytes_total     bigint CHECK (bytes_total >= 0),
    queued_at       timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    duration_s      double precision CHECK (duration_s >= 0),
    error           text,
    error_hint      text,
    -- walshipper's result event (restore_test, table_restore) or record.
    report          jsonb,
    -- The worker running it: pid and backend start (a pid alone may be
    -- reused by another process once the worker died).
    worker_pid      integer,
    worker_started  timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    CHECK ((status IN ('succeeded', 'failed', 'cancelled', 'interrupted')) = (finished_at IS NOT NULL)),
    CHECK (status NOT IN ('failed', 'interrupted') OR error IS NOT NULL),
    CHECK (kind <> 'table_restore' OR source <> 'sql' OR (database IS NOT NULL AND schema_name IS NOT NULL AND load_role IS NOT NULL))
);
COMMENT ON TABLE backup.recovery_operations IS 'Every recovery: restore tests, table restores and command-line restores, with target, timings, result and who asked.';
CREATE INDEX recovery_operations_open ON backup.recovery_operations (status) WHERE status IN ('queued', 'running');

-- Proof that backups are sound: integrity read-backs (walshipper verify)
-- and restore tests (walshipper restore-test, which measures the RTO).
CREATE TABLE backup.backup_verifications (
    verification_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The backup checked; NULL when asked for none (the newest for a
    -- restore test, set from its result; every backup for a read-back,
    -- listed in report->'backups').
    backup_id       text CHECK (backup_id ~ '^[0-9]{8}-[0-9]{6}[FDI]([1-9][0-9]{0,2})?$'),
    -- NULL: the primary.
    repository      text CHECK (repository ~ '^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$'),
    kind            text NOT NULL CHECK (kind IN ('integrity', 'restore_test')),
    job_id          bigint REFERENCES backup.backup_jobs (job_id) ON DELETE SET NULL,
    requested_by    name NOT NULL DEFAULT backup._caller(),
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'passed', 'failed', 'cancelled', 'interrupted')),
    queued_at       timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    target_kind     text NOT NULL DEFAULT 'end'
                    CHECK (target_kind IN ('end', 'immediate', 'time', 'lsn', 'xid', 'name')),
    target_value    text CHECK (length(target_value) <= 256),
    -- A restore test's measured phases, in seconds; rto_s is their sum.
    restore_s       double precision,
    replay_s        double precision,
    checks_s        double precision,
    rto_s           double precision,
    recovered_lsn   pg_lsn,
    recovered_time  timestamptz,
    -- Each check: name, passed, detail, duration_s.
    checks          jsonb,
    error           text,
    error_hint      text,
    operation_id    bigint REFERENCES backup.recovery_operations (operation_id),
    -- walshipper's result event (verify, restore_test).
    report          jsonb,
    -- As recovery_operations.worker_pid, worker_started.
    worker_pid      integer,
    worker_started  timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    CHECK (started_at IS NULL OR started_at >= queued_at),
    CHECK ((status IN ('passed', 'failed', 'cancelled', 'interrupted')) = (finished_at IS NOT NULL)),
    CHECK (status NOT IN ('failed', 'interrupted') OR error IS NOT NULL)
);
COMMENT ON TABLE backup.backup_verifications IS 'Integrity read-backs and restore tests of backups, with their measured phases, RTO and checks.';
CREATE INDEX backup_verifications_open ON backup.backup_verifications (status) WHERE status IN ('queued', 'running');
CREATE INDEX backup_verifications_passed ON backup.backup_verifications (kind, finished_at) WHERE status = 'passed';
-- Never two checks of one job queued or running at once.
CREATE UNIQUE INDEX backup_verifications_one_active_per_job
    ON backup.backup_verifications (job_id) WHERE status IN ('queued', 'running');

-- The DBA's own checks of a restore test: a query run in the restored
-- cluster, and the result it must give (its first column of the first
-- row, as text). job_id NULL: every restore test.
CREATE TABLE backup.restore_checks (
    check_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$'),
    database        text NOT NULL CHECK (length(database) BETWEEN 1 AND 63),
    query           text NOT NULL CHECK (length(query) BETWEEN 1 AND 10000),
    expected        text NOT NULL CHECK (length(expected) <= 10000),
    job_id          bigint REFERENCES backup.backup_jobs (job_id) ON DELETE CASCADE,
    created_by      name NOT NULL DEFAULT backup._caller(),
    created_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE backup.restore_checks IS 'Queries every restore test (or one job''s) runs in the restored cluster, with their expected results.';

-- The RPO each repository had, sampled about once a minute by the
-- scheduler and kept pg_backup.rpo_history long: backup.recovery_objectives'
-- worst RPO.
CREATE TABLE backup.rpo_samples (
    repository      text NOT NULL,
    sampled_at      timestamptz NOT NULL DEFAULT now(),
    rpo             interval,
    -- Its WAL was the primary's (or it is the primary).
    in_sync         boolean NOT NULL,
    PRIMARY KEY (repository, sampled_at)
);

REVOKE ALL ON ALL TABLES IN SCHEMA backup FROM PUBLIC;

-- The WAL receiver the scheduler supervises (pg_backup.wal_streaming;
-- src/stream.rs): one row, written only when its state changes, so that an
-- idle server writes no WAL for it. Lag and the slot are read live from
-- pg_replication_slots by backup.wal_archive_status.
CREATE TABLE backup.wal_receiver (
    id              integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    state           text NOT NULL CHECK (state IN ('off', 'running', 'restarting')),
    since           timestamptz NOT NULL DEFAULT now(),
    -- Since when streaming has not been steady: set at an exit, cleared
    -- only after a run that streamed for a minute, so that a crash loop of
    -- short runs still counts as down (alerts, the RPO estimate).
    down_since      timestamptz,
    pid             integer,
    started_at      timestamptz,
    restarts        bigint NOT NULL DEFAULT 0,
    last_exit_at    timestamptz,
    last_error      text,
    next_start_at   timestamptz
);
INSERT INTO backup.wal_receiver (state) VALUES ('off');
COMMENT ON TABLE backup.wal_receiver IS 'The streaming WAL receiver (walshipper wal-receive) the scheduler runs when pg_backup.wal_streaming is on.';
