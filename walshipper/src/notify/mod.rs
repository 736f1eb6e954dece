//! Notifications: alerts of the catalog (backup.alerts, raised and
//! resolved by the scheduler) sent out by webhook (JSON signed with
//! HMAC-SHA256) and e-mail (SMTP with STARTTLS and authentication), routed
//! per severity, kind and job, retried, de-duplicated (one message when an
//! alert is raised, one when it is resolved) and rate limited. Secrets live
//! in walshipper's configuration only. `walshipper serve` runs the
//! notifier; `walshipper notify-test` sends a test message at once.
//!
//! The catalog is the outbox (sql/notifications.sql): triggers on
//! backup.alerts add events, and each delivery (event, channel) is claimed,
//! tried and recorded there, which is the de-duplication across restarts
//! and notifiers. `outbox` runs one thread per channel, so a slow receiver
//! holds up only its own channel.

pub mod email;
pub mod outbox;
pub mod route;
pub mod webhook;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Config;
use crate::error::{Error, Result};

/// `[notify]` and its `[[notify.channel]]` tables (docs/operations.md,
/// "Notifications").
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Seconds between looks at the catalog when no NOTIFY wakes the
    /// notifier earlier.
    pub poll_interval: u64,
    /// Attempts per message before it is given up (and notification_failed raised).
    pub max_attempts: u32,
    /// Seconds before the second attempt; doubled each time, at most an hour.
    pub retry_backoff: u64,
    /// Seconds per attempt (connect, send, answer), unless the channel says.
    pub timeout: u64,
    /// Messages per channel per hour (0: no limit), unless the channel says.
    /// Over it, messages wait in order (a seen event is never skipped for its age).
    pub rate_limit: u32,
    /// Seconds: an event older than this when the notifier first sees it
    /// (the notifier was down) is recorded as skipped, not sent.
    pub max_age: u64,
    #[serde(rename = "channel")]
    pub channels: Vec<ChannelConfig>,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            poll_interval: 10,
            max_attempts: 5,
            retry_backoff: 30,
            timeout: 10,
            rate_limit: 60,
            max_age: 86400,
            channels: Vec::new(),
        }
    }
}

/// One `[[notify.channel]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelConfig {
    /// Names the channel in the catalog (notification_deliveries.channel)
    /// and in notification_failed alerts.
    pub name: String,
    /// `webhook` or `email`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Alerts below this severity (info < warning < critical) are not sent.
    pub min_severity: String,
    /// Only these alert kinds (empty: every kind).
    pub kinds: Vec<String>,
    /// Only alerts about these backup jobs, and alerts about no job (empty: every job).
    pub jobs: Vec<String>,
    /// Seconds per attempt (0: [notify] timeout).
    pub timeout: u64,
    /// Messages per hour (None: [notify] rate_limit).
    pub rate_limit: Option<u32>,

    // webhook
    /// https:// URL the JSON is POSTed to (http:// only to a loopback host).
    pub url: String,
    /// The HMAC-SHA256 key the body is signed with (required).
    pub secret_file: PathBuf,
    /// A file whose content is sent as the Authorization header (an SMS
    /// gateway's credentials, say), so no secret sits in the configuration.
    pub authorization_file: PathBuf,
    /// More headers (no secrets here: use authorization_file).
    pub headers: BTreeMap<String, String>,

    // email
    pub smtp_host: String,
    /// Default 587 (starttls, none) or 465 (tls).
    pub smtp_port: u16,
    /// `starttls` (default: the server must offer it), `tls` (implicit
    /// TLS, port 465) or `none` (refused unless smtp_host is loopback).
    pub tls: String,
    pub username: String,
    pub password_file: PathBuf,
    /// PEM certificates of a private CA. email: the server's certificate
    /// is checked against them besides the system's CAs; webhook: against
    /// them only (instead of the public CAs).
    pub tls_ca_file: PathBuf,
    pub from: String,
    pub to: Vec<String>,
    pub subject_prefix: String,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            name: String::new(),
            kind: String::new(),
            min_severity: "warning".into(),
            kinds: Vec::new(),
            jobs: Vec::new(),
            timeout: 0,
            rate_limit: None,
            url: String::new(),
            secret_file: PathBuf::new(),
            authorization_file: PathBuf::new(),
            headers: BTreeMap::new(),
            smtp_host: String::new(),
            smtp_port: 0,
            tls: "starttls".into(),
            username: String::new(),
            password_file: PathBuf::new(),
            tls_ca_file: PathBuf::new(),
            from: String::new(),
            to: Vec::new(),
            subject_prefix: "[pg_backup]".into(),
        }
    }
}

