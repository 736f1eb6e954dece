//! `archive-get <walfile> <dest>`: PostgreSQL's restore_command. The file
//! appears at `dest` only after every frame and the SHA-256 were verified
//! and its contents were checked against the name asked for
//! (`wal::ContentCheck`).
//!
//! The exit status is what PostgreSQL acts on, and it reads every status
//! from 1 to 125 as "not in the archive": recovery ends there and the server
//! is promoted, dropping whatever later WAL the archive holds. So:
//! - 0: restored;
//! - 1: only when every configured repository answered "not there";
//! - 126 at once: the object is damaged or is not the file asked for, or the
//!   passphrase is wrong (retrying cannot help);
//! - 128 after retrying with backoff for `restore.archive_get_retry_timeout`
//!   seconds: anything else (store unreachable, configuration or passphrase
//!   unreadable, repository missing, destination not writable).
//!
//! Statuses above 125 make PostgreSQL stop recovery with FATAL; it resumes
//! where it stopped when the server is started again. A standby (standby.signal
//! in PostgreSQL's working directory, the data directory) never promotes on
//! its own and asks again, so there a failure is 3 without retrying.
//!
//! With `[restore] lookahead` set, a segment verified ahead of time by the
//! prefetcher is served from its spool, and a file it has just found
//! missing is answered "not there" (commands::archive_lookahead); anything
//! else is fetched here as always.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::{Config, RestoreConfig};
use crate::error::{exit, Error, Result};
use crate::repo::Repository;
use crate::requester;
use crate::wal::{self, ContentCheck, WalFileKind};

/// Longest pause between two attempts.
const MAX_DELAY: Duration = Duration::from_secs(30);

/// What one pass over the repositories came to.
enum Outcome {
    Restored,
    /// Every repository answered "not there".
    NotThere,
    /// Retrying cannot help: stop with this status now.
    Stop(Error, i32),
    /// Worth another attempt (a repository failed without answering).
    Retry(Error),
    /// The server that asked is gone: nobody waits for the file, and
    /// another repository must not be asked for it (see `requester`).
    Orphaned,
}

