//! A damaged manifest and foreign keys in a real repository (issue 12,
//! items 6 and 8): one cluster, two full backups and their WAL made by the
//! real binary; then backup 1's manifest gets a flipped byte. `info` and
//! `verify` report it (verify: exit 6 with its full report), restore of
//! backup 2 works and matches, an incr builds on backup 2, expire keeps the
//! damaged one. Foreign WAL keys (segment numbers no PostgreSQL writes) do
//! not make `info`, `verify` or `expire` panic, underflow or delete them.
//! The summaries are cached before the damage (crate::summary_cache): the
//! cache must not hide it.
//! Runs on posix, and on S3 with PGB_TEST_BACKEND=s3.

mod common;

use std::io::Read;
use std::process::Output;
use std::time::Duration;

use common::*;
use walshipper::storage::{Durability, Storage};

fn storage(shipper: &Shipper) -> Box<dyn Storage> {
    let cfg = walshipper::config::Config::load(Some(&shipper.config)).unwrap();
    walshipper::storage::open(cfg.primary()).unwrap()
}

fn get(s: &dyn Storage, key: &str) -> Vec<u8> {
    let mut v = Vec::new();
    s.get(key)
        .unwrap()
        .unwrap_or_else(|| panic!("{key} is missing"))
        .read_to_end(&mut v)
        .unwrap();
    v
}

fn replace(s: &dyn Storage, key: &str, body: &[u8]) {
    s.delete(key).unwrap();
    s.put_new(key, &mut &body[..], Durability::Now).unwrap();
}

