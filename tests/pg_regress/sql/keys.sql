-- Data keys from SQL: the rotation policy and its checks, what the
-- scheduler stores of walshipper's `keys` (backup.encryption_keys and the
-- backup.keys view: current, previous, retired, missing; bogus values
-- ignored), the operations it plans and records (audit, alerts), requests,
-- and who may do what.
\set VERBOSITY default
\set SHOW_CONTEXT never
TRUNCATE backup.repository_status, backup.repository_usage, backup.repository_backups, backup.alerts,
         backup.encryption_keys, backup.key_operations RESTART IDENTITY CASCADE;
-- As the scheduler's session reads them: with their units.
SET pg_backup.key_rotation_grace = '1d';
SET pg_backup.key_retry_delay = '1h';
CREATE TEMP TABLE audit_mark AS SELECT coalesce(max(audit_id), 0) AS id FROM backup.audit_log;

-- The policy: off at first; every check refuses with a reason.
SELECT rotate_every, retire_after FROM backup.key_rotation_policy;
SELECT backup.set_key_rotation('0 days');
SELECT backup.set_key_rotation('-1 day');
SELECT backup.set_key_rotation('90 days', '0 days');
SELECT backup.set_key_rotation('90 days', '30 days');
SELECT backup.set_key_rotation('90 days', '1 year');
SELECT rotate_every, retire_after, updated_by = current_user AS by_me FROM backup.key_rotation_policy;
-- Off again, then retirement alone, then both.
SELECT backup.set_key_rotation(NULL);
SELECT backup.set_key_rotation(NULL, '180 days');
SELECT backup.set_key_rotation('90 days', '180 days');
SELECT action, object_type, object_name, details FROM backup.audit_log
 WHERE audit_id > (SELECT id FROM audit_mark) ORDER BY audit_id;

-- walshipper's report: a current key 100 days old, a previous one 200
-- days old, a key objects name whose file is gone (present false), the
-- counts of each; and bogus entries: a bad key id, not an object, absurd
-- counts and time, a duplicate, a second "current". Stored as far as valid.
CREATE TEMP TABLE k (name text, id text);
INSERT INTO k VALUES ('a', repeat('a', 32)), ('b', repeat('b', 32)), ('c', repeat('c', 32)),
                     ('d', repeat('d', 32)), ('e', repeat('e', 32));
CREATE FUNCTION pg_temp.ago(days integer) RETURNS text LANGUAGE sql
AS $$ SELECT to_char((now() - make_interval(days => days)) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') $$;
SELECT backup._sched_repo_status(jsonb_build_object('repositories', jsonb_build_array(
  jsonb_build_object('name', 'repo1', 'type', 'posix', 'location', '/r', 'ok', true, 'encryption', 'aes-256-gcm',
    'keys_counted_at', pg_temp.ago(0),
    'keys', jsonb_build_array(
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'a'), 'created_at', pg_temp.ago(100), 'current', true,
                         'present', true, 'objects', 120, 'bytes', 5000000, 'error', null),
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'b'), 'created_at', pg_temp.ago(200), 'current', false,
                         'present', true, 'objects', 80, 'bytes', 3000000),
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'c'), 'created_at', null, 'current', false,
                         'present', false, 'objects', 3, 'bytes', 900),
      -- Bogus: ignored, or NULL where it does not fit.
      jsonb_build_object('key_id', 'ZZZZ' || repeat('0', 28), 'current', true, 'present', true),
      jsonb_build_object('key_id', repeat('a', 31), 'present', true),
      jsonb_build_object('key_id', upper(repeat('ab', 16)), 'present', true),
      '"not an object"'::jsonb,
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'd'), 'created_at', 'the day before yesterday',
                         'current', true, 'present', true, 'objects', 99999999999999999999, 'bytes', -5,
                         'error', E'unreadable\nkey file'),
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'e'), 'created_at', '9999-01-01T00:00:00Z',
                         'present', true, 'objects', '12', 'bytes', 1.5),
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'a'), 'created_at', pg_temp.ago(1), 'current', false))),
  jsonb_build_object('name', 'offsite', 'type', 's3', 'location', 's3://b/p', 'ok', true, 'encryption', 'aes-256-gcm',
    'keys_counted_at', null,
    'keys', jsonb_build_array(
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'a'), 'created_at', pg_temp.ago(100), 'current', true,
                         'present', true, 'objects', 7, 'bytes', 7))))));
