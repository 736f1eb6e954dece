//! A repository written before BLAKE3 (issue 17) stays usable: objects of
//! format version 2 (the final frame carries the plaintext's SHA-256) and
//! manifests of version 3 (files with `sha256`), with the real binary on a
//! real cluster: an incremental on top of such a full backup (small files
//! compared by SHA-256 and not stored again, large ones by their block
//! maps), `verify`, a restore of the mixed chain started and compared with
//! the source, pg_verifybackup of it, archive-push of a segment already
//! there (same and other content), and `key retire`, which must keep every
//! object's version (a manifest's SHA-256 of an object stays its final
//! frame's).
//!
//! The older repository is made from what this walshipper wrote, through
//! the library: every object decoded and re-encoded as version 2 under the
//! same key and name, every manifest rewritten as version 3 with each
//! file's SHA-256 (of the object's plaintext, or of its bytes in its
//! bundle). That is what walshipper wrote before 2026-11-26.

mod common;

use std::io::Read;

use common::*;
use sha2::{Digest, Sha256};
use walshipper::codec::HashAlg;
use walshipper::config::Config;
use walshipper::layout;
use walshipper::manifest::{Manifest, MANIFEST_VERSION};
use walshipper::repo::Repository;

/// The format version of every object (not the descriptor, key files or
/// leases), by key.
fn versions(repo: &Repository) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for o in repo.storage.list("").unwrap() {
        if o.key == "repository.json" || o.key.starts_with("keys/") || o.key.starts_with("locks/") {
            continue;
        }
        let mut head = [0u8; 10];
        let mut r = repo.storage.get(&o.key).unwrap().unwrap();
        r.read_exact(&mut head).unwrap();
        out.push((o.key, u16::from_le_bytes([head[8], head[9]])));
    }
    out
}

/// `m` as walshipper wrote it before manifest version 4: every file's
/// SHA-256 instead of its BLAKE3.
fn manifest_v3(repo: &Repository, m: &Manifest) -> Vec<u8> {
    let mut v = serde_json::to_value(m).unwrap();
    v["manifest_version"] = 3.into();
    // Each object read once (a bundle holds many files).
    let mut plains = std::collections::HashMap::new();
    for (f, e) in m.files.iter().zip(v["files"].as_array_mut().unwrap()) {
        assert!(f.deltas.is_empty(), "a full backup has no deltas");
        let plain = plains
            .entry(f.object.clone())
            .or_insert_with(|| repo.read_object_vec(&f.object).unwrap());
        let bytes = match f.offset {
            Some(o) => &plain[o as usize..(o + f.size) as usize],
            None => &plain[..],
        };
        assert!(f.hash_is(&HashAlg::Blake3.digest(bytes)), "{}", f.path);
        let e = e.as_object_mut().unwrap();
        e.remove("blake3");
        e.insert("sha256".into(), hex::encode(Sha256::digest(bytes)).into());
    }
    serde_json::to_vec(&v).unwrap()
}

