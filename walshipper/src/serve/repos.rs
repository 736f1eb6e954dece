//! What each configured repository holds (`commands::info::collect`),
//! read by a background thread every `info_interval` seconds: listing a
//! repository's WAL and reading its manifests costs requests (minutes on a
//! slow S3, forever on a hung mount), and the dashboard reloads every
//! minute on many screens without ever waiting for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Reads one repository (the slow part: a listing of its WAL, its
/// manifests). An error is kept as its kind only.
fn read_one(cfg: &Config, rc: &crate::config::RepoConfig) -> RepoView {
    match Repository::open_repo(cfg, rc).and_then(|r| info::collect(&r)) {
        Ok(i) => view_of(&rc.name, &i),
        Err(e) => {
            // The full message may name a secret's file (an unreadable
            // passphrase file): it goes to the log only.
            tracing::warn!("dashboard: repository {} cannot be read: {e}", rc.name);
            RepoView {
                name: rc.name.clone(),
                system_identifier: None,
                wal_segment_size: 0,
                wal: Vec::new(),
                error: Some(format!(
                    "{} error (the walshipper serve log has the details)",
                    e.kind()
                )),
                read_at: Instant::now(),
            }
        }
    }
}

/// The repositories as last read by the refresher, in configuration
/// order; one not read yet is missing. Never waits on a repository (only
/// on the cache's lock, held for a copy of a few pointers).
pub fn views(cfg: &Config) -> Vec<Arc<RepoView>> {
    let c = cache().lock().unwrap_or_else(|p| p.into_inner());
    cfg.repos
        .iter()
        .filter_map(|rc| c.get(&rc.name).cloned())
        .collect()
}

/// Starts the thread that reads every configured repository now and then
/// every `info_interval` seconds, until `stop`. Pages only ever use its
/// last result, so a slow repository (S3 far away) or a hung mount delays
/// this thread alone, never a request.
pub fn spawn_refresher(
    cfg: &Config,
    stop: &'static AtomicBool,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let cfg = cfg.clone();
    let every = Duration::from_secs(cfg.serve.info_interval.max(1));
    std::thread::Builder::new()
        .name("serve-repos".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                for rc in &cfg.repos {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let v = Arc::new(read_one(&cfg, rc));
                    cache()
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(rc.name.clone(), v);
                }
                while started.elapsed() < every && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        })
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
