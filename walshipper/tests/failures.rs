//! What archive-push and archive-get do with bad input and damage: real WAL
//! segments from a real cluster, the real binary, the real repository.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIN: Duration = Duration::from_secs(60);
const CANARY: &str = "PLAINTEXT-CANARY-7f3a9c";

/// A cluster archiving into a fresh encrypted repository, with a few segments
/// archived, one of which holds CANARY.
struct Fixture {
    _dir: tempfile::TempDir,
    d: PathBuf,
    shipper: Shipper,
    cluster: Cluster,
    /// An archived segment that contains CANARY in its plaintext.
    seg: String,
}

fn fixture(name: &str) -> Fixture {
    let dir = scratch(name);
    let d = dir.path().to_path_buf();
    let (shipper, cluster) = archiving_cluster(&d, "pg", &[]);
    cluster.sql(&format!(
        "CREATE TABLE secret AS SELECT '{CANARY}' || g AS v FROM generate_series(1, 2000) g"
    ));
    let seg = cluster.switch_and_wait_archived(MIN);
    Fixture {
        _dir: dir,
        d,
        shipper,
        cluster,
        seg,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn get(sh: &Shipper, name: &str, dest: &Path) -> std::process::Output {
    run(sh.cmd().args(["archive-get", name]).arg(dest))
}

fn code(o: &std::process::Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn no_plaintext_in_repository_and_damage_is_refused() {
    let f = fixture("damage");
    let local = f.cluster.data.join("pg_wal").join(&f.seg);
    let original = std::fs::read(&local).unwrap();
    assert!(
        contains(&original, CANARY.as_bytes()),
        "test premise: canary is in the WAL"
    );
    for obj in f.shipper.object_files() {
        let bytes = std::fs::read(&obj).unwrap();
        assert!(
            !contains(&bytes, CANARY.as_bytes()),
            "plaintext found in {}",
            obj.display()
        );
    }

    // A good get returns the exact bytes.
    let dest = f.d.join("restored");
    let o = get(&f.shipper, &f.seg, &dest);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read(&dest).unwrap(), original);
    std::fs::remove_file(&dest).unwrap();

    // A missing segment: exit 1 and quiet, as PostgreSQL expects.
    let o = get(&f.shipper, "0000000100000099000000FF", &dest);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).is_empty(), "not quiet: {}", stderr(&o));
    assert!(!dest.exists());

    // Flipped bytes anywhere, and truncations: refused, nothing at dest.
    let obj = f.shipper.wal_object(&f.seg);
    let stored = std::fs::read(&obj).unwrap();
    let n = stored.len();
    let mut positions = vec![
        0,
        8,
        11,
        20,
        40,
        63,
        64,
        70,
        80,
        n / 3,
        n / 2,
        n - 60,
        n - 17,
        n - 1,
    ];
    positions.extend((0..20).map(|i| 64 + i * (n - 64) / 20));
    for pos in positions {
        let mut bad = stored.clone();
        bad[pos] ^= 0x10;
        std::fs::write(&obj, &bad).unwrap();
        let o = get(&f.shipper, &f.seg, &dest);
        assert_eq!(code(&o), 126, "flip at {pos}/{n}: {}", stderr(&o));
        assert!(stderr(&o).contains("damaged"), "{}", stderr(&o));
        assert!(!dest.exists(), "flip at {pos} left a file at dest");
    }
    for len in [0, 10, 64, 100, n / 2, n - 1] {
        std::fs::write(&obj, &stored[..len]).unwrap();
        let o = get(&f.shipper, &f.seg, &dest);
        assert_eq!(code(&o), 126, "truncated to {len}: {}", stderr(&o));
        assert!(!dest.exists());
    }
    // No stray temporaries next to dest either.
    let leftovers: Vec<_> = std::fs::read_dir(&f.d)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("walshipper.tmp"))
        .collect();
    assert!(leftovers.is_empty());
    std::fs::write(&obj, &stored).unwrap();

    // A wrong passphrase fails clearly (no key cache to fall back on).
    let o = run(f
        .shipper
        .cmd()
        .env("WALSHIPPER_PASSPHRASE", "not the passphrase at all")
        .env("WALSHIPPER_ENCRYPTION_KEY_CACHE", "false")
        .args(["archive-get", &f.seg])
        .arg(&dest));
    assert_eq!(code(&o), 126);
    assert!(stderr(&o).contains("wrong passphrase"), "{}", stderr(&o));
    assert!(!dest.exists());
    // Even with a key cache present, the wrong passphrase does not open it.
    let o = run(f
        .shipper
        .cmd()
        .env("WALSHIPPER_PASSPHRASE", "not the passphrase at all")
        .args(["archive-get", &f.seg])
        .arg(&dest));
    assert_eq!(code(&o), 126, "{}", stderr(&o));

    // info shows a gap when a segment disappears.
    let before = f.shipper.info();
    assert_eq!(
        before["wal"]["timelines"][0]["gaps"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert!(before["encrypted"].as_bool().unwrap());
    let middle = f.cluster.switch_and_wait_archived(MIN);
    f.cluster.switch_and_wait_archived(MIN);
    std::fs::remove_file(f.shipper.wal_object(&middle)).unwrap();
    let after = f.shipper.info();
    let gaps = after["wal"]["timelines"][0]["gaps"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(gaps.len(), 1, "{after}");
    assert_eq!(gaps[0]["first"], middle.as_str());
}

#[test]
fn push_is_idempotent_and_refuses_conflicts_and_non_wal() {
    let f = fixture("push");
    let local = f.cluster.data.join("pg_wal").join(&f.seg);
    let obj = f.shipper.wal_object(&f.seg);
    let stored = std::fs::read(&obj).unwrap();

    // Same content again: success, object untouched.
    let o = run(f.shipper.cmd().arg("archive-push").arg(&local));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read(&obj).unwrap(), stored);

    // Same name, other content (header still valid): refused, names both checksums.
    let other = f.d.join("other").join(&f.seg);
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    let mut bytes = std::fs::read(&local).unwrap();
    bytes[100_000] ^= 0xff;
    std::fs::write(&other, &bytes).unwrap();
    let o = run(f.shipper.cmd().arg("archive-push").arg(&other));
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    let msg = stderr(&o);
    assert!(
        msg.contains("different content") && msg.matches("BLAKE3 ").count() == 2,
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&obj).unwrap(),
        stored,
        "conflicting push overwrote the object"
    );

    // Not WAL: wrong name, wrong size, wrong magic, another cluster's segment.
    let junk = f.d.join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    let cases: Vec<(PathBuf, Vec<u8>, &str)> = vec![
        (
            junk.join("postgresql.conf"),
            b"x".to_vec(),
            "not that of a WAL",
        ),
        (junk.join("000000010000000000000042"), vec![0; 1000], "size"),
        (
            junk.join("000000010000000000000042"),
            vec![0; 16 << 20],
            "magic",
        ),
        (
            junk.join("000000010000000000000043"),
            {
                let mut b = std::fs::read(&local).unwrap();
                b[24] ^= 1; // system identifier
                b
            },
            "page address",
        ),
        (
            junk.join(&f.seg),
            {
                let mut b = std::fs::read(&local).unwrap();
                b[24] ^= 1;
                b
            },
            "system identifier",
        ),
        (
            junk.join("000000010000000000000002.00000028.backup"),
            b"hello".to_vec(),
            "backup history",
        ),
    ];
    for (path, body, why) in cases {
        std::fs::write(&path, body).unwrap();
        let o = run(f.shipper.cmd().arg("archive-push").arg(&path));
        assert_eq!(code(&o), 2, "{} accepted: {}", path.display(), stderr(&o));
        assert!(stderr(&o).contains(why), "{why}: {}", stderr(&o));
    }
    let o = run(f
        .shipper
        .cmd()
        .arg("archive-push")
        .arg(junk.join("missing")));
    assert_ne!(code(&o), 0);

    // No repository: a clear message.
    let o = run(f
        .shipper
        .cmd()
        .env("WALSHIPPER_REPO_PATH", "/nonexistent/repo")
        .arg("archive-push")
        .arg(&local));
    assert_eq!(code(&o), 3);
    assert!(stderr(&o).contains("repo-init"), "{}", stderr(&o));
}

