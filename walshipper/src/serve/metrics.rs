//! `/metrics`: the catalog's state in the Prometheus text format (0.0.4),
//! computed at scrape time from one read-only snapshot of the catalog.
//! Counters are counts of catalog rows (runs, verifications, alerts): they
//! only grow while the rows are kept, as a counter must. Labels are only
//! backup_job, kind, repository, status and severity, all bounded sets (no
//! ids, messages or times). The job label is `backup_job`, not `job`:
//! Prometheus sets `job` on every series it scrapes (the scrape job) and
//! would rename ours to `exported_job`. docs/operations.md, "Metrics", lists every metric.

use std::time::Instant;

use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};

use crate::catalog::Session;
use crate::error::Result;
use crate::pg::pg_err;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket bounds of the duration histograms, in seconds (10 s to 1 day).
const DURATION_BUCKETS: &[f64] = &[
    10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
];
/// Bucket bounds of the size histograms, in bytes (1 MiB to 4 TiB, by 4).
const SIZE_BUCKETS: &[f64] = &[
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
    17179869184.0,
    68719476736.0,
    274877906944.0,
    1099511627776.0,
    4398046511104.0,
];
use crate::catalog::{ALERT_KINDS, SEVERITIES};

/// One metric family being filled.
pub struct Family(MetricFamily);

impl Family {
    pub fn new(name: &str, help: &str, kind: MetricType) -> Family {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(kind);
        Family(mf)
    }

    pub fn gauge(name: &str, help: &str) -> Family {
        Self::new(name, help, MetricType::GAUGE)
    }

    pub fn counter(name: &str, help: &str) -> Family {
        Self::new(name, help, MetricType::COUNTER)
    }

    fn metric(labels: &[(&str, &str)]) -> proto::Metric {
        proto::Metric::from_label(
            labels
                .iter()
                .map(|(n, v)| {
                    let mut l = proto::LabelPair::default();
                    l.set_name(n.to_string());
                    l.set_value(v.to_string());
                    l
                })
                .collect(),
        )
    }

    /// A sample (a gauge's or a counter's, as the family's type says).
    pub fn add(&mut self, labels: &[(&str, &str)], v: f64) {
        let mut m = Self::metric(labels);
        if self.0.get_field_type() == MetricType::COUNTER {
            let mut c = proto::Counter::default();
            c.set_value(v);
            m.set_counter(c);
        } else {
            let mut g = proto::Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        }
        self.0.mut_metric().push(m);
    }

    /// A sample when the value is known (NULL in the catalog: none).
    pub fn add_opt(&mut self, labels: &[(&str, &str)], v: Option<f64>) {
        if let Some(v) = v {
            self.add(labels, v);
        }
    }

    /// A histogram sample: `cumulative[i]` observations are <= `bounds[i]`.
    pub fn add_histogram(
        &mut self,
        labels: &[(&str, &str)],
        bounds: &[f64],
        cumulative: &[u64],
        count: u64,
        sum: f64,
    ) {
        let mut h = proto::Histogram::default();
        h.set_sample_count(count);
        h.set_sample_sum(sum);
        h.set_bucket(
            bounds
                .iter()
                .zip(cumulative)
                .map(|(b, c)| {
                    let mut bucket = proto::Bucket::default();
                    bucket.set_upper_bound(*b);
                    bucket.set_cumulative_count(*c);
                    bucket
                })
                .collect(),
        );
        let mut m = Self::metric(labels);
        m.set_histogram(h);
        self.0.mut_metric().push(m);
    }
}

/// The families, in the order they are filled; empty ones are left out of
/// the output (the text format has no way to write them).
#[derive(Default)]
pub struct Families(Vec<MetricFamily>);

impl Families {
    pub fn push(&mut self, f: Family) {
        if !f.0.get_metric().is_empty() {
            self.0.push(f.0);
        }
    }

    /// The text format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.0, &mut out) {
            tracing::error!("/metrics: encoding failed: {e}");
        }
        out
    }
}

type Tx<'a> = postgres::Transaction<'a>;

