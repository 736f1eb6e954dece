//! `backup`: an online base backup of the running cluster.
//!
//! pg_backup_start → copy every file through the codec in parallel (checking
//! page checksums as PostgreSQL's own base backup does) → pg_backup_stop →
//! store backup_label and tablespace_map → wait until the WAL the backup needs
//! is in the repository → flush → write the manifest, last. Until the manifest
//! exists the backup does not exist; leftovers of an interrupted backup are
//! removed by the next one.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::codec::HashAlg;
use crate::config::Config;
use crate::delta;
use crate::error::{Error, Result};
use crate::file_list::{self, FileList, ListWriter, PathCursor, Spooled};
use crate::layout;
use crate::lock;
use crate::manifest::{
    BackupSummary, ChecksumFailure, DatabaseEntry, DirEntry, EntryCheck, FileEntry, Manifest,
    TablespaceEntry, MANIFEST_VERSION,
};
use crate::page::{self, BLCKSZ, RELSEG_BLOCKS};
use crate::pg::{connect, pg_err};
use crate::pgdata::{self, SourceFile};
use crate::progress::{Counters, Reporter};
use crate::repo::Repository;
use crate::storage::Durability;
use crate::wal;
use pg_backup_contract::{BackupDone, BackupStart, Event};

pub struct Args {
    pub kind: String,
    pub jobs: usize,
    pub label: Option<String>,
    pub json: bool,
    /// The repository to write to (default: the primary).
    pub repo: Option<String>,
}

/// Files above this size are encoded by several threads each.
const BIG_FILE: u64 = 64 << 20;

/// The backup a diff (the newest full) or incr (the newest of any type)
/// compares against; None for a full backup or when there is none.
fn reference_backup(backups: &[BackupSummary], kind: &str) -> Option<BackupSummary> {
    match kind {
        "diff" => backups.iter().rev().find(|m| m.kind == "full").cloned(),
        "incr" => backups.last().cloned(),
        _ => None,
    }
}

/// A first diff or incr (none of that type yet) is estimated at this share
/// of the full backup it builds on: an estimate, not a bound.
const FIRST_DELTA_SHARE: f64 = 0.25;

/// What a backup of `kind` is expected to store, and where that comes
/// from: the newest backup of that type in this repository; a first full,
/// the data directory's files as a base backup copies them (an upper
/// bound: compression only shrinks them); a first diff or incr, a share of
/// the newest full's. None: unknown (the data directory cannot be read).
fn estimate(cfg: &Config, backups: &[BackupSummary], kind: &str) -> (Option<u64>, String) {
    if let Some(m) = backups.iter().rev().find(|m| m.kind == kind) {
        return (
            Some(m.stored_size),
            format!("the stored size of the newest {kind} backup, {}", m.id),
        );
    }
    if kind != "full" {
        if let Some(f) = backups.iter().rev().find(|m| m.kind == "full") {
            return (
                Some((f.stored_size as f64 * FIRST_DELTA_SHARE) as u64),
                format!(
                    "a first {kind} backup, a quarter of the stored size of full backup {}",
                    f.id
                ),
            );
        }
    }
    let mut size = 0u64;
    match pgdata::scan_with(&cfg.pg.data_dir, &mut |f| {
        size = size.saturating_add(f.size);
        Ok(())
    }) {
        Ok(_) => (
            Some(size),
            "the first full backup, the size of the data directory (an upper bound: compression only shrinks it)".into(),
        ),
        Err(e) => {
            tracing::warn!("the size of this first full backup is unknown: {e}");
            (None, "unknown".into())
        }
    }
}

/// Refuses a backup that would leave repository `rc` with less than its
/// `min_free_space` (exit code 8, `no_space`). A repository whose free
/// space is unknown (s3 without a quota) is never refused, nor one with
/// `min_free_space = 0` (or "0%": both parse to no minimum).
fn check_free_space(
    cfg: &Config,
    rc: &crate::config::RepoConfig,
    repo: &Repository,
    backups: &[BackupSummary],
    kind: &str,
) -> Result<()> {
    use crate::commands::info::human;
    if rc.min_free() == crate::config::MinFree::Bytes(0) {
        return Ok(());
    }
    let space = repo.storage.space().unwrap_or_else(|e| {
        tracing::warn!("repository {}: its free space is unknown: {e}", rc.name);
        None
    });
    let cap = crate::storage::capacity(rc, space, || {
        crate::storage::stored_bytes(repo.storage.as_ref())
    })?;
    let Some(free) = cap.free else {
        return Ok(());
    };
    let (est, why) = estimate(cfg, backups, kind);
    let needed = est.unwrap_or(0).saturating_add(cap.min_free);
    tracing::debug!(
        "repository {}: {free} bytes free, this {kind} backup expected to store {est:?} ({why}), min_free_space {}",
        rc.name,
        cap.min_free
    );
    if free >= needed {
        return Ok(());
    }
    let expected = match est {
        Some(e) => format!("is expected to store about {} ({why})", human(e)),
        None => "has an unknown size".into(),
    };
    Err(Error::NoSpace(format!(
        "backup refused: repository {} has {} free out of {} ({}), and this {kind} backup {expected}, which would leave less than its min_free_space of {}",
        rc.name,
        human(free),
        cap.capacity.map_or("unknown".to_string(), human),
        match cap.source {
            "quota" => "its quota",
            _ => "its file system",
        },
        human(cap.min_free)
    )))
}

