-- Streaming WAL: the scheduler (src/stream.rs) runs `walshipper
-- wal-receive` while pg_backup.wal_streaming is on, records its state
-- here when it changes, and raises the alerts below every cycle (they
-- write nothing while nothing changes).

-- The receiver's new state: 'running' (pid), 'restarting' (it exited with
-- p_error; next attempt at p_next_start) or 'off'.
CREATE FUNCTION backup._stream_report(p_state text, p_pid integer, p_error text, p_next_start timestamptz)
RETURNS void LANGUAGE sql
AS $$
    UPDATE backup.wal_receiver SET
        state = p_state,
        since = CASE WHEN state = p_state THEN since ELSE now() END,
        down_since = CASE WHEN p_state = 'off' THEN NULL
                          WHEN p_state = 'restarting' THEN coalesce(down_since, now())
                          ELSE down_since END,
        pid = CASE WHEN p_state = 'running' THEN p_pid END,
        started_at = CASE WHEN p_state = 'running' THEN now() ELSE started_at END,
        restarts = restarts + CASE WHEN p_state = 'running' AND last_exit_at IS NOT NULL AND state = 'restarting' THEN 1 ELSE 0 END,
        last_exit_at = CASE WHEN p_state = 'restarting' THEN now() ELSE last_exit_at END,
        last_error = CASE WHEN p_state = 'restarting' THEN left(p_error, 2000) ELSE last_error END,
        next_start_at = CASE WHEN p_state = 'restarting' THEN p_next_start END
     WHERE id = 1
$$;

-- Alerts: wal_receiver_down (streaming on, and the receiver has not
-- streamed steadily for p_down_secs: not running, its slot not in use, or
-- in a crash loop: restarted after exits that began more than p_down_secs
-- before its start, and not yet streaming for p_stable_secs) and
-- wal_stream_lagging (a warning when the receiver's slot, or any other
-- physical slot no one is connected to, holds back more than p_lag_mb MB
-- of WAL: raised whether or not streaming is on, since a forgotten slot
-- pins WAL until the disk fills; critical when a slot is about to lose or
-- has lost WAL past max_slot_wal_keep_size).
CREATE FUNCTION backup._stream_check(p_streaming boolean, p_slot text, p_down_secs integer, p_lag_mb integer, p_stable_secs integer)
RETURNS void LANGUAGE plpgsql
AS $$
DECLARE
    r backup.wal_receiver;
    sl record;
    retained numeric;
    down_for interval;
