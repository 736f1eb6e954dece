//! `key retire` end to end (issue 16): a real cluster archiving into a
//! posix repository and a copy (on the S3 test server when one is given,
//! else a second directory); a full backup and WAL under key 1, `key
//! rotate`, an incremental backup and WAL under key 2; then key 1 retired
//! under a bandwidth limit, killed and resumed (crash points and seeded
//! random SIGKILLs, each followed by `verify` of both repositories), with a
//! damaged object (reported, left as it is, the key kept until it is
//! repaired) and a restore running at the same time. Afterwards, on both
//! repositories: every object sealed by key 2 (read from the headers, not
//! from walshipper's report), key 1's file gone, `verify` clean, the
//! full + incremental chain and a point-in-time restore exact.
//!
//! CI: one cluster, ~60-90 s. `PGB_KEY_CAMPAIGN=full`: more kills, each
//! followed by verify of both repositories. `PGB_KEY_SEED=<n>` replays a run
//! (the seed is printed).

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const MIN: Duration = Duration::from_secs(60);
/// The table state a restore must reproduce exactly.
const STATE: &str = "SELECT (SELECT md5(string_agg(aid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts) \
     || '/' || (SELECT count(*) || ':' || coalesce(max(id), 0) FROM marker)";

fn campaign() -> bool {
    std::env::var("PGB_KEY_CAMPAIGN").is_ok_and(|v| v == "full")
}

/// A copy of the configuration with both directions of every repository
/// limited to `rate` bytes per second (for `key retire` only: verify and
/// restore use the unlimited one).
fn limited_config(shipper: &Shipper, rate: u64) -> PathBuf {
    let text = std::fs::read_to_string(&shipper.config).unwrap().replace(
        "[[repo]]\n",
        &format!("[[repo]]\nupload_limit = {rate}\ndownload_limit = {rate}\n"),
    );
    let p = shipper.config.with_file_name("limited.toml");
    std::fs::write(&p, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn config(shipper: &Shipper) -> walshipper::config::Config {
    walshipper::config::Config::load(Some(&shipper.config)).unwrap()
}

fn storage(shipper: &Shipper, repo: &str) -> Box<dyn walshipper::storage::Storage> {
    let cfg = config(shipper);
    let rc = cfg.repos.iter().find(|r| r.name == repo).unwrap();
    walshipper::storage::open(rc).unwrap()
}

/// How many objects each key seals in `repo`, read from the object headers
/// directly (bytes 11: cipher, 12..28: key id).
fn census(shipper: &Shipper, repo: &str) -> BTreeMap<String, usize> {
    let s = storage(shipper, repo);
    let mut out = BTreeMap::new();
    for prefix in ["wal/", "backups/", "expired/", "recoveries/"] {
        for m in s.list(prefix).unwrap() {
            let mut h = [0u8; 64];
            s.get(&m.key).unwrap().unwrap().read_exact(&mut h).unwrap();
            assert_eq!(&h[0..8], b"WSHPOBJ\0", "{}", m.key);
            let id = if h[11] == 1 {
                hex::encode(&h[12..28])
            } else {
                "plaintext".into()
            };
            *out.entry(id).or_default() += 1;
        }
    }
    out
}

/// Every object of both repositories (lock leases aside): on posix its
/// SHA-256, on S3 its size and time stored (a PUT changes the time).
fn snapshot(shipper: &Shipper) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for repo in ["main", "offsite"] {
        let s = storage(shipper, repo);
        for m in s.list("").unwrap() {
            if m.key.starts_with("locks/") {
                continue;
            }
            if s.describe().starts_with("s3:") {
                out.insert(
                    format!("{repo}/{}", m.key),
                    format!("{} {:?}", m.size, m.modified),
                );
                continue;
            }
            let mut body = Vec::new();
            s.get(&m.key)
                .unwrap()
                .unwrap()
                .read_to_end(&mut body)
                .unwrap();
            out.insert(
                format!("{repo}/{}", m.key),
                hex::encode(Sha256::digest(&body)),
            );
        }
    }
    out
}

fn current_key(shipper: &Shipper) -> String {
    let d: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shipper.repo.join("repository.json")).unwrap())
            .unwrap();
    d["current_key_id"].as_str().unwrap().to_string()
}

