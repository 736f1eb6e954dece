//! The dashboard and the compliance report as a person sees them: a real
//! cluster with pg_backup_ext and its scheduler (real walshipper runs),
//! a real history (backups of each kind, a restore point, a failed run, a
//! hostile alert), the real `walshipper serve` read by a monitor role, and
//! the pages loaded in headless Chromium: screenshots, the console, the DOM.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const HOSTILE: &str = "<script>alert('pwned')</script>";

/// Kills the child at the end (the server must not outlive its test).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A plain HTTP/1.0 GET: (status line and headers, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((head.to_string(), body.to_string()))
}

/// Runs headless Chromium on `url` with `args`, killed after a minute:
/// (stdout, stderr).
fn chromium(profile: &Path, url: &str, args: &[&str]) -> (String, String) {
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {CHROMIUM} (scripts/setup.sh installs it): {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} {url} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (o.join().unwrap(), e.join().unwrap())
}

/// The lines of Chromium's log that say the page misbehaved: a script
/// error, a CSP refusal, a resource that failed to load.
fn console_errors(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            // The pages run no script: any console message is the browser
            // complaining (a CSP refusal, a failed load).
            l.contains(":CONSOLE")
                || l.contains("Uncaught")
                || l.contains("Refused to")
                || l.contains("Content Security Policy")
                || l.contains("Failed to load resource")
                || l.contains("net::ERR_")
        })
        .collect()
}