fn query(
    tx: &mut Tx,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Result<Vec<postgres::Row>> {
    tx.query(sql, params).map_err(pg_err(sql))
}

/// Everything the catalog holds, as metric families. `primary`: the name
/// of the primary repository when the catalog does not know it yet (runs
/// recorded with no repository went there).
fn collect(db: &mut postgres::Client, primary: &str, out: &mut Families) -> Result<()> {
    let mut tx = db
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(pg_err("starting a read-only transaction"))?;
    backups(&mut tx, primary, out)?;
    jobs(&mut tx, out)?;
    wal(&mut tx, out)?;
    objectives(&mut tx, out)?;
    verifications(&mut tx, primary, out)?;
    repositories(&mut tx, out)?;
    alerts(&mut tx, out)?;
    scheduler(&mut tx, out)?;
    tx.commit()
        .map_err(pg_err("ending the read-only transaction"))?;
    Ok(())
}

/// The repository a run with no repository went to: the primary.
const REPO: &str = "coalesce(e.repository, (SELECT s.name FROM backup.repository_status s WHERE s.position = 1), $1)";

fn backups(tx: &mut Tx, primary: &str, out: &mut Families) -> Result<()> {
    let sql = format!(
        "SELECT coalesce(e.job_name, '') AS job, e.kind, {REPO} AS repository,
                count(*) FILTER (WHERE e.started_at IS NOT NULL),
                count(*) FILTER (WHERE e.status = 'succeeded'),
                count(*) FILTER (WHERE e.status = 'failed'),
                count(*) FILTER (WHERE e.status = 'cancelled'),
                count(*) FILTER (WHERE e.status IN ('queued', 'running')),
                extract(epoch FROM max(e.finished_at) FILTER (WHERE e.status = 'succeeded'))::float8,
                extract(epoch FROM max(e.finished_at) FILTER (WHERE e.status = 'failed'))::float8
           FROM backup.backup_executions e
          GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    );
    let mut started = Family::counter(
        "pg_backup_backups_started_total",
        "Backup runs that started, by job (\"\" for a run asked for by hand), kind taken and repository.",
    );
    let mut total = Family::counter(
        "pg_backup_backups_total",
        "Backup runs that ended, by job, kind, repository and status (succeeded, failed, cancelled).",
    );
    let mut running = Family::gauge(
        "pg_backup_backups_running",
        "Backup runs queued or running now, by job, kind and repository.",
    );
    let mut last_ok = Family::gauge(
        "pg_backup_backup_last_success_timestamp_seconds",
        "When the last successful backup of this job, kind and repository ended (Unix time).",
    );
    let mut last_failed = Family::gauge(
        "pg_backup_backup_last_failure_timestamp_seconds",
        "When the last failed backup of this job, kind and repository ended (Unix time).",
    );
    for r in query(tx, &sql, &[&primary])? {
        let (job, kind, repo): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let l = [
            ("backup_job", job.as_str()),
            ("kind", kind.as_str()),
            ("repository", repo.as_str()),
        ];
        started.add(&l, r.get::<_, i64>(3) as f64);
        for (i, status) in [(4, "succeeded"), (5, "failed"), (6, "cancelled")] {
            let ls = [l[0], l[1], l[2], ("status", status)];
            total.add(&ls, r.get::<_, i64>(i) as f64);
        }
        running.add(&l, r.get::<_, i64>(7) as f64);
        last_ok.add_opt(&l, r.get(8));
        last_failed.add_opt(&l, r.get(9));
    }
    out.push(started);
    out.push(total);
    out.push(running);
    out.push(last_ok);
    out.push(last_failed);

    let sql = format!(
        "SELECT {REPO}, extract(epoch FROM max(e.finished_at))::float8
           FROM backup.backup_executions e WHERE e.status = 'succeeded' GROUP BY 1 ORDER BY 1"
    );
    let mut per_repo = Family::gauge(
        "pg_backup_repository_last_success_timestamp_seconds",
        "When the last successful backup into this repository ended (Unix time).",
    );
    for r in query(tx, &sql, &[&primary])? {
        let repo: String = r.get(0);
        per_repo.add_opt(&[("repository", &repo)], r.get(1));
    }
    out.push(per_repo);

    // Durations and sizes of the successful runs, by the kind taken.
    let value = [
        (
            "extract(epoch FROM e.finished_at - e.started_at)::float8",
            DURATION_BUCKETS,
            "pg_backup_backup_duration_seconds",
            "Seconds successful backups took, by kind taken.",
        ),
        (
            "e.size_bytes::float8",
            SIZE_BUCKETS,
            "pg_backup_backup_size_bytes",
            "Size of the data successful backups read (bytes), by kind taken.",
        ),
        (
            "e.stored_bytes::float8",
            SIZE_BUCKETS,
            "pg_backup_backup_stored_bytes",
            "Bytes successful backups stored in their repository (compressed, encrypted), by kind taken.",
        ),
    ];
    for (expr, bounds, name, help) in value {
        let sql = format!(
            "WITH d AS (SELECT e.kind, {expr} AS v FROM backup.backup_executions e
                         WHERE e.status = 'succeeded' AND {expr} IS NOT NULL),
                  k AS (SELECT d.kind, count(*) AS n, coalesce(sum(d.v), 0)::float8 AS s FROM d GROUP BY d.kind)
             SELECT k.kind, k.n, k.s,
                    array(SELECT count(d.v) FILTER (WHERE d.v <= b.le)
                            FROM unnest($1::float8[]) WITH ORDINALITY b(le, i)
                            LEFT JOIN d ON d.kind = k.kind
                           GROUP BY b.i ORDER BY b.i)
               FROM k ORDER BY k.kind"
        );
        let mut h = Family::new(name, help, MetricType::HISTOGRAM);
        let bounds_v: Vec<f64> = bounds.to_vec();
        for r in query(tx, &sql, &[&bounds_v])? {
            let kind: String = r.get(0);
            let counts: Vec<i64> = r.get(3);
            let counts: Vec<u64> = counts.into_iter().map(|c| c.max(0) as u64).collect();
            h.add_histogram(
                &[("kind", &kind)],
                bounds,
                &counts,
                r.get::<_, i64>(1).max(0) as u64,
                r.get(2),
            );
        }
        out.push(h);
    }

    // The newest successful backup of each job and repository.
    let sql = format!(
        "SELECT DISTINCT ON (1, 2) coalesce(e.job_name, ''), {REPO},
                extract(epoch FROM e.finished_at - e.started_at)::float8,
                e.size_bytes::float8, e.stored_bytes::float8
           FROM backup.backup_executions e
          WHERE e.status = 'succeeded'
          ORDER BY 1, 2, e.finished_at DESC"
    );
    let mut dur = Family::gauge(
        "pg_backup_last_backup_duration_seconds",
        "Seconds the newest successful backup of this job and repository took.",
    );
    let mut size = Family::gauge(
        "pg_backup_last_backup_size_bytes",
        "Size of the data the newest successful backup of this job and repository read (bytes).",
    );
    let mut stored = Family::gauge(
        "pg_backup_last_backup_stored_bytes",
        "Bytes the newest successful backup of this job and repository stored.",
    );
    for r in query(tx, &sql, &[&primary])? {
        let (job, repo): (String, String) = (r.get(0), r.get(1));
        let l = [("backup_job", job.as_str()), ("repository", repo.as_str())];
        dur.add_opt(&l, r.get(2));
        size.add_opt(&l, r.get(3));
        stored.add_opt(&l, r.get(4));
    }
    out.push(dur);
    out.push(size);
    out.push(stored);
    Ok(())
}

