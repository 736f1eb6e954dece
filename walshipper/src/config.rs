//! Configuration: a TOML file (`--config`, `WALSHIPPER_CONFIG`, or
//! /etc/walshipper/walshipper.toml) whose every key can be overridden by an
//! environment variable `WALSHIPPER_<SECTION>_<KEY>` (e.g.
//! `WALSHIPPER_REPO_PATH`). Unknown keys and bad values are errors that name
//! the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/walshipper/walshipper.toml";
pub const DEFAULT_PASSPHRASE_FILE: &str = "/etc/walshipper/passphrase";
/// Default spool of async archiving and look-ahead (as pgBackRest's
/// /var/spool/pgbackrest): local, off the data directory's volume if the
/// administrator mounts it so.
pub const DEFAULT_SPOOL_DIR: &str = "/var/spool/walshipper";

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The file this configuration came from, if any (absolute).
    #[serde(skip)]
    pub source: Option<PathBuf>,
    pub pg: PgConfig,
    /// One `[repo]` table, or several `[[repo]]` tables; the first is the
    /// primary. Never empty after loading.
    #[serde(rename = "repo", deserialize_with = "one_or_many")]
    pub repos: Vec<RepoConfig>,
    pub encryption: EncryptionConfig,
    pub compression: CompressionConfig,
    pub archive: ArchiveConfig,
    /// `[backup]`: how backups store files.
    pub backup: BackupConfig,
    pub restore: RestoreConfig,
    pub restore_test: RestoreTestConfig,
    /// `[serve]`: the monitoring service (crate::serve).
    pub serve: crate::serve::ServeConfig,
    /// `[notify]`: where alerts are sent (crate::notify).
    pub notify: crate::notify::NotifyConfig,
    /// `[stream]`: the streaming WAL receiver (`wal-receive`).
    pub stream: StreamConfig,
    /// `[cache]`: what this host keeps to avoid reading the repository again.
    pub cache: CacheConfig,
}

/// `[cache]`: local caches (crate::summary_cache).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Keep each intact manifest's summary, keyed by a hash of its stored
    /// bytes, so commands that list backups do not decode every manifest.
    pub summaries: bool,
    /// Where; empty = $HOME/.cache/walshipper.
    pub dir: PathBuf,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            summaries: true,
            dir: PathBuf::new(),
        }
    }
}

/// `[stream]`: how `wal-receive` streams WAL into the repository.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// The physical replication slot (created if missing).
    pub slot: String,
    /// Seconds between two writes of the growing segment to the repository
    /// (the data lost at most when the server is destroyed, besides what
    /// the receiver had not received yet). Fractions allowed.
    pub flush_interval: f64,
    /// Acknowledge a flush as soon as the WAL is durable in the repository
    /// (for `synchronous_standby_names`): every batch received is written
    /// at once instead of every `flush_interval`.
    pub synchronous: bool,
    /// The name the server sees (`synchronous_standby_names`, pg_stat_replication).
    pub application_name: String,
    /// Seconds between status updates to the server and progress lines.
    pub status_interval: u64,
}

impl StreamConfig {
    fn validate(&self) -> Result<()> {
        let ident = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !ident(&self.slot) {
            return Err(Error::Config(format!(
                "stream.slot: '{}' is not a replication slot name (lower-case letters, digits and _, at most 63)",
                self.slot.escape_debug()
            )));
        }
        if !(0.01..=3600.0).contains(&self.flush_interval) {
            return Err(Error::Config(format!(
                "stream.flush_interval: {} is not between 0.01 and 3600 seconds",
                self.flush_interval
            )));
        }
        if self.application_name.is_empty()
            || self.application_name.len() > 63
            || !self.application_name.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(Error::Config(
                "stream.application_name: 1 to 63 printable characters without spaces".into(),
            ));
        }
        if !(1..=3600).contains(&self.status_interval) {
            return Err(Error::Config(
                "stream.status_interval: between 1 and 3600 seconds".into(),
            ));
        }
        Ok(())
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            slot: "walshipper".into(),
            flush_interval: 1.0,
            synchronous: false,
            application_name: "walshipper".into(),
            status_interval: 10,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PgConfig {
    pub data_dir: PathBuf,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
    /// TLS over TCP, with libpq's modes (`crate::tls`); a socket never uses it.
    pub sslmode: crate::tls::SslMode,
    /// The CA certificates (PEM) for verify-ca and verify-full, or "system".
    pub sslrootcert: PathBuf,
    /// The user's password, in a file private to walshipper's OS user;
    /// empty: PGPASSWORD, if set.
    pub password_file: PathBuf,
    /// `require`: log in only with SCRAM bound to the TLS channel.
    pub channel_binding: crate::tls::ChannelBinding,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepoConfig {
    /// Name used by --repo and in reports; default repo1, repo2, ...
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// posix: the directory.
    pub path: PathBuf,
    /// s3: bucket, key prefix, endpoint URL (empty = AWS), region.
    pub bucket: String,
    pub prefix: String,
    pub endpoint: String,
    pub region: String,
    /// s3: bucket in the path (MinIO, SeaweedFS, Ceph) rather than the host name.
    pub force_path_style: bool,
    /// s3: e.g. STANDARD_IA; empty = the bucket's default.
    pub storage_class: String,
    /// s3: static credentials; empty = the standard AWS chain (AWS_*
    /// variables, AWS_PROFILE and ~/.aws files, instance roles).
    pub access_key_id: String,
    pub secret_access_key: String,
    /// s3: multipart part size in MiB (at least 5).
    pub part_size_mib: u64,
    /// s3: attempts per request (backoff with jitter between them).
    pub retries: u32,
    /// s3: seconds per request attempt, and to connect.
    pub request_timeout: u64,
    pub connect_timeout: u64,
    /// s3: how create-if-absent writes are protected: "header" (the store
    /// honours If-None-Match / If-Match), "head" (a HEAD before every such
    /// write; a race remains) or "auto" (probed once, verdict kept in the
    /// repository). See docs/operations.md.
    pub conditional_writes: String,
    /// Upload bandwidth limit in bytes per second for this process; 0 = none.
    pub upload_limit: u64,
    /// Download bandwidth limit in bytes per second for this process (every
    /// read: archive-get, restore, restore-test, verify); 0 = none.
    pub download_limit: u64,
    /// Retention (`walshipper expire`): keep the newest N full backups (0 = not set).
    pub retention_full: u32,
    /// Keep every moment of this window restorable ("7d", "36h"; empty = not set).
    pub retention_window: String,
    /// Grandfather-father-son: the newest backup of each of the last N days,
    /// weeks, months, years (0 = not set), in `retention_timezone`.
    pub retention_daily: u32,
    pub retention_weekly: u32,
    pub retention_monthly: u32,
    pub retention_yearly: u32,
    pub retention_timezone: String,
    /// What this repository may hold in all ("500GiB", "10TB", bytes; empty
    /// or 0 = no quota): caps the file system's size (posix), and is the
    /// only capacity an s3 repository has (docs/operations.md, "Storage
    /// capacity").
    #[serde(deserialize_with = "size_text")]
    pub quota: String,
    /// The free space a backup must leave: a size, or a percent of the
    /// capacity ("5%", the default); "0" = never refuse.
    #[serde(deserialize_with = "size_text")]
    pub min_free_space: String,
}

/// A size in TOML: a string ("500GiB") or a whole number of bytes.
fn size_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error as _;
    match toml::Value::deserialize(d)? {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(i) if i >= 0 => Ok(i.to_string()),
        _ => Err(D::Error::custom(
            "expected a size like \"500GiB\", \"10GB\" or a whole number of bytes",
        )),
    }
}

/// Default `min_free_space`: WAL archiving keeps writing after a backup and
/// must never be the one to find the volume full, and file systems slow
/// down when nearly full; a share of the capacity scales with the volume.
pub const DEFAULT_MIN_FREE_SPACE: &str = "5%";

/// Parses a size: whole bytes ("1048576"), or a number with a unit, decimal
/// (kB, MB, GB, TB, PB: powers of 1000) or binary (KiB, MiB, GiB, TiB, PiB:
/// powers of 1024), case-insensitive, a space allowed ("1.5 TiB").
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "p" | "pb" => 1_000_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "pib" => 1 << 50,
        _ => {
            return Err(format!(
                "'{t}' is not a size like 500GiB, 10GB or a number of bytes"
            ))
        }
    };
    let bad = || format!("'{t}' is not a size like 500GiB, 10GB or a number of bytes");
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("'{t}' is too large"));
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let v = f * mult as f64;
    // u64::MAX as f64 rounds up to 2^64: anything at or above it overflows.
    if !v.is_finite() || v >= u64::MAX as f64 {
        return Err(format!("'{t}' is too large"));
    }
    Ok(v as u64)
}

