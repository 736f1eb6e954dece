//! Backup manifests: ours (stored encrypted in the repository, the record of
//! a backup) and PostgreSQL's `backup_manifest` (written into a restored data
//! directory so that pg_verifybackup can check it independently).

use std::collections::{BTreeSet, HashSet};
use std::path::{Component, Path};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::{HashAlg, PlainHash};
use crate::error::{Error, Result};
use crate::layout::{self, BackupPart, ObjectName};

/// 2: files may refer to earlier backups' objects and carry block deltas.
/// 3: small files may be stored in bundles (`object` a bundle, `offset`).
/// 4: files carry their BLAKE3 (`blake3`) instead of their SHA-256; an
///    entry carried over from an older manifest keeps its `sha256`.
/// 5: its block deltas may be version 2 (XOR and filtered records): a
///    reader that knows only 4 refuses the backup as written by a newer
///    walshipper before restoring anything, instead of meeting `WSDELTA2`
///    halfway through a restore and calling it damage.
/// 6: its block deltas may be version 3 and its maps `WSBMAP02` (entries
///    that merge into the file's BLAKE3): refused whole by a reader that
///    knows only 5, for the same reason.
pub const MANIFEST_VERSION: u32 = 6;
/// The first manifest version whose files may carry `blake3`.
const BLAKE3_SINCE: u32 = 4;

/// Bundled files are smaller than this (delta::MAP_MIN): a reader holds one
/// bundled file in memory at a time, so the bound is checked on every entry.
pub const BUNDLED_MAX: u64 = crate::delta::MAP_MIN;

/// A file of a backup. In JSON its hash is one of two fields, `sha256` or
/// `blake3` (64 lowercase hex digits; `WireEntry`); in memory it is the
/// 32 bytes and their algorithm (`hash`), not two optional hex strings: a
/// manifest of many files is held whole by backup and restore, and this
/// halves what an entry takes (issue 17).
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "WireEntry")]
pub struct FileEntry {
    /// Path in the data directory (tablespaces under pg_tblspc/<oid>/).
    pub path: String,
    pub size: u64,
    pub mtime: i64,
    pub mode: u32,
    /// The file's bytes as backed up, hashed: BLAKE3 (manifest version 4),
    /// or SHA-256 in entries of manifests before version 4 and entries of
    /// later ones carried over from them (a large file found unchanged is
    /// not hashed again).
    pub hash: PlainHash,
    /// Repository key holding the whole file, as this or an earlier backup
    /// stored it (an unchanged file refers to the earlier backup's object).
    /// Shared: the files of one bundle hold one copy of its key.
    pub object: Arc<str>,
    /// Block deltas (docs/repository-format.md) applied on top of `object`,
    /// in order, to give this backup's version of the file. Boxed slices
    /// (16 bytes, not a Vec's 24): empty for most files.
    pub deltas: Box<[String]>,
    /// Block map of the file (large files): the full map, then one map delta
    /// per entry of `deltas`. The next diff/incr compares against it.
    pub maps: Box<[String]>,
    /// Set when `object` is a bundle: where the file's `size` bytes start
    /// in the bundle's plaintext.
    pub offset: Option<u64>,
    /// Bytes this backup stored for the file (0 when it refers to earlier
    /// objects; a bundled file's share of its bundle's stored bytes).
    pub stored_size: u64,
}

/// A file entry as its JSON has it. Read with the hash fields checked
/// (exactly one, 64 lowercase hex digits: `FileEntry::try_from`); the
/// manifest's version is checked against the algorithm by `validate`.
#[derive(Deserialize)]
struct WireEntry {
    path: String,
    size: u64,
    mtime: i64,
    mode: u32,
    #[serde(default)]
    sha256: Option<WireHex>,
    #[serde(default)]
    blake3: Option<WireHex>,
    object: String,
    #[serde(default)]
    deltas: Box<[String]>,
    #[serde(default)]
    maps: Box<[String]>,
    #[serde(default)]
    offset: Option<u64>,
    stored_size: u64,
}

/// A hash field's text, decoded as it is read (no String per entry):
/// None when it is not 64 lowercase hex digits.
struct WireHex(Option<[u8; 32]>);

impl<'de> Deserialize<'de> for WireHex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = WireHex;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a hash in hex")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<WireHex, E> {
                let lower = v
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                let mut bytes = [0u8; 32];
                let ok = lower && v.len() == 64 && hex::decode_to_slice(v, &mut bytes).is_ok();
                Ok(WireHex(ok.then_some(bytes)))
            }
        }
        d.deserialize_str(V)
    }
}

impl TryFrom<WireEntry> for FileEntry {
    type Error = String;

    fn try_from(w: WireEntry) -> std::result::Result<FileEntry, String> {
        let (alg, hex) = match (w.sha256, w.blake3) {
            (Some(h), None) => (HashAlg::Sha256, h),
            (None, Some(h)) => (HashAlg::Blake3, h),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "file {:?} has both a SHA-256 and a BLAKE3 hash",
                    w.path
                ))
            }
            (None, None) => return Err(format!("file {:?} has no hash", w.path)),
        };
        let Some(bytes) = hex.0 else {
            return Err(format!(
                "file {:?}: its {alg} is not 64 lowercase hex digits",
                w.path
            ));
        };
        Ok(FileEntry {
            path: w.path,
            size: w.size,
            mtime: w.mtime,
            mode: w.mode,
            hash: PlainHash { alg, bytes },
            object: w.object.into(),
            deltas: w.deltas,
            maps: w.maps,
            offset: w.offset,
            stored_size: w.stored_size,
        })
    }
}

/// Reads a manifest's file list, the entries of one object (a bundle's
/// files, listed one after another in path order) sharing one copy of its
/// key. Grown as entries come: never sized by what the input announces.
fn files_sharing_objects<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<FileEntry>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<FileEntry>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of files")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Vec<FileEntry>, A::Error> {
            let mut files: Vec<FileEntry> = Vec::new();
            while let Some(mut f) = seq.next_element::<FileEntry>()? {
                if let Some(prev) = files.last() {
                    if prev.object == f.object {
                        f.object = prev.object.clone();
                    }
                }
                files.push(f);
            }
            Ok(files)
        }
    }
    d.deserialize_seq(V)
}

