//! `restore`: a backup into a new data directory, set up to recover to a
//! target through archive-get.
//!
//! Every file is verified (frame tags, object hash, and the manifest's
//! hash) before it takes its final name. global/pg_control is written
//! last: a restore that stops half-way leaves a directory PostgreSQL refuses
//! to start, never a silently wrong cluster. On failure, what was restored
//! into an empty directory is removed again.
//!
//! The manifest is untrusted: it is validated (`Manifest::validate`), and
//! everything is written through `pgdata::DirFd`, relative to the target and
//! the tablespace directories, never following a link below them.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use chrono::{DateTime, FixedOffset};

use crate::codec::{hash_of, HashAlg, PlainHash};
use crate::config::Config;
use crate::delta;
use crate::error::{Error, Result};
use crate::file_list::{self, FileList, PathCursor, Spooled};
use crate::layout;
use crate::manifest::{
    check_location, write_pg_backup_manifest, BackupSummary, DatabaseEntry, FileEntry, Manifest,
    PgManifestFile, FIRST_NORMAL_OID, MAX_DATABASE_NAME,
};
use crate::pgdata::{DirFd, EntryKind};
use crate::progress::{json_event, Counters, Reporter};
use crate::repo::Repository;
use crate::wal;

#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// Recover to the end of the archived WAL.
    End,
    Immediate,
    Time {
        at: DateTime<FixedOffset>,
        raw: String,
    },
    Lsn(u64),
    Xid(String),
    Name(String),
}

pub struct Args {
    pub target_dir: PathBuf,
    pub backup: Option<String>,
    pub target: Target,
    pub action: String,
    pub jobs: usize,
    pub delta: bool,
    pub tablespace_map: Vec<(u32, PathBuf)>,
    pub json: bool,
    /// Read from this repository only (default: the first that can serve
    /// the target, falling back to the others file by file).
    pub repo: Option<String>,
    /// Restore only these databases (and the system ones); empty: all.
    pub db_include: Vec<String>,
    /// Keep a record of this restore in the repository (`recovery_log`).
    /// restore-test and table-restore keep their own.
    pub record: bool,
}

/// What a restore did, for the commands built on it.
#[derive(Clone, Debug)]
pub struct Restored {
    pub backup_id: String,
    /// The repository it was restored from.
    pub repository: String,
    pub timeline: u32,
    /// Last WAL segment the archive holds without a gap from the backup.
    pub wal_end_segno: u64,
    pub wal_segment_size: u64,
    pub duration_s: f64,
    /// Databases left out (`--db-include`): their files are zero, they
    /// must be dropped.
    pub databases_excluded: Vec<String>,
    /// Directories to pass to `pg_verifybackup -i` (the excluded
    /// databases', which the restored backup_manifest does not list).
    pub verifybackup_ignore: Vec<String>,
}

/// Databases always restored with `--db-include`, as pgBackRest does: a
/// cluster without them cannot be used or connected to.
pub const SYSTEM_DATABASES: &[&str] = &["template0", "template1", "postgres"];

/// Which databases a `--db-include` restore writes.
#[derive(Clone, Debug)]
pub struct DbSelection {
    /// Oids whose files are restored.
    keep: BTreeSet<u32>,
    pub restored: Vec<DatabaseEntry>,
    pub excluded: Vec<DatabaseEntry>,
}

impl DbSelection {
    /// Whether the file at manifest path `path` is written as zeros: it
    /// belongs to a database left out (one the list does not name too,
    /// e.g. dropped during the backup).
    pub fn zeroed(&self, path: &str) -> bool {
        database_dir(path)
            .is_some_and(|(oid, _)| oid >= FIRST_NORMAL_OID && !self.keep.contains(&oid))
    }
}

/// The database oid of a manifest path in a database directory
/// (`base/<oid>/...`, `pg_tblspc/<ts>/<version>/<oid>/...`), and that
/// directory.
fn database_dir(path: &str) -> Option<(u32, &str)> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = path.splitn(6, '/').collect();
    let (oid, depth) = match parts.as_slice() {
        ["base", oid, _, ..] => (*oid, 2),
        ["pg_tblspc", ts, _, oid, _, ..] if digits(ts) => (*oid, 4),
        _ => return None,
    };
    if !digits(oid) {
        return None;
    }
    let oid = oid.parse().ok()?;
    let end: usize = parts[..depth].iter().map(|p| p.len() + 1).sum::<usize>() - 1;
    Some((oid, &path[..end]))
}

/// Checks the names given to --db-include before anything is read.
fn check_db_include(names: &[String]) -> Result<()> {
    if names.len() > 1000 {
        return Err(Error::Invalid(
            "--db-include given more than 1000 times; restore the whole cluster instead".into(),
        ));
    }
    for n in names {
        if n.is_empty() || n.len() > MAX_DATABASE_NAME {
            return Err(Error::Invalid(format!(
                "--db-include {n:?} is not a database name PostgreSQL can have (1 to {MAX_DATABASE_NAME} bytes)"
            )));
        }
    }
    Ok(())
}

/// The databases of backup `m` to restore for `include` (the system ones
/// always), or None to restore all.
pub fn select_databases(m: &Manifest, include: &[String]) -> Result<Option<DbSelection>> {
    if include.is_empty() {
        return Ok(None);
    }
    if m.databases.is_empty() {
        return Err(Error::Invalid(format!(
            "backup {} has no list of its databases: it was taken by an older walshipper; restore the whole cluster (without --db-include), or take a new backup",
            m.id
        )));
    }
    for name in include {
        if !m.databases.iter().any(|d| d.name == *name) {
            let mut names: Vec<String> = m
                .databases
                .iter()
                .map(|d| format!("{:?}", d.name))
                .collect();
            names.sort();
            let more = names.len().saturating_sub(50);
            names.truncate(50);
            return Err(Error::Invalid(format!(
                "--db-include {name:?}: backup {} has no such database; it has {}{}",
                m.id,
                names.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )));
        }
    }
    let mut sel = DbSelection {
        keep: BTreeSet::new(),
        restored: Vec::new(),
        excluded: Vec::new(),
    };
    for d in &m.databases {
        let wanted = include.contains(&d.name)
            || SYSTEM_DATABASES.contains(&d.name.as_str())
            || d.oid < FIRST_NORMAL_OID;
        if wanted {
            sel.keep.insert(d.oid);
            sel.restored.push(d.clone());
        } else {
            sel.excluded.push(d.clone());
        }
    }
    Ok(Some(sel))
}

/// Parses a target time; a time zone is required, so that the target cannot
/// silently shift by the server's offset.
pub fn parse_time(s: &str) -> Result<DateTime<FixedOffset>> {
    let t = s.trim();
    for f in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%dT%H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f %#z",
    ] {
        if let Ok(d) = DateTime::parse_from_str(t, f) {
            return Ok(d);
        }
    }
    DateTime::parse_from_rfc3339(t).map_err(|_| {
        Error::Invalid(format!(
            "--target-time '{s}' is not a time with a zone, e.g. '2026-11-21 10:15:00+00'"
        ))
    })
}

/// The plan: which backup, and how far the archived WAL reaches from it.
pub struct Plan {
    /// The backup as the listing summarized it; restore reads its whole
    /// manifest again by its own key (`checked_manifest`).
    pub backup: BackupSummary,
    /// Last segment reachable without a gap from the backup's start (on its timeline).
    pub wal_end_segno: u64,
    pub wal_end_time: Option<SystemTime>,
}

/// Chooses the backup for a target and checks that the archive reaches it.
pub fn plan(repo: &Repository, backup: Option<&str>, target: &Target) -> Result<Plan> {
    let backups = repo.list_backups()?;
    if backups.is_empty() {
        return Err(Error::Invalid(
            "the repository holds no backup yet; take one with `walshipper backup`".into(),
        ));
    }
    let fits = |m: &BackupSummary| match target {
        Target::Time { at, .. } => m.stop_time().is_some_and(|s| s <= *at),
        Target::Lsn(l) => m.stop_lsn() <= *l,
        _ => true,
    };
    let chosen = match backup {
        Some(id) => {
            let m = repo.find_backup(id)?.summary();
            if !fits(&m) {
                return Err(Error::Invalid(format!(
                    "the target is before the end of backup {id} (it ends at {} / {}); pick an earlier backup or a later target",
                    m.stop_time, m.stop_lsn
                )));
            }
            m
        }
        None => backups.iter().rev().find(|m| fits(m)).cloned().ok_or_else(|| {
            let oldest = &backups[0];
            Error::Invalid(format!(
                "the target is earlier than any backup: the oldest backup, {}, is consistent from {} (LSN {}); older backups, if there were any, were removed by retention (walshipper expire)",
                oldest.id, oldest.stop_time, oldest.stop_lsn
            ))
        })?,
    };

    // Continuous WAL from the backup's first segment onwards.
    let seg = repo.descriptor.wal_segment_size;
    let first = wal::lsn_segno(chosen.start_lsn(), seg);
    let needed_last = wal::lsn_prev_segno(chosen.stop_lsn(), seg);
    let mut present: HashMap<u64, Option<SystemTime>> = HashMap::new();
    // Keys from the listing are untrusted: only well-formed WAL keys count,
    // with segment numbers PostgreSQL can write.
    for obj in repo.storage.list(crate::layout::WAL_PREFIX)? {
        if let Some(crate::layout::ObjectName::Wal {
            kind:
                wal::WalFileKind::Segment {
                    tli,
                    log,
                    seg: s,
                    partial: false,
                },
            ..
        }) = crate::layout::parse(&obj.key)
        {
            if tli == chosen.timeline {
                if let Some(n) = crate::commands::info::segno_of(log, s, seg) {
                    present.insert(n, obj.modified);
                }
            }
        }
    }
    let mut end = None;
    let mut s = first;
    while let Some(m) = present.get(&s) {
        end = Some((s, *m));
        s += 1;
    }
    let (wal_end_segno, wal_end_time) = match end {
        Some((s, t)) if s >= needed_last => (s, t),
        _ => {
            return Err(Error::Invalid(format!(
                "backup {} cannot be made consistent: WAL segment {} is missing from the repository (run `walshipper verify`)",
                chosen.id,
                wal::segment_name(chosen.timeline, s, seg)
            )))
        }
    };
    match target {
        Target::Lsn(l) if wal::lsn_prev_segno(*l, seg) > wal_end_segno => {
            return Err(Error::Invalid(format!(
                "target LSN {} is beyond the archived WAL, which reaches {} without a gap",
                wal::format_lsn(*l),
                wal::segment_name(chosen.timeline, wal_end_segno, seg)
            )))
        }
        Target::Time { at, raw } => {
            if let Some(t) = wal_end_time {
                let end: DateTime<chrono::Utc> = t.into();
                // Object stores report whole seconds (S3 LastModified): a
                // segment stored at 10:00:00.9 shows as 10:00:00.
                if *at > end + chrono::Duration::seconds(1) {
                    return Err(Error::Invalid(format!(
                        "target time {raw} is beyond the archived WAL, which ends at about {} (segment {}); archive more WAL (SELECT pg_switch_wal()) or choose an earlier target",
                        end.to_rfc3339(),
                        wal::segment_name(chosen.timeline, wal_end_segno, seg)
                    )));
                }
            }
        }
        _ => {}
    }
    Ok(Plan {
        backup: chosen,
        wal_end_segno,
        wal_end_time,
    })
}

