//! Key management. A repository holds one or more data keys, each wrapped
//! (AES-256-GCM) by a key-encryption key derived from the passphrase with
//! Argon2id. Objects name the data key that sealed them, so passphrases can
//! be changed (re-wrap) and data keys rotated (new objects use the newest
//! key) without rewriting stored data.
//!
//! A key file (version 3) holds 1 to [`MAX_KEY_SLOTS`] slots, each wrapping
//! the same data key under one passphrase (like LUKS key slots): a
//! passphrase change first adds a slot for the new passphrase, then removes
//! the old one, so that every moment of it leaves the file openable by the
//! old or the new passphrase. Version 2 files (one wrapping) are still read,
//! as one slot.
//!
//! Key files are read back from the repository and so are untrusted: their
//! size, name and Argon2 costs are checked before anything is derived
//! ([`KeyFile::parse`]), so a planted key file costs at most a bounded KDF
//! run and an error, never an abort or an unbounded stall.
//!
//! Argon2id is deliberately slow; archive-push runs once per WAL segment, so
//! the unwrapped key may be cached on the database host (see [`KeyCache`]).
//! Every key and key-encryption key is wiped from memory when dropped, and
//! so are the AES round keys made from them (the `aes` crate's zeroize
//! feature); GHASH's subkey (AES of zero under the key, which does not give
//! the key back) is not.

use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::codec::DataKey;
use crate::error::{Error, Result};

/// Argon2id cost: 64 MiB, 3 passes (above the OWASP minimum); stored per key
/// file so that later keys may use other costs.
pub const DEFAULT_KDF_MEMORY_KIB: u32 = 64 * 1024;
pub const DEFAULT_KDF_ITERATIONS: u32 = 3;
/// Bounds on the Argon2 costs a key file may ask for. A key file is
/// repository content: without bounds a planted one could make every command
/// allocate 4 TiB (abort) or run for hours. 8 MiB is well below any sane
/// setting; 512 MiB and 512 MiB·passes in all (2.7 times the default's
/// work) keep the worst case to about a second here and memory any database
/// host has (measured: 1 GiB took 2.5 s in the fuzz campaign).
pub const MIN_KDF_MEMORY_KIB: u32 = 8 * 1024;
pub const MAX_KDF_MEMORY_KIB: u32 = 512 * 1024;
pub const MAX_KDF_ITERATIONS: u32 = 64;
pub const MAX_KDF_PARALLELISM: u32 = 64;
const MAX_KDF_WORK_KIB: u64 = 512 * 1024;
const MIN_SALT_LEN: usize = 16;
const MAX_SALT_LEN: usize = 64;
/// A key file is a few hundred bytes; anything larger is not one.
pub const MAX_KEY_FILE_LEN: usize = 16 << 10;

/// The longest a long-running writer (`wal-receive`) seals with the key it
/// opened without looking whether repository.json still names it.
pub const KEY_CHECK_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// The least `key retire` waits after a rotation before it deletes the
/// replaced key's file, whatever `[encryption] retire_settle` says: twice
/// `KEY_CHECK_MAX`, so a receiver that looked just before the rotation has
/// looked again, and a write it began then has landed, before the last census.
pub const RETIRE_SETTLE_MIN_S: u64 = 2 * KEY_CHECK_MAX.as_secs();
/// The version written: slots (version 2, one wrapping, is still read).
pub const KEY_FILE_VERSION: u32 = 3;
/// The version before slots: read as a file of one slot, never written.
pub const KEY_FILE_VERSION_V2: u32 = 2;
/// At most this many wrappings per key file: bounds the Argon2 runs of a
/// wrong passphrase (one per slot, each within the cost bounds above) and
/// leaves room for a change in progress on several hosts (`--keep-old`).
pub const MAX_KEY_SLOTS: usize = 4;
/// A new passphrase must be at least this long (as `repo-init` asks).
pub const MIN_PASSPHRASE_LEN: usize = 12;
/// A passphrase file or line bigger than this is a mistake, not a passphrase.
pub const MAX_PASSPHRASE_LEN: usize = 64 << 10;

/// `[encryption] mode`: whether this host requires the repository to be
/// encrypted. The local configuration decides, never the repository.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum EncryptionMode {
    /// Every object must be sealed by a repository key.
    #[default]
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// Unencrypted repository: protects against accidents only.
    #[serde(rename = "none")]
    None,
}

impl EncryptionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EncryptionMode::Aes256Gcm => "aes-256-gcm",
            EncryptionMode::None => "none",
        }
    }
}

impl std::str::FromStr for EncryptionMode {
    type Err = ();
    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        match s {
            "aes-256-gcm" => Ok(EncryptionMode::Aes256Gcm),
            "none" => Ok(EncryptionMode::None),
            _ => Err(()),
        }
    }
}

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

/// One wrapping of a key file's data key under one passphrase.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySlot {
    pub kdf: KdfParams,
    pub wrapped: WrappedKey,
}

/// `keys/<key_id>.json` in the repository. In memory a version 2 file is a
/// file of one slot (its `kdf` and `wrapped`); it is written back only as
/// version 3 ([`KeyFile::with_slot_for`] converts it).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "RawKeyFile", into = "RawKeyFile")]
pub struct KeyFile {
    pub version: u32,
    pub key_id: String,
    pub created_at: String,
    /// In the order they were added: the last is the newest.
    pub slots: Vec<KeySlot>,
}

/// The JSON of both versions: v2 has `kdf` and `wrapped`, v3 `slots`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyFile {
    version: u32,
    key_id: String,
    created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kdf: Option<KdfParams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wrapped: Option<WrappedKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slots: Option<Vec<KeySlot>>,
}