/// `min_free_space`, parsed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MinFree {
    Bytes(u64),
    /// Of the capacity; nothing when the capacity is unknown.
    Percent(f64),
}

impl MinFree {
    pub fn parse(text: &str) -> std::result::Result<MinFree, String> {
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("'{t}' is not a percent like 5%"))?;
            if !(0.0..100.0).contains(&v) {
                return Err(format!("'{t}': a percent from 0 to below 100"));
            }
            // "0%" is off, as "0" is: one value for "no minimum".
            return Ok(if v == 0.0 {
                MinFree::Bytes(0)
            } else {
                MinFree::Percent(v)
            });
        }
        parse_size(t).map(MinFree::Bytes)
    }

    /// In bytes, for a repository of `capacity` bytes (None: unknown).
    pub fn bytes(self, capacity: Option<u64>) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => capacity.map_or(0, |c| (c as f64 * p / 100.0) as u64),
        }
    }
}

/// `[repo]` or `[[repo]]`. Decided on the raw value, so that an unknown or
/// bad key is still reported by name.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<RepoConfig>, D::Error> {
    use serde::de::Error as _;
    let one =
        |v: toml::Value| RepoConfig::deserialize(v).map_err(|e| D::Error::custom(e.to_string()));
    match toml::Value::deserialize(d)? {
        toml::Value::Array(items) => items.into_iter().map(one).collect(),
        v => Ok(vec![one(v)?]),
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// "aes-256-gcm" (default): the repository must be encrypted and every
    /// object sealed by its keys; "none": an unencrypted repository. The
    /// configuration decides, never the repository (docs/operations.md).
    pub mode: crate::keys::EncryptionMode,
    pub passphrase_file: PathBuf,
    /// A command (argument vector, run without a shell) whose standard
    /// output is the passphrase; when set, it is used instead of
    /// passphrase_file (setting both is refused). Empty: not used. See
    /// crate::passphrase.
    pub passphrase_command: Vec<String>,
    /// Seconds the command may take before it is killed.
    pub passphrase_command_timeout: u64,
    /// `key retire` deletes a key file no earlier than this many seconds
    /// after the rotation that replaced the key: a writer that opened the
    /// repository before the rotation (an archive-push in a long upload)
    /// may still seal with it until then.
    pub retire_settle: u64,
    /// Cache unwrapped keys on this host (see keys::KeyCache).
    pub key_cache: bool,
    /// Where; empty = $HOME/.cache/walshipper.
    pub key_cache_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    pub level: i32,
    /// Compress at zstd level 1 where probes show that `level` would store
    /// the data at most 2 % smaller (codec::FrameEncoder).
    pub adaptive: bool,
    /// Threads that compress frames of one object; 0 = number of CPUs.
    pub threads: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Seconds `walshipper check` waits for the switched segment.
    pub check_timeout: u64,
    /// With several repositories: "all" (archive-push succeeds only when
    /// every repository has the segment) or "primary" (the first suffices;
    /// the others are reported as lagging and caught up by repo-sync).
    pub push_to: String,
    // Asynchronous archiving (commands::archive_async, docs/operations.md).
    /// `async = true`: archive-push only checks the spool; a background
    /// pusher pushes `.ready` files ahead of the archiver.
    #[serde(rename = "async")]
    pub async_mode: bool,
    /// Where the pusher keeps its success and failure records, its lock
    /// and its log (must exist, writable by the PostgreSQL user).
    pub spool_dir: PathBuf,
    /// Files pushed in parallel by the background pusher.
    pub async_jobs: usize,
    /// Most files pushed ahead of the archiver (success records not yet
    /// consumed by archive-push).
    pub async_queue_max: usize,
    /// Seconds archive-push waits for the pusher's result before it fails
    /// (PostgreSQL retries).
    pub async_wait: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Store files under 128 KiB in bundles (a few objects, not one per file).
    pub bundle: bool,
    /// The plaintext size one bundle aims at (a size: "8MiB").
    pub bundle_size: String,
}

/// Bounds of `bundle_size`: below 1 MiB the requests per backup grow again;
/// above 1 GiB one bundle is a single long request with nothing to retry.
pub const BUNDLE_SIZE_MIN: u64 = 1 << 20;
pub const BUNDLE_SIZE_MAX: u64 = 1 << 30;

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            bundle: true,
            bundle_size: "8MiB".into(),
        }
    }
}

