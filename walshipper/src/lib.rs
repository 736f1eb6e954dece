//! walshipper: the data plane of pg_backup.
//!
//! Layout follows the architecture: `codec` is the one data path every stored
//! byte goes through (checksum, zstd, AES-256-GCM frames); `storage` is the
//! small backend trait and its drivers; `repo` ties codec, keys and storage
//! into a repository; `wal` knows PostgreSQL's WAL files; `commands` are the
//! CLI verbs.

pub mod bundle;
pub mod catalog;
pub mod census;
pub mod codec;
pub mod commands;
pub mod config;
pub mod delta;
pub mod error;
pub mod failpoint;
pub mod file_list;
pub mod keys;
pub mod layout;
pub mod lock;
pub mod manifest;
pub mod notify;
pub mod page;
pub mod passphrase;
pub mod pg;
pub mod pgdata;
pub mod private_dir;
pub mod progress;
pub mod recovery_log;
pub mod replication;
pub mod repo;
pub(crate) mod requester;
pub mod retention;
pub mod scratch;
pub mod serve;
pub mod spool;
pub mod sql;
pub mod storage;
pub mod stream;
pub mod summary_cache;
pub mod tls;
pub mod wal;

pub use error::{Error, Result};
