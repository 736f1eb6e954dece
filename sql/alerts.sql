-- Alerts: one open alert per kind and subject, raised and resolved by the
-- scheduler, acknowledged by operators. NOTIFY backup_alerts carries the
-- alert id only: any role may LISTEN, so details stay in the table, which
-- only granted roles read.

CREATE FUNCTION backup._raise_alert(p_kind text, p_severity text, p_subject text, p_message text, p_details jsonb DEFAULT '{}')
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO backup.alerts (kind, severity, subject, message, details)
    VALUES (p_kind, p_severity, p_subject, p_message, p_details)
    ON CONFLICT (kind, subject) WHERE resolved_at IS NULL DO NOTHING
    RETURNING alert_id INTO new_id;
    IF new_id IS NOT NULL THEN
        PERFORM pg_notify('backup_alerts', new_id::text);
    END IF;
END
$$;

-- An alert row another transaction holds (an acknowledgement not yet
-- committed) is resolved on a later cycle: the scheduler never waits on it.
CREATE FUNCTION backup._resolve_alert(p_kind text, p_subject text)
RETURNS void LANGUAGE sql
AS $$
    UPDATE backup.alerts SET resolved_at = now()
     WHERE alert_id IN (SELECT a.alert_id FROM backup.alerts a
                         WHERE a.kind = p_kind AND a.subject = p_subject AND a.resolved_at IS NULL
                           FOR UPDATE SKIP LOCKED)
$$;

-- An operator has seen an open alert: it stays open (and keeps its
-- condition's place) until the condition clears, but is marked as handled.
CREATE FUNCTION backup.alert_ack(alert_id bigint, note text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    a backup.alerts;
BEGIN
    IF length(note) > 1000 THEN
        RAISE EXCEPTION 'the note is % characters long; at most 1000', length(note)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO a FROM backup.alerts x WHERE x.alert_id = alert_ack.alert_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no alert %', alert_id
            USING ERRCODE = 'undefined_object', HINT = 'See SELECT alert_id, kind, subject FROM backup.alerts WHERE resolved_at IS NULL.';
    END IF;
    IF a.resolved_at IS NOT NULL THEN
        RAISE EXCEPTION 'alert % is resolved: nothing to acknowledge', alert_id
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Its condition cleared; see resolved_at.';
    END IF;
    IF a.acknowledged_at IS NOT NULL THEN
        RAISE EXCEPTION 'alert % was already acknowledged by %', alert_id, a.acknowledged_by
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'See acknowledged_at in backup.alerts.';
    END IF;
    UPDATE backup.alerts x SET acknowledged_at = now(), acknowledged_by = backup._caller()
     WHERE x.alert_id = alert_ack.alert_id;
    PERFORM backup._audit('acknowledge', 'alert', alert_id::text,
        jsonb_build_object('kind', a.kind, 'subject', a.subject, 'note', note));
END
$$;
