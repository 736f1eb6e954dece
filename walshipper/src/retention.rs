//! Retention: decides which backups of a repository to keep and which to
//! remove, given retention policies. [`decide`] is a pure function: it reads
//! no clock (the caller passes `now`) and touches no storage.
//!
//! Rules, in the order their reasons are listed:
//!
//! 1. **Empty policy** ([`Policy::is_empty`]): every backup is kept
//!    ("no retention policy"). `keep_full = Some(0)`, a zero or negative
//!    `recovery_window` and GFS counts of 0 all count as "not set".
//! 2. **Always kept:** the newest backup (greatest `stop_time`, then greatest
//!    id) is kept ("newest backup"), and so is every backup whose `stop_time`
//!    is after `now` ("newer than now").
//! 3. **`keep_full = N`:** the N newest Full backups are kept ("last N full"),
//!    and so is every backup that depends on one of them, directly or
//!    transitively, i.e. its diff/incr chain ("built on kept full <id>").
//! 4. **`recovery_window = D`:** every backup with `stop_time >= now - D` is
//!    kept ("recovery window"), plus the newest backup with
//!    `stop_time < now - D` ("start of recovery window"), since the window's
//!    earliest moment is restored from it. If there is none, nothing extra.
//! 5. **GFS** (restic's semantics): for each level (daily, weekly, monthly,
//!    yearly) with a count N > 0, backups of every kind are grouped by their
//!    period in `timezone`: the local date, the ISO week (Monday start, so
//!    2026-12-31 and 2027-01-01 are both in 2026-W53), the local year-month,
//!    the local year. The newest backup of each period represents it, and the
//!    representatives of the N newest periods that hold a backup are kept
//!    (periods without backups do not count): "daily 2026-11-21",
//!    "weekly 2026-W47", "monthly 2026-11", "yearly 2026".
//! 6. **Dependencies:** everything a kept backup needs for restore (the
//!    transitive closure of `depends_on`) is kept too ("needed by <id>").
//!    Ids in `depends_on` that are not in the list are ignored: they are not
//!    in the repository. Dependency cycles are tolerated.
//! 7. Policies combine as a union: a backup is removed only if no rule keeps
//!    it.
//!
//! Ids are expected to be unique; if one repeats, its first entry counts.
//!
//! Durations are written as [`parse_duration`] reads them and
//! [`format_duration`] writes them: "30s", "90min", "36h", "7d", "2w" and
//! sums such as "1d12h"; a plain integer is a number of seconds.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;

use chrono::{DateTime, Datelike, Duration, Utc};
use chrono_tz::Tz;

/// The type of a backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Full,
    Diff,
    Incr,
}

/// What retention needs to know about one backup.
#[derive(Clone, Debug)]
pub struct BackupRef {
    /// Backup id; ids sort by time, e.g. "20261121-101500F".
    pub id: String,
    pub kind: Kind,
    /// When the backup became consistent.
    pub stop_time: DateTime<Utc>,
    /// Ids of the backups this one directly needs for restore.
    pub depends_on: Vec<String>,
}

/// Retention policies; see the module documentation for their rules.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Keep the N newest Full backups and their chains (`Some(0)` = not set).
    pub keep_full: Option<u32>,
    /// Keep what is needed to restore to any moment in the last D
    /// (zero or negative = not set).
    pub recovery_window: Option<Duration>,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    /// Time zone in which GFS periods (days, weeks, months, years) are cut.
    pub timezone: Tz,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            keep_full: None,
            recovery_window: None,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
            keep_yearly: 0,
            timezone: Tz::UTC,
        }
    }
}

impl Policy {
    /// True if no policy is set at all, in which case everything is kept.
    pub fn is_empty(&self) -> bool {
        self.full_count().is_none()
            && self.window().is_none()
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
            && self.keep_yearly == 0
    }

    fn full_count(&self) -> Option<u32> {
        self.keep_full.filter(|&n| n > 0)
    }

    fn window(&self) -> Option<Duration> {
        self.recovery_window.filter(|d| *d > Duration::zero())
    }
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Kept backup id -> why (one or more short reasons), for every kept backup.
    pub keep: BTreeMap<String, Vec<String>>,
    /// Backups no policy keeps, oldest (by stop_time, then id) first.
    pub remove: Vec<String>,
}

/// A GFS level.
#[derive(Clone, Copy)]
enum Level {
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Daily => "daily",
            Level::Weekly => "weekly",
            Level::Monthly => "monthly",
            Level::Yearly => "yearly",
        }
    }

    /// The period `t` falls in, in `tz`: a key that sorts by time, and its label.
    fn period(self, t: DateTime<Utc>, tz: Tz) -> ((i32, u32, u32), String) {
        let local = t.with_timezone(&tz);
        match self {
            Level::Daily => {
                let (y, m, d) = (local.year(), local.month(), local.day());
                ((y, m, d), format!("{y:04}-{m:02}-{d:02}"))
            }
            Level::Weekly => {
                let w = local.iso_week();
                let (y, n) = (w.year(), w.week());
                ((y, n, 0), format!("{y:04}-W{n:02}"))
            }
            Level::Monthly => {
                let (y, m) = (local.year(), local.month());
                ((y, m, 0), format!("{y:04}-{m:02}"))
            }
            Level::Yearly => {
                let y = local.year();
                ((y, 0, 0), format!("{y:04}"))
            }
        }
    }
}

/// Adds `reason` to the reasons `id` is kept for, unless already there.
fn add_reason(keep: &mut BTreeMap<String, Vec<String>>, id: &str, reason: String) {
    let reasons = keep.entry(id.to_string()).or_default();
    if !reasons.contains(&reason) {
        reasons.push(reason);
    }
}

/// Ids reachable from `start` over `edges` (not counting `start` itself),
/// in breadth-first order. Tolerates cycles.
fn reachable<'a>(start: &'a str, edges: &HashMap<&'a str, Vec<&'a str>>) -> Vec<&'a str> {
    let mut seen: HashSet<&str> = HashSet::from([start]);
    let mut queue = VecDeque::from([start]);
    let mut out = Vec::new();
    while let Some(id) = queue.pop_front() {
        for &next in edges.get(id).map(Vec::as_slice).unwrap_or_default() {
            if seen.insert(next) {
                out.push(next);
                queue.push_back(next);
            }
        }
    }
    out
}

