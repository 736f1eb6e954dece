//! `restore --db-include`: one database of several comes back, identical,
//! the others as sparse zero files that cannot be connected to and are
//! dropped; PostgreSQL's own checks pass on what remains. And the
//! repository's records of restores (`recoveries/`) as `info --json` lists
//! them: a success, a failure, paging, damaged and renamed records.
//! One cluster for all of it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const MIN: Duration = Duration::from_secs(60);

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn sql_in(c: &Cluster, db: &str, sql: &str) -> String {
    run_ok(c.psql_cmd().args(["-d", db, "-c", sql]))
        .trim()
        .to_string()
}

/// Every row of every table of `db`, in order, hashed per table.
fn fingerprint(c: &Cluster, db: &str) -> String {
    sql_in(
        c,
        db,
        "SELECT (SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM items t) || ' ' || \
                (SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM spaced t) || ' ' || \
                (SELECT count(*) FROM items WHERE note = 'after backup')",
    )
}

/// Regular files below `dir` (not following links), with their sizes and
/// allocated 512-byte blocks summed.
fn usage(dir: &Path) -> (u64, u64, u64) {
    let (mut files, mut size, mut blocks) = (0, 0, 0);
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        if m.is_dir() {
            let (f, s, b) = usage(&e.path());
            files += f;
            size += s;
            blocks += b;
        } else if m.is_file() {
            files += 1;
            size += m.len();
            blocks += m.blocks();
        }
    }
    (files, size, blocks)
}

