//! Webhooks: the event as JSON, POSTed, signed with HMAC-SHA256 over
//! "<timestamp>.<body>" (X-PgBackup-Signature: sha256=<hex>), the
//! timestamp in X-PgBackup-Timestamp so a receiver can refuse replays.
//! 2xx is delivered; 5xx, 408, 429, a timeout or a connection error is
//! retried; any other answer fails at once.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{clean, read_secret, ChannelConfig, ClusterId, Event, Outcome};
use crate::error::{Error, Result};

pub(super) fn validate(c: &ChannelConfig, at: &str) -> Result<()> {
    let bad = |m: String| Err(Error::Config(format!("{at}: {m}")));
    let rest = c
        .url
        .strip_prefix("https://")
        .or_else(|| c.url.strip_prefix("http://"));
    match rest {
        Some(r) if !r.is_empty() && !r.starts_with('/') => {}
        _ => return bad("url must be an http:// or https:// URL".into()),
    }
    if c.url.chars().any(|ch| ch.is_control() || ch == ' ') {
        return bad("url holds a space or a control character".into());
    }
    // In clear, the alert and the Authorization header could be read on
    // the way: only to this host.
    if let Some(rest) = c.url.strip_prefix("http://") {
        if !super::email::is_loopback(&host_of(rest)) {
            return bad(format!(
                "url {} is plain http:// to another host: use https:// (http:// only to localhost, 127.0.0.1 or ::1)",
                redacted_url(&c.url)
            ));
        }
    }
    if c.secret_file.as_os_str().is_empty() {
        return bad(
            "secret_file is required: the key the body is signed with (HMAC-SHA256), so the receiver can check the sender"
                .into(),
        );
    }
    for (k, v) in &c.headers {
        let token = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token || v.chars().any(|ch| ch.is_control()) {
            return bad(format!(
                "headers: '{}' is not a valid header name and value",
                clean(k, 60)
            ));
        }
        let lower = k.to_ascii_lowercase();
        if lower.starts_with("x-pgbackup-") || lower == "content-type" || lower == "authorization" {
            return bad(format!(
                "headers: {k} is set by walshipper (an Authorization header comes from authorization_file)"
            ));
        }
    }
    if !matches!(c.smtp_host.as_str(), "") || !c.to.is_empty() {
        return bad("smtp_host and to are e-mail settings, not a webhook's".into());
    }
    Ok(())
}

/// The host of "host[:port]/..." after the scheme (user info and port
/// dropped; an IPv6 address keeps its brackets).
fn host_of(rest: &str) -> String {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let hostport = authority.rsplit('@').next().unwrap_or_default();
    if hostport.starts_with('[') {
        return hostport
            .split_inclusive(']')
            .next()
            .unwrap_or_default()
            .to_string();
    }
    hostport.split(':').next().unwrap_or_default().to_string()
}

/// The URL without what may be a secret (user info, path, query): only
/// scheme, host and port.
pub fn redacted_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some(x) => x,
        None => return "(invalid URL)".into(),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    format!("{scheme}://{}", clean(host, 200))
}

/// The JSON body of the message for `ev`.
pub fn payload(
    ev: &Event,
    cluster: &ClusterId,
    delivery_id: &str,
    attempt: u32,
    sent_at: chrono::DateTime<chrono::Utc>,
) -> serde_json::Value {
    let ts = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.to_rfc3339());
    serde_json::json!({
        "event": ev.event,
        "alert": {
            "id": ev.alert_id,
            "kind": ev.kind,
            "severity": ev.severity,
            "subject": ev.subject,
            "job": ev.job,
            "message": ev.message,
            "hint": ev.hint,
            "details": ev.details,
            "raised_at": ts(ev.raised_at),
            "resolved_at": ts(ev.resolved_at),
        },
        "cluster": cluster,
        "delivery_id": delivery_id,
        "attempt": attempt,
        "event_at": ev.created_at.to_rfc3339(),
        "sent_at": sent_at.to_rfc3339(),
    })
}

/// hex(HMAC-SHA256(secret, "<timestamp>.<body>")).
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // An HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The id of a message: the same for each attempt of one event on one
/// channel, so a receiver can drop a duplicate.
pub fn delivery_id(ev: &Event, channel: &str) -> String {
    if ev.event_id > 0 {
        format!("{}-{channel}", ev.event_id)
    } else {
        // notify-test: no catalog event.
        format!("test-{}-{channel}", ev.created_at.timestamp_millis())
    }
}