fn jobs(tx: &mut Tx, out: &mut Families) -> Result<()> {
    // coalesce: a NULL where Rust reads a plain value would panic.
    let sql = "SELECT s.name, s.kind, coalesce(s.active, false),
                      extract(epoch FROM s.last_success)::float8,
                      extract(epoch FROM s.last_failure)::float8,
                      coalesce(s.consecutive_failures, 0)::float8,
                      extract(epoch FROM s.next_run)::float8,
                      EXISTS (SELECT 1 FROM backup.alerts a WHERE a.kind = 'job_overdue'
                                 AND a.subject = s.name AND a.resolved_at IS NULL),
                      coalesce(s.health = 'running', false)
                 FROM backup.job_status s ORDER BY s.name";
    let mut enabled = Family::gauge(
        "pg_backup_job_enabled",
        "Whether the scheduled job is active (1) or disabled (0).",
    );
    let mut last_ok = Family::gauge(
        "pg_backup_job_last_success_timestamp_seconds",
        "When the job last succeeded (a backup taken, a verification or restore test passed), Unix time; absent if never.",
    );
    let mut last_failed = Family::gauge(
        "pg_backup_job_last_failure_timestamp_seconds",
        "When a run of the job last failed (Unix time); absent if never.",
    );
    let mut failures = Family::gauge(
        "pg_backup_job_consecutive_failures",
        "Runs of the job that failed since its last success.",
    );
    let mut next = Family::gauge(
        "pg_backup_job_next_run_timestamp_seconds",
        "When the scheduler runs the job next (Unix time).",
    );
    let mut overdue = Family::gauge(
        "pg_backup_job_overdue",
        "Whether the job is overdue (1): no success within one period of its schedule plus pg_backup.overdue_grace (the scheduler's job_overdue alert is open).",
    );
    let mut running = Family::gauge(
        "pg_backup_job_running",
        "Whether a run of the job is queued or running now (1).",
    );
    for r in query(tx, sql, &[])? {
        let (job, kind): (String, String) = (r.get(0), r.get(1));
        let l = [("backup_job", job.as_str()), ("kind", kind.as_str())];
        enabled.add(&l, f64::from(u8::from(r.get::<_, bool>(2))));
        last_ok.add_opt(&l, r.get(3));
        last_failed.add_opt(&l, r.get(4));
        failures.add(&l, r.get(5));
        next.add_opt(&l, r.get(6));
        overdue.add(&l, f64::from(u8::from(r.get::<_, bool>(7))));
        running.add(&l, f64::from(u8::from(r.get::<_, bool>(8))));
    }
    for f in [
        enabled,
        last_ok,
        last_failed,
        failures,
        next,
        overdue,
        running,
    ] {
        out.push(f);
    }
    Ok(())
}

