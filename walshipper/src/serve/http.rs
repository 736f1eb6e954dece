//! A deliberately small HTTP/1.1 server for `walshipper serve`: GET and
//! HEAD only, one request per connection (`Connection: close`), no request
//! bodies. Everything about a request is bounded: the head (request line
//! and headers) is at most `MAX_HEAD` bytes and must arrive within
//! `HEAD_TIMEOUT`; a fixed number of worker threads handle requests and a
//! short queue holds waiting connections (beyond it a client gets 503 at
//! once). tiny_http was considered and not used: it reads header lines
//! without a length limit or deadline and starts a thread per connection,
//! which a client on a non-loopback address could exploit.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest request head (request line + headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest request target (path and query) accepted.
pub const MAX_TARGET: usize = 2048;
/// Time a client has to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections waiting for a worker, beyond those being handled.
const QUEUE: usize = 32;

/// Headers every response carries: the pages are self-contained (inline
/// styles and SVG only, no script), never cached, never framed elsewhere.
pub const SECURITY_HEADERS: &[(&str, &str)] = &[
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("X-Frame-Options", "DENY"),
];

#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path, percent-decoded.
    pub path: String,
    /// The raw query string (after '?'), not decoded.
    pub query: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k, true) == name).then(|| percent_decode(v, true))
        })
    }
}

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A short plain-text answer (errors, 404...).
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        let mut b: String = body.into();
        if !b.ends_with('\n') {
            b.push('\n');
        }
        Self::new(status, "text/plain; charset=utf-8", b)
    }

    pub fn html(body: String) -> Self {
        Self::new(200, "text/html; charset=utf-8", body)
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Decodes %XX escapes (and '+' as a space in a query); invalid escapes
/// are kept as they are, invalid UTF-8 becomes U+FFFD.
pub fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a request head was refused (the status to answer with).
#[derive(Debug, PartialEq)]
pub enum HeadError {
    /// Nothing useful arrived (closed, or timed out before a full head): no answer.
    Gone,
    Status(u16, &'static str),
}

/// Parses a complete request head (without the final empty line).
pub fn parse_head(head: &str) -> Result<Request, HeadError> {
    let bad = |m| HeadError::Status(400, m);
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(bad("malformed request line")),
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HeadError::Status(505, "only HTTP/1.0 and HTTP/1.1"));
    }
    if target.len() > MAX_TARGET {
        return Err(HeadError::Status(414, "request target too long"));
    }
    if !target.starts_with('/') {
        return Err(bad("the request target must be a path"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::new();
    for l in lines {
        let (n, v) = l.split_once(':').ok_or(bad("malformed header"))?;
        if n.is_empty() || n.contains(|c: char| c.is_ascii_whitespace()) {
            return Err(bad("malformed header"));
        }
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
        if headers.len() > 100 {
            return Err(HeadError::Status(431, "too many headers"));
        }
    }
    Ok(Request {
        method: method.to_string(),
        path: percent_decode(path, false),
        query: query.to_string(),
        headers,
    })
}

/// Reads one request head from `stream`, within `MAX_HEAD` bytes and
/// `HEAD_TIMEOUT`. Anything after the head (a body) is ignored.
fn read_head(stream: &mut TcpStream) -> Result<Request, HeadError> {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(if buf.is_empty() {
                HeadError::Gone
            } else {
                HeadError::Status(408, "the request took too long to arrive")
            });
        }
        // set_read_timeout refuses zero; `left` is not zero here.
        if stream.set_read_timeout(Some(left)).is_err() {
            return Err(HeadError::Gone);
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(HeadError::Gone),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return Err(HeadError::Gone),
        };
        let start = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf[start..], b"\r\n\r\n").map(|p| p + start) {
            let head = std::str::from_utf8(&buf[..end])
                .map_err(|_| HeadError::Status(400, "the request head is not UTF-8"))?;
            return parse_head(head);
        }
        if buf.len() > MAX_HEAD {
            let target_long = !buf.contains(&b'\n') && buf.len() > MAX_TARGET;
            return Err(if target_long {
                HeadError::Status(414, "request target too long")
            } else {
                HeadError::Status(431, "request head too large")
            });
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Writes `resp` (without its body for HEAD) and closes.
pub fn write_response(stream: &mut TcpStream, resp: &Response, head_only: bool) {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        reason(resp.status),
        resp.body.len()
    );
    if resp.status != 204 {
        out.push_str(&format!("Content-Type: {}\r\n", resp.content_type));
    }
    for (n, v) in SECURITY_HEADERS {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    for (n, v) in &resp.headers {
        // Values are ours, but never let one split the head.
        let v: String = v.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut all = out.into_bytes();
    if !head_only && resp.status != 204 {
        all.extend_from_slice(&resp.body);
    }
    if let Err(e) = stream.write_all(&all).and_then(|_| stream.flush()) {
        tracing::debug!("writing a response failed: {e}");
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Drain what the client still sends (briefly) so that closing does not
    // reset the connection before it read the response.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 1024];
    let mut drained = 0;
    while drained < 64 * 1024 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Waits up to `timeout` for `listener` to have a connection to accept.
fn poll_readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut fds = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut fds, 1, ms) };
    r > 0 && fds.revents & libc::POLLIN != 0
}

/// Serves `listener` with `workers` threads until `stop` is set. Each
/// worker owns a state made by `make_state` (a catalog connection) and
/// answers with `handle`.
pub fn serve<S, M, H>(
    listener: TcpListener,
    workers: usize,
    stop: &AtomicBool,
    make_state: M,
    handle: H,
) where
    M: Fn() -> S + Sync,
    H: Fn(&mut S, &Request) -> Response + Sync,
{
    let (tx, rx) = mpsc::sync_channel::<TcpStream>(QUEUE);
    let rx = std::sync::Mutex::new(rx);
    std::thread::scope(|scope| {
        for i in 0..workers.max(1) {
            let (rx, make_state, handle) = (&rx, &make_state, &handle);
            let spawned = std::thread::Builder::new()
                .name(format!("serve-{i}"))
                .spawn_scoped(scope, move || {
                    let mut state = make_state();
                    loop {
                        let next = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        let Ok(mut stream) = next else { return };
                        handle_connection(&mut stream, &mut state, handle);
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start HTTP worker thread: {e}");
            }
        }
        while !stop.load(Ordering::SeqCst) {
            if !poll_readable(&listener, Duration::from_millis(250)) {
                continue;
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!("accept failed: {e}");
                    continue;
                }
            };
            let _ = stream.set_nonblocking(false);
            if let Err(mpsc::TrySendError::Full(mut s)) = tx.try_send(stream) {
                // Every worker busy and the queue full: say so at once
                // rather than let connections pile up.
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = s.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n",
                );
            }
        }
        drop(tx);
    });
}

fn handle_connection<S, H>(stream: &mut TcpStream, state: &mut S, handle: &H)
where
    H: Fn(&mut S, &Request) -> Response,
{
    let req = match read_head(stream) {
        Ok(r) => r,
        Err(HeadError::Gone) => return,
        Err(HeadError::Status(code, msg)) => {
            write_response(stream, &Response::text(code, msg), false);
            return;
        }
    };
    let resp = handle(state, &req);
    write_response(stream, &resp, req.method == "HEAD");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_parsing() {
        let r = parse_head(
            "GET /report?from=2026-01-01&to=a%20b+c HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t",
        )
        .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/report");
        assert_eq!(r.query_param("from").as_deref(), Some("2026-01-01"));
        assert_eq!(r.query_param("to").as_deref(), Some("a b c"));
        assert_eq!(r.query_param("x"), None);
        assert_eq!(r.header("authorization"), Some("Bearer t"));
        assert_eq!(
            parse_head("GET / HTTP/2.0").unwrap_err(),
            HeadError::Status(505, "only HTTP/1.0 and HTTP/1.1")
        );
        assert!(matches!(
            parse_head("GET /"),
            Err(HeadError::Status(400, _))
        ));
        assert!(matches!(
            parse_head("GET http://x/ HTTP/1.1"),
            Err(HeadError::Status(400, _))
        ));
        let long = format!("GET /{} HTTP/1.1", "a".repeat(MAX_TARGET));
        assert!(matches!(parse_head(&long), Err(HeadError::Status(414, _))));
        assert!(matches!(
            parse_head("GET / HTTP/1.1\r\nbad header"),
            Err(HeadError::Status(400, _))
        ));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%zz%", false), "a/b%zz%");
        assert_eq!(percent_decode("a+b", false), "a+b");
        assert_eq!(percent_decode("a+b%2B", true), "a b+");
        assert_eq!(percent_decode("%e2%82%ac", true), "€");
        assert_eq!(percent_decode("%ff", true), "\u{fffd}");
    }
}
