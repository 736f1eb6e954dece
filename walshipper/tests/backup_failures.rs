//! Backups that are killed, cut off or run twice, damage found by verify,
//! and restores that must refuse damaged backups.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIN: Duration = Duration::from_secs(60);

fn setup(name: &str, scale: &str) -> (tempfile::TempDir, Shipper, Cluster) {
    let dir = scratch(name);
    let d = dir.path().to_path_buf();
    let (shipper, c) = archiving_cluster(&d, "src", &[]);
    c.pgbench(&["-i", "-s", scale, "-q"]);
    (dir, shipper, c)
}

/// A backup slowed down (zstd level 19, one job) so it can be interrupted.
fn slow_backup(shipper: &Shipper) -> std::process::Child {
    shipper
        .cmd()
        .env("WALSHIPPER_COMPRESSION_LEVEL", "19")
        .args(["backup", "--jobs", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn walshipper_sessions(c: &Cluster) -> i64 {
    c.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'walshipper'")
        .parse()
        .unwrap()
}

fn wait_no_sessions(c: &Cluster) {
    let start = Instant::now();
    while walshipper_sessions(c) > 0 {
        assert!(
            start.elapsed() < MIN,
            "the backup's session is still open on the server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn backups(shipper: &Shipper) -> usize {
    shipper.info()["backups"].as_array().unwrap().len()
}

#[test]
fn killed_cut_off_and_concurrent_backups_leave_nothing_valid() {
    let (_dir, shipper, c) = setup("bkill", "4");

    // SIGKILL in the middle of the copy.
    let mut b = slow_backup(&shipper);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(walshipper_sessions(&c), 1, "backup not running yet");
    b.kill().unwrap();
    b.wait().unwrap();
    wait_no_sessions(&c); // the server ended the backup with the session
    assert_eq!(backups(&shipper), 0, "a killed backup looks valid");
    let leftovers = shipper.repo.join("backups");
    assert!(
        leftovers.exists(),
        "test premise: the killed backup had written objects"
    );

    // Two at once: the second is refused while the first runs.
    let first = slow_backup(&shipper);
    std::thread::sleep(Duration::from_millis(1000));
    let o = run(shipper.cmd().arg("backup"));
    assert_eq!(
        o.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("holds the backup lock") && err.contains(" backup"),
        "{err}"
    );
    // Nor may expire remove what the running backup may build on.
    let o = run(shipper.cmd().args(["expire", "--keep-full", "1"]));
    assert_eq!(
        o.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The server connection is cut during the copy: the backup fails, nothing valid remains.
    std::thread::sleep(Duration::from_millis(500));
    c.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'walshipper'");
    let out = first.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "a backup whose session was terminated succeeded"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pg_backup_stop"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(backups(&shipper), 0);

    // The next backup succeeds and removes what the killed one left.
    let done = shipper.backup(&[]);
    assert_eq!(backups(&shipper), 1);
    let ids: Vec<_> = std::fs::read_dir(&leftovers)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        ids,
        vec![std::ffi::OsString::from(
            done["backup_id"].as_str().unwrap()
        )]
    );
    let o = run(shipper.cmd().arg("verify"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn verify_finds_damage_and_restore_refuses_it() {
    let (dir, shipper, c) = setup("bverify", "1");
    let d = dir.path();
    let done = shipper.backup(&[]);
    c.sql("INSERT INTO pgbench_history VALUES (1, 1, 1, 1, now(), 'x')");
    c.switch_and_wait_archived(MIN);
    c.switch_and_wait_archived(MIN);
    let id = done["backup_id"].as_str().unwrap();
    let o = run(shipper.cmd().arg("verify"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));

    // A flipped byte in any object of the backup is found.
    let objs: Vec<_> = shipper
        .object_files()
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&format!("/backups/{id}/")))
        .collect();
    // Small files are in bundles: damage to one is found like any other.
    assert!(
        objs.len() > 20
            && objs
                .iter()
                .any(|p| p.to_string_lossy().contains("/bundle/")),
        "{objs:?}"
    );
    let mut rng = std::process::id() as usize;
    for _ in 0..6 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let obj = &objs[(rng >> 33) % objs.len()];
        let good = std::fs::read(obj).unwrap();
        let mut bad = good.clone();
        let pos = (rng >> 7) % bad.len();
        bad[pos] ^= 0x40;
        std::fs::write(obj, &bad).unwrap();
        let o = run(shipper.cmd().arg("verify"));
        assert_eq!(
            o.status.code(),
            Some(6),
            "flip in {} at {pos} not found",
            obj.display()
        );
        let name = obj.file_name().unwrap().to_string_lossy().to_string();
        let report = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            report.contains("PROBLEM") && report.contains(&name),
            "{report}"
        );
        // A block map is not needed to restore (only by the next diff/incr,
        // which then stores the file whole); everything else is.
        let is_map = obj
            .to_string_lossy()
            .contains(&format!("/backups/{id}/map/"));
        if !obj.ends_with("manifest") && !is_map {
            // Restore of the damaged backup fails loudly and leaves nothing behind.
            let target = d.join("damaged");
            let o = shipper.restore(&target, &[]);
            assert_eq!(
                o.status.code(),
                Some(126),
                "{}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(String::from_utf8_lossy(&o.stderr).contains("damaged"));
            assert!(
                target
                    .read_dir()
                    .map(|mut r| r.next().is_none())
                    .unwrap_or(true),
                "restore left files"
            );
        }
        std::fs::write(obj, &good).unwrap();
    }

    // A WAL segment in the backup's range disappears: verify and restore say so.
    let seg = done["wal_start"].as_str().unwrap().to_string();
    let seg_obj = shipper.wal_object(&seg);
    let saved = std::fs::read(&seg_obj).unwrap();
    std::fs::remove_file(&seg_obj).unwrap();
    let o = run(shipper.cmd().arg("verify"));
    assert_eq!(o.status.code(), Some(6));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&seg),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = shipper.restore(&d.join("nowal"), &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be made consistent"));
    std::fs::write(&seg_obj, saved).unwrap();

    // A gap later in the archive is reported too.
    let later = c.switch_and_wait_archived(MIN);
    c.switch_and_wait_archived(MIN);
    std::fs::remove_file(shipper.wal_object(&later)).unwrap();
    let o = run(shipper.cmd().args(["verify", "--json"]));
    assert_eq!(o.status.code(), Some(6));
    // The report, then (a failed --json run) the error event.
    let docs: Vec<serde_json::Value> = serde_json::Deserializer::from_slice(&o.stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    let v = &docs[0];
    assert_eq!(v["ok"], false);
    assert!(v["problems"].to_string().contains("gap"), "{v}");
    assert_eq!(docs.len(), 2, "{docs:?}");
    assert_eq!(docs[1]["event"], "error");
    assert_eq!(docs[1]["kind"], "verify_failed");
}

#[test]
fn corrupt_pages_are_reported_by_backup() {
    let (_dir, shipper, c) = setup("bpage", "1");
    let file = c.sql("SELECT pg_relation_filepath('pgbench_accounts')");
    c.sql("CHECKPOINT");
    c.stop();
    // Damage the tuple area of block 3 (not its header): its checksum no longer matches.
    let path = c.data.join(&file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3 * 8192 + 5000] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    c.start();
    let o = run(shipper.cmd().arg("backup"));
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&file) && err.contains("[3]"), "{err}");
    // The backup itself is stored, with the failure on record.
    let info = shipper.info();
    assert_eq!(info["backups"][0]["checksum_failures"], 1);
    let _ = Command::new("true").status();
}
