//! Differential and incremental backups of a real cluster, restored from a
//! full + diff + incr chain and checked with PostgreSQL's own tools; and
//! expiry by retention policy, after which the recovery window still
//! restores and older targets are refused.

mod common;

use std::time::Duration;

use common::*;

const MIN: Duration = Duration::from_secs(60);

fn fingerprint(c: &Cluster) -> String {
    c.sql(
        "SELECT (SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a) || ' ' || \
                (SELECT md5(string_agg(t::text, ',' ORDER BY tid)) FROM pgbench_tellers t) || ' ' || \
                (SELECT count(*) || md5(coalesce(string_agg(n::text, ',' ORDER BY id), '')) FROM notes n) || ' ' || \
                (SELECT count(*) || md5(coalesce(string_agg(query_to_xml('SELECT * FROM ' || oid::regclass, false, false, '')::text, ',' ORDER BY relname), '')) \
                   FROM pg_class WHERE relname LIKE 'small\\_%' AND relkind = 'r')",
    )
}

fn json_lines(out: &str) -> serde_json::Value {
    out.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .unwrap_or_else(|| panic!("no JSON in: {out}"))
}

/// Runs a backup with debug logs: its done event and how many changed
/// blocks it stored as XOR records against their previous version.
fn backup_counting_xor(shipper: &Shipper, extra: &[&str]) -> (serde_json::Value, u64) {
    let out = run(shipper
        .cmd()
        .env("WALSHIPPER_LOG", "walshipper=debug")
        .args(["backup", "--json"])
        .args(extra));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let xored = stderr
        .lines()
        .filter_map(|l| {
            let head = l.strip_suffix(" of them as XOR records")?;
            head.rsplit(", ").next()?.parse::<u64>().ok()
        })
        .sum();
    (json_lines(&String::from_utf8_lossy(&out.stdout)), xored)
}

/// Restores `extra` into `name`, checks it with pg_verifybackup (every
/// file's SHA-256 against the backup's manifest, which for a diff/incr is
/// the file rebuilt from the chain), starts it and returns the cluster.
fn restore_checked(
    shipper: &Shipper,
    d: &std::path::Path,
    name: &str,
    done: &serde_json::Value,
    extra: &[&str],
) -> Cluster {
    let dir = d.join(name);
    let o = shipper.restore(&dir, extra);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    shipper.verify_restored(done, &dir, &d.join(format!("{name}-wal")));
    start_restored(d, name, &[])
}

