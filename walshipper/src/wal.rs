//! PostgreSQL WAL files: names, what archive-push accepts, and the few bytes
//! of pg_control and WAL page headers we read.

use std::io::{Read, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// XLOG_PAGE_MAGIC per major version (src/include/access/xlog_internal.h).
pub fn page_magic(pg_major: u32) -> Option<u16> {
    match pg_major {
        13 => Some(0xD106),
        14 => Some(0xD10D),
        15 => Some(0xD110),
        16 => Some(0xD113),
        17 => Some(0xD116),
        _ => None,
    }
}

const XLP_LONG_HEADER: u16 = 0x0002;
/// XLogLongPageHeaderData: magic u16, info u16, tli u32, pageaddr u64,
/// rem_len u32, (pad), sysid u64 @24, seg_size u32 @32, blcksz u32 @36.
pub(crate) const LONG_HEADER_LEN: usize = 40;
/// Largest timeline or backup history file accepted (PostgreSQL writes a few
/// hundred bytes; a long-lived cluster's history stays far below this).
pub const MAX_HISTORY_FILE: u64 = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalFileKind {
    /// A complete segment (also `.partial`, left at a timeline switch).
    Segment {
        tli: u32,
        log: u32,
        seg: u32,
        partial: bool,
    },
    /// `TTTTTTTT.history`
    History { tli: u32 },
    /// `<segment>.<offset>.backup`, written by pg_backup_stop.
    BackupHistory { tli: u32, log: u32, seg: u32 },
}

fn hex_u32(s: &str) -> Option<u32> {
    (s.len() == 8
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()))
    .then(|| u32::from_str_radix(s, 16).ok())
    .flatten()
}

/// Classifies a WAL file name as PostgreSQL writes it; None for anything else.
pub fn parse_name(name: &str) -> Option<WalFileKind> {
    // Names come from listings too: slicing below assumes ASCII.
    if !name.is_ascii() {
        return None;
    }
    if let Some(t) = name.strip_suffix(".history") {
        return hex_u32(t).map(|tli| WalFileKind::History { tli });
    }
    let (base, rest) = name.split_at_checked(24)?;
    let tli = hex_u32(&base[0..8])?;
    let log = hex_u32(&base[8..16])?;
    let seg = hex_u32(&base[16..24])?;
    match rest {
        "" => Some(WalFileKind::Segment {
            tli,
            log,
            seg,
            partial: false,
        }),
        ".partial" => Some(WalFileKind::Segment {
            tli,
            log,
            seg,
            partial: true,
        }),
        r => {
            let off = r.strip_prefix('.')?.strip_suffix(".backup")?;
            hex_u32(off).map(|_| WalFileKind::BackupHistory { tli, log, seg })
        }
    }
}

/// Segment number (XLogSegNo) from the log/seg parts of a name.
/// Saturating: names and sizes may come from a repository (a descriptor is
/// validated, but this must not be what panics if one is not).
pub fn seg_no(log: u32, seg: u32, seg_size: u64) -> u64 {
    u64::from(log)
        .saturating_mul(segs_per_log(seg_size))
        .saturating_add(u64::from(seg))
}

/// Segments per 4 GiB of WAL ("log" number); at least 1.
fn segs_per_log(seg_size: u64) -> u64 {
    0x1_0000_0000u64.checked_div(seg_size).unwrap_or(1).max(1)
}

/// Segment file name for a timeline and segment number.
pub fn segment_name(tli: u32, segno: u64, seg_size: u64) -> String {
    let per = segs_per_log(seg_size);
    format!("{:08X}{:08X}{:08X}", tli, segno / per, segno % per)
}

/// What the repository knows of its cluster, to check a WAL file against.
#[derive(Clone, Debug)]
pub struct ClusterIdentity {
    pub system_identifier: u64,
    pub pg_major: u32,
    pub wal_segment_size: u64,
}

