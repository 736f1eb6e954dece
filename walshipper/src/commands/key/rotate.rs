//! `key rotate`: a new data key becomes current in every configured repository.

use crate::config::Config;
use crate::error::{Error, Result};

pub fn run(_cfg: &Config, _json: bool) -> Result<()> {
    Err(Error::Invalid("key rotate: not built yet".into()))
}