impl Serialize for FileEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        // The JSON a WireEntry reads, without copying the entry.
        #[derive(Serialize)]
        struct Out<'a> {
            path: &'a str,
            size: u64,
            mtime: i64,
            mode: u32,
            #[serde(skip_serializing_if = "Option::is_none")]
            sha256: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            blake3: Option<&'a str>,
            object: &'a str,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            deltas: &'a [String],
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            maps: &'a [String],
            #[serde(skip_serializing_if = "Option::is_none")]
            offset: Option<u64>,
            stored_size: u64,
        }
        let mut buf = [0u8; 64];
        let hex = hex::encode_to_slice(self.hash.bytes, &mut buf)
            .ok()
            .and_then(|()| std::str::from_utf8(&buf).ok())
            .ok_or_else(|| serde::ser::Error::custom("hash to hex"))?;
        let sha = self.hash.alg == HashAlg::Sha256;
        Out {
            path: &self.path,
            size: self.size,
            mtime: self.mtime,
            mode: self.mode,
            sha256: sha.then_some(hex),
            blake3: (!sha).then_some(hex),
            object: &self.object,
            deltas: &self.deltas,
            maps: &self.maps,
            offset: self.offset,
            stored_size: self.stored_size,
        }
        .serialize(s)
    }
}

impl FileEntry {
    /// The algorithm to hash the file's bytes with to compare them with
    /// this entry.
    pub fn hash_alg(&self) -> HashAlg {
        self.hash.alg
    }

    /// Whether `h` is the entry's hash: the same algorithm and value.
    pub fn hash_is(&self, h: &PlainHash) -> bool {
        self.hash == *h
    }

    /// Records `h` as the file's hash (replacing one of either algorithm).
    pub fn set_hash(&mut self, h: &PlainHash) {
        self.hash = *h;
    }

    /// The recorded hash for messages, e.g. "BLAKE3 9f…".
    pub fn hash_text(&self) -> String {
        self.hash.to_string()
    }

    /// The SHA-256 in hex, if that is the entry's algorithm (for
    /// PostgreSQL's backup_manifest, which knows no BLAKE3).
    pub fn sha256_hex(&self) -> Option<String> {
        (self.hash.alg == HashAlg::Sha256).then(|| self.hash.hex())
    }

    /// Every object this entry needs.
    pub fn objects(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&*self.object)
            .chain(self.deltas.iter().map(String::as_str))
            .chain(self.maps.iter().map(String::as_str))
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

/// A database of the cluster as pg_database listed it at backup time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseEntry {
    pub oid: u32,
    pub name: String,
}

