//! `info [--json]`: what the repository holds.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::Config;
use crate::error::Result;
use crate::layout;
use crate::repo::{DamagedBackup, Repository};
use crate::wal::{self, WalFileKind};

#[derive(Serialize)]
pub struct Info {
    pub repository: String,
    pub format_version: u32,
    pub system_identifier: String,
    pub pg_version: u32,
    pub wal_segment_size: u64,
    pub encryption: String,
    pub encrypted: bool,
    pub created_at: String,
    pub backups: Vec<BackupInfo>,
    /// Backups whose manifest is damaged: listed, never used.
    pub damaged_backups: Vec<DamagedBackup>,
    pub wal: WalInfo,
    /// Every configured repository, in configuration order (the detail
    /// above is for the first that opened, or the one named by --repo).
    pub repositories: Vec<RepoSummary>,
    /// Its recovery records (shown under `repositories`).
    #[serde(skip)]
    pub recoveries: Vec<crate::recovery_log::RecoveryRecord>,
    /// Bytes of every object it holds, as listed (shown under `repositories`).
    #[serde(skip)]
    pub stored_bytes: u64,
    /// When its current data key was created (encrypted repositories).
    #[serde(skip)]
    pub key_created_at: Option<String>,
    /// Its capacity (`collect_repo`; None from `collect` alone, which has
    /// no configuration to take a quota or minimum from).
    #[serde(skip)]
    pub capacity: Option<crate::storage::Capacity>,
    /// Its data keys (shown under `repositories`): current first, then
    /// newest first; counted only with `--key-usage`.
    #[serde(skip)]
    pub keys: Vec<pg_backup_contract::KeyStatus>,
    /// When they were counted (`--key-usage`); None: not counted.
    #[serde(skip)]
    pub keys_counted_at: Option<String>,
}

/// One configured repository as `info --json` lists it under
/// `repositories`: the extension reads these (docs/contract.md).
pub use pg_backup_contract::RepoStatus as RepoSummary;

/// A repository's line in `repositories` (what the extension stores in
/// backup.repository_status): what `collect_repo` found, or why not.
pub fn summary_of(rc: &crate::config::RepoConfig, info: &Result<Info>) -> RepoSummary {
    let mut s = RepoSummary {
        name: rc.name.clone(),
        kind: rc.kind.clone(),
        location: rc.location(),
        ok: info.is_ok(),
        error: info.as_ref().err().map(|e| e.to_string()),
        segments: 0,
        last_wal: None,
        backups: 0,
        last_backup: None,
        last_backup_stop_time: None,
        backup_ids: Vec::new(),
        recoveries: Vec::new(),
        // Unknown until the repository answers (below).
        capacity_source: "none".into(),
        ..Default::default()
    };
    if let Ok(i) = info {
        s.backup_ids = i.backups.iter().map(|b| b.id.clone()).collect();
        s.segments = i.wal.segments;
        s.last_wal = i.wal.timelines.last().map(|t| t.last.clone());
        s.backups = i.backups.len() as u64;
        s.last_backup = i.backups.last().map(|b| b.id.clone());
        s.last_backup_stop_time = i.backups.last().map(|b| b.stop_time.clone());
        s.recoveries = i.recoveries.clone();
        s.stored_bytes = i.stored_bytes;
        s.encryption = i.encryption.clone();
        s.key_created_at = i.key_created_at.clone();
        s.first_backup_stop_time = i.backups.first().map(|b| b.stop_time.clone());
        s.keys = i.keys.clone();
        s.keys_counted_at = i.keys_counted_at.clone();
        if let Some(c) = &i.capacity {
            s.capacity_bytes = c.capacity;
            s.free_bytes = c.free;
            s.capacity_source = c.source.to_string();
            s.min_free_bytes = c.min_free;
        }
    }
    s
}

/// Opens repository `rc`, collects its info, recovery records (after
/// `recoveries_after`) and capacity: everything `summary_of` reports. With
/// `key_usage`, counts the objects each data key seals (one header read
/// per object).
pub fn collect_repo(
    cfg: &Config,
    rc: &crate::config::RepoConfig,
    recoveries_after: Option<&str>,
    key_usage: bool,
) -> Result<Info> {
    let r = Repository::open_repo(cfg, rc)?;
    let mut i = collect(&r)?;
    i.recoveries = recoveries_of(&r, recoveries_after);
    i.capacity = Some(capacity_of(rc, &r, i.stored_bytes));
    if key_usage {
        count_keys(cfg, &r, &mut i);
    }
    Ok(i)
}

