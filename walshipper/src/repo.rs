//! A repository: its descriptor (`repository.json`), its keys (`keys/`), and
//! the objects written through the codec onto a storage backend. The layout
//! is specified in docs/repository-format.md.
//!
//! Everything read back is untrusted: the descriptor is validated and (when
//! encrypted) authenticated by a MAC under the current data key; whether
//! encryption is required is the local configuration's decision; every
//! object is opened bound to the repository's id and its own key.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, RwLock};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::codec::{
    self, Binding, CodecError, CodecSettings, Compression, DataKey, DecodingReader, EncodingReader,
    PlainHash, Summary,
};
use crate::config::{Config, RepoConfig};
use crate::error::{Error, Result};
use crate::keys::{is_lower_hex, EncryptionMode, KeyCache, KeyFile, MAX_KEY_FILE_LEN};
use crate::layout;
use crate::manifest::{BackupSummary, Manifest};
use crate::storage::{self, Durability, PutOutcome, Storage};
use crate::wal::ClusterIdentity;

pub const DESCRIPTOR_KEY: &str = layout::DESCRIPTOR;
/// 2: repository_id, the descriptor MAC, and objects bound to their names
/// (object format 2). Version 1 repositories are refused, not read.
pub const REPO_FORMAT_VERSION: u32 = 2;
/// repository.json is a few hundred bytes.
const MAX_DESCRIPTOR_LEN: usize = 64 << 10;
/// Raw reads of small objects (key files copied by repo-sync).
const MAX_RAW_LEN: usize = 1 << 20;
const MAC_KEY_INFO: &[u8] = b"walshipper repository.json mac v2";
const MAC_DOMAIN: &[u8] = b"walshipper repository.json v2\0";

/// `repository.json`: plaintext, written last by repo-init.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Descriptor {
    pub format: String,
    pub format_version: u32,
    /// 16 random bytes (hex) naming this repository and its copies: part of
    /// every object's associated data.
    pub repository_id: String,
    /// Decimal string: 64-bit values do not survive every JSON reader.
    pub system_identifier: String,
    pub pg_version: u32,
    pub wal_segment_size: u64,
    /// "aes-256-gcm" or "none"
    pub encryption: String,
    pub current_key_id: Option<String>,
    pub created_at: String,
    /// HMAC-SHA256 (hex) of every other field; encrypted repositories only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
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

    /// Parses and validates repository.json as read back from a store. A
    /// descriptor no walshipper writes is damage or forgery (`Corrupt`: exit
    /// 126 at once, nothing to retry); another format version is `Repository`.
    pub fn parse(body: &[u8]) -> Result<Descriptor> {
        let bad = |reason: String| Error::Corrupt {
            key: DESCRIPTOR_KEY.into(),
            reason,
        };
        if body.len() > MAX_DESCRIPTOR_LEN {
            return Err(bad(format!("{} bytes is not a descriptor", body.len())));
        }
        // The version first, so that another version is named as such
        // rather than reported as a missing or unknown field.
        #[derive(Deserialize)]
        struct Probe {
            format: Option<serde_json::Value>,
            format_version: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(body).map_err(|e| {
            bad(format!(
                "unreadable ({e}); restore it from a copy of the repository"
            ))
        })?;
        if probe.format.as_ref().and_then(|f| f.as_str()) != Some("walshipper") {
            return Err(bad(
                "not a walshipper repository (\"format\" is not \"walshipper\")".into(),
            ));
        }
        match probe.format_version.as_ref().and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(REPO_FORMAT_VERSION) => {}
            Some(v) => {
                return Err(Error::Repository(format!(
                    "format version {v} is not supported: this walshipper reads version {REPO_FORMAT_VERSION} only. {}",
                    if v < u64::from(REPO_FORMAT_VERSION) {
                        "Create a new repository with `walshipper repo-init` at another location and take a new full backup"
                    } else {
                        "Upgrade walshipper to use this repository"
                    }
                )))
            }
            None => return Err(bad("format_version is missing or not a number".into())),
        }
        let d: Descriptor = serde_json::from_slice(body).map_err(|e| bad(format!("{e}")))?;
        d.validate().map_err(bad)?;
        Ok(d)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if !is_lower_hex(&self.repository_id, 32) {
            return Err("repository_id must be 32 lowercase hex digits".into());
        }
        let sysid_ok = self
            .system_identifier
            .parse::<u64>()
            .ok()
            .map(|v| v.to_string())
            == Some(self.system_identifier.clone());
        if !sysid_ok {
            return Err(format!(
                "system_identifier {:.30} is not a 64-bit decimal number",
                self.system_identifier
            ));
        }
        if !(13..=17).contains(&self.pg_version) {
            return Err(format!(
                "pg_version {} is not a supported PostgreSQL major version (13 to 17)",
                self.pg_version
            ));
        }
        let seg = self.wal_segment_size;
        if !seg.is_power_of_two() || !((1 << 20)..=(1 << 30)).contains(&seg) {
            return Err(format!(
                "wal_segment_size {seg} is not a power of two from 1 MiB to 1 GiB"
            ));
        }
        if self.created_at.len() > 64 {
            return Err("created_at is too long".into());
        }
        match self.encryption.as_str() {
            "aes-256-gcm" => {
                if !self
                    .current_key_id
                    .as_deref()
                    .is_some_and(|k| is_lower_hex(k, 32))
                {
                    return Err("current_key_id must be 32 lowercase hex digits".into());
                }
                if !self.mac.as_deref().is_some_and(|m| is_lower_hex(m, 64)) {
                    return Err(
                        "the MAC is missing or malformed: repository.json was modified".into(),
                    );
                }
            }
            "none" => {
                if self.current_key_id.is_some() || self.mac.is_some() {
                    return Err("an unencrypted repository has no current_key_id and no mac".into());
                }
            }
            other => return Err(format!("unknown encryption {other:.20}")),
        }
        Ok(())
    }

    pub fn repository_id_bytes(&self) -> Result<[u8; 16]> {
        hex::decode(&self.repository_id)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| Error::Repository("repository.json: bad repository_id".into()))
    }

    fn current_key_bytes(&self) -> Result<Option<[u8; 16]>> {
        let Some(k) = &self.current_key_id else {
            return Ok(None);
        };
        hex::decode(k)
            .ok()
            .and_then(|v| v.try_into().ok())
            .map(Some)
            .ok_or_else(|| Error::Repository("repository.json: bad current_key_id".into()))
    }

    /// Every field but `mac`, each as length-prefixed name and value (u32 LE
    /// lengths), in a fixed order: independent of JSON formatting.
    fn mac_input(&self) -> Vec<u8> {
        let fields: [(&str, String); 9] = [
            ("format", self.format.clone()),
            ("format_version", self.format_version.to_string()),
            ("repository_id", self.repository_id.clone()),
            ("system_identifier", self.system_identifier.clone()),
            ("pg_version", self.pg_version.to_string()),
            ("wal_segment_size", self.wal_segment_size.to_string()),
            ("encryption", self.encryption.clone()),
            (
                "current_key_id",
                self.current_key_id.clone().unwrap_or_default(),
            ),
            ("created_at", self.created_at.clone()),
        ];
        let mut v = MAC_DOMAIN.to_vec();
        for (name, value) in fields {
            for part in [name.as_bytes(), value.as_bytes()] {
                v.extend_from_slice(&(part.len() as u32).to_le_bytes());
                v.extend_from_slice(part);
            }
        }
        v
    }

    /// HMAC-SHA256 under HKDF(data key, info "walshipper repository.json mac v2").
    fn mac_state(&self, key: &DataKey) -> Result<Hmac<Sha256>> {
        let mut mk = Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<Sha256>::new(None, &key.key)
            .expand(MAC_KEY_INFO, &mut mk[..])
            .map_err(|_| Error::Repository("MAC key derivation failed".into()))?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&mk[..])
            .map_err(|_| Error::Repository("MAC key derivation failed".into()))?;
        mac.update(&self.mac_input());
        Ok(mac)
    }

    fn seal(&mut self, key: &DataKey) -> Result<()> {
        self.mac = None;
        self.mac = Some(hex::encode(self.mac_state(key)?.finalize().into_bytes()));
        Ok(())
    }

    /// Checks the MAC with the current data key (constant time).
    fn check_mac(&self, key: &DataKey) -> Result<()> {
        let tag = self
            .mac
            .as_deref()
            .and_then(|m| hex::decode(m).ok())
            .unwrap_or_default();
        self.mac_state(key)?
            .verify_slice(&tag)
            .map_err(|_| Error::Corrupt {
                key: DESCRIPTOR_KEY.into(),
                reason: "MAC mismatch: repository.json was modified (someone with write access to the repository changed it, or it was damaged); do not use this repository until you know why, and restore repository.json from another copy".into(),
            })
    }
}

/// What opening an encrypted repository needs later to unlock a key that
/// an object names (keys other than the current one are unlocked on demand).
///
/// The passphrase is read lazily: a key found in the host's key cache needs
/// none, and with `passphrase_command` reading it means running the
/// command (a Vault call), which archive-push must not do per segment.
struct Unlocker {
    source: crate::passphrase::Source,
    /// Read from `source` on first need, then kept (wiped on drop).
    pass: Mutex<Option<Zeroizing<Vec<u8>>>>,
    cache: Option<KeyCache>,
    /// Key ids whose files failed: not tried again in this process.
    failed: Mutex<HashSet<String>>,
}

impl Unlocker {
    fn new(cfg: &Config, pass: Option<Zeroizing<Vec<u8>>>) -> Unlocker {
        Unlocker {
            source: cfg.passphrase_source(),
            pass: Mutex::new(pass),
            cache: cfg.key_cache_dir().map(KeyCache::new),
            failed: Mutex::new(HashSet::new()),
        }
    }

    /// The passphrase, read from its source on the first call (an error is
    /// not kept: the next call tries again).
    pub(crate) fn passphrase(&self) -> Result<Zeroizing<Vec<u8>>> {
        let mut p = self.pass.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = p.as_ref() {
            return Ok(v.clone());
        }
        let v = self.source.read()?;
        *p = Some(v.clone());
        Ok(v)
    }

    /// What cache entries are bound to: the passphrase, or for a command
    /// source its argument vector (passphrase::Source::cache_binding).
    fn binding(&self) -> Result<Zeroizing<Vec<u8>>> {
        if self.source.is_command() {
            self.source.cache_binding()
        } else {
            self.passphrase()
        }
    }