/// Checks that `path` is a WAL file of this cluster before it is archived.
pub fn validate(path: &Path, id: &ClusterIdentity) -> Result<WalFileKind> {
    let bad = |reason: String| Error::InvalidWal {
        path: path.to_path_buf(),
        reason,
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| bad("no file name".into()))?;
    let kind = parse_name(name).ok_or_else(|| {
        bad("the name is not that of a WAL segment, .history, .partial or .backup file".into())
    })?;
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    match kind {
        WalFileKind::Segment { log, seg, .. } => {
            if meta.len() != id.wal_segment_size {
                return Err(bad(format!(
                    "size is {} bytes, but this cluster's WAL segments are {} bytes",
                    meta.len(),
                    id.wal_segment_size
                )));
            }
            let mut h = [0u8; LONG_HEADER_LEN];
            std::fs::File::open(path)
                .and_then(|mut f| f.read_exact(&mut h))
                .map_err(|e| bad(format!("cannot read the page header: {e}")))?;
            check_long_header(
                &h,
                kind_tli(&kind),
                seg_no(log, seg, id.wal_segment_size),
                id,
            )
            .map_err(bad)?;
        }
        WalFileKind::History { .. } | WalFileKind::BackupHistory { .. } => {
            if meta.len() > MAX_HISTORY_FILE {
                return Err(bad("too large for a history file".into()));
            }
            let text = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
            let text = std::str::from_utf8(&text).map_err(|_| bad("not text".into()))?;
            if matches!(kind, WalFileKind::BackupHistory { .. })
                && !text.contains("START WAL LOCATION:")
            {
                return Err(bad(
                    "not a backup history file (no START WAL LOCATION)".into()
                ));
            }
        }
    }
    Ok(kind)
}

fn kind_tli(kind: &WalFileKind) -> u32 {
    match kind {
        WalFileKind::Segment { tli, .. }
        | WalFileKind::History { tli }
        | WalFileKind::BackupHistory { tli, .. } => *tli,
    }
}

pub(crate) fn check_long_header(
    h: &[u8; LONG_HEADER_LEN],
    name_tli: u32,
    segno: u64,
    id: &ClusterIdentity,
) -> std::result::Result<(), String> {
    let magic = u16::from_le_bytes([h[0], h[1]]);
    let info = u16::from_le_bytes([h[2], h[3]]);
    let tli = u32::from_le_bytes(h[4..8].try_into().unwrap_or_default());
    let pageaddr = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
    let sysid = u64::from_le_bytes(h[24..32].try_into().unwrap_or_default());
    let seg_size = u32::from_le_bytes(h[32..36].try_into().unwrap_or_default());
    let expected_magic = page_magic(id.pg_major).unwrap_or(0);
    if magic != expected_magic {
        return Err(format!(
            "page magic {magic:#06x} is not PostgreSQL {}'s ({expected_magic:#06x})",
            id.pg_major
        ));
    }
    if info & XLP_LONG_HEADER == 0 {
        return Err("first page has no long header".into());
    }
    // The first segment of a new timeline starts as a copy of its parent's
    // segment up to the switch point, so its first page may carry an
    // ancestor's timeline; never a later one (PostgreSQL's own reader
    // refuses a timeline that is not in the history, and one that goes
    // backwards). Ancestry itself is left to PostgreSQL's history check.
    if tli == 0 || tli > name_tli {
        return Err(format!(
            "page timeline {tli} does not fit the file name's timeline {name_tli}"
        ));
    }
    if Some(pageaddr) != segno.checked_mul(id.wal_segment_size) {
        return Err(format!(
            "page address {:X}/{:X} does not match the file name",
            pageaddr >> 32,
            pageaddr & 0xffff_ffff
        ));
    }
    if sysid != id.system_identifier {
        return Err(format!(
            "system identifier {sysid} is not the repository's {} (another cluster?)",
            id.system_identifier
        ));
    }
    if u64::from(seg_size) != id.wal_segment_size {
        return Err(format!(
            "segment size {seg_size} in the header is not {}",
            id.wal_segment_size
        ));
    }
    Ok(())
}

