//! The local spool shared by asynchronous archive-push
//! (commands::archive_async) and archive-get look-ahead
//! (commands::archive_lookahead): checks of the configured directory, small
//! files written durably, the lock that keeps one background process per
//! spool, and how that process is started.
//!
//! Nothing in a spool is trusted beyond what its writer proved: a file
//! appears under its final name only after it was written whole (a
//! temporary, then a rename), so a half-written one never carries a final
//! name, and readers check what they read. Records async archive-push
//! reports from are also synced before and after the rename
//! (`write_durable`); look-ahead segments are not (a crash ends the
//! prefetcher holding the lock, and with it every file's worth: nothing is
//! served without a live holder of this boot).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::private_dir::{self, Found};

/// Below this much free space a spool is full: records and segments must
/// not be the writes that find the disk full half way.
pub const MIN_FREE: u64 = 1 << 20;

/// The background process's log is rotated (once, to `.1`) above this size.
const LOG_MAX: u64 = 10 << 20;

/// Checks the configured spool directory (`setting` names it in errors) and
/// returns `<dir>/<sub>`, created mode 0700 if missing.
///
/// The spool holds what archive-get serves to recovery and what async
/// archive-push reports as archived, so no one but this user may change
/// it: `dir` must be this user's and writable by no one else, and every
/// directory under it a real directory (no symlink) of this user's, mode
/// 0700, as the key cache and the summary cache ask of theirs. Otherwise
/// another local user could plant a directory, a lock holder or a symlink
/// there (a shared /tmp, a group-writable directory).
pub fn prepare(dir: &Path, setting: &str, sub: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(dir).map_err(|e| {
        Error::Config(format!(
            "{setting}: {} cannot be used ({e}); create it, owned by the user PostgreSQL runs as, mode 0700 \
             (e.g. install -d -o postgres -m 0700 {}), or set {setting} to such a directory",
            dir.display(),
            dir.display()
        ))
    })?;
    let top = Found::of(&meta);
    if !top.is_dir() {
        return Err(Error::Config(format!(
            "{setting}: {} is not a directory",
            dir.display()
        )));
    }
    if !top.is_ours_alone() {
        let uid = private_dir::euid();
        return Err(Error::Config(format!(
            "{setting}: {} is {top}: it must be owned by the user walshipper runs as \
             (uid {uid}) and writable by no one else (e.g. chown postgres {} && chmod 0700 {})",
            dir.display(),
            dir.display(),
            dir.display()
        )));
    }
    // One level at a time, each checked before anything is made in it (a
    // planted symlink is refused before a directory is made through it).
    let mut at = dir.to_path_buf();
    for part in sub.components() {
        at.push(part);
        let found = private_dir::make(&at).map_err(|e| {
            Error::Config(format!(
                "{setting}: cannot create {} ({e}); the directory must be writable by the user walshipper runs as",
                at.display()
            ))
        })?;
        if !found.is_private() {
            return Err(Error::Config(format!(
                "{setting}: {} is not a private directory of this user's ({found}); \
                 remove it (walshipper makes it again, mode 0700) and check who else can write to {}",
                at.display(),
                dir.display()
            )));
        }
    }
    Ok(at)
}

/// Free bytes for unprivileged writes on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::other("path holds a NUL byte"))?;
    // SAFETY: statvfs with a valid C string and a zeroed out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Refuses a spool with less than [`MIN_FREE`] bytes free.
pub fn check_room(dir: &Path, setting: &str) -> Result<()> {
    let free = free_bytes(dir).map_err(|e| Error::io(format!("statvfs {}", dir.display()), e))?;
    if free < MIN_FREE {
        return Err(Error::Io {
            context: format!(
                "{setting}: the spool {} is full ({free} bytes free, at least {MIN_FREE} needed); \
                 free space on its file system (of the spool itself only its .log files may be removed by hand), \
                 or point {setting} at a larger volume",
                dir.display()
            ),
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        });
    }
    Ok(())
}

/// A short hex fingerprint of `parts` (a spool directory's name: what the
/// files in it belong to).
pub fn fingerprint(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..16])
}

