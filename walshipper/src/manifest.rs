//! Backup manifests: ours (stored encrypted in the repository, the record of
//! a backup) and PostgreSQL's `backup_manifest` (written into a restored data
//! directory so that pg_verifybackup can check it independently).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// 2: files may refer to earlier backups' objects and carry block deltas.
pub const MANIFEST_VERSION: u32 = 2;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path in the data directory (tablespaces under pg_tblspc/<oid>/).
    pub path: String,
    pub size: u64,
    pub mtime: i64,
    pub mode: u32,
    /// SHA-256 of the file's bytes as backed up, hex.
    pub sha256: String,
    /// Repository key holding the whole file, as this or an earlier backup
    /// stored it (an unchanged file refers to the earlier backup's object).
    pub object: String,
    /// Block deltas (docs/repository-format.md) applied on top of `object`,
    /// in order, to give this backup's version of the file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<String>,
    /// Block map of the file (large files): the full map, then one map delta
    /// per entry of `deltas`. The next diff/incr compares against it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maps: Vec<String>,
    /// Bytes this backup stored for the file (0 when it refers to earlier objects).
    pub stored_size: u64,
}

impl FileEntry {
    /// Every object this entry needs.
    pub fn objects(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.object)
            .chain(self.deltas.iter())
            .chain(self.maps.iter())
    }
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
    /// "full", "diff" (changes since the last full) or "incr" (changes since
    /// the last backup of any type); `based_on` names the reference backup.
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

    /// Every object key the backup needs, its own and earlier backups'.
    pub fn objects(&self) -> impl Iterator<Item = &String> {
        self.files
            .iter()
            .flat_map(FileEntry::objects)
            .chain(std::iter::once(&self.backup_label_object))
            .chain(self.tablespace_map_object.iter())
    }

    /// The other backups whose objects this one uses: restoring it needs them.
    pub fn depends_on(&self) -> std::collections::BTreeSet<String> {
        self.objects()
            .filter_map(|k| crate::layout::backup_of(k))
            .filter(|id| *id != self.id)
            .collect()
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
