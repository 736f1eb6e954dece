-- The compliance report over a seeded week with known answers: a nightly
-- job on schedule 6 slots of 7 (one failed night, one night saved by a
-- retry), an hourly job on schedule throughout, success rates, RPO and RTO
-- met on one repository and not on the other, verifications, retention,
-- encryption and key age, storage growth, alerts; an empty period; bad
-- periods; a monitor may run it.
\set VERBOSITY default
\set SHOW_CONTEXT never
TRUNCATE backup.backup_verifications, backup.recovery_operations, backup.backup_executions, backup.backup_jobs,
         backup.alerts, backup.audit_log, backup.repository_status, backup.repository_backups, backup.rpo_samples,
         backup.repository_usage, backup.retention_policies RESTART IDENTITY CASCADE;

INSERT INTO backup.repository_status (name, type, location, ok, position, backups, stored_bytes, capacity_bytes, free_bytes,
                                      capacity_source, min_free_bytes, encryption, key_created_at, first_backup_stop)
VALUES ('repo1', 'posix', '/r', true, 1, 8, 600000, 1000000, 500000, 'filesystem', 50000, 'aes-256-gcm',
        now() - interval '400 days', '2024-02-20 02:10+00'),
       ('offsite', 's3', 's3://b/p', true, 2, 0, 1000, NULL, NULL, 'none', 0, 'none', NULL, NULL);
INSERT INTO backup.retention_policies (repository, keep_full, recovery_window) VALUES ('repo1', 2, '7 days');

INSERT INTO backup.backup_jobs (name, kind, schedule, created_at) VALUES
    ('nightly', 'full', '0 2 * * *', '2024-01-01 00:00+00'),
    ('hourly_incr', 'incr', '0 * * * *', '2024-03-07 19:30+00');
INSERT INTO backup.backup_jobs (name, kind, schedule, active, created_at) VALUES ('retired', 'full', '0 3 * * *', false, '2024-01-01');
-- nightly: March 1 to 7 at 02:00; the 3rd fails and its retry succeeds,
-- the 7th fails.
INSERT INTO backup.backup_executions (job_id, kind, status, queued_at, started_at, finished_at, backup_id, stored_bytes, error)
SELECT 1, 'full', 'succeeded', t, t, t + interval '10 minutes', to_char(t AT TIME ZONE 'UTC', 'YYYYMMDD-HH24MISS') || 'F', 1000, NULL
  FROM generate_series(timestamptz '2024-03-01 02:00+00', '2024-03-06 02:00+00', interval '1 day') t
 WHERE t <> '2024-03-03 02:00+00'
UNION ALL
SELECT 1, 'full', 'failed', '2024-03-03 02:00+00', '2024-03-03 02:00+00', '2024-03-03 02:01+00', NULL, NULL, 'disk full'
UNION ALL
SELECT 1, 'full', 'succeeded', '2024-03-03 02:06+00', '2024-03-03 02:06+00', '2024-03-03 02:16+00', '20240303-020600F', 1000, NULL
UNION ALL
SELECT 1, 'full', 'failed', '2024-03-07 02:00+00', '2024-03-07 02:00+00', '2024-03-07 02:05+00', NULL, NULL, 'disk full';
-- hourly_incr: 20:00 to 23:00 on the 7th, every one on time.
INSERT INTO backup.backup_executions (job_id, kind, status, queued_at, started_at, finished_at, backup_id, stored_bytes)
SELECT 2, 'incr', 'succeeded', t, t, t + interval '2 minutes', to_char(t AT TIME ZONE 'UTC', 'YYYYMMDD-HH24MISS') || 'I', 10
  FROM generate_series(timestamptz '2024-03-07 20:00+00', '2024-03-07 23:00+00', interval '1 hour') t;
-- A manual run, and one outside the period.
INSERT INTO backup.backup_executions (kind, status, queued_at, started_at, finished_at, backup_id, stored_bytes) VALUES
    ('full', 'succeeded', '2024-03-05 12:00+00', '2024-03-05 12:00+00', '2024-03-05 12:30+00', '20240305-120000F', 5000),
    ('full', 'succeeded', '2024-02-20 02:00+00', '2024-02-20 02:00+00', '2024-02-20 02:10+00', '20240220-020000F', 5000);

-- RPO: 10 min at worst on repo1 (target 15 min: met), 2 h on offsite (not
-- met); a worse sample outside the period does not count.
INSERT INTO backup.rpo_samples (repository, sampled_at, rpo, in_sync) VALUES
    ('repo1', '2024-03-02 00:00+00', '5 minutes', true),
    ('repo1', '2024-03-04 00:00+00', '10 minutes', true),
    ('repo1', '2024-02-01 00:00+00', '5 hours', true),
    ('offsite', '2024-03-04 00:00+00', '2 hours', false);
