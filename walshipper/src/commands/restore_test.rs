//! `restore-test`: proves a backup restorable and measures how long that
//! takes (the RTO). Restores it to a target into a scratch directory,
//! starts PostgreSQL on it until recovery reached the target and the
//! cluster is open, checks it (pg_verifybackup, pg_amcheck of every
//! database, the recovered position against the target, the DBA's own
//! queries), and always removes it again (`scratch`).
//!
//! Prints `phase` events, then one `restore_test` event; exits 0 when
//! every check passed, 6 when a check failed, and the error's own code when
//! the restore itself failed. Keeps a record (`recovery_log`, operation
//! `restore_test`) in the repository.

use std::path::PathBuf;
use std::time::Instant;

use pg_backup_contract::{Event, RestoreTestReport};
use serde::Deserialize;

use crate::commands::restore::{Restored, Target};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::recovery_log;
use crate::repo::Repository;
use crate::scratch::{self, phase, timed_check, CheckResult, Scratch};
use crate::sql;
use crate::wal;

const OPERATION: &str = "restore_test";

/// A DBA's check: a query whose result (psql -At style: columns joined
/// by `|`, rows by newlines, NULL empty, trimmed) must equal `expected`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomCheck {
    pub name: String,
    /// Default: [pg] database.
    #[serde(default)]
    pub database: Option<String>,
    pub query: String,
    pub expected: String,
}

impl CustomCheck {
    /// Parses one `--check-json` value.
    pub fn parse(s: &str) -> Result<CustomCheck> {
        let c: CustomCheck = serde_json::from_str(s).map_err(|e| {
            Error::Invalid(format!(
                "--check-json: {e}; expected {{\"name\": ..., \"database\": ... (optional), \"query\": ..., \"expected\": ...}}"
            ))
        })?;
        if c.name.trim().is_empty() || c.name.len() > 200 {
            return Err(Error::Invalid(
                "--check-json: name must be 1 to 200 bytes".into(),
            ));
        }
        if c.query.trim().is_empty() {
            return Err(Error::Invalid(format!(
                "--check-json {}: the query is empty",
                c.name
            )));
        }
        if let Some(db) = &c.database {
            sql::check_name("--check-json database", db)?;
        }
        Ok(c)
    }
}

pub struct Args {
    pub json: bool,
    pub repo: Option<String>,
    pub backup: Option<String>,
    pub target: Target,
    pub checks: Vec<CustomCheck>,
    /// Instead of [restore_test] scratch_dir.
    pub scratch_dir: Option<PathBuf>,
}

pub fn run(cfg: &Config, args: &Args) -> Result<()> {
    let started = Instant::now();
    let id = recovery_log::new_id();
    // Before any thread exists: priorities and the signal mask are inherited.
    scratch::lower_priority(cfg);
    scratch::guard_signals();
    let mut report = RestoreTestReport {
        operation_id: id.clone(),
        target: recovery_log::target_of(&args.target),
        ..Default::default()
    };
    let mut repo: Option<Repository> = None;
    let mut sc: Option<Scratch> = None;
    let result = test(cfg, args, &id, started, &mut report, &mut repo, &mut sc);
    scratch::yield_if_interrupted();
    report.total_s = report.restore_s + report.replay_s + report.checks_s;
    report.passed = result.is_ok();
    report.error = result.as_ref().err().map(|e| e.to_string());
    phase(args.json, OPERATION, "cleanup", started);
    if let Some(s) = sc.take() {
        report.server_log = s.finish(!report.passed).map(|p| p.display().to_string());
    }
    if let Some(r) = &repo {
        scratch::record_if_interrupted(cfg, &r.name, None);
        let mut rec = record(cfg, args, &id, &report);
        recovery_log::finish(&mut rec, started, result.as_ref().err());
        recovery_log::write_all(&[r], &rec);
    }
    if args.json {
        crate::progress::event(&Event::RestoreTest(report.clone()));
    } else {
        print_human(&report);
    }
    result
}

