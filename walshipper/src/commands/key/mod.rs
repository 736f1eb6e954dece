//! `walshipper key ...`: the lifecycle of a repository's data keys and the
//! passphrase that wraps them (docs/repository-format.md, "Key lifecycle").
//! Every operation acts on every configured repository: copies share their
//! keys, so one that was left behind could no longer take objects from the
//! others as they are.
//!
//! - `passphrase.rs`: re-wrap every key file under a new passphrase (two
//!   stages, so that a crash leaves each repository openable by the old or
//!   the new passphrase, never by neither).
//! - `rotate.rs`: a new data key becomes current.
//! - `retire.rs`: re-encrypt what an old key sealed, then remove its file;
//!   `reseal.rs`: one object re-encrypted, checked, and only then replaced.
//! - `list.rs`: the keys of each repository and, on request, what each seals.

pub mod list;
pub mod passphrase;
pub mod reseal;
pub mod retire;
pub mod rotate;

use pg_backup_contract::{Event, KeyReport};

/// Prints the report (`--json`: one `key` event; else a few lines).
pub fn print_report(report: &KeyReport, json: bool) {
    if json {
        crate::progress::event(&Event::Key(report.clone()));
        return;
    }
    for r in &report.repositories {
        match &r.error {
            None => println!(
                "{}: {} ok (current key {})",
                r.repository,
                report.operation,
                r.current_key_id.as_deref().unwrap_or("-")
            ),
            Some(e) => println!("{}: {} FAILED: {e}", r.repository, report.operation),
        }
    }
}
