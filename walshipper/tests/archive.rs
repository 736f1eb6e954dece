//! End-to-end WAL archiving: a real PostgreSQL 15 cluster whose archiver
//! calls the real walshipper binary, recovery through archive-get, and a
//! point-in-time target in the middle of a pgbench load.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::*;

const MIN: Duration = Duration::from_secs(60);

/// A fingerprint of the data that must survive: pgbench tables and markers.
fn fingerprint(c: &Cluster, max_marker: Option<i64>) -> String {
    let filter = max_marker.map_or(String::new(), |m| format!("WHERE id <= {m}"));
    c.sql(&format!(
        "SELECT (SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a) || ' ' || \
                (SELECT md5(string_agg(h::text, ',' ORDER BY h::text)) FROM pgbench_history h) || ' ' || \
                (SELECT md5(coalesce(string_agg(m::text, ',' ORDER BY id), '')) FROM (SELECT id, note FROM marker {filter}) m)"
    ))
}

#[test]
fn archive_pgbench_then_recover_fully_and_to_a_time() {
    let dir = scratch("pitr");
    let d = dir.path();
    let src_dir = d.join("src");
    let shipper = Shipper::new(d, &src_dir, &d.join("src-sock"), 5432);
    let src = Cluster::init(
        d,
        "src",
        &[
            "archive_mode = on".into(),
            format!("archive_command = {}", shipper.archive_command()),
            "wal_level = replica".into(),
            "track_commit_timestamp = on".into(),
        ],
    );
    run_ok(shipper.cmd().arg("repo-init"));
    src.start();

    src.pgbench(&["-i", "-s", "4", "-q"]);
    src.sql("CREATE TABLE marker (id int PRIMARY KEY, note text)");
    // Base backup without WAL: recovery must fetch every segment through archive-get.
    let base = d.join("base");
    run_ok(
        Command::new(pg_bin("pg_basebackup"))
            .args(["-U", "postgres", "-h"])
            .arg(&src.socket)
            .args(["-D"])
            .arg(&base)
            .args(["-X", "none", "-c", "fast", "--no-sync"]),
    );

    // Load: pgbench in the background, one marker transaction every ~100 ms.
    let mut bench = Command::new(pg_bin("pgbench"))
        .args(["-U", "postgres", "-h"])
        .arg(&src.socket)
        .args(["-n", "-c", "2", "-T", "8", "postgres"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("pgbench");
    let markers = 60;
    src.sql(&format!(
        "DO $$ BEGIN FOR i IN 1..{markers} LOOP \
            INSERT INTO marker VALUES (i, 'marker ' || i); COMMIT; PERFORM pg_sleep(0.1); \
         END LOOP; END $$"
    ));
    assert!(bench.wait().expect("pgbench").success());
    let last = src.switch_and_wait_archived(MIN);

    // The target: halfway between the commits of markers 30 and 31.
    let target = src.sql(
        "SELECT (a + (b - a) / 2)::text FROM \
           (SELECT pg_xact_commit_timestamp(xmin) a FROM marker WHERE id = 30) x, \
           (SELECT pg_xact_commit_timestamp(xmin) b FROM marker WHERE id = 31) y",
    );
    let full_fp = fingerprint(&src, None);
    // Stop the load's effect on the fingerprint: capture state at marker 30 too.
    let archived: i64 = src
        .sql("SELECT archived_count FROM pg_stat_archiver")
        .parse()
        .unwrap();
    let failed: i64 = src
        .sql("SELECT failed_count FROM pg_stat_archiver")
        .parse()
        .unwrap();
    assert_eq!(failed, 0, "archiver failures: {}", src.log_text());
    assert!(archived > 5, "only {archived} segments archived");

    // Every segment the server marked .done is in the repository, with no gap.
    let info = shipper.info();
    let tl = &info["wal"]["timelines"][0];
    assert_eq!(tl["timeline"], 1);
    assert_eq!(
        tl["gaps"].as_array().unwrap().len(),
        0,
        "gaps: {}",
        tl["gaps"]
    );
    let mut done = BTreeSet::new();
    for e in std::fs::read_dir(src.data.join("pg_wal/archive_status"))
        .unwrap()
        .flatten()
    {
        let n = e.file_name().to_string_lossy().to_string();
        if let Some(seg) = n.strip_suffix(".done") {
            done.insert(seg.to_string());
        }
    }
    assert!(!done.is_empty());
    for seg in &done {
        assert!(
            shipper.has_wal(seg),
            "{seg} marked .done but not in the repository"
        );
    }
    assert!(tl["last"].as_str().unwrap() >= last.as_str());
    src.stop();

    // 1. Recover to the end of the archive: same data as the source.
    let r1 = d.join("r1");
    copy_tree(&base, &r1);
    let c1 = Cluster::at(d, "r1");
    c1.configure(&[
        format!("restore_command = {}", shipper.restore_command()),
        "archive_mode = off".into(),
    ]);
    std::fs::write(c1.data.join("recovery.signal"), "").unwrap();
    c1.start_nowait();
    c1.wait_promoted(3 * MIN);
    assert_eq!(
        fingerprint(&c1, None),
        full_fp,
        "fully recovered data differs"
    );
    assert!(
        c1.log_text().contains("restored log file"),
        "no WAL came through archive-get"
    );
    c1.stop();

    // 2. Recover to the middle of the load: exactly markers 1..30.
    let r2 = d.join("r2");
    copy_tree(&base, &r2);
    let c2 = Cluster::at(d, "r2");
    c2.configure(&[
        format!("restore_command = {}", shipper.restore_command()),
        "archive_mode = off".into(),
        format!("recovery_target_time = '{target}'"),
        "recovery_target_action = 'promote'".into(),
    ]);
    std::fs::write(c2.data.join("recovery.signal"), "").unwrap();
    c2.start_nowait();
    c2.wait_promoted(3 * MIN);
    assert_eq!(
        c2.sql("SELECT count(*) || ' ' || coalesce(max(id), 0) FROM marker"),
        "30 30"
    );
    assert!(
        c2.log_text().contains("recovery stopping before commit"),
        "{}",
        c2.log_text()
    );
    c2.stop();
}
