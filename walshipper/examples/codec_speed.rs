//! Rough per-stage timings of the codec on one file: `cargo run --release
//! --example codec_speed -- FILE`. A tool for tuning, not a test.
//! `FRAME_KIB` (128), `ADAPTIVE=0` (compression.adaptive off), `ENCODE_ONLY=1`
//! (one encode, 1 thread, encrypted: for counting instructions with
//! `valgrind --tool=callgrind`).
use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use sha2::Digest;
use walshipper::codec::{CodecSettings, Compression, DataKey, EncodingReader};

fn main() {
    let path = std::env::args().nth(1).expect("usage: codec_speed FILE");
    let t = Instant::now();
    let data = std::fs::read(&path).expect("read");
    println!("read        {:6.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let adaptive = std::env::var("ADAPTIVE").map_or(true, |v| v != "0");
    let frame: u32 = std::env::var("FRAME_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
        * 1024;
    let runs: &[(bool, usize)] = if std::env::var("ENCODE_ONLY").is_ok() {
        &[(true, 1)]
    } else {
        &[(false, 1), (true, 1), (true, 2)]
    };
    if runs.len() == 1 {
        return encode(&data, frame, adaptive, runs);
    }
    let t = Instant::now();
    let _ = sha2::Sha256::digest(&data);
    println!("sha256      {:6.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    let _ = blake3::hash(&data);
    println!("blake3      {:6.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    let _ = crc32fast::hash(&data);
    println!("crc32       {:6.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    for c in data.chunks(1 << 20) {
        let _ = zstd::bulk::compress(c, 3).expect("zstd");
    }
    println!("zstd-3 1thr {:6.1} ms", t.elapsed().as_secs_f64() * 1e3);
    encode(&data, frame, adaptive, runs);
}

fn encode(data: &[u8], frame: u32, adaptive: bool, runs: &[(bool, usize)]) {
    for &(enc, threads) in runs {
        let s = Arc::new(CodecSettings {
            compression: Compression::Zstd,
            level: 3,
            adaptive,
            key: enc.then_some(DataKey {
                id: [1; 16],
                key: [2; 32],
            }),
            frame_size: frame,
            threads,
        });
        let t = Instant::now();
        let binding = walshipper::codec::Binding {
            repository_id: &[0; 16],
            key: "wal/0000000100000000/000000010000000000000001",
        };
        let mut r = EncodingReader::new(data, s, binding).expect("enc");
        let mut out = Vec::new();
        r.read_to_end(&mut out).expect("encode");
        println!(
            "encode enc={enc} threads={threads} adaptive={adaptive} {:6.1} ms, {} bytes, {} of {} frames at zstd 1",
            t.elapsed().as_secs_f64() * 1e3,
            out.len(),
            r.summary().fast_frames,
            r.summary().frames
        );
    }
}
