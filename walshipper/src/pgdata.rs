//! Data directories. What a base backup copies from one, following
//! PostgreSQL's own rules (src/backend/backup/basebackup.c): which
//! directories keep only their existence, which files are never copied,
//! temporary files, unlogged relations (only their init fork), and
//! tablespaces behind pg_tblspc. And `DirFd`, through which restore writes
//! one without ever following a symbolic link below the directories the DBA
//! named.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
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
    pub size: u64,
    pub mtime: i64,
    pub mode: u32,
}

impl SourceFile {
    /// Where to read the file: its path below the data directory that was
    /// scanned (tablespace files through the pg_tblspc/<oid> link). Not
    /// kept per file: a listing of many files holds only the relative paths.
    pub fn abs(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(&self.rel)
    }
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
    /// `PG_<major>_`, the start of the cluster's version directory in a
    /// tablespace (None: PG_VERSION unreadable; nothing is left out).
    tablespace_dir: Option<String>,
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
    let mut files = Vec::new();
    let mut scan = scan_with(data_dir, &mut |f| {
        files.push(f);
        Ok(())
    })?;
    scan.files = files;
    Ok(scan)
}

/// Walks the data directory and hands each file to `each` in byte order
/// of its path (the order of a manifest), holding only the names of the
/// directories being walked: a backup of 100 000 files keeps none of them
/// (issue 17). The returned `Scan` has the directories and tablespaces,
/// sorted, and no files.
pub fn scan_with(data_dir: &Path, each: &mut dyn FnMut(SourceFile) -> Result<()>) -> Result<Scan> {
    // The version directory of this cluster in each tablespace
    // (`PG_<major>_`, then the catalog version), as PostgreSQL's own base
    // backup sends only it: another version's directory (left by
    // pg_upgrade) or a stray file there is not this cluster's, and a
    // manifest listing it would be refused by restore.
    let tablespace_dir = fs::read_to_string(data_dir.join("PG_VERSION"))
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .map(|major| format!("PG_{major}_"));
    let mut scan = Scan {
        tablespace_dir,
        ..Scan::default()
    };
    walk(data_dir, "", &mut scan, true, each)?;
    scan.dirs.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(scan)
}

/// The names of one directory, sorted so that walking them in turn gives
/// the paths below in byte order: a directory's name is sorted as if it
/// ended with '/' ("a/x" comes after "a-b", as '-' < '/'). Kept in one
/// buffer (about 16 bytes a name): a directory may hold 100 000 files.
struct Names {
    /// Each name, a directory's with a '/' after it, then a NUL.
    buf: Vec<u8>,
    starts: Vec<u32>,
}

impl Names {
    fn read(dir: &Path) -> std::io::Result<Names> {
        let mut names = Names {
            buf: Vec::new(),
            starts: Vec::new(),
        };
        for e in fs::read_dir(dir)? {
            let e = e?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                tracing::warn!("skipping non-UTF-8 name in {}", dir.display());
                continue;
            };
            // A link is sorted as what it leads to (pg_wal, pg_tblspc/<oid>,
            // a tablespace's version directory may be links).
            let is_dir = match e.file_type() {
                Ok(t) if t.is_symlink() => fs::metadata(e.path()).is_ok_and(|m| m.is_dir()),
                Ok(t) => t.is_dir(),
                Err(_) => false,
            };
            let start = u32::try_from(names.buf.len())
                .map_err(|_| std::io::Error::other("more than 4 GiB of names in one directory"))?;
            names.starts.push(start);
            names.buf.extend_from_slice(name.as_bytes());
            if is_dir {
                names.buf.push(b'/');
            }
            names.buf.push(0);
        }
        let buf = &names.buf;
        names
            .starts
            .sort_unstable_by(|&a, &b| Names::key(buf, a).cmp(Names::key(buf, b)));
        Ok(names)
    }

    fn key(buf: &[u8], start: u32) -> &[u8] {
        let rest = &buf[start as usize..];
        &rest[..rest.iter().position(|&c| c == 0).unwrap_or(rest.len())]
    }

    /// The names in walking order, without the '/' of a directory.
    fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.starts.iter().map(|&s| {
            let k = Names::key(&self.buf, s);
            let k = k.strip_suffix(b"/").unwrap_or(k);
            // Built from `str`s above, and cut at ASCII bytes only.
            std::str::from_utf8(k).unwrap_or_default()
        })
    }
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