/// Most databases a manifest may list (a bound on what is read back, far
/// above any real cluster).
pub const MAX_DATABASES: usize = 100_000;
/// PostgreSQL's longest identifier (NAMEDATALEN - 1).
pub const MAX_DATABASE_NAME: usize = 63;
/// PostgreSQL's FirstNormalObjectId: oids below it are initdb's.
pub const FIRST_NORMAL_OID: u32 = 16384;

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
    #[serde(deserialize_with = "files_sharing_objects")]
    pub files: Vec<FileEntry>,
    pub dirs: Vec<DirEntry>,
    pub tablespaces: Vec<TablespaceEntry>,
    /// Objects holding the backup_label and tablespace_map pg_backup_stop returned.
    pub backup_label_object: String,
    pub tablespace_map_object: Option<String>,
    /// The cluster's databases (pg_database at the end of the backup), for
    /// `restore --db-include`. Empty in manifests of walshipper before it.
    #[serde(default)]
    pub databases: Vec<DatabaseEntry>,
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
    pub fn objects(&self) -> impl Iterator<Item = &str> {
        self.files
            .iter()
            .flat_map(FileEntry::objects)
            .chain(std::iter::once(self.backup_label_object.as_str()))
            .chain(self.tablespace_map_object.as_deref())
    }

    /// The other backups whose objects this one uses: restoring it needs them.
    pub fn depends_on(&self) -> BTreeSet<String> {
        self.objects()
            .filter_map(layout::backup_of)
            .filter(|id| *id != self.id)
            .collect()
    }

    /// What a listing of backups keeps of this manifest (`BackupSummary`).
    pub fn summary(&self) -> BackupSummary {
        BackupSummary {
            id: self.id.clone(),
            kind: self.kind.clone(),
            based_on: self.based_on.clone(),
            label: self.label.clone(),
            pg_version: self.pg_version,
            timeline: self.timeline,
            start_lsn: self.start_lsn.clone(),
            stop_lsn: self.stop_lsn.clone(),
            start_time: self.start_time.clone(),
            stop_time: self.stop_time.clone(),
            wal_start: self.wal_start.clone(),
            wal_stop: self.wal_stop.clone(),
            size: self.size,
            stored_size: self.stored_size,
            files: self.files.len(),
            checksum_failure_blocks: self.checksum_failures.iter().map(|f| f.blocks.len()).sum(),
            tablespaces: self.tablespaces.clone(),
            depends_on: self.depends_on(),
        }
    }

    /// The manifest's JSON as a reader, for `Repository::put_object`: the
    /// file list is serialized one entry at a time as the encoder reads, so
    /// a manifest of many files is never held as one body beside its
    /// entries (a few hundred bytes per file). Reads back as `to_vec` would.
    pub fn json_reader(&self) -> Result<JsonReader<'_>> {
        self.json_reader_with(Box::new(self.files.iter().cloned().map(Ok)))
    }

    /// `json_reader` with `files` as the file list (in place of
    /// `self.files`): entries read one at a time as the encoder reads, for
    /// a list kept in a local spool (`crate::file_list`). An error of
    /// `files` is the reader's.
    pub fn json_reader_with<'a>(
        &self,
        files: Box<dyn Iterator<Item = Result<FileEntry>> + 'a>,
    ) -> Result<JsonReader<'a>> {
        // Everything but the files, listed field by field: a field added
        // to Manifest must be added here (the literal is exhaustive).
        let head = Manifest {
            manifest_version: self.manifest_version,
            id: self.id.clone(),
            kind: self.kind.clone(),
            based_on: self.based_on.clone(),
            label: self.label.clone(),
            system_identifier: self.system_identifier.clone(),
            pg_version: self.pg_version,
            timeline: self.timeline,
            start_lsn: self.start_lsn.clone(),
            stop_lsn: self.stop_lsn.clone(),
            start_time: self.start_time.clone(),
            stop_time: self.stop_time.clone(),
            wal_start: self.wal_start.clone(),
            wal_stop: self.wal_stop.clone(),
            data_checksums: self.data_checksums,
            checksum_failures: self.checksum_failures.clone(),
            size: self.size,
            stored_size: self.stored_size,
            files: Vec::new(),
            dirs: self.dirs.clone(),
            tablespaces: self.tablespaces.clone(),
            backup_label_object: self.backup_label_object.clone(),
            tablespace_map_object: self.tablespace_map_object.clone(),
            databases: self.databases.clone(),
        };
        let json_err = |e: serde_json::Error| Error::Invalid(format!("manifest to JSON: {e}"));
        let serde_json::Value::Object(mut fields) =
            serde_json::to_value(&head).map_err(json_err)?
        else {
            return Err(Error::Invalid("manifest to JSON: not an object".into()));
        };
        fields.remove("files");
        // `{"field":value,...,"files":[` then the entries, then `]}`.
        let mut buf = serde_json::to_vec(&fields).map_err(json_err)?;
        buf.pop();
        if !fields.is_empty() {
            buf.push(b',');
        }
        buf.extend_from_slice(br#""files":["#);
        Ok(JsonReader {
            files,
            first: true,
            buf,
            pos: 0,
            ended: false,
        })
    }

    /// Parses the manifest stored under `key` and `validate`s it.
    pub fn decode(key: &str, body: &[u8]) -> Result<Manifest> {
        let m: Manifest = serde_json::from_slice(body).map_err(|e| Error::Corrupt {
            key: key.to_string(),
            reason: format!("manifest is not valid JSON: {e}"),
        })?;
        m.validate(key)?;
        Ok(m)
    }

    /// Checks a manifest read back from repository key `key` (untrusted):
    /// its id is the one in its key and its type the id's letter; every
    /// path is relative with normal components only; every object is a
    /// backup object of the right part, for the entry's own path, of this
    /// backup or an earlier one; tablespaces have a positive oid and an
    /// absolute, normalized location, no two at or inside one another.
    /// A newer manifest version is `Error::Repository` (upgrade);
    /// anything else wrong is `Error::Corrupt` naming `key`.
    pub fn validate(&self, key: &str) -> Result<()> {
        let bad = |reason: String| Error::Corrupt {
            key: key.to_string(),
            reason,
        };
        match layout::parse(key) {
            Some(ObjectName::Backup {
                id,
                part: BackupPart::Manifest,
            }) if id == self.id => {}
            Some(ObjectName::Backup {
                part: BackupPart::Manifest,
                ..
            }) => {
                return Err(bad(format!(
                    "it holds the manifest of backup {:?}, not of the backup its name says (a manifest copied or moved in the repository)",
                    self.id
                )))
            }
            _ => return Err(bad("not a backup manifest's key".into())),
        }
        if self.manifest_version > MANIFEST_VERSION {
            return Err(Error::Repository(format!(
                "backup {} was written by a newer walshipper (manifest version {}); upgrade walshipper to read this repository",
                self.id, self.manifest_version
            )));
        }
        if self.manifest_version == 0 {
            return Err(bad("manifest version 0".into()));
        }
        // Times are repeated to others (info --json, the SQL catalog): only
        // times that parse.
        for (what, t) in [
            ("start_time", &self.start_time),
            ("stop_time", &self.stop_time),
        ] {
            if t.len() > 64 || chrono::DateTime::parse_from_rfc3339(t).is_err() {
                return Err(bad(format!("{what} {:.40?} is not an RFC 3339 time", t)));
            }
        }
        if layout::backup_id_type(&self.id) != Some(self.kind.as_str()) {
            return Err(bad(format!(
                "type {:?} does not match the letter of id {}",
                self.kind, self.id
            )));
        }
        match (&self.based_on, self.kind.as_str()) {
            (None, "full") => {}
            (Some(b), "diff" | "incr") if is_earlier_backup(b, &self.id) => {
                if self.kind == "diff" && layout::backup_id_type(b) != Some("full") {
                    return Err(bad(format!(
                        "differential backup based on {b}, which is not a full backup"
                    )));
                }
            }
            (b, k) => return Err(bad(format!("a {k} backup cannot be based on {b:?}"))),
        }
        if self.timeline == 0 {
            return Err(bad("timeline 0".into()));
        }
        match (
            crate::wal::parse_lsn(&self.start_lsn),
            crate::wal::parse_lsn(&self.stop_lsn),
        ) {
            (Some(a), Some(b)) if a <= b => {}
            _ => {
                return Err(bad(format!(
                    "start/stop LSN {:?}/{:?} are not LSNs in order",
                    self.start_lsn, self.stop_lsn
                )))
            }
        }

        // Tablespaces first: file paths under pg_tblspc are checked against them.
        let mut oids = HashSet::new();
        for (i, ts) in self.tablespaces.iter().enumerate() {
            if ts.oid == 0 || !oids.insert(ts.oid) {
                return Err(bad(format!("tablespace oid {} is 0 or repeated", ts.oid)));
            }
            check_location(Path::new(&ts.location)).map_err(|r| {
                bad(format!(
                    "tablespace {} location {:?} {r}",
                    ts.oid, ts.location
                ))
            })?;
            for other in &self.tablespaces[..i] {
                let (a, b) = (Path::new(&ts.location), Path::new(&other.location));
                if a.starts_with(b) || b.starts_with(a) {
                    return Err(bad(format!(
                        "tablespaces {} and {} are at one place ({:?}, {:?})",
                        other.oid, ts.oid, other.location, ts.location
                    )));
                }
            }
        }
        let check = EntryCheck::new(self, key);
        let mut seen = HashSet::with_capacity(self.files.len());
        for f in &self.files {
            check.entry(f)?;
            if !seen.insert(f.path.as_str()) {
                return Err(bad(format!("file {:?} is listed twice", f.path)));
            }
        }
        for d in &self.dirs {
            check.path(&d.path, true)?;
            if seen.contains(d.path.as_str()) {
                return Err(bad(format!(
                    "{:?} is listed as a file and a directory",
                    d.path
                )));
            }
        }
        // Databases: names restore compares with the DBA's and prints in
        // `DROP DATABASE` lines; oids it matches with base/<oid>.
        if self.databases.len() > MAX_DATABASES {
            return Err(bad(format!(
                "{} databases listed, more than {MAX_DATABASES}",
                self.databases.len()
            )));
        }
        let mut db_oids = HashSet::new();
        let mut db_names = HashSet::new();
        for db in &self.databases {
            if db.oid == 0 || !db_oids.insert(db.oid) {
                return Err(bad(format!("database oid {} is 0 or repeated", db.oid)));
            }
            if db.name.is_empty() || db.name.len() > MAX_DATABASE_NAME || db.name.contains('\0') {
                return Err(bad(format!(
                    "database {} has a name PostgreSQL cannot have ({:.80?})",
                    db.oid, db.name
                )));
            }
            if !db_names.insert(db.name.as_str()) {
                return Err(bad(format!("database name {:?} is repeated", db.name)));
            }
        }
        if self.backup_label_object != layout::backup_label(&self.id) {
            return Err(bad(format!(
                "backup_label_object {:?} is not this backup's backup_label",
                self.backup_label_object
            )));
        }
        if let Some(t) = &self.tablespace_map_object {
            if *t != layout::tablespace_map(&self.id) {
                return Err(bad(format!(
                    "tablespace_map_object {t:?} is not this backup's tablespace_map"
                )));
            }
        }
        Ok(())
    }

    /// Checks that every backup whose objects this one names is in `chain`
    /// (the backups it is built on, found by following `based_on`).
    pub fn validate_dependencies(&self, chain: &BTreeSet<String>) -> Result<()> {
        match self.depends_on().difference(chain).next() {
            None => Ok(()),
            Some(other) => Err(Error::Corrupt {
                key: layout::manifest(&self.id),
                reason: format!(
                    "it names objects of backup {other}, which this backup is not built on"
                ),
            }),
        }
    }
}

