//! `repo-init [--repo NAME]`: creates the configured repositories. The first
//! one is created with new keys; every other one is created as a copy of an
//! existing repository (same descriptor and keys), so that one segment is
//! the same object in every repository and `repo-sync` can copy raw bytes.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::keys::{EncryptionMode, DEFAULT_KDF_ITERATIONS, DEFAULT_KDF_MEMORY_KIB};
use crate::repo::{InitOptions, Repository};
use crate::wal;

pub struct Args {
    pub no_encryption: bool,
    pub kdf_memory_kib: Option<u32>,
    pub kdf_iterations: Option<u32>,
    /// Only this repository (default: every configured one that does not exist yet).
    pub repo: Option<String>,
}

pub fn run(cfg: &Config, args: &Args) -> Result<()> {
    // The configuration decides whether a repository may be unencrypted;
    // the flag only confirms it, so that neither alone switches it off.
    match (cfg.encryption.mode, args.no_encryption) {
        (EncryptionMode::Aes256Gcm, true) => {
            return Err(Error::Config(
                "--no-encryption needs [encryption] mode = \"none\" in the configuration (every command then accepts an unencrypted repository); with the default mode = \"aes-256-gcm\" repositories are always encrypted".into(),
            ))
        }
        (EncryptionMode::None, false) => {
            return Err(Error::Config(
                "[encryption] mode = \"none\" in the configuration: pass --no-encryption to confirm an unencrypted repository, or set mode = \"aes-256-gcm\"".into(),
            ))
        }
        _ => {}
    }
    if let Some(n) = &args.repo {
        cfg.find_repo(Some(n))?;
    }
    let id = wal::read_identity(&cfg.pg.data_dir)?;
    let mut existing = None;
    let mut targets = Vec::new();
    for rc in &cfg.repos {
        let wanted = args.repo.as_deref().is_none_or(|n| n == rc.name);
        if Repository::exists(rc)? {
            if wanted && args.repo.is_some() {
                return Err(Error::Repository(format!(
                    "a repository already exists at {} ({}); use it, or choose another location",
                    rc.location(),
                    rc.name
                )));
            }
            if existing.is_none() {
                existing = Some(rc);
            }
        } else if wanted {
            targets.push(rc);
        }
    }
    if targets.is_empty() {
        return Err(Error::Repository(format!(
            "a repository already exists at {}; use it, or choose another repo.path",
            cfg.primary().location()
        )));
    }
    // A copy takes the source's key files and descriptor as they are: no
    // key operation may change them meanwhile, and none may be half done
    // (a copy made between the stages of a passphrase change would keep the
    // old wrapping for good if the host that finishes it does not list it).
    let mut _keys_lock = None;
    let mut source = match existing {
        Some(rc) => {
            _keys_lock = Some(crate::lock::keys(rc)?);
            let src = Repository::open_repo(cfg, rc)?;
            if src.current_key().is_some() {
                crate::commands::key::check_one_passphrase(
                    &src,
                    &src.passphrase()?,
                    "repo-init of a copy",
                )?;
            }
            Some(src)
        }
        None => None,
    };
    for rc in targets {
        let repo = match &source {
            Some(src) => {
                if src.descriptor.identity()?.system_identifier != id.system_identifier {
                    return Err(Error::Repository(format!(
                        "repository {} belongs to system {}, not to the cluster in {} ({})",
                        src.name,
                        src.descriptor.system_identifier,
                        cfg.pg.data_dir.display(),
                        id.system_identifier
                    )));
                }
                Repository::init_copy(cfg, rc, src)?
            }
            None => Repository::init(
                cfg,
                rc,
                &id,
                &InitOptions {
                    encrypt: !args.no_encryption,
                    kdf_memory_kib: args.kdf_memory_kib.unwrap_or(DEFAULT_KDF_MEMORY_KIB),
                    kdf_iterations: args.kdf_iterations.unwrap_or(DEFAULT_KDF_ITERATIONS),
                },
            )?,
        };
        println!(
            "created repository {} at {} for system {} (PostgreSQL {}, WAL segments of {} MiB), encryption: {}",
            repo.name,
            repo.storage.describe(),
            id.system_identifier,
            id.pg_major,
            id.wal_segment_size >> 20,
            repo.descriptor.encryption
        );
        if !repo.descriptor.encrypted() {
            eprintln!(
                "WARNING: this repository is NOT encrypted; anyone who can read it can read your data, and nothing authenticates it: it protects against accidents (bit rot, truncation), not against anyone who can write to it"
            );
        }
        if source.is_none() {
            source = Some(repo);
        }
    }
    Ok(())
}