/// Syncs a directory, making the renames in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The temporary a file `name` is written to before its rename; a name
/// starting with '.' is never taken for a final file.
fn temp_name(name: &str) -> String {
    format!(".{name}.tmp.{}", std::process::id())
}

/// Writes `body` to `dir/name` durably: a temporary written and synced,
/// renamed, the directory synced. A crash at any point leaves either no
/// `name` or the whole of it (and maybe a temporary, which readers ignore).
pub fn write_durable(dir: &Path, name: &str, body: &[u8]) -> io::Result<()> {
    let tmp = dir.join(temp_name(name));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(name))?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A WAL file's temporary beside its destination (`RECOVERYXLOG` in
/// pg_wal, a segment in the look-ahead spool): `.<name>.walshipper.tmp.`
/// then this writer's pid and a number, created new (O_EXCL, no symlink
/// followed), so that two writers of one destination (an archive-get
/// orphaned by a killed startup process beside the next one's) never
/// write into one file. Temporaries that dead processes left beside
/// `dest` are removed first.
pub fn create_beside(dest: &Path) -> io::Result<(PathBuf, File)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let (dir, name) = beside(dest).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad destination {}", dest.display()),
        )
    })?;
    let prefix = format!(".{name}.walshipper.tmp.");
    remove_dead_writers(dir, &prefix);
    let pid = std::process::id();
    // A name a dead process with this pid left (pids are reused) is
    // skipped, not an error.
    let mut tries = 0;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{prefix}{pid}-{n}"));
        // The mode is the umask's, as for any file (pg_wal's group access).
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// `dest`'s directory ("." for a bare name) and file name.
fn beside(dest: &Path) -> Option<(&Path, &str)> {
    let name = dest.file_name()?.to_str()?;
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Some((dir, name))
}

/// Whether a writer is writing `dest` now (a temporary of `create_beside`
/// whose process lives).
pub fn being_written(dest: &Path) -> bool {
    let Some((dir, name)) = beside(dest) else {
        return false;
    };
    let prefix = format!(".{name}.walshipper.tmp.");
    temporaries(dir, &prefix)
        .into_iter()
        .any(|(_, pid)| pid.is_some_and(crate::lock::process_exists))
}

/// The temporaries named `<prefix><pid>-<n>` in `dir`, with their pid.
fn temporaries(dir: &Path, prefix: &str) -> Vec<(PathBuf, Option<u32>)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name();
            let rest = n.to_str()?.strip_prefix(prefix)?.to_string();
            let pid = rest
                .split_once('-')
                .and_then(|(p, _)| p.parse::<u32>().ok());
            Some((e.path(), pid))
        })
        .collect()
}

fn remove_dead_writers(dir: &Path, prefix: &str) {
    for (path, pid) in temporaries(dir, prefix) {
        if !pid.is_some_and(crate::lock::process_exists) {
            let _ = fs::remove_file(path);
        }
    }
}

/// Reads a small spool file (at most `max` bytes); None if absent.
pub fn read_small(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {max} bytes", path.display()),
        ));
    }
    Ok(Some(buf))
}

