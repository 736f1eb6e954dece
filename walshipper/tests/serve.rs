//! `walshipper serve` end to end: a real cluster with pg_backup_ext and its
//! scheduler running the real walshipper, a scripted history of runs, then
//! /metrics checked against the catalog, by `promtool check metrics` and by
//! a real Prometheus scraping it; authentication, /health, a catalog that
//! goes away and comes back, SIGTERM; the shipped alert rules (promtool) and
//! Grafana dashboard (every metric it queries exists).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

/// A machine tool the test needs: CI installs it (scripts/setup.sh); a
/// missing one fails the test rather than skipping it.
fn tool(path: &str) -> PathBuf {
    let p = PathBuf::from(path);
    assert!(
        p.exists(),
        "{path} is missing: scripts/setup.sh installs it (Debian package prometheus)"
    );
    p
}

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring")
}

struct Http {
    status: u16,
    head: String,
    body: String,
}

/// Decodes a chunked body (Prometheus's API may answer so).
fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = b.split_once("\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            return out;
        }
        out.push_str(&rest[..n]);
        b = rest[n..].trim_start_matches("\r\n");
    }
}

/// One HTTP/1.1 request, connection closed after it.
fn request(addr: &str, method: &str, path: &str, auth: Option<&str>) -> Http {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Http {
        status,
        head: head.to_string(),
        body,
    }
}

fn get(addr: &str, path: &str, auth: Option<&str>) -> Http {
    request(addr, "GET", path, auth)
}

