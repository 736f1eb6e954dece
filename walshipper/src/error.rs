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
    #[error("wrong passphrase: it does not unlock key {key_id} of the repository (check [encryption] passphrase_file or WALSHIPPER_PASSPHRASE; if the passphrase is right, keys/{key_id}.json was altered: restore it from another copy of the repository)")]
    WrongPassphrase { key_id: String },

    /// The object asked for is not in the repository.
    #[error("{0} is not in the repository")]
    NotFound(String),

    /// An object with this name exists with other content; nothing was overwritten.
    #[error("{name} is already archived with different content (stored SHA-256 {stored}, local SHA-256 {local}); nothing was overwritten. Two clusters may be archiving to one repository: check archive_command on every server")]
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

    #[error("{context}: {source}")]
    Postgres {
        context: String,
        #[source]
        source: postgres::Error,
    },

    /// Another process holds the lock this operation needs.
    #[error("{0}")]
    Busy(String),

    /// verify found damaged or missing data.
    #[error("{0}")]
    VerifyFailed(String),

    /// A check (`walshipper check`) found a problem.
    #[error("check failed: {0}")]
    Check(String),
}

/// Process exit codes. archive-get's codes matter to PostgreSQL: 1 means
/// "no such file" (a normal probe); any status above 125 makes recovery stop
/// with FATAL, which is what we want for damage or a wrong key: carrying on
/// would silently end recovery early and lose data. archive-get therefore
/// uses only 0, 1, 126 and 128 (and 3 on a standby, which never promotes on
/// its own): see commands::archive_get.
pub mod exit {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const UNAVAILABLE: i32 = 3;
    pub const CONFLICT: i32 = 4;
    pub const CHECK_FAILED: i32 = 5;
    pub const VERIFY_FAILED: i32 = 6;
    pub const BUSY: i32 = 7;
    pub const DAMAGED: i32 = 126;
    /// archive-get: the file could not be fetched for another reason than
    /// "not there" (store unreachable, configuration or passphrase
    /// unreadable, destination not writable), still after retrying for
    /// `restore.archive_get_retry_timeout`. Above 125 so that recovery
    /// stops instead of ending early; not 126/127, which PostgreSQL's log
    /// calls "command not executable" / "command not found".
    pub const RECOVERY_STOP: i32 = 128;
}

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
            Error::Corrupt { .. } | Error::WrongPassphrase { .. } => exit::DAMAGED,
        }
    }
}
