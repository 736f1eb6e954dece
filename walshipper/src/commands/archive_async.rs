//! Asynchronous archive-push (`[archive] async = true`).
//!
//! PostgreSQL's archiver calls archive_command for one file at a time and
//! waits; a push that takes longer than the server fills a segment makes it
//! fall behind. Here a background pusher (this binary, `archive-push-async`,
//! detached) pushes the files `pg_wal/archive_status/*.ready` names,
//! `archive.async_jobs` at a time, through the same code as the synchronous
//! push (commands::archive_push), and writes a success record for each file
//! once it is durable in the repositories. archive-push then only checks the
//! record: exit 0 only when a record proves THIS file stored.
//!
//! The spool, `<archive.spool_dir>/archive-push/<fingerprint>/`, where the
//! fingerprint covers the pg_wal directory, push_to and every configured
//! repository's name, type and location (another configuration never reads
//! these records):
//! - `<walfile>.ok`: success record (format below), written durably (temp,
//!   fsync, rename, fsync dir) after the push returned; consumed by the
//!   archive-push call it answers;
//! - `<walfile>.done`: a record consumed (kept until the archiver marks the
//!   file done, so that the pusher does not push it again meanwhile);
//! - `<walfile>.error`: the pusher's failure for that file; reported once
//!   by archive-push, removed, and the file tried again on the next call;
//! - `pusher.lock` (flock of the running pusher), `pusher.log`.
//!
//! A success record is trusted only when its name, size and hash match the
//! file archive-push was given (the hash the codec computed over the bytes
//! it stored: BLAKE3, or SHA-256 for an object an older walshipper stored,
//! which then hashes the file), and it names the repository id of every repository push_to
//! requires: a record of another cluster, of other bytes under the same
//! name, or of a repository since re-created at the same place, is refused
//! and removed.
//!
//! Those ids: opening the repositories on each call (on S3 a client set up
//! and a request, paid serially by the archiver) was most of a call's cost,
//! so the running pusher vouches for them. It holds pusher.lock and has the
//! repositories open; it writes `vouch` (its pid, each required
//! repository's name and id, the CLOCK_BOOTTIME instant it read them) when
//! it opens them and renews it every VOUCH_RECHECK after reading each
//! descriptor again. archive-push takes the vouch only from the live lock
//! holder (spool::read_if_holder, as the look-ahead's identity file) and
//! only under VOUCH_MAX_AGE old, else it opens the repositories itself. The
//! boot clock, not the file's mtime: the wall clock can be stepped back,
//! making an old vouch look new; the writer being alive means one boot.
//! The window this opens: a repository re-created at the same place is
//! noticed within VOUCH_MAX_AGE (a changed id removes the vouch at once and
//! retires the pusher; an unreadable descriptor lets it age out), and a
//! record naming the old repository can be accepted until then. The
//! synchronous push has the same race, shorter: it reads the id when it
//! opens the repository, then pushes.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::codec::{hash_of, HashAlg, PlainHash};
use crate::commands::archive_push::{self, Pushed};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::repo::Repository;
use crate::spool;
use crate::wal::{self, WalFileKind};

/// First line of a success record.
const RECORD_FORMAT: &str = "walshipper async-push record 1";
/// Largest record or error file read back.
const RECORD_MAX: u64 = 64 << 10;
/// How often archive-push looks for its record while it waits.
const POLL: Duration = Duration::from_millis(10);
/// How often the pusher looks at archive_status when it has nothing to do.
const SCAN: Duration = Duration::from_millis(50);
/// The pusher exits after this long with nothing to push; the next
/// archive-push starts it again.
const IDLE_EXIT: Duration = Duration::from_secs(30);
/// A pusher hands out no new work after this long and exits once its
/// pushes are done (the next archive-push call, which checks every second,
/// starts a fresh one): its repositories are opened again, so it seals with
/// the key current now (`key retire` deletes an old key 900 s after the
/// rotation at the earliest), sees a repository re-created meanwhile, and
/// retries one that failed to open.
const MAX_LIFE: Duration = Duration::from_secs(300);
const LOCK: &str = "pusher.lock";
const LOG: &str = "pusher.log";
/// The running pusher's word for the repositories' ids (see [`Vouch`]).
const VOUCH: &str = "vouch";
const VOUCH_FORMAT: &str = "walshipper async-push vouch 1";
/// How often the pusher reads each required repository's descriptor again
/// to renew its vouch.
const VOUCH_RECHECK: Duration = Duration::from_secs(2);
/// A vouch older than this is not used: archive-push opens the
/// repositories itself. The longest a record of a repository re-created at
/// the same place can still be accepted (docs/operations.md).
const VOUCH_MAX_AGE: Duration = Duration::from_secs(5);

