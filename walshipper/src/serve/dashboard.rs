//! The dashboard (`/`): one read-only HTML page with server-drawn SVG
//! charts, no script: backups and their chains on a timeline, WAL coverage
//! and gaps, restore points and the restorable window, storage and
//! durations over time, open alerts, RPO against its target.
//!
//! Everything comes from the catalog through a monitor's connection (views
//! and tables grant_monitor opens) and from the repositories through
//! `serve::repos` (cached); every catalog value is HTML-escaped.

use std::collections::HashMap;
use std::fmt::Write;

use postgres::types::{FromSql, ToSql};
use postgres::Row;

use super::charts::{self, esc, tile, Item, Lane, Pin, Series};
use crate::config::Config;
use crate::error::{Error, Result};

/// How far back the timeline and the duration chart look.
const TIMELINE_DAYS: f64 = 7.0;
/// Points a chart line is thinned to (each the worst of its bucket).
const CHART_POINTS: f64 = 400.0;

// --- catalog access shared with the report -------------------------------

/// Runs `sql`; an error names the query's purpose.
pub(super) fn query(
    db: &mut postgres::Client,
    what: &str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>> {
    db.query(sql, params).map_err(|source| Error::Postgres {
        context: format!("reading {what} from the catalog"),
        source,
    })
}

/// Column `i` of `row` (a type mismatch is an error, not a panic).
pub(super) fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<T> {
    row.try_get(i).map_err(|source| Error::Postgres {
        context: format!("column {i} of a catalog row"),
        source,
    })
}

/// The cluster's system identifier, if this role may read pg_control.
pub(super) fn system_identifier(db: &mut postgres::Client) -> Option<String> {
    db.query_one(
        "SELECT system_identifier::text FROM pg_control_system()",
        &[],
    )
    .ok()
    .and_then(|r| r.try_get(0).ok())
}

pub(super) fn now_epoch() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64 / 1000.0
}

// --- what the page is drawn from ------------------------------------------

/// last archived WAL and time, RPO now and target, failures, last failed WAL and time.
type ArchiveRow = (
    Option<String>,
    Option<f64>,
    Option<f64>,
    f64,
    i64,
    Option<String>,
    Option<f64>,
);

/// A storage sample: repository, time, stored, capacity, free.
pub(super) type UsageSample = (String, f64, f64, Option<f64>, Option<f64>);

struct Backup {
    id: String,
    kind: String,
    based_on: Option<String>,
    repos: Vec<String>,
    start: f64,
    stop: f64,
    job: Option<String>,
    size: f64,
}

struct Failed {
    id: i64,
    kind: String,
    repo: String,
    start: f64,
    end: f64,
    job: Option<String>,
    error: String,
}

struct RepoStatus {
    name: String,
    kind: String,
    location: String,
    status: String,
    last_wal: Option<String>,
    first_backup_stop: Option<f64>,
    last_backup_stop: Option<f64>,
    error: Option<String>,
}

/// Maps an LSN to a time by interpolating between (LSN, time) pairs the
/// catalog knows; positions outside them take the nearest pair's time.
struct LsnClock {
    pairs: Vec<(f64, f64)>,
}

impl LsnClock {
    fn new(mut pairs: Vec<(f64, f64)>) -> LsnClock {
        pairs.retain(|p| p.0.is_finite() && p.1.is_finite());
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        // Time never runs backwards as WAL grows (a restored cluster may
        // have replayed old positions later): keep it monotone.
        let mut t = f64::MIN;
        for p in pairs.iter_mut() {
            t = t.max(p.1);
            p.1 = t;
        }
        LsnClock { pairs }
    }

    fn time(&self, lsn: f64) -> Option<f64> {
        let first = self.pairs.first()?;
        let last = self.pairs.last()?;
        if lsn <= first.0 {
            return Some(first.1);
        }
        if lsn >= last.0 {
            return Some(last.1);
        }
        let i = self.pairs.partition_point(|p| p.0 <= lsn);
        let (a, b) = (self.pairs[i - 1], self.pairs[i]);
        if b.0 <= a.0 {
            return Some(b.1);
        }
        Some(a.1 + (b.1 - a.1) * (lsn - a.0) / (b.0 - a.0))
    }
}

fn primary_name(repos: &[RepoStatus], cfg: &Config) -> String {
    repos
        .first()
        .map(|r| r.name.clone())
        .or_else(|| cfg.repos.first().map(|r| r.name.clone()))
        .unwrap_or_else(|| "repo1".into())
}

fn kind_color(kind: &str) -> &'static str {
    match kind {
        "full" => charts::BLUE,
        "diff" => charts::ORANGE,
        "incr" => charts::SKY,
        _ => charts::GREY,
    }
}

