//! The SQL control plane end to end: a real cluster with pg_backup_ext
//! preloaded (installed by scripts/test.sh), its scheduler launching the real
//! walshipper binary, archiving into a local repository.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn wait_for(c: &Cluster, sql: &str, want: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let got = c.try_sql(sql).unwrap_or_default();
        if got == want {
            return got;
        }
        if start.elapsed() > timeout {
            panic!(
                "waited {timeout:?} for `{sql}` to be {want:?}, last {got:?}\nexecutions: {}\nlog:\n{}",
                c.sql("SELECT json_agg(e) FROM backup.backup_executions e"),
                c.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A cluster with pg_backup_ext preloaded, pointed at the real walshipper.
fn preloaded_cluster(d: &std::path::Path, shipper: &Shipper, extra: &[&str]) -> Cluster {
    let mut conf = vec![
        "archive_mode = on".to_string(),
        format!("archive_command = {}", shipper.archive_command()),
        "shared_preload_libraries = 'pg_backup_ext'".into(),
        format!(
            "pg_backup.walshipper_path = '{}'",
            walshipper_bin().display()
        ),
        format!(
            "pg_backup.walshipper_config = '{}'",
            shipper.config.display()
        ),
    ];
    conf.extend(extra.iter().map(|s| s.to_string()));
    Cluster::init(d, "src", &conf)
}

/// Creates the repository, starts the cluster, creates the extension.
fn start_with_extension(shipper: &Shipper, c: &Cluster) {
    run_ok(
        shipper
            .cmd()
            .args(["repo-init", "--kdf-memory-kib", "8192"]),
    );
    c.start();
    c.sql("CREATE EXTENSION pg_backup_ext");
}

#[test]
fn sql_backups_schedules_failures_and_restore_points() {
    let dir = scratch("ext");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    let c = preloaded_cluster(
        d,
        &shipper,
        &[
            "pg_backup.database = 'postgres'",
            "pg_backup.retry_max = 0",
            "pg_backup.repo_status_interval = 2",
        ],
    );
    start_with_extension(&shipper, &c);
    c.pgbench(&["-i", "-s", "1", "-q"]);

    // backup_run(wait => true): a succeeded execution whose figures match the repository's.
    let id = c.sql("SELECT backup.backup_run(wait => true)");
    let row: serde_json::Value = serde_json::from_str(&c.sql(&format!(
        "SELECT row_to_json(e) FROM backup.backup_executions e WHERE execution_id = {id}"
    )))
    .unwrap();
    assert_eq!(row["status"], "succeeded", "{row}");
    let info = shipper.info();
    let b = info["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == row["backup_id"])
        .unwrap_or_else(|| panic!("backup {} not in the repository: {info}", row["backup_id"]));
    assert_eq!(row["start_lsn"], b["start_lsn"]);
    assert_eq!(row["stop_lsn"], b["stop_lsn"]);
    assert_eq!(row["size_bytes"], b["size"]);
    assert_eq!(row["stored_bytes"], b["stored_size"]);

    // backup.repositories: what walshipper info reports, refreshed by the scheduler.
    let backup_id = row["backup_id"].as_str().unwrap();
    wait_for(
        &c,
        "SELECT status || ' ' || coalesce(last_backup, '-') || ' ' || is_primary \
           || ' ' || (last_archived_wal IS NOT NULL) FROM backup.repositories",
        &format!("ok {backup_id} true true"),
        Duration::from_secs(30),
    );

    // A job every minute runs on its own, and never twice at once.
    c.sql("SELECT backup.job_create('every_minute', '* * * * *')");
    wait_for(
        &c,
        "SELECT count(*) > 0 FROM backup.backup_executions e JOIN backup.backup_jobs j USING (job_id) \
         WHERE j.name = 'every_minute' AND e.status = 'succeeded'",
        "t",
        Duration::from_secs(90),
    );
    assert_eq!(
        c.sql("SELECT health FROM backup.job_status WHERE name = 'every_minute'"),
        "ok"
    );
    c.sql("SELECT backup.job_enable('every_minute', false)");
    assert_eq!(
        c.sql("SELECT count(*) FROM backup.backup_executions GROUP BY job_id, status HAVING status = 'running' AND count(*) > 1"),
        ""
    );

    // A broken walshipper path: the run fails with the reason, and an alert is raised.
    c.sql("ALTER SYSTEM SET pg_backup.walshipper_path = '/nonexistent/walshipper'");
    c.sql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_secs(2));
    let failed = c.sql("SELECT backup.backup_run()");
    wait_for(
        &c,
        &format!("SELECT status FROM backup.backup_executions WHERE execution_id = {failed}"),
        "failed",
        Duration::from_secs(30),
    );
    let err = c.sql(&format!(
        "SELECT error FROM backup.backup_executions WHERE execution_id = {failed}"
    ));
    assert!(err.contains("/nonexistent/walshipper"), "{err}");
    let repo_alert = "SELECT count(*) FROM backup.alerts \
                      WHERE kind = 'repository_unavailable' AND resolved_at IS NULL";
    wait_for(&c, repo_alert, "1", Duration::from_secs(30));
    assert_eq!(
        c.sql("SELECT status FROM backup.repositories"),
        "unavailable"
    );
    assert_eq!(
        c.sql("SELECT count(*) FROM backup.alerts WHERE kind = 'backup_failed' AND resolved_at IS NULL"),
        "1"
    );
    // The same through backup_run(wait => true): an SQL error with the reason.
    let out = run(c
        .psql_cmd()
        .args(["-c", "SELECT backup.backup_run(wait => true)"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot run walshipper"));

    // Archiving that fails raises an alert, which clears when archiving recovers.
    c.sql("ALTER SYSTEM SET archive_command = '/bin/false'");
    c.sql("SELECT pg_reload_conf()");
    c.sql("SELECT pg_create_restore_point('x'), pg_switch_wal()");
    let open_archive_alert =
        "SELECT count(*) FROM backup.alerts WHERE kind = 'archive_failing' AND resolved_at IS NULL";
    wait_for(&c, open_archive_alert, "1", Duration::from_secs(30));
    c.sql("ALTER SYSTEM RESET archive_command");
    c.sql("SELECT pg_reload_conf()");
    wait_for(&c, open_archive_alert, "0", Duration::from_secs(60));
    // A restore point made in SQL is a working restore target.
    c.sql("CREATE TABLE marker (id int)");
    c.sql("INSERT INTO marker VALUES (1)");
    c.sql("SELECT backup.restore_point_create('before_two')");
    c.sql("INSERT INTO marker VALUES (2)");
    c.switch_and_wait_archived(Duration::from_secs(60));
    // restore_plan() prints the command; run as printed, it restores to the point.
    c.sql(&format!(
        "ALTER SYSTEM SET pg_backup.walshipper_path = '{}'",
        walshipper_bin().display()
    ));
    c.sql("SELECT pg_reload_conf()");
    wait_for(&c, repo_alert, "0", Duration::from_secs(30));
    let command = c.sql(&format!(
        "SELECT command FROM backup.restore_plan('before_two', '{}')",
        d.join("r").display()
    ));
    assert!(command.contains("--target-name 'before_two'"), "{command}");
    // Out of reach: before every backup, and in the future.
    let early = run(c.psql_cmd().args([
        "-c",
        "SELECT * FROM backup.restore_plan('2001-01-01 00:00+00'::timestamptz)",
    ]));
    assert!(String::from_utf8_lossy(&early.stderr).contains("no backup ends before"));
    let late = run(c.psql_cmd().args([
        "-c",
        "SELECT * FROM backup.restore_plan(now() + interval '1 day')",
    ]));
    assert!(String::from_utf8_lossy(&late.stderr).contains("in the future"));
    c.stop();
    let o = run(std::process::Command::new("sh").args(["-c", &command]));
    assert!(
        o.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = start_restored(d, "r", &["shared_preload_libraries = ''".to_string()]);
    assert_eq!(r.sql("SELECT string_agg(id::text, ',') FROM marker"), "1");
    r.stop();
}

#[test]
fn a_run_interrupted_by_a_server_restart_is_marked_failed() {
    let dir = scratch("extrs");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    let c = preloaded_cluster(d, &shipper, &[]);
    // Slow backups (zstd 19, one thread) so there is time to restart mid-run.
    let cfg = std::fs::read_to_string(&shipper.config).unwrap();
    std::fs::write(
        &shipper.config,
        cfg.replace("level = 3", "level = 19\nthreads = 1"),
    )
    .unwrap();
    start_with_extension(&shipper, &c);
    c.pgbench(&["-i", "-s", "3", "-q"]);
    let id = c.sql("SELECT backup.backup_run()");
    let status = format!("SELECT status FROM backup.backup_executions WHERE execution_id = {id}");
    wait_for(&c, &status, "running", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    c.stop();
    c.start();
    wait_for(&c, &status, "failed", Duration::from_secs(30));
    let err = c.sql(&format!(
        "SELECT error FROM backup.backup_executions WHERE execution_id = {id}"
    ));
    assert!(
        err.contains("shut down") || err.contains("interrupted"),
        "{err}"
    );
    assert_eq!(c.sql("SELECT count(*) FROM backup.running_backups"), "0");
    // A running backup is cancelled within seconds, and leaves no backup.
    let cancel = c.sql("SELECT backup.backup_run()");
    let cancel_status =
        format!("SELECT status FROM backup.backup_executions WHERE execution_id = {cancel}");
    wait_for(&c, &cancel_status, "running", Duration::from_secs(30));
    c.sql(&format!("SELECT backup.backup_cancel({cancel})"));
    wait_for(&c, &cancel_status, "cancelled", Duration::from_secs(15));
    assert_eq!(shipper.info()["backups"].as_array().unwrap().len(), 0);
    // The next backup works.
    let next = c.sql("SELECT backup.backup_run()");
    wait_for(
        &c,
        &format!("SELECT status FROM backup.backup_executions WHERE execution_id = {next}"),
        "succeeded",
        Duration::from_secs(120),
    );
}

#[test]
fn incremental_jobs_and_expiry_after_each_backup() {
    let dir = scratch("ext-expire");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    let c = preloaded_cluster(
        d,
        &shipper,
        &["pg_backup.database = 'postgres'", "pg_backup.retry_max = 0"],
    );
    start_with_extension(&shipper, &c);
    c.pgbench(&["-i", "-s", "1", "-q"]);

    // A recovery window shorter than the gap between full backups is refused.
    let o = run(c.psql_cmd().args([
        "-c",
        "SELECT backup.job_create('bad', '0 3 * * 0', retention_window => '1 day')",
    ]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("retention_window") && err.contains("HINT"),
        "{err}"
    );
    // Far-off schedules: the runs are started by hand.
    c.sql("SELECT backup.job_create('weekly_full', '0 3 * * 0', retention_full_count => 1)");
    c.sql("SELECT backup.job_create('daily_incr', '0 3 * * 1-6', kind => 'incr', retention_full_count => 1)");

    let backup_of = |id: &str| {
        c.sql(&format!(
            "SELECT backup_id FROM backup.backup_executions WHERE execution_id = {id}"
        ))
    };
    let f1 = c.sql("SELECT backup.backup_run('weekly_full', wait => true)");
    c.sql("UPDATE pgbench_accounts SET abalance = 1 WHERE aid <= 1000");
    let i1 = c.sql("SELECT backup.backup_run('daily_incr', wait => true)");
    assert_eq!(
        c.sql(&format!(
            "SELECT kind || ' ' || (summary->>'based_on') FROM backup.backup_executions WHERE execution_id = {i1}"
        )),
        format!("incr {}", backup_of(&f1))
    );
    // The second full: keeping one full, expiry removes the first and the incr on it.
    let f2 = c.sql("SELECT backup.backup_run('weekly_full', wait => true)");
    wait_for(
        &c,
        "SELECT count(*) FROM backup.backup_executions WHERE expired_at IS NOT NULL",
        "2",
        Duration::from_secs(60),
    );
    let removed = c.sql(
        "SELECT string_agg(r->>'id', ',' ORDER BY r->>'id') FROM backup.audit_log a, \
         jsonb_array_elements(a.details->'removed') r WHERE a.action = 'expire'",
    );
    let mut want = [backup_of(&f1), backup_of(&i1)];
    want.sort();
    assert_eq!(removed, want.join(","));
    let info = shipper.info();
    let ids: Vec<_> = info["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, [backup_of(&f2)]);

    // restore_plan follows the chain and refuses what retention removed.
    let i2 = c.sql("SELECT backup.backup_run('daily_incr', wait => true)");
    c.sql("SELECT pg_switch_wal()");
    let plan = wait_for(
        &c,
        "SELECT backup_type || ' ' || array_to_string(backup_chain, ',') FROM backup.restore_plan(\
         (SELECT stop_time FROM backup.backups ORDER BY stop_time DESC LIMIT 1))",
        &format!("incr {},{}", backup_of(&f2), backup_of(&i2)),
        Duration::from_secs(30),
    );
    assert!(plan.starts_with("incr"));
    let o = run(c.psql_cmd().args([
        "-c",
        &format!(
            "SELECT * FROM backup.restore_plan((SELECT finished_at FROM backup.backup_executions WHERE execution_id = {f1}))"
        ),
    ]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("removed by retention"), "{err}");
    assert_eq!(
        c.sql("SELECT count(*) FROM backup.alerts WHERE kind = 'expire_failed'"),
        "0"
    );
}
