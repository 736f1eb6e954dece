//! The streaming WAL receiver, supervised by the scheduler: while
//! pg_backup.wal_streaming is on, `walshipper wal-receive` (with `WALSHIPPER_STREAM_SLOT` set to the slot) runs
//! as the scheduler's child (argument vector, no shell; it dies with the
//! scheduler), is restarted with backoff when it exits, and its state is
//! recorded in backup.wal_receiver only when it changes (an idle server
//! writes no WAL for it). Lag and the slot are read live by
//! backup.wal_archive_status; alerts by backup._stream_check every cycle.

use std::process::Child;
use std::time::{Duration, Instant};

use pgrx::prelude::*;

use crate::run;
use crate::settings;

/// The first pause after an exit, doubled on each quick exit up to MAX_BACKOFF.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A receiver that ran this long before exiting restarts after MIN_BACKOFF;
/// one that has streamed this long since its last start is up again for
/// the alerts and the RPO estimate (backup._stream_check's down_since).
const STABLE: Duration = Duration::from_secs(60);
/// How long a receiver asked to stop (SIGTERM) may take before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

struct Running {
    child: Child,
    slot: String,
    started: Instant,
    /// The last lines it wrote to stderr (its log), for the exit's reason.
    tail: run::Tail,
    stopping: Option<Instant>,
}

#[derive(Default)]
pub struct Receiver {
    running: Option<Running>,
    next_start: Option<Instant>,
    backoff: Option<Duration>,
    /// The state last written to backup.wal_receiver (None: not yet this
    /// scheduler's life, or the row no longer says it).
    reported: Option<&'static str>,
    /// pg_backup.walshipper_path and walshipper_config of the last start
    /// that failed or exited unasked: changed, the next start is at once.
    failed_with: Option<(String, String)>,
}

