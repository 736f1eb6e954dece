//! `key rotate` on a real cluster archiving into two repositories (a posix
//! primary and a copy made by repo-init on the S3 test server, or a second
//! directory without one): new WAL and backups sealed by the new key in
//! both, old objects readable with the old key, a full + incremental chain
//! and a point-in-time restore spanning both keys, `info --key-usage` and
//! `verify` naming the keys; `key rotate` killed at every crash point
//! (`WALSHIPPER_CRASH_AT=key-rotate:N`) with archiving going on, and the next
//! run converging; an old key file deleted from one copy reported by
//! `verify` and `info`.
//!
//! One cluster for all of it: 55 to 70 s here (2 cores shared, S3 on
//! localhost). `PGB_KEY_CAMPAIGN=full` walks the crash points three times
//! with pgbench writing throughout (about 85 s). The crash walk is
//! deterministic (N = 1, 2, ...): nothing random to replay.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::*;

const MIN: Duration = Duration::from_secs(60);

fn repo_configs(shipper: &Shipper) -> Vec<walshipper::config::RepoConfig> {
    walshipper::config::Config::load(Some(&shipper.config))
        .unwrap()
        .repos
}

/// Every object a key may seal (WAL, backups, tombstones, recovery
/// records), by name, with the key id its header names, read straight from
/// the store (64 bytes each; not through walshipper's census).
fn sealed_by(rc: &walshipper::config::RepoConfig) -> BTreeMap<String, (String, u64)> {
    let storage = walshipper::storage::open(rc).unwrap();
    let mut out = BTreeMap::new();
    for prefix in ["wal/", "backups/", "expired/", "recoveries/"] {
        for m in storage.list(prefix).unwrap() {
            let mut h = [0u8; 64];
            storage
                .get(&m.key)
                .unwrap()
                .unwrap()
                .read_exact(&mut h)
                .unwrap();
            assert_eq!(&h[0..8], b"WSHPOBJ\0", "{}", m.key);
            assert_eq!(h[11], 1, "{} is not encrypted", m.key);
            out.insert(m.key.clone(), (hex::encode(&h[12..28]), m.size));
        }
    }
    out
}

