//! `expire`: removes the backups no retention policy keeps (never one that a
//! kept backup is built on), then the WAL that no kept backup needs (every
//! segment before the oldest kept backup's start). The rules are in
//! `retention`; this command applies them to each repository with that
//! repository's own policy (or to the one `--repo` names).
//!
//! Order and safety: it holds the repository's backup lock (an incremental
//! backup refers to earlier backups' objects); for each backup removed it
//! writes a tombstone `expired/<id>` first (so that repo-sync does not copy
//! the backup back from another repository), then deletes the manifest, so
//! a backup half-removed by a crash is an incomplete one, which the next
//! backup or expire clears; WAL goes after the backups. A tombstone whose
//! backup still exists (a crash between the two) is harmless: the backup is
//! still listed and the next expire removes it again.
//!
//! A backup whose manifest is damaged is never removed, nor are the backups
//! a damaged diff/incr may be built on; each run reports them. Only keys
//! `layout` accepts are deleted; tombstones never are.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use pg_backup_contract::{Event, ExpireReport, KeptBackup, RemovedBackup, RetentionPolicy};
use serde::{Deserialize, Serialize};

use crate::commands::backup::remove_incomplete;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::layout;
use crate::manifest::BackupSummary;
use crate::repo::{DamagedBackup, Repository};
use crate::retention::{self, BackupRef, Kind, Policy};
use crate::wal::{self, WalFileKind};

#[derive(Default)]
pub struct Args {
    pub dry_run: bool,
    pub json: bool,
    pub repo: Option<String>,
    pub keep_full: Option<u32>,
    pub recovery_window: Option<String>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    pub timezone: Option<String>,
    /// Decide as if it were this moment (what-if runs and tests).
    pub now: Option<String>,
}

impl Args {
    fn has_policy_flags(&self) -> bool {
        self.keep_full.is_some()
            || self.recovery_window.is_some()
            || self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
            || self.keep_yearly.is_some()
    }

    /// The flags' policy if any retention flag is given (it replaces the
    /// configured one), else the repository's configured policy.
    fn policy(&self, configured: Policy) -> Result<Policy> {
        let mut p = if self.has_policy_flags() {
            Policy {
                keep_full: self.keep_full.filter(|n| *n > 0),
                recovery_window: match &self.recovery_window {
                    Some(w) => Some(
                        retention::parse_duration(w)
                            .map_err(|e| Error::Invalid(format!("--recovery-window: {e}")))?,
                    ),
                    None => None,
                },
                keep_daily: self.keep_daily.unwrap_or(0),
                keep_weekly: self.keep_weekly.unwrap_or(0),
                keep_monthly: self.keep_monthly.unwrap_or(0),
                keep_yearly: self.keep_yearly.unwrap_or(0),
                timezone: configured.timezone,
            }
        } else {
            configured
        };
        if let Some(tz) = &self.timezone {
            p.timezone = tz.parse().map_err(|_| {
                Error::Invalid(format!(
                    "--timezone '{tz}' is not an IANA time zone name (e.g. UTC, Europe/Berlin)"
                ))
            })?;
        }
        Ok(p)
    }
}

/// The policy as the report (docs/contract.md) and tombstones show it.
pub fn policy_report(p: &Policy) -> RetentionPolicy {
    RetentionPolicy {
        keep_full: p.keep_full,
        recovery_window: p.recovery_window.map(retention::format_duration),
        keep_daily: p.keep_daily,
        keep_weekly: p.keep_weekly,
        keep_monthly: p.keep_monthly,
        keep_yearly: p.keep_yearly,
        timezone: p.timezone.name().to_string(),
    }
}

fn kind_of(m: &BackupSummary) -> Kind {
    match m.kind.as_str() {
        "diff" => Kind::Diff,
        "incr" => Kind::Incr,
        _ => Kind::Full,
    }
}

/// A tombstone (`expired/<id>`): this repository's retention removed backup
/// `id`. repo-sync reads the listing only (it never copies one into another
/// repository, nor a backup that has one in its target); the body says
/// what was removed, when and by which policy, for people and `verify`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tombstone {
    pub backup_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub stop_time: String,
    pub expired_at: String,
    pub policy: RetentionPolicy,
}

/// A tombstone is a few hundred bytes; anything far larger is not one.
pub const TOMBSTONE_MAX: usize = 64 << 10;