SELECT x.repository, k.name AS key, x.status, round(extract(epoch FROM x.age) / 86400) AS age_days,
       x.objects, x.bytes, x.counted_at IS NOT NULL AS counted, x.days_until_rotation_due,
       round(extract(epoch FROM x.retire_due_at - now()) / 86400) AS retire_due_in_days, x.error
  FROM backup.keys x JOIN k ON k.id = x.key_id ORDER BY x.repository DESC, k.name;
SELECT count(*) AS stored FROM backup.encryption_keys;

-- Overdue: 100 days against 90 plus a day's grace, for each repository.
SELECT kind, severity, subject, message LIKE '%rotation is overdue (every 90 days, grace 1 day)' AS says_why
  FROM backup.alerts ORDER BY subject;

-- The scheduler plans the rotation (the policy says it is due, repository
-- status is fresh), takes the repositories and starts it.
SELECT backup._sched_key_pending();
SELECT backup._sched_key_start();
SELECT operation, reason, requested_by, status FROM backup.key_operations;
SELECT expire_pid = pg_backend_pid() AS repositories_held FROM backup.repository_activity;
-- While it runs nothing else is planned.
SELECT backup._sched_key_pending();

-- It found a repository busy: back to the queue, a minute later.
SELECT backup._sched_key_done(1, NULL, 'repository is locked (exit 7)', NULL, true);
SELECT status, not_before > now() AS later, expire_pid IS NULL AS released
  FROM backup.key_operations, backup.repository_activity;
SELECT backup._sched_key_start();
UPDATE backup.key_operations SET not_before = now();
SELECT backup._sched_key_start();

-- walshipper reported the new key current in every repository: recorded,
-- audited, the catalog's current key changed at once (the old one is
-- previous), overdue resolved.
SELECT backup._sched_key_done(1, jsonb_build_object('event', 'key', 'operation', 'rotate', 'succeeded', true,
    'key_id', repeat('f', 32), 'stage', '', 'duration_s', 0.4,
    'repositories', jsonb_build_array(
        jsonb_build_object('repository', 'repo1', 'ok', true, 'error', null, 'current_key_id', repeat('f', 32),
                           'key_files', 1, 'objects_rewritten', 0, 'bytes_rewritten', 0, 'objects_remaining', 0,
                           'key_file_removed', false),
        jsonb_build_object('repository', 'offsite', 'ok', true, 'error', null, 'current_key_id', repeat('f', 32),
                           'key_files', 1, 'objects_rewritten', 0, 'bytes_rewritten', 0, 'objects_remaining', 0,
                           'key_file_removed', false))), NULL, NULL);
SELECT operation, key_id = repeat('f', 32) AS new_key, status, error, details->'repositories'->0->>'key_files' AS key_files
  FROM backup.key_operations;
SELECT actor, action, object_type, object_name = repeat('f', 32) AS new_key, details->>'reason' AS reason,
       details->>'previous_key_id' = repeat('a', 32) AS previous, jsonb_array_length(details->'repositories') AS repositories
  FROM backup.audit_log WHERE audit_id > (SELECT id FROM audit_mark) AND action = 'key_rotated';
SELECT x.repository, coalesce(k.name, 'new') AS key, x.status, x.days_until_rotation_due
  FROM backup.keys x LEFT JOIN k ON k.id = x.key_id WHERE x.status IN ('current', 'previous') ORDER BY 1 DESC, 2;