impl BackupConfig {
    /// `bundle_size` in bytes (validated at load).
    pub fn bundle_bytes(&self) -> u64 {
        parse_size(&self.bundle_size)
            .unwrap_or(8 << 20)
            .clamp(BUNDLE_SIZE_MIN, BUNDLE_SIZE_MAX)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestoreConfig {
    /// Seconds archive-get keeps retrying a repository that fails (rather
    /// than answering "not there") before it makes recovery stop (FATAL);
    /// 0 = no retry. docs/disaster-recovery.md, "archive-get during recovery".
    pub archive_get_retry_timeout: u64,
    // archive-get look-ahead (commands::archive_lookahead, docs/operations.md).
    /// Segments fetched and verified ahead of recovery into `spool_dir`; 0 = off.
    pub lookahead: usize,
    /// Where look-ahead keeps verified segments (must exist, writable).
    pub spool_dir: PathBuf,
}

/// `[restore_test]`: the scratch clusters of `restore-test` and
/// `table-restore` (docs/operations.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestoreTestConfig {
    /// Where scratch clusters are restored (one subdirectory each, and
    /// `logs/` for the server logs of failed runs); created mode 0700.
    pub scratch_dir: PathBuf,
    /// PostgreSQL's programs (postgres, pg_verifybackup, pg_amcheck,
    /// pg_dump, pg_restore); empty = /usr/lib/postgresql/<major>/bin if it
    /// exists, else the PATH.
    pub pg_bin_dir: PathBuf,
    /// CPU niceness walshipper and the scratch server run at (0..19).
    pub nice: i32,
    /// I/O priority: "idle", "best-effort" (lowest level) or "none" (unchanged).
    pub io_class: String,
    /// Seconds each custom check may run (its statement_timeout).
    pub check_timeout: u64,
    /// shared_buffers of the scratch server.
    pub shared_buffers: String,
}

impl Default for RestoreTestConfig {
    fn default() -> Self {
        RestoreTestConfig {
            scratch_dir: "/var/tmp/walshipper-scratch".into(),
            pg_bin_dir: PathBuf::new(),
            nice: 10,
            io_class: "best-effort".into(),
            check_timeout: 60,
            shared_buffers: "128MB".into(),
        }
    }
}

impl Default for RestoreConfig {
    fn default() -> Self {
        RestoreConfig {
            archive_get_retry_timeout: 300,
            lookahead: 0,
            spool_dir: DEFAULT_SPOOL_DIR.into(),
        }
    }
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            data_dir: "/var/lib/postgresql/15/main".into(),
            host: "/var/run/postgresql".into(),
            port: 5432,
            user: "postgres".into(),
            database: "postgres".into(),
            sslmode: crate::tls::SslMode::Prefer,
            sslrootcert: PathBuf::new(),
            password_file: PathBuf::new(),
            channel_binding: crate::tls::ChannelBinding::Prefer,
        }
    }
}

impl Default for RepoConfig {
    fn default() -> Self {
        RepoConfig {
            name: String::new(),
            kind: "posix".into(),
            path: "/var/lib/walshipper/repo".into(),
            bucket: String::new(),
            prefix: String::new(),
            endpoint: String::new(),
            region: String::new(),
            force_path_style: false,
            storage_class: String::new(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            part_size_mib: 16,
            retries: 5,
            request_timeout: 60,
            connect_timeout: 10,
            conditional_writes: "auto".into(),
            upload_limit: 0,
            download_limit: 0,
            retention_full: 0,
            retention_window: String::new(),
            retention_daily: 0,
            retention_weekly: 0,
            retention_monthly: 0,
            retention_yearly: 0,
            retention_timezone: "UTC".into(),
            quota: String::new(),
            min_free_space: DEFAULT_MIN_FREE_SPACE.into(),
        }
    }
}

impl RepoConfig {
    /// The configured quota in bytes; None: none (empty or 0). Checked by
    /// `Config::validate`, so a bad value here is none.
    pub fn quota_bytes(&self) -> Option<u64> {
        match self.quota.trim() {
            "" => None,
            q => parse_size(q).ok().filter(|b| *b > 0),
        }
    }

    /// The configured minimum free space (checked by `Config::validate`).
    pub fn min_free(&self) -> MinFree {
        MinFree::parse(&self.min_free_space).unwrap_or(MinFree::Bytes(0))
    }

    /// The retention policy this repository's configuration sets.
    pub fn retention_policy(&self) -> std::result::Result<crate::retention::Policy, String> {
        let timezone = self.retention_timezone.parse().map_err(|_| {
            format!(
                "retention_timezone '{}' is not an IANA time zone name (e.g. UTC, Europe/Berlin)",
                self.retention_timezone
            )
        })?;
        let recovery_window = match self.retention_window.trim() {
            "" => None,
            w => Some(
                crate::retention::parse_duration(w)
                    .map_err(|e| format!("retention_window: {e}"))?,
            ),
        };
        Ok(crate::retention::Policy {
            keep_full: (self.retention_full > 0).then_some(self.retention_full),
            recovery_window,
            keep_daily: self.retention_daily,
            keep_weekly: self.retention_weekly,
            keep_monthly: self.retention_monthly,
            keep_yearly: self.retention_yearly,
            timezone,
        })
    }

    /// Where this repository is, for messages.
    pub fn location(&self) -> String {
        match self.kind.as_str() {
            "s3" => format!("s3://{}/{}", self.bucket, self.prefix.trim_matches('/')),
            _ => self.path.display().to_string(),
        }
    }
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        EncryptionConfig {
            mode: Default::default(),
            passphrase_file: DEFAULT_PASSPHRASE_FILE.into(),
            passphrase_command: Vec::new(),
            passphrase_command_timeout: crate::passphrase::DEFAULT_TIMEOUT_S,
            retire_settle: 900,
            key_cache: true,
            key_cache_dir: PathBuf::new(),
        }
    }
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            level: 3,
            adaptive: true,
            threads: 0,
        }
    }
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            check_timeout: 60,
            push_to: "all".into(),
            async_mode: false,
            spool_dir: DEFAULT_SPOOL_DIR.into(),
            async_jobs: 4,
            async_queue_max: 64,
            async_wait: 60,
        }
    }
}

/// Every key, as (section, key); the environment variable is
/// WALSHIPPER_<SECTION>_<KEY> in upper case.
pub const KEYS: &[(&str, &str)] = &[
    ("pg", "data_dir"),
    ("pg", "host"),
    ("pg", "port"),
    ("pg", "user"),
    ("pg", "database"),
    ("pg", "sslmode"),
    ("pg", "sslrootcert"),
    ("pg", "password_file"),
    ("pg", "channel_binding"),
    ("repo", "name"),
    ("repo", "type"),
    ("repo", "path"),
    ("repo", "bucket"),
    ("repo", "prefix"),
    ("repo", "endpoint"),
    ("repo", "region"),
    ("repo", "force_path_style"),
    ("repo", "storage_class"),
    ("repo", "access_key_id"),
    ("repo", "secret_access_key"),
    ("repo", "part_size_mib"),
    ("repo", "retries"),
    ("repo", "request_timeout"),
    ("repo", "connect_timeout"),
    ("repo", "conditional_writes"),
    ("repo", "upload_limit"),
    ("repo", "download_limit"),
    ("repo", "retention_full"),
    ("repo", "retention_window"),
    ("repo", "retention_daily"),
    ("repo", "retention_weekly"),
    ("repo", "retention_monthly"),
    ("repo", "retention_yearly"),
    ("repo", "retention_timezone"),
    ("repo", "quota"),
    ("repo", "min_free_space"),
    ("encryption", "mode"),
    ("encryption", "passphrase_file"),
    ("encryption", "passphrase_command"),
    ("encryption", "passphrase_command_timeout"),
    ("encryption", "retire_settle"),
    ("encryption", "key_cache"),
    ("encryption", "key_cache_dir"),
    ("cache", "summaries"),
    ("cache", "dir"),
    ("compression", "level"),
    ("compression", "adaptive"),
    ("compression", "threads"),
    ("archive", "check_timeout"),
    ("archive", "push_to"),
    ("archive", "async"),
    ("archive", "spool_dir"),
    ("archive", "async_jobs"),
    ("archive", "async_queue_max"),
    ("archive", "async_wait"),
    ("backup", "bundle"),
    ("backup", "bundle_size"),
    ("restore", "archive_get_retry_timeout"),
    ("stream", "slot"),
    ("stream", "flush_interval"),
    ("stream", "synchronous"),
    ("stream", "application_name"),
    ("stream", "status_interval"),
    ("restore", "lookahead"),
    ("restore", "spool_dir"),
    ("restore_test", "scratch_dir"),
    ("restore_test", "pg_bin_dir"),
    ("restore_test", "nice"),
    ("restore_test", "io_class"),
    ("restore_test", "check_timeout"),
    ("restore_test", "shared_buffers"),
    ("serve", "listen"),
    ("serve", "token_file"),
    ("serve", "basic_auth_user"),
    ("serve", "basic_auth_password_file"),
    ("serve", "host"),
    ("serve", "port"),
    ("serve", "user"),
    ("serve", "database"),
    ("serve", "password_file"),
    ("serve", "statement_timeout"),
    ("serve", "info_interval"),
    ("serve", "workers"),
];

