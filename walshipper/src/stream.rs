//! Streamed partial segments: how `wal-receive` keeps the segment it is
//! filling durable before it is complete, and how they are read back
//! (docs/repository-format.md, "Streamed partial segments").
//!
//! Objects are create-if-absent, so a growing segment is a set of chunk
//! objects `stream/<segment>/<start>-<end>`, each holding bytes
//! `start..end` of the segment and sealed to its own name like every object.
//! The readable content is the chain from offset 0: at each offset the chunk
//! starting there that reaches furthest (a merged chunk and the pieces it
//! replaced may both exist after a crash; they hold the same bytes). Once
//! the segment is complete it is stored under its ordinary WAL key and its
//! chunks are deleted.
//!
//! Everything listed and read is untrusted: a key walshipper would not
//! write, a chain with a gap, a chunk whose length is not its name's, more
//! chunks than a writer leaves, or pages whose headers do not belong at
//! their place in this segment of this cluster are refused as damage.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::layout::{self, ObjectName};
use crate::repo::Repository;
use crate::wal::{self, ClusterIdentity};

/// More chunk objects for one segment than a writer ever leaves (it merges
/// them: see `wal_receive`); a listing longer than this is refused before
/// anything is read.
pub const MAX_CHUNKS: usize = 4096;

/// The WAL page size PostgreSQL is built with almost everywhere; the long
/// header of the segment's first page names the real one.
const DEFAULT_PAGE: u64 = 8192;

/// One chunk as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub key: String,
    pub start: u32,
    pub end: u32,
}

/// The readable content of a streamed segment.
pub struct Chain {
    /// Bytes 0..len of the segment.
    pub bytes: Vec<u8>,
    /// The chunks the chain was read from, in order.
    pub used: Vec<Chunk>,
    /// Every chunk listed (including merged-away leftovers).
    pub listed: Vec<Chunk>,
}

fn damaged(key: String, reason: String) -> Error {
    Error::Corrupt {
        key,
        reason: format!("{reason}; move stream/ objects of this segment aside after checking (they are only the not-yet-complete tail of the WAL)"),
    }
}

/// Every chunk of `segment` (a segment file name), validated as keys.
pub fn list_chunks(repo: &Repository, segment: &str) -> Result<Vec<Chunk>> {
    let prefix = layout::stream_prefix(segment);
    let listed = repo.storage.list(&prefix)?;
    if listed.len() > MAX_CHUNKS {
        return Err(damaged(
            prefix,
            format!(
                "{} objects, more than the {MAX_CHUNKS} a receiver ever leaves for one segment",
                listed.len()
            ),
        ));
    }
    let seg_size = repo.descriptor.wal_segment_size;
    let mut out = Vec::with_capacity(listed.len());
    for m in listed {
        match layout::parse(&m.key) {
            Some(ObjectName::StreamChunk {
                segment: s,
                start,
                end,
            }) if s == segment => {
                if u64::from(end) > seg_size {
                    return Err(damaged(
                        m.key,
                        format!("ends beyond the {seg_size}-byte segment"),
                    ));
                }
                out.push(Chunk {
                    key: m.key,
                    start,
                    end,
                });
            }
            _ => {
                return Err(damaged(
                    m.key.escape_debug().to_string(),
                    "not a key walshipper writes".into(),
                ))
            }
        }
    }
    out.sort_by_key(|c| (c.start, c.end));
    Ok(out)
}