#[test]
fn full_diff_incr_chain_stores_little_and_restores_identical() {
    let dir = scratch("incr");
    let d = dir.path();
    let (shipper, src) = archiving_cluster(d, "src", &["wal_level = replica"]);
    src.pgbench(&["-i", "-s", "5", "-q"]);
    src.sql("CREATE TABLE notes (id int PRIMARY KEY, n text)");
    src.sql("CREATE TABLE doomed AS SELECT g FROM generate_series(1, 50000) g");
    // Many small relations: their files go into bundles.
    src.sql(
        "DO $$ BEGIN FOR i IN 1..300 LOOP \
           EXECUTE format('CREATE TABLE small_%s (id int PRIMARY KEY, v text)', i); \
           EXECUTE format('INSERT INTO small_%s VALUES (1, %L)', i, 'row ' || i); \
         END LOOP; END $$",
    );
    src.sql("CHECKPOINT");

    let full = shipper.backup(&["--type", "full"]);
    assert_eq!(full["type"], "full");
    let full_stored = full["stored_size"].as_u64().unwrap();
    // Far fewer objects than files: the small ones are bundled.
    let objects_of = |done: &serde_json::Value| {
        let id = done["backup_id"].as_str().unwrap().to_string();
        shipper
            .object_files()
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(&format!("backups/{id}/")))
            .collect::<Vec<_>>()
    };
    if test_backend() != "s3" {
        let objs = objects_of(&full);
        let bundles = objs
            .iter()
            .filter(|p| p.to_string_lossy().contains("/bundle/"))
            .count();
        let files = full["files"].as_u64().unwrap() as usize;
        eprintln!(
            "full: {files} files in {} objects ({bundles} bundles)",
            objs.len()
        );
        assert!(bundles >= 1, "no bundle in the full backup");
        assert!(
            objs.len() * 5 < files,
            "{} objects for {files} files",
            objs.len()
        );
    }

    // About 1% of the rows (the DBA's usual day: recent rows change), a new
    // table, a dropped one, a rewritten one.
    src.sql("UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= 5000");
    src.sql("INSERT INTO notes SELECT g, 'after full ' || g FROM generate_series(1, 1000) g");
    src.sql("DROP TABLE doomed");
    src.sql("VACUUM FULL pgbench_tellers");
    src.sql("CHECKPOINT");
    let at_diff = fingerprint(&src);
    let (diff, diff_xored) = backup_counting_xor(&shipper, &["--type", "diff", "--jobs", "2"]);
    assert_eq!(diff["type"], "diff", "{diff}");
    assert_eq!(diff["based_on"], full["backup_id"]);

    src.sql(
        "UPDATE pgbench_accounts SET abalance = abalance - 3 WHERE aid BETWEEN 200001 AND 205000",
    );
    src.sql("DELETE FROM notes WHERE id % 3 = 0");
    src.sql("VACUUM pgbench_accounts");
    // A few small relations change, one is dropped, one is new: the incr
    // refers to the others in the full's bundles.
    src.sql("UPDATE small_7 SET v = 'changed in the incr'");
    src.sql("INSERT INTO small_250 VALUES (2, 'second row')");
    src.sql("DROP TABLE small_100");
    src.sql("CREATE TABLE small_new AS SELECT 1 AS id, 'new in the incr'::text AS v");
    src.sql("CHECKPOINT");
    // The incr's changed pages are stored against their previous version
    // (XOR records), which it rebuilds from the full + diff chain; the
    // restores below go through them.
    let (incr, incr_xored) = backup_counting_xor(&shipper, &["--type", "incr"]);
    eprintln!("XOR records: diff {diff_xored}, incr {incr_xored}");
    assert!(diff_xored > 0 && incr_xored > 0, "no XOR records stored");
    assert_eq!(incr["type"], "incr", "{incr}");
    assert_eq!(incr["based_on"], diff["backup_id"]);
    assert_eq!(
        incr["chain"],
        serde_json::json!([full["backup_id"], diff["backup_id"], incr["backup_id"]])
    );
    let diff_stored = diff["stored_size"].as_u64().unwrap();
    let incr_stored = incr["stored_size"].as_u64().unwrap();
    eprintln!(
        "full {full_stored} bytes stored, diff {diff_stored} ({:.2}%), incr {incr_stored} ({:.2}%)",
        100.0 * diff_stored as f64 / full_stored as f64,
        100.0 * incr_stored as f64 / full_stored as f64
    );
    // What the diff stored, largest first (for the log of a failing run).
    let posix = test_backend() != "s3";
    let mut objs: Vec<(u64, String)> = if posix {
        shipper.object_files()
    } else {
        Vec::new()
    }
    .into_iter()
    .filter(|p| {
        p.to_string_lossy()
            .contains(diff["backup_id"].as_str().unwrap())
    })
    .map(|p| {
        (
            std::fs::metadata(&p).unwrap().len(),
            p.display().to_string(),
        )
    })
    .collect();
    objs.sort();
    for (size, p) in objs.iter().rev().take(8) {
        eprintln!(
            "  diff object {size:>9} {}",
            p.rsplit("backups/").next().unwrap_or(p)
        );
    }
    assert!(
        incr_stored * 20 < full_stored,
        "incr stored {incr_stored} bytes, not under 5% of the full's {full_stored}"
    );
    assert!(
        diff_stored * 20 < full_stored,
        "diff stored {diff_stored} bytes, not under 5% of the full's {full_stored}"
    );
    // A block map that cannot be read (damaged in the full backup): the next
    // incr stores that file whole instead of failing, and restores.
    let mut newest = incr.clone();
    let mut kinds_want = vec!["full", "diff", "incr"];
    let mut damaged: Option<(std::path::PathBuf, Vec<u8>)> = None;
    if test_backend() != "s3" {
        let map = shipper
            .object_files()
            .into_iter()
            .filter(|p| {
                p.to_string_lossy()
                    .contains(&format!("{}/map/", full["backup_id"].as_str().unwrap()))
            })
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .expect("block maps in the full backup");
        let good = std::fs::read(&map).unwrap();
        let mut bad = good.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        std::fs::write(&map, &bad).unwrap();
        let out = run(shipper.cmd().args(["backup", "--json", "--type", "incr"]));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("storing the whole file"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        newest = json_lines(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(newest["type"], "incr");
        assert!(newest["stored_size"].as_u64().unwrap() > incr_stored);
        std::fs::write(&map, &good).unwrap();
        kinds_want.push("incr");

        // A damaged copy in the reference chain (pgbench_accounts, stored
        // whole by the incr just taken): the next incr, rebuilding the previous versions
        // of the blocks it changed, meets the damage and stores that file
        // whole, since a delta on that chain would not restore. The damage
        // stays while the newest backup is restored below.
        src.sql("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid > 495000");
        src.sql("CHECKPOINT");
        let rel = src.sql("SELECT pg_relation_filepath('pgbench_accounts')");
        let base_id = newest["backup_id"].as_str().unwrap().to_string();
        let obj = shipper
            .object_files()
            .into_iter()
            .find(|p| {
                p.to_string_lossy()
                    .ends_with(&format!("{base_id}/data/{rel}"))
            })
            .expect("pgbench_accounts stored whole in the last incr");
        let good = std::fs::read(&obj).unwrap();
        let mut bad = good.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x10;
        std::fs::write(&obj, &bad).unwrap();
        let out = run(shipper.cmd().args(["backup", "--json", "--type", "incr"]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("{rel}: the reference backup"))
                && stderr.contains("stored whole"),
            "{stderr}"
        );
        newest = json_lines(&String::from_utf8_lossy(&out.stdout));
        kinds_want.push("incr");
        damaged = Some((obj, good));
    }
    src.switch_and_wait_archived(MIN);
    let at_incr = fingerprint(&src);
    src.stop();

    // info shows the chain.
    let info = shipper.info();
    let kinds: Vec<_> = info["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, kinds_want);

    // The newest backup (full + diff + incr [+ incr]) to the end of the WAL.
    let c = restore_checked(&shipper, d, "r-incr", &newest, &[]);
    assert_eq!(
        fingerprint(&c),
        at_incr,
        "restored chain differs from the source"
    );
    postgres_checks(c);
    if let Some((obj, good)) = damaged {
        std::fs::write(obj, good).unwrap(); // for verify below
    }

    // The diff on its own, stopped where it became consistent.
    let c = restore_checked(
        &shipper,
        d,
        "r-diff",
        &diff,
        &[
            "--backup",
            diff["backup_id"].as_str().unwrap(),
            "--target",
            "immediate",
            "--target-action",
            "promote",
        ],
    );
    assert_eq!(
        fingerprint(&c),
        at_diff,
        "restored diff differs from the source"
    );
    postgres_checks(c);

    let v = run(shipper.cmd().args(["verify", "--json"]));
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    let report = json_lines(&String::from_utf8_lossy(&v.stdout));
    assert!(
        report["files_rebuilt"].as_u64().unwrap() > 0,
        "verify rebuilt no delta file: {report}"
    );

    // A damaged block delta: restore fails and leaves nothing behind.
    if !posix {
        return; // damage is the codec's business, tested on posix
    }
    let delta = shipper
        .object_files()
        .into_iter()
        .find(|p| {
            let s = p.to_string_lossy();
            s.contains(newest["backup_id"].as_str().unwrap()) && s.contains("/data/base/")
        })
        .expect("a data object in the incr");
    let mut bytes = std::fs::read(&delta).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&delta, bytes).unwrap();
    let bad = d.join("r-bad");
    let o = shipper.restore(&bad, &[]);
    assert!(!o.status.success());
    assert!(!bad.exists() || bad.read_dir().unwrap().next().is_none());
}

/// Inserts a note and returns the server's time just after it committed.
fn note(c: &Cluster, id: i32) -> String {
    c.sql(&format!("INSERT INTO notes VALUES ({id}, 'note {id}')"));
    let t = c.sql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
    );
    std::thread::sleep(Duration::from_millis(1100));
    t
}

