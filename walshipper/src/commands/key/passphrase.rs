//! `key passphrase`: re-wrap every key file of every configured repository
//! under a new passphrase (docs/operations.md, "Changing the passphrase").
//!
//! Each key file holds slots, each wrapping the same data key under one
//! passphrase (keys.rs). The change is a sequence of single-object atomic
//! replaces, each read back and checked, so that a crash at any moment
//! leaves every key file openable by the old or the new passphrase:
//!
//! 1. pre-check, writing nothing: the configured (old) passphrase opens
//!    every key file of every repository; the new one is acceptable;
//! 2. stage `both`: a slot for the new passphrase is added to every key
//!    file that lacks one (a re-run after a crash resumes here);
//! 3. install: the configured passphrase file is replaced by the new
//!    passphrase (one rename). Impossible for `WALSHIPPER_PASSPHRASE` or a
//!    `passphrase_command`, skipped with `--keep-old`: the run stops at
//!    stage `both` and says what the operator does next (`--finish`);
//! 4. stage `done`: every slot the new passphrase does not open is removed,
//!    then the keys are re-cached on this host under the new passphrase.
//!
//! Nothing but key files (and the passphrase file) is rewritten: objects
//! name their data key, which does not change.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pg_backup_contract::{KeyRepoResult, KeyReport};
use zeroize::Zeroizing;

use crate::codec::DataKey;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::keys::{self, EncryptionMode, KeyCache, KeyFile};
use crate::layout;
use crate::lock::{self, Lock};
use crate::repo::Repository;

/// Where the new passphrase comes from.
pub enum NewPassphrase<'a> {
    File(&'a Path),
    Stdin,
}

pub struct Args<'a> {
    /// None with `finish`.
    pub new: Option<NewPassphrase<'a>>,
    /// Stop at stage `both`: the old passphrase keeps working.
    pub keep_old: bool,
    /// Remove every wrapping the configured passphrase does not open.
    pub finish: bool,
    pub json: bool,
}

/// After the passphrase file is replaced, how long to wait before the old
/// passphrase stops working: a walshipper that read the old passphrase just
/// before the rename (an archive-push) unlocks its key within milliseconds
/// of reading it; this lets it finish instead of failing once.
const INSTALL_GRACE: Duration = Duration::from_secs(1);

/// One repository during the change: held under its key lock.
struct Held {
    repo: Repository,
    /// Checked before each write (an S3 lease can be lost).
    lock: Lock,
    /// Every key file, as last written or read.
    files: Vec<KeyFile>,
    /// Key ids of the files rewritten by this run (once or twice each).
    rewritten: BTreeSet<String>,
}

/// Where the configured passphrase comes from (what `Config::passphrase`
/// reads): only a file can be replaced by this command.
enum Source {
    Env,
    Command,
    File(PathBuf),
}

fn source(cfg: &Config) -> Source {
    if std::env::var_os("WALSHIPPER_PASSPHRASE").is_some() {
        Source::Env
    } else if !cfg.encryption.passphrase_command.is_empty() {
        Source::Command
    } else {
        Source::File(cfg.encryption.passphrase_file.clone())
    }
}