/// Decides which backups to keep under `policy` at time `now`; see the module
/// documentation for the rules.
pub fn decide(backups: &[BackupRef], policy: &Policy, now: DateTime<Utc>) -> Decision {
    // Unique ids, oldest first.
    let mut seen: HashSet<&str> = HashSet::new();
    let mut ordered: Vec<&BackupRef> = backups
        .iter()
        .filter(|b| seen.insert(b.id.as_str()))
        .collect();
    ordered.sort_by(|a, b| (a.stop_time, &a.id).cmp(&(b.stop_time, &b.id)));

    let mut keep: BTreeMap<String, Vec<String>> = BTreeMap::new();

    // Rule 1: no policy at all.
    if policy.is_empty() {
        for b in &ordered {
            add_reason(&mut keep, &b.id, "no retention policy".to_string());
        }
        return Decision {
            keep,
            remove: Vec::new(),
        };
    }

    // Dependency edges among known backups, both ways.
    let known: HashSet<&str> = ordered.iter().map(|b| b.id.as_str()).collect();
    let mut needs: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut needed_by: HashMap<&str, Vec<&str>> = HashMap::new();
    for b in &ordered {
        for dep in &b.depends_on {
            if let Some(&dep) = known.get(dep.as_str()) {
                needs.entry(b.id.as_str()).or_default().push(dep);
                needed_by.entry(dep).or_default().push(b.id.as_str());
            }
        }
    }

    // Rule 2: the newest backup, and backups from the future.
    if let Some(newest) = ordered.last() {
        add_reason(&mut keep, &newest.id, "newest backup".to_string());
    }
    for b in ordered.iter().filter(|b| b.stop_time > now) {
        add_reason(&mut keep, &b.id, "newer than now".to_string());
    }

    // Rule 3: the N newest fulls and everything built on them.
    if let Some(n) = policy.full_count() {
        let fulls = ordered
            .iter()
            .rev()
            .filter(|b| b.kind == Kind::Full)
            .take(usize::try_from(n).unwrap_or(usize::MAX));
        for full in fulls {
            add_reason(&mut keep, &full.id, format!("last {n} full"));
            for dependent in reachable(full.id.as_str(), &needed_by) {
                add_reason(
                    &mut keep,
                    dependent,
                    format!("built on kept full {}", full.id),
                );
            }
        }
    }

    // Rule 4: the recovery window and the backup its start restores from.
    if let Some(window) = policy.window() {
        // A window reaching before the earliest representable time covers all.
        let start = now.checked_sub_signed(window);
        for b in &ordered {
            if start.is_none_or(|s| b.stop_time >= s) {
                add_reason(&mut keep, &b.id, "recovery window".to_string());
            }
        }
        if let Some(s) = start {
            if let Some(anchor) = ordered.iter().rev().find(|b| b.stop_time < s) {
                add_reason(
                    &mut keep,
                    &anchor.id,
                    "start of recovery window".to_string(),
                );
            }
        }
    }

    // Rule 5: GFS.
    let levels = [
        (Level::Daily, policy.keep_daily),
        (Level::Weekly, policy.keep_weekly),
        (Level::Monthly, policy.keep_monthly),
        (Level::Yearly, policy.keep_yearly),
    ];
    for (level, n) in levels {
        if n == 0 {
            continue;
        }
        // Period -> its newest backup (later entries of `ordered` are newer).
        let mut newest: BTreeMap<(i32, u32, u32), (&BackupRef, String)> = BTreeMap::new();
        for b in &ordered {
            let (key, label) = level.period(b.stop_time, policy.timezone);
            newest.insert(key, (b, label));
        }
        let take = usize::try_from(n).unwrap_or(usize::MAX);
        for (b, label) in newest.values().rev().take(take) {
            add_reason(&mut keep, &b.id, format!("{} {label}", level.name()));
        }
    }

    // Rule 6: whatever is kept keeps what it needs for restore.
    let roots: Vec<&str> = ordered
        .iter()
        .map(|b| b.id.as_str())
        .filter(|id| keep.contains_key(*id))
        .collect();
    for root in roots {
        for dep in reachable(root, &needs) {
            add_reason(&mut keep, dep, format!("needed by {root}"));
        }
    }

    // Rule 7: the rest goes.
    let remove = ordered
        .iter()
        .filter(|b| !keep.contains_key(&b.id))
        .map(|b| b.id.clone())
        .collect();
    Decision { keep, remove }
}

const DURATION_EXAMPLES: &str =
    "valid examples: \"30s\", \"90min\", \"36h\", \"7d\", \"2w\", \"1d12h\", or a plain number of seconds like \"3600\"";

/// Seconds per unit, for the unit names [`parse_duration`] accepts.
fn unit_seconds(unit: &str) -> Option<i64> {
    match unit.to_ascii_lowercase().as_str() {
        "s" | "sec" | "secs" | "second" | "seconds" => Some(1),
        "min" | "mins" | "minute" | "minutes" => Some(60),
        "h" | "hr" | "hrs" | "hour" | "hours" => Some(3_600),
        "d" | "day" | "days" => Some(86_400),
        "w" | "week" | "weeks" => Some(7 * 86_400),
        _ => None,
    }
}

