//! The SQL control plane end to end: a real cluster with pg_backup_ext
//! preloaded (installed by scripts/test.sh), its scheduler launching the real
//! walshipper binary, archiving into a local repository.

mod common;

use std::time::{Duration, Instant};

use common::*;

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

    // A role that may create in public plants functions and an operator
    // that match the scheduler's calls better than the built-ins
    // (make_interval(secs => integer), text || bigint). The scheduler's
    // connection and functions have search_path pinned: none of it runs,
    // over all the scheduler cycles of this test (checked at its end).
    for sql in [
        "CREATE ROLE planter",
        "GRANT CREATE ON SCHEMA public TO planter",
        "CREATE TABLE public.fired (what text, by_user name DEFAULT current_user)",
        "GRANT INSERT ON public.fired TO PUBLIC",
        "SET ROLE planter; \
         CREATE FUNCTION public.make_interval(secs integer) RETURNS interval LANGUAGE sql \
           AS $$ INSERT INTO public.fired (what) VALUES ('make_interval') RETURNING interval '1 second' $$; \
         CREATE FUNCTION public.text_bigint(text, bigint) RETURNS text LANGUAGE sql \
           AS $$ INSERT INTO public.fired (what) VALUES ('||') RETURNING $1 OPERATOR(pg_catalog.||) $2::text $$; \
         CREATE OPERATOR public.|| (LEFTARG = text, RIGHTARG = bigint, FUNCTION = public.text_bigint)",
    ] {
        c.sql(sql);
    }
    // The trap works for a session that does not pin its path.
    assert_eq!(
        c.sql("SELECT make_interval(secs => 1)::text || ('x' || 1::bigint)"),
        "00:00:01x1"
    );
    assert_eq!(c.sql("SELECT count(*) FROM public.fired"), "2");
    c.sql("TRUNCATE public.fired");

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
    // The scheduler could not start walshipper: its own alert, with the path.
    let worker_alert =
        "SELECT count(*) FROM backup.alerts WHERE kind = 'worker_error' AND resolved_at IS NULL";
    wait_for(&c, worker_alert, "1", Duration::from_secs(10));
    assert!(c
        .sql("SELECT message FROM backup.alerts WHERE kind = 'worker_error'")
        .contains("/nonexistent/walshipper"));
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
    wait_for(&c, worker_alert, "0", Duration::from_secs(60));
    let command = c.sql(&format!(
        "SELECT command FROM backup.restore_plan('before_two', '{}')",
        d.join("r").display()
    ));
    assert!(command.contains(" --target-name before_two-"), "{command}");
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

    // Nothing planted ran, whatever the scheduler did meanwhile.
    c.start();
    assert_eq!(
        c.sql("SELECT count(*) FROM public.fired"),
        "0",
        "planted code ran: {}",
        c.sql("SELECT json_agg(f) FROM public.fired f")
    );

    // A hostile target directory: the printed command, run as printed by a
    // shell, passes it as one word and runs nothing else.
    let hostile = "r2'$(touch Q)';touch P;'";
    let command = c.sql(&format!(
        "SELECT command FROM backup.restore_plan('before_two', '{}')",
        d.join(hostile).display().to_string().replace('\'', "''")
    ));
    c.stop();
    let o = run(std::process::Command::new("sh")
        .args(["-c", &command])
        .current_dir(d));
    assert!(
        o.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!d.join("P").exists() && !d.join("Q").exists(), "{command}");
    assert!(d.join(hostile).join("PG_VERSION").exists(), "{command}");
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

