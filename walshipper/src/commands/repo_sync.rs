//! `repo-sync`: makes every repository hold what any other holds: WAL files,
//! complete backups (files first, manifest last) and keys. Objects are
//! copied byte for byte and verified on the way (a damaged source object is
//! reported and skipped, never copied). Backups that are incomplete in the
//! source (no manifest) are not copied.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::layout;
use crate::repo::Repository;

pub struct Args {
    /// Only copy into this repository (default: every one).
    pub to: Option<String>,
    pub dry_run: bool,
    pub json: bool,
}

#[derive(Serialize, Default)]
struct Report {
    repository: String,
    wal_copied: Vec<String>,
    backups_copied: Vec<String>,
    keys_copied: usize,
    failed: Vec<String>,
}

/// What a repository holds, by object key.
struct Holdings {
    wal: BTreeSet<String>,
    /// Complete backups: id → every object key of it (manifest included).
    backups: std::collections::BTreeMap<String, Vec<String>>,
    keys: BTreeSet<String>,
    /// Every WAL and backup object key, for "does this repository have it".
    objects: std::collections::HashSet<String>,
}

/// Lists what `repo` holds. Listings are untrusted: only keys `layout`
/// accepts are copied (a key like `backups/../x` is never used as a path
/// on the other side); the rest is reported and left alone.
fn holdings(repo: &Repository) -> Result<Holdings> {
    let mut wal = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let mut all: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut foreign = 0usize;
    for prefix in [
        layout::WAL_PREFIX,
        layout::KEYS_PREFIX,
        layout::BACKUPS_PREFIX,
    ] {
        for m in repo.storage.list(prefix)? {
            match layout::parse(&m.key) {
                Some(layout::ObjectName::Wal { .. }) if prefix == layout::WAL_PREFIX => {
                    wal.insert(m.key);
                }
                Some(layout::ObjectName::KeyFile { .. }) if prefix == layout::KEYS_PREFIX => {
                    keys.insert(m.key);
                }
                Some(layout::ObjectName::Backup { id, .. }) if prefix == layout::BACKUPS_PREFIX => {
                    all.entry(id).or_default().push(m.key);
                }
                _ => {
                    foreign += 1;
                    tracing::warn!(
                        "repository {}: ignoring {:?}, not a key walshipper writes",
                        repo.name,
                        m.key
                    );
                }
            }
        }
    }
    if foreign > 0 {
        eprintln!(
            "repository {}: {foreign} foreign object(s) ignored (see the log)",
            repo.name
        );
    }
    let backups: std::collections::BTreeMap<String, Vec<String>> = all
        .into_iter()
        .filter(|(id, keys)| keys.contains(&layout::manifest(id)))
        .collect();
    let objects = wal
        .iter()
        .cloned()
        .chain(backups.values().flatten().cloned())
        .collect();
    Ok(Holdings {
        wal,
        backups,
        keys,
        objects,
    })
}

