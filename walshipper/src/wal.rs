//! PostgreSQL WAL files: names, what archive-push accepts, and the few bytes
//! of pg_control and WAL page headers we read.

use std::io::Read;
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
const LONG_HEADER_LEN: usize = 40;

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
pub fn seg_no(log: u32, seg: u32, seg_size: u64) -> u64 {
    u64::from(log) * (0x1_0000_0000u64 / seg_size) + u64::from(seg)
}

/// Segment file name for a timeline and segment number.
pub fn segment_name(tli: u32, segno: u64, seg_size: u64) -> String {
    let per = 0x1_0000_0000u64 / seg_size;
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
            check_long_header(&h, seg_no(log, seg, id.wal_segment_size), id).map_err(bad)?;
        }
        WalFileKind::History { .. } | WalFileKind::BackupHistory { .. } => {
            if meta.len() > 16 << 20 {
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

fn check_long_header(
    h: &[u8; LONG_HEADER_LEN],
    segno: u64,
    id: &ClusterIdentity,
) -> std::result::Result<(), String> {
    let magic = u16::from_le_bytes([h[0], h[1]]);
    let info = u16::from_le_bytes([h[2], h[3]]);
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
    if pageaddr != segno * id.wal_segment_size {
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
