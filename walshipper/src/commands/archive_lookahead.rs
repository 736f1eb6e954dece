//! archive-get look-ahead (`[restore] lookahead = k`, k > 0).
//!
//! Recovery asks for one segment per restore_command call and waits for
//! each. With look-ahead, the call for segment N also tells a background
//! prefetcher (this binary, `archive-get-prefetch`, detached) that N was
//! asked for; it fetches N+1..N+k of the same timeline in parallel into the
//! spool, each decoded entirely, every frame and the final SHA-256 checked
//! and `wal::ContentCheck` passed, written to a temporary and renamed to its
//! name only then (archive_get::fetch, the code of the direct fetch). The
//! call for N+1 then only moves a file.
//!
//! The spool, `<restore.spool_dir>/archive-get/<fingerprint>/`: the
//! fingerprint covers the repository's name, id, cluster system identifier
//! and segment size, so another repository or cluster never reads these
//! files, and segment names carry the timeline. A spool file is served only
//! while the prefetcher that wrote it still runs (it holds
//! `prefetch.lock`), and a prefetcher empties the spool before it takes
//! that lock (and again after): a file left by an earlier run, perhaps
//! before a crash that lost its unsynced bytes, is never served. Before a
//! file is served its size and first page header (timeline, page address,
//! system identifier) are checked once more against the name asked for and
//! the repository's cluster. Anything missing, damaged or not there yet is
//! fetched directly as without look-ahead, which reports damage with the
//! usual exit status 126.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::commands::archive_get;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::spool;
use crate::wal::{self, ClusterIdentity, WalFileKind};

const LOCK: &str = "prefetch.lock";
const LOG: &str = "prefetch.log";
/// The name of the last segment recovery asked for.
const WANT: &str = "want";
/// The prefetcher exits after this long without a new request.
const IDLE_EXIT: Duration = Duration::from_secs(20);
/// How often it looks for a new request.
const SCAN: Duration = Duration::from_millis(20);
/// A segment the repository did not have is asked for again after this.
const MISSING_RETRY: Duration = Duration::from_secs(2);
/// Longest the foreground waits for a segment being prefetched.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(60);
/// Segments fetched at once.
const MAX_JOBS: usize = 4;

/// The spool of repository `repo`.
fn spool_dir(cfg: &Config, repo: &Repository) -> Result<PathBuf> {
    let d = &repo.descriptor;
    let parts: [&[u8]; 5] = [
        b"archive-get v1",
        repo.name.as_bytes(),
        d.repository_id.as_bytes(),
        d.system_identifier.as_bytes(),
        &d.wal_segment_size.to_le_bytes(),
    ];
    let sub = Path::new("archive-get").join(spool::fingerprint(&parts));
    spool::prepare(&cfg.restore.spool_dir, "restore.spool_dir", &sub)
}

/// Serves segment `name` from the spool into `dest` if the prefetcher has
/// it verified (waiting for it when it is being fetched), and moves the
/// look-ahead window on to it. False: fetch it directly. Never an error:
/// look-ahead only saves time, and a problem of its own must not stop
/// recovery (it is written to the server's log).
pub fn serve(
    cfg: &Config,
    only: Option<&str>,
    name: &str,
    kind: &WalFileKind,
    dest: &Path,
) -> bool {
    if !matches!(kind, WalFileKind::Segment { partial: false, .. }) {
        return false;
    }
    match try_serve(cfg, only, name, dest) {
        Ok(served) => served,
        Err(e) => {
            eprintln!("walshipper: look-ahead unavailable ({e}); fetching {name} directly");
            false
        }
    }
}

fn try_serve(cfg: &Config, only: Option<&str>, name: &str, dest: &Path) -> Result<bool> {
    let rc = cfg.find_repo(only)?;
    let repo = Repository::open_repo(cfg, rc)?;
    let dir = spool_dir(cfg, &repo)?;
    let lock = dir.join(LOCK);
    let running = spool::is_locked(&lock)?;
    let id = repo.descriptor.identity()?;
    let mut served = running && take(&dir, name, dest, &id)?;
    // The window moves to N whether or not N was there.
    let tmp = dir.join(format!(".{WANT}.tmp"));
    fs::write(&tmp, name)
        .and_then(|_| fs::rename(&tmp, dir.join(WANT)))
        .map_err(|e| Error::io(format!("write {}", dir.join(WANT).display()), e))?;
    if !running {
        spool::check_room(&dir, "restore.spool_dir")?;
        start_prefetcher(cfg, only, &dir)?;
    } else if !served {
        served = wait_in_flight(&dir, name, dest, &id)?;
    }
    Ok(served)
}

/// The temporary archive_get::fetch writes `name` to in the spool.
fn in_flight_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.walshipper.tmp"))
}

