//! `walshipper key passphrase` end to end, with the real binary, a real
//! PostgreSQL 15 archiving through it, and two repositories (a posix primary
//! and a copy made by repo-init: on the S3 test server when
//! PGB_TEST_S3_ENDPOINT is set, else a second posix directory):
//!
//! 1. the change under pgbench, every archive-push reading the key files
//!    (no key cache): no archive failure, the old passphrase refused, a
//!    PITR restore (backup taken before the change, WAL across it) exact;
//! 2. the crash walk: the change killed at its 1st, 2nd, ... crash point
//!    until a run completes; after each kill every key file opens with the
//!    old or the new passphrase, each repository opens and a segment sealed
//!    by each key reads (real binary), and a re-run finishes the change;
//! 3. bad input: each a clear error, key files byte-identical.
//!
//! One cluster for the file; 40 s here (80 s with 4 other builds running).
//! PGB_KEY_CAMPAIGN=full (+30 s) also walks `--keep-old` then `--finish`
//! with the passphrase in the environment.
//! The walk is deterministic (no seed): it prints the points it reached.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use walshipper::config::{Config, RepoConfig};
use walshipper::keys::KeyFile;

const MIN: Duration = Duration::from_secs(60);

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Fixture {
    _dir: tempfile::TempDir,
    d: PathBuf,
    shipper: Shipper,
    cluster: Cluster,
    repos: Vec<RepoConfig>,
    /// One archived segment sealed by each key, oldest key first.
    segments: Vec<(String, String)>,
}

impl Fixture {
    /// Every key file of every repository: (repo, key id) -> bytes.
    fn key_files(&self) -> BTreeMap<(String, String), Vec<u8>> {
        let mut out = BTreeMap::new();
        for rc in &self.repos {
            let s = walshipper::storage::open(rc).unwrap();
            for m in s.list("keys/").unwrap() {
                let mut body = Vec::new();
                std::io::Read::read_to_end(&mut s.get(&m.key).unwrap().unwrap(), &mut body)
                    .unwrap();
                out.insert((rc.name.clone(), m.key.clone()), body);
            }
        }
        out
    }

    fn restore_key_files(&self, saved: &BTreeMap<(String, String), Vec<u8>>) {
        for rc in &self.repos {
            let s = walshipper::storage::open(rc).unwrap();
            for ((r, key), body) in saved {
                if *r == rc.name {
                    s.put_replace(key, &mut &body[..]).unwrap();
                }
            }
        }
        assert_eq!(&self.key_files(), saved);
    }

    /// Which of `passes` open each key file (parsed by the library, from
    /// the store): (repo, key id) -> one flag per passphrase.
    fn opened_by(&self, passes: &[&str]) -> BTreeMap<(String, String), Vec<bool>> {
        self.key_files()
            .into_iter()
            .map(|((r, key), body)| {
                let id = key
                    .trim_start_matches("keys/")
                    .trim_end_matches(".json")
                    .to_string();
                let f = KeyFile::parse(&id, &body)
                    .unwrap_or_else(|e| panic!("{r} {key} does not parse: {e}"));
                let which = passes
                    .iter()
                    .map(|p| f.unlock(p.as_bytes()).is_ok())
                    .collect();
                ((r, id), which)
            })
            .collect()
    }

    /// Every key file of every repository opens with `yes` and not with `no`.
    fn only(&self, yes: &str, no: &str, when: &str) {
        for (k, which) in self.opened_by(&[yes, no]) {
            assert_eq!(which, [true, false], "{when}: {k:?} (new, old)");
        }
    }

    /// The real binary with the passphrase in the environment, no key cache.
    fn with_pass(&self, pass: &str) -> Command {
        let mut c = self.shipper.cmd();
        c.env("WALSHIPPER_PASSPHRASE", pass)
            .env("WALSHIPPER_ENCRYPTION_KEY_CACHE", "false")
            .env("WALSHIPPER_RESTORE_ARCHIVE_GET_RETRY_TIMEOUT", "1");
        c
    }

