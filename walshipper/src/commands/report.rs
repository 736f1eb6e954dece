//! `report`: the compliance report for a period, as a printable HTML
//! document an auditor can read (the same page `serve` shows at /report),
//! built from backup.compliance_report() and the catalog's history.

use std::path::Path;

use crate::config::Config;
use crate::error::{Error, Result};

pub fn run(
    _cfg: &Config,
    _from: Option<&str>,
    _to: Option<&str>,
    _output: Option<&Path>,
) -> Result<()> {
    Err(Error::Invalid("walshipper report is not built yet".into()))
}