/// When the prefetcher is fetching `name` right now: waits for it rather
/// than fetching it a second time.
fn wait_in_flight(dir: &Path, name: &str, dest: &Path, id: &ClusterIdentity) -> Result<bool> {
    let end = Instant::now() + IN_FLIGHT_WAIT;
    while in_flight_path(dir, name).exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    take(dir, name, dest, id)
}

/// Moves a verified spool file to `dest`. A file of the wrong size, or
/// whose first page header is not segment `name` of this cluster (another
/// cluster's, timeline's or segment's file under this name), is removed and
/// not served: the spool is the prefetcher's, but a second look at 40 bytes
/// costs nothing beside serving the wrong WAL.
fn take(dir: &Path, name: &str, dest: &Path, id: &ClusterIdentity) -> Result<bool> {
    let src = dir.join(name);
    if let Err(why) = first_page_fits(&src, name, id) {
        if let Some(why) = why {
            eprintln!(
                "walshipper: look-ahead spool file {} {why}: removed, fetching directly",
                src.display()
            );
        }
        let _ = fs::remove_file(&src);
        return Ok(false);
    }
    match fs::rename(&src, dest) {
        Ok(()) => return Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
        Err(e) => {
            return Err(Error::io(
                format!("move {} to {}", src.display(), dest.display()),
                e,
            ))
        }
    }
    // Another file system: copied to a temporary beside dest, then renamed.
    let dest_name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("bad destination {}", dest.display())))?;
    let tmp = dest.with_file_name(format!(".{dest_name}.walshipper.tmp"));
    let copied = fs::copy(&src, &tmp).and_then(|_| fs::rename(&tmp, dest));
    if let Err(e) = copied {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(
            format!("copy {} to {}", src.display(), dest.display()),
            e,
        ));
    }
    let _ = fs::remove_file(&src);
    Ok(true)
}

/// Whether spool file `path` has this cluster's segment size and the long
/// page header of segment `name`. Err(None): not there (or not a plain
/// file); Err(Some(why)): there but not this segment.
fn first_page_fits(
    path: &Path,
    name: &str,
    id: &ClusterIdentity,
) -> std::result::Result<(), Option<String>> {
    let Some(WalFileKind::Segment { tli, log, seg, .. }) = wal::parse_name(name) else {
        return Err(None);
    };
    let mut f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(_) => return Err(None),
    };
    let meta = f.metadata().map_err(|_| None)?;
    if !meta.file_type().is_file() {
        return Err(Some("is not a plain file".into()));
    }
    if meta.len() != id.wal_segment_size {
        return Err(Some(format!(
            "has {} bytes, not {}",
            meta.len(),
            id.wal_segment_size
        )));
    }
    let mut head = [0u8; wal::LONG_HEADER_LEN];
    f.read_exact(&mut head)
        .map_err(|e| Some(format!("cannot be read ({e})")))?;
    let segno = wal::seg_no(log, seg, id.wal_segment_size);
    wal::check_long_header(&head, tli, segno, id)
        .map_err(|why| Some(format!("is not {name} of this cluster ({why})")))
}

fn start_prefetcher(cfg: &Config, only: Option<&str>, dir: &Path) -> Result<()> {
    let mut args: Vec<OsString> = Vec::new();
    if let Some(c) = &cfg.source {
        args.push("--config".into());
        args.push(c.into());
    }
    if let Some(r) = only {
        args.push("--repo".into());
        args.push(r.into());
    }
    args.push("archive-get-prefetch".into());
    args.push("--spool".into());
    args.push(dir.into());
    spool::spawn_detached(&args, &dir.join(LOG))
}

// ---------------------------------------------------------------------------
// The prefetcher

/// The segments to hold after recovery asked for `want`: want itself (it
/// may still be taken) and the next `k` on its timeline.
fn window(want: &str, k: usize, seg_size: u64) -> Option<Vec<String>> {
    let Some(WalFileKind::Segment {
        tli,
        log,
        seg,
        partial: false,
    }) = wal::parse_name(want)
    else {
        return None;
    };
    let n = wal::seg_no(log, seg, seg_size);
    Some(
        (0..=k as u64)
            .map(|i| wal::segment_name(tli, n.saturating_add(i), seg_size))
            .collect(),
    )
}

/// What one fetch came to.
enum Fetched {
    Done,
    Missing,
    Failed,
}

