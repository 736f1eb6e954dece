//! One object re-encrypted under the current key (`key retire`): the stored
//! object is decoded and verified as it streams, re-sealed with its own
//! compression, frame size and binding, written beside the original
//! (`Storage::replace_checked`), read back and decoded entirely, and only
//! when the plaintext's SHA-256 and length match does it replace the
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
        if sha != want.sha256 || len != want.plain_len {
            return Err(Error::Corrupt {
                key: key.into(),
                reason: format!(
                    "the re-sealed copy reads back as {len} bytes with SHA-256 {}, not the original's {} bytes with {}; the original was kept",
                    hex::encode(sha),
                    want.plain_len,
                    hex::encode(want.sha256)
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