/// Removes the temporaries a killed writer left behind (names starting
/// with '.' and holding ".tmp"); only the process holding the spool's lock
/// calls this.
pub fn remove_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with('.') && n.contains(".tmp") {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// The lock that makes one background process per spool: an flock held as
/// long as the process lives (the kernel drops it when it dies, however).
pub struct ProcessLock {
    _file: File,
}

fn open_lock(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Takes the lock at `path`, and writes our pid in it (for the
/// administrator, for tests that kill the holder, and for
/// [`lock_holder`]); None when another process holds it.
pub fn try_lock(path: &Path) -> Result<Option<ProcessLock>> {
    let mut file = open_lock(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    // A probe ([`is_locked`]) holds a shared lock for a moment: waited out
    // briefly, so that a probe never makes a starting process give up.
    let io_err = |e| Error::io(format!("flock {}", path.display()), e);
    let mut attempts = 0;
    while !flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(io_err)? {
        // Only probes hold it (a shared lock is granted): let go, try again.
        if attempts >= 200 || !flock(&file, libc::LOCK_SH | libc::LOCK_NB).map_err(io_err)? {
            return Ok(None);
        }
        flock(&file, libc::LOCK_UN).map_err(io_err)?;
        attempts += 1;
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let _ = file.set_len(0);
    let _ = write!(file, "{}", std::process::id());
    Ok(Some(ProcessLock { _file: file }))
}

/// flock(2) on `file`: false when it would block.
fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on a valid, open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(e)
}

/// Whether a process holds the lock at `path`. Probed with a shared lock,
/// released at once: two probes at the same moment never make each other
/// look like the holder (only [`try_lock`] takes it exclusively). The
/// file's content is left alone.
pub fn is_locked(path: &Path) -> Result<bool> {
    let file = open_lock(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    // Released when `file` closes.
    let free = flock(&file, libc::LOCK_SH | libc::LOCK_NB)
        .map_err(|e| Error::io(format!("flock {}", path.display()), e))?;
    Ok(!free)
}

/// The pid the holder of the lock at `path` wrote in it, if a process
/// holds it now; None when free (or the content is not a pid).
pub fn lock_holder(path: &Path) -> Result<Option<u32>> {
    if !is_locked(path)? {
        return Ok(None);
    }
    let body =
        read_small(path, 32).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    Ok(body
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|t| t.trim().parse().ok()))
}

/// The text of `file` if the process holding the lock at `lock` wrote it:
/// a file a background process writes under its lock carries a
/// `holder=<pid>` line, and it vouches for nothing once that process is
/// gone (a file left by a dead run, or by one that lost the lock, is not
/// the live holder's). The look-ahead's identity file and the pusher's
/// vouch are both read through this. None: no holder now, no such file,
/// or another holder's.
pub fn read_if_holder(lock: &Path, file: &Path, max: u64) -> Result<Option<String>> {
    let Some(holder) = lock_holder(lock)? else {
        return Ok(None);
    };
    let Some(body) = read_small(file, max).ok().flatten() else {
        return Ok(None);
    };
    let Ok(text) = String::from_utf8(body) else {
        return Ok(None);
    };
    let wrote = text
        .lines()
        .find_map(|l| l.strip_prefix("holder="))
        .and_then(|p| p.parse::<u32>().ok());
    Ok((wrote == Some(holder)).then_some(text))
}

/// Milliseconds on CLOCK_BOOTTIME: one clock for every process of this
/// boot, never stepped by NTP or an administrator (the wall clock may be),
/// and counting time suspended (an age measured on it is never too
/// short). It restarts at 0 on each boot: readings kept in files are
/// compared only together with the [`boot_id`] they were taken in. None
/// when the clock cannot be read (then nothing is vouched for).
pub fn boottime_ms() -> Option<u64> {
    // SAFETY: clock_gettime with a valid clock id and a zeroed out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    Some(
        (ts.tv_sec as u64)
            .saturating_mul(1000)
            .saturating_add(ts.tv_nsec as u64 / 1_000_000),
    )
}

/// This boot's id (the kernel's random UUID, new at every boot): a reading
/// of [`boottime_ms`] from another boot, or a pid recorded then and reused
/// since, is never taken for this boot's. None when it cannot be read.
pub fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        .then(|| id.to_string())
}

/// The repository's descriptor as the store holds it now (the background
/// processes read it again every few seconds: a repository re-created at
/// the same place has a new id). Ok(None): there is none, or it is not a
/// descriptor (a repository removed or replaced); Err: it cannot be read
/// now (the store unreachable), which says nothing either way.
pub fn descriptor_now(repo: &crate::repo::Repository) -> Result<Option<crate::repo::Descriptor>> {
    let Some(r) = repo.storage.get(crate::repo::DESCRIPTOR_KEY)? else {
        return Ok(None);
    };
    let mut body = Vec::new();
    r.take(64 << 10).read_to_end(&mut body).map_err(|e| {
        Error::io(
            format!("read repository.json of repository {}", repo.name),
            e,
        )
    })?;
    Ok(crate::repo::Descriptor::parse(&body).ok())
}

/// Starts this binary again with `args`, detached: its own session (setsid:
/// no signal for PostgreSQL's process group reaches it, and it outlives the
/// archiver's call), no standard input or output, standard error appended to
/// `log`. An argument vector, no shell. The environment is inherited (the
/// WALSHIPPER_* settings and the passphrase source must be the same).
pub fn spawn_detached(args: &[OsString], log: &Path) -> Result<()> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::io("cannot find the walshipper binary (/proc/self/exe)", e))?;
    if fs::metadata(log)
        .map(|m| m.len() > LOG_MAX)
        .unwrap_or(false)
    {
        let mut old = log.as_os_str().to_owned();
        old.push(".1");
        let _ = fs::rename(log, PathBuf::from(old));
    }
    let err = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log)
        .map_err(|e| Error::io(format!("open {}", log.display()), e))?;
    let mut cmd = Command::new(&exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(err));
    // SAFETY: setsid is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("start {}", exe.display()), e))?;
    // Not waited for: it outlives us, and init reaps it.
    drop(child);
    Ok(())
}