/// The page, from the catalog (`db`, a monitor's connection) and the
/// repositories `cfg` names (read through a cache).
pub fn render(db: &mut postgres::Client, cfg: &Config) -> Result<String> {
    let now = now_epoch();
    let since = now - TIMELINE_DAYS * 86400.0;

    let repos: Vec<RepoStatus> = query(
        db,
        "repository status",
        "SELECT s.name, s.type, s.location, r.status, s.last_wal,
                extract(epoch FROM s.first_backup_stop)::float8,
                extract(epoch FROM s.last_backup_stop)::float8, s.error
           FROM backup.repository_status s JOIN backup.repositories r USING (name)
          ORDER BY s.position",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(RepoStatus {
            name: get(r, 0)?,
            kind: get(r, 1)?,
            location: get(r, 2)?,
            status: get(r, 3)?,
            last_wal: get(r, 4)?,
            first_backup_stop: get(r, 5)?,
            last_backup_stop: get(r, 6)?,
            error: get(r, 7)?,
        })
    })
    .collect::<Result<_>>()?;
    let primary = primary_name(&repos, cfg);

    let backups: Vec<Backup> = query(
        db,
        "backups",
        "SELECT backup_id, type, based_on, repository, held_by,
                extract(epoch FROM start_time)::float8, extract(epoch FROM stop_time)::float8,
                job, coalesce(size_bytes, 0)::float8
           FROM (SELECT * FROM backup.backups ORDER BY stop_time DESC NULLS LAST LIMIT 5000) b
          ORDER BY stop_time",
        &[],
    )?
    .iter()
    .map(|r| {
        let held: Vec<String> = get(r, 4)?;
        let repo: Option<String> = get(r, 3)?;
        let start: Option<f64> = get(r, 5)?;
        let stop: Option<f64> = get(r, 6)?;
        Ok(Backup {
            id: get(r, 0)?,
            kind: get(r, 1)?,
            based_on: get(r, 2)?,
            repos: if held.is_empty() {
                vec![repo.unwrap_or_else(|| primary.clone())]
            } else {
                held
            },
            start: start.or(stop).unwrap_or(now),
            stop: stop.or(start).unwrap_or(now),
            job: get(r, 7)?,
            size: get(r, 8)?,
        })
    })
    .collect::<Result<_>>()?;

    let failed: Vec<Failed> = query(
        db,
        "failed backup runs",
        "SELECT e.execution_id, e.kind, e.repository,
                extract(epoch FROM coalesce(e.started_at, e.queued_at))::float8,
                extract(epoch FROM e.finished_at)::float8, j.name, coalesce(e.error, '')
           FROM backup.backup_executions e LEFT JOIN backup.backup_jobs j USING (job_id)
          WHERE e.status = 'failed' AND e.finished_at > to_timestamp($1)
          ORDER BY e.finished_at DESC LIMIT 500",
        &[&since],
    )?
    .iter()
    .map(|r| {
        let repo: Option<String> = get(r, 2)?;
        Ok(Failed {
            id: get(r, 0)?,
            kind: get(r, 1)?,
            repo: repo.unwrap_or_else(|| primary.clone()),
            start: get(r, 3)?,
            end: get(r, 4)?,
            job: get(r, 5)?,
            error: get(r, 6)?,
        })
    })
    .collect::<Result<_>>()?;

    let points: Vec<(String, f64, f64)> = query(
        db,
        "restore points",
        "SELECT name, extract(epoch FROM created_at)::float8, (lsn - '0/0'::pg_lsn)::float8
           FROM backup.restore_points WHERE created_at > to_timestamp($1)
          ORDER BY created_at DESC LIMIT 100",
        &[&since],
    )?
    .iter()
    .map(|r| Ok((get(r, 0)?, get(r, 1)?, get(r, 2)?)))
    .collect::<Result<_>>()?;

    let archive = query(
        db,
        "WAL archiving status",
        "SELECT last_archived_wal, extract(epoch FROM last_archived_time)::float8,
                extract(epoch FROM rpo_estimate)::float8, extract(epoch FROM rpo_target)::float8,
                failed_count, last_failed_wal, extract(epoch FROM last_failed_time)::float8
           FROM backup.wal_archive_status",
        &[],
    )?;
    let (
        last_archived_wal,
        last_archived_time,
        rpo_now,
        rpo_target,
        archive_failed_count,
        last_failed_wal,
        last_failed_time,
    ): ArchiveRow = match archive.first() {
        Some(r) => (
            get(r, 0)?,
            get(r, 1)?,
            get(r, 2)?,
            get::<Option<f64>>(r, 3)?.unwrap_or(900.0),
            get(r, 4)?,
            get(r, 5)?,
            get(r, 6)?,
        ),
        None => (None, None, None, 900.0, 0, None, None),
    };

    // (LSN, time) pairs: backups' starts and stops, restore points, the
    // last archived segment's end, and the server's position now.
    let mut pairs: Vec<(f64, f64)> = query(
        db,
        "backup positions",
        "SELECT (start_lsn - '0/0'::pg_lsn)::float8, extract(epoch FROM (summary->>'start_time')::timestamptz)::float8,
                (stop_lsn - '0/0'::pg_lsn)::float8, extract(epoch FROM (summary->>'stop_time')::timestamptz)::float8
           FROM backup.backup_executions
          WHERE status = 'succeeded' AND start_lsn IS NOT NULL AND stop_lsn IS NOT NULL
          ORDER BY finished_at DESC LIMIT 2000",
        &[],
    )?
    .iter()
    .map(|r| -> Result<Vec<(f64, f64)>> {
        let (a, b, c, d): (Option<f64>, Option<f64>, Option<f64>, Option<f64>) =
            (get(r, 0)?, get(r, 1)?, get(r, 2)?, get(r, 3)?);
        Ok([(a, b), (c, d)]
            .into_iter()
            .filter_map(|(l, t)| Some((l?, t?)))
            .collect())
    })
    .collect::<Result<Vec<_>>>()?
    .into_iter()
    .flatten()
    .collect();
    pairs.extend(points.iter().map(|p| (p.2, p.1)));
    if let Ok(r) = db.query_one(
        "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8, extract(epoch FROM now())::float8",
        &[],
    ) {
        // A standby has no current position: it is only one more pair.
        if let (Ok(l), Ok(t)) = (r.try_get::<_, f64>(0), r.try_get::<_, f64>(1)) {
            pairs.push((l, t));
        }
    }
    // The background refresher's last reading: never waits on a repository.
    let views = super::repos::views(cfg);
    let seg_size = views
        .iter()
        .map(|v| v.wal_segment_size)
        .find(|s| *s > 0)
        .unwrap_or(16 << 20);
    if let (Some(w), Some(t)) = (&last_archived_wal, last_archived_time) {
        if let Some(l) = super::repos::segment_lsn(w, seg_size) {
            pairs.push(((l + seg_size) as f64, t));
        }
    }
    let clock = LsnClock::new(pairs);

    let jobs = query(
        db,
        "job status",
        "SELECT name, kind, schedule, active, health,
                extract(epoch FROM last_success)::float8, extract(epoch FROM last_failure)::float8,
                consecutive_failures, extract(epoch FROM next_run)::float8, last_backup_id
           FROM backup.job_status ORDER BY name LIMIT 200",
        &[],
    )?;
    let alerts = query(
        db,
        "open alerts",
        "SELECT severity, kind, subject, message, extract(epoch FROM raised_at)::float8,
                acknowledged_at IS NOT NULL, count(*) OVER ()
           FROM backup.alerts WHERE resolved_at IS NULL
          ORDER BY CASE severity WHEN 'critical' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END, raised_at DESC
          LIMIT 30",
        &[],
    )?;
    let objectives = query(
        db,
        "recovery objectives",
        "SELECT repository, extract(epoch FROM rpo_now)::float8, extract(epoch FROM rpo_target)::float8,
                extract(epoch FROM rpo_worst)::float8, extract(epoch FROM rto_target)::float8,
                extract(epoch FROM last_rto)::float8, extract(epoch FROM last_restore_test_passed_at)::float8
           FROM backup.recovery_objectives",
        &[],
    )?;

    let sysid =
        system_identifier(db).or_else(|| views.iter().find_map(|v| v.system_identifier.clone()));

    let mut p = String::with_capacity(64 * 1024);
    let _ = write!(
        p,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"60\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>pg_backup dashboard</title><style>{}</style></head><body>\
         <h1>pg_backup — backups and recovery</h1>\
         <div class=\"sub\">cluster {} · generated {} · walshipper {} · refreshes every minute · all times UTC</div>",
        charts::BASE_CSS,
        esc(sysid.as_deref().unwrap_or("(system identifier not readable)")),
        esc(&charts::utc(now, true)),
        esc(env!("CARGO_PKG_VERSION")),
    );

    // The headline: what a person checks first, big.
    p.push_str("<div class=\"big\">");
    let n_open = alerts
        .first()
        .map(|r| get::<i64>(r, 6))
        .transpose()?
        .unwrap_or(0);
    let crit = alerts
        .iter()
        .filter(|r| {
            get::<String>(r, 0)
                .map(|s| s == "critical")
                .unwrap_or(false)
        })
        .count();
    let failing = jobs
        .iter()
        .filter(|r| get::<String>(r, 4).map(|s| s == "failing").unwrap_or(false))
        .count();
    tile(
        &mut p,
        "open alerts",
        &n_open.to_string(),
        &format!("{crit} critical"),
        if crit > 0 {
            "t-fail"
        } else if n_open > 0 {
            "t-warn"
        } else {
            "t-ok"
        },
    );
    tile(
        &mut p,
        "jobs failing",
        &failing.to_string(),
        &format!("of {}", jobs.len()),
        if failing > 0 { "t-fail" } else { "t-ok" },
    );
    match rpo_now {
        Some(r) => tile(
            &mut p,
            "RPO now (data at risk)",
            &charts::duration(r),
            &format!("target {}", charts::duration(rpo_target)),
            if r > rpo_target { "t-fail" } else { "t-ok" },
        ),
        None => tile(&mut p, "RPO now", "—", "nothing archived yet", "t-warn"),
    }
    let primary_obj = objectives.first();
    let (rto_target, last_rto, last_test) = match primary_obj {
        Some(r) => (
            get::<Option<f64>>(r, 4)?.unwrap_or(3600.0),
            get::<Option<f64>>(r, 5)?,
            get::<Option<f64>>(r, 6)?,
        ),
        None => (3600.0, None, None),
    };
    match last_rto {
        Some(r) => tile(
            &mut p,
            "RTO measured (last restore test)",
            &charts::duration(r),
            &format!(
                "target {} · tested {}",
                charts::duration(rto_target),
                last_test.map(|t| charts::utc(t, false)).unwrap_or_default()
            ),
            if r > rto_target { "t-fail" } else { "t-ok" },
        ),
        None => tile(
            &mut p,
            "RTO measured",
            "—",
            &format!(
                "no restore test passed yet · target {}",
                charts::duration(rto_target)
            ),
            "t-warn",
        ),
    }
    let last_ok = backups.iter().map(|b| b.stop).fold(f64::MIN, f64::max);
    if last_ok > f64::MIN {
        tile(
            &mut p,
            "last backup",
            &charts::duration(now - last_ok),
            &format!("ago · {}", charts::utc(last_ok, false)),
            "t-ok",
        );
    } else {
        tile(&mut p, "last backup", "none", "no backup yet", "t-warn");
    }
    p.push_str("</div>");

    // (g) jobs as badges.
    p.push_str("<h2>Jobs</h2>");
    if jobs.is_empty() {
        p.push_str(
            "<div class=\"empty\">No backup job is scheduled yet (backup.job_create).</div>",
        );
    } else {
        p.push_str("<table><tr><th>job</th><th>kind</th><th>schedule</th><th>health</th><th>last success (UTC)</th><th>last failure (UTC)</th><th>next run (UTC)</th><th>last backup</th></tr>");
        for r in &jobs {
            let when = |i: usize| -> Result<String> {
                Ok(get::<Option<f64>>(r, i)?
                    .map(|t| charts::utc(t, false))
                    .unwrap_or_else(|| "—".into()))
            };
            let fails: i64 = get(r, 7)?;
            let health: String = get(r, 4)?;
            let _ = write!(
                p,
                "<tr><td><b>{}</b></td><td>{}</td><td class=\"mono\">{}</td><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
                esc(&get::<String>(r, 0)?),
                esc(&get::<String>(r, 1)?),
                esc(&get::<String>(r, 2)?),
                charts::badge(&health),
                if fails > 0 {
                    format!(" {fails} in a row")
                } else {
                    String::new()
                },
                when(5)?,
                when(6)?,
                when(8)?,
                esc(&get::<Option<String>>(r, 9)?.unwrap_or_default()),
            );
        }
        p.push_str("</table>");
    }

    // (a) + (b): one time axis for backups, WAL, restore points, window.
    p.push_str("<h2>Timeline: backups, WAL coverage and the restorable window</h2>");
    let mut lanes: Vec<Lane> = Vec::new();
    let mut t_min = now;
    let by_id: HashMap<&str, &Backup> = backups.iter().map(|b| (b.id.as_str(), b)).collect();
    let mut alarms: Vec<String> = Vec::new();
    let repo_names: Vec<String> = if repos.is_empty() {
        cfg.repos.iter().map(|r| r.name.clone()).collect()
    } else {
        repos.iter().map(|r| r.name.clone()).collect()
    };
    for name in &repo_names {
        let st = repos.iter().find(|r| &r.name == name);
        let mut items = Vec::new();
        // The restorable window: from its oldest backup's end to its last WAL.
        let first_stop = st.and_then(|s| s.first_backup_stop).or_else(|| {
            backups
                .iter()
                .filter(|b| b.repos.contains(name))
                .map(|b| b.stop)
                .reduce(f64::min)
        });
        let wal_end = st.and_then(|s| {
            let w = s.last_wal.as_ref()?;
            if Some(w) == last_archived_wal.as_ref() && last_archived_time.is_some() {
                return last_archived_time;
            }
            let l = super::repos::segment_lsn(w, seg_size)?;
            clock.time((l + seg_size) as f64)
        });
        let window_end = match (wal_end, st.and_then(|s| s.last_backup_stop)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        // A WAL gap interrupts it: recovery from a backup before the gap
        // stops there; the next backup after it opens the window again.
        let gap_times: Vec<(f64, f64)> = views
            .iter()
            .filter(|v| &v.name == name)
            .flat_map(|v| v.wal.iter().flat_map(|t| t.gaps.iter()))
            .filter_map(|g| Some((clock.time(g.0 as f64)?, clock.time(g.1 as f64)?)))
            .collect();
        if let (Some(a), Some(end)) = (first_stop, window_end) {
            t_min = t_min.min(a);
            let mut stops: Vec<f64> = backups
                .iter()
                .filter(|b| b.repos.contains(name) && b.stop >= a)
                .map(|b| b.stop)
                .collect();
            stops.push(a);
            stops.sort_by(f64::total_cmp);
            let mut bands: Vec<(f64, f64)> = Vec::new();
            for s0 in stops {
                let s1 = gap_times
                    .iter()
                    .filter(|g| g.1 > s0)
                    .map(|g| g.0.max(s0))
                    .fold(end.max(s0), f64::min);
                match bands.last_mut() {
                    Some(last) if s0 <= last.1 => last.1 = last.1.max(s1),
                    _ => bands.push((s0, s1)),
                }
            }
            for (b0, b1) in bands {
                items.push(Item::Band {
                    t0: b0,
                    t1: b1,
                    color: charts::GREEN,
                    title: format!(
                        "{name}: restorable from {} to {}",
                        charts::utc(b0, true),
                        charts::utc(b1, true)
                    ),
                });
            }
        }
        for b in backups
            .iter()
            .filter(|b| b.repos.contains(name) && b.stop >= since)
        {
            t_min = t_min.min(b.start);
            if let Some(base) = b.based_on.as_deref().and_then(|id| by_id.get(id)) {
                items.push(Item::Link {
                    from: base.stop,
                    to: b.start,
                });
            }
            items.push(Item::Span {
                t0: b.start,
                t1: b.stop,
                color: kind_color(&b.kind),
                title: format!(
                    "{} ({}{}), {} → {}, {}{}",
                    b.id,
                    b.kind,
                    b.based_on
                        .as_deref()
                        .map(|x| format!(" on {x}"))
                        .unwrap_or_default(),
                    charts::utc(b.start, true),
                    charts::utc(b.stop, true),
                    charts::bytes(b.size),
                    b.job
                        .as_deref()
                        .map(|j| format!(", job {j}"))
                        .unwrap_or_default()
                ),
                label: Some(b.id.clone()),
                hatch: false,
            });
        }
        for f in failed.iter().filter(|f| &f.repo == name) {
            t_min = t_min.min(f.end);
            items.push(Item::Cross {
                t: f.end,
                color: charts::RED,
                title: format!(
                    "run {} ({}{}) failed at {}: {}",
                    f.id,
                    f.kind,
                    f.job
                        .as_deref()
                        .map(|j| format!(", job {j}"))
                        .unwrap_or_default(),
                    charts::utc(f.end, true),
                    f.error
                ),
            });
            let _ = f.start;
        }
        lanes.push(Lane {
            label: format!("{name} · backups"),
            items,
            group_start: true,
        });
        // WAL coverage per timeline, placed by the LSN clock.
        match views.iter().find(|v| &v.name == name) {
            Some(v) if v.error.is_some() => {
                alarms.push(format!(
                    "repository {name} cannot be read: {}",
                    v.error.as_deref().unwrap_or_default()
                ));
            }
            Some(v) => {
                for tl in &v.wal {
                    let mut items = Vec::new();
                    for (a, b, first, last, n) in &tl.ranges {
                        let (Some(ta), Some(tb)) = (clock.time(*a as f64), clock.time(*b as f64))
                        else {
                            continue;
                        };
                        t_min = t_min.min(ta);
                        items.push(Item::Span {
                            t0: ta,
                            t1: tb,
                            color: charts::GREEN,
                            title: format!(
                                "WAL {first} … {last}: {n} segment(s), about {} → {}",
                                charts::utc(ta, false),
                                charts::utc(tb, false)
                            ),
                            label: None,
                            hatch: false,
                        });
                    }
                    for (a, b, first, last, n) in &tl.gaps {
                        alarms.push(format!(
                            "WAL gap in {name}, timeline {}: {first} … {last} ({n} segment(s) missing): no recovery can cross it",
                            tl.timeline
                        ));
                        let (Some(ta), Some(tb)) = (clock.time(*a as f64), clock.time(*b as f64))
                        else {
                            continue;
                        };
                        items.push(Item::Span {
                            t0: ta,
                            t1: tb,
                            color: charts::RED,
                            title: format!("GAP: {first} … {last}, {n} segment(s) missing"),
                            label: Some(format!("GAP ({n} missing)")),
                            hatch: true,
                        });
                    }
                    lanes.push(Lane {
                        label: format!("{name} · WAL timeline {}", tl.timeline),
                        items,
                        group_start: false,
                    });
                }
                if v.wal.is_empty() {
                    lanes.push(Lane {
                        label: format!("{name} · WAL (none yet)"),
                        items: Vec::new(),
                        group_start: false,
                    });
                }
            }
            None => lanes.push(Lane {
                label: format!("{name} · WAL (not read yet)"),
                items: Vec::new(),
                group_start: false,
            }),
        }
    }
    if archive_failed_count > 0 {
        if let (Some(w), Some(t)) = (&last_failed_wal, last_failed_time) {
            if last_archived_time.is_none_or(|a| t > a) {
                alarms.push(format!(
                    "WAL archiving is failing: {w} could not be archived (last attempt {})",
                    charts::utc(t, true)
                ));
            }
        }
    }
    for a in &alarms {
        let _ = write!(p, "<div class=\"alarm\">⚠ {}</div>", esc(a));
    }
    if backups.is_empty() && failed.is_empty() && lanes.iter().all(|l| l.items.is_empty()) {
        p.push_str("<div class=\"empty\">No backup and no archived WAL yet: the timeline starts with the first backup (backup.backup_run() or a job).</div>");
    } else {
        let pins: Vec<Pin> = points
            .iter()
            .map(|(n, t, _)| {
                t_min = t_min.min(*t);
                Pin {
                    t: *t,
                    label: n.clone(),
                    color: charts::PURPLE,
                }
            })
            .collect();
        let t0 = t_min.max(since);
        p.push_str("<div class=\"card\">");
        p.push_str(&charts::timeline(
            "Timeline of backups, WAL coverage, restore points and the restorable window",
            t0,
            now,
            &lanes,
            &pins,
            1340.0,
        ));
        p.push_str(&charts::legend(&[
            (charts::BLUE, "box", "full backup"),
            (charts::ORANGE, "box", "differential"),
            (charts::SKY, "box", "incremental"),
            ("#555", "line", "chain: linked to its base"),
            (charts::RED, "cross", "failed run"),
            (charts::PURPLE, "pin", "restore point"),
            (charts::GREEN, "band", "restorable window"),
            (charts::GREEN, "box", "WAL archived (approximate times)"),
            (charts::RED, "hatch", "WAL gap"),
        ]));
        let _ = write!(
            p,
            "<div class=\"note\">Bars run from a backup's start to its end. WAL is stored by segment, which carries no time: \
             a segment is placed by interpolating between the positions (LSN) and times the catalog knows \
             (backups' start and end, restore points, the last archived segment, now), so WAL times are approximate. \
             The last {} days are shown.</div></div>",
            TIMELINE_DAYS
        );
    }

    // (e) RPO against its target.
    p.push_str("<div class=\"grid2\"><div>");
    p.push_str("<h2>RPO against its target</h2>");
    let rpo = bucketed(
        db,
        "RPO samples",
        "backup.rpo_samples",
        "max(extract(epoch FROM rpo))::float8",
        "rpo IS NOT NULL",
        since,
        now,
    )?;
    if rpo.is_empty() {
        p.push_str(
            "<div class=\"empty\">No RPO sample yet: the scheduler takes one a minute.</div>",
        );
    } else {
        let t0 = rpo.iter().map(|r| r.1).fold(now, f64::min);
        p.push_str("<div class=\"card\">");
        p.push_str(&rpo_chart(
            "RPO over time against the target",
            &rpo,
            (t0, now),
            rpo_target,
            (650.0, 240.0),
        ));
        p.push_str("<div class=\"note\">The worst RPO of each interval: the age of the newest WAL a repository holds while WAL was being written.</div></div>");
    }
    p.push_str("</div><div>");

    // (d) backup durations by kind.
    p.push_str("<h2>Backup durations</h2>");
    let durs = query(
        db,
        "backup durations",
        "SELECT kind, status, extract(epoch FROM finished_at)::float8,
                extract(epoch FROM finished_at - started_at)::float8
           FROM backup.backup_executions
          WHERE started_at IS NOT NULL AND finished_at > to_timestamp($1)
            AND status IN ('succeeded', 'failed')
          ORDER BY finished_at DESC LIMIT 2000",
        &[&since],
    )?;
    if durs.is_empty() {
        p.push_str("<div class=\"empty\">No backup has run in the last days.</div>");
    } else {
        let mut series: Vec<Series> = Vec::new();
        for (kind, color) in [
            ("full", charts::BLUE),
            ("diff", charts::ORANGE),
            ("incr", charts::SKY),
        ] {
            let pts = durs
                .iter()
                .filter_map(|r| {
                    let (k, s, t, d): (String, String, f64, f64) = (
                        get(r, 0).ok()?,
                        get(r, 1).ok()?,
                        get(r, 2).ok()?,
                        get(r, 3).ok()?,
                    );
                    (k == kind && s == "succeeded").then_some((t, d))
                })
                .collect::<Vec<_>>();
            if !pts.is_empty() {
                series.push(Series {
                    label: kind.into(),
                    color,
                    points: pts,
                    dash: None,
                    marker: charts::Marker::Dot,
                    line: true,
                });
            }
        }
        let fails: Vec<(f64, f64)> = durs
            .iter()
            .filter_map(|r| {
                let (s, t, d): (String, f64, f64) =
                    (get(r, 1).ok()?, get(r, 2).ok()?, get(r, 3).ok()?);
                (s == "failed").then_some((t, d))
            })
            .collect();
        if !fails.is_empty() {
            series.push(Series {
                label: "failed".into(),
                color: charts::RED,
                points: fails,
                dash: None,
                marker: charts::Marker::Cross,
                line: false,
            });
        }
        let t0 = durs
            .iter()
            .filter_map(|r| get::<f64>(r, 2).ok())
            .fold(now, f64::min);
        p.push_str("<div class=\"card\">");
        p.push_str(&charts::line_chart(
            "Backup durations over time by kind",
            t0,
            now,
            &series,
            &[],
            charts::Unit::Seconds,
            (650.0, 240.0),
        ));
        let leg: Vec<(&str, &str, &str)> = series
            .iter()
            .map(|s| {
                (
                    s.color,
                    if s.marker == charts::Marker::Cross {
                        "cross"
                    } else {
                        "line"
                    },
                    s.label.as_str(),
                )
            })
            .collect();
        p.push_str(&charts::legend(&leg));
        p.push_str("<div class=\"note\">Seconds from start to end of each run, at its end time.</div></div>");
    }
    p.push_str("</div></div>");

    // (c) storage per repository.
    p.push_str("<h2>Storage per repository</h2>");
    let usage = storage_history(db, since.min(now - 30.0 * 86400.0), now)?;
    p.push_str("<div class=\"grid2\">");
    for name in &repo_names {
        let st = repos.iter().find(|r| &r.name == name);
        let _ = write!(
            p,
            "<div class=\"card\"><h3>{} <span class=\"sub\">{} {}</span> {}</h3>",
            esc(name),
            esc(st.map(|s| s.kind.as_str()).unwrap_or("")),
            esc(st.map(|s| s.location.as_str()).unwrap_or("")),
            st.map(|s| charts::badge(&s.status)).unwrap_or_default()
        );
        if let Some(e) = st.and_then(|s| s.error.as_deref()) {
            let _ = write!(p, "<div class=\"note\">{}</div>", esc(e));
        }
        let mine: Vec<&UsageSample> = usage.iter().filter(|u| &u.0 == name).collect();
        if mine.is_empty() {
            p.push_str("<div class=\"empty\">No storage sample yet: the scheduler records one when it refreshes repository status.</div></div>");
            continue;
        }
        let mut series = vec![Series {
            label: "stored".into(),
            color: charts::BLUE,
            points: mine.iter().map(|u| (u.1, u.2)).collect(),
            dash: None,
            marker: charts::Marker::None,
            line: true,
        }];
        let cap: Vec<(f64, f64)> = mine.iter().filter_map(|u| Some((u.1, u.3?))).collect();
        let used: Vec<(f64, f64)> = mine
            .iter()
            .filter_map(|u| Some((u.1, u.3? - u.4?)))
            .collect();
        let mut hl = Vec::new();
        if let Some(c) = cap.last() {
            series.push(Series {
                label: "used (all files on the volume)".into(),
                color: charts::ORANGE,
                points: used,
                dash: Some("4 3"),
                marker: charts::Marker::None,
                line: true,
            });
            hl.push(charts::HLine {
                value: c.1,
                label: format!("capacity {}", charts::bytes(c.1)),
                color: charts::RED,
            });
        }
        // The figures now, in words: a few MiB stored under a capacity
        // of hundreds of GiB is a flat line on the chart.
        if let Some(last) = mine.last() {
            let room = match (last.3, last.4) {
                (Some(c), Some(f)) if c > 0.0 => format!(
                    " · {} free of {} ({:.1} % used)",
                    charts::bytes(f),
                    charts::bytes(c),
                    100.0 * (c - f) / c
                ),
                _ => " · capacity unknown".into(),
            };
            let _ = write!(
                p,
                "<div class=\"note\"><b>{} stored</b>{}</div>",
                esc(&charts::bytes(last.2)),
                esc(&room)
            );
        }
        let t0 = mine.iter().map(|u| u.1).fold(now, f64::min);
        p.push_str(&charts::line_chart(
            &format!("Storage of {name} over time"),
            t0,
            now,
            &series,
            &hl,
            charts::Unit::Bytes,
            (650.0, 220.0),
        ));
        let mut leg: Vec<(&str, &str, &str)> =
            vec![(charts::BLUE, "line", "bytes stored by walshipper")];
        if !hl.is_empty() {
            leg.push((charts::ORANGE, "dash", "used on the volume or quota"));
            leg.push((charts::RED, "dash", "capacity"));
        } else {
            leg.push((charts::GREY, "box", "capacity unknown"));
        }
        p.push_str(&charts::legend(&leg));
        p.push_str("</div>");
    }
    p.push_str("</div>");

    // (f) open alerts.
    p.push_str("<h2>Open alerts</h2>");
    if alerts.is_empty() {
        p.push_str("<div class=\"empty\">No open alert.</div>");
    } else {
        p.push_str("<table><tr><th>severity</th><th>kind</th><th>subject</th><th>message</th><th>since (UTC)</th></tr>");
        for r in &alerts {
            let sev: String = get(r, 0)?;
            let acked: bool = get(r, 5)?;
            let _ = write!(
                p,
                "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                charts::badge(&sev),
                if acked { " acknowledged" } else { "" },
                esc(&get::<String>(r, 1)?),
                esc(&get::<String>(r, 2)?),
                esc(&get::<String>(r, 3)?),
                esc(&charts::utc(get(r, 4)?, false)),
            );
        }
        p.push_str("</table>");
        if n_open > alerts.len() as i64 {
            let _ = write!(
                p,
                "<div class=\"note\">and {} more (backup.alerts)</div>",
                n_open - alerts.len() as i64
            );
        }
    }
    p.push_str("<div class=\"note\">Read-only page. Act through SQL: backup.backup_run(), backup.alert_ack(), backup.compliance_report(); the compliance report: <a href=\"/report\">/report</a>.</div></body></html>");
    Ok(p)
}

