//! Issue 12, items 9 and 10, through the real binary: secrets are never
//! printed and never kept in files others can read; the repository is
//! private; a planted lock symlink harms nothing; on S3 a second host is
//! kept out by the lease. No PostgreSQL server is started: one initdb gives
//! repo-init a pg_control to read.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const SECRET: &str = "hZ9+SuperSecretAccessKey/ForTheHostileHostTest";

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn walshipper(config: &Path, args: &[&str]) -> Output {
    run(Command::new(walshipper_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("WALSHIPPER_PASSPHRASE"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s3_lines(bucket: &str, prefix: &str, endpoint: &str, key: &str, secret: &str) -> String {
    format!(
        "[repo]\ntype = \"s3\"\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\nendpoint = \"{endpoint}\"\n\
         region = \"us-east-1\"\nforce_path_style = true\naccess_key_id = \"{key}\"\n\
         secret_access_key = \"{secret}\"\nretries = 1\nconnect_timeout = 2\n"
    )
}

#[test]
fn a_config_holding_a_secret_must_be_private() {
    let dir = scratch("hh-perm");
    let cfg = dir.path().join("walshipper.toml");
    std::fs::write(
        &cfg,
        s3_lines("b", "p", "http://127.0.0.1:9", "AKIDEXAMPLE", SECRET),
    )
    .unwrap();
    for m in [0o644, 0o640, 0o604, 0o660] {
        chmod(&cfg, m);
        let out = walshipper(&cfg, &["info"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "mode {m:o}: {err}");
        assert!(
            err.contains(&format!("chmod 600 {}", cfg.display())),
            "mode {m:o}: no chmod hint: {err}"
        );
        assert!(!err.contains(SECRET), "secret printed: {err}");
    }
    // Private: the permission check passes (the unreachable store fails later).
    chmod(&cfg, 0o600);
    let err = stderr(&walshipper(&cfg, &["info"]));
    assert!(!err.contains("chmod"), "{err}");
    assert!(!err.contains(SECRET), "secret printed: {err}");
    // The secret in the environment: a shared file without it is fine.
    std::fs::write(
        &cfg,
        s3_lines("b", "p", "http://127.0.0.1:9", "", "")
            .replace("access_key_id = \"\"\nsecret_access_key = \"\"\n", ""),
    )
    .unwrap();
    chmod(&cfg, 0o644);
    let out = run(Command::new(walshipper_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("info")
        .env("WALSHIPPER_REPO_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("WALSHIPPER_REPO_SECRET_ACCESS_KEY", SECRET));
    let err = stderr(&out);
    assert!(
        !err.contains("chmod") && !err.contains("configuration error"),
        "{err}"
    );
    assert!(!err.contains(SECRET), "secret printed: {err}");
}

#[test]
fn toml_errors_never_print_the_secret() {
    let dir = scratch("hh-toml");
    let cfg = dir.path().join("walshipper.toml");
    let good = s3_lines("b", "p", "http://127.0.0.1:9", "AKIDEXAMPLE", SECRET);
    let broken = [
        // Unterminated string on the secret's line.
        good.replace(&format!("\"{SECRET}\""), &format!("\"{SECRET}")),
        // Bare (unquoted) secret.
        good.replace(&format!("\"{SECRET}\""), SECRET),
        // The secret as the value of a typed key.
        format!("{good}retries = \"{SECRET}\"\n").replace("retries = 1\n", ""),
        // The secret under a misspelt key.
        good.replace("secret_access_key", "secret_acess_key"),
        // A syntax error on the line after it.
        format!("{good}[pg\n"),
    ];
    for text in broken {
        std::fs::write(&cfg, &text).unwrap();
        chmod(&cfg, 0o600);
        // archive-push: the command whose errors land in the server log.
        let out = walshipper(
            &cfg,
            &["archive-push", "/nonexistent/000000010000000000000001"],
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("configuration error"), "{err}");
        assert!(!err.contains(SECRET), "secret printed:\n{err}");
        assert!(
            !err.contains("SuperSecret"),
            "part of the secret printed:\n{err}"
        );
        eprintln!("redacted: {}", err.trim());
    }
}

/// One data directory for repo-init, shared by the tests below.
fn cluster() -> &'static (tempfile::TempDir, PathBuf) {
    static C: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        let dir = scratch("hh-pg");
        let c = Cluster::init(dir.path(), "pg", &[]);
        let data = c.data.clone();
        (dir, data)
    })
}

#[test]
fn posix_repository_passphrase_file_and_lock_file() {
    let (_, data) = cluster();
    let dir = scratch("hh-posix");
    let repo = dir.path().join("repo");
    let pass = dir.path().join("passphrase");
    std::fs::write(&pass, "a long passphrase for the hostile host test\n").unwrap();
    let cfg = dir.path().join("walshipper.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pg]\ndata_dir = \"{}\"\n[repo]\npath = \"{}\"\n[encryption]\npassphrase_file = \"{}\"\nkey_cache = false\n",
            data.display(),
            repo.display(),
            pass.display()
        ),
    )
    .unwrap();
    chmod(&cfg, 0o644); // no secret in it: may be shared
                        // A passphrase file others can read is refused, not just warned about.
    chmod(&pass, 0o644);
    let out = walshipper(&cfg, &["repo-init", "--kdf-memory-kib", "8192"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("chmod 600 {}", pass.display())),
        "{err}"
    );
    assert!(!err.contains("a long passphrase"), "{err}");
    assert!(!repo.join("repository.json").exists());
    chmod(&pass, 0o600);
    run_ok(
        Command::new(walshipper_bin())
            .arg("--config")
            .arg(&cfg)
            .args(["repo-init", "--kdf-memory-kib", "8192"]),
    );
    // Private whatever the umask of the caller (0022 here).
    fn walk(p: &Path, dirs: &mut Vec<PathBuf>, files: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
                walk(&e.path(), dirs, files);
            } else {
                files.push(e.path());
            }
        }
    }
    let (mut dirs, mut files) = (vec![repo.clone()], Vec::new());
    walk(&repo, &mut dirs, &mut files);
    assert!(!files.is_empty());
    for d in &dirs {
        assert_eq!(mode(d), 0o700, "{}", d.display());
    }
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    // A lock symlink planted by someone who can write the repository
    // directory: backup and expire refuse it, its target is untouched.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, repo.join(".backup.lock")).unwrap();
    for args in [&["expire", "--keep-full", "1"][..], &["backup"][..]] {
        let out = walshipper(&cfg, args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("symbolic link"), "{args:?}: {err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }
    std::fs::remove_file(repo.join(".backup.lock")).unwrap();
    run_ok(
        Command::new(walshipper_bin())
            .arg("--config")
            .arg(&cfg)
            .args(["expire", "--keep-full", "1"]),
    );
    assert_eq!(mode(&repo.join(".backup.lock")), 0o600);
}

#[test]
fn s3_lease_keeps_a_second_host_out() {
    let Some(rc) = s3_repo_config("hostile-lease") else {
        eprintln!("PGB_TEST_S3_ENDPOINT not set: skipped");
        return;
    };
    let (_, data) = cluster();
    let dir = scratch("hh-s3");
    let cfg = dir.path().join("walshipper.toml");
    std::fs::write(
        &cfg,
        format!(
            "[pg]\ndata_dir = \"{}\"\n[encryption]\nmode = \"none\"\n{}",
            data.display(),
            s3_section("repo", &rc)
        ),
    )
    .unwrap();
    chmod(&cfg, 0o600);
    run_ok(
        Command::new(walshipper_bin())
            .arg("--config")
            .arg(&cfg)
            .args(["repo-init", "--no-encryption"]),
    );
    let storage: Arc<dyn walshipper::storage::Storage> =
        Arc::from(walshipper::storage::open(&rc).unwrap());
    // repo-init probed the store and kept the verdict.
    assert!(storage
        .head(walshipper::layout::CONDITIONAL_WRITES)
        .unwrap()
        .is_some());
    // "db2" (this test process) holds the lease: backup and expire of this
    // host get exit 7 naming it, before touching anything.
    let other = walshipper::lock::LeaseOptions {
        host: "db2.example".into(),
        pid: 4242,
        holder: "walshipper backup --type full".into(),
        ..Default::default()
    };
    let held = walshipper::lock::lease(storage.clone(), "backup", &other).unwrap();
    for args in [&["expire", "--keep-full", "1"][..], &["backup"][..]] {
        let out = walshipper(&cfg, args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(7), "{args:?}: {err}");
        assert!(err.contains("db2.example") && err.contains("4242"), "{err}");
    }
    drop(held);
    // Released: expire runs, and releases its own lease when done.
    run_ok(
        Command::new(walshipper_bin())
            .arg("--config")
            .arg(&cfg)
            .args(["expire", "--keep-full", "1"]),
    );
    let lease_key = walshipper::layout::lease("backup");
    assert!(
        storage.head(&lease_key).unwrap().is_none(),
        "lease left behind"
    );
    // A lease left by a host that died: expired, so taken over.
    let now = chrono::Utc::now();
    let dead = walshipper::lock::LeaseBody {
        holder: "walshipper backup".into(),
        host: "db3.example".into(),
        pid: 77,
        acquired_at: now - chrono::Duration::seconds(900),
        expires_at: now - chrono::Duration::seconds(60),
        token: "1".repeat(32),
        renewals: 30,
    };
    storage
        .put_versioned(&lease_key, &serde_json::to_vec(&dead).unwrap(), None)
        .unwrap()
        .unwrap();
    let out = walshipper(&cfg, &["expire", "--keep-full", "1"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("took over an expired backup lease"), "{err}");
    std::thread::sleep(Duration::from_millis(10));
    assert!(storage.head(&lease_key).unwrap().is_none());
}
