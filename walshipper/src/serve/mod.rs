//! `serve`: the monitoring service. One small HTTP server (not inside a
//! PostgreSQL backend) that reads the catalog and the repositories and
//! serves `/metrics` (Prometheus), `/health`, the dashboard (`/`) and the
//! compliance report (`/report`); beside it runs the notifier
//! (crate::notify), which sends alerts out by webhook and e-mail.

pub mod charts;
pub mod dashboard;
pub mod http;
pub mod metrics;
pub mod report;
pub mod repos;

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::catalog::Session;
use crate::config::Config;
use crate::error::{Error, Result};
use http::{Request, Response};

/// `[serve]` (docs/operations.md, "The monitoring service").
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address and port to listen on. Anything but a loopback address
    /// needs `token_file` or `basic_auth_user` + `basic_auth_password_file`.
    pub listen: String,
    /// A file holding the bearer token clients must send
    /// (`Authorization: Bearer <token>`); empty = no token.
    pub token_file: PathBuf,
    /// Basic authentication: the user name and a file holding the password.
    pub basic_auth_user: String,
    pub basic_auth_password_file: PathBuf,
    /// The catalog connection; empty (0 for the port) = `[pg]`'s value.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub database: String,
    /// A file holding the catalog role's password; empty = PGPASSWORD or none.
    pub password_file: PathBuf,
    /// Seconds each catalog query may take (its statement_timeout).
    pub statement_timeout: u64,
    /// Seconds the repositories' state (`info`) read for the dashboard is
    /// kept before it is read again.
    pub info_interval: u64,
    /// Threads answering requests (each with its own catalog connection).
    pub workers: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: "127.0.0.1:9187".into(),
            token_file: PathBuf::new(),
            basic_auth_user: String::new(),
            basic_auth_password_file: PathBuf::new(),
            host: String::new(),
            port: 0,
            user: String::new(),
            database: String::new(),
            password_file: PathBuf::new(),
            statement_timeout: 10,
            info_interval: 300,
            workers: 4,
        }
    }
}

/// Set when SIGTERM or SIGINT arrived: the server stops accepting, finishes
/// the requests in hand and returns. The notifier may poll it too.
static STOP: AtomicBool = AtomicBool::new(false);

/// True once the service is shutting down.
pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// A secret file's text (crate::config::read_secret_file), which must be UTF-8.
pub fn read_secret(path: &Path, key: &str) -> Result<Zeroizing<String>> {
    let bytes = crate::config::read_secret_file(path, key)?;
    match std::str::from_utf8(&bytes) {
        Ok(t) => Ok(Zeroizing::new(t.to_string())),
        Err(_) => Err(Error::Config(format!(
            "{key} {} is not UTF-8 text",
            path.display()
        ))),
    }
}

/// What clients must present (when anything).
pub enum Auth {
    None,
    /// SHA-256 of the token: compared in constant time, length included.
    Token([u8; 32]),
    Basic {
        user: [u8; 32],
        password: [u8; 32],
    },
}

fn digest(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

/// Constant-time equality of `given` with a stored digest: both sides are
/// hashed first, so neither the content nor the length leaks by timing.
pub fn secret_matches(given: &[u8], stored: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    digest(given).ct_eq(stored).into()
}

impl Auth {
    pub fn from_config(s: &ServeConfig) -> Result<Auth> {
        let token = !s.token_file.as_os_str().is_empty();
        let basic =
            !s.basic_auth_user.is_empty() || !s.basic_auth_password_file.as_os_str().is_empty();
        match (token, basic) {
            (true, true) => Err(Error::Config(
                "[serve] sets both token_file and basic auth: choose one".into(),
            )),
            (true, false) => {
                let t = read_secret(&s.token_file, "serve.token_file")?;
                Ok(Auth::Token(digest(t.as_bytes())))
            }
            (false, true) => {
                if s.basic_auth_user.is_empty() || s.basic_auth_password_file.as_os_str().is_empty()
                {
                    return Err(Error::Config(
                        "[serve] basic auth needs both basic_auth_user and basic_auth_password_file".into(),
                    ));
                }
                let p = read_secret(
                    &s.basic_auth_password_file,
                    "serve.basic_auth_password_file",
                )?;
                Ok(Auth::Basic {
                    user: digest(s.basic_auth_user.as_bytes()),
                    password: digest(p.as_bytes()),
                })
            }
            (false, false) => Ok(Auth::None),
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Token(_) => "bearer token",
            Auth::Basic { .. } => "basic",
        }
    }

    /// Whether the `Authorization` header value satisfies this.
    pub fn allows(&self, header: Option<&str>) -> bool {
        use base64::Engine;
        match self {
            Auth::None => true,
            Auth::Token(t) => match header.and_then(|h| strip_scheme(h, "Bearer")) {
                Some(given) => secret_matches(given.as_bytes(), t),
                None => false,
            },
            Auth::Basic { user, password } => {
                let Some(b64) = header.and_then(|h| strip_scheme(h, "Basic")) else {
                    return false;
                };
                let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64) else {
                    return false;
                };
                let raw = Zeroizing::new(raw);
                let Some(colon) = raw.iter().position(|b| *b == b':') else {
                    return false;
                };
                // Both compared, always: no early exit on a wrong user.
                let u = secret_matches(&raw[..colon], user);
                let p = secret_matches(&raw[colon + 1..], password);
                u & p
            }
        }
    }

    fn challenge(&self) -> &'static str {
        match self {
            Auth::Basic { .. } => "Basic realm=\"walshipper\", charset=\"UTF-8\"",
            _ => "Bearer realm=\"walshipper\"",
        }
    }
}

