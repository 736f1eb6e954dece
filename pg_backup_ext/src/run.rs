//! walshipper as a child process, spawned with an argument vector (no
//! shell), its output read by plain threads (which never touch PostgreSQL),
//! its end classified: a backup run (used by the scheduler and by
//! backup_run(wait => true)), verifications and recoveries (Task), and the
//! short commands the scheduler runs in the background (info, expire).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pg_backup_contract::Event;

/// `exe` as a child that dies with this worker: PR_SET_PDEATHSIG sends it
/// SIGTERM (walshipper cleans up on it) when the thread that spawned it
/// exits, so a crashed scheduler or waited worker never leaves a restore
/// test running unsupervised (racing expire and the next test). That is
/// why it must be spawned on the worker's main thread, which lives as long
/// as the process: refused from any other.
fn walshipper_command(exe: &str) -> Result<Command, String> {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid and gettid only return ids.
    let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
    if pid != tid {
        return Err("walshipper must be started from the worker's main thread".into());
    }
    let mut cmd = Command::new(exe);
    // SAFETY: runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: prctl, getppid, close_range,
    // getrlimit and fcntl are, and nothing is allocated. If the worker died before prctl took effect
    // (the parent is no longer `pid`), the child gives up at once.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != pid {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            // The backend's descriptors (relation files, WAL segments,
            // pipes) are not close-on-exec: a child living for weeks (the
            // WAL receiver) would keep dropped relations' space. Marked
            // close-on-exec, not closed, so that the standard library's
            // exec-error pipe still reports a failed exec. Before Linux
            // 5.11 (no CLOSE_RANGE_CLOEXEC) each is marked in turn.
            if libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                    lim.rlim_cur.min(65_536) as libc::c_int
                } else {
                    4096
                };
                for fd in 3..top {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                    }
                }
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// `exe --config config args...` started with stdin closed and its output
/// piped to the caller: every walshipper run of the extension.
fn spawn_walshipper<S: AsRef<std::ffi::OsStr>>(
    exe: &str,
    config: &str,
    args: &[S],
) -> Result<Child, String> {
    walshipper_command(exe)?
        .args(["--config", config])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot run walshipper at {exe}: {e} (check pg_backup.walshipper_path)")
        })
}

/// The last lines a long-running child wrote to stderr.
pub type Tail = Arc<Mutex<std::collections::VecDeque<String>>>;

/// `exe --config config wal-receive` with the slot in the environment
/// (WALSHIPPER_STREAM_SLOT, which overrides the file's `[stream] slot`),
/// the streaming WAL receiver (src/stream.rs): stdout discarded, the last lines of its
/// stderr (its log) kept for the reason of an exit. It runs for days, so
/// nothing it writes accumulates.
pub fn spawn_receiver(exe: &str, config: &str, slot: &str) -> Result<(Child, Tail), String> {
    let mut child = walshipper_command(exe)?
        .args(["--config", config, "wal-receive"])
        .env("WALSHIPPER_STREAM_SLOT", slot)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot run walshipper at {exe}: {e} (check pg_backup.walshipper_path)")
        })?;
    let tail: Tail = Arc::default();
    let t = tail.clone();
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Ok(mut t) = t.lock() {
                    if t.len() == 20 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
        });
    }
    Ok((child, tail))
}

pub struct Run {
    pub execution_id: i64,
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    pub started: Instant,
    pub bytes_done: i64,
    pub bytes_total: i64,
    pub done_event: Option<pg_backup_contract::BackupDone>,
    /// walshipper's error event, if it printed one.
    pub error_event: Option<pg_backup_contract::ErrorEvent>,
}

pub enum Outcome {
    Succeeded(serde_json::Value),
    /// The reason, and walshipper's hint when its error event gave one.
    Failed(String, Option<String>),
}

impl Outcome {
    pub fn failed(reason: impl Into<String>) -> Outcome {
        Outcome::Failed(reason.into(), None)
    }
}