/// (repository, bucket time, value) from `table`'s samples in `from..to`,
/// about CHART_POINTS buckets, `agg` over each.
pub(super) fn bucketed(
    db: &mut postgres::Client,
    what: &str,
    table: &str,
    agg: &str,
    filter: &str,
    from: f64,
    to: f64,
) -> Result<Vec<(String, f64, f64)>> {
    let width = ((to - from) / CHART_POINTS).max(60.0);
    // table, agg and filter are this module's constants, never input.
    let sql = format!(
        "SELECT repository, max(extract(epoch FROM sampled_at))::float8, {agg}
           FROM {table}
          WHERE sampled_at >= to_timestamp($1) AND sampled_at <= to_timestamp($2) AND {filter}
          GROUP BY 1, floor(extract(epoch FROM sampled_at)::float8 / $3::float8) ORDER BY 1, 2 LIMIT 20000"
    );
    query(db, what, &sql, &[&from, &to, &width])?
        .iter()
        .map(|r| Ok((get(r, 0)?, get(r, 1)?, get(r, 2)?)))
        .collect()
}

/// Repository usage samples in `from..to` (thinned): (repository, time,
/// stored, capacity, free).
pub(super) fn storage_history(
    db: &mut postgres::Client,
    from: f64,
    to: f64,
) -> Result<Vec<UsageSample>> {
    let width = ((to - from) / CHART_POINTS).max(60.0);
    query(
        db,
        "storage history",
        "SELECT repository, max(extract(epoch FROM sampled_at))::float8,
                max(stored_bytes)::float8, max(capacity_bytes)::float8, min(free_bytes)::float8
           FROM backup.repository_usage
          WHERE sampled_at >= to_timestamp($1) AND sampled_at <= to_timestamp($2)
          GROUP BY 1, floor(extract(epoch FROM sampled_at)::float8 / $3::float8) ORDER BY 1, 2 LIMIT 20000",
        &[&from, &to, &width],
    )?
    .iter()
    .map(|r| Ok((get(r, 0)?, get(r, 1)?, get(r, 2)?, get(r, 3)?, get(r, 4)?)))
    .collect()
}