/// `Bearer xyz` -> `xyz` (the scheme is case-insensitive).
fn strip_scheme<'a>(h: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = h.trim().split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

/// The address to listen on, refused when it is not loopback and no
/// authentication is configured.
pub fn listen_addr(s: &ServeConfig, auth: &Auth) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = s
        .listen
        .to_socket_addrs()
        .map_err(|e| {
            Error::Config(format!(
                "[serve] listen = '{}' is not an address and port (e.g. 127.0.0.1:9187): {e}",
                s.listen
            ))
        })?
        .collect();
    let Some(first) = addrs.first().copied() else {
        return Err(Error::Config(format!(
            "[serve] listen = '{}' resolves to no address",
            s.listen
        )));
    };
    if matches!(auth, Auth::None) && !addrs.iter().all(|a| a.ip().is_loopback()) {
        return Err(Error::Config(format!(
            "[serve] listen = '{}' is not a loopback address and no authentication is configured: \
             anyone who can reach it would see the backups' state. Set [serve] token_file (a bearer \
             token) or basic_auth_user + basic_auth_password_file, or listen on 127.0.0.1",
            s.listen
        )));
    }
    Ok(first)
}

/// Blocks SIGTERM and SIGINT in this thread and every thread started
/// later, and starts a thread that waits for them and sets STOP.
fn catch_stop_signals() {
    // SAFETY: plain sigset manipulation on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    };
    // SAFETY: blocking signals for the calling thread with a valid set.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        tracing::warn!("cannot block SIGTERM/SIGINT: they will end the service abruptly");
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait with a valid set and out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                tracing::info!("signal {sig} received: stopping");
                STOP.store(true, Ordering::SeqCst);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the signal thread: {e}");
    }
}

pub fn run(cfg: &Config) -> Result<()> {
    let s = &cfg.serve;
    if s.statement_timeout == 0 {
        return Err(Error::Config(
            "[serve] statement_timeout must be at least 1 second".into(),
        ));
    }
    if s.workers == 0 || s.workers > 64 {
        return Err(Error::Config(
            "[serve] workers must be between 1 and 64".into(),
        ));
    }
    let auth = Auth::from_config(s)?;
    let addr = listen_addr(s, &auth)?;
    catch_stop_signals();
    let listener = TcpListener::bind(addr)
        .map_err(|e| Error::io(format!("cannot listen on {addr} ([serve] listen)"), e))?;
    let local = listener.local_addr().unwrap_or(addr);
    let t = crate::catalog::target(cfg);
    tracing::info!(
        "walshipper serve listening on http://{local} (authentication: {}); catalog host={} port={} user={} dbname={}",
        auth.describe(),
        t.host,
        t.port,
        t.user,
        t.database
    );
    let notifier = crate::notify::spawn(cfg)?;
    if let Err(e) = repos::spawn_refresher(cfg, &STOP) {
        tracing::warn!(
            "cannot start the repository reader thread: {e}; the dashboard shows no WAL"
        );
    }
    http::serve(
        listener,
        s.workers,
        &STOP,
        || Session::new(cfg),
        |session, req| route(cfg, &auth, session, req),
    );
    if let Some(n) = notifier {
        // Let a message being sent finish and be recorded (else it goes out
        // again after its lease), within systemd's TimeoutStopSec (30 s).
        let bound = (cfg.notify.timeout.saturating_mul(4) + 5).min(25);
        crate::notify::outbox::join(n, std::time::Duration::from_secs(bound));
    }
    tracing::info!("walshipper serve stopped");
    Ok(())
}

/// A page's failure as a short answer: 503 when the catalog cannot be
/// reached (`catalog_unreachable`), 500 otherwise (a permission denied, a
/// statement timeout: retrying will not help). The message is for an
/// operator; it never holds a secret (errors name settings, not values).
fn failure(what: &str, e: &Error) -> Response {
    tracing::warn!("{what}: {e}");
    let status = if catalog_unreachable(e) { 503 } else { 500 };
    Response::text(status, format!("{what}: {e}"))
}