fn is_empty_dir(p: &Path) -> Result<bool> {
    match fs::read_dir(p) {
        Ok(mut d) => Ok(d.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(Error::io(format!("read {}", p.display()), e)),
    }
}

/// Longest restore point name PostgreSQL takes (MAXFNAMELEN - 1).
const MAX_TARGET_NAME: usize = 63;

/// Refuses targets PostgreSQL cannot be given safely: control characters
/// (a newline would end the setting and start another), names too long.
fn check_target(target: &Target) -> Result<()> {
    let (what, value) = match target {
        Target::Name(n) => {
            if n.is_empty() || n.len() > MAX_TARGET_NAME {
                return Err(Error::Invalid(format!(
                    "--target-name must be 1 to {MAX_TARGET_NAME} bytes long (PostgreSQL's limit for restore point names)"
                )));
            }
            ("--target-name", n)
        }
        Target::Time { raw, .. } => ("--target-time", raw),
        Target::Xid(x) => ("--target-xid", x),
        _ => return Ok(()),
    };
    if value.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "{what} {value:?} contains control characters (a newline, tab, ...); PostgreSQL cannot take them in a recovery target. A restore point with such a name cannot be restored to by name: use --target-lsn with its LSN (backup.restore_points, or the server log)"
        )));
    }
    Ok(())
}

/// Reads the manifest of backup `listed` again by its own key, validates
/// it (its id must be the one its key names, and it must be the manifest
/// the listing summarized), follows `based_on` to the full backup,
/// validating each, and checks that the backup names objects of that chain
/// only. Returns the validated manifest. Every manifest is read with its
/// file list spooled to a local file (`crate::file_list`): what is held in
/// memory does not grow with the number of files.
fn checked_manifest(repo: &Repository, listed: &BackupSummary) -> Result<Spooled> {
    let id = listed.id.as_str();
    let read = |id: &str| file_list::read_manifest(repo, &layout::manifest(id));
    let mut chain = BTreeSet::new();
    let mut next = listed.based_on.clone();
    while let Some(b) = next {
        // validate() makes every based_on earlier than its backup; the set
        // stops a loop of equal-second ids all the same.
        if !chain.insert(b.clone()) {
            return Err(Error::Corrupt {
                key: layout::manifest(&b),
                reason: "the chain of based_on loops".into(),
            });
        }
        next = read(&b)
            .map_err(|e| match e {
                Error::NotFound(_) => Error::Corrupt {
                    key: layout::manifest(id),
                    reason: format!("it is built on backup {b}, which is not in the repository"),
                },
                e => e,
            })?
            .head
            .based_on;
    }
    let spooled = read(id).map_err(|e| match e {
        // Listed under this id, but not stored under it.
        Error::NotFound(key) => Error::Corrupt {
            key,
            reason: format!(
                "backup {id} is listed from a manifest stored under another name (a manifest copied or renamed in the repository); run `walshipper verify`"
            ),
        },
        e => e,
    })?;
    let m = &spooled.head;
    if (
        &m.start_lsn,
        &m.stop_lsn,
        m.timeline,
        &m.stop_time,
        &m.based_on,
    ) != (
        &listed.start_lsn,
        &listed.stop_lsn,
        listed.timeline,
        &listed.stop_time,
        &listed.based_on,
    ) {
        return Err(Error::Corrupt {
            key: layout::manifest(&m.id),
            reason: "the backup listing shows another manifest for this backup (one copied in the repository); run `walshipper verify`".into(),
        });
    }
    if let Some(other) = spooled.depends_on.difference(&chain).next() {
        return Err(Error::Corrupt {
            key: layout::manifest(&m.id),
            reason: format!(
                "it names objects of backup {other}, which this backup is not built on"
            ),
        });
    }
    crate::manifest::release_free_memory();
    Ok(spooled)
}

/// `p` made absolute, with its longest existing ancestor resolved (links
/// followed), so that two spellings of one place compare equal.
fn resolved(p: &Path) -> PathBuf {
    let mut head = p.to_path_buf();
    let mut tail = Vec::new();
    loop {
        if let Ok(r) = fs::canonicalize(&head) {
            let mut out = r;
            for c in tail.iter().rev() {
                out.push(c);
            }
            return out;
        }
        match (head.file_name().map(|n| n.to_os_string()), head.parent()) {
            (Some(n), Some(parent)) => {
                tail.push(n);
                head = parent.to_path_buf();
            }
            _ => return p.to_path_buf(),
        }
    }
}

fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Where each tablespace of `m` goes, checked: absolute and normalized,
/// no two at one place, none inside the target or holding it; empty unless
/// --delta; with --delta, a location from the manifest must be the one the
/// target's pg_tblspc/<oid> already links to (or be empty), so that --delta
/// never deletes in another cluster's tablespace.
fn tablespace_locations(
    m: &Manifest,
    args: &Args,
    target_dir: &Path,
) -> Result<HashMap<u32, PathBuf>> {
    for (oid, _) in &args.tablespace_map {
        if !m.tablespaces.iter().any(|t| t.oid == *oid) {
            return Err(Error::Invalid(format!(
                "--tablespace-map names tablespace {oid}, which is not in backup {}",
                m.id
            )));
        }
    }
    let target_real = resolved(target_dir);
    // The target's own links, read without following anything below it.
    let existing_links = DirFd::open_root(target_dir)
        .and_then(|d| d.open_dir("pg_tblspc"))
        .ok();
    let mut locations: HashMap<u32, PathBuf> = HashMap::new();
    let mut seen: Vec<(u32, PathBuf)> = Vec::new();
    for ts in &m.tablespaces {
        let remap = args.tablespace_map.iter().find(|(oid, _)| *oid == ts.oid);
        let loc = match remap {
            // The DBA's spelling: made absolute, `.`, `//` and a trailing
            // `/` dropped (`..` stays, and is refused below).
            Some((_, p)) => std::path::absolute(p)
                .map_err(|e| Error::io(format!("--tablespace-map {}", p.display()), e))?
                .components()
                .collect(),
            None => PathBuf::from(&ts.location),
        };
        if let Err(why) = check_location(&loc) {
            return Err(Error::Invalid(format!(
                "tablespace {} location {} {why}; remap it with --tablespace-map {}=DIR",
                ts.oid,
                loc.display(),
                ts.oid
            )));
        }
        let real = resolved(&loc);
        if overlaps(&real, &target_real) || overlaps(&loc, target_dir) {
            return Err(Error::Invalid(format!(
                "tablespace {} location {} and the target directory {} are inside one another; remap it with --tablespace-map {}=DIR",
                ts.oid,
                loc.display(),
                target_dir.display(),
                ts.oid
            )));
        }
        if let Some((other, _)) = seen.iter().find(|(_, r)| overlaps(r, &real)) {
            return Err(Error::Invalid(format!(
                "tablespaces {other} and {} would be restored into one place ({}); remap one with --tablespace-map OID=DIR",
                ts.oid,
                loc.display()
            )));
        }
        seen.push((ts.oid, real));
        if !args.delta && !is_empty_dir(&loc)? {
            return Err(Error::Invalid(format!(
                "tablespace {} location {} is not empty; remap it with --tablespace-map {}=DIR",
                ts.oid,
                loc.display(),
                ts.oid
            )));
        }
        if args.delta && remap.is_none() {
            let linked = existing_links
                .as_ref()
                .and_then(|d| d.read_link(&ts.oid.to_string()).ok().flatten());
            if linked.as_deref() != Some(loc.as_path()) && !is_empty_dir(&loc)? {
                return Err(Error::Invalid(format!(
                    "--delta would delete files in {} (tablespace {} of backup {}), but {}/pg_tblspc/{} does not link there: it may belong to another cluster. Restore without --delta into an empty directory, or remap it with --tablespace-map {}=DIR",
                    loc.display(),
                    ts.oid,
                    m.id,
                    target_dir.display(),
                    ts.oid,
                    ts.oid
                )));
            }
        }
        locations.insert(ts.oid, loc);
    }
    Ok(locations)
}

fn choose_repository(cfg: &Config, args: &Args) -> Result<(Repository, Plan, Vec<Repository>)> {
    if let Some(n) = &args.repo {
        cfg.find_repo(Some(n))?;
    }
    let mut chosen: Option<(Repository, Plan)> = None;
    let mut fallbacks = Vec::new();
    let mut first_err = None;
    for rc in &cfg.repos {
        if args.repo.as_deref().is_some_and(|n| n != rc.name) {
            continue;
        }
        let repo = match Repository::open_repo(cfg, rc) {
            Ok(r) => r,
            Err(e) => {
                if cfg.repos.len() > 1 {
                    tracing::warn!("repository {}: {e}", rc.name);
                }
                first_err.get_or_insert(e);
                continue;
            }
        };
        match &chosen {
            None => match plan(&repo, args.backup.as_deref(), &args.target) {
                Ok(p) => chosen = Some((repo, p)),
                Err(e) => {
                    if cfg.repos.len() > 1 {
                        tracing::warn!("repository {}: {e}", rc.name);
                    }
                    first_err.get_or_insert(e);
                }
            },
            Some((_, p)) => {
                if repo.find_backup(&p.backup.id).is_ok() {
                    fallbacks.push(repo);
                }
            }
        }
    }
    match chosen {
        Some((repo, plan)) => {
            if cfg.repos.len() > 1 {
                tracing::info!("restoring from repository {}", repo.name);
            }
            Ok((repo, plan, fallbacks))
        }
        None => Err(first_err.unwrap_or_else(|| Error::Invalid("no repository".into()))),
    }
}

pub fn run(cfg: &Config, args: &Args) -> Result<Restored> {
    let started = Instant::now();
    let record_id = crate::recovery_log::new_id();
    if !["promote", "pause", "shutdown"].contains(&args.action.as_str()) {
        return Err(Error::Invalid(format!(
            "--target-action '{}' is not one of promote, pause, shutdown",
            args.action
        )));
    }
    check_target(&args.target)?;
    let target_dir =
        std::path::absolute(&args.target_dir).map_err(|e| Error::io("target directory", e))?;
    let was_empty = is_empty_dir(&target_dir)?;
    if !was_empty && !args.delta {
        return Err(Error::Invalid(format!(
            "{} is not empty; restore into a new or empty directory, or use --delta to rewrite only what differs",
            target_dir.display()
        )));
    }
    if target_dir.join("postmaster.pid").exists() {
        return Err(Error::Invalid(format!(
            "{} holds a postmaster.pid: stop that server first",
            target_dir.display()
        )));
    }
    check_db_include(&args.db_include)?;
    let (repo, plan, fallbacks) = choose_repository(cfg, args)?;
    let result = restore_planned(
        cfg,
        args,
        &target_dir,
        was_empty,
        &repo,
        &plan,
        &fallbacks,
        started,
    );
    if args.record {
        let mut rec = crate::recovery_log::start("restore", record_id);
        rec.backup_id = plan.backup.id.clone();
        rec.target = crate::recovery_log::target_of(&args.target);
        rec.target_dir = target_dir.display().to_string();
        rec.databases = args.db_include.clone();
        crate::recovery_log::finish(&mut rec, started, result.as_ref().err());
        crate::recovery_log::write_all(&[&repo], &rec);
    }
    let (sel, ignore) = result?;
    let excluded = sel.map(|s| s.excluded).unwrap_or_default();
    Ok(Restored {
        backup_id: plan.backup.id.clone(),
        repository: repo.name.clone(),
        timeline: plan.backup.timeline,
        wal_end_segno: plan.wal_end_segno,
        wal_segment_size: repo.descriptor.wal_segment_size,
        duration_s: started.elapsed().as_secs_f64(),
        databases_excluded: excluded.into_iter().map(|d| d.name).collect(),
        verifybackup_ignore: ignore.into_iter().collect(),
    })
}

