//! What one BLAKE3 pass instead of two saves a backup:
//! `cargo run --release --example block_map_single_pass -- FILE...`. The
//! measurement that led to `WSBMAP02` maps (`delta::TreeHash`); kept, as
//! written then, to re-measure on another CPU.
//!
//! Before, a large file was hashed twice: each 8 KiB block for its block map
//! (`delta::block_hash`, BLAKE3 of the block alone) and the whole file for
//! the manifest. BLAKE3 is a tree of 1 KiB chunks, so an 8 KiB block at an
//! 8 KiB boundary is a subtree of the file's tree: its chaining value
//! (`blake3::hazmat`) could be the map's entry, and the chaining values
//! merged give the whole file's hash, the same bytes `b3sum` prints. This
//! checks that equality on every file given and prints both ways' speed.
use std::time::Instant;

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

const BLOCK: usize = 8192;

/// Today's two passes: the map's truncated hashes and the file's hash.
fn two_passes(data: &[u8], map: &mut Vec<[u8; 16]>) -> blake3::Hash {
    for b in data.chunks(BLOCK) {
        let mut h = [0u8; 16];
        h.copy_from_slice(&blake3::hash(b).as_bytes()[..16]);
        map.push(h);
    }
    blake3::hash(data)
}

/// One pass: each block's chaining value at its offset, merged as BLAKE3's
/// own hasher merges its chunks (a stack of complete subtrees, merged
/// lazily so that the last merge can be the root).
fn one_pass(data: &[u8], map: &mut Vec<[u8; 16]>) -> blake3::Hash {
    if data.len() <= BLOCK {
        // One block is the root itself.
        let h = blake3::hash(data);
        if !data.is_empty() {
            let mut e = [0u8; 16];
            e.copy_from_slice(&h.as_bytes()[..16]);
            map.push(e);
        }
        return h;
    }
    let mut stack: Vec<ChainingValue> = Vec::new();
    for (i, b) in data.chunks(BLOCK).enumerate() {
        // Before pushing block i, merge the completed subtrees: as many
        // stay as `i` has bits set (8 KiB blocks are 8 chunks each).
        while stack.len() > i.count_ones() as usize {
            let right = stack.pop().unwrap();
            let left = stack.pop().unwrap();
            stack.push(merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
        let cv = blake3::Hasher::new()
            .set_input_offset((i * BLOCK) as u64)
            .update(b)
            .finalize_non_root();
        let mut e = [0u8; 16];
        e.copy_from_slice(&cv[..16]);
        map.push(e);
        stack.push(cv);
    }
    while stack.len() > 2 {
        let right = stack.pop().unwrap();
        let left = stack.pop().unwrap();
        stack.push(merge_subtrees_non_root(&left, &right, Mode::Hash));
    }
    let right = stack.pop().unwrap();
    let left = stack.pop().unwrap();
    merge_subtrees_root(&left, &right, Mode::Hash)
}

fn main() {
    let mut files: Vec<Vec<u8>> = Vec::new();
    for p in std::env::args().skip(1) {
        files.push(std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}")));
    }
    // The tree's edge cases: around one block, around powers of two.
    let sample: Vec<u8> = (0..(9 * BLOCK + 100))
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    for n in [
        0, 1, 1023, 1024, 1025, 8191, 8192, 8193, 16384, 24576, 24577, 65536, 73728,
    ] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        assert_eq!(
            one_pass(&sample[..n], &mut b),
            blake3::hash(&sample[..n]),
            "{n}"
        );
        two_passes(&sample[..n], &mut a);
        assert_eq!(a.len(), b.len());
    }
    let total: usize = files.iter().map(Vec::len).sum();
    for f in &files {
        let mut m = Vec::new();
        assert_eq!(one_pass(f, &mut m), blake3::hash(f));
    }
    println!(
        "{} files, {:.1} MiB: one pass's root equals BLAKE3 of every file",
        files.len(),
        total as f64 / 1048576.0
    );
    for round in 0..3 {
        let mut map = Vec::with_capacity(total / BLOCK + files.len());
        let t = Instant::now();
        for f in &files {
            std::hint::black_box(two_passes(f, &mut map));
        }
        let two = t.elapsed().as_secs_f64();
        map.clear();
        let t = Instant::now();
        for f in &files {
            std::hint::black_box(one_pass(f, &mut map));
        }
        let one = t.elapsed().as_secs_f64();
        println!(
            "round {round}: two passes {two:.3} s ({:.0} MB/s), one pass {one:.3} s ({:.0} MB/s), saved {:.3} s",
            total as f64 / two / 1e6,
            total as f64 / one / 1e6,
            two - one
        );
    }
}