/// Reads backup `id`'s tombstone from `repo`: decoded and authenticated
/// like every object (bound to its key), then checked to name `id`.
pub fn read_tombstone(repo: &Repository, id: &str) -> Result<Tombstone> {
    let key = layout::tombstone(id);
    let body = repo.read_object_capped(&key, TOMBSTONE_MAX)?;
    let t: Tombstone = serde_json::from_slice(&body).map_err(|e| Error::Corrupt {
        key: key.clone(),
        reason: format!("tombstone is not valid JSON: {e}"),
    })?;
    if t.backup_id != id {
        return Err(Error::Corrupt {
            key,
            reason: format!("tombstone names backup {}, not {id}", t.backup_id),
        });
    }
    Ok(t)
}

/// Writes backup `m`'s tombstone, durably, before anything of it is
/// deleted: from then on repo-sync does not copy it back into `repo`. One
/// already there (a crash after it, before the manifest went) is kept.
fn write_tombstone(repo: &Repository, m: &BackupSummary, policy: &Policy) -> Result<()> {
    let t = Tombstone {
        backup_id: m.id.clone(),
        kind: m.kind.clone(),
        stop_time: m.stop_time.clone(),
        expired_at: Utc::now().to_rfc3339(),
        policy: policy_report(policy),
    };
    let body = serde_json::to_vec(&t).map_err(|e| Error::Invalid(e.to_string()))?;
    repo.put_object(&layout::tombstone(&m.id), &body[..])?;
    Ok(())
}

