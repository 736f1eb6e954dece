//! One conformance suite for every storage driver: posix always, and S3 when
//! a real S3-compatible server is given (PGB_TEST_S3_ENDPOINT, as
//! scripts/test.sh does with SeaweedFS). Plus the S3 failure modes that only
//! a real server can show: a wrong secret, a body altered in flight.

mod common;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use sha2::{Digest, Sha256};
use walshipper::config::RepoConfig;
use walshipper::storage::{self, Durability, PutOutcome, Storage};

fn backends(dir: &std::path::Path) -> Vec<(String, Box<dyn Storage>)> {
    let mut out = Vec::new();
    let posix = RepoConfig {
        path: dir.join("posix"),
        ..Default::default()
    };
    out.push(("posix".to_string(), storage::open(&posix).unwrap()));
    if let Some(cfg) = common::s3_repo_config("conformance") {
        out.push(("s3".to_string(), storage::open(&cfg).unwrap()));
    } else {
        eprintln!("PGB_TEST_S3_ENDPOINT not set: S3 driver not tested");
    }
    out
}

fn get_all(s: &dyn Storage, key: &str) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    s.get(key).unwrap()?.read_to_end(&mut v).unwrap();
    Some(v)
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A body that fails after `after` bytes, like a file on a failing disk.
struct FailingBody {
    data: Vec<u8>,
    pos: usize,
    after: usize,
}

