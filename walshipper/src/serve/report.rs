//! The compliance report as a printable HTML document with charts, from
//! backup.compliance_report() and the catalog's history: served at
//! `/report` and written by `walshipper report`.

use std::fmt::Write;

use chrono::{DateTime, NaiveDate, Utc};

use super::charts::{self, esc, tile};
use super::dashboard::{
    bucketed, get, query, rpo_chart, series_by_repo, storage_history, system_identifier,
};
use crate::error::{Error, Result};

/// The sections of backup.compliance_report(), in the order they are shown.
pub const SECTIONS: [(&str, &str); 9] = [
    ("summary", "Summary"),
    ("schedule", "Schedule compliance"),
    ("backups", "Backups and success rate"),
    ("recovery_objectives", "Recovery objectives (RPO, RTO)"),
    ("verification", "Verifications and restore tests"),
    ("retention", "Retention and oldest restorable point"),
    ("encryption", "Encryption and key age"),
    ("storage", "Storage use and growth"),
    ("alerts", "Alerts: open and resolved"),
];

/// The longest period a report covers: the catalog's history is not kept
/// longer, and a bigger one is more likely a typo than a wish.
const MAX_PERIOD_DAYS: i64 = 3 * 366;

fn parse_one(what: &str, s: &str) -> Result<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        if let Some(t) = d.and_hms_opt(0, 0, 0) {
            return Ok(t.and_utc());
        }
    }
    Err(Error::Invalid(format!(
        "{what} {:?} is neither a date (YYYY-MM-DD, midnight UTC) nor a time with a zone (RFC 3339, e.g. 2026-11-01T00:00:00Z)",
        s.chars().take(64).collect::<String>()
    )))
}

/// The period a request or the command line asks for: `from` and `to` as
/// dates or times with a zone; defaults: the last 30 days up to now.
pub fn parse_period(
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(DateTime<Utc>, DateTime<Utc>)> {
    let to = match to.filter(|s| !s.trim().is_empty()) {
        Some(s) => parse_one("to", s)?,
        None => Utc::now(),
    };
    let from = match from.filter(|s| !s.trim().is_empty()) {
        Some(s) => parse_one("from", s)?,
        None => to - chrono::Duration::days(30),
    };
    if to <= from {
        return Err(Error::Invalid(format!(
            "the period ends ({}) before it starts ({}): give --to after --from",
            to.to_rfc3339(),
            from.to_rfc3339()
        )));
    }
    if to - from > chrono::Duration::days(MAX_PERIOD_DAYS) {
        return Err(Error::Invalid(format!(
            "the period from {} to {} is longer than {MAX_PERIOD_DAYS} days: report on three years at most",
            from.date_naive(),
            to.date_naive()
        )));
    }
    Ok((from, to))
}

struct Row {
    section: String,
    subject: String,
    item: String,
    value: String,
    status: String,
    detail: Option<serde_json::Value>,
}

fn rank(status: &str) -> u8 {
    match status {
        "failed" => 3,
        "warning" => 2,
        "ok" => 1,
        _ => 0,
    }
}

/// A row's machine-readable extras as short text (`key: value; …`).
fn detail_text(v: &serde_json::Value) -> String {
    let one = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let s = match v {
        serde_json::Value::Object(m) if m.is_empty() => String::new(),
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}: {}", one(v)))
            .collect::<Vec<_>>()
            .join("; "),
        serde_json::Value::Null => String::new(),
        other => one(other),
    };
    if s.chars().count() > 400 {
        format!("{}…", s.chars().take(400).collect::<String>())
    } else {
        s
    }
}

const PRINT_CSS: &str = "\
body{max-width:1100px;margin:0 auto}\
.cover{border-bottom:3px solid #222;padding-bottom:8px;margin-bottom:10px}\
.charts .card{break-inside:avoid}\
td.item{font-family:'DejaVu Sans Mono',monospace;font-size:12px}\
td.detail{color:#444;font-size:12px}\
@page{size:A4;margin:14mm}\
@media print{body{background:#fff;padding:0;max-width:none;font-size:11px}\
h2.section{break-before:page;page-break-before:always}\
table,.card,.tile{break-inside:avoid}svg.chart{max-width:100%;height:auto}\
.tile .v{font-size:20px}}";

