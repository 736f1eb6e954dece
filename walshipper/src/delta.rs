//! Block-level changes for differential and incremental backups.
//!
//! A large file is seen as 8 KiB blocks (PostgreSQL's page size). Its *block
//! map* holds a 128-bit hash (BLAKE3, truncated) of every block. A diff or
//! incr backup reads the file, hashes each block and compares it with the
//! reference backup's map: only blocks whose hash differs (or that lie beyond
//! the reference's end) are stored, as a *block delta*; with it goes a *map
//! delta* (the new hashes of those blocks and the new size), so that the next
//! backup can compare against this one without re-reading anything.
//!
//! Why content hashes and not page LSNs: PostgreSQL changes pages without
//! moving their LSN (visibility-map bits cleared by heap updates, hint bits
//! and PD_ALL_VISIBLE without data checksums, the free space map), and files
//! can be copied with old LSNs (CREATE DATABASE ... STRATEGY FILE_COPY). A
//! hash compares what is actually on disk, for every kind of file, so the
//! restored file is byte-identical to the one read, and restore can check
//! the whole file's hash. See docs/repository-format.md for the formats.
//!
//! A block's map entry is its BLAKE3 *chaining value* at its offset (the
//! node BLAKE3's own tree has for those 8 chunks), so the entries merged
//! give the whole file's standard BLAKE3 ([`TreeHash`]): a backup hashes
//! each byte once for both the map and the manifest. Maps written before
//! (`WSBMAP01`) hold BLAKE3 of each block alone; a chain keeps the kind its
//! full map has ([`MapKind`]).
//!
//! A changed block is stored whole, byte-delta filtered, or XORed with its
//! previous version (rebuilt from the reference chain: [`ChainBlocks`]),
//! whichever has the fewest nonzero bytes (`choose`); an XOR record
//! carries the hash of the block it applies to, and [`merge`] refuses it on
//! any other.

use std::io::{self, Read, Write};

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::codec::{read_full, HashAlg, PlainHash};

/// Block size of maps and deltas.
pub const BLOCK: usize = 8192;
/// Files at least this large get block maps and block deltas; smaller files
/// are compared whole (by their hash) and stored whole when they changed.
pub const MAP_MIN: u64 = 128 << 10;

/// The largest file a block map or delta may describe. PostgreSQL splits
/// relations into 1 GiB segment files; nothing else in a data directory
/// comes near. A size read back from the repository beyond this is damage,
/// refused before anything is allocated or a file is extended.
pub const MAX_FILE_SIZE: u64 = 1 << 40;
/// Header of a serialised map: magic, kind, size, count.
const MAP_HEADER: usize = 21;

/// Maps of [`MapKind::Block`] (written until 2026-11-27).
const MAP_MAGIC_1: &[u8; 8] = b"WSBMAP01";
/// Maps of [`MapKind::Tree`].
const MAP_MAGIC_2: &[u8; 8] = b"WSBMAP02";
const DELTA_MAGIC: &[u8; 8] = b"WSDELTA1";
/// Version 2 of block deltas: records may also be XORed and/or filtered.
const DELTA_MAGIC_2: &[u8; 8] = b"WSDELTA2";
/// Version 3: as version 2, but an XOR record names the block it applies
/// to by its [`MapKind::Tree`] hash (made against a version 02 map).
const DELTA_MAGIC_3: &[u8; 8] = b"WSDELTA3";
/// In a version 2 or 3 delta, this bit of a record's length marks an XOR record:
/// the 16-byte hash of the block it applies to, then the block's bytes
/// XORed with that block's (docs/repository-format.md).
const XOR: u32 = 1 << 31;
/// In a version 2 or 3 delta, bits 16..24 of a record's length: the stride of a
/// byte-delta filter over its bytes (0: none). Bits 24..30 are 0.
const STRIDE_SHIFT: u32 = 16;
const FLAGS: u32 = 0x7fff_0000;
/// The strides writers choose from and readers accept: PostgreSQL aligns
/// tuples to 8 bytes, and a btree leaf of int4/int8 keys holds 16-byte
/// index tuples (docs/performance.md, "Backup").
const STRIDES: [usize; 2] = [8, 16];

const END: u32 = u32::MAX;

/// How a changed whole block is stored: XORed with its previous version or
/// not, then byte-delta filtered with a stride or not: the choice with the
/// fewest nonzero bytes, which zstd then stores in the least space (on
/// pgbench pages, as small as choosing by the size zlib makes of each).
fn choose(new: &[u8], prev: Option<&[u8]>) -> (bool, usize) {
    let differ = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count();
    let nonzero = |a: &[u8]| a.iter().filter(|&&x| x != 0).count();
    let mut best = ((false, 0), nonzero(new));
    if let Some(p) = prev {
        let n = differ(new, p);
        if n < best.1 {
            best = ((true, 0), n);
        }
    }
    for s in STRIDES.into_iter().filter(|&s| s < new.len()) {
        let n = nonzero(&new[..s]) + differ(&new[s..], &new[..new.len() - s]);
        if n < best.1 {
            best = ((false, s), n);
        }
    }
    best.0
}

/// Undoes a byte-delta filter of stride `s` in place.
fn unfilter(data: &mut [u8], s: usize) {
    for i in s..data.len() {
        data[i] = data[i].wrapping_add(data[i - s]);
    }
}

pub type Hash = [u8; 16];

fn truncated(full: &[u8; 32]) -> Hash {
    let mut h = [0u8; 16];
    h.copy_from_slice(&full[..16]);
    h
}

/// BLAKE3 of a block alone, truncated to 128 bits: the entries of
/// [`MapKind::Block`] maps. Cryptographic (no one can craft a page that
/// passes for another), and about 2.3 times as fast as SHA-256 here
/// (examples/block_hash_speed.rs).
pub fn block_hash(block: &[u8]) -> Hash {
    truncated(blake3::hash(block).as_bytes())
}

/// What a map's entries are: how a block is hashed to compare it with one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MapKind {
    /// `WSBMAP01`: BLAKE3 of the block alone ([`block_hash`]).
    Block,
    /// `WSBMAP02`: the block's BLAKE3 chaining value at its offset
    /// ([`tree_block_hash`]), truncated to 128 bits. The same strength: a
    /// chaining value is a BLAKE3 compression output like the root, and it
    /// binds the offset (the chunk counter) too.
    #[default]
    Tree,
}

impl MapKind {
    /// The map entry of block `blk` whose bytes are `data` (1 to 8192).
    pub fn hash(self, blk: u64, data: &[u8]) -> Hash {
        match self {
            MapKind::Block => block_hash(data),
            MapKind::Tree => tree_block_hash(blk, data),
        }
    }

    fn magic(self) -> &'static [u8; 8] {
        match self {
            MapKind::Block => MAP_MAGIC_1,
            MapKind::Tree => MAP_MAGIC_2,
        }
    }
}

/// The chaining value of block `blk` (1 to 8192 bytes) as a subtree of its
/// file's BLAKE3 tree. Never panics: the offset is a multiple of 8 KiB
/// (so of BLAKE3's 1 KiB chunks), the input is not empty and fits the
/// largest subtree at that offset (8 KiB, or any length at offset 0);
/// an empty block hashes as BLAKE3 of nothing (no file has one).
/// A fresh hasher each time: `reset` keeps the last offset, which
/// `set_input_offset` then takes for input already accepted (and panics).
fn chaining_value(blk: u64, data: &[u8]) -> ChainingValue {
    if data.is_empty() || data.len() > BLOCK {
        return *blake3::hash(data).as_bytes();
    }
    blake3::Hasher::new()
        .set_input_offset(blk.saturating_mul(BLOCK as u64) & !(BLOCK as u64 - 1))
        .update(data)
        .finalize_non_root()
}

/// A [`MapKind::Tree`] map entry (one block; [`TreeHash`] hashes files).
pub fn tree_block_hash(blk: u64, data: &[u8]) -> Hash {
    truncated(&chaining_value(blk, data))
}

/// Hashes a file block by block, in order: each block's
/// [`MapKind::Tree`] entry, and at the end the file's standard BLAKE3
/// (what `blake3::hash` of its bytes gives), from the blocks' chaining
/// values merged as BLAKE3's own hasher merges its chunks: a stack of
/// complete subtrees, merged lazily so that the last merge is the root.
#[derive(Default)]
pub struct TreeHash {
    stack: Vec<ChainingValue>,
    blocks: u64,
    /// Block 0's bytes: a file of one block is its own root.
    first: Vec<u8>,
    /// A block shorter than 8 KiB was given: it must be the file's last.
    short: bool,
}

impl TreeHash {
    /// Hashes the next block (1 to 8192 bytes; only the last may be
    /// shorter) and returns its map entry.
    pub fn block(&mut self, data: &[u8]) -> io::Result<Hash> {
        if self.short || data.is_empty() || data.len() > BLOCK {
            return Err(io::Error::other(
                "block hash: a block after a short block, or of a bad length",
            ));
        }
        self.short = data.len() < BLOCK;
        let i = self.blocks;
        if i == 0 {
            self.first.clear();
            self.first.extend_from_slice(data);
        }
        // Before pushing block i, merge the completed subtrees: as many
        // stay as `i` has bits set (a block is 8 chunks, a power of two).
        while self.stack.len() > i.count_ones() as usize {
            self.merge_top();
        }
        let cv = chaining_value(i, data);
        self.stack.push(cv);
        self.blocks += 1;
        Ok(truncated(&cv))
    }