pub use crate::catalog::SEVERITIES;

/// What a channel's `kinds` may name: the alert kinds, and the test event's.
fn known_kind(k: &str) -> bool {
    crate::catalog::ALERT_KINDS.contains(&k) || k == "notification_test"
}

impl NotifyConfig {
    /// Checks every channel (names, URLs, addresses, the TLS mode); the
    /// secret files are read when a message is sent.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.poll_interval == 0 || self.poll_interval > 3600 {
            return bad("notify.poll_interval: between 1 and 3600 seconds".into());
        }
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return bad("notify.max_attempts: between 1 and 100".into());
        }
        if self.timeout == 0 || self.timeout > 600 {
            return bad("notify.timeout: between 1 and 600 seconds".into());
        }
        // 0 would skip every event (none is seen the instant it is made).
        if self.max_age < self.poll_interval.max(60) {
            return bad(format!(
                "notify.max_age: at least {} seconds (60, and not under poll_interval)",
                self.poll_interval.max(60)
            ));
        }
        if self.retry_backoff > 86400 {
            return bad("notify.retry_backoff: at most 86400 seconds".into());
        }
        for (i, c) in self.channels.iter().enumerate() {
            let at = format!("notify.channel '{}'", c.name);
            if c.name.is_empty()
                || c.name.len() > 48
                || !c
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            {
                return bad(format!(
                    "notify.channel #{}: name must be 1 to 48 letters, digits, '-' or '_'",
                    i + 1
                ));
            }
            if self.channels[..i].iter().any(|o| o.name == c.name) {
                return bad(format!("{at}: two channels have this name"));
            }
            if !SEVERITIES.contains(&c.min_severity.as_str()) {
                return bad(format!(
                    "{at}: min_severity must be info, warning or critical"
                ));
            }
            if let Some(k) = c.kinds.iter().find(|k| !known_kind(k)) {
                return bad(format!(
                    "{at}: kinds: unknown alert kind '{k}' (known: {})",
                    crate::catalog::ALERT_KINDS.join(", ") + ", notification_test"
                ));
            }
            if c.timeout > 600 {
                return bad(format!("{at}: timeout: at most 600 seconds"));
            }
            match c.kind.as_str() {
                "webhook" => webhook::validate(c, &at)?,
                "email" => email::validate(c, &at)?,
                other => {
                    return bad(format!(
                        "{at}: type must be webhook or email, not '{other}'"
                    ))
                }
            }
        }
        Ok(())
    }

    /// Reads every channel's files (secrets, CA certificates): a missing
    /// or open file stops `walshipper serve` at start, not every message.
    pub fn check_files(&self) -> Result<()> {
        for c in &self.channels {
            let at = format!("notify.channel '{}'", c.name);
            match c.kind.as_str() {
                "webhook" => webhook::check_files(c, &at)?,
                "email" => email::check_files(c, &at)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// The channel's timeout per attempt.
    pub fn timeout_of(&self, c: &ChannelConfig) -> Duration {
        Duration::from_secs(if c.timeout > 0 {
            c.timeout
        } else {
            self.timeout
        })
    }

    /// The channel's messages per hour (0: no limit).
    pub fn rate_limit_of(&self, c: &ChannelConfig) -> u32 {
        c.rate_limit.unwrap_or(self.rate_limit)
    }

    /// Seconds before attempt `attempt + 1` after attempt `attempt` failed.
    pub fn backoff(&self, attempt: u32) -> u64 {
        let doubled = self
            .retry_backoff
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(20));
        doubled.min(3600)
    }
}

/// What a message is about: an alert raised or resolved, or a test.
#[derive(Clone, Debug)]
pub struct Event {
    pub event_id: i64,
    /// `raised`, `resolved` or `test`.
    pub event: String,
    pub alert_id: Option<i64>,
    pub kind: String,
    pub severity: String,
    pub subject: String,
    pub job: Option<String>,
    pub message: String,
    pub hint: Option<String>,
    pub details: serde_json::Value,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub raised_at: Option<chrono::DateTime<chrono::Utc>>,
    pub resolved_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Which cluster a message comes from (in every message).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ClusterId {
    /// pg_control_system()'s, when the notifier's role may read it.
    pub system_identifier: Option<String>,
    /// The host the notifier runs on.
    pub host: String,
    /// The database the catalog is in.
    pub database: String,
}

impl ClusterId {
    pub fn local(cfg: &Config) -> ClusterId {
        ClusterId {
            system_identifier: None,
            host: hostname(),
            database: crate::catalog::target(cfg).database,
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // (or truncates) within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// What became of one attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// Worth trying again (timeout, connection refused, 5xx, 408, 429),
    /// after the seconds the receiver asked for (Retry-After) if any.
    Retry(String, Option<u64>),
    /// Not worth trying again (4xx, authentication refused, a bad address).
    Fail(String),
    /// walshipper's own configuration failed (a secret or CA file changed
    /// since the start): tried again without using up an attempt.
    Held(String),
}

/// Sends `ev` through channel `c` once.
pub fn send(
    ncfg: &NotifyConfig,
    c: &ChannelConfig,
    ev: &Event,
    cluster: &ClusterId,
    attempt: u32,
) -> Outcome {
    let timeout = ncfg.timeout_of(c);
    match c.kind.as_str() {
        "webhook" => webhook::send(c, ev, cluster, attempt, timeout),
        "email" => email::send(c, ev, cluster, timeout),
        other => Outcome::Fail(format!("unknown channel type {other}")),
    }
}

pub use crate::config::read_secret_file as read_secret;

/// Text from a peer or a library, made safe for a log line, the catalog
/// and a message: control characters out, at most `max` characters.
pub fn clean(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// Sends a test message through `channel` (every channel when None) now.
pub fn test(cfg: &Config, channel: Option<&str>) -> Result<()> {
    let n = &cfg.notify;
    n.validate()?;
    if n.channels.is_empty() {
        return Err(Error::Config(
            "no [[notify.channel]] is configured: nothing to test".into(),
        ));
    }
    let chosen: Vec<&ChannelConfig> = n
        .channels
        .iter()
        .filter(|c| channel.is_none_or(|name| c.name == name))
        .collect();
    if chosen.is_empty() {
        return Err(Error::Invalid(format!(
            "no channel is named '{}' (configured: {})",
            channel.unwrap_or_default(),
            n.channels
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let cluster = ClusterId::local(cfg);
    let now = chrono::Utc::now();
    let ev = Event {
        event_id: 0,
        event: "test".into(),
        alert_id: None,
        kind: "notification_test".into(),
        severity: "info".into(),
        subject: String::new(),
        job: None,
        message: format!(
            "test notification from walshipper notify-test on {} at {}",
            cluster.host,
            now.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        hint: None,
        details: serde_json::json!({}),
        created_at: now,
        raised_at: None,
        resolved_at: None,
    };
    let mut failed = Vec::new();
    for c in chosen {
        match send(n, c, &ev, &cluster, 1) {
            Outcome::Sent => println!("{} ({}): ok", c.name, describe(c)),
            Outcome::Retry(e, _) | Outcome::Fail(e) | Outcome::Held(e) => {
                println!("{} ({}): FAILED: {e}", c.name, describe(c));
                failed.push(c.name.clone());
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Check(format!(
            "notify-test: {} failed ({})",
            if failed.len() == 1 {
                "one channel"
            } else {
                "channels"
            },
            failed.join(", ")
        )))
    }
}

/// Where a channel sends, without secrets (a webhook URL's path and query
/// may hold a token: only its scheme, host and port).
pub fn describe(c: &ChannelConfig) -> String {
    match c.kind.as_str() {
        "webhook" => format!("webhook {}", webhook::redacted_url(&c.url)),
        "email" => format!(
            "email via {}:{} to {}",
            c.smtp_host,
            email::port_of(c),
            c.to.join(", ")
        ),
        other => other.to_string(),
    }
}

/// Starts the notifier thread `walshipper serve` runs beside its HTTP
/// server (None: no channel is configured). It never returns an error for
/// a channel that fails: that is retried, then raised as an alert.
pub fn spawn(cfg: &Config) -> Result<Option<std::thread::JoinHandle<()>>> {
    if cfg.notify.channels.is_empty() {
        return Ok(None);
    }
    cfg.notify.validate()?;
    cfg.notify.check_files()?;
    outbox::spawn(cfg).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w.toml");
        std::fs::write(&p, text).unwrap();
        Config::load_with_env(Some(&p), Vec::<(String, String)>::new())
    }

    const BASE: &str = "[repo]\ntype = \"posix\"\npath = \"/tmp/x\"\n";

    #[test]
    fn channels_parse_and_are_checked() {
        let cfg = load(&format!(
            "{BASE}[notify]\nrate_limit = 5\n\
             [[notify.channel]]\nname = \"ops\"\ntype = \"webhook\"\nurl = \"https://h.example/x?token=s\"\nsecret_file = \"/s\"\nmin_severity = \"critical\"\njobs = [\"nightly\"]\n\
             [[notify.channel]]\nname = \"mail\"\ntype = \"email\"\nsmtp_host = \"smtp.example\"\nfrom = \"a@example.org\"\nto = [\"b@example.org\"]\nusername = \"u\"\npassword_file = \"/p\"\n"
        ))
        .unwrap();
        cfg.notify.validate().unwrap();
        assert_eq!(cfg.notify.channels.len(), 2);
        assert_eq!(cfg.notify.rate_limit_of(&cfg.notify.channels[0]), 5);
        assert_eq!(email::port_of(&cfg.notify.channels[1]), 587);
        // The URL's token is not shown.
        assert_eq!(
            describe(&cfg.notify.channels[0]),
            "webhook https://h.example"
        );

        for (bad, want) in [
            ("name = \"a b\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1\"\nsecret_file = \"/s\"", "name must be"),
            ("name = \"a\"\ntype = \"sms\"", "type must be webhook or email"),
            ("name = \"a\"\ntype = \"webhook\"\nurl = \"ftp://x\"\nsecret_file = \"/s\"", "http:// or https://"),
            ("name = \"a\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1\"", "secret_file"),
            ("name = \"a\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1\"\nsecret_file = \"/s\"\nmin_severity = \"high\"", "min_severity"),
            ("name = \"a\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1\"\nsecret_file = \"/s\"\nkinds = [\"backup_fail\"]", "unknown alert kind 'backup_fail'"),
            ("name = \"a\"\ntype = \"email\"\nsmtp_host = \"smtp.example\"\ntls = \"none\"\nfrom = \"a@b.c\"\nto = [\"d@e.f\"]", "loopback"),
            ("name = \"a\"\ntype = \"email\"\nsmtp_host = \"h\"\nfrom = \"a@b.c\"\nto = []", "to"),
            ("name = \"a\"\ntype = \"email\"\nsmtp_host = \"h\"\nfrom = \"not an address\"\nto = [\"d@e.f\"]", "from"),
            ("name = \"a\"\ntype = \"email\"\nsmtp_host = \"h\"\nfrom = \"a@b.c\"\nto = [\"d@e.f\"]\nusername = \"u\"", "password_file"),
            ("name = \"a\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1\"\nsecret_file = \"/s\"\nheaders = { \"Bad Header\" = \"v\" }", "header"),
        ] {
            let e = load(&format!("{BASE}[[notify.channel]]\n{bad}\n"))
                .and_then(|c| c.notify.validate())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        for (n, want) in [
            ("max_age = 0", "notify.max_age: at least 60"),
            ("poll_interval = 600\nmax_age = 300", "at least 600"),
        ] {
            let e = load(&format!("{BASE}[notify]\n{n}\n"))
                .and_then(|c| c.notify.validate())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{n}: {e}");
        }
    }

    #[test]
    fn secrets_must_be_private_and_lose_their_newline() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        std::fs::write(&p, " k3y \r\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secret(&p, "x").unwrap_err().to_string();
        assert!(e.contains("chmod 600") && !e.contains("k3y"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&p, "x").unwrap().as_slice(), b"k3y");
    }

    #[test]
    fn channel_files_are_read_at_start() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("s");
        let cfg = |file: &std::path::Path| NotifyConfig {
            channels: vec![ChannelConfig {
                name: "ops".into(),
                kind: "webhook".into(),
                url: "https://h.example/".into(),
                secret_file: file.to_path_buf(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = cfg(&secret).check_files().unwrap_err().to_string();
        assert!(e.contains("notify.channel 'ops' secret_file"), "{e}");
        std::fs::write(&secret, "k").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(cfg(&secret).check_files().is_err());
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        cfg(&secret).check_files().unwrap();
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        let n = NotifyConfig::default();
        assert_eq!(
            (1..=9).map(|a| n.backoff(a)).collect::<Vec<_>>(),
            [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
        );
    }
}
