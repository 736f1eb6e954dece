//! The posix driver: a directory on a local or mounted file system.
//! Atomicity comes from writing a hidden temporary file, fsyncing it, then
//! hard-linking (create-if-absent) or renaming it into place and fsyncing the
//! directory. Names starting with '.' are temporaries and never listed.
//!
//! Everything it creates is private to the repository's owner whatever the
//! umask: directories 0700, objects and temporaries 0600 (a repository holds
//! the cluster's data, encrypted or not, and its wrapped keys).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{Durability, ObjectMeta, PutOutcome, Storage};
use crate::error::{Error, Result};

/// Modes of what the driver creates (set explicitly: the umask only removes bits).
pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// Temporaries older than this are from killed writers and are removed.
const STALE_TMP: Duration = Duration::from_secs(600);

pub struct PosixStorage {
    root: PathBuf,
    /// Directories already swept for stale temporaries by this process:
    /// sweeping on every write read the whole directory each time, which
    /// made a backup of N small files O(N²) (12 min for 31 000 files).
    swept: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
    /// The root, opened before the first write durable at flush: syncfs(2)
    /// (Linux 5.8 and later; earlier kernels lose the errors of file data
    /// written back) reports a writeback error raised since its descriptor was
    /// opened, and one raised before only if nothing reported it yet. A
    /// descriptor opened at `flush` would miss a failed writeback of one of
    /// our objects that another syncfs of the file system reported first.
    root_handle: std::sync::OnceLock<Option<File>>,
}

fn err(op: &'static str, key: &str, source: io::Error) -> Error {
    Error::Storage {
        op,
        key: key.to_string(),
        source,
    }
}