BEGIN
    SELECT * INTO r FROM backup.wal_receiver WHERE id = 1;
    SELECT s.active, s.restart_lsn, s.wal_status INTO sl FROM pg_replication_slots s WHERE s.slot_name = p_slot;
    IF p_streaming THEN
        IF r.state = 'running' AND sl.active AND r.down_since IS NOT NULL
           AND now() - r.started_at >= make_interval(secs => p_stable_secs) THEN
            -- Streamed steadily since its last start: up again. Written
            -- once, when it changes.
            UPDATE backup.wal_receiver SET down_since = NULL WHERE id = 1;
            r.down_since := NULL;
        END IF;
        -- Streaming now after exits: down for as long as it took to get
        -- here (started_at - down_since), so that one exit restarted at
        -- once raises nothing while a crash loop, whose backoff keeps
        -- growing, does.
        down_for := CASE
            WHEN r.state <> 'running' THEN now() - coalesce(r.down_since, r.since)
            WHEN sl IS NULL OR NOT sl.active THEN now() - coalesce(r.down_since, greatest(r.since, r.started_at))
            ELSE r.started_at - r.down_since
        END;
        IF down_for > make_interval(secs => p_down_secs) THEN
            PERFORM backup._raise_alert('wal_receiver_down', 'critical', p_slot,
                format('the WAL receiver has not streamed steadily for %s (%s): WAL reaches the repository only through archive_command meanwhile',
                       date_trunc('second', down_for),
                       CASE WHEN r.state = 'running' AND (sl IS NULL OR NOT sl.active)
                                THEN 'running, but replication slot ' || p_slot || ' is not in use'
                            WHEN r.state = 'running'
                                THEN format('it keeps exiting: %s restarts, exiting since %s, streaming again for %s, not yet %s s; last error: %s',
                                            r.restarts, date_trunc('second', r.down_since),
                                            date_trunc('second', now() - r.started_at), p_stable_secs,
                                            coalesce(r.last_error, 'none'))
                            ELSE coalesce('last error: ' || r.last_error, 'not started') END),
                jsonb_build_object('state', r.state, 'restarts', r.restarts, 'last_error', r.last_error,
                                   'down_since', r.down_since));
        ELSE
            PERFORM backup._resolve_alert('wal_receiver_down', p_slot);
        END IF;
    ELSE
        PERFORM backup._resolve_alert('wal_receiver_down', p_slot);
    END IF;
    -- An alert about a slot streaming no longer uses (stream_slot renamed):
    -- that receiver is not down.
    PERFORM backup._resolve_alert('wal_receiver_down', a.subject)
       FROM backup.alerts a
      WHERE a.kind = 'wal_receiver_down' AND a.resolved_at IS NULL AND a.subject <> p_slot;
    -- Slots pinning WAL: the receiver's, and every other physical slot no
    -- one is connected to (the one stream_slot named before it was
    -- renamed, a standby gone): each keeps WAL until the disk fills, or,
    -- past max_slot_wal_keep_size, loses it.
    FOR sl IN SELECT s.slot_name, s.active, s.restart_lsn, s.wal_status
                FROM pg_replication_slots s
               WHERE s.slot_type = 'physical' AND (s.slot_name = p_slot OR NOT s.active)
    LOOP
        retained := CASE WHEN sl.restart_lsn IS NOT NULL AND NOT pg_is_in_recovery()
                         THEN pg_current_wal_lsn() - sl.restart_lsn END;
        IF sl.wal_status IN ('unreserved', 'lost') THEN
            -- Worse than lagging: a warning already open is replaced by a
            -- critical one (and notified again).
            UPDATE backup.alerts SET resolved_at = now()
             WHERE kind = 'wal_stream_lagging' AND subject = sl.slot_name
               AND resolved_at IS NULL AND severity <> 'critical';
            PERFORM backup._raise_alert('wal_stream_lagging', 'critical', sl.slot_name,
                format('replication slot %s %s (wal_status %s, beyond max_slot_wal_keep_size)%s',
                       sl.slot_name,
                       CASE WHEN sl.wal_status = 'lost'
                            THEN 'lost WAL it had not received: that WAL reached the repository only if archive_command archived it; the receiver cannot resume from this slot (drop it: it is created again)'
                            ELSE 'is about to lose WAL it has not received' END,
                       sl.wal_status,
                       CASE WHEN sl.slot_name <> p_slot THEN format('; it is not pg_backup.stream_slot (%s)', p_slot) ELSE '' END),
                jsonb_build_object('retained_bytes', retained, 'wal_status', sl.wal_status, 'active', sl.active));
        ELSIF retained > p_lag_mb::numeric * 1024 * 1024 THEN
            PERFORM backup._raise_alert('wal_stream_lagging', 'warning', sl.slot_name,
                format('replication slot %s holds back %s of WAL%s (above pg_backup.stream_lag_alert = %s MB)%s',
                       sl.slot_name, pg_size_pretty(retained),
                       CASE WHEN sl.slot_name = p_slot THEN ' not yet in the repository' ELSE '' END,
                       p_lag_mb,
                       CASE WHEN sl.slot_name <> p_slot
                                THEN format('; no one is connected to it and it is not pg_backup.stream_slot (%s): drop it with pg_drop_replication_slot(%L) if no standby or receiver needs it', p_slot, sl.slot_name)
                            WHEN NOT p_streaming THEN format('; streaming is off: drop the slot with pg_drop_replication_slot(%L) if it is no longer used', sl.slot_name)
                            WHEN NOT sl.active THEN '; the receiver is not connected'
                            ELSE '' END),
                jsonb_build_object('retained_bytes', retained, 'wal_status', sl.wal_status, 'active', sl.active));
        ELSE
            PERFORM backup._resolve_alert('wal_stream_lagging', sl.slot_name);
        END IF;
    END LOOP;
    -- Slots dropped, or in use again by a standby: nothing to say about them.
    PERFORM backup._resolve_alert('wal_stream_lagging', a.subject)
       FROM backup.alerts a
      WHERE a.kind = 'wal_stream_lagging' AND a.resolved_at IS NULL
        AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s
                         WHERE s.slot_name = a.subject AND s.slot_type = 'physical'
                           AND (s.slot_name = p_slot OR NOT s.active));
END
$$;
