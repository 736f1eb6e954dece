//! `verify`: reads back every object of the backups (or of one) and the WAL
//! they need, checking every frame, every file's hash against the manifest, and
//! that the WAL has no gap from the oldest backup onwards.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use pg_backup_contract::KeyStatus;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::layout;
use crate::manifest::FileEntry;
use crate::repo::{BackupScan, DamagedBackup, Repository};
use crate::wal::{self, WalFileKind};

/// The most WAL segments one backup's start..stop range may span (16 TiB
/// of WAL at 16 MiB segments written during one backup).
const MAX_BACKUP_WAL_SEGMENTS: u64 = 1 << 20;

pub fn run(
    cfg: &Config,
    repo_name: Option<&str>,
    backup: Option<&str>,
    jobs: usize,
    json: bool,
) -> Result<()> {
    let started = std::time::Instant::now();
    let repo = Repository::open_repo(cfg, cfg.find_repo(repo_name)?)?;
    let seg = crate::commands::info::checked_seg_size(&repo)?;
    let mut problems: Vec<String> = Vec::new();
    // A damaged manifest is a problem to report, not a reason to stop: the
    // other backups and the WAL are checked all the same.
    let scan = match backup {
        Some(id) => match repo.find_backup(id) {
            Ok(m) => BackupScan {
                backups: vec![m.summary()],
                damaged: Vec::new(),
            },
            Err(Error::Corrupt { key, reason }) => BackupScan {
                backups: Vec::new(),
                damaged: vec![DamagedBackup {
                    id: id.to_string(),
                    key,
                    reason,
                }],
            },
            Err(e) => return Err(e),
        },
        None => repo.scan_backups_fresh()?,
    };
    for d in &scan.damaged {
        problems.push(format!(
            "backup {}: manifest {} is damaged: {}; the backup cannot be restored",
            d.id, d.key, d.reason
        ));
    }
    let backups = scan.backups;
    // Stored sizes of what is read, for the bytes per key.
    let mut sizes: HashMap<String, u64> = HashMap::new();
    let backup_objects = repo.storage.list(layout::BACKUPS_PREFIX)?;
    if backup.is_none() {
        problems.extend(repo.check_key_files()?);
        // Keys under backups/ that walshipper would not write: never used,
        // but someone put them there.
        for obj in &backup_objects {
            if layout::parse(&obj.key).is_none() {
                problems.push(format!(
                    "foreign object {:?}: not a key walshipper writes (ignored)",
                    obj.key
                ));
            }
        }
    }
    for obj in backup_objects {
        sizes.insert(obj.key, obj.size);
    }
    let keys = KeyUse::new(&repo);

    // Objects to read: (key, the entry whose hash it must have or None, what it is).
    let mut work: Vec<(String, Option<FileEntry>, String)> = Vec::new();
    // Objects shared by several backups (diff/incr refer to earlier ones) are read once.
    let mut seen = std::collections::HashSet::new();
    // Files a diff/incr rebuilds from block deltas: rebuilt (hashed, not
    // written) and checked against the hash taken at backup time.
    let mut rebuilds: Vec<(crate::manifest::FileEntry, String)> = Vec::new();
    // Bundles: each read once, every file named in it checked.
    let mut bundles: BTreeMap<String, Vec<(crate::manifest::FileEntry, String)>> = BTreeMap::new();
    for s in &backups {
        // One whole manifest at a time (the scan kept summaries): what it
        // names goes into the lists above, then it is dropped.
        let m = match repo.find_backup(&s.id) {
            Ok(m) => m,
            Err(Error::Corrupt { key, reason }) => {
                problems.push(format!(
                    "backup {}: manifest {key} is damaged: {reason}; the backup cannot be restored",
                    s.id
                ));
                continue;
            }
            // Gone since the listing: expire removed it meanwhile.
            Err(Error::Invalid(e)) => {
                tracing::warn!("backup {}: not verified: {e}", s.id);
                continue;
            }
            Err(e) => return Err(e),
        };
        // Every key a manifest names must be a backup object's: anything
        // else is not read (it could name WAL, keys or the descriptor).
        if let Some(k) = m.objects().find(|k| layout::backup_of(k).is_none()) {
            problems.push(format!(
                "backup {}: the manifest names {:?}, which is not a backup object; the backup cannot be restored",
                m.id,
                k.chars().take(200).collect::<String>()
            ));
            continue;
        }
        for f in &m.files {
            // A whole-file object is checked against the file's hash; a
            // file with block deltas is rebuilt, which reads (and checks)
            // its whole object and every delta.
            let what = format!("backup {}: {}", m.id, f.path);
            if f.offset.is_some() {
                // Bundled: checked when its bundle is read, once for all
                // the backups that name these bytes.
                if seen.insert(format!("{} {:?} {}", f.object, f.offset, f.path)) {
                    bundles
                        .entry(f.object.to_string())
                        .or_default()
                        .push((f.clone(), what));
                }
                continue;
            }
            match f.deltas.last() {
                None => {
                    if seen.insert(f.object.to_string()) {
                        work.push((f.object.to_string(), Some(f.clone()), what));
                    }
                }
                Some(last) => {
                    if seen.insert(format!("rebuild {last}")) {
                        rebuilds.push((f.clone(), what));
                    }
                }
            }
            for k in &f.maps {
                if seen.insert(k.clone()) {
                    work.push((
                        k.clone(),
                        None,
                        format!("backup {}: {} ({k})", m.id, f.path),
                    ));
                }
            }
        }
        work.push((
            m.backup_label_object.clone(),
            None,
            format!("backup {}: backup_label", m.id),
        ));
        if let Some(k) = &m.tablespace_map_object {
            work.push((k.clone(), None, format!("backup {}: tablespace_map", m.id)));
        }
    }

    // WAL: every segment per timeline; gaps from the oldest backup's start
    // on. WAL objects are read apart from the rest (`check_wal`): each one's
    // content is checked against its name, not only its frames.
    let mut segments: BTreeMap<u32, BTreeMap<u64, String>> = BTreeMap::new();
    let mut wal_work: Vec<(String, String, WalFileKind)> = Vec::new();
    for obj in repo.storage.list(crate::layout::WAL_PREFIX)? {
        sizes.insert(obj.key.clone(), obj.size);
        // Only well-formed keys, where the layout puts that name: a copy
        // elsewhere is not what archive-get would serve.
        let Some(crate::layout::ObjectName::Wal { name, kind }) = crate::layout::parse(&obj.key)
        else {
            problems.push(format!(
                "{}: not a WAL key walshipper writes; not used",
                obj.key.escape_debug()
            ));
            continue;
        };
        match kind {
            WalFileKind::Segment {
                tli,
                log,
                seg: s,
                partial: false,
            } => match crate::commands::info::segno_of(log, s, seg) {
                Some(n) => {
                    segments.entry(tli).or_default().insert(n, obj.key.clone());
                }
                None => problems.push(format!(
                    "WAL {name}: a segment number PostgreSQL never writes; not used"
                )),
            },
            kind => wal_work.push((obj.key.clone(), name, kind)),
        }
    }
    let oldest_start = backups
        .iter()
        .map(|m| (m.timeline, wal::lsn_segno(m.start_lsn(), seg)))
        .min();
    let mut wal_checked = 0usize;
    for (tli, segs) in &segments {
        // Gaps count from the oldest backup's start on; an older timeline
        // is read but has no gap findings. Segments before the start are
        // read too (stored data must be whole). Steps through the segments
        // present: a forged key far ahead must not make this walk 2^40
        // numbers.
        let from = match oldest_start {
            Some((btli, s)) if btli == *tli => Some(s),
            Some((btli, _)) if btli > *tli => None,
            _ => segs.keys().next().copied(),
        };
        let mut expected = from;
        for (&s, key) in segs.iter() {
            if let Some(e) = expected {
                if s > e && from.is_some_and(|f| s >= f) {
                    problems.push(format!(
                        "WAL gap on timeline {tli}: {} to {} missing; recovery cannot cross it",
                        wal::segment_name(*tli, e, seg),
                        wal::segment_name(*tli, s - 1, seg)
                    ));
                }
                expected = Some(e.max(s + 1));
            }
            wal_checked += 1;
            let name = wal::segment_name(*tli, s, seg);
            let kind = wal::parse_name(&name)
                .ok_or_else(|| Error::Invalid(format!("internal: segment name {name}")))?;
            wal_work.push((key.clone(), name, kind));
        }
    }
    // Each backup's own WAL range must exist (also when it is on an older timeline).
    for m in &backups {
        let first = wal::lsn_segno(m.start_lsn(), seg);
        let last = wal::lsn_prev_segno(m.stop_lsn(), seg);
        // LSNs come from the manifest: a range no backup spans is damage,
        // not a loop of 2^40 lookups.
        if m.stop_lsn() < m.start_lsn() || last.saturating_sub(first) > MAX_BACKUP_WAL_SEGMENTS {
            problems.push(format!(
                "backup {}: WAL range {}..{} in the manifest is implausible",
                m.id, m.start_lsn, m.stop_lsn
            ));
            continue;
        }
        for s in first..=last {
            let found = segments.values().any(|segs| segs.contains_key(&s));
            if !found {
                problems.push(format!(
                    "backup {}: WAL segment {} needed for consistency is missing",
                    m.id,
                    wal::segment_name(m.timeline, s, seg)
                ));
            }
        }
    }

    problems.extend(check_wal(&repo, &wal_work, jobs, &keys, &sizes));
    let streamed = check_stream(&repo, seg)?;
    problems.extend(streamed.problems);

    let next = AtomicUsize::new(0);
    let found: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..jobs.max(1) {
            sc.spawn(|| loop {
                let Some((key, sha, what)) = work.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                let mut sealed_by = None;
                let read = repo.read_object_sealed(key, &mut std::io::sink(), 1, &mut sealed_by);
                let size = sizes.get(key).copied().unwrap_or(0);
                let problem = match keys.note(key, sealed_by, size) {
                    Some(missing) => missing,
                    None => match read {
                        // The object's hash has its version's algorithm; an
                        // entry of the other never matches it.
                        Ok(got) => match sha {
                            Some(want) if !want.hash_is(&got) => Some(format!(
                                "{what}: {got} is not the manifest's {}",
                                want.hash_text()
                            )),
                            _ => None,
                        },
                        Err(e) => Some(format!("{what}: {e}")),
                    },
                };
                if let (Some(p), Ok(mut f)) = (problem, found.lock()) {
                    f.push(p);
                }
            });
        }
    });
    let bundle_list: Vec<(&String, &Vec<(crate::manifest::FileEntry, String)>)> =
        bundles.iter().collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..jobs.max(1) {
            sc.spawn(|| loop {
                let Some((key, files)) = bundle_list.get(next.fetch_add(1, Ordering::Relaxed))
                else {
                    return;
                };
                let entries: Vec<&crate::manifest::FileEntry> =
                    files.iter().map(|(f, _)| f).collect();
                let mut sealed_by = None;
                let read =
                    crate::bundle::unpack(&repo, key, &entries, &mut sealed_by, &mut |_, _| Ok(()));
                let size = sizes.get(*key).copied().unwrap_or(0);
                let problem = match keys.note(key, sealed_by, size) {
                    Some(missing) => missing,
                    None => read.err().map(|e| {
                        let whats: Vec<&str> =
                            files.iter().take(3).map(|(_, w)| w.as_str()).collect();
                        format!(
                            "{}{}: {e}",
                            whats.join(", "),
                            if files.len() > 3 {
                                format!(" and {} more files", files.len() - 3)
                            } else {
                                String::new()
                            }
                        )
                    }),
                };
                if let (Some(p), Ok(mut f)) = (problem, found.lock()) {
                    f.push(p);
                }
            });
        }
    });
    // The objects read by rebuilding (whole file and deltas) and the
    // manifests: their keys from their headers (the rebuild reads them).
    let mut headers: Vec<crate::storage::ObjectMeta> = Vec::new();
    let mut header_seen = std::collections::HashSet::new();
    let mut note_header = |k: &String| {
        if header_seen.insert(k.clone()) {
            headers.push(crate::storage::ObjectMeta {
                key: k.clone(),
                size: sizes.get(k).copied().unwrap_or(0),
                modified: None,
            });
        }
    };
    for (f, _) in &rebuilds {
        note_header(&f.object.to_string());
        f.deltas.iter().for_each(&mut note_header);
    }
    for m in &backups {
        note_header(&layout::manifest(&m.id));
    }
    crate::census::for_each_sealing(&repo, &headers, jobs, |meta, s| {
        let sealed_by = match s {
            crate::census::Sealing::Key(id) => Some(id),
            _ => None,
        };
        if let (Some(Some(p)), Ok(mut f)) =
            (keys.note(&meta.key, sealed_by, meta.size), found.lock())
        {
            f.push(p);
        }
    });
    let next = AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..jobs.max(1) {
            let (next, found, rebuilds, repo) = (&next, &found, &rebuilds, &repo);
            sc.spawn(move || loop {
                let Some((f, what)) = rebuilds.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                let problem = match rebuild_and_hash(repo, f) {
                    Ok(h) if f.hash_is(&h) => None,
                    Ok(h) => Some(format!(
                        "{what}: rebuilt from {} block delta(s), {h} is not the manifest's {}",
                        f.deltas.len(),
                        f.hash_text()
                    )),
                    Err(e) => Some(format!("{what}: {e}")),
                };
                if let (Some(p), Ok(mut f)) = (problem, found.lock()) {
                    f.push(p);
                }
            });
        }
    });
    problems.extend(found.into_inner().unwrap_or_default());
    problems.extend(keys.more_missing());
    problems.sort();
    let key_statuses = keys.statuses(&repo);

    if json {
        crate::progress::event(&pg_backup_contract::Event::Verify(
            pg_backup_contract::VerifyReport {
                ok: problems.is_empty(),
                repository: repo.name.clone(),
                backups: backups.iter().map(|m| m.id.clone()).collect(),
                damaged_backups: scan.damaged.clone(),
                objects_checked: (work.len() + bundles.len() + wal_work.len()) as u64
                    + streamed.chunks_read,
                files_rebuilt: rebuilds.len() as u64,
                wal_segments_checked: wal_checked as u64,
                problems: problems.clone(),
                keys: key_statuses.clone(),
                duration_s: started.elapsed().as_secs_f64(),
                stream_tail: streamed.tail.clone(),
            },
        ));
    } else {
        for m in &backups {
            println!("backup {}: {} files", m.id, m.files);
        }
        for d in &scan.damaged {
            println!("backup {}: DAMAGED manifest", d.id);
        }
        println!(
            "{} objects read, {} files rebuilt from block deltas, {} WAL segments in range",
            work.len() + bundles.len() + wal_work.len() + streamed.chunks_read as usize,
            rebuilds.len(),
            wal_checked
        );
        match &streamed.tail {
            Some(t) => println!(
                "streamed tail: {} (timeline {}) {} bytes in {} chunks, {} to {}; {}",
                t.segment,
                t.timeline,
                t.bytes,
                t.chunks,
                t.start_lsn,
                t.end_lsn,
                if t.continues_archive {
                    "continues the archived WAL"
                } else {
                    "does NOT continue the archived WAL"
                }
            ),
            None => println!("streamed tail: none (no wal-receive chunks beyond the archived WAL)"),
        }
        if repo.descriptor.encrypted() {
            println!("data keys of the objects read:");
            print!(
                "{}",
                crate::commands::key::list::key_table(&key_statuses, "  ")
            );
        }
        for p in &problems {
            println!("PROBLEM: {p}");
        }
    }
    if problems.is_empty() {
        if !json {
            println!("verify: all good");
        }
        Ok(())
    } else {
        Err(Error::VerifyFailed(format!(
            "verify found {} problem(s)",
            problems.len()
        )))
    }
}

