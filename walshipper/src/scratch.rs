//! A scratch PostgreSQL cluster restored from the repository, for
//! `restore-test` and `table-restore`: a private directory under
//! `[restore_test] scratch_dir`, the restore into it, PostgreSQL started on
//! a private socket until recovery reached its target and the cluster is
//! open, SQL and PostgreSQL's tools against it, and, whatever happens,
//! the server stopped and everything removed.
//!
//! "Whatever happens" covers four ways out: success, an error (the server
//! log is kept in `logs/`), SIGTERM/SIGINT/SIGHUP (a thread waits for them,
//! stops the server and removes the directory before exiting), and SIGKILL
//! of walshipper: the postmaster is our direct child with PR_SET_PDEATHSIG,
//! so it shuts down with us, and the next run sweeps directories whose owner
//! (pid and process start time in `owner`) is gone.
//!
//! A copy of production must not behave like production: the restored
//! configuration is not read at all (config_file points at an empty file of
//! ours; postgresql.auto.conf is still read, for the recovery settings
//! restore wrote) and everything that reaches outside is overridden on the
//! command line, which wins over every file: see `server_settings`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::commands::restore::{self, Restored, Target};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::sql;

pub use pg_backup_contract::CheckResult;

/// Server logs of failed runs kept in `<scratch_dir>/logs`.
pub const KEEP_LOGS: usize = 20;
/// Longest text of a tool's output kept in a check's detail.
const DETAIL_MAX: usize = 2000;
/// How long an immediate shutdown may take before SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// Directories without an owner file are someone's in creation unless older.
const OWNERLESS_GRACE: Duration = Duration::from_secs(120);

/// What the signal thread needs to clean up: set while a scratch exists.
struct Active {
    root: PathBuf,
    log: PathBuf,
    logs_dir: PathBuf,
    id: String,
    postmaster: Option<i32>,
    json: bool,
}

static ACTIVE: Mutex<Option<Active>> = Mutex::new(None);

/// The record an interrupted run leaves: the configuration to reach its
/// repository, the repository's name, the record so far, its start.
type Pending = (Config, String, pg_backup_contract::RecoveryRecord, Instant);

static PENDING_RECORD: Mutex<Option<Pending>> = Mutex::new(None);

/// Keeps `rec` to be written (failed, "interrupted by ...") to repository
/// `repo` if a signal ends the run; `None` once the run writes its own.
pub fn record_if_interrupted(
    cfg: &Config,
    repo: &str,
    rec: Option<(pg_backup_contract::RecoveryRecord, Instant)>,
) {
    let mut g = PENDING_RECORD.lock().unwrap_or_else(|e| e.into_inner());
    *g = rec.map(|(r, t)| (cfg.clone(), repo.to_string(), r, t));
}

fn with_active(f: impl FnOnce(&mut Option<Active>)) {
    let mut g = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut g);
}