    /// Callers leave at least two subtrees on the stack.
    fn merge_top(&mut self) {
        debug_assert!(self.stack.len() >= 2);
        if let (Some(right), Some(left)) = (self.stack.pop(), self.stack.pop()) {
            self.stack
                .push(merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
    }

    /// The file's BLAKE3 (the stack is merged; no block may follow).
    pub fn root(&mut self) -> io::Result<PlainHash> {
        self.short = true;
        let bytes = if self.blocks <= 1 {
            *blake3::hash(&self.first).as_bytes()
        } else {
            while self.stack.len() > 2 {
                self.merge_top();
            }
            match (self.stack.pop(), self.stack.pop()) {
                (Some(right), Some(left)) => {
                    let root = merge_subtrees_root(&left, &right, Mode::Hash);
                    self.stack.extend([left, right]);
                    *root.as_bytes()
                }
                // Two or more blocks leave at least two subtrees.
                _ => return Err(io::Error::other("block hash: a subtree missing")),
            }
        };
        Ok(PlainHash {
            alg: HashAlg::Blake3,
            bytes,
        })
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("block map: {what}"))
}

/// The hash of every block of one version of a file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockMap {
    pub kind: MapKind,
    pub size: u64,
    pub hashes: Vec<Hash>,
}

/// Blocks in a file of `size` bytes (the last one may be partial).
pub fn blocks_in(size: u64) -> usize {
    usize::try_from(size.div_ceil(BLOCK as u64)).unwrap_or(usize::MAX)
}

/// The most bytes a serialised map (full or delta) of a file of `size`
/// bytes can take: the cap for reading one into memory.
pub fn map_len_max(size: u64) -> usize {
    blocks_in(size.min(MAX_FILE_SIZE))
        .saturating_mul(20)
        .saturating_add(MAP_HEADER)
}

impl BlockMap {
    /// Serialises a full map: magic, kind 0, size, count, hashes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(21 + self.hashes.len() * 16);
        v.extend_from_slice(self.kind.magic());
        v.push(0);
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&(self.hashes.len() as u32).to_le_bytes());
        for h in &self.hashes {
            v.extend_from_slice(h);
        }
        v
    }

    /// Serialises a map delta of a map of `kind`: magic, kind 1, new size,
    /// count, (block, hash)...
    pub fn encode_delta(kind: MapKind, size: u64, changed: &[(u32, Hash)]) -> Vec<u8> {
        let mut v = Vec::with_capacity(21 + changed.len() * 20);
        v.extend_from_slice(kind.magic());
        v.push(1);
        v.extend_from_slice(&size.to_le_bytes());
        v.extend_from_slice(&(changed.len() as u32).to_le_bytes());
        for (b, h) in changed {
            v.extend_from_slice(&b.to_le_bytes());
            v.extend_from_slice(h);
        }
        v
    }

    /// Applies a serialised map (full: replaces; delta: updates) to `self`.
    /// Every count and size is checked against the body's length and
    /// `MAX_FILE_SIZE` before anything is allocated; a delta must be of the
    /// kind of the map it updates; on error `self` is unchanged.
    pub fn apply(&mut self, body: &[u8]) -> io::Result<()> {
        let (Some(magic), Some(&kind), Some(size), Some(count), Some(rest)) = (
            body.get(..8),
            body.get(8),
            body.get(9..17),
            body.get(17..21),
            body.get(MAP_HEADER..),
        ) else {
            return Err(bad("shorter than its header"));
        };
        let map_kind = match magic {
            m if m == MAP_MAGIC_1 => MapKind::Block,
            m if m == MAP_MAGIC_2 => MapKind::Tree,
            m if m.starts_with(b"WSBMAP") => {
                return Err(bad(
                    "a map format this walshipper does not know (a newer one's?)",
                ))
            }
            _ => return Err(bad("bad header")),
        };
        let size = u64::from_le_bytes(size.try_into().map_err(|_| bad("size"))?);
        let count = u32::from_le_bytes(count.try_into().map_err(|_| bad("count"))?) as usize;
        if size > MAX_FILE_SIZE {
            return Err(bad("file size beyond the largest a map may describe"));
        }
        let n = blocks_in(size);
        match kind {
            0 => {
                if count != n || Some(rest.len()) != count.checked_mul(16) {
                    return Err(bad("full map length does not match its size"));
                }
                self.hashes = rest
                    .chunks_exact(16)
                    .map(|c| c.try_into().unwrap_or([0; 16]))
                    .collect();
                self.kind = map_kind;
            }
            1 => {
                // Entries of two kinds never compare equal: mixed, every
                // block would look changed, or a wrong one the same.
                if map_kind != self.kind {
                    return Err(bad("a map delta of another kind than the map it updates"));
                }
                if Some(rest.len()) != count.checked_mul(20) {
                    return Err(bad("map delta length does not match its count"));
                }
                // Every block past the earlier end is new, so a writer lists
                // it: a delta cannot grow the map by more than its count.
                if n > self.hashes.len().saturating_add(count) {
                    return Err(bad("map delta grows the file by more blocks than it lists"));
                }
                let mut hashes = self.hashes.clone();
                hashes.resize(n, [0; 16]);
                for rec in rest.chunks_exact(20) {
                    let (b, h) = rec.split_at(4);
                    let b = u32::from_le_bytes(b.try_into().map_err(|_| bad("block"))?) as usize;
                    let Some(slot) = hashes.get_mut(b) else {
                        return Err(bad("map delta names a block beyond the file"));
                    };
                    slot.copy_from_slice(h);
                }
                self.hashes = hashes;
            }
            _ => return Err(bad("unknown kind")),
        }
        self.size = size;
        Ok(())
    }
}

/// Compares a file with `map` block by block: None if it is identical, else
/// the first block that differs (or does not exist in `map`). Reads nothing
/// past the first difference.
pub fn first_change<R: Read>(mut r: R, map: &BlockMap) -> io::Result<Option<u32>> {
    let mut buf = vec![0u8; BLOCK];
    let mut size = 0u64;
    for (i, want) in map.hashes.iter().enumerate() {
        let n = read_full(&mut r, &mut buf)?;
        size += n as u64;
        // A short block is the file's end: different unless it is the map's last.
        if n == 0
            || (n < BLOCK && i + 1 < map.hashes.len())
            || map.kind.hash(i as u64, &buf[..n]) != *want
        {
            return Ok(Some(i as u32));
        }
    }
    if size == map.size && read_full(&mut r, &mut buf)? == 0 {
        Ok(None)
    } else {
        Ok(Some(map.hashes.len() as u32))
    }
}

/// Whether a file still matches `map` block for block.
pub fn unchanged<R: Read>(r: R, map: &BlockMap) -> io::Result<bool> {
    Ok(first_change(r, map)?.is_none())
}

/// Passes a file through unchanged while building its block map
/// ([`MapKind::Tree`]) and, in the same pass, its BLAKE3 hash: the object's
/// and the manifest's (`codec::SelfHashing`).
pub struct MapBuilder<R> {
    inner: R,
    pending: Vec<u8>,
    map: BlockMap,
    tree: TreeHash,
    /// Set by `plain_hash`: the end was reached and the last block hashed.
    ended: bool,
}

impl<R: Read> MapBuilder<R> {
    pub fn new(inner: R) -> Self {
        MapBuilder {
            inner,
            pending: Vec::with_capacity(BLOCK),
            map: BlockMap::default(),
            tree: TreeHash::default(),
            ended: false,
        }
    }

    /// Hashes the partial last block, once the reader reached the end.
    fn end(&mut self) -> io::Result<()> {
        if !self.ended && !self.pending.is_empty() {
            let h = self.tree.block(&self.pending)?;
            self.map.hashes.push(h);
            self.pending.clear();
        }
        self.ended = true;
        Ok(())
    }

    /// The map of everything read, once the reader reached the end.
    pub fn finish(mut self) -> io::Result<BlockMap> {
        self.end()?;
        Ok(self.map)
    }
}

impl<R: Read> crate::codec::SelfHashing for MapBuilder<R> {
    fn plain_hash(&mut self) -> io::Result<PlainHash> {
        self.end()?;
        self.tree.root()
    }
}

impl<R: Read> Read for MapBuilder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ended {
            return Err(io::Error::other("block map: read after its end"));
        }
        let n = self.inner.read(buf)?;
        self.map.size += n as u64;
        let mut data = &buf[..n];
        if !self.pending.is_empty() {
            let take = (BLOCK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == BLOCK {
                let h = self.tree.block(&self.pending)?;
                self.map.hashes.push(h);
                self.pending.clear();
            }
        }
        let mut chunks = data.chunks_exact(BLOCK);
        for c in &mut chunks {
            let h = self.tree.block(c)?;
            self.map.hashes.push(h);
        }
        self.pending.extend_from_slice(chunks.remainder());
        Ok(n)
    }
}

/// A callback for each changed block: (bytes, file offset).
type OnChanged = Box<dyn FnMut(&[u8], u64) + Send>;

/// The reference backup's version of a file, block by block: what an XOR
/// record of the next delta applies to.
pub trait PreviousBlocks {
    /// Puts block `blk` as the reference has it into `out` (empty past its
    /// end). Called with ascending block numbers.
    fn block(&mut self, blk: u32, out: &mut Vec<u8>) -> io::Result<()>;
}

/// Opens the reference's version when the first changed block that existed
/// before is met (a file that only grew opens nothing).
type OpenPrevious<'a> = Box<dyn FnOnce() -> io::Result<Box<dyn PreviousBlocks + 'a>> + 'a>;

enum Previous<'a> {
    None,
    Closed(OpenPrevious<'a>),
    Open(Box<dyn PreviousBlocks + 'a>),
}

/// Blocks read from the file at a time: 128 KiB, few system calls.
const READ_BLOCKS: usize = 16;

/// Reads a file and yields its block delta against `base` (version 3, or 2
/// against a [`MapKind::Block`] map): the
/// magic, then a record for every block that differs (`block u32, length
/// u32` with flags, for an XOR record the hash of the block it applies to,
/// then the bytes: whole, XORed and/or filtered as `choose` finds
/// smallest), then an end record `u32::MAX, 0, size u64`. Also computes the hash of the whole
/// file as read (BLAKE3: it is the new manifest entry's) and the map delta
/// (of the base's kind). Against a [`MapKind::Tree`] map the block hashes
/// merged are the file's hash; against an older map it is hashed apart.
pub struct DeltaReader<'a, R> {
    inner: R,
    base: BlockMap,
    /// The reference's blocks, for XOR records (version 2 and 3 deltas).
    previous: Previous<'a>,
    /// What `previous` is of, for its warnings.
    what: String,
    prev_buf: Vec<u8>,
    /// Why the reference's version is damaged, if reading it showed that.
    reference_doubt: Option<String>,
    /// The bytes of a record being encoded.
    enc_buf: Vec<u8>,
    xored: usize,
    filtered: usize,
    /// Called with each changed block and its offset (page checks).
    on_changed: Option<OnChanged>,
    out: Vec<u8>,
    out_pos: usize,
    next_block: u32,
    size: u64,
    /// The file's hash: its blocks' (Tree maps) or a stream's (Block maps).
    tree: Option<TreeHash>,
    sha: crate::codec::StreamHash,
    changed: Vec<(u32, Hash)>,
    /// A short read was the file's end: a file growing meanwhile is read
    /// no further (WAL replay brings what it wrote after).
    at_end: bool,
    done: bool,
}