fn expire(shipper: &Shipper, args: &[&str]) -> serde_json::Value {
    json_lines(&run_ok(shipper.cmd().args(["expire", "--json"]).args(args)))
}

fn ids(v: &serde_json::Value, field: &str) -> Vec<String> {
    v[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn expiry_keeps_the_recovery_window_and_refuses_older_targets() {
    let dir = scratch("expire");
    let d = dir.path();
    let (shipper, src) = archiving_cluster(d, "src", &["wal_level = replica"]);
    src.sql("CREATE TABLE notes (id int PRIMARY KEY, n text)");
    src.sql("CREATE TABLE filler AS SELECT g, md5(g::text) m FROM generate_series(1, 200000) g");

    // No policy at all: nothing to do.
    let o = run_ok(shipper.cmd().arg("expire"));
    assert!(o.contains("no retention policy"), "{o}");

    // An incr with nothing to build on is taken as a full, and says so.
    let b1 = shipper.backup(&["--type", "incr"]);
    assert_eq!(b1["type"], "full");
    assert_eq!(b1["requested_type"], "incr");
    let t_a = note(&src, 1);
    src.switch_and_wait_archived(MIN);
    let b2 = shipper.backup(&[]);
    let t_b = note(&src, 2);
    src.sql("UPDATE filler SET m = 'x' WHERE g <= 2000");
    let b3 = shipper.backup(&["--type", "incr"]);
    assert_eq!(b3["based_on"], b2["backup_id"]);
    let _t_c = note(&src, 3);
    src.switch_and_wait_archived(MIN);
    src.stop();

    let (id1, id2, id3) = (
        b1["backup_id"].as_str().unwrap(),
        b2["backup_id"].as_str().unwrap(),
        b3["backup_id"].as_str().unwrap(),
    );
    // keep-full 1 keeps b2 and the incr built on it (dry run: nothing goes).
    let v = expire(&shipper, &["--dry-run", "--keep-full", "1"]);
    assert_eq!(ids(&v, "removed"), [id1]);
    assert_eq!(ids(&v, "kept"), [id2, id3]);
    assert!(v["wal_removed"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(shipper.info()["backups"].as_array().unwrap().len(), 3);

    // GFS from the command line: one daily backup (all three are of today
    // in Berlin) keeps the newest and what it is built on.
    let v = expire(
        &shipper,
        &[
            "--dry-run",
            "--keep-daily",
            "1",
            "--timezone",
            "Europe/Berlin",
        ],
    );
    assert_eq!(ids(&v, "removed"), [id1], "{v}");
    assert_eq!(ids(&v, "kept"), [id2, id3]);
    // Bad input: one clear line, exit 2, nothing touched.
    for bad in [
        &["--recovery-window", "5x"][..],
        &["--keep-daily", "1", "--timezone", "Mars/Olympus"][..],
    ] {
        let o = run(shipper.cmd().arg("expire").args(bad));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(bad[bad.len() - 1]), "{err}");
    }
    assert_eq!(shipper.info()["backups"].as_array().unwrap().len(), 3);

    // A recovery window that starts between b2 and b3: b2 anchors it.
    let stop = |b: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(b["stop_time"].as_str().unwrap()).unwrap()
    };
    // Decided "an hour later" (--now), with a window of an hour whose start
    // falls exactly between b2 and b3.
    let start = stop(&b2) + (stop(&b3) - stop(&b2)) / 2;
    let window = "3600s".to_string();
    let now_arg = (start + chrono::Duration::seconds(3600))
        .format("%Y-%m-%d %H:%M:%S%.6f%:z")
        .to_string();
    let v = expire(&shipper, &["--recovery-window", &window, "--now", &now_arg]);
    assert_eq!(ids(&v, "removed"), [id1], "{v}");
    let first_wal_kept = b2["wal_start"].as_str().unwrap();
    let last_removed = v["wal_removed_last"].as_str().unwrap();
    assert!(last_removed < first_wal_kept, "{v}");
    assert_eq!(ids(&v, "kept"), [id2, id3]);
    let info = shipper.info();
    assert_eq!(info["backups"].as_array().unwrap().len(), 2);
    assert!(
        !shipper.has_wal(last_removed),
        "expired WAL {last_removed} is still there"
    );

    // Nothing left that expire would remove; verify finds no gap.
    let v = expire(&shipper, &["--recovery-window", &window, "--now", &now_arg]);
    assert!(ids(&v, "removed").is_empty());
    assert_eq!(v["wal_removed"], 0);
    let out = run(shipper.cmd().args(["verify", "--json"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Outside the window: refused, clearly. Inside: restores exactly.
    let o = shipper.restore(&d.join("r-old"), &["--target-time", &t_a]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("earlier than any backup") && err.contains(id2),
        "{err}"
    );
    // The window's first moment (between b2 and b3) restores from b2 + WAL.
    let window_start = start.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string();
    assert!(t_b < window_start);
    let o = shipper.restore(
        &d.join("r-b"),
        &["--target-time", &window_start, "--target-action", "promote"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = start_restored(d, "r-b", &[]);
    assert_eq!(
        c.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM notes"),
        "1,2"
    );
    c.stop();
    let c = restore_checked(&shipper, d, "r-c", &b3, &[]);
    assert_eq!(
        c.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM notes"),
        "1,2,3"
    );
    c.stop();
}