pub fn run(cfg: &Config, args: &Args) -> Result<()> {
    let started = Instant::now();
    if cfg.encryption.mode == EncryptionMode::None {
        return Err(Error::Invalid(
            "[encryption] mode = \"none\": the repositories have no keys and no passphrase to change"
                .into(),
        ));
    }
    let configured = Zeroizing::new(cfg.passphrase()?);
    // The new passphrase is read and judged before anything is opened.
    let new = match &args.new {
        Some(NewPassphrase::File(p)) => Some(keys::read_new_passphrase_file(p)?),
        Some(NewPassphrase::Stdin) => Some(read_stdin()?),
        None => None,
    };
    let new = match new {
        Some(n) if n[..] == configured[..] => None,
        Some(n) => {
            keys::check_new_passphrase(&n, &configured)?;
            Some(n)
        }
        None => None,
    };
    let resuming = args.new.is_some() && new.is_none();
    if resuming && args.keep_old {
        return Err(Error::Invalid(
            "the new passphrase is already the configured one: with --keep-old there is nothing to add (run `walshipper key passphrase --finish` to make the old one stop working)".into(),
        ));
    }
    let mut held = open_all(cfg)?;
    crate::failpoint::point("key-passphrase");
    let Some(new) = new else {
        // --finish, or the new passphrase is already the configured one
        // (a run killed after installing it): remove the other slots.
        let old_ones = finish(cfg, &mut held, &configured, None)?;
        if resuming && old_ones == 0 {
            return Err(Error::Invalid(
                "the new passphrase is already the configured one and the only one that opens the key files: nothing to change (a change to it that was interrupted is complete)".into(),
            ));
        }
        let operation = if args.finish {
            "passphrase_finish"
        } else {
            "passphrase"
        };
        return report(&held, operation, "done", started, args.json);
    };
    add_slots(&mut held, &configured, &new)?;
    let path = match source(cfg) {
        _ if args.keep_old => {
            report(&held, "passphrase", "both", started, args.json)?;
            next_steps("--keep-old was given");
            return Ok(());
        }
        Source::Env => {
            report(&held, "passphrase", "both", started, args.json)?;
            next_steps("the passphrase comes from WALSHIPPER_PASSPHRASE");
            return Ok(());
        }
        Source::Command => {
            report(&held, "passphrase", "both", started, args.json)?;
            next_steps("the passphrase comes from [encryption] passphrase_command");
            return Ok(());
        }
        Source::File(p) => p,
    };
    // A symbolic link points at a file something else manages (a secret
    // store's mount, configuration management): replacing the link would
    // leave that file with the old passphrase, to come back later.
    let is_link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
    if is_link {
        report(&held, "passphrase", "both", started, args.json)?;
        next_steps(&format!(
            "{} is a symbolic link: put the new passphrase where it points (or wherever the tool that manages it keeps it)",
            path.display()
        ));
        return Ok(());
    }
    if let Err(e) = keys::replace_passphrase_file(&path, &new) {
        tracing::error!(
            "cannot install the new passphrase in {}: {e}",
            path.display()
        );
        report(&held, "passphrase", "both", started, args.json)?;
        next_steps(&format!(
            "it could not be written to {} ({e})",
            path.display()
        ));
        return Ok(());
    }
    // What the configuration reads now must be the new passphrase.
    if Zeroizing::new(cfg.passphrase()?)[..] != new[..] {
        return Err(Error::Config(format!(
            "{} was replaced, but the configuration does not read the new passphrase from it; both passphrases still open every key file: fix the configuration, then run `walshipper key passphrase --finish`",
            path.display()
        )));
    }
    tracing::info!(
        "the new passphrase is in {}; the old one stops working in {} s",
        path.display(),
        INSTALL_GRACE.as_secs()
    );
    crate::failpoint::point("key-passphrase");
    std::thread::sleep(INSTALL_GRACE);
    finish(cfg, &mut held, &new, Some(&configured))?;
    report(&held, "passphrase", "done", started, args.json)
}

/// Standard input read with read(2), a byte at a time, so that nothing
/// beyond the line is consumed and no buffer outside ours holds it.
struct RawStdin;