/// What a DeltaReader found, once read to the end.
#[derive(Debug)]
pub struct DeltaSummary {
    pub size: u64,
    pub hash: PlainHash,
    /// Serialised map delta.
    pub map_delta: Vec<u8>,
    pub changed_blocks: usize,
    /// How many of them were stored as XOR records.
    pub xored_blocks: usize,
    /// How many of them were byte-delta filtered.
    pub filtered_blocks: usize,
    /// Set when the reference's version of a block could not be rebuilt
    /// from its chain (a missing or damaged object, a block that does not
    /// match the reference's map): a delta on that chain would not restore
    /// either, so the caller stores the file whole instead.
    pub reference_doubt: Option<String>,
}

impl<'a, R: Read> DeltaReader<'a, R> {
    pub fn new(inner: R, base: BlockMap) -> Self {
        let mut out = Vec::with_capacity(READ_BLOCKS * (BLOCK + 24) + 16);
        let tree = base.kind == MapKind::Tree;
        out.extend_from_slice(if tree { DELTA_MAGIC_3 } else { DELTA_MAGIC_2 });
        DeltaReader {
            inner,
            base,
            previous: Previous::None,
            what: String::new(),
            prev_buf: Vec::new(),
            reference_doubt: None,
            enc_buf: Vec::new(),
            xored: 0,
            filtered: 0,
            on_changed: None,
            out,
            out_pos: 0,
            next_block: 0,
            size: 0,
            tree: tree.then(TreeHash::default),
            sha: if tree {
                crate::codec::StreamHash::Done
            } else {
                crate::codec::StreamHash::new(HashAlg::Blake3, false)
            },
            changed: Vec::new(),
            at_end: false,
            done: false,
        }
    }

    /// Against a [`MapKind::Block`] map, computes the file's hash on a
    /// thread of its own (large files: the reading thread then only reads
    /// and compares block hashes). Against a Tree map there is no second hash.
    pub fn hash_on_own_thread(mut self) -> Self {
        if self.tree.is_none() {
            self.sha = crate::codec::StreamHash::new(HashAlg::Blake3, true);
        }
        self
    }

    /// Lets a changed block that existed in the reference whole, with the
    /// hash `base` gives it, be stored as an XOR record against the
    /// reference's version, which `open` gives (called at most once, when
    /// first needed). A block whose previous version
    /// cannot be read or does not match its hash is stored whole, and so
    /// is every later block of the file (a warning names `what`): the
    /// delta is correct either way, only larger. Must be called before
    /// anything is read.
    pub fn with_previous(
        mut self,
        what: String,
        open: impl FnOnce() -> io::Result<Box<dyn PreviousBlocks + 'a>> + 'a,
    ) -> Self {
        if self.next_block == 0 && self.out.len() == DELTA_MAGIC_2.len() && !self.done {
            self.previous = Previous::Closed(Box::new(open));
            self.what = what;
        }
        self
    }

    /// The reference's version of block `b` into `prev_buf`, if it is a
    /// whole block and has the hash the reference's map gives it: what an
    /// XOR record may apply to.
    fn previous(&mut self, b: u32) -> Option<Hash> {
        let &want = self.base.hashes.get(b as usize)?;
        if let Previous::Closed(_) = self.previous {
            let Previous::Closed(open) = std::mem::replace(&mut self.previous, Previous::None)
            else {
                return None;
            };
            match open() {
                Ok(p) => self.previous = Previous::Open(p),
                Err(e) => {
                    if e.kind() == io::ErrorKind::InvalidData {
                        self.reference_doubt = Some(e.to_string());
                    }
                    tracing::warn!(
                        "{}: storing its changed blocks whole: the reference backup's version cannot be read: {e}",
                        self.what
                    );
                    return None;
                }
            }
        }
        let Previous::Open(p) = &mut self.previous else {
            return None;
        };
        let why = match p.block(b, &mut self.prev_buf) {
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                self.reference_doubt = Some(format!("block {b}: {e}"));
                e.to_string()
            }
            Err(e) => e.to_string(),
            Ok(()) if self.prev_buf.len() != BLOCK => return None,
            Ok(()) if self.base.kind.hash(u64::from(b), &self.prev_buf) == want => {
                return Some(want)
            }
            Ok(()) => {
                let why = "it does not match the reference's block map".to_string();
                self.reference_doubt = Some(format!("block {b}: {why}"));
                why
            }
        };
        tracing::warn!(
            "{}: storing block {b} and the rest of the file's changed blocks whole: the reference backup's version of block {b}: {why}",
            self.what
        );
        self.previous = Previous::None;
        None
    }

    /// Calls `f(block bytes, file offset)` for every changed block.
    pub fn on_changed(mut self, f: impl FnMut(&[u8], u64) + Send + 'static) -> Self {
        self.on_changed = Some(Box::new(f));
        self
    }

    /// Reads up to the first changed block (or to the end if there is
    /// none): false if the file is identical to `base`, in which case
    /// nothing need be stored and the rest of the stream is not wanted.
    /// Lets a caller decide before it creates an object, in the same pass.
    pub fn differs(&mut self) -> io::Result<bool> {
        while self.changed.is_empty() && !self.done {
            self.read_chunk()?;
        }
        Ok(!self.changed.is_empty() || self.size != self.base.size)
    }

    pub fn finish(mut self) -> io::Result<DeltaSummary> {
        if !self.done {
            return Err(io::Error::other("block delta: finished before its end"));
        }
        let hash = match &mut self.tree {
            Some(t) => t.root()?,
            None => self.sha.finish()?,
        };
        Ok(DeltaSummary {
            size: self.size,
            hash,
            map_delta: BlockMap::encode_delta(self.base.kind, self.size, &self.changed),
            changed_blocks: self.changed.len(),
            xored_blocks: self.xored,
            filtered_blocks: self.filtered,
            reference_doubt: self.reference_doubt.take(),
        })
    }

    /// Reads the next blocks and appends their records (or the end
    /// record) to `out`.
    fn read_chunk(&mut self) -> io::Result<()> {
        let mut chunk = vec![0u8; READ_BLOCKS * BLOCK];
        let n = if self.at_end {
            0
        } else {
            read_full(&mut self.inner, &mut chunk)?
        };
        self.at_end = n < chunk.len();
        if n == 0 {
            self.out.extend_from_slice(&END.to_le_bytes());
            self.out.extend_from_slice(&0u32.to_le_bytes());
            self.out.extend_from_slice(&self.size.to_le_bytes());
            self.done = true;
            return Ok(());
        }
        chunk.truncate(n);
        for data in chunk.chunks(BLOCK) {
            let b = self.next_block;
            if b == END {
                return Err(io::Error::other("file too large for a block delta"));
            }
            self.next_block += 1;
            let h = match &mut self.tree {
                Some(t) => t.block(data)?,
                None => block_hash(data),
            };
            if self.base.hashes.get(b as usize) != Some(&h) {
                if let Some(f) = &mut self.on_changed {
                    f(data, u64::from(b) * BLOCK as u64);
                }
                self.changed.push((b, h));
                self.out.extend_from_slice(&b.to_le_bytes());
                let prev = if data.len() == BLOCK {
                    self.previous(b)
                } else {
                    None
                };
                let (xor, stride) = if data.len() == BLOCK {
                    choose(data, prev.map(|_| &self.prev_buf[..]))
                } else {
                    (false, 0)
                };
                if xor || stride != 0 {
                    // A changed heap page differs from its previous version
                    // in a few tuple-header bytes: XORed with it, it is
                    // mostly zeros. A btree page's entries repeat with their
                    // size: each byte minus the one a stride before is
                    // mostly zeros too. zstd stores either far smaller.
                    let mut flags = BLOCK as u32 | (stride as u32) << STRIDE_SHIFT;
                    self.enc_buf.clear();
                    self.enc_buf.extend_from_slice(data);
                    if let (true, Some(h)) = (xor, prev) {
                        flags |= XOR;
                        for (e, p) in self.enc_buf.iter_mut().zip(&self.prev_buf) {
                            *e ^= p;
                        }
                        self.xored += 1;
                        self.out.extend_from_slice(&flags.to_le_bytes());
                        self.out.extend_from_slice(&h);
                    } else {
                        self.out.extend_from_slice(&flags.to_le_bytes());
                    }
                    if stride != 0 {
                        self.filtered += 1;
                        let e = &self.enc_buf;
                        self.out.extend_from_slice(&e[..stride]);
                        self.out
                            .extend(e[stride..].iter().zip(e).map(|(x, y)| x.wrapping_sub(*y)));
                    } else {
                        self.out.extend_from_slice(&self.enc_buf);
                    }
                } else {
                    self.out
                        .extend_from_slice(&(data.len() as u32).to_le_bytes());
                    self.out.extend_from_slice(data);
                }
            }
        }
        self.size += n as u64;
        if self.tree.is_none() {
            self.sha.update(&std::sync::Arc::new(chunk))?;
        }
        Ok(())
    }
}

impl<R: Read> Read for DeltaReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            while self.out.is_empty() && !self.done {
                self.read_chunk()?;
            }
        }
        let n = buf.len().min(self.out.len() - self.out_pos);
        buf[..n].copy_from_slice(&self.out[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        Ok(n)
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("block delta: {what}"))
}

/// What comes next in a delta.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Next {
    /// A record: its block number and length (its bytes are in `data`).
    Record(u32, usize),
    /// The end record: the file's size after this delta.
    End(u64),
}