fn wal(tx: &mut Tx, out: &mut Families) -> Result<()> {
    let sql = "SELECT w.archived_count::float8, w.failed_count::float8,
                      extract(epoch FROM w.last_archived_time)::float8,
                      extract(epoch FROM w.last_failed_time)::float8,
                      coalesce(w.last_failed_time > coalesce(w.last_archived_time, '-infinity'), false),
                      extract(epoch FROM w.rpo_target)::float8,
                      w.streaming,
                      w.receiver_state = 'running' AND coalesce(w.slot_active, false),
                      w.receiver_restarts::float8,
                      w.slot_retained_bytes::float8
                 FROM backup.wal_archive_status w";
    let r = tx.query_one(sql, &[]).map_err(pg_err(sql))?;
    let one = |name: &str, help: &str, counter: bool, v: Option<f64>| {
        let mut f = if counter {
            Family::counter(name, help)
        } else {
            Family::gauge(name, help)
        };
        f.add_opt(&[], v);
        f
    };
    out.push(one(
        "pg_backup_wal_archived_total",
        "WAL files PostgreSQL's archiver archived (pg_stat_archiver.archived_count; reset with the server's statistics).",
        true,
        r.get(0),
    ));
    out.push(one(
        "pg_backup_wal_archive_failed_total",
        "Failed attempts to archive a WAL file (pg_stat_archiver.failed_count).",
        true,
        r.get(1),
    ));
    out.push(one(
        "pg_backup_wal_last_archived_timestamp_seconds",
        "When the archiver last archived a WAL file (Unix time).",
        false,
        r.get(2),
    ));
    out.push(one(
        "pg_backup_wal_last_failed_timestamp_seconds",
        "When an attempt to archive a WAL file last failed (Unix time).",
        false,
        r.get(3),
    ));
    out.push(one(
        "pg_backup_wal_archiving_failing",
        "Whether WAL archiving is failing now (1): its last failure is newer than its last success (the archiver's health; the streaming receiver's is pg_backup_wal_receiver_up).",
        false,
        Some(f64::from(u8::from(r.get::<_, bool>(4)))),
    ));
    out.push(one(
        "pg_backup_rpo_target_seconds",
        "The RPO target (pg_backup.rpo_target), in seconds.",
        false,
        r.get(5),
    ));
    let streaming: bool = r.get(6);
    let up: Option<bool> = r.get(7);
    out.push(one(
        "pg_backup_wal_streaming",
        "Whether WAL streaming is on (pg_backup.wal_streaming): the scheduler keeps walshipper wal-receive running.",
        false,
        Some(f64::from(u8::from(streaming))),
    ));
    out.push(one(
        "pg_backup_wal_receiver_up",
        "1 when the streaming WAL receiver runs and its replication slot is in use; 0 otherwise (also when streaming is off).",
        false,
        Some(f64::from(u8::from(up.unwrap_or(false)))),
    ));
    out.push(one(
        "pg_backup_wal_receiver_restarts_total",
        "Times the scheduler restarted the WAL receiver after it exited.",
        true,
        r.get(8),
    ));
    out.push(one(
        "pg_backup_wal_stream_slot_retained_bytes",
        "WAL the receiver's replication slot keeps in pg_wal, not yet in the repository (absent without the slot).",
        false,
        r.get(9),
    ));
    Ok(())
}

