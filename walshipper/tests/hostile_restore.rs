//! A hostile or damaged repository against restore (issue 12, items 2, 3,
//! 4 and 7): crafted manifests (paths with `..`, absolute paths, tablespace
//! locations elsewhere, a manifest under another backup's name), a link
//! planted in a --delta target, --delta over another cluster's tablespace,
//! and a restore-point name that used to inject a setting. Each is refused,
//! and nothing outside the target (a victim directory, the source's
//! tablespace) is created, changed, chmod'ed or deleted.
//!
//! One cluster, one full backup made by the real binary; manifests are
//! crafted through the library (decoded and re-encoded under the same key),
//! so the test does not depend on the object format.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use common::*;
use walshipper::config::Config;
use walshipper::layout;
use walshipper::repo::Repository;

/// Everything observable about a tree: paths, types, modes, sizes, mtimes,
/// contents. Links are listed, not followed.
fn snapshot(root: &Path) -> Vec<String> {
    fn walk(d: &Path, rel: &str, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(d).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let name = format!("{rel}/{}", e.file_name().to_string_lossy());
            let body = if m.is_file() {
                format!("{:?}", std::fs::read(&p).unwrap())
            } else if m.file_type().is_symlink() {
                format!("-> {:?}", std::fs::read_link(&p).unwrap())
            } else {
                String::new()
            };
            out.push(format!(
                "{name} mode {:o} size {} mtime {}.{} {body}",
                m.mode(),
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            ));
            if m.is_dir() {
                walk(&p, &name, out);
            }
        }
    }
    let m = std::fs::metadata(root).unwrap();
    let mut out = vec![format!("root mode {:o} mtime {}", m.mode(), m.mtime_nsec())];
    walk(root, "", &mut out);
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_refused(o: &Output, what: &str) {
    assert!(
        !o.status.success(),
        "{what}: restore succeeded:\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    eprintln!("{what}: refused ({}): {}", o.status, stderr(o).trim());
}

fn empty_or_missing(p: &Path) -> bool {
    std::fs::read_dir(p).map_or(true, |mut d| d.next().is_none())
}

struct Repo {
    repo: Repository,
    id: String,
    original: serde_json::Value,
}

impl Repo {
    /// Replaces backup `id`'s manifest (or stores one under `key`) with
    /// `value`, encoded as the repository encodes every object.
    fn put(&self, key: &str, value: &serde_json::Value) {
        self.repo.storage.delete(key).unwrap();
        let body = serde_json::to_vec(value).unwrap();
        self.repo.put_object(key, &body[..]).unwrap();
    }

    /// The original manifest, changed by `f`, in place of the original.
    fn craft(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let mut v = self.original.clone();
        f(&mut v);
        self.put(&layout::manifest(&self.id), &v);
    }

    fn reset(&self) {
        self.put(&layout::manifest(&self.id), &self.original);
    }
}

#[test]
fn hostile_manifests_and_targets_never_reach_outside_the_target() {
    assert_not_root();
    let dir = scratch("hostile");
    let d = dir.path();
    let (shipper, src) = archiving_cluster(d, "src", &[]);
    let ts1 = d.join("ts1");
    std::fs::create_dir_all(&ts1).unwrap();
    src.sql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts1.display()
    ));
    src.sql("CREATE TABLE t TABLESPACE ts1 AS SELECT g FROM generate_series(1, 1000) g");
    let oid = src.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'");
    let done = shipper.backup(&[]);
    let id = done["backup_id"].as_str().unwrap().to_string();
    src.stop();

    let work = d.join("work");
    let victim = work.join("victim");
    std::fs::create_dir_all(victim.join("sub")).unwrap();
    std::fs::write(victim.join("keep"), b"the victim's file").unwrap();
    std::fs::write(victim.join("sub/PG_VERSION"), b"15\n").unwrap();
    let victim_before = snapshot(&victim);
    let ts1_before = snapshot(&ts1);
    let check_untouched = |case: &str| {
        assert_eq!(snapshot(&victim), victim_before, "{case}: victim changed");
        assert_eq!(
            snapshot(&ts1),
            ts1_before,
            "{case}: source tablespace changed"
        );
    };

    // A good restore, with a restore-point name PostgreSQL must read back
    // exactly (a backslash before a quote used to end the value early).
    let good = work.join("good");
    let good_ts = work.join("good_ts");
    let remap = format!("{oid}={}", good_ts.display());
    let name = r"rp\'x y";
    let o = shipper.restore(
        &good,
        &[
            "--backup",
            &id,
            "--tablespace-map",
            &remap,
            "--target-name",
            name,
        ],
    );
    assert!(o.status.success(), "good restore: {}", stderr(&o));
    let auto = std::fs::read_to_string(good.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains(r"recovery_target_name = 'rp\\''x y'"),
        "{auto}"
    );
    let shown = run_ok(
        Command::new(pg_bin("postgres"))
            .arg("-D")
            .arg(&good)
            .args(["-C", "recovery_target_name"]),
    );
    assert_eq!(shown.trim_end_matches('\n'), name);
    check_untouched("good restore");

    // The injection: a \' and a newline used to start a second setting.
    let attack = "x\\'\nshared_preload_libraries = '/tmp/evil.so' #";
    let t = work.join("t_inject");
    let o = shipper.restore(&t, &["--backup", &id, "--target-name", attack]);
    assert_refused(&o, "target-name injection");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("control characters"), "{}", stderr(&o));
    assert!(empty_or_missing(&t));

    // --delta over a target whose pg_tblspc link points elsewhere: the
    // backup's own location is the source cluster's live tablespace.
    let o = shipper.restore(&good, &["--backup", &id, "--delta"]);
    assert_refused(&o, "--delta into another cluster's tablespace");
    assert!(stderr(&o).contains("does not link there"), "{}", stderr(&o));
    check_untouched("--delta without remap");

    // A link planted in a --delta target: base -> victim.
    std::fs::rename(good.join("base"), good.join("base.real")).unwrap();
    std::os::unix::fs::symlink(&victim, good.join("base")).unwrap();
    let o = shipper.restore(
        &good,
        &["--backup", &id, "--delta", "--tablespace-map", &remap],
    );
    assert_refused(&o, "planted base -> victim");
    check_untouched("planted base link");
    assert!(good.join("base").is_symlink());
    std::fs::remove_file(good.join("base")).unwrap();
    std::fs::rename(good.join("base.real"), good.join("base")).unwrap();

    // A link planted at a file's name is replaced, not written through;
    // pg_wal as a link to another disk (initdb -X) is kept, and nothing is
    // created or chmod'ed through it.
    std::fs::remove_file(good.join("PG_VERSION")).unwrap();
    std::os::unix::fs::symlink(victim.join("sub/PG_VERSION"), good.join("PG_VERSION")).unwrap();
    let wal_disk = work.join("wal_disk");
    std::fs::rename(good.join("pg_wal"), &wal_disk).unwrap();
    std::fs::set_permissions(&wal_disk, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::remove_dir(wal_disk.join("archive_status")).unwrap();
    std::os::unix::fs::symlink(&wal_disk, good.join("pg_wal")).unwrap();
    let wal_disk_before = snapshot(&wal_disk);
    let o = shipper.restore(
        &good,
        &["--backup", &id, "--delta", "--tablespace-map", &remap],
    );
    assert!(
        o.status.success(),
        "--delta over a planted file link: {}",
        stderr(&o)
    );
    assert!(!good.join("PG_VERSION").is_symlink());
    assert!(good.join("pg_wal").is_symlink());
    assert_eq!(
        snapshot(&wal_disk),
        wal_disk_before,
        "written through pg_wal"
    );
    check_untouched("planted file link");

    // Crafted manifests, re-encoded into the repository.
    let cfg = Config::load(Some(&shipper.config)).unwrap();
    let repo = Repository::open_repo(&cfg, cfg.primary()).unwrap();
    let original: serde_json::Value =
        serde_json::from_slice(&repo.read_object_vec(&layout::manifest(&id)).unwrap()).unwrap();
    let r = Repo {
        repo,
        id: id.clone(),
        original,
    };
    let files = r.original["files"].as_array().unwrap();
    let i = files
        .iter()
        .position(|f| f["path"] == "PG_VERSION")
        .unwrap();
    let victim_s = victim.display().to_string();
    // Bundles (small files, one object for many): PG_VERSION is in one,
    // pg_control never is.
    assert!(files[i]["offset"].is_u64(), "PG_VERSION is not bundled");
    let bundle = files[i]["object"].as_str().unwrap().to_string();
    let offset = files[i]["offset"].as_u64().unwrap();
    let j = files
        .iter()
        .position(|f| f["path"] == "global/pg_control")
        .unwrap();
    assert!(files[j].get("offset").is_none());
    let foreign_bundle = bundle.replace(&id, "20200101-000000F");
    type Craft = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Craft, bool)> = vec![
        (
            "a bundled file's offset + size overflowing",
            Box::new(move |v| v["files"][i]["offset"] = u64::MAX.into()),
            false,
        ),
        (
            "a bundled file naming a bundle of a backup outside the chain",
            Box::new(move |v| v["files"][i]["object"] = foreign_bundle.clone().into()),
            false,
        ),
        (
            "a bundle named by an entry without an offset",
            Box::new(move |v| {
                v["files"][i].as_object_mut().unwrap().remove("offset");
            }),
            false,
        ),
        (
            "an offset on a file stored whole",
            Box::new(move |v| v["files"][j]["offset"] = 0u64.into()),
            false,
        ),
        (
            "a bundled file claiming to be large",
            Box::new(move |v| v["files"][i]["size"] = (1u64 << 20).into()),
            false,
        ),
        (
            "a file path with ..",
            Box::new(move |v| v["files"][i]["path"] = "../victim/pwned".into()),
            false,
        ),
        (
            "a file path with .. under pg_tblspc",
            {
                let p = format!("pg_tblspc/{oid}/../../victim/pwned");
                Box::new(move |v| v["files"][i]["path"] = p.clone().into())
            },
            false,
        ),
        (
            "an absolute file path",
            {
                let p = format!("{victim_s}/pwned");
                Box::new(move |v| v["files"][i]["path"] = p.clone().into())
            },
            false,
        ),
        (
            "a directory path with ..",
            Box::new(|v| {
                v["dirs"]
                    .as_array_mut()
                    .unwrap()
                    .push(serde_json::json!({"path": "../victim/newdir", "mode": 511}))
            }),
            false,
        ),
        (
            "an object outside the backup",
            Box::new(move |v| v["files"][j]["object"] = "keys/../repository.json".into()),
            false,
        ),
        (
            "a tablespace at the victim, --delta",
            {
                let p = victim_s.clone();
                Box::new(move |v| v["tablespaces"][0]["location"] = p.clone().into())
            },
            true,
        ),
        (
            "a tablespace at the victim",
            {
                let p = victim_s.clone();
                Box::new(move |v| v["tablespaces"][0]["location"] = p.clone().into())
            },
            false,
        ),
        (
            "a tablespace location with ..",
            {
                let p = format!("{}/../victim/sub", work.join("x").display());
                Box::new(move |v| v["tablespaces"][0]["location"] = p.clone().into())
            },
            false,
        ),
        // Hashes: the field, its length and the algorithm must fit the
        // manifest's version; a value passed off as the other algorithm's
        // fails the comparison with the object's.
        (
            "a file's BLAKE3 of 63 hex digits",
            Box::new(move |v| v["files"][j]["blake3"] = "a".repeat(63).into()),
            false,
        ),
        (
            "a BLAKE3 in a manifest of version 3",
            Box::new(|v| v["manifest_version"] = 3.into()),
            false,
        ),
        (
            "a file with both a SHA-256 and a BLAKE3",
            Box::new(move |v| v["files"][j]["sha256"] = "ab".repeat(32).into()),
            false,
        ),
        (
            "a file with no hash",
            Box::new(move |v| {
                v["files"][j].as_object_mut().unwrap().remove("blake3");
            }),
            false,
        ),
        (
            "a file's BLAKE3 passed off as its SHA-256",
            Box::new(move |v| {
                let f = v["files"][j].as_object_mut().unwrap();
                let b = f.remove("blake3").unwrap();
                f.insert("sha256".into(), b);
            }),
            false,
        ),
        (
            "a manifest under another backup's name",
            {
                let other = if id.starts_with("20200101-000000") {
                    "20200101-000001F"
                } else {
                    "20200101-000000F"
                };
                Box::new(move |v| v["id"] = other.into())
            },
            false,
        ),
    ];
    for (n, (what, craft, delta)) in cases.into_iter().enumerate() {
        r.craft(craft);
        let target = if delta {
            good.clone()
        } else {
            work.join(format!("t{n}"))
        };
        let mut args = vec!["--backup", &id];
        if delta {
            args.push("--delta");
        }
        let o = shipper.restore(&target, &args);
        assert_refused(&o, what);
        if !delta {
            assert!(empty_or_missing(&target), "{what}: the target holds files");
        }
        check_untouched(what);
        assert!(
            !work.join("pwned").exists() && !d.join("victim").exists(),
            "{what}"
        );
        r.reset();
    }

    // Bundled bytes that are not the file's: the bundle is damaged (exit
    // 126, named), nothing is left in the target.
    for (n, (what, at)) in [
        ("a bundled file's offset past the bundle's end", 1u64 << 30),
        ("a bundled file's offset moved by one byte", offset + 1),
    ]
    .into_iter()
    .enumerate()
    {
        r.craft(move |v| v["files"][i]["offset"] = at.into());
        let t = work.join(format!("t_bundle{n}"));
        let ts = format!("{oid}={}", work.join(format!("t_bundle{n}_ts")).display());
        let o = shipper.restore(&t, &["--backup", &id, "--tablespace-map", &ts]);
        assert_refused(&o, what);
        assert_eq!(o.status.code(), Some(126), "{what}: {}", stderr(&o));
        assert!(stderr(&o).contains(&bundle), "{what}: {}", stderr(&o));
        assert!(
            !t.join("global/pg_control").exists(),
            "{what}: pg_control written"
        );
        check_untouched(what);
        r.reset();
    }

    // verify reports a bundled file whose bytes are not in its bundle,
    // naming the bundle.
    r.craft(move |v| v["files"][i]["offset"] = (1u64 << 30).into());
    let o = run(shipper.cmd().args(["verify", "--jobs", "1"]));
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &stderr(&o);
    assert!(!o.status.success(), "verify passed a forged offset: {out}");
    assert!(out.contains(&bundle) && out.contains("ends at"), "{out}");
    r.reset();

    // A manifest moved under another backup's name is not that backup:
    // whether the listing skips it or restore reads it by its own key.
    let other = if id.starts_with("20200101-000000") {
        "20200101-000001F"
    } else {
        "20200101-000000F"
    };
    r.craft(|v| v["id"] = other.into());
    for args in [vec![], vec!["--backup", other]] {
        let t = work.join("t_renamed");
        let o = shipper.restore(&t, &args);
        assert_refused(&o, "a renamed manifest");
        assert!(empty_or_missing(&t));
    }
    r.reset();

    // A tablespace inside the target directory.
    let t = work.join("t_inside");
    let inside = format!("{oid}={}", t.join("ts").display());
    let o = shipper.restore(&t, &["--backup", &id, "--tablespace-map", &inside]);
    assert_refused(&o, "a tablespace inside the target");
    assert!(empty_or_missing(&t));

    // Only what we made is in the work directory.
    let mut names: Vec<String> = std::fs::read_dir(&work)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('t'))
        .collect();
    names.sort();
    assert_eq!(names, ["good", "good_ts", "victim", "wal_disk"]);
}
