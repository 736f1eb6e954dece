//! A repository: its descriptor (`repository.json`), its keys (`keys/`), and
//! the objects written through the codec onto a storage backend. The layout
//! is specified in docs/repository-format.md.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::codec::{
    self, CodecSettings, Compression, DataKey, DecodingReader, EncodingReader, Summary,
};
use crate::config::{Config, RepoConfig};
use crate::error::{Error, Result};
use crate::keys::{KeyCache, KeyFile};
use crate::layout;
use crate::manifest::Manifest;
use crate::storage::{self, Durability, PutOutcome, Storage};
use crate::wal::ClusterIdentity;

pub const DESCRIPTOR_KEY: &str = "repository.json";
pub const REPO_FORMAT_VERSION: u32 = 1;

/// `repository.json`: plaintext, written last by repo-init.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    pub format: String,
    pub format_version: u32,
    /// Decimal string: 64-bit values do not survive every JSON reader.
    pub system_identifier: String,
    pub pg_version: u32,
    pub wal_segment_size: u64,
    /// "aes-256-gcm" or "none"
    pub encryption: String,
    pub current_key_id: Option<String>,
    pub created_at: String,
}

impl Descriptor {
    pub fn identity(&self) -> Result<ClusterIdentity> {
        Ok(ClusterIdentity {
            system_identifier: self
                .system_identifier
                .parse()
                .map_err(|_| Error::Repository("repository.json: bad system_identifier".into()))?,
            pg_major: self.pg_version,
            wal_segment_size: self.wal_segment_size,
        })
    }

    pub fn encrypted(&self) -> bool {
        self.encryption != "none"
    }
}

pub struct Repository {
    /// The configured name (repo1, offsite, ...).
    pub name: String,
    pub storage: Box<dyn Storage>,
    pub descriptor: Descriptor,
    keys: HashMap<[u8; 16], DataKey>,
    settings: Arc<CodecSettings>,
}

/// Caps on objects read whole into memory (`read_object_capped`). A
/// manifest takes some 300 bytes a file: 1 GiB is millions of files.
pub const MANIFEST_MAX: usize = 1 << 30;
/// backup_label and tablespace_map (PostgreSQL writes a few hundred bytes;
/// the map grows by a line per tablespace).
pub const LABEL_MAX: usize = 16 << 20;

/// A backup whose manifest cannot be used: reported by info and verify,
/// skipped by restore, backup and expire (which keeps it).
#[derive(Clone, Debug, Serialize)]
pub struct DamagedBackup {
    /// The manifest's key.
    pub key: String,
    /// The backup id its key names.
    pub id: String,
    pub reason: String,
}

/// What `scan_backups` found.
#[derive(Default)]
pub struct BackupScan {
    /// Intact manifests, oldest first.
    pub backups: Vec<Manifest>,
    pub damaged: Vec<DamagedBackup>,
}

enum Loaded {
    Intact(Box<Manifest>),
    Missing,
    Damaged(String),
}

/// Binds a manifest to the key it was read from, and checks what the
/// listing code relies on. The full structural check (paths, objects) is
/// `Manifest::validate` in manifest.rs; this is the minimum: a manifest
/// copied over another backup's must not pass for it.
fn check_manifest_binding(m: &Manifest, key: &str) -> std::result::Result<(), String> {
    let want = layout::backup_of(key).unwrap_or_default();
    if m.id != want {
        return Err(format!(
            "the manifest is that of backup {:?}, not of {want} (moved or copied over)",
            m.id.chars().take(40).collect::<String>()
        ));
    }
    if m.manifest_version > crate::manifest::MANIFEST_VERSION {
        return Err(format!(
            "written by a newer walshipper (manifest version {}); upgrade walshipper to use it",
            m.manifest_version
        ));
    }
    if layout::backup_id_type(&m.id) != Some(m.kind.as_str()) {
        return Err(format!(
            "type {:?} does not match the id's type letter",
            m.kind.chars().take(8).collect::<String>()
        ));
    }
    if let Some(b) = &m.based_on {
        if !layout::is_backup_id(b) || *b == m.id {
            return Err("based_on is not another backup's id".into());
        }
    }
    Ok(())
}