/// The restore once the backup and repository are chosen. Returns the
/// databases selected, and the directories of those left out (for
/// pg_verifybackup's --ignore).
#[allow(clippy::too_many_arguments)]
fn restore_planned(
    cfg: &Config,
    args: &Args,
    target_dir: &Path,
    was_empty: bool,
    repo: &Repository,
    plan: &Plan,
    fallbacks: &[Repository],
    started: Instant,
) -> Result<(Option<DbSelection>, BTreeSet<String>)> {
    // The listing is not trusted: the manifest used is the one stored
    // under the backup's own key, validated, with its chain.
    let checked = checked_manifest(repo, &plan.backup)?;
    let m = &checked.head;
    let sel = select_databases(m, &args.db_include)?;
    let mut sources = vec![repo];
    sources.extend(fallbacks.iter());
    tracing::info!("restoring backup {} into {}", m.id, target_dir.display());

    let locations = tablespace_locations(m, args, target_dir)?;
    // Which tablespace directories this restore creates (and so may remove).
    let created: Vec<PathBuf> = locations
        .values()
        .filter(|l| fs::symlink_metadata(l).is_err())
        .cloned()
        .collect();
    let target_created = fs::symlink_metadata(target_dir).is_err();

    let result = restore_into(
        cfg,
        &sources,
        plan,
        &checked,
        args,
        target_dir,
        &locations,
        sel.as_ref(),
        started,
    );
    if result.is_err() && was_empty && !args.delta {
        // Leave nothing that looks like a data directory. Links are
        // removed, never followed.
        if let Ok(d) = DirFd::open_root(target_dir) {
            let _ = d.remove_contents();
        }
        if target_created {
            let _ = fs::remove_dir(target_dir);
        }
        for loc in locations.values() {
            if let Ok(d) = DirFd::open_root(loc) {
                let _ = d.remove_contents();
            }
            if created.contains(loc) {
                // rmdir: removes an empty directory, never a link's target.
                let _ = fs::remove_dir(loc);
            }
        }
    }
    result?;
    let ignore = zeroed_dirs(&checked.files, sel.as_ref())?;
    Ok((sel, ignore))
}

/// The directories a restore writes into: the target and each tablespace's.
struct Roots {
    target: DirFd,
    tablespaces: HashMap<u32, DirFd>,
}

impl Roots {
    /// The root a manifest path is written under, and the path inside it:
    /// `pg_tblspc/<oid>/...` goes to that tablespace's directory.
    fn locate<'a>(&self, rel: &'a str) -> (&DirFd, &'a str) {
        if let Some(rest) = rel.strip_prefix("pg_tblspc/") {
            if let Some((oid, inner)) = rest.split_once('/') {
                if let Some(root) = oid.parse().ok().and_then(|o: u32| self.tablespaces.get(&o)) {
                    return (root, inner);
                }
            }
        }
        (&self.target, rel)
    }

    fn display(&self, rel: &str) -> String {
        let (root, inner) = self.locate(rel);
        root.display(inner)
    }
}

/// Creates (if needed) and opens a directory the DBA named or a validated
/// tablespace location, mode 0700.
fn open_root(p: &Path) -> Result<DirFd> {
    fs::create_dir_all(p).map_err(|e| Error::io(format!("create {}", p.display()), e))?;
    let d = DirFd::open_root(p).map_err(|e| Error::io(format!("open {}", p.display()), e))?;
    d.chmod(0o700)
        .map_err(|e| Error::io(format!("chmod {}", p.display()), e))?;
    Ok(d)
}

#[allow(clippy::too_many_arguments)]
fn restore_into(
    cfg: &Config,
    sources: &[&Repository],
    plan: &Plan,
    spooled: &Spooled,
    args: &Args,
    target_dir: &Path,
    locations: &HashMap<u32, PathBuf>,
    sel: Option<&DbSelection>,
    started: Instant,
) -> Result<()> {
    let m = &spooled.head;
    let list = &spooled.files;
    let zeroed = |f: &FileEntry| sel.is_some_and(|s| s.zeroed(&f.path));
    let repo = sources[0];
    let mut roots = Roots {
        target: open_root(target_dir)?,
        tablespaces: HashMap::new(),
    };
    for (oid, loc) in locations {
        roots.tablespaces.insert(*oid, open_root(loc)?);
    }
    if !locations.is_empty() {
        let io =
            |what: &str, e| Error::io(format!("{what} {}", roots.target.display("pg_tblspc")), e);
        let links = roots
            .target
            .create_dir("pg_tblspc", 0o700)
            .map_err(|e| io("create", e))?;
        for (oid, loc) in locations {
            let name = oid.to_string();
            if links
                .read_link(&name)
                .map_err(|e| io("read", e))?
                .as_deref()
                != Some(loc.as_path())
            {
                // A file or link is replaced; a directory (an in-place
                // tablespace) is an error rather than deleted.
                links.remove_file(&name).map_err(|e| io("replace", e))?;
                links.symlink(loc, &name).map_err(|e| io("link", e))?;
            }
        }
    }
    // A --delta target may keep pg_wal as a link to another disk (initdb
    // -X): it is left as it is, and nothing is created or chmod'ed through
    // it (a backup holds no file below pg_wal).
    let wal_link =
        args.delta && matches!(roots.target.kind("pg_wal"), Ok(Some(EntryKind::Symlink)));
    if wal_link {
        tracing::info!(
            "{} is a link: kept as it is",
            roots.target.display("pg_wal")
        );
    }
    for d in &m.dirs {
        if wal_link && (d.path == "pg_wal" || d.path.starts_with("pg_wal/")) {
            continue;
        }
        if d.path.starts_with("pg_tblspc/") && d.path.matches('/').count() == 1 {
            let oid = d.path.trim_start_matches("pg_tblspc/");
            if oid.parse().is_ok_and(|o: u32| locations.contains_key(&o)) {
                continue; // the tablespace link itself
            }
        }
        let mode = if d.mode & 0o777 == 0o750 {
            0o750
        } else {
            0o700
        };
        let (root, inner) = roots.locate(&d.path);
        if inner.is_empty() {
            continue;
        }
        root.walk(inner, Some(0o700))
            .and_then(|dir| dir.chmod(mode))
            .map_err(|e| Error::io(format!("create {}", root.display(inner)), e))?;
    }
    if args.delta {
        remove_unknown_files(list, &roots)?;
    }
    // Everything but pg_control, in parallel: the large files biggest
    // first, then the others in list order (`plan_restore`), handed to the
    // workers through a short queue as the list is read.
    let counters = Arc::new(Counters::default());
    counters.bytes_total.store(m.size, Ordering::Relaxed);
    counters.files_total.store(list.len(), Ordering::Relaxed);
    let reporter = Reporter::start("restore", counters.clone(), args.json);
    let mut syncer = Syncer::start();
    let jobs = args.jobs.max(1);
    let error: Mutex<Option<Error>> = Mutex::new(None);
    let failed = || error.lock().map(|e| e.is_some()).unwrap_or(true);
    let skipped = AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::sync_channel::<RestoreWork>(jobs * 2);
    // Each worker holds the receiver: once every worker is gone, even by a
    // panic, it is dropped and the planner's send fails instead of waiting
    // for room forever (the scope then re-raises the panic).
    let rx = Arc::new(Mutex::new(rx));
    let mut control: Vec<FileEntry> = Vec::new();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            let rx = Arc::clone(&rx);
            let (roots, syncer, skipped, counters, error) =
                (&roots, &syncer, &skipped, &counters, &error);
            let failed = &failed;
            s.spawn(move || loop {
                let item = match rx.lock() {
                    Ok(r) => r.recv(),
                    Err(_) => return,
                };
                // The queue ends when the planner is done (or stopped).
                let Ok(item) = item else { return };
                // After a failure, items are drained without work.
                if failed() {
                    continue;
                }
                let (done, files) = match &item {
                    RestoreWork::File(f) => (
                        restore_file(sources, f, roots, args.delta, zeroed(f), syncer)
                            .map(|wrote| usize::from(!wrote)),
                        std::slice::from_ref(f),
                    ),
                    RestoreWork::Bundle(files) => {
                        let refs: Vec<&FileEntry> = files.iter().collect();
                        (
                            restore_bundle(
                                sources,
                                &files[0].object,
                                &refs,
                                roots,
                                args.delta,
                                syncer,
                            ),
                            &files[..],
                        )
                    }
                };
                match done {
                    Ok(kept) => {
                        skipped.fetch_add(kept, Ordering::Relaxed);
                        let bytes = files.iter().map(|f| f.size).sum();
                        counters.bytes_done.fetch_add(bytes, Ordering::Relaxed);
                        counters
                            .files_done
                            .fetch_add(files.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if let Ok(mut slot) = error.lock() {
                            slot.get_or_insert(e);
                        }
                    }
                }
            });
        }
        drop(rx);
        let planned = plan_restore(list, &zeroed, &mut |w| {
            if failed() {
                return false;
            }
            tx.send(w).is_ok()
        });
        drop(tx);
        match planned {
            Ok(c) => control = c,
            Err(e) => {
                if let Ok(mut slot) = error.lock() {
                    slot.get_or_insert(e);
                }
            }
        }
    });
    drop(reporter);
    if let Some(e) = error.into_inner().ok().flatten() {
        return Err(e);
    }

    // backup_label, tablespace_map, PostgreSQL's backup_manifest, recovery settings.
    let label = repo.read_object_capped(&m.backup_label_object, crate::repo::LABEL_MAX)?;
    write_file(&roots.target, "backup_label", &label)?;
    let mut extra = vec![("backup_label".to_string(), label)];
    if m.tablespace_map_object.is_some() {
        let mut map = String::new();
        for ts in &m.tablespaces {
            let loc = locations
                .get(&ts.oid)
                .map(|p| p.display().to_string())
                .unwrap_or(ts.location.clone());
            // PostgreSQL escapes '\\' and line breaks in this file.
            let esc = loc
                .replace('\\', "\\\\")
                .replace('\n', "\\\n")
                .replace('\r', "\\\r");
            map.push_str(&format!("{} {esc}\n", ts.oid));
        }
        write_file(&roots.target, "tablespace_map", map.as_bytes())?;
        extra.push(("tablespace_map".to_string(), map.into_bytes()));
    }
    // The zeroed files are left out: their checksums would fail. Their
    // directories are what `pg_verifybackup -i` is told to skip.
    // Written as it is rendered, from the entries (not a copy of them).
    // Read from the spool as it is written.
    let pg_files = list
        .iter()
        .filter(|f| !f.as_ref().is_ok_and(&zeroed))
        .map(|f| {
            let f = f.map_err(std::io::Error::other)?;
            Ok(PgManifestFile {
                sha256: f.sha256_hex(),
                path: f.path,
                size: f.size,
                mtime: f.mtime,
                // pg_verifybackup knows SHA-256, not BLAKE3: a file with a
                // BLAKE3 is checked by size there (restore checked its hash).
            })
        });
    let now = chrono::Utc::now().timestamp();
    let extra_files = extra.iter().map(|(name, body)| {
        Ok(PgManifestFile {
            path: name.clone(),
            size: body.len() as u64,
            mtime: now,
            sha256: Some(HashAlg::Sha256.digest(body).hex()),
        })
    });
    write_file_with(&roots.target, "backup_manifest", |f| {
        write_pg_backup_manifest(
            f,
            pg_files.chain(extra_files),
            m.timeline,
            m.start_lsn(),
            m.stop_lsn(),
        )
    })?;
    write_recovery_settings(
        cfg,
        &roots.target,
        args.repo.as_deref(),
        &args.target,
        &args.action,
        sel.as_ref().is_some_and(|s| !s.excluded.is_empty()),
    )?;
    write_file(&roots.target, "recovery.signal", b"")?;

    // Last: pg_control, once everything else is durable. Until it exists
    // PostgreSQL will not start here.
    syncer.finish(&roots)?;
    for f in &control {
        restore_file(sources, f, &roots, false, false, &syncer)?;
    }
    // Everything else is durable (syncfs); now pg_control and the directories naming it.
    let fsync = |d: &DirFd| {
        d.sync()
            .map_err(|e| Error::io(format!("fsync {}", d.path().display()), e))
    };
    for d in m.dirs.iter().map(|d| d.path.as_str()).chain(["global"]) {
        let (root, inner) = roots.locate(d);
        if let Ok(dir) = root.walk(inner, None) {
            fsync(&dir)?;
        }
    }
    fsync(&roots.target)?;
    for d in roots.tablespaces.values() {
        fsync(d)?;
    }
    let (restored, excluded): (Vec<String>, Vec<String>) = match sel {
        Some(s) => (
            s.restored.iter().map(|d| d.name.clone()).collect(),
            s.excluded.iter().map(|d| d.name.clone()).collect(),
        ),
        None => (
            m.databases.iter().map(|d| d.name.clone()).collect(),
            Vec::new(),
        ),
    };
    let ignore = zeroed_dirs(list, sel)?;
    let summary = serde_json::json!({
        "event": "done", "backup_id": m.id, "target_dir": target_dir.display().to_string(),
        "files": list.len(), "files_unchanged": skipped.load(Ordering::Relaxed),
        "size": m.size, "duration_s": started.elapsed().as_secs_f64(),
        "wal_reaches": wal::segment_name(m.timeline, plan.wal_end_segno, repo.descriptor.wal_segment_size),
        "databases_restored": restored, "databases_excluded": excluded,
        "pg_verifybackup_ignore": ignore,
    });
    // What the DBA must do about the databases left out, on stderr with
    // --json (stdout is the JSON lines).
    let excluded_note = (!excluded.is_empty()).then(|| {
        let mut t = format!(
            "{} database(s) were not restored (--db-include) and cannot be used: their files are empty. Once recovery has ended, drop them:\n",
            excluded.len()
        );
        for name in &excluded {
            t.push_str(&format!("  DROP DATABASE {};\n", crate::sql::ident(name)));
        }
        t.push_str(
            "then remove the setting that lets recovery pass over their empty pages (it takes effect at the next restart):\n  ALTER SYSTEM RESET ignore_invalid_pages;\n",
        );
        t.push_str("To check the restored files: pg_verifybackup");
        for d in &ignore {
            t.push_str(&format!(" -i {d}"));
        }
        t.push_str(&format!(" {}", target_dir.display()));
        t
    });
    if args.json {
        json_event(summary);
        if let Some(n) = &excluded_note {
            tracing::warn!("{n}");
        }
    } else {
        println!(
            "restored backup {} ({} files, {}) into {} in {:.1}s; start PostgreSQL on it to recover{}",
            m.id,
            list.len(),
            crate::commands::info::human(m.size),
            target_dir.display(),
            started.elapsed().as_secs_f64(),
            match &args.target {
                Target::End => " to the end of the archived WAL".to_string(),
                _ => format!(" to the target, then {}", args.action),
            }
        );
        if let Some(n) = &excluded_note {
            println!("{n}");
        }
    }
    Ok(())
}

