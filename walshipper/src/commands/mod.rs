//! The CLI verbs. Each takes the loaded configuration and its own arguments;
//! main.rs only parses arguments and maps errors to exit codes.

pub mod archive_async;
pub mod archive_get;
pub mod archive_lookahead;
pub mod archive_push;
pub mod backup;
pub mod check;
pub mod expire;
pub mod info;
pub mod key;
pub mod repo_init;
pub mod repo_sync;
pub mod report;
pub mod restore;
pub mod restore_test;
pub mod table_restore;
pub mod verify;
pub mod wal_receive;
