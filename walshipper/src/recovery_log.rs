//! The repository's record of restores (`recoveries/<id>`): what `restore`,
//! `restore-test` and `table-restore` did, when, from which backup, on
//! which host. `info --json` lists them, and the extension takes them into
//! `backup.recovery_operations`, so that a restore run from the command line
//! is on record beside those started from SQL (docs/contract.md).
//!
//! A record is an object like any other (sealed, bound to its key). Read
//! back, it is untrusted: a record that does not decode, names another id,
//! or carries oversized or unknown values is skipped with a warning, never
//! passed on.

use crate::error::{Error, Result};
use crate::layout;
use crate::repo::Repository;

pub use pg_backup_contract::{RecoveryRecord, RecoveryTarget};

/// The largest record read back.
const RECORD_MAX: usize = 64 << 10;
/// Records `info` lists when not asked for those after an id.
pub const LIST_DEFAULT: usize = 50;
/// Records `info` lists at most in one call (the extension asks again).
pub const LIST_MAX: usize = 500;
/// Longest `error` kept in a record.
const ERROR_MAX: usize = 2000;

/// A new record id: the time now, then 8 random hex digits.
pub fn new_id() -> String {
    // Without randomness (never seen), the time alone still sorts.
    let r = crate::keys::random::<4>().unwrap_or_default();
    format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        hex::encode(r)
    )
}