/// The whole command, configuration loading included (a configuration that
/// cannot be read during recovery must stop it, not end it): returns the
/// process exit status.
pub fn main(config: Option<&Path>, only: Option<&str>, name: &str, dest: &Path) -> i32 {
    let Some(kind) = wal::parse_name(name) else {
        // PostgreSQL only ever passes WAL file names as %f: this is a
        // restore_command that is set up wrong, and recovery must not end.
        eprintln!(
            "walshipper: '{name}' is not a WAL file name; restore_command must be: walshipper archive-get %f \"%p\""
        );
        return exit::RECOVERY_STOP;
    };
    let standby = standby_mode();
    let asked = requester::note();
    let started = Instant::now();
    // WALSHIPPER_LOG=walshipper=debug: each call's start, outcome and time
    // (with the look-ahead's own lines, where a recovery's time goes).
    tracing::debug!("{} archive-get {name}: asked", crate::spool::stamp());
    let code = main_loop(config, only, name, &kind, dest, standby, &asked, started);
    tracing::debug!(
        "{} archive-get {name}: exit {code} after {:.1} ms",
        crate::spool::stamp(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    code
}

#[allow(clippy::too_many_arguments)]
fn main_loop(
    config: Option<&Path>,
    only: Option<&str>,
    name: &str,
    kind: &WalFileKind,
    dest: &Path,
    standby: bool,
    asked: &requester::Noted,
    started: Instant,
) -> i32 {
    let mut timeout: Option<u64> = None;
    let mut delay = Duration::from_secs(1);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let outcome = match Config::load(config) {
            Ok(cfg) => {
                timeout = Some(cfg.restore.archive_get_retry_timeout);
                attempt(&cfg, only, name, kind, dest)
            }
            Err(e) => Outcome::Retry(e),
        };
        let e = match outcome {
            Outcome::Restored => return exit::OK,
            // A normal probe (the end of the archive, a timeline not there): quiet.
            Outcome::NotThere => return exit::NOT_FOUND,
            Outcome::Stop(e, code) => {
                eprintln!("walshipper: {e}");
                eprintln!(
                    "walshipper: {name} cannot be restored; recovery must stop here (see \"archive-get during recovery\" in docs/disaster-recovery.md)"
                );
                return code;
            }
            Outcome::Retry(e) => e,
            Outcome::Orphaned => {
                eprintln!("walshipper: the server that asked for {name} is gone (its startup process ended); nothing written");
                return exit::RECOVERY_STOP;
            }
        };
        if standby {
            eprintln!("walshipper: {e} (standby: PostgreSQL will ask again)");
            return exit::UNAVAILABLE;
        }
        let limit = Duration::from_secs(timeout.unwrap_or_else(fallback_timeout));
        let elapsed = started.elapsed();
        if elapsed >= limit {
            eprintln!("walshipper: {e}");
            eprintln!(
                "walshipper: cannot fetch {name}: still failing after {attempts} attempt(s) in {}s (restore.archive_get_retry_timeout = {}s). Stopping recovery rather than ending it early: fix the cause, then start the server again and recovery continues",
                elapsed.as_secs(),
                limit.as_secs()
            );
            return exit::RECOVERY_STOP;
        }
        let pause = delay.min(limit - elapsed);
        eprintln!(
            "walshipper: {e}; retrying {name} in {}s",
            pause.as_secs_f32().ceil()
        );
        if !sleep_unless_orphaned(pause, asked) {
            // PostgreSQL gave up on us (shutdown): nobody waits for the file.
            eprintln!("walshipper: the server that asked for {name} is gone (its startup process ended); nothing written");
            return exit::RECOVERY_STOP;
        }
        delay = (delay * 2).min(MAX_DELAY);
    }
}

/// The library entry point: one pass, no retry. `Error::NotFound` only
/// when every repository (or `only`) answered "not there".
pub fn run(cfg: &Config, only: Option<&str>, name: &str, dest: &Path) -> Result<()> {
    let kind = wal::parse_name(name).ok_or_else(|| {
        Error::Invalid(format!(
            "'{name}' is not a WAL file name (use %f in restore_command)"
        ))
    })?;
    match attempt(cfg, only, name, &kind, dest) {
        Outcome::Restored => Ok(()),
        Outcome::NotThere => Err(Error::NotFound(name.to_string())),
        Outcome::Stop(e, _) | Outcome::Retry(e) => Err(e),
        // Not in a library caller (only `main` notes a requester).
        Outcome::Orphaned => Err(Error::Invalid(format!(
            "the caller that asked for {name} is gone"
        ))),
    }
}

/// The retry time when the configuration cannot be loaded: its environment
/// variable if that parses, else the default.
fn fallback_timeout() -> u64 {
    std::env::var(crate::config::env_name(
        "restore",
        "archive_get_retry_timeout",
    ))
    .ok()
    .and_then(|v| v.trim().parse().ok())
    .unwrap_or(RestoreConfig::default().archive_get_retry_timeout)
}

/// PostgreSQL runs restore_command in the data directory.
pub(crate) fn standby_mode() -> bool {
    Path::new("standby.signal").is_file() && Path::new("PG_VERSION").is_file()
}

/// Sleeps `d`; false as soon as the server that asked is gone (it stopped
/// while we waited: a later write into its pg_wal, maybe under a new
/// server, would be wrong).
fn sleep_unless_orphaned(d: Duration, _asked: &requester::Noted) -> bool {
    let end = Instant::now() + d;
    loop {
        if requester::gone() {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(200)));
    }
}

/// Errors no retry can mend: the data itself is wrong, or the key is.
fn is_damage(e: &Error) -> bool {
    matches!(
        e,
        Error::Corrupt { .. } | Error::WrongPassphrase { .. } | Error::InvalidWal { .. }
    )
}

/// One pass over the repositories in configuration order (or only the one
/// `--repo` names: the way to recover from the survivor when another
/// configured repository is lost for good); the next one is asked when one
/// lacks the file or fails.
fn attempt(
    cfg: &Config,
    only: Option<&str>,
    name: &str,
    kind: &WalFileKind,
    dest: &Path,
) -> Outcome {
    if requester::gone() {
        return Outcome::Orphaned;
    }
    if cfg.restore.lookahead > 0 {
        use crate::commands::archive_lookahead::{serve, Answer};
        match serve(cfg, only, name, kind, dest) {
            Answer::Served => return Outcome::Restored,
            Answer::Absent => return Outcome::NotThere,
            // The look-ahead's move into the destination may have been
            // refused for that: no direct fetch then.
            Answer::Ask if requester::gone() => return Outcome::Orphaned,
            Answer::Ask => {}
        }
    }
    let key = crate::layout::wal(name, kind);
    let repos = match only {
        Some(_) => match cfg.find_repo(only) {
            Ok(rc) => std::slice::from_ref(rc),
            Err(e) => return Outcome::Retry(e),
        },
        None => &cfg.repos[..],
    };
    let mut retry = None;
    let mut stop = None;
    // Those that answered "not there", kept open for the streamed tail (on
    // S3 an open is a client set up and a request: at the end of the
    // archive, where recovery asks for the next segment twice).
    let mut answered = Vec::new();
    for rc in repos {
        // Only the object itself may answer "not there": a repository that
        // cannot be opened (not mounted, bucket or descriptor missing) says
        // nothing about the file.
        let result = match Repository::open_repo(cfg, rc) {
            Ok(repo) => match fetch(&repo, name, kind, &key, dest, repo.threads()) {
                Err(Error::NotFound(n)) => {
                    answered.push(repo);
                    Err(Error::NotFound(n))
                }
                other => other,
            },
            Err(Error::NotFound(what)) => Err(Error::Repository(format!(
                "repository {} cannot be opened: {what} is missing",
                rc.name
            ))),
            Err(e) => Err(e),
        };
        let e = match result {
            Ok(()) => return Outcome::Restored,
            Err(_) if requester::gone() => return Outcome::Orphaned,
            Err(Error::NotFound(_)) => continue,
            Err(e) => e,
        };
        if repos.len() > 1 {
            eprintln!("walshipper: repository {}: {e}", rc.name);
        }
        if is_damage(&e) {
            stop.get_or_insert((e, exit::DAMAGED));
        } else if matches!(e, Error::Invalid(_)) {
            // A destination we cannot use: the command line is wrong.
            stop.get_or_insert((e, exit::RECOVERY_STOP));
        } else {
            retry.get_or_insert(e);
        }
    }
    // A repository that failed may come back with a good copy of what
    // another one holds damaged: retrying comes first.
    match (retry, stop) {
        (Some(e), _) => Outcome::Retry(e),
        (None, Some((e, code))) => Outcome::Stop(e, code),
        (None, None) => streamed_tail(&answered, name, kind, dest),
    }
}

