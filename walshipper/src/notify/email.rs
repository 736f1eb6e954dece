//! E-mail: a plain-text message per event over SMTP, with STARTTLS
//! required by default (or implicit TLS), and AUTH when a username is set.
//! An authentication the server refuses fails at once (retrying a wrong
//! password only locks the account), with the server and the user named.

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{Message, SmtpTransport, Transport};

use super::{clean, read_secret, ChannelConfig, ClusterId, Event, Outcome};
use crate::error::{Error, Result};

pub fn port_of(c: &ChannelConfig) -> u16 {
    match (c.smtp_port, c.tls.as_str()) {
        (0, "tls") => 465,
        (0, _) => 587,
        (p, _) => p,
    }
}

pub(super) fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub(super) fn validate(c: &ChannelConfig, at: &str) -> Result<()> {
    let bad = |m: String| Err(Error::Config(format!("{at}: {m}")));
    if c.smtp_host.is_empty() || c.smtp_host.chars().any(|ch| ch.is_control() || ch == ' ') {
        return bad("smtp_host is required (the SMTP server's name)".into());
    }
    match c.tls.as_str() {
        "starttls" | "tls" => {}
        "none" if is_loopback(&c.smtp_host) => {}
        "none" => {
            return bad(format!(
                "tls = \"none\" sends the password and the alerts in clear: allowed only to a loopback smtp_host, not {}",
                c.smtp_host
            ))
        }
        other => return bad(format!("tls must be starttls, tls or none, not '{other}'")),
    }
    if c.from.parse::<Mailbox>().is_err() {
        return bad("from must be an e-mail address".into());
    }
    if c.to.is_empty() {
        return bad("to must list at least one address".into());
    }
    if let Some(t) = c.to.iter().find(|t| t.parse::<Mailbox>().is_err()) {
        return bad(format!("to: '{}' is not an e-mail address", clean(t, 100)));
    }
    if !c.username.is_empty() && c.password_file.as_os_str().is_empty() {
        return bad("username is set: password_file is required (a file, mode 0600)".into());
    }
    if c.subject_prefix.chars().any(|ch| ch.is_control()) {
        return bad("subject_prefix holds a control character".into());
    }
    if !c.url.is_empty() || !c.secret_file.as_os_str().is_empty() {
        return bad("url and secret_file are webhook settings, not an e-mail channel's".into());
    }
    Ok(())
}