    /// The key from the host's cache, without reading the passphrase when
    /// the source is a command.
    fn cached(&self, id_hex: &str) -> Option<DataKey> {
        let c = self.cache.as_ref()?;
        let b = self.binding().ok()?;
        c.get(id_hex, &b)
    }

    /// Best effort, like the cache itself.
    fn remember(&self, key: &DataKey) {
        if let (Some(c), Ok(b)) = (&self.cache, self.binding()) {
            c.put(key, &b);
        }
    }
}

pub struct Repository {
    /// The configured name (repo1, offsite, ...).
    pub name: String,
    pub storage: Box<dyn Storage>,
    pub descriptor: Descriptor,
    repository_id: [u8; 16],
    /// The configuration's decision: refuse any object not sealed by a key.
    require_encryption: bool,
    keys: RwLock<HashMap<[u8; 16], DataKey>>,
    unlocker: Option<Unlocker>,
    settings: Arc<CodecSettings>,
    /// This host's cache of manifest summaries (`scan_backups`); None: off.
    summaries: Option<crate::summary_cache::SummaryCache>,
}

/// The stored bytes a full read decoded: their BLAKE3 and the key that
/// sealed them (none if unencrypted).
pub struct StoredRead {
    pub hash: [u8; 32],
    pub sealed_by: Option<[u8; 16]>,
}

/// What `stored_hash` found at a key.
enum Stored {
    Missing,
    TooLarge,
    /// The BLAKE3 of the stored bytes, and their header if it parses.
    Hashed([u8; 32], Option<crate::codec::Header>),
}

/// A reader that hashes what passes through it (stored bytes).
struct HashingRead<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> Read for HashingRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Caps on objects read whole into memory (`read_object_capped`). A
/// manifest takes some 300 bytes a file: 1 GiB is millions of files.
pub const MANIFEST_MAX: usize = 1 << 30;
/// backup_label and tablespace_map (PostgreSQL writes a few hundred bytes;
/// the map grows by a line per tablespace).
pub const LABEL_MAX: usize = 16 << 20;

/// A backup whose manifest cannot be used: reported by info and verify,
/// skipped by restore, backup and expire (which keeps it). Part of expire's
/// report, hence defined in the contract crate.
pub use pg_backup_contract::DamagedBackup;

/// What `scan_backups` found.
#[derive(Default)]
pub struct BackupScan {
    /// The backups whose manifests are intact, oldest first: summaries,
    /// without their file lists (`find_backup` reads a whole manifest).
    pub backups: Vec<BackupSummary>,
    pub damaged: Vec<DamagedBackup>,
}

enum Loaded<T = Manifest> {
    Intact(Box<T>),
    Missing,
    Damaged(String),
}

/// Binds a manifest to the key it was read from, and checks what the
/// listing code relies on. The full structural check (paths, objects) is
/// `Manifest::validate` in manifest.rs; this is the minimum: a manifest
/// copied over another backup's must not pass for it.
fn check_manifest_binding(m: &Manifest, key: &str) -> std::result::Result<(), String> {
    // Manifest::validate: id bound to the key, type letter, paths, object
    // keys and tablespaces (what restore relies on to stay in its target).
    m.validate(key).map_err(|e| match e {
        Error::Corrupt { reason, .. } => reason,
        other => other.to_string(),
    })
}

/// Options of repo-init.
pub struct InitOptions {
    pub encrypt: bool,
    pub kdf_memory_kib: u32,
    pub kdf_iterations: u32,
}

/// Whether a location holds no repository objects. `locks/` is ignored: the
/// S3 driver's write probe and its verdict may be there from an earlier,
/// interrupted repo-init.
fn holds_nothing(storage: &dyn Storage) -> Result<bool> {
    Ok(storage
        .list("")?
        .iter()
        .all(|m| m.key.starts_with(crate::layout::LOCKS_PREFIX)))
}

/// Reads a small object whole, refusing one larger than `max` bytes.
fn read_small(storage: &dyn Storage, key: &str, max: usize) -> Result<Option<Vec<u8>>> {
    let Some(r) = storage.get(key)? else {
        return Ok(None);
    };
    let mut v = Vec::new();
    r.take(max as u64 + 1)
        .read_to_end(&mut v)
        .map_err(|e| Error::Storage {
            op: "read",
            key: key.into(),
            source: e,
        })?;
    if v.len() > max {
        return Err(Error::Corrupt {
            key: key.into(),
            reason: format!("larger than {max} bytes, which this object never is"),
        });
    }
    Ok(Some(v))
}

/// This host's summary cache for the repository (`[cache] summaries`),
/// named by where the repository is (not by `Storage::describe`, which
/// names bandwidth limits too: changing one must not empty the cache).
fn summary_cache(
    cfg: &Config,
    repository_id: &[u8; 16],
    rc: &RepoConfig,
) -> Option<crate::summary_cache::SummaryCache> {
    let location = format!(
        "{}\n{}\n{}\n{}\n{}",
        rc.kind,
        rc.path.display(),
        rc.endpoint,
        rc.bucket,
        rc.prefix
    );
    cfg.summary_cache_dir()
        .map(|base| crate::summary_cache::SummaryCache::new(base, repository_id, &location))
}

fn base_settings(cfg: &Config) -> CodecSettings {
    CodecSettings {
        compression: Compression::Zstd,
        level: cfg.compression.level,
        adaptive: cfg.compression.adaptive,
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
/// them, and reports EOF only after the final frame and hash verified.
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
                if self.dec.verified_hash.is_none() {
                    return Err(io::Error::other("object ended before its final frame"));
                }
                self.done = true;
            }
        }
    }
}

/// An object's plaintext on its way to a parser (`read_json_capped`):
/// keeps the decoder's error (the parser would turn it into a JSON error)
/// and refuses more than `left` bytes.
struct ParseFeed<R> {
    dec: DecodingReader<R>,
    left: usize,
    over: bool,
    err: Option<io::Error>,
}

impl<R: Read> Read for ParseFeed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.over || self.err.is_some() {
            return Err(io::Error::other("object unreadable"));
        }
        // One byte past the cap is read to tell "exactly max" from "more".
        let want = buf.len().min(self.left.saturating_add(1));
        match self.dec.read(&mut buf[..want]) {
            Ok(n) if n > self.left => {
                self.over = true;
                Err(io::Error::other("object larger than its cap"))
            }
            Ok(n) => {
                self.left -= n;
                Ok(n)
            }
            Err(e) => {
                let shown = io::Error::other(e.to_string());
                self.err = Some(e);
                Err(shown)
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

/// Passes an object's bytes through, keeping a copy of its header (the
/// first `HEADER_LEN` bytes) for `read_object_sealed`.
struct HeaderTap<R> {
    inner: R,
    head: Arc<Mutex<Vec<u8>>>,
    done: bool,
}

impl<R: Read> Read for HeaderTap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if !self.done {
            let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
            let take = n.min(codec::HEADER_LEN - head.len());
            head.extend_from_slice(&buf[..take]);
            self.done = head.len() == codec::HEADER_LEN;
        }
        Ok(n)
    }
}

/// The key id of an UnknownKey error: an object sealed by a key not unlocked yet.
fn unknown_key(e: &io::Error) -> Option<String> {
    match codec::codec_error(e) {
        Some(CodecError::UnknownKey(id)) => Some(id.clone()),
        _ => None,
    }
}

/// What a read does when an object names a key it cannot open, shared by
/// every read loop: a key not unlocked yet is unlocked and the object read
/// again; a key that cannot be unlocked (its file is missing or does not
/// open) gets the object read once more, since `key retire` re-seals objects
/// under the current key and then removes the old key file, so an object
/// read just before its re-sealing names a key that is gone by now.
#[derive(Default)]
struct KeyRetry {
    unlocked: bool,
    reread: bool,
}