/// The spool directory of this configuration and pg_wal directory.
fn spool_dir(cfg: &Config, pg_wal: &Path) -> Result<PathBuf> {
    let mut parts: Vec<Vec<u8>> = vec![
        b"archive-push v1".to_vec(),
        pg_wal.as_os_str().as_encoded_bytes().to_vec(),
        cfg.archive.push_to.as_bytes().to_vec(),
    ];
    for rc in &cfg.repos {
        parts.push(
            format!("{}|{}|{}|{}", rc.name, rc.kind, rc.endpoint, rc.location()).into_bytes(),
        );
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    let sub = Path::new("archive-push").join(spool::fingerprint(&refs));
    spool::prepare(&cfg.archive.spool_dir, "archive.spool_dir", &sub)
}

/// The pg_wal directory a file PostgreSQL passes as %p lives in, absolute.
fn pg_wal_of(path: &Path) -> Result<PathBuf> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    std::path::absolute(parent).map_err(|e| Error::io(format!("resolve {}", parent.display()), e))
}

/// A parsed success record.
#[derive(Debug, PartialEq)]
struct Record {
    name: String,
    size: u64,
    /// What the repositories hold: its algorithm is the stored object's.
    hash: PlainHash,
    /// (repository name, repository id)
    stored_in: Vec<(String, String)>,
}

impl Record {
    fn render(&self) -> String {
        format!(
            "{RECORD_FORMAT}\nname={}\nsize={}\nhash={}:{}\nstored_in={}\n",
            self.name,
            self.size,
            alg_key(self.hash.alg),
            self.hash.hex(),
            spool::render_repos(&self.stored_in)
        )
    }

    /// None for anything not a whole record of this format.
    fn parse(body: &[u8]) -> Option<Record> {
        let mut f = spool::KeyLines::open(std::str::from_utf8(body).ok()?, RECORD_FORMAT)?;
        let name = f.field("name")?.to_string();
        let size = f.field("size")?.parse().ok()?;
        let (alg, value) = f.field("hash")?.split_once(':')?;
        let stored_in = spool::parse_repos(f.field("stored_in")?)?;
        if !f.end() {
            return None;
        }
        let alg = match alg {
            "blake3" => HashAlg::Blake3,
            "sha256" => HashAlg::Sha256,
            _ => return None,
        };
        let bytes: [u8; 32] = hex::decode(value).ok()?.try_into().ok()?;
        Some(Record {
            name,
            size,
            hash: PlainHash { alg, bytes },
            stored_in,
        })
    }
}

/// How a record names the hash's algorithm.
fn alg_key(alg: HashAlg) -> &'static str {
    match alg {
        HashAlg::Blake3 => "blake3",
        HashAlg::Sha256 => "sha256",
    }
}

fn record_name(name: &str) -> String {
    format!("{name}.ok")
}

fn consumed_name(name: &str) -> String {
    format!("{name}.done")
}

fn error_name(name: &str) -> String {
    format!("{name}.error")
}

// ---------------------------------------------------------------------------
// archive-push in async mode (the archiver's call)