/// Lowers this process's CPU and I/O priority ([restore_test] nice,
/// io_class), before any thread or child exists: both are per thread on
/// Linux and inherited by threads and processes created afterwards, so the
/// restore's workers, the scratch server and the tools all run below
/// production. Failures are warnings: priority is a courtesy.
pub fn lower_priority(cfg: &Config) {
    let rt = &cfg.restore_test;
    if rt.nice > 0 {
        // SAFETY: setpriority on the calling thread (who 0) with a valid niceness.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, rt.nice) };
        if r != 0 {
            tracing::warn!(
                "cannot lower CPU priority to nice {}: {}",
                rt.nice,
                std::io::Error::last_os_error()
            );
        }
    }
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_SHIFT: u32 = 13;
    let prio: Option<libc::c_long> = match rt.io_class.as_str() {
        // The idle class: I/O only when the disk has nothing else to do.
        "idle" => Some(3 << IOPRIO_CLASS_SHIFT),
        // Best effort at its lowest level (7).
        "best-effort" => Some((2 << IOPRIO_CLASS_SHIFT) | 7),
        _ => None,
    };
    if let Some(p) = prio {
        // SAFETY: ioprio_set for the calling thread with a valid priority value.
        let r = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, p) };
        if r != 0 {
            tracing::warn!(
                "cannot lower I/O priority ({}): {}",
                rt.io_class,
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and so in every
/// thread started later) and starts a thread that waits for them: it stops
/// the scratch server, keeps its log, removes the scratch directory and
/// exits with 128 + the signal. Call before any other thread exists.
/// Children get an empty signal mask (std resets it before exec).
pub fn guard_signals() {
    // SAFETY: plain sigset manipulation on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    };
    // SAFETY: blocking signals for the calling thread with a valid set.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        tracing::warn!("cannot block termination signals: cleanup on SIGTERM is not assured");
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait with a valid set and out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            on_signal(sig);
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the signal thread: {e}");
    }
}

/// Set by the signal thread as it starts cleaning up.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Once a signal arrived, the signal thread owns the end of the run (its
/// record, its message, its exit status): the calling thread waits for it
/// to exit the process instead of finishing on its own.
pub fn yield_if_interrupted() {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
}

fn on_signal(sig: libc::c_int) -> ! {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    let name = match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "SIGHUP",
    };
    let mut json = false;
    let mut kept = None;
    with_active(|a| {
        if let Some(a) = a.take() {
            json = a.json;
            if let Some(pid) = a.postmaster {
                stop_pid(pid);
            }
            kept = keep_log(&a.log, &a.logs_dir, &a.id);
            remove_tree(&a.root);
        }
    });
    let code = 128 + sig;
    let msg = format!(
        "interrupted by {name}: the scratch cluster was stopped and removed{}",
        kept.map(|p| format!(" (server log kept in {})", p.display()))
            .unwrap_or_default()
    );
    let pending = PENDING_RECORD
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some((cfg, repo, mut rec, started)) = pending {
        let err = Error::Invalid(msg.clone());
        crate::recovery_log::finish(&mut rec, started, Some(&err));
        match cfg
            .find_repo(Some(&repo))
            .and_then(|rc| Repository::open_repo(&cfg, rc))
        {
            Ok(r) => crate::recovery_log::write_all(&[&r], &rec),
            Err(e) => tracing::warn!("the record of this interrupted run was not stored: {e}"),
        }
    }
    eprintln!("walshipper: {msg}");
    if json {
        crate::progress::event(&pg_backup_contract::Event::Error(
            pg_backup_contract::ErrorEvent {
                code,
                kind: crate::error::exit::kind(code).into(),
                message: msg,
                hint: Some("run it again when it can finish".into()),
                repository: None,
            },
        ));
    }
    std::process::exit(code)
}

/// Stops a postmaster: SIGQUIT (immediate shutdown: nothing in a scratch
/// copy is worth a checkpoint), then SIGKILL if it lingers.
fn stop_pid(pid: i32) {
    // SAFETY: kill with a pid we started (or checked by its command line).
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    let start = Instant::now();
    while alive(pid) && start.elapsed() < STOP_WAIT {
        reap(pid);
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(100));
    }
    reap(pid);
}

/// Collects a child of ours that exited (no effect on others).
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: non-blocking waitpid on a specific pid.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

/// Whether `pid` runs (a zombie does not count).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(stat_fields(&s).first(), Some(&"Z") | Some(&"X")),
        Err(_) => false,
    }
}

/// The fields of /proc/<pid>/stat after the command name (which may hold
/// spaces and parentheses): state first.
fn stat_fields(s: &str) -> Vec<&str> {
    s.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// The start time of `pid` (clock ticks since boot), which tells a reused
/// pid from the process that wrote an owner file.
fn start_time(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // starttime is field 22; after the name, state is field 3.
    stat_fields(&s).get(19)?.parse().ok()
}

/// Removes a directory tree (links are removed, never followed). A
/// process still writing into it (an archive-get the server started) can
/// refill a directory between listing and removal: retried a few times.
fn remove_tree(p: &Path) {
    for i in 0..10 {
        match fs::remove_dir_all(p) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                if i == 9 {
                    tracing::warn!("cannot remove scratch directory {}: {e}", p.display());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Copies a failed run's server log to `logs/<id>.log`, keeping the newest
/// KEEP_LOGS there.
fn keep_log(log: &Path, logs_dir: &Path, id: &str) -> Option<PathBuf> {
    if !log.exists() {
        return None;
    }
    if let Err(e) = fs::DirBuilder::new().mode(0o700).create(logs_dir) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            tracing::warn!("cannot create {}: {e}", logs_dir.display());
            return None;
        }
    }
    let dest = logs_dir.join(format!("{id}.log"));
    if let Err(e) = fs::copy(log, &dest) {
        tracing::warn!("cannot keep the server log in {}: {e}", dest.display());
        return None;
    }
    let _ = fs::set_permissions(&dest, fs::Permissions::from_mode(0o600));
    let mut logs: Vec<PathBuf> = fs::read_dir(logs_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect()
        })
        .unwrap_or_default();
    // Names start with the record id, which sorts by time.
    logs.sort();
    if logs.len() > KEEP_LOGS {
        for old in &logs[..logs.len() - KEEP_LOGS] {
            let _ = fs::remove_file(old);
        }
    }
    Some(dest)
}

/// Removes the scratch directories of runs whose walshipper is gone
/// (killed with SIGKILL, or a machine crash): stops a postmaster still
/// running in one (after checking that its command line names that data
/// directory), then removes the directory.
pub fn sweep(scratch_dir: &Path) {
    let Ok(entries) = fs::read_dir(scratch_dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        // Only directories named like ours (a record id) are ever touched:
        // --scratch-dir may name a directory that holds other things too.
        let ours = e
            .file_name()
            .to_str()
            .is_some_and(crate::layout::is_recovery_id);
        if !ours || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let owner = fs::read_to_string(path.join("owner")).ok();
        let owner_alive = match owner.as_deref().and_then(parse_owner) {
            Some((pid, started)) => start_time(pid) == Some(started),
            None => {
                // Without an owner file: being created right now, or left
                // empty by a crash between mkdir and writing it.
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= OWNERLESS_GRACE);
                let empty = fs::read_dir(&path).is_ok_and(|mut d| d.next().is_none());
                !(old && empty)
            }
        };
        if owner_alive {
            continue;
        }
        let data = path.join("data");
        if let Some(pid) = fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok())
        {
            if pid > 0 && postmaster_of(pid, &data) {
                tracing::warn!(
                    "stopping postmaster {pid} left running in stale scratch directory {}",
                    path.display()
                );
                stop_pid(pid);
            }
        }
        tracing::info!("removing stale scratch directory {}", path.display());
        remove_tree(&path);
    }
}