/// One block delta, read as a stream by [`merge`]. Every record is checked
/// before it is used: a block number and length that put it past
/// `MAX_FILE_SIZE`, a length of 0 or over a block, a block not after the
/// one before it (writers list each changed block once, in order), a block
/// after a short block, a block past the end record's size, a short block
/// that is not the file's last.
struct DeltaStream<R> {
    src: R,
    /// Version 2 or 3: XOR records allowed.
    v2: bool,
    /// Version 3: an XOR record names its block by its [`MapKind::Tree`] hash.
    xor_kind: MapKind,
    next: Next,
    data: Vec<u8>,
    /// The current record is an XOR record against the block with this hash.
    xor_base: Option<Hash>,
    last_blk: Option<u32>,
    /// The furthest byte any record wrote.
    written_to: u64,
    /// Where a short (partial) block ended, if one was written.
    partial_end: Option<u64>,
}

impl<R: Read> DeltaStream<R> {
    fn open(mut src: R) -> io::Result<Self> {
        let mut magic = [0u8; 8];
        if read_full(&mut src, &mut magic)? != 8 {
            return Err(invalid("not a block delta"));
        }
        let (v2, xor_kind) = match &magic {
            DELTA_MAGIC => (false, MapKind::Block),
            DELTA_MAGIC_2 => (true, MapKind::Block),
            DELTA_MAGIC_3 => (true, MapKind::Tree),
            m if m.starts_with(b"WSDELTA") => {
                return Err(invalid(
                    "a block delta of a later format: restore with a newer walshipper",
                ))
            }
            _ => return Err(invalid("not a block delta")),
        };
        let mut d = DeltaStream {
            src,
            v2,
            xor_kind,
            next: Next::End(0),
            data: Vec::with_capacity(BLOCK),
            xor_base: None,
            last_blk: None,
            written_to: 0,
            partial_end: None,
        };
        d.advance()?;
        Ok(d)
    }

    /// Reads the next record or the end record.
    fn advance(&mut self) -> io::Result<()> {
        let mut head = [0u8; 8];
        if read_full(&mut self.src, &mut head)? != 8 {
            return Err(invalid("ended without its end record"));
        }
        let blk = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let raw_len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        // In a version 1 delta any flag is a length over a block: refused.
        let flagged = self.v2 && blk != END;
        let xor = flagged && raw_len & XOR != 0;
        let stride = if flagged {
            ((raw_len & FLAGS) >> STRIDE_SHIFT) as usize
        } else {
            0
        };
        let len = (if flagged {
            raw_len & !(XOR | FLAGS)
        } else {
            raw_len
        }) as usize;
        if blk == END {
            let mut s = [0u8; 8];
            if read_full(&mut self.src, &mut s)? != 8 {
                return Err(invalid("ended inside its end record"));
            }
            let size = u64::from_le_bytes(s);
            if len != 0 || size > MAX_FILE_SIZE {
                return Err(invalid("end record with a bad size"));
            }
            if self.written_to > size {
                return Err(invalid("a block lies past the end record's size"));
            }
            if self.partial_end.is_some_and(|p| p != size) {
                return Err(invalid("a short block that is not the file's last"));
            }
            self.next = Next::End(size);
            return Ok(());
        }
        if len == 0 || len > BLOCK {
            return Err(invalid("record with a bad length"));
        }
        if xor && len != BLOCK {
            return Err(invalid("an XOR record of less than a whole block"));
        }
        if stride != 0 && (len != BLOCK || !STRIDES.contains(&stride)) {
            return Err(invalid(
                "a filtered record of less than a whole block or with an unknown stride",
            ));
        }
        let record_end = u64::from(blk) * BLOCK as u64 + len as u64;
        if record_end > MAX_FILE_SIZE {
            return Err(invalid(
                "block beyond the largest file a delta may describe",
            ));
        }
        if self.partial_end.is_some() {
            return Err(invalid("a block after a short block"));
        }
        if self.last_blk.is_some_and(|l| blk <= l) {
            return Err(invalid("blocks out of order or listed twice"));
        }
        self.xor_base = None;
        if xor {
            let mut h = [0u8; 16];
            if read_full(&mut self.src, &mut h)? != h.len() {
                return Err(invalid("ended inside a record"));
            }
            self.xor_base = Some(h);
        }
        self.data.resize(len, 0);
        if read_full(&mut self.src, &mut self.data)? != len {
            return Err(invalid("ended inside a record"));
        }
        if stride != 0 {
            unfilter(&mut self.data, stride);
        }
        self.last_blk = Some(blk);
        self.written_to = self.written_to.max(record_end);
        if len < BLOCK {
            self.partial_end = Some(record_end);
        }
        self.next = Next::Record(blk, len);
        Ok(())
    }

    /// Whether block `blk` keeps all its 8 KiB through this delta: no record
    /// for it, and the file's size after the delta reaches past it.
    fn leaves_whole(&self, blk: u64) -> bool {
        match self.next {
            // Records come in order and lie within the size.
            Next::Record(b, _) => u64::from(b) > blk,
            Next::End(size) => size >= (blk + 1) * BLOCK as u64,
        }
    }

    /// Applies this delta to block `blk`, whose bytes are `cur`: its record
    /// for the block if it has one, then its size, as writing in place and
    /// `set_len` would (but growing by zeros is refused).
    fn apply(&mut self, blk: u64, cur: &mut Vec<u8>) -> io::Result<()> {
        if let Next::Record(b, len) = self.next {
            if u64::from(b) == blk {
                match self.xor_base {
                    Some(h) => {
                        // Bound to the block it was made against: applied to
                        // anything else it would make a wrong page.
                        if cur.len() != BLOCK || self.xor_kind.hash(blk, cur) != h {
                            return Err(invalid(&format!(
                                "the XOR record of block {b} was made against another version of that block (its hash differs): the base or a delta before it in the chain is missing, damaged or out of order"
                            )));
                        }
                        for (c, d) in cur.iter_mut().zip(&self.data) {
                            *c ^= d;
                        }
                    }
                    None => {
                        if cur.len() < len {
                            cur.resize(len, 0);
                        }
                        cur[..len].copy_from_slice(&self.data[..len]);
                    }
                }
                self.advance()?;
            }
        }
        let start = blk * BLOCK as u64;
        let keep = match self.next {
            Next::Record(..) => BLOCK,
            Next::End(size) => size.saturating_sub(start).min(BLOCK as u64) as usize,
        };
        // Writers list every block past the earlier version's end, so a
        // file never grows by zeros: refusing it bounds what a delta can
        // make restore write by the bytes it holds.
        if keep > cur.len() {
            return Err(invalid("it grows the file without listing the new blocks"));
        }
        cur.truncate(keep);
        Ok(())
    }

    /// Reads past the records of blocks before `blk` (unused, checked).
    fn skip_before(&mut self, blk: u64) -> io::Result<()> {
        while let Next::Record(b, _) = self.next {
            if u64::from(b) >= blk {
                break;
            }
            self.advance()?;
        }
        Ok(())
    }

    /// Reads the rest: the remaining records (checked, unused: a later
    /// delta cut the file before them), the end record, and then nothing.
    fn drain(&mut self) -> io::Result<()> {
        while let Next::Record(..) = self.next {
            self.advance()?;
        }
        let mut extra = [0u8; 1];
        if read_full(&mut self.src, &mut extra)? != 0 {
            return Err(invalid("bytes after its end record"));
        }
        Ok(())
    }
}

/// Where a merge failed: reading the base, reading delta `n` (counting from
/// 0 in the order given), or writing the output.
#[derive(Debug)]
pub enum MergeError {
    Base(io::Error),
    Delta(usize, io::Error),
    Output(io::Error),
}

/// How much of the base is read at a time (whole blocks).
const MERGE_RUN: usize = 32 * BLOCK;

/// Rebuilds a file in one sequential pass from its earlier version `base`
/// and its block `deltas` (oldest first), all read as streams: every block
/// comes out as applying each delta in place would make it, and the output
/// is hashed on the way with `alg` (restore compares that hash with the
/// manifest's, of the same algorithm, which covers the base and every
/// delta). Nothing is written twice or read
/// back, and memory does not depend on the file's or the deltas' sizes.
/// `max_size` bounds the output (the manifest's size): a delta claiming a
/// larger file is refused before more is written.
pub fn merge<B: Read, R: Read, W: Write>(
    mut base: B,
    deltas: Vec<R>,
    out: &mut W,
    max_size: u64,
    alg: HashAlg,
) -> Result<PlainHash, MergeError> {
    let mut ds = Vec::with_capacity(deltas.len());
    for (n, d) in deltas.into_iter().enumerate() {
        ds.push(DeltaStream::open(d).map_err(|e| MergeError::Delta(n, e))?);
    }
    let last = ds.len().saturating_sub(1);
    if ds.is_empty() {
        return Err(MergeError::Delta(0, invalid("no delta to merge")));
    }
    let mut sha = alg.hasher();
    let mut written = 0u64;
    let mut emit = |bytes: &[u8]| -> Result<(), MergeError> {
        if written + bytes.len() as u64 > max_size {
            return Err(MergeError::Delta(
                last,
                invalid("the rebuilt file is larger than the manifest says"),
            ));
        }
        out.write_all(bytes).map_err(MergeError::Output)?;
        sha.update(bytes);
        written += bytes.len() as u64;
        Ok(())
    };
    let mut cur = Vec::with_capacity(BLOCK);
    let mut block = |ds: &mut Vec<DeltaStream<R>>,
                     blk: u64,
                     base: &[u8],
                     emit: &mut dyn FnMut(&[u8]) -> Result<(), MergeError>|
     -> Result<(), MergeError> {
        cur.clear();
        cur.extend_from_slice(base);
        for (n, d) in ds.iter_mut().enumerate() {
            d.apply(blk, &mut cur)
                .map_err(|e| MergeError::Delta(n, e))?;
        }
        emit(&cur)
    };
    let mut buf = vec![0u8; MERGE_RUN];
    let mut blk = 0u64;
    loop {
        let n = read_full(&mut base, &mut buf).map_err(MergeError::Base)?;
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            // A run of blocks no delta touches goes out as it is.
            let mut run = 0;
            while (run + 1) * BLOCK <= chunk.len()
                && ds.iter().all(|d| d.leaves_whole(blk + run as u64))
            {
                run += 1;
            }
            if run > 0 {
                emit(&chunk[..run * BLOCK])?;
                blk += run as u64;
                chunk = &chunk[run * BLOCK..];
                continue;
            }
            let take = chunk.len().min(BLOCK);
            block(&mut ds, blk, &chunk[..take], &mut emit)?;
            blk += 1;
            chunk = &chunk[take..];
        }
        if n < buf.len() {
            break; // the base's end (read_full fills the buffer until then)
        }
    }
    // Past the base's end: what the deltas wrote there, or zeros, up to the
    // last delta's size.
    loop {
        if let Next::End(size) = ds[last].next {
            if blk * BLOCK as u64 >= size {
                break;
            }
        }
        if blk * BLOCK as u64 >= max_size {
            return Err(MergeError::Delta(
                last,
                invalid("the rebuilt file is larger than the manifest says"),
            ));
        }
        block(&mut ds, blk, &[], &mut emit)?;
        blk += 1;
    }
    for (n, d) in ds.iter_mut().enumerate() {
        d.drain().map_err(|e| MergeError::Delta(n, e))?;
    }
    out.flush().map_err(MergeError::Output)?;
    Ok(sha.finalize())
}

