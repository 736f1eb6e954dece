//! A backup manifest read with its file list spooled to a local temporary
//! file instead of held in memory (issue 17: memory flat in the number of
//! files). The manifest's format is unchanged: the JSON is parsed as it is
//! decoded (`Repository::read_json_capped_with`), every field but `files`
//! kept as usual, and each file entry, checked as `FileEntry` reads it, is
//! written to the spool as one JSON line. The list is then validated in
//! one pass over the spool with the manifest's own rules
//! (`manifest::EntryCheck`) before anything uses it, and read back one
//! entry at a time as often as needed.
//!
//! The spool is an unlinked file in the temporary directory (`TMPDIR`,
//! else /tmp): nothing is left behind whatever happens to the process. It
//! takes about 200 bytes of disk per file (20 MB for 100 000 files), and
//! stays in the page cache, which is not the process's memory.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};

use crate::error::{Error, Result};
use crate::layout;
use crate::manifest::{EntryCheck, FileEntry, Manifest};
use crate::repo::{Repository, MANIFEST_MAX};

/// A validated manifest whose file list is in a local spool.
pub struct Spooled {
    /// The manifest with `files` empty.
    pub head: Manifest,
    pub files: FileList,
    /// The other backups whose objects the files name
    /// (`Manifest::depends_on` of the whole manifest).
    pub depends_on: BTreeSet<String>,
}

impl Spooled {
    /// What a listing of backups keeps (`Manifest::summary` of the whole
    /// manifest).
    pub fn summary(&self) -> crate::manifest::BackupSummary {
        let mut s = self.head.summary();
        s.files = self.files.len() as usize;
        s.depends_on = self.depends_on.clone();
        s
    }
}

/// The file entries of a manifest, in the manifest's order, in a local
/// unlinked file.
pub struct FileList {
    file: File,
    count: u64,
    /// Known to be in byte order of the paths (as walshipper writes them).
    sorted: bool,
}

/// Reads manifest `key` with its file list spooled, and validates it as
/// `Repository::read_manifest` does (`Manifest::validate`): damage is
/// `Corrupt` naming `key`, a newer version `Repository`. A failure to write
/// the local spool is an I/O error, never reported as damage.
pub fn read_manifest(repo: &Repository, key: &str) -> Result<Spooled> {
    read_manifest_hashed(repo, key).map(|(s, _)| s)
}

/// `read_manifest`, and the BLAKE3 of the stored bytes it was read from and
/// their sealing key (`crate::summary_cache`).
pub fn read_manifest_hashed(
    repo: &Repository,
    key: &str,
) -> Result<(Spooled, crate::repo::StoredRead)> {
    let mut local: Option<io::Error> = None;
    let (parsed, stored) = repo.read_json_capped_hashed(key, MANIFEST_MAX, &mut |r| {
        local = None;
        let file = match temp_file() {
            Ok(f) => f,
            Err(e) => {
                local = Some(e);
                return Err(serde_json::Error::custom("cannot create the local spool"));
            }
        };
        let mut spool = Spool {
            out: BufWriter::with_capacity(64 << 10, file),
            count: 0,
            err: &mut local,
        };
        // A BufReader of a concrete type: std reads its bytes one by one
        // from the buffer (`Bytes` is specialized for BufReader), where
        // through `dyn Read` each of serde_json's byte reads is a call.
        let mut de = serde_json::Deserializer::from_reader(io::BufReader::new(r));
        let head = ManifestSeed { spool: &mut spool }.deserialize(&mut de)?;
        de.end()?;
        let count = spool.count;
        let file = spool.out.into_inner().map_err(|e| {
            *spool.err = Some(e.into_error());
            serde_json::Error::custom("cannot write the local spool")
        })?;
        Ok((
            head,
            FileList {
                file,
                count,
                sorted: false,
            },
        ))
    })?;
    if let Some(e) = local {
        return Err(Error::io(
            format!(
                "spool the file list of {key} in {}",
                std::env::temp_dir().display()
            ),
            e,
        ));
    }
    let (head, mut files) = parsed.map_err(|e| Error::Corrupt {
        key: key.to_string(),
        reason: format!("manifest is not valid JSON: {e}"),
    })?;
    let (depends_on, sorted) = validate(&head, &files, key)?;
    files.sorted = sorted;
    Ok((
        Spooled {
            head,
            files,
            depends_on,
        },
        stored,
    ))
}