SELECT kind, subject, resolved_at IS NOT NULL AS resolved FROM backup.alerts ORDER BY subject;
SELECT expire_pid IS NULL AS released FROM backup.repository_activity;

-- Nothing is planned again before repository status is refreshed.
SELECT backup._sched_key_start();

-- The next refresh: the previous key b is gone from repo1 (retired), the
-- missing key c is not reported without counts (kept as it was), the
-- rotated-in key confirmed with its real creation time.
SELECT backup._sched_repo_status(jsonb_build_object('repositories', jsonb_build_array(
  jsonb_build_object('name', 'repo1', 'type', 'posix', 'location', '/r', 'ok', true, 'encryption', 'aes-256-gcm',
    'keys', jsonb_build_array(
      jsonb_build_object('key_id', repeat('f', 32), 'created_at', pg_temp.ago(0), 'current', true, 'present', true),
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'a'), 'created_at', pg_temp.ago(100), 'current', false, 'present', true),
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'e'), 'present', true))),
  jsonb_build_object('name', 'offsite', 'type', 's3', 'location', 's3://b/p', 'ok', true, 'encryption', 'aes-256-gcm',
    'keys', jsonb_build_array(
      jsonb_build_object('key_id', repeat('f', 32), 'created_at', pg_temp.ago(0), 'current', true, 'present', true),
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'a'), 'created_at', pg_temp.ago(100), 'current', false, 'present', true))))));
SELECT x.repository, coalesce(k.name, 'new') AS key, x.status, x.objects, x.retired_at IS NOT NULL AS retired_at_set
  FROM backup.keys x LEFT JOIN k ON k.id = x.key_id ORDER BY 1 DESC, 2;
-- A report that makes the new key look old again does not rotate it twice
-- within the period.
UPDATE backup.encryption_keys SET created_at = now() - interval '100 days' WHERE key_id = repeat('f', 32);
SELECT backup._sched_key_start();
-- A counted report that no longer names c: no object is sealed by it any more.
SELECT backup._sched_repo_status(jsonb_build_object('repositories', jsonb_build_array(
  jsonb_build_object('name', 'repo1', 'type', 'posix', 'location', '/r', 'ok', true, 'encryption', 'aes-256-gcm',
    'keys_counted_at', pg_temp.ago(0),
    'keys', jsonb_build_array(
      jsonb_build_object('key_id', repeat('f', 32), 'created_at', pg_temp.ago(0), 'current', true, 'present', true,
                         'objects', 10, 'bytes', 100),
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'a'), 'created_at', pg_temp.ago(100), 'current', false,
                         'present', true, 'objects', 200, 'bytes', 8000000))),
  jsonb_build_object('name', 'offsite', 'type', 's3', 'location', 's3://b/p', 'ok', false, 'error', 'gone'))));
SELECT x.repository, coalesce(k.name, 'new') AS key, x.status, x.objects
  FROM backup.keys x LEFT JOIN k ON k.id = x.key_id ORDER BY 1 DESC, 2;
-- An encrypted repository reporting no key at all is not believed.
SELECT backup._sched_repo_status(jsonb_build_object('repositories', jsonb_build_array(
  jsonb_build_object('name', 'repo1', 'type', 'posix', 'location', '/r', 'ok', true, 'encryption', 'aes-256-gcm',
    'keys_counted_at', pg_temp.ago(0), 'keys', '[]'::jsonb),
  jsonb_build_object('name', 'offsite', 'type', 's3', 'location', 's3://b/p', 'ok', false, 'error', 'gone'))));
SELECT count(*) FILTER (WHERE status <> 'retired') AS still_known FROM backup.keys WHERE repository = 'repo1';
TRUNCATE backup.alerts RESTART IDENTITY;