impl KeyRetry {
    /// True: read `key` again; false: `e` is the read's error.
    fn again(&mut self, repo: &Repository, key: &str, e: &io::Error) -> bool {
        match unknown_key(e) {
            Some(id) if !self.unlocked && repo.load_key(&id) => {
                self.unlocked = true;
                true
            }
            Some(id) if !self.reread => {
                tracing::debug!(
                    "{key} names key {id}, which cannot be unlocked; reading it once more in case `key retire` re-sealed it meanwhile"
                );
                self.reread = true;
                true
            }
            _ => false,
        }
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
        let mode = cfg.encryption.mode;
        if opts.encrypt != (mode == EncryptionMode::Aes256Gcm) {
            return Err(Error::Config(format!(
                "[encryption] mode = \"{}\" in the configuration, but repo-init was asked for {}; the configuration decides: use --no-encryption only with mode = \"none\"",
                mode.as_str(),
                if opts.encrypt { "an encrypted repository" } else { "an unencrypted one (--no-encryption)" }
            )));
        }
        let storage = storage::open(rc)?;
        if storage.head(DESCRIPTOR_KEY)?.is_some() {
            return Err(Error::Repository(format!(
                "a repository already exists at {}; use it, or choose another repo.path",
                storage.describe()
            )));
        }
        if !holds_nothing(storage.as_ref())? {
            return Err(Error::Repository(format!(
                "{} is not empty; repo-init needs an empty or new location",
                storage.describe()
            )));
        }
        let mut keys = HashMap::new();
        let mut current = None;
        let mut unlocker = None;
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
                &layout::key_file(&file.key_id),
                &mut &body[..],
                Durability::Now,
            )?;
            let u = Unlocker::new(cfg, Some(pass));
            u.remember(&key);
            current = Some(key.clone());
            keys.insert(key.id, key);
            unlocker = Some(u);
        }
        let repository_id = crate::keys::random::<16>()?;
        let mut descriptor = Descriptor {
            format: "walshipper".into(),
            format_version: REPO_FORMAT_VERSION,
            repository_id: hex::encode(repository_id),
            system_identifier: id.system_identifier.to_string(),
            pg_version: id.pg_major,
            wal_segment_size: id.wal_segment_size,
            encryption: mode.as_str().into(),
            current_key_id: current.as_ref().map(|k| hex::encode(k.id)),
            created_at: chrono::Utc::now().to_rfc3339(),
            mac: None,
        };
        if let Some(k) = &current {
            descriptor.seal(k)?;
        }
        descriptor.validate().map_err(|e| {
            Error::Repository(format!("this cluster cannot have a repository: {e}"))
        })?;
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
        settings.key = current;
        Ok(Repository {
            name: rc.name.clone(),
            summaries: summary_cache(cfg, &repository_id, rc),
            storage,
            descriptor,
            repository_id,
            require_encryption: opts.encrypt,
            keys: RwLock::new(keys),
            unlocker,
            settings: Arc::new(settings),
        })
    }

    /// Creates the repository `rc` as a copy of `source`: same descriptor
    /// (repository_id included) and keys, so objects are byte-identical in
    /// both and `repo-sync` copies them without re-encoding. Refuses a
    /// location that holds anything.
    pub fn init_copy(cfg: &Config, rc: &RepoConfig, source: &Repository) -> Result<Repository> {
        let storage = storage::open(rc)?;
        if !holds_nothing(storage.as_ref())? {
            return Err(Error::Repository(format!(
                "{} is not empty; repo-init needs an empty or new location",
                storage.describe()
            )));
        }
        for meta in source.storage.list(layout::KEYS_PREFIX)? {
            if !matches!(
                layout::parse(&meta.key),
                Some(layout::ObjectName::KeyFile { .. })
            ) {
                continue;
            }
            let body = read_small(source.storage.as_ref(), &meta.key, MAX_KEY_FILE_LEN)?
                .ok_or_else(|| Error::Repository(format!("{} vanished", meta.key)))?;
            storage.put_new(&meta.key, &mut &body[..], Durability::Now)?;
        }
        // The source's descriptor as validated and authenticated, not
        // whatever the store holds now.
        let body = serde_json::to_vec_pretty(&source.descriptor)
            .map_err(|e| Error::Repository(e.to_string()))?;
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

    /// Opens one repository: validates its descriptor, checks that its
    /// encryption is what the configuration requires, and if encrypted
    /// unlocks the current key and checks the descriptor's MAC with it.
    pub fn open_repo(cfg: &Config, rc: &RepoConfig) -> Result<Repository> {
        let storage = storage::open(rc)?;
        let body = read_small(storage.as_ref(), DESCRIPTOR_KEY, MAX_DESCRIPTOR_LEN)?.ok_or_else(|| {
            Error::Repository(format!(
                "no repository at {} (create one with `walshipper repo-init`, or fix the [repo] location in the configuration)",
                storage.describe()
            ))
        })?;
        let descriptor = Descriptor::parse(&body).map_err(|e| match e {
            Error::Repository(m) => {
                Error::Repository(format!("repository.json at {}: {m}", storage.describe()))
            }
            Error::Corrupt { key, reason } => Error::Corrupt {
                key: format!("{key} at {}", storage.describe()),
                reason,
            },
            other => other,
        })?;
        let mode = cfg.encryption.mode;
        match (mode, descriptor.encrypted()) {
            // Treated as forgery (exit 126 at once): the configuration
            // says the repository is encrypted, the store says otherwise.
            (EncryptionMode::Aes256Gcm, false) => {
                return Err(Error::Corrupt {
                    key: format!("{DESCRIPTOR_KEY} at {}", storage.describe()),
                    reason: "it says the repository is not encrypted, but this configuration requires encryption ([encryption] mode = \"aes-256-gcm\", the default). Nothing was read or written. If someone edited repository.json, restore it from another copy; only if the repository really was created unencrypted, set [encryption] mode = \"none\"".into(),
                });
            }
            (EncryptionMode::None, true) => {
                return Err(Error::Repository(format!(
                    "the repository at {} is encrypted, but [encryption] mode = \"none\" in the configuration: set mode = \"aes-256-gcm\" and the passphrase ([encryption] passphrase_file or WALSHIPPER_PASSPHRASE)",
                    storage.describe()
                )))
            }
            _ => {}
        }
        let repository_id = descriptor.repository_id_bytes()?;
        let mut repo = Repository {
            name: rc.name.clone(),
            summaries: summary_cache(cfg, &repository_id, rc),
            storage,
            descriptor,
            repository_id,
            require_encryption: mode == EncryptionMode::Aes256Gcm,
            keys: RwLock::new(HashMap::new()),
            unlocker: None,
            settings: Arc::new(base_settings(cfg)),
        };
        if repo.require_encryption {
            repo.unlock(cfg)?;
        }
        Ok(repo)
    }

    /// Unlocks the current key (an error if it can't be) and checks the
    /// descriptor's MAC with it. Other keys are unlocked when an object names
    /// one: a bogus or unreadable old key file then fails only the objects it
    /// sealed, and costs nothing to commands that don't read them.
    /// The passphrase is read only if the host's key cache does not hold the
    /// current key.
    fn unlock(&mut self, cfg: &Config) -> Result<()> {
        let u = Unlocker::new(cfg, None);
        let id = self.descriptor.current_key_bytes()?.ok_or_else(|| {
            Error::Repository("encrypted repository without current_key_id".into())
        })?;
        let id_hex = hex::encode(id);
        let key = match u.cached(&id_hex) {
            Some(k) => k,
            None => {
                let pass = u.passphrase()?;
                let k = self.unlock_file(&id_hex, &pass)?.ok_or_else(|| {
                    Error::Repository(format!(
                        "the current key {} is missing from the repository; restore it from another copy of the repository",
                        layout::key_file(&id_hex)
                    ))
                })?;
                u.remember(&k);
                k
            }
        };
        self.descriptor.check_mac(&key)?;
        self.seal_with(key);
        self.unlocker = Some(u);
        Ok(())
    }

    /// What this handle writes from now on is sealed by `key` (and it opens
    /// what `key` sealed).
    fn seal_with(&mut self, key: DataKey) {
        let mut s = (*self.settings).clone();
        s.key = Some(key.clone());
        self.settings = Arc::new(s);
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.id, key);
    }

    /// Reads, checks and unwraps `keys/<id_hex>.json`; None if absent.
    fn unlock_file(&self, id_hex: &str, pass: &[u8]) -> Result<Option<DataKey>> {
        let key = layout::key_file(id_hex);
        let Some(body) = read_small(self.storage.as_ref(), &key, MAX_KEY_FILE_LEN)? else {
            return Ok(None);
        };
        let file = KeyFile::parse(id_hex, &body)?;
        file.unlock(pass).map(Some)
    }

    /// The key file `keys/<id_hex>.json`, parsed and checked (not
    /// unwrapped); None if absent.
    pub fn key_file(&self, id_hex: &str) -> Result<Option<KeyFile>> {
        let key = layout::key_file(id_hex);
        let Some(body) = read_small(self.storage.as_ref(), &key, MAX_KEY_FILE_LEN)? else {
            return Ok(None);
        };
        KeyFile::parse(id_hex, &body).map(Some)
    }

    /// The data key new objects are sealed with (None: unencrypted).
    pub fn current_key(&self) -> Option<DataKey> {
        self.settings.key.clone()
    }

    /// The passphrase that opens this repository's key files, read from its
    /// source (environment, command or file) on first use by this handle;
    /// an error for an unencrypted repository. For commands that wrap or
    /// unwrap key files (`key passphrase`, `key rotate`).
    pub fn passphrase(&self) -> Result<Zeroizing<Vec<u8>>> {
        match &self.unlocker {
            Some(u) => u.passphrase(),
            None => Err(Error::Invalid(
                "an unencrypted repository has no passphrase".into(),
            )),
        }
    }

    /// Puts `key` in this host's key cache, bound as the configured source
    /// needs (the passphrase, or a command's argument vector); best effort.
    pub fn cache_key(&self, key: &DataKey) {
        if let Some(u) = &self.unlocker {
            u.remember(key);
        }
    }

    /// Stores a new key file (create-only: an existing file of that id is
    /// left as it is and is an error unless it holds the same bytes).
    pub fn add_key_file(&self, file: &KeyFile) -> Result<()> {
        let body = serde_json::to_vec_pretty(file).map_err(|e| Error::Repository(e.to_string()))?;
        let key = layout::key_file(&file.key_id);
        if self
            .storage
            .put_new(&key, &mut &body[..], Durability::Now)?
            == PutOutcome::AlreadyExists
            && read_small(self.storage.as_ref(), &key, MAX_KEY_FILE_LEN)?.as_deref()
                != Some(&body[..])
        {
            return Err(Error::Repository(format!(
                "{key} already exists with other content in {}",
                self.storage.describe()
            )));
        }
        Ok(())
    }

    /// Replaces the key file of `file.key_id` (one atomic replace: a reader
    /// sees the old file or the new one, never a part), then reads it back
    /// and returns it as parsed. Only for a change of its passphrase slots:
    /// the caller checks that what it returns still opens as intended.
    pub fn replace_key_file(&self, file: &KeyFile) -> Result<KeyFile> {
        let body = serde_json::to_vec_pretty(file).map_err(|e| Error::Repository(e.to_string()))?;
        let key = layout::key_file(&file.key_id);
        self.storage.put_replace(&key, &mut &body[..])?;
        self.key_file(&file.key_id)?.ok_or_else(|| {
            Error::Repository(format!(
                "{key} vanished from {} right after it was written",
                self.storage.describe()
            ))
        })
    }

    /// Makes `key` current: rewrites repository.json with its id and a MAC
    /// under it (one atomic replace), and seals what this handle writes from
    /// now on with it. Its key file must already be in this repository, or
    /// the repository would no longer open.
    pub fn make_current(&mut self, key: DataKey) -> Result<()> {
        let id_hex = hex::encode(key.id);
        let pass = match &self.unlocker {
            Some(u) => u.passphrase()?,
            None => {
                return Err(Error::Invalid(
                    "an unencrypted repository has no keys".into(),
                ))
            }
        };
        match self.unlock_file(&id_hex, &pass)? {
            Some(k) if k.key == key.key => {}
            Some(_) => {
                return Err(Error::Repository(format!(
                    "{} unwraps to another key; not making it current",
                    layout::key_file(&id_hex)
                )))
            }
            None => {
                return Err(Error::Repository(format!(
                    "{} is not in {}; store it before making it current",
                    layout::key_file(&id_hex),
                    self.storage.describe()
                )))
            }
        }
        let mut d = self.descriptor.clone();
        d.current_key_id = Some(id_hex);
        d.seal(&key)?;
        let body = serde_json::to_vec_pretty(&d).map_err(|e| Error::Repository(e.to_string()))?;
        self.storage.put_replace(DESCRIPTOR_KEY, &mut &body[..])?;
        self.descriptor = d;
        self.seal_with(key);
        Ok(())
    }

    /// Reads every key file back and unwraps it with the passphrase, never
    /// from the host's key cache: `verify` must prove the repository itself
    /// still opens, as a new host would need it to. Returns the problems.
    pub fn check_key_files(&self) -> Result<Vec<String>> {
        let Some(u) = &self.unlocker else {
            return Ok(Vec::new());
        };
        // From its source, never from the cache: a stale passphrase in the
        // secret store shows here, not at the next reboot.
        let pass = u.passphrase()?;
        let mut problems = Vec::new();
        for obj in self.storage.list(layout::KEYS_PREFIX)? {
            let id = match layout::parse(&obj.key) {
                Some(layout::ObjectName::KeyFile { key_id }) => key_id,
                _ => {
                    problems.push(format!(
                        "foreign object {:?} among the key files (ignored)",
                        obj.key
                    ));
                    continue;
                }
            };
            match self.unlock_file(&id, &pass) {
                Ok(Some(k)) => {
                    let known = self.keys.read().unwrap_or_else(|p| p.into_inner());
                    if known.get(&k.id).is_some_and(|c| c.key != k.key) {
                        problems.push(format!(
                            "key file {}: unwraps to another key than the one in use",
                            obj.key
                        ));
                    }
                }
                Ok(None) => problems.push(format!("key file {} vanished while read", obj.key)),
                Err(e) => problems.push(format!("key file {}: {e}", obj.key)),
            }
        }
        Ok(problems)
    }

    /// Unlocks the key an object names, if this repository may hold it.
    /// Returns whether a new key is now available. A key file that is
    /// missing, bogus or doesn't open is skipped with a warning: only the
    /// objects sealed by it fail ("unknown key").
    fn load_key(&self, id_hex: &str) -> bool {
        let Some(u) = &self.unlocker else {
            return false;
        };
        if !is_lower_hex(id_hex, 32) {
            return false;
        }
        let mut failed = u.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.contains(id_hex) {
            return false;
        }
        // The passphrase is read (the command run) only on a cache miss.
        let key = match u.cached(id_hex) {
            Some(k) => Ok(Some(k)),
            None => u
                .passphrase()
                .and_then(|pass| self.unlock_file(id_hex, &pass))
                .inspect(|k| {
                    if let Some(k) = k {
                        u.remember(k);
                    }
                }),
        };
        match key {
            Ok(Some(k)) => {
                self.keys
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(k.id, k);
                true
            }
            Ok(None) => {
                failed.insert(id_hex.into());
                false
            }
            Err(e) => {
                tracing::warn!(
                    "skipping key file {} of repository {}: {e}",
                    layout::key_file(id_hex),
                    self.name
                );
                failed.insert(id_hex.into());
                false
            }
        }
    }

    fn key_list(&self) -> Vec<DataKey> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn binding<'a>(&'a self, key: &'a str) -> Binding<'a> {
        Binding {
            repository_id: &self.repository_id,
            key,
        }
    }

    /// A decoder for object `key` of this repository: bound to its name and
    /// this repository, refusing plaintext when encryption is required.
    fn decoder<R: Read>(&self, src: R, key: &str) -> DecodingReader<R> {
        DecodingReader::new(
            src,
            self.key_list(),
            self.require_encryption,
            self.binding(key),
        )
    }

    /// Whether objects encoded for `self` are byte-identical objects of
    /// `other` (same repository id and current key: a copy made by repo-init).
    pub fn shares_encoding(&self, other: &Repository) -> bool {
        self.repository_id == other.repository_id
            && self.descriptor.current_key_id == other.descriptor.current_key_id
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
        let enc = EncodingReader::new(plain, self.settings_with(threads), self.binding(key))
            .map_err(|e| Error::io("encode", e))?;
        self.put_encoder(key, enc, durability)
    }

    /// As `put_object_with`, the object's hash computed by `plain` itself
    /// in its own pass (a block map's builder) instead of a second one.
    pub fn put_self_hashed(
        &self,
        key: &str,
        plain: impl codec::SelfHashing,
        durability: Durability,
        threads: Option<usize>,
    ) -> Result<(PutOutcome, Summary)> {
        let enc =
            EncodingReader::self_hashed(plain, self.settings_with(threads), self.binding(key))
                .map_err(|e| Error::io("encode", e))?;
        self.put_encoder(key, enc, durability)
    }

    fn settings_with(&self, threads: Option<usize>) -> Arc<CodecSettings> {
        match threads {
            Some(t) if t != self.settings.threads => {
                let mut s = (*self.settings).clone();
                s.threads = t.max(1);
                Arc::new(s)
            }
            _ => self.settings.clone(),
        }
    }

    fn put_encoder<R: Read>(
        &self,
        key: &str,
        mut enc: EncodingReader<R>,
        durability: Durability,
    ) -> Result<(PutOutcome, Summary)> {
        let outcome = self.storage.put_new(key, &mut enc, durability)?;
        Ok((outcome, enc.summary().clone()))
    }

    /// `put_object`, sealed by the key current NOW: repository.json is read
    /// again (and authenticated with the key it names) instead of trusting
    /// the one read at opening. For writes long after opening (the record
    /// of a restore that ran for hours): a `key rotate` and `key retire` in
    /// between would otherwise leave an object sealed by a key whose file
    /// is gone.
    pub fn put_object_fresh(&self, key: &str, plain: impl Read) -> Result<(PutOutcome, Summary)> {
        let Some(opened_with) = &self.settings.key else {
            return self.put_object(key, plain);
        };
        let body = read_small(self.storage.as_ref(), DESCRIPTOR_KEY, MAX_DESCRIPTOR_LEN)?
            .ok_or_else(|| Error::Repository("repository.json vanished".into()))?;
        let d = Descriptor::parse(&body)?;
        let Some(id_hex) = d.current_key_id.clone() else {
            return Err(Error::Repository(
                "repository.json no longer names a current key".into(),
            ));
        };
        if d.repository_id != self.descriptor.repository_id {
            return Err(Error::Repository(
                "repository.json now names another repository".into(),
            ));
        }
        if id_hex == hex::encode(opened_with.id) {
            return self.put_object(key, plain);
        }
        let id: [u8; 16] = hex::decode(&id_hex)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| Error::Repository("repository.json: bad current_key_id".into()))?;
        let known = |id: &[u8; 16]| {
            self.keys
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned()
        };
        let current = match known(&id) {
            Some(k) => k,
            None if self.load_key(&id_hex) => known(&id).ok_or_else(|| {
                Error::Repository(format!("key {id_hex} did not stay loaded"))
            })?,
            None => {
                return Err(Error::Repository(format!(
                    "the current key {id_hex} (repository.json was rewritten since this command opened it) does not unlock"
                )))
            }
        };
        d.check_mac(&current)?;
        tracing::info!("the repository's current key changed while this command ran: sealing {key} with {id_hex}");
        let mut s = (*self.settings).clone();
        s.key = Some(current);
        let mut enc = EncodingReader::new(plain, Arc::new(s), self.binding(key))
            .map_err(|e| Error::io("encode", e))?;
        let outcome = self.storage.put_new(key, &mut enc, Durability::Now)?;
        Ok((outcome, enc.summary().clone()))
    }

    /// A reader that yields `plain` encoded as this repository's object
    /// `key` (the object is bound to that key: store it under no other).
    pub fn encoder<R: Read>(&self, key: &str, plain: R) -> Result<EncodingReader<R>> {
        self.encoder_with_hash(key, plain, codec::HashAlg::CURRENT)
    }

    /// As `encoder`, in the object version of `hash` (version 2 for
    /// SHA-256: the tests of repositories written before BLAKE3).
    pub fn encoder_with_hash<R: Read>(
        &self,
        key: &str,
        plain: R,
        hash: codec::HashAlg,
    ) -> Result<EncodingReader<R>> {
        EncodingReader::with_hash(plain, self.settings.clone(), self.binding(key), hash)
            .map_err(|e| Error::io("encode", e))
    }

    /// Stores bytes that are already an encoded object, unless the key
    /// exists. They must have been encoded for this `key` (see [`Self::encoder`]).
    pub fn put_encoded(&self, key: &str, encoded: &[u8]) -> Result<PutOutcome> {
        self.storage
            .put_new(key, &mut &encoded[..], Durability::Now)
    }

    /// Copies object `key` from `src` byte for byte, decoding it on the way
    /// so that a damaged source object is refused and nothing is stored.
    /// Both repositories must share keys and repository id (repo-init makes
    /// them so); an object of another repository fails to authenticate.
    pub fn copy_object_from(&self, src: &Repository, key: &str) -> Result<PutOutcome> {
        let mut retried = false;
        loop {
            match self.try_copy_object_from(src, key) {
                Err(Error::Storage { source, .. })
                    if !retried && unknown_key(&source).is_some_and(|id| self.load_key(&id)) =>
                {
                    retried = true;
                }
                Err(Error::Storage { source, .. }) if codec::codec_error(&source).is_some() => {
                    return Err(Error::Corrupt {
                        key: format!("{key} in repository {}", src.name),
                        reason: source.to_string(),
                    })
                }
                other => return other,
            }
        }
    }

    fn try_copy_object_from(&self, src: &Repository, key: &str) -> Result<PutOutcome> {
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
            dec: self.decoder(tap, key),
            seen,
            pos: 0,
            done: false,
            scratch: vec![0; 256 << 10],
        };
        self.storage.put_new(key, &mut body, Durability::AtFlush)
    }

    /// Every object of this repository written through the codec (WAL,
    /// backup files and manifests, tombstones, recovery records), as listed:
    /// what a data key may have sealed. Names no writer produces are left
    /// out (they are not the repository's; `verify` reports them).
    pub fn sealed_objects(&self) -> Result<Vec<storage::ObjectMeta>> {
        let mut out = Vec::new();
        for prefix in [
            layout::WAL_PREFIX,
            layout::BACKUPS_PREFIX,
            layout::EXPIRED_PREFIX,
            layout::RECOVERIES_PREFIX,
            layout::STREAM_PREFIX,
        ] {
            out.extend(self.storage.list(prefix)?.into_iter().filter(|m| {
                matches!(
                    layout::parse(&m.key),
                    Some(
                        layout::ObjectName::Wal { .. }
                            | layout::ObjectName::Backup { .. }
                            | layout::ObjectName::Tombstone { .. }
                            | layout::ObjectName::Recovery { .. }
                            | layout::ObjectName::StreamChunk { .. }
                    )
                )
            }));
        }
        Ok(out)
    }

    /// The data key that sealed object `key`, from its 64-byte header alone
    /// (nothing is decrypted: the header is checked by its CRC only, so
    /// this is a census, not a proof). None: the object is not encrypted.
    pub fn object_key_id(&self, key: &str) -> Result<Option<[u8; 16]>> {
        let mut src = self
            .storage
            .get(key)?
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        let h = DecodingReader::read_header(&mut src).map_err(|e| self.read_error(key, e))?;
        Ok(h.encrypted.then_some(h.key_id))
    }

    /// An object's stored bytes, undecoded (small objects: keys).
    pub fn read_raw(&self, key: &str) -> Result<Vec<u8>> {
        read_small(self.storage.as_ref(), key, MAX_RAW_LEN)?
            .ok_or_else(|| Error::NotFound(key.to_string()))
    }

    /// Reads a whole object into memory, at most [`MANIFEST_MAX`] bytes
    /// (the largest object read whole); smaller objects use
    /// `read_object_capped` with their own bound.
    pub fn read_object_vec(&self, key: &str) -> Result<Vec<u8>> {
        self.read_object_capped(key, MANIFEST_MAX)
    }

    /// The manifest stored under `key`, parsed as it is decoded and
    /// `Manifest::validate`d; damage of any kind is `Corrupt` naming `key`.
    pub fn read_manifest(&self, key: &str) -> Result<Manifest> {
        let m: Manifest =
            self.read_json_capped(key, MANIFEST_MAX)?
                .map_err(|e| Error::Corrupt {
                    key: key.to_string(),
                    reason: format!("manifest is not valid JSON: {e}"),
                })?;
        m.validate(key)?;
        Ok(m)
    }

    /// Every complete backup (one whose manifest exists) whose manifest
    /// reads back intact, oldest first. Damaged manifests are logged and
    /// left out: one of them must not make the others unusable. Commands
    /// that report damage use `scan_backups` (info, backup) or
    /// `scan_backups_fresh` (verify, expire).
    pub fn list_backups(&self) -> Result<Vec<BackupSummary>> {
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
    /// Each manifest is read, validated in full and summarized before the
    /// next one is read: one whole manifest is held at a time.
    /// A summary is taken from this host's cache (`crate::summary_cache`)
    /// when the stored manifest is byte for byte the one it was made from.
    pub fn scan_backups(&self) -> Result<BackupScan> {
        self.scan_backups_sized().map(|(scan, _)| scan)
    }

    /// `scan_backups` reading every manifest whole, never the cache
    /// (`verify`: its answer must come from what the store holds now;
    /// `expire`: it deletes on what the manifests say).
    pub fn scan_backups_fresh(&self) -> Result<BackupScan> {
        self.scan_backups_with(false).map(|(scan, _)| scan)
    }

    /// `scan_backups`, and the bytes of every object its listing of
    /// backups/ found (info's stored bytes: one listing, not two).
    pub fn scan_backups_sized(&self) -> Result<(BackupScan, u64)> {
        self.scan_backups_with(true)
    }

    fn scan_backups_with(&self, cached: bool) -> Result<(BackupScan, u64)> {
        let cache = self.summaries.as_ref().filter(|_| cached);
        let mut scan = BackupScan::default();
        let mut listed: u64 = 0;
        for meta in self.storage.list(layout::BACKUPS_PREFIX)? {
            listed = listed.saturating_add(meta.size);
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
            // The file list goes to a local spool, not memory: a scan
            // holds a summary per backup and nothing per file.
            let loaded = match cache {
                Some(c) => self.load_summary_cached(c, &meta.key)?,
                None => self.load_summary(&meta.key)?,
            };
            match loaded {
                Loaded::Intact(s) => scan.backups.push(*s),
                // Removed since the listing (expire on another host).
                Loaded::Missing => {}
                Loaded::Damaged(reason) => scan.damaged.push(DamagedBackup {
                    id: layout::backup_of(&meta.key).unwrap_or_default(),
                    key: meta.key.clone(),
                    reason,
                }),
            }
        }
        if let Some(c) = cache {
            c.retain(&scan.backups.iter().map(|b| b.id.as_str()).collect());
        }
        // By start time (ids carry whole seconds and a type letter).
        scan.backups.sort_by_key(|m| {
            (
                chrono::DateTime::parse_from_rfc3339(&m.start_time).ok(),
                m.id.clone(),
            )
        });
        Ok((scan, listed))
    }

    /// `load_manifest`, summarized, with the file list read through a
    /// local spool (`crate::file_list`): memory does not grow with the
    /// backup's files. The same checks, the same damage.
    fn load_summary(&self, key: &str) -> Result<Loaded<BackupSummary>> {
        match crate::file_list::read_manifest(self, key) {
            Ok(s) => Ok(Loaded::Intact(Box::new(s.summary()))),
            Err(Error::NotFound(_)) => Ok(Loaded::Missing),
            Err(Error::Corrupt { reason, .. }) => Ok(Loaded::Damaged(reason)),
            Err(e @ Error::Repository(_)) => Ok(Loaded::Damaged(e.to_string())),
            Err(e) => Err(e),
        }
    }

    /// `load_summary` through `cache`: with an entry for the backup, the
    /// stored object is hashed first (read, not decoded), and its summary
    /// taken from the cache if it was made from exactly these bytes and the
    /// key that sealed them can still be unlocked. Otherwise (no entry, or
    /// one that no longer holds) the manifest is read whole, hashed as it
    /// is read, and its summary cached with that hash.
    fn load_summary_cached(
        &self,
        cache: &crate::summary_cache::SummaryCache,
        key: &str,
    ) -> Result<Loaded<BackupSummary>> {
        let Some(id) = layout::backup_of(key) else {
            return self.load_summary(key);
        };
        // With an entry, hash the stored bytes (a plain read) to see
        // whether it still holds; without one (a new backup, or one never
        // intact), go straight to the full read, which hashes as it reads.
        if cache.has(&id) {
            match self.stored_hash(key)? {
                Stored::Missing => return Ok(Loaded::Missing),
                // Larger than any manifest: the full read says what it is.
                Stored::TooLarge => return self.load_summary(key),
                Stored::Hashed(stored, header) => {
                    if let Some(hit) = cache.get(&id, key, &stored) {
                        let sealed_ok = match (hit.sealed_by, &header) {
                            (Some(k), Some(h)) => {
                                h.encrypted && h.key_id == k && self.key_usable(&k)
                            }
                            (None, Some(h)) => !h.encrypted && !self.require_encryption,
                            _ => false,
                        };
                        if sealed_ok {
                            return Ok(Loaded::Intact(Box::new(hit.summary)));
                        }
                    }
                    tracing::debug!("{key}: its summary cache entry no longer holds");
                }
            }
        }
        tracing::debug!("{key}: read whole for its summary");
        let (spooled, read) = match crate::file_list::read_manifest_hashed(self, key) {
            Ok(r) => r,
            Err(Error::NotFound(_)) => return Ok(Loaded::Missing),
            Err(Error::Corrupt { reason, .. }) => return Ok(Loaded::Damaged(reason)),
            Err(e @ Error::Repository(_)) => return Ok(Loaded::Damaged(e.to_string())),
            Err(e) => return Err(e),
        };
        let summary = spooled.summary();
        // The hash is of exactly the bytes this summary was decoded from
        // (the decoder refuses anything after the final frame).
        cache.put(key, &read.hash, read.sealed_by, &summary);
        Ok(Loaded::Intact(Box::new(summary)))
    }

    /// BLAKE3 of the object stored at `key`, as stored (nothing decoded),
    /// and its header if it has one that parses. An object larger than a
    /// manifest can be is not hashed (never a hash of a prefix).
    fn stored_hash(&self, key: &str) -> Result<Stored> {
        const CAP: u64 = MANIFEST_MAX as u64 * 2;
        let Some(src) = self.storage.get(key)? else {
            return Ok(Stored::Missing);
        };
        let mut src = src.take(CAP + 1);
        let mut total = 0u64;
        let mut hasher = blake3::Hasher::new();
        let mut first = Vec::with_capacity(crate::codec::HEADER_LEN);
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_error(key, e)),
            };
            total += n as u64;
            if total > CAP {
                return Ok(Stored::TooLarge);
            }
            let want = crate::codec::HEADER_LEN.saturating_sub(first.len()).min(n);
            first.extend_from_slice(&buf[..want]);
            hasher.update(&buf[..n]);
        }
        let header = DecodingReader::read_header(&mut first.as_slice()).ok();
        Ok(Stored::Hashed(*hasher.finalize().as_bytes(), header))
    }

    /// Whether key `id` is unlocked, or can be (as a read naming it would).
    fn key_usable(&self, id: &[u8; 16]) -> bool {
        let known = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id);
        known || self.load_key(&hex::encode(id))
    }

    /// Reads and checks the manifest at `key`. Damage (undecodable, too
    /// large, not JSON, not the manifest of this key) is `Damaged`; a
    /// storage failure is an error: it says nothing about the object.
    fn load_manifest(&self, key: &str) -> Result<Loaded> {
        let m: Manifest = match self.read_json_capped(key, MANIFEST_MAX) {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Ok(Loaded::Damaged(format!("manifest is not valid JSON: {e}"))),
            Err(Error::NotFound(_)) => return Ok(Loaded::Missing),
            Err(Error::Corrupt { reason, .. }) => return Ok(Loaded::Damaged(reason)),
            Err(e) => return Err(e),
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
    /// plaintext's hash (its algorithm the object's). `out` may have received bytes when this fails:
    /// callers write to a temporary and discard it on error.
    pub fn read_object(&self, key: &str, out: &mut dyn Write) -> Result<PlainHash> {
        self.read_object_with(key, out, 1)
    }

    /// As `read_object`, decoding on `threads` threads (for large objects).
    pub fn read_object_with(
        &self,
        key: &str,
        out: &mut dyn Write,
        threads: usize,
    ) -> Result<PlainHash> {
        self.read_object_sealed(key, out, threads, &mut None)
    }

    /// Opens object `key` as a stream of its plaintext, for reading several
    /// at once (restore merges a file's base with its deltas). Its key is
    /// unlocked first if it must be (as `read_object_sealed` does). The
    /// plaintext is not hashed: frames are authenticated (encrypted) or
    /// CRC-checked and the length and frame count checked at the end, but
    /// the caller must check what it read against a hash of its own (the
    /// manifest's hash of the rebuilt file) and read to the end. Errors
    /// the stream returns become `Error`s through `read_error`.
    pub fn open_unhashed(
        &self,
        key: &str,
        threads: usize,
    ) -> Result<DecodingReader<Box<dyn Read + Send>>> {
        let mut reread = false;
        loop {
            let mut src = self
                .storage
                .get(key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))?;
            let mut head = [0u8; codec::HEADER_LEN];
            let n = codec::read_full(&mut src, &mut head).map_err(|e| self.read_error(key, e))?;
            if let Ok(h) = codec::Header::parse(&head) {
                let held = self.key_list().iter().any(|k| k.id == h.key_id);
                if n == head.len()
                    && h.encrypted
                    && !held
                    && !self.load_key(&hex::encode(h.key_id))
                    && !reread
                {
                    // Possibly re-sealed by `key retire` meanwhile (see
                    // read_object_sealed): read it once more.
                    reread = true;
                    continue;
                }
            }
            let src: Box<dyn Read + Send> =
                Box::new(io::Cursor::new(head[..n].to_vec()).chain(src));
            return Ok(self.decoder(src, key).with_threads(threads).without_hash());
        }
    }

    /// Turns an error reading object `key` into damage (the codec refused
    /// it) or a storage failure.
    pub fn read_error(&self, key: &str, e: io::Error) -> Error {
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

    /// Decodes object `key` and parses its plaintext as the JSON of a `T`
    /// as it is decoded: a manifest (a few hundred bytes per file) is never
    /// held as a whole body beside what is parsed from it. The value is
    /// returned only once the object verified to its end. As
    /// `read_object_capped`: plaintext over `max` bytes, or an object that
    /// does not decode, is `Corrupt`, a missing one `NotFound`, a storage
    /// failure an error; plaintext that is not the JSON of a `T` is
    /// `Ok(Err(what is wrong))`. Keys are unlocked and retried as `KeyRetry`
    /// says.
    pub fn read_json_capped<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        max: usize,
    ) -> Result<std::result::Result<T, serde_json::Error>> {
        self.read_json_capped_with(key, max, &mut |r| serde_json::from_reader(r))
    }

    /// `read_json_capped` with the parse given: `parse` is called on the
    /// decoded plaintext, once per attempt (a key retry starts it again),
    /// and must read it as JSON. For a manifest whose file list goes to a
    /// local spool as it is parsed (`crate::file_list`).
    pub fn read_json_capped_with<T>(
        &self,
        key: &str,
        max: usize,
        parse: &mut dyn FnMut(&mut dyn io::Read) -> serde_json::Result<T>,
    ) -> Result<std::result::Result<T, serde_json::Error>> {
        self.read_json_capped_hashed(key, max, parse)
            .map(|(parsed, _)| parsed)
    }

    /// `read_json_capped_with`, and what the summary cache keys on: the
    /// BLAKE3 of the stored bytes the result was decoded from and the key
    /// that sealed them.
    pub fn read_json_capped_hashed<T>(
        &self,
        key: &str,
        max: usize,
        parse: &mut dyn FnMut(&mut dyn io::Read) -> serde_json::Result<T>,
    ) -> Result<(std::result::Result<T, serde_json::Error>, StoredRead)> {
        let mut retry = KeyRetry::default();
        loop {
            let src = self
                .storage
                .get(key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))?;
            let mut src = HashingRead {
                inner: src,
                hasher: blake3::Hasher::new(),
            };
            let mut feed = ParseFeed {
                dec: self.decoder(&mut src, key),
                left: max,
                over: false,
                err: None,
            };
            let parsed = parse(&mut io::BufReader::new(&mut feed));
            // A parse that failed stopped early: what follows is decoded
            // too, so that damage is reported as such, not as bad JSON.
            if parsed.is_err() && feed.err.is_none() && !feed.over {
                let _ = io::copy(&mut feed, &mut io::sink());
            }
            if feed.over {
                return Err(Error::Corrupt {
                    key: key.into(),
                    reason: format!(
                        "larger than {max} bytes, more than such an object can hold; refusing to read it into memory"
                    ),
                });
            }
            if let Some(e) = feed.err.take() {
                if retry.again(self, key, &e) {
                    continue;
                }
                return Err(self.read_error(key, e));
            }
            if feed.dec.verified_hash.is_none() {
                return Err(Error::Corrupt {
                    key: key.into(),
                    reason: "ended before its final frame".into(),
                });
            }
            let sealed_by = feed.dec.sealed_by();
            drop(feed);
            // What follows the final frame is refused by the decoder, so
            // the hash covers the whole object.
            let hash = *src.hasher.finalize().as_bytes();
            return Ok((parsed, StoredRead { hash, sealed_by }));
        }
    }

    /// As `read_object_with`, and sets `sealed_by` to the key the object's
    /// header names once the header was read (also when the object then
    /// fails: `verify` names the key of an object it cannot read). Keys
    /// are unlocked and retried as `KeyRetry` says.
    pub fn read_object_sealed(
        &self,
        key: &str,
        out: &mut dyn Write,
        threads: usize,
        sealed_by: &mut Option<[u8; 16]>,
    ) -> Result<PlainHash> {
        let mut retry = KeyRetry::default();
        loop {
            let src = self
                .storage
                .get(key)?
                .ok_or_else(|| Error::NotFound(key.to_string()))?;
            let head = Arc::new(Mutex::new(Vec::with_capacity(codec::HEADER_LEN)));
            let tap = HeaderTap {
                inner: src,
                head: head.clone(),
                done: false,
            };
            let mut dec = self.decoder(tap, key).with_threads(threads);
            let copied = io::copy(&mut dec, out);
            let head = head.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Ok(h) = <[u8; codec::HEADER_LEN]>::try_from(&head[..]) {
                if let Ok(h) = codec::Header::parse(&h) {
                    *sealed_by = h.encrypted.then_some(h.key_id);
                }
            }
            match copied {
                // Nothing was written on UnknownKey: the header is checked
                // before any frame is decoded.
                Err(e) => {
                    if !retry.again(self, key, &e) {
                        return Err(self.read_error(key, e));
                    }
                }
                Ok(_) => {
                    return dec.verified_hash.ok_or_else(|| Error::Corrupt {
                        key: key.into(),
                        reason: "ended before its final frame".into(),
                    })
                }
            }
        }
    }

    // --- key retire: re-sealing objects under the current key ---

    /// Unlocks key `id_hex` from its key file in this repository (this
    /// host's key cache first) and keeps it to read what it sealed; None:
    /// no such file here. Unlike a read that meets an unknown key, an error
    /// (a damaged file, another passphrase) is returned, not skipped.
    pub fn unlock_key(&self, id_hex: &str) -> Result<Option<DataKey>> {
        let u = self.unlocker.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "repository {} is not encrypted: it has no keys",
                self.name
            ))
        })?;
        if !is_lower_hex(id_hex, 32) {
            return Err(Error::Invalid(format!(
                "{id_hex:.40?} is not a key id (32 lowercase hex digits)"
            )));
        }
        let key = match u.cached(id_hex) {
            Some(k) => Some(k),
            None => self.unlock_file(id_hex, &u.passphrase()?)?,
        };
        if let Some(k) = &key {
            self.keys
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(k.id, k.clone());
        }
        Ok(key)
    }

    /// Keeps `key` (unlocked from a copy of this repository: copies share
    /// their keys) to read what it sealed here.
    pub fn hold_key(&self, key: DataKey) {
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.id, key);
    }

    /// Object `key`'s stored bytes `src` (from its first byte, whose header
    /// is `header`) re-encoded under the current key, with the object's own
    /// compression and frame size and the same binding (its name, this
    /// repository). `src` is verified as it streams, and the reader fails
    /// rather than ends unless all of it verified (every tag, the length,
    /// the hash): a damaged object never yields a complete new one. Once
    /// read to the end, the summary's hash is the verified plaintext's, of
    /// the original's algorithm: the object keeps its format version, so a
    /// manifest's hash of it still names the algorithm its final frame has.
    pub fn resealer<R: Read>(
        &self,
        key: &str,
        header: &codec::Header,
        src: R,
    ) -> Result<EncodingReader<FullyDecoded<R>>> {
        if self.settings.key.is_none() {
            return Err(Error::Invalid(format!(
                "repository {} is not encrypted: nothing to re-seal",
                self.name
            )));
        }
        let mut s = (*self.settings).clone();
        s.compression = header.compression;
        s.frame_size = header.frame_size;
        // Parallelism is across objects (`--jobs`), not within one.
        s.threads = 1;
        let dec = FullyDecoded(self.decoder(src, key));
        EncodingReader::with_hash(dec, Arc::new(s), self.binding(key), header.hash)
            .map_err(|e| Error::io("encode", e))
    }

    /// Decodes `src`, the stored bytes of object `key` as written by
    /// [`Self::resealer`], entirely with the current key alone: an object
    /// not sealed by it, or damaged, is `Corrupt`. Returns the plaintext's
    /// hash (of the copy's algorithm) and length.
    pub fn check_resealed(&self, key: &str, src: &mut dyn Read) -> Result<(PlainHash, u64)> {
        let current = self
            .current_key()
            .ok_or_else(|| Error::Invalid(format!("repository {} is not encrypted", self.name)))?;
        let mut h = [0u8; codec::HEADER_LEN];
        codec::read_full(src, &mut h).map_err(|e| self.read_error(key, e))?;
        let not_current = codec::Header::parse(&h)
            .ok()
            .is_none_or(|hd| !hd.encrypted || hd.key_id != current.id);
        if not_current {
            return Err(Error::Corrupt {
                key: key.into(),
                reason: "the re-sealed copy does not name the current key in its header".into(),
            });
        }
        let mut dec = DecodingReader::new(
            io::Cursor::new(h).chain(src),
            vec![current],
            true,
            self.binding(key),
        );
        let n = io::copy(&mut dec, &mut io::sink()).map_err(|e| self.read_error(key, e))?;
        let sha = dec.verified_hash.ok_or_else(|| Error::Corrupt {
            key: key.into(),
            reason: "ended before its final frame".into(),
        })?;
        Ok((sha, n))
    }
}

