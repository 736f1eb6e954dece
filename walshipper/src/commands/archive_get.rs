//! `archive-get <walfile> <dest>`: PostgreSQL's restore_command. The file
//! appears at `dest` only after every frame and the SHA-256 were verified.

use std::fs::{self, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::Repository;
use crate::wal;

pub fn run(cfg: &Config, name: &str, dest: &Path) -> Result<()> {
    let kind = wal::parse_name(name).ok_or_else(|| {
        Error::Invalid(format!(
            "'{name}' is not a WAL file name (use %f in restore_command)"
        ))
    })?;
    let key = crate::layout::wal(name, &kind);
    // Repositories in configuration order; the next one is tried when one
    // lacks the file or fails. "Not found" only when every one said so.
    let mut failure = None;
    for rc in &cfg.repos {
        let result = Repository::open_repo(cfg, rc).and_then(|repo| fetch(&repo, name, &key, dest));
        match result {
            Ok(()) => return Ok(()),
            Err(Error::NotFound(_)) => {}
            Err(e) => {
                if cfg.repos.len() > 1 {
                    eprintln!("repository {}: {e}", rc.name);
                }
                failure.get_or_insert(e);
            }
        }
    }
    Err(failure.unwrap_or_else(|| Error::NotFound(name.to_string())))
}

fn fetch(repo: &Repository, name: &str, key: &str, dest: &Path) -> Result<()> {
    let dest_name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Invalid(format!("bad destination {}", dest.display())))?;
    let tmp = dest.with_file_name(format!(".{dest_name}.walshipper.tmp"));
    let result = (|| {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        repo.read_object_with(key, &mut w, repo.threads())
            .map_err(|e| match e {
                Error::NotFound(_) => Error::NotFound(name.to_string()),
                other => other,
            })?;
        w.flush()
            .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        fs::rename(&tmp, dest).map_err(|e| Error::io(format!("rename to {}", dest.display()), e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
