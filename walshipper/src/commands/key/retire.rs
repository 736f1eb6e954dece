//! `key retire`: re-encrypt every object an old key sealed under the current
//! key, then remove the old key's file.
//!
//! On every configured repository (copies share their keys), holding its
//! keys lock and its repository lock (no backup sealing with an old
//! descriptor, no expire deleting objects meanwhile) for the whole run:
//!
//! 1. census: which objects name the key in their header;
//! 2. each is re-sealed in parallel (`reseal.rs`: decoded and verified,
//!    re-sealed, written beside the original, read back, and only then
//!    replacing it); crash point `key-retire` after each replace;
//! 3. census again, until one finds none (objects archived meanwhile by a
//!    process that still sealed with the old key), at most `MAX_ROUNDS`;
//! 4. then, and only then, `keys/<id>.json` is deleted from that
//!    repository, and this host's cache entry for the key.
//!
//! Until 4 the old key is in the repository, so every object, whichever
//! key seals it, is readable at every moment: a kill leaves a mix of old-
//! and new-key objects and at most temporaries (removed by the next run).
//! A damaged object is reported and left as it is; the key file is then
//! kept, and the command fails.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pg_backup_contract::{KeyRepoResult, KeyReport};

use super::reseal::{self, Outcome};
use crate::census::Sealing;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::keys::{is_lower_hex, KeyCache};
use crate::layout;
use crate::progress::{Counters, Reporter};
use crate::repo::Repository;
use crate::storage::ObjectMeta;

/// Censuses after the first that may still find objects sealed by the key
/// (each after a round that re-sealed all it found). Only a writer that
/// keeps sealing with the retired key could use them all.
const MAX_ROUNDS: usize = 5;
/// Messages about single objects printed in the report, at most.
const MAX_PROBLEMS: usize = 20;

