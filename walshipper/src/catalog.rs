//! Connections to the catalog (pg_backup_ext's schema `backup`) for the
//! monitoring service, the notifier and the compliance report. They read
//! as the role `[serve] user` names (a monitor: backup.grant_monitor(),
//! plus backup.grant_notifier() for the notifier), never as a superuser by
//! default.

use std::time::Duration;

use crate::config::Config;
use crate::error::{Error, Result};

/// Where the catalog is, from `[serve]` with `[pg]`'s values for what it
/// leaves empty.
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
}

pub fn target(cfg: &Config) -> Target {
    let s = &cfg.serve;
    let or = |a: &str, b: &str| if a.is_empty() { b } else { a }.to_string();
    Target {
        host: or(&s.host, &cfg.pg.host),
        port: if s.port == 0 { cfg.pg.port } else { s.port },
        user: or(&s.user, &cfg.pg.user),
        database: or(&s.database, &cfg.pg.database),
    }
}

/// A connection to the database pg_backup_ext is installed in, with
/// `[serve] statement_timeout` so that no page or scrape waits on a lock
/// forever. The password: `[serve] password_file`, else [pg]'s
/// (`crate::pg::password`) when it is [pg]'s user on [pg]'s server, else
/// PGPASSWORD.
pub fn connect(cfg: &Config) -> Result<postgres::Client> {
    let t = target(cfg);
    let mut c = postgres::Config::new();
    c.host(&t.host)
        .port(t.port)
        .user(&t.user)
        .dbname(&t.database)
        .application_name("walshipper serve")
        .connect_timeout(Duration::from_secs(10))
        .options(&format!(
            "-c statement_timeout={}",
            cfg.serve.statement_timeout.saturating_mul(1000)
        ));
    if !cfg.serve.password_file.as_os_str().is_empty() {
        c.password(
            crate::serve::read_secret(&cfg.serve.password_file, "serve.password_file")?.as_bytes(),
        );
    } else if (&t.user, &t.host, t.port) == (&cfg.pg.user, &cfg.pg.host, cfg.pg.port) {
        if let Some(p) = crate::pg::password(&cfg.pg)? {
            c.password(p.as_bytes());
        }
    } else if let Ok(p) = std::env::var("PGPASSWORD") {
        c.password(p);
    }
    crate::tls::connect(c, &cfg.pg, &t.host)?.map_err(|e| Error::Postgres {
        context: format!(
            "cannot connect to the catalog at host={} port={} user={} dbname={} (check [serve] host, port, user, database, which default to [pg]'s)",
            t.host, t.port, t.user, t.database
        ),
        source: e,
    })
}

/// A catalog connection that is opened when first needed and opened again
/// when it broke (the server restarted, a network blip).
pub struct Session {
    cfg: Config,
    client: Option<postgres::Client>,
}

impl Session {
    pub fn new(cfg: &Config) -> Self {
        Session {
            cfg: cfg.clone(),
            client: None,
        }
    }

    /// Runs `f` on the connection. If it fails because the connection is
    /// gone, `f` runs once more on a new one (everything here only reads,
    /// so a retry is harmless).
    pub fn with<T>(&mut self, mut f: impl FnMut(&mut postgres::Client) -> Result<T>) -> Result<T> {
        for attempt in 0..2 {
            if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                self.client = None;
                self.client = Some(connect(&self.cfg)?);
            }
            let Some(client) = self.client.as_mut() else {
                continue;
            };
            match f(client) {
                Ok(v) => return Ok(v),
                Err(e) if attempt == 0 && client.is_closed() => {
                    tracing::info!("the catalog connection broke ({e}); connecting again");
                    self.client = None;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Invalid("the catalog connection broke twice".into()))
    }
}

/// The alert severities backup.alerts allows, least severe first.
pub const SEVERITIES: [&str; 3] = ["info", "warning", "critical"];

/// The alert kinds backup.alerts' CHECK allows (sql/catalog.sql): the
/// notifier's routing and the metrics' label set.
pub const ALERT_KINDS: [&str; 19] = [
    "backup_failed",
    "job_overdue",
    "archive_failing",
    "rpo_exceeded",
    "worker_error",
    "repository_unavailable",
    "repository_lagging",
    "expire_failed",
    "verification_failed",
    "restore_test_failed",
    "table_restore_failed",
    "restore_test_overdue",
    "rto_exceeded",
    "notification_failed",
    "repository_almost_full",
    "key_rotation_failed",
    "key_rotation_overdue",
    "wal_receiver_down",
    "wal_stream_lagging",
];
