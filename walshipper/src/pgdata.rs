//! What a base backup copies from a data directory, following PostgreSQL's
//! own rules (src/backend/backup/basebackup.c): which directories keep only
//! their existence, which files are never copied, temporary files, unlogged
//! relations (only their init fork), and tablespaces behind pg_tblspc.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Directories whose contents are not backed up (the directory itself is).
const EXCLUDE_DIR_CONTENTS: &[&str] = &[
    "pg_wal",
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Files never backed up, wherever they are (names).
const EXCLUDE_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "pg_internal.init",
    "backup_manifest",
    // restore decides how the cluster starts
    "recovery.signal",
    "standby.signal",
];

#[derive(Clone, Debug)]
pub struct SourceFile {
    /// Path relative to the data directory; tablespace files are under
    /// `pg_tblspc/<oid>/`, as PostgreSQL names them.
    pub rel: String,
    pub abs: PathBuf,
    pub size: u64,
    pub mtime: i64,
    pub mode: u32,
}

#[derive(Clone, Debug)]
pub struct SourceDir {
    pub rel: String,
    pub mode: u32,
}

#[derive(Clone, Debug)]
pub struct Tablespace {
    pub oid: u32,
    pub location: PathBuf,
}

#[derive(Default, Debug)]
pub struct Scan {
    pub files: Vec<SourceFile>,
    pub dirs: Vec<SourceDir>,
    pub tablespaces: Vec<Tablespace>,
}

/// True if `rel` names a relation data file whose pages carry checksums.
pub fn is_relation_file(rel: &str) -> bool {
    let mut parts = rel.split('/');
    let first = parts.next().unwrap_or("");
    let in_rel_dir = matches!(first, "global" | "base" | "pg_tblspc");
    if !in_rel_dir {
        return false;
    }
    let name = rel.rsplit('/').next().unwrap_or("");
    relation_name(name).is_some()
}

/// Splits "16384_fsm.2" into ("16384", Some("fsm")); None if not a relation file name.
fn relation_name(name: &str) -> Option<(&str, Option<&str>)> {
    let base = match name.split_once('.') {
        Some((b, seg)) if !seg.is_empty() && seg.bytes().all(|c| c.is_ascii_digit()) => b,
        Some(_) => return None,
        None => name,
    };
    let (node, fork) = match base.split_once('_') {
        Some((n, f)) if ["fsm", "vm", "init"].contains(&f) => (n, Some(f)),
        Some(_) => return None,
        None => (base, None),
    };
    (!node.is_empty() && node.bytes().all(|c| c.is_ascii_digit())).then_some((node, fork))
}

/// Segment number of a relation file ("16384.3" → 3).
pub fn relation_segno(rel: &str) -> u32 {
    rel.rsplit('/')
        .next()
        .and_then(|n| n.split_once('.'))
        .and_then(|(_, s)| s.parse().ok())
        .unwrap_or(0)
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("scan {}", path.display()), e)
}