/// Whether process `pid` is a postgres whose command line names `data`.
fn postmaster_of(pid: i32, data: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = data.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|a| a == want)
}

fn parse_owner(s: &str) -> Option<(u32, u64)> {
    let mut pid = None;
    let mut start = None;
    for l in s.lines() {
        match l.split_once(' ') {
            Some(("pid", v)) => pid = v.trim().parse().ok(),
            Some(("start", v)) => start = v.trim().parse().ok(),
            _ => {}
        }
    }
    Some((pid?, start?))
}

/// How every scratch operation begins: its run directory (in `sc_slot`,
/// so that the caller cleans it up whatever follows), then the plan: the
/// backup, and the one repository it is read from.
#[allow(clippy::too_many_arguments)]
pub fn begin<'a>(
    cfg: &Config,
    sc_slot: &'a mut Option<Scratch>,
    scratch_dir: Option<&Path>,
    id: &str,
    repo: Option<&str>,
    backup: Option<&str>,
    target: &Target,
    json: bool,
) -> Result<(&'a mut Scratch, Repository, restore::Plan)> {
    let sc = sc_slot.insert(Scratch::create(cfg, scratch_dir, id, json)?);
    let (repo, plan) = plan(cfg, repo, backup, target)?;
    Ok((sc, repo, plan))
}

/// The repository a restore test or table restore reads (`repo`, else the
/// primary: the first configured) and its backup for `target`. Pinned:
/// the restore does not fall back to another repository on damage, since
/// a test must test the repository it names.
pub fn plan(
    cfg: &Config,
    repo: Option<&str>,
    backup: Option<&str>,
    target: &Target,
) -> Result<(Repository, restore::Plan)> {
    let rc = cfg.find_repo(repo)?;
    let r = Repository::open_repo(cfg, rc)?;
    let p = restore::plan(&r, backup, target)?;
    Ok((r, p))
}

/// A check's outcome, timed.
pub fn timed_check(name: String, f: impl FnOnce() -> (bool, String)) -> CheckResult {
    let t = Instant::now();
    let (passed, detail) = f();
    CheckResult {
        name,
        passed,
        detail: shorten(&detail),
        duration_s: t.elapsed().as_secs_f64(),
    }
}

/// Keeps the start and the end of a long text (where tools put the summary).
pub fn shorten(s: &str) -> String {
    let s = s.trim();
    if s.len() <= DETAIL_MAX {
        return s.to_string();
    }
    let mut a = DETAIL_MAX / 2;
    while !s.is_char_boundary(a) {
        a -= 1;
    }
    let mut b = s.len() - DETAIL_MAX / 2;
    while !s.is_char_boundary(b) {
        b += 1;
    }
    format!("{} [...] {}", &s[..a], &s[b..])
}

/// A scratch cluster. Dropping it stops the server and removes everything
/// (use `finish` to keep the log of a failure).
pub struct Scratch {
    pub id: String,
    pub root: PathBuf,
    pub data: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    logs_dir: PathBuf,
    bin_dir: Option<PathBuf>,
    child: Option<Child>,
    /// The bootstrap superuser of the restored cluster (known once open).
    pub superuser: Option<String>,
    /// Users tried to connect first (the configured one, the OS user).
    candidates: Vec<String>,
    shared_buffers: String,
    /// The backup's PostgreSQL major version (settings differ by version).
    pg_major: u32,
    finished: bool,
}