pub fn run(cfg: &Config, key_id: &str, jobs: usize, json: bool) -> Result<()> {
    let started = Instant::now();
    // Header reads wait on the store, not on a core: the census's own count.
    let census_jobs = crate::census::default_jobs(cfg);
    if !is_lower_hex(key_id, 32) {
        return Err(Error::Invalid(format!(
            "{key_id:.40?} is not a key id: 32 lowercase hex digits, as `walshipper key list` shows them"
        )));
    }
    let old: [u8; 16] = hex::decode(key_id)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::Invalid(format!("{key_id} is not a key id")))?;
    // Refusals first, before any lock is taken: bad input changes nothing.
    let repos = open_all(cfg)?;
    check_retirable(&repos, key_id)?;
    let mut has_file = false;
    for r in &repos {
        has_file |= r.storage.head(&layout::key_file(key_id))?.is_some();
    }
    if !has_file {
        // Without its file nowhere can anything be done: say why.
        let mut sealed = 0;
        for r in &repos {
            sealed += census(r, &old, census_jobs, &mut HashSet::new())?
                .sealed
                .len();
        }
        return Err(no_key_file(key_id, sealed));
    }
    drop(repos);
    let mut locks = Vec::new();
    for rc in &cfg.repos {
        locks.push(crate::lock::keys(rc)?);
        locks.push(crate::lock::repository(rc, "")?);
    }
    // Opened again under the locks: a rotation may have ended meanwhile.
    let repos = open_all(cfg)?;
    check_retirable(&repos, key_id)?;
    let settle_until = settle_deadline(cfg, &repos[0]);

    // The old key, from whichever repository still holds its file (copies
    // share keys: one that lost it can still have its objects re-sealed).
    let mut unlocked = None;
    let mut unlock_error = None;
    for r in &repos {
        match r.unlock_key(key_id) {
            Ok(Some(k)) => {
                unlocked = Some(k);
                break;
            }
            Ok(None) => {}
            // Another copy's file may still open.
            Err(e) => {
                tracing::warn!("repository {}: key {key_id}: {e}", r.name);
                unlock_error.get_or_insert(e);
            }
        }
    }
    if let (None, Some(e)) = (&unlocked, unlock_error) {
        return Err(e);
    }
    let counters = Arc::new(Counters::default());
    // From the census on (it reads every header: minutes on a large S3
    // repository), so that the totals are seen growing.
    let reporter = Reporter::start("retire", counters.clone(), json);
    let mut censuses = Vec::new();
    for r in &repos {
        let mut seen = HashSet::new();
        let c = census(r, &old, census_jobs, &mut seen)?;
        counters
            .files_total
            .fetch_add(c.sealed.len() as u64, Ordering::Relaxed);
        counters.bytes_total.fetch_add(
            c.sealed.iter().map(|m| m.size).sum::<u64>(),
            Ordering::Relaxed,
        );
        censuses.push((c, seen));
    }
    let Some(old_key) = unlocked else {
        // (its file went between the check above and the locks)
        let sealed: usize = censuses.iter().map(|(c, _)| c.sealed.len()).sum();
        return Err(no_key_file(key_id, sealed));
    };
    for r in &repos {
        r.hold_key(old_key.clone());
    }
    drop(old_key);

    let mut results = Vec::new();
    let mut first_error: Option<Error> = None;
    for (i, (r, (c, seen))) in repos.iter().zip(censuses).enumerate() {
        // This repository's keys and repository locks (taken in this order).
        let held = &locks[2 * i..2 * i + 2];
        let res = retire_in(
            cfg,
            r,
            held,
            key_id,
            &old,
            (jobs, census_jobs),
            c,
            seen,
            &counters,
            settle_until,
        );
        if let (Some(e), None) = (&res.error, &first_error) {
            first_error = Some(Error::Partial {
                code: res.code,
                message: format!("repository {}: {e}", r.name),
            });
        }
        if !json {
            println!(
                "{}: {} objects re-sealed ({} bytes), {} still sealed by {key_id}; key file {}",
                r.name,
                res.result.objects_rewritten,
                res.result.bytes_rewritten,
                res.result.objects_remaining,
                if res.result.key_file_removed {
                    "removed"
                } else {
                    "kept"
                }
            );
        }
        results.push(res.result);
    }
    drop(reporter);
    if results.iter().all(|r| r.key_file_removed) {
        if let Some(dir) = cfg.key_cache_dir() {
            KeyCache::new(dir).remove(key_id);
        }
        tracing::info!("key {key_id} is retired from every repository");
    }
    super::print_report(
        &KeyReport {
            operation: "retire".into(),
            succeeded: first_error.is_none(),
            key_id: Some(key_id.to_string()),
            repositories: results,
            duration_s: started.elapsed().as_secs_f64(),
            ..Default::default()
        },
        json,
    );
    drop(locks);
    match first_error {
        None => Ok(()),
        Some(Error::Partial { code, message }) => Err(Error::Partial {
            code,
            message: format!(
                "{message}; key {key_id} was kept where objects still need it. Run `walshipper key retire {key_id}` again once that is fixed: it resumes"
            ),
        }),
        Some(e) => Err(e),
    }
}

/// No configured repository holds the key's file; `sealed` objects name it.
fn no_key_file(key_id: &str, sealed: usize) -> Error {
    if sealed == 0 {
        return Error::Invalid(format!(
            "no configured repository has key {key_id}, nor any object sealed by it (`walshipper key list` shows the keys); nothing was changed"
        ));
    }
    Error::Repository(format!(
        "{sealed} objects are sealed by key {key_id}, but no configured repository holds {}; they cannot be read. Restore that key file from another copy of the repository, then run key retire again; nothing was changed",
        layout::key_file(key_id)
    ))
}

fn open_all(cfg: &Config) -> Result<Vec<Repository>> {
    let mut repos = Vec::new();
    for (_, r) in Repository::open_all(cfg) {
        let r = r?;
        if r.current_key().is_none() {
            return Err(Error::Invalid(format!(
                "repository {} is not encrypted: it has no keys to retire",
                r.name
            )));
        }
        repos.push(r);
    }
    Ok(repos)
}

/// The key may be retired: it is current nowhere.
fn check_retirable(repos: &[Repository], key_id: &str) -> Result<()> {
    if let Some(r) = repos
        .iter()
        .find(|r| r.descriptor.current_key_id.as_deref() == Some(key_id))
    {
        return Err(Error::Invalid(format!(
            "key {key_id} is the current key of repository {}: new WAL and backups are sealed by it. Run `walshipper key rotate` first, then retire it; nothing was changed",
            r.name
        )));
    }
    Ok(())
}

