//! The scheduler: a background worker that wakes every second, queues due
//! jobs, starts queued runs (up to pg_backup.max_concurrent), follows their
//! progress, enforces the timeout, honours cancellation, records outcomes,
//! runs walshipper expire on every repository after successful backups,
//! keeps the streaming WAL receiver running (src/stream.rs), and raises
//! archiving, RPO and worker_error alerts. Catalog work is in SQL
//! (sql/scheduler.sql and sql/retention.sql, backup._sched_*); this loop
//! only drives it.
//!
//! Both workers connect as the bootstrap superuser and first pin their
//! search_path to pg_catalog, pg_temp: nothing another role creates in a
//! schema of the default path can stand in for what their queries name.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;

use crate::run::{self, Outcome, Probe, ProbeEnd, Run, Task, TaskEnd};
use crate::settings;

/// Run once per connection, before any other query: the search path, and
/// settings a database's defaults could otherwise impose on the workers
/// (read-only transactions, a statement timeout that stops every cycle).
/// A lock wait is bounded: an operator's transaction left open on a row the
/// scheduler needs makes it fail (and restart, with a worker_error alert)
/// instead of hanging. Commits are local (synchronous_commit = local): with
/// the WAL receiver named in synchronous_standby_names, a commit of the
/// scheduler's would otherwise wait for the receiver that only the
/// scheduler restarts (a deadlock that also blocked a fast shutdown); its
/// catalog rows need no standby's acknowledgement. False when the session
/// could not be set up.
fn pin_session() -> bool {
    BackgroundWorker::transaction(|| {
        match Spi::run(
            "SET search_path TO pg_catalog, pg_temp; SET lock_timeout = '10s'; \
             SET statement_timeout = 0; SET default_transaction_read_only = off; \
             SET synchronous_commit = local",
        ) {
            Ok(()) => true,
            Err(e) => {
                log!("pg_backup: cannot set up the session (search_path): {e}; stopping");
                false
            }
        }
    })
}

/// Failures of this cycle, for the worker_error alert.
static CYCLE_ERRORS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Logs a failure of the scheduler itself and remembers it for the alert.
fn worker_error(msg: String) {
    log!("pg_backup scheduler: {msg}");
    if let Ok(mut v) = CYCLE_ERRORS.lock() {
        v.push(msg);
    }
}

/// The extension is installed here, in schema backup: only then are the
/// backup.* functions the scheduler calls its own (a look-alike schema
/// another role created is never called).
fn catalog_ready() -> bool {
    Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace \
                         WHERE e.extname = 'pg_backup_ext' AND n.nspname = 'backup')",
    )
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn finish(id: i64, outcome: Outcome) {
    let (status, summary, error, hint) = match outcome {
        Outcome::Succeeded(v) => ("succeeded", Some(v.to_string()), None, None),
        Outcome::Failed(e, _) if e == "cancelled" => (
            "cancelled",
            None,
            Some("cancelled by backup_cancel()".to_string()),
            None,
        ),
        Outcome::Failed(e, hint) => ("failed", None, Some(e), hint),
    };
    let r = Spi::run_with_args(
        "SELECT backup._sched_finish($1, $2, $3::jsonb, $4, $5, $6, $7, $8)",
        &[
            id.into(),
            status.to_string().into(),
            summary.into(),
            error.into(),
            settings::RETRY_MAX.get().into(),
            settings::RETRY_DELAY.get().into(),
            hint.into(),
            settings::VERIFY_AFTER_BACKUP.get().into(),
        ],
    );
    if let Err(e) = r {
        worker_error(format!("cannot record the end of run {id}: {e}"));
    }
}

/// The background refresh of backup.repositories.
#[derive(Default)]
struct RepoStatus {
    probe: Option<Probe>,
    last: Option<std::time::Instant>,
    /// When objects were last counted per key (`--key-usage`); None: count
    /// at the next refresh (at start, and after a key operation).
    usage_last: Option<std::time::Instant>,
}

impl RepoStatus {
    fn tick(&mut self) {
        if let Some(p) = &mut self.probe {
            let result = match p.poll() {
                Some(ProbeEnd::Succeeded(json)) => Ok(json),
                Some(ProbeEnd::Failed { reason, .. }) if reason.is_empty() => {
                    Err("walshipper info failed".into())
                }
                Some(ProbeEnd::Failed { reason, .. }) => Err(reason),
                None if p.started.elapsed() > Duration::from_secs(600) => {
                    p.kill();
                    Err("walshipper info did not finish within 10 minutes".into())
                }
                None => return,
            };
            self.probe = None;
            let r = match result {
                Ok(json) => Spi::run_with_args(
                    "SELECT backup._sched_repo_status($1::jsonb)",
                    &[json.into()],
                ),
                Err(e) => {
                    Spi::run_with_args("SELECT backup._sched_repo_status(NULL, $1)", &[e.into()])
                }
            };
            if let Err(e) = r {
                worker_error(format!("cannot record repository status: {e}"));
            }
            return;
        }
        let every = settings::REPO_STATUS_INTERVAL.get();
        if every <= 0
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_secs(every as u64))
        {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let exe = settings::string(&settings::WALSHIPPER_PATH);
        let cfg = settings::string(&settings::WALSHIPPER_CONFIG);
        // Only the recovery records not taken in yet (with a margin:
        // backup._sched_recoveries_after()).
        let after = Spi::get_one::<String>("SELECT backup._sched_recoveries_after()")
            .ok()
            .flatten();
        let mut argv = vec!["info", "--json"];
        if let Some(a) = &after {
            argv.extend(["--recoveries-after", a.as_str()]);
        }
        // Counting reads every object's header (a request each on S3): at
        // most every pg_backup.key_usage_interval, and after key operations.
        let usage_every = settings::KEY_USAGE_INTERVAL.get();
        if usage_every > 0
            && self
                .usage_last
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(usage_every as u64))
        {
            self.usage_last = Some(std::time::Instant::now());
            argv.push("--key-usage");
        }
        match Probe::spawn(&exe, &cfg, &argv) {
            Ok(p) => self.probe = Some(p),
            Err(e) => {
                worker_error(e.clone());
                let _ =
                    Spi::run_with_args("SELECT backup._sched_repo_status(NULL, $1)", &[e.into()]);
            }
        }
    }

    /// Refresh soon (a backup just ended).
    fn soon(&mut self) {
        self.last = None;
    }

    /// Refresh soon, counting the objects each key seals (a key operation ended).
    fn soon_with_usage(&mut self) {
        self.last = None;
        self.usage_last = None;
    }
}