/// Parses a duration: "30s", "90min", "36h", "7d", "2w", and sums like
/// "1d12h" (spaces between parts are allowed); a plain integer is a number of
/// seconds. Units: s, min, h, d, w (and their long forms such as "hours").
/// "m" is rejected as ambiguous (minutes or months?). Negative durations are
/// rejected. Errors name the bad input and show valid examples.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = |why: String| format!("invalid duration {s:?}: {why}; {DURATION_EXAMPLES}");
    let too_large = || bad("it is too large".to_string());
    let text = s.trim();
    if text.is_empty() {
        return Err(bad("it is empty".to_string()));
    }
    if text.starts_with('-') {
        return Err(bad("it must not be negative".to_string()));
    }

    let mut total: i64 = 0;
    if text.bytes().all(|c| c.is_ascii_digit()) {
        total = text.parse().map_err(|_| too_large())?;
    } else {
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if digits == 0 {
                return Err(bad(format!("expected a number at {rest:?}")));
            }
            let (number, after) = rest.split_at(digits);
            let after = after.trim_start();
            let letters = after.len()
                - after
                    .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                    .len();
            let (unit, after) = after.split_at(letters);
            if unit.is_empty() {
                return Err(bad(if after.is_empty() {
                    format!("{number:?} has no unit (only a lone number means seconds)")
                } else if after.starts_with(['.', ',']) {
                    "fractions are not supported: use a smaller unit, e.g. \"90min\"".to_string()
                } else {
                    format!("expected a unit after {number:?} at {after:?}")
                }));
            }
            let per_unit = match unit_seconds(unit) {
                Some(v) => v,
                None if unit.eq_ignore_ascii_case("m") => {
                    return Err(bad(
                        "unit \"m\" is ambiguous: write \"min\" for minutes".to_string()
                    ));
                }
                None => return Err(bad(format!("unknown unit {unit:?}"))),
            };
            let value: i64 = number.parse().map_err(|_| too_large())?;
            total = value
                .checked_mul(per_unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(too_large)?;
            rest = after.trim_start();
        }
    }
    Duration::try_seconds(total).ok_or_else(too_large)
}