fn when(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The subject line: `[pg_backup] CRITICAL backup_failed nightly: ...`,
/// `[pg_backup] RESOLVED ...`, `[pg_backup] TEST ...`.
pub fn subject(c: &ChannelConfig, ev: &Event) -> String {
    let what = match ev.event.as_str() {
        "resolved" => "RESOLVED".to_string(),
        "test" => "TEST".to_string(),
        _ => ev.severity.to_uppercase(),
    };
    let about = if ev.subject.is_empty() {
        String::new()
    } else {
        format!(" {}", ev.subject)
    };
    clean(
        &format!(
            "{} {what} {}{about}: {}",
            c.subject_prefix,
            ev.kind,
            clean(&ev.message, 120)
        ),
        200,
    )
}

/// The plain-text body: what, where, when, what to do, where to look.
pub fn body(c: &ChannelConfig, ev: &Event, cluster: &ClusterId) -> String {
    let mut b = String::new();
    let head = match ev.event.as_str() {
        "resolved" => format!("Resolved: the {} alert has cleared.", ev.kind),
        "test" => "A test of this notification channel: nothing is wrong.".to_string(),
        _ => format!("A {} alert was raised: {}.", ev.severity, ev.kind),
    };
    b.push_str(&head);
    b.push_str("\n\n");
    b.push_str(&format!("What:  {}\n", ev.message));
    let mut where_ = String::new();
    if !ev.subject.is_empty() {
        where_.push_str(&ev.subject);
        if let Some(j) = &ev.job {
            if j != &ev.subject {
                where_.push_str(&format!(" (job {j})"));
            }
        }
        where_.push_str(", ");
    }
    where_.push_str(&format!(
        "database {} seen from host {}",
        cluster.database, cluster.host
    ));
    if let Some(s) = &cluster.system_identifier {
        where_.push_str(&format!(" (system identifier {s})"));
    }
    b.push_str(&format!("Where: {where_}\n"));
    match ev.event.as_str() {
        "resolved" => {
            if let Some(r) = ev.raised_at {
                b.push_str(&format!("When:  raised {}", when(r)));
                b.push_str(&format!(", resolved {}\n", when(ev.created_at)));
            } else {
                b.push_str(&format!("When:  resolved {}\n", when(ev.created_at)));
            }
        }
        _ => b.push_str(&format!("When:  {}\n", when(ev.created_at))),
    }
    if ev.event == "raised" {
        if let Some(h) = &ev.hint {
            b.push_str(&format!("\nWhat to do: {h}\n"));
        }
    }
    if let Some(id) = ev.alert_id {
        b.push_str(&format!(
            "\nThe alert in the catalog:\n  SELECT * FROM backup.alerts WHERE alert_id = {id};\n"
        ));
        if ev.event == "raised" {
            b.push_str(&format!(
                "Acknowledge it (it stays open until its condition clears):\n  SELECT backup.alert_ack({id});\n"
            ));
        }
    }
    if ev.details.as_object().is_some_and(|o| !o.is_empty()) {
        b.push_str(&format!("\nDetails: {}\n", ev.details));
    }
    b.push_str(&format!(
        "\n-- \nSent by walshipper's notifier, channel {}{}.\n",
        c.name,
        if ev.event_id > 0 {
            format!(
                ", event {} (SELECT * FROM backup.notification_deliveries WHERE event_id = {})",
                ev.event_id, ev.event_id
            )
        } else {
            String::new()
        }
    ));
    b
}

pub(super) fn send(
    c: &ChannelConfig,
    ev: &Event,
    cluster: &ClusterId,
    timeout: Duration,
) -> Outcome {
    let at = format!("notify.channel '{}'", c.name);
    let port = port_of(c);
    let server = format!("{}:{port}", c.smtp_host);
    let message = match build(c, ev, cluster) {
        Ok(m) => m,
        Err(e) => return Outcome::Fail(format!("{at}: cannot build the message: {e}")),
    };
    // A local file gone wrong since the start (checked then): retried.
    let tls = match tls(c, &at) {
        Ok(t) => t,
        Err(e) => return Outcome::Held(e.to_string()),
    };
    let mut b = SmtpTransport::builder_dangerous(c.smtp_host.as_str())
        .port(port)
        .tls(tls)
        .timeout(Some(timeout));
    if !c.username.is_empty() {
        let password = match read_secret(&c.password_file, &format!("{at} password_file")) {
            Ok(p) => p,
            Err(e) => return Outcome::Held(e.to_string()),
        };
        let Ok(password) = String::from_utf8(password.to_vec()) else {
            return Outcome::Held(format!("{at} password_file is not UTF-8 text"));
        };
        b = b.credentials(Credentials::new(c.username.clone(), password));
    }
    let transport = b.build();
    // lettre's timeout is per socket operation: a server that answers
    // each command slowly could hold the channel for ever. The whole
    // message gets TOTAL timeouts (the claim's lease in outbox.rs is
    // longer); past that it is retried later and the thread, left alone,
    // ends at its next socket timeout.
    let total = timeout * TOTAL;
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("smtp-{}", c.name))
        .spawn(move || {
            let _ = tx.send(transport.send(&message));
        });
    if let Err(e) = spawned {
        return Outcome::Retry(format!("{at}: cannot start the SMTP thread: {e}"), None);
    }
    match rx.recv_timeout(total) {
        Ok(Ok(_)) => Outcome::Sent,
        Ok(Err(e)) => classify(&e, &server, &c.username, &at),
        Err(_) => Outcome::Retry(
            format!(
                "SMTP server {server} did not take the message within {} s",
                total.as_secs()
            ),
            None,
        ),
    }
}

/// One message's deadline, in channel timeouts (outbox.rs leases a claim
/// for more: timeout × 4 + 30 s).
pub const TOTAL: u32 = 4;

fn build(c: &ChannelConfig, ev: &Event, cluster: &ClusterId) -> Result<Message, String> {
    let mut m = Message::builder()
        .from(c.from.parse::<Mailbox>().map_err(|e| e.to_string())?)
        .subject(subject(c, ev))
        .header(ContentType::TEXT_PLAIN);
    for t in &c.to {
        m = m.to(t.parse::<Mailbox>().map_err(|e| e.to_string())?);
    }
    m.body(body(c, ev, cluster)).map_err(|e| e.to_string())
}