impl std::io::Read for RawStdin {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            // SAFETY: reads at most one byte into a valid, writable buffer.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), 1) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Reads one line from standard input; on a terminal, without echo and
/// twice (a typing mistake would otherwise become the passphrase).
fn read_stdin() -> Result<Zeroizing<Vec<u8>>> {
    use std::io::IsTerminal;
    // Read from fd 0 directly, not through std's Stdin: its 8 KiB buffer
    // would keep a copy of the passphrase, never wiped, for the process's life.
    let mut stdin = RawStdin;
    if !std::io::stdin().is_terminal() {
        return keys::read_passphrase_line(&mut stdin);
    }
    let _echo_off = EchoOff::new()?;
    eprint!("New passphrase: ");
    let a = keys::read_passphrase_line(&mut stdin)?;
    // ECHONL: the terminal still echoes the newline typed.
    eprint!("The same again: ");
    let b = keys::read_passphrase_line(&mut stdin)?;
    if a[..] != b[..] {
        return Err(Error::Invalid(
            "the two entries differ; nothing was changed".into(),
        ));
    }
    Ok(a)
}

/// Turns the terminal's echo off until dropped.
struct EchoOff(libc::termios);

impl EchoOff {
    fn new() -> Result<EchoOff> {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a zeroed termios that
        // tcgetattr fills; no pointer outlives the call.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Err(Error::io(
                    "read the terminal settings",
                    std::io::Error::last_os_error(),
                ));
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            t.c_lflag |= libc::ECHONL;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return Err(Error::io(
                    "turn the terminal's echo off",
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(EchoOff(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in new().
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
        }
    }
}

/// Locks and opens every configured repository (the configured passphrase
/// must open each) and reads all its key files, checked, not unwrapped.
fn open_all(cfg: &Config) -> Result<Vec<Held>> {
    let mut held = Vec::new();
    for rc in &cfg.repos {
        let lock = lock::keys(rc)?;
        let repo = Repository::open_repo(cfg, rc)?;
        if repo.current_key().is_none() {
            return Err(Error::Invalid(format!(
                "repository {} is not encrypted: it has no key files to re-wrap",
                repo.name
            )));
        }
        let mut files = Vec::new();
        for obj in repo.storage.list(layout::KEYS_PREFIX)? {
            let Some(layout::ObjectName::KeyFile { key_id }) = layout::parse(&obj.key) else {
                tracing::warn!(
                    "repository {}: {:?} among the key files is not one (left alone)",
                    repo.name,
                    obj.key
                );
                continue;
            };
            let file = repo
                .key_file(&key_id)
                .map_err(|e| in_repo(e, &repo.name))?
                .ok_or_else(|| {
                    Error::Repository(format!(
                        "{} vanished from repository {} while read",
                        obj.key, repo.name
                    ))
                })?;
            files.push(file);
        }
        held.push(Held {
            repo,
            lock,
            files,
            rewritten: BTreeSet::new(),
        });
    }
    Ok(held)
}

/// Names the repository in an error about one of its key files.
fn in_repo(e: Error, repo: &str) -> Error {
    match e {
        Error::Corrupt { key, reason } => Error::Corrupt {
            key: format!("{key} in repository {repo}"),
            reason,
        },
        Error::WrongPassphrase { key_id } => Error::Repository(format!(
            "the configured passphrase does not open {} in repository {repo}; nothing was changed (check [encryption] passphrase_file, passphrase_command or WALSHIPPER_PASSPHRASE: it must give the passphrase in use now)",
            layout::key_file(&key_id)
        )),
        other => other,
    }
}

fn mismatch(what: &str, file: &KeyFile, repo: &str) -> Error {
    Error::Repository(format!(
        "{} in repository {repo}, read back after it was written, {what}; stopping (every key file still opens with the old passphrase or the new one: run the command again)",
        layout::key_file(&file.key_id)
    ))
}

/// Stage `both`: every key file gets a slot for `new`. Checks everything
/// first (the configured passphrase opens every file; no file is full), so
/// that a refusal changes nothing.
fn add_slots(held: &mut [Held], configured: &[u8], new: &[u8]) -> Result<()> {
    let mut todo: Vec<(usize, usize, DataKey)> = Vec::new();
    for (h, hd) in held.iter().enumerate() {
        for (i, f) in hd.files.iter().enumerate() {
            let key = f
                .unlock(configured)
                .map_err(|e| in_repo(e, &hd.repo.name))?;
            match f.unlock(new) {
                // Done by an earlier run that was interrupted.
                Ok(k) if k.key == key.key => continue,
                Ok(_) => {
                    return Err(Error::Corrupt {
                        key: format!(
                            "{} in repository {}",
                            layout::key_file(&f.key_id),
                            hd.repo.name
                        ),
                        reason: "the old and the new passphrase unwrap different keys from it"
                            .into(),
                    })
                }
                Err(Error::WrongPassphrase { .. }) => {}
                Err(e) => return Err(in_repo(e, &hd.repo.name)),
            }
            if f.version == keys::KEY_FILE_VERSION && f.slots.len() >= keys::MAX_KEY_SLOTS {
                return Err(Error::Repository(format!(
                    "{} in repository {} already holds {} passphrase wrappings, the most a key file may; nothing was changed: finish the change in progress first (walshipper key passphrase --finish)",
                    layout::key_file(&f.key_id),
                    hd.repo.name,
                    keys::MAX_KEY_SLOTS
                )));
            }
            todo.push((h, i, key));
        }
    }
    for (h, i, key) in todo {
        let hd = &mut held[h];
        let next = hd.files[i].with_slot_for(&key, configured, new)?;
        hd.lock.ensure_held()?;
        let back = hd.repo.replace_key_file(&next)?;
        for (p, what) in [
            (new, "does not open with the new passphrase"),
            (configured, "no longer opens with the old passphrase"),
        ] {
            match back.unlock(p) {
                Ok(k) if k.key == key.key => {}
                _ => return Err(mismatch(what, &back, &hd.repo.name)),
            }
        }
        tracing::info!(
            "repository {}: {} opens with the old and the new passphrase",
            hd.repo.name,
            layout::key_file(&back.key_id)
        );
        hd.rewritten.insert(back.key_id.clone());
        hd.files[i] = back;
        crate::failpoint::point("key-passphrase");
    }
    Ok(())
}

/// Stage `done`: removes from every key file each slot `target` does not
/// open, after checking (writing nothing) that `target` opens the newest
/// slot of every file: it is the passphrase the last change added, so a
/// configuration still giving the old one is refused rather than undoing
/// the change. Then re-caches the keys under `target`. Returns how many
/// files had other slots.
fn finish(cfg: &Config, held: &mut [Held], target: &[u8], old: Option<&[u8]>) -> Result<u64> {
    let mut todo: Vec<(usize, usize, Vec<usize>, DataKey)> = Vec::new();
    let mut keys_seen: HashMap<[u8; 16], DataKey> = HashMap::new();
    for (h, hd) in held.iter().enumerate() {
        for (i, f) in hd.files.iter().enumerate() {
            let (opened, key) = f
                .slots_opened_by(target)
                .map_err(|e| in_repo(e, &hd.repo.name))?;
            let newest = f.slots.len() - 1;
            let Some(key) = key.filter(|_| opened.contains(&newest)) else {
                return Err(Error::Config(format!(
                    "the configuration still gives the old passphrase (or another one): it does not open the newest wrapping of {} in repository {}; nothing was changed. Point [encryption] passphrase_file (or passphrase_command, or WALSHIPPER_PASSPHRASE) at the new passphrase on this host, then run `walshipper key passphrase --finish` again",
                    layout::key_file(&f.key_id),
                    hd.repo.name
                )));
            };
            keys_seen.insert(key.id, key.clone());
            if opened.len() < f.slots.len() {
                todo.push((h, i, opened, key));
            }
        }
    }
    let others = todo.len() as u64;
    for (h, i, keep, key) in todo {
        let hd = &mut held[h];
        let next = hd.files[i].keeping(&keep)?;
        hd.lock.ensure_held()?;
        let back = hd.repo.replace_key_file(&next)?;
        let (opened, k) = back
            .slots_opened_by(target)
            .map_err(|e| in_repo(e, &hd.repo.name))?;
        if opened.len() != back.slots.len() || k.is_none_or(|k| k.key != key.key) {
            return Err(mismatch(
                "does not open with the new passphrase alone",
                &back,
                &hd.repo.name,
            ));
        }
        if let Some(old) = old {
            if !matches!(back.unlock(old), Err(Error::WrongPassphrase { .. })) {
                return Err(mismatch(
                    "still opens with the old passphrase",
                    &back,
                    &hd.repo.name,
                ));
            }
        }
        tracing::info!(
            "repository {}: {} opens with the new passphrase only",
            hd.repo.name,
            layout::key_file(&back.key_id)
        );
        hd.rewritten.insert(back.key_id.clone());
        hd.files[i] = back;
        crate::failpoint::point("key-passphrase");
    }
    // The host's cache entries were sealed under the old passphrase: each
    // is replaced by one under the new (an entry per key id).
    if let Some(dir) = cfg.key_cache_dir() {
        let cache = KeyCache::new(dir);
        // A command source's entries are bound to its argument vector, not
        // to the passphrase it prints (passphrase.rs).
        let source = crate::passphrase::Source::of(cfg);
        let binding = if source.is_command() {
            source.cache_binding()?
        } else {
            Zeroizing::new(target.to_vec())
        };
        for key in keys_seen.values() {
            cache.put(key, &binding);
        }
    }
    Ok(others)
}

/// What the operator does after a run that stopped at stage `both`.
fn next_steps(why: &str) {
    eprintln!(
        "walshipper: stage both: the old and the new passphrase both open every key file of every configured repository. This run stopped there because {why}.\n\
         Next: on EVERY host that uses these repositories, make the configuration give the new passphrase \
         ([encryption] passphrase_file, passphrase_command or WALSHIPPER_PASSPHRASE); then, on one host, run\n    \
         walshipper key passphrase --finish\n\
         which makes the old passphrase stop working."
    );
}

fn report(held: &[Held], operation: &str, stage: &str, started: Instant, json: bool) -> Result<()> {
    let repositories = held
        .iter()
        .map(|h| KeyRepoResult {
            repository: h.repo.name.clone(),
            ok: true,
            current_key_id: h.repo.descriptor.current_key_id.clone(),
            key_files: h.rewritten.len() as u64,
            ..Default::default()
        })
        .collect();
    let report = KeyReport {
        operation: operation.into(),
        succeeded: true,
        stage: stage.into(),
        repositories,
        duration_s: started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    super::print_report(&report, json);
    Ok(())
}