impl Receiver {
    /// One scheduler cycle, in a transaction: start, watch, stop the
    /// receiver as the settings ask, then raise or resolve its alerts.
    pub fn tick(&mut self) {
        let on = settings::WAL_STREAMING.get();
        // walshipper's default, as backup.wal_archive_status shows it.
        let slot = Some(settings::string(&settings::STREAM_SLOT))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "walshipper".into());
        self.check_reported();
        let mut ended = None;
        if let Some(r) = &mut self.running {
            match r.child.try_wait() {
                Ok(None) => {
                    if (!on || r.slot != slot) && r.stopping.is_none() {
                        signal(&r.child, libc::SIGTERM);
                        r.stopping = Some(Instant::now());
                    }
                    if r.stopping.is_some_and(|t| t.elapsed() > STOP_GRACE) {
                        let _ = r.child.kill();
                    }
                }
                Ok(Some(status)) => ended = Some(Some(status)),
                Err(e) => {
                    log!("pg_backup: cannot wait for the WAL receiver: {e}");
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    ended = Some(None);
                }
            }
        }
        if let Some(status) = ended {
            self.exited(status, on);
        }
        if self.running.is_none() && self.failed_with.is_some() {
            let now = (
                settings::string(&settings::WALSHIPPER_PATH),
                settings::string(&settings::WALSHIPPER_CONFIG),
            );
            if self.failed_with.as_ref() != Some(&now) {
                // Fixed by the operator: no need to wait out the backoff.
                self.failed_with = None;
                self.next_start = None;
                self.backoff = None;
            }
        }
        if let Some(r) = &self.running {
            if self.reported.is_none() && r.stopping.is_none() {
                // The row was re-created (DROP and CREATE EXTENSION) or
                // changed behind our back: say again what runs.
                let pid = i32::try_from(r.child.id()).ok();
                self.report("running", pid, None, None);
            }
        }
        if self.running.is_none() {
            if on && self.next_start.is_none_or(|t| Instant::now() >= t) {
                self.start(&slot);
            } else if !on {
                self.next_start = None;
                self.backoff = None;
                self.report("off", None, None, None);
            }
        }
        if let Err(e) = Spi::run_with_args(
            "SELECT backup._stream_check($1, $2, $3, $4, $5)",
            &[
                on.into(),
                slot.into(),
                settings::STREAM_DOWN_ALERT.get().into(),
                settings::STREAM_LAG_ALERT.get().into(),
                (STABLE.as_secs() as i32).into(),
            ],
        ) {
            log!("pg_backup: cannot check the WAL receiver's health: {e}");
        }
    }

    fn start(&mut self, slot: &str) {
        let exe = settings::string(&settings::WALSHIPPER_PATH);
        let cfg = settings::string(&settings::WALSHIPPER_CONFIG);
        match run::spawn_receiver(&exe, &cfg, slot) {
            Ok((child, tail)) => {
                let pid = i32::try_from(child.id()).ok();
                log!(
                    "pg_backup: WAL receiver started (pid {}, slot {slot})",
                    child.id()
                );
                self.running = Some(Running {
                    child,
                    slot: slot.to_string(),
                    started: Instant::now(),
                    tail,
                    stopping: None,
                });
                self.reported = None; // a new pid is always written
                self.report("running", pid, None, None);
            }
            Err(e) => {
                let wait = self.next_backoff(Duration::ZERO);
                log!(
                    "pg_backup: cannot start the WAL receiver: {e}; next attempt in {} s",
                    wait.as_secs()
                );
                self.failed_with = Some((exe, cfg));
                self.report("restarting", None, Some(e), Some(wait));
            }
        }
    }

    /// The receiver ended (`status` None: it could not be waited for).
    fn exited(&mut self, status: Option<std::process::ExitStatus>, on: bool) {
        let Some(r) = self.running.take() else { return };
        let asked = r.stopping.is_some();
        let lines: Vec<String> = r
            .tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        let how = match status.and_then(|s| s.code()) {
            Some(c) => format!("exited with status {c}"),
            None => "was killed by a signal".to_string(),
        };
        let last = lines.last().map(|l| run::clean(l)).unwrap_or_default();
        let reason = if last.is_empty() {
            format!("walshipper wal-receive {how}")
        } else {
            format!("walshipper wal-receive {how}: {last}")
        };
        if asked {
            log!("pg_backup: WAL receiver stopped ({how})");
        } else {
            log!("pg_backup: {reason}");
            for l in &lines {
                log!("pg_backup: WAL receiver: {}", run::clean(l));
            }
        }
        if !on {
            self.report("off", None, None, None);
            return;
        }
        if asked {
            // Stopped to restart with another slot: at once.
            self.next_start = None;
            return;
        }
        let wait = self.next_backoff(r.started.elapsed());
        self.failed_with = Some((
            settings::string(&settings::WALSHIPPER_PATH),
            settings::string(&settings::WALSHIPPER_CONFIG),
        ));
        self.report("restarting", None, Some(reason), Some(wait));
    }

    /// Forgets what was reported when backup.wal_receiver no longer says it
    /// (a fresh row after DROP and CREATE EXTENSION), so that it is written
    /// again.
    fn check_reported(&mut self) {
        let Some(reported) = self.reported else {
            return;
        };
        let ours = self
            .running
            .as_ref()
            .and_then(|r| i32::try_from(r.child.id()).ok());
        let row =
            Spi::get_two::<String, i32>("SELECT state, pid FROM backup.wal_receiver WHERE id = 1");
        let same = match row {
            Ok((Some(state), pid)) => state == reported && (reported != "running" || pid == ours),
            _ => false,
        };
        if !same {
            self.reported = None;
        }
    }

    /// The extension is not installed (dropped, or not yet created): the
    /// receiver is stopped (SIGTERM, then SIGKILL after STOP_GRACE) and
    /// reaped, and everything is reported afresh once the catalog is back.
    pub fn absent(&mut self) {
        self.reported = None;
        self.next_start = None;
        self.backoff = None;
        self.failed_with = None;
        let Some(r) = &mut self.running else { return };
        match r.child.try_wait() {
            Ok(None) => {
                if r.stopping.is_none() {
                    log!("pg_backup: the extension is not installed: stopping the WAL receiver");
                    signal(&r.child, libc::SIGTERM);
                    r.stopping = Some(Instant::now());
                } else if r.stopping.is_some_and(|t| t.elapsed() > STOP_GRACE) {
                    let _ = r.child.kill();
                }
            }
            Ok(Some(_)) => self.running = None,
            Err(_) => {
                let _ = r.child.kill();
                let _ = r.child.wait();
                self.running = None;
            }
        }
    }

    /// The pause before the next start after a run of `ran`; sets next_start.
    fn next_backoff(&mut self, ran: Duration) -> Duration {
        let wait = match self.backoff {
            Some(b) if ran < STABLE => (b * 2).min(MAX_BACKOFF),
            _ => MIN_BACKOFF,
        };
        self.backoff = Some(wait);
        self.next_start = Some(Instant::now() + wait);
        wait
    }

    fn report(
        &mut self,
        state: &'static str,
        pid: Option<i32>,
        error: Option<String>,
        wait: Option<Duration>,
    ) {
        if self.reported == Some(state) && error.is_none() {
            return;
        }
        let next = wait.map(|w| w.as_secs_f64());
        match Spi::run_with_args(
            "SELECT backup._stream_report($1, $2, $3, now() + make_interval(secs => $4))",
            &[state.into(), pid.into(), error.into(), next.into()],
        ) {
            Ok(()) => self.reported = Some(state),
            Err(e) => log!("pg_backup: cannot record the WAL receiver's state: {e}"),
        }
    }

    /// The scheduler is stopping: so is the receiver.
    pub fn stop(&mut self) {
        if let Some(mut r) = self.running.take() {
            signal(&r.child, libc::SIGTERM);
            let until = Instant::now() + STOP_GRACE;
            while Instant::now() < until {
                if let Ok(Some(_)) = r.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

fn signal(child: &Child, sig: i32) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: our own child, not yet reaped (try_wait has not returned
        // its status), so the pid is still its.
        unsafe { libc::kill(pid, sig) };
    }
}
