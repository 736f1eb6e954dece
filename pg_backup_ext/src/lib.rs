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
    requires = ["jobs", _run_now],
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

/// Runs execution `execution_id` now, in this session (backup_run(wait => true)),
/// recording progress and the outcome in the catalog; true if it succeeded.
#[pg_extern]
fn _run_now(execution_id: i64) -> bool {
    let kind = Spi::get_one_with_args::<String>(
        "SELECT kind FROM backup.backup_executions WHERE execution_id = $1",
        &[execution_id.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| "full".into());
    let exe = settings::string(&settings::WALSHIPPER_PATH);
    let cfg = settings::string(&settings::WALSHIPPER_CONFIG);
    let outcome = match run::spawn(&exe, &cfg, execution_id, &kind) {
        Err(e) => run::Outcome::Failed(e),
        Ok(mut r) => loop {
            if let Some(o) = r.poll() {
                break o;
            }
            // A cancel (Ctrl-C) of this statement stops the backup too.
            // SAFETY: checking for a pending query cancel in a backend.
            if unsafe { pg_sys::QueryCancelPending } != 0 {
                r.kill();
            }
            pgrx::check_for_interrupts!();
            std::thread::sleep(std::time::Duration::from_millis(200));
        },
    };
    let ok = matches!(outcome, run::Outcome::Succeeded(_));
    let (status, summary, error) = match outcome {
        run::Outcome::Succeeded(v) => ("succeeded", Some(v.to_string()), None),
        run::Outcome::Failed(e) => ("failed", None, Some(e)),
    };
    let _ = Spi::run_with_args(
        "SELECT backup._sched_finish($1, $2, $3::jsonb, $4, 0, 0)",
        &[
            execution_id.into(),
            status.to_string().into(),
            summary.into(),
            error.into(),
        ],
    );
    ok
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
