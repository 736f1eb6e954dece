//! The walshipper command line. Parsing and exit codes only; the work is in
//! the library's `commands`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use walshipper::commands;
use walshipper::config::Config;
use walshipper::error::{exit, Error};

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
    /// Show what the repository holds.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Check the server's archiving end to end.
    Check,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WALSHIPPER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE as u8 } else { 0 });
        }
    };
    init_logging();
    let result = Config::load(cli.config.as_deref()).and_then(|cfg| run(&cfg, &cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A missing WAL file is a normal probe during recovery: stay quiet.
        Err(Error::NotFound(_)) if matches!(cli.command, Command::ArchiveGet { .. }) => {
            ExitCode::from(exit::NOT_FOUND as u8)
        }
        Err(e) => {
            eprintln!("walshipper: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(cfg: &Config, command: &Command) -> walshipper::Result<()> {
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
            },
        ),
        Command::ArchivePush { path } => commands::archive_push::run(cfg, path),
        Command::ArchiveGet { walfile, dest } => commands::archive_get::run(cfg, walfile, dest),
        Command::Info { json } => commands::info::run(cfg, *json),
        Command::Check => commands::check::run(cfg),
    }
}
