//! Settings (GUCs) of the control plane. None holds a secret: walshipper's
//! configuration file holds keys and credentials.

use std::ffi::CString;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};

pub static WALSHIPPER_PATH: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"/usr/local/bin/walshipper"));
pub static WALSHIPPER_CONFIG: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"/etc/walshipper/walshipper.toml"));
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static MAX_CONCURRENT: GucSetting<i32> = GucSetting::<i32>::new(1);
pub static RPO_TARGET: GucSetting<i32> = GucSetting::<i32>::new(900);
pub static RUN_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(6 * 3600);
pub static RETRY_MAX: GucSetting<i32> = GucSetting::<i32>::new(2);
pub static RETRY_DELAY: GucSetting<i32> = GucSetting::<i32>::new(300);
pub static OVERDUE_GRACE: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static REPO_STATUS_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static EXPIRE_AFTER_BACKUP: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static VERIFY_AFTER_BACKUP: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static RTO_TARGET: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static RESTORE_TEST_MAX_AGE: GucSetting<i32> = GucSetting::<i32>::new(35 * 86400);
pub static RPO_HISTORY: GucSetting<i32> = GucSetting::<i32>::new(7 * 86400);
// Storage capacity (sql/capacity.sql reads them with current_setting()).
pub static STORAGE_SAMPLE_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static STORAGE_HISTORY: GucSetting<i32> = GucSetting::<i32>::new(400 * 86400);
pub static STORAGE_GROWTH_WINDOW: GucSetting<i32> = GucSetting::<i32>::new(14 * 86400);
pub static STORAGE_WARN_PERCENT: GucSetting<i32> = GucSetting::<i32>::new(85);
pub static STORAGE_WARN_DAYS: GucSetting<i32> = GucSetting::<i32>::new(14);
// Data keys (sql/keys.sql reads key_rotation_grace and key_retry_delay
// with current_setting(); the scheduler the other two).
pub static KEY_TASK_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(6 * 3600);
pub static KEY_ROTATION_GRACE: GucSetting<i32> = GucSetting::<i32>::new(86400);
pub static KEY_RETRY_DELAY: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static KEY_USAGE_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(86400);
// Streaming WAL (src/stream.rs; sql/streaming.sql and the
// wal_archive_status view read the last three with current_setting()).
pub static WAL_STREAMING: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static STREAM_SLOT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"walshipper"));
pub static STREAM_LAG_ALERT: GucSetting<i32> = GucSetting::<i32>::new(256);
pub static STREAM_DOWN_ALERT: GucSetting<i32> = GucSetting::<i32>::new(60);