fn walk(
    dir: &Path,
    rel: &str,
    scan: &mut Scan,
    top: bool,
    each: &mut dyn FnMut(SourceFile) -> Result<()>,
) -> Result<()> {
    let names = match Names::read(dir) {
        Ok(n) => n,
        // Dropped while we walked: WAL replay takes care of it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !top => return Ok(()),
        Err(e) => return Err(io_err(dir, e)),
    };
    // Unlogged relations: those with an init fork keep only the init fork.
    let unlogged: HashSet<String> = names
        .iter()
        .filter_map(|n| match relation_name(n) {
            Some((node, Some("init"))) => Some(node.to_string()),
            _ => None,
        })
        .collect();
    // pg_tblspc/<oid>: the root of a tablespace.
    let tablespace_root = rel.starts_with("pg_tblspc/") && rel.matches('/').count() == 1;
    for name in names.iter() {
        let path = dir.join(name);
        let child_rel = join(rel, name);
        if name.starts_with("pgsql_tmp") || EXCLUDE_FILES.contains(&name) {
            continue;
        }
        // Decided by the name alone: this cluster's own directory is never
        // skipped because it could not be examined (that fails the backup
        // below, as anywhere else), nor because it is a symbolic link.
        let mut version_dir = false;
        if tablespace_root {
            if let Some(want) = &scan.tablespace_dir {
                let ours = name
                    .strip_prefix(want.as_str())
                    .is_some_and(|cat| !cat.is_empty() && cat.bytes().all(|b| b.is_ascii_digit()));
                if !ours {
                    tracing::warn!(
                        "skipping {} in tablespace {}: not this cluster's version directory ({want}<catalog version>)",
                        name,
                        dir.display()
                    );
                    continue;
                }
                version_dir = true;
            }
        }
        if !unlogged.is_empty() {
            if let Some((node, fork)) = relation_name(name) {
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
            walk(&location, &child_rel, scan, false, each)?;
            continue;
        }
        // pg_wal may be a symlink to another disk: follow it like PostgreSQL.
        let meta = if ft.is_symlink() {
            match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if version_dir => return Err(io_err(&path, e)),
                Err(_) => continue,
            }
        } else {
            meta
        };
        if version_dir && !meta.is_dir() {
            return Err(Error::Invalid(format!(
                "{} is named as this cluster's directory in tablespace {}, but is not a directory: the tablespace cannot be backed up as it is",
                name,
                dir.display()
            )));
        }
        if meta.is_dir() {
            scan.dirs.push(SourceDir {
                rel: child_rel.clone(),
                mode: meta.mode() & 0o7777,
            });
            if top && EXCLUDE_DIR_CONTENTS.contains(&name) {
                if name == "pg_wal" {
                    scan.dirs.push(SourceDir {
                        rel: "pg_wal/archive_status".into(),
                        mode: 0o700,
                    });
                }
                continue;
            }
            walk(&path, &child_rel, scan, false, each)?;
        } else if meta.is_file() {
            each(SourceFile {
                rel: child_rel,
                size: meta.len(),
                mtime: meta.mtime(),
                mode: meta.mode() & 0o7777,
            })?;
        }
        // Sockets, FIFOs and other links are not data.
    }
    Ok(())
}

/// An open directory. Everything below it is reached with `openat` and
/// friends, one component at a time, with `O_NOFOLLOW`: a symbolic link
/// planted anywhere below (`base -> /etc`) is an error, never a way out.
/// Only the root itself is opened by path (it is what the DBA named).
pub struct DirFd {
    fd: OwnedFd,
    /// For messages only; never used to reach the directory again.
    path: PathBuf,
}

/// What is at a name in a directory, without following a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    Other,
}

