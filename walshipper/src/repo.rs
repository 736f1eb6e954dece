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
use crate::config::Config;
use crate::error::{Error, Result};
use crate::keys::{KeyCache, KeyFile};
use crate::manifest::Manifest;
use crate::storage::{posix::PosixStorage, Durability, PutOutcome, Storage};
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
    pub storage: Box<dyn Storage>,
    pub descriptor: Descriptor,
    keys: HashMap<[u8; 16], DataKey>,
    settings: Arc<CodecSettings>,
}

/// Options of repo-init.
pub struct InitOptions {
    pub encrypt: bool,
    pub kdf_memory_kib: u32,
    pub kdf_iterations: u32,
}

pub fn open_storage(cfg: &Config) -> Box<dyn Storage> {
    Box::new(PosixStorage::new(cfg.repo.path.clone()))
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

impl Repository {
    /// Creates a repository. Refuses a location that already holds anything.
    pub fn init(cfg: &Config, id: &ClusterIdentity, opts: &InitOptions) -> Result<Repository> {
        let storage = open_storage(cfg);
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
            storage,
            descriptor,
            keys,
            settings: Arc::new(settings),
        })
    }

    /// Opens the repository and, if it is encrypted, unlocks its keys.
    pub fn open(cfg: &Config) -> Result<Repository> {
        let storage = open_storage(cfg);
        let body = read_small(storage.as_ref(), DESCRIPTOR_KEY)?.ok_or_else(|| {
            Error::Repository(format!(
                "no repository at {} (create one with `walshipper repo-init`, or fix repo.path)",
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

    /// Reads a whole object into memory (manifests, labels).
    pub fn read_object_vec(&self, key: &str) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.read_object(key, &mut v)?;
        Ok(v)
    }

    /// Every complete backup (one whose manifest exists), oldest first.
    pub fn list_backups(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for meta in self.storage.list("backups/")? {
            let Some(rest) = meta.key.strip_prefix("backups/") else {
                continue;
            };
            let Some((_, "manifest")) = rest.split_once('/') else {
                continue;
            };
            let body = self.read_object_vec(&meta.key)?;
            let m: Manifest = serde_json::from_slice(&body).map_err(|e| Error::Corrupt {
                key: meta.key.clone(),
                reason: format!("manifest is not valid JSON: {e}"),
            })?;
            out.push(m);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Threads configured for one object's codec.
    pub fn threads(&self) -> usize {
        self.settings.threads
    }

    pub fn find_backup(&self, id: &str) -> Result<Manifest> {
        self.list_backups()?
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no backup {id} in the repository (see `walshipper info`)"
                ))
            })
    }

    /// Where a WAL segment is stored.
    pub fn wal_key(&self, tli: u32, segno: u64) -> String {
        let name = crate::wal::segment_name(tli, segno, self.descriptor.wal_segment_size);
        format!("wal/{}/{name}", &name[0..16])
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
