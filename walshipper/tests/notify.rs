//! Notifications end to end: a real cluster with pg_backup_ext preloaded
//! and its scheduler running the real walshipper; alerts it raises and
//! resolves go out through walshipper's notifier to a real HTTP receiver
//! (a small server in this test, which checks the HMAC signature and can
//! answer 500 or hang) and a real SMTP server (aiosmtpd under Debian's
//! python3, STARTTLS and AUTH required, a certificate of a private CA).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hmac::Mac;

const PYTHON: &str = "/usr/bin/python3";
const OPENSSL: &str = "/usr/bin/openssl";
const HOOK_SECRET: &str = "hook-secret-0123456789";
const SMTP_USER: &str = "alerts";
const SMTP_PASSWORD: &str = "smtp-pass-9876";

/// What the receiver got: path, headers (lower-case names), body, when.
#[derive(Clone, Debug)]
struct Request {
    path: String,
    headers: HashMap<String, String>,
    body: String,
    at: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Ok,
    Fail500,
    /// Holds the connection without answering (until the client gives up).
    Hang,
}

#[derive(Default)]
struct Receiver {
    requests: Mutex<Vec<Request>>,
    modes: Mutex<HashMap<String, Mode>>,
    /// Hangs: when each began and (once the client gave up) ended.
    hangs: Mutex<Vec<(Instant, Option<Instant>)>>,
}

impl Receiver {
    fn start() -> (Arc<Receiver>, u16) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let r = Arc::new(Receiver::default());
        let r2 = Arc::clone(&r);
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let r = Arc::clone(&r2);
                std::thread::spawn(move || r.serve(s));
            }
        });
        (r, port)
    }

    fn set(&self, path: &str, m: Mode) {
        self.modes.lock().unwrap().insert(path.into(), m);
    }

    fn serve(&self, s: TcpStream) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rd = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        if rd.read_line(&mut line).is_err() {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or_default().to_string();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if rd.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let n: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; n];
        if rd.read_exact(&mut body).is_err() {
            return;
        }
        self.requests.lock().unwrap().push(Request {
            path: path.clone(),
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            at: Instant::now(),
        });
        let mode = *self.modes.lock().unwrap().get(&path).unwrap_or(&Mode::Ok);
        let mut s = s;
        match mode {
            Mode::Ok => {
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
            Mode::Fail500 => {
                let _ = s.write_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 12\r\nConnection: close\r\n\r\nreceiver bug",
                );
            }
            Mode::Hang => {
                let i = {
                    let mut h = self.hangs.lock().unwrap();
                    h.push((Instant::now(), None));
                    h.len() - 1
                };
                // Until the client hangs up (its timeout), or 30 s.
                let mut buf = [0u8; 1];
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let _ = s.read(&mut buf);
                self.hangs.lock().unwrap()[i].1 = Some(Instant::now());
            }
        }
    }

    fn on(&self, path: &str) -> Vec<Request> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// The JSON bodies POSTed to `path`, each checked: signature valid
    /// over "<timestamp>.<body>", headers matching the body.
    fn events(&self, path: &str) -> Vec<serde_json::Value> {
        self.on(path)
            .iter()
            .map(|r| {
                let ts = &r.headers["x-pgbackup-timestamp"];
                let sig = r.headers["x-pgbackup-signature"]
                    .strip_prefix("sha256=")
                    .expect("sha256= signature");
                let mut mac =
                    hmac::Hmac::<sha2::Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
                mac.update(format!("{ts}.{}", r.body).as_bytes());
                mac.verify_slice(&hex::decode(sig).unwrap())
                    .unwrap_or_else(|_| panic!("bad signature on {}", r.body));
                let age = chrono::Utc::now().timestamp() - ts.parse::<i64>().unwrap();
                assert!((0..120).contains(&age), "timestamp {ts}");
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                assert_eq!(r.headers["x-pgbackup-event"], v["event"].as_str().unwrap());
                assert_eq!(
                    r.headers["x-pgbackup-delivery"],
                    v["delivery_id"].as_str().unwrap()
                );
                assert_eq!(r.headers["content-type"], "application/json");
                v
            })
            .collect()
    }

    /// How many calls to `path` were about `kind` and `event`.
    fn count(&self, path: &str, kind: &str, event: &str) -> usize {
        self.events(path)
            .iter()
            .filter(|v| v["alert"]["kind"] == kind && v["event"] == event)
            .count()
    }
}