/// A stream that can move forward without producing what it passes over.
pub trait SkipRead: Read {
    /// Moves to offset `to` (not before the current one); returns the
    /// offset reached: `to`, or less at the end.
    fn skip_to(&mut self, to: u64) -> io::Result<u64>;
}

impl<R: Read> SkipRead for crate::codec::DecodingReader<R> {
    fn skip_to(&mut self, to: u64) -> io::Result<u64> {
        crate::codec::DecodingReader::skip_to(self, to)
    }
}

impl<T: AsRef<[u8]>> SkipRead for io::Cursor<T> {
    fn skip_to(&mut self, to: u64) -> io::Result<u64> {
        let at = to
            .max(self.position())
            .min(self.get_ref().as_ref().len() as u64);
        self.set_position(at);
        Ok(at)
    }
}

/// A version of a file as a chain has it (a base and its deltas, oldest
/// first), read block by block in ascending order: only the base's frames
/// that hold a wanted block are decoded; the deltas are read as streams.
/// What it returns is not trusted: the caller compares each block with the
/// block map's hash before using it.
///
/// Reaching a block passes over the base's bytes before it (frames read,
/// not decoded). From a remote store that is a download, so there it is
/// bounded (`Some(budget)`): at most `SKIP_ALLOWANCE` plus `SKIP_PER_BLOCK`
/// for each block asked for; a block beyond the budget is left out (empty:
/// its changed version is stored whole). A local repository is read
/// without a bound: passing over a compressed base costs less than the
/// read of the source file the incremental makes anyway.
pub struct ChainBlocks<B, R> {
    base: B,
    deltas: Vec<DeltaStream<R>>,
    next: u64,
    /// Offset in the base of the next byte it returns.
    at: u64,
    budget: Option<u64>,
}

/// Bytes of a remote base passed over freely, per file.
pub const SKIP_ALLOWANCE: u64 = 16 << 20;
/// And for each changed block whose previous version is asked for.
pub const SKIP_PER_BLOCK: u64 = 32 * BLOCK as u64;

impl<B: SkipRead, R: Read> ChainBlocks<B, R> {
    /// `bounded`: the base is read from a remote store (see above).
    pub fn open(base: B, deltas: Vec<R>, bounded: bool) -> io::Result<Self> {
        let deltas = deltas
            .into_iter()
            .map(DeltaStream::open)
            .collect::<io::Result<Vec<_>>>()?;
        Ok(ChainBlocks {
            base,
            deltas,
            next: 0,
            at: 0,
            budget: bounded.then_some(SKIP_ALLOWANCE),
        })
    }
}