/// The backup ids repository `repo` lists, and the first WAL segment it holds.
fn holdings(shipper: &Shipper, repo: &str) -> (Vec<String>, String) {
    let (ids, info) = shipper.held(repo);
    let first = info["wal"]["timelines"][0]["first"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (ids, first)
}

#[test]
fn incremental_jobs_and_expiry_per_repository() {
    let dir = scratch("ext-expire");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    // Two repositories, the primary repo1 and offsite; archiving to both.
    let cfg = std::fs::read_to_string(&shipper.config).unwrap();
    let cfg = cfg
        .replacen("[repo]\n", "[[repo]]\nname = \"repo1\"\n", 1)
        .replacen(
            "[encryption]",
            &format!(
                "[[repo]]\nname = \"offsite\"\ntype = \"posix\"\npath = \"{}\"\n[encryption]",
                d.join("offsite").display()
            ),
            1,
        );
    std::fs::write(&shipper.config, cfg).unwrap();
    let c = preloaded_cluster(
        d,
        &shipper,
        &[
            "pg_backup.database = 'postgres'",
            "pg_backup.retry_max = 0",
            "pg_backup.repo_status_interval = 1",
        ],
    );
    start_with_extension(&shipper, &c);
    c.pgbench(&["-i", "-s", "1", "-q"]);
    wait_for(
        &c,
        "SELECT string_agg(name, ',' ORDER BY is_primary DESC) FROM backup.repositories",
        "repo1,offsite",
        Duration::from_secs(30),
    );

    // Retention is each repository's, set in SQL and audited; a job's
    // retention no longer exists, and a short window is refused.
    let o = run(c.psql_cmd().args([
        "-c",
        "SELECT backup.job_create('bad', '0 3 * * 0', retention_window => '1 day')",
    ]));
    assert!(!o.status.success());
    c.sql("SELECT backup.job_create('weekly_full', '0 3 * * 0')");
    c.sql("SELECT backup.job_create('daily_incr', '0 3 * * 1-6', kind => 'incr')");
    c.sql("SELECT backup.job_create('offsite_full', '0 4 * * 0', repository => 'offsite')");
    let o = run(c.psql_cmd().args([
        "-c",
        "SELECT backup.retention_set('repo1', recovery_window => '1 day')",
    ]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("recovery_window") && err.contains("HINT"),
        "{err}"
    );
    c.sql("SELECT backup.retention_set('repo1', keep_full => 1)");
    c.sql("SELECT backup.retention_set('offsite', keep_full => 2)");
    assert_eq!(
        c.sql("SELECT string_agg(object_name, ',' ORDER BY audit_id) FROM backup.audit_log WHERE object_type = 'retention'"),
        "repo1,offsite"
    );

    let backup_of = |id: &str| {
        c.sql(&format!(
            "SELECT backup_id FROM backup.backup_executions WHERE execution_id = {id}"
        ))
    };
    let expired_after = |id: &str| {
        wait_for(
            &c,
            &format!(
                "SELECT string_agg(object_name, ',' ORDER BY object_name) FROM backup.audit_log \
                 WHERE action = 'expire' AND details->>'execution_id' = '{id}'"
            ),
            "offsite,repo1",
            Duration::from_secs(60),
        );
    };
    let start_segment = |id: &str| {
        c.sql(&format!(
            "SELECT summary->>'wal_start' FROM backup.backup_executions WHERE execution_id = {id}"
        ))
    };

    // Rounds of: a full backup and an incremental on it into repo1, expiry
    // of both repositories after each, then repo-sync. After each expiry
    // each repository holds what its policy keeps; repo-sync never brings
    // back what a repository's policy removed; the catalog agrees.
    let mut fulls: Vec<String> = Vec::new();
    for round in 1..=4 {
        let f = c.sql("SELECT backup.backup_run('weekly_full', wait => true)");
        expired_after(&f);
        c.sql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 1000");
        let i = c.sql("SELECT backup.backup_run('daily_incr', wait => true)");
        assert_eq!(
            c.sql(&format!(
                "SELECT kind || ' ' || (summary->>'based_on') FROM backup.backup_executions WHERE execution_id = {i}"
            )),
            format!("incr {}", backup_of(&f))
        );
        expired_after(&i);
        fulls.push(backup_of(&f));
        let mut want1 = vec![backup_of(&f), backup_of(&i)];
        want1.sort();
        let (held1, first1) = holdings(&shipper, "repo1");
        assert_eq!(
            held1, want1,
            "round {round}: repo1 keeps one full backup and its incr"
        );
        assert!(
            first1 >= start_segment(&f),
            "round {round}: repo1 WAL from {first1}"
        );
        // offsite got repo1's backups by earlier syncs: the last two fulls
        // (with the incrs on them) of those.
        let (held2, _) = holdings(&shipper, "offsite");
        let kept_fulls: Vec<&String> = fulls[..round - 1].iter().rev().take(2).collect();
        assert_eq!(
            held2.iter().filter(|b| b.ends_with('F')).count(),
            kept_fulls.len(),
            "round {round}: offsite {held2:?}"
        );
        assert!(
            kept_fulls.iter().all(|k| held2.contains(k)),
            "round {round}: offsite {held2:?}"
        );

        run_ok(shipper.cmd().args(["repo-sync"]));
        let (after1, first_after) = holdings(&shipper, "repo1");
        assert_eq!(
            after1, want1,
            "round {round}: repo-sync brought back into repo1"
        );
        assert_eq!(
            first_after, first1,
            "round {round}: repo-sync brought back WAL"
        );
        let (after2, _) = holdings(&shipper, "offsite");
        assert!(
            after2.contains(&backup_of(&f)),
            "round {round}: offsite {after2:?}"
        );

        // The catalog agrees with both (the scheduler refreshes every second).
        wait_for(
            &c,
            &catalog_of_sql("repo1"),
            &after1.join(","),
            Duration::from_secs(30),
        );
        wait_for(
            &c,
            &catalog_of_sql("offsite"),
            &after2.join(","),
            Duration::from_secs(30),
        );
    }
    // offsite's policy removed its copy of the first full in round 4.
    assert!(!holdings(&shipper, "offsite").0.contains(&fulls[0]));
    // The first full backup left repo1 in round 2; the catalog says so.
    assert_eq!(
        c.sql(&format!(
            "SELECT expired_at IS NOT NULL FROM backup.backup_executions WHERE backup_id = '{}'",
            fulls[0]
        )),
        "t"
    );
    assert_eq!(
        c.sql(&format!(
            "SELECT array_to_string(held_by, ',') FROM backup.backups WHERE backup_id = '{}'",
            fulls[3]
        )),
        "repo1,offsite"
    );

    // A job backs up to its repository.
    let o = c.sql("SELECT backup.backup_run('offsite_full', wait => true)");
    let ob = backup_of(&o);
    assert_eq!(
        c.sql(&format!(
            "SELECT repository FROM backup.backup_executions WHERE execution_id = {o}"
        )),
        "offsite"
    );
    assert!(holdings(&shipper, "offsite").0.contains(&ob));
    assert!(!holdings(&shipper, "repo1").0.contains(&ob));

    // restore_plan follows the chain and refuses what retention removed.
    c.sql("SELECT pg_switch_wal()");
    let o = run(c.psql_cmd().args([
        "-c",
        &format!(
            "SELECT * FROM backup.restore_plan((SELECT finished_at FROM backup.backup_executions WHERE backup_id = '{}'))",
            fulls[0]
        ),
    ]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("removed by retention"), "{err}");
    assert_eq!(
        c.sql("SELECT count(*) FROM backup.alerts WHERE kind = 'expire_failed'"),
        "0"
    );
    // Every run the scheduler or a session started, and its end, is audited.
    assert_eq!(
        c.sql("SELECT count(*) FILTER (WHERE action = 'run') || ' ' || count(*) FILTER (WHERE action = 'finish') \
               FROM backup.audit_log WHERE object_type = 'backup'"),
        "9 9"
    );
}

fn catalog_of_sql(repo: &str) -> String {
    format!(
        "SELECT coalesce(string_agg(backup_id, ',' ORDER BY backup_id), '') FROM backup.repository_backups \
         WHERE repository = '{repo}'"
    )
}

/// md5 of a table's rows in order.
fn md5_of(c: &Cluster, table: &str) -> String {
    c.sql(&format!(
        "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t"
    ))
}

/// The SQL error of `sql` (psql's stderr); panics if it succeeded.
fn sql_error(c: &Cluster, sql: &str) -> String {
    let o = run(c.psql_cmd().args(["-c", sql]));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{sql} succeeded: {err}");
    err
}

/// What a scratch directory holds besides `logs/`.
fn scratch_leftovers(scratch: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(scratch)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "logs")
                .collect()
        })
        .unwrap_or_default()
}

