//! The key census: which data key seals each object of a repository, and
//! the status of every key (`keys/<id>.json`) it holds or its objects name.
//!
//! Used by `key list --usage`, `info --key-usage` (the SQL view of the keys
//! is fed by it), and by `key retire` (`sealed_by`: what is left to
//! re-encrypt). Only object headers are read (64 bytes each, checked by
//! their CRC, nothing decrypted): a census, not a proof; `verify` proves.
//!
//! Headers are read on several threads (on S3 the latency of one GET
//! dominates, so 8 to 16 in flight). Counts are kept per key as the headers
//! come in, never the headers themselves: memory grows with the number of
//! keys, not of objects (beyond the listing itself).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use pg_backup_contract::KeyStatus;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::layout;
use crate::repo::Repository;
use crate::storage::ObjectMeta;

/// Unreadable objects kept by name (the count goes on).
pub const MAX_UNREADABLE_LISTED: usize = 100;

/// Which key sealed one object, as its header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sealing {
    /// Sealed by this data key.
    Key([u8; 16]),
    /// Not encrypted (an unencrypted repository; in an encrypted one every
    /// reader refuses it).
    Plain,
    /// Removed since it was listed (expire, retire): not counted.
    Vanished,
    /// Its header could not be read or is not a header (the reason).
    Unreadable(String),
}

/// Objects and their stored bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub objects: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, size: u64) {
        self.objects += 1;
        self.bytes = self.bytes.saturating_add(size);
    }
}

/// An object whose header could not be read, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub key: String,
    pub reason: String,
}

/// What a census found in one repository.
#[derive(Clone, Debug, Default)]
pub struct Census {
    /// Objects per key that sealed them.
    pub keys: BTreeMap<[u8; 16], Tally>,
    /// Objects not encrypted.
    pub plain: Tally,
    /// How many headers could not be read (the first
    /// [`MAX_UNREADABLE_LISTED`] are in `unreadable_listed`).
    pub unreadable: u64,
    pub unreadable_listed: Vec<Unreadable>,
    /// When the objects were listed (RFC 3339, UTC).
    pub counted_at: String,
}

/// How many headers to read at once: the configured threads, but at least
/// 8 (requests wait on the store, not on a core) and at most 16.
pub fn default_jobs(cfg: &Config) -> usize {
    cfg.threads().clamp(8, 16)
}

/// Which key sealed object `key` (its header only).
pub fn sealing_of(repo: &Repository, key: &str) -> Sealing {
    match repo.object_key_id(key) {
        Ok(Some(id)) => Sealing::Key(id),
        Ok(None) => Sealing::Plain,
        Err(Error::NotFound(_)) => Sealing::Vanished,
        Err(Error::Corrupt { reason, .. }) => Sealing::Unreadable(reason),
        Err(e) => Sealing::Unreadable(e.to_string()),
    }
}

/// Reads the header of every object in `objects` on `jobs` threads and
/// calls `visit` with each (from those threads, in no particular order).
pub fn for_each_sealing<F>(repo: &Repository, objects: &[ObjectMeta], jobs: usize, visit: F)
where
    F: Fn(&ObjectMeta, Sealing) + Sync,
{
    let next = AtomicUsize::new(0);
    let threads = jobs.clamp(1, objects.len().max(1));
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| loop {
                let Some(meta) = objects.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                visit(meta, sealing_of(repo, &meta.key));
            });
        }
    });
}

/// Counts, per key, the objects a data key may have sealed (WAL, backup
/// files and manifests, tombstones, recovery records).
pub fn count(repo: &Repository, jobs: usize) -> Result<Census> {
    let counted_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let objects = repo.sealed_objects()?;
    let total: Mutex<Census> = Mutex::new(Census {
        counted_at,
        ..Default::default()
    });
    // One short lock per object (a map of a handful of keys): nothing next
    // to the GET that precedes it.
    for_each_sealing(repo, &objects, jobs, |meta, s| {
        let mut c = total.lock().unwrap_or_else(|p| p.into_inner());
        match s {
            Sealing::Key(id) => c.keys.entry(id).or_default().add(meta.size),
            Sealing::Plain => c.plain.add(meta.size),
            Sealing::Vanished => {}
            Sealing::Unreadable(reason) => {
                c.unreadable += 1;
                if c.unreadable_listed.len() < MAX_UNREADABLE_LISTED {
                    c.unreadable_listed.push(Unreadable {
                        key: meta.key.clone(),
                        reason,
                    });
                }
            }
        }
    });
    let mut c = total.into_inner().unwrap_or_else(|p| p.into_inner());
    c.unreadable_listed.sort_by(|a, b| a.key.cmp(&b.key));
    if c.unreadable > 0 {
        tracing::warn!(
            "repository {}: {} object header(s) could not be read, e.g. {}: {}",
            repo.name,
            c.unreadable,
            c.unreadable_listed.first().map_or("", |u| u.key.as_str()),
            c.unreadable_listed
                .first()
                .map_or("", |u| u.reason.as_str()),
        );
    }
    Ok(c)
}