impl<B: SkipRead, R: Read> PreviousBlocks for ChainBlocks<B, R> {
    fn block(&mut self, blk: u32, out: &mut Vec<u8>) -> io::Result<()> {
        let blk = u64::from(blk);
        if blk < self.next {
            return Err(io::Error::other("blocks asked for out of order"));
        }
        self.next = blk + 1;
        out.clear();
        let start = blk * BLOCK as u64;
        if let Some(budget) = &mut self.budget {
            *budget = budget.saturating_add(SKIP_PER_BLOCK);
            let pass = start.saturating_sub(self.at);
            if pass > *budget {
                // Too far to download for one block: left out (stored whole).
                for d in &mut self.deltas {
                    d.skip_before(blk)?;
                }
                return Ok(());
            }
            *budget -= pass;
        }
        if self.base.skip_to(start)? == start {
            out.resize(BLOCK, 0);
            let n = read_full(&mut self.base, out)?;
            out.truncate(n);
            self.at = start + n as u64;
        } else {
            self.at = start;
        }
        // Each delta as `merge` applies it, after passing over its records
        // of the blocks before.
        for d in &mut self.deltas {
            d.skip_before(blk)?;
            d.apply(blk, out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    fn map_of(data: &[u8]) -> BlockMap {
        let mut m = MapBuilder::new(data);
        io::copy(&mut m, &mut io::sink()).unwrap();
        m.finish().unwrap()
    }

    /// The map an earlier walshipper wrote (`WSBMAP01`).
    pub(crate) fn block_map_of(data: &[u8]) -> BlockMap {
        BlockMap {
            kind: MapKind::Block,
            size: data.len() as u64,
            hashes: data.chunks(BLOCK).map(block_hash).collect(),
        }
    }

    fn map_of_kind(data: &[u8], kind: MapKind) -> BlockMap {
        match kind {
            MapKind::Block => block_map_of(data),
            MapKind::Tree => map_of(data),
        }
    }

    #[test]
    fn tree_hashes_merge_into_the_files_blake3() {
        let sample: Vec<u8> = (0..40 * BLOCK + 3000)
            .map(|i| (i * 7 % 251) as u8 ^ (i >> 13) as u8)
            .collect();
        // Around a chunk, a block and the tree's powers of two; then
        // pseudo-random lengths.
        let mut lens = vec![
            0, 1, 1023, 1024, 1025, 8191, 8192, 8193, 16383, 16384, 16385,
        ];
        for b in [3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40] {
            lens.extend([b * BLOCK - 1, b * BLOCK, b * BLOCK + 1, b * BLOCK + 1024]);
        }
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..40 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lens.push((rng >> 33) as usize % sample.len());
        }
        for n in lens.into_iter().filter(|&n| n <= sample.len()) {
            let data = &sample[..n];
            let want = HashAlg::Blake3.digest(data);
            // Read in pieces that cut blocks anywhere: a few bytes at a
            // time, and 20000 (a pending block finished, whole blocks, a
            // new pending one, in one read).
            let mut mb = MapBuilder::new(Trickle(data));
            io::copy(&mut mb, &mut io::sink()).unwrap();
            assert_eq!(
                crate::codec::SelfHashing::plain_hash(&mut mb).unwrap(),
                want,
                "{n}"
            );
            let map = mb.finish().unwrap();
            let mut mb2 = MapBuilder::new(data);
            let mut piece = vec![0u8; 20000];
            while mb2.read(&mut piece).unwrap() > 0 {}
            assert_eq!(
                crate::codec::SelfHashing::plain_hash(&mut mb2).unwrap(),
                want,
                "{n}"
            );
            assert_eq!(mb2.finish().unwrap(), map, "{n}");
            assert_eq!((map.kind, map.size), (MapKind::Tree, n as u64));
            assert_eq!(map.hashes.len(), blocks_in(n as u64), "{n}");
            for (i, b) in data.chunks(BLOCK).enumerate() {
                assert_eq!(map.hashes[i], tree_block_hash(i as u64, b), "{n} block {i}");
            }
            let mut t = TreeHash::default();
            for b in data.chunks(BLOCK) {
                t.block(b).unwrap();
            }
            assert_eq!(t.root().unwrap(), want, "{n}");
        }
        // The same bytes at another offset hash differently: an entry is
        // bound to its block.
        let page = &sample[..BLOCK];
        assert_ne!(tree_block_hash(0, page), tree_block_hash(1, page));
        assert_ne!(tree_block_hash(1, page), block_hash(page));
        // A block after a short one, or an empty one, is refused.
        let mut t = TreeHash::default();
        t.block(&page[..100]).unwrap();
        assert!(t.block(page).is_err());
        assert!(TreeHash::default().block(&[]).is_err());
    }

    fn roundtrip(old: &[u8], new: &[u8]) -> usize {
        let n = roundtrip_kind(old, new, MapKind::Tree);
        assert_eq!(roundtrip_kind(old, new, MapKind::Block), n);
        n
    }

    /// Against a map of `kind`: the delta's version, the file's hash, the
    /// map delta's kind, the rebuilt bytes.
    fn roundtrip_kind(old: &[u8], new: &[u8], kind: MapKind) -> usize {
        let map_of = |d: &[u8]| map_of_kind(d, kind);
        let base = map_of(old);
        assert!(unchanged(old, &base).unwrap());
        assert_eq!(unchanged(new, &base).unwrap(), old == new);
        let mut r = DeltaReader::new(new, base.clone());
        let mut delta = Vec::new();
        r.read_to_end(&mut delta).unwrap();
        let s = r.finish().unwrap();
        assert_eq!(s.hash, HashAlg::Blake3.digest(new));
        let magic: &[u8] = match kind {
            MapKind::Tree => DELTA_MAGIC_3,
            MapKind::Block => DELTA_MAGIC_2,
        };
        assert_eq!(&delta[..8], magic);
        assert_eq!(&s.map_delta[..8], kind.magic());
        // Asked first whether the file differs (the same pass), and hashed
        // on a thread of its own: the same stream and summary.
        let mut r2 = DeltaReader::new(new, base.clone()).hash_on_own_thread();
        assert_eq!(r2.differs().unwrap(), old != new);
        let mut delta2 = Vec::new();
        r2.read_to_end(&mut delta2).unwrap();
        assert!(delta2 == delta, "differs() changed the stream");
        let s2 = r2.finish().unwrap();
        assert_eq!((s2.hash, &s2.map_delta), (s.hash, &s.map_delta));
        // Merged with the old version, both read in small pieces.
        let mut got = Vec::new();
        let sha = merge(
            Trickle(old),
            vec![Trickle(&delta)],
            &mut got,
            new.len() as u64,
            HashAlg::Blake3,
        )
        .unwrap();
        assert!(got == new, "applied delta differs");
        assert_eq!(sha, s.hash);
        // A manifest entry of an older version (SHA-256) is checked with
        // its own algorithm.
        let sha2 = merge(
            Trickle(old),
            vec![Trickle(&delta)],
            &mut io::sink(),
            new.len() as u64,
            HashAlg::Sha256,
        )
        .unwrap();
        assert_eq!(sha2, HashAlg::Sha256.digest(new));
        // The map after the delta is the map of the new file.
        let mut m = base;
        m.apply(&s.map_delta).unwrap();
        assert_eq!(m, map_of(new));
        let mut m2 = BlockMap::default();
        m2.apply(&map_of(new).encode()).unwrap();
        assert_eq!(m2, map_of(new));
        // A map delta of the other kind is refused.
        let mut other = map_of_kind(old, kind);
        other.kind = match kind {
            MapKind::Tree => MapKind::Block,
            MapKind::Block => MapKind::Tree,
        };
        assert!(other.apply(&s.map_delta).is_err());
        s.changed_blocks
    }

    fn data(blocks: usize, seed: u8) -> Vec<u8> {
        (0..blocks * BLOCK)
            .map(|i| (i / 7) as u8 ^ seed.wrapping_mul((i % 251) as u8))
            .collect()
    }

    #[test]
    fn deltas_store_only_changed_blocks_and_rebuild_the_file() {
        let old = data(40, 3);
        assert_eq!(roundtrip(&old, &old), 0);
        let mut new = old.clone();
        new[5 * BLOCK + 17] ^= 1;
        new[30 * BLOCK] ^= 1;
        assert_eq!(roundtrip(&old, &new), 2);
        // Grown by two and a half blocks, shrunk, and a partial last block.
        let mut grown = old.clone();
        grown.extend_from_slice(&data(3, 9)[..2 * BLOCK + 100]);
        assert_eq!(roundtrip(&old, &grown), 3);
        assert_eq!(roundtrip(&grown, &old), 0);
        assert_eq!(roundtrip(&old, &old[..10 * BLOCK]), 0);
        assert_eq!(roundtrip(&old, &[]), 0);
        assert_eq!(roundtrip(&[], &old), 40);
        let mut odd = old[..3 * BLOCK + 5].to_vec();
        assert_eq!(roundtrip(&old[..3 * BLOCK + 9], &odd), 1);
        odd.push(1);
        assert_eq!(roundtrip(&odd, &old), 37);
    }

    #[test]
    fn broken_deltas_and_maps_are_refused() {
        let old = data(4, 1);
        let mut new = old.clone();
        new[0] ^= 1;
        let mut r = DeltaReader::new(&new[..], map_of(&old));
        let mut delta = Vec::new();
        r.read_to_end(&mut delta).unwrap();
        let merged = |d: &[u8]| merge(&old[..], vec![d], &mut Vec::new(), 1 << 20, HashAlg::Blake3);
        assert!(merged(&delta).is_ok());
        assert!(
            merged(&delta[..delta.len() - 16]).is_err(),
            "a delta without its end record"
        );
        assert!(merged(b"NOTADELTA-------").is_err());
        let mut m = BlockMap::default();
        assert!(m.apply(b"WSBMAP01").is_err());
        let mut full = map_of(&old).encode();
        full.pop();
        assert!(m.apply(&full).is_err());
    }

    fn map_body(kind: u8, size: u64, count: u32, rest: &[u8]) -> Vec<u8> {
        let mut v = MAP_MAGIC_2.to_vec();
        v.push(kind);
        v.extend_from_slice(&size.to_le_bytes());
        v.extend_from_slice(&count.to_le_bytes());
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn hostile_maps_are_refused_before_allocating() {
        let base = map_of(&data(4, 1));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("header only, short", b"WSBMAP01\0\0\0".to_vec()),
            ("u64::MAX size", map_body(0, u64::MAX, 0, &[])),
            ("size past the cap", map_body(0, MAX_FILE_SIZE + 1, 0, &[])),
            ("huge count, no hashes", map_body(0, 1 << 30, u32::MAX, &[])),
            (
                "count matches size, hashes missing",
                map_body(0, 1 << 30, 131_072, &[0; 32]),
            ),
            (
                "delta, huge count",
                map_body(1, 4 * 8192, u32::MAX, &[0; 20]),
            ),
            // A delta that claims 1 TiB with no records would make the map
            // grow by 2 GiB of hashes.
            (
                "delta grows without records",
                map_body(1, MAX_FILE_SIZE, 0, &[]),
            ),
            (
                "delta block past the end",
                map_body(
                    1,
                    4 * 8192,
                    1,
                    &[&9u32.to_le_bytes()[..], &[0; 16]].concat(),
                ),
            ),
            ("unknown kind", map_body(7, 0, 0, &[])),
            ("a later version", {
                let mut v = map_body(1, 4 * 8192, 0, &[]);
                v[..8].copy_from_slice(b"WSBMAP03");
                v
            }),
            ("a delta of the older kind", {
                let mut v = map_body(1, 4 * 8192, 0, &[]);
                v[..8].copy_from_slice(MAP_MAGIC_1);
                v
            }),
        ];
        for (what, body) in cases {
            let mut m = base.clone();
            assert!(m.apply(&body).is_err(), "{what}");
            assert_eq!(m, base, "{what}: the map changed");
        }
        assert!(map_len_max(u64::MAX) <= 21 + 20 * (MAX_FILE_SIZE as usize / BLOCK));
        assert_eq!(blocks_in(u64::MAX), (u64::MAX / 8192 + 1) as usize);
    }

    fn record(blk: u32, len: u32, bytes: usize) -> Vec<u8> {
        let mut v = blk.to_le_bytes().to_vec();
        v.extend_from_slice(&len.to_le_bytes());
        v.extend(std::iter::repeat_n(7u8, bytes));
        v
    }

    fn end(size: u64) -> Vec<u8> {
        let mut v = END.to_le_bytes().to_vec();
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&size.to_le_bytes());
        v
    }

    /// The file merged from a two-block base and the delta made of `parts`;
    /// its size.
    fn apply_delta(parts: &[Vec<u8>]) -> Result<u64, MergeError> {
        let mut delta = DELTA_MAGIC.to_vec();
        for p in parts {
            delta.extend_from_slice(p);
        }
        let mut out = Vec::new();
        merge(
            &data(2, 1)[..],
            vec![&delta[..]],
            &mut out,
            MAX_FILE_SIZE,
            HashAlg::Blake3,
        )?;
        Ok(out.len() as u64)
    }

    /// Reads at most 7 bytes at a time, as a stream may.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(7);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// What writing each record in place and then setting the size does.
    fn apply_in_place(file: &mut Vec<u8>, delta: &[u8]) {
        let mut pos = 8;
        loop {
            let blk = u32::from_le_bytes(delta[pos..pos + 4].try_into().unwrap());
            let len = u32::from_le_bytes(delta[pos + 4..pos + 8].try_into().unwrap()) as usize;
            if blk == END {
                let size = u64::from_le_bytes(delta[pos + 8..pos + 16].try_into().unwrap());
                file.resize(size as usize, 0);
                return;
            }
            let at = blk as usize * BLOCK;
            if file.len() < at + len {
                file.resize(at + len, 0);
            }
            file[at..at + len].copy_from_slice(&delta[pos + 8..pos + 8 + len]);
            pos += 8 + len;
        }
    }

    /// A random delta of the kind writers make on a file of `prev` bytes:
    /// blocks in order, every block past the earlier end listed, sizes that
    /// shrink and grow.
    fn random_delta(rng: &mut u64, prev: u64, blocks_max: u64) -> Vec<u8> {
        let mut next = || {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng
        };
        let size = next() % (blocks_max * BLOCK as u64 + 1);
        let mut v = DELTA_MAGIC.to_vec();
        let first_new = prev / BLOCK as u64;
        for blk in 0..size.div_ceil(BLOCK as u64) {
            if blk >= first_new || next() % 3 == 0 {
                let len = (size - blk * BLOCK as u64).min(BLOCK as u64);
                v.extend(record(blk as u32, len as u32, 0));
                v.extend(std::iter::repeat_n((next() % 251) as u8, len as usize));
            }
        }
        v.extend(end(size));
        v
    }

    #[test]
    fn merging_gives_the_bytes_of_applying_in_place() {
        for seed in 1..400u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let base_blocks = (seed % 7) as usize;
            let mut base = data(base_blocks + 1, seed as u8);
            base.truncate(base.len() - (seed as usize * 37) % BLOCK);
            let mut expected = base.clone();
            let mut deltas = Vec::new();
            for _ in 0..1 + seed % 3 {
                let d = random_delta(&mut rng, expected.len() as u64, 8);
                apply_in_place(&mut expected, &d);
                deltas.push(d);
            }
            let mut out = Vec::new();
            let sha = merge(
                Trickle(&base),
                deltas.iter().map(|d| Trickle(d)).collect(),
                &mut out,
                expected.len() as u64,
                HashAlg::Sha256,
            )
            .unwrap();
            assert!(out == expected, "seed {seed}");
            assert_eq!(sha, HashAlg::Sha256.digest(&expected), "seed {seed}");
            // A bound below the rebuilt size is refused.
            if !expected.is_empty() {
                let refused = merge(
                    &base[..],
                    deltas.iter().map(|d| &d[..]).collect(),
                    &mut Vec::new(),
                    expected.len() as u64 - 1,
                    HashAlg::Blake3,
                );
                assert!(refused.is_err(), "seed {seed}");
            }
        }
    }

