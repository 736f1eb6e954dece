//! The contract between walshipper and pg_backup_ext, written down once:
//! the exit codes walshipper ends with and the JSON lines it prints with
//! `--json` that the extension reads. walshipper serializes through these
//! types and the extension parses with them, so a field cannot be renamed
//! on one side only. docs/contract.md describes every field; a test below
//! checks that its tables name exactly the fields these types have.

use serde::{Deserialize, Serialize};

/// Process exit codes. archive-get's codes matter to PostgreSQL: 1 means
/// "no such file" (a normal probe); any status above 125 makes recovery stop
/// with FATAL, which is what we want for damage or a wrong key: carrying on
/// would silently end recovery early and lose data. archive-get therefore
/// uses only 0, 1, 126 and 128 (and 3 on a standby, which never promotes on
/// its own).
pub mod exit {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const UNAVAILABLE: i32 = 3;
    pub const CONFLICT: i32 = 4;
    pub const CHECK_FAILED: i32 = 5;
    pub const VERIFY_FAILED: i32 = 6;
    pub const BUSY: i32 = 7;
    /// backup: refused before it started, because the repository would be
    /// left with less than its configured minimum free space.
    pub const NO_SPACE: i32 = 8;
    pub const DAMAGED: i32 = 126;
    /// archive-get: the file could not be fetched for another reason than
    /// "not there" (store unreachable, configuration or passphrase
    /// unreadable, destination not writable), still after retrying for
    /// `restore.archive_get_retry_timeout`. Above 125 so that recovery
    /// stops instead of ending early; not 126/127, which PostgreSQL's log
    /// calls "command not executable" / "command not found".
    pub const RECOVERY_STOP: i32 = 128;

    /// Every code with the `kind` an error event gives it.
    pub const ALL: &[(i32, &str)] = &[
        (OK, "ok"),
        (NOT_FOUND, "not_found"),
        (USAGE, "usage"),
        (UNAVAILABLE, "unavailable"),
        (CONFLICT, "conflict"),
        (CHECK_FAILED, "check_failed"),
        (VERIFY_FAILED, "verify_failed"),
        (BUSY, "busy"),
        (NO_SPACE, "no_space"),
        (DAMAGED, "damaged"),
        (RECOVERY_STOP, "recovery_stop"),
    ];

    /// The error kind of an exit code (`unknown` for a code not above).
    pub fn kind(code: i32) -> &'static str {
        ALL.iter()
            .find(|(c, _)| *c == code)
            .map_or("unknown", |(_, k)| k)
    }
}

/// One line walshipper prints with `--json`, told apart by its `event`.
/// Lines of another event (or none) are not part of the contract: readers
/// skip what does not parse as an `Event`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// `backup`: the backup has an id and is starting.
    Start(BackupStart),
    /// `backup` and `restore`: every second while data is copied.
    Progress(Progress),
    /// `backup`: the backup is stored (its manifest written).
    Done(BackupDone),
    /// `expire`: one line per repository expired.
    Expire(ExpireReport),
    /// Any command run with `--json` that fails (besides its message on stderr).
    Error(ErrorEvent),
    /// `restore-test`, `table-restore`: a phase begins.
    Phase(PhaseEvent),
    /// `verify`: the result of a read-back (also when it found problems).
    Verify(VerifyReport),
    /// `restore-test`: the result (passed or failed), always its last event
    /// but for an `error` line when it failed.
    RestoreTest(RestoreTestReport),
    /// `table-restore`: the tables were loaded.
    TableRestore(TableRestoreReport),
    /// `key passphrase`, `key rotate`, `key retire`: the result (also when
    /// it failed, then followed by an `error` line).
    Key(KeyReport),
    /// `wal-receive`: the receiver's state, when it starts streaming, after
    /// writes to the repository (at most once a second) and every
    /// `status_interval` seconds; `state` `stopped` when it ends cleanly.
    Stream(StreamStatus),
}