fn cname(name: &str) -> io::Result<CString> {
    // One plain component only: the callers split paths themselves.
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn kind_of(mode: libc::mode_t) -> EntryKind {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFREG => EntryKind::File,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

impl DirFd {
    /// Opens a directory the DBA named (links in its own path are followed).
    pub fn open_root(path: &Path) -> io::Result<DirFd> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
        // SAFETY: a valid C string; the result is checked.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        Ok(DirFd {
            // SAFETY: a descriptor we just opened and own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `rel` below this directory, for messages.
    pub fn display(&self, rel: &str) -> String {
        self.path.join(rel).display().to_string()
    }

    /// Opens the subdirectory `name`; a link there is refused (ELOOP/ENOTDIR).
    pub fn open_dir(&self, name: &str) -> io::Result<DirFd> {
        let c = cname(name)?;
        // SAFETY: a valid descriptor and C string; the result is checked.
        let fd = cvt(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        Ok(DirFd {
            // SAFETY: a descriptor we just opened and own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: self.path.join(name),
        })
    }

    /// Opens the subdirectory `name`, creating it (mode `mode`) if missing.
    pub fn create_dir(&self, name: &str, mode: u32) -> io::Result<DirFd> {
        let c = cname(name)?;
        // SAFETY: a valid descriptor and C string; the result is checked.
        let r = unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) };
        let created = r == 0;
        if !created {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        let d = self.open_dir(name)?;
        if created {
            // mkdirat's mode went through the umask.
            d.chmod(mode)?;
        }
        Ok(d)
    }

    /// Walks `rel` (`/`-separated normal components) down from here,
    /// creating missing directories with `mode` when `create`.
    pub fn walk(&self, rel: &str, create: Option<u32>) -> io::Result<DirFd> {
        let mut parts = rel.split('/');
        let first = parts.next().unwrap_or("");
        let open = |d: &DirFd, n: &str| match create {
            Some(mode) => d.create_dir(n, mode),
            None => d.open_dir(n),
        };
        let mut d = open(self, first)?;
        for p in parts {
            d = open(&d, p)?;
        }
        Ok(d)
    }

    /// The directory holding `rel` and the last component's name.
    pub fn parent_of<'r>(&self, rel: &'r str, create: Option<u32>) -> io::Result<(DirFd, &'r str)> {
        match rel.rsplit_once('/') {
            Some((dir, name)) => Ok((self.walk(dir, create)?, name)),
            None => Ok((self.dup()?, rel)),
        }
    }

    pub fn dup(&self) -> io::Result<DirFd> {
        Ok(DirFd {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// Creates file `name` afresh (mode 0600), open for reading and
    /// writing. Whatever was at the name (a file, a link, a hard link to
    /// someone else's file) is unlinked first, never written through.
    pub fn create_file(&self, name: &str) -> io::Result<fs::File> {
        self.remove_file(name)?;
        let c = cname(name)?;
        // SAFETY: a valid descriptor and C string; the result is checked.
        let fd = cvt(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        })?;
        // SAFETY: a descriptor we just opened and own.
        Ok(unsafe { fs::File::from_raw_fd(fd) })
    }

    /// Opens regular file `name` for reading; `None` if there is none.
    /// A link, FIFO or device is an error (and is not opened for long:
    /// O_NONBLOCK keeps a FIFO from blocking).
    pub fn open_file(&self, name: &str) -> io::Result<Option<fs::File>> {
        let c = cname(name)?;
        // SAFETY: a valid descriptor and C string; the result is checked.
        let r = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: a descriptor we just opened and own.
        let f = unsafe { fs::File::from_raw_fd(r) };
        if !f.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a regular file",
                self.display(name)
            )));
        }
        Ok(Some(f))
    }

    /// What is at `name`, without following a link; `None` if nothing.
    pub fn kind(&self, name: &str) -> io::Result<Option<EntryKind>> {
        Ok(self.lstat(&cname(name)?)?.map(|st| kind_of(st.st_mode)))
    }

    /// fstatat without following a link; `None` if nothing is there.
    fn lstat(&self, c: &std::ffi::CStr) -> io::Result<Option<libc::stat>> {
        // SAFETY: zeroed stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, C string and out-pointer.
        let r = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(st))
    }

    /// Unlinks `name` unless it is a directory; fine if it is missing.
    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        let c = cname(name)?;
        // SAFETY: a valid descriptor and C string.
        let r = unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Removes `name` and, if it is a directory, everything in it. Links
    /// are removed, never followed.
    pub fn remove_all(&self, name: &str) -> io::Result<()> {
        match self.kind(name)? {
            None => Ok(()),
            Some(EntryKind::Dir) => {
                self.open_dir(name)?.remove_contents()?;
                let c = cname(name)?;
                // SAFETY: a valid descriptor and C string.
                cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })
                    .map(drop)
            }
            Some(_) => self.remove_file(name),
        }
    }

    /// Removes everything in this directory (links are not followed).
    pub fn remove_contents(&self) -> io::Result<()> {
        for (name, _) in self.entries()? {
            if let Some(n) = name.to_str() {
                self.remove_all(n)?;
            } else {
                // Non-UTF-8: still one plain component.
                let c = CString::new(name.into_vec())
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))?;
                // SAFETY: a valid descriptor and C string.
                let r = unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    /// Renames `from` to `to`, both in this directory.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (f, t) = (cname(from)?, cname(to)?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: valid descriptors and C strings.
        cvt(unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) }).map(drop)
    }

    /// The target of link `name`; `None` if there is nothing or no link.
    pub fn read_link(&self, name: &str) -> io::Result<Option<PathBuf>> {
        let c = cname(name)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: valid descriptor and C string; buf has buf.len() bytes.
        let n = unsafe {
            libc::readlinkat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::EINVAL) => Ok(None),
                _ => Err(e),
            };
        }
        buf.truncate(n as usize);
        Ok(Some(PathBuf::from(OsString::from_vec(buf))))
    }

    /// Creates link `name` pointing at `target`.
    pub fn symlink(&self, target: &Path, name: &str) -> io::Result<()> {
        let c = cname(name)?;
        let t = CString::new(target.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))?;
        // SAFETY: valid descriptor and C strings.
        cvt(unsafe { libc::symlinkat(t.as_ptr(), self.fd.as_raw_fd(), c.as_ptr()) }).map(drop)
    }

    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        // SAFETY: a valid descriptor.
        cvt(unsafe { libc::fchmod(self.fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
    }

    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: a valid descriptor.
        cvt(unsafe { libc::fsync(self.fd.as_raw_fd()) }).map(drop)
    }

    /// syncfs(2) of the file system this directory is on: every file and
    /// directory written there is durable when it returns (and a writeback
    /// error since this descriptor was opened is reported).
    pub fn sync_fs(&self) -> io::Result<()> {
        // SAFETY: a valid descriptor.
        cvt(unsafe { libc::syncfs(self.fd.as_raw_fd()) }).map(drop)
    }

    /// The names in this directory (without `.` and `..`) and what they are.
    pub fn entries(&self) -> io::Result<Vec<(OsString, EntryKind)>> {
        // fdopendir takes the descriptor over: give it a copy.
        let fd = self.fd.try_clone()?;
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        // SAFETY: a descriptor we own; on success the DIR owns it.
        let dir = unsafe { libc::fdopendir(raw) };
        if dir.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: still ours when fdopendir failed.
            unsafe { libc::close(raw) };
            return Err(e);
        }
        // A copy shares the offset with the original: start from the top.
        // SAFETY: a valid DIR.
        unsafe { libc::rewinddir(dir) };
        let mut out = Vec::new();
        let result = loop {
            // SAFETY: errno is thread-local; reset to tell end from error.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: a valid DIR.
            let ent = unsafe { libc::readdir(dir) };
            if ent.is_null() {
                let e = io::Error::last_os_error();
                break if e.raw_os_error() == Some(0) {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            // SAFETY: d_name is NUL-terminated within the entry.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            out.push(OsStr::from_bytes(bytes).to_os_string());
        };
        // SAFETY: the DIR from fdopendir, closed once.
        unsafe { libc::closedir(dir) };
        result?;
        let mut typed = Vec::with_capacity(out.len());
        for name in out {
            let c = CString::new(name.as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))?;
            // Gone since the listing: nothing to do with it.
            let Some(st) = self.lstat(&c)? else {
                continue;
            };
            typed.push((name, kind_of(st.st_mode)));
        }
        Ok(typed)
    }
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
    fn dirfd_never_follows_a_link_below_its_root() {
        let d = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        fs::write(victim.path().join("keep"), b"victim").unwrap();
        let root = DirFd::open_root(d.path()).unwrap();
        std::os::unix::fs::symlink(victim.path(), d.path().join("base")).unwrap();
        // Walking, creating under, or opening through the link fails.
        assert!(root.walk("base/5", Some(0o700)).is_err());
        assert!(root.walk("base", None).is_err());
        assert!(root.parent_of("base/keep", Some(0o700)).is_err());
        assert!(root.open_file("base").is_err());
        assert!(root.create_dir("base", 0o700).is_err());
        // A link (or a hard link) at a file's name is replaced, not written through.
        std::os::unix::fs::symlink(victim.path().join("keep"), d.path().join("f")).unwrap();
        fs::hard_link(victim.path().join("keep"), d.path().join("h")).unwrap();
        for name in ["f", "h"] {
            use std::io::Write;
            let mut f = root.create_file(name).unwrap();
            f.write_all(b"ours").unwrap();
        }
        assert_eq!(fs::read(victim.path().join("keep")).unwrap(), b"victim");
        assert_eq!(fs::read(d.path().join("h")).unwrap(), b"ours");
        assert_eq!(root.kind("f").unwrap(), Some(EntryKind::File));
        // Names are single components.
        for bad in ["..", ".", "a/b", ""] {
            assert!(root.create_file(bad).is_err(), "{bad}");
        }
        // Removal removes the link, never what it points at.
        std::os::unix::fs::symlink(victim.path(), d.path().join("l2")).unwrap();
        let sub = root.walk("x/y", Some(0o750)).unwrap();
        std::os::unix::fs::symlink(victim.path(), d.path().join("x/y/l3")).unwrap();
        assert_eq!(
            fs::metadata(d.path().join("x/y")).unwrap().mode() & 0o777,
            0o750
        );
        sub.sync().unwrap();
        root.remove_contents().unwrap();
        assert!(fs::read_dir(d.path()).unwrap().next().is_none());
        assert_eq!(fs::read(victim.path().join("keep")).unwrap(), b"victim");
        // Links are read, not followed.
        root.symlink(victim.path(), "16390").unwrap();
        assert_eq!(
            root.read_link("16390").unwrap().as_deref(),
            Some(victim.path())
        );
        assert_eq!(root.read_link("none").unwrap(), None);
        let kinds: Vec<_> = root.entries().unwrap();
        assert_eq!(kinds, vec![(OsString::from("16390"), EntryKind::Symlink)]);
    }

    #[test]
    fn a_tablespace_keeps_its_own_version_directory_even_as_a_link() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        fs::create_dir_all(p.join("pg_tblspc")).unwrap();
        fs::write(p.join("PG_VERSION"), b"15\n").unwrap();
        let ts = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        fs::create_dir_all(elsewhere.path().join("5")).unwrap();
        fs::write(elsewhere.path().join("5/300"), b"y").unwrap();
        // This version's directory as a link (followed, as PostgreSQL's own
        // base backup does), another version's directory (skipped).
        std::os::unix::fs::symlink(elsewhere.path(), ts.path().join("PG_15_1")).unwrap();
        fs::create_dir_all(ts.path().join("PG_14_9/5")).unwrap();
        fs::write(ts.path().join("PG_14_9/5/1"), b"z").unwrap();
        std::os::unix::fs::symlink(ts.path(), p.join("pg_tblspc/16400")).unwrap();
        let s = scan(p).unwrap();
        let files: Vec<_> = s.files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(files, ["PG_VERSION", "pg_tblspc/16400/PG_15_1/5/300"]);
        // Named as ours but not a directory: the backup fails, it does not
        // go on without the tablespace.
        fs::remove_file(ts.path().join("PG_15_1")).unwrap();
        fs::write(ts.path().join("PG_15_1"), b"not a directory").unwrap();
        assert!(scan(p).is_err(), "a tablespace was left out silently");
        // A link to nothing: the same.
        fs::remove_file(ts.path().join("PG_15_1")).unwrap();
        std::os::unix::fs::symlink(p.join("gone"), ts.path().join("PG_15_1")).unwrap();
        assert!(scan(p).is_err(), "a tablespace was left out silently");
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

    /// Files come in byte order of their whole paths, without a sort of
    /// the listing: a directory is walked where its name plus '/' sorts
    /// ("base-old" < "base/..." < "base0"), a link to a directory too.
    #[test]
    fn files_come_in_byte_order_of_their_paths() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for dir in ["base/5", "base/5.d", "base/5 x", "pg_tblspc", "a"] {
            fs::create_dir_all(p.join(dir)).unwrap();
        }
        for f in [
            "base/5/1",
            "base/5/10",
            "base/5/1.1",
            "base/5/1_fsm",
            "base/5.d/x",
            "base/5 x/y",
            "base/5-",
            "base/50",
            "base-old",
            "base0",
            "a/b",
            "a.b",
            "a-b",
            "PG_VERSION",
        ] {
            fs::write(p.join(f), b"x").unwrap();
        }
        let ts = tempfile::tempdir().unwrap();
        fs::create_dir_all(ts.path().join("PG_15_1/5")).unwrap();
        fs::write(ts.path().join("PG_15_1/5/300"), b"y").unwrap();
        std::os::unix::fs::symlink(ts.path(), p.join("pg_tblspc/16400")).unwrap();
        // A link to a directory, named as a file sorts before its '/'.
        std::os::unix::fs::symlink(p.join("base/5"), p.join("link")).unwrap();
        fs::write(p.join("link-x"), b"x").unwrap();
        let mut got = Vec::new();
        let s = scan_with(p, &mut |f| {
            got.push(f.rel);
            Ok(())
        })
        .unwrap();
        assert!(s.files.is_empty());
        let mut want = got.clone();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(got.len(), 20, "{got:?}");
        assert!(got.contains(&"pg_tblspc/16400/PG_15_1/5/300".to_string()));
        assert!(got.contains(&"link/1_fsm".to_string()));
        // An error from the consumer stops the walk and is returned.
        let mut n = 0;
        let e = scan_with(p, &mut |_| {
            n += 1;
            if n == 3 {
                return Err(Error::Invalid("stop here".into()));
            }
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("stop here"));
        assert_eq!(n, 3);
    }
}