/// Reads the chain of segment `segno` of timeline `tli`; None when the
/// repository holds no chunk of it.
pub fn read_chain(repo: &Repository, tli: u32, segno: u64) -> Result<Option<Chain>> {
    let id = repo.descriptor.identity()?;
    let segment = wal::segment_name(tli, segno, id.wal_segment_size);
    let listed = list_chunks(repo, &segment)?;
    if listed.is_empty() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    let mut used = Vec::new();
    let mut off = 0u32;
    while let Some(c) = listed
        .iter()
        .filter(|c| c.start == off)
        .max_by_key(|c| c.end)
    {
        let want = (c.end - c.start) as usize;
        let body = repo.read_object_capped(&c.key, want)?;
        if body.len() != want {
            return Err(damaged(
                c.key.clone(),
                format!("{} bytes, but its name says {want}", body.len()),
            ));
        }
        bytes.extend_from_slice(&body);
        used.push(c.clone());
        off = c.end;
    }
    if let Some(stray) = listed.iter().find(|c| c.end > off) {
        return Err(damaged(
            stray.key.clone(),
            format!(
                "the chunks of {segment} are not contiguous: nothing covers bytes {off:#x}..{:#x}",
                stray.start
            ),
        ));
    }
    check_pages(&bytes, 0, tli, segno, &id).map_err(|r| {
        damaged(
            layout::stream_prefix(&segment),
            format!("its bytes are not WAL segment {segment} of this cluster: {r}"),
        )
    })?;
    Ok(Some(Chain {
        bytes,
        used,
        listed,
    }))
}

/// Checks the header of every WAL page that begins at or after `from` and
/// lies whole in `bytes` (bytes 0.. of segment `segno` of timeline `tli`):
/// the first page's long header against the cluster, every page's magic,
/// address and timeline, and zeros only after the padding of a segment
/// switch began. This is what makes a reordered, shifted or planted chunk
/// fail even in an unencrypted repository.
pub fn check_pages(
    bytes: &[u8],
    from: usize,
    tli: u32,
    segno: u64,
    id: &ClusterIdentity,
) -> std::result::Result<(), String> {
    let mut page = DEFAULT_PAGE;
    if let Some(h) = bytes.get(..wal::LONG_HEADER_LEN) {
        let h: &[u8; wal::LONG_HEADER_LEN] = h.try_into().map_err(|_| "short header")?;
        wal::check_long_header(h, tli, segno, id)?;
        let blcksz = u32::from_le_bytes([h[36], h[37], h[38], h[39]]);
        if !blcksz.is_power_of_two() || !(1024..=65536).contains(&blcksz) {
            return Err(format!("page size {blcksz} in the long header"));
        }
        page = u64::from(blcksz);
    } else if !bytes.is_empty() && from == 0 {
        return Ok(());
    }
    let magic = wal::page_magic(id.pg_major).unwrap_or(0);
    let base = segno.saturating_mul(id.wal_segment_size);
    let first = (from as u64).div_ceil(page) * page;
    let mut p = first;
    while p + 16 <= bytes.len() as u64 {
        let h = &bytes[p as usize..p as usize + 16];
        if h.iter().all(|b| *b == 0) {
            // After an XLOG_SWITCH record PostgreSQL pads the rest of the
            // segment with whole zero pages, headers included: from here
            // on, zeros only.
            return match bytes[p as usize..].iter().position(|b| *b != 0) {
                None => Ok(()),
                Some(i) => Err(format!(
                    "byte {:#x} is not zero in the padding after a segment switch",
                    p as usize + i
                )),
            };
        }
        let m = u16::from_le_bytes([h[0], h[1]]);
        let t = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let addr = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
        if m != magic {
            return Err(format!("page at {p:#x}: magic {m:#06x}, not {magic:#06x}"));
        }
        if addr != base + p {
            return Err(format!(
                "page at {p:#x} says it is at {}, not {}",
                wal::format_lsn(addr),
                wal::format_lsn(base + p)
            ));
        }
        if t == 0 || t > tli {
            return Err(format!(
                "page at {p:#x}: timeline {t} in timeline {tli}'s segment"
            ));
        }
        p += page;
    }
    Ok(())
}

/// Every (timeline, segment number) with streamed chunks.
pub fn streamed_segments(repo: &Repository) -> Result<BTreeMap<(u32, u64), String>> {
    Ok(list_streamed(repo)?
        .segments
        .into_iter()
        .map(|(k, s)| (k, s.name))
        .collect())
}

