//! pg_backup_ext: the control plane of pg_backup inside PostgreSQL.
//!
//! Thin by design: catalog, SQL entry points and scheduling live here; every
//! byte of backup data is handled by the `walshipper` binary, which this
//! extension launches and never links. For now it only identifies itself;
//! the catalog, functions and worker arrive with the control-plane issue.

use pgrx::prelude::*;

::pgrx::pg_module_magic!(name, version);

/// The extension's version, e.g. `SELECT backup.version();`
#[pg_extern(immutable, parallel_safe)]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn version_is_reported() {
        let v = Spi::get_one::<&str>("SELECT backup.version()");
        assert_eq!(v, Ok(Some(env!("CARGO_PKG_VERSION"))));
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
