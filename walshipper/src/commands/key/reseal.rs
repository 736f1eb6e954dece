//! One object re-encrypted under the current key (`key retire`): the stored
//! object is decoded and verified as it streams, re-sealed with its own
//! format version (so its hash algorithm), compression, frame size and
//! binding, written beside the original (`Storage::replace_checked`), read
//! back and decoded entirely, and only when the plaintext's hash and
//! length match does it replace the
//! original. The old key stays in the repository until every object is
//! done, so an object is readable at every moment whichever copy a reader
//! meets.

use std::io::{self, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::codec::{self, Header, Summary};
use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::storage::Pacing;

/// What became of one object.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Re-sealed under the current key; `stored` bytes written.
    Rewritten { stored: u64 },
    /// Not sealed by the key (any more): an earlier run, or a new object.
    NotSealedBy,
    /// Removed since it was listed.
    Gone,
    /// The stored object does not verify: left as it is.
    Damaged(String),
}

/// The object's header: None if it is too short or malformed.
fn header_of(raw: &mut dyn Read) -> io::Result<Option<([u8; codec::HEADER_LEN], Header)>> {
    let mut h = [0u8; codec::HEADER_LEN];
    if codec::read_full(raw, &mut h)? < h.len() {
        return Ok(None);
    }
    Ok(Header::parse(&h).ok().map(|hd| (h, hd)))
}

/// Hands the encoder's summary over once the stream ended.
struct Tail<R> {
    enc: codec::EncodingReader<R>,
    summary: Arc<Mutex<Option<Summary>>>,
}

impl<R: Read> Read for Tail<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.enc.read(buf)?;
        if n == 0 && !buf.is_empty() {
            if let Ok(mut s) = self.summary.lock() {
                *s = Some(self.enc.summary().clone());
            }
        }
        Ok(n)
    }
}

/// Re-seals object `key` if it is sealed by key `old`. `spool`: where a
/// store that needs one keeps its local copy (s3).
pub fn reseal(repo: &Repository, key: &str, old: &[u8; 16], spool: &Path) -> Result<Outcome> {
    let Some(mut raw) = repo.storage.get(key)? else {
        return Ok(Outcome::Gone);
    };
    let (h, header) = match header_of(&mut raw).map_err(|e| Error::Storage {
        op: "read",
        key: key.into(),
        source: e,
    })? {
        Some(x) => x,
        None => return Ok(Outcome::Damaged("its header is unreadable".into())),
    };
    if !header.encrypted || header.key_id != *old {
        return Ok(Outcome::NotSealedBy);
    }
    let summary = Arc::new(Mutex::new(None));
    let mut body = Tail {
        enc: repo.resealer(key, &header, io::Cursor::new(h).chain(raw))?,
        summary: summary.clone(),
    };
    let mut check = |r: &mut dyn Read, _store: bool| -> Result<()> {
        let want: Summary = summary
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| Error::Invalid(format!("{key}: checked before it was written")))?;
        let (sha, len) = repo.check_resealed(key, r)?;
        // Same algorithm too: the copy keeps the original's object version.
        if sha != want.hash || len != want.plain_len {
            return Err(Error::Corrupt {
                key: key.into(),
                reason: format!(
                    "the re-sealed copy reads back as {len} bytes with {sha}, not the original's {} bytes with {}; the original was kept",
                    want.plain_len, want.hash
                ),
            });
        }
        Ok(())
    };
    match repo
        .storage
        .replace_checked(key, &mut body, spool, &mut check, Pacing::NONE)
    {
        Ok(()) => {
            let stored = summary
                .lock()
                .ok()
                .and_then(|s| s.as_ref().map(|s| s.stored_len))
                .unwrap_or(0);
            Ok(Outcome::Rewritten { stored })
        }
        // The original failed to decode while it streamed: damage, not
        // a failure of the store. Nothing was replaced.
        Err(Error::Storage { source, .. }) if codec::codec_error(&source).is_some() => {
            Ok(Outcome::Damaged(source.to_string()))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::keys::KeyFile;

    const SEG: &str = "wal/0000000100000000/000000010000000000000002";

    fn repository(dir: &Path) -> (Config, Repository) {
        crate::repo::test_support::posix_repo(dir, 7_310_000_000_000_000_001)
    }

    /// Re-sealed under the new key with the same plaintext; then not
    /// sealed by the old one any more; a truncated or tampered object is
    /// damage, left as it is; a missing one is gone.
    #[test]
    fn reseal_one_object() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, mut repo) = repository(dir.path());
        let old = repo.current_key().unwrap();
        // Several frames, compressible and not.
        let plain: Vec<u8> = (0..700_000u32)
            .map(|i| if i % 3 == 0 { (i % 251) as u8 } else { 7 })
            .collect();
        repo.put_object(SEG, &plain[..]).unwrap();
        let path = dir.path().join("r").join(SEG);
        let sealed_by_old = std::fs::read(&path).unwrap();
        let pass = cfg.passphrase().unwrap();
        let (file, new) = KeyFile::create(&pass, crate::keys::MIN_KDF_MEMORY_KIB, 1).unwrap();
        repo.add_key_file(&file).unwrap();
        repo.make_current(new.clone()).unwrap();
        let spool = dir.path().join("spool");

        let out = reseal(&repo, SEG, &old.id, &spool).unwrap();
        assert!(
            matches!(out, Outcome::Rewritten { stored } if stored > 64),
            "{out:?}"
        );
        assert_eq!(repo.object_key_id(SEG).unwrap(), Some(new.id));
        assert_eq!(repo.read_object_vec(SEG).unwrap(), plain);
        assert_eq!(
            reseal(&repo, SEG, &old.id, &spool).unwrap(),
            Outcome::NotSealedBy
        );

        // Damage: cut after the first data frame, or one bit flipped.
        let mut cut = sealed_by_old.clone();
        cut.truncate(sealed_by_old.len() / 2);
        let mut flipped = sealed_by_old.clone();
        let at = flipped.len() - 100;
        flipped[at] ^= 1;
        for bad in [cut, flipped] {
            std::fs::write(&path, &bad).unwrap();
            let out = reseal(&repo, SEG, &old.id, &spool).unwrap();
            assert!(matches!(out, Outcome::Damaged(_)), "{out:?}");
            assert_eq!(
                std::fs::read(&path).unwrap(),
                bad,
                "the damaged object changed"
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(reseal(&repo, SEG, &old.id, &spool).unwrap(), Outcome::Gone);
    }
}