fn objectives(tx: &mut Tx, out: &mut Families) -> Result<()> {
    let sql = "SELECT extract(epoch FROM coalesce(nullif(current_setting('pg_backup.rto_target', true), ''), '1h')::interval)::float8";
    let r = tx.query_one(sql, &[]).map_err(pg_err(sql))?;
    let mut target = Family::gauge(
        "pg_backup_rto_target_seconds",
        "The RTO target (pg_backup.rto_target), in seconds.",
    );
    target.add_opt(&[], r.get(0));
    out.push(target);

    let sql = "SELECT o.repository, extract(epoch FROM o.rpo_now)::float8,
                      extract(epoch FROM o.rpo_worst)::float8,
                      extract(epoch FROM o.last_rto)::float8,
                      extract(epoch FROM o.last_restore_test_passed_at)::float8,
                      o.backups_never_verified::float8
                 FROM backup.recovery_objectives o ORDER BY o.repository";
    let mut rpo = Family::gauge(
        "pg_backup_rpo_seconds",
        "The recovery point objective now: seconds of changes this repository would lose (WAL not archived to it yet).",
    );
    let mut worst = Family::gauge(
        "pg_backup_rpo_worst_seconds",
        "The worst RPO of this repository over pg_backup.rpo_history, in seconds.",
    );
    let mut rto = Family::gauge(
        "pg_backup_last_rto_seconds",
        "The recovery time the last passed restore test from this repository measured, in seconds.",
    );
    let mut passed = Family::gauge(
        "pg_backup_restore_test_last_passed_timestamp_seconds",
        "When the last restore test from this repository passed (Unix time); absent if none ever did.",
    );
    let mut unverified = Family::gauge(
        "pg_backup_backups_never_verified",
        "Backups held in this repository that no verification or restore test has passed yet.",
    );
    for r in query(tx, sql, &[])? {
        let repo: String = r.get(0);
        let l = [("repository", repo.as_str())];
        rpo.add_opt(&l, r.get(1));
        worst.add_opt(&l, r.get(2));
        rto.add_opt(&l, r.get(3));
        passed.add_opt(&l, r.get(4));
        unverified.add_opt(&l, r.get(5));
    }
    for f in [rpo, worst, rto, passed, unverified] {
        out.push(f);
    }
    Ok(())
}

fn verifications(tx: &mut Tx, primary: &str, out: &mut Families) -> Result<()> {
    let sql = format!(
        "SELECT e.kind, {REPO} AS repository,
                count(*) FILTER (WHERE e.status = 'passed'),
                count(*) FILTER (WHERE e.status = 'failed'),
                count(*) FILTER (WHERE e.status = 'cancelled'),
                count(*) FILTER (WHERE e.status = 'interrupted'),
                extract(epoch FROM max(e.finished_at) FILTER (WHERE e.status = 'passed'))::float8
           FROM backup.backup_verifications e
          GROUP BY 1, 2 ORDER BY 1, 2"
    );
    let mut total = Family::counter(
        "pg_backup_verifications_total",
        "Verifications that ended, by kind (integrity: a read-back; restore_test), repository and status (passed, failed, cancelled, interrupted).",
    );
    let mut last = Family::gauge(
        "pg_backup_verification_last_passed_timestamp_seconds",
        "When the last verification of this kind and repository passed (Unix time).",
    );
    for r in query(tx, &sql, &[&primary])? {
        let (kind, repo): (String, String) = (r.get(0), r.get(1));
        for (i, status) in [
            (2, "passed"),
            (3, "failed"),
            (4, "cancelled"),
            (5, "interrupted"),
        ] {
            let l = [
                ("kind", kind.as_str()),
                ("repository", repo.as_str()),
                ("status", status),
            ];
            total.add(&l, r.get::<_, i64>(i) as f64);
        }
        last.add_opt(
            &[("kind", kind.as_str()), ("repository", repo.as_str())],
            r.get(6),
        );
    }
    out.push(total);
    out.push(last);
    Ok(())
}

