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
//!
//! "Not there" answers: when the prefetcher finds that a segment it probes
//! is in no repository (and has no streamed part), or that a timeline
//! history file recovery asks for at its end is missing, it leaves a
//! marker `<name>.missing` with the time of that probe, and probes again
//! every MISSING_RETRY. archive-get answers "not there" (exit 1) from a
//! marker under MISSING_TRUST old, from the live holder, for the cluster
//! being recovered, when the prefetcher's repository is the only one the
//! call would ask (`--repo`, or one configured), and never on a standby:
//! the probes PostgreSQL makes at the end of the archive then cost no round
//! trip to the store. A segment stored in the moments since the last probe
//! is missed, as it would be by a probe made a moment earlier.

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
use crate::requester;
use crate::spool;
use crate::wal::{self, ClusterIdentity, WalFileKind};

const LOCK: &str = "prefetch.lock";
const LOG: &str = "prefetch.log";
/// The name of the last segment recovery asked for.
const WANT: &str = "want";
/// Appended to the name in WANT when recovery has not asked for it yet.
const AHEAD: &str = "+";
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
/// A "not there" marker older than this is not answered from: the
/// prefetcher renews it every MISSING_RETRY while it runs, so an older
/// one means it is stuck (a store that stopped answering).
const MISSING_TRUST_MS: u64 = 5_000;
/// Suffix of the "not there" markers.
const MISSING: &str = ".missing";
/// The prefetcher's nice value. Replay, the recovery's critical path, runs
/// in one process on one core; the prefetcher decoding 8 segments at once
/// must not take the CPU from it (docs/performance.md).
const PREFETCH_NICE: libc::c_int = 10;
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

/// What the look-ahead answers for a file recovery asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Moved into place from the spool, verified.
    Served,
    /// The running prefetcher found it in no repository moments ago.
    Absent,
    /// Ask the repositories directly.
    Ask,
}

/// Serves segment `name` from the spool into `dest` if the prefetcher has
/// it verified (waiting for it when it is being fetched), and moves the
/// look-ahead window on to it; answers "not there" for a segment or
/// history file the prefetcher just found missing. `Ask`: fetch it
/// directly. Never an error: look-ahead only saves time, and a problem of
/// its own must not stop recovery (it is written to the server's log).
pub fn serve(
    cfg: &Config,
    only: Option<&str>,
    name: &str,
    kind: &WalFileKind,
    dest: &Path,
) -> Answer {
    let segment = matches!(kind, WalFileKind::Segment { partial: false, .. });
    if !segment && !matches!(kind, WalFileKind::History { .. }) {
        return Answer::Ask;
    }
    match try_serve(cfg, only, name, segment, dest) {
        Ok(answer) => answer,
        // Refused because the server that asked is gone: archive-get stops.
        Err(_) if requester::gone() => Answer::Ask,
        Err(e) => {
            eprintln!("walshipper: look-ahead unavailable ({e}); fetching {name} directly");
            Answer::Ask
        }
    }
}

/// Whether a "not there" marker may answer for this call: only when the
/// prefetcher's repository is every repository the call would ask (the
/// prefetcher asks one), and never on a standby (which waits for WAL
/// rather than ending recovery: its answers stay the store's own).
fn markers_answer(cfg: &Config, only: Option<&str>) -> bool {
    (only.is_some() || cfg.repos.len() == 1) && !archive_get::standby_mode()
}

/// The marker saying `name` was not in the repository.
fn marker_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{MISSING}"))
}

const MARKER_FORMAT: &str = "walshipper look-ahead missing 1";

/// Whether the marker of `name` is there, well formed and under
/// MISSING_TRUST_MS old (the boot it was taken in is the live holder's,
/// checked with the identity).
fn marker_fresh(dir: &Path, name: &str) -> bool {
    let Ok(Some(body)) = spool::read_small(&marker_path(dir, name), 256) else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return false;
    };
    let Some(mut f) = spool::KeyLines::open(text, MARKER_FORMAT) else {
        return false;
    };
    let (Some(n), Some(at)) = (f.field("name"), f.field("checked_ms")) else {
        return false;
    };
    let Ok(at) = at.parse::<u64>() else {
        return false;
    };
    let (n, ok) = (n.to_string(), f.end());
    match spool::boottime_ms() {
        Some(now) => ok && n == name && at <= now && now - at <= MISSING_TRUST_MS,
        None => false,
    }
}

