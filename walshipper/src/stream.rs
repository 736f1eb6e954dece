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
use std::fs;
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

/// Whether the repository holds streamed pieces of segment `segment` (one
/// listing): what `restore_partial` would find, for the look-ahead's
/// "not there" answers.
pub fn has_streamed_part(repo: &Repository, segment: &str) -> Result<bool> {
    Ok(!list_chunks(repo, segment)?.is_empty())
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

    /// The newest segment before `segno` stored whole on a timeline
    /// recovery to `path`'s timeline reads it from (see `Ancestry`).
    pub fn last_before(&self, path: &Ancestry, segno: u64) -> Option<u64> {
        self.whole
            .iter()
            .filter(|&&(t, s)| s < segno && path.reads(t, s))
            .map(|(_, s)| *s)
            .max()
    }

    /// Whether segment `segno` of `path`'s timeline continues the archived
    /// WAL without a gap.
    pub fn continues(&self, path: &Ancestry, segno: u64) -> bool {
        segno.checked_sub(1).is_some() && self.last_before(path, segno) == segno.checked_sub(1)
    }
}

/// The timelines recovery to one timeline passes through, and the segments
/// it reads from each (from `TTTTTTTT.history`): an ancestor's segment
/// counts up to the one holding its switch point; a sibling timeline's
/// never does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ancestry {
    /// (timeline, first segment, last segment) on the path.
    spans: Vec<(u32, u64, u64)>,
}

impl Ancestry {
    /// Only timeline `tli` itself (timeline 1, or no history known).
    pub fn own(tli: u32) -> Ancestry {
        Ancestry {
            spans: vec![(tli, 0, u64::MAX)],
        }
    }

    /// From the `(parent, switch LSN)` lines of `tli`'s history file.
    pub fn of_history(tli: u32, entries: &[(u32, u64)], seg_size: u64) -> Ancestry {
        let seg_size = seg_size.max(1);
        let mut spans = Vec::with_capacity(entries.len() + 1);
        let mut first = 0u64;
        for &(parent, switch) in entries {
            // The parent's bytes end at the switch point: its segment
            // holding the byte before it is its last on this path.
            let last = switch.saturating_sub(1) / seg_size;
            spans.push((parent, first, last));
            first = switch / seg_size;
        }
        spans.push((tli, first, u64::MAX));
        Ancestry { spans }
    }

    /// Reads timeline `tli`'s history file from the repository. None
    /// stored (or timeline 1): only `tli` itself counts.
    pub fn read(repo: &Repository, tli: u32) -> Result<Ancestry> {
        if tli <= 1 {
            return Ok(Ancestry::own(tli));
        }
        let name = format!("{tli:08X}.history");
        let key = layout::wal(&name, &wal::WalFileKind::History { tli });
        let body = match repo.read_object_capped(&key, wal::MAX_HISTORY_FILE as usize) {
            Ok(b) => b,
            Err(Error::NotFound(_)) => return Ok(Ancestry::own(tli)),
            Err(e) => return Err(e),
        };
        let entries = wal::history_entries(&body, body.len() as u64, tli)
            .map_err(|reason| Error::Corrupt { key, reason })?;
        Ok(Ancestry::of_history(
            tli,
            &entries,
            repo.descriptor.wal_segment_size,
        ))
    }

    /// Like `read`, for a report: a history file that cannot be read is
    /// logged and only `tli` itself counts (stricter, never looser).
    pub fn read_or_own(repo: &Repository, tli: u32) -> Ancestry {
        Ancestry::read(repo, tli).unwrap_or_else(|e| {
            tracing::warn!("timeline {tli}'s history: {e}; counting only timeline {tli}'s own segments as continuing the archived WAL");
            Ancestry::own(tli)
        })
    }

    /// Whether recovery on this path reads segment `segno` from timeline
    /// `tli`.
    pub fn reads(&self, tli: u32, segno: u64) -> bool {
        self.spans
            .iter()
            .any(|&(t, first, last)| t == tli && first <= segno && segno <= last)
    }
}