-- Restore tests: 20 min on repo1 (target 1 h: met), 90 min on offsite (not
-- met). Integrity: repo1 passed, then failed last.
INSERT INTO backup.backup_verifications (repository, kind, status, queued_at, started_at, finished_at, rto_s, error) VALUES
    (NULL, 'restore_test', 'passed', '2024-03-05 04:00+00', '2024-03-05 04:00+00', '2024-03-05 04:20+00', 1200, NULL),
    ('offsite', 'restore_test', 'passed', '2024-03-05 05:00+00', '2024-03-05 05:00+00', '2024-03-05 06:30+00', 5400, NULL),
    (NULL, 'integrity', 'passed', '2024-03-02 03:00+00', '2024-03-02 03:00+00', '2024-03-02 03:05+00', NULL, NULL),
    (NULL, 'integrity', 'failed', '2024-03-06 03:00+00', '2024-03-06 03:00+00', '2024-03-06 03:05+00', NULL, 'checksum mismatch');
-- Storage: repo1 from 100 kB to 160 kB in the period.
INSERT INTO backup.repository_usage (repository, sampled_at, stored_bytes) VALUES
    ('repo1', '2024-02-29 00:00+00', 90000),
    ('repo1', '2024-03-01 00:00+00', 100000),
    ('repo1', '2024-03-07 00:00+00', 160000);
-- Alerts: two failed nights (one resolved in 15 min, one open), a lagging
-- repository raised before the period and resolved in it, one long gone.
INSERT INTO backup.alerts (kind, severity, subject, message, raised_at, resolved_at) VALUES
    ('backup_failed', 'critical', 'nightly', 'x', '2024-03-03 02:01+00', '2024-03-03 02:16+00'),
    ('backup_failed', 'critical', 'nightly', 'x', '2024-03-07 02:05+00', NULL),
    ('repository_lagging', 'warning', 'offsite', 'x', '2024-02-28 12:00+00', '2024-03-02 12:00+00'),
    ('rpo_exceeded', 'warning', 'archiver', 'x', '2024-02-20 00:00+00', '2024-02-21 00:00+00');

SELECT section, subject, item, regexp_replace(value, 'created [^)]*', 'created ...') AS value, status
  FROM backup.compliance_report('2024-03-01 00:00+00', '2024-03-08 00:00+00')
 WHERE item <> 'system_identifier';
-- The figures behind a few.
SELECT subject, item, detail FROM backup.compliance_report('2024-03-01 00:00+00', '2024-03-08 00:00+00')
 WHERE section IN ('schedule', 'backups') OR (section = 'recovery_objectives' AND subject = 'offsite');
SELECT value ~ '^[0-9]+$' AS system_identifier FROM backup.compliance_report('2024-03-01 00:00+00', '2024-03-08 00:00+00')
 WHERE item = 'system_identifier';

-- A period before anything happened: 'no data' where the period decides;
-- what is in force now (retention, encryption, room) still shown.
SELECT section, subject, item, regexp_replace(value, 'created [^)]*', 'created ...') AS value, status
  FROM backup.compliance_report('2000-01-01 00:00+00', '2000-01-02 00:00+00')
 WHERE item <> 'system_identifier';

-- Bad periods.
SELECT * FROM backup.compliance_report(NULL);
SELECT * FROM backup.compliance_report('2024-03-08 00:00+00', '2024-03-01 00:00+00');
SELECT * FROM backup.compliance_report('2024-03-08 00:00+00', '2024-03-08 00:00+00');

-- A monitor may run it (it reads as its caller).
CREATE ROLE pgb_cmon;
SELECT backup.grant_monitor('pgb_cmon');
SET ROLE pgb_cmon;
SELECT count(*) > 30 AS rows, min(status) FILTER (WHERE item = 'overall') AS overall
  FROM backup.compliance_report('2024-03-01 00:00+00', '2024-03-08 00:00+00');
RESET ROLE;
SELECT backup.revoke_all('pgb_cmon');
DROP ROLE pgb_cmon;

TRUNCATE backup.backup_verifications, backup.recovery_operations, backup.backup_executions, backup.backup_jobs,
         backup.alerts, backup.audit_log, backup.repository_status, backup.repository_backups, backup.rpo_samples,
         backup.repository_usage, backup.retention_policies RESTART IDENTITY CASCADE;