/// Files at least this large are written with O_DIRECT.
const DIRECT_MIN: u64 = 8 << 20;
const DIRECT_ALIGN: usize = 4096;
/// Each large file is written from two buffers of this size: one filled
/// by the decoder while the other is being written.
const DIRECT_BUF: usize = 2 << 20;

/// A buffer aligned for O_DIRECT, DIRECT_BUF bytes, `len` of them filled.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the allocation is owned by the buffer and moves with it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn layout() -> std::alloc::Layout {
        // DIRECT_BUF and DIRECT_ALIGN are constants that form a valid layout.
        std::alloc::Layout::from_size_align(DIRECT_BUF, DIRECT_ALIGN)
            .unwrap_or(std::alloc::Layout::new::<u8>())
    }

    fn new() -> std::io::Result<AlignedBuf> {
        // SAFETY: a non-zero-sized layout; checked for null.
        let ptr = unsafe { std::alloc::alloc(Self::layout()) };
        if ptr.is_null() {
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
        Ok(AlignedBuf { ptr, len: 0 })
    }

    fn filled(&self) -> &[u8] {
        // SAFETY: `len` bytes were written through `push`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Copies as much of `data` as fits; how much that was.
    fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(DIRECT_BUF - self.len);
        // SAFETY: n bytes fit after `len` in the DIRECT_BUF-sized allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(self.len), n) };
        self.len += n;
        n
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with the same layout.
        unsafe { std::alloc::dealloc(self.ptr, Self::layout()) };
    }
}

/// The file end of a DirectWriter, on its own thread.
struct DirectFile {
    file: fs::File,
    direct: bool,
    /// Where the next write goes: writes are positioned, so a write retried
    /// without O_DIRECT starts where the refused one did.
    pos: u64,
}

impl DirectFile {
    fn set_direct(&mut self, on: bool) -> std::io::Result<()> {
        use std::os::unix::io::AsRawFd;
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on a valid descriptor.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            let new = if on {
                flags | libc::O_DIRECT
            } else {
                flags & !libc::O_DIRECT
            };
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, new) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        self.direct = on;
        Ok(())
    }

    /// Writes `data`: its aligned part with O_DIRECT (through the page cache
    /// if the file system refuses it), and, if `last`, the unaligned tail
    /// through the page cache.
    fn write(&mut self, data: &[u8], last: bool) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let aligned = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        let (body, tail) = data.split_at(aligned);
        if !body.is_empty() {
            if let Err(e) = self.file.write_all_at(body, self.pos) {
                if e.raw_os_error() != Some(libc::EINVAL) || !self.direct {
                    return Err(e);
                }
                self.set_direct(false)?;
                self.file.write_all_at(body, self.pos)?;
            }
            self.pos += body.len() as u64;
        }
        if !tail.is_empty() && !last {
            return Err(std::io::Error::other("an unaligned buffer before the last"));
        }
        if last && self.direct {
            self.set_direct(false)?;
        }
        self.file.write_all_at(tail, self.pos)?;
        self.pos += tail.len() as u64;
        Ok(())
    }
}

enum DirectJob {
    Write(AlignedBuf),
    Last(AlignedBuf),
}

/// Writes a large restored file with O_DIRECT where the file system allows
/// it: measured, copying 1.7 GB into the page cache was half of restore's
/// CPU time, and on this VM's disk O_DIRECT wrote 640 MiB in 0.46 s against
/// 2.1 s through the page cache and fsync. The writes happen on a thread of
/// their own, so that the decoder and the hash never wait for the disk
/// (they did: each write blocks until the device has the data). Full
/// aligned blocks go straight to the device; the unaligned tail is written
/// through the page cache.
struct DirectWriter {
    cur: AlignedBuf,
    spare: Option<AlignedBuf>,
    jobs: Option<std::sync::mpsc::SyncSender<DirectJob>>,
    back: std::sync::mpsc::Receiver<AlignedBuf>,
    worker: Option<std::thread::JoinHandle<std::io::Result<fs::File>>>,
}

impl DirectWriter {
    fn new(file: fs::File) -> std::io::Result<DirectWriter> {
        let (cur, spare) = (AlignedBuf::new()?, AlignedBuf::new()?);
        let (jobs, rx) = std::sync::mpsc::sync_channel::<DirectJob>(1);
        let (back_tx, back) = std::sync::mpsc::sync_channel::<AlignedBuf>(2);
        let worker = std::thread::Builder::new().spawn(move || {
            let mut f = DirectFile {
                file,
                direct: false,
                pos: 0,
            };
            // On failure we keep writing through the page cache.
            let _ = f.set_direct(true);
            for job in rx {
                match job {
                    DirectJob::Write(mut buf) => {
                        f.write(buf.filled(), false)?;
                        buf.len = 0;
                        let _ = back_tx.send(buf);
                    }
                    DirectJob::Last(buf) => {
                        f.write(buf.filled(), true)?;
                        return Ok(f.file);
                    }
                }
            }
            Err(std::io::Error::other(
                "the writer was dropped before its end",
            ))
        })?;
        Ok(DirectWriter {
            cur,
            spare: Some(spare),
            jobs: Some(jobs),
            back,
            worker: Some(worker),
        })
    }

    /// The writer thread's error, once it stopped.
    fn worker_error(&mut self) -> std::io::Error {
        self.jobs.take();
        match self.worker.take().map(|w| w.join()) {
            Some(Ok(Err(e))) => e,
            _ => std::io::Error::other("the writer thread stopped"),
        }
    }

    fn send(&mut self, job: DirectJob) -> std::io::Result<()> {
        let sent = self.jobs.as_ref().map(|j| j.send(job).is_ok());
        if sent != Some(true) {
            return Err(self.worker_error());
        }
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<fs::File> {
        let last = std::mem::replace(&mut self.cur, AlignedBuf::new()?);
        self.send(DirectJob::Last(last))?;
        self.jobs.take();
        match self.worker.take().map(|w| w.join()) {
            Some(Ok(r)) => r,
            _ => Err(std::io::Error::other("the writer thread panicked")),
        }
    }
}

impl Write for DirectWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.cur.push(data);
        if self.cur.len == DIRECT_BUF {
            let next = match self.spare.take() {
                Some(b) => b,
                None => match self.back.recv() {
                    Ok(b) => b,
                    Err(_) => return Err(self.worker_error()),
                },
            };
            let full = std::mem::replace(&mut self.cur, next);
            self.send(DirectJob::Write(full))?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Makes restored files durable: each is closed as soon as it is written,
/// and `finish` calls syncfs(2) once for each file system the restore
/// wrote to (the target and the tablespaces). One journal commit instead
/// of one fsync per file: with tens of thousands of small files (bundles)
/// the per-file fsyncs were most of a restore's wall time (issue 17).
/// Files submitted after `finish` (pg_control, written last) are fsynced
/// one by one, and so is every file on kernels whose syncfs does not
/// report writeback errors (before Linux 5.8).
struct Syncer {
    finished: bool,
    /// Linux before 5.8: syncfs(2) does not report writeback errors (as
    /// PostgreSQL's documentation of `recovery_init_sync_method` says), so
    /// every file is fsynced as it is written instead.
    per_file: bool,
}

/// Whether this kernel's syncfs(2) reports writeback errors (Linux 5.8+).
fn syncfs_reports_errors() -> bool {
    // SAFETY: uname fills the zeroed struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return false;
    }
    // SAFETY: release is NUL-terminated by uname.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (5, 8)
}

impl Syncer {
    fn start() -> Syncer {
        Syncer {
            finished: false,
            per_file: !syncfs_reports_errors(),
        }
    }

