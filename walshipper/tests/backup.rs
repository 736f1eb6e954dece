//! Base backups and restores of a real cluster under load, checked by
//! PostgreSQL's own tools: pg_verifybackup before start, pg_amcheck and
//! pg_checksums after recovery, and a content comparison with the source.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIN: Duration = Duration::from_secs(60);

fn fingerprint(c: &Cluster) -> String {
    c.sql(
        "SELECT (SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a) || ' ' || \
                (SELECT md5(string_agg(b::text, ',' ORDER BY bid)) FROM pgbench_branches b) || ' ' || \
                (SELECT count(*) FROM pgbench_history) || ' ' || \
                (SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM in_tablespace t)",
    )
}

#[test]
fn backup_under_load_restores_identical_and_passes_postgres_checks() {
    let dir = scratch("bkp");
    let d = dir.path();
    let (shipper, src) = archiving_cluster(
        d,
        "src",
        &["wal_level = replica", "track_commit_timestamp = on"],
    );
    src.pgbench(&["-i", "-s", "3", "-q"]);
    let ts_dir = d.join("ts1");
    std::fs::create_dir_all(&ts_dir).unwrap();
    src.sql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_dir.display()
    ));
    src.sql("CREATE TABLE in_tablespace (id int PRIMARY KEY, v text) TABLESPACE ts1");
    src.sql("INSERT INTO in_tablespace SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    src.sql("CREATE UNLOGGED TABLE scratch_unlogged AS SELECT g FROM generate_series(1, 1000) g");
    let ts_oid = src.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'");
    // What is not this cluster's in a tablespace (another version's
    // directory, as pg_upgrade leaves it, and a stray file) is left out of
    // the backup: restore refuses a manifest that lists it.
    std::fs::create_dir_all(ts_dir.join("PG_14_202107181/1")).unwrap();
    std::fs::write(ts_dir.join("PG_14_202107181/1/1234"), b"old").unwrap();
    std::fs::write(ts_dir.join("stray"), b"x").unwrap();

    // Backup while pgbench writes.
    let mut bench = Command::new(pg_bin("pgbench"))
        .args(["-U", "postgres", "-h"])
        .arg(&src.socket)
        .args(["-n", "-c", "2", "-T", "6", "postgres"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let done = shipper.backup(&["--jobs", "2"]);
    assert!(bench.wait().unwrap().success());
    assert_eq!(
        done["checksum_failures"], 0,
        "real pages failed our checksum check: {done}"
    );
    src.sql("UPDATE in_tablespace SET v = 'after backup' WHERE id <= 100");
    src.switch_and_wait_archived(MIN);
    let expected = fingerprint(&src);
    src.stop();

    // info agrees with the backup's own report.
    let info = shipper.info();
    let b = &info["backups"][0];
    assert_eq!(b["id"], done["backup_id"]);
    assert_eq!(b["start_lsn"], done["start_lsn"]);
    assert_eq!(b["stop_lsn"], done["stop_lsn"]);
    assert!(b["stored_size"].as_u64().unwrap() < b["size"].as_u64().unwrap());

    // Restore, remapping the tablespace (the original location is in use).
    let r1 = d.join("r1");
    let ts_new = d.join("ts1-restored");
    let o = shipper.restore(
        &r1,
        &[
            "--tablespace-map",
            &format!("{ts_oid}={}", ts_new.display()),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!ts_new.join("PG_14_202107181").exists() && !ts_new.join("stray").exists());
    let in_wal: Vec<_> = r1
        .join("pg_wal")
        .read_dir()
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        in_wal,
        vec![std::ffi::OsString::from("archive_status")],
        "pg_wal must start empty"
    );
    assert!(!r1.join("postmaster.pid").exists());

    // pg_verifybackup checks every file and parses the WAL range with pg_waldump.
    shipper.verify_restored(&done, &r1, &d.join("walcopy"));

    let c1 = start_restored(d, "r1", &[]);
    assert_eq!(
        fingerprint(&c1),
        expected,
        "restored data differs from the source"
    );
    assert_eq!(
        c1.sql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'"),
        ts_new.display().to_string()
    );
    // Unlogged tables come back empty, as after a crash.
    assert_eq!(c1.sql("SELECT count(*) FROM scratch_unlogged"), "0");
    postgres_checks(c1);

    // Refusals: a non-empty directory, a target before any backup, a target beyond the archive.
    let o = shipper.restore(&r1, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not empty"));
    let o = shipper.restore(&d.join("r2"), &["--target-time", "2001-01-01 00:00:00+00"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("earlier than any backup"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = shipper.restore(&d.join("r2"), &["--target-time", "2099-01-01 00:00:00+00"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("beyond the archived WAL"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!d.join("r2").exists() || d.join("r2").read_dir().unwrap().next().is_none());

    // --delta over the used directory rewrites what changed and recovers again.
    let o = shipper.restore(
        &r1,
        &[
            "--delta",
            "--tablespace-map",
            &format!("{ts_oid}={}", ts_new.display()),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c1 = start_restored(d, "r1", &[]);
    assert_eq!(fingerprint(&c1), expected);
    c1.stop();
}

/// Runs `n` marker transactions, one every ~100 ms, recording for each the
/// WAL insert position before it and a restore point after every tenth.
fn markers(c: &Cluster, from: i32, n: i32) {
    c.sql(&format!(
        "DO $$ BEGIN FOR i IN {from}..{} LOOP \
            INSERT INTO marker VALUES (i, pg_current_wal_insert_lsn()); COMMIT; \
            IF i % 10 = 0 THEN PERFORM pg_create_restore_point('rp_' || i); END IF; \
            PERFORM pg_sleep(0.1); \
         END LOOP; END $$",
        from + n - 1
    ));
}

#[test]
fn point_in_time_targets_stop_exactly_where_asked() {
    let dir = scratch("pitr2");
    let d = dir.path();
    let (shipper, src) = archiving_cluster(
        d,
        "src",
        &["wal_level = replica", "track_commit_timestamp = on"],
    );
    src.pgbench(&["-i", "-s", "1", "-q"]);
    src.sql("CREATE TABLE marker (id int PRIMARY KEY, lsn_before pg_lsn)");
    let mut bench = Command::new(pg_bin("pgbench"))
        .args(["-U", "postgres", "-h"])
        .arg(&src.socket)
        .args(["-n", "-c", "2", "-T", "12", "postgres"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    shipper.backup(&[]);
    markers(&src, 1, 60);
    assert!(bench.wait().unwrap().success());
    src.switch_and_wait_archived(MIN);

    let commit_ts = |k: i32| {
        src.sql(&format!(
            "SELECT pg_xact_commit_timestamp(xmin)::text FROM marker WHERE id = {k}"
        ))
    };
    let mut cases: Vec<(String, Vec<String>, i32)> = Vec::new();
    // Random times between two markers' commits.
    let seed = std::process::id() as i32;
    for (i, k) in [7 + seed % 13, 23 + seed % 11, 41 + seed % 9]
        .into_iter()
        .enumerate()
    {
        let mid = src.sql(&format!(
            "SELECT (a + (b - a) * {})::text FROM (SELECT pg_xact_commit_timestamp(xmin) a FROM marker WHERE id = {k}) x, \
             (SELECT pg_xact_commit_timestamp(xmin) b FROM marker WHERE id = {}) y",
            ["0.5", "0.2", "0.8"][i],
            k + 1
        ));
        assert!(mid > commit_ts(k));
        cases.push((format!("time{k}"), vec!["--target-time".into(), mid], k));
    }
    // An LSN just before marker 35's transaction: markers 1..34.
    let lsn = src.sql("SELECT lsn_before::text FROM marker WHERE id = 35");
    cases.push(("lsn".into(), vec!["--target-lsn".into(), lsn], 34));
    // A named restore point, made right after marker 50 committed.
    cases.push((
        "name".into(),
        vec!["--target-name".into(), "rp_50".into()],
        50,
    ));
    // An xid: the transaction of marker 17, inclusive.
    let xid = src.sql("SELECT xmin::text FROM marker WHERE id = 17");
    cases.push(("xid".into(), vec!["--target-xid".into(), xid], 17));
    src.stop();

    for (name, args, expect) in cases {
        let target = d.join(&name);
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.extend(["--target-action", "promote"]);
        let o = shipper.restore(&target, &all);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let c = start_restored(d, &name, &[]);
        assert_eq!(
            c.sql("SELECT count(*) || ' ' || max(id) FROM marker"),
            format!("{expect} {expect}"),
            "{name}: wrong stopping point; log:\n{}",
            c.log_text()
        );
        c.stop();
        std::fs::remove_dir_all(&target).unwrap();
    }
}