impl TryFrom<RawKeyFile> for KeyFile {
    type Error = String;
    fn try_from(r: RawKeyFile) -> std::result::Result<KeyFile, String> {
        let slots = match (r.version, r.kdf, r.wrapped, r.slots) {
            (KEY_FILE_VERSION_V2, Some(kdf), Some(wrapped), None) => vec![KeySlot { kdf, wrapped }],
            (KEY_FILE_VERSION, None, None, Some(slots)) => slots,
            (KEY_FILE_VERSION_V2 | KEY_FILE_VERSION, ..) => {
                return Err(format!(
                    "a version {} key file has {}",
                    r.version,
                    if r.version == KEY_FILE_VERSION {
                        "\"slots\" and no \"kdf\" or \"wrapped\""
                    } else {
                        "\"kdf\" and \"wrapped\" and no \"slots\""
                    }
                ))
            }
            (v, ..) => {
                return Err(format!(
                    "key file version {v} is not {KEY_FILE_VERSION_V2} or {KEY_FILE_VERSION}, the ones this walshipper reads"
                ))
            }
        };
        Ok(KeyFile {
            version: r.version,
            key_id: r.key_id,
            created_at: r.created_at,
            slots,
        })
    }
}

impl From<KeyFile> for RawKeyFile {
    fn from(f: KeyFile) -> RawKeyFile {
        let mut r = RawKeyFile {
            version: f.version,
            key_id: f.key_id,
            created_at: f.created_at,
            kdf: None,
            wrapped: None,
            slots: None,
        };
        match (f.version, f.slots.as_slice()) {
            (KEY_FILE_VERSION_V2, [one]) => {
                r.kdf = Some(one.kdf.clone());
                r.wrapped = Some(one.wrapped.clone());
            }
            _ => r.slots = Some(f.slots),
        }
        r
    }
}

pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)
        .map_err(|e| Error::Repository(format!("no random numbers from the OS: {e}")))?;
    Ok(b)
}

pub(crate) fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl KdfParams {
    /// Refuses costs outside the bounds before Argon2 allocates anything.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.algorithm != "argon2id" {
            return Err(format!(
                "unsupported key derivation {:?} (only argon2id)",
                self.algorithm
            ));
        }
        if !(MIN_KDF_MEMORY_KIB..=MAX_KDF_MEMORY_KIB).contains(&self.memory_kib) {
            return Err(format!(
                "Argon2 memory cost {} KiB is outside {MIN_KDF_MEMORY_KIB}..={MAX_KDF_MEMORY_KIB} KiB",
                self.memory_kib
            ));
        }
        if !(1..=MAX_KDF_ITERATIONS).contains(&self.iterations) {
            return Err(format!(
                "Argon2 iterations {} outside 1..={MAX_KDF_ITERATIONS}",
                self.iterations
            ));
        }
        if !(1..=MAX_KDF_PARALLELISM).contains(&self.parallelism) {
            return Err(format!(
                "Argon2 parallelism {} outside 1..={MAX_KDF_PARALLELISM}",
                self.parallelism
            ));
        }
        if u64::from(self.memory_kib) * u64::from(self.iterations) > MAX_KDF_WORK_KIB {
            return Err(format!(
                "Argon2 cost {} KiB x {} passes exceeds {} GiB·passes",
                self.memory_kib,
                self.iterations,
                MAX_KDF_WORK_KIB >> 20
            ));
        }
        let n = self.salt.len() / 2;
        if !self.salt.len().is_multiple_of(2)
            || !(MIN_SALT_LEN..=MAX_SALT_LEN).contains(&n)
            || !is_lower_hex(&self.salt, self.salt.len())
        {
            return Err(format!(
                "salt must be {MIN_SALT_LEN} to {MAX_SALT_LEN} bytes in lowercase hex"
            ));
        }
        Ok(())
    }
}

