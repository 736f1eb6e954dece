//! A hostile repository (issue 12, items 1, 4 and 8): someone who can write
//! the repository but does not hold the passphrase edits objects, key files
//! and repository.json of a real repository built by the real binary. Every
//! attack must end in a clear refusal (archive-get: status >= 126 and no
//! file; never a silently different segment), never a panic or an abort.
//! One cluster serves every case; each case puts back what it changed.
//! Runs on posix, or on S3 with PGB_TEST_BACKEND=s3.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;
use walshipper::codec::{Binding, CodecSettings, Compression, EncodingReader};
use walshipper::config::Config;
use walshipper::storage::Storage;

struct Store {
    storage: Box<dyn Storage>,
}

impl Store {
    fn get(&self, key: &str) -> Vec<u8> {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut self.storage.get(key).unwrap().expect(key), &mut v)
            .unwrap();
        v
    }

    fn put(&self, key: &str, body: &[u8]) {
        self.storage.put_replace(key, &mut &body[..]).unwrap();
    }

    fn json(&self, key: &str) -> serde_json::Value {
        serde_json::from_slice(&self.get(key)).unwrap()
    }

    fn put_json(&self, key: &str, v: &serde_json::Value) {
        self.put(key, &serde_json::to_vec_pretty(v).unwrap());
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// archive-get must refuse: status >= 126 (recovery stops, never promotes
/// short), no file at the destination, and `want` in the message.
fn assert_get_refused(s: &Shipper, name: &str, dir: &Path, want: &str) {
    let dest = dir.join(format!("got-{name}"));
    let _ = std::fs::remove_file(&dest);
    let o = run(s
        .cmd()
        .env("WALSHIPPER_ENCRYPTION_KEY_CACHE", "false")
        .env("WALSHIPPER_RESTORE_ARCHIVE_GET_RETRY_TIMEOUT", "2")
        .args(["archive-get", name])
        .arg(&dest));
    let code = o.status.code().unwrap_or(-1);
    assert!(
        code >= 126 && code != 134,
        "archive-get {name}: {}",
        text(&o)
    );
    assert!(!dest.exists(), "archive-get {name} left a file");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(want),
        "archive-get {name}: want {want:?} in {}",
        text(&o)
    );
}