/// `walshipper serve`, stopped (killed) when dropped.
struct Serve {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Serve {
    fn start(config: &Path, log: &Path) -> Serve {
        let child = Command::new(walshipper_bin())
            .arg("--config")
            .arg(config)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Serve {
            child,
            addr: String::new(),
            log: log.to_path_buf(),
        };
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(rest) = text.split("listening on http://").nth(1) {
                s.addr = rest.split_whitespace().next().unwrap().to_string();
                return s;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("walshipper serve exited ({st}):\n{text}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "serve did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name{labels} value` lines -> value by series.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, v) = l.rsplit_once(' ').unwrap();
            (series.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// The metric names a scrape carries (its HELP lines).
fn names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

fn value(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or_else(|| {
        panic!(
            "no series {series}; have:\n{}",
            m.keys().cloned().collect::<Vec<_>>().join("\n")
        )
    })
}

fn num(c: &Cluster, sql: &str) -> f64 {
    c.sql(sql)
        .parse()
        .unwrap_or_else(|_| panic!("not a number from {sql}"))
}

/// Polls until `f` holds (the scheduler keeps the catalog moving).
fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if start.elapsed() > timeout => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// Every `pg_backup_*` name in a PromQL expression, without histogram suffixes.
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("pg_backup_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let mut n = tail[..end].to_string();
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(s) = n.strip_suffix(suffix) {
                n = s.to_string();
            }
        }
        out.push(n);
        rest = &tail[end..];
    }
    out
}

/// Metrics that exist only with history this test does not make: growth
/// needs storage samples spread over time (sql/capacity.sql), and a
/// projection a repository that grows.
const CONDITIONAL: &[&str] = &[
    "pg_backup_repository_growth_bytes_per_day",
    "pg_backup_repository_projected_full_timestamp_seconds",
];

fn check_known(where_: &str, used: &[String], scraped: &[String]) {
    let source = include_str!("../src/serve/metrics.rs");
    for n in used {
        if CONDITIONAL.contains(&n.as_str()) {
            assert!(
                source.contains(&format!("\"{n}\"")),
                "{where_}: {n} is not a metric walshipper serve exports"
            );
            continue;
        }
        assert!(
            scraped.contains(n),
            "{where_} uses {n}, which /metrics does not carry"
        );
    }
}

#[test]
fn metrics_auth_health_and_a_real_prometheus() {
    let prometheus = tool(PROMETHEUS);
    let promtool = tool(PROMTOOL);
    let dir = scratch("serve");
    let d = dir.path();
    let shipper = Shipper::new(d, &d.join("src"), &d.join("src-sock"), 5432);
    let c = preloaded_cluster(
        d,
        &shipper,
        &[
            "pg_backup.database = 'postgres'",
            "pg_backup.retry_max = 0",
            "pg_backup.repo_status_interval = 2",
            "pg_backup.rpo_target = 600",
            // The test asks for its verification itself.
            "pg_backup.verify_after_backup = off",
        ],
    );
    start_with_extension(&shipper, &c);
    c.sql("CREATE ROLE walshipper_monitor LOGIN");
    c.sql("SELECT backup.grant_monitor('walshipper_monitor')");

    // The service reads as the monitor, with a token.
    let token = d.join("token");
    std::fs::write(&token, "a-test-token-0123456789\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let base = std::fs::read_to_string(&shipper.config).unwrap();
    let serve_cfg = d.join("serve.toml");
    std::fs::write(
        &serve_cfg,
        format!(
            "{base}[serve]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\nuser = \"walshipper_monitor\"\n",
            token.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&serve_cfg, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Any other address without authentication: refused, saying what to set.
    let open_cfg = d.join("open.toml");
    std::fs::write(
        &open_cfg,
        format!("{base}[serve]\nlisten = \"0.0.0.0:0\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&open_cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(Command::new(walshipper_bin())
        .arg("--config")
        .arg(&open_cfg)
        .arg("serve"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(walshipper::error::exit::USAGE),
        "{err}"
    );
    assert!(
        err.contains("is not a loopback address") && err.contains("token_file"),
        "{err}"
    );

    // The history: a run by hand, a job's run that fails (walshipper cannot
    // be started), the same job's next run that succeeds, a verification.
    let path_is = |p: &str| {
        wait_for(
            &c,
            "SELECT setting FROM pg_settings WHERE name = 'pg_backup.walshipper_path'",
            p,
            Duration::from_secs(10),
        );
    };
    c.sql("SELECT backup.job_create('nightly', '0 3 1 1 *')");
    c.sql("SELECT backup.backup_run(kind => 'full', wait => true)");
    c.sql("ALTER SYSTEM SET pg_backup.walshipper_path = '/nonexistent/walshipper'");
    c.sql("SELECT pg_reload_conf()");
    path_is("/nonexistent/walshipper");
    assert!(c
        .try_sql("SELECT backup.backup_run('nightly', wait => true)")
        .is_none());
    c.sql("ALTER SYSTEM RESET pg_backup.walshipper_path");
    c.sql("SELECT pg_reload_conf()");
    path_is(&walshipper_bin().display().to_string());
    c.sql("SELECT backup.backup_run('nightly', kind => 'incr', wait => true)");
    c.sql("SELECT backup.verify_run(wait => true)");
    let test_id = c.sql("SELECT backup.restore_test_run(wait => true)");
    c.switch_and_wait_archived(Duration::from_secs(60));
    wait_for(
        &c,
        "SELECT status || ' ' || backups FROM backup.repositories",
        "ok 2",
        Duration::from_secs(30),
    );
    assert_eq!(
        c.sql(
            "SELECT string_agg(coalesce(j.name, '-') || ' ' || e.kind || ' ' || e.status, ', ' ORDER BY e.execution_id) \
               FROM backup.backup_executions e LEFT JOIN backup.backup_jobs j USING (job_id)"
        ),
        "- full succeeded, nightly full failed, nightly incr succeeded"
    );

    let serve = Serve::start(&serve_cfg, &d.join("serve.log"));
    let addr = serve.addr.clone();
    let bearer = "Bearer a-test-token-0123456789";

    // Authentication on everything but /health.
    let r = get(&addr, "/metrics", None);
    assert_eq!(r.status, 401, "{}", r.head);
    assert!(r.head.contains("WWW-Authenticate: Bearer"), "{}", r.head);
    assert_eq!(
        get(&addr, "/metrics", Some("Bearer a-test-token-012345678")).status,
        401
    );
    assert_eq!(get(&addr, "/", Some("Basic YTpi")).status, 401);
    let h = get(&addr, "/health", None);
    assert_eq!(h.status, 200, "{}", h.body);
    let health: serde_json::Value = serde_json::from_str(&h.body).unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(request(&addr, "POST", "/metrics", Some(bearer)).status, 405);

    // /metrics against the catalog.
    let scrape = || {
        let r = get(&addr, "/metrics", Some(bearer));
        assert_eq!(r.status, 200, "{}", r.body);
        r
    };
    let r = scrape();
    for h in [
        "Content-Type: text/plain; version=0.0.4",
        "X-Content-Type-Options: nosniff",
        "Content-Security-Policy: default-src 'none'",
        "Cache-Control: no-store",
        "Referrer-Policy: no-referrer",
    ] {
        assert!(r.head.contains(h), "{h} missing:\n{}", r.head);
    }
    let m = samples(&r.body);
    assert_eq!(value(&m, "pg_backup_catalog_up"), 1.0);
    let runs: Vec<(&String, &f64)> = m
        .iter()
        .filter(|(k, _)| k.starts_with("pg_backup_backups_total{"))
        .collect();
    let want = [
        ("", "full", "cancelled", 0.0),
        ("", "full", "failed", 0.0),
        ("", "full", "succeeded", 1.0),
        ("nightly", "full", "cancelled", 0.0),
        ("nightly", "full", "failed", 1.0),
        ("nightly", "full", "succeeded", 0.0),
        ("nightly", "incr", "cancelled", 0.0),
        ("nightly", "incr", "failed", 0.0),
        ("nightly", "incr", "succeeded", 1.0),
    ];
    let want: Vec<(String, f64)> = want
        .iter()
        .map(|(j, k, s, v)| {
            (
                format!("pg_backup_backups_total{{backup_job=\"{j}\",kind=\"{k}\",repository=\"repo1\",status=\"{s}\"}}"),
                *v,
            )
        })
        .collect();
    assert_eq!(
        runs.iter()
            .map(|(k, v)| ((*k).clone(), **v))
            .collect::<Vec<_>>(),
        want
    );
    let started = num(
        &c,
        "SELECT count(*) FROM backup.backup_executions e JOIN backup.backup_jobs j USING (job_id) \
          WHERE j.name = 'nightly' AND e.kind = 'full' AND e.started_at IS NOT NULL",
    );
    assert_eq!(
        value(&m, "pg_backup_backups_started_total{backup_job=\"nightly\",kind=\"full\",repository=\"repo1\"}"),
        started
    );
    // Timestamps are the catalog's.
    let incr_done = num(
        &c,
        "SELECT extract(epoch FROM finished_at) FROM backup.backup_executions WHERE kind = 'incr'",
    );
    let failed_at = num(
        &c,
        "SELECT extract(epoch FROM finished_at) FROM backup.backup_executions WHERE status = 'failed'",
    );
    let close = |a: f64, b: f64| (a - b).abs() < 0.001;
    let nightly_incr = "{backup_job=\"nightly\",kind=\"incr\",repository=\"repo1\"}";
    assert!(close(
        value(
            &m,
            &format!("pg_backup_backup_last_success_timestamp_seconds{nightly_incr}")
        ),
        incr_done
    ));
    assert!(close(
        value(&m, "pg_backup_backup_last_failure_timestamp_seconds{backup_job=\"nightly\",kind=\"full\",repository=\"repo1\"}"),
        failed_at
    ));
    let nightly = "{backup_job=\"nightly\",kind=\"full\"}";
    assert!(close(
        value(
            &m,
            &format!("pg_backup_job_last_success_timestamp_seconds{nightly}")
        ),
        incr_done
    ));
    assert!(close(
        value(
            &m,
            &format!("pg_backup_job_last_failure_timestamp_seconds{nightly}")
        ),
        failed_at
    ));
    assert_eq!(
        value(&m, &format!("pg_backup_job_consecutive_failures{nightly}")),
        0.0
    );
    assert_eq!(value(&m, &format!("pg_backup_job_enabled{nightly}")), 1.0);
    assert_eq!(value(&m, &format!("pg_backup_job_overdue{nightly}")), 0.0);
    assert!(close(
        value(
            &m,
            &format!("pg_backup_job_next_run_timestamp_seconds{nightly}")
        ),
        num(
            &c,
            "SELECT extract(epoch FROM next_run_at) FROM backup.backup_jobs WHERE name = 'nightly'"
        )
    ));
    assert!(close(
        value(
            &m,
            "pg_backup_repository_last_success_timestamp_seconds{repository=\"repo1\"}"
        ),
        incr_done
    ));
    // Histograms: one full and one incr, their sums the catalog's.
    for kind in ["full", "incr"] {
        let l = format!("{{kind=\"{kind}\"}}");
        assert_eq!(
            value(&m, &format!("pg_backup_backup_duration_seconds_count{l}")),
            1.0
        );
        assert_eq!(
            value(
                &m,
                &format!("pg_backup_backup_duration_seconds_bucket{{kind=\"{kind}\",le=\"+Inf\"}}")
            ),
            1.0
        );
        let (dur, size, stored): (f64, f64, f64) = {
            let row = c.sql(&format!(
                "SELECT extract(epoch FROM finished_at - started_at) || ' ' || size_bytes || ' ' || stored_bytes \
                   FROM backup.backup_executions WHERE kind = '{kind}' AND status = 'succeeded'"
            ));
            let v: Vec<f64> = row.split(' ').map(|x| x.parse().unwrap()).collect();
            (v[0], v[1], v[2])
        };
        assert!(close(
            value(&m, &format!("pg_backup_backup_duration_seconds_sum{l}")),
            dur
        ));
        assert_eq!(
            value(&m, &format!("pg_backup_backup_size_bytes_sum{l}")),
            size
        );
        assert_eq!(
            value(&m, &format!("pg_backup_backup_stored_bytes_sum{l}")),
            stored
        );
    }
    for kind in ["integrity", "restore_test"] {
        let passed = num(
            &c,
            &format!("SELECT count(*) FROM backup.backup_verifications WHERE kind = '{kind}' AND status = 'passed'"),
        );
        assert!(passed >= 1.0);
        assert_eq!(
            value(&m, &format!("pg_backup_verifications_total{{kind=\"{kind}\",repository=\"repo1\",status=\"passed\"}}")),
            passed
        );
    }
    // The restore test's measured RTO and time.
    let (rto, tested_at) = {
        let row = c.sql(&format!(
            "SELECT rto_s || ' ' || extract(epoch FROM finished_at) FROM backup.backup_verifications \
              WHERE verification_id = {test_id} AND status = 'passed'"
        ));
        let v: Vec<f64> = row.split(' ').map(|x| x.parse().unwrap()).collect();
        (v[0], v[1])
    };
    assert!(close(
        value(&m, "pg_backup_last_rto_seconds{repository=\"repo1\"}"),
        rto
    ));
    assert!(close(
        value(
            &m,
            "pg_backup_restore_test_last_passed_timestamp_seconds{repository=\"repo1\"}"
        ),
        tested_at
    ));
    assert_eq!(value(&m, "pg_backup_rpo_target_seconds"), 600.0);
    assert_eq!(value(&m, "pg_backup_rto_target_seconds"), 3600.0);
    assert_eq!(
        value(&m, "pg_backup_repository_up{repository=\"repo1\"}"),
        1.0
    );
    assert_eq!(
        value(&m, "pg_backup_repository_backups{repository=\"repo1\"}"),
        2.0
    );
    // The scheduler: its sign of life in the catalog; the worker itself
    // only with pg_read_all_stats (pg_stat_activity hides its type).
    let seen = value(&m, "pg_backup_scheduler_last_seen_timestamp_seconds");
    assert!(
        num(&c, "SELECT extract(epoch FROM now())") - seen < 120.0,
        "{seen}"
    );
    assert!(!m.contains_key("pg_backup_scheduler_up"));
    c.sql("GRANT pg_read_all_stats TO walshipper_monitor");
    let r = scrape();
    let m = samples(&r.body);
    assert_eq!(value(&m, "pg_backup_scheduler_up"), 1.0);
    assert_eq!(value(&m, "pg_backup_workers_running"), 0.0);
    // No id, message or time in any label.
    for k in m.keys() {
        assert!(
            !k.contains("backup_id") && !k.contains("message") && !k.contains("2026"),
            "{k}"
        );
    }

    // Counts that move with the scheduler and the archiver: equal to the
    // catalog once both are read between two changes.
    eventually(
        "WAL and alert metrics match the catalog",
        Duration::from_secs(30),
        || {
            let before = c.sql(
            "SELECT archived_count || ' ' || failed_count || ' ' || \
                    (SELECT string_agg(kind || '/' || severity || '=' || count, ',' ORDER BY kind, severity) \
                       FROM (SELECT kind, severity, count(*) FROM backup.alerts WHERE resolved_at IS NULL GROUP BY 1, 2) a) \
               FROM pg_stat_archiver",
        );
            let m = samples(&scrape().body);
            let after = c.sql(
            "SELECT archived_count || ' ' || failed_count || ' ' || \
                    (SELECT string_agg(kind || '/' || severity || '=' || count, ',' ORDER BY kind, severity) \
                       FROM (SELECT kind, severity, count(*) FROM backup.alerts WHERE resolved_at IS NULL GROUP BY 1, 2) a) \
               FROM pg_stat_archiver",
        );
            if before != after {
                return Err("the catalog moved".into());
            }
            let open: Vec<String> = m
                .iter()
                .filter(|(k, v)| k.starts_with("pg_backup_alerts_open{") && **v > 0.0)
                .map(|(k, v)| {
                    let k = k.trim_start_matches("pg_backup_alerts_open{kind=\"");
                    let (kind, rest) = k.split_once('"').unwrap();
                    let sev = rest
                        .trim_start_matches(",severity=\"")
                        .trim_end_matches("\"}");
                    format!("{kind}/{sev}={v}")
                })
                .collect();
            let got = format!(
                "{} {} {}",
                value(&m, "pg_backup_wal_archived_total"),
                value(&m, "pg_backup_wal_archive_failed_total"),
                open.join(",")
            );
            (got.trim_end() == before.trim_end())
                .then_some(())
                .ok_or(format!("metrics {got:?}, catalog {before:?}"))
        },
    );
    // The repository's size and room: the catalog's (info --json's, as
    // the scheduler's last refresh recorded them).
    eventually(
        "repository figures match the catalog",
        Duration::from_secs(30),
        || {
            let q = "SELECT concat_ws(' ', coalesce(stored_bytes::text, '-'), coalesce(capacity_bytes::text, '-'), \
                        coalesce(free_bytes::text, '-'), coalesce(min_free_bytes::text, '-')) \
                   FROM backup.repository_status WHERE name = 'repo1'";
            let before = c.sql(q);
            let m = samples(&scrape().body);
            if c.sql(q) != before {
                return Err("the catalog moved".into());
            }
            let got: Vec<String> = ["stored", "capacity", "free", "min_free"]
                .iter()
                .map(|n| {
                    m.get(&format!(
                        "pg_backup_repository_{n}_bytes{{repository=\"repo1\"}}"
                    ))
                    .map(|v| v.to_string())
                    .unwrap_or("-".into())
                })
                .collect();
            (got.join(" ") == before)
                .then_some(())
                .ok_or(format!("metrics {got:?}, catalog {before:?}"))
        },
    );
    assert!(
        !c.sql("SELECT stored_bytes FROM backup.repository_status WHERE name = 'repo1'")
            .is_empty(),
        "the scheduler records the repository's size"
    );
    // Every alert kind and severity is present, 0 when none.
    let kinds = m
        .keys()
        .filter(|k| k.starts_with("pg_backup_alerts_open{"))
        .count();
    assert_eq!(
        kinds,
        walshipper::catalog::ALERT_KINDS.len() * walshipper::catalog::SEVERITIES.len()
    );
    assert_eq!(
        value(
            &m,
            "pg_backup_alerts_open{kind=\"repository_almost_full\",severity=\"critical\"}"
        ),
        0.0
    );

    // promtool's lint of the exposition.
    let mut lint = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin
        .take()
        .unwrap()
        .write_all(r.body.as_bytes())
        .unwrap();
    let lint = lint.wait_with_output().unwrap();
    assert!(
        lint.status.success() && lint.stdout.is_empty() && lint.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    // The shipped rules pass promtool, and use only metrics that exist.
    let rules = docs().join("prometheus-rules.yml");
    let out = run(Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(&rules));
    assert!(
        out.status.success(),
        "promtool check rules: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let scraped = names(&r.body);
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    let used: Vec<String> = rules_text
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
        .flat_map(metric_names_in)
        .collect();
    assert!(used.len() >= 7, "{used:?}");
    check_known("prometheus-rules.yml", &used, &scraped);
    // The Grafana dashboard: importable JSON with a Prometheus input, and
    // every metric its panels query exists.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(docs().join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dash["__inputs"][0]["name"], "DS_PROMETHEUS");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    let used: Vec<String> = exprs.iter().flat_map(|e| metric_names_in(e)).collect();
    assert!(used.len() >= 15, "{used:?}");
    check_known("grafana-dashboard.json", &used, &scraped);

    // A real Prometheus scrapes it (with the token) and answers queries.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let prom_dir = d.join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom_cfg = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             rule_files: ['{}']\n\
             scrape_configs:\n  - job_name: walshipper\n    authorization:\n      credentials_file: {}\n    \
             static_configs:\n      - targets: ['{addr}']\n",
            rules.display(),
            token.display()
        ),
    )
    .unwrap();
    let prom_log = prom_dir.join("log");
    let mut prom = Command::new(&prometheus)
        .arg(format!("--config.file={}", prom_cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&prom_log).unwrap())
        .spawn()
        .unwrap();
    let paddr = format!("127.0.0.1:{port}");
    let query = |q: &str| -> serde_json::Value {
        let r = match TcpStream::connect(&paddr) {
            Ok(_) => get(&paddr, &format!("/api/v1/query?query={q}"), None),
            Err(_) => return serde_json::Value::Null,
        };
        serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null)
    };
    let start = Instant::now();
    let result = loop {
        // pg_backup_backups_total{backup_job="nightly",kind="full",status="failed"}
        let v = query(
            "pg_backup_backups_total%7Bbackup_job%3D%22nightly%22%2Ckind%3D%22full%22%2Cstatus%3D%22failed%22%7D",
        );
        if let Some(r) = v["data"]["result"].as_array().filter(|r| !r.is_empty()) {
            break r.clone();
        }
        if start.elapsed() > Duration::from_secs(40) {
            let _ = prom.kill();
            panic!(
                "Prometheus never had the series: {v}\n{}",
                std::fs::read_to_string(&prom_log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(result.len(), 1, "{result:?}");
    assert_eq!(result[0]["metric"]["job"], "walshipper");
    assert_eq!(result[0]["metric"]["backup_job"], "nightly");
    assert_eq!(result[0]["metric"]["kind"], "full");
    assert_eq!(result[0]["value"][1], "1");
    let total = query("sum(pg_backup_backups_total%7Bstatus%3D%22succeeded%22%7D)");
    assert_eq!(total["data"]["result"][0]["value"][1], "2", "{total}");
    let up = query("up");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    // The rules loaded and evaluate (none about the history above is firing wrongly).
    let rules_api = get(&paddr, "/api/v1/rules", None);
    let rules_v: serde_json::Value = serde_json::from_str(&rules_api.body).unwrap();
    let groups = rules_v["data"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !groups.is_empty(),
        "Prometheus loaded no rule group: {}",
        rules_api.body
    );
    let _ = prom.kill();
    let _ = prom.wait();

    // A job dropped: its past runs keep their series (the name the run was
    // queued under), none moves to backup_job="" where increase() would
    // see an old failure as new.
    c.sql("SELECT backup.job_drop('nightly')");
    let m = samples(&scrape().body);
    assert_eq!(
        value(&m, "pg_backup_backups_total{backup_job=\"nightly\",kind=\"full\",repository=\"repo1\",status=\"failed\"}"),
        1.0
    );
    assert_eq!(
        value(&m, "pg_backup_backups_total{backup_job=\"\",kind=\"full\",repository=\"repo1\",status=\"failed\"}"),
        0.0
    );

    // The catalog goes away: /metrics says so (catalog_up 0), /health is
    // 503; it comes back: the same connection slots reconnect.
    c.stop();
    let m = samples(&scrape().body);
    assert_eq!(value(&m, "pg_backup_catalog_up"), 0.0);
    let h = get(&addr, "/health", None);
    assert_eq!(h.status, 503, "{}", h.body);
    assert!(h.body.contains("\"unavailable\""), "{}", h.body);
    let page = get(&addr, "/", Some(bearer));
    assert_eq!(page.status, 503, "{}", page.body);
    c.start();
    for _ in 0..8 {
        // Every worker's connection, not only one.
        let m = samples(&scrape().body);
        assert_eq!(
            value(&m, "pg_backup_catalog_up"),
            1.0,
            "{}",
            serve.log_text()
        );
    }
    assert_eq!(get(&addr, "/health", None).status, 200);
    // A catalog value never appears in a log line with a secret.
    assert!(
        !serve.log_text().contains("a-test-token"),
        "{}",
        serve.log_text()
    );

    // SIGTERM: a clean stop.
    let mut serve = serve;
    // SAFETY: signalling the child this test started.
    assert_eq!(
        unsafe { libc::kill(serve.child.id() as i32, libc::SIGTERM) },
        0
    );
    let start = Instant::now();
    let status = loop {
        if let Some(st) = serve.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}: {}", serve.log_text());
    assert!(serve.log_text().contains("walshipper serve stopped"));
    c.stop();
}