impl Read for FailingBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.after {
            return Err(io::Error::other("injected read failure"));
        }
        let n = buf
            .len()
            .min(self.after - self.pos)
            .min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn every_driver_keeps_the_storage_contract() {
    let dir = tempfile::tempdir().unwrap();
    for (name, s) in backends(dir.path()) {
        let s = s.as_ref();
        eprintln!("conformance: {name} ({})", s.describe());
        // Create-if-absent.
        assert_eq!(
            s.put_new("a/one", &mut &b"first"[..], Durability::Now)
                .unwrap(),
            PutOutcome::Stored,
            "{name}"
        );
        assert_eq!(
            s.put_new("a/one", &mut &b"second"[..], Durability::Now)
                .unwrap(),
            PutOutcome::AlreadyExists,
            "{name}"
        );
        assert_eq!(get_all(s, "a/one").unwrap(), b"first", "{name}");
        assert_eq!(s.head("a/one").unwrap().unwrap().size, 5, "{name}");
        assert!(s.head("a/none").unwrap().is_none(), "{name}");
        assert!(s.get("a/none").unwrap().is_none(), "{name}");
        // Empty objects exist.
        s.put_new("a/empty", &mut &b""[..], Durability::AtFlush)
            .unwrap();
        s.flush().unwrap();
        assert_eq!(get_all(s, "a/empty").unwrap(), b"", "{name}");
        // Replace.
        s.put_replace("a/meta", &mut &b"v1"[..]).unwrap();
        s.put_replace("a/meta", &mut &b"v2"[..]).unwrap();
        assert_eq!(get_all(s, "a/meta").unwrap(), b"v2", "{name}");
        // Large objects (several S3 parts: the test config uses 5 MiB parts).
        let big = pseudo_random(23 << 20, 7);
        assert_eq!(
            s.put_new("b/big", &mut &big[..], Durability::Now).unwrap(),
            PutOutcome::Stored
        );
        let back = get_all(s, "b/big").unwrap();
        assert_eq!(
            Sha256::digest(&back),
            Sha256::digest(&big),
            "{name}: big object differs"
        );
        // A body that fails midway stores nothing, small or multipart.
        for (key, len, after) in [("c/small", 1000, 500), ("c/multi", 12 << 20, 11 << 20)] {
            let mut body = FailingBody {
                data: pseudo_random(len, 3),
                pos: 0,
                after,
            };
            assert!(
                s.put_new(key, &mut body, Durability::Now).is_err(),
                "{name}"
            );
            assert!(
                s.head(key).unwrap().is_none(),
                "{name}: {key} stored after a failed body"
            );
            assert!(s
                .put_replace(
                    key,
                    &mut FailingBody {
                        data: vec![1; len],
                        pos: 0,
                        after
                    }
                )
                .is_err());
            assert!(
                s.head(key).unwrap().is_none(),
                "{name}: {key} replaced after a failed body"
            );
        }
        // Racing writers of one key: exactly one wins, its bytes are stored whole.
        let barrier = Arc::new(Barrier::new(4));
        let outcomes: Vec<(Vec<u8>, PutOutcome)> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4u64)
                .map(|i| {
                    let barrier = barrier.clone();
                    sc.spawn(move || {
                        let body = pseudo_random(300_000, 100 + i);
                        barrier.wait();
                        let o = s
                            .put_new("d/race", &mut &body[..], Durability::Now)
                            .unwrap();
                        (body, o)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<_> = outcomes
            .iter()
            .filter(|(_, o)| *o == PutOutcome::Stored)
            .collect();
        assert_eq!(winners.len(), 1, "{name}: {} writers won", winners.len());
        assert_eq!(get_all(s, "d/race").unwrap(), winners[0].0, "{name}");
        // Listing.
        s.put_new("e/x/1", &mut &b"1"[..], Durability::Now).unwrap();
        s.put_new("e/x/2", &mut &b"2"[..], Durability::Now).unwrap();
        s.put_new("e/y", &mut &b"3"[..], Durability::Now).unwrap();
        let keys: Vec<String> = s.list("e/").unwrap().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, ["e/x/1", "e/x/2", "e/y"], "{name}");
        assert_eq!(s.list_children("e/").unwrap(), ["x", "y"], "{name}");
        assert!(s.list("zz/").unwrap().is_empty(), "{name}");
        // Deleting.
        s.delete("e/y").unwrap();
        assert!(s.head("e/y").unwrap().is_none(), "{name}");
        assert_eq!(s.delete_prefix("e/").unwrap(), 2, "{name}");
        assert!(s.list("e/").unwrap().is_empty(), "{name}");
        // Keys that could escape the repository are refused.
        for bad in ["/abs", "a/../b", "../x"] {
            assert!(
                s.put_new(bad, &mut &b"x"[..], Durability::Now).is_err(),
                "{name}: {bad}"
            );
        }
    }
}

#[test]
fn s3_wrong_secret_is_named() {
    let Some(mut cfg) = common::s3_repo_config("secret") else {
        return;
    };
    cfg.secret_access_key = "not-the-secret".into();
    cfg.retries = 1;
    let s = storage::open(&cfg).unwrap();
    let e = s
        .put_new("x", &mut &b"data"[..], Durability::Now)
        .unwrap_err()
        .to_string();
    assert!(e.contains("secret access key is wrong"), "{e}");
    assert!(
        !e.contains("not-the-secret"),
        "the secret leaked into a message: {e}"
    );
}

/// A TCP proxy that flips one byte of every request body it forwards
/// (the first byte after the headers of a PUT), like a faulty network card.
fn corrupting_proxy(upstream: &str) -> (String, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let flipped = Arc::new(AtomicBool::new(false));
    let upstream = upstream.to_string();
    let f = flipped.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let upstream = upstream.clone();
            let f = f.clone();
            std::thread::spawn(move || {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    return;
                };
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let _ = io::copy(&mut s_read, &mut c_write);
                });
                let mut buf = vec![0u8; 64 << 10];
                let mut head = Vec::new();
                let mut in_body = false;
                let mut flip_next = false;
                loop {
                    let n = match c_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let mut chunk = buf[..n].to_vec();
                    let mut body_at = 0;
                    if !in_body {
                        head.extend_from_slice(&chunk);
                        if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            flip_next = head.starts_with(b"PUT ");
                            body_at = p + 4 - (head.len() - chunk.len());
                            in_body = true;
                        } else {
                            body_at = chunk.len();
                        }
                    }
                    // The body may come in a later packet (Expect: 100-continue).
                    if flip_next && body_at < chunk.len() {
                        chunk[body_at] ^= 0x01;
                        flip_next = false;
                        f.store(true, Ordering::SeqCst);
                    }
                    if s_write.write_all(&chunk).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, flipped)
}

