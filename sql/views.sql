-- Status views: what monitors read (granted by backup.grant_monitor()).
-- Views call no internal function: a monitor may execute none.

-- With pg_backup.wal_streaming on, the RPO is the receiver's: nothing at
-- risk when its slot has everything the server wrote, else the walsender's
-- flush_lag (visible to roles with pg_read_all_stats, e.g. pg_monitor;
-- others get the archiver's estimate), and while the receiver is down the
-- lesser of the archiver's estimate and the time since it last streamed
-- steadily (down_since: a crash loop of short runs does not reset it).
-- On a standby the server writes no WAL of its own (pg_current_wal_lsn and
-- pg_walfile_name would fail) and runs no receiver (backup.wal_receiver
-- is the primary's row, replicated; pg_backup.wal_streaming may be on
-- from a copied postgresql.auto.conf): the columns about WAL written here
-- and about the receiver are NULL.
CREATE VIEW backup.wal_archive_status AS
WITH cfg AS (
    SELECT coalesce(nullif(current_setting('pg_backup.wal_streaming', true), ''), 'off')::boolean AS streaming,
           coalesce(nullif(current_setting('pg_backup.stream_slot', true), ''), 'walshipper') AS slot_name,
           CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn() END AS wal_lsn,
           pg_is_in_recovery() AS standby
), arch AS (
    SELECT a.*,
           -- Data at risk: everything since the last archived segment, if WAL was written since.
           CASE WHEN a.last_archived_wal IS NULL OR c.wal_lsn IS NULL THEN NULL
                WHEN pg_walfile_name(c.wal_lsn) > a.last_archived_wal
                     AND c.wal_lsn > ('0/0'::pg_lsn + 0) THEN now() - a.last_archived_time
                ELSE interval '0' END AS archiver_rpo
      FROM pg_stat_archiver a CROSS JOIN cfg c
)
SELECT a.archived_count, a.last_archived_wal, a.last_archived_time,
       now() - a.last_archived_time AS last_archived_age,
       a.failed_count, a.last_failed_wal, a.last_failed_time,
       CASE WHEN c.wal_lsn IS NOT NULL THEN pg_walfile_name(c.wal_lsn) END AS current_wal,
       CASE WHEN NOT c.streaming OR c.standby THEN a.archiver_rpo
            WHEN r.state = 'running' AND sl.active THEN
                CASE WHEN c.wal_lsn <= sl.restart_lsn THEN interval '0'
                     ELSE coalesce(rep.flush_lag, a.archiver_rpo) END
            ELSE least(a.archiver_rpo, now() - coalesce(r.down_since, r.since)) END AS rpo_estimate,
       coalesce(nullif(current_setting('pg_backup.rpo_target', true), ''), '900s')::interval AS rpo_target,
       c.streaming,
       CASE WHEN c.standby THEN NULL WHEN c.streaming OR r.state <> 'off' THEN r.state ELSE 'off' END AS receiver_state,
       CASE WHEN NOT c.standby THEN r.pid END AS receiver_pid,
       CASE WHEN NOT c.standby THEN r.since END AS receiver_since,
       CASE WHEN NOT c.standby THEN r.down_since END AS receiver_down_since,
       CASE WHEN NOT c.standby THEN r.restarts END AS receiver_restarts,
       CASE WHEN NOT c.standby THEN r.last_error END AS receiver_last_error,
       c.slot_name,
       sl.active AS slot_active,
       -- A physical slot's restart_lsn is where the receiver last reported
       -- its flush: what is durably in the repository.
       sl.restart_lsn AS stream_flushed_lsn,
       c.wal_lsn - sl.restart_lsn AS slot_retained_bytes,
       rep.flush_lag AS stream_flush_lag,
       rep.sync_state AS stream_sync_state
  FROM arch a
  CROSS JOIN cfg c
  LEFT JOIN backup.wal_receiver r ON r.id = 1
  LEFT JOIN pg_replication_slots sl ON sl.slot_name = c.slot_name
  LEFT JOIN pg_stat_replication rep ON rep.pid = sl.active_pid;

-- Backup jobs' runs, and verify and restore_test jobs' (a passed check
-- counts as succeeded).
CREATE VIEW backup.job_status AS
WITH runs AS (
    SELECT e.job_id, e.status, e.finished_at, e.backup_id, e.kind FROM backup.backup_executions e
    UNION ALL
    SELECT v.job_id, CASE v.status WHEN 'passed' THEN 'succeeded' WHEN 'interrupted' THEN 'failed' ELSE v.status END,
           v.finished_at, v.backup_id, v.kind
      FROM backup.backup_verifications v WHERE v.job_id IS NOT NULL
)
SELECT j.name, j.kind, j.schedule, j.timezone, j.active,
       s.last_success, f.last_failure,
       coalesce(c.consecutive_failures, 0) AS consecutive_failures,
       j.next_run_at AS next_run,
       CASE WHEN NOT j.active THEN 'disabled'
            WHEN r.running THEN 'running'
            WHEN coalesce(c.consecutive_failures, 0) > 0 THEN 'failing'
            WHEN s.last_success IS NULL THEN 'never succeeded'
            ELSE 'ok' END AS health,
       s.last_backup_id, s.last_backup_type,
       coalesce(k.backups_kept, 0) AS backups_kept
  FROM backup.backup_jobs j
  LEFT JOIN LATERAL (SELECT e.finished_at AS last_success, e.backup_id AS last_backup_id, e.kind AS last_backup_type
                       FROM runs e
                      WHERE e.job_id = j.job_id AND e.status = 'succeeded'
                      ORDER BY e.finished_at DESC LIMIT 1) s ON true
  -- Backups of this job still in the repository (expiry has not removed them).
  LEFT JOIN LATERAL (SELECT count(*) AS backups_kept FROM backup.backup_executions e
                      WHERE e.job_id = j.job_id AND e.status = 'succeeded' AND e.expired_at IS NULL) k ON true
  LEFT JOIN LATERAL (SELECT max(finished_at) AS last_failure FROM runs e
                      WHERE e.job_id = j.job_id AND e.status = 'failed') f ON true
  LEFT JOIN LATERAL (SELECT count(*) AS consecutive_failures FROM runs e
                      WHERE e.job_id = j.job_id AND e.status = 'failed'
                        AND e.finished_at > coalesce(s.last_success, '-infinity')) c ON true
  LEFT JOIN LATERAL (SELECT bool_or(e.status IN ('queued', 'running')) AS running FROM runs e
                      WHERE e.job_id = j.job_id) r ON true;

CREATE VIEW backup.running_backups AS
SELECT e.execution_id, j.name AS job, e.kind, e.status, e.started_at, now() - e.started_at AS elapsed,
       e.bytes_done, e.bytes_total,
       round(100.0 * e.bytes_done / nullif(e.bytes_total, 0), 1) AS percent
  FROM backup.backup_executions e LEFT JOIN backup.backup_jobs j USING (job_id)
 WHERE e.status IN ('queued', 'running');

-- The backups the catalog knows to be in the repository they were taken
-- into, oldest first (expired ones left out: see
-- backup_executions.expired_at), with every repository known to hold a copy.
CREATE VIEW backup.backups AS
SELECT e.backup_id,
       e.kind AS type,
       coalesce(e.summary->>'requested_type', e.kind) AS requested_type,
       e.summary->>'based_on' AS based_on,
       -- As backup._backup_chain(), which monitors may not execute.
       CASE WHEN jsonb_typeof(e.summary->'chain') = 'array' AND jsonb_array_length(e.summary->'chain') > 0
            THEN ARRAY(SELECT jsonb_array_elements_text(e.summary->'chain'))
            ELSE ARRAY[e.backup_id] END AS chain,
       j.name AS job,
       e.repository,
       ARRAY(SELECT rb.repository FROM backup.repository_backups rb
              LEFT JOIN backup.repository_status rs ON rs.name = rb.repository
             WHERE rb.backup_id = e.backup_id ORDER BY rs.position, rb.repository) AS held_by,
       (e.summary->>'start_time')::timestamptz AS start_time,
       (e.summary->>'stop_time')::timestamptz AS stop_time,
       e.start_lsn, e.stop_lsn, e.timeline,
       e.size_bytes, e.stored_bytes,
       e.execution_id
  FROM backup.backup_executions e
  LEFT JOIN backup.backup_jobs j USING (job_id)
 WHERE e.status = 'succeeded' AND e.expired_at IS NULL
 ORDER BY (e.summary->>'stop_time')::timestamptz, e.execution_id;

-- One row per configured repository: where it is, whether it answers, how
-- far its WAL and backups reach, and how far it trails the primary.
CREATE VIEW backup.repositories AS
SELECT s.name,
       s.position = 1 AS is_primary,
       s.type,
       s.location,
       CASE WHEN NOT s.ok THEN 'unavailable'
            WHEN s.last_wal IS DISTINCT FROM p.last_wal THEN 'lagging'
            ELSE 'ok' END AS status,
       s.last_wal AS last_archived_wal,
       s.wal_segments,
       s.last_backup,
       s.last_backup_stop,
       s.backups,
       s.error,
       s.checked_at
  FROM backup.repository_status s
  LEFT JOIN backup.repository_status p ON p.position = 1
 ORDER BY s.position;


-- The recovery objectives, one row per repository: the RPO (target, now,
-- worst over pg_backup.rpo_history), the RTO (target, and the last one a
-- restore test measured), the last passed restore test, and the backups
-- held there that no verification or restore test has passed yet.
-- The RPO now is the archiver's (as backup.wal_archive_status) for a
-- repository whose WAL is the primary's; for one that lags, the time since
-- it was last seen in step, at least the archiver's.
CREATE VIEW backup.recovery_objectives AS
WITH a AS (SELECT w.rpo_estimate, w.rpo_target FROM backup.wal_archive_status w),
     p AS (SELECT s.name, s.last_wal FROM backup.repository_status s WHERE s.position = 1)
SELECT s.name AS repository,
       s.position = 1 AS is_primary,
       a.rpo_target,
       CASE WHEN s.position = 1 OR s.last_wal IS NOT DISTINCT FROM p.last_wal THEN a.rpo_estimate
            ELSE greatest(a.rpo_estimate,
                          now() - (SELECT max(x.sampled_at) FROM backup.rpo_samples x WHERE x.repository = s.name AND x.in_sync))
       END AS rpo_now,
       greatest(CASE WHEN s.position = 1 OR s.last_wal IS NOT DISTINCT FROM p.last_wal THEN a.rpo_estimate END,
                (SELECT max(x.rpo) FROM backup.rpo_samples x
                  WHERE x.repository = s.name
                    AND x.sampled_at > now() - coalesce(nullif(current_setting('pg_backup.rpo_history', true), ''), '7d')::interval))
           AS rpo_worst,
       coalesce(nullif(current_setting('pg_backup.rpo_history', true), ''), '7d')::interval AS rpo_history,
       coalesce(nullif(current_setting('pg_backup.rto_target', true), ''), '1h')::interval AS rto_target,
       make_interval(secs => t.rto_s) AS last_rto,
       t.finished_at AS last_restore_test_passed_at,
       t.verification_id AS last_restore_test,
       cardinality(n.ids) AS backups_never_verified,
       n.ids AS never_verified_ids,
       (s.position = 1 OR s.last_wal IS NOT DISTINCT FROM p.last_wal) AS wal_in_sync
  FROM backup.repository_status s
  CROSS JOIN a
  LEFT JOIN p ON true
  LEFT JOIN LATERAL (SELECT v.rto_s, v.finished_at, v.verification_id FROM backup.backup_verifications v
                      WHERE v.kind = 'restore_test' AND v.status = 'passed'
                        AND coalesce(v.repository, p.name) = s.name
                      ORDER BY v.finished_at DESC LIMIT 1) t ON true
  LEFT JOIN LATERAL (SELECT coalesce(array_agg(b.backup_id ORDER BY b.backup_id), '{}') AS ids
                       FROM backup.repository_backups b
                      WHERE b.repository = s.name
                        AND NOT EXISTS (SELECT 1 FROM backup.backup_verifications v
                                         WHERE v.status = 'passed' AND coalesce(v.repository, p.name) = s.name
                                           AND (v.backup_id = b.backup_id
                                                OR (v.kind = 'integrity' AND v.backup_id IS NULL
                                                    AND jsonb_typeof(v.report->'backups') = 'array'
                                                    AND v.report->'backups' ? b.backup_id)))) n ON true
 ORDER BY s.position;