fn repositories(tx: &mut Tx, out: &mut Families) -> Result<()> {
    let sql = "SELECT s.name, s.ok, s.stored_bytes::float8, s.capacity_bytes::float8,
                      s.free_bytes::float8, s.min_free_bytes::float8, s.wal_segments::float8,
                      s.backups::float8, extract(epoch FROM s.last_backup_stop)::float8,
                      extract(epoch FROM s.first_backup_stop)::float8,
                      extract(epoch FROM s.checked_at)::float8,
                      extract(epoch FROM s.key_created_at)::float8,
                      (s.position = 1 OR s.last_wal IS NOT DISTINCT FROM p.last_wal)
                 FROM backup.repository_status s
                 LEFT JOIN backup.repository_status p ON p.position = 1
                ORDER BY s.position";
    let specs: &[(&str, &str)] = &[
        ("pg_backup_repository_up", "Whether the repository answered walshipper info when the scheduler last asked (1) or not (0)."),
        ("pg_backup_repository_stored_bytes", "Bytes stored in the repository."),
        ("pg_backup_repository_capacity_bytes", "Size of the repository's file system (posix) or its configured quota (s3), in bytes; absent when unknown."),
        ("pg_backup_repository_free_bytes", "Bytes left in the repository's file system or quota; absent when unknown."),
        ("pg_backup_repository_min_free_bytes", "The free space a backup must leave in the repository (min_free_space), in bytes; 0: none."),
        ("pg_backup_repository_wal_segments", "WAL segments the repository holds."),
        ("pg_backup_repository_backups", "Backups the repository holds."),
        ("pg_backup_repository_last_backup_stop_timestamp_seconds", "When the newest backup in the repository ended (Unix time)."),
        ("pg_backup_repository_first_backup_stop_timestamp_seconds", "When the oldest backup in the repository ended: the earliest moment it restores to (Unix time)."),
        ("pg_backup_repository_checked_timestamp_seconds", "When the scheduler last read the repository's state (Unix time)."),
        ("pg_backup_repository_key_created_timestamp_seconds", "When the data key the repository seals new objects with was created (Unix time); absent for an unencrypted repository."),
        ("pg_backup_repository_wal_in_sync", "Whether the repository's WAL reaches as far as the primary repository's (1) or lags (0)."),
    ];
    let mut fams: Vec<Family> = specs.iter().map(|(n, h)| Family::gauge(n, h)).collect();
    for r in query(tx, sql, &[])? {
        let repo: String = r.get(0);
        let l = [("repository", repo.as_str())];
        fams[0].add(&l, f64::from(u8::from(r.get::<_, bool>(1))));
        for (i, f) in fams.iter_mut().enumerate().take(11).skip(1) {
            f.add_opt(&l, r.get(i + 1));
        }
        fams[11].add(
            &l,
            f64::from(u8::from(r.get::<_, Option<bool>>(12).unwrap_or(false))),
        );
    }
    for f in fams {
        out.push(f);
    }

    // The capacity view (sql/capacity.sql), where it exists and may be read.
    let sql = "SELECT to_regclass('backup.repository_capacity') IS NOT NULL
                      AND has_table_privilege('backup.repository_capacity', 'SELECT')";
    let has: bool = tx.query_one(sql, &[]).map_err(pg_err(sql))?.get(0);
    if has {
        let sql = "SELECT c.repository, c.used_ratio::float8, c.growth_bytes_per_day::float8,
                          extract(epoch FROM c.projected_full_at)::float8
                     FROM backup.repository_capacity c ORDER BY 1";
        let mut used = Family::gauge(
            "pg_backup_repository_used_ratio",
            "Share of the repository's capacity in use (0 to 1); absent when its capacity is unknown.",
        );
        let mut growth = Family::gauge(
            "pg_backup_repository_growth_bytes_per_day",
            "How fast the repository's stored bytes grow, in bytes per day (from its usage history).",
        );
        let mut full = Family::gauge(
            "pg_backup_repository_projected_full_timestamp_seconds",
            "When the repository is projected to be full at its current growth (Unix time); absent when it is not growing or its capacity is unknown.",
        );
        for r in query(tx, sql, &[])? {
            let repo: String = r.get(0);
            let l = [("repository", repo.as_str())];
            used.add_opt(&l, r.get(1));
            growth.add_opt(&l, r.get(2));
            full.add_opt(&l, r.get(3));
        }
        out.push(used);
        out.push(growth);
        out.push(full);
    }
    Ok(())
}