/// Refused with a clear message: not 0, not "not found" (1), no panic (101)
/// or abort (134).
fn assert_refused(o: &Output, what: &str, want: &str) {
    let code = o.status.code().unwrap_or(-1);
    assert!(
        !matches!(code, 0 | 1 | 101 | 134 | -1),
        "{what}: {}",
        text(o)
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(all.contains(want), "{what}: want {want:?} in {}", text(o));
}

fn get_ok(s: &Shipper, name: &str, dir: &Path) -> PathBuf {
    let dest = dir.join(format!("got-{name}"));
    let _ = std::fs::remove_file(&dest);
    run_ok(s.cmd().args(["archive-get", name]).arg(&dest));
    dest
}

#[test]
fn hostile_repository_is_refused() {
    assert_not_root();
    let d = scratch("hostile");
    let dir = d.path();
    let (shipper, cluster) = archiving_cluster(dir, "h", &[]);
    cluster.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let a = cluster.switch_and_wait_archived(Duration::from_secs(60));
    cluster.sql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g");
    let b = cluster.switch_and_wait_archived(Duration::from_secs(60));
    assert_ne!(a, b);
    let cfg = Config::load(Some(&shipper.config)).unwrap();
    let store = Store {
        storage: walshipper::storage::open(cfg.primary()).unwrap(),
    };
    let wal_key =
        |name: &str| walshipper::layout::wal(name, &walshipper::wal::parse_name(name).unwrap());
    let (ka, kb) = (wal_key(&a), wal_key(&b));
    let good_b = store.get(&kb);
    let plain_b = std::fs::read(get_ok(&shipper, &b, dir)).unwrap();
    let descriptor = store.json("repository.json");
    let repository_id: [u8; 16] = hex::decode(descriptor["repository_id"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let restore_descriptor = || store.put_json("repository.json", &descriptor);

    // 1. A plaintext object (valid CRCs, bound to the right name) in an
    // encrypted repository: refused, not served.
    let mut forged = Vec::new();
    let settings = std::sync::Arc::new(CodecSettings {
        compression: Compression::Zstd,
        level: 3,
        adaptive: true,
        key: None,
        frame_size: 128 << 10,
        threads: 1,
    });
    let binding = Binding {
        repository_id: &repository_id,
        key: &kb,
    };
    std::io::Read::read_to_end(
        &mut EncodingReader::new(&plain_b[..], settings.clone(), binding).unwrap(),
        &mut forged,
    )
    .unwrap();
    store.put(&kb, &forged);
    assert_get_refused(&shipper, &b, dir, "not encrypted");
    assert_refused(
        &run(shipper.cmd().args(["verify"])),
        "verify of a plaintext object",
        &b,
    );
    store.put(&kb, &good_b);
    get_ok(&shipper, &b, dir);

    // 2. repository.json edited to "none": archive-push and archive-get refuse.
    let mut none = descriptor.clone();
    none["encryption"] = "none".into();
    none["current_key_id"] = serde_json::Value::Null;
    none.as_object_mut().unwrap().remove("mac");
    store.put_json("repository.json", &none);
    let seg_b = dir.join("seg-b");
    std::fs::create_dir_all(&seg_b).unwrap();
    std::fs::write(seg_b.join(&b), &plain_b).unwrap();
    assert_get_refused(&shipper, &b, dir, "requires encryption");
    assert_refused(
        &run(shipper.cmd().arg("archive-push").arg(seg_b.join(&b))),
        "archive-push into a repository edited to \"none\"",
        "requires encryption",
    );
    restore_descriptor();
    run_ok(shipper.cmd().arg("archive-push").arg(seg_b.join(&b)));

    // 3. The MAC broken (a field changed to another valid value).
    let mut edited = descriptor.clone();
    edited["created_at"] = "2020-01-01T00:00:00+00:00".into();
    store.put_json("repository.json", &edited);
    assert_get_refused(&shipper, &b, dir, "repository.json was modified");
    assert_refused(
        &run(shipper.cmd().arg("archive-push").arg(seg_b.join(&b))),
        "archive-push with a modified repository.json",
        "repository.json was modified",
    );
    restore_descriptor();

    // 4. Segment A's object copied over B's: refused by archive-get and verify.
    store.put(&kb, &store.get(&ka));
    assert_get_refused(&shipper, &b, dir, "authentication failed");
    assert_get_refused(&shipper, &b, dir, &kb);
    assert_refused(
        &run(shipper.cmd().args(["verify"])),
        "verify of a swapped segment",
        &b,
    );
    store.put(&kb, &good_b);
    assert_eq!(std::fs::read(get_ok(&shipper, &b, dir)).unwrap(), plain_b);

    // 5. One history file swapped for another.
    let hist = dir.join("hist");
    std::fs::create_dir_all(&hist).unwrap();
    for (tli, text) in [
        ("00000002", "1\t0/3000000\tno recovery target specified\n"),
        (
            "00000003",
            "1\t0/3000000\tno recovery target specified\n2\t0/5000000\tno recovery target specified\n",
        ),
    ] {
        let p = hist.join(format!("{tli}.history"));
        std::fs::write(&p, text).unwrap();
        run_ok(shipper.cmd().arg("archive-push").arg(&p));
    }
    let (h2, h3) = (wal_key("00000002.history"), wal_key("00000003.history"));
    let good_h3 = store.get(&h3);
    store.put(&h3, &store.get(&h2));
    assert_get_refused(&shipper, "00000003.history", dir, "authentication failed");
    store.put(&h3, &good_h3);
    get_ok(&shipper, "00000003.history", dir);

    // 6. A huge Argon2 cost in the current key file: a clear error, no abort.
    // (The key cache is off for these runs: the key file must be read.)
    let key_id = descriptor["current_key_id"].as_str().unwrap().to_string();
    let key_file = walshipper::layout::key_file(&key_id);
    let good_key = store.json(&key_file);
    let mut huge = good_key.clone();
    huge["slots"][0]["kdf"]["memory_kib"] = u32::MAX.into();
    huge["slots"][0]["kdf"]["iterations"] = u32::MAX.into();
    store.put_json(&key_file, &huge);
    let o = run(shipper
        .cmd()
        .env("WALSHIPPER_ENCRYPTION_KEY_CACHE", "false")
        .env("WALSHIPPER_RESTORE_ARCHIVE_GET_RETRY_TIMEOUT", "2")
        .args(["archive-get", &b])
        .arg(dir.join("huge")));
    assert_refused(
        &o,
        "archive-get with a huge Argon2 cost",
        "Argon2 memory cost",
    );
    assert!(!dir.join("huge").exists());
    store.put_json(&key_file, &good_key);

    // 7. A bogus extra key file: archiving and restoring go on.
    let bogus = walshipper::layout::key_file(&"ab".repeat(16));
    store.put(&bogus, b"{\"not\": \"a key file\"");
    cluster.sql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g");
    let c = cluster.switch_and_wait_archived(Duration::from_secs(60));
    let o = run(shipper
        .cmd()
        .env("WALSHIPPER_ENCRYPTION_KEY_CACHE", "false")
        .env("WALSHIPPER_RESTORE_ARCHIVE_GET_RETRY_TIMEOUT", "2")
        .arg("archive-push")
        .arg(seg_b.join(&b)));
    assert!(
        o.status.success(),
        "archive-push with a bogus key file: {}",
        text(&o)
    );
    let o = run(shipper
        .cmd()
        .env("WALSHIPPER_ENCRYPTION_KEY_CACHE", "false")
        .env("WALSHIPPER_RESTORE_ARCHIVE_GET_RETRY_TIMEOUT", "2")
        .args(["archive-get", &c])
        .arg(dir.join("c")));
    assert!(
        o.status.success(),
        "archive-get with a bogus key file: {}",
        text(&o)
    );
    store.storage.delete(&bogus).unwrap();

    // 8. wal_segment_size 0 (and other values no PostgreSQL uses): a clear
    // error, no panic.
    for bad in [0u64, 3 << 20, 1 << 40] {
        let mut v = descriptor.clone();
        v["wal_segment_size"] = bad.into();
        store.put_json("repository.json", &v);
        assert_get_refused(&shipper, &b, dir, "wal_segment_size");
        assert_refused(
            &run(shipper.cmd().args(["info"])),
            "info with a bad wal_segment_size",
            "wal_segment_size",
        );
    }
    // An old format version is named.
    let mut v = descriptor.clone();
    v["format_version"] = 1.into();
    store.put_json("repository.json", &v);
    assert_refused(
        &run(shipper.cmd().arg("archive-push").arg(seg_b.join(&b))),
        "archive-push into a version 1 repository",
        "format version 1 is not supported",
    );
    restore_descriptor();

    // Everything put back: the repository verifies and serves B as archived.
    assert_eq!(std::fs::read(get_ok(&shipper, &b, dir)).unwrap(), plain_b);
    run_ok(shipper.cmd().args(["verify"]));
    cluster.stop();
}
