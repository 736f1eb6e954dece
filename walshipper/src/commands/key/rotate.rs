//! `key rotate`: a new data key becomes current in every configured repository.
//!
//! Order, so that a crash at any point leaves every repository openable and
//! every object readable: (1) the new key file is stored in every
//! repository; (2) each repository's descriptor is rewritten (one atomic
//! replace) to name it current. Until (2) the new key is an unused extra
//! file (0 objects; `key retire` removes it); after it new objects are
//! sealed by the new key and older ones stay readable with theirs.
//!
//! A run killed during (2) leaves some descriptors naming the new key and
//! some the old one. The next run sees that the repositories disagree and
//! makes the newest of their current keys current everywhere (copying its
//! key file where it is missing) instead of creating yet another key: the
//! copies converge on one key, which `repo-sync` needs to move objects as
//! they are.
//!
//! Nothing is changed unless every repository opens, is encrypted and is a
//! copy of the others (one `repository_id`: only copies share keys).

use std::time::Instant;

use pg_backup_contract::{KeyRepoResult, KeyReport};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::keys::KeyFile;
use crate::repo::Repository;

const POINT: &str = "key-rotate";

pub fn run(cfg: &Config, json: bool) -> Result<()> {
    let started = Instant::now();
    let (locks, mut repos) = open_all_locked(cfg)?;
    let pass = repos[0].passphrase()?;
    // The new key is wrapped by this passphrase alone: it must be the one
    // every key file opens with (a cache hit opened the repository without
    // proving that), and no passphrase change may be between its stages.
    for r in &repos {
        super::check_one_passphrase(r, &pass, "rotate")?;
    }
    let held = || -> Result<()> {
        for l in &locks {
            l.ensure_held()?;
        }
        Ok(())
    };
    let mut results: Vec<KeyRepoResult> = repos
        .iter()
        .map(|r| KeyRepoResult {
            repository: r.name.clone(),
            current_key_id: r.descriptor.current_key_id.clone(),
            ..Default::default()
        })
        .collect();

    let plan = match disagreement(&repos)? {
        Some(newest) => {
            tracing::warn!(
                "the repositories do not agree on the current key (a `key rotate` was interrupted): making the newest, {}, current everywhere instead of creating another key",
                newest.key_id
            );
            Plan::Converge(newest)
        }
        None => Plan::NewKey,
    };
    let (file, key) = match &plan {
        Plan::Converge(file) => {
            let key = file.unlock(&pass)?;
            (file.clone(), key)
        }
        Plan::NewKey => {
            // The new key costs what the current one's wrapping costs.
            let current = repos[0]
                .descriptor
                .current_key_id
                .clone()
                .unwrap_or_default();
            let cur_file = repos[0].key_file(&current)?.ok_or_else(|| {
                Error::Repository(format!(
                    "the current key file keys/{current}.json of repository {} vanished; restore it from another copy of the repository",
                    repos[0].name
                ))
            })?;
            {
                let (memory_kib, iterations) = cur_file.costs();
                KeyFile::create(&pass, memory_kib, iterations)?
            }
        }
    };

    // (1) The key file in every repository. A failure here changes no
    // descriptor: the file left behind is unused.
    for (r, res) in repos.iter().zip(results.iter_mut()) {
        // A key file already there (an earlier run, or the copy that made
        // it current) is left as it is.
        let added = match r.key_file(&file.key_id) {
            Ok(Some(_)) => Ok(false),
            Ok(None) => held().and_then(|()| r.add_key_file(&file).map(|()| true)),
            Err(e) => Err(e),
        };
        match added {
            Ok(added) => {
                res.key_files = u64::from(added);
                if added {
                    crate::failpoint::point(POINT);
                }
            }
            Err(e) => {
                res.error = Some(e.to_string());
                return finish(json, started, &plan, &file, results, Some(e));
            }
        }
    }
    // (2) Each descriptor. One that fails does not stop the others: the key
    // file is everywhere, and the next run makes the stragglers agree.
    let mut first_err = None;
    for (r, res) in repos.iter_mut().zip(results.iter_mut()) {
        if r.descriptor.current_key_id.as_deref() == Some(file.key_id.as_str()) {
            res.ok = true;
            continue;
        }
        match held().and_then(|()| r.make_current(key.clone())) {
            Ok(()) => {
                res.ok = true;
                res.current_key_id = Some(file.key_id.clone());
                crate::failpoint::point(POINT);
            }
            Err(e) => {
                tracing::error!("repository {}: {e}", r.name);
                res.error = Some(e.to_string());
                first_err.get_or_insert(e);
            }
        }
    }
    if first_err.is_none() {
        // This host's next commands need no Argon2 (or passphrase command)
        // for the new key.
        repos[0].cache_key(&key);
    }
    finish(json, started, &plan, &file, results, first_err)
}