/// Reads the cluster identity from a data directory: system identifier from
/// global/pg_control (its first field), major version from PG_VERSION, and
/// the segment size from the long header of a segment in pg_wal.
pub fn read_identity(data_dir: &Path) -> Result<ClusterIdentity> {
    let ctx = |what: &str, e: std::io::Error| {
        Error::Invalid(format!(
            "cannot read {what} in {} ({e}); is pg.data_dir right?",
            data_dir.display()
        ))
    };
    let version =
        std::fs::read_to_string(data_dir.join("PG_VERSION")).map_err(|e| ctx("PG_VERSION", e))?;
    let pg_major: u32 = version.trim().parse().map_err(|_| {
        Error::Invalid(format!(
            "PG_VERSION '{}' is not a major version",
            version.trim()
        ))
    })?;
    if page_magic(pg_major).is_none() {
        return Err(Error::Invalid(format!(
            "PostgreSQL {pg_major} is not supported (13 to 17 are)"
        )));
    }
    let mut control = [0u8; 8];
    std::fs::File::open(data_dir.join("global/pg_control"))
        .and_then(|mut f| f.read_exact(&mut control))
        .map_err(|e| ctx("global/pg_control", e))?;
    let system_identifier = u64::from_le_bytes(control);
    let wal_dir = data_dir.join("pg_wal");
    let entries = std::fs::read_dir(&wal_dir).map_err(|e| ctx("pg_wal", e))?;
    for e in entries.flatten() {
        let name = e.file_name();
        if !matches!(
            name.to_str().and_then(parse_name),
            Some(WalFileKind::Segment { partial: false, .. })
        ) {
            continue;
        }
        let mut h = [0u8; LONG_HEADER_LEN];
        if std::fs::File::open(e.path())
            .and_then(|mut f| f.read_exact(&mut h))
            .is_err()
        {
            continue;
        }
        let seg_size = u32::from_le_bytes(h[32..36].try_into().unwrap_or_default());
        let sysid = u64::from_le_bytes(h[24..32].try_into().unwrap_or_default());
        if sysid == system_identifier && seg_size.is_power_of_two() && seg_size >= 1 << 20 {
            return Ok(ClusterIdentity {
                system_identifier,
                pg_major,
                wal_segment_size: u64::from(seg_size),
            });
        }
    }
    Err(Error::Invalid(format!(
        "no WAL segment of system {system_identifier} found in {}",
        wal_dir.display()
    )))
}

/// Checks what a repository returned for WAL file `name` against that name,
/// as a `Write` sink the decoded bytes go through (archive-get, verify). The
/// object's bytes are untrusted even when they decrypt: an unencrypted
/// repository, or one written by a mistaken or hostile hand, can hold another
/// segment, another cluster's, or text under a segment's name.
pub struct ContentCheck {
    name: String,
    kind: WalFileKind,
    /// Bytes kept: the long page header of a segment, a whole history file
    /// (bounded; anything longer is refused).
    keep: usize,
    head: Vec<u8>,
    len: u64,
}

impl ContentCheck {
    pub fn new(name: &str, kind: &WalFileKind) -> ContentCheck {
        let keep = match kind {
            WalFileKind::Segment { .. } => LONG_HEADER_LEN,
            _ => MAX_HISTORY_FILE as usize + 1,
        };
        ContentCheck {
            name: name.to_string(),
            kind: kind.clone(),
            keep,
            head: Vec::new(),
            len: 0,
        }
    }