/// Which objects a key seals in one repository.
#[derive(Default)]
struct Census {
    sealed: Vec<ObjectMeta>,
    /// Objects whose header could not be read: which key sealed them is
    /// unknown, so the key file is kept while they exist.
    unreadable: Vec<(String, String)>,
}

/// The objects whose header names `old` (crate::census), among those whose
/// names are not in `seen`; every name listed is added to it. A later
/// census needs only the new names: no writer turns an existing object into
/// one sealed by a retired key (WAL and repo-sync only create names; backup
/// and expire, which could replace or remove them, are locked out), and
/// every object sealed by it that an earlier census found was re-sealed or
/// reported.
fn census(
    repo: &Repository,
    old: &[u8; 16],
    jobs: usize,
    seen: &mut HashSet<String>,
) -> Result<Census> {
    let objects: Vec<ObjectMeta> = repo
        .sealed_objects()?
        .into_iter()
        .filter(|m| seen.insert(m.key.clone()))
        .collect();
    let out = Mutex::new(Census::default());
    crate::census::for_each_sealing(repo, &objects, jobs, |m, s| match s {
        Sealing::Key(id) if id == *old => lock(&out).sealed.push(m.clone()),
        Sealing::Unreadable(reason) => lock(&out).unreadable.push((m.key.clone(), reason)),
        Sealing::Key(_) | Sealing::Plain | Sealing::Vanished => {}
    });
    let mut c = out.into_inner().unwrap_or_else(|p| p.into_inner());
    c.sealed.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(c)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f(0..n)` on up to `jobs` threads.
fn parallel(n: usize, jobs: usize, f: impl Fn(usize) + Sync) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                f(i);
            });
        }
    });
}

struct RepoOutcome {
    result: KeyRepoResult,
    error: Option<String>,
    code: i32,
}

/// Where the S3 driver keeps its local copies: private to this repository
/// (and its copies, which share the id), emptied of what a killed run left.
fn spool_dir(cfg: &Config, repo: &Repository) -> PathBuf {
    cfg.restore_test
        .scratch_dir
        .join("key-retire")
        .join(&repo.descriptor.repository_id)
}

fn clean_spool(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let ours = name
            .to_str()
            .is_some_and(|n| n.starts_with('.') && n.ends_with(".reseal"));
        if ours && e.file_type().is_ok_and(|t| t.is_file()) {
            tracing::info!(
                "removing {} (left by an interrupted run)",
                e.path().display()
            );
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Retires the key from one repository: rounds of re-sealing until a
/// census finds nothing, then the key file goes.
#[allow(clippy::too_many_arguments)]
fn retire_in(
    cfg: &Config,
    repo: &Repository,
    held: &[crate::lock::Lock],
    key_id: &str,
    old: &[u8; 16],
    (jobs, census_jobs): (usize, usize),
    first: Census,
    mut seen: HashSet<String>,
    counters: &Counters,
    mut settle_until: Option<Instant>,
) -> RepoOutcome {
    let mut result = KeyRepoResult {
        repository: repo.name.clone(),
        current_key_id: repo.descriptor.current_key_id.clone(),
        ..Default::default()
    };
    let spool = spool_dir(cfg, repo);
    clean_spool(&spool);
    let mut census_now = Some(first);
    let mut problems: Vec<String> = Vec::new();
    let mut code = 0;
    let mut rounds = 0;
    let fail = |result: KeyRepoResult, problems: Vec<String>, code: i32| {
        let mut message = problems
            .iter()
            .take(MAX_PROBLEMS)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if problems.len() > MAX_PROBLEMS {
            message.push_str(&format!("; and {} more", problems.len() - MAX_PROBLEMS));
        }
        let mut result = result;
        result.ok = false;
        result.error = Some(message.clone());
        RepoOutcome {
            result,
            error: Some(message),
            code,
        }
    };
    loop {
        let c = match census_now.take() {
            Some(c) => c,
            None => match census(repo, old, census_jobs, &mut seen) {
                Ok(c) => {
                    counters
                        .files_total
                        .fetch_add(c.sealed.len() as u64, Ordering::Relaxed);
                    counters.bytes_total.fetch_add(
                        c.sealed.iter().map(|m| m.size).sum::<u64>(),
                        Ordering::Relaxed,
                    );
                    c
                }
                Err(e) => {
                    problems.push(format!("census: {e}"));
                    return fail(result, problems, e.exit_code());
                }
            },
        };
        for (key, reason) in &c.unreadable {
            problems.push(format!(
                "{key}: its header could not be read ({reason}), so the key that sealed it is unknown"
            ));
            code = crate::error::exit::DAMAGED;
        }
        if c.sealed.is_empty() {
            if !problems.is_empty() {
                result.objects_remaining = c.unreadable.len() as u64;
                return fail(result, problems, code);
            }
            // A writer that opened the repository before the rotation may
            // still seal with the key: wait out `retire_settle`, then look
            // at the names that appeared meanwhile once more.
            if let Some(t) = settle_until.take() {
                let now = Instant::now();
                if t > now {
                    tracing::info!(
                        "repository {}: nothing is sealed by key {key_id} any more; waiting {} s ([encryption] retire_settle after the rotation, at least {} s) for writers that opened the repository before it, then looking again",
                        repo.name,
                        (t - now).as_secs(),
                        crate::keys::RETIRE_SETTLE_MIN_S
                    );
                    std::thread::sleep(t - now);
                    continue;
                }
            }
            break;
        }
        if rounds == MAX_ROUNDS {
            result.objects_remaining = c.sealed.len() as u64;
            problems.push(format!(
                "{} objects sealed by the key keep appearing after {MAX_ROUNDS} rounds: a process still seals with it (an old walshipper, or a host whose configuration names another repository copy)",
                c.sealed.len()
            ));
            return fail(result, problems, crate::error::exit::UNAVAILABLE);
        }
        rounds += 1;
        tracing::info!(
            "repository {}: re-sealing {} objects sealed by key {key_id} (round {rounds})",
            repo.name,
            c.sealed.len()
        );
        let failed: Mutex<Vec<(String, String, i32)>> = Mutex::new(Vec::new());
        let rewritten = AtomicUsize::new(0);
        let bytes = std::sync::atomic::AtomicU64::new(0);
        parallel(c.sealed.len(), jobs, |i| {
            let m = &c.sealed[i];
            // An S3 lease lost (not renewed for a whole TTL): another
            // process may hold the repository now; change nothing more.
            if let Some(e) = held.iter().find_map(|l| l.ensure_held().err()) {
                lock(&failed).push((m.key.clone(), e.to_string(), e.exit_code()));
                return;
            }
            match reseal::reseal(repo, &m.key, old, &spool) {
                Ok(Outcome::Rewritten { stored }) => {
                    crate::failpoint::point("key-retire");
                    rewritten.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(stored, Ordering::Relaxed);
                }
                Ok(Outcome::NotSealedBy | Outcome::Gone) => {}
                Ok(Outcome::Damaged(reason)) => {
                    tracing::error!(
                        "{}: {} is damaged and was left as it is: {reason}",
                        repo.name,
                        m.key
                    );
                    lock(&failed).push((
                        m.key.clone(),
                        format!("damaged, left as it is: {reason}"),
                        crate::error::exit::DAMAGED,
                    ));
                }
                Err(e) => {
                    tracing::error!("{}: {}: {e}", repo.name, m.key);
                    lock(&failed).push((m.key.clone(), e.to_string(), e.exit_code()));
                }
            }
            counters.files_done.fetch_add(1, Ordering::Relaxed);
            counters.bytes_done.fetch_add(m.size, Ordering::Relaxed);
        });
        result.objects_rewritten += rewritten.into_inner() as u64;
        result.bytes_rewritten += bytes.into_inner();
        let failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
        if !failed.is_empty() || !problems.is_empty() {
            result.objects_remaining = (failed.len() + c.unreadable.len()) as u64;
            if code == 0 {
                code = failed.first().map_or(code, |f| f.2);
            }
            for (key, e, _) in failed {
                problems.push(format!("{key}: {e}"));
            }
            return fail(result, problems, code);
        }
    }
    // A posix repository with a symbolic link among its objects' folders:
    // readers follow it, the census (like every listing) does not, so what
    // lies behind it may still need the key. Kept, and said why.
    if let Some(links) = cfg
        .repos
        .iter()
        .find(|rc| rc.name == repo.name && rc.kind == "posix")
        .map(|rc| symbolic_links(&rc.path))
        .filter(|l| !l.is_empty())
    {
        return fail(
            result,
            vec![format!(
                "the repository has symbolic links ({}{}): objects behind them are not listed, so the key file is kept. walshipper writes no links; move what they point at into the repository and run `key retire` again",
                links.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
                if links.len() > 3 { ", ..." } else { "" }
            )],
            crate::error::exit::CHECK_FAILED,
        );
    }
    // Nothing is sealed by the key here any more: its file can go.
    if let Some(e) = held.iter().find_map(|l| l.ensure_held().err()) {
        let code = e.exit_code();
        return fail(result, vec![e.to_string()], code);
    }
    let file = layout::key_file(key_id);
    let removed = repo.storage.head(&file).and_then(|h| match h {
        Some(_) => repo.storage.delete(&file),
        None => Ok(()),
    });
    if let Err(e) = removed {
        let c = e.exit_code();
        return fail(result, vec![format!("removing {file}: {e}")], c);
    }
    crate::failpoint::point("key-retire");
    tracing::info!(
        "repository {}: key {key_id} retired ({file} removed)",
        repo.name
    );
    result.key_file_removed = true;
    result.ok = true;
    RepoOutcome {
        result,
        error: None,
        code: 0,
    }
}

/// When the key file may go at the earliest: `retire_settle` after the
/// current key was created (the rotation that replaced the retired key).
/// None: already past, or the creation time is unknown (then no wait: the
/// key was current long ago or the file is damaged, and a census follows).
fn settle_deadline(cfg: &Config, repo: &Repository) -> Option<Instant> {
    let id = repo.descriptor.current_key_id.as_deref()?;
    let created = repo.key_file(id).ok()??.created_at;
    let created = chrono::DateTime::parse_from_rfc3339(&created).ok()?;
    // Never below the floor: a receiver looks at repository.json only
    // every KEY_CHECK_MAX, so a shorter settle could delete the key under it.
    let settle_s = cfg
        .encryption
        .retire_settle
        .clamp(crate::keys::RETIRE_SETTLE_MIN_S, 86_400);
    let settle = chrono::Duration::seconds(settle_s as i64);
    let left = (created + settle).signed_duration_since(chrono::Utc::now());
    // created_at is read here without unwrapping (the key may have come
    // from the cache): a file claiming a creation in the future must not
    // make the run wait longer than retire_settle itself.
    left.to_std()
        .ok()
        .map(|d| Instant::now() + d.min(std::time::Duration::from_secs(settle_s)))
}

/// Symbolic links below the folders of a posix repository that hold
/// objects a key may seal (repository-relative paths; not followed).
fn symbolic_links(root: &std::path::Path) -> Vec<String> {
    fn walk(dir: &std::path::Path, rel: &str, depth: usize, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = format!("{rel}/{name}");
            match e.file_type() {
                Ok(t) if t.is_symlink() => out.push(rel),
                Ok(t) if t.is_dir() && depth < 64 => walk(&e.path(), &rel, depth + 1, out),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    for top in ["wal", "backups", "expired", "recoveries"] {
        match std::fs::symlink_metadata(root.join(top)) {
            Ok(m) if m.file_type().is_symlink() => out.push(top.to_string()),
            Ok(m) if m.is_dir() => walk(&root.join(top), top, 0, &mut out),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod link_tests {
    #[test]
    fn symbolic_links_below_object_folders_are_found_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir_all(root.join("wal/0000000100000000")).unwrap();
        std::fs::create_dir_all(root.join("keys")).unwrap();
        std::fs::create_dir_all(elsewhere.join("deep")).unwrap();
        assert!(super::symbolic_links(&root).is_empty());
        // A link to a folder elsewhere, and a loop: found, never entered.
        std::os::unix::fs::symlink(&elsewhere, root.join("wal/0000000100000001")).unwrap();
        std::os::unix::fs::symlink(&root, elsewhere.join("deep/loop")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("keys/not-an-object-folder")).unwrap();
        assert_eq!(
            super::symbolic_links(&root),
            vec!["wal/0000000100000001".to_string()]
        );
    }
}