/// `walshipper --config CONFIG [--repo REPO] backup --json --type KIND`.
pub fn spawn(
    exe: &str,
    config: &str,
    repo: Option<&str>,
    execution_id: i64,
    kind: &str,
) -> Result<Run, String> {
    let mut args = Vec::new();
    if let Some(r) = repo {
        args.extend(["--repo", r]);
    }
    args.extend(["backup", "--json", "--type", kind]);
    let mut child = spawn_walshipper(exe, config, &args)?;
    let (lines, stderr) = readers(&mut child);
    Ok(Run {
        execution_id,
        child,
        lines,
        stderr,
        started: Instant::now(),
        bytes_done: 0,
        bytes_total: 0,
        done_event: None,
        error_event: None,
    })
}

impl Run {
    /// Reads what walshipper printed so far; Some when it has exited.
    pub fn poll(&mut self) -> Option<Outcome> {
        while let Ok(line) = self.lines.try_recv() {
            self.read_line(&line);
        }
        let status = match self.child.try_wait() {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => return Some(Outcome::failed(format!("cannot wait for walshipper: {e}"))),
        };
        // Let the reader threads drain what is left.
        std::thread::sleep(std::time::Duration::from_millis(50));
        while let Ok(line) = self.lines.try_recv() {
            self.read_line(&line);
        }
        let (reason, hint) = reason_and_hint(&self.stderr, self.error_event.take());
        Some(match (status.success(), self.done_event.take()) {
            (true, Some(done)) => {
                Outcome::Succeeded(serde_json::to_value(done).unwrap_or_default())
            }
            (true, None) => {
                Outcome::failed("walshipper exited without reporting a finished backup")
            }
            (false, _) => Outcome::Failed(
                match status.code() {
                    Some(c) if !reason.is_empty() => format!("{reason} (exit {c})"),
                    Some(c) => format!("walshipper exited with status {c}"),
                    None => "walshipper was killed by a signal".into(),
                },
                hint,
            ),
        })
    }

