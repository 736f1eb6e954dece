//! Key management. A repository holds one or more data keys, each wrapped
//! (AES-256-GCM) by a key-encryption key derived from the passphrase with
//! Argon2id. Objects name the data key that sealed them, so passphrases can
//! be changed (re-wrap) and data keys rotated (new objects use the newest
//! key) without rewriting stored data.
//!
//! Argon2id is deliberately slow; archive-push runs once per WAL segment, so
//! the unwrapped key may be cached on the database host (see [`KeyCache`]).

use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::codec::DataKey;
use crate::error::{Error, Result};

/// Argon2id cost: 64 MiB, 3 passes (above the OWASP minimum); stored per key
/// file so that later keys may use other costs.
pub const DEFAULT_KDF_MEMORY_KIB: u32 = 64 * 1024;
pub const DEFAULT_KDF_ITERATIONS: u32 = 3;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    pub algorithm: String,
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub salt: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKey {
    pub algorithm: String,
    pub nonce: String,
    pub ciphertext: String,
}

/// `keys/<key_id>.json` in the repository.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub version: u32,
    pub key_id: String,
    pub created_at: String,
    pub kdf: KdfParams,
    pub wrapped: WrappedKey,
}

pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)
        .map_err(|e| Error::Repository(format!("no random numbers from the OS: {e}")))?;
    Ok(b)
}