/// Rewrites every object of the repository in the formats of before.
fn downgrade(repo: &Repository) {
    for (key, version) in versions(repo) {
        assert_eq!(version, 3, "{key}: this walshipper writes version 3");
        let mut plain = repo.read_object_vec(&key).unwrap();
        if key.ends_with("/manifest") {
            let m = Manifest::decode(&key, &plain).unwrap();
            assert_eq!(m.manifest_version, MANIFEST_VERSION);
            plain = manifest_v3(repo, &m);
        }
        let mut stored = Vec::new();
        repo.encoder_with_hash(&key, &plain[..], HashAlg::Sha256)
            .unwrap()
            .read_to_end(&mut stored)
            .unwrap();
        repo.storage.delete(&key).unwrap();
        repo.put_encoded(&key, &stored).unwrap();
    }
    assert!(versions(repo).iter().all(|(_, v)| *v == 2));
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn repository_of_sha256_objects_stays_usable() {
    assert_not_root();
    let t0 = std::time::Instant::now();
    let step = |what: &str| {
        eprintln!(
            "hash_upgrade: {what} at {:.1} s",
            t0.elapsed().as_secs_f64()
        )
    };
    let dir = scratch("hash-upgrade");
    let d = dir.path();
    let (shipper, src) = archiving_cluster(d, "src", &[]);
    // The shared test machine's disk may be nearly full: not this test's subject.
    let text = std::fs::read_to_string(&shipper.config).unwrap();
    let text = text.replacen("[repo]\n", "[repo]\nmin_free_space = \"0\"\n", 1);
    std::fs::write(&shipper.config, text).unwrap();
    src.sql("CREATE TABLE big AS SELECT g, md5(g::text) AS v FROM generate_series(1, 30000) g");
    src.sql("CREATE TABLE small AS SELECT 1 AS x");
    src.sql("CHECKPOINT");
    let full = shipper.backup(&[]);
    step("full taken");
    let full_id = full["backup_id"].as_str().unwrap().to_string();
    src.switch_and_wait_archived(std::time::Duration::from_secs(60));

    let cfg = Config::load(Some(&shipper.config)).unwrap();
    let repo = Repository::open_repo(&cfg, cfg.primary()).unwrap();
    downgrade(&repo);
    step("downgraded");
    run_ok(shipper.cmd().arg("verify"));

    // An incremental on top of the older full backup.
    src.sql("UPDATE big SET v = 'changed' WHERE g <= 200");
    src.sql("CREATE TABLE fresh AS SELECT g FROM generate_series(1, 100) g");
    src.sql("CHECKPOINT");
    let want = src.sql("SELECT count(*), sum(hashtext(v)) FROM big");
    let incr = shipper.backup(&["--type", "incr"]);
    let incr_id = incr["backup_id"].as_str().unwrap().to_string();
    step("incr taken");
    src.switch_and_wait_archived(std::time::Duration::from_secs(60));
    src.stop();
    let m = Manifest::decode(
        &layout::manifest(&incr_id),
        &repo.read_object_vec(&layout::manifest(&incr_id)).unwrap(),
    )
    .unwrap();
    assert_eq!(m.manifest_version, MANIFEST_VERSION);
    let full_bundle = format!("backups/{full_id}/bundle/");
    // Small files compared by the full backup's SHA-256: unchanged ones still
    // point into its bundles, carrying that SHA-256 on (not stored again).
    let kept_small = m
        .files
        .iter()
        .filter(|f| f.object.starts_with(&full_bundle) && f.hash.alg == HashAlg::Sha256)
        .count();
    let stored_small = m
        .files
        .iter()
        .filter(|f| f.offset.is_some() && !f.object.starts_with(&full_bundle))
        .count();
    assert!(
        kept_small > 100 && stored_small < kept_small / 4,
        "small files kept {kept_small}, stored again {stored_small}"
    );
    // Large files: unchanged ones keep their SHA-256, changed ones get
    // deltas and a BLAKE3 of the whole file.
    assert!(m
        .files
        .iter()
        .any(|f| f.size >= 128 << 10 && f.deltas.is_empty() && f.hash.alg == HashAlg::Sha256));
    assert!(m
        .files
        .iter()
        .any(|f| !f.deltas.is_empty() && f.hash.alg == HashAlg::Blake3));

    // archive-push of a segment archived before (version 2): the local file
    // is compared by the stored object's SHA-256.
    let seg = full["wal_start"].as_str().unwrap().to_string();
    let local = d.join("again");
    shipper.fetch_wal(std::slice::from_ref(&seg), &local);
    let o = run(shipper.cmd().arg("archive-push").arg(local.join(&seg)));
    assert!(o.status.success(), "same content: {}", stderr(&o));
    let mut bytes = std::fs::read(local.join(&seg)).unwrap();
    bytes[100_000] ^= 0xff;
    let other = d.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join(&seg), &bytes).unwrap();
    let o = run(shipper.cmd().arg("archive-push").arg(other.join(&seg)));
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("SHA-256 ").count(), 2, "{}", stderr(&o));

    step("archive-push checked");
    // key retire re-seals every object and keeps its version.
    let before = versions(&repo);
    let old_key = repo.descriptor.current_key_id.clone().unwrap();
    run_ok(shipper.cmd().args(["key", "rotate"]));
    run_ok(
        shipper
            .cmd()
            .args(["key", "retire", &old_key, "--jobs", "2"]),
    );
    let after = versions(&repo);
    step("retired");
    for (key, v) in &before {
        let now = after.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
        assert_eq!(now, Some(*v), "{key}: version changed by key retire");
    }
    run_ok(shipper.cmd().arg("verify"));

    // The mixed chain restores, passes pg_verifybackup (files recorded with
    // SHA-256 by content, with BLAKE3 by size) and holds the source's data.
    let target = d.join("restored");
    let o = shipper.restore(&target, &["--backup", &incr_id]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    shipper.verify_restored(&incr, &target, &d.join("restored-wal"));
    let c = start_restored(d, "restored", &[]);
    step("restored and started");
    assert_eq!(c.sql("SELECT count(*), sum(hashtext(v)) FROM big"), want);
    assert_eq!(c.sql("SELECT count(*) FROM fresh"), "100");
    c.stop();
}