/// The objects sealed by one key.
#[derive(Clone, Debug, Default)]
pub struct SealedBy {
    /// As listed, sorted by key.
    pub objects: Vec<ObjectMeta>,
    /// Headers that could not be read: they may be sealed by it too.
    pub unreadable: Vec<Unreadable>,
}

/// Every object whose header names `key_id` (for `key retire`). Unreadable
/// headers are all returned (the caller cannot know they are not its).
pub fn sealed_by(repo: &Repository, key_id: &[u8; 16], jobs: usize) -> Result<SealedBy> {
    let objects = repo.sealed_objects()?;
    let found: Mutex<SealedBy> = Mutex::new(SealedBy::default());
    for_each_sealing(repo, &objects, jobs, |meta, s| {
        let mut f = found.lock().unwrap_or_else(|p| p.into_inner());
        match s {
            Sealing::Key(id) if id == *key_id => f.objects.push(meta.clone()),
            Sealing::Unreadable(reason) => f.unreadable.push(Unreadable {
                key: meta.key.clone(),
                reason,
            }),
            _ => {}
        }
    });
    let mut f = found.into_inner().unwrap_or_else(|p| p.into_inner());
    f.objects.sort_by(|a, b| a.key.cmp(&b.key));
    f.unreadable.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(f)
}

/// The keys of `repo`, current first, then newest first (then those whose
/// creation is unknown, by id): every key file under `keys/` (parsed and
/// checked, not unwrapped: no Argon2 here), the current key even if its file
/// is gone, and (with a census) every key that objects name but the
/// repository no longer holds (`present` false). With a census, `objects`
/// and `bytes` are counted (0 for a key that seals nothing); without, None.
/// Empty for an unencrypted repository.
pub fn key_statuses(repo: &Repository, census: Option<&Census>) -> Result<Vec<KeyStatus>> {
    let current = repo.descriptor.current_key_id.clone();
    let Some(current) = current else {
        return Ok(Vec::new());
    };
    let mut out: HashMap<String, KeyStatus> = HashMap::new();
    for meta in repo.storage.list(layout::KEYS_PREFIX)? {
        // Other names under keys/ are not key files (verify reports them).
        let Some(layout::ObjectName::KeyFile { key_id }) = layout::parse(&meta.key) else {
            continue;
        };
        let mut s = KeyStatus {
            key_id: key_id.clone(),
            present: true,
            ..Default::default()
        };
        match repo.key_file(&key_id) {
            Ok(Some(f)) => s.created_at = Some(f.created_at),
            // Removed since the listing (`key retire` on another host).
            Ok(None) => continue,
            Err(e) => s.error = Some(e.to_string()),
        }
        out.insert(key_id, s);
    }
    let missing = |id: &str| {
        KeyStatus {
        key_id: id.to_string(),
        present: false,
        error: Some(format!(
            "{} is missing: objects sealed by this key cannot be read; restore the key file from another copy of the repository",
            layout::key_file(id)
        )),
        ..Default::default()
    }
    };
    out.entry(current.clone())
        .or_insert_with(|| missing(&current));
    if let Some(c) = census {
        for id in c.keys.keys() {
            let id = hex::encode(id);
            out.entry(id.clone()).or_insert_with(|| missing(&id));
        }
        for s in out.values_mut() {
            let t = key_bytes(&s.key_id)
                .and_then(|id| c.keys.get(&id).copied())
                .unwrap_or_default();
            s.objects = Some(t.objects);
            s.bytes = Some(t.bytes);
        }
    }
    if let Some(s) = out.get_mut(&current) {
        s.current = true;
    }
    let mut v: Vec<KeyStatus> = out.into_values().collect();
    sort_keys(&mut v);
    Ok(v)
}

