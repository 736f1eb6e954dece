//! TLS to PostgreSQL over TCP (`[pg] sslmode`, `sslrootcert`), end to end:
//! a real PostgreSQL 15 cluster with `ssl = on`, certificates made here by
//! the openssl command (a CA, a server certificate naming only
//! `localhost`, an unrelated second CA), and a pg_hba.conf that rejects
//! every TCP connection without TLS, so that any connection that works is
//! encrypted. Both of walshipper's clients are exercised: the `postgres`
//! crate's (`check`, which also forces a WAL switch and waits for it in the
//! repository) and the replication client of `wal-receive` (the server's
//! own `pg_stat_ssl` says its walsender's connection is TLS). Refusals: a
//! host name the certificate does not hold under verify-full, a CA that did
//! not sign it (verify-ca, and require with sslrootcert), TLS turned off on
//! the server under require, no TLS under disable, verify-full without
//! sslrootcert, the OS store without the name check, and under
//! `channel_binding = require` a server that asks for a clear-text password.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PASSWORD: &str = "tls-test-password";

fn openssl(d: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(d).args(args));
}

/// A new P-256 key, and where it goes (the next argument).
const EC_KEY: [&str; 6] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
    "-keyout",
];

fn openssl_req(d: &Path, before: &[&str], key: &str, after: &[&str]) {
    let mut args: Vec<&str> = vec!["req"];
    args.extend_from_slice(before);
    args.extend_from_slice(&EC_KEY);
    args.push(key);
    args.extend_from_slice(after);
    openssl(d, &args);
}

