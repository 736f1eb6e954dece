//! Exclusive locks between walshipper processes (two backups of one
//! repository at once, a backup and an expire).
//!
//! - posix: flock(2) on a file in the repository's directory; the kernel
//!   drops it when the process dies, so a killed run never leaves a stale
//!   lock. The file is opened without following symlinks and must be a
//!   regular file of ours: a planted symlink cannot make us truncate or write
//!   anything else.
//! - S3: a lease object (`layout::lease`), created with If-None-Match: *,
//!   renewed with If-Match by a background thread while held and deleted
//!   (If-Match) when dropped. An expired lease is taken over with If-Match on
//!   the tag that was read as expired, so of two hosts that both see it
//!   expired exactly one wins. Format: docs/repository-format.md, "Locks".

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::Storage;

/// How long a lease lasts without renewal, and how often it is renewed. The
/// margin (five renewals) absorbs slow stores, pauses and clock skew between
/// hosts of up to about a minute.
pub const LEASE_TTL: Duration = Duration::from_secs(120);
pub const LEASE_RENEW: Duration = Duration::from_secs(20);
/// A lease object is a few hundred bytes; a bigger one is not ours.
const LEASE_MAX: usize = 4096;

/// A held lock; released on drop.
pub struct Lock {
    _file: Option<File>,
    lease: Option<Lease>,
}

impl Lock {
    /// Why the lock is no longer held, if it was lost (a lease taken over
    /// after this process failed to renew it for a whole TTL).
    pub fn lost(&self) -> Option<String> {
        let lease = self.lease.as_ref()?;
        lease.shared.state.lock().ok()?.lost.clone()
    }

    /// Err(Busy) when the lock was lost: called before each step that
    /// must not run beside another holder (writing a manifest, deleting).
    pub fn ensure_held(&self) -> Result<()> {
        match self.lost() {
            None => Ok(()),
            Some(why) => Err(Error::Busy(format!(
                "the repository lock was lost ({why}); stopping before changing the repository"
            ))),
        }
    }
}

/// Takes lock `name` in `dir` (created 0700 if needed) without waiting.
pub fn try_lock(dir: &Path, name: &str) -> Result<Lock> {
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    let path = dir.join(format!(".{name}.lock"));
    // O_NOFOLLOW: a symlink planted at the lock path fails with ELOOP
    // instead of opening (and later truncating) its target. No O_TRUNC: the
    // file is emptied only once the flock is ours.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                Error::Invalid(format!(
                    "lock file {} is a symbolic link; refusing to follow it. Remove it (rm {}) \
                     and check who created it",
                    path.display(),
                    path.display()
                ))
            } else {
                Error::io(format!("open lock {}", path.display()), e)
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("stat lock {}", path.display()), e))?;
    let euid = crate::private_dir::euid();
    if !meta.file_type().is_file() || meta.uid() != euid || meta.nlink() != 1 {
        return Err(Error::Invalid(format!(
            "lock file {} is not a regular file owned by this user (uid {euid}) with one link; \
             refusing to use it. Remove it and check who created it",
            path.display()
        )));
    }
    // SAFETY: flock on a valid, open descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        let _ = (&mut file).take(1024).read_to_string(&mut holder);
        return Err(Error::Busy(format!(
            "another walshipper process holds the {name} lock of this repository ({}); wait for it to finish",
            printable(holder.trim())
        )));
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(
        file,
        "pid {}: {}, since {}",
        std::process::id(),
        command_line(),
        Utc::now().to_rfc3339()
    );
    Ok(Lock {
        _file: Some(file),
        lease: None,
    })
}

/// Who holds a lock, for messages (argv holds no secrets; paths are left out).
fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.starts_with('-') || !a.contains('/'))
        .collect();
    format!("walshipper {}", args.join(" "))
}

/// Text read back from a lock or lease, safe to print: no control
/// characters (a hostile lease could hold terminal escapes), bounded.
fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// The lock of one repository, held by backup and expire: an incremental
/// backup refers to earlier backups' objects, which expire must not remove
/// under it. flock in the repository's directory on posix; a lease object in
/// the repository on S3, so that hosts exclude each other too.
pub fn repository(rc: &crate::config::RepoConfig, system_identifier: &str) -> Result<Lock> {
    let _ = system_identifier; // one repository holds one cluster
    match rc.kind.as_str() {
        "posix" => try_lock(&rc.path, "backup"),
        _ => lease(
            Arc::from(crate::storage::open(rc)?),
            "backup",
            &LeaseOptions::default(),
        ),
    }
}

