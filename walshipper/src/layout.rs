//! The repository's key layout, in one place: every object name walshipper
//! writes or reads is built and parsed here (docs/repository-format.md,
//! "Layout"). Parsers are strict: a key read back from a listing or a
//! manifest is untrusted, and anything that is not exactly what a writer
//! would have produced is `None`, never a path to follow.

use crate::wal::{self, WalFileKind};

/// The descriptor, written last by repo-init.
pub const DESCRIPTOR: &str = "repository.json";
/// Prefixes for listings.
pub const KEYS_PREFIX: &str = "keys/";
pub const WAL_PREFIX: &str = "wal/";
pub const BACKUPS_PREFIX: &str = "backups/";
pub const LOCKS_PREFIX: &str = "locks/";
pub const EXPIRED_PREFIX: &str = "expired/";
pub const RECOVERIES_PREFIX: &str = "recoveries/";
/// The streaming receiver's durable pieces of the segment it is filling
/// (`stream.rs`, docs/repository-format.md "Streamed partial segments").
pub const STREAM_PREFIX: &str = "stream/";

/// A parsed repository key: what the object is and whose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectName {
    Descriptor,
    /// `keys/<32 hex>.json`
    KeyFile {
        key_id: String,
    },
    /// `wal/<TTTTTTTTLLLLLLLL>/<name>` or `wal/history/<TTTTTTTT>.history`
    Wal {
        name: String,
        kind: WalFileKind,
    },
    /// `backups/<id>/...`
    Backup {
        id: String,
        part: BackupPart,
    },
    /// `locks/<name>.lease`
    Lease {
        name: String,
    },
    /// `expired/<id>`: this repository's retention removed backup `id`
    /// (repo-sync must not bring it back here).
    Tombstone {
        id: String,
    },
    /// `recoveries/<id>`: what a restore did (`recovery_log`).
    Recovery {
        id: String,
    },
    /// `stream/<segment>/<start>-<end>`: bytes `start..end` (8 upper-case
    /// hex digits each) of WAL segment `segment`, stored by `wal-receive`
    /// before the segment was complete.
    StreamChunk {
        segment: String,
        start: u32,
        end: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupPart {
    Manifest,
    BackupLabel,
    TablespaceMap,
    /// A data-directory file (whole, or a block delta), by relative path.
    Data(String),
    /// A block map or map delta, by relative path.
    Map(String),
    /// A bundle of small files (`bundle/<n>`, n zero-padded to 6 digits).
    Bundle(u64),
}

pub fn key_file(key_id: &str) -> String {
    format!("{KEYS_PREFIX}{key_id}.json")
}

/// Where a WAL file (segment, partial, backup history, timeline history) is stored.
pub fn wal(name: &str, kind: &WalFileKind) -> String {
    match kind {
        WalFileKind::History { .. } => format!("{WAL_PREFIX}history/{name}"),
        _ => format!("{WAL_PREFIX}{}/{name}", &name[0..16]),
    }
}

/// Where segment `segno` of timeline `tli` is stored.
pub fn wal_segment(tli: u32, segno: u64, seg_size: u64) -> String {
    let name = wal::segment_name(tli, segno, seg_size);
    format!("{WAL_PREFIX}{}/{name}", &name[0..16])
}

/// Where `wal-receive` keeps the durable pieces of segment `segment`.
pub fn stream_prefix(segment: &str) -> String {
    format!("{STREAM_PREFIX}{segment}/")
}

/// Bytes `start..end` of segment `segment`, streamed.
pub fn stream_chunk(segment: &str, start: u32, end: u32) -> String {
    format!("{STREAM_PREFIX}{segment}/{start:08X}-{end:08X}")
}

fn parse_stream_chunk(rest: &str) -> Option<ObjectName> {
    let (segment, range) = rest.split_once('/')?;
    if !matches!(
        wal::parse_name(segment),
        Some(WalFileKind::Segment { partial: false, .. })
    ) {
        return None;
    }
    let (a, b) = range.split_once('-')?;
    let hex = |s: &str| {
        (s.len() == 8
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c)))
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
    };
    let (start, end) = (hex(a)?, hex(b)?);
    (start < end).then(|| ObjectName::StreamChunk {
        segment: segment.into(),
        start,
        end,
    })
}

