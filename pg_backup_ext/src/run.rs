//! One walshipper backup run: spawned with an argument vector (no shell),
//! its JSON lines read by a plain thread (which never touches PostgreSQL),
//! its end classified. Used by the scheduler and by backup_run(wait => true).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct Run {
    pub execution_id: i64,
    child: Child,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    pub started: Instant,
    pub bytes_done: i64,
    pub bytes_total: i64,
    pub done_event: Option<serde_json::Value>,
}

pub enum Outcome {
    Succeeded(serde_json::Value),
    Failed(String),
}

pub fn spawn(exe: &str, config: &str, execution_id: i64, kind: &str) -> Result<Run, String> {
    let mut child = Command::new(exe)
        .args(["--config", config, "backup", "--json", "--type", kind])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot run walshipper at {exe}: {e} (check pg_backup.walshipper_path)")
        })?;
    let (tx, lines) = channel();
    let stdout = child.stdout.take();
    std::thread::spawn(move || {
        if let Some(out) = stdout {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let err_buf = stderr.clone();
    let child_err = child.stderr.take();
    std::thread::spawn(move || {
        if let Some(mut e) = child_err {
            let mut s = String::new();
            let _ = e.read_to_string(&mut s);
            if let Ok(mut b) = err_buf.lock() {
                *b = s;
            }
        }
    });
    Ok(Run {
        execution_id,
        child,
        lines,
        stderr,
        started: Instant::now(),
        bytes_done: 0,
        bytes_total: 0,
        done_event: None,
    })
}

impl Run {
    /// Reads what walshipper printed so far; Some when it has exited.
    pub fn poll(&mut self) -> Option<Outcome> {
        while let Ok(line) = self.lines.try_recv() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            match v["event"].as_str() {
                Some("progress") => {
                    self.bytes_done = v["bytes_done"].as_i64().unwrap_or(self.bytes_done);
                    self.bytes_total = v["bytes_total"].as_i64().unwrap_or(self.bytes_total);
                }
                Some("done") => self.done_event = Some(v),
                _ => {}
            }
        }
        let status = match self.child.try_wait() {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => return Some(Outcome::Failed(format!("cannot wait for walshipper: {e}"))),
        };
        // Let the reader threads drain what is left.
        std::thread::sleep(std::time::Duration::from_millis(50));
        while let Ok(line) = self.lines.try_recv() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["event"] == "done" {
                    self.done_event = Some(v);
                }
            }
        }
        let err = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let reason = err
            .lines()
            .rev()
            .find(|l| l.starts_with("walshipper:"))
            .map(|l| l.trim_start_matches("walshipper:").trim().to_string())
            .unwrap_or_else(|| err.lines().last().unwrap_or("").to_string());
        Some(match (status.success(), self.done_event.take()) {
            (true, Some(done)) => Outcome::Succeeded(done),
            (true, None) => {
                Outcome::Failed("walshipper exited without reporting a finished backup".into())
            }
            (false, _) => Outcome::Failed(match status.code() {
                Some(c) if !reason.is_empty() => format!("{reason} (exit {c})"),
                Some(c) => format!("walshipper exited with status {c}"),
                None => "walshipper was killed by a signal".into(),
            }),
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `walshipper info --json`, run in the background for backup.repositories.
pub struct InfoProbe {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    pub started: Instant,
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        if let Some(mut r) = r {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            if let Ok(mut b) = b.lock() {
                *b = s;
            }
        }
    });
    buf
}

impl InfoProbe {
    pub fn spawn(exe: &str, config: &str) -> Result<InfoProbe, String> {
        let mut child = Command::new(exe)
            .args(["--config", config, "info", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run walshipper at {exe}: {e}"))?;
        let out = drain(child.stdout.take());
        let err = drain(child.stderr.take());
        Ok(InfoProbe {
            child,
            out,
            err,
            started: Instant::now(),
        })
    }

    /// Some(Ok(json)) or Some(Err(reason)) once it has exited.
    pub fn poll(&mut self) -> Option<Result<String, String>> {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => return Some(Err(format!("cannot wait for walshipper: {e}"))),
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        let out = self.out.lock().map(|s| s.clone()).unwrap_or_default();
        let err = self.err.lock().map(|s| s.clone()).unwrap_or_default();
        Some(if status.success() {
            Ok(out)
        } else {
            Err(err
                .lines()
                .rev()
                .find(|l| l.starts_with("walshipper:"))
                .unwrap_or(err.lines().last().unwrap_or("walshipper info failed"))
                .trim_start_matches("walshipper:")
                .trim()
                .to_string())
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