fn argon2_kek(passphrase: &[u8], p: &KdfParams) -> Result<Zeroizing<[u8; 32]>> {
    p.check()
        .map_err(|e| Error::Repository(format!("key file: {e}")))?;
    let salt = hex::decode(&p.salt).map_err(|_| Error::Repository("key file: bad salt".into()))?;
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.parallelism, Some(32))
        .map_err(|e| Error::Repository(format!("key file: bad Argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, &salt, &mut out[..])
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

impl WrappedKey {
    /// 12-byte nonce, 32-byte key + 16-byte tag, lowercase hex.
    fn check(&self) -> std::result::Result<(), String> {
        if self.algorithm != "aes-256-gcm" {
            return Err(format!("unsupported key wrapping {:?}", self.algorithm));
        }
        if !is_lower_hex(&self.nonce, 24) || !is_lower_hex(&self.ciphertext, 96) {
            return Err(
                "wrapped key: nonce must be 12 bytes and ciphertext 48 bytes in hex".into(),
            );
        }
        Ok(())
    }
}

/// None when the tag does not verify (wrong passphrase or tampered file).
fn open(kek: &[u8; 32], aad: &[u8], w: &WrappedKey) -> Result<Option<[u8; 32]>> {
    let bad = || Error::Repository("key file is malformed".into());
    w.check().map_err(|_| bad())?;
    let nonce = hex::decode(&w.nonce).map_err(|_| bad())?;
    let ct = hex::decode(&w.ciphertext).map_err(|_| bad())?;
    let c = Aes256Gcm::new_from_slice(kek).map_err(|_| bad())?;
    match c.decrypt(Nonce::from_slice(&nonce), Payload { msg: &ct, aad }) {
        Ok(p) => {
            let p = Zeroizing::new(p);
            let k: [u8; 32] = p[..].try_into().map_err(|_| bad())?;
            Ok(Some(k))
        }
        Err(_) => Ok(None),
    }
}

/// New Argon2id parameters with a fresh salt, checked against the bounds.
fn new_kdf(memory_kib: u32, iterations: u32) -> Result<KdfParams> {
    let kdf = KdfParams {
        algorithm: "argon2id".into(),
        memory_kib,
        iterations,
        parallelism: 1,
        salt: hex::encode(random::<16>()?),
    };
    kdf.check().map_err(|e| {
        Error::Invalid(format!(
            "{e} (choose --kdf-memory-kib and --kdf-iterations within these bounds)"
        ))
    })?;
    Ok(kdf)
}

impl KeyFile {
    /// A new random data key wrapped by `passphrase` (version 3, one slot).
    pub fn create(
        passphrase: &[u8],
        memory_kib: u32,
        iterations: u32,
    ) -> Result<(KeyFile, DataKey)> {
        let id = random::<16>()?;
        let key = DataKey {
            id,
            key: random::<32>()?,
        };
        let mut file = KeyFile {
            version: KEY_FILE_VERSION,
            key_id: hex::encode(id),
            created_at: chrono::Utc::now().to_rfc3339(),
            slots: Vec::new(),
        };
        file.push_slot(&key, passphrase, memory_kib, iterations)?;
        Ok((file, key))
    }

    /// Wraps `key` under `passphrase` in a new last slot (fresh salt).
    fn push_slot(
        &mut self,
        key: &DataKey,
        passphrase: &[u8],
        memory_kib: u32,
        iterations: u32,
    ) -> Result<()> {
        if self.slots.len() >= MAX_KEY_SLOTS {
            return Err(Error::Repository(format!(
                "{} already holds {MAX_KEY_SLOTS} passphrase wrappings, the most a key file may; finish the change in progress first (walshipper key passphrase --finish)",
                crate::layout::key_file(&self.key_id)
            )));
        }
        let kdf = new_kdf(memory_kib, iterations)?;
        let kek = argon2_kek(passphrase, &kdf)?;
        let mut slot = KeySlot {
            kdf,
            wrapped: WrappedKey {
                algorithm: "aes-256-gcm".into(),
                nonce: String::new(),
                ciphertext: String::new(),
            },
        };
        slot.wrapped = seal(&kek, &self.slot_aad(&slot), &key.key)?;
        self.slots.push(slot);
        Ok(())
    }

    /// Parses and checks `keys/<name_id>.json` as read from the repository:
    /// bounded size, known version, the id inside equal to the name, 1 to
    /// [`MAX_KEY_SLOTS`] slots, KDF costs within bounds and wrapped-key
    /// lengths exact. Nothing is derived.
    pub fn parse(name_id: &str, body: &[u8]) -> Result<KeyFile> {
        let key = crate::layout::key_file(name_id);
        // A key file no writer produces is damage (or forgery): no retry
        // mends it, so archive-get stops recovery at once (exit 126).
        let bad = |reason: String| Error::Corrupt {
            key: key.clone(),
            reason,
        };
        if body.len() > MAX_KEY_FILE_LEN {
            return Err(bad(format!(
                "{} bytes; a key file is at most {MAX_KEY_FILE_LEN}",
                body.len()
            )));
        }
        let file: KeyFile =
            serde_json::from_slice(body).map_err(|e| bad(format!("not a key file: {e}")))?;
        if file.key_id != name_id || !is_lower_hex(name_id, 32) {
            return Err(bad(format!(
                "the key id inside ({:.40}) does not match the file name",
                file.key_id
            )));
        }
        if file.created_at.len() > 64
            || chrono::DateTime::parse_from_rfc3339(&file.created_at).is_err()
        {
            return Err(bad(format!(
                "created_at {:.40?} is not an RFC 3339 time",
                file.created_at
            )));
        }
        if !(1..=MAX_KEY_SLOTS).contains(&file.slots.len()) {
            return Err(bad(format!(
                "{} passphrase slots; a key file has 1 to {MAX_KEY_SLOTS}",
                file.slots.len()
            )));
        }
        for s in &file.slots {
            s.kdf.check().map_err(&bad)?;
            s.wrapped.check().map_err(&bad)?;
        }
        Ok(file)
    }

    /// The associated data of one slot's wrapped key: the file's id and
    /// creation time and every other field of the slot, so that no byte of
    /// the file can change without the unwrap failing (a changed cost or
    /// salt already fails, but `created_at` would not) and a slot moved into
    /// another key file does not open. Fields are length-prefixed so that
    /// no two files share an encoding. Version 2 files used the same fields
    /// under their own label.
    fn slot_aad(&self, slot: &KeySlot) -> Vec<u8> {
        let label: &[u8] = if self.version == KEY_FILE_VERSION_V2 {
            b"walshipper key file v2"
        } else {
            b"walshipper key file v3"
        };
        let mut a = label.to_vec();
        let k = &slot.kdf;
        for field in [
            self.key_id.as_bytes(),
            self.created_at.as_bytes(),
            k.algorithm.as_bytes(),
            &k.memory_kib.to_be_bytes(),
            &k.iterations.to_be_bytes(),
            &k.parallelism.to_be_bytes(),
            k.salt.as_bytes(),
            slot.wrapped.algorithm.as_bytes(),
        ] {
            a.extend_from_slice(&(field.len() as u32).to_be_bytes());
            a.extend_from_slice(field);
        }
        a
    }

    pub fn id_bytes(&self) -> Result<[u8; 16]> {
        let v = hex::decode(&self.key_id)
            .map_err(|_| Error::Repository("key file: bad key_id".into()))?;
        v.try_into()
            .map_err(|_| Error::Repository("key file: bad key_id length".into()))
    }

    /// The Argon2 costs (memory KiB, passes) of the newest slot: what a new
    /// wrapping or a new key costs by default.
    pub fn costs(&self) -> (u32, u32) {
        self.slots
            .last()
            .map_or((DEFAULT_KDF_MEMORY_KIB, DEFAULT_KDF_ITERATIONS), |s| {
                (s.kdf.memory_kib, s.kdf.iterations)
            })
    }

    /// Unwraps slot `i` with the passphrase; None if it does not open
    /// (another passphrase, or a tampered slot).
    pub fn unlock_slot(&self, i: usize, passphrase: &[u8]) -> Result<Option<DataKey>> {
        let id = self.id_bytes()?;
        let slot = self
            .slots
            .get(i)
            .ok_or_else(|| Error::Repository(format!("key file: no slot {i}")))?;
        let kek = argon2_kek(passphrase, &slot.kdf)?;
        Ok(open(&kek, &self.slot_aad(slot), &slot.wrapped)?.map(|key| DataKey { id, key }))
    }

    /// The slots `passphrase` opens and the key they hold. Every slot is
    /// tried (at most [`MAX_KEY_SLOTS`] Argon2 runs); two slots that open to
    /// different keys are refused (a forged slot).
    pub fn slots_opened_by(&self, passphrase: &[u8]) -> Result<(Vec<usize>, Option<DataKey>)> {
        let mut opened = Vec::new();
        let mut key: Option<DataKey> = None;
        for i in 0..self.slots.len() {
            if let Some(k) = self.unlock_slot(i, passphrase)? {
                if key.as_ref().is_some_and(|have| have.key != k.key) {
                    return Err(Error::Corrupt {
                        key: crate::layout::key_file(&self.key_id),
                        reason: "two of its slots unwrap to different keys".into(),
                    });
                }
                key = Some(k);
                opened.push(i);
            }
        }
        Ok((opened, key))
    }

    /// Unwraps with the passphrase (the slow path): the first slot it opens,
    /// trying each in turn (at most [`MAX_KEY_SLOTS`] Argon2 runs).
    pub fn unlock(&self, passphrase: &[u8]) -> Result<DataKey> {
        for i in 0..self.slots.len() {
            if let Some(k) = self.unlock_slot(i, passphrase)? {
                return Ok(k);
            }
        }
        Err(Error::WrongPassphrase {
            key_id: self.key_id.clone(),
        })
    }

    /// This file (as version 3) with a new last slot wrapping `key` under
    /// `new_pass`, at the costs of the newest slot. A version 2 file's one
    /// wrapping is re-made as a version 3 slot under `current_pass`, which
    /// must open it (its associated data names version 2). `key` must be
    /// the key this file holds (the caller unwrapped it).
    pub fn with_slot_for(
        &self,
        key: &DataKey,
        current_pass: &[u8],
        new_pass: &[u8],
    ) -> Result<KeyFile> {
        let (m, t) = self.costs();
        let mut f = if self.version == KEY_FILE_VERSION_V2 {
            if self.unlock(current_pass)?.key != key.key {
                return Err(Error::Repository(format!(
                    "{} does not hold the key being re-wrapped",
                    crate::layout::key_file(&self.key_id)
                )));
            }
            let mut f = KeyFile {
                version: KEY_FILE_VERSION,
                key_id: self.key_id.clone(),
                created_at: self.created_at.clone(),
                slots: Vec::new(),
            };
            f.push_slot(key, current_pass, m, t)?;
            f
        } else {
            self.clone()
        };
        f.push_slot(key, new_pass, m, t)?;
        Ok(f)
    }

    /// This file with only the slots in `keep` (indices, kept in order).
    pub fn keeping(&self, keep: &[usize]) -> Result<KeyFile> {
        if keep.is_empty() {
            return Err(Error::Repository(format!(
                "refusing to remove every slot of {}",
                crate::layout::key_file(&self.key_id)
            )));
        }
        let mut f = self.clone();
        f.slots = (0..self.slots.len())
            .filter(|i| keep.contains(i))
            .map(|i| self.slots[i].clone())
            .collect();
        Ok(f)
    }
}

/// Where the cache's host secret lives: a RAM-backed tmpfs, so it is never
/// on disk, in a file-level backup of the host, or in the cache directory.
const HOST_SECRET_BASE: &str = "/dev/shm";
const HOST_SECRET_FILE: &str = "key-cache.secret";

/// A host-local cache of unwrapped data keys, so that archive-push does not
/// run Argon2 (64 MiB, ~100 ms) once per segment.
///
/// An entry is sealed (AES-256-GCM) under HKDF(host secret || passphrase).
/// Before, HKDF of the passphrase alone protected it: whoever copied the cache
/// directory (a backup of $HOME, a support bundle) could test passphrase
/// guesses at HKDF speed, far faster than against the Argon2-wrapped key file.
/// The host secret is 32 random bytes in `/dev/shm/walshipper-<uid>/` (tmpfs,
/// 0700/0600, owner checked, never followed through a symlink): it is not on
/// disk, so a copy of the cache alone gives a 256-bit unknown to guess, not
/// the passphrase. It vanishes at reboot; the next command then runs Argon2
/// once and re-caches. Cost per archive-push: one 32-byte read from tmpfs
/// (microseconds), against several ms for even a small Argon2 per push,
/// which the archive-push speed target (median ≤ 30 ms) cannot afford.
/// Whoever can read this user's tmpfs and the passphrase file can unwrap the
/// keys anyway, so the cache adds nothing for them.
/// A cache entry that does not open is ignored (the key file is used).
pub struct KeyCache {
    dir: PathBuf,
    secret_base: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct CacheEntry {
    salt: String,
    wrapped: WrappedKey,
}

impl KeyCache {
    pub fn new(dir: PathBuf) -> KeyCache {
        KeyCache {
            dir,
            secret_base: PathBuf::from(HOST_SECRET_BASE),
        }
    }

    #[cfg(test)]
    fn with_secret_base(dir: PathBuf, secret_base: PathBuf) -> KeyCache {
        KeyCache { dir, secret_base }
    }

    /// The host secret, created on first use.
    fn host_secret(&self) -> Result<Zeroizing<[u8; 32]>> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let uid = crate::private_dir::euid();
        let dir = self.secret_base.join(format!("walshipper-{uid}"));
        let found = crate::private_dir::make(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        // Someone else's directory (or a symlink to one) is not ours to trust.
        if !found.is_private() {
            return Err(Error::Config(format!(
                "{} is not a private directory of this user ({found}); not caching keys",
                dir.display()
            )));
        }
        let path = dir.join(HOST_SECRET_FILE);
        let read = |path: &Path| -> std::io::Result<Zeroizing<[u8; 32]>> {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)?;
            let m = f.metadata()?;
            if !m.is_file() || m.uid() != uid || m.mode() & 0o077 != 0 || m.len() != 32 {
                return Err(std::io::Error::other("not a private 32-byte file"));
            }
            let mut s = Zeroizing::new([0u8; 32]);
            std::io::Read::read_exact(&mut f, &mut s[..])?;
            Ok(s)
        };
        match read(&path) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("key cache secret {}", path.display()), e)),
        }
        // Written whole under a temporary name, then linked: a concurrent
        // creator either wins (we read theirs) or loses (they read ours).
        let secret = Zeroizing::new(random::<32>()?);
        let tmp = dir.join(format!(".{HOST_SECRET_FILE}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            std::io::Write::write_all(&mut f, &secret[..])?;
            match std::fs::hard_link(&tmp, &path) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                _ => Ok(()),
            }
        })();
        let _ = std::fs::remove_file(&tmp);
        written.map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        read(&path).map_err(|e| Error::io(format!("key cache secret {}", path.display()), e))
    }

    fn kek(host_secret: &[u8; 32], passphrase: &[u8], salt: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        let mut ikm = Zeroizing::new(Vec::with_capacity(32 + passphrase.len()));
        ikm.extend_from_slice(host_secret);
        ikm.extend_from_slice(passphrase);
        let mut k = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(salt), &ikm)
            .expand(b"walshipper key cache v2", &mut k[..])
            .map_err(|_| Error::Repository("key cache derivation failed".into()))?;
        Ok(k)
    }

    fn path(&self, key_id: &str) -> PathBuf {
        self.dir.join(format!("{key_id}.key"))
    }

    pub fn get(&self, key_id: &str, passphrase: &[u8]) -> Option<DataKey> {
        if !is_lower_hex(key_id, 32) {
            return None;
        }
        let text = std::fs::read(self.path(key_id)).ok()?;
        if text.len() > MAX_KEY_FILE_LEN {
            return None;
        }
        let entry: CacheEntry = serde_json::from_slice(&text).ok()?;
        let salt = hex::decode(&entry.salt).ok()?;
        let id: [u8; 16] = hex::decode(key_id).ok()?.try_into().ok()?;
        let secret = self
            .host_secret()
            .map_err(|e| tracing::debug!("key cache not used: {e}"))
            .ok()?;
        let kek = Self::kek(&secret, passphrase, &salt).ok()?;
        let key = open(&kek, &id, &entry.wrapped).ok()??;
        Some(DataKey { id, key })
    }

    /// Forgets a key (`key retire`): best effort, nothing else depends on it.
    pub fn remove(&self, key_id: &str) {
        if is_lower_hex(key_id, 32) {
            let _ = std::fs::remove_file(self.path(key_id));
        }
    }

    /// Best effort: a cache that cannot be written only costs speed.
    pub fn put(&self, key: &DataKey, passphrase: &[u8]) {
        if let Err(e) = self.try_put(key, passphrase) {
            tracing::debug!("key cache not written in {}: {e}", self.dir.display());
        }
    }

    fn try_put(&self, key: &DataKey, passphrase: &[u8]) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| Error::io("create key cache dir", e))?;
        // The configured directory may be reached through a symlink; what it
        // leads to must be this user's alone.
        let meta = std::fs::metadata(&self.dir).map_err(|e| Error::io("key cache dir", e))?;
        let found = crate::private_dir::Found::of(&meta);
        if !found.is_private() {
            // Every call then runs Argon2 (about 100 ms): say so once.
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "key cache directory {} is not this user's alone ({found}): keys are not cached, \
                     and each command unlocks its key from the passphrase (chown it to this user, chmod 0700)",
                    self.dir.display()
                )
            });
            return Err(Error::Config(format!(
                "key cache directory {} is not this user's alone ({found}); not caching",
                self.dir.display()
            )));
        }
        let secret = self.host_secret()?;
        let salt = random::<16>()?;
        let kek = Self::kek(&secret, passphrase, &salt)?;
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