/// Replaces `info.keys` by the keys with their objects counted. A census
/// that cannot be taken (the store stopped answering) leaves the keys
/// uncounted (`keys_counted_at` None), logged: info reports the rest.
fn count_keys(cfg: &Config, repo: &Repository, info: &mut Info) {
    let counted = crate::census::count(repo, crate::census::default_jobs(cfg))
        .and_then(|c| crate::census::key_statuses(repo, Some(&c)).map(|keys| (keys, c.counted_at)));
    match counted {
        Ok((keys, at)) => {
            info.keys = keys;
            info.keys_counted_at = Some(at);
        }
        Err(e) => tracing::warn!(
            "repository {}: the objects per key could not be counted: {e}",
            repo.name
        ),
    }
}

/// The capacity of `repo` (configured as `rc`) holding `stored` bytes. A
/// file system that cannot be asked counts as unknown: info still reports
/// the rest.
pub fn capacity_of(
    rc: &crate::config::RepoConfig,
    repo: &Repository,
    stored: u64,
) -> crate::storage::Capacity {
    let space = repo.storage.space().unwrap_or_else(|e| {
        tracing::warn!("repository {}: its free space is unknown: {e}", repo.name);
        None
    });
    // `stored` is known already: this cannot fail.
    crate::storage::capacity(rc, space, || Ok(stored)).unwrap_or(crate::storage::Capacity {
        capacity: None,
        free: None,
        source: "none",
        min_free: 0,
    })
}

/// Bytes under the prefixes `collect` does not list for its own sake
/// (keys, recovery records, locks, expiry markers) and the descriptor. A
/// listing that fails is left out (logged): info still reports the rest.
fn other_stored_bytes(repo: &Repository) -> u64 {
    let mut n = match repo.storage.head(layout::DESCRIPTOR) {
        Ok(m) => m.map_or(0, |m| m.size),
        Err(e) => {
            tracing::warn!(
                "repository {}: stored bytes without the descriptor: {e}",
                repo.name
            );
            0
        }
    };
    for p in [
        layout::KEYS_PREFIX,
        layout::RECOVERIES_PREFIX,
        layout::LOCKS_PREFIX,
        layout::EXPIRED_PREFIX,
    ] {
        match repo.storage.list(p) {
            Ok(objects) => {
                for o in objects {
                    n = n.saturating_add(o.size);
                }
            }
            Err(e) => tracing::warn!("repository {}: stored bytes without {p}: {e}", repo.name),
        }
    }
    n
}

/// When the data key new objects are sealed with was created (its key
/// file's created_at); None when unencrypted or unreadable (logged: info
/// still reports the rest, verify names a bad key file).
fn key_created_at(repo: &Repository) -> Option<String> {
    let id = repo.descriptor.current_key_id.as_deref()?;
    let read = repo
        .read_raw(&layout::key_file(id))
        .and_then(|b| crate::keys::KeyFile::parse(id, &b));
    match read {
        Ok(f) => Some(f.created_at),
        Err(e) => {
            tracing::warn!(
                "repository {}: its current key file cannot be read: {e}",
                repo.name
            );
            None
        }
    }
}

/// The recovery records of `repo` after `after` (recovery_log::list). A
/// repository whose records cannot be listed still has its info shown.
fn recoveries_of(
    repo: &Repository,
    after: Option<&str>,
) -> Vec<crate::recovery_log::RecoveryRecord> {
    crate::recovery_log::list(repo, after).unwrap_or_else(|e| {
        tracing::warn!(
            "repository {}: its recovery records cannot be listed: {e}",
            repo.name
        );
        Vec::new()
    })
}

#[derive(Serialize)]
pub struct BackupInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub based_on: Option<String>,
    pub label: String,
    pub timeline: u32,
    pub start_time: String,
    pub stop_time: String,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub wal_start: String,
    pub wal_stop: String,
    pub size: u64,
    pub stored_size: u64,
    pub files: usize,
    pub checksum_failures: usize,
}