/// Reads every WAL object (key, file name, kind) on `jobs` threads: every
/// frame, and the content against the name (`wal::ContentCheck`: page
/// header of segments, history contents), as archive-get does.
fn check_wal(
    repo: &Repository,
    items: &[(String, String, WalFileKind)],
    jobs: usize,
    keys: &KeyUse,
    sizes: &HashMap<String, u64>,
) -> Vec<String> {
    let id = match repo.descriptor.identity() {
        Ok(id) => id,
        Err(e) => return vec![format!("WAL: {e}; no WAL file checked")],
    };
    let next = AtomicUsize::new(0);
    let found: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..jobs.max(1) {
            sc.spawn(|| loop {
                let Some((key, name, kind)) = items.get(next.fetch_add(1, Ordering::Relaxed))
                else {
                    return;
                };
                let mut check = wal::ContentCheck::new(name, kind);
                let mut sealed_by = None;
                let read = repo.read_object_sealed(key, &mut check, 1, &mut sealed_by);
                let size = sizes.get(key).copied().unwrap_or(0);
                let problem = match keys.note(key, sealed_by, size) {
                    Some(missing) => missing,
                    None => match read {
                        Ok(_) => check.finish(&id).err().map(|reason| {
                            format!("WAL {name}: stored object {key} is not this file of this cluster: {reason}")
                        }),
                        Err(e) => Some(format!("WAL {name}: {e}")),
                    },
                };
                if let (Some(p), Ok(mut f)) = (problem, found.lock()) {
                    f.push(p);
                }
            });
        }
    });
    found.into_inner().unwrap_or_default()
}