/// A decoder that fails instead of ending unless the object verified to
/// its final frame (see [`Repository::resealer`]).
pub struct FullyDecoded<R>(DecodingReader<R>);

impl<R: Read> Read for FullyDecoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.0.read(buf)?;
        if n == 0 && !buf.is_empty() && self.0.verified_hash.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                CodecError::Truncated,
            ));
        }
        Ok(n)
    }
}

/// Test repositories, one home for the unit tests of every module that
/// needs a real one (repo, census, key retire).
#[cfg(test)]
pub mod test_support {
    use super::*;
    use std::path::Path;

    /// An encrypted posix repository in `dir/r` (passphrase file in `dir`,
    /// the cheapest Argon2 costs, no key cache), created, and its
    /// configuration.
    pub fn posix_repo(dir: &Path, system_identifier: u64) -> (Config, Repository) {
        use std::os::unix::fs::PermissionsExt;
        let pass = dir.join("passphrase");
        std::fs::write(&pass, "unit-test passphrase, long enough\n").unwrap();
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
        let toml = dir.join("r.toml");
        std::fs::write(
            &toml,
            format!(
                "[repo]\ntype = \"posix\"\npath = \"{}\"\n[encryption]\npassphrase_file = \"{}\"\nkey_cache = false\n",
                dir.join("r").display(),
                pass.display()
            ),
        )
        .unwrap();
        let cfg = Config::load_with_env(Some(&toml), std::iter::empty()).unwrap();
        let id = ClusterIdentity {
            system_identifier,
            pg_major: 15,
            wal_segment_size: 16 << 20,
        };
        let opts = InitOptions {
            encrypt: true,
            kdf_memory_kib: crate::keys::MIN_KDF_MEMORY_KIB,
            kdf_iterations: 1,
        };
        let repo = Repository::init(&cfg, cfg.primary(), &id, &opts).unwrap();
        (cfg, repo)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    const SEG2: &str = "wal/0000000100000000/000000010000000000000002";
    const SEG3: &str = "wal/0000000100000000/000000010000000000000003";

    /// A posix repository configuration in `dir`; `mode` as in [encryption].
    pub(crate) fn config(dir: &Path, repo: &str, mode: &str) -> Config {
        use std::os::unix::fs::PermissionsExt;
        let pass = dir.join("passphrase");
        std::fs::write(&pass, "unit-test passphrase, long enough\n").unwrap();
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = dir.join(format!("{repo}.toml"));
        std::fs::write(
            &p,
            format!(
                "[repo]\ntype = \"posix\"\npath = \"{}\"\n[encryption]\nmode = \"{mode}\"\npassphrase_file = \"{}\"\nkey_cache = false\n",
                dir.join(repo).display(),
                pass.display()
            ),
        )
        .unwrap();
        Config::load_with_env(Some(&p), std::iter::empty()).unwrap()
    }

    fn identity() -> ClusterIdentity {
        ClusterIdentity {
            system_identifier: 7_310_000_000_000_000_001,
            pg_major: 15,
            wal_segment_size: 16 << 20,
        }
    }

    pub(crate) fn init(cfg: &Config) -> Repository {
        Repository::init(
            cfg,
            cfg.primary(),
            &identity(),
            &InitOptions {
                encrypt: cfg.encryption.mode == EncryptionMode::Aes256Gcm,
                kdf_memory_kib: crate::keys::MIN_KDF_MEMORY_KIB,
                kdf_iterations: 1,
            },
        )
        .unwrap()
    }

    fn path(cfg: &Config, key: &str) -> PathBuf {
        cfg.primary().path.join(key)
    }

    fn edit_descriptor(cfg: &Config, f: impl FnOnce(&mut serde_json::Value)) {
        let p = path(cfg, DESCRIPTOR_KEY);
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    }

    fn open_err(cfg: &Config) -> String {
        match Repository::open(cfg) {
            Ok(_) => panic!("opened"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn descriptor_is_validated_and_authenticated() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "r", "aes-256-gcm");
        init(&cfg);
        let good = std::fs::read(path(&cfg, DESCRIPTOR_KEY)).unwrap();
        let d = Descriptor::parse(&good).unwrap();
        assert!(is_lower_hex(&d.repository_id, 32) && d.mac.is_some());
        Repository::open(&cfg).unwrap();
        type Edit = fn(&mut serde_json::Value);
        let cases: &[(Edit, &str)] = &[
            (|v| v["encryption"] = "none".into(), "repository"),
            (|v| v["wal_segment_size"] = 0.into(), "wal_segment_size 0"),
            (
                |v| v["wal_segment_size"] = (3u64 << 20).into(),
                "power of two",
            ),
            (
                |v| v["wal_segment_size"] = (2u64 << 30).into(),
                "power of two",
            ),
            (
                |v| v["format_version"] = 1.into(),
                "version 1 is not supported",
            ),
            (
                |v| v["format_version"] = 3.into(),
                "version 3 is not supported",
            ),
            (|v| v["pg_version"] = 99.into(), "pg_version 99"),
            (
                |v| v["system_identifier"] = "-1".into(),
                "system_identifier",
            ),
            (
                |v| v["system_identifier"] = "18446744073709551616".into(),
                "system_identifier",
            ),
            (|v| v["repository_id"] = "XYZ".into(), "repository_id"),
            (|v| v["current_key_id"] = "00".into(), "current_key_id"),
            (|v| v["mac"] = serde_json::Value::Null, "MAC is missing"),
            (|v| v["extra"] = 1.into(), "unknown field"),
            // Valid-looking edits the MAC catches.
            (
                |v| v["system_identifier"] = "42".into(),
                "repository.json was modified",
            ),
            (
                |v| v["created_at"] = "2020-01-01T00:00:00Z".into(),
                "repository.json was modified",
            ),
            (
                |v| v["wal_segment_size"] = (64u64 << 20).into(),
                "repository.json was modified",
            ),
        ];
        for (edit, want) in cases {
            std::fs::write(path(&cfg, DESCRIPTOR_KEY), &good).unwrap();
            edit_descriptor(&cfg, *edit);
            let err = open_err(&cfg);
            assert!(err.contains(want), "want {want:?}, got: {err}");
        }
        std::fs::write(path(&cfg, DESCRIPTOR_KEY), vec![b' '; 100_000]).unwrap();
        assert!(open_err(&cfg).contains("larger than"));
        // "none" plus a valid-looking shape: refused by the configuration.
        std::fs::write(path(&cfg, DESCRIPTOR_KEY), &good).unwrap();
        edit_descriptor(&cfg, |v| {
            v["encryption"] = "none".into();
            v["current_key_id"] = serde_json::Value::Null;
            v.as_object_mut().unwrap().remove("mac");
        });
        let err = open_err(&cfg);
        assert!(err.contains("requires encryption"), "{err}");
    }

    #[test]
    fn configuration_decides_encryption() {
        let dir = tempfile::tempdir().unwrap();
        let enc = config(dir.path(), "e", "aes-256-gcm");
        init(&enc);
        // mode = "none" against an encrypted repository: refused with a hint.
        let none_on_enc = config(dir.path(), "e", "none");
        assert!(open_err(&none_on_enc).contains("mode = \"aes-256-gcm\""));
        // An unencrypted repository is usable only with mode = "none".
        let plain = config(dir.path(), "p", "none");
        let repo = init(&plain);
        repo.put_object(SEG2, &b"plain"[..]).unwrap();
        let repo = Repository::open(&plain).unwrap();
        assert_eq!(repo.read_object_vec(SEG2).unwrap(), b"plain");
        let enc_on_plain = config(dir.path(), "p", "aes-256-gcm");
        assert!(open_err(&enc_on_plain).contains("requires encryption"));
        // repo-init refuses a request the configuration does not allow.
        let fresh = config(dir.path(), "f", "aes-256-gcm");
        let err = Repository::init(
            &fresh,
            fresh.primary(),
            &identity(),
            &InitOptions {
                encrypt: false,
                kdf_memory_kib: crate::keys::MIN_KDF_MEMORY_KIB,
                kdf_iterations: 1,
            },
        )
        .err()
        .unwrap();
        assert!(matches!(err, Error::Config(_)), "{err}");
    }

    #[test]
    fn plaintext_object_in_encrypted_repository_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "r", "aes-256-gcm");
        let repo = init(&cfg);
        repo.put_object(SEG3, &b"real"[..]).unwrap();
        // A plaintext object with correct CRCs, as an attacker would make it.
        let plain = Arc::new(base_settings(&cfg));
        let mut forged = Vec::new();
        EncodingReader::new(&b"forged"[..], plain, repo.binding(SEG3))
            .unwrap()
            .read_to_end(&mut forged)
            .unwrap();
        std::fs::write(path(&cfg, SEG3), &forged).unwrap();
        let repo = Repository::open(&cfg).unwrap();
        let err = repo.read_object_vec(SEG3).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { key, reason } if key == SEG3 && reason.contains("not encrypted")),
            "{err}"
        );
    }

    #[test]
    fn json_parsed_while_decoding_is_checked_like_a_whole_read() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "r", "aes-256-gcm");
        let repo = init(&cfg);
        let key = layout::manifest("20261121-224754F");
        let value = serde_json::json!({"files": (0..20000).collect::<Vec<u32>>(), "x": "y"});
        let body = serde_json::to_vec(&value).unwrap();
        repo.put_object(&key, &body[..]).unwrap();
        let json = |max| repo.read_json_capped::<serde_json::Value>(&key, max);
        assert_eq!(json(body.len()).unwrap().unwrap(), value);
        // One byte over its cap: refused before it is all read.
        let err = json(body.len() - 1).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { reason, .. } if reason.contains("larger than")),
            "{err}"
        );
        // Not a value of the type asked for: a JSON error, not damage.
        assert!(repo
            .read_json_capped::<u32>(&key, body.len())
            .unwrap()
            .is_err());
        // Truncated, a byte changed, gone: as the whole-body read says.
        let stored = std::fs::read(path(&cfg, &key)).unwrap();
        std::fs::write(path(&cfg, &key), &stored[..stored.len() - 40]).unwrap();
        assert!(matches!(json(MANIFEST_MAX), Err(Error::Corrupt { .. })));
        let mut flipped = stored.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 1;
        std::fs::write(path(&cfg, &key), &flipped).unwrap();
        assert!(matches!(json(MANIFEST_MAX), Err(Error::Corrupt { .. })));
        std::fs::remove_file(path(&cfg, &key)).unwrap();
        assert!(matches!(json(MANIFEST_MAX), Err(Error::NotFound(_))));
    }

    #[test]
    fn swapped_or_foreign_objects_fail_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "r", "aes-256-gcm");
        let repo = init(&cfg);
        repo.put_object(SEG2, &b"segment two"[..]).unwrap();
        repo.put_object(SEG3, &b"segment three"[..]).unwrap();
        assert_eq!(repo.read_object_vec(SEG3).unwrap(), b"segment three");
        std::fs::copy(path(&cfg, SEG2), path(&cfg, SEG3)).unwrap();
        let err = repo.read_object_vec(SEG3).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { key, reason } if key == SEG3 && reason.contains("authentication failed")),
            "{err}"
        );
        // A copy made by repo-init shares the repository id: objects move as they are.
        let cfg2 = config(dir.path(), "r2", "aes-256-gcm");
        let copy = Repository::init_copy(&cfg2, cfg2.primary(), &repo).unwrap();
        assert_eq!(copy.descriptor.repository_id, repo.descriptor.repository_id);
        assert!(copy.shares_encoding(&repo));
        copy.copy_object_from(&repo, SEG2).unwrap();
        assert_eq!(copy.read_object_vec(SEG2).unwrap(), b"segment two");
        // The swapped object is refused by the copy too, and nothing stored.
        assert!(matches!(
            copy.copy_object_from(&repo, SEG3),
            Err(Error::Corrupt { .. })
        ));
        assert!(copy.storage.head(SEG3).unwrap().is_none());
        // Another repository (other keys, other id): its object does not open here.
        let cfg3 = config(dir.path(), "r3", "aes-256-gcm");
        let other = init(&cfg3);
        other.put_object(SEG3, &b"foreign"[..]).unwrap();
        std::fs::copy(path(&cfg3, SEG3), path(&cfg, SEG3)).unwrap();
        let err = repo.read_object_vec(SEG3).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { reason, .. } if reason.contains("does not hold")),
            "{err}"
        );
    }

    #[test]
    fn rotation_keeps_old_objects_readable() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "r", "aes-256-gcm");
        let mut repo = init(&cfg);
        let old = repo.current_key().unwrap();
        repo.put_object(SEG2, &b"under the old key"[..]).unwrap();
        let pass = cfg.passphrase().unwrap();
        let (file, new) = KeyFile::create(&pass, crate::keys::MIN_KDF_MEMORY_KIB, 1).unwrap();
        // Not current before its file is stored.
        assert!(repo.make_current(new.clone()).is_err());
        repo.add_key_file(&file).unwrap();
        repo.add_key_file(&file).unwrap();
        repo.make_current(new.clone()).unwrap();
        repo.put_object(SEG3, &b"under the new key"[..]).unwrap();
        let repo = Repository::open(&cfg).unwrap();
        assert_eq!(repo.current_key().unwrap().id, new.id);
        assert_eq!(repo.object_key_id(SEG2).unwrap(), Some(old.id));
        assert_eq!(repo.object_key_id(SEG3).unwrap(), Some(new.id));
        assert_eq!(repo.read_object_vec(SEG2).unwrap(), b"under the old key");
        assert_eq!(repo.read_object_vec(SEG3).unwrap(), b"under the new key");
        let keys: Vec<String> = repo
            .sealed_objects()
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(keys, vec![SEG2.to_string(), SEG3.to_string()]);
    }

    #[test]
    fn bad_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "r", "aes-256-gcm");
        let repo = init(&cfg);
        let current = repo.descriptor.current_key_id.clone().unwrap();
        let current_file = path(&cfg, &layout::key_file(&current));
        let good = std::fs::read(&current_file).unwrap();
        // A bogus extra key file (any content) stops nothing.
        let bogus = "ab".repeat(16);
        std::fs::write(path(&cfg, &layout::key_file(&bogus)), b"{ not json").unwrap();
        let repo = Repository::open(&cfg).unwrap();
        repo.put_object(SEG2, &b"two"[..]).unwrap();
        assert_eq!(repo.read_object_vec(SEG2).unwrap(), b"two");
        // An object naming that key fails as "unknown key", loudly.
        let mut obj = std::fs::read(path(&cfg, SEG2)).unwrap();
        obj[12..28].copy_from_slice(&hex::decode(&bogus).unwrap());
        let crc = crc32fast::hash(&obj[0..60]);
        obj[60..64].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(path(&cfg, SEG2), &obj).unwrap();
        let err = repo.read_object_vec(SEG2).unwrap_err();
        assert!(err.to_string().contains("does not hold"), "{err}");
        // The current key file with a huge Argon2 cost: an error, not an abort.
        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        v["slots"][0]["kdf"]["memory_kib"] = u32::MAX.into();
        std::fs::write(&current_file, serde_json::to_vec(&v).unwrap()).unwrap();
        let err = open_err(&cfg);
        assert!(err.contains("Argon2 memory cost"), "{err}");
        // The current key file under another id: refused.
        let mut v: serde_json::Value = serde_json::from_slice(&good).unwrap();
        v["key_id"] = bogus.clone().into();
        std::fs::write(&current_file, serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(open_err(&cfg).contains("does not match"));
        std::fs::remove_file(&current_file).unwrap();
        assert!(open_err(&cfg).contains("missing"));
    }
}

