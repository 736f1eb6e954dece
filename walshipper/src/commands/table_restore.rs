//! `table-restore`: chosen tables as they were at a target, loaded into a
//! new schema of the live database (never over the originals).
//!
//! The cluster is restored into a scratch directory (`scratch`) and
//! recovered to the target; there the tables are moved into a schema of the
//! new name (with their indexes, constraints and owned sequences), foreign
//! keys to tables outside the set, triggers and rules are dropped (they
//! would reach into, or fire functions of, the live database), and
//! PostgreSQL's own tools copy the schema out (`pg_dump -n`) and into the
//! live database (`pg_restore --single-transaction`): all or nothing, and
//! owned by ROLE. A non-superuser ROLE loads over a connection as ROLE
//! itself, never as the [pg] superuser with SET ROLE: a check constraint or
//! generated column calls ROLE's functions during COPY, and those could
//! RESET ROLE back to the superuser.

use std::path::PathBuf;
use std::time::Instant;

use pg_backup_contract::{Event, RestoredTable, TableRestoreReport};

use crate::commands::restore::Target;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::pg::pg_err;
use crate::recovery_log;
use crate::repo::Repository;
use crate::scratch::{self, phase, Scratch};
use crate::sql;

const OPERATION: &str = "table_restore";

pub struct Args {
    pub json: bool,
    pub repo: Option<String>,
    pub backup: Option<String>,
    pub target: Target,
    pub database: String,
    /// `schema.table` in SQL syntax, as given.
    pub tables: Vec<String>,
    pub schema: String,
    pub role: String,
    pub scratch_dir: Option<PathBuf>,
}

/// One table to restore: where it was, its oid in the scratch cluster.
struct Table {
    schema: String,
    name: String,
    oid: u32,
}

pub fn run(cfg: &Config, args: &Args) -> Result<()> {
    let started = Instant::now();
    let id = recovery_log::new_id();
    let mut tables = Vec::new();
    for t in &args.tables {
        let parsed = sql::parse_table(t)?;
        if !tables.contains(&parsed) {
            tables.push(parsed);
        }
    }
    if tables.is_empty() {
        return Err(Error::Invalid("name at least one --table".into()));
    }
    sql::check_name("--into-schema", &args.schema)?;
    sql::check_name("--role", &args.role)?;
    sql::check_name("--database", &args.database)?;
    if matches!(args.target, Target::Immediate | Target::Xid(_)) {
        return Err(Error::Invalid(
            "table-restore takes --target-time, --target-name or --target-lsn (or none: the end of the archived WAL)".into(),
        ));
    }
    // Before any thread exists: priorities and the signal mask are inherited.
    scratch::lower_priority(cfg);
    scratch::guard_signals();
    // Early, before minutes of restoring: the live side must take the load.
    let loader = check_live(cfg, args)?;
    let mut report = TableRestoreReport {
        operation_id: id.clone(),
        target: recovery_log::target_of(&args.target),
        database: args.database.clone(),
        schema: args.schema.clone(),
        ..Default::default()
    };
    let mut repo: Option<Repository> = None;
    let mut sc: Option<Scratch> = None;
    let result = restore_tables(
        cfg,
        args,
        loader,
        &id,
        &tables,
        started,
        &mut report,
        &mut repo,
        &mut sc,
    );
    scratch::yield_if_interrupted();
    report.total_s = report.restore_s + report.replay_s + report.copy_s;
    phase(args.json, OPERATION, "cleanup", started);
    let mut target_dir = String::new();
    let mut kept = None;
    if let Some(s) = sc.take() {
        target_dir = s.data.display().to_string();
        // A server log helps with a failure of the server or the tools,
        // not with a mistyped table name.
        let keep = matches!(&result, Err(e) if !matches!(e, Error::Invalid(_)));
        kept = s.finish(keep);
    }
    if let Some(r) = &repo {
        scratch::record_if_interrupted(cfg, &r.name, None);
        let mut rec = record(args, &id, &report, target_dir);
        recovery_log::finish(&mut rec, started, result.as_ref().err());
        recovery_log::write_all(&[r], &rec);
    }
    if let Err(e) = result {
        if let Some(k) = kept {
            tracing::error!("the scratch server's log is kept in {}", k.display());
        }
        return Err(e);
    }
    if args.json {
        crate::progress::event(&Event::TableRestore(report));
    } else {
        println!(
            "restored {} table(s) of database {} as of backup {} into schema {} in {:.1}s:",
            report.tables.len(),
            report.database,
            report.backup_id,
            sql::display_ident(&report.schema),
            report.total_s
        );
        for t in &report.tables {
            println!("  {} -> {} ({} rows)", t.source, t.restored_as, t.rows);
        }
    }
    Ok(())
}

