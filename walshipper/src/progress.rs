//! Progress of long commands: a line on a terminal, or JSON lines on stdout
//! (`--json`) for the extension's worker to read.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
pub struct Counters {
    pub bytes_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub files_done: AtomicU64,
    pub files_total: AtomicU64,
}

pub struct Reporter {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// Prints one JSON object as a line on stdout.
pub fn json_event(value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Prints one event of the contract with the extension (docs/contract.md)
/// as a line on stdout: through its type, so no field name can drift.
pub fn event(e: &pg_backup_contract::Event) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", e.to_line());
    let _ = out.flush();
}

impl Reporter {
    /// Reports every second until dropped. `what` names the operation.
    pub fn start(what: &'static str, counters: Arc<Counters>, json: bool) -> Reporter {
        let stop = Arc::new(AtomicBool::new(false));
        let tty = std::io::stderr().is_terminal();
        let handle = (json || tty).then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut ticks = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    ticks += 1;
                    if !ticks.is_multiple_of(10) {
                        continue;
                    }
                    let done = counters.bytes_done.load(Ordering::Relaxed);
                    let total = counters.bytes_total.load(Ordering::Relaxed);
                    if json {
                        event(&pg_backup_contract::Event::Progress(
                            pg_backup_contract::Progress {
                                operation: what.to_string(),
                                bytes_done: done,
                                bytes_total: total,
                                files_done: counters.files_done.load(Ordering::Relaxed),
                                files_total: counters.files_total.load(Ordering::Relaxed),
                            },
                        ));
                    } else {
                        let pct = if total > 0 {
                            done as f64 * 100.0 / total as f64
                        } else {
                            0.0
                        };
                        eprint!(
                            "\r{what}: {pct:5.1}% ({} of {} MiB)   ",
                            done >> 20,
                            total >> 20
                        );
                    }
                }
                if tty && !json {
                    eprintln!();
                }
            })
        });
        Reporter { stop, handle }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