pub(super) fn send(
    c: &ChannelConfig,
    ev: &Event,
    cluster: &ClusterId,
    attempt: u32,
    timeout: Duration,
) -> Outcome {
    let at = format!("notify.channel '{}'", c.name);
    // A local file gone wrong since the start (checked then): retried, the
    // operator may fix it; it is not the receiver's fault.
    let (secret, authorization) = match secrets(c, &at) {
        Ok(x) => x,
        Err(e) => return Outcome::Held(e.to_string()),
    };
    let now = chrono::Utc::now();
    let id = delivery_id(ev, &c.name);
    let body = payload(ev, cluster, &id, attempt, now).to_string();
    let ts = now.timestamp();
    let sig = signature(&secret, ts, body.as_bytes());

    let mut config = ureq::Agent::config_builder();
    if !c.tls_ca_file.as_os_str().is_empty() {
        match private_roots(c, &at) {
            Ok(roots) => {
                config =
                    config.tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
            }
            Err(e) => return Outcome::Held(e),
        }
    }
    let agent: ureq::Agent = config
        .timeout_global(Some(timeout))
        .timeout_connect(Some(timeout))
        .http_status_as_error(false)
        // A redirect would resend the signed body somewhere else.
        .max_redirects(0)
        .user_agent(concat!("pg_backup-walshipper/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let mut req = agent
        .post(&c.url)
        .header("Content-Type", "application/json")
        .header("X-PgBackup-Event", &ev.event)
        .header("X-PgBackup-Delivery", &id)
        .header("X-PgBackup-Timestamp", ts.to_string())
        .header("X-PgBackup-Signature", format!("sha256={sig}"));
    if let Some(a) = &authorization {
        req = req.header("Authorization", a);
    }
    for (k, v) in &c.headers {
        req = req.header(k, v);
    }
    let where_ = redacted_url(&c.url);
    match req.send(body.as_bytes()) {
        Ok(resp) => {
            // Only the status: the receiver's text may echo the URL's path
            // (a token) or anything else, and this text goes to the
            // catalog, the logs and the other channels.
            let status = resp.status();
            let said = answered(&where_, status.as_u16(), status.canonical_reason());
            let retry_after = match status.as_u16() {
                429 | 503 => retry_after(
                    resp.headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()),
                ),
                _ => None,
            };
            match status.as_u16() {
                200..=299 => Outcome::Sent,
                408 | 429 | 500..=599 => Outcome::Retry(said, retry_after),
                300..=399 => {
                    Outcome::Fail(format!("{said} (a redirect: set url to where it points)"))
                }
                _ => Outcome::Fail(said),
            }
        }
        Err(e) => {
            let text = scrub(&e.to_string(), c, authorization.as_deref());
            let what = match e {
                ureq::Error::Timeout(_) => format!(
                    "webhook {where_} did not answer within {} s ({text})",
                    timeout.as_secs()
                ),
                _ => format!("webhook {where_}: {text}"),
            };
            match e {
                ureq::Error::BadUri(_) | ureq::Error::InvalidProxyUrl => Outcome::Fail(what),
                _ => Outcome::Retry(what, None),
            }
        }
    }
}

/// Retry-After in its seconds form (the date form is not used by the
/// receivers this is for), at most an hour.
fn retry_after(v: Option<&str>) -> Option<u64> {
    v?.trim().parse::<u64>().ok().map(|s| s.min(3600))
}

/// "webhook <scheme://host> answered <code> <reason>": never the body.
fn answered(where_: &str, status: u16, reason: Option<&str>) -> String {
    match reason {
        Some(r) => format!("webhook {where_} answered {status} {r}"),
        None => format!("webhook {where_} answered {status}"),
    }
}

/// A library's error text without what may be secret: the URL (whole, or
/// its path and query), the header values and the Authorization value.
fn scrub(text: &str, c: &ChannelConfig, authorization: Option<&str>) -> String {
    let mut t = text.to_string();
    let mut secrets: Vec<&str> = vec![c.url.as_str()];
    if let Some(rest) = c.url.split_once("://").map(|x| x.1) {
        if let Some(i) = rest.find(['/', '?', '#']) {
            secrets.push(&rest[i..]);
        }
        // User info (user:password@).
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if let Some((user, _)) = authority.rsplit_once('@') {
            secrets.push(user);
        }
    }
    secrets.extend(c.headers.values().map(String::as_str));
    secrets.extend(authorization);
    // Longest first, so a part does not break up a whole; "/" alone says nothing.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in secrets {
        if s.len() > 1 {
            t = t.replace(s, "[redacted]");
        }
    }
    clean(&t, 300)
}