pub fn run(cfg: &Config, args: &Args) -> Result<()> {
    if !["full", "diff", "incr"].contains(&args.kind.as_str()) {
        return Err(Error::Invalid(format!(
            "backup type '{}' is not one of full, diff, incr",
            args.kind
        )));
    }
    let started = Instant::now();
    let rc = cfg.find_repo(args.repo.as_deref())?;
    let repo = Repository::open_repo(cfg, rc)?;
    // Checked before any work: every WAL position below divides by it.
    crate::commands::info::checked_seg_size(&repo)?;
    let lock = lock::repository(rc, &repo.descriptor.system_identifier)?;
    remove_incomplete(&repo)?;
    // A damaged backup is never built on: the reference is chosen among
    // the intact ones, and the user is told which were passed over.
    let scan = repo.scan_backups()?;
    let backups = scan.backups;
    let reference = reference_backup(&backups, &args.kind);
    for d in &scan.damaged {
        let newer = reference.as_ref().is_none_or(|r| d.id > r.id);
        if args.kind != "full" && newer {
            tracing::warn!(
                "backup {} is damaged ({}): not building on it{}; run `walshipper verify`",
                d.id,
                d.reason,
                reference
                    .as_ref()
                    .map(|r| format!(", this {} is based on {} instead", args.kind, r.id))
                    .unwrap_or_default()
            );
        }
    }
    // The backups this one will be built on, oldest first.
    let mut base_chain = reference
        .as_ref()
        .map(|r| backup_chain(&backups, r))
        .unwrap_or_default();
    base_chain.reverse();
    let kind = match &reference {
        Some(_) => args.kind.clone(),
        None if args.kind != "full" => {
            tracing::warn!(
                "no full backup to base a {} backup on: taking a full backup",
                args.kind
            );
            "full".to_string()
        }
        None => "full".to_string(),
    };
    // Before anything is written or PostgreSQL is asked to start a backup.
    check_free_space(cfg, rc, &repo, &backups, &kind)?;
    drop(backups);
    // The one manifest this backup needs: its reference's, compared file
    // by file (the scan kept summaries only), its file list in a local
    // spool (`crate::file_list`), not in memory.
    let reference = reference
        .map(|r| {
            file_list::read_manifest(&repo, &layout::manifest(&r.id)).map_err(|e| match e {
                Error::Corrupt { key, reason } => Error::Corrupt {
                    key,
                    reason: format!(
                        "{reason}; backup {} cannot be built on (`walshipper verify`)",
                        r.id
                    ),
                },
                e => e,
            })
        })
        .transpose()?;
    tracing::debug!("phase: repository checked at {:?}", started.elapsed());

    let mut client = connect(cfg)?;
    let q1 = |client: &mut postgres::Client, sql: &str| -> Result<String> {
        client
            .query_one(sql, &[])
            .map_err(pg_err(sql))
            .map(|r| r.get::<_, String>(0))
    };
    crate::pg::check_identity(&mut client, &repo)?;
    let data_dir = std::path::PathBuf::from(q1(&mut client, "SHOW data_directory")?);
    let configured = cfg
        .pg
        .data_dir
        .canonicalize()
        .unwrap_or(cfg.pg.data_dir.clone());
    if data_dir.canonicalize().unwrap_or(data_dir.clone()) != configured {
        return Err(Error::Invalid(format!(
            "the server's data directory is {} but pg.data_dir is {}: walshipper backup must run on the database host with pg.data_dir set to it",
            data_dir.display(),
            cfg.pg.data_dir.display()
        )));
    }
    let archive_mode = q1(&mut client, "SHOW archive_mode")?;
    if archive_mode == "off" {
        return Err(Error::Invalid(
            "archive_mode is off: a backup is only restorable with its WAL archived; set archive_mode = on and archive_command to walshipper archive-push (see `walshipper check`)".into(),
        ));
    }
    let version: i32 = q1(&mut client, "SHOW server_version_num")?
        .parse()
        .map_err(|_| Error::Invalid("odd server_version_num".into()))?;
    let checksums = q1(&mut client, "SHOW data_checksums")? == "on";

    let id = new_backup_id(&repo, &kind)?;
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| format!("walshipper {id}"));
    if args.json {
        crate::progress::event(&Event::Start(BackupStart {
            backup_id: id.clone(),
            kind: kind.clone(),
            requested_type: args.kind.clone(),
            based_on: reference.as_ref().map(|m| m.head.id.clone()),
        }));
    }
    let start_sql = if version >= 150000 {
        "SELECT pg_backup_start($1, true)::text"
    } else {
        "SELECT pg_start_backup($1, true, false)::text"
    };
    let start_lsn_text: String = client
        .query_one(start_sql, &[&label])
        .map_err(pg_err("pg_backup_start"))?
        .get(0);
    let start_lsn = wal::parse_lsn(&start_lsn_text)
        .ok_or_else(|| Error::Invalid(format!("odd start LSN {start_lsn_text}")))?;
    let start_time = chrono::Utc::now();
    tracing::info!("backup {id}: started at {start_lsn_text}");
    tracing::debug!("phase: pg_backup_start done at {:?}", started.elapsed());

    let result = copy_and_finish(
        cfg,
        &repo,
        &lock,
        &mut client,
        args,
        &kind,
        reference,
        &base_chain,
        &id,
        &label,
        version,
        checksums,
        start_lsn,
        start_time,
        started,
    );
    let failures = match result {
        Ok(f) => f,
        Err(e) => {
            // Best effort: the connection's end aborts the backup on the server;
            // our objects without a manifest are removed now or by the next run.
            drop(client);
            let _ = delete_backup_objects(&repo, &id);
            return Err(e);
        }
    };
    if !failures.is_empty() {
        let list: Vec<String> = failures
            .iter()
            .map(|f| format!("{} blocks {:?}", f.path, f.blocks))
            .collect();
        return Err(Error::Check(format!(
            "backup {id} was stored, but pages failed checksum verification (the cluster has corrupt data; run pg_amcheck): {}",
            list.join("; ")
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn copy_and_finish(
    cfg: &Config,
    repo: &Repository,
    lock: &lock::Lock,
    client: &mut postgres::Client,
    args: &Args,
    kind: &str,
    reference: Option<Spooled>,
    base_chain: &[String],
    id: &str,
    label: &str,
    version: i32,
    checksums: bool,
    start_lsn: u64,
    start_time: chrono::DateTime<chrono::Utc>,
    started: Instant,
) -> Result<Vec<ChecksumFailure>> {
    // Totals for the progress report, from a first walk (the files stay
    // on disk: nothing per file is kept).
    let counters = Arc::new(Counters::default());
    pgdata::scan_with(&cfg.pg.data_dir, &mut |f| {
        counters.bytes_total.fetch_add(f.size, Ordering::Relaxed);
        counters.files_total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    })?;
    let reporter = Reporter::start("backup", counters.clone(), args.json);
    let based_on = reference.as_ref().map(|m| m.head.id.clone());
    // The reference's list in path order, as the listing comes: one merge.
    let reference = reference.map(|r| r.files.in_path_order()).transpose()?;
    let mut copier = Copier {
        repo,
        id,
        data_dir: &cfg.pg.data_dir,
        jobs: args.jobs.max(1),
        bundle_size: cfg.backup.bundle.then(|| cfg.backup.bundle_bytes()),
        checksums,
        start_lsn,
        counters: &counters,
        reference: reference.as_ref().map(PathCursor::new).transpose()?,
        window: Vec::with_capacity(WINDOW),
        bundles: AtomicU64::new(0),
        out: ListWriter::new()?,
        failures: Vec::new(),
        size: 0,
        stored_size: 0,
        count: 0,
    };
    let scan = pgdata::scan_with(&cfg.pg.data_dir, &mut |f| copier.push(f))?;
    let (files, failures) = copier.finish()?;
    drop(reporter);
    tracing::debug!("phase: files copied at {:?}", started.elapsed());
    crate::manifest::release_free_memory();

    // wait_for_archive => false: the server would poll its archive status
    // once a second (a second per backup, measured); wait_for_wal below
    // waits for exactly the segments this backup needs, in our repository.
    // The server still switches to a new segment, so the last one is archived.
    let stop_sql = if version >= 150000 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
    };
    let row = client
        .query_one(stop_sql, &[])
        .map_err(pg_err("pg_backup_stop"))?;
    let stop_lsn_text: String = row.get(0);
    let labelfile: String = row.get(1);
    let spcmap: Option<String> = row.get(2);
    let stop_time = chrono::Utc::now();
    let stop_lsn = wal::parse_lsn(&stop_lsn_text)
        .ok_or_else(|| Error::Invalid(format!("odd stop LSN {stop_lsn_text}")))?;
    tracing::debug!("phase: pg_backup_stop done at {:?}", started.elapsed());
    let timeline = label_field(&labelfile, "START TIMELINE:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Invalid("backup_label without START TIMELINE".into()))?;

    // At the stop, the databases the recovered cluster will have: a
    // database created during the backup is in the list, one dropped is not.
    let databases = list_databases(client)?;

    let label_key = layout::backup_label(id);
    repo.put_object_with(
        &label_key,
        labelfile.as_bytes(),
        Durability::AtFlush,
        Some(1),
    )?;
    let spcmap_key = match spcmap.as_deref() {
        Some(m) if !m.is_empty() => {
            let k = layout::tablespace_map(id);
            repo.put_object_with(&k, m.as_bytes(), Durability::AtFlush, Some(1))?;
            Some(k)
        }
        _ => None,
    };

    // The WAL from the start to the stop position must be in the repository.
    let seg_size = crate::commands::info::checked_seg_size(repo)?;
    let first = wal::lsn_segno(start_lsn, seg_size);
    let last = wal::lsn_prev_segno(stop_lsn, seg_size);
    let stop_tli: u32 = {
        let name: String = client
            .query_one(
                "SELECT pg_walfile_name($1::text::pg_lsn)",
                &[&stop_lsn_text],
            )
            .map_err(pg_err("pg_walfile_name"))?
            .get(0);
        name.get(0..8)
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .unwrap_or(timeline)
    };
    wait_for_wal(
        repo,
        timeline,
        stop_tli,
        first,
        last,
        cfg.archive.check_timeout.max(60),
    )?;
    tracing::debug!("phase: WAL archived at {:?}", started.elapsed());
    repo.storage.flush()?;
    tracing::debug!("phase: flushed at {:?}", started.elapsed());

    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        id: id.to_string(),
        kind: kind.to_string(),
        based_on,
        label: label.to_string(),
        system_identifier: repo.descriptor.system_identifier.clone(),
        pg_version: repo.descriptor.pg_version,
        timeline,
        start_lsn: wal::format_lsn(start_lsn),
        stop_lsn: stop_lsn_text.clone(),
        start_time: start_time.to_rfc3339(),
        stop_time: stop_time.to_rfc3339(),
        wal_start: wal::segment_name(timeline, first, seg_size),
        wal_stop: wal::segment_name(stop_tli, last, seg_size),
        data_checksums: checksums,
        checksum_failures: failures.clone(),
        size: files.size,
        stored_size: files.stored_size,
        files: Vec::new(),
        dirs: scan
            .dirs
            .iter()
            .map(|d| DirEntry {
                path: d.rel.clone(),
                mode: d.mode,
            })
            .collect(),
        tablespaces: scan
            .tablespaces
            .iter()
            .map(|t| TablespaceEntry {
                oid: t.oid,
                location: t.location.display().to_string(),
            })
            .collect(),
        backup_label_object: label_key,
        tablespace_map_object: spcmap_key,
        databases,
    };
    // A backup that would not read back is never stored: its entries
    // checked with the rules a reader applies (`Manifest::validate`).
    files.check(&manifest)?;
    // Written last, durably: from now on the backup exists. Not if another
    // host took the lease meanwhile (its expire may be removing our base).
    lock.ensure_held()?;
    repo.put_object(
        &layout::manifest(id),
        manifest.json_reader_with(Box::new(files.iter()))?,
    )?;
    tracing::debug!("phase: manifest written at {:?}", started.elapsed());

    let mut chain = base_chain.to_vec();
    chain.push(id.to_string());
    if args.json {
        crate::progress::event(&Event::Done(BackupDone {
            backup_id: id.to_string(),
            kind: manifest.kind.clone(),
            requested_type: args.kind.clone(),
            based_on: manifest.based_on.clone(),
            chain,
            start_lsn: manifest.start_lsn.clone(),
            stop_lsn: manifest.stop_lsn.clone(),
            timeline,
            start_time: manifest.start_time.clone(),
            stop_time: manifest.stop_time.clone(),
            wal_start: manifest.wal_start.clone(),
            wal_stop: manifest.wal_stop.clone(),
            size: manifest.size,
            stored_size: manifest.stored_size,
            files: files.count,
            duration_s: started.elapsed().as_secs_f64(),
            checksum_failures: failures.iter().map(|f| f.blocks.len() as u64).sum(),
        }));
    } else {
        println!(
            "{} backup {id} complete{}: {} files, {} → {} stored, LSN {}..{}, in {:.1}s",
            manifest.kind,
            manifest
                .based_on
                .as_ref()
                .map(|b| format!(" (based on {b})"))
                .unwrap_or_default(),
            files.count,
            crate::commands::info::human(manifest.size),
            crate::commands::info::human(manifest.stored_size),
            manifest.start_lsn,
            manifest.stop_lsn,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(failures)
}

/// `m` and the backups it is based on, newest first.
/// The cluster's databases (for `restore --db-include`).
fn list_databases(client: &mut postgres::Client) -> Result<Vec<DatabaseEntry>> {
    let sql = "SELECT oid::int8, datname::text FROM pg_database ORDER BY oid";
    let rows = client.query(sql, &[]).map_err(pg_err(sql))?;
    rows.iter()
        .map(|r| {
            let oid: i64 = r.try_get(0).map_err(pg_err(sql))?;
            let name: String = r.try_get(1).map_err(pg_err(sql))?;
            let oid = u32::try_from(oid)
                .map_err(|_| Error::Invalid(format!("pg_database lists oid {oid} for {name:?}")))?;
            Ok(DatabaseEntry { oid, name })
        })
        .collect()
}

fn backup_chain(backups: &[BackupSummary], m: &BackupSummary) -> Vec<String> {
    let mut chain = vec![m.id.clone()];
    let mut next = m.based_on.clone();
    while let Some(id) = next {
        let Some(parent) = backups.iter().find(|b| b.id == id) else {
            break;
        };
        if chain.contains(&id) {
            break;
        }
        chain.push(id);
        next = parent.based_on.clone();
    }
    chain
}

fn label_field<'a>(label: &'a str, key: &str) -> Option<&'a str> {
    label
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// Backup ids sort by time: YYYYMMDD-HHMMSS and F, D or I for the type.
fn new_backup_id(repo: &Repository, kind: &str) -> Result<String> {
    let letter = match kind {
        "diff" => 'D',
        "incr" => 'I',
        _ => 'F',
    };
    let base = format!("{}{letter}", chrono::Utc::now().format("%Y%m%d-%H%M%S"));
    let mut id = base.clone();
    let mut n = 1;
    while !repo.storage.list(&layout::backup_prefix(&id))?.is_empty() {
        n += 1;
        id = format!("{base}{n}");
    }
    Ok(id)
}

/// Removes the objects of backups that never got a manifest. Names in the
/// listing are untrusted: only well-formed backup ids are ever turned into
/// keys to delete; anything else is left alone and reported.
pub fn remove_incomplete(repo: &Repository) -> Result<()> {
    for id in repo.storage.list_children(layout::BACKUPS_PREFIX)? {
        if !layout::is_backup_id(&id) {
            tracing::warn!(
                "ignoring {}{id:?} in the repository: not a backup walshipper writes",
                layout::BACKUPS_PREFIX
            );
            continue;
        }
        if repo.storage.head(&layout::manifest(&id))?.is_none() {
            let n = delete_backup_objects(repo, &id)?;
            tracing::warn!(
                "removed incomplete backup {id} ({n} objects) left by an interrupted run"
            );
        }
    }
    Ok(())
}

fn delete_backup_objects(repo: &Repository, id: &str) -> Result<usize> {
    // The manifest (if any) goes first, so a half-deleted backup is never valid.
    repo.storage.delete(&layout::manifest(id))?;
    repo.storage.delete_prefix(&layout::backup_prefix(id))
}

fn wait_for_wal(
    repo: &Repository,
    tli: u32,
    stop_tli: u32,
    first: u64,
    last: u64,
    timeout_s: u64,
) -> Result<()> {
    let begun = Instant::now();
    let deadline = begun + Duration::from_secs(timeout_s);
    for segno in first..=last {
        let candidates = [repo.wal_key(tli, segno), repo.wal_key(stop_tli, segno)];
        loop {
            let mut found = false;
            for k in &candidates {
                if repo.storage.head(k)?.is_some() {
                    found = true;
                }
            }
            if found {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Check(format!(
                    "WAL segment {} needed by this backup did not reach the repository within {timeout_s}s; check archive_command and pg_stat_archiver",
                    candidates[0].rsplit('/').next().unwrap_or_default()
                )));
            }
            // The last segment is usually archived within a few tens of
            // milliseconds of the stop: polled often at first.
            let step = if begun.elapsed() < Duration::from_secs(2) {
                10
            } else {
                50
            };
            std::thread::sleep(Duration::from_millis(step));
        }
    }
    Ok(())
}

/// What the copy made of one file: this backup's entry for it (one of
/// the reference's, carried over, for an unchanged file).
struct Copied(FileEntry);

/// No entry (for `BaseIndex::at`).
const NONE: u64 = u64::MAX;

/// Files a window of the copy holds: their listing and results are all
/// the per-file memory of a backup, whatever the data directory's size.
const WINDOW: usize = 8192;

/// The copy, fed the data directory's files in path order
/// (`pgdata::scan_with`), working a window of them at a time: it keeps
/// one window's listing and results, never the whole data directory's,
/// and writes this backup's entries to a local spool in path order.
struct Copier<'a> {
    repo: &'a Repository,
    id: &'a str,
    data_dir: &'a Path,
    jobs: usize,
    bundle_size: Option<u64>,
    checksums: bool,
    start_lsn: u64,
    counters: &'a Arc<Counters>,
    reference: Option<PathCursor<'a>>,
    window: Vec<SourceFile>,
    bundles: AtomicU64,
    out: ListWriter,
    failures: Vec<ChecksumFailure>,
    size: u64,
    stored_size: u64,
    count: u64,
}

impl<'a> Copier<'a> {
    /// The next file of the listing (in path order).
    fn push(&mut self, f: SourceFile) -> Result<()> {
        self.window.push(f);
        if self.window.len() >= WINDOW {
            self.flush()?;
        }
        Ok(())
    }

    /// Copies the window's files and appends their entries in path order.
    fn flush(&mut self) -> Result<()> {
        if self.window.is_empty() {
            return Ok(());
        }
        let base = BaseIndex::new(self.reference.as_mut(), &self.window)?;
        let copied = copy_files(
            self.repo,
            self.id,
            &base,
            self.data_dir,
            &self.window,
            self.jobs,
            self.bundle_size,
            &self.bundles,
            self.checksums,
            self.start_lsn,
            self.counters,
        )?;
        for (f, c) in self.window.iter().zip(copied) {
            // None: vanished during the backup.
            let Some((Copied(e), blocks)) = c else {
                continue;
            };
            self.out.push(&e)?;
            self.size += e.size;
            self.stored_size += e.stored_size;
            self.count += 1;
            if !blocks.is_empty() {
                self.failures.push(ChecksumFailure {
                    path: f.rel.clone(),
                    blocks,
                });
            }
        }
        self.window.clear();
        Ok(())
    }

    /// This backup's file list and its checksum failures (in path order).
    fn finish(mut self) -> Result<(Files, Vec<ChecksumFailure>)> {
        self.flush()?;
        let files = Files {
            list: self.out.finish()?,
            size: self.size,
            stored_size: self.stored_size,
            count: self.count,
        };
        Ok((files, self.failures))
    }
}

/// A backup's file list as the copy left it: entries in a local spool,
/// in byte order of the paths.
struct Files {
    list: FileList,
    size: u64,
    stored_size: u64,
    count: u64,
}

impl Files {
    fn iter(&self) -> impl Iterator<Item = Result<FileEntry>> + '_ {
        self.list.iter()
    }

    /// Checks every entry with the rules `Manifest::validate` applies when
    /// the manifest `head` (with no files) is read back, and that the
    /// paths are in strictly increasing byte order (so none twice).
    fn check(&self, head: &Manifest) -> Result<()> {
        let key = layout::manifest(&head.id);
        let check = EntryCheck::new(head, &key);
        let mut prev: Option<String> = None;
        for f in self.iter() {
            let f = f?;
            let refused = |reason: String| {
                Error::Invalid(format!(
                    "backup {} not stored: {reason}, which a restore would refuse; remove or move that file out of the data directory",
                    head.id
                ))
            };
            check.entry(&f).map_err(|e| match e {
                Error::Corrupt { reason, .. } => refused(reason),
                e => e,
            })?;
            if prev.as_ref().is_some_and(|p| *p >= f.path) {
                return Err(refused(format!("file {:?} is out of order", f.path)));
            }
            prev = Some(f.path);
        }
        for d in &head.dirs {
            check.path(&d.path, true).map_err(|e| match e {
                Error::Corrupt { reason, .. } => Error::Invalid(format!(
                    "backup {} not stored: {reason}, which a restore would refuse",
                    head.id
                )),
                e => e,
            })?;
        }
        Ok(())
    }
}

/// The reference backup's entries for the files of a window, found by
/// the merge: 8 bytes per file of the window, the entries read from the
/// reference's spool when they are used.
struct BaseIndex<'a> {
    list: Option<&'a FileList>,
    at: Vec<u64>,
}

