-- pg_backup catalog (schema backup). The control plane's record of what to
-- back up, when, and what happened. It never holds a secret: keys and
-- credentials live in walshipper's configuration.

CREATE TABLE backup.backup_jobs (
    job_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL UNIQUE
                    CHECK (name ~ '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$'),
    kind            text NOT NULL DEFAULT 'full' CHECK (kind IN ('full', 'diff', 'incr')),
    schedule        text NOT NULL,
    timezone        text NOT NULL DEFAULT 'UTC',
    active          boolean NOT NULL DEFAULT true,
    retention_full_count integer CHECK (retention_full_count > 0),
    retention_window interval CHECK (retention_window > interval '0'),
    -- Grandfather-father-son: how many days, weeks, months and years keep
    -- their newest backup, counted in the job's time zone. NULL = not set;
    -- with every retention column NULL, walshipper's configured policy applies.
    retention_keep_daily   integer CHECK (retention_keep_daily >= 0),
    retention_keep_weekly  integer CHECK (retention_keep_weekly >= 0),
    retention_keep_monthly integer CHECK (retention_keep_monthly >= 0),
    retention_keep_yearly  integer CHECK (retention_keep_yearly >= 0),
    options         jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
    next_run_at     timestamptz,
    created_by      name NOT NULL DEFAULT current_user,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_by      name NOT NULL DEFAULT current_user,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE backup.backup_jobs IS 'Scheduled backups: what kind, when (cron in a time zone), how long to keep.';

CREATE TABLE backup.backup_executions (
    execution_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id          bigint REFERENCES backup.backup_jobs (job_id) ON DELETE SET NULL,
    -- What was taken: walshipper takes a full backup when a diff or incr
    -- has no base (the requested kind is then in summary->>'requested_type').
    kind            text NOT NULL CHECK (kind IN ('full', 'diff', 'incr')),
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    requested_by    name NOT NULL DEFAULT current_user,
    queued_at       timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    attempt         integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    not_before      timestamptz NOT NULL DEFAULT now(),
    cancel_requested boolean NOT NULL DEFAULT false,
    start_lsn       pg_lsn,
    stop_lsn        pg_lsn,
    timeline        integer,
    backup_id       text,
    size_bytes      bigint CHECK (size_bytes >= 0),
    stored_bytes    bigint CHECK (stored_bytes >= 0),
    bytes_done      bigint CHECK (bytes_done >= 0),
    bytes_total     bigint CHECK (bytes_total >= 0),
    error           text,
    summary         jsonb,
    worker_pid      integer,
    -- When walshipper expire removed this backup from the repository.
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

CREATE TABLE backup.restore_points (
    name            text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 63),
    lsn             pg_lsn NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    timeline        integer NOT NULL,
    created_by      name NOT NULL DEFAULT current_user,
    note            text
);
COMMENT ON TABLE backup.restore_points IS 'Named points to restore to (walshipper restore --target-name).';

CREATE TABLE backup.alerts (
    alert_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN ('backup_failed', 'job_overdue', 'archive_failing', 'rpo_exceeded', 'worker_error',
                                                 'repository_unavailable', 'repository_lagging', 'expire_failed')),
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
    actor           name NOT NULL DEFAULT current_user,
    action          text NOT NULL,
    object_type     text NOT NULL,
    object_name     text,
    details         jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON backup.audit_log (at DESC);

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
    checked_at      timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON ALL TABLES IN SCHEMA backup FROM PUBLIC;
