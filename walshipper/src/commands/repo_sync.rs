//! `repo-sync`: makes every repository hold what any other holds: WAL files,
//! complete backups (files first, manifest last) and keys. Objects are
//! copied byte for byte and verified on the way (a damaged source object is
//! reported and skipped, never copied). Backups that are incomplete in the
//! source (no manifest) are not copied.
//!
//! Each repository's retention is its own: a backup whose tombstone
//! (`expired/<id>`, written by expire) is in the target is not copied back,
//! nor any backup built on it; WAL before the oldest backup the target will
//! hold is not copied either (expire would remove it again). Tombstones
//! themselves are never copied.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::layout;
use crate::manifest::BackupSummary;
use crate::repo::Repository;
use crate::wal::{self, WalFileKind};

pub struct Args {
    /// Only copy into this repository (default: every one).
    pub to: Option<String>,
    pub dry_run: bool,
    pub json: bool,
}

#[derive(Serialize, Default)]
struct Report {
    repository: String,
    wal_copied: Vec<String>,
    backups_copied: Vec<String>,
    keys_copied: usize,
    failed: Vec<String>,
    /// Backups not copied because the target's retention removed them
    /// (a tombstone there), or one they are built on: not failures.
    backups_skipped_expired: Vec<String>,
    /// WAL files not copied because they precede the oldest backup the
    /// target holds (its expire would remove them again), and that
    /// backup's first segment.
    wal_skipped: usize,
    wal_skipped_before: Option<String>,
    /// The streamed tail copied (`stream_tail`): its segment and where its
    /// chunks end in the target now.
    stream_tail: Option<String>,
    stream_tail_end: Option<String>,
    stream_chunks_copied: usize,
    /// Streamed chunks removed from the target because it now holds their
    /// segment whole (or as `.partial`): a tail it no longer needs.
    stream_chunks_removed: usize,
}

/// What a repository holds, by object key.
struct Holdings {
    wal: BTreeSet<String>,
    /// Complete backups: id → every object key of it (manifest included).
    backups: std::collections::BTreeMap<String, Vec<String>>,
    keys: BTreeSet<String>,
    /// Every WAL and backup object key, for "does this repository have it".
    objects: std::collections::HashSet<String>,
}

/// The backups whose tombstone (`expired/<id>`) `repo` holds: its
/// retention removed them. Tombstones are never copied: each repository's
/// retention is its own.
fn tombstones(repo: &Repository) -> Result<BTreeSet<String>> {
    let mut ids = BTreeSet::new();
    for m in repo.storage.list(layout::EXPIRED_PREFIX)? {
        match layout::parse(&m.key) {
            Some(layout::ObjectName::Tombstone { id }) => {
                ids.insert(id);
            }
            _ => tracing::warn!(
                "repository {}: ignoring {:?}, not a key walshipper writes",
                repo.name,
                m.key
            ),
        }
    }
    Ok(ids)
}

/// The segment number of a WAL key, for segments and backup history files
/// (None for timeline history files, which are always copied).
fn wal_segno(key: &str, seg_size: u64) -> Option<u64> {
    match layout::parse(key)? {
        layout::ObjectName::Wal {
            kind:
                WalFileKind::Segment { log, seg, .. } | WalFileKind::BackupHistory { log, seg, .. },
            ..
        } => crate::commands::info::segno_of(log, seg, seg_size),
        _ => None,
    }
}

