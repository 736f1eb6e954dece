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
use crate::config::{Config, RepoConfig};
use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::spool;
use crate::wal::{self, ClusterIdentity, WalFileKind};

const LOCK: &str = "prefetch.lock";
const LOG: &str = "prefetch.log";
/// The name of the last segment recovery asked for.
const WANT: &str = "want";
/// What the files in the spool are (see [`Identity`]).
const IDENTITY: &str = "identity";
/// How often the prefetcher reads the repository's descriptor again: a
/// repository re-created at the same place meanwhile ends it.
const RECHECK: Duration = Duration::from_secs(2);
/// The prefetcher exits after this long without a new request.
const IDLE_EXIT: Duration = Duration::from_secs(20);
/// How often it looks for a new request.
const SCAN: Duration = Duration::from_millis(20);
/// A segment the repository did not have is asked for again after this.
const MISSING_RETRY: Duration = Duration::from_secs(2);
/// Longest the foreground waits for a segment being prefetched.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(60);
/// Segments fetched at once, at most (and at most `lookahead`): with a
/// store 50 ms away, 4 at once no longer kept ahead of replay (S3 + 50 ms,
/// 8 ahead: redo 18.3 s with 4, 14.5 s with 8; docs/performance.md).
const MAX_JOBS: usize = 8;

/// The spool of configured repository `rc`: named after its configuration
/// (name, type, endpoint, location), so that a spool hit needs no request
/// to the store; what the files in it are is in its IDENTITY file.
fn spool_dir(cfg: &Config, rc: &RepoConfig) -> Result<PathBuf> {
    let repo = format!("{}|{}|{}|{}", rc.name, rc.kind, rc.endpoint, rc.location());
    let parts: [&[u8]; 2] = [b"archive-get v2", repo.as_bytes()];
    let sub = Path::new("archive-get").join(spool::fingerprint(&parts));
    spool::prepare(&cfg.restore.spool_dir, "restore.spool_dir", &sub)
}

/// What the running prefetcher's files are: WAL of this repository and
/// cluster, written by it under the spool's lock after it emptied the
/// spool (so one left by an earlier run is gone before a new one holds the
/// lock). `holder` is the pid of the prefetcher that wrote it: the file
/// vouches for nothing unless that process holds the lock now.
#[derive(Debug)]
struct Identity {
    repository_id: String,
    cluster: ClusterIdentity,
    holder: u32,
    /// The boot it was written in (spool::boot_id): pids are reused after
    /// a reboot, so a file left by a run killed before one is never taken
    /// for a live holder's. Empty when the boot id could not be read (then
    /// it is never taken).
    boot: String,
}

const IDENTITY_FORMAT: &str = "walshipper look-ahead identity 3";

impl Identity {
    fn of(repo: &Repository) -> Result<Identity> {
        Ok(Identity {
            repository_id: repo.descriptor.repository_id.clone(),
            cluster: repo.descriptor.identity()?,
            holder: std::process::id(),
            boot: spool::boot_id().unwrap_or_default(),
        })
    }

    fn render(&self) -> String {
        format!(
            "{IDENTITY_FORMAT}\nrepository_id={}\nsystem_identifier={}\npg_major={}\nwal_segment_size={}\nholder={}\nboot={}\n",
            self.repository_id,
            self.cluster.system_identifier,
            self.cluster.pg_major,
            self.cluster.wal_segment_size,
            self.holder,
            self.boot
        )
    }

    /// None for anything but a whole, well-formed file.
    fn parse(text: &str) -> Option<Identity> {
        let mut f = spool::KeyLines::open(text, IDENTITY_FORMAT)?;
        let repository_id = f.field("repository_id")?.to_string();
        let system_identifier = f.field("system_identifier")?.parse().ok()?;
        let pg_major = f.field("pg_major")?.parse().ok()?;
        let wal_segment_size: u64 = f.field("wal_segment_size")?.parse().ok()?;
        let holder = f.field("holder")?.parse().ok()?;
        let boot = f.field("boot")?.to_string();
        if !f.end()
            || !wal_segment_size.is_power_of_two()
            || !((1 << 20)..=(1 << 30)).contains(&wal_segment_size)
        {
            return None;
        }
        Some(Identity {
            repository_id,
            cluster: ClusterIdentity {
                system_identifier,
                pg_major,
                wal_segment_size,
            },
            holder,
            boot,
        })
    }
}

/// The identity of the spool's files if the prefetcher that wrote it holds
/// the lock now. None when no prefetcher runs, or the identity file was
/// written by another run (one that died, its files perhaps torn by a
/// crash that lost their unsynced bytes): those files are never served.
fn live_identity(dir: &Path) -> Result<Option<Identity>> {
    let text = spool::read_if_holder(&dir.join(LOCK), &dir.join(IDENTITY), 4096)?;
    let boot = spool::boot_id();
    Ok(text
        .as_deref()
        .and_then(Identity::parse)
        .filter(|i| boot.as_deref() == Some(i.boot.as_str())))
}

