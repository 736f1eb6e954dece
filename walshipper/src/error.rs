//! Typed errors. Each variant says what went wrong and, where the user can
//! act, what to do; `exit_code` maps them to the process status contract
//! documented in docs/operations.md.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file or environment variable is wrong.
    #[error("configuration error: {0}")]
    Config(String),

    /// The command line or an input file is not acceptable.
    #[error("{0}")]
    Invalid(String),

    /// A file that is not a WAL segment, history or backup-history file of this cluster.
    #[error("refusing {path}: {reason}")]
    InvalidWal { path: PathBuf, reason: String },

    /// The repository is missing, of another cluster, or of an unknown format.
    #[error("repository error: {0}")]
    Repository(String),

    /// A stored object failed a check (frame CRC, authentication tag, size, SHA-256).
    #[error("stored object {key} is damaged: {reason}")]
    Corrupt { key: String, reason: String },

    /// The passphrase does not open the repository's key.
    #[error("wrong passphrase: it does not unlock key {key_id} of the repository (check WALSHIPPER_PASSPHRASE, [encryption] passphrase_command or passphrase_file, whichever is in use; if the passphrase is right, keys/{key_id}.json was altered: restore it from another copy of the repository)")]
    WrongPassphrase { key_id: String },

    /// The object asked for is not in the repository.
    #[error("{0} is not in the repository")]
    NotFound(String),

    /// An object with this name exists with other content; nothing was overwritten.
    #[error("{name} is already archived with different content (stored {stored}, local {local}); nothing was overwritten. Two clusters may be archiving to one repository: check archive_command on every server")]
    Conflict {
        name: String,
        stored: String,
        local: String,
    },

    /// A storage backend failed.
    #[error("storage {op} {key}: {source}")]
    Storage {
        op: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {}", pg_text(source))]
    Postgres {
        context: String,
        #[source]
        source: postgres::Error,
    },

    /// Another process holds the lock this operation needs.
    #[error("{0}")]
    Busy(String),

    /// A backup refused before it started: the repository would be left
    /// with less than its `min_free_space` (the message gives the figures).
    #[error("{0}")]
    NoSpace(String),

    /// verify found damaged or missing data.
    #[error("{0}")]
    VerifyFailed(String),

    /// A check (`walshipper check`) found a problem.
    #[error("check failed: {0}")]
    Check(String),

    /// A command that works on several repositories failed on some of them
    /// (each already reported); `code` is the first failure's exit code.
    #[error("{message}")]
    Partial { code: i32, message: String },
}

/// Process exit codes: one definition, in the contract crate the extension
/// reads too (docs/contract.md). archive-get uses only 0, 1, 126 and 128
/// (and 3 on a standby): see commands::archive_get.
pub use pg_backup_contract::exit;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Error::NotFound(_) => exit::NOT_FOUND,
            Error::Config(_) | Error::Invalid(_) | Error::InvalidWal { .. } => exit::USAGE,
            Error::Repository(_)
            | Error::Storage { .. }
            | Error::Io { .. }
            | Error::Postgres { .. } => exit::UNAVAILABLE,
            Error::Conflict { .. } => exit::CONFLICT,
            Error::Check(_) => exit::CHECK_FAILED,
            Error::VerifyFailed(_) => exit::VERIFY_FAILED,
            Error::Busy(_) => exit::BUSY,
            Error::NoSpace(_) => exit::NO_SPACE,
            Error::Corrupt { .. } | Error::WrongPassphrase { .. } => exit::DAMAGED,
            Error::Partial { code, .. } => *code,
        }
    }

    /// The kind of error, as the error event names it (`exit::kind`).
    pub fn kind(&self) -> &'static str {
        exit::kind(self.exit_code())
    }

    /// What to do about it, in a few words; None where the message already
    /// says it or there is nothing general to say.
    pub fn hint(&self) -> Option<&'static str> {
        Some(match self {
            Error::Config(_) => "fix the configuration file (--config, WALSHIPPER_CONFIG) or the WALSHIPPER_* variable the message names",
            Error::Invalid(_) => "fix what the message names (an option, a target, a name); walshipper <command> --help lists the options",
            Error::InvalidWal { .. } => "archive-push takes only this cluster's WAL files: archive_command should pass %p",
            Error::Repository(_) => "check the [repo] settings; a new repository is created with walshipper repo-init",
            Error::Corrupt { .. } => "run walshipper verify; a second repository holding an intact copy repairs it (repo-sync)",
            Error::WrongPassphrase { .. } => "check the passphrase source: WALSHIPPER_PASSPHRASE, else [encryption] passphrase_command, else passphrase_file",
            Error::NotFound(_) => "walshipper info lists what the repository holds",
            Error::Conflict { .. } => "check archive_command on every server: two clusters may archive to one repository",
            Error::Storage { .. } => "check that the store is reachable and the credentials are right, then retry",
            Error::Io { .. } => "check the path, its permissions and the free space",
            Error::Postgres { .. } => "check that the server runs and that [pg] host, port, user, database and sslmode let walshipper connect",
            Error::Busy(_) => "another backup or expire holds the repository: retry after it ends",
            Error::NoSpace(_) => "free space in the repository (walshipper expire, or a shorter retention), grow its volume or quota, or lower the repository's min_free_space",
            Error::VerifyFailed(_) => "the lines above name what is damaged or missing; repair it from another repository (repo-sync) or take a new backup",
            Error::Check(_) => "fix what the message names and run walshipper check again",
            Error::Partial { .. } => "the error of each repository is reported above; the others were done",
        })
    }

    /// The error as a `--json` error event.
    pub fn event(&self, repository: Option<&str>) -> pg_backup_contract::Event {
        pg_backup_contract::Event::Error(pg_backup_contract::ErrorEvent {
            code: self.exit_code(),
            kind: self.kind().to_string(),
            message: self.to_string(),
            hint: self.hint().map(str::to_string),
            repository: repository.map(str::to_string),
        })
    }
}

/// The server's own words for a PostgreSQL error: the client library's
/// Display of a server error is only "db error".
fn pg_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut t = format!("{}: {}", db.severity(), db.message());
            if let Some(d) = db.detail() {
                t.push_str(&format!(" ({d})"));
            }
            t
        }
        // The causes too: a refused certificate is only named in them.
        None => {
            let mut t = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                t.push_str(&format!(": {c}"));
                cause = c.source();
            }
            t
        }
    }
}