/// `archive-get-prefetch --spool DIR`: fills the spool for the archive-get
/// calls of one recovery. Exits at once when another prefetcher holds the
/// spool's lock, and after IDLE_EXIT without a new request.
pub fn run_prefetcher(cfg: &Config, only: Option<&str>, dir: &Path) -> Result<()> {
    let rc = cfg.find_repo(only)?;
    let repo = Repository::open_repo(cfg, rc)?;
    let expected = spool_dir(cfg, &repo)?;
    if expected != dir {
        return Err(Error::Invalid(format!(
            "{} is not the look-ahead spool of repository {} ({})",
            dir.display(),
            repo.name,
            expected.display()
        )));
    }
    // Whatever an earlier run left is not served (see the module comment).
    // Cleared before the lock is taken: the foreground serves from the spool
    // as soon as a process holds the lock, so a file still there at that
    // moment would be served; a second clear under the lock removes what a
    // prefetcher that died in between left.
    clear(dir);
    let Some(_lock) = spool::try_lock(&dir.join(LOCK))? else {
        return Ok(());
    };
    clear(dir);
    let k = cfg.restore.lookahead.max(1);
    let jobs = k.min(MAX_JOBS);
    let seg_size = repo.descriptor.wal_segment_size;
    spool::log_line(&format!(
        "prefetcher started: {k} segments ahead, {jobs} at once, from repository {}",
        repo.name
    ));
    let (work_tx, work_rx) = mpsc::channel::<String>();
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<(String, Fetched)>();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            let (work_rx, done_tx, repo) = (&work_rx, done_tx.clone(), &repo);
            s.spawn(move || loop {
                let next = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok(name) = next else { return };
                let outcome = fetch_one(repo, dir, &name);
                if done_tx.send((name, outcome)).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        let result = prefetch_loop(dir, k, jobs, seg_size, &work_tx, &done_rx);
        drop(work_tx);
        result
    })
}

fn prefetch_loop(
    dir: &Path,
    k: usize,
    jobs: usize,
    seg_size: u64,
    work: &mpsc::Sender<String>,
    done: &mpsc::Receiver<(String, Fetched)>,
) -> Result<()> {
    let mut in_flight: HashSet<String> = HashSet::new();
    // Segments not to ask for again before the instant given.
    let mut hold_off: HashMap<String, Instant> = HashMap::new();
    let mut last_want = String::new();
    let mut last_change = Instant::now();
    loop {
        let want = fs::read_to_string(dir.join(WANT)).unwrap_or_default();
        let want = want.trim().to_string();
        if want != last_want {
            last_want = want.clone();
            last_change = Instant::now();
        }
        if let Some(names) = window(&want, k, seg_size) {
            remove_outside(dir, &names, &in_flight);
            let now = Instant::now();
            hold_off.retain(|_, until| *until > now);
            // Nearest first; the requested one itself is the foreground's.
            for name in names.iter().skip(1) {
                if in_flight.len() >= jobs {
                    break;
                }
                if in_flight.contains(name)
                    || hold_off.contains_key(name)
                    || dir.join(name).exists()
                {
                    continue;
                }
                if work.send(name.clone()).is_err() {
                    return Err(Error::Repository("the prefetcher's workers stopped".into()));
                }
                in_flight.insert(name.clone());
            }
        }
        if in_flight.is_empty() && last_change.elapsed() >= IDLE_EXIT {
            spool::log_line("prefetcher idle: exiting");
            clear(dir);
            return Ok(());
        }
        match done.recv_timeout(SCAN) {
            Ok((name, outcome)) => {
                in_flight.remove(&name);
                let pause = match outcome {
                    Fetched::Done => None,
                    // The end of the archive so far: probed again later.
                    Fetched::Missing => Some(MISSING_RETRY),
                    // Damage is not retried in this window: the foreground
                    // fetches directly and reports it.
                    Fetched::Failed => Some(IDLE_EXIT),
                };
                if let Some(p) = pause {
                    hold_off.insert(name, Instant::now() + p);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::Repository("the prefetcher's workers stopped".into()))
            }
        }
    }
}

fn fetch_one(repo: &Repository, dir: &Path, name: &str) -> Fetched {
    let Some(kind) = wal::parse_name(name) else {
        return Fetched::Failed;
    };
    let key = crate::layout::wal(name, &kind);
    // One decoding thread per segment: the parallelism is across segments.
    match archive_get::fetch(repo, name, &kind, &key, &dir.join(name), 1) {
        Ok(()) => Fetched::Done,
        Err(Error::NotFound(_)) => Fetched::Missing,
        Err(e) => {
            spool::log_line(&format!("{name}: not prefetched: {e}"));
            Fetched::Failed
        }
    }
}

/// Removes segment files outside `keep` (never a temporary being written).
fn remove_outside(dir: &Path, keep: &[String], in_flight: &HashSet<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(n) = e.file_name().into_string() else {
            continue;
        };
        if wal::parse_name(&n).is_some() && !keep.contains(&n) && !in_flight.contains(&n) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Removes every segment and temporary from the spool.
fn clear(dir: &Path) {
    spool::remove_temporaries(dir);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if wal::parse_name(&n).is_some() || n.ends_with(".walshipper.tmp") {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_follows_the_timeline_and_crosses_log_boundaries() {
        let w = window("0000000200000001000000FF", 2, 16 << 20).unwrap();
        assert_eq!(
            w,
            [
                "0000000200000001000000FF",
                "000000020000000200000000",
                "000000020000000200000001"
            ]
        );
        assert!(window("00000002.history", 2, 16 << 20).is_none());
        assert!(window("000000020000000100000001.partial", 2, 16 << 20).is_none());
    }
}