/// The configured passphrase file was never capped: a bound for memory,
/// far above any passphrase, not a judgement of one.
const PASSPHRASE_FILE_MAX: u64 = 1 << 20;

/// Reads the configured passphrase file: it must exist and be private
/// (`config::check_private`), which is checked on the file opened and read
/// from it (never stat'ed by path and opened again); trailing newline
/// dropped.
pub fn read_passphrase_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let cannot = |e: std::io::Error| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => " (create it with a long random passphrase, mode 0600, or set WALSHIPPER_PASSPHRASE)",
            _ => "",
        };
        Error::Config(format!(
            "encryption.passphrase_file {}: {e}{hint}",
            path.display()
        ))
    };
    // O_NONBLOCK: a FIFO put there must not hang the archiver at open.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot)?;
    let meta = f.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(Error::Config(format!(
            "encryption.passphrase_file {} is not a regular file (for a passphrase a program prints, set passphrase_command)",
            path.display()
        )));
    }
    crate::config::check_private(path, meta.permissions().mode(), "holds the passphrase")?;
    let len = meta.len();
    if len > PASSPHRASE_FILE_MAX {
        return Err(Error::Config(format!(
            "encryption.passphrase_file {} is {len} bytes: not a passphrase",
            path.display()
        )));
    }
    // Room for all of it at once (a growing buffer would leave copies of
    // the passphrase behind, unwiped), and one byte to see it grew; at
    // least 64, or read_to_end would read a short file through a buffer
    // on the stack first.
    let mut p = Zeroizing::new(Vec::with_capacity((len as usize + 1).max(64)));
    f.take(len + 1).read_to_end(&mut p).map_err(cannot)?;
    if p.len() as u64 > len {
        return Err(Error::Config(format!(
            "encryption.passphrase_file {} changed size while it was read (an ordinary file changed meanwhile: try again; a file of a special file system: set passphrase_command instead)",
            path.display()
        )));
    }
    trim_line_end(&mut p);
    if p.is_empty() {
        return Err(Error::Config(format!(
            "encryption.passphrase_file {} is empty",
            path.display()
        )));
    }
    Ok(p)
}

