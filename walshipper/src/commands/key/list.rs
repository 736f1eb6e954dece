//! `key list`: the data keys of every configured repository and, with
//! `--usage`, how many objects each seals (`census`).
//!
//! `--json` prints one document (not an event, and not part of the
//! extension's contract; the extension reads `info --json`):
//! `{"repositories": [{"name", "ok", "error", "keys": [key_status...],
//! "keys_counted_at"}]}`.

use pg_backup_contract::KeyStatus;
use serde::Serialize;

use crate::census;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::Repository;

#[derive(Serialize)]
struct Listing {
    repositories: Vec<RepoKeys>,
}

#[derive(Serialize)]
struct RepoKeys {
    name: String,
    ok: bool,
    error: Option<String>,
    keys: Vec<KeyStatus>,
    keys_counted_at: Option<String>,
    /// Headers that could not be read (with --usage), and a few of them.
    #[serde(skip)]
    unreadable: u64,
    #[serde(skip)]
    unreadable_listed: Vec<census::Unreadable>,
}

/// The keys of one repository (and their usage).
fn repo_keys(cfg: &Config, rc: &crate::config::RepoConfig, usage: bool) -> Result<RepoKeys> {
    let repo = Repository::open_repo(cfg, rc)?;
    let census = usage
        .then(|| census::count(&repo, census::default_jobs(cfg)))
        .transpose()?;
    Ok(RepoKeys {
        name: rc.name.clone(),
        ok: true,
        error: None,
        keys: census::key_statuses(&repo, census.as_ref())?,
        keys_counted_at: census.as_ref().map(|c| c.counted_at.clone()),
        unreadable: census.as_ref().map_or(0, |c| c.unreadable),
        unreadable_listed: census.map(|c| c.unreadable_listed).unwrap_or_default(),
    })
}

pub fn run(cfg: &Config, json: bool, usage: bool) -> Result<()> {
    let mut first_err: Option<Error> = None;
    let mut listing = Listing {
        repositories: Vec::new(),
    };
    for rc in &cfg.repos {
        match repo_keys(cfg, rc, usage) {
            Ok(k) => listing.repositories.push(k),
            Err(e) => {
                listing.repositories.push(RepoKeys {
                    name: rc.name.clone(),
                    ok: false,
                    error: Some(e.to_string()),
                    keys: Vec::new(),
                    keys_counted_at: None,
                    unreadable: 0,
                    unreadable_listed: Vec::new(),
                });
                first_err.get_or_insert(e);
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&listing).unwrap_or_default()
        );
    } else {
        for (i, r) in listing.repositories.iter().enumerate() {
            if i > 0 {
                println!();
            }
            println!("repository {}", r.name);
            if let Some(e) = &r.error {
                println!("  UNAVAILABLE: {e}");
                continue;
            }
            print!("{}", key_table(&r.keys, "  "));
            if r.unreadable > 0 {
                println!(
                    "  {} object header(s) could not be read (not counted), e.g.:",
                    r.unreadable
                );
                for u in r.unreadable_listed.iter().take(5) {
                    println!("    {}: {}", u.key, u.reason);
                }
            }
        }
    }
    match first_err {
        None => Ok(()),
        Some(e) => {
            let failed = listing.repositories.iter().filter(|r| !r.ok).count();
            Err(Error::Partial {
                code: e.exit_code(),
                message: format!(
                    "{failed} of {} repositories could not be listed (first: {e})",
                    listing.repositories.len()
                ),
            })
        }
    }
}

/// A small table of keys (id, created, current, objects, bytes) and a note
/// under each that needs one. Shared with `info`.
pub fn key_table(keys: &[KeyStatus], indent: &str) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if keys.is_empty() {
        let _ = writeln!(s, "{indent}no data keys (the repository is not encrypted)");
        return s;
    }
    let _ = writeln!(
        s,
        "{indent}{:<32}  {:<20}  {:<7}  {:>9}  {:>10}",
        "key", "created", "current", "objects", "bytes"
    );
    let current_created = keys
        .iter()
        .find(|k| k.current)
        .and_then(|k| k.created_at.as_deref())
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    for k in keys {
        let created = k
            .created_at
            .as_deref()
            .map(|t| t.get(..19).unwrap_or(t).replace('T', " "))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{indent}{:<32}  {:<20}  {:<7}  {:>9}  {:>10}",
            k.key_id,
            created,
            if k.current { "yes" } else { "" },
            k.objects.map_or("-".to_string(), |n| n.to_string()),
            k.bytes
                .map_or("-".to_string(), crate::commands::info::human)
        );
        if !k.present {
            let _ = writeln!(
                s,
                "{indent}  MISSING: keys/{}.json is not in the repository; the objects it sealed cannot be read. Restore the key file from another copy of the repository",
                k.key_id
            );
        } else if let Some(e) = &k.error {
            let _ = writeln!(s, "{indent}  DAMAGED key file: {e}");
        } else if !k.current && k.objects == Some(0) {
            let _ = writeln!(
                s,
                "{indent}  unused: seals no object (harmless; `walshipper key retire {}` removes it)",
                k.key_id
            );
        } else if !k.current
            && k.objects.is_none()
            && current_created.is_some()
            && k.created_at
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                > current_created
        {
            let _ = writeln!(
                s,
                "{indent}  newer than the current key: most likely left by an interrupted `key rotate` before any repository used it (harmless; `--usage` counts what it seals, `key retire` removes it)"
            );
        }
    }
    s
}
