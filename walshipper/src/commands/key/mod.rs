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

use crate::error::{Error, Result};
use crate::layout::{self, ObjectName};
use crate::repo::Repository;

/// Refuses (`what` is the operation, for the message) unless every key file
/// of `r` has one wrapping and `pass` opens it. Two wrappings are a
/// passphrase change between its stages; a file `pass` does not open is
/// wrapped by another passphrase. Either way a key written now would be
/// wrapped by `pass` alone, and no single passphrase would open the
/// repository any more. Costs one Argon2 run per key file.
pub fn check_one_passphrase(r: &Repository, pass: &[u8], what: &str) -> Result<()> {
    for obj in r.storage.list(layout::KEYS_PREFIX)? {
        let Some(ObjectName::KeyFile { key_id }) = layout::parse(&obj.key) else {
            continue;
        };
        let Some(f) = r.key_file(&key_id)? else {
            continue;
        };
        if f.slots.len() > 1 {
            return Err(Error::Invalid(format!(
                "a passphrase change is under way in repository {}: keys/{key_id}.json is wrapped by {} passphrases. A key written by {what} now would be wrapped by the configured one only, and hosts on the other could no longer open the repository. Finish the change first (`walshipper key passphrase --finish` once every host has the new passphrase); nothing was changed",
                r.name,
                f.slots.len()
            )));
        }
        if let Err(e) = f.unlock(pass) {
            return Err(Error::Invalid(format!(
                "keys/{key_id}.json of repository {} does not open with the configured passphrase ({e}). A key written by {what} now would need another passphrase than the others. Check the passphrase source (a secret store may already give a new passphrase: change it with `walshipper key passphrase` first), or restore that key file from a copy of the repository; nothing was changed",
                r.name
            )));
        }
    }
    Ok(())
}

/// Whether this process printed its `key` event (see [`report_failure`]).
static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The `key` event of a run that failed before it had anything to report
/// per repository (a refusal, a lock held, a census that could not list):
/// docs/contract.md promises one `key` event, also when it failed.
pub fn report_failure(operation: &str, key_id: Option<&str>, json: bool) {
    if json && !REPORTED.load(std::sync::atomic::Ordering::SeqCst) {
        print_report(
            &KeyReport {
                operation: operation.into(),
                succeeded: false,
                key_id: key_id.map(str::to_string),
                ..Default::default()
            },
            json,
        );
    }
}

/// Prints the report (`--json`: one `key` event; else a few lines).
pub fn print_report(report: &KeyReport, json: bool) {
    REPORTED.store(true, std::sync::atomic::Ordering::SeqCst);
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