/// The rules one file entry (and one directory path) of a manifest must
/// follow, given the manifest's head (its id, version, PostgreSQL version
/// and tablespaces): what `Manifest::validate` checks for each of its
/// files, usable one entry at a time for a list streamed from a spool
/// (`crate::file_list`). Whether a path is listed twice is the caller's.
pub struct EntryCheck<'m> {
    m: &'m Manifest,
    key: &'m str,
    tablespace_dir: String,
}

impl<'m> EntryCheck<'m> {
    pub fn new(m: &'m Manifest, key: &'m str) -> EntryCheck<'m> {
        EntryCheck {
            m,
            key,
            tablespace_dir: format!("PG_{}_", m.pg_version),
        }
    }

    fn bad(&self, reason: String) -> Error {
        Error::Corrupt {
            key: self.key.to_string(),
            reason,
        }
    }

    /// A file's or directory's path: relative, normal components, none of
    /// the files restore writes itself, and under pg_tblspc only
    /// `<oid>/PG_<ver>_<catversion>/...`.
    pub fn path(&self, path: &str, is_dir: bool) -> Result<()> {
        let tablespace_dir = &self.tablespace_dir;
        if !layout::is_safe_rel_path(path) || path.chars().any(char::is_control) {
            return Err(self.bad(format!(
                "path {path:?} is not relative with normal components only"
            )));
        }
        let mut c = path.split('/');
        match (c.next(), c.next(), c.next()) {
            // What restore writes itself, or a server's own state: a
            // backup never stores these.
            (Some(top), None, _) if !is_dir && RESERVED_TOP_FILES.contains(&top) => {
                Err(self.bad(format!("path {path:?} is a file a backup never holds")))
            }
            (Some("pg_tblspc"), Some(oid), rest) => {
                // pg_tblspc/<oid>: the link (a dir entry); inside it,
                // only PostgreSQL's version directory PG_<ver>_<catversion>.
                let oid_ok = oid.parse::<u32>().is_ok_and(|o| o > 0)
                    && !oid.starts_with('0')
                    && oid.bytes().all(|b| b.is_ascii_digit());
                let inner_ok = match rest {
                    None => is_dir,
                    Some(v) => v.strip_prefix(tablespace_dir.as_str()).is_some_and(|cat| {
                        !cat.is_empty() && cat.bytes().all(|b| b.is_ascii_digit())
                    }),
                };
                if oid_ok && inner_ok {
                    Ok(())
                } else {
                    Err(self.bad(format!(
                        "path {path:?} is not pg_tblspc/<oid>/{tablespace_dir}<catversion>/..."
                    )))
                }
            }
            _ => Ok(()),
        }
    }

    /// One file entry: its path, its hash for the manifest's version, and
    /// every object it names (a bundle of this or an earlier backup with an
    /// offset, or data/map objects of that path).
    pub fn entry(&self, f: &FileEntry) -> Result<()> {
        self.path(&f.path, false)?;
        check_hash(f, self.m.manifest_version).map_err(|r| self.bad(r))?;
        if f.offset.is_some() {
            return self.bundled(f);
        }
        self.owned_by(&f.object, &f.path, true)?;
        for d in &f.deltas {
            self.owned_by(d, &f.path, true)?;
        }
        for mk in &f.maps {
            self.owned_by(mk, &f.path, false)?;
        }
        Ok(())
    }

    fn bundled(&self, f: &FileEntry) -> Result<()> {
        let own = &self.m.id;
        let ok = match layout::parse(&f.object) {
            Some(ObjectName::Backup {
                id,
                part: BackupPart::Bundle(_),
            }) => id == *own || is_earlier_backup(&id, own),
            _ => false,
        };
        if !ok {
            return Err(self.bad(format!(
                "file {:?} has an offset but names object {:?}, which is not a bundle of this or an earlier backup",
                f.path, f.object
            )));
        }
        if !f.deltas.is_empty() || !f.maps.is_empty() {
            return Err(self.bad(format!(
                "bundled file {:?} has block deltas or maps",
                f.path
            )));
        }
        let end = f.offset.and_then(|o| o.checked_add(f.size));
        if f.size >= BUNDLED_MAX || end.is_none_or(|e| e > crate::delta::MAX_FILE_SIZE) {
            return Err(self.bad(format!(
                "bundled file {:?}: size {} at offset {:?} is not a small file within a bundle (below {BUNDLED_MAX} bytes, ending within {} bytes)",
                f.path,
                f.size,
                f.offset,
                crate::delta::MAX_FILE_SIZE
            )));
        }
        Ok(())
    }

    fn owned_by(&self, k: &str, want: &str, data: bool) -> Result<()> {
        let own = &self.m.id;
        let ok = match layout::parse(k) {
            Some(ObjectName::Backup {
                id,
                part: BackupPart::Data(rel),
            }) if data => rel == want && (id == *own || is_earlier_backup(&id, own)),
            Some(ObjectName::Backup {
                id,
                part: BackupPart::Map(rel),
            }) if !data => rel == want && (id == *own || is_earlier_backup(&id, own)),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(self.bad(format!(
                "file {want:?} names object {k:?}, which is not a {} object of this or an earlier backup for that path",
                if data { "data" } else { "map" }
            )))
        }
    }
}