/// Environment variables with a meaning of their own (not config keys).
const SPECIAL_ENV: &[&str] = &[
    "WALSHIPPER_CONFIG",
    "WALSHIPPER_PASSPHRASE",
    "WALSHIPPER_LOG",
    // Crash points for the tests (failpoint.rs): not a setting.
    "WALSHIPPER_CRASH_AT",
];

/// `WALSHIPPER_REPO<N>_<KEY>` (N >= 2) → (N, key).
fn repo_env(name: &str) -> Option<(usize, String)> {
    let rest = name.strip_prefix("WALSHIPPER_REPO")?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: usize = digits.parse().ok()?;
    let key = rest[digits.len()..].strip_prefix('_')?.to_lowercase();
    (n >= 2).then_some((n, key))
}

pub fn env_name(section: &str, key: &str) -> String {
    format!("WALSHIPPER_{}_{}", section, key).to_uppercase()
}

fn parse<T: std::str::FromStr>(name: &str, v: &str, what: &str) -> Result<T> {
    v.trim()
        .parse()
        .map_err(|_| Error::Config(format!("{name}: '{v}' is not {what}")))
}

/// Refuses a file holding a secret that group or others may read.
pub(crate) fn check_private(path: &Path, mode: u32, what: &str) -> Result<()> {
    if mode & 0o077 == 0 {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{} {what} and is open to group or others (mode {:04o}); make it private: chmod 600 {} \
         (owned by the user walshipper runs as), or pass the secret in an environment variable",
        path.display(),
        mode & 0o7777,
        path.display()
    )))
}

/// A TOML error without the file's text: toml's own message quotes the
/// offending line, and serde's quotes the bad value ("invalid type: string
/// \"...\""), either of which may be a secret. Kept: the line and column,
/// the key on that line, and the message with every quoted value replaced.
fn redacted(e: &toml::de::Error, text: &str) -> String {
    let mut out = String::new();
    let mut key = None;
    if let Some(span) = e.span() {
        let at = span.start.min(text.len());
        let before = text.get(..at).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        out.push_str(&format!("line {line}, column {col}: "));
        // The key of that line, if it has the shape of a key (never a value).
        let line_text = text.lines().nth(line - 1).unwrap_or("");
        if let Some((k, _)) = line_text.split_once('=') {
            let k = k.trim();
            if !k.is_empty()
                && k.len() <= 64
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
            {
                key = Some(k.to_string());
            }
        }
    }
    if let Some(k) = key {
        out.push_str(&format!("key {k}: "));
    }
    out.push_str(&redact_message(e.message()));
    out
}