/// One streamed segment as listed (names only, nothing read).
#[derive(Clone, Debug, Default)]
pub struct Streamed {
    /// The segment's file name.
    pub name: String,
    /// Its chunks as listed, sorted by (start, end).
    pub chunks: Vec<Chunk>,
    /// Stored bytes of its chunk objects.
    pub stored: u64,
}

impl Streamed {
    /// Where the chain of chunk names from offset 0 ends (0: none starts
    /// at 0). From names alone: `read_chain` is what checks the bytes.
    pub fn chain_end(&self) -> u32 {
        let mut off = 0u32;
        while let Some(end) = self
            .chunks
            .iter()
            .filter(|c| c.start == off)
            .map(|c| c.end)
            .max()
        {
            off = end;
        }
        off
    }
}

/// Everything under `stream/`, by (timeline, segment number); keys
/// walshipper does not write are listed apart (never read, never deleted).
#[derive(Debug, Default)]
pub struct Listing {
    pub segments: BTreeMap<(u32, u64), Streamed>,
    pub foreign: Vec<String>,
}

/// The segments `wal/` holds, by (timeline, segment number): whole, and
/// as `<segment>.partial` (a timeline's last, stored at a promotion).
#[derive(Debug, Default)]
pub struct Held {
    pub whole: BTreeSet<(u32, u64)>,
    pub partial: BTreeSet<(u32, u64)>,
}

impl Held {
    /// Lists `wal/` (keys walshipper does not write are left out).
    pub fn list(repo: &Repository) -> Result<Held> {
        let keys = repo.storage.list(layout::WAL_PREFIX)?;
        Ok(Held::of_keys(
            keys.iter().map(|o| o.key.as_str()),
            repo.descriptor.wal_segment_size,
        ))
    }

    /// From WAL keys already listed.
    pub fn of_keys<'k>(keys: impl Iterator<Item = &'k str>, seg_size: u64) -> Held {
        let mut out = Held::default();
        for key in keys {
            if let Some(ObjectName::Wal {
                kind:
                    wal::WalFileKind::Segment {
                        tli,
                        log,
                        seg,
                        partial,
                    },
                ..
            }) = layout::parse(key)
            {
                if let Some(n) = crate::commands::info::segno_of(log, seg, seg_size) {
                    if partial {
                        out.partial.insert((tli, n));
                    } else {
                        out.whole.insert((tli, n));
                    }
                }
            }
        }
        out
    }

    /// Stored whole or as `.partial`: chunks of it are leftovers.
    pub fn stored(&self, tli: u32, segno: u64) -> bool {
        self.whole.contains(&(tli, segno)) || self.partial.contains(&(tli, segno))
    }

    /// The newest segment before `segno` stored whole on timeline `tli` or
    /// an earlier one (at a switch the segment before the new timeline's
    /// first belongs to the parent).
    pub fn last_before(&self, tli: u32, segno: u64) -> Option<u64> {
        self.whole
            .iter()
            .filter(|(t, s)| *t <= tli && *s < segno)
            .map(|(_, s)| *s)
            .max()
    }

    /// Whether segment `segno` continues the archived WAL without a gap.
    pub fn continues(&self, tli: u32, segno: u64) -> bool {
        segno.checked_sub(1).is_some() && self.last_before(tli, segno) == segno.checked_sub(1)
    }
}

/// The streamed tail as a listing describes it (names only, nothing read):
/// what `info` shows. `verify` reads it (`read_chain`) instead.
pub fn describe_tail(
    listing: &Listing,
    held: &Held,
    seg_size: u64,
) -> Option<pg_backup_contract::StreamTail> {
    let (tli, segno) = receiver_segment(listing, |t, s| held.stored(t, s))?;
    let s = listing.segments.get(&(tli, segno))?;
    let start = segno.saturating_mul(seg_size);
    let end = s.chain_end();
    Some(pg_backup_contract::StreamTail {
        timeline: tli,
        segment: s.name.clone(),
        start_lsn: wal::format_lsn(start),
        end_lsn: wal::format_lsn(start.saturating_add(u64::from(end))),
        bytes: u64::from(end),
        chunks: s.chunks.len() as u64,
        continues_archive: held.continues(tli, segno),
    })
}

