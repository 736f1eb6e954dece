//! What each configured repository holds (`commands::info::collect`),
//! cached: listing a repository's WAL and reading its manifests costs
//! requests, and the dashboard reloads every minute on many screens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::commands::info;
use crate::config::Config;
use crate::repo::Repository;

/// One timeline's WAL in a repository, as byte positions (LSNs): the
/// stored runs of segments and the holes between them.
#[derive(Clone, Debug)]
pub struct TimelineWal {
    pub timeline: u32,
    /// (start LSN, end LSN, first segment name, last segment name, segments).
    pub ranges: Vec<(u64, u64, String, String, u64)>,
    pub gaps: Vec<(u64, u64, String, String, u64)>,
}

/// A repository as the dashboard needs it: no secret (only the location
/// walshipper already shows in `info`).
#[derive(Clone, Debug)]
pub struct RepoView {
    pub name: String,
    pub system_identifier: Option<String>,
    pub wal_segment_size: u64,
    pub wal: Vec<TimelineWal>,
    /// Why it could not be read (then `wal` is empty): the kind of error
    /// only, the page being no place for paths of secrets.
    pub error: Option<String>,
    pub read_at: Instant,
}

type Cache = Mutex<HashMap<String, Arc<RepoView>>>;

fn cache() -> &'static Cache {
    static C: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The start LSN of a segment file name (`TTTTTTTTLLLLLLLLSSSSSSSS`) for
/// segments of `seg_size` bytes; None for anything else.
pub fn segment_lsn(name: &str, seg_size: u64) -> Option<u64> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let log = u32::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u32::from_str_radix(&name[16..24], 16).ok()?;
    info::segno_of(log, seg, seg_size)?.checked_mul(seg_size)
}

fn view_of(name: &str, i: &info::Info) -> RepoView {
    let seg = i.wal_segment_size;
    let conv = |r: &info::Range| {
        let a = segment_lsn(&r.first, seg)?;
        let b = segment_lsn(&r.last, seg)?.checked_add(seg)?;
        Some((a, b, r.first.clone(), r.last.clone(), r.segments))
    };
    RepoView {
        name: name.to_string(),
        system_identifier: Some(i.system_identifier.clone()),
        wal_segment_size: seg,
        wal: i
            .wal
            .timelines
            .iter()
            .map(|t| TimelineWal {
                timeline: t.timeline,
                ranges: t.ranges.iter().filter_map(conv).collect(),
                gaps: t.gaps.iter().filter_map(conv).collect(),
            })
            .collect(),
        error: None,
        read_at: Instant::now(),
    }
}

/// Every configured repository, read at most once per `max_age` (a
/// repository that fails is retried on the same schedule, its error kept).
pub fn views(cfg: &Config, max_age: Duration) -> Vec<Arc<RepoView>> {
    // One reader at a time: pages asked for together wait for one read
    // of each repository instead of each starting its own.
    static READING: Mutex<()> = Mutex::new(());
    let _one = READING.lock().unwrap_or_else(|p| p.into_inner());
    cfg.repos
        .iter()
        .map(|rc| {
            let cached = cache()
                .lock()
                .ok()
                .and_then(|c| c.get(&rc.name).cloned())
                .filter(|v| v.read_at.elapsed() < max_age);
            if let Some(v) = cached {
                return v;
            }
            let v = match Repository::open_repo(cfg, rc).and_then(|r| info::collect(&r)) {
                Ok(i) => view_of(&rc.name, &i),
                Err(e) => {
                    // The full message may name a secret's file (an
                    // unreadable passphrase file): it goes to the log only.
                    tracing::warn!("dashboard: repository {} cannot be read: {e}", rc.name);
                    let e = format!(
                        "{} error (the walshipper serve log has the details)",
                        e.kind()
                    );
                    RepoView {
                        name: rc.name.clone(),
                        system_identifier: None,
                        wal_segment_size: 0,
                        wal: Vec::new(),
                        error: Some(e),
                        read_at: Instant::now(),
                    }
                }
            };
            let v = Arc::new(v);
            if let Ok(mut c) = cache().lock() {
                c.insert(rc.name.clone(), v.clone());
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_to_lsn() {
        let s = 16 << 20;
        assert_eq!(segment_lsn("000000010000000000000001", s), Some(s));
        assert_eq!(
            segment_lsn("000000010000000100000002", s),
            Some((1u64 << 32) + 2 * s)
        );
        assert_eq!(segment_lsn("00000001000000000000010X", s), None);
        assert_eq!(segment_lsn("000000010000000000000100", s), None);
        assert_eq!(segment_lsn("short", s), None);
    }
}