fn argon2_kek(passphrase: &[u8], p: &KdfParams) -> Result<[u8; 32]> {
    if p.algorithm != "argon2id" {
        return Err(Error::Repository(format!(
            "unsupported key derivation {}",
            p.algorithm
        )));
    }
    let salt = hex::decode(&p.salt).map_err(|_| Error::Repository("key file: bad salt".into()))?;
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| Error::Repository(format!("key file: bad Argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(passphrase, &salt, &mut out)
        .map_err(|e| Error::Repository(format!("key derivation failed: {e}")))?;
    Ok(out)
}

fn seal(kek: &[u8; 32], aad: &[u8], plain: &[u8]) -> Result<WrappedKey> {
    let nonce = random::<12>()?;
    let c = Aes256Gcm::new_from_slice(kek).map_err(|_| Error::Repository("bad key".into()))?;
    let ct = c
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
        .map_err(|_| Error::Repository("key wrapping failed".into()))?;
    Ok(WrappedKey {
        algorithm: "aes-256-gcm".into(),
        nonce: hex::encode(nonce),
        ciphertext: hex::encode(ct),
    })
}

/// None when the tag does not verify (wrong passphrase or tampered file).
fn open(kek: &[u8; 32], aad: &[u8], w: &WrappedKey) -> Result<Option<[u8; 32]>> {
    let bad = || Error::Repository("key file is malformed".into());
    let nonce = hex::decode(&w.nonce).map_err(|_| bad())?;
    let ct = hex::decode(&w.ciphertext).map_err(|_| bad())?;
    if nonce.len() != 12 || w.algorithm != "aes-256-gcm" {
        return Err(bad());
    }
    let c = Aes256Gcm::new_from_slice(kek).map_err(|_| bad())?;
    match c.decrypt(Nonce::from_slice(&nonce), Payload { msg: &ct, aad }) {
        Ok(p) if p.len() == 32 => {
            let mut k = [0u8; 32];
            k.copy_from_slice(&p);
            Ok(Some(k))
        }
        Ok(_) => Err(bad()),
        Err(_) => Ok(None),
    }
}

impl KeyFile {
    /// A new random data key wrapped by `passphrase`.
    pub fn create(
        passphrase: &[u8],
        memory_kib: u32,
        iterations: u32,
    ) -> Result<(KeyFile, DataKey)> {
        let id = random::<16>()?;
        let key = random::<32>()?;
        let kdf = KdfParams {
            algorithm: "argon2id".into(),
            memory_kib,
            iterations,
            parallelism: 1,
            salt: hex::encode(random::<16>()?),
        };
        let kek = argon2_kek(passphrase, &kdf)?;
        let wrapped = seal(&kek, &id, &key)?;
        let file = KeyFile {
            version: 1,
            key_id: hex::encode(id),
            created_at: chrono::Utc::now().to_rfc3339(),
            kdf,
            wrapped,
        };
        Ok((file, DataKey { id, key }))
    }

    pub fn id_bytes(&self) -> Result<[u8; 16]> {
        let v = hex::decode(&self.key_id)
            .map_err(|_| Error::Repository("key file: bad key_id".into()))?;
        v.try_into()
            .map_err(|_| Error::Repository("key file: bad key_id length".into()))
    }

    /// Unwraps with the passphrase (the slow path).
    pub fn unlock(&self, passphrase: &[u8]) -> Result<DataKey> {
        let id = self.id_bytes()?;
        let kek = argon2_kek(passphrase, &self.kdf)?;
        match open(&kek, &id, &self.wrapped)? {
            Some(key) => Ok(DataKey { id, key }),
            None => Err(Error::WrongPassphrase {
                key_id: self.key_id.clone(),
            }),
        }
    }
}

/// A host-local cache of unwrapped data keys, sealed with a key derived
/// cheaply (HKDF) from the passphrase. It lives beside the passphrase on the
/// database host (mode 0600 in a 0700 directory), so it protects no less than
/// the passphrase file itself; it never goes into the repository. A cache
/// entry that does not open with the current passphrase is ignored.
pub struct KeyCache {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    salt: String,
    wrapped: WrappedKey,
}

impl KeyCache {
    pub fn new(dir: PathBuf) -> KeyCache {
        KeyCache { dir }
    }

    fn kek(passphrase: &[u8], salt: &[u8]) -> Result<[u8; 32]> {
        let mut k = [0u8; 32];
        Hkdf::<Sha256>::new(Some(salt), passphrase)
            .expand(b"walshipper key cache v1", &mut k)
            .map_err(|_| Error::Repository("key cache derivation failed".into()))?;
        Ok(k)
    }

    fn path(&self, key_id: &str) -> PathBuf {
        self.dir.join(format!("{key_id}.key"))
    }

    pub fn get(&self, key_id: &str, passphrase: &[u8]) -> Option<DataKey> {
        let text = std::fs::read_to_string(self.path(key_id)).ok()?;
        let entry: CacheEntry = serde_json::from_str(&text).ok()?;
        let salt = hex::decode(&entry.salt).ok()?;
        let id: [u8; 16] = hex::decode(key_id).ok()?.try_into().ok()?;
        let kek = Self::kek(passphrase, &salt).ok()?;
        let key = open(&kek, &id, &entry.wrapped).ok()??;
        Some(DataKey { id, key })
    }

    /// Best effort: a cache that cannot be written only costs speed.
    pub fn put(&self, key: &DataKey, passphrase: &[u8]) {
        if let Err(e) = self.try_put(key, passphrase) {
            tracing::debug!("key cache not written in {}: {e}", self.dir.display());
        }
    }

    fn try_put(&self, key: &DataKey, passphrase: &[u8]) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| Error::io("create key cache dir", e))?;
        let meta = std::fs::metadata(&self.dir).map_err(|e| Error::io("key cache dir", e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Error::Config(format!(
                "key cache directory {} is accessible to others; not caching",
                self.dir.display()
            )));
        }
        let salt = random::<16>()?;
        let kek = Self::kek(passphrase, &salt)?;
        let entry = CacheEntry {
            salt: hex::encode(salt),
            wrapped: seal(&kek, &key.id, &key.key)?,
        };
        let id = hex::encode(key.id);
        let tmp = self.dir.join(format!(".{id}.{}.tmp", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io("write key cache", e))?;
        let body = serde_json::to_vec(&entry).map_err(|e| Error::Repository(e.to_string()))?;
        std::io::Write::write_all(&mut f, &body).map_err(|e| Error::io("write key cache", e))?;
        std::fs::rename(&tmp, self.path(&id)).map_err(|e| Error::io("write key cache", e))?;
        Ok(())
    }
}

/// Reads a passphrase file: must exist, should be private, trailing newline dropped.
pub fn read_passphrase_file(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::Config(format!(
            "encryption.passphrase_file {}: {e} (create it with a long random passphrase, mode 0600, or set WALSHIPPER_PASSPHRASE)",
            path.display()
        ))
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "passphrase file {} is readable by group or others; chmod 600 it",
            path.display()
        );
    }
    let mut p = std::fs::read(path).map_err(|e| {
        Error::Config(format!(
            "encryption.passphrase_file {}: {e}",
            path.display()
        ))
    })?;
    while p.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        p.pop();
    }
    if p.is_empty() {
        return Err(Error::Config(format!(
            "encryption.passphrase_file {} is empty",
            path.display()
        )));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unlock_and_wrong_passphrase() {
        let (file, key) = KeyFile::create(b"correct horse", 1024, 1).unwrap();
        assert_eq!(file.unlock(b"correct horse").unwrap().key, key.key);
        assert!(matches!(
            file.unlock(b"wrong"),
            Err(Error::WrongPassphrase { .. })
        ));
    }

    #[test]
    fn cache_round_trip_and_passphrase_binding() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KeyCache::new(dir.path().join("c"));
        let (_, key) = KeyFile::create(b"pw", 1024, 1).unwrap();
        let id = hex::encode(key.id);
        assert!(cache.get(&id, b"pw").is_none());
        cache.put(&key, b"pw");
        assert_eq!(cache.get(&id, b"pw").unwrap().key, key.key);
        assert!(cache.get(&id, b"other").is_none());
    }
}