/// Takes a 1400 px wide screenshot of `url` into `png`, checks it is a
/// real image and that the page logged no error; returns its DOM.
fn look_at(profile_root: &Path, url: &str, png: &Path) -> String {
    let profile = profile_root.join(png.file_stem().unwrap());
    let (_, log) = chromium(
        &profile.join("shot"),
        url,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1400,2600",
            "--hide-scrollbars",
        ],
    );
    let errors = console_errors(&log);
    assert!(
        errors.is_empty(),
        "{url}: the page logged errors: {errors:#?}"
    );
    let img = std::fs::read(png)
        .unwrap_or_else(|e| panic!("no screenshot {}: {e}\n{log}", png.display()));
    assert_eq!(
        &img[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is no PNG",
        png.display()
    );
    let w = u32::from_be_bytes(img[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(img[20..24].try_into().unwrap());
    assert_eq!((w, h), (1400, 2600), "{}", png.display());
    // A blank or error page compresses to a few kilobytes.
    assert!(
        img.len() > 60_000,
        "{} is only {} bytes",
        png.display(),
        img.len()
    );
    let (dom, log) = chromium(&profile.join("dom"), url, &["--dump-dom"]);
    let errors = console_errors(&log);
    assert!(
        errors.is_empty(),
        "{url}: the page logged errors: {errors:#?}"
    );
    assert!(dom.contains("</html>"), "{url}: no DOM:\n{log}");
    dom
}

/// Where the screenshots are kept: printed, and copied for the lead.
fn keep(png: &Path) {
    println!("screenshot: {}", png.display());
    let shared = Path::new("/var/tmp/pg_backup/screenshots");
    if shared.is_dir() {
        let _ = std::fs::copy(png, shared.join(png.file_name().unwrap()));
    }
}

/// Runs `call` (a backup_run(wait => true)) and returns its backup id.
fn backup_of(c: &Cluster, call: &str) -> String {
    let id = c.sql(&format!("SELECT {call}"));
    c.sql(&format!(
        "SELECT backup_id FROM backup.backup_executions WHERE execution_id = {id}"
    ))
}

#[test]
fn dashboard_and_report_in_a_browser() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: scripts/setup.sh installs it (the dashboard is checked in a real browser)"
    );
    let dir = scratch("dash");
    let d = dir.path();
    // The console check sees what this Chromium reports: a page whose
    // script and image the CSP blocks.
    let bad = d.join("bad.html");
    std::fs::write(
        &bad,
        "<!DOCTYPE html><html><head><meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'\">\
         </head><body><script>x()</script><img src=\"http://127.0.0.1:9/x.png\"></body></html>",
    )
    .unwrap();
    let (_, log) = chromium(
        &d.join("chromium-bad"),
        &format!("file://{}", bad.display()),
        &["--dump-dom"],
    );
    assert!(
        !console_errors(&log).is_empty(),
        "the console check misses a CSP refusal:\n{log}"
    );
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    let c = preloaded_cluster(
        d,
        &shipper,
        &[
            "pg_backup.database = 'postgres'",
            "pg_backup.retry_max = 0",
            "pg_backup.repo_status_interval = 1",
            "pg_backup.storage_sample_interval = 1",
        ],
    );
    start_with_extension(&shipper, &c);
    c.pgbench(&["-i", "-s", "1", "-q"]);

    // The service reads as a monitor, never as the owner.
    c.sql("CREATE ROLE dash_monitor LOGIN");
    c.sql("SELECT backup.grant_monitor('dash_monitor')");
    let port = free_port();
    let serve_conf = d.join("serve.toml");
    let base = std::fs::read_to_string(&shipper.config).unwrap();
    std::fs::write(
        &serve_conf,
        format!(
            "{base}[serve]\nlisten = \"127.0.0.1:{port}\"\nuser = \"dash_monitor\"\ninfo_interval = 2\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&serve_conf, std::fs::Permissions::from_mode(0o600)).unwrap();
    let log = std::fs::File::create(d.join("serve.log")).unwrap();
    let server = Killed(
        Command::new(walshipper_bin())
            .arg("--config")
            .arg(&serve_conf)
            .arg("serve")
            .env_remove("WALSHIPPER_PASSPHRASE")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("walshipper serve starts"),
    );
    let start = Instant::now();
    let (head, _) = loop {
        match http_get(port, "/health") {
            Ok(r) => break r,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!(
                "walshipper serve does not answer on {port}: {e}\n{}",
                std::fs::read_to_string(d.join("serve.log")).unwrap_or_default()
            ),
        }
    };
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );

    // Before any history: every part says so in a sentence.
    let (head, page) = http_get(port, "/").unwrap();
    assert!(head.contains(" 200"), "{head}\n{page}");
    for empty in [
        "No backup job is scheduled yet",
        "No backup has run in the last days",
    ] {
        assert!(
            page.contains(empty),
            "the empty dashboard lacks {empty:?}:\n{page}"
        );
    }

    // History: a job, a full backup, a restore point, an incremental and a
    // differential on it, with writes between them.
    c.sql("SELECT backup.job_create('nightly', '0 3 * * *')");
    let full = backup_of(&c, "backup.backup_run('nightly', 'full', wait => true)");
    c.pgbench(&["-t", "200"]);
    c.sql("SELECT backup.restore_point_create('before_upgrade', 'a note')");
    // The segment this switch completes: removed below, a gap in the WAL.
    let lost = c.sql("SELECT pg_walfile_name(pg_switch_wal())");
    let incr = backup_of(&c, "backup.backup_run(kind => 'incr', wait => true)");
    c.pgbench(&["-t", "200"]);
    let diff = backup_of(&c, "backup.backup_run(kind => 'diff', wait => true)");
    for id in [&full, &incr, &diff] {
        assert!(id.len() >= 16, "a backup id: {id:?}");
    }

    // A WAL segment lost from the repository (the backups after it archived
    // later ones): the dashboard must show the gap.
    let lost_file = shipper.wal_object(&lost);
    std::fs::remove_file(&lost_file)
        .unwrap_or_else(|e| panic!("{} was archived: {e}", lost_file.display()));

    // A failed run: walshipper cannot be started.
    c.sql("ALTER SYSTEM SET pg_backup.walshipper_path = '/nonexistent/walshipper'");
    c.sql("SELECT pg_reload_conf()");
    wait_for(
        &c,
        "SELECT current_setting('pg_backup.walshipper_path')",
        "/nonexistent/walshipper",
        Duration::from_secs(10),
    );
    let failed = c.sql("SELECT backup.backup_run(kind => 'full')");
    wait_for(
        &c,
        &format!("SELECT status FROM backup.backup_executions WHERE execution_id = {failed}"),
        "failed",
        Duration::from_secs(30),
    );
    c.sql("ALTER SYSTEM RESET pg_backup.walshipper_path");
    c.sql("SELECT pg_reload_conf()");
    // An alert whose subject and message carry markup: text on the pages.
    c.sql(&format!(
        "INSERT INTO backup.alerts (kind, severity, subject, message) \
         VALUES ('expire_failed', 'critical', $${HOSTILE}$$, $$expire said {HOSTILE} & <b>no</b>$$)"
    ));
    // The scheduler sees the repository again (status, usage samples).
    wait_for(
        &c,
        "SELECT status || ' ' || last_backup FROM backup.repositories",
        &format!("ok {diff}"),
        Duration::from_secs(30),
    );

    // The raw page: escaped, no script, no secret. The repositories are
    // read in the background (info_interval = 2): wait for a reading that
    // saw the gap.
    let started = std::time::Instant::now();
    let (head, page) = loop {
        let (head, page) = http_get(port, "/").unwrap();
        if page.contains("WAL gap in repo1") || started.elapsed() > Duration::from_secs(20) {
            break (head, page);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(head.contains(" 200"), "{head}\n{page}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-security-policy"),
        "{head}"
    );
    assert!(
        !page.contains(HOSTILE),
        "raw markup from the catalog on the page"
    );
    assert!(
        !page.to_ascii_lowercase().contains("<script"),
        "a script on the page"
    );
    assert!(page.contains("&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;"));
    for secret in [
        "integration-test passphrase",
        "testsecret",
        "passphrase_file",
    ] {
        assert!(!page.contains(secret), "{secret} on the page");
    }

    // In the browser.
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let profiles = d.join("chromium");
    let png = shots.join("dashboard.png");
    let dom = look_at(&profiles, &format!("http://127.0.0.1:{port}/"), &png);
    keep(&png);
    for text in [
        "Timeline of backups",
        "RPO against its target",
        "Backup durations",
        "Storage per repository",
        "Open alerts",
        "before_upgrade",
        "nightly",
        full.as_str(),
        incr.as_str(),
        diff.as_str(),
        "failed run",
        "restorable window",
        "approximate",
        "WAL gap in repo1, timeline 1",
        lost.as_str(),
    ] {
        assert!(dom.contains(text), "the dashboard lacks {text:?}");
    }
    assert!(
        dom.contains("&lt;script&gt;alert('pwned')&lt;/script&gt;"),
        "the hostile subject is not shown as text"
    );
    assert!(
        !dom.to_ascii_lowercase().contains("<script"),
        "a script element in the DOM"
    );

    // The report: served, and written by walshipper report.
    let today = chrono::Utc::now().date_naive();
    let (from, to) = (
        today - chrono::Duration::days(7),
        today + chrono::Duration::days(1),
    );
    let url = format!("http://127.0.0.1:{port}/report?from={from}&to={to}");
    let png = shots.join("report.png");
    let dom = look_at(&profiles, &url, &png);
    keep(&png);
    for text in [
        "Backup compliance report",
        "overall status",
        "Backups per day",
        "Storage over the period",
        "RPO over the period",
        "Schedule compliance",
        "Recovery objectives",
        "Encryption and key age",
        "Alerts: open and resolved",
        "nightly",
    ] {
        assert!(dom.contains(text), "the report lacks {text:?}");
    }
    assert!(
        !dom.to_ascii_lowercase().contains("<script"),
        "a script element in the report"
    );
    let (head, body) = http_get(port, "/report?from=2026-12-01&to=2026-11-01").unwrap();
    assert!(head.contains(" 400"), "a reversed period: {head}\n{body}");

    let out = d.join("reports").join("compliance.html");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    run_ok(
        Command::new(walshipper_bin())
            .arg("--config")
            .arg(&serve_conf)
            .args([
                "report",
                "--from",
                &from.to_string(),
                "--to",
                &to.to_string(),
                "--output",
            ])
            .arg(&out),
    );
    let doc = std::fs::read_to_string(&out).unwrap();
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "the report's mode");
    for id in [
        "summary",
        "schedule",
        "backups",
        "recovery_objectives",
        "verification",
        "retention",
        "encryption",
        "storage",
        "alerts",
    ] {
        assert!(
            doc.contains(&format!("id=\"{id}\"")),
            "the report file lacks section {id}"
        );
    }
    assert!(doc.contains("@media print"));
    assert!(!doc.contains(HOSTILE));
    let bad = run(Command::new(walshipper_bin())
        .arg("--config")
        .arg(&serve_conf)
        .args(["report", "--from", "last tuesday", "--output"])
        .arg(d.join("never.html")));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"));
    assert!(!d.join("never.html").exists());
    drop(server);
}