#[derive(Serialize, Default)]
pub struct WalInfo {
    pub segments: u64,
    pub size_plain: u64,
    pub size_stored: u64,
    pub timelines: Vec<TimelineInfo>,
    pub history_files: Vec<String>,
    pub backup_history_files: Vec<String>,
    pub partial_files: Vec<String>,
    /// The streamed tail (`wal-receive`'s chunks of the segment after the
    /// last whole one), from the listing: `verify` reads it back.
    pub stream_tail: Option<pg_backup_contract::StreamTail>,
    /// Streamed segments with chunk objects (the tail, and leftovers
    /// expire removes), and their stored bytes.
    pub stream_segments: u64,
    pub stream_stored: u64,
    /// Keys under wal/ that are no WAL file PostgreSQL writes (or not where
    /// walshipper stores one): ignored.
    pub foreign: Vec<String>,
}

#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub first: String,
    pub last: String,
    pub segments: u64,
}

#[derive(Serialize, Debug)]
pub struct TimelineInfo {
    pub timeline: u32,
    pub first: String,
    pub last: String,
    pub segments: u64,
    pub ranges: Vec<Range>,
    pub gaps: Vec<Range>,
}

/// Segment number of a segment name's log/seg parts, if PostgreSQL could
/// have written it: `seg` below the segments per log file, no overflow.
/// Names from a listing are untrusted; None marks a foreign one.
pub fn segno_of(log: u32, seg: u32, seg_size: u64) -> Option<u64> {
    let per = 0x1_0000_0000u64.checked_div(seg_size).filter(|p| *p > 0)?;
    if u64::from(seg) >= per {
        return None;
    }
    u64::from(log).checked_mul(per)?.checked_add(u64::from(seg))
}

/// Groups segment numbers of one timeline (any order, duplicates allowed)
/// into runs and the gaps between them.
pub fn ranges_and_gaps(tli: u32, segnos: &[u64], seg_size: u64) -> (Vec<Range>, Vec<Range>) {
    let mut sorted = segnos.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for s in sorted {
        match ranges.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(s) => *end = s,
            _ => ranges.push((s, s)),
        }
    }
    let name = |s| wal::segment_name(tli, s, seg_size);
    // Sorted and deduplicated: each run starts at least two past the
    // previous one's end, so none of this can underflow.
    let gaps = ranges
        .windows(2)
        .map(|w| Range {
            first: name(w[0].1 + 1),
            last: name(w[1].0 - 1),
            segments: w[1].0 - w[0].1 - 1,
        })
        .collect();
    let ranges = ranges
        .into_iter()
        .map(|(a, b)| Range {
            first: name(a),
            last: name(b),
            segments: b - a + 1,
        })
        .collect();
    (ranges, gaps)
}

/// The repository's segment size, if it is one PostgreSQL allows (a power
/// of two from 1 MiB to 1 GiB): everything derived from it divides by it.
pub fn checked_seg_size(repo: &Repository) -> Result<u64> {
    let s = repo.descriptor.wal_segment_size;
    if s.is_power_of_two() && ((1 << 20)..=(1 << 30)).contains(&s) {
        Ok(s)
    } else {
        Err(crate::error::Error::Repository(format!(
            "repository.json: wal_segment_size {s} is not a power of two from 1 MiB to 1 GiB; the descriptor is damaged"
        )))
    }
}