/// The lock of a repository's key files, held by `key passphrase`, `key
/// rotate` and `key retire`: each rewrites key files or the descriptor by
/// read-modify-write, which two at once would undo for one another. Not
/// held by backups (they only read keys); `key retire` also takes
/// [`repository`], as it replaces objects a backup or expire may use.
pub fn keys(rc: &crate::config::RepoConfig) -> Result<Lock> {
    match rc.kind.as_str() {
        "posix" => try_lock(&rc.path, "keys"),
        _ => lease(
            Arc::from(crate::storage::open(rc)?),
            "keys",
            &LeaseOptions::default(),
        ),
    }
}

/// Parameters of a lease; tests shorten the times and pose as other hosts.
#[derive(Clone, Debug)]
pub struct LeaseOptions {
    pub ttl: Duration,
    pub renew_every: Duration,
    pub host: String,
    pub pid: u32,
    pub holder: String,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            ttl: LEASE_TTL,
            renew_every: LEASE_RENEW,
            host: host_name(),
            pid: std::process::id(),
            holder: command_line(),
        }
    }
}

pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The lease object's content (docs/repository-format.md, "Locks").
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseBody {
    pub holder: String,
    pub host: String,
    pub pid: u32,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Random per acquisition: every write differs, so its ETag does too.
    pub token: String,
    /// Renewals so far.
    pub renewals: u64,
}

impl LeaseBody {
    /// A lease read back from the repository (untrusted).
    pub fn parse(bytes: &[u8]) -> Option<LeaseBody> {
        let b: LeaseBody = serde_json::from_slice(bytes).ok()?;
        (b.holder.len() <= 1024 && b.host.len() <= 256 && b.token.len() <= 64).then_some(b)
    }

    /// For messages: who holds it, printable whatever the lease says.
    pub fn describe(&self) -> String {
        format!(
            "{} on host {} (pid {}), since {}, lease valid until {} unless renewed",
            printable(&self.holder),
            printable(&self.host),
            self.pid,
            self.acquired_at.to_rfc3339(),
            self.expires_at.to_rfc3339()
        )
    }

    /// Expired, or held by a process of this host that no longer exists.
    fn is_stale(&self, now: DateTime<Utc>, our_host: &str) -> bool {
        if now > self.expires_at {
            return true;
        }
        if self.host == our_host && self.pid > 1 {
            return !process_exists(self.pid);
        }
        false
    }
}

/// Whether process `pid` of this host exists: only "no such process"
/// (ESRCH) says it does not (a process of another user, EPERM, exists; a
/// pid reused since is taken for the old one). Pids 0, 1 and those beyond
/// pid_t never name a lock holder or writer: taken as existing.
pub(crate) fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid <= 1 {
        return true;
    }
    // SAFETY: kill with signal 0 only checks that the process exists; pid
    // is > 1, so never a process group.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

struct LeaseState {
    etag: String,
    body: LeaseBody,
    lost: Option<String>,
    stop: bool,
}

struct Shared {
    state: Mutex<LeaseState>,
    wake: Condvar,
}

