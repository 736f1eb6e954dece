//! The dashboard (`/`): one read-only HTML page with server-drawn SVG
//! charts, no script: backups and their chains on a timeline, WAL coverage
//! and gaps, restore points and the restorable window, storage and
//! durations over time, open alerts, RPO against its target.

use crate::config::Config;
use crate::error::{Error, Result};

/// The page, from the catalog (`db`, a monitor's connection) and the
/// repositories `cfg` names (read through a cache).
pub fn render(_db: &mut postgres::Client, _cfg: &Config) -> Result<String> {
    Err(Error::Invalid("the dashboard is not built yet".into()))
}