impl Scratch {
    /// Sweeps stale scratch directories, then creates `<scratch_dir>/<id>`
    /// (mode 0700) with its owner file, and registers it for cleanup on a
    /// signal.
    pub fn create(
        cfg: &Config,
        scratch_dir: Option<&Path>,
        id: &str,
        json: bool,
    ) -> Result<Scratch> {
        let dir = scratch_dir.unwrap_or(&cfg.restore_test.scratch_dir);
        let dir = std::path::absolute(dir)
            .map_err(|e| Error::io(format!("scratch directory {}", dir.display()), e))?;
        // The path lands in unix_socket_directories, a list setting.
        let text = dir.to_str().ok_or_else(|| {
            Error::Invalid(format!("scratch directory {} is not UTF-8", dir.display()))
        })?;
        if text.chars().any(|c| c.is_control() || c == '"' || c == ',') {
            return Err(Error::Invalid(format!(
                "scratch directory {text:?} holds a quote, comma or control character; choose a plain path ([restore_test] scratch_dir or --scratch-dir)"
            )));
        }
        // Socket paths are limited to 107 bytes.
        if text.len() + id.len() + 30 > 107 {
            return Err(Error::Invalid(format!(
                "scratch directory {text} is too long for a socket path below it (at most about {} bytes); choose a shorter one",
                107 - id.len() - 30
            )));
        }
        if fs::symlink_metadata(&dir).is_err() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::io(format!("create scratch directory {}", dir.display()), e))?;
        }
        // An existing directory is used as it is, if no one else can
        // write in it (its logs/ and our directories are below it).
        // Not followed: a link planted where the directory is expected
        // (/var/tmp is everyone's) would lead the scratch elsewhere.
        let meta = fs::symlink_metadata(&dir)
            .map_err(|e| Error::io(format!("scratch directory {}", dir.display()), e))?;
        if meta.file_type().is_symlink() {
            return Err(Error::Invalid(format!(
                "scratch directory {} is a symbolic link; name the real directory ([restore_test] scratch_dir or --scratch-dir), or remove the link if you did not create it",
                dir.display()
            )));
        }
        let found = crate::private_dir::Found::of(&meta);
        if !found.is_ours_alone() {
            return Err(Error::Invalid(format!(
                "scratch directory {} is {found}: it must be a directory of walshipper's own user (uid {}) that no one else can write in (chmod 700 it, or choose another [restore_test] scratch_dir)",
                dir.display(),
                crate::private_dir::euid()
            )));
        }
        sweep(&dir);
        let root = dir.join(id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&root)
            .map_err(|e| Error::io(format!("create {}", root.display()), e))?;
        let me = std::process::id();
        let owner = format!("pid {me}\nstart {}\n", start_time(me).unwrap_or_default());
        let socket = root.join("sock");
        let log = root.join("server.log");
        with_active(|a| {
            *a = Some(Active {
                root: root.clone(),
                log: log.clone(),
                logs_dir: dir.join("logs"),
                id: id.to_string(),
                postmaster: None,
                json,
            })
        });
        let sc = Scratch {
            id: id.to_string(),
            data: root.join("data"),
            socket: socket.clone(),
            log,
            port: 0,
            logs_dir: dir.join("logs"),
            bin_dir: None,
            child: None,
            superuser: None,
            candidates: {
                let mut c = vec![cfg.pg.user.clone(), os_user()];
                c.push("postgres".into());
                c.dedup();
                c
            },
            shared_buffers: cfg.restore_test.shared_buffers.clone(),
            pg_major: 0,
            finished: false,
            root,
        };
        fs::write(sc.root.join("owner"), owner)
            .map_err(|e| Error::io(format!("write {}", sc.root.join("owner").display()), e))?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&socket)
            .map_err(|e| Error::io(format!("create {}", socket.display()), e))?;
        Ok(sc)
    }

    /// Restores `backup` (planned by `plan`) into the data directory, set
    /// up to recover to `target` and promote; tablespaces go inside the
    /// scratch directory, never to their production locations. With
    /// `db_include`, only those databases (and the system ones).
    /// Reads only repository `repo` (see `plan`).
    pub fn restore(
        &mut self,
        cfg: &Config,
        repo: &str,
        plan: &restore::Plan,
        target: &Target,
        db_include: &[String],
        json: bool,
    ) -> Result<Restored> {
        // Fail in a second rather than after filling the disk.
        if let Some(free) = free_bytes(&self.root) {
            if free < plan.backup.size {
                return Err(Error::Invalid(format!(
                    "the scratch directory {} has {} free, backup {} needs {} (and room for WAL); free space or choose another [restore_test] scratch_dir",
                    self.root.display(),
                    crate::commands::info::human(free),
                    plan.backup.id,
                    crate::commands::info::human(plan.backup.size)
                )));
            }
        }
        let tablespace_map = plan
            .backup
            .tablespaces
            .iter()
            .map(|t| (t.oid, self.root.join("ts").join(t.oid.to_string())))
            .collect();
        restore::run(
            cfg,
            &restore::Args {
                target_dir: self.data.clone(),
                backup: Some(plan.backup.id.clone()),
                target: target.clone(),
                action: "promote".into(),
                jobs: cfg.threads() + 1,
                delta: false,
                tablespace_map,
                json,
                repo: Some(repo.to_string()),
                db_include: db_include.to_vec(),
                record: false,
            },
        )
    }

    /// Chooses PostgreSQL's program directory for the backup's major version.
    pub fn set_bin_dir(&mut self, cfg: &Config, pg_major: u32) {
        self.pg_major = pg_major;
        let configured = &cfg.restore_test.pg_bin_dir;
        self.bin_dir = if !configured.as_os_str().is_empty() {
            Some(configured.clone())
        } else {
            let d = PathBuf::from(format!("/usr/lib/postgresql/{pg_major}/bin"));
            d.join("postgres").exists().then_some(d)
        };
    }

    /// A command for one of PostgreSQL's programs, dying with walshipper.
    pub fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(match &self.bin_dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        });
        c.env("LC_ALL", "C").env_remove("PGOPTIONS");
        die_with_parent(&mut c, libc::SIGTERM);
        c
    }

    /// Runs a tool; (success, its output and errors).
    pub fn run_tool(&self, mut cmd: Command) -> (bool, String) {
        cmd.stdin(Stdio::null());
        match cmd.output() {
            Ok(out) => {
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                (out.status.success(), text)
            }
            Err(e) => (
                false,
                format!(
                    "cannot run {:?}: {e} (set [restore_test] pg_bin_dir)",
                    cmd.get_program()
                ),
            ),
        }
    }

    /// pg_verifybackup of the restored files against the backup_manifest
    /// restore wrote (before the server changes them; -n: pg_wal is empty,
    /// the WAL is checked by replaying it).
    pub fn verify_backup(&self) -> CheckResult {
        timed_check("pg_verifybackup".into(), || {
            let mut c = self.tool("pg_verifybackup");
            c.arg("-n").arg(&self.data);
            self.run_tool(c)
        })
    }

    /// Settings from the control file that recovery needs at least.
    fn control_minimums(&self) -> Vec<(String, String)> {
        let mut c = self.tool("pg_controldata");
        c.arg(&self.data);
        let (ok, out) = self.run_tool(c);
        let mut v = Vec::new();
        if !ok {
            return v;
        }
        for (field, guc) in [
            ("max_prepared_xacts setting:", "max_prepared_transactions"),
            ("max_locks_per_xact setting:", "max_locks_per_transaction"),
        ] {
            if let Some(n) = out
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|n| n.trim().parse::<u32>().ok())
                .filter(|n| *n <= 100_000)
            {
                v.push((guc.to_string(), n.to_string()));
            }
        }
        v
    }

    /// The settings the scratch server runs with, overriding whatever the
    /// restored configuration says (the command line wins over files).
    fn server_settings(&self) -> Vec<(String, String)> {
        let s = |k: &str, v: &str| (k.to_string(), v.to_string());
        let path = |p: &Path| p.display().to_string();
        let mut v = vec![
            // Our own (empty) postgresql.conf and a local-trust-only hba:
            // a Debian data directory has no postgresql.conf, and
            // production's may include files that are not here.
            s("config_file", &path(&self.root.join("postgresql.conf"))),
            // As -D says, whatever a restored file might say.
            s("data_directory", &path(&self.data)),
            s("hba_file", &path(&self.root.join("pg_hba.conf"))),
            s("ident_file", &path(&self.root.join("pg_ident.conf"))),
            s("external_pid_file", ""),
            // Reachable only through a socket in a 0700 directory.
            s("listen_addresses", ""),
            s("port", &self.port.to_string()),
            s(
                "unix_socket_directories",
                &format!("\"{}\"", path(&self.socket)),
            ),
            s("unix_socket_permissions", "0700"),
            s("unix_socket_group", ""),
            s("ssl", "off"),
            // Never archive into the repository, never stream or sync
            // with anyone, never run production's recovery hooks.
            s("archive_mode", "off"),
            s("archive_command", ""),
            s("archive_cleanup_command", ""),
            s("recovery_end_command", ""),
            s("primary_conninfo", ""),
            s("primary_slot_name", ""),
            s("synchronous_standby_names", ""),
            s("synchronous_commit", "off"),
            // A copy of production's subscriptions would fetch from
            // production's publishers once promoted (and advance their
            // slots): no apply or table sync workers at all.
            s("max_logical_replication_workers", "0"),
            s("max_sync_workers_per_subscription", "0"),
            // No pg_backup_ext scheduler (it would take backups), no
            // pg_cron, no other library of production's.
            s("shared_preload_libraries", ""),
            s("session_preload_libraries", ""),
            s("local_preload_libraries", ""),
            // No connections during recovery: then recovery does not
            // require max_connections, max_worker_processes,
            // max_wal_senders, max_prepared_transactions and
            // max_locks_per_transaction to be at least the primary's
            // (PostgreSQL checks them only with hot_standby on), so the
            // scratch server stays small whatever production runs with.
            // We wait for the promotion instead.
            s("hot_standby", "off"),
            s("max_connections", "20"),
            s("superuser_reserved_connections", "3"),
            s("shared_buffers", &self.shared_buffers),
            s("huge_pages", "try"),
            s("max_wal_size", "1GB"),
            s("min_wal_size", "80MB"),
            s("max_parallel_workers_per_gather", "0"),
            s("autovacuum", "off"),
            s("jit", "off"),
            // A throwaway copy: no fsync load on production's disks.
            s("fsync", "off"),
            s("full_page_writes", "off"),
            // The log goes to our file (stderr), in English: the restore
            // point check reads it.
            s("logging_collector", "off"),
            s("log_destination", "stderr"),
            s("log_line_prefix", "%m [%p] "),
            s("lc_messages", "C"),
            s("log_min_messages", "warning"),
            s("log_checkpoints", "off"),
            s("log_connections", "off"),
            s("log_disconnections", "off"),
            s("log_statement", "none"),
            s("log_min_duration_statement", "-1"),
            s("TimeZone", "UTC"),
            s("log_timezone", "UTC"),
            s("cluster_name", "walshipper-scratch"),
        ];
        if self.pg_major >= 15 {
            // Archive modules (PostgreSQL 15 on) archive without a command.
            v.push(s("archive_library", ""));
        }
        // Prepared transactions in the backup are recovered at the end of
        // recovery: as many slots and locks as the primary had.
        v.extend(self.control_minimums());
        v
    }

    /// Starts PostgreSQL on the restored directory, as a direct child in a
    /// process group of its own (a Ctrl-C reaches walshipper, which then
    /// stops it) that dies with walshipper (PR_SET_PDEATHSIG).
    pub fn start(&mut self) -> Result<()> {
        self.port = free_port();
        let io = |what: &Path, e| Error::io(format!("write {}", what.display()), e);
        let conf = self.root.join("postgresql.conf");
        fs::write(
            &conf,
            "# walshipper scratch cluster: every setting is given on the command line\n",
        )
        .map_err(|e| io(&conf, e))?;
        let hba = self.root.join("pg_hba.conf");
        // Local connections only, through a socket in a 0700 directory.
        fs::write(&hba, "local all all trust\n").map_err(|e| io(&hba, e))?;
        let ident = self.root.join("pg_ident.conf");
        fs::write(&ident, "").map_err(|e| io(&ident, e))?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.log)
            .map_err(|e| io(&self.log, e))?;
        let log2 = log.try_clone().map_err(|e| io(&self.log, e))?;
        let mut cmd = self.tool("postgres");
        cmd.arg("-D").arg(&self.data);
        for (k, v) in self.server_settings() {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        // The tool() death signal is replaced: SIGQUIT is PostgreSQL's
        // immediate shutdown, which also stops its children.
        die_with_parent(&mut cmd, libc::SIGQUIT);
        // SAFETY: setpgid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            Error::io(
                format!(
                    "start {:?} (set [restore_test] pg_bin_dir to PostgreSQL's bin directory)",
                    cmd.get_program()
                ),
                e,
            )
        })?;
        let pid = child.id() as i32;
        self.child = Some(child);
        with_active(|a| {
            if let Some(a) = a {
                a.postmaster = Some(pid);
            }
        });
        Ok(())
    }

    /// Waits until recovery ended and the cluster accepts connections
    /// (promoted); fails with the log's last lines if the server stops.
    pub fn wait_open(&mut self) -> Result<()> {
        let mut wait = Duration::from_millis(50);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(Error::VerifyFailed(format!(
                        "the scratch server stopped during recovery ({status}); its log ends with:\n{}",
                        self.log_tail(15)
                    )));
                }
            }
            match self.try_open()? {
                true => return Ok(()),
                false => std::thread::sleep(wait),
            }
            wait = (wait * 2).min(Duration::from_millis(500));
        }
    }

    /// One attempt to connect and find the server out of recovery.
    fn try_open(&mut self) -> Result<bool> {
        let mut missing = 0;
        for user in self.candidates.clone() {
            match self.connect_as("postgres", &user).or_else(|e| {
                // The maintenance database may be gone; template1 is not.
                match &e {
                    Error::Postgres { source, .. }
                        if source.code()
                            == Some(&postgres::error::SqlState::INVALID_CATALOG_NAME) =>
                    {
                        self.connect_as("template1", &user)
                    }
                    _ => Err(e),
                }
            }) {
                Ok(mut c) => {
                    let row = c
                        .query_one(
                            "SELECT pg_is_in_recovery(), (SELECT rolname::text FROM pg_authid WHERE oid = 10)",
                            &[],
                        )
                        .map_err(crate::pg::pg_err("query the scratch server"))?;
                    let recovering: bool = row.get(0);
                    self.superuser = row.get(1);
                    return Ok(!recovering);
                }
                Err(Error::Postgres { source, .. })
                    if source.code()
                        == Some(
                            &postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                        ) =>
                {
                    missing += 1;
                }
                Err(_) => return Ok(false),
            }
        }
        if missing == self.candidates.len() {
            return Err(Error::Invalid(format!(
                "none of the roles {} exists in the restored cluster to connect as; set [pg] user to its superuser",
                self.candidates.join(", ")
            )));
        }
        Ok(false)
    }

    /// A connection to database `db` of the scratch server as `user`.
    pub fn connect_as(&self, db: &str, user: &str) -> Result<postgres::Client> {
        let mut c = postgres::Config::new();
        c.host_path(&self.socket)
            .port(self.port)
            .user(user)
            .dbname(db)
            .application_name("walshipper")
            .connect_timeout(Duration::from_secs(10));
        c.connect(postgres::NoTls).map_err(|e| Error::Postgres {
            context: format!("connect to database {db} of the scratch server as {user}"),
            source: e,
        })
    }

    /// A connection as the restored cluster's superuser.
    pub fn connect(&self, db: &str) -> Result<postgres::Client> {
        let user = self.superuser.clone().unwrap_or_else(|| "postgres".into());
        self.connect_as(db, &user)
    }

    /// A libpq connection string for a tool, to database `db`.
    pub fn conninfo(&self, db: &str, user: Option<&str>) -> String {
        let su = self.superuser.clone().unwrap_or_else(|| "postgres".into());
        sql::conninfo(&[
            ("host", &self.socket.display().to_string()),
            ("port", &self.port.to_string()),
            ("user", user.unwrap_or(&su)),
            ("dbname", db),
            ("application_name", "walshipper"),
        ])
    }

    /// Where replay ended: the last replayed record's end LSN and the commit
    /// time of the last transaction replayed (RFC 3339, UTC).
    pub fn replay_position(&self) -> Result<(Option<String>, Option<String>)> {
        let mut c = self
            .connect("postgres")
            .or_else(|_| self.connect("template1"))?;
        let sql = "SELECT pg_last_wal_replay_lsn()::text, \
                   to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";
        let row = c.query_one(sql, &[]).map_err(crate::pg::pg_err(sql))?;
        Ok((row.get(0), row.get(1)))
    }

    /// The databases that take connections.
    pub fn databases(&self) -> Result<Vec<String>> {
        let mut c = self
            .connect("postgres")
            .or_else(|_| self.connect("template1"))?;
        let sql = "SELECT datname::text FROM pg_database WHERE datallowconn ORDER BY 1";
        Ok(c.query(sql, &[])
            .map_err(crate::pg::pg_err(sql))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of the server log, without the refusals of
    /// walshipper's own connection attempts while it waited.
    pub fn log_tail(&self, n: usize) -> String {
        const WAITING: &[&str] = &[
            "the database system is not accepting connections",
            "the database system is starting up",
            "the database system is not yet accepting connections",
            "Hot standby mode is disabled",
            "Consistent recovery state has not been yet reached",
        ];
        let text = self.log_text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !WAITING.iter().any(|w| l.contains(w)))
            .collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops the server, keeps its log if `keep_log` (returns where), and
    /// removes the scratch directory.
    pub fn finish(mut self, keep_log: bool) -> Option<PathBuf> {
        self.cleanup(keep_log)
    }

    fn cleanup(&mut self, keep: bool) -> Option<PathBuf> {
        if self.finished {
            return None;
        }
        self.finished = true;
        let mut kept = None;
        with_active(|a| {
            // Under the lock: the signal thread does not clean up twice.
            *a = None;
            if let Some(mut c) = self.child.take() {
                stop_pid(c.id() as i32);
                let _ = c.try_wait();
            }
            if keep {
                kept = keep_log(&self.log, &self.logs_dir, &self.id);
            }
            remove_tree(&self.root);
        });
        kept
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.cleanup(false);
    }
}

/// Makes `cmd`'s process receive `sig` when walshipper dies (also by
/// SIGKILL), so that no scratch server or tool outlives it. Must be spawned
/// from a thread that lives as long as the process (the main thread): the
/// signal follows the death of the thread that forked.
pub fn die_with_parent(cmd: &mut Command, sig: libc::c_int) {
    // SAFETY: getpid before fork; prctl, getppid and _exit are
    // async-signal-safe.
    let parent = unsafe { libc::getpid() };
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // walshipper died between fork and prctl: do not run at all.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Bytes an unprivileged user may still write on the file system of `p`.
fn free_bytes(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs with a NUL-terminated path and a zeroed out struct.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
}

/// The operating system user walshipper runs as (initdb's default name for
/// the bootstrap superuser).
fn os_user() -> String {
    // SAFETY: getpwuid returns NULL or a pointer to a static entry, read at once.
    unsafe {
        let pw = libc::getpwuid(libc::getuid());
        if pw.is_null() || (*pw).pw_name.is_null() {
            return "postgres".into();
        }
        std::ffi::CStr::from_ptr((*pw).pw_name)
            .to_string_lossy()
            .into_owned()
    }
}

/// A TCP port nothing listens on now. The server listens only on its
/// private socket (listen_addresses = ''), where the port merely names the
/// socket file; a free one keeps that name unlike anything else's.
fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .ok()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.port())
        .unwrap_or(54329)
}

