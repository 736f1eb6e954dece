//! pg_backup_ext: the control plane of pg_backup inside PostgreSQL.
//!
//! Thin by design: the catalog (sql/catalog.sql), SQL entry points
//! (sql/jobs.sql and the functions below) and, later, scheduling live here;
//! every byte of backup data is handled by the `walshipper` binary, which
//! this extension launches and never links.

use pgrx::prelude::*;

pub mod run;
pub mod schedule;
pub mod settings;
pub mod worker;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../../sql/catalog.sql", name = "catalog", bootstrap);
extension_sql_file!(
    "../../sql/jobs.sql",
    name = "jobs",
    requires = [cron_next_epoch, cron_check]
);
extension_sql_file!(
    "../../sql/runs.sql",
    name = "runs",
    requires = ["jobs", _run_in_worker],
    finalize
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::define_runtime();
    // SAFETY: reading a flag PostgreSQL sets while loading preloaded libraries.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    settings::define_postmaster();
    pgrx::bgworkers::BackgroundWorkerBuilder::new("pg_backup scheduler")
        .set_function("pg_backup_scheduler_main")
        .set_library("pg_backup_ext")
        .enable_spi_access()
        // Its database may not exist yet at first start: try again soon.
        .set_restart_time(Some(std::time::Duration::from_secs(5)))
        .load();
}

/// Runs a backup now in a background worker of its own and waits for it
/// (backup_run(wait => true)). The worker records the run in its own
/// transactions, so the outcome stays in backup.backup_executions even when
/// the caller's transaction ends in an error. Returns the execution id.
#[pg_extern]
fn _run_in_worker(job_id: Option<i64>, kind: &str) -> i64 {
    // SAFETY: reading the backend's own identity.
    let (db, user, me) = unsafe { (pg_sys::MyDatabaseId, pg_sys::GetUserId(), pg_sys::MyProcPid) };
    let extra = format!(
        "{} {} {} {kind}",
        u32::from(db),
        u32::from(user),
        job_id.unwrap_or(0)
    );
    let worker = pgrx::bgworkers::BackgroundWorkerBuilder::new("pg_backup run")
        .set_function("pg_backup_run_main")
        .set_library("pg_backup_ext")
        .enable_spi_access()
        .set_extra(&extra)
        .set_notify_pid(me)
        .load_dynamic()
        .unwrap_or_else(|_| {
            raise(schedule::ScheduleError {
                message: "could not start a background worker for the backup".into(),
                hint: "Raise max_worker_processes, or use backup_run() without wait and let the scheduler run it.".into(),
            })
        });
    let pid = match worker.wait_for_startup() {
        Ok(pid) => pid,
        Err(_) => raise(schedule::ScheduleError {
            message: "the backup worker did not start".into(),
            hint: "See the server log.".into(),
        }),
    };
    let _ = worker.wait_for_shutdown();
    Spi::get_one_with_args::<i64>(
        "SELECT execution_id FROM backup.backup_executions WHERE worker_pid = $1 ORDER BY execution_id DESC LIMIT 1",
        &[(pid as i32).into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        raise(schedule::ScheduleError {
            message: "the backup worker ended without recording a run".into(),
            hint: "Another run of this job may have started at the same moment; see backup.running_backups and the server log.".into(),
        })
    })
}

/// The extension's version, e.g. `SELECT backup.version();`
#[pg_extern(immutable, parallel_safe)]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Raises an SQL error with a hint (never returns).
fn raise(e: schedule::ScheduleError) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        e.message,
        "pg_backup_ext",
    )
    .set_hint(e.hint)
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// Seconds since the Unix epoch of the next time `schedule` fires after
/// `after_epoch`, evaluated in `timezone`. SQL callers use the wrapper
/// backup.cron_next(schedule, timezone, after timestamptz).
#[pg_extern(immutable, parallel_safe)]
fn cron_next_epoch(schedule: &str, timezone: &str, after_epoch: f64) -> f64 {
    if !after_epoch.is_finite() {
        raise(schedule::ScheduleError {
            message: "cron_next needs a finite time".into(),
            hint: "Pass now() or a timestamp.".into(),
        })
    }
    let after = chrono::DateTime::from_timestamp(after_epoch.floor() as i64, 0).unwrap_or_default();
    match schedule::next_run(schedule, timezone, after) {
        Ok(next) => next.timestamp() as f64,
        Err(e) => raise(e),
    }
}

