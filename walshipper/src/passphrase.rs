//! Where the passphrase comes from: one home for "get the passphrase".
//!
//! In order of precedence:
//! 1. `WALSHIPPER_PASSPHRASE` (environment; wins over everything),
//! 2. `[encryption] passphrase_command`: an argument vector run without a
//!    shell whose standard output is the passphrase (Vault, sops,
//!    systemd-creds, a cloud secret manager: no plugin needed),
//! 3. `[encryption] passphrase_file` (default /etc/walshipper/passphrase).
//!
//! Never the catalog: the database never sees the passphrase.
//!
//! The command is the slow source (a Vault call costs 50-200 ms and load
//! on Vault), so the repository reads the passphrase only when the host's
//! key cache misses (`repo::Unlocker`), and within one process the command's
//! output is kept for [`MEMO_TTL`] so that several repositories opened by
//! one command (they share keys) run it once.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::config::Config;
use crate::error::{Error, Result};

/// A passphrase is a line; 64 KiB of output is a mistake (a whole secret
/// document, a JSON blob), not a passphrase.
pub const MAX_OUTPUT: usize = 64 << 10;
/// What of the command's standard error is kept for the error message.
const MAX_STDERR_SHOWN: usize = 2000;
/// How long one process reuses a command's output. Short: a long-running
/// process (`serve`) must see a changed passphrase soon.
pub const MEMO_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_TIMEOUT_S: u64 = 30;
pub const MAX_TIMEOUT_S: u64 = 3600;

/// The configured source of the passphrase (not the passphrase).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Env,
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
    File(PathBuf),
}

impl Source {
    /// The source `cfg` and the environment name, env first.
    pub fn of(cfg: &Config) -> Source {
        Self::with_env(cfg, std::env::var_os("WALSHIPPER_PASSPHRASE").is_some())
    }

    fn with_env(cfg: &Config, env_set: bool) -> Source {
        let e = &cfg.encryption;
        if env_set {
            Source::Env
        } else if !e.passphrase_command.is_empty() {
            Source::Command {
                argv: e.passphrase_command.clone(),
                timeout: Duration::from_secs(e.passphrase_command_timeout),
            }
        } else {
            Source::File(e.passphrase_file.clone())
        }
    }

    /// For messages: which setting supplied the passphrase. Names only the
    /// program of a command (its arguments may be sensitive).
    pub fn describe(&self) -> String {
        match self {
            Source::Env => "WALSHIPPER_PASSPHRASE".into(),
            Source::Command { argv, .. } => format!(
                "[encryption] passphrase_command ({})",
                argv.first().map_or("", String::as_str)
            ),
            Source::File(p) => format!("[encryption] passphrase_file {}", p.display()),
        }
    }

    /// Reads the passphrase (runs the command, reads the file or the
    /// environment). Never empty.
    pub fn read(&self) -> Result<Zeroizing<Vec<u8>>> {
        match self {
            Source::Env => {
                let v = std::env::var_os("WALSHIPPER_PASSPHRASE").unwrap_or_default();
                let p = Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(v));
                if p.is_empty() {
                    return Err(Error::Config(
                        "WALSHIPPER_PASSPHRASE is set but empty".into(),
                    ));
                }
                Ok(p)
            }
            Source::Command { argv, timeout } => memoized(argv, *timeout),
            Source::File(path) => crate::keys::read_passphrase_file(path),
        }
    }

    /// What the host's key cache binds its entries to (keys::KeyCache mixes
    /// it with the host secret). For the environment and the file: the
    /// passphrase itself, as before (reading them is cheap). For a command:
    /// the host secret and the command's argument vector, since the
    /// passphrase is not known without running it, and running it on every
    /// archive-push is what the cache is for. Whoever runs as this OS user
    /// can run the command anyway, so this gives them nothing; a copy of the
    /// cache directory alone still holds only a 256-bit unknown (the host
    /// secret lives in tmpfs, not beside the cache).
    pub fn cache_binding(&self) -> Result<Zeroizing<Vec<u8>>> {
        match self {
            Source::Command { argv, .. } => Ok(command_binding(argv)),
            _ => self.read(),
        }
    }

    pub fn is_command(&self) -> bool {
        matches!(self, Source::Command { .. })
    }
}