pub fn collect(repo: &Repository) -> Result<Info> {
    let d = &repo.descriptor;
    let seg_size = checked_seg_size(repo)?;
    let mut wal_info = WalInfo::default();
    let mut per_tli: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut held = crate::stream::Held::default();
    for obj in repo.storage.list(layout::WAL_PREFIX)? {
        wal_info.size_stored = wal_info.size_stored.saturating_add(obj.size);
        let Some(layout::ObjectName::Wal { name, kind }) = layout::parse(&obj.key) else {
            wal_info.foreign.push(obj.key);
            continue;
        };
        match kind {
            WalFileKind::Segment {
                tli,
                log,
                seg,
                partial,
            } => {
                let Some(segno) = segno_of(log, seg, seg_size) else {
                    wal_info.foreign.push(obj.key);
                    continue;
                };
                wal_info.size_plain = wal_info.size_plain.saturating_add(seg_size);
                if partial {
                    held.partial.insert((tli, segno));
                    wal_info.partial_files.push(name);
                } else {
                    held.whole.insert((tli, segno));
                    per_tli.entry(tli).or_default().push(segno);
                    wal_info.segments += 1;
                }
            }
            WalFileKind::History { .. } => wal_info.history_files.push(name),
            WalFileKind::BackupHistory { .. } => wal_info.backup_history_files.push(name),
        }
    }
    let streamed = crate::stream::list_streamed(repo)?;
    wal_info.stream_tail = crate::stream::describe_tail(&streamed, &held, seg_size, |tli| {
        crate::stream::Ancestry::read_or_own(repo, tli)
    });
    wal_info.stream_segments = streamed.segments.len() as u64;
    wal_info.stream_stored = streamed.segments.values().map(|s| s.stored).sum();
    if !wal_info.foreign.is_empty() {
        tracing::warn!(
            "{} object(s) under wal/ are no WAL file walshipper stores, e.g. {:?}: ignored",
            wal_info.foreign.len(),
            wal_info.foreign[0]
        );
    }
    for (tli, segnos) in per_tli {
        let (ranges, gaps) = ranges_and_gaps(tli, &segnos, seg_size);
        wal_info.timelines.push(TimelineInfo {
            timeline: tli,
            first: ranges.first().map(|r| r.first.clone()).unwrap_or_default(),
            last: ranges.last().map(|r| r.last.clone()).unwrap_or_default(),
            segments: ranges.iter().map(|r| r.segments).sum(),
            ranges,
            gaps,
        });
    }
    let (scan, backups_bytes) = repo.scan_backups_sized()?;
    // The listings above, not another of everything.
    let stored_bytes = wal_info
        .size_stored
        .saturating_add(wal_info.stream_stored)
        .saturating_add(backups_bytes)
        .saturating_add(other_stored_bytes(repo));
    let backups = scan
        .backups
        .into_iter()
        .map(|m| BackupInfo {
            files: m.files,
            checksum_failures: m.checksum_failure_blocks,
            id: m.id,
            kind: m.kind,
            based_on: m.based_on,
            label: m.label,
            timeline: m.timeline,
            start_time: m.start_time,
            stop_time: m.stop_time,
            start_lsn: m.start_lsn,
            stop_lsn: m.stop_lsn,
            wal_start: m.wal_start,
            wal_stop: m.wal_stop,
            size: m.size,
            stored_size: m.stored_size,
        })
        .collect();
    let keys = crate::census::key_statuses(repo, None)?;
    Ok(Info {
        keys,
        keys_counted_at: None,
        backups,
        damaged_backups: scan.damaged,
        repository: repo.storage.describe(),
        format_version: d.format_version,
        system_identifier: d.system_identifier.clone(),
        pg_version: d.pg_version,
        wal_segment_size: seg_size,
        encryption: d.encryption.clone(),
        encrypted: d.encrypted(),
        created_at: d.created_at.clone(),
        wal: wal_info,
        repositories: Vec::new(),
        recoveries: Vec::new(),
        stored_bytes,
        key_created_at: key_created_at(repo),
        capacity: None,
    })
}

/// Capacity, free space and the minimum a backup leaves, in words.
fn capacity_line(c: &crate::storage::Capacity) -> String {
    let room = match (c.capacity, c.free) {
        (Some(t), Some(f)) => format!("{} free of {} ({})", human(f), human(t), c.source),
        _ => "unknown (no file system to ask and no quota configured)".to_string(),
    };
    if c.min_free == 0 {
        format!("{room}; backups do not check the free space")
    } else {
        let low = if c.free.is_some_and(|f| f < c.min_free) {
            " — BELOW IT: backups are refused"
        } else {
            ""
        };
        format!("{room}; backups leave {} free{low}", human(c.min_free))
    }
}

/// Recovery records the human `info` shows.
const RECOVERIES_SHOWN: usize = 5;

pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