    /// One line of walshipper's stdout, read as the contract's events
    /// (docs/contract.md); anything else is not for us.
    fn read_line(&mut self, line: &str) {
        match Event::parse(line) {
            Some(Event::Progress(p)) => {
                self.bytes_done = i64::try_from(p.bytes_done).unwrap_or(i64::MAX);
                self.bytes_total = i64::try_from(p.bytes_total).unwrap_or(i64::MAX);
            }
            Some(Event::Done(d)) => self.done_event = Some(d),
            Some(Event::Error(e)) => self.error_event = Some(e),
            _ => {}
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A short walshipper command run in the background (`info --json` for
/// backup.repositories, `expire --json` after backups): its stdout collected
/// whole, the reason of a failure taken from its stderr. Never blocks.
pub struct Probe {
    child: Child,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
    exited: Option<(ExitStatus, Instant)>,
    pub started: Instant,
}

/// How a probe ended.
pub enum ProbeEnd {
    /// Exit 0, with what it printed on stdout.
    Succeeded(String),
    /// A non-zero exit (`code` None: killed by a signal), walshipper's
    /// one-line reason, if it gave one, and what it printed on stdout (an
    /// expire of every repository reports those that worked).
    Failed {
        code: Option<i32>,
        reason: String,
        stdout: String,
    },
}

impl ProbeEnd {
    /// The failure as one line for a DBA: the reason and the exit status.
    pub fn describe(code: Option<i32>, reason: &str, what: &str) -> String {
        match (code, reason.is_empty()) {
            (Some(c), false) => format!("{reason} (exit {c})"),
            (Some(c), true) => format!("{what} exited with status {c}"),
            (None, false) => reason.to_string(),
            (None, true) => format!("{what} was killed by a signal"),
        }
    }
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> Option<JoinHandle<String>> {
    let mut r = r?;
    Some(std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    }))
}

/// What a reader thread collected, once it is done (never waits for it).
fn collected(h: &mut Option<JoinHandle<String>>) -> String {
    match h.take() {
        Some(h) if h.is_finished() => h.join().unwrap_or_default(),
        _ => String::new(),
    }
}

/// Why a walshipper run failed, in its own words: its error event's
/// message and hint, else the reason on its stderr.
fn reason_and_hint(
    stderr: &Mutex<String>,
    event: Option<pg_backup_contract::ErrorEvent>,
) -> (String, Option<String>) {
    let reason = event
        .as_ref()
        .map(|e| clean(&e.message))
        .unwrap_or_else(|| failure_reason(&stderr.lock().map(|s| s.clone()).unwrap_or_default()));
    (reason, event.and_then(|e| e.hint).map(|h| clean(&h)))
}

/// walshipper's reason for failing: its last `walshipper: ...` line on
/// stderr, or else the last line.
pub fn failure_reason(stderr: &str) -> String {
    clean(
        stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("walshipper:"))
            .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
            .unwrap_or("")
            .trim_start_matches("walshipper:")
            .trim(),
    )
}

/// Text from walshipper (which may repeat repository content) as it goes
/// into the catalog, alerts, SQL errors and the server log: one line, no
/// control characters, at most 2000 characters.
pub fn clean(s: &str) -> String {
    s.chars()
        .take(2000)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Probe {
    /// Runs `exe --config config args...`.
    pub fn spawn(exe: &str, config: &str, args: &[&str]) -> Result<Probe, String> {
        let mut child = spawn_walshipper(exe, config, args)?;
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        Ok(Probe {
            child,
            out,
            err,
            exited: None,
            started: Instant::now(),
        })
    }

    /// Some once it has exited and its output is read.
    pub fn poll(&mut self) -> Option<ProbeEnd> {
        let (status, at) = match self.exited {
            Some(e) => e,
            None => match self.child.try_wait() {
                Ok(Some(s)) => *self.exited.insert((s, Instant::now())),
                Ok(None) => return None,
                Err(e) => {
                    return Some(ProbeEnd::Failed {
                        code: None,
                        reason: format!("cannot wait for walshipper: {e}"),
                        stdout: String::new(),
                    })
                }
            },
        };
        // The readers end when the pipes close, just after the exit; give
        // them a few seconds (a child of walshipper's could hold a pipe open).
        let drained = [&self.out, &self.err]
            .iter()
            .all(|h| h.as_ref().is_none_or(|h| h.is_finished()));
        if !drained && at.elapsed() < Duration::from_secs(5) {
            return None;
        }
        let out = collected(&mut self.out);
        let err = collected(&mut self.err);
        Some(if status.success() {
            ProbeEnd::Succeeded(out)
        } else {
            // Its (last) error event's message when it printed one (--json).
            let event = out.lines().rev().find_map(|l| match Event::parse(l) {
                Some(Event::Error(e)) => Some(e),
                _ => None,
            });
            ProbeEnd::Failed {
                code: status.code(),
                reason: event
                    .map(|e| clean(&e.message))
                    .unwrap_or_else(|| failure_reason(&err)),
                stdout: out,
            }
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A verification or recovery: `walshipper --config CONFIG ARGS...` (a
/// `verify`, `restore-test` or `table-restore` with `--json`, its argument
/// vector built by backup._recovery_args()), followed through its events:
/// phases and progress while it runs, then its result event, error event
/// and exit code. Stopped with SIGTERM, so that walshipper stops its
/// scratch cluster and removes its scratch directory; SIGKILL only if it
/// has not exited a minute later.
pub struct Task {
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    pub started: Instant,
    pub phase: Option<String>,
    pub bytes_done: i64,
    pub bytes_total: i64,
    /// The `verify`, `restore_test` or `table_restore` event, as printed.
    result: Option<serde_json::Value>,
    error_event: Option<pg_backup_contract::ErrorEvent>,
    /// When it was asked to stop, and why (the outcome to record).
    stopping: Option<(Instant, String, &'static str)>,
}

/// How a task ended.
pub struct TaskEnd {
    /// The result event, when walshipper printed one.
    pub result: Option<serde_json::Value>,
    /// The exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// walshipper's reason (error event, else stderr), with the exit status.
    pub error: Option<String>,
    pub hint: Option<String>,
    /// The outcome forced by a stop: `cancelled`, `failed` (timed out) or
    /// `interrupted` (the server shut down).
    pub forced: Option<&'static str>,
}

/// How long a stopped task may take to clean up before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(60);

impl Task {
    pub fn spawn(exe: &str, config: &str, args: &[String]) -> Result<Task, String> {
        let mut child = spawn_walshipper(exe, config, args)?;
        let (lines, stderr) = readers(&mut child);
        Ok(Task {
            child,
            lines,
            stderr,
            started: Instant::now(),
            phase: None,
            bytes_done: 0,
            bytes_total: 0,
            result: None,
            error_event: None,
            stopping: None,
        })
    }

    fn read_line(&mut self, line: &str) {
        match Event::parse(line) {
            Some(Event::Phase(p)) => self.phase = Some(clean(&p.phase)),
            Some(Event::Progress(p)) => {
                self.bytes_done = i64::try_from(p.bytes_done).unwrap_or(i64::MAX);
                self.bytes_total = i64::try_from(p.bytes_total).unwrap_or(i64::MAX);
            }
            Some(e @ (Event::Verify(_) | Event::RestoreTest(_) | Event::TableRestore(_))) => {
                self.result = serde_json::to_value(e).ok()
            }
            Some(Event::Error(e)) => self.error_event = Some(e),
            _ => {}
        }
    }

    /// Asks walshipper to stop (SIGTERM), recording `why` and the outcome
    /// (`cancelled` or `failed`); poll() reports the end once it exited.
    pub fn stop(&mut self, why: impl Into<String>, outcome: &'static str) {
        if self.stopping.is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signalling our own child, which has not been reaped
            // (try_wait has not returned its status), so the pid is its.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        self.stopping = Some((Instant::now(), why.into(), outcome));
    }

    pub fn stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// Reads what walshipper printed so far; Some when it has exited.
    pub fn poll(&mut self) -> Option<TaskEnd> {
        while let Ok(line) = self.lines.try_recv() {
            self.read_line(&line);
        }
        let status = match self.child.try_wait() {
            Ok(Some(s)) => s,
            Ok(None) => {
                if let Some((since, _, _)) = &self.stopping {
                    if since.elapsed() > STOP_GRACE {
                        let _ = self.child.kill();
                    }
                }
                return None;
            }
            Err(e) => {
                return Some(TaskEnd {
                    result: None,
                    code: None,
                    error: Some(format!("cannot wait for walshipper: {e}")),
                    hint: None,
                    forced: Some("failed"),
                })
            }
        };
        std::thread::sleep(Duration::from_millis(50));
        while let Ok(line) = self.lines.try_recv() {
            self.read_line(&line);
        }
        let (reason, hint) = reason_and_hint(&self.stderr, self.error_event.take());
        let (error, forced) = match self.stopping.take() {
            Some((_, why, outcome)) => (Some(why), Some(outcome)),
            None if status.success() => (None, None),
            None => (
                Some(match status.code() {
                    Some(c) if !reason.is_empty() => format!("{reason} (exit {c})"),
                    Some(c) => format!("walshipper exited with status {c}"),
                    None => "walshipper was killed by a signal".into(),
                }),
                None,
            ),
        };
        Some(TaskEnd {
            result: self.result.take(),
            code: status.code(),
            error,
            hint,
            forced,
        })
    }

    /// Stops it and waits for it (the scheduler is shutting down).
    pub fn stop_and_wait(&mut self) {
        self.stop(
            "interrupted: the server shut down during the run",
            "interrupted",
        );
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Threads reading a child's stdout (line by line, into a channel) and
/// stderr (whole); they never touch PostgreSQL.
fn readers(child: &mut Child) -> (Receiver<String>, Arc<Mutex<String>>) {
    let (tx, lines) = channel();
    let stdout = child.stdout.take();
    std::thread::spawn(move || {
        if let Some(out) = stdout {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let err_buf = stderr.clone();
    let child_err = child.stderr.take();
    std::thread::spawn(move || {
        if let Some(mut e) = child_err {
            let mut s = String::new();
            let _ = e.read_to_string(&mut s);
            if let Ok(mut b) = err_buf.lock() {
                *b = s;
            }
        }
    });
    (lines, stderr)
}

impl TaskEnd {
    /// A task that could not run (or be followed): `reason`.
    pub fn failed(reason: impl Into<String>) -> TaskEnd {
        TaskEnd {
            result: None,
            code: None,
            error: Some(reason.into()),
            hint: None,
            forced: Some("failed"),
        }
    }
}
