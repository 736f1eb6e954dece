//! A local cache of backup summaries (issue 17): commands that list the
//! backups (`scan_backups`: info, backup, expire, restore, repo-sync) would
//! otherwise decode, parse and validate every manifest each time, about
//! 0.8 s per 100 000 files per backup kept.
//!
//! A summary is reused only for a manifest whose stored bytes are exactly
//! the bytes it was made from: the entry holds the BLAKE3 of the stored
//! object, and a scan hashes the stored object again (a plain read, no
//! decryption, decompression or parsing) before it takes the summary.
//! Identical bytes under the same key give the same validated manifest,
//! so the cache never turns damage into "intact": any change to the object
//! is a miss and a full read. What the cache cannot see is whether the key
//! that sealed the object can still be unlocked; `Repository` checks that
//! before it takes a hit. `verify` never uses the cache.
//!
//! The cache is this host's, like the key cache: a directory private to
//! the user (0700, owned by them), one small JSON file per backup, written
//! whole under a temporary name and renamed. Each entry carries a BLAKE3 of
//! its own content (a bit flipped by the local disk is a miss, not a
//! changed dependency) and the identity of the binary that wrote it (the
//! validation rules are the binary's: a new build starts afresh). Anything
//! unexpected in it (too large, unparsable, another build's) is a miss,
//! never an error: the cache only ever saves time. `expire`, which
//! deletes, and `verify` never use it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::manifest::BackupSummary;
use crate::private_dir::{self, Found};

/// Bumped when the summary or its derivation changes; so is the binary's
/// version, which entries also carry (validation rules may change).
const FORMAT: u32 = 1;
/// An entry is a few hundred bytes (more with many tablespaces).
const MAX_ENTRY: u64 = 1 << 20;

/// What one entry file holds.
#[derive(Serialize, Deserialize)]
struct Entry {
    body: Body,
    /// BLAKE3 of `body` as serialized (hex).
    check: String,
}

#[derive(Serialize, Deserialize)]
struct Body {
    format: u32,
    producer: String,
    /// The manifest's key in the repository.
    key: String,
    /// BLAKE3 of the stored object (hex).
    stored_blake3: String,
    /// The key that sealed it (hex), if it is encrypted.
    sealed_by: Option<String>,
    summary: BackupSummary,
}

fn check_of(body: &Body) -> Option<String> {
    serde_json::to_vec(body)
        .ok()
        .map(|b| blake3::hash(&b).to_hex().to_string())
}

/// A hit: the summary and the key that sealed its manifest.
pub struct Hit {
    pub summary: BackupSummary,
    pub sealed_by: Option<[u8; 16]>,
}

/// One repository's entries, in their own directory.
pub struct SummaryCache {
    dir: PathBuf,
}

/// The running binary, as this host sees it: its version, and the inode,
/// size and modification time of its file (the version number alone
/// stays the same across builds whose validation differs). None: unknown,
/// and then the cache is not used.
fn producer() -> Option<&'static str> {
    static P: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let m = fs::metadata("/proc/self/exe").ok()?;
        Some(format!(
            "walshipper {} exe {}:{}:{}:{}.{}",
            env!("CARGO_PKG_VERSION"),
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec()
        ))
    })
    .as_deref()
}

impl SummaryCache {
    /// The cache of the repository known by `repository_id` at `location`
    /// (two copies of one repository may hold different bytes), under
    /// `base` (`Config::summary_cache_dir`).
    pub fn new(base: PathBuf, repository_id: &[u8; 16], location: &str) -> SummaryCache {
        let loc = blake3::hash(location.as_bytes());
        let name = format!(
            "{}-{}",
            hex::encode(repository_id),
            hex::encode(&loc.as_bytes()[..8])
        );
        SummaryCache {
            dir: base.join(name),
        }
    }

    fn path(&self, id: &str) -> Option<PathBuf> {
        // Backup ids are checked by the caller; a name is never a path.
        (crate::layout::is_backup_id(id)).then(|| self.dir.join(format!("{id}.json")))
    }

    /// Whether the directory is this user's alone (as the key cache asks).
    fn private(&self) -> bool {
        let ok = |p: &std::path::Path| Found::lstat(p).is_ok_and(|f| f.is_private());
        ok(&self.dir) && self.dir.parent().is_some_and(ok)
    }

