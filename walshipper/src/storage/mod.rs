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
}

/// The driver a repository's configuration names, wrapped as configured.
pub fn open(cfg: &RepoConfig) -> Result<Box<dyn Storage>> {
    let driver: Box<dyn Storage> = match cfg.kind.as_str() {
        "s3" => Box::new(s3::S3Storage::new(cfg)?),
        _ => Box::new(posix::PosixStorage::new(cfg.path.clone())),
    };
    Ok(if cfg.upload_limit > 0 {
        Box::new(throttle::Throttled::new(driver, cfg.upload_limit))
    } else {
        driver
    })
}
