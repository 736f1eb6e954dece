use crate::config::Config;
use crate::error::Result;
use crate::keys::{DEFAULT_KDF_ITERATIONS, DEFAULT_KDF_MEMORY_KIB};
use crate::repo::{InitOptions, Repository};
use crate::wal;

pub struct Args {
    pub no_encryption: bool,
    pub kdf_memory_kib: Option<u32>,
    pub kdf_iterations: Option<u32>,
}

pub fn run(cfg: &Config, args: &Args) -> Result<()> {
    let id = wal::read_identity(&cfg.pg.data_dir)?;
    let repo = Repository::init(
        cfg,
        &id,
        &InitOptions {
            encrypt: !args.no_encryption,
            kdf_memory_kib: args.kdf_memory_kib.unwrap_or(DEFAULT_KDF_MEMORY_KIB),
            kdf_iterations: args.kdf_iterations.unwrap_or(DEFAULT_KDF_ITERATIONS),
        },
    )?;
    println!(
        "created repository at {} for system {} (PostgreSQL {}, WAL segments of {} MiB), encryption: {}",
        repo.storage.describe(),
        id.system_identifier,
        id.pg_major,
        id.wal_segment_size >> 20,
        repo.descriptor.encryption
    );
    if args.no_encryption {
        eprintln!(
            "WARNING: this repository is NOT encrypted; anyone who can read it can read your data"
        );
    }
    Ok(())
}
