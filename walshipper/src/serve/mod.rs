//! `serve`: the monitoring service. One small HTTP server (not inside a
//! PostgreSQL backend) that reads the catalog and the repositories and
//! serves `/metrics` (Prometheus), `/health`, the dashboard (`/`) and the
//! compliance report (`/report`); beside it runs the notifier
//! (crate::notify), which sends alerts out by webhook and e-mail.

pub mod charts;
pub mod dashboard;
pub mod report;
pub mod repos;

use serde::Deserialize;

use crate::config::Config;
use crate::error::{Error, Result};

/// `[serve]` (docs/operations.md, "The monitoring service").
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address and port to listen on. Anything but a loopback address
    /// needs `token_file` or `basic_auth_user` + `basic_auth_password_file`.
    pub listen: String,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: "127.0.0.1:9187".into(),
        }
    }
}

pub fn run(_cfg: &Config) -> Result<()> {
    Err(Error::Invalid("walshipper serve is not built yet".into()))
}