/// Starts with a NUL and a label, then length-prefixed arguments: no
/// passphrase read from a file or the environment (trailing newline dropped,
/// never empty) is likely to equal it, and no two argument vectors share it.
fn command_binding(argv: &[String]) -> Zeroizing<Vec<u8>> {
    let mut b = Zeroizing::new(b"\0walshipper passphrase_command v1\0".to_vec());
    for a in argv {
        b.extend_from_slice(&(a.len() as u64).to_be_bytes());
        b.extend_from_slice(a.as_bytes());
    }
    b
}

/// Checks `[encryption] passphrase_command` and its timeout (from
/// `Config::validate`): an absolute program path, a bounded timeout, and not
/// both a command and a file of one's own choosing (which one would win is
/// not something to leave to a reader of the configuration).
pub fn validate(cfg: &Config) -> Result<()> {
    let e = &cfg.encryption;
    if !(1..=MAX_TIMEOUT_S).contains(&e.passphrase_command_timeout) {
        return Err(Error::Config(format!(
            "encryption.passphrase_command_timeout: {} is out of range (1 to {MAX_TIMEOUT_S} seconds)",
            e.passphrase_command_timeout
        )));
    }
    let Some(program) = e.passphrase_command.first() else {
        return Ok(());
    };
    if e.passphrase_file != Path::new(crate::config::DEFAULT_PASSPHRASE_FILE) {
        return Err(Error::Config(format!(
            "encryption: both passphrase_command and passphrase_file ({}) are set; keep one (the command if the passphrase lives in a secret manager, the file otherwise)",
            e.passphrase_file.display()
        )));
    }
    if !Path::new(program).is_absolute() {
        return Err(Error::Config(format!(
            "encryption.passphrase_command: the program '{program}' must be an absolute path (no PATH lookup: archive_command runs with the server's PATH, not yours), e.g. \"/usr/bin/{}\"",
            Path::new(program)
                .file_name()
                .map_or("vault".into(), |n| n.to_string_lossy())
        )));
    }
    if e.passphrase_command.iter().any(|a| a.contains('\0')) {
        return Err(Error::Config(
            "encryption.passphrase_command: an argument holds a NUL byte".into(),
        ));
    }
    Ok(())
}

/// Parses `WALSHIPPER_ENCRYPTION_PASSPHRASE_COMMAND`: a TOML array of
/// strings (`["/usr/bin/vault", "kv", "get", "-field=passphrase", "secret/w"]`),
/// or a bare absolute path for a program without arguments (never split at
/// spaces: that would be a shell's job, and there is no shell). Empty: unset.
pub fn parse_env_command(name: &str, v: &str) -> Result<Vec<String>> {
    let t = v.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    if !t.starts_with('[') {
        return Ok(vec![t.to_string()]);
    }
    #[derive(serde::Deserialize)]
    struct W {
        v: Vec<String>,
    }
    toml::from_str::<W>(&format!("v = {t}"))
        .map(|w| w.v)
        .map_err(|_| {
            Error::Config(format!(
                "{name}: not a list of strings like [\"/usr/bin/vault\", \"kv\", \"get\", \"-field=passphrase\", \"secret/walshipper\"]"
            ))
        })
}

struct Memo {
    binding: Zeroizing<Vec<u8>>,
    value: Zeroizing<Vec<u8>>,
    at: Instant,
}

static MEMO: Mutex<Option<Memo>> = Mutex::new(None);

/// The command's output, reused within one process for [`MEMO_TTL`].
/// Failures are not kept: the next caller runs the command again.
fn memoized(argv: &[String], timeout: Duration) -> Result<Zeroizing<Vec<u8>>> {
    let binding = command_binding(argv);
    let mut m = MEMO.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(memo) = m.as_ref() {
        if memo.binding == binding && memo.at.elapsed() < MEMO_TTL {
            return Ok(memo.value.clone());
        }
    }
    // Dropped (wiped) before the command runs again.
    *m = None;
    let value = run_command(argv, timeout)?;
    *m = Some(Memo {
        binding,
        value: value.clone(),
        at: Instant::now(),
    });
    Ok(value)
}