/// The recovery record of this run (its outcome filled in by `finish`).
fn record(
    args: &Args,
    id: &str,
    report: &TableRestoreReport,
    target_dir: String,
) -> recovery_log::RecoveryRecord {
    let mut rec = recovery_log::start(OPERATION, id.to_string());
    rec.backup_id = report.backup_id.clone();
    rec.target = report.target.clone();
    rec.target_dir = target_dir;
    rec.databases = vec![args.database.clone()];
    rec
}

/// A connection to database `db` of the live cluster ([pg]).
fn connect_live(cfg: &Config, db: &str) -> Result<postgres::Client> {
    let mut live = cfg.clone();
    live.pg.database = db.to_string();
    crate::pg::connect(&live).map_err(|e| match e {
        Error::Postgres { source, .. }
            if source.code() == Some(&postgres::error::SqlState::INVALID_CATALOG_NAME) =>
        {
            Error::Invalid(format!(
                "database {} does not exist in the live cluster",
                sql::display_ident(db)
            ))
        }
        e => e,
    })
}

/// How the load reaches the live database.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Loader {
    /// ROLE is (or can become) a superuser: the [pg] user loads with
    /// `--role ROLE`; nothing is lost, ROLE could do anything anyway.
    SetRole,
    /// Connected as ROLE itself: code of ROLE's that runs during the load
    /// (CHECK constraints, generated columns, domain checks during COPY)
    /// cannot `RESET ROLE` back to the [pg] superuser.
    AsRole,
}

