//! `wal-receive`: streams WAL from the server over the replication protocol
//! through a physical slot and stores it in the repository, so that the
//! data lost when the server is destroyed is at most `[stream]
//! flush_interval` seconds of WAL (none with `synchronous = true` and the
//! receiver in `synchronous_standby_names`).
//!
//! - The segment being filled is kept durable as chunk objects
//!   (`crate::stream`), written at most every `flush_interval` (at once,
//!   for every batch received, when synchronous).
//! - A complete segment is stored under the key archive-push uses, through
//!   the same create-if-absent write ("already there with the same bytes"
//!   is success), then its chunks are deleted: archive-push and the
//!   receiver coexist.
//! - The flush position reported to the server (what the slot keeps WAL
//!   for, what a synchronous commit waits for) is what is durable in the
//!   repository, never more.
//! - On start it resumes from what the repository holds for the newest
//!   timeline (re-receiving the partial segment from its start, checking
//!   the bytes it already holds), so a killed receiver leaves no gap while
//!   the slot keeps the WAL. A timeline switch is followed: the old
//!   timeline's last segment is stored as `<segment>.partial`, the new
//!   timeline's history file as archive-push would, and streaming goes on.
//! - SIGTERM/SIGINT: what was received is made durable, then it exits 0.

use std::cell::Cell;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::layout;
use crate::replication::{Connection, StreamMessage, SystemId};
use crate::repo::Repository;
use crate::storage::PutOutcome;
use crate::stream;
use crate::wal::{self, ClusterIdentity, WalFileKind};

pub struct Args {
    pub json: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Chunks of one level merged into one of the next when this many are in a
/// row: a segment written in many small pieces (synchronous mode) keeps
/// O(8 log8 n) objects and each byte is rewritten O(log8 n) times.
const MERGE_FANOUT: usize = 8;
/// Lag (in segments) above which each progress report is also a warning.
const LAG_WARN_SEGMENTS: u64 = 64;
/// The level of the one chunk a resumed segment starts with (`consolidate`):
/// never merged again (rewriting it at every merge would cost up to a
/// whole segment per write).
const LOADED: u8 = u8::MAX;

/// How streaming on one timeline ended.
enum Ended {
    Stopped,
    Timeline { next_tli: u32, start: u64 },
}

struct Receiver<'a> {
    repo: &'a Repository,
    id: ClusterIdentity,
    seg_size: u64,
    slot: String,
    json: bool,
    synchronous: bool,
    flush_interval: Duration,
    status_interval: Duration,
    tli: u32,
    segno: u64,
    /// Bytes 0.. of the segment: received, or loaded from the repository.
    buf: Vec<u8>,
    /// Offset of the next byte the server sends.
    pos: usize,
    /// Bytes 0..durable of the segment are durable in the repository.
    durable: usize,
    /// The chunk objects of this segment: (start, end, level).
    chunks: Vec<(u32, u32, u8)>,
    /// The chunks `resume` found of the segment it resumes (name, chunks),
    /// merged by `consolidate` once START_REPLICATION holds the slot.
    unmerged: Option<(String, Vec<stream::Chunk>)>,
    unflushed_since: Option<Instant>,
    last_flush: Option<Instant>,
    server_lsn: Option<u64>,
    bytes_received: u64,
    segments_stored: u64,
    /// Merged-away chunks go to a thread that deletes them: each delete
    /// makes its directory durable (an fsync on posix), which has no place
    /// in a synchronous commit's wait. One not deleted (killed first) is
    /// harmless: the merged chunk wins, and the next start deletes it.
    deleter: Option<std::sync::mpsc::Sender<String>>,
    /// How long a look at repository.json naming the key this receiver
    /// opened with holds (`opened_key_current`); zero: every write reads it.
    key_check_interval: Duration,
    /// When repository.json was last seen naming the opened key.
    key_seen: Cell<Option<Instant>>,
    /// It named another since (a rotation): every write reads it.
    key_changed: Cell<bool>,
}