/// What `check_stream` found.
struct Streamed {
    tail: Option<pg_backup_contract::StreamTail>,
    chunks_read: u64,
    problems: Vec<String>,
}

/// Reads back every streamed segment's chunks (`stream/`) with archive-get's
/// strict reader (`stream::read_chain`): a damaged chunk, a gap, a chunk of
/// another segment is a problem naming the object. Describes the tail (the
/// segment a restore to the latest point ends in) and whether it continues
/// the archived WAL; a gap between them is a problem (recovery stops before
/// the tail).
fn check_stream(repo: &Repository, seg: u64) -> Result<Streamed> {
    let mut out = Streamed {
        tail: None,
        chunks_read: 0,
        problems: Vec::new(),
    };
    let listing = crate::stream::list_streamed(repo)?;
    for k in &listing.foreign {
        out.problems.push(format!(
            "{}: not a key walshipper writes under stream/; not used",
            k.escape_debug()
        ));
    }
    if listing.segments.is_empty() {
        return Ok(out);
    }
    let held = crate::stream::Held::list(repo)?;
    let tail_at = crate::stream::receiver_segment(&listing, |t, s| held.stored(t, s));
    for (&(tli, segno), s) in &listing.segments {
        // A receiver running meanwhile merges chunks (deleting the pieces)
        // and deletes them in any order once the segment is whole: only an
        // error over an unchanged listing is damage (`read_settled`).
        let chain = match crate::stream::read_settled(repo, tli, segno, s) {
            Ok(crate::stream::Settled::Read(Some(c))) => c,
            Ok(crate::stream::Settled::Read(None)) => continue,
            Ok(crate::stream::Settled::Changed) => {
                tracing::info!(
                    "streamed WAL {} changed while it was read (its receiver merged or completed it): not checked this time",
                    s.name
                );
                continue;
            }
            Err(e) => {
                out.problems.push(format!("streamed WAL {}: {e}", s.name));
                continue;
            }
        };
        out.chunks_read += chain.used.len() as u64;
        if Some((tli, segno)) != tail_at {
            continue;
        }
        let start = segno.saturating_mul(seg);
        let end = start.saturating_add(chain.bytes.len() as u64);
        let path = match crate::stream::Ancestry::read(repo, tli) {
            Ok(p) => p,
            Err(e) => {
                out.problems.push(format!(
                    "timeline {tli}'s history (needed to tell whether the streamed tail continues the archived WAL): {e}; counting only timeline {tli}'s own segments"
                ));
                crate::stream::Ancestry::own(tli)
            }
        };
        let continues = held.continues(&path, segno);
        if let Some(last) = held.last_before(&path, segno).filter(|_| !continues) {
            out.problems.push(format!(
                "WAL gap before the streamed tail: {} to {} missing, so recovery to the latest point stops before the tail {} (archive the missing segments, e.g. with archive-push from pg_wal while the server keeps them)",
                wal::segment_name(tli, last + 1, seg),
                wal::segment_name(tli, segno - 1, seg),
                s.name
            ));
        }
        out.tail = Some(pg_backup_contract::StreamTail {
            timeline: tli,
            segment: s.name.clone(),
            start_lsn: wal::format_lsn(start),
            end_lsn: wal::format_lsn(end),
            bytes: chain.bytes.len() as u64,
            chunks: chain.listed.len() as u64,
            continues_archive: continues,
        });
    }
    Ok(out)
}

