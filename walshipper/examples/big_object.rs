//! Benchmark helper (not a test): streams SIZE_GIB GiB of incompressible
//! data as one object through the data path into the configured repository
//! and reads it back, verifying it; prints wall times and the process's peak
//! resident memory. Usage: big_object CONFIG [SIZE_GIB]
use std::io::{self, Read};
use std::time::Instant;

use walshipper::config::Config;
use walshipper::repo::Repository;

/// Pseudo-random bytes (xorshift): incompressible, cheap to make.
struct Noise {
    left: u64,
    x: u64,
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize & !7;
        for c in buf[..n].chunks_exact_mut(8) {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            c.copy_from_slice(&self.x.to_le_bytes());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let cfg = Config::load(Some(std::path::Path::new(&args[1])))?;
    let gib: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let repo = Repository::open(&cfg)?;
    let key = format!("bench/big-{}", std::process::id());
    let t = Instant::now();
    let (_, summary) = repo.put_object(
        &key,
        Noise {
            left: gib << 30,
            x: 0x9E37_79B9_7F4A_7C15,
        },
    )?;
    let put = t.elapsed();
    let t = Instant::now();
    let sha = repo.read_object_with(&key, &mut io::sink(), repo.threads())?;
    let get = t.elapsed();
    assert_eq!(sha, summary.hash, "read back differs");
    repo.storage.delete(&key)?;
    println!(
        "{{\"object_gib\": {gib}, \"stored_bytes\": {}, \"put_s\": {:.2}, \"get_s\": {:.2}, \"peak_rss_mib\": {}}}",
        summary.stored_len,
        put.as_secs_f64(),
        get.as_secs_f64(),
        peak_rss_mib()
    );
    Ok(())
}