/// The HMAC key and the Authorization value (if any) of channel `c`.
fn secrets(c: &ChannelConfig, at: &str) -> Result<(Vec<u8>, Option<String>)> {
    let secret = read_secret(&c.secret_file, &format!("{at} secret_file"))?;
    if c.authorization_file.as_os_str().is_empty() {
        return Ok((secret.to_vec(), None));
    }
    let a = read_secret(&c.authorization_file, &format!("{at} authorization_file"))?;
    match std::str::from_utf8(&a) {
        Ok(s) if !s.chars().any(|ch| ch.is_control()) => Ok((secret.to_vec(), Some(s.to_string()))),
        _ => Err(Error::Config(format!(
            "{at} authorization_file must hold one line of text"
        ))),
    }
}

/// Reads every file channel `c` needs (at start: a mistake stops
/// `walshipper serve` instead of failing each message).
pub(super) fn check_files(c: &ChannelConfig, at: &str) -> Result<()> {
    secrets(c, at)?;
    if !c.tls_ca_file.as_os_str().is_empty() {
        private_roots(c, at).map_err(Error::Config)?;
    }
    Ok(())
}

/// The certificates of `tls_ca_file`: the only CAs a receiver's
/// certificate is checked against (an internal receiver's private CA).
fn private_roots(c: &ChannelConfig, at: &str) -> Result<ureq::tls::RootCerts, String> {
    let what = format!("{at} tls_ca_file {}", c.tls_ca_file.display());
    let pem = std::fs::read(&c.tls_ca_file).map_err(|e| format!("{what}: {e}"))?;
    let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err(format!("{what}: no PEM certificate in it"));
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Checked against: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac k3y
        assert_eq!(
            signature(b"k3y", 1_700_000_000, br#"{"a":1}"#),
            "fd5a70e965043f7df6309c2c3b5ff5a8ffa99b1f5175e9a311459e73c4634d4a"
        );
    }

    #[test]
    fn urls_lose_user_path_and_query() {
        assert_eq!(
            redacted_url("https://u:p@hooks.example:8443/T0/B1/XyZ?x=1"),
            "https://hooks.example:8443"
        );
        assert_eq!(redacted_url("http://127.0.0.1:9"), "http://127.0.0.1:9");
    }

    #[test]
    fn retry_after_in_seconds_capped_at_an_hour() {
        assert_eq!(retry_after(Some(" 120 ")), Some(120));
        assert_eq!(retry_after(Some("86400")), Some(3600));
        assert_eq!(retry_after(Some("Wed, 21 Oct 2026 07:28:00 GMT")), None);
        assert_eq!(retry_after(None), None);
    }

    #[test]
    fn plain_http_only_to_loopback() {
        let with = |url: &str| {
            validate(
                &ChannelConfig {
                    url: url.into(),
                    secret_file: "/s".into(),
                    ..Default::default()
                },
                "c",
            )
        };
        for ok in [
            "http://127.0.0.1:9/x",
            "http://localhost/x",
            "http://[::1]:8080/",
            "https://h.example/x",
        ] {
            with(ok).unwrap();
        }
        for bad in [
            "http://h.example/x",
            "http://127.0.0.1.evil.example/",
            "http://localhost@h.example/",
            "http://10.0.0.1:80/",
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("use https://"), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_hold_no_body_no_path_no_header_value() {
        assert_eq!(
            answered("https://h", 404, Some("Not Found")),
            "webhook https://h answered 404 Not Found"
        );
        let c = ChannelConfig {
            url: "https://u:pw@h.example/hook/T0K3N?sig=abc".into(),
            headers: [("X-Api-Key".to_string(), "k3y-value".to_string())].into(),
            ..Default::default()
        };
        let t = scrub(
            "io: https://u:pw@h.example/hook/T0K3N?sig=abc /hook/T0K3N?sig=abc k3y-value Bearer zz",
            &c,
            Some("Bearer zz"),
        );
        for secret in ["T0K3N", "sig=abc", "k3y-value", "Bearer zz", "pw@"] {
            assert!(!t.contains(secret), "{t}");
        }
    }
}