/// The alert kinds the catalog allows, read from backup.alerts' check
/// constraint so that a kind added later shows without a change here.
fn alert_kinds(tx: &mut Tx) -> Result<Vec<String>> {
    let sql = "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c
                WHERE c.conrelid = 'backup.alerts'::regclass AND c.contype = 'c'
                  AND pg_get_constraintdef(c.oid) LIKE '%kind%'";
    let mut kinds = Vec::new();
    for r in query(tx, sql, &[])? {
        let def: String = r.get(0);
        // CHECK ((kind = ANY (ARRAY['backup_failed'::text, ...])))
        for part in def.split('\'').skip(1).step_by(2) {
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                kinds.push(part.to_string());
            }
        }
    }
    if kinds.is_empty() {
        kinds = ALERT_KINDS.iter().map(|k| k.to_string()).collect();
    }
    kinds.sort();
    kinds.dedup();
    Ok(kinds)
}

fn alerts(tx: &mut Tx, out: &mut Families) -> Result<()> {
    let kinds = alert_kinds(tx)?;
    let sql = "SELECT a.kind, a.severity,
                      count(*) FILTER (WHERE a.resolved_at IS NULL),
                      count(*) FILTER (WHERE a.resolved_at IS NULL AND a.acknowledged_at IS NULL),
                      count(*)
                 FROM backup.alerts a GROUP BY 1, 2";
    let mut counts = std::collections::HashMap::new();
    for r in query(tx, sql, &[])? {
        let key: (String, String) = (r.get(0), r.get(1));
        counts.insert(
            key,
            (r.get::<_, i64>(2), r.get::<_, i64>(3), r.get::<_, i64>(4)),
        );
    }
    let mut open = Family::gauge(
        "pg_backup_alerts_open",
        "Open alerts, by kind and severity (every kind and severity present, 0 when none).",
    );
    let mut unacked = Family::gauge(
        "pg_backup_alerts_unacknowledged",
        "Open alerts no operator has acknowledged yet, by kind and severity.",
    );
    let mut raised = Family::counter(
        "pg_backup_alerts_raised_total",
        "Alerts raised, by kind and severity (open or resolved).",
    );
    for kind in &kinds {
        for sev in SEVERITIES {
            let (o, u, t) = counts
                .get(&(kind.clone(), sev.to_string()))
                .copied()
                .unwrap_or((0, 0, 0));
            let l = [("kind", kind.as_str()), ("severity", sev)];
            open.add(&l, o as f64);
            unacked.add(&l, u as f64);
            raised.add(&l, t as f64);
        }
    }
    out.push(open);
    out.push(unacked);
    out.push(raised);
    Ok(())
}

