//! `key list`: the data keys of every configured repository.

use crate::config::Config;
use crate::error::{Error, Result};

pub fn run(_cfg: &Config, _json: bool, _usage: bool) -> Result<()> {
    Err(Error::Invalid("key list: not built yet".into()))
}