thread_local! {
    static WRITE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl PosixStorage {
    pub fn new(root: impl Into<PathBuf>) -> PosixStorage {
        PosixStorage {
            root: root.into(),
            swept: Default::default(),
            root_handle: Default::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".." || c.starts_with('.'))
        {
            return Err(Error::Invalid(format!("invalid object key '{key}'")));
        }
        Ok(self.root.join(key))
    }

    /// Creates missing parent directories, fsyncing each new entry's parent
    /// so the object's path survives a crash.
    fn ensure_dir(&self, dir: &Path) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.ensure_dir(parent)?;
        }
        match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(e),
        }
        // A umask of 0077 or stricter gives 0700 already; a stranger one
        // (say 0277) would leave the directory unwritable to us.
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
        if let Some(parent) = dir.parent() {
            fsync_dir(parent)?;
        }
        Ok(())
    }

    /// Writes `body` to a fresh temporary beside `path` and fsyncs it.
    fn write_tmp(&self, path: &Path, body: &mut dyn Read, sync: bool) -> io::Result<PathBuf> {
        let dir = path.parent().unwrap_or(&self.root);
        self.ensure_dir(dir)?;
        if !sync {
            self.root_handle.get_or_init(|| match File::open(&self.root) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(
                        "{}: {e}; opened again at the flush, which may then miss a write error reported meanwhile",
                        self.root.display()
                    );
                    None
                }
            });
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object");
        self.remove_stale_tmps(dir);
        let suffix: u32 = crate::keys::random::<4>()
            .map(u32::from_le_bytes)
            .unwrap_or(0);
        let tmp = dir.join(format!(".{name}.{}.{suffix:08x}.tmp", std::process::id()));
        self.write_at(dir, tmp, body, sync)
    }

    /// Writes `body` to the new file `tmp` in `dir` (0600), fsynced if
    /// `sync`; removes it on error.
    fn write_at(
        &self,
        dir: &Path,
        tmp: PathBuf,
        body: &mut dyn Read,
        sync: bool,
    ) -> io::Result<PathBuf> {
        let create = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&tmp)
        };
        let result = (|| {
            let mut f = match create() {
                // An empty directory may just have been removed by a delete.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.ensure_dir(dir)?;
                    create()?
                }
                other => other?,
            };
            // fchmod: exactly 0600 whatever the umask (link and rename keep it).
            f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
            // Whole 1 MiB writes: an encoder hands out one frame at a time,
            // often a few KiB, and a write plus a writeback request per frame
            // cost more than the data.
            // One buffer per thread, reused: a fresh zeroed 1 MiB per object
            // cost more than writing a small file.
            let mut buf = WRITE_BUF.with(|b| std::mem::take(&mut *b.borrow_mut()));
            buf.resize(1 << 20, 0);
            let mut written = 0u64;
            let result = (|| loop {
                let n = crate::codec::read_full(body, &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                f.write_all(&buf[..n])?;
                if sync {
                    // Start writing back what we have so the final fsync has
                    // little left to wait for (it overlaps with encoding).
                    // SAFETY: sync_file_range on a valid descriptor; failure only costs speed.
                    unsafe {
                        libc::sync_file_range(
                            std::os::unix::io::AsRawFd::as_raw_fd(&f),
                            written as i64,
                            n as i64,
                            libc::SYNC_FILE_RANGE_WRITE,
                        );
                    }
                }
                written += n as u64;
                if n < buf.len() {
                    return Ok::<(), io::Error>(());
                }
            })();
            WRITE_BUF.with(|b| *b.borrow_mut() = buf);
            result?;
            if sync {
                f.sync_all()?;
            } else {
                // Durable at the next flush: start writing it back now, so
                // that the flush (one syncfs at the end of a backup) has
                // little left to wait for.
                // SAFETY: sync_file_range on a valid descriptor; failure only costs speed.
                unsafe {
                    libc::sync_file_range(
                        std::os::unix::io::AsRawFd::as_raw_fd(&f),
                        0,
                        0,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Removes what killed writers left in `dir` (hidden `.*.tmp` names
    /// older than STALE_TMP), once per directory and process.
    fn remove_stale_tmps(&self, dir: &Path) {
        if let Ok(mut swept) = self.swept.lock() {
            if !swept.insert(dir.to_path_buf()) {
                return;
            }
        }
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let fname = e.file_name();
            let Some(f) = fname.to_str() else { continue };
            if !f.starts_with('.') || !f.ends_with(".tmp") {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > STALE_TMP);
            if old {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    fn walk(&self, dir: &Path, rel: &str, out: &mut Vec<ObjectMeta>) -> io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            let key = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let ft = entry.file_type()?;
            if ft.is_dir() {
                self.walk(&entry.path(), &key, out)?;
            } else if ft.is_file() {
                let m = entry.metadata()?;
                out.push(ObjectMeta {
                    key,
                    size: m.len(),
                    modified: m.modified().ok(),
                });
            }
        }
        Ok(())
    }
}

impl Storage for PosixStorage {
    fn reads_are_local(&self) -> bool {
        true
    }
    fn put_new(
        &self,
        key: &str,
        body: &mut dyn Read,
        durability: Durability,
    ) -> Result<PutOutcome> {
        let path = self.path(key)?;
        let now = durability == Durability::Now;
        // The name may be there but not durable yet: a writer killed
        // between its link and its directory fsync, or a repo-sync copy
        // (AtFlush) not flushed yet. Callers take AlreadyExists for
        // "stored" (archive-push then reports the segment archived), so
        // with Durability::Now the existing object is made durable too.
        let existing = |path: &Path| -> Result<PutOutcome> {
            if now {
                File::open(path)
                    .and_then(|f| f.sync_all())
                    .and_then(|()| fsync_dir(path.parent().unwrap_or(&self.root)))
                    .map_err(|e| err("fsync", key, e))?;
            }
            Ok(PutOutcome::AlreadyExists)
        };
        if path.exists() {
            return existing(&path);
        }
        let tmp = self
            .write_tmp(&path, body, now)
            .map_err(|e| err("write", key, e))?;
        // link(2) fails if the name exists: two writers cannot overwrite each other.
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return existing(&path),
            Err(e) => return Err(err("link", key, e)),
        }
        if now {
            let dir = path.parent().unwrap_or(&self.root);
            fsync_dir(dir).map_err(|e| err("fsync", key, e))?;
        }
        Ok(PutOutcome::Stored)
    }

    fn flush(&self) -> Result<()> {
        // syncfs(2): one call makes every file and directory of the
        // repository's file system durable.
        let opened;
        let f = match self.root_handle.get() {
            Some(Some(f)) => f,
            _ => {
                opened = File::open(&self.root).map_err(|e| err("flush", "", e))?;
                &opened
            }
        };
        // SAFETY: syncfs on a valid, open descriptor.
        if unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(f)) } != 0 {
            return Err(err("flush", "", io::Error::last_os_error()));
        }
        Ok(())
    }

    fn put_replace(&self, key: &str, body: &mut dyn Read) -> Result<()> {
        let path = self.path(key)?;
        let tmp = self
            .write_tmp(&path, body, true)
            .map_err(|e| err("write", key, e))?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(err("rename", key, e));
        }
        let dir = path.parent().unwrap_or(&self.root);
        fsync_dir(dir).map_err(|e| err("fsync", key, e))
    }

    fn replace_checked(
        &self,
        key: &str,
        body: &mut dyn Read,
        _spool: &Path,
        check: &mut dyn FnMut(&mut dyn Read, bool) -> Result<()>,
        pacing: super::Pacing,
    ) -> Result<()> {
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(&self.root);
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object");
        // One fixed name per object: what a killed run left is removed
        // here (a hidden name: listings never show it).
        let tmp = dir.join(format!(".{name}.reseal.tmp"));
        match fs::remove_file(&tmp) {
            Ok(()) => tracing::info!("removed {} (left by an interrupted run)", tmp.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("remove", key, e)),
        }
        let mut body = super::PacedRead {
            inner: body,
            budget: pacing.up,
        };
        let tmp = self
            .write_at(dir, tmp, &mut body, true)
            .map_err(|e| err("write", key, e))?;
        let checked = File::open(&tmp)
            .map_err(|e| err("read back", key, e))
            .and_then(|f| {
                check(
                    &mut super::PacedRead {
                        inner: &mut io::BufReader::with_capacity(1 << 20, f),
                        budget: pacing.down,
                    },
                    true,
                )
            });
        if let Err(e) = checked {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        // The object keeps its time: it was stored then (restore judges how
        // far the archived WAL reaches by the times of its segments).
        if let Ok(m) = fs::symlink_metadata(&path) {
            if let (Ok(t), Ok(f)) = (m.modified(), File::options().write(true).open(&tmp)) {
                let _ = f.set_modified(t);
            }
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(err("rename", key, e));
        }
        fsync_dir(dir).map_err(|e| err("fsync", key, e))
    }

    fn get(&self, key: &str) -> Result<Option<Box<dyn Read + Send>>> {
        let path = self.path(key)?;
        match File::open(&path) {
            Ok(f) => Ok(Some(Box::new(io::BufReader::with_capacity(1 << 20, f)))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err("read", key, e)),
        }
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path(key)?;
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.len(),
                modified: m.modified().ok(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err("stat", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let rel = prefix.trim_end_matches('/');
        let dir = if rel.is_empty() {
            self.root.clone()
        } else {
            self.path(rel)?
        };
        let mut out = Vec::new();
        self.walk(&dir, rel, &mut out)
            .map_err(|e| err("list", prefix, e))?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(err("delete", key, e)),
        }
        let dir = path.parent().unwrap_or(&self.root);
        fsync_dir(dir).map_err(|e| err("fsync", key, e))?;
        // Folders exist only for their objects: remove the ones left empty.
        let mut d = dir;
        while d != self.root && fs::remove_dir(d).is_ok() {
            d = match d.parent() {
                Some(p) => p,
                None => break,
            };
        }
        Ok(())
    }

    fn list_children(&self, prefix: &str) -> Result<Vec<String>> {
        let rel = prefix.trim_end_matches('/');
        let dir = if rel.is_empty() {
            self.root.clone()
        } else {
            self.path(rel)?
        };
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(err("list", prefix, e)),
        };
        let mut out: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        out.sort();
        Ok(out)
    }

    fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let n = self.list(prefix)?.len();
        let dir = self.path(prefix.trim_end_matches('/'))?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(err("delete", prefix, e)),
        }
        let parent = dir.parent().unwrap_or(&self.root);
        fsync_dir(parent).map_err(|e| err("fsync", prefix, e))?;
        Ok(n)
    }

    fn describe(&self) -> String {
        format!("posix:{}", self.root.display())
    }

    fn space(&self) -> Result<Option<super::Space>> {
        fs_space(&self.root)
            .map(Some)
            .map_err(|e| err("statvfs", "", e))
    }
}