/// Expires every configured repository, each with its own policy (or the
/// one `--repo` names). Retention flags need `--repo` when there are
/// several: one policy for all would defeat per-repository retention. A
/// repository that fails is reported and the others are still expired.
pub fn run(cfg: &Config, args: &Args) -> Result<()> {
    let targets: Vec<&crate::config::RepoConfig> = match &args.repo {
        Some(n) => vec![cfg.find_repo(Some(n))?],
        None if cfg.repos.len() > 1 && (args.has_policy_flags() || args.timezone.is_some()) => {
            return Err(Error::Invalid(format!(
                "retention flags (--keep-full, --recovery-window, --keep-daily, ..., --timezone) apply to one repository: name it with --repo ({}); without them, expire applies each repository's configured policy",
                cfg.repos
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
        None => cfg.repos.iter().collect(),
    };
    let now: DateTime<Utc> = match &args.now {
        Some(t) => crate::commands::restore::parse_time(t)
            .map_err(|_| {
                Error::Invalid(format!(
                    "--now '{t}' is not a time with a zone, e.g. '2026-11-21 10:15:00+00'"
                ))
            })?
            .into(),
        None => Utc::now(),
    };
    if targets.len() == 1 {
        return expire_one(cfg, targets[0], args, now);
    }
    let mut failed: Vec<(String, i32)> = Vec::new();
    for rc in &targets {
        if let Err(e) = expire_one(cfg, rc, args, now) {
            eprintln!("walshipper: repository {}: {e}", rc.name);
            if args.json {
                crate::progress::event(&e.event(Some(&rc.name)));
            }
            failed.push((rc.name.clone(), e.exit_code()));
        }
    }
    match failed.first() {
        None => Ok(()),
        Some((_, code)) => Err(Error::Partial {
            code: *code,
            message: format!(
                "expire failed on {} of {} repositories ({}); the others were expired",
                failed.len(),
                targets.len(),
                failed
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Expires one repository with its configured policy (or the flags').
fn expire_one(
    cfg: &Config,
    rc: &crate::config::RepoConfig,
    args: &Args,
    now: DateTime<Utc>,
) -> Result<()> {
    let configured = rc
        .retention_policy()
        .map_err(|e| Error::Config(format!("repository {}: {e}", rc.name)))?;
    let policy = args.policy(configured)?;
    let repo = Repository::open_repo(cfg, rc)?;
    // A dry run changes nothing and may run beside a backup.
    let lock = if args.dry_run {
        None
    } else {
        Some(crate::lock::repository(
            rc,
            &repo.descriptor.system_identifier,
        )?)
    };
    if !args.dry_run {
        remove_incomplete(&repo)?;
    }
    // Every manifest read whole, never the summary cache: expire deletes,
    // and what each backup depends on must come from the store itself.
    let scan = repo.scan_backups_fresh()?;
    let backups = scan.backups;
    for d in &scan.damaged {
        tracing::warn!(
            "backup {}: manifest damaged ({}); kept, not expired: repair it from another repository (repo-sync) or remove {} by hand",
            d.id,
            d.reason,
            layout::backup_prefix(&d.id)
        );
    }
    let mut report = ExpireReport {
        dry_run: args.dry_run,
        repository: repo.name.clone(),
        policy: policy_report(&policy),
        kept: Vec::new(),
        removed: Vec::new(),
        damaged: scan.damaged,
        wal_removed: 0,
        wal_removed_first: None,
        wal_removed_last: None,
        stream_chunks_removed: 0,
        bytes_freed: 0,
        restorable_from: None,
    };

    let refs: Vec<BackupRef> = backups
        .iter()
        .map(|m| BackupRef {
            id: m.id.clone(),
            kind: kind_of(m),
            // A backup whose time cannot be read is treated as new: kept.
            stop_time: m
                .stop_time()
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            depends_on: m
                .depends_on
                .iter()
                .cloned()
                .chain(m.based_on.clone())
                .collect(),
        })
        .collect();
    let mut decision = retention::decide(&refs, &policy, now);
    keep_bases_of_damaged(&mut decision, &backups, &report.damaged);
    let removed: BTreeSet<&str> = decision.remove.iter().map(String::as_str).collect();
    // The rules keep every dependency of a kept backup; checked again here
    // against the objects themselves, because a mistake would lose data.
    for m in backups.iter().filter(|m| !removed.contains(m.id.as_str())) {
        if let Some(d) = m.depends_on.iter().find(|d| removed.contains(d.as_str())) {
            return Err(Error::Invalid(format!(
                "internal error: backup {} needs {d}, which the policy would remove; nothing was removed",
                m.id
            )));
        }
    }
    for m in &backups {
        if let Some(reasons) = decision.keep.get(&m.id) {
            report.kept.push(KeptBackup {
                id: m.id.clone(),
                kind: m.kind.clone(),
                stop_time: m.stop_time.clone(),
                reasons: reasons.clone(),
            });
        }
    }
    let kept: Vec<&BackupSummary> = backups
        .iter()
        .filter(|m| !removed.contains(m.id.as_str()))
        .collect();
    report.restorable_from = kept
        .iter()
        .filter_map(|m| m.stop_time())
        .min()
        .map(|t| t.to_rfc3339());

    // Newest first: a backup goes before those it is built on, so a crash
    // half-way never leaves one whose base is gone.
    for id in decision.remove.iter().rev() {
        let Some(m) = backups.iter().find(|m| &m.id == id) else {
            continue;
        };
        let prefix = layout::backup_prefix(id);
        let size: u64 = repo
            .storage
            .list(&prefix)?
            .iter()
            .fold(0u64, |a, o| a.saturating_add(o.size));
        if !args.dry_run {
            if let Some(l) = &lock {
                l.ensure_held()?;
            }
            // The tombstone first (repo-sync must not copy it back here),
            // then the manifest: from then on the backup does not exist.
            write_tombstone(&repo, m, &policy)?;
            repo.storage.delete(&layout::manifest(id))?;
            repo.storage.delete_prefix(&prefix)?;
            tracing::info!("expired backup {id} ({} backup)", m.kind);
        }
        report.bytes_freed = report.bytes_freed.saturating_add(size);
        report.removed.push(RemovedBackup {
            id: id.clone(),
            kind: m.kind.clone(),
            stop_time: m.stop_time.clone(),
            stored_size: size,
        });
    }

    // WAL before the oldest kept backup's start is needed by nothing kept
    // (recovery from a backup reads WAL from its start on, on any timeline).
    // Without a policy, nothing is removed at all.
    let seg = crate::commands::info::checked_seg_size(&repo)?;
    let cutoff = kept
        .iter()
        .map(|m| wal::lsn_segno(m.start_lsn(), seg))
        .min();
    if let (Some(cutoff), false) = (cutoff, policy.is_empty()) {
        let mut doomed: Vec<(String, u64)> = Vec::new();
        for obj in repo.storage.list(layout::WAL_PREFIX)? {
            // Only keys walshipper writes, with segment numbers PostgreSQL
            // could write, are ever deleted; anything else is left alone.
            let Some(layout::ObjectName::Wal { kind, .. }) = layout::parse(&obj.key) else {
                tracing::warn!("ignoring {:?}: not a WAL file walshipper stores", obj.key);
                continue;
            };
            let segno = match kind {
                WalFileKind::Segment { log, seg: s, .. }
                | WalFileKind::BackupHistory { log, seg: s, .. } => {
                    match crate::commands::info::segno_of(log, s, seg) {
                        Some(n) => n,
                        None => {
                            tracing::warn!(
                                "ignoring {:?}: not a segment PostgreSQL writes",
                                obj.key
                            );
                            continue;
                        }
                    }
                }
                // Timeline history files are tiny and recovery reads them all.
                WalFileKind::History { .. } => continue,
            };
            if segno < cutoff {
                doomed.push((obj.key.clone(), obj.size));
            }
        }
        doomed.sort();
        let names: Vec<&str> = doomed
            .iter()
            .map(|(k, _)| k.rsplit('/').next().unwrap_or_default())
            .collect();
        report.wal_removed_first = names.first().map(|s| s.to_string());
        report.wal_removed_last = names.last().map(|s| s.to_string());
        report.wal_removed = doomed.len() as u64;
        if let Some(l) = lock.as_ref().filter(|_| !args.dry_run) {
            l.ensure_held()?;
        }
        for (key, size) in &doomed {
            if !args.dry_run {
                repo.storage.delete(key)?;
            }
            report.bytes_freed = report.bytes_freed.saturating_add(*size);
        }
    }
    if !policy.is_empty() {
        if let Some(l) = lock.as_ref().filter(|_| !args.dry_run) {
            l.ensure_held()?;
        }
        let (n, bytes) = expire_stream(&repo, cutoff, args.dry_run)?;
        report.stream_chunks_removed = n;
        report.bytes_freed = report.bytes_freed.saturating_add(bytes);
    }
    if !args.dry_run {
        repo.storage.flush()?;
    }

    report.removed.reverse();
    if args.json {
        crate::progress::event(&Event::Expire(report));
        return Ok(());
    }
    for d in &report.damaged {
        println!(
            "keep   {} DAMAGED manifest, never expired: {}",
            d.id, d.reason
        );
    }
    if policy.is_empty() {
        println!(
            "{}: no retention policy (set retention_* in [repo] or pass --keep-full, --recovery-window, --keep-daily, ...): nothing removed",
            report.repository
        );
        return Ok(());
    }
    let verb = if args.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for k in &report.kept {
        println!("keep   {} {:<4} {}", k.id, k.kind, k.reasons.join(", "));
    }
    for r in &report.removed {
        println!("{verb} {} {:<4} (ended {})", r.id, r.kind, r.stop_time);
    }
    for d in &report.damaged {
        println!(
            "keep   {} DAMAGED manifest, never expired: {}",
            d.id, d.reason
        );
    }
    match (&report.wal_removed_first, &report.wal_removed_last) {
        (Some(a), Some(b)) => println!("{verb} {} WAL files, {a} .. {b}", report.wal_removed),
        _ => println!("no WAL to remove"),
    }
    if report.stream_chunks_removed > 0 {
        println!(
            "{verb} {} streamed chunks (stream/) of segments stored whole or older than the oldest backup",
            report.stream_chunks_removed
        );
    }
    println!(
        "{}: {verb} {} backups, {} MiB{}",
        report.repository,
        report.removed.len(),
        report.bytes_freed >> 20,
        report
            .restorable_from
            .as_ref()
            .map(|t| format!("; restorable from {t}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Removes the chunk objects of streamed segments (`stream/`) that nothing
/// needs: those of a segment `wal/` holds whole or as `.partial` (leftovers
/// of a receiver killed while deleting them), and those of segments before
/// `cutoff` (older than every kept backup's start, like the WAL). Never the
/// chunks of the segment a receiver may be filling now
/// (`stream::receiver_segment`): the receiver takes no lock, so this deletes
/// only keys it listed, of segments the receiver is past; a chunk the
/// receiver writes or merges meanwhile is never one of them. Returns the
/// chunks and stored bytes removed (or that would be, in a dry run).
fn expire_stream(repo: &Repository, cutoff: Option<u64>, dry_run: bool) -> Result<(u64, u64)> {
    let listing = crate::stream::list_streamed(repo)?;
    if listing.segments.is_empty() {
        return Ok((0, 0));
    }
    let held = crate::stream::Held::list(repo)?;
    let filling = crate::stream::receiver_segment(&listing, |t, s| held.stored(t, s));
    let (mut n, mut bytes) = (0u64, 0u64);
    for (&(tli, segno), s) in &listing.segments {
        let doomed = Some((tli, segno)) != filling
            && (held.stored(tli, segno) || cutoff.is_some_and(|c| segno < c));
        if !doomed {
            continue;
        }
        for c in &s.chunks {
            if !dry_run {
                repo.storage.delete(&c.key)?;
            }
            n += 1;
        }
        bytes = bytes.saturating_add(s.stored);
        tracing::info!(
            "{} the streamed chunks of {}",
            if dry_run { "would remove" } else { "removed" },
            s.name
        );
    }
    Ok((n, bytes))
}

/// A damaged diff or incr cannot say which backups it is built on, so the
/// ones it may be (the newest full before it and everything after that
/// full) are kept with it: expire never takes data a damaged backup might
/// need if its manifest is repaired (from another repository).
fn keep_bases_of_damaged(
    decision: &mut retention::Decision,
    backups: &[BackupSummary],
    damaged: &[DamagedBackup],
) {
    for d in damaged {
        if !matches!(layout::backup_id_type(&d.id), Some("diff" | "incr")) {
            continue;
        }
        let from = backups
            .iter()
            .filter(|m| m.kind == "full" && m.id < d.id)
            .map(|m| m.id.as_str())
            .max()
            .unwrap_or_default();
        for m in backups
            .iter()
            .filter(|m| m.id.as_str() >= from && m.id < d.id)
        {
            decision
                .keep
                .entry(m.id.clone())
                .or_default()
                .push(format!("may be needed by damaged backup {}", d.id));
            decision.remove.retain(|r| *r != m.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::test_support::posix_repo;
    use crate::storage::Durability;

    fn plant(repo: &Repository, key: &str) {
        repo.storage
            .put_new(key, &mut &b"x"[..], Durability::Now)
            .unwrap();
    }

    #[test]
    fn streamed_chunks_go_with_the_wal_but_never_the_receivers_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (_cfg, repo) = posix_repo(dir.path(), 7_000_000_000_000_000_001);
        let seg = 16 << 20;
        let name = |t, s| wal::segment_name(t, s, seg);
        // Segment 5 whole with leftover chunks; segment 3 only streamed
        // (older than the cutoff); timeline 1's segment 7 stored as
        // .partial; the receiver filling timeline 2's segment 8, which is
        // behind the cutoff (it lags the newest backup).
        plant(&repo, &layout::wal_segment(1, 5, seg));
        plant(&repo, &layout::stream_chunk(&name(1, 5), 0, 0x2000));
        plant(&repo, &layout::stream_chunk(&name(1, 3), 0, 0x2000));
        plant(&repo, &layout::stream_chunk(&name(1, 3), 0x2000, 0x4000));
        let p = format!("{}.partial", name(1, 7));
        plant(&repo, &layout::wal(&p, &wal::parse_name(&p).unwrap()));
        plant(&repo, &layout::stream_chunk(&name(1, 7), 0, 0x2000));
        plant(&repo, &layout::stream_chunk(&name(2, 8), 0, 0x2000));
        plant(&repo, &layout::stream_chunk(&name(2, 8), 0x2000, 0x3000));
        // A dry run removes nothing.
        assert_eq!(expire_stream(&repo, Some(9), true).unwrap().0, 4);
        assert_eq!(repo.storage.list(layout::STREAM_PREFIX).unwrap().len(), 6);
        assert_eq!(expire_stream(&repo, Some(9), false).unwrap().0, 4);
        let left: Vec<String> = repo
            .storage
            .list(layout::STREAM_PREFIX)
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        assert_eq!(
            left,
            [
                layout::stream_chunk(&name(2, 8), 0, 0x2000),
                layout::stream_chunk(&name(2, 8), 0x2000, 0x3000)
            ]
        );
        // Without a cutoff (no backup kept), only the leftovers would go.
        plant(&repo, &layout::stream_chunk(&name(1, 3), 0, 0x2000));
        assert_eq!(expire_stream(&repo, None, false).unwrap().0, 0);
    }
}
