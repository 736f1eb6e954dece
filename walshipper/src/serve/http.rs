//! A deliberately small HTTP/1.1 server for `walshipper serve`: GET and
//! HEAD only, one request per connection (`Connection: close`), no request
//! bodies. Everything about a request is bounded: the head (request line
//! and headers) is at most `MAX_HEAD` bytes and must arrive within
//! `HEAD_TIMEOUT`, the response must be taken within `WRITE_TIMEOUT`, both
//! in a connection's own small thread; connections are capped per peer
//! address and in all (beyond that a client gets 503 at once). Only
//! complete requests reach the fixed number of worker threads (which hold
//! the catalog connections), so idle or slow clients cannot starve
//! /metrics and /health. tiny_http was considered and not used: it reads
//! header lines without a length limit or deadline and starts a thread per
//! connection without a cap, which a client on a non-loopback address
//! could exploit.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

/// Longest request head (request line + headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest request target (path and query) accepted.
pub const MAX_TARGET: usize = 2048;
/// Time a client has to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the whole response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// After the response: how long, and how much, of what a client still
/// sends is read before closing.
const DRAIN_TIME: Duration = Duration::from_millis(500);
const DRAIN_MAX: usize = 4 * 1024;
/// Complete requests waiting for a worker, beyond those being handled.
const QUEUE: usize = 32;
/// Time a request may wait for and take in a worker before the client is
/// told 503 (catalog queries have their own statement_timeout).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// Open connections at once: in all, and from one peer address.
pub const MAX_CONNECTIONS: usize = 64;
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;

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

/// Writes `resp` (without its body for HEAD) within `WRITE_TIMEOUT` in all
/// (a client taking a few bytes at a time cannot stretch it), and closes.
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
    let mut all = out.into_bytes();
    if !head_only && resp.status != 204 {
        all.extend_from_slice(&resp.body);
    }
    if let Err(e) = write_within(stream, &all, Instant::now() + WRITE_TIMEOUT) {
        tracing::debug!("writing a response failed: {e}");
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Drain what the client still sends (briefly: DRAIN_TIME in all, at
    // most DRAIN_MAX bytes) so that closing does not reset the connection
    // before it read the response.
    let deadline = Instant::now() + DRAIN_TIME;
    let mut sink = [0u8; 1024];
    let mut drained = 0;
    while drained < DRAIN_MAX {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// `write_all` with one deadline for the whole buffer: the socket's write
/// timeout is set to what is left before each write.
fn write_within(stream: &mut TcpStream, mut buf: &[u8], deadline: Instant) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::new(ErrorKind::TimedOut, "the client took too long"));
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(buf) {
            Ok(0) => return Err(Error::new(ErrorKind::WriteZero, "the client went away")),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.flush()
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

/// Open connections, in all and per peer address.
#[derive(Default)]
struct Conns {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One connection's place in `Conns`, given back when dropped.
struct ConnSlot<'a> {
    conns: &'a Mutex<Conns>,
    ip: IpAddr,
}

impl<'a> ConnSlot<'a> {
    /// A place for a connection from `ip`, or None when that peer or
    /// everyone together already has as many as allowed.
    fn take(conns: &'a Mutex<Conns>, ip: IpAddr) -> Option<Self> {
        let mut c = conns.lock().unwrap_or_else(|p| p.into_inner());
        let mine = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= MAX_CONNECTIONS || mine >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        c.total += 1;
        c.per_ip.insert(ip, mine + 1);
        Some(ConnSlot { conns, ip })
    }
}

impl Drop for ConnSlot<'_> {
    fn drop(&mut self) {
        let mut c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// A complete request handed to a worker, and where its answer goes.
type Job = (Request, mpsc::SyncSender<Response>);

const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n";

/// Serves `listener` until `stop` is set. Each connection gets a small
/// thread of its own that reads the request head and writes the answer,
/// both under an overall deadline, so a slow or idle client only ever
/// holds its own thread; connections are capped per peer address
/// (`MAX_CONNECTIONS_PER_PEER`) and in all (`MAX_CONNECTIONS`). Only
/// complete requests reach the `workers` threads, each owning a state made
/// by `make_state` (a catalog connection) and answering with `handle`. A
/// handler that panics answers 500; its worker carries on with a new state.
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
    let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
    let rx = Mutex::new(rx);
    let conns = Mutex::new(Conns::default());
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
                        let Ok((req, reply)) = next else { return };
                        let answered =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                handle(&mut state, &req)
                            }));
                        let resp = answered.unwrap_or_else(|_| {
                            tracing::error!(
                                "answering {} {} panicked (a bug): answered 500",
                                req.method,
                                req.path
                            );
                            // The state may be half-way through something.
                            state = make_state();
                            Response::text(500, "internal error (the service's log says more)")
                        });
                        let _ = reply.send(resp);
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
            let (mut stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("accept failed: {e}");
                    continue;
                }
            };
            let _ = stream.set_nonblocking(false);
            let Some(slot) = ConnSlot::take(&conns, peer.ip()) else {
                // Too many connections: say so at once (never blocking
                // the accept loop on this client) and close; what already
                // arrived is read first so that the close is not a reset.
                let _ = stream.set_nonblocking(true);
                let mut sink = [0u8; 4096];
                let _ = stream.read(&mut sink);
                let _ = stream.write(BUSY);
                let _ = stream.shutdown(std::net::Shutdown::Write);
                continue;
            };
            let tx = tx.clone();
            let spawned = std::thread::Builder::new()
                .name("serve-conn".into())
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || {
                    let _slot = slot;
                    handle_connection(&mut stream, &tx);
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a connection thread: {e}");
            }
        }
        drop(tx);
    });
}

