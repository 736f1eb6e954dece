//! Storage backends: a small trait that every driver implements. Keys are
//! '/'-separated relative names; drivers never interpret object contents.
//! Retry, throttling and fan-out are meant to be wrappers around this trait,
//! not features of a driver.

use std::io::Read;
use std::path::Path;

use crate::config::RepoConfig;
use crate::error::Result;

pub mod posix;
pub mod s3;
pub mod throttle;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// When the object was stored, if the backend knows.
    pub modified: Option<std::time::SystemTime>,
}

/// A file system's size and the bytes an unprivileged user may still write
/// there (what walshipper, not root, can use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    pub total: u64,
    pub available: u64,
}

/// A repository's capacity as `info` and the check before a backup see it
/// (docs/operations.md, "Storage capacity").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// What it may hold in all; None: unknown.
    pub capacity: Option<u64>,
    /// What is left; None: unknown.
    pub free: Option<u64>,
    /// `filesystem`, `quota` or `none` (docs/contract.md).
    pub source: &'static str,
    /// The configured minimum free space, in bytes, for that capacity.
    pub min_free: u64,
}

/// The capacity of a repository: its file system (`space`), capped by a
/// configured quota; with a quota, `stored` (the bytes it holds) is taken
/// from it. `stored` is only read when a quota is configured.
pub fn capacity(
    cfg: &RepoConfig,
    space: Option<Space>,
    stored: impl FnOnce() -> Result<u64>,
) -> Result<Capacity> {
    let (capacity, free, source) = match (space, cfg.quota_bytes()) {
        (None, None) => (None, None, "none"),
        (Some(s), None) => (Some(s.total), Some(s.available), "filesystem"),
        (space, Some(q)) => {
            let left = q.saturating_sub(stored()?);
            match space {
                // The file system is the smaller bound: it decides.
                Some(s) if s.total < q => {
                    (Some(s.total), Some(s.available.min(left)), "filesystem")
                }
                Some(s) => (Some(q), Some(s.available.min(left)), "quota"),
                None => (Some(q), Some(left), "quota"),
            }
        }
    };
    Ok(Capacity {
        capacity,
        free,
        source,
        min_free: cfg.min_free().bytes(capacity),
    })
}

/// Bytes of every object under the repository, as listed (one listing of
/// everything: for the check before a backup, when a quota needs it).
pub fn stored_bytes(storage: &dyn Storage) -> Result<u64> {
    Ok(storage
        .list("")?
        .iter()
        .fold(0u64, |a, o| a.saturating_add(o.size)))
}

#[derive(Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    /// `put_new` found the key already present; nothing was written.
    AlreadyExists,
}

/// When a write must be durable: before `put_new` returns, or at the next
/// `flush` (a base backup writes thousands of files and makes them durable
/// together, before its manifest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Now,
    AtFlush,
}

/// A budget to draw on for `n` bytes (sleeping until they are available).
pub type Budget<'a> = &'a (dyn Fn(usize) + Sync);

/// The budgets of `Storage::replace_checked` for bytes sent to the store
/// (`up`) and read from it (`down`); None: unlimited.
#[derive(Clone, Copy, Default)]
pub struct Pacing<'a> {
    pub up: Option<Budget<'a>>,
    pub down: Option<Budget<'a>>,
}

impl Pacing<'_> {
    pub const NONE: Pacing<'static> = Pacing {
        up: None,
        down: None,
    };
}

/// `r`, drawing on `budget` for every byte read (in pieces of at most
/// 256 KiB, so the pace stays smooth).
pub struct PacedRead<'a> {
    pub inner: &'a mut dyn Read,
    pub budget: Option<Budget<'a>>,
}

impl Read for PacedRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(take) = self.budget else {
            return self.inner.read(buf);
        };
        let max = buf.len().min(256 << 10);
        let n = self.inner.read(&mut buf[..max])?;
        take(n);
        Ok(n)
    }
}

pub trait Storage: Send + Sync {
    /// Stores `body` under `key` atomically, only if `key` does not exist
    /// yet. A crash at any moment leaves either no object or the whole
    /// object; with `Durability::Now` the object is durable on return,
    /// and so is an object already there (`AlreadyExists`: callers take
    /// it for stored).
    fn put_new(&self, key: &str, body: &mut dyn Read, durability: Durability)
        -> Result<PutOutcome>;
    /// Makes every `Durability::AtFlush` write so far durable.
    fn flush(&self) -> Result<()>;
    /// Stores `body` under `key` atomically and durably, replacing any
    /// existing object (for small metadata files).
    fn put_replace(&self, key: &str, body: &mut dyn Read) -> Result<()>;
    /// The object's bytes, or None if it does not exist.
    fn get(&self, key: &str) -> Result<Option<Box<dyn Read + Send>>>;
    fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;
    /// Every object whose key starts with `prefix` (a folder-like prefix ending in '/').
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Names directly under `prefix` (ending in '/'), like a listing with a
    /// delimiter: objects and "folders" alike, even folders holding only
    /// the leftovers of killed writers.
    fn list_children(&self, prefix: &str) -> Result<Vec<String>>;
    fn delete(&self, key: &str) -> Result<()>;
    /// Deletes everything under `prefix` (ending in '/'), including the
    /// leftovers of writers that were killed; returns how many objects went.
    fn delete_prefix(&self, prefix: &str) -> Result<usize>;
    /// Human-readable location, for messages.
    fn describe(&self) -> String;
    /// True when reading an object costs local disk reads only (posix, no
    /// download limit): passing over the front of an object to reach a block
    /// is then cheap. On a remote store it is a download, which callers
    /// bound (delta::ChainBlocks).
    fn reads_are_local(&self) -> bool {
        false
    }