    fn submit(&self, file: fs::File, path: &Path) -> Result<()> {
        if self.finished || self.per_file {
            return file
                .sync_all()
                .map_err(|e| Error::io(format!("fsync {}", path.display()), e));
        }
        drop(file);
        Ok(())
    }

    fn finish(&mut self, roots: &Roots) -> Result<()> {
        for d in std::iter::once(&roots.target).chain(roots.tablespaces.values()) {
            d.sync_fs()
                .map_err(|e| Error::io(format!("syncfs {}", d.path().display()), e))?;
        }
        self.finished = true;
        Ok(())
    }
}

/// Writes `name` in `dir` durably: beside it first, then renamed over it.
fn write_file(dir: &DirFd, name: &str, body: &[u8]) -> Result<()> {
    write_file_with(dir, name, |f| f.write_all(body))
}

/// `write_file` of what `fill` writes.
fn write_file_with(
    dir: &DirFd,
    name: &str,
    fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = format!(".{name}.walshipper.tmp");
    let r = (|| {
        let mut f = dir.create_file(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        dir.rename(&tmp, name)
    })();
    r.map_err(|e| {
        let _ = dir.remove_file(&tmp);
        Error::io(format!("write {}", dir.display(name)), e)
    })
}

/// Restores one file; false if --delta found it already identical.
fn restore_file(
    sources: &[&Repository],
    f: &FileEntry,
    roots: &Roots,
    delta: bool,
    zero: bool,
    syncer: &Syncer,
) -> Result<bool> {
    let (root, inner) = roots.locate(&f.path);
    let dest = PathBuf::from(roots.display(&f.path));
    // Parents are opened one by one without following links (and created
    // if the manifest did not list them).
    let (dir, name) = root
        .parent_of(inner, Some(0o700))
        .map_err(|e| Error::io(format!("open the directory of {}", dest.display()), e))?;
    if zero {
        return write_zero_file(f, &dir, name, &dest, delta, syncer);
    }
    if f.offset.is_some() {
        return restore_bundle(sources, &f.object, &[f], roots, delta, syncer)
            .map(|kept| kept == 0);
    }
    if delta {
        if let Ok(Some(file)) = dir.open_file(name) {
            if file.metadata().is_ok_and(|m| m.len() == f.size)
                && hash_of(f.hash_alg(), file).is_ok_and(|h| f.hash_is(&h))
            {
                return Ok(false);
            }
        }
    }
    // Into an empty directory a file is written under its name directly: a
    // failed restore is cleaned up whole and pg_control comes last. With
    // --delta an existing good file must survive a failed rewrite, so write
    // beside it and rename.
    let tmp = if delta {
        format!(".{name}.walshipper.tmp")
    } else {
        name.to_string()
    };
    // Each repository that holds the backup is tried in turn; the file is
    // rewritten from the start by the next one.
    let mut result = Err(Error::NotFound(f.object.to_string()));
    for (i, repo) in sources.iter().enumerate() {
        result = restore_file_from(repo, f, &dir, &tmp, name, &dest, delta, syncer);
        match &result {
            Err(e @ (Error::Corrupt { .. } | Error::Storage { .. } | Error::NotFound(_)))
                if i + 1 < sources.len() =>
            {
                tracing::warn!(
                    "{}: {e}; reading it from repository {} instead",
                    f.path,
                    sources[i + 1].name
                );
            }
            _ => break,
        }
    }
    if result.is_err() {
        let _ = dir.remove_file(&tmp);
    }
    result.map(|()| true)
}

/// A work item of a restore: one file, or files of one bundle (read
/// once, front to back, up to the last of them).
enum RestoreWork {
    File(FileEntry),
    Bundle(Vec<FileEntry>),
}

/// Files at least this large are restored first, biggest first (so that
/// one large file does not finish alone at the end); they are held in
/// memory for that, which their size bounds (one entry per MiB at most).
const LARGE_FIRST: u64 = 1 << 20;
/// Bundled files waiting for the rest of their bundle: at most this many
/// in all. A backup's bundles each hold files of one stretch of paths, so
/// in list order only a few are open at a time (about one per backup of
/// the chain); past the bound, the group extended least recently is
/// restored as it is and its bundle read again for the files that follow.
const BUNDLE_WINDOW: usize = 32 << 10;
/// A bundle's group not extended for this many entries of the list is
/// taken as complete and restored.
const BUNDLE_STALE: u64 = 8 << 10;

/// Plans the restore of `list` as it is read, handing each work item to
/// `send` (false: stop). Every file but pg_control, which is returned (it
/// is restored last, alone): first the large ones, biggest first, then the
/// others in list order, the bundled ones grouped by bundle. Files left
/// out by --db-include are written as zeros and read nothing: never in a
/// bundle item. Memory: the large files' entries, and at most
/// `BUNDLE_WINDOW` bundled entries waiting for their group.
fn plan_restore(
    list: &FileList,
    zeroed: &dyn Fn(&FileEntry) -> bool,
    send: &mut dyn FnMut(RestoreWork) -> bool,
) -> Result<Vec<FileEntry>> {
    let is_control = |f: &FileEntry| f.path == "global/pg_control";
    let bundled = |f: &FileEntry| f.offset.is_some() && !zeroed(f);
    let large = |f: &FileEntry| !bundled(f) && f.size >= LARGE_FIRST;
    let mut control = Vec::new();
    let mut first: Vec<FileEntry> = Vec::new();
    for f in list.iter() {
        let f = f?;
        if is_control(&f) {
            control.push(f);
        } else if large(&f) {
            first.push(f);
        }
    }
    first.sort_by_key(|f| std::cmp::Reverse(f.size));
    for f in first {
        if !send(RestoreWork::File(f)) {
            return Ok(control);
        }
    }
    // Open groups: bundle key → (its files so far, when last extended).
    let mut groups: HashMap<Arc<str>, (Vec<FileEntry>, u64)> = HashMap::new();
    let mut waiting = 0usize;
    for (n, f) in list.iter().enumerate() {
        let f = f?;
        let n = n as u64;
        if is_control(&f) || large(&f) {
            continue;
        }
        if !bundled(&f) {
            if !send(RestoreWork::File(f)) {
                return Ok(control);
            }
            continue;
        }
        let g = groups.entry(f.object.clone()).or_default();
        g.0.push(f);
        g.1 = n;
        waiting += 1;
        // Complete groups out, and the oldest while over the bound.
        let mut out: Vec<Arc<str>> = Vec::new();
        if n.is_multiple_of(1024) {
            out.extend(
                groups
                    .iter()
                    .filter(|(_, g)| n - g.1 > BUNDLE_STALE)
                    .map(|(k, _)| k.clone()),
            );
        }
        if waiting > BUNDLE_WINDOW && out.is_empty() {
            if let Some((k, _)) = groups.iter().min_by_key(|(_, g)| g.1) {
                out.push(k.clone());
            }
        }
        for k in out {
            if let Some((files, _)) = groups.remove(&k) {
                waiting -= files.len();
                if !send(RestoreWork::Bundle(files)) {
                    return Ok(control);
                }
            }
        }
    }
    let mut rest: Vec<(Vec<FileEntry>, u64)> = groups.into_values().collect();
    rest.sort_by_key(|g| g.1);
    for (files, _) in rest {
        if !send(RestoreWork::Bundle(files)) {
            break;
        }
    }
    Ok(control)
}

/// The database directories of the files --db-include left out (written
/// as zeros), for pg_verifybackup's --ignore.
fn zeroed_dirs(list: &FileList, sel: Option<&DbSelection>) -> Result<BTreeSet<String>> {
    let mut dirs = BTreeSet::new();
    let Some(sel) = sel else {
        return Ok(dirs);
    };
    for f in list.iter() {
        let f = f?;
        if sel.zeroed(&f.path) {
            if let Some((_, d)) = database_dir(&f.path) {
                dirs.insert(d.to_string());
            }
        }
    }
    Ok(dirs)
}

/// Restores the files of bundle `key` (`crate::bundle`): with --delta the
/// ones already identical are kept (and if that is all, the bundle is not
/// read); the others are cut from one sequential read of the bundle, each
/// checked against its size and hash before it is written. Each
/// repository that holds the backup is tried in turn. Returns the number
/// of files kept.
fn restore_bundle(
    sources: &[&Repository],
    key: &str,
    files: &[&FileEntry],
    roots: &Roots,
    delta: bool,
    syncer: &Syncer,
) -> Result<usize> {
    let mut need: Vec<&FileEntry> = Vec::with_capacity(files.len());
    for f in files {
        if !(delta && is_identical(roots, f)) {
            need.push(f);
        }
    }
    let kept = files.len() - need.len();
    if need.is_empty() {
        return Ok(kept);
    }
    let mut result = Err(Error::NotFound(key.to_string()));
    for (i, repo) in sources.iter().enumerate() {
        result = crate::bundle::unpack(repo, key, &need, &mut None, &mut |f, body| {
            write_bundled_file(f, body, roots, delta, syncer)
        });
        match &result {
            Err(e @ (Error::Corrupt { .. } | Error::Storage { .. } | Error::NotFound(_)))
                if i + 1 < sources.len() =>
            {
                tracing::warn!(
                    "bundle {key}: {e}; reading it from repository {} instead",
                    sources[i + 1].name
                );
            }
            _ => break,
        }
    }
    result.map(|()| kept)
}

/// --delta: the file is in the target already, same size and hash.
fn is_identical(roots: &Roots, f: &FileEntry) -> bool {
    let (root, inner) = roots.locate(&f.path);
    let Ok((dir, name)) = root.parent_of(inner, None) else {
        return false;
    };
    match dir.open_file(name) {
        Ok(Some(file)) => {
            file.metadata().is_ok_and(|m| m.len() == f.size)
                && hash_of(f.hash_alg(), file).is_ok_and(|h| f.hash_is(&h))
        }
        _ => false,
    }
}

/// Writes a bundled file whose bytes were checked (`bundle::unpack`), as
/// `restore_file_from` writes a file: under its name into an empty
/// directory (fsynced by the Syncer), beside it and renamed with --delta.
fn write_bundled_file(
    f: &FileEntry,
    body: &[u8],
    roots: &Roots,
    delta: bool,
    syncer: &Syncer,
) -> Result<()> {
    let (root, inner) = roots.locate(&f.path);
    let dest = PathBuf::from(roots.display(&f.path));
    let (dir, name) = root
        .parent_of(inner, Some(0o700))
        .map_err(|e| Error::io(format!("open the directory of {}", dest.display()), e))?;
    write_small_file(f, &dir, name, &dest, delta, syncer, |file| {
        file.write_all(body)
    })
}

/// Writes a restored file whose content `fill` writes at once (a bundled
/// file, a zero file): under its name directly into an empty target, or
/// with --delta beside it and renamed over it once durable, so that an
/// existing good file survives a failed rewrite.
fn write_small_file(
    f: &FileEntry,
    dir: &DirFd,
    name: &str,
    dest: &Path,
    delta: bool,
    syncer: &Syncer,
    fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = if delta {
        format!(".{name}.walshipper.tmp")
    } else {
        name.to_string()
    };
    let io = |e| Error::io(format!("write {}", dest.display()), e);
    let r = (|| {
        let mut file = dir.create_file(&tmp).map_err(io)?;
        fill(&mut file).map_err(io)?;
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(f.mtime.max(0) as u64);
        let _ = file.set_modified(mtime);
        if delta {
            file.sync_all().map_err(io)?;
            dir.rename(&tmp, name).map_err(io)
        } else {
            syncer.submit(file, dest)
        }
    })();
    if r.is_err() && delta {
        let _ = dir.remove_file(&tmp);
    }
    r
}

/// A file of a database left out (`--db-include`): the manifest's size,
/// all zeros, sparse (no block allocated), nothing read from the
/// repository. WAL replay can still write into it; PostgreSQL reads zero
/// pages as new ones. False if --delta found such a file already.
fn write_zero_file(
    f: &FileEntry,
    dir: &DirFd,
    name: &str,
    dest: &Path,
    delta: bool,
    syncer: &Syncer,
) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    if delta {
        if let Ok(Some(file)) = dir.open_file(name) {
            if file
                .metadata()
                .is_ok_and(|m| m.len() == f.size && m.blocks() == 0)
            {
                return Ok(false);
            }
        }
    }
    write_small_file(f, dir, name, dest, delta, syncer, |file| {
        file.set_len(f.size)
    })?;
    Ok(true)
}

/// The most objects a rebuild reads side by side (each an open stream with
/// its buffers; on S3 a connection). A longer chain (hourly incrementals
/// for a week put 168 deltas on a busy relation) is merged in stages
/// through unlinked scratch files in `scratch_dir`.
const MERGE_STREAMS: usize = 32;

/// An unlinked file in `dir` to hold an intermediate version of a file.
fn scratch_file(dir: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = fs::OpenOptions::new();
    o.read(true).write(true).mode(0o600);
    if let Ok(f) = o.clone().custom_flags(libc::O_TMPFILE).open(dir) {
        return Ok(f);
    }
    // File systems without O_TMPFILE: a private name, removed at once.
    let path = dir.join(format!(
        ".walshipper-merge-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = o.create_new(true).open(&path)?;
    fs::remove_file(&path)?;
    Ok(f)
}

/// Rebuilds `f` (which has deltas) into `out` in one sequential pass, its
/// base and deltas read as streams side by side ([`delta::merge`]; at most
/// `MERGE_STREAMS` at once, longer chains in stages), and returns the
/// hash of what was written (with the algorithm of the entry), for the
/// caller to compare with the manifest's: that check covers the base and
/// every delta, so neither is hashed on its own.
pub(crate) fn rebuild_file<W: Write>(
    repo: &Repository,
    f: &FileEntry,
    out: &mut W,
    dest: &Path,
    scratch_dir: &Path,
) -> Result<PlainHash> {
    let damaged = |key: &String, e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::InvalidData && crate::codec::codec_error(&e).is_none() {
            // The delta's own format (codec errors are classified below).
            Error::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            }
        } else {
            repo.read_error(key, e)
        }
    };
    let scratch_io = |e| Error::io(format!("a scratch file in {}", scratch_dir.display()), e);
    // A large base is decoded by the pool, as a whole file is: the chain's
    // largest file is usually the last one restoring, so on this thread
    // alone the chain took longer than the full alone (bench pairs, one
    // run each on a loaded machine, 2026-11-27: chain / full alone 1.19
    // with one thread, 0.86 with the pool; CPU 0.95 against 0.86 s). An
    // earlier A/B (2026-11-26, before the pairs alternated) had found no
    // gain: 0.76 -> 0.79 s wall.
    let threads = if f.size > 64 << 20 { repo.threads() } else { 1 };
    let mut base: Box<dyn Read + Send> = Box::new(repo.open_unhashed(&f.object, threads)?);
    let stages: Vec<&[String]> = f.deltas.chunks(MERGE_STREAMS - 1).collect();
    for (stage, keys) in stages.iter().enumerate() {
        let mut deltas = Vec::with_capacity(keys.len());
        for key in keys.iter() {
            deltas.push(repo.open_unhashed(key, 1)?);
        }
        let last = stage + 1 == stages.len();
        let map = |e| match e {
            delta::MergeError::Base(e) if stage == 0 => repo.read_error(&f.object, e),
            delta::MergeError::Base(e) => scratch_io(e),
            delta::MergeError::Delta(n, e) => damaged(
                &keys.get(n).cloned().unwrap_or_else(|| f.object.to_string()),
                e,
            ),
            delta::MergeError::Output(e) if last => {
                Error::io(format!("write {}", dest.display()), e)
            }
            delta::MergeError::Output(e) => scratch_io(e),
        };
        if last {
            return delta::merge(base, deltas, out, f.size, f.hash_alg()).map_err(map);
        }
        let mut next = std::io::BufWriter::with_capacity(
            1 << 20,
            scratch_file(scratch_dir).map_err(scratch_io)?,
        );
        // An intermediate stage is checked by the last stage's hash.
        delta::merge(base, deltas, &mut next, delta::MAX_FILE_SIZE, f.hash_alg()).map_err(map)?;
        let mut file = next.into_inner().map_err(|e| scratch_io(e.into_error()))?;
        std::io::Seek::rewind(&mut file).map_err(scratch_io)?;
        base = Box::new(std::io::BufReader::with_capacity(1 << 20, file));
    }
    Err(Error::Invalid(format!("{}: no delta to merge", f.path)))
}

#[allow(clippy::too_many_arguments)]
fn restore_file_from(
    repo: &Repository,
    f: &FileEntry,
    dir: &DirFd,
    tmp: &str,
    name: &str,
    dest: &Path,
    delta: bool,
    syncer: &Syncer,
) -> Result<()> {
    let tmp_path = PathBuf::from(dir.display(tmp));
    // Long delta chains are merged in stages through scratch files here.
    let scratch_dir = tmp_path.parent().unwrap_or(Path::new("."));
    let file = dir
        .create_file(tmp)
        .map_err(|e| Error::io(format!("create {}", tmp_path.display()), e))?;
    let threads = if f.size > 64 << 20 { repo.threads() } else { 1 };
    let (sha, file) = if !f.deltas.is_empty() {
        let write = |e| Error::io(format!("write {}", tmp_path.display()), e);
        if f.size >= DIRECT_MIN {
            let mut w = DirectWriter::new(file).map_err(write)?;
            let sha = rebuild_file(repo, f, &mut w, &tmp_path, scratch_dir)?;
            (sha, w.finish().map_err(write)?)
        } else {
            let mut w = BufWriter::with_capacity(1 << 20, file);
            let sha = rebuild_file(repo, f, &mut w, &tmp_path, scratch_dir)?;
            (sha, w.into_inner().map_err(|e| write(e.into_error()))?)
        }
    } else if f.size >= DIRECT_MIN {
        let mut w = DirectWriter::new(file)
            .map_err(|e| Error::io(format!("write {}", tmp_path.display()), e))?;
        let sha = repo.read_object_with(&f.object, &mut w, threads)?;
        let file = w
            .finish()
            .map_err(|e| Error::io(format!("write {}", tmp_path.display()), e))?;
        (sha, file)
    } else {
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let sha = repo.read_object_with(&f.object, &mut w, threads)?;
        let file = w
            .into_inner()
            .map_err(|e| Error::io(format!("write {}", tmp_path.display()), e.into_error()))?;
        (sha, file)
    };
    // A whole object's hash is of its own version's algorithm: one of the
    // other algorithm than the entry's is a mismatch too (never written so).
    if !f.hash_is(&sha) {
        return Err(Error::Corrupt {
            key: f
                .deltas
                .last()
                .map_or(&*f.object, String::as_str)
                .to_string(),
            reason: format!(
                "its {sha} is not the manifest's {} for {}",
                f.hash_text(),
                f.path
            ),
        });
    }
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(f.mtime.max(0) as u64);
    let _ = file.set_modified(mtime);
    if delta {
        // Replacing a file: durable under its temporary name first.
        file.sync_all()
            .map_err(|e| Error::io(format!("fsync {}", tmp_path.display()), e))?;
        dir.rename(tmp, name)
            .map_err(|e| Error::io(format!("rename to {}", dest.display()), e))?;
    } else {
        syncer.submit(file, dest)?;
    }
    Ok(())
}

/// --delta: files in the target that the backup does not have are removed
/// (they would otherwise survive into the recovered cluster). Links are
/// neither followed nor removed; the walk stays below the target and the
/// tablespace directories.
///
/// The backup's list (in path order) is merged with a walk of the
/// directories in the same order: memory holds the names of the
/// directories being walked, not the backup's paths. A list out of order
/// (an older writer's) is held in a set instead.
fn remove_unknown_files(list: &FileList, roots: &Roots) -> Result<()> {
    /// Which paths the backup has: asked in increasing order (a merge) or
    /// in any order (a set).
    enum Keep<'a> {
        Merge(PathCursor<'a>),
        Set(std::collections::HashSet<String>),
    }
    impl Keep<'_> {
        fn contains(&mut self, path: &str) -> Result<bool> {
            match self {
                Keep::Merge(c) => Ok(c.find(path)?.is_some()),
                Keep::Set(s) => Ok(s.contains(path)),
            }
        }
    }
    let keep = || -> Result<Keep> {
        if list.is_sorted() {
            return Ok(Keep::Merge(PathCursor::new(list)?));
        }
        let mut paths = std::collections::HashSet::new();
        for f in list.iter() {
            paths.insert(f?.path);
        }
        Ok(Keep::Set(paths))
    };
    fn walk(dir: &DirFd, rel: &str, keep: &mut Keep, top: bool) -> Result<()> {
        let io = |e| Error::io(format!("clean {}", dir.path().display()), e);
        let mut entries = dir.entries().map_err(io)?;
        // Byte order of the paths below: a directory sorts as its name
        // and a '/' ("a-b" < "a/x"), as the backup's list is sorted.
        let key = |(n, k): &(std::ffi::OsString, EntryKind)| {
            let mut b = n.as_encoded_bytes().to_vec();
            if *k == EntryKind::Dir {
                b.push(b'/');
            }
            b
        };
        entries.sort_by_cached_key(key);
        for (name, kind) in entries {
            let Some(name) = name.to_str() else {
                tracing::warn!(
                    "--delta: leaving a non-UTF-8 name in {}",
                    dir.path().display()
                );
                continue;
            };
            let child = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            match kind {
                EntryKind::Symlink => {}
                EntryKind::Dir => {
                    if top && name == "pg_wal" {
                        continue;
                    }
                    walk(&dir.open_dir(name).map_err(io)?, &child, keep, false)?;
                }
                _ => {
                    if !keep.contains(&child)? {
                        dir.remove_file(name).map_err(io)?;
                    }
                }
            }
        }
        Ok(())
    }
    walk(&roots.target, "", &mut keep()?, true)?;
    // Each tablespace with a merge of its own (its paths, under
    // pg_tblspc/<oid>/, were passed over by the walk of the target).
    for (oid, root) in &roots.tablespaces {
        walk(root, &format!("pg_tblspc/{oid}"), &mut keep()?, false)?;
    }
    Ok(())
}