/// No repository holds segment `name` whole: the newest WAL of a server
/// that is gone may be there as streamed chunks (`wal-receive`), which
/// recovery replays up to their last whole record. Never on a standby,
/// which must wait for the whole segment.
fn streamed_tail(repos: &[Repository], name: &str, kind: &WalFileKind, dest: &Path) -> Outcome {
    if !matches!(kind, WalFileKind::Segment { partial: false, .. }) || standby_mode() {
        return Outcome::NotThere;
    }
    for repo in repos {
        match crate::stream::restore_partial(repo, name, dest) {
            Ok(()) => return Outcome::Restored,
            Err(Error::NotFound(_)) => {}
            Err(_) if requester::gone() => return Outcome::Orphaned,
            Err(e) if is_damage(&e) => return Outcome::Stop(e, exit::DAMAGED),
            Err(e) => return Outcome::Retry(e),
        }
    }
    Outcome::NotThere
}

/// Where the decoded bytes go: the temporary file, and the content check.
/// A failed write is kept, so that it is reported as the local problem it
/// is and not as a failed read of the repository.
struct Sink {
    file: BufWriter<File>,
    check: ContentCheck,
    local: Option<io::Error>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.file.write(buf) {
            Ok(n) => {
                self.check.write_all(&buf[..n])?;
                Ok(n)
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush().map_err(|e| self.failed(e))
    }
}

impl Sink {
    fn failed(&mut self, e: io::Error) -> io::Error {
        let kind = e.kind();
        self.local.get_or_insert(e);
        io::Error::new(kind, "writing the destination failed")
    }
}

fn local(dest: &Path, e: io::Error) -> Error {
    Error::io(format!("cannot write {}", dest.display()), e)
}

/// Fetches WAL file `name` into `dest`, decoding on `threads` threads:
/// `dest` appears only once every check passed (also the look-ahead's
/// fetch into its spool, commands::archive_lookahead).
pub(crate) fn fetch(
    repo: &Repository,
    name: &str,
    kind: &WalFileKind,
    key: &str,
    dest: &Path,
    threads: usize,
) -> Result<()> {
    let id = repo.descriptor.identity()?;
    if dest.file_name().and_then(|n| n.to_str()).is_none() {
        return Err(Error::Invalid(format!(
            "bad destination {}",
            dest.display()
        )));
    }
    let (tmp, f) = crate::spool::create_beside(dest).map_err(|e| local(dest, e))?;
    let result = (|| {
        let mut sink = Sink {
            file: BufWriter::with_capacity(1 << 20, f),
            check: ContentCheck::new(name, kind),
            local: None,
        };
        let read = repo.read_object_with(key, &mut sink, threads);
        if let Some(e) = sink.local.take() {
            return Err(local(dest, e));
        }
        read.map_err(|e| match e {
            Error::NotFound(_) => Error::NotFound(name.to_string()),
            other => other,
        })?;
        sink.flush().map_err(|_| match sink.local.take() {
            Some(e) => local(dest, e),
            None => local(dest, io::Error::other("flush failed")),
        })?;
        // Decrypting proves who wrote the bytes, not that they are this
        // file: the page header must say so too.
        sink.check.finish(&id).map_err(|reason| Error::Corrupt {
            key: format!("{key} in repository {}", repo.name),
            reason: format!("it is not WAL file {name} of this cluster: {reason}"),
        })?;
        drop(sink);
        requester::rename_if_asked(&tmp, dest).map_err(|e| local(dest, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
