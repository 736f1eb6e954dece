//! `archive-push <path>`: PostgreSQL's archive_command. Exit 0 only when the
//! file is durably in the repository (in every repository, or in the primary
//! with `archive.push_to = "primary"`), or already there with the same bytes.
//! With `archive.async = true` the call is a status check against the spool
//! the background pusher fills (commands::archive_async); the pushing itself
//! is the code here in both modes.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::codec::hash_of;
use crate::codec::PlainHash;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::storage::PutOutcome;
use crate::wal;

pub fn run(cfg: &Config, path: &Path) -> Result<()> {
    if cfg.archive.async_mode {
        return crate::commands::archive_async::push(cfg, path);
    }
    push_now(cfg, path).map(|_| ())
}

/// What a successful push stored.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// The hash of the plaintext that is in the repositories (BLAKE3, or
    /// SHA-256 for an object an older walshipper archived).
    pub hash: PlainHash,
    /// The repositories holding it durably: (configured name, repository id).
    pub stored_in: Vec<(String, String)>,
}

/// Pushes one file now, in the calling process (the synchronous mode).
pub fn push_now(cfg: &Config, path: &Path) -> Result<Pushed> {
    if cfg.repos.len() == 1 {
        let repo = Repository::open(cfg)?;
        return push_one(&repo, path);
    }
    let opened = Repository::open_all(cfg);
    let mut repos = Vec::new();
    let mut failed = Vec::new();
    for (name, r) in opened {
        match r {
            Ok(repo) => repos.push(repo),
            Err(e) => failed.push((name, e)),
        }
    }
    push_many(cfg, &repos, failed, path)
}

/// One repository already opened (the background pusher keeps it open).
pub fn push_one(repo: &Repository, path: &Path) -> Result<Pushed> {
    let (name, key) = validate(repo, path)?;
    let hash = push(repo, path, &name, &key, None)?;
    Ok(Pushed {
        hash,
        stored_in: vec![(repo.name.clone(), repo.descriptor.repository_id.clone())],
    })
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
/// streamed through the codec. Returns the hash of the plaintext now
/// stored (of the bytes that went through the codec, not of a second read).
fn push(
    repo: &Repository,
    path: &Path,
    name: &str,
    key: &str,
    encoded: Option<(&[u8], PlainHash)>,
) -> Result<PlainHash> {
    // No existence check first: the write is create-if-absent in every
    // driver, and a check would cost a request per segment on S3. A re-push
    // (rare: after a crash before PostgreSQL marked the segment done) pays an
    // encode instead.
    let (outcome, hash) = match encoded {
        Some((bytes, hash)) => (repo.put_encoded(key, bytes)?, hash),
        None => {
            let (outcome, summary) = repo.put_object(key, open(path)?)?;
            tracing::debug!(
                "archived {name}: {} → {} bytes, {}",
                summary.plain_len,
                summary.stored_len,
                summary.hash
            );
            (outcome, summary.hash)
        }
    };
    if outcome == PutOutcome::Stored {
        return Ok(hash);
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
        Ok(stored)
    } else {
        Err(Error::Conflict {
            name: name.to_string(),
            stored: stored.to_string(),
            local: local.to_string(),
        })
    }
}

/// Several repositories (`failed`: those that did not open): encode once
/// when they share their keys (they do when made by repo-init), store to all
/// in parallel, then apply push_to.
pub fn push_many(
    cfg: &Config,
    repos: &[Repository],
    failed: Vec<(String, Error)>,
    path: &Path,
) -> Result<Pushed> {
    let mut results: Vec<(String, Result<PlainHash>)> =
        failed.into_iter().map(|(n, e)| (n, Err(e))).collect();
    let Some(first) = repos.first() else {
        return finish(cfg, repos, results);
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
        let mut enc = first.encoder(&key, open(path)?)?;
        enc.read_to_end(&mut buf)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        Some((buf, enc.summary().hash))
    } else {
        None
    };
    let pushed: Vec<(String, Result<PlainHash>)> = std::thread::scope(|s| {
        let handles: Vec<_> = repos
            .iter()
            .map(|r| {
                let (name, key) = (&name, &key);
                let encoded = encoded.as_ref().map(|(b, h)| (b.as_slice(), *h));
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
    finish(cfg, repos, results)
}

fn finish(
    cfg: &Config,
    repos: &[Repository],
    results: Vec<(String, Result<PlainHash>)>,
) -> Result<Pushed> {
    let primary = &cfg.primary().name;
    let mut first_err = None;
    let mut hash = None;
    let mut stored_in = Vec::new();
    for (repo, r) in results {
        let e = match r {
            Ok(h) => {
                // Every repository stores the same plaintext (the file was
                // validated once); the first hash stands for all.
                hash.get_or_insert(h);
                if let Some(opened) = repos.iter().find(|r| r.name == repo) {
                    stored_in.push((repo, opened.descriptor.repository_id.clone()));
                }
                continue;
            }
            Err(e) => e,
        };
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
    if let Some(e) = first_err {
        return Err(e);
    }
    match hash {
        Some(hash) => Ok(Pushed { hash, stored_in }),
        None => Err(Error::Repository(
            "no repository could be opened to archive to".into(),
        )),
    }
}