/// Options of repo-init.
pub struct InitOptions {
    pub encrypt: bool,
    pub kdf_memory_kib: u32,
    pub kdf_iterations: u32,
}

fn read_small(storage: &dyn Storage, key: &str) -> Result<Option<Vec<u8>>> {
    let Some(mut r) = storage.get(key)? else {
        return Ok(None);
    };
    let mut v = Vec::new();
    r.read_to_end(&mut v).map_err(|e| Error::Storage {
        op: "read",
        key: key.into(),
        source: e,
    })?;
    Ok(Some(v))
}

fn base_settings(cfg: &Config) -> CodecSettings {
    CodecSettings {
        compression: Compression::Zstd,
        level: cfg.compression.level,
        key: None,
        frame_size: codec::DEFAULT_FRAME_SIZE,
        threads: cfg.threads(),
    }
}

/// The raw bytes a decoder reads, kept for the copy.
struct Tap {
    inner: Box<dyn Read + Send>,
    seen: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Ok(mut seen) = self.seen.lock() {
            seen.extend_from_slice(&buf[..n]);
        }
        Ok(n)
    }
}

/// Yields the raw bytes of an object only as fast as a decoder has checked
/// them, and reports EOF only after the final frame and SHA-256 verified.
struct VerifyingCopy {
    dec: DecodingReader<Tap>,
    seen: Arc<std::sync::Mutex<Vec<u8>>>,
    pos: usize,
    done: bool,
    scratch: Vec<u8>,
}

impl Read for VerifyingCopy {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Ok(mut seen) = self.seen.lock() {
                if self.pos < seen.len() {
                    let n = out.len().min(seen.len() - self.pos);
                    out[..n].copy_from_slice(&seen[self.pos..self.pos + n]);
                    self.pos += n;
                    if self.pos == seen.len() {
                        seen.clear();
                        self.pos = 0;
                    }
                    return Ok(n);
                }
            }
            if self.done {
                return Ok(0);
            }
            if self.dec.read(&mut self.scratch)? == 0 {
                if self.dec.verified_sha256.is_none() {
                    return Err(io::Error::other("object ended before its final frame"));
                }
                self.done = true;
            }
        }
    }
}

/// A Vec that refuses to grow past `max` bytes.
struct CappedVec {
    v: Vec<u8>,
    max: usize,
    over: bool,
}