/// One connection: its head, a worker's answer, the answer written.
fn handle_connection(stream: &mut TcpStream, jobs: &mpsc::SyncSender<Job>) {
    let req = match read_head(stream) {
        Ok(r) => r,
        Err(HeadError::Gone) => return,
        Err(HeadError::Status(code, msg)) => {
            write_response(stream, &Response::text(code, msg), false);
            return;
        }
    };
    let head_only = req.method == "HEAD";
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    let resp = match jobs.try_send((req, reply_tx)) {
        Ok(()) => reply_rx
            .recv_timeout(ANSWER_TIMEOUT)
            .unwrap_or_else(|_| Response::text(503, "the answer took too long; try again later")),
        // Every worker busy and the queue full: say so at once.
        Err(_) => {
            Response::text(503, "busy; try again in a moment").with_header("Retry-After", "1")
        }
    };
    write_response(stream, &resp, head_only);
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

    /// A real socket: answers, HEAD without a body, a head too large,
    /// and a stop that ends `serve`.
    #[test]
    fn serves_and_stops() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = AtomicBool::new(false);
        let ask = |raw: &[u8]| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(raw).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        std::thread::scope(|scope| {
            let server = scope.spawn(|| {
                serve(
                    listener,
                    2,
                    &stop,
                    || 0u32,
                    |n, req| {
                        *n += 1;
                        Response::text(200, format!("{} {}", req.path, n))
                    },
                )
            });
            let got = ask(b"GET /a%20b HTTP/1.1\r\nHost: x\r\n\r\n");
            assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
            assert!(
                got.contains("\r\nX-Content-Type-Options: nosniff\r\n"),
                "{got}"
            );
            // The path decoded; the worker's own state counted the request.
            assert!(got.ends_with("\r\n\r\n/a b 1\n"), "{got}");
            let head = ask(b"HEAD / HTTP/1.1\r\n\r\n");
            assert!(
                head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"),
                "{head}"
            );
            let mut long = b"GET /".to_vec();
            long.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
            assert!(ask(&long).starts_with("HTTP/1.1 414 "));
            let mut big = b"GET / HTTP/1.1\r\n".to_vec();
            big.extend(std::iter::repeat_n(b'h', MAX_HEAD + 10));
            assert!(ask(&big).starts_with("HTTP/1.1 431 "));
            assert!(ask(b"GET / HTTP/1.1 extra\r\n\r\n").starts_with("HTTP/1.1 400 "));
            stop.store(true, Ordering::SeqCst);
            server.join().unwrap();
        });
    }

    /// Idle and trickling clients (more than there are workers) do not
    /// starve the workers: a request still answers promptly; a handler's
    /// panic answers 500 and the worker survives; a client that keeps
    /// trickling after its response is cut off within the drain's
    /// deadline; beyond MAX_CONNECTIONS_PER_PEER (give or take the few
    /// answered connections still ending) a peer gets 503 at once.
    #[test]
    fn slow_clients_do_not_starve_workers() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = AtomicBool::new(false);
        let ask = |raw: &[u8]| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(raw).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        std::thread::scope(|scope| {
            let server = scope.spawn(|| {
                serve(
                    listener,
                    2,
                    &stop,
                    || (),
                    |_, req| {
                        if req.path == "/panic" {
                            let v: Vec<u8> = Vec::new();
                            let _ = v[req.path.len()];
                        }
                        Response::text(200, "ok")
                    },
                )
            });
            // Whatever fails below, the server stops (or the scope hangs).
            struct StopOnDrop<'a>(&'a AtomicBool);
            impl Drop for StopOnDrop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::SeqCst);
                }
            }
            let _stop = StopOnDrop(&stop);
            // Idle sockets (no byte sent) and a trickling one: 3 > 2 workers,
            // leaving 5 of the peer's 8 slots: an answered connection keeps
            // its slot until its thread has drained and ended, which on a
            // loaded machine can be after the next request arrives.
            let mut idle: Vec<TcpStream> =
                (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
            let mut trickle = TcpStream::connect(addr).unwrap();
            trickle.write_all(b"GET / HT").unwrap();
            idle.push(trickle);
            std::thread::sleep(Duration::from_millis(300));
            let t = Instant::now();
            for _ in 0..4 {
                assert!(ask(b"GET /health HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 "));
            }
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            // Two panics (as many as workers), then still answers.
            for _ in 0..2 {
                assert!(ask(b"GET /panic HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 500 "));
            }
            assert!(ask(b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 "));
            // 3 open + 5 more = MAX_CONNECTIONS_PER_PEER; the next is
            // refused at once (it sends nothing: the answer comes anyway).
            // Connect one at a time until the refusal: an answered
            // connection (the /metrics above) may still hold its slot for a
            // moment, so the refusal can come a little early, never later
            // than the sixth. Short waits while slots are left (the slow
            // clients' HEAD_TIMEOUT runs meanwhile); the last gets time.
            fn refusal(c: &mut TcpStream, wait: Duration) -> Option<String> {
                c.set_read_timeout(Some(wait)).unwrap();
                let mut buf = Vec::new();
                match c.read_to_end(&mut buf) {
                    // Refused: answered and closed.
                    Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
                    // Holds a slot and waits for a request.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        assert!(buf.is_empty(), "a partial answer");
                        None
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            let last = MAX_CONNECTIONS_PER_PEER - idle.len() + 1;
            let first_new = idle.len();
            let mut refused = None;
            for n in 1..=last {
                let mut c = TcpStream::connect(addr).unwrap();
                let wait = Duration::from_millis(if n < last { 150 } else { 2000 });
                if let Some(got) = refusal(&mut c, wait) {
                    refused = Some((n, got));
                    break;
                }
                idle.push(c);
            }
            // A refusal slower than its short wait came to an earlier one.
            if refused.is_none() {
                for (i, c) in idle[first_new..].iter_mut().enumerate() {
                    if let Some(got) = refusal(c, Duration::from_millis(10)) {
                        refused = Some((i + 1, got));
                        break;
                    }
                }
            }
            let (n, got) = refused.expect("no connection was refused");
            assert!(got.starts_with("HTTP/1.1 503 "), "{got}");
            // Not much earlier either: the peer held its 8 but for a few
            // answered connections still ending.
            assert!(n + 3 >= last, "refused at connection {n} of {last}");
            drop(idle);
            // The slots come back once those connections are gone.
            let t = Instant::now();
            loop {
                let got = ask(b"GET /health HTTP/1.1\r\n\r\n");
                if got.starts_with("HTTP/1.1 200 ") {
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(8), "{got}");
                std::thread::sleep(Duration::from_millis(100));
            }
            // Trickling after the response: the server closes anyway.
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let t = Instant::now();
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            loop {
                let _ = s.write_all(b"x");
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
                assert!(t.elapsed() < Duration::from_secs(3), "still open");
            }
            assert!(got.starts_with(b"HTTP/1.1 200 "));
            stop.store(true, Ordering::SeqCst);
            server.join().unwrap();
        });
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