pub fn scan(data_dir: &Path) -> Result<Scan> {
    let mut scan = Scan::default();
    walk(data_dir, "", &mut scan, true)?;
    scan.files.sort_by(|a, b| a.rel.cmp(&b.rel));
    scan.dirs.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(scan)
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

fn walk(dir: &Path, rel: &str, scan: &mut Scan, top: bool) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        // Dropped while we walked: WAL replay takes care of it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !top => return Ok(()),
        Err(e) => return Err(io_err(dir, e)),
    };
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for e in entries {
        let e = e.map_err(|e| io_err(dir, e))?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            tracing::warn!("skipping non-UTF-8 name in {}", dir.display());
            continue;
        };
        names.push((name, e.path()));
    }
    // Unlogged relations: those with an init fork keep only the init fork.
    let unlogged: HashSet<String> = names
        .iter()
        .filter_map(|(n, _)| match relation_name(n) {
            Some((node, Some("init"))) => Some(node.to_string()),
            _ => None,
        })
        .collect();
    for (name, path) in names {
        let child_rel = join(rel, &name);
        if name.starts_with("pgsql_tmp") || EXCLUDE_FILES.contains(&name.as_str()) {
            continue;
        }
        if !unlogged.is_empty() {
            if let Some((node, fork)) = relation_name(&name) {
                if unlogged.contains(node) && fork != Some("init") {
                    continue;
                }
            }
        }
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&path, e)),
        };
        let ft = meta.file_type();
        if rel == "pg_tblspc" && ft.is_symlink() {
            let oid: u32 = name.parse().map_err(|_| {
                Error::Invalid(format!(
                    "unexpected entry pg_tblspc/{name} in the data directory"
                ))
            })?;
            let location = fs::read_link(&path).map_err(|e| io_err(&path, e))?;
            scan.tablespaces.push(Tablespace {
                oid,
                location: location.clone(),
            });
            scan.dirs.push(SourceDir {
                rel: child_rel.clone(),
                mode: 0o700,
            });
            walk(&location, &child_rel, scan, false)?;
            continue;
        }
        // pg_wal may be a symlink to another disk: follow it like PostgreSQL.
        let meta = if ft.is_symlink() {
            match fs::metadata(&path) {
                Ok(m) => m,
                Err(_) => continue,
            }
        } else {
            meta
        };
        if meta.is_dir() {
            scan.dirs.push(SourceDir {
                rel: child_rel.clone(),
                mode: meta.mode() & 0o7777,
            });
            if top && EXCLUDE_DIR_CONTENTS.contains(&name.as_str()) {
                if name == "pg_wal" {
                    scan.dirs.push(SourceDir {
                        rel: "pg_wal/archive_status".into(),
                        mode: 0o700,
                    });
                }
                continue;
            }
            walk(&path, &child_rel, scan, false)?;
        } else if meta.is_file() {
            scan.files.push(SourceFile {
                rel: child_rel,
                abs: path,
                size: meta.len(),
                mtime: meta.mtime(),
                mode: meta.mode() & 0o7777,
            });
        }
        // Sockets, FIFOs and other links are not data.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_names() {
        assert!(is_relation_file("base/5/16384"));
        assert!(is_relation_file("base/5/16384.12"));
        assert!(is_relation_file("base/5/16384_fsm"));
        assert!(is_relation_file("global/1262_vm"));
        assert!(is_relation_file("pg_tblspc/16390/PG_15_202209061/5/16391"));
        assert!(!is_relation_file("base/5/PG_VERSION"));
        assert!(!is_relation_file("base/5/pg_filenode.map"));
        assert!(!is_relation_file("global/pg_control"));
        assert!(!is_relation_file("pg_xact/0000"));
        assert!(!is_relation_file("base/5/16384_xyz"));
        assert_eq!(relation_segno("base/5/16384.3"), 3);
        assert_eq!(relation_segno("base/5/16384"), 0);
    }

    #[test]
    fn scan_follows_the_rules() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for dir in [
            "base/5",
            "global",
            "pg_wal/archive_status",
            "pg_stat_tmp",
            "pg_tblspc",
            "pg_xact",
        ] {
            fs::create_dir_all(p.join(dir)).unwrap();
        }
        for f in [
            "PG_VERSION",
            "postmaster.pid",
            "backup_label",
            "global/pg_control",
            "pg_wal/000000010000000000000001",
            "pg_stat_tmp/x",
            "base/5/100",
            "base/5/200",
            "base/5/200_init",
            "base/5/200_fsm",
            "base/5/pg_internal.init",
            "base/5/pgsql_tmp123",
            "pg_xact/0000",
        ] {
            fs::write(p.join(f), b"x").unwrap();
        }
        let ts = tempfile::tempdir().unwrap();
        fs::create_dir_all(ts.path().join("PG_15_1/5")).unwrap();
        fs::write(ts.path().join("PG_15_1/5/300"), b"y").unwrap();
        std::os::unix::fs::symlink(ts.path(), p.join("pg_tblspc/16400")).unwrap();
        let s = scan(p).unwrap();
        let files: Vec<_> = s.files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(
            files,
            vec![
                "PG_VERSION",
                "base/5/100",
                "base/5/200_init",
                "global/pg_control",
                "pg_tblspc/16400/PG_15_1/5/300",
                "pg_xact/0000"
            ]
        );
        let dirs: Vec<_> = s.dirs.iter().map(|d| d.rel.as_str()).collect();
        assert!(
            dirs.contains(&"pg_wal")
                && dirs.contains(&"pg_wal/archive_status")
                && dirs.contains(&"pg_stat_tmp")
        );
        assert_eq!(s.tablespaces.len(), 1);
        assert_eq!(s.tablespaces[0].oid, 16400);
    }
}