/// Lists `stream/` once. Segment names a PostgreSQL with this segment size
/// would not write count as foreign keys.
pub fn list_streamed(repo: &Repository) -> Result<Listing> {
    let seg_size = repo.descriptor.wal_segment_size;
    let mut out = Listing::default();
    for m in repo.storage.list(layout::STREAM_PREFIX)? {
        let parsed = match layout::parse(&m.key) {
            Some(ObjectName::StreamChunk {
                segment,
                start,
                end,
            }) if u64::from(end) <= seg_size => match wal::parse_name(&segment) {
                Some(wal::WalFileKind::Segment { tli, log, seg, .. }) => {
                    crate::commands::info::segno_of(log, seg, seg_size)
                        .map(|n| ((tli, n), segment, start, end))
                }
                _ => None,
            },
            _ => None,
        };
        let Some((at, segment, start, end)) = parsed else {
            tracing::warn!("ignoring {:?}: not a key walshipper writes", m.key);
            out.foreign.push(m.key);
            continue;
        };
        let s = out.segments.entry(at).or_insert_with(|| Streamed {
            name: segment,
            ..Default::default()
        });
        s.stored = s.stored.saturating_add(m.size);
        s.chunks.push(Chunk {
            key: m.key,
            start,
            end,
        });
    }
    for s in out.segments.values_mut() {
        s.chunks.sort_by_key(|c| (c.start, c.end));
    }
    Ok(out)
}

/// The streamed segment a running receiver may be filling now: the newest
/// (timeline, segment) with chunks, unless `wal/` holds it whole or as
/// `.partial` (`stored` says which it does; then the receiver is past it).
/// Chunks of every other streamed segment are leftovers of a receiver
/// killed while deleting them, or a tail abandoned at a timeline switch.
/// This is also the streamed tail of the WAL (what archive-get serves
/// beyond the last whole segment).
pub fn receiver_segment(
    listing: &Listing,
    stored: impl Fn(u32, u64) -> bool,
) -> Option<(u32, u64)> {
    listing
        .segments
        .keys()
        .next_back()
        .filter(|(t, s)| !stored(*t, *s))
        .copied()
}