    /// One of `passes` opens every key file of every repository (so a host
    /// given it reads everything), and with it each repository opens and
    /// segment `seg` (sealed by an older or the current key) reads, with
    /// the real binary.
    fn all_readable(&self, passes: &[&str], seg: usize, when: &str) {
        let by = self.opened_by(passes);
        let Some(p) = (0..passes.len()).find(|&i| by.values().all(|w| w[i])) else {
            panic!("{when}: no passphrase opens every key file: {by:?}");
        };
        let pass = passes[p];
        let (seg, key_id) = &self.segments[seg % self.segments.len()];
        let dest = self.d.join("walk-get");
        for rc in &self.repos {
            let o = run(self
                .with_pass(pass)
                .args(["--repo", &rc.name, "info", "--json"]));
            assert!(o.status.success(), "{when}: {} info: {}", rc.name, text(&o));
            let _ = std::fs::remove_file(&dest);
            let o = run(self
                .with_pass(pass)
                .args(["--repo", &rc.name, "archive-get", seg])
                .arg(&dest));
            assert!(
                o.status.success(),
                "{when}: {} archive-get {seg} (key {key_id}): {}",
                rc.name,
                text(&o)
            );
            std::fs::remove_file(&dest).unwrap();
        }
    }
}

fn fingerprint(c: &Cluster) -> String {
    c.sql(
        "SELECT (SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a) || ' ' || \
                (SELECT md5(string_agg(h::text, ',' ORDER BY h::text)) FROM pgbench_history h) || ' ' || \
                (SELECT md5(string_agg(m::text, ',' ORDER BY id)) FROM marker m)",
    )
}

