//! Connections to the catalog (pg_backup_ext's schema `backup`) for the
//! monitoring service, the notifier and the compliance report. They read
//! as the role `[serve] user` names (a monitor: backup.grant_monitor(),
//! plus backup.grant_notifier() for the notifier), never as a superuser by
//! default.

use crate::config::Config;
use crate::error::Result;

/// A connection to the database pg_backup_ext is installed in.
pub fn connect(cfg: &Config) -> Result<postgres::Client> {
    crate::pg::connect(cfg)
}
