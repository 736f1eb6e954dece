//! restore-test and table-restore against a real archiving cluster: one
//! cluster, one backup taken under pgbench load, every case in turn (each
//! restores a scratch copy, so they share what they can).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn events(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn one<'a>(ev: &'a [serde_json::Value], name: &str, o: &Output) -> &'a serde_json::Value {
    let found: Vec<&serde_json::Value> = ev.iter().filter(|e| e["event"] == name).collect();
    assert_eq!(found.len(), 1, "one {name} event expected:\n{}", text(o));
    found[0]
}

/// Processes whose command line mentions `path` (a scratch server left behind).
fn processes_under(path: &Path) -> Vec<String> {
    let want = path.display().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if cmd.contains(&want) && !zombie {
            found.push(format!("{name}: {cmd}"));
        }
    }
    found
}

/// What the scratch directory holds besides `logs/`.
fn leftovers(scratch: &Path) -> Vec<String> {
    std::fs::read_dir(scratch)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "logs")
                .collect()
        })
        .unwrap_or_default()
}

fn assert_clean(scratch: &Path) {
    assert_eq!(
        leftovers(scratch),
        Vec::<String>::new(),
        "scratch dir not empty"
    );
    assert_eq!(
        processes_under(scratch),
        Vec::<String>::new(),
        "processes left"
    );
}

/// md5 of a table's rows in order, at this moment.
fn md5_of(c: &Cluster, table: &str) -> String {
    c.sql(&format!(
        "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t"
    ))
}

