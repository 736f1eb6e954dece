//! `key rotate`: a new data key becomes current in every configured repository.
//!
//! Order, so that a crash at any point leaves every repository openable and
//! every object readable: (1) the new key file is stored in every
//! repository; (2) each repository's descriptor is rewritten (one atomic
//! replace) to name it current. Until (2) the new key is an unused extra
//! file; after it new objects are sealed by the new key and older ones stay
//! readable with theirs.

use std::time::Instant;

use pg_backup_contract::{KeyRepoResult, KeyReport};
use zeroize::Zeroizing;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::keys::{KeyCache, KeyFile};
use crate::repo::Repository;

pub fn run(cfg: &Config, json: bool) -> Result<()> {
    let started = Instant::now();
    let mut repos = Vec::new();
    for (_, r) in Repository::open_all(cfg) {
        let r = r?;
        if r.current_key().is_none() {
            return Err(Error::Invalid(format!(
                "repository {} is not encrypted: it has no key to rotate",
                r.name
            )));
        }
        repos.push(r);
    }
    let current = repos[0]
        .descriptor
        .current_key_id
        .clone()
        .unwrap_or_default();
    if let Some(r) = repos
        .iter()
        .find(|r| r.descriptor.current_key_id.as_deref() != Some(current.as_str()))
    {
        return Err(Error::Repository(format!(
            "repository {} seals with another key than {} ({}); they must share their keys",
            r.name, repos[0].name, current
        )));
    }
    // The new key costs what the current one's passphrase wrapping costs.
    let cur_file = repos[0].key_file(&current)?.ok_or_else(|| {
        Error::Repository(format!(
            "the current key file of {} is missing",
            repos[0].name
        ))
    })?;
    let pass = Zeroizing::new(cfg.passphrase()?);
    let (memory_kib, iterations) = cur_file.costs();
    let (file, key) = KeyFile::create(&pass, memory_kib, iterations)?;
    for r in &repos {
        r.add_key_file(&file)?;
    }
    crate::failpoint::point("key-rotate");
    let mut results = Vec::new();
    for r in &mut repos {
        r.make_current(key.clone())?;
        crate::failpoint::point("key-rotate");
        results.push(KeyRepoResult {
            repository: r.name.clone(),
            ok: true,
            current_key_id: Some(file.key_id.clone()),
            key_files: 1,
            ..Default::default()
        });
    }
    if let Some(dir) = cfg.key_cache_dir() {
        KeyCache::new(dir).put(&key, &pass);
    }
    tracing::info!("key {} is now current", file.key_id);
    super::print_report(
        &KeyReport {
            operation: "rotate".into(),
            succeeded: true,
            key_id: Some(file.key_id.clone()),
            repositories: results,
            duration_s: started.elapsed().as_secs_f64(),
            ..Default::default()
        },
        json,
    );
    Ok(())
}