fn retire_cmd(shipper: &Shipper, config: &Path, key: &str) -> Command {
    let mut c = Command::new(walshipper_bin());
    c.arg("--config")
        .arg(config)
        .args(["key", "retire", key, "--json", "--jobs", "4"])
        .env_remove("WALSHIPPER_PASSPHRASE")
        .env_remove("WALSHIPPER_CRASH_AT");
    let _ = shipper;
    c
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `key` event of a `--json` run.
fn key_event(out: &Output) -> serde_json::Value {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "key")
        .unwrap_or_else(|| panic!("no key event: {}", text(out)))
}

fn repo_result<'a>(ev: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    ev["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["repository"] == name)
        .unwrap_or_else(|| panic!("no {name} in {ev}"))
}

fn verify_clean(shipper: &Shipper, repo: &str, when: &str) {
    let out = run(shipper.cmd().args(["--repo", repo, "verify"]));
    assert!(out.status.success(), "verify {repo} {when}: {}", text(&out));
}

/// No temporaries left in the posix repository, nor spool files.
fn no_leftovers(shipper: &Shipper, d: &Path) {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, out);
            } else if e.file_name().to_string_lossy().contains("reseal") {
                out.push(path);
            }
        }
    }
    let mut left = Vec::new();
    walk(&shipper.repo, &mut left);
    walk(&d.join("scratch"), &mut left);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Restores with `args` from `repo` into `d/name`, recovers, and checks the
/// table state.
fn restore_exact(shipper: &Shipper, d: &Path, repo: &str, name: &str, args: &[&str], want: &str) {
    let out = run(shipper
        .cmd()
        .args(["--repo", repo, "restore", "--target-dir"])
        .arg(d.join(name))
        .args(args));
    assert!(out.status.success(), "restore {name}: {}", text(&out));
    let c = start_restored(d, name, &[]);
    assert_eq!(c.sql(STATE), want, "restore {name} from {repo}");
    c.stop();
    drop(c);
    let _ = std::fs::remove_dir_all(d.join(name));
}