impl<'a> BaseIndex<'a> {
    fn new(reference: Option<&mut PathCursor<'a>>, window: &[SourceFile]) -> Result<BaseIndex<'a>> {
        let Some(cursor) = reference else {
            return Ok(BaseIndex {
                list: None,
                at: Vec::new(),
            });
        };
        let mut at = Vec::with_capacity(window.len());
        for f in window {
            at.push(cursor.find(&f.rel)?.unwrap_or(NONE));
        }
        Ok(BaseIndex {
            list: Some(cursor.list()),
            at,
        })
    }

    /// The reference's entry for file `i` of the window, if it has one.
    fn get(&self, i: usize) -> Result<Option<FileEntry>> {
        match (self.list, self.at.get(i)) {
            (Some(list), Some(&o)) if o != NONE => list.entry_at(o).map(Some),
            _ => Ok(None),
        }
    }
}

/// A work item of the copy: one file, or a group of small files that go
/// into one bundle.
enum Work {
    File(usize),
    Bundle(Vec<usize>),
}

/// The work items: files of MAP_MIN and more biggest first (so one large
/// file does not finish alone at the end), then the small files in path
/// order, cut into groups of about `bundle_size` bytes (or one by one
/// when bundling is off).
fn plan_work(files: &[SourceFile], bundle_size: Option<u64>) -> Vec<Work> {
    let Some(target) = bundle_size else {
        let mut order: Vec<usize> = (0..files.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(files[i].size));
        return order.into_iter().map(Work::File).collect();
    };
    // pg_control on its own: restore writes it last, alone.
    let (mut big, mut small): (Vec<usize>, Vec<usize>) = (0..files.len())
        .partition(|&i| files[i].size >= delta::MAP_MIN || files[i].rel == "global/pg_control");
    big.sort_by_key(|&i| std::cmp::Reverse(files[i].size));
    small.sort_by(|&a, &b| files[a].rel.cmp(&files[b].rel));
    let mut work: Vec<Work> = big.into_iter().map(Work::File).collect();
    let mut group = Vec::new();
    let mut bytes = 0u64;
    for i in small {
        group.push(i);
        bytes += files[i].size;
        if bytes >= target {
            work.push(Work::Bundle(std::mem::take(&mut group)));
            bytes = 0;
        }
    }
    if !group.is_empty() {
        work.push(Work::Bundle(group));
    }
    work
}

/// What the copy made of each file of `files` (None: it vanished).
type CopyResults = Vec<Option<(Copied, Vec<u32>)>>;

/// Copies `files` (a window of the listing) with `jobs` threads.
#[allow(clippy::too_many_arguments)]
fn copy_files(
    repo: &Repository,
    id: &str,
    base: &BaseIndex,
    data_dir: &Path,
    files: &[SourceFile],
    jobs: usize,
    bundle_size: Option<u64>,
    bundles: &AtomicU64,
    checksums: bool,
    start_lsn: u64,
    counters: &Arc<Counters>,
) -> Result<CopyResults> {
    let work = plan_work(files, bundle_size);
    let next = AtomicUsize::new(0);
    let results: Mutex<CopyResults> = Mutex::new((0..files.len()).map(|_| None).collect());
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..jobs.min(work.len()) {
            s.spawn(|| loop {
                if first_error.lock().map(|e| e.is_some()).unwrap_or(true) {
                    return;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = work.get(n) else { return };
                let done = match item {
                    Work::File(i) => {
                        let f = &files[*i];
                        base.get(*i).and_then(|b| {
                            copy_one(
                                repo,
                                id,
                                data_dir,
                                f,
                                b.as_ref(),
                                checksums,
                                start_lsn,
                                counters,
                            )
                            .map(|c| {
                                let c = c.map(|(c, failed)| vec![(*i, c, failed)]);
                                (c.unwrap_or_default(), 1)
                            })
                        })
                    }
                    Work::Bundle(group) => {
                        let key =
                            layout::backup_bundle(id, bundles.fetch_add(1, Ordering::Relaxed) + 1);
                        copy_bundle(
                            repo, id, &key, data_dir, files, group, base, checksums, start_lsn,
                            counters,
                        )
                        .map(|c| (c, group.len()))
                    }
                };
                let done = done.and_then(|(copied, n)| {
                    let mut r = results
                        .lock()
                        .map_err(|_| Error::Invalid("a copy thread panicked".into()))?;
                    for (i, c, failed) in copied {
                        r[i] = Some((c, failed));
                    }
                    Ok(n)
                });
                match done {
                    Ok(n) => {
                        counters.files_done.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if let Ok(mut fe) = first_error.lock() {
                            fe.get_or_insert(e);
                        }
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    results
        .into_inner()
        .map_err(|_| Error::Invalid("a copy thread panicked".into()))
}

/// Stores the small files `group` of `files` in bundle `key`, streamed:
/// each file is read whole (it is small), its pages checked and its
/// hash taken; one unchanged since the reference (same size and hash,
/// `unchanged_small`) refers to the reference's object as before and adds no bytes,
/// the others are appended and their offsets recorded. Nothing changed:
/// no object. A file that vanished is left out; one that grew to MAP_MIN
/// or more since the scan is stored on its own (`copy_one`).
#[allow(clippy::too_many_arguments)]
fn copy_bundle(
    repo: &Repository,
    id: &str,
    key: &str,
    data_dir: &Path,
    files: &[SourceFile],
    group: &[usize],
    base: &BaseIndex,
    checksums: bool,
    start_lsn: u64,
    counters: &Arc<Counters>,
) -> Result<Vec<(usize, Copied, Vec<u32>)>> {
    let mut out: Vec<(usize, Copied, Vec<u32>)> = Vec::with_capacity(group.len());
    // Appended files, in order: their offsets come from the packer.
    let mut appended: Vec<usize> = Vec::new();
    // One copy of the key for all the files of the bundle.
    let shared_key: std::sync::Arc<str> = key.into();
    let mut grown: Vec<usize> = Vec::new();
    let mut members = group.iter();
    let next = || -> Result<Option<Vec<u8>>> {
        for &i in members.by_ref() {
            let f = &files[i];
            let abs = f.abs(data_dir);
            let file = match File::open(&abs) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("open {}", abs.display()), e)),
            };
            let verify = checksums && pgdata::is_relation_file(&f.rel);
            let reader = PageCheckingReader::new(
                file,
                verify,
                pgdata::relation_segno(&f.rel),
                start_lsn,
                counters.clone(),
            )
            .map_err(|e| Error::io(format!("open {}", abs.display()), e))?;
            let mut body = Vec::with_capacity(f.size as usize);
            let mut limited = reader.take(crate::manifest::BUNDLED_MAX);
            limited
                .read_to_end(&mut body)
                .map_err(|e| Error::io(format!("read {}", abs.display()), e))?;
            if body.len() as u64 >= crate::manifest::BUNDLED_MAX {
                grown.push(i);
                continue;
            }
            let failures = limited.into_inner().failures();
            let entry = match base.get(i)? {
                Some(b) if unchanged_small(&b, &body) => {
                    let same = Copied(FileEntry {
                        mtime: f.mtime,
                        mode: f.mode,
                        stored_size: 0,
                        ..b
                    });
                    out.push((i, same, failures));
                    continue;
                }
                _ => FileEntry {
                    path: f.rel.clone(),
                    size: body.len() as u64,
                    mtime: f.mtime,
                    mode: f.mode,
                    hash: HashAlg::CURRENT.digest(&body),
                    object: shared_key.clone(),
                    deltas: Box::default(),
                    maps: Box::default(),
                    offset: None,
                    stored_size: 0,
                },
            };
            appended.push(out.len());
            out.push((i, Copied(entry), failures));
            return Ok(Some(body));
        }
        Ok(None)
    };
    let mut packer = crate::bundle::Packer::new(next);
    if packer.prime()? {
        let put = repo.put_object_with(key, &mut packer, Durability::AtFlush, Some(1));
        if let Some(e) = packer.take_error() {
            return Err(e);
        }
        let (outcome, summary) = put?;
        if outcome != crate::storage::PutOutcome::Stored {
            // Nothing was read past the first member: never record offsets
            // into an object this backup did not write.
            return Err(Error::Invalid(format!(
                "{key} already exists: a backup's objects are written once"
            )));
        }
        let (offsets, total) = packer.finish()?;
        // The bundle's stored bytes shared out by size: the manifest's
        // stored_size (their sum) stays what this backup added.
        let mut left = summary.stored_len;
        let last = appended.len().saturating_sub(1);
        for (k, (&slot, offset)) in appended.iter().zip(offsets).enumerate() {
            let e = &mut out[slot].1 .0;
            e.offset = Some(offset);
            let share = if k == last {
                left
            } else {
                (summary.stored_len as u128 * e.size as u128 / total.max(1) as u128) as u64
            };
            e.stored_size = share.min(left);
            left -= e.stored_size;
        }
    } else {
        drop(packer);
    }
    for i in grown {
        let f = &files[i];
        if let Some((c, failed)) = copy_one(
            repo,
            id,
            data_dir,
            f,
            base.get(i)?.as_ref(),
            checksums,
            start_lsn,
            counters,
        )? {
            out.push((i, c, failed));
        }
    }
    Ok(out)
}

/// Copies one file; None if it vanished (dropped during the backup: WAL
/// replay handles it). With `base` (the file in the reference backup of a
/// diff/incr) an unchanged file refers to the earlier objects and a changed
/// large file stores only its changed blocks.
#[allow(clippy::too_many_arguments)]
fn copy_one(
    repo: &Repository,
    id: &str,
    data_dir: &Path,
    f: &SourceFile,
    base: Option<&FileEntry>,
    checksums: bool,
    start_lsn: u64,
    counters: &Arc<Counters>,
) -> Result<Option<(Copied, Vec<u32>)>> {
    let verify = checksums && pgdata::is_relation_file(&f.rel);
    let abs = f.abs(data_dir);
    // None: the file vanished (dropped during the backup).
    let open = || -> Result<Option<File>> {
        match File::open(&abs) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("open {}", abs.display()), e)),
        }
    };
    let checking = |file: File, verify: bool| {
        PageCheckingReader::new(
            file,
            verify,
            pgdata::relation_segno(&f.rel),
            start_lsn,
            counters.clone(),
        )
        .map_err(|e| Error::io(format!("open {}", abs.display()), e))
    };
    let data_key = layout::backup_data(id, &f.rel);
    let map_key = layout::backup_map(id, &f.rel);
    let referenced = |b: &FileEntry| FileEntry {
        mtime: f.mtime,
        mode: f.mode,
        stored_size: 0,
        ..b.clone()
    };
    let carried = |b: &FileEntry| Copied(referenced(b));
    // The object's final frame and the manifest share the one hash taken.
    let stored = |summary: &crate::codec::Summary, maps: Box<[String]>, stored_size| FileEntry {
        path: f.rel.clone(),
        size: summary.plain_len,
        mtime: f.mtime,
        mode: f.mode,
        hash: summary.hash,
        object: data_key.as_str().into(),
        deltas: Box::default(),
        maps,
        offset: None,
        stored_size,
    };
    let threads = if f.size > BIG_FILE { None } else { Some(1) };
    let Some(file) = open()? else {
        return Ok(None);
    };

    // Small files: compared whole, stored whole when they differ.
    if f.size < delta::MAP_MIN {
        let mut reader = checking(file, verify)?;
        let mut body = Vec::with_capacity(f.size as usize);
        reader
            .read_to_end(&mut body)
            .map_err(|e| Error::io(format!("read {}", abs.display()), e))?;
        let failures = reader.failures();
        if let Some(b) = base {
            if unchanged_small(b, &body) {
                return Ok(Some((carried(b), failures)));
            }
        }
        let (_, summary) =
            repo.put_object_with(&data_key, &body[..], Durability::AtFlush, Some(1))?;
        return Ok(Some((
            Copied(stored(&summary, Box::default(), summary.stored_len)),
            failures,
        )));
    }

    // Large files: compared block by block with the reference's block map.
    // A block map that cannot be read is a doubt: the file is stored whole.
    let base_map = match base {
        Some(b) if !b.maps.is_empty() => match load_map(repo, b) {
            Ok(m) => Some((b, m)),
            Err(e) => {
                tracing::warn!("{}: storing the whole file: {e}", f.rel);
                None
            }
        },
        _ => None,
    };
    // The whole file, and its block map for the next diff/incr.
    let store_whole = |file: File| -> Result<Option<(Copied, Vec<u32>)>> {
        let reader = checking(file, verify)?;
        let failures = reader.failures.clone();
        let mut mb = delta::MapBuilder::new(reader);
        // One BLAKE3 pass: the block map's entries merged are the file's hash.
        let (_, summary) =
            repo.put_self_hashed(&data_key, &mut mb, Durability::AtFlush, threads)?;
        let map = mb
            .finish()
            .map_err(|e| Error::io(format!("read {}", abs.display()), e))?
            .encode();
        let (_, msum) = repo.put_object_with(&map_key, &map[..], Durability::AtFlush, Some(1))?;
        let e = stored(
            &summary,
            Box::new([map_key.clone()]),
            summary.stored_len + msum.stored_len,
        );
        let failures = failures.lock().map(|v| v.clone()).unwrap_or_default();
        Ok(Some((Copied(e), failures)))
    };
    let Some((b, map)) = base_map else {
        // No reference.
        return store_whole(file);
    };
    // A file written since the reference backup (its mtime or size moved)
    // has most likely changed: one pass finds its changed blocks, hashes it
    // and stores them. Any other (most files of an incremental) is first
    // compared by block hashes alone, without the whole-file hash a changed file
    // needs; if it did change after all, it is read again from the start.
    let likely_changed = f.mtime != b.mtime || f.size != b.size;
    let mut file = file;
    if !likely_changed {
        let same = delta::unchanged(io::BufReader::with_capacity(256 << 10, &file), &map)
            .map_err(|e| Error::io(format!("read {}", abs.display()), e))?;
        if same {
            counters.bytes_done.fetch_add(f.size, Ordering::Relaxed);
            return Ok(Some((carried(b), Vec::new())));
        }
        io::Seek::rewind(&mut file).map_err(|e| Error::io(format!("read {}", abs.display()), e))?;
    }
    // Only the changed blocks' pages are checked; the others are bytes an
    // earlier backup stored (and checked). The checker reads a page again
    // by offset, on its own handle.
    let checker = checking(
        file.try_clone()
            .map_err(|e| Error::io(format!("open {}", abs.display()), e))?,
        verify,
    )?;
    let failures = checker.failures.clone();
    let mut delta = delta::DeltaReader::new(checking(file, false)?, map);
    if f.size > BIG_FILE {
        delta = delta.hash_on_own_thread();
    }
    if b.offset.is_none() && b.deltas.len() < XOR_CHAIN_MAX {
        delta = delta.with_previous(f.rel.clone(), move || previous_version(repo, b));
    }
    if verify {
        delta = delta.on_changed(move |page, offset| {
            if page.len() == BLCKSZ {
                checker.check_page(page, offset);
            }
        });
    }
    // Nothing is stored for a file that turns out identical.
    if likely_changed
        && !delta
            .differs()
            .map_err(|e| Error::io(format!("read {}", abs.display()), e))?
    {
        return Ok(Some((carried(b), Vec::new())));
    }
    let (_, summary) = repo.put_object_with(&data_key, &mut delta, Durability::AtFlush, threads)?;
    let d = delta
        .finish()
        .map_err(|e| Error::io(format!("read {}", abs.display()), e))?;
    if let Some(why) = &d.reference_doubt {
        // The reference's chain of this file does not rebuild: a delta on
        // it would not restore either. The file is stored whole (the same
        // keys, replaced), a new base for the backups after this one.
        tracing::warn!(
            "{}: the reference backup {}'s copy is damaged ({why}): stored whole; run `walshipper verify --backup {}`",
            f.rel,
            b.object.split('/').nth(1).unwrap_or("?"),
            b.object.split('/').nth(1).unwrap_or("?")
        );
        // This backup's own delta, not yet in any manifest: replaced.
        repo.storage.delete(&data_key)?;
        let Some(file) = open()? else {
            return Ok(None); // dropped meanwhile
        };
        return store_whole(file);
    }
    tracing::debug!(
        "{}: {} changed blocks, {} filtered, {} of them as XOR records",
        f.rel,
        d.changed_blocks,
        d.filtered_blocks,
        d.xored_blocks
    );
    let (_, msum) =
        repo.put_object_with(&map_key, &d.map_delta[..], Durability::AtFlush, Some(1))?;
    let mut e = referenced(b);
    e.size = d.size;
    e.set_hash(&d.hash);
    e.deltas = e.deltas.iter().cloned().chain([data_key]).collect();
    e.maps = e.maps.iter().cloned().chain([map_key]).collect();
    e.stored_size = summary.stored_len + msum.stored_len;
    let failures = failures.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(Some((Copied(e), failures)))
}

/// The longest chain (deltas on a base) whose blocks an incremental reads to
/// store XOR records: as many streams as restore reads side by side. A
/// longer chain gets whole blocks.
const XOR_CHAIN_MAX: usize = 31;

/// The reference backup's version of a large file, block by block, for
/// the XOR records of the next delta: its base object and deltas opened as
/// streams, the base's frames decoded only where a changed block lies.
/// Not trusted: each block is compared with the reference's block map.
fn previous_version<'a>(
    repo: &'a Repository,
    b: &FileEntry,
) -> io::Result<Box<dyn delta::PreviousBlocks + 'a>> {
    // A missing or damaged object of the chain is damage (InvalidData: the
    // caller then stores the file whole); anything else (the store not
    // answering) only costs the XOR records.
    let open = |key: &str| {
        repo.open_unhashed(key, 1).map_err(|e| match e {
            Error::NotFound(_) | Error::Corrupt { .. } => {
                io::Error::new(io::ErrorKind::InvalidData, e.to_string())
            }
            e => io::Error::other(e.to_string()),
        })
    };
    let base = open(&b.object)?;
    let deltas = b
        .deltas
        .iter()
        .map(|k| open(k))
        .collect::<io::Result<Vec<_>>>()?;
    // From a remote store, passing over a base is a download: bounded.
    let bounded = !repo.storage.reads_are_local();
    Ok(Box::new(delta::ChainBlocks::open(base, deltas, bounded)?))
}