/// Lists what `repo` holds. Listings are untrusted: only keys `layout`
/// accepts are copied (a key like `backups/../x` is never used as a path
/// on the other side); the rest is reported and left alone.
fn holdings(repo: &Repository) -> Result<Holdings> {
    let mut wal = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let mut all: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut foreign = 0usize;
    for prefix in [
        layout::WAL_PREFIX,
        layout::KEYS_PREFIX,
        layout::BACKUPS_PREFIX,
    ] {
        for m in repo.storage.list(prefix)? {
            match layout::parse(&m.key) {
                Some(layout::ObjectName::Wal { .. }) if prefix == layout::WAL_PREFIX => {
                    wal.insert(m.key);
                }
                Some(layout::ObjectName::KeyFile { .. }) if prefix == layout::KEYS_PREFIX => {
                    keys.insert(m.key);
                }
                Some(layout::ObjectName::Backup { id, .. }) if prefix == layout::BACKUPS_PREFIX => {
                    all.entry(id).or_default().push(m.key);
                }
                _ => {
                    foreign += 1;
                    tracing::warn!(
                        "repository {}: ignoring {:?}, not a key walshipper writes",
                        repo.name,
                        m.key
                    );
                }
            }
        }
    }
    if foreign > 0 {
        eprintln!(
            "repository {}: {foreign} foreign object(s) ignored (see the log)",
            repo.name
        );
    }
    let backups: std::collections::BTreeMap<String, Vec<String>> = all
        .into_iter()
        .filter(|(id, keys)| keys.contains(&layout::manifest(id)))
        .collect();
    let objects = wal
        .iter()
        .cloned()
        .chain(backups.values().flatten().cloned())
        .collect();
    Ok(Holdings {
        wal,
        backups,
        keys,
        objects,
    })
}