/// Quotes a value for postgresql.conf as PostgreSQL's parser reads it
/// (guc-file.l, DeescapeQuotedString): inside single quotes, `'` is
/// doubled and `\` escaped. Control characters are refused: a newline
/// would end the setting (and start another one), and there is no safe
/// escape for them that every PostgreSQL version reads back the same.
pub fn conf_quote(what: &str, s: &str) -> Result<String> {
    if s.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "{what} {s:?} contains control characters, which PostgreSQL's configuration cannot hold safely"
        )));
    }
    Ok(format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''")))
}

/// Quotes one word for the shell that runs restore_command, and doubles
/// `%` (PostgreSQL substitutes %f, %p, %r, %% in it).
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,=@".contains(&b));
    let w = if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    };
    w.replace('%', "%%")
}

/// The recovery settings restore writes (restore_command and the target).
fn recovery_lines(cmd: &str, target: &Target, action: &str) -> Result<Vec<String>> {
    let mut lines = vec![format!(
        "restore_command = {}",
        conf_quote("restore_command", cmd)?
    )];
    match target {
        Target::End => {}
        Target::Immediate => lines.push("recovery_target = 'immediate'".into()),
        Target::Time { raw, .. } => lines.push(format!(
            "recovery_target_time = {}",
            conf_quote("--target-time", raw)?
        )),
        Target::Lsn(l) => lines.push(format!("recovery_target_lsn = '{}'", wal::format_lsn(*l))),
        Target::Xid(x) => lines.push(format!(
            "recovery_target_xid = {}",
            conf_quote("--target-xid", x)?
        )),
        Target::Name(n) => lines.push(format!(
            "recovery_target_name = {}",
            conf_quote("--target-name", n)?
        )),
    }
    if *target != Target::End {
        lines.push(format!(
            "recovery_target_action = {}",
            conf_quote("--target-action", action)?
        ));
    }
    Ok(lines)
}