pub fn run(
    cfg: &Config,
    json: bool,
    only: Option<&str>,
    recoveries_after: Option<&str>,
    key_usage: bool,
) -> Result<()> {
    if let Some(n) = only {
        cfg.find_repo(Some(n))?;
    }
    if let Some(a) = recoveries_after {
        if !layout::is_recovery_id(a) {
            return Err(crate::error::Error::Invalid(format!(
                "--recoveries-after {a:?} is not a recovery record id (YYYYmmddTHHMMSSZ-<8 hex>, as info --json lists them)"
            )));
        }
    }
    let mut infos: Vec<Result<Info>> = Vec::new();
    for rc in &cfg.repos {
        if only.is_some_and(|n| n != rc.name) {
            infos.push(Err(crate::error::Error::Invalid("not asked for".into())));
            continue;
        }
        infos.push(collect_repo(cfg, rc, recoveries_after, key_usage));
    }
    let summaries: Vec<RepoSummary> = cfg
        .repos
        .iter()
        .zip(&infos)
        .filter(|(rc, _)| only.is_none_or(|n| n == rc.name))
        .map(|(rc, i)| summary_of(rc, i))
        .collect();
    // The detail shown: the first repository that answered.
    let mut first_err = None;
    let mut info = None;
    for (rc, i) in cfg.repos.iter().zip(infos) {
        if only.is_some_and(|n| n != rc.name) {
            continue;
        }
        match i {
            Ok(i) if info.is_none() => info = Some(i),
            Ok(_) => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let Some(mut info) = info else {
        return Err(
            first_err.unwrap_or_else(|| crate::error::Error::Invalid("no repository".into()))
        );
    };
    info.repositories = summaries;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info).unwrap_or_default()
        );
        return Ok(());
    }
    println!("repository        {}", info.repository);
    println!("format version    {}", info.format_version);
    println!("system identifier {}", info.system_identifier);
    println!("PostgreSQL        {}", info.pg_version);
    println!("WAL segment size  {}", human(info.wal_segment_size));
    if info.encrypted {
        println!("encryption        {}", info.encryption);
    } else {
        println!("encryption        NONE — this repository is NOT encrypted: anyone who can read it can read the data");
    }
    println!("created           {}", info.created_at);
    if let Some(k) = &info.key_created_at {
        println!("current key       created {k}");
    }
    println!("stored            {}", human(info.stored_bytes));
    if info.encrypted {
        println!();
        match &info.keys_counted_at {
            Some(at) => println!("data keys (objects counted at {at})"),
            None => println!("data keys (--key-usage counts the objects each seals)"),
        }
        print!(
            "{}",
            crate::commands::key::list::key_table(&info.keys, "  ")
        );
        println!();
    }
    if let Some(c) = &info.capacity {
        println!("capacity          {}", capacity_line(c));
    }
    let w = &info.wal;
    let ratio = if w.size_stored > 0 {
        w.size_plain as f64 / w.size_stored as f64
    } else {
        0.0
    };
    println!(
        "WAL               {} segments, {} → {} stored ({ratio:.1}×)",
        w.segments,
        human(w.size_plain),
        human(w.size_stored)
    );
    println!();
    println!(
        "{:<9} {:<25} {:<25} {:>9}  gaps",
        "timeline", "first", "last", "segments"
    );
    for t in &w.timelines {
        let gaps = if t.gaps.is_empty() {
            "none".to_string()
        } else {
            t.gaps
                .iter()
                .map(|g| format!("{}..{} ({} missing)", g.first, g.last, g.segments))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{:<9} {:<25} {:<25} {:>9}  {gaps}",
            t.timeline, t.first, t.last, t.segments
        );
    }
    if !w.history_files.is_empty() {
        println!("history files     {}", w.history_files.join(" "));
    }
    if !w.partial_files.is_empty() {
        println!("partial segments  {}", w.partial_files.join(" "));
    }
    if let Some(t) = &w.stream_tail {
        println!(
            "streamed tail     {} (timeline {}): {} to {}, {} chunks{}",
            t.segment,
            t.timeline,
            t.start_lsn,
            t.end_lsn,
            t.chunks,
            if t.continues_archive {
                ""
            } else {
                "; does NOT continue the archived WAL (run verify)"
            }
        );
    }
    let leftovers = w
        .stream_segments
        .saturating_sub(u64::from(w.stream_tail.is_some()));
    if leftovers > 0 {
        println!(
            "streamed leftovers {leftovers} segment(s) whose chunks are no longer the tail ({}); expire removes them",
            human(w.stream_stored)
        );
    }
    println!();
    if info.backups.is_empty() {
        println!("no backups yet (walshipper backup)");
    } else {
        println!(
            "{:<18} {:<4} {:<18} {:<26} {:>10} {:>10}",
            "backup", "type", "based on", "consistent at", "size", "stored"
        );
        for b in &info.backups {
            println!(
                "{:<18} {:<4} {:<18} {:<26} {:>10} {:>10}",
                b.id,
                b.kind,
                b.based_on.as_deref().unwrap_or("-"),
                b.stop_time
                    .get(..19)
                    .unwrap_or(&b.stop_time)
                    .replace('T', " "),
                human(b.size),
                human(b.stored_size)
            );
        }
    }
    for d in &info.damaged_backups {
        println!(
            "{:<18} DAMAGED: {} (not used by restore or backup, kept by expire; run `walshipper verify`)",
            d.id, d.reason
        );
    }
    // The last few restores from this repository, newest last.
    if !info.recoveries.is_empty() {
        println!();
        println!(
            "{:<25} {:<13} {:<18} {:<20} {:<8} where",
            "recovery", "operation", "backup", "target", "result"
        );
        let from = info.recoveries.len().saturating_sub(RECOVERIES_SHOWN);
        for r in &info.recoveries[from..] {
            let target = match &r.target.value {
                Some(v) => format!("{} {v}", r.target.kind),
                None => r.target.kind.clone(),
            };
            println!(
                "{:<25} {:<13} {:<18} {:<20} {:<8} {}@{}:{}",
                r.id,
                r.operation,
                if r.backup_id.is_empty() {
                    "-"
                } else {
                    &r.backup_id
                },
                target
                    .escape_debug()
                    .to_string()
                    .chars()
                    .take(20)
                    .collect::<String>(),
                if r.succeeded { "ok" } else { "FAILED" },
                r.os_user.escape_debug(),
                r.host.escape_debug(),
                r.target_dir.escape_debug()
            );
        }
    }
    if !w.foreign.is_empty() {
        println!(
            "foreign objects   {} under wal/ that walshipper does not write (ignored), e.g. {}",
            w.foreign.len(),
            w.foreign[0]
        );
    }
    if info.repositories.len() > 1 {
        println!();
        println!(
            "{:<12} {:<6} {:<40} {:>9} {:<25} {:<18} {:>10} {:>10}",
            "repository",
            "type",
            "location",
            "segments",
            "last WAL",
            "last backup",
            "stored",
            "free"
        );
        for r in &info.repositories {
            if let Some(e) = &r.error {
                println!(
                    "{:<12} {:<6} {:<40} UNAVAILABLE: {e}",
                    r.name, r.kind, r.location
                );
                continue;
            }
            println!(
                "{:<12} {:<6} {:<40} {:>9} {:<25} {:<18} {:>10} {:>10}",
                r.name,
                r.kind,
                r.location,
                r.segments,
                r.last_wal.as_deref().unwrap_or("-"),
                r.last_backup.as_deref().unwrap_or("-"),
                human(r.stored_bytes),
                r.free_bytes.map_or("unknown".to_string(), human)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_found() {
        let size = 16 << 20;
        let (r, g) = ranges_and_gaps(1, &[1, 2, 3, 7, 8, 10], size);
        assert_eq!(r.len(), 3);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].first, "000000010000000000000004");
        assert_eq!(g[0].last, "000000010000000000000006");
        assert_eq!(g[0].segments, 3);
        assert_eq!(g[1].segments, 1);
        let (r, g) = ranges_and_gaps(1, &[], size);
        assert!(r.is_empty() && g.is_empty());
        // Unsorted, duplicated (two names for one segment number), at the
        // ends of the range: no underflow, no overflow.
        let (r, g) = ranges_and_gaps(1, &[9, 3, 3, 4, u64::MAX, 0, u64::MAX - 1], size);
        assert_eq!(r.iter().map(|r| r.segments).sum::<u64>(), 6);
        let missing: Vec<u64> = g.iter().map(|g| g.segments).collect();
        assert_eq!(missing, [2, 4, u64::MAX - 11]);
    }

    #[test]
    fn foreign_segment_numbers_are_refused() {
        let size = 16 << 20;
        assert_eq!(segno_of(1, 3, size), Some(259));
        assert_eq!(segno_of(0, 256, size), None);
        assert_eq!(segno_of(u32::MAX, u32::MAX, size), None);
        assert_eq!(
            segno_of(u32::MAX, 255, size),
            Some(u64::from(u32::MAX) * 256 + 255)
        );
        assert_eq!(segno_of(1, 0, 0), None);
        assert_eq!(segno_of(1, 0, 1 << 33), None);
    }
}
