//! The compliance report as a printable HTML document with charts, from
//! backup.compliance_report() and the catalog's history: served at
//! `/report` and written by `walshipper report`.

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};

/// The period a request or the command line asks for: `from` and `to` as
/// dates or times with a zone; defaults: the last 30 days up to now.
pub fn parse_period(
    _from: Option<&str>,
    _to: Option<&str>,
) -> Result<(DateTime<Utc>, DateTime<Utc>)> {
    Err(Error::Invalid("the report is not built yet".into()))
}

/// The document for the period.
pub fn render(
    _db: &mut postgres::Client,
    _from: DateTime<Utc>,
    _to: DateTime<Utc>,
) -> Result<String> {
    Err(Error::Invalid("the report is not built yet".into()))
}