/// The data keys' rotation policy (sql/keys.sql): `walshipper key rotate`
/// or `key retire KEY_ID` on every repository, one at a time, when the
/// policy says one is due or an operator asked (backup.rotate_key_now(),
/// backup.retire_key()). Started only when no backup, expire,
/// verification or recovery runs and no refresh of repository status is
/// under way (so that the refresh after it sees what it did); recorded in
/// backup.repository_activity like an expire, so that none of those starts
/// until it ends (a key operation holds the repositories' lock: a backup
/// would be refused busy). Its end is recorded by backup._sched_key_done():
/// the operation, an audit row, the key_rotation_failed alert.
#[derive(Default)]
struct KeyTask {
    /// The running operation: its id, what it runs, the process.
    probe: Option<(i64, String, Probe)>,
    /// An operation is queued (the repositories were busy at the last look).
    waiting: bool,
}

fn key_task_timeout() -> Duration {
    Duration::from_secs(settings::KEY_TASK_TIMEOUT.get().max(60) as u64)
}

impl KeyTask {
    fn ready() -> bool {
        Spi::get_one::<bool>("SELECT to_regprocedure('backup._sched_key_start()') IS NOT NULL")
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    /// Backups are held while an operation runs or waits for its moment.
    fn busy(&self) -> bool {
        self.probe.is_some() || self.waiting
    }

    /// `others_busy`: an expire is due or runs, or a refresh of repository
    /// status is under way: nothing is started. True when an operation ended
    /// (repository status is then refreshed, with the keys' usage).
    fn tick(&mut self, others_busy: bool) -> bool {
        if !catalog_ready() || !Self::ready() {
            return false;
        }
        if self.probe.is_some() {
            return self.follow();
        }
        if others_busy {
            return false;
        }
        let next = match Spi::get_one::<pgrx::JsonB>("SELECT backup._sched_key_start()") {
            Ok(v) => v.map(|j| j.0),
            Err(e) => {
                worker_error(format!("cannot plan key rotation: {e}"));
                return false;
            }
        };
        self.waiting = next.as_ref().is_some_and(|v| v["waiting"] == true);
        let Some(next) = next.filter(|v| v["operation_id"].is_i64()) else {
            return false;
        };
        let id = next["operation_id"].as_i64().unwrap_or_default();
        let args: Vec<String> = next["args"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let what = format!("walshipper {}", args.get(..2).unwrap_or_default().join(" "));
        let exe = settings::string(&settings::WALSHIPPER_PATH);
        let cfg = settings::string(&settings::WALSHIPPER_CONFIG);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        log!("pg_backup scheduler: key operation {id} started ({what})");
        match Probe::spawn(&exe, &cfg, &argv) {
            Ok(p) => {
                self.probe = Some((id, what, p));
                false
            }
            Err(e) => {
                worker_error(e.clone());
                Self::record(id, None, Some(e), None, false);
                true
            }
        }
    }

    /// The `key` event and the `error` event walshipper printed, if any.
    fn events(
        out: &str,
    ) -> (
        Option<pg_backup_contract::KeyReport>,
        Option<pg_backup_contract::ErrorEvent>,
    ) {
        let (mut key, mut error) = (None, None);
        for l in out.lines() {
            match pg_backup_contract::Event::parse(l) {
                Some(pg_backup_contract::Event::Key(r)) => key = Some(r),
                Some(pg_backup_contract::Event::Error(e)) => error = Some(e),
                _ => {}
            }
        }
        (key, error)
    }

    fn follow(&mut self) -> bool {
        let Some((id, what, p)) = &mut self.probe else {
            return false;
        };
        let (id, what) = (*id, what.clone());
        let end = match p.poll() {
            Some(end) => end,
            None if p.started.elapsed() > key_task_timeout() => {
                // Killed: key operations are safe to stop anywhere (a retire
                // resumes where it stopped).
                p.kill();
                ProbeEnd::Failed {
                    code: None,
                    reason: format!(
                        "{what} did not finish within {}s (pg_backup.key_task_timeout) and was stopped",
                        key_task_timeout().as_secs()
                    ),
                    stdout: String::new(),
                }
            }
            None => return false,
        };
        self.probe = None;
        let (report, error, busy) = match end {
            ProbeEnd::Succeeded(out) => match Self::events(&out) {
                (Some(r), _) => (Some(r), None, false),
                (None, _) => (
                    None,
                    Some(format!("{what} exited 0 without a report")),
                    false,
                ),
            },
            ProbeEnd::Failed {
                code,
                reason,
                stdout,
            } => {
                let (report, event) = Self::events(&stdout);
                let hint = event.and_then(|e| e.hint).map(|h| run::clean(&h));
                let error = ProbeEnd::describe(code, &reason, &what);
                log!("pg_backup scheduler: key operation {id} ({what}) failed: {error}");
                let busy = code == Some(pg_backup_contract::exit::BUSY);
                Self::record(id, report, Some(error), hint, busy);
                return true;
            }
        };
        if error.is_none() {
            log!("pg_backup scheduler: key operation {id} ({what}) ended");
        }
        Self::record(id, report, error, None, busy);
        true
    }

    /// The end of operation `id` (backup._sched_key_done() checks the report).
    fn record(
        id: i64,
        report: Option<pg_backup_contract::KeyReport>,
        error: Option<String>,
        hint: Option<String>,
        busy: bool,
    ) {
        let report = report.map(|r| pg_backup_contract::Event::Key(r).to_line());
        let r = Spi::run_with_args(
            "SELECT backup._sched_key_done($1, $2::jsonb, $3, $4, $5)",
            &[
                id.into(),
                report.into(),
                error.into(),
                hint.into(),
                busy.into(),
            ],
        );
        if let Err(e) = r {
            worker_error(format!("cannot record the end of key operation {id}: {e}"));
        }
    }

    fn stop(&mut self) {
        if let Some((id, what, p)) = &mut self.probe {
            p.kill();
            log!("pg_backup scheduler: key operation {id} ({what}) stopped by the shutdown");
            let id = *id;
            BackgroundWorker::transaction(|| {
                Self::record(
                    id,
                    None,
                    Some("interrupted: the server shut down during the operation".into()),
                    None,
                    false,
                )
            });
        }
        self.probe = None;
    }
}

/// `walshipper expire` after successful backups (scheduled, or by
/// backup_run() in any session), on every repository with its own policy
/// (backup._sched_expire_plan()), one repository at a time, started when no
/// backup of ours runs. While one is due or running the scheduler starts no
/// new backup: either would find the repository locked (walshipper exit 7).
#[derive(Default)]
struct Expiry {
    /// The running expire: after which execution, on which repository.
    probe: Option<(i64, Option<String>, Probe)>,
    /// Repositories still to expire after `current` (repository, flags).
    queue: Vec<(Option<String>, Vec<String>)>,
    current: Option<i64>,
    /// The newest successful execution still to expire after.
    pending: Option<i64>,
    /// Successes of the last minutes already noticed (None before the first look).
    seen: Option<HashSet<i64>>,
}

/// How long an expire may hold the repository: run_timeout, at most an hour.
fn expire_timeout() -> Duration {
    Duration::from_secs(settings::RUN_TIMEOUT.get().clamp(60, 3600) as u64)
}

impl Expiry {
    fn busy(&self) -> bool {
        self.probe.is_some() || self.pending.is_some() || !self.queue.is_empty()
    }

    fn ready() -> bool {
        Spi::get_one::<bool>(
            "SELECT to_regprocedure('backup._sched_expire_done(jsonb,bigint,text,text,text)') IS NOT NULL",
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    }

    fn tick(&mut self, backups_running: bool) {
        if !catalog_ready() || !Self::ready() {
            return;
        }
        self.follow();
        self.notice_successes();
        if self.probe.is_some() || backups_running {
            return;
        }
        if self.queue.is_empty() {
            if let Some(id) = self.pending.take() {
                self.plan(id);
            }
        }
        if !self.queue.is_empty() {
            self.start_next();
        }
    }

    /// Successes recorded since the last look, whoever ran them. Finish
    /// times, not ids: runs end in any order. The first look only learns
    /// what is there.
    fn notice_successes(&mut self) {
        let Ok(Some(ids)) = Spi::get_one::<String>(
            "SELECT coalesce(json_agg(execution_id ORDER BY finished_at, execution_id), '[]')::text \
               FROM backup.backup_executions \
              WHERE status = 'succeeded' AND finished_at > now() - interval '10 minutes'",
        ) else {
            return;
        };
        let ids: Vec<i64> = serde_json::from_str(&ids).unwrap_or_default();
        let first = self.seen.is_none();
        let seen = self.seen.get_or_insert_with(HashSet::new);
        let newest = ids.iter().rev().find(|i| !seen.contains(i)).copied();
        *seen = ids.into_iter().collect();
        if !settings::EXPIRE_AFTER_BACKUP.get() {
            self.pending = None;
        } else if let (false, Some(id)) = (first, newest) {
            self.pending = Some(id);
        }
    }

    /// The repositories to expire after execution `id`, with their flags.
    /// Never falls back to walshipper's configured policy because the
    /// catalog's could not be read.
    fn plan(&mut self, id: i64) {
        let plan = Spi::get_one::<String>(
            "SELECT coalesce(json_agg(json_build_array(repository, args)), '[]')::text FROM backup._sched_expire_plan()",
        );
        let rows: Vec<(Option<String>, Vec<String>)> = match plan {
            Ok(Some(json)) => serde_json::from_str(&json).unwrap_or_default(),
            Ok(None) => Vec::new(),
            Err(e) => {
                worker_error(format!(
                    "expiry after backup {id} skipped: cannot read the retention policies: {e}"
                ));
                return;
            }
        };
        self.current = Some(id);
        // Popped from the end: the first repository first.
        self.queue = rows.into_iter().rev().collect();
    }

    fn start_next(&mut self) {
        let Some(id) = self.current else {
            self.queue.clear();
            return;
        };
        // Not while any backup runs (a backup_run(wait => true) one too):
        // after it. Recorded, so that such a run waits for this expire.
        let free = Spi::get_one::<bool>("SELECT backup._sched_expire_begin()")
            .ok()
            .flatten()
            .unwrap_or(false);
        if !free {
            return;
        }
        let Some((repo, args)) = self.queue.pop() else {
            Self::unlock();
            return;
        };
        let exe = settings::string(&settings::WALSHIPPER_PATH);
        let cfg = settings::string(&settings::WALSHIPPER_CONFIG);
        let mut argv: Vec<&str> = Vec::new();
        if let Some(r) = &repo {
            argv.extend(["--repo", r.as_str()]);
        }
        argv.extend(["expire", "--json"]);
        argv.extend(args.iter().map(String::as_str));
        match Probe::spawn(&exe, &cfg, &argv) {
            Ok(p) => self.probe = Some((id, repo, p)),
            Err(e) => {
                Self::unlock();
                worker_error(e.clone());
                Self::record(None, id, repo.as_deref(), Some(e))
            }
        }
    }

    fn unlock() {
        if let Err(e) = Spi::run("SELECT backup._sched_expire_end()") {
            worker_error(format!("cannot record the end of an expire: {e}"));
        }
    }

    /// The expire reports in its output (one per repository expired), as
    /// the contract's `expire` events.
    fn reports(out: &str) -> Vec<pg_backup_contract::ExpireReport> {
        out.lines()
            .filter_map(|l| match pg_backup_contract::Event::parse(l) {
                Some(pg_backup_contract::Event::Expire(r)) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// A report as the catalog stores it: the event line itself.
    fn report_json(r: pg_backup_contract::ExpireReport) -> String {
        pg_backup_contract::Event::Expire(r).to_line()
    }

    fn follow(&mut self) {
        let Some((id, repo, p)) = &mut self.probe else {
            return;
        };
        let (id, repo) = (*id, repo.clone());
        let end = match p.poll() {
            Some(end) => end,
            None if p.started.elapsed() > expire_timeout() => {
                p.kill();
                ProbeEnd::Failed {
                    code: None,
                    reason: format!(
                        "walshipper expire did not finish within {}s and was stopped",
                        expire_timeout().as_secs()
                    ),
                    stdout: String::new(),
                }
            }
            None => return,
        };
        self.probe = None;
        Self::unlock();
        match end {
            ProbeEnd::Succeeded(out) => {
                let reports = Self::reports(&out);
                if reports.is_empty() {
                    Self::record(
                        None,
                        id,
                        repo.as_deref(),
                        Some("walshipper expire exited 0 without a report".into()),
                    );
                }
                // Without --repo, walshipper expires in configuration order:
                // the first report is the primary's.
                let primary = reports.first().map(|r| r.repository.clone());
                let primary = primary.filter(|_| repo.is_none());
                for r in reports {
                    log!(
                        "pg_backup scheduler: expiry of repository {} after backup {id} removed {} backup(s) and {} WAL segment(s), {} bytes",
                        r.repository,
                        r.removed.len(),
                        r.wal_removed,
                        r.bytes_freed
                    );
                    Self::record_with_primary(
                        Some(Self::report_json(r)),
                        id,
                        repo.as_deref(),
                        None,
                        primary.as_deref(),
                    )
                }
            }
            // Busy: a backup or another expire holds the repository. Not a
            // failure; the next successful backup expires again.
            ProbeEnd::Failed {
                code: Some(pg_backup_contract::exit::BUSY),
                reason,
                ..
            } => log!(
                "pg_backup scheduler: expiry of {} after backup {id} skipped, the repository is busy ({reason}); it runs again after the next backup",
                repo.as_deref().unwrap_or("every repository")
            ),
            ProbeEnd::Failed {
                code,
                reason,
                stdout,
            } => {
                // Without --repo, the repositories that worked reported.
                for r in Self::reports(&stdout) {
                    Self::record(Some(Self::report_json(r)), id, repo.as_deref(), None)
                }
                Self::record(
                    None,
                    id,
                    repo.as_deref(),
                    Some(ProbeEnd::describe(code, &reason, "walshipper expire")),
                )
            }
        }
    }

    /// `repo`: the repository expired (None: every one, in configuration
    /// order; `primary` then names the first that reported).
    fn record(report: Option<String>, id: i64, repo: Option<&str>, error: Option<String>) {
        Self::record_with_primary(report, id, repo, error, None)
    }

    fn record_with_primary(
        report: Option<String>,
        id: i64,
        repo: Option<&str>,
        error: Option<String>,
        primary: Option<&str>,
    ) {
        if let Some(e) = &error {
            log!(
                "pg_backup scheduler: expiry of {} after backup {id} failed: {e}",
                repo.unwrap_or("every repository")
            );
        }
        let r = Spi::run_with_args(
            "SELECT backup._sched_expire_done($1::jsonb, $2, $3, $4, $5)",
            &[
                report.into(),
                id.into(),
                error.into(),
                repo.map(str::to_string).into(),
                primary.map(str::to_string).into(),
            ],
        );
        if let Err(e) = r {
            worker_error(format!("cannot record the expiry after backup {id}: {e}"));
        }
    }

    fn stop(&mut self) {
        if let Some((id, _, p)) = &mut self.probe {
            p.kill();
            log!("pg_backup scheduler: expiry after backup {id} stopped by the shutdown");
        }
        self.probe = None;
    }
}

/// Verifications and recoveries (sql/verifications.sql, sql/recovery.sql):
/// the scheduler starts the oldest queued one when none runs and no expire
/// does (backup._recovery_try_start() decides, under the lock that keeps
/// expire out), follows its phases and progress, stops it on cancellation
/// or run_timeout, and records its end.
#[derive(Default)]
struct Recoveries {
    /// The running one: its table (`verification` or `operation`), id and process.
    running: Option<(String, i64, Task)>,
}

/// How long a verification or recovery may run: pg_backup.run_timeout.
fn task_timeout() -> Duration {
    Duration::from_secs(settings::RUN_TIMEOUT.get().max(60) as u64)
}

/// Records a phase and progress of task `id`, and stops it when it was
/// cancelled or ran too long. Some once it has ended.
fn follow_task(table: &str, id: i64, t: &mut Task) -> Option<TaskEnd> {
    if let Some(end) = t.poll() {
        return Some(end);
    }
    let cancel = Spi::get_one_with_args::<bool>(
        "SELECT backup._sched_recovery_progress($1, $2, $3, $4, $5)",
        &[
            table.to_string().into(),
            id.into(),
            t.phase.clone().into(),
            t.bytes_done.into(),
            t.bytes_total.into(),
        ],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if t.stopping() {
        return None;
    }
    if cancel {
        t.stop("cancelled", "cancelled");
    } else if t.started.elapsed() > task_timeout() {
        t.stop(
            format!(
                "timed out after {}s (pg_backup.run_timeout) and was stopped",
                task_timeout().as_secs()
            ),
            "failed",
        );
    }
    None
}

/// Records the end of task `id` (backup._sched_recovery_finish()).
fn record_task_end(table: &str, id: i64, end: TaskEnd) {
    if let Some(e) = &end.error {
        log!("pg_backup: {table} {id} ended: {e}");
    }
    let r = Spi::run_with_args(
        "SELECT backup._sched_recovery_finish($1, $2, $3::jsonb, $4, $5, $6, $7)",
        &[
            table.to_string().into(),
            id.into(),
            end.result.map(|v| v.to_string()).into(),
            end.code.into(),
            end.error.into(),
            end.hint.into(),
            end.forced.map(str::to_string).into(),
        ],
    );
    if let Err(e) = r {
        worker_error(format!("cannot record the end of {table} {id}: {e}"));
    }
}

impl Recoveries {
    fn ready() -> bool {
        Spi::get_one::<bool>("SELECT to_regprocedure('backup._sched_recovery_claim()') IS NOT NULL")
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    /// A verification or recovery runs (ours, or a waiting caller's worker).
    fn any_running() -> bool {
        catalog_ready()
            && Self::ready()
            && Spi::get_one::<bool>("SELECT backup._recovery_running()")
                .ok()
                .flatten()
                .unwrap_or(false)
    }

    /// True when one ended (the repository status is then refreshed soon,
    /// which takes its recovery record in).
    fn tick(&mut self) -> bool {
        if !catalog_ready() || !Self::ready() {
            return false;
        }
        // A waited worker that died on an error leaves its row running:
        // marked interrupted here (pid and backend start), else it would
        // hold the queue and expire for good. Ours is alive, so kept.
        match Spi::get_one::<i32>("SELECT backup._sched_interrupt_stale()") {
            Ok(Some(n)) if n > 0 => {
                log!("pg_backup scheduler: {n} verification(s) or recoveries whose worker is gone marked interrupted")
            }
            Ok(_) => {}
            Err(e) => worker_error(format!("cannot check verifications and recoveries: {e}")),
        }
        if let Some((table, id, t)) = &mut self.running {
            let (table, id) = (table.clone(), *id);
            if let Some(end) = follow_task(&table, id, t) {
                self.running = None;
                record_task_end(&table, id, end);
                return true;
            }
            return false;
        }
        let claimed = match Spi::get_one::<String>("SELECT backup._sched_recovery_claim()::text") {
            Ok(Some(c)) => c,
            Ok(None) => return false,
            Err(e) => {
                worker_error(format!("cannot start a verification or recovery: {e}"));
                return false;
            }
        };
        let Ok(c) = serde_json::from_str::<serde_json::Value>(&claimed) else {
            return false;
        };
        let (Some(table), Some(id)) = (c["table"].as_str(), c["id"].as_i64()) else {
            return false;
        };
        let args: Vec<String> = serde_json::from_value(c["args"].clone()).unwrap_or_default();
        let exe = settings::string(&settings::WALSHIPPER_PATH);
        let cfg = settings::string(&settings::WALSHIPPER_CONFIG);
        match Task::spawn(&exe, &cfg, &args) {
            Ok(t) => self.running = Some((table.to_string(), id, t)),
            Err(e) => {
                worker_error(e.clone());
                record_task_end(table, id, TaskEnd::failed(e));
            }
        }
        false
    }

    fn stop(&mut self) {
        if let Some((table, id, mut t)) = self.running.take() {
            t.stop_and_wait();
            let end = t.poll().unwrap_or_else(|| TaskEnd::failed("stopped"));
            BackgroundWorker::transaction(|| record_task_end(&table, id, end));
        }
    }
}

/// Follows the runs we own and records their ends.
fn follow_runs(runs: &mut HashMap<i64, Run>, status: &mut RepoStatus) {
    if !catalog_ready() {
        return;
    }
    let timeout = Duration::from_secs(settings::RUN_TIMEOUT.get().max(60) as u64);
    let ids: Vec<i64> = runs.keys().copied().collect();
    for id in ids {
        let Some(r) = runs.get_mut(&id) else { continue };
        let outcome = match r.poll() {
            Some(o) => Some(o),
            None => {
                let cancel = Spi::get_one_with_args::<bool>(
                    "SELECT backup._sched_progress($1, $2, $3)",
                    &[id.into(), r.bytes_done.into(), r.bytes_total.into()],
                )
                .ok()
                .flatten()
                .unwrap_or(false);
                if cancel {
                    r.kill();
                    Some(Outcome::failed("cancelled"))
                } else if r.started.elapsed() > timeout {
                    r.kill();
                    Some(Outcome::failed(format!(
                        "timed out after {}s (pg_backup.run_timeout)",
                        timeout.as_secs()
                    )))
                } else {
                    None
                }
            }
        };
        if let Some(o) = outcome {
            runs.remove(&id);
            finish(id, o);
            status.soon();
        }
    }
}

/// Queues due jobs, starts what may start (nothing while an expire is due
/// or running), and checks health.
fn claim_and_check(runs: &mut HashMap<i64, Run>, hold: bool) {
    if !catalog_ready() {
        return;
    }
    let slots = if hold {
        0
    } else {
        (settings::MAX_CONCURRENT.get() as i64 - runs.len() as i64).max(0) as i32
    };
    let claimed = match Spi::get_one_with_args::<String>(
        "SELECT coalesce(json_agg(c)::text, '[]') FROM backup._sched_claim($1) c",
        &[slots.into()],
    ) {
        Ok(c) => c.unwrap_or_else(|| "[]".into()),
        Err(e) => {
            worker_error(format!("cannot queue or claim runs: {e}"));
            "[]".into()
        }
    };
    let claimed: Vec<serde_json::Value> = serde_json::from_str(&claimed).unwrap_or_default();
    for c in claimed {
        let (Some(id), Some(kind)) = (c["execution_id"].as_i64(), c["kind"].as_str()) else {
            continue;
        };
        let exe = settings::string(&settings::WALSHIPPER_PATH);
        let cfg = settings::string(&settings::WALSHIPPER_CONFIG);
        match run::spawn(&exe, &cfg, c["repository"].as_str(), id, kind) {
            Ok(r) => {
                runs.insert(id, r);
            }
            Err(e) => {
                worker_error(e.clone());
                finish(id, Outcome::failed(e))
            }
        }
    }
    if let Err(e) = Spi::run_with_args(
        "SELECT backup._sched_check_health($1, $2)",
        &[
            settings::RPO_TARGET.get().into(),
            settings::OVERDUE_GRACE.get().into(),
        ],
    ) {
        worker_error(format!("cannot check health: {e}"));
    }
    if Recoveries::ready() {
        if let Err(e) = Spi::run_with_args(
            "SELECT backup._sched_check_recoveries($1, $2), backup._sched_sample_rpo($3)",
            &[
                settings::RTO_TARGET.get().into(),
                settings::RESTORE_TEST_MAX_AGE.get().into(),
                settings::RPO_HISTORY.get().into(),
            ],
        ) {
            worker_error(format!("cannot check the recovery objectives: {e}"));
        }
    }
}

/// How long the scheduler must run without failing before worker_error is
/// resolved: a failure that recurs every few cycles is one open alert.
const WORKER_ERROR_QUIET: Duration = Duration::from_secs(30);

/// Raises worker_error with this cycle's failures, or resolves it once no
/// failure happened for WORKER_ERROR_QUIET. `last`: the last failure.
fn report_cycle(last: &mut Option<std::time::Instant>) {
    if !catalog_ready() {
        return;
    }
    let errors = CYCLE_ERRORS
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    let message = if !errors.is_empty() {
        *last = Some(std::time::Instant::now());
        Some(errors.join("; "))
    } else if last.is_some_and(|t| t.elapsed() > WORKER_ERROR_QUIET) {
        *last = None;
        None
    } else {
        return;
    };
    let resolving = message.is_none();
    if let Err(e) = Spi::run_with_args("SELECT backup._sched_worker_error($1)", &[message.into()]) {
        log!("pg_backup scheduler: cannot record its own health: {e}");
        if resolving {
            *last = Some(std::time::Instant::now());
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_backup_scheduler_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = settings::string(&settings::DATABASE);
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    if !pin_session() {
        return;
    }
    log!("pg_backup scheduler started (database {db})");
    let stale = BackgroundWorker::transaction(|| {
        if catalog_ready() {
            let runs = Spi::get_one::<i32>("SELECT backup._sched_fail_stale()")
                .ok()
                .flatten()
                .unwrap_or(0);
            let checks = if Recoveries::ready() {
                Spi::get_one::<i32>("SELECT backup._sched_interrupt_stale()")
                    .ok()
                    .flatten()
                    .unwrap_or(0)
            } else {
                0
            };
            runs + checks
        } else {
            0
        }
    });
    if stale > 0 {
        worker_error(format!(
            "restarted: {stale} run(s), verification(s) or recoveries interrupted by a server or scheduler restart were marked so"
        ));
    }
    let mut runs: HashMap<i64, Run> = HashMap::new();
    let mut status = RepoStatus::default();
    let mut expiry = Expiry::default();
    let mut keys = KeyTask::default();
    let mut recoveries = Recoveries::default();
    let mut receiver = crate::stream::Receiver::default();
    // Resolve a worker_error left open by an earlier scheduler once quiet.
    let mut last_error = Some(std::time::Instant::now());
    while BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file is what a worker does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let mut r = std::panic::AssertUnwindSafe(&mut runs);
        let mut st = std::panic::AssertUnwindSafe(&mut status);
        BackgroundWorker::transaction(move || follow_runs(&mut r, &mut st));
        // Each in a transaction of its own: what was recorded before is
        // committed whatever happens after.
        let idle = runs.is_empty();
        let key_running = keys.probe.is_some();
        let mut ex = std::panic::AssertUnwindSafe(&mut expiry);
        BackgroundWorker::transaction(move || ex.tick(!idle || key_running));
        // A key operation: after any expire, and not while repository
        // status is being read (the next refresh must see what it did).
        let others = expiry.busy() || status.probe.is_some();
        let mut ks = std::panic::AssertUnwindSafe(&mut keys);
        if BackgroundWorker::transaction(move || ks.tick(others)) {
            status.soon_with_usage();
        }
        // Backups wait for a due expire, so that it finds a moment between
        // them; not while a verification or recovery (ours or a waiting
        // caller's) keeps that expire from starting: holding them would
        // not bring it sooner.
        let hold = (expiry.busy() || keys.busy())
            && (expiry.probe.is_some()
                || keys.probe.is_some()
                || !BackgroundWorker::transaction(Recoveries::any_running));
        let mut rc = std::panic::AssertUnwindSafe(&mut recoveries);
        if BackgroundWorker::transaction(move || rc.tick()) {
            status.soon();
        }
        let mut r = std::panic::AssertUnwindSafe(&mut runs);
        BackgroundWorker::transaction(move || claim_and_check(&mut r, hold));
        // Not while a key operation runs: what info reads could be from
        // before it ended.
        let mut st = std::panic::AssertUnwindSafe(&mut status);
        let key_running = keys.probe.is_some();
        BackgroundWorker::transaction(move || {
            if catalog_ready() && !key_running {
                st.tick()
            }
        });
        // Without the catalog (the extension dropped, or not yet created)
        // the receiver is stopped: nothing would record or watch it.
        let mut rv = std::panic::AssertUnwindSafe(&mut receiver);
        BackgroundWorker::transaction(move || {
            if catalog_ready() {
                rv.tick()
            } else {
                rv.absent()
            }
        });
        let mut last = std::panic::AssertUnwindSafe(&mut last_error);
        BackgroundWorker::transaction(move || report_cycle(&mut last));
    }
    // Shutting down: our runs end with us.
    if let Some(p) = &mut status.probe {
        p.kill();
    }
    expiry.stop();
    keys.stop();
    recoveries.stop();
    receiver.stop();
    for (id, mut r) in runs.drain() {
        r.kill();
        BackgroundWorker::transaction(|| {
            finish(
                id,
                Outcome::failed("stopped: the server shut down during the run"),
            )
        });
    }
}

/// A dynamic worker running one backup for backup_run(wait => true). Its
/// extra holds "database-oid execution-id job-id requester-oid kind": it
/// records run execution-id (the id backup_run() took and returns) as asked
/// by the requester, audits it, runs it and records the outcome, each in a
/// transaction of its own.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_backup_run_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    let extra = BackgroundWorker::get_extra().to_string();
    let parts: Vec<&str> = extra.split(' ').collect();
    let [db, id, job, requester, kind] = parts[..] else {
        log!("pg_backup run: bad worker argument {extra:?}");
        return;
    };
    let db = pg_sys::Oid::from(db.parse::<u32>().unwrap_or(0));
    let (Ok(id), Ok(job), Ok(requester)) = (
        id.parse::<i64>(),
        job.parse::<i64>(),
        requester.parse::<i64>(),
    ) else {
        log!("pg_backup run: bad worker argument {extra:?}");
        return;
    };
    let kind = kind.to_string();
    // As the superuser, like the scheduler: the requester may not write
    // the catalog; it is recorded as the one who asked.
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), None);
    if !pin_session() {
        return;
    }
    let repo = BackgroundWorker::transaction(|| {
        let r = Spi::get_one_with_args::<String>(
            "INSERT INTO backup.backup_executions \
                 (execution_id, job_id, kind, status, started_at, worker_pid, requested_by, repository) \
             OVERRIDING SYSTEM VALUE \
             SELECT $1, b.job_id, $3, 'running', now(), pg_backend_pid(), \
                    coalesce((SELECT r.rolname FROM pg_roles r WHERE r.oid = $4::oid), 'unknown'), b.repository \
               FROM (SELECT NULL) x LEFT JOIN backup.backup_jobs b ON b.job_id = nullif($2, 0) \
             RETURNING json_build_object('repository', repository)::text",
            &[id.into(), job.into(), kind.clone().into(), requester.into()],
        )
        .and_then(|r| {
            Spi::run_with_args(
                "SELECT backup._audit('run', 'backup', \
                        coalesce((SELECT b.name FROM backup.backup_jobs b WHERE b.job_id = nullif($2, 0)), 'manual'), \
                        jsonb_build_object('execution_id', $1, 'wait', true), \
                        (SELECT e.requested_by FROM backup.backup_executions e WHERE e.execution_id = $1))",
                &[id.into(), job.into()],
            )
            .map(|_| r)
        });
        match r {
            Ok(Some(json)) => Some(
                serde_json::from_str::<serde_json::Value>(&json)
                    .ok()
                    .and_then(|v| v["repository"].as_str().map(str::to_string)),
            ),
            Ok(None) => None,
            Err(e) => {
                log!("pg_backup run: cannot record run {id}: {e}");
                None
            }
        }
    });
    let Some(repo) = repo else { return };
    // Not while the scheduler expires the repository (walshipper would
    // refuse this backup with exit 7): wait for it to end. The scheduler
    // starts no expire while this run is recorded as running.
    let timeout = Duration::from_secs(settings::RUN_TIMEOUT.get().max(60) as u64);
    let waiting = std::time::Instant::now();
    loop {
        let free = BackgroundWorker::transaction(|| {
            Spi::get_one::<bool>("SELECT backup._run_may_start()")
                .ok()
                .flatten()
                .unwrap_or(false)
        });
        if free {
            break;
        }
        if waiting.elapsed() > timeout
            || !BackgroundWorker::wait_latch(Some(Duration::from_secs(1)))
        {
            BackgroundWorker::transaction(|| {
                finish(
                    id,
                    Outcome::failed("not started: walshipper expire held the repository until the run timed out or the server stopped"),
                )
            });
            return;
        }
    }
    let exe = settings::string(&settings::WALSHIPPER_PATH);
    let cfg = settings::string(&settings::WALSHIPPER_CONFIG);
    let outcome = match run::spawn(&exe, &cfg, repo.as_deref(), id, &kind) {
        Err(e) => Outcome::failed(e),
        Ok(mut r) => loop {
            if let Some(o) = r.poll() {
                break o;
            }
            if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
                r.kill();
                break Outcome::failed("stopped: the server shut down during the run");
            }
            let (done, total) = (r.bytes_done, r.bytes_total);
            let cancel = BackgroundWorker::transaction(|| {
                Spi::get_one_with_args::<bool>(
                    "SELECT backup._sched_progress($1, $2, $3)",
                    &[id.into(), done.into(), total.into()],
                )
                .ok()
                .flatten()
                .unwrap_or(false)
            });
            if cancel {
                r.kill();
                break Outcome::failed("cancelled");
            }
            if r.started.elapsed() > timeout {
                r.kill();
                break Outcome::failed(format!(
                    "timed out after {}s (pg_backup.run_timeout)",
                    timeout.as_secs()
                ));
            }
        },
    };
    BackgroundWorker::transaction(|| finish(id, outcome));
}

/// Where `_recovery_in_worker` leaves a request for its worker: in the
/// data directory (every backend's working directory), which only the
/// server's user may write. bgw_extra (128 bytes) cannot hold one.
pub fn request_path(table: &str, id: i64) -> std::path::PathBuf {
    std::path::Path::new("pg_backup_ext").join(format!("{table}-{id}.json"))
}

/// A dynamic worker running one verification or recovery for a caller that
/// waits (verify_run, restore_test_run, table_restore with wait => true).
/// Its extra holds "database-oid table id requester-oid"; the request is in
/// request_path(). It records the request as asked by the requester (with
/// its audit row), waits its turn (no other verification or recovery, no
/// expire), runs it and records its end, each in a transaction of its own.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_backup_recovery_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    let extra = BackgroundWorker::get_extra().to_string();
    let parts: Vec<&str> = extra.split(' ').collect();
    let [db, table, id, requester] = parts[..] else {
        log!("pg_backup recovery: bad worker argument {extra:?}");
        return;
    };
    let (Ok(db), Ok(id), Ok(requester)) = (
        db.parse::<u32>(),
        id.parse::<i64>(),
        requester.parse::<i64>(),
    ) else {
        log!("pg_backup recovery: bad worker argument {extra:?}");
        return;
    };
    if table != "verification" && table != "operation" {
        log!("pg_backup recovery: bad worker argument {extra:?}");
        return;
    }
    let path = request_path(table, id);
    let request = std::fs::read_to_string(&path);
    let _ = std::fs::remove_file(&path);
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            log!(
                "pg_backup recovery: cannot read request {}: {e}",
                path.display()
            );
            return;
        }
    };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), None);
    if !pin_session() {
        return;
    }
    let recorded = BackgroundWorker::transaction(|| {
        Spi::run_with_args(
            "SELECT backup._recovery_enqueue($1::jsonb, $2, \
                    coalesce((SELECT r.rolname FROM pg_roles r WHERE r.oid = $3::oid), 'unknown'))",
            &[request.into(), id.into(), requester.into()],
        )
    });
    if let Err(e) = recorded {
        log!("pg_backup recovery: cannot record {table} {id}: {e}");
        return;
    }
    // Its turn: no other verification or recovery, no expire.
    let waiting = std::time::Instant::now();
    let args = loop {
        let (args, queued) = BackgroundWorker::transaction(|| {
            let args = Spi::get_one_with_args::<String>(
                "SELECT to_json(backup._recovery_try_start($1, $2))::text",
                &[table.to_string().into(), id.into()],
            )
            .ok()
            .flatten()
            .and_then(|j| {
                serde_json::from_str::<Option<Vec<String>>>(&j)
                    .ok()
                    .flatten()
            });
            let queued = Spi::get_one_with_args::<bool>(
                "SELECT CASE $1 WHEN 'verification' THEN (SELECT status = 'queued' FROM backup.backup_verifications WHERE verification_id = $2) \
                                ELSE (SELECT status = 'queued' FROM backup.recovery_operations WHERE operation_id = $2) END",
                &[table.to_string().into(), id.into()],
            )
            .ok()
            .flatten()
            .unwrap_or(false);
            (args, queued)
        });
        if let Some(a) = args {
            break a;
        }
        // Cancelled while it waited.
        if !queued {
            return;
        }
        if waiting.elapsed() > task_timeout()
            || !BackgroundWorker::wait_latch(Some(Duration::from_secs(1)))
        {
            BackgroundWorker::transaction(|| {
                record_task_end(
                    table,
                    id,
                    TaskEnd::failed("not started: another verification or recovery, or walshipper expire, held the repository until the run timed out or the server stopped"),
                )
            });
            return;
        }
    };
    let exe = settings::string(&settings::WALSHIPPER_PATH);
    let cfg = settings::string(&settings::WALSHIPPER_CONFIG);
    let end = match Task::spawn(&exe, &cfg, &args) {
        Err(e) => TaskEnd::failed(e),
        Ok(mut t) => loop {
            let mut tt = std::panic::AssertUnwindSafe(&mut t);
            if let Some(end) =
                BackgroundWorker::transaction(move || follow_task(table, id, &mut tt))
            {
                break end;
            }
            if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
                t.stop_and_wait();
                break t.poll().unwrap_or_else(|| TaskEnd::failed("stopped"));
            }
        },
    };
    BackgroundWorker::transaction(|| record_task_end(table, id, end));
}