fn tls(c: &ChannelConfig, at: &str) -> Result<Tls> {
    if c.tls == "none" {
        return Ok(Tls::None);
    }
    let mut p = TlsParameters::builder(c.smtp_host.clone());
    if !c.tls_ca_file.as_os_str().is_empty() {
        let pem = std::fs::read(&c.tls_ca_file).map_err(|e| {
            Error::Config(format!("{at} tls_ca_file {}: {e}", c.tls_ca_file.display()))
        })?;
        let cert = Certificate::from_pem(&pem).map_err(|e| {
            Error::Config(format!(
                "{at} tls_ca_file {}: not PEM certificates: {e}",
                c.tls_ca_file.display()
            ))
        })?;
        p = p.add_root_certificate(cert);
    }
    let p = p
        .build_rustls()
        .map_err(|e| Error::Config(format!("{at}: TLS setup: {e}")))?;
    Ok(if c.tls == "tls" {
        Tls::Wrapper(p)
    } else {
        Tls::Required(p)
    })
}

/// Reads every file channel `c` needs (at start).
pub(super) fn check_files(c: &ChannelConfig, at: &str) -> Result<()> {
    tls(c, at)?;
    if !c.username.is_empty() {
        let p = read_secret(&c.password_file, &format!("{at} password_file"))?;
        if std::str::from_utf8(&p).is_err() {
            return Err(Error::Config(format!(
                "{at} password_file is not UTF-8 text"
            )));
        }
    }
    Ok(())
}

/// Retry what may pass later (a timeout, a refused connection, a 4xx
/// reply); fail a refused authentication, any other 5xx reply and a TLS
/// failure at once, saying what to check.
fn classify(e: &lettre::transport::smtp::Error, server: &str, user: &str, at: &str) -> Outcome {
    let text = clean(&e.to_string(), 300);
    let code = e.status().map(|c| c.to_string()).unwrap_or_default();
    if e.is_permanent() && matches!(code.as_str(), "530" | "534" | "535" | "538") {
        return Outcome::Fail(format!(
            "SMTP server {server} refused authentication for user '{}': {text} \
             (check username and password_file of {at}; the password is not shown)",
            clean(user, 100)
        ));
    }
    if e.is_permanent() {
        return Outcome::Fail(format!("SMTP server {server} refused the message: {text}"));
    }
    if e.is_tls() {
        return Outcome::Fail(format!(
            "SMTP server {server}: TLS failed: {text} (a private CA: tls_ca_file of {at}; a server without STARTTLS: tls = \"tls\" on port 465)"
        ));
    }
    if e.is_timeout() {
        return Outcome::Retry(
            format!("SMTP server {server} did not answer in time: {text}"),
            None,
        );
    }
    if e.is_client() && !e.is_transient() {
        // e.g. no STARTTLS offered while tls = "starttls" requires it.
        return Outcome::Fail(format!("SMTP server {server}: {text}"));
    }
    Outcome::Retry(format!("SMTP server {server}: {text}"), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_and_body_say_what_where_when_and_what_to_do() {
        let c = ChannelConfig {
            name: "mail".into(),
            ..Default::default()
        };
        let mut ev = Event {
            event_id: 7,
            event: "raised".into(),
            alert_id: Some(3),
            kind: "backup_failed".into(),
            severity: "critical".into(),
            subject: "nightly".into(),
            job: Some("nightly".into()),
            message: "backup 5 (nightly) failed: disk full\r\nBcc: x@y".into(),
            hint: Some("free space".into()),
            details: serde_json::json!({"execution_id": 5}),
            created_at: chrono::Utc::now(),
            raised_at: None,
            resolved_at: None,
        };
        let cl = ClusterId {
            system_identifier: Some("123".into()),
            host: "db1".into(),
            database: "postgres".into(),
        };
        let s = subject(&c, &ev);
        assert!(
            s.starts_with("[pg_backup] CRITICAL backup_failed nightly: backup 5"),
            "{s}"
        );
        assert!(!s.contains('\n') && !s.contains('\r'), "{s}");
        let b = body(&c, &ev, &cl);
        assert!(b.contains("What to do: free space"), "{b}");
        assert!(b.contains("alert_id = 3"), "{b}");
        assert!(b.contains("system identifier 123"), "{b}");
        ev.event = "resolved".into();
        assert!(subject(&c, &ev).starts_with("[pg_backup] RESOLVED backup_failed nightly"));
    }
}