/// Checks a schedule and time zone; raises the same errors as cron_next.
#[pg_extern(immutable, parallel_safe)]
fn cron_check(schedule: &str, timezone: &str) -> bool {
    if let Err(e) = schedule::parse_cron(schedule) {
        raise(e)
    }
    if let Err(e) = schedule::parse_tz(timezone) {
        raise(e)
    }
    true
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn version_is_reported() {
        let v = Spi::get_one::<&str>("SELECT backup.version()");
        assert_eq!(v, Ok(Some(env!("CARGO_PKG_VERSION"))));
    }

    fn one(sql: &str) -> Option<String> {
        Spi::get_one::<String>(sql).expect("query")
    }

    /// The scheduler's catalog logic, as the worker drives it.
    #[pg_test]
    fn scheduler_queues_due_jobs_once_and_claims_them() {
        Spi::run("SELECT backup.job_create('due', '* * * * *')").expect("create");
        Spi::run("UPDATE backup.backup_jobs SET next_run_at = now() - interval '1 minute'")
            .expect("due");
        let claimed =
            one("SELECT json_agg(c)::text FROM backup._sched_claim(1) c").unwrap_or_default();
        assert!(claimed.contains("\"kind\":\"full\""), "{claimed}");
        assert_eq!(
            one("SELECT status FROM backup.backup_executions"),
            Some("running".into())
        );
        // Due again while it runs: no second run is queued.
        Spi::run("UPDATE backup.backup_jobs SET next_run_at = now() - interval '1 minute'")
            .expect("due");
        Spi::run("SELECT * FROM backup._sched_claim(1)").expect("claim");
        assert_eq!(
            one("SELECT count(*)::text FROM backup.backup_executions"),
            Some("1".into())
        );
        assert_eq!(
            one("SELECT (next_run_at > now())::text FROM backup.backup_jobs"),
            Some("true".into())
        );
    }

    #[pg_test]
    fn failures_alert_retry_and_success_resolves() {
        Spi::run("SELECT backup.job_create('flaky', '0 3 * * *')").expect("create");
        Spi::run("INSERT INTO backup.backup_executions (job_id, kind, status, started_at) SELECT job_id, 'full', 'running', now() FROM backup.backup_jobs").expect("run");
        Spi::run("SELECT backup._sched_finish((SELECT max(execution_id) FROM backup.backup_executions), 'failed', NULL, 'disk full', 1, 60)").expect("finish");
        assert_eq!(
            one("SELECT kind FROM backup.alerts WHERE resolved_at IS NULL"),
            Some("backup_failed".into())
        );
        // One retry, not before the delay.
        assert_eq!(
            one("SELECT attempt || ' ' || (not_before > now() + interval '50 seconds') FROM backup.backup_executions WHERE status = 'queued'"),
            Some("2 true".into())
        );
        assert_eq!(
            one("SELECT count(*)::text FROM backup._sched_claim(1)"),
            Some("0".into())
        );
        Spi::run("UPDATE backup.backup_executions SET not_before = now() WHERE status = 'queued'")
            .expect("now");
        Spi::run("SELECT * FROM backup._sched_claim(1)").expect("claim");
        Spi::run("SELECT backup._sched_finish((SELECT max(execution_id) FROM backup.backup_executions), 'failed', NULL, 'disk full', 1, 60)").expect("finish");
        // attempt 2 of max 1 retry: no third attempt; still one open alert.
        assert_eq!(
            one("SELECT count(*)::text FROM backup.backup_executions"),
            Some("2".into())
        );
        assert_eq!(
            one("SELECT count(*)::text FROM backup.alerts WHERE resolved_at IS NULL"),
            Some("1".into())
        );
        Spi::run("INSERT INTO backup.backup_executions (job_id, kind, status, started_at) SELECT job_id, 'full', 'running', now() FROM backup.backup_jobs").expect("run");
        Spi::run("SELECT backup._sched_finish((SELECT max(execution_id) FROM backup.backup_executions), 'succeeded', '{\"backup_id\":\"b1\",\"start_lsn\":\"0/1\",\"stop_lsn\":\"0/2\",\"size\":10,\"stored_size\":5,\"timeline\":1}', NULL, 1, 60)").expect("finish");
        assert_eq!(
            one("SELECT count(*)::text FROM backup.alerts WHERE resolved_at IS NULL"),
            Some("0".into())
        );
        assert_eq!(
            one("SELECT health FROM backup.job_status"),
            Some("ok".into())
        );
    }

    #[pg_test]
    fn overdue_jobs_raise_an_alert() {
        Spi::run("SELECT backup.job_create('hourly', '0 * * * *')").expect("create");
        Spi::run("UPDATE backup.backup_jobs SET created_at = now() - interval '1 day'")
            .expect("age");
        Spi::run("SELECT backup._sched_check_health(900, 60)").expect("check");
        assert_eq!(
            one("SELECT subject FROM backup.alerts WHERE kind = 'job_overdue'"),
            Some("hourly".into())
        );
        Spi::run("SELECT backup.job_enable('hourly', false)").expect("disable");
        Spi::run("SELECT backup._sched_check_health(900, 60)").expect("check");
        assert_eq!(one("SELECT count(*)::text FROM backup.alerts WHERE kind = 'job_overdue' AND resolved_at IS NULL"), Some("0".into()));
    }

    #[pg_test]
    fn cron_next_in_sql() {
        let v = Spi::get_one::<String>(
            "SELECT backup.cron_next('30 2 * * *', 'Europe/Berlin', '2026-11-21 10:00:00+00')::timestamptz AT TIME ZONE 'UTC' || ''",
        );
        assert_eq!(v, Ok(Some("2026-11-22 01:30:00".to_string())));
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