pub fn run(cfg: &Config, args: &Args) -> Result<()> {
    if cfg.repos.len() < 2 {
        return Err(Error::Invalid(
            "repo-sync needs at least two repositories ([[repo]] entries in the configuration)"
                .into(),
        ));
    }
    if let Some(n) = &args.to {
        cfg.find_repo(Some(n))?;
    }
    let mut repos = Vec::new();
    for rc in &cfg.repos {
        let repo = Repository::open_repo(cfg, rc)?;
        let h = holdings(&repo)?;
        repos.push((repo, h));
    }
    let sysid = repos[0].0.descriptor.system_identifier.clone();
    if let Some((r, _)) = repos
        .iter()
        .find(|(r, _)| r.descriptor.system_identifier != sysid)
    {
        return Err(Error::Repository(format!(
            "repository {} belongs to another cluster (system {}, not {sysid})",
            r.name, r.descriptor.system_identifier
        )));
    }
    let mut failures = 0;
    for t in 0..repos.len() {
        let (target, have) = &repos[t];
        if args.to.as_deref().is_some_and(|n| n != target.name) {
            continue;
        }
        let mut report = Report {
            repository: target.name.clone(),
            ..Default::default()
        };
        let sources: Vec<&(Repository, Holdings)> = repos
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != t)
            .map(|(_, r)| r)
            .collect();
        // Keys first: every object copied after them can be read.
        for (src, h) in &sources {
            for key in h.keys.difference(&have.keys) {
                if !args.dry_run {
                    let body = src.read_raw(key)?;
                    target
                        .storage
                        .put_new(key, &mut &body[..], crate::storage::Durability::Now)?;
                }
                report.keys_copied += 1;
            }
        }
        let mut copy = |key: &str, label: &str, report: &mut Report| -> bool {
            if args.dry_run {
                return true;
            }
            for (src, h) in &sources {
                if !h.objects.contains(key) {
                    continue;
                }
                match target.copy_object_from(src, key) {
                    Ok(_) => return true,
                    Err(e) => {
                        eprintln!("{label}: from {}: {e}", src.name);
                    }
                }
            }
            report.failed.push(key.to_string());
            failures += 1;
            false
        };
        let missing_wal: BTreeSet<&String> = sources
            .iter()
            .flat_map(|(_, h)| h.wal.iter())
            .filter(|k| !have.wal.contains(*k))
            .collect();
        for key in missing_wal {
            if copy(key, key, &mut report) {
                report
                    .wal_copied
                    .push(key.rsplit('/').next().unwrap_or(key).to_string());
            }
        }
        let mut done = BTreeSet::new();
        let mut unsatisfied = 0;
        for (src, h) in &sources {
            for (id, keys) in &h.backups {
                if have.backups.contains_key(id) || !done.insert(id.clone()) {
                    continue;
                }
                let manifest = layout::manifest(id);
                // A diff/incr refers to earlier backups' objects: those
                // backups (copied before it, ids sort by time) must be there.
                // A damaged manifest is not copied; the others still are.
                let m = match src.find_backup(id) {
                    Ok(m) => m,
                    Err(e @ Error::Corrupt { .. }) => {
                        eprintln!("backup {id}: not copied from {}: {e}", src.name);
                        done.remove(id);
                        report.failed.push(manifest.clone());
                        unsatisfied += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if let Some(dep) = m
                    .depends_on()
                    .into_iter()
                    .find(|d| !have.backups.contains_key(d) && !report.backups_copied.contains(d))
                {
                    if !args.dry_run {
                        eprintln!(
                            "backup {id}: not copied, it is based on backup {dep}, which {} does not hold",
                            target.name
                        );
                        report.failed.push(manifest.clone());
                        unsatisfied += 1;
                        continue;
                    }
                }
                // An earlier interrupted copy may have left some files: they
                // are kept (identical bytes) and only the rest is copied.
                let mut ok = true;
                for key in keys.iter().filter(|k| **k != manifest) {
                    if target.storage.head(key)?.is_some() {
                        continue;
                    }
                    ok &= copy(key, &format!("backup {id}"), &mut report);
                }
                if ok && !args.dry_run {
                    target.storage.flush()?;
                }
                if ok && copy(&manifest, &format!("backup {id}"), &mut report) {
                    if !args.dry_run {
                        target.storage.flush()?;
                    }
                    report.backups_copied.push(id.clone());
                }
            }
        }
        failures += unsatisfied;
        if !args.dry_run {
            target.storage.flush()?;
        }
        let verb = if args.dry_run { "would copy" } else { "copied" };
        if args.json {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
        } else {
            println!(
                "{}: {verb} {} WAL files, {} backups{}{}",
                report.repository,
                report.wal_copied.len(),
                report.backups_copied.len(),
                if report.keys_copied > 0 {
                    format!(", {} keys", report.keys_copied)
                } else {
                    String::new()
                },
                if report.failed.is_empty() {
                    String::new()
                } else {
                    format!("; {} objects FAILED", report.failed.len())
                }
            );
        }
    }
    if failures > 0 {
        return Err(Error::VerifyFailed(format!(
            "{failures} objects could not be copied (see above); the repositories are not in step"
        )));
    }
    Ok(())
}