/// The system identifier and major version of the cluster being recovered:
/// PostgreSQL runs restore_command in its data directory. None elsewhere
/// (archive-get run by hand), and then nothing is served from the spool.
fn recovering_cluster() -> Option<(u64, u32)> {
    let mut control = [0u8; 8];
    fs::File::open("global/pg_control")
        .and_then(|mut f| f.read_exact(&mut control))
        .ok()?;
    let major = fs::read_to_string("PG_VERSION").ok()?.trim().parse().ok()?;
    Some((u64::from_le_bytes(control), major))
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

/// A spool hit opens nothing in the repository (on S3 that is a client
/// set up and a request, more than the hit itself): the files are vouched
/// for by the prefetcher holding the lock (its identity file), and each is
/// checked against the cluster being recovered before it is served.
fn try_serve(cfg: &Config, only: Option<&str>, name: &str, dest: &Path) -> Result<bool> {
    let rc = cfg.find_repo(only)?;
    let dir = spool_dir(cfg, rc)?;
    let running = spool::is_locked(&dir.join(LOCK))?;
    // Files of another cluster's recovery (or of a repository holding
    // another cluster), or of a prefetcher not running now, are never
    // served to this one.
    let id = match (
        if running { live_identity(&dir)? } else { None },
        recovering_cluster(),
    ) {
        (Some(i), Some((sysid, major)))
            if i.cluster.system_identifier == sysid && i.cluster.pg_major == major =>
        {
            Some(i.cluster)
        }
        _ => None,
    };
    let mut served = match &id {
        Some(id) => take(&dir, name, dest, id)?,
        None => false,
    };
    // The window moves to N whether or not N was there, and before the
    // room is checked: on a full spool it is moving the window that lets
    // the prefetcher remove the segments recovery is done with.
    let tmp = dir.join(format!(".{WANT}.tmp"));
    let moved = fs::write(&tmp, name)
        .and_then(|_| fs::rename(&tmp, dir.join(WANT)))
        .map_err(|e| Error::io(format!("write {}", dir.join(WANT).display()), e));
    // A full spool disk: said in the server log with what to do (and the
    // segment fetched directly unless it was served) before a segment
    // write fails on it. The room check's error first: on a disk with no
    // room at all the window's own write fails too, and only the former
    // names restore.spool_dir.
    let room = spool::check_room(&dir, "restore.spool_dir");
    if let Err(e) = room.and(moved) {
        if served {
            eprintln!("walshipper: look-ahead unavailable ({e}); {name} was served from the spool");
        }
        return if served { Ok(true) } else { Err(e) };
    }
    if !running {
        start_prefetcher(cfg, only, &dir)?;
        tracing::debug!(
            "{} look-ahead {name}: no prefetcher, starting one",
            spool::stamp()
        );
    } else if let (false, Some(id)) = (served, &id) {
        let t = Instant::now();
        served = wait_in_flight(&dir, name, dest, id)?;
        tracing::debug!(
            "{} look-ahead {name}: {} after waiting {:.1} ms",
            spool::stamp(),
            if served { "served" } else { "not in the spool" },
            t.elapsed().as_secs_f64() * 1000.0
        );
    } else {
        tracing::debug!(
            "{} look-ahead {name}: {}",
            spool::stamp(),
            if served {
                "hit"
            } else {
                "not served (no live identity of this cluster)"
            }
        );
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
    let expected = spool_dir(cfg, rc)?;
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
    // as soon as a process holds the lock and the identity file is there,
    // so one left by a dead run must be gone by then. Not while another
    // prefetcher holds the lock (its files are good); a second clear under
    // the lock removes what one that died in between left.
    if !spool::is_locked(&dir.join(LOCK))? {
        clear(dir);
    }
    let Some(_lock) = spool::try_lock(&dir.join(LOCK))? else {
        return Ok(());
    };
    clear(dir);
    let identity = Identity::of(&repo)?;
    write_identity(dir, &identity)?;
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
        let result = prefetch_loop(&repo, &identity, dir, k, jobs, seg_size, &work_tx, &done_rx);
        drop(work_tx);
        result
    })
}

fn write_identity(dir: &Path, identity: &Identity) -> Result<()> {
    spool::write_durable(dir, IDENTITY, identity.render().as_bytes())
        .map_err(|e| Error::io(format!("write {}", dir.join(IDENTITY).display()), e))
}