-- Retirement by the policy: a (100 days) is not yet 180 days old; made
-- older, it is due once every repository answered and status is fresh.
UPDATE backup.encryption_keys SET created_at = now() - interval '181 days' WHERE key_id = repeat('a', 32);
SELECT backup._sched_key_start();
SELECT backup._sched_repo_status(jsonb_build_object('repositories', jsonb_build_array(
  jsonb_build_object('name', 'repo1', 'type', 'posix', 'location', '/r', 'ok', true, 'encryption', 'aes-256-gcm',
    'keys', jsonb_build_array(
      jsonb_build_object('key_id', repeat('f', 32), 'created_at', pg_temp.ago(0), 'current', true, 'present', true),
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'a'), 'created_at', pg_temp.ago(181), 'current', false, 'present', true))),
  jsonb_build_object('name', 'offsite', 'type', 's3', 'location', 's3://b/p', 'ok', true, 'encryption', 'aes-256-gcm',
    'keys', jsonb_build_array(
      jsonb_build_object('key_id', repeat('f', 32), 'created_at', pg_temp.ago(0), 'current', true, 'present', true),
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'a'), 'created_at', pg_temp.ago(181), 'current', false, 'present', true))))));
SELECT backup._sched_key_start() - 'operation_id' AS started;
-- It fails: recorded with walshipper's reason and hint, audited, alerted.
SELECT backup._sched_key_done(2, jsonb_build_object('event', 'key', 'operation', 'retire', 'succeeded', false,
    'key_id', repeat('a', 32), 'stage', '', 'duration_s', 3,
    'repositories', jsonb_build_array(
        jsonb_build_object('repository', 'repo1', 'ok', false, 'error', E'object wal/x cannot be decoded\n',
                           'current_key_id', repeat('f', 32), 'objects_rewritten', 150, 'bytes_rewritten', 6000000,
                           'objects_remaining', 50, 'key_file_removed', false))),
    'key retire: 1 object could not be re-encrypted (exit 9)', 'run walshipper verify');
SELECT operation_id, operation, status, error, error_hint FROM backup.key_operations ORDER BY operation_id;
SELECT actor, action, object_name = repeat('a', 32) AS key_a, details->>'error' AS error, details->>'hint' AS hint,
       details->'repositories'->0->>'objects_remaining' AS remaining
  FROM backup.audit_log WHERE audit_id > (SELECT id FROM audit_mark) AND action = 'key_retirement_failed';
SELECT kind, severity, subject = 'key retire ' || repeat('a', 32) AS subject_is_key, message LIKE '%could not be re-encrypted (exit 9) (run walshipper verify)' AS why
  FROM backup.alerts WHERE resolved_at IS NULL;
-- The policy does not try again within pg_backup.key_retry_delay.
SELECT backup._sched_key_start();
-- A retry that succeeds: the key retired everywhere, the alert resolved.
UPDATE backup.key_operations SET finished_at = now() - interval '2 hours';
SELECT backup._sched_repo_status(jsonb_build_object('repositories', jsonb_build_array(
  jsonb_build_object('name', 'repo1', 'type', 'posix', 'location', '/r', 'ok', true, 'encryption', 'aes-256-gcm',
    'keys', jsonb_build_array(
      jsonb_build_object('key_id', repeat('f', 32), 'created_at', pg_temp.ago(0), 'current', true, 'present', true),
      jsonb_build_object('key_id', (SELECT id FROM k WHERE name = 'a'), 'created_at', pg_temp.ago(181), 'current', false, 'present', true))))));
SELECT backup._sched_key_start() - 'operation_id' AS started;
SELECT backup._sched_key_done(3, jsonb_build_object('event', 'key', 'operation', 'retire', 'succeeded', true,
    'key_id', repeat('a', 32), 'stage', '', 'duration_s', 3,
    'repositories', jsonb_build_array(
        jsonb_build_object('repository', 'repo1', 'ok', true, 'current_key_id', repeat('f', 32),
                           'objects_rewritten', 50, 'bytes_rewritten', 2000000, 'objects_remaining', 0,
                           'key_file_removed', true))), NULL, NULL);