/// Drops the line end(s) a passphrase file or line ends with, as
/// [`read_passphrase_file`] does: the passphrase is every other byte.
fn trim_line_end(p: &mut Vec<u8>) {
    while p.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        p.pop();
    }
}

/// Reads a NEW passphrase from a file (`key passphrase --new-file`): a
/// regular file private to its owner (no group or other permission bits),
/// at most [`MAX_PASSPHRASE_LEN`] bytes, read as the configured passphrase
/// file is (trailing newlines dropped), so that the same file can later be
/// the configured one. The passphrase never appears in an error.
pub fn read_new_passphrase_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let what = "--new-file";
    let cannot = |e: std::io::Error| Error::Invalid(format!("{what} {}: {e}", path.display()));
    let f = std::fs::File::open(path).map_err(cannot)?;
    let meta = f.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(Error::Invalid(format!(
            "{what} {} is not a regular file",
            path.display()
        )));
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(Error::Invalid(format!(
            "{what} {} is open to group or others (mode {:04o}); a passphrase file must be private: chmod 600 it",
            path.display(),
            mode & 0o7777
        )));
    }
    // Allocated once: a growing buffer would leave copies behind, unwiped.
    let mut p = Zeroizing::new(Vec::with_capacity(MAX_PASSPHRASE_LEN + 1));
    f.take(MAX_PASSPHRASE_LEN as u64 + 1)
        .read_to_end(&mut p)
        .map_err(cannot)?;
    if p.len() > MAX_PASSPHRASE_LEN {
        return Err(Error::Invalid(format!(
            "{what} {} is over {} KiB: not a passphrase",
            path.display(),
            MAX_PASSPHRASE_LEN >> 10
        )));
    }
    trim_line_end(&mut p);
    Ok(p)
}

