//! Exclusive locks between walshipper processes on one host (two backups of
//! one repository at once, a backup and an expire). flock(2) on a file that
//! is not part of the repository: the kernel drops it when the process dies,
//! so a killed run never leaves a stale lock.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

pub struct Lock {
    _file: File,
}

/// Takes lock `name` in `dir` (created if needed) without waiting.
pub fn try_lock(dir: &Path, name: &str) -> Result<Lock> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let path = dir.join(format!(".{name}.lock"));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(format!("open lock {}", path.display()), e))?;
    // SAFETY: flock on a valid, open descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Err(Error::Busy(format!(
            "another walshipper process holds the {name} lock of this repository ({}); wait for it to finish",
            holder.trim()
        )));
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    // Who holds it, for the message above (argv holds no secrets).
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.starts_with('-') || !a.contains('/'))
        .collect();
    let _ = write!(
        file,
        "pid {}: walshipper {}, since {}",
        std::process::id(),
        args.join(" "),
        chrono::Utc::now().to_rfc3339()
    );
    Ok(Lock { _file: file })
}

/// The lock of one repository, held by backup and expire: an incremental
/// backup refers to earlier backups' objects, which expire must not remove
/// under it. In the repository's directory on posix; an object store has no
/// locks, so there it is host-local.
pub fn repository(rc: &crate::config::RepoConfig, system_identifier: &str) -> Result<Lock> {
    match rc.kind.as_str() {
        "posix" => try_lock(&rc.path, "backup"),
        _ => try_lock(
            &std::env::temp_dir(),
            &format!("walshipper-backup-{system_identifier}-{}", rc.name),
        ),
    }
}