/// `Manifest::validate` of `head` with the files of `list`: the head's
/// rules, each entry's (`EntryCheck`), no path listed twice, none both a
/// file and a directory. Returns the other backups the files name, and
/// whether the paths are in byte order.
fn validate(head: &Manifest, list: &FileList, key: &str) -> Result<(BTreeSet<String>, bool)> {
    head.validate(key)?;
    let bad = |reason: String| Error::Corrupt {
        key: key.to_string(),
        reason,
    };
    let check = EntryCheck::new(head, key);
    let dirs: HashSet<&str> = head.dirs.iter().map(|d| d.path.as_str()).collect();
    let mut depends_on = BTreeSet::new();
    // Writers list files in byte order of their paths: then a path listed
    // twice is next to itself, and nothing per file is kept.
    let mut prev: Option<String> = None;
    let mut sorted = true;
    for f in list.iter() {
        let f = f?;
        check.entry(&f)?;
        if dirs.contains(f.path.as_str()) {
            return Err(bad(format!(
                "{:?} is listed as a file and a directory",
                f.path
            )));
        }
        for o in f.objects() {
            if let Some(id) = layout::backup_of(o) {
                if id != head.id && !depends_on.contains(&id) {
                    depends_on.insert(id);
                }
            }
        }
        match &prev {
            Some(p) if *p == f.path => {
                return Err(bad(format!("file {:?} is listed twice", f.path)))
            }
            Some(p) if *p > f.path => sorted = false,
            _ => {}
        }
        prev = Some(f.path);
    }
    if !sorted {
        // Not written by walshipper as it is (its lists are sorted): the
        // paths are compared in a set, which takes memory per file.
        tracing::debug!("{key}: its files are not in path order");
        let mut seen = HashSet::new();
        for f in list.iter() {
            let f = f?;
            if !seen.insert(f.path.clone()) {
                return Err(bad(format!("file {:?} is listed twice", f.path)));
            }
        }
    }
    Ok((depends_on, sorted))
}

impl FileList {
    /// This list in byte order of the paths: itself when known to be (all
    /// walshipper writes), else a sorted copy, which takes memory per file
    /// (a list an older writer left out of order).
    pub fn in_path_order(self) -> Result<FileList> {
        if self.sorted {
            return Ok(self);
        }
        let mut prev: Option<String> = None;
        let mut sorted = true;
        for f in self.iter() {
            let f = f?;
            sorted &= prev.as_ref().is_none_or(|p| *p < f.path);
            prev = Some(f.path);
        }
        if sorted {
            return Ok(FileList {
                sorted: true,
                ..self
            });
        }
        let mut paths = Vec::new();
        for r in self.iter_at() {
            let (o, f) = r?;
            paths.push((f.path, o));
        }
        paths.sort_unstable();
        let mut w = ListWriter::new()?;
        for (_, o) in paths {
            w.push(&self.entry_at(o)?)?;
        }
        Ok(FileList {
            sorted: true,
            ..w.finish()?
        })
    }

    /// Whether the list is known to be in byte order of its paths.
    pub fn is_sorted(&self) -> bool {
        self.sorted
    }