/// Written by the prefetcher after a probe that began at `checked_ms`
/// found `name` missing (not synced: a crash ends the holder, and with it
/// every marker's worth).
fn write_marker(dir: &Path, name: &str, checked_ms: u64) {
    let tmp = dir.join(format!(".{name}{MISSING}.tmp"));
    let body = format!("{MARKER_FORMAT}\nname={name}\nchecked_ms={checked_ms}\n");
    if fs::write(&tmp, body)
        .and_then(|_| fs::rename(&tmp, marker_path(dir, name)))
        .is_err()
    {
        let _ = fs::remove_file(&tmp);
    }
}

/// A spool hit opens nothing in the repository (on S3 that is a client
/// set up and a request, more than the hit itself): the files are vouched
/// for by the prefetcher holding the lock (its identity file), and each is
/// checked against the cluster being recovered before it is served.
fn try_serve(
    cfg: &Config,
    only: Option<&str>,
    name: &str,
    segment: bool,
    dest: &Path,
) -> Result<Answer> {
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
    let markers = id.is_some() && markers_answer(cfg, only);
    if !segment && !running {
        start_early(cfg, only, &dir)?;
    }
    if !segment {
        // A history file: only ever answered "not there" (PostgreSQL asks
        // for the next timeline's at the start and end of recovery).
        let absent = markers && marker_fresh(&dir, name);
        tracing::debug!(
            "{} look-ahead {name}: {}",
            spool::stamp(),
            if absent {
                "not there (marker)"
            } else {
                "asked directly"
            }
        );
        return Ok(if absent { Answer::Absent } else { Answer::Ask });
    }
    // At the end of the archive PostgreSQL asks for the last segment
    // again: while the next one is known missing, a copy stays.
    let mut served = match &id {
        Some(id) => {
            let keep = next_segment(name, id.wal_segment_size)
                .is_some_and(|n| marker_path(&dir, &n).exists());
            take(&dir, name, dest, id, keep)?
        }
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
        return if served { Ok(Answer::Served) } else { Err(e) };
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
        if !served && markers && marker_fresh(&dir, name) {
            tracing::debug!(
                "{} look-ahead {name}: not there (marker) after waiting {:.1} ms",
                spool::stamp(),
                t.elapsed().as_secs_f64() * 1000.0
            );
            return Ok(Answer::Absent);
        }
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
    Ok(if served { Answer::Served } else { Answer::Ask })
}

/// The segment after segment file `name` on its timeline.
fn next_segment(name: &str, seg_size: u64) -> Option<String> {
    window(name, 1, seg_size)?.pop()
}

/// The first segment a recovery from a base backup needs, from the
/// `backup_label` in PostgreSQL's working directory (the data directory).
fn backup_start_segment() -> Option<String> {
    let body = spool::read_small(Path::new("backup_label"), 64 << 10).ok()??;
    let text = String::from_utf8(body).ok()?;
    let name = text
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION: "))?
        .split("(file ")
        .nth(1)?
        .strip_suffix(')')?;
    matches!(
        wal::parse_name(name),
        Some(WalFileKind::Segment { partial: false, .. })
    )
    .then(|| name.to_string())
}

/// Recovery from a base backup asks for history files before its first
/// segment (the newest timeline, at the start): the prefetcher is started
/// then, its window on that segment, so that the first segments too are
/// fetched ahead rather than one by one while it starts.
fn start_early(cfg: &Config, only: Option<&str>, dir: &Path) -> Result<()> {
    let (Some(_), Some(first)) = (recovering_cluster(), backup_start_segment()) else {
        return Ok(());
    };
    let tmp = dir.join(format!(".{WANT}.tmp"));
    fs::write(&tmp, format!("{first}{AHEAD}"))
        .and_then(|_| fs::rename(&tmp, dir.join(WANT)))
        .map_err(|e| Error::io(format!("write {}", dir.join(WANT).display()), e))?;
    tracing::debug!(
        "{} look-ahead: starting the prefetcher at {first} (backup_label)",
        spool::stamp()
    );
    start_prefetcher(cfg, only, dir)
}

/// When the prefetcher is fetching `name` right now: waits for it rather
/// than fetching it a second time.
fn wait_in_flight(dir: &Path, name: &str, dest: &Path, id: &ClusterIdentity) -> Result<bool> {
    let end = Instant::now() + IN_FLIGHT_WAIT;
    while spool::being_written(&dir.join(name)) && Instant::now() < end && !requester::gone() {
        std::thread::sleep(Duration::from_millis(5));
    }
    take(dir, name, dest, id, false)
}

/// Moves a verified spool file to `dest` (copies it when `keep`: recovery
/// will ask for it again). A file of the wrong size, or whose first page
/// header is not segment `name` of this cluster (another cluster's,
/// timeline's or segment's file under this name), is removed and not
/// served: the spool is the prefetcher's, but a second look at 40 bytes
/// costs nothing beside serving the wrong WAL.
fn take(dir: &Path, name: &str, dest: &Path, id: &ClusterIdentity, keep: bool) -> Result<bool> {
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
    if !keep {
        match requester::rename_if_asked(&src, dest) {
            Ok(()) => return Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
            Err(e) => {
                return Err(Error::io(
                    format!("move {} to {}", src.display(), dest.display()),
                    e,
                ))
            }
        }
    }
    // Kept, or another file system: copied to a temporary beside dest,
    // then renamed (never a hard link: PostgreSQL may recycle a segment
    // file in place, and the spool's copy must not change with it).
    let copied = spool::create_beside(dest).and_then(|(tmp, mut f)| {
        let r = fs::File::open(&src)
            .and_then(|mut s| std::io::copy(&mut s, &mut f))
            .and_then(|_| requester::rename_if_asked(&tmp, dest));
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r
    });
    if let Err(e) = copied {
        return Err(Error::io(
            format!("copy {} to {}", src.display(), dest.display()),
            e,
        ));
    }
    if !keep {
        let _ = fs::remove_file(&src);
    }
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
    let (tli, n) = segment_number(want, seg_size)?;
    Some(
        (0..=k as u64)
            .map(|i| wal::segment_name(tli, n.saturating_add(i), seg_size))
            .collect(),
    )
}

/// The history files recovery on the timeline of segment `want` asks for
/// at its end (the next timeline's, to find the newest; its own, as the
/// parent of the one it creates): probed so that "not there" costs no round
/// trip then.
fn history_probes(want: &str) -> Vec<String> {
    match wal::parse_name(want) {
        Some(WalFileKind::Segment { tli, .. }) => [Some(tli), tli.checked_add(1)]
            .into_iter()
            .flatten()
            .map(|t| format!("{t:08X}.history"))
            .collect(),
        _ => Vec::new(),
    }
}

/// The segment before `want` on its timeline: recovery asks for the last
/// segment again after the archive ended, so a copy it left is kept.
fn previous_segment(want: &str, seg_size: u64) -> Option<String> {
    let (tli, n) = segment_number(want, seg_size)?;
    Some(wal::segment_name(tli, n.checked_sub(1)?, seg_size))
}

/// The timeline and number of segment file `name` (None for anything else).
fn segment_number(name: &str, seg_size: u64) -> Option<(u32, u64)> {
    match wal::parse_name(name)? {
        WalFileKind::Segment {
            tli,
            log,
            seg,
            partial: false,
        } => Some((tli, wal::seg_no(log, seg, seg_size))),
        _ => None,
    }
}

/// What one fetch came to.
enum Fetched {
    Done,
    /// A history file that is there (only probed).
    Present,
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
    // Before the workers start: threads inherit it. Failing is harmless.
    // SAFETY: setpriority on this thread (who = 0), no pointers.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, PREFETCH_NICE) };
    // "Not there" markers only when this repository is every one a call
    // would ask (archive-get checks the same of its own configuration).
    let markers = only.is_some() || cfg.repos.len() == 1;
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
            let (work_rx, done_tx, repo, identity) = (&work_rx, done_tx.clone(), &repo, &identity);
            s.spawn(move || loop {
                let next = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok(name) = next else { return };
                let outcome = fetch_one(repo, identity, dir, &name, markers);
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
        Ok(Some(d)) => names_identity(&d, identity),
        Ok(None) => false,
        Err(_) => true,
    }
}

fn names_identity(d: &crate::repo::Descriptor, identity: &Identity) -> bool {
    let c = &identity.cluster;
    d.repository_id == identity.repository_id
        && d.identity().is_ok_and(|n| {
            n.system_identifier == c.system_identifier
                && n.pg_major == c.pg_major
                && n.wal_segment_size == c.wal_segment_size
        })
}

/// Whether the repository is there now and is the spool's: read before a
/// "not there" marker is written. A file missing from a repository that
/// is itself missing (a file system unmounted, a directory moved, a
/// bucket deleted) or unreadable says nothing about the file, as
/// archive_get says of a repository it cannot open; a marker then would
/// end recovery early at the next segment.
fn repository_confirmed(repo: &Repository, identity: &Identity) -> bool {
    matches!(spool::descriptor_now(repo), Ok(Some(d)) if names_identity(&d, identity))
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
        // `N+`: recovery has not asked for N yet (see `start_early`), so
        // N itself is fetched too.
        let (want, ahead) = match want.strip_suffix(AHEAD) {
            Some(w) => (w.to_string(), true),
            None => (want, false),
        };
        if want != last_want {
            last_want = want.clone();
            last_change = Instant::now();
        }
        if let Some(names) = window(&want, k, seg_size) {
            let probes = history_probes(&want);
            let mut keep = names.clone();
            keep.extend(previous_segment(&want, seg_size));
            keep.extend(probes.iter().cloned());
            remove_outside(dir, &keep, &in_flight);
            let now = Instant::now();
            hold_off.retain(|_, until| *until > now);
            // Nearest first; the requested one itself is the foreground's,
            // unless it was missing (its marker is kept fresh: recovery
            // asks for the segment after the last twice); the history
            // probes last.
            let again = names
                .first()
                .filter(|w| marker_path(dir, w).exists() && !dir.join(w).exists());
            let first = names.iter().take(usize::from(ahead));
            for name in again
                .into_iter()
                .chain(first)
                .chain(names.iter().skip(1))
                .chain(probes.iter())
            {
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
                        Fetched::Present => "there (probed)",
                        Fetched::Missing => "not in the repository",
                        Fetched::Failed => "failed",
                    }
                );
                in_flight.remove(&name);
                let pause = match outcome {
                    Fetched::Done => None,
                    // The end of the archive so far (or a history file,
                    // there or not): probed again later.
                    Fetched::Missing | Fetched::Present => Some(MISSING_RETRY),
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

/// Fetches segment `name` into the spool, or probes history file `name`;
/// with `markers`, leaves or removes its "not there" marker (left only
/// when the repository itself is confirmed there after the probe).
fn fetch_one(
    repo: &Repository,
    identity: &Identity,
    dir: &Path,
    name: &str,
    markers: bool,
) -> Fetched {
    let Some(kind) = wal::parse_name(name) else {
        return Fetched::Failed;
    };
    let key = crate::layout::wal(name, &kind);
    // The probe's start: a marker says "missing as of then".
    let began = spool::boottime_ms();
    let missing = |also_streamed: bool| {
        // A segment with a streamed part is not "not there": archive-get
        // restores that part (archive_get::streamed_tail).
        let streamed =
            also_streamed && !matches!(crate::stream::has_streamed_part(repo, name), Ok(false));
        let confirmed = markers && !streamed && repository_confirmed(repo, identity);
        match (confirmed, began) {
            (true, Some(at)) => write_marker(dir, name, at),
            _ => {
                let _ = fs::remove_file(marker_path(dir, name));
            }
        }
        Fetched::Missing
    };
    let not_missing = |outcome: Fetched| {
        let _ = fs::remove_file(marker_path(dir, name));
        outcome
    };
    if matches!(kind, WalFileKind::History { .. }) {
        return match repo.storage.head(&key) {
            Ok(None) => missing(false),
            Ok(Some(_)) => not_missing(Fetched::Present),
            Err(e) => {
                spool::log_line(&format!("{name}: not probed: {e}"));
                not_missing(Fetched::Failed)
            }
        };
    }
    // One decoding thread per segment: the parallelism is across segments.
    match archive_get::fetch(repo, name, &kind, &key, &dir.join(name), 1) {
        Ok(()) => not_missing(Fetched::Done),
        Err(Error::NotFound(_)) => missing(markers),
        Err(e) => {
            spool::log_line(&format!("{name}: not prefetched: {e}"));
            not_missing(Fetched::Failed)
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
        // A file or the "not there" marker of a file outside the window.
        let file = n.strip_suffix(MISSING).unwrap_or(&n);
        if wal::parse_name(file).is_some()
            && !keep.iter().any(|k| k == file)
            && !in_flight.contains(file)
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Removes the identity file (first: without it nothing is served), then
/// every segment, marker and temporary from the spool.
fn clear(dir: &Path) {
    let _ = fs::remove_file(dir.join(IDENTITY));
    spool::remove_temporaries(dir);
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        let file = n.strip_suffix(MISSING).unwrap_or(&n);
        if wal::parse_name(file).is_some() || n.contains(".walshipper.tmp") {
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
    fn only_a_fresh_well_formed_marker_of_that_file_answers() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let seg = "000000010000000000000007";
        let now = spool::boottime_ms().expect("CLOCK_BOOTTIME");
        write_marker(dir, seg, now);
        assert!(marker_fresh(dir, seg));
        assert!(!marker_fresh(dir, "000000010000000000000008"), "no marker");
        let put = |body: String| fs::write(marker_path(dir, seg), body).unwrap();
        let text = |name: &str, at: u64| format!("{MARKER_FORMAT}\nname={name}\nchecked_ms={at}\n");
        put(text(seg, now - MISSING_TRUST_MS - 1000));
        assert!(!marker_fresh(dir, seg), "an old marker answered");
        put(text(seg, now + 60_000));
        assert!(!marker_fresh(dir, seg), "a marker from the future answered");
        put(text("000000010000000000000008", now));
        assert!(!marker_fresh(dir, seg), "another file's marker answered");
        put(format!("{}x=1\n", text(seg, now)));
        assert!(!marker_fresh(dir, seg), "an extended marker answered");
        let t = text(seg, now);
        put(t[..t.len() - 2].to_string());
        assert!(!marker_fresh(dir, seg), "a torn marker answered");
        put(text(seg, now));
        assert!(marker_fresh(dir, seg));
    }

    #[test]
    fn the_window_keeps_the_previous_segment_and_probes_history_files() {
        let seg = 16 << 20;
        assert_eq!(
            previous_segment("000000020000000200000000", seg).as_deref(),
            Some("0000000200000001000000FF")
        );
        assert_eq!(previous_segment("000000010000000000000000", seg), None);
        assert_eq!(
            next_segment("0000000200000001000000FF", seg).as_deref(),
            Some("000000020000000200000000")
        );
        assert_eq!(
            history_probes("000000010000000000000003"),
            ["00000001.history", "00000002.history"]
        );
        assert!(history_probes("00000001.history").is_empty());

        // remove_outside: files and markers in the window stay, others go.
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let want = "000000010000000000000005";
        let mut keep = window(want, 2, seg).unwrap();
        keep.extend(previous_segment(want, seg));
        keep.extend(history_probes(want));
        for n in [
            "000000010000000000000004",
            "000000010000000000000006",
            "000000010000000000000003",
            "000000010000000000000009",
            "000000010000000000000007.missing",
            "00000002.history.missing",
            "00000003.history.missing",
            "000000010000000000000002.missing",
        ] {
            fs::write(dir.join(n), b"x").unwrap();
        }
        remove_outside(dir, &keep, &HashSet::new());
        let mut left: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "000000010000000000000004",
                "000000010000000000000006",
                "000000010000000000000007.missing",
                "00000002.history.missing"
            ]
        );
        clear(dir);
        assert_eq!(fs::read_dir(dir).unwrap().count(), 0);
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

    /// A segment missing from a repository that is itself missing (moved,
    /// unmounted) or replaced leaves no marker: the next ask would take it
    /// for the end of the archive and end recovery there.
    #[test]
    fn a_missing_repository_leaves_no_not_there_marker() {
        let dir = tempfile::tempdir().unwrap();
        let (_cfg, repo) = crate::repo::test_support::posix_repo(dir.path(), 7);
        let identity = Identity::of(&repo).unwrap();
        let spool = dir.path().join("spool");
        fs::create_dir(&spool).unwrap();
        let seg = "000000010000000000000005";
        let history = "00000002.history";
        // The repository there: both probes leave their markers.
        for name in [seg, history] {
            assert!(matches!(
                fetch_one(&repo, &identity, &spool, name, true),
                Fetched::Missing
            ));
            assert!(marker_fresh(&spool, name), "{name}");
        }
        // Moved away: missing still, and the old markers are removed.
        fs::rename(dir.path().join("r"), dir.path().join("r-moved")).unwrap();
        for name in [seg, history] {
            assert!(matches!(
                fetch_one(&repo, &identity, &spool, name, true),
                Fetched::Missing
            ));
            assert!(!marker_path(&spool, name).exists(), "{name}");
        }
        // Another repository in its place: no marker either.
        crate::repo::test_support::posix_repo(dir.path(), 7);
        assert!(matches!(
            fetch_one(&repo, &identity, &spool, seg, true),
            Fetched::Missing
        ));
        assert!(!marker_path(&spool, seg).exists());
        // Back: markers again.
        fs::remove_dir_all(dir.path().join("r")).unwrap();
        fs::rename(dir.path().join("r-moved"), dir.path().join("r")).unwrap();
        fetch_one(&repo, &identity, &spool, seg, true);
        assert!(marker_fresh(&spool, seg));
    }
}