/// archive-push `path` in async mode: consume this file's success record,
/// or make sure the pusher runs and wait for its result.
pub fn push(cfg: &Config, path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| wal::parse_name(n).is_some())
        .map(str::to_string);
    let pg_wal = pg_wal_of(path)?;
    let Some(name) = name else {
        // Not a WAL file name: the synchronous path refuses it with its
        // usual message.
        return archive_push::push_now(cfg, path).map(|_| ());
    };
    if !pg_wal
        .join("archive_status")
        .join(format!("{name}.ready"))
        .exists()
    {
        // Not a file the archiver is waiting on (a call by hand, a file
        // outside pg_wal): the pusher will never see it, push it now.
        return archive_push::push_now(cfg, path).map(|_| ());
    }
    let dir = spool_dir(cfg, &pg_wal)?;
    spool::check_room(&dir, "archive.spool_dir")?;
    let deadline = Instant::now() + Duration::from_secs(cfg.archive.async_wait);
    let mut next_pusher_check = Instant::now();
    // The repositories opened by this call, when no fresh vouch spoke for them.
    let mut opened: Option<Vec<(String, String)>> = None;
    loop {
        let has_record = [record_name(&name), consumed_name(&name)]
            .iter()
            .any(|r| dir.join(r).exists());
        if has_record {
            // The ids a record must name, taken when it is checked: the
            // live pusher's fresh vouch, else the repositories themselves.
            let required = match vouched_ids(cfg, &dir)? {
                Some(ids) => ids,
                None => match &opened {
                    Some(ids) => ids.clone(),
                    None => opened.insert(required_ids(cfg)?).clone(),
                },
            };
            if consume_record(&dir, &name, path, &required)? {
                return Ok(());
            }
        }
        if let Some(msg) = take_error(&dir, &name) {
            ensure_pusher(cfg, &dir, &pg_wal)?;
            return Err(Error::Repository(format!(
                "the background pusher could not archive {name}: {msg} (PostgreSQL retries; its log is {})",
                dir.join(LOG).display()
            )));
        }
        let now = Instant::now();
        if now >= next_pusher_check {
            ensure_pusher(cfg, &dir, &pg_wal)?;
            next_pusher_check = now + Duration::from_secs(1);
        }
        if now >= deadline {
            spool::check_room(&dir, "archive.spool_dir")?;
            return Err(Error::Repository(format!(
                "{name} was not archived within archive.async_wait = {}s: the background pusher is behind \
                 or failing (its log: {}); PostgreSQL retries. See \"The pusher fell behind\" in docs/disaster-recovery.md",
                cfg.archive.async_wait,
                dir.join(LOG).display()
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// (name, repository id) of every repository push_to requires, read from
/// the repositories now (so that a record of a repository since re-created
/// at the same place is refused).
fn required_ids(cfg: &Config) -> Result<Vec<(String, String)>> {
    let required = required_names(cfg);
    cfg.repos
        .iter()
        .filter(|rc| required.contains(&rc.name.as_str()))
        .map(|rc| {
            let repo = Repository::open_repo(cfg, rc)?;
            Ok((rc.name.clone(), repo.descriptor.repository_id.clone()))
        })
        .collect()
}

/// The running pusher's word for the ids of the repositories it pushes to:
/// written under its lock when it opened them and again each time it read
/// their descriptors (every VOUCH_RECHECK), with the CLOCK_BOOTTIME
/// instant of that reading. archive-push takes it instead of opening the
/// repositories itself only while the pusher that wrote it holds the lock
/// and the reading is under VOUCH_MAX_AGE old.
#[derive(Debug, PartialEq)]
struct Vouch {
    holder: u32,
    /// The boot it was written in (spool::boot_id): after a reboot the
    /// clock below restarts and pids are reused, so a vouch of another
    /// boot is never taken.
    boot: String,
    /// CLOCK_BOOTTIME milliseconds when the ids were read from the store.
    checked_ms: u64,
    /// (repository name, repository id)
    repos: Vec<(String, String)>,
}

impl Vouch {
    fn render(&self) -> String {
        format!(
            "{VOUCH_FORMAT}\nholder={}\nboot={}\nchecked_boottime_ms={}\nrepos={}\n",
            self.holder,
            self.boot,
            self.checked_ms,
            spool::render_repos(&self.repos)
        )
    }

    /// None for anything but a whole vouch of this format.
    fn parse(text: &str) -> Option<Vouch> {
        let mut f = spool::KeyLines::open(text, VOUCH_FORMAT)?;
        let holder = f.field("holder")?.parse().ok()?;
        let boot = f.field("boot")?.to_string();
        let checked_ms = f.field("checked_boottime_ms")?.parse().ok()?;
        let repos = spool::parse_repos(f.field("repos")?)?;
        if !f.end() || repos.is_empty() {
            return None;
        }
        Some(Vouch {
            holder,
            boot,
            checked_ms,
            repos,
        })
    }

    /// Written in boot `boot` and read less than VOUCH_MAX_AGE before
    /// `now_ms`; a reading from the future (impossible on one boot's clock)
    /// is not fresh either, nor one when the clock or the boot is unknown.
    fn fresh(&self, boot: Option<&str>, now_ms: Option<u64>) -> bool {
        let Some(now_ms) = now_ms else { return false };
        boot == Some(self.boot.as_str())
            && now_ms >= self.checked_ms
            && now_ms - self.checked_ms < VOUCH_MAX_AGE.as_millis() as u64
    }
}

/// The names of the repositories push_to requires, in configuration order.
fn required_names(cfg: &Config) -> Vec<&str> {
    let all = cfg.archive.push_to == "all";
    cfg.repos
        .iter()
        .enumerate()
        .filter(|(i, _)| all || *i == 0)
        .map(|(_, rc)| rc.name.as_str())
        .collect()
}

/// The required repositories' ids as the running pusher last read them, if
/// it read them less than VOUCH_MAX_AGE ago and vouches for every one.
/// None: open the repositories (no pusher, another run's vouch, one too
/// old, or a repository it could not open).
fn vouched_ids(cfg: &Config, dir: &Path) -> Result<Option<Vec<(String, String)>>> {
    let Some(text) = spool::read_if_holder(&dir.join(LOCK), &dir.join(VOUCH), RECORD_MAX)? else {
        return Ok(None);
    };
    let Some(vouch) = Vouch::parse(&text) else {
        return Ok(None);
    };
    if !vouch.fresh(spool::boot_id().as_deref(), spool::boottime_ms()) {
        return Ok(None);
    }
    Ok(required_names(cfg)
        .into_iter()
        .map(|n| {
            vouch
                .repos
                .iter()
                .find(|(v, _)| v == n)
                .map(|(_, id)| (n.to_string(), id.clone()))
        })
        .collect())
}

/// True when a success record proves `path` stored. The record is then
/// marked consumed (renamed to `<walfile>.done`, still a valid proof should
/// PostgreSQL ask again after a crash; removed by the pusher once the
/// archiver marked the file done). A record that does not match is removed
/// and logged: the pusher pushes the file again (and meets the repository's
/// own "already there" check).
fn consume_record(
    dir: &Path,
    name: &str,
    path: &Path,
    required: &[(String, String)],
) -> Result<bool> {
    for rec_path in [dir.join(record_name(name)), dir.join(consumed_name(name))] {
        let body = match spool::read_small(&rec_path, RECORD_MAX) {
            Ok(Some(b)) => b,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("ignoring the unreadable record {}: {e}", rec_path.display());
                let _ = fs::remove_file(&rec_path);
                continue;
            }
        };
        match check_record(&body, name, path, required)? {
            Ok(()) => {
                // Not synced: a record that reappears after a crash still
                // proves the same bytes stored.
                let _ = fs::rename(&rec_path, dir.join(consumed_name(name)));
                return Ok(true);
            }
            Err(why) => {
                tracing::warn!(
                    "ignoring the spool's record for {name} ({why}); it is removed and the file pushed again"
                );
                let _ = fs::remove_file(&rec_path);
            }
        }
    }
    Ok(false)
}

/// Ok(Err(reason)) when the record is not for this file in these repositories.
fn check_record(
    body: &[u8],
    name: &str,
    path: &Path,
    required: &[(String, String)],
) -> Result<std::result::Result<(), String>> {
    let Some(rec) = Record::parse(body) else {
        return Ok(Err("not a whole record".into()));
    };
    if rec.name != name {
        return Ok(Err(format!("it is for {}", rec.name)));
    }
    for (repo, id) in required {
        if !rec.stored_in.iter().any(|(n, i)| n == repo && i == id) {
            return Ok(Err(format!(
                "it does not name repository {repo} with id {id} (a repository since re-created, or push_to changed)"
            )));
        }
    }
    let size = fs::metadata(path)
        .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
        .len();
    if size != rec.size {
        return Ok(Err(format!(
            "it is for {} bytes, the file has {size}",
            rec.size
        )));
    }
    let f = fs::File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let local =
        hash_of(rec.hash.alg, f).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    if local != rec.hash {
        return Ok(Err(format!(
            "it is for other bytes ({}, the file's {})",
            rec.hash,
            local.hex()
        )));
    }
    Ok(Ok(()))
}

/// The pusher's failure for `name`, if it recorded one (removed: reported once).
fn take_error(dir: &Path, name: &str) -> Option<String> {
    let p = dir.join(error_name(name));
    let body = spool::read_small(&p, RECORD_MAX).ok().flatten()?;
    let _ = fs::remove_file(&p);
    let text = String::from_utf8_lossy(&body);
    Some(text.trim().chars().filter(|c| !c.is_control()).collect())
}

/// Starts the pusher unless one runs for this spool.
fn ensure_pusher(cfg: &Config, dir: &Path, pg_wal: &Path) -> Result<()> {
    if spool::is_locked(&dir.join(LOCK))? {
        return Ok(());
    }
    let mut args: Vec<OsString> = Vec::new();
    if let Some(c) = &cfg.source {
        args.push("--config".into());
        args.push(c.into());
    }
    args.push("archive-push-async".into());
    args.push("--pg-wal".into());
    args.push(pg_wal.into());
    spool::spawn_detached(&args, &dir.join(LOG))
}

// ---------------------------------------------------------------------------
// The background pusher

/// The repositories, opened once for the pusher's life.
enum Targets {
    One(Box<Repository>),
    /// Several: those that opened, and the messages of those that did not.
    Many(Vec<Repository>, Vec<(String, String)>),
}

impl Targets {
    fn open(cfg: &Config) -> Result<Targets> {
        if cfg.repos.len() == 1 {
            return Ok(Targets::One(Box::new(Repository::open(cfg)?)));
        }
        let mut repos = Vec::new();
        let mut failed = Vec::new();
        for (name, r) in Repository::open_all(cfg) {
            match r {
                Ok(repo) => repos.push(repo),
                Err(e) => failed.push((name, e.to_string())),
            }
        }
        Ok(Targets::Many(repos, failed))
    }

    /// The opened repositories push_to requires; None when one of them
    /// did not open (the pusher then vouches for nothing).
    fn required(&self, cfg: &Config) -> Option<Vec<&Repository>> {
        let opened: Vec<&Repository> = match self {
            Targets::One(repo) => vec![repo.as_ref()],
            Targets::Many(repos, _) => repos.iter().collect(),
        };
        required_names(cfg)
            .into_iter()
            .map(|n| opened.iter().find(|r| r.name == n).copied())
            .collect()
    }

    fn push(&self, cfg: &Config, path: &Path) -> Result<Pushed> {
        match self {
            Targets::One(repo) => archive_push::push_one(repo, path),
            Targets::Many(repos, failed) => {
                let failed = failed
                    .iter()
                    .map(|(n, m)| (n.clone(), Error::Repository(m.clone())))
                    .collect();
                archive_push::push_many(cfg, repos, failed, path)
            }
        }
    }
}

/// The files archive_status lists as ready, in the archiver's order:
/// timeline history files first, then by name (segments in WAL order).
fn ready_files(pg_wal: &Path) -> Result<Vec<String>> {
    let status = pg_wal.join("archive_status");
    let entries =
        fs::read_dir(&status).map_err(|e| Error::io(format!("read {}", status.display()), e))?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let base = n.strip_suffix(".ready")?;
            wal::parse_name(base).map(|_| base.to_string())
        })
        .collect();
    names.sort_by_key(|n| {
        let history = matches!(wal::parse_name(n), Some(WalFileKind::History { .. }));
        (!history, n.clone())
    });
    Ok(names)
}

/// The names with a success record, and those with any record (success,
/// consumed or failure: not to be pushed now).
fn recorded(dir: &Path) -> (HashSet<String>, HashSet<String>) {
    let mut ok = HashSet::new();
    let mut any = HashSet::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let Ok(n) = e.file_name().into_string() else {
                continue;
            };
            if n.starts_with('.') {
                continue;
            }
            if let Some(b) = n.strip_suffix(".ok") {
                ok.insert(b.to_string());
                any.insert(b.to_string());
            } else if let Some(b) = n.strip_suffix(".done").or_else(|| n.strip_suffix(".error")) {
                any.insert(b.to_string());
            }
        }
    }
    (ok, any)
}