    /// A list of `entries`, spooled as a manifest's are.
    pub fn spool<'a>(entries: impl IntoIterator<Item = &'a FileEntry>) -> Result<FileList> {
        let mut w = ListWriter::new()?;
        for f in entries {
            w.push(f)?;
        }
        w.finish()
    }

    /// The entry whose line starts at `offset` (as `iter_at` gives it).
    pub fn entry_at(&self, offset: u64) -> Result<FileEntry> {
        let mut r = BufReader::with_capacity(
            1024,
            At {
                file: &self.file,
                pos: offset,
            },
        );
        let mut line = Vec::new();
        match read_line(&mut r, &mut line)? {
            true => parse_line(&line),
            false => Err(Error::Invalid(format!(
                "the local spool of a file list has no entry at {offset}"
            ))),
        }
    }

    /// The entries with where each starts in the spool (for `entry_at`).
    pub fn iter_at(&self) -> impl Iterator<Item = Result<(u64, FileEntry)>> + '_ {
        let mut r = BufReader::with_capacity(
            64 << 10,
            At {
                file: &self.file,
                pos: 0,
            },
        );
        let mut pos = 0u64;
        let mut line = Vec::new();
        std::iter::from_fn(move || {
            let at = pos;
            match read_line(&mut r, &mut line) {
                Ok(false) => None,
                Ok(true) => {
                    pos += line.len() as u64;
                    Some(parse_line(&line).map(|f| (at, f)))
                }
                Err(e) => Some(Err(e)),
            }
        })
    }

    /// How many files the list holds.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entries from the first, read from the spool as they are used.
    /// Several iterations may run at once (each reads at its own offset).
    pub fn iter(&self) -> impl Iterator<Item = Result<FileEntry>> + '_ {
        self.iter_at().map(|r| r.map(|(_, f)| f))
    }
}

/// A walk through a list in path order, asked for paths in increasing
/// order: the merge of a listing with a list, one entry in memory (backup
/// with its reference, `restore --delta` with the target directory).
pub struct PathCursor<'a> {
    list: &'a FileList,
    entries: Box<dyn Iterator<Item = Result<(u64, FileEntry)>> + 'a>,
    /// The next entry not yet passed: (where it is, its path).
    next: Option<(u64, String)>,
}

impl<'a> PathCursor<'a> {
    /// `list` must be in path order (`FileList::in_path_order`).
    pub fn new(list: &'a FileList) -> Result<PathCursor<'a>> {
        if !list.sorted {
            return Err(Error::Invalid(
                "a file list out of path order cannot be merged (in_path_order first)".into(),
            ));
        }
        let mut entries: Box<dyn Iterator<Item = Result<(u64, FileEntry)>> + 'a> =
            Box::new(list.iter_at());
        let next = entries.next().transpose()?.map(|(o, f)| (o, f.path));
        Ok(PathCursor {
            list,
            entries,
            next,
        })
    }

    pub fn list(&self) -> &'a FileList {
        self.list
    }

    /// Where the list's entry for `path` is (for `FileList::entry_at`), if
    /// it has one; `path`s are asked in increasing byte order.
    pub fn find(&mut self, path: &str) -> Result<Option<u64>> {
        while let Some((o, p)) = &self.next {
            match p.as_str().cmp(path) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => return Ok(Some(*o)),
                std::cmp::Ordering::Greater => return Ok(None),
            }
            self.next = self.entries.next().transpose()?.map(|(o, f)| (o, f.path));
        }
        Ok(None)
    }
}

/// Reads one line (with its newline) into `line`; false at the end.
fn read_line(r: &mut impl io::BufRead, line: &mut Vec<u8>) -> Result<bool> {
    line.clear();
    let n = r
        .read_until(b'\n', line)
        .map_err(|e| Error::io("read the local spool of a file list", e))?;
    Ok(n > 0)
}

fn parse_line(line: &[u8]) -> Result<FileEntry> {
    serde_json::from_slice(line)
        .map_err(|e| Error::Invalid(format!("the local spool of a file list: {e}")))
}

/// Writes a file list to a local spool, one entry at a time.
pub struct ListWriter {
    out: BufWriter<File>,
    pos: u64,
    count: u64,
    line: Vec<u8>,
}

impl ListWriter {
    pub fn new() -> Result<ListWriter> {
        let file = temp_file().map_err(|e| Error::io(spool_what("create"), e))?;
        Ok(ListWriter {
            out: BufWriter::with_capacity(64 << 10, file),
            pos: 0,
            count: 0,
            line: Vec::with_capacity(512),
        })
    }