/// The hash of a file rebuilt from its base and block deltas, with the
/// algorithm of its entry (nothing is written anywhere).
fn rebuild_and_hash(repo: &Repository, f: &FileEntry) -> Result<crate::codec::PlainHash> {
    let nowhere = std::path::Path::new("(nowhere: verify only hashes)");
    // Only chains longer than restore merges at once use scratch files.
    let scratch = std::env::temp_dir();
    crate::commands::restore::rebuild_file(repo, f, &mut std::io::sink(), nowhere, &scratch)
}

/// The data keys of the objects verify reads: objects and bytes per key, and
/// whether the repository holds each key's file. Read through the host's key
/// cache, an object can open although its key file is gone; a new host
/// could not read it, so that is a problem all the same.
struct KeyUse<'a> {
    repo: &'a Repository,
    tally: Mutex<BTreeMap<[u8; 16], crate::census::Tally>>,
    /// Objects counted (one shared by several backups counts once).
    counted: Mutex<std::collections::HashSet<String>>,
    /// Whether keys/<id>.json is in the repository (asked once per key).
    held: Mutex<HashMap<[u8; 16], bool>>,
    /// Objects found sealed by each missing key.
    missing: Mutex<HashMap<[u8; 16], u64>>,
}

/// Objects named one by one per missing key; the rest are one line.
const MISSING_LISTED: u64 = 10;