/// Whether the repository's descriptor still names the repository and
/// cluster the spool's files came from. A descriptor that cannot be read
/// now (the store briefly unreachable) is not a change.
fn same_repository(repo: &Repository, identity: &Identity) -> bool {
    match spool::descriptor_now(repo) {
        Ok(Some(d)) => {
            let c = &identity.cluster;
            d.repository_id == identity.repository_id
                && d.identity().is_ok_and(|n| {
                    n.system_identifier == c.system_identifier
                        && n.pg_major == c.pg_major
                        && n.wal_segment_size == c.wal_segment_size
                })
        }
        Ok(None) => false,
        Err(_) => true,
    }
}

#[allow(clippy::too_many_arguments)]
fn prefetch_loop(
    repo: &Repository,
    identity: &Identity,
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
    let mut last_check = Instant::now();
    loop {
        if last_check.elapsed() >= RECHECK {
            last_check = Instant::now();
            if !same_repository(repo, identity) {
                spool::log_line(
                    "the repository's descriptor changed (re-created or replaced): spool emptied, exiting",
                );
                clear(dir);
                return Ok(());
            }
        }
        // A prefetcher starting beside this one (before it saw our lock)
        // may have removed the identity file: written again.
        if !dir.join(IDENTITY).exists() {
            write_identity(dir, identity)?;
        }
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
                tracing::debug!("{} prefetch {name}: started (want {want})", spool::stamp());
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
                tracing::debug!(
                    "{} prefetch {name}: {}",
                    spool::stamp(),
                    match outcome {
                        Fetched::Done => "done",
                        Fetched::Missing => "not in the repository",
                        Fetched::Failed => "failed",
                    }
                );
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

/// Removes the identity file (first: without it nothing is served), then
/// every segment and temporary from the spool.
fn clear(dir: &Path) {
    let _ = fs::remove_file(dir.join(IDENTITY));
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
    }

    /// F4: an identity file vouches for the spool only while the run that
    /// wrote it holds the lock; one left by a dead run (whose files a crash
    /// may have torn) is not taken for the live holder's (spool's tests
    /// check that a probe of the lock is not taken for a holder).
    #[test]
    fn only_the_live_lock_holders_identity_is_served() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let id = |holder| Identity {
            repository_id: "cd".repeat(16),
            cluster: ClusterIdentity {
                system_identifier: 1,
                pg_major: 15,
                wal_segment_size: 1 << 24,
            },
            holder,
            boot: spool::boot_id().expect("a boot id"),
        };
        let me = std::process::id();
        // A dead run's identity and no holder: nothing.
        fs::write(dir.join(IDENTITY), id(me).render()).unwrap();
        assert!(live_identity(dir).unwrap().is_none());
        let lock = spool::try_lock(&dir.join(LOCK)).unwrap().expect("free");
        // The live holder is us, the identity another run's: nothing.
        fs::write(dir.join(IDENTITY), id(me.wrapping_add(1)).render()).unwrap();
        assert!(
            live_identity(dir).unwrap().is_none(),
            "a dead run's identity served"
        );
        // Ours: vouched for.
        fs::write(dir.join(IDENTITY), id(me).render()).unwrap();
        assert_eq!(live_identity(dir).unwrap().map(|i| i.holder), Some(me));
        // Ours by pid, but written before a reboot (pids are reused): nothing.
        let before_reboot = Identity {
            boot: "00000000-0000-0000-0000-000000000000".into(),
            ..id(me)
        };
        fs::write(dir.join(IDENTITY), before_reboot.render()).unwrap();
        assert!(
            live_identity(dir).unwrap().is_none(),
            "another boot's identity served"
        );
        drop(lock);
        assert!(live_identity(dir).unwrap().is_none());
    }

    #[test]
    fn identity_round_trips_and_refuses_anything_else() {
        let id = Identity {
            repository_id: "ab".repeat(16),
            cluster: ClusterIdentity {
                system_identifier: 7_712_576_578_082_578_765,
                pg_major: 15,
                wal_segment_size: 1 << 20,
            },
            holder: 4242,
            boot: "12345678-1234-1234-1234-123456789abc".into(),
        };
        let text = id.render();
        let back = Identity::parse(&text).expect("parses");
        assert_eq!(back.repository_id, id.repository_id);
        assert_eq!(back.cluster.system_identifier, id.cluster.system_identifier);
        assert_eq!(back.cluster.wal_segment_size, 1 << 20);
        // Half written, extended, or with a segment size nothing divides by.
        assert!(Identity::parse(&text[..text.len() - 3]).is_none());
        assert!(Identity::parse(&format!("{text}x=1\n")).is_none());
        assert!(Identity::parse(&text.replace("=1048576", "=0")).is_none());
        assert!(Identity::parse(&text.replace("identity 3", "identity 4")).is_none());
        assert!(Identity::parse(&text.replace("\nholder=", "\nholders=")).is_none());
        assert!(window("000000020000000100000001.partial", 2, 16 << 20).is_none());
    }
}
