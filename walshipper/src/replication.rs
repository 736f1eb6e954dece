//! A small client for PostgreSQL's physical replication protocol, for
//! `wal-receive`. The `postgres` crate (tokio-postgres 0.7) cannot open a
//! replication connection (no `replication` startup parameter, no CopyBoth),
//! so this module speaks it over a socket (TLS by rustls over TCP, as
//! `[pg] sslmode` says: `crate::tls`), with the message codecs
//! and SCRAM-SHA-256/MD5 authentication of `postgres-protocol`, the crate
//! tokio-postgres itself is built on. Only framing, the replication
//! commands and the CopyBoth sub-messages (XLogData, keepalive, standby
//! status update) are written here, as the protocol documentation gives
//! them ("Streaming Replication Protocol").
//!
//! Everything the server sends is bounded before it is buffered.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::{backend, frontend};

use crate::config::PgConfig;
use crate::error::{Error, Result};

/// The largest message accepted: XLogData carries at most 128 KiB of WAL
/// (MAX_SEND_SIZE); anything far larger is not a server speaking this protocol.
const MAX_MESSAGE: usize = 16 << 20;
/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

enum Sock {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
    Unix(UnixStream),
}

impl Sock {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(d),
            Sock::Tls(s) => s.sock.set_read_timeout(d),
            Sock::Unix(s) => s.set_read_timeout(d),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Tls(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Tls(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.flush(),
            Sock::Tls(s) => s.flush(),
            Sock::Unix(s) => s.flush(),
        }
    }
}