/// `Manifest::json_reader`: the head, then the file entries serialized as
/// they are read, then the closing `]}`.
pub struct JsonReader<'a> {
    files: Box<dyn Iterator<Item = Result<FileEntry>> + 'a>,
    first: bool,
    /// Bytes ready to be read from `pos` on.
    buf: Vec<u8>,
    pos: usize,
    ended: bool,
}

impl std::io::Read for JsonReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        // Refilled a few entries at a time (about 64 KiB), not per entry.
        while self.pos == self.buf.len() && !self.ended {
            self.buf.clear();
            self.pos = 0;
            while self.buf.len() < 64 << 10 {
                let Some(f) = self
                    .files
                    .next()
                    .transpose()
                    .map_err(std::io::Error::other)?
                else {
                    self.buf.extend_from_slice(b"]}");
                    self.ended = true;
                    break;
                };
                if !std::mem::take(&mut self.first) {
                    self.buf.push(b',');
                }
                serde_json::to_writer(&mut self.buf, &f).map_err(std::io::Error::other)?;
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A backup as a listing of the repository keeps it (`Repository::scan_backups`):
/// its manifest, validated, without the per-file lists. Commands that walk
/// every backup hold one of these per backup (a few hundred bytes, not a
/// few hundred per file); the full manifest is read only for the backups a
/// command uses (`Repository::find_backup`), so memory does not grow with
/// files × backups kept.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupSummary {
    pub id: String,
    /// "full", "diff" or "incr", as in the manifest.
    pub kind: String,
    pub based_on: Option<String>,
    pub label: String,
    pub pg_version: u32,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub start_time: String,
    pub stop_time: String,
    pub wal_start: String,
    pub wal_stop: String,
    pub size: u64,
    pub stored_size: u64,
    /// How many files the manifest lists.
    pub files: usize,
    /// Pages that failed checksum verification during the backup.
    pub checksum_failure_blocks: usize,
    pub tablespaces: Vec<TablespaceEntry>,
    /// The other backups whose objects the manifest names (`Manifest::depends_on`).
    pub depends_on: BTreeSet<String>,
}

impl BackupSummary {
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

/// Gives the allocator's free memory back to the system once a command's
/// per-file structures are built and the temporary ones dropped (the
/// validation's path set, the manifests of a chain read for their
/// `based_on`): glibc keeps freed memory below its heap's top, so it would
/// otherwise stay resident for the rest of the command. Returns nothing
/// still in use; a no-op with other allocators.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of glibc's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Top-level names restore writes itself or a server owns: never in a backup.
const RESERVED_TOP_FILES: &[&str] = &[
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "recovery.signal",
    "standby.signal",
    "postmaster.pid",
    "postmaster.opts",
];

/// True if `earlier` is a backup id that started before `id` (or in the same
/// second, and is not `id`): ids begin with their start time.
fn is_earlier_backup(earlier: &str, id: &str) -> bool {
    layout::is_backup_id(earlier)
        && layout::is_backup_id(id)
        && earlier != id
        && earlier[..15] <= id[..15]
}

/// A tablespace location must be absolute and normalized: a root, then
/// normal components (no `.`, `..`, `//` or trailing `/`), not `/` itself,
/// no control characters. Returns what is wrong.
pub fn check_location(p: &Path) -> std::result::Result<(), &'static str> {
    let s = p.as_os_str().as_encoded_bytes();
    if s.is_empty() || s.len() > 4096 {
        return Err("is empty or too long");
    }
    if s.iter().any(|b| *b < 0x20 || *b == 0x7f) {
        return Err("contains control characters");
    }
    if s[0] != b'/' || s.len() == 1 {
        return Err("is not an absolute path below /");
    }
    // Components drop "." and repeated or trailing "/": compare the
    // rebuilt path with the original to see they were not there.
    let mut rebuilt = Vec::with_capacity(s.len());
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => {
                rebuilt.push(b'/');
                rebuilt.extend_from_slice(n.as_encoded_bytes());
            }
            _ => return Err("has . or .. components"),
        }
    }
    if rebuilt != s {
        return Err("is not normalized (., // or a trailing /)");
    }
    Ok(())
}

/// A file entry's hash for its manifest version: SHA-256 before version
/// 4; then either (SHA-256 carried over from an older manifest). The hex
/// form was checked as the entry was read (`FileEntry::try_from`).
fn check_hash(f: &FileEntry, manifest_version: u32) -> std::result::Result<(), String> {
    if f.hash.alg == HashAlg::Blake3 && manifest_version < BLAKE3_SINCE {
        return Err(format!(
            "file {:?} has a BLAKE3 hash, which manifest version {manifest_version} does not have (only {BLAKE3_SINCE} and later)",
            f.path
        ));
    }
    Ok(())
}

