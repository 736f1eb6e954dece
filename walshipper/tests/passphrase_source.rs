//! `[encryption] passphrase_command`: the passphrase printed by a command
//! (Vault, sops, systemd-creds, a cloud secret manager), with the real
//! walshipper binary, a real cluster archiving through it, and a real
//! executable standing in for the secret manager (a script that counts its
//! runs in a file).
//!
//! - the command opens the repository; archive-push of real WAL and
//!   archive-get back are byte-identical; the command runs once across many
//!   archive-push calls (key cache), again after the cache is cleared, and
//!   once for two repositories opened by one process;
//! - bad input (fails, prints nothing, a newline, 100 KiB, hangs, relative,
//!   not executable, missing, both command and file, wrong passphrase): a
//!   clear error each, the repository byte-identical, the command's output
//!   never in a message.
//!
//! Backend: posix, or S3 with PGB_TEST_BACKEND=s3. Takes about 15 s.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "passphrase from the secret manager, long enough";

/// An executable script `name` in `dir` running `body` under /bin/sh.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
    p
}

/// The `[repo]` tables: posix under `dir`, or S3 (PGB_TEST_BACKEND=s3).
fn repo_sections(dir: &Path, tag: &str, n: usize) -> String {
    (1..=n)
        .map(|i| match s3_repo_config(tag) {
            Some(rc) if test_backend() == "s3" => s3_section("[[repo]]", &rc),
            _ => format!(
                "[[repo]]\ntype = \"posix\"\npath = \"{}\"\n",
                dir.join(format!("{tag}-repo{i}")).display()
            ),
        })
        .collect()
}

/// Writes a private configuration `name` with `encryption` as its
/// [encryption] table.
fn config(dir: &Path, name: &str, data: &Path, repos: &str, encryption: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "[pg]\ndata_dir = \"{}\"\nhost = \"{}\"\nport = 5432\nuser = \"postgres\"\ndatabase = \"postgres\"\n\
             {repos}[encryption]\n{encryption}\n[compression]\nlevel = 3\n",
            data.display(),
            dir.join("src-sock").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn walshipper(config: &Path) -> Command {
    let mut c = Command::new(walshipper_bin());
    c.arg("--config").arg(config);
    c.env_remove("WALSHIPPER_PASSPHRASE");
    c
}

fn runs(counter: &Path) -> usize {
    std::fs::read_to_string(counter)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Every object of every configured repository with its bytes (through
/// the storage driver, so that S3 is compared too).
fn snapshot(config: &Path) -> BTreeMap<String, Vec<u8>> {
    let cfg = walshipper::config::Config::load(Some(config)).unwrap();
    let mut all = BTreeMap::new();
    for rc in &cfg.repos {
        let s = walshipper::storage::open(rc).unwrap();
        for o in s.list("").unwrap() {
            let mut body = Vec::new();
            if let Some(mut r) = s.get(&o.key).unwrap() {
                std::io::Read::read_to_end(&mut r, &mut body).unwrap();
            }
            all.insert(format!("{}/{}", rc.name, o.key), body);
        }
    }
    all
}

/// Whether a process of group `pgid` still runs (a zombie does not).
fn group_alive(pgid: i32) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        // pid (comm) state ppid pgrp ...: comm may hold spaces.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        f.len() > 2 && f[2] == pgid.to_string() && f[0] != "Z"
    })
}