/// The streamed tail as a listing describes it (names only, nothing read):
/// what `info` shows. `verify` reads it (`read_chain`) instead. `path`
/// gives the tail timeline's ancestry (`Ancestry::read`), asked only when
/// there is a tail.
pub fn describe_tail(
    listing: &Listing,
    held: &Held,
    seg_size: u64,
    path: impl FnOnce(u32) -> Ancestry,
) -> Option<pg_backup_contract::StreamTail> {
    let (tli, segno) = receiver_segment(listing, |t, s| held.stored(t, s))?;
    let path = path(tli);
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
        continues_archive: held.continues(&path, segno),
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

/// What `read_settled` found.
pub enum Settled {
    /// The chain (None: no chunks listed any more).
    Read(Option<Chain>),
    /// The segment changed while it was read: nothing to judge this time.
    Changed,
}

/// `read_chain` for a reader that must not call a receiver's work in
/// progress damage: a read error counts only if the segment, listed as
/// `was`, is unchanged (`changed_since`) and a second read fails too.
pub fn read_settled(repo: &Repository, tli: u32, segno: u64, was: &Streamed) -> Result<Settled> {
    let mut last = None;
    for _ in 0..2 {
        match read_chain(repo, tli, segno) {
            Ok(c) => return Ok(Settled::Read(c)),
            Err(e) => {
                if changed_since(repo, tli, segno, was)? {
                    return Ok(Settled::Changed);
                }
                tracing::debug!("streamed WAL {}: {e}; listing unchanged", was.name);
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Repository(format!("streamed WAL {}: not read", was.name))))
}

/// Whether streamed segment `(tli, segno)`, listed as `was`, changed
/// since: `wal/` now holds it whole or as `.partial`, or its chunks are
/// not the ones listed. A receiver merges chunks (deleting the pieces) and
/// deletes them all once the segment is stored, in any order (an S3 batch
/// delete, `remove_dir_all`): a chain read in the middle of that looks
/// damaged, and only an unchanged listing makes a read error damage.
pub fn changed_since(repo: &Repository, tli: u32, segno: u64, was: &Streamed) -> Result<bool> {
    if Held::list(repo)?.stored(tli, segno) {
        return Ok(true);
    }
    let now = list_chunks(repo, &was.name)?;
    let keys = |c: &[Chunk]| c.iter().map(|c| c.key.clone()).collect::<BTreeSet<_>>();
    Ok(keys(&now) != keys(&was.chunks))
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
    let local = |e: std::io::Error| Error::io(format!("cannot write {}", dest.display()), e);
    let (tmp, mut f) = crate::spool::create_beside(dest).map_err(local)?;
    let result = (|| {
        f.write_all(&chain.bytes).map_err(local)?;
        f.set_len(seg_size).map_err(local)?;
        f.sync_all().map_err(local)?;
        crate::requester::rename_if_asked(&tmp, dest).map_err(local)
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
        // Timeline 2 branched from 1 inside segment 6.
        let path = || Ancestry::of_history(2, &[(1, 6 * SEG + 100)], SEG);
        let t = describe_tail(&listing, &held, SEG, |_| path()).unwrap();
        assert_eq!((t.timeline, t.bytes, t.chunks), (2, 400, 5));
        assert_eq!(t.end_lsn, wal::format_lsn(6 * SEG + 400));
        // Segment 5 of the parent timeline is whole: no gap.
        assert!(t.continues_archive);
        held.whole.remove(&(1, 5));
        assert!(
            !describe_tail(&listing, &held, SEG, |_| path())
                .unwrap()
                .continues_archive
        );
        assert_eq!(held.last_before(&path(), 6), Some(3));
        // Once timeline 2's segment 6 is stored, the receiver is past it:
        // no tail, and every chunk listed is a leftover.
        held.whole.insert((2, 6));
        assert!(describe_tail(&listing, &held, SEG, |_| path()).is_none());
        assert_eq!(receiver_segment(&listing, |t, s| held.stored(t, s)), None);
    }

    #[test]
    fn only_the_tail_timelines_ancestors_continue_it() {
        // Timeline 3 branched from 1 inside segment 9; timeline 2 is an
        // abandoned sibling (branched from 1 at segment 10).
        let path = Ancestry::of_history(3, &[(1, 9 * SEG + 500)], SEG);
        let mut held = Held::default();
        held.whole.extend([(1, 8), (1, 9), (1, 10), (2, 11)]);
        // The sibling's segment 11 is not on the path to (3, 12): a gap.
        assert!(!held.continues(&path, 12));
        assert_eq!(held.last_before(&path, 12), Some(9));
        // Timeline 1's segment 10 is past its switch point: not read.
        assert!(!path.reads(1, 10));
        assert!(!held.continues(&path, 11));
        // The parent's segment holding the switch point is.
        assert!(path.reads(1, 9));
        assert!(held.continues(&path, 10));
        held.whole.insert((3, 11));
        assert!(held.continues(&path, 12));
        // A switch exactly at a segment boundary: the parent's last
        // segment is the one before it.
        let edge = Ancestry::of_history(2, &[(1, 5 * SEG)], SEG);
        assert!(edge.reads(1, 4) && !edge.reads(1, 5) && edge.reads(2, 5));
        // Several generations: 1 -> 2 at segment 3, 2 -> 4 at segment 7.
        let deep = Ancestry::of_history(4, &[(1, 3 * SEG + 8), (2, 7 * SEG + 8)], SEG);
        assert!(deep.reads(1, 3) && !deep.reads(1, 4));
        assert!(deep.reads(2, 3) && deep.reads(2, 7) && !deep.reads(2, 8));
        assert!(!deep.reads(3, 5) && deep.reads(4, 7) && !deep.reads(4, 6));
        // No history: only the timeline itself.
        let own = Ancestry::own(3);
        assert!(own.reads(3, 0) && !own.reads(1, 0));
    }

    #[test]
    fn the_ancestry_is_read_from_the_stored_history_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_cfg, repo) = posix_repo(dir.path(), SYSID);
        assert_eq!(Ancestry::read(&repo, 3).unwrap(), Ancestry::own(3));
        let key = layout::wal("00000003.history", &wal::WalFileKind::History { tli: 3 });
        repo.put_object(&key, &b"1\t0/9000500\tno recovery target specified\n"[..])
            .unwrap();
        let seg = repo.descriptor.wal_segment_size;
        assert_eq!(
            Ancestry::read(&repo, 3).unwrap(),
            Ancestry::of_history(3, &[(1, 0x900_0500)], seg)
        );
    }

    #[test]
    fn a_chain_changing_under_the_reader_is_not_damage() {
        let dir = tempfile::tempdir().unwrap();
        let (_cfg, repo) = posix_repo(dir.path(), SYSID);
        let w = wal_bytes(3, 50_000);
        let listed = |repo: &Repository| Streamed {
            name: NAME.into(),
            chunks: list_chunks(repo, NAME).unwrap(),
            stored: 0,
        };
        // The pieces a receiver deletes once the segment is whole, listed
        // before the first went: the reader then sees a gap.
        put(&repo, &w, 0, 10_000);
        put(&repo, &w, 10_000, 20_000);
        put(&repo, &w, 20_000, 30_000);
        let was = listed(&repo);
        repo.storage
            .delete(&layout::stream_chunk(NAME, 10_000, 20_000))
            .unwrap();
        assert!(matches!(
            read_settled(&repo, 1, 3, &was),
            Ok(Settled::Changed)
        ));
        // The same gap over an unchanged listing is damage.
        let now = listed(&repo);
        let e = read_settled(&repo, 1, 3, &now).err().unwrap().to_string();
        assert!(e.contains("not contiguous"), "{e}");
        // Stored whole meanwhile: the chunks are leftovers, not damage.
        let seg = wal::parse_name(NAME).unwrap();
        repo.put_object(&layout::wal(NAME, &seg), &w[..]).unwrap();
        assert!(matches!(
            read_settled(&repo, 1, 3, &now),
            Ok(Settled::Changed)
        ));
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