/// Forgets the passphrase a command printed (wiped), so that the next
/// reader runs it again: after `key passphrase` changed it, for example.
pub fn forget() {
    *MEMO.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Runs the passphrase command: no shell, standard input from /dev/null,
/// standard output captured (the secret: at most [`MAX_OUTPUT`], never in a
/// message), standard error captured (bounded, shown in the error), killed
/// with its process group at `timeout`. Trailing newlines are dropped; an
/// empty result is an error.
pub fn run_command(argv: &[String], timeout: Duration) -> Result<Zeroizing<Vec<u8>>> {
    let Some(program) = argv.first() else {
        return Err(Error::Config(
            "encryption.passphrase_command is empty".into(),
        ));
    };
    let what = format!("encryption.passphrase_command {program}");
    let hint = "run it by hand as the user walshipper runs as (for archive_command: the PostgreSQL server's user, with its environment) to see what it does";
    let mut cmd = Command::new(program);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills a wrapper script
        // and what it started (the pipes close only when all are gone).
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    // Killed with us (the archiver stopping archive-push at shutdown) rather
    // than left waiting on a secret store that no one will ask again; the
    // spawning thread waits for it, so it cannot exit first.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    // walshipper's own settings (a repository's secret_access_key) are
    // none of its business; the rest of the environment (VAULT_ADDR,
    // AWS_PROFILE, CREDENTIALS_DIRECTORY) is what such tools need.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WALSHIPPER_") {
            cmd.env_remove(k);
        }
    }
    check_program(Path::new(program), &what)?;
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (is it executable by this user?)".to_string()
            }
            _ => e.to_string(),
        };
        Error::Config(format!("{what}: cannot run it: {why}"))
    })?;
    let pid = child.id() as libc::pid_t;
    let (Some(mut out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        kill_group(pid);
        let _ = child.wait();
        return Err(Error::Config(format!("{what}: no pipes to the command")));
    };
    let (out_tx, out_rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Reserved once, so that growing never leaves a copy behind.
        let mut buf = Zeroizing::new(Vec::with_capacity(MAX_OUTPUT + 1));
        let r = (&mut out)
            .take(MAX_OUTPUT as u64 + 1)
            .read_to_end(&mut buf)
            .map(|_| ());
        let _ = out_tx.send((r, buf));
        // Anything beyond the bound is drained, so the command is not
        // blocked writing it; it is refused anyway.
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    let (err_tx, err_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut err = err;
        let mut kept = Vec::new();
        let _ = (&mut err)
            .take(MAX_STDERR_SHOWN as u64)
            .read_to_end(&mut kept);
        let _ = std::io::copy(&mut err, &mut std::io::sink());
        let _ = err_tx.send(kept);
    });
    let deadline = started + timeout;
    let timed_out = |child: &mut std::process::Child| {
        kill_group(pid);
        let _ = child.wait();
        Error::Config(format!(
            "{what}: no answer within {} s (passphrase_command_timeout); it was killed. Is the secret store reachable? ({hint})",
            timeout.as_secs()
        ))
    };
    // The exit status, polled (a few ms of latency at most, once per key
    // per host thanks to the key cache).
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(e) => {
                kill_group(pid);
                let _ = child.wait();
                return Err(Error::Config(format!("{what}: waiting for it: {e}")));
            }
        }
        if Instant::now() >= deadline {
            return Err(timed_out(&mut child));
        }
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    // Its output, up to the same deadline: a process it left behind in the
    // background may still hold the pipe.
    let left = deadline.saturating_duration_since(Instant::now());
    let output = match out_rx.recv_timeout(left) {
        Ok(o) => o,
        Err(_) => {
            kill_group(pid);
            return Err(Error::Config(format!(
                "{what}: exited, but something it started kept its output open past {} s (passphrase_command_timeout); it was killed",
                timeout.as_secs()
            )));
        }
    };
    let stderr = err_rx
        .recv_timeout(Duration::from_millis(200))
        .unwrap_or_default();
    let stderr = shown(&stderr);
    let said = if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    };
    if !status.success() {
        let how = match (status.code(), status.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => format!("was killed by signal {s}"),
            _ => "failed".to_string(),
        };
        return Err(Error::Config(format!(
            "{what} {how}{said} (nothing was changed; {hint})"
        )));
    }
    let (read, mut value) = output;
    read.map_err(|e| Error::Config(format!("{what}: reading its output: {e}")))?;
    if value.len() > MAX_OUTPUT {
        return Err(Error::Config(format!(
            "{what} printed more than {} KiB: that is not a passphrase (make it print only the passphrase, e.g. vault kv get -field=..., aws ... --query SecretString --output text)",
            MAX_OUTPUT >> 10
        )));
    }
    while value.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        value.pop();
    }
    if value.is_empty() {
        return Err(Error::Config(format!(
            "{what} exited with status 0 but printed no passphrase{said} ({hint})"
        )));
    }
    tracing::debug!(
        "passphrase read from {what} in {} ms",
        started.elapsed().as_millis()
    );
    Ok(value)
}

