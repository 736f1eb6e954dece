//! Cron schedules in a time zone: validation and the next run time. Plain
//! Rust, so it is unit-tested without a server; lib.rs exposes it to SQL.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// A schedule problem, phrased for a DBA.
#[derive(Debug, PartialEq, Eq)]
pub struct ScheduleError {
    pub message: String,
    pub hint: String,
}

pub fn parse_cron(expr: &str) -> Result<Cron, ScheduleError> {
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(ScheduleError {
            message: format!("invalid cron schedule \"{expr}\": it has {fields} fields, not 5"),
            hint: "Use minute hour day-of-month month day-of-week, e.g. '30 2 * * *' for 02:30 every day.".into(),
        });
    }
    Cron::from_str(expr).map_err(|e| ScheduleError {
        message: format!("invalid cron schedule \"{expr}\": {e}"),
        hint:
            "Use minute hour day-of-month month day-of-week, e.g. '30 2 * * *' for 02:30 every day."
                .into(),
    })
}

pub fn parse_tz(name: &str) -> Result<Tz, ScheduleError> {
    Tz::from_str(name).map_err(|_| ScheduleError {
        message: format!("unknown time zone \"{name}\""),
        hint: "Use an IANA name such as 'UTC' or 'Europe/Berlin' (see pg_timezone_names).".into(),
    })
}

/// The first run strictly after `after`, evaluating the schedule in `tz`.
pub fn next_run(
    expr: &str,
    tz: &str,
    after: DateTime<Utc>,
) -> Result<DateTime<Utc>, ScheduleError> {
    let cron = parse_cron(expr)?;
    let zone = parse_tz(tz)?;
    let local = zone.from_utc_datetime(&after.naive_utc());
    let next = cron
        .find_next_occurrence(&local, false)
        .map_err(|e| ScheduleError {
            message: format!("cron schedule \"{expr}\" never runs: {e}"),
            hint: "Check day-of-month and month: e.g. '0 0 31 2 *' (31 February) never happens."
                .into(),
        })?;
    Ok(next.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn next_runs() {
        assert_eq!(
            next_run("30 2 * * *", "UTC", at("2026-11-21T10:00:00Z")).unwrap(),
            at("2026-11-22T02:30:00Z")
        );
        assert_eq!(
            next_run("* * * * *", "UTC", at("2026-11-21T10:00:00Z")).unwrap(),
            at("2026-11-21T10:01:00Z")
        );
        // 02:30 in Berlin is 01:30 UTC in winter.
        assert_eq!(
            next_run("30 2 * * *", "Europe/Berlin", at("2026-11-21T10:00:00Z")).unwrap(),
            at("2026-11-22T01:30:00Z")
        );
        assert_eq!(
            next_run("0 0 * * 1", "UTC", at("2026-11-21T10:00:00Z")).unwrap(),
            at("2026-11-23T00:00:00Z")
        );
    }

    #[test]
    fn bad_input_is_explained() {
        assert!(parse_cron("* * *")
            .unwrap_err()
            .message
            .contains("3 fields"));
        assert!(parse_cron("61 * * * *").is_err());
        assert!(parse_cron("every day").is_err());
        assert!(parse_tz("Mars/Olympus")
            .unwrap_err()
            .message
            .contains("unknown time zone"));
    }
}