    /// After every byte went through: whether they are WAL file `name` of
    /// this cluster. The error says what does not match.
    pub fn finish(&self, id: &ClusterIdentity) -> std::result::Result<(), String> {
        // The size comes from the repository's descriptor: never divide by it unchecked.
        let size = id.wal_segment_size;
        if !size.is_power_of_two() || !((1 << 20)..=(1 << 30)).contains(&size) {
            return Err(format!(
                "the repository's WAL segment size {size} is not a power of two from 1 MiB to 1 GiB"
            ));
        }
        match &self.kind {
            WalFileKind::Segment { tli, log, seg, .. } => {
                // `.partial` files are whole segments too: PostgreSQL copies
                // the segment in which the timeline ended, tail included.
                if self.len != id.wal_segment_size {
                    return Err(format!(
                        "{} bytes, but this cluster's WAL segments are {} bytes",
                        self.len, id.wal_segment_size
                    ));
                }
                let h: &[u8; LONG_HEADER_LEN] = self
                    .head
                    .as_slice()
                    .try_into()
                    .map_err(|_| "shorter than a page header".to_string())?;
                let segno = seg_no(*log, *seg, id.wal_segment_size);
                check_long_header(h, *tli, segno, id)
            }
            WalFileKind::History { tli } => check_history(&self.head, self.len, *tli)
                .map_err(|e| format!("{e} (timeline history)")),
            WalFileKind::BackupHistory { .. } => {
                check_backup_history(&self.head, self.len, &self.name, id.wal_segment_size)
            }
        }
    }
}

impl Write for ContentCheck {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.keep.saturating_sub(self.head.len());
        self.head.extend_from_slice(&buf[..room.min(buf.len())]);
        self.len = self.len.saturating_add(buf.len() as u64);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn history_text(body: &[u8], len: u64) -> std::result::Result<&str, String> {
    if len > MAX_HISTORY_FILE {
        return Err(format!("{len} bytes, too large for a history file"));
    }
    std::str::from_utf8(body).map_err(|_| "not text".to_string())
}

/// `TTTTTTTT.history` as PostgreSQL writes and reads it (timeline.c):
/// lines `<parent tli>\t<switch LSN>\t<reason>`, `#` comments and blank
/// lines ignored; parents strictly increasing and all below T.
fn check_history(body: &[u8], len: u64, tli: u32) -> std::result::Result<(), String> {
    history_entries(body, len, tli).map(|_| ())
}

/// The `(parent timeline, switch LSN)` lines of timeline `tli`'s history
/// file, oldest first, checked as `check_history` describes.
pub fn history_entries(
    body: &[u8],
    len: u64,
    tli: u32,
) -> std::result::Result<Vec<(u32, u64)>, String> {
    let text = history_text(body, len)?;
    let mut out: Vec<(u32, u64)> = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let parent: u32 = fields
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("line '{}' has no timeline number", line.escape_debug()))?;
        let switch = fields
            .next()
            .and_then(parse_lsn)
            .ok_or_else(|| format!("line '{}' has no switch point", line.escape_debug()))?;
        if parent >= tli || out.last().is_some_and(|&(l, _)| parent <= l) {
            return Err(format!(
                "parent timeline {parent} cannot precede timeline {tli} here"
            ));
        }
        out.push((parent, switch));
    }
    if out.is_empty() {
        return Err(format!("no parent timeline listed for timeline {tli}"));
    }
    Ok(out)
}

