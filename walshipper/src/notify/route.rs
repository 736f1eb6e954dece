//! Which channel takes which event: by severity, kind and job. A test goes
//! to every channel it names; a channel never hears of its own failures
//! (notification_failed about itself), which it could not deliver anyway
//! and which would loop.

use super::{ChannelConfig, Event, SEVERITIES};

fn rank(severity: &str) -> usize {
    SEVERITIES
        .iter()
        .position(|s| *s == severity)
        .unwrap_or(SEVERITIES.len())
}

/// Ok when `c` takes `ev`; else why not (recorded as the skipped delivery's reason).
pub fn route(c: &ChannelConfig, ev: &Event) -> Result<(), String> {
    if ev.event == "test" {
        return Ok(());
    }
    if ev.kind == "notification_failed" && ev.subject == c.name {
        return Err("about this channel's own failures: sent to the other channels".into());
    }
    if rank(&ev.severity) < rank(&c.min_severity) {
        return Err(format!(
            "severity {} is below the channel's min_severity {}",
            ev.severity, c.min_severity
        ));
    }
    if !c.kinds.is_empty() && !c.kinds.contains(&ev.kind) {
        return Err(format!("kind {} is not in the channel's kinds", ev.kind));
    }
    if let Some(job) = &ev.job {
        if !c.jobs.is_empty() && !c.jobs.contains(job) {
            return Err(format!("job {job} is not in the channel's jobs"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, severity: &str, subject: &str, job: Option<&str>) -> Event {
        Event {
            event_id: 1,
            event: "raised".into(),
            alert_id: Some(1),
            kind: kind.into(),
            severity: severity.into(),
            subject: subject.into(),
            job: job.map(str::to_string),
            message: "m".into(),
            hint: None,
            details: serde_json::json!({}),
            created_at: chrono::Utc::now(),
            raised_at: None,
            resolved_at: None,
        }
    }

    #[test]
    fn by_severity_kind_and_job() {
        let c = ChannelConfig {
            name: "pager".into(),
            min_severity: "critical".into(),
            jobs: vec!["nightly".into()],
            ..Default::default()
        };
        assert!(route(
            &c,
            &ev("backup_failed", "critical", "nightly", Some("nightly"))
        )
        .is_ok());
        // Another job's alert stays off this channel; an alert about no job does not.
        assert!(route(
            &c,
            &ev("backup_failed", "critical", "hourly", Some("hourly"))
        )
        .is_err());
        assert!(route(&c, &ev("archive_failing", "critical", "archiver", None)).is_ok());
        let e = route(
            &c,
            &ev("job_overdue", "warning", "nightly", Some("nightly")),
        )
        .unwrap_err();
        assert!(e.contains("below"), "{e}");
        let k = ChannelConfig {
            kinds: vec!["archive_failing".into()],
            ..Default::default()
        };
        assert!(route(&k, &ev("archive_failing", "critical", "archiver", None)).is_ok());
        assert!(route(&k, &ev("backup_failed", "critical", "n", Some("n"))).is_err());
        // A test ignores the filters.
        let mut t = ev("notification_test", "info", "", None);
        t.event = "test".into();
        assert!(route(&c, &t).is_ok());
    }

    #[test]
    fn never_about_its_own_failure() {
        let a = ChannelConfig {
            name: "a".into(),
            ..Default::default()
        };
        let b = ChannelConfig {
            name: "b".into(),
            ..Default::default()
        };
        let failed = ev("notification_failed", "warning", "a", None);
        assert!(route(&a, &failed).is_err());
        assert!(route(&b, &failed).is_ok());
    }
}