#[test]
fn s3_body_altered_in_flight_is_rejected() {
    let Some(cfg) = common::s3_repo_config("inflight") else {
        return;
    };
    let upstream = cfg.endpoint.trim_start_matches("http://").to_string();
    let (proxy, flipped) = corrupting_proxy(&upstream);
    let mut bad = cfg.clone();
    bad.endpoint = format!("http://{proxy}");
    bad.retries = 1;
    let s = storage::open(&bad).unwrap();
    let body = pseudo_random(100_000, 9);
    let e = s.put_new("altered", &mut &body[..], Durability::Now);
    assert!(
        flipped.load(Ordering::SeqCst),
        "the proxy did not alter the body"
    );
    let e = e
        .expect_err("the store accepted an altered body")
        .to_string();
    eprintln!("altered body: {e}");
    assert!(e.contains("altered in transit"), "{e}");
    // Nothing was stored, as seen through a clean connection.
    let good = storage::open(&cfg).unwrap();
    assert!(good.head("altered").unwrap().is_none());
}

/// A proxy that answers the first `refuse` requests itself with 503
/// SlowDown (as a throttling store does), then forwards everything.
fn throttling_proxy(
    upstream: &str,
    refuse: usize,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::AtomicUsize;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let refused = Arc::new(AtomicUsize::new(0));
    let upstream = upstream.to_string();
    let r = refused.clone();
    std::thread::spawn(move || {
        for mut client in listener.incoming().flatten() {
            if r.load(Ordering::SeqCst) < refuse {
                r.fetch_add(1, Ordering::SeqCst);
                // Read the request head, answer 503, close.
                let mut buf = [0u8; 65536];
                let _ = client.set_read_timeout(Some(std::time::Duration::from_millis(200)));
                let _ = client.read(&mut buf);
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
                let _ = write!(
                    client,
                    "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                continue;
            }
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    return;
                };
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let _ = io::copy(&mut s_read, &mut c_write);
                });
                let _ = io::copy(&mut c_read, &mut s_write);
            });
        }
    });
    (addr, refused)
}

#[test]
fn s3_throttling_is_retried_with_backoff_then_reported() {
    let Some(cfg) = common::s3_repo_config("throttle") else {
        return;
    };
    let upstream = cfg.endpoint.trim_start_matches("http://").to_string();
    // Two refusals, five attempts: the write succeeds.
    let (proxy, refused) = throttling_proxy(&upstream, 2);
    let mut c = cfg.clone();
    c.endpoint = format!("http://{proxy}");
    c.retries = 5;
    let s = storage::open(&c).unwrap();
    let body = pseudo_random(10_000, 11);
    assert_eq!(
        s.put_new("throttled", &mut &body[..], Durability::Now)
            .unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(refused.load(Ordering::SeqCst), 2);
    assert_eq!(get_all(s.as_ref(), "throttled").unwrap(), body);
    // Always throttled: it gives up after its attempts with the store's answer.
    let (proxy, refused) = throttling_proxy(&upstream, usize::MAX);
    c.endpoint = format!("http://{proxy}");
    c.retries = 3;
    let s = storage::open(&c).unwrap();
    let e = s
        .put_new("never", &mut &body[..], Durability::Now)
        .unwrap_err()
        .to_string();
    assert!(e.contains("SlowDown") && e.contains("503"), "{e}");
    assert_eq!(refused.load(Ordering::SeqCst), 3, "attempts");
}
