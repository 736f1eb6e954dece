//! The scheduler: a background worker that wakes every second, queues due
//! jobs, starts queued runs (up to pg_backup.max_concurrent), follows their
//! progress, enforces the timeout, honours cancellation, records outcomes,
//! and raises archiving and RPO alerts. Catalog work is in SQL
//! (sql/runs.sql, backup._sched_*); this loop only drives it.

use std::collections::HashMap;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;

use crate::run::{self, InfoProbe, Outcome, Run};
use crate::settings;

fn catalog_ready() -> bool {
    Spi::get_one::<bool>("SELECT to_regclass('backup.backup_executions') IS NOT NULL AND to_regprocedure('backup._sched_claim(integer)') IS NOT NULL")
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn finish(id: i64, outcome: Outcome) {
    let (status, summary, error) = match outcome {
        Outcome::Succeeded(v) => ("succeeded", Some(v.to_string()), None),
        Outcome::Failed(e) if e == "cancelled" => (
            "cancelled",
            None,
            Some("cancelled by backup_cancel()".to_string()),
        ),
        Outcome::Failed(e) => ("failed", None, Some(e)),
    };
    let r = Spi::run_with_args(
        "SELECT backup._sched_finish($1, $2, $3::jsonb, $4, $5, $6)",
        &[
            id.into(),
            status.to_string().into(),
            summary.into(),
            error.into(),
            settings::RETRY_MAX.get().into(),
            settings::RETRY_DELAY.get().into(),
        ],
    );
    if let Err(e) = r {
        log!("pg_backup scheduler: cannot record the end of run {id}: {e}");
    }
}

/// The background refresh of backup.repositories.
#[derive(Default)]
struct RepoStatus {
    probe: Option<InfoProbe>,
    last: Option<std::time::Instant>,
}

impl RepoStatus {
    fn tick(&mut self) {
        if let Some(p) = &mut self.probe {
            let result = match p.poll() {
                Some(r) => r,
                None if p.started.elapsed() > Duration::from_secs(600) => {
                    p.kill();
                    Err("walshipper info did not finish within 10 minutes".into())
                }
                None => return,
            };
            self.probe = None;
            let r = match result {
                Ok(json) => Spi::run_with_args(
                    "SELECT backup._sched_repo_status($1::jsonb)",
                    &[json.into()],
                ),
                Err(e) => {
                    Spi::run_with_args("SELECT backup._sched_repo_status(NULL, $1)", &[e.into()])
                }
            };
            if let Err(e) = r {
                log!("pg_backup scheduler: cannot record repository status: {e}");
            }
            return;
        }
        let every = settings::REPO_STATUS_INTERVAL.get();
        if every <= 0
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_secs(every as u64))
        {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let exe = settings::string(&settings::WALSHIPPER_PATH);
        let cfg = settings::string(&settings::WALSHIPPER_CONFIG);
        match InfoProbe::spawn(&exe, &cfg) {
            Ok(p) => self.probe = Some(p),
            Err(e) => {
                let _ =
                    Spi::run_with_args("SELECT backup._sched_repo_status(NULL, $1)", &[e.into()]);
            }
        }
    }

    /// Refresh soon (a backup just ended).
    fn soon(&mut self) {
        self.last = None;
    }
}

fn tick(runs: &mut HashMap<i64, Run>, status: &mut RepoStatus) {
    if !catalog_ready() {
        return;
    }
    // Follow the runs we own.
    let timeout = Duration::from_secs(settings::RUN_TIMEOUT.get().max(60) as u64);
    let ids: Vec<i64> = runs.keys().copied().collect();
    for id in ids {
        let Some(r) = runs.get_mut(&id) else { continue };
        let outcome = match r.poll() {
            Some(o) => Some(o),
            None => {
                let cancel = Spi::get_one_with_args::<bool>(
                    "SELECT backup._sched_progress($1, $2, $3)",
                    &[id.into(), r.bytes_done.into(), r.bytes_total.into()],
                )
                .ok()
                .flatten()
                .unwrap_or(false);
                if cancel {
                    r.kill();
                    Some(Outcome::Failed("cancelled".into()))
                } else if r.started.elapsed() > timeout {
                    r.kill();
                    Some(Outcome::Failed(format!(
                        "timed out after {}s (pg_backup.run_timeout)",
                        timeout.as_secs()
                    )))
                } else {
                    None
                }
            }
        };
        if let Some(o) = outcome {
            runs.remove(&id);
            finish(id, o);
            status.soon();
        }
    }
    // Queue due jobs and claim what we may start.
    let slots = (settings::MAX_CONCURRENT.get() as i64 - runs.len() as i64).max(0) as i32;
    let claimed = Spi::get_one_with_args::<String>(
        "SELECT coalesce(json_agg(c)::text, '[]') FROM backup._sched_claim($1) c",
        &[slots.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| "[]".into());
    let claimed: Vec<serde_json::Value> = serde_json::from_str(&claimed).unwrap_or_default();
    for c in claimed {
        let (Some(id), Some(kind)) = (c["execution_id"].as_i64(), c["kind"].as_str()) else {
            continue;
        };
        let exe = settings::string(&settings::WALSHIPPER_PATH);
        let cfg = settings::string(&settings::WALSHIPPER_CONFIG);
        match run::spawn(&exe, &cfg, id, kind) {
            Ok(r) => {
                runs.insert(id, r);
            }
            Err(e) => finish(id, Outcome::Failed(e)),
        }
    }
    let _ = Spi::run_with_args(
        "SELECT backup._sched_check_health($1, $2)",
        &[
            settings::RPO_TARGET.get().into(),
            settings::OVERDUE_GRACE.get().into(),
        ],
    );
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_backup_scheduler_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = settings::string(&settings::DATABASE);
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    log!("pg_backup scheduler started (database {db})");
    let stale = BackgroundWorker::transaction(|| {
        if catalog_ready() {
            Spi::get_one::<i32>("SELECT backup._sched_fail_stale()")
                .ok()
                .flatten()
                .unwrap_or(0)
        } else {
            0
        }
    });
    if stale > 0 {
        log!("pg_backup scheduler: marked {stale} interrupted run(s) failed");
    }
    let mut runs: HashMap<i64, Run> = HashMap::new();
    let mut status = RepoStatus::default();
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file is what a worker does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let mut r = std::panic::AssertUnwindSafe(&mut runs);
        let mut st = std::panic::AssertUnwindSafe(&mut status);
        BackgroundWorker::transaction(move || tick(&mut r, &mut st));
        // In a transaction of its own: the runs' bookkeeping above is
        // committed whatever happens here.
        let mut st = std::panic::AssertUnwindSafe(&mut status);
        BackgroundWorker::transaction(move || {
            if catalog_ready() {
                st.tick()
            }
        });
    }
    // Shutting down: our runs end with us.
    if let Some(p) = &mut status.probe {
        p.kill();
    }
    for (id, mut r) in runs.drain() {
        r.kill();
        BackgroundWorker::transaction(|| {
            finish(
                id,
                Outcome::Failed("stopped: the server shut down during the run".into()),
            )
        });
    }
}

/// A dynamic worker running one backup for backup_run(wait => true). Its
/// extra holds "database-oid user-oid job-id kind".
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_backup_run_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    let extra = BackgroundWorker::get_extra().to_string();
    let parts: Vec<&str> = extra.split(' ').collect();
    let [db, user, job, kind] = parts[..] else {
        log!("pg_backup run: bad worker argument {extra:?}");
        return;
    };
    let db = pg_sys::Oid::from(db.parse::<u32>().unwrap_or(0));
    let user = pg_sys::Oid::from(user.parse::<u32>().unwrap_or(0));
    let job: i64 = job.parse().unwrap_or(0);
    let kind = kind.to_string();
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), Some(user));
    let id = BackgroundWorker::transaction(|| {
        Spi::get_one_with_args::<i64>(
            "INSERT INTO backup.backup_executions (job_id, kind, status, started_at, worker_pid) \
             VALUES (nullif($1, 0), $2, 'running', now(), pg_backend_pid()) RETURNING execution_id",
            &[job.into(), kind.clone().into()],
        )
        .ok()
        .flatten()
    });
    let Some(id) = id else { return };
    let exe = settings::string(&settings::WALSHIPPER_PATH);
    let cfg = settings::string(&settings::WALSHIPPER_CONFIG);
    let timeout = Duration::from_secs(settings::RUN_TIMEOUT.get().max(60) as u64);
    let outcome = match run::spawn(&exe, &cfg, id, &kind) {
        Err(e) => Outcome::Failed(e),
        Ok(mut r) => loop {
            if let Some(o) = r.poll() {
                break o;
            }
            if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
                r.kill();
                break Outcome::Failed("stopped: the server shut down during the run".into());
            }
            let (done, total) = (r.bytes_done, r.bytes_total);
            let cancel = BackgroundWorker::transaction(|| {
                Spi::get_one_with_args::<bool>(
                    "SELECT backup._sched_progress($1, $2, $3)",
                    &[id.into(), done.into(), total.into()],
                )
                .ok()
                .flatten()
                .unwrap_or(false)
            });
            if cancel {
                r.kill();
                break Outcome::Failed("cancelled".into());
            }
            if r.started.elapsed() > timeout {
                r.kill();
                break Outcome::Failed(format!(
                    "timed out after {}s (pg_backup.run_timeout)",
                    timeout.as_secs()
                ));
            }
        },
    };
    BackgroundWorker::transaction(|| finish(id, outcome));
}