/// Whether a small file read as `body` is the reference's version of it:
/// same size and hash, hashed with the reference's algorithm. An entry of
/// an older manifest (SHA-256) is compared by SHA-256, so the first backup
/// after an upgrade does not store every small file again; the entry kept
/// then carries that SHA-256 on.
fn unchanged_small(b: &FileEntry, body: &[u8]) -> bool {
    b.size == body.len() as u64 && b.hash_is(&b.hash_alg().digest(body))
}

/// The block map of a file as a backup has it: the full map and its deltas.
/// Each is read with a cap: a map of a file of the manifest's size (or of
/// a 1 GiB relation segment, which an earlier version may have been).
fn load_map(repo: &Repository, b: &FileEntry) -> Result<delta::BlockMap> {
    let corrupt = |key: &str, reason: String| Error::Corrupt {
        key: key.to_string(),
        reason,
    };
    if b.size > delta::MAX_FILE_SIZE {
        return Err(corrupt(
            b.maps.last().map(String::as_str).unwrap_or_default(),
            format!("the manifest gives {} a size of {} bytes", b.path, b.size),
        ));
    }
    let cap = delta::map_len_max(b.size.max(u64::from(RELSEG_BLOCKS) * BLCKSZ as u64));
    let mut map = delta::BlockMap::default();
    for key in &b.maps {
        if layout::backup_of(key).is_none() {
            return Err(corrupt(key, "not a backup object's key".into()));
        }
        let body = repo.read_object_capped(key, cap)?;
        map.apply(&body).map_err(|e| corrupt(key, e.to_string()))?;
    }
    if map.size != b.size {
        return Err(corrupt(
            b.maps.last().map(String::as_str).unwrap_or_default(),
            format!(
                "block map says {} bytes, the manifest {} for {}",
                map.size, b.size, b.path
            ),
        ));
    }
    Ok(map)
}