/// The recovery record of this run (its outcome filled in by `finish`).
fn record(
    cfg: &Config,
    args: &Args,
    id: &str,
    report: &RestoreTestReport,
) -> recovery_log::RecoveryRecord {
    let mut rec = recovery_log::start(OPERATION, id.to_string());
    rec.backup_id = report.backup_id.clone();
    rec.target = report.target.clone();
    let dir = args
        .scratch_dir
        .as_deref()
        .unwrap_or(&cfg.restore_test.scratch_dir);
    rec.target_dir = dir.join(id).join("data").display().to_string();
    rec
}

fn print_human(r: &RestoreTestReport) {
    println!(
        "restore test {} of backup {} (repository {}): {}",
        r.operation_id,
        if r.backup_id.is_empty() {
            "?"
        } else {
            &r.backup_id
        },
        if r.repository.is_empty() {
            "?"
        } else {
            &r.repository
        },
        if r.passed { "PASSED" } else { "FAILED" }
    );
    println!(
        "  restore {:.1}s, replay {:.1}s, checks {:.1}s: measured RTO {:.1}s",
        r.restore_s, r.replay_s, r.checks_s, r.total_s
    );
    if let Some(l) = &r.recovered_lsn {
        println!(
            "  recovered to LSN {l}, last transaction at {}",
            r.recovered_time.as_deref().unwrap_or("(none replayed)")
        );
    }
    for c in &r.checks {
        println!(
            "  [{}] {} ({:.1}s): {}",
            if c.passed { "ok" } else { "FAILED" },
            c.name,
            c.duration_s,
            c.detail.lines().next().unwrap_or("")
        );
    }
    if let Some(l) = &r.server_log {
        println!("  the scratch server's log is kept in {l}");
    }
}

#[allow(clippy::too_many_arguments)]
fn test(
    cfg: &Config,
    args: &Args,
    id: &str,
    started: Instant,
    report: &mut RestoreTestReport,
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
        Some((record(cfg, args, id, report), started)),
    );
    let repo = repo_slot.insert(repo);
    let restored = sc.restore(cfg, &repo.name, &plan, &args.target, &[], args.json);
    report.restore_s = started.elapsed().as_secs_f64();
    let restored = restored?;
    sc.set_bin_dir(cfg, plan.backup.pg_version);

    // Before the server starts and changes the files.
    phase(args.json, OPERATION, "checks", started);
    let c = sc.verify_backup();
    report.checks_s += c.duration_s;
    report.checks.push(c);

    phase(args.json, OPERATION, "replay", started);
    let t = Instant::now();
    let opened = sc.start().and_then(|()| sc.wait_open());
    report.replay_s = t.elapsed().as_secs_f64();
    opened?;

    phase(args.json, OPERATION, "checks", started);
    let t = Instant::now();
    let (lsn, time) = sc.replay_position()?;
    report.recovered_lsn = lsn.clone();
    report.recovered_time = time.clone();
    report.checks.push(timed_check("target".into(), || {
        target_check(
            &args.target,
            &restored,
            plan.backup.stop_lsn(),
            lsn.as_deref(),
            time.as_deref(),
            &sc.log_text(),
        )
    }));
    for db in sc.databases()? {
        report
            .checks
            .push(timed_check(format!("pg_amcheck {db}"), || {
                let mut c = sc.tool("pg_amcheck");
                // --install-missing runs CREATE EXTENSION: production's
                // event triggers (copied in the backup) must not fire.
                c.env("PGOPTIONS", "-c session_replication_role=replica");
                // The database as a connection string: -d takes a pattern.
                c.arg("--install-missing").arg(sc.conninfo(&db, None));
                let (ok, out) = sc.run_tool(c);
                // pg_amcheck says nothing when it finds nothing.
                if ok && out.trim().is_empty() {
                    (
                        true,
                        "no corruption found in tables and btree indexes".into(),
                    )
                } else {
                    (ok, out)
                }
            }));
    }
    if !args.checks.is_empty() {
        let role = check_role(sc, cfg, &args.checks)?;
        for check in &args.checks {
            report.checks.push(custom_check(
                sc,
                &role,
                check,
                &cfg.pg.database,
                cfg.restore_test.check_timeout,
            ));
        }
    }
    report.checks_s += t.elapsed().as_secs_f64();
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| {
            format!(
                "{} ({})",
                c.name,
                c.detail.lines().next().unwrap_or("").trim()
            )
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::VerifyFailed(format!(
            "restore test of backup {} failed: {}",
            report.backup_id,
            failed.join("; ")
        )))
    }
}

