//! Upload and download bandwidth limits: a wrapper around any driver that
//! paces the bodies it writes and reads. One budget per direction and
//! wrapped storage, shared by every thread of the process, so `backup
//! --jobs 8` or a restore test beside production stays under the limit as a
//! whole.

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

/// A reader paced by a shared bucket, owning both (a body handed back by `get`).
struct PacedOwned {
    inner: Box<dyn Read + Send>,
    bucket: Arc<Bucket>,
}

impl Read for PacedOwned {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = buf.len().min(256 << 10);
        let n = self.inner.read(&mut buf[..max])?;
        self.bucket.take(n);
        Ok(n)
    }
}

pub struct Throttled {
    inner: Box<dyn Storage>,
    /// Uploads and downloads; None: that direction is not limited.
    up: Option<Arc<Bucket>>,
    down: Option<Arc<Bucket>>,
}

fn bucket(bytes_per_second: u64) -> Option<Arc<Bucket>> {
    (bytes_per_second > 0).then(|| {
        let rate = bytes_per_second as f64;
        Arc::new(Bucket {
            rate,
            state: Mutex::new((rate, Instant::now())),
        })
    })
}

impl Throttled {
    /// Limits in bytes per second; 0: that direction is not limited.
    pub fn new(inner: Box<dyn Storage>, upload: u64, download: u64) -> Throttled {
        Throttled {
            inner,
            up: bucket(upload),
            down: bucket(download),
        }
    }

    fn paced_put<T>(
        &self,
        body: &mut dyn Read,
        put: impl FnOnce(&mut dyn Read) -> Result<T>,
    ) -> Result<T> {
        match &self.up {
            Some(b) => put(&mut Paced {
                inner: body,
                bucket: b,
            }),
            None => put(body),
        }
    }
}

impl Storage for Throttled {
    fn put_new(&self, key: &str, body: &mut dyn Read, d: Durability) -> Result<PutOutcome> {
        self.paced_put(body, |b| self.inner.put_new(key, b, d))
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn put_replace(&self, key: &str, body: &mut dyn Read) -> Result<()> {
        self.paced_put(body, |b| self.inner.put_replace(key, b))
    }
    fn replace_checked(
        &self,
        key: &str,
        body: &mut dyn Read,
        spool: &std::path::Path,
        check: &mut dyn FnMut(&mut dyn Read, bool) -> Result<()>,
        _pacing: super::Pacing,
    ) -> Result<()> {
        // The driver draws on the budgets for what really crosses to and
        // from the store (s3: the PUT and the read-back, not its local copy).
        let take_up = |n: usize| {
            if let Some(b) = &self.up {
                b.take(n)
            }
        };
        let take_down = |n: usize| {
            if let Some(b) = &self.down {
                b.take(n)
            }
        };
        let pacing = super::Pacing {
            up: self.up.is_some().then_some(&take_up as super::Budget),
            down: self.down.is_some().then_some(&take_down as super::Budget),
        };
        self.inner.replace_checked(key, body, spool, check, pacing)
    }
    fn get(&self, key: &str) -> Result<Option<Box<dyn Read + Send>>> {
        let body = self.inner.get(key)?;
        Ok(match (&self.down, body) {
            (Some(b), Some(inner)) => Some(Box::new(PacedOwned {
                inner,
                bucket: b.clone(),
            })),
            (_, body) => body,
        })
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
        let mut limits = Vec::new();
        if let Some(b) = &self.up {
            limits.push(format!("uploads limited to {} B/s", b.rate));
        }
        if let Some(b) = &self.down {
            limits.push(format!("downloads limited to {} B/s", b.rate));
        }
        format!("{} ({})", self.inner.describe(), limits.join(", "))
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
    fn space(&self) -> Result<Option<super::Space>> {
        self.inner.space()
    }
    fn conditional_writes(&self, probe: bool) -> Result<String> {
        self.inner.conditional_writes(probe)
    }
    fn reads_are_local(&self) -> bool {
        self.down.is_none() && self.inner.reads_are_local()
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

    #[test]
    fn downloads_are_paced_and_uploads_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let posix = super::super::posix::PosixStorage::new(dir.path().to_path_buf());
        let t = Throttled::new(Box::new(posix), 0, 4 << 20);
        let data = vec![7u8; 6 << 20];
        let start = Instant::now();
        // AtFlush: no fsync in the timing (a busy disk is not a pace).
        t.put_new("x", &mut &data[..], Durability::AtFlush).unwrap();
        assert!(start.elapsed() < Duration::from_millis(450), "upload paced");
        let start = Instant::now();
        let mut body = t.get("x").unwrap().unwrap();
        let n = io::copy(&mut body, &mut io::sink()).unwrap();
        assert_eq!(n, 6 << 20);
        // 6 MiB at 4 MiB/s, the first second's budget (4 MiB) at once.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(450), "{took:?}");
        assert!(t.describe().contains("downloads limited"));
    }
}