/// Passes a file's bytes through while checking the checksum of every full
/// page, with PostgreSQL's rules: new pages and pages changed since the
/// backup started are skipped; a failing page is read again once (it may
/// have been read while being written) before it counts as a failure.
struct PageCheckingReader {
    file: File,
    verify: bool,
    first_block: u32,
    start_lsn: u64,
    offset: u64,
    pending: Vec<u8>,
    failures: Arc<Mutex<Vec<u32>>>,
    counters: Arc<Counters>,
}

impl PageCheckingReader {
    fn failures(&self) -> Vec<u32> {
        self.failures.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn new(
        file: File,
        verify: bool,
        segno: u32,
        start_lsn: u64,
        counters: Arc<Counters>,
    ) -> io::Result<Self> {
        Ok(PageCheckingReader {
            file,
            verify,
            first_block: segno.saturating_mul(RELSEG_BLOCKS),
            start_lsn,
            offset: 0,
            pending: Vec::with_capacity(BLCKSZ),
            failures: Arc::new(Mutex::new(Vec::new())),
            counters,
        })
    }

    fn check_page(&self, page: &[u8], page_offset: u64) {
        if page::is_new(page) || page::lsn(page) >= self.start_lsn {
            return;
        }
        // Block numbers are u32 in PostgreSQL too; a local file this large
        // is not a relation segment, and wrapping only changes which
        // checksum is expected, never memory.
        let blkno = self
            .first_block
            .wrapping_add((page_offset / BLCKSZ as u64) as u32);
        if page::checksum(page, blkno) == page::stored_checksum(page) {
            return;
        }
        let mut again = vec![0u8; BLCKSZ];
        if self.file.read_exact_at(&mut again, page_offset).is_ok()
            && (page::is_new(&again)
                || page::lsn(&again) >= self.start_lsn
                || page::checksum(&again, blkno) == page::stored_checksum(&again))
        {
            return;
        }
        tracing::warn!("checksum failure in block {blkno}");
        if let Ok(mut f) = self.failures.lock() {
            f.push(blkno);
        }
    }
}

impl Read for PageCheckingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.counters
            .bytes_done
            .fetch_add(n as u64, Ordering::Relaxed);
        if !self.verify || n == 0 {
            self.offset += n as u64;
            return Ok(n);
        }
        let mut data = &buf[..n];
        let mut pos = self.offset;
        if !self.pending.is_empty() {
            let take = (BLCKSZ - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            pos += take as u64;
            if self.pending.len() == BLCKSZ {
                let page = std::mem::take(&mut self.pending);
                self.check_page(&page, pos - BLCKSZ as u64);
                self.pending = page;
                self.pending.clear();
            }
        }
        let mut chunks = data.chunks_exact(BLCKSZ);
        for page in &mut chunks {
            self.check_page(page, pos);
            pos += BLCKSZ as u64;
        }
        self.pending.extend_from_slice(chunks.remainder());
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::{entry, sample, ID};

    /// A chain begun by an older walshipper, whose full's block map is of
    /// the first kind (`WSBMAP01`: each block's own BLAKE3), goes on: the
    /// incremental compares blocks the old way, stores only the changed
    /// ones (block deltas version 2), and the chain rebuilds to the file.
    #[test]
    fn an_incremental_goes_on_from_an_older_fulls_block_map() {
        let dir = tempfile::tempdir().unwrap();
        let (_cfg, repo) = crate::repo::test_support::posix_repo(dir.path(), 7);
        let data_dir = dir.path().join("pg");
        std::fs::create_dir_all(data_dir.join("base/5")).unwrap();
        let rel = "base/5/16384";
        let mut data: Vec<u8> = (0..40 * BLCKSZ as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(data_dir.join(rel), &data).unwrap();
        let size = data.len() as u64;
        let source = |mtime| SourceFile {
            rel: rel.into(),
            size,
            mtime,
            mode: 0o600,
        };
        let counters = Arc::new(Counters::default());
        let full_id = "20260101-000000F";
        let copy = |id: &str, f: &SourceFile, base: Option<&FileEntry>| {
            let (Copied(e), failures) =
                copy_one(&repo, id, &data_dir, f, base, false, 0, &counters)
                    .unwrap()
                    .unwrap();
            assert!(failures.is_empty());
            e
        };
        let full = copy(full_id, &source(1), None);
        // The full's map rewritten as an older walshipper wrote it.
        let map_key = full.maps[0].clone();
        let mut map = delta::BlockMap::default();
        map.apply(&repo.read_object_capped(&map_key, 1 << 20).unwrap())
            .unwrap();
        assert_eq!(map.kind, delta::MapKind::Tree);
        let old = delta::tests::block_map_of(&data);
        repo.storage.delete(&map_key).unwrap();
        repo.put_object(&map_key, &old.encode()[..]).unwrap();

        for blk in [3usize, 20, 39] {
            data[blk * BLCKSZ + 100] ^= 0x5a;
        }
        std::fs::write(data_dir.join(rel), &data).unwrap();
        let incr = copy("20260102-000000I", &source(2), Some(&full));
        assert_eq!(incr.deltas.len(), 1, "stored as a delta, not whole");
        // Three one-byte changes: XOR records against the full's blocks.
        assert!(incr.stored_size < 2048, "{}", incr.stored_size);
        let delta_body = repo.read_object_capped(&incr.deltas[0], 1 << 20).unwrap();
        assert_eq!(&delta_body[..8], b"WSDELTA2");
        // Its map delta is of the old kind too, and names the changed
        // blocks only: applied, the map is the old kind's of the new file.
        let map_delta = repo.read_object_capped(&incr.maps[1], 1 << 20).unwrap();
        assert_eq!(
            &map_delta[..9],
            b"WSBMAP01\x01",
            "a map delta of the old kind"
        );
        let listed = u32::from_le_bytes(map_delta[17..21].try_into().unwrap());
        assert_eq!(listed, 3, "the three changed blocks");
        let mut next = old.clone();
        next.apply(&map_delta).unwrap();
        assert!(
            next == delta::tests::block_map_of(&data),
            "the map delta applied gives the new file's map"
        );
        assert_eq!(incr.hash, crate::codec::HashAlg::Blake3.digest(&data));

        let mut out = Vec::new();
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let got = crate::commands::restore::rebuild_file(
            &repo,
            &incr,
            &mut out,
            &data_dir.join("restored"),
            &scratch,
        )
        .unwrap();
        assert_eq!(got, incr.hash);
        assert!(out == data, "the chain rebuilds to the file");
        // Unchanged since (same size and time), it is compared against the
        // old-kind map the chain now has, and carried over.
        let same = copy("20260103-000000I", &source(2), Some(&incr));
        assert_eq!(same.deltas, incr.deltas);
        assert_eq!(same.stored_size, 0);
    }

    fn listing(paths: &[&str]) -> Vec<SourceFile> {
        paths
            .iter()
            .map(|p| SourceFile {
                rel: p.to_string(),
                size: 1,
                mtime: 0,
                mode: 0o600,
            })
            .collect()
    }

    /// The reference's entry of each file is found by one merge of the
    /// two lists in path order, window after window; a reference out of
    /// order (an older writer's) is sorted first. Byte order: "a.b" <
    /// "a/b" ('.' < '/').
    #[test]
    fn reference_entries_are_found_by_path() {
        let paths = [
            "base/1/1",
            "base/1/1.1",
            "base/1/1/x",
            "base/1/10",
            "global/x",
        ];
        let files = listing(&paths);
        let mut sorted: Vec<&str> = paths.to_vec();
        sorted.sort();
        assert_eq!(sorted, paths, "the listing's order is byte order");
        let refs = ["base/1/1", "base/1/1/x", "base/1/2", "global/x", "z"];
        let want = [
            Some("base/1/1"),
            None,
            Some("base/1/1/x"),
            None,
            Some("global/x"),
        ]
        .map(|w| w.map(String::from));
        for order in [refs.to_vec(), refs.iter().rev().copied().collect()] {
            let entries: Vec<FileEntry> = order.iter().map(|p| entry(p, ID)).collect();
            let list = FileList::spool(&entries).unwrap().in_path_order().unwrap();
            for cut in 0..=files.len() {
                let mut cursor = PathCursor::new(&list).unwrap();
                let mut found: Vec<Option<String>> = Vec::new();
                for window in [&files[..cut], &files[cut..]] {
                    let base = BaseIndex::new(Some(&mut cursor), window).unwrap();
                    found.extend((0..window.len()).map(|i| base.get(i).unwrap().map(|e| e.path)));
                    assert!(base.get(99).unwrap().is_none());
                }
                assert_eq!(found, want, "windows cut at {cut}");
            }
        }
        let none = BaseIndex::new(None, &files).unwrap();
        assert!(none.get(0).unwrap().is_none());
    }

    /// The copy's entries are checked with the reader's rules before the
    /// manifest is stored: one a restore would refuse stops the backup.
    #[test]
    fn copied_entries_are_checked() {
        let n = 40_000;
        let paths: Vec<String> = (0..n).map(|i| format!("base/5/{:06}", i)).collect();
        let mut w = ListWriter::new().unwrap();
        for p in &paths {
            w.push(&entry(p, ID)).unwrap();
        }
        let got = Files {
            list: w.finish().unwrap(),
            size: 0,
            stored_size: 0,
            count: n as u64,
        };
        let read: Vec<String> = got.iter().map(|e| e.unwrap().path).collect();
        assert_eq!(read, paths);
        let mut head = sample();
        head.files.clear();
        head.dirs.clear();
        head.kind = "full".into();
        head.based_on = None;
        head.id = "20261120-000000F".into();
        head.backup_label_object = layout::backup_label(&head.id);
        head.tablespace_map_object = None;
        // Entries of another id: refused, as the reader would.
        let e = got.check(&head).unwrap_err().to_string();
        assert!(
            e.contains("not stored") && e.contains("restore would refuse"),
            "{e}"
        );
        head.id = ID.into();
        head.kind = "incr".into();
        head.backup_label_object = layout::backup_label(ID);
        got.check(&head).unwrap();
        head.dirs.push(crate::manifest::DirEntry {
            path: "pg_tblspc/16390/PG_14_202107181".into(),
            mode: 0o700,
        });
        assert!(got.check(&head).is_err());
    }
}
