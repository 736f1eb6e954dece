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
    // No probe: the proxy alters only the first request of a connection.
    bad.conditional_writes = "header".into();
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

// ---- Issue 12: private repositories, locks that follow nothing, the S3 lease,
// ---- conditional writes on stores that may ignore them.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use walshipper::error::{exit, Error};
use walshipper::lock::{self, LeaseBody, LeaseOptions};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn posix_repository_is_private_whatever_the_umask() {
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0) };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let s = storage::posix::PosixStorage::new(&root);
    s.put_new("a/b/c", &mut &b"x"[..], Durability::Now).unwrap();
    s.put_new("a/d", &mut &b"y"[..], Durability::AtFlush)
        .unwrap();
    s.put_replace("meta", &mut &b"z"[..]).unwrap();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    for d in ["", "a", "a/b"] {
        assert_eq!(mode(&root.join(d)), 0o700, "directory '{d}'");
    }
    for f in ["a/b/c", "a/d", "meta"] {
        assert_eq!(mode(&root.join(f)), 0o600, "object {f}");
    }
}

#[test]
fn lock_never_follows_a_symlink_nor_truncates_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious data").unwrap();
    let lock_path = dir.path().join(".backup.lock");
    std::os::unix::fs::symlink(&victim, &lock_path).unwrap();
    let e = lock::try_lock(dir.path(), "backup")
        .err()
        .expect("symlink accepted");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious data");
    // A hard link to someone else's file is refused too.
    std::fs::remove_file(&lock_path).unwrap();
    std::fs::hard_link(&victim, &lock_path).unwrap();
    let e = lock::try_lock(dir.path(), "backup")
        .err()
        .expect("hard link accepted");
    assert!(e.to_string().contains("regular file"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious data");
    // A plain lock file: taken, private, and busy for a second taker.
    std::fs::remove_file(&lock_path).unwrap();
    let held = lock::try_lock(dir.path(), "backup").unwrap();
    assert_eq!(mode(&lock_path), 0o600);
    let e = lock::try_lock(dir.path(), "backup")
        .err()
        .expect("taken twice");
    assert_eq!(e.exit_code(), exit::BUSY);
    assert!(
        e.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{e}"
    );
    drop(held);
    lock::try_lock(dir.path(), "backup").unwrap();
}

fn s3(tag: &str) -> Option<(walshipper::config::RepoConfig, Arc<dyn Storage>)> {
    let cfg = common::s3_repo_config(tag)?;
    let s: Arc<dyn Storage> = Arc::from(storage::open(&cfg).unwrap());
    Some((cfg, s))
}

fn opts(host: &str, pid: u32, ttl_ms: u64, renew_ms: u64) -> LeaseOptions {
    LeaseOptions {
        ttl: Duration::from_millis(ttl_ms),
        renew_every: Duration::from_millis(renew_ms),
        host: host.into(),
        pid,
        holder: format!("walshipper backup (test, {host})"),
    }
}

fn lease_body(s: &dyn Storage) -> Option<(LeaseBody, String)> {
    let (b, tag) = s
        .get_versioned(&walshipper::layout::lease("backup"), 4096)
        .unwrap()?;
    Some((LeaseBody::parse(&b).expect("lease parses"), tag))
}

#[test]
fn s3_lease_excludes_other_hosts_is_renewed_and_released() {
    let Some((_, s)) = s3("lease") else {
        return;
    };
    let a = lock::lease(s.clone(), "backup", &opts("host-a", 1111, 3000, 300)).unwrap();
    let (body, tag) = lease_body(s.as_ref()).expect("lease object written");
    assert_eq!((body.host.as_str(), body.pid), ("host-a", 1111));
    assert!(body.expires_at > body.acquired_at);
    let busy = |host: &str| match lock::lease(s.clone(), "backup", &opts(host, 2222, 3000, 300)) {
        Err(e @ Error::Busy(_)) => e,
        Err(e) => panic!("not Busy: {e}"),
        Ok(_) => panic!("{host} took a lease that host-a holds"),
    };
    let e = busy("host-b");
    assert_eq!(e.exit_code(), exit::BUSY);
    assert!(
        e.to_string().contains("host-a") && e.to_string().contains("1111"),
        "{e}"
    );
    // Renewed in the background: past the first expiry it is still held.
    std::thread::sleep(Duration::from_millis(3500));
    let (renewed, tag2) = lease_body(s.as_ref()).unwrap();
    assert_ne!(tag, tag2, "the lease was not renewed");
    assert!(renewed.renewals >= 5, "renewals: {}", renewed.renewals);
    assert!(renewed.expires_at > body.expires_at);
    assert_eq!(renewed.acquired_at, body.acquired_at);
    busy("host-b");
    assert!(a.lost().is_none());
    // Released on drop: the object is gone and another host may take it.
    drop(a);
    assert!(lease_body(s.as_ref()).is_none(), "lease left behind");
    let b = lock::lease(s.clone(), "backup", &opts("host-b", 2222, 3000, 300)).unwrap();
    drop(b);
}

#[test]
fn s3_stale_lease_is_taken_over_by_exactly_one_host() {
    let Some((_, s)) = s3("takeover") else {
        return;
    };
    let key = walshipper::layout::lease("backup");
    let now = chrono::Utc::now();
    let dead = LeaseBody {
        holder: "walshipper backup (killed)".into(),
        host: "dead-host".into(),
        pid: 4242,
        acquired_at: now - chrono::Duration::seconds(600),
        expires_at: now - chrono::Duration::seconds(1),
        token: "0".repeat(32),
        renewals: 3,
    };
    let bytes = serde_json::to_vec(&dead).unwrap();
    s.put_versioned(&key, &bytes, None).unwrap().unwrap();
    // Eight hosts see it expired at once: the If-Match write decides.
    let barrier = Arc::new(Barrier::new(8));
    let results: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8u32)
            .map(|i| {
                let (s, barrier) = (s.clone(), barrier.clone());
                sc.spawn(move || {
                    barrier.wait();
                    lock::lease(
                        s,
                        "backup",
                        &opts(&format!("host-{i}"), 100 + i, 5000, 1000),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
    assert_eq!(
        winners.len(),
        1,
        "{} hosts took the stale lease",
        winners.len()
    );
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.exit_code(), exit::BUSY, "{e}");
        }
    }
    let (now_held, _) = lease_body(s.as_ref()).unwrap();
    assert!(now_held.host.starts_with("host-"), "{}", now_held.host);
    drop(results);
    assert!(lease_body(s.as_ref()).is_none());

    // A holder that stalls past its TTL loses the lease to a taker, and its
    // late release leaves the taker's lease alone.
    let slow = lock::lease(s.clone(), "backup", &opts("slow", 7, 500, 60_000)).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let taker = lock::lease(s.clone(), "backup", &opts("taker", 8, 5000, 1000)).unwrap();
    drop(slow);
    let (held, _) = lease_body(s.as_ref()).expect("the taker's lease was deleted");
    assert_eq!(held.host, "taker");
    // A renewer that finds its lease replaced reports it lost.
    let (_, tag) = lease_body(s.as_ref()).unwrap();
    let mut forged = held.clone();
    forged.host = "intruder".into();
    s.put_versioned(&key, &serde_json::to_vec(&forged).unwrap(), Some(&tag))
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(taker.lost().is_some(), "a replaced lease went unnoticed");
    drop(taker);
    assert_eq!(lease_body(s.as_ref()).unwrap().0.host, "intruder");
}

#[test]
fn s3_conditional_writes_are_probed_and_a_forged_verdict_weakens_nothing() {
    let Some((cfg, s)) = s3("condwrites") else {
        return;
    };
    let said = s.conditional_writes(true).unwrap();
    assert!(
        said.contains("honours"),
        "SeaweedFS honours If-None-Match: {said}"
    );
    let verdict = get_all(s.as_ref(), walshipper::layout::CONDITIONAL_WRITES).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&verdict).unwrap();
    assert_eq!(v["conditional_writes_honoured"], true);
    // The probe leaves nothing else behind.
    let left: Vec<_> = s
        .list("locks/")
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(left, [walshipper::layout::CONDITIONAL_WRITES]);
    // A forged verdict ("ignored") only adds a HEAD: still no overwrite.
    s.put_replace(
        walshipper::layout::CONDITIONAL_WRITES,
        &mut &br#"{"conditional_writes_honoured":false,"probed_at":"x"}"#[..],
    )
    .unwrap();
    let s2 = storage::open(&cfg).unwrap();
    assert!(s2.conditional_writes(false).unwrap().contains("ignores"));
    assert_eq!(
        s2.put_new("k", &mut &b"one"[..], Durability::Now).unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(
        s2.put_new("k", &mut &b"two"[..], Durability::Now).unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(get_all(s2.as_ref(), "k").unwrap(), b"one");
    // conditional_writes = "head": the same, without a probe.
    let mut head = cfg.clone();
    head.conditional_writes = "head".into();
    let s3 = storage::open(&head).unwrap();
    assert!(s3.conditional_writes(true).unwrap().contains("HEAD"));
    assert_eq!(
        s3.put_new("k", &mut &b"three"[..], Durability::Now)
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(get_all(s3.as_ref(), "k").unwrap(), b"one");
    // And emulated compare-and-swap still refuses a stale tag.
    let t1 = s3.put_versioned("cas", b"a", None).unwrap().unwrap();
    assert!(s3.put_versioned("cas", b"b", None).unwrap().is_none());
    let t2 = s3.put_versioned("cas", b"b", Some(&t1)).unwrap().unwrap();
    assert!(s3.put_versioned("cas", b"c", Some(&t1)).unwrap().is_none());
    assert!(!s3.delete_versioned("cas", &t1).unwrap());
    assert!(s3.delete_versioned("cas", &t2).unwrap());
}
