//! The notifier: one thread per channel, each with its own catalog
//! connection, so a receiver that hangs holds up only its own channel (and
//! never the HTTP server or the scheduler, another process). Each thread
//! LISTENs on backup_notify (sql/notifications.sql) and looks at the
//! catalog at least every poll_interval; it takes its channel's events in
//! order, records a skip for what the channel does not take, claims each
//! delivery before sending it (another notifier leaves it alone) and
//! records the outcome.

use std::sync::Arc;

use postgres::fallible_iterator::FallibleIterator;
use std::time::{Duration, Instant};

use super::{route::route, send, ChannelConfig, ClusterId, Event, NotifyConfig, Outcome};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::pg::pg_err;

/// Starts the notifier: a supervising thread that runs (and joins) one
/// thread per channel.
pub fn spawn(cfg: &Config) -> Result<std::thread::JoinHandle<()>> {
    let cfg = Arc::new(cfg.clone());
    std::thread::Builder::new()
        .name("notifier".into())
        .spawn(move || {
            let mut threads = Vec::new();
            for i in 0..cfg.notify.channels.len() {
                let cfg = Arc::clone(&cfg);
                let name = cfg.notify.channels[i].name.clone();
                match std::thread::Builder::new()
                    .name(format!("notify-{name}"))
                    .spawn(move || supervised(&cfg, i))
                {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        tracing::error!(channel = %name, "cannot start the notifier thread: {e}")
                    }
                }
            }
            for t in threads {
                let _ = t.join();
            }
        })
        .map_err(|e| Error::io("cannot start the notifier thread", e))
}

/// Runs channel `i`, started again (after a pause, logged) if it panics:
/// a bug in one message's handling does not end the channel for good.
fn supervised(cfg: &Config, i: usize) {
    loop {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| channel_thread(cfg, i)));
        if run.is_ok() {
            return;
        }
        tracing::error!(
            channel = %cfg.notify.channels[i].name,
            "notifier thread panicked (a bug: please report it); started again in {} s",
            PANIC_PAUSE.as_secs()
        );
        if !nap(PANIC_PAUSE) {
            return;
        }
    }
}

const PANIC_PAUSE: Duration = Duration::from_secs(30);