/// One line per repository from (repository, time, value) rows.
pub(super) fn series_by_repo(rows: &[(String, f64, f64)], colors: &[&'static str]) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for (repo, t, v) in rows {
        match out.iter_mut().find(|s| &s.label == repo) {
            Some(s) => s.points.push((*t, *v)),
            None => out.push(Series {
                label: repo.clone(),
                color: colors[out.len() % colors.len().max(1)],
                points: vec![(*t, *v)],
                dash: None,
                marker: charts::Marker::None,
                line: true,
            }),
        }
    }
    out
}

/// The RPO of each repository over time (`rows`: repository, time, RPO in
/// seconds) against the target, with its legend: the dashboard's and the
/// report's chart.
pub(super) fn rpo_chart(
    title: &str,
    rows: &[(String, f64, f64)],
    (from, to): (f64, f64),
    target: f64,
    size: (f64, f64),
) -> String {
    let series = series_by_repo(
        rows,
        &[charts::BLUE, charts::ORANGE, charts::SKY, charts::GREEN],
    );
    let mut out = charts::line_chart(
        title,
        from,
        to,
        &series,
        &[charts::HLine {
            value: target,
            label: format!("target {}", charts::duration(target)),
            color: charts::RED,
        }],
        charts::Unit::Seconds,
        size,
    );
    let mut leg: Vec<(&str, &str, &str)> = series
        .iter()
        .map(|s| (s.color, "line", s.label.as_str()))
        .collect();
    leg.push((charts::RED, "dash", "RPO target"));
    out.push_str(&charts::legend(&leg));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_clock_interpolates_and_clamps() {
        let c = LsnClock::new(vec![(100.0, 10.0), (300.0, 30.0), (200.0, 5.0)]);
        // (200, 5) ran backwards: it takes the time before it.
        assert_eq!(c.time(50.0), Some(10.0));
        assert_eq!(c.time(250.0), Some(20.0));
        assert_eq!(c.time(1000.0), Some(30.0));
        assert_eq!(LsnClock::new(vec![]).time(1.0), None);
    }
}
