//! Recovery under a failing repository (issue 12, item 5). PostgreSQL reads
//! any restore_command status from 1 to 125 as "not in the archive" and ends
//! recovery there, promoting a cluster that silently lacks the rest of the
//! archive. archive-get must answer 1 only when every repository said "not
//! there"; anything else is retried, then stops recovery (status > 125).
//!
//! `archive_get_exit_statuses` runs anywhere (posix). The store-outage test
//! needs an S3 server of its own: it starts SeaweedFS on free ports through
//! scripts/s3-server.sh (PGB_TEST_S3_CTL; WEED) and stops it mid-recovery,
//! never touching the shared test server. scripts/test.sh runs it alone.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const MIN: Duration = Duration::from_secs(60);
/// Seconds archive-get retries in these tests (300 by default).
const RETRY: u64 = 2;

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn append(path: &Path, text: &str) {
    let mut old = std::fs::read_to_string(path).unwrap();
    old.push_str(text);
    std::fs::write(path, old).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// archive-get, timed.
fn get(cmd: &mut Command, name: &str, dest: &Path) -> (Output, Duration) {
    let t = Instant::now();
    let o = run(cmd.args(["archive-get", name]).arg(dest));
    (o, t.elapsed())
}

#[test]
fn archive_get_exit_statuses() {
    let dir = scratch("agexit");
    let d = dir.path();
    let (shipper, cluster) = archiving_cluster(d, "pg", &[]);
    append(
        &shipper.config,
        &format!("[restore]\narchive_get_retry_timeout = {RETRY}\n"),
    );
    let seg = cluster.switch_and_wait_archived(MIN);
    let dest = d.join("got");

    // A timeline switch first (standby promoted): the history file, the old
    // timeline's .partial, and the new timeline's first segment (which
    // begins with the old timeline's pages) pass the content checks.
    cluster.stop();
    std::fs::write(cluster.data.join("standby.signal"), "").unwrap();
    cluster.configure(&[format!("restore_command = {}", shipper.restore_command())]);
    cluster.start();
    run_ok(
        Command::new(pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&cluster.data)
            .args(["-w", "promote"]),
    );
    cluster.wait_promoted(MIN);
    let tl2 = cluster.switch_and_wait_archived(MIN);
    assert!(tl2.starts_with("00000002"), "{tl2}");
    cluster.stop();
    for name in ["00000002.history".to_string(), tl2.clone()] {
        let (o, _) = get(&mut shipper.cmd(), &name, &dest);
        assert_eq!(code(&o), 0, "{name}: {}", stderr(&o));
        std::fs::remove_file(&dest).unwrap();
    }
    let o = run(shipper.cmd().arg("verify"));
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    let absent = "0000000100000099000000FF";

    // Every repository answers "not there": 1, at once and quietly.
    let (o, took) = get(&mut shipper.cmd(), absent, &dest);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    assert!(took < Duration::from_secs(RETRY), "{took:?}");
    // The same with a second repository that lacks it too.
    let second = d.join("repo2");
    std::fs::create_dir(&second).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(shipper.repo.join("repository.json"))
            .arg(&second),
    );
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(shipper.repo.join("keys"))
            .arg(&second),
    );
    let (o, _) = get(
        shipper
            .cmd()
            .env("WALSHIPPER_REPO2_PATH", &second)
            .env("WALSHIPPER_REPO2_TYPE", "posix"),
        absent,
        &dest,
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));

    // Anything else is not "not there": retried for the configured time,
    // then > 125 so that PostgreSQL stops instead of promoting.
    let unavailable = |o: &Output, took: Duration, what: &str| {
        assert_eq!(code(o), 128, "{what}: {}", stderr(o));
        assert!(
            took >= Duration::from_secs(RETRY),
            "{what}: gave up after {took:?}"
        );
        assert!(stderr(o).contains("retrying"), "{what}: {}", stderr(o));
        assert!(!dest.exists(), "{what}");
    };
    // A second repository that is not there at all (unmounted) is not an
    // answer about the file, even when the first one lacks it.
    let (o, took) = get(
        shipper
            .cmd()
            .env("WALSHIPPER_REPO2_PATH", d.join("not-mounted"))
            .env("WALSHIPPER_REPO2_TYPE", "posix"),
        absent,
        &dest,
    );
    unavailable(&o, took, "missing repository");
    assert!(stderr(&o).contains("no repository at"), "{}", stderr(&o));
    // An unreadable passphrase file (no key cache to fall back on).
    chmod(&shipper.passphrase_file, 0o000);
    let (o, took) = get(
        shipper
            .cmd()
            .env("WALSHIPPER_ENCRYPTION_KEY_CACHE", "false"),
        &seg,
        &dest,
    );
    chmod(&shipper.passphrase_file, 0o600);
    unavailable(&o, took, "unreadable passphrase");
    assert!(stderr(&o).contains("passphrase"), "{}", stderr(&o));
    // An unreadable configuration file: its retry time cannot be read
    // either; the environment's is used.
    chmod(&shipper.config, 0o000);
    let (o, took) = get(
        shipper.cmd().env(
            "WALSHIPPER_RESTORE_ARCHIVE_GET_RETRY_TIMEOUT",
            RETRY.to_string(),
        ),
        &seg,
        &dest,
    );
    chmod(&shipper.config, 0o600);
    unavailable(&o, took, "unreadable configuration");
    // A destination that cannot be written is named as the local problem.
    let readonly = d.join("readonly");
    std::fs::create_dir(&readonly).unwrap();
    chmod(&readonly, 0o500);
    let (o, took) = get(&mut shipper.cmd(), &seg, &readonly.join("RECOVERYXLOG"));
    assert_eq!(code(&o), 128, "{}", stderr(&o));
    assert!(took >= Duration::from_secs(RETRY));
    assert!(
        stderr(&o).contains(&format!(
            "cannot write {}",
            readonly.join("RECOVERYXLOG").display()
        )),
        "{}",
        stderr(&o)
    );
    // A write that fails midway (here: a file size limit, EFBIG, standing in
    // for a full disk) is the destination's problem, not a repository read.
    let o = run(Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 64; exec \"$0\" \"$@\"")
        .arg(walshipper_bin())
        .arg("--config")
        .arg(&shipper.config)
        .args(["archive-get", &seg])
        .arg(&dest)
        .env_remove("WALSHIPPER_PASSPHRASE"));
    assert_eq!(code(&o), 128, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("cannot write {}: File too large", dest.display())),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("storage read"), "{}", stderr(&o));
    assert!(!dest.exists());
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("walshipper.tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A restore_command set up with the arguments the wrong way round.
    let (o, _) = get(&mut shipper.cmd(), "pg_wal/RECOVERYXLOG", &dest);
    assert_eq!(code(&o), 128, "{}", stderr(&o));
    // One with "%p" missing: clap's usage error, still 128 (not 2).
    let o = run(shipper.cmd().args(["archive-get", &seg]));
    assert_eq!(code(&o), 128, "{}", stderr(&o));

    // Another segment's object under this name is refused at once (126),
    // by archive-get and by verify.
    let later = {
        let n = u64::from_str_radix(&seg[16..24], 16).unwrap() + 1;
        format!("{}{:08X}", &seg[0..16], n)
    };
    std::fs::copy(shipper.wal_object(&seg), shipper.wal_object(&later)).unwrap();
    let (o, took) = get(&mut shipper.cmd(), &later, &dest);
    assert_eq!(code(&o), 126, "{}", stderr(&o));
    assert!(
        took < Duration::from_secs(RETRY),
        "retried damage: {took:?}"
    );
    assert!(!dest.exists());
    let o = run(shipper.cmd().arg("verify"));
    assert_eq!(code(&o), 6, "{}", String::from_utf8_lossy(&o.stdout));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("WAL {later}")),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    std::fs::remove_file(shipper.wal_object(&later)).unwrap();
    // The server that asked dies mid-fetch (its startup process killed: here
    // the shell between it and archive-get): the fetch, slowed to about 2 s
    // by a download limit on the first repository (its bucket starts with
    // one second's budget), must not rename its file into the destination,
    // where the next server may already be recovering, and must end without
    // asking the second repository (a copy of the first, unthrottled).
    let copy = d.join("repo-copy");
    run_ok(Command::new("cp").arg("-a").arg(&shipper.repo).arg(&copy));
    let size = std::fs::metadata(shipper.wal_object(&seg)).unwrap().len();
    let err_file = d.join("orphan.err");
    let mut asker = Command::new("sh");
    asker
        .arg("-c")
        .arg("\"$0\" \"$@\" & echo $!; wait")
        .arg(walshipper_bin())
        .arg("--config")
        .arg(&shipper.config)
        .args(["archive-get", &seg])
        .arg(&dest)
        .env_remove("WALSHIPPER_PASSPHRASE")
        .env(
            "WALSHIPPER_REPO_DOWNLOAD_LIMIT",
            (size / 3).max(1).to_string(),
        )
        .env("WALSHIPPER_REPO2_PATH", &copy)
        .env("WALSHIPPER_REPO2_TYPE", "posix")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&err_file).unwrap());
    let mut asker = asker.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(asker.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let pid: i32 = line.trim().parse().unwrap();
    let temporaries = || -> Vec<_> {
        std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("walshipper.tmp"))
            .map(|e| e.file_name())
            .collect()
    };
    // Its temporary is made after it noted who asked: killing the shell
    // before that would leave nothing to notice.
    let t = Instant::now();
    while temporaries().is_empty() {
        assert!(t.elapsed() < MIN, "archive-get never began its fetch");
        std::thread::sleep(Duration::from_millis(20));
    }
    asker.kill().unwrap();
    asker.wait().unwrap();
    let t = Instant::now();
    // Running, not a zombie (reaped by whichever process adopted it).
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, r)| !r.starts_with('Z'))
        })
    };
    while running() {
        assert!(t.elapsed() < MIN, "the orphaned archive-get did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "ended at once: not slowed enough to be caught mid-fetch"
    );
    let err = std::fs::read_to_string(&err_file).unwrap();
    assert!(
        !dest.exists(),
        "an orphaned archive-get wrote its file: {err}"
    );
    assert!(temporaries().is_empty(), "{:?}", temporaries());
    assert!(err.contains("is gone"), "{err}");
    assert!(
        !err.contains("repo2") && !err.contains("retrying"),
        "asked again after its server was gone: {err}"
    );
    // The real one still comes back.
    let (o, _) = get(&mut shipper.cmd(), &seg, &dest);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// An S3 server of this test's own, on free ports; stopped when dropped.
struct OwnStore {
    script: PathBuf,
    dir: PathBuf,
    port: u16,
    extra: String,
}

impl OwnStore {
    fn new(script: PathBuf, dir: PathBuf) -> OwnStore {
        // Every port weed mini opens, so that it never meets another server.
        let extra = [
            "s3.port.grpc",
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "admin.port",
            "admin.port.grpc",
        ]
        .iter()
        .map(|f| format!("-{f}={}", free_port()))
        .collect::<Vec<_>>()
        .join(" ");
        OwnStore {
            script,
            dir,
            port: free_port(),
            extra,
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("S3_DIR", self.dir.display().to_string()),
            ("S3_PORT", self.port.to_string()),
            ("WEED_EXTRA_ARGS", self.extra.clone()),
        ]
    }

    fn ctl(&self, action: &str) {
        run_ok(
            Command::new("bash")
                .arg(&self.script)
                .arg(action)
                .envs(self.env()),
        );
    }

    /// The shell command that stops it (for a restore_command wrapper).
    fn stop_command(&self) -> String {
        format!(
            "S3_DIR='{}' bash '{}' stop >/dev/null 2>&1",
            self.dir.display(),
            self.script.display()
        )
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnStore {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .envs(self.env())
            .output();
    }
}

/// Makes PostgreSQL's restore_command a wrapper that runs `fault` (once)
/// when recovery first asks for `trigger`, then calls archive-get.
fn fault_at(c: &Cluster, shipper: &Shipper, d: &Path, trigger: &str, fault: &str) -> PathBuf {
    let flag = d.join(format!("{trigger}.fault-done"));
    let script = d.join("restore-with-fault.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1\" = '{trigger}' ] && [ ! -e '{flag}' ]; then touch '{flag}'; {fault}; fi\n\
             exec '{}' --config '{}' archive-get \"$1\" \"$2\"\n",
            walshipper_bin().display(),
            shipper.config.display(),
            flag = flag.display(),
        ),
    )
    .unwrap();
    chmod(&script, 0o700);
    // Last line wins, over the one restore wrote.
    append(
        &c.data.join("postgresql.auto.conf"),
        &format!("restore_command = '{} %f \"%p\"'\n", script.display()),
    );
    flag
}

/// Waits until recovery has either failed (the server stopped by itself)
/// or ended (promoted): whichever comes first, the assertions say which.
fn wait_stopped(c: &Cluster, timeout: Duration) {
    let start = Instant::now();
    loop {
        let log = c.log_text();
        let failed = log.contains("due to startup process failure");
        let ended = log.contains("archive recovery complete")
            || log.contains("database system is ready to accept connections");
        if ended || (failed && !c.data.join("postmaster.pid").exists()) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "recovery neither stopped nor ended within {timeout:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the repository answers again: a restarted SeaweedFS takes a
/// moment before it serves reads (HTTP 500 meanwhile).
fn wait_serving(shipper: &Shipper) {
    let start = Instant::now();
    loop {
        let o = run(shipper.cmd().arg("info"));
        if o.status.success() {
            return;
        }
        assert!(start.elapsed() < MIN, "store not serving: {}", stderr(&o));
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Recovery must have stopped FATAL on archive-get, not promoted.
fn assert_stopped_not_promoted(c: &Cluster, what: &str) {
    let log = c.log_text();
    assert!(
        log.contains("FATAL") && log.contains("could not restore file"),
        "{what}: recovery did not stop on the failing restore_command:\n{log}"
    );
    assert!(
        !log.contains("selected new timeline ID") && !log.contains("archive recovery complete"),
        "{what}: recovery ended early and promoted:\n{log}"
    );
    assert!(c.data.join("recovery.signal").exists(), "{what}");
}

#[test]
fn recovery_stops_on_a_failing_store_and_resumes_after_it() {
    let (Ok(ctl), Ok(_), Ok(_)) = (
        std::env::var("PGB_TEST_S3_CTL"),
        std::env::var("PGB_TEST_S3_ENDPOINT"),
        std::env::var("WEED"),
    ) else {
        eprintln!(
            "PGB_TEST_S3_CTL / PGB_TEST_S3_ENDPOINT / WEED not set: skipped (scripts/test.sh runs it)"
        );
        return;
    };
    let started = Instant::now();
    let dir = scratch("rfault");
    let d = dir.path();
    let store = OwnStore::new(PathBuf::from(ctl), d.join("s3"));
    store.ctl("start");
    let mut rc = s3_repo_config("rfault").unwrap();
    rc.endpoint = store.endpoint();
    // Fail fast while the store is down: the retry is archive-get's.
    rc.retries = 1;
    rc.connect_timeout = 1;
    rc.request_timeout = 5;
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    shipper.set_repo_section(&s3_section("repo", &rc));
    append(
        &shipper.config,
        &format!("[restore]\narchive_get_retry_timeout = {RETRY}\n"),
    );
    let src = shipper.start_archiving(d, "src");
    src.sql("CREATE TABLE marker (id int PRIMARY KEY)");
    shipper.backup(&[]);
    // One committed marker per segment, over several segments.
    let mut segs = Vec::new();
    for i in 1..=5 {
        src.sql(&format!("INSERT INTO marker VALUES ({i})"));
        segs.push(src.sql("SELECT pg_walfile_name(pg_current_wal_lsn())"));
        src.sql("SELECT pg_switch_wal()");
    }
    src.switch_and_wait_archived(MIN);
    src.stop();
    // The fault starts when recovery asks for the segment of marker 3:
    // past the backup's consistency point, with markers 3 to 5 still to come.
    let trigger = segs[2].clone();

    // 1. The store stops during recovery. Before issue 12, archive-get
    // exited 3, PostgreSQL took it for the end of the archive and promoted
    // with markers 1 and 2 only.
    let r = d.join("r1");
    let o = shipper.restore(&r, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = Cluster::at(d, "r1");
    c.configure(&["archive_mode = off".into()]);
    fault_at(&c, &shipper, d, &trigger, &store.stop_command());
    c.start_nowait();
    wait_stopped(&c, MIN);
    assert_stopped_not_promoted(&c, "store stopped");
    // archive-get against the stopped store, directly: retried, then 128.
    let (o, took) = get(&mut shipper.cmd(), &trigger, &d.join("probe"));
    assert_eq!(code(&o), 128, "{}", stderr(&o));
    assert!(took >= Duration::from_secs(RETRY), "{took:?}");
    // The store is back: starting the server again resumes recovery, and
    // nothing committed is missing.
    store.ctl("start");
    wait_serving(&shipper);
    c.start_nowait();
    c.wait_promoted(MIN);
    assert_eq!(c.sql("SELECT max(id) FROM marker"), "5", "{}", c.log_text());
    c.stop();

    // 2. The passphrase file becomes unreadable during recovery (no key
    // cache: it would otherwise answer without the file).
    let r = d.join("r2");
    let o = shipper.restore(&r, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = Cluster::at(d, "r2");
    c.configure(&["archive_mode = off".into()]);
    let no_cache = d.join("no-cache.toml");
    let text = std::fs::read_to_string(&shipper.config)
        .unwrap()
        .replace("[encryption]\n", "[encryption]\nkey_cache = false\n");
    std::fs::write(&no_cache, text).unwrap();
    chmod(&no_cache, 0o600);
    let without_cache = Shipper {
        config: no_cache,
        repo: shipper.repo.clone(),
        passphrase_file: shipper.passphrase_file.clone(),
    };
    std::fs::remove_file(d.join(format!("{trigger}.fault-done"))).unwrap();
    fault_at(
        &c,
        &without_cache,
        d,
        &trigger,
        &format!("chmod 000 '{}'", shipper.passphrase_file.display()),
    );
    c.start_nowait();
    wait_stopped(&c, MIN);
    assert_stopped_not_promoted(&c, "passphrase unreadable");
    assert!(c.log_text().contains("passphrase"), "{}", c.log_text());
    chmod(&shipper.passphrase_file, 0o600);
    c.start_nowait();
    c.wait_promoted(MIN);
    assert_eq!(c.sql("SELECT max(id) FROM marker"), "5", "{}", c.log_text());
    c.stop();
    eprintln!("recovery under a failing store: {:?}", started.elapsed());
}