/// Asks the server for TLS on `tcp` (SSLRequest) and does the handshake,
/// as `plan` says; the plain stream back if the server declines and TLS is
/// not required.
fn start_tls(
    mut tcp: TcpStream,
    plan: crate::tls::Plan,
    pg: &PgConfig,
    target: &str,
) -> Result<Sock> {
    let crate::tls::Plan::Tls {
        config,
        server_name,
        required,
    } = plan
    else {
        return Ok(Sock::Tcp(tcp));
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
    // SSLRequest: length 8, code 80877103.
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .map_err(|e| io_err(target, "send SSLRequest", e))?;
    // Exactly one byte, unbuffered: nothing the server (or anyone on the
    // path) sends after it can be taken for part of the TLS session.
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .map_err(|e| io_err(target, "read the answer to SSLRequest", e))?;
    match answer[0] {
        b'S' => {}
        b'N' if !required => return Ok(Sock::Tcp(tcp)),
        b'N' => {
            return Err(Error::Config(format!(
                "{target}: the server does not accept TLS connections, and pg.sslmode = {} requires TLS. To fix: turn ssl on in postgresql.conf (with ssl_cert_file and ssl_key_file), or lower pg.sslmode",
                pg.sslmode.name()
            )))
        }
        other => {
            return Err(io_err(
                target,
                "SSLRequest",
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected answer byte {other:#04x}: not a PostgreSQL server?"),
                ),
            ))
        }
    }
    let mut conn = rustls::ClientConnection::new(config, server_name)
        .map_err(|e| io_err(target, "TLS", io::Error::other(e)))?;
    // The handshake now, so that a refused certificate is reported as such.
    let failed = |e| {
        Error::io(
            format!(
                "replication connection to {target}: TLS handshake failed ({})",
                crate::tls::handshake_hint(pg)
            ),
            e,
        )
    };
    while conn.is_handshaking() {
        if conn.complete_io(&mut tcp).map_err(failed)? == (0, 0) {
            return Err(failed(io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(Sock::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
}

/// An error the server reported.
#[derive(Debug, Clone)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "; {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; server hint: {h}")?;
        }
        Ok(())
    }
}

/// What the server sent inside the replication stream.
pub enum StreamMessage {
    /// WAL bytes starting at `start`; `wal_end` is the server's end of WAL.
    XLogData {
        start: u64,
        wal_end: u64,
        data: bytes::Bytes,
    },
    /// The server's end of WAL; `reply` asks for a status update now.
    Keepalive { wal_end: u64, reply: bool },
    /// The timeline being streamed ended (the server is on a later one):
    /// the next timeline and where it starts.
    EndOfTimeline { next_tli: u32, start: u64 },
}

/// Results of IDENTIFY_SYSTEM.
pub struct SystemId {
    pub system_identifier: String,
    pub timeline: u32,
    pub xlogpos: u64,
}

pub struct Connection {
    sock: Sock,
    buf: BytesMut,
    out: BytesMut,
    /// Where it connected, for messages.
    pub target: String,
    pub server_version_num: u32,
}

fn io_err(target: &str, what: &str, e: io::Error) -> Error {
    Error::io(format!("replication connection to {target}: {what}"), e)
}

/// Turns what the server refused into an error that says what to fix.
pub fn refused(target: &str, what: &str, e: ServerError) -> Error {
    let m = e.message.to_lowercase();
    let fix = if m.contains("max_wal_senders") {
        Some("set max_wal_senders to at least 2 (one for walshipper) in postgresql.conf and restart PostgreSQL")
    } else if m.contains("no encryption") {
        Some("the server's pg_hba.conf takes this connection only over TLS (a hostssl line): set [pg] sslmode = verify-full with sslrootcert (or require)")
    } else if m.contains("pg_hba.conf") {
        Some("allow the connection in pg_hba.conf with a line of database `replication` (e.g. `local replication <user> peer` or `host replication <user> <address> scram-sha-256`), then reload PostgreSQL")
    } else if m.contains("replication role")
        || m.contains("permission denied to start")
        || e.code == "42501"
    {
        Some("give the [pg] user the REPLICATION attribute: ALTER ROLE <user> REPLICATION")
    } else if m.contains("all replication slots are in use") {
        Some("raise max_replication_slots (restart needed), or drop a slot that is no longer used (SELECT pg_drop_replication_slot(...))")
    } else if m.contains("max_replication_slots") || m.contains("wal_level") {
        Some("set wal_level = replica (or logical) and max_replication_slots >= 1, then restart PostgreSQL")
    } else if e.code == "28P01" || m.contains("password") {
        Some("check the [pg] user and its password ([pg] password_file, or PGPASSWORD)")
    } else {
        None
    };
    let text = format!("{target}: {what}: {e}");
    match fix {
        Some(f) => Error::Config(format!("{text}. To fix: {f}")),
        None if e.code == "55006" => Error::Busy(format!(
            "{text}. Another receiver is streaming from this slot; stop it, or give this one another [stream] slot"
        )),
        None if e.code == "58P01" => Error::Repository(format!(
            "{text}. The server no longer has the WAL the repository needs next: the repository's WAL has a gap from here. Take a new full backup once streaming works again (see \"A receiver that fell behind\" in docs/disaster-recovery.md)"
        )),
        None => Error::io(text, io::Error::other("refused by the server")),
    }
}

fn server_error(fields: backend::ErrorFields<'_>) -> ServerError {
    let mut e = ServerError {
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    let mut fields = fields;
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'H' => e.hint = Some(v),
            _ => {}
        }
    }
    e
}

/// One frame read off the wire.
enum Frame {
    CopyBoth,
    CopyData(bytes::Bytes),
    CopyDone,
    Other(backend::Message),
}

pub fn now_pg_us() -> i64 {
    let us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    us - PG_EPOCH_OFFSET_US
}

/// Quotes an identifier for a replication command.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

impl Connection {
    /// Opens a physical replication connection (`replication=true`) with
    /// the [pg] settings: a Unix socket directory or a host name, the
    /// password (`crate::pg::password`) if the server asks for one.
    pub fn connect(pg: &PgConfig, application_name: &str) -> Result<Connection> {
        let target = format!(
            "host={} port={} user={} sslmode={}",
            pg.host,
            pg.port,
            pg.user,
            pg.sslmode.name()
        );
        let sock = if pg.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", pg.host, pg.port);
            Sock::Unix(UnixStream::connect(&path).map_err(|e| io_err(&target, "connect", e))?)
        } else {
            let addrs = (pg.host.as_str(), pg.port)
                .to_socket_addrs()
                .map_err(|e| io_err(&target, "resolve", e))?;
            let mut last = io::Error::other("no address");
            let mut found = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let tcp = found.ok_or_else(|| io_err(&target, "connect", last))?;
            start_tls(tcp, crate::tls::plan(pg, &pg.host)?, pg, &target)?
        };
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| io_err(&target, "socket", e))?;
        let mut c = Connection {
            sock,
            buf: BytesMut::with_capacity(256 << 10),
            out: BytesMut::new(),
            target,
            server_version_num: 0,
        };
        c.startup(pg, application_name)?;
        Ok(c)
    }

    fn send(&mut self) -> Result<()> {
        let out = std::mem::take(&mut self.out);
        self.sock
            .write_all(&out)
            .and_then(|_| self.sock.flush())
            .map_err(|e| io_err(&self.target, "send", e))
    }

    fn encode(&mut self, f: impl FnOnce(&mut BytesMut) -> io::Result<()>) -> Result<()> {
        f(&mut self.out).map_err(|e| io_err(&self.target, "encode", e))
    }

    fn startup(&mut self, pg: &PgConfig, application_name: &str) -> Result<()> {
        let params = [
            ("user", pg.user.as_str()),
            ("replication", "true"),
            ("application_name", application_name),
        ];
        self.encode(|b| frontend::startup_message(params, b))?;
        self.send()?;
        let target = self.target.clone();
        let password = || {
            crate::pg::password(pg)?.ok_or_else(|| {
                Error::Config(format!(
                    "{target}: the server asks for a password: set [pg] password_file (a file private to walshipper's user) or PGPASSWORD in walshipper's environment, or allow the connection without one in pg_hba.conf (e.g. `local replication {} peer`)",
                    pg.user
                ))
            })
        };
        let mut scram: Option<ScramSha256> = None;
        // Whether the server proved it knows the password (SCRAM's final
        // message): a SCRAM exchange it cut short with "OK" is refused.
        let mut scram_done = false;
        let mut bound = false;
        let require = pg.channel_binding == crate::tls::ChannelBinding::Require;
        loop {
            match self.frame(true)? {
                Some(Frame::Other(m)) => match m {
                    backend::Message::AuthenticationOk => {
                        if scram.is_some() && !scram_done {
                            return Err(self.protocol(
                                "the server ended SCRAM authentication without proving it knows the password",
                            ));
                        }
                        if require && !bound {
                            return Err(crate::tls::binding_refused(
                                &self.target,
                                "no authentication (a trust or peer login)",
                            ));
                        }
                    }
                    backend::Message::AuthenticationCleartextPassword => {
                        if require {
                            return Err(crate::tls::binding_refused(
                                &self.target,
                                "the password in clear text",
                            ));
                        }
                        let p = password()?;
                        self.encode(|b| frontend::password_message(p.as_bytes(), b))?;
                        self.send()?;
                    }
                    backend::Message::AuthenticationMd5Password(body) => {
                        if require {
                            return Err(crate::tls::binding_refused(
                                &self.target,
                                "an MD5 password",
                            ));
                        }
                        let p = password()?;
                        let h = postgres_protocol::authentication::md5_hash(
                            pg.user.as_bytes(),
                            p.as_bytes(),
                            body.salt(),
                        );
                        self.encode(|b| frontend::password_message(h.as_bytes(), b))?;
                        self.send()?;
                    }
                    backend::Message::AuthenticationSasl(body) => {
                        let mut mechs = body.mechanisms();
                        let (mut plain, mut plus) = (false, false);
                        while let Ok(Some(m)) = mechs.next() {
                            plain |= m == SCRAM_SHA_256;
                            plus |= m == SCRAM_SHA_256_PLUS;
                        }
                        // Over TLS, bound to the server's certificate
                        // (tls-server-end-point) when both sides can: a
                        // man in the middle cannot relay the exchange.
                        let binding = match &self.sock {
                            Sock::Tls(t)
                                if pg.channel_binding != crate::tls::ChannelBinding::Disable =>
                            {
                                t.conn
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(|c| crate::tls::end_point_binding(c.as_ref()))
                            }
                            _ => None,
                        };
                        if require && (binding.is_none() || !plus) {
                            return Err(crate::tls::binding_refused(
                                &self.target,
                                "SCRAM without channel binding (no TLS, no SCRAM-SHA-256-PLUS, or a certificate with no single hash)",
                            ));
                        }
                        bound = binding.is_some() && plus;
                        let (mechanism, cb) = match binding {
                            Some(h) if plus => {
                                (SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(h))
                            }
                            // "y": this client could bind, the server offered
                            // no -PLUS (a downgrade the server can detect).
                            Some(_) if plain => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                            _ if plain => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                            _ => {
                                return Err(Error::Config(format!(
                                    "{}: the server offers no SASL mechanism walshipper speaks (SCRAM-SHA-256, SCRAM-SHA-256-PLUS)",
                                    self.target
                                )))
                            }
                        };
                        tracing::debug!("{}: authenticating with {mechanism}", self.target);
                        let p = password()?;
                        let s = ScramSha256::new(p.as_bytes(), cb);
                        let msg = s.message().to_vec();
                        self.encode(|b| frontend::sasl_initial_response(mechanism, &msg, b))?;
                        self.send()?;
                        scram = Some(s);
                    }
                    backend::Message::AuthenticationSaslContinue(body) => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| self.protocol("SASL out of order"))?;
                        s.update(body.data())
                            .map_err(|e| io_err(&self.target, "SCRAM", e))?;
                        let msg = s.message().to_vec();
                        self.encode(|b| frontend::sasl_response(&msg, b))?;
                        self.send()?;
                    }
                    backend::Message::AuthenticationSaslFinal(body) => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| self.protocol("SASL out of order"))?;
                        s.finish(body.data()).map_err(|e| {
                            io_err(&self.target, "SCRAM: the server's proof is wrong", e)
                        })?;
                        scram_done = true;
                    }
                    backend::Message::ParameterStatus(p) => {
                        if p.name().ok() == Some("server_version") {
                            self.server_version_num = parse_version(p.value().unwrap_or(""));
                        }
                    }
                    backend::Message::BackendKeyData(_) | backend::Message::NoticeResponse(_) => {}
                    backend::Message::ReadyForQuery(_) => return Ok(()),
                    backend::Message::ErrorResponse(body) => {
                        let e = server_error(body.fields());
                        return Err(refused(&self.target.clone(), "connect", e));
                    }
                    _ => return Err(self.protocol("unexpected message during startup")),
                },
                Some(_) => return Err(self.protocol("unexpected message during startup")),
                None => continue,
            }
        }
    }

    fn protocol(&self, what: &str) -> Error {
        Error::io(
            format!("replication connection to {}", self.target),
            io::Error::new(io::ErrorKind::InvalidData, what.to_string()),
        )
    }

    /// Reads until one whole frame is buffered. `wait`: block (up to the
    /// socket timeout, then an error); else None when nothing more arrived
    /// within the timeout.
    fn frame(&mut self, wait: bool) -> Result<Option<Frame>> {
        loop {
            if let Some(f) = self.buffered()? {
                return Ok(Some(f));
            }
            match self.fill() {
                Ok(()) => {}
                Err(e)
                    if !wait
                        && matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(io_err(&self.target, "receive", e)),
            }
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 64 << 10];
        let n = self.sock.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// A whole frame from the buffer, if there is one.
    fn buffered(&mut self) -> Result<Option<Frame>> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let tag = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            return Err(self.protocol(&format!("a message of {len} bytes (tag {tag:#x})")));
        }
        if self.buf.len() < len + 1 {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(len + 1);
        Ok(Some(match tag {
            b'W' => Frame::CopyBoth,
            b'd' => {
                frame.advance(5);
                Frame::CopyData(frame.freeze())
            }
            b'c' => Frame::CopyDone,
            _ => match backend::Message::parse(&mut frame) {
                Ok(Some(m)) => Frame::Other(m),
                Ok(None) => return Err(self.protocol("a truncated message")),
                Err(e) => return Err(io_err(&self.target, "decode", e)),
            },
        }))
    }

    /// Runs a replication command; the rows of its result (text values).
    pub fn query(
        &mut self,
        sql: &str,
    ) -> Result<std::result::Result<Vec<Vec<Option<String>>>, ServerError>> {
        self.encode(|b| frontend::query(sql, b))?;
        self.send()?;
        self.collect_rows()
    }

    fn collect_rows(
        &mut self,
    ) -> Result<std::result::Result<Vec<Vec<Option<String>>>, ServerError>> {
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            match self.frame(true)? {
                Some(Frame::Other(m)) => match m {
                    backend::Message::DataRow(body) => {
                        let mut row = Vec::new();
                        let mut ranges = body.ranges();
                        while let Some(r) = ranges
                            .next()
                            .map_err(|e| io_err(&self.target, "decode", e))?
                        {
                            row.push(
                                r.map(|r| String::from_utf8_lossy(&body.buffer()[r]).into_owned()),
                            );
                        }
                        rows.push(row);
                    }
                    backend::Message::ErrorResponse(body) => {
                        err = Some(server_error(body.fields()));
                    }
                    backend::Message::ReadyForQuery(_) => {
                        return Ok(match err {
                            Some(e) => Err(e),
                            None => Ok(rows),
                        })
                    }
                    _ => {}
                },
                Some(Frame::CopyBoth) => return Err(self.protocol("unexpected CopyBothResponse")),
                Some(_) => {}
                None => {}
            }
        }
    }

    pub fn identify_system(&mut self) -> Result<SystemId> {
        let target = self.target.clone();
        let rows = self
            .query("IDENTIFY_SYSTEM")?
            .map_err(|e| refused(&target, "IDENTIFY_SYSTEM", e))?;
        let row = rows
            .first()
            .filter(|r| r.len() >= 3)
            .ok_or_else(|| self.protocol("IDENTIFY_SYSTEM returned no row"))?;
        let field = |i: usize| row[i].clone().unwrap_or_default();
        Ok(SystemId {
            system_identifier: field(0),
            timeline: field(1)
                .parse()
                .map_err(|_| self.protocol("IDENTIFY_SYSTEM: bad timeline"))?,
            xlogpos: crate::wal::parse_lsn(&field(2))
                .ok_or_else(|| self.protocol("IDENTIFY_SYSTEM: bad xlogpos"))?,
        })
    }

    /// Creates physical slot `slot` reserving WAL now; false if it exists.
    pub fn create_slot(&mut self, slot: &str) -> Result<bool> {
        let target = self.target.clone();
        match self.query(&format!(
            "CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL",
            quote_ident(slot)
        ))? {
            Ok(_) => Ok(true),
            Err(e) if e.code == "42710" => Ok(false),
            Err(e) => Err(refused(
                &target,
                &format!("creating replication slot {slot}"),
                e,
            )),
        }
    }

    /// The slot's restart LSN and its timeline (PostgreSQL 15 and later;
    /// None before, or when the slot has none).
    pub fn read_slot(&mut self, slot: &str) -> Result<Option<(u64, u32)>> {
        if self.server_version_num < 150000 {
            return Ok(None);
        }
        let target = self.target.clone();
        let rows = self
            .query(&format!("READ_REPLICATION_SLOT {}", quote_ident(slot)))?
            .map_err(|e| refused(&target, "READ_REPLICATION_SLOT", e))?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let lsn = row
            .get(1)
            .cloned()
            .flatten()
            .and_then(|s| crate::wal::parse_lsn(&s));
        let tli = row.get(2).cloned().flatten().and_then(|s| s.parse().ok());
        Ok(lsn.zip(tli))
    }

    /// The server's history file of timeline `tli`: (file name, content).
    pub fn timeline_history(&mut self, tli: u32) -> Result<(String, Vec<u8>)> {
        let target = self.target.clone();
        let rows = self
            .query(&format!("TIMELINE_HISTORY {tli}"))?
            .map_err(|e| refused(&target, "TIMELINE_HISTORY", e))?;
        let row = rows
            .first()
            .filter(|r| r.len() >= 2)
            .ok_or_else(|| self.protocol("TIMELINE_HISTORY returned no row"))?;
        let name = row[0].clone().unwrap_or_default();
        let content = row[1].clone().unwrap_or_default().into_bytes();
        if content.len() as u64 > crate::wal::MAX_HISTORY_FILE {
            return Err(self.protocol("TIMELINE_HISTORY: too large"));
        }
        Ok((name, content))
    }

    /// Starts streaming from `lsn` on timeline `tli` through `slot`. None:
    /// streaming; Some((next timeline, its start)) when `tli` ends exactly
    /// at `lsn` (the server then streams nothing).
    pub fn start_replication(
        &mut self,
        slot: &str,
        lsn: u64,
        tli: u32,
    ) -> Result<Option<(u32, u64)>> {
        let sql = format!(
            "START_REPLICATION SLOT {} PHYSICAL {} TIMELINE {tli}",
            quote_ident(slot),
            crate::wal::format_lsn(lsn)
        );
        self.encode(|b| frontend::query(&sql, b))?;
        self.send()?;
        let target = self.target.clone();
        loop {
            match self.frame(true)? {
                Some(Frame::CopyBoth) => return Ok(None),
                Some(Frame::Other(backend::Message::ErrorResponse(body))) => {
                    let e = server_error(body.fields());
                    // The ReadyForQuery that follows.
                    let _ = self.collect_rows();
                    return Err(refused(&target, &sql, e));
                }
                Some(Frame::Other(backend::Message::RowDescription(_))) => {
                    let rows = self
                        .collect_rows()?
                        .map_err(|e| refused(&target, &sql, e))?;
                    return self.next_timeline(&rows).map(Some);
                }
                Some(Frame::Other(backend::Message::NoticeResponse(_))) | None => {}
                Some(_) => return Err(self.protocol("unexpected reply to START_REPLICATION")),
            }
        }
    }

    fn next_timeline(&self, rows: &[Vec<Option<String>>]) -> Result<(u32, u64)> {
        let row = rows
            .first()
            .filter(|r| r.len() >= 2)
            .ok_or_else(|| self.protocol("no next timeline after the end of streaming"))?;
        let next_tli = row[0]
            .as_deref()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.protocol("bad next timeline"))?;
        let start = row[1]
            .as_deref()
            .and_then(crate::wal::parse_lsn)
            .ok_or_else(|| self.protocol("bad next timeline start"))?;
        Ok((next_tli, start))
    }

    /// The next message of the stream, waiting at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<StreamMessage>> {
        if self.buf.len() < 5 || !self.has_whole_frame() {
            self.sock
                .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
                .map_err(|e| io_err(&self.target, "socket", e))?;
        }
        let f = self.frame(false)?;
        match f {
            None => Ok(None),
            Some(Frame::CopyData(mut d)) => {
                if d.is_empty() {
                    return Err(self.protocol("empty CopyData"));
                }
                let kind = d.get_u8();
                match kind {
                    b'w' if d.len() >= 24 => {
                        let start = d.get_u64();
                        let wal_end = d.get_u64();
                        let _send_time = d.get_i64();
                        Ok(Some(StreamMessage::XLogData {
                            start,
                            wal_end,
                            data: d,
                        }))
                    }
                    b'k' if d.len() >= 17 => {
                        let wal_end = d.get_u64();
                        let _time = d.get_i64();
                        let reply = d.get_u8() != 0;
                        Ok(Some(StreamMessage::Keepalive { wal_end, reply }))
                    }
                    other => Err(self.protocol(&format!(
                        "unknown replication message {other:#x} of {} bytes",
                        d.len()
                    ))),
                }
            }
            Some(Frame::CopyDone) => {
                // The timeline ended: answer CopyDone, then the server sends
                // the next timeline and its start, and is ready again.
                self.encode(|b| {
                    frontend::copy_done(b);
                    Ok(())
                })?;
                self.send()?;
                self.sock
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| io_err(&self.target, "socket", e))?;
                let target = self.target.clone();
                let rows = self
                    .collect_rows()?
                    .map_err(|e| refused(&target, "end of timeline", e))?;
                let (next_tli, start) = self.next_timeline(&rows)?;
                Ok(Some(StreamMessage::EndOfTimeline { next_tli, start }))
            }
            Some(Frame::Other(backend::Message::ErrorResponse(body))) => {
                let e = server_error(body.fields());
                let target = self.target.clone();
                Err(refused(&target, "streaming", e))
            }
            Some(Frame::Other(_)) => Ok(None),
            Some(Frame::CopyBoth) => Err(self.protocol("a second CopyBothResponse")),
        }
    }

    fn has_whole_frame(&self) -> bool {
        self.buf.len() >= 5 && {
            let len =
                u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
            self.buf.len() > len
        }
    }

    /// Whether a whole message is already buffered (no read needed).
    pub fn pending(&self) -> bool {
        self.has_whole_frame()
    }

    /// Standby status update: `write` received, `flush` durable; apply is
    /// reported as invalid (0), as pg_receivewal does: nothing is replayed.
    pub fn send_status(&mut self, write: u64, flush: u64, reply: bool) -> Result<()> {
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(write);
        body.put_u64(flush);
        body.put_u64(0);
        body.put_i64(now_pg_us());
        body.put_u8(u8::from(reply));
        let body = body.freeze();
        self.encode(|b| {
            frontend::CopyData::new(body)?.write(b);
            Ok(())
        })?;
        self.send()
    }

    /// Ends the connection politely.
    pub fn terminate(mut self) {
        frontend::terminate(&mut self.out);
        let _ = self.send();
    }
}

