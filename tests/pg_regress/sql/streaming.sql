-- Streaming WAL: the receiver's state as the scheduler records it
-- (backup._stream_report), backup.wal_archive_status's streaming columns,
-- and the alerts of backup._stream_check: a slot pinning WAL, a receiver
-- down or not connected, each raised once and resolved.
\set VERBOSITY default
\set SHOW_CONTEXT never
TRUNCATE backup.alerts RESTART IDENTITY CASCADE;

-- Off: the view says so and reads no slot.
SELECT streaming, receiver_state, receiver_pid, slot_name, slot_active, stream_flushed_lsn
  FROM backup.wal_archive_status;

-- A slot nobody reads pins WAL: an alert above the threshold (1 MB here),
-- whether or not streaming is on, telling to drop it when streaming is off.
SELECT 'created' FROM pg_create_physical_replication_slot('regress_slot', true);
CREATE TABLE stream_filler AS SELECT g, repeat('x', 100) AS v FROM generate_series(1, 30000) g;
SELECT backup._stream_check(false, 'regress_slot', 60, 1, 60);
SELECT kind, severity, subject, message ~ 'drop the slot' AS says_drop, (details->>'retained_bytes')::numeric > 1048576 AS over
  FROM backup.alerts WHERE resolved_at IS NULL;
-- Under a threshold it holds back less than: resolved.
SELECT backup._stream_check(false, 'regress_slot', 60, 1024, 60);
SELECT count(*) AS open_alerts FROM backup.alerts WHERE resolved_at IS NULL;

-- Streaming on, the receiver exited and waits to restart: down once it has
-- been so longer than the limit, with its last error.
SELECT backup._stream_report('restarting', NULL, 'replication slot "regress_slot": connection refused', now() + interval '4 s');
SELECT backup._stream_check(true, 'regress_slot', 60, 1024, 60);
SELECT count(*) AS not_yet FROM backup.alerts WHERE resolved_at IS NULL;
UPDATE backup.wal_receiver SET since = now() - interval '2 minutes', down_since = now() - interval '2 minutes';
SELECT backup._stream_check(true, 'regress_slot', 60, 1024, 60);
SELECT kind, severity, subject, details->>'last_error' AS last_error
  FROM backup.alerts WHERE resolved_at IS NULL;
SELECT streaming, receiver_state, receiver_last_error, slot_active FROM backup.wal_archive_status;

-- Restarted (one restart counted), but its slot is not in use: still down
-- after the limit.
SELECT backup._stream_report('running', 4242, NULL, NULL);
SELECT state, pid, restarts, last_error, next_start_at IS NULL AS no_next FROM backup.wal_receiver;
UPDATE backup.wal_receiver SET since = now() - interval '2 minutes', started_at = now() - interval '2 minutes', down_since = now() - interval '2 minutes';
TRUNCATE backup.alerts RESTART IDENTITY CASCADE;
SELECT backup._stream_check(true, 'regress_slot', 60, 1024, 60);
SELECT kind, message ~ 'not in use' AS not_in_use FROM backup.alerts WHERE resolved_at IS NULL;
-- A crash loop: each run streams a few seconds, exits, restarts. down_since
-- stays at the first exit, so the receiver is down (alert, RPO) even while a
-- short run streams, until a run has streamed for the stable time.
SELECT backup._stream_report('off', NULL, NULL, NULL);
TRUNCATE backup.alerts RESTART IDENTITY CASCADE;
SELECT backup._stream_report('running', 100, NULL, NULL);
SELECT down_since IS NULL AS up FROM backup.wal_receiver;
SELECT backup._stream_report('restarting', NULL, 'walshipper wal-receive exited with status 1: boom', now() + interval '2 s');
UPDATE backup.wal_receiver SET down_since = now() - interval '5 minutes';
SELECT backup._stream_report('running', 101, NULL, NULL);
SELECT backup._stream_report('restarting', NULL, 'walshipper wal-receive exited with status 1: boom', now() + interval '4 s');
SELECT backup._stream_report('running', 102, NULL, NULL);
SELECT state, restarts, now() - down_since > interval '4 minutes' AS down_from_the_first_exit FROM backup.wal_receiver;
-- Running now but its slot not in use: down since the first exit, and the
-- RPO estimate counts from there too (an active slot and the stable time
-- are checked against the real receiver in the extension's test).
SELECT backup._stream_check(true, 'regress_slot', 60, 1024, 60);
SELECT kind, (details->>'restarts')::int AS restarts, details->>'down_since' IS NOT NULL AS has_down_since
  FROM backup.alerts WHERE resolved_at IS NULL;
SELECT receiver_down_since IS NOT NULL AS down, receiver_restarts FROM backup.wal_archive_status;

-- Off again and the slot dropped: everything resolved.
SELECT pg_drop_replication_slot('regress_slot');
SELECT backup._stream_report('off', NULL, NULL, NULL);
SELECT backup._stream_check(false, 'regress_slot', 60, 1, 60);
SELECT count(*) AS open_alerts FROM backup.alerts WHERE resolved_at IS NULL;
SELECT state, pid, restarts FROM backup.wal_receiver;
DROP TABLE stream_filler;