pub fn backup_prefix(id: &str) -> String {
    format!("{BACKUPS_PREFIX}{id}/")
}

pub fn manifest(id: &str) -> String {
    format!("{BACKUPS_PREFIX}{id}/manifest")
}

pub fn backup_label(id: &str) -> String {
    format!("{BACKUPS_PREFIX}{id}/backup_label")
}

pub fn tablespace_map(id: &str) -> String {
    format!("{BACKUPS_PREFIX}{id}/tablespace_map")
}

pub fn backup_data(id: &str, rel: &str) -> String {
    format!("{BACKUPS_PREFIX}{id}/data/{rel}")
}

pub fn backup_map(id: &str, rel: &str) -> String {
    format!("{BACKUPS_PREFIX}{id}/map/{rel}")
}

/// Bundle `n` of backup `id`: the concatenated bytes of small files.
pub fn backup_bundle(id: &str, n: u64) -> String {
    format!("{BACKUPS_PREFIX}{id}/bundle/{n:06}")
}

/// The bundle number of `bundle/<n>`: decimal digits as `backup_bundle`
/// writes them (at least 6, zero-padded, no other leading zero).
fn parse_bundle_number(s: &str) -> Option<u64> {
    if s.len() < 6 || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = s.parse().ok()?;
    (format!("{n:06}") == s).then_some(n)
}

/// The record of a restore (`recovery_log`).
pub fn recovery(id: &str) -> String {
    format!("{RECOVERIES_PREFIX}{id}")
}

/// `YYYYmmddTHHMMSSZ-` then 8 lowercase hex digits.
pub fn is_recovery_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 25
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[15] == b'Z'
        && b[16] == b'-'
        && b[17..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// The tombstone expire writes before it removes backup `id`.
pub fn tombstone(id: &str) -> String {
    format!("{EXPIRED_PREFIX}{id}")
}

pub fn lease(name: &str) -> String {
    format!("{LOCKS_PREFIX}{name}.lease")
}

/// The S3 driver's verdict on whether the store honours conditional writes
/// (`conditional_writes = "auto"`), and the scratch object of the probe.
pub const CONDITIONAL_WRITES: &str = "locks/conditional-writes.json";

pub fn write_probe(token: &str) -> String {
    format!("{LOCKS_PREFIX}probe-{token}")
}

/// `YYYYMMDD-HHMMSS` then `F`, `D` or `I`, then an optional counter (2..999)
/// for backups started in the same second.
pub fn is_backup_id(id: &str) -> bool {
    let b = id.as_bytes();
    if b.len() < 16 || b.len() > 19 || b[8] != b'-' {
        return false;
    }
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    digits(&b[0..8])
        && digits(&b[9..15])
        && matches!(b[15], b'F' | b'D' | b'I')
        && digits(&b[16..])
        && (b.len() == 16 || b[16] != b'0')
}

/// The type letter of a backup id: `full`, `diff` or `incr`.
pub fn backup_id_type(id: &str) -> Option<&'static str> {
    if !is_backup_id(id) {
        return None;
    }
    match id.as_bytes()[15] {
        b'F' => Some("full"),
        b'D' => Some("diff"),
        _ => Some("incr"),
    }
}