/// The program runs with walshipper's rights and environment (a
/// repository's S3 credentials included): one that group or others may
/// replace is refused, as a shared passphrase file is.
fn check_program(program: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(m) = std::fs::metadata(program) else {
        // spawn says why (missing, not permitted) in its own words.
        return Ok(());
    };
    let mode = m.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(Error::Config(format!(
            "{what} may be changed by group or others (mode {:04o}): it would run with walshipper's rights; chmod go-w it",
            mode & 0o7777
        )));
    }
    // Another unprivileged user who owns it could change it too.
    use std::os::unix::fs::MetadataExt;
    let uid = crate::private_dir::euid();
    if m.uid() != 0 && m.uid() != uid {
        return Err(Error::Config(format!(
            "{what} belongs to user id {}, neither root nor the user walshipper runs as ({uid}): its owner could change what runs with walshipper's rights; make root own it",
            m.uid()
        )));
    }
    Ok(())
}

fn kill_group(pid: libc::pid_t) {
    // SAFETY: kill has no memory preconditions; the group is the child's own
    // (process_group(0)), never ours.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// A command's standard error for a message: printable, one line, bounded.
fn shown(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(MAX_STDERR_SHOWN)]);
    let one: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    one.join("; ")
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn command_output_is_trimmed_bounded_and_errors_are_clear() {
        let d = tempfile::tempdir().unwrap();
        let t = Duration::from_secs(5);
        let ok = script(d.path(), "ok", "printf 'pass word\\n\\n'");
        assert_eq!(&run_command(&[ok], t).unwrap()[..], b"pass word");
        let fail = script(
            d.path(),
            "fail",
            "echo 'permission denied: token expired' >&2; exit 3",
        );
        let e = run_command(&[fail], t).unwrap_err().to_string();
        assert!(e.contains("exited with status 3"), "{e}");
        assert!(e.contains("token expired"), "{e}");
        let empty = script(d.path(), "empty", "echo");
        let e = run_command(&[empty], t).unwrap_err().to_string();
        assert!(e.contains("printed no passphrase"), "{e}");
        let big = script(d.path(), "big", "head -c 100000 /dev/zero | tr '\\0' a");
        let e = run_command(&[big], t).unwrap_err().to_string();
        assert!(e.contains("more than 64 KiB"), "{e}");
        let shared = script(d.path(), "shared", "echo x");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o722)).unwrap();
        let e = run_command(&[shared], t).unwrap_err().to_string();
        assert!(e.contains("chmod go-w"), "{e}");
        let args = script(d.path(), "args", "printf '%s|%s' \"$1\" \"$2\"");
        let v = run_command(&[args, "a b".into(), "$HOME".into()], t).unwrap();
        assert_eq!(
            &v[..],
            b"a b|$HOME",
            "arguments reach it verbatim, no shell"
        );
    }

    #[test]
    fn env_command_parsing() {
        let n = "WALSHIPPER_ENCRYPTION_PASSPHRASE_COMMAND";
        assert_eq!(
            parse_env_command(
                n,
                r#"["/usr/bin/vault", "kv", "get", "-field=p", "secret/w"]"#
            )
            .unwrap(),
            ["/usr/bin/vault", "kv", "get", "-field=p", "secret/w"]
        );
        assert_eq!(
            parse_env_command(n, "/usr/local/bin/get pass").unwrap(),
            ["/usr/local/bin/get pass"]
        );
        assert!(parse_env_command(n, "").unwrap().is_empty());
        let e = parse_env_command(n, "[\"/a\", 3").unwrap_err().to_string();
        assert!(e.contains(n), "{e}");
    }

    #[test]
    fn source_order_env_command_file() {
        let mut c = Config::default();
        assert_eq!(
            Source::with_env(&c, false),
            Source::File(crate::config::DEFAULT_PASSPHRASE_FILE.into())
        );
        c.encryption.passphrase_command = vec!["/bin/echo".into(), "x".into()];
        assert!(Source::with_env(&c, false).is_command());
        assert_eq!(Source::with_env(&c, true), Source::Env);
        // The binding depends on every argument, never on the output.
        assert_ne!(
            command_binding(&["/a".into(), "bc".into()])[..],
            command_binding(&["/ab".into(), "c".into()])[..]
        );
    }
}