/// Issue 14 from SQL, on one cluster: verify_after_backup, a restore test
/// of a backup taken under pgbench, a scheduled restore test, a table
/// restore to a restore point while the cluster serves, bad input, a
/// command-line restore taken into the catalog, and a damaged backup.
#[test]
fn restore_tests_and_table_restores_from_sql() {
    let t0 = Instant::now();
    let dir = scratch("ext-rt");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    let scratch_dir = d.join("scr");
    let mut cfg = std::fs::read_to_string(&shipper.config).unwrap();
    cfg.push_str(&format!(
        "[restore_test]\nscratch_dir = \"{}\"\npg_bin_dir = \"{}\"\n",
        scratch_dir.display(),
        pg_bin("postgres").parent().unwrap().display()
    ));
    std::fs::write(&shipper.config, cfg).unwrap();
    let c = preloaded_cluster(
        d,
        &shipper,
        &[
            "pg_backup.database = 'postgres'",
            "pg_backup.retry_max = 0",
            "pg_backup.repo_status_interval = 1",
        ],
    );
    start_with_extension(&shipper, &c);
    c.pgbench(&["-i", "-s", "1", "-q"]);
    let accounts = c.sql("SELECT count(*) FROM pgbench_accounts");

    // A backup taken under pgbench; verify_after_backup reads it back.
    let mut bench = std::process::Command::new(pg_bin("pgbench"))
        .args(["-U", "postgres", "-h"])
        .arg(&c.socket)
        .args(["-c", "2", "-T", "5", "postgres"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run_id = c.sql("SELECT backup.backup_run(wait => true)");
    assert!(bench.wait().unwrap().success());
    let backup_id = c.sql(&format!(
        "SELECT backup_id FROM backup.backup_executions WHERE execution_id = {run_id}"
    ));
    wait_for(
        &c,
        &format!(
            "SELECT status || ' ' || requested_by FROM backup.backup_verifications \
             WHERE kind = 'integrity' AND backup_id = '{backup_id}'"
        ),
        "passed scheduler",
        Duration::from_secs(60),
    );
    eprintln!("backup and verification {:.1}s", t0.elapsed().as_secs_f64());

    // A restore test, waited for: passes, with its phases, RTO, checks
    // (the DBA's own among them) and recovery operation recorded.
    let t = Instant::now();
    c.sql(&format!(
        "SELECT backup.restore_check_create('accounts', 'SELECT count(*) FROM pgbench_accounts', '{accounts}')"
    ));
    let v = c.sql("SELECT backup.restore_test_run(wait => true)");
    let row: serde_json::Value = serde_json::from_str(&c.sql(&format!(
        "SELECT row_to_json(v) FROM backup.backup_verifications v WHERE verification_id = {v}"
    )))
    .unwrap();
    assert_eq!(row["status"], "passed", "{row}");
    assert_eq!(row["backup_id"], backup_id.as_str(), "{row}");
    for phase in ["restore_s", "replay_s", "checks_s", "rto_s"] {
        assert!(row[phase].as_f64().unwrap_or(0.0) > 0.0, "{phase}: {row}");
    }
    assert!(row["recovered_lsn"].is_string(), "{row}");
    let checks = row["checks"].as_array().unwrap();
    assert!(
        checks
            .iter()
            .any(|k| k["name"] == "custom: accounts" && k["passed"] == true),
        "{row}"
    );
    assert!(
        checks
            .iter()
            .any(|k| k["name"].as_str().unwrap_or("").starts_with("pg_amcheck")),
        "{row}"
    );
    let op = row["operation_id"].as_i64().unwrap();
    assert_eq!(
        c.sql(&format!(
            "SELECT kind || ' ' || source || ' ' || status || ' ' || (record_id IS NOT NULL) || ' ' || (phase IS NULL) \
             || ' ' || (duration_s > 0) FROM backup.recovery_operations WHERE operation_id = {op}"
        )),
        "restore_test sql succeeded true true true"
    );
    // Audited: the request and the end, both naming the operation.
    assert_eq!(
        c.sql(&format!(
            "SELECT string_agg(action, ',' ORDER BY audit_id) FROM backup.audit_log \
             WHERE object_type = 'verification' AND details->>'operation_id' = '{op}'"
        )),
        "run,finish"
    );
    assert!(scratch_leftovers(&scratch_dir).is_empty());
    wait_for(
        &c,
        "SELECT (last_rto > interval '0') || ' ' || (last_restore_test_passed_at IS NOT NULL) || ' ' || backups_never_verified \
         FROM backup.recovery_objectives WHERE is_primary",
        "true true 0",
        Duration::from_secs(10),
    );
    eprintln!("restore test {:.1}s", t.elapsed().as_secs_f64());

    // A scheduled restore_test job runs on its own and records its result
    // (made due now instead of waiting for its minute).
    let t = Instant::now();
    c.sql("SELECT backup.job_create('rt-job', '0 3 1 * *', kind => 'restore_test')");
    c.sql("UPDATE backup.backup_jobs SET next_run_at = now() WHERE name = 'rt-job'");
    wait_for(
        &c,
        "SELECT v.status || ' ' || v.requested_by FROM backup.backup_verifications v \
         JOIN backup.backup_jobs j USING (job_id) WHERE j.name = 'rt-job' AND v.status NOT IN ('queued', 'running')",
        "passed scheduler",
        Duration::from_secs(120),
    );
    assert_eq!(
        c.sql("SELECT health FROM backup.job_status WHERE name = 'rt-job'"),
        "ok"
    );
    eprintln!("scheduled restore test {:.1}s", t.elapsed().as_secs_f64());

    // A table dropped and another updated by accident after a restore
    // point come back from SQL into a new schema, row for row as they were
    // at the point, owned by the role that asked, while pgbench reads.
    let t = Instant::now();
    c.sql(
        "CREATE ROLE app LOGIN; GRANT CREATE ON DATABASE postgres TO app; \
         CREATE TABLE t_drop (id int PRIMARY KEY, v text); \
         CREATE TABLE t_upd (id int PRIMARY KEY, d_id int REFERENCES t_drop, v text); \
         INSERT INTO t_drop SELECT g, 'd' || g FROM generate_series(1, 500) g; \
         INSERT INTO t_upd SELECT g, g, 'u' || g FROM generate_series(1, 500) g",
    );
    c.sql("SELECT backup.grant_table_restore('app')");
    let (drop_md5, upd_md5) = (md5_of(&c, "t_drop"), md5_of(&c, "t_upd"));
    c.sql("SELECT backup.restore_point_create('before_accident')");
    c.sql("DROP TABLE t_upd; DELETE FROM t_drop WHERE id > 100; UPDATE t_drop SET v = 'changed'");
    c.switch_and_wait_archived(Duration::from_secs(60));
    let mut reader = std::process::Command::new(pg_bin("pgbench"))
        .args(["-U", "postgres", "-h"])
        .arg(&c.socket)
        .args(["-c", "1", "-S", "-R", "20", "-T", "10", "postgres"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let op = c.sql(
        "SET ROLE app; SELECT backup.table_restore(ARRAY['t_drop', 'public.t_upd'], 'recovered', \
         restore_point => 'before_accident')",
    );
    assert_eq!(md5_of(&c, "recovered.t_drop"), drop_md5);
    assert_eq!(md5_of(&c, "recovered.t_upd"), upd_md5);
    assert_eq!(
        c.sql("SELECT string_agg(DISTINCT tableowner, ',') FROM pg_tables WHERE schemaname = 'recovered'"),
        "app"
    );
    assert_eq!(c.sql("SELECT DISTINCT v FROM t_drop"), "changed");
    assert!(
        reader.wait().unwrap().success(),
        "the live cluster stopped serving"
    );
    assert_eq!(
        c.sql(&format!(
            "SELECT status || ' ' || requested_by || ' ' || load_role || ' ' || target_kind || ' ' || (record_id IS NOT NULL) \
             || ' ' || (report->'tables'->0->>'rows') FROM backup.recovery_operations WHERE operation_id = {op}"
        )),
        "succeeded app app name true 500"
    );
    assert_eq!(
        c.sql(&format!(
            "SELECT string_agg(action || ':' || actor, ',' ORDER BY audit_id) FROM backup.audit_log \
             WHERE object_type = 'recovery' AND details->>'operation_id' = '{op}'"
        )),
        "run:app,finish:app"
    );
    assert!(scratch_leftovers(&scratch_dir).is_empty());
    eprintln!("table restore {:.1}s", t.elapsed().as_secs_f64());

    // Bad input: a clear SQL error, nothing left behind.
    let t = Instant::now();
    let ops = c.sql("SELECT count(*) FROM backup.recovery_operations");
    let err = sql_error(
        &c,
        "SELECT backup.table_restore(ARRAY['t_drop'], 'recovered', restore_point => 'before_accident')",
    );
    assert!(err.contains("schema \"recovered\" already exists"), "{err}");
    let err = sql_error(
        &c,
        "SELECT backup.table_restore(ARRAY['t_drop'], 'bad1', target_time => '2001-01-01 00:00+00')",
    );
    assert!(err.contains("no backup ends before"), "{err}");
    assert_eq!(
        c.sql("SELECT count(*) FROM backup.recovery_operations"),
        ops
    );
    // An unknown table is found out by walshipper: the run fails, saying so.
    let err = sql_error(
        &c,
        "SELECT backup.table_restore(ARRAY['t_drop', 'no_such'], 'bad2', restore_point => 'before_accident')",
    );
    assert!(
        err.contains("no_such") && err.contains("does not exist"),
        "{err}"
    );
    assert!(err.contains("HINT"), "{err}");
    assert_eq!(
        c.sql("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bad%'"),
        "0"
    );
    assert_eq!(
        c.sql("SELECT count(*) FROM backup.alerts WHERE kind = 'table_restore_failed' AND resolved_at IS NULL"),
        "1"
    );
    assert!(scratch_leftovers(&scratch_dir).is_empty());
    eprintln!("bad input {:.1}s", t.elapsed().as_secs_f64());

    // A restore run from the command line is taken into the catalog at
    // the next refresh, with its audit row.
    let t = Instant::now();
    let o = shipper.restore(&d.join("cli-restore"), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cli = wait_for(
        &c,
        "SELECT kind || ' ' || status || ' ' || (requested_by LIKE '%@%') || ' ' || backup_id FROM backup.recovery_operations \
         WHERE source = 'command_line'",
        &format!("restore succeeded true {backup_id}"),
        Duration::from_secs(30),
    );
    assert!(!cli.is_empty());
    assert_eq!(
        c.sql(
            "SELECT count(*) FROM backup.audit_log a JOIN backup.recovery_operations o \
             ON (a.details->>'operation_id')::bigint = o.operation_id WHERE o.source = 'command_line'"
        ),
        "1"
    );
    // Operations started from SQL are not recorded twice.
    assert_eq!(
        c.sql("SELECT count(*) FROM backup.recovery_operations WHERE source = 'command_line'"),
        "1"
    );
    eprintln!("command-line restore {:.1}s", t.elapsed().as_secs_f64());

    // A restore test cancelled while it runs (held in its checks by a
    // check of its job's that sleeps): walshipper is stopped, its scratch
    // cluster and directory are gone, the run is recorded as cancelled.
    let t = Instant::now();
    c.sql("SELECT backup.job_create('slow-job', '0 4 1 * *', kind => 'restore_test')");
    c.sql("SELECT backup.restore_check_create('slow', 'SELECT 1 FROM pg_sleep(30)', '1', job_name => 'slow-job')");
    c.sql("UPDATE backup.backup_jobs SET next_run_at = now() WHERE name = 'slow-job'");
    let slow = "(SELECT verification_id FROM backup.backup_verifications v JOIN backup.backup_jobs j USING (job_id) \
                WHERE j.name = 'slow-job')";
    wait_for(
        &c,
        &format!("SELECT phase FROM backup.recovery_operations WHERE operation_id = (SELECT operation_id FROM backup.backup_verifications WHERE verification_id = {slow})"),
        "checks",
        Duration::from_secs(60),
    );
    c.sql(&format!("SELECT backup.verification_cancel({slow})"));
    wait_for(
        &c,
        &format!(
            "SELECT v.status || ' ' || o.status || ' ' || v.error FROM backup.backup_verifications v \
             JOIN backup.recovery_operations o USING (operation_id) WHERE v.verification_id = {slow}"
        ),
        "cancelled cancelled cancelled",
        Duration::from_secs(30),
    );
    assert!(
        scratch_leftovers(&scratch_dir).is_empty(),
        "{:?}",
        scratch_leftovers(&scratch_dir)
    );
    c.sql("SELECT backup.job_drop('slow-job')");
    eprintln!("cancelled restore test {:.1}s", t.elapsed().as_secs_f64());

    // A damaged backup file: the restore test fails naming it, with an alert.
    let t = Instant::now();
    let wcfg = walshipper::config::Config::load(Some(&shipper.config)).unwrap();
    let storage = walshipper::storage::open(wcfg.primary()).unwrap();
    let victim = storage
        .list(&format!("backups/{backup_id}/data/"))
        .unwrap()
        .into_iter()
        .max_by_key(|o| o.size)
        .unwrap()
        .key;
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut storage.get(&victim).unwrap().unwrap(), &mut body).unwrap();
    let mid = body.len() / 2;
    body[mid] ^= 0x5a;
    storage.put_replace(&victim, &mut body.as_slice()).unwrap();
    let err = sql_error(&c, "SELECT backup.restore_test_run(wait => true)");
    assert!(
        err.contains("restore test") && err.contains("failed"),
        "{err}"
    );
    assert_eq!(
        c.sql(&format!(
            "SELECT status || ' ' || (error LIKE '%{victim}%') FROM backup.backup_verifications \
             WHERE kind = 'restore_test' ORDER BY verification_id DESC LIMIT 1"
        )),
        "failed true"
    );
    let alert = c.sql(
        "SELECT message FROM backup.alerts WHERE kind = 'restore_test_failed' AND resolved_at IS NULL",
    );
    assert!(alert.contains(&victim), "{alert}");
    // The integrity read-back finds it too, waited for from SQL.
    let err = sql_error(
        &c,
        &format!("SELECT backup.verify_run('{backup_id}', wait => true)"),
    );
    assert!(
        err.contains("verification") && err.contains("failed"),
        "{err}"
    );
    assert_eq!(
        c.sql(&format!(
            "SELECT status || ' ' || (error LIKE '%{victim}%') FROM backup.backup_verifications \
             WHERE kind = 'integrity' ORDER BY verification_id DESC LIMIT 1"
        )),
        "failed true"
    );
    assert_eq!(
        c.sql("SELECT count(*) FROM backup.alerts WHERE kind = 'verification_failed' AND resolved_at IS NULL"),
        "1"
    );
    assert!(scratch_leftovers(&scratch_dir).is_empty());
    eprintln!("damaged backup {:.1}s", t.elapsed().as_secs_f64());
    eprintln!("total {:.1}s", t0.elapsed().as_secs_f64());
}

/// The pid backup.wal_archive_status shows for the WAL receiver.
fn receiver_pid(c: &Cluster) -> i32 {
    c.sql("SELECT receiver_pid FROM backup.wal_archive_status")
        .parse()
        .unwrap()
}

/// pg_backup.wal_streaming: the scheduler keeps the real `walshipper
/// wal-receive` streaming through its slot, restarts it when it is killed,
/// stops it when streaming is turned off, and raises wal_stream_lagging for
/// a slot left pinning WAL and wal_receiver_down for a receiver that cannot
/// start (with its error). In synchronous mode a killed receiver is
/// restarted (the scheduler's own commits do not wait for it); a slot
/// about to lose WAL is a critical alert; DROP EXTENSION stops the
/// receiver and CREATE EXTENSION starts it again with a fresh row.
#[test]
fn the_scheduler_keeps_the_wal_receiver_streaming() {
    let dir = scratch("extstream");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    let c = preloaded_cluster(
        d,
        &shipper,
        &[
            "pg_backup.wal_streaming = on",
            "pg_backup.stream_slot = 'ext_stream'",
            "pg_backup.stream_down_alert = 3",
            "pg_backup.stream_lag_alert = 1",
        ],
    );
    start_with_extension(&shipper, &c);
    let state =
        "SELECT receiver_state || ' ' || coalesce(slot_active, false) || ' ' || receiver_restarts \
                 FROM backup.wal_archive_status";
    wait_for(&c, state, "running true 0", Duration::from_secs(60));
    // What the server writes reaches the repository: the slot (where the
    // receiver reports its flushes) catches up, and the RPO is nil.
    c.sql("CREATE TABLE streamed AS SELECT g FROM generate_series(1, 20000) g");
    let lsn = c.sql("SELECT pg_current_wal_lsn()");
    wait_for(
        &c,
        &format!("SELECT stream_flushed_lsn >= '{lsn}' FROM backup.wal_archive_status"),
        "t",
        Duration::from_secs(30),
    );
    // The RPO is the receiver's: nil once its slot has all the server wrote
    // (the archiver's estimate is never 0 while a segment is being filled).
    wait_for(
        &c,
        "SELECT rpo_estimate = interval '0' FROM backup.wal_archive_status",
        "t",
        Duration::from_secs(30),
    );
    // Killed: started again, the restart counted, streaming again. One
    // exit restarted at once raises no alert; a crash loop does: killed
    // three times, each run shorter than a minute, the backoff growing
    // (1, 2, 4 s), so its exits began more than stream_down_alert (3 s)
    // before its last start, and the alert is raised while it streams.
    let down = "SELECT count(*) FROM backup.alerts WHERE kind = 'wal_receiver_down' AND resolved_at IS NULL";
    for n in 1..=3 {
        let pid = receiver_pid(&c);
        // SAFETY: signalling the receiver process the scheduler started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        wait_for(
            &c,
            state,
            &format!("running true {n}"),
            Duration::from_secs(60),
        );
        assert_ne!(receiver_pid(&c), pid);
        if n == 1 {
            assert_eq!(
                c.sql("SELECT receiver_down_since IS NOT NULL FROM backup.wal_archive_status"),
                "t"
            );
            // Restarted after 1 s: not down for stream_down_alert.
            std::thread::sleep(Duration::from_secs(2));
            assert_eq!(
                c.sql(down),
                "0",
                "one exit restarted at once raised an alert"
            );
        }
    }
    wait_for(&c, down, "1", Duration::from_secs(30));
    // Raised during the loop (while it waited out a backoff, or once
    // running again) and still open while the last run streams.
    assert_eq!(c.sql(state), "running true 3");
    assert_eq!(
        c.sql("SELECT details->>'down_since' IS NOT NULL FROM backup.alerts WHERE kind = 'wal_receiver_down' AND resolved_at IS NULL"),
        "t"
    );
    // A run that has streamed for the stable time (its start moved back a
    // minute instead of waiting one) is up again: resolved, down_since cleared.
    c.sql("UPDATE backup.wal_receiver SET started_at = now() - interval '61 s'");
    wait_for(&c, down, "0", Duration::from_secs(30));
    assert_eq!(
        c.sql("SELECT receiver_down_since IS NULL FROM backup.wal_archive_status"),
        "t"
    );

    // Synchronous: the receiver in synchronous_standby_names, killed. The
    // scheduler's commits are local, so it restarts the receiver (before,
    // its own commit waited for the receiver only it could restart), and a
    // client's commit, waiting meanwhile, returns.
    c.sql("ALTER SYSTEM SET synchronous_standby_names = 'walshipper'");
    c.sql("SELECT pg_reload_conf()");
    wait_for(
        &c,
        "SELECT stream_sync_state FROM backup.wal_archive_status",
        "sync",
        Duration::from_secs(30),
    );
    let pid = receiver_pid(&c);
    // SAFETY: signalling the receiver process the scheduler started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t = std::time::Instant::now();
    let restarted = loop {
        if c.try_sql(state).unwrap_or_default() == "running true 4" {
            break true;
        }
        if t.elapsed() > Duration::from_secs(60) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if !restarted {
        // Unblock the server before failing, or its shutdown waits too.
        c.sql("ALTER SYSTEM SET synchronous_standby_names = ''");
        c.sql("SELECT pg_reload_conf()");
        panic!(
            "the scheduler did not restart the synchronous receiver within 60 s\n{}",
            c.log_text()
        );
    }
    c.sql("INSERT INTO streamed VALUES (0)");
    c.sql("ALTER SYSTEM SET synchronous_standby_names = ''");
    c.sql("SELECT pg_reload_conf()");

    // Turned off: stopped; the slot it leaves behind pins the WAL written
    // since, and above 1 MB that is an alert saying to drop it.
    c.sql("ALTER SYSTEM SET pg_backup.wal_streaming = off");
    c.sql("SELECT pg_reload_conf()");
    wait_for(&c, state, "off false 4", Duration::from_secs(30));
    c.sql(
        "CREATE TABLE pinned AS SELECT g, repeat('x', 200) AS v FROM generate_series(1, 20000) g",
    );
    let lagging = "SELECT count(*) FROM backup.alerts WHERE kind = 'wal_stream_lagging' \
                   AND subject = 'ext_stream' AND resolved_at IS NULL AND message LIKE '%drop the slot%'";
    wait_for(&c, lagging, "1", Duration::from_secs(30));
    c.sql("SELECT pg_drop_replication_slot('ext_stream')");
    wait_for(
        &c,
        lagging
            .replace(" AND message LIKE '%drop the slot%'", "")
            .as_str(),
        "0",
        Duration::from_secs(30),
    );
    // Another physical slot no one uses (not stream_slot) pins WAL too;
    // past max_slot_wal_keep_size it is about to lose WAL, or lost it:
    // critical.
    c.sql("SELECT pg_create_physical_replication_slot('forgotten', true)");
    c.sql("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'");
    c.sql("SELECT pg_reload_conf()");
    for _ in 0..3 {
        c.sql("CREATE TABLE IF NOT EXISTS churn AS SELECT g, repeat('y', 200) AS v FROM generate_series(1, 20000) g");
        c.sql("DROP TABLE churn");
        c.sql("SELECT pg_switch_wal()");
    }
    c.sql("CHECKPOINT");
    wait_for(
        &c,
        "SELECT count(*) FROM backup.alerts WHERE kind = 'wal_stream_lagging' AND subject = 'forgotten' \
           AND severity = 'critical' AND resolved_at IS NULL AND message LIKE '%not pg_backup.stream_slot%'",
        "1",
        Duration::from_secs(30),
    );
    c.sql("SELECT pg_drop_replication_slot('forgotten')");
    c.sql("ALTER SYSTEM RESET max_slot_wal_keep_size");
    c.sql("SELECT pg_reload_conf()");
    wait_for(
        &c,
        "SELECT count(*) FROM backup.alerts WHERE kind = 'wal_stream_lagging' AND resolved_at IS NULL",
        "0",
        Duration::from_secs(30),
    );

    // A receiver that cannot start (a slot name walshipper refuses) is
    // retried with backoff; after stream_down_alert the alert carries its error.
    c.sql("ALTER SYSTEM SET pg_backup.stream_slot = 'Bad-Slot'");
    c.sql("ALTER SYSTEM SET pg_backup.wal_streaming = on");
    c.sql("SELECT pg_reload_conf()");
    wait_for(
        &c,
        "SELECT count(*) FROM backup.alerts WHERE kind = 'wal_receiver_down' AND resolved_at IS NULL",
        "1",
        Duration::from_secs(30),
    );
    let err = c
        .sql("SELECT receiver_state || ': ' || receiver_last_error FROM backup.wal_archive_status");
    assert!(
        err.starts_with("restarting: ") && err.contains("stream.slot"),
        "{err}"
    );
    let msg = c.sql("SELECT message FROM backup.alerts WHERE kind = 'wal_receiver_down' AND resolved_at IS NULL");
    assert!(msg.contains("stream.slot"), "{msg}");
    c.sql("ALTER SYSTEM SET pg_backup.wal_streaming = off");
    c.sql("SELECT pg_reload_conf()");
    wait_for(
        &c,
        "SELECT receiver_state || ' ' || (SELECT count(*) FROM backup.alerts WHERE kind = 'wal_receiver_down' AND resolved_at IS NULL) \
           FROM backup.wal_archive_status",
        "off 0",
        Duration::from_secs(30),
    );

    // DROP EXTENSION stops the receiver (nothing would watch it) and reaps
    // it; CREATE EXTENSION starts it again and records it in the new row.
    c.sql("ALTER SYSTEM SET pg_backup.stream_slot = 'ext_stream'");
    c.sql("ALTER SYSTEM SET pg_backup.wal_streaming = on");
    c.sql("SELECT pg_reload_conf()");
    wait_for(
        &c,
        "SELECT receiver_state || ' ' || coalesce(slot_active, false) FROM backup.wal_archive_status",
        "running true",
        Duration::from_secs(60),
    );
    let pid = receiver_pid(&c);
    c.sql("DROP EXTENSION pg_backup_ext CASCADE");
    let t = std::time::Instant::now();
    // Gone, not a zombie: /proc/<pid> disappears once it is reaped.
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the receiver {pid} still exists 30 s after DROP EXTENSION"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    c.sql("CREATE EXTENSION pg_backup_ext");
    wait_for(&c, state, "running true 0", Duration::from_secs(60));
    c.sql("ALTER SYSTEM SET pg_backup.wal_streaming = off");
    c.sql("SELECT pg_reload_conf()");
    wait_for(&c, state, "off false 0", Duration::from_secs(30));
}