/// A path relative to the data directory as a manifest may name it: `/`-
/// separated normal components only (no empty, `.` or `..` component, no
/// leading `/`, no NUL). Restore joins these to the target directory, so
/// this is what keeps a hostile manifest inside it.
pub fn is_safe_rel_path(rel: &str) -> bool {
    !rel.is_empty()
        && rel.len() <= 4096
        && !rel.contains('\0')
        && rel
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && c.len() <= 255)
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a repository key; `None` for anything a writer would not produce.
pub fn parse(key: &str) -> Option<ObjectName> {
    if key == DESCRIPTOR {
        return Some(ObjectName::Descriptor);
    }
    if let Some(rest) = key.strip_prefix(KEYS_PREFIX) {
        let id = rest.strip_suffix(".json")?;
        return is_lower_hex(id, 32).then(|| ObjectName::KeyFile { key_id: id.into() });
    }
    if let Some(rest) = key.strip_prefix(WAL_PREFIX) {
        let (dir, name) = rest.split_once('/')?;
        let kind = wal::parse_name(name)?;
        // The directory must be the one the writer derives from the name.
        return (wal(name, &kind) == key).then(|| {
            debug_assert!(dir == "history" || dir.len() == 16);
            ObjectName::Wal {
                name: name.into(),
                kind,
            }
        });
    }
    if let Some(rest) = key.strip_prefix(STREAM_PREFIX) {
        return parse_stream_chunk(rest);
    }
    if let Some(rest) = key.strip_prefix(BACKUPS_PREFIX) {
        let (id, part) = rest.split_once('/')?;
        if !is_backup_id(id) {
            return None;
        }
        let part = match part {
            "manifest" => BackupPart::Manifest,
            "backup_label" => BackupPart::BackupLabel,
            "tablespace_map" => BackupPart::TablespaceMap,
            p => {
                if let Some(rel) = p.strip_prefix("data/") {
                    is_safe_rel_path(rel).then(|| BackupPart::Data(rel.into()))?
                } else if let Some(rel) = p.strip_prefix("map/") {
                    is_safe_rel_path(rel).then(|| BackupPart::Map(rel.into()))?
                } else if let Some(n) = p.strip_prefix("bundle/") {
                    BackupPart::Bundle(parse_bundle_number(n)?)
                } else {
                    return None;
                }
            }
        };
        return Some(ObjectName::Backup {
            id: id.into(),
            part,
        });
    }
    if let Some(id) = key.strip_prefix(EXPIRED_PREFIX) {
        return is_backup_id(id).then(|| ObjectName::Tombstone { id: id.into() });
    }
    if let Some(id) = key.strip_prefix(RECOVERIES_PREFIX) {
        return is_recovery_id(id).then(|| ObjectName::Recovery { id: id.into() });
    }
    if let Some(rest) = key.strip_prefix(LOCKS_PREFIX) {
        let name = rest.strip_suffix(".lease")?;
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        return ok.then(|| ObjectName::Lease { name: name.into() });
    }
    None
}