struct Lease {
    storage: Arc<dyn Storage>,
    key: String,
    shared: Arc<Shared>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

/// Takes the lease `name` in `storage` without waiting: Busy (exit 7)
/// naming the holder if another live process holds it.
pub fn lease(storage: Arc<dyn Storage>, name: &str, opts: &LeaseOptions) -> Result<Lock> {
    let key = crate::layout::lease(name);
    let token = hex::encode(crate::keys::random::<16>()?);
    let now = Utc::now();
    let ttl = chrono::Duration::from_std(opts.ttl)
        .map_err(|_| Error::Invalid("lease duration out of range".into()))?;
    let body = LeaseBody {
        holder: opts.holder.clone(),
        host: opts.host.clone(),
        pid: opts.pid,
        acquired_at: now,
        expires_at: now + ttl,
        token,
        renewals: 0,
    };
    let bytes = serde_json::to_vec(&body).map_err(|e| Error::Invalid(e.to_string()))?;
    // A few rounds: the lease may vanish between a refused create and the read.
    let mut etag = None;
    for _ in 0..3 {
        if let Some(t) = storage.put_versioned(&key, &bytes, None)? {
            etag = Some(t);
            break;
        }
        let Some((current, tag)) = storage.get_versioned(&key, LEASE_MAX)? else {
            continue;
        };
        let Some(held) = LeaseBody::parse(&current) else {
            return Err(Error::Busy(format!(
                "the {name} lease {} in {} is unreadable, so whether another walshipper holds it \
                 is unknown; if none runs, delete that object and retry",
                key,
                storage.describe()
            )));
        };
        if !held.is_stale(Utc::now(), &opts.host) {
            return Err(Error::Busy(format!(
                "another walshipper holds the {name} lease of this repository: {}; wait for it \
                 to finish",
                held.describe()
            )));
        }
        // Take over only the exact lease we judged stale: if anyone renewed
        // or took it meanwhile, its tag changed and this write is refused.
        match storage.put_versioned(&key, &bytes, Some(&tag))? {
            Some(t) => {
                tracing::warn!("took over an expired {name} lease: {}", held.describe());
                etag = Some(t);
                break;
            }
            None => {
                return Err(Error::Busy(format!(
                    "another walshipper took over the expired {name} lease of this repository \
                     first (it was {}); wait for it to finish",
                    held.describe()
                )))
            }
        }
    }
    let etag = etag.ok_or_else(|| {
        Error::Busy(format!(
            "the {name} lease {key} keeps changing under us; another walshipper is taking it"
        ))
    })?;
    let shared = Arc::new(Shared {
        state: Mutex::new(LeaseState {
            etag,
            body,
            lost: None,
            stop: false,
        }),
        wake: Condvar::new(),
    });
    let renewer = {
        let (storage, key, shared, opts) =
            (storage.clone(), key.clone(), shared.clone(), opts.clone());
        std::thread::Builder::new()
            .name("walshipper-lease".into())
            .spawn(move || renew_loop(storage.as_ref(), &key, &shared, &opts, ttl))
            .map_err(|e| Error::io("start the lease renewal thread", e))?
    };
    Ok(Lock {
        _file: None,
        lease: Some(Lease {
            storage,
            key,
            shared,
            renewer: Some(renewer),
        }),
    })
}

fn renew_loop(
    storage: &dyn Storage,
    key: &str,
    shared: &Shared,
    opts: &LeaseOptions,
    ttl: chrono::Duration,
) {
    let mut last_ok = Instant::now();
    let Ok(mut st) = shared.state.lock() else {
        return;
    };
    loop {
        let (guard, _) = match shared.wake.wait_timeout(st, opts.renew_every) {
            Ok(r) => r,
            Err(_) => return,
        };
        st = guard;
        if st.stop || st.lost.is_some() {
            return;
        }
        let mut next = st.body.clone();
        next.renewals += 1;
        next.expires_at = Utc::now() + ttl;
        let Ok(bytes) = serde_json::to_vec(&next) else {
            return;
        };
        let etag = st.etag.clone();
        // Not under the lock: a slow store must not block release.
        drop(st);
        let result = storage.put_versioned(key, &bytes, Some(&etag));
        st = match shared.state.lock() {
            Ok(s) => s,
            Err(_) => return,
        };
        match result {
            Ok(Some(t)) => {
                st.etag = t;
                st.body = next;
                last_ok = Instant::now();
            }
            Ok(None) => {
                let msg = format!(
                    "the lease {key} was taken over by another process (this one could not \
                     renew it in time); this run no longer excludes others"
                );
                tracing::error!("{msg}");
                st.lost = Some(msg);
                return;
            }
            Err(e) => {
                tracing::warn!("cannot renew the lease {key}: {e}; retrying");
                if last_ok.elapsed() > opts.ttl {
                    let msg = format!(
                        "the lease {key} expired: it could not be renewed for {}s ({e})",
                        opts.ttl.as_secs()
                    );
                    tracing::error!("{msg}");
                    st.lost = Some(msg);
                    return;
                }
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.stop = true;
            self.shared.wake.notify_all();
        }
        if let Some(h) = self.renewer.take() {
            let _ = h.join();
        }
        // After the renewer stopped: the tag of its last renewal.
        let etag = self
            .shared
            .state
            .lock()
            .ok()
            .and_then(|st| st.lost.is_none().then(|| st.etag.clone()));
        if let Some(etag) = etag {
            match self.storage.delete_versioned(&self.key, &etag) {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    "the lease {} was no longer ours when released; left as it is",
                    self.key
                ),
                Err(e) => tracing::warn!(
                    "cannot release the lease {}: {e}; it expires by itself",
                    self.key
                ),
            }
        }
    }
}
