//! `archive-push <path>`: PostgreSQL's archive_command. Exit 0 only when the
//! file is durably in the repository (in every repository, or in the primary
//! with `archive.push_to = "primary"`), or already there with the same bytes.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::codec::hash_of;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::storage::PutOutcome;
use crate::wal;

pub fn run(cfg: &Config, path: &Path) -> Result<()> {
    if cfg.repos.len() == 1 {
        let repo = Repository::open(cfg)?;
        let (name, key) = validate(&repo, path)?;
        return push(&repo, path, &name, &key, None);
    }
    push_many(cfg, path)
}

/// Checks the file against the repository's cluster; returns its name and object key.
fn validate(repo: &Repository, path: &Path) -> Result<(String, String)> {
    let kind = wal::validate(path, &repo.descriptor.identity()?)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let key = crate::layout::wal(&name, &kind);
    Ok((name, key))
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))
}

/// Stores the file in one repository. `encoded` is the object already
/// encoded (when several repositories share the bytes), else the file is
/// streamed through the codec.
fn push(
    repo: &Repository,
    path: &Path,
    name: &str,
    key: &str,
    encoded: Option<&[u8]>,
) -> Result<()> {
    // No existence check first: the write is create-if-absent in every
    // driver, and a check would cost a request per segment on S3. A re-push
    // (rare: after a crash before PostgreSQL marked the segment done) pays an
    // encode instead.
    let outcome = match encoded {
        Some(bytes) => repo.put_encoded(key, bytes)?,
        None => {
            let (outcome, summary) = repo.put_object(key, open(path)?)?;
            tracing::debug!(
                "archived {name}: {} → {} bytes, {}",
                summary.plain_len,
                summary.stored_len,
                summary.hash
            );
            outcome
        }
    };
    if outcome == PutOutcome::Stored {
        return Ok(());
    }
    let stored = repo.read_object(key, &mut std::io::sink()).map_err(|e| match e {
        Error::Corrupt { key, reason } => Error::Corrupt {
            key,
            reason: format!("{reason}; the stored copy of {name} in repository {} is damaged and was not replaced: move it aside after checking, then PostgreSQL's next retry archives it again", repo.name),
        },
        other => other,
    })?;
    // The stored object's algorithm (SHA-256 for one archived by an older
    // walshipper, object version 2) decides how the local file is hashed.
    let local = hash_of(stored.alg, open(path)?)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    if stored == local {
        tracing::info!("{name} was already archived with identical content");
        Ok(())
    } else {
        Err(Error::Conflict {
            name: name.to_string(),
            stored: stored.to_string(),
            local: local.to_string(),
        })
    }
}

/// Several repositories: encode once when they share their keys (they do
/// when made by repo-init), store to all in parallel, then apply push_to.
fn push_many(cfg: &Config, path: &Path) -> Result<()> {
    let opened = Repository::open_all(cfg);
    let mut results: Vec<(String, Result<()>)> = Vec::new();
    let mut repos = Vec::new();
    for (name, r) in opened {
        match r {
            Ok(repo) => repos.push(repo),
            Err(e) => results.push((name, Err(e))),
        }
    }
    let Some(first) = repos.first() else {
        return finish(cfg, results);
    };
    let (name, key) = validate(first, path)?;
    for r in &repos[1..] {
        if r.descriptor.system_identifier != first.descriptor.system_identifier {
            return Err(Error::Repository(format!(
                "repositories {} and {} belong to different clusters",
                first.name, r.name
            )));
        }
    }
    let shared_keys = repos.iter().all(|r| r.shares_encoding(first));
    let encoded = if shared_keys {
        let mut buf = Vec::new();
        first
            .encoder(&key, open(path)?)?
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        Some(buf)
    } else {
        None
    };
    let pushed: Vec<(String, Result<()>)> = std::thread::scope(|s| {
        let handles: Vec<_> = repos
            .iter()
            .map(|r| {
                let (name, key, encoded) = (&name, &key, encoded.as_deref());
                (
                    r.name.clone(),
                    s.spawn(move || push(r, path, name, key, encoded)),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(n, h)| {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Repository("push thread panicked".into())));
                (n, r)
            })
            .collect()
    });
    results.extend(pushed);
    // Configuration order, so that "the primary" is the first.
    results.sort_by_key(|(n, _)| cfg.repos.iter().position(|r| &r.name == n));
    finish(cfg, results)
}

fn finish(cfg: &Config, results: Vec<(String, Result<()>)>) -> Result<()> {
    let primary = &cfg.primary().name;
    let mut first_err = None;
    for (repo, r) in results {
        if let Err(e) = r {
            let required = cfg.archive.push_to == "all" || &repo == primary;
            if required {
                eprintln!("repository {repo}: {e}");
                first_err.get_or_insert(e);
            } else {
                eprintln!(
                    "WARNING: repository {repo} lags: {e} (archive.push_to = primary; run `walshipper repo-sync` to catch it up)"
                );
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}
