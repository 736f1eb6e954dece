//! Streaming WAL (`wal-receive`) end to end: a real PostgreSQL 15 cluster,
//! the real binary receiving over the replication protocol into the
//! repository (posix, or the S3 test server with PGB_TEST_BACKEND=s3), and
//! restores from the repository alone.
//!
//! One cluster's story: the receiver is the only thing that stores WAL
//! (archive_command is `true`); it is killed -9 right after starting again
//! and again within one segment (PGB_TEST_STREAM_RESTARTS times, 4 by
//! default): each start merges the chunks it finds, so their count stays
//! small; it is killed and restarted under pgbench, then
//! the primary is killed with -9 seconds after a marker commit and the
//! latest point is restored: the marker, only ever in the partial segment,
//! is there and nothing in between is missing. Before that restore, with
//! only the streamed chunks holding the marker: verify and info describe the
//! tail, a damaged chunk is a verify problem naming it, expire removes
//! planted leftover chunks but not the tail, and repo-sync copies the tail
//! into a second repository that then serves the same segment bytes. The
//! restored server (now on
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

/// Waits until the server says its receiver flushed up to `at`.
fn wait_flushed(c: &Cluster, at: u64) {
    let sql = format!(
        "SELECT coalesce(bool_or(flush_lsn >= '{}'::pg_lsn), false) FROM pg_stat_replication",
        walshipper::wal::format_lsn(at)
    );
    let start = Instant::now();
    while c.try_sql(&sql).as_deref() != Some("t") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the receiver did not flush {}",
            walshipper::wal::format_lsn(at)
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// Waits until no walsender holds the slot (a killed receiver's is gone).
fn wait_slot_free(c: &Cluster) {
    let start = Instant::now();
    while c
        .try_sql("SELECT count(*) FROM pg_replication_slots WHERE active")
        .as_deref()
        != Some("0")
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "slot still active"
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// The primary repository's storage, whatever its backend.
fn storage(shipper: &Shipper) -> Box<dyn walshipper::storage::Storage> {
    let cfg = walshipper::config::Config::load(Some(&shipper.config)).unwrap();
    walshipper::storage::open(cfg.primary()).unwrap()
}

fn read_raw(st: &dyn walshipper::storage::Storage, key: &str) -> Vec<u8> {
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut st.get(key).unwrap().unwrap(), &mut v).unwrap();
    v
}

fn put_raw(st: &dyn walshipper::storage::Storage, key: &str, bytes: &[u8]) {
    let _ = st.delete(key);
    st.put_new(key, &mut &bytes[..], walshipper::storage::Durability::Now)
        .unwrap();
}

/// The `verify` event of `verify --json` output.
fn verify_event(out: &std::process::Output) -> serde_json::Value {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "verify")
        .unwrap_or_else(|| {
            panic!(
                "no verify event:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
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
    // A second repository for repo-sync (created while the server runs).
    let sync_cfg = d.join("sync.toml");
    let text = std::fs::read_to_string(&shipper.config)
        .unwrap()
        .replacen("[repo]\n", "[[repo]]\nname = \"main\"\n", 1)
        .replacen(
            "[encryption]",
            &format!(
                "[[repo]]\nname = \"offsite\"\ntype = \"posix\"\npath = \"{}\"\nmin_free_space = \"0\"\n[encryption]",
                d.join("offsite").display()
            ),
            1,
        );
    std::fs::write(&sync_cfg, text).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sync_cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let synced = |args: &[&str]| {
        let mut c = Command::new(walshipper_bin());
        c.arg("--config").arg(&sync_cfg).args(args);
        c
    };
    run_ok(&mut synced(&["repo-init", "--kdf-memory-kib", "8192"]));

    // A crash loop within one segment: each start merges the chunks it
    // finds into one, so their count stays bounded however many restarts
    // (readers refuse more than stream::MAX_CHUNKS). Full campaign:
    // PGB_TEST_STREAM_RESTARTS=500.
    rx.kill();
    let restarts: usize = std::env::var("PGB_TEST_STREAM_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    src.sql("CREATE TABLE restarts (i int)");
    let tail_chunks = |shipper: &Shipper| {
        shipper.info()["wal"]["stream_tail"]["chunks"]
            .as_u64()
            .unwrap_or(0)
    };
    for i in 0..restarts {
        wait_slot_free(&src);
        let r = Receiver::start(
            &shipper,
            d,
            &format!("loop{i}"),
            &[
                ("WALSHIPPER_STREAM_FLUSH_INTERVAL", "0.05".to_string()),
                // The default: repository.json is looked at once a minute
                // (opened_key_current), not before every write.
                ("WALSHIPPER_ENCRYPTION_RETIRE_SETTLE", "900".to_string()),
            ],
        );
        let n = tail_chunks(&shipper);
        assert!(
            n <= 3,
            "restart {i}: {n} chunks in the streamed tail after the start merged them\n{}",
            r.logs()
        );
        // Three writes the receiver makes durable as three chunks.
        for j in 0..3 {
            src.sql(&format!("INSERT INTO restarts VALUES ({})", i * 3 + j));
            wait_flushed(&src, lsn(&src.sql("SELECT pg_current_wal_lsn()")));
        }
        if i == 0 {
            // A second receiver on the same slot (a unit beside the
            // extension's) must fail at START_REPLICATION having changed
            // nothing: merging the running one's chunks away would break
            // its chain.
            let st = storage(&shipper);
            let chunks = || -> std::collections::BTreeSet<String> {
                st.list(walshipper::layout::STREAM_PREFIX)
                    .unwrap()
                    .into_iter()
                    .map(|m| m.key)
                    .collect()
            };
            let before = chunks();
            assert!(before.len() > 1, "{before:?}\n{}", r.logs());
            let dup = run(shipper.cmd().args(["wal-receive", "--json"]));
            assert_eq!(
                dup.status.code(),
                Some(7),
                "a second receiver on the slot: {}",
                String::from_utf8_lossy(&dup.stderr)
            );
            let after = chunks();
            assert!(
                before.is_subset(&after),
                "the second receiver changed the chunks: {before:?} -> {after:?}\n{}",
                String::from_utf8_lossy(&dup.stderr)
            );
            // The first one still streams.
            src.sql("CREATE TABLE after_second_receiver ()");
            wait_flushed(&src, lsn(&src.sql("SELECT pg_current_wal_lsn()")));
        }
        drop(r);
    }
    wait_slot_free(&src);
    let mut rx = Receiver::start(&shipper, d, "1b", &[]);

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
    wait_slot_free(&src);
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
    // No gap from the backup on (the receiver was killed in between), and
    // verify and info describe the streamed tail: the marker's segment, read
    // back up to past the marker, continuing the archived WAL.
    let out = run(shipper.cmd().args(["verify", "--json"]));
    let v = verify_event(&out);
    assert!(out.status.success(), "{v}");
    let tail = &v["stream_tail"];
    assert_eq!(tail["segment"], seg.as_str(), "{v}");
    assert_eq!(tail["continues_archive"], true, "{v}");
    let tail_end = tail["end_lsn"].as_str().unwrap().to_string();
    assert!(lsn(&tail_end) >= marker_lsn, "{v}");
    let info = shipper.info();
    assert_eq!(info["wal"]["stream_tail"]["segment"], seg.as_str());
    assert_eq!(info["wal"]["stream_tail"]["end_lsn"], tail_end.as_str());

    // A damaged chunk is a verify problem naming the object.
    let st = storage(&shipper);
    let chunks: Vec<String> = st
        .list(&format!("stream/{seg}/"))
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    let victim = chunks.last().unwrap().clone();
    let good = read_raw(&*st, &victim);
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    put_raw(&*st, &victim, &bad);
    let out = run(shipper.cmd().args(["verify", "--json"]));
    assert!(!out.status.success());
    let v = verify_event(&out);
    assert!(
        v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains(&victim)),
        "{v}"
    );
    put_raw(&*st, &victim, &good);

    // expire removes chunks nothing needs (beside a segment stored whole;
    // older than the oldest backup) and never the tail.
    let whole = info["wal"]["timelines"][0]["last"]
        .as_str()
        .unwrap()
        .to_string();
    let leftovers = [
        format!("stream/{whole}/00000000-00002000"),
        "stream/000000010000000000000000/00000000-00002000".to_string(),
    ];
    for k in &leftovers {
        put_raw(&*st, k, b"leftover");
    }
    let out = run_ok(shipper.cmd().args(["expire", "--keep-full", "1", "--json"]));
    assert!(out.contains("\"stream_chunks_removed\":2"), "{out}");
    for k in &leftovers {
        assert!(st.head(k).unwrap().is_none(), "{k} survived expire");
    }
    assert_eq!(
        st.list(&format!("stream/{seg}/")).unwrap().len(),
        chunks.len(),
        "expire touched the tail"
    );

    // repo-sync copies the tail into a second repository, which then
    // serves the same bytes for the marker's segment.
    run_ok(&mut synced(&["repo-sync"]));
    let out = run(&mut synced(&["--repo", "offsite", "verify", "--json"]));
    let v = verify_event(&out);
    assert!(out.status.success(), "{v}");
    assert_eq!(v["stream_tail"]["end_lsn"], tail_end.as_str(), "{v}");
    let (a, b) = (d.join("seg-main"), d.join("seg-offsite"));
    run_ok(synced(&["--repo", "main", "archive-get", &seg]).arg(&a));
    run_ok(synced(&["--repo", "offsite", "archive-get", &seg]).arg(&b));
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());

    let r1 = restore_latest(&shipper, d, "r1");
    assert_eq!(r1.sql("SELECT note FROM marker WHERE id = 1"), "last words");
    assert_eq!(
        r1.sql("SELECT count(DISTINCT i) FROM restarts"),
        (3 * restarts).to_string()
    );
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