/// Whether recovery ended where it was asked to.
fn target_check(
    target: &Target,
    restored: &Restored,
    backup_stop: u64,
    lsn: Option<&str>,
    time: Option<&str>,
    log: &str,
) -> (bool, String) {
    let Some(replayed) = lsn.and_then(wal::parse_lsn) else {
        return (false, "the server reports no replayed WAL".into());
    };
    let at = format!(
        "replayed to {}{}",
        wal::format_lsn(replayed),
        time.map(|t| format!(", last transaction at {t}"))
            .unwrap_or_default()
    );
    // Every target lies at or after the end of the backup.
    if replayed < backup_stop {
        return (
            false,
            format!(
                "{at}: before the end of the backup ({}), so the cluster was not consistent",
                wal::format_lsn(backup_stop)
            ),
        );
    }
    match target {
        Target::End => {
            let seg = restored.wal_segment_size;
            let reached = wal::lsn_prev_segno(replayed, seg);
            let want = wal::segment_name(restored.timeline, restored.wal_end_segno, seg);
            (
                reached >= restored.wal_end_segno,
                format!("{at}; the archive reached {want} when the test began"),
            )
        }
        Target::Time { at: t, raw } => match time {
            None => (
                true,
                format!("{at}; no transaction replayed, none committed before {raw}"),
            ),
            Some(s) => match chrono::DateTime::parse_from_rfc3339(s) {
                Ok(last) => (
                    last <= *t,
                    format!(
                        "{at}; target time {raw}: the last transaction replayed is {} it",
                        if last <= *t { "not after" } else { "AFTER" }
                    ),
                ),
                Err(_) => (false, format!("{at}: cannot read the time {s:?}")),
            },
        },
        Target::Name(n) => {
            let stopped = log.contains(&format!("recovery stopping at restore point \"{n}\""));
            (
                stopped,
                if stopped {
                    format!("{at}; recovery stopped at restore point \"{n}\"")
                } else {
                    format!("{at}; the server log does not say that recovery stopped at restore point \"{n}\"")
                },
            )
        }
        Target::Lsn(l) => (
            replayed >= *l,
            format!("{at}; target LSN {}", wal::format_lsn(*l)),
        ),
        Target::Immediate => (true, format!("{at}; consistent at the end of the backup")),
        Target::Xid(x) => {
            let stopped = log.contains(&format!("of transaction {x},"));
            (stopped, format!("{at}; target transaction {x}"))
        }
    }
}

/// Creates the role custom checks run as: a login role without
/// superuser (a superuser could COPY ... TO PROGRAM as the OS user), member
/// of pg_read_all_data.
fn check_role(sc: &Scratch, cfg: &Config, checks: &[CustomCheck]) -> Result<String> {
    let r = crate::keys::random::<4>().unwrap_or_default();
    let role = format!("walshipper_check_{}", hex::encode(r));
    let mut c = sc
        .connect("postgres")
        .or_else(|_| sc.connect("template1"))?;
    let mut stmt = format!(
        "CREATE ROLE {r} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS; GRANT pg_read_all_data TO {r};",
        r = sql::ident(&role)
    );
    let mut dbs: Vec<&str> = checks
        .iter()
        .map(|c| c.database.as_deref().unwrap_or(&cfg.pg.database))
        .collect();
    dbs.sort();
    dbs.dedup();
    for db in dbs {
        let exists = c
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
            .map_err(crate::pg::pg_err("look up a database"))?
            .is_some();
        if exists {
            stmt.push_str(&format!(
                " GRANT CONNECT ON DATABASE {} TO {};",
                sql::ident(db),
                sql::ident(&role)
            ));
        }
    }
    c.batch_execute(&stmt)
        .map_err(crate::pg::pg_err("create the role custom checks run as"))?;
    Ok(role)
}

fn db_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.severity(), d.message()),
        None => e.to_string(),
    }
}