/// The new schema must not exist; ROLE must exist and be allowed to create
/// schemas in the database; the load must be able to connect as ROLE (or,
/// for a superuser ROLE, the [pg] user be able to SET ROLE to it).
fn check_live(cfg: &Config, args: &Args) -> Result<Loader> {
    let mut c = connect_live(cfg, &args.database)?;
    let sql = "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1), \
               EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $2)";
    let row = c
        .query_one(sql, &[&args.schema, &args.role])
        .map_err(pg_err(sql))?;
    let (schema_exists, role_exists): (bool, bool) = (row.get(0), row.get(1));
    if schema_exists {
        return Err(Error::Invalid(format!(
            "schema {} already exists in database {}; table-restore loads into a new schema only: choose another --into-schema",
            sql::display_ident(&args.schema),
            sql::display_ident(&args.database)
        )));
    }
    if !role_exists {
        return Err(Error::Invalid(format!(
            "role {} does not exist in the live cluster; --role names the role the restored tables will belong to",
            sql::display_ident(&args.role)
        )));
    }
    // A role that is a member of a superuser role can become one: as good
    // as a superuser, for what its code can do during the load.
    let sql = "SELECT pg_has_role(current_user, $1, 'MEMBER'), \
               has_database_privilege($1, current_database(), 'CREATE'), current_user::text, \
               EXISTS (SELECT 1 FROM pg_roles s WHERE s.rolsuper AND pg_has_role($1, s.oid, 'MEMBER')), \
               (SELECT rolcanlogin FROM pg_roles WHERE rolname = $1)";
    let row = c.query_one(sql, &[&args.role]).map_err(pg_err(sql))?;
    let (member, create, me, superuser): (bool, bool, String, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let can_login = row.get::<_, Option<bool>>(4) == Some(true);
    if !create {
        return Err(Error::Invalid(format!(
            "role {r} may not create schemas in database {d}; GRANT CREATE ON DATABASE {d} TO {r}, or choose another --role",
            r = sql::display_ident(&args.role),
            d = sql::display_ident(&args.database)
        )));
    }
    if superuser {
        tracing::warn!(
            "role {} is a superuser: defaults and check constraints of the restored tables run with superuser rights while they load; a role of the tables' owners is safer",
            sql::display_ident(&args.role)
        );
        if !member {
            return Err(Error::Invalid(format!(
                "the [pg] user {me} cannot SET ROLE {r}; GRANT {r} TO {me}, or choose another --role",
                r = sql::display_ident(&args.role),
                me = sql::display_ident(&me)
            )));
        }
        return Ok(Loader::SetRole);
    }
    drop(c);
    if !can_login {
        return Err(Error::Invalid(format!(
            "role {r} cannot log in (NOLOGIN), and table-restore loads as {r} itself so that code of {r}'s that runs during the load has {r}'s rights only; ALTER ROLE {r} LOGIN (and let walshipper's operating system user connect as it: pg_hba.conf/pg_ident.conf map or ~/.pgpass), choose a login role, or use a superuser --role",
            r = sql::display_ident(&args.role)
        )));
    }
    // Early, rather than after minutes of restoring. Only a refusal by the
    // server's rules fails here: a password (which this client does not
    // look up in ~/.pgpass, pg_restore does) is left to the load.
    match connect_as_role(cfg, args)? {
        Ok(_) => {}
        Err(e)
            if e.code()
                == Some(&postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION) =>
        {
            return Err(role_refused(cfg, args, &e.to_string()));
        }
        Err(e) => tracing::debug!("connecting as {} without a password: {e}", args.role),
    }
    Ok(Loader::AsRole)
}

/// A connection to the live database as ROLE, without a password, with
/// TLS as `[pg] sslmode` says.
fn connect_as_role(
    cfg: &Config,
    args: &Args,
) -> Result<std::result::Result<postgres::Client, postgres::Error>> {
    let mut c = postgres::Config::new();
    c.host(&cfg.pg.host)
        .port(cfg.pg.port)
        .user(&args.role)
        .dbname(&args.database)
        .application_name("walshipper table-restore")
        .connect_timeout(std::time::Duration::from_secs(10));
    crate::tls::connect(c, &cfg.pg, &cfg.pg.host)
}

/// The error when the live cluster does not let walshipper in as ROLE.
fn role_refused(cfg: &Config, args: &Args, why: &str) -> Error {
    Error::Invalid(format!(
        "cannot connect to database {d} as role {r} (host={h} port={p}), which table-restore loads as so that code of {r}'s that runs during the load (check constraints, generated columns) has {r}'s rights only; nothing was loaded: {why}. Allow walshipper's operating system user to connect as {r} (a pg_hba.conf/pg_ident.conf map, or a password in its ~/.pgpass), or run the table restore with a superuser --role",
        d = sql::display_ident(&args.database),
        r = sql::display_ident(&args.role),
        h = cfg.pg.host,
        p = cfg.pg.port,
        why = scratch::shorten(why)
    ))
}

#[allow(clippy::too_many_arguments)]
fn restore_tables(
    cfg: &Config,
    args: &Args,
    loader: Loader,
    id: &str,
    wanted: &[(String, String)],
    started: Instant,
    report: &mut TableRestoreReport,
    repo_slot: &mut Option<Repository>,
    sc_slot: &mut Option<Scratch>,
) -> Result<()> {
    phase(args.json, OPERATION, "restore", started);
    let (sc, repo, plan) = scratch::begin(
        cfg,
        sc_slot,
        args.scratch_dir.as_deref(),
        id,
        args.repo.as_deref(),
        args.backup.as_deref(),
        &args.target,
        args.json,
    )
    .inspect_err(|_| report.restore_s = started.elapsed().as_secs_f64())?;
    report.repository = repo.name.clone();
    report.backup_id = plan.backup.id.clone();
    scratch::record_if_interrupted(
        cfg,
        &repo.name,
        Some((
            record(args, id, report, sc.data.display().to_string()),
            started,
        )),
    );
    let restored = sc.restore(
        cfg,
        &repo.name,
        &plan,
        &args.target,
        std::slice::from_ref(&args.database),
        args.json,
    );
    *repo_slot = Some(repo);
    report.restore_s = started.elapsed().as_secs_f64();
    restored?;
    sc.set_bin_dir(cfg, plan.backup.pg_version);

    phase(args.json, OPERATION, "replay", started);
    let t = Instant::now();
    let opened = sc.start().and_then(|()| sc.wait_open());
    report.replay_s = t.elapsed().as_secs_f64();
    opened?;
    let (lsn, time) = sc.replay_position()?;
    report.recovered_lsn = lsn;
    report.recovered_time = time;

    phase(args.json, OPERATION, "copy", started);
    let t = Instant::now();
    let result = copy_tables(cfg, args, loader, sc, wanted, report);
    report.copy_s = t.elapsed().as_secs_f64();
    result
}

/// In the scratch cluster: finds the tables, moves them into the new
/// schema and cuts what ties them to the rest; then dumps that schema and
/// loads it into the live database.
fn copy_tables(
    cfg: &Config,
    args: &Args,
    loader: Loader,
    sc: &Scratch,
    wanted: &[(String, String)],
    report: &mut TableRestoreReport,
) -> Result<()> {
    let db = &args.database;
    let mut c = sc.connect(db).map_err(|e| match e {
        Error::Postgres { source, .. }
            if source.code() == Some(&postgres::error::SqlState::INVALID_CATALOG_NAME) =>
        {
            Error::Invalid(format!(
                "database {} did not exist at the target",
                sql::display_ident(db)
            ))
        }
        e => e,
    })?;
    // Production's event triggers (ENABLE, the default) would fire on the
    // DDL below; with replica they do not (nor ordinary triggers).
    let q = "SET session_replication_role = replica";
    c.batch_execute(q).map_err(pg_err(q))?;
    let new = &args.schema;
    let mut tx = c.transaction().map_err(pg_err("begin"))?;
    // A schema of the new name at the target (restoring a dropped schema
    // under its own name): renamed out of the way first.
    let renamed = format!(
        "walshipper_old_{}",
        hex::encode(crate::keys::random::<4>().unwrap_or_default())
    );
    let clash = tx
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[new])
        .map_err(pg_err("look up the new schema"))?
        .is_some();
    if clash {
        exec(
            &mut tx,
            &format!(
                "ALTER SCHEMA {} RENAME TO {}",
                sql::ident(new),
                sql::ident(&renamed)
            ),
        )?;
    }
    let mut tables = Vec::new();
    for (schema, name) in wanted {
        let q = "SELECT c.oid, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2";
        let now_in = if clash && schema == new {
            &renamed
        } else {
            schema
        };
        let row = tx.query_opt(q, &[now_in, name]).map_err(pg_err(q))?;
        let shown = sql::display_qualified(schema, name);
        let Some(row) = row else {
            return Err(Error::Invalid(format!(
                "table {shown} does not exist in database {} at the target (backup {}, {})",
                sql::display_ident(db),
                report.backup_id,
                report
                    .recovered_time
                    .as_deref()
                    .map(|t| format!("last transaction at {t}"))
                    .unwrap_or_else(|| "recovered".into())
            )));
        };
        let kind: String = row.get(1);
        match kind.as_str() {
            "r" => {}
            "p" => {
                return Err(Error::Invalid(format!(
                    "{shown} is a partitioned table: name its partitions (each is restored as a table of its own)"
                )))
            }
            _ => {
                return Err(Error::Invalid(format!(
                    "{shown} is not a table (a view, sequence, index or foreign table); only tables are restored"
                )))
            }
        }
        if tables.iter().any(|t: &Table| &t.name == name) {
            return Err(Error::Invalid(format!(
                "two tables named {} cannot both go into schema {}; restore them in two runs",
                sql::display_ident(name),
                sql::display_ident(new)
            )));
        }
        tables.push(Table {
            schema: now_in.clone(),
            name: name.clone(),
            oid: row.get(0),
        });
    }
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    // Parents outside the set: a partition is detached, an inheritance
    // child disinherited, so that the dump does not attach it to a table
    // of the live database.
    for t in &tables {
        let q = "SELECT pn.nspname::text, p.relname::text, c.relispartition \
                 FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
                 JOIN pg_namespace pn ON pn.oid = p.relnamespace JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhrelid = $1 AND NOT i.inhparent = ANY($2)";
        for r in tx.query(q, &[&t.oid, &oids]).map_err(pg_err(q))? {
            let parent = sql::qualified(r.get::<_, &str>(0), r.get::<_, &str>(1));
            let me = sql::qualified(&t.schema, &t.name);
            let stmt = if r.get::<_, bool>(2) {
                format!("ALTER TABLE {parent} DETACH PARTITION {me}")
            } else {
                format!("ALTER TABLE {me} NO INHERIT {parent}")
            };
            exec(&mut tx, &stmt)?;
        }
    }
    exec(&mut tx, &format!("CREATE SCHEMA {}", sql::ident(new)))?;
    for t in &tables {
        // Moves its indexes, constraints and owned sequences along.
        exec(
            &mut tx,
            &format!(
                "ALTER TABLE {} SET SCHEMA {}",
                sql::qualified(&t.schema, &t.name),
                sql::ident(new)
            ),
        )?;
    }
    let name_of = |oid: u32| {
        tables
            .iter()
            .find(|t| t.oid == oid)
            .map(|t| sql::qualified(new, &t.name))
            .unwrap_or_default()
    };
    let q = "SELECT conrelid, conname::text FROM pg_constraint \
             WHERE contype = 'f' AND conrelid = ANY($1) AND NOT confrelid = ANY($1)";
    for r in tx.query(q, &[&oids]).map_err(pg_err(q))? {
        let stmt = format!(
            "ALTER TABLE {} DROP CONSTRAINT {}",
            name_of(r.get(0)),
            sql::ident(r.get::<_, &str>(1))
        );
        exec(&mut tx, &stmt)?;
    }
    let q =
        "SELECT tgrelid, tgname::text FROM pg_trigger WHERE tgrelid = ANY($1) AND NOT tgisinternal";
    for r in tx.query(q, &[&oids]).map_err(pg_err(q))? {
        let stmt = format!(
            "DROP TRIGGER {} ON {}",
            sql::ident(r.get::<_, &str>(1)),
            name_of(r.get(0))
        );
        exec(&mut tx, &stmt)?;
    }
    let q = "SELECT ev_class, rulename::text FROM pg_rewrite WHERE ev_class = ANY($1) AND rulename <> '_RETURN'";
    for r in tx.query(q, &[&oids]).map_err(pg_err(q))? {
        let stmt = format!(
            "DROP RULE {} ON {}",
            sql::ident(r.get::<_, &str>(1)),
            name_of(r.get(0))
        );
        exec(&mut tx, &stmt)?;
    }
    for ((schema, name), t) in wanted.iter().zip(&tables) {
        let q = format!("SELECT count(*) FROM {}", sql::qualified(new, &t.name));
        let rows: i64 = tx.query_one(&q, &[]).map_err(pg_err(&q))?.get(0);
        report.tables.push(RestoredTable {
            source: sql::display_qualified(schema, name),
            restored_as: sql::display_qualified(new, name),
            rows: rows.max(0) as u64,
        });
    }
    tx.commit().map_err(pg_err("commit"))?;
    drop(c);

    let dump = sc.root.join("tables.dump");
    let mut cmd = sc.tool("pg_dump");
    cmd.args([
        "--format=custom",
        "--strict-names",
        "--no-owner",
        "--no-privileges",
    ])
    .args([
        "--no-tablespaces",
        "--no-publications",
        "--no-subscriptions",
    ])
    .args(["--no-security-labels", "--schema"])
    .arg(sql::exact_pattern(new))
    .arg("--file")
    .arg(&dump)
    .arg("--dbname")
    .arg(sc.conninfo(db, None));
    let (ok, out) = sc.run_tool(cmd);
    if !ok {
        return Err(Error::VerifyFailed(format!(
            "pg_dump of the restored tables failed: {}",
            scratch::shorten(&out)
        )));
    }
    let user = match loader {
        Loader::SetRole => &cfg.pg.user,
        Loader::AsRole => &args.role,
    };
    // libpq takes the same sslmode and sslrootcert (`system` from 16 on).
    let rootcert = cfg.pg.sslrootcert.to_string_lossy();
    let port = cfg.pg.port.to_string();
    let mut live = vec![
        ("host", cfg.pg.host.as_str()),
        ("port", port.as_str()),
        ("user", user.as_str()),
        ("dbname", db),
        ("application_name", "walshipper table-restore"),
        ("sslmode", cfg.pg.sslmode.name()),
    ];
    if !rootcert.is_empty() {
        live.push(("sslrootcert", &rootcert));
    }
    let live = sql::conninfo(&live);
    let mut cmd = sc.tool("pg_restore");
    cmd.args(["--single-transaction", "--exit-on-error", "--no-owner"])
        .args(["--no-privileges", "--no-tablespaces"]);
    match loader {
        Loader::SetRole => {
            cmd.arg("--role").arg(&args.role);
            // libpq reads no password_file: it gets the [pg] user's here.
            if !cfg.pg.password_file.as_os_str().is_empty() {
                if let Some(p) = crate::pg::password(&cfg.pg)? {
                    cmd.env("PGPASSWORD", p.as_str());
                }
            }
        }
        // The [pg] user's password is not ROLE's: ROLE's comes from
        // ~/.pgpass or the server trusts the OS user (peer, map).
        Loader::AsRole => {
            cmd.env_remove("PGPASSWORD");
        }
    }
    cmd.arg("--dbname").arg(live).arg(&dump);
    let (ok, out) = sc.run_tool(cmd);
    if !ok {
        // libpq's own words (LC_ALL=C): the connection failed, before
        // anything was sent.
        if loader == Loader::AsRole && out.contains("connection to server") {
            return Err(role_refused(cfg, args, &out));
        }
        return Err(Error::Invalid(format!(
            "loading the tables into database {} failed, nothing was loaded (one transaction): {}",
            sql::display_ident(db),
            scratch::shorten(&out)
        )));
    }
    Ok(())
}

fn exec(tx: &mut postgres::Transaction, stmt: &str) -> Result<()> {
    tx.batch_execute(stmt).map_err(|e| Error::Postgres {
        context: format!("in the scratch cluster: {stmt}"),
        source: e,
    })
}
