//! Bundles: many small files stored as one object, `backups/<id>/bundle/<n>`
//! (docs/repository-format.md, "Bundles"). The plaintext is the files'
//! bytes one after the other, nothing else; a manifest entry names the
//! bundle and the `offset` where its `size` bytes start. A cluster of
//! 100,000 small relations is then a few dozen objects (PUTs, GETs), not
//! 100,000.
//!
//! Both directions stream: the writer holds one file at a time, the reader
//! one file at a time (a bundled file is below `manifest::BUNDLED_MAX`).

use std::io::{self, Read, Write};

use crate::error::{Error, Result};
use crate::manifest::{FileEntry, BUNDLED_MAX};
use crate::repo::Repository;

/// The plaintext of a bundle as a `Read`: the members `next` returns, one
/// after the other. `next` gives the bytes of the next file to store, or
/// None at the end (files it decides not to store are never seen here);
/// `offsets` records where each one starts. An error of `next` stops the
/// stream and is kept for `finish`.
pub struct Packer<F> {
    next: F,
    buf: Vec<u8>,
    pos: usize,
    total: u64,
    offsets: Vec<u64>,
    primed: bool,
    done: bool,
    error: Option<Error>,
}

impl<F: FnMut() -> Result<Option<Vec<u8>>>> Packer<F> {
    pub fn new(next: F) -> Self {
        Packer {
            next,
            buf: Vec::new(),
            pos: 0,
            total: 0,
            offsets: Vec::new(),
            primed: false,
            done: false,
            error: None,
        }
    }

    fn advance(&mut self) -> Result<bool> {
        if self.done {
            return Ok(false);
        }
        match (self.next)()? {
            Some(body) => {
                self.offsets.push(self.total);
                self.total += body.len() as u64;
                self.buf = body;
                self.pos = 0;
                Ok(true)
            }
            None => {
                self.done = true;
                Ok(false)
            }
        }
    }

    /// Loads the first member: false if there is none (a group of files
    /// that all refer to earlier backups writes no object).
    pub fn prime(&mut self) -> Result<bool> {
        if !self.primed {
            self.primed = true;
            return self.advance();
        }
        Ok(!self.offsets.is_empty())
    }

    /// Where each member starts, in the order `next` returned them, and
    /// the plaintext's length; or the error that stopped the stream.
    pub fn finish(mut self) -> Result<(Vec<u64>, u64)> {
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok((self.offsets, self.total)),
        }
    }

    /// The error of `next`, if the stream stopped on one.
    pub fn take_error(&mut self) -> Option<Error> {
        self.error.take()
    }
}

