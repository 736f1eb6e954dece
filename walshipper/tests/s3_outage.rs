//! The object store is killed (SIGKILL) during pgbench load and restarted:
//! archive-push fails meanwhile so PostgreSQL keeps the WAL, the archive
//! catches up afterwards with no gap, and a point-in-time restore to a
//! moment inside the outage works. Needs the S3 test server and its control
//! script (PGB_TEST_S3_CTL); scripts/test.sh runs it alone, after the rest,
//! because it stops the server every other S3 test uses.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIN: Duration = Duration::from_secs(60);

fn ctl(action: &str) {
    let script = std::env::var("PGB_TEST_S3_CTL").unwrap();
    run_ok(Command::new("bash").arg(script).arg(action));
}

#[test]
fn store_killed_under_load_catches_up_and_restores_across_the_outage() {
    let (Ok(_), Some(rc)) = (std::env::var("PGB_TEST_S3_CTL"), s3_repo_config("outage")) else {
        eprintln!(
            "PGB_TEST_S3_CTL / PGB_TEST_S3_ENDPOINT not set: skipped (scripts/test.sh runs it)"
        );
        return;
    };
    let dir = scratch("outage");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    shipper.set_repo_section(&s3_section("repo", &rc));
    let src = Cluster::init(
        d,
        "src",
        &[
            "archive_mode = on".into(),
            format!("archive_command = {}", shipper.archive_command()),
            "track_commit_timestamp = on".into(),
            "archive_timeout = 1".into(),
        ],
    );
    run_ok(
        shipper
            .cmd()
            .args(["repo-init", "--kdf-memory-kib", "8192"]),
    );
    src.start();
    src.pgbench(&["-i", "-s", "2", "-q"]);
    src.sql("CREATE TABLE marker (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())");
    shipper.backup(&[]);

    // Load: pgbench and one marker every 100 ms, for about 20 s.
    let mut bench = Command::new(pg_bin("pgbench"))
        .args(["-U", "postgres", "-h"])
        .arg(&src.socket)
        .args(["-n", "-c", "2", "-T", "20", "postgres"])
        .stdout(Stdio::null())
        .spawn()
        .expect("pgbench");
    let mut markers = src
        .psql_cmd()
        .args([
            "-c",
            "DO $$ BEGIN FOR i IN 1..200 LOOP \
               INSERT INTO marker (id) VALUES (i); COMMIT; PERFORM pg_sleep(0.1); \
             END LOOP; END $$",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("psql");
    std::thread::sleep(Duration::from_secs(4));
    let failed_before: i64 = src
        .sql("SELECT failed_count FROM pg_stat_archiver")
        .parse()
        .unwrap();
    ctl("kill");
    let outage_start = src.sql("SELECT clock_timestamp()::text");
    std::thread::sleep(Duration::from_secs(8));
    let outage_end = src.sql("SELECT clock_timestamp()::text");
    let failed_during: i64 = src
        .sql("SELECT failed_count FROM pg_stat_archiver")
        .parse()
        .unwrap();
    ctl("start");
    assert!(bench.wait().unwrap().success());
    assert!(markers.wait().unwrap().success());
    assert!(
        failed_during > failed_before,
        "archive-push never failed while the store was down"
    );
    assert!(
        src.log_text().contains("archive command failed"),
        "{}",
        src.log_text()
    );

    // The archive catches up: everything up to the current segment arrives.
    let last = src.switch_and_wait_archived(3 * MIN);
    let info = shipper.info();
    let tl = &info["wal"]["timelines"][0];
    assert_eq!(tl["gaps"].as_array().unwrap().len(), 0, "{}", tl["gaps"]);
    assert!(tl["last"].as_str().unwrap() >= last.as_str());
    let out = run(shipper.cmd().arg("verify"));
    assert!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A target in the middle of the outage: between two markers committed then.
    let k: i32 = src
        .sql(&format!(
            "SELECT min(id) FROM marker WHERE at > '{outage_start}'::timestamptz + interval '3 s' \
               AND at < '{outage_end}'"
        ))
        .parse()
        .expect("a marker inside the outage");
    let target = src.sql(&format!(
        "SELECT (a + (b - a) / 2)::text FROM \
           (SELECT pg_xact_commit_timestamp(xmin) a FROM marker WHERE id = {k}) x, \
           (SELECT pg_xact_commit_timestamp(xmin) b FROM marker WHERE id = {k} + 1) y"
    ));
    src.stop();
    let started = Instant::now();
    let r = d.join("r");
    let out = shipper.restore(
        &r,
        &["--target-time", &target, "--target-action", "promote"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = start_restored(
        d,
        "r",
        &[format!("restore_command = {}", shipper.restore_command())],
    );
    assert_eq!(
        c.sql("SELECT max(id) FROM marker"),
        k.to_string(),
        "restored to the wrong place (target {target})"
    );
    eprintln!("restore across the outage took {:?}", started.elapsed());
    c.stop();
}