SELECT operation_id, operation, reason, status FROM backup.key_operations ORDER BY operation_id;
SELECT action, details->'repositories'->0->>'objects_rewritten' AS rewritten,
       details->'repositories'->0->>'key_file_removed' AS removed
  FROM backup.audit_log WHERE audit_id > (SELECT id FROM audit_mark) AND action = 'key_retired';
SELECT kind, resolved_at IS NOT NULL AS resolved FROM backup.alerts;
SELECT x.repository, coalesce(k.name, 'new') AS key, x.status FROM backup.keys x LEFT JOIN k ON k.id = x.key_id ORDER BY 1 DESC, 2;

-- A report that does not hold together is a failure, not a success: the
-- wrong operation, a retire of another key, no report at all.
INSERT INTO backup.key_operations (operation, key_id, reason, requested_by, status, started_at, worker_pid)
VALUES ('rotate', NULL, 'requested', 'x', 'running', now(), pg_backend_pid()),
       ('retire', repeat('e', 32), 'requested', 'x', 'running', now(), pg_backend_pid()),
       ('rotate', NULL, 'requested', 'x', 'running', now(), pg_backend_pid());
SELECT backup._sched_key_done(4, '{"event": "key", "operation": "retire", "succeeded": true, "key_id": null, "repositories": []}', NULL, NULL);
SELECT backup._sched_key_done(5, jsonb_build_object('event', 'key', 'operation', 'retire', 'succeeded', true,
    'key_id', repeat('b', 32), 'repositories', '[]'::jsonb), NULL, NULL);
SELECT backup._sched_key_done(6, NULL, 'walshipper key rotate exited 0 without a report', NULL);
SELECT operation_id, status, error FROM backup.key_operations WHERE operation_id > 3 ORDER BY operation_id;
-- An operation left running by a restarted scheduler is recorded interrupted.
INSERT INTO backup.key_operations (operation, reason, requested_by, status, started_at, worker_pid)
VALUES ('rotate', 'requested', 'x', 'running', now(), 2147483647);
SELECT backup._sched_key_start();
SELECT operation_id, status, error FROM backup.key_operations WHERE operation_id = 7;
TRUNCATE backup.alerts RESTART IDENTITY;
-- A rotation done in one repository and not the other: critical (the
-- repositories now seal with different keys), the one that rotated
-- recorded so.
INSERT INTO backup.key_operations (operation, reason, requested_by, status, started_at, worker_pid)
VALUES ('rotate', 'requested', 'x', 'running', now(), pg_backend_pid());
SELECT backup._sched_key_done(8, jsonb_build_object('event', 'key', 'operation', 'rotate', 'succeeded', false,
    'key_id', repeat('1', 32), 'repositories', jsonb_build_array(
        jsonb_build_object('repository', 'repo1', 'ok', true, 'current_key_id', repeat('1', 32), 'key_files', 1),
        jsonb_build_object('repository', 'offsite', 'ok', false, 'error', 'timed out', 'current_key_id', repeat('f', 32)))),
    'repository offsite: timed out (exit 3)', NULL);
SELECT severity, subject, message LIKE '%now seal with different keys%' AS says_why FROM backup.alerts;
SELECT repository, key_id = repeat('1', 32) AS new_key, status FROM backup.keys WHERE status = 'current' ORDER BY 1 DESC;
SELECT backup._sched_repo_status(jsonb_build_object('repositories', jsonb_build_array(
  jsonb_build_object('name', 'repo1', 'type', 'posix', 'location', '/r', 'ok', true, 'encryption', 'aes-256-gcm',
    'keys', jsonb_build_array(
      jsonb_build_object('key_id', repeat('f', 32), 'created_at', pg_temp.ago(0), 'current', true, 'present', true))),
  jsonb_build_object('name', 'offsite', 'type', 's3', 'location', 's3://b/p', 'ok', false, 'error', 'gone'))));