/// A CA (`{name}.pem`, `{name}.key`) made in `d`.
fn make_ca(d: &Path, name: &str) {
    let (pem, subj) = (format!("{name}.pem"), format!("/CN={name}"));
    openssl_req(
        d,
        &["-x509"],
        &format!("{name}.key"),
        &[
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// `server.crt` / `server.key`, signed by CA `ca`, naming only `localhost`.
fn make_server_cert(d: &Path, ca: &str) {
    openssl_req(
        d,
        &[],
        "server.key",
        &["-out", "server.csr", "-subj", "/CN=localhost"],
    );
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The shipper's config with [pg] pointing at `host` over TCP with these
/// TLS settings (the base config's other lines kept).
fn set_pg(shipper: &Shipper, base: &str, host: &str, sslmode: &str, rootcert: Option<&Path>) {
    let password_file = shipper.config.with_file_name("pg-password");
    let mut pg = format!(
        "host = \"{host}\"\nsslmode = \"{sslmode}\"\npassword_file = \"{}\"\n",
        password_file.display()
    );
    if let Some(r) = rootcert {
        pg.push_str(&format!("sslrootcert = \"{}\"\n", r.display()));
    }
    let text: String = base
        .lines()
        .map(|l| {
            if l.starts_with("host = ") {
                pg.trim_end().to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&shipper.config, text + "\n").unwrap();
}

/// Runs walshipper (the password from `[pg] password_file`); (success,
/// stdout + stderr).
fn ws(shipper: &Shipper, args: &[&str]) -> (bool, String) {
    let out = run(shipper
        .cmd()
        .args(args)
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("walshipper {args:?}: {}\n{text}", out.status);
    (out.status.success(), text)
}

/// Starts `wal-receive` and waits until the server shows its walsender's
/// connection as TLS.
fn stream_over_tls(shipper: &Shipper, src: &Cluster, d: &Path) -> std::process::Child {
    let mut receiver = shipper
        .cmd()
        .args(["wal-receive", "--json"])
        .env_remove("PGPASSWORD")
        .env("WALSHIPPER_LOG", "walshipper=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("receiver.err")).unwrap())
        .spawn()
        .expect("start wal-receive");
    let start = Instant::now();
    loop {
        let ssl = src.sql(
            "SELECT coalesce(string_agg(s.ssl::text || ' ' || s.version, ','), '') \
             FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
        );
        if !ssl.is_empty() {
            assert!(
                ssl.starts_with("true TLSv1."),
                "walsender connection: {ssl}"
            );
            return receiver;
        }
        if let Some(status) = receiver.try_wait().unwrap() {
            panic!(
                "wal-receive ended ({status}): {}",
                std::fs::read_to_string(d.join("receiver.err")).unwrap_or_default()
            );
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no walsender");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tls_connections_are_encrypted_verified_and_refused_as_sslmode_says() {
    let dir = scratch("tls");
    let d = dir.path();
    make_ca(d, "ca");
    make_ca(d, "other-ca");
    make_server_cert(d, "ca");
    let (ca, other_ca) = (d.join("ca.pem"), d.join("other-ca.pem"));

    let src_dir = d.join("src");
    let port = free_port();
    let shipper = Shipper::new(d, &src_dir, &d.join("src-sock"), port);
    let base = std::fs::read_to_string(&shipper.config).unwrap();
    let mut src = Cluster::init(
        d,
        "src",
        &[
            "archive_mode = on".into(),
            format!("archive_command = {}", shipper.archive_command()),
            "wal_level = replica".into(),
            "listen_addresses = '127.0.0.1'".into(),
            format!("port = {port}"),
            "ssl = on".into(),
            format!("ssl_cert_file = '{}'", d.join("server.crt").display()),
            format!("ssl_key_file = '{}'", d.join("server.key").display()),
        ],
    );
    src.port = port;
    std::fs::write(
        src.data.join("pg_hba.conf"),
        "local all all trust\nlocal replication all trust\n\
         hostssl all all 127.0.0.1/32 scram-sha-256\n\
         hostssl replication all 127.0.0.1/32 scram-sha-256\n\
         hostnossl all all 127.0.0.1/32 reject\n\
         hostnossl replication all 127.0.0.1/32 reject\n",
    )
    .unwrap();
    run_ok(
        shipper
            .cmd()
            .args(["repo-init", "--kdf-memory-kib", "8192"]),
    );
    src.start();
    src.sql(&format!("ALTER ROLE postgres PASSWORD '{PASSWORD}'"));
    let password_file = d.join("pg-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // verify-full by the name in the certificate: `check` connects, forces
    // a switch and sees that segment archived.
    set_pg(&shipper, &base, "localhost", "verify-full", Some(&ca));
    let (ok, out) = ws(&shipper, &["check"]);
    assert!(ok, "check over TLS (verify-full): {out}");
    assert!(
        out.contains("connection: TLS (TLSv1.3") && out.contains("sslmode verify-full"),
        "{out}"
    );

    // The replication client, streaming over TLS: the server says so.
    let segment = src.sql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let mut receiver = stream_over_tls(&shipper, &src, d);
    // SCRAM bound to the TLS channel: the server checked the binding (a
    // wrong one fails the login).
    let err = std::fs::read_to_string(d.join("receiver.err")).unwrap();
    assert!(
        err.contains("authenticating with SCRAM-SHA-256-PLUS"),
        "{err}"
    );
    // A segment that exists only through the stream: archiving is halted
    // by an archive_command that fails, so only the receiver can store it.
    src.sql("ALTER SYSTEM SET archive_command = 'false'");
    src.sql("SELECT pg_reload_conf()");
    src.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let streamed = src.sql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    assert!(streamed >= segment);
    src.sql("SELECT pg_switch_wal()");
    let start = Instant::now();
    while !shipper.has_wal(&streamed) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{streamed} not streamed into the repository: {}",
            std::fs::read_to_string(d.join("receiver.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = receiver.kill();
    let _ = receiver.wait();
    src.sql("ALTER SYSTEM RESET archive_command");
    src.sql("SELECT pg_reload_conf()");

    // An address the certificate does not name: verify-full refuses it
    // (both clients), verify-ca takes it (the chain is what it checks).
    set_pg(&shipper, &base, "127.0.0.1", "verify-full", Some(&ca));
    let (ok, out) = ws(&shipper, &["check"]);
    assert!(!ok && out.contains("sslmode=verify-full"), "{out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");
    let (ok, out) = ws(&shipper, &["wal-receive", "--json"]);
    assert!(!ok && out.contains("TLS handshake failed"), "{out}");
    assert!(out.contains("name the host"), "{out}");
    set_pg(&shipper, &base, "127.0.0.1", "verify-ca", Some(&ca));
    let (ok, out) = ws(&shipper, &["check"]);
    assert!(ok, "check with verify-ca by address: {out}");
    let mut receiver = stream_over_tls(&shipper, &src, d);
    let _ = receiver.kill();
    let _ = receiver.wait();
    // The password from PGPASSWORD when no password_file is set; a
    // password_file others can read is refused.
    let text = std::fs::read_to_string(&shipper.config).unwrap();
    let no_file: String = text
        .lines()
        .filter(|l| !l.starts_with("password_file = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&shipper.config, &no_file).unwrap();
    let out = run(shipper.cmd().arg("check").env("PGPASSWORD", PASSWORD));
    assert!(out.status.success(), "check with PGPASSWORD: {out:?}");
    std::fs::write(&shipper.config, &text).unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = ws(&shipper, &["check"]);
    assert!(
        !ok && out.contains("pg.password_file") && out.contains("chmod 600"),
        "{out}"
    );
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // prefer and require: encrypted, the certificate not checked.
    for mode in ["prefer", "require"] {
        set_pg(&shipper, &base, "127.0.0.1", mode, None);
        let (ok, out) = ws(&shipper, &["check"]);
        assert!(ok, "check with {mode}: {out}");
    }

    // channel_binding = require: the bound SCRAM login passes (both
    // clients); a server asking for the password in clear (as an impostor
    // under prefer or require could) gets refused before it gets it.
    let text = std::fs::read_to_string(&shipper.config).unwrap();
    std::fs::write(
        &shipper.config,
        text.replace(
            "password_file = ",
            "channel_binding = \"require\"\npassword_file = ",
        ),
    )
    .unwrap();
    let (ok, out) = ws(&shipper, &["check"]);
    assert!(ok, "check with channel_binding = require: {out}");
    let mut receiver = stream_over_tls(&shipper, &src, d);
    let _ = receiver.kill();
    let _ = receiver.wait();
    let hba = std::fs::read_to_string(src.data.join("pg_hba.conf")).unwrap();
    std::fs::write(
        src.data.join("pg_hba.conf"),
        hba.replace("scram-sha-256", "password"),
    )
    .unwrap();
    src.sql("SELECT pg_reload_conf()");
    let (ok, out) = ws(&shipper, &["check"]);
    assert!(
        !ok && out.contains("server did not use channel binding"),
        "{out}"
    );
    let (ok, out) = ws(&shipper, &["wal-receive", "--json"]);
    assert!(
        !ok && out.contains("asked for the password in clear text"),
        "{out}"
    );
    std::fs::write(src.data.join("pg_hba.conf"), hba).unwrap();
    src.sql("SELECT pg_reload_conf()");
    std::fs::write(&shipper.config, text).unwrap();

    // A CA that did not sign the server's certificate (also through
    // require, which checks the chain when sslrootcert is given).
    for mode in ["verify-ca", "require"] {
        set_pg(&shipper, &base, "localhost", mode, Some(&other_ca));
        let (ok, out) = ws(&shipper, &["check"]);
        assert!(!ok && out.contains("UnknownIssuer"), "{out}");
        let (ok, out) = ws(&shipper, &["wal-receive", "--json"]);
        assert!(
            !ok && out.contains("TLS handshake failed") && out.contains("UnknownIssuer"),
            "{out}"
        );
    }
    // The host's public CA store only with the name check.
    set_pg(
        &shipper,
        &base,
        "localhost",
        "verify-ca",
        Some(Path::new("system")),
    );
    let (ok, out) = ws(&shipper, &["check"]);
    assert!(
        !ok && out.contains("needs pg.sslmode = verify-full"),
        "{out}"
    );

    // verify-full with nothing to verify against: a configuration error.
    set_pg(&shipper, &base, "localhost", "verify-full", None);
    let (ok, out) = ws(&shipper, &["check"]);
    assert!(!ok && out.contains("needs pg.sslrootcert"), "{out}");

    // disable: the server's pg_hba.conf refuses a connection in clear.
    set_pg(&shipper, &base, "localhost", "disable", None);
    let (ok, out) = ws(&shipper, &["check"]);
    assert!(!ok && out.contains("no encryption"), "{out}");
    let (ok, out) = ws(&shipper, &["wal-receive", "--json"]);
    assert!(!ok && out.contains("no encryption"), "{out}");

    // require against a server with TLS off: refused by walshipper itself.
    src.sql("ALTER SYSTEM SET ssl = off");
    src.sql("SELECT pg_reload_conf()");
    set_pg(&shipper, &base, "localhost", "require", None);
    let (ok, out) = ws(&shipper, &["check"]);
    assert!(
        !ok && out.contains("server does not support TLS"),
        "check with require against ssl = off: {out}"
    );
    let (ok, out) = ws(&shipper, &["wal-receive", "--json"]);
    assert!(
        !ok && out.contains("does not accept TLS connections"),
        "{out}"
    );
    src.stop();
}