/// Copies each source's streamed tail (the chunks `wal-receive` keeps of
/// the segment it is filling, docs/repository-format.md "Streamed partial
/// segments") into `target`, so that a restore from it recovers the newest
/// WAL too; then removes the target's chunks of segments it now holds
/// whole. Returns the number of failures.
///
/// A tail is only ever a prefix of its segment, so a copy is never wrong
/// WAL, only possibly older; the rules keep it readable too:
/// - the source's chain is read back strictly first (`stream::read_chain`,
///   as archive-get does); a damaged or gapped one is not copied;
/// - chunks are copied in offset order, so a copy cut short leaves a
///   shorter chain, never one with a gap;
/// - afterwards the target's chain is read back strictly and must agree
///   with the source's bytes; otherwise it is a failure naming both;
/// - a segment the target holds whole is never given chunks (archive-get
///   prefers the whole segment anyway), and its old chunks go.
///
/// A receiver writing into the source meanwhile merges chunks (the pieces
/// vanish) or completes the segment: a chunk gone since the listing ends
/// this copy without failure; the next repo-sync copies the newer tail or
/// the whole segment.
fn sync_stream_tail(
    target: &Repository,
    sources: &[&(Repository, Holdings)],
    dry_run: bool,
    report: &mut Report,
) -> Result<usize> {
    let seg = crate::commands::info::checked_seg_size(target)?;
    let mut failures = 0;
    let held = crate::stream::Held::list(target)?;
    for (src, h) in sources {
        let listing = crate::stream::list_streamed(src)?;
        let src_held = crate::stream::Held::of_keys(h.wal.iter().map(String::as_str), seg);
        let Some((tli, segno)) =
            crate::stream::receiver_segment(&listing, |t, s| src_held.stored(t, s))
        else {
            continue;
        };
        if held.stored(tli, segno) {
            continue;
        }
        let name = wal::segment_name(tli, segno, seg);
        let Some(listed) = listing.segments.get(&(tli, segno)) else {
            continue;
        };
        // Only an error over an unchanged listing is a failure: the
        // source's receiver merges and deletes chunks in any order.
        let chain = match crate::stream::read_settled(src, tli, segno, listed) {
            Ok(crate::stream::Settled::Read(Some(c))) => c,
            Ok(crate::stream::Settled::Read(None) | crate::stream::Settled::Changed) => {
                tracing::info!(
                    "the streamed tail {name} of {} changed while it was read (its receiver merged or completed it): not copied this time",
                    src.name
                );
                continue;
            }
            Err(e) => {
                eprintln!("streamed tail {name}: not copied from {}: {e}", src.name);
                report.failed.push(layout::stream_prefix(&name));
                failures += 1;
                continue;
            }
        };
        let have: BTreeSet<String> = target
            .storage
            .list(&layout::stream_prefix(&name))?
            .into_iter()
            .map(|m| m.key)
            .collect();
        let mut copied = 0;
        let mut cut = false;
        for c in chain.used.iter().filter(|c| !have.contains(&c.key)) {
            if dry_run {
                copied += 1;
                continue;
            }
            match target.copy_object_from(src, &c.key) {
                Ok(_) => copied += 1,
                Err(Error::NotFound(_)) => {
                    cut = true;
                    break;
                }
                Err(e) => {
                    eprintln!("streamed tail {name}: {} from {}: {e}", c.key, src.name);
                    report.failed.push(c.key.clone());
                    failures += 1;
                    cut = true;
                    break;
                }
            }
        }
        let start = segno.saturating_mul(seg);
        let mut end = start + chain.bytes.len() as u64;
        if !dry_run {
            target.storage.flush()?;
            // What the target serves now, read as archive-get reads it.
            match crate::stream::read_chain(target, tli, segno) {
                Ok(Some(t)) => {
                    let n = t.bytes.len().min(chain.bytes.len());
                    if t.bytes[..n] != chain.bytes[..n] {
                        eprintln!(
                            "streamed tail {name}: the chunks in {} do not hold the bytes of {}'s: check both with verify; archive-get in {} may serve the wrong tail until it is moved aside",
                            target.name, src.name, target.name
                        );
                        report.failed.push(layout::stream_prefix(&name));
                        failures += 1;
                        continue;
                    }
                    end = start + t.bytes.len() as u64;
                }
                Ok(None) if cut => continue,
                Ok(None) => {
                    return Err(Error::Repository(format!(
                        "repository {}: the streamed tail {name} just copied is not listed",
                        target.name
                    )))
                }
                Err(e) => {
                    eprintln!(
                        "streamed tail {name}: the copy in {} does not read back: {e}",
                        target.name
                    );
                    report.failed.push(layout::stream_prefix(&name));
                    failures += 1;
                    continue;
                }
            }
        }
        report.stream_chunks_copied += copied;
        report.stream_tail = Some(name);
        report.stream_tail_end = Some(wal::format_lsn(end));
    }
    // The target's chunks of segments it holds whole or as .partial: no
    // longer its tail (only keys listed here are deleted: a receiver
    // writing into the target is past these segments).
    let held = crate::stream::Held::list(target)?;
    let listing = crate::stream::list_streamed(target)?;
    for (&(tli, segno), s) in &listing.segments {
        if !held.stored(tli, segno) {
            continue;
        }
        for c in &s.chunks {
            if !dry_run {
                target.storage.delete(&c.key)?;
            }
            report.stream_chunks_removed += 1;
        }
    }
    Ok(failures)
}