/// `archive-push-async --pg-wal DIR`: the background pusher. Exits at once
/// when another pusher holds this spool's lock.
pub fn run_pusher(cfg: &Config, pg_wal: &Path) -> Result<()> {
    let pg_wal = std::path::absolute(pg_wal)
        .map_err(|e| Error::io(format!("resolve {}", pg_wal.display()), e))?;
    let dir = spool_dir(cfg, &pg_wal)?;
    let Some(_lock) = spool::try_lock(&dir.join(LOCK))? else {
        return Ok(());
    };
    // An earlier pusher's vouch (killed, or before a reboot) is not ours:
    // gone before this one opens anything.
    let _ = fs::remove_file(dir.join(VOUCH));
    spool::remove_temporaries(&dir);
    spool::log_line(&format!(
        "pusher started for {} ({} jobs, at most {} ahead)",
        pg_wal.display(),
        cfg.archive.async_jobs,
        cfg.archive.async_queue_max
    ));
    // Taken before the descriptors are read: the vouch's age is never
    // understated.
    let opened_ms = spool::boottime_ms();
    let targets = match Targets::open(cfg) {
        Ok(t) => t,
        Err(e) => {
            // Every waiting archive-push gets the reason, not a timeout.
            spool::log_line(&format!("cannot open the repository: {e}"));
            for name in ready_files(&pg_wal).unwrap_or_default() {
                let _ = spool::write_durable(&dir, &error_name(&name), e.to_string().as_bytes());
            }
            return Err(e);
        }
    };
    let (work_tx, work_rx) = mpsc::channel::<String>();
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<String>();
    let changed = AtomicBool::new(false);
    let (stop_vouch, vouch_stop_rx) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        {
            let (targets, dir, changed) = (&targets, &dir, &changed);
            s.spawn(move || keep_vouch(cfg, targets, dir, opened_ms, &vouch_stop_rx, changed));
        }
        for _ in 0..cfg.archive.async_jobs {
            let (work_rx, done_tx) = (&work_rx, done_tx.clone());
            let (targets, dir, pg_wal) = (&targets, &dir, &pg_wal);
            s.spawn(move || loop {
                let next = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok(name) = next else { return };
                push_and_record(cfg, targets, dir, pg_wal, &name);
                if done_tx.send(name).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);
        let result = dispatch(cfg, &dir, &pg_wal, &work_tx, &done_rx, &changed);
        drop(work_tx);
        drop(stop_vouch);
        if let Err(e) = &result {
            spool::log_line(&format!("pusher stops: {e}"));
        }
        result
    })
}