impl Event {
    /// The event as one JSON line (without the newline).
    pub fn to_line(&self) -> String {
        // Plain data (strings, numbers, options): serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses one line of walshipper's output; None for other lines.
    pub fn parse(line: &str) -> Option<Event> {
        serde_json::from_str(line).ok()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupStart {
    pub backup_id: String,
    /// full, diff or incr: what is taken.
    #[serde(rename = "type")]
    pub kind: String,
    /// What was asked for (a diff/incr without a full becomes a full).
    pub requested_type: String,
    pub based_on: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// `backup` or `restore`.
    pub operation: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub files_done: u64,
    pub files_total: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupDone {
    pub backup_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub requested_type: String,
    pub based_on: Option<String>,
    /// The full this backup is built on first, then every backup up to it.
    pub chain: Vec<String>,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub timeline: u32,
    pub start_time: String,
    pub stop_time: String,
    pub wal_start: String,
    pub wal_stop: String,
    pub size: u64,
    pub stored_size: u64,
    pub files: u64,
    pub duration_s: f64,
    pub checksum_failures: u64,
}

/// The retention policy an expire applied.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub keep_full: Option<u32>,
    pub recovery_window: Option<String>,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    pub timezone: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeptBackup {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub stop_time: String,
    pub reasons: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RemovedBackup {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub stop_time: String,
    pub stored_size: u64,
}

/// A backup whose manifest cannot be used: reported, never removed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DamagedBackup {
    /// The manifest's key.
    pub key: String,
    /// The backup id its key names.
    pub id: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExpireReport {
    pub dry_run: bool,
    pub repository: String,
    pub policy: RetentionPolicy,
    pub kept: Vec<KeptBackup>,
    pub removed: Vec<RemovedBackup>,
    pub damaged: Vec<DamagedBackup>,
    pub wal_removed: u64,
    pub wal_removed_first: Option<String>,
    pub wal_removed_last: Option<String>,
    /// Chunk objects of streamed segments removed (`stream/`, see
    /// docs/repository-format.md "Streamed partial segments").
    #[serde(default)]
    pub stream_chunks_removed: u64,
    pub bytes_freed: u64,
    pub restorable_from: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorEvent {
    /// The exit code the command ends with.
    pub code: i32,
    /// `exit::kind(code)`.
    pub kind: String,
    pub message: String,
    /// What to do about it, when there is something short to say.
    pub hint: Option<String>,
    /// The repository it is about, when a command works on several and
    /// goes on with the others (expire).
    pub repository: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseEvent {
    /// `restore_test` or `table_restore`.
    pub operation: String,
    /// `restore`, `start`, `replay`, `checks`, `copy` or `cleanup`.
    pub phase: String,
    /// Seconds since the operation started.
    pub elapsed_s: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub repository: String,
    /// The backups checked.
    pub backups: Vec<String>,
    pub damaged_backups: Vec<DamagedBackup>,
    pub objects_checked: u64,
    pub files_rebuilt: u64,
    pub wal_segments_checked: u64,
    /// What is wrong, one line each (empty when ok).
    pub problems: Vec<String>,
    pub duration_s: f64,
    /// The data keys the objects checked are sealed by, with their counts
    /// (`objects`/`bytes` of those checked); a key the repository no
    /// longer holds has `present` false and is also a problem.
    #[serde(default)]
    pub keys: Vec<KeyStatus>,
    /// The streamed tail of the WAL (`wal-receive`'s chunks of the segment
    /// after the last whole one), read back and checked; None: there is
    /// none.
    #[serde(default)]
    pub stream_tail: Option<StreamTail>,
}

/// The streamed tail of the WAL: the chunk objects of the newest streamed
/// segment that is not stored whole (docs/repository-format.md "Streamed
/// partial segments").
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamTail {
    pub timeline: u32,
    /// The segment's file name.
    pub segment: String,
    /// Where the segment starts and where its readable chunks end (LSN
    /// text): a restore to the latest point recovers up to the end.
    pub start_lsn: String,
    pub end_lsn: String,
    /// Bytes of the segment the chunks hold (0..bytes).
    pub bytes: u64,
    /// Chunk objects listed for it.
    pub chunks: u64,
    /// Whether the segment before it is stored whole (on its timeline or an
    /// ancestor's): the tail continues the archived WAL without a gap.
    pub continues_archive: bool,
}

/// One data key of a repository: `info --json`'s `keys`, `key list --json`,
/// `verify --json`'s `keys`. Never key material.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// 32 lowercase hex digits, as in `keys/<key_id>.json` and object headers.
    pub key_id: String,
    /// When it was created (its key file says); None when the file is
    /// missing or unreadable.
    pub created_at: Option<String>,
    /// New objects are sealed by it (`repository.json`'s `current_key_id`).
    pub current: bool,
    /// Its key file is in the repository. False: objects name a key the
    /// repository no longer holds (they cannot be read).
    pub present: bool,
    /// Objects sealed by it and their stored bytes, when counted
    /// (`info --key-usage`, `key list --usage`, `verify`); None otherwise.
    pub objects: Option<u64>,
    pub bytes: Option<u64>,
    /// What is wrong with its key file, if anything.
    pub error: Option<String>,
}

/// The result of `key passphrase`, `key rotate` or `key retire`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyReport {
    /// `passphrase`, `passphrase_finish`, `rotate` or `retire`.
    pub operation: String,
    pub succeeded: bool,
    /// rotate: the new current key; retire: the key retired; else None.
    pub key_id: Option<String>,
    /// passphrase: `both` (the new passphrase opens every key file and the
    /// old one still does: `--keep-old`, or the new one could not be put
    /// where the configuration reads it) or `done` (only the new one opens
    /// them). Empty for the other operations.
    pub stage: String,
    /// One per configured repository, in configuration order.
    pub repositories: Vec<KeyRepoResult>,
    pub duration_s: f64,
}

/// What a key operation did to one repository.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyRepoResult {
    pub repository: String,
    pub ok: bool,
    pub error: Option<String>,
    /// The key new objects are sealed with after the operation.
    pub current_key_id: Option<String>,
    /// passphrase: key files re-wrapped; rotate: key files added (0 or 1).
    pub key_files: u64,
    /// retire: objects re-encrypted under the current key by this run.
    pub objects_rewritten: u64,
    pub bytes_rewritten: u64,
    /// retire: objects still sealed by the retired key (0 when done).
    pub objects_remaining: u64,
    /// retire: its key file was removed from this repository.
    pub key_file_removed: bool,
}

/// What a restore was asked to recover to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoveryTarget {
    /// `end` (of the archived WAL), `immediate`, `time`, `lsn`, `xid` or `name`.
    pub kind: String,
    /// The time, LSN, xid or restore point name (null for end and immediate).
    pub value: Option<String>,
}

/// One check of a restored cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// `pg_verifybackup`, `pg_amcheck <db>`, `target`, or `custom: <name>`.
    pub name: String,
    pub passed: bool,
    /// What was found (the tool's output, shortened, or the query's result).
    pub detail: String,
    pub duration_s: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreTestReport {
    /// The recovery record's id (the repository's `recoveries/`).
    pub operation_id: String,
    pub repository: String,
    pub backup_id: String,
    pub target: RecoveryTarget,
    pub passed: bool,
    /// Fetching, decrypting and writing the files.
    pub restore_s: f64,
    /// From starting PostgreSQL until recovery reached the target and the
    /// cluster was open.
    pub replay_s: f64,
    pub checks_s: f64,
    /// restore + replay + checks: the measured RTO.
    pub total_s: f64,
    /// The last WAL record replayed.
    pub recovered_lsn: Option<String>,
    /// The commit time of the last transaction replayed.
    pub recovered_time: Option<String>,
    pub checks: Vec<CheckResult>,
    pub error: Option<String>,
    /// Where the scratch server's log was kept (a failed test), else null.
    pub server_log: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoredTable {
    /// `schema.table` as it was in the backup.
    pub source: String,
    /// `schema.table` it was loaded as in the live database.
    pub restored_as: String,
    pub rows: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TableRestoreReport {
    pub operation_id: String,
    pub repository: String,
    pub backup_id: String,
    pub target: RecoveryTarget,
    pub database: String,
    /// The new schema the tables were loaded into.
    pub schema: String,
    pub tables: Vec<RestoredTable>,
    pub restore_s: f64,
    pub replay_s: f64,
    /// Dumping from the scratch cluster and loading into the live database.
    pub copy_s: f64,
    pub total_s: f64,
    pub recovered_lsn: Option<String>,
    pub recovered_time: Option<String>,
}

/// What a restore did, as walshipper keeps it in the repository
/// (`recoveries/`) and `info --json` lists it: restores run from the command
/// line reach `backup.recovery_operations` this way.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoveryRecord {
    /// Sorts by time: `<YYYYmmddTHHMMSSZ>-<8 hex>`.
    pub id: String,
    /// `restore`, `restore_test` or `table_restore`.
    pub operation: String,
    pub host: String,
    /// The operating system user that ran it.
    pub os_user: String,
    pub started_at: String,
    pub finished_at: String,
    pub backup_id: String,
    pub target: RecoveryTarget,
    /// Where the data directory was restored to.
    pub target_dir: String,
    /// The databases restored (`--db-include`); empty: all of them.
    pub databases: Vec<String>,
    pub succeeded: bool,
    pub duration_s: f64,
    pub error: Option<String>,
    pub walshipper_version: String,
}

/// `wal-receive --json`: where streaming stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamStatus {
    /// `streaming` or `stopped`.
    pub state: String,
    pub slot: String,
    /// The timeline being received.
    pub timeline: u32,
    /// WAL received from the server up to here (LSN text).
    pub received_lsn: String,
    /// WAL durable in the repository up to here: what was acknowledged
    /// to the server as flushed, and what a restore recovers.
    pub flushed_lsn: String,
    /// The server's end of WAL as it last said (None: not said yet).
    pub server_lsn: Option<String>,
    /// server_lsn - flushed_lsn in bytes (0 when unknown).
    pub lag_bytes: u64,
    /// Bytes of WAL received since the receiver started.
    pub bytes_received: u64,
    /// Complete segments stored since the receiver started.
    pub segments_stored: u64,
    /// Seconds since the last write to the repository (None: none yet).
    pub seconds_since_flush: Option<f64>,
    pub synchronous: bool,
}

/// One configured repository in `info --json` (its `repositories` array).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RepoStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub location: String,
    pub ok: bool,
    pub error: Option<String>,
    pub segments: u64,
    /// The newest WAL segment of the newest timeline.
    pub last_wal: Option<String>,
    pub backups: u64,
    pub last_backup: Option<String>,
    pub last_backup_stop_time: Option<String>,
    /// Every backup it holds, oldest first (the catalog's
    /// backup.repository_backups mirrors these).
    #[serde(default)]
    pub backup_ids: Vec<String>,
    /// Its recovery records, oldest first: those newer than
    /// `--recoveries-after ID`, else the newest 50.
    #[serde(default)]
    pub recoveries: Vec<RecoveryRecord>,
    /// Bytes of every object it holds (WAL, backups, records), as listed.
    #[serde(default)]
    pub stored_bytes: u64,
    /// What it may hold in all: the file system's size (posix) or the
    /// configured `quota` (s3); None: unknown (s3 without a quota).
    #[serde(default)]
    pub capacity_bytes: Option<u64>,
    /// What is left: the file system's space available to walshipper
    /// (posix) or quota minus stored_bytes (s3, at least 0); None: unknown.
    #[serde(default)]
    pub free_bytes: Option<u64>,
    /// Where capacity and free come from: `filesystem`, `quota` or `none`.
    #[serde(default)]
    pub capacity_source: String,
    /// The configured minimum free space a backup must leave (0: none).
    #[serde(default)]
    pub min_free_bytes: u64,
    /// `aes-256-gcm` or `none`.
    #[serde(default)]
    pub encryption: String,
    /// When the data key new objects are sealed with was created.
    #[serde(default)]
    pub key_created_at: Option<String>,
    /// When its oldest backup ended: the earliest moment it restores to.
    #[serde(default)]
    pub first_backup_stop_time: Option<String>,
    /// Its data keys (empty when unencrypted), current first, then newest
    /// first; `objects`/`bytes` only with `--key-usage`.
    #[serde(default)]
    pub keys: Vec<KeyStatus>,
    /// When the objects were counted per key (`--key-usage`); None: not counted.
    #[serde(default)]
    pub keys_counted_at: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    const DOC: &str = include_str!("../../docs/contract.md");

    fn keys(v: &serde_json::Value) -> BTreeSet<String> {
        v.as_object().expect("an object").keys().cloned().collect()
    }

    /// Every table of docs/contract.md, by its `<!-- contract: NAME -->`
    /// marker: the first column of each row, without backquotes.
    fn doc_tables() -> BTreeMap<String, BTreeSet<String>> {
        let mut tables = BTreeMap::new();
        let mut current: Option<String> = None;
        for line in DOC.lines() {
            if let Some(name) = line
                .trim()
                .strip_prefix("<!-- contract: ")
                .and_then(|r| r.strip_suffix(" -->"))
            {
                assert!(
                    tables.insert(name.to_string(), BTreeSet::new()).is_none(),
                    "two tables marked {name}"
                );
                current = Some(name.to_string());
                continue;
            }
            let Some(name) = &current else { continue };
            let line = line.trim();
            if !line.starts_with('|') {
                if !line.is_empty() && !tables[name].is_empty() {
                    current = None;
                }
                continue;
            }
            let first = line
                .trim_matches('|')
                .split('|')
                .next()
                .unwrap_or("")
                .trim();
            if first.starts_with("---") || first == "field" || first == "code" {
                continue;
            }
            tables
                .get_mut(name)
                .expect("marked")
                .insert(first.trim_matches('`').to_string());
        }
        tables
    }

    fn json<T: Serialize>(x: T) -> serde_json::Value {
        serde_json::to_value(x).unwrap()
    }

    /// A value of every documented type, by the name of its table.
    fn samples() -> BTreeMap<&'static str, serde_json::Value> {
        BTreeMap::from([
            ("start", json(Event::Start(BackupStart::default()))),
            ("progress", json(Event::Progress(Progress::default()))),
            ("done", json(Event::Done(BackupDone::default()))),
            ("expire", json(Event::Expire(ExpireReport::default()))),
            ("error", json(Event::Error(ErrorEvent::default()))),
            ("policy", json(RetentionPolicy::default())),
            ("kept", json(KeptBackup::default())),
            ("removed", json(RemovedBackup::default())),
            ("damaged", json(DamagedBackup::default())),
            ("repositories", json(RepoStatus::default())),
            ("phase", json(Event::Phase(PhaseEvent::default()))),
            ("verify", json(Event::Verify(VerifyReport::default()))),
            (
                "restore_test",
                json(Event::RestoreTest(RestoreTestReport::default())),
            ),
            (
                "table_restore",
                json(Event::TableRestore(TableRestoreReport::default())),
            ),
            ("target", json(RecoveryTarget::default())),
            ("check", json(CheckResult::default())),
            ("restored_table", json(RestoredTable::default())),
            ("recovery", json(RecoveryRecord::default())),
            ("key", json(Event::Key(KeyReport::default()))),
            ("key_repository", json(KeyRepoResult::default())),
            ("key_status", json(KeyStatus::default())),
            ("stream", json(Event::Stream(StreamStatus::default()))),
            ("stream_tail", json(StreamTail::default())),
        ])
    }

    #[test]
    fn doc_names_exactly_the_fields() {
        let tables = doc_tables();
        let samples = samples();
        for (name, sample) in &samples {
            let documented = tables
                .get(*name)
                .unwrap_or_else(|| panic!("docs/contract.md has no table marked {name}"));
            assert_eq!(
                documented,
                &keys(sample),
                "docs/contract.md table {name} vs the struct's fields"
            );
        }
        let exits: BTreeSet<String> = exit::ALL.iter().map(|(c, k)| format!("{c} {k}")).collect();
        let documented: BTreeSet<String> = DOC
            .lines()
            .skip_while(|l| l.trim() != "<!-- contract: exit -->")
            .skip(1)
            .take_while(|l| l.trim().is_empty() || l.trim_start().starts_with('|'))
            .filter_map(|l| {
                let cols: Vec<&str> = l.trim().trim_matches('|').split('|').collect();
                let code = cols.first()?.trim().parse::<i32>().ok()?;
                Some(format!("{code} {}", cols.get(1)?.trim().trim_matches('`')))
            })
            .collect();
        assert_eq!(documented, exits, "docs/contract.md exit code table");
        let unknown: Vec<&String> = tables
            .keys()
            .filter(|t| *t != "exit" && !samples.contains_key(t.as_str()))
            .collect();
        assert!(unknown.is_empty(), "tables for no struct: {unknown:?}");
    }

    #[test]
    fn events_round_trip_and_carry_their_name() {
        let e = Event::Error(ErrorEvent {
            code: exit::BUSY,
            kind: exit::kind(exit::BUSY).into(),
            message: "locked".into(),
            hint: None,
            repository: Some("offsite".into()),
        });
        let line = e.to_line();
        assert!(
            line.starts_with(r#"{"event":"error","code":7,"kind":"busy""#),
            "{line}"
        );
        assert_eq!(Event::parse(&line), Some(e));
        // Lines of other events, and unknown fields, do not trouble a reader.
        assert_eq!(Event::parse(r#"{"event":"finished"}"#), None);
        let p = Event::parse(
            r#"{"event":"progress","operation":"backup","bytes_done":1,"bytes_total":2,"files_done":0,"files_total":1,"new":true}"#,
        );
        assert!(matches!(
            p,
            Some(Event::Progress(Progress { bytes_total: 2, .. }))
        ));
        assert_eq!(exit::kind(126), "damaged");
        assert_eq!(exit::kind(99), "unknown");
    }
}
