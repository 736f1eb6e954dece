//! Upload bandwidth limit: a wrapper around any driver that paces the bodies
//! it writes. One budget per wrapped storage, shared by every thread of the
//! process, so `backup --jobs 8` stays under the limit as a whole.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Durability, ObjectMeta, PutOutcome, Storage};
use crate::error::Result;

/// A token bucket holding at most one second of budget.
struct Bucket {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// Takes `n` bytes of budget, sleeping until they are available.
    fn take(&self, n: usize) {
        let wait = {
            let Ok(mut s) = self.state.lock() else {
                return;
            };
            let now = Instant::now();
            let (tokens, last) = *s;
            let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate)
                .min(self.rate)
                - n as f64;
            *s = (tokens, now);
            if tokens < 0.0 {
                Duration::from_secs_f64(-tokens / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

struct Paced<'a> {
    inner: &'a mut dyn Read,
    bucket: &'a Bucket,
}

impl Read for Paced<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Small reads keep the pace smooth.
        let max = buf.len().min(256 << 10);
        let n = self.inner.read(&mut buf[..max])?;
        self.bucket.take(n);
        Ok(n)
    }
}

pub struct Throttled {
    inner: Box<dyn Storage>,
    bucket: Arc<Bucket>,
}

impl Throttled {
    pub fn new(inner: Box<dyn Storage>, bytes_per_second: u64) -> Throttled {
        let rate = bytes_per_second.max(1) as f64;
        Throttled {
            inner,
            bucket: Arc::new(Bucket {
                rate,
                state: Mutex::new((rate, Instant::now())),
            }),
        }
    }
}

impl Storage for Throttled {
    fn put_new(&self, key: &str, body: &mut dyn Read, d: Durability) -> Result<PutOutcome> {
        let mut paced = Paced {
            inner: body,
            bucket: &self.bucket,
        };
        self.inner.put_new(key, &mut paced, d)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn put_replace(&self, key: &str, body: &mut dyn Read) -> Result<()> {
        let mut paced = Paced {
            inner: body,
            bucket: &self.bucket,
        };
        self.inner.put_replace(key, &mut paced)
    }
    fn get(&self, key: &str) -> Result<Option<Box<dyn Read + Send>>> {
        self.inner.get(key)
    }
    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.inner.head(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.inner.list(prefix)
    }
    fn list_children(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list_children(prefix)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)
    }
    fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        self.inner.delete_prefix(prefix)
    }
    fn describe(&self) -> String {
        format!(
            "{} (uploads limited to {} B/s)",
            self.inner.describe(),
            self.bucket.rate
        )
    }
    // Leases and probes are a few hundred bytes: not paced.
    fn get_versioned(&self, key: &str, max: usize) -> Result<Option<(Vec<u8>, String)>> {
        self.inner.get_versioned(key, max)
    }
    fn put_versioned(
        &self,
        key: &str,
        body: &[u8],
        expected: Option<&str>,
    ) -> Result<Option<String>> {
        self.inner.put_versioned(key, body, expected)
    }
    fn delete_versioned(&self, key: &str, expected: &str) -> Result<bool> {
        self.inner.delete_versioned(key, expected)
    }
    fn conditional_writes(&self, probe: bool) -> Result<String> {
        self.inner.conditional_writes(probe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_to_the_rate() {
        let bucket = Bucket {
            rate: 4.0 * 1024.0 * 1024.0,
            state: Mutex::new((0.0, Instant::now())),
        };
        let data = vec![0u8; 2 << 20];
        let start = Instant::now();
        let mut paced = Paced {
            inner: &mut &data[..],
            bucket: &bucket,
        };
        io::copy(&mut paced, &mut io::sink()).unwrap();
        // 2 MiB at 4 MiB/s from an empty bucket: about half a second.
        let t = start.elapsed();
        assert!(t >= Duration::from_millis(450), "{t:?}");
    }
}
