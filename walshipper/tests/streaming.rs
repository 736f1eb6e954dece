//! Streaming WAL (`wal-receive`) end to end: a real PostgreSQL 15 cluster,
//! the real binary receiving over the replication protocol into the
//! repository (posix, or the S3 test server with PGB_TEST_BACKEND=s3), and
//! restores from the repository alone.
//!
//! One cluster's story: the receiver is the only thing that stores WAL
//! (archive_command is `true`), is killed and restarted under pgbench, then
//! the primary is killed with -9 seconds after a marker commit and the
//! latest point is restored: the marker, only ever in the partial segment,
//! is there and nothing in between is missing. The restored server (now on
//! timeline 2) is then streamed from in synchronous mode: with the receiver
//! stopped a commit waits; with it running a commit returns, the primary is
//! killed at once, and a second restore (following timeline 2 through the
//! history file the receiver stored) has that commit.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A running `wal-receive --json`; killed when dropped.
struct Receiver {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Receiver {
    fn start(shipper: &Shipper, d: &Path, tag: &str, env: &[(&str, String)]) -> Receiver {
        let out = d.join(format!("receiver-{tag}.out"));
        let err = d.join(format!("receiver-{tag}.err"));
        let child = shipper
            .cmd()
            .args(["wal-receive", "--json"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::from(File::create(&out).unwrap()))
            .stderr(Stdio::from(File::create(&err).unwrap()))
            .spawn()
            .expect("start wal-receive");
        let r = Receiver { child, out, err };
        r.wait_event(|_| true, Duration::from_secs(60));
        r
    }

    fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "stream")
            .collect()
    }