/// The size of the file system holding `p` (f_blocks) and what an
/// unprivileged user may still write there (f_bavail, not f_bfree: the
/// blocks reserved for root are not walshipper's to use).
pub fn fs_space(p: &Path) -> io::Result<super::Space> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs with a NUL-terminated path and a zeroed struct it fills.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        st
    };
    let frsize = st.f_frsize as u64;
    Ok(super::Space {
        total: (st.f_blocks as u64).saturating_mul(frsize),
        available: (st.f_bavail as u64).saturating_mul(frsize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_are_swept_once_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("a")).unwrap();
        let old = SystemTime::now() - STALE_TMP - Duration::from_secs(60);
        for name in [".x.1.0.tmp", ".y.1.0.tmp", ".z.1.0.tmp"] {
            let f = File::create(dir.path().join("a").join(name)).unwrap();
            if name != ".z.1.0.tmp" {
                f.set_modified(old).unwrap();
            }
        }
        let s = PosixStorage::new(dir.path());
        s.put_new("a/x", &mut &b"1"[..], Durability::AtFlush)
            .unwrap();
        let left = |d: &str| {
            let mut v: Vec<String> = fs::read_dir(dir.path().join(d))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        // Every old temporary goes, whatever its name; a recent one stays.
        assert_eq!(left("a"), vec![".z.1.0.tmp", "x"]);
        // Not read again by this process: one left now stays.
        let f = File::create(dir.path().join("a/.w.1.0.tmp")).unwrap();
        f.set_modified(old).unwrap();
        s.put_new("a/y", &mut &b"2"[..], Durability::AtFlush)
            .unwrap();
        assert_eq!(left("a"), vec![".w.1.0.tmp", ".z.1.0.tmp", "x", "y"]);
        assert!(PosixStorage::new(dir.path())
            .put_new("a/z", &mut &b"3"[..], Durability::AtFlush)
            .is_ok());
        assert_eq!(left("a"), vec![".z.1.0.tmp", "x", "y", "z"]);
    }

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let s = PosixStorage::new(dir.path());
        assert!(s.get("a/b").unwrap().is_none());
        assert_eq!(
            s.put_new("a/b", &mut &b"one"[..], Durability::Now).unwrap(),
            PutOutcome::Stored
        );
        assert_eq!(
            s.put_new("a/b", &mut &b"two"[..], Durability::Now).unwrap(),
            PutOutcome::AlreadyExists
        );
        let mut v = Vec::new();
        s.get("a/b").unwrap().unwrap().read_to_end(&mut v).unwrap();
        assert_eq!(v, b"one");
        s.put_replace("a/b", &mut &b"three"[..]).unwrap();
        s.put_new("a/c/d", &mut &b"x"[..], Durability::AtFlush)
            .unwrap();
        s.flush().unwrap();
        // A temporary left by a killed writer is invisible.
        fs::write(dir.path().join("a/.d.1.tmp"), b"partial").unwrap();
        let keys: Vec<_> = s.list("a/").unwrap().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, vec!["a/b", "a/c/d"]);
        assert_eq!(s.head("a/b").unwrap().unwrap().size, 5);
        s.delete("a/b").unwrap();
        assert!(s.head("a/b").unwrap().is_none());
        assert!(s.list("nothing/").unwrap().is_empty());
        assert!(s.put_new("../x", &mut &b""[..], Durability::Now).is_err());
    }

    /// `replace_checked`: the check reads the new bytes before they
    /// replace anything; a refusal, or a body that fails, leaves the old
    /// object and no temporary; a killed run's temporary is removed.
    #[test]
    fn replace_checked_replaces_only_what_was_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = PosixStorage::new(dir.path());
        let read = |s: &PosixStorage| {
            let mut v = Vec::new();
            s.get("w/x").unwrap().unwrap().read_to_end(&mut v).unwrap();
            v
        };
        let entries = |d: &Path| {
            let mut v: Vec<String> = fs::read_dir(d)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        s.put_new("w/x", &mut &b"old"[..], Durability::Now).unwrap();
        let spool = dir.path().join("unused");
        // Refused by the check: the old object stays, nothing is left.
        let err = s
            .replace_checked(
                "w/x",
                &mut &b"new"[..],
                &spool,
                &mut |r, store| {
                    assert!(store);
                    let mut v = Vec::new();
                    r.read_to_end(&mut v).unwrap();
                    assert_eq!(v, b"new");
                    Err(Error::Invalid("refused".into()))
                },
                crate::storage::Pacing::NONE,
            )
            .unwrap_err();
        assert!(err.to_string().contains("refused"));
        assert_eq!(read(&s), b"old");
        assert_eq!(entries(&dir.path().join("w")), vec!["x"]);
        // A body that fails midway: the check is never called.
        let mut failing = (&b"ne"[..]).chain(FailingReader);
        let err = s
            .replace_checked(
                "w/x",
                &mut failing,
                &spool,
                &mut |_, _| panic!("checked a body that failed"),
                crate::storage::Pacing::NONE,
            )
            .unwrap_err();
        assert!(matches!(err, Error::Storage { op: "write", .. }), "{err}");
        assert_eq!(read(&s), b"old");
        assert_eq!(entries(&dir.path().join("w")), vec!["x"]);
        // What a killed run left is removed; approved bytes replace the object.
        fs::write(dir.path().join("w/.x.reseal.tmp"), b"partial").unwrap();
        s.replace_checked(
            "w/x",
            &mut &b"new"[..],
            &spool,
            &mut |_, _| Ok(()),
            crate::storage::Pacing::NONE,
        )
        .unwrap();
        assert_eq!(read(&s), b"new");
        assert_eq!(entries(&dir.path().join("w")), vec!["x"]);
        assert!(!spool.exists());
    }

    struct FailingReader;

    impl Read for FailingReader {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("the source failed"))
        }
    }
}