#[test]
fn retire_a_key_on_posix_and_s3_killed_and_resumed_with_a_restore_beside_it() {
    let t0 = Instant::now();
    let seed: u64 = std::env::var("PGB_KEY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("keys_retire: seed {seed} (replay with PGB_KEY_SEED={seed})");
    let mut rng = Rng(seed);
    let dir = scratch("retire");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    shipper.use_main_and_offsite(d, "retire");
    let src = Cluster::init(
        d,
        "src",
        &[
            "archive_mode = on".into(),
            format!("archive_command = {}", shipper.archive_command()),
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
    src.sql("CREATE TABLE marker (id int PRIMARY KEY)");

    // Key 1: a full backup and WAL. Without bundles, so that key 1 seals
    // about a thousand objects: the crash points and the seeded SIGKILLs
    // below must land while re-sealing is still under way (with bundles a
    // retire of this backup ends before the random kill comes).
    let key1 = current_key(&shipper);
    let full_out = run_ok(
        shipper
            .cmd()
            .args(["backup", "--json"])
            .env("WALSHIPPER_BACKUP_BUNDLE", "false"),
    );
    let full = full_out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "done")
        .unwrap_or_else(|| panic!("no done event in: {full_out}"));
    let full_id = full["backup_id"].as_str().unwrap().to_string();
    for i in 1..=10 {
        src.sql(&format!("INSERT INTO marker VALUES ({i})"));
    }
    src.switch_and_wait_archived(MIN);

    // Key 2: rotate, an incremental backup and WAL.
    let out = run_ok(shipper.cmd().args(["key", "rotate"]));
    let key2 = current_key(&shipper);
    assert_ne!(key1, key2, "{out}");
    src.pgbench(&["-t", "200", "-c", "2"]);
    shipper.backup(&["--type", "incr"]);
    let at_incr = src.sql(STATE);
    run_ok(shipper.cmd().arg("repo-sync"));
    let mut at_target = String::new();
    for i in 11..=30 {
        src.sql(&format!(
            "INSERT INTO marker VALUES ({i}); UPDATE pgbench_accounts SET abalance = abalance + {i} WHERE aid = {i}"
        ));
        if i == 20 {
            at_target = src.sql(STATE);
        }
        if i == 25 {
            src.sql("SELECT pg_switch_wal()");
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    src.switch_and_wait_archived(MIN);
    let target = src.sql(
        "SELECT (a + (b - a) / 2)::text FROM \
           (SELECT pg_xact_commit_timestamp(xmin) a FROM marker WHERE id = 20) x, \
           (SELECT pg_xact_commit_timestamp(xmin) b FROM marker WHERE id = 21) y",
    );
    let mut sealed_by_1 = 0;
    for repo in ["main", "offsite"] {
        let c = census(&shipper, repo);
        assert!(c.get(&key1).is_some_and(|n| *n > 0), "{repo}: {c:?}");
        assert!(c.get(&key2).is_some_and(|n| *n > 0), "{repo}: {c:?}");
        sealed_by_1 += c[&key1];
    }
    let key1_bytes: u64 = ["main", "offsite"]
        .iter()
        .map(|r| {
            let s = storage(&shipper, r);
            s.list("").unwrap().iter().map(|m| m.size).sum::<u64>()
        })
        .sum();
    eprintln!(
        "keys_retire: {sealed_by_1} objects sealed by key 1, {key1_bytes} bytes stored in all, set up in {:?}",
        t0.elapsed()
    );

    // Bad input: a clear error, nothing changed.
    let before = snapshot(&shipper);
    eprintln!("keys_retire: snapshot at {:?}", t0.elapsed());
    for (key, code, says) in [
        (key2.as_str(), 2, "key rotate"),
        ("0123456789abcdef0123456789abcdef", 2, "nothing was changed"),
        ("not-a-key", 2, "not a key id"),
        (&key1[..30], 2, "not a key id"),
    ] {
        let out = run(&mut retire_cmd(&shipper, &shipper.config, key));
        assert_eq!(out.status.code(), Some(code), "{key}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says)
                || String::from_utf8_lossy(&out.stdout).contains(says),
            "{key}: want {says:?}: {}",
            text(&out)
        );
    }
    // A backup or expire holding a repository: exit 7 at once.
    {
        use std::os::unix::io::AsRawFd;
        let held = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(shipper.repo.join(".backup.lock"))
            .unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
        let out = run(&mut retire_cmd(&shipper, &shipper.config, &key1));
        assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    }
    assert_eq!(
        snapshot(&shipper),
        before,
        "bad input changed the repositories"
    );

    // Under a bandwidth limit: a few seconds for a whole run.
    let rate = (key1_bytes / 4).max(256 << 10);
    let limited = limited_config(&shipper, rate);
    let verify_both = |when: &str| {
        verify_clean(&shipper, "main", when);
        verify_clean(&shipper, "offsite", when);
    };

    // Killed at crash points (after the n-th replace).
    let points: Vec<u64> = if campaign() {
        vec![
            1,
            2,
            3 + rng.below(10) as u64,
            20 + rng.below(200) as u64,
            100 + rng.below(400) as u64,
        ]
    } else {
        vec![1 + rng.below(5) as u64, 20 + rng.below(100) as u64]
    };
    for (i, n) in points.iter().enumerate() {
        let out = run(retire_cmd(&shipper, &limited, &key1)
            .env("WALSHIPPER_CRASH_AT", format!("key-retire:{n}")));
        let killed = out.status.code().is_none();
        eprintln!(
            "{}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| l.contains("re-sealing") || l.contains("retired"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        eprintln!(
            "keys_retire: crash point key-retire:{n}: {} at {:?}",
            if killed { "killed" } else { "ran to its end" },
            t0.elapsed()
        );
        if !killed {
            assert!(out.status.success(), "key-retire:{n}: {}", text(&out));
            break;
        }
        // Every object still reads (old key or new); CI checks one
        // repository per kill, the campaign both.
        if campaign() {
            verify_both("after a crash point");
        } else {
            verify_clean(&shipper, ["main", "offsite"][i % 2], "after a crash point");
        }
    }
    // Seeded random SIGKILLs.
    let kills = if campaign() { 6 } else { 1 };
    for _ in 0..kills {
        let delay = Duration::from_millis(300 + rng.below(2500) as u64);
        let mut child = retire_cmd(&shipper, &limited, &key1)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let _ = child.wait();
        eprintln!(
            "keys_retire: SIGKILL after {delay:?}{} at {:?}",
            if finished { " (it had finished)" } else { "" },
            t0.elapsed()
        );
        if campaign() {
            verify_both("after a SIGKILL");
        } else {
            verify_clean(&shipper, "main", "after a SIGKILL");
        }
        eprintln!("keys_retire: verified at {:?}", t0.elapsed());
    }

    // A damaged object sealed by key 1: it is reported and left as it is,
    // and key 1 is kept in that repository. The victim is the WAL segment
    // sealed by key 1 that the runs so far reached last (WAL objects come
    // after backups/, main before offsite): one the incremental chain does
    // not need, so the restore beside the final run is unaffected.
    let victim = ["main", "offsite"].iter().find_map(|repo| {
        let s = storage(&shipper, repo);
        let last = s
            .list("wal/")
            .unwrap()
            .into_iter()
            .filter(|m| !m.key.starts_with("wal/history/"))
            .filter(|m| {
                let mut h = [0u8; 64];
                s.get(&m.key).unwrap().unwrap().read_exact(&mut h).unwrap();
                h[11] == 1 && hex::encode(&h[12..28]) == key1
            })
            .last()?;
        Some((repo.to_string(), last.key))
    });
    let mut original = Vec::new();
    if let Some((repo, key)) = &victim {
        let s = storage(&shipper, repo);
        s.get(key)
            .unwrap()
            .unwrap()
            .read_to_end(&mut original)
            .unwrap();
        let mut bad = original.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0x40;
        s.put_replace(key, &mut &bad[..]).unwrap();
        eprintln!("keys_retire: {repo}: {key} damaged for the final run");
    } else {
        eprintln!("keys_retire: no WAL sealed by key 1 left: the damaged-object case is skipped");
    }

    // The final run, with a restore of the incremental chain beside it.
    let cc = d.join("concurrent");
    let restore = shipper
        .cmd()
        .args(["--repo", "main", "restore", "--target-dir"])
        .arg(&cc)
        .args(["--target", "immediate", "--target-action", "promote"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = run(&mut retire_cmd(&shipper, &limited, &key1));
    let restored = restore.wait_with_output().unwrap();
    assert!(
        restored.status.success(),
        "concurrent restore: {}",
        text(&restored)
    );
    eprintln!(
        "keys_retire: final run done at {:?}: {}",
        t0.elapsed(),
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
    );
    let ev = key_event(&out);
    assert_eq!(ev["operation"], "retire", "{ev}");
    let progress = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"progress\"") && l.contains("\"retire\""))
        .count();
    eprintln!("keys_retire: {progress} progress events in the final run");
    // One a second: a run of more than two seconds printed some.
    if ev["duration_s"].as_f64().unwrap() > 2.5 {
        assert!(progress > 0, "no progress event: {}", text(&out));
    }
    for repo in ["main", "offsite"] {
        let r = repo_result(&ev, repo);
        assert_eq!(r["current_key_id"], key2.as_str(), "{ev}");
        if victim.as_ref().is_some_and(|(v, _)| v == repo) {
            continue;
        }
        assert_eq!(r["ok"], true, "{ev}");
        assert_eq!(r["objects_remaining"], 0, "{ev}");
        assert_eq!(r["key_file_removed"], true, "{ev}");
    }
    if let Some((repo, key)) = &victim {
        assert_eq!(out.status.code(), Some(126), "{}", text(&out));
        assert_eq!(ev["succeeded"], false, "{ev}");
        let r = repo_result(&ev, repo);
        assert_eq!(r["ok"], false, "{ev}");
        assert_eq!(r["objects_remaining"], 1, "{ev}");
        assert_eq!(r["key_file_removed"], false, "{ev}");
        let err = r["error"].as_str().unwrap();
        assert!(
            err.contains(key.as_str()) && err.contains("damaged"),
            "{err}"
        );
        let s = storage(&shipper, repo);
        let mut now = Vec::new();
        s.get(key).unwrap().unwrap().read_to_end(&mut now).unwrap();
        assert!(
            now[..64] == original[..64],
            "the damaged object was rewritten"
        );
        assert!(s.head(&format!("keys/{key1}.json")).unwrap().is_some());
        // Repaired (here: its original bytes back), a run resumes and ends.
        s.put_replace(key, &mut &original[..]).unwrap();
        let out = run(&mut retire_cmd(&shipper, &limited, &key1));
        assert!(out.status.success(), "{}", text(&out));
        let r = repo_result(&key_event(&out), repo).clone();
        assert_eq!(r["objects_rewritten"], 1, "{r}");
    } else {
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(ev["succeeded"], true, "{ev}");
    }
    // Run again: nothing left to do, nothing changed.
    let settled = snapshot(&shipper);
    let out = run(&mut retire_cmd(&shipper, &shipper.config, &key1));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing was changed"),
        "{}",
        text(&out)
    );
    assert_eq!(snapshot(&shipper), settled);

    // The restore that ran beside the retirement is exact.
    let c = start_restored(d, "concurrent", &[]);
    assert_eq!(c.sql(STATE), at_incr, "restore during retire");
    c.stop();
    drop(c);
    let _ = std::fs::remove_dir_all(&cc);

    // On both repositories: only key 2 seals anything, key 1's file is
    // gone, verify is clean, the chain and a point-in-time restore exact.
    no_leftovers(&shipper, d);
    // (the two repositories side by side: the checks read, nothing writes)
    std::thread::scope(|s| {
        for repo in ["main", "offsite"] {
            let (shipper, key1, key2) = (&shipper, &key1, &key2);
            let (full_id, target, at_incr, at_target) = (&full_id, &target, &at_incr, &at_target);
            s.spawn(move || {
                let c = census(shipper, repo);
                assert_eq!(c.keys().collect::<Vec<_>>(), vec![key2], "{repo}: {c:?}");
                let s = storage(shipper, repo);
                assert!(s.head(&format!("keys/{key1}.json")).unwrap().is_none());
                assert!(s.head(&format!("keys/{key2}.json")).unwrap().is_some());
                verify_clean(shipper, repo, "at the end");
                restore_exact(
                    shipper,
                    d,
                    repo,
                    &format!("chain-{repo}"),
                    &["--target", "immediate", "--target-action", "promote"],
                    at_incr,
                );
                restore_exact(
                    shipper,
                    d,
                    repo,
                    &format!("pitr-{repo}"),
                    &[
                        "--backup",
                        full_id,
                        "--target-time",
                        target,
                        "--target-action",
                        "promote",
                    ],
                    at_target,
                );
            });
        }
    });
    // Archiving went on throughout.
    assert_eq!(src.sql("SELECT failed_count FROM pg_stat_archiver"), "0");

    // Right after a rotation, the key file waits out `retire_settle` for
    // writers that opened the repository before it, and at least 10 s
    // whatever it says (here 4 s: a receiver looks every 5 s); objects
    // archived meanwhile are looked at again before it goes.
    run_ok(shipper.cmd().args(["key", "rotate"]));
    let key3 = current_key(&shipper);
    assert_ne!(key3, key2);
    let t = std::time::Instant::now();
    let out = run(retire_cmd(&shipper, &shipper.config, &key2)
        .env("WALSHIPPER_ENCRYPTION_RETIRE_SETTLE", "4"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        t.elapsed() >= Duration::from_secs(9),
        "retired {:?} after the rotation, before the 10 s floor: {}",
        t.elapsed(),
        text(&out)
    );
    // It says it waits, unless re-sealing itself outlasted retire_settle
    // (on a loaded machine 1030 objects took 12 s), when there is nothing
    // left to wait for.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at least 10 s")
            || t.elapsed() >= Duration::from_secs(10),
        "{}",
        text(&out)
    );
    for repo in ["main", "offsite"] {
        let c = census(&shipper, repo);
        assert_eq!(c.keys().collect::<Vec<_>>(), vec![&key3], "{repo}: {c:?}");
        verify_clean(&shipper, repo, "after the settled retire");
    }
    src.stop();
    eprintln!("keys_retire: done in {:?}", t0.elapsed());
}

/// `Storage::replace_checked` on every driver (S3 when the test server is
/// given), throttled too: the check reads the new bytes (S3: the local copy,
/// then what the store holds) before anything counts as replaced; a body
/// that fails leaves the old object; a store that does not read back as
/// written gets the verified copy again, three times at most; nothing is
/// left in the spool.
#[test]
fn replace_checked_reads_back_before_it_counts() {
    let dir = scratch("replace");
    let d = dir.path();
    let mut drivers: Vec<(String, walshipper::config::RepoConfig)> = vec![(
        "posix".into(),
        walshipper::config::RepoConfig {
            path: d.join("posix"),
            ..Default::default()
        },
    )];
    if let Some(rc) = s3_repo_config("replace") {
        drivers.push(("s3".into(), rc));
    }
    for (name, mut rc) in drivers {
        for limit in [0u64, 8 << 20] {
            rc.upload_limit = limit;
            rc.download_limit = limit;
            let s = walshipper::storage::open(&rc).unwrap();
            let spool = d.join(format!("spool-{name}-{limit}"));
            let key = format!("wal/x/{limit}");
            // Over one S3 part: the multipart path.
            let old: Vec<u8> = (0..(6u32 << 20)).map(|i| (i % 251) as u8).collect();
            let new: Vec<u8> = old.iter().map(|b| b ^ 0x5a).collect();
            s.put_new(&key, &mut &old[..], walshipper::storage::Durability::Now)
                .unwrap();
            let read = |s: &dyn walshipper::storage::Storage| {
                let mut v = Vec::new();
                s.get(&key).unwrap().unwrap().read_to_end(&mut v).unwrap();
                v
            };
            // A body that fails midway: never checked, the old object stays.
            let mut failing = (&new[..1 << 20]).chain(Failing);
            let err = s
                .replace_checked(
                    &key,
                    &mut failing,
                    &spool,
                    &mut |_, _| panic!("{name}: checked a body that failed"),
                    walshipper::storage::Pacing::NONE,
                )
                .unwrap_err();
            assert!(err.to_string().contains("injected"), "{name}: {err}");
            assert!(read(s.as_ref()) == old, "{name}: the old object changed");
            // Refused at the first check: the old object stays.
            let mut calls = Vec::new();
            let err = s
                .replace_checked(
                    &key,
                    &mut &new[..],
                    &spool,
                    &mut |_, store| {
                        calls.push(store);
                        Err(walshipper::Error::Invalid("refused".into()))
                    },
                    walshipper::storage::Pacing::NONE,
                )
                .unwrap_err();
            assert!(err.to_string().contains("refused"), "{name}: {err}");
            assert_eq!(calls.len(), 1, "{name}");
            assert!(read(s.as_ref()) == old, "{name}: the old object changed");
            // Each check reads all of the new bytes; on S3 the store's copy
            // failing its first check is stored again.
            let mut calls = Vec::new();
            let started = std::time::Instant::now();
            s.replace_checked(
                &key,
                &mut &new[..],
                &spool,
                &mut |r, store| {
                    let mut v = Vec::new();
                    r.read_to_end(&mut v).unwrap();
                    assert!(v == new, "{name}: checked other bytes");
                    calls.push(store);
                    if name == "s3" && calls.len() == 2 {
                        return Err(walshipper::Error::Invalid("flaky".into()));
                    }
                    Ok(())
                },
                walshipper::storage::Pacing::NONE,
            )
            .unwrap();
            let want: &[bool] = if name == "s3" {
                &[false, true, true]
            } else {
                &[true]
            };
            assert_eq!(calls, want, "{name}");
            if name == "s3" && limit > 0 {
                // 12 MiB each way to and from the store (two PUTs, two
                // reads), 8 MiB/s with one second's budget at the start:
                // at least 0.5 s each way (0.2 s in all unlimited here).
                let took = started.elapsed();
                assert!(took >= Duration::from_millis(900), "not paced: {took:?}");
            }
            assert!(read(s.as_ref()) == new, "{name}: not replaced");
            if name == "s3" {
                // A store that never reads back right: three PUTs, then an error.
                let mut stores = 0;
                let err = s
                    .replace_checked(
                        &key,
                        &mut &old[..],
                        &spool,
                        &mut |_, store| {
                            stores += usize::from(store);
                            if store {
                                Err(walshipper::Error::Invalid("never right".into()))
                            } else {
                                Ok(())
                            }
                        },
                        walshipper::storage::Pacing::NONE,
                    )
                    .unwrap_err();
                assert!(err.to_string().contains("never right"), "{err}");
                assert_eq!(stores, 3);
            }
            let left: Vec<_> = std::fs::read_dir(&spool)
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "{name}: spool holds {left:?}");
        }
    }
}

struct Failing;

impl Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("injected read failure"))
    }
}