    /// Replaces `key` by `body`, but only once `check` has read the new
    /// bytes back and approved them: a large object is never replaced by
    /// bytes nobody decoded (`key retire`). posix: a hidden temporary beside
    /// the object, fsynced, checked, renamed over it, directory fsynced. s3:
    /// a private local copy under `spool`, checked, PUT with a SHA-256 the
    /// server verifies, then the stored object read back and checked (PUT
    /// again from the copy, which is still good, if that fails). `check`'s
    /// flag says whether it reads the store (true) or a local copy (false).
    /// `pacing`: what the bytes crossing to and from the store draw on (the
    /// throttle wrapper sets it; callers pass `Pacing::NONE`).
    /// An error leaves the old object, or (s3, the checks after a PUT
    /// failing every time) what the store made of the verified copy.
    fn replace_checked(
        &self,
        key: &str,
        body: &mut dyn Read,
        spool: &Path,
        check: &mut dyn FnMut(&mut dyn Read, bool) -> Result<()>,
        pacing: Pacing,
    ) -> Result<()> {
        let _ = (body, spool, check, pacing);
        Err(crate::error::Error::Invalid(format!(
            "{}: checked replacement of {key} is not supported by this storage driver",
            self.describe()
        )))
    }

    // Compare-and-swap on small metadata objects (the S3 lock lease). A
    // version is the store's opaque tag of one write (an ETag); drivers
    // without it (posix: locks are flock(2) there) say so.

    /// A small object and its version; an object over `max` bytes is an error.
    fn get_versioned(&self, key: &str, max: usize) -> Result<Option<(Vec<u8>, String)>> {
        let _ = max;
        Err(no_versions(self, key))
    }
    /// Writes `body` if `key` is absent (`expected` None) or still at version
    /// `expected`; the new version, or None when that precondition failed.
    fn put_versioned(
        &self,
        key: &str,
        body: &[u8],
        expected: Option<&str>,
    ) -> Result<Option<String>> {
        let _ = (body, expected);
        Err(no_versions(self, key))
    }
    /// Deletes `key` only if it is still at version `expected`; false otherwise.
    fn delete_versioned(&self, key: &str, expected: &str) -> Result<bool> {
        let _ = expected;
        Err(no_versions(self, key))
    }
    /// The size of what holds the objects and the room left in it, as the
    /// backend knows (posix: the file system); None: unknown (s3).
    fn space(&self) -> Result<Option<Space>> {
        Ok(None)
    }
    /// How create-if-absent writes are protected on this store, in words.
    /// `probe`: test the store now (and keep the verdict) where that applies.
    fn conditional_writes(&self, probe: bool) -> Result<String> {
        let _ = probe;
        Ok("atomic create-if-absent by the file system (link(2))".into())
    }
}

fn no_versions<S: Storage + ?Sized>(s: &S, key: &str) -> crate::error::Error {
    crate::error::Error::Invalid(format!(
        "{}: versioned writes of {key} are not supported by this storage driver",
        s.describe()
    ))
}

/// The driver a repository's configuration names, wrapped as configured.
pub fn open(cfg: &RepoConfig) -> Result<Box<dyn Storage>> {
    let driver: Box<dyn Storage> = match cfg.kind.as_str() {
        "s3" => Box::new(s3::S3Storage::new(cfg)?),
        _ => Box::new(posix::PosixStorage::new(cfg.path.clone())),
    };
    Ok(if cfg.upload_limit > 0 || cfg.download_limit > 0 {
        Box::new(throttle::Throttled::new(
            driver,
            cfg.upload_limit,
            cfg.download_limit,
        ))
    } else {
        driver
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_from_file_system_and_quota() {
        let fs = Some(Space {
            total: 1000,
            available: 300,
        });
        let mut rc = RepoConfig::default();
        // The file system alone; the default minimum is 5 % of it. A
        // listing is never asked for without a quota.
        let c = capacity(&rc, fs, || panic!("listed without a quota")).unwrap();
        assert_eq!(
            (c.capacity, c.free, c.source, c.min_free),
            (Some(1000), Some(300), "filesystem", 50)
        );
        // A quota below the file system's size caps both.
        rc.quota = "500".into();
        let c = capacity(&rc, fs, || Ok(400)).unwrap();
        assert_eq!(
            (c.capacity, c.free, c.source),
            (Some(500), Some(100), "quota")
        );
        // Above it, the file system decides.
        rc.quota = "5000".into();
        let c = capacity(&rc, fs, || Ok(400)).unwrap();
        assert_eq!(
            (c.capacity, c.free, c.source),
            (Some(1000), Some(300), "filesystem")
        );
        // s3: the quota only; more stored than the quota is no room, not an underflow.
        rc.quota = "1KiB".into();
        rc.min_free_space = "100".into();
        let c = capacity(&rc, None, || Ok(2000)).unwrap();
        assert_eq!(
            (c.capacity, c.free, c.source, c.min_free),
            (Some(1024), Some(0), "quota", 100)
        );
        // Nothing to measure against: unknown, and a percent minimum is 0.
        rc.quota = String::new();
        rc.min_free_space = "5%".into();
        let c = capacity(&rc, None, || panic!("listed without a quota")).unwrap();
        assert_eq!(
            (c.capacity, c.free, c.source, c.min_free),
            (None, None, "none", 0)
        );
        // A listing that fails is the caller's error.
        rc.quota = "1GiB".into();
        assert!(capacity(&rc, None, || Err(crate::error::Error::Invalid("x".into()))).is_err());
    }
}