/// Spawns walshipper with --json, reads its stdout until a `phase` event
/// for `phase` appears; returns the child.
fn spawn_until_phase(s: &Shipper, args: &[&str], phase: &str) -> std::process::Child {
    let mut child = s
        .cmd()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    loop {
        let l = lines
            .next()
            .unwrap_or_else(|| panic!("walshipper ended before phase {phase}"))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
        if v["event"] == "phase" && v["phase"] == phase {
            break;
        }
    }
    // Keep draining so that walshipper never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn restore_tests_and_table_restores() {
    let t0 = Instant::now();
    let d = scratch("rtest");
    let (s, c) = archiving_cluster(d.path(), "pg", &[]);
    let scratch_dir: PathBuf = d.path().join("scr");
    let bin = pg_bin("postgres").parent().unwrap().to_path_buf();
    let mut conf = std::fs::read_to_string(&s.config).unwrap();
    conf.push_str(&format!(
        "[restore_test]\nscratch_dir = \"{}\"\npg_bin_dir = \"{}\"\n",
        scratch_dir.display(),
        bin.display()
    ));
    std::fs::write(&s.config, conf).unwrap();

    // The data: pgbench, and tables for table-restore with an index and a
    // foreign key between them, under a mixed-case name.
    c.pgbench(&["-i", "-s", "2", "-q"]);
    c.sql(
        "CREATE ROLE app LOGIN; GRANT CREATE ON DATABASE postgres TO app; \
         CREATE TABLE t_drop(id int PRIMARY KEY, v text, s serial); \
         CREATE TABLE \"T_upd\"(id int PRIMARY KEY, d_id int REFERENCES t_drop, v text); \
         CREATE INDEX t_upd_v ON \"T_upd\"(v); \
         INSERT INTO t_drop SELECT g, 'd' || g FROM generate_series(1, 500) g; \
         INSERT INTO \"T_upd\" SELECT g, g, 'u' || g FROM generate_series(1, 500) g; \
         CREATE TABLE rt(x int); INSERT INTO rt VALUES (1), (2), (3);",
    );
    // A table whose CHECK constraint calls a function of app's, which runs
    // during the load (COPY): under SET ROLE from a superuser it would
    // RESET ROLE and make app a superuser; it records who it ran as.
    c.sql(
        "CREATE TABLE seen(session_u text, current_u text); GRANT INSERT ON seen TO app; \
         CREATE FUNCTION app_check(int) RETURNS bool LANGUAGE plpgsql AS $f$ BEGIN \
           IF session_user <> current_user THEN RESET ROLE; ALTER ROLE app SUPERUSER; END IF; \
           INSERT INTO public.seen VALUES (session_user, current_user); RETURN true; END $f$; \
         ALTER FUNCTION app_check(int) OWNER TO app; \
         CREATE TABLE t_chk(id int CHECK (public.app_check(id))); \
         INSERT INTO t_chk VALUES (1), (2);",
    );
    // Production's event trigger, enabled the default way: it must not
    // fire on table-restore's DDL in the scratch copy.
    c.sql(
        "CREATE FUNCTION no_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $f$ BEGIN \
           IF current_setting('cluster_name') = 'walshipper-scratch' THEN \
             RAISE EXCEPTION 'production event trigger fired in the scratch copy'; END IF; END $f$; \
         CREATE EVENT TRIGGER no_ddl ON ddl_command_start \
           WHEN TAG IN ('ALTER TABLE', 'DROP TRIGGER', 'CREATE SCHEMA') EXECUTE FUNCTION no_ddl();",
    );
    let before_backups = c.sql("SELECT now()");
    // A backup taken while pgbench writes.
    let mut bench = Command::new(pg_bin("pgbench"))
        .args(["-U", "postgres", "-h"])
        .arg(&c.socket)
        .args(["-c", "2", "-T", "6", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let done = s.backup(&[]);
    let backup_id = done["backup_id"].as_str().unwrap().to_string();
    assert!(bench.wait().unwrap().success());
    let drop_md5 = md5_of(&c, "t_drop");
    let upd_md5 = md5_of(&c, "\"T_upd\"");
    c.sql("SELECT pg_create_restore_point('rt-point')");
    // After the point: the accident, and more work.
    c.sql("DROP TABLE \"T_upd\"; UPDATE t_drop SET v = 'changed'; INSERT INTO rt VALUES (4);");
    c.switch_and_wait_archived(Duration::from_secs(60));
    eprintln!("setup {:.1}s", t0.elapsed().as_secs_f64());

    // 1. The end of the archived WAL, with custom checks: passes.
    let t = Instant::now();
    let o = run(s.cmd().args([
        "restore-test",
        "--json",
        "--check-json",
        r#"{"name":"rows","query":"SELECT count(*), sum(x) FROM rt","expected":"4|10"}"#,
        "--check-json",
        r#"{"name":"who","query":"SELECT current_setting('transaction_read_only'), r.rolsuper FROM pg_roles r WHERE r.rolname = current_user","expected":"on|f"}"#,
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let ev = events(&o);
    let r = one(&ev, "restore_test", &o);
    assert_eq!(r["passed"], true);
    assert_eq!(r["backup_id"], backup_id.as_str());
    assert_eq!(r["target"]["kind"], "end");
    let (rs, ps, cs, ts) = (
        r["restore_s"].as_f64().unwrap(),
        r["replay_s"].as_f64().unwrap(),
        r["checks_s"].as_f64().unwrap(),
        r["total_s"].as_f64().unwrap(),
    );
    assert!(rs > 0.0 && ps > 0.0 && cs > 0.0, "{r}");
    assert!((ts - (rs + ps + cs)).abs() < 1e-6, "{r}");
    let names: Vec<&str> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for want in [
        "pg_verifybackup",
        "target",
        "pg_amcheck postgres",
        "custom: rows",
        "custom: who",
    ] {
        assert!(names.contains(&want), "no check {want}: {names:?}");
    }
    assert!(
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["passed"] == true),
        "{r}"
    );
    assert!(
        r["recovered_lsn"].is_string() && r["server_log"].is_null(),
        "{r}"
    );
    eprintln!("{r:#}");
    let phases: Vec<&str> = ev
        .iter()
        .filter(|e| e["event"] == "phase")
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["restore", "checks", "replay", "checks", "cleanup"]);
    assert_eq!(ev.last().unwrap()["event"], "restore_test");
    assert_clean(&scratch_dir);
    // The promoted copy (a new timeline) archived nothing into the repository.
    assert!(
        !s.has_wal("00000002.history"),
        "the scratch server archived"
    );
    eprintln!("restore test to the end {:.1}s", t.elapsed().as_secs_f64());

    // 2. To the restore point, with a check that fails: exit 6, the
    //    position right, the server log kept.
    let t = Instant::now();
    let o = run(s.cmd().args([
        "restore-test",
        "--json",
        "--target-name",
        "rt-point",
        "--check-json",
        r#"{"name":"at the point","query":"SELECT count(*) FROM rt","expected":"3"}"#,
        "--check-json",
        r#"{"name":"wrong","query":"SELECT count(*) FROM rt","expected":"999"}"#,
    ]));
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    let ev = events(&o);
    let r = one(&ev, "restore_test", &o);
    assert_eq!(r["passed"], false);
    let check = |n: &str| {
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap_or_else(|| panic!("no check {n}: {r}"))
            .clone()
    };
    assert_eq!(check("target")["passed"], true, "{r}");
    assert!(check("target")["detail"]
        .as_str()
        .unwrap()
        .contains("restore point \"rt-point\""));
    assert_eq!(check("custom: at the point")["passed"], true, "{r}");
    assert_eq!(check("custom: wrong")["passed"], false);
    assert!(
        r["error"].as_str().unwrap().contains("custom: wrong"),
        "{r}"
    );
    let log = PathBuf::from(r["server_log"].as_str().expect("a kept log"));
    assert!(log.starts_with(scratch_dir.join("logs")) && log.exists());
    assert_eq!(ev.last().unwrap()["event"], "error");
    assert_eq!(ev.last().unwrap()["code"], 6);
    assert_clean(&scratch_dir);
    eprintln!("restore test to a point {:.1}s", t.elapsed().as_secs_f64());

    // 2b. To a restore point that was never made: PostgreSQL stops at the
    //     end of the WAL without reaching it; exit 6 with its words, human
    //     output, the log kept.
    let t = Instant::now();
    let o = run(s
        .cmd()
        .args(["restore-test", "--target-name", "no-such-point"]));
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("{out}{err}");
    assert!(
        out.contains("FAILED") && out.contains("measured RTO"),
        "{out}"
    );
    assert!(
        err.contains("stopped during recovery") && err.contains("recovery target"),
        "{err}"
    );
    assert!(out.contains("log is kept in"), "{out}");
    assert_clean(&scratch_dir);
    eprintln!(
        "restore test to a missing point {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // 3. table-restore of a dropped and an updated table, at the point,
    //    while the live cluster serves a read load.
    let t = Instant::now();
    let mut reader = Command::new(pg_bin("pgbench"))
        .args(["-U", "postgres", "-h"])
        .arg(&c.socket)
        .args(["-c", "1", "-S", "-R", "20", "-T", "8", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.sql("TRUNCATE seen");
    let o = run(s.cmd().args([
        "table-restore",
        "--json",
        "--database",
        "postgres",
        "--table",
        "T_DROP",
        "--table",
        "public.\"T_upd\"",
        "--table",
        "t_chk",
        "--into-schema",
        "Recovered",
        "--role",
        "app",
        "--target-name",
        "rt-point",
    ]));
    assert!(o.status.success(), "{}", text(&o));
    let ev = events(&o);
    let r = one(&ev, "table_restore", &o);
    assert_eq!(r["schema"], "Recovered");
    let tables = r["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 3, "{r}");
    assert_eq!(tables[2]["rows"], 2);
    // The load ran as app itself: its function could not become the
    // superuser.
    assert_eq!(
        c.sql("SELECT string_agg(DISTINCT session_u || '/' || current_u, ',') FROM seen"),
        "app/app"
    );
    assert_eq!(
        c.sql("SELECT rolsuper FROM pg_roles WHERE rolname = 'app'"),
        "f"
    );
    assert_eq!(tables[0]["source"], "public.t_drop");
    assert_eq!(tables[0]["restored_as"], "\"Recovered\".t_drop");
    assert_eq!(tables[0]["rows"], 500);
    assert_eq!(tables[1]["restored_as"], "\"Recovered\".\"T_upd\"");
    assert!(r["copy_s"].as_f64().unwrap() > 0.0);
    assert_eq!(md5_of(&c, "\"Recovered\".t_drop"), drop_md5);
    // Its owned sequence came along, where it was.
    assert_eq!(
        c.sql("SELECT last_value FROM \"Recovered\".t_drop_s_seq"),
        "500"
    );
    assert_eq!(md5_of(&c, "\"Recovered\".\"T_upd\""), upd_md5);
    // Indexes (two keys and t_upd_v), the foreign key inside the set,
    // everything owned by app.
    assert_eq!(
        c.sql("SELECT count(*) FROM pg_indexes WHERE schemaname = 'Recovered'"),
        "3"
    );
    assert_eq!(
        c.sql("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND connamespace = '\"Recovered\"'::regnamespace"),
        "1"
    );
    assert_eq!(
        c.sql("SELECT string_agg(DISTINCT tableowner, ',') FROM pg_tables WHERE schemaname = 'Recovered'"),
        "app"
    );
    // The live table is untouched (still changed).
    assert_eq!(c.sql("SELECT DISTINCT v FROM t_drop"), "changed");
    assert!(
        reader.wait().unwrap().success(),
        "the live cluster stopped serving"
    );
    assert_clean(&scratch_dir);
    eprintln!("table-restore {:.1}s", t.elapsed().as_secs_f64());

    // 4. Bad input: a clear error, exit 2, nothing left behind.
    let t = Instant::now();
    let bad = |args: &[&str], want: &str| {
        let o = run(s
            .cmd()
            .args(["table-restore", "--database", "postgres", "--role", "app"])
            .args(args));
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        eprintln!("{err}");
        assert!(err.contains(want), "{want:?} not in: {err}");
        assert_clean(&scratch_dir);
        assert_eq!(
            c.sql("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bad%'"),
            "0"
        );
    };
    bad(
        &["--table", "t_drop", "--into-schema", "Recovered"],
        "schema \"Recovered\" already exists",
    );
    bad(
        &[
            "--table",
            "t_drop",
            "--into-schema",
            "bad1",
            "--target-time",
            &before_backups,
        ],
        "earlier than any backup",
    );
    bad(
        &[
            "--table",
            "t_drop",
            "--table",
            "no_such",
            "--into-schema",
            "bad2",
            "--target-name",
            "rt-point",
        ],
        "table public.no_such does not exist",
    );
    eprintln!("bad input {:.1}s", t.elapsed().as_secs_f64());

    // 5. SIGTERM during replay: stopped, removed, non-zero.
    let t = Instant::now();
    let mut child = spawn_until_phase(&s, &["restore-test", "--json"], "replay");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status}");
    assert_clean(&scratch_dir);
    eprintln!("SIGTERM {:.1}s", t.elapsed().as_secs_f64());

    // 6. SIGKILL once the server runs: the server dies with walshipper
    //    (PDEATHSIG), its directory stays until the next run sweeps it.
    let t = Instant::now();
    // A slow check keeps the run alive until it is killed.
    let slow = r#"{"name":"slow","query":"SELECT pg_sleep(30)","expected":""}"#;
    let mut child = spawn_until_phase(
        &s,
        &["restore-test", "--json", "--check-json", slow],
        "replay",
    );
    wait_until("the scratch server", Duration::from_secs(30), || {
        processes_under(&scratch_dir)
            .iter()
            .any(|p| p.contains("postgres"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until(
        "the scratch server to exit",
        Duration::from_secs(30),
        || processes_under(&scratch_dir).is_empty(),
    );
    assert_eq!(
        leftovers(&scratch_dir).len(),
        1,
        "the killed run's directory"
    );
    eprintln!("SIGKILL {:.1}s", t.elapsed().as_secs_f64());

    // 7. A damaged data object of the backup: exit 126 naming it; the
    //    killed run's directory is swept first. A second repository, a
    //    sound copy made before the damage, is not fallen back to: a
    //    restore test tests the one repository it names (the primary).
    let t = Instant::now();
    let cfg = walshipper::config::Config::load(Some(&s.config)).unwrap();
    let storage = walshipper::storage::open(cfg.primary()).unwrap();
    let second = d.path().join("repo2");
    std::fs::create_dir(&second).unwrap();
    let copy = walshipper::storage::open(&walshipper::config::RepoConfig {
        kind: "posix".into(),
        path: second.clone(),
        ..Default::default()
    })
    .unwrap();
    for o in storage.list("").unwrap() {
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut storage.get(&o.key).unwrap().unwrap(), &mut body).unwrap();
        copy.put_replace(&o.key, &mut body.as_slice()).unwrap();
    }
    let two_repos = |args: &[&str]| {
        run(s
            .cmd()
            .env("WALSHIPPER_REPO2_PATH", &second)
            .env("WALSHIPPER_REPO2_TYPE", "posix")
            .args(args))
    };
    let prefix = format!("backups/{backup_id}/data/");
    let victim = storage
        .list(&prefix)
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
    let o = two_repos(&["restore-test", "--json"]);
    assert_eq!(o.status.code(), Some(126), "{}", text(&o));
    let ev = events(&o);
    let r = one(&ev, "restore_test", &o);
    assert_eq!(r["passed"], false);
    assert_eq!(r["repository"], "repo1");
    let err = r["error"].as_str().unwrap();
    assert!(err.contains("damaged") && err.contains(&victim), "{err}");
    assert_eq!(ev.last().unwrap()["kind"], "damaged");
    assert_clean(&scratch_dir);
    // The sound copy, named: passes (its record goes to repo2).
    let o = two_repos(&["restore-test", "--json", "--repo", "repo2"]);
    assert!(o.status.success(), "{}", text(&o));
    let ev = events(&o);
    let r = one(&ev, "restore_test", &o);
    assert_eq!(
        (&r["passed"], &r["repository"]),
        (&true.into(), &"repo2".into())
    );
    assert_clean(&scratch_dir);
    eprintln!("damaged {:.1}s", t.elapsed().as_secs_f64());

    // Every run is on record in the repository, the interrupted one too.
    let repo = walshipper::repo::Repository::open(&cfg).unwrap();
    let recs = walshipper::recovery_log::list(&repo, None).unwrap();
    let summary: Vec<(String, bool)> = recs
        .iter()
        .map(|r| (r.operation.clone(), r.succeeded))
        .collect();
    let want: Vec<(String, bool)> = [
        ("restore_test", true),
        ("restore_test", false),
        ("restore_test", false), // no such point
        ("table_restore", true),
        // bad input: the target before every backup has no backup to
        // record; the unknown table has one
        ("table_restore", false),
        ("restore_test", false), // SIGTERM
        ("restore_test", false), // damaged (the SIGKILLed run left none)
    ]
    .iter()
    .map(|(o, ok)| (o.to_string(), *ok))
    .collect();
    assert_eq!(summary, want, "{recs:#?}");
    assert!(recs[5].error.as_deref().unwrap().contains("SIGTERM"));
    assert_eq!(recs[4].databases, ["postgres"]);
    assert!(recs[6].error.as_deref().unwrap().contains("damaged"));
    eprintln!("total {:.1}s", t0.elapsed().as_secs_f64());
}