/// `read_object_sealed` against `key retire` running at the same time: a
/// real posix repository, with the store's `get` used as the moment at which
/// the retirement of an object's key happens (re-sealed, then its key file
/// removed), exactly between a reader's GET and its unlocking of that key.
#[cfg(test)]
mod retire_race_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SEG: &str = "wal/0000000100000000/000000010000000000000002";

    /// The posix store of the repository, which on the first GET of `SEG`
    /// returns the object as it is and then retires its key: writes `resealed`
    /// over it and removes `old_key_file`, as `key retire` does.
    struct RetireDuringRead {
        inner: Box<dyn Storage>,
        resealed: Option<Vec<u8>>,
        old_key_file: String,
        gets: AtomicUsize,
    }

    impl Storage for RetireDuringRead {
        fn put_new(&self, k: &str, b: &mut dyn Read, d: Durability) -> Result<PutOutcome> {
            self.inner.put_new(k, b, d)
        }
        fn flush(&self) -> Result<()> {
            self.inner.flush()
        }
        fn put_replace(&self, k: &str, b: &mut dyn Read) -> Result<()> {
            self.inner.put_replace(k, b)
        }
        fn get(&self, k: &str) -> Result<Option<Box<dyn Read + Send>>> {
            let first = k == SEG && self.gets.fetch_add(1, Ordering::SeqCst) == 0;
            let got = self.inner.get(k)?;
            if first {
                // The reader holds the old object's bytes (posix: the open
                // file, as S3 serves one version per GET).
                let mut old = Vec::new();
                got.ok_or_else(|| Error::NotFound(k.into()))?
                    .read_to_end(&mut old)
                    .map_err(|e| Error::io("read", e))?;
                if let Some(new) = &self.resealed {
                    self.inner.put_replace(k, &mut &new[..])?;
                }
                self.inner.delete(&self.old_key_file)?;
                return Ok(Some(Box::new(io::Cursor::new(old))));
            }
            Ok(got)
        }
        fn head(&self, k: &str) -> Result<Option<storage::ObjectMeta>> {
            self.inner.head(k)
        }
        fn list(&self, p: &str) -> Result<Vec<storage::ObjectMeta>> {
            self.inner.list(p)
        }
        fn list_children(&self, p: &str) -> Result<Vec<String>> {
            self.inner.list_children(p)
        }
        fn delete(&self, k: &str) -> Result<()> {
            self.inner.delete(k)
        }
        fn delete_prefix(&self, p: &str) -> Result<usize> {
            self.inner.delete_prefix(p)
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
    }

    /// A repository whose `SEG` is sealed by an old key, with a new key
    /// current; the store retires the old key during the first read of
    /// `SEG` (re-sealing it under the new key when `reseal`).
    fn repository(dir: &std::path::Path, reseal: bool) -> (Repository, [u8; 16], [u8; 16]) {
        let (cfg, mut repo) = super::test_support::posix_repo(dir, 7_310_000_000_000_000_002);
        let old = repo.current_key().unwrap().id;
        repo.put_object(SEG, &b"sealed by the old key"[..]).unwrap();
        let p = cfg.passphrase().unwrap();
        let (file, new) = KeyFile::create(&p, crate::keys::MIN_KDF_MEMORY_KIB, 1).unwrap();
        repo.add_key_file(&file).unwrap();
        repo.make_current(new.clone()).unwrap();
        let mut resealed = Vec::new();
        repo.encoder(SEG, &b"sealed by the old key"[..])
            .unwrap()
            .read_to_end(&mut resealed)
            .unwrap();
        // A reader that opened after the rotation: it holds the new key only.
        let mut repo = Repository::open(&cfg).unwrap();
        repo.storage = Box::new(RetireDuringRead {
            inner: storage::open(cfg.primary()).unwrap(),
            resealed: reseal.then_some(resealed),
            old_key_file: layout::key_file(&hex::encode(old)),
            gets: AtomicUsize::new(0),
        });
        (repo, old, new.id)
    }

    #[test]
    fn an_object_resealed_while_read_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, _, new) = repository(dir.path(), true);
        let mut out = Vec::new();
        let mut sealed_by = None;
        repo.read_object_sealed(SEG, &mut out, 1, &mut sealed_by)
            .unwrap();
        assert_eq!(out, b"sealed by the old key");
        assert_eq!(sealed_by, Some(new));
    }

    #[test]
    fn an_object_of_a_key_that_is_gone_fails_after_one_more_read() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, old, _) = repository(dir.path(), false);
        let mut out = Vec::new();
        let mut sealed_by = None;
        let err = repo
            .read_object_sealed(SEG, &mut out, 1, &mut sealed_by)
            .unwrap_err();
        assert!(err.to_string().contains("does not hold"), "{err}");
        assert!(out.is_empty());
        // Its key is named even though it could not be read.
        assert_eq!(sealed_by, Some(old));
    }
}
