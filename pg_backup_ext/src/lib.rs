//! pg_backup_ext: the control plane of pg_backup inside PostgreSQL.
//!
//! Thin by design: the catalog and SQL API (sql/*.sql), the scheduler
//! (worker.rs) and the few C-level functions below live here;
//! every byte of backup data is handled by the `walshipper` binary, which
//! this extension launches and never links.

use pgrx::prelude::*;

pub mod run;
pub mod schedule;
pub mod settings;
pub mod stream;
pub mod worker;

::pgrx::pg_module_magic!(name, version);

// The SQL, split by concern (see each file's head); security.sql pins every
// function's search_path and sets the privileges, last.
extension_sql_file!("../../sql/catalog.sql", name = "catalog", bootstrap);
extension_sql_file!("../../sql/common.sql", name = "common");
extension_sql_file!(
    "../../sql/alerts.sql",
    name = "alerts",
    requires = ["common"]
);
extension_sql_file!(
    "../../sql/jobs.sql",
    name = "jobs",
    requires = ["common", cron_next_epoch, cron_check]
);
extension_sql_file!(
    "../../sql/restore_points.sql",
    name = "restore_points",
    requires = ["common"]
);
extension_sql_file!(
    "../../sql/retention.sql",
    name = "retention",
    requires = ["jobs", "alerts"]
);
extension_sql_file!(
    "../../sql/restore.sql",
    name = "restore",
    requires = ["common"]
);
extension_sql_file!(
    "../../sql/runs.sql",
    name = "runs",
    requires = ["jobs", _run_in_worker]
);
extension_sql_file!(
    "../../sql/scheduler.sql",
    name = "scheduler",
    requires = ["jobs", "alerts", "retention"]
);
extension_sql_file!(
    "../../sql/verifications.sql",
    name = "verifications",
    requires = ["restore", "restore_points", _recovery_in_worker]
);
extension_sql_file!(
    "../../sql/recovery.sql",
    name = "recovery",
    requires = ["verifications", "alerts", "views"]
);
extension_sql_file!("../../sql/views.sql", name = "views", requires = ["common"]);
extension_sql_file!(
    "../../sql/notifications.sql",
    name = "notifications",
    requires = ["alerts", "jobs"]
);
extension_sql_file!(
    "../../sql/capacity.sql",
    name = "capacity",
    requires = ["alerts", "scheduler", "views"]
);
extension_sql_file!(
    "../../sql/compliance.sql",
    name = "compliance",
    requires = ["capacity", "recovery", "retention", "views", "keys"]
);
extension_sql_file!(
    "../../sql/keys.sql",
    name = "keys",
    requires = ["alerts", "scheduler", "views"]
);
extension_sql_file!(
    "../../sql/streaming.sql",
    name = "streaming",
    requires = ["alerts"]
);
extension_sql_file!(
    "../../sql/security.sql",
    name = "security",
    requires = [
        "runs",
        "scheduler",
        "views",
        "restore",
        "restore_points",
        "retention",
        "verifications",
        "recovery",
        "notifications",
        "capacity",
        "streaming",
        "compliance",
        "keys",
        version
    ],
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

/// Runs backup `execution_id` now in a background worker of its own and
/// waits for it (backup_run(wait => true), which took the id). The worker
/// records the run, its audit row and its outcome in its own transactions,
/// so they stay in the catalog even when the caller's transaction ends in
/// an error. `requester`: the role asking, recorded as such.
#[pg_extern]
fn _run_in_worker(execution_id: i64, job_id: Option<i64>, kind: &str, requester: Option<i64>) {
    // SAFETY: reading the backend's own identity.
    let (db, me) = unsafe { (pg_sys::MyDatabaseId, pg_sys::MyProcPid) };
    // bgw_extra holds 128 bytes: numbers and the kind only.
    let extra = format!(
        "{} {} {} {} {kind}",
        u32::from(db),
        execution_id,
        job_id.unwrap_or(0),
        requester.unwrap_or(0)
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
    if worker.wait_for_startup().is_err() {
        raise(schedule::ScheduleError {
            message: "the backup worker did not start".into(),
            hint: "See the server log.".into(),
        })
    }
    let _ = worker.wait_for_shutdown();
}

/// Runs verification or recovery operation `id` (`table`: "verification"
/// or "operation") now in a background worker of its own and waits for it
/// (verify_run, restore_test_run and table_restore with wait => true, which
/// took the id and built `request`). The worker records the request, its
/// audit row and its outcome in its own transactions, so they stay in the
/// catalog even when the caller's transaction ends in an error.
#[pg_extern]
fn _recovery_in_worker(table: &str, id: i64, request: &str, requester: Option<i64>) {
    if table != "verification" && table != "operation" {
        raise(schedule::ScheduleError {
            message: format!("unknown request table {table:?}"),
            hint: "Internal: use verify_run(), restore_test_run() or table_restore().".into(),
        })
    }
    // SAFETY: reading the backend's own identity.
    let (db, me) = unsafe { (pg_sys::MyDatabaseId, pg_sys::MyProcPid) };
    let path = worker::request_path(table, id);
    let written = path
        .parent()
        .map_or(Ok(()), |dir| {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
        })
        .and_then(|_| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?
                .write_all(request.as_bytes())
        });
    if let Err(e) = written {
        raise(schedule::ScheduleError {
            message: format!("cannot hand the request to a worker ({}): {e}", path.display()),
            hint: "Check the data directory's free space, or run it without wait and let the scheduler run it.".into(),
        })
    }
    let extra = format!("{} {table} {id} {}", u32::from(db), requester.unwrap_or(0));
    let worker = pgrx::bgworkers::BackgroundWorkerBuilder::new("pg_backup recovery")
        .set_function("pg_backup_recovery_main")
        .set_library("pg_backup_ext")
        .enable_spi_access()
        .set_extra(&extra)
        .set_notify_pid(me)
        .load_dynamic();
    let Ok(worker) = worker else {
        let _ = std::fs::remove_file(&path);
        raise(schedule::ScheduleError {
            message: "could not start a background worker".into(),
            hint:
                "Raise max_worker_processes, or run it without wait and let the scheduler run it."
                    .into(),
        })
    };
    if worker.wait_for_startup().is_err() {
        let _ = std::fs::remove_file(&path);
        raise(schedule::ScheduleError {
            message: "the worker did not start".into(),
            hint: "See the server log.".into(),
        })
    }
    let _ = worker.wait_for_shutdown();
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
        Spi::run("SELECT backup._sched_finish((SELECT max(execution_id) FROM backup.backup_executions), 'succeeded', '{\"backup_id\":\"20260101-000000F\",\"start_lsn\":\"0/1\",\"stop_lsn\":\"0/2\",\"size\":10,\"stored_size\":5,\"timeline\":1}', NULL, 1, 60)").expect("finish");
        assert_eq!(
            one("SELECT count(*)::text FROM backup.alerts WHERE resolved_at IS NULL"),
            Some("0".into())
        );
        assert_eq!(
            one("SELECT health FROM backup.job_status"),
            Some("ok".into())
        );
    }

    /// walshipper's summary is untrusted: a backup id that is not of its
    /// form (it lands in shell commands) fails the run instead.
    #[pg_test]
    fn a_forged_backup_id_fails_the_run() {
        Spi::run("INSERT INTO backup.backup_executions (kind, status, started_at) VALUES ('full', 'running', now())")
            .expect("run");
        Spi::run("SELECT backup._sched_finish((SELECT max(execution_id) FROM backup.backup_executions), 'succeeded', \
                  '{\"backup_id\":\"20260101-000000F'' $(touch /tmp/x) ''\",\"type\":\"full\"}', NULL, 0, 60)")
            .expect("finish");
        assert_eq!(
            one("SELECT status || ': ' || error || ' ' || (backup_id IS NULL) FROM backup.backup_executions"),
            Some("failed: walshipper reported success with an invalid backup id \"20260101-000000F' $(touch /tmp/x) '\" true".into())
        );
    }

    /// Words for restore_plan's command: plain ones as they are, the
    /// rest single-quoted so that a shell reads each as one word.
    #[pg_test]
    fn shell_quoting() {
        let q = |w: &str| {
            Spi::get_one_with_args::<String>("SELECT backup._shell_quote($1)", &[w.into()])
                .expect("query")
                .expect("a word")
        };
        assert_eq!(q("--target-name"), "--target-name");
        assert_eq!(
            q("/var/lib/pg_15/main.restored"),
            "/var/lib/pg_15/main.restored"
        );
        assert_eq!(q("it's"), r"'it'\''s'");
        assert_eq!(q("$(id)"), "'$(id)'");
        assert_eq!(q("a b"), "'a b'");
        assert_eq!(q(""), "''");
        assert_eq!(q("~root"), "'~root'");
        assert_eq!(q("X=1"), "'X=1'");
        assert_eq!(q("a\nb"), "'a\nb'");
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

    /// Runs `sql` and returns its error as "message | hint" (None if it
    /// succeeded), through a PL/pgSQL exception block.
    fn error_of(sql: &str) -> Option<String> {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.error_of(q text) RETURNS text LANGUAGE plpgsql AS $$
             DECLARE m text; h text;
             BEGIN
                 EXECUTE q;
                 RETURN NULL;
             EXCEPTION WHEN OTHERS THEN
                 GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, h = PG_EXCEPTION_HINT;
                 RETURN m || ' | ' || h;
             END $$",
        )
        .expect("helper");
        Spi::get_one_with_args::<String>("SELECT pg_temp.error_of($1)", &[sql.into()])
            .expect("query")
    }

    #[pg_test]
    fn retention_belongs_to_repositories_and_is_validated() {
        // diff and incr jobs and runs are accepted.
        Spi::run("SELECT backup.job_create('hourly_incr', '0 * * * *', kind => 'incr')")
            .expect("incr job");
        Spi::run("SELECT backup.backup_run(kind => 'diff')").expect("diff run");
        assert_eq!(
            one("SELECT string_agg(kind, ',' ORDER BY execution_id) FROM backup.backup_executions"),
            Some("diff".into())
        );

        let e =
            error_of("SELECT backup.retention_set('repo1', keep_daily => -1)").expect("refused");
        assert!(
            e.starts_with("keep_daily must be 0 or more, not -1 | "),
            "{e}"
        );
        let e = error_of("SELECT backup.retention_set('repo1', keep_daily => 0, keep_weekly => 0)")
            .expect("refused");
        assert!(e.contains("keeps no backup"), "{e}");
        let e =
            error_of("SELECT backup.retention_set('bad name', keep_full => 1)").expect("refused");
        assert!(e.contains("invalid repository name"), "{e}");

        // A recovery window must cover the time between the full backups
        // into the repository (jobs without one back up to the primary).
        Spi::run("SELECT backup.job_create('weekly', '0 3 * * 0')").expect("weekly");
        let e = error_of("SELECT backup.retention_set('repo1', recovery_window => '1 day')")
            .expect("refused");
        assert_eq!(
            e,
            "recovery_window 1 day is shorter than the 7 days between full backups into repository \"repo1\" | \
             Full backups up to 7 days apart cannot give a recovery window of 1 day without keeping the previous \
             full backup too: set recovery_window to at least 7 days, or schedule full backups more often."
        );
        // A second full job on work days: the longest gap is now Friday
        // 02:00 to Sunday 03:00 (the weekly job's).
        Spi::run("SELECT backup.job_create('workdays', '0 2 * * 1-5')").expect("workdays");
        let e = error_of("SELECT backup.retention_set('repo1', recovery_window => '1 day')")
            .expect("refused");
        assert!(e.contains("shorter than the 2 days 01:00:00"), "{e}");
        assert_eq!(
            error_of(
                "SELECT backup.retention_set('repo1', recovery_window => '3 days', keep_full => 2)"
            ),
            None
        );
        // A job into another repository does not count for repo1.
        Spi::run(
            "SELECT backup.job_create('offsite_monthly', '0 3 1 * *', repository => 'offsite')",
        )
        .expect("offsite job");
        assert_eq!(
            error_of(
                "SELECT backup.retention_set('repo1', recovery_window => '3 days', keep_full => 2)"
            ),
            None
        );
        let e = error_of("SELECT backup.retention_set('offsite', recovery_window => '7 days')")
            .expect("refused");
        assert!(e.contains("repository \"offsite\""), "{e}");

        // GFS, and the flags expiry passes to walshipper for each repository.
        Spi::run(
            "SELECT backup.retention_set('offsite', timezone => 'Europe/Berlin', keep_full => 2,
                    recovery_window => '31 days', keep_daily => 7, keep_weekly => 4, keep_monthly => 12, keep_yearly => 0)",
        )
        .expect("gfs");
        assert_eq!(
            one("SELECT string_agg(coalesce(repository, '-') || ' ' || args::text, '; ' ORDER BY repository) FROM backup._sched_expire_plan()"),
            Some("offsite {--keep-full,2,--recovery-window,2678400s,--keep-daily,7,--keep-weekly,4,--keep-monthly,12,--keep-yearly,0,--timezone,Europe/Berlin}; \
                  repo1 {--keep-full,2,--recovery-window,259200s}".into())
        );
        // Back to walshipper's configured policy: repo1 has no flags any
        // more (and, unknown to the catalog until walshipper reports it,
        // no plan row of its own).
        Spi::run("SELECT backup.retention_reset('repo1')").expect("reset");
        assert_eq!(
            one("SELECT string_agg(repository, ',') FROM backup._sched_expire_plan()"),
            Some("offsite".into())
        );
        Spi::run("INSERT INTO backup.repository_status (name, type, location, ok, position) VALUES ('repo1', 'posix', '/r', true, 1)")
            .expect("status");
        assert_eq!(
            one("SELECT string_agg(repository || ' ' || args::text, '; ' ORDER BY repository) FROM backup._sched_expire_plan()"),
            Some("offsite {--keep-full,2,--recovery-window,2678400s,--keep-daily,7,--keep-weekly,4,--keep-monthly,12,--keep-yearly,0,--timezone,Europe/Berlin}; repo1 {}".into())
        );
        Spi::run("DELETE FROM backup.repository_status").expect("status");
        assert_eq!(
            one("SELECT string_agg(action || ':' || object_name || ':' || coalesce(details->'policy'->>'keep_monthly', '-'), ' ' ORDER BY audit_id) FROM backup.audit_log WHERE object_type = 'retention'"),
            Some("set:repo1:- set:repo1:- set:offsite:12 reset:repo1:-".into())
        );
        // Before walshipper reported its repositories: one plan, no flags.
        Spi::run("TRUNCATE backup.retention_policies").expect("truncate");
        assert_eq!(
            one("SELECT coalesce(repository, 'all') || ' ' || args::text FROM backup._sched_expire_plan()"),
            Some("all {}".into())
        );
    }

    /// A week of backups, two chains; expiry removes the older chain.
    fn two_chains() {
        Spi::run("SELECT backup.job_create('nightly', '30 2 * * *', kind => 'incr')").expect("job");
        for (id, kind, stop, chain) in [
            (
                "20251110-023000F",
                "full",
                "2025-11-10 02:31:05+00",
                "[\"20251110-023000F\"]",
            ),
            (
                "20251111-023000I",
                "incr",
                "2025-11-11 02:30:40+00",
                "[\"20251110-023000F\", \"20251111-023000I\"]",
            ),
            (
                "20251120-023000F",
                "full",
                "2025-11-20 02:31:10+00",
                "[\"20251120-023000F\"]",
            ),
            (
                "20251121-023000I",
                "incr",
                "2025-11-21 02:30:35+00",
                "[\"20251120-023000F\", \"20251121-023000I\"]",
            ),
        ] {
            Spi::run_with_args(
                "INSERT INTO backup.backup_executions (job_id, kind, status, queued_at, started_at, finished_at, backup_id, summary)
                 SELECT job_id, $2, 'succeeded', $3::timestamptz - interval '1 minute', $3::timestamptz - interval '1 minute',
                        $3::timestamptz, $1,
                        jsonb_build_object('event', 'done', 'backup_id', $1, 'type', $2, 'requested_type', 'incr',
                                           'chain', $4::jsonb, 'stop_time', $3, 'wal_start', '000000010000000000000010')
                   FROM backup.backup_jobs",
                &[id.into(), kind.into(), stop.into(), chain.into()],
            )
            .expect("execution");
        }
    }

    const EXPIRE_REPORT: &str = r#"{"event":"expire","dry_run":false,"repository":"repo1",
        "policy":{"keep_full":1},
        "kept":[{"id":"20251120-023000F","type":"full","reasons":["last 1 full"]},
                {"id":"20251121-023000I","type":"incr","reasons":["in the chain of a kept backup"]}],
        "removed":[{"id":"20251110-023000F","type":"full","stop_time":"2025-11-10T02:31:05Z","stored_size":52428800},
                   {"id":"20251111-023000I","type":"incr","stop_time":"2025-11-11T02:30:40Z","stored_size":1048576}],
        "wal_removed":17,"wal_removed_first":"000000010000000000000010",
        "wal_removed_last":"000000010000000000000020","bytes_freed":53477376}"#;

    #[pg_test]
    fn expiry_is_recorded() {
        two_chains();
        // walshipper reported repo1 as the primary (executions without a
        // repository were taken into it).
        Spi::run("INSERT INTO backup.repository_status (name, type, location, ok, position) VALUES ('repo1', 'posix', '/r', true, 1)")
            .expect("status");
        let last = "(SELECT max(execution_id) FROM backup.backup_executions)";
        // A failure raises one alert per repository with walshipper's reason.
        Spi::run(&format!("SELECT backup._sched_expire_done(NULL, {last}, 'cannot list s3://b/p: HTTP 403 (exit 3)', 'repo1')")).expect("failed");
        assert_eq!(
            one(&format!("SELECT kind || ' ' || severity || ' ' || subject || ': ' || replace(message, 'backup ' || {last} || ' ', 'backup N ') FROM backup.alerts WHERE resolved_at IS NULL")),
            Some("expire_failed warning walshipper expire repo1: expiry of repository repo1 after backup N failed: cannot list s3://b/p: HTTP 403 (exit 3)".into())
        );
        // A dry run is audited and changes nothing else.
        Spi::run_with_args(
            &format!("SELECT backup._sched_expire_done(jsonb_set($1::jsonb, '{{dry_run}}', 'true'), {last})"),
            &[EXPIRE_REPORT.into()],
        )
        .expect("dry run");
        assert_eq!(
            one("SELECT count(*)::text FROM backup.backup_executions WHERE expired_at IS NOT NULL"),
            Some("0".into())
        );

        let n = Spi::get_one_with_args::<i32>(
            &format!("SELECT backup._sched_expire_done($1::jsonb, {last})"),
            &[EXPIRE_REPORT.into()],
        );
        assert_eq!(n, Ok(Some(2)));
        assert_eq!(
            one("SELECT string_agg(backup_id, ',' ORDER BY backup_id) FROM backup.backup_executions WHERE expired_at IS NOT NULL"),
            Some("20251110-023000F,20251111-023000I".into())
        );
        assert_eq!(
            one("SELECT count(*)::text FROM backup.alerts WHERE resolved_at IS NULL"),
            Some("0".into())
        );
        // One audit row: by the scheduler, the report without the kept
        // list's details, the kept ids, what it followed.
        assert_eq!(
            one("SELECT actor || ' ' || object_type || ' ' || object_name
                   || ' ' || (details->'kept')::text || ' ' || (details->>'bytes_freed') || ' ' || (details->>'wal_removed')
                   || ' ' || jsonb_array_length(details->'removed') || ' ' || (details ? 'policy')
                   FROM backup.audit_log WHERE action = 'expire' AND NOT (details->>'dry_run')::boolean"),
            Some("scheduler repository repo1 [\"20251120-023000F\", \"20251121-023000I\"] 53477376 17 2 true".into())
        );
        // Reported twice (a retry): nothing more to mark.
        let n = Spi::get_one_with_args::<i32>(
            &format!("SELECT backup._sched_expire_done($1::jsonb, {last})"),
            &[EXPIRE_REPORT.into()],
        );
        assert_eq!(n, Ok(Some(0)));
        // A report about another repository than the one expired is refused.
        assert_eq!(
            Spi::get_one_with_args::<i32>(
                "SELECT backup._sched_expire_done($1::jsonb, 1, NULL, 'offsite')",
                &[EXPIRE_REPORT.into()],
            ),
            Ok(Some(0))
        );
        assert_eq!(
            one("SELECT message FROM backup.alerts WHERE resolved_at IS NULL"),
            Some(
                "expiry of repository offsite after backup 1 reported on repository repo1 instead"
                    .into()
            )
        );
        Spi::run("UPDATE backup.alerts SET resolved_at = now()").expect("resolve");
        // The report of another repository does not expire what this one holds.
        let n = Spi::get_one_with_args::<i32>(
            "SELECT backup._sched_expire_done(jsonb_set($1::jsonb, '{repository}', '\"offsite\"'), 1)",
            &[EXPIRE_REPORT.replace("20251120", "20251121").into()],
        );
        assert_eq!(n, Ok(Some(0)));

        // What is listed and what restore plans may use.
        assert_eq!(
            one("SELECT string_agg(backup_id || ':' || type || ':' || array_to_string(chain, '+'), ' ') FROM backup.backups"),
            Some("20251120-023000F:full:20251120-023000F 20251121-023000I:incr:20251120-023000F+20251121-023000I".into())
        );
        assert_eq!(
            one("SELECT backups_kept || ' ' || last_backup_type FROM backup.job_status"),
            Some("2 incr".into())
        );
        assert_eq!(
            one("SELECT b.backup_id || ' ' || backup._backup_chain(b)::text FROM backup._restore_base('2025-11-22 00:00+00') b"),
            Some("20251121-023000I {20251120-023000F,20251121-023000I}".into())
        );
        let e = error_of("SELECT * FROM backup.restore_plan('2025-11-15 00:00+00'::timestamptz)")
            .expect("refused");
        assert!(e.contains("were removed by retention"), "{e}");
        // A chain whose full backup is gone cannot be restored.
        Spi::run("UPDATE backup.backup_executions SET expired_at = now() WHERE backup_id = '20251120-023000F'").expect("expire");
        let e =
            error_of("SELECT * FROM backup._restore_base('2025-11-22 00:00+00')").expect("refused");
        assert!(
            e.contains("every recorded backup was removed by retention"),
            "{e}"
        );
    }

    #[pg_test]
    fn the_kind_taken_is_recorded() {
        Spi::run("SELECT backup.job_create('incr', '0 * * * *', kind => 'incr')").expect("job");
        Spi::run("INSERT INTO backup.backup_executions (job_id, kind, status, started_at) SELECT job_id, 'incr', 'running', now() FROM backup.backup_jobs").expect("run");
        // No full backup to build on: walshipper took one.
        Spi::run("SELECT backup._sched_finish((SELECT max(execution_id) FROM backup.backup_executions), 'succeeded', '{\"backup_id\":\"20261122-010000F\",\"type\":\"full\",\"requested_type\":\"incr\",\"based_on\":null,\"chain\":[\"20261122-010000F\"],\"start_lsn\":\"0/1\",\"stop_lsn\":\"0/2\",\"size\":10,\"stored_size\":5,\"timeline\":1}', NULL, 1, 60)").expect("finish");
        assert_eq!(
            one("SELECT kind || ' ' || (summary->>'requested_type') FROM backup.backup_executions"),
            Some("full incr".into())
        );
        assert_eq!(
            one("SELECT type || ' ' || requested_type || ' ' || coalesce(based_on, '-') FROM backup.backups"),
            Some("full incr -".into())
        );
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