/// Formats a duration compactly in the notation [`parse_duration`] reads:
/// whole days and hours ("1d12h"), then what is left below an hour as minutes
/// if it is whole minutes ("1h30min"), else as seconds ("90s", "2h5s").
/// Zero is "0s"; weeks are written as days ("14d"); a negative duration gets
/// a leading "-"; a sub-second remainder is dropped.
/// For whole, non-negative seconds, `parse_duration(&format_duration(d)) == Ok(d)`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.num_seconds();
    if secs == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    if secs < 0 {
        out.push('-');
    }
    let mut rest = secs.unsigned_abs();
    let days = rest / 86_400;
    rest %= 86_400;
    let hours = rest / 3_600;
    rest %= 3_600;
    // Writing to a String cannot fail.
    if days > 0 {
        let _ = write!(out, "{days}d");
    }
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if rest > 0 {
        if rest.is_multiple_of(60) {
            let _ = write!(out, "{}min", rest / 60);
        } else {
            let _ = write!(out, "{rest}s");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::collections::BTreeSet;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .expect("valid UTC time")
    }

    /// A local wall-clock time in `tz` (the earlier one if ambiguous).
    fn local(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        tz.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .earliest()
            .expect("valid local time")
            .with_timezone(&Utc)
    }

    fn backup(id: &str, kind: Kind, stop_time: DateTime<Utc>, deps: &[&str]) -> BackupRef {
        BackupRef {
            id: id.to_string(),
            kind,
            stop_time,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn full(id: &str, stop_time: DateTime<Utc>) -> BackupRef {
        backup(id, Kind::Full, stop_time, &[])
    }

    /// One full backup a day at `hour:minute` local time in `tz`, from
    /// `first` to `last` inclusive; ids are the local "YYYYMMDD-HHMMSSF".
    fn daily_fulls(
        tz: Tz,
        first: (i32, u32, u32),
        last: (i32, u32, u32),
        hour: u32,
        minute: u32,
    ) -> Vec<BackupRef> {
        let mut day = chrono::NaiveDate::from_ymd_opt(first.0, first.1, first.2).expect("date");
        let last = chrono::NaiveDate::from_ymd_opt(last.0, last.1, last.2).expect("date");
        let mut out = Vec::new();
        while day <= last {
            let at = local(tz, day.year(), day.month(), day.day(), hour, minute);
            let id = format!("{}F", at.with_timezone(&tz).format("%Y%m%d-%H%M%S"));
            out.push(full(&id, at));
            day = day.succ_opt().expect("next day");
        }
        out
    }

    /// Runs `decide` and checks the invariants every decision must meet:
    /// kept and removed partition the input, every kept backup has a
    /// reason, `remove` is oldest first, and nothing kept lacks a dependency.
    fn run(backups: &[BackupRef], policy: &Policy, now: DateTime<Utc>) -> Decision {
        let d = decide(backups, policy, now);
        let all: BTreeSet<&str> = backups.iter().map(|b| b.id.as_str()).collect();
        let kept: BTreeSet<&str> = d.keep.keys().map(String::as_str).collect();
        let removed: BTreeSet<&str> = d.remove.iter().map(String::as_str).collect();
        assert_eq!(removed.len(), d.remove.len(), "remove has duplicates");
        assert!(kept.is_disjoint(&removed), "kept and removed overlap");
        assert_eq!(
            kept.union(&removed).copied().collect::<BTreeSet<_>>(),
            all,
            "kept + removed must be every backup"
        );
        assert!(
            d.keep.values().all(|r| !r.is_empty()),
            "kept without reason"
        );
        let by_id: HashMap<&str, &BackupRef> = backups.iter().map(|b| (b.id.as_str(), b)).collect();
        let order: Vec<_> = d
            .remove
            .iter()
            .map(|id| (by_id[id.as_str()].stop_time, id.clone()))
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "remove must be oldest first");
        for id in &kept {
            for dep in &by_id[id].depends_on {
                if all.contains(dep.as_str()) {
                    assert!(kept.contains(dep.as_str()), "{id} kept without {dep}");
                }
            }
        }
        d
    }

    fn kept(d: &Decision) -> BTreeSet<&str> {
        d.keep.keys().map(String::as_str).collect()
    }

    fn set<'a>(ids: &[&'a str]) -> BTreeSet<&'a str> {
        ids.iter().copied().collect()
    }

    fn reasons<'a>(d: &'a Decision, id: &str) -> &'a [String] {
        d.keep
            .get(id)
            .map(Vec::as_slice)
            .unwrap_or_else(|| panic!("{id} not kept"))
    }

    fn has_reason(d: &Decision, id: &str, reason: &str) -> bool {
        d.keep
            .get(id)
            .is_some_and(|r| r.iter().any(|x| x == reason))
    }

    /// Ids kept by a reason starting with `prefix`.
    fn kept_by<'a>(d: &'a Decision, prefix: &str) -> BTreeSet<&'a str> {
        d.keep
            .iter()
            .filter(|(_, r)| r.iter().any(|x| x.starts_with(prefix)))
            .map(|(id, _)| id.as_str())
            .collect()
    }

    fn gfs(daily: u32, weekly: u32, monthly: u32, yearly: u32, tz: Tz) -> Policy {
        Policy {
            keep_daily: daily,
            keep_weekly: weekly,
            keep_monthly: monthly,
            keep_yearly: yearly,
            timezone: tz,
            ..Policy::default()
        }
    }

    fn secs(n: i64) -> Duration {
        Duration::seconds(n)
    }

    // ---- GFS -------------------------------------------------------------

    #[test]
    fn gfs_three_years_of_daily_fulls() {
        let tz = chrono_tz::Europe::Berlin;
        let backups = daily_fulls(tz, (2024, 1, 1), (2026, 11, 21), 21, 0);
        assert_eq!(backups.len(), 366 + 365 + 325);
        let now = local(tz, 2026, 11, 21, 22, 0);
        let d = run(&backups, &gfs(7, 4, 12, 3, tz), now);
        let id = |s: &str| format!("{s}-210000F");

        let daily: Vec<String> = (15..=21).map(|day| id(&format!("202611{day}"))).collect();
        let daily: BTreeSet<&str> = daily.iter().map(String::as_str).collect();
        assert_eq!(kept_by(&d, "daily "), daily);

        // Saturday 2026-11-21 ends the current week; earlier weeks by Sunday.
        let weekly = [
            id("20261121"),
            id("20261115"),
            id("20261108"),
            id("20261101"),
        ];
        let weekly: BTreeSet<&str> = weekly.iter().map(String::as_str).collect();
        assert_eq!(kept_by(&d, "weekly "), weekly);
        assert!(has_reason(&d, &id("20261121"), "weekly 2026-W47"));
        assert!(has_reason(&d, &id("20261101"), "weekly 2026-W44"));

        // The last day of each month; the current month by its newest.
        let monthly = [
            "20261121", "20261031", "20260930", "20260831", "20260731", "20260630", "20260531",
            "20260430", "20260331", "20260228", "20260131", "20251231",
        ]
        .map(id);
        let monthly: BTreeSet<&str> = monthly.iter().map(String::as_str).collect();
        assert_eq!(kept_by(&d, "monthly "), monthly);
        assert!(has_reason(&d, &id("20260228"), "monthly 2026-02"));
        assert!(has_reason(&d, &id("20251231"), "monthly 2025-12"));

        // Dec 31 is the yearly one; Jan 1 starts a new year and is not kept.
        let yearly = [id("20261121"), id("20251231"), id("20241231")];
        let yearly: BTreeSet<&str> = yearly.iter().map(String::as_str).collect();
        assert_eq!(kept_by(&d, "yearly "), yearly);
        assert!(has_reason(&d, &id("20251231"), "yearly 2025"));
        assert!(has_reason(&d, &id("20241231"), "yearly 2024"));
        assert!(has_reason(&d, &id("20261121"), "yearly 2026"));
        assert!(!d.keep.contains_key(&id("20260101")));
        assert!(!d.keep.contains_key(&id("20250101")));
        // 2024-02-29 (leap day) is February's last backup of 2024, but 2024's
        // months are beyond the 12 newest.
        assert!(!d.keep.contains_key(&id("20240229")));

        // 7 daily + 2 more weekly + 11 more monthly + 1 more yearly.
        assert_eq!(d.keep.len(), 21);
        assert_eq!(d.remove.len(), backups.len() - 21);
        assert_eq!(d.remove.first(), Some(&id("20240101")));
        assert_eq!(
            reasons(&d, &id("20261121")),
            [
                "newest backup",
                "daily 2026-11-21",
                "weekly 2026-W47",
                "monthly 2026-11",
                "yearly 2026"
            ]
        );
    }

    #[test]
    fn gfs_jan_1_starts_a_new_year() {
        let tz = chrono_tz::Europe::Berlin;
        let backups = daily_fulls(tz, (2023, 1, 1), (2026, 1, 1), 21, 0);
        let now = local(tz, 2026, 1, 1, 22, 0);
        let d = run(&backups, &gfs(0, 0, 0, 4, tz), now);
        assert_eq!(
            kept(&d),
            set(&[
                "20260101-210000F",
                "20251231-210000F",
                "20241231-210000F",
                "20231231-210000F",
            ])
        );
        assert_eq!(
            reasons(&d, "20260101-210000F"),
            ["newest backup", "yearly 2026"]
        );
        assert_eq!(reasons(&d, "20231231-210000F"), ["yearly 2023"]);
    }

    #[test]
    fn gfs_uses_the_policy_time_zone() {
        // 23:30 UTC on Dec 31 is already Jan 1 in Berlin.
        let backups = vec![
            full("A", utc(2026, 12, 31, 12, 0)),
            full("B", utc(2026, 12, 31, 23, 30)),
        ];
        let now = utc(2027, 1, 2, 0, 0);
        let berlin = chrono_tz::Europe::Berlin;

        let d = run(&backups, &gfs(0, 0, 0, 2, berlin), now);
        assert_eq!(kept(&d), set(&["A", "B"]));
        assert!(has_reason(&d, "A", "yearly 2026"));
        assert!(has_reason(&d, "B", "yearly 2027"));

        let d = run(&backups, &gfs(2, 0, 2, 0, berlin), now);
        assert!(has_reason(&d, "A", "daily 2026-12-31"));
        assert!(has_reason(&d, "B", "daily 2027-01-01"));
        assert!(has_reason(&d, "A", "monthly 2026-12"));
        assert!(has_reason(&d, "B", "monthly 2027-01"));

        // In UTC both are in 2026: one period, B represents it.
        let d = run(&backups, &gfs(0, 0, 0, 2, Tz::UTC), now);
        assert_eq!(kept(&d), set(&["B"]));
        assert!(has_reason(&d, "B", "yearly 2026"));
        assert_eq!(d.remove, ["A"]);
    }

    #[test]
    fn gfs_time_zone_west_of_utc() {
        // 07:30 UTC on Jan 1 is still Dec 31, 23:30 in Los Angeles.
        let backups = vec![
            full("C", utc(2026, 12, 30, 20, 0)),
            full("A", utc(2026, 12, 31, 20, 0)),
            full("B", utc(2027, 1, 1, 7, 30)),
        ];
        let now = utc(2027, 1, 1, 8, 0);
        let la = chrono_tz::America::Los_Angeles;

        let d = run(&backups, &gfs(2, 0, 0, 1, la), now);
        assert_eq!(kept(&d), set(&["B", "C"]));
        assert!(has_reason(&d, "B", "daily 2026-12-31"));
        assert!(has_reason(&d, "C", "daily 2026-12-30"));
        assert!(has_reason(&d, "B", "yearly 2026"));
        assert_eq!(d.remove, ["A"]);

        let d = run(&backups, &gfs(2, 0, 0, 0, Tz::UTC), now);
        assert_eq!(kept(&d), set(&["A", "B"]));
        assert!(has_reason(&d, "B", "daily 2027-01-01"));
        assert!(has_reason(&d, "A", "daily 2026-12-31"));
        assert_eq!(d.remove, ["C"]);
    }

    #[test]
    fn gfs_dst_changes_neither_lose_nor_double_a_day() {
        let ny = chrono_tz::America::New_York;
        // Spring forward on 2026-03-08, fall back on 2026-11-01. Backups just
        // before and just after local midnight, where an offset that is off
        // by the DST hour would move them to another day.
        let spans = [
            ((2026, 3, 1), (2026, 3, 15)),
            ((2026, 10, 25), (2026, 11, 8)),
        ];
        for ((first, last), (hour, minute)) in spans
            .into_iter()
            .flat_map(|span| [(span, (23, 30)), (span, (0, 30))])
        {
            let backups = daily_fulls(ny, first, last, hour, minute);
            let now = local(ny, last.0, last.1, last.2, 23, 45);
            assert_eq!(backups.len(), 15);
            let d = run(&backups, &gfs(10, 0, 0, 0, ny), now);
            assert_eq!(d.keep.len(), 10);
            // One backup per local day, so the 10 newest are the 10 days.
            let expected: BTreeSet<String> = backups[5..].iter().map(|b| b.id.clone()).collect();
            assert_eq!(
                d.keep.keys().cloned().collect::<BTreeSet<_>>(),
                expected,
                "{first:?}..{last:?} at {hour}:{minute}"
            );
            for b in backups.iter().filter(|b| expected.contains(&b.id)) {
                let date = b.stop_time.with_timezone(&ny).format("%Y-%m-%d");
                assert!(has_reason(&d, &b.id, &format!("daily {date}")), "{}", b.id);
            }
        }
        // Spring forward: the 23-hour day is one day.
        let backups = daily_fulls(ny, (2026, 3, 1), (2026, 3, 15), 23, 30);
        let d = run(&backups, &gfs(10, 0, 0, 0, ny), utc(2026, 3, 16, 12, 0));
        assert!(has_reason(&d, "20260308-233000F", "daily 2026-03-08"));
        assert!(has_reason(&d, "20260307-233000F", "daily 2026-03-07"));

        // Fall back: 00:30, both 01:30s and 23:30 of the 25-hour day are one
        // day, represented by the last of them.
        let first_130 = local(ny, 2026, 11, 1, 1, 30);
        let second_130 = first_130 + Duration::hours(1);
        assert_eq!(
            second_130.with_timezone(&ny).format("%H:%M").to_string(),
            "01:30"
        );
        let backups = vec![
            full("oct31", local(ny, 2026, 10, 31, 23, 30)),
            full("nov1-0030", local(ny, 2026, 11, 1, 0, 30)),
            full("nov1-0130a", first_130),
            full("nov1-0130b", second_130),
            full("nov1-2330", local(ny, 2026, 11, 1, 23, 30)),
            full("nov2-0030", local(ny, 2026, 11, 2, 0, 30)),
        ];
        let d = run(&backups, &gfs(3, 0, 0, 0, ny), utc(2026, 11, 3, 0, 0));
        assert_eq!(kept(&d), set(&["oct31", "nov1-2330", "nov2-0030"]));
        assert!(has_reason(&d, "nov1-2330", "daily 2026-11-01"));
        assert!(has_reason(&d, "oct31", "daily 2026-10-31"));
        let d = run(&backups[..4], &gfs(1, 0, 0, 0, ny), utc(2026, 11, 3, 0, 0));
        assert_eq!(kept(&d), set(&["nov1-0130b"]));
    }

    #[test]
    fn gfs_iso_weeks_across_a_year_end() {
        // 2026-12-31 (Thu) to 2027-01-03 (Sun) are 2026-W53; 2027-01-04 is W01.
        let backups = vec![
            full("dec27", utc(2026, 12, 27, 10, 0)),
            full("dec28", utc(2026, 12, 28, 10, 0)),
            full("dec31", utc(2026, 12, 31, 10, 0)),
            full("jan01", utc(2027, 1, 1, 10, 0)),
            full("jan03", utc(2027, 1, 3, 10, 0)),
            full("jan04", utc(2027, 1, 4, 10, 0)),
        ];
        let now = utc(2027, 1, 5, 0, 0);
        let d = run(&backups, &gfs(0, 2, 0, 0, Tz::UTC), now);
        assert_eq!(kept(&d), set(&["jan03", "jan04"]));
        assert!(has_reason(&d, "jan04", "weekly 2027-W01"));
        assert!(has_reason(&d, "jan03", "weekly 2026-W53"));
        assert_eq!(d.remove, ["dec27", "dec28", "dec31", "jan01"]);

        let d = run(&backups, &gfs(0, 3, 0, 0, Tz::UTC), now);
        assert!(has_reason(&d, "dec27", "weekly 2026-W52"));

        // Without jan03/jan04, W53 is represented by Jan 1 (same week as Dec 31).
        let d = run(&backups[..4], &gfs(0, 1, 0, 0, Tz::UTC), now);
        assert_eq!(kept(&d), set(&["jan01"]));
        assert!(has_reason(&d, "jan01", "weekly 2026-W53"));
    }

    #[test]
    fn gfs_empty_periods_do_not_count() {
        let mut backups = daily_fulls(Tz::UTC, (2026, 11, 1), (2026, 11, 10), 10, 0);
        backups.extend(daily_fulls(Tz::UTC, (2026, 11, 21), (2026, 11, 21), 10, 0));
        let d = run(
            &backups,
            &gfs(7, 0, 0, 0, Tz::UTC),
            utc(2026, 11, 21, 12, 0),
        );
        let want = [
            "20261121", "20261110", "20261109", "20261108", "20261107", "20261106", "20261105",
        ]
        .map(|s| format!("{s}-100000F"));
        assert_eq!(
            d.keep.keys().cloned().collect::<BTreeSet<_>>(),
            want.iter().cloned().collect()
        );
        assert_eq!(d.remove.len(), 4);
    }

    #[test]
    fn gfs_keeps_newest_of_each_period_of_any_kind() {
        let backups = vec![
            full("F", utc(2026, 11, 20, 1, 0)),
            backup("I1", Kind::Incr, utc(2026, 11, 20, 12, 0), &["F"]),
            backup("I2", Kind::Incr, utc(2026, 11, 20, 18, 0), &["I1"]),
            backup("I3", Kind::Incr, utc(2026, 11, 21, 6, 0), &["I2"]),
        ];
        let d = run(&backups, &gfs(1, 0, 0, 0, Tz::UTC), utc(2026, 11, 21, 7, 0));
        assert_eq!(reasons(&d, "I3"), ["newest backup", "daily 2026-11-21"]);
        assert_eq!(kept(&d), set(&["F", "I1", "I2", "I3"]));
    }

    #[test]
    fn gfs_keeping_an_incr_keeps_its_diff_and_full() {
        let backups = vec![
            full("F0", utc(2026, 10, 25, 10, 0)),
            full("F", utc(2026, 11, 1, 10, 0)),
            backup("D", Kind::Diff, utc(2026, 11, 3, 10, 0), &["F"]),
            backup("I", Kind::Incr, utc(2026, 11, 5, 10, 0), &["D"]),
            backup("I2", Kind::Incr, utc(2026, 11, 5, 11, 0), &["I"]),
            full("G", utc(2026, 11, 6, 10, 0)),
        ];
        // daily=2: G (Nov 6) and I2 (newest of Nov 5), which needs I, D and F.
        let d = run(&backups, &gfs(2, 0, 0, 0, Tz::UTC), utc(2026, 11, 7, 0, 0));
        assert_eq!(kept(&d), set(&["G", "I2", "I", "D", "F"]));
        assert!(has_reason(&d, "I2", "daily 2026-11-05"));
        assert_eq!(reasons(&d, "I"), ["needed by I2"]);
        assert_eq!(reasons(&d, "D"), ["needed by I2"]);
        assert_eq!(reasons(&d, "F"), ["needed by I2"]);
        assert_eq!(d.remove, ["F0"]);
    }

    // ---- keep_full -------------------------------------------------------

    fn chains() -> Vec<BackupRef> {
        vec![
            full("F1", utc(2026, 11, 1, 10, 0)),
            backup("F1-I1", Kind::Incr, utc(2026, 11, 2, 10, 0), &["F1"]),
            backup("F1-D1", Kind::Diff, utc(2026, 11, 3, 10, 0), &["F1"]),
            backup("F1-I2", Kind::Incr, utc(2026, 11, 4, 10, 0), &["F1-D1"]),
            full("F2", utc(2026, 11, 8, 10, 0)),
            backup("F2-I1", Kind::Incr, utc(2026, 11, 9, 10, 0), &["F2"]),
            backup("F2-D1", Kind::Diff, utc(2026, 11, 10, 10, 0), &["F2"]),
            backup("F2-I2", Kind::Incr, utc(2026, 11, 11, 10, 0), &["F2-D1"]),
            backup(
                "F2-I3",
                Kind::Incr,
                utc(2026, 11, 12, 10, 0),
                &["F2-I2", "F2-D1", "F2"],
            ),
            full("F3", utc(2026, 11, 15, 10, 0)),
            backup("F3-I1", Kind::Incr, utc(2026, 11, 16, 10, 0), &["F3"]),
        ]
    }

    #[test]
    fn keep_full_keeps_chains_of_kept_fulls() {
        let backups = chains();
        let policy = Policy {
            keep_full: Some(2),
            ..Policy::default()
        };
        let d = run(&backups, &policy, utc(2026, 11, 21, 0, 0));
        assert_eq!(
            kept(&d),
            set(&["F2", "F2-I1", "F2-D1", "F2-I2", "F2-I3", "F3", "F3-I1"])
        );
        assert_eq!(d.remove, ["F1", "F1-I1", "F1-D1", "F1-I2"]);
        assert!(has_reason(&d, "F2", "last 2 full"));
        assert!(has_reason(&d, "F3", "last 2 full"));
        assert!(has_reason(&d, "F2-I2", "built on kept full F2"));
        assert!(has_reason(&d, "F2-I3", "built on kept full F2"));
        assert!(has_reason(&d, "F3-I1", "built on kept full F3"));
        assert!(has_reason(&d, "F3-I1", "newest backup"));
        assert!(has_reason(&d, "F2-D1", "needed by F2-I3"));

        let policy = Policy {
            keep_full: Some(1),
            ..Policy::default()
        };
        let d = run(&backups, &policy, utc(2026, 11, 21, 0, 0));
        assert_eq!(kept(&d), set(&["F3", "F3-I1"]));
        assert_eq!(reasons(&d, "F3"), ["last 1 full", "needed by F3-I1"]);

        // More than there are: all fulls and their chains.
        let policy = Policy {
            keep_full: Some(10),
            ..Policy::default()
        };
        let d = run(&backups, &policy, utc(2026, 11, 21, 0, 0));
        assert!(d.remove.is_empty());
    }

    // ---- recovery window -------------------------------------------------

    #[test]
    fn recovery_window_keeps_window_and_its_start() {
        let backups = chains();
        let now = utc(2026, 11, 16, 12, 0);
        // now - 5d = 11-11 12:00: F2-I3 (11-12), F3, F3-I1 are inside; F2-I2
        // (11-11 10:00) is the start; it needs F2-D1 and F2.
        let policy = Policy {
            recovery_window: Some(Duration::days(5)),
            ..Policy::default()
        };
        let d = run(&backups, &policy, now);
        assert_eq!(
            kept(&d),
            set(&["F2", "F2-D1", "F2-I2", "F2-I3", "F3", "F3-I1"])
        );
        assert_eq!(
            reasons(&d, "F2-I2"),
            ["start of recovery window", "needed by F2-I3"]
        );
        assert!(has_reason(&d, "F2-I3", "recovery window"));
        assert!(has_reason(&d, "F3", "recovery window"));
        assert_eq!(reasons(&d, "F2-D1"), ["needed by F2-I2", "needed by F2-I3"]);
        assert_eq!(d.remove, ["F1", "F1-I1", "F1-D1", "F1-I2", "F2-I1"]);

        // A backup exactly at the window's start is inside it; the anchor is
        // then the one before.
        let policy = Policy {
            recovery_window: Some(Duration::days(5) + Duration::hours(2)),
            ..Policy::default()
        };
        let d = run(&backups, &policy, now);
        assert!(has_reason(&d, "F2-I2", "recovery window"));
        assert!(has_reason(&d, "F2-D1", "start of recovery window"));
        assert!(!d.keep.contains_key("F2-I1"));
    }

    #[test]
    fn recovery_window_larger_than_history_keeps_all() {
        let backups = chains();
        let now = utc(2026, 11, 21, 0, 0);
        for window in [Duration::days(365), Duration::MAX] {
            let policy = Policy {
                recovery_window: Some(window),
                ..Policy::default()
            };
            let d = run(&backups, &policy, now);
            assert!(d.remove.is_empty());
            assert_eq!(d.keep.len(), backups.len());
            assert!(d
                .keep
                .values()
                .all(|r| r.iter().any(|x| x == "recovery window")));
            assert!(d
                .keep
                .values()
                .all(|r| r.iter().all(|x| x != "start of recovery window")));
        }
    }

    #[test]
    fn recovery_window_with_nothing_inside_keeps_the_start() {
        let backups = chains();
        let policy = Policy {
            recovery_window: Some(Duration::hours(1)),
            ..Policy::default()
        };
        let d = run(&backups, &policy, utc(2026, 12, 1, 0, 0));
        assert_eq!(kept(&d), set(&["F3", "F3-I1"]));
        assert_eq!(
            reasons(&d, "F3-I1"),
            ["newest backup", "start of recovery window"]
        );
    }

    // ---- always kept, empty policy, combinations ------------------------

    #[test]
    fn newest_is_always_kept() {
        // The newest is an incr on a full that keep_full=1 drops: both stay.
        let backups = vec![
            full("F1", utc(2026, 11, 1, 10, 0)),
            full("F2", utc(2026, 11, 2, 10, 0)),
            backup("I", Kind::Incr, utc(2026, 11, 3, 10, 0), &["F1"]),
        ];
        let policy = Policy {
            keep_full: Some(1),
            ..Policy::default()
        };
        let d = run(&backups, &policy, utc(2026, 11, 20, 0, 0));
        assert_eq!(kept(&d), set(&["F1", "F2", "I"]));
        assert_eq!(reasons(&d, "I"), ["newest backup"]);
        assert_eq!(reasons(&d, "F1"), ["needed by I"]);

        // Its full gone from the repository: only the newest stays.
        let backups = vec![
            full("F2", utc(2026, 11, 2, 10, 0)),
            full("F3", utc(2026, 11, 2, 11, 0)),
            backup("I", Kind::Incr, utc(2026, 11, 3, 10, 0), &["gone"]),
        ];
        let d = run(&backups, &policy, utc(2026, 11, 20, 0, 0));
        assert_eq!(kept(&d), set(&["F3", "I"]));
        assert_eq!(d.remove, ["F2"]);

        // Of two backups with the same stop_time, the greater id is the newest.
        let backups = vec![
            full("A", utc(2026, 11, 2, 10, 0)),
            full("B", utc(2026, 11, 2, 10, 0)),
        ];
        let policy = Policy {
            keep_yearly: 1,
            ..Policy::default()
        };
        let d = run(&backups, &policy, utc(2026, 11, 20, 0, 0));
        assert_eq!(reasons(&d, "B"), ["newest backup", "yearly 2026"]);
        assert_eq!(d.remove, ["A"]);
    }

    #[test]
    fn future_backups_are_kept() {
        let backups = vec![
            full("old", utc(2026, 11, 1, 10, 0)),
            full("now", utc(2026, 11, 10, 10, 0)),
            full("future1", utc(2026, 11, 12, 10, 0)),
            full("future2", utc(2026, 11, 13, 10, 0)),
        ];
        let policy = Policy {
            keep_full: Some(1),
            ..Policy::default()
        };
        let d = run(&backups, &policy, utc(2026, 11, 10, 10, 0));
        assert_eq!(reasons(&d, "future1"), ["newer than now"]);
        assert_eq!(
            reasons(&d, "future2"),
            ["newest backup", "newer than now", "last 1 full"]
        );
        // Exactly now is not "newer than now".
        assert!(!d.keep.contains_key("now"));
        assert_eq!(d.remove, ["old", "now"]);
    }

    #[test]
    fn empty_policy_keeps_everything() {
        let backups = chains();
        let policy = Policy::default();
        assert!(policy.is_empty());
        let d = run(&backups, &policy, utc(2030, 1, 1, 0, 0));
        assert!(d.remove.is_empty());
        assert_eq!(d.keep.len(), backups.len());
        assert!(d.keep.values().all(|r| r == &["no retention policy"]));

        // Zero counts and non-positive windows are "not set".
        for policy in [
            Policy {
                keep_full: Some(0),
                ..Policy::default()
            },
            Policy {
                recovery_window: Some(Duration::zero()),
                ..Policy::default()
            },
            Policy {
                recovery_window: Some(Duration::days(-1)),
                ..Policy::default()
            },
        ] {
            assert!(policy.is_empty(), "{policy:?}");
            assert!(run(&backups, &policy, utc(2030, 1, 1, 0, 0))
                .remove
                .is_empty());
        }
        for policy in [
            Policy {
                keep_full: Some(1),
                ..Policy::default()
            },
            Policy {
                recovery_window: Some(Duration::seconds(1)),
                ..Policy::default()
            },
            gfs(1, 0, 0, 0, Tz::UTC),
            gfs(0, 1, 0, 0, Tz::UTC),
            gfs(0, 0, 1, 0, Tz::UTC),
            gfs(0, 0, 0, 1, Tz::UTC),
        ] {
            assert!(!policy.is_empty(), "{policy:?}");
        }
        assert_eq!(Policy::default().timezone, Tz::UTC);
    }

    #[test]
    fn no_backups_no_decision() {
        let d = run(&[], &gfs(7, 4, 12, 3, Tz::UTC), utc(2026, 1, 1, 0, 0));
        assert!(d.keep.is_empty() && d.remove.is_empty());
        let d = run(&[], &Policy::default(), utc(2026, 1, 1, 0, 0));
        assert!(d.keep.is_empty() && d.remove.is_empty());
    }

    #[test]
    fn policies_combine_as_a_union() {
        let backups = chains();
        let now = utc(2026, 11, 16, 12, 0);
        let policy = Policy {
            keep_full: Some(1),
            recovery_window: Some(Duration::days(1)),
            keep_weekly: 2,
            ..Policy::default()
        };
        let d = run(&backups, &policy, now);
        // keep_full: F3 and F3-I1; window: F3-I1 inside, F3 its start;
        // weekly: W47 (F3-I1, Mon 11-16) and W46 (F3, Sun 11-15).
        assert_eq!(kept(&d), set(&["F3", "F3-I1"]));
        assert_eq!(
            reasons(&d, "F3"),
            [
                "last 1 full",
                "start of recovery window",
                "weekly 2026-W46",
                "needed by F3-I1"
            ]
        );
        // Two more weeks: W45's newest is F2 (Sun 11-08), W44's is F1.
        let policy = Policy {
            keep_weekly: 4,
            ..policy
        };
        let d = run(&backups, &policy, now);
        assert!(has_reason(&d, "F3-I1", "weekly 2026-W47"));
        assert!(has_reason(&d, "F2", "weekly 2026-W45"));
        assert!(has_reason(&d, "F1", "weekly 2026-W44"));
        assert_eq!(kept(&d), set(&["F1", "F2", "F3", "F3-I1"]));
    }

    #[test]
    fn unknown_and_cyclic_dependencies_are_harmless() {
        let backups = vec![
            backup("A", Kind::Incr, utc(2026, 11, 1, 10, 0), &["B", "nowhere"]),
            backup("B", Kind::Incr, utc(2026, 11, 2, 10, 0), &["A", "B"]),
            full("C", utc(2026, 11, 3, 10, 0)),
            backup("D", Kind::Incr, utc(2026, 11, 4, 10, 0), &["B"]),
        ];
        let policy = Policy {
            keep_daily: 1,
            ..Policy::default()
        };
        let d = run(&backups, &policy, utc(2026, 11, 5, 0, 0));
        assert_eq!(kept(&d), set(&["A", "B", "D"]));
        assert_eq!(reasons(&d, "A"), ["needed by D"]);
        assert_eq!(d.remove, ["C"]);
    }

    // ---- durations -------------------------------------------------------

    #[test]
    fn parse_duration_accepts_the_documented_forms() {
        let cases: &[(&str, i64)] = &[
            ("30s", 30),
            ("90min", 5_400),
            ("36h", 129_600),
            ("7d", 604_800),
            ("2w", 1_209_600),
            ("1d12h", 129_600),
            (
                "1w2d3h4min5s",
                7 * 86_400 + 2 * 86_400 + 3 * 3_600 + 4 * 60 + 5,
            ),
            ("1d 12h", 129_600),
            (" 7d ", 604_800),
            ("3600", 3_600),
            ("0", 0),
            ("0s", 0),
            ("2 hours", 7_200),
            ("45 minutes", 2_700),
            ("1H", 3_600),
            ("007d", 604_800),
        ];
        for &(input, want) in cases {
            assert_eq!(parse_duration(input), Ok(secs(want)), "{input:?}");
        }
    }

    #[test]
    fn parse_duration_errors_name_the_input_and_show_examples() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("   ", "empty"),
            ("abc", "expected a number"),
            ("7x", "unknown unit \"x\""),
            ("5m", "ambiguous"),
            ("1h30", "no unit"),
            ("-1d", "negative"),
            ("1.5h", "fractions are not supported"),
            ("2,5d", "fractions are not supported"),
            ("3?", "expected a unit after \"3\""),
            ("d", "expected a number"),
            ("99999999999999999999", "too large"),
            ("99999999999999999w", "too large"),
            ("9223372036854775807s", "too large"),
            ("1d+2h", "expected a number"),
            ("1 d ü", "expected a number"),
        ];
        for &(input, what) in cases {
            let err = parse_duration(input).expect_err(input);
            assert!(err.contains(&format!("{input:?}")), "{err}");
            assert!(err.contains(what), "{input:?}: {err}");
            assert!(
                err.contains("\"1d12h\"") && err.contains("\"90min\""),
                "{err}"
            );
        }
    }

    #[test]
    fn format_duration_is_compact() {
        let cases: &[(i64, &str)] = &[
            (0, "0s"),
            (1, "1s"),
            (30, "30s"),
            (90, "90s"),
            (60, "1min"),
            (5_400, "1h30min"),
            (3_600, "1h"),
            (3_605, "1h5s"),
            (129_600, "1d12h"),
            (86_400, "1d"),
            (604_800, "7d"),
            (1_209_600, "14d"),
            (86_400 + 61, "1d61s"),
            (-129_600, "-1d12h"),
        ];
        for &(n, want) in cases {
            assert_eq!(format_duration(secs(n)), want, "{n}");
        }
        assert_eq!(format_duration(Duration::milliseconds(1_500)), "1s");
        assert_eq!(format_duration(Duration::milliseconds(-500)), "0s");
    }

    #[test]
    fn duration_round_trips() {
        let max = Duration::MAX.num_seconds();
        let mut values: Vec<i64> = (0..5_000).collect();
        values.extend((0..2_000).map(|i| i * 3_599 + 7));
        values.extend((0..2_000).map(|i| i * 86_399 + 1));
        values.extend([86_400 * 365, 86_400 * 366 + 1, max, max - 1, max / 7]);
        for n in values {
            let d = secs(n);
            let text = format_duration(d);
            assert_eq!(parse_duration(&text), Ok(d), "{n} -> {text:?}");
        }
        for text in [
            "30s", "90min", "36h", "7d", "1d12h", "1h30min", "90s", "1d1s",
        ] {
            let d = parse_duration(text).expect(text);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{text}");
        }
        assert_eq!(format_duration(parse_duration("2w").expect("2w")), "14d");
        assert_eq!(
            format_duration(parse_duration("36h").expect("36h")),
            "1d12h"
        );
    }
}
