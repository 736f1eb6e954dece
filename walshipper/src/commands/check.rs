//! `check`: the DBA's first command after set-up. Connects to the server,
//! checks the archiving settings and the cluster identity, forces a WAL
//! switch and waits until that segment is in the repository.

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pg::{connect, pg_err};
use crate::repo::Repository;
use crate::wal;

pub fn run(cfg: &Config) -> Result<()> {
    let repo = Repository::open(cfg)?;
    let mut client = connect(cfg)?;
    let get = |client: &mut postgres::Client, sql: &str| -> Result<String> {
        let row = client.query_one(sql, &[]).map_err(pg_err(sql))?;
        Ok(row.get::<_, String>(0))
    };
    let mode = get(&mut client, "SHOW archive_mode")?;
    if mode != "on" && mode != "always" {
        return Err(Error::Check(format!(
            "archive_mode is '{mode}'; set archive_mode = on in postgresql.conf and restart PostgreSQL"
        )));
    }
    let command = get(&mut client, "SHOW archive_command")?;
    if !command.contains("walshipper") || !command.contains("archive-push") {
        return Err(Error::Check(format!(
            "archive_command is '{command}'; set it to 'walshipper --config <file> archive-push %p' and reload"
        )));
    }
    crate::pg::check_identity(&mut client, &repo).map_err(|e| Error::Check(e.to_string()))?;
    // What the DBA checking [pg] sslmode wants to see: the server's view.
    let tls = get(
        &mut client,
        "SELECT CASE WHEN s.ssl THEN 'TLS (' || s.version || ', ' || s.cipher || ')' \
         ELSE 'no TLS' END FROM pg_stat_ssl s WHERE s.pid = pg_backend_pid()",
    )?;
    println!(
        "connection: {} ({}, sslmode {})",
        tls,
        if cfg.pg.host.starts_with('/') {
            format!("Unix socket in {}", cfg.pg.host)
        } else {
            format!("{}:{}", cfg.pg.host, cfg.pg.port)
        },
        cfg.pg.sslmode.name()
    );
    // Re-test how the store protects create-if-absent writes (S3 "auto":
    // the verdict is kept in the repository for archive-push to use).
    println!(
        "conditional writes: {}",
        repo.storage.conditional_writes(true)?
    );
    // A restore point guarantees there is WAL to switch away from.
    client
        .execute("SELECT pg_create_restore_point('walshipper check')", &[])
        .map_err(pg_err("pg_create_restore_point"))?;
    let name = get(&mut client, "SELECT pg_walfile_name(pg_switch_wal())")?;
    let kind = wal::parse_name(&name)
        .ok_or_else(|| Error::Check(format!("server returned odd WAL name {name}")))?;
    let key = crate::layout::wal(&name, &kind);
    let timeout = Duration::from_secs(cfg.archive.check_timeout);
    let start = Instant::now();
    println!(
        "switched WAL; waiting up to {}s for {name} to reach {}",
        timeout.as_secs(),
        repo.storage.describe()
    );
    loop {
        if repo.storage.head(&key)?.is_some() {
            // Prove it also reads back.
            repo.read_object(&key, &mut std::io::sink())?;
            println!(
                "ok: {name} archived and verified in {:.1}s",
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if start.elapsed() > timeout {
            let row = client
                .query_one(
                    "SELECT coalesce(last_failed_wal, ''), coalesce(last_failed_time::text, '') FROM pg_stat_archiver",
                    &[],
                )
                .map_err(pg_err("pg_stat_archiver"))?;
            let (failed, when): (String, String) = (row.get(0), row.get(1));
            let hint = if failed.is_empty() {
                "no archive failure recorded; is the archiver running?".to_string()
            } else {
                format!("the archiver last failed on {failed} at {when}; see the PostgreSQL log")
            };
            return Err(Error::Check(format!(
                "{name} did not reach the repository within {}s: {hint}",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
