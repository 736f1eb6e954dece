-- Notifications: every alert raised or resolved becomes an event that
-- walshipper's notifier (walshipper serve) sends out by webhook and e-mail
-- and records here. Channels and their secrets live in walshipper's
-- configuration, never in the catalog.
--
-- The outbox: notification_events (one row per alert raised, per alert
-- resolved, per test asked for) and notification_deliveries (one row per
-- event and channel the notifier has looked at: sent, failed, skipped or
-- still pending). The primary key of a delivery is the de-duplication: one
-- message per event and channel, whatever the number of notifiers and
-- restarts. Events and their deliveries are kept 90 days.

CREATE TABLE backup.notification_events (
    event_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- No foreign key: the alerts may be truncated (tests, a reset) and
    -- what was sent stays on record.
    alert_id        bigint,
    event           text NOT NULL CHECK (event IN ('raised', 'resolved', 'test')),
    kind            text NOT NULL,
    severity        text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    subject         text NOT NULL,
    -- The backup job the alert is about (routing by job), NULL for none.
    job             text,
    message         text NOT NULL,
    -- What to do about it, where there is something general to say.
    hint            text,
    details         jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- A test for one channel only (NULL: every channel).
    channel         text CHECK (channel ~ '^[A-Za-z0-9_-]{1,48}$'),
    requested_by    name,
    CHECK ((event = 'test') = (alert_id IS NULL)),
    CHECK (channel IS NULL OR event = 'test')
);
CREATE INDEX notification_events_created ON backup.notification_events (created_at);
COMMENT ON TABLE backup.notification_events IS
    'Alerts raised and resolved, and test requests, for walshipper''s notifier to send (kept 90 days).';

CREATE TABLE backup.notification_deliveries (
    event_id        bigint NOT NULL REFERENCES backup.notification_events (event_id) ON DELETE CASCADE,
    -- walshipper checks its [[notify.channel]] names by the same rule.
    channel         text NOT NULL CHECK (channel ~ '^[A-Za-z0-9_-]{1,48}$'),
    status          text NOT NULL CHECK (status IN ('pending', 'sent', 'failed', 'skipped')),
    attempts        integer NOT NULL DEFAULT 0,
    -- The last failure, or why the event was skipped. Never a secret:
    -- walshipper writes what it would log.
    last_error      text CHECK (length(last_error) <= 1000),
    -- A pending delivery is tried again from then on.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- A notifier sending it holds it until then (another waits).
    locked_until    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    PRIMARY KEY (event_id, channel)
);
CREATE INDEX notification_deliveries_sent ON backup.notification_deliveries (channel, sent_at)
    WHERE sent_at IS NOT NULL;
COMMENT ON TABLE backup.notification_deliveries IS
    'What walshipper''s notifier did with each event on each channel: sent, failed, skipped or pending.';