pub fn run(cfg: &Config, args: &Args) -> Result<()> {
    if cfg.repos.len() < 2 {
        return Err(Error::Invalid(
            "repo-sync needs at least two repositories ([[repo]] entries in the configuration)"
                .into(),
        ));
    }
    if let Some(n) = &args.to {
        cfg.find_repo(Some(n))?;
    }
    let mut repos = Vec::new();
    for rc in &cfg.repos {
        let repo = Repository::open_repo(cfg, rc)?;
        let h = holdings(&repo)?;
        repos.push((repo, h));
    }
    // The keys lock of every repository for the whole run (taken once each
    // opened: locking a posix location creates its directory): repo-sync
    // copies key files and objects as they are, which must not interleave
    // with a key operation (a `key retire` between two repositories would
    // get back an object sealed by the key it is removing, or the key file
    // itself). Dry runs copy nothing and take none.
    let mut _keys_locks = Vec::new();
    if !args.dry_run {
        for rc in &cfg.repos {
            _keys_locks.push(crate::lock::keys(rc)?);
        }
    }
    let sysid = repos[0].0.descriptor.system_identifier.clone();
    if let Some((r, _)) = repos
        .iter()
        .find(|(r, _)| r.descriptor.system_identifier != sysid)
    {
        return Err(Error::Repository(format!(
            "repository {} belongs to another cluster (system {}, not {sysid})",
            r.name, r.descriptor.system_identifier
        )));
    }
    let mut failures = 0;
    for t in 0..repos.len() {
        let (target, have) = &repos[t];
        if args.to.as_deref().is_some_and(|n| n != target.name) {
            continue;
        }
        let mut report = Report {
            repository: target.name.clone(),
            ..Default::default()
        };
        let sources: Vec<&(Repository, Holdings)> = repos
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != t)
            .map(|(_, r)| r)
            .collect();
        // Keys first: every object copied after them can be read.
        for (src, h) in &sources {
            for key in h.keys.difference(&have.keys) {
                if !args.dry_run {
                    let body = src.read_raw(key)?;
                    target
                        .storage
                        .put_new(key, &mut &body[..], crate::storage::Durability::Now)?;
                }
                report.keys_copied += 1;
            }
        }
        let mut copy = |key: &str, label: &str, report: &mut Report| -> bool {
            if args.dry_run {
                return true;
            }
            for (src, h) in &sources {
                if !h.objects.contains(key) {
                    continue;
                }
                match target.copy_object_from(src, key) {
                    Ok(_) => return true,
                    Err(e) => {
                        eprintln!("{label}: from {}: {e}", src.name);
                    }
                }
            }
            report.failed.push(key.to_string());
            failures += 1;
            false
        };
        // Which backups the target lacks, from the first source holding an
        // intact manifest of each. Ids sort by start time.
        let tombstones = tombstones(target)?;
        let mut unsatisfied = 0;
        let mut wanted: BTreeMap<String, (usize, BackupSummary)> = BTreeMap::new();
        let mut skipped: BTreeSet<String> = BTreeSet::new();
        let candidates: BTreeSet<&String> = sources
            .iter()
            .flat_map(|(_, h)| h.backups.keys())
            .filter(|id| !have.backups.contains_key(*id))
            .collect();
        for id in candidates {
            // The target's retention removed it: not brought back.
            if tombstones.contains(id) {
                skipped.insert(id.clone());
                continue;
            }
            let mut damaged = Vec::new();
            for (i, (src, h)) in sources.iter().enumerate() {
                if !h.backups.contains_key(id) {
                    continue;
                }
                // A damaged manifest is not copied; another source's may be.
                // Summarized at once: one whole manifest held at a time.
                match src.find_backup(id) {
                    Ok(m) => {
                        wanted.insert(id.clone(), (i, m.summary()));
                        break;
                    }
                    Err(e @ Error::Corrupt { .. }) => damaged.push(format!("{}: {e}", src.name)),
                    Err(e) => return Err(e),
                }
            }
            if !wanted.contains_key(id) {
                for d in &damaged {
                    eprintln!("backup {id}: not copied from {d}");
                }
                report.failed.push(layout::manifest(id));
                unsatisfied += 1;
            }
        }
        // Nor anything built on what it removed (its chain is incomplete
        // there). Repeated until stable: bases need not sort first.
        loop {
            let before = skipped.len();
            for (id, (_, m)) in &wanted {
                let mut needs = m.depends_on.iter().chain(m.based_on.as_ref());
                if !skipped.contains(id)
                    && needs.any(|d| tombstones.contains(d) || skipped.contains(d))
                {
                    skipped.insert(id.clone());
                }
            }
            if skipped.len() == before {
                break;
            }
        }
        wanted.retain(|id, _| !skipped.contains(id));
        report.backups_skipped_expired = skipped.into_iter().collect();

        // WAL before the start of the oldest backup the target will hold
        // is not copied: no restore from the target can use it, and its
        // expire (with a policy from the configuration or from the SQL
        // catalog's flags, which this host cannot know) removed it. With no
        // backup to hold, everything is copied.
        let seg = crate::commands::info::checked_seg_size(target)?;
        let cutoff = target
            .scan_backups()?
            .backups
            .iter()
            .chain(wanted.values().map(|(_, m)| m))
            .map(|m| (wal::lsn_segno(m.start_lsn(), seg), m.wal_start.clone()))
            .min();
        let missing_wal: BTreeSet<&String> = sources
            .iter()
            .flat_map(|(_, h)| h.wal.iter())
            .filter(|k| !have.wal.contains(*k))
            .collect();
        for key in missing_wal {
            if let Some((cut, first)) = &cutoff {
                if wal_segno(key, seg).is_some_and(|n| n < *cut) {
                    report.wal_skipped += 1;
                    report.wal_skipped_before = Some(first.clone());
                    continue;
                }
            }
            if copy(key, key, &mut report) {
                report
                    .wal_copied
                    .push(key.rsplit('/').next().unwrap_or(key).to_string());
            }
        }
        if !args.dry_run {
            target.storage.flush()?;
        }
        let tail_failures = sync_stream_tail(target, &sources, args.dry_run, &mut report)?;
        for (id, (i, m)) in &wanted {
            let keys = &sources[*i].1.backups[id];
            let manifest = layout::manifest(id);
            // A diff/incr refers to earlier backups' objects: those
            // backups (copied before it, ids sort by time) must be there.
            if let Some(dep) = m
                .depends_on
                .iter()
                .find(|d| !have.backups.contains_key(*d) && !report.backups_copied.contains(*d))
            {
                if !args.dry_run {
                    eprintln!(
                        "backup {id}: not copied, it is based on backup {dep}, which {} does not hold",
                        target.name
                    );
                    report.failed.push(manifest.clone());
                    unsatisfied += 1;
                    continue;
                }
            }
            // An earlier interrupted copy may have left some files: they
            // are kept (identical bytes) and only the rest is copied.
            let mut ok = true;
            for key in keys.iter().filter(|k| **k != manifest) {
                if target.storage.head(key)?.is_some() {
                    continue;
                }
                ok &= copy(key, &format!("backup {id}"), &mut report);
            }
            if ok && !args.dry_run {
                target.storage.flush()?;
            }
            if ok && copy(&manifest, &format!("backup {id}"), &mut report) {
                if !args.dry_run {
                    target.storage.flush()?;
                }
                report.backups_copied.push(id.clone());
            }
        }
        failures += unsatisfied + tail_failures;
        if !args.dry_run {
            target.storage.flush()?;
        }
        let verb = if args.dry_run { "would copy" } else { "copied" };
        if args.json {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
        } else {
            println!(
                "{}: {verb} {} WAL files, {} backups{}{}{}{}{}",
                report.repository,
                report.wal_copied.len(),
                report.backups_copied.len(),
                if report.keys_copied > 0 {
                    format!(", {} keys", report.keys_copied)
                } else {
                    String::new()
                },
                if report.backups_skipped_expired.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; not copied, expired here: {}",
                        report.backups_skipped_expired.join(" ")
                    )
                },
                match (&report.stream_tail, &report.stream_tail_end) {
                    (Some(seg), Some(end)) => format!(
                        "; streamed tail {seg} up to {end} ({} chunks {verb})",
                        report.stream_chunks_copied
                    ),
                    _ => String::new(),
                },
                match &report.wal_skipped_before {
                    Some(first) => format!(
                        "; {} WAL files before {first} not copied (older than its oldest backup)",
                        report.wal_skipped
                    ),
                    None => String::new(),
                },
                if report.failed.is_empty() {
                    String::new()
                } else {
                    format!("; {} objects FAILED", report.failed.len())
                }
            );
        }
    }
    if failures > 0 {
        return Err(Error::VerifyFailed(format!(
            "{failures} objects could not be copied (see above); the repositories are not in step"
        )));
    }
    Ok(())
}