    /// Appends `f`; returns where its line starts (for `FileList::entry_at`).
    pub fn push(&mut self, f: &FileEntry) -> Result<u64> {
        let io = |e| Error::io(spool_what("write"), e);
        self.line.clear();
        serde_json::to_writer(&mut self.line, f).map_err(|e| io(e.into()))?;
        self.line.push(b'\n');
        self.out.write_all(&self.line).map_err(io)?;
        let at = self.pos;
        self.pos += self.line.len() as u64;
        self.count += 1;
        Ok(at)
    }

    pub fn finish(self) -> Result<FileList> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(spool_what("write"), e.into_error()))?;
        Ok(FileList {
            file,
            count: self.count,
            sorted: false,
        })
    }
}

/// Reads a file from `pos` on with pread: iterations do not share an offset.
struct At<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// An unlinked file in the temporary directory: O_TMPFILE, or where that
/// is not supported, a new file removed at once.
/// What a failed local spool operation was, naming the directory: a full
/// or missing TMPDIR must be recognizable from the message alone.
fn spool_what(verb: &str) -> String {
    format!(
        "{verb} a local spool of a file list in {} (TMPDIR)",
        std::env::temp_dir().display()
    )
}

fn temp_file() -> io::Result<File> {
    let dir = std::env::temp_dir();
    let tmpfile = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(&dir);
    match tmpfile {
        Ok(f) => Ok(f),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let path = dir.join(format!(
                ".walshipper-file-list-{}-{nanos}",
                std::process::id()
            ));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(f)
        }
    }
}

/// Where the parse writes the entries: a failure to write is kept in `err`
/// (local, not damage) and stops the parse.
struct Spool<'a> {
    out: BufWriter<File>,
    count: u64,
    err: &'a mut Option<io::Error>,
}

/// Parses a manifest object: `files` goes to the spool, every other field
/// is kept and read as `Manifest` (with no files) at the end.
struct ManifestSeed<'s, 'a> {
    spool: &'s mut Spool<'a>,
}

