-- Notifications: the events the triggers on backup.alerts write (one per
-- raise, one per resolution, none for a duplicate raise or an
-- acknowledgement), what the notifier's functions do with them, and who
-- may call what.
\set VERBOSITY default
\set SHOW_CONTEXT never
TRUNCATE backup.notification_events, backup.notification_deliveries RESTART IDENTITY;
TRUNCATE backup.alerts, backup.audit_log RESTART IDENTITY CASCADE;
SELECT backup._raise_alert('backup_failed', 'critical', 'nightly', 'backup 7 (nightly) failed: disk full', '{"execution_id": 7}');
SELECT backup._raise_alert('backup_failed', 'critical', 'nightly', 'backup 8 (nightly) failed: disk full');
SELECT backup._raise_alert('archive_failing', 'critical', 'archiver', 'WAL archiving is failing');
SELECT backup._raise_alert('verification_failed', 'warning', 'repo1', 'backup X is damaged', '{"job": "weekly"}');
SELECT backup._raise_alert('backup_failed', 'critical', 'manual', 'backup 9 (manual) failed: no space');
SELECT backup.alert_ack((SELECT alert_id FROM backup.alerts WHERE subject = 'nightly'));
SELECT backup._resolve_alert('backup_failed', 'nightly');
SELECT backup._resolve_alert('backup_failed', 'nightly');
SELECT event_id, event, kind, severity, subject, job, message, hint, details, channel
  FROM backup.notification_events ORDER BY event_id;
-- Each event's time is its alert's raise or resolution.
SELECT e.event_id FROM backup.notification_events e JOIN backup.alerts a USING (alert_id)
 WHERE e.created_at <> CASE e.event WHEN 'raised' THEN a.raised_at ELSE a.resolved_at END;

-- The notifier: takes an event (a second claim waits for the lease),
-- retries it, gives it up (notification_failed about the channel), sends
-- the next (which resolves it), skips one.
SELECT event_id, event, attempts, ready, seen FROM backup.notification_pending('ops');
SELECT backup.notification_claim(1, 'ops', 60) AS attempt;
SELECT backup.notification_claim(1, 'ops', 60) AS held;
SELECT event_id, attempts, ready, seen FROM backup.notification_pending('ops') WHERE event_id = 1;
-- A result without the claim's token, or with another's, is refused or ignored.
SELECT backup.notification_done(1, 'ops', 'retry', 'x', 0);
SELECT backup.notification_done(1, 'ops', 'failed', 'forged', 0, 7);
SELECT backup.notification_done(1, 'ops', 'retry', 'webhook http://127.0.0.1:9 answered 500', 0, 1);
-- Released: the same token again is ignored.
SELECT backup.notification_done(1, 'ops', 'failed', 'stale', 0, 1);
SELECT backup.notification_claim(1, 'ops', 60) AS attempt;
SELECT backup.notification_done(1, 'ops', 'failed', 'webhook http://127.0.0.1:9 answered 500', 0, 2);
SELECT kind, severity, subject, message, details FROM backup.alerts WHERE kind = 'notification_failed';
SELECT event, kind, subject FROM backup.notification_events WHERE kind = 'notification_failed';
SELECT backup.notification_claim(2, 'ops', 60) AS attempt;
SELECT backup.notification_done(2, 'ops', 'sent', NULL, NULL, 1);
SELECT count(*) AS still_failing FROM backup.alerts WHERE kind = 'notification_failed' AND resolved_at IS NULL;
SELECT backup.notification_done(3, 'ops', 'skipped', 'not routed here: severity critical is below min_severity');
-- Closed deliveries stay closed.
SELECT backup.notification_done(1, 'ops', 'sent', NULL, NULL, 2);
SELECT backup.notification_claim(1, 'ops', 60) AS closed;
-- Only names walshipper's configuration allows.
SELECT backup.notification_claim(1, 'no such; channel', 60);
SELECT backup.notification_done(1, repeat('x', 49), 'failed', 'text of my choosing', 0, 1);
SELECT backup.notification_done(1, 'ops', 'bogus');
-- A skip does not take a delivery another notifier holds.
SELECT backup.notification_claim(6, 'ops', 60) AS attempt;
SELECT backup.notification_done(6, 'ops', 'skipped', 'too old');
-- Held by a local configuration error: the attempt is not counted, the
-- alert is raised once.
SELECT backup.notification_done(6, 'ops', 'held', 'secret_file: No such file', 0, 1);
SELECT backup.notification_claim(6, 'ops', 60) AS attempt;
SELECT backup.notification_done(6, 'ops', 'held', 'secret_file: No such file', 0, 1);
SELECT count(*) AS held_alerts FROM backup.alerts WHERE kind = 'notification_failed' AND resolved_at IS NULL;
SELECT backup.notification_claim(6, 'ops', 60) AS attempt;
SELECT event_id, channel, status, attempts, last_error, sent_at IS NOT NULL AS sent
  FROM backup.notification_deliveries ORDER BY event_id, channel;
