//! `key retire`: re-encrypt every object an old key sealed under the current
//! key, then remove the old key's file.

use crate::config::Config;
use crate::error::{Error, Result};

pub fn run(_cfg: &Config, _key_id: &str, _jobs: usize, _json: bool) -> Result<()> {
    Err(Error::Invalid("key retire: not built yet".into()))
}