/// archive-get's fallback for segment `name` when the repository holds it
/// only as streamed chunks (the newest WAL of a server that is gone): the
/// chain, zero-filled to a whole segment, at `dest`. PostgreSQL replays up
/// to the last whole record and then ends recovery there.
/// `Error::NotFound` when there are no chunks either.
pub fn restore_partial(repo: &Repository, name: &str, dest: &Path) -> Result<()> {
    let Some(wal::WalFileKind::Segment {
        tli,
        log,
        seg,
        partial: false,
    }) = wal::parse_name(name)
    else {
        return Err(Error::NotFound(name.to_string()));
    };
    let seg_size = repo.descriptor.wal_segment_size;
    let segno = wal::seg_no(log, seg, seg_size);
    // The receiver may merge the chunks or complete the segment (and remove
    // them) while they are read: a listed chunk gone, or the whole segment
    // there now, asks for another pass (archive-get retries), which finds
    // the segment whole; never "not there", which would end recovery short.
    let again = |what: String| {
        Error::Repository(format!(
            "{what} while the streamed part of {name} was read (the receiver merged or completed it meanwhile); trying again"
        ))
    };
    let chain = match read_chain(repo, tli, segno) {
        Err(Error::NotFound(key)) => return Err(again(format!("{key} vanished"))),
        other => other?,
    }
    .ok_or_else(|| Error::NotFound(name.to_string()))?;
    if repo
        .storage
        .head(&layout::wal_segment(tli, segno, seg_size))?
        .is_some()
    {
        return Err(again("the whole segment was stored".into()));
    }
    let dest_name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("bad destination {}", dest.display())))?;
    let tmp = dest.with_file_name(format!(".{dest_name}.walshipper.tmp"));
    let local = |e: std::io::Error| Error::io(format!("cannot write {}", dest.display()), e);
    let result = (|| {
        let mut f: File = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(local)?;
        f.write_all(&chain.bytes).map_err(local)?;
        f.set_len(seg_size).map_err(local)?;
        f.sync_all().map_err(local)?;
        fs::rename(&tmp, dest).map_err(local)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    } else {
        eprintln!(
            "walshipper: {name} is not complete in the repository: restored its streamed part ({} of {seg_size} bytes); recovery ends where it ends",
            chain.bytes.len()
        );
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::test_support::posix_repo;

    const SYSID: u64 = 7_000_000_000_000_000_001;
    const SEG: u64 = 16 << 20;
    const NAME: &str = "000000010000000000000003";

    /// `n` bytes of segment `segno` of timeline 1, pages laid out as
    /// PostgreSQL 15 writes them.
    fn wal_bytes(segno: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0x5a; n];
        for p in (0..n).step_by(8192) {
            let long = p == 0;
            if p + if long { 40 } else { 16 } > n {
                break;
            }
            b[p..p + 2].copy_from_slice(&0xD110u16.to_le_bytes());
            b[p + 2..p + 4].copy_from_slice(&(if long { 2u16 } else { 0 }).to_le_bytes());
            b[p + 4..p + 8].copy_from_slice(&1u32.to_le_bytes());
            b[p + 8..p + 16].copy_from_slice(&(segno * SEG + p as u64).to_le_bytes());
            if long {
                b[24..32].copy_from_slice(&SYSID.to_le_bytes());
                b[32..36].copy_from_slice(&(SEG as u32).to_le_bytes());
                b[36..40].copy_from_slice(&8192u32.to_le_bytes());
            }
        }
        b
    }

    fn put(repo: &Repository, w: &[u8], a: u32, b: u32) {
        repo.put_object(
            &layout::stream_chunk(NAME, a, b),
            &w[a as usize..b as usize],
        )
        .unwrap();
    }

    fn refused(repo: &Repository, what: &str) -> String {
        match read_chain(repo, 1, 3) {
            Err(e @ Error::Corrupt { .. }) => e.to_string(),
            Err(e) => panic!("{what}: not refused as damage: {e}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }

    #[test]
    fn the_tail_is_the_newest_streamed_segment_not_stored() {
        let chunk = |a, b| Chunk {
            key: String::new(),
            start: a,
            end: b,
        };
        let mut listing = Listing::default();
        listing.segments.insert(
            (1, 4),
            Streamed {
                name: "000000010000000000000004".into(),
                chunks: vec![chunk(0, 10)],
                stored: 1,
            },
        );
        listing.segments.insert(
            (2, 6),
            Streamed {
                name: "000000020000000000000006".into(),
                // Pieces and the chunk merged over them; a stray beyond a gap.
                chunks: vec![
                    chunk(0, 100),
                    chunk(0, 300),
                    chunk(100, 300),
                    chunk(300, 400),
                    chunk(500, 600),
                ],
                stored: 5,
            },
        );
        let mut held = Held::default();
        held.whole.extend([(1, 3), (1, 5)]);
        let t = describe_tail(&listing, &held, SEG).unwrap();
        assert_eq!((t.timeline, t.bytes, t.chunks), (2, 400, 5));
        assert_eq!(t.end_lsn, wal::format_lsn(6 * SEG + 400));
        // Segment 5 of the parent timeline is whole: no gap.
        assert!(t.continues_archive);
        held.whole.remove(&(1, 5));
        assert!(
            !describe_tail(&listing, &held, SEG)
                .unwrap()
                .continues_archive
        );
        assert_eq!(held.last_before(2, 6), Some(3));
        // Once timeline 2's segment 6 is stored, the receiver is past it:
        // no tail, and every chunk listed is a leftover.
        held.whole.insert((2, 6));
        assert!(describe_tail(&listing, &held, SEG).is_none());
        assert_eq!(receiver_segment(&listing, |t, s| held.stored(t, s)), None);
    }

    #[test]
    fn the_chain_reads_back_and_anything_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_cfg, repo) = posix_repo(dir.path(), SYSID);
        let root = dir.path().join("r");
        let w = wal_bytes(3, 100_000);
        assert!(read_chain(&repo, 1, 3).unwrap().is_none());
        // Pieces, and a merged chunk over the first two (a receiver killed
        // before it deleted them): the same bytes either way.
        put(&repo, &w, 0, 20_000);
        put(&repo, &w, 20_000, 50_000);
        put(&repo, &w, 0, 50_000);
        put(&repo, &w, 50_000, 75_000);
        put(&repo, &w, 75_000, 100_000);
        let c = read_chain(&repo, 1, 3).unwrap().unwrap();
        assert_eq!(c.bytes, w);
        assert_eq!(c.used.len(), 3);
        assert_eq!(c.listed.len(), 5);
        let dest = dir.path().join(NAME);
        restore_partial(&repo, NAME, &dest).unwrap();
        let restored = std::fs::read(&dest).unwrap();
        assert_eq!(restored.len() as u64, SEG);
        assert_eq!(&restored[..w.len()], &w[..]);
        assert!(restored[w.len()..].iter().all(|b| *b == 0));

        // Two chunks of equal length swapped: each is sealed to its name.
        let p1 = root.join(layout::stream_chunk(NAME, 50_000, 75_000));
        let p2 = root.join(layout::stream_chunk(NAME, 75_000, 100_000));
        let tmp = dir.path().join("swap");
        std::fs::rename(&p1, &tmp).unwrap();
        std::fs::rename(&p2, &p1).unwrap();
        std::fs::rename(&tmp, &p2).unwrap();
        refused(&repo, "swapped chunks");
        std::fs::rename(&p1, &tmp).unwrap();
        std::fs::rename(&p2, &p1).unwrap();
        std::fs::rename(&tmp, &p2).unwrap();
        assert!(read_chain(&repo, 1, 3).is_ok());

        // A chunk beyond a gap.
        put(&repo, &wal_bytes(3, 130_000), 120_000, 130_000);
        let e = refused(&repo, "a gap");
        assert!(e.contains("not contiguous"), "{e}");
        repo.storage
            .delete(&layout::stream_chunk(NAME, 120_000, 130_000))
            .unwrap();

        // Another segment's bytes, sealed under this segment's names (a
        // writer's bug, or an unencrypted repository's planted chunk).
        put(&repo, &wal_bytes(4, 130_000), 100_000, 130_000);
        let e = refused(&repo, "another segment's pages");
        assert!(e.contains("page at"), "{e}");
        repo.storage
            .delete(&layout::stream_chunk(NAME, 100_000, 130_000))
            .unwrap();

        // A key no writer makes, under the segment's prefix.
        std::fs::write(root.join(layout::stream_prefix(NAME)).join("junk"), b"x").unwrap();
        refused(&repo, "a foreign key");
        std::fs::remove_file(root.join(layout::stream_prefix(NAME)).join("junk")).unwrap();

        // The padding after a segment switch is zeros, and only zeros.
        let mut z = w[..2 * 8192 + 500].to_vec();
        z.resize(5 * 8192, 0);
        assert!(check_pages(&z, 0, 1, 3, &repo.descriptor.identity().unwrap()).is_ok());
        z[4 * 8192 + 100] = 1;
        assert!(check_pages(&z, 0, 1, 3, &repo.descriptor.identity().unwrap()).is_err());
    }
}