/// Runs one custom check as `role`, in a READ ONLY transaction with a
/// statement_timeout. The query travels as protocol text, never through a
/// shell or psql (whose backslash commands run programs); it is parsed as a
/// prepared statement first, which refuses more than one statement (so no
/// `COMMIT; ...` gets out of the read-only transaction).
fn custom_check(
    sc: &Scratch,
    role: &str,
    check: &CustomCheck,
    default_db: &str,
    timeout_s: u64,
) -> CheckResult {
    let db = check.database.as_deref().unwrap_or(default_db);
    timed_check(format!("custom: {}", check.name), || {
        let mut c = match sc.connect_as(db, role) {
            Ok(c) => c,
            Err(Error::Postgres { source, .. }) => {
                return (false, format!("database {db}: {}", db_message(&source)))
            }
            Err(e) => return (false, e.to_string()),
        };
        let setup = format!(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = {};",
            sql::literal(&format!("{timeout_s}s"))
        );
        if let Err(e) = c.batch_execute(&setup) {
            return (false, db_message(&e));
        }
        if let Err(e) = c.prepare(&check.query) {
            return (false, db_message(&e));
        }
        let got = match c.simple_query(&check.query) {
            Ok(msgs) => {
                let mut rows = Vec::new();
                for m in msgs {
                    if let postgres::SimpleQueryMessage::Row(r) = m {
                        let cols: Vec<&str> =
                            (0..r.len()).map(|i| r.get(i).unwrap_or("")).collect();
                        rows.push(cols.join("|"));
                    }
                }
                rows.join("\n").trim().to_string()
            }
            Err(e) => return (false, db_message(&e)),
        };
        let _ = c.batch_execute("ROLLBACK");
        let expected = check.expected.trim();
        if got == expected {
            (true, got)
        } else {
            (false, format!("got {got:?}, expected {expected:?}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restored() -> Restored {
        Restored {
            backup_id: "b".into(),
            repository: "repo1".into(),
            timeline: 1,
            wal_end_segno: 5,
            wal_segment_size: 16 << 20,
            duration_s: 0.0,
            databases_excluded: Vec::new(),
            verifybackup_ignore: Vec::new(),
        }
    }

    #[test]
    fn target_checks() {
        let r = restored();
        let stop = 4 * (16u64 << 20) + 100;
        // Into segment 5 (a switch record ends at the start of segment 6).
        let ok = target_check(&Target::End, &r, stop, Some("0/6000000"), None, "");
        assert!(ok.0, "{}", ok.1);
        let short = target_check(&Target::End, &r, stop, Some("0/4FFFFFF"), None, "");
        assert!(!short.0);
        let before_backup = target_check(&Target::Immediate, &r, stop, Some("0/4000000"), None, "");
        assert!(!before_backup.0);
        let t = crate::commands::restore::parse_time("2026-11-26 10:00:00+00").unwrap();
        let time = Target::Time {
            at: t,
            raw: "2026-11-26 10:00:00+00".into(),
        };
        assert!(
            target_check(
                &time,
                &r,
                stop,
                Some("0/5000100"),
                Some("2026-11-26T09:59:59.000001Z"),
                ""
            )
            .0
        );
        assert!(
            !target_check(
                &time,
                &r,
                stop,
                Some("0/5000100"),
                Some("2026-11-26T10:00:00.5Z"),
                ""
            )
            .0
        );
        let name = Target::Name("p-1".into());
        let log = "2026-11-26 LOG:  recovery stopping at restore point \"p-1\", time 2026-11-26";
        assert!(target_check(&name, &r, stop, Some("0/5000100"), None, log).0);
        assert!(!target_check(&name, &r, stop, Some("0/5000100"), None, "").0);
    }

    #[test]
    fn check_json_is_strict() {
        let c = CustomCheck::parse(r#"{"name":"n","query":"SELECT 1","expected":"1"}"#).unwrap();
        assert_eq!(c.database, None);
        for bad in [
            r#"{"name":"n","query":"SELECT 1"}"#,
            r#"{"name":"","query":"SELECT 1","expected":"1"}"#,
            r#"{"name":"n","query":" ","expected":"1"}"#,
            r#"{"name":"n","query":"SELECT 1","expected":"1","sudo":true}"#,
            "not json",
        ] {
            assert!(CustomCheck::parse(bad).is_err(), "{bad}");
        }
    }
}
