//! How fast block maps hash: BLAKE3 (what delta.rs uses) beside SHA-256,
//! over 8 KiB blocks, one thread. `cargo run --release --example block_hash_speed`
use sha2::Digest;
use std::time::Instant;

fn main() {
    let data: Vec<u8> = (0..256u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut sink = 0u8;
    let t = Instant::now();
    for b in data.chunks(8192) {
        sink ^= walshipper::delta::block_hash(b)[0];
    }
    let blake = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for b in data.chunks(8192) {
        sink ^= sha2::Sha256::digest(b)[0];
    }
    let sha = t.elapsed().as_secs_f64();
    let mib = data.len() as f64 / (1 << 20) as f64;
    println!(
        "8 KiB blocks, {mib:.0} MiB: BLAKE3 {:.0} MiB/s, SHA-256 {:.0} MiB/s ({sink})",
        mib / blake,
        mib / sha
    );
}