/// The document for the period.
pub fn render(db: &mut postgres::Client, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<String> {
    let (f, t) = (
        from.timestamp_millis() as f64 / 1000.0,
        to.timestamp_millis() as f64 / 1000.0,
    );
    let rows: Vec<Row> = query(
        db,
        "the compliance report",
        "SELECT section, coalesce(subject, ''), coalesce(item, ''), coalesce(value, ''),
                coalesce(status, 'info'), detail::text
           FROM backup.compliance_report(to_timestamp($1), to_timestamp($2))",
        &[&f, &t],
    )?
    .iter()
    .map(|r| {
        let detail: Option<String> = get(r, 5)?;
        Ok(Row {
            section: get(r, 0)?,
            subject: get(r, 1)?,
            item: get(r, 2)?,
            value: get(r, 3)?,
            status: get(r, 4)?,
            detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
        })
    })
    .collect::<Result<_>>()?;
    let now = super::dashboard::now_epoch();
    // The summary carries it when pg_control_system() is granted to the
    // function's caller; else ask directly.
    let sysid = rows
        .iter()
        .find(|r| r.section == "summary" && r.item == "system_identifier")
        .and_then(|r| {
            r.detail
                .as_ref()?
                .get("system_identifier")?
                .as_str()
                .map(String::from)
        })
        .or_else(|| system_identifier(db));

    let mut p = String::with_capacity(64 * 1024);
    let _ = write!(
        p,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Backup compliance report {} to {}</title><style>{}{}</style></head><body>\
         <div class=\"cover\"><h1>Backup compliance report</h1>\
         <div class=\"sub\">cluster (system identifier) <b>{}</b><br>\
         period <b>{}</b> to <b>{}</b><br>generated {} by walshipper {} from the pg_backup catalog \
         (backup.compliance_report)</div></div>",
        esc(&charts::utc(f, false)),
        esc(&charts::utc(t, false)),
        charts::BASE_CSS,
        PRINT_CSS,
        esc(sysid.as_deref().unwrap_or("not readable by this role")),
        esc(&charts::utc(f, true)),
        esc(&charts::utc(t, true)),
        esc(&charts::utc(now, true)),
        esc(env!("CARGO_PKG_VERSION")),
    );

    // The summary block: the verdict (the function's `overall` row, else
    // the worst status of all), then the figures an auditor asks first.
    let overall = rows
        .iter()
        .find(|r| r.section == "summary" && r.item == "overall");
    let worst = match overall {
        Some(o) => rank(&o.status),
        None => rows.iter().map(|r| rank(&r.status)).max().unwrap_or(0),
    };
    let (verdict, class) = match worst {
        3 => ("FAILED", "t-fail"),
        2 => ("WARNING", "t-warn"),
        1 => ("OK", "t-ok"),
        _ => ("NO DATA", "t-warn"),
    };
    let counts = |s: &str| rows.iter().filter(|r| r.status == s).count();
    p.push_str("<div class=\"big\">");
    tile(
        &mut p,
        "overall status",
        verdict,
        &format!(
            "{} ok · {} warning · {} failed",
            counts("ok"),
            counts("warning"),
            counts("failed")
        ),
        class,
    );
    // Success rate: the backups section's runs and successes, summed.
    let sum = |key: &str| -> f64 {
        rows.iter()
            .filter(|r| r.section == "backups")
            .filter_map(|r| r.detail.as_ref()?.get(key)?.as_f64())
            .sum()
    };
    let (runs, ok) = (sum("runs"), sum("succeeded"));
    if runs > 0.0 {
        tile(
            &mut p,
            "backup success rate",
            &format!("{:.1} %", 100.0 * ok / runs),
            &format!("{ok} of {runs} runs succeeded"),
            if ok < runs { "t-warn" } else { "t-ok" },
        );
    } else {
        tile(
            &mut p,
            "backup success rate",
            "—",
            "no backup ran",
            "t-warn",
        );
    }
    // RPO and RTO: met where measured, per repository.
    for (item, label) in [("rpo", "RPO met"), ("rto", "RTO met")] {
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| r.section == "recovery_objectives" && r.item == item)
            .collect();
        let measured = mine.iter().filter(|r| r.status != "info").count();
        let met = mine.iter().filter(|r| r.status == "ok").count();
        if measured == 0 {
            tile(&mut p, label, "not measured", "in this period", "t-warn");
        } else {
            tile(
                &mut p,
                label,
                &format!("{met} of {measured}"),
                "repositories measured",
                if met < measured { "t-fail" } else { "t-ok" },
            );
        }
    }
    let tests: Vec<&Row> = rows
        .iter()
        .filter(|r| r.section == "verification" && r.item == "restore_test")
        .collect();
    let field = |r: &Row, k: &str| {
        r.detail
            .as_ref()
            .and_then(|d| d.get(k)?.as_f64())
            .unwrap_or(0.0)
    };
    let (done, passed) = (
        tests.iter().map(|r| field(r, "done")).sum::<f64>(),
        tests.iter().map(|r| field(r, "passed")).sum::<f64>(),
    );
    tile(
        &mut p,
        "restore tests passed",
        &format!("{passed} of {done}"),
        if done > 0.0 {
            "in this period"
        } else {
            "none in this period"
        },
        if done == 0.0 || passed < done {
            "t-warn"
        } else {
            "t-ok"
        },
    );
    p.push_str("</div>");
    if let Some(o) = overall {
        let _ = write!(p, "<p class=\"note\">{}</p>", esc(&o.value));
    }

    // Charts over the period.
    p.push_str("<div class=\"charts\"><h2>The period in pictures</h2>");
    let days = query(
        db,
        "backups per day",
        "SELECT (floor(extract(epoch FROM finished_at)::float8 / 86400) * 86400)::float8,
                count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status = 'failed')
           FROM backup.backup_executions
          WHERE finished_at >= to_timestamp($1) AND finished_at < to_timestamp($2)
          GROUP BY 1 ORDER BY 1",
        &[&f, &t],
    )?;
    let per_day: std::collections::HashMap<i64, (i64, i64)> = days
        .iter()
        .map(|r| Ok(((get::<f64>(r, 0)? as i64), (get(r, 1)?, get(r, 2)?))))
        .collect::<Result<_>>()?;
    let first_day = (f / 86400.0).floor() as i64;
    let last_day = ((t - 1.0) / 86400.0).floor() as i64;
    let bars: Vec<charts::DayBar> = (first_day..=last_day)
        .map(|d| {
            let (ok, bad) = per_day.get(&(d * 86400)).copied().unwrap_or((0, 0));
            (
                (d * 86400) as f64,
                vec![
                    (ok as f64, charts::GREEN, "succeeded".to_string()),
                    (bad as f64, charts::RED, "failed".to_string()),
                ],
            )
        })
        .collect();
    p.push_str("<div class=\"card\"><h3>Backups per day</h3>");
    if per_day.is_empty() {
        p.push_str("<div class=\"empty\">No backup ran in this period.</div>");
    } else {
        p.push_str(&charts::day_bars(
            "Backups per day: succeeded and failed",
            &bars,
            1040.0,
            220.0,
        ));
        p.push_str(&charts::legend(&[
            (charts::GREEN, "box", "succeeded"),
            (charts::RED, "box", "failed"),
        ]));
    }
    p.push_str("</div>");

    p.push_str("<div class=\"card\"><h3>Storage over the period</h3>");
    let usage = storage_history(db, f, t)?;
    if usage.is_empty() {
        p.push_str("<div class=\"empty\">No storage sample in this period.</div>");
    } else {
        let flat: Vec<(String, f64, f64)> = usage.iter().map(|u| (u.0.clone(), u.1, u.2)).collect();
        let colors = [charts::BLUE, charts::ORANGE, charts::SKY, charts::GREEN];
        let mut series = series_by_repo(&flat, &colors);
        let mut hl = Vec::new();
        // One capacity line per repository that has one (its latest).
        for s in series.iter_mut() {
            if let Some(c) = usage
                .iter()
                .rev()
                .find(|u| u.0 == s.label)
                .and_then(|u| u.3)
            {
                hl.push(charts::HLine {
                    value: c,
                    label: format!("{} capacity {}", s.label, charts::bytes(c)),
                    color: charts::RED,
                });
            }
            s.label = format!("{} stored", s.label);
        }
        p.push_str(&charts::line_chart(
            "Bytes stored per repository",
            f,
            t,
            &series,
            &hl,
            charts::Unit::Bytes,
            (1040.0, 240.0),
        ));
        let mut leg: Vec<(&str, &str, &str)> = series
            .iter()
            .map(|s| (s.color, "line", s.label.as_str()))
            .collect();
        if !hl.is_empty() {
            leg.push((charts::RED, "dash", "capacity"));
        }
        p.push_str(&charts::legend(&leg));
    }
    p.push_str("</div>");

    p.push_str("<div class=\"card\"><h3>RPO over the period against the target</h3>");
    let rpo = bucketed(
        db,
        "RPO samples",
        "backup.rpo_samples",
        "max(extract(epoch FROM rpo))::float8",
        "rpo IS NOT NULL",
        f,
        t,
    )?;
    let target: f64 = query(
        db,
        "the RPO target",
        "SELECT extract(epoch FROM rpo_target)::float8 FROM backup.wal_archive_status",
        &[],
    )?
    .first()
    .map(|r| get::<Option<f64>>(r, 0))
    .transpose()?
    .flatten()
    .unwrap_or(900.0);
    if rpo.is_empty() {
        p.push_str("<div class=\"empty\">No RPO sample in this period.</div>");
    } else {
        p.push_str(&rpo_chart(
            "RPO per repository against the target",
            &rpo,
            (f, t),
            target,
            (1040.0, 240.0),
        ));
    }
    p.push_str("</div></div>");

    // Every section, in the fixed order, then any the function adds later.
    let mut names: Vec<(String, String)> = SECTIONS
        .iter()
        .map(|(k, t)| (k.to_string(), t.to_string()))
        .collect();
    for r in &rows {
        if !names.iter().any(|(k, _)| k == &r.section) {
            names.push((r.section.clone(), r.section.replace('_', " ")));
        }
    }
    for (key, title) in &names {
        let mine: Vec<&Row> = rows.iter().filter(|r| &r.section == key).collect();
        let worst = mine.iter().map(|r| rank(&r.status)).max().unwrap_or(0);
        let status = ["info", "ok", "warning", "failed"][worst as usize];
        let _ = write!(
            p,
            "<h2 class=\"section\" id=\"{}\">{} {}</h2>",
            esc(key),
            esc(title),
            charts::badge(status)
        );
        if mine.is_empty() {
            p.push_str("<div class=\"empty\">Nothing to report for this period.</div>");
            continue;
        }
        p.push_str("<table><tr><th>subject</th><th>item</th><th>value</th><th>status</th><th>details</th></tr>");
        for r in mine {
            let _ = write!(
                p,
                "<tr><td>{}</td><td class=\"item\">{}</td><td>{}</td><td>{}</td><td class=\"detail\">{}</td></tr>",
                esc(&r.subject),
                esc(&r.item),
                esc(&r.value),
                charts::badge(&r.status),
                esc(&r.detail.as_ref().map(detail_text).unwrap_or_default())
            );
        }
        p.push_str("</table>");
    }
    p.push_str("<p class=\"note\">Statuses: ok = met; warning = met with a finding to look at; failed = not met; info = for the record. \
                Times in UTC. The rows are backup.compliance_report(period_start, period_end); the same report is served by walshipper serve at /report.</p></body></html>");
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods() {
        let (f, t) = parse_period(Some("2026-11-01"), Some("2026-12-01")).unwrap();
        assert_eq!(f.to_rfc3339(), "2026-11-01T00:00:00+00:00");
        assert_eq!(t.to_rfc3339(), "2026-12-01T00:00:00+00:00");
        let (f, _) = parse_period(Some("2026-11-01T10:00:00+02:00"), Some("2026-11-02")).unwrap();
        assert_eq!(f.to_rfc3339(), "2026-11-01T08:00:00+00:00");
        let (f, t) = parse_period(None, None).unwrap();
        assert_eq!((t - f).num_days(), 30);
        for (a, b) in [
            (Some("2026-12-01"), Some("2026-11-01")),
            (Some("2026-11-01"), Some("2026-11-01")),
            (Some("2020-01-01"), Some("2026-01-01")),
            (Some("yesterday"), None),
            (Some("2026-13-01"), None),
            (None, Some("<script>")),
        ] {
            let e = parse_period(a, b).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{a:?} {b:?}: {e}");
        }
    }

    #[test]
    fn details_are_short_text() {
        let v: serde_json::Value = serde_json::json!({"a": 1, "b": "x"});
        assert_eq!(detail_text(&v), "a: 1; b: x");
        assert_eq!(detail_text(&serde_json::json!({})), "");
    }
}