/// Runs channel `i` until the service stops. On an error (the catalog
/// unreachable, a permission missing) it starts over after a pause that
/// doubles up to a minute and is reset only by a cycle that worked; the
/// first error of a series is logged with what to do.
fn channel_thread(cfg: &Config, i: usize) {
    let c = &cfg.notify.channels[i];
    let mut pause = Duration::from_secs(1);
    let mut failing = false;
    while !stopping() {
        let mut worked = false;
        if let Err(e) = run_channel(cfg, c, &mut worked) {
            if worked {
                pause = Duration::from_secs(1);
                failing = false;
            }
            if !failing {
                tracing::error!(channel = %c.name, "notifier: {e}; again in {} s{}", pause.as_secs(), hint_for(cfg, &e));
            } else {
                tracing::warn!(channel = %c.name, "notifier: still failing: {e}; again in {} s", pause.as_secs());
            }
            failing = true;
        }
        if !nap(pause) {
            break;
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }
    tracing::info!(channel = %c.name, "notifier stopped");
}

const MAX_PAUSE: Duration = Duration::from_secs(60);

/// What to do about a notifier's error, when it is a missing grant.
fn hint_for(cfg: &Config, e: &Error) -> String {
    let text = e.to_string();
    if text.contains("permission denied") || text.contains("does not exist") {
        let role = crate::catalog::target(cfg).user.replace('\'', "''");
        format!(
            " (hint: the notifier's role needs the notifier's grants: as the catalog's owner, SELECT backup.grant_notifier('{role}'))"
        )
    } else {
        String::new()
    }
}

/// True once `walshipper serve` is shutting down (SIGTERM, SIGINT).
fn stopping() -> bool {
    crate::serve::stopping()
}

/// Sleeps `d` in slices of at most a second; false when the service is
/// stopping (then it returns at once).
fn nap(d: Duration) -> bool {
    let end = Instant::now() + d;
    loop {
        if stopping() {
            return false;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(SLICE));
    }
}

/// The least time between two looks at the catalog that a NOTIFY woke.
const MIN_CYCLE: Duration = Duration::from_millis(200);

/// How long a wait goes without looking at serve::stopping().
const SLICE: Duration = Duration::from_secs(1);

/// Waits for the notifier `walshipper serve` started to stop (after
/// serve::stopping() turned true) at most `bound`: a channel thread ends
/// after the attempt in hand (at most its timeout). False when it did not.
pub fn join(handle: std::thread::JoinHandle<()>, bound: Duration) -> bool {
    let end = Instant::now() + bound;
    while !handle.is_finished() {
        if Instant::now() >= end {
            tracing::warn!(
                "notifier: still sending after {} s; not waiting for it",
                bound.as_secs()
            );
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    handle.join().is_ok()
}

/// Sets `worked` once a cycle went through (the error backoff resets).
fn run_channel(cfg: &Config, c: &ChannelConfig, worked: &mut bool) -> Result<()> {
    let mut client = crate::catalog::connect(cfg)?;
    // catalog::connect set a statement_timeout: a lock held on the catalog
    // does not stall this thread for ever.
    let setup = "SET application_name = 'walshipper notifier'; LISTEN backup_notify";
    client.batch_execute(setup).map_err(pg_err(setup))?;
    let mut cluster = ClusterId::local(cfg);
    // Readable by members of pg_monitor and superusers; without it, the
    // message names the host and database only.
    let sysid = "SELECT system_identifier::text FROM pg_control_system()";
    match client.query_one(sysid, &[]) {
        Ok(r) => cluster.system_identifier = r.get(0),
        Err(_) => {
            client
                .batch_execute("ROLLBACK")
                .map_err(pg_err("ROLLBACK"))?;
        }
    }
    tracing::info!(channel = %c.name, "notifier: {} ready", super::describe(c));
    let mut limited = false;
    while !stopping() {
        let started = Instant::now();
        let wait = cycle(&cfg.notify, c, &mut client, &cluster, &mut limited)?;
        *worked = true;
        if wait.is_zero() {
            continue;
        }
        // Woken by a new event, or the poll interval passes; a second at a
        // time, so a shutdown is seen.
        let end = Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || stopping() {
                break;
            }
            let mut n = client.notifications();
            let woken = n
                .timeout_iter(left.min(SLICE))
                .next()
                .map_err(pg_err("waiting for backup_notify"))?;
            if woken.is_some() {
                // Several events at once need one look.
                let mut more = n.iter();
                while more.next().map_err(pg_err("backup_notify"))?.is_some() {}
                // Any role may NOTIFY backup_notify: a loop of them gets
                // at most one look at the catalog per MIN_CYCLE.
                let since = started.elapsed();
                if since < MIN_CYCLE {
                    std::thread::sleep(MIN_CYCLE - since);
                }
                break;
            }
        }
    }
    Ok(())
}

fn ts(v: Option<f64>) -> Option<chrono::DateTime<chrono::Utc>> {
    v.and_then(|s| chrono::DateTime::from_timestamp_micros((s * 1e6).round() as i64))
}

const PENDING: &str =
    "SELECT event_id, event, alert_id, kind, severity, subject, job, message, hint, \
     details::text, extract(epoch FROM created_at)::float8, extract(epoch FROM raised_at)::float8, \
     extract(epoch FROM resolved_at)::float8, attempts, ready, seen, \
     extract(epoch FROM ready_at - now())::float8 \
     FROM backup.notification_pending($1, $2)";
const BATCH: i32 = 50;

/// One look at the channel's pending events. Returns how long to wait
/// before the next look.
fn cycle(
    n: &NotifyConfig,
    c: &ChannelConfig,
    client: &mut postgres::Client,
    cluster: &ClusterId,
    limited: &mut bool,
) -> Result<Duration> {
    let poll = Duration::from_secs(n.poll_interval);
    let rows = client
        .query(PENDING, &[&c.name, &BATCH])
        .map_err(pg_err("backup.notification_pending"))?;
    let limit = n.rate_limit_of(c) as i64;
    let mut sent_last_hour: i64 = if limit > 0 {
        let q = "SELECT backup.notification_sent_last_hour($1)";
        client.query_one(q, &[&c.name]).map_err(pg_err(q))?.get(0)
    } else {
        0
    };
    let timeout = n.timeout_of(c);
    // Longer than one attempt can take (an e-mail gives up after
    // email::TOTAL timeouts, a webhook after one).
    let lease = (timeout.as_secs() * u64::from(super::email::TOTAL) + 30) as i32;
    let full = rows.len() as i32 == BATCH;
    for row in &rows {
        if stopping() {
            // Nothing claimed yet: the next notifier takes it from here.
            return Ok(poll);
        }
        let ev = Event {
            event_id: row.get(0),
            event: row.get(1),
            alert_id: row.get(2),
            kind: row.get(3),
            severity: row.get(4),
            subject: row.get(5),
            job: row.get(6),
            message: row.get(7),
            hint: row.get(8),
            details: serde_json::from_str(row.get::<_, &str>(9)).unwrap_or_default(),
            created_at: ts(row.get(10)).unwrap_or_else(chrono::Utc::now),
            raised_at: ts(row.get(11)),
            resolved_at: ts(row.get(12)),
        };
        let ready: bool = row.get(14);
        let seen: bool = row.get(15);
        if !seen {
            let age = (chrono::Utc::now() - ev.created_at).num_seconds();
            if age > n.max_age as i64 {
                done(
                    client,
                    &ev,
                    c,
                    "skipped",
                    &format!(
                        "{age} s old when the notifier first saw it, over notify.max_age ({} s): not sent",
                        n.max_age
                    ),
                    0,
                    None,
                )?;
                continue;
            }
            if let Err(why) = route(c, &ev) {
                done(
                    client,
                    &ev,
                    c,
                    "skipped",
                    &format!("not routed here: {why}"),
                    0,
                    None,
                )?;
                continue;
            }
            // Seen now: however long it waits (rate limit, an earlier
            // message retried), max_age no longer applies to it.
            let q = "SELECT backup.notification_seen($1, $2)";
            client
                .execute(q, &[&ev.event_id, &c.name])
                .map_err(pg_err(q))?;
        }
        if !ready {
            // Waiting for its next attempt (or another notifier has it):
            // later events wait too, so they arrive in order.
            let until: Option<f64> = row.get(16);
            let secs = until.unwrap_or(1.0).clamp(0.2, n.poll_interval as f64);
            return Ok(Duration::from_secs_f64(secs));
        }
        if limit > 0 && sent_last_hour >= limit {
            // Said once when the limit is reached, not at every look.
            if !*limited {
                tracing::warn!(
                    channel = %c.name,
                    "notifier: {limit} messages sent in the last hour, the channel's rate_limit: the next wait (in order)"
                );
            }
            *limited = true;
            return Ok(poll);
        }
        if *limited {
            tracing::info!(channel = %c.name, "notifier: under the rate_limit again");
            *limited = false;
        }
        let claim = "SELECT backup.notification_claim($1, $2, $3)";
        let attempt: Option<i32> = client
            .query_one(claim, &[&ev.event_id, &c.name, &lease])
            .map_err(pg_err(claim))?
            .get(0);
        let Some(attempt) = attempt else {
            // Another notifier took it meanwhile.
            return Ok(Duration::from_secs(1));
        };
        // The claim's token: notification_done() ignores us if the lease
        // ran out and another notifier claimed it again.
        let token = Some(attempt);
        let attempt = attempt.max(1) as u32;
        match send(n, c, &ev, cluster, attempt) {
            Outcome::Sent => {
                tracing::info!(channel = %c.name, event_id = ev.event_id, kind = %ev.kind,
                               event = %ev.event, attempt, "notification sent");
                done(client, &ev, c, "sent", "", 0, token)?;
                sent_last_hour += 1;
            }
            Outcome::Retry(e, asked) if attempt < n.max_attempts => {
                // The receiver's Retry-After, when it said one.
                let after = asked.unwrap_or_else(|| n.backoff(attempt));
                tracing::warn!(channel = %c.name, event_id = ev.event_id, attempt,
                               "notification not delivered, again in {after} s: {e}");
                done(client, &ev, c, "retry", &e, after, token)?;
                return Ok(Duration::from_secs(after.max(1)).min(poll));
            }
            Outcome::Held(e) => {
                let after = n.retry_backoff.max(n.poll_interval);
                tracing::error!(channel = %c.name, event_id = ev.event_id,
                                "notification held (walshipper's configuration), again in {after} s: {e}");
                done(client, &ev, c, "held", &e, after, token)?;
                return Ok(Duration::from_secs(after.max(1)).min(poll));
            }
            Outcome::Retry(e, _) | Outcome::Fail(e) => {
                tracing::error!(channel = %c.name, event_id = ev.event_id, attempt,
                                "notification given up: {e}");
                done(client, &ev, c, "failed", &e, 0, token)?;
            }
        }
    }
    Ok(if full { Duration::ZERO } else { poll })
}

#[allow(clippy::too_many_arguments)]
fn done(
    client: &mut postgres::Client,
    ev: &Event,
    c: &ChannelConfig,
    status: &str,
    error: &str,
    retry_in: u64,
    attempt: Option<i32>,
) -> Result<()> {
    let q = "SELECT backup.notification_done($1, $2, $3, $4, $5, $6)";
    let error = (!error.is_empty()).then(|| super::clean(error, 1000));
    let retry_in = retry_in.min(86400) as i32;
    client
        .execute(
            q,
            &[&ev.event_id, &c.name, &status, &error, &retry_in, &attempt],
        )
        .map_err(pg_err(q))?;
    Ok(())
}