fn json_of(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    // The last report line; a failed --json run ends with an error event.
    out.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] != "error")
        .unwrap_or_else(|| {
            panic!(
                "no JSON in: {out}\nstderr: {}",
                String::from_utf8_lossy(&o.stderr)
            )
        })
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn damaged_manifest_and_foreign_keys_are_reported_and_skipped() {
    let dir = scratch("hostile-man");
    let d = dir.path();
    let (shipper, src) = archiving_cluster(d, "src", &["wal_level = replica"]);
    src.sql("CREATE TABLE marks (id int PRIMARY KEY, note text)");
    src.sql("INSERT INTO marks SELECT g, 'one ' || g FROM generate_series(1, 1000) g");
    let b1 = shipper.backup(&["--type", "full"]);
    let id1 = b1["backup_id"].as_str().unwrap().to_string();
    // Backup ids carry whole seconds.
    std::thread::sleep(Duration::from_millis(1100));
    src.sql("INSERT INTO marks SELECT g, 'two ' || g FROM generate_series(1001, 2000) g");
    let b2 = shipper.backup(&["--type", "full"]);
    let id2 = b2["backup_id"].as_str().unwrap().to_string();
    assert_ne!(id1, id2);
    let want = src.sql("SELECT count(*) || md5(string_agg(note, ',' ORDER BY id)) FROM marks");
    src.switch_and_wait_archived(Duration::from_secs(60));

    // Both summaries are in this host's cache now (`info` made them; the
    // second run takes them from it)...
    let info = shipper.info();
    assert_eq!(info["backups"].as_array().unwrap().len(), 2, "{info}");
    let _ = shipper.info();
    let cached: Vec<_> = std::fs::read_dir(d.join("cache/summaries"))
        .unwrap()
        .flat_map(|r| std::fs::read_dir(r.unwrap().path()).unwrap())
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(cached.len(), 2, "{cached:?}");
    // ...and must not hide damage: one flipped byte in the middle of
    // backup 1's manifest.
    let s = storage(&shipper);
    let key1 = format!("backups/{id1}/manifest");
    let mut body = get(s.as_ref(), &key1);
    let mid = body.len() / 2;
    body[mid] ^= 0x20;
    replace(s.as_ref(), &key1, &body);

    // info: exit 0, backup 2 listed, backup 1 reported as damaged.
    let info = shipper.info();
    let ids: Vec<&str> = info["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id2.as_str()], "{info}");
    assert_eq!(info["damaged_backups"][0]["id"], id1.as_str(), "{info}");
    assert_eq!(info["damaged_backups"][0]["key"], key1.as_str(), "{info}");
    let o = run(shipper.cmd().arg("info"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("DAMAGED"),
        "{}",
        text(&o)
    );

    // verify: the full report (backup 2 and the WAL checked), exit 6.
    let o = run(shipper.cmd().args(["verify", "--json"]));
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    let v = json_of(&o);
    assert_eq!(v["ok"], false);
    assert_eq!(v["backups"], serde_json::json!([id2]), "{v}");
    assert_eq!(v["damaged_backups"][0]["id"], id1.as_str(), "{v}");
    assert!(v["objects_checked"].as_u64().unwrap() > 10, "{v}");
    assert!(v["wal_segments_checked"].as_u64().unwrap() > 0, "{v}");
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "only the damaged manifest: {v}");
    assert!(problems[0].as_str().unwrap().contains(&id1), "{v}");
    // verify of that one backup: a report and exit 6 too, not 126.
    let o = run(shipper.cmd().args(["verify", "--backup", &id1]));
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("DAMAGED"),
        "{}",
        text(&o)
    );
    // restore of the damaged one is refused as damage.
    let o = shipper.restore(&d.join("r1"), &["--backup", &id1]);
    assert_eq!(o.status.code(), Some(126), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("damaged"),
        "{}",
        text(&o)
    );

    // restore of backup 2 works and holds what was committed.
    let o = shipper.restore(&d.join("r2"), &["--backup", &id2]);
    assert!(o.status.success(), "{}", text(&o));
    let restored = start_restored(d, "r2", &[]);
    assert_eq!(
        restored.sql("SELECT count(*) || md5(string_agg(note, ',' ORDER BY id)) FROM marks"),
        want
    );
    restored.stop();
    drop(restored);

    // An incr is built on backup 2, never on the damaged backup 1.
    src.sql("UPDATE marks SET note = note || '!' WHERE id % 10 = 0");
    let incr = shipper.backup(&["--type", "incr"]);
    assert_eq!(incr["type"], "incr", "{incr}");
    assert_eq!(incr["based_on"], id2.as_str(), "{incr}");
    // A diff too (the newest intact full).
    std::thread::sleep(Duration::from_millis(1100));
    let diff = shipper.backup(&["--type", "diff"]);
    assert_eq!(diff["based_on"], id2.as_str(), "{diff}");

    // Foreign WAL keys: a segment number no PostgreSQL writes (seg past
    // the segments of a log file), which used to give an underflowing gap
    // of 18446744073709551615 segments in info; and the largest name.
    let foreign = [
        "wal/0000000100000000/000000010000000000000100",
        "wal/FFFFFFFFFFFFFFFF/FFFFFFFFFFFFFFFFFFFFFFFF",
    ];
    for k in foreign {
        s.put_new(k, &mut &b"not a segment"[..], Durability::Now)
            .unwrap();
    }
    let info = shipper.info();
    let mut got: Vec<&str> = info["wal"]["foreign"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    got.sort();
    assert_eq!(got, foreign, "{info}");
    for t in info["wal"]["timelines"].as_array().unwrap() {
        for g in t["gaps"].as_array().unwrap() {
            assert!(g["segments"].as_u64().unwrap() < 1 << 20, "{info}");
        }
    }
    let o = run(shipper.cmd().args(["verify", "--json"]));
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));

    // expire: the damaged backup (and the full a damaged diff/incr could
    // need) is kept and reported; foreign keys are left alone.
    let o = run(shipper.cmd().args(["expire", "--keep-full", "1", "--json"]));
    assert!(o.status.success(), "{}", text(&o));
    let e = json_of(&o);
    assert_eq!(e["damaged"][0]["id"], id1.as_str(), "{e}");
    assert!(
        e["removed"].as_array().unwrap().is_empty(),
        "nothing expirable but the damaged one: {e}"
    );
    assert!(
        s.head(&key1).unwrap().is_some(),
        "the damaged manifest was deleted"
    );
    for k in foreign {
        assert!(s.head(k).unwrap().is_some(), "{k} was deleted");
    }
    let o = run(shipper.cmd().arg("expire").args(["--keep-full", "1"]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("DAMAGED"),
        "{}",
        text(&o)
    );

    // The newest backup (the diff) damaged too: the next incr passes over
    // it, says so, and builds on the newest intact one.
    let id_diff = diff["backup_id"].as_str().unwrap();
    let key_diff = format!("backups/{id_diff}/manifest");
    let mut body = get(s.as_ref(), &key_diff);
    let last = body.len() - 100;
    body[last] ^= 1;
    replace(s.as_ref(), &key_diff, &body);
    std::thread::sleep(Duration::from_millis(1100));
    let o = run(shipper.cmd().args(["backup", "--type", "incr", "--json"]));
    assert!(o.status.success(), "{}", text(&o));
    let incr2 = json_of(&o);
    assert_eq!(incr2["based_on"], incr["backup_id"], "{incr2}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("backup {id_diff} is damaged")),
        "{}",
        text(&o)
    );
    // expire keeps both damaged ones, and the full the damaged diff needs.
    let o = run(shipper.cmd().args(["expire", "--keep-full", "1", "--json"]));
    assert!(o.status.success(), "{}", text(&o));
    let e = json_of(&o);
    assert_eq!(e["damaged"].as_array().unwrap().len(), 2, "{e}");
    assert!(e["removed"].as_array().unwrap().is_empty(), "{e}");
    let reasons = e["kept"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id2.as_str())
        .map(|k| k["reasons"].to_string())
        .unwrap_or_default();
    assert!(reasons.contains("damaged backup"), "{e}");

    // A manifest copied under another backup's name is not that backup:
    // damaged (its id does not match its key, or, with keys bound to
    // objects, it does not open), never listed as intact.
    let id_incr2 = incr2["backup_id"].as_str().unwrap();
    let copy = get(s.as_ref(), &format!("backups/{id_incr2}/manifest"));
    let fake = "20200101-000000I";
    s.put_new(
        &format!("backups/{fake}/manifest"),
        &mut &copy[..],
        Durability::Now,
    )
    .unwrap();
    let info = shipper.info();
    let damaged: Vec<&str> = info["damaged_backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert!(damaged.contains(&fake), "{info}");
    assert!(
        info["backups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["id"] != fake),
        "{info}"
    );
    let o = shipper.restore(&d.join("r3"), &["--backup", fake]);
    assert_eq!(o.status.code(), Some(126), "{}", text(&o));
}