TRUNCATE backup.alerts RESTART IDENTITY;

-- Requests: checked, audited, queued once.
SELECT backup.retire_key('not a key');
SELECT backup.retire_key(NULL);
SELECT backup.retire_key(repeat('9', 32));
SELECT backup.retire_key(repeat('f', 32));
SELECT backup.retire_key(repeat('e', 32));
-- a is retired in repo1, still previous in offsite (whose last report
-- said so): it may be retired.
SELECT backup.retire_key(repeat('a', 32)) AS queued, backup.retire_key(repeat('a', 32)) AS again;
SELECT backup.rotate_key_now() AS queued, backup.rotate_key_now() AS again;
SELECT operation, key_id = repeat('a', 32) AS key_a, reason, requested_by = current_user AS by_me, status
  FROM backup.key_operations WHERE status = 'queued' ORDER BY operation_id;
SELECT action, object_name = repeat('a', 32) AS key_a, details ? 'operation_id' AS has_id FROM backup.audit_log
 WHERE audit_id > (SELECT id FROM audit_mark) AND action IN ('key_rotation_requested', 'key_retirement_requested')
 ORDER BY audit_id;
-- An unencrypted repository has no key to rotate.
UPDATE backup.repository_status SET encryption = 'none';
SELECT backup.rotate_key_now();
UPDATE backup.repository_status SET encryption = 'aes-256-gcm';

-- Nothing secret anywhere: the audit rows hold ids and counts only.
SELECT count(*) AS rows_naming_secrets FROM backup.audit_log
 WHERE audit_id > (SELECT id FROM audit_mark) AND details::text ~* 'passphrase|secret|wrapped|nonce';

-- Who may: a monitor reads the keys, never sets the policy; an operator
-- neither; a key manager does.
CREATE ROLE pgb_key_monitor;
CREATE ROLE pgb_key_operator;
CREATE ROLE pgb_key_manager;
SELECT backup.grant_monitor('pgb_key_monitor');
SELECT backup.grant_operator('pgb_key_operator', retention => true);
SELECT backup.grant_key_manager('pgb_key_manager');
SET ROLE pgb_key_monitor;
SELECT count(*) > 0 AS reads_keys FROM backup.keys;
SELECT count(*) > 0 AS reads_policy FROM backup.key_rotation_policy;
SELECT count(*) > 0 AS reads_operations FROM backup.key_operations;
\set VERBOSITY terse
SELECT backup.set_key_rotation('1 day');
SELECT backup.rotate_key_now();
UPDATE backup.key_rotation_policy SET rotate_every = NULL;
SELECT backup._sched_key_done(1, NULL, 'x', NULL);
RESET ROLE;
SET ROLE pgb_key_operator;
SELECT backup.set_key_rotation('1 day');
SELECT backup.retire_key(repeat('a', 32));
RESET ROLE;
SET ROLE pgb_key_manager;
SELECT backup.set_key_rotation('30 days', '365 days');
SELECT backup.grant_key_manager('pgb_key_operator');
SELECT backup._key_refresh('{}');
RESET ROLE;
SELECT actor, action, details->'policy' AS policy FROM backup.audit_log
 WHERE audit_id > (SELECT id FROM audit_mark) AND action = 'key_rotation_policy_set' ORDER BY audit_id DESC LIMIT 1;
SELECT backup.revoke_all('pgb_key_monitor'), backup.revoke_all('pgb_key_operator'), backup.revoke_all('pgb_key_manager');
DROP ROLE pgb_key_monitor;
DROP ROLE pgb_key_operator;
DROP ROLE pgb_key_manager;
SELECT backup.set_key_rotation(NULL);
TRUNCATE backup.repository_status, backup.encryption_keys, backup.key_operations, backup.alerts RESTART IDENTITY CASCADE;