// The longest a receiver seals with the key it opened without looking
// whether repository.json still names it. Fixed, not derived from this
// host's `retire_settle` alone: `key retire` may run on a host with a
// shorter one, and never deletes a key sooner than twice this after the
// rotation (`keys::RETIRE_SETTLE_MIN_S`).
use crate::keys::KEY_CHECK_MAX;

pub fn run(cfg: &Config, repo_name: Option<&str>, args: &Args) -> Result<()> {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let rc = cfg.find_repo(repo_name)?;
    let repo = Repository::open_repo(cfg, rc)?;
    let id = repo.descriptor.identity()?;
    let sc = &cfg.stream;
    let mut conn = Connection::connect(&cfg.pg, &sc.application_name)?;
    let sys = conn.identify_system()?;
    if sys.system_identifier != repo.descriptor.system_identifier {
        return Err(Error::Invalid(format!(
            "the server's system identifier {} is not the repository's {}: this repository belongs to another cluster (check [pg] and the repository)",
            sys.system_identifier, repo.descriptor.system_identifier
        )));
    }
    if conn.create_slot(&sc.slot)? {
        tracing::info!("created physical replication slot {}", sc.slot);
    }
    let (tx, deletions) = std::sync::mpsc::channel::<String>();
    std::thread::scope(|sc| {
        let repo = &repo;
        sc.spawn(move || {
            for key in deletions {
                if let Err(e) = repo.storage.delete(&key) {
                    tracing::warn!("cannot delete merged chunk {key}: {e}");
                }
            }
        });
        receive(repo, cfg, args, conn, &sys, id, tx)
    })
}

/// Streams until stopped (the deleter thread ends when `deleter` is dropped).
fn receive(
    repo: &Repository,
    cfg: &Config,
    args: &Args,
    mut conn: Connection,
    sys: &SystemId,
    id: ClusterIdentity,
    deleter: std::sync::mpsc::Sender<String>,
) -> Result<()> {
    let sc = &cfg.stream;
    // `key retire` deletes a replaced key's file retire_settle seconds
    // after the rotation at the earliest (its host's setting, which may
    // differ from ours): looking every 5 s at most (a quarter of ours when
    // shorter) is soon enough, and spares a synchronous commit a read of
    // repository.json (a GET on S3) per write.
    let key_check_interval =
        Duration::from_secs(cfg.encryption.retire_settle / 4).min(KEY_CHECK_MAX);
    let mut r = Receiver {
        deleter: Some(deleter),
        key_check_interval,
        key_seen: Cell::new(None),
        key_changed: Cell::new(false),
        repo,
        seg_size: id.wal_segment_size,
        id,
        slot: sc.slot.clone(),
        json: args.json,
        synchronous: sc.synchronous,
        flush_interval: Duration::from_secs_f64(sc.flush_interval),
        status_interval: Duration::from_secs(sc.status_interval),
        tli: 0,
        segno: 0,
        buf: Vec::new(),
        pos: 0,
        durable: 0,
        chunks: Vec::new(),
        unmerged: None,
        unflushed_since: None,
        last_flush: None,
        server_lsn: Some(sys.xlogpos),
        bytes_received: 0,
        segments_stored: 0,
    };
    r.resume(&mut conn, sys)?;
    loop {
        if r.tli > 1 {
            r.store_history(&mut conn, r.tli)?;
        }
        let start = r.segno * r.seg_size;
        tracing::info!(
            "streaming from {} on timeline {} through slot {}",
            wal::format_lsn(start),
            r.tli,
            r.slot
        );
        let ended = match conn.start_replication(&r.slot, start, r.tli)? {
            Some((next_tli, start)) => Ended::Timeline { next_tli, start },
            None => {
                // Only now: START_REPLICATION refuses a second receiver on
                // the slot, so no other one is writing this segment's chunks.
                r.consolidate()?;
                r.stream(&mut conn)?
            }
        };
        match ended {
            Ended::Stopped => {
                r.emit("stopped");
                conn.terminate();
                return Ok(());
            }
            Ended::Timeline { next_tli, start } => r.next_timeline(next_tli, start)?,
        }
    }
}