/// One file line of PostgreSQL's backup_manifest.
pub struct PgManifestFile {
    pub path: String,
    pub size: u64,
    pub mtime: i64,
    /// SHA-256, hex; None: no checksum (pg_verifybackup knows no BLAKE3,
    /// so such files are checked by size only).
    pub sha256: Option<String>,
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Writes a PostgreSQL backup manifest (version 1) to `out`, as
/// pg_basebackup writes it: one file per line, then the WAL range, then a
/// SHA-256 of everything before the last line. Line by line, hashed as it
/// is written: never held whole (about 150 bytes a file).
pub fn write_pg_backup_manifest<W: std::io::Write>(
    out: W,
    files: impl Iterator<Item = std::io::Result<PgManifestFile>>,
    timeline: u32,
    start_lsn: u64,
    stop_lsn: u64,
) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(64 << 10, out);
    let mut sum = Sha256::new();
    let mut put = |out: &mut std::io::BufWriter<W>, text: &str| {
        sum.update(text.as_bytes());
        out.write_all(text.as_bytes())
    };
    use std::io::Write as _;
    put(
        &mut out,
        "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n",
    )?;
    let mut files = files.peekable();
    while let Some(f) = files.next() {
        let f = f?;
        let when = chrono::DateTime::from_timestamp(f.mtime, 0)
            .unwrap_or_default()
            .format("%Y-%m-%d %H:%M:%S GMT");
        let checksum = match &f.sha256 {
            Some(sha) => format!(", \"Checksum-Algorithm\": \"SHA256\", \"Checksum\": \"{sha}\""),
            None => String::new(),
        };
        let line = format!(
            "{{ \"Path\": {}, \"Size\": {}, \"Last-Modified\": \"{when}\"{checksum} }}{}\n",
            json_str(&f.path),
            f.size,
            if files.peek().is_some() { "," } else { "" }
        );
        put(&mut out, &line)?;
    }
    put(&mut out, "],\n\"WAL-Ranges\": [\n")?;
    put(
        &mut out,
        &format!(
            "{{ \"Timeline\": {timeline}, \"Start-LSN\": \"{}\", \"End-LSN\": \"{}\" }}\n",
            crate::wal::format_lsn(start_lsn),
            crate::wal::format_lsn(stop_lsn)
        ),
    )?;
    put(&mut out, "],\n")?;
    let sum = hex::encode(sum.finalize());
    out.write_all(format!("\"Manifest-Checksum\": \"{sum}\"}}\n").as_bytes())?;
    out.flush()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const ID: &str = "20261121-224754I";
    pub(crate) const FULL: &str = "20261120-010000F";