    fn logs(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default()
        )
    }

    /// Waits for a `stream` event that satisfies `ok`.
    fn wait_event(&self, ok: impl Fn(&serde_json::Value) -> bool, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.events().iter().any(&ok) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "no such stream event within {timeout:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for it to end by itself; its exit code.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(
                start.elapsed() < timeout,
                "the receiver did not end\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

fn lsn(s: &str) -> u64 {
    walshipper::wal::parse_lsn(s).unwrap_or_else(|| panic!("not an LSN: {s}"))
}

/// SIGKILL to the postmaster: the server is gone without a shutdown
/// checkpoint, as in a crash.
fn kill_postmaster(c: &Cluster) {
    let pid = std::fs::read_to_string(c.data.join("postmaster.pid")).unwrap();
    let pid = pid.lines().next().unwrap().trim().to_string();
    run_ok(Command::new("kill").args(["-9", &pid]));
}

/// One statement in its own psql, in the background.
fn spawn_insert(c: &Cluster, sql: &str) -> Child {
    c.psql_cmd()
        .args(["-c", sql])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Restores the latest point into `d/name` and starts it.
fn restore_latest(shipper: &Shipper, d: &Path, name: &str) -> Cluster {
    let target = d.join(name);
    let out = shipper.restore(&target, &[]);
    assert!(
        out.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    start_restored(d, name, &[])
}

#[test]
fn streaming_survives_kills_and_restores_the_partial_segment_then_sync_and_timeline() {
    let dir = scratch("stream");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    // The shared test machine's disk may be nearly full: not what this is about.
    let conf = std::fs::read_to_string(&shipper.config).unwrap();
    std::fs::write(
        &shipper.config,
        conf.replacen("[repo]\n", "[repo]\nmin_free_space = \"0\"\n", 1),
    )
    .unwrap();
    // 1 MiB segments: many complete segments and a partial one in seconds.
    let src = Cluster::init_with(
        d,
        "src",
        &["--wal-segsize=1"],
        &[
            "archive_mode = on".into(),
            // The receiver alone stores WAL: a gap it leaves is not filled.
            "archive_command = '/bin/true'".into(),
            "max_wal_senders = 4".into(),
        ],
    );
    run_ok(
        shipper
            .cmd()
            .args(["repo-init", "--kdf-memory-kib", "8192"]),
    );
    src.start();
    let mut rx = Receiver::start(&shipper, d, "1", &[]);
    src.pgbench(&["-i", "-s", "2", "-q"]);
    src.sql("CREATE TABLE marker (id int PRIMARY KEY, note text)");
    // The backup waits for its WAL in the repository: the receiver's work.
    shipper.backup(&[]);

    // pgbench for 8 s; the receiver is killed -9 and restarted meanwhile.
    let mut bench = Command::new(pg_bin("pgbench"))
        .args(["-U", "postgres", "-h"])
        .arg(&src.socket)
        .args(["-p", "5432", "-T", "8", "-c", "2", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    rx.kill();
    std::thread::sleep(Duration::from_secs(1));
    let mut rx = Receiver::start(&shipper, d, "2", &[]);
    assert!(bench.wait().unwrap().success());
    // The marker, then the primary destroyed 3 s later (flush_interval 1 s).
    src.sql("INSERT INTO marker VALUES (1, 'last words')");
    let marker_lsn = lsn(&src.sql("SELECT pg_current_wal_lsn()"));
    rx.wait_event(
        |e| lsn(e["flushed_lsn"].as_str().unwrap_or("0/0")) >= marker_lsn,
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_secs(2));
    kill_postmaster(&src);
    // The connection is lost: the receiver ends with "unavailable" (3).
    assert_eq!(
        rx.wait_exit(Duration::from_secs(30)),
        Some(3),
        "{}",
        rx.logs()
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = std::fs::remove_dir_all(&src.data);

    // The marker's segment is not complete in the repository: only the
    // streamed chunks can bring the marker back.
    let seg = walshipper::wal::segment_name(1, marker_lsn >> 20, 1 << 20);
    assert!(!shipper.has_wal(&seg), "{seg} should be incomplete");
    // No gap from the backup on (the receiver was killed in between).
    run_ok(shipper.cmd().arg("verify"));

    let r1 = restore_latest(&shipper, d, "r1");
    assert_eq!(r1.sql("SELECT note FROM marker WHERE id = 1"), "last words");
    let history_rows = r1.sql("SELECT count(*) FROM pgbench_history");
    assert!(history_rows.parse::<u64>().unwrap() > 0);

    // Synchronous mode on the restored server (timeline 2).
    r1.sql("ALTER SYSTEM SET synchronous_standby_names = 'walshipper'");
    r1.sql("SELECT pg_reload_conf()");
    // No receiver: the commit waits for it (statement_timeout does not
    // cover the wait at commit; a cancel ends it, committed locally).
    let waiting = spawn_insert(&r1, "INSERT INTO marker VALUES (2, 'not acknowledged')");
    wait_for(
        &r1,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        "1",
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_secs(2));
    r1.sql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'");
    let out = waiting.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling wait for synchronous replication"),
        "{stderr}"
    );

    let env = [
        ("WALSHIPPER_PG_HOST", r1.socket.display().to_string()),
        ("WALSHIPPER_PG_DATA_DIR", r1.data.display().to_string()),
        ("WALSHIPPER_STREAM_SYNCHRONOUS", "true".to_string()),
        // Only synchronous flushes can make a commit durable in time.
        ("WALSHIPPER_STREAM_FLUSH_INTERVAL", "600".to_string()),
    ];
    let mut rx = Receiver::start(&shipper, d, "3", &env);
    // It followed the timeline switch to the restored server's timeline.
    rx.wait_event(|e| e["timeline"] == 2, Duration::from_secs(30));
    assert!(shipper.has_wal("00000002.history"));
    let t = Instant::now();
    let mut acked = spawn_insert(&r1, "INSERT INTO marker VALUES (3, 'acknowledged')");
    while acked.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the commit was not acknowledged\n{}",
            rx.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = acked.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("canceling wait"),
        "{stderr}"
    );
    // Destroyed the moment the commit returned.
    kill_postmaster(&r1);
    rx.kill();
    std::thread::sleep(Duration::from_millis(500));

    let r2 = restore_latest(&shipper, d, "r2");
    assert_eq!(
        r2.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM marker"),
        "1,2,3"
    );
    assert_eq!(
        r2.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"),
        "00000003"
    );
    r2.stop();
}