#[test]
fn killed_pushes_leave_nothing_that_looks_complete() {
    let f = fixture("kill");
    // A fresh segment not yet archived: stop archiving, make WAL, switch.
    f.cluster
        .sql("ALTER SYSTEM SET archive_command = '/bin/false'");
    f.cluster.sql("SELECT pg_reload_conf()");
    f.cluster
        .sql("CREATE TABLE filler AS SELECT g, md5(g::text) FROM generate_series(1, 100000) g");
    let seg = f.cluster.sql("SELECT pg_walfile_name(pg_switch_wal())");
    let local = f.cluster.data.join("pg_wal").join(&seg);
    let original = std::fs::read(&local).unwrap();
    let obj = f.shipper.wal_object(&seg);
    let dest = f.d.join("got");

    // Slow pushes (level 19, one thread) killed at spread-out moments.
    for i in 0..12u64 {
        let mut child = f
            .shipper
            .cmd()
            .env("WALSHIPPER_COMPRESSION_LEVEL", "19")
            .env("WALSHIPPER_COMPRESSION_THREADS", "1")
            .arg("archive-push")
            .arg(&local)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(i * 40));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if obj.exists() {
            // If anything is there, it is whole and right.
            let o = get(&f.shipper, &seg, &dest);
            assert_eq!(
                code(&o),
                0,
                "killed push left a damaged object: {}",
                stderr(&o)
            );
            assert_eq!(std::fs::read(&dest).unwrap(), original);
            std::fs::remove_file(&dest).unwrap();
            std::fs::remove_file(&obj).unwrap();
        }
        let o = get(&f.shipper, &seg, &dest);
        assert_eq!(
            code(&o),
            1,
            "temporary visible as an object: {}",
            stderr(&o)
        );
    }
    // The next push succeeds and the segment reads back exactly.
    run_ok(f.shipper.cmd().arg("archive-push").arg(&local));
    let o = get(&f.shipper, &seg, &dest);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read(&dest).unwrap(), original);
}

#[test]
fn check_confirms_archiving_end_to_end() {
    let f = fixture("check");
    let out = run_ok(f.shipper.cmd().arg("check"));
    assert!(out.contains("archived and verified"), "{out}");
    assert!(out.contains("connection: no TLS (Unix socket in"), "{out}");

    // A server that does not archive: check says what to fix.
    f.cluster
        .sql("ALTER SYSTEM SET archive_command = 'cp %p /nowhere/%f'");
    f.cluster.sql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(300));
    let o = run(f.shipper.cmd().arg("check"));
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("archive_command"), "{}", stderr(&o));
    let _ = Command::new("true").status();
}