impl Write for CappedVec {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.len() > self.max.saturating_sub(self.v.len()) {
            self.over = true;
            return Err(io::Error::other("object larger than its cap"));
        }
        self.v.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Repository {
    /// Creates a repository. Refuses a location that already holds anything.
    pub fn init(
        cfg: &Config,
        rc: &RepoConfig,
        id: &ClusterIdentity,
        opts: &InitOptions,
    ) -> Result<Repository> {
        let storage = storage::open(rc)?;
        if storage.head(DESCRIPTOR_KEY)?.is_some() {
            return Err(Error::Repository(format!(
                "a repository already exists at {}; use it, or choose another repo.path",
                storage.describe()
            )));
        }
        if !storage.list("")?.is_empty() {
            return Err(Error::Repository(format!(
                "{} is not empty; repo-init needs an empty or new location",
                storage.describe()
            )));
        }
        let mut keys = HashMap::new();
        let mut current_key_id = None;
        if opts.encrypt {
            let pass = cfg.passphrase()?;
            if pass.len() < 12 {
                return Err(Error::Config(
                    "the passphrase is shorter than 12 characters; use a long random one (e.g. openssl rand -base64 48)".into(),
                ));
            }
            let (file, key) = KeyFile::create(&pass, opts.kdf_memory_kib, opts.kdf_iterations)?;
            let body =
                serde_json::to_vec_pretty(&file).map_err(|e| Error::Repository(e.to_string()))?;
            storage.put_new(
                &format!("keys/{}.json", file.key_id),
                &mut &body[..],
                Durability::Now,
            )?;
            if let Some(dir) = cfg.key_cache_dir() {
                KeyCache::new(dir).put(&key, &pass);
            }
            current_key_id = Some(file.key_id.clone());
            keys.insert(key.id, key);
        }
        let descriptor = Descriptor {
            format: "walshipper".into(),
            format_version: REPO_FORMAT_VERSION,
            system_identifier: id.system_identifier.to_string(),
            pg_version: id.pg_major,
            wal_segment_size: id.wal_segment_size,
            encryption: if opts.encrypt { "aes-256-gcm" } else { "none" }.into(),
            current_key_id,
            created_at: chrono::Utc::now().to_rfc3339(),
        };
        let body =
            serde_json::to_vec_pretty(&descriptor).map_err(|e| Error::Repository(e.to_string()))?;
        // Written last: a repository without its descriptor does not exist.
        if storage.put_new(DESCRIPTOR_KEY, &mut &body[..], Durability::Now)?
            == PutOutcome::AlreadyExists
        {
            return Err(Error::Repository(
                "another repo-init ran at the same time".into(),
            ));
        }
        let mut settings = base_settings(cfg);
        settings.key = descriptor
            .current_key_id
            .as_ref()
            .and_then(|k| hex::decode(k).ok())
            .and_then(|v| <[u8; 16]>::try_from(v).ok())
            .and_then(|id| keys.get(&id).cloned());
        Ok(Repository {
            name: rc.name.clone(),
            storage,
            descriptor,
            keys,
            settings: Arc::new(settings),
        })
    }

    /// Creates the repository `rc` as a copy of `source`: same descriptor and
    /// keys, so objects are byte-identical in both and `repo-sync` copies
    /// them without re-encoding. Refuses a location that holds anything.
    pub fn init_copy(cfg: &Config, rc: &RepoConfig, source: &Repository) -> Result<Repository> {
        let storage = storage::open(rc)?;
        if !storage.list("")?.is_empty() {
            return Err(Error::Repository(format!(
                "{} is not empty; repo-init needs an empty or new location",
                storage.describe()
            )));
        }
        for meta in source.storage.list("keys/")? {
            let body = read_small(source.storage.as_ref(), &meta.key)?
                .ok_or_else(|| Error::Repository(format!("{} vanished", meta.key)))?;
            storage.put_new(&meta.key, &mut &body[..], Durability::Now)?;
        }
        let body = read_small(source.storage.as_ref(), DESCRIPTOR_KEY)?
            .ok_or_else(|| Error::Repository("repository.json vanished".into()))?;
        if storage.put_new(DESCRIPTOR_KEY, &mut &body[..], Durability::Now)?
            == PutOutcome::AlreadyExists
        {
            return Err(Error::Repository(
                "another repo-init ran at the same time".into(),
            ));
        }
        Self::open_repo(cfg, rc)
    }

    /// Whether a repository exists at `rc` (without unlocking it).
    pub fn exists(rc: &RepoConfig) -> Result<bool> {
        Ok(storage::open(rc)?.head(DESCRIPTOR_KEY)?.is_some())
    }

    /// Opens the primary repository.
    pub fn open(cfg: &Config) -> Result<Repository> {
        Self::open_repo(cfg, cfg.primary())
    }

    /// Opens every configured repository, primary first.
    pub fn open_all(cfg: &Config) -> Vec<(String, Result<Repository>)> {
        cfg.repos
            .iter()
            .map(|rc| (rc.name.clone(), Self::open_repo(cfg, rc)))
            .collect()
    }

    /// Opens one repository and, if it is encrypted, unlocks its keys.
    pub fn open_repo(cfg: &Config, rc: &RepoConfig) -> Result<Repository> {
        let storage = storage::open(rc)?;
        let body = read_small(storage.as_ref(), DESCRIPTOR_KEY)?.ok_or_else(|| {
            Error::Repository(format!(
                "no repository at {} (create one with `walshipper repo-init`, or fix the [repo] location in the configuration)",
                storage.describe()
            ))
        })?;
        let descriptor: Descriptor = serde_json::from_slice(&body)
            .map_err(|e| Error::Repository(format!("repository.json is unreadable: {e}")))?;
        if descriptor.format != "walshipper" || descriptor.format_version != REPO_FORMAT_VERSION {
            return Err(Error::Repository(format!(
                "repository format {} version {} is not supported by this walshipper (version {REPO_FORMAT_VERSION})",
                descriptor.format, descriptor.format_version
            )));
        }
        let mut repo = Repository {
            name: rc.name.clone(),
            storage,
            descriptor,
            keys: HashMap::new(),
            settings: Arc::new(base_settings(cfg)),
        };
        if repo.descriptor.encrypted() {
            repo.unlock(cfg)?;
        }
        Ok(repo)
    }

    fn unlock(&mut self, cfg: &Config) -> Result<()> {
        let pass = cfg.passphrase()?;
        let cache = cfg.key_cache_dir().map(KeyCache::new);
        for meta in self.storage.list("keys/")? {
            let Some(id) = meta
                .key
                .strip_prefix("keys/")
                .and_then(|k| k.strip_suffix(".json"))
            else {
                continue;
            };
            if let Some(key) = cache.as_ref().and_then(|c| c.get(id, &pass)) {
                self.keys.insert(key.id, key);
                continue;
            }
            let body = read_small(self.storage.as_ref(), &meta.key)?
                .ok_or_else(|| Error::Repository(format!("{} vanished", meta.key)))?;
            let file: KeyFile = serde_json::from_slice(&body)
                .map_err(|e| Error::Repository(format!("{} is unreadable: {e}", meta.key)))?;
            let key = file.unlock(&pass)?;
            if let Some(c) = &cache {
                c.put(&key, &pass);
            }
            self.keys.insert(key.id, key);
        }
        let current = self.descriptor.current_key_id.as_ref().ok_or_else(|| {
            Error::Repository("encrypted repository without current_key_id".into())
        })?;
        let id: [u8; 16] = hex::decode(current)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| Error::Repository("repository.json: bad current_key_id".into()))?;
        let key = self
            .keys
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::Repository(format!("key {current} is missing from keys/")))?;
        let mut s = (*self.settings).clone();
        s.key = Some(key);
        self.settings = Arc::new(s);
        Ok(())
    }

    /// Encodes `plain` and stores it durably under `key` unless the key exists.
    pub fn put_object(&self, key: &str, plain: impl Read) -> Result<(PutOutcome, Summary)> {
        self.put_object_with(key, plain, Durability::Now, None)
    }

    /// As `put_object`, choosing durability and (optionally) the number of
    /// threads that encode this object.
    pub fn put_object_with(
        &self,
        key: &str,
        plain: impl Read,
        durability: Durability,
        threads: Option<usize>,
    ) -> Result<(PutOutcome, Summary)> {
        let settings = match threads {
            Some(t) if t != self.settings.threads => {
                let mut s = (*self.settings).clone();
                s.threads = t.max(1);
                Arc::new(s)
            }
            _ => self.settings.clone(),
        };
        let mut enc = EncodingReader::new(plain, settings).map_err(|e| Error::io("encode", e))?;
        let outcome = self.storage.put_new(key, &mut enc, durability)?;
        Ok((outcome, enc.summary().clone()))
    }

    /// A reader that yields `plain` encoded as an object of this repository.
    pub fn encoder<R: Read>(&self, plain: R) -> Result<EncodingReader<R>> {
        EncodingReader::new(plain, self.settings.clone()).map_err(|e| Error::io("encode", e))
    }

    /// Stores bytes that are already an encoded object, unless the key exists.
    pub fn put_encoded(&self, key: &str, encoded: &[u8]) -> Result<PutOutcome> {
        self.storage
            .put_new(key, &mut &encoded[..], Durability::Now)
    }

    /// Copies object `key` from `src` byte for byte, decoding it on the way
    /// so that a damaged source object is refused and nothing is stored.
    /// Both repositories must share keys (repo-init makes them so).
    pub fn copy_object_from(&self, src: &Repository, key: &str) -> Result<PutOutcome> {
        let raw = src
            .storage
            .get(key)?
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tap = Tap {
            inner: raw,
            seen: seen.clone(),
        };
        let mut body = VerifyingCopy {
            dec: DecodingReader::new(tap, self.keys.values().cloned().collect()),
            seen,
            pos: 0,
            done: false,
            scratch: vec![0; 256 << 10],
        };
        self.storage
            .put_new(key, &mut body, Durability::AtFlush)
            .map_err(|e| match e {
                Error::Storage { source, .. } if codec::codec_error(&source).is_some() => {
                    Error::Corrupt {
                        key: format!("{key} in repository {}", src.name),
                        reason: source.to_string(),
                    }
                }
                other => other,
            })
    }

    /// An object's stored bytes, undecoded (small objects: keys).
    pub fn read_raw(&self, key: &str) -> Result<Vec<u8>> {
        read_small(self.storage.as_ref(), key)?.ok_or_else(|| Error::NotFound(key.to_string()))
    }

    /// Reads a whole object into memory (manifests, labels).
    pub fn read_object_vec(&self, key: &str) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.read_object(key, &mut v)?;
        Ok(v)
    }

    /// Every complete backup (one whose manifest exists) whose manifest
    /// reads back intact, oldest first. Damaged manifests are logged and
    /// left out: one of them must not make the others unusable. Commands
    /// that report damage (info, verify, expire, backup) use `scan_backups`.
    pub fn list_backups(&self) -> Result<Vec<Manifest>> {
        let scan = self.scan_backups()?;
        for d in &scan.damaged {
            tracing::warn!("{}: {} (skipped; see `walshipper verify`)", d.key, d.reason);
        }
        Ok(scan.backups)
    }

    /// Every backup manifest in the repository: the intact ones, oldest
    /// first, and the damaged ones (undecodable, not a manifest, or not the
    /// manifest its key names). A storage error (the store did not answer)
    /// is an error, not damage: it says nothing about the object.
    pub fn scan_backups(&self) -> Result<BackupScan> {
        let mut scan = BackupScan::default();
        for meta in self.storage.list(layout::BACKUPS_PREFIX)? {
            match layout::parse(&meta.key) {
                Some(layout::ObjectName::Backup {
                    part: layout::BackupPart::Manifest,
                    ..
                }) => {}
                Some(_) => continue,
                None => {
                    // Never used to build a path; verify reports it.
                    tracing::warn!("ignoring {}: not a key walshipper writes", meta.key);
                    continue;
                }
            }
            match self.load_manifest(&meta.key)? {
                Loaded::Intact(m) => scan.backups.push(*m),
                // Removed since the listing (expire on another host).
                Loaded::Missing => {}
                Loaded::Damaged(reason) => scan.damaged.push(DamagedBackup {
                    id: layout::backup_of(&meta.key).unwrap_or_default(),
                    key: meta.key.clone(),
                    reason,
                }),
            }
        }
        // By start time (ids carry whole seconds and a type letter).
        scan.backups.sort_by_key(|m| {
            (
                chrono::DateTime::parse_from_rfc3339(&m.start_time).ok(),
                m.id.clone(),
            )
        });
        Ok(scan)
    }

    /// Reads and checks the manifest at `key`. Damage (undecodable, too
    /// large, not JSON, not the manifest of this key) is `Damaged`; a
    /// storage failure is an error: it says nothing about the object.
    fn load_manifest(&self, key: &str) -> Result<Loaded> {
        let body = match self.read_object_capped(key, MANIFEST_MAX) {
            Ok(b) => b,
            Err(Error::NotFound(_)) => return Ok(Loaded::Missing),
            Err(Error::Corrupt { reason, .. }) => return Ok(Loaded::Damaged(reason)),
            Err(e) => return Err(e),
        };
        let m: Manifest = match serde_json::from_slice(&body) {
            Ok(m) => m,
            Err(e) => return Ok(Loaded::Damaged(format!("manifest is not valid JSON: {e}"))),
        };
        Ok(match check_manifest_binding(&m, key) {
            Ok(()) => Loaded::Intact(Box::new(m)),
            Err(reason) => Loaded::Damaged(reason),
        })
    }

    /// Threads configured for one object's codec.
    /// Threads configured for one object's codec.
    pub fn threads(&self) -> usize {
        self.settings.threads
    }

    /// The backup `id`, reading only its own manifest: other backups'
    /// damage does not matter here. A damaged manifest is `Corrupt`.
    pub fn find_backup(&self, id: &str) -> Result<Manifest> {
        let missing = || {
            Error::Invalid(format!(
                "no backup {id} in the repository (see `walshipper info`)"
            ))
        };
        if !layout::is_backup_id(id) {
            return Err(missing());
        }
        let key = layout::manifest(id);
        // Storage errors (the store did not answer) pass through as they are.
        if self.storage.head(&key)?.is_none() {
            return Err(missing());
        }
        match self.load_manifest(&key)? {
            Loaded::Intact(m) => Ok(*m),
            Loaded::Missing => Err(missing()),
            Loaded::Damaged(reason) => Err(Error::Corrupt {
                key,
                reason: format!(
                    "{reason}; backup {id} cannot be used (`walshipper info` lists the others)"
                ),
            }),
        }
    }

    /// Where a WAL segment is stored.
    pub fn wal_key(&self, tli: u32, segno: u64) -> String {
        crate::layout::wal_segment(tli, segno, self.descriptor.wal_segment_size)
    }

    /// Decodes object `key` into `out`, verifying it entirely; returns the
    /// plaintext SHA-256. `out` may have received bytes when this fails:
    /// callers write to a temporary and discard it on error.
    pub fn read_object(&self, key: &str, out: &mut dyn Write) -> Result<[u8; 32]> {
        self.read_object_with(key, out, 1)
    }

    /// As `read_object`, decoding on `threads` threads (for large objects).
    pub fn read_object_with(
        &self,
        key: &str,
        out: &mut dyn Write,
        threads: usize,
    ) -> Result<[u8; 32]> {
        let src = self
            .storage
            .get(key)?
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        let mut dec =
            DecodingReader::new(src, self.keys.values().cloned().collect()).with_threads(threads);
        io::copy(&mut dec, out).map_err(|e| self.read_error(key, e))?;
        dec.verified_sha256.ok_or_else(|| Error::Corrupt {
            key: key.into(),
            reason: "ended before its final frame".into(),
        })
    }

    /// Reads a whole object into memory, refusing (as `Corrupt`) one whose
    /// plaintext exceeds `max` bytes before more than `max` are held:
    /// sizes in the repository are untrusted (manifests, labels, maps).
    pub fn read_object_capped(&self, key: &str, max: usize) -> Result<Vec<u8>> {
        let mut w = CappedVec {
            v: Vec::new(),
            max,
            over: false,
        };
        match self.read_object(key, &mut w) {
            Ok(_) => Ok(w.v),
            Err(_) if w.over => Err(Error::Corrupt {
                key: key.into(),
                reason: format!(
                    "larger than {max} bytes, more than such an object can hold; refusing to read it into memory"
                ),
            }),
            Err(e) => Err(e),
        }
    }

    fn read_error(&self, key: &str, e: io::Error) -> Error {
        match codec::codec_error(&e) {
            Some(c) => Error::Corrupt {
                key: key.into(),
                reason: c.to_string(),
            },
            None => Error::Storage {
                op: "read",
                key: key.into(),
                source: e,
            },
        }
    }
}
