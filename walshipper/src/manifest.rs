//! Backup manifests: ours (stored encrypted in the repository, the record of
//! a backup) and PostgreSQL's `backup_manifest` (written into a restored data
//! directory so that pg_verifybackup can check it independently).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path in the data directory (tablespaces under pg_tblspc/<oid>/).
    pub path: String,
    pub size: u64,
    pub mtime: i64,
    pub mode: u32,
    /// SHA-256 of the file's bytes as backed up, hex.
    pub sha256: String,
    /// Repository key holding the bytes.
    pub object: String,
    pub stored_size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DirEntry {
    pub path: String,
    pub mode: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TablespaceEntry {
    pub oid: u32,
    pub location: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct ChecksumFailure {
    pub path: String,
    pub blocks: Vec<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub manifest_version: u32,
    pub id: String,
    /// "full" (diff and incr come later; `based_on` names the parent).
    #[serde(rename = "type")]
    pub kind: String,
    pub based_on: Option<String>,
    pub label: String,
    pub system_identifier: String,
    pub pg_version: u32,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub start_time: String,
    pub stop_time: String,
    /// First and last WAL segment needed to make the backup consistent.
    pub wal_start: String,
    pub wal_stop: String,
    pub data_checksums: bool,
    pub checksum_failures: Vec<ChecksumFailure>,
    pub size: u64,
    pub stored_size: u64,
    pub files: Vec<FileEntry>,
    pub dirs: Vec<DirEntry>,
    pub tablespaces: Vec<TablespaceEntry>,
    /// Objects holding the backup_label and tablespace_map pg_backup_stop returned.
    pub backup_label_object: String,
    pub tablespace_map_object: Option<String>,
}

impl Manifest {
    pub fn start_lsn(&self) -> u64 {
        crate::wal::parse_lsn(&self.start_lsn).unwrap_or(0)
    }

    pub fn stop_lsn(&self) -> u64 {
        crate::wal::parse_lsn(&self.stop_lsn).unwrap_or(0)
    }

    pub fn stop_time(&self) -> Option<chrono::DateTime<chrono::FixedOffset>> {
        chrono::DateTime::parse_from_rfc3339(&self.stop_time).ok()
    }
}

/// One file line of PostgreSQL's backup_manifest.
pub struct PgManifestFile {
    pub path: String,
    pub size: u64,
    pub mtime: i64,
    pub sha256: String,
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Renders a PostgreSQL backup manifest (version 1), as pg_basebackup writes
/// it: one file per line, then the WAL range, then a SHA-256 of everything
/// before the last line.
pub fn pg_backup_manifest(
    files: &[PgManifestFile],
    timeline: u32,
    start_lsn: u64,
    stop_lsn: u64,
) -> String {
    let mut m = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
    for (i, f) in files.iter().enumerate() {
        let when = chrono::DateTime::from_timestamp(f.mtime, 0)
            .unwrap_or_default()
            .format("%Y-%m-%d %H:%M:%S GMT");
        m.push_str(&format!(
            "{{ \"Path\": {}, \"Size\": {}, \"Last-Modified\": \"{when}\", \"Checksum-Algorithm\": \"SHA256\", \"Checksum\": \"{}\" }}{}\n",
            json_str(&f.path),
            f.size,
            f.sha256,
            if i + 1 < files.len() { "," } else { "" }
        ));
    }
    m.push_str("],\n\"WAL-Ranges\": [\n");
    m.push_str(&format!(
        "{{ \"Timeline\": {timeline}, \"Start-LSN\": \"{}\", \"End-LSN\": \"{}\" }}\n",
        crate::wal::format_lsn(start_lsn),
        crate::wal::format_lsn(stop_lsn)
    ));
    m.push_str("],\n");
    let sum = hex::encode(Sha256::digest(m.as_bytes()));
    m.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
    m
}