/// A record for an operation starting now (finished_at and the outcome are
/// filled in by `finish`).
pub fn start(operation: &str, id: String) -> RecoveryRecord {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    RecoveryRecord {
        id,
        operation: operation.into(),
        host: crate::lock::host_name(),
        os_user: os_user(),
        started_at: now.clone(),
        finished_at: now,
        walshipper_version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

/// Sets the outcome and end time of `rec`.
pub fn finish(rec: &mut RecoveryRecord, started: std::time::Instant, error: Option<&Error>) {
    rec.finished_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    rec.duration_s = started.elapsed().as_secs_f64();
    rec.succeeded = error.is_none();
    // Our own messages may hold newlines (a server log's tail): spaces,
    // since a record carries no control characters (see `check`).
    rec.error = error.map(|e| {
        let flat: String = e
            .to_string()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        truncate(&flat, ERROR_MAX)
    });
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn os_user() -> String {
    // SAFETY: getuid cannot fail; getpwuid returns NULL or a pointer to a
    // static entry, read at once.
    unsafe {
        let pw = libc::getpwuid(libc::getuid());
        if pw.is_null() || (*pw).pw_name.is_null() {
            return format!("uid {}", libc::getuid());
        }
        std::ffi::CStr::from_ptr((*pw).pw_name)
            .to_string_lossy()
            .into_owned()
    }
}

/// Stores `rec` in `repo`. The caller decides whether a failure matters: a
/// restore from a read-only repository must not fail for its record.
pub fn write(repo: &Repository, rec: &RecoveryRecord) -> Result<()> {
    check(rec).map_err(|why| Error::Invalid(format!("recovery record {}: {why}", rec.id)))?;
    let body = serde_json::to_vec(rec)
        .map_err(|e| Error::Invalid(format!("recovery record {}: {e}", rec.id)))?;
    // Written at the end of a restore that may have run for hours: sealed
    // by the key current now, not the one current when it began.
    repo.put_object_fresh(&layout::recovery(&rec.id), body.as_slice())?;
    Ok(())
}

/// Writes `rec` to every repository in `repos`, warning about those that
/// refuse it.
pub fn write_all(repos: &[&Repository], rec: &RecoveryRecord) {
    for r in repos {
        if let Err(e) = write(r, rec) {
            tracing::warn!(
                "the record of this {} ({}) could not be stored in repository {}: {e}",
                rec.operation,
                rec.id,
                r.name
            );
        }
    }
}

/// What a well-formed record holds; everything read back goes through it.
fn check(rec: &RecoveryRecord) -> std::result::Result<(), String> {
    if !layout::is_recovery_id(&rec.id) {
        return Err("malformed id".into());
    }
    if !["restore", "restore_test", "table_restore"].contains(&rec.operation.as_str()) {
        return Err(format!(
            "unknown operation {:?}",
            truncate(&rec.operation, 40)
        ));
    }
    if !["end", "immediate", "time", "lsn", "xid", "name"].contains(&rec.target.kind.as_str()) {
        return Err("unknown target kind".into());
    }
    let short = [
        &rec.host,
        &rec.os_user,
        &rec.started_at,
        &rec.finished_at,
        &rec.backup_id,
        &rec.walshipper_version,
    ];
    if short.iter().any(|s| s.len() > 256)
        || rec.target.value.as_ref().is_some_and(|v| v.len() > 256)
        || rec.target_dir.len() > 4096
        || rec.databases.len() > 1000
        || rec.databases.iter().any(|d| {
            d.is_empty() || d.len() > crate::manifest::MAX_DATABASE_NAME || d.contains('\0')
        })
        || rec.error.as_ref().is_some_and(|e| e.len() > ERROR_MAX)
    {
        return Err("a field is too long".into());
    }
    // Shown in the catalog and on terminals: a forged record must not
    // carry terminal escapes or fake lines there.
    let control = |s: &str| s.chars().any(char::is_control);
    if [
        &rec.host,
        &rec.os_user,
        &rec.target_dir,
        &rec.started_at,
        &rec.finished_at,
        &rec.backup_id,
        &rec.walshipper_version,
    ]
    .iter()
    .any(|s| control(s))
        || rec.databases.iter().any(|d| control(d))
        || rec.target.value.as_deref().is_some_and(control)
        || rec.error.as_deref().is_some_and(control)
    {
        return Err("a field holds a control character".into());
    }
    // Empty when it failed before a backup was chosen.
    if !rec.backup_id.is_empty() && !layout::is_backup_id(&rec.backup_id) {
        return Err("backup_id is not a backup id".into());
    }
    for t in [&rec.started_at, &rec.finished_at] {
        if chrono::DateTime::parse_from_rfc3339(t).is_err() {
            return Err(format!("{t:?} is not an RFC 3339 time"));
        }
    }
    if !rec.duration_s.is_finite() || rec.duration_s < 0.0 {
        return Err("bad duration".into());
    }
    Ok(())
}

/// The records of `repo` with an id after `after` (all if None: then only
/// the newest `LIST_DEFAULT`), oldest first, at most `LIST_MAX`. Records
/// that fail to read or check are skipped with a warning.
pub fn list(repo: &Repository, after: Option<&str>) -> Result<Vec<RecoveryRecord>> {
    let mut ids: Vec<String> = repo
        .storage
        .list(layout::RECOVERIES_PREFIX)?
        .into_iter()
        .filter_map(|o| match layout::parse(&o.key) {
            Some(layout::ObjectName::Recovery { id }) => Some(id),
            _ => None,
        })
        .filter(|id| after.is_none_or(|a| id.as_str() > a))
        .collect();
    ids.sort();
    ids.dedup();
    if after.is_none() && ids.len() > LIST_DEFAULT {
        ids.drain(..ids.len() - LIST_DEFAULT);
    }
    ids.truncate(LIST_MAX);
    let mut out = Vec::new();
    for id in ids {
        let key = layout::recovery(&id);
        let rec = repo
            .read_object_capped(&key, RECORD_MAX)
            .and_then(|body| {
                serde_json::from_slice::<RecoveryRecord>(&body).map_err(|e| Error::Corrupt {
                    key: key.clone(),
                    reason: format!("not a recovery record: {e}"),
                })
            })
            .and_then(|rec| {
                let why = if rec.id != id {
                    Some("it names another id".to_string())
                } else {
                    check(&rec).err()
                };
                match why {
                    None => Ok(rec),
                    Some(reason) => Err(Error::Corrupt {
                        key: key.clone(),
                        reason,
                    }),
                }
            });
        match rec {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!("skipping recovery record {key}: {e}"),
        }
    }
    Ok(out)
}

/// The target as a record states it.
pub fn target_of(t: &crate::commands::restore::Target) -> RecoveryTarget {
    use crate::commands::restore::Target;
    let (kind, value) = match t {
        Target::End => ("end", None),
        Target::Immediate => ("immediate", None),
        Target::Time { raw, .. } => ("time", Some(raw.clone())),
        Target::Lsn(l) => ("lsn", Some(crate::wal::format_lsn(*l))),
        Target::Xid(x) => ("xid", Some(x.clone())),
        Target::Name(n) => ("name", Some(n.clone())),
    };
    RecoveryTarget {
        kind: kind.into(),
        value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unencrypted posix repository in `dir` (unsealed objects: what is
    /// left to check is the record itself).
    fn plain_repo(dir: &std::path::Path) -> Repository {
        let p = dir.join("ws.toml");
        std::fs::write(
            &p,
            format!(
                "[repo]\ntype = \"posix\"\npath = \"{}\"\n[encryption]\nmode = \"none\"\n",
                dir.join("repo").display()
            ),
        )
        .unwrap();
        let cfg = crate::config::Config::load_with_env(Some(&p), std::iter::empty()).unwrap();
        Repository::init(
            &cfg,
            cfg.primary(),
            &crate::wal::ClusterIdentity {
                system_identifier: 7_310_000_000_000_000_001,
                pg_major: 15,
                wal_segment_size: 16 << 20,
            },
            &crate::repo::InitOptions {
                encrypt: false,
                kdf_memory_kib: crate::keys::MIN_KDF_MEMORY_KIB,
                kdf_iterations: 1,
            },
        )
        .unwrap()
    }

    fn record(id: &str) -> RecoveryRecord {
        let mut r = start("restore", id.into());
        r.target.kind = "end".into();
        r.backup_id = "20261121-224754F".into();
        r.databases = vec!["app".into()];
        finish(&mut r, std::time::Instant::now(), None);
        r
    }

    #[test]
    fn list_pages_and_skips_what_is_not_a_sound_record() {
        let dir = tempfile::tempdir().unwrap();
        let repo = plain_repo(dir.path());
        let ids: Vec<String> = (0..LIST_DEFAULT + 3)
            .map(|i| format!("20261126T06{:04}Z-0000000a", i))
            .collect();
        for id in &ids {
            write(&repo, &record(id)).unwrap();
        }
        let all = list(&repo, None).unwrap();
        assert_eq!(all.len(), LIST_DEFAULT);
        assert_eq!(all[0].id, ids[3], "the newest, oldest first");
        assert_eq!(all.last().unwrap().id, *ids.last().unwrap());
        assert_eq!(all[0].databases, ["app"]);
        let after = list(&repo, Some(&ids[LIST_DEFAULT])).unwrap();
        assert_eq!(
            after.iter().map(|r| &r.id).collect::<Vec<_>>(),
            ids[LIST_DEFAULT + 1..].iter().collect::<Vec<_>>()
        );
        let obj = |id: &str| dir.path().join("repo").join(layout::recovery(id));
        let last = ids.last().unwrap();
        // A sound record stored under another id; garbage; an oversized
        // object; a record with a value no walshipper writes.
        let renamed = "20991231T235959Z-0123abcd";
        std::fs::copy(obj(last), obj(renamed)).unwrap();
        // Unsealed, the copy reads: only the id inside tells it apart.
        assert!(repo
            .read_object_capped(&layout::recovery(renamed), RECORD_MAX)
            .is_ok());
        std::fs::write(obj(&ids[LIST_DEFAULT + 1]), b"\x00garbage").unwrap();
        let mut big = record(&ids[LIST_DEFAULT]);
        big.error = Some("e".repeat(RECORD_MAX));
        repo.storage.delete(&layout::recovery(&big.id)).unwrap();
        repo.put_object(
            &layout::recovery(&big.id),
            serde_json::to_vec(&big).unwrap().as_slice(),
        )
        .unwrap();
        let mut odd = record("20991231T235959Z-0000ffff");
        odd.operation = "format_disk".into();
        repo.put_object(
            &layout::recovery(&odd.id),
            serde_json::to_vec(&odd).unwrap().as_slice(),
        )
        .unwrap();
        let after = list(&repo, Some(&ids[LIST_DEFAULT - 1])).unwrap();
        assert_eq!(
            after.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            [last.as_str()]
        );
        // The write side refuses what the read side would skip.
        assert!(write(&repo, &odd).is_err());
    }

    #[test]
    fn ids_are_well_formed_and_records_checked() {
        let id = new_id();
        assert!(layout::is_recovery_id(&id), "{id}");
        let mut r = start("restore", id);
        finish(&mut r, std::time::Instant::now(), None);
        r.target.kind = "end".into();
        assert_eq!(check(&r), Ok(()));
        let mut bad = r.clone();
        bad.operation = "format_disk".into();
        assert!(check(&bad).is_err());
        let mut bad = r.clone();
        bad.host = "x".repeat(300);
        assert!(check(&bad).is_err());
        let mut bad = r.clone();
        bad.duration_s = f64::NAN;
        assert!(check(&bad).is_err());
        let mut bad = r.clone();
        bad.backup_id = "../keys".into();
        assert!(check(&bad).is_err());
        let mut bad = r.clone();
        bad.started_at = "yesterday".into();
        assert!(check(&bad).is_err());
        let mut bad = r.clone();
        bad.target.kind = "rm -rf".into();
        assert!(check(&bad).is_err());
        for name in [String::new(), "d".repeat(64), "a\0b".into()] {
            let mut bad = r.clone();
            bad.databases = vec![name];
            assert!(check(&bad).is_err());
        }
        let mut bad = r.clone();
        bad.error = Some("e".repeat(ERROR_MAX + 1));
        assert!(check(&bad).is_err());
        // Control characters, in every string field a catalog shows.
        type Field = fn(&mut RecoveryRecord, String);
        let fields: [Field; 6] = [
            |r, v| r.host = v,
            |r, v| r.os_user = v,
            |r, v| r.target_dir = v,
            |r, v| r.databases = vec![v],
            |r, v| r.target.value = Some(v),
            |r, v| r.error = Some(v),
        ];
        for set in fields {
            for v in ["a\x1b[2Jb", "a\nb", "a\u{9b}b"] {
                let mut bad = r.clone();
                set(&mut bad, v.into());
                assert!(check(&bad).is_err(), "{v:?} passed: {bad:?}");
            }
        }
        // Our own errors keep working: their control characters become spaces.
        let mut failed = r.clone();
        let e = Error::Invalid("the log ends with:\nFATAL:\tx\x1b[0m".into());
        finish(&mut failed, std::time::Instant::now(), Some(&e));
        let msg = failed.error.clone().unwrap();
        assert!(msg.contains("with: FATAL: x [0m"), "{msg}");
        assert_eq!(check(&failed), Ok(()));
        let mut good = r;
        good.backup_id = "20261121-224754F".into();
        good.databases = vec!["d".repeat(63)];
        good.error = Some(truncate(&"é".repeat(ERROR_MAX), ERROR_MAX));
        assert_eq!(check(&good), Ok(()));
    }
}
