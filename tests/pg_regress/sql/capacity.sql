-- Storage capacity: what the scheduler stores of walshipper's report,
-- backup.repository_capacity over a known history (growth, projection),
-- and repository_almost_full for each threshold, raised once and resolved.
\set VERBOSITY default
\set SHOW_CONTEXT never
TRUNCATE backup.repository_status, backup.repository_usage, backup.repository_backups, backup.alerts RESTART IDENTITY CASCADE;

-- walshipper's report: the new fields stored; a figure beyond bigint, of
-- the wrong type or negative, or an unknown source, is NULL, not an error.
SELECT backup._sched_repo_status('{"repositories": [
  {"name": "repo1", "type": "posix", "location": "/r", "ok": true, "segments": 1, "backups": 1,
   "stored_bytes": 400000000000, "capacity_bytes": 1000000000000, "free_bytes": 500000000000,
   "capacity_source": "filesystem", "min_free_bytes": 50000000000, "encryption": "aes-256-gcm",
   "key_created_at": "2026-01-01T00:00:00+00:00", "first_backup_stop_time": "2026-02-01T00:00:00Z"},
  {"name": "offsite", "type": "s3", "location": "s3://b/p", "ok": true, "segments": 1, "backups": 0,
   "stored_bytes": 99999999999999999999, "capacity_bytes": "lots", "free_bytes": null,
   "capacity_source": "weird", "min_free_bytes": -1, "encryption": "none", "key_created_at": "soon"}]}');
SELECT name, stored_bytes, capacity_bytes, free_bytes, capacity_source, min_free_bytes, encryption,
       key_created_at AT TIME ZONE 'UTC' AS key_created, first_backup_stop AT TIME ZONE 'UTC' AS first_stop
  FROM backup.repository_status ORDER BY position;
-- One sample, of the repository whose size is known.
SELECT repository, stored_bytes, capacity_bytes, free_bytes FROM backup.repository_usage;

-- A repository that does not answer keeps what was last known of it, and
-- gets no sample.
SELECT backup._sched_repo_status('{"repositories": [
  {"name": "repo1", "type": "posix", "location": "/r", "ok": false, "error": "gone"},
  {"name": "offsite", "type": "s3", "location": "s3://b/p", "ok": true, "stored_bytes": 1000, "capacity_bytes": 1000000,
   "free_bytes": 999000, "capacity_source": "quota", "min_free_bytes": 50000, "encryption": "none"}]}');
SELECT name, ok, stored_bytes, free_bytes, encryption FROM backup.repository_status ORDER BY position;
-- (Its repository_unavailable alert is another test's subject.)
TRUNCATE backup.alerts RESTART IDENTITY;

-- Two weeks of samples growing 10 GB a day: 450 GB above the minimum free
-- space lasts 45 days.
DELETE FROM backup.repository_usage;
UPDATE backup.repository_status SET ok = true WHERE name = 'repo1';
INSERT INTO backup.repository_usage (repository, sampled_at, stored_bytes, capacity_bytes, free_bytes)
SELECT 'repo1', now() - make_interval(days => 14 - k), 260000000000 + k * 10000000000, 1000000000000,
       640000000000 - k * 10000000000
  FROM generate_series(0, 14) k;
SELECT repository, stored_bytes, used_ratio, min_free_bytes, growth_bytes_per_day,
       round(extract(epoch FROM projected_full_at - now()) / 86400, 3) AS full_in_days
  FROM backup.repository_capacity;

-- Below every threshold: no alert.
SELECT backup._capacity_refresh(85, 14);
SELECT count(*) AS alerts FROM backup.alerts;
-- Projected full within the warning's days: raised once, whatever the
-- number of refreshes.
SELECT backup._capacity_refresh(85, 60);
SELECT backup._capacity_refresh(85, 60);
SELECT kind, severity, subject, regexp_replace(message, '\d{4}-\d\d-\d\d \d\d:\d\d UTC', 'DATE') AS message,
       details->>'growth_bytes_per_day' AS growth, details->>'used_ratio' AS used
  FROM backup.alerts;
SELECT backup._capacity_refresh(85, 14);
SELECT subject, resolved_at IS NOT NULL AS resolved FROM backup.alerts;
-- At the percent used: raised again (a new alert), then resolved.
SELECT backup._capacity_refresh(50, 0);
SELECT subject, message FROM backup.alerts WHERE resolved_at IS NULL;
SELECT backup._capacity_refresh(51, 0);
SELECT count(*) AS open FROM backup.alerts WHERE resolved_at IS NULL;
-- Below the minimum free space: raised whatever the other thresholds
-- say, and the projection is now.
UPDATE backup.repository_status SET free_bytes = 40000000000 WHERE name = 'repo1';
SELECT backup._capacity_refresh(100, 0);
SELECT subject, message FROM backup.alerts WHERE resolved_at IS NULL;
SELECT round(extract(epoch FROM projected_full_at - now())) AS full_in_s FROM backup.repository_capacity WHERE repository = 'repo1';
-- A repository that does not answer keeps its alert; one no longer
-- configured has it resolved.
UPDATE backup.repository_status SET ok = false, free_bytes = 900000000000 WHERE name = 'repo1';
SELECT backup._capacity_refresh(100, 0);
SELECT count(*) AS open FROM backup.alerts WHERE resolved_at IS NULL;
DELETE FROM backup.repository_status WHERE name = 'repo1';
SELECT backup._capacity_refresh(100, 0);
SELECT count(*) AS open FROM backup.alerts WHERE resolved_at IS NULL;

-- Shrinking or flat: no projection. Unknown free space: none either.
DELETE FROM backup.repository_usage;
INSERT INTO backup.repository_usage (repository, sampled_at, stored_bytes)
SELECT 'offsite', now() - make_interval(hours => 10 - k), 2000 - k * 100 FROM generate_series(0, 10) k;
SELECT repository, used_ratio, growth_bytes_per_day, projected_full_at FROM backup.repository_capacity;
UPDATE backup.repository_status SET free_bytes = NULL, capacity_bytes = NULL WHERE name = 'offsite';
UPDATE backup.repository_usage SET stored_bytes = 1000 + extract(epoch FROM sampled_at - now() + interval '10 hours')::bigint;
SELECT repository, used_ratio, growth_bytes_per_day > 0 AS grows, projected_full_at FROM backup.repository_capacity;

-- Old samples go (pg_backup.storage_history, 400 days by default).
INSERT INTO backup.repository_usage (repository, sampled_at, stored_bytes) VALUES ('offsite', now() - interval '401 days', 1);
UPDATE backup.repository_status SET free_bytes = 1, capacity_bytes = 1000000 WHERE name = 'offsite';
SELECT backup._capacity_refresh(100, 0);
SELECT count(*) FILTER (WHERE sampled_at < now() - interval '400 days') AS old, count(*) AS kept FROM backup.repository_usage;

TRUNCATE backup.repository_status, backup.repository_usage, backup.repository_backups, backup.alerts, backup.audit_log RESTART IDENTITY CASCADE;