    #[test]
    fn hostile_deltas_are_refused() {
        let blk = BLOCK as u32;
        assert_eq!(
            apply_delta(&[record(1, blk, BLOCK), end(2 * 8192)]).unwrap(),
            16384
        );
        assert_eq!(
            apply_delta(&[record(2, 5, 5), end(2 * 8192 + 5)]).unwrap(),
            16389
        );
        for (what, parts) in [
            ("length 0", vec![record(0, 0, 0), end(8192)]),
            (
                "length over a block",
                vec![record(0, blk + 1, BLOCK + 1), end(8192)],
            ),
            ("length u32::MAX", vec![record(0, u32::MAX, 0), end(8192)]),
            (
                "block past the cap",
                vec![record(END - 1, blk, BLOCK), end(8192)],
            ),
            (
                "block past the end size",
                vec![record(5, blk, BLOCK), end(8192)],
            ),
            ("u64::MAX size", vec![end(u64::MAX)]),
            ("grown by zeros", vec![end(3 * 8192)]),
            ("size past the cap", vec![end(MAX_FILE_SIZE + 1)]),
            ("short block not last", vec![record(0, 5, 5), end(2 * 8192)]),
            (
                "block after a short block",
                vec![record(0, 5, 5), record(1, blk, BLOCK), end(2 * 8192)],
            ),
            ("end record with a length", {
                let mut e = end(8192);
                e[4] = 1;
                vec![e]
            }),
            ("no end record", vec![record(0, blk, BLOCK)]),
            ("bytes after the end", vec![end(8192), vec![0]]),
            (
                "blocks out of order",
                vec![record(1, blk, BLOCK), record(0, blk, BLOCK), end(2 * 8192)],
            ),
            (
                "a block twice",
                vec![record(1, blk, BLOCK), record(1, blk, BLOCK), end(2 * 8192)],
            ),
        ] {
            assert!(apply_delta(&parts).is_err(), "{what}");
        }
    }