    /// Whether backup `id` has an entry (not whether it still holds):
    /// without one, a listing reads the manifest once instead of hashing
    /// it first.
    pub fn has(&self, id: &str) -> bool {
        self.path(id)
            .is_some_and(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
    }

    /// The summary of backup `id` if its entry was made from a stored
    /// object whose BLAKE3 is `stored` under `key`.
    pub fn get(&self, id: &str, key: &str, stored: &[u8; 32]) -> Option<Hit> {
        let path = self.path(id)?;
        if !self.private() {
            return None;
        }
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .ok()?;
        let m = f.metadata().ok()?;
        if !m.is_file() || m.uid() != private_dir::euid() || m.len() > MAX_ENTRY {
            return None;
        }
        let e: Entry = serde_json::from_reader(std::io::BufReader::new(f)).ok()?;
        if check_of(&e.body)? != e.check {
            tracing::debug!("{}: damaged summary cache entry, ignored", path.display());
            return None;
        }
        let b = e.body;
        let sealed_by = match &b.sealed_by {
            Some(h) => Some(hex::decode(h).ok()?.try_into().ok()?),
            None => None,
        };
        let hit = b.format == FORMAT
            && Some(b.producer.as_str()) == producer()
            && b.key == key
            && b.stored_blake3 == hex::encode(stored)
            && b.summary.id == id;
        hit.then_some(Hit {
            summary: b.summary,
            sealed_by,
        })
    }

    /// Best effort: a cache that cannot be written only costs time.
    pub fn put(
        &self,
        key: &str,
        stored: &[u8; 32],
        sealed_by: Option<[u8; 16]>,
        summary: &BackupSummary,
    ) {
        if let Err(e) = self.try_put(key, stored, sealed_by, summary) {
            tracing::debug!("summary cache not written in {}: {e}", self.dir.display());
        }
    }

    fn try_put(
        &self,
        key: &str,
        stored: &[u8; 32],
        sealed_by: Option<[u8; 16]>,
        summary: &BackupSummary,
    ) -> std::io::Result<()> {
        let path = self
            .path(&summary.id)
            .ok_or_else(|| std::io::Error::other("not a backup id"))?;
        if let Some(base) = self.dir.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(base)?;
        }
        match fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        if !self.private() {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "{} is not a directory private to this user (0700, owned by it): the summary cache is not used",
                    self.dir.display()
                )
            });
            return Err(std::io::Error::other("not a private directory"));
        }
        let producer = producer().ok_or_else(|| std::io::Error::other("no /proc/self/exe"))?;
        let body = Body {
            format: FORMAT,
            producer: producer.to_string(),
            key: key.to_string(),
            stored_blake3: hex::encode(stored),
            sealed_by: sealed_by.map(hex::encode),
            summary: summary.clone(),
        };
        let check = check_of(&body).ok_or_else(|| std::io::Error::other("serialize"))?;
        let body = serde_json::to_vec(&Entry { body, check }).map_err(std::io::Error::other)?;
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", summary.id, std::process::id()));
        let _ = fs::remove_file(&tmp);
        let written = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            // No fsync: a torn entry after a crash is unparsable, a miss.
            fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written
    }

    /// Drops the entries of backups not in `ids` (expired, or never
    /// intact): the cache holds one entry per backup listed.
    pub fn retain(&self, ids: &std::collections::HashSet<&str>) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        if !self.private() {
            return;
        }
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let keep = name
                .strip_suffix(".json")
                .is_some_and(|id| ids.contains(id));
            if !keep {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(id: &str) -> BackupSummary {
        serde_json::from_value(serde_json::json!({
            "id": id, "kind": "full", "based_on": null, "label": "l",
            "pg_version": 150000, "timeline": 1,
            "start_lsn": "0/2000028", "stop_lsn": "0/2000100",
            "start_time": "2026-11-27T08:00:00Z", "stop_time": "2026-11-27T08:00:05Z",
            "wal_start": "000000010000000000000002", "wal_stop": "000000010000000000000002",
            "size": 1, "stored_size": 1, "files": 3, "checksum_failure_blocks": 0,
            "tablespaces": [], "depends_on": []
        }))
        .unwrap()
    }

    #[test]
    fn a_summary_is_reused_only_for_the_same_bytes_key_and_backup() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("summaries");
        let c = SummaryCache::new(base.clone(), &[7; 16], "posix:/r");
        let (id, key) = ("20261127-080000F", "backups/20261127-080000F/manifest");
        let h = [1u8; 32];
        assert!(c.get(id, key, &h).is_none());
        assert!(!c.has(id));
        c.put(key, &h, Some([9; 16]), &summary(id));
        assert!(c.has(id) && !c.has("20261127-080001F") && !c.has("../x"));
        let hit = c.get(id, key, &h).expect("a hit");
        assert_eq!(hit.summary.files, 3);
        assert_eq!(hit.sealed_by, Some([9; 16]));
        // Other bytes, another key, another backup, another location: misses.
        assert!(c.get(id, key, &[2; 32]).is_none());
        assert!(c.get(id, "backups/x/manifest", &h).is_none());
        assert!(c.get("20261127-080001F", key, &h).is_none());
        let other = SummaryCache::new(base.clone(), &[7; 16], "posix:/copy");
        assert!(other.get(id, key, &h).is_none());
        // A name that is not a backup id is never a path.
        assert!(c.get("../x", key, &h).is_none());
        // Another build's entry (its check made right), an entry with a
        // flipped digit, or a torn one is a miss.
        let path = c.dir.join(format!("{id}.json"));
        let text = fs::read_to_string(&path).unwrap();
        let mut e: Entry = serde_json::from_str(&text).unwrap();
        e.body.producer.push('x');
        e.check = check_of(&e.body).unwrap();
        fs::write(&path, serde_json::to_vec(&e).unwrap()).unwrap();
        assert!(c.get(id, key, &h).is_none());
        let flipped = text.replacen("\"files\":3", "\"files\":2", 1);
        assert_ne!(flipped, text);
        fs::write(&path, flipped).unwrap();
        assert!(c.get(id, key, &h).is_none());
        fs::write(&path, &text[..text.len() / 2]).unwrap();
        assert!(c.get(id, key, &h).is_none());
        fs::write(&path, &text).unwrap();
        assert!(c.get(id, key, &h).is_some());
        // A directory others may write is not trusted.
        fs::set_permissions(&c.dir, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(c.get(id, key, &h).is_none());
        fs::set_permissions(&c.dir, fs::Permissions::from_mode(0o700)).unwrap();
        // Entries of backups no longer listed go.
        c.retain(&std::collections::HashSet::new());
        assert!(c.get(id, key, &h).is_none());
        assert_eq!(fs::read_dir(&c.dir).unwrap().count(), 0);
    }
}