    pub(crate) fn entry(path: &str, owner: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            size: 1,
            mtime: 0,
            mode: 0o600,
            hash: PlainHash {
                alg: HashAlg::Blake3,
                bytes: [0xab; 32],
            },
            object: layout::backup_data(owner, path).into(),
            deltas: Box::default(),
            maps: Box::default(),
            offset: None,
            stored_size: 0,
        }
    }

    pub(crate) fn bundled(path: &str, owner: &str, offset: u64) -> FileEntry {
        FileEntry {
            object: layout::backup_bundle(owner, 1).into(),
            offset: Some(offset),
            ..entry(path, owner)
        }
    }

    pub(crate) fn sample() -> Manifest {
        let mut big = entry("base/5/16397", FULL);
        big.deltas = [layout::backup_data(ID, "base/5/16397")].into();
        big.maps = [
            layout::backup_map(FULL, "base/5/16397"),
            layout::backup_map(ID, "base/5/16397"),
        ]
        .into();
        Manifest {
            manifest_version: MANIFEST_VERSION,
            id: ID.into(),
            kind: "incr".into(),
            based_on: Some(FULL.into()),
            label: "x".into(),
            system_identifier: "7710756547896858498".into(),
            pg_version: 15,
            timeline: 1,
            start_lsn: "0/5000028".into(),
            stop_lsn: "0/5000138".into(),
            start_time: "2026-11-21T22:47:54.1+00:00".into(),
            stop_time: "2026-11-21T22:47:56.3+00:00".into(),
            wal_start: "000000010000000000000005".into(),
            wal_stop: "000000010000000000000005".into(),
            data_checksums: true,
            checksum_failures: vec![],
            size: 2,
            stored_size: 1,
            files: vec![
                entry("base/5/16384", ID),
                big,
                entry("pg_tblspc/16390/PG_15_202209061/5/16391", ID),
                bundled("base/5/2601", ID, 0),
                bundled("base/5/2602", FULL, 8192),
            ],
            dirs: vec![
                DirEntry {
                    path: "pg_tblspc/16390".into(),
                    mode: 0o700,
                },
                DirEntry {
                    path: "pg_tblspc/16390/PG_15_202209061".into(),
                    mode: 0o700,
                },
            ],
            tablespaces: vec![TablespaceEntry {
                oid: 16390,
                location: "/srv/ts1".into(),
            }],
            backup_label_object: layout::backup_label(ID),
            tablespace_map_object: Some(layout::tablespace_map(ID)),
            databases: vec![
                DatabaseEntry {
                    oid: 1,
                    name: "template1".into(),
                },
                DatabaseEntry {
                    oid: 5,
                    name: "postgres".into(),
                },
                DatabaseEntry {
                    oid: 16400,
                    name: "app \"one\"".into(),
                },
            ],
        }
    }

    fn refused(m: &Manifest) -> String {
        match m.validate(&layout::manifest(ID)) {
            Err(e @ Error::Corrupt { .. }) => e.to_string(),
            other => panic!("not refused as damaged: {other:?}"),
        }
    }

    #[test]
    fn a_sound_manifest_passes() {
        let m = sample();
        m.validate(&layout::manifest(ID)).unwrap();
        let chain: BTreeSet<String> = [FULL.to_string()].into();
        m.validate_dependencies(&chain).unwrap();
        assert!(m.validate_dependencies(&BTreeSet::new()).is_err());
        let body = serde_json::to_vec(&m).unwrap();
        assert_eq!(
            Manifest::decode(&layout::manifest(ID), &body).unwrap().id,
            ID
        );
        assert!(Manifest::decode(&layout::manifest(ID), b"{").is_err());
    }

    #[test]
    fn streamed_json_reads_back_as_the_whole_body() {
        use std::io::Read;
        let mut m = sample();
        // Enough entries for several refills of the reader's buffer.
        for i in 0..2000 {
            m.files.push(entry(&format!("base/5/{}", 20000 + i), ID));
        }
        for files in [m.files.clone(), m.files[..1].to_vec(), Vec::new()] {
            let m = Manifest { files, ..m.clone() };
            let mut streamed = Vec::new();
            let mut r = m.json_reader().unwrap();
            // Small reads: entries cross the caller's buffer boundaries.
            let mut chunk = [0u8; 1000];
            loop {
                let n = r.read(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                streamed.extend_from_slice(&chunk[..n]);
            }
            let whole: serde_json::Value = serde_json::to_value(&m).unwrap();
            let back: serde_json::Value = serde_json::from_slice(&streamed).unwrap();
            assert_eq!(back, whole);
            let d = Manifest::decode(&layout::manifest(ID), &streamed).unwrap();
            assert_eq!(d.files.len(), m.files.len());
        }
    }

    #[test]
    fn the_files_of_a_bundle_share_its_key_once_read() {
        let mut m = sample();
        m.files.insert(4, bundled("base/5/2601_fsm", ID, 100));
        let body = serde_json::to_vec(&m).unwrap();
        let d = Manifest::decode(&layout::manifest(ID), &body).unwrap();
        let (a, b, c) = (&d.files[3], &d.files[4], &d.files[5]);
        assert_eq!((&*a.object, &*b.object), (&*b.object, &*a.object));
        assert!(Arc::ptr_eq(&a.object, &b.object));
        // Another backup's bundle: its own key.
        assert!(!Arc::ptr_eq(&b.object, &c.object));
        assert_eq!(serde_json::to_vec(&d).unwrap(), body);
    }

    #[test]
    fn a_summary_carries_no_file_list() {
        let m = sample();
        let s = m.summary();
        assert_eq!(s.files, m.files.len());
        assert_eq!(s.depends_on, m.depends_on());
        assert_eq!(s.depends_on, [FULL.to_string()].into());
        // Its size does not depend on the number of files: nothing of
        // theirs is kept but the count.
        let mut big = sample();
        for i in 0..1000 {
            big.files
                .push(entry(&format!("base/5/{}", 20000 + i), FULL));
        }
        let t = big.summary();
        assert_eq!(t.files, m.files.len() + 1000);
        assert_eq!(format!("{s:?}").len() + 3, format!("{t:?}").len());
    }

    #[test]
    fn id_must_match_its_key_and_type() {
        let m = sample();
        let e = m.validate(&layout::manifest(FULL)).unwrap_err().to_string();
        assert!(e.contains("not of the backup its name says"), "{e}");
        assert!(m.validate("backups/x/manifest").is_err());
        assert!(m.validate(&layout::backup_label(ID)).is_err());
        let mut t = sample();
        t.kind = "full".into();
        assert!(refused(&t).contains("does not match"));
        let mut b = sample();
        b.based_on = None;
        refused(&b);
        b.based_on = Some("20271121-224754F".into()); // later than itself
        refused(&b);
        let mut v = sample();
        v.manifest_version = MANIFEST_VERSION + 1;
        assert!(matches!(
            v.validate(&layout::manifest(ID)),
            Err(Error::Repository(_))
        ));
    }

    #[test]
    fn paths_stay_inside() {
        for p in [
            "../victim/x",
            "base/../../x",
            "/etc/passwd",
            "base//1",
            "./base",
            "base/1/",
            "",
            "a\nb",
            "backup_label",
            "recovery.signal",
            "pg_tblspc/16390",
            "pg_tblspc/16390/x",
            "pg_tblspc/0/PG_15_1/x",
            "pg_tblspc/016390/PG_15_1/x",
            "pg_tblspc/16390/PG_14_202107181/x",
        ] {
            let mut m = sample();
            m.files[0].path = p.into();
            m.files[0].object = format!("backups/{ID}/data/{p}").into();
            refused(&m);
            let mut d = sample();
            d.dirs.push(DirEntry {
                path: p.into(),
                mode: 0o700,
            });
            if !matches!(p, "backup_label" | "recovery.signal" | "pg_tblspc/16390") {
                refused(&d);
            }
        }
        let mut dup = sample();
        dup.files.push(entry("base/5/16384", ID));
        refused(&dup);
    }

    #[test]
    fn objects_are_backup_objects_of_the_entry_and_the_chain() {
        type Damage = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<Damage> = vec![
            Box::new(|m| {
                m.files[0].object = "wal/0000000100000000/000000010000000000000005".into()
            }),
            Box::new(|m| m.files[0].object = layout::backup_data(ID, "base/5/other").into()),
            Box::new(|m| m.files[0].object = layout::backup_map(ID, "base/5/16384").into()),
            Box::new(|m| {
                m.files[0].object = layout::backup_data("20271121-224754F", "base/5/16384").into()
            }),
            Box::new(|m| m.files[0].object = format!("backups/{ID}/data/../../keys/x").into()),
            Box::new(|m| m.files[1].deltas[0] = layout::backup_map(ID, "base/5/16397")),
            Box::new(|m| m.files[1].maps[0] = layout::backup_data(FULL, "base/5/16397")),
            // Bundles: only with an offset, only a bundle, no deltas, bounded.
            Box::new(|m| m.files[0].object = layout::backup_bundle(ID, 1).into()),
            Box::new(|m| m.files[3].offset = None),
            Box::new(|m| m.files[3].object = layout::backup_data(ID, "base/5/2601").into()),
            Box::new(|m| m.files[3].object = layout::backup_bundle("20271121-224754F", 1).into()),
            Box::new(|m| m.files[3].object = format!("backups/{ID}/bundle/1").into()),
            Box::new(|m| m.files[3].deltas = [layout::backup_data(ID, "base/5/2601")].into()),
            Box::new(|m| m.files[3].maps = [layout::backup_map(ID, "base/5/2601")].into()),
            Box::new(|m| m.files[3].size = BUNDLED_MAX),
            Box::new(|m| m.files[3].offset = Some(u64::MAX)),
            Box::new(|m| m.files[3].offset = Some(crate::delta::MAX_FILE_SIZE)),
            Box::new(|m| m.backup_label_object = layout::backup_label(FULL)),
            Box::new(|m| m.tablespace_map_object = Some(layout::backup_label(ID))),
        ];
        for (i, c) in cases.iter().enumerate() {
            let mut m = sample();
            c(&mut m);
            assert!(m.validate(&layout::manifest(ID)).is_err(), "case {i}");
        }
        // An object of an earlier backup outside the chain: only the chain check sees it.
        let chain: BTreeSet<String> = [FULL.to_string()].into();
        let mut m = sample();
        m.files[4].object = layout::backup_bundle("20261101-010000F", 1).into();
        m.validate(&layout::manifest(ID)).unwrap();
        assert!(m.validate_dependencies(&chain).is_err());
        let mut m = sample();
        m.files[0].object = layout::backup_data("20261101-010000F", "base/5/16384").into();
        m.validate(&layout::manifest(ID)).unwrap();
        assert!(m.validate_dependencies(&chain).is_err());
    }

    #[test]
    fn hash_fields_follow_the_manifest_version() {
        let sha = |f: &mut FileEntry| f.hash.alg = HashAlg::Sha256;
        // Version 4: BLAKE3, or a SHA-256 carried over from an older manifest.
        let mut m = sample();
        sha(&mut m.files[1]);
        m.validate(&layout::manifest(ID)).unwrap();
        assert_eq!(m.files[1].hash_alg(), HashAlg::Sha256);
        assert_eq!(m.files[0].hash_alg(), HashAlg::Blake3);
        // Older versions: SHA-256 only.
        for v in 1..BLAKE3_SINCE {
            let mut old = sample();
            old.manifest_version = v;
            old.files.iter_mut().for_each(sha);
            old.validate(&layout::manifest(ID)).unwrap();
            old.files[2].hash.alg = HashAlg::Blake3;
            let e = refused(&old);
            assert!(
                e.contains("BLAKE3") && e.contains("manifest version"),
                "{e}"
            );
        }
        // The JSON fields: exactly one, 64 lowercase hex digits; anything
        // else is refused as the manifest is read, naming the file.
        type Damage = Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>;
        let set = |k: &'static str, v: String| -> Damage {
            Box::new(move |f| {
                f.insert(k.into(), v.clone().into());
            })
        };
        let cases: Vec<Damage> = vec![
            Box::new(|f| {
                f.remove("blake3");
            }),
            set("sha256", "cd".repeat(32)),
            set("blake3", "ab".repeat(31)),
            set("blake3", "ab".repeat(33)),
            set("blake3", "zz".repeat(32)),
            set("blake3", "AB".repeat(32)),
            set("blake3", String::new()),
            Box::new(|f| {
                f.remove("blake3");
                f.insert("sha256".into(), "ab".repeat(16).into());
            }),
            Box::new(|f| {
                f.remove("blake3");
                f.insert("sha256".into(), "é".repeat(32).into());
            }),
            Box::new(|f| {
                f.insert("blake3".into(), 5.into());
            }),
        ];
        for (i, c) in cases.iter().enumerate() {
            let mut v = serde_json::to_value(sample()).unwrap();
            c(v["files"][3].as_object_mut().unwrap());
            let e = Manifest::decode(&layout::manifest(ID), v.to_string().as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains("base/5/2601") || i == 9, "case {i}: {e}");
        }
        // What is written reads back the same, in either algorithm.
        let mut m = sample();
        sha(&mut m.files[1]);
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["files"][1]["sha256"], "ab".repeat(32));
        assert!(v["files"][1].get("blake3").is_none());
        assert_eq!(v["files"][0]["blake3"], "ab".repeat(32));
        assert!(v["files"][0].get("sha256").is_none());
        let back = Manifest::decode(&layout::manifest(ID), v.to_string().as_bytes()).unwrap();
        assert_eq!(back.files[1].hash, m.files[1].hash);
        assert_eq!(back.files[0].hash, m.files[0].hash);
        // Comparison needs the same algorithm and value.
        let f = &mut sample().files[0];
        let h = HashAlg::Blake3.digest(b"x");
        f.set_hash(&h);
        assert!(f.hash_is(&h) && f.sha256_hex().is_none());
        let s = HashAlg::Sha256.digest(b"x");
        assert!(!f.hash_is(&s));
        f.set_hash(&s);
        assert!(f.hash_is(&s) && !f.hash_is(&h) && f.sha256_hex() == Some(s.hex()));
        assert!(f.hash_text().starts_with("SHA-256 "));
    }

    #[test]
    fn databases_are_checked() {
        type Damage = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<Damage> = vec![
            Box::new(|m| m.databases[2].oid = 5),
            Box::new(|m| m.databases[2].oid = 0),
            Box::new(|m| m.databases[2].name = "postgres".into()),
            Box::new(|m| m.databases[2].name = String::new()),
            Box::new(|m| m.databases[2].name = "x".repeat(64)),
            Box::new(|m| m.databases[2].name = "a\0b".into()),
            Box::new(|m| {
                m.databases = (1..=MAX_DATABASES as u32 + 1)
                    .map(|oid| DatabaseEntry {
                        oid,
                        name: format!("d{oid}"),
                    })
                    .collect()
            }),
        ];
        for (i, c) in cases.iter().enumerate() {
            let mut m = sample();
            c(&mut m);
            assert!(
                matches!(
                    m.validate(&layout::manifest(ID)),
                    Err(Error::Corrupt { .. })
                ),
                "case {i}"
            );
        }
        let mut m = sample();
        m.databases[2].name = "é".repeat(31); // 62 bytes
        m.validate(&layout::manifest(ID)).unwrap();
        // Not numeric: the manifest does not parse.
        let mut v = serde_json::to_value(sample()).unwrap();
        v["databases"][0]["oid"] = serde_json::json!("1");
        assert!(Manifest::decode(&layout::manifest(ID), v.to_string().as_bytes()).is_err());
        v["databases"][0]["oid"] = serde_json::json!(-1);
        assert!(Manifest::decode(&layout::manifest(ID), v.to_string().as_bytes()).is_err());
        // A manifest written before the list existed still reads (empty).
        let mut old = serde_json::to_value(sample()).unwrap();
        old.as_object_mut().unwrap().remove("databases");
        let m = Manifest::decode(&layout::manifest(ID), old.to_string().as_bytes()).unwrap();
        assert!(m.databases.is_empty());
    }

    #[test]
    fn tablespace_locations() {
        for loc in [
            "relative/ts",
            "/",
            "",
            "/srv/../etc",
            "/srv/./ts",
            "/srv//ts",
            "/srv/ts/",
            "/srv/t\ns",
        ] {
            let mut m = sample();
            m.tablespaces[0].location = loc.into();
            refused(&m);
        }
        let mut two = sample();
        two.tablespaces.push(TablespaceEntry {
            oid: 16391,
            location: "/srv/ts1/inner".into(),
        });
        refused(&two);
        two.tablespaces[1].location = "/srv/ts1".into();
        refused(&two);
        two.tablespaces[1] = TablespaceEntry {
            oid: 16390,
            location: "/srv/ts2".into(),
        };
        refused(&two);
        two.tablespaces[1].oid = 0;
        refused(&two);
        two.tablespaces[1].oid = 16391;
        two.validate(&layout::manifest(ID)).unwrap();
        assert!(check_location(Path::new("/srv/ts1")).is_ok());
    }
}