/// Reads a NEW passphrase as one line from `input` (`--new-stdin`): the
/// bytes up to the first newline, at most [`MAX_PASSPHRASE_LEN`].
pub fn read_passphrase_line(input: &mut dyn std::io::Read) -> Result<Zeroizing<Vec<u8>>> {
    use std::io::Read;
    let mut p = Zeroizing::new(Vec::with_capacity(MAX_PASSPHRASE_LEN + 1));
    let mut byte = Zeroizing::new([0u8; 1]);
    let mut limited = input.take(MAX_PASSPHRASE_LEN as u64 + 1);
    loop {
        match limited.read(&mut byte[..]) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => p.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read the new passphrase from standard input", e)),
        }
    }
    if p.len() > MAX_PASSPHRASE_LEN {
        return Err(Error::Invalid(format!(
            "the new passphrase on standard input is over {} KiB: not a passphrase",
            MAX_PASSPHRASE_LEN >> 10
        )));
    }
    trim_line_end(&mut p);
    Ok(p)
}

/// Checks a new passphrase against the configured one: long enough, and
/// another one. Says nothing of either passphrase but its length bound.
pub fn check_new_passphrase(new: &[u8], configured: &[u8]) -> Result<()> {
    if new.is_empty() {
        return Err(Error::Invalid(
            "the new passphrase is empty (nothing was changed)".into(),
        ));
    }
    if new.len() < MIN_PASSPHRASE_LEN {
        return Err(Error::Invalid(format!(
            "the new passphrase is shorter than {MIN_PASSPHRASE_LEN} characters; use a long random one (e.g. openssl rand -base64 48); nothing was changed"
        )));
    }
    if new == configured {
        return Err(Error::Invalid(
            "the new passphrase is the one the configuration already gives (nothing to change)"
                .into(),
        ));
    }
    Ok(())
}