impl<'a> KeyUse<'a> {
    fn new(repo: &'a Repository) -> KeyUse<'a> {
        KeyUse {
            repo,
            tally: Mutex::new(BTreeMap::new()),
            counted: Mutex::new(std::collections::HashSet::new()),
            held: Mutex::new(HashMap::new()),
            missing: Mutex::new(HashMap::new()),
        }
    }

    /// Counts object `key` (of `size` stored bytes) under the key that
    /// sealed it. None: the repository holds that key (or the object names
    /// none); Some: it does not, with the problem line for the first
    /// [`MISSING_LISTED`] objects of that key (`more_missing` sums up the
    /// others).
    fn note(&self, key: &str, sealed_by: Option<[u8; 16]>, size: u64) -> Option<Option<String>> {
        let id = sealed_by?;
        let first = self
            .counted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
        if first {
            let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
            let e = t.entry(id).or_default();
            e.objects += 1;
            e.bytes = e.bytes.saturating_add(size);
        }
        let known = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied();
        let held = known.unwrap_or_else(|| {
            // A key file that is there but damaged is held (check_key_files
            // reports it); a store that does not answer is not "missing".
            let held = !matches!(self.repo.key_file(&hex::encode(id)), Ok(None));
            self.held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, held);
            held
        });
        if held {
            return None;
        }
        if !first {
            // Read twice (shared by backups, or rebuilt): named once.
            return Some(None);
        }
        let n = {
            let mut m = self.missing.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(id).or_default();
            *n += 1;
            *n
        };
        Some((n <= MISSING_LISTED).then(|| {
            let id = hex::encode(id);
            format!(
                "{key} is sealed by key {id}, which this repository no longer holds ({} is missing): it cannot be read; restore the key file from another copy of the repository",
                layout::key_file(&id)
            )
        }))
    }