impl<'de> DeserializeSeed<'de> for ManifestSeed<'_, '_> {
    type Value = Manifest;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Manifest, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ManifestSeed<'_, '_> {
    type Value = Manifest;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a backup manifest")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Manifest, A::Error> {
        // The scalar fields go through a JSON map (then `Manifest`'s own
        // Deserialize); the lists other than `files` are read typed, as the
        // derived parser reads them, and unknown keys skipped without
        // allocating: a generic value per element would take many times
        // the bytes of a hostile manifest padded with a huge list.
        let mut head = serde_json::Map::new();
        let mut files = false;
        let mut dirs: Option<Vec<crate::manifest::DirEntry>> = None;
        let mut tablespaces: Option<Vec<crate::manifest::TablespaceEntry>> = None;
        let mut failures: Option<Vec<crate::manifest::ChecksumFailure>> = None;
        let mut databases: Option<Vec<crate::manifest::DatabaseEntry>> = None;
        fn once<T, E: serde::de::Error>(
            slot: &mut Option<T>,
            v: T,
            k: &'static str,
        ) -> std::result::Result<(), E> {
            if slot.replace(v).is_some() {
                return Err(E::duplicate_field(k));
            }
            Ok(())
        }
        while let Some(k) = map.next_key::<String>()? {
            match k.as_str() {
                "files" => {
                    if files {
                        return Err(A::Error::duplicate_field("files"));
                    }
                    files = true;
                    map.next_value_seed(ListSeed {
                        spool: &mut *self.spool,
                    })?;
                }
                "dirs" => once(&mut dirs, map.next_value()?, "dirs")?,
                "tablespaces" => once(&mut tablespaces, map.next_value()?, "tablespaces")?,
                "checksum_failures" => once(&mut failures, map.next_value()?, "checksum_failures")?,
                "databases" => once(&mut databases, map.next_value()?, "databases")?,
                f if HEAD_SCALARS.contains(&f) => {
                    // As the derived Deserialize: a field twice is an error.
                    if head.contains_key(f) {
                        return Err(A::Error::custom(format!("duplicate field `{f}`")));
                    }
                    let v: serde_json::Value = map.next_value()?;
                    head.insert(k, v);
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        if !files {
            return Err(A::Error::missing_field("files"));
        }
        // Present lists stand in as empty (a missing one is reported, or
        // defaulted, by the derived parser), then are put in place.
        let empty = || serde_json::Value::Array(Vec::new());
        head.insert("files".into(), empty());
        for (k, there) in [
            ("dirs", dirs.is_some()),
            ("tablespaces", tablespaces.is_some()),
            ("checksum_failures", failures.is_some()),
            ("databases", databases.is_some()),
        ] {
            if there {
                head.insert(k.into(), empty());
            }
        }
        let mut m: Manifest =
            serde_json::from_value(serde_json::Value::Object(head)).map_err(A::Error::custom)?;
        m.dirs = dirs.unwrap_or_default();
        m.tablespaces = tablespaces.unwrap_or_default();
        m.checksum_failures = failures.unwrap_or_default();
        m.databases = databases.unwrap_or_default();
        Ok(m)
    }
}

/// The manifest's fields read through a JSON map: every field of
/// `Manifest` but its lists (a unit test checks the two agree).
const HEAD_SCALARS: &[&str] = &[
    "manifest_version",
    "id",
    "type",
    "based_on",
    "label",
    "system_identifier",
    "pg_version",
    "timeline",
    "start_lsn",
    "stop_lsn",
    "start_time",
    "stop_time",
    "wal_start",
    "wal_stop",
    "data_checksums",
    "size",
    "stored_size",
    "backup_label_object",
    "tablespace_map_object",
];

/// The `files` array: each entry read as `FileEntry` (its hash fields
/// checked) and written to the spool as one line.
struct ListSeed<'s, 'a> {
    spool: &'s mut Spool<'a>,
}

impl<'de> DeserializeSeed<'de> for ListSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ListSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of files")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let spool = self.spool;
        let mut line = Vec::with_capacity(512);
        while let Some(f) = seq.next_element::<FileEntry>()? {
            line.clear();
            serde_json::to_writer(&mut line, &f).map_err(A::Error::custom)?;
            line.push(b'\n');
            if let Err(e) = spool.out.write_all(&line) {
                *spool.err = Some(e);
                return Err(A::Error::custom("cannot write the local spool"));
            }
            spool.count += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::{bundled, entry, sample, FULL, ID};
    use crate::repo::tests::{config, init};

    fn store(repo: &Repository, m: &Manifest) {
        let key = layout::manifest(&m.id);
        let _ = repo.storage.delete(&key);
        repo.put_object(&key, m.json_reader().unwrap()).unwrap();
    }

    fn store_json(repo: &Repository, v: &serde_json::Value) {
        let key = layout::manifest(ID);
        let _ = repo.storage.delete(&key);
        repo.put_object(&key, v.to_string().as_bytes()).unwrap();
    }

    fn json_of(f: &FileEntry) -> String {
        serde_json::to_string(f).unwrap()
    }

    /// The spooled manifest's header is `m` without its files.
    fn assert_head_is(s: &Spooled, m: &Manifest) {
        let head = Manifest {
            files: Vec::new(),
            ..m.clone()
        };
        assert_eq!(
            serde_json::to_value(&s.head).unwrap(),
            serde_json::to_value(&head).unwrap()
        );
    }

    /// A sample manifest with `n` more small files, in path order.
    fn many(n: usize) -> Manifest {
        let mut m = sample();
        for i in 0..n {
            m.files.push(bundled(
                &format!("base/7/{}", 100_000 + i),
                if i % 3 == 0 { ID } else { FULL },
                (i as u64 % 500) * 8192,
            ));
        }
        m.files.sort_by(|a, b| a.path.cmp(&b.path));
        m
    }

    #[test]
    fn a_spooled_manifest_reads_back_as_the_whole_one() {
        let dir = tempfile::tempdir().unwrap();
        let repo = init(&config(dir.path(), "r", "aes-256-gcm"));
        let m = many(50_000);
        store(&repo, &m);
        let key = layout::manifest(ID);
        let whole = repo.read_manifest(&key).unwrap();
        let s = read_manifest(&repo, &key).unwrap();
        assert_eq!(s.files.len(), whole.files.len() as u64);
        assert!(s.head.files.is_empty());
        assert_head_is(&s, &whole);
        assert_eq!(s.depends_on, whole.depends_on());
        // What a scan of the repository keeps: the same summary.
        assert_eq!(
            format!("{:?}", s.summary()),
            format!("{:?}", whole.summary())
        );
        // Twice, and two iterations at once: each reads at its own offset.
        for _ in 0..2 {
            let mut a = s.files.iter();
            let mut b = s.files.iter();
            for w in &whole.files {
                assert_eq!(json_of(&a.next().unwrap().unwrap()), json_of(w));
                assert_eq!(json_of(&b.next().unwrap().unwrap()), json_of(w));
            }
            assert!(a.next().is_none() && b.next().is_none());
        }
        // A list spooled from entries reads back the same.
        let l = FileList::spool(&whole.files).unwrap();
        assert_eq!(l.len(), whole.files.len() as u64);
        assert!(l
            .iter()
            .zip(&whole.files)
            .all(|(a, b)| json_of(&a.unwrap()) == json_of(b)));
    }

    /// The header is read field by field: every field of `Manifest` is
    /// one the reader knows (a new one not listed would be dropped), an
    /// unknown key is skipped, and a list given twice is refused.
    #[test]
    fn the_header_reader_knows_every_field_and_skips_unknown_keys() {
        let mut m = sample();
        m.checksum_failures = vec![crate::manifest::ChecksumFailure {
            path: "base/5/16384".into(),
            blocks: vec![3, 9],
        }];
        let serde_json::Value::Object(fields) = serde_json::to_value(&m).unwrap() else {
            panic!("a manifest is an object");
        };
        let lists = [
            "files",
            "dirs",
            "tablespaces",
            "checksum_failures",
            "databases",
        ];
        for k in fields.keys() {
            assert!(
                HEAD_SCALARS.contains(&k.as_str()) || lists.contains(&k.as_str()),
                "Manifest field {k} is unknown to the spooled reader"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let repo = init(&config(dir.path(), "r", "aes-256-gcm"));
        let key = layout::manifest(ID);
        let mut padded = serde_json::to_value(&m).unwrap();
        padded["pad"] = serde_json::json!([0, 0, 0, {"x": [1, 2]}]);
        store_json(&repo, &padded);
        let s = read_manifest(&repo, &key).unwrap();
        assert_head_is(&s, &m);
        // A list twice: refused as damage, as the derived parser does.
        let text = serde_json::to_string(&m).unwrap();
        let twice = text.replacen("\"dirs\":", "\"dirs\":[],\"dirs\":", 1);
        let _ = repo.storage.delete(&key);
        repo.put_object(&key, twice.as_bytes()).unwrap();
        assert!(matches!(
            read_manifest(&repo, &key),
            Err(Error::Corrupt { .. })
        ));
    }

    /// Everything `Manifest::validate` refuses in a file list, the
    /// spooled read refuses too, as damage naming the manifest.
    #[test]
    fn a_damaged_list_is_refused_like_a_whole_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let repo = init(&config(dir.path(), "r", "aes-256-gcm"));
        let key = layout::manifest(ID);
        type Damage = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<(Damage, &str)> = vec![
            // Listed twice: next to itself, and apart (out of order).
            (
                Box::new(|m| m.files.insert(1, m.files[0].clone())),
                "listed twice",
            ),
            (
                Box::new(|m| m.files.push(m.files[0].clone())),
                "listed twice",
            ),
            (
                Box::new(|m| m.files[2].path = "../x".into()),
                "normal components",
            ),
            (
                Box::new(|m| m.files[2].path = "pg_tblspc/16390/PG_14_202107181/x".into()),
                "pg_tblspc/<oid>",
            ),
            (
                Box::new(|m| m.files[0].path = "backup_label".into()),
                "never holds",
            ),
            (
                Box::new(|m| m.files[0].object = layout::backup_data(ID, "base/5/other").into()),
                "not a data object",
            ),
            (
                Box::new(|m| m.files[3].size = crate::manifest::BUNDLED_MAX),
                "not a small file",
            ),
            (
                Box::new(|m| {
                    m.dirs.push(crate::manifest::DirEntry {
                        path: m.files[0].path.clone(),
                        mode: 0o700,
                    })
                }),
                "a file and a directory",
            ),
        ];
        for (i, (damage, want)) in cases.iter().enumerate() {
            let mut m = many(2000);
            damage(&mut m);
            store(&repo, &m);
            assert!(repo.read_manifest(&key).is_err(), "case {i}");
            match read_manifest(&repo, &key) {
                Err(Error::Corrupt { key: k, reason }) => {
                    assert_eq!(k, key);
                    assert!(reason.contains(want), "case {i}: {reason}");
                }
                Err(e) => panic!("case {i}: not damage: {e}"),
                Ok(_) => panic!("case {i}: accepted"),
            }
        }
        // Out of order but no path twice: accepted (an older writer's
        // order), checked with a set.
        let mut m = many(2000);
        m.files.swap(0, 1500);
        store(&repo, &m);
        assert_eq!(read_manifest(&repo, &key).unwrap().files.len(), 2005);
        // A newer version: upgrade, not damage.
        let mut m = sample();
        m.manifest_version += 1;
        store(&repo, &m);
        assert!(matches!(
            read_manifest(&repo, &key),
            Err(Error::Repository(_))
        ));
        // The JSON itself: an entry's fields, files twice or missing, a
        // field twice, trailing bytes.
        let good = serde_json::to_value(many(100)).unwrap();
        type Edit = Box<dyn Fn(&mut serde_json::Value) -> String>;
        let edits: Vec<Edit> = vec![
            Box::new(|v| {
                v["files"][50]["blake3"] = "zz".repeat(32).into();
                v.to_string()
            }),
            Box::new(|v| {
                v["files"][50].as_object_mut().unwrap().remove("object");
                v.to_string()
            }),
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("files");
                v.to_string()
            }),
            Box::new(|v| {
                let s = v.to_string();
                format!("{},\"files\":[]}}", &s[..s.len() - 1])
            }),
            Box::new(|v| {
                let s = v.to_string();
                format!("{},\"label\":\"y\"}}", &s[..s.len() - 1])
            }),
            Box::new(|v| format!("{v} x")),
            Box::new(|v| {
                v["files"] = 5.into();
                v.to_string()
            }),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut v = good.clone();
            let body = edit(&mut v);
            let _ = repo.storage.delete(&key);
            repo.put_object(&key, body.as_bytes()).unwrap();
            assert!(repo.read_manifest(&key).is_err(), "edit {i}");
            assert!(
                matches!(read_manifest(&repo, &key), Err(Error::Corrupt { .. })),
                "edit {i}"
            );
        }
        // Truncated or changed in the repository: damage, as a whole read.
        store_json(&repo, &good);
        let path = dir.path().join("r").join(&key);
        let stored = std::fs::read(&path).unwrap();
        std::fs::write(&path, &stored[..stored.len() / 2]).unwrap();
        assert!(matches!(
            read_manifest(&repo, &key),
            Err(Error::Corrupt { .. })
        ));
        let mut flipped = stored.clone();
        flipped[stored.len() / 2] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert!(matches!(
            read_manifest(&repo, &key),
            Err(Error::Corrupt { .. })
        ));
        std::fs::write(&path, &stored).unwrap();
        read_manifest(&repo, &key).unwrap();
    }

    #[test]
    fn objects_of_backups_outside_the_chain_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let repo = init(&config(dir.path(), "r", "aes-256-gcm"));
        let mut m = sample();
        m.files.push(entry("base/9/1", "20261101-010000F"));
        store(&repo, &m);
        let s = read_manifest(&repo, &layout::manifest(ID)).unwrap();
        assert_eq!(
            s.depends_on,
            [FULL.to_string(), "20261101-010000F".to_string()].into()
        );
        assert_eq!(s.depends_on, m.depends_on());
    }
}