impl<F: FnMut() -> Result<Option<Vec<u8>>>> Read for Packer<F> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        self.primed = true;
        while self.pos == self.buf.len() {
            match self.advance() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => {
                    let msg = e.to_string();
                    self.error = Some(e);
                    self.done = true;
                    return Err(io::Error::other(msg));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Cuts the decoded plaintext of bundle `key` into the files of `entries`
/// (sorted by offset): bytes no entry names are skipped, each file is
/// collected (at most BUNDLED_MAX bytes), checked against its size and
/// hash, then handed to `each`.
struct Splitter<'a, 'b> {
    key: &'a str,
    entries: &'a [&'a FileEntry],
    idx: usize,
    pos: u64,
    buf: Vec<u8>,
    each: &'b mut dyn FnMut(&FileEntry, &[u8]) -> Result<()>,
    error: Option<Error>,
}

impl Splitter<'_, '_> {
    fn corrupt(&self, reason: String) -> Error {
        Error::Corrupt {
            key: self.key.to_string(),
            reason,
        }
    }

    /// Consumes `data` (empty: only completes files that need no more bytes).
    fn feed(&mut self, mut data: &[u8]) -> Result<()> {
        while let Some(e) = self.entries.get(self.idx) {
            let off = e.offset.unwrap_or(0);
            if self.pos < off {
                if data.is_empty() {
                    return Ok(());
                }
                let skip = (off - self.pos).min(data.len() as u64);
                data = &data[skip as usize..];
                self.pos += skip;
                continue;
            }
            // Entries never share bytes: a writer appends each file once.
            if self.pos - off != self.buf.len() as u64 {
                return Err(self.corrupt(format!(
                    "file {} at offset {off} overlaps the file before it",
                    e.path
                )));
            }
            let need = (off + e.size - self.pos) as usize;
            if need > 0 {
                if data.is_empty() {
                    return Ok(());
                }
                let take = need.min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                self.pos += take as u64;
                if take < need {
                    continue;
                }
            }
            // With the entry's own algorithm (an older manifest's SHA-256).
            let h = e.hash_alg().digest(&self.buf);
            if !e.hash_is(&h) {
                return Err(self.corrupt(format!(
                    "the {} bytes of {} at offset {off} have {h}, not the manifest's {}",
                    e.size,
                    e.path,
                    e.hash_text()
                )));
            }
            (self.each)(e, &self.buf)?;
            self.buf.clear();
            self.idx += 1;
        }
        // Past the last file wanted: the rest is only decoded (and verified).
        self.pos += data.len() as u64;
        Ok(())
    }
}

impl Write for Splitter<'_, '_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Err(e) = self.feed(data) {
            let msg = e.to_string();
            self.error = Some(e);
            return Err(io::Error::other(msg));
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads bundle `key` once, front to back, and hands each file of
/// `entries` (bundled entries naming `key`, in any order) to `each` with
/// its bytes, checked against the entry's size and hash. The whole
/// object is decoded and verified (frames, final hash). A plaintext that
/// ends before a file's end, or files that overlap, are `Corrupt` naming
/// the bundle. `sealed_by` as in `Repository::read_object_sealed`.
pub fn unpack(
    repo: &Repository,
    key: &str,
    entries: &[&FileEntry],
    sealed_by: &mut Option<[u8; 16]>,
    each: &mut dyn FnMut(&FileEntry, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut sorted: Vec<&FileEntry> = entries.to_vec();
    sorted.sort_by_key(|e| (e.offset, e.size));
    for e in &sorted {
        // Checked by Manifest::validate too; here it bounds the buffer.
        let end = e.offset.and_then(|o| o.checked_add(e.size));
        if *e.object != *key || end.is_none() || e.size >= BUNDLED_MAX {
            return Err(Error::Corrupt {
                key: key.to_string(),
                reason: format!(
                    "file {} is not a small file of this bundle (size {}, offset {:?})",
                    e.path, e.size, e.offset
                ),
            });
        }
    }
    let mut sink = Splitter {
        key,
        entries: &sorted,
        idx: 0,
        pos: 0,
        buf: Vec::new(),
        each,
        error: None,
    };
    let read = repo.read_object_sealed(key, &mut sink, 1, sealed_by);
    if let Some(e) = sink.error.take() {
        return Err(e);
    }
    read?;
    sink.feed(&[])?;
    if let Some(e) = sorted.get(sink.idx) {
        return Err(Error::Corrupt {
            key: key.to_string(),
            reason: format!(
                "its plaintext ends at {} bytes, before the end of file {} (offset {}, {} bytes)",
                sink.pos,
                e.path,
                e.offset.unwrap_or(0),
                e.size
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout;
    use crate::repo::test_support::posix_repo;

    const ID: &str = "20261121-224754F";

    fn entry(path: &str, body: &[u8], offset: u64) -> FileEntry {
        FileEntry {
            path: path.into(),
            size: body.len() as u64,
            mtime: 0,
            mode: 0o600,
            hash: crate::codec::HashAlg::Blake3.digest(body),
            object: layout::backup_bundle(ID, 1).into(),
            deltas: Box::default(),
            maps: Box::default(),
            offset: Some(offset),
            stored_size: 0,
        }
    }

    #[test]
    fn pack_and_unpack() {
        let dir = tempfile::tempdir().unwrap();
        let (_cfg, repo) = posix_repo(dir.path(), 42);
        let key = layout::backup_bundle(ID, 1);
        // Members across frame boundaries (128 KiB frames), an empty one.
        let bodies: Vec<Vec<u8>> = vec![
            vec![1u8; 100_000],
            Vec::new(),
            (0..120_000u32).map(|i| (i % 251) as u8).collect(),
            vec![7u8; 5],
            vec![9u8; 131_071],
        ];
        let mut it = bodies.clone().into_iter();
        let mut packer = Packer::new(|| Ok(it.next()));
        assert!(packer.prime().unwrap());
        repo.put_object(&key, &mut packer).unwrap();
        let (offsets, total) = packer.finish().unwrap();
        assert_eq!(total, bodies.iter().map(|b| b.len() as u64).sum::<u64>());
        let entries: Vec<FileEntry> = bodies
            .iter()
            .zip(&offsets)
            .enumerate()
            .map(|(i, (b, o))| entry(&format!("base/5/{i}"), b, *o))
            .collect();
        // All, in reverse order: handed over in offset order.
        let all: Vec<&FileEntry> = entries.iter().rev().collect();
        let mut got = Vec::new();
        unpack(&repo, &key, &all, &mut None, &mut |e, b| {
            got.push((e.path.clone(), b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(got.len(), bodies.len());
        for (i, (p, b)) in got.iter().enumerate() {
            assert_eq!(*p, format!("base/5/{i}"));
            assert_eq!(*b, bodies[i]);
        }
        // Some: the others are skipped.
        let some = vec![&entries[1], &entries[3]];
        let mut n = 0;
        unpack(&repo, &key, &some, &mut None, &mut |e, b| {
            assert_eq!(b.len() as u64, e.size);
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 2);

        // Damage, each refused as Corrupt naming the bundle, never a panic.
        let refused = |e: FileEntry| {
            let r = unpack(&repo, &key, &[&e], &mut None, &mut |_, _| Ok(()));
            match r {
                Err(Error::Corrupt { key: k, reason }) => {
                    assert_eq!(k, key);
                    reason
                }
                other => panic!("not refused: {other:?}"),
            }
        };
        let mut past = entries[4].clone();
        past.offset = Some(total - 10);
        assert!(refused(past).contains("ends at"));
        let mut far = entries[3].clone();
        far.offset = Some(u64::MAX - 10);
        refused(far);
        let mut shifted = entries[3].clone();
        shifted.offset = Some(offsets[3] + 1);
        assert!(refused(shifted).contains("BLAKE3"));
        // An entry of an older manifest is checked with its SHA-256, and a
        // hash of the other algorithm never passes for it.
        let mut old = entries[2].clone();
        old.set_hash(&crate::codec::HashAlg::Sha256.digest(&bodies[2]));
        unpack(&repo, &key, &[&old], &mut None, &mut |_, _| Ok(())).unwrap();
        old.hash.bytes = entries[2].hash.bytes;
        assert!(refused(old).contains("SHA-256"));
        let mut big = entries[0].clone();
        big.size = BUNDLED_MAX;
        refused(big);
        let overlap = [&entries[0], &{
            let mut e = entries[0].clone();
            e.offset = Some(10);
            e
        }];
        let r = unpack(&repo, &key, &overlap, &mut None, &mut |_, _| Ok(()));
        assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
        // An error of the callback is returned as it is.
        let r = unpack(&repo, &key, &all, &mut None, &mut |_, _| {
            Err(Error::Invalid("stop".into()))
        });
        assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");

        // A member source that fails: the error comes back from finish.
        let mut fails = Packer::new(|| Err(Error::Invalid("gone".into())));
        assert!(repo
            .put_object(&layout::backup_bundle(ID, 2), &mut fails)
            .is_err());
        assert!(matches!(fails.take_error(), Some(Error::Invalid(_))));
        // Nothing to store: no member.
        let mut empty = Packer::new(|| Ok(None));
        assert!(!empty.prime().unwrap());
    }
}