SELECT backup.notification_sent_last_hour('ops') AS ops, backup.notification_sent_last_hour('mail') AS mail;
-- Another channel sees them all still.
SELECT count(*) AS pending_for_mail FROM backup.notification_pending('mail');

-- notification_test: an operator may (audited); a monitor may not; the
-- notifier's role runs the notifier's functions and nothing else.
CREATE ROLE pgb_notify_operator;
CREATE ROLE pgb_notify_monitor;
CREATE ROLE pgb_notifier;
SELECT backup.grant_operator('pgb_notify_operator');
SELECT backup.grant_monitor('pgb_notify_monitor');
SELECT backup.grant_notifier('pgb_notifier');
SET ROLE pgb_notify_operator;
SELECT backup.notification_test() > 0 AS queued;
SELECT backup.notification_test('ops') > 0 AS queued;
SELECT backup.notification_test('no such; channel');
-- One at a time per channel: a loop cannot flood it.
SELECT backup.notification_test('ops');
SELECT count(*) AS queued FROM (SELECT backup.notification_test() FROM generate_series(1, 2000)) t;
SELECT backup.notification_claim(1, 'ops', 60);
RESET ROLE;
SELECT event, kind, severity, subject, channel, requested_by, message LIKE 'test notification requested by pgb_notify_operator at %' AS message
  FROM backup.notification_events WHERE event = 'test' ORDER BY event_id;
SELECT actor, action, object_type, object_name FROM backup.audit_log WHERE action = 'test' ORDER BY audit_id;
SET ROLE pgb_notify_monitor;
SELECT backup.notification_test();
SELECT count(*) AS events FROM backup.notification_events;
SELECT backup.notification_done(4, 'ops', 'sent');
RESET ROLE;
SET ROLE pgb_notifier;
-- Tests come after the alerts waiting; seen events stay pending, unclaimed.
SELECT event_id, event, subject FROM backup.notification_pending('ops');
SELECT backup.notification_seen(5, 'ops');
SELECT event_id, attempts, ready, seen FROM backup.notification_pending('ops') WHERE event_id = 5;
SELECT event FROM backup.notification_pending('mail') WHERE event = 'test';
SELECT backup.notification_claim(4, 'ops', 60) AS attempt;
SELECT backup.notification_done(4, 'ops', 'sent', NULL, NULL, 1);
SELECT backup.notification_test();
SELECT backup._raise_alert('backup_failed', 'critical', 'x', 'y');
INSERT INTO backup.notification_deliveries (event_id, channel, status) VALUES (5, 'ops', 'sent');
RESET ROLE;

SELECT backup.revoke_all('pgb_notify_operator');
SELECT backup.revoke_all('pgb_notify_monitor');
SELECT backup.revoke_all('pgb_notifier');
DROP ROLE pgb_notify_operator, pgb_notify_monitor, pgb_notifier;
TRUNCATE backup.notification_events, backup.notification_deliveries RESTART IDENTITY;
TRUNCATE backup.alerts, backup.audit_log RESTART IDENTITY CASCADE;