/// `server_version` "15.8 (Debian ...)" → 150008.
fn parse_version(v: &str) -> u32 {
    let mut parts = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    major * 10000 + minor
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake server on 127.0.0.1: reads the SSLRequest, answers `answer`,
    /// then hands back what the client sent next (until it closed, or for
    /// half a second).
    fn fake_server(answer: Vec<u8>) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 8];
            s.read_exact(&mut req).unwrap();
            assert_eq!(req, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f], "an SSLRequest");
            s.write_all(&answer).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            rest
        });
        (port, t)
    }

    fn connect_to(port: u16, mode: &str) -> Result<Connection> {
        let pg = PgConfig {
            host: "127.0.0.1".into(),
            port,
            sslmode: mode.parse().unwrap(),
            ..PgConfig::default()
        };
        Connection::connect(&pg, "test")
    }

    #[test]
    fn a_server_that_cuts_scram_short_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let pw = d.path().join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let msg = |s: &mut TcpStream, typed: bool| {
                let mut head = vec![0u8; if typed { 5 } else { 4 }];
                s.read_exact(&mut head).unwrap();
                let n = u32::from_be_bytes(head[head.len() - 4..].try_into().unwrap());
                let mut body = vec![0u8; n as usize - 4];
                s.read_exact(&mut body).unwrap();
            };
            msg(&mut s, false); // SSLRequest
            s.write_all(b"N").unwrap();
            msg(&mut s, false); // StartupMessage
                                // AuthenticationSASL offering SCRAM-SHA-256...
            let mech = b"SCRAM-SHA-256\0\0";
            let mut m = vec![b'R'];
            m.extend_from_slice(&(8 + mech.len() as u32).to_be_bytes());
            m.extend_from_slice(&10u32.to_be_bytes());
            m.extend_from_slice(mech);
            s.write_all(&m).unwrap();
            msg(&mut s, true); // SASLInitialResponse
                               // ... then "OK" without the server's proof.
            s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]).unwrap();
            let mut rest = Vec::new();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let _ = s.read_to_end(&mut rest);
        });
        let pg = PgConfig {
            host: "127.0.0.1".into(),
            port,
            sslmode: "prefer".parse().unwrap(),
            password_file: pw,
            ..PgConfig::default()
        };
        let e = Connection::connect(&pg, "test").err().unwrap().to_string();
        assert!(e.contains("without proving it knows the password"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn a_server_that_answers_sslrequest_oddly_is_refused() {
        // "N" under require: refused before anything else is sent.
        let (port, t) = fake_server(b"N".to_vec());
        let e = connect_to(port, "require").err().unwrap().to_string();
        assert!(e.contains("does not accept TLS connections"), "{e}");
        assert!(t.join().unwrap().is_empty(), "nothing sent in clear");
        // "N" under prefer: the startup message follows in clear.
        let (port, t) = fake_server(b"N".to_vec());
        assert!(connect_to(port, "prefer").is_err());
        let sent = t.join().unwrap();
        assert_eq!(&sent[4..8], &196608u32.to_be_bytes(), "a StartupMessage");
        // "S" and then plaintext (an AuthenticationOk injected on the
        // path): not a TLS record, the handshake fails.
        let (port, t) = fake_server(b"SR\0\0\0\x08\0\0\0\0".to_vec());
        let e = connect_to(port, "require").err().unwrap().to_string();
        assert!(e.contains("TLS handshake failed"), "{e}");
        t.join().unwrap();
        // "S" and then nothing: the handshake fails, nothing in clear.
        let (port, t) = fake_server(b"S".to_vec());
        let e = connect_to(port, "prefer").err().unwrap().to_string();
        assert!(e.contains("TLS handshake failed"), "{e}");
        let sent = t.join().unwrap();
        assert_eq!(
            sent.first(),
            Some(&0x16),
            "a TLS ClientHello, not clear text"
        );
        // An error message instead of an answer: not taken for one.
        let (port, t) = fake_server(b"EFATAL".to_vec());
        let e = connect_to(port, "require").err().unwrap().to_string();
        assert!(e.contains("unexpected answer byte 0x45"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("15.8 (Debian 15.8-1)"), 150008);
        assert_eq!(parse_version("16.2"), 160002);
    }

    #[test]
    fn errors_say_what_to_fix() {
        let e = |code: &str, msg: &str| ServerError {
            code: code.into(),
            message: msg.into(),
            detail: None,
            hint: None,
        };
        let s = refused(
            "t",
            "connect",
            e(
                "53300",
                "number of requested standby connections exceeds max_wal_senders (currently 0)",
            ),
        )
        .to_string();
        assert!(s.contains("set max_wal_senders"), "{s}");
        let s = refused(
            "t",
            "connect",
            e(
                "42501",
                "must be superuser or replication role to start walsender",
            ),
        )
        .to_string();
        assert!(s.contains("ALTER ROLE"), "{s}");
        let s = refused(
            "t",
            "connect",
            e(
                "28000",
                "no pg_hba.conf entry for replication connection from host \"[local]\", user \"x\"",
            ),
        )
        .to_string();
        assert!(s.contains("pg_hba.conf with a line"), "{s}");
        let s = refused("t", "slot", e("53400", "all replication slots are in use")).to_string();
        assert!(s.contains("max_replication_slots"), "{s}");
        assert!(matches!(
            refused(
                "t",
                "s",
                e("55006", "replication slot \"w\" is active for PID 1")
            ),
            Error::Busy(_)
        ));
    }
}