/// Replaces the passphrase file at `path` with `passphrase` atomically: a
/// private (0600) temporary file in the same directory, written and
/// fsynced, renamed over it, then the directory fsynced. A reader (an
/// archive-push starting meanwhile) reads the old passphrase or the new
/// one, never a part; a crash leaves one of the two and at most a
/// temporary file (removed by the next run).
pub fn replace_passphrase_file(path: &Path, passphrase: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Config(format!("{} is not a file name", path.display())))?;
    let tmp = dir.join(format!(".{}.new-passphrase.tmp", name.to_string_lossy()));
    let ctx = |what: &str| format!("{what} {} (installing the new passphrase)", tmp.display());
    // The new file keeps the old one's owner and group: run as root, it
    // must stay readable by the user walshipper archives as.
    let owner = std::fs::metadata(path).ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        (m.uid(), m.gid())
    });
    // A leftover of a killed run holds a passphrase: replace it, never reuse.
    let _ = std::fs::remove_file(&tmp);
    let written = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| Error::io(ctx("create"), e))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                .map_err(|e| Error::io(ctx("give the owner of the old file to"), e))?;
        }
        f.write_all(passphrase)
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(ctx("write"), e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(ctx("rename"), e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unlock_and_wrong_passphrase() {
        let (file, key) = KeyFile::create(b"correct horse", MIN_KDF_MEMORY_KIB, 1).unwrap();
        assert_eq!(file.unlock(b"correct horse").unwrap().key, key.key);
        assert!(matches!(
            file.unlock(b"wrong"),
            Err(Error::WrongPassphrase { .. })
        ));
    }

    fn file_json(memory_kib: u32, iterations: u32) -> (String, serde_json::Value) {
        let (file, _) = KeyFile::create(b"pw", MIN_KDF_MEMORY_KIB, 1).unwrap();
        let mut v = serde_json::to_value(&file).unwrap();
        v["slots"][0]["kdf"]["memory_kib"] = memory_kib.into();
        v["slots"][0]["kdf"]["iterations"] = iterations.into();
        (file.key_id, v)
    }

    #[test]
    fn key_file_costs_are_bounded_before_derivation() {
        for (m, t) in [
            (u32::MAX, 1),
            (MAX_KDF_MEMORY_KIB + 1, 1),
            (1024, 1),
            (0, 1),
            (MIN_KDF_MEMORY_KIB, 0),
            (MIN_KDF_MEMORY_KIB, 65),
            (MAX_KDF_MEMORY_KIB, 64),
        ] {
            let (id, v) = file_json(m, t);
            let body = serde_json::to_vec(&v).unwrap();
            let err = KeyFile::parse(&id, &body).unwrap_err().to_string();
            assert!(err.contains("Argon2"), "{m} {t}: {err}");
            // unlock checks too, even on a file that skipped parse.
            let file: KeyFile = serde_json::from_value(v).unwrap();
            assert!(matches!(file.unlock(b"pw"), Err(Error::Repository(_))));
        }
        let (id, mut v) = file_json(MIN_KDF_MEMORY_KIB, 1);
        v["slots"][0]["kdf"]["parallelism"] = 1000.into();
        assert!(KeyFile::parse(&id, &serde_json::to_vec(&v).unwrap()).is_err());
        let (id, mut v) = file_json(MIN_KDF_MEMORY_KIB, 1);
        v["slots"][0]["kdf"]["salt"] = "00".into();
        assert!(KeyFile::parse(&id, &serde_json::to_vec(&v).unwrap()).is_err());
        let (id, mut v) = file_json(MIN_KDF_MEMORY_KIB, 1);
        v["slots"][0]["wrapped"]["ciphertext"] = "00".repeat(4000).into();
        assert!(KeyFile::parse(&id, &serde_json::to_vec(&v).unwrap()).is_err());
        let (id, v) = file_json(MIN_KDF_MEMORY_KIB, 1);
        assert!(KeyFile::parse(&id, &serde_json::to_vec(&v).unwrap()).is_ok());
        // repo-init refuses the same costs with a hint.
        assert!(matches!(
            KeyFile::create(b"pw", 1024, 1),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn every_field_of_a_key_file_is_authenticated() {
        let (file, _) = KeyFile::create(b"pw", MIN_KDF_MEMORY_KIB, 1).unwrap();
        let id = file.key_id.clone();
        let v = serde_json::to_value(&file).unwrap();
        let mut later = v.clone();
        later["created_at"] = "2020-01-01T00:00:00+00:00".into();
        let f = KeyFile::parse(&id, &serde_json::to_vec(&later).unwrap()).unwrap();
        assert!(matches!(
            f.unlock(b"pw"),
            Err(Error::WrongPassphrase { .. })
        ));
        let mut junk = v.clone();
        junk["created_at"] = "yesterday".into();
        assert!(KeyFile::parse(&id, &serde_json::to_vec(&junk).unwrap()).is_err());
        let mut old = v;
        old["version"] = 1.into();
        let err = KeyFile::parse(&id, &serde_json::to_vec(&old).unwrap()).unwrap_err();
        assert!(err.to_string().contains("version 1"), "{err}");
    }

    #[test]
    fn key_file_name_must_match_its_id() {
        let (id, v) = file_json(MIN_KDF_MEMORY_KIB, 1);
        let body = serde_json::to_vec(&v).unwrap();
        let other = "0".repeat(32);
        let err = KeyFile::parse(&other, &body).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        assert!(KeyFile::parse(&id.to_uppercase(), &body).is_err());
        assert!(KeyFile::parse(&id, &vec![b' '; MAX_KEY_FILE_LEN + 1]).is_err());
        assert!(KeyFile::parse(&id, b"{").is_err());
    }

    #[test]
    fn cache_round_trip_passphrase_and_host_secret_binding() {
        let dir = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir().unwrap();
        let cache = KeyCache::with_secret_base(dir.path().join("c"), shm.path().into());
        let (_, key) = KeyFile::create(b"pw", MIN_KDF_MEMORY_KIB, 1).unwrap();
        let id = hex::encode(key.id);
        assert!(cache.get(&id, b"pw").is_none());
        cache.put(&key, b"pw");
        assert_eq!(cache.get(&id, b"pw").unwrap().key, key.key);
        assert!(cache.get(&id, b"other").is_none());
        // The cache directory copied to a host without the secret (or after
        // a reboot) opens with nothing, even with the right passphrase.
        let shm2 = tempfile::tempdir().unwrap();
        let elsewhere = KeyCache::with_secret_base(dir.path().join("c"), shm2.path().into());
        assert!(elsewhere.get(&id, b"pw").is_none());
        // A secret that is not private is not trusted.
        use std::os::unix::fs::PermissionsExt;
        let uid = crate::private_dir::euid();
        let sdir = shm.path().join(format!("walshipper-{uid}"));
        std::fs::set_permissions(&sdir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(cache.get(&id, b"pw").is_none());
    }

    fn reparse(f: &KeyFile) -> KeyFile {
        KeyFile::parse(&f.key_id, &serde_json::to_vec(f).unwrap()).unwrap()
    }

    #[test]
    fn v3_slots_round_trip() {
        let (file, key) = KeyFile::create(b"old passphrase", MIN_KDF_MEMORY_KIB, 1).unwrap();
        let v = serde_json::to_value(&file).unwrap();
        assert_eq!(v["version"], 3);
        assert_eq!(v["slots"].as_array().unwrap().len(), 1);
        assert!(v.get("kdf").is_none() && v.get("wrapped").is_none());
        let both = reparse(
            &file
                .with_slot_for(&key, b"old passphrase", b"new passphrase")
                .unwrap(),
        );
        assert_eq!(both.slots.len(), 2);
        for p in [&b"old passphrase"[..], b"new passphrase"] {
            assert_eq!(both.unlock(p).unwrap().key, key.key);
        }
        assert!(matches!(
            both.unlock(b"wrong passphrase"),
            Err(Error::WrongPassphrase { .. })
        ));
        let (opened, k) = both.slots_opened_by(b"new passphrase").unwrap();
        assert_eq!(opened, vec![1]);
        assert_eq!(k.unwrap().key, key.key);
        let done = reparse(&both.keeping(&opened).unwrap());
        assert_eq!(done.unlock(b"new passphrase").unwrap().key, key.key);
        assert!(matches!(
            done.unlock(b"old passphrase"),
            Err(Error::WrongPassphrase { .. })
        ));
        assert!(both.keeping(&[]).is_err());
        assert_eq!(done.costs(), (MIN_KDF_MEMORY_KIB, 1));
    }

    /// A version 2 file built here from its documented format (not by the
    /// code under test): still read, and converted to version 3 when a slot
    /// is added.
    #[test]
    fn version_2_files_are_still_read() {
        let key = [7u8; 32];
        let id = "0123456789abcdef0123456789abcdef";
        let created = "2026-01-02T03:04:05+00:00";
        let salt = "11".repeat(16);
        let kdf = KdfParams {
            algorithm: "argon2id".into(),
            memory_kib: MIN_KDF_MEMORY_KIB,
            iterations: 1,
            parallelism: 1,
            salt: salt.clone(),
        };
        let mut aad = b"walshipper key file v2".to_vec();
        for f in [
            id.as_bytes(),
            created.as_bytes(),
            b"argon2id",
            &MIN_KDF_MEMORY_KIB.to_be_bytes(),
            &1u32.to_be_bytes(),
            &1u32.to_be_bytes(),
            salt.as_bytes(),
            b"aes-256-gcm",
        ] {
            aad.extend_from_slice(&(f.len() as u32).to_be_bytes());
            aad.extend_from_slice(f);
        }
        let kek = argon2_kek(b"v2 passphrase", &kdf).unwrap();
        let w = seal(&kek, &aad, &key).unwrap();
        let body = serde_json::json!({"version": 2, "key_id": id, "created_at": created,
            "kdf": kdf, "wrapped": w});
        let f = KeyFile::parse(id, &serde_json::to_vec(&body).unwrap()).unwrap();
        assert_eq!(f.version, 2);
        let k = f.unlock(b"v2 passphrase").unwrap();
        assert_eq!(k.key, key);
        assert!(f.unlock(b"another passphrase").is_err());
        // Written back unchanged, it is the same version 2 JSON.
        assert_eq!(serde_json::to_value(&f).unwrap(), body);
        let v3 = reparse(
            &f.with_slot_for(&k, b"v2 passphrase", b"v3 passphrase!")
                .unwrap(),
        );
        assert_eq!(v3.version, 3);
        assert_eq!(v3.created_at, created);
        assert_eq!(v3.slots.len(), 2);
        assert_eq!(v3.unlock(b"v2 passphrase").unwrap().key, key);
        assert_eq!(v3.unlock(b"v3 passphrase!").unwrap().key, key);
        // A version 2 file with slots, a version 3 file with kdf: refused.
        let mut mixed = body.clone();
        mixed["slots"] = serde_json::to_value(&v3.slots).unwrap();
        assert!(KeyFile::parse(id, &serde_json::to_vec(&mixed).unwrap()).is_err());
        let mut mixed = serde_json::to_value(&v3).unwrap();
        mixed["kdf"] = serde_json::to_value(&kdf).unwrap();
        assert!(KeyFile::parse(id, &serde_json::to_vec(&mixed).unwrap()).is_err());
        let mut unknown = serde_json::to_value(&v3).unwrap();
        unknown["slots"][0]["note"] = "x".into();
        assert!(KeyFile::parse(id, &serde_json::to_vec(&unknown).unwrap()).is_err());
    }

    #[test]
    fn a_slot_is_bound_to_its_key_file() {
        let (a, ka) = KeyFile::create(b"passphrase a", MIN_KDF_MEMORY_KIB, 1).unwrap();
        let (b, _) = KeyFile::create(b"passphrase b", MIN_KDF_MEMORY_KIB, 1).unwrap();
        // A's slot moved into B (same passphrase): does not open there.
        let mut moved = b.clone();
        moved.slots.push(a.slots[0].clone());
        let moved = reparse(&moved);
        assert!(matches!(
            moved.unlock(b"passphrase a"),
            Err(Error::WrongPassphrase { .. })
        ));
        // Editing created_at (or a cost, or the salt) breaks every slot.
        let two = a
            .with_slot_for(&ka, b"passphrase a", b"passphrase c")
            .unwrap();
        let mut v = serde_json::to_value(&two).unwrap();
        v["created_at"] = "2020-01-01T00:00:00+00:00".into();
        let edited = KeyFile::parse(&a.key_id, &serde_json::to_vec(&v).unwrap()).unwrap();
        for p in [&b"passphrase a"[..], b"passphrase c"] {
            assert!(matches!(
                edited.unlock(p),
                Err(Error::WrongPassphrase { .. })
            ));
        }
        let mut v = serde_json::to_value(&two).unwrap();
        v["slots"][1]["kdf"]["iterations"] = 2.into();
        let edited = KeyFile::parse(&a.key_id, &serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(edited.unlock(b"passphrase c").is_err());
        assert_eq!(edited.unlock(b"passphrase a").unwrap().key, ka.key);
    }

    #[test]
    fn slot_count_is_bounded() {
        let (mut f, k) = KeyFile::create(b"p0 passphrase", MIN_KDF_MEMORY_KIB, 1).unwrap();
        for i in 1..MAX_KEY_SLOTS {
            f = f
                .with_slot_for(&k, b"unused", format!("p{i} passphrase").as_bytes())
                .unwrap();
        }
        assert_eq!(reparse(&f).slots.len(), MAX_KEY_SLOTS);
        let err = f
            .with_slot_for(&k, b"unused", b"one too many")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--finish"), "{err}");
        let mut v = serde_json::to_value(&f).unwrap();
        let extra = v["slots"][0].clone();
        v["slots"].as_array_mut().unwrap().push(extra);
        let err = KeyFile::parse(&f.key_id, &serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("1 to 4"), "{err}");
        v["slots"] = serde_json::json!([]);
        assert!(KeyFile::parse(&f.key_id, &serde_json::to_vec(&v).unwrap()).is_err());
        // A wrong passphrase costs one Argon2 run per slot, then a clear error.
        assert!(matches!(
            f.unlock(b"none of them"),
            Err(Error::WrongPassphrase { .. })
        ));
        assert_eq!(f.unlock(b"p3 passphrase").unwrap().key, k.key);
    }

    #[test]
    fn new_passphrase_input() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("new");
        std::fs::write(&p, "a new passphrase, long\n").unwrap();
        // Open to others, a passphrase file is refused without being quoted;
        // made private, it reads.
        let private_only = |p: &Path, read: &dyn Fn(&Path) -> Result<Zeroizing<Vec<u8>>>| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o640)).unwrap();
            let err = read(p).unwrap_err().to_string();
            assert!(
                err.contains("(mode 0640)") && err.contains("chmod 600"),
                "{err}"
            );
            assert!(!err.contains("passphrase, long") && !err.contains("installed"));
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
            read(p).unwrap()
        };
        assert_eq!(
            &private_only(&p, &read_new_passphrase_file)[..],
            b"a new passphrase, long"
        );
        assert!(read_new_passphrase_file(dir.path()).is_err());
        assert!(read_new_passphrase_file(&dir.path().join("absent")).is_err());
        let mut input = &b"line one passphrase\r\nline two\n"[..];
        assert_eq!(
            &read_passphrase_line(&mut input).unwrap()[..],
            b"line one passphrase"
        );
        assert!(read_passphrase_line(&mut &b""[..]).unwrap().is_empty());
        assert!(check_new_passphrase(b"", b"old passphrase").is_err());
        assert!(check_new_passphrase(b"short", b"old passphrase").is_err());
        assert!(check_new_passphrase(b"old passphrase", b"old passphrase").is_err());
        assert!(check_new_passphrase(b"new passphrase", b"old passphrase").is_ok());
        // The installed file reads back as the passphrase, private.
        let conf = dir.path().join("passphrase");
        std::fs::write(&conf, "old\n").unwrap();
        replace_passphrase_file(&conf, b"installed passphrase").unwrap();
        assert_eq!(
            &private_only(&conf, &read_passphrase_file)[..],
            b"installed passphrase"
        );
        // Missing, the error says how to make one; not a file, it is refused.
        let e = read_passphrase_file(&dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("create it with a long random passphrase"), "{e}");
        let e = read_passphrase_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let mode = std::fs::metadata(&conf).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
