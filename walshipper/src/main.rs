//! The walshipper command line. Parsing and exit codes only; the work is in
//! the library's `commands`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use walshipper::commands;
use walshipper::config::Config;
use walshipper::error::{exit, Error};

/// mimalloc, not glibc's malloc: with glibc (tuned to keep freed buffers,
/// `tune_allocator`), what the threads freed stayed in their arenas and a
/// restore's peak RSS grew with the file count (25 → 47 MiB from 25 000
/// to 100 000 files, the live heap 13 MiB at both); with mimalloc it
/// stays level (docs/performance.md, "The allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "walshipper",
    version,
    about = "pg_backup's data plane: WAL archiving and restore for PostgreSQL"
)]
struct Cli {
    /// Configuration file (default: /etc/walshipper/walshipper.toml).
    #[arg(long, global = true, env = "WALSHIPPER_CONFIG")]
    config: Option<PathBuf>,
    /// The repository to use, by name (backup, restore, verify, info,
    /// repo-init, archive-get; repo-sync: the one to fill; expire: the one
    /// to expire). Default: the first, or all where that makes sense
    /// (repo-init, repo-sync, expire).
    #[arg(long, global = true)]
    repo: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new repository for the cluster in [pg] data_dir.
    RepoInit {
        /// Store data unencrypted (not recommended).
        #[arg(long)]
        no_encryption: bool,
        /// Argon2id memory cost in KiB (default 65536).
        #[arg(long)]
        kdf_memory_kib: Option<u32>,
        /// Argon2id passes (default 3).
        #[arg(long)]
        kdf_iterations: Option<u32>,
    },
    /// archive_command: store a WAL file (use as: archive-push %p).
    ArchivePush { path: PathBuf },
    /// restore_command: fetch a WAL file (use as: archive-get %f "%p").
    ArchiveGet { walfile: String, dest: PathBuf },
    /// Stream WAL over the replication protocol into the repository
    /// (long-running; [stream] in the configuration). SIGTERM stops it
    /// after making what it received durable.
    WalReceive {
        /// Print `stream` events (docs/contract.md) as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// The background pusher of `[archive] async = true` (started by
    /// archive-push itself).
    #[command(hide = true)]
    ArchivePushAsync {
        #[arg(long)]
        pg_wal: PathBuf,
    },
    /// The look-ahead fetcher of `[restore] lookahead` (started by
    /// archive-get itself).
    #[command(hide = true)]
    ArchiveGetPrefetch {
        /// The spool directory it fills.
        #[arg(long)]
        spool: PathBuf,
    },
    /// Show what the repository holds.
    Info {
        #[arg(long)]
        json: bool,
        /// List only the recovery records newer than this id (default:
        /// the newest 50).
        #[arg(long, value_name = "ID")]
        recoveries_after: Option<String>,
        /// Count the objects each data key seals (reads every object's
        /// header: one small read per object).
        #[arg(long)]
        key_usage: bool,
    },
    /// Check the server's archiving end to end.
    Check,
    /// Copy what one repository holds and another lacks (WAL, backups).
    RepoSync {
        /// List what would be copied, copy nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Take an online base backup of the running cluster.
    Backup {
        /// full, diff (changes since the last full) or incr (since the last backup).
        #[arg(long = "type", default_value = "full")]
        kind: String,
        /// Files copied in parallel (default: one per CPU).
        #[arg(long)]
        jobs: Option<usize>,
        /// Label passed to pg_backup_start.
        #[arg(long)]
        label: Option<String>,
        /// Progress and result as JSON lines on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup into a directory, set up to recover to a target.
    Restore {
        /// The new data directory (must be empty unless --delta).
        #[arg(long)]
        target_dir: PathBuf,
        /// Backup to restore (default: the newest that can reach the target).
        #[arg(long)]
        backup: Option<String>,
        /// Recover to this time (with a zone, e.g. '2026-11-21 10:15:00+00').
        #[arg(long, group = "recovery_target")]
        target_time: Option<String>,
        /// Recover to this LSN.
        #[arg(long, group = "recovery_target")]
        target_lsn: Option<String>,
        /// Recover to this transaction id.
        #[arg(long, group = "recovery_target")]
        target_xid: Option<String>,
        /// Recover to this named restore point.
        #[arg(long, group = "recovery_target")]
        target_name: Option<String>,
        /// `immediate`: stop as soon as the backup is consistent.
        #[arg(long, group = "recovery_target")]
        target: Option<String>,
        /// What to do at the target: promote, pause or shutdown.
        #[arg(long, default_value = "pause")]
        target_action: String,
        /// Files restored in parallel (default: CPUs + 1).
        #[arg(long)]
        jobs: Option<usize>,
        /// Rewrite only files that differ in a non-empty target directory.
        #[arg(long)]
        delta: bool,
        /// Restore tablespace OID to DIR instead of its original location.
        #[arg(long = "tablespace-map", value_name = "OID=DIR")]
        tablespace_map: Vec<String>,
        /// Restore only this database (repeatable), and the system ones;
        /// the others are left as empty sparse files, to be dropped.
        #[arg(long = "db-include", value_name = "NAME")]
        db_include: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove backups no retention policy keeps, and the WAL only they needed.
    Expire {
        /// List what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        /// Keep the newest N full backups (and the backups built on them).
        #[arg(long)]
        keep_full: Option<u32>,
        /// Keep every moment of this window restorable, e.g. 7d, 36h, 1d12h.
        #[arg(long)]
        recovery_window: Option<String>,
        /// Keep the newest backup of each of the last N days (weeks, months, years).
        #[arg(long)]
        keep_daily: Option<u32>,
        #[arg(long)]
        keep_weekly: Option<u32>,
        #[arg(long)]
        keep_monthly: Option<u32>,
        #[arg(long)]
        keep_yearly: Option<u32>,
        /// Time zone of days, weeks, months and years (IANA name; default from config, else UTC).
        #[arg(long)]
        timezone: Option<String>,
        /// Decide as of this moment instead of now (with a zone), for what-if runs.
        #[arg(long)]
        now: Option<String>,
    },
    /// Prove a backup restorable: restore it into a scratch directory,
    /// recover, check, measure the time taken (RTO), remove it again.
    RestoreTest {
        /// Phases and the result as JSON lines on stdout.
        #[arg(long)]
        json: bool,
        /// Backup to test (default: the newest that can reach the target).
        #[arg(long)]
        backup: Option<String>,
        #[command(flatten)]
        targets: ScratchTarget,
        /// `immediate`: stop as soon as the backup is consistent.
        #[arg(long, group = "scratch_target")]
        target: Option<String>,
        /// A check: '{"name":..,"database":..,"query":..,"expected":..}' (repeatable).
        #[arg(long = "check-json", value_name = "JSON")]
        check_json: Vec<String>,
        /// Instead of [restore_test] scratch_dir.
        #[arg(long)]
        scratch_dir: Option<PathBuf>,
    },
    /// Load tables as they were at a target into a new schema of the live database.
    TableRestore {
        /// Phases and the result as JSON lines on stdout.
        #[arg(long)]
        json: bool,
        /// The database the tables are in (and are loaded into).
        #[arg(long)]
        database: String,
        /// schema.table in SQL syntax (unquoted names fold to lower case); repeatable.
        #[arg(long = "table", value_name = "QUALIFIED", required = true)]
        tables: Vec<String>,
        /// The new schema to load them into (must not exist).
        #[arg(long)]
        into_schema: String,
        /// The role the loaded objects belong to (pg_restore --role).
        #[arg(long)]
        role: String,
        /// Backup to restore from (default: the newest that can reach the target).
        #[arg(long)]
        backup: Option<String>,
        #[command(flatten)]
        target: ScratchTarget,
        #[arg(long)]
        scratch_dir: Option<PathBuf>,
    },
    /// Read back and check backups and the WAL they need.
    Verify {
        #[arg(long)]
        backup: Option<String>,
        #[arg(long)]
        jobs: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// The monitoring service: /metrics, /health, the dashboard and the
    /// compliance report over HTTP, and the notifier ([serve], [notify]).
    Serve,
    /// Write the compliance report for a period as a printable HTML document.
    Report {
        /// Start of the period (a date or a time with a zone; default: 30 days ago).
        #[arg(long)]
        from: Option<String>,
        /// End of the period (default: now).
        #[arg(long)]
        to: Option<String>,
        /// The file to write (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Send a test message through the configured notification channels.
    NotifyTest {
        /// Only this channel (a [[notify.channel]] name).
        #[arg(long)]
        channel: Option<String>,
    },
    /// Data keys and the passphrase: change, rotate, retire, list.
    Key {
        #[command(subcommand)]
        action: KeyCommand,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// The data keys of every configured repository.
    List {
        #[arg(long)]
        json: bool,
        /// Count the objects each key seals (one small read per object).
        #[arg(long)]
        usage: bool,
    },
    /// Change the passphrase: re-wrap every key file of every configured
    /// repository (nothing else is rewritten).
    Passphrase {
        /// Read the new passphrase from this file (mode 0600).
        #[arg(long, value_name = "FILE", group = "new_passphrase")]
        new_file: Option<PathBuf>,
        /// Read the new passphrase from standard input (one line).
        #[arg(long, group = "new_passphrase")]
        new_stdin: bool,
        /// Keep the old passphrase working too, until `--finish`.
        #[arg(long)]
        keep_old: bool,
        /// Make the old passphrase stop working: remove every wrapping the
        /// configured passphrase does not open.
        #[arg(long, conflicts_with_all = ["new_file", "new_stdin", "keep_old"])]
        finish: bool,
        #[arg(long)]
        json: bool,
    },
    /// Make a new data key current: new WAL and backups are sealed by it.
    Rotate {
        #[arg(long)]
        json: bool,
    },
    /// Re-encrypt every object sealed by KEY_ID under the current key, then
    /// remove KEY_ID's key file. Resumable: run it again after a failure.
    Retire {
        key_id: String,
        /// Objects re-encrypted in parallel (default: one per CPU).
        #[arg(long)]
        jobs: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

/// The recovery targets of restore-test and table-restore (default: the
/// end of the archived WAL).
#[derive(clap::Args)]
struct ScratchTarget {
    /// Recover to this time (with a zone, e.g. '2026-11-21 10:15:00+00').
    #[arg(long, group = "scratch_target")]
    target_time: Option<String>,
    /// Recover to this named restore point.
    #[arg(long, group = "scratch_target")]
    target_name: Option<String>,
    /// Recover to this LSN.
    #[arg(long, group = "scratch_target")]
    target_lsn: Option<String>,
}

impl ScratchTarget {
    fn target(&self, immediate: Option<&str>) -> walshipper::Result<commands::restore::Target> {
        use commands::restore::{parse_time, Target};
        Ok(if let Some(t) = &self.target_time {
            Target::Time {
                at: parse_time(t)?,
                raw: t.clone(),
            }
        } else if let Some(n) = &self.target_name {
            Target::Name(n.clone())
        } else if let Some(l) = &self.target_lsn {
            Target::Lsn(walshipper::wal::parse_lsn(l).ok_or_else(|| {
                Error::Invalid(format!("--target-lsn '{l}' is not an LSN like 0/3000028"))
            })?)
        } else if let Some(t) = immediate {
            if t != "immediate" {
                return Err(Error::Invalid(format!(
                    "--target '{t}': only 'immediate' is known"
                )));
            }
            Target::Immediate
        } else {
            Target::End
        })
    }
}

impl Command {
    /// Whether the command was asked for JSON output: then a failure is
    /// also an error event on stdout (docs/contract.md).
    fn json(&self) -> bool {
        match self {
            Command::Info { json, .. }
            | Command::RepoSync { json, .. }
            | Command::Backup { json, .. }
            | Command::Restore { json, .. }
            | Command::Expire { json, .. }
            | Command::Verify { json, .. }
            | Command::RestoreTest { json, .. }
            | Command::TableRestore { json, .. }
            | Command::WalReceive { json } => *json,
            Command::Key { action } => match action {
                KeyCommand::List { json, .. }
                | KeyCommand::Passphrase { json, .. }
                | KeyCommand::Rotate { json }
                | KeyCommand::Retire { json, .. } => *json,
            },
            Command::RepoInit { .. }
            | Command::ArchivePush { .. }
            | Command::ArchiveGet { .. }
            | Command::ArchivePushAsync { .. }
            | Command::ArchiveGetPrefetch { .. }
            | Command::Serve
            | Command::Report { .. }
            | Command::NotifyTest { .. }
            | Command::Check => false,
        }
    }
}

/// The error event of a failed `--json` run, on stdout beside the message
/// on stderr: the caller (pg_backup_ext) reads one stream for both.
fn print_error_event(e: &Error) {
    walshipper::progress::event(&e.event(None));
}

fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("WALSHIPPER_LOG").unwrap_or_else(|_| {
            // The AWS SDK's own chatter (credential and region probing) is
            // not the user's business unless asked for with WALSHIPPER_LOG.
            tracing_subscriber::EnvFilter::new(
                "info,aws_config=error,aws_smithy_runtime=error,aws_sdk_s3=error",
            )
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .init();
}

/// mimalloc gives freed memory back at once, not after its default delay
/// of a second: with the delay, a restore's peak RSS still grew with the
/// file count (26 → 48 MiB from 25 000 to 100 000 files; 26 → 30 without).
///
/// glibc's malloc still serves the C libraries (zstd's contexts): their
/// buffers are allocated and freed by the thousand, and glibc would map
/// and unmap each one (its default mmap threshold is 128 KiB), paying a
/// page fault per 4 KiB every time; keeping them in the heap lets freed
/// buffers be reused (measured with glibc for everything: about a third
/// less system time per segment).
fn tune_allocator() {
    // `mi_option_purge_delay` in mimalloc.h (v3, libmimalloc-sys 0.1.49,
    // whose Rust constants stop before it): check it on an upgrade.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: both only adjust allocator parameters; called before any
    // threads start.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// No core dumps and no ptrace by other processes of the same user: this
/// process may hold the passphrase and unwrapped data keys in memory. Not
/// dumpable also makes /proc/<pid>/mem and environ readable only by root,
/// which hides WALSHIPPER_PASSPHRASE from other processes of the user.
/// PostgreSQL runs us as archive_command / restore_command and only waits
/// for the exit status, so neither affects it.
fn harden_process() {
    // SAFETY: prctl and setrlimit with valid arguments change only this
    // process's attributes; called before any threads start.
    unsafe {
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
            eprintln!(
                "walshipper: warning: cannot turn core dumps off: {}",
                std::io::Error::last_os_error()
            );
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            eprintln!(
                "walshipper: warning: cannot make the process non-dumpable: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn main() -> ExitCode {
    harden_process();
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // A restore_command with a word missing must stop recovery, not
            // end it: 2 would read as "not in the archive" and promote.
            let code = if !e.use_stderr() {
                0
            } else if std::env::args().any(|a| a == "archive-get") {
                exit::RECOVERY_STOP
            } else {
                exit::USAGE
            };
            // The command line did not parse, so --json is looked for by hand.
            if code == exit::USAGE && std::env::args().any(|a| a == "--json") {
                let msg = e.kind().to_string();
                let detail = e.to_string();
                let first = detail
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or(&msg)
                    .trim_start_matches("error: ")
                    .to_string();
                print_error_event(&Error::Invalid(first));
            }
            return ExitCode::from(code as u8);
        }
    };
    init_logging();
    // archive-get loads the configuration itself and chooses its own exit
    // status: a configuration it cannot read during recovery must stop
    // recovery (status > 125), not end it (2 would read as "not found").
    if let Command::ArchiveGet { walfile, dest } = &cli.command {
        let code =
            commands::archive_get::main(cli.config.as_deref(), cli.repo.as_deref(), walfile, dest);
        return ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX));
    }
    let result = Config::load(cli.config.as_deref())
        .and_then(|cfg| run(&cfg, cli.repo.as_deref(), &cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A missing WAL file is a normal probe during recovery: stay quiet.
        Err(Error::NotFound(_)) if matches!(cli.command, Command::ArchiveGet { .. }) => {
            ExitCode::from(exit::NOT_FOUND as u8)
        }
        Err(e) => {
            eprintln!("walshipper: {e}");
            if cli.command.json() {
                print_error_event(&e);
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(cfg: &Config, repo: Option<&str>, command: &Command) -> walshipper::Result<()> {
    match command {
        Command::RepoInit {
            no_encryption,
            kdf_memory_kib,
            kdf_iterations,
        } => commands::repo_init::run(
            cfg,
            &commands::repo_init::Args {
                no_encryption: *no_encryption,
                kdf_memory_kib: *kdf_memory_kib,
                kdf_iterations: *kdf_iterations,
                repo: repo.map(str::to_string),
            },
        ),
        Command::ArchivePush { path } => commands::archive_push::run(cfg, path),
        Command::WalReceive { json } => {
            commands::wal_receive::run(cfg, repo, &commands::wal_receive::Args { json: *json })
        }
        Command::ArchivePushAsync { pg_wal } => commands::archive_async::run_pusher(cfg, pg_wal),
        Command::ArchiveGetPrefetch { spool } => {
            commands::archive_lookahead::run_prefetcher(cfg, repo, spool)
        }
        Command::ArchiveGet { walfile, dest } => {
            commands::archive_get::run(cfg, repo, walfile, dest)
        }
        Command::Info {
            json,
            recoveries_after,
            key_usage,
        } => commands::info::run(cfg, *json, repo, recoveries_after.as_deref(), *key_usage),
        Command::Check => commands::check::run(cfg),
        Command::RepoSync { dry_run, json } => commands::repo_sync::run(
            cfg,
            &commands::repo_sync::Args {
                to: repo.map(str::to_string),
                dry_run: *dry_run,
                json: *json,
            },
        ),
        Command::Backup {
            kind,
            jobs,
            label,
            json,
        } => commands::backup::run(
            cfg,
            &commands::backup::Args {
                kind: kind.clone(),
                jobs: jobs.unwrap_or_else(|| cfg.threads()),
                label: label.clone(),
                json: *json,
                repo: repo.map(str::to_string),
            },
        ),
        Command::Restore {
            target_dir,
            backup,
            target_time,
            target_lsn,
            target_xid,
            target_name,
            target,
            target_action,
            jobs,
            delta,
            tablespace_map,
            db_include,
            json,
        } => {
            use commands::restore::{parse_time, Target};
            let target = if let Some(t) = target_time {
                Target::Time {
                    at: parse_time(t)?,
                    raw: t.clone(),
                }
            } else if let Some(l) = target_lsn {
                Target::Lsn(walshipper::wal::parse_lsn(l).ok_or_else(|| {
                    Error::Invalid(format!("--target-lsn '{l}' is not an LSN like 0/3000028"))
                })?)
            } else if let Some(x) = target_xid {
                if x.parse::<u64>().is_err() {
                    return Err(Error::Invalid(format!(
                        "--target-xid '{x}' is not a transaction id"
                    )));
                }
                Target::Xid(x.clone())
            } else if let Some(n) = target_name {
                Target::Name(n.clone())
            } else if let Some(t) = target {
                if t != "immediate" {
                    return Err(Error::Invalid(format!(
                        "--target '{t}': only 'immediate' is known"
                    )));
                }
                Target::Immediate
            } else {
                Target::End
            };
            let mut map = Vec::new();
            for m in tablespace_map {
                let (oid, dir) = m
                    .split_once('=')
                    .and_then(|(o, d)| Some((o.parse::<u32>().ok()?, PathBuf::from(d))))
                    .ok_or_else(|| {
                        Error::Invalid(format!("--tablespace-map '{m}' is not OID=DIR"))
                    })?;
                map.push((oid, dir));
            }
            commands::restore::run(
                cfg,
                &commands::restore::Args {
                    target_dir: target_dir.clone(),
                    backup: backup.clone(),
                    target,
                    action: target_action.clone(),
                    // One more than the CPUs: restore waits on writes too.
                    jobs: jobs.unwrap_or_else(|| cfg.threads() + 1),
                    delta: *delta,
                    tablespace_map: map,
                    json: *json,
                    repo: repo.map(str::to_string),
                    db_include: db_include.clone(),
                    record: true,
                },
            )
            .map(|_| ())
        }
        Command::Expire {
            dry_run,
            json,
            keep_full,
            recovery_window,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            timezone,
            now,
        } => commands::expire::run(
            cfg,
            &commands::expire::Args {
                dry_run: *dry_run,
                json: *json,
                repo: repo.map(str::to_string),
                keep_full: *keep_full,
                recovery_window: recovery_window.clone(),
                keep_daily: *keep_daily,
                keep_weekly: *keep_weekly,
                keep_monthly: *keep_monthly,
                keep_yearly: *keep_yearly,
                timezone: timezone.clone(),
                now: now.clone(),
            },
        ),
        Command::RestoreTest {
            json,
            backup,
            targets,
            target: immediate,
            check_json,
            scratch_dir,
        } => {
            let checks = check_json
                .iter()
                .map(|c| commands::restore_test::CustomCheck::parse(c))
                .collect::<walshipper::Result<Vec<_>>>()?;
            commands::restore_test::run(
                cfg,
                &commands::restore_test::Args {
                    json: *json,
                    repo: repo.map(str::to_string),
                    backup: backup.clone(),
                    target: targets.target(immediate.as_deref())?,
                    checks,
                    scratch_dir: scratch_dir.clone(),
                },
            )
        }
        Command::TableRestore {
            json,
            database,
            tables,
            into_schema,
            role,
            backup,
            target,
            scratch_dir,
        } => commands::table_restore::run(
            cfg,
            &commands::table_restore::Args {
                json: *json,
                repo: repo.map(str::to_string),
                backup: backup.clone(),
                target: target.target(None)?,
                database: database.clone(),
                tables: tables.clone(),
                schema: into_schema.clone(),
                role: role.clone(),
                scratch_dir: scratch_dir.clone(),
            },
        ),
        Command::Verify { backup, jobs, json } => commands::verify::run(
            cfg,
            repo,
            backup.as_deref(),
            jobs.unwrap_or_else(|| cfg.threads()),
            *json,
        ),
        Command::Serve => walshipper::serve::run(cfg),
        Command::Report { from, to, output } => {
            commands::report::run(cfg, from.as_deref(), to.as_deref(), output.as_deref())
        }
        Command::NotifyTest { channel } => walshipper::notify::test(cfg, channel.as_deref()),
        Command::Key { action } => {
            let r = run_key(cfg, action);
            if r.is_err() {
                let (op, id, json) = match action {
                    KeyCommand::List { .. } => ("", None, false),
                    KeyCommand::Passphrase { finish, json, .. } => (
                        if *finish {
                            "passphrase_finish"
                        } else {
                            "passphrase"
                        },
                        None,
                        *json,
                    ),
                    KeyCommand::Rotate { json } => ("rotate", None, *json),
                    KeyCommand::Retire { key_id, json, .. } => {
                        ("retire", Some(key_id.as_str()), *json)
                    }
                };
                if !op.is_empty() {
                    commands::key::report_failure(op, id, json);
                }
            }
            r
        }
    }
}

fn run_key(cfg: &walshipper::config::Config, action: &KeyCommand) -> walshipper::Result<()> {
    {
        match action {
            KeyCommand::List { json, usage } => commands::key::list::run(cfg, *json, *usage),
            KeyCommand::Passphrase {
                new_file,
                new_stdin,
                keep_old,
                finish,
                json,
            } => {
                use commands::key::passphrase::{Args, NewPassphrase};
                let new = match (new_file, new_stdin) {
                    (Some(f), _) => Some(NewPassphrase::File(f)),
                    (None, true) => Some(NewPassphrase::Stdin),
                    (None, false) if *finish => None,
                    (None, false) => {
                        return Err(Error::Invalid(
                            "key passphrase needs --new-file FILE or --new-stdin (or --finish)"
                                .into(),
                        ))
                    }
                };
                commands::key::passphrase::run(
                    cfg,
                    &Args {
                        new,
                        keep_old: *keep_old,
                        finish: *finish,
                        json: *json,
                    },
                )
            }
            KeyCommand::Rotate { json } => commands::key::rotate::run(cfg, *json),
            KeyCommand::Retire { key_id, jobs, json } => commands::key::retire::run(
                cfg,
                key_id,
                jobs.unwrap_or_else(|| cfg.threads()),
                *json,
            ),
        }
    }
}