pub fn string(s: &GucSetting<Option<CString>>) -> String {
    s.get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Settings any backend may read (defined whether or not the library is preloaded).
pub fn define_runtime() {
    GucRegistry::define_string_guc(
        c"pg_backup.walshipper_path",
        c"Path of the walshipper binary.",
        c"The extension runs it (with an argument vector, no shell) for backups.",
        &WALSHIPPER_PATH,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_backup.walshipper_config",
        c"walshipper configuration file passed with --config.",
        c"It holds the repository, keys and credentials; the catalog never does.",
        &WALSHIPPER_CONFIG,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_backup.max_concurrent",
        c"Backups the scheduler runs at the same time.",
        c"",
        &MAX_CONCURRENT,
        1,
        16,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_backup.rpo_target",
        c"Recovery point objective in seconds; an alert is raised above it.",
        c"",
        &RPO_TARGET,
        1,
        86400 * 7,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.run_timeout",
        c"A backup running longer than this many seconds is stopped and marked failed.",
        c"",
        &RUN_TIMEOUT,
        60,
        86400 * 7,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.retry_max",
        c"How many times a failed scheduled backup is retried.",
        c"",
        &RETRY_MAX,
        0,
        100,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_backup.retry_delay",
        c"Seconds between a failed scheduled backup and its retry.",
        c"",
        &RETRY_DELAY,
        0,
        86400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.overdue_grace",
        c"Seconds past a job's period without a success before it is reported overdue.",
        c"",
        &OVERDUE_GRACE,
        0,
        86400 * 30,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.repo_status_interval",
        c"Seconds between refreshes of backup.repositories (walshipper info); 0 = never.",
        c"Each refresh lists every repository, which costs requests on an object store.",
        &REPO_STATUS_INTERVAL,
        0,
        86400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"pg_backup.expire_after_backup",
        c"Run walshipper expire after each successful backup.",
        c"With the retention of the backup's job, or walshipper's configured policy when it has none.",
        &EXPIRE_AFTER_BACKUP,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_backup.verify_after_backup",
        c"Queue an integrity verification (walshipper verify) of each backup once it succeeded.",
        c"Recorded in backup.backup_verifications; a failure raises verification_failed.",
        &VERIFY_AFTER_BACKUP,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_backup.rto_target",
        c"Recovery time objective in seconds; a restore test measuring more raises rto_exceeded.",
        c"",
        &RTO_TARGET,
        1,
        86400 * 30,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.restore_test_max_age",
        c"Seconds without a passed restore test before restore_test_overdue is raised.",
        c"Only once the oldest backup is older than this, so that a new installation is not alarmed.",
        &RESTORE_TEST_MAX_AGE,
        3600,
        86400 * 3660,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.rpo_history",
        c"Seconds of RPO samples kept for the worst RPO of backup.recovery_objectives.",
        c"",
        &RPO_HISTORY,
        3600,
        86400 * 366,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.storage_sample_interval",
        c"Seconds between samples of each repository's size and free space in backup.repository_usage.",
        c"Taken when the scheduler refreshes repository status (pg_backup.repo_status_interval), at most this often.",
        &STORAGE_SAMPLE_INTERVAL,
        1,
        86400 * 7,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.storage_history",
        c"Seconds of storage samples kept in backup.repository_usage.",
        c"The storage charts and the compliance report reach back this far.",
        &STORAGE_HISTORY,
        86400,
        86400 * 3660,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.storage_growth_window",
        c"Seconds of storage samples a repository's growth is computed over (backup.repository_capacity).",
        c"The least-squares slope of the bytes stored over this window projects when the repository fills.",
        &STORAGE_GROWTH_WINDOW,
        3600,
        86400 * 366,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.storage_warn_percent",
        c"Percent of a repository's capacity in use at which repository_almost_full is raised.",
        c"",
        &STORAGE_WARN_PERCENT,
        1,
        100,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_backup.storage_warn_days",
        c"Days: repository_almost_full is raised when a repository is projected to reach its minimum free space sooner.",
        c"0 turns the projection's warning off.",
        &STORAGE_WARN_DAYS,
        0,
        3650,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_backup.key_task_timeout",
        c"Seconds a walshipper key rotate or key retire run by the scheduler may take before it is stopped and marked failed.",
        c"Retiring a key re-encrypts every object it sealed: hours on a large repository. Backups wait while it runs.",
        &KEY_TASK_TIMEOUT,
        60,
        86400 * 7,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.key_rotation_grace",
        c"Seconds past a key's rotation period (backup.set_key_rotation) before key_rotation_overdue is raised.",
        c"",
        &KEY_ROTATION_GRACE,
        0,
        86400 * 90,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.key_retry_delay",
        c"Seconds after a failed key rotation or retirement before the rotation policy tries again.",
        c"A request (backup.rotate_key_now, backup.retire_key) is carried out when asked for.",
        &KEY_RETRY_DELAY,
        0,
        86400 * 7,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.key_usage_interval",
        c"Seconds between counts of the objects each data key seals (walshipper info --key-usage); 0 = never.",
        c"A count reads the header of every object: one request per object on an object store. A key operation is followed by one (unless 0).",
        &KEY_USAGE_INTERVAL,
        0,
        86400 * 366,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"pg_backup.wal_streaming",
        c"Stream WAL to the repository: the scheduler keeps `walshipper wal-receive` running.",
        c"It connects through a physical replication slot (pg_backup.stream_slot); archive_command may stay on beside it.",
        &WAL_STREAMING,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_backup.stream_slot",
        c"The physical replication slot the WAL receiver streams from.",
        c"Created by walshipper wal-receive if missing. A slot keeps the server's WAL until the receiver has stored it: see backup.wal_archive_status.slot_retained_bytes.",
        &STREAM_SLOT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_backup.stream_lag_alert",
        c"MB of WAL the replication slot may hold back before an alert (wal_stream_lagging).",
        c"The slot's WAL is not yet in the repository and stays in pg_wal: this bounds both the data at risk and the disk it pins.",
        &STREAM_LAG_ALERT,
        1,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_int_guc(
        c"pg_backup.stream_down_alert",
        c"Seconds the WAL receiver may be down before an alert (wal_receiver_down).",
        c"",
        &STREAM_DOWN_ALERT,
        1,
        86400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
}

/// Settings fixed at server start (only when preloaded).
pub fn define_postmaster() {
    GucRegistry::define_string_guc(
        c"pg_backup.database",
        c"Database holding the pg_backup catalog, used by the scheduler.",
        c"CREATE EXTENSION pg_backup_ext in this database.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}
