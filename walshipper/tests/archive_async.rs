//! Asynchronous archive-push and archive-get look-ahead, end to end: a real
//! PostgreSQL 15 cluster (1 MiB segments, so that a few seconds of pgbench
//! make dozens) whose archiver calls the real walshipper with
//! `[archive] async = true`, the background pusher SIGKILLed at seeded
//! random moments (PGB_ASYNC_SEED replays a run), stale and forged success
//! records, then point-in-time recovery through archive-get with
//! `[restore] lookahead`, and a damaged object inside the look-ahead window.
//! One cluster serves every case.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const MIN: Duration = Duration::from_secs(60);

/// The one spool subdirectory under `base` (its name is a fingerprint).
fn only_subdir(base: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(base)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert!(dirs.len() <= 1, "more than one spool in {}", base.display());
    dirs.pop()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Kills the pusher of `spool` (its pid is in its lock file) at random
/// moments until `stop`; returns how many times it killed one, and the most
/// success records it saw waiting at once (bounded by async_queue_max).
fn pusher_killer(
    spool: PathBuf,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let mut rng = Rng(seed);
        let kills = AtomicUsize::new(0);
        let mut most_ahead = 0;
        while !stop.load(Ordering::SeqCst) {
            let pause = Instant::now() + Duration::from_millis(150 + rng.below(600) as u64);
            let Some(dir) = only_subdir(&spool.join("archive-push")) else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            while Instant::now() < pause {
                let ahead = std::fs::read_dir(&dir)
                    .map(|d| {
                        d.flatten()
                            .filter(|e| e.file_name().to_string_lossy().ends_with(".ok"))
                            .count()
                    })
                    .unwrap_or(0);
                most_ahead = most_ahead.max(ahead);
                std::thread::sleep(Duration::from_millis(10));
            }
            let Ok(text) = std::fs::read_to_string(dir.join("pusher.lock")) else {
                continue;
            };
            let Ok(pid) = text.trim().parse::<i32>() else {
                continue;
            };
            if pid > 1 && pid_alive(pid) {
                // Only a walshipper pusher: the pid may have been reused.
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains("archive-push-async") {
                    // SAFETY: SIGKILL to a process of our own test.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    kills.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        (kills.load(Ordering::SeqCst), most_ahead)
    })
}

/// The segments the server marked done.
fn done_segments(c: &Cluster) -> BTreeSet<String> {
    std::fs::read_dir(c.data.join("pg_wal/archive_status"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_suffix(".done").map(str::to_string)
        })
        .collect()
}

#[test]
fn async_archiving_survives_killed_pushers_and_lookahead_restores_exactly() {
    let dir = scratch("async");
    let d = dir.path();
    let src_dir = d.join("src");
    let shipper = Shipper::new(d, &src_dir, &d.join("src-sock"), 5432);
    let spool = d.join("spool");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&spool)
        .unwrap();
    let restore_spool = d.join("rspool");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&restore_spool)
        .unwrap();
    let text = std::fs::read_to_string(&shipper.config).unwrap().replace(
        "[archive]\n",
        &format!(
            "[archive]\nasync = true\nspool_dir = \"{}\"\nasync_jobs = 4\nasync_queue_max = 3\nasync_wait = 30\n",
            spool.display()
        ),
    );
    std::fs::write(
        &shipper.config,
        format!(
            "{text}[restore]\nlookahead = 8\nspool_dir = \"{}\"\narchive_get_retry_timeout = 0\n",
            restore_spool.display()
        ),
    )
    .unwrap();
    let src = Cluster::init_with(
        d,
        "src",
        &["--wal-segsize=1"],
        &[
            "archive_mode = on".into(),
            format!("archive_command = {}", shipper.archive_command()),
            "wal_level = replica".into(),
            "track_commit_timestamp = on".into(),
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
    let base = d.join("base");
    run_ok(
        Command::new(pg_bin("pg_basebackup"))
            .args(["-U", "postgres", "-h"])
            .arg(&src.socket)
            .args(["-D"])
            .arg(&base)
            .args(["-X", "none", "-c", "fast", "--no-sync"]),
    );

    // Load, with the pusher SIGKILLed at seeded random moments.
    let seed: u64 = std::env::var("PGB_ASYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("PGB_ASYNC_SEED={seed} (set it to replay this run's kills)");
    let stop = Arc::new(AtomicBool::new(false));
    let killer = pusher_killer(spool.clone(), seed, stop.clone());
    let first = src.sql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let start_lsn = src.sql("SELECT pg_current_wal_lsn()");
    let pgbench = |secs: &str| {
        Command::new(pg_bin("pgbench"))
            .args(["-U", "postgres", "-h"])
            .arg(&src.socket)
            .args(["-n", "-c", "2", "-T", secs, "postgres"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("pgbench")
    };
    let mut bench = pgbench("6");
    src.sql(
        "DO $$ BEGIN FOR i IN 1..50 LOOP \
            INSERT INTO marker (id) VALUES (i); COMMIT; PERFORM pg_sleep(0.1); \
         END LOOP; END $$",
    );
    assert!(bench.wait().expect("pgbench").success());
    // At least 32 segments (1 MiB each) under the kills, however slow the
    // machine: a loaded one writes fewer in 6 s.
    let wal_mib = || -> u64 {
        src.sql(&format!(
            "SELECT ((pg_current_wal_lsn() - '{start_lsn}') / 1048576)::bigint"
        ))
        .parse()
        .unwrap()
    };
    let topping = Instant::now();
    while wal_mib() < 32 && topping.elapsed() < Duration::from_secs(60) {
        assert!(pgbench("2").wait().expect("pgbench").success());
    }
    stop.store(true, Ordering::SeqCst);
    let (kills, most_ahead) = killer.join().unwrap();
    let last = src.switch_and_wait_archived(2 * MIN);
    println!("pusher killed {kills} times; at most {most_ahead} success records waiting");
    assert!(
        kills > 0,
        "the pusher was never killed: the test proves nothing"
    );
    assert!(
        most_ahead <= 3,
        "{most_ahead} records waiting, async_queue_max = 3"
    );

    // Every segment the server marked done is in the repository, no gap.
    let info = shipper.info();
    let tl = &info["wal"]["timelines"][0];
    assert_eq!(
        tl["gaps"].as_array().unwrap().len(),
        0,
        "gaps: {}",
        tl["gaps"]
    );
    // Every segment from before the load to the last one, whether or not a
    // checkpoint has since recycled its `.done` file.
    let written: Vec<String> = src
        .sql(&format!(
            "SELECT string_agg(pg_walfile_name('{start_lsn}'::pg_lsn + i * 1048576), ',' ORDER BY i) \
             FROM generate_series(0, (('{last_lsn}'::pg_lsn - '{start_lsn}') / 1048576)::bigint) i",
            last_lsn = src.sql("SELECT pg_current_wal_lsn()")
        ))
        .split(',')
        .filter(|s| *s >= first.as_str() && *s <= last.as_str())
        .map(str::to_string)
        .collect();
    assert!(
        written.len() >= 30,
        "only {} segments written",
        written.len()
    );
    for seg in &written {
        assert!(
            shipper.has_wal(seg),
            "{seg} written under load but not in the repository"
        );
    }
    let done = done_segments(&src);
    for seg in &done {
        assert!(
            shipper.has_wal(seg),
            "{seg} marked .done but not in the repository"
        );
    }
    assert!(tl["last"].as_str().unwrap() >= last.as_str());
    // Bounded and consumed: no success record outlives its segment.
    let push_spool = only_subdir(&spool.join("archive-push")).expect("the async spool");
    let log = std::fs::read_to_string(push_spool.join("pusher.log")).unwrap_or_default();
    assert!(log.contains("pusher started"), "pusher log: {log}");

    stale_records_never_pass(&shipper, &src, d);

    // PITR with look-ahead: exactly the markers committed by the target.
    let target_marker = 30;
    let target = src.sql(&format!(
        "SELECT (a + (b - a) / 2)::text FROM \
           (SELECT pg_xact_commit_timestamp(xmin) a FROM marker WHERE id = {target_marker}) x, \
           (SELECT pg_xact_commit_timestamp(xmin) b FROM marker WHERE id = {}) y",
        target_marker + 1
    ));
    let accounts_at_target = src.sql("SELECT count(*) FROM pgbench_accounts");
    // Stale files from an earlier look-ahead run (no prefetcher holds the
    // spool): the prefetcher this recovery starts must clear them first.
    let get_spool = lookahead_spool(&shipper, d, &restore_spool);
    let planted = plant_foreign_segments(&shipper, &base, d, &get_spool);
    let r1 = recover_to(&shipper, &base, d, "r1", &target, target_marker);
    assert_eq!(
        r1.sql("SELECT count(*) FROM pgbench_accounts"),
        accounts_at_target
    );
    let plog = std::fs::read_to_string(get_spool.join("prefetch.log")).unwrap_or_default();
    assert!(plog.contains("prefetcher started"), "prefetch log: {plog}");
    drop(r1);

    // To the end of the archive: every marker is there, and the probes
    // past the end (the segment after the last, asked twice; the history
    // files) are answered "not there" from the prefetcher's markers,
    // without a round trip to the store.
    let r4 = recover_to_end(&shipper, &base, d, "r4");
    assert_eq!(r4.sql("SELECT count(*), max(id) FROM marker"), "50|50");
    let log = r4.log_text();
    assert!(
        log.contains("not there (marker)"),
        "no probe past the end was answered from a marker: {log}"
    );
    drop(r4);

    // The same files planted while "a prefetcher" (this test) holds the
    // spool's lock: the foreground reads each one's first page header,
    // refuses it, and fetches the segment directly.
    stop_prefetcher(&get_spool, false);
    let plant_again = plant_foreign_segments(&shipper, &base, d, &get_spool);
    assert_eq!(planted, plant_again);
    let held = hold_lock(&get_spool.join("prefetch.lock"));
    // What a prefetcher writes once it emptied the spool: its repository
    // and cluster (here the true ones, so that only the files are wrong).
    let desc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shipper.repo.join("repository.json")).unwrap())
            .unwrap();
    std::fs::write(
        get_spool.join("identity"),
        format!(
            "walshipper look-ahead identity 3\nrepository_id={}\nsystem_identifier={}\npg_major={}\nwal_segment_size={}\nholder={}\nboot={}\n",
            desc["repository_id"].as_str().unwrap(),
            desc["system_identifier"].as_str().unwrap(),
            desc["pg_version"],
            desc["wal_segment_size"],
            std::process::id(),
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .unwrap()
                .trim()
        ),
    )
    .unwrap();
    // "Not there" markers that must not be believed: too old (from the
    // live holder), or fresh but naming another file. Believed, either
    // would end recovery at the first segment, short of the target.
    let now_ms = boottime_ms();
    let segs: Vec<&String> = done.iter().filter(|s| s.len() == 24).collect();
    for (i, seg) in segs.iter().enumerate() {
        let (name, at) = if i % 2 == 0 {
            (seg.as_str(), now_ms - 6_000)
        } else {
            (segs[(i + 1) % segs.len()].as_str(), now_ms)
        };
        std::fs::write(
            get_spool.join(format!("{seg}.missing")),
            format!("walshipper look-ahead missing 1\nname={name}\nchecked_ms={at}\n"),
        )
        .unwrap();
    }
    let r3 = recover_to(&shipper, &base, d, "r3", &target, target_marker);
    let log = r3.log_text();
    for name in &planted {
        assert!(
            log.contains(&format!("{name} is not {name} of this cluster")),
            "the foreign {name} was not refused: {log}"
        );
        assert!(!get_spool.join(name).exists(), "{name} left in the spool");
    }
    drop(held);
    drop(r3);

    damaged_object_in_window_is_refused(&shipper, &base, d, &done);
    vouch_speaks_only_while_fresh(&shipper, &base, d);
}

/// The running pusher vouches for the repository's id, so that
/// archive-push does not open the repository on each call; its word holds
/// only while it is fresh (VOUCH_MAX_AGE, 5 s). A posix repository of its
/// own (its descriptor made unreadable, then the repository re-created).
/// Without the vouch, the second push fails (archive-push opens the
/// repository itself).
fn vouch_speaks_only_while_fresh(shipper: &Shipper, base: &Path, d: &Path) {
    if test_backend() != "posix" {
        return;
    }
    const VOUCH_MAX_AGE: Duration = Duration::from_secs(5);
    let repo = d.join("vouch-repo");
    let spool = d.join("vouch-spool");
    let wal = d.join("vouch/pg_wal");
    std::fs::create_dir_all(wal.join("archive_status")).unwrap();
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&spool)
        .unwrap();
    let cmd = || {
        let mut c = shipper.cmd();
        c.env("WALSHIPPER_REPO_PATH", &repo)
            .env("WALSHIPPER_ARCHIVE_SPOOL_DIR", &spool)
            .env("WALSHIPPER_ARCHIVE_ASYNC_WAIT", "20")
            .env("WALSHIPPER_RESTORE_LOOKAHEAD", "0");
        c
    };
    run_ok(cmd().args(["repo-init", "--kdf-memory-kib", "8192"]));
    // A genuine segment of the cluster, from the suite's repository.
    let name = first_segment(base);
    run_ok(
        shipper
            .cmd()
            .env("WALSHIPPER_RESTORE_LOOKAHEAD", "0")
            .arg("archive-get")
            .arg(&name)
            .arg(wal.join(&name)),
    );
    std::fs::write(wal.join(format!("archive_status/{name}.ready")), "").unwrap();
    let push = || run(cmd().arg("archive-push").arg(wal.join(&name)));
    let out = push();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = only_subdir(&spool.join("archive-push")).expect("spool");

    // The descriptor unreadable: the pusher's fresh word still holds.
    use std::os::unix::fs::PermissionsExt;
    let descriptor = repo.join("repository.json");
    let mode = |m| std::fs::set_permissions(&descriptor, std::fs::Permissions::from_mode(m));
    mode(0o000).unwrap();
    let out = push();
    assert!(
        out.status.success(),
        "archive-push opened the repository despite the pusher's fresh vouch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Once the pusher could not renew it for VOUCH_MAX_AGE, it is not used.
    std::thread::sleep(VOUCH_MAX_AGE + Duration::from_secs(1));
    let out = push();
    mode(0o600).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("repository.json"),
        "an expired vouch was trusted: {err}"
    );

    // Re-created at the same place (a new id): within VOUCH_MAX_AGE the
    // pusher sees it and stops vouching; the old record is refused and the
    // segment pushed into the new repository.
    std::fs::rename(&repo, d.join("vouch-repo-old")).unwrap();
    run_ok(cmd().args(["repo-init", "--kdf-memory-kib", "8192"]));
    std::thread::sleep(VOUCH_MAX_AGE);
    let out = push();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let log = std::fs::read_to_string(dir.join("pusher.log")).unwrap_or_default();
    assert!(log.contains("descriptor changed"), "pusher log: {log}");
    let back = d.join("vouch-back");
    run_ok(cmd().arg("archive-get").arg(&name).arg(&back));
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(wal.join(&name)).unwrap(),
        "the segment is not in the re-created repository"
    );
    // Its pusher would exit after 30 idle seconds.
    if let Some(pid) = std::fs::read_to_string(dir.join("pusher.lock"))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|p| *p > 1 && pid_alive(*p))
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("archive-push-async") {
            // SAFETY: SIGKILL to a process of our own test.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The first WAL segment base backup `base` needs, from its backup_label.
fn first_segment(base: &Path) -> String {
    let label = std::fs::read_to_string(base.join("backup_label")).unwrap();
    label
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
        .and_then(|l| l.split("(file ").nth(1))
        .map(|s| s.trim_end_matches(')').to_string())
        .expect("backup_label names its first segment")
}

/// Base backup `base` copied to `name` and recovered to `target`: exactly
/// the markers committed by then.
fn recover_to(
    shipper: &Shipper,
    base: &Path,
    d: &Path,
    name: &str,
    target: &str,
    target_marker: i64,
) -> Cluster {
    copy_tree(base, &d.join(name));
    std::fs::write(d.join(name).join("recovery.signal"), "").unwrap();
    let c = start_restored(
        d,
        name,
        &[
            format!("restore_command = {}", shipper.restore_command()),
            format!("recovery_target_time = '{target}'"),
            "recovery_target_action = 'promote'".into(),
        ],
    );
    assert_eq!(
        c.sql("SELECT count(*), max(id) FROM marker"),
        format!("{target_marker}|{target_marker}"),
        "{}",
        c.log_text()
    );
    c
}

/// Milliseconds on CLOCK_BOOTTIME, the clock of the look-ahead's markers.
fn boottime_ms() -> u64 {
    // SAFETY: clock_gettime with a valid clock id and a zeroed out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Base backup `base` copied to `name` and recovered to the end of the
/// archive, archive-get's debug lines in the server log.
fn recover_to_end(shipper: &Shipper, base: &Path, d: &Path, name: &str) -> Cluster {
    copy_tree(base, &d.join(name));
    std::fs::write(d.join(name).join("recovery.signal"), "").unwrap();
    start_restored(
        d,
        name,
        &[
            format!(
                "restore_command = 'WALSHIPPER_LOG=walshipper=debug {} --config {} archive-get %f \"%p\"'",
                walshipper_bin().display(),
                shipper.config.display()
            ),
            "recovery_target_action = 'promote'".into(),
        ],
    )
}

/// The look-ahead spool of this repository and cluster: made by one
/// archive-get call, whose prefetcher is then stopped.
fn lookahead_spool(shipper: &Shipper, d: &Path, restore_spool: &Path) -> PathBuf {
    let _ = run(shipper
        .cmd()
        .arg("archive-get")
        .arg("000000010000000000000001")
        .arg(d.join("probe-segment")));
    let dir = only_subdir(&restore_spool.join("archive-get")).expect("the look-ahead spool");
    stop_prefetcher(&dir, true);
    let _ = std::fs::remove_file(d.join("probe-segment"));
    dir
}

/// Stops the prefetcher of look-ahead spool `dir` (its pid is in its lock
/// file once it holds the lock), waiting up to a minute for one to start
/// when `starting`; it would exit on its own only after 20 idle seconds.
fn stop_prefetcher(dir: &Path, starting: bool) {
    let lock = dir.join("prefetch.lock");
    let started = Instant::now();
    while started.elapsed() < MIN {
        if !starting {
            // SAFETY: a lock taken and dropped at once, on our own file.
            if let Ok(f) = std::fs::File::open(&lock) {
                use std::os::unix::io::AsRawFd;
                if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    return;
                }
            }
        }
        let pid = std::fs::read_to_string(&lock)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        if let Some(pid) = pid.filter(|p| *p > 1 && pid_alive(*p)) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("archive-get-prefetch") {
                // SAFETY: SIGTERM to a process of our own test.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                while pid_alive(pid) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no prefetcher started for {}", dir.display());
}

/// Plants, in the look-ahead spool, files that look verified (the right
/// name and size) for the first segments after the backup's start: the
/// genuine segment with another cluster's system identifier, one whose
/// page header says a later timeline, one holding the segment before it;
/// also another timeline's segment. Returns the names recovery asks for.
fn plant_foreign_segments(shipper: &Shipper, base: &Path, d: &Path, spool: &Path) -> Vec<String> {
    let start = first_segment(base);
    let n = u64::from_str_radix(&start[16..], 16).unwrap();
    let name = |i: u64| format!("{}{:08X}", &start[..16], n + i);
    let genuine = |seg: &str| {
        let out = d.join("genuine");
        run_ok(
            shipper
                .cmd()
                .env("WALSHIPPER_RESTORE_LOOKAHEAD", "0")
                .arg("archive-get")
                .arg(seg)
                .arg(&out),
        );
        std::fs::read(&out).unwrap()
    };
    let mut other_cluster = genuine(&name(1));
    other_cluster[24] ^= 0x5a; // xlp_sysid
    let mut later_timeline = genuine(&name(2));
    later_timeline[4] = 2; // xlp_tli
    let previous = genuine(&name(2));
    let planted = [
        (name(1), other_cluster.clone()),
        (name(2), later_timeline),
        (name(3), previous),
    ];
    for (n, bytes) in &planted {
        std::fs::write(spool.join(n), bytes).unwrap();
    }
    // Never asked for on timeline 1: not served, and not in the way.
    std::fs::write(
        spool.join(format!("00000002{}", &name(1)[8..])),
        &other_cluster,
    )
    .unwrap();
    let _ = std::fs::remove_file(d.join("genuine"));
    planted.into_iter().map(|(n, _)| n).collect()
}

/// Holds the flock at `path` as a running prefetcher would, our pid in it
/// (the identity file vouches for the spool only when it names the holder).
fn hold_lock(path: &Path) -> std::fs::File {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    // SAFETY: flock on a valid, open descriptor.
    assert_eq!(
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0,
        "a prefetcher still holds {}",
        path.display()
    );
    f.set_len(0).unwrap();
    write!(f, "{}", std::process::id()).unwrap();
    f
}

/// Success records that are not for this file in this repository never make
/// archive-push succeed. The file: a real segment of the cluster with its
/// system identifier altered (another cluster's segment under the same
/// name), which the pusher itself refuses; any exit 0 is a false success.
fn stale_records_never_pass(shipper: &Shipper, src: &Cluster, d: &Path) {
    let fake_wal = d.join("fake/pg_wal");
    std::fs::create_dir_all(fake_wal.join("archive_status")).unwrap();
    let name = "0000000100000000000000F0";
    let real = std::fs::read_dir(src.data.join("pg_wal"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().len() == 24)
        .expect("a segment in pg_wal");
    let mut bytes = std::fs::read(&real).unwrap();
    let original_sha = hex_sha256(&bytes);
    bytes[24] ^= 0x5a; // xlp_sysid of the long page header
    let file = fake_wal.join(name);
    std::fs::write(&file, &bytes).unwrap();
    std::fs::write(fake_wal.join(format!("archive_status/{name}.ready")), "").unwrap();
    // A spool directory that does not exist: a clear error naming the setting.
    let missing = run(shipper
        .cmd()
        .env("WALSHIPPER_ARCHIVE_SPOOL_DIR", d.join("no-such-spool"))
        .arg("archive-push")
        .arg(&file));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && err.contains("archive.spool_dir"),
        "{err}"
    );
    let spool = d.join("fake-spool");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&spool)
        .unwrap();
    let push = || {
        run(shipper
            .cmd()
            .env("WALSHIPPER_ARCHIVE_SPOOL_DIR", &spool)
            .env("WALSHIPPER_ARCHIVE_ASYNC_WAIT", "5")
            .arg("archive-push")
            .arg(&file))
    };
    // First call: no record; the pusher refuses the file and says why.
    let out = push();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a foreign segment was archived");
    assert!(
        err.contains("could not archive") || err.contains("not archived within"),
        "{err}"
    );
    let dir = only_subdir(&spool.join("archive-push")).expect("spool");
    let repo_id: String = {
        let j: serde_json::Value =
            serde_json::from_slice(&std::fs::read(shipper.repo.join("repository.json")).unwrap())
                .unwrap();
        j["repository_id"].as_str().unwrap().to_string()
    };
    let size = bytes.len();
    let cases = [
        // A record of the same name for other bytes (the genuine segment).
        (original_sha.clone(), format!("repo1:{repo_id}")),
        // A record for these very bytes, but in another repository.
        (hex_sha256(&bytes), format!("repo1:{}", "00".repeat(16))),
    ];
    for (sha, stored) in cases {
        let record = format!(
            "walshipper async-push record 1\nname={name}\nsize={size}\nsha256={sha}\nstored_in={stored}\n"
        );
        std::fs::write(dir.join(format!("{name}.ok")), &record).unwrap();
        let _ = std::fs::remove_file(dir.join(format!("{name}.error")));
        let out = push();
        assert!(
            !out.status.success(),
            "a stale record ({sha}, {stored}) gave a false success: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !dir.join(format!("{name}.ok")).exists(),
            "the stale record was kept"
        );
    }
    // A half-written record is ignored as well.
    std::fs::write(
        dir.join(format!("{name}.ok")),
        format!(
            "walshipper async-push record 1\nname={name}\nsize={size}\nsha256={}",
            hex_sha256(&bytes)
        ),
    )
    .unwrap();
    assert!(
        !push().status.success(),
        "a half-written record gave a success"
    );
}

fn hex_sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// A damaged object a few segments into the recovery: the prefetcher never
/// serves it and recovery stops there with the damage reported (exit 126),
/// instead of ending early and promoting.
fn damaged_object_in_window_is_refused(
    shipper: &Shipper,
    base: &Path,
    d: &Path,
    done: &BTreeSet<String>,
) {
    if test_backend() != "posix" {
        return;
    }
    let start = first_segment(base);
    let segs: Vec<&String> = done
        .iter()
        .filter(|s| s.len() == 24 && s.as_str() > start.as_str())
        .collect();
    let victim = segs[4].clone();
    let object = shipper.wal_object(&victim);
    let mut bytes = std::fs::read(&object).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&object, &bytes).unwrap();

    copy_tree(base, &d.join("r2"));
    std::fs::write(d.join("r2/recovery.signal"), "").unwrap();
    let r2 = Cluster::at(d, "r2");
    r2.configure(&[
        "archive_mode = off".into(),
        format!("restore_command = {}", shipper.restore_command()),
        "recovery_target_action = 'promote'".into(),
    ]);
    r2.start_nowait();
    // pg_ctl -W returns before the server wrote its pid file: wait for an
    // outcome in the log, then for the server to be gone.
    let started = Instant::now();
    while started.elapsed() < MIN {
        let log = r2.log_text();
        if log.contains("ready to accept connections") || log.contains("startup process") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    while r2.data.join("postmaster.pid").exists() && started.elapsed() < MIN {
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = r2.log_text();
    assert!(
        !r2.data.join("postmaster.pid").exists(),
        "recovery went on past the damaged {victim}: {log}"
    );
    assert!(log.contains(&victim) && log.contains("damaged"), "{log}");
    assert!(
        !log.contains("database system is ready to accept connections"),
        "{log}"
    );
}
