//! `report`: the compliance report for a period, as a printable HTML
//! document an auditor can read (the same page `serve` shows at /report),
//! built from backup.compliance_report() and the catalog's history.

use std::io::Write;
use std::path::Path;

use crate::config::Config;
use crate::error::{Error, Result};

pub fn run(
    cfg: &Config,
    from: Option<&str>,
    to: Option<&str>,
    output: Option<&Path>,
) -> Result<()> {
    // A bad period is refused before anything connects.
    let (from, to) = crate::serve::report::parse_period(from, to)?;
    let mut db = crate::catalog::connect(cfg)?;
    let html = crate::serve::report::render(&mut db, from, to)?;
    match output {
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(html.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| Error::io("write the report to standard output", e))
        }
        Some(path) => write_atomically(path, html.as_bytes()),
    }
}

/// Writes `path` whole or not at all: a temporary file beside it (mode
/// 0640: the report names the cluster's jobs and repositories), synced,
/// then renamed over it.
pub fn write_atomically(path: &Path, body: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("--output {}: not a file name", path.display())))?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let ctx = |what: &str, e| Error::io(format!("{what} {}", tmp.display()), e);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp)
            .map_err(|e| ctx("create", e))?;
        f.write_all(body).map_err(|e| ctx("write", e))?;
        f.sync_all().map_err(|e| ctx("sync", e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::io(format!("rename {} to {}", tmp.display(), path.display()), e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    tracing::info!("compliance report written to {}", path.display());
    Ok(())
}