/// Keeps the pusher's vouch ([`Vouch`]) while the pusher runs: written for
/// the ids read when the repositories were opened (at `opened_ms`), then
/// renewed every VOUCH_RECHECK after each required repository's descriptor
/// was read again and still names the same id. A descriptor that cannot be
/// read (the store unreachable) leaves the vouch to age out, and
/// archive-push opens the repositories itself; one that is gone or names
/// another id (a repository re-created at the same place) removes the
/// vouch at once and sets `changed`: the pusher retires, and the next one
/// opens the new repository. Removed when `stop` closes.
fn keep_vouch(
    cfg: &Config,
    targets: &Targets,
    dir: &Path,
    opened_ms: Option<u64>,
    stop: &mpsc::Receiver<()>,
    changed: &AtomicBool,
) {
    // Without every required repository, the boot id or the clock, nothing
    // is vouched for: archive-push opens the repositories itself.
    let (Some(repos), Some(boot), Some(opened_ms)) =
        (targets.required(cfg), spool::boot_id(), opened_ms)
    else {
        return;
    };
    let mut vouch = Vouch {
        holder: std::process::id(),
        boot,
        checked_ms: opened_ms,
        repos: repos
            .iter()
            .map(|r| (r.name.clone(), r.descriptor.repository_id.clone()))
            .collect(),
    };
    let write = |v: &Vouch| {
        if let Err(e) = spool::write_durable(dir, VOUCH, v.render().as_bytes()) {
            // archive-push then opens the repositories itself.
            tracing::warn!("cannot write {}: {e}", dir.join(VOUCH).display());
        }
    };
    write(&vouch);
    let mut unreadable = false;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(VOUCH_RECHECK) {
        let Some(now) = spool::boottime_ms() else {
            break;
        };
        let mut same = true;
        let mut readable = true;
        for (repo, (_, id)) in repos.iter().zip(&vouch.repos) {
            match spool::descriptor_now(repo) {
                Ok(Some(d)) if &d.repository_id == id => {}
                Ok(_) => same = false,
                Err(e) => {
                    if !unreadable {
                        spool::log_line(&format!(
                            "cannot read the descriptor of repository {} again ({e}): archive-push opens the repositories itself until it can",
                            repo.name
                        ));
                    }
                    readable = false;
                }
            }
        }
        if !same {
            spool::log_line(
                "a repository's descriptor changed (re-created or removed): no longer vouching for its id; retiring",
            );
            changed.store(true, Ordering::SeqCst);
            break;
        }
        unreadable = !readable;
        // Not renewed when unreadable: it ages out.
        if readable {
            vouch.checked_ms = now;
            write(&vouch);
        }
    }
    let _ = fs::remove_file(dir.join(VOUCH));
}