#[test]
fn a_command_opens_the_repository_once_per_key_per_host() {
    let d = scratch("pass-cmd");
    let dir = d.path();
    let counter = dir.join("runs");
    std::fs::write(dir.join("secret"), format!("{SECRET}\n")).unwrap();
    // Stands in for `vault kv get -field=passphrase ...`: appends a line to
    // the counter, prints the secret with a trailing newline.
    let cmd = script(
        dir,
        "get-passphrase",
        &format!(
            "echo run >> '{}'\ncat '{}'",
            counter.display(),
            dir.join("secret").display()
        ),
    );
    let data = dir.join("src");
    // Two repositories: one process opening both must run the command once.
    let cfg = config(
        dir,
        "walshipper.toml",
        &data,
        &repo_sections(dir, "cmd", 2),
        &format!(
            "passphrase_command = [\"{}\"]\npassphrase_command_timeout = 10\nkey_cache_dir = \"{}\"\n",
            cmd.display(),
            dir.join("keycache").display()
        ),
    );
    let archive = format!(
        "'{} --config {} archive-push %p'",
        walshipper_bin().display(),
        cfg.display()
    );
    let cluster = Cluster::init(
        dir,
        "src",
        &[
            "archive_mode = on".into(),
            format!("archive_command = {archive}"),
            // Archived segments stay in pg_wal to compare with archive-get.
            "wal_keep_size = '1GB'".into(),
        ],
    );
    run_ok(walshipper(&cfg).args(["repo-init", "--kdf-memory-kib", "8192"]));
    assert_eq!(runs(&counter), 1, "repo-init reads the passphrase once");
    cluster.start();

    // Many archive-push calls by the real archiver: the key cache answers,
    // the command is not run again.
    let mut names = Vec::new();
    for i in 0..6 {
        cluster.sql(&format!(
            "CREATE TABLE IF NOT EXISTS t(i int, pad text); INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g; SELECT {i}"
        ));
        names.push(cluster.switch_and_wait_archived(Duration::from_secs(60)));
    }
    let archived: usize = cluster
        .sql("SELECT archived_count FROM pg_stat_archiver")
        .parse()
        .unwrap();
    assert!(archived >= names.len(), "archived {archived}");
    assert_eq!(
        runs(&counter),
        1,
        "{archived} archive-push calls ran the passphrase command (the key cache should answer)"
    );

    // archive-get back: byte-identical to the segment PostgreSQL wrote.
    let back = dir.join("back");
    std::fs::create_dir_all(&back).unwrap();
    for n in &names {
        run_ok(walshipper(&cfg).args(["archive-get", n]).arg(back.join(n)));
        let got = std::fs::read(back.join(n)).unwrap();
        let want = std::fs::read(data.join("pg_wal").join(n)).unwrap();
        assert!(got == want, "{n}: archive-get differs from pg_wal/{n}");
    }
    assert_eq!(runs(&counter), 1);

    // Cache cleared (a reboot empties the host secret the same way): the
    // next push runs the command once, for both repositories, then the
    // cache answers again.
    std::fs::remove_dir_all(dir.join("keycache")).unwrap();
    names.push(cluster.switch_and_wait_archived(Duration::from_secs(60)));
    assert_eq!(runs(&counter), 2, "one run after the cache was cleared");
    for _ in 0..2 {
        names.push(cluster.switch_and_wait_archived(Duration::from_secs(60)));
    }
    assert_eq!(runs(&counter), 2, "re-cached after the miss");

    // Cost of archive-push, cache hit against miss: a small timeline
    // history file, so that the figures are the open path, not 16 MiB of
    // hashing (pushed once first; later pushes find the same bytes).
    let seg = dir.join("00000002.history");
    std::fs::write(&seg, "1\t0/3000000\tno recovery target specified\n").unwrap();
    run_ok(walshipper(&cfg).arg("archive-push").arg(&seg));
    let push = || {
        let t = Instant::now();
        run_ok(walshipper(&cfg).arg("archive-push").arg(&seg));
        t.elapsed()
    };
    let before = runs(&counter);
    let hits: Vec<Duration> = (0..5).map(|_| push()).collect();
    assert_eq!(runs(&counter), before);
    let misses: Vec<Duration> = (0..3)
        .map(|_| {
            std::fs::remove_dir_all(dir.join("keycache")).unwrap();
            push()
        })
        .collect();
    assert_eq!(runs(&counter), before + 3);
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    eprintln!(
        "archive-push with a command source: cache hit median {:?}, miss median {:?} (debug build, two repositories, KDF 8 MiB, command = a shell script)",
        median(hits),
        median(misses)
    );

    // `verify` reads the key files with the passphrase from its source,
    // never from the cache: a stale secret shows there.
    let before = runs(&counter);
    run_ok(walshipper(&cfg).args(["verify"]));
    assert_eq!(runs(&counter), before + 1, "verify asks the source");

    // The secret store already gives another passphrase (changed ahead of
    // `key passphrase`): the cache still opens the repositories, but a
    // rotation would wrap the new key by the other passphrase alone, and no
    // one passphrase would open everything. Refused, nothing changed.
    let before = snapshot(&cfg);
    std::fs::write(
        dir.join("secret"),
        "a passphrase the key files do not know\n",
    )
    .unwrap();
    let o = run(walshipper(&cfg).args(["key", "rotate"]));
    assert!(
        !o.status.success(),
        "key rotate with a stale secret store succeeded"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("does not open with the configured passphrase"),
        "{err}"
    );
    assert!(
        snapshot(&cfg) == before,
        "a refused rotate changed the repositories"
    );
    std::fs::write(dir.join("secret"), format!("{SECRET}\n")).unwrap();
    run_ok(walshipper(&cfg).args(["key", "rotate"]));
    cluster.stop();
}

