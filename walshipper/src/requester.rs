//! The server that asked for a WAL file. PostgreSQL's startup process runs
//! `archive-get` through `sh -c`; when that process is killed (a crash, an
//! immediate shutdown) archive-get keeps running, and the next server may
//! already be recovering into the same pg_wal. So the command notes its
//! parent and grandparent when it starts, and every rename into the
//! destination (the direct fetch, the look-ahead's move and copy, the
//! streamed tail) goes through [`rename_if_asked`], which refuses once they
//! changed. In any other process (the prefetcher, a restore, library use)
//! nothing was noted and nothing is refused.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

type Parents = (libc::pid_t, Option<libc::pid_t>);

/// The parents of this archive-get command when it started; unset in other
/// processes.
static ASKED_BY: OnceLock<Parents> = OnceLock::new();

/// Set once the requester was seen gone: it does not come back, and a
/// later misread of /proc must not make it seem to.
static GONE: AtomicBool = AtomicBool::new(false);

/// Proof that the requester was noted, for what waits on it (a wait that
/// should end when the server goes would otherwise never end early).
pub(crate) struct Noted(());

/// Notes who asked: the archive-get command calls this first thing.
pub(crate) fn note() -> Noted {
    let _ = ASKED_BY.set(parents());
    Noted(())
}

/// Whether this is the archive-get command and the server that asked is
/// gone (always false in other processes).
pub(crate) fn gone() -> bool {
    if GONE.load(Ordering::Relaxed) {
        return true;
    }
    let gone = ASKED_BY
        .get()
        .is_some_and(|&start| !same_parents(start, parents()));
    if gone {
        GONE.store(true, Ordering::Relaxed);
    }
    gone
}

/// Renames a fetched WAL file's temporary to `dest` (RECOVERYXLOG) only
/// while the server that asked for it waits: a late rename would put
/// another segment under the name the next server is about to read.
pub(crate) fn rename_if_asked(from: &Path, dest: &Path) -> io::Result<()> {
    if gone() {
        return Err(io::Error::other(
            "the server that asked for it is gone (its startup process ended): not written",
        ));
    }
    fs::rename(from, dest)
}

/// The parent process id of `pid`, from /proc (None if unreadable).
fn ppid_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Our parent and its parent: the shell may stay in between.
fn parents() -> Parents {
    // SAFETY: getppid has no preconditions and cannot fail.
    let parent = unsafe { libc::getppid() };
    (parent, ppid_of(parent))
}

/// Whether `current` are still the parents the call started with. The
/// grandparent is compared only when read both times: an unreadable
/// /proc entry (a transient error, another pid namespace's /proc) is no
/// sign of orphaning, and taking it for one would stop recovery.
fn same_parents(start: Parents, current: Parents) -> bool {
    current.0 == start.0
        && match (start.1, current.1) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_whose_parents_changed_is_orphaned() {
        let start = (100, Some(50));
        assert!(same_parents(start, (100, Some(50))));
        // The shell or the startup process gone: reparented.
        assert!(!same_parents(start, (1, Some(0))));
        assert!(!same_parents(start, (100, Some(1))));
        // A grandparent unread either time: the parent alone decides.
        assert!(same_parents((100, None), (100, Some(7))));
        assert!(same_parents((100, Some(50)), (100, None)));
        assert!(!same_parents((100, None), (1, None)));
        // Outside the archive-get command (nothing noted) a rename is not
        // held back.
        let d = tempfile::tempdir().unwrap();
        let (from, to) = (d.path().join("a"), d.path().join("b"));
        fs::write(&from, b"x").unwrap();
        rename_if_asked(&from, &to).unwrap();
        assert!(to.exists());
    }
}