/// Whether `e` means no connection to the catalog: none could be opened or
/// it closed (no server answer at all), a connection exception (SQLSTATE
/// class 08), or the server shutting down or starting (57P01..57P03).
fn catalog_unreachable(e: &Error) -> bool {
    let Error::Postgres { source, .. } = e else {
        return false;
    };
    match source.as_db_error() {
        // Not the server's answer: closed, or a socket error (refused,
        // reset); a column that does not convert is neither.
        None => {
            source.is_closed() || {
                let mut cause = std::error::Error::source(source);
                let mut io = false;
                while let Some(c) = cause {
                    io |= c.is::<std::io::Error>();
                    cause = c.source();
                }
                io
            }
        }
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        }
    }
}

fn route(cfg: &Config, auth: &Auth, session: &mut Session, req: &Request) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response::text(405, "only GET and HEAD").with_header("Allow", "GET, HEAD");
    }
    if req.path == "/health" {
        return health(session);
    }
    if !auth.allows(req.header("authorization")) {
        return Response::text(401, "authentication required")
            .with_header("WWW-Authenticate", auth.challenge());
    }
    match req.path.as_str() {
        "/metrics" => {
            let body = metrics::scrape(session, &cfg.primary().name);
            Response::new(200, metrics::CONTENT_TYPE, body)
        }
        "/" => match session.with(|db| dashboard::render(db, cfg)) {
            Ok(page) => Response::html(page),
            Err(e) => failure("the dashboard failed", &e),
        },
        "/report" => {
            let (from, to) = match report::parse_period(
                req.query_param("from").as_deref(),
                req.query_param("to").as_deref(),
            ) {
                Ok(p) => p,
                Err(e) => return Response::text(400, e.to_string()),
            };
            match session.with(|db| report::render(db, from, to)) {
                Ok(page) => Response::html(page),
                Err(e) => failure("the report failed", &e),
            }
        }
        "/favicon.ico" => Response::new(204, "image/x-icon", Vec::new()),
        _ => Response::text(
            404,
            "not found: this service serves /, /report, /metrics and /health",
        ),
    }
}

/// `/health`: 200 when the catalog answers, 503 otherwise. It needs no
/// authentication, so it reveals nothing but that: the reason is one of
/// two fixed phrases, the details go to the log.
fn health(session: &mut Session) -> Response {
    let checked = "connect to the catalog and read backup.job_status";
    let r = session.with(|db| {
        let sql = "SELECT count(*) FROM backup.job_status";
        db.query_one(sql, &[]).map_err(crate::pg::pg_err(sql))?;
        Ok(())
    });
    let (status, body) = match r {
        Ok(()) => (200, serde_json::json!({"status": "ok", "checked": checked})),
        Err(e) => {
            tracing::warn!("health check failed: {e}");
            let reason = match &e {
                Error::Postgres { source, .. } if source.as_db_error().is_some() => {
                    "the catalog query failed (the service's log says why)"
                }
                _ => "cannot connect to the catalog (the service's log says why)",
            };
            (
                503,
                serde_json::json!({"status": "unavailable", "checked": checked, "reason": reason}),
            )
        }
    };
    Response::new(status, "application/json", body.to_string() + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_comparison() {
        use base64::Engine;
        let t = Auth::Token(digest(b"s3cret"));
        assert!(t.allows(Some("Bearer s3cret")));
        assert!(t.allows(Some("bearer  s3cret ")));
        assert!(!t.allows(Some("Bearer s3cre")));
        assert!(!t.allows(Some("Bearer s3cret2")));
        assert!(!t.allows(Some("Basic s3cret")));
        assert!(!t.allows(None));
        let b = Auth::Basic {
            user: digest(b"prom"),
            password: digest(b"pa:ss"),
        };
        let enc = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        assert!(b.allows(Some(&enc("prom:pa:ss"))));
        assert!(!b.allows(Some(&enc("prom:pa:s"))));
        assert!(!b.allows(Some(&enc("other:pa:ss"))));
        assert!(!b.allows(Some(&enc("prompa:ss"))));
        assert!(!b.allows(Some("Basic !!!")));
        assert!(Auth::None.allows(None));
    }

    #[test]
    fn non_loopback_needs_auth() {
        let mut s = ServeConfig::default();
        assert!(listen_addr(&s, &Auth::None).is_ok());
        s.listen = "[::1]:0".into();
        assert!(listen_addr(&s, &Auth::None).is_ok());
        s.listen = "0.0.0.0:9187".into();
        let e = listen_addr(&s, &Auth::None).unwrap_err().to_string();
        assert!(
            e.contains("not a loopback address") && e.contains("token_file"),
            "{e}"
        );
        assert!(listen_addr(&s, &Auth::Token(digest(b"x"))).is_ok());
        s.listen = "nonsense".into();
        assert!(listen_addr(&s, &Auth::Token(digest(b"x"))).is_err());
    }
}