/// Replaces every "double-quoted" part of a message (serde's way of showing
/// a string value) and every `backticked` part that is not a plain key name.
fn redact_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(['"', '`']) {
        let q = rest[i..].chars().next().unwrap_or('"');
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(j) = after.find(q) else {
            // An unterminated quote: drop the rest, it may be a value.
            out.push_str("(value hidden)");
            return out;
        };
        let inner = &after[..j];
        let plain_key = q == '`'
            && !inner.is_empty()
            && inner.len() <= 64
            && inner
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        // toml's "expected `\"`": a quote or bracket is no secret.
        let punctuation = q == '`'
            && !inner.is_empty()
            && inner.len() <= 3
            && inner.bytes().all(|b| b.is_ascii_punctuation());
        if plain_key || punctuation {
            out.push_str(&format!("`{inner}`"));
        } else {
            out.push_str("(value hidden)");
        }
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    // One line: a multi-line message could still carry a snippet.
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

impl Config {
    /// Loads the file (if `path` is None, the default path, which may be
    /// absent), then applies environment overrides, then validates.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let file = match path {
            Some(p) => Some(p.to_path_buf()),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Some(PathBuf::from(DEFAULT_CONFIG_PATH))
            }
            None => None,
        };
        let mut cfg: Config = match &file {
            Some(p) => Self::from_file(p)?,
            None => Config::default(),
        };
        cfg.source = file.map(|p| std::path::absolute(&p).unwrap_or(p));
        if cfg.repos.is_empty() {
            cfg.repos.push(RepoConfig::default());
        }
        for (name, value) in env {
            if !name.starts_with("WALSHIPPER_") || SPECIAL_ENV.contains(&name.as_str()) {
                continue;
            }
            if let Some((n, key)) = repo_env(&name) {
                if n > cfg.repos.len() + 1 {
                    return Err(Error::Config(format!(
                        "{name}: there are {} repositories; number the next one {}",
                        cfg.repos.len(),
                        cfg.repos.len() + 1
                    )));
                }
                if n == cfg.repos.len() + 1 {
                    cfg.repos.push(RepoConfig::default());
                }
                cfg.set_repo(n - 1, &key, &value, &name)?;
                continue;
            }
            match KEYS.iter().find(|(s, k)| env_name(s, k) == name) {
                Some((s, k)) => cfg.set(s, k, &value, &name)?,
                None => {
                    return Err(Error::Config(format!(
                        "unknown environment variable {name} (known: {})",
                        KEYS.iter()
                            .map(|(s, k)| env_name(s, k))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a configuration file. Errors never quote the file's content
    /// (it may hold a secret, and archive-push errors go to the server log):
    /// they name the line, column and key. A file holding a secret must be
    /// private to its owner.
    pub fn from_file(path: &Path) -> Result<Config> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let cannot =
            |e: std::io::Error| Error::Config(format!("cannot read {}: {e}", path.display()));
        let mut file = std::fs::File::open(path).map_err(cannot)?;
        // The mode of the file we read, not of whatever the path names later.
        let mode = file.metadata().map_err(cannot)?.permissions().mode();
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(cannot)?;
        let cfg: Config = toml::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), redacted(&e, &text))))?;
        if let Some(key) = cfg.inline_secret() {
            check_private(path, mode, &format!("holds {key}"))?;
        }
        Ok(cfg)
    }

    /// The name of a secret set in the file itself, if any.
    fn inline_secret(&self) -> Option<&'static str> {
        self.repos
            .iter()
            .any(|r| !r.secret_access_key.is_empty())
            .then_some("repo.secret_access_key")
    }

    fn set(&mut self, section: &str, key: &str, v: &str, name: &str) -> Result<()> {
        if section == "repo" {
            return self.set_repo(0, key, v, name);
        }
        match (section, key) {
            ("pg", "data_dir") => self.pg.data_dir = v.into(),
            ("pg", "host") => self.pg.host = v.into(),
            ("pg", "port") => self.pg.port = parse(name, v, "a port number")?,
            ("pg", "user") => self.pg.user = v.into(),
            ("pg", "database") => self.pg.database = v.into(),
            ("pg", "sslmode") => {
                self.pg.sslmode = parse(
                    name,
                    v,
                    "one of disable, prefer, require, verify-ca, verify-full",
                )?
            }
            ("pg", "sslrootcert") => self.pg.sslrootcert = v.into(),
            ("pg", "password_file") => self.pg.password_file = v.into(),
            ("pg", "channel_binding") => {
                self.pg.channel_binding = parse(name, v, "one of disable, prefer, require")?
            }
            ("encryption", "mode") => {
                self.encryption.mode = parse(name, v, "\"aes-256-gcm\" or \"none\"")?
            }
            ("encryption", "passphrase_file") => self.encryption.passphrase_file = v.into(),
            ("encryption", "passphrase_command") => {
                self.encryption.passphrase_command = crate::passphrase::parse_env_command(name, v)?
            }
            ("encryption", "retire_settle") => {
                self.encryption.retire_settle = parse(name, v, "a number of seconds")?
            }
            ("encryption", "passphrase_command_timeout") => {
                self.encryption.passphrase_command_timeout = parse(name, v, "a number of seconds")?
            }
            ("encryption", "key_cache") => {
                self.encryption.key_cache = parse(name, v, "true or false")?
            }
            ("encryption", "key_cache_dir") => self.encryption.key_cache_dir = v.into(),
            ("cache", "summaries") => self.cache.summaries = parse(name, v, "true or false")?,
            ("cache", "dir") => self.cache.dir = v.into(),
            ("compression", "level") => self.compression.level = parse(name, v, "an integer")?,
            ("compression", "adaptive") => {
                self.compression.adaptive = parse(name, v, "true or false")?
            }
            ("compression", "threads") => {
                self.compression.threads = parse(name, v, "a whole number")?
            }
            ("archive", "check_timeout") => {
                self.archive.check_timeout = parse(name, v, "a number of seconds")?
            }
            ("archive", "push_to") => self.archive.push_to = v.into(),
            ("archive", "async") => self.archive.async_mode = parse(name, v, "true or false")?,
            ("archive", "spool_dir") => self.archive.spool_dir = v.into(),
            ("archive", "async_jobs") => {
                self.archive.async_jobs = parse(name, v, "a number of parallel pushes")?
            }
            ("archive", "async_queue_max") => {
                self.archive.async_queue_max = parse(name, v, "a number of files")?
            }
            ("archive", "async_wait") => {
                self.archive.async_wait = parse(name, v, "a number of seconds")?
            }
            ("restore", "lookahead") => {
                self.restore.lookahead = parse(name, v, "a number of segments")?
            }
            ("restore", "spool_dir") => self.restore.spool_dir = v.into(),
            ("backup", "bundle") => self.backup.bundle = parse(name, v, "true or false")?,
            ("backup", "bundle_size") => self.backup.bundle_size = v.into(),
            ("stream", "slot") => self.stream.slot = v.into(),
            ("stream", "flush_interval") => {
                self.stream.flush_interval = parse(name, v, "a number of seconds")?
            }
            ("stream", "synchronous") => self.stream.synchronous = parse(name, v, "true or false")?,
            ("stream", "application_name") => self.stream.application_name = v.into(),
            ("stream", "status_interval") => {
                self.stream.status_interval = parse(name, v, "a number of seconds")?
            }
            ("restore", "archive_get_retry_timeout") => {
                self.restore.archive_get_retry_timeout = parse(name, v, "a number of seconds")?
            }
            ("restore_test", "scratch_dir") => self.restore_test.scratch_dir = v.into(),
            ("restore_test", "pg_bin_dir") => self.restore_test.pg_bin_dir = v.into(),
            ("restore_test", "nice") => {
                self.restore_test.nice = parse(name, v, "a niceness from 0 to 19")?
            }
            ("restore_test", "io_class") => self.restore_test.io_class = v.into(),
            ("restore_test", "check_timeout") => {
                self.restore_test.check_timeout = parse(name, v, "a number of seconds")?
            }
            ("restore_test", "shared_buffers") => self.restore_test.shared_buffers = v.into(),
            ("serve", "listen") => self.serve.listen = v.into(),
            ("serve", "token_file") => self.serve.token_file = v.into(),
            ("serve", "basic_auth_user") => self.serve.basic_auth_user = v.into(),
            ("serve", "basic_auth_password_file") => self.serve.basic_auth_password_file = v.into(),
            ("serve", "host") => self.serve.host = v.into(),
            ("serve", "port") => self.serve.port = parse(name, v, "a port number")?,
            ("serve", "user") => self.serve.user = v.into(),
            ("serve", "database") => self.serve.database = v.into(),
            ("serve", "password_file") => self.serve.password_file = v.into(),
            ("serve", "statement_timeout") => {
                self.serve.statement_timeout = parse(name, v, "a number of seconds")?
            }
            ("serve", "info_interval") => {
                self.serve.info_interval = parse(name, v, "a number of seconds")?
            }
            ("serve", "workers") => self.serve.workers = parse(name, v, "a number of threads")?,
            _ => return Err(Error::Config(format!("unknown key {section}.{key}"))),
        }
        Ok(())
    }

    fn set_repo(&mut self, i: usize, key: &str, v: &str, name: &str) -> Result<()> {
        if self.repos.is_empty() {
            self.repos.push(RepoConfig::default());
        }
        let r = &mut self.repos[i];
        match key {
            "name" => r.name = v.into(),
            "type" => r.kind = v.into(),
            "path" => r.path = v.into(),
            "bucket" => r.bucket = v.into(),
            "prefix" => r.prefix = v.into(),
            "endpoint" => r.endpoint = v.into(),
            "region" => r.region = v.into(),
            "force_path_style" => r.force_path_style = parse(name, v, "true or false")?,
            "storage_class" => r.storage_class = v.into(),
            "access_key_id" => r.access_key_id = v.into(),
            "secret_access_key" => r.secret_access_key = v.into(),
            "part_size_mib" => r.part_size_mib = parse(name, v, "a whole number of MiB")?,
            "retries" => r.retries = parse(name, v, "a whole number")?,
            "request_timeout" => r.request_timeout = parse(name, v, "a number of seconds")?,
            "connect_timeout" => r.connect_timeout = parse(name, v, "a number of seconds")?,
            "conditional_writes" => r.conditional_writes = v.into(),
            "upload_limit" => r.upload_limit = parse(name, v, "bytes per second")?,
            "download_limit" => r.download_limit = parse(name, v, "bytes per second")?,
            "retention_full" => r.retention_full = parse(name, v, "a whole number")?,
            "retention_window" => r.retention_window = v.into(),
            "retention_daily" => r.retention_daily = parse(name, v, "a whole number")?,
            "retention_weekly" => r.retention_weekly = parse(name, v, "a whole number")?,
            "retention_monthly" => r.retention_monthly = parse(name, v, "a whole number")?,
            "retention_yearly" => r.retention_yearly = parse(name, v, "a whole number")?,
            "retention_timezone" => r.retention_timezone = v.into(),
            "quota" => r.quota = v.into(),
            "min_free_space" => r.min_free_space = v.into(),
            _ => return Err(Error::Config(format!("unknown key repo.{key} ({name})"))),
        }
        Ok(())
    }

    /// The primary repository (the first).
    pub fn primary(&self) -> &RepoConfig {
        &self.repos[0]
    }

    /// The repository named `name` (None = the primary).
    pub fn find_repo(&self, name: Option<&str>) -> Result<&RepoConfig> {
        match name {
            None => Ok(self.primary()),
            Some(n) => self.repos.iter().find(|r| r.name == n).ok_or_else(|| {
                Error::Config(format!(
                    "no repository named '{n}' (configured: {})",
                    self.repos
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }),
        }
    }

    /// The settings of async archiving and look-ahead. Whether the spool
    /// exists and is writable is checked where it is used (spool.rs), so
    /// that other commands run without it.
    fn validate_spools(&self) -> Result<()> {
        let a = &self.archive;
        if !(1..=64).contains(&a.async_jobs) {
            return Err(Error::Config(format!(
                "archive.async_jobs: {} is not from 1 to 64",
                a.async_jobs
            )));
        }
        if !(1..=4096).contains(&a.async_queue_max) {
            return Err(Error::Config(format!(
                "archive.async_queue_max: {} is not from 1 to 4096",
                a.async_queue_max
            )));
        }
        if !(1..=3600).contains(&a.async_wait) {
            return Err(Error::Config(format!(
                "archive.async_wait: {} is not from 1 to 3600 seconds",
                a.async_wait
            )));
        }
        if self.restore.lookahead > 256 {
            return Err(Error::Config(format!(
                "restore.lookahead: {} is more than 256 segments",
                self.restore.lookahead
            )));
        }
        for (key, dir) in [
            ("archive.spool_dir", &a.spool_dir),
            ("restore.spool_dir", &self.restore.spool_dir),
        ] {
            if !dir.is_absolute() {
                return Err(Error::Config(format!(
                    "{key}: '{}' is not an absolute path",
                    dir.display()
                )));
            }
        }
        Ok(())
    }

    /// Fills in defaults that depend on position, then checks every value.
    pub fn validate(&mut self) -> Result<()> {
        if self.repos.is_empty() {
            self.repos.push(RepoConfig::default());
        }
        match parse_size(&self.backup.bundle_size) {
            Ok(n) if (BUNDLE_SIZE_MIN..=BUNDLE_SIZE_MAX).contains(&n) => {}
            Ok(n) => {
                return Err(Error::Config(format!(
                    "backup.bundle_size: {n} bytes is not between 1MiB and 1GiB"
                )))
            }
            Err(e) => return Err(Error::Config(format!("backup.bundle_size: {e}"))),
        }
        self.stream.validate()?;
        for (i, r) in self.repos.iter_mut().enumerate() {
            if r.name.is_empty() {
                r.name = format!("repo{}", i + 1);
            }
        }
        for (i, r) in self.repos.iter().enumerate() {
            let single = self.repos.len() == 1;
            let at_key = |k: &str| {
                if single {
                    format!("repo.{k}")
                } else {
                    format!("repo '{}' {k}", r.name)
                }
            };
            let at = at_key("").trim_end_matches(['.', ' ']).to_string();
            if !r
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(Error::Config(format!(
                    "{at}: name may hold only letters, digits, '-' and '_'"
                )));
            }
            if self.repos[..i].iter().any(|o| o.name == r.name) {
                return Err(Error::Config(format!(
                    "{at}: two repositories have this name"
                )));
            }
            r.retention_policy()
                .map_err(|e| Error::Config(format!("{at}: {e}")))?;
            if !r.quota.trim().is_empty() {
                parse_size(&r.quota)
                    .map_err(|e| Error::Config(format!("{}: {e}", at_key("quota"))))?;
            }
            MinFree::parse(&r.min_free_space)
                .map_err(|e| Error::Config(format!("{}: {e}", at_key("min_free_space"))))?;
            match r.kind.as_str() {
                "posix" => {
                    if !r.path.is_absolute() {
                        return Err(Error::Config(format!(
                            "{}: '{}' must be an absolute path",
                            at_key("path"),
                            r.path.display()
                        )));
                    }
                }
                "s3" => {
                    if r.bucket.is_empty() {
                        return Err(Error::Config(format!("{at}: type = \"s3\" needs bucket")));
                    }
                    if r.access_key_id.is_empty() != r.secret_access_key.is_empty() {
                        return Err(Error::Config(format!(
                            "{at}: set both access_key_id and secret_access_key, or neither (to use the AWS credential chain)"
                        )));
                    }
                    if !matches!(r.conditional_writes.as_str(), "auto" | "header" | "head") {
                        return Err(Error::Config(format!(
                            "{}: '{}' is not one of auto, header, head",
                            at_key("conditional_writes"),
                            r.conditional_writes
                        )));
                    }
                    if r.part_size_mib < 5 || r.part_size_mib > 5120 {
                        return Err(Error::Config(format!(
                            "{}: {} is out of range (5 to 5120)",
                            at_key("part_size_mib"),
                            r.part_size_mib
                        )));
                    }
                }
                other => {
                    return Err(Error::Config(format!(
                        "{}: unsupported value '{other}' (supported: posix, s3)",
                        at_key("type")
                    )))
                }
            }
        }
        self.validate_spools()?;
        let rt = &self.restore_test;
        if !(0..=19).contains(&rt.nice) {
            return Err(Error::Config(format!(
                "restore_test.nice: {} is not a niceness from 0 to 19",
                rt.nice
            )));
        }
        if !matches!(rt.io_class.as_str(), "idle" | "best-effort" | "none") {
            return Err(Error::Config(format!(
                "restore_test.io_class: '{}' is not one of idle, best-effort, none",
                rt.io_class
            )));
        }
        if !rt.scratch_dir.is_absolute() {
            return Err(Error::Config(format!(
                "restore_test.scratch_dir: '{}' is not an absolute path",
                rt.scratch_dir.display()
            )));
        }
        if rt.check_timeout == 0 {
            return Err(Error::Config(
                "restore_test.check_timeout: must be at least 1 second".into(),
            ));
        }
        if rt.shared_buffers.is_empty()
            || !rt.shared_buffers.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(Error::Config(format!(
                "restore_test.shared_buffers: '{}' is not a size like 128MB",
                rt.shared_buffers
            )));
        }
        if !matches!(self.archive.push_to.as_str(), "all" | "primary") {
            return Err(Error::Config(format!(
                "archive.push_to: '{}' is not one of all, primary",
                self.archive.push_to
            )));
        }
        if !(1..=19).contains(&self.compression.level) {
            return Err(Error::Config(format!(
                "compression.level: {} is out of range (1 to 19; 3 is a good default)",
                self.compression.level
            )));
        }
        if self.compression.threads > 256 {
            return Err(Error::Config(format!(
                "compression.threads: {} is too many (0 = one per CPU)",
                self.compression.threads
            )));
        }
        if self.pg.port == 0 {
            return Err(Error::Config("pg.port: 0 is not a port".into()));
        }
        crate::passphrase::validate(self)?;
        Ok(())
    }

    pub fn threads(&self) -> usize {
        match self.compression.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// The passphrase, from its source (crate::passphrase): the
    /// environment's WALSHIPPER_PASSPHRASE, else passphrase_command, else
    /// passphrase_file. Runs the command (at most once a minute per
    /// process): repositories read it only when the key cache misses.
    pub fn passphrase(&self) -> Result<zeroize::Zeroizing<Vec<u8>>> {
        self.passphrase_source().read()
    }

    /// Where the passphrase comes from (without reading it).
    pub fn passphrase_source(&self) -> crate::passphrase::Source {
        crate::passphrase::Source::of(self)
    }

    /// Where manifest summaries are cached; None when off (or no $HOME).
    pub fn summary_cache_dir(&self) -> Option<PathBuf> {
        if !self.cache.summaries {
            return None;
        }
        if !self.cache.dir.as_os_str().is_empty() {
            return Some(self.cache.dir.join("summaries"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/walshipper/summaries"))
    }

    pub fn key_cache_dir(&self) -> Option<PathBuf> {
        if !self.encryption.key_cache {
            return None;
        }
        if !self.encryption.key_cache_dir.as_os_str().is_empty() {
            return Some(self.encryption.key_cache_dir.clone());
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/walshipper"))
    }
}

/// Reads a secret (a token, password or HMAC key) from a file: it must be
/// private to its owner (mode 0600), at most 64 KiB (a bigger file is a
/// mistake, not a secret) and not empty once whitespace at both ends is
/// dropped. `what` names the setting in errors; the secret never appears.
pub fn read_secret_file(path: &Path, what: &str) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let cannot = |e: std::io::Error| Error::Config(format!("{what} {}: {e}", path.display()));
    let f = std::fs::File::open(path).map_err(cannot)?;
    let mode = f.metadata().map_err(cannot)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(Error::Config(format!(
            "{what} {} is open to group or others (mode {:04o}); chmod 600 it (owned by the user walshipper runs as)",
            path.display(),
            mode & 0o7777
        )));
    }
    // Room for all of it at once: a growing Vec would free copies of the
    // secret without wiping them.
    let mut v = zeroize::Zeroizing::new(Vec::with_capacity(65537));
    f.take(65537).read_to_end(&mut v).map_err(cannot)?;
    if v.len() > 65536 {
        return Err(Error::Config(format!(
            "{what} {} is over 64 KiB: not a secret",
            path.display()
        )));
    }
    let end = v.len()
        - v.iter()
            .rev()
            .take_while(|c| c.is_ascii_whitespace())
            .count();
    let start = v[..end]
        .iter()
        .take_while(|c| c.is_ascii_whitespace())
        .count();
    if start == end {
        return Err(Error::Config(format!("{what} {} is empty", path.display())));
    }
    Ok(zeroize::Zeroizing::new(v[start..end].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.toml");
        std::fs::write(&p, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        Config::load_with_env(
            Some(&p),
            env.iter().map(|(a, b)| (a.to_string(), b.to_string())),
        )
    }

    #[test]
    fn file_and_env_override() {
        let c = load(
            "[repo]\npath = \"/r\"\n[compression]\nlevel = 5\n",
            &[
                ("WALSHIPPER_PG_PORT", "5433"),
                ("WALSHIPPER_REPO_PATH", "/x"),
            ],
        )
        .unwrap();
        assert_eq!(c.compression.level, 5);
        assert_eq!(c.pg.port, 5433);
        assert_eq!(c.primary().path, PathBuf::from("/x"));
        assert_eq!(c.primary().name, "repo1");
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let e = load("[repo]\npaht = \"/r\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("paht"), "{e}");
        let e = load("[compression]\nlevel = 40\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("compression.level"), "{e}");
        let e = load("", &[("WALSHIPPER_PG_PORT", "abc")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WALSHIPPER_PG_PORT"), "{e}");
        let e = load("", &[("WALSHIPPER_REPO_PAHT", "/x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WALSHIPPER_REPO_PAHT"), "{e}");
        let e = load("[repo]\ntype = \"s4\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("repo.type"), "{e}");
        let e = load("[pg]\nport = \"x\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("port"), "{e}");
        let e = load("[repo]\ntype = \"s3\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bucket"), "{e}");
    }

    #[test]
    fn bundle_settings_are_bounded() {
        let c = load("[repo]\npath = \"/r\"\n", &[]).unwrap();
        assert!(c.backup.bundle);
        assert_eq!(c.backup.bundle_bytes(), 8 << 20);
        let c = load(
            "[repo]\npath = \"/r\"\n[backup]\nbundle = false\nbundle_size = \"64MiB\"\n",
            &[],
        )
        .unwrap();
        assert!(!c.backup.bundle);
        assert_eq!(c.backup.bundle_bytes(), 64 << 20);
        for bad in ["512KiB", "2GiB", "lots", "0"] {
            let e = load(
                &format!("[repo]\npath = \"/r\"\n[backup]\nbundle_size = \"{bad}\"\n"),
                &[],
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("backup.bundle_size"), "{bad}: {e}");
        }
        let e = load("", &[("WALSHIPPER_BACKUP_BUNDLE", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WALSHIPPER_BACKUP_BUNDLE"), "{e}");
        let c = load("", &[("WALSHIPPER_BACKUP_BUNDLE_SIZE", "1MiB")]).unwrap();
        assert_eq!(c.backup.bundle_bytes(), 1 << 20);
    }

    #[test]
    fn several_repositories() {
        let c = load(
            "[[repo]]\npath = \"/a\"\n[[repo]]\nname = \"offsite\"\ntype = \"s3\"\nbucket = \"b\"\n",
            &[("WALSHIPPER_REPO2_PREFIX", "p"), ("WALSHIPPER_REPO3_PATH", "/c")],
        )
        .unwrap();
        assert_eq!(c.repos.len(), 3);
        assert_eq!(c.repos[0].name, "repo1");
        assert_eq!(c.repos[1].name, "offsite");
        assert_eq!(c.repos[1].prefix, "p");
        assert_eq!(c.repos[2].name, "repo3");
        assert!(c.find_repo(Some("nope")).is_err());
        let e = load("", &[("WALSHIPPER_REPO5_PATH", "/c")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WALSHIPPER_REPO5_PATH"), "{e}");
        let e = load(
            "[[repo]]\nname = \"x\"\npath = \"/a\"\n[[repo]]\nname = \"x\"\npath = \"/b\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("two repositories"), "{e}");
    }

    #[test]
    fn errors_never_quote_the_file() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        for text in [
            // A syntax error on the secret's line (unterminated string).
            format!(
                "[repo]\ntype = \"s3\"\nbucket = \"b\"\nsecret_access_key = \"{secret}\nport = 1\n"
            ),
            // A type error whose value is the secret.
            format!("[pg]\nport = \"{secret}\"\n"),
            // A secret in the wrong key, in an array of tables.
            format!("[[repo]]\naccess_key_id = 5\nsecret_access_key = \"{secret}\"\n"),
            format!("[repo]\nsecret_access_key = {secret}\n"),
        ] {
            let e = load(&text, &[]).unwrap_err().to_string();
            assert!(!e.contains(secret), "secret printed: {e}");
            assert!(!e.contains("wJalr"), "part of the secret printed: {e}");
            assert!(e.contains("line") || e.contains("repo"), "{e}");
        }
        let e = load(&format!("[pg]\nport = \"{secret}\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("key port"), "{e}");
    }

    #[test]
    fn a_file_holding_a_secret_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.toml");
        std::fs::write(
            &p,
            "[repo]\ntype = \"s3\"\nbucket = \"b\"\naccess_key_id = \"k\"\nsecret_access_key = \"s3cr3t\"\n",
        )
        .unwrap();
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Config::load_with_env(Some(&p), []).unwrap_err().to_string();
            assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
            assert!(!e.contains("s3cr3t"), "{e}");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        Config::load_with_env(Some(&p), []).unwrap();
        // Without a secret in it, a shared file is fine.
        std::fs::write(&p, "[repo]\npath = \"/r\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        Config::load_with_env(Some(&p), []).unwrap();
    }

    #[test]
    fn passphrase_command_from_toml_and_env() {
        use crate::passphrase::Source;
        let toml = "[encryption]\npassphrase_command = [\"/usr/bin/vault\", \"kv\", \"get\", \"-field=passphrase\", \"secret/walshipper\"]\npassphrase_command_timeout = 5\n";
        let c = load(toml, &[]).unwrap();
        assert_eq!(
            c.encryption.passphrase_command,
            [
                "/usr/bin/vault",
                "kv",
                "get",
                "-field=passphrase",
                "secret/walshipper"
            ]
        );
        assert_eq!(c.encryption.passphrase_command_timeout, 5);
        // The environment overrides the file's command, as any key.
        let c = load(
            toml,
            &[
                (
                    "WALSHIPPER_ENCRYPTION_PASSPHRASE_COMMAND",
                    r#"["/usr/bin/sops", "-d", "--extract", "[\"passphrase\"]", "/etc/w.enc.yaml"]"#,
                ),
                ("WALSHIPPER_ENCRYPTION_PASSPHRASE_COMMAND_TIMEOUT", "60"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.encryption.passphrase_command,
            [
                "/usr/bin/sops",
                "-d",
                "--extract",
                "[\"passphrase\"]",
                "/etc/w.enc.yaml"
            ]
        );
        assert_eq!(c.encryption.passphrase_command_timeout, 60);
        // An empty variable unsets it: the file is the source again.
        let c = load(toml, &[("WALSHIPPER_ENCRYPTION_PASSPHRASE_COMMAND", "")]).unwrap();
        assert!(matches!(
            c.passphrase_source(),
            Source::File(_) | Source::Env
        ));
        // Refused: a relative program, both command and file, a bad timeout.
        let e = load(
            "[encryption]\npassphrase_command = [\"vault\", \"kv\"]\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("must be an absolute path"), "{e}");
        let e = load(
            "[encryption]\npassphrase_command = [\"/bin/cat\"]\npassphrase_file = \"/etc/p\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("both passphrase_command and passphrase_file"),
            "{e}"
        );
        let e = load(toml, &[("WALSHIPPER_ENCRYPTION_PASSPHRASE_FILE", "/x")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("both passphrase_command and passphrase_file"),
            "{e}"
        );
        for t in ["0", "3601"] {
            let e = load(
                toml,
                &[("WALSHIPPER_ENCRYPTION_PASSPHRASE_COMMAND_TIMEOUT", t)],
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("passphrase_command_timeout"), "{e}");
        }
        let e = load(
            "[encryption]\npassphrase_command = \"/usr/bin/vault kv get\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("passphrase_command"), "{e}");
    }

    #[test]
    fn a_shared_passphrase_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "correct horse\n").unwrap();
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut c = Config::default();
        c.encryption.passphrase_file = pass.clone();
        // WALSHIPPER_PASSPHRASE would win over the file: only test without it.
        if std::env::var_os("WALSHIPPER_PASSPHRASE").is_none() {
            let e = c.passphrase().unwrap_err().to_string();
            assert!(e.contains(&format!("chmod 600 {}", pass.display())), "{e}");
            std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert_eq!(&c.passphrase().unwrap()[..], b"correct horse");
        }
    }

    #[test]
    fn conditional_writes_values() {
        let s3 = "[repo]\ntype = \"s3\"\nbucket = \"b\"\n";
        assert_eq!(load(s3, &[]).unwrap().primary().conditional_writes, "auto");
        let c = load(s3, &[("WALSHIPPER_REPO_CONDITIONAL_WRITES", "head")]).unwrap();
        assert_eq!(c.primary().conditional_writes, "head");
        let e = load(s3, &[("WALSHIPPER_REPO_CONDITIONAL_WRITES", "none")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("conditional_writes"), "{e}");
    }

    #[test]
    fn sizes_quota_and_min_free_space() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("500GiB"), Ok(500 << 30));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size(" 1.5 tib "), Ok(3 << 39));
        assert!(parse_size("100000TiB").is_ok());
        assert!(parse_size("20000000PiB").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("5 apples").is_err());
        assert!(parse_size("-1").is_err());
        assert_eq!(MinFree::parse("5%"), Ok(MinFree::Percent(5.0)));
        assert!(MinFree::parse("100%").is_err());
        assert_eq!(MinFree::Percent(5.0).bytes(Some(1000)), 50);
        assert_eq!(MinFree::Percent(5.0).bytes(None), 0);
        assert_eq!(MinFree::parse("0"), Ok(MinFree::Bytes(0)));
        assert_eq!(MinFree::parse("0%"), Ok(MinFree::Bytes(0)));
        assert_eq!(MinFree::parse(" 0.0 %"), Ok(MinFree::Bytes(0)));
        let c = load("[repo]\npath = \"/r\"\nquota = 1000\n", &[]).unwrap();
        assert_eq!(c.primary().quota_bytes(), Some(1000));
        assert_eq!(c.primary().min_free(), MinFree::Percent(5.0));
        let c = load(
            "[repo]\npath = \"/r\"\n",
            &[
                ("WALSHIPPER_REPO_QUOTA", "2MiB"),
                ("WALSHIPPER_REPO_MIN_FREE_SPACE", "1MB"),
            ],
        )
        .unwrap();
        assert_eq!(c.primary().quota_bytes(), Some(2 << 20));
        assert_eq!(c.primary().min_free(), MinFree::Bytes(1_000_000));
        let e = load("[repo]\npath = \"/r\"\nmin_free_space = \"lots\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("min_free_space"), "{e}");
        let e = load("[repo]\npath = \"/r\"\nquota = \"5 apples\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("quota"), "{e}");
    }
}
