//! `archive-push <path>`: PostgreSQL's archive_command. Exit 0 only when the
//! file is durably in the repository, or already there with the same bytes.

use std::fs::File;
use std::path::Path;

use crate::codec::sha256_of;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::storage::PutOutcome;
use crate::wal;

pub fn run(cfg: &Config, path: &Path) -> Result<()> {
    let repo = Repository::open(cfg)?;
    let identity = repo.descriptor.identity()?;
    let kind = wal::validate(path, &identity)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let key = wal::object_key(&name, &kind);
    let open = || File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e));

    if repo.storage.head(&key)?.is_none() {
        let (outcome, summary) = repo.put_object(&key, open()?)?;
        if outcome == PutOutcome::Stored {
            tracing::debug!(
                "archived {name}: {} → {} bytes, sha256 {}",
                summary.plain_len,
                summary.stored_len,
                hex::encode(summary.sha256)
            );
            return Ok(());
        }
        // Someone else stored it between our check and our write: compare below.
    }
    let local = sha256_of(open()?).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let stored = repo.read_object(&key, &mut std::io::sink()).map_err(|e| match e {
        Error::Corrupt { key, reason } => Error::Corrupt {
            key,
            reason: format!("{reason}; the stored copy of {name} is damaged and was not replaced: move it aside after checking, then PostgreSQL's next retry archives it again"),
        },
        other => other,
    })?;
    if stored == local {
        tracing::info!("{name} was already archived with identical content");
        Ok(())
    } else {
        Err(Error::Conflict {
            name,
            stored: hex::encode(stored),
            local: hex::encode(local),
        })
    }
}