    /// A slice that skips forward as a decoder does.
    struct Skipper<'a>(&'a [u8], u64);

    impl Read for Skipper<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let rest = self.0.get(self.1 as usize..).unwrap_or_default();
            let n = buf.len().min(rest.len()).min(7);
            buf[..n].copy_from_slice(&rest[..n]);
            self.1 += n as u64;
            Ok(n)
        }
    }

    impl SkipRead for Skipper<'_> {
        fn skip_to(&mut self, to: u64) -> io::Result<u64> {
            self.1 = self.1.max(to.min(self.0.len() as u64));
            Ok(self.1)
        }
    }

    #[test]
    fn a_remote_base_is_passed_over_only_within_the_budget() {
        // 24 MiB of blocks, each filled with its number.
        let blocks = (24 << 20) / BLOCK;
        let base: Vec<u8> = (0..blocks).flat_map(|b| vec![b as u8; BLOCK]).collect();
        let far = (SKIP_ALLOWANCE / BLOCK as u64 + 100) as u32;
        let mut out = Vec::new();
        // Local: any block.
        let mut c =
            ChainBlocks::open(io::Cursor::new(&base[..]), Vec::<&[u8]>::new(), false).unwrap();
        c.block(far, &mut out).unwrap();
        assert_eq!(out, vec![far as u8; BLOCK]);
        // Remote: a block within the allowance, then one too far is left out
        // (empty), then one near the last one read comes again.
        let mut c =
            ChainBlocks::open(io::Cursor::new(&base[..]), Vec::<&[u8]>::new(), true).unwrap();
        c.block(3, &mut out).unwrap();
        assert_eq!(out, vec![3u8; BLOCK]);
        c.block(far, &mut out).unwrap();
        assert!(
            out.is_empty(),
            "passed over {} MiB for one block",
            (far as usize * BLOCK) >> 20
        );
        c.block(far + 1, &mut out).unwrap();
        assert!(out.is_empty());
        let mut c =
            ChainBlocks::open(io::Cursor::new(&base[..]), Vec::<&[u8]>::new(), true).unwrap();
        c.block(1000, &mut out).unwrap();
        c.block(1001, &mut out).unwrap();
        assert_eq!(out, vec![(1001 % 256) as u8; BLOCK]);
    }

    /// The delta of `new` against the chain `base` + `deltas` (whose result
    /// is `prev`), with XOR records; and its summary.
    fn xor_delta(
        base: &[u8],
        deltas: &[Vec<u8>],
        prev: &[u8],
        new: &[u8],
    ) -> (Vec<u8>, DeltaSummary) {
        xor_delta_kind(MapKind::Tree, base, deltas, prev, new)
    }

    /// As `xor_delta`, against a map of `kind`.
    fn xor_delta_kind(
        kind: MapKind,
        base: &[u8],
        deltas: &[Vec<u8>],
        prev: &[u8],
        new: &[u8],
    ) -> (Vec<u8>, DeltaSummary) {
        let deltas: Vec<&[u8]> = deltas.iter().map(|d| &d[..]).collect();
        let mut r = DeltaReader::new(new, map_of_kind(prev, kind)).with_previous(
            "test".into(),
            move || {
                let chain = ChainBlocks::open(Skipper(base, 0), deltas, false)?;
                Ok(Box::new(chain) as Box<dyn PreviousBlocks + '_>)
            },
        );
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        (out, r.finish().unwrap())
    }

    /// A page-like change: a few bytes of every 128 flipped.
    fn touch(v: &mut [u8], blk: usize, seed: u8) {
        for i in (blk * BLOCK..(blk + 1) * BLOCK).step_by(128) {
            v[i] ^= seed | 1;
        }
    }

    fn merged(base: &[u8], deltas: &[Vec<u8>], max: u64) -> Result<Vec<u8>, MergeError> {
        let mut out = Vec::new();
        merge(
            Trickle(base),
            deltas.iter().map(|d| Trickle(d)).collect(),
            &mut out,
            max,
            HashAlg::Blake3,
        )?;
        Ok(out)
    }

    #[test]
    fn xor_records_round_trip_through_a_chain() {
        xor_round_trip(MapKind::Tree);
        xor_round_trip(MapKind::Block);
    }

    /// Against maps of `kind`: version 3 deltas (Tree) or 2 (Block).
    fn xor_round_trip(kind: MapKind) {
        let map_of = |d: &[u8]| map_of_kind(d, kind);
        let magic: &[u8] = match kind {
            MapKind::Tree => DELTA_MAGIC_3,
            MapKind::Block => DELTA_MAGIC_2,
        };
        let v0 = data(40, 5);
        let mut versions = vec![v0.clone()];
        let mut deltas: Vec<Vec<u8>> = Vec::new();
        // Block 7 changes in every version (the same block through XOR
        // records on XOR records), others now and then; the file grows by
        // a whole and a partial block, then shrinks.
        for k in 1..=4u8 {
            let mut next = versions.last().unwrap().clone();
            touch(&mut next, 7, k);
            touch(&mut next, 10 + k as usize, k);
            match k {
                2 => next.extend_from_slice(&data(2, 9)[..BLOCK + 300]),
                3 => next.truncate(38 * BLOCK),
                _ => {}
            }
            let prev = versions.last().unwrap().clone();
            let prev = &prev[..];
            let (d, sum) = xor_delta_kind(kind, &v0, &deltas, prev, &next);
            assert_eq!(&d[..8], magic);
            assert_eq!(sum.xored_blocks, 2, "version {k}");
            assert_eq!(sum.hash, HashAlg::Blake3.digest(&next));
            let mut m = map_of(prev);
            m.apply(&sum.map_delta).unwrap();
            assert_eq!(m, map_of(&next));
            deltas.push(d);
            versions.push(next);
            // The chain rebuilds every version, block 7 through each layer.
            let got = merged(&v0, &deltas, MAX_FILE_SIZE).unwrap();
            assert!(got == *versions.last().unwrap(), "version {k}");
            // An XOR record stores the changed bytes, far fewer than a block.
            let plain = {
                let mut r = DeltaReader::new(&versions[k as usize][..], map_of(prev));
                let mut v = Vec::new();
                r.read_to_end(&mut v).unwrap();
                v
            };
            let z = |v: &[u8]| zstd::bulk::compress(v, 3).unwrap().len();
            assert!(z(deltas.last().unwrap()) * 2 < z(&plain), "version {k}");
        }
        // A delta left out, or the chain on another base: refused loudly.
        let skipped = vec![deltas[0].clone(), deltas[2].clone()];
        let err = merged(&v0, &skipped, MAX_FILE_SIZE).unwrap_err();
        assert!(
            matches!(&err, MergeError::Delta(1, e) if e.to_string().contains("another version")),
            "{err:?}"
        );
        assert!(merged(&data(40, 6), &deltas[..1], MAX_FILE_SIZE).is_err());
        // Read by a reader that knows only version 1: refused, never misread.
        let mut v1 = deltas[0].clone();
        v1[..8].copy_from_slice(DELTA_MAGIC);
        assert!(merged(&v0, &[v1], MAX_FILE_SIZE).is_err());
    }

    #[test]
    fn a_previous_version_that_does_not_match_its_map_gives_whole_blocks() {
        let v0 = data(8, 2);
        let mut v1 = v0.clone();
        touch(&mut v1, 1, 3);
        touch(&mut v1, 5, 3);
        // The chain read back gives other bytes than the map says.
        let wrong = data(8, 4);
        let (d, sum) = xor_delta(&wrong, &[], &v0, &v1);
        assert_eq!((sum.changed_blocks, sum.xored_blocks), (2, 0));
        assert!(merged(&v0, &[d], MAX_FILE_SIZE).unwrap() == v1);
        // A chain that cannot be opened: the same.
        let mut r = DeltaReader::new(&v1[..], map_of(&v0))
            .with_previous("test".into(), || Err(io::Error::other("unreachable store")));
        let mut d = Vec::new();
        r.read_to_end(&mut d).unwrap();
        assert_eq!(r.finish().unwrap().xored_blocks, 0);
        assert!(merged(&v0, &[d], MAX_FILE_SIZE).unwrap() == v1);
    }

    fn xor_record(blk: u32, len: u32, hash: &[u8], bytes: usize) -> Vec<u8> {
        let mut v = blk.to_le_bytes().to_vec();
        v.extend_from_slice(&(len | XOR).to_le_bytes());
        v.extend_from_slice(hash);
        v.extend(std::iter::repeat_n(0u8, bytes));
        v
    }

    #[test]
    fn hostile_xor_records_are_refused() {
        let base = data(2, 1);
        let h = block_hash(&base[BLOCK..]);
        let blk = BLOCK as u32;
        let apply = |magic: &[u8], parts: &[Vec<u8>]| {
            let mut d = magic.to_vec();
            for p in parts {
                d.extend_from_slice(p);
            }
            merged(&base, &[d], MAX_FILE_SIZE)
        };
        let apply2 = |parts: &[Vec<u8>]| apply(DELTA_MAGIC_2, parts);
        // The well-formed one: XOR of zeros against the right block.
        assert!(apply2(&[xor_record(1, blk, &h, BLOCK), end(2 * 8192)]).unwrap() == base);
        for (what, parts) in [
            (
                "wrong base hash",
                vec![xor_record(1, blk, &[0; 16], BLOCK), end(16384)],
            ),
            (
                "short XOR record",
                vec![xor_record(1, 100, &h, 100), end(16384)],
            ),
            ("XOR length 0", vec![xor_record(1, 0, &h, 0), end(16384)]),
            (
                "XOR length over a block",
                vec![xor_record(1, blk + 1, &h, BLOCK + 1), end(16384)],
            ),
            (
                "XOR length u31::MAX",
                vec![xor_record(1, u32::MAX >> 1, &h, 0), end(16384)],
            ),
            ("ends inside the hash", vec![xor_record(1, blk, &h[..5], 0)]),
            ("ends inside the bytes", vec![xor_record(1, blk, &h, 100)]),
            (
                "XOR past the base's end",
                vec![xor_record(2, blk, &h, BLOCK), end(3 * 8192)],
            ),
            (
                "XOR past the base's end after a cut",
                vec![xor_record(1, blk, &h, BLOCK), end(8192)],
            ),
            ("XOR on the end record", {
                let mut e = end(16384);
                e[4..8].copy_from_slice(&XOR.to_le_bytes());
                vec![e]
            }),
        ] {
            assert!(apply2(&parts).is_err(), "{what}");
        }
        // Version 3 names the block by its tree hash; a record naming it
        // by the other kind's hash is refused, in either version.
        let t = tree_block_hash(1, &base[BLOCK..]);
        let apply3 = |parts: &[Vec<u8>]| apply(DELTA_MAGIC_3, parts);
        assert!(apply3(&[xor_record(1, blk, &t, BLOCK), end(2 * 8192)]).unwrap() == base);
        assert!(apply3(&[xor_record(1, blk, &h, BLOCK), end(2 * 8192)]).is_err());
        assert!(apply2(&[xor_record(1, blk, &t, BLOCK), end(2 * 8192)]).is_err());
        // Block 0's tree hash on block 1: the offset is bound in.
        let t0 = tree_block_hash(0, &base[BLOCK..]);
        assert!(apply3(&[xor_record(1, blk, &t0, BLOCK), end(2 * 8192)]).is_err());
        // A later format is refused with a hint, a version 1 delta with the
        // XOR bit as a bad length.
        let mut later = b"WSDELTA4".to_vec();
        later.extend(end(16384));
        let e = merged(&base, &[later], MAX_FILE_SIZE).unwrap_err();
        assert!(
            matches!(&e, MergeError::Delta(0, e) if e.to_string().contains("newer walshipper"))
        );
        assert!(apply_delta(&[xor_record(1, blk, &h, BLOCK), end(16384)]).is_err());
    }

    /// A page of 16-byte entries that differ in one counter byte, as a
    /// btree leaf's do; and one changed by a new entry in the middle.
    fn index_page(entries: usize, skip: Option<usize>) -> Vec<u8> {
        let mut p = Vec::with_capacity(BLOCK);
        for i in (0..entries).filter(|&i| Some(i) != skip) {
            p.extend_from_slice(&[16, 0, 0, 0, 0, 0, 0, 0]);
            p.extend_from_slice(&(i as u64 * 3 + 1).to_le_bytes());
        }
        p.resize(BLOCK, 0);
        p
    }

    #[test]
    fn filtered_records_round_trip_and_are_chosen_when_smaller() {
        // A page rewritten (XOR is no help), entries that repeat: the
        // filter is.
        let old = data(2, 3);
        let new = [index_page(400, None), data(1, 4)].concat();
        assert_eq!(choose(&new[..BLOCK], Some(&old[..BLOCK])), (false, 16));
        let (d, sum) = xor_delta(&old, &[], &old, &new);
        assert_eq!((sum.changed_blocks, sum.filtered_blocks), (2, 1));
        assert!(merged(&old, &[d], MAX_FILE_SIZE).unwrap() == new);
        // Without a previous version (a file that grew) too.
        let (d, sum) = xor_delta(&[], &[], &[], &new);
        assert_eq!(sum.filtered_blocks, 1);
        assert!(merged(&[], &[d], MAX_FILE_SIZE).unwrap() == new);
        let mut bytes = new[..BLOCK].to_vec();
        let filtered: Vec<u8> = (0..BLOCK)
            .map(|i| {
                if i < 8 {
                    bytes[i]
                } else {
                    bytes[i].wrapping_sub(bytes[i - 8])
                }
            })
            .collect();
        unfilter(&mut bytes, 8);
        assert_ne!(bytes, new[..BLOCK]);
        let mut back = filtered.clone();
        unfilter(&mut back, 8);
        assert!(back == new[..BLOCK]);
    }

    #[test]
    fn hostile_filtered_records_are_refused() {
        let base = data(2, 1);
        let flagged = |blk: u32, len: u32, flags: u32, bytes: usize| {
            let mut v = DELTA_MAGIC_2.to_vec();
            v.extend_from_slice(&blk.to_le_bytes());
            v.extend_from_slice(&(len | flags).to_le_bytes());
            v.extend(std::iter::repeat_n(0u8, bytes));
            v.extend(end(16384));
            merged(&base, &[v], MAX_FILE_SIZE)
        };
        let blk = BLOCK as u32;
        // All zeros filtered stays all zeros.
        assert!(flagged(1, blk, 16 << 16, BLOCK).unwrap()[BLOCK..] == [0; BLOCK]);
        for (what, len, flags) in [
            ("stride 4", blk, 4 << 16),
            ("stride 255", blk, 255 << 16),
            ("filtered short record", 100, 8 << 16),
            ("a flag bit no version has", blk, 1 << 24),
            ("the top flag bits", blk, 0x7f00_0000),
        ] {
            assert!(flagged(1, len, flags, len as usize).is_err(), "{what}");
        }
    }

    /// Random chains of up to 7 versions (small edits, rewritten and
    /// patterned blocks, shrinking to any size, growing by whole and
    /// partial blocks), each delta made against the chain before it as a
    /// backup makes it (XOR records included): every version rebuilds
    /// exactly, in one merge and in two stages split at every point (as
    /// restore merges long chains). Seeds replay.
    #[test]
    fn random_chains_with_xor_records_rebuild_every_version() {
        let mut xored = 0;
        for seed in 1..120u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let nb = (next() % 10) as usize;
            let mut v0: Vec<u8> = (0..nb * BLOCK).map(|_| (next() % 256) as u8).collect();
            if next() % 3 == 0 && !v0.is_empty() {
                let cut = (next() % 8000) as usize + 1;
                v0.truncate(v0.len() - cut);
            }
            let mut versions = vec![v0.clone()];
            let mut deltas: Vec<Vec<u8>> = Vec::new();
            for _ in 0..(1 + next() % 7) {
                let prev = versions.last().unwrap().clone();
                let mut nv = prev.clone();
                for b in 0..nv.len().div_ceil(BLOCK) {
                    let end = ((b + 1) * BLOCK).min(nv.len());
                    match next() % 6 {
                        0 => (b * BLOCK..end).step_by(97).for_each(|i| nv[i] ^= 0x5a),
                        1 => (b * BLOCK..end).for_each(|i| nv[i] = (next() % 256) as u8),
                        2 => {
                            (b * BLOCK..end).for_each(|i| nv[i] = ((i % 16) as u8).wrapping_mul(3))
                        }
                        _ => {}
                    }
                }
                match next() % 4 {
                    0 => {
                        let size = (next() as usize) % (nv.len() + 1);
                        nv.truncate(size);
                    }
                    1 => {
                        for _ in 0..(next() % (3 * BLOCK as u64)) {
                            nv.push((next() % 256) as u8);
                        }
                    }
                    _ => {}
                }
                let chain: Vec<&[u8]> = deltas.iter().map(|d| &d[..]).collect();
                let base = &v0[..];
                let mut r = DeltaReader::new(&nv[..], map_of(&prev)).with_previous(
                    "random".into(),
                    move || {
                        let c = ChainBlocks::open(Skipper(base, 0), chain, false)?;
                        Ok(Box::new(c) as Box<dyn PreviousBlocks + '_>)
                    },
                );
                let mut d = Vec::new();
                r.read_to_end(&mut d).unwrap();
                let summary = r.finish().unwrap();
                assert_eq!(summary.reference_doubt, None, "seed {seed}");
                xored += summary.xored_blocks;
                deltas.push(d);
                versions.push(nv.clone());
                let got = merged(&v0, &deltas, MAX_FILE_SIZE)
                    .unwrap_or_else(|e| panic!("seed {seed}: {e:?}"));
                assert!(got == nv, "seed {seed}");
                for split in 1..deltas.len() {
                    let mid = merged(&v0, &deltas[..split], MAX_FILE_SIZE).unwrap();
                    assert!(mid == versions[split], "seed {seed}: stage at {split}");
                    let got = merged(&mid, &deltas[split..], MAX_FILE_SIZE).unwrap();
                    assert!(got == nv, "seed {seed}: split at {split}");
                }
            }
        }
        assert!(
            xored > 50,
            "only {xored} XOR records: the test no longer exercises them"
        );
    }

    /// The reference's base was replaced: the block rebuilt from the chain
    /// does not match the reference's map, the delta says so
    /// (`reference_doubt`, and the backup stores the file whole), and a
    /// delta on that chain indeed does not restore.
    #[test]
    fn a_reference_chain_that_does_not_rebuild_is_reported() {
        let v0: Vec<u8> = (0..4 * BLOCK).map(|i| (i * 31 % 251) as u8).collect();
        let mut v1 = v0.clone();
        touch(&mut v1, 1, 1);
        let (d1, s1) = xor_delta(&v0, &[], &v0, &v1);
        assert_eq!((s1.xored_blocks, &s1.reference_doubt), (1, &None));
        let mut v2 = v1.clone();
        touch(&mut v2, 1, 2);
        let mut bad = v0.clone();
        bad[BLOCK + 5] ^= 0xff;
        let (d2, s2) = xor_delta(&bad, std::slice::from_ref(&d1), &v1, &v2);
        assert!(s2.reference_doubt.is_some(), "{s2:?}");
        assert_eq!(s2.xored_blocks, 0);
        assert!(merged(&bad, &[d1, d2], MAX_FILE_SIZE).is_err());
    }
}