impl Receiver<'_> {
    fn seg_start(&self) -> u64 {
        self.segno * self.seg_size
    }
    fn received_lsn(&self) -> u64 {
        self.seg_start() + self.pos as u64
    }
    /// Durable in the repository and received in this session: what may
    /// be reported as flushed.
    fn flushed_lsn(&self) -> u64 {
        self.seg_start() + self.durable.min(self.pos) as u64
    }
    fn segment_name(&self) -> String {
        wal::segment_name(self.tli, self.segno, self.seg_size)
    }

    /// Where to start: after what the repository holds for its newest
    /// timeline; with nothing there, the slot's restart point or the
    /// server's current position (from a segment's start).
    fn resume(&mut self, conn: &mut Connection, sys: &SystemId) -> Result<()> {
        let seg = self.seg_size;
        let mut complete: std::collections::BTreeSet<(u32, u64)> = Default::default();
        for m in self.repo.storage.list(layout::WAL_PREFIX)? {
            if let Some(layout::ObjectName::Wal {
                kind:
                    WalFileKind::Segment {
                        tli,
                        log,
                        seg: s,
                        partial: false,
                    },
                ..
            }) = layout::parse(&m.key)
            {
                complete.insert((tli, wal::seg_no(log, s, seg)));
            }
        }
        let streamed = stream::streamed_segments(self.repo)?;
        // Chunks of a segment stored whole are leftovers of a receiver
        // killed while deleting them.
        for ((t, s), name) in &streamed {
            if complete.contains(&(*t, *s)) {
                self.repo
                    .storage
                    .delete_prefix(&layout::stream_prefix(name))?;
            }
        }
        let newest = complete
            .iter()
            .map(|(t, _)| *t)
            .chain(streamed.keys().map(|(t, _)| *t))
            .max();
        let Some(t) = newest else {
            let (lsn, t) = match conn.read_slot(&self.slot)? {
                Some((lsn, t)) if lsn > 0 => (lsn, t),
                _ => (sys.xlogpos, sys.timeline),
            };
            self.tli = t;
            self.segno = lsn / seg;
            tracing::info!(
                "the repository holds no WAL yet: starting at the slot's or server's position"
            );
            return Ok(());
        };
        if t > sys.timeline {
            return Err(Error::Invalid(format!(
                "the repository holds WAL of timeline {t}, but the server is on timeline {}: is [pg] the server now archiving to this repository (not an older copy)?",
                sys.timeline
            )));
        }
        let last = complete
            .range((t, 0)..=(t, u64::MAX))
            .next_back()
            .map(|(_, s)| *s);
        let partial = streamed
            .keys()
            .filter(|(tt, s)| *tt == t && !complete.contains(&(t, *s)))
            .map(|(_, s)| *s)
            .max()
            .filter(|s| last.is_none_or(|l| *s > l));
        self.tli = t;
        match (partial, last) {
            (Some(s), _) => {
                self.segno = s;
                if let Some(chain) = stream::read_chain(self.repo, t, s)? {
                    self.buf = chain.bytes;
                    self.durable = self.buf.len();
                    self.chunks = vec![(0, self.durable as u32, LOADED)];
                    self.unmerged = Some((self.segment_name(), chain.listed));
                    tracing::info!(
                        "resuming segment {} of which {} bytes are in the repository",
                        self.segment_name(),
                        self.durable
                    );
                }
            }
            (None, Some(l)) => self.segno = l + 1,
            (None, None) => unreachable_timeline(t)?,
        }
        if t < sys.timeline {
            self.skip_past_switch(conn, sys.timeline)?;
        }
        Ok(())
    }

    /// Replaces the chunks found at start by one chunk over all their
    /// bytes, then deletes the rest. Each session leaves O(8 log8 n)
    /// chunks (`merge`); without this, a receiver restarted over and over
    /// within one segment would add that many per restart, up to the
    /// `stream::MAX_CHUNKS` readers refuse. Called once the slot is ours:
    /// a second receiver started beside a running one must not rewrite the
    /// chunks the first one is still adding to and merging.
    fn consolidate(&mut self) -> Result<()> {
        let Some((name, listed)) = self.unmerged.take() else {
            return Ok(());
        };
        // Resumed elsewhere since (`skip_past_switch`): nothing to merge.
        if name != self.segment_name() || self.pos != 0 {
            return Ok(());
        }
        let end = self.buf.len() as u32;
        if listed.len() > 1 {
            let key = layout::stream_chunk(&name, 0, end);
            if !listed.iter().any(|c| c.key == key) {
                self.put_same(&key, &self.buf)?;
            }
            // Readers prefer the longest chunk at each offset: the pieces
            // are redundant from here on, whether or not their deletion
            // completes (the next start deletes what is left).
            for c in listed.iter().filter(|c| c.key != key) {
                if let Err(e) = self.repo.storage.delete(&c.key) {
                    tracing::warn!("cannot delete merged chunk {}: {e}", c.key);
                }
            }
            tracing::info!(
                "merged the {} streamed chunks of {name} into one",
                listed.len()
            );
        }
        self.chunks = vec![(0, end, LOADED)];
        Ok(())
    }

    /// The repository's newest timeline is not the server's: when what it
    /// holds reaches past where that timeline ended, go on from the next.
    fn skip_past_switch(&mut self, conn: &mut Connection, server_tli: u32) -> Result<()> {
        let (_, text) = conn.timeline_history(server_tli)?;
        let text = String::from_utf8_lossy(&text).into_owned();
        let mut entries: Vec<(u32, u64)> = Vec::new();
        for line in text.lines() {
            let mut f = line.split_whitespace();
            if let (Some(p), Some(l)) = (f.next(), f.next()) {
                if let (Ok(p), Some(l)) = (p.parse::<u32>(), wal::parse_lsn(l)) {
                    entries.push((p, l));
                }
            }
        }
        while let Some(i) = entries.iter().position(|(p, _)| *p == self.tli) {
            let switch = entries[i].1;
            if self.seg_start() < switch {
                return Ok(());
            }
            let next = entries.get(i + 1).map_or(server_tli, |(p, _)| *p);
            tracing::info!(
                "the repository holds timeline {} up to its end at {}: going on with timeline {next}",
                self.tli,
                wal::format_lsn(switch)
            );
            self.tli = next;
            self.segno = switch / self.seg_size;
            self.buf.clear();
            self.pos = 0;
            self.durable = 0;
            self.chunks.clear();
            self.unmerged = None;
        }
        Ok(())
    }

    fn stream(&mut self, conn: &mut Connection) -> Result<Ended> {
        self.emit("streaming");
        let mut last_status = Instant::now();
        let mut last_event = Instant::now();
        let mut reported = self.flushed_lsn();
        let mut emitted = reported;
        loop {
            if STOP.load(Ordering::SeqCst) {
                self.flush_partial()?;
                conn.send_status(self.received_lsn(), self.flushed_lsn(), false)?;
                tracing::info!("stopping at {}", wal::format_lsn(self.flushed_lsn()));
                return Ok(Ended::Stopped);
            }
            let mut wait = Duration::from_millis(500);
            if let Some(since) = self.unflushed_since {
                wait = wait.min(self.flush_interval.saturating_sub(since.elapsed()));
            }
            let mut reply = false;
            match conn.recv(wait)? {
                Some(StreamMessage::XLogData {
                    start,
                    wal_end,
                    data,
                }) => {
                    self.server_lsn = Some(wal_end.max(self.server_lsn.unwrap_or(0)));
                    self.receive(start, &data)?;
                }
                Some(StreamMessage::Keepalive { wal_end, reply: r }) => {
                    self.server_lsn = Some(wal_end.max(self.server_lsn.unwrap_or(0)));
                    reply = r;
                }
                Some(StreamMessage::EndOfTimeline { next_tli, start }) => {
                    return Ok(Ended::Timeline { next_tli, start });
                }
                None => {}
            }
            if let Some(since) = self.unflushed_since {
                let due = if self.synchronous {
                    // Everything received so far, in one write.
                    !conn.pending()
                } else {
                    since.elapsed() >= self.flush_interval
                };
                if due {
                    self.flush_partial()?;
                }
            }
            let flushed = self.flushed_lsn();
            if reply || flushed != reported || last_status.elapsed() >= self.status_interval {
                conn.send_status(self.received_lsn(), flushed, false)?;
                last_status = Instant::now();
            }
            // Merging rewrites what is durable already: after the
            // acknowledgement, not in a synchronous commit's wait.
            self.merge()?;
            if (flushed != emitted && last_event.elapsed() >= Duration::from_secs(1))
                || last_event.elapsed() >= self.status_interval
            {
                self.emit("streaming");
                last_event = Instant::now();
                emitted = flushed;
            }
            reported = flushed;
        }
    }

    /// Takes WAL bytes from `start`, storing each segment they complete.
    fn receive(&mut self, start: u64, data: &[u8]) -> Result<()> {
        if start != self.received_lsn() {
            return Err(Error::io(
                "replication stream",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "the server sent WAL from {}, but the next byte expected is at {}",
                        wal::format_lsn(start),
                        wal::format_lsn(self.received_lsn())
                    ),
                ),
            ));
        }
        let mut d = data;
        while !d.is_empty() {
            let room = self.seg_size as usize - self.pos;
            let n = room.min(d.len());
            let (piece, rest) = d.split_at(n);
            let overlap = self.buf.len().saturating_sub(self.pos).min(n);
            if overlap > 0 && self.buf[self.pos..self.pos + overlap] != piece[..overlap] {
                return Err(Error::Repository(format!(
                    "the server's WAL at {} differs from what the repository holds for segment {} (stream/ objects): another cluster's, or this one's WAL was altered. Move stream/{}/ aside after checking, then start the receiver again",
                    wal::format_lsn(self.received_lsn()),
                    self.segment_name(),
                    self.segment_name()
                )));
            }
            self.buf.extend_from_slice(&piece[overlap..]);
            self.pos += n;
            d = rest;
            if self.pos > self.durable && self.unflushed_since.is_none() {
                self.unflushed_since = Some(Instant::now());
            }
            if self.pos as u64 == self.seg_size {
                self.complete_segment()?;
            }
        }
        self.bytes_received += data.len() as u64;
        Ok(())
    }

    fn check(&self, from: usize, upto: usize) -> Result<()> {
        stream::check_pages(&self.buf[..upto], from, self.tli, self.segno, &self.id).map_err(
            |reason| {
                Error::io(
                    "replication stream",
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "what the server sent is not WAL segment {} of this cluster: {reason}",
                            self.segment_name()
                        ),
                    ),
                )
            },
        )
    }

    /// Stores `bytes` under `key`; an object already there must hold the same.
    fn put_same(&self, key: &str, bytes: &[u8]) -> Result<()> {
        // Sealed by the key current now, not the one read when the receiver
        // started days ago: `key retire` may since have deleted that one.
        let (outcome, _) = if self.opened_key_current() {
            self.repo.put_object(key, bytes)?
        } else {
            self.repo.put_object_fresh(key, bytes)?
        };
        if outcome == PutOutcome::Stored {
            return Ok(());
        }
        let stored = self.repo.read_object(key, &mut std::io::sink())?;
        // The stored object's algorithm decides how the local bytes are hashed.
        let local = crate::codec::hash_of(stored.alg, bytes)
            .map_err(|e| Error::io(format!("hash {key}"), e))?;
        if stored == local {
            tracing::debug!("{key} was already stored with identical content");
            return Ok(());
        }
        Err(Error::Conflict {
            name: key.to_string(),
            stored: stored.to_string(),
            local: local.to_string(),
        })
    }

    /// Whether repository.json named the key this receiver opened with
    /// less than `key_check_interval` ago (read again when it is older).
    /// False when unsure: the caller then reads it before the write
    /// (`put_object_fresh`), which also authenticates a new key.
    fn opened_key_current(&self) -> bool {
        if self.key_check_interval.is_zero()
            || self.key_changed.get()
            || !self.repo.descriptor.encrypted()
        {
            return false;
        }
        if self
            .key_seen
            .get()
            .is_some_and(|t| t.elapsed() < self.key_check_interval)
        {
            return true;
        }
        let mut body = Vec::new();
        let read = match self.repo.storage.get(layout::DESCRIPTOR) {
            Ok(Some(r)) => r.take(64 << 10).read_to_end(&mut body).is_ok(),
            _ => false,
        };
        let opened = &self.repo.descriptor;
        match crate::repo::Descriptor::parse(&body) {
            Ok(d) if read && d.repository_id == opened.repository_id => {
                if d.current_key_id == opened.current_key_id {
                    self.key_seen.set(Some(Instant::now()));
                    return true;
                }
                tracing::info!(
                    "repository.json names another current key now: each write reads it again"
                );
                self.key_changed.set(true);
                false
            }
            _ => false,
        }
    }

    fn complete_segment(&mut self) -> Result<()> {
        self.check(0, self.buf.len())?;
        let name = self.segment_name();
        let key = layout::wal_segment(self.tli, self.segno, self.seg_size);
        self.put_same(&key, &self.buf)?;
        if let Err(e) = self
            .repo
            .storage
            .delete_prefix(&layout::stream_prefix(&name))
        {
            tracing::warn!(
                "{name} is stored, but its streamed chunks stay (removed at the next start): {e}"
            );
        }
        tracing::info!("stored segment {name}");
        self.segno += 1;
        self.buf.clear();
        self.pos = 0;
        self.durable = 0;
        self.chunks.clear();
        self.unmerged = None;
        self.unflushed_since = None;
        self.last_flush = Some(Instant::now());
        self.segments_stored += 1;
        Ok(())
    }

    /// Makes what was received of the current segment durable.
    fn flush_partial(&mut self) -> Result<()> {
        let (a, b) = (self.durable, self.pos);
        if b <= a {
            self.unflushed_since = None;
            return Ok(());
        }
        self.check(a, b)?;
        let name = self.segment_name();
        let key = layout::stream_chunk(&name, a as u32, b as u32);
        self.put_same(&key, &self.buf[a..b])?;
        self.chunks.push((a as u32, b as u32, 0));
        self.durable = b;
        self.unflushed_since = None;
        self.last_flush = Some(Instant::now());
        Ok(())
    }

    /// Merges the last MERGE_FANOUT chunks while they share a level.
    fn merge(&mut self) -> Result<()> {
        let name = self.segment_name();
        let name = name.as_str();
        loop {
            let n = self.chunks.len();
            if n < MERGE_FANOUT {
                return Ok(());
            }
            let tail = &self.chunks[n - MERGE_FANOUT..];
            let level = tail[0].2;
            if level == LOADED || tail.iter().any(|c| c.2 != level) {
                return Ok(());
            }
            let (s, e) = (tail[0].0, tail[MERGE_FANOUT - 1].1);
            let merged = layout::stream_chunk(name, s, e);
            self.put_same(&merged, &self.buf[s as usize..e as usize])?;
            // The pieces may go now: the chain prefers the merged chunk.
            for (a, b, _) in self.chunks.drain(n - MERGE_FANOUT..) {
                let key = layout::stream_chunk(name, a, b);
                let queued = match &self.deleter {
                    Some(d) => d.send(key).map_err(|e| e.0),
                    None => Err(key),
                };
                if let Err(key) = queued {
                    if let Err(e) = self.repo.storage.delete(&key) {
                        tracing::warn!("cannot delete merged chunk {key}: {e}");
                    }
                }
            }
            self.chunks.push((s, e, level + 1));
        }
    }

    /// The timeline ended: the rest of its last segment is stored as
    /// `<segment>.partial` (what PostgreSQL archives at a promotion), the
    /// next timeline's history file as archive-push would.
    fn next_timeline(&mut self, next_tli: u32, start: u64) -> Result<()> {
        let name = self.segment_name();
        if self.pos > 0 {
            self.check(0, self.pos)?;
            let mut whole = self.buf[..self.pos].to_vec();
            whole.resize(self.seg_size as usize, 0);
            let pname = format!("{name}.partial");
            let key = layout::wal(
                &pname,
                &WalFileKind::Segment {
                    tli: self.tli,
                    log: 0,
                    seg: 0,
                    partial: true,
                },
            );
            let (outcome, _) = self.repo.put_object_fresh(&key, &whole[..])?;
            if outcome == PutOutcome::AlreadyExists {
                tracing::info!("{pname} is already archived (by archive-push): kept");
            }
            if let Err(e) = self
                .repo
                .storage
                .delete_prefix(&layout::stream_prefix(&name))
            {
                tracing::warn!("cannot delete the streamed chunks of {name}: {e}");
            }
        }
        tracing::info!(
            "timeline {} ended at {}; following timeline {next_tli}",
            self.tli,
            wal::format_lsn(start)
        );
        self.tli = next_tli;
        self.segno = start / self.seg_size;
        self.buf.clear();
        self.pos = 0;
        self.durable = 0;
        self.chunks.clear();
        self.unmerged = None;
        self.unflushed_since = None;
        Ok(())
    }

    fn store_history(&self, conn: &mut Connection, tli: u32) -> Result<()> {
        let (name, content) = conn.timeline_history(tli)?;
        let expected = format!("{tli:08X}.history");
        if name != expected {
            return Err(Error::io(
                "replication stream",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("TIMELINE_HISTORY {tli} named its file {name:?}"),
                ),
            ));
        }
        let key = layout::wal(&name, &WalFileKind::History { tli });
        self.put_same(&key, &content)
    }

    fn emit(&self, state: &str) {
        let flushed = self.flushed_lsn();
        let status = pg_backup_contract::StreamStatus {
            state: state.into(),
            slot: self.slot.clone(),
            timeline: self.tli,
            received_lsn: wal::format_lsn(self.received_lsn()),
            flushed_lsn: wal::format_lsn(flushed),
            server_lsn: self.server_lsn.map(wal::format_lsn),
            lag_bytes: self.server_lsn.map_or(0, |s| s.saturating_sub(flushed)),
            bytes_received: self.bytes_received,
            segments_stored: self.segments_stored,
            seconds_since_flush: self.last_flush.map(|t| t.elapsed().as_secs_f64()),
            synchronous: self.synchronous,
        };
        // The slot keeps every byte of this on the server's disk.
        if status.lag_bytes > LAG_WARN_SEGMENTS * self.seg_size {
            tracing::warn!(
                "the repository is {} MiB behind the server (slot {} keeps that WAL on the server's disk): the store is slow or was unreachable; see \"A receiver that fell behind\" in docs/disaster-recovery.md",
                status.lag_bytes >> 20,
                self.slot
            );
        }
        tracing::debug!(
            "{state}: timeline {} flushed {} lag {} bytes",
            status.timeline,
            status.flushed_lsn,
            status.lag_bytes
        );
        if self.json {
            crate::progress::event(&pg_backup_contract::Event::Stream(status));
        }
    }
}

fn unreachable_timeline(t: u32) -> Result<()> {
    Err(Error::Repository(format!(
        "timeline {t}: neither segments nor streamed chunks found on a second look"
    )))
}