enum Plan {
    /// Every repository has one current key: create a new one.
    NewKey,
    /// They disagree (an interrupted rotation): make this one, the newest of
    /// their current keys, current everywhere.
    Converge(KeyFile),
}

/// Locks the keys of every configured repository and opens each. Refuses,
/// changing nothing, unless all exist and open, all are encrypted, and all
/// are copies of one another.
fn open_all_locked(cfg: &Config) -> Result<(Vec<crate::lock::Lock>, Vec<Repository>)> {
    // Existence first: locking a posix location creates its directory.
    for rc in &cfg.repos {
        if !Repository::exists(rc)? {
            return Err(Error::Repository(format!(
                "repository {} at {}: there is no repository there (create it with `walshipper repo-init`, or fix the configuration); nothing was changed",
                rc.name,
                rc.location()
            )));
        }
    }
    let mut locks = Vec::new();
    for rc in &cfg.repos {
        locks.push(crate::lock::keys(rc)?);
    }
    let mut repos: Vec<Repository> = Vec::new();
    for (name, r) in Repository::open_all(cfg) {
        let r = r.inspect_err(|e| {
            tracing::error!("repository {name} does not open ({e}); nothing was changed")
        })?;
        if r.current_key().is_none() {
            return Err(Error::Invalid(format!(
                "repository {name} is not encrypted: it has no data key to rotate; nothing was changed"
            )));
        }
        if let Some(first) = repos.first() {
            if first.descriptor.repository_id != r.descriptor.repository_id {
                return Err(Error::Invalid(format!(
                    "repositories {} and {name} are not copies of one another (repository_id {} and {}): they do not share keys, and `key rotate` acts on every configured repository. Rotate each with a configuration that lists only it (or only its copies); nothing was changed",
                    first.name, first.descriptor.repository_id, r.descriptor.repository_id
                )));
            }
        }
        repos.push(r);
    }
    if repos.is_empty() {
        return Err(Error::Config("no repository is configured".into()));
    }
    Ok((locks, repos))
}

/// None when every repository has the same current key; else the key file
/// of the newest of their current keys (by its `created_at`; a key file
/// is the same in every repository that holds it).
fn disagreement(repos: &[Repository]) -> Result<Option<KeyFile>> {
    let mut ids: Vec<String> = repos
        .iter()
        .filter_map(|r| r.descriptor.current_key_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    if ids.len() < 2 {
        return Ok(None);
    }
    let mut newest: Option<(chrono::DateTime<chrono::FixedOffset>, KeyFile)> = None;
    for id in &ids {
        // Its own repository opened with it, so at least that one holds it.
        let mut file = None;
        for r in repos {
            if let Some(f) = r.key_file(id)? {
                file = Some(f);
                break;
            }
        }
        let file = file.ok_or_else(|| {
            Error::Repository(format!(
                "key file keys/{id}.json vanished from every repository"
            ))
        })?;
        let at = chrono::DateTime::parse_from_rfc3339(&file.created_at).map_err(|_| {
            Error::Repository(format!(
                "keys/{id}.json: created_at is not an RFC 3339 time"
            ))
        })?;
        if newest.as_ref().is_none_or(|(t, _)| at > *t) {
            newest = Some((at, file));
        }
    }
    Ok(newest.map(|(_, f)| f))
}

fn finish(
    json: bool,
    started: Instant,
    plan: &Plan,
    file: &KeyFile,
    results: Vec<KeyRepoResult>,
    err: Option<Error>,
) -> Result<()> {
    let succeeded = err.is_none() && results.iter().all(|r| r.ok);
    let report = KeyReport {
        operation: "rotate".into(),
        succeeded,
        key_id: Some(file.key_id.clone()),
        repositories: results,
        duration_s: started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    if !json {
        if let Plan::Converge(_) = plan {
            println!(
                "the repositories did not agree on the current key (an interrupted `key rotate`): made the newest, {}, current in all of them; no new key was created",
                file.key_id
            );
        }
    }
    super::print_report(&report, json);
    match err {
        None => {
            tracing::info!("key {} is now current", file.key_id);
            Ok(())
        }
        Some(e) => {
            let failed = report.repositories.iter().filter(|r| !r.ok).count();
            let some_current = report
                .repositories
                .iter()
                .any(|r| r.current_key_id.as_deref() == Some(file.key_id.as_str()));
            let next = if some_current {
                format!(
                    "some repositories already seal with key {}: run `walshipper key rotate` again once they are reachable, and it makes the others agree (no new key)",
                    file.key_id
                )
            } else {
                format!(
                    "no repository was changed but for an unused key file {} (harmless; `walshipper key retire {}` removes it); run it again",
                    crate::layout::key_file(&file.key_id),
                    file.key_id
                )
            };
            Err(Error::Partial {
                code: e.exit_code(),
                message: format!(
                    "key rotate failed on {failed} of {} repositories (first: {e}); {next}",
                    report.repositories.len()
                ),
            })
        }
    }
}