/// The wall-clock time of day to the millisecond, for debug lines that are
/// compared across processes (the archive-get calls and the prefetcher).
pub fn stamp() -> String {
    chrono::Utc::now().format("%H:%M:%S%.3f").to_string()
}

/// A line for a background process's log, with the time (its standard
/// error is a file nobody watches live).
pub fn log_line(msg: &str) {
    eprintln!(
        "{} walshipper[{}]: {msg}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%S%.3f UTC"),
        std::process::id()
    );
}

/// Reads a small spool file (a record, the pusher's vouch, the look-ahead's
/// identity): a format line, then `key=value` lines in a fixed order, the
/// last one ended by a newline (written last: without it the file is not
/// whole).
pub struct KeyLines<'a> {
    lines: std::str::Split<'a, char>,
}

impl<'a> KeyLines<'a> {
    /// None unless `text` is whole and its first line is `format`.
    pub fn open(text: &'a str, format: &str) -> Option<KeyLines<'a>> {
        let mut lines = text.strip_suffix('\n')?.split('\n');
        (lines.next()? == format).then_some(KeyLines { lines })
    }

    /// The value of the next line, which must be `key=`.
    pub fn field(&mut self, key: &str) -> Option<&'a str> {
        self.lines.next()?.strip_prefix(key)?.strip_prefix('=')
    }

    /// True when no line is left.
    pub fn end(mut self) -> bool {
        self.lines.next().is_none()
    }
}

/// `name:id,name:id`: repositories as records and vouches list them.
pub fn render_repos(repos: &[(String, String)]) -> String {
    let items: Vec<String> = repos.iter().map(|(n, id)| format!("{n}:{id}")).collect();
    items.join(",")
}