fn recoveries(shipper: &Shipper, extra: &[&str]) -> (Vec<serde_json::Value>, String) {
    let o = run(shipper.cmd().args(["info", "--json"]).args(extra));
    assert!(o.status.success(), "{}", text(&o));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let list = info["repositories"][0]["recoveries"]
        .as_array()
        .unwrap_or_else(|| panic!("no recoveries array: {info}"))
        .clone();
    (list, String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn one_database_restored_the_others_sparse_and_dropped_and_every_restore_on_record() {
    let dir = scratch("dbinc");
    let d = dir.path();
    // Without data checksums (and wal_log_hints): a VACUUM then logs
    // heap VISIBLE records without a full-page image, which replay applies
    // to the excluded databases' zero pages (invalid pages: recovery needs
    // ignore_invalid_pages, or PANICs).
    let (shipper, src) = archiving_cluster_with(d, "src", &["--no-data-checksums"], &[]);
    assert_eq!(src.sql("SHOW data_checksums"), "off");
    assert_eq!(src.sql("SHOW wal_log_hints"), "off");
    let ts_dir = d.join("ts1");
    std::fs::create_dir_all(&ts_dir).unwrap();
    src.sql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_dir.display()
    ));
    let ts_oid = src.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'");
    // Three user databases, each with a table in the default tablespace
    // (with an index) and one in ts1.
    let dbs = ["app_one", "app two", "app3"];
    for db in dbs {
        src.sql(&format!("CREATE DATABASE \"{db}\""));
        sql_in(
            &src,
            db,
            "CREATE TABLE items (id int PRIMARY KEY, note text, n int);
             INSERT INTO items SELECT g, md5(g::text), g % 97 FROM generate_series(1, 20000) g;
             CREATE INDEX ON items (n);
             CREATE TABLE spaced (id int PRIMARY KEY, v text) TABLESPACE ts1;
             INSERT INTO spaced SELECT g, repeat('x', g % 50) FROM generate_series(1, 5000) g;
             CREATE TABLE vis (id int) WITH (autovacuum_enabled = off);
             INSERT INTO vis SELECT generate_series(1, 5000);",
        );
    }
    let done = shipper.backup(&[]);
    // Changes after the backup in every database: WAL replay writes into
    // the excluded ones' files too.
    for db in dbs {
        sql_in(
            &src,
            db,
            "UPDATE items SET note = 'after backup' WHERE id % 10 = 0;
             INSERT INTO items SELECT g, 'new', 1 FROM generate_series(20001, 25000) g;
             DELETE FROM spaced WHERE id % 3 = 0;
             CREATE TABLE later AS SELECT g FROM generate_series(1, 1000) g;",
        );
        // Pages untouched since the backup made all-visible.
        sql_in(&src, db, "VACUUM vis");
    }
    let oids: Vec<String> = dbs
        .iter()
        .map(|db| {
            src.sql(&format!(
                "SELECT oid FROM pg_database WHERE datname = '{db}'"
            ))
        })
        .collect();
    src.switch_and_wait_archived(MIN);
    let expected = fingerprint(&src, "app_one");
    src.stop();

    // A database the backup does not have: exit 2, naming those it has.
    let r0 = d.join("r0");
    let o = shipper.restore(&r0, &["--db-include", "app_one", "--db-include", "nope"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("\"nope\"") && err.contains(r#""app two", "app3", "app_one", "postgres""#),
        "{err}"
    );
    assert!(!r0.exists(), "nothing left behind");

    // Restore one database, to the end of the archive.
    let r1 = d.join("r1");
    let ts_new = d.join("ts1-restored");
    let o = shipper.restore(
        &r1,
        &[
            "--db-include",
            "app_one",
            "--tablespace-map",
            &format!("{ts_oid}={}", ts_new.display()),
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "done", "{out}");
    let mut restored: Vec<&str> = last["databases_restored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    restored.sort();
    assert_eq!(
        restored,
        ["app_one", "postgres", "template0", "template1"],
        "{last}"
    );
    assert_eq!(
        last["databases_excluded"],
        serde_json::json!(["app two", "app3"]),
        "{last}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(r#"DROP DATABASE "app two";"#)
            && err.contains(r#"DROP DATABASE "app3";"#)
            && err.contains("ALTER SYSTEM RESET ignore_invalid_pages;"),
        "{err}"
    );
    let auto = std::fs::read_to_string(r1.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("\nignore_invalid_pages = on\n"), "{auto}");

    // The excluded databases' files: the backup's sizes, nothing allocated,
    // in the data directory and in the tablespace.
    let ts_version_dir = std::fs::read_dir(&ts_new)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("PG_15_")
        })
        .expect("the tablespace's version directory");
    let mut ignore: Vec<String> = Vec::new();
    for (i, oid) in oids.iter().enumerate() {
        for (root, rel) in [
            (r1.join("base").join(oid), format!("base/{oid}")),
            (
                ts_version_dir.join(oid),
                format!(
                    "pg_tblspc/{ts_oid}/{}/{oid}",
                    ts_version_dir.file_name().unwrap().to_string_lossy()
                ),
            ),
        ] {
            let (files, size, blocks) = usage(&root);
            assert!(files > 0 && size > 0, "{rel}: {files} files, {size} bytes");
            if i == 0 {
                assert!(blocks * 512 >= size / 2, "{rel} restored: {blocks} blocks");
            } else {
                assert_eq!(blocks, 0, "{rel}: excluded, but {blocks} blocks allocated");
                ignore.push(rel);
            }
        }
    }
    let mut said: Vec<String> = last["pg_verifybackup_ignore"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    said.sort();
    ignore.sort();
    assert_eq!(said, ignore, "{last}");
    // pg_verifybackup with those directories skipped: every other file
    // checks out, and the backup's WAL parses.
    let walcopy = d.join("walcopy");
    shipper.fetch_wal(
        &segment_range(
            done["wal_start"].as_str().unwrap(),
            done["wal_stop"].as_str().unwrap(),
        ),
        &walcopy,
    );
    let mut verify = Command::new(pg_bin("pg_verifybackup"));
    verify.arg("-w").arg(&walcopy);
    for i in &ignore {
        verify.args(["-i", i]);
    }
    let out = run_ok(verify.arg(&r1));
    assert!(out.contains("successfully verified"), "{out}");

    // Recovered: the included database is identical; the others cannot be
    // connected to until they are dropped; then PostgreSQL's checks pass.
    let c = start_restored(d, "r1", &[]);
    assert_eq!(fingerprint(&c, "app_one"), expected);
    for db in ["app two", "app3"] {
        let o = run(c
            .psql_cmd()
            .args(["-d", db, "-c", "SELECT count(*) FROM items"]));
        assert!(!o.status.success(), "{db} answered: {}", text(&o));
        // Refused for its empty files (PG_VERSION is zeros too).
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("is not a valid data directory"),
            "{}",
            text(&o)
        );
        c.sql(&format!("DROP DATABASE \"{db}\""));
    }
    assert_eq!(
        c.sql("SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database"),
        "app_one,postgres,template0,template1"
    );
    postgres_checks(c);

    // The record of each restore: the failed one, then the one that worked.
    // (Two restores in one second sort by the random part of their ids.)
    let (recs, _) = recoveries(&shipper, &[]);
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert!(recs[0]["id"].as_str() < recs[1]["id"].as_str(), "{recs:?}");
    let failed = recs.iter().find(|r| r["succeeded"] == false).unwrap();
    let ok = recs.iter().find(|r| r["succeeded"] == true).unwrap();
    for r in [failed, ok] {
        assert_eq!(r["operation"], "restore", "{r}");
        assert_eq!(r["backup_id"], done["backup_id"], "{r}");
        assert_eq!(
            r["target"],
            serde_json::json!({"kind": "end", "value": null})
        );
        assert!(!r["host"].as_str().unwrap().is_empty(), "{r}");
        assert!(!r["os_user"].as_str().unwrap().is_empty(), "{r}");
    }
    assert_eq!(failed["succeeded"], false, "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("no such database"),
        "{failed}"
    );
    assert_eq!(failed["databases"], serde_json::json!(["app_one", "nope"]));
    assert_eq!(failed["target_dir"], r0.display().to_string());
    assert_eq!(ok["succeeded"], true, "{ok}");
    assert_eq!(ok["error"], serde_json::Value::Null);
    assert_eq!(ok["databases"], serde_json::json!(["app_one"]));
    assert_eq!(ok["target_dir"], r1.display().to_string());
    let (after, _) = recoveries(
        &shipper,
        &["--recoveries-after", recs[0]["id"].as_str().unwrap()],
    );
    assert_eq!(after, vec![recs[1].clone()]);
    let (none, _) = recoveries(
        &shipper,
        &["--recoveries-after", recs[1]["id"].as_str().unwrap()],
    );
    assert!(none.is_empty(), "{none:?}");
    let o = run(shipper
        .cmd()
        .args(["info", "--json", "--recoveries-after", "../x"]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // The human info shows them.
    let human = run_ok(shipper.cmd().arg("info"));
    assert!(
        human.contains(ok["id"].as_str().unwrap()) && human.contains("FAILED"),
        "{human}"
    );

    // verify --json: the contract's verify event.
    let o = run(shipper.cmd().args(["verify", "--json"]));
    assert!(o.status.success(), "{}", text(&o));
    let line = String::from_utf8_lossy(&o.stdout);
    match pg_backup_contract::Event::parse(line.trim()) {
        Some(pg_backup_contract::Event::Verify(v)) => {
            assert!(v.ok && v.problems.is_empty(), "{v:?}");
            assert_eq!(v.backups, vec![done["backup_id"].as_str().unwrap()]);
            assert!(v.objects_checked > 0 && v.duration_s > 0.0, "{v:?}");
            assert!(!v.repository.is_empty(), "{v:?}");
        }
        other => panic!("not a verify event: {other:?} in {line}"),
    }

    // A record overwritten with garbage, and a sound record copied under
    // another id: skipped with a warning; info still answers.
    let cfg = walshipper::config::Config::load(Some(&shipper.config)).unwrap();
    let storage = walshipper::storage::open(cfg.primary()).unwrap();
    let key = |id: &str| format!("recoveries/{id}");
    let mut body = Vec::new();
    std::io::Read::read_to_end(
        &mut storage
            .get(&key(ok["id"].as_str().unwrap()))
            .unwrap()
            .unwrap(),
        &mut body,
    )
    .unwrap();
    let copy = "20991231T235959Z-0123abcd";
    storage
        .put_replace(&key(copy), &mut body.as_slice())
        .unwrap();
    storage
        .put_replace(
            &key(failed["id"].as_str().unwrap()),
            &mut &b"{\"id\": not a record"[..],
        )
        .unwrap();
    let (recs, warnings) = recoveries(&shipper, &[]);
    assert_eq!(recs, vec![ok.clone()], "{warnings}");
    assert!(
        warnings.contains(failed["id"].as_str().unwrap()) && warnings.contains(copy),
        "{warnings}"
    );
}