/// The pusher's loop: hands ready files to the workers, at most
/// async_jobs at once and async_queue_max ahead of the archiver; returns
/// after IDLE_EXIT with nothing to do.
fn dispatch(
    cfg: &Config,
    dir: &Path,
    pg_wal: &Path,
    work: &mpsc::Sender<String>,
    done: &mpsc::Receiver<String>,
    changed: &AtomicBool,
) -> Result<()> {
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut idle_since = Instant::now();
    let started = Instant::now();
    loop {
        while let Ok(n) = done.try_recv() {
            in_flight.remove(&n);
        }
        // A repository re-created under us: no new work for the
        // repositories as opened; the next pusher opens the new one.
        let retiring = started.elapsed() >= MAX_LIFE || changed.load(Ordering::SeqCst);
        if retiring && in_flight.is_empty() {
            spool::log_line("pusher retiring: the next archive-push starts a fresh one");
            return Ok(());
        }
        let ready = ready_files(pg_wal)?;
        let (ok, any) = recorded(dir);
        // Records whose file is no longer ready were consumed or are
        // obsolete (the archiver marked the file done): they must not count
        // against the queue, nor linger.
        let ready_set: HashSet<&String> = ready.iter().collect();
        for n in &any {
            if !ready_set.contains(n) && !in_flight.contains(n) {
                for f in [record_name(n), consumed_name(n), error_name(n)] {
                    let _ = fs::remove_file(dir.join(f));
                }
            }
        }
        let ahead = ok.iter().filter(|n| ready_set.contains(n)).count();
        let mut room = cfg
            .archive
            .async_queue_max
            .saturating_sub(ahead + in_flight.len());
        let mut handed = false;
        for name in &ready {
            if retiring || in_flight.len() >= cfg.archive.async_jobs || room == 0 {
                break;
            }
            if any.contains(name) || in_flight.contains(name) {
                continue;
            }
            if work.send(name.clone()).is_err() {
                return Err(Error::Repository("the pusher's workers stopped".into()));
            }
            in_flight.insert(name.clone());
            room -= 1;
            handed = true;
        }
        if handed || !in_flight.is_empty() {
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= IDLE_EXIT {
            spool::log_line("pusher idle: exiting (the next archive-push starts it again)");
            return Ok(());
        }
        match done.recv_timeout(SCAN) {
            Ok(n) => {
                in_flight.remove(&n);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Error::Repository("the pusher's workers stopped".into()))
            }
        }
    }
}