/// The reverse of [`render_repos`]; None for anything else.
pub fn parse_repos(text: &str) -> Option<Vec<(String, String)>> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.split_once(':')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::DirBuilderExt;

    #[test]
    fn temporaries_beside_a_destination_are_each_writers_own() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("RECOVERYXLOG");
        let (a, _fa) = create_beside(&dest).unwrap();
        let (b, _fb) = create_beside(&dest).unwrap();
        assert_ne!(a, b, "one file for two writers");
        assert!(being_written(&dest));
        // One a dead process left: removed by the next writer; ours stay.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = d
            .path()
            .join(format!(".RECOVERYXLOG.walshipper.tmp.{dead}-0"));
        fs::write(&stale, b"half").unwrap();
        let (c, _fc) = create_beside(&dest).unwrap();
        assert!(!stale.exists() && a.exists() && b.exists() && c.exists());
        // Another destination's temporaries are not this one's.
        assert!(!being_written(&d.path().join("000000010000000000000001")));
        for t in [a, b, c] {
            fs::remove_file(t).unwrap();
        }
        assert!(!being_written(&dest));
    }

    #[test]
    fn durable_files_lock_and_settings() {
        let d = tempfile::tempdir().unwrap();
        let sub = prepare(d.path(), "archive.spool_dir", Path::new("a/b")).unwrap();
        write_durable(&sub, "x.ok", b"hello\n").unwrap();
        assert_eq!(
            read_small(&sub.join("x.ok"), 64).unwrap().unwrap(),
            b"hello\n"
        );
        assert!(read_small(&sub.join("x.ok"), 3).is_err(), "over the cap");
        assert!(read_small(&sub.join("none"), 64).unwrap().is_none());
        // A temporary a killed writer left is removed; final names stay.
        fs::write(sub.join(".y.ok.tmp.1"), b"half").unwrap();
        remove_temporaries(&sub);
        assert!(!sub.join(".y.ok.tmp.1").exists() && sub.join("x.ok").exists());
        // One holder at a time; the pid is in the file.
        let lock = sub.join("p.lock");
        let held = try_lock(&lock).unwrap().expect("free");
        assert!(try_lock(&lock).unwrap().is_none() && is_locked(&lock).unwrap());
        assert_eq!(
            fs::read_to_string(&lock).unwrap(),
            std::process::id().to_string()
        );
        assert_eq!(lock_holder(&lock).unwrap(), Some(std::process::id()));
        drop(held);
        assert!(!is_locked(&lock).unwrap());
        assert_eq!(lock_holder(&lock).unwrap(), None);
        // A probe in progress (a shared lock) is not a holder to another
        // probe, and only delays one taking the lock.
        let probe = open_lock(&lock).unwrap();
        assert!(flock(&probe, libc::LOCK_SH | libc::LOCK_NB).unwrap());
        assert!(!is_locked(&lock).unwrap(), "a probe looked like the holder");
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            drop(probe);
        });
        assert!(
            try_lock(&lock).unwrap().is_some(),
            "a probe made try_lock give up"
        );
        release.join().unwrap();
        // Writable by others, or a planted symlink under it: refused.
        use std::os::unix::fs::PermissionsExt;
        let open = d.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let e = prepare(&open, "restore.spool_dir", Path::new("a"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("restore.spool_dir") && e.contains("0777"), "{e}");
        let base = d.path().join("base");
        fs::DirBuilder::new().mode(0o700).create(&base).unwrap();
        let elsewhere = d.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, base.join("archive-get")).unwrap();
        let e = prepare(&base, "restore.spool_dir", Path::new("archive-get/fp"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("symlink"), "{e}");
        assert!(!elsewhere.join("fp").exists(), "made through the symlink");
        // A directory under it open to others (made before, not by us).
        fs::remove_file(base.join("archive-get")).unwrap();
        fs::create_dir(base.join("archive-get")).unwrap();
        fs::set_permissions(base.join("archive-get"), fs::Permissions::from_mode(0o755)).unwrap();
        let e = prepare(&base, "restore.spool_dir", Path::new("archive-get/fp"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("0755"), "{e}");
        fs::set_permissions(base.join("archive-get"), fs::Permissions::from_mode(0o700)).unwrap();
        prepare(&base, "restore.spool_dir", Path::new("archive-get/fp")).unwrap();
        // A missing spool is an error naming the setting.
        let e = prepare(
            &d.path().join("missing"),
            "archive.spool_dir",
            Path::new("a"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("archive.spool_dir"), "{e}");
        // The settings parse, from the file and from the environment.
        let f = d.path().join("w.toml");
        fs::write(
            &f,
            "[archive]\nasync = true\nasync_jobs = 2\n[restore]\nlookahead = 8\n",
        )
        .unwrap();
        let env = [("WALSHIPPER_ARCHIVE_ASYNC_WAIT".to_string(), "5".to_string())];
        let cfg = crate::config::Config::load_with_env(Some(&f), env).unwrap();
        assert!(cfg.archive.async_mode);
        assert_eq!(
            (
                cfg.archive.async_jobs,
                cfg.archive.async_wait,
                cfg.restore.lookahead
            ),
            (2, 5, 8)
        );
        fs::write(&f, "[archive]\nasync_jobs = 0\n").unwrap();
        let e = crate::config::Config::load_with_env(Some(&f), [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("archive.async_jobs"), "{e}");
    }
}
