//! `key passphrase`: re-wrap every key file of every configured repository
//! under a new passphrase.

use std::path::Path;

use crate::config::Config;
use crate::error::{Error, Result};

/// Where the new passphrase comes from.
pub enum NewPassphrase<'a> {
    File(&'a Path),
    Stdin,
}

pub struct Args<'a> {
    /// None with `finish`.
    pub new: Option<NewPassphrase<'a>>,
    /// Stop at stage `both`: the old passphrase keeps working.
    pub keep_old: bool,
    /// Remove every wrapping the configured passphrase does not open.
    pub finish: bool,
    pub json: bool,
}

pub fn run(_cfg: &Config, _args: &Args) -> Result<()> {
    Err(Error::Invalid("key passphrase: not built yet".into()))
}