-- What to do about an alert, in general terms (the message says what
-- happened; a failed backup carries walshipper's own hint).
CREATE FUNCTION backup._alert_hint(a backup.alerts)
RETURNS text LANGUAGE sql STABLE
AS $$
    SELECT CASE a.kind
        WHEN 'backup_failed' THEN coalesce(
            (SELECT e.error_hint FROM backup.backup_executions e
              WHERE e.execution_id = CASE WHEN a.details->>'execution_id' ~ '^[0-9]{1,18}$'
                                          THEN (a.details->>'execution_id')::bigint END),
            'See the run''s error in backup.backup_executions, then run it again with backup.backup_run().')
        WHEN 'job_overdue' THEN 'See the job''s last runs in backup.backup_executions and whether the scheduler runs (backup.alerts kind worker_error).'
        WHEN 'archive_failing' THEN 'Check archive_command and the server log; walshipper check tests archiving end to end.'
        WHEN 'rpo_exceeded' THEN 'WAL is not reaching the repository fast enough: check archiving (pg_stat_archiver) and the repository.'
        WHEN 'repository_unavailable' THEN 'Check that the repository is reachable and walshipper''s [repo] settings; walshipper info shows the error.'
        WHEN 'repository_lagging' THEN 'Run walshipper repo-sync to copy what the primary repository holds.'
        WHEN 'repository_almost_full' THEN 'Free space (walshipper expire, a shorter retention) or grow the volume or quota.'
        WHEN 'notification_failed' THEN 'Check the channel in walshipper''s [[notify.channel]] configuration; walshipper notify-test sends a test message.'
        WHEN 'worker_error' THEN 'Check the server log and the pg_backup.* settings.'
    END
$$;

-- Wakes the notifier (it also polls): the payload is the event id only,
-- since any role may LISTEN.
CREATE FUNCTION backup._notification_event_added() RETURNS trigger LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('backup_notify', NEW.event_id::text);
    -- Now and then, forget what is 90 days old (deliveries go with their event).
    IF NEW.event_id % 100 = 0 THEN
        DELETE FROM backup.notification_events WHERE created_at < now() - interval '90 days';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER notification_event_added AFTER INSERT ON backup.notification_events
    FOR EACH ROW EXECUTE FUNCTION backup._notification_event_added();

-- An alert raised (INSERT) or resolved (resolved_at set) is an event.
-- Runs as the owner whoever changes the alert (they all do it through the
-- owner's functions anyway).
CREATE FUNCTION backup._notification_alert_changed() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NOT (OLD.resolved_at IS NULL AND NEW.resolved_at IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    INSERT INTO backup.notification_events (alert_id, event, kind, severity, subject, job, message, hint, details, created_at)
    VALUES (NEW.alert_id, CASE TG_OP WHEN 'INSERT' THEN 'raised' ELSE 'resolved' END,
            NEW.kind, NEW.severity, NEW.subject,
            CASE WHEN NEW.kind IN ('backup_failed', 'job_overdue') AND NEW.subject <> 'manual' THEN NEW.subject
                 ELSE NEW.details->>'job' END,
            NEW.message, backup._alert_hint(NEW), NEW.details,
            CASE TG_OP WHEN 'INSERT' THEN NEW.raised_at ELSE NEW.resolved_at END);
    RETURN NULL;
END
$$;
CREATE TRIGGER notification_alert_raised AFTER INSERT ON backup.alerts
    FOR EACH ROW EXECUTE FUNCTION backup._notification_alert_changed();
CREATE TRIGGER notification_alert_resolved AFTER UPDATE OF resolved_at ON backup.alerts
    FOR EACH ROW WHEN (OLD.resolved_at IS NULL AND NEW.resolved_at IS NOT NULL)
    EXECUTE FUNCTION backup._notification_alert_changed();

-- A channel name as walshipper's configuration allows it, or an error (no
-- invented name slips into the outbox or an alert).
CREATE FUNCTION backup._notification_channel_check(channel text)
RETURNS void LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF channel IS NULL OR channel !~ '^[A-Za-z0-9_-]{1,48}$' THEN
        RAISE EXCEPTION 'no channel can be named %', coalesce(left(channel, 60), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Channel names ([[notify.channel]] name in walshipper''s configuration) hold 1 to 48 letters, digits, ''-'' and ''_''.';
    END IF;
END
$$;

-- Operator: a test message through every channel (or the one named), sent
-- by the notifier within seconds. Returns the event id: see
-- backup.notification_deliveries for what became of it.
CREATE FUNCTION backup.notification_test(channel text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    id bigint;
    prev backup.notification_events;
BEGIN
    IF channel IS NOT NULL THEN
        PERFORM backup._notification_channel_check(channel);
    END IF;
    -- One test at a time per channel (and for all): a loop of tests would
    -- fill the channel's rate limit. Serialised so two callers see each other.
    PERFORM pg_advisory_xact_lock(hashtext('backup.notification_test'));
    SELECT e.* INTO prev FROM backup.notification_events e
     WHERE e.event = 'test' AND e.channel IS NOT DISTINCT FROM notification_test.channel
       AND (e.created_at > now() - interval '1 minute'
            OR NOT EXISTS (SELECT FROM backup.notification_deliveries d WHERE d.event_id = e.event_id)
            OR EXISTS (SELECT FROM backup.notification_deliveries d
                        WHERE d.event_id = e.event_id AND d.status = 'pending'))
     ORDER BY e.event_id DESC LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'a test notification for % is already queued (event %)',
                coalesce('channel ' || channel, 'every channel'), prev.event_id
            USING ERRCODE = 'object_in_use',
                  HINT = 'Wait for it (backup.notification_deliveries shows what became of it; at most one test a minute), or check that walshipper serve runs with [[notify.channel]] configured.';
    END IF;
    INSERT INTO backup.notification_events (event, kind, severity, subject, message, channel, requested_by)
    VALUES ('test', 'notification_test', 'info', coalesce(channel, ''),
            format('test notification requested by %s at %s', backup._caller(),
                   to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"')),
            channel, backup._caller())
    RETURNING event_id INTO id;
    PERFORM backup._audit('test', 'notification', coalesce(channel, 'all'), jsonb_build_object('event_id', id));
    RETURN id;
END
$$;

-- Notifier: the next events for p_channel, alerts oldest first, then tests
-- (a test never waits ahead of an alert), with what the channel's delivery
-- of each is (ready: may be tried now; seen: the notifier recorded it).
-- Events a delivery row closed (sent, failed, skipped) are not returned.
CREATE FUNCTION backup.notification_pending(p_channel text, p_limit integer DEFAULT 50)
RETURNS TABLE (event_id bigint, event text, alert_id bigint, kind text, severity text, subject text,
               job text, message text, hint text, details jsonb, created_at timestamptz,
               raised_at timestamptz, resolved_at timestamptz, attempts integer, ready boolean,
               seen boolean, ready_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
AS $$
    SELECT e.event_id, e.event, e.alert_id, e.kind, e.severity, e.subject, e.job, e.message, e.hint,
           e.details, e.created_at, a.raised_at,
           CASE WHEN e.event = 'resolved' THEN a.resolved_at END,
           coalesce(d.attempts, 0),
           d.event_id IS NULL OR (d.next_attempt_at <= now() AND coalesce(d.locked_until, '-infinity') < now()),
           d.event_id IS NOT NULL,
           CASE WHEN d.event_id IS NOT NULL THEN greatest(d.next_attempt_at, d.locked_until) END
      FROM backup.notification_events e
      LEFT JOIN backup.alerts a ON a.alert_id = e.alert_id
      LEFT JOIN backup.notification_deliveries d ON d.event_id = e.event_id AND d.channel = p_channel
     WHERE (e.channel IS NULL OR e.channel = p_channel)
       AND (d.event_id IS NULL OR d.status = 'pending')
     ORDER BY e.event = 'test', e.event_id
     LIMIT least(greatest(p_limit, 1), 1000)
$$;

-- Notifier: messages sent on p_channel over the last hour (its rate limit
-- counts them, whichever notifier sent them).
CREATE FUNCTION backup.notification_sent_last_hour(p_channel text)
RETURNS bigint LANGUAGE sql STABLE SECURITY DEFINER
AS $$
    SELECT count(*) FROM backup.notification_deliveries
     WHERE channel = p_channel AND sent_at > now() - interval '1 hour'
$$;

-- Notifier: records that it saw event p_event for p_channel and will send
-- it (a pending delivery, no attempt yet), so a message that waits (rate
-- limit, an earlier one retried) is not taken for an old one later.
CREATE FUNCTION backup.notification_seen(p_event bigint, p_channel text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
AS $$
BEGIN
    PERFORM backup._notification_channel_check(p_channel);
    INSERT INTO backup.notification_deliveries (event_id, channel, status)
    VALUES (p_event, p_channel, 'pending')
    ON CONFLICT (event_id, channel) DO NOTHING;
END
$$;

-- Notifier: takes event p_event for p_channel for p_lease seconds (another
-- notifier leaves it alone meanwhile) and counts an attempt. Returns the
-- attempt's number, or NULL when it is not to be tried now (done, held by
-- another notifier, or waiting for its next attempt). The number is the
-- claim's token: notification_done() takes it back and ignores a holder
-- whose lease ran out and was claimed again.
CREATE FUNCTION backup.notification_claim(p_event bigint, p_channel text, p_lease integer)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    n integer;
BEGIN
    PERFORM backup._notification_channel_check(p_channel);
    INSERT INTO backup.notification_deliveries AS d (event_id, channel, status, attempts, locked_until)
    VALUES (p_event, p_channel, 'pending', 1, now() + make_interval(secs => greatest(p_lease, 1)))
    ON CONFLICT (event_id, channel) DO UPDATE
       SET attempts = d.attempts + 1, locked_until = EXCLUDED.locked_until, updated_at = now()
     WHERE d.status = 'pending' AND d.next_attempt_at <= now()
       AND coalesce(d.locked_until, '-infinity') < now()
    RETURNING d.attempts INTO n;
    RETURN n;
END
$$;

-- Notifier: what became of an attempt (or, skipped, of an event the
-- channel does not take). p_status: 'sent'; 'retry' (again in p_retry_in
-- seconds); 'held' (as retry, but the attempt is not counted: a local
-- configuration error; notification_failed is raised); 'failed' (given
-- up: the alert notification_failed, about the channel, is raised);
-- 'skipped' (p_error says why). sent, retry and
-- failed act only on the claim p_attempt (notification_claim()'s answer)
-- while it is held: anything else is ignored. A sent message resolves the
-- channel's notification_failed alert. p_error is the notifier's own text
-- (never a receiver's answer); it lands in last_error and the alert's
-- details, the alert's message is fixed.
CREATE FUNCTION backup.notification_done(p_event bigint, p_channel text, p_status text,
                                         p_error text DEFAULT NULL, p_retry_in integer DEFAULT NULL,
                                         p_attempt integer DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    d backup.notification_deliveries;
    err text := left(p_error, 1000);
BEGIN
    PERFORM backup._notification_channel_check(p_channel);
    IF p_status IS NULL OR p_status NOT IN ('sent', 'retry', 'held', 'failed', 'skipped') THEN
        RAISE EXCEPTION 'unknown delivery status %', p_status USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_status = 'skipped' THEN
        INSERT INTO backup.notification_deliveries (event_id, channel, status, last_error)
        VALUES (p_event, p_channel, 'skipped', err)
        -- Only an event nobody recorded yet: a delivery seen or claimed
        -- (perhaps by another notifier) is not skipped under its holder.
        ON CONFLICT (event_id, channel) DO NOTHING;
        RETURN;
    END IF;
    IF p_attempt IS NULL THEN
        RAISE EXCEPTION 'notification_done(%) needs p_attempt, the number notification_claim() returned', p_status
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE backup.notification_deliveries x
       SET status = CASE WHEN p_status IN ('retry', 'held') THEN 'pending' ELSE p_status END,
           -- held: walshipper's own configuration failed (a secret file),
           -- not the receiver: the attempt is not counted.
           attempts = CASE WHEN p_status = 'held' THEN greatest(x.attempts - 1, 0) ELSE x.attempts END,
           last_error = err,
           next_attempt_at = now() + make_interval(secs => greatest(coalesce(p_retry_in, 0), 0)),
           locked_until = NULL,
           sent_at = CASE WHEN p_status = 'sent' THEN now() END,
           updated_at = now()
     WHERE x.event_id = p_event AND x.channel = p_channel AND x.status = 'pending'
       AND x.attempts = p_attempt AND x.locked_until IS NOT NULL
    RETURNING * INTO d;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF p_status = 'sent' THEN
        PERFORM backup._resolve_alert('notification_failed', p_channel);
    ELSIF p_status = 'held' THEN
        -- Once: an open alert about the channel is not raised again.
        PERFORM backup._raise_alert('notification_failed', 'warning', p_channel,
            format('notifications to channel %s are held: walshipper''s configuration of the channel fails', p_channel),
            jsonb_build_object('channel', p_channel, 'event_id', p_event, 'error', coalesce(err, 'unknown error')));
    ELSIF p_status = 'failed' THEN
        PERFORM backup._raise_alert('notification_failed', 'warning', p_channel,
            format('notifications to channel %s are failing: event %s given up after %s attempts',
                   p_channel, p_event, d.attempts),
            jsonb_build_object('channel', p_channel, 'event_id', p_event, 'attempts', d.attempts,
                               'error', coalesce(err, 'unknown error')));
    END IF;
END
$$;
