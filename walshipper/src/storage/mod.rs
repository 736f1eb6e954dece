//! Storage backends: a small trait that every driver implements. Keys are
//! '/'-separated relative names; drivers never interpret object contents.
//! Retry, throttling and fan-out are meant to be wrappers around this trait,
//! not features of a driver.

use std::io::Read;

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

pub trait Storage: Send + Sync {
    /// Stores `body` under `key` atomically, only if `key` does not exist
    /// yet. A crash at any moment leaves either no object or the whole
    /// object; with `Durability::Now` the object is durable on return.
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
