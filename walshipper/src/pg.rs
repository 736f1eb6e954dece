//! Connections to the PostgreSQL server (for check and, later, backups).

use crate::config::Config;
use crate::error::{Error, Result};

pub fn connect(cfg: &Config) -> Result<postgres::Client> {
    let mut c = postgres::Config::new();
    c.host(&cfg.pg.host)
        .port(cfg.pg.port)
        .user(&cfg.pg.user)
        .dbname(&cfg.pg.database)
        .application_name("walshipper")
        .connect_timeout(std::time::Duration::from_secs(10));
    if let Some(p) = password(&cfg.pg)? {
        c.password(p.as_bytes());
    }
    crate::tls::connect(c, &cfg.pg, &cfg.pg.host)?.map_err(|e| Error::Postgres {
        context: format!(
            "cannot connect to PostgreSQL at host={} port={} user={} dbname={} sslmode={}{} (check [pg] in the config)",
            cfg.pg.host,
            cfg.pg.port,
            cfg.pg.user,
            cfg.pg.database,
            cfg.pg.sslmode.name(),
            if cfg.pg.channel_binding == crate::tls::ChannelBinding::Require {
                " channel_binding=require"
            } else {
                ""
            }
        ),
        source: e,
    })
}

/// The [pg] user's password: `[pg] password_file` (which must be private
/// to walshipper's OS user), else PGPASSWORD; None if neither is given.
pub fn password(pg: &crate::config::PgConfig) -> Result<Option<zeroize::Zeroizing<String>>> {
    if pg.password_file.as_os_str().is_empty() {
        return Ok(std::env::var("PGPASSWORD")
            .ok()
            .map(zeroize::Zeroizing::new));
    }
    crate::serve::read_secret(&pg.password_file, "pg.password_file").map(Some)
}

pub fn pg_err(context: &str) -> impl FnOnce(postgres::Error) -> Error + '_ {
    move |source| Error::Postgres {
        context: context.to_string(),
        source,
    }
}

/// Refuses a server that is not the repository's cluster.
pub fn check_identity(client: &mut postgres::Client, repo: &crate::repo::Repository) -> Result<()> {
    let sql = "SELECT system_identifier::text FROM pg_control_system()";
    let sysid: String = client.query_one(sql, &[]).map_err(pg_err(sql))?.get(0);
    if sysid != repo.descriptor.system_identifier {
        return Err(Error::Invalid(format!(
            "the server's system identifier {sysid} is not the repository's {}: this repository belongs to another cluster (check repo.path and [pg])",
            repo.descriptor.system_identifier
        )));
    }
    Ok(())
}