/// Prints a `phase` event (with --json) or a line on stderr.
pub fn phase(json: bool, operation: &str, phase: &str, started: Instant) {
    let elapsed_s = started.elapsed().as_secs_f64();
    if json {
        crate::progress::event(&pg_backup_contract::Event::Phase(
            pg_backup_contract::PhaseEvent {
                operation: operation.into(),
                phase: phase.into(),
                elapsed_s,
            },
        ));
    } else {
        tracing::info!("{operation}: {phase} ({elapsed_s:.1}s)");
    }
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_files_and_stat_lines_parse() {
        assert_eq!(parse_owner("pid 12\nstart 345\n"), Some((12, 345)));
        assert_eq!(parse_owner("pid 12\n"), None);
        let stat = "77 (a) b) c) S 1 77 77 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 999 0";
        assert_eq!(stat_fields(stat)[0], "S");
        assert_eq!(stat_fields(stat)[19], "999");
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert!(alive(me as i32));
    }

    #[test]
    fn a_stale_directory_is_swept_and_a_live_one_kept() {
        let d = tempfile::tempdir().unwrap();
        let stale = d.path().join("20260101T000000Z-00000000");
        fs::create_dir(&stale).unwrap();
        // A pid that exists (ours) with another start time: a reused pid.
        fs::write(
            stale.join("owner"),
            format!("pid {}\nstart 1\n", std::process::id()),
        )
        .unwrap();
        let live = d.path().join("20260101T000001Z-00000000");
        fs::create_dir(&live).unwrap();
        let me = std::process::id();
        fs::write(
            live.join("owner"),
            format!("pid {me}\nstart {}\n", start_time(me).unwrap()),
        )
        .unwrap();
        fs::create_dir(d.path().join("logs")).unwrap();
        // Not named like ours, with a dead owner: never touched.
        let foreign = d.path().join("someone-elses");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("owner"), "pid 1\nstart 1\n").unwrap();
        sweep(d.path());
        assert!(!stale.exists());
        assert!(live.exists());
        assert!(d.path().join("logs").exists());
        assert!(foreign.exists());
    }

    #[test]
    fn a_symlinked_scratch_dir_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        fs::DirBuilder::new().mode(0o700).create(&real).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let cfg = Config::default();
        let id = "20260101T000000Z-00000000";
        let err = Scratch::create(&cfg, Some(&link), id, false)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(!real.join(id).exists());
        // The real directory itself is fine.
        let sc = Scratch::create(&cfg, Some(&real), id, false).unwrap();
        assert!(sc.root.is_dir());
        drop(sc);
        assert!(!real.join(id).exists());
    }

    #[test]
    fn long_details_keep_both_ends() {
        let s = format!("{}{}", "a".repeat(3000), "end");
        let short = shorten(&s);
        assert!(short.len() < 2100 && short.ends_with("end"));
    }
}