    /// One line per missing key that seals more objects than were named.
    fn more_missing(&self) -> Vec<String> {
        let m = self.missing.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter(|(_, n)| **n > MISSING_LISTED)
            .map(|(id, n)| {
                let id = hex::encode(id);
                format!(
                    "{} more objects are sealed by key {id}, which this repository no longer holds ({} is missing): they cannot be read; restore the key file from another copy of the repository",
                    n - MISSING_LISTED,
                    layout::key_file(&id)
                )
            })
            .collect()
    }

    /// The keys of the objects read (and the current key), as `key_status`.
    fn statuses(&self, repo: &Repository) -> Vec<KeyStatus> {
        let tally = self.tally.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let census = crate::census::Census {
            keys: tally.clone(),
            ..Default::default()
        };
        match crate::census::key_statuses(repo, Some(&census)) {
            Ok(v) => v
                .into_iter()
                .filter(|k| {
                    k.current
                        || crate::census::key_bytes(&k.key_id)
                            .is_some_and(|id| tally.contains_key(&id))
                })
                .collect(),
            Err(e) => {
                tracing::warn!("the key files could not be listed: {e}");
                let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                let mut v: Vec<KeyStatus> = tally
                    .iter()
                    .map(|(id, t)| KeyStatus {
                        key_id: hex::encode(id),
                        current: repo.descriptor.current_key_id.as_deref()
                            == Some(hex::encode(id).as_str()),
                        present: held.get(id).copied().unwrap_or(true),
                        objects: Some(t.objects),
                        bytes: Some(t.bytes),
                        ..Default::default()
                    })
                    .collect();
                crate::census::sort_keys(&mut v);
                v
            }
        }
    }
}