#[test]
fn a_bad_passphrase_command_is_a_clear_error_and_changes_nothing() {
    let d = scratch("pass-bad");
    let dir = d.path();
    let data = dir.join("src");
    // Not started: repo-init and archive-push need only the data directory.
    let _cluster = Cluster::init(dir, "src", &[]);
    let seg = data.join("pg_wal").join("000000010000000000000001");
    assert!(seg.exists());
    let repos = repo_sections(dir, "bad", 1);
    let pass_file = dir.join("passphrase");
    std::fs::write(&pass_file, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&pass_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let good = config(
        dir,
        "good.toml",
        &data,
        &repos,
        &format!(
            "passphrase_file = \"{}\"\nkey_cache = false\n",
            pass_file.display()
        ),
    );
    run_ok(walshipper(&good).args(["repo-init", "--kdf-memory-kib", "8192"]));
    let before = snapshot(&good);
    assert!(before.keys().any(|k| k.contains("keys/")), "{before:?}");

    // A leak canary: printed on standard output by the failing commands.
    let canary = "CANARY-stdout-is-the-secret";
    let pidfile = dir.join("hung.pid");
    let s = |name: &str, body: &str| script(dir, name, body).display().to_string();
    let not_exec = dir.join("not-executable");
    std::fs::write(&not_exec, format!("#!/bin/sh\necho '{SECRET}'\n")).unwrap();
    std::fs::set_permissions(&not_exec, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "exits 1",
            format!(
                "passphrase_command = [\"{}\"]",
                s(
                    "fails",
                    &format!("echo '{canary}'\necho 'vault: permission denied (token expired)' >&2\nexit 1")
                )
            ),
            "exited with status 1: vault: permission denied (token expired)",
        ),
        (
            "prints nothing",
            format!("passphrase_command = [\"{}\"]", s("silent", "exit 0")),
            "printed no passphrase",
        ),
        (
            "prints only a newline",
            format!("passphrase_command = [\"{}\"]", s("newline", "echo")),
            "printed no passphrase",
        ),
        (
            "prints 100 KiB",
            format!(
                "passphrase_command = [\"{}\"]",
                s("big", "head -c 102400 /dev/zero | tr '\\0' a")
            ),
            "printed more than 64 KiB",
        ),
        (
            "hangs past the timeout",
            format!(
                "passphrase_command = [\"{}\"]\npassphrase_command_timeout = 1",
                s(
                    "hangs",
                    &format!("echo $$ > '{}'\nsleep 60\necho '{canary}'", pidfile.display())
                )
            ),
            "no answer within 1 s (passphrase_command_timeout); it was killed",
        ),
        (
            "relative path",
            "passphrase_command = [\"vault\", \"kv\", \"get\"]".into(),
            "must be an absolute path",
        ),
        (
            "not executable",
            format!("passphrase_command = [\"{}\"]", not_exec.display()),
            "permission denied (is it executable by this user?)",
        ),
        (
            "missing",
            format!(
                "passphrase_command = [\"{}\"]",
                dir.join("no-such-program").display()
            ),
            "cannot run it: no such file",
        ),
        (
            "both command and file",
            format!(
                "passphrase_command = [\"{}\"]\npassphrase_file = \"{}\"",
                s("fine", &format!("echo '{SECRET}'")),
                pass_file.display()
            ),
            "both passphrase_command and passphrase_file",
        ),
        (
            "wrong passphrase",
            format!(
                "passphrase_command = [\"{}\"]",
                s("wrong", "echo 'the wrong passphrase, long enough'")
            ),
            "wrong passphrase",
        ),
    ];
    for (what, encryption, want) in &cases {
        let cfg = config(
            dir,
            "bad.toml",
            &data,
            &repos,
            // No cache: every open reads the passphrase.
            &format!("{encryption}\nkey_cache = false\n"),
        );
        let t = Instant::now();
        let out = run(walshipper(&cfg).arg("archive-push").arg(&seg));
        let took = t.elapsed();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("{what}: {} in {took:?}: {}", out.status, err.trim());
        assert!(!out.status.success(), "{what}: archive-push succeeded");
        assert!(err.contains(want), "{what}: want {want:?} in {err}");
        assert!(
            !err.contains(canary) && !err.contains("the wrong passphrase"),
            "{what}: the command's output leaked into the error: {err}"
        );
        assert!(snapshot(&good) == before, "{what}: the repository changed");
        if *what == "hangs past the timeout" {
            assert!(took < Duration::from_secs(10), "{what}: took {took:?}");
            let pid: i32 = std::fs::read_to_string(&pidfile)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            // The script and its sleep (its process group) are gone: at most
            // zombies are left (reaped by init, if this container's init
            // reaps at all).
            let t = Instant::now();
            while group_alive(pid) && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(
                !group_alive(pid),
                "{what}: process group {pid} survived the timeout"
            );
        }
    }

    // walshipper killed while the command runs (the archiver stopped at
    // shutdown): the command dies with it instead of waiting on a secret
    // store no one will ask again (a wrapper script that ends in `exec`).
    let pidfile2 = dir.join("orphan.pid");
    let cfg =
        config(
            dir,
            "orphan.toml",
            &data,
            &repos,
            &format!(
            "passphrase_command = [\"{}\"]\npassphrase_command_timeout = 60\nkey_cache = false\n",
            s("orphan", &format!("echo $$ > '{}'\nexec sleep 60", pidfile2.display()))
        ),
        );
    let mut child = walshipper(&cfg)
        .arg("archive-push")
        .arg(&seg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let pid: i32 = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile2)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the command never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    while group_alive(pid) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!group_alive(pid), "the command outlived walshipper");
    assert!(snapshot(&good) == before, "the repository changed");

    // The control: the right passphrase from a command writes the segment,
    // so a snapshot that did not change above was not blind.
    let ok = config(
        dir,
        "ok.toml",
        &data,
        &repos,
        &format!(
            "passphrase_command = [\"{}\", \"{SECRET}\"]\nkey_cache = false\n",
            s("echo-arg", "printf '%s\\n' \"$1\"")
        ),
    );
    run_ok(walshipper(&ok).arg("archive-push").arg(&seg));
    assert!(snapshot(&good) != before, "archive-push wrote nothing");

    // During recovery a failing command (the secret store down) must not
    // read as "not in the archive" (1..=125 end recovery and promote):
    // archive-get retries, then stops recovery with 128.
    let getting = config(
        dir,
        "get.toml",
        &data,
        &repos,
        &format!(
            "passphrase_command = [\"{}\"]\nkey_cache = false\n[restore]\narchive_get_retry_timeout = 0\n",
            dir.join("fails").display()
        ),
    );
    let out = run(walshipper(&getting)
        .args(["archive-get", "000000010000000000000001"])
        .arg(dir.join("got")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128), "archive-get: {err}");
    assert!(err.contains("exited with status 1"), "{err}");
    assert!(!dir.join("got").exists());

    // WALSHIPPER_PASSPHRASE wins over a command (which would fail here).
    let failing = config(
        dir,
        "env.toml",
        &data,
        &repos,
        &format!(
            "passphrase_command = [\"{}\"]\nkey_cache = false\n",
            dir.join("fails").display()
        ),
    );
    run_ok(
        walshipper(&failing)
            .env("WALSHIPPER_PASSPHRASE", SECRET)
            .arg("archive-push")
            .arg(&seg),
    );
}