fn setup() -> Fixture {
    let dir = scratch("keypass");
    let d = dir.path().to_path_buf();
    let shipper = Shipper::new(&d, &d.join("src"), &d.join("src-sock"), 5432);
    let second = match s3_repo_config("keypass") {
        Some(mut rc) => {
            rc.name = "copy".into();
            s3_section("[[repo]]", &rc)
        }
        None => format!(
            "[[repo]]\nname = \"copy\"\ntype = \"posix\"\npath = \"{}\"\nmin_free_space = \"1GiB\"\n",
            d.join("repo2").display()
        ),
    };
    // A small floor for free space: the test stores some 100 MiB, and
    // must not depend on how full the developer's disk is.
    shipper.set_repo_section(&format!(
        "[[repo]]\nname = \"primary\"\ntype = \"posix\"\npath = \"{}\"\nmin_free_space = \"1GiB\"\n{second}",
        shipper.repo.display()
    ));
    // Every archive-push reads the key files (no key cache): the change must
    // never show it a file it cannot open.
    let archive = format!(
        "'WALSHIPPER_ENCRYPTION_KEY_CACHE=false {} --config {} archive-push %p'",
        walshipper_bin().display(),
        shipper.config.display()
    );
    let cluster = Cluster::init(
        &d,
        "src",
        &[
            "archive_mode = on".into(),
            format!("archive_command = {archive}"),
        ],
    );
    run_ok(shipper.cmd().args([
        "repo-init",
        "--kdf-memory-kib",
        "8192",
        "--kdf-iterations",
        "1",
    ]));
    cluster.start();
    let repos = Config::load(Some(&shipper.config)).unwrap().repos;
    assert_eq!(repos.len(), 2);
    eprintln!(
        "repositories: {}",
        repos
            .iter()
            .map(|r| format!("{} ({})", r.name, r.kind))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Three keys, a segment sealed by each.
    let mut segments = Vec::new();
    for i in 0..3 {
        if i > 0 {
            run_ok(shipper.cmd().args(["key", "rotate", "--json"]));
        }
        cluster.sql(&format!("CREATE TABLE k{i} AS SELECT {i} AS v"));
        let seg = cluster.switch_and_wait_archived(MIN);
        let cfg = Config::load(Some(&shipper.config)).unwrap();
        let repo = walshipper::repo::Repository::open(&cfg).unwrap();
        let obj = format!("wal/{}/{seg}", &seg[0..16]);
        let id = hex::encode(repo.object_key_id(&obj).unwrap().unwrap());
        assert_eq!(Some(&id), repo.descriptor.current_key_id.as_ref());
        segments.push((seg, id));
    }
    Fixture {
        _dir: dir,
        d,
        shipper,
        cluster,
        repos,
        segments,
    }
}

#[test]
fn change_the_passphrase_under_load_killed_anywhere_and_bad_input() {
    let started = Instant::now();
    let f = setup();
    let old = "integration-test passphrase, long enough";
    let c = &f.cluster;
    c.pgbench(&["-i", "-s", "3", "-q"]);
    c.sql("CREATE TABLE marker (id int PRIMARY KEY, note text)");
    c.sql("INSERT INTO marker VALUES (0, 'before the backup')");
    // The backup is sealed under the old passphrase's keys; the WAL the
    // restore replays spans the change.
    f.shipper.backup(&[]);
    eprintln!("setup and backup: {:?}", started.elapsed());

    // 1. The change under load.
    let failed_before = c.sql("SELECT failed_count FROM pg_stat_archiver");
    let new1 = "the first new passphrase, also long";
    let new1_file = f.d.join("new1");
    write_private(&new1_file, &format!("{new1}\n"));
    let mut bench = Command::new(pg_bin("pgbench"))
        .args(["-U", "postgres", "-h"])
        .arg(&c.socket)
        .args(["-n", "-c", "2", "-T", "6", "postgres"])
        .stdout(Stdio::null())
        .spawn()
        .expect("pgbench");
    // Segments switched every 200 ms: archive-push runs all through the change.
    let stop = Arc::new(AtomicBool::new(false));
    let switcher = {
        let stop = stop.clone();
        let mut psql = c.psql_cmd();
        psql.args(["-c", "SELECT pg_switch_wal()"]);
        let args: Vec<_> = psql.get_args().map(|a| a.to_os_string()).collect();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let _ = Command::new(pg_bin("psql")).args(&args).output();
                n += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let archived = || -> i64 {
        c.sql("SELECT archived_count FROM pg_stat_archiver")
            .parse()
            .unwrap()
    };
    let archived_before = archived();
    let out = run_ok(
        f.shipper
            .cmd()
            .args(["key", "passphrase", "--new-file"])
            .arg(&new1_file)
            .arg("--json"),
    );
    // Segments were archived while the key files changed (else this test
    // would prove nothing about archiving during the change).
    let during = archived() - archived_before;
    assert!(
        during >= 2,
        "only {during} segments archived during the change"
    );
    let ev: serde_json::Value = serde_json::from_str(out.trim()).expect("one key event");
    assert_eq!(ev["event"], "key", "{out}");
    assert_eq!(ev["operation"], "passphrase");
    assert_eq!(ev["stage"], "done");
    assert_eq!(ev["succeeded"], true);
    assert_eq!(ev["repositories"].as_array().unwrap().len(), 2);
    for r in ev["repositories"].as_array().unwrap() {
        // 3 key files re-wrapped (each written twice: slot added, old removed).
        assert_eq!(r["key_files"], 3, "{out}");
    }
    assert!(bench.wait().unwrap().success());
    stop.store(true, Ordering::SeqCst);
    let switches = switcher.join().unwrap();
    // The installed passphrase file holds the new passphrase, private.
    assert_eq!(
        std::fs::read_to_string(&f.shipper.passphrase_file).unwrap(),
        format!("{new1}\n")
    );
    let mode = std::fs::metadata(&f.shipper.passphrase_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Only the new passphrase opens any key file now.
    f.only(new1, old, "after the change");
    c.sql("INSERT INTO marker VALUES (1, 'after the change')");
    let want = fingerprint(c);
    c.sql("SELECT pg_create_restore_point('after_change')");
    c.sql("INSERT INTO marker VALUES (2, 'after the restore point')");
    c.switch_and_wait_archived(MIN);
    assert_eq!(
        c.sql("SELECT failed_count FROM pg_stat_archiver"),
        failed_before,
        "archive failures during the change ({switches} switches):\n{}",
        c.log_text()
    );
    // The old passphrase is refused, with the host's key cache too (its
    // entries were re-sealed under the new passphrase).
    for cache in ["true", "false"] {
        let o = run(f
            .shipper
            .cmd()
            .env("WALSHIPPER_PASSPHRASE", old)
            .env("WALSHIPPER_ENCRYPTION_KEY_CACHE", cache)
            .args(["info", "--json"]));
        assert!(!o.status.success(), "old passphrase accepted: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("wrong passphrase"),
            "{}",
            text(&o)
        );
    }
    let (seg, _) = &f.segments[0];
    let o = run(f
        .with_pass(old)
        .args(["archive-get", seg])
        .arg(f.d.join("old-get")));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(!f.d.join("old-get").exists());
    // PITR with the new passphrase: exactly the rows at the restore point.
    let o = f.shipper.restore(
        &f.d.join("pitr"),
        &[
            "--target-name",
            "after_change",
            "--target-action",
            "promote",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    {
        let r = start_restored(&f.d, "pitr", &[]);
        assert_eq!(fingerprint(&r), want, "log:\n{}", r.log_text());
        assert_eq!(r.sql("SELECT max(id) FROM marker"), "1");
        r.stop();
    }
    std::fs::remove_dir_all(f.d.join("pitr")).unwrap();
    eprintln!(
        "change under load ({during} segments archived during it, {switches} WAL switches), PITR exact: {:?}",
        started.elapsed()
    );

    // 2. The crash walk: new1 -> new2, from the same starting state each time.
    let new2 = "the second new passphrase, long too";
    let new2_file = f.d.join("new2");
    write_private(&new2_file, &format!("{new2}\n"));
    let points = walk(
        &f,
        new1,
        new2,
        "file",
        |cmd| {
            cmd.args(["key", "passphrase", "--new-file"])
                .arg(&new2_file);
        },
        |when| f.only(new2, new1, when),
    );
    // The pre-check, 6 slots added, the install, 6 slots removed.
    assert_eq!(points, 14);
    if std::env::var("PGB_KEY_CAMPAIGN").as_deref() == Ok("full") {
        walk_keep_old_then_finish(&f, new1, new2);
    }
    eprintln!("crash walk: {:?}", started.elapsed());

    // 3. Bad input, from the state new1 (the walk leaves it so).
    bad_input(&f, new1);
    rotate_refused_between_stages(&f, new1);
    eprintln!("bad input: {:?}", started.elapsed());
}

/// Between the stages (`--keep-old`) a rotation would wrap the new key by
/// one passphrase only: refused, nothing changed.
fn rotate_refused_between_stages(f: &Fixture, current: &str) {
    let saved = f.key_files();
    let other = f.d.join("new-between");
    write_private(&other, "a third passphrase, only for this check\n");
    run_ok(
        f.shipper
            .cmd()
            .env("WALSHIPPER_PASSPHRASE", current)
            .args(["key", "passphrase", "--keep-old", "--new-file"])
            .arg(&other),
    );
    let between = f.key_files();
    let o = run(f
        .shipper
        .cmd()
        .env("WALSHIPPER_PASSPHRASE", current)
        .args(["key", "rotate"]));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("passphrase change is under way"),
        "{}",
        text(&o)
    );
    assert_eq!(f.key_files(), between, "a refused rotate changed key files");
    f.restore_key_files(&saved);
}

/// Runs the change killed at point 1, 2, ... until a run completes; after
/// each kill checks the invariants, re-runs it to completion, checks the
/// result, and puts the starting state back.
fn walk(
    f: &Fixture,
    old: &str,
    new: &str,
    what: &str,
    args: impl Fn(&mut Command),
    done: impl Fn(&str),
) -> usize {
    let saved = f.key_files();
    let saved_pass = std::fs::read(&f.shipper.passphrase_file).unwrap();
    let mut reached = Vec::new();
    for n in 1.. {
        assert!(n < 60, "{what}: no run completed within 60 crash points");
        let mut cmd = f.shipper.cmd();
        args(&mut cmd);
        cmd.env("WALSHIPPER_CRASH_AT", format!("key-passphrase:{n}"));
        let o = run(&mut cmd);
        if o.status.success() {
            eprintln!(
                "{what}: killed at points 1..={} ({}), run {n} completed",
                n - 1,
                reached.join(" ")
            );
            break;
        }
        assert_eq!(o.status.signal(), Some(9), "{what} point {n}: {}", text(&o));
        // What the kill left: O/N = the passphrase file's, then how many
        // key files each passphrase opens.
        let state = f.opened_by(&[old, new]);
        let pass_now = std::fs::read_to_string(&f.shipper.passphrase_file).unwrap();
        reached.push(format!(
            "{n}:{}{}/{}",
            if pass_now.trim_end() == new { "N" } else { "O" },
            state.values().filter(|w| w[0]).count(),
            state.values().filter(|w| w[1]).count()
        ));
        f.all_readable(&[old, new], n, &format!("{what}, killed at point {n}"));
        // A re-run finishes the change.
        let mut again = f.shipper.cmd();
        args(&mut again);
        let o = run(&mut again);
        // Killed after its last write, the change is complete: the re-run
        // says so (and changes nothing).
        assert!(
            o.status.success()
                || String::from_utf8_lossy(&o.stderr).contains("interrupted is complete"),
            "{what}: re-run after point {n}: {}",
            text(&o)
        );
        done(&format!("{what}, re-run after point {n}"));
        // Back to the starting state for the next point.
        f.restore_key_files(&saved);
        std::fs::write(&f.shipper.passphrase_file, &saved_pass).unwrap();
    }
    done(&format!("{what}, the run that completed"));
    // Leave it at `old` again for what follows.
    f.restore_key_files(&saved);
    std::fs::write(&f.shipper.passphrase_file, &saved_pass).unwrap();
    reached.len()
}

/// PGB_KEY_CAMPAIGN=full: the passphrase in the environment and
/// `--keep-old` (the run stops at stage both) walked over every point; then
/// `--finish` refused with the old passphrase, and walked over every point.
fn walk_keep_old_then_finish(f: &Fixture, old: &str, new: &str) {
    let new_file = f.d.join("new-keep");
    write_private(&new_file, &format!("{new}\n"));
    let saved = f.key_files();
    let keep_old = |c: &mut Command| {
        c.env("WALSHIPPER_PASSPHRASE", old)
            .args(["key", "passphrase", "--keep-old", "--new-file"])
            .arg(&new_file);
    };
    let both = |when: &str| {
        for (k, which) in f.opened_by(&[old, new]) {
            assert_eq!(which, [true, true], "{when}: both open {k:?}");
        }
    };
    // The pre-check and 6 key files.
    assert_eq!(walk(f, old, new, "keep-old", keep_old, both), 7);
    let mut c = f.shipper.cmd();
    keep_old(&mut c);
    run_ok(&mut c);
    both("keep-old, completed");
    // --finish with the old passphrase still configured: refused.
    let o = run(f.shipper.cmd().env("WALSHIPPER_PASSPHRASE", old).args([
        "key",
        "passphrase",
        "--finish",
    ]));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("still gives the old passphrase"),
        "{}",
        text(&o)
    );
    both("--finish refused");
    let finish = |c: &mut Command| {
        c.env("WALSHIPPER_PASSPHRASE", new)
            .args(["key", "passphrase", "--finish"]);
    };
    assert_eq!(
        walk(f, old, new, "finish", finish, |w: &str| f.only(new, old, w)),
        7
    );
    f.restore_key_files(&saved);
}

/// Each a clear error, and nothing changed: key files byte-identical, the
/// passphrase file the same.
fn bad_input(f: &Fixture, current: &str) {
    let before = f.key_files();
    let pass_before = std::fs::read(&f.shipper.passphrase_file).unwrap();
    let short = f.d.join("short");
    write_private(&short, "too short\n");
    let same = f.d.join("same");
    write_private(&same, &format!("{current}\n"));
    let open = f.d.join("open");
    std::fs::write(&open, "a passphrase in a file others read\n").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let good = f.d.join("good");
    write_private(&good, "a perfectly fine new passphrase\n");
    let cases: Vec<(&str, Command, Option<&str>, &str)> = vec![
        (
            "wrong configured passphrase",
            {
                let mut c = f.shipper.cmd();
                c.env("WALSHIPPER_PASSPHRASE", "not the passphrase in use")
                    .env("WALSHIPPER_ENCRYPTION_KEY_CACHE", "false")
                    .args(["key", "passphrase", "--new-file"])
                    .arg(&good);
                c
            },
            None,
            "wrong passphrase",
        ),
        (
            "new passphrase too short",
            {
                let mut c = f.shipper.cmd();
                c.args(["key", "passphrase", "--new-file"]).arg(&short);
                c
            },
            None,
            "shorter than 12",
        ),
        (
            "new passphrase equal to the old",
            {
                let mut c = f.shipper.cmd();
                c.args(["key", "passphrase", "--new-file"]).arg(&same);
                c
            },
            None,
            "already the configured one",
        ),
        (
            "new passphrase file readable by others",
            {
                let mut c = f.shipper.cmd();
                c.args(["key", "passphrase", "--new-file"]).arg(&open);
                c
            },
            None,
            "chmod 600",
        ),
        (
            "new passphrase file missing",
            {
                let mut c = f.shipper.cmd();
                c.args(["key", "passphrase", "--new-file"])
                    .arg(f.d.join("absent"));
                c
            },
            None,
            "No such file",
        ),
        (
            "empty standard input",
            {
                let mut c = f.shipper.cmd();
                c.args(["key", "passphrase", "--new-stdin"]);
                c
            },
            Some(""),
            "empty",
        ),
    ];
    for (name, mut cmd, stdin, expect) in cases {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(s) = stdin {
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), s.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: accepted: {}", text(&o));
        assert!(err.contains(expect), "{name}: {}", text(&o));
        // No passphrase in any message.
        for p in [current, "a perfectly fine new passphrase", "too short"] {
            assert!(!err.contains(p), "{name}: the message shows a passphrase");
        }
        assert_eq!(f.key_files(), before, "{name}: key files changed");
        assert_eq!(
            std::fs::read(&f.shipper.passphrase_file).unwrap(),
            pass_before,
            "{name}: passphrase file changed"
        );
    }
}