/// The JSON lines of a command's standard output.
fn events(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn event(out: &std::process::Output, kind: &str) -> serde_json::Value {
    events(out)
        .into_iter()
        .find(|e| e["event"] == kind)
        .unwrap_or_else(|| {
            panic!(
                "no {kind} event; stdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// `key list --json`: per repository name, its keys (all must be listed).
fn key_list(shipper: &Shipper) -> BTreeMap<String, Vec<serde_json::Value>> {
    let out = run_ok(shipper.cmd().args(["key", "list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["ok"], true, "repository does not open: {r}");
            (
                r["name"].as_str().unwrap().to_string(),
                r["keys"].as_array().unwrap().clone(),
            )
        })
        .collect()
}

fn current_of(keys: &[serde_json::Value]) -> String {
    assert_eq!(keys[0]["current"], true, "current key first: {keys:?}");
    assert_eq!(keys.iter().filter(|k| k["current"] == true).count(), 1);
    keys[0]["key_id"].as_str().unwrap().to_string()
}

/// A configuration like the shipper's with other repositories (`repos`:
/// `[[repo]]` sections), unencrypted when `plain`.
fn config_with(shipper: &Shipper, file: &str, repos: &str, plain: bool) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&shipper.config).unwrap();
    let start = text.find("[[repo]]").unwrap();
    let end = text.find("[encryption]").unwrap();
    let mut rest = text[end..].to_string();
    if plain {
        rest = rest.replace("[encryption]\n", "[encryption]\nmode = \"none\"\n");
    }
    let p = shipper.config.with_file_name(file);
    std::fs::write(&p, format!("{}{repos}{rest}", &text[..start])).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn walshipper_with(config: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(walshipper_bin());
    c.arg("--config").arg(config);
    c.env_remove("WALSHIPPER_PASSPHRASE");
    c
}

fn posix_repo(name: &str, path: &std::path::Path) -> String {
    format!(
        "[[repo]]\nname = \"{name}\"\ntype = \"posix\"\npath = \"{}\"\nmin_free_space = \"0\"\n",
        path.display()
    )
}

/// Runs `key rotate` killed at its crash point N for N = 1, 2, ... until a
/// run completes; after each kill both repositories open, a segment is
/// archived, and the next (whole) run makes the copies agree on one key,
/// without a new key when the killed run left them disagreeing. Returns
/// the points walked and how many kills left the copies disagreeing.
fn crash_walk(shipper: &Shipper, src: &Cluster, marker: &mut i32) -> (usize, usize) {
    let mut disagreed = 0;
    let mut n = 1;
    loop {
        let out = run(shipper
            .cmd()
            .args(["key", "rotate", "--json"])
            .env("WALSHIPPER_CRASH_AT", format!("key-rotate:{n}")));
        if out.status.success() {
            return (n - 1, disagreed);
        }
        assert_eq!(out.status.signal(), Some(9), "n={n}: {out:?}");
        let after = key_list(shipper);
        *marker += 1;
        src.sql(&format!("INSERT INTO marker VALUES ({marker})"));
        src.switch_and_wait_archived(MIN);
        assert_eq!(src.sql("SELECT failed_count FROM pg_stat_archiver"), "0");
        let (cm, co) = (current_of(&after["main"]), current_of(&after["offsite"]));
        if n == 1 {
            // A key file stored nowhere current yet: harmless, and said so.
            let text = run_ok(shipper.cmd().args(["key", "list"]));
            assert!(text.contains("interrupted `key rotate`"), "{text}");
        }
        let out = run(shipper.cmd().args(["key", "rotate", "--json"]));
        assert!(out.status.success(), "n={n}: {out:?}");
        let rot = event(&out, "key");
        let again = key_list(shipper);
        let agreed = current_of(&again["main"]);
        assert_eq!(current_of(&again["offsite"]), agreed, "n={n}");
        assert_eq!(rot["key_id"], agreed.as_str(), "n={n}: {rot}");
        if cm != co {
            // Converged on the key the killed run made current in main,
            // no new key created.
            disagreed += 1;
            assert_eq!(agreed, cm, "n={n}");
            assert_eq!(again["main"].len(), after["main"].len(), "n={n}");
            assert_eq!(again["offsite"].len(), after["offsite"].len(), "n={n}");
        } else {
            assert_ne!(agreed, cm, "n={n}: a new key");
        }
        n += 1;
        assert!(n < 20, "key rotate never completed");
    }
}

const CHECKSUM: &str =
    "SELECT md5(string_agg(aid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts";

#[test]
fn rotation_across_two_repositories_crash_walk_and_a_missing_key() {
    let started = Instant::now();
    let dir = scratch("keyrot");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    shipper.use_main_and_offsite(d, "keyrot");
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
    src.pgbench(&["-i", "-s", "1", "-q"]);
    src.sql("CREATE TABLE marker (id int PRIMARY KEY)");
    let full = shipper.backup(&[]);
    let rcs = repo_configs(&shipper);
    let before = key_list(&shipper);
    let old = current_of(&before["main"]);
    assert_eq!(current_of(&before["offsite"]), old);
    let last_old_wal = src.switch_and_wait_archived(MIN);

    // Rotate: one new key, current in both copies.
    let out = run(shipper.cmd().args(["key", "rotate", "--json"]));
    assert!(out.status.success(), "{out:?}");
    let rot = event(&out, "key");
    assert_eq!(rot["operation"], "rotate", "{rot}");
    assert_eq!(rot["succeeded"], true, "{rot}");
    let new = rot["key_id"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    for r in rot["repositories"].as_array().unwrap() {
        assert_eq!(r["ok"], true, "{rot}");
        assert_eq!(r["current_key_id"], new.as_str(), "{rot}");
        assert_eq!(r["key_files"], 1, "{rot}");
    }

    // More WAL and an incremental backup, both under the new key.
    src.sql("UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid % 13 = 0");
    src.switch_and_wait_archived(MIN);
    let at_incr = src.sql(CHECKSUM);
    let incr = shipper.backup(&["--type", "incr"]);
    assert_eq!(incr["based_on"], full["backup_id"], "{incr}");
    run_ok(shipper.cmd().arg("repo-sync"));
    for i in 1..=30 {
        src.sql(&format!(
            "INSERT INTO marker VALUES ({i}); UPDATE pgbench_accounts SET abalance = abalance + {i} WHERE aid = {i}"
        ));
        if i == 15 {
            src.sql("SELECT pg_switch_wal()");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    src.switch_and_wait_archived(MIN);
    let target = src.sql(
        "SELECT (a + (b - a) / 2)::text FROM \
           (SELECT pg_xact_commit_timestamp(xmin) a FROM marker WHERE id = 20) x, \
           (SELECT pg_xact_commit_timestamp(xmin) b FROM marker WHERE id = 21) y",
    );
    // The accounts as they were at the target: without the increments of
    // markers 21 to 30.
    let at_target = src.sql(
        "SELECT (SELECT count(*) FROM marker WHERE id <= 20) || ':' || \
           (SELECT md5(string_agg(aid || ':' || (abalance - CASE WHEN aid > 20 AND aid <= 30 THEN aid ELSE 0 END), ',' ORDER BY aid)) FROM pgbench_accounts)"
    );
    assert_eq!(src.sql("SELECT failed_count FROM pg_stat_archiver"), "0");

    // Which key seals what, read from the headers in both repositories.
    let full_id = full["backup_id"].as_str().unwrap();
    let incr_id = incr["backup_id"].as_str().unwrap();
    let out = run_ok(shipper.cmd().args(["info", "--json", "--key-usage"]));
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    for (i, rc) in rcs.iter().enumerate() {
        let objects = sealed_by(rc);
        let mut wal_old = 0;
        let mut wal_new = 0;
        for (key, (k, _)) in &objects {
            let name = key.rsplit('/').next().unwrap();
            let is_segment = key.starts_with("wal/") && name.len() == 24;
            if key.starts_with(&format!("backups/{full_id}/")) {
                assert_eq!(k, &old, "{}: {key} of the full backup", rc.name);
            } else if key.starts_with(&format!("backups/{incr_id}/")) {
                assert_eq!(k, &new, "{}: {key} of the incremental backup", rc.name);
            } else if is_segment && name <= last_old_wal.as_str() {
                assert_eq!(k, &old, "{}: {key} archived before the rotation", rc.name);
                wal_old += 1;
            } else if is_segment {
                assert_eq!(k, &new, "{}: {key} archived after the rotation", rc.name);
                wal_new += 1;
            }
        }
        assert!(wal_old > 0 && wal_new >= 3, "{wal_old} {wal_new}");
        let r = &info["repositories"][i];
        assert_eq!(r["name"], rc.name.as_str(), "{r}");
        assert!(r["keys_counted_at"].is_string(), "{r}");
        let keys = r["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2, "{r}");
        assert_eq!(keys[0]["key_id"], new.as_str(), "current first: {r}");
        assert_eq!(keys[0]["current"], true);
        assert_eq!(keys[1]["key_id"], old.as_str(), "{r}");
        assert_eq!(keys[1]["current"], false);
        for k in keys {
            assert_eq!(k["present"], true, "{k}");
            assert!(k["error"].is_null(), "{k}");
            let id = k["key_id"].as_str().unwrap();
            let (n, bytes) = objects
                .values()
                .filter(|(kid, _)| kid == id)
                .fold((0u64, 0u64), |(n, b), (_, s)| (n + 1, b + s));
            assert_eq!(k["objects"], n, "{}: objects of {id}: {r}", rc.name);
            assert_eq!(k["bytes"], bytes, "{}: bytes of {id}: {r}", rc.name);
        }
        let total: u64 = keys.iter().map(|k| k["objects"].as_u64().unwrap()).sum();
        assert_eq!(total as usize, objects.len(), "{r}");
    }
    // Without --key-usage the keys are listed, not counted.
    let plain = shipper.info();
    let r = &plain["repositories"][0];
    assert!(r["keys_counted_at"].is_null() && r["keys"][0]["objects"].is_null());
    assert_eq!(r["keys"].as_array().unwrap().len(), 2, "{r}");

    // verify: clean, with both keys.
    for name in ["main", "offsite"] {
        let out = run(shipper.cmd().args(["--repo", name, "verify", "--json"]));
        let v = event(&out, "verify");
        assert!(out.status.success() && v["ok"] == true, "{v}");
        let ids: Vec<&str> = v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["key_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [new.as_str(), old.as_str()], "{v}");
        assert!(v["keys"][1]["objects"].as_u64().unwrap() > 0, "{v}");
    }

    // The full + incremental chain (main), and a point in time after the
    // rotation from the copy (offsite): exact.
    let r1 = d.join("r1");
    let out = shipper.restore(
        &r1,
        &[
            "--backup",
            incr_id,
            "--target",
            "immediate",
            "--target-action",
            "promote",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let c1 = start_restored(
        d,
        "r1",
        &[format!("restore_command = {}", shipper.restore_command())],
    );
    assert_eq!(c1.sql(CHECKSUM), at_incr, "full + incremental restore");
    c1.stop();
    let r2 = d.join("r2");
    let out = run(shipper
        .cmd()
        .args(["--repo", "offsite", "restore", "--target-dir"])
        .arg(&r2)
        .args(["--target-time", &target, "--target-action", "promote"]));
    assert!(out.status.success(), "{out:?}");
    let c2 = start_restored(d, "r2", &[]);
    assert_eq!(
        c2.sql(&format!(
            "SELECT (SELECT count(*) FROM marker) || ':' || ({CHECKSUM})"
        )),
        at_target,
        "point-in-time restore from the copy"
    );
    c2.stop();
    eprintln!("rotation, restores and verify: {:?}", started.elapsed());

    // Killed at every crash point: both repositories open, archiving goes
    // on, and the next run makes them agree on one key. PGB_KEY_CAMPAIGN=full:
    // three walks, with pgbench writing all along.
    let campaign = std::env::var("PGB_KEY_CAMPAIGN").is_ok_and(|v| v == "full");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        if campaign {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    src.pgbench(&["-n", "-c", "2", "-T", "3"]);
                }
            });
        }
        let mut marker = 100;
        for round in 0..if campaign { 3 } else { 1 } {
            let (points, disagreed) = crash_walk(&shipper, &src, &mut marker);
            eprintln!("key-rotate: walk {round}: {points} crash points, {disagreed} left the copies disagreeing");
            assert!(points >= 4 && disagreed >= 1, "{points} {disagreed}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    // Everything archived meanwhile reads back.
    for name in ["main", "offsite"] {
        let out = run(shipper.cmd().args(["--repo", name, "verify", "--json"]));
        let v = event(&out, "verify");
        assert!(out.status.success() && v["ok"] == true, "{v}");
    }

    // (shown when the test fails)
    eprintln!("{}", run_ok(shipper.cmd().args(["key", "list", "--usage"])));
    eprintln!("{}", run_ok(shipper.cmd().arg("info")));

    // Refused, changing nothing: a repository that is not there, one that
    // is not a copy (its own keys), an unencrypted one.
    let keys_before = key_list(&shipper);
    let main = posix_repo("main", &shipper.repo);
    let nowhere = d.join("nowhere");
    let cfg = config_with(
        &shipper,
        "absent.toml",
        &format!("{main}{}", posix_repo("gone", &nowhere)),
        false,
    );
    let out = run(walshipper_with(&cfg).args(["key", "rotate"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("nothing was changed"),
        "{out:?}"
    );
    assert!(!nowhere.exists());
    let own = config_with(
        &shipper,
        "own.toml",
        &posix_repo("other", &d.join("other")),
        false,
    );
    run_ok(walshipper_with(&own).args(["repo-init", "--kdf-memory-kib", "8192"]));
    let cfg = config_with(
        &shipper,
        "two.toml",
        &format!("{main}{}", posix_repo("other", &d.join("other"))),
        false,
    );
    let out = run(walshipper_with(&cfg).args(["key", "rotate"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(err.contains("are not copies of one another"), "{err}");
    let cfg = config_with(
        &shipper,
        "plain.toml",
        &posix_repo("plain", &d.join("plain")),
        true,
    );
    run_ok(walshipper_with(&cfg).args(["repo-init", "--no-encryption"]));
    let out = run(walshipper_with(&cfg).args(["key", "rotate"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(err.contains("is not encrypted"), "{err}");
    assert_eq!(
        key_list(&shipper),
        keys_before,
        "a refused rotation changed keys"
    );
    let other = run_ok(walshipper_with(&own).args(["key", "list", "--json"]));
    let other: serde_json::Value = serde_json::from_str(&other).unwrap();
    assert_eq!(
        other["repositories"][0]["keys"].as_array().unwrap().len(),
        1,
        "{other}"
    );

    // The old key's file deleted from one copy: verify names the key and
    // fails (although this host's key cache still opens it), info shows it
    // missing.
    std::fs::remove_file(shipper.repo.join(format!("keys/{old}.json"))).unwrap();
    let out = run(shipper.cmd().args(["--repo", "main", "verify", "--json"]));
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let text = run(shipper.cmd().args(["--repo", "main", "verify"]));
    eprintln!("{}", String::from_utf8_lossy(&text.stdout));
    let v = event(&out, "verify");
    assert_eq!(v["ok"], false);
    let k = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == old.as_str())
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(k["present"], false, "{v}");
    assert!(k["objects"].as_u64().unwrap() > 0, "{v}");
    let problems = v["problems"].as_array().unwrap();
    let want = format!("is sealed by key {old}, which this repository no longer holds");
    assert!(
        problems.iter().any(|p| p.as_str().unwrap().contains(&want)),
        "{v}"
    );
    let out = run_ok(shipper.cmd().args(["info", "--json", "--key-usage"]));
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let k = info["repositories"][0]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == old.as_str())
        .unwrap_or_else(|| panic!("{info}"))
        .clone();
    assert_eq!(k["present"], false, "{k}");
    assert!(k["objects"].as_u64().unwrap() > 0, "{k}");
    // The copy still holds it.
    let k = &info["repositories"][1]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == old.as_str())
        .unwrap()
        .clone();
    assert_eq!(k["present"], true, "{k}");
    src.stop();
    eprintln!("keys_rotation: {:?}", started.elapsed());
}
