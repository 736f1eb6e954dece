//! Crash points, for the tests that prove a multi-step change safe against
//! a process killed at any step (docs/contract.md, "Crash points").
//!
//! `WALSHIPPER_CRASH_AT=<name>:<n>` makes the process SIGKILL itself the
//! n-th time (from 1) it reaches crash point `<name>`: no destructor, no
//! flush, no cleanup, exactly as `kill -9` or the OOM killer would. The tests
//! walk n = 1, 2, ... until a run completes, so every step is hit. Unset (as
//! in production), a crash point costs one relaxed atomic load.
//!
//! Safe to leave in release builds: it can do nothing but end the process,
//! which whoever sets this process's environment can do anyway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn target() -> &'static Option<(String, u64)> {
    TARGET.get_or_init(|| {
        let v = std::env::var("WALSHIPPER_CRASH_AT").ok()?;
        let (name, n) = v.rsplit_once(':')?;
        Some((name.to_string(), n.parse().ok().filter(|n| *n > 0)?))
    })
}

/// A crash point: kills the process here if `WALSHIPPER_CRASH_AT` says so.
pub fn point(name: &str) {
    let Some((want, n)) = target() else { return };
    if want != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
        tracing::warn!("WALSHIPPER_CRASH_AT={name}:{n}: killing this process");
        // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