/// Current first, then newest first, then unknown creation, by id.
pub fn sort_keys(v: &mut [KeyStatus]) {
    let created = |s: &KeyStatus| {
        s.created_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    v.sort_by(|a, b| {
        b.current
            .cmp(&a.current)
            .then_with(|| created(b).cmp(&created(a)))
            .then_with(|| a.key_id.cmp(&b.key_id))
    });
}

/// 16 bytes of a 32-hex-digit key id.
pub fn key_bytes(id_hex: &str) -> Option<[u8; 16]> {
    if !crate::keys::is_lower_hex(id_hex, 32) {
        return None;
    }
    hex::decode(id_hex).ok()?.try_into().ok()
}

/// A short form of a key id for tables (the first 12 hex digits).
pub fn short_id(id_hex: &str) -> &str {
    id_hex.get(..12).unwrap_or(id_hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: &str, created: Option<&str>, current: bool) -> KeyStatus {
        KeyStatus {
            key_id: id.into(),
            created_at: created.map(Into::into),
            current,
            present: true,
            ..Default::default()
        }
    }

    #[test]
    fn keys_sort_current_first_then_newest() {
        let mut v = vec![
            status("a", Some("2026-01-01T00:00:00Z"), false),
            status("b", None, false),
            status("c", Some("2026-03-01T00:00:00+02:00"), false),
            status("d", Some("2025-01-01T00:00:00Z"), true),
        ];
        sort_keys(&mut v);
        let ids: Vec<&str> = v.iter().map(|s| s.key_id.as_str()).collect();
        assert_eq!(ids, ["d", "c", "a", "b"]);
    }

    /// A posix repository with objects under two keys, one object cut
    /// short and one naming a key the repository does not hold.
    #[test]
    fn census_of_a_real_repository() {
        use crate::keys::KeyFile;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        let (_, mut repo) =
            crate::repo::test_support::posix_repo(dir.path(), 7_310_000_000_000_000_003);
        let old = repo.current_key().unwrap().id;
        let seg = |n: u32| format!("wal/0000000100000000/0000000100000000000000{n:02X}");
        for n in 1..=4 {
            repo.put_object(&seg(n), &b"old"[..]).unwrap();
        }
        let (file, new) = KeyFile::create(
            b"unit-test passphrase, long enough",
            crate::keys::MIN_KDF_MEMORY_KIB,
            1,
        )
        .unwrap();
        repo.add_key_file(&file).unwrap();
        repo.make_current(new.clone()).unwrap();
        for n in 5..=6 {
            repo.put_object(&seg(n), &b"new"[..]).unwrap();
        }
        // Cut short: not a header.
        let p = |k: &str| root.join(k);
        std::fs::write(p(&seg(1)), b"WSHPOBJ").unwrap();
        // Sealed by a key this repository does not hold (header CRC fixed).
        let gone = [0xab; 16];
        let mut obj = std::fs::read(p(&seg(2))).unwrap();
        obj[12..28].copy_from_slice(&gone);
        let crc = crc32fast::hash(&obj[0..60]);
        obj[60..64].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(p(&seg(2)), &obj).unwrap();

        let c = count(&repo, 4).unwrap();
        assert_eq!(c.keys[&old].objects, 2);
        assert_eq!(c.keys[&new.id].objects, 2);
        assert_eq!(c.keys[&gone].objects, 1);
        assert_eq!(c.unreadable, 1);
        assert_eq!(c.unreadable_listed[0].key, seg(1));
        let total: u64 = c.keys.values().map(|t| t.bytes).sum();
        let listed: u64 = repo.sealed_objects().unwrap().iter().map(|m| m.size).sum();
        assert_eq!(total + 7, listed);

        let s = key_statuses(&repo, Some(&c)).unwrap();
        let ids: Vec<&str> = s.iter().map(|k| k.key_id.as_str()).collect();
        let (o, n, g) = (hex::encode(old), hex::encode(new.id), hex::encode(gone));
        // Current, newest, then the one whose creation is unknown.
        assert_eq!(ids, [n.as_str(), o.as_str(), g.as_str()]);
        assert!(s[0].current && s[0].present && s[0].objects == Some(2));
        assert!(!s[2].present && s[2].created_at.is_none() && s[2].error.is_some());
        // Without a census: key files only, nothing counted.
        let s = key_statuses(&repo, None).unwrap();
        assert_eq!(s.len(), 2);
        assert!(s.iter().all(|k| k.objects.is_none() && k.present));

        let by_old = sealed_by(&repo, &old, 2).unwrap();
        let keys: Vec<String> = by_old.objects.iter().map(|m| m.key.clone()).collect();
        assert_eq!(keys, [seg(3), seg(4)]);
        assert_eq!(by_old.unreadable.len(), 1);
    }

    #[test]
    fn key_ids_are_parsed_strictly() {
        assert!(key_bytes(&"ab".repeat(16)).is_some());
        assert!(key_bytes(&"AB".repeat(16)).is_none());
        assert!(key_bytes("ab").is_none());
        assert_eq!(short_id("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("01"), "01");
    }
}