/// The backup a key belongs to, if it is a well-formed backup key.
pub fn backup_of(key: &str) -> Option<String> {
    match parse(key)? {
        ObjectName::Backup { id, .. } => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_round_trip() {
        let seg = wal_segment(1, 256 + 3, 16 << 20);
        assert_eq!(seg, "wal/0000000100000001/000000010000000100000003");
        assert!(matches!(parse(&seg), Some(ObjectName::Wal { .. })));
        let h = wal("00000002.history", &WalFileKind::History { tli: 2 });
        assert_eq!(h, "wal/history/00000002.history");
        assert!(matches!(parse(&h), Some(ObjectName::Wal { .. })));
        let id = "20261121-224754F";
        assert_eq!(
            parse(&manifest(id)),
            Some(ObjectName::Backup {
                id: id.into(),
                part: BackupPart::Manifest
            })
        );
        assert_eq!(
            parse(&backup_data("20261121-224754I2", "base/5/16384")),
            Some(ObjectName::Backup {
                id: "20261121-224754I2".into(),
                part: BackupPart::Data("base/5/16384".into())
            })
        );
        let b = backup_bundle(id, 7);
        assert_eq!(b, "backups/20261121-224754F/bundle/000007");
        assert_eq!(
            parse(&b),
            Some(ObjectName::Backup {
                id: id.into(),
                part: BackupPart::Bundle(7)
            })
        );
        assert_eq!(
            parse(&backup_bundle(id, 1234567)),
            Some(ObjectName::Backup {
                id: id.into(),
                part: BackupPart::Bundle(1234567)
            })
        );
        let k = key_file("b9e74f7fed63d9c51335eab2976b86c5");
        assert!(matches!(parse(&k), Some(ObjectName::KeyFile { .. })));
        assert_eq!(parse(DESCRIPTOR), Some(ObjectName::Descriptor));
        assert!(matches!(
            parse(&lease("backup")),
            Some(ObjectName::Lease { .. })
        ));
        assert_eq!(tombstone(id), "expired/20261121-224754F");
        let c = stream_chunk("000000010000000100000003", 0x2000, 0x1_0000);
        assert_eq!(c, "stream/000000010000000100000003/00002000-00010000");
        assert_eq!(
            parse(&c),
            Some(ObjectName::StreamChunk {
                segment: "000000010000000100000003".into(),
                start: 0x2000,
                end: 0x1_0000
            })
        );
        let r = "20261126T061500Z-0a1b2c3d";
        assert_eq!(
            parse(&recovery(r)),
            Some(ObjectName::Recovery { id: r.into() })
        );
        assert_eq!(
            parse(&tombstone(id)),
            Some(ObjectName::Tombstone { id: id.into() })
        );
    }

    #[test]
    fn hostile_keys_are_refused() {
        for k in [
            "backups/20261121-224754F/data/../../etc/passwd",
            "backups/20261121-224754F/data//etc/passwd",
            "backups/20261121-224754F/data/base/./5",
            "backups/20261121-224754F/data/",
            "backups/../manifest",
            "backups/2026112-224754F/manifest",
            "backups/20261121-224754X/manifest",
            "backups/20261121-224754F0/manifest",
            "backups/20261121-224754F/other",
            "backups/20261121-224754F/bundle/1",
            "backups/20261121-224754F/bundle/0000001",
            "backups/20261121-224754F/bundle/00000a",
            "backups/20261121-224754F/bundle/+00001",
            "backups/20261121-224754F/bundle/",
            "backups/20261121-224754F/bundle/000001/x",
            "backups/20261121-224754F/bundle/99999999999999999999",
            "wal/0000000200000001/000000010000000100000003",
            "wal/history/000000010000000100000003",
            "wal/0000000100000001/00000001.history",
            "wal/0000000100000001/000000010000000100000003.x",
            "keys/B9E74F7FED63D9C51335EAB2976B86C5.json",
            "keys/../repository.json",
            "locks/../x.lease",
            "expired/",
            "expired/20261121-224754X",
            "expired/20261121-224754F/",
            "expired/20261121-224754F/manifest",
            "expired/../20261121-224754F",
            "expired/20261121-224754F.json",
            "recoveries/",
            "stream/000000010000000100000003/00002000-00002000",
            "stream/000000010000000100000003/00003000-00002000",
            "stream/000000010000000100000003/00002000-0001000a",
            "stream/000000010000000100000003/2000-10000",
            "stream/000000010000000100000003.partial/00000000-00002000",
            "stream/00000001.history/00000000-00002000",
            "stream/000000010000000100000003/00000000-00002000/x",
            "stream/000000010000000100000003",
            "recoveries/20261126T061500Z-0a1b2c3",
            "recoveries/20261126T061500Z-0A1B2C3D",
            "recoveries/../20261126T061500Z-0a1b2c3d",
            "recoveries/20261126T061500Z-0a1b2c3d/x",
            "",
            "repository.json.bak",
        ] {
            assert_eq!(parse(k), None, "{k}");
        }
    }

    #[test]
    fn rel_paths() {
        assert!(is_safe_rel_path("base/1/1259"));
        assert!(is_safe_rel_path("pg_tblspc/16390/PG_15_202209061/5/16391"));
        for p in ["", "/etc", "a/../b", "..", ".", "a//b", "a/", "a\0b"] {
            assert!(!is_safe_rel_path(p), "{p:?}");
        }
    }

    #[test]
    fn backup_ids() {
        assert!(is_backup_id("20261121-224754F"));
        assert!(is_backup_id("20261121-224754D2"));
        assert!(is_backup_id("20261121-224754I999"));
        assert!(!is_backup_id("20261121-224754I9999"));
        assert!(!is_backup_id("20261121-224754I0"));
        assert!(!is_backup_id("20261121 224754F"));
        assert_eq!(backup_id_type("20261121-224754D"), Some("diff"));
    }
}