/// Runs `cmd`, panicking with its output on failure.
fn sh(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A private CA and a certificate for localhost it signed (rustls refuses
/// a self-signed CA certificate as a server's). Returns (ca.pem, cert, key).
fn certificates(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    assert!(
        Path::new(OPENSSL).exists(),
        "{OPENSSL} is missing (scripts/setup.sh installs it)"
    );
    let p = |n: &str| d.join(n);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    sh(Command::new(OPENSSL)
        .args([
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=pg_backup test CA",
        ])
        .args(ec)
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem")));
    sh(Command::new(OPENSSL)
        .args(["req", "-subj", "/CN=localhost"])
        .args(ec)
        .arg("-keyout")
        .arg(p("smtp.key"))
        .arg("-out")
        .arg(p("smtp.csr")));
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    sh(Command::new(OPENSSL)
        .args(["x509", "-req", "-days", "2", "-set_serial", "2"])
        .arg("-in")
        .arg(p("smtp.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-extfile")
        .arg(p("ext.cnf"))
        .arg("-out")
        .arg(p("smtp.pem")));
    (p("ca.pem"), p("smtp.pem"), p("smtp.key"))
}

const SMTP_SINK: &str = r#"
import os, ssl, sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

outdir, cert, key, port, user, password = sys.argv[1:7]

class Sink:
    async def handle_DATA(self, server, session, envelope):
        name = os.path.join(outdir, "%d.eml" % time.time_ns())
        with open(name + ".tmp", "wb") as f:
            f.write(envelope.original_content or envelope.content)
        os.rename(name + ".tmp", name)
        return "250 OK"

def authenticate(server, session, envelope, mechanism, data):
    ok = isinstance(data, LoginPassword) and data.login == user.encode() and data.password == password.encode()
    # handled=False: aiosmtpd answers 535 itself.
    return AuthResult(success=ok, handled=False)

ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
c = Controller(Sink(), hostname="127.0.0.1", port=int(port), tls_context=ctx, require_starttls=True,
               authenticator=authenticate, auth_required=True, auth_require_tls=True)
c.start()
print("ready", flush=True)
sys.stdin.read()
c.stop()
"#;

/// The SMTP server: killed when dropped.
struct Smtp {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Smtp {
    fn start(d: &Path, cert: &Path, key: &Path) -> Smtp {
        assert!(
            Path::new(PYTHON).exists(),
            "{PYTHON} is missing (scripts/setup.sh installs it, with python3-aiosmtpd)"
        );
        let dir = d.join("mail");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(d.join("sink.py"), SMTP_SINK).unwrap();
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut child = Command::new(PYTHON)
            .arg(d.join("sink.py"))
            .arg(&dir)
            .arg(cert)
            .arg(key)
            .arg(port.to_string())
            .args([SMTP_USER, SMTP_PASSWORD])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(d.join("sink.log")).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the SMTP sink did not start");
        Smtp { child, port, dir }
    }

    /// (Subject, whole message) of each e-mail received.
    fn mails(&self) -> Vec<(String, String)> {
        let mut names: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap();
                // Headers end at the first blank line; the subject may be folded.
                let head = text
                    .split("\r\n\r\n")
                    .next()
                    .unwrap_or_default()
                    .replace("\r\n ", " ");
                let subject = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Subject: "))
                    .unwrap_or_default()
                    .to_string();
                (subject, text)
            })
            .collect()
    }

    fn count(&self, prefix: &str) -> usize {
        self.mails()
            .iter()
            .filter(|(s, _)| s.starts_with(prefix))
            .count()
    }
}

/// `walshipper serve`, killed when dropped; its log in serve.log.
struct Serve(Child);

impl Serve {
    fn start(shipper: &Shipper, d: &Path) -> Serve {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("serve.log"))
            .unwrap();
        Serve(
            shipper
                .cmd()
                .arg("serve")
                .env("WALSHIPPER_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.stop();
    }
}

fn private_file(p: &Path, content: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(p, content).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "waited {timeout:?} for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn alerts_go_out_by_webhook_and_email_once_each_retried_and_given_up() {
    let dir = scratch("notify");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    let c = preloaded_cluster(
        d,
        &shipper,
        &[
            "pg_backup.database = 'postgres'",
            "pg_backup.retry_max = 0",
            "pg_backup.overdue_grace = 0",
            "pg_backup.verify_after_backup = off",
            // The host's disk must not raise repository_almost_full: that
            // alert would take the "capped" channel's one send an hour (it
            // did on a host 85 % full, failing the test).
            "pg_backup.storage_warn_percent = 100",
            "pg_backup.storage_warn_days = 0",
        ],
    );
    let (ca, cert, key) = certificates(d);
    let smtp = Smtp::start(d, &cert, &key);
    let (rx, port) = Receiver::start();
    rx.set("/flaky", Mode::Fail500);
    rx.set("/slow", Mode::Hang);
    private_file(&d.join("hook.secret"), &format!("{HOOK_SECRET}\n"));
    private_file(&d.join("smtp.password"), &format!("{SMTP_PASSWORD}\n"));
    private_file(&d.join("wrong.password"), "not-the-password\n");
    let mail = |name: &str, password: &str, extra: &str| {
        format!(
            "[[notify.channel]]\nname = \"{name}\"\ntype = \"email\"\nsmtp_host = \"localhost\"\nsmtp_port = {}\n\
             username = \"{SMTP_USER}\"\npassword_file = \"{}\"\ntls_ca_file = \"{}\"\n\
             from = \"pg_backup <backup@db.example>\"\nto = [\"oncall@example.org\"]\n{extra}",
            smtp.port,
            d.join(password).display(),
            ca.display()
        )
    };
    let hook = |name: &str, extra: &str| {
        format!(
            "[[notify.channel]]\nname = \"{name}\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{port}/{name}\"\n\
             secret_file = \"{}\"\n{extra}",
            d.join("hook.secret").display()
        )
    };
    let mut config = std::fs::read_to_string(&shipper.config).unwrap();
    config.push_str(&format!(
        "[notify]\npoll_interval = 2\nmax_attempts = 3\nretry_backoff = 1\ntimeout = 3\n\
         {}{}{}{}{}{}",
        hook("hook", ""),
        mail("mail", "smtp.password", ""),
        // Only failed backups, and they fail: 500, a hang, a wrong password.
        hook("flaky", "kinds = [\"backup_failed\"]\n"),
        hook("slow", "kinds = [\"backup_failed\"]\ntimeout = 4\n"),
        mail("badmail", "wrong.password", "kinds = [\"backup_failed\"]\n"),
        // Only tests (no such alert here), one an hour.
        hook(
            "capped",
            "kinds = [\"repository_almost_full\"]\nrate_limit = 1\n"
        ),
    ));
    std::fs::write(&shipper.config, config).unwrap();

    // notify-test: at once, no catalog; each channel's verdict, the wrong
    // password named clearly (and not shown).
    rx.set("/slow", Mode::Ok);
    let out = run(shipper.cmd().args(["notify-test"]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("hook (webhook http://127.0.0.1:"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("hook ") && l.ends_with(": ok")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("mail ") && l.ends_with(": ok")),
        "{text}"
    );
    let bad = text
        .lines()
        .find(|l| l.starts_with("badmail "))
        .unwrap_or_default();
    assert!(
        bad.contains("FAILED")
            && bad.contains(&format!("refused authentication for user '{SMTP_USER}'"))
            && bad.contains("535")
            && !bad.contains("not-the-password"),
        "{text}"
    );
    assert!(
        text.contains("flaky") && text.contains("answered 500"),
        "{text}"
    );
    assert_eq!(rx.events("/hook").len(), 1);
    assert_eq!(rx.events("/hook")[0]["event"], "test");
    assert_eq!(smtp.count("[pg_backup] TEST notification_test"), 1);
    let one = run(shipper.cmd().args(["notify-test", "--channel", "hook"]));
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stdout)
    );
    assert_eq!(rx.events("/hook").len(), 2);
    rx.set("/slow", Mode::Hang);

    start_with_extension(&shipper, &c);
    c.sql("CREATE ROLE notifier LOGIN");
    c.sql("SELECT backup.grant_notifier('notifier')");
    // walshipper serve runs the notifier, connected as that role.
    let mut config = std::fs::read_to_string(&shipper.config).unwrap();
    config.push_str("[serve]\nlisten = \"127.0.0.1:0\"\nuser = \"notifier\"\n");
    std::fs::write(&shipper.config, config).unwrap();
    let mut serve = Serve::start(&shipper, d);

    // A job overdue (created long ago, never succeeded) whose backup fails
    // (its configuration is missing), then succeeds.
    c.sql("SELECT backup.job_create('nightly', '0 3 * * *')");
    c.sql("UPDATE backup.backup_jobs SET created_at = now() - interval '3 days' WHERE name = 'nightly'");
    let alert_open = |kind: &str| {
        format!("SELECT count(*) FROM backup.alerts WHERE kind = '{kind}' AND resolved_at IS NULL")
    };
    wait_for(&c, &alert_open("job_overdue"), "1", Duration::from_secs(20));
    c.sql("ALTER SYSTEM SET pg_backup.walshipper_config = '/nonexistent/walshipper.toml'");
    c.sql("SELECT pg_reload_conf()");
    wait_for(
        &c,
        "SHOW pg_backup.walshipper_config",
        "/nonexistent/walshipper.toml",
        Duration::from_secs(10),
    );
    let failed = c.sql("SELECT backup.backup_run('nightly')");
    wait_for(
        &c,
        &format!("SELECT status FROM backup.backup_executions WHERE execution_id = {failed}"),
        "failed",
        Duration::from_secs(30),
    );
    c.sql(&format!(
        "ALTER SYSTEM SET pg_backup.walshipper_config = '{}'",
        shipper.config.display()
    ));
    c.sql("SELECT pg_reload_conf()");

    // The webhook and the e-mail of the failure; the slow receiver hangs on it.
    wait_until(
        "the failed backup's webhook",
        Duration::from_secs(20),
        || rx.count("/hook", "backup_failed", "raised") == 1,
    );
    let v = rx
        .events("/hook")
        .into_iter()
        .find(|v| v["alert"]["kind"] == "backup_failed")
        .unwrap();
    assert_eq!(v["alert"]["severity"], "critical");
    assert_eq!(v["alert"]["job"], "nightly");
    assert!(
        v["alert"]["message"]
            .as_str()
            .unwrap()
            .contains("nonexistent"),
        "{v}"
    );
    assert!(v["cluster"]["database"] == "postgres", "{v}");
    wait_until(
        "the failed backup's e-mail",
        Duration::from_secs(20),
        || smtp.count("[pg_backup] CRITICAL backup_failed nightly: ") == 1,
    );
    let (_, m) = smtp
        .mails()
        .into_iter()
        .find(|(s, _)| s.starts_with("[pg_backup] CRITICAL backup_failed"))
        .unwrap();
    assert!(
        m.contains("What to do:") && m.contains("SELECT * FROM backup.alerts WHERE alert_id ="),
        "{m}"
    );

    // The scheduler is not held up by the hanging receiver: a backup
    // finishes while it hangs.
    let hanging = || {
        rx.hangs
            .lock()
            .unwrap()
            .iter()
            .any(|(_, end)| end.is_none())
    };
    wait_until(
        "the slow receiver to hang",
        Duration::from_secs(20),
        hanging,
    );
    let backup_start = Instant::now();
    assert_eq!(
        c.sql("SELECT backup.backup_run('nightly', wait => true) > 0"),
        "t"
    );
    let backup_end = Instant::now();
    wait_for(
        &c,
        &alert_open("backup_failed"),
        "0",
        Duration::from_secs(10),
    );
    // Meanwhile the other channels went on: the resolution went out while
    // the slow receiver still held a request.
    wait_until("the resolution's webhook", Duration::from_secs(20), || {
        rx.count("/hook", "backup_failed", "resolved") == 1
    });
    let resolved_at = rx
        .on("/hook")
        .iter()
        .filter(|r| r.body.contains("\"resolved\"") && r.body.contains("backup_failed"))
        .map(|r| r.at)
        .next()
        .unwrap();
    let hangs = rx.hangs.lock().unwrap().clone();
    assert!(
        hangs
            .iter()
            .any(|(s, e)| *s <= backup_start && e.is_none_or(|e| e >= backup_start)),
        "the backup did not start during a hang: {hangs:?} {backup_start:?}..{backup_end:?}"
    );
    assert!(
        hangs
            .iter()
            .any(|(s, e)| *s <= resolved_at && e.is_none_or(|e| e >= resolved_at)),
        "the resolution was not sent during a hang: {hangs:?} {resolved_at:?}"
    );
    wait_for(&c, &alert_open("job_overdue"), "0", Duration::from_secs(20));

    // Archiving fails, then recovers.
    c.sql("ALTER SYSTEM SET archive_command = '/bin/false'");
    c.sql("SELECT pg_reload_conf()");
    c.sql("CREATE TABLE filler AS SELECT 1 AS i");
    c.sql("SELECT pg_switch_wal()");
    wait_for(
        &c,
        &alert_open("archive_failing"),
        "1",
        Duration::from_secs(30),
    );
    c.sql("ALTER SYSTEM RESET archive_command");
    c.sql("SELECT pg_reload_conf()");
    wait_for(
        &c,
        &alert_open("archive_failing"),
        "0",
        Duration::from_secs(60),
    );

    // Each alert: one webhook call and one e-mail when raised, one more
    // each when resolved.
    for (kind, raised) in [
        ("backup_failed", "CRITICAL"),
        ("job_overdue", "WARNING"),
        ("archive_failing", "CRITICAL"),
    ] {
        wait_until(
            &format!("{kind} resolved, by webhook and e-mail"),
            Duration::from_secs(30),
            || {
                rx.count("/hook", kind, "resolved") == 1
                    && smtp.count(&format!("[pg_backup] RESOLVED {kind} ")) == 1
            },
        );
        assert_eq!(rx.count("/hook", kind, "raised"), 1, "{kind}");
        assert_eq!(
            smtp.count(&format!("[pg_backup] {raised} {kind} ")),
            1,
            "{kind}"
        );
    }

    // The failing channels: 500 and the hang retried up to max_attempts,
    // the wrong password given up at once; each raises notification_failed,
    // sent to the other channels only.
    let failed_for = |ch: &str| {
        format!(
            "SELECT count(*) FROM backup.alerts WHERE kind = 'notification_failed' AND subject = '{ch}' AND resolved_at IS NULL"
        )
    };
    for ch in ["flaky", "slow", "badmail"] {
        wait_for(&c, &failed_for(ch), "1", Duration::from_secs(40));
    }
    let delivery = |ch: &str| {
        c.sql(&format!(
            "SELECT d.status || ' ' || d.attempts FROM backup.notification_deliveries d \
               JOIN backup.notification_events e USING (event_id) \
              WHERE d.channel = '{ch}' AND e.kind = 'backup_failed' AND e.event = 'raised'"
        ))
    };
    assert_eq!(delivery("flaky"), "failed 3");
    assert_eq!(delivery("slow"), "failed 3");
    assert_eq!(delivery("badmail"), "failed 1");
    // Each attempt a call, with the same delivery id.
    let raised_calls = |path: &str| {
        let ids: Vec<_> = rx
            .events(path)
            .into_iter()
            .filter(|v| v["event"] == "raised")
            .map(|v| v["delivery_id"].clone())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
        ids.len()
    };
    assert_eq!(raised_calls("/flaky"), 3);
    assert_eq!(raised_calls("/slow"), 3);
    // The alert's message is fixed text; what went wrong is in its details.
    let msg = c.sql("SELECT details->>'error' FROM backup.alerts WHERE kind = 'notification_failed' AND subject = 'badmail'");
    assert!(
        msg.contains("refused authentication for user 'alerts'")
            && msg.contains("535")
            && !msg.contains("not-the-password"),
        "{msg}"
    );
    assert!(c
        .sql("SELECT details->>'error' FROM backup.alerts WHERE subject = 'flaky'")
        .contains("answered 500"));
    assert!(c
        .sql("SELECT details->>'error' FROM backup.alerts WHERE subject = 'slow'")
        .contains("did not answer within 4 s"));
    wait_until(
        "notification_failed reported",
        Duration::from_secs(20),
        || {
            let hooks: Vec<_> = rx
                .events("/hook")
                .into_iter()
                .filter(|v| v["alert"]["kind"] == "notification_failed" && v["event"] == "raised")
                .map(|v| v["alert"]["subject"].as_str().unwrap().to_string())
                .collect();
            hooks.len() == 3 && smtp.count("[pg_backup] WARNING notification_failed ") == 3
        },
    );
    // Never to the channel that fails, and nothing secret in the catalog.
    assert!(rx
        .events("/flaky")
        .iter()
        .all(|v| v["alert"]["kind"] == "backup_failed" || v["event"] == "test"));
    assert_eq!(
        c.sql(&format!(
            "SELECT count(*) FROM backup.notification_deliveries \
              WHERE last_error LIKE '%{SMTP_PASSWORD}%' OR last_error LIKE '%not-the-password%' OR last_error LIKE '%{HOOK_SECRET}%'"
        )),
        "0"
    );

    // backup.notification_test() from SQL reaches both kinds of channel;
    // the flaky receiver, fixed, takes its test and its alert resolves.
    rx.set("/flaky", Mode::Ok);
    let before_hook = rx.count("/hook", "notification_test", "test");
    let id = c.sql("SELECT backup.notification_test()");
    wait_for(
        &c,
        &format!(
            "SELECT string_agg(channel || ':' || status, ',' ORDER BY channel) FROM backup.notification_deliveries \
              WHERE event_id = {id} AND channel <> 'slow'"
        ),
        "badmail:failed,capped:sent,flaky:sent,hook:sent,mail:sent",
        Duration::from_secs(40),
    );
    // Over its rate limit, the next one waits (not sent, not lost: recorded
    // as seen, so max_age never skips it).
    let capped = c.sql("SELECT backup.notification_test('capped')");
    assert_eq!(
        rx.count("/hook", "notification_test", "test"),
        before_hook + 1
    );
    assert_eq!(smtp.count("[pg_backup] TEST notification_test"), 2);
    wait_for(&c, &failed_for("flaky"), "0", Duration::from_secs(10));
    wait_until("flaky's recovery reported", Duration::from_secs(20), || {
        rx.events("/hook").iter().any(|v| {
            v["alert"]["kind"] == "notification_failed"
                && v["alert"]["subject"] == "flaky"
                && v["event"] == "resolved"
        })
    });
    // A restart sends nothing twice: the deliveries are in the catalog. A
    // channel sends in order, so once a new test has arrived, anything
    // resent would have too.
    serve.stop();
    let hook_calls = rx.on("/hook").len();
    let mails = smtp.mails().len();
    let mut serve = Serve::start(&shipper, d);
    let id = c.sql("SELECT backup.notification_test('hook')");
    wait_for(
        &c,
        &format!("SELECT status FROM backup.notification_deliveries WHERE event_id = {id}"),
        "sent",
        Duration::from_secs(20),
    );
    assert!(rx.on("/hook").len() > hook_calls);
    assert!(smtp.mails().len() >= mails);
    // (Besides notify-test's, which does not go through the catalog.)
    let from_catalog = rx
        .events("/capped")
        .iter()
        .filter(|v| !v["delivery_id"].as_str().unwrap().starts_with("test-"))
        .count();
    assert_eq!(from_catalog, 1);
    assert_eq!(
        c.sql(&format!(
            "SELECT count(*) FROM backup.notification_pending('capped') WHERE event_id = {capped} AND seen AND attempts = 0"
        )),
        "1"
    );
    assert!(std::fs::read_to_string(d.join("serve.log"))
        .unwrap()
        .contains("the channel's rate_limit"));
    for (kind, raised) in [
        ("backup_failed", "CRITICAL"),
        ("job_overdue", "WARNING"),
        ("archive_failing", "CRITICAL"),
    ] {
        assert_eq!(rx.count("/hook", kind, "raised"), 1, "{kind}");
        assert_eq!(rx.count("/hook", kind, "resolved"), 1, "{kind}");
        assert_eq!(
            smtp.count(&format!("[pg_backup] {raised} {kind} ")),
            1,
            "{kind}"
        );
        assert_eq!(
            smtp.count(&format!("[pg_backup] RESOLVED {kind} ")),
            1,
            "{kind}"
        );
    }
    serve.stop();
    assert!(
        !std::fs::read_to_string(d.join("serve.log"))
            .unwrap()
            .contains(SMTP_PASSWORD),
        "a secret in the log"
    );

    // One delivery id per event and channel, whatever the attempts.
    let ids: Vec<String> = rx
        .events("/hook")
        .iter()
        .map(|v| v["delivery_id"].as_str().unwrap().to_string())
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "{ids:?}");
}