/// The recovery settings in postgresql.auto.conf, replacing those of an
/// earlier restore. With databases `excluded` (--db-include) also
/// `ignore_invalid_pages = on`: their files are zeroes, and a WAL record
/// without a full-page image that touches such a page (a heap VISIBLE
/// record, on a cluster without data checksums or wal_log_hints) is an
/// invalid page, on which PostgreSQL PANICs once recovery is consistent.
/// It stays in postgresql.auto.conf (as any file setting it also applies
/// to a scratch server): the DBA resets it after dropping those databases.
fn write_recovery_settings(
    cfg: &Config,
    dir: &DirFd,
    repo: Option<&str>,
    target: &Target,
    action: &str,
    excluded: bool,
) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("locate the walshipper binary", e))?;
    let mut cmd = shell_word(&exe.display().to_string());
    match &cfg.source {
        Some(p) => {
            let p = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            cmd.push_str(&format!(
                " --config {}",
                shell_word(&p.display().to_string())
            ))
        }
        None => tracing::warn!(
            "no config file: restore_command relies on walshipper's defaults and environment"
        ),
    }
    // Restored from a named repository: WAL comes from it too (archive-get
    // would otherwise stop recovery while the primary does not answer).
    if let Some(r) = repo {
        cmd.push_str(&format!(" --repo {}", shell_word(r)));
    }
    cmd.push_str(" archive-get %f \"%p\"");
    let mut lines = recovery_lines(&cmd, target, action)?;
    if excluded {
        lines.push("ignore_invalid_pages = on".into());
    }
    let name = "postgresql.auto.conf";
    let old = match dir.open_file(name) {
        Ok(None) => String::new(),
        Ok(Some(mut f)) => {
            let mut s = String::new();
            f.read_to_string(&mut s)
                .map_err(|e| Error::io(format!("read {}", dir.display(name)), e))?;
            s
        }
        Err(e) => return Err(Error::io(format!("read {}", dir.display(name)), e)),
    };
    let ours = [
        "restore_command",
        "recovery_target",
        "recovery_target_time",
        "recovery_target_lsn",
        "recovery_target_xid",
        "recovery_target_name",
        "recovery_target_action",
    ];
    let mut text: String = old
        .lines()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or("").trim();
            // A production setting of ignore_invalid_pages is kept unless
            // ours replaces it.
            let replaced = ours.contains(&key) || (excluded && key == "ignore_invalid_pages");
            !replaced && !l.starts_with("# walshipper restore")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&format!(
        "# walshipper restore, {}\n",
        chrono::Utc::now().to_rfc3339()
    ));
    for l in lines {
        text.push_str(&l);
        text.push('\n');
    }
    write_file(dir, name, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `plan_restore` hands out for `list`: (large files, bundle
    /// items, other files) and pg_control, checking on the way that every
    /// file comes exactly once.
    fn planned(
        entries: &[FileEntry],
        zeroed: &dyn Fn(&FileEntry) -> bool,
    ) -> (
        Vec<FileEntry>,
        Vec<Vec<FileEntry>>,
        Vec<FileEntry>,
        Vec<FileEntry>,
    ) {
        let list = FileList::spool(entries).unwrap();
        let (mut large, mut bundles, mut single) = (Vec::new(), Vec::new(), Vec::new());
        let control = plan_restore(&list, zeroed, &mut |w| {
            match w {
                RestoreWork::File(f) if f.size >= LARGE_FIRST && bundles.is_empty() => {
                    assert!(single.is_empty(), "a large file after the others");
                    large.push(f)
                }
                RestoreWork::File(f) => single.push(f),
                RestoreWork::Bundle(files) => bundles.push(files),
            }
            true
        })
        .unwrap();
        let mut seen = std::collections::HashSet::new();
        let all = large
            .iter()
            .chain(bundles.iter().flatten())
            .chain(&single)
            .chain(&control);
        for f in all {
            assert!(seen.insert(f.path.clone()), "{} twice", f.path);
        }
        assert_eq!(seen.len(), entries.len());
        (large, bundles, single, control)
    }

    fn file(i: usize, owner: &str, size: u64) -> FileEntry {
        let mut f = crate::manifest::tests::entry(&format!("base/5/{i:07}"), owner);
        f.size = size;
        f
    }

    fn in_bundle(i: usize, owner: &str, bundle: u64, offset: u64) -> FileEntry {
        FileEntry {
            object: layout::backup_bundle(owner, bundle).into(),
            offset: Some(offset),
            ..file(i, owner, 8192)
        }
    }

    /// An incremental's list of 120 000 files (more than the window holds):
    /// the full's bundles each hold a stretch of paths, the incremental's
    /// own bundles every 97th file; large files and pg_control among them.
    #[test]
    fn a_restore_is_planned_as_the_list_is_read() {
        const F: &str = "20261120-010000F";
        const I: &str = "20261121-224754I";
        let n = 120_000;
        let mut entries = Vec::new();
        let mut incr_members = 0u64;
        for i in 0..n {
            entries.push(match i {
                _ if i % 10_007 == 0 => file(i, F, LARGE_FIRST + i as u64),
                _ if i % 5003 == 0 => file(i, F, 100),
                _ if i % 97 == 0 => {
                    incr_members += 1;
                    in_bundle(i, I, 1 + incr_members / 300, incr_members % 300 * 8192)
                }
                _ => in_bundle(i, F, 1 + i as u64 / 500, (i as u64 % 500) * 8192),
            });
        }
        let mut control = file(n, F, 8192);
        control.path = "global/pg_control".into();
        control.object = layout::backup_data(F, "global/pg_control").into();
        entries.push(control);
        let (large, bundles, single, control) = planned(&entries, &|_| false);
        assert_eq!(control.len(), 1);
        assert_eq!(large.len(), n.div_ceil(10_007));
        assert!(large.windows(2).all(|w| w[0].size >= w[1].size));
        assert!(single.iter().all(|f| f.size == 100));
        for b in &bundles {
            assert!(b.iter().all(|f| f.object == b[0].object));
            assert!(b.windows(2).all(|w| w[0].path < w[1].path));
        }
        // Each bundle read once: the full's 240 and the incremental's 5.
        let distinct: std::collections::HashSet<&str> =
            bundles.iter().map(|b| &*b[0].object).collect();
        assert_eq!(distinct.len(), bundles.len());
        assert_eq!(bundles.len(), 240 + 5);
        // Files left out by --db-include are single items, not bundled.
        let (_, bundles, single, _) = planned(&entries, &|f| f.path.as_str() < "base/5/0001000");
        assert!(bundles
            .iter()
            .flatten()
            .all(|f| f.path.as_str() >= "base/5/0001000"));
        assert!(single.iter().any(|f| f.offset.is_some()));
    }

    /// More open bundles than the window holds (members spread over the
    /// whole list): groups are cut, every file still restored once.
    #[test]
    fn open_bundles_beyond_the_window_are_cut() {
        const F: &str = "20261120-010000F";
        let n = BUNDLE_WINDOW * 3;
        // 4 bundles, members in turn: more waiting than the window, cut
        // by the bound; 40 000, each extended too rarely: cut as stale.
        for open in [4, 40_000] {
            let entries: Vec<FileEntry> = (0..n)
                .map(|i| in_bundle(i, F, 1 + (i % open) as u64, (i / open) as u64 * 8192))
                .collect();
            let (_, bundles, single, _) = planned(&entries, &|_| false);
            assert!(single.is_empty());
            assert!(bundles.len() > open, "{open}: {}", bundles.len());
            assert!(bundles.iter().all(|b| b.len() <= BUNDLE_WINDOW + 1));
            assert_eq!(bundles.iter().map(Vec::len).sum::<usize>(), n);
        }
    }

    /// A chain longer than `MERGE_STREAMS` (merged in stages through scratch
    /// files) and a short one give the bytes of applying every delta in turn.
    #[test]
    fn long_delta_chains_are_merged_in_stages() {
        let dir = tempfile::tempdir().unwrap();
        let (_cfg, repo) = crate::repo::test_support::posix_repo(dir.path(), 7);
        let block = delta::BLOCK;
        let mut file: Vec<u8> = (0..8 * block).map(|i| (i % 251) as u8).collect();
        let base_key = crate::layout::backup_data("20261126-000000F", "base/5/1");
        repo.put_object(&base_key, &file[..]).unwrap();
        let mut keys = Vec::new();
        for n in 0..(MERGE_STREAMS * 2 + 3) {
            // Each delta rewrites one block and grows the file by one.
            let blk = (n * 5) % (file.len() / block);
            let fill = vec![n as u8; block];
            file[blk * block..(blk + 1) * block].copy_from_slice(&fill);
            let new_blk = file.len() / block;
            file.extend_from_slice(&fill);
            let mut d = b"WSDELTA1".to_vec();
            for b in [blk, new_blk] {
                d.extend_from_slice(&(b as u32).to_le_bytes());
                d.extend_from_slice(&(block as u32).to_le_bytes());
                d.extend_from_slice(&fill);
            }
            d.extend_from_slice(&u32::MAX.to_le_bytes());
            d.extend_from_slice(&0u32.to_le_bytes());
            d.extend_from_slice(&(file.len() as u64).to_le_bytes());
            let key = crate::layout::backup_data(&format!("20261126-0001{n:02}I"), "base/5/1");
            repo.put_object(&key, &d[..]).unwrap();
            keys.push(key);
        }
        for count in [3, keys.len()] {
            let entry = |deltas: &[String], size: usize| FileEntry {
                path: "base/5/1".into(),
                size: size as u64,
                mtime: 0,
                mode: 0o600,
                hash: Default::default(),
                object: base_key.as_str().into(),
                deltas: deltas.into(),
                maps: Box::default(),
                offset: None,
                stored_size: 0,
            };
            let size = 8 * block + count * block;
            let mut out = Vec::new();
            let sha = rebuild_file(
                &repo,
                &entry(&keys[..count], size),
                &mut out,
                Path::new("out"),
                dir.path(),
            )
            .unwrap();
            assert_eq!(out.len(), size, "{count} deltas");
            assert_eq!(sha, HashAlg::Blake3.digest(&out));
            // The whole chain gives the file as it was built above.
            if count == keys.len() {
                assert!(out == file, "{count} deltas");
            }
        }
    }

    #[test]
    fn direct_writer_writes_exactly_what_it_is_given() {
        // /var/tmp: a disk file system where O_DIRECT applies (tmpfs falls back).
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        for size in [
            0usize,
            1,
            4095,
            4096,
            4097,
            DIRECT_BUF,
            DIRECT_BUF + 1,
            2 * DIRECT_BUF,
            3 * DIRECT_BUF + 4096,
            9 * 1024 * 1024 + 123,
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let path = dir.path().join(format!("f{size}"));
            let file = fs::File::create(&path).unwrap();
            let mut w = DirectWriter::new(file).unwrap();
            // Odd-sized writes, as the decoder produces them.
            for chunk in data.chunks(333_333) {
                w.write_all(chunk).unwrap();
            }
            let file = w.finish().unwrap();
            file.sync_all().unwrap();
            assert_eq!(fs::read(&path).unwrap(), data, "size {size}");
        }
    }

    /// PostgreSQL's reading of a quoted value (guc-file.l: the STRING
    /// token `'([^'\\\n]|\\.|'')*'`, then DeescapeQuotedString): the
    /// value, and what follows the closing quote on the line.
    fn pg_parse(quoted: &str) -> (String, String) {
        let b: Vec<char> = quoted.chars().collect();
        assert_eq!(b[0], '\'');
        let mut out = String::new();
        let mut i = 1;
        loop {
            match b[i] {
                '\\' => {
                    match b[i + 1] {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        c => out.push(c),
                    }
                    i += 2;
                }
                '\'' if b.get(i + 1) == Some(&'\'') => {
                    out.push('\'');
                    i += 2;
                }
                '\'' => return (out, b[i + 1..].iter().collect()),
                '\n' => panic!("newline inside a value"),
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
    }

    #[test]
    fn settings_are_quoted_as_postgresql_reads_them() {
        for v in [
            "plain",
            "it's",
            "a\\b",
            "x\\'",
            "\\",
            "'",
            "''\\''",
            "/usr/bin/walshipper --config '/etc/a b.toml' archive-get %f \"%p\"",
        ] {
            let q = conf_quote("test", v).unwrap();
            assert_eq!(pg_parse(&q), (v.to_string(), String::new()), "{v:?} -> {q}");
        }
        // The attack: a name ending in \' and a newline used to become a
        // second setting that PostgreSQL reads.
        let attack = "x\\'\nshared_preload_libraries = '/tmp/evil.so' #";
        assert!(conf_quote("--target-name", attack).is_err());
        let e = check_target(&Target::Name(attack.into())).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::USAGE);
        assert!(e.to_string().contains("control characters"), "{e}");
        for bad in ["a\rb", "a\tb", "a\u{7f}b", "a\u{85}b"] {
            assert!(conf_quote("x", bad).is_err(), "{bad:?}");
            assert!(check_target(&Target::Name(bad.into())).is_err());
        }
        assert!(check_target(&Target::Name("".into())).is_err());
        assert!(check_target(&Target::Name("n".repeat(64))).is_err());
        check_target(&Target::Name("n".repeat(63))).unwrap();
        check_target(&Target::Name("before 'release' \\ v2".into())).unwrap();
        let lines = recovery_lines(
            "/bin/ws archive-get %f \"%p\"",
            &Target::Name("x\\' y".into()),
            "pause",
        )
        .unwrap();
        assert_eq!(lines[1], "recovery_target_name = 'x\\\\'' y'");
        assert_eq!(
            pg_parse(&lines[1]["recovery_target_name = ".len()..]).0,
            "x\\' y"
        );
    }

    #[test]
    fn restore_command_words_are_shell_quoted() {
        assert_eq!(shell_word("/usr/bin/walshipper"), "/usr/bin/walshipper");
        assert_eq!(shell_word("/a b/c's"), "'/a b/c'\\''s'");
        assert_eq!(shell_word("/x/$(id)%p"), "'/x/$(id)%%p'");
    }

    #[test]
    fn databases_are_selected_by_name_and_their_files_by_path() {
        assert_eq!(
            database_dir("base/16400/16384"),
            Some((16400, "base/16400"))
        );
        assert_eq!(
            database_dir("base/16400/16384_fsm"),
            Some((16400, "base/16400"))
        );
        assert_eq!(
            database_dir("pg_tblspc/16390/PG_15_202209061/16400/16391.1"),
            Some((16400, "pg_tblspc/16390/PG_15_202209061/16400"))
        );
        for p in [
            "base/16400",
            "base/x1/2",
            "base//2",
            "global/1262",
            "pg_tblspc/16390/PG_15_202209061/16400",
            "pg_tblspc/x/PG_15_202209061/16400/1",
            "base/99999999999/1",
        ] {
            assert_eq!(database_dir(p), None, "{p}");
        }
        let db = |oid, name: &str| DatabaseEntry {
            oid,
            name: name.into(),
        };
        let json = serde_json::json!({
            "manifest_version": 2, "id": "20261121-224754F", "type": "full", "based_on": null,
            "label": "x", "system_identifier": "1", "pg_version": 15, "timeline": 1,
            "start_lsn": "0/1", "stop_lsn": "0/2", "start_time": "", "stop_time": "",
            "wal_start": "", "wal_stop": "", "data_checksums": true, "checksum_failures": [],
            "size": 0, "stored_size": 0, "files": [], "dirs": [], "tablespaces": [],
            "backup_label_object": "", "tablespace_map_object": null,
        });
        let mut m: Manifest = serde_json::from_value(json).unwrap();
        let e = select_databases(&m, &["app".into()]).unwrap_err();
        assert!(e.to_string().contains("older walshipper"), "{e}");
        assert!(select_databases(&m, &[]).unwrap().is_none());
        m.databases = vec![
            db(1, "template1"),
            db(4, "template0"),
            db(5, "postgres"),
            db(16400, "app"),
            db(16401, "other"),
            db(16500, "third"),
        ];
        let e = select_databases(&m, &["nope".into()]).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::USAGE);
        assert!(
            e.to_string().contains(r#""app", "other", "postgres""#),
            "{e}"
        );
        let s = select_databases(&m, &["app".into()]).unwrap().unwrap();
        let names = |v: &[DatabaseEntry]| v.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&s.restored),
            ["template1", "template0", "postgres", "app"]
        );
        assert_eq!(names(&s.excluded), ["other", "third"]);
        assert!(!s.zeroed("base/16400/1234"));
        assert!(!s.zeroed("base/5/1234"));
        assert!(!s.zeroed("global/pg_control"));
        assert!(s.zeroed("base/16401/1234"));
        assert!(s.zeroed("pg_tblspc/16390/PG_15_202209061/16500/1"));
        // A database directory the list does not name (dropped during the
        // backup) is not read either.
        assert!(s.zeroed("base/17000/1"));
        assert!(check_db_include(&["d".repeat(64)]).is_err());
        assert!(check_db_include(&[String::new()]).is_err());
    }

    #[test]
    fn times_need_a_zone() {
        assert!(parse_time("2026-11-21 10:15:00+00").is_ok());
        assert!(parse_time("2026-11-21 10:15:00.123456+01:00").is_ok());
        assert!(parse_time("2026-11-21T10:15:00Z").is_ok());
        assert!(parse_time("2026-11-21 10:15:00").is_err());
        assert!(parse_time("yesterday").is_err());
    }

    /// --delta removes exactly the files the backup lacks, in the target
    /// and in a tablespace, whether the list is merged (in path order) or
    /// held in a set (out of order); pg_wal and links are left alone.
    #[test]
    fn delta_removes_exactly_the_files_the_backup_lacks() {
        let keep = [
            "a-b",
            "a/b",
            "base/5 x/y",
            "base/5/1",
            "base/5/1.1",
            "base/50",
            "pg_tblspc/16400/PG_15_1/5/300",
        ];
        for merged in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let p = d.path();
            let ts = tempfile::tempdir().unwrap();
            for dir in ["a", "base/5", "base/5 x", "pg_wal", "pg_tblspc"] {
                fs::create_dir_all(p.join(dir)).unwrap();
            }
            fs::create_dir_all(ts.path().join("PG_15_1/5")).unwrap();
            std::os::unix::fs::symlink(ts.path(), p.join("pg_tblspc/16400")).unwrap();
            let drop = ["a/c", "base/5-", "base/5/2", "zz"];
            for f in keep
                .iter()
                .chain(&drop)
                .chain(&["pg_wal/000000010000000000000001"])
            {
                let at = match f.strip_prefix("pg_tblspc/16400/") {
                    Some(inner) => ts.path().join(inner),
                    None => p.join(f),
                };
                fs::write(at, b"x").unwrap();
            }
            fs::write(ts.path().join("PG_15_1/5/301"), b"x").unwrap();
            let entries: Vec<FileEntry> = keep
                .iter()
                .rev()
                .map(|k| crate::manifest::tests::entry(k, crate::manifest::tests::ID))
                .collect();
            let mut list = FileList::spool(&entries).unwrap();
            if merged {
                list = list.in_path_order().unwrap();
            }
            assert_eq!(list.is_sorted(), merged);
            let roots = Roots {
                target: open_root(p).unwrap(),
                tablespaces: HashMap::from([(16400, open_root(ts.path()).unwrap())]),
            };
            remove_unknown_files(&list, &roots).unwrap();
            for k in keep {
                let at = match k.strip_prefix("pg_tblspc/16400/") {
                    Some(inner) => ts.path().join(inner),
                    None => p.join(k),
                };
                assert!(at.exists(), "{k} removed (merged: {merged})");
            }
            for k in drop {
                assert!(!p.join(k).exists(), "{k} left (merged: {merged})");
            }
            assert!(!ts.path().join("PG_15_1/5/301").exists());
            assert!(p.join("pg_wal/000000010000000000000001").exists());
            assert!(p.join("pg_tblspc/16400").exists());
        }
    }
}