/// One file: pushed, then its success record written durably; or its
/// failure recorded for the archive-push waiting on it.
fn push_and_record(cfg: &Config, targets: &Targets, dir: &Path, pg_wal: &Path, name: &str) {
    let path = pg_wal.join(name);
    let started = Instant::now();
    let result = targets.push(cfg, &path).and_then(|pushed| {
        // Killed here: the object is durable but unrecorded; the next
        // pusher pushes it again and meets "already archived".
        failpoint::point("async-push-before-record");
        let size = fs::metadata(&path)
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        let rec = Record {
            name: name.to_string(),
            size,
            hash: pushed.hash,
            stored_in: pushed.stored_in,
        };
        spool::write_durable(dir, &record_name(name), rec.render().as_bytes()).map_err(|e| {
            Error::io(
                format!("write the success record of {name} in {}", dir.display()),
                e,
            )
        })
    });
    match result {
        Ok(()) => tracing::debug!("pushed {name} in {:?}", started.elapsed()),
        Err(e) => {
            let still_ready = pg_wal
                .join("archive_status")
                .join(format!("{name}.ready"))
                .exists();
            if !still_ready {
                // Archived meanwhile (async turned off and on, a manual
                // push): nobody waits for this result.
                return;
            }
            spool::log_line(&format!("{name}: {e}"));
            let msg = match e.hint() {
                Some(h) => format!("{e} ({h})"),
                None => e.to_string(),
            };
            if let Err(w) = spool::write_durable(dir, &error_name(name), msg.as_bytes()) {
                spool::log_line(&format!("{name}: cannot record the failure either: {w}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_refuses_partial_text() {
        let r = Record {
            name: "000000010000000000000003".into(),
            size: 16 << 20,
            hash: PlainHash {
                alg: HashAlg::Blake3,
                bytes: [0xab; 32],
            },
            stored_in: vec![("repo1".into(), "cd".repeat(16))],
        };
        let text = r.render();
        assert_eq!(Record::parse(text.as_bytes()), Some(r));
        for cut in 0..text.len() {
            assert_eq!(Record::parse(&text.as_bytes()[..cut]), None, "cut at {cut}");
        }
        assert_eq!(Record::parse(b"garbage\n"), None);
    }

    #[test]
    fn vouch_round_trips_ages_and_speaks_only_for_the_live_holder() {
        let boot = spool::boot_id().expect("a boot id");
        let v = Vouch {
            holder: std::process::id(),
            boot: boot.clone(),
            checked_ms: 1_000_000,
            repos: vec![
                ("repo1".into(), "ab".repeat(16)),
                ("dr".into(), "cd".repeat(16)),
            ],
        };
        let text = v.render();
        assert_eq!(Vouch::parse(&text).as_ref(), Some(&v));
        for cut in 0..text.len() {
            assert_eq!(Vouch::parse(&text[..cut]), None, "cut at {cut}");
        }
        assert_eq!(Vouch::parse(&format!("{text}x=1\n")), None);
        assert_eq!(Vouch::parse(&text.replace("vouch 1", "vouch 2")), None);
        // Fresh for VOUCH_MAX_AGE on the boot clock, never from the future.
        let max = VOUCH_MAX_AGE.as_millis() as u64;
        let b = Some(boot.as_str());
        assert!(v.fresh(b, Some(1_000_000)) && v.fresh(b, Some(1_000_000 + max - 1)));
        assert!(!v.fresh(b, Some(1_000_000 + max)) && !v.fresh(b, Some(999_999)));
        // Another boot's (its clock restarted, its pids reused), or with no
        // clock or boot id to compare: never fresh.
        let other_boot = "00000000-0000-0000-0000-000000000000";
        assert!(!v.fresh(Some(other_boot), Some(1_000_000)));
        assert!(!v.fresh(None, Some(1_000_000)) && !v.fresh(b, None));

        // Taken only from the live lock holder, fresh, naming every
        // required repository.
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let f = dir.join("w.toml");
        fs::write(
            &f,
            format!("[repo]\npath = \"{}\"\n", dir.join("r").display()),
        )
        .unwrap();
        let cfg = Config::load_with_env(Some(&f), []).unwrap();
        let now = Vouch {
            holder: std::process::id(),
            boot: boot.clone(),
            checked_ms: spool::boottime_ms().unwrap(),
            repos: vec![(cfg.repos[0].name.clone(), "ef".repeat(16))],
        };
        fs::write(dir.join(VOUCH), now.render()).unwrap();
        assert_eq!(vouched_ids(&cfg, dir).unwrap(), None, "no holder");
        let lock = spool::try_lock(&dir.join(LOCK)).unwrap().expect("free");
        assert_eq!(
            vouched_ids(&cfg, dir).unwrap(),
            Some(vec![(cfg.repos[0].name.clone(), "ef".repeat(16))])
        );
        let other = Vouch {
            holder: std::process::id() + 1,
            ..now
        };
        fs::write(dir.join(VOUCH), other.render()).unwrap();
        assert_eq!(vouched_ids(&cfg, dir).unwrap(), None, "another run's");
        let old = Vouch {
            holder: std::process::id(),
            boot: boot.clone(),
            checked_ms: spool::boottime_ms().unwrap() - max,
            repos: other.repos.clone(),
        };
        fs::write(dir.join(VOUCH), old.render()).unwrap();
        assert_eq!(vouched_ids(&cfg, dir).unwrap(), None, "too old");
        // Written before a reboot by a pusher whose pid this one has now:
        // its clock reading may even look fresh.
        let rebooted = Vouch {
            holder: std::process::id(),
            boot: "00000000-0000-0000-0000-000000000000".into(),
            checked_ms: spool::boottime_ms().unwrap(),
            repos: other.repos.clone(),
        };
        fs::write(dir.join(VOUCH), rebooted.render()).unwrap();
        assert_eq!(vouched_ids(&cfg, dir).unwrap(), None, "another boot's");
        let elsewhere = Vouch {
            holder: std::process::id(),
            boot: boot.clone(),
            checked_ms: spool::boottime_ms().unwrap(),
            repos: vec![("other".into(), "ef".repeat(16))],
        };
        fs::write(dir.join(VOUCH), elsewhere.render()).unwrap();
        assert_eq!(
            vouched_ids(&cfg, dir).unwrap(),
            None,
            "not the required one"
        );
        drop(lock);
    }
}