fn scheduler(tx: &mut Tx, out: &mut Families) -> Result<()> {
    // pg_stat_activity shows a background worker's backend_type only to a
    // role with pg_read_all_stats (or a superuser): without it, the
    // worker metrics are left out rather than reported as 0, and the
    // catalog's own sign of life remains.
    let sql = "SELECT pg_has_role('pg_read_all_stats', 'USAGE'),
                      count(*) FILTER (WHERE backend_type = 'pg_backup scheduler')::float8,
                      count(*) FILTER (WHERE backend_type IN ('pg_backup run', 'pg_backup recovery'))::float8,
                      extract(epoch FROM greatest((SELECT max(s.sampled_at) FROM backup.rpo_samples s),
                                                  (SELECT max(r.checked_at) FROM backup.repository_status r)))::float8
                 FROM pg_stat_activity";
    let r = tx.query_one(sql, &[]).map_err(pg_err(sql))?;
    let mut up = Family::gauge(
        "pg_backup_scheduler_up",
        "Whether pg_backup_ext's scheduler background worker runs (1) or not (0), as pg_stat_activity shows it; absent when the service's role lacks pg_read_all_stats.",
    );
    let mut workers = Family::gauge(
        "pg_backup_workers_running",
        "Background workers running a backup or a recovery now; absent when the service's role lacks pg_read_all_stats.",
    );
    if r.get::<_, bool>(0) {
        up.add(&[], if r.get::<_, f64>(1) > 0.0 { 1.0 } else { 0.0 });
        workers.add(&[], r.get(2));
    }
    let mut seen = Family::gauge(
        "pg_backup_scheduler_last_seen_timestamp_seconds",
        "The scheduler's latest sign of life in the catalog (Unix time): its last RPO sample (about every minute) or repository status refresh (every pg_backup.repo_status_interval).",
    );
    seen.add_opt(&[], r.get(3));
    out.push(up);
    out.push(workers);
    out.push(seen);
    Ok(())
}

/// One scrape: the catalog's metrics, plus whether the catalog could be
/// read and how long it took (so a broken catalog shows as a metric).
pub fn scrape(session: &mut Session, primary: &str) -> Vec<u8> {
    let started = Instant::now();
    let mut out = Families::default();
    let up = match session.with(|db| {
        let mut f = Families::default();
        collect(db, primary, &mut f)?;
        Ok(f)
    }) {
        Ok(f) => {
            out = f;
            1.0
        }
        Err(e) => {
            tracing::warn!("/metrics: cannot read the catalog: {e}");
            0.0
        }
    };
    let mut catalog_up = Family::gauge(
        "pg_backup_catalog_up",
        "Whether this scrape could read the catalog (1) or not (0: the other pg_backup_ metrics are missing; the service's log says why).",
    );
    catalog_up.add(&[], up);
    out.push(catalog_up);
    let mut took = Family::gauge(
        "pg_backup_scrape_duration_seconds",
        "Seconds this scrape took to read the catalog.",
    );
    took.add(&[], started.elapsed().as_secs_f64());
    out.push(took);
    out.encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_encoding() {
        let mut out = Families::default();
        let mut c = Family::counter("pg_backup_backups_total", "Runs.");
        c.add(&[("backup_job", "nightly"), ("status", "failed")], 2.0);
        c.add(&[("backup_job", "we\"ird\\\n"), ("status", "ok")], 1.0);
        out.push(c);
        out.push(Family::gauge(
            "pg_backup_empty",
            "Never written: no sample.",
        ));
        let mut h = Family::new(
            "pg_backup_backup_duration_seconds",
            "Durations.",
            MetricType::HISTOGRAM,
        );
        h.add_histogram(&[("kind", "full")], &[10.0, 60.0], &[1, 3], 4, 250.5);
        out.push(h);
        let text = String::from_utf8(out.encode()).unwrap();
        assert_eq!(
            text,
            "# HELP pg_backup_backups_total Runs.\n\
             # TYPE pg_backup_backups_total counter\n\
             pg_backup_backups_total{backup_job=\"nightly\",status=\"failed\"} 2\n\
             pg_backup_backups_total{backup_job=\"we\\\"ird\\\\\\n\",status=\"ok\"} 1\n\
             # HELP pg_backup_backup_duration_seconds Durations.\n\
             # TYPE pg_backup_backup_duration_seconds histogram\n\
             pg_backup_backup_duration_seconds_bucket{kind=\"full\",le=\"10\"} 1\n\
             pg_backup_backup_duration_seconds_bucket{kind=\"full\",le=\"60\"} 3\n\
             pg_backup_backup_duration_seconds_bucket{kind=\"full\",le=\"+Inf\"} 4\n\
             pg_backup_backup_duration_seconds_sum{kind=\"full\"} 250.5\n\
             pg_backup_backup_duration_seconds_count{kind=\"full\"} 4\n"
        );
    }
}