/// `<segment>.<offset>.backup` (pg_backup_stop): its START WAL LOCATION
/// must be the segment and offset in its name.
fn check_backup_history(
    body: &[u8],
    len: u64,
    name: &str,
    seg_size: u64,
) -> std::result::Result<(), String> {
    let text = history_text(body, len)?;
    let (Some(seg_name), Some(offset)) = (name.get(0..24), name.get(25..33)) else {
        return Err("not a backup history file name".into());
    };
    let start = text
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
        .ok_or("not a backup history file (no START WAL LOCATION)")?;
    // "0/2000028 (file 000000010000000000000002)"
    let (lsn, file) = start
        .split_once(" (file ")
        .and_then(|(l, f)| Some((parse_lsn(l)?, f.strip_suffix(')')?)))
        .ok_or_else(|| format!("START WAL LOCATION '{}' is malformed", start.escape_debug()))?;
    let want_offset = u32::from_str_radix(offset, 16).ok();
    let Some(WalFileKind::Segment { log, seg, .. }) = parse_name(seg_name) else {
        return Err("not a backup history file name".into());
    };
    if file != seg_name
        || lsn_segno(lsn, seg_size) != seg_no(log, seg, seg_size)
        || Some(lsn % seg_size) != want_offset.map(u64::from)
    {
        return Err(format!(
            "it records a backup starting at {} in {file}, not the one its name says",
            format_lsn(lsn)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            parse_name("00000001000000020000003F"),
            Some(WalFileKind::Segment {
                tli: 1,
                log: 2,
                seg: 0x3f,
                partial: false
            })
        );
        assert_eq!(
            parse_name("00000002.history"),
            Some(WalFileKind::History { tli: 2 })
        );
        assert_eq!(
            parse_name("000000010000000000000002.00000028.backup"),
            Some(WalFileKind::BackupHistory {
                tli: 1,
                log: 0,
                seg: 2
            })
        );
        assert!(matches!(
            parse_name("000000010000000000000002.partial"),
            Some(WalFileKind::Segment { partial: true, .. })
        ));
        for bad in [
            "",
            "postgresql.conf",
            "00000001000000000000000",
            "0000000100000000000000zz",
            "00000001000000000000000a",
            "000000010000000000000002.bak",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn segment_numbers_round_trip() {
        let size = 16u64 << 20;
        for segno in [0u64, 1, 255, 256, 1000, 70000] {
            let name = segment_name(3, segno, size);
            let Some(WalFileKind::Segment { tli, log, seg, .. }) = parse_name(&name) else {
                panic!()
            };
            assert_eq!(tli, 3);
            assert_eq!(seg_no(log, seg, size), segno);
        }
        assert_eq!(segment_name(1, 256, size), "000000010000000100000000");
    }

    fn identity() -> ClusterIdentity {
        ClusterIdentity {
            system_identifier: 7_000_000_000_000_000_001,
            pg_major: 15,
            wal_segment_size: 1 << 20,
        }
    }

    /// A segment whose first page says: timeline `tli`, address `addr`.
    fn segment(id: &ClusterIdentity, tli: u32, addr: u64) -> Vec<u8> {
        let mut v = vec![0u8; id.wal_segment_size as usize];
        v[0..2].copy_from_slice(&page_magic(id.pg_major).unwrap().to_le_bytes());
        v[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        v[4..8].copy_from_slice(&tli.to_le_bytes());
        v[8..16].copy_from_slice(&addr.to_le_bytes());
        v[24..32].copy_from_slice(&id.system_identifier.to_le_bytes());
        v[32..36].copy_from_slice(&(id.wal_segment_size as u32).to_le_bytes());
        v
    }

    fn check(name: &str, body: &[u8], id: &ClusterIdentity) -> std::result::Result<(), String> {
        let kind = parse_name(name).unwrap();
        let mut c = ContentCheck::new(name, &kind);
        // In uneven pieces, as a decoder hands them over.
        for chunk in body.chunks(7) {
            c.write_all(chunk).unwrap();
        }
        c.finish(id)
    }

    #[test]
    fn restored_segments_must_be_the_named_one() {
        let id = identity();
        let seg = id.wal_segment_size;
        let name = segment_name(2, 5, seg);
        assert_eq!(check(&name, &segment(&id, 2, 5 * seg), &id), Ok(()));
        // The first segment of timeline 2 may begin with timeline 1's pages.
        assert_eq!(check(&name, &segment(&id, 1, 5 * seg), &id), Ok(()));
        let partial = format!("{name}.partial");
        assert_eq!(check(&partial, &segment(&id, 2, 5 * seg), &id), Ok(()));
        let refused = |body: Vec<u8>, what: &str| {
            let e = check(&name, &body, &id).unwrap_err();
            assert!(e.contains(what), "{e}");
        };
        refused(segment(&id, 2, 4 * seg), "page address");
        refused(segment(&id, 3, 5 * seg), "timeline 3");
        refused(segment(&id, 0, 5 * seg), "timeline 0");
        let mut other = identity();
        other.system_identifier += 1;
        refused(segment(&other, 2, 5 * seg), "system identifier");
        let mut old = identity();
        old.pg_major = 14;
        refused(segment(&old, 2, 5 * seg), "magic");
        let mut short = segment(&id, 2, 5 * seg);
        short.truncate(seg as usize - 1);
        refused(short, "bytes");
        refused(Vec::new(), "bytes");
        let mut bad_size = segment(&id, 2, 5 * seg);
        bad_size[32..36].copy_from_slice(&(2u32 << 20).to_le_bytes());
        refused(bad_size, "segment size");
        let mut no_long = segment(&id, 2, 5 * seg);
        no_long[2] = 0;
        refused(no_long, "long header");
        // A descriptor's segment size is never divided by unchecked.
        let mut zero = identity();
        zero.wal_segment_size = 0;
        assert!(check(&name, &[], &zero).is_err());
    }

    #[test]
    fn restored_history_files_must_fit_their_name() {
        let id = identity();
        let h3 = "1\t0/3000000\tno recovery target specified\n\n2\t0/5000060\tbefore 2026\n";
        assert_eq!(check("00000003.history", h3.as_bytes(), &id), Ok(()));
        assert_eq!(
            check(
                "00000003.history",
                b"# comment\n1\t0/3000000\treason\n",
                &id
            ),
            Ok(())
        );
        for (name, body) in [
            ("00000002.history", h3), // lists timeline 2 as its own parent
            ("00000003.history", "2\t0/5\tx\n1\t0/3\tx\n"), // parents out of order
            ("00000003.history", ""),
            ("00000003.history", "one\t0/3000000\n"),
            ("00000003.history", "1\tnot-an-lsn\n"),
        ] {
            assert!(
                check(name, body.as_bytes(), &id).is_err(),
                "{name}: {body:?}"
            );
        }
        assert!(check("00000003.history", &[0xff, 0xfe], &id).is_err());
        let huge = vec![b'#'; MAX_HISTORY_FILE as usize + 1];
        assert!(check("00000003.history", &huge, &id).is_err());

        let label = "START WAL LOCATION: 0/200028 (file 000000010000000000000002)\n\
                     STOP WAL LOCATION: 0/300100 (file 000000010000000000000003)\n";
        let name = "000000010000000000000002.00000028.backup";
        assert_eq!(check(name, label.as_bytes(), &id), Ok(()));
        for other in [
            "000000010000000000000002.00000030.backup",
            "000000010000000000000003.00000028.backup",
            "000000020000000000000002.00000028.backup",
        ] {
            assert!(check(other, label.as_bytes(), &id).is_err(), "{other}");
        }
        assert!(check(name, b"STOP WAL LOCATION: 0/300100\n", &id).is_err());
    }
}

/// Parses an LSN as PostgreSQL prints it ("16/B374D848").
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Segment number holding the byte at `lsn`.
pub fn lsn_segno(lsn: u64, seg_size: u64) -> u64 {
    lsn / seg_size
}

/// Segment number holding the byte just before `lsn` (XLByteToPrevSeg): the
/// last segment needed to replay up to `lsn`.
pub fn lsn_prev_segno(lsn: u64, seg_size: u64) -> u64 {
    lsn.saturating_sub(1) / seg_size
}

#[cfg(test)]
mod lsn_tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("x"), None);
        let seg = 16u64 << 20;
        assert_eq!(lsn_prev_segno(3 * seg, seg), 2);
        assert_eq!(lsn_segno(3 * seg, seg), 3);
    }
}
